//! Output files are whole or absent, never truncated (issue 11: faults
//! survived, nothing lost): a run writing its profiles and trace is killed
//! (SIGKILL or SIGTERM) the moment its first output file shows up
//! and a few moments after, and every file left under its final name is
//! complete: the folded stacks parse line by line, the SVG parses as XML to
//! its end, the gzipped pprof inflates with a good CRC, the trace is JSON.
//! A profile directory the VMM cannot write (a file-size limit standing in
//! for a full disk) is a clear error, not a panic, and leaves no partial file.
//! SIGTERM and SIGINT while a sampled run boots or samples leave whole files
//! or none, and a signal while sampling writes them all. A run started with
//! SIGINT ignored keeps ignoring it and stops on SIGTERM.

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::{kvm_lock, kvm_or_skip, metronome, scratch, start_with_sigint};
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A run that samples at 10 kHz for 1 s and writes its profiles and trace
/// into `dir` (a few MB: the writing takes a while).
fn writer(dir: &Path) -> Child {
    metronome()
        .args([
            "run",
            "--workload",
            "profile",
            "--vcpus",
            "2",
            "--duration",
            "1",
        ])
        .args([
            "--sample-period-us",
            "100",
            "--console",
            "/dev/null",
            "--quiet",
        ])
        .arg("--profile-dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn metronome")
}

/// The files of `dir` a reader sees (hidden temporary files aside).
fn visible(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with('.'))
        .collect();
    names.sort();
    names
}

/// Panics unless `path` holds a complete file of its kind.
fn assert_complete(path: &Path) {
    let bytes = std::fs::read(path).expect("read an output file");
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    if name.ends_with(".folded") {
        let text = String::from_utf8(bytes).expect("UTF-8 folded stacks");
        assert!(text.ends_with('\n'), "{name} is cut short");
        for line in text.lines() {
            let (_, count) = line.rsplit_once(' ').expect("a stack and a count");
            count
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("{name}: bad line {line:?}"));
        }
    } else if name.ends_with(".svg") {
        let mut reader = quick_xml::Reader::from_reader(&bytes[..]);
        let mut buf = Vec::new();
        let mut depth = 0i64;
        loop {
            match reader.read_event_into(&mut buf) {
                Ok(quick_xml::events::Event::Start(_)) => depth += 1,
                Ok(quick_xml::events::Event::End(_)) => depth -= 1,
                Ok(quick_xml::events::Event::Eof) => break,
                Ok(_) => {}
                Err(e) => panic!("{name} is not whole XML: {e}"),
            }
            buf.clear();
        }
        assert_eq!(depth, 0, "{name} ends with open elements");
    } else if name.ends_with(".pb.gz") {
        let mut inflated = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut inflated)
            .unwrap_or_else(|e| panic!("{name} does not inflate whole: {e}"));
        assert!(!inflated.is_empty(), "{name} is empty");
    } else if name.ends_with(".json") {
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .unwrap_or_else(|e| panic!("{name} is not whole JSON: {e}"));
    } else {
        panic!("an unexpected output file {name}");
    }
}

/// Waits (polling, 60 s at most) until `dir` shows its first output file.
fn first_output(dir: &Path, child: &mut Child) {
    let start = Instant::now();
    while visible(dir).is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before writing"
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no output file appeared"
        );
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

#[test]
fn test_a_kill_or_sigterm_while_writing_leaves_whole_files_or_none() {
    if !kvm_or_skip("kill while writing") {
        return;
    }
    let _serial = kvm_lock();
    // Once the VM has ended SIGTERM takes its default action again (so that
    // a stuck shutdown can be interrupted): both signals end the writing.
    for signal_name in ["KILL", "TERM"] {
        let mut cut_short = 0;
        for after_ms in [0, 1, 5, 20, 60] {
            let dir = scratch("killed");
            let mut child = writer(&dir);
            first_output(&dir, &mut child);
            std::thread::sleep(Duration::from_millis(after_ms));
            signal(&child, signal_name);
            child.wait().unwrap();
            let files = visible(&dir);
            for name in &files {
                assert_complete(&dir.join(name));
            }
            // A file still being written when the signal came is left under
            // its temporary name only.
            if files.len() < 4 {
                cut_short += 1;
            }
        }
        assert!(
            cut_short > 0,
            "no SIG{signal_name} landed before the last file was written"
        );
    }
}

#[test]
fn test_an_unwritable_profile_is_a_clear_error_not_a_panic() {
    if !kvm_or_skip("full profile dir") {
        return;
    }
    let _serial = kvm_lock();
    let dir = scratch("full");
    // A 64 KiB file-size limit (SIGXFSZ ignored, so writes fail with
    // EFBIG) stands in for a disk that fills up part-way through a file.
    let script = format!(
        "ulimit -f 64; trap '' XFSZ; exec {} run --workload profile --vcpus 2 --duration 1 \
         --sample-period-us 100 --console /dev/null --quiet --profile-dir {}",
        env!("CARGO_BIN_EXE_metronome"),
        dir.display()
    );
    let output = Command::new("bash").args(["-c", &script]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("warning: cannot write the trace to") && stderr.contains("File too large"),
        "{stderr}"
    );
    for name in visible(&dir) {
        assert_complete(&dir.join(name));
    }
    assert!(
        !dir.join("trace.json").exists(),
        "a trace larger than the limit cannot be whole"
    );
}

/// A sampled run of the demo workload at 10 kHz into `dir`, its console in
/// `console`, for 600 s: it ends only when signalled. It starts with SIGINT
/// ignored if `sigint_ignored`, else with its default action ([`metronome`]).
fn long_sampled_run(dir: &Path, console: &Path, sigint_ignored: bool) -> Child {
    let mut command = metronome();
    command
        .args(["run", "--vcpus", "2", "--duration", "600"])
        .args(["--sample-period-us", "100", "--pet-period-ms", "10"])
        .arg("--quiet")
        .arg("--console")
        .arg(console)
        .arg("--profile-dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if sigint_ignored {
        start_with_sigint(&mut command, libc::SIG_IGN);
    }
    command.spawn().expect("spawn metronome")
}

/// [`long_sampled_run`], once its guest runs its user threads (and so is
/// being sampled). A run that never gets there is killed, not left running
/// for its 600 s, and the test fails.
fn sampling_run(dir: &Path, console: &Path, sigint_ignored: bool) -> Child {
    let mut child = long_sampled_run(dir, console, sigint_ignored);
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        guest_running(console, &mut child)
    }));
    if let Err(panic) = started {
        let _ = child.kill();
        let _ = child.wait();
        std::panic::resume_unwind(panic);
    }
    child
}

/// Waits (polling, 60 s at most) until the guest shows on `console` that it
/// runs its user threads, and so is being sampled.
fn guest_running(console: &Path, child: &mut Child) {
    let start = Instant::now();
    while !std::fs::read_to_string(console)
        .unwrap_or_default()
        .contains("spinner on vCPU 1 started")
    {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the guest never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits for `child` and returns its exit status and standard error.
fn finish(child: Child) -> (std::process::ExitStatus, String) {
    let output = child.wait_with_output().expect("wait for metronome");
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// SIGTERM or SIGINT at any moment of a sampled run with PET (issue 11):
/// while it boots (from the moment it is spawned, so also before its signal
/// handling is set up) and while the guest is being sampled. Every file left
/// under its final name is complete, never a panic; a signal while sampling
/// stops the run cleanly (exit 5) with both profiles and the trace written
/// whole.
#[test]
fn test_sigterm_or_sigint_while_booting_or_sampling_leaves_whole_files_or_none() {
    if !kvm_or_skip("signals while booting or sampling") {
        return;
    }
    let _serial = kvm_lock();
    for signal_name in ["TERM", "INT"] {
        let number = if signal_name == "TERM" { 15 } else { 2 };
        // Booting: the signal comes before the guest runs, or as it starts.
        for after_ms in [0, 2, 10, 40] {
            let dir = scratch("signal-boot");
            let console = dir.join("console.txt");
            std::fs::create_dir_all(&dir).unwrap();
            let profile = dir.join("profile");
            let child = long_sampled_run(&profile, &console, false);
            std::thread::sleep(Duration::from_millis(after_ms));
            signal(&child, signal_name);
            let (status, stderr) = finish(child);
            assert!(
                status.code() == Some(5) || status.signal() == Some(number),
                "SIG{signal_name} after {after_ms} ms: {status:?}\n{stderr}"
            );
            assert!(!stderr.contains("panicked"), "{stderr}");
            for name in visible(&profile) {
                assert_complete(&profile.join(name));
            }
        }
        // Sampling: a clean stop, with everything written.
        let dir = scratch("signal-sampling");
        std::fs::create_dir_all(&dir).unwrap();
        let console = dir.join("console.txt");
        let profile = dir.join("profile");
        let child = sampling_run(&profile, &console, false);
        signal(&child, signal_name);
        let (status, stderr) = finish(child);
        assert_eq!(status.code(), Some(5), "SIG{signal_name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        let files = visible(&profile);
        for name in [
            "pet.folded",
            "pet.pb.gz",
            "pet.svg",
            "profile.folded",
            "profile.pb.gz",
            "profile.svg",
            "trace.json",
        ] {
            assert!(
                files.iter().any(|f| f == name),
                "SIG{signal_name} while sampling: no {name} in {files:?}"
            );
        }
        for name in files {
            assert_complete(&profile.join(name));
        }
    }
}

#[test]
fn test_a_run_started_with_sigint_ignored_keeps_ignoring_it_and_stops_on_sigterm() {
    if !kvm_or_skip("SIGINT ignored on entry") {
        return;
    }
    let _serial = kvm_lock();
    let dir = scratch("sigint-ignored");
    std::fs::create_dir_all(&dir).unwrap();
    let console = dir.join("console.txt");
    let profile = dir.join("profile");
    let child = sampling_run(&profile, &console, true);
    // SIGINT first: were it a stop signal, it would be the one the run
    // reports (it is pending, or taken, before SIGTERM is sent).
    signal(&child, "INT");
    signal(&child, "TERM");
    let (status, stderr) = finish(child);
    assert_eq!(status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("stopped by signal 15"), "{stderr}");
    assert!(
        visible(&profile).iter().any(|f| f == "profile.folded"),
        "a clean stop writes the profiles"
    );
}
