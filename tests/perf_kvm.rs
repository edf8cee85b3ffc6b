//! The profiler against an independent reference on the same guest run:
//! `perf kvm --guest record -e cpu-clock` samples the guest's instruction
//! pointer from the host kernel while Metronome samples it with its kptimer.
//! On kvm_pvm perf sees guest user mode only (guest CPL0 is emulated in host
//! mode), so both sides are compared over CPL3 samples: the shares of the top
//! functions by instruction pointer must agree within 5 points.

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::{kvm_or_skip, scratch};
use std::collections::BTreeMap;
use std::process::Command;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

#[test]
fn test_top_functions_agree_with_perf_kvm_guest() {
    if !kvm_or_skip("perf kvm") {
        return;
    }
    if Command::new("perf").arg("--version").output().is_err() {
        assert!(
            !in_ci(),
            "CI=true but perf is missing (apt-get install linux-perf)"
        );
        eprintln!("skip: perf is not installed");
        return;
    }
    let _serial = common::kvm_lock();
    let data = scratch("perf.data.guest");
    let summary_path = scratch("summary.json");
    let status = Command::new("perf")
        .args([
            "kvm",
            "--guest",
            "record",
            "-e",
            "cpu-clock",
            "-F",
            "1000",
            "-o",
        ])
        .arg(&data)
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_metronome"))
        .args([
            "run",
            "--workload",
            "profile",
            "--vcpus",
            "2",
            "--duration",
            "3",
        ])
        .args([
            "--sample-period-us",
            "1000",
            "--quiet",
            "--console",
            "/dev/null",
            "--timeout",
            "120",
        ])
        .arg("--summary-json")
        .arg(&summary_path)
        .status()
        .expect("run perf");
    if !status.success() && !summary_path.exists() {
        assert!(!in_ci(), "perf kvm record failed under CI: {status:?}");
        eprintln!("skip: perf kvm record is not permitted here ({status:?})");
        return;
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    assert_eq!(summary["exit_code"], 0, "{summary}");

    let report = Command::new("perf")
        .args(["kvm", "--guest", "report", "--stdio", "--sort", "sym", "-i"])
        .arg(&data)
        .output()
        .expect("perf kvm report");
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let symbolizer = vmm::profile::Symbolizer::new(metronome_resources::GUEST_KERNEL).unwrap();
    let mut perf_shares: BTreeMap<String, f64> = BTreeMap::new();
    let mut perf_total = 0.0;
    for line in String::from_utf8_lossy(&report.stdout).lines() {
        // "    20.74%  [u] 0x00000000002032a6"
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != 3 || fields[1] != "[u]" {
            continue;
        }
        let percent: f64 = fields[0].trim_end_matches('%').parse().unwrap();
        let addr = u64::from_str_radix(fields[2].trim_start_matches("0x"), 16).unwrap();
        let name = symbolizer
            .function_name(addr)
            .map_or_else(|| format!("{addr:#x}"), str::to_string);
        *perf_shares.entry(name).or_default() += percent;
        perf_total += percent;
    }
    assert!(
        perf_total > 50.0,
        "perf saw too few guest user samples: {perf_total}%"
    );
    let ours: BTreeMap<String, f64> = summary["sampling"]["user_functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["function"].as_str().unwrap().to_string(),
                f["percent"].as_f64().unwrap(),
            )
        })
        .collect();
    let mut compared = 0;
    for (function, &our_percent) in ours.iter().filter(|(_, &p)| p >= 5.0) {
        let theirs = 100.0 * perf_shares.get(function).copied().unwrap_or(0.0) / perf_total;
        assert!(
            (our_percent - theirs).abs() <= 5.0,
            "{function}: Metronome {our_percent:.1}% vs perf kvm {theirs:.1}%"
        );
        compared += 1;
    }
    assert!(
        compared >= 3,
        "the designed leaves should all be top functions: {ours:?}"
    );
}
