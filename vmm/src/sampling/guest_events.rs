//! The consumer side of the guest event rings ([`metronome_abi::events`]):
//! each vCPU's clockintr dispatches and context switches, drained into the
//! trace as kdebug-style records ([`super::trace::GUEST_DISPATCH`],
//! [`super::trace::GUEST_SWITCH`]).
//!
//! When: every vCPU thread drains its own ring at its loop top (with a trace
//! only: one acquire load of the guest's `head` and a compare when there is
//! nothing new), and the end-of-run report drains every ring once more after
//! the vCPUs stopped. That is often enough never to fill a ring: every
//! dispatch makes MMIO exits (the uptime read, the rearm) and every traced
//! switch reads the uptime through one, so at most a few events are published
//! between two loop tops, against [`CAPACITY`] slots.
//!
//! Single consumer per ring: the vCPU's own thread while it runs, the report
//! after it was joined. The consumer's position (`tail`) is kept here, on the
//! host, and published to the guest with release ordering to free the slots;
//! a guest `head` more than [`CAPACITY`] ahead of it (the guest's words are
//! untrusted) is counted as lost records and skipped, never read past.

use std::sync::atomic::{AtomicU64, Ordering};

use metronome_abi::events::{
    self, GuestEvent, CAPACITY, DROPPED_OFFSET, ENABLED_OFFSET, HEAD_OFFSET, KIND_DISPATCH,
    KIND_SWITCH, TAIL_OFFSET,
};
use metronome_abi::layout;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::trace::{TraceRecord, GUEST_DISPATCH, GUEST_SWITCH};
use kperf::trace::{DBG_FUNC_END, DBG_FUNC_START};

/// The host's side of every vCPU's ring.
#[derive(Debug)]
pub struct GuestEventRings {
    /// Per vCPU: events consumed (the ring's `tail`), owned by the consumer.
    tails: Vec<AtomicU64>,
    /// Per vCPU: records skipped because the guest's `head` was implausible,
    /// or unknown event kinds.
    lost: Vec<AtomicU64>,
    /// Per vCPU: events drained into the trace.
    drained: Vec<AtomicU64>,
}

impl GuestEventRings {
    /// The rings of `vcpus` vCPUs, nothing consumed yet.
    pub fn new(vcpus: u32) -> Self {
        let counters = || (0..vcpus).map(|_| AtomicU64::new(0)).collect();
        Self {
            tails: counters(),
            lost: counters(),
            drained: counters(),
        }
    }

    /// The number of vCPUs (rings).
    pub fn vcpus(&self) -> u32 {
        self.tails.len() as u32
    }

    /// Sets every ring's enable flag, before the vCPUs start.
    pub fn enable(&self, mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
        for id in 0..self.tails.len() as u32 {
            mem.write_obj(1u64, ring_address(id, ENABLED_OFFSET))?;
        }
        Ok(())
    }

    /// Drains vCPU `id`'s ring into `sink` (in publication order, which is
    /// time order on one vCPU); returns the events drained. Only one thread
    /// at a time may drain a given vCPU's ring (see the module docs).
    pub fn drain(&self, mem: &GuestMemoryMmap, id: u32, mut sink: impl FnMut(TraceRecord)) -> u64 {
        let Some(tail_slot) = self.tails.get(id as usize) else {
            return 0;
        };
        let Ok(head) = mem.load::<u64>(ring_address(id, HEAD_OFFSET), Ordering::Acquire) else {
            return 0;
        };
        let mut tail = tail_slot.load(Ordering::Relaxed);
        if head == tail {
            return 0;
        }
        let pending = head.wrapping_sub(tail);
        if pending > CAPACITY {
            // The guest's head is not where a producer could have put it.
            self.lost[id as usize].fetch_add(pending.min(u64::from(u32::MAX)), Ordering::Relaxed);
            tail = head;
        }
        let mut drained = 0;
        while tail != head {
            let Some(event) = read_event(mem, ring_address(id, events::slot_offset(tail))) else {
                break;
            };
            if !to_records(id, &event, &mut sink) {
                self.lost[id as usize].fetch_add(1, Ordering::Relaxed);
            }
            tail = tail.wrapping_add(1);
            drained += 1;
        }
        tail_slot.store(tail, Ordering::Relaxed);
        // Frees the slots: every read above happens before the guest can see
        // the new tail and reuse them.
        let _ = mem.store(tail, ring_address(id, TAIL_OFFSET), Ordering::Release);
        self.drained[id as usize].fetch_add(drained, Ordering::Relaxed);
        drained
    }

    /// vCPU `id`'s events that never reached the trace: those the guest
    /// dropped on a full ring plus those the host skipped.
    pub fn dropped(&self, mem: &GuestMemoryMmap, id: u32) -> u64 {
        let guest: u64 = mem
            .load(ring_address(id, DROPPED_OFFSET), Ordering::Acquire)
            .unwrap_or(0);
        let host = self
            .lost
            .get(id as usize)
            .map_or(0, |l| l.load(Ordering::Relaxed));
        guest.saturating_add(host)
    }

    /// vCPU `id`'s events drained so far.
    pub fn drained(&self, id: u32) -> u64 {
        self.drained
            .get(id as usize)
            .map_or(0, |d| d.load(Ordering::Relaxed))
    }
}

fn ring_address(id: u32, offset: u64) -> GuestAddress {
    GuestAddress(layout::event_ring(id) + offset)
}

/// One slot, copied out of guest memory (no allocation).
fn read_event(mem: &GuestMemoryMmap, addr: GuestAddress) -> Option<GuestEvent> {
    let mut bytes = [0u8; std::mem::size_of::<GuestEvent>()];
    mem.read_slice(&mut bytes, addr).ok()?;
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    };
    Some(GuestEvent {
        time_ns: word(0),
        kind: word(1),
        arg0: word(2),
        arg1: word(3),
    })
}

/// The trace records of one guest event: a dispatch is a start and an end
/// record (`GUEST_DISPATCH`), a switch one record (`GUEST_SWITCH`). Returns
/// false for an unknown kind.
fn to_records(vcpu: u32, event: &GuestEvent, sink: &mut impl FnMut(TraceRecord)) -> bool {
    let record = |time_ns, id, args| TraceRecord {
        time_ns,
        id,
        vcpu,
        tid: event.tid(),
        args,
        deadline_ns: 0,
    };
    match event.event_kind() {
        KIND_DISPATCH => {
            let outcome = event.outcome();
            let (hardclock, statclock) = (event.arg1 & 0xffff_ffff, event.arg1 >> 32);
            sink(record(
                event.time_ns,
                GUEST_DISPATCH | DBG_FUNC_START,
                [outcome, 0, 0, 0],
            ));
            // A guest end before its start is clamped (the trace stays well formed).
            sink(record(
                event.arg0.max(event.time_ns),
                GUEST_DISPATCH | DBG_FUNC_END,
                [hardclock, statclock, outcome, 0],
            ));
            true
        }
        KIND_SWITCH => {
            sink(record(
                event.time_ns,
                GUEST_SWITCH,
                [event.arg0, event.arg1, 0, 0],
            ));
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metronome_abi::events::{produce, EventRing, TID_SHIFT};

    fn guest() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), layout::percpu_region(2) as usize)])
            .unwrap()
    }

    /// The guest's producer, on the host mapping of vCPU `id`'s ring.
    fn ring(mem: &GuestMemoryMmap, id: u32) -> *mut EventRing {
        use vm_memory::GuestMemoryBackend;
        mem.get_host_address(GuestAddress(layout::event_ring(id)))
            .unwrap()
            .cast()
    }

    fn switch(n: u64) -> GuestEvent {
        GuestEvent {
            time_ns: 100 + n,
            kind: KIND_SWITCH | (n + 1) << TID_SHIFT,
            arg0: n,
            arg1: n + 1,
        }
    }

    fn drain_all(rings: &GuestEventRings, mem: &GuestMemoryMmap, id: u32) -> Vec<TraceRecord> {
        let mut out = Vec::new();
        rings.drain(mem, id, |r| out.push(r));
        out
    }

    #[test]
    fn test_enable_sets_every_rings_flag() {
        let mem = guest();
        GuestEventRings::new(2).enable(&mem).unwrap();
        for id in 0..2 {
            // SAFETY: the host mapping of the ring, kept mapped by `mem`.
            assert!(unsafe { events::enabled(ring(&mem, id)) });
        }
    }

    #[test]
    fn test_drain_is_in_order_across_wraps_and_frees_the_slots() {
        let mem = guest();
        let rings = GuestEventRings::new(2);
        let mut seen = Vec::new();
        for n in 0..2 * CAPACITY + 7 {
            // SAFETY: the host mapping of the ring, kept mapped by `mem`; this
            // test is the ring's only producer.
            assert!(unsafe { produce(ring(&mem, 1), switch(n)) });
            if n % 50 == 49 {
                seen.extend(drain_all(&rings, &mem, 1));
            }
        }
        seen.extend(drain_all(&rings, &mem, 1));
        assert_eq!(seen.len() as u64, 2 * CAPACITY + 7);
        for (n, r) in seen.iter().enumerate() {
            let n = n as u64;
            assert_eq!(
                (r.time_ns, r.id, r.vcpu, r.tid),
                (100 + n, GUEST_SWITCH, 1, n + 1)
            );
            assert_eq!(r.args[..2], [n, n + 1]);
        }
        // The tail reached the guest; vCPU 0's ring was never touched.
        let tail: u64 = mem.read_obj(ring_address(1, TAIL_OFFSET)).unwrap();
        assert_eq!(tail, 2 * CAPACITY + 7);
        assert_eq!((rings.drained(1), rings.drained(0)), (2 * CAPACITY + 7, 0));
        assert_eq!(rings.dropped(&mem, 1), 0);
    }

    #[test]
    fn test_a_concurrent_consumer_sees_whole_records_in_order() {
        let mem = guest();
        let rings = GuestEventRings::new(1);
        let total = 20 * CAPACITY;
        let address = ring(&mem, 0) as usize;
        let producer = std::thread::spawn(move || {
            let ring = address as *mut EventRing;
            let (mut n, mut full) = (0, 0);
            while n < total {
                // SAFETY: the host mapping of the ring, kept mapped by `mem`
                // until this thread is joined; this thread is the ring's
                // only producer.
                if unsafe { produce(ring, switch(n)) } {
                    n += 1;
                } else {
                    full += 1;
                    std::thread::yield_now();
                }
            }
            full
        });
        let mut seen = Vec::new();
        while (seen.len() as u64) < total {
            seen.extend(drain_all(&rings, &mem, 0));
        }
        let full = producer.join().unwrap();
        for (n, r) in seen.iter().enumerate() {
            let n = n as u64;
            assert_eq!(
                (r.time_ns, r.tid, r.args[0], r.args[1]),
                (100 + n, n + 1, n, n + 1)
            );
        }
        // This producer retried where the guest gives up; each refusal was
        // counted as a drop.
        assert_eq!(rings.dropped(&mem, 0), full);
    }

    #[test]
    fn test_overflow_is_counted_by_the_guest_and_reported() {
        let mem = guest();
        let rings = GuestEventRings::new(1);
        for n in 0..CAPACITY + 9 {
            // SAFETY: the host mapping of the ring, kept mapped by `mem`; this
            // test is the ring's only producer.
            unsafe { produce(ring(&mem, 0), switch(n)) };
        }
        assert_eq!(rings.dropped(&mem, 0), 9);
        let records = drain_all(&rings, &mem, 0);
        // The oldest events are kept, the newest dropped.
        assert_eq!(records.len() as u64, CAPACITY);
        assert_eq!(records.last().unwrap().time_ns, 100 + CAPACITY - 1);
    }

    #[test]
    fn test_a_dispatch_is_a_start_and_an_end_record() {
        let mem = guest();
        let rings = GuestEventRings::new(1);
        let event = GuestEvent {
            time_ns: 1_000,
            kind: KIND_DISPATCH | events::outcome::EARLY << events::OUTCOME_SHIFT | 3 << TID_SHIFT,
            arg0: 1_500,
            arg1: 2 | 1 << 32,
        };
        // SAFETY: the host mapping of the ring, kept mapped by `mem`; this
        // test is the ring's only producer.
        unsafe { produce(ring(&mem, 0), event) };
        let records = drain_all(&rings, &mem, 0);
        assert_eq!(records.len(), 2);
        assert_eq!(
            (records[0].time_ns, records[0].id, records[0].tid),
            (1_000, GUEST_DISPATCH | DBG_FUNC_START, 3)
        );
        assert_eq!(
            (records[1].time_ns, records[1].id, records[1].args),
            (1_500, GUEST_DISPATCH | DBG_FUNC_END, [2, 1, 1, 0])
        );
    }

    #[test]
    fn test_an_implausible_head_is_counted_and_never_read_past() {
        let mem = guest();
        let rings = GuestEventRings::new(1);
        mem.write_obj(10 * CAPACITY, ring_address(0, HEAD_OFFSET))
            .unwrap();
        assert!(drain_all(&rings, &mem, 0).is_empty());
        assert_eq!(rings.dropped(&mem, 0), 10 * CAPACITY);
        // An unknown kind is skipped and counted too.
        // SAFETY: the host mapping of the ring, kept mapped by `mem`; this
        // test is the ring's only producer.
        unsafe {
            produce(
                ring(&mem, 0),
                GuestEvent {
                    kind: 0x77,
                    ..GuestEvent::default()
                },
            )
        };
        assert!(drain_all(&rings, &mem, 0).is_empty());
        assert_eq!(rings.dropped(&mem, 0), 10 * CAPACITY + 1);
    }
}
