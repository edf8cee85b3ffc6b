//! The API socket end to end: a real `metronome --api-sock` process and a
//! real HTTP client (`curl --unix-socket`) drive a whole session on a KVM
//! guest: configure, start, pause, resume, read clockintr, exit; the bad
//! inputs answer with Firecracker-shaped errors; SIGTERM ends the server and
//! removes the socket; an existing socket path is refused; `--config-file`
//! with `--api-sock` serves a running instance, whose Resume re-synchronises
//! clockintr and kptimer. Every answer is checked against the
//! OpenAPI document (`common/openapi_check.rs`).

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::api::{call, call_text, fault, Server};
use common::openapi_check;
use common::{kvm_lock, kvm_or_skip, metronome, scratch};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A KVM session: the VM lock, a server writing its summary to the path.
fn kvm_session(test: &str) -> Option<(std::sync::MutexGuard<'static, ()>, Server, PathBuf)> {
    if !kvm_or_skip(test) {
        return None;
    }
    let serial = kvm_lock();
    let summary_path = scratch("summary.json");
    let server = Server::start(&["--summary-json", summary_path.to_str().unwrap()]);
    Some((serial, server, summary_path))
}

/// The summary the server wrote with `--summary-json`.
fn written_summary(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("summary written"))
        .expect("summary is JSON")
}

#[test]
fn test_api_session_on_a_real_guest() {
    let Some((_serial, server, summary_path)) = kvm_session("api session") else {
        return;
    };
    assert_eq!(server.state(), "Not started");

    // Pre-boot configuration, read back.
    let machine = r#"{"vcpu_count": 2, "mem_size_mib": 96}"#;
    assert_eq!(server.call("PUT", "/machine-config", Some(machine)).0, 204);
    let (status, got) = server.call("GET", "/machine-config", None);
    assert_eq!((status, got), (200, serde_json::from_str(machine).unwrap()));
    let boot = r#"{"workload": "profile", "duration_s": 600}"#;
    assert_eq!(server.call("PUT", "/boot-source", Some(boot)).0, 204);
    let (_, got) = server.call("GET", "/boot-source", None);
    assert_eq!(got["duration_s"], 600.0);
    assert_eq!(got["kernel_image_path"], Value::Null);
    let clock = r#"{"hz": 128, "stathz": 128, "profhz": 1024, "randomize_statclock": false}"#;
    assert_eq!(server.call("PUT", "/clock", Some(clock)).0, 204);
    let (_, got) = server.call("GET", "/clock", None);
    assert_eq!(got["hz"], 128);
    assert_eq!(got["profhz"], 1024);
    assert_eq!(got["randomize_statclock"], false);

    // Bad input: the status, and a message that says what is wrong.
    let answer = server.call("PUT", "/machine-config", Some("{\"vcpu_count\": 2,"));
    assert_eq!(answer.0, 400);
    assert!(
        fault(&answer).starts_with("invalid request body: EOF"),
        "{answer:?}"
    );
    let answer = server.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 96, "vcpus": 2}"#),
    );
    assert_eq!(answer.0, 400);
    assert!(
        fault(&answer).contains("unknown field `vcpus`"),
        "{answer:?}"
    );
    let answer = server.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": "2", "mem_size_mib": 96}"#),
    );
    assert_eq!(answer.0, 400);
    assert!(fault(&answer).contains("expected u32"), "{answer:?}");
    let answer = server.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 65, "mem_size_mib": 96}"#),
    );
    assert_eq!(answer.0, 400);
    assert_eq!(
        fault(&answer),
        "vcpu_count 65 is out of range: a VM has 1 to 64 vCPUs"
    );
    let answer = server.call("PUT", "/clock", Some(r#"{"hz": 100, "stathz": 0}"#));
    assert_eq!(answer.0, 400);
    assert!(
        fault(&answer).contains("stathz 0 is out of range: 1 to 1000000000"),
        "{answer:?}"
    );
    let answer = server.call("GET", "/no-such-thing", None);
    assert_eq!(answer.0, 404);
    assert!(fault(&answer).contains("no such path '/no-such-thing'"));
    let answer = server.call("PUT", "/summary", Some("{}"));
    assert_eq!(answer.0, 405);
    assert_eq!(
        fault(&answer),
        "method PUT is not allowed on /summary: allowed GET"
    );
    let big = format!(r#"{{"hz": 100, "x": "{}"}}"#, "a".repeat(70 * 1024));
    let answer = server.call("PUT", "/clock", Some(&big));
    assert_eq!(answer.0, 413);
    // Refused changes were not kept.
    let (_, got) = server.call("GET", "/machine-config", None);
    assert_eq!(got["vcpu_count"], 2);

    // kperf before start: one action, one 10 ms timer, sampling off.
    let put = |path: &str, body: &str| server.call("PUT", path, Some(body));
    one_action_one_timer(
        &server,
        r#"{"samplers": ["th_info", "ustack"], "user_stack_depth": 32}"#,
        r#"{"period_ns": 10000000, "action_id": 1}"#,
    );

    // Start; the pre-boot sections are closed; pause and resume.
    assert_eq!(server.action("InstanceStart").0, 204);
    assert_eq!(server.state(), "Running");
    let answer = server.action("InstanceStart");
    assert_eq!(answer.0, 400);
    assert!(fault(&answer).contains("allowed once"), "{answer:?}");
    let answer = server.call("PUT", "/machine-config", Some(machine));
    assert_eq!(answer.0, 400);
    assert!(fault(&answer).contains("pre-boot only"), "{answer:?}");
    let answer = server.call("PUT", "/clock", Some(clock));
    assert_eq!(answer.0, 400);
    assert!(fault(&answer).contains("pre-boot only"), "{answer:?}");
    assert_eq!(server.action("Pause").0, 204);
    assert_eq!(server.state(), "Paused");
    let answer = server.action("Pause");
    assert_eq!(answer.0, 400);
    assert_eq!(fault(&answer), "Pause refused: the VM is already paused");
    assert_eq!(server.action("Resume").0, 204);
    assert_eq!(server.state(), "Running");

    // The clock runs: clockintr figures grow with the guest clock.
    let (status, first) = server.call("GET", "/clockintr", None);
    assert_eq!(status, 200);
    assert_eq!(first["vcpus"].as_array().unwrap().len(), 2);
    assert!(first["dump"]
        .as_str()
        .unwrap()
        .contains("clockintr_hardclock"));
    until_uptime(&server, first["uptime_ns"].as_u64().unwrap() + 200_000_000);
    let (_, later) = server.call("GET", "/clockintr", None);
    assert!(later["total"]["run"].as_u64() > first["total"]["run"].as_u64());

    // Sampling on; a profile fetched while the guest runs names the
    // workload's leaf functions.
    assert_eq!(put("/kperf/sampling", r#"{"on": true}"#).0, 204);
    counter_above(&server, "samples", 0);
    let start = Instant::now();
    let folded = loop {
        let (status, content_type, text) = call_text(&server.socket, "GET", "/profile", None);
        assert_eq!(status, 200, "{text}");
        assert_eq!(content_type, "text/plain; charset=utf-8");
        if ["leaf_sixty", "leaf_thirty", "leaf_ten"]
            .iter()
            .all(|leaf| text.contains(leaf))
        {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the running profile never named every leaf:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Each stack starts with its guest thread: the splitter runs the leaves.
    assert!(
        folded
            .lines()
            .any(|line| line.starts_with("split") && line.contains("leaf_sixty")),
        "{folded}"
    );

    // Pause and resume while sampling: no clockintr burst, kptimer cadence kept.
    resume_resynchronises(&server, 128, 10_000_000);

    // Sampling off (synchronous): while the guest clock runs on by 20
    // periods, no sample is taken and no timer fires.
    assert_eq!(put("/kperf/sampling", r#"{"on": false}"#).0, 204);
    let stopped = counters(&server);
    assert_eq!(stopped["sampling"], "off");
    let (now, _) = clocks(&server);
    until_uptime(&server, now + 200_000_000);
    let after = counters(&server);
    assert_eq!(after["samples"], stopped["samples"]);
    assert_eq!(after["timer_fires"], stopped["timer_fires"]);

    // Metrics in both formats, the Prometheus text read by a real parser.
    let json = metrics(&server);
    assert_eq!(json["state"], "Running");
    assert!(vcpu_sum(&json, "timer_deliveries") > 0, "{json}");
    assert!(json["kperf"]["samples"].as_u64() > Some(0), "{json}");
    let (status, _, text) = call_text(&server.socket, "GET", "/metrics?format=prometheus", None);
    assert_eq!(status, 200);
    if let Some(families) = prometheus_parse(&text) {
        let samples = sample(
            &families,
            "metronome_kperf_samples",
            "metronome_kperf_samples_total",
            &[],
        );
        assert!(samples >= stopped["samples"].as_f64().unwrap(), "{text}");
    }
    let (status, running) = server.call("GET", "/summary", None);
    assert_eq!(status, 200);
    assert_eq!(running["state"], "Running");
    assert!(running["guest_uptime_ns"].as_u64().unwrap() > 0);

    // Exit: the summary is the run's.
    assert_eq!(server.action("SendExit").0, 204);
    assert_eq!(server.state(), "Exited");
    let (status, summary) = server.call("GET", "/summary", None);
    assert_eq!(status, 200);
    assert_eq!(summary["outcome"], "stopped");
    assert_eq!(summary["vcpu_count"], 2);
    assert_eq!(summary["mem_mib"], 96);
    assert_eq!(summary["config"]["hz"], 128);
    assert!(summary["sampling"]["samples"].as_u64() > Some(0));
    assert_eq!(written_summary(&summary_path)["outcome"], "stopped");
    let answer = server.action("Resume");
    assert_eq!(answer.0, 400);
    assert!(
        fault(&answer).contains("the instance is Exited"),
        "{answer:?}"
    );

    // The server stays up after the guest exited, until SIGTERM.
    assert_eq!(server.terminate(), 0);
}

/// kperf with one action (`action`) and one timer (`timer`, id 0).
fn one_action_one_timer(server: &Server, action: &str, timer: &str) {
    let put = |path: &str, body: &str| server.call("PUT", path, Some(body));
    assert_eq!(put("/kperf/action-count", r#"{"count": 1}"#).0, 204);
    assert_eq!(put("/kperf/timer-count", r#"{"count": 1}"#).0, 204);
    assert_eq!(put("/kperf/actions/1", action).0, 204);
    assert_eq!(put("/kperf/timers/0", timer).0, 204);
}

/// `GET /kperf/counters`.
fn counters(server: &Server) -> Value {
    let (status, counters) = server.call("GET", "/kperf/counters", None);
    assert_eq!(status, 200, "{counters:?}");
    counters
}

/// Polls `GET /kperf/counters` until `field` exceeds `above` (5 s at most).
fn counter_above(server: &Server, field: &str, above: u64) -> u64 {
    let start = Instant::now();
    loop {
        let value = counters(server)[field].as_u64().expect(field);
        if value > above {
            return value;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{field} stayed at {value}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn test_api_kperf_on_a_real_guest() {
    let Some((_serial, server, summary_path)) = kvm_session("api kperf") else {
        return;
    };
    let put = |path: &str, body: &str| server.call("PUT", path, Some(body));
    // A fresh instance has no action: sampling cannot be turned on.
    let answer = put("/kperf/sampling", r#"{"on": true}"#);
    assert_eq!(answer.0, 400);
    assert!(fault(&answer).contains("ECANCELED, CFG-S-1"), "{answer:?}");

    // Configured before start, sampling off.
    let machine = r#"{"vcpu_count": 2, "mem_size_mib": 96}"#;
    assert_eq!(put("/machine-config", machine).0, 204);
    let boot = r#"{"workload": "profile", "duration_s": 600}"#;
    assert_eq!(put("/boot-source", boot).0, 204);
    let action = r#"{"samplers": ["th_info", "kstack"], "kernel_stack_depth": 16}"#;
    let timer = r#"{"period_ns": 1000000, "action_id": 1}"#;
    one_action_one_timer(&server, action, timer);
    assert_eq!(server.action("InstanceStart").0, 204);
    let (_, sampling) = server.call("GET", "/kperf/sampling", None);
    assert_eq!(sampling["on"], false);
    assert_eq!(counters(&server)["samples"], 0);
    let (_, got) = server.call("GET", "/kperf/actions/1", None);
    assert_eq!(got["kernel_stack_depth"], 16);

    // Sampling on: samples and timer fires grow.
    assert_eq!(put("/kperf/sampling", r#"{"on": true}"#).0, 204);
    assert_eq!(counters(&server)["sampling"], "on");
    counter_above(&server, "samples", 0);
    counter_above(&server, "timer_fires", 0);
    // Timers are busy while sampling (EBUSY); actions are not (CFG-A-4).
    let answer = put("/kperf/timers/0", timer);
    assert_eq!(answer.0, 409);
    assert!(
        fault(&answer).starts_with("PUT /kperf/timers refused: kperf is busy"),
        "{answer:?}"
    );
    assert_eq!(put("/kperf/timer-count", r#"{"count": 2}"#).0, 409);
    assert_eq!(put("/kperf/actions/1", action).0, 204);
    // Ids beyond the counts.
    let answer = server.call("GET", "/kperf/actions/2", None);
    assert_eq!(answer.0, 404);
    assert!(fault(&answer).contains("CFG-A-2"), "{answer:?}");
    assert_eq!(put("/kperf/timers/1", timer).0, 404);

    // Sampling off (synchronous): the counters stop growing.
    assert_eq!(put("/kperf/sampling", r#"{"on": false}"#).0, 204);
    let stopped = counters(&server);
    assert_eq!(stopped["sampling"], "off");
    let (now, _) = clocks(&server);
    until_uptime(&server, now + 200_000_000);
    assert_eq!(counters(&server)["samples"], stopped["samples"]);
    assert_eq!(counters(&server)["timer_fires"], stopped["timer_fires"]);

    // Off, the timers can change; the period is raised to the minimum.
    let fast = r#"{"period_ns": 1000, "action_id": 1}"#;
    assert_eq!(put("/kperf/timers/0", fast).0, 204);
    let (_, got) = server.call("GET", "/kperf/timers/0", None);
    assert_eq!(got["period_ns"], 20_000);

    // PET configured at run time: its sampler thread is created when
    // sampling is turned on (PET-T-1), and its passes re-arm it.
    assert_eq!(put("/kperf/timers/0", timer).0, 204);
    assert_eq!(put("/kperf/timer-count", r#"{"count": 2}"#).0, 204);
    let pet_timer = r#"{"period_ns": 5000000, "action_id": 1}"#;
    assert_eq!(put("/kperf/timers/1", pet_timer).0, 204);
    assert_eq!(put("/kperf/pet", r#"{"timer_id": 1}"#).0, 204);
    let (_, pet) = server.call("GET", "/kperf/pet", None);
    assert_eq!(
        (pet["timer_id"].as_u64(), pet["lightweight"].as_bool()),
        (Some(1), Some(false))
    );
    assert_eq!(put("/kperf/sampling", r#"{"on": true}"#).0, 204);
    counter_above(&server, "pet_broadcasts", 3);
    assert_eq!(put("/kperf/pet", r#"{"timer_id": 0}"#).0, 409);
    // The idle rate may change while sampling (CFG-P-1).
    assert_eq!(
        put("/kperf/pet", r#"{"timer_id": 1, "idle_rate": 3}"#).0,
        204
    );

    // Reset: sampling off, timers back to 0, the counts kept (CFG-R-1).
    assert_eq!(server.call("PUT", "/kperf/reset", None).0, 204);
    assert_eq!(counters(&server)["sampling"], "off");
    let (_, got) = server.call("GET", "/kperf/timers/0", None);
    assert_eq!(got["period_ns"], 0);
    let (_, count) = server.call("GET", "/kperf/timer-count", None);
    assert_eq!(count["count"], 2);

    assert_eq!(server.action("SendExit").0, 204);
    let summary = written_summary(&summary_path);
    assert!(
        summary["sampling"]["samples"].as_u64() > Some(0),
        "{}",
        summary["sampling"]
    );
    let answer = server.call("GET", "/kperf/counters", None);
    assert_eq!(answer.0, 400);
    assert!(fault(&answer).contains("has exited"), "{answer:?}");
    assert_eq!(server.terminate(), 0);
}

#[test]
fn test_api_sigterm_stops_a_running_vm() {
    let Some((_serial, server, summary_path)) = kvm_session("api sigterm") else {
        return;
    };
    assert_eq!(
        server
            .call("PUT", "/boot-source", Some(r#"{"duration_s": 600}"#))
            .0,
        204
    );
    assert_eq!(server.action("InstanceStart").0, 204);
    assert_eq!(server.terminate(), 0);
    assert_eq!(written_summary(&summary_path)["outcome"], "signal");
}

#[test]
fn test_api_existing_socket_path_is_refused_unless_forced() {
    let socket = scratch("taken.sock");
    std::fs::write(&socket, "").unwrap();
    let output = metronome()
        .arg("--api-sock")
        .arg(&socket)
        .output()
        .expect("run metronome");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("exists"), "{stderr}");
    assert!(stderr.contains("--api-sock-force"), "{stderr}");
    assert!(socket.exists());

    let mut child = metronome()
        .arg("--api-sock")
        .arg(&socket)
        .arg("--api-sock-force")
        .spawn()
        .expect("spawn metronome");
    let start = Instant::now();
    loop {
        // Until the server replaced the file, curl cannot connect (status 000).
        let (status, info) = call(&socket, "GET", "/", None);
        if status == 200 {
            assert_eq!(info["state"], "Not started");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "never served");
        std::thread::sleep(Duration::from_millis(20));
    }
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert!(!socket.exists());
}

#[test]
fn test_api_bad_command_line_exits_2() {
    let socket = scratch("never.sock");
    let output = metronome()
        .arg("--api-sock")
        .arg(&socket)
        .args(["--vcpus", "0"])
        .output()
        .expect("run metronome");
    assert_eq!(output.status.code(), Some(2));
    assert!(!socket.exists());
}

#[test]
fn test_api_curl_script() {
    if !kvm_or_skip("api curl script") {
        return;
    }
    let _serial = kvm_lock();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/api_curl.sh");
    let output = Command::new("bash")
        .arg(script)
        .env("METRONOME", env!("CARGO_BIN_EXE_metronome"))
        .env("SOCKET", scratch("curl.sock"))
        .output()
        .expect("run tests/api_curl.sh");
    assert!(
        output.status.success(),
        "api_curl.sh failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `GET /metrics` as JSON.
fn metrics(server: &Server) -> Value {
    let (status, metrics) = server.call("GET", "/metrics", None);
    assert_eq!(status, 200, "{metrics:?}");
    metrics
}

/// The sum over vCPUs of the JSON metrics' `field`.
fn vcpu_sum(metrics: &Value, field: &str) -> u64 {
    metrics["vcpus"]
        .as_array()
        .expect("vcpus")
        .iter()
        .map(|v| v[field].as_u64().expect(field))
        .sum()
}

/// The Prometheus text `text` as parsed by the Python Prometheus client's
/// parser (Debian's python3-prometheus-client): family name to its type and
/// samples `[name, labels, value]`. `None` (with the reason printed) when
/// python3 or the module is missing, except under `CI=true`, which fails.
fn prometheus_parse(text: &str) -> Option<Value> {
    const SCRIPT: &str = r#"
import json, sys
try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError as e:
    print(f"the prometheus_client module is missing: {e}", file=sys.stderr)
    sys.exit(3)
families = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    families[f.name] = {"type": f.type, "samples": [[s.name, s.labels, s.value] for s in f.samples]}
print(json.dumps(families))
"#;
    use std::io::Write;
    // Debian's package is for the system python3, which a python3 earlier
    // in PATH (pyenv, say) may not be: try both.
    let mut reasons = Vec::new();
    for python in ["/usr/bin/python3", "python3"] {
        let child = Command::new(python)
            .args(["-c", SCRIPT])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) => {
                reasons.push(format!("{python} cannot run: {e}"));
                continue;
            }
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .expect("write to python3");
        let output = child.wait_with_output().expect("python3 output");
        let stderr = String::from_utf8_lossy(&output.stderr);
        match output.status.code() {
            Some(0) => return Some(serde_json::from_slice(&output.stdout).expect("parser JSON")),
            Some(3) => reasons.push(format!("{python}: {}", stderr.trim())),
            _ => panic!("the Prometheus parser refused the text: {stderr}\n{text}"),
        }
    }
    let reason = reasons.join("; ");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the Prometheus parser check cannot run ({reason}), and CI=true requires it");
    }
    eprintln!("SKIPPED the Prometheus parser check: {reason} (install python3-prometheus-client)");
    None
}

/// The value of the parsed sample `name` whose labels include `labels`.
fn sample(families: &Value, family: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    families[family]["samples"]
        .as_array()
        .unwrap_or_else(|| panic!("no family {family}"))
        .iter()
        .find(|s| s[0] == name && labels.iter().all(|(k, v)| s[1][*k].as_str() == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?} in {}", families[family]))[2]
        .as_f64()
        .expect("a number")
}

#[test]
fn test_api_metrics_on_a_real_guest() {
    let Some((_serial, server, _summary)) = kvm_session("api metrics") else {
        return;
    };
    // Before start: the API's counters, the VM's zeros.
    let before = metrics(&server);
    assert_eq!(before["state"], "Not started");
    assert_eq!(before["guest_uptime_ns"], 0);
    assert_eq!(before["vcpus"], serde_json::json!([]));
    let answer = server.call("GET", "/no-such-metric", None);
    assert_eq!(answer.0, 404);
    let answer = server.call("GET", "/metrics?format=xml", None);
    assert_eq!(answer.0, 400);
    assert!(
        fault(&answer).contains("format=json (the default) or format=prometheus"),
        "{answer:?}"
    );
    let sink = scratch("metrics.jsonl");
    let put_sink = format!(r#"{{"metrics_path": "{}"}}"#, sink.display());
    assert_eq!(server.call("PUT", "/metrics", Some(&put_sink)).0, 204);

    let machine = r#"{"vcpu_count": 2, "mem_size_mib": 96}"#;
    assert_eq!(server.call("PUT", "/machine-config", Some(machine)).0, 204);
    let boot = r#"{"workload": "demo", "duration_s": 600}"#;
    assert_eq!(server.call("PUT", "/boot-source", Some(boot)).0, 204);
    assert_eq!(server.action("InstanceStart").0, 204);
    let answer = server.call("PUT", "/metrics", Some(&put_sink));
    assert_eq!(answer.0, 400);
    assert!(fault(&answer).contains("pre-boot only"), "{answer:?}");

    // Running: deliveries and uptime grow between two reads.
    let first = metrics(&server);
    assert_eq!(first["state"], "Running");
    assert_eq!(first["vcpus"].as_array().unwrap().len(), 2);
    let start = Instant::now();
    let later = loop {
        let now = metrics(&server);
        if vcpu_sum(&now, "timer_deliveries") > vcpu_sum(&first, "timer_deliveries")
            && now["guest_uptime_ns"].as_u64() > first["guest_uptime_ns"].as_u64()
            && now["vcpus"][0]["guest_lateness_ns"]["count"].as_u64() > Some(0)
        {
            break now;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the metrics did not grow: {first}\n{now}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let vcpu0 = &later["vcpus"][0];
    // The guest rearms its timer with MMIO writes; each delivery is timed.
    assert!(vcpu0["exits"]["mmio"].as_u64() > Some(0), "{vcpu0}");
    assert!(
        vcpu0["host_lateness_ns"]["count"].as_u64() > Some(0),
        "{vcpu0}"
    );
    assert!(later["api_requests"]["404"].as_u64() >= Some(1), "{later}");
    assert!(later["api_requests"]["400"].as_u64() >= Some(2), "{later}");

    // The Prometheus text, read by a real parser.
    let (status, content_type, text) =
        call_text(&server.socket, "GET", "/metrics?format=prometheus", None);
    assert_eq!(status, 200, "{text}");
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    if let Some(families) = prometheus_parse(&text) {
        for (name, family) in families.as_object().unwrap() {
            assert!(name.starts_with("metronome_"), "{name}");
            assert_ne!(family["type"], "unknown", "{name} is untyped");
        }
        assert_eq!(families["metronome_timer_deliveries"]["type"], "counter");
        let deliveries = sample(
            &families,
            "metronome_timer_deliveries",
            "metronome_timer_deliveries_total",
            &[("vcpu", "0")],
        );
        assert!(deliveries >= vcpu0["timer_deliveries"].as_f64().unwrap());
        let lateness = "metronome_timer_host_lateness_seconds";
        assert_eq!(families[lateness]["type"], "histogram");
        let count = sample(
            &families,
            lateness,
            &format!("{lateness}_count"),
            &[("vcpu", "1")],
        );
        let inf = sample(
            &families,
            lateness,
            &format!("{lateness}_bucket"),
            &[("vcpu", "1"), ("le", "+Inf")],
        );
        assert_eq!(count, inf);
        assert!(count > 0.0);
        let requests = sample(
            &families,
            "metronome_api_requests",
            "metronome_api_requests_total",
            &[("status", "404")],
        );
        assert!(requests >= 1.0);
        let exits = sample(
            &families,
            "metronome_vcpu_exits",
            "metronome_vcpu_exits_total",
            &[("vcpu", "0"), ("reason", "mmio")],
        );
        assert!(exits >= vcpu0["exits"]["mmio"].as_f64().unwrap());
        let uptime = sample(
            &families,
            "metronome_guest_uptime_seconds",
            "metronome_guest_uptime_seconds",
            &[],
        );
        assert!(uptime * 1e9 >= later["guest_uptime_ns"].as_f64().unwrap());
    }

    // FlushMetrics appends one JSON line to the sink.
    assert_eq!(server.action("FlushMetrics").0, 204);
    let lines = std::fs::read_to_string(&sink).expect("the sink file");
    let lines: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["state"], "Running");
    assert!(vcpu_sum(&lines[0], "timer_deliveries") >= vcpu_sum(&later, "timer_deliveries"));

    // After the exit: the final values, no longer changing.
    assert_eq!(server.action("SendExit").0, 204);
    let exited = metrics(&server);
    assert_eq!(exited["state"], "Exited");
    assert!(vcpu_sum(&exited, "timer_deliveries") >= vcpu_sum(&lines[0], "timer_deliveries"));
    // Not a synchronisation: time for a value that still moved to show it.
    std::thread::sleep(Duration::from_millis(100));
    let again = metrics(&server);
    assert_eq!(again["guest_uptime_ns"], exited["guest_uptime_ns"]);
    assert_eq!(again["vcpus"], exited["vcpus"]);
}

/// `GET /clockintr`: the guest uptime and every vCPU's `clocks` entry.
fn clocks(server: &Server) -> (u64, Vec<Value>) {
    let (status, info) = server.call("GET", "/clockintr", None);
    assert_eq!(status, 200, "{info:?}");
    let uptime = info["uptime_ns"].as_u64().expect("uptime_ns");
    (uptime, info["clocks"].as_array().expect("clocks").clone())
}

/// Polls `GET /clockintr` until the guest clock reaches `ns`; the uptime read.
fn until_uptime(server: &Server, ns: u64) -> u64 {
    let start = Instant::now();
    loop {
        let (uptime, _) = clocks(server);
        if uptime >= ns {
            return uptime;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the guest clock stayed at {uptime} ns"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn field(clock: &Value, name: &str) -> u64 {
    clock[name]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} in {clock}"))
}

/// Pause for 1.5 s of guest time, resume, run 0.5 s: Resume re-synchronises
/// clockintr (CI-CPU-6: each vCPU re-runs `clockintr_cpu_init`, no burst of
/// hardclocks) and kptimer (one fire for the deadline passed during the
/// pause, then the cadence from now) on a guest with clock `hz` and one
/// kptimer of `period_ns` sampling two busy vCPUs. A catch-up would add
/// 1.5 s worth of periods to each count.
fn resume_resynchronises(server: &Server, hz: u64, period_ns: u64) {
    const PAUSE_NS: u64 = 1_500_000_000;
    const RUN_NS: u64 = 500_000_000;
    assert_eq!(server.action("Pause").0, 204);
    let (paused_at, before) = clocks(server);
    let fires_before = counters(server)["timer_fires"].as_u64().unwrap();
    // Poll the guest clock (it runs on while paused) well past the periods.
    let last_paused = until_uptime(server, paused_at + PAUSE_NS);
    let (_, still) = clocks(server);
    assert_eq!(still, before, "nothing dispatches while paused");
    assert_eq!(server.action("Resume").0, 204);
    let (resumed, _) = clocks(server);
    let end = until_uptime(server, resumed + RUN_NS);
    let (_, after) = clocks(server);
    let fires_after = counters(server)["timer_fires"].as_u64().unwrap();

    // The guest ran for at most `end - last_paused` since the resume, and
    // at least `end - resumed`.
    let ran_max = end - last_paused;
    let ran_min = end - resumed;
    for (b, a) in before.iter().zip(&after) {
        let hardclocks = field(a, "hardclock") - field(b, "hardclock");
        // Every period run gives one hardclock; 25 more is host noise, far
        // from the 150 a catch-up would add.
        assert!(
            hardclocks <= ran_max * hz / 1_000_000_000 + 25,
            "a burst after resume: {hardclocks} hardclocks in at most {ran_max} ns: {b} -> {a}"
        );
        assert!(
            hardclocks >= ran_min * hz / 1_000_000_000 / 4,
            "hardclock stalled after resume: {hardclocks} in {ran_min} ns"
        );
        assert_eq!(
            field(a, "cpu_inits"),
            field(b, "cpu_inits") + 1,
            "the guest re-ran clockintr_cpu_init: {a}"
        );
        assert!(field(a, "resume_first_batch") <= 2, "{a}");
    }
    // kptimer: a deadline passed during the pause fires once per vCPU, then
    // one fire per period per busy vCPU (2 vCPUs) from now.
    let fires = fires_after - fires_before;
    let periods_max = ran_max / period_ns;
    assert!(
        fires <= 2 * (periods_max + 2) + 20,
        "a burst of kptimer fires after resume: {fires} in at most {periods_max} periods"
    );
    assert!(
        fires >= ran_min / period_ns / 4,
        "the kptimer cadence stopped after resume: {fires} fires in {ran_min} ns"
    );
}

/// `--config-file` with `--api-sock`: the instance runs at once and the API
/// serves it (pre-boot PUTs refused, kperf sampling on from the file).
/// Then Resume re-synchronises (CI-CPU-6 and kptimer): after a pause of
/// 1.5 s of guest time (hz=100: 150 hardclock periods; 10 ms kptimer: 150
/// periods), the hardclock calls and timer fires after the resume match the
/// time run since, not the time paused; a burst would add about 150 per
/// vCPU to each.
#[test]
fn test_api_config_file_instance_and_resume_resynchronises() {
    if !kvm_or_skip("api config file resume") {
        return;
    }
    let _serial = kvm_lock();
    let config = scratch("config.json");
    std::fs::write(
        &config,
        r#"{"machine-config": {"vcpu_count": 2, "mem_size_mib": 128},
            "boot-source": {"workload": "profile", "duration_s": 600},
            "clock": {"hz": 100},
            "kperf": {"action_count": 1, "timer_count": 1,
                      "actions": [{"id": 1, "samplers": ["th_info"]}],
                      "timers": [{"id": 0, "period_ns": 10000000, "action_id": 1}]}}"#,
    )
    .unwrap();
    let summary_path = scratch("summary.json");
    let server = Server::start(&[
        "--config-file",
        config.to_str().unwrap(),
        "--summary-json",
        summary_path.to_str().unwrap(),
    ]);
    assert_eq!(server.state(), "Running");
    let answer = server.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
    );
    assert_eq!(answer.0, 400);
    assert!(fault(&answer).contains("pre-boot only"), "{answer:?}");
    assert_eq!(server.action("InstanceStart").0, 400);
    assert_eq!(counters(&server)["sampling"], "on");
    counter_above(&server, "timer_fires", 10);
    let (_, got) = server.call("GET", "/machine-config", None);
    assert_eq!(got["vcpu_count"], 2);

    resume_resynchronises(&server, 100, 10_000_000);

    assert_eq!(server.action("SendExit").0, 204);
    let summary = written_summary(&summary_path);
    assert_eq!(summary["outcome"], "stopped");
    for v in summary["vcpus"].as_array().unwrap() {
        assert_eq!(v["timer"]["resumes"], 1, "{v}");
    }
}

#[test]
fn test_api_serves_the_committed_openapi_document() {
    let server = Server::start(&[]);
    let (status, served) = server.call("GET", "/openapi.json", None);
    assert_eq!(status, 200);
    assert_eq!(&served, openapi_check::document());
    // The checker refuses what the document does not describe.
    let answer = server.call("DELETE", "/kperf/sampling", None);
    assert_eq!(answer.0, 405);
    let undocumented = openapi_check::Exchange {
        method: "GET".into(),
        path: "/".into(),
        status: 418,
        content_type: "application/json".into(),
        body: "{}".into(),
    };
    let refused = std::panic::catch_unwind(|| openapi_check::check(undocumented));
    assert!(
        refused.is_err(),
        "a status the document does not list fails"
    );
    let wrong_shape = openapi_check::Exchange {
        method: "GET".into(),
        path: "/kperf/counters".into(),
        status: 200,
        content_type: "application/json".into(),
        body: r#"{"sampling": "off", "samples": -1}"#.into(),
    };
    let refused = std::panic::catch_unwind(|| openapi_check::check(wrong_shape));
    assert!(refused.is_err(), "a body that breaks its schema fails");
    assert!(openapi_check::checked().len() >= 2);
    assert_eq!(server.terminate(), 0);
}
