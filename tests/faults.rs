//! Guest misbehaviour ends the VM with a clear report, never a hang: a CPL3
//! thread that dereferences an unmapped address, and a vCPU spinning at CPL0
//! with interrupts off (ended by the host-side --timeout). The host side
//! survives faults too: a vCPU thread that dies.

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

/// A vCPU thread that dies (a panic, here asked for by the hidden test-only
/// `METRONOME_TEST_PANIC_VCPU`) ends the VM with a report naming it, and the
/// other threads' data is still collected and written: the summary, the
/// other vCPU's figures, the profile.
#[test]
fn test_a_dying_vcpu_thread_ends_the_vm_with_a_report() {
    if !kvm_or_skip("a dying vCPU thread") {
        return;
    }
    let _serial = common::kvm_lock();
    let dir = common::scratch("died");
    let summary_path = dir.join("summary.json");
    let output = common::metronome()
        .env("METRONOME_TEST_PANIC_VCPU", "1")
        .args([
            "run",
            "--vcpus",
            "2",
            "--workload",
            "profile",
            "--duration",
            "5",
        ])
        .args([
            "--sample-period-us",
            "1000",
            "--console",
            "/dev/null",
            "--quiet",
        ])
        .arg("--profile-dir")
        .arg(&dir)
        .arg("--summary-json")
        .arg(&summary_path)
        .output()
        .expect("run metronome");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(6), "{stderr}");
    assert!(
        stderr.contains("metronome: error: host error: vCPU 1: its thread died"),
        "{stderr}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    assert_eq!(summary["outcome"], "host_error");
    assert!(summary["vcpus"][0]["timer"]["injections"].as_u64() > Some(0));
    assert!(summary["sampling"]["samples"].as_u64() > Some(0));
    let folded = std::fs::read_to_string(dir.join("profile.folded")).expect("the profile");
    assert!(folded.lines().count() > 0);
}

/// Whether every thread of process `pid` is stopped (state `T` in
/// `/proc/PID/task/*/stat`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // The state follows the parenthesised command name.
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
        })
    })
}

/// Sends `signal` (a `kill` option such as `-STOP`) to `pid`.
fn send(signal: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid}");
}

/// The VMM stopped (SIGSTOP) for two seconds one second into a 5 s run and
/// continued: the guest clock ran on meanwhile (AMB-6), and each vCPU is told
/// once, as the API's Resume tells it (TIMER_RESUMES, a TimerResume
/// interrupt, `clockintr_cpu_init` again): no dispatch runs the 200
/// hardclocks the stop skipped, the hardclock count is that of the time not
/// stopped, every timer interrupt injected is handled, and the run ends
/// normally.
#[test]
fn test_a_stopped_and_continued_vmm_tells_the_guest_without_a_clockintr_burst() {
    if !kvm_or_skip("a stopped and continued VMM") {
        return;
    }
    let _serial = common::kvm_lock();
    let console = common::scratch("console.txt");
    let summary_path = common::scratch("summary.json");
    let hz = 100.0;
    let spawned = std::time::Instant::now();
    let mut child = common::metronome()
        .args(["run", "--vcpus", "2", "--workload", "demo", "--hz", "100"])
        .args(["--duration", "5", "--timeout", "120", "--quiet"])
        .arg("--console")
        .arg(&console)
        .arg("--summary-json")
        .arg(&summary_path)
        .spawn()
        .expect("spawn metronome");
    let pid = child.id();
    // The guest runs its threads, one second in (device time starts with the VM).
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("spinner on vCPU 1 started")
    {
        assert!(
            spawned.elapsed() < std::time::Duration::from_secs(60),
            "guest never started"
        );
        std::thread::yield_now();
    }
    std::thread::sleep(std::time::Duration::from_secs(1).saturating_sub(spawned.elapsed()));
    send("-STOP", pid);
    let asked = std::time::Instant::now();
    while !all_threads_stopped(pid) {
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(10),
            "the VMM's threads never all stopped"
        );
        std::thread::yield_now();
    }
    let stopped_at = std::time::Instant::now();
    // The stop itself: two seconds during which the guest clock runs on.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let stopped_s = stopped_at.elapsed().as_secs_f64();
    send("-CONT", pid);
    let status = child.wait().expect("wait");
    let text = std::fs::read_to_string(&summary_path).expect("summary written");
    let summary: serde_json::Value = serde_json::from_str(&text).expect("summary is JSON");
    assert_eq!(status.code(), Some(0), "{status:?}: {}", summary["message"]);
    // When each vCPU's spinner started (guest time): its clock ran by then.
    let console = std::fs::read_to_string(&console).expect("console");
    let started_s = |id: u64| {
        let line = format!("spinner on vCPU {id} started at ");
        let at = console.split(&line).nth(1).expect("spinner line");
        let ns: u64 = at.split(' ').next().unwrap().parse().expect("ns");
        ns as f64 / 1e9
    };
    let vcpus = summary["vcpus"].as_array().expect("vcpus");
    assert_eq!(vcpus.len(), 2);
    for v in vcpus {
        let id = u(v, "id");
        // Told once: the device counted one resume, the guest read it in its
        // TimerResume handler and re-ran cpu_init.
        assert_eq!(u(&v["timer"], "resumes"), 1, "vCPU {id}: {v}");
        assert_eq!(u(&v["guest"], "timer_resumes_seen"), 1, "vCPU {id}: {v}");
        assert_eq!(u(v, "cpu_inits"), 2, "vCPU {id}: {v}");
        // Without being told, one dispatch would run ~200 hardclocks; busy
        // hosts delay a vCPU by tens of milliseconds at times, no more.
        let batch = u(v, "max_hardclock_batch") as f64;
        assert!(
            batch < hz * stopped_s / 2.0,
            "vCPU {id}: a burst of {batch} hardclocks after a {stopped_s:.2} s stop"
        );
        // The hardclocks are those of the time not stopped, between the
        // start of the vCPU's clock (at most since the VM was created, at
        // least since its spinner started) and its last dispatch: a burst
        // would add the stop's 200.
        let hardclock = u(v, "hardclock") as f64;
        let last_s = u(v, "last_dispatch_ns") as f64 / 1e9;
        let least = hz * (last_s - started_s(id) - stopped_s);
        let most = hz * (last_s - stopped_s);
        assert!(
            (least * 0.9 - 5.0..=most * 1.1 + 5.0).contains(&hardclock),
            "vCPU {id}: {hardclock} hardclocks, last dispatch at {last_s:.2} s, \
             {stopped_s:.2} s stopped: {v}"
        );
        // No timer delivery lost: the deadline that passed during the stop
        // was injected once after it, and every injection was handled (but
        // one in flight when the run ended).
        let injections = u(&v["timer"], "injections");
        let handled = u(&v["guest"], "timer_interrupts");
        assert!(
            handled <= injections && injections <= handled + 1,
            "vCPU {id}: {injections} timer interrupts injected, {handled} handled"
        );
    }
}
