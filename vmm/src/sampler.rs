//! Taking one sample of a stopped vCPU on its own thread: registers from the
//! sync-regs area of `kvm_run` (no ioctl), the current guest thread from the
//! vCPU's shared page, and the call stacks by frame-pointer walk through the
//! guest's page tables.
//!
//! Where the vCPU was sampled in its kernel (CPL0) the kernel stack is walked
//! from the live registers, and the user stack of the thread it interrupted
//! from the interrupt frame the guest's entry path saved at the top of the
//! vCPU's IST1 stack (every interrupt and system call enters on IST1).

use kvm_bindings::{kvm_regs, kvm_sregs};
use metronome_abi::{layout, thread_state, VcpuShared};
use vm_memory::GuestMemoryMmap;

use crate::guest_state::{read_u64, walk_stack, Stack};
use crate::guestmem::read_plain;

/// Words in the guest's saved interrupt frame (`guest-kernel/src/arch.rs` `Frame`).
const FRAME_WORDS: u64 = 22;
/// Word offsets in that frame.
const FRAME_RBP: u64 = 10;
const FRAME_RIP: u64 = 17;
const FRAME_CS: u64 = 18;

/// One sample of one vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawSample {
    /// The vCPU.
    pub vcpu: u32,
    /// Device time of the sample, ns.
    pub time_ns: u64,
    /// Guest thread id (0 = idle).
    pub tid: u64,
    /// Guest thread name.
    pub thread_name: String,
    /// Guest thread state ([`thread_state`]).
    pub thread_state: u32,
    /// Privilege level at the sample.
    pub cpl: u8,
    /// The user stack (empty when the vCPU was idle).
    pub user_stack: Stack,
    /// The kernel stack (empty when sampled at CPL3).
    pub kernel_stack: Stack,
}

impl RawSample {
    /// Whether a stack walk ended on a bad pointer.
    pub fn walk_error(&self) -> bool {
        self.user_stack.error.is_some() || self.kernel_stack.error.is_some()
    }
}

/// Captures vCPU `vcpu` from its registers and guest memory.
pub fn capture(
    mem: &GuestMemoryMmap,
    vcpu: u32,
    time_ns: u64,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    ustack_depth: usize,
    kstack_depth: usize,
) -> RawSample {
    let region = layout::percpu_region(vcpu);
    let page: VcpuShared = read_plain(mem, region + layout::PERCPU_SHARED).unwrap_or_default();
    let name_len = page
        .current_name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(page.current_name.len());
    let cr3 = sregs.cr3;
    let cpl = (sregs.cs.selector & 3) as u8;
    let mut sample = RawSample {
        vcpu,
        time_ns,
        tid: u64::from(page.current_tid),
        thread_name: String::from_utf8_lossy(&page.current_name[..name_len]).into_owned(),
        thread_state: page.current_state,
        cpl,
        ..Default::default()
    };
    if cpl == 3 {
        sample.user_stack = walk_stack(mem, cr3, regs.rip, regs.rbp, ustack_depth);
        return sample;
    }
    sample.kernel_stack = walk_stack(mem, cr3, regs.rip, regs.rbp, kstack_depth);
    if page.current_tid != 0 && page.current_state != thread_state::IDLE {
        let frame = region + layout::PERCPU_IST1_TOP - FRAME_WORDS * 8;
        let word = |i: u64| read_u64(mem, cr3, frame + i * 8);
        if let (Ok(cs), Ok(rip), Ok(rbp)) = (word(FRAME_CS), word(FRAME_RIP), word(FRAME_RBP)) {
            if cs & 3 == 3 {
                sample.user_stack = walk_stack(mem, cr3, rip, rbp, ustack_depth);
            }
        }
    }
    sample
}
