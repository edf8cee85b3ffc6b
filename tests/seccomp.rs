//! The seccomp filters on a real VMM: for each kind of thread, the test-only
//! `METRONOME_TEST_SECCOMP_VIOLATION=KIND` makes that thread call `getpgid`
//! just after installing its filter, and the VMM must end with exit code 7
//! and the line naming the thread and the call. `--no-seccomp` lets the
//! same call through (and says so). The allowed paths are the rest of the
//! suite, which runs with the filters on (the default).

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{kvm_lock, kvm_or_skip, metronome, scratch};

const VIOLATION: &str = "METRONOME_TEST_SECCOMP_VIOLATION";
/// metronome_abi::exit::VMM_SECCOMP.
const EXIT_SECCOMP: i32 = 7;

/// The line the SIGSYS handler writes for `thread`'s `getpgid`.
fn message(thread: &str) -> String {
    format!("metronome: seccomp: thread '{thread}' made the forbidden system call getpgid (121)")
}

/// Waits (at most 60 s) for `child` to exit, killing it after that.
fn wait(mut child: Child) -> Output {
    let start = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("wait")
}

/// Spawns `command` with the violation in `kind`, stderr captured.
fn spawn(mut command: Command, kind: &str) -> Child {
    command
        .env(VIOLATION, kind)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn metronome")
}

/// The process must have exited 7 with `thread`'s message on stderr.
fn assert_exit(output: &Output, kind: &str, thread: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(EXIT_SECCOMP),
        "{kind}: status {:?}, stderr: {stderr}",
        output.status
    );
    assert!(
        stderr.lines().any(|l| l == message(thread)),
        "{kind}: expected {:?} in stderr: {stderr}",
        message(thread)
    );
}

/// `metronome run` on one vCPU with `extra`, the violation in `kind`.
fn violation_in_run(kind: &str, thread: &str, extra: &[&str]) {
    if !kvm_or_skip(&format!("seccomp {kind}")) {
        return;
    }
    let _serial = kvm_lock();
    let mut command = metronome();
    command
        .args(["run", "--vcpus", "1", "--duration", "2", "--timeout", "60"])
        .args(["--quiet", "--console", "/dev/null"])
        .args(extra);
    assert_exit(&wait(spawn(command, kind)), kind, thread);
}

#[test]
fn test_vcpu_filter_ends_the_vmm() {
    violation_in_run("vcpu", "vcpu0", &[]);
}

#[test]
fn test_vmm_filter_ends_the_vmm_on_the_command_line() {
    // The main thread is the VMM thread on the command line.
    violation_in_run("vmm", "metronome", &[]);
}

#[test]
fn test_signal_filter_ends_the_vmm() {
    violation_in_run("signal", "metronome-sig", &[]);
}

#[test]
fn test_stress_filter_ends_the_vmm() {
    violation_in_run("stress", "kick-stress", &["--kick-stress-hz", "100"]);
}

#[test]
fn test_pet_filter_ends_the_vmm() {
    // The kernel's comm keeps 15 bytes of "kperf-pet-sampling".
    violation_in_run(
        "pet",
        "kperf-pet-sampl",
        &["--sample-period-us", "1000", "--pet-period-ms", "10"],
    );
}

#[test]
fn test_perf_reader_filter_ends_the_vmm() {
    violation_in_run(
        "perf-reader",
        "perf-reader",
        &["--sample-period-us", "1000", "--sample-tier", "no-exit"],
    );
}

/// `metronome --api-sock` on a fresh socket (returned too).
fn api_command() -> (Command, std::path::PathBuf) {
    let socket = scratch("seccomp.sock");
    let mut command = metronome();
    command
        .arg("--api-sock")
        .arg(&socket)
        .args(["--quiet", "--console", "/dev/null"]);
    (command, socket)
}

#[test]
fn test_api_filter_ends_the_vmm() {
    let (command, _socket) = api_command();
    assert_exit(&wait(spawn(command, "api")), "api", "metronome-api");
}

#[test]
fn test_main_filter_ends_the_vmm_in_api_mode() {
    let (command, _socket) = api_command();
    assert_exit(&wait(spawn(command, "main")), "main", "metronome");
}

#[test]
fn test_vmm_thread_filter_ends_the_vmm_in_api_mode() {
    if !kvm_or_skip("seccomp vmm thread") {
        return;
    }
    let _serial = kvm_lock();
    let (command, socket) = api_command();
    let child = spawn(command, "vmm");
    let start = Instant::now();
    while !socket.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The VMM thread installs its filter once the VM runs, before it
    // answers: the request's own answer may be lost with the process.
    let _ = common::api::call_text(
        &socket,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_exit(&wait(child), "vmm", "metronome-vmm");
}

#[test]
fn test_no_seccomp_lets_the_call_through_and_warns() {
    if !kvm_or_skip("seccomp off") {
        return;
    }
    let _serial = kvm_lock();
    let output = metronome()
        .args([
            "run",
            "--vcpus",
            "1",
            "--duration",
            "0.5",
            "--timeout",
            "60",
        ])
        .args(["--quiet", "--console", "/dev/null", "--no-seccomp"])
        .env(VIOLATION, "vcpu")
        .output()
        .expect("run metronome");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.starts_with("metronome: warning: --no-seccomp: NO SECCOMP FILTERS"),
        "{stderr}"
    );
    assert!(!stderr.contains("seccomp: thread"), "{stderr}");
}

#[test]
fn test_an_unknown_violation_kind_is_refused() {
    let output = metronome()
        .args(["run", "--duration", "0.5"])
        .env(VIOLATION, "gpu")
        .output()
        .expect("run metronome");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("METRONOME_TEST_SECCOMP_VIOLATION=\"gpu\" names no thread kind"),
        "{stderr}"
    );
}
