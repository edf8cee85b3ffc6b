//! Boots the real guest kernel under KVM on 1, 2 and 4 vCPUs and checks that
//! every vCPU ran user threads and switched between them, driven by its own
//! timer interrupts.

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::{kvm_or_skip, run_ok, u};

fn boot_and_check(vcpus: u32) {
    if !kvm_or_skip(&format!("boot_{vcpus}_vcpus")) {
        return;
    }
    let n = vcpus.to_string();
    let r = run_ok(&["--vcpus", &n, "--duration", "1", "--timeout", "120"]);
    assert_eq!(r.summary["outcome"], "guest_exit");
    assert_eq!(r.summary["guest_exit_code"], 0);
    assert!(
        u(&r.summary, "guest_uptime_ns") >= 1_000_000_000,
        "{}",
        r.summary
    );
    assert!(u(&r.summary, "host_wall_ns") > 0);
    assert_eq!(r.vcpus().len(), vcpus as usize);
    // The guest kernel uses its devices correctly: nothing had to be contained.
    let errors = &r.summary["guest_errors"];
    assert_eq!(u(errors, "vic_bad_accesses"), 0, "{errors}");
    assert_eq!(u(errors, "control_bad_writes"), 0, "{errors}");
    assert_eq!(u(errors, "spurious_eois"), 0, "{errors}");
    for (i, v) in r.vcpus().iter().enumerate() {
        assert_eq!(u(v, "id"), i as u64);
        assert!(
            u(v, "user_threads_run") > 0,
            "vCPU {i} ran no user thread: {v}"
        );
        assert!(u(v, "context_switches") > 0, "vCPU {i} never switched: {v}");
        assert!(
            u(v, "interrupts_injected") > 0,
            "vCPU {i} took no interrupt: {v}"
        );
        assert!(v["exits"].as_object().is_some_and(|e| !e.is_empty()), "{v}");
        assert_eq!(u(&v["timer"], "bad_accesses"), 0, "{v}");
        assert_eq!(u(v, "bus_misses"), 0, "{v}");
        assert!(u(&v["timer"], "injections") > 0, "{v}");
    }
    assert!(
        r.console.contains("spinner on vCPU 0 started"),
        "console: {}",
        r.console
    );
}

#[test]
fn test_boot_1_vcpu_runs_user_threads() {
    boot_and_check(1);
}

#[test]
fn test_boot_2_vcpus_runs_user_threads() {
    boot_and_check(2);
}

#[test]
fn test_boot_4_vcpus_runs_user_threads() {
    boot_and_check(4);
}
