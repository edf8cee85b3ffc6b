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
    /// The user stack's leaf is the address after the `int3` system-call
    /// trap (a thread blocked in a system call), a return address in effect.
    pub user_leaf_after_trap: bool,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guestmem::write_plain;
    use vm_memory::Bytes;

    const CR3: u64 = 0x8000;
    const USER_STACK: u64 = 0x300_0000;
    const KERNEL_STACK: u64 = 0x310_0000;

    /// 64 MiB identity-mapped by one 1 GiB page; vCPU 0 runs thread 5,
    /// "worker"; a user stack of two frames and a kernel stack of one.
    fn guest() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let w = |addr: u64, value: u64| mem.write_obj(value, GuestAddress(addr)).unwrap();
        w(CR3, 0x9000 | 1);
        w(0x9000, 1 | 1 << 7); // PDPT[0]: 1 GiB page at 0
        let mut page = VcpuShared {
            current_tid: 5,
            current_state: thread_state::RUNNING,
            ..Default::default()
        };
        page.current_name[..6].copy_from_slice(b"worker");
        write_plain(
            &mem,
            GuestAddress(layout::percpu_region(0) + layout::PERCPU_SHARED),
            &page,
        )
        .unwrap();
        // User frames: fp -> (caller fp, return address).
        w(USER_STACK, USER_STACK + 0x100);
        w(USER_STACK + 8, 0x40_1111);
        w(USER_STACK + 0x100, 0);
        w(USER_STACK + 0x108, 0x40_2222);
        w(KERNEL_STACK, 0);
        w(KERNEL_STACK + 8, 0x20_3333);
        mem
    }

    fn settings(samplers: u32, filter: i32) -> Action {
        Action {
            samplers,
            pid_filter: filter,
            ..Action::default()
        }
    }

    fn regs(cpl: u16, rip: u64, rbp: u64) -> (kvm_regs, kvm_sregs) {
        let regs = kvm_regs {
            rip,
            rbp,
            ..Default::default()
        };
        let mut sregs = kvm_sregs {
            cr3: CR3,
            ..Default::default()
        };
        sregs.cs.selector = 0x08 | cpl;
        (regs, sregs)
    }

    fn sample(capture: Capture) -> RawSample {
        match capture {
            Capture::Sample(sample) => sample,
            other => panic!("no sample: {other:?}"),
        }
    }

    #[test]
    fn test_cpl3_sample_walks_the_user_stack_only() {
        let mem = guest();
        let (r, s) = regs(3, 0x40_0000, USER_STACK);
        let all = sampler::TH_INFO | sampler::USTACK | sampler::KSTACK;
        let got = sample(capture(&mem, 0, 77, (&r, &s), &settings(all, -1)));
        assert_eq!(
            (got.tid, got.thread_name.as_str(), got.cpl),
            (5, "worker", 3)
        );
        assert_eq!(got.time_ns, 77);
        assert_eq!(got.user_stack.frames, [0x40_0000, 0x40_1111, 0x40_2222]);
        assert!(got.kernel_stack.frames.is_empty());
        assert!(!got.walk_error());
    }

    #[test]
    fn test_kt_sm_4_a_filter_that_does_not_match_samples_nothing() {
        let mem = guest();
        let (r, s) = regs(3, 0x40_0000, USER_STACK);
        let all = sampler::TH_INFO | sampler::USTACK;
        assert_eq!(
            capture(&mem, 0, 1, (&r, &s), &settings(all, 6)),
            Capture::FilteredOut
        );
        // A filter that does not match also wins over an action without
        // thread samplers: the handler ran, nothing is counted as sampled.
        assert_eq!(
            capture(&mem, 0, 1, (&r, &s), &settings(sampler::SYS_MEM, 6)),
            Capture::FilteredOut
        );
        assert_eq!(
            capture(&mem, 0, 1, (&r, &s), &settings(sampler::SYS_MEM, -1)),
            Capture::NoThreadSamplers
        );
        assert_eq!(
            sample(capture(&mem, 0, 1, (&r, &s), &settings(all, 5))).tid,
            5
        );
    }

    #[test]
    fn test_only_the_stacks_the_action_asks_for_are_walked() {
        let mem = guest();
        let (r, s) = regs(3, 0x40_0000, USER_STACK);
        let got = sample(capture(
            &mem,
            0,
            1,
            (&r, &s),
            &settings(sampler::TH_INFO, -1),
        ));
        assert!(got.user_stack.frames.is_empty(), "{got:?}");
        // The action's depth limits the walk.
        let mut shallow = settings(sampler::USTACK, -1);
        shallow.ucallstack_depth = 2;
        let got = sample(capture(&mem, 0, 1, (&r, &s), &shallow));
        assert_eq!(got.user_stack.frames, [0x40_0000, 0x40_1111]);
        assert!(got.user_stack.truncated);
    }

    #[test]
    fn test_cpl0_sample_takes_the_user_stack_from_the_interrupt_frame() {
        let mem = guest();
        // The interrupted CPL3 context, where the guest's entry path saved it.
        let frame = layout::interrupt_frame(0);
        for (offset, value) in [
            (offset_of!(InterruptFrame, rip), 0x40_0abc),
            (offset_of!(InterruptFrame, rbp), USER_STACK),
            (offset_of!(InterruptFrame, cs), 0x20 | 3),
        ] {
            mem.write_obj(value, GuestAddress(frame + offset as u64))
                .unwrap();
        }
        let (r, s) = regs(0, 0x20_0100, KERNEL_STACK);
        let both = sampler::USTACK | sampler::KSTACK;
        let got = sample(capture(&mem, 0, 1, (&r, &s), &settings(both, -1)));
        assert_eq!(got.cpl, 0);
        assert_eq!(got.kernel_stack.frames, [0x20_0100, 0x20_3333]);
        assert_eq!(got.user_stack.frames, [0x40_0abc, 0x40_1111, 0x40_2222]);
    }
}
