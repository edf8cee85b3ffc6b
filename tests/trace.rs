//! The trace as one timeline (spec section 6) on a real KVM guest: kperf's
//! timer fires and samples, the PET sampler, and the guest's own clock
//! dispatches and thread switches from its per-vCPU event rings, written as
//! Chrome trace-event JSON (`trace.json` in the profile directory) and read
//! back with serde_json as a consumer would: the tracks, the event names, the
//! slices, TR-P-5 on the merged timeline, and the guest events against the
//! guest's own counters.

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use std::collections::{BTreeMap, BTreeSet};

use common::{kvm_or_skip, profile_run, scratch, u};
use serde_json::Value;

/// The events named `name`.
fn named<'a>(events: &'a [Value], name: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["name"] == name).collect()
}

/// The `thread_name` metadata: (pid, tid) to name.
fn track_names(events: &[Value]) -> BTreeMap<(u64, u64), String> {
    named(events, "thread_name")
        .into_iter()
        .map(|e| {
            (
                (u(e, "pid"), u(e, "tid")),
                e["args"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn ts(e: &Value) -> f64 {
    e["ts"].as_f64().expect("ts")
}

#[test]
fn test_trace_json_one_timeline_of_fires_samples_dispatches_and_switches() {
    if !kvm_or_skip("trace.json") {
        return;
    }
    let vcpus: u32 = 2;
    let dir = scratch("timeline");
    let also = dir.join("also.json");
    // The default duration, 3 s.
    let r = profile_run(
        &vcpus.to_string(),
        "3",
        &[
            "--sample-period-us",
            "1000",
            "--pet-period-ms",
            "10",
            "--profile-dir",
            dir.to_str().unwrap(),
            "--trace",
            also.to_str().unwrap(),
            "--trace-level",
            "2",
        ],
    );
    let sampling = &r.summary["sampling"];
    assert_eq!(u(sampling, "trace_dropped"), 0, "{sampling}");
    let text = std::fs::read_to_string(dir.join("trace.json")).expect("trace.json");
    let trace: Value = serde_json::from_str(&text).expect("trace.json is JSON");
    let events = trace["traceEvents"].as_array().expect("traceEvents");
    // `--trace FILE.json` writes the same timeline.
    let again: Value =
        serde_json::from_str(&std::fs::read_to_string(&also).expect("--trace file")).unwrap();
    assert_eq!(again["traceEvents"].as_array().unwrap().len(), events.len());

    // The tracks: the three processes, a track per vCPU, per guest thread
    // (the summary's threads, by name) and the PET sampler.
    let processes: BTreeSet<&str> = named(events, "process_name")
        .iter()
        .map(|e| e["args"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        processes,
        BTreeSet::from(["vCPUs", "guest threads", "PET sampler"])
    );
    let tracks = track_names(events);
    for v in 0..vcpus {
        assert_eq!(tracks[&(1, u64::from(v) + 1)], format!("vCPU {v}"));
    }
    assert_eq!(tracks[&(3, 1)], "kperf-pet-sampling");
    let threads: Vec<(u64, String)> = r
        .vcpus()
        .iter()
        .flat_map(|v| v["threads"].as_array().unwrap())
        .map(|t| (u(t, "tid"), t["name"].as_str().unwrap().to_string()))
        .collect();
    assert!(threads.len() >= 8, "4 threads a vCPU: {threads:?}");
    for (tid, name) in &threads {
        assert_eq!(tracks[&(2, *tid)], format!("{name} ({tid})"), "{tracks:?}");
    }

    // The event names, and every slice well formed.
    let names: BTreeSet<&str> = events.iter().filter_map(|e| e["name"].as_str()).collect();
    for name in [
        "TM_FIRE",
        "TM_HNDLR",
        "clockintr dispatch",
        "thread switch",
        "running",
        "PET_SAMPLE",
        "PET_SAMPLE_THREAD",
        "PET_SCHED",
    ] {
        assert!(names.contains(name), "{name} missing: {names:?}");
    }
    for e in events {
        let ph = e["ph"].as_str().expect("ph");
        assert!(matches!(ph, "M" | "X" | "i"), "{e}");
        if ph == "X" {
            assert!(e["dur"].as_f64().expect("dur") >= 0.0, "{e}");
        }
    }
    // Slices on one track nest (a sample inside a dispatch, a thread's
    // sample inside the PET pass) and never partly overlap: what Perfetto's
    // JSON importer needs to draw them as one stack per track.
    let mut slices: BTreeMap<(u64, u64), Vec<(f64, f64)>> = BTreeMap::new();
    for e in events.iter().filter(|e| e["ph"] == "X") {
        let (start, dur) = (ts(e), e["dur"].as_f64().unwrap());
        slices
            .entry((u(e, "pid"), u(e, "tid")))
            .or_default()
            .push((start, start + dur));
    }
    for (track, mut spans) in slices {
        spans.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
        let mut open: Vec<f64> = Vec::new();
        for (start, end) in spans {
            // 1 ns of slack for the float microseconds.
            while open.last().is_some_and(|&e| e <= start + 1e-3) {
                open.pop();
            }
            if let Some(&outer) = open.last() {
                assert!(
                    end <= outer,
                    "track {track:?}: [{start}, {end}] overlaps its parent"
                );
            }
            open.push(end);
        }
    }
    // Samples carry the real thread: a guest thread id, or 0 for idle.
    let known: BTreeSet<u64> = threads.iter().map(|(tid, _)| *tid).collect();
    let samples = named(events, "TM_HNDLR");
    assert!(samples.iter().all(|s| {
        let tid = u(&s["args"], "tid");
        tid == 0 || known.contains(&tid)
    }));
    assert!(
        samples.iter().filter(|s| u(&s["args"], "tid") != 0).count() * 2 > samples.len(),
        "most samples find a guest thread running"
    );
    for s in named(events, "PET_SAMPLE_THREAD") {
        assert_eq!(s["args"]["tid"], s["args"]["thread"]);
        assert!(known.contains(&u(&s["args"], "tid")));
    }

    // TR-P-5 on the merged timeline: every TM_HNDLR starts at or after the
    // TM_FIRE of its timer's fire; on the on-CPU timer each vCPU answers a
    // fire at most once.
    let mut timeline: Vec<(f64, u8, &Value)> = named(events, "TM_FIRE")
        .into_iter()
        .map(|e| (ts(e), 0, e))
        .chain(samples.iter().map(|e| (ts(e), 1, *e)))
        .collect();
    timeline.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut current: BTreeMap<u64, (usize, bool)> = BTreeMap::new();
    let mut answered: BTreeSet<(u64, usize, u64)> = BTreeSet::new();
    let mut fires = 0;
    for (_, kind, e) in &timeline {
        let timer = u(&e["args"], "timer");
        if *kind == 0 {
            fires += 1;
            current.insert(timer, (fires, u(&e["args"], "pet") == 1));
            continue;
        }
        let (fire, pet) = *current
            .get(&timer)
            .unwrap_or_else(|| panic!("TM_HNDLR before any TM_FIRE of timer {timer}: {e}"));
        if !pet {
            assert!(
                answered.insert((timer, fire, u(e, "tid"))),
                "vCPU track {} answered fire {fire} twice",
                u(e, "tid")
            );
        }
    }
    assert!(fires > 1000, "{fires}");

    // The guest's events against its own counters, per vCPU: dispatches are
    // prompt + early + spurious, switches are context_switches, less what
    // the ring dropped (counted).
    for v in r.vcpus() {
        let id = u(v, "id");
        let track = id + 1;
        let on_track = |name: &str| {
            named(events, name)
                .iter()
                .filter(|e| u(e, "pid") == 1 && u(e, "tid") == track)
                .count() as u64
        };
        let c = &v["clockintr"];
        let expected_dispatches = u(c, "prompt") + u(c, "early") + u(c, "spurious");
        let expected_switches = u(v, "context_switches");
        let (dispatches, switches) = (on_track("clockintr dispatch"), on_track("thread switch"));
        let ring = &sampling["vcpus"][id as usize];
        let dropped = u(ring, "trace_ring_dropped");
        assert!(dispatches <= expected_dispatches && switches <= expected_switches);
        assert_eq!(
            (expected_dispatches - dispatches) + (expected_switches - switches),
            dropped,
            "vCPU {id}: {dispatches} of {expected_dispatches} dispatches, \
             {switches} of {expected_switches} switches, {dropped} dropped"
        );
        assert_eq!(u(ring, "trace_guest_events"), dispatches + switches);
        assert!(dispatches > 100 && switches > 10, "vCPU {id}");
        // Each switch in the right order on its vCPU: the thread switched
        // out is the one the previous switch put in.
        let mut last_in = None;
        let mut vcpu_switches: Vec<&Value> = named(events, "thread switch")
            .into_iter()
            .filter(|e| u(e, "tid") == track)
            .collect();
        vcpu_switches.sort_by(|a, b| ts(a).total_cmp(&ts(b)));
        for s in vcpu_switches {
            if let Some(previous) = last_in {
                assert_eq!(u(&s["args"], "from"), previous, "{s}");
            }
            last_in = Some(u(&s["args"], "to"));
        }
    }
    assert_eq!(
        u(sampling, "trace_ring_dropped"),
        0,
        "nothing overflows at this rate"
    );
}
