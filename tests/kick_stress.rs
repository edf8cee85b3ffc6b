//! Kick correctness under stress: the VMM sends a stress interrupt to every
//! vCPU and kicks every vCPU at 10 kHz while the guest runs threads, halts and
//! takes timer interrupts. Every interrupt sent must be delivered exactly once:
//! the VMM's sent and injected counts and the guest handler's count agree.

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::{kvm_or_skip, run_ok, u};

#[test]
fn test_kicks_at_10khz_deliver_every_interrupt_exactly_once() {
    if !kvm_or_skip("kick_stress") {
        return;
    }
    let r = run_ok(&[
        "--vcpus",
        "2",
        "--duration",
        "3",
        "--kick-stress-hz",
        "10000",
        "--timeout",
        "120",
    ]);
    let mut total = 0;
    for v in r.vcpus() {
        let s = &v["stress"];
        let sent = u(s, "sent");
        assert!(sent > 100, "too few stress interrupts sent: {v}");
        assert_eq!(u(s, "injected"), sent, "injected != sent: {v}");
        assert_eq!(u(s, "guest_received"), sent, "guest count != sent: {v}");
        assert!(u(v, "kicks") >= sent, "every round kicks: {v}");
        assert!(u(v, "halts") > 0, "the vCPU should also have halted: {v}");
        total += sent;
    }
    assert!(total > 0);
}
