//! The API socket end to end: a real `metronome --api-sock` process and a
//! real HTTP client (`curl --unix-socket`) drive a whole session on a KVM
//! guest: configure, start, pause, resume, read clockintr, exit; the bad
//! inputs answer with Firecracker-shaped errors; SIGTERM ends the server and
//! removes the socket; an existing socket path is refused. Every answer is
//! checked against the OpenAPI document (`common/api_client.rs`).

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

#[path = "common/api_client.rs"]
mod api_client;
mod common;
use api_client::{call, fault, Server};
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
    let boot = r#"{"workload": "demo", "duration_s": 600}"#;
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

    // Start, pause, resume.
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

    // The clock runs: clockintr figures grow.
    let (status, first) = server.call("GET", "/clockintr", None);
    assert_eq!(status, 200);
    assert_eq!(first["vcpus"].as_array().unwrap().len(), 2);
    assert!(first["dump"]
        .as_str()
        .unwrap()
        .contains("clockintr_hardclock"));
    std::thread::sleep(Duration::from_millis(200));
    let (_, later) = server.call("GET", "/clockintr", None);
    assert!(later["total"]["run"].as_u64() > first["total"]["run"].as_u64());
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
    assert_eq!(put("/kperf/action-count", r#"{"count": 1}"#).0, 204);
    assert_eq!(put("/kperf/timer-count", r#"{"count": 1}"#).0, 204);
    let action = r#"{"samplers": ["th_info", "kstack"], "kernel_stack_depth": 16}"#;
    assert_eq!(put("/kperf/actions/1", action).0, 204);
    let timer = r#"{"period_ns": 1000000, "action_id": 1}"#;
    assert_eq!(put("/kperf/timers/0", timer).0, 204);
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
    std::thread::sleep(Duration::from_millis(200));
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

#[test]
fn test_api_serves_the_committed_openapi_document() {
    let server = Server::start(&[]);
    let (status, served) = server.call("GET", "/openapi.json", None);
    assert_eq!(status, 200);
    assert_eq!(&served, api_client::document());
    // The checker refuses what the document does not describe.
    let answer = server.call("DELETE", "/kperf/sampling", None);
    assert_eq!(answer.0, 405);
    let undocumented = api_client::Exchange {
        method: "GET".into(),
        path: "/".into(),
        status: 418,
        content_type: "application/json".into(),
        body: "{}".into(),
    };
    let refused = std::panic::catch_unwind(|| api_client::check(undocumented));
    assert!(
        refused.is_err(),
        "a status the document does not list fails"
    );
    let wrong_shape = api_client::Exchange {
        method: "GET".into(),
        path: "/kperf/counters".into(),
        status: 200,
        content_type: "application/json".into(),
        body: r#"{"sampling": "off", "samples": -1}"#.into(),
    };
    let refused = std::panic::catch_unwind(|| api_client::check(wrong_shape));
    assert!(refused.is_err(), "a body that breaks its schema fails");
    assert!(api_client::checked().len() >= 2);
    assert_eq!(server.terminate(), 0);
}
