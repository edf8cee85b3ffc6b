//! One bus for device accesses: the vCPU loop forwards every port and MMIO exit
//! here and never matches addresses itself.
//!
//! Devices see offsets relative to the base they were inserted at, plus the id
//! of the vCPU that made the access, so that banked devices (one instance per
//! vCPU at the same address) can pick their bank. Devices use interior
//! mutability: each one decides its own locking, so one vCPU's access to its own
//! timer bank never waits on another vCPU's.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A device on the bus.
pub trait BusDevice: Send + Sync {
    /// A read of `data.len()` bytes at `offset` by vCPU `vcpu`.
    fn read(&self, vcpu: u32, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset` by vCPU `vcpu`.
    fn write(&self, vcpu: u32, offset: u64, data: &[u8]);
}

/// Why a device could not be inserted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps an existing one.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
    },
    /// Zero-length range.
    #[error("bus range at {0:#x} has zero length")]
    Empty(u64),
}

struct Range {
    len: u64,
    name: &'static str,
    device: Arc<dyn BusDevice>,
}

/// An address space (port I/O or MMIO) of non-overlapping device ranges.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
    /// Accesses that hit no device (shared with whoever reports them).
    misses: Arc<AtomicU64>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        for (base, range) in &self.ranges {
            list.entry(&format_args!("{}@{base:#x}+{:#x}", range.name, range.len));
        }
        list.finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts `device` at `base..base + len`.
    pub fn insert(
        &mut self,
        name: &'static str,
        base: u64,
        len: u64,
        device: Arc<dyn BusDevice>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        let clash_below = self
            .ranges
            .range(..=base)
            .next_back()
            .is_some_and(|(b, r)| b + r.len > base);
        let clash_above = self.ranges.range(base..end).next().is_some();
        if clash_below || clash_above {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Range { len, name, device });
        Ok(())
    }

    /// The count of accesses that hit no device, shared: it stays readable
    /// after the bus moves to the vCPU threads.
    pub fn miss_counter(&self) -> Arc<AtomicU64> {
        self.misses.clone()
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Range)> {
        let found = self
            .ranges
            .range(..=addr)
            .next_back()
            .and_then(|(base, range)| {
                let offset = addr - base;
                let end = offset.checked_add(size as u64)?;
                (end <= range.len).then_some((offset, range))
            });
        if found.is_none() {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Forwards a read; returns false (and leaves `data` as all ones) on a miss.
    pub fn read(&self, vcpu: u32, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, range)) => {
                range.device.read(vcpu, offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Forwards a write; returns false on a miss.
    pub fn write(&self, vcpu: u32, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, range)) => {
                range.device.write(vcpu, offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u32, u64, Vec<u8>)>>);

    impl BusDevice for Recorder {
        fn read(&self, _vcpu: u32, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, vcpu: u32, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((vcpu, offset, data.to_vec()));
        }
    }

    #[test]
    fn test_offsets_are_relative_and_carry_the_vcpu() {
        let device = Arc::new(Recorder::default());
        let mut bus = Bus::new();
        bus.insert("rec", 0x3f8, 8, device.clone()).unwrap();
        assert!(bus.write(3, 0x3fa, &[7]));
        assert_eq!(device.0.lock().unwrap()[0], (3, 2, vec![7]));
        let mut data = [0u8; 1];
        assert!(bus.read(0, 0x3ff, &mut data));
        assert_eq!(data, [7]);
    }

    #[test]
    fn test_misses_and_straddling_accesses_are_refused() {
        let mut bus = Bus::new();
        bus.insert("rec", 0x100, 8, Arc::new(Recorder::default()))
            .unwrap();
        let mut data = [0u8; 4];
        assert!(!bus.read(0, 0xff, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.read(0, 0x106, &mut data), "straddles the end");
        assert!(!bus.write(0, 0x108, &[1]));
        assert_eq!(bus.miss_counter().load(Ordering::Relaxed), 3);
        assert!(bus.write(0, 0x100, &[1]));
        assert_eq!(
            bus.miss_counter().load(Ordering::Relaxed),
            3,
            "a hit is no miss"
        );
        assert!(!bus.write(0, u64::MAX, &[1; 8]), "no overflow at the top");
    }

    #[test]
    fn test_overlapping_inserts_are_rejected() {
        let mut bus = Bus::new();
        let d = Arc::new(Recorder::default());
        bus.insert("a", 0x100, 0x10, d.clone()).unwrap();
        assert!(bus.insert("b", 0x108, 0x10, d.clone()).is_err());
        assert!(bus.insert("c", 0xf8, 0x10, d.clone()).is_err());
        assert!(bus.insert("d", 0x110, 0x10, d.clone()).is_ok());
        assert_eq!(bus.insert("e", 0x200, 0, d), Err(BusError::Empty(0x200)));
    }
}
