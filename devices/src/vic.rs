//! The per-vCPU virtual interrupt controller: a minimal local APIC.
//!
//! # What is emulated
//!
//! - A 256-bit pending set (the APIC's IRR) holding at most one pending
//!   instance of each vector: raising a vector that is already pending is
//!   *coalesced* (counted, not queued).
//! - A 256-bit in-service set (the APIC's ISR), which nests: a vector is
//!   deliverable only if its priority class (`vector >> 4`) is strictly higher
//!   than the class of the highest in-service vector (Intel SDM Vol. 3A,
//!   10.8.3.1 "Task and Processor Priorities", with the task priority fixed
//!   at 0).
//! - End of interrupt, which retires the highest in-service vector (SDM 10.8.5).
//!
//! # What is not emulated
//!
//! No task-priority register, no masking, no trigger modes, no register page:
//! the VMM decodes [`metronome_abi::mmio::VIC_EOI`] and
//! [`metronome_abi::mmio::VIC_IPI`] itself and calls [`VirtualInterruptController::eoi`]
//! and [`VirtualInterruptController::raise`] on the target's controller.
//! The controller does not see the guest's `RFLAGS.IF`: the VMM must check
//! `kvm_run.ready_for_interrupt_injection` (and `if_flag`) before injecting
//! what [`VirtualInterruptController::deliverable`] returns.
//!
//! # Threat model
//!
//! | Guest action | Effect |
//! |---|---|
//! | EOI with nothing in service | ignored, counted in `spurious_eois` |
//! | IPI with an exception vector (< 32) | ignored, counted in `rejected` |
//! | IPI flood of one vector | coalesced to one pending instance, counted |
//!
//! State is two fixed bitmaps, so nothing the guest does can grow it.

/// The first vector that is not reserved for architectural exceptions
/// (SDM Vol. 3A, 6.2: vectors 0 to 31 are reserved).
pub const FIRST_EXTERNAL_VECTOR: u8 = 32;

/// A set of the 256 interrupt vectors, one bit per vector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct VectorSet([u64; 4]);

impl VectorSet {
    fn contains(&self, vector: u8) -> bool {
        self.0[usize::from(vector >> 6)] & (1 << (vector & 63)) != 0
    }

    fn insert(&mut self, vector: u8) {
        self.0[usize::from(vector >> 6)] |= 1 << (vector & 63);
    }

    fn remove(&mut self, vector: u8) {
        self.0[usize::from(vector >> 6)] &= !(1 << (vector & 63));
    }

    /// The highest vector in the set.
    fn highest(&self) -> Option<u8> {
        // Word index (< 4) times 64 plus a bit index (< 64) is at most 255.
        (0..4u8).rev().find_map(|word| {
            let bits = self.0[usize::from(word)];
            (bits != 0).then(|| word * 64 + bits.ilog2() as u8)
        })
    }
}

/// The priority class of a vector (SDM Vol. 3A, 10.8.3.1).
const fn class(vector: u8) -> u8 {
    vector >> 4
}

/// The outcome of [`VirtualInterruptController::raise`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Raise {
    /// The vector was not pending and now is.
    Queued,
    /// The vector was already pending; the raise merged into it.
    Coalesced,
    /// The vector is reserved for exceptions (< 32); the raise was ignored.
    Rejected,
}

/// Event counts of one [`VirtualInterruptController`].
///
/// At any time `raised == injected + number of pending vectors`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VicCounters {
    /// Raises that made a vector pending ([`Raise::Queued`]).
    pub raised: u64,
    /// Raises merged into an already pending vector ([`Raise::Coalesced`]).
    pub coalesced: u64,
    /// Raises of reserved exception vectors ([`Raise::Rejected`]).
    pub rejected: u64,
    /// Vectors the VMM injected and acknowledged.
    pub injected: u64,
    /// End-of-interrupt writes that retired an in-service vector.
    pub eois: u64,
    /// End-of-interrupt writes with nothing in service.
    pub spurious_eois: u64,
}

/// One vCPU's virtual interrupt controller.
///
/// # Example
///
/// ```
/// use metronome_devices::{Raise, VirtualInterruptController};
///
/// let mut vic = VirtualInterruptController::new();
/// assert_eq!(vic.raise(0x80), Raise::Queued);
/// assert_eq!(vic.raise(0xf0), Raise::Queued);
/// // The VMM injects the highest deliverable vector, then acknowledges it.
/// let vector = vic.deliverable().unwrap();
/// assert_eq!(vector, 0xf0);
/// assert!(vic.acknowledge(vector));
/// // 0x80 is a lower class than the in-service 0xf0: it waits for the EOI.
/// assert_eq!(vic.deliverable(), None);
/// assert_eq!(vic.eoi(), Some(0xf0));
/// assert_eq!(vic.deliverable(), Some(0x80));
/// ```
#[derive(Clone, Debug, Default)]
pub struct VirtualInterruptController {
    /// Raised, not yet injected (IRR).
    pending: VectorSet,
    /// Injected, not yet retired by an EOI (ISR).
    in_service: VectorSet,
    counters: VicCounters,
}

impl VirtualInterruptController {
    /// A controller with nothing pending or in service.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `vector` pending.
    ///
    /// At most one instance of a vector is pending: raising a pending vector
    /// returns [`Raise::Coalesced`]. A vector that is in service can be raised
    /// again and becomes deliverable after its EOI. Exception vectors (below
    /// [`FIRST_EXTERNAL_VECTOR`]) are ignored and return [`Raise::Rejected`].
    pub fn raise(&mut self, vector: u8) -> Raise {
        if vector < FIRST_EXTERNAL_VECTOR {
            self.counters.rejected += 1;
            Raise::Rejected
        } else if self.pending.contains(vector) {
            self.counters.coalesced += 1;
            Raise::Coalesced
        } else {
            self.pending.insert(vector);
            self.counters.raised += 1;
            Raise::Queued
        }
    }

    /// The vector the VMM should inject next, if any: the highest pending
    /// vector, provided its priority class is strictly higher than the class of
    /// the highest in-service vector.
    ///
    /// This does not consider the guest's interrupt flag: the VMM must also
    /// check `kvm_run.ready_for_interrupt_injection` before injecting, and
    /// request an interrupt window otherwise.
    pub fn deliverable(&self) -> Option<u8> {
        let vector = self.pending.highest()?;
        match self.in_service.highest() {
            Some(active) if class(vector) <= class(active) => None,
            _ => Some(vector),
        }
    }

    /// Records that the VMM injected `vector`: it leaves the pending set and
    /// enters the in-service set, and is counted in `injected`.
    ///
    /// Returns `false`, and changes and counts nothing, if `vector` was not
    /// pending; that is a VMM bug, not guest misbehaviour.
    pub fn acknowledge(&mut self, vector: u8) -> bool {
        if !self.pending.contains(vector) {
            return false;
        }
        self.pending.remove(vector);
        self.in_service.insert(vector);
        self.counters.injected += 1;
        true
    }

    /// End of interrupt: retires the highest in-service vector and returns it.
    ///
    /// With nothing in service this is guest misbehaviour: it is counted in
    /// `spurious_eois` and returns `None`.
    pub fn eoi(&mut self) -> Option<u8> {
        let Some(vector) = self.in_service.highest() else {
            self.counters.spurious_eois += 1;
            return None;
        };
        self.in_service.remove(vector);
        self.counters.eois += 1;
        Some(vector)
    }

    /// Whether `vector` is pending (raised and not yet acknowledged).
    pub fn is_pending(&self, vector: u8) -> bool {
        self.pending.contains(vector)
    }

    /// The highest in-service vector, if any.
    pub fn in_service(&self) -> Option<u8> {
        self.in_service.highest()
    }

    /// The event counts so far.
    pub fn counters(&self) -> VicCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Injects and acknowledges whatever is deliverable, returning it.
    fn inject(vic: &mut VirtualInterruptController) -> Option<u8> {
        let vector = vic.deliverable()?;
        assert!(vic.acknowledge(vector));
        Some(vector)
    }

    #[test]
    fn test_vector_set_highest() {
        let mut set = VectorSet::default();
        assert_eq!(set.highest(), None);
        for v in [0, 63, 64, 127, 200, 255] {
            set.insert(v);
            assert_eq!(set.highest(), Some(v));
        }
        set.remove(255);
        assert_eq!(set.highest(), Some(200));
    }

    #[test]
    fn test_highest_vector_delivered_first() {
        let mut vic = VirtualInterruptController::new();
        for v in [0x40, 0xe0, 0x80, 0xf0, 0x21] {
            assert_eq!(vic.raise(v), Raise::Queued);
        }
        let mut order = Vec::new();
        while let Some(v) = inject(&mut vic) {
            order.push(v);
            assert_eq!(vic.eoi(), Some(v));
        }
        assert_eq!(order, [0xf0, 0xe0, 0x80, 0x40, 0x21]);
    }

    #[test]
    fn test_pending_vector_coalesces() {
        let mut vic = VirtualInterruptController::new();
        assert_eq!(vic.raise(0xf0), Raise::Queued);
        assert_eq!(vic.raise(0xf0), Raise::Coalesced);
        assert_eq!(vic.raise(0xf0), Raise::Coalesced);
        assert!(vic.is_pending(0xf0));
        assert_eq!(inject(&mut vic), Some(0xf0));
        assert_eq!(vic.deliverable(), None);
        let c = vic.counters();
        assert_eq!((c.raised, c.coalesced, c.injected), (1, 2, 1));
    }

    #[test]
    fn test_in_service_vector_can_be_raised_again() {
        let mut vic = VirtualInterruptController::new();
        vic.raise(0xf0);
        inject(&mut vic);
        assert_eq!(vic.raise(0xf0), Raise::Queued);
        // Same class as the in-service vector: held until the EOI.
        assert_eq!(vic.deliverable(), None);
        assert_eq!(vic.eoi(), Some(0xf0));
        assert_eq!(vic.deliverable(), Some(0xf0));
    }

    #[test]
    fn test_in_service_class_masks_equal_and_lower_classes() {
        let mut vic = VirtualInterruptController::new();
        vic.raise(0x85);
        assert_eq!(inject(&mut vic), Some(0x85));
        assert_eq!(vic.in_service(), Some(0x85));
        // Same class (0x8), even a higher vector: masked.
        vic.raise(0x8f);
        assert_eq!(vic.deliverable(), None);
        // Lower class: masked.
        vic.raise(0x40);
        assert_eq!(vic.deliverable(), None);
        // Higher class: nests.
        vic.raise(0x90);
        assert_eq!(vic.deliverable(), Some(0x90));
    }

    #[test]
    fn test_nested_eoi_retires_highest_first() {
        let mut vic = VirtualInterruptController::new();
        vic.raise(0x40);
        assert_eq!(inject(&mut vic), Some(0x40));
        vic.raise(0x80);
        assert_eq!(inject(&mut vic), Some(0x80));
        vic.raise(0xf0);
        assert_eq!(inject(&mut vic), Some(0xf0));
        assert_eq!(vic.in_service(), Some(0xf0));
        assert_eq!(vic.eoi(), Some(0xf0));
        assert_eq!(vic.eoi(), Some(0x80));
        assert_eq!(vic.eoi(), Some(0x40));
        assert_eq!(vic.in_service(), None);
        assert_eq!(vic.counters().eois, 3);
    }

    #[test]
    fn test_spurious_eoi_counted() {
        let mut vic = VirtualInterruptController::new();
        assert_eq!(vic.eoi(), None);
        assert_eq!(vic.eoi(), None);
        let c = vic.counters();
        assert_eq!((c.eois, c.spurious_eois), (0, 2));
    }

    #[test]
    fn test_reserved_vectors_rejected() {
        let mut vic = VirtualInterruptController::new();
        for v in 0..FIRST_EXTERNAL_VECTOR {
            assert_eq!(vic.raise(v), Raise::Rejected);
            assert!(!vic.is_pending(v));
        }
        assert_eq!(vic.deliverable(), None);
        let c = vic.counters();
        assert_eq!((c.rejected, c.raised), (32, 0));
        assert_eq!(vic.raise(FIRST_EXTERNAL_VECTOR), Raise::Queued);
    }

    #[test]
    fn test_acknowledge_not_pending_counts_nothing() {
        let mut vic = VirtualInterruptController::new();
        assert!(!vic.acknowledge(0xf0));
        assert_eq!(vic.in_service(), None);
        assert_eq!(vic.counters(), VicCounters::default());
    }

    #[test]
    fn test_random_queued_raises_injected_exactly_once() {
        // xorshift64 (Marsaglia 2003): deterministic, no extra crates.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut vic = VirtualInterruptController::new();
        let mut queued = [0u64; 256];
        let mut injected = [0u64; 256];
        let mut stack: Vec<u8> = Vec::new();
        for _ in 0..100_000 {
            match next() % 4 {
                0 | 1 => {
                    // A few vectors across a few classes, so coalescing and
                    // masking both happen often.
                    let vector = [0x20, 0x21, 0x80, 0x8f, 0xe0, 0xf0][(next() % 6) as usize];
                    if vic.raise(vector) == Raise::Queued {
                        queued[usize::from(vector)] += 1;
                    }
                }
                2 => {
                    if let Some(v) = inject(&mut vic) {
                        // Nesting only ever goes up in class.
                        if let Some(&top) = stack.last() {
                            assert!(class(v) > class(top));
                        }
                        stack.push(v);
                        injected[usize::from(v)] += 1;
                    }
                }
                _ => assert_eq!(vic.eoi(), stack.pop()),
            }
        }
        // Drain: the driver keeps injecting and retiring until idle.
        loop {
            if let Some(v) = inject(&mut vic) {
                stack.push(v);
                injected[usize::from(v)] += 1;
            } else if let Some(v) = vic.eoi() {
                assert_eq!(Some(v), stack.pop());
            } else {
                break;
            }
        }
        assert_eq!(queued, injected);
        let c = vic.counters();
        assert_eq!(c.raised, c.injected);
        assert_eq!(c.raised, queued.iter().sum::<u64>());
        assert!(c.coalesced > 0 && c.rejected == 0);
    }
}
