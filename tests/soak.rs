//! The soak script (`tests/soak/soak.sh`) for 60 s, as CI runs it: 10 kHz
//! on-CPU sampling and PET every 10 ms on the profile workload, booted from
//! a `--config-file` with the API polled every second; resident memory must
//! stay within 8 MiB of its value at 30 s, and samples and timer
//! deliveries keep growing. The full soak is the same script for an hour
//! (README: Measured).

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::{kvm_lock, kvm_or_skip, scratch};
use std::process::Command;

#[test]
fn test_soak_script_for_60_s_keeps_memory_flat() {
    if !kvm_or_skip("soak 60 s") {
        return;
    }
    let _serial = kvm_lock();
    let csv = scratch("soak.csv");
    let output = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/soak/soak.sh"))
        .args(["60", "8", "30"])
        .env("METRONOME", env!("CARGO_BIN_EXE_metronome"))
        .env("OUT", &csv)
        .output()
        .expect("run tests/soak/soak.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "soak.sh failed: {:?}\n{stdout}\n{stderr}",
        output.status
    );
    // A poll a second: the CSV has the run, its samples and deliveries.
    let rows = std::fs::read_to_string(&csv).expect("the soak CSV");
    assert!(rows.lines().count() > 25, "too few polls:\n{rows}");
    assert!(stdout.contains("growth"), "{stdout}");
}
