//! The hostile guest (issue 11, part 3): `--workload chaos` on two vCPUs for
//! 60 s of guest time, sampled at 10 kHz (the kick tier, user and kernel
//! stacks) with traditional PET at its 2 ms floor (CFG-T-3: a PET timer
//! cannot run faster). vCPU 1 misuses every device register, unmapped MMIO
//! and ports, IPIs, the timer, interrupt masking, its frame pointers and the
//! thread table the whole time; vCPU 0 runs the demo threads. The VMM must
//! end the run normally (exit 0, no panic), count every kind of
//! misbehaviour in `guest_errors`, and keep vCPU 0's clock at hz.

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;

use common::{assert_refused, kvm_or_skip, run, u};

/// Guest seconds of the long run: the acceptance asks for 60.
const SECONDS: u64 = 60;
/// The hardclock frequency of the run.
const HZ: u64 = 100;

#[test]
fn test_chaos_runs_60_s_sampled_and_the_well_behaved_vcpu_keeps_its_clock() {
    if !kvm_or_skip("test_chaos_runs_60_s_sampled_and_the_well_behaved_vcpu_keeps_its_clock") {
        return;
    }
    let seconds = SECONDS.to_string();
    let r = run(&[
        "--workload",
        "chaos",
        "--vcpus",
        "2",
        "--duration",
        &seconds,
        "--timeout",
        "300",
        "--hz",
        "100",
        "--stat-seed",
        "7",
        "--sample-period-us",
        "100",
        "--pet-period-ms",
        "2",
        "--samplers",
        "th_info,ustack,kstack",
    ]);
    let s = &r.summary;
    assert_eq!(r.code(), 0, "stderr: {}\nsummary: {s}", r.stderr());
    assert_eq!(s["outcome"], "guest_exit", "{s}");
    assert!(!r.stderr().contains("panic"), "{}", r.stderr());

    // Every kind the chaos thread exercises was contained and counted.
    let errors = &s["guest_errors"];
    eprintln!("guest_errors after {SECONDS} s of chaos: {errors:#}");
    let kinds = [
        "vic_bad_accesses",
        "ipis_to_absent_vcpus",
        "timer_bad_accesses",
        "timer_rearms_zero",
        "timer_rearms_clamped",
        "control_bad_writes",
        "uart_bad_accesses",
        "debug_exit_bad_accesses",
        "unmapped_mmio",
        "unmapped_pio",
        "walk_errors",
        "corrupt_thread_entries",
    ];
    for kind in kinds {
        assert!(u(errors, kind) > 0, "no {kind} counted: {errors}");
    }
    let sum: u64 = errors
        .as_object()
        .expect("guest_errors object")
        .iter()
        .filter(|(k, _)| *k != "total")
        .map(|(_, v)| v.as_u64().expect("a count"))
        .sum();
    assert_eq!(u(errors, "total"), sum, "{errors}");

    // The chaos went on to the end: every chaos vCPU still acted in the
    // last tenth of the run.
    let reports = &s["reports"];
    assert!(u(reports, "chaos_actions") > 0, "{reports}");
    let alive = u(reports, "chaos_alive_ns");
    assert!(
        alive >= SECONDS * 900_000_000,
        "the chaos stopped at {alive} ns of {SECONDS} s: {reports}"
    );

    // Sampling and PET ran the whole time.
    let sampling = &s["sampling"];
    assert!(u(sampling, "samples") > 0, "{sampling}");
    assert!(u(sampling, "pet_passes") > 0, "{sampling}");

    // vCPU 0 is well-behaved: none of the misbehaviour is its, and its
    // hardclock kept hz within 1 % over the run.
    let vcpus = r.vcpus();
    let well_behaved = &vcpus[0];
    assert_eq!(u(well_behaved, "bus_misses"), 0, "{well_behaved}");
    assert_eq!(u(&well_behaved["timer"], "bad_accesses"), 0);
    assert_eq!(u(&well_behaved["timer"], "clamped"), 0);
    let uptime_s = u(s, "guest_uptime_ns") as f64 / 1e9;
    let rate = u(well_behaved, "hardclock") as f64 / uptime_s;
    eprintln!(
        "hardclock rate: vCPU 0 {rate:.2} Hz; chaos vCPU 1 {:.2} Hz (hz {HZ})",
        u(&vcpus[1], "hardclock") as f64 / uptime_s
    );
    assert!(
        (rate / HZ as f64 - 1.0).abs() <= 0.01,
        "vCPU 0's hardclock ran at {rate:.2} Hz, not within 1 % of {HZ}"
    );
    assert!(u(&vcpus[1], "bus_misses") > 0, "the chaos vCPU's misses");
}

#[test]
fn test_chaos_needs_a_well_behaved_vcpu() {
    assert_refused(
        &["--workload", "chaos", "--vcpus", "1"],
        "--workload chaos needs at least 2 vCPUs",
    );
}
