//! Host-side interventions through the `vmm` crate's own API, on real KVM
//! guests: holding one vCPU out of the guest (clockintr catches up by
//! repetition, CI-EV-1) and pausing the whole VM, then resuming with or without
//! telling the guest (the resume rule, CI-CPU-6). The guest clock keeps running
//! while vCPUs are held or paused (AMB-6).

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::kvm_or_skip;
use std::time::{Duration, Instant};
use vmm::{ConsoleSink, ResumeMode, Summary, Vm, VmConfig, VmController};

fn config(duration_secs: f64) -> VmConfig {
    VmConfig {
        vcpus: 2,
        duration: Some(Duration::from_secs_f64(duration_secs)),
        timeout: Some(Duration::from_secs(120)),
        console: ConsoleSink::Null,
        ..VmConfig::default()
    }
}

/// Waits (on the guest clock) until guest uptime reaches `ns`.
fn until_uptime(controller: &VmController, ns: u64) {
    while controller.uptime_ns() < ns {
        assert!(!controller.ended(), "the VM ended early");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Boots a VM, runs `act` on another thread with its controller, returns the summary.
fn with_vm(config: VmConfig, act: impl FnOnce(VmController) + Send + 'static) -> Summary {
    let _serial = common::kvm_lock();
    let vm = Vm::build(config).expect("build VM");
    let running = vm.start(Instant::now()).expect("start VM");
    let controller = running.controller();
    let actor = std::thread::spawn(move || act(controller));
    let summary = running.wait();
    actor.join().expect("controller thread");
    assert_eq!(summary.exit_code, 0, "{}", summary.message);
    summary
}

#[test]
fn test_ci_ev_1_held_vcpu_catches_up_by_repetition() {
    if !kvm_or_skip("hold vCPU") {
        return;
    }
    let summary = with_vm(config(1.5), |c| {
        until_uptime(&c, 500_000_000);
        c.hold_vcpu(1, Duration::from_millis(55)).expect("hold");
    });
    let held = &summary.vcpus[1];
    assert!(
        (5..=6).contains(&held.max_hardclock_batch),
        "a 55 ms hold at hz=100 must make one dispatch call hardclock 5 or 6 times, got {}",
        held.max_hardclock_batch
    );
    // One callback run per event, however many hardclock() calls it made (TR-C-1).
    assert!(
        held.clockintr.run < held.hardclock + held.statclock,
        "{:?}",
        held.clockintr
    );
    // The other vCPU was not held: no catch-up beyond ordinary scheduling delay.
    assert!(
        summary.vcpus[0].max_hardclock_batch < 5,
        "{:?}",
        summary.vcpus[0]
    );
}

fn pause_and_resume(mode: ResumeMode) -> Summary {
    with_vm(config(2.5), move |c| {
        until_uptime(&c, 500_000_000);
        c.pause().expect("pause");
        let paused_at = c.uptime_ns();
        // The guest clock keeps running while paused: wait 1 s of it.
        until_uptime(&c, paused_at + 1_000_000_000);
        c.resume(mode).expect("resume");
    })
}

#[test]
fn test_ci_cpu_6_resume_without_reinit_runs_every_missed_hardclock() {
    if !kvm_or_skip("resume continue") {
        return;
    }
    let summary = pause_and_resume(ResumeMode::Continue);
    for v in &summary.vcpus {
        assert_eq!(v.cpu_inits, 1, "{v:?}");
        assert_eq!(
            v.timer.resumes, 0,
            "TIMER_RESUMES counts reinit resumes only"
        );
        assert!(
            (95..=105).contains(&v.max_hardclock_batch),
            "vCPU {}: ~100 hardclocks after a 1 s pause, got {}",
            v.id,
            v.max_hardclock_batch
        );
    }
}

#[test]
fn test_ci_cpu_6_resume_with_reinit_skips_the_gap() {
    if !kvm_or_skip("resume reinit") {
        return;
    }
    let summary = pause_and_resume(ResumeMode::Reinit);
    for v in &summary.vcpus {
        assert_eq!(
            v.cpu_inits, 2,
            "the guest re-ran cpu_init after the resume: {v:?}"
        );
        // The timer device counted the resume in TIMER_RESUMES, and the
        // guest's TimerResume handler read that register.
        assert_eq!(v.timer.resumes, 1, "{v:?}");
        assert_eq!(v.guest.timer_resumes_seen, 1, "{v:?}");
        assert!(
            v.resume_first_batch <= 1,
            "vCPU {}: burst of {} after resume",
            v.id,
            v.resume_first_batch
        );
        // Without re-init the pause costs a burst of ~100 hardclocks; with it,
        // only ordinary scheduling delay on a busy 2-core host remains.
        assert!(
            v.max_hardclock_batch < 10,
            "vCPU {}: burst of {}",
            v.id,
            v.max_hardclock_batch
        );
    }
}

#[test]
fn test_pause_and_resume_are_validated() {
    if !kvm_or_skip("pause errors") {
        return;
    }
    with_vm(config(1.0), |c| {
        until_uptime(&c, 200_000_000);
        assert_eq!(
            c.resume(ResumeMode::Continue),
            Err(vmm::ControlError::NotPaused)
        );
        c.pause().unwrap();
        assert_eq!(c.pause(), Err(vmm::ControlError::AlreadyPaused));
        assert!(
            c.dump_clockintr().contains("pend clockintr_hardclock"),
            "{}",
            c.dump_clockintr()
        );
        c.resume(ResumeMode::Continue).unwrap();
        assert_eq!(
            c.hold_vcpu(7, Duration::from_millis(1)),
            Err(vmm::ControlError::NoSuchVcpu(7))
        );
    });
}

#[test]
fn test_tr_c_2_stats_read_while_paused_are_whole_and_stable() {
    if !kvm_or_skip("clockintr stats") {
        return;
    }
    with_vm(config(1.5), |c| {
        until_uptime(&c, 500_000_000);
        c.pause().unwrap();
        let (records, total) = c.clockintr_stats();
        assert_eq!(records.len(), 2);
        // Paused at interruptible points: every dispatch so far is counted,
        // and each record is whole (CI-D-7: a dispatch is prompt, early or
        // spurious, and each one ran at least one callback).
        for r in &records {
            assert!(r.prompt > 0, "{records:?}");
            assert!(r.run >= r.prompt, "{records:?}");
        }
        assert_eq!(total.prompt, records[0].prompt + records[1].prompt);
        // Paused (the guest clock runs on): nothing dispatches, so a second
        // consistent read 50 ms of guest time later is the same.
        until_uptime(&c, c.uptime_ns() + 50_000_000);
        assert_eq!(c.clockintr_stats(), (records, total));
        c.resume(ResumeMode::Continue).unwrap();
        // Running again: the guest's statistics move on.
        until_uptime(&c, c.uptime_ns() + 100_000_000);
        assert!(c.clockintr_stats().1.prompt > total.prompt);
    });
}
