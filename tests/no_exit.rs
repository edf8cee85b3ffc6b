//! The no-exit sampling tier on a real guest: `perf_event_open` cpu-clock
//! samples of the guest instruction pointer, taken in the host kernel while
//! the vCPU keeps running, attributed to guest threads through the guest's
//! context-switch log. Simulated: the `profile` workload (a thread per vCPU
//! splitting its time 60/30/10 over three leaf functions), sampled with the
//! no-exit, kick and hybrid tiers at 1 and 10 kHz.

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::{kvm_or_skip, profile_run, scratch, u};
use serde_json::Value;
use std::collections::BTreeMap;

/// Exits of every vCPU in a run's summary.
fn exits(summary: &Value) -> u64 {
    summary["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v["exits"].as_object().unwrap().values())
        .map(|n| n.as_u64().unwrap())
        .sum()
}

/// A 2-vCPU, 2-second profile run sampled every `period_us` with `tier`
/// (and `extra`), its profile in `dir`.
fn tier_run(dir: &std::path::Path, period_us: &str, tier: &str, extra: &[&str]) -> common::Run {
    let mut args = vec![
        "--sample-period-us",
        period_us,
        "--sample-tier",
        tier,
        "--profile-dir",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    profile_run("2", "2", &args)
}

/// Samples per (thread, leaf) and per thread in a folded profile.
fn leaves(folded: &str) -> (BTreeMap<(String, String), u64>, BTreeMap<String, u64>) {
    let (mut leaves, mut threads) = (BTreeMap::new(), BTreeMap::new());
    for line in folded.lines() {
        let (stack, count) = line.rsplit_once(' ').unwrap();
        let count: u64 = count.parse().unwrap();
        let thread = stack.split(';').next().unwrap().to_string();
        *threads.entry(thread.clone()).or_default() += count;
        for leaf in ["leaf_sixty", "leaf_thirty", "leaf_ten"] {
            let name = format!("metronome_guest::workloads::{leaf}");
            if stack.split(';').any(|f| f == name) {
                *leaves
                    .entry((thread.clone(), leaf.to_string()))
                    .or_default() += count;
            }
        }
    }
    (leaves, threads)
}

#[test]
fn test_no_exit_samples_name_the_leaves_and_threads_and_exits_do_not_follow_the_rate() {
    if !kvm_or_skip("no-exit tier") {
        return;
    }
    let slow_dir = scratch("no-exit-1k");
    let slow = tier_run(&slow_dir, "1000", "no-exit", &[]);
    let fast = tier_run(&scratch("no-exit-10k"), "100", "no-exit", &[]);
    let kick = tier_run(&scratch("kick-10k"), "100", "kick", &[]);

    let no_exit = &slow.summary["sampling"]["no_exit"];
    assert_eq!(no_exit["tier"], "no-exit", "{no_exit}");
    assert!(u(no_exit, "guest_user") > 500, "{no_exit}");
    assert_eq!(u(no_exit, "ring_errors"), 0, "{no_exit}");
    assert!(no_exit["open_error"].is_null(), "{no_exit}");
    assert!(u(no_exit, "switches") > 0, "{no_exit}");
    // No kick took a sample.
    assert_eq!(u(&slow.summary["sampling"], "samples"), 0);

    // Ten times the rate: about ten times the samples, not the exits.
    let fast_samples = u(&fast.summary["sampling"]["no_exit"], "samples");
    assert!(
        fast_samples > 3 * u(no_exit, "samples"),
        "10 kHz took {fast_samples} samples, 1 kHz {}",
        u(no_exit, "samples")
    );
    let (slow_exits, fast_exits, kick_exits) = (
        exits(&slow.summary),
        exits(&fast.summary),
        exits(&kick.summary),
    );
    assert!(
        fast_exits < 2 * slow_exits,
        "no-exit exits grew with the rate: {slow_exits} at 1 kHz, {fast_exits} at 10 kHz"
    );
    assert!(
        kick_exits > 3 * fast_exits,
        "the kick tier at 10 kHz exits {kick_exits} times, no-exit {fast_exits}"
    );

    // The designed split, per guest thread, by leaf function.
    let folded = std::fs::read_to_string(slow_dir.join("profile.folded")).unwrap();
    let (leaves, threads) = leaves(&folded);
    for vcpu in 0..2 {
        let thread = format!("split/{vcpu}");
        let total: u64 = ["leaf_sixty", "leaf_thirty", "leaf_ten"]
            .iter()
            .map(|l| {
                leaves
                    .get(&(thread.clone(), l.to_string()))
                    .copied()
                    .unwrap_or(0)
            })
            .sum();
        assert!(total > 100, "{thread}: {total} leaf samples in {threads:?}");
        for (leaf, designed) in [
            ("leaf_sixty", 60.0),
            ("leaf_thirty", 30.0),
            ("leaf_ten", 10.0),
        ] {
            let n = leaves
                .get(&(thread.clone(), leaf.to_string()))
                .copied()
                .unwrap_or(0);
            let share = 100.0 * n as f64 / total as f64;
            assert!(
                (share - designed).abs() <= 12.0,
                "{thread} {leaf}: {share:.1}% vs designed {designed}%"
            );
        }
    }
    // Every leaf sample belongs to a split thread: the attribution is right.
    assert!(
        leaves
            .keys()
            .all(|(thread, _)| thread.starts_with("split/")),
        "{leaves:?}"
    );
}

#[test]
fn test_hybrid_takes_stacks_every_nth_period_beside_the_no_exit_samples() {
    if !kvm_or_skip("hybrid tier") {
        return;
    }
    let dir = scratch("hybrid");
    let r = tier_run(&dir, "1000", "hybrid", &["--kick-every", "10"]);
    let sampling = &r.summary["sampling"];
    let kicks = u(sampling, "samples");
    let no_exit = u(&sampling["no_exit"], "samples");
    assert_eq!(sampling["no_exit"]["tier"], "hybrid");
    // Kicks at a tenth of the rate: at most 2 vCPUs x 2 s x 100 Hz, with a
    // margin; the no-exit samples (only while a vCPU thread runs) several
    // times more.
    assert!((50..=600).contains(&kicks), "{sampling}");
    assert!(
        no_exit > 2 * kicks,
        "{no_exit} no-exit vs {kicks} kick samples"
    );
    // The kick samples carry the whole call chain.
    let folded = std::fs::read_to_string(dir.join("profile.folded")).unwrap();
    assert!(
        folded
            .lines()
            .any(|l| l.contains("split_outer;metronome_guest::workloads::mid_thirty")),
        "no stack from a kick in:\n{folded}"
    );
}

#[test]
fn test_tier_options_are_validated_with_one_clear_error() {
    for (args, needle) in [
        (
            &["--sample-period-us", "1000", "--sample-tier", "fast"][..],
            "unknown sampling tier 'fast': kick, no-exit or hybrid",
        ),
        (
            &[
                "--sample-period-us",
                "1000",
                "--sample-tier",
                "hybrid",
                "--kick-every",
                "1",
            ][..],
            "kick_every 1 is refused",
        ),
        (
            &[
                "--sample-period-us",
                "1000",
                "--sample-tier",
                "no-exit",
                "--kick-every",
                "5",
            ][..],
            "given with \"tier\": \"hybrid\" only",
        ),
        (
            &[
                "--sample-period-us",
                "1000",
                "--pet-period-ms",
                "10",
                "--sample-tier",
                "no-exit",
            ][..],
            "it is the PET timer",
        ),
    ] {
        common::assert_refused(args, needle);
    }
}
