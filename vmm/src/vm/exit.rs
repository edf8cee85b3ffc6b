//! Why a VM ended, and what that means for the process exit code.

use metronome_abi::FaultReport;

/// Why the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote its exit status to the debug-exit port.
    Guest {
        /// The status.
        code: u32,
    },
    /// The guest took an exception it could not handle.
    Fault(Box<FaultReport>),
    /// The guest kernel panicked.
    Panic {
        /// The vCPU that panicked.
        vcpu: u32,
        /// The guest's message.
        message: String,
    },
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU.
        vcpu: u32,
        /// Its RIP at the last exit.
        rip: u64,
    },
    /// KVM could not run or emulate guest code.
    Emulation {
        /// The vCPU.
        vcpu: u32,
        /// What KVM reported.
        detail: String,
    },
    /// The host-side `--timeout` passed.
    Timeout {
        /// The limit.
        limit_ms: u64,
    },
    /// SIGINT or SIGTERM.
    Signal(i32),
    /// Stopped through the VMM's own API.
    Stopped,
    /// A host-side failure.
    Host(String),
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Guest { code } => write!(f, "guest exited with status {code}"),
            Self::Fault(r) => {
                let frame = &r.frame;
                write!(
                    f,
                    "guest fault on vCPU {}: {} (vector {}), error code {:#x}, RIP {:#x} at CPL{}",
                    r.vcpu,
                    metronome_abi::exception::name(frame.vector),
                    frame.vector,
                    frame.error_code,
                    frame.rip,
                    frame.cpl()
                )?;
                if frame.vector == u64::from(metronome_abi::exception::PAGE_FAULT) {
                    write!(f, ", CR2 {:#x}", r.cr2)?;
                }
                if r.tid != 0 {
                    write!(f, ", thread {}", r.tid)?;
                }
                Ok(())
            }
            Self::Panic { vcpu, message } => {
                write!(f, "guest kernel panic on vCPU {vcpu}: {message}")
            }
            Self::TripleFault { vcpu, rip } => {
                write!(
                    f,
                    "vCPU {vcpu} triple-faulted (KVM shutdown exit) at RIP {rip:#x}"
                )
            }
            Self::Emulation { vcpu, detail } => {
                write!(f, "KVM could not run vCPU {vcpu}: {detail}")
            }
            Self::Timeout { limit_ms } => write!(
                f,
                "timeout: the guest did not exit within {}.{:03} s (--timeout); the VM was stopped",
                limit_ms / 1000,
                limit_ms % 1000
            ),
            Self::Signal(signal) => write!(f, "stopped by signal {signal}"),
            Self::Stopped => f.write_str("stopped by the host"),
            Self::Host(message) => write!(f, "host error: {message}"),
        }
    }
}

impl VmExit {
    /// The summary's `outcome` and the process exit code for this reason.
    pub fn outcome(&self) -> (&'static str, i32) {
        use metronome_abi::exit::*;
        match self {
            Self::Guest { code: 0 } => ("guest_exit", VMM_OK),
            Self::Guest { .. } => ("guest_exit", VMM_GUEST_FAILED),
            Self::Fault(_) => ("fault", VMM_GUEST_FAULT),
            Self::Panic { .. } => ("panic", VMM_GUEST_FAULT),
            Self::TripleFault { .. } => ("triple_fault", VMM_GUEST_FAULT),
            Self::Emulation { .. } => ("emulation", VMM_GUEST_FAULT),
            Self::Timeout { .. } => ("timeout", VMM_TIMEOUT),
            Self::Signal(_) => ("signal", VMM_SIGNALLED),
            Self::Stopped => ("stopped", VMM_SIGNALLED),
            Self::Host(_) => ("host_error", VMM_HOST_ERROR),
        }
    }
}
