//! Guest misbehaviour ends the VM with a clear report, never a hang: a CPL3
//! thread that dereferences an unmapped address, and a vCPU spinning at CPL0
//! with interrupts off (ended by the host-side --timeout).

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
