//! The per-vCPU guest event ring: what the guest kernel tells the VMM's
//! trace about itself (each clockintr dispatch, each context switch).
//!
//! One ring per vCPU, at [`crate::layout::PERCPU_EVENTS`] of the vCPU's
//! region: a [`RingHeader`] then [`CAPACITY`] [`GuestEvent`] slots.
//!
//! - **Single producer**: the owning vCPU, in its kernel with interrupts off.
//!   It writes the slot `head % CAPACITY`, then `head + 1` (volatile stores
//!   with a compiler fence between: x86 keeps stores in order, so a consumer
//!   that sees the new `head` sees the record). When the ring is full
//!   (`head - tail == CAPACITY`) the event is dropped and `dropped` counted:
//!   the guest never waits for the VMM.
//! - **Single consumer**: the VMM (the vCPU's own thread at its loop top, and
//!   the end-of-run report after the vCPU stopped). It loads `head` with
//!   acquire ordering, copies the slots from its `tail` up to `head`, then
//!   stores the new `tail` with release ordering, which frees those slots.
//! - **Enable flag**: the VMM sets `enabled` before the vCPU starts when a
//!   trace is wanted; the guest checks it with one load per event and does
//!   nothing else when it is 0.
//!
//! `head`, `tail` and `dropped` are free-running counters (they wrap at
//! 2^64, so differences are taken with wrapping arithmetic). The guest can
//! write anything here; the VMM bounds what it reads (a `head` more than
//! [`CAPACITY`] ahead of its `tail` is counted as lost records, never read
//! past the ring).

/// Slots in a ring (a power of two, so a slot index is a mask away).
pub const CAPACITY: u64 = 512;

/// [`GuestEvent::kind`] low byte: a clockintr dispatch.
///
/// `time_ns` is its start (the uptime `clockintr_dispatch` cached at entry),
/// `arg0` its end (the last cached uptime), `arg1` the `hardclock` calls in
/// the low 32 bits and the `statclock` calls in the high 32 bits; the kind's
/// [`OUTCOME_SHIFT`] byte holds the [`outcome`].
pub const KIND_DISPATCH: u64 = 1;
/// [`GuestEvent::kind`] low byte: a context switch.
///
/// `time_ns` is the uptime of the switch, `arg0` the thread switched out,
/// `arg1` the thread switched in (thread ids; 0 = the vCPU's idle context).
pub const KIND_SWITCH: u64 = 2;
/// The kind's low byte is the event kind ([`KIND_DISPATCH`], [`KIND_SWITCH`]).
pub const KIND_MASK: u64 = 0xff;
/// Bit position of a dispatch's [`outcome`] in [`GuestEvent::kind`].
pub const OUTCOME_SHIFT: u32 = 8;
/// Bit position of the current thread id in [`GuestEvent::kind`] (the thread
/// a dispatch interrupted; for a switch, the thread switched in).
pub const TID_SHIFT: u32 = 32;

/// How a dispatch counted in the clockintr statistics (`clockintr_stat`).
pub mod outcome {
    /// At least one callback ran (`prompt`).
    pub const PROMPT: u64 = 0;
    /// Too early: nothing ran (`early`).
    pub const EARLY: u64 = 1;
    /// Nothing scheduled (`spurious`).
    pub const SPURIOUS: u64 = 2;
}

/// The ring's control words. `enabled` is written by the VMM before the vCPU
/// starts; `head` and `dropped` by the guest; `tail` by the VMM.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingHeader {
    /// Non-zero: the guest publishes events (set by the VMM).
    pub enabled: u64,
    /// Events published so far (guest).
    pub head: u64,
    /// Events dropped because the ring was full (guest).
    pub dropped: u64,
    /// Reserved, zero.
    pub reserved0: u64,
    /// Events consumed so far (VMM); on its own cache line, away from the
    /// guest's words.
    pub tail: u64,
    /// Reserved, zero.
    pub reserved1: [u64; 3],
}

/// One event (32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestEvent {
    /// Uptime, ns (device time).
    pub time_ns: u64,
    /// Kind, outcome and current thread: see [`KIND_DISPATCH`], [`KIND_SWITCH`].
    pub kind: u64,
    /// First argument.
    pub arg0: u64,
    /// Second argument.
    pub arg1: u64,
}

impl GuestEvent {
    /// The event kind ([`KIND_DISPATCH`] or [`KIND_SWITCH`]; anything else
    /// is unknown).
    pub const fn event_kind(&self) -> u64 {
        self.kind & KIND_MASK
    }

    /// A dispatch's [`outcome`].
    pub const fn outcome(&self) -> u64 {
        (self.kind >> OUTCOME_SHIFT) & 0xff
    }

    /// The thread id in the kind word.
    pub const fn tid(&self) -> u64 {
        self.kind >> TID_SHIFT
    }
}

/// A whole ring: header and slots.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventRing {
    /// The control words.
    pub header: RingHeader,
    /// The slots; event `n` lives in slot `n % CAPACITY`.
    pub slots: [GuestEvent; CAPACITY as usize],
}

/// Byte offset of [`RingHeader::head`] in the ring.
pub const HEAD_OFFSET: u64 = core::mem::offset_of!(RingHeader, head) as u64;
/// Byte offset of [`RingHeader::tail`] in the ring.
pub const TAIL_OFFSET: u64 = core::mem::offset_of!(RingHeader, tail) as u64;
/// Byte offset of [`RingHeader::dropped`] in the ring.
pub const DROPPED_OFFSET: u64 = core::mem::offset_of!(RingHeader, dropped) as u64;
/// Byte offset of [`RingHeader::enabled`] in the ring.
pub const ENABLED_OFFSET: u64 = core::mem::offset_of!(RingHeader, enabled) as u64;
/// Byte offset of slot `index` (below [`CAPACITY`]) in the ring.
pub const fn slot_offset(index: u64) -> u64 {
    core::mem::offset_of!(EventRing, slots) as u64
        + (index & (CAPACITY - 1)) * core::mem::size_of::<GuestEvent>() as u64
}

/// Whether the ring at `ring` is enabled: one volatile load.
///
/// # Safety
/// `ring` points to a ring in memory the caller may read.
#[inline(always)]
pub unsafe fn enabled(ring: *const EventRing) -> bool {
    // SAFETY: the caller guarantees `ring` is readable; the field is aligned.
    unsafe { core::ptr::addr_of!((*ring).header.enabled).read_volatile() != 0 }
}

/// Publishes `event` in the ring at `ring` (the producer side), or counts it
/// as dropped when the ring is full. Returns whether it was published. Does
/// not check [`enabled`]. A handful of loads and stores, no loop.
///
/// # Safety
/// `ring` points to a ring in memory the caller may read and write, and the
/// caller is the ring's only producer (no other call on the same ring runs
/// concurrently).
#[inline(always)]
pub unsafe fn produce(ring: *mut EventRing, event: GuestEvent) -> bool {
    // SAFETY: the caller guarantees `ring` is a valid ring it produces into
    // alone; every place below is an aligned field or slot of it, reached
    // through raw places (the consumer writes `tail` concurrently, so no
    // reference to the ring is formed).
    unsafe {
        let head = core::ptr::addr_of!((*ring).header.head).read_volatile();
        let tail = core::ptr::addr_of!((*ring).header.tail).read_volatile();
        if head.wrapping_sub(tail) >= CAPACITY {
            let dropped = core::ptr::addr_of_mut!((*ring).header.dropped);
            dropped.write_volatile(dropped.read_volatile().wrapping_add(1));
            return false;
        }
        let slot = core::ptr::addr_of_mut!((*ring).slots[(head & (CAPACITY - 1)) as usize]);
        slot.write_volatile(event);
        // The record before the head that publishes it (a compiler fence: x86
        // does not reorder stores with stores).
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::Release);
        core::ptr::addr_of_mut!((*ring).header.head).write_volatile(head.wrapping_add(1));
    }
    true
}

const _: () = {
    assert!(CAPACITY.is_power_of_two());
    assert!(core::mem::size_of::<RingHeader>() == 64);
    assert!(core::mem::size_of::<GuestEvent>() == 32);
    assert!(TAIL_OFFSET == 32);
};

#[cfg(test)]
mod tests {
    use super::*;

    extern crate std;
    use std::boxed::Box;
    use std::vec::Vec;

    fn ring() -> Box<EventRing> {
        Box::new(EventRing {
            header: RingHeader::default(),
            slots: [GuestEvent::default(); CAPACITY as usize],
        })
    }

    fn event(n: u64) -> GuestEvent {
        GuestEvent {
            time_ns: n,
            kind: KIND_SWITCH | (n << TID_SHIFT),
            arg0: n,
            arg1: n + 1,
        }
    }

    /// The consumer's side, as the VMM does it: copy `tail..head`, then
    /// advance `tail`.
    fn consume(ring: &mut EventRing) -> Vec<GuestEvent> {
        let (head, tail) = (ring.header.head, ring.header.tail);
        let out = (tail..head)
            .map(|n| ring.slots[(n & (CAPACITY - 1)) as usize])
            .collect();
        ring.header.tail = head;
        out
    }

    #[test]
    fn test_full_ring_drops_and_counts_never_overwrites() {
        let mut r = ring();
        for n in 0..CAPACITY + 3 {
            // SAFETY: a valid ring, one producer.
            let kept = unsafe { produce(&mut *r, event(n)) };
            assert_eq!(kept, n < CAPACITY);
        }
        assert_eq!((r.header.head, r.header.dropped), (CAPACITY, 3));
        let events = consume(&mut r);
        assert_eq!(events.len() as u64, CAPACITY);
        assert!(events
            .iter()
            .enumerate()
            .all(|(i, e)| e.time_ns == i as u64));
        // Space again once consumed.
        // SAFETY: as above.
        assert!(unsafe { produce(&mut *r, event(7)) });
    }

    #[test]
    fn test_ring_wraps_in_order_across_slot_reuse() {
        let mut r = ring();
        let mut seen = Vec::new();
        for n in 0..3 * CAPACITY + 5 {
            // SAFETY: a valid ring, one producer.
            assert!(unsafe { produce(&mut *r, event(n)) });
            if n % 100 == 99 {
                seen.extend(consume(&mut r));
            }
        }
        seen.extend(consume(&mut r));
        assert_eq!(r.header.dropped, 0);
        assert_eq!(seen.len() as u64, 3 * CAPACITY + 5);
        assert!(seen.iter().enumerate().all(|(i, e)| *e == event(i as u64)));
    }

    #[test]
    fn test_counters_wrap_at_u64_max() {
        let mut r = ring();
        r.header.head = u64::MAX;
        r.header.tail = u64::MAX;
        // SAFETY: a valid ring, one producer.
        assert!(unsafe { produce(&mut *r, event(1)) });
        assert_eq!(r.header.head, 0);
        assert_eq!(r.slots[(CAPACITY - 1) as usize], event(1));
    }

    #[test]
    fn test_kind_word_fields() {
        let e = GuestEvent {
            kind: KIND_DISPATCH | (outcome::EARLY << OUTCOME_SHIFT) | (9 << TID_SHIFT),
            ..GuestEvent::default()
        };
        assert_eq!(
            (e.event_kind(), e.outcome(), e.tid()),
            (KIND_DISPATCH, 1, 9)
        );
        assert_eq!(slot_offset(CAPACITY + 1), 64 + 32);
    }
}
