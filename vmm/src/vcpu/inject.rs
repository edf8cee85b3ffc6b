//! Interrupt delivery at a guest entry, without an in-kernel irqchip.
//!
//! The decision is made under the vCPU's irq lock ([`prepare_entry`]: poll the
//! timer device, pick the vector, acknowledge and count it) and the system
//! calls it implies (`timer_settime`, `KVM_INTERRUPT`) are made after the lock
//! is released, so an IPI sender never waits behind them.

use kvm_bindings::kvm_interrupt;
use kvm_ioctls::VcpuFd;
use metronome_abi::Vector;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::vm::shared::IrqState;

/// kvm-ioctls has no wrapper for KVM_INTERRUPT (used without an in-kernel irqchip).
mod ioctls {
    #![allow(missing_docs)]
    use super::*;
    const KVMIO: u32 = 0xAE;
    ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
}

/// What one guest entry delivers, decided under the irq lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The timer device's next deadline, device time (the POSIX timer's target).
    pub timer_deadline: Option<u64>,
    /// The vector to inject with `KVM_INTERRUPT` (already acknowledged).
    pub inject: Option<u8>,
    /// Ask KVM for an exit as soon as the guest can take an interrupt.
    pub request_window: bool,
}

/// Polls the timer device at `now` and decides what this entry delivers:
/// the highest deliverable vector if the guest can take it (`guest_ready`:
/// `ready_for_interrupt_injection` and IF), otherwise an interrupt-window
/// request while one is pending.
pub fn prepare_entry(irq: &mut IrqState, now: u64, guest_ready: bool) -> Entry {
    irq.poll_timer(now);
    let timer_deadline = irq.timer.next_deadline();
    let Some(vector) = irq.vic.deliverable() else {
        return Entry {
            timer_deadline,
            inject: None,
            request_window: false,
        };
    };
    if !guest_ready {
        return Entry {
            timer_deadline,
            inject: None,
            request_window: true,
        };
    }
    irq.vic.acknowledge(vector);
    match vector {
        v if v == Vector::Timer as u8 => {
            irq.injected.timer += 1;
            irq.timer.note_injection(now);
        }
        v if v == Vector::Ipi as u8 => irq.injected.ipi += 1,
        v if v == Vector::Stress as u8 => irq.injected.stress += 1,
        _ => irq.injected.other += 1,
    }
    Entry {
        timer_deadline,
        inject: Some(vector),
        request_window: irq.vic.deliverable().is_some(),
    }
}

/// `KVM_INTERRUPT`: queues `vector` for injection at the next `KVM_RUN`.
///
/// [`prepare_entry`] has already acknowledged and counted the vector; if this
/// fails the VM ends with a host error, so the count is never relied upon.
pub fn kvm_interrupt(fd: &VcpuFd, vector: u8) -> Result<(), errno::Error> {
    let request = kvm_interrupt {
        irq: u32::from(vector),
    };
    // SAFETY: KVM_INTERRUPT on our own vCPU fd with a valid kvm_interrupt.
    let ret = unsafe { ioctl_with_ref(fd, ioctls::KVM_INTERRUPT(), &request) };
    if ret != 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_nothing_pending_asks_for_nothing() {
        let mut irq = IrqState::default();
        let entry = prepare_entry(&mut irq, 0, true);
        assert_eq!(
            entry,
            Entry {
                timer_deadline: None,
                inject: None,
                request_window: false
            }
        );
    }

    #[test]
    fn test_a_due_timer_is_injected_when_the_guest_is_ready() {
        let mut irq = IrqState::default();
        irq.timer.rearm(0, 100);
        // Not yet due: the deadline is passed on for the POSIX timer.
        assert_eq!(prepare_entry(&mut irq, 50, true).timer_deadline, Some(100));
        // Due, but the guest has interrupts off: wait for the window.
        let entry = prepare_entry(&mut irq, 120, false);
        assert_eq!((entry.inject, entry.request_window), (None, true));
        // Ready: injected once, acknowledged, counted with its lateness.
        let entry = prepare_entry(&mut irq, 130, true);
        assert_eq!(entry.inject, Some(Vector::Timer as u8));
        assert!(!entry.request_window);
        assert_eq!(irq.vic.in_service(), Some(Vector::Timer as u8));
        assert_eq!(irq.injected.timer, 1);
        assert_eq!(irq.timer.lateness().max(), 30);
        assert_eq!(prepare_entry(&mut irq, 140, true).inject, None);
    }

    #[test]
    fn test_priority_classes_decide_order_and_the_window() {
        let mut irq = IrqState::default();
        irq.vic.raise(Vector::Stress as u8);
        irq.vic.raise(Vector::Ipi as u8);
        // The IPI's class is higher: it goes first, and the stress vector is
        // masked while it is in service, so no window is asked for.
        let entry = prepare_entry(&mut irq, 0, true);
        assert_eq!(entry.inject, Some(Vector::Ipi as u8));
        assert!(!entry.request_window);
        assert_eq!(prepare_entry(&mut irq, 0, true).inject, None);
        // The IPI handler's EOI unmasks it.
        irq.vic.eoi();
        assert_eq!(
            prepare_entry(&mut irq, 0, true).inject,
            Some(Vector::Stress as u8)
        );
        // A timer expiry during the stress handler nests above it, and a
        // second IPI raised meanwhile keeps the window open behind it.
        irq.timer.trigger(5);
        irq.vic.raise(Vector::Ipi as u8);
        let entry = prepare_entry(&mut irq, 5, true);
        assert_eq!(entry.inject, Some(Vector::Timer as u8));
        assert!(!entry.request_window, "the IPI is masked by the timer");
        assert_eq!(
            (irq.injected.ipi, irq.injected.stress, irq.injected.timer),
            (1, 1, 1)
        );
    }
}
