//! A fixed ring of thread-table slots: one vCPU's run queue.

use metronome_abi::MAX_THREADS;

/// A fixed ring of thread-table slots.
pub struct RunQueue {
    slots: [u16; MAX_THREADS],
    head: usize,
    len: usize,
}

impl RunQueue {
    /// An empty queue.
    pub const fn new() -> Self {
        Self {
            slots: [0; MAX_THREADS],
            head: 0,
            len: 0,
        }
    }

    /// Appends `slot`.
    pub fn push(&mut self, slot: usize) {
        // Cannot overflow: a vCPU owns at most MAX_THREADS threads and each is queued once.
        let tail = (self.head + self.len) % MAX_THREADS;
        self.slots[tail] = slot as u16;
        self.len += 1;
    }

    /// Removes and returns the oldest slot.
    pub fn pop(&mut self) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let slot = self.slots[self.head] as usize;
        self.head = (self.head + 1) % MAX_THREADS;
        self.len -= 1;
        Some(slot)
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
