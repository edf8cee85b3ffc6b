//! IPIs between vCPUs: vCPU 0 plays ping-pong with every other vCPU for a fixed
//! number of round trips; the guest's counts and the VMM's injection counts
//! must agree exactly.

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::{kvm_or_skip, run_ok, u};

fn pingpong(vcpus: u32, rounds: u64) {
    if !kvm_or_skip("pingpong") {
        return;
    }
    let r = run_ok(&[
        "--vcpus",
        &vcpus.to_string(),
        "--workload",
        "pingpong",
        "--rounds",
        &rounds.to_string(),
        "--timeout",
        "120",
    ]);
    let partners = u64::from(vcpus - 1);
    assert_eq!(
        u(&r.summary["reports"], "pingpong_rounds"),
        rounds * partners
    );
    let v = r.vcpus();
    // vCPU 0 received one pong per round trip.
    assert_eq!(u(&v[0], "ipis_received"), rounds * partners, "{}", v[0]);
    assert_eq!(u(&v[0]["guest"], "ipis_received"), rounds * partners);
    assert_eq!(u(&v[0]["guest"], "pingpong"), rounds * partners);
    // Every partner received exactly `rounds` pings and answered each.
    for p in &v[1..] {
        assert_eq!(u(p, "ipis_received"), rounds, "{p}");
        assert_eq!(u(&p["guest"], "ipis_received"), rounds, "{p}");
        assert_eq!(u(&p["guest"], "pingpong"), rounds, "{p}");
    }
}

#[test]
fn test_pingpong_2_vcpus_completes_round_trips() {
    pingpong(2, 500);
}

#[test]
fn test_pingpong_4_vcpus_completes_round_trips() {
    pingpong(4, 200);
}
