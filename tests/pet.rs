//! Traditional PET (spec section 4) on real KVM guests: every guest thread in
//! every pass, blocked threads with the stack where they block, the handler's
//! fire and broadcast, the re-arm after sampling, and the broadcast counter.

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::{kvm_or_skip, profile_run, read_trace, scratch, u};
use serde_json::Value;

const TM_FIRE: u64 = 0x2503_0000;
const TM_FIRE_END: u64 = TM_FIRE | 2;
const TM_HNDLR_START: u64 = 0x2503_0008 | 1;
const PET_SCHED: u64 = 0x2504_0018;
const PET_RUN: u64 = 0x2504_0008;
const PET_IDLE: u64 = 0x2504_0010;
const PET_SAMPLE_TASK_END: u64 = 0x2504_0020 | 2;
/// kperf's `SAMPLE_FLAG_SYSTEM` and `SAMPLE_FLAG_PEND_USER`.
const SYSTEM: u64 = 1 << 5;
const PEND_USER: u64 = 1;
/// The PET period and kperf's PET minimum (2 ms).
const PET_PERIOD: u64 = 10_000_000;
const PET_MIN: u64 = 2_000_000;

struct PetRun {
    summary: Value,
    trace: Vec<Value>,
    dir: std::path::PathBuf,
}

/// `--workload profile` on `vcpus` vCPUs for `seconds`, an on-CPU timer at
/// 1 kHz and traditional PET every 10 ms (both th_info, ustack, kstack), the
/// trace at its verbose level.
fn pet_run(vcpus: u32, seconds: &str) -> PetRun {
    let dir = scratch("pet");
    let trace_file = dir.join("trace.jsonl");
    let r = profile_run(
        &vcpus.to_string(),
        seconds,
        &[
            "--sample-period-us",
            "1000",
            "--pet-period-ms",
            &(PET_PERIOD / 1_000_000).to_string(),
            "--profile-dir",
            dir.to_str().unwrap(),
            "--trace",
            trace_file.to_str().unwrap(),
            "--trace-level",
            "2",
        ],
    );
    let trace = read_trace(&trace_file);
    PetRun {
        summary: r.summary,
        trace,
        dir,
    }
}

/// The names of every guest thread, from the summary.
fn thread_names(summary: &Value) -> Vec<String> {
    summary["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v["threads"].as_array().unwrap())
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

fn is_pet_fire(r: &Value) -> bool {
    u(r, "id") == TM_FIRE && r["args"][1] == 1
}

#[test]
fn test_pet_t_4_every_guest_thread_in_every_pass_and_blocked_stacks() {
    if !kvm_or_skip("PET every thread") {
        return;
    }
    let run = pet_run(2, "1.5");
    let sampling = &run.summary["sampling"];
    let names = thread_names(&run.summary);
    let threads = names.len();
    assert!(threads >= 8, "the profile workload has 4 threads a vCPU");
    let passes = u(sampling, "pet_passes");
    assert!(passes >= 50, "{sampling}");
    // PET-T-4: each pass's task bracket ends with the number of threads sampled.
    let per_pass: Vec<u64> = run
        .trace
        .iter()
        .filter(|r| u(r, "id") == PET_SAMPLE_TASK_END)
        .map(|r| r["args"][0].as_u64().unwrap())
        .collect();
    assert_eq!(per_pass.len() as u64, passes);
    assert!(
        per_pass.iter().all(|&n| n == threads as u64),
        "every pass samples all {threads} threads: {per_pass:?}"
    );
    assert_eq!(u(sampling, "threads_sampled"), passes * threads as u64);
    // A consumer blocks in the wait system call: its PET stacks show the
    // consumer's loop calling the wrapper (inlined frames `wait` and `call`,
    // whose `int3` is the system-call door).
    let folded = std::fs::read_to_string(run.dir.join("pet.folded")).expect("pet.folded");
    let consumer: Vec<&str> = folded
        .lines()
        .filter(|l| l.starts_with("consumer/"))
        .collect();
    assert!(!consumer.is_empty(), "{folded}");
    assert!(
        consumer
            .iter()
            .any(|l| l.contains("consumer_thread;wait;call ")),
        "a consumer stack ends in the system-call door: {consumer:?}"
    );
    // Every thread of the guest is in the PET profile, running or not.
    for name in names {
        assert!(
            folded.lines().any(|l| l.starts_with(&format!("{name};"))),
            "{name} missing from pet.folded"
        );
    }
}

#[test]
fn test_pet_h_2_pet_r_2_fire_broadcast_rearm_and_counter() {
    if !kvm_or_skip("PET handler") {
        return;
    }
    let vcpus = 3;
    let run = pet_run(vcpus, "1.5");
    let sampling = &run.summary["sampling"];
    let fires: Vec<&Value> = run.trace.iter().filter(|r| is_pet_fire(r)).collect();
    // PET-C-1: one broadcast per traditional PET fire.
    assert_eq!(u(sampling, "pet_broadcasts"), fires.len() as u64);
    assert!(fires.len() >= 50, "{}", fires.len());
    // PET-H-1: one handler run per period, on the handler vCPU (AMB-7).
    assert!(fires.iter().all(|r| u(r, "vcpu") == 0));
    // PET-H-2: the handler samples itself with SYSTEM between its FIRE and
    // FIRE end; every other vCPU is asked to sample without SYSTEM.
    let mut in_fire = false;
    let (mut local, mut remote) = (0, 0);
    for r in &run.trace {
        let id = u(r, "id");
        if is_pet_fire(r) {
            in_fire = true;
        } else if id == TM_FIRE_END {
            in_fire = false;
        } else if id == TM_HNDLR_START && r["args"][0] == 1 {
            let flags = r["args"][1].as_u64().unwrap();
            if in_fire && u(r, "vcpu") == 0 {
                assert_eq!(flags, PEND_USER | SYSTEM);
                local += 1;
            } else {
                assert_eq!(flags, PEND_USER, "{r}");
                remote += 1;
            }
        }
    }
    assert_eq!(local, fires.len());
    // Remote samples are not waited for: the last fire's may be cut off by
    // the stop, and a vCPU that had not served one when the next fire came
    // is counted as missed.
    let expected = fires.len() * (vcpus as usize - 1);
    let missed = u(sampling, "pet_remote_missed") as usize;
    assert!(
        remote + missed + (vcpus as usize - 1) >= expected && remote <= expected,
        "{remote} remote samples ({missed} missed) for {expected}"
    );
    // PET-T-2: PET_IDLE and PET_RUN alternate.
    let pet_thread: Vec<u64> = run
        .trace
        .iter()
        .map(|r| u(r, "id"))
        .filter(|&id| id == PET_IDLE || id == PET_RUN)
        .collect();
    assert!(pet_thread
        .windows(2)
        .all(|w| w[0] != w[1] && (w[0] == PET_IDLE || w[0] == PET_RUN)));
    // PET-R-1: PET_SCHED (P, adjusted, d, deadline) with adjusted =
    // max(P - d if P > d else P, minimum); PET-R-2: the next fire is that
    // deadline, i.e. the spacing follows the pass, not a fixed grid.
    let scheds: Vec<&Value> = run
        .trace
        .iter()
        .filter(|r| u(r, "id") == PET_SCHED)
        .collect();
    assert!(scheds.len() + 1 >= fires.len());
    for (sched, next_fire) in scheds.iter().zip(fires.iter().skip(1)) {
        let args: Vec<u64> = (0..4).map(|i| sched["args"][i].as_u64().unwrap()).collect();
        let (p, adjusted, d, deadline) = (args[0], args[1], args[2], args[3]);
        assert_eq!(p, PET_PERIOD);
        let want = if p > d { p - d } else { p }.max(PET_MIN);
        assert_eq!(adjusted, want, "{sched}");
        assert_eq!(u(next_fire, "deadline"), deadline, "{sched} -> {next_fire}");
        assert!(u(next_fire, "t") >= deadline);
        assert!(deadline >= u(sched, "t"));
    }
}
