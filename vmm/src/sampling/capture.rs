//! Taking one sample of a stopped vCPU on its own thread: the current guest
//! thread from the vCPU's shared page, registers from the sync-regs area of
//! `kvm_run` (no ioctl), and the call stacks by frame-pointer walk through the
//! guest's page tables.
//!
//! The thread filter (KT-SM-4) is applied before any stack is walked. At CPL3
//! the user stack is walked from the live registers. At CPL0 the kernel stack
//! is unwound by `unwind_kernel`, which also finds the user context the
//! kernel interrupted, if any:
//!
//! - The kernel walk follows only frame pointers inside the live part of the
//!   vCPU's kernel stack that RSP is on (the boot/idle stack, IST1 or IST2 of
//!   its per-vCPU region), below that stack's [`InterruptFrame`]. A frame
//!   pointer elsewhere is not the kernel's: the interrupt entry has not saved
//!   the interrupted RBP yet, or the exit has restored it, and the chain it
//!   starts is the interrupted code's.
//! - An IST stack's interrupt frame at its top describes the interrupted
//!   context. A word of it counts only once it is pushed (its address is at or
//!   above RSP): the CPU's words (`rip`, `cs`, `rsp`) from the first instruction
//!   of the entry stub to the `iretq`, the saved `rbp` only between its push
//!   and its pop; outside that, the interrupted RBP is still (or again) in the
//!   register.
//! - If the frame says CPL3, the user stack is walked from its `rip` and that
//!   RBP. If it says CPL0 (the idle loop, say), the kernel stack goes on with
//!   the interrupted kernel code: its `rip`, then its chain on the stack its
//!   `rsp` is on.

use std::mem::{offset_of, size_of};

use kperf::{sampler, Action, PID_FILTER_ALL};
use kvm_bindings::{kvm_regs, kvm_sregs};
use metronome_abi::{exception, layout, InterruptFrame, VcpuShared};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::samplers::{self, SamplerData};
use super::walk::{follow_frames, read_u64, walk_stack, Stack};
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
    /// Guest thread state ([`metronome_abi::thread_state`]).
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
    /// What the other samplers captured ([`samplers`]; boxed: most of a
    /// sample's size, and most samples ask for a few samplers).
    pub samplers: Box<SamplerData>,
}

impl RawSample {
    /// Whether the sample belongs in the CPU profile: its action asked for
    /// the thread or a call stack (`th_info`, `ustack`, `kstack`). A sample
    /// of system or task samplers only describes no place in the code.
    pub fn in_profile(&self) -> bool {
        self.samplers.sampled & (sampler::TH_INFO | sampler::USTACK | sampler::KSTACK) != 0
    }

    /// Whether a stack walk ended on a bad pointer.
    pub fn walk_error(&self) -> bool {
        self.user_stack.error.is_some() || self.kernel_stack.error.is_some()
    }
}

/// What a sample request produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capture {
    /// The action asks for no sampler (an action left at kperf's default):
    /// nothing is kept (KT-SM-4).
    NoSamplers,
    /// The thread filter did not match: the handler ran, nothing was sampled.
    FilteredOut,
    /// The vCPU has not entered the guest yet, so KVM has not reported its
    /// registers: the handler ran, there was nothing to sample.
    NoRegisters,
    /// The sample.
    Sample(RawSample),
}

/// CR0.PG, paging enabled. The VMM starts every vCPU in long mode with
/// paging, so it is clear only in a sync-regs area that no `KVM_RUN` has
/// filled yet.
const CR0_PG: u64 = 1 << 31;

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

/// One of a vCPU's kernel stacks: `[bottom, top)`, and the address of the
/// [`InterruptFrame`] its entry path saves at its top, for the IST stacks.
#[derive(Clone, Copy, Debug)]
struct KernelStack {
    bottom: u64,
    top: u64,
    frame: Option<u64>,
}

/// vCPU `vcpu`'s kernel stacks, from its per-vCPU region: the boot/idle stack,
/// IST1 (interrupts and system calls) and IST2 (exceptions that end the VM).
/// Every gate of the guest's IDT is an IST gate, and both IST stacks are
/// entered through the same stubs, which save the same frame at the top.
fn kernel_stacks(vcpu: u32) -> [KernelStack; 3] {
    let region = layout::percpu_region(vcpu);
    let frame_size = size_of::<InterruptFrame>() as u64;
    [
        KernelStack {
            bottom: region,
            top: region + layout::PERCPU_BOOT_STACK_TOP,
            frame: None,
        },
        KernelStack {
            bottom: region + layout::PERCPU_BOOT_STACK_TOP,
            top: region + layout::PERCPU_IST1_TOP,
            frame: Some(layout::interrupt_frame(vcpu)),
        },
        KernelStack {
            bottom: region + layout::PERCPU_IST1_TOP,
            top: region + layout::PERCPU_IST2_TOP,
            frame: Some(region + layout::PERCPU_IST2_TOP - frame_size),
        },
    ]
}

/// The registers of a context that matter to a walk.
#[derive(Clone, Copy, Debug)]
struct Context {
    rip: u64,
    rsp: u64,
    rbp: u64,
    /// The entry was the `int3` system-call door (its frame's vector word is
    /// pushed and says so): `rip` is where the call returns to.
    after_trap: bool,
}

/// The context interrupted by the entry whose frame is at `frame`, seen from
/// the context running on that stack (`rsp`, `rbp`): its privilege level and
/// registers, or `None` while the CPU has not pushed the frame (RSP above it)
/// or where it cannot be read.
///
/// The interrupted RBP is the frame's saved `rbp` while that word is pushed,
/// and the live register before the entry pushes it or after the exit pops it.
fn interrupted(
    mem: &GuestMemoryMmap,
    cr3: u64,
    frame: u64,
    rsp: u64,
    rbp: u64,
) -> Option<(u64, Context)> {
    let pushed = |offset: usize| Some(frame + offset as u64).filter(|&addr| addr >= rsp);
    let word = |offset: usize| read_u64(mem, cr3, pushed(offset)?).ok();
    let cpl = word(offset_of!(InterruptFrame, cs))? & 3;
    let context = Context {
        rip: word(offset_of!(InterruptFrame, rip))?,
        rsp: word(offset_of!(InterruptFrame, rsp))?,
        rbp: match pushed(offset_of!(InterruptFrame, rbp)) {
            Some(_) => word(offset_of!(InterruptFrame, rbp))?,
            None => rbp,
        },
        after_trap: word(offset_of!(InterruptFrame, vector))
            == Some(u64::from(exception::BREAKPOINT)),
    };
    Some((cpl, context))
}

/// Unwinds a CPL0 sample of vCPU `vcpu` from its live registers (see the
/// module docs): the kernel stack, up to `depth` frames (none for 0), and the
/// user context the kernel interrupted, if it interrupted one.
///
/// It crosses at most as many interrupt frames as the vCPU has kernel stacks,
/// so a guest whose frames point at each other cannot make it loop.
fn unwind_kernel(
    mem: &GuestMemoryMmap,
    cr3: u64,
    vcpu: u32,
    regs: &kvm_regs,
    depth: usize,
) -> (Stack, Option<Context>) {
    let stacks = kernel_stacks(vcpu);
    let mut kernel = Stack::default();
    let mut walking = depth > 0;
    let push = |kernel: &mut Stack, rip: u64| {
        if kernel.frames.len() < depth {
            kernel.frames.push(rip);
        } else {
            kernel.truncated = true;
        }
    };
    if walking {
        push(&mut kernel, regs.rip);
    }
    let mut context = Context {
        rip: regs.rip,
        rsp: regs.rsp,
        rbp: regs.rbp,
        after_trap: false,
    };
    for _ in 0..stacks.len() {
        let Some(on) = stacks
            .iter()
            .find(|s| s.bottom < context.rsp && context.rsp <= s.top)
        else {
            break;
        };
        if walking {
            let live = context.rsp..on.frame.unwrap_or(on.top);
            walking = follow_frames(mem, cr3, context.rbp, Some(live), depth, &mut kernel);
        }
        let Some((cpl, next)) = on
            .frame
            .and_then(|frame| interrupted(mem, cr3, frame, context.rsp, context.rbp))
        else {
            break;
        };
        if cpl == 3 {
            return (kernel, Some(next));
        }
        if walking {
            push(&mut kernel, next.rip);
            walking = !kernel.truncated;
        }
        context = next;
    }
    (kernel, None)
}

/// Samples vCPU `vcpu` as action `settings` asks (its samplers already
/// reduced by the sample's flags, [`kperf::SampleRequest::sampled`]), from
/// its registers and guest memory: the thread first, then (if the filter
/// matches and the action asks for any sampler) what its samplers capture
/// ([`samplers::gather`]) and the stacks it asks for.
pub fn capture(
    mem: &GuestMemoryMmap,
    vcpu: u32,
    time_ns: u64,
    (regs, sregs): (&kvm_regs, &kvm_sregs),
    settings: &Action,
) -> Capture {
    if sregs.cr0 & CR0_PG == 0 {
        return Capture::NoRegisters;
    }
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
    if settings.samplers == 0 {
        return Capture::NoSamplers;
    }
    // The name from the thread table, not the page: a sample can stop the
    // guest between its writes of the tid and the name at a switch.
    let thread = samplers::current_thread(mem, vcpu, &page);
    let name_len = thread
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(thread.name.len());
    let cr3 = sregs.cr3;
    let cpl = (sregs.cs.selector & 3) as u8;
    let mut sample = RawSample {
        vcpu,
        time_ns,
        tid: u64::from(page.current_tid),
        thread_name: String::from_utf8_lossy(&thread.name[..name_len]).into_owned(),
        thread_state: page.current_state,
        cpl,
        ..Default::default()
    };
    let counters = samplers::wants_counters(settings.samplers)
        .then(crate::pmu::read_current_thread)
        .flatten();
    sample.samplers = Box::new(samplers::gather(
        mem,
        time_ns,
        &thread,
        settings.samplers,
        counters,
    ));
    let (udepth, kdepth) = depths(settings);
    if cpl == 3 {
        if udepth > 0 {
            sample.user_stack = walk_stack(mem, cr3, regs.rip, regs.rbp, udepth);
        }
        return Capture::Sample(sample);
    }
    let (kernel_stack, user) = unwind_kernel(mem, cr3, vcpu, regs, kdepth);
    sample.kernel_stack = kernel_stack;
    if let Some(user) = user.filter(|_| udepth > 0) {
        sample.user_stack = walk_stack(mem, cr3, user.rip, user.rbp, udepth);
        sample.user_leaf_after_trap = user.after_trap;
    }
    Capture::Sample(sample)
}

/// The registers of a vCPU in long mode with paging on (page tables at
/// `cr3`), at CPL3 if `user` else CPL0, with `(rip, rsp, rbp)`: what a
/// sample reads from sync regs, for tests and the fuzz targets.
#[cfg(any(test, feature = "fuzzing"))]
pub fn paged_registers(
    user: bool,
    cr3: u64,
    (rip, rsp, rbp): (u64, u64, u64),
) -> (kvm_regs, kvm_sregs) {
    use metronome_abi::gdt::{KERNEL_CS, USER_CS};
    let regs = kvm_regs {
        rip,
        rsp,
        rbp,
        ..Default::default()
    };
    let mut sregs = kvm_sregs {
        cr0: CR0_PG,
        cr3,
        ..Default::default()
    };
    sregs.cs.selector = if user { USER_CS } else { KERNEL_CS };
    (regs, sregs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guestmem::write_plain;
    use metronome_abi::gdt::{KERNEL_CS, USER_CS};
    use metronome_abi::{thread_state, ThreadInfo};
    use vm_memory::Bytes;

    const CR3: u64 = 0x8000;
    /// A user thread's stack in the heap: two frames, 0x40_1111 and 0x40_2222.
    const USER_STACK: u64 = layout::HEAP_BASE + 0x100_0000;
    /// Another user chain (one frame, 0x40_9999): what a stale RBP leads to.
    const STALE_STACK: u64 = USER_STACK + 0x8000;
    /// Interrupted user code.
    const USER_RIP: u64 = 0x40_0abc;
    /// Kernel text: an entry stub, an instruction of `isr_common`, the return
    /// address into it from `trap`, one into `trap` from a handler, the
    /// handler's sampled RIP, and the idle loop.
    const STUB: u64 = 0x20_0077;
    const ISR_COMMON: u64 = 0x20_0020;
    const ISR_COMMON_RET: u64 = 0x20_0055;
    const TRAP_RET: u64 = 0x20_3333;
    const HANDLER: u64 = 0x20_4444;
    const IDLE_LOOP: u64 = 0x20_000c;

    fn w(mem: &GuestMemoryMmap, addr: u64, value: u64) {
        mem.write_obj(value, GuestAddress(addr)).unwrap();
    }

    /// vCPU 0's interrupt frame on IST1.
    fn frame() -> u64 {
        layout::interrupt_frame(0)
    }

    /// The address of `field`'s word in vCPU 0's IST1 frame: where RSP is
    /// once that word is pushed.
    fn slot(offset: usize) -> u64 {
        frame() + offset as u64
    }

    /// 64 MiB identity-mapped by one 1 GiB page; vCPU 0 runs thread 5,
    /// "worker"; the user chains above; and on IST1 the chain of a handler
    /// called by `trap` called by `isr_common`, whose RBP is zero.
    fn guest() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        w(&mem, CR3, 0x9000 | 1);
        w(&mem, 0x9000, 1 | 1 << 7); // PDPT[0]: 1 GiB page at 0
        set_thread(&mem, 5, thread_state::RUNNING, b"worker");
        // User frames: fp -> (caller fp, return address).
        w(&mem, USER_STACK, USER_STACK + 0x100);
        w(&mem, USER_STACK + 8, 0x40_1111);
        w(&mem, USER_STACK + 0x100, 0);
        w(&mem, USER_STACK + 0x108, 0x40_2222);
        w(&mem, STALE_STACK, 0);
        w(&mem, STALE_STACK + 8, 0x40_9999);
        // Kernel frames just below the interrupt frame.
        w(&mem, frame() - 16, 0);
        w(&mem, frame() - 8, ISR_COMMON_RET);
        w(&mem, frame() - 0x100, frame() - 16);
        w(&mem, frame() - 0xf8, TRAP_RET);
        mem
    }

    /// Publishes thread `tid` in vCPU 0's shared page.
    fn set_thread(mem: &GuestMemoryMmap, tid: u32, state: u32, name: &[u8]) {
        let mut page = VcpuShared {
            current_tid: tid,
            current_state: state,
            ..Default::default()
        };
        page.current_name[..name.len()].copy_from_slice(name);
        write_plain(
            mem,
            GuestAddress(layout::percpu_region(0) + layout::PERCPU_SHARED),
            &page,
        )
        .unwrap();
    }

    /// Writes the interrupted context into the frame at `frame`.
    fn write_frame(mem: &GuestMemoryMmap, frame: u64, cs: u16, rip: u64, rsp: u64, rbp: u64) {
        for (offset, value) in [
            (offset_of!(InterruptFrame, rip), rip),
            (offset_of!(InterruptFrame, cs), u64::from(cs)),
            (offset_of!(InterruptFrame, rsp), rsp),
            (offset_of!(InterruptFrame, rbp), rbp),
        ] {
            w(mem, frame + offset as u64, value);
        }
    }

    /// Saves, in the frame at `frame`, an interrupt of the user thread at
    /// `USER_RIP` whose RBP was `rbp`.
    fn interrupted_user(mem: &GuestMemoryMmap, frame: u64, rbp: u64) {
        write_frame(mem, frame, USER_CS, USER_RIP, USER_STACK - 0x40, rbp);
    }

    /// The top of vCPU 0's boot/idle stack.
    fn boot_stack_top() -> u64 {
        layout::percpu_region(0) + layout::PERCPU_BOOT_STACK_TOP
    }

    fn settings(samplers: u32, filter: i32) -> Action {
        Action {
            samplers,
            pid_filter: filter,
            ..Action::default()
        }
    }

    fn regs(cpl: u16, rip: u64, rsp: u64, rbp: u64) -> (kvm_regs, kvm_sregs) {
        paged_registers(cpl == 3, CR3, (rip, rsp, rbp))
    }

    fn sample(capture: Capture) -> RawSample {
        match capture {
            Capture::Sample(sample) => sample,
            other => panic!("no sample: {other:?}"),
        }
    }

    /// Samples vCPU 0 at CPL0 with (`rip`, `rsp`, `rbp`), both stacks asked for.
    fn at_cpl0(mem: &GuestMemoryMmap, rip: u64, rsp: u64, rbp: u64) -> RawSample {
        let (r, s) = regs(0, rip, rsp, rbp);
        let both = sampler::USTACK | sampler::KSTACK;
        let got = sample(capture(mem, 0, 1, (&r, &s), &settings(both, -1)));
        assert_eq!(got.cpl, 0);
        assert!(!got.walk_error(), "{got:?}");
        got
    }

    const USER_FRAMES: [u64; 3] = [USER_RIP, 0x40_1111, 0x40_2222];

    #[test]
    fn test_a_cpl3_sample_walks_the_user_stack_only() {
        let mem = guest();
        let (r, s) = regs(3, 0x40_0000, USER_STACK - 0x40, USER_STACK);
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
    fn test_b_entry_before_rbp_is_saved_takes_the_live_rbp_as_the_users() {
        let mem = guest();
        // The CPU pushed the hardware frame; the `rbp` word is left over from
        // an earlier entry and leads to another chain.
        interrupted_user(&mem, frame(), STALE_STACK);
        // First instruction of the stub; then inside isr_common, before `push rbp`.
        for (rip, rsp) in [
            (STUB, slot(offset_of!(InterruptFrame, rip))),
            (ISR_COMMON, slot(offset_of!(InterruptFrame, rdx))),
        ] {
            let got = at_cpl0(&mem, rip, rsp, USER_STACK);
            // The live RBP is the user's: the kernel walk does not follow it.
            assert_eq!(got.kernel_stack.frames, [rip], "{rsp:#x}");
            assert_eq!(got.user_stack.frames, USER_FRAMES, "{rsp:#x}");
        }
        // After `push rbp`, before RBP is cleared: the saved word is the one.
        w(&mem, slot(offset_of!(InterruptFrame, rbp)), USER_STACK);
        let got = at_cpl0(&mem, ISR_COMMON, frame(), USER_STACK);
        assert_eq!(got.kernel_stack.frames, [ISR_COMMON]);
        assert_eq!(got.user_stack.frames, USER_FRAMES);
    }

    #[test]
    fn test_a_system_call_marks_the_user_leaf_as_a_return_address() {
        let mem = guest();
        interrupted_user(&mem, frame(), USER_STACK);
        // A timer interrupt: the user RIP is the next instruction to run.
        w(&mem, slot(offset_of!(InterruptFrame, vector)), 0xf0);
        let got = at_cpl0(&mem, HANDLER, frame() - 0x140, frame() - 0x100);
        assert!(!got.user_leaf_after_trap);
        // The int3 door: the user RIP is where the call returns to.
        let door = u64::from(exception::BREAKPOINT);
        w(&mem, slot(offset_of!(InterruptFrame, vector)), door);
        let got = at_cpl0(&mem, HANDLER, frame() - 0x140, frame() - 0x100);
        assert!(got.user_leaf_after_trap);
        assert_eq!(got.user_stack.frames, USER_FRAMES);
    }

    #[test]
    fn test_c_handler_chain_ends_at_isr_common_and_the_user_stack_is_the_frames() {
        let mem = guest();
        interrupted_user(&mem, frame(), USER_STACK);
        let got = at_cpl0(&mem, HANDLER, frame() - 0x140, frame() - 0x100);
        assert_eq!(got.kernel_stack.frames, [HANDLER, TRAP_RET, ISR_COMMON_RET]);
        assert_eq!(got.user_stack.frames, USER_FRAMES);
        // A kernel depth limit truncates the kernel stack, not the user one.
        let (r, s) = regs(0, HANDLER, frame() - 0x140, frame() - 0x100);
        let mut shallow = settings(sampler::USTACK | sampler::KSTACK, -1);
        shallow.kcallstack_depth = 2;
        let got = sample(capture(&mem, 0, 1, (&r, &s), &shallow));
        assert_eq!(got.kernel_stack.frames, [HANDLER, TRAP_RET]);
        assert!(got.kernel_stack.truncated);
        assert_eq!(got.user_stack.frames, USER_FRAMES);
        // Without the kernel stack, the user stack is still found.
        let got = sample(capture(
            &mem,
            0,
            1,
            (&r, &s),
            &settings(sampler::USTACK, -1),
        ));
        assert!(got.kernel_stack.frames.is_empty());
        assert_eq!(got.user_stack.frames, USER_FRAMES);
    }

    #[test]
    fn test_d_exit_path_takes_the_users_rbp_from_the_frame_until_it_is_popped() {
        let mem = guest();
        interrupted_user(&mem, frame(), USER_STACK);
        // `trap` returned (RBP is zero again), the pops have not reached rbp.
        let got = at_cpl0(&mem, ISR_COMMON, slot(offset_of!(InterruptFrame, r12)), 0);
        assert_eq!(got.kernel_stack.frames, [ISR_COMMON]);
        assert_eq!(got.user_stack.frames, USER_FRAMES);
        // At `pop rbp` the word is still on the stack.
        let got = at_cpl0(&mem, ISR_COMMON, slot(offset_of!(InterruptFrame, rbp)), 0);
        assert_eq!(got.user_stack.frames, USER_FRAMES);
        // Once popped, the register is the user's and the word is not read
        // (here it has changed to show that).
        w(&mem, slot(offset_of!(InterruptFrame, rbp)), STALE_STACK);
        for rsp in [
            slot(offset_of!(InterruptFrame, rdx)),
            slot(offset_of!(InterruptFrame, rip)), // at iretq
        ] {
            let got = at_cpl0(&mem, ISR_COMMON, rsp, USER_STACK);
            assert_eq!(got.kernel_stack.frames, [ISR_COMMON], "{rsp:#x}");
            assert_eq!(got.user_stack.frames, USER_FRAMES, "{rsp:#x}");
        }
    }

    #[test]
    fn test_e_idle_loop_walks_only_its_own_stack() {
        let mem = guest();
        set_thread(&mem, 0, thread_state::IDLE, b"idle");
        // A user frame left on IST1 by an earlier interrupt is not current.
        interrupted_user(&mem, frame(), USER_STACK);
        let top = boot_stack_top();
        let got = at_cpl0(&mem, IDLE_LOOP, top, 0);
        assert_eq!((got.tid, got.thread_name.as_str()), (0, "idle"));
        assert_eq!(got.kernel_stack.frames, [IDLE_LOOP]);
        assert!(got.user_stack.frames.is_empty());
    }

    #[test]
    fn test_a_sample_in_the_middle_of_a_switch_names_the_thread_its_tid_says() {
        // The guest has published the new tid but not yet its name: the
        // name comes from the thread table (or is idle's), not the page.
        let mem = guest();
        let mut entry = ThreadInfo {
            tid: 5,
            ..ThreadInfo::default()
        };
        entry.name[..6].copy_from_slice(b"worker");
        let at = layout::THREAD_TABLE + 4 * std::mem::size_of::<ThreadInfo>() as u64;
        write_plain(&mem, GuestAddress(at), &entry).unwrap();
        set_thread(&mem, 5, thread_state::RUNNING, b"sleepy");
        let (r, s) = regs(3, 0x40_0000, USER_STACK - 0x40, USER_STACK);
        let got = sample(capture(
            &mem,
            0,
            1,
            (&r, &s),
            &settings(sampler::USTACK, -1),
        ));
        assert_eq!((got.tid, got.thread_name.as_str()), (5, "worker"));
        // Switching to idle: tid 0 is idle whatever the name still says.
        set_thread(&mem, 0, thread_state::IDLE, b"sleepy");
        let got = at_cpl0(&mem, IDLE_LOOP, boot_stack_top(), 0);
        assert_eq!((got.tid, got.thread_name.as_str()), (0, "idle"));
    }

    #[test]
    fn test_e_interrupt_taken_in_idle_continues_the_kernel_stack_in_the_idle_loop() {
        let mem = guest();
        set_thread(&mem, 0, thread_state::IDLE, b"idle");
        let top = boot_stack_top();
        write_frame(&mem, frame(), KERNEL_CS, IDLE_LOOP + 2, top, 0);
        let got = at_cpl0(&mem, HANDLER, frame() - 0x140, frame() - 0x100);
        assert_eq!(
            got.kernel_stack.frames,
            [HANDLER, TRAP_RET, ISR_COMMON_RET, IDLE_LOOP + 2]
        );
        assert!(got.user_stack.frames.is_empty());
        // In the stub, the same.
        let got = at_cpl0(&mem, STUB, slot(offset_of!(InterruptFrame, rip)), 0);
        assert_eq!(got.kernel_stack.frames, [STUB, IDLE_LOOP + 2]);
    }

    #[test]
    fn test_f_bring_up_walks_the_boot_stack_to_start() {
        let mem = guest();
        set_thread(&mem, 0, thread_state::IDLE, b"idle");
        interrupted_user(&mem, frame(), USER_STACK);
        let top = boot_stack_top();
        // kmain's frame (called by _start, whose RBP is zero), then a callee's.
        w(&mem, top - 0x10, 0);
        w(&mem, top - 0x8, 0x20_0005);
        w(&mem, top - 0x80, top - 0x10);
        w(&mem, top - 0x78, 0x20_5555);
        let got = at_cpl0(&mem, 0x20_6666, top - 0x100, top - 0x80);
        assert_eq!(got.kernel_stack.frames, [0x20_6666, 0x20_5555, 0x20_0005]);
        assert!(got.user_stack.frames.is_empty());
    }

    #[test]
    fn test_exception_on_ist2_takes_the_user_stack_from_its_own_frame() {
        let mem = guest();
        let region = layout::percpu_region(0);
        let ist2_frame = region + layout::PERCPU_IST2_TOP - size_of::<InterruptFrame>() as u64;
        interrupted_user(&mem, ist2_frame, USER_STACK);
        // IST1's frame is from an earlier interrupt.
        interrupted_user(&mem, frame(), STALE_STACK);
        w(&mem, ist2_frame - 16, 0);
        w(&mem, ist2_frame - 8, ISR_COMMON_RET);
        let got = at_cpl0(&mem, HANDLER, ist2_frame - 0x40, ist2_frame - 16);
        assert_eq!(got.kernel_stack.frames, [HANDLER, ISR_COMMON_RET]);
        assert_eq!(got.user_stack.frames, USER_FRAMES);
    }

    #[test]
    fn test_cpl0_off_the_kernel_stacks_keeps_only_the_rip() {
        let mem = guest();
        interrupted_user(&mem, frame(), USER_STACK);
        let got = at_cpl0(&mem, HANDLER, USER_STACK - 0x40, USER_STACK);
        assert_eq!(got.kernel_stack.frames, [HANDLER]);
        assert!(got.user_stack.frames.is_empty());
    }

    #[test]
    fn test_kt_sm_4_a_filter_that_does_not_match_samples_nothing() {
        let mem = guest();
        let (r, s) = regs(3, 0x40_0000, USER_STACK - 0x40, USER_STACK);
        let all = sampler::TH_INFO | sampler::USTACK;
        assert_eq!(
            capture(&mem, 0, 1, (&r, &s), &settings(all, 6)),
            Capture::FilteredOut
        );
        // A filter that does not match also wins over an action of system
        // memory only: the handler ran, nothing is counted as sampled.
        assert_eq!(
            capture(&mem, 0, 1, (&r, &s), &settings(sampler::SYS_MEM, 6)),
            Capture::FilteredOut
        );
        assert_eq!(
            capture(&mem, 0, 1, (&r, &s), &settings(0, -1)),
            Capture::NoSamplers
        );
        // System memory alone is a sample of the thread on the vCPU, with
        // no place in the CPU profile.
        let got = sample(capture(
            &mem,
            0,
            1,
            (&r, &s),
            &settings(sampler::SYS_MEM, -1),
        ));
        assert!(got.samplers.sys_mem.is_some() && got.user_stack.frames.is_empty());
        assert!(!got.in_profile());
        assert_eq!(
            sample(capture(&mem, 0, 1, (&r, &s), &settings(all, 5))).tid,
            5
        );
    }

    #[test]
    fn test_a_vcpu_that_has_not_run_yet_has_nothing_to_sample() {
        let mem = guest();
        // The sync-regs area before the first KVM_RUN: all zero.
        let (r, s) = (kvm_regs::default(), kvm_sregs::default());
        let all = sampler::TH_INFO | sampler::USTACK | sampler::KSTACK;
        assert_eq!(
            capture(&mem, 0, 1, (&r, &s), &settings(all, -1)),
            Capture::NoRegisters
        );
    }

    #[test]
    fn test_only_the_stacks_the_action_asks_for_are_walked() {
        let mem = guest();
        let (r, s) = regs(3, 0x40_0000, USER_STACK - 0x40, USER_STACK);
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
}
