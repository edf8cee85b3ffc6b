//! Building a VM from a [`VmConfig`] and running it to the end.
//!
//! Build order (see [`Vm::build`]): KVM → VM → guest memory → (no irqchip: the
//! VMM owns interrupt delivery) → kernel load → page tables, GDT, TSSs, boot
//! information → vCPUs and their registers → devices on the buses.
//!
//! Running ([`Vm::run`]): one thread per vCPU; the calling thread runs an
//! event-manager loop that waits for the guest's exit, SIGINT/SIGTERM or the
//! `--timeout`, then stops the vCPUs (stop flag + kick), joins them, and builds
//! the [`Summary`].

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use metronome_abi::{
    hist, layout, BootInfo, GuestReport, ThreadInfo, VcpuShared, Vector, Workload, BOOT_MAGIC,
    BOOT_VERSION,
};
use metronome_devices::Raise;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::config::{ConsoleSink, KernelSource, VmConfig};
use crate::devices::DeviceManager;
use crate::guestmem::{read_plain, write_plain};
use crate::kick;
use crate::loader::{self, LoadKernelError};
use crate::shared::{VmExit, VmShared};
use crate::summary::{
    ClockConfigSummary, ClockintrSummary, CpTime, GuestVcpuSummary, IntervalSummary, Percentiles,
    StressSummary, Summary, ThreadSummary, TimerSummary, VcpuSummary,
};
use crate::vcpu::{VcpuRunStats, VcpuRunner};

/// How long the stress drain may take before the VM is stopped anyway.
const STRESS_DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// Why a VM could not be built. Each variant names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildVmError {
    /// The configuration broke a rule.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The kernel file could not be read.
    #[error("cannot read kernel file '{path}'")]
    ReadKernel {
        /// The path given.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel image was refused.
    #[error("kernel '{path}' cannot be loaded")]
    Kernel {
        /// The path given (or "embedded").
        path: String,
        /// Why.
        #[source]
        source: LoadKernelError,
    },
    /// The console file could not be created.
    #[error("cannot create console file '{path}'")]
    Console {
        /// The path given.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and accessible?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A required KVM capability is missing.
    #[error("KVM lacks a required capability: {0}")]
    Capability(&'static str),
    /// KVM_CREATE_VM failed.
    #[error("cannot create the VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// Guest memory could not be mapped.
    #[error("cannot allocate {0} MiB of guest memory")]
    GuestMemory(u64, #[source] vm_memory::mmap::FromRangesError),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("cannot register guest memory with KVM")]
    RegisterMemory(#[source] kvm_ioctls::Error),
    /// Writing the boot structures failed.
    #[error("cannot write boot structures into guest memory")]
    WriteBoot(#[source] vm_memory::GuestMemoryError),
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {0}")]
    CreateVcpu(u32, #[source] kvm_ioctls::Error),
    /// Setting vCPU registers failed.
    #[error("cannot set the registers of vCPU {0}")]
    SetRegisters(u32, #[source] kvm_ioctls::Error),
    /// Device placement failed.
    #[error("cannot place devices")]
    Devices(#[from] crate::bus::BusError),
    /// Host resources (eventfds, signals) failed.
    #[error("host setup failed")]
    Host(#[source] std::io::Error),
}

/// Reads and checks the kernel image the configuration names, without KVM.
pub fn kernel_image(config: &VmConfig) -> Result<(Vec<u8>, String), BuildVmError> {
    let (image, name) = match &config.kernel {
        KernelSource::Embedded => (
            metronome_resources::GUEST_KERNEL.to_vec(),
            "embedded".to_string(),
        ),
        KernelSource::File(path) => {
            let name = path.display().to_string();
            let image = std::fs::read(path).map_err(|source| BuildVmError::ReadKernel {
                path: name.clone(),
                source,
            })?;
            (image, name)
        }
    };
    loader::check(&image).map_err(|source| BuildVmError::Kernel {
        path: name.clone(),
        source,
    })?;
    Ok((image, name))
}

/// A built VM, ready to run.
pub struct Vm {
    config: VmConfig,
    // Kept alive for the VM's lifetime: dropping it would tear the VM down.
    _kvm: Kvm,
    _vm: VmFd,
    vcpus: Vec<VcpuFd>,
    shared: Arc<VmShared>,
    devices: DeviceManager,
    /// The kernel ELF, for symbolizing profiles.
    kernel_image: Vec<u8>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Builds the VM (see the module docs for the order).
    pub fn build(config: VmConfig) -> Result<Self, BuildVmError> {
        config.validate()?;
        let (image, name) = kernel_image(&config)?;
        let console: Box<dyn Write + Send> = match &config.console {
            ConsoleSink::Stdout => Box::new(std::io::stdout()),
            ConsoleSink::Null => Box::new(std::io::sink()),
            ConsoleSink::File(path) => {
                Box::new(
                    std::fs::File::create(path).map_err(|source| BuildVmError::Console {
                        path: path.display().to_string(),
                        source,
                    })?,
                )
            }
        };

        let kvm = Kvm::new().map_err(BuildVmError::OpenKvm)?;
        if !kvm.check_extension(Cap::SyncRegs) {
            return Err(BuildVmError::Capability("KVM_CAP_SYNC_REGS"));
        }
        if !kvm.check_extension(Cap::ImmediateExit) {
            return Err(BuildVmError::Capability("KVM_CAP_IMMEDIATE_EXIT"));
        }
        let vm = kvm.create_vm().map_err(BuildVmError::CreateVm)?;

        let mem_bytes = config.mem_bytes();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_bytes as usize)])
            .map_err(|e| BuildVmError::GuestMemory(config.mem_mib, e))?;
        let host_addr = mem
            .get_host_address(GuestAddress(0))
            .map_err(BuildVmError::WriteBoot)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: mem_bytes,
            userspace_addr: host_addr as u64,
            flags: 0,
        };
        // SAFETY: the region is backed by `mem`, which lives in `shared` for as
        // long as the VM fd (both are owned by this Vm and dropped together).
        unsafe { vm.set_user_memory_region(region) }.map_err(BuildVmError::RegisterMemory)?;

        let kernel = loader::load(&image, &mem)
            .map_err(|source| BuildVmError::Kernel { path: name, source })?;
        crate::arch::write_page_tables(&mem, mem_bytes).map_err(BuildVmError::WriteBoot)?;
        crate::arch::write_gdt(&mem, config.vcpus).map_err(BuildVmError::WriteBoot)?;

        let mut vcpus = Vec::new();
        let mut tsc_khz = 0;
        for id in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| BuildVmError::CreateVcpu(id, e))?;
            let cpuid = kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(|e| BuildVmError::SetRegisters(id, e))?;
            vcpu.set_cpuid2(&cpuid)
                .map_err(|e| BuildVmError::SetRegisters(id, e))?;
            let sregs = vcpu
                .get_sregs()
                .map_err(|e| BuildVmError::SetRegisters(id, e))?;
            vcpu.set_sregs(&crate::arch::long_mode_sregs(id, sregs))
                .map_err(|e| BuildVmError::SetRegisters(id, e))?;
            vcpu.set_regs(&crate::arch::entry_regs(id, kernel.entry))
                .map_err(|e| BuildVmError::SetRegisters(id, e))?;
            crate::arch::write_tss(&mem, id).map_err(BuildVmError::WriteBoot)?;
            if id == 0 {
                tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
            }
            vcpus.push(vcpu);
        }

        let boot = BootInfo {
            magic: BOOT_MAGIC,
            version: BOOT_VERSION,
            vcpu_count: config.vcpus,
            mem_bytes,
            kernel_end: kernel.end,
            heap_base: layout::HEAP_BASE,
            heap_end: mem_bytes,
            tsc_khz: u64::from(tsc_khz),
            duration_ns: config
                .duration
                .map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX)) as u64),
            workload: config.workload as u32,
            workload_arg: config.workload_arg,
            flags: if config.profile_middle_third {
                metronome_abi::boot_flags::PROFILE_MIDDLE_THIRD
            } else {
                0
            },
            hz: config.clock.hz,
            stathz: config.clock.stathz,
            profhz: config.clock.profhz,
            // Validated: 0..=10^9.
            schedhz: config.clock.schedhz as u32,
            clock_flags: config.clock.flags,
            stat_seed: config.stat_seed,
            ..Default::default()
        };
        write_plain(&mem, layout::BOOT_INFO, &boot).map_err(BuildVmError::WriteBoot)?;

        let sampling = match &config.sampling {
            // Validated with the same engine by `config.validate()`.
            Some(c) => Some(
                crate::sampling::SamplingShared::new(c.clone(), config.vcpus).map_err(|e| {
                    BuildVmError::Config(crate::config::ConfigError::Samplers(c.samplers, e))
                })?,
            ),
            None => None,
        };
        let shared =
            Arc::new(VmShared::new(mem, config.vcpus, sampling).map_err(BuildVmError::Host)?);
        let devices = DeviceManager::new(&shared, console)?;
        Ok(Self {
            config,
            _kvm: kvm,
            _vm: vm,
            vcpus,
            shared,
            devices,
            kernel_image: image,
        })
    }

    /// Runs the VM until it ends; `process_start` anchors the wall-clock figures.
    pub fn run(self, process_start: Instant) -> Summary {
        match self.start(process_start) {
            Ok(running) => running.wait(),
            Err((vm, reason)) => {
                vm.shared.request_exit(reason);
                vm.summarize(&[], process_start.elapsed(), process_start.elapsed())
            }
        }
    }

    /// Starts the vCPU threads (and the stress generator, if configured). The
    /// calling thread must then [`RunningVm::wait`]; a [`VmController`] from
    /// [`RunningVm::controller`] drives the VM from other threads meanwhile.
    #[allow(clippy::result_large_err)]
    pub fn start(mut self, process_start: Instant) -> Result<RunningVm, (Vm, VmExit)> {
        let shared = self.shared.clone();
        if let Err(e) = kick::install_handlers() {
            return Err((self, VmExit::Host(format!("signal handlers: {e}"))));
        }
        let signals = match SignalSubscriber::new(shared.clone()) {
            Ok(s) => s,
            Err(e) => return Err((self, VmExit::Host(format!("signalfd: {e}")))),
        };
        let pio = Arc::new(std::mem::take(&mut self.devices.pio));
        let mmio = Arc::new(std::mem::take(&mut self.devices.mmio));
        let mut threads: Vec<JoinHandle<VcpuRunStats>> = Vec::new();
        for (id, fd) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let runner = VcpuRunner::new(id as u32, fd, shared.clone(), pio.clone(), mmio.clone());
            match std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || runner.run())
            {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    shared.request_exit(VmExit::Host(format!("spawning vCPU thread: {e}")));
                    break;
                }
            }
        }
        let stress = self
            .config
            .kick_stress_hz
            .map(|hz| StressGenerator::start(shared.clone(), hz));
        if shared.sampling.is_some() {
            let controller = VmController {
                shared: shared.clone(),
            };
            if let Err(e) = controller.sampling_start() {
                shared.request_exit(VmExit::Host(format!("starting sampling: {e}")));
            }
        }
        Ok(RunningVm {
            vm: self,
            threads,
            stress,
            signals: Some(signals),
            process_start,
        })
    }
    fn summarize(&self, stats: &[VcpuRunStats], wall: Duration, exit_wall: Duration) -> Summary {
        let shared = &self.shared;
        let reason = shared
            .exit_reason()
            .unwrap_or(VmExit::Host("no exit reason".into()));
        let (outcome, exit_code) = outcome_of(&reason);
        let mut message = reason.to_string();
        if matches!(reason, VmExit::Timeout { .. }) {
            for s in stats {
                message.push_str(&format!(
                    "; vCPU {} was at RIP {:#x} (CPL{}, interrupts {})",
                    s.id,
                    s.last_rip,
                    s.last_cs & 3,
                    if s.last_rflags & 0x200 != 0 {
                        "on"
                    } else {
                        "off"
                    }
                ));
            }
        }
        let report: GuestReport = read_plain(&shared.mem, layout::GUEST_REPORT).unwrap_or_default();
        let reports = report.reports[..(report.report_count as usize).min(report.reports.len())]
            .iter()
            .map(|[k, v]| (report_key_name(*k), *v))
            .collect();
        let clock = self.config.clock;
        let period = 1_000_000_000 / u64::from(clock.hz.max(1));
        let threads: Vec<ThreadInfo> = (0..metronome_abi::MAX_THREADS)
            .filter_map(|i| {
                read_plain(
                    &shared.mem,
                    layout::THREAD_TABLE + (i * std::mem::size_of::<ThreadInfo>()) as u64,
                )
            })
            .collect();
        let vcpus = (0..self.config.vcpus)
            .map(|id| {
                let guest: VcpuShared = read_plain(
                    &shared.mem,
                    layout::percpu_region(id) + layout::PERCPU_SHARED,
                )
                .unwrap_or_default();
                let run = stats
                    .iter()
                    .find(|s| s.id == id)
                    .cloned()
                    .unwrap_or_default();
                let slot = &shared.vcpus[id as usize];
                let irq = slot.lock();
                let t = irq.timer.counters();
                VcpuSummary {
                    id,
                    user_threads_run: guest.user_threads_run,
                    context_switches: guest.context_switches,
                    interrupts_injected: irq.injected.total(),
                    ipis_received: irq.injected.ipi,
                    halts: run.halts,
                    exits: run.exits.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                    kicks: slot.kicks_sent.load(Ordering::Relaxed),
                    bus_misses: run.bus_misses,
                    timer: TimerSummary {
                        rearms: t.rearms,
                        triggers: t.triggers,
                        rearm_zero: t.rearm_zero,
                        cancels: t.cancels,
                        injections: t.injections,
                        coalesced: t.coalesced,
                        clamped: t.clamped,
                        early_injections: t.early_injections,
                        bad_accesses: t.bad_accesses,
                        host_lateness_ns: Percentiles {
                            p50: irq.host_lateness.percentile(50.0),
                            p99: irq.host_lateness.percentile(99.0),
                            max: irq.host_lateness.max(),
                            count: irq.host_lateness.count(),
                        },
                    },
                    stress: StressSummary {
                        sent: irq.stress.sent,
                        skipped: irq.stress.skipped,
                        injected: irq.injected.stress,
                        guest_received: guest.stress_received,
                    },
                    guest: GuestVcpuSummary {
                        timer_interrupts: guest.timer_interrupts,
                        ticks: guest.ticks,
                        ipis_received: guest.ipis_received,
                        syscalls: guest.syscalls,
                        pingpong: guest.pingpong,
                    },
                    hardclock: guest.hardclock,
                    statclock: guest.statclock,
                    schedclock: guest.schedclock,
                    profclock: guest.profclock,
                    clockintr: guest.clockintr.into(),
                    guest_lateness_ns: Percentiles {
                        p50: hist::percentile(&guest.lateness_hist, guest.lateness_max, 50),
                        p99: hist::percentile(&guest.lateness_hist, guest.lateness_max, 99),
                        max: guest.lateness_max,
                        count: guest
                            .lateness_hist
                            .0
                            .iter()
                            .fold(0u64, |a, &n| a.saturating_add(n)),
                    },
                    cp_time: CpTime {
                        user: guest.cp_time[0],
                        system: guest.cp_time[1],
                        interrupt: guest.cp_time[2],
                        idle: guest.cp_time[3],
                    },
                    threads: threads
                        .iter()
                        .filter(|t| t.tid != 0 && t.vcpu == u64::from(id))
                        .map(|t| ThreadSummary {
                            tid: t.tid,
                            name: String::from_utf8_lossy(&t.name)
                                .trim_end_matches('\0')
                                .to_string(),
                            user: t.user_ticks,
                            system: t.sys_ticks,
                            interrupt: t.intr_ticks,
                            estcpu: t.estcpu,
                            priority: t.priority,
                            switches: t.switches,
                        })
                        .collect(),
                    statclock_intervals: IntervalSummary {
                        count: guest.stat_interval_count,
                        sum_ns: guest.stat_interval_sum,
                        min_ns: guest.stat_interval_min,
                        max_ns: guest.stat_interval_max,
                        first: guest.stat_intervals[..(guest.stat_interval_count as usize)
                            .min(metronome_abi::STAT_INTERVALS)]
                            .to_vec(),
                    },
                    max_hardclock_batch: guest.max_hardclock_batch,
                    resume_first_batch: guest.resume_first_batch,
                    first_dispatch_hardclocks: guest.first_dispatch_hardclocks,
                    cpu_inits: guest.cpu_inits,
                    hardclock_phase_ns: guest.pending[..guest.pending_count.min(3) as usize]
                        .iter()
                        .find(|e| e.kind == metronome_abi::event_kind::HARDCLOCK)
                        .map_or(0, |e| e.expiration % period.max(1)),
                    last_dispatch_ns: guest.last_dispatch_ns,
                }
            })
            .collect::<Vec<VcpuSummary>>();
        let mut clockintr_total = ClockintrSummary::default();
        for v in &vcpus {
            clockintr_total.add(&v.clockintr);
        }
        Summary {
            outcome: outcome.to_string(),
            message,
            guest_exit_code: match reason {
                VmExit::Guest { code } => Some(code),
                _ => None,
            },
            guest_uptime_ns: shared.now(),
            host_wall_ns: wall.as_nanos() as u64,
            host_wall_to_exit_ns: exit_wall.as_nanos() as u64,
            vcpu_count: self.config.vcpus,
            mem_mib: self.config.mem_mib,
            workload: workload_name(self.config.workload).to_string(),
            reports,
            vcpus,
            exit_code,
            config: ClockConfigSummary {
                hz: clock.hz,
                stathz: clock.stathz,
                profhz: clock.profhz,
                schedhz: clock.schedhz,
                rndstat: clock.flags & clockintr::CL_RNDSTAT != 0,
                stat_seed: self.config.stat_seed,
                hardclock_period_ns: period,
                statclock_avg_ns: clockintr::StatVar::new(clock.stathz.max(1)).avg,
                statclock_min_ns: clockintr::StatVar::new(clock.stathz.max(1)).min,
                statclock_mask: clockintr::StatVar::new(clock.stathz.max(1)).mask,
            },
            clockintr_total,
            sampling: None,
            guest_errors: crate::summary::GuestErrors {
                vic_bad_accesses: self.devices.vic.bad_accesses.load(Ordering::Relaxed),
                control_bad_writes: self.devices.control.bad_reports.load(Ordering::Relaxed),
                spurious_eois: shared
                    .vcpus
                    .iter()
                    .map(|slot| slot.lock().vic.counters().spurious_eois)
                    .sum(),
            },
            errors: Vec::new(),
        }
    }
}

/// A VM whose vCPUs are running.
pub struct RunningVm {
    vm: Vm,
    threads: Vec<JoinHandle<VcpuRunStats>>,
    stress: Option<StressGenerator>,
    signals: Option<SignalSubscriber>,
    process_start: Instant,
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}

impl RunningVm {
    /// A handle to drive the VM from other threads.
    pub fn controller(&self) -> VmController {
        VmController {
            shared: self.vm.shared.clone(),
        }
    }

    /// Runs the event loop until the VM ends (guest exit, fault, signal,
    /// timeout, or [`VmController::stop`]), stops and joins the vCPUs, and
    /// returns the summary.
    pub fn wait(mut self) -> Summary {
        let shared = self.vm.shared.clone();
        let exit_wall = match self.event_loop() {
            Ok(()) => self.process_start.elapsed(),
            Err(reason) => {
                shared.request_exit(reason);
                self.process_start.elapsed()
            }
        };
        // The signalfd is gone with the event loop: from here on SIGINT and
        // SIGTERM take their default action, so a stuck shutdown can still be
        // interrupted.
        unblock_stop_signals();
        if let Some(stress) = self.stress.take() {
            stress.stop();
            drain_stress(&shared);
        }
        let controller = self.controller();
        if shared.sampling.is_some() {
            // An error here only means sampling was already off.
            let _ = controller.sampling_stop();
        }
        shared.stop_all();
        let mut stats: Vec<VcpuRunStats> = std::mem::take(&mut self.threads)
            .into_iter()
            .map(|t| t.join().unwrap_or_default())
            .collect();
        let mut summary = self
            .vm
            .summarize(&stats, self.process_start.elapsed(), exit_wall);
        if let Some(sampling) = &shared.sampling {
            summary.sampling = Some(crate::profiling::finish(
                sampling,
                &mut stats,
                &self.vm.kernel_image,
                summary.guest_uptime_ns,
                &mut summary.errors,
            ));
        }
        summary
    }

    fn event_loop(&mut self) -> Result<(), VmExit> {
        let shared = self.vm.shared.clone();
        let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(|e| VmExit::Host(format!("event manager: {e}")))?;
        let exit_watch = Arc::new(Mutex::new(ExitSubscriber {
            shared: shared.clone(),
            fired: false,
        }));
        manager.add_subscriber(exit_watch.clone());
        if let Some(signals) = self.signals.take() {
            manager.add_subscriber(Arc::new(Mutex::new(signals)));
        }
        if let Some(limit) = self.vm.config.timeout {
            let timeout = TimeoutSubscriber::new(shared.clone(), limit)
                .map_err(|e| VmExit::Host(format!("timerfd: {e}")))?;
            manager.add_subscriber(Arc::new(Mutex::new(timeout)));
        }
        while !exit_watch.lock().unwrap_or_else(|p| p.into_inner()).fired {
            manager
                .run()
                .map_err(|e| VmExit::Host(format!("event loop: {e}")))?;
        }
        Ok(())
    }
}

/// Why a control operation was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// The VM has ended or is ending.
    #[error("the VM is not running")]
    NotRunning,
    /// pause while paused.
    #[error("the VM is already paused")]
    AlreadyPaused,
    /// resume while running.
    #[error("the VM is not paused")]
    NotPaused,
    /// No such vCPU.
    #[error("there is no vCPU {0}")]
    NoSuchVcpu(u32),
}

/// Why a sampling operation was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SamplingError {
    /// The VM was built without sampling.
    #[error("sampling is not configured for this VM")]
    NotConfigured,
    /// The VM has ended.
    #[error("the VM is not running")]
    NotRunning,
    /// The engine refused.
    #[error("kperf refused: {0}")]
    Kperf(metronome_devices::kptimer::KperfError),
}

/// How a paused VM resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumeMode {
    /// Just continue: the guest finds that its clock jumped.
    Continue,
    /// Tell the guest through the timer device (TIMER_RESUMES and a
    /// TimerResume interrupt on every vCPU) so that it re-runs clockintr_cpu_init.
    Reinit,
}

/// Drives a running VM from any thread: pause, resume, hold a vCPU, stop.
/// The guest clock keeps running while vCPUs are paused or held (spec AMB-6).
#[derive(Clone, Debug)]
pub struct VmController {
    shared: Arc<VmShared>,
}

impl VmController {
    /// The guest clock (device time) in ns.
    pub fn uptime_ns(&self) -> u64 {
        self.shared.now()
    }

    /// Whether the VM has ended or is ending.
    pub fn ended(&self) -> bool {
        self.shared.exit_reason().is_some()
    }

    /// Stops every vCPU out of the guest and returns once all are parked.
    pub fn pause(&self) -> Result<(), ControlError> {
        let shared = &self.shared;
        let mut state = shared.pause_state();
        if self.ended() {
            return Err(ControlError::NotRunning);
        }
        if state.paused {
            return Err(ControlError::AlreadyPaused);
        }
        shared.set_paused(&mut state, true);
        drop(state);
        for id in 0..shared.vcpus.len() as u32 {
            shared.wake(id);
        }
        let mut state = shared.pause_state();
        while state.paused
            && (state.parked as usize) < shared.vcpus.len()
            && !shared.stopping()
            && !self.ended()
        {
            state = shared
                .pause_cv
                .wait_timeout(state, Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            // Kick again: a vCPU may have re-entered the guest before seeing the flag.
            for id in 0..shared.vcpus.len() as u32 {
                shared.wake(id);
            }
        }
        Ok(())
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self, mode: ResumeMode) -> Result<(), ControlError> {
        let shared = &self.shared;
        let mut state = shared.pause_state();
        if !state.paused {
            return Err(ControlError::NotPaused);
        }
        if mode == ResumeMode::Reinit {
            state.reinit_resumes += 1;
            for slot in &shared.vcpus {
                slot.lock().vic.raise(Vector::TimerResume as u8);
            }
        }
        shared.set_paused(&mut state, false);
        Ok(())
    }

    /// Keeps vCPU `id` out of the guest for `duration` (the guest clock runs on).
    pub fn hold_vcpu(&self, id: u32, duration: Duration) -> Result<(), ControlError> {
        let slot = self
            .shared
            .vcpus
            .get(id as usize)
            .ok_or(ControlError::NoSuchVcpu(id))?;
        if self.ended() {
            return Err(ControlError::NotRunning);
        }
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        let until = self.shared.now().saturating_add(nanos);
        slot.hold_until.store(until, Ordering::Release);
        self.shared.wake(id);
        Ok(())
    }

    /// Ends the VM from the host.
    pub fn stop(&self) {
        self.shared.request_exit(VmExit::Stopped);
    }

    /// Starts host-side sampling (KT-ST-*): every vCPU gets its kperf deadline.
    pub fn sampling_start(&self) -> Result<(), SamplingError> {
        let sampling = self
            .shared
            .sampling
            .as_ref()
            .ok_or(SamplingError::NotConfigured)?;
        if self.ended() {
            return Err(SamplingError::NotRunning);
        }
        sampling
            .start(self.shared.now())
            .map_err(SamplingError::Kperf)?;
        for id in 0..self.shared.vcpus.len() as u32 {
            self.shared.wake(id);
        }
        Ok(())
    }

    /// Stops host-side sampling synchronously: when this returns, no vCPU
    /// takes another sample (KT-SP-1, AMB-17).
    pub fn sampling_stop(&self) -> Result<(), SamplingError> {
        let sampling = self
            .shared
            .sampling
            .as_ref()
            .ok_or(SamplingError::NotConfigured)?;
        let epoch = sampling
            .begin_stop(self.shared.now())
            .map_err(SamplingError::Kperf)?;
        let kick = |id| {
            // Running or halted vCPUs are kicked or woken; paused ones wait on
            // the pause condition variable, which a signal does not end.
            self.shared.wake(id);
            self.shared.pause_cv.notify_all();
        };
        sampling.wait_for_acks(epoch, kick, || self.shared.stopping());
        Ok(())
    }

    /// Samples taken so far, all vCPUs.
    pub fn samples_taken(&self) -> u64 {
        self.shared
            .sampling
            .as_ref()
            .map_or(0, |s| s.samples_taken.load(Ordering::Acquire))
    }

    /// Every vCPU's pending clockintr events, like ddb's `show all clockintr`.
    pub fn dump_clockintr(&self) -> String {
        crate::dump::clockintr(&self.shared)
    }
}

fn outcome_of(reason: &VmExit) -> (&'static str, i32) {
    use metronome_abi::exit::*;
    match reason {
        VmExit::Guest { code: 0 } => ("guest_exit", VMM_OK),
        VmExit::Guest { .. } => ("guest_exit", VMM_GUEST_FAILED),
        VmExit::Fault(_) => ("fault", VMM_GUEST_FAULT),
        VmExit::Panic { .. } => ("panic", VMM_GUEST_FAULT),
        VmExit::TripleFault { .. } => ("triple_fault", VMM_GUEST_FAULT),
        VmExit::Emulation { .. } => ("emulation", VMM_GUEST_FAULT),
        VmExit::Timeout { .. } => ("timeout", VMM_TIMEOUT),
        VmExit::Signal(_) => ("signal", VMM_SIGNALLED),
        VmExit::Stopped => ("stopped", VMM_SIGNALLED),
        VmExit::Host(_) => ("host_error", VMM_HOST_ERROR),
    }
}

/// The name of a workload, as the command line spells it.
pub fn workload_name(workload: Workload) -> &'static str {
    match workload {
        Workload::Demo => "demo",
        Workload::PingPong => "pingpong",
        Workload::Fault => "fault",
        Workload::SpinCpl0 => "spin-cpl0",
        Workload::ExitNow => "exit-now",
        Workload::KickStress => "kick-stress",
        Workload::Profile => "profile",
    }
}

fn report_key_name(key: u64) -> String {
    use metronome_abi::report_key::*;
    match key {
        PINGPONG_ROUNDS => "pingpong_rounds".into(),
        PROFIL_ON_NS => "profil_on_ns".into(),
        PROFIL_OFF_NS => "profil_off_ns".into(),
        STRESS_RECEIVED => "stress_received".into(),
        DEMO_WORK => "demo_work".into(),
        other => format!("key_{other}"),
    }
}

/// Waits until no stress interrupt is pending or in service on any vCPU, for
/// at most [`STRESS_DRAIN_LIMIT`]: the guest keeps running (the exiting vCPU
/// idles with interrupts on) so that every interrupt sent is also delivered.
fn drain_stress(shared: &VmShared) {
    let vector = Vector::Stress as u8;
    let start = Instant::now();
    while start.elapsed() < STRESS_DRAIN_LIMIT {
        let busy = shared.vcpus.iter().any(|slot| {
            let irq = slot.lock();
            irq.vic.is_pending(vector) || irq.vic.in_service() == Some(vector)
        });
        if !busy {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    log::warn!("stress interrupts still in flight after {STRESS_DRAIN_LIMIT:?}");
}

/// Sends a stress interrupt to every vCPU at a fixed rate, and kicks each one
/// every period: a new interrupt is only sent when the previous one has been
/// injected, so each one sent must be delivered exactly once.
struct StressGenerator {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl StressGenerator {
    fn start(shared: Arc<VmShared>, hz: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            kick::set_min_timer_slack();
            let period = 1_000_000_000 / u64::from(hz);
            let mut next = kick::monotonic_ns();
            while !flag.load(Ordering::Acquire) {
                next += period;
                for (id, slot) in shared.vcpus.iter().enumerate() {
                    let mut irq = slot.lock();
                    let vector = Vector::Stress as u8;
                    if irq.vic.is_pending(vector) {
                        irq.stress.skipped += 1;
                    } else if irq.vic.raise(vector) == Raise::Queued {
                        irq.stress.sent += 1;
                    }
                    drop(irq);
                    shared.wake(id as u32);
                }
                kick::sleep_until_monotonic(next);
            }
        });
        Self { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.thread.join();
    }
}

/// Watches the exit eventfd; marks the loop done.
struct ExitSubscriber {
    shared: Arc<VmShared>,
    fired: bool,
}

impl MutEventSubscriber for ExitSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.shared.exit_evt.read();
        self.fired = true;
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.shared.exit_evt, EventSet::IN)) {
            self.shared
                .request_exit(VmExit::Host(format!("watching exit eventfd: {e}")));
            self.fired = true;
        }
    }
}

/// SIGINT and SIGTERM, blocked in every thread and read from a signalfd.
struct SignalSubscriber {
    shared: Arc<VmShared>,
    fd: OwnedFd,
}

impl SignalSubscriber {
    /// Blocks SIGINT/SIGTERM in the calling thread (and so in threads it spawns
    /// afterwards) and opens a signalfd for them.
    fn new(shared: Arc<VmShared>) -> std::io::Result<Self> {
        // SAFETY: sigset manipulation on a local set; pthread_sigmask and
        // signalfd with valid arguments; the fd is owned right away.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(Self {
                shared,
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }
}

impl MutEventSubscriber for SignalSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // SAFETY: an all-zero signalfd_siginfo is valid; read fills it.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading into a buffer of exactly one record from our own fd.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n == size as isize {
            self.shared
                .request_exit(VmExit::Signal(info.ssi_signo as i32));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            self.shared
                .request_exit(VmExit::Host(format!("watching signalfd: {e}")));
        }
    }
}

/// Unblocks SIGINT and SIGTERM in the calling thread.
fn unblock_stop_signals() {
    // SAFETY: sigset manipulation on a local set and pthread_sigmask with valid arguments.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// The host-side wall-clock limit.
struct TimeoutSubscriber {
    shared: Arc<VmShared>,
    fd: TimerFd,
    limit: Duration,
}

impl TimeoutSubscriber {
    fn new(shared: Arc<VmShared>, limit: Duration) -> std::io::Result<Self> {
        let mut fd = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        fd.reset(limit, None)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(Self { shared, fd, limit })
    }
}

impl MutEventSubscriber for TimeoutSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.fd.wait();
        self.shared.request_exit(VmExit::Timeout {
            limit_ms: self.limit.as_millis() as u64,
        });
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            self.shared
                .request_exit(VmExit::Host(format!("watching timerfd: {e}")));
        }
    }
}
