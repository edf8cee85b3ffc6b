//! Guest register accesses: the pure device models with time as an input,
//! and the bus adapters (UART, debug exit, interrupt-controller, timer and
//! control pages) as the vCPU loop drives them.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arbitrary::Unstructured;
use metronome_abi::mmio::{
    CTL_BASE, CTL_FAULT, CTL_PANIC, CTL_PET_SELF_SAMPLE, TIMER_BASE, TIMER_CANCEL, TIMER_DEADLINE,
    TIMER_FREQ_HZ, TIMER_HZ, TIMER_MAX_NS, TIMER_NOW, TIMER_REARM_NS, TIMER_RESUMES, TIMER_TRIGGER,
    VIC_BASE, VIC_EOI, VIC_ID, VIC_IPI,
};
use metronome_devices::{Expiry, Raise, VirtualInterruptController, VirtualTimer};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::pick;
use crate::devices::DeviceManager;
use crate::vm::VmShared;

/// The timer's register offsets, and two that are none.
const TIMER_OFFSETS: [u64; 9] = [
    TIMER_REARM_NS,
    TIMER_TRIGGER,
    TIMER_CANCEL,
    TIMER_NOW,
    TIMER_FREQ_HZ,
    TIMER_DEADLINE,
    TIMER_RESUMES,
    0x38,
    0xff8,
];

/// Values at the edges of what the registers take.
const VALUES: [u64; 8] = [
    0,
    1,
    2,
    TIMER_MAX_NS,
    TIMER_MAX_NS + 1,
    u64::MAX,
    1 << 63,
    1_000_000,
];

/// A value: one of [`VALUES`] or any.
fn value(u: &mut Unstructured<'_>) -> u64 {
    if u.ratio(1, 2).unwrap_or(false) {
        pick(u, &VALUES).unwrap_or(0)
    } else {
        u.arbitrary().unwrap_or(0)
    }
}

/// The controller's pending vectors, counted.
fn pending(vic: &VirtualInterruptController) -> u64 {
    (0..=255u8).filter(|&v| vic.is_pending(v)).count() as u64
}

/// Target `device_models`: a sequence of guest register accesses and VMM
/// calls on one vCPU's timer and interrupt controller, with device time
/// moving forward by the input's steps (or, rarely, back).
///
/// # Panics
///
/// When a model breaks its contract: the timer fires before its deadline or
/// not once it passed (VT-1), a rearm's deadline is not `now` plus the
/// clamped delay (VT-1, VT-4, VT-6), a register reads other than its
/// definition, a refused access is not counted; the controller delivers a
/// vector that is not pending or not of a higher class than the one in
/// service, or its counters break `raised == injected + pending`.
pub fn device_models(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut timer = VirtualTimer::new();
    let mut vic = VirtualInterruptController::new();
    let mut now: u64 = 0;
    let mut backwards = false;
    while !u.is_empty() {
        let Ok(op) = u.int_in_range(0..=11u8) else {
            break;
        };
        let before = timer.counters();
        match op {
            0 => {
                let step: u64 = if u.ratio(1, 4).unwrap_or(false) {
                    value(&mut u)
                } else {
                    u64::from(u.arbitrary::<u16>().unwrap_or(0))
                };
                now = now.saturating_add(step);
            }
            1 => {
                let back = u64::from(u.arbitrary::<u16>().unwrap_or(0));
                backwards |= back > 0;
                now = now.saturating_sub(back);
            }
            2 => {
                let offset = pick(&mut u, &TIMER_OFFSETS).unwrap_or(0);
                let v = value(&mut u);
                match timer.mmio_write(now, offset, v) {
                    Ok(()) => {
                        let expected = match offset {
                            TIMER_REARM_NS => Some(now.saturating_add(v.min(TIMER_MAX_NS))),
                            TIMER_TRIGGER => Some(now),
                            _ => None,
                        };
                        assert_eq!(
                            timer.next_deadline(),
                            expected,
                            "write {offset:#x} = {v:#x}"
                        );
                    }
                    Err(_) => assert_eq!(
                        timer.counters().bad_accesses,
                        before.bad_accesses + 1,
                        "a refused write is not counted"
                    ),
                }
            }
            3 => {
                let offset = pick(&mut u, &TIMER_OFFSETS).unwrap_or(0);
                match timer.mmio_read(now, offset) {
                    Ok(v) => {
                        let expected = match offset {
                            TIMER_NOW => now,
                            TIMER_FREQ_HZ => TIMER_HZ,
                            TIMER_DEADLINE => timer.next_deadline().unwrap_or(u64::MAX),
                            TIMER_RESUMES => timer.counters().resumes,
                            _ => panic!("register {offset:#x} read as {v:#x}: it is not readable"),
                        };
                        assert_eq!(v, expected, "read {offset:#x}");
                    }
                    Err(_) => assert_eq!(timer.counters().bad_accesses, before.bad_accesses + 1),
                }
            }
            4 => {
                // The host timer expired, or the vCPU is about to enter:
                // poll, raise the timer vector on a fire.
                let deadline = timer.next_deadline();
                match timer.poll(now) {
                    Expiry::Idle => assert_eq!(deadline, None),
                    Expiry::NotYet { deadline: d } => {
                        assert!(d > now, "not fired at {now} though {d} passed");
                        assert_eq!(deadline, Some(d));
                    }
                    Expiry::Fired {
                        deadline: d,
                        lateness_ns,
                    } => {
                        assert!(d <= now, "fired at {now} before its deadline {d} (VT-1)");
                        assert_eq!(lateness_ns, now - d);
                        assert_eq!(deadline, Some(d));
                        assert_eq!(timer.next_deadline(), None, "one-shot (VT-2)");
                        vic.raise(metronome_abi::Vector::Timer as u8);
                    }
                }
            }
            5 => {
                // The guest can take an interrupt: inject what is deliverable.
                if let Some(vector) = vic.deliverable() {
                    assert!(vector >= 32 && vic.is_pending(vector));
                    if let Some(active) = vic.in_service() {
                        assert!(
                            vector >> 4 > active >> 4,
                            "{vector} over {active} in service"
                        );
                    }
                    assert!(vic.acknowledge(vector));
                    if vector == metronome_abi::Vector::Timer as u8 {
                        timer.note_injection(now);
                    }
                }
            }
            6 => {
                let vector = u.arbitrary::<u8>().unwrap_or(0);
                let was = vic.is_pending(vector);
                match vic.raise(vector) {
                    Raise::Rejected => assert!(vector < 32),
                    Raise::Coalesced => assert!(was && vector >= 32),
                    Raise::Queued => assert!(!was && vector >= 32),
                }
            }
            7 => {
                let active = vic.in_service();
                assert_eq!(vic.eoi(), active, "EOI retires the highest in service");
            }
            8 => {
                let vector = u.arbitrary::<u8>().unwrap_or(0);
                let was = vic.is_pending(vector);
                assert_eq!(vic.acknowledge(vector), was);
            }
            9 => timer.note_resume(),
            10 => timer.rearm(now, value(&mut u)),
            _ => timer.cancel(),
        }
        if !matches!(op, 2 | 3) {
            assert_eq!(timer.counters().bad_accesses, before.bad_accesses);
        }
        let counters = vic.counters();
        assert_eq!(
            counters.raised,
            counters.injected + pending(&vic),
            "raised == injected + pending"
        );
        if !backwards {
            assert_eq!(
                timer.counters().early_injections,
                0,
                "an injection before its deadline"
            );
        }
        let t = timer.counters();
        assert!(t.clamped <= t.rearms && t.rearm_zero <= t.rearms);
        assert!(t.coalesced <= t.expirations);
        assert!(timer.lateness().count() <= t.injections);
    }
}

/// A console that counts the bytes written to it.
#[derive(Debug, Clone, Default)]
struct Console(Arc<AtomicUsize>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.fetch_add(buf.len(), Ordering::Relaxed);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Guest memory of the bus target: 64 KiB, where reports are read from.
const BUS_MEMORY: u64 = 0x1_0000;

/// Bus addresses the accesses aim at: each device's base and registers,
/// the edges of its range, and addresses next to none.
const MMIO_BASES: [u64; 12] = [
    VIC_BASE + VIC_EOI,
    VIC_BASE + VIC_IPI,
    VIC_BASE + VIC_ID,
    TIMER_BASE + TIMER_REARM_NS,
    TIMER_BASE + TIMER_NOW,
    TIMER_BASE + TIMER_DEADLINE,
    CTL_BASE + CTL_FAULT,
    CTL_BASE + CTL_PANIC,
    CTL_BASE + CTL_PET_SELF_SAMPLE,
    CTL_BASE + 0xff8,
    CTL_BASE + 0x1000,
    VIC_BASE - 8,
];

/// Port addresses the accesses aim at.
const PIO_BASES: [u64; 6] = [
    DeviceManager::COM1,
    DeviceManager::COM1 + 5,
    DeviceManager::COM1 + 7,
    DeviceManager::COM1 + 8,
    DeviceManager::DEBUG_EXIT,
    DeviceManager::DEBUG_EXIT + 3,
];

/// Target `device_bus`: guest memory filled from the input, then a
/// sequence of port and MMIO accesses of any width (1 to 16 bytes), address
/// and value from two vCPUs, through the device manager's buses as the
/// vCPU loop makes them.
///
/// # Panics
///
/// When an access inside a device's range misses, one outside every range
/// hits, `VIC_ID` does not read the accessing vCPU, the UART writes more
/// than the guest wrote, or a misbehaviour the adapters count is not counted.
pub fn device_bus(data: &[u8]) {
    let mut u = Unstructured::new(data);
    // Cannot panic: 64 KiB of anonymous memory and one eventfd.
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), BUS_MEMORY as usize)])
        .expect("guest memory");
    let len = usize::from(u.arbitrary::<u8>().unwrap_or(0)) * 4;
    if let Ok(bytes) = u.bytes(len.min(u.len())) {
        let at = u64::from(u.arbitrary::<u16>().unwrap_or(0));
        let _ = mem.write_slice(bytes, GuestAddress(at));
    }
    let shared = Arc::new(VmShared::new(mem, 2, None).expect("shared state"));
    let console = Console::default();
    let written = console.0.clone();
    let devices = DeviceManager::new(&shared, Box::new(console)).expect("the device map");
    let mut to_uart = 0usize;
    let mut control_writes = 0u64;
    while !u.is_empty() {
        let vcpu = u32::from(u.arbitrary::<bool>().unwrap_or(false));
        let mmio = u.arbitrary::<bool>().unwrap_or(true);
        let base = if mmio {
            pick(&mut u, &MMIO_BASES).unwrap_or(VIC_BASE)
        } else {
            pick(&mut u, &PIO_BASES).unwrap_or(DeviceManager::COM1)
        };
        let addr = match u.int_in_range(0..=3u8).unwrap_or(0) {
            0 => u.arbitrary().unwrap_or(0),
            1 => base.wrapping_add(u64::from(u.arbitrary::<u8>().unwrap_or(0))),
            _ => base,
        };
        let width = pick(&mut u, &[1usize, 2, 4, 8, 8, 8, 3, 16]).unwrap_or(8);
        let write = u.arbitrary::<bool>().unwrap_or(false);
        let bus = if mmio { &devices.mmio } else { &devices.pio };
        let within = |start: u64, len: u64| {
            addr >= start
                && addr
                    .checked_add(width as u64)
                    .is_some_and(|end| end <= start + len)
        };
        let mapped = if mmio {
            [VIC_BASE, TIMER_BASE, CTL_BASE]
                .iter()
                .any(|&b| within(b, 0x1000))
        } else {
            within(DeviceManager::COM1, DeviceManager::COM1_LEN)
                || within(DeviceManager::DEBUG_EXIT, 4)
        };
        if write {
            let v = value(&mut u).to_le_bytes();
            let mut bytes = vec![0u8; width];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = v[i % 8];
            }
            let bad_before = devices.errors.control_bad_writes.load(Ordering::Relaxed);
            let hit = bus.write(vcpu, addr, &bytes);
            assert_eq!(hit, mapped, "write of {width} at {addr:#x}");
            if hit && !mmio && addr == DeviceManager::COM1 {
                to_uart += width;
            }
            if hit && mmio && within(CTL_BASE, 0x1000) {
                control_writes += 1;
                let offset = addr - CTL_BASE;
                let counted =
                    devices.errors.control_bad_writes.load(Ordering::Relaxed) > bad_before;
                let report = width == 8 && (offset == CTL_FAULT || offset == CTL_PANIC);
                assert!(
                    report || counted,
                    "a control write of {width} at {offset:#x} is neither a report nor counted"
                );
                if report {
                    assert!(shared.exit_reason().is_some(), "a report ends the VM");
                }
            }
        } else {
            let mut bytes = vec![0xa5u8; width];
            let hit = bus.read(vcpu, addr, &mut bytes);
            assert_eq!(hit, mapped, "read of {width} at {addr:#x}");
            if hit && mmio && addr == VIC_BASE + VIC_ID && width == 8 {
                assert_eq!(
                    u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default()),
                    u64::from(vcpu)
                );
            }
        }
    }
    assert!(
        written.load(Ordering::Relaxed) <= to_uart,
        "the UART wrote more than the guest sent to its data register"
    );
    let _ = (
        control_writes,
        devices.errors.vic_bad_accesses.load(Ordering::Relaxed),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::tests::check_target;

    #[test]
    fn test_device_models_property() {
        check_target("device_models", 3000, 41);
    }

    #[test]
    fn test_device_bus_property() {
        check_target("device_bus", 1500, 42);
    }

    #[test]
    fn test_vic_id_reads_the_accessing_vcpu_through_the_bus() {
        // vCPU 1 (true), MMIO (true), base index 2 (VIC_ID), at the base,
        // width index 3 (8 bytes), a read.
        let data = [0u8, 0, 0, 1, 1, 2, 3, 3, 0];
        device_bus(&data);
    }
}
