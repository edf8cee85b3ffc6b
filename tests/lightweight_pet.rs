//! Lightweight PET (spec 4.4) on a real KVM guest: the PET timer runs on the
//! vCPUs and its leader bumps a generation (PET-L-1); a thread switched on
//! with a stale generation samples itself, once (PET-L-2); no PET sampler
//! and no broadcast (PET-C-1).

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use std::collections::BTreeMap;

use common::{kvm_or_skip, profile_run, read_trace, scratch, u};
use kperf::trace::{
    DBG_FUNC_END, DBG_FUNC_START, PET_IDLE, PET_RUN, PET_SAMPLE, PET_SAMPLE_THREAD, TM_FIRE,
};
use serde_json::Value;

/// A kperf event id as the trace writes it.
fn event(id: u32) -> u64 {
    u64::from(id)
}
/// The PET period, ms; the lone `sleepy` thread sleeps 50 ms, across about
/// five PET fires.
const PET_PERIOD_MS: u64 = 10;

struct LightweightRun {
    summary: Value,
    trace: Vec<Value>,
    folded: String,
}

/// `--workload profile` on 3 vCPUs for 1.5 s (the last vCPU runs only a
/// thread that sleeps 50 ms at a time), with nothing but a lightweight PET
/// timer every 10 ms, the trace at its verbose level.
fn lightweight_run() -> LightweightRun {
    let dir = scratch("lightweight-pet");
    let trace_file = dir.join("trace.jsonl");
    let r = profile_run(
        "3",
        "1.5",
        &[
            "--pet-period-ms",
            &PET_PERIOD_MS.to_string(),
            "--lightweight-pet",
            "--profile-dir",
            dir.to_str().unwrap(),
            "--trace",
            trace_file.to_str().unwrap(),
            "--trace-level",
            "2",
        ],
    );
    let trace = read_trace(&trace_file);
    let folded = std::fs::read_to_string(dir.join("pet.folded")).expect("pet.folded");
    LightweightRun {
        summary: r.summary,
        trace,
        folded,
    }
}

fn arg(r: &Value, i: usize) -> u64 {
    r["args"][i].as_u64().unwrap()
}

fn is_pet_fire(r: &Value) -> bool {
    u(r, "id") == event(TM_FIRE) && arg(r, 1) == 1
}

/// Every guest thread's (vCPU, name, switches), by thread id.
fn threads(summary: &Value) -> BTreeMap<u64, (u64, String, u64)> {
    summary["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| {
            v["threads"].as_array().unwrap().iter().map(move |t| {
                let name = t["name"].as_str().unwrap().to_string();
                (u(t, "tid"), (u(v, "id"), name, u(t, "switches")))
            })
        })
        .collect()
}

#[test]
fn test_pet_l1_l2_c1_lightweight_pet_self_samples_once_per_stale_switch_on() {
    if !kvm_or_skip("lightweight PET") {
        return;
    }
    let run = lightweight_run();
    let sampling = &run.summary["sampling"];
    let threads = threads(&run.summary);

    // PET-L-1, PET-C-1: no PET one-shot, sampler thread or broadcast.
    assert_eq!(u(sampling, "pet_broadcasts"), 0, "{sampling}");
    assert_eq!(u(sampling, "pet_passes"), 0);
    assert!(run.trace.iter().all(|r| ![PET_RUN, PET_IDLE, PET_SAMPLE]
        .map(event)
        .contains(&(u(r, "id") & !3))));
    assert_eq!(u(&run.summary["guest_errors"], "pet_bad_requests"), 0);

    // The PET timer fires on the vCPUs every period; each fire's leader
    // bumps the generation, so a self-sample's generation (its first
    // argument, recorded under the same lock) is the number of PET fires
    // recorded before it.
    let mut fires = 0u64;
    let mut open: BTreeMap<u64, u64> = BTreeMap::new();
    let mut by_thread: BTreeMap<u64, Vec<[u64; 3]>> = BTreeMap::new();
    for r in &run.trace {
        let id = u(r, "id");
        if is_pet_fire(r) {
            fires += 1;
        } else if id == event(PET_SAMPLE_THREAD | DBG_FUNC_START) {
            let (generation, previous, switches) = (arg(r, 0), arg(r, 1), arg(r, 2));
            assert_eq!(generation, fires, "{r}");
            // The thread's last sample predates at least one bump: it was
            // switched off across it.
            assert!(previous < generation, "{r}");
            let tid = u(r, "tid");
            let (vcpu, name, _) = threads.get(&tid).unwrap_or_else(|| panic!("{r}"));
            assert_eq!(*vcpu, u(r, "vcpu"), "{name} samples itself on its own vCPU");
            assert!(open.insert(u(r, "vcpu"), tid).is_none(), "nested: {r}");
            by_thread
                .entry(tid)
                .or_default()
                .push([generation, previous, switches]);
        } else if id == event(PET_SAMPLE_THREAD | DBG_FUNC_END) {
            assert_eq!(open.remove(&u(r, "vcpu")), Some(u(r, "tid")), "{r}");
        }
    }
    assert!(open.is_empty());
    assert!(fires >= 100, "{fires} PET fires");
    let self_samples: usize = by_thread.values().map(Vec::len).sum();
    assert_eq!(u(sampling, "lightweight_self_samples"), self_samples as u64);

    for (tid, samples) in &by_thread {
        let (_, name, switches) = &threads[tid];
        // At most one self-sample per switch-on, and per generation (a
        // matching generation takes none): the switch counts and the
        // generations both strictly increase.
        assert!(samples.len() as u64 <= *switches, "{name}: {samples:?}");
        assert!(
            samples
                .windows(2)
                .all(|w| w[0][2] < w[1][2] && w[0][0] < w[1][0]),
            "{name}: {samples:?}"
        );
        // The stamp is the generation of the thread's previous sample.
        assert!(
            samples.windows(2).all(|w| w[1][1] >= w[0][0]),
            "{name}: {samples:?}"
        );
    }
    // Every thread that ran after a sleep or a wait sampled itself.
    for (tid, (_, name, switches)) in &threads {
        if !name.starts_with("split") {
            assert!(
                by_thread.get(tid).is_some_and(|s| !s.is_empty()),
                "{name} ({switches} switches) never sampled itself"
            );
        }
    }

    // PET-L-2 exactly: the lone sleepy thread on vCPU 2 sleeps 50 ms, across
    // about five PET fires, between its runs; each of its switch-ons after
    // the first fire gives exactly one self-sample, unless a PET fire on
    // vCPU 2 sampled the thread just as it was switched on, before the
    // guest's scheduler looked at its stamp (KT-SM-6). Such a switch-on is
    // a lone gap in the switch counts, and the next self-sample finds its
    // stamp: a generation at least three fires (most of a sleep) after the
    // self-sample before the gap. A fire while the thread ran just after
    // that self-sample stamps it one generation later at most. Only its
    // first switch-on (before the first fire) and its last (after sampling
    // stopped) may have neither.
    let (lone, (_, _, switches)) = threads
        .iter()
        .find(|(_, (vcpu, name, _))| *vcpu == 2 && name == "sleepy/2")
        .expect("sleepy/2");
    let samples = &by_thread[lone];
    let mut stamped = 0;
    for w in samples.windows(2) {
        let skipped = w[1][2] - w[0][2] - 1;
        if skipped > 0 {
            assert!(
                skipped == 1 && w[1][1] >= w[0][0] + 3,
                "switch-ons without a self-sample or a timer sample: {w:?} in {samples:?}"
            );
            stamped += skipped;
        }
    }
    assert!(
        *switches - samples.len() as u64 - stamped <= 2,
        "{switches} switch-ons, {} self-samples, {stamped} taken by a timer sample",
        samples.len()
    );
    let across_three = samples.iter().filter(|s| s[0] - s[1] >= 3).count();
    assert!(
        across_three * 10 >= samples.len() * 8 && across_three >= 10,
        "slept across three or more fires: {across_three} of {samples:?}"
    );

    // The self-sample of a thread just switched on is taken in the guest's
    // scheduler, at CPL0, and its user stack is the incoming thread's: the
    // sleepy thread blocked in its sleep system call.
    assert!(
        run.folded
            .lines()
            .any(|l| l.starts_with("sleepy/2;") && l.contains("sleepy_thread;sleep_ns;call;")),
        "{}",
        run.folded
    );
    // KT-SM-6: a split thread is sampled by the PET timer while it runs
    // (there is no other timer), and each such sample stamps it with the
    // generation. It runs 100 ms of round robin, across about ten fires, per
    // switch-on, so the stamp a self-sample finds (its second argument) is
    // newer than the generation of the thread's self-sample one switch-on
    // before; without the stamps it would be that generation. Whether a
    // switch-on finds the stamp still current (and so takes no sample)
    // depends on where the fires fall against the guest's round-robin ticks,
    // which is fixed for a run: either way is allowed.
    let mut split = 0;
    for (tid, (_, name, switches)) in &threads {
        if !name.starts_with("split") {
            continue;
        }
        split += 1;
        let samples = by_thread.get(tid).map_or(&[][..], Vec::as_slice);
        assert!(*switches >= 5, "{name}: {switches} switch-ons");
        let consecutive: Vec<_> = samples
            .windows(2)
            .filter(|w| w[1][2] == w[0][2] + 1)
            .collect();
        assert!(
            consecutive.iter().all(|w| w[1][1] > w[0][0]),
            "{name}: a self-sample found no stamp from the fires while it ran: {samples:?}"
        );
        // Without the stamps every switch-on after the first fire samples
        // itself (a quantum spans about ten fires), and the windows above
        // fail. With them, either switch-ons are stopped by a current stamp
        // (more than the first and last take no sample), or the thread
        // sampled itself on most and the windows above show the stamps.
        assert!(
            (samples.len() as u64) + 2 < *switches || consecutive.len() >= 3,
            "{name}: {switches} switch-ons, {samples:?}"
        );
    }
    assert_eq!(split, 2);
}
