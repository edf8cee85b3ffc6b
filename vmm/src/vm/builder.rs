//! Building a VM from a [`VmConfig`]: KVM → VM → guest memory → (no irqchip:
//! the VMM owns interrupt delivery) → kernel load → page tables, GDT, TSSs,
//! boot information → vCPUs and their registers → devices on the buses.

use std::io::Write;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, Kvm};
use metronome_abi::{layout, BootInfo, BOOT_MAGIC, BOOT_VERSION};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{Vm, VmShared};
use crate::boot::loader::{self, LoadKernelError};
use crate::boot::long_mode;
use crate::config::{ConsoleSink, KernelSource, VmConfig};
use crate::devices::DeviceManager;
use crate::guestmem::write_plain;
use crate::sampling::SamplingShared;
use crate::vcpu::advance::TimerAdvance;

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

fn open_console(config: &VmConfig) -> Result<Box<dyn Write + Send>, BuildVmError> {
    Ok(match &config.console {
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
    })
}

/// The boot information block the guest kernel reads first.
fn boot_info(config: &VmConfig, kernel_end: u64, tsc_khz: u64) -> BootInfo {
    BootInfo {
        magic: BOOT_MAGIC,
        version: BOOT_VERSION,
        vcpu_count: config.vcpus,
        mem_bytes: config.mem_bytes(),
        kernel_end,
        heap_base: layout::HEAP_BASE,
        heap_end: config.mem_bytes(),
        tsc_khz,
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
    }
}

impl Vm {
    /// Builds the VM (see the module docs for the order).
    pub fn build(config: VmConfig) -> Result<Self, BuildVmError> {
        config.validate()?;
        let (image, name) = kernel_image(&config)?;
        let console = open_console(&config)?;

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
        long_mode::write_page_tables(&mem, mem_bytes).map_err(BuildVmError::WriteBoot)?;
        long_mode::write_gdt(&mem, config.vcpus).map_err(BuildVmError::WriteBoot)?;

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
            vcpu.set_sregs(&long_mode::long_mode_sregs(id, sregs))
                .map_err(|e| BuildVmError::SetRegisters(id, e))?;
            vcpu.set_regs(&long_mode::entry_regs(id, kernel.entry))
                .map_err(|e| BuildVmError::SetRegisters(id, e))?;
            long_mode::write_tss(&mem, id).map_err(BuildVmError::WriteBoot)?;
            if id == 0 {
                tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
            }
            vcpus.push(vcpu);
        }

        let boot = boot_info(&config, kernel.end, u64::from(tsc_khz));
        write_plain(&mem, GuestAddress(layout::BOOT_INFO), &boot)
            .map_err(BuildVmError::WriteBoot)?;

        let sampling = match &config.sampling {
            Some(c) => Some(
                SamplingShared::new(c, config.vcpus).map_err(|e| BuildVmError::Config(e.into()))?,
            ),
            None => None,
        };
        if let Some(sampling) = &sampling {
            sampling.lightweight.attach(mem.clone());
            sampling
                .enable_guest_events(&mem)
                .map_err(BuildVmError::WriteBoot)?;
        }
        let shared =
            Arc::new(VmShared::new(mem, config.vcpus, sampling).map_err(BuildVmError::Host)?);
        for slot in &shared.vcpus {
            slot.lock().advance = TimerAdvance::new(config.timer_advance);
        }
        let devices = DeviceManager::new(&shared, console)?;
        Ok(Self {
            config,
            _kvm: kvm,
            _vm: vm,
            vcpus,
            shared,
            devices,
            kernel_image: image.into(),
        })
    }
}
