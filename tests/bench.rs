//! `metronome bench --quick`, the CI smoke run of the benchmark: one real
//! process booting real KVM guests. Checks the JSON has every key the issue
//! lists with sane values (counts above 0, ordered percentiles, no early
//! delivery, the three rates, finite overheads), the Markdown has its tables,
//! and the SVG histograms parse as XML and render with `rsvg-convert`
//! (required under `CI=true`). It asserts nothing about the figures' targets:
//! this machine is noisy, and the targets are the README's.

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::{in_ci, kvm_or_skip, metronome, run_tool, scratch};

use quick_xml::events::Event;
use quick_xml::Reader;
use serde_json::Value;

fn number(value: &Value, path: &str) -> f64 {
    let mut at = value;
    for key in path.split('.') {
        at = &at[key];
    }
    at.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number: {at}"))
}

fn check_percentiles(p: &Value, what: &str) {
    let values: Vec<f64> = ["p50", "p90", "p99", "p999", "max"]
        .iter()
        .map(|k| number(p, k))
        .collect();
    assert!(values[0] > 0.0, "{what}: p50 is 0: {p}");
    assert!(
        values.windows(2).all(|w| w[0] <= w[1]),
        "{what}: p50 <= p90 <= p99 <= p999 <= max: {p}"
    );
}

/// Parses `svg` as XML and returns its `<text>` contents.
fn svg_texts(svg: &str) -> Vec<String> {
    let mut reader = Reader::from_str(svg);
    let (mut texts, mut in_text, mut root) = (Vec::new(), false, None);
    loop {
        match reader.read_event().expect("the SVG is well-formed XML") {
            Event::Start(e) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                root.get_or_insert(name.clone());
                in_text = name == "text";
            }
            Event::Text(t) if in_text => {
                texts.push(String::from_utf8_lossy(&t).trim().to_string());
            }
            Event::End(_) => in_text = false,
            Event::Eof => break,
            _ => {}
        }
    }
    assert_eq!(root.as_deref(), Some("svg"), "the root element is <svg>");
    texts
}

#[test]
fn test_quick_bench_writes_every_figure_and_its_tables_and_plots() {
    if !kvm_or_skip("bench --quick") {
        return;
    }
    let _serial = common::kvm_lock();
    let json_path = scratch("bench.json");
    let md_path = scratch("bench.md");
    let svg_dir = scratch("bench-svg");
    let output = metronome()
        .args(["bench", "--quick", "--json"])
        .arg(&json_path)
        .arg("--markdown")
        .arg(&md_path)
        .arg("--svg-dir")
        .arg(&svg_dir)
        .output()
        .expect("run metronome bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed: {stderr}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap())
        .expect("the JSON parses");

    for key in ["cpu", "kernel", "kvm_module"] {
        let text = report["host"][key].as_str().unwrap_or_default();
        assert!(!text.is_empty(), "host.{key}: {report}");
    }
    assert!(number(&report, "host.cores") >= 1.0);

    for (mode, advance) in [
        ("halted", true),
        ("busy", true),
        ("without_advance.halted", false),
        ("without_advance.busy", false),
    ] {
        let mut t = &report["timer"];
        for key in mode.split('.') {
            t = &t[key];
        }
        for side in ["guest_ns", "host_ns", "host_floor_ns"] {
            check_percentiles(&t[side], &format!("timer.{mode}.{side}"));
        }
        assert!(number(t, "count") >= 1000.0, "--quick delivers 1000: {t}");
        assert_eq!(number(t, "early"), 0.0, "no delivery before its deadline");
        assert!(number(t, "host_floor_count") > 0.0, "{t}");
        assert_eq!(t["advance"]["enabled"], advance, "timer.{mode}: {t}");
        let learned = number(&t["advance"], "running_advance_ns")
            .max(number(&t["advance"], "halted_advance_ns"));
        assert!(learned <= 50_000.0, "advance within 0..=50 us: {t}");
        for key in ["advance_wait_ns_per_delivery", "advance_guest_time_pct"] {
            let value = number(t, key);
            assert!(value.is_finite() && value >= 0.0, "{key}: {t}");
            assert!(value == 0.0 || advance, "no wait without advance: {t}");
        }
    }

    let sampling = &report["sampling"];
    assert!(number(sampling, "baseline_ops_per_s") > 0.0);
    let rates = sampling["rates"].as_array().expect("sampling.rates");
    let hz: Vec<f64> = rates.iter().map(|r| number(r, "hz")).collect();
    assert_eq!(hz, [1000.0, 10000.0, 20000.0]);
    for rate in rates {
        assert_eq!(rate["tier"], "kick");
        for key in [
            "metronome_overhead_pct",
            "achieved_hz",
            "missed_fires",
            "cost_per_sample_us",
        ] {
            assert!(number(rate, key).is_finite(), "{key}: {rate}");
        }
        assert!(
            number(rate, "achieved_hz") > 0.0,
            "samples were taken: {rate}"
        );
        // perf's figure is a number, or null with the reason given.
        match &rate["perf_overhead_pct"] {
            Value::Null => assert!(
                sampling["perf_unavailable"].is_string(),
                "a null perf figure says why: {sampling}"
            ),
            v => assert!(v.as_f64().is_some_and(f64::is_finite), "{rate}"),
        }
    }
    if rates[0]["perf_overhead_pct"].is_null() {
        eprintln!("note: perf did not run: {}", sampling["perf_unavailable"]);
    }
    assert!(number(&report, "boot.first_dispatch_ms") > 0.0);
    assert!(number(&report, "footprint.vmm_rss_mib") > 0.0);

    let markdown = std::fs::read_to_string(&md_path).unwrap();
    for header in [
        "| timer lateness (us) | p50 | p90 | p99 | p99.9 | max | count | early |",
        "| busy, no advance, host |",
        "| timer advance | learned (us) |",
        "| 1 kHz | kick |",
        "| 20 kHz | kick |",
        "| target | this run | met |",
    ] {
        assert!(
            markdown.contains(header),
            "missing '{header}' in:\n{markdown}"
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("| timer lateness (us) |"),
        "the tables are printed"
    );

    for mode in ["halted", "busy"] {
        let path = svg_dir.join(format!("timer_{mode}.svg"));
        let svg = std::fs::read_to_string(&path).expect("the SVG was written");
        let texts = svg_texts(&svg);
        assert!(
            texts
                .iter()
                .any(|t| t == &format!("Timer lateness, {mode} vCPU")),
            "title in {texts:?}"
        );
        assert!(
            texts.iter().any(|t| t.starts_with("host floor")),
            "legend in {texts:?}"
        );
        let png = path.with_extension("png");
        let args = [
            "-o",
            png.to_str().expect("UTF-8 path"),
            path.to_str().expect("UTF-8 path"),
        ];
        match run_tool("rsvg-convert", &args) {
            Some(out) => {
                assert!(out.status.success(), "rsvg-convert failed: {out:?}");
                let bytes = std::fs::read(&png).expect("the PNG was written");
                assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG file");
            }
            None if in_ci() => {
                panic!("CI=true but rsvg-convert is not on PATH (apt-get install librsvg2-bin)")
            }
            None => eprintln!("skip: rsvg-convert is not on PATH, the SVG was not rendered"),
        }
    }
}

#[test]
fn test_bench_refuses_an_unknown_option_with_one_line() {
    let output = metronome()
        .args(["bench", "--quick", "--rates", "5"])
        .output()
        .expect("run metronome bench");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--rates"), "{stderr}");
}
