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
    layout, BootInfo, GuestReport, VcpuShared, Vector, Workload, BOOT_MAGIC, BOOT_VERSION,
};
use metronome_devices::Raise;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::config::{ConsoleSink, KernelSource, VmConfig};
use crate::devices::DeviceManager;
use crate::kick;
use crate::loader::{self, LoadKernelError};
use crate::shared::{VmExit, VmShared};
use crate::summary::{
    GuestVcpuSummary, Percentiles, StressSummary, Summary, TimerSummary, VcpuSummary,
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
            hz: config.hz,
            stathz: config.hz,
            profhz: config.hz * 10,
            ..Default::default()
        };
        write_plain(&mem, layout::BOOT_INFO, &boot).map_err(BuildVmError::WriteBoot)?;

        let shared = Arc::new(VmShared::new(mem, config.vcpus).map_err(BuildVmError::Host)?);
        let devices = DeviceManager::new(&shared, console)?;
        Ok(Self {
            config,
            _kvm: kvm,
            _vm: vm,
            vcpus,
            shared,
            devices,
        })
    }

    /// Runs the VM until it ends; `process_start` anchors the wall-clock figures.
    pub fn run(mut self, process_start: Instant) -> Summary {
        let shared = self.shared.clone();
        let mut exit_wall: Option<Duration> = None;
        let result = (|| -> Result<Vec<VcpuRunStats>, VmExit> {
            kick::install_handlers().map_err(|e| VmExit::Host(format!("signal handlers: {e}")))?;
            let signals = SignalSubscriber::new(shared.clone())
                .map_err(|e| VmExit::Host(format!("signalfd: {e}")))?;
            let pio = Arc::new(std::mem::take(&mut self.devices.pio));
            let mmio = Arc::new(std::mem::take(&mut self.devices.mmio));
            let mut threads: Vec<JoinHandle<VcpuRunStats>> = Vec::new();
            for (id, fd) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
                let runner =
                    VcpuRunner::new(id as u32, fd, shared.clone(), pio.clone(), mmio.clone());
                let handle = std::thread::Builder::new()
                    .name(format!("vcpu{id}"))
                    .spawn(move || runner.run())
                    .map_err(|e| VmExit::Host(format!("spawning vCPU thread: {e}")))?;
                threads.push(handle);
            }
            let stress = self
                .config
                .kick_stress_hz
                .map(|hz| StressGenerator::start(shared.clone(), hz));

            let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
                EventManager::new().map_err(|e| VmExit::Host(format!("event manager: {e}")))?;
            let exit_watch = Arc::new(Mutex::new(ExitSubscriber {
                shared: shared.clone(),
                fired: false,
            }));
            manager.add_subscriber(exit_watch.clone());
            manager.add_subscriber(Arc::new(Mutex::new(signals)));
            if let Some(limit) = self.config.timeout {
                let timeout = TimeoutSubscriber::new(shared.clone(), limit)
                    .map_err(|e| VmExit::Host(format!("timerfd: {e}")))?;
                manager.add_subscriber(Arc::new(Mutex::new(timeout)));
            }
            while !exit_watch.lock().unwrap_or_else(|p| p.into_inner()).fired {
                if let Err(e) = manager.run() {
                    shared.request_exit(VmExit::Host(format!("event loop: {e}")));
                    break;
                }
            }
            exit_wall = Some(process_start.elapsed());
            if let Some(stress) = stress {
                stress.stop();
                drain_stress(&shared);
            }
            shared.stop_all();
            Ok(threads
                .into_iter()
                .map(|t| t.join().unwrap_or_default())
                .collect())
        })();
        let stats = match result {
            Ok(stats) => stats,
            Err(reason) => {
                shared.request_exit(reason);
                shared.stop_all();
                Vec::new()
            }
        };
        let wall = process_start.elapsed();
        self.summarize(stats, wall, exit_wall.unwrap_or(wall))
    }

    fn summarize(&self, stats: Vec<VcpuRunStats>, wall: Duration, exit_wall: Duration) -> Summary {
        let shared = &self.shared;
        let reason = shared
            .exit_reason()
            .unwrap_or(VmExit::Host("no exit reason".into()));
        let (outcome, exit_code) = outcome_of(&reason);
        let mut message = reason.to_string();
        if matches!(reason, VmExit::Timeout { .. }) {
            for s in &stats {
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
                }
            })
            .collect();
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
        }
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
    }
}

fn report_key_name(key: u64) -> String {
    use metronome_abi::report_key::*;
    match key {
        PINGPONG_ROUNDS => "pingpong_rounds".into(),
        STRESS_RECEIVED => "stress_received".into(),
        DEMO_WORK => "demo_work".into(),
        other => format!("key_{other}"),
    }
}

/// Plain-data structures of the guest ABI that may be copied to and from guest memory.
///
/// # Safety
/// Implementors are `#[repr(C)]` structs of integer fields without padding, so
/// every bit pattern is a valid value.
unsafe trait Plain: Copy + Default {}
// SAFETY: repr(C), integer fields only, no padding (checked by the abi layout).
unsafe impl Plain for BootInfo {}
// SAFETY: as above.
unsafe impl Plain for VcpuShared {}
// SAFETY: as above.
unsafe impl Plain for GuestReport {}

fn write_plain<T: Plain>(
    mem: &GuestMemoryMmap,
    addr: u64,
    value: &T,
) -> Result<(), vm_memory::GuestMemoryError> {
    // SAFETY: T is plain data (see `Plain`), so its bytes are initialised.
    let bytes = unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    };
    mem.write_slice(bytes, GuestAddress(addr))
}

fn read_plain<T: Plain>(mem: &GuestMemoryMmap, addr: u64) -> Option<T> {
    let mut bytes = vec![0u8; std::mem::size_of::<T>()];
    mem.read_slice(&mut bytes, GuestAddress(addr)).ok()?;
    // SAFETY: T is plain data, and `bytes` holds size_of::<T>() bytes.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
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
                sleep_until(next);
            }
        });
        Self { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.thread.join();
    }
}

fn sleep_until(deadline_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: valid clock id and timespec; a signal may cut it short, which only
    // shortens one period.
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    };
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
