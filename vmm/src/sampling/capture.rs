//! Taking one sample of a stopped vCPU on its own thread: the current guest
//! thread from the vCPU's shared page, registers from the sync-regs area of
//! `kvm_run` (no ioctl), and the call stacks by frame-pointer walk through the
//! guest's page tables.
//!
//! The thread filter (KT-SM-4) is applied before any stack is walked. Where the
//! vCPU was sampled in its kernel (CPL0) the kernel stack is walked from the
//! live registers, and the user stack of the thread it interrupted from the
//! [`InterruptFrame`] the guest's entry path saved at the top of the vCPU's
//! IST1 stack (every interrupt and system call enters on IST1).

use std::mem::offset_of;

use kperf::{sampler, Action, PID_FILTER_ALL};
use kvm_bindings::{kvm_regs, kvm_sregs};
use metronome_abi::{layout, thread_state, InterruptFrame, VcpuShared};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::walk::{read_u64, walk_stack, Stack};
use crate::guestmem::read_plain;

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
    /// The user stack (empty when the vCPU was idle or `ustack` was not asked for).
    pub user_stack: Stack,
    /// The kernel stack (empty when sampled at CPL3 or `kstack` was not asked for).
    pub kernel_stack: Stack,
}

impl RawSample {
    /// Whether a stack walk ended on a bad pointer.
    pub fn walk_error(&self) -> bool {
        self.user_stack.error.is_some() || self.kernel_stack.error.is_some()
    }
}

/// What a sample request produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capture {
    /// The action has no thread sampler (`th_info`, `ustack`, `kstack`):
    /// nothing of the guest thread is kept.
    NoThreadSamplers,
    /// The thread filter did not match: the handler ran, nothing was sampled.
    FilteredOut,
    /// The sample.
    Sample(RawSample),
}

/// The stack depths a sample walks: 0 for a stack the action does not ask for.
fn depths(settings: &Action) -> (usize, usize) {
    let depth = |bit, depth: u32| {
        if settings.samplers & bit != 0 {
            depth as usize
        } else {
            0
        }
    };
    (
        depth(sampler::USTACK, settings.ucallstack_depth),
        depth(sampler::KSTACK, settings.kcallstack_depth),
    )
}

/// The interrupted user context saved in vCPU `vcpu`'s interrupt frame:
/// (RIP, RBP) if it came from CPL3.
fn interrupted_user_context(mem: &GuestMemoryMmap, cr3: u64, vcpu: u32) -> Option<(u64, u64)> {
    let frame = layout::interrupt_frame(vcpu);
    let word = |offset: usize| read_u64(mem, cr3, frame + offset as u64).ok();
    let cs = word(offset_of!(InterruptFrame, cs))?;
    let rip = word(offset_of!(InterruptFrame, rip))?;
    let rbp = word(offset_of!(InterruptFrame, rbp))?;
    (cs & 3 == 3).then_some((rip, rbp))
}

/// Samples vCPU `vcpu` as action `settings` asks, from its registers and
/// guest memory: the thread first, then (if the filter matches and the action
/// has thread samplers) the stacks it asks for.
pub fn capture(
    mem: &GuestMemoryMmap,
    vcpu: u32,
    time_ns: u64,
    (regs, sregs): (&kvm_regs, &kvm_sregs),
    settings: &Action,
) -> Capture {
    let region = layout::percpu_region(vcpu);
    let page: VcpuShared =
        read_plain(mem, GuestAddress(region + layout::PERCPU_SHARED)).unwrap_or_default();
    // KT-SM-4: the guest has threads, not processes: the filter matches the
    // guest thread id.
    if settings.pid_filter != PID_FILTER_ALL
        && i64::from(settings.pid_filter) != i64::from(page.current_tid)
    {
        return Capture::FilteredOut;
    }
    let thread_samplers = sampler::TH_INFO | sampler::USTACK | sampler::KSTACK;
    if settings.samplers & thread_samplers == 0 {
        return Capture::NoThreadSamplers;
    }
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
    let (udepth, kdepth) = depths(settings);
    if cpl == 3 {
        if udepth > 0 {
            sample.user_stack = walk_stack(mem, cr3, regs.rip, regs.rbp, udepth);
        }
        return Capture::Sample(sample);
    }
    if kdepth > 0 {
        sample.kernel_stack = walk_stack(mem, cr3, regs.rip, regs.rbp, kdepth);
    }
    if udepth > 0 && page.current_tid != 0 && page.current_state != thread_state::IDLE {
        if let Some((rip, rbp)) = interrupted_user_context(mem, cr3, vcpu) {
            sample.user_stack = walk_stack(mem, cr3, rip, rbp, udepth);
        }
    }
    Capture::Sample(sample)
}
