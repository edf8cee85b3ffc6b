//! Host-side sampling (kptimer, spec section 3) on real KVM guests: the
//! designed profile comes out as designed, XNU's statistical kperf tests
//! (fires counted once per period, no oversampling, leader-only versus
//! all-vCPU sampling, every busy vCPU sampled), and a synchronous stop.

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::{kvm_or_skip, profile_run, scratch, u};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const TM_FIRE: u64 = 0x2503_0000;
const TM_HNDLR_START: u64 = 0x2503_0008 | 1;
const TM_HNDLR_END: u64 = 0x2503_0008 | 2;
const PERIOD: u64 = 1_000_000;

fn trace_of(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("trace file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("trace line is JSON"))
        .collect()
}

/// The handler vCPUs answering each fire, in order (TR-P-5: a fire's
/// TM_FIRE precedes every TM_HNDLR that answers it).
fn handlers_per_fire(trace: &[Value]) -> Vec<Vec<u64>> {
    let mut fires: Vec<Vec<u64>> = Vec::new();
    for r in trace {
        match u(r, "id") {
            TM_FIRE => fires.push(Vec::new()),
            TM_HNDLR_START => {
                if let Some(current) = fires.last_mut() {
                    current.push(u(r, "vcpu"));
                }
            }
            _ => {}
        }
    }
    fires
}

/// A profile-workload VM on 2 vCPUs, sampled at 1 kHz with TH_INFO, running
/// until stopped (or the host-side timeout in seconds).
fn sampled_config(timeout_secs: u64) -> vmm::VmConfig {
    vmm::VmConfig {
        vcpus: 2,
        workload: metronome_abi::Workload::Profile,
        duration: Some(Duration::from_secs(600)),
        timeout: Some(Duration::from_secs(timeout_secs)),
        console: vmm::ConsoleSink::Null,
        sampling: Some(vmm::SamplingConfig::new(vmm::KperfConfig::on_cpu(
            PERIOD, 1, None,
        ))),
        ..vmm::VmConfig::default()
    }
}

/// A profile-workload run on 2 vCPUs for `seconds` of guest time, sampled
/// as `sampling` says, with its trace.
fn traced_run(sampling: &[&str], seconds: &str) -> (common::Run, Vec<Value>) {
    let trace = scratch("trace.jsonl");
    let mut args = sampling.to_vec();
    args.extend_from_slice(&["--trace", trace.to_str().unwrap()]);
    let r = profile_run("2", seconds, &args);
    (r, trace_of(&trace))
}

/// A run sampled at 1 kHz with `samplers`, with its trace.
fn sampled_run(samplers: &str, seconds: &str) -> (common::Run, Vec<Value>) {
    traced_run(
        &["--sample-period-us", "1000", "--samplers", samplers],
        seconds,
    )
}

/// Runs the profile workload on 2 vCPUs for `seconds`, sampled at 1 kHz with
/// the profile written to `dir`, plus `extra` options.
fn profiled_run(dir: &std::path::Path, seconds: &str, extra: &[&str]) -> common::Run {
    let mut args = vec![
        "--sample-period-us",
        "1000",
        "--profile-dir",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    profile_run("2", seconds, &args)
}

#[test]
fn test_profile_matches_designed_split_and_statclock() {
    if !kvm_or_skip("designed profile") {
        return;
    }
    let dir = scratch("profile");
    let r = profiled_run(&dir, "3", &[]);
    let sampling = &r.summary["sampling"];
    assert!(u(sampling, "samples") > 4000, "{sampling}");
    assert_eq!(u(sampling, "dropped"), 0);
    let folded = std::fs::read_to_string(dir.join("profile.folded")).unwrap();
    let mut per_thread: BTreeMap<String, u64> = BTreeMap::new();
    let mut leaves: BTreeMap<(String, &str), u64> = BTreeMap::new();
    let chain = "split_thread;metronome_guest::workloads::split_outer;metronome_guest::workloads::mid_thirty;\
                 metronome_guest::workloads::leaf_thirty";
    let mut full_chains = 0;
    for line in folded.lines() {
        let (stack, count) = line.rsplit_once(' ').unwrap();
        let count: u64 = count.parse().unwrap();
        let thread = stack.split(';').next().unwrap().to_string();
        *per_thread.entry(thread.clone()).or_default() += count;
        for leaf in ["leaf_sixty", "leaf_thirty", "leaf_ten"] {
            if stack
                .split(';')
                .any(|f| f == format!("metronome_guest::workloads::{leaf}"))
            {
                *leaves.entry((thread.clone(), leaf)).or_default() += count;
            }
        }
        if stack.contains(chain) {
            full_chains += count;
        }
    }
    assert!(
        full_chains > 500,
        "the designed call chain is symbolized in full: {full_chains}"
    );
    for vcpu in 0..2 {
        let thread = format!("split/{vcpu}");
        let total = per_thread[&thread] as f64;
        for (leaf, designed) in [
            ("leaf_sixty", 60.0),
            ("leaf_thirty", 30.0),
            ("leaf_ten", 10.0),
        ] {
            let share =
                100.0 * leaves.get(&(thread.clone(), leaf)).copied().unwrap_or(0) as f64 / total;
            assert!(
                (share - designed).abs() <= 5.0,
                "{thread} {leaf}: {share:.1}% vs designed {designed}%"
            );
        }
    }
    // Per-thread shares agree with the guest's own statclock accounting.
    for v in r.vcpus() {
        let id = u(v, "id");
        let ticks: u64 = v["threads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| u(t, "user") + u(t, "system") + u(t, "interrupt"))
            .sum::<u64>()
            + u(&v["cp_time"], "idle");
        let samples: u64 = per_thread
            .iter()
            .filter(|(t, _)| t.ends_with(&format!("/{id}")))
            .map(|(_, n)| n)
            .sum();
        for t in v["threads"].as_array().unwrap() {
            let name = t["name"].as_str().unwrap();
            let stat =
                100.0 * (u(t, "user") + u(t, "system") + u(t, "interrupt")) as f64 / ticks as f64;
            let prof = 100.0 * per_thread.get(name).copied().unwrap_or(0) as f64 / samples as f64;
            assert!(
                (stat - prof).abs() <= 5.0,
                "{name}: statclock {stat:.1}% vs profile {prof:.1}%"
            );
        }
    }
    // A real pprof consumer reads the profile of the real run.
    match std::process::Command::new("go")
        .args(["tool", "pprof", "-top"])
        .arg(dir.join("profile.pb.gz"))
        .output()
    {
        Ok(out) => {
            assert!(
                out.status.success(),
                "go tool pprof: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(String::from_utf8_lossy(&out.stdout).contains("leaf_sixty"));
        }
        Err(_) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but go is missing")
        }
        Err(_) => eprintln!("skip: go is not installed; the pprof check did not run"),
    }
}

/// The frames of a folded stack (thread first), each with whether it is a
/// kernel frame (the `_[k]` suffix, removed).
fn frames(stack: &str) -> impl Iterator<Item = (&str, bool)> {
    stack
        .split(';')
        .skip(1)
        .map(|f| match f.strip_suffix("_[k]") {
            Some(name) => (name, true),
            None => (f, false),
        })
}

#[test]
fn test_kernel_stacks_stop_at_the_interrupt_entry_and_every_frame_is_named() {
    if !kvm_or_skip("kernel stacks at interrupt entry") {
        return;
    }
    let dir = scratch("entry-stacks");
    let r = profiled_run(&dir, "2", &[]);
    assert_eq!(u(&r.summary["sampling"], "walk_errors"), 0);
    let folded = std::fs::read_to_string(dir.join("profile.folded")).unwrap();
    let lines: Vec<(&str, u64)> = folded
        .lines()
        .map(|l| {
            let (stack, count) = l.rsplit_once(' ').unwrap();
            (stack, count.parse().unwrap())
        })
        .collect();
    // User-mode functions: the workload's functions (by their full path) that
    // user stacks show. The workloads module also holds kernel hooks, which
    // user stacks never show.
    let user_functions: BTreeSet<&str> = lines
        .iter()
        .flat_map(|(stack, _)| frames(stack))
        .filter(|&(name, kernel)| !kernel && name.starts_with("metronome_guest::workloads::"))
        .map(|(name, _)| name)
        .collect();
    for f in [
        "split_thread",
        "split_outer",
        "leaf_sixty",
        "producer_thread",
    ] {
        assert!(
            user_functions.contains(format!("metronome_guest::workloads::{f}").as_str()),
            "{f} in {user_functions:?}"
        );
    }
    let mut kernel_samples = 0;
    for &(stack, count) in &lines {
        for (name, kernel) in frames(stack) {
            assert!(!name.starts_with("0x"), "a bare address: {stack}");
            assert!(
                !(kernel && user_functions.contains(name)),
                "a user-mode function as a kernel frame: {stack}"
            );
        }
        // A user thread enters its kernel only through an interrupt: its
        // kernel stack begins in the entry path (or in `trap` before its
        // prologue has saved RBP).
        let thread = stack.split(';').next().unwrap();
        if let (false, Some((root, _))) = (thread == "idle", frames(stack).find(|f| f.1)) {
            kernel_samples += count;
            assert!(
                root.starts_with("isr_") || root == "metronome_guest::trap::trap",
                "kernel stack of {thread} begins at {root}: {stack}"
            );
        }
    }
    assert!(kernel_samples > 20, "{kernel_samples} kernel samples");
}

#[test]
fn test_kt_f_4_and_kt_f_5_fires_once_per_period_without_oversampling() {
    if !kvm_or_skip("kt-f-4") {
        return;
    }
    let (r, trace) = sampled_run("th_info,ustack", "3");
    let fires: Vec<&Value> = trace.iter().filter(|r| u(r, "id") == TM_FIRE).collect();
    let first = u(fires[0], "deadline");
    let last = u(fires[fires.len() - 1], "deadline");
    let periods = (last - first) / PERIOD + 1;
    // KT-F-4: one TM_FIRE per elapsed period, not one per vCPU.
    assert!(
        fires.len() as u64 <= periods,
        "{} fires for {periods} periods",
        fires.len()
    );
    assert!(
        fires.len() as f64 >= 0.95 * periods as f64,
        "{} fires for {periods} periods",
        fires.len()
    );
    assert_eq!(u(&r.summary["sampling"], "timer_fires"), fires.len() as u64);
    // KT-F-5: after taking out delivery latency, fires are spaced a whole
    // number of periods apart; raw spacing is >= 95% of the period nearly always.
    let mut close = 0;
    for pair in fires.windows(2) {
        let spacing = u(pair[1], "deadline") - u(pair[0], "deadline");
        assert!(
            spacing >= PERIOD && spacing % PERIOD == 0,
            "deadline spacing {spacing}"
        );
        if (u(pair[1], "t") - u(pair[0], "t")) < PERIOD * 95 / 100 {
            close += 1;
        }
    }
    // (At most a tenth: host delivery latency on a busy 2-core host bunches
    // some fires; oversampling would put every other fire close.)
    assert!(
        close * 10 <= fires.len(),
        "{close} of {} fires closer than 95% of the period",
        fires.len()
    );
}

#[test]
fn test_kt_sm_1_system_only_action_is_sampled_by_the_leader_alone() {
    if !kvm_or_skip("kt-sm-1 leader") {
        return;
    }
    let (_, trace) = sampled_run("sys_mem", "1.5");
    let fires = handlers_per_fire(&trace);
    assert!(fires.len() > 1000);
    for handlers in &fires {
        assert_eq!(
            handlers.len(),
            1,
            "exactly one TM_HNDLR per fire: {handlers:?}"
        );
    }
}

#[test]
fn test_kt_sm_1_and_kt_sm_3_every_busy_vcpu_samples_each_fire() {
    if !kvm_or_skip("kt-sm-3") {
        return;
    }
    let (_, trace) = sampled_run("sys_mem,th_info", "1.5");
    let fires = handlers_per_fire(&trace);
    assert!(fires.len() > 1000);
    // Both vCPUs run their busy split thread: each answers every fire once.
    // A fire counts only if both answered it before the next fire; on a
    // 2-core host a vCPU thread is sometimes descheduled past that (or
    // halts briefly between threads), so the bound leaves room for that
    // noise: a leader-only action (KT-SM-1, the test above) gives ~0 here.
    let saturated = fires
        .iter()
        .filter(|h| {
            h.iter().copied().collect::<BTreeSet<u64>>() == BTreeSet::from([0, 1]) && h.len() == 2
        })
        .count();
    assert!(
        saturated * 100 > fires.len() * 85,
        "{saturated} of {} fires sampled both vCPUs",
        fires.len()
    );
}

#[test]
fn test_kt_sp_1_stop_is_synchronous_over_500_cycles() {
    if !kvm_or_skip("kt-sp-1") {
        return;
    }
    let _serial = common::kvm_lock();
    let running = vmm::Vm::build(sampled_config(300))
        .unwrap()
        .start(Instant::now())
        .unwrap();
    let c = running.controller();
    let actor = std::thread::spawn(move || {
        for cycle in 0..500 {
            // Running: wait until a sample arrives (a few periods of guest time).
            let before = c.samples_taken();
            let start = Instant::now();
            while c.samples_taken() == before {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "cycle {cycle}: no sample after start"
                );
                std::thread::yield_now();
            }
            c.sampling_stop().expect("stop");
            let at_stop = c.samples_taken();
            // Let the guest run for two periods of its clock: nothing may be sampled.
            let until = c.uptime_ns() + 2 * PERIOD;
            while c.uptime_ns() < until {
                std::thread::yield_now();
            }
            assert_eq!(
                c.samples_taken(),
                at_stop,
                "cycle {cycle}: a sample after stop returned"
            );
            c.sampling_start().expect("start");
        }
        c.stop();
    });
    let summary = running.wait();
    actor.join().expect("500 start/stop cycles without a hang");
    assert_eq!(summary.outcome, "stopped", "{}", summary.message);
    let sampling = summary.sampling.expect("sampling summary");
    assert!(sampling.samples >= 500);
}

#[test]
fn test_sampling_options_are_validated() {
    for (args, needle) in [
        (
            &["--sample-period-us", "0"][..],
            "--sample-period-us 0 is out of range",
        ),
        (
            &["--sample-period-us", "1000", "--samplers", "bogus"][..],
            "unknown sampler 'bogus'",
        ),
        (
            &[
                "--sample-period-us",
                "1000",
                "--samplers",
                "pmc_thread,pmc_cpu",
            ][..],
            "CFG-A-3",
        ),
        (&["--profile-dir", "/tmp/x"][..], "--sample-period-us"),
    ] {
        common::assert_refused(args, needle);
    }
}

#[test]
fn test_kt_i_1_halted_vcpu_is_not_kicked_and_rejoins_the_cadence() {
    if !kvm_or_skip("kt-i-1") {
        return;
    }
    let trace_path = scratch("trace.jsonl");
    let r = profile_run(
        "3",
        "2",
        &[
            "--sample-period-us",
            "1000",
            "--samplers",
            "th_info",
            "--trace",
            trace_path.to_str().unwrap(),
        ],
    );
    let fires = handlers_per_fire(&trace_of(&trace_path));
    let by_vcpu = |vcpu: u64| fires.iter().filter(|h| h.contains(&vcpu)).count();
    // vCPU 2 only runs a thread that sleeps 50 ms at a time: it is halted,
    // so not kicked, most of the time; vCPUs 0 and 1 are busy and sampled.
    // (On kvm_pvm an idle vCPU still runs ~20% of the time: its clock
    // interrupt handlers execute at CPL0, which is interpreted there. It is
    // sampled then, as XNU samples a CPU in interrupt context.)
    assert!(
        by_vcpu(0) * 100 > fires.len() * 90,
        "{} of {}",
        by_vcpu(0),
        fires.len()
    );
    assert!(
        by_vcpu(2) * 3 < fires.len(),
        "idle vCPU 2 answered {} of {} fires",
        by_vcpu(2),
        fires.len()
    );
    // When it wakes it re-derives its deadline: no burst of missed fires.
    for handlers in &fires {
        assert!(
            handlers.iter().filter(|&&v| v == 2).count() <= 1,
            "{handlers:?}"
        );
    }
    let v2 = &r.summary["sampling"]["vcpus"][2];
    let v0 = &r.summary["sampling"]["vcpus"][0];
    assert!(u(v2, "samples") * 3 < u(v0, "samples"), "{v2} vs {v0}");
}

#[test]
fn test_kt_sm_4_thread_filter_samples_only_that_thread() {
    if !kvm_or_skip("kt-sm-4") {
        return;
    }
    let dir = scratch("filtered");
    let r = profiled_run(&dir, "1.5", &["--sample-tid", "1"]);
    let thread = r
        .vcpus()
        .iter()
        .flat_map(|v| v["threads"].as_array().unwrap().iter())
        .find(|t| u(t, "tid") == 1)
        .map(|t| t["name"].as_str().unwrap().to_string())
        .expect("a thread with tid 1");
    let folded = std::fs::read_to_string(dir.join("profile.folded")).unwrap();
    assert!(!folded.is_empty());
    for line in folded.lines() {
        assert!(
            line.starts_with(&format!("{thread};")),
            "only {thread} is sampled: {line}"
        );
    }
    let s = &r.summary["sampling"];
    // Both vCPUs answer every fire, but only the one running tid 1 samples.
    assert!(u(s, "samples") * 10 < u(s, "timer_fires") * 2 * 6, "{s}");
}

/// A minimal x86_64 ELF whose entry point is `ud2`: with no IDT loaded the
/// guest triple-faults at once.
fn triple_fault_kernel() -> std::path::PathBuf {
    let mut elf = vec![0u8; 0x1000];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little endian
    elf[6] = 1;
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes()); // e_entry
    elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = 64;
    elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    elf[ph + 8..ph + 16].copy_from_slice(&0x800u64.to_le_bytes()); // p_offset
    elf[ph + 16..ph + 24].copy_from_slice(&0x20_0000u64.to_le_bytes()); // p_vaddr
    elf[ph + 24..ph + 32].copy_from_slice(&0x20_0000u64.to_le_bytes()); // p_paddr
    elf[ph + 32..ph + 40].copy_from_slice(&2u64.to_le_bytes()); // p_filesz
    elf[ph + 40..ph + 48].copy_from_slice(&2u64.to_le_bytes()); // p_memsz
    elf[0x800..0x802].copy_from_slice(&[0x0f, 0x0b]); // ud2
    let path = scratch("ud2.elf");
    std::fs::write(&path, elf).unwrap();
    path
}

#[test]
fn test_sampling_does_not_hang_when_a_vcpu_dies() {
    if !kvm_or_skip("sampling and a dead vCPU") {
        return;
    }
    let kernel = triple_fault_kernel();
    let r = common::run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--sample-period-us",
        "1000",
        "--timeout",
        "60",
    ]);
    assert_eq!(r.code(), 3, "stderr: {}", r.stderr());
    assert_eq!(r.summary["outcome"], "triple_fault", "{}", r.summary);
}

#[test]
fn test_stopping_a_paused_vm_with_sampling_does_not_hang() {
    if !kvm_or_skip("stop while paused") {
        return;
    }
    let _serial = common::kvm_lock();
    let running = vmm::Vm::build(sampled_config(120))
        .unwrap()
        .start(Instant::now())
        .unwrap();
    let c = running.controller();
    let actor = std::thread::spawn(move || {
        while c.samples_taken() == 0 {
            std::thread::yield_now();
        }
        c.pause().unwrap();
        // A synchronous sampling stop while every vCPU is paused returns.
        c.sampling_stop().unwrap();
        c.sampling_start().unwrap();
        c.stop();
    });
    let summary = running.wait();
    actor.join().unwrap();
    assert_eq!(summary.outcome, "stopped");
}

/// The `args[i]` of a trace record.
fn arg(record: &Value, i: usize) -> u64 {
    record["args"][i].as_u64().expect("u64 arg")
}

#[test]
fn test_two_timers_with_two_actions_each_fire_at_their_own_rate() {
    if !kvm_or_skip("two timers") {
        return;
    }
    // Timer 0: 1 ms, action 1 (every busy vCPU samples); timer 1: 4 ms,
    // action 2 (system memory only: the leader alone, KT-SM-1); timer 2:
    // 1 us but action 0, so inactive (KT-ST-1) and its period raised to
    // 20 us (KT-MIN-1).
    let kperf = scratch("two-timers.json");
    std::fs::write(
        &kperf,
        r#"{"action_count": 2, "timer_count": 3,
            "actions": [{"id": 1, "samplers": ["th_info", "ustack", "kstack"], "user_stack_depth": 64},
                        {"id": 2, "samplers": "sys_mem"}],
            "timers": [{"id": 0, "period_ns": 1000000, "action_id": 1},
                       {"id": 1, "period_ns": 4000000, "action_id": 2},
                       {"id": 2, "period_ns": 1000, "action_id": 0}]}"#,
    )
    .unwrap();
    let (r, trace) = traced_run(&["--kperf", kperf.to_str().unwrap()], "2");
    let mut fires: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
    for r in trace.iter().filter(|r| u(r, "id") == TM_FIRE) {
        fires.entry(arg(r, 0)).or_default().push(r);
    }
    assert_eq!(
        fires.keys().copied().collect::<Vec<_>>(),
        [0, 1],
        "timer 2 never fires"
    );
    for (timer, period, action) in [(0, 1_000_000, 1), (1, 4_000_000, 2)] {
        let fires = &fires[&timer];
        let first = u(fires[0], "deadline");
        let last = u(fires[fires.len() - 1], "deadline");
        let periods = (last - first) / period + 1;
        // One TM_FIRE per period of this timer (KT-F-4), on its own grid.
        assert!(
            fires.len() as u64 <= periods && fires.len() as f64 >= 0.95 * periods as f64,
            "timer {timer}: {} fires for {periods} periods",
            fires.len()
        );
        for pair in fires.windows(2) {
            let spacing = u(pair[1], "deadline") - u(pair[0], "deadline");
            assert!(spacing % period == 0, "timer {timer}: spacing {spacing}");
        }
        // TM_FIRE args (TR-P-1): timer, not PET, period, action.
        assert_eq!(
            (arg(fires[0], 1), arg(fires[0], 2), arg(fires[0], 3)),
            (0, period, action)
        );
    }
    let ratio = fires[&0].len() as f64 / fires[&1].len() as f64;
    assert!((3.6..=4.4).contains(&ratio), "1 ms vs 4 ms fires: {ratio}");
    // Timer 1's action samples system memory only: its leader alone answers.
    let timer_1_handlers = trace
        .iter()
        .filter(|r| u(r, "id") == TM_HNDLR_START && arg(r, 0) == 1)
        .count();
    assert_eq!(timer_1_handlers, fires[&1].len());
    // The default trace level (1, info) keeps TM_HNDLR end (TR-P-2).
    assert!(trace.iter().any(|r| u(r, "id") == TM_HNDLR_END));

    let sampling = &r.summary["sampling"];
    assert_eq!(
        u(sampling, "timer_fires"),
        (fires[&0].len() + fires[&1].len()) as u64
    );
    // The profile period: the shortest on-CPU timer's; its action's samplers.
    assert_eq!(
        (u(sampling, "period_ns"), u(sampling, "samplers")),
        (1_000_000, 13)
    );
    let config = &sampling["config"];
    let periods: Vec<u64> = config["timers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| u(t, "period_ns"))
        .collect();
    assert_eq!(periods, [1_000_000, 4_000_000, 20_000], "{config}");
    assert_eq!(config["actions"][0]["user_stack_depth"], 64);
    assert_eq!(config["actions"][0]["kernel_stack_depth"], 128);
    assert_eq!(
        config["actions"][1]["samplers"],
        serde_json::json!(["sys_mem"])
    );
    assert_eq!(config["pet"], Value::Null);
    assert_eq!(u(&config["limits"], "timer_min_period_ns"), 20_000);
    assert_eq!(u(&config["limits"], "timer_min_pet_period_ns"), 2_000_000);
    assert_eq!(u(config, "trace_level"), 1);
}

#[test]
fn test_tr_e3_trace_level_0_keeps_data_events_only() {
    if !kvm_or_skip("tr-e-3") {
        return;
    }
    let (r, trace) = traced_run(&["--sample-period-us", "1000", "--trace-level", "0"], "1");
    let count = |id| trace.iter().filter(|r| u(r, "id") == id).count();
    // TM_FIRE and TM_HNDLR start are data; TM_HNDLR end is info.
    assert!(count(TM_FIRE) > 500 && count(TM_HNDLR_START) > 500);
    assert_eq!(count(TM_HNDLR_END), 0);
    assert_eq!(u(&r.summary["sampling"]["config"], "trace_level"), 0);
}

/// Issue 8: every sampler that reads the guest or the VMM captures real
/// values, one record per sampler per sample in the trace (TR-P-4), counted
/// in `sampling.samplers_captured`.
#[test]
fn test_every_real_sampler_captures_into_the_trace_and_the_summary() {
    if !kvm_or_skip("samplers") {
        return;
    }
    use kperf::trace::{
        MI_DATA, MI_SYS_DATA, TI_DATA, TI_SCHEDDATA_2, TI_SNAPDATA, TK_INFO_DATA, TK_SNAP_DATA,
    };
    const RAM: u64 = 96 << 20;
    let samplers = "th_info,th_snapshot,th_scheduling,tk_snapshot,tk_info,meminfo,sys_mem";
    let (r, trace) = traced_run(
        &[
            "--mem-mib",
            "96",
            "--sample-period-us",
            "1000",
            "--samplers",
            samplers,
        ],
        "1.5",
    );
    let sampling = &r.summary["sampling"];
    let samples = u(sampling, "samples");
    let fires = u(sampling, "timer_fires");
    assert!(samples > 1000, "{samples} samples");
    assert_eq!(u(sampling, "dropped"), 0);
    // Every thread and task sampler in every sample; system memory in the
    // leader's only (KT-SM-1): one per fire.
    let captured = &sampling["samplers_captured"];
    assert_eq!(captured.as_object().unwrap().len(), 7, "{captured}");
    for name in samplers.split(',').filter(|&n| n != "sys_mem") {
        assert_eq!(u(captured, name), samples, "{name}: {captured}");
    }
    assert_eq!(u(captured, "sys_mem"), fires);
    let of = |id: u32| -> Vec<&Value> {
        trace
            .iter()
            .filter(|r| u(r, "id") == u64::from(id))
            .collect()
    };
    for id in [
        TI_DATA,
        TI_SNAPDATA,
        TI_SCHEDDATA_2,
        TK_SNAP_DATA,
        TK_INFO_DATA,
        MI_DATA,
    ] {
        assert_eq!(of(id).len() as u64, samples, "{id:#x}");
    }
    assert_eq!(of(MI_SYS_DATA).len() as u64, fires);

    // tk_info: the guest as one task (pid 1), the summary's threads, 2 vCPUs.
    let threads: u64 = r.summary["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["threads"].as_array().unwrap().len() as u64)
        .sum();
    let last_info = of(TK_INFO_DATA).last().copied().unwrap();
    assert_eq!(
        (arg(last_info, 0), arg(last_info, 1), arg(last_info, 3)),
        (1, threads, 2)
    );
    assert!(arg(last_info, 2) <= threads);
    // tk_snapshot: uptime increases, context switches never go back.
    let snapshots = of(TK_SNAP_DATA);
    for pair in snapshots
        .windows(2)
        .filter(|p| u(p[0], "vcpu") == u(p[1], "vcpu"))
    {
        assert!(arg(pair[1], 0) > arg(pair[0], 0), "uptime {pair:?}");
    }
    let (first, last) = (snapshots[0], snapshots[snapshots.len() - 1]);
    assert!(arg(last, 0) > arg(first, 0) + 1_000_000_000);
    assert!(arg(last, 1) >= arg(first, 1) && arg(last, 1) > 0);
    assert!(arg(last, 2) > 0, "user statclock ticks: {last}");
    // th_info (CFG-A-6): pid 1, the sample's thread, running while sampled.
    let info = of(TI_DATA);
    assert!(info
        .iter()
        .all(|r| arg(r, 0) == 1 && arg(r, 1) == u(r, "tid")));
    let running = info
        .iter()
        .filter(|r| u(r, "tid") != 0)
        .filter(|r| arg(r, 3) & 0xffff == 1 && arg(r, 3) >> 16 == 0xfffe)
        .count();
    let threads_sampled = info.iter().filter(|r| u(r, "tid") != 0).count();
    assert!(
        running * 100 >= threads_sampled * 95,
        "{running} of {threads_sampled}"
    );
    // th_scheduling and th_snapshot: a thread's user ticks and switches
    // never go back.
    for (id, field) in [(TI_SCHEDDATA_2, 0), (TI_SNAPDATA, 2)] {
        let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
        for r in of(id).iter().filter(|r| u(r, "tid") != 0) {
            let value = arg(r, field);
            let before = seen.insert(u(r, "tid"), value).unwrap_or(0);
            assert!(
                value >= before,
                "{id:#x} tid {}: {before} then {value}",
                u(r, "tid")
            );
        }
        assert!(seen.values().any(|&v| v > 0), "{id:#x}: {seen:?}");
    }
    // meminfo: guest memory in use within guest RAM, the heap (thread
    // stacks, none before the first thread) included and never shrinking.
    let mut heap_before = 0;
    for r in of(MI_DATA) {
        let (in_use, heap, ram) = (arg(r, 0), arg(r, 1), arg(r, 2));
        assert!(in_use > heap && in_use < ram && ram == RAM, "{r}");
        assert!(heap >= heap_before, "{r}");
        heap_before = heap;
    }
    assert!(heap_before >= threads * 0x1_0000, "{threads} thread stacks");
    // sys_mem: the VMM's resident memory, its virtual size, guest RAM.
    let mut resident_max = 0;
    for r in of(MI_SYS_DATA) {
        let (resident, virtual_size, ram) = (arg(r, 0), arg(r, 1), arg(r, 2));
        assert!(
            resident > 0 && virtual_size >= resident && ram == RAM,
            "{r}"
        );
        resident_max = resident_max.max(resident);
    }
    let figures = &sampling["sys_mem_vmm_resident_bytes"];
    assert_eq!(u(figures, "max"), resident_max);
    assert!(u(figures, "min") > 0 && u(figures, "min") <= u(figures, "last"));
    let in_use = &sampling["meminfo_guest_in_use_bytes"];
    assert!(u(in_use, "last") > 0 && u(in_use, "max") < RAM);
}

/// The sum of the counts in a folded-stacks file, per thread (first frame),
/// and the part of each under `[stack table full]`.
fn folded_counts(folded: &str) -> BTreeMap<String, (u64, u64)> {
    let mut per_thread: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for line in folded.lines() {
        let (stack, count) = line.rsplit_once(' ').expect("stack count");
        let count: u64 = count.parse().expect("a count");
        let mut frames = stack.split(';');
        let thread = frames.next().expect("a thread").to_owned();
        let entry = per_thread.entry(thread).or_default();
        entry.0 += count;
        if frames.any(|f| f == "[stack table full]") {
            entry.1 += count;
        }
    }
    per_thread
}

/// A vCPU's stack table has a memory budget (issue 11: memory stays flat);
/// once it is spent, a sample with a new stack is counted in its thread
/// under `[stack table full]`, not dropped. The hidden, test-only
/// `METRONOME_TEST_STACK_BUDGET_BYTES` shrinks the budget to a few stacks so
/// that a short run shows it: the summary counts the folded samples, the
/// profile has them under their threads, and every sample is still in the
/// profile, as many as without the budget.
#[test]
fn test_a_full_stack_table_folds_new_stacks_into_their_threads() {
    if !kvm_or_skip("stack-table folding") {
        return;
    }
    let dir = scratch("folding");
    let summary_path = dir.join("summary.json");
    let output = {
        let _serial = common::kvm_lock();
        common::metronome()
            .env("METRONOME_TEST_STACK_BUDGET_BYTES", "4096")
            .args(["run", "--workload", "profile", "--vcpus", "2"])
            .args(["--duration", "2", "--timeout", "120"])
            .args(["--sample-period-us", "1000", "--console", "/dev/null"])
            .arg("--quiet")
            .arg("--profile-dir")
            .arg(&dir)
            .arg("--summary-json")
            .arg(&summary_path)
            .output()
            .expect("run metronome")
    };
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    let sampling = &summary["sampling"];
    let (samples, folded) = (u(sampling, "samples"), u(sampling, "folded"));
    assert_eq!(u(sampling, "dropped"), 0, "{sampling}");
    assert!(folded > 0, "a few stacks' budget folds: {sampling}");
    let per_vcpu: u64 = sampling["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| u(v, "folded"))
        .sum();
    assert_eq!(per_vcpu, folded);

    let counts = folded_counts(&std::fs::read_to_string(dir.join("profile.folded")).unwrap());
    let total: u64 = counts.values().map(|c| c.0).sum();
    let under_full: u64 = counts.values().map(|c| c.1).sum();
    assert_eq!(under_full, folded, "{counts:?}");
    assert_eq!(total, samples, "every sample is in the profile: {counts:?}");
    // The designed threads are there, each partly folded.
    for thread in ["split/", "producer/"] {
        let (all, full) = counts
            .iter()
            .find(|(t, _)| t.starts_with(thread))
            .map(|(_, c)| *c)
            .unwrap_or_else(|| panic!("no {thread} in {counts:?}"));
        assert!(
            all > 0 && full > 0,
            "{thread}: {all} samples, {full} folded"
        );
    }
}
