//! SIGTERM and SIGINT stop a running VM cleanly: exit code 5, a summary, and
//! every vCPU thread joined (the process exits).

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::{kvm_or_skip, metronome, scratch};
use std::time::{Duration, Instant};

fn stop_with(signal: &str) {
    if !kvm_or_skip("signals") {
        return;
    }
    let console = scratch("console.txt");
    let summary = scratch("summary.json");
    let mut child = metronome()
        .args([
            "run",
            "--vcpus",
            "2",
            "--duration",
            "600",
            "--quiet",
            "--console",
        ])
        .arg(&console)
        .arg("--summary-json")
        .arg(&summary)
        .spawn()
        .expect("spawn metronome");
    // Wait until the guest is demonstrably running user threads.
    let start = Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("spinner on vCPU 1 started")
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "guest never started"
        );
        std::thread::yield_now();
    }
    let status = std::process::Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(5), "{signal}: exit status {status:?}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(json["outcome"], "signal");
    assert_eq!(json["vcpus"].as_array().unwrap().len(), 2);
}

#[test]
fn test_sigterm_stops_the_vm_cleanly() {
    stop_with("-TERM");
}

#[test]
fn test_sigint_stops_the_vm_cleanly() {
    stop_with("-INT");
}
