//! Guest misbehaviour ends the VM with a clear report, never a hang: a CPL3
//! thread that dereferences an unmapped address, and a vCPU spinning at CPL0
//! with interrupts off (ended by the host-side --timeout). The host side
//! survives faults too: a vCPU thread that dies.

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::{kvm_or_skip, run, u};

#[test]
fn test_guest_page_fault_is_reported_with_vector_and_rip() {
    if !kvm_or_skip("guest_page_fault") {
        return;
    }
    let r = run(&["--vcpus", "2", "--workload", "fault", "--timeout", "120"]);
    assert_eq!(r.code(), 3, "stderr: {}", r.stderr());
    assert_eq!(r.summary["outcome"], "fault");
    let stderr = r.stderr();
    assert!(stderr.contains("#PF page fault (vector 14)"), "{stderr}");
    assert!(stderr.contains("RIP 0x"), "{stderr}");
    assert!(stderr.contains("CR2 0x7f0000000000"), "{stderr}");
    assert!(stderr.contains("at CPL3"), "{stderr}");
    assert!(stderr.contains("vCPU 0"), "{stderr}");
    // The error line names the faulting RIP inside the kernel image.
    let rip = stderr
        .split("RIP 0x")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_hexdigit()).next());
    let rip = u64::from_str_radix(rip.expect("rip"), 16).expect("hex rip");
    assert!(
        (0x20_0000..0x100_0000).contains(&rip),
        "RIP {rip:#x} outside the kernel"
    );
}

#[test]
fn test_cpl0_spin_with_interrupts_off_is_ended_by_timeout() {
    if !kvm_or_skip("cpl0_spin_timeout") {
        return;
    }
    let r = run(&["--vcpus", "2", "--workload", "spin-cpl0", "--timeout", "2"]);
    assert_eq!(r.code(), 4, "stderr: {}", r.stderr());
    assert_eq!(r.summary["outcome"], "timeout");
    let stderr = r.stderr();
    assert!(
        stderr.contains("timeout: the guest did not exit within 2.000 s"),
        "{stderr}"
    );
    assert!(
        stderr.contains("vCPU 0 was at RIP 0x") && stderr.contains("CPL0, interrupts off"),
        "{stderr}"
    );
    assert!(
        u(&r.summary, "host_wall_ns") < 60_000_000_000,
        "the timeout must end the run promptly"
    );
}

/// A vCPU thread that dies (a panic, here asked for by the hidden test-only
/// `METRONOME_TEST_PANIC_VCPU`) ends the VM with a report naming it, and the
/// other threads' data is still collected and written: the summary, the
/// other vCPU's figures, the profile.
#[test]
fn test_a_dying_vcpu_thread_ends_the_vm_with_a_report() {
    if !kvm_or_skip("a dying vCPU thread") {
        return;
    }
    let _serial = common::kvm_lock();
    let dir = common::scratch("died");
    let summary_path = dir.join("summary.json");
    let output = common::metronome()
        .env("METRONOME_TEST_PANIC_VCPU", "1")
        .args([
            "run",
            "--vcpus",
            "2",
            "--workload",
            "profile",
            "--duration",
            "5",
        ])
        .args([
            "--sample-period-us",
            "1000",
            "--console",
            "/dev/null",
            "--quiet",
        ])
        .arg("--profile-dir")
        .arg(&dir)
        .arg("--summary-json")
        .arg(&summary_path)
        .output()
        .expect("run metronome");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(6), "{stderr}");
    assert!(
        stderr.contains("metronome: error: host error: vCPU 1: its thread died"),
        "{stderr}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    assert_eq!(summary["outcome"], "host_error");
    assert!(summary["vcpus"][0]["timer"]["injections"].as_u64() > Some(0));
    assert!(summary["sampling"]["samples"].as_u64() > Some(0));
    let folded = std::fs::read_to_string(dir.join("profile.folded")).expect("the profile");
    assert!(folded.lines().count() > 0);
}
