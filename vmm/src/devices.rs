//! Bus adapters around the pure devices, and the device manager that places them.
//!
//! | device | bus | address | banked | model |
//! |---|---|---|---|---|
//! | COM1 16550 UART | PIO | 0x3f8, 8 ports | no | vm-superio `Serial`, output only, IRQ not wired |
//! | debug exit | PIO | 0xf4, 4 ports | no | 32-bit write = guest exit status |
//! | interrupt controller | MMIO | `mmio::VIC_BASE`, 4 KiB | yes | `metronome_devices::VirtualInterruptController` |
//! | timer | MMIO | `mmio::TIMER_BASE`, 4 KiB | yes | `metronome_devices::VirtualTimer` |
//! | control | MMIO | `mmio::CTL_BASE`, 4 KiB | no | fault and panic reports, lightweight PET self-sample requests |
//!
//! Guest accesses with a bad width, offset or value are ignored and counted
//! in one [`DeviceErrors`], which the summary's `guest_errors` reads; they
//! never stop the VMM (the guest is untrusted). What counts as misbehaviour,
//! per device:
//!
//! | device | refused and counted | a legitimate request |
//! |---|---|---|
//! | COM1 | a write to the read-only LSR or MSR; a write wider than a byte to a register other than THR | anything else (THR takes a `rep outsb` or a wide `out` byte by byte) |
//! | debug exit | a write to ports 0xf5-0xf7, or of 1 or 2 bytes to 0xf4 | a 4-byte write to 0xf4: the guest's exit |
//! | interrupt controller | a bad offset or width, a read of a write-only register, an IPI with reserved bits or a vector below 32; an IPI to a vCPU that does not exist is counted apart | EOI, a well-formed IPI to a vCPU that exists, `VIC_ID` |
//! | timer | counted by the device model (bad offset, width, direction; rearms of 0 and clamped ones) | every rearm, trigger and cancel |
//! | control | a bad offset or width; a PET request without sampling | an 8-byte fault or panic report (ends the VM) |
//! | no device | every port or MMIO access that hits no device (counted by the bus) | |

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metronome_abi::{mmio, port, FaultReport, PanicReport};
use vm_memory::{Bytes, GuestAddress};

use vm_superio::{Serial, Trigger};

use crate::bus::{Bus, BusDevice, BusError};
use crate::vm::{VmExit, VmShared};

/// Length of a banked or control MMIO page.
const MMIO_PAGE: u64 = 0x1000;
/// The longest panic message read from the guest.
const MAX_PANIC_MESSAGE: u64 = 512;

/// Reads a 64-bit little-endian value from a bus access; `None` for any width but 8.
fn value64(data: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(data.try_into().ok()?))
}

/// The UART's interrupt line is not wired: output is synchronous and the guest
/// never waits for an interrupt.
#[derive(Debug)]
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// Every refused guest access to a device, by kind: one place, shared by
/// the device adapters and the buses (relaxed atomics: each is a count,
/// read only for the summary and metrics).
#[derive(Debug, Default)]
pub struct DeviceErrors {
    /// Interrupt-controller accesses refused (bad offset, width or value).
    pub vic_bad_accesses: AtomicU64,
    /// Well-formed IPIs to a vCPU that does not exist.
    pub ipis_to_absent_vcpus: AtomicU64,
    /// Control-page writes refused (bad offset or width, a PET request
    /// without sampling).
    pub control_bad_writes: AtomicU64,
    /// COM1 writes refused: to LSR or MSR, or wider than a byte to a
    /// register other than THR.
    pub uart_bad_accesses: AtomicU64,
    /// Debug-exit writes refused: to ports 0xf5-0xf7, or narrower than 4 bytes.
    pub debug_exit_bad_accesses: AtomicU64,
    /// MMIO accesses that hit no device (the MMIO bus's misses).
    pub unmapped_mmio: Arc<AtomicU64>,
    /// Port accesses that hit no device (the port bus's misses).
    pub unmapped_pio: Arc<AtomicU64>,
}

impl DeviceErrors {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// COM1's read-only registers (16550): line status and modem status.
const UART_LSR: u64 = 5;
const UART_MSR: u64 = 6;

/// The COM1 console.
pub struct SerialDevice {
    serial: Mutex<Serial<NoIrq, vm_superio::serial::NoEvents, Box<dyn Write + Send>>>,
    errors: Arc<DeviceErrors>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialDevice")
    }
}

impl SerialDevice {
    /// A UART writing to `out`, counting refused writes in `errors`.
    pub fn new(out: Box<dyn Write + Send>, errors: Arc<DeviceErrors>) -> Self {
        Self {
            serial: Mutex::new(Serial::new(NoIrq, out)),
            errors,
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&self, _vcpu: u32, offset: u64, data: &mut [u8]) {
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        for byte in data.iter_mut() {
            *byte = serial.read(offset as u8);
        }
    }

    fn write(&self, _vcpu: u32, offset: u64, data: &[u8]) {
        // A `rep outsb` arrives as one access of many bytes to the same
        // register: THR (offset 0) takes them byte by byte; another register
        // takes one byte at a time, and LSR and MSR are read-only.
        if matches!(offset, UART_LSR | UART_MSR) || (data.len() > 1 && offset != 0) {
            DeviceErrors::count(&self.errors.uart_bad_accesses);
            return;
        }
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        for &byte in data {
            if let Err(e) = serial.write(offset as u8, byte) {
                log::warn!("console output failed: {e:?}");
                break;
            }
        }
    }
}

/// The debug-exit port: a 32-bit write to its first port ends the VM with
/// that status; any other write is refused and counted.
#[derive(Debug)]
pub struct DebugExitDevice {
    shared: Arc<VmShared>,
    errors: Arc<DeviceErrors>,
}

impl BusDevice for DebugExitDevice {
    fn read(&self, _vcpu: u32, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _vcpu: u32, offset: u64, data: &[u8]) {
        match (offset, <[u8; 4]>::try_from(data)) {
            (0, Ok(bytes)) => self.shared.request_exit(VmExit::Guest {
                code: u32::from_le_bytes(bytes),
            }),
            _ => DeviceErrors::count(&self.errors.debug_exit_bad_accesses),
        }
    }
}

/// The banked interrupt-controller page.
#[derive(Debug)]
pub struct VicPage {
    shared: Arc<VmShared>,
    errors: Arc<DeviceErrors>,
}

impl BusDevice for VicPage {
    fn read(&self, vcpu: u32, offset: u64, data: &mut [u8]) {
        let value = match offset {
            mmio::VIC_ID => u64::from(vcpu),
            _ => {
                DeviceErrors::count(&self.errors.vic_bad_accesses);
                0
            }
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&self, vcpu: u32, offset: u64, data: &[u8]) {
        let Some(value) = value64(data) else {
            DeviceErrors::count(&self.errors.vic_bad_accesses);
            return;
        };
        match offset {
            mmio::VIC_EOI => {
                self.shared.vcpus[vcpu as usize].lock().vic.eoi();
            }
            mmio::VIC_IPI => {
                let target = (value >> 32) as u32;
                let vector = value as u8;
                if (value >> 8) & 0xff_ffff != 0 || vector < 32 {
                    DeviceErrors::count(&self.errors.vic_bad_accesses);
                } else if self.shared.raise(target, vector).is_none() {
                    DeviceErrors::count(&self.errors.ipis_to_absent_vcpus);
                }
            }
            _ => DeviceErrors::count(&self.errors.vic_bad_accesses),
        }
    }
}

/// The banked timer page: each vCPU reaches its own `VirtualTimer`, the
/// device model of its one-shot timer.
#[derive(Debug)]
pub struct TimerPage(Arc<VmShared>);

impl BusDevice for TimerPage {
    fn read(&self, vcpu: u32, offset: u64, data: &mut [u8]) {
        // The vCPU's own thread reads: a host stop is told to the guest
        // (TIMER_RESUMES) before it sees the time after it.
        let now = self.0.vcpu_now(vcpu);
        let value = self.0.vcpus[vcpu as usize]
            .lock()
            .timer
            .mmio_read(now, offset)
            .unwrap_or(0);
        let bytes = value.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&self, vcpu: u32, offset: u64, data: &[u8]) {
        let now = self.0.now();
        let mut irq = self.0.vcpus[vcpu as usize].lock();
        match value64(data) {
            // Errors are counted by the device itself.
            Some(value) => {
                let _ = irq.timer.mmio_write(now, offset, value);
            }
            None => {
                let _ = irq.timer.mmio_write(now, u64::MAX, 0);
            }
        }
        // The vCPU thread reprograms its host timer at its next loop top.
    }
}

/// The control page: fault and panic reports, and lightweight PET's
/// self-sample requests (noted for the vCPU's next loop top, where
/// [`crate::sampling::VcpuSampler`] takes the sample).
#[derive(Debug)]
pub struct ControlPage {
    shared: Arc<VmShared>,
    errors: Arc<DeviceErrors>,
}

impl ControlPage {
    fn read_report<T: crate::guestmem::Plain>(&self, addr: u64) -> Option<T> {
        crate::guestmem::read_plain(&self.shared.mem, vm_memory::GuestAddress(addr))
    }
}

impl BusDevice for ControlPage {
    fn read(&self, _vcpu: u32, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, vcpu: u32, offset: u64, data: &[u8]) {
        let Some(addr) = value64(data) else {
            DeviceErrors::count(&self.errors.control_bad_writes);
            return;
        };
        match offset {
            mmio::CTL_FAULT => match self.read_report::<FaultReport>(addr) {
                Some(mut report) => {
                    report.vcpu = u64::from(vcpu);
                    self.shared.request_exit(VmExit::Fault(Box::new(report)));
                }
                None => self.shared.request_exit(VmExit::Emulation {
                    vcpu,
                    detail: format!("guest fault report at unreadable address {addr:#x}"),
                }),
            },
            mmio::CTL_PANIC => {
                let message = self
                    .read_report::<PanicReport>(addr)
                    .and_then(|r| {
                        let mut text = vec![0u8; r.message_len.min(MAX_PANIC_MESSAGE) as usize];
                        self.shared
                            .mem
                            .read_slice(&mut text, GuestAddress(r.message_addr))
                            .ok()?;
                        Some(String::from_utf8_lossy(&text).into_owned())
                    })
                    .unwrap_or_else(|| format!("(unreadable panic report at {addr:#x})"));
                self.shared.request_exit(VmExit::Panic { vcpu, message });
            }
            mmio::CTL_PET_SELF_SAMPLE => match (&self.shared.sampling, addr) {
                // The value is a thread id, checked and counted there.
                (Some(sampling), tid) => sampling.lightweight.request(vcpu, tid),
                (None, _) => DeviceErrors::count(&self.errors.control_bad_writes),
            },
            _ => DeviceErrors::count(&self.errors.control_bad_writes),
        }
    }
}

/// Places every device on the two buses.
#[derive(Debug)]
pub struct DeviceManager {
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// The refused accesses of every device and both buses.
    pub errors: Arc<DeviceErrors>,
}

impl DeviceManager {
    /// COM1: the standard first serial port.
    pub const COM1: u64 = port::COM1 as u64;
    /// COM1 spans eight registers.
    pub const COM1_LEN: u64 = 8;
    /// The debug-exit port (the isa-debug-exit convention).
    pub const DEBUG_EXIT: u64 = port::DEBUG_EXIT as u64;

    /// Builds the devices and their buses.
    pub fn new(shared: &Arc<VmShared>, console: Box<dyn Write + Send>) -> Result<Self, BusError> {
        let mut pio = Bus::new();
        let mut mmio_bus = Bus::new();
        let errors = Arc::new(DeviceErrors {
            unmapped_mmio: mmio_bus.miss_counter(),
            unmapped_pio: pio.miss_counter(),
            ..DeviceErrors::default()
        });
        pio.insert(
            "com1",
            Self::COM1,
            Self::COM1_LEN,
            Arc::new(SerialDevice::new(console, errors.clone())),
        )?;
        pio.insert(
            "debug-exit",
            Self::DEBUG_EXIT,
            4,
            Arc::new(DebugExitDevice {
                shared: shared.clone(),
                errors: errors.clone(),
            }),
        )?;
        let vic = Arc::new(VicPage {
            shared: shared.clone(),
            errors: errors.clone(),
        });
        let control = Arc::new(ControlPage {
            shared: shared.clone(),
            errors: errors.clone(),
        });
        mmio_bus.insert("vic", mmio::VIC_BASE, MMIO_PAGE, vic)?;
        mmio_bus.insert(
            "timer",
            mmio::TIMER_BASE,
            MMIO_PAGE,
            Arc::new(TimerPage(shared.clone())),
        )?;
        mmio_bus.insert("control", mmio::CTL_BASE, MMIO_PAGE, control)?;
        Ok(Self {
            pio,
            mmio: mmio_bus,
            errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metronome_abi::layout;
    use vm_memory::GuestMemoryMmap;

    /// Captures what the guest writes to the console.
    #[derive(Clone, Default)]
    struct Console(Arc<Mutex<Vec<u8>>>);

    impl Write for Console {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Two vCPUs, no sampling, the devices on their buses.
    fn devices() -> (Arc<VmShared>, DeviceManager, Console) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let shared = Arc::new(VmShared::new(mem, 2, None).unwrap());
        let console = Console::default();
        let devices = DeviceManager::new(&shared, Box::new(console.clone())).unwrap();
        (shared, devices, console)
    }

    fn count(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    #[test]
    fn test_vic_counts_bad_accesses_and_ipis_to_absent_vcpus_apart() {
        let (shared, d, _) = devices();
        let ipi = mmio::VIC_BASE + mmio::VIC_IPI;
        let well_formed = |target: u64| (target << 32 | 0xe0u64).to_le_bytes();
        assert!(d.mmio.write(0, ipi, &well_formed(1)));
        assert_eq!(shared.vcpus[1].lock().vic.deliverable(), Some(0xe0));
        for target in [2, 1000, u64::from(u32::MAX)] {
            assert!(d.mmio.write(0, ipi, &well_formed(target)));
        }
        assert!(d.mmio.write(0, ipi, &(1u64 << 32 | 0x1e0).to_le_bytes()));
        assert!(d.mmio.write(0, ipi, &(1u64 << 32 | 0x10).to_le_bytes()));
        assert!(d.mmio.write(0, ipi, &[0xe0, 0, 0, 0]));
        assert!(d.mmio.write(0, mmio::VIC_BASE + 0x18, &[0; 8]));
        let mut data = [0u8; 2];
        assert!(d.mmio.read(1, mmio::VIC_BASE + 0x7ff, &mut data));
        assert!(d.mmio.read(1, mmio::VIC_BASE + mmio::VIC_ID, &mut data));
        assert_eq!(data, [1, 0]);
        assert_eq!(count(&d.errors.ipis_to_absent_vcpus), 3);
        assert_eq!(count(&d.errors.vic_bad_accesses), 5);
    }

    #[test]
    fn test_debug_exit_takes_only_a_four_byte_write_to_its_first_port() {
        let (shared, d, _) = devices();
        for (port, data) in [(0xf4, &[7u8][..]), (0xf4, &[7, 0]), (0xf5, &[7, 0, 0])] {
            assert!(d.pio.write(0, port, data));
        }
        assert!(
            !d.pio.write(0, 0xf6, &[7, 0, 0, 0]),
            "past the device: a miss"
        );
        assert_eq!(count(&d.errors.debug_exit_bad_accesses), 3);
        assert_eq!(count(&d.errors.unmapped_pio), 1);
        assert!(shared.exit_reason().is_none(), "nothing ended the VM");
        assert!(d.pio.write(0, 0xf4, &[7, 0, 0, 0]));
        assert!(matches!(
            shared.exit_reason(),
            Some(VmExit::Guest { code: 7 })
        ));
    }

    #[test]
    fn test_uart_refuses_read_only_registers_and_wide_writes_off_thr() {
        let (_, d, console) = devices();
        let com1 = DeviceManager::COM1;
        assert!(d.pio.write(0, com1, b"hello"), "rep outsb to THR");
        assert!(d.pio.write(0, com1 + UART_LSR, &[0xff]));
        assert!(d.pio.write(0, com1 + UART_MSR, &[0xff]));
        assert!(d.pio.write(0, com1 + 3, &[0x80, 0]), "a wide write to LCR");
        assert!(d.pio.write(0, com1 + 7, &[0x55]), "the scratch register");
        assert_eq!(count(&d.errors.uart_bad_accesses), 3);
        assert!(d.pio.write(0, com1, b"!"), "DLAB is still clear");
        assert_eq!(console.0.lock().unwrap().as_slice(), b"hello!");
    }

    #[test]
    fn test_control_refuses_bad_widths_offsets_and_pet_requests_without_sampling() {
        let (shared, d, _) = devices();
        let ctl = mmio::CTL_BASE;
        assert!(d.mmio.write(0, ctl + mmio::CTL_FAULT, &[0x10, 0, 0, 0]));
        assert!(d.mmio.write(0, ctl + mmio::CTL_PANIC, &[0x10]));
        assert!(d.mmio.write(0, ctl + 0x18, &[0; 8]));
        assert!(d.mmio.write(
            0,
            ctl + mmio::CTL_PET_SELF_SAMPLE,
            &[1, 0, 0, 0, 0, 0, 0, 0]
        ));
        assert_eq!(count(&d.errors.control_bad_writes), 4);
        assert!(shared.exit_reason().is_none());
    }

    #[test]
    fn test_timer_page_clamps_extreme_rearms_and_counts_bad_widths() {
        let (shared, d, _) = devices();
        let rearm = mmio::TIMER_BASE + mmio::TIMER_REARM_NS;
        let now = shared.now();
        assert!(d.mmio.write(1, rearm, &u64::MAX.to_le_bytes()));
        let deadline = shared.vcpus[1].lock().timer.next_deadline().unwrap();
        assert!(deadline >= now + mmio::TIMER_MAX_NS);
        assert!(deadline <= shared.now() + mmio::TIMER_MAX_NS);
        assert!(d.mmio.write(1, rearm, &[1, 0, 0, 0]));
        assert!(d.mmio.write(1, rearm, &0u64.to_le_bytes()));
        let c = shared.vcpus[1].lock().timer.counters();
        assert_eq!((c.clamped, c.bad_accesses, c.rearm_zero), (1, 1, 1));
        assert_eq!(shared.vcpus[0].lock().timer.counters().rearms, 0, "banked");
    }

    #[test]
    fn test_unmapped_mmio_is_counted_once_per_access() {
        let (_, d, _) = devices();
        let mut data = [0u8; 8];
        assert!(!d.mmio.write(1, layout::MMIO_BASE + 0x3000, &[1; 4]));
        assert!(!d.mmio.read(1, layout::MMIO_BASE + 0x1f_fff8, &mut data));
        assert!(
            !d.mmio.write(1, mmio::CTL_BASE + 0xffc, &[1; 8]),
            "straddles the end"
        );
        assert_eq!(data, [0xff; 8]);
        assert_eq!(count(&d.errors.unmapped_mmio), 3);
        assert_eq!(count(&d.errors.unmapped_pio), 0);
    }
}
