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
//! Guest accesses with a bad width, offset or value are ignored and counted;
//! they never stop the VMM (the guest is untrusted).

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

/// The COM1 console.
pub struct SerialDevice(Mutex<Serial<NoIrq, vm_superio::serial::NoEvents, Box<dyn Write + Send>>>);

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialDevice")
    }
}

impl SerialDevice {
    /// A UART writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self(Mutex::new(Serial::new(NoIrq, out)))
    }
}

impl BusDevice for SerialDevice {
    fn read(&self, _vcpu: u32, offset: u64, data: &mut [u8]) {
        let mut serial = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for byte in data.iter_mut() {
            *byte = serial.read(offset as u8);
        }
    }

    fn write(&self, _vcpu: u32, offset: u64, data: &[u8]) {
        // A `rep outsb` arrives as one access of many bytes to the same register.
        let mut serial = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for &byte in data {
            if let Err(e) = serial.write(offset as u8, byte) {
                log::warn!("console output failed: {e:?}");
                break;
            }
        }
    }
}

/// The debug-exit port: a 32-bit write ends the VM with that status.
#[derive(Debug)]
pub struct DebugExitDevice(Arc<VmShared>);

impl BusDevice for DebugExitDevice {
    fn read(&self, _vcpu: u32, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _vcpu: u32, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        if offset == 0 {
            self.0.request_exit(VmExit::Guest {
                code: u32::from_le_bytes(bytes),
            });
        }
    }
}

/// The banked interrupt-controller page.
#[derive(Debug)]
pub struct VicPage {
    shared: Arc<VmShared>,
    /// Accesses with a bad width, offset or value.
    pub bad_accesses: AtomicU64,
}

impl BusDevice for VicPage {
    fn read(&self, vcpu: u32, offset: u64, data: &mut [u8]) {
        let value = match offset {
            mmio::VIC_ID => u64::from(vcpu),
            _ => {
                self.bad_accesses.fetch_add(1, Ordering::Relaxed);
                0
            }
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&self, vcpu: u32, offset: u64, data: &[u8]) {
        let Some(value) = value64(data) else {
            self.bad_accesses.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match offset {
            mmio::VIC_EOI => {
                self.shared.vcpus[vcpu as usize].lock().vic.eoi();
            }
            mmio::VIC_IPI => {
                let target = (value >> 32) as u32;
                let vector = value as u8;
                let ok = (value >> 8) & 0xff_ffff == 0 && vector >= 32;
                if !ok || self.shared.raise(target, vector).is_none() {
                    self.bad_accesses.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {
                self.bad_accesses.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The banked timer page: each vCPU reaches its own `VirtualTimer`, the
/// device model of its one-shot timer.
#[derive(Debug)]
pub struct TimerPage(Arc<VmShared>);

impl BusDevice for TimerPage {
    fn read(&self, vcpu: u32, offset: u64, data: &mut [u8]) {
        let now = self.0.now();
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
    /// Reports that could not be read.
    pub bad_reports: AtomicU64,
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
            self.bad_reports.fetch_add(1, Ordering::Relaxed);
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
                (None, _) => {
                    self.bad_reports.fetch_add(1, Ordering::Relaxed);
                }
            },
            _ => {
                self.bad_reports.fetch_add(1, Ordering::Relaxed);
            }
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
    /// The interrupt controller (kept for its counters).
    pub vic: Arc<VicPage>,
    /// The control page (kept for its counters).
    pub control: Arc<ControlPage>,
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
        pio.insert(
            "com1",
            Self::COM1,
            Self::COM1_LEN,
            Arc::new(SerialDevice::new(console)),
        )?;
        pio.insert(
            "debug-exit",
            Self::DEBUG_EXIT,
            4,
            Arc::new(DebugExitDevice(shared.clone())),
        )?;
        let vic = Arc::new(VicPage {
            shared: shared.clone(),
            bad_accesses: AtomicU64::new(0),
        });
        let control = Arc::new(ControlPage {
            shared: shared.clone(),
            bad_reports: AtomicU64::new(0),
        });
        mmio_bus.insert("vic", mmio::VIC_BASE, MMIO_PAGE, vic.clone())?;
        mmio_bus.insert(
            "timer",
            mmio::TIMER_BASE,
            MMIO_PAGE,
            Arc::new(TimerPage(shared.clone())),
        )?;
        mmio_bus.insert("control", mmio::CTL_BASE, MMIO_PAGE, control.clone())?;
        Ok(Self {
            pio,
            mmio: mmio_bus,
            vic,
            control,
        })
    }
}
