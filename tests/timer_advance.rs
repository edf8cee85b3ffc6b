//! Timer advance on real KVM guests: each vCPU arms its host timer early by
//! the wake latency it learns, waits for the deadline and injects at it. A
//! run with advance delivers nothing before its deadline and keeps the
//! advance within its bounds; `--no-timer-advance` arms at the deadline
//! itself. How much advance lowers the lateness is the bench's to measure
//! (`metronome bench`: `timer.busy` against `timer.without_advance.busy`),
//! not a test's: the figures depend on this machine's load.

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::{kvm_or_skip, run_ok, u};

/// The largest advance, ns (`vmm::vcpu::advance::ADVANCE_MAX_NS`).
const ADVANCE_MAX_NS: u64 = 50_000;

/// Two vCPUs with a 1 kHz randomized statclock: about 2,000 timer
/// deliveries each in 2 s of guest time, most while the guest runs (far
/// fewer when the machine is loaded: the guest catches up in batches, so
/// the checks ask for more than 50).
fn timer_run(extra: &[&str]) -> common::Run {
    let mut args = vec![
        "--vcpus",
        "2",
        "--duration",
        "2",
        "--stathz",
        "1000",
        "--timeout",
        "120",
    ];
    args.extend_from_slice(extra);
    run_ok(&args)
}

/// Checks that vCPU `v` delivered its timer interrupts and none before its
/// deadline; returns its `timer.advance`.
fn delivered_on_time(v: &serde_json::Value) -> &serde_json::Value {
    let timer = &v["timer"];
    assert!(u(timer, "injections") > 50, "{timer}");
    assert_eq!(u(timer, "early_injections"), 0, "never before: {timer}");
    &timer["advance"]
}

#[test]
fn test_advance_never_injects_early_and_stays_within_its_bounds() {
    if !kvm_or_skip("timer advance") {
        return;
    }
    let r = timer_run(&[]);
    for v in r.vcpus() {
        let advance = delivered_on_time(v);
        assert_eq!(advance["enabled"], true, "on by default: {advance}");
        for path in ["running_advance_ns", "halted_advance_ns"] {
            assert!(u(advance, path) <= ADVANCE_MAX_NS, "{path}: {advance}");
        }
        // The vCPU learned from its wakes, and each wake is early or late
        // (or on the nanosecond).
        let wakes = u(advance, "wakes");
        assert!(wakes > 0, "{advance}");
        assert!(
            u(advance, "early_wakes") + u(advance, "late_wakes") <= wakes,
            "{advance}"
        );
        assert!(u(advance, "ignored_wakes") <= wakes, "{advance}");
        // Each wait is counted with its time (a wait lasts at least 1 ns:
        // it begins before the deadline and ends at or after it).
        let (waits, waited) = (u(advance, "running_waits"), u(advance, "running_wait_ns"));
        assert_eq!(waits == 0, waited == 0, "{advance}");
        // The guest measured its interrupts' lateness from their entry.
        assert!(u(&v["guest_lateness_ns"], "count") > 50, "{v}");
    }
    assert_eq!(
        u(&r.vcpus()[0]["clockintr"], "early"),
        0,
        "the bootstrap vCPU has no early dispatch"
    );
}

#[test]
fn test_no_timer_advance_arms_at_the_deadline() {
    if !kvm_or_skip("--no-timer-advance") {
        return;
    }
    let r = timer_run(&["--no-timer-advance"]);
    for v in r.vcpus() {
        let advance = delivered_on_time(v);
        assert_eq!(advance["enabled"], false, "{advance}");
        for key in [
            "running_advance_ns",
            "halted_advance_ns",
            "wakes",
            "running_waits",
            "running_wait_ns",
            "halted_waits",
            "halted_wait_ns",
        ] {
            assert_eq!(u(advance, key), 0, "{key}: {advance}");
        }
    }
}
