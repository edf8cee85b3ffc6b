//! Sampling signals do not wake the threads that wait for SIGINT/SIGTERM or
//! for API requests. Simulates a profiling session at 10 kHz on one vCPU and
//! counts the context switches (`voluntary_ctxt_switches` +
//! `nonvoluntary_ctxt_switches` in `/proc/<pid>/task/<tid>/status`) of the
//! main thread (the command line's event loop), the API and VMM threads
//! (`--api-sock`) and the signal thread, over a run with sampling and a run
//! without. A signalfd anywhere in the process would wake its waiter for every
//! kick and timer signal, about one switch per sample; the threads must
//! instead switch about as often as without sampling.

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::api::Server;
use common::{kvm_lock, kvm_or_skip, metronome, scratch};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// The sampling period of the sampled runs: 10 kHz.
const SAMPLE_PERIOD_US: &str = "100";

/// Guest seconds per run.
const DURATION_S: &str = "3";

/// Context switches by thread name, of the threads named in `names`.
fn switches(pid: u32, names: &[&str]) -> Option<BTreeMap<String, u64>> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir = entry.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        let name = comm.trim();
        if !names.contains(&name) {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).ok()?;
        let total: u64 = status
            .lines()
            .filter(|l| l.starts_with("voluntary_ctxt_switches") || l.starts_with("nonvoluntary"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        found.insert(name.to_owned(), total);
    }
    Some(found)
}

/// Polls the threads' counts every few ms until `done` holds (or the
/// process is gone); returns the last complete reading.
fn count_until(pid: u32, names: &[&str], mut done: impl FnMut() -> bool) -> BTreeMap<String, u64> {
    let start = Instant::now();
    let mut last = BTreeMap::new();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "run never ended"
        );
        match switches(pid, names) {
            Some(now) if now.len() >= last.len() => last = now,
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    last
}

fn exited(child: &mut Child) -> bool {
    child.try_wait().expect("try_wait").is_some()
}

fn summary(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("summary")).expect("JSON")
}

/// One command-line run: the threads' switches until the guest exits, and
/// the samples taken.
fn cli_run(sampled: bool) -> (BTreeMap<String, u64>, u64) {
    let summary_path = scratch("summary.json");
    let mut command = metronome();
    command
        .args(["run", "--vcpus", "1", "--workload", "demo"])
        .args(["--duration", DURATION_S, "--timeout", "120"])
        .args(["--quiet", "--console", "/dev/null", "--summary-json"])
        .arg(&summary_path);
    if sampled {
        command.args(["--sample-period-us", SAMPLE_PERIOD_US]);
    }
    let mut child = command.spawn().expect("spawn metronome");
    let pid = child.id();
    let counts = count_until(pid, &["metronome", "metronome-sig"], || exited(&mut child));
    let json = summary(&summary_path);
    assert_eq!(json["exit_code"], 0, "{json}");
    let samples = json["sampling"]["samples"].as_u64().unwrap_or(0);
    (counts, samples)
}

/// One run through the API: configured on the command line, started with
/// InstanceStart; the threads' switches until the VM has ended (its summary
/// written), and the samples.
fn api_run(sampled: bool) -> (BTreeMap<String, u64>, u64) {
    let summary_path = scratch("summary.json");
    let mut extra = vec![
        "--vcpus",
        "1",
        "--workload",
        "demo",
        "--duration",
        DURATION_S,
    ];
    extra.extend(["--summary-json", summary_path.to_str().unwrap()]);
    if sampled {
        extra.extend(["--sample-period-us", SAMPLE_PERIOD_US]);
    }
    let server = Server::start(&extra);
    let pid = server.child.id();
    assert_eq!(server.action("InstanceStart").0, 204);
    let names = ["metronome-api", "metronome-vmm", "metronome-sig"];
    let counts = count_until(pid, &names, || summary_path.exists());
    let json = summary(&summary_path);
    assert_eq!(server.terminate(), 0);
    assert_eq!(json["exit_code"], 0, "{json}");
    let samples = json["sampling"]["samples"].as_u64().unwrap_or(0);
    (counts, samples)
}

/// Each thread's switches with sampling stay within a small fraction of
/// the samples above its switches without.
fn assert_not_woken_per_sample(
    mode: &str,
    base: &BTreeMap<String, u64>,
    sampled: &BTreeMap<String, u64>,
    samples: u64,
    threads: &[&str],
) {
    eprintln!("{mode}: {samples} samples; switches without sampling {base:?}, with {sampled:?}");
    // At 10 kHz for 3 s a run takes thousands of samples even on a slow host.
    assert!(samples >= 2000, "{mode}: too few samples: {samples}");
    for &thread in threads {
        let (Some(&b), Some(&s)) = (base.get(thread), sampled.get(thread)) else {
            panic!("{mode}: thread {thread} not found: {base:?} {sampled:?}");
        };
        // One wake-up per sample was the signalfd's defect; a noisy host
        // adds some switches, never one per 20 samples.
        assert!(
            s <= b + samples / 20,
            "{mode}: {thread} switched {s} times with {samples} samples, {b} without"
        );
    }
}

#[test]
fn test_sampling_does_not_wake_the_main_thread() {
    if !kvm_or_skip("wake-ups, command line") {
        return;
    }
    let _serial = kvm_lock();
    let (base, _) = cli_run(false);
    let (sampled, samples) = cli_run(true);
    assert_not_woken_per_sample("run", &base, &sampled, samples, &["metronome"]);
    // The signal thread, where there is one, is not woken either.
    if base.contains_key("metronome-sig") {
        assert_not_woken_per_sample("run", &base, &sampled, samples, &["metronome-sig"]);
    }
}

#[test]
fn test_sampling_does_not_wake_the_api_and_vmm_threads() {
    if !kvm_or_skip("wake-ups, API") {
        return;
    }
    let _serial = kvm_lock();
    let (base, _) = api_run(false);
    let (sampled, samples) = api_run(true);
    let threads = ["metronome-api", "metronome-vmm"];
    assert_not_woken_per_sample("api", &base, &sampled, samples, &threads);
    if base.contains_key("metronome-sig") {
        assert_not_woken_per_sample("api", &base, &sampled, samples, &["metronome-sig"]);
    }
}
