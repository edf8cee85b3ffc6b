//! `metronome --config-file FILE [--no-api]`: the pre-boot API bodies in one
//! file, booted at once without a socket. The committed example
//! (`resources/metronome-config.json`) runs the profile workload with
//! sampling on and gives what the API session gives: the configured
//! machine, clock and kperf configuration in the summary, samples, and a
//! profile naming the workload's functions. Every bad file (missing, not
//! JSON, unknown key, wrong type, bad value, a kperf rule) and every bad
//! flag combination exits 2 with one line saying what was wrong and what is
//! allowed.

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::{kvm_lock, kvm_or_skip, metronome, scratch};
use std::path::PathBuf;

/// The committed example configuration.
fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("resources/metronome-config.json")
}

#[test]
fn test_config_file_session_without_the_socket() {
    if !kvm_or_skip("config file session") {
        return;
    }
    let _serial = kvm_lock();
    let dir = scratch("profile");
    let summary_path = scratch("summary.json");
    let output = metronome()
        .arg("--config-file")
        .arg(example())
        .arg("--no-api")
        .arg("--profile-dir")
        .arg(&dir)
        .arg("--summary-json")
        .arg(&summary_path)
        .args(["--console", "/dev/null", "--quiet", "--timeout", "120"])
        .output()
        .expect("run metronome");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary_path).expect("summary"))
            .expect("summary is JSON");
    // The file's sections, in force.
    assert_eq!(summary["outcome"], "guest_exit", "{summary}");
    assert_eq!(summary["vcpu_count"], 2);
    assert_eq!(summary["mem_mib"], 128);
    assert_eq!(summary["workload"], "profile");
    assert_eq!(summary["config"]["hz"], 100);
    assert_eq!(summary["config"]["profhz"], 1000);
    let guest_s = summary["guest_uptime_ns"].as_u64().unwrap() as f64 / 1e9;
    assert!(
        (2.0..10.0).contains(&guest_s),
        "duration_s 2 ends the guest: {guest_s} s"
    );
    // Sampling was on from boot with the file's kperf configuration.
    let sampling = &summary["sampling"];
    assert_eq!(sampling["config"]["timers"][0]["period_ns"], 1_000_000);
    assert!(sampling["samples"].as_u64() > Some(100), "{sampling}");
    // The profile names the workload's leaf functions.
    let folded = std::fs::read_to_string(dir.join("profile.folded")).expect("profile.folded");
    for leaf in ["leaf_sixty", "leaf_thirty", "leaf_ten"] {
        assert!(folded.contains(leaf), "{leaf} missing from the profile");
    }
    assert!(dir.join("profile.pb.gz").exists());
}

/// Runs `metronome ARGS` where no VM should start; the exit code and stderr.
fn refused(args: &[&str]) -> (Option<i32>, String) {
    let output = metronome().args(args).output().expect("run metronome");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A config file with `text` in the scratch directory.
fn file(text: &str) -> String {
    let path = scratch("config.json");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn test_bad_config_files_exit_2_with_one_line() {
    let missing = scratch("missing.json");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![missing.to_str().unwrap().into()],
            "cannot read the --config-file",
        ),
        (
            vec![file("{\"clock\": {\"hz\": 100}")],
            "is not a configuration: a JSON object with the optional keys \"machine-config\", \
             \"boot-source\", \"clock\" and \"kperf\"",
        ),
        (vec![file("not json")], "expected ident at line 1 column 2"),
        (
            vec![file(r#"{"machine": {"vcpu_count": 1, "mem_size_mib": 64}}"#)],
            "unknown field `machine`, expected one of `machine-config`, `boot-source`, `clock`, `kperf`",
        ),
        (
            vec![file(r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "x": 1}}"#)],
            "unknown field `x`, expected `vcpu_count` or `mem_size_mib`",
        ),
        (
            vec![file(r#"{"clock": {"hz": "fast"}}"#)],
            "invalid type: string \"fast\", expected u32",
        ),
        (
            vec![file(r#"{"machine-config": {"vcpu_count": 65, "mem_size_mib": 64}}"#)],
            "is refused: vcpu_count 65 is out of range: a VM has 1 to 64 vCPUs",
        ),
        (
            vec![file(r#"{"boot-source": {"duration_s": 0}}"#)],
            "is refused: duration_s 0 is out of range",
        ),
        (
            vec![file(r#"{"clock": {"hz": 100, "profhz": 150}}"#)],
            "profhz 150 is not a multiple of stathz 100",
        ),
        (
            vec![file(
                r#"{"kperf": {"action_count": 1, "timer_count": 1,
                     "timers": [{"id": 0, "period_ns": 1000000, "action_id": 3}]}}"#,
            )],
            "timer 0: action_id 3 is beyond action_count (1)",
        ),
        (
            vec![file(
                r#"{"kperf": {"action_count": 1, "timer_count": 0,
                     "actions": [{"id": 1, "samplers": ["th_dispatch"]}]}}"#,
            )],
            "action 1: sampler th_dispatch is refused",
        ),
        (
            vec![file(r#"{"kperf": {"action_count": 1, "timer_count": 0, "period": 1}}"#)],
            "unknown field `period`",
        ),
        // A flag setting what a section of the file sets: both named.
        (
            vec![file(r#"{"clock": {"hz": 100}}"#), "--hz".into(), "64".into()],
            "--hz and the --config-file's \"clock\" section both set the clock configuration",
        ),
        (
            vec![
                file(r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}"#),
                "--vcpus".into(),
                "1".into(),
            ],
            "--vcpus and the --config-file's \"machine-config\" section",
        ),
        (
            vec![
                file(r#"{"kperf": {"action_count": 1, "timer_count": 0}}"#),
                "--sample-period-us".into(),
                "100".into(),
            ],
            "--sample-period-us and the --config-file's \"kperf\" section",
        ),
        (
            vec![file("{}"), "--profile-dir".into(), "/tmp/x".into()],
            "--profile-dir and --trace need sampling",
        ),
    ];
    for (args, expected) in cases {
        let mut all = vec!["--config-file".to_owned()];
        all.extend(args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let (code, stderr) = refused(&all);
        assert_eq!(code, Some(2), "{all:?}: {stderr}");
        assert!(stderr.contains(expected), "{all:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{all:?}: {stderr}");
    }
}

#[test]
fn test_no_api_needs_a_config_file_and_refuses_the_socket() {
    let (code, stderr) = refused(&["--no-api"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--config-file <FILE>"), "{stderr}");
    let socket = scratch("never.sock");
    let config = example();
    let (code, stderr) = refused(&[
        "--config-file",
        config.to_str().unwrap(),
        "--no-api",
        "--api-sock",
        socket.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("'--no-api' cannot be used with '--api-sock <PATH>'"),
        "{stderr}"
    );
    assert!(!socket.exists());
}
