//! Shared helpers for the integration tests: they run the real `metronome`
//! binary as a child process (so every test gets a fresh process and KVM
//! resources are always released) and read its summary JSON.

#![allow(dead_code)]

pub mod api;
pub mod openapi_check;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// Whether KVM tests can run. Without /dev/kvm they are skipped with a printed
/// reason, except under `CI=true`, where a missing /dev/kvm fails the test.
pub fn kvm_or_skip(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{test}: /dev/kvm is not usable, and CI=true requires the KVM tests to run");
        }
        eprintln!("SKIPPED {test}: /dev/kvm is not available on this machine");
    }
    ok
}

/// A fresh path in a per-test-process scratch directory.
///
/// The directory is named after the process id, which the kernel reuses: a
/// long test run (or an earlier one) can leave a directory of that name with
/// files of the same names in it, and a test waiting for its run's summary
/// to appear would find the old one at once. So the first call in a process
/// empties it.
pub fn scratch(name: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("metronome-tests-{}", std::process::id()));
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                panic!("stale scratch dir {}: {e}", dir.display())
            }
            _ => {}
        }
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    });
    dir.join(format!("{}-{name}", NEXT.fetch_add(1, Ordering::Relaxed)))
}

/// The `metronome` command. It starts with SIGINT's default action whatever
/// the test's own: a test run as a background job of a non-interactive shell
/// has SIGINT ignored, its children inherit that, and the VMM keeps an
/// inherited ignore (so tests that stop it with SIGINT would wait forever).
pub fn metronome() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_metronome"));
    command.env_remove("RUST_LOG");
    start_with_sigint(&mut command, libc::SIG_DFL);
    command
}

/// Makes `command`'s child start with `disposition` (`SIG_DFL` or `SIG_IGN`)
/// for SIGINT; a later call wins.
pub fn start_with_sigint(command: &mut Command, disposition: libc::sighandler_t) {
    // SAFETY: signal() is async-signal-safe, so it may run between fork and
    // exec; it touches nothing but the child's disposition of SIGINT.
    unsafe {
        command.pre_exec(move || {
            if libc::signal(libc::SIGINT, disposition) == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Result of a run with a summary.
pub struct Run {
    pub output: Output,
    pub summary: serde_json::Value,
    pub console: String,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.output
            .status
            .code()
            .expect("exited, not killed by a signal")
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    pub fn vcpus(&self) -> &Vec<serde_json::Value> {
        self.summary["vcpus"].as_array().expect("vcpus array")
    }
}

/// Serialises the VMs of one test binary: the machines have 2 cores, and the
/// timing statistics some tests check assume the guest is not competing with
/// several other guests. (Test binaries themselves run one after another.)
pub fn kvm_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `metronome run ARGS --summary-json F --console C --quiet` and parses the summary.
pub fn run(args: &[&str]) -> Run {
    let _serial = kvm_lock();
    let summary_path = scratch("summary.json");
    let console_path = scratch("console.txt");
    let output = metronome()
        .arg("run")
        .args(args)
        .arg("--summary-json")
        .arg(&summary_path)
        .arg("--console")
        .arg(&console_path)
        .arg("--quiet")
        .output()
        .expect("run metronome");
    let text = std::fs::read_to_string(&summary_path).unwrap_or_else(|e| {
        panic!(
            "no summary written ({e}); status {:?}; stderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let summary = serde_json::from_str(&text).expect("summary is JSON");
    let console = std::fs::read_to_string(&console_path).unwrap_or_default();
    Run {
        output,
        summary,
        console,
    }
}

/// Like [`run`], and the run must succeed (exit code 0).
pub fn run_ok(args: &[&str]) -> Run {
    let r = run(args);
    assert_eq!(
        r.code(),
        0,
        "args {args:?}\nstderr: {}\nsummary: {}",
        r.stderr(),
        r.summary
    );
    r
}

/// `--workload profile` on `vcpus` vCPUs for `seconds` of guest time (host
/// limit 120 s) with `extra` options; the run must succeed.
pub fn profile_run(vcpus: &str, seconds: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        "--workload",
        "profile",
        "--vcpus",
        vcpus,
        "--duration",
        seconds,
        "--timeout",
        "120",
    ];
    args.extend_from_slice(extra);
    run_ok(&args)
}

/// The records of a trace file written with `--trace` (JSON lines).
pub fn read_trace(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("trace file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

/// A u64 field of a JSON object.
pub fn u(value: &serde_json::Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("missing u64 field {key} in {value}"))
}

/// Whether `CI=true`: then the tools CI installs are required.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Runs `program args`, or returns `None` if `program` is not installed.
pub fn run_tool(program: &str, args: &[&str]) -> Option<Output> {
    match Command::new(program).args(args).output() {
        Ok(output) => Some(output),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

/// `metronome run ARGS` exits 2 with one line of stderr containing `needle`.
pub fn assert_refused(args: &[&str], needle: &str) {
    let out = metronome().arg("run").args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: expected '{needle}' in {stderr}"
    );
}
