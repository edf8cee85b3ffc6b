//! The hostile guest seen by the sampler: its page tables, stacks, frames
//! and registers, walked from the host at each sample.

use std::cell::RefCell;

use arbitrary::Unstructured;
use kperf::{sampler, Action, PID_FILTER_ALL};
use metronome_abi::layout;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::pick;
use crate::sampling::capture::{capture, paged_registers, Capture};
use crate::sampling::walk::{read_u64, translate, walk_stack, WalkError};

/// Guest RAM of the walker target: the per-vCPU regions and the start of
/// the heap, where user stacks live.
const RAM: u64 = layout::HEAP_BASE + 0x80_0000;

/// Page-table entry bits: present, and a huge page at this level.
const PRESENT: u64 = 1;
const HUGE: u64 = 1 << 7;

/// Where the guest's interesting words are: the page tables, each vCPU's
/// stacks and interrupt frames, the shared page, the thread table, the heap.
const ANCHORS: [u64; 16] = [
    0,
    layout::PML4,
    layout::PDPT,
    layout::PD,
    layout::THREAD_TABLE,
    layout::KERNEL_BASE,
    layout::HEAP_BASE,
    layout::percpu_region(0),
    layout::percpu_region(0) + layout::PERCPU_BOOT_STACK_TOP,
    layout::percpu_region(0) + layout::PERCPU_IST1_TOP,
    layout::percpu_region(0) + layout::PERCPU_IST2_TOP,
    layout::percpu_region(0) + layout::PERCPU_SHARED,
    layout::interrupt_frame(0),
    layout::percpu_region(1) + layout::PERCPU_IST1_TOP,
    layout::interrupt_frame(1),
    RAM - 8,
];

thread_local! {
    /// The target's guest memory, reused: every word an input writes is
    /// zeroed again after it.
    static MEMORY: RefCell<Option<GuestMemoryMmap>> = const { RefCell::new(None) };
}

/// An address: an anchor plus a signed multiple of 8 (up to 256 KiB
/// away), or any 64-bit value.
fn address(u: &mut Unstructured<'_>) -> u64 {
    if u.ratio(1, 5).unwrap_or(false) {
        return u.arbitrary().unwrap_or(0);
    }
    let anchor = pick(u, &ANCHORS).unwrap_or(0);
    let offset = i64::from(u.arbitrary::<i16>().unwrap_or(0)) * 8;
    anchor.wrapping_add_signed(offset)
}

/// A word stored in guest memory: an address (a pointer, a page-table
/// entry with its flag bits) or any value.
fn word(u: &mut Unstructured<'_>) -> u64 {
    match u.int_in_range(0..=3u8).unwrap_or(0) {
        0 => address(u),
        1 => {
            (address(u) & !0xfff)
                | PRESENT
                | if u.arbitrary().unwrap_or(false) {
                    HUGE
                } else {
                    0
                }
        }
        _ => u.arbitrary().unwrap_or(0),
    }
}

/// Target `guest_walk`: guest memory written word by word from the input
/// (optionally over an identity-mapped gigabyte, as the VMM sets up), then
/// translations, a frame-pointer walk and a whole sample (`capture`) at
/// CPL0 or CPL3 with registers from the input.
///
/// # Panics
///
/// When a translation claims an address readable that RAM does not hold or
/// the reverse, or a walk returns more frames than its depth.
pub fn guest_walk(data: &[u8]) {
    MEMORY.with(|cell| {
        let mut memory = cell.borrow_mut();
        // Cannot panic: one anonymous mapping of `RAM` bytes.
        let mem = memory.get_or_insert_with(|| {
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("guest memory")
        });
        let mut written = Vec::new();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            walk_on(mem, data, &mut written)
        }));
        for addr in written {
            let _ = mem.write_obj(0u64, GuestAddress(addr));
        }
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    });
}

/// [`guest_walk`] on `mem`, noting each address it writes in `written`.
fn walk_on(mem: &GuestMemoryMmap, data: &[u8], written: &mut Vec<u64>) {
    let mut u = Unstructured::new(data);
    let mut store = |addr: u64, value: u64| {
        if mem.write_obj(value, GuestAddress(addr)).is_ok() {
            written.push(addr);
        }
    };
    if u.arbitrary::<bool>().unwrap_or(true) {
        // PML4[0] -> PDPT, PDPT[0] -> 1 GiB at 0: identity.
        store(layout::PML4, layout::PDPT | PRESENT);
        store(layout::PDPT, PRESENT | HUGE);
    }
    let writes = u.arbitrary_len::<[u8; 8]>().unwrap_or(0).min(256);
    for _ in 0..writes {
        let (addr, value) = (address(&mut u), word(&mut u));
        store(addr, value);
    }
    let cr3 = if u.ratio(3, 4).unwrap_or(true) {
        layout::PML4
    } else {
        u.arbitrary().unwrap_or(0)
    };
    let (rip, rsp, rbp) = (word(&mut u), address(&mut u), address(&mut u));
    let depth = usize::from(u.arbitrary::<u8>().unwrap_or(0));

    for va in [rip, rsp, rbp] {
        match read_u64(mem, cr3, va) {
            Ok(_) => {
                let pa = translate(mem, cr3, va)
                    .unwrap_or_else(|e| panic!("{va:#x} read but does not translate: {e:?}"));
                assert!(
                    pa.0.checked_add(8).is_some_and(|end| end <= RAM),
                    "{va:#x} read at {pa:?}"
                );
            }
            Err(WalkError::OutsideRam(pa)) => assert!(
                mem.read_obj::<u64>(GuestAddress(pa)).is_err(),
                "{va:#x}: {pa:#x} called outside RAM but readable"
            ),
            Err(_) => {}
        }
    }
    let stack = walk_stack(mem, cr3, rip, rbp, depth);
    assert_eq!(stack.frames.first(), Some(&rip));
    assert!(
        stack.frames.len() <= depth.max(1),
        "{} frames for depth {depth}",
        stack.frames.len()
    );

    let user = u.arbitrary::<bool>().unwrap_or(false);
    let vcpu = u32::from(u.arbitrary::<bool>().unwrap_or(false));
    // Not the PMC samplers: they read the host's counters.
    let pmc = sampler::PMC_THREAD | sampler::PMC_CPU | sampler::PMC_CONFIG | sampler::TH_INSCYC;
    let action = Action {
        samplers: u
            .arbitrary::<u32>()
            .unwrap_or(sampler::USTACK | sampler::KSTACK)
            & sampler::ALL
            & !pmc,
        pid_filter: if u.ratio(7, 8).unwrap_or(true) {
            PID_FILTER_ALL
        } else {
            u.arbitrary().unwrap_or(0)
        },
        ucallstack_depth: u32::from(u.arbitrary::<u8>().unwrap_or(64)) + 2,
        kcallstack_depth: u32::from(u.arbitrary::<u8>().unwrap_or(16)) + 1,
        ..Action::default()
    };
    let (regs, sregs) = paged_registers(user, cr3, (rip, rsp, rbp));
    if let Capture::Sample(sample) = capture(mem, vcpu, 1, (&regs, &sregs), &action) {
        let asked = |bit: u32, depth: u32| {
            if action.samplers & bit != 0 {
                depth as usize
            } else {
                0
            }
        };
        let (udepth, kdepth) = (
            asked(sampler::USTACK, action.ucallstack_depth),
            asked(sampler::KSTACK, action.kcallstack_depth),
        );
        assert!(
            sample.user_stack.frames.len() <= udepth,
            "user stack over its depth {udepth}"
        );
        assert!(
            sample.kernel_stack.frames.len() <= kdepth,
            "kernel stack over its depth {kdepth}"
        );
        if user {
            assert!(
                sample.kernel_stack.frames.is_empty(),
                "a CPL3 sample with kernel frames"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::fuzz::tests::check_target;

    #[test]
    fn test_guest_walk_property() {
        check_target("guest_walk", 3000, 51);
    }
}
