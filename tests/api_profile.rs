//! A run's profiles, trace and summary over the API socket, on a real KVM
//! guest running the `profile` workload, fetched with a real HTTP client
//! (`curl --unix-socket`) and read by their real consumers: `go tool
//! pprof` for pprof (a saved answer, and the live profile fetched by pprof
//! itself over HTTP through a local TCP proxy), `rsvg-convert` for the SVG
//! flame graph, a JSON parser for the trace. While the guest runs the answers are snapshots that drain
//! nothing; after the exit they are the run's profile files byte for byte.
//!
//! `go` and `rsvg-convert` are required when `CI=true`; elsewhere a missing
//! one skips that check with a note.

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::api::{fault, get_raw, Raw, Server};
use common::{in_ci, kvm_lock, kvm_or_skip, run_tool, scratch};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// The profile workload's three leaf functions.
const LEAVES: [&str; 3] = ["leaf_sixty", "leaf_thirty", "leaf_ten"];

fn leaf(name: &str) -> String {
    format!("metronome_guest::workloads::{name}")
}

/// The samples a folded profile counts (the sum of its lines' counts).
fn folded_samples(folded: &str) -> u64 {
    folded
        .lines()
        .map(|l| {
            let (_, n) = l.rsplit_once(' ').expect("`stack count` lines");
            n.parse::<u64>().expect("a count")
        })
        .sum()
}

/// `GET path`, which must answer 200 with `content_type`.
fn get_ok(server: &Server, path: &str, content_type: &str) -> Raw {
    let raw = get_raw(server, path);
    assert_eq!(
        raw.status,
        200,
        "{path}: {}",
        String::from_utf8_lossy(&raw.body)
    );
    assert_eq!(raw.content_type, content_type, "{path}");
    raw
}

/// Polls the folded on-CPU profile until it names every leaf (60 s at most).
fn folded_with_every_leaf(server: &Server) -> String {
    let start = Instant::now();
    loop {
        let folded = get_ok(server, "/profile", "text/plain; charset=utf-8");
        let text = folded.text().to_owned();
        if LEAVES.iter().all(|l| text.contains(&leaf(l))) {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the leaves never all showed up:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `go tool pprof -top ARGS` names the leaves (skipped with a note without
/// `go`, except under CI=true); `what` names the source for messages.
fn go_pprof_names_the_leaves(what: &str, args: &[&str]) {
    let dir = scratch("pprof-tmp");
    std::fs::create_dir_all(&dir).unwrap();
    let output = std::process::Command::new("go")
        .args(["tool", "pprof", "-top"])
        .args(args)
        // Where pprof saves what it fetched, instead of ~/pprof.
        .env("PPROF_TMPDIR", &dir)
        .output();
    match output {
        Ok(out) => {
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "go tool pprof {what} failed: {stderr}"
            );
            for l in LEAVES {
                assert!(
                    stdout.contains(&leaf(l)),
                    "no {l} from {what} in:\n{stdout}"
                );
            }
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("cannot run go: {e}"),
        Err(_) if in_ci() => panic!("CI=true but go is not on PATH (apt-get install golang-go)"),
        Err(_) => eprintln!("skip: go is not on PATH, the pprof answer of {what} was not read"),
    }
}

/// `go tool pprof -top` reads `pprof` (a saved answer) and names the leaves.
fn check_with_go_pprof(pprof: &[u8]) {
    let file = scratch("live.pb.gz");
    std::fs::write(&file, pprof).unwrap();
    go_pprof_names_the_leaves("a saved answer", &[file.to_str().unwrap()]);
}

/// Copies `from` to `to` on a thread of its own, then `close`s `to`.
fn pump<R, W>(
    mut from: R,
    mut to: W,
    close: impl FnOnce(&W) -> std::io::Result<()> + Send + 'static,
) where
    R: std::io::Read + Send + 'static,
    W: std::io::Write + Send + 'static,
{
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = close(&to);
    });
}

/// A local TCP proxy to `socket` (each connection copied both ways on its
/// own threads), as a user puts in front of the API socket for tools that
/// speak HTTP over TCP only; its address.
fn tcp_proxy(socket: &Path) -> std::net::SocketAddr {
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::unix::net::UnixStream;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let address = listener.local_addr().unwrap();
    let socket = socket.to_owned();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = UnixStream::connect(&socket) else {
                return;
            };
            let (Ok(client_in), Ok(server_in)) = (client.try_clone(), server.try_clone()) else {
                return;
            };
            pump(client_in, server_in, |s: &UnixStream| {
                s.shutdown(Shutdown::Write)
            });
            pump(server, client, |c: &TcpStream| c.shutdown(Shutdown::Write));
        }
    });
    address
}

/// `rsvg-convert` renders `svg` to a PNG.
fn check_with_rsvg(svg: &[u8]) {
    let file = scratch("live.svg");
    let png = scratch("live.png");
    std::fs::write(&file, svg).unwrap();
    let args = ["-o", png.to_str().unwrap(), file.to_str().unwrap()];
    match run_tool("rsvg-convert", &args) {
        Some(out) => {
            assert!(
                out.status.success(),
                "rsvg-convert failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let png = std::fs::read(&png).expect("the PNG was written");
            assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG file");
        }
        None if in_ci() => {
            panic!("CI=true but rsvg-convert is not on PATH (apt-get install librsvg2-bin)")
        }
        None => eprintln!("skip: rsvg-convert is not on PATH, the SVG was not rendered"),
    }
}

/// The trace parses as Chrome trace JSON with `running` slices on guest
/// thread tracks (pid 2, tids below the idle tracks') named after threads.
fn check_trace(trace: &[u8]) -> Value {
    let trace: Value = serde_json::from_slice(trace).expect("the trace is JSON");
    let events = trace["traceEvents"].as_array().expect("traceEvents");
    let guest_thread = |e: &&Value| e["pid"] == 2 && e["tid"].as_u64() < Some(1_000_000);
    assert!(
        events
            .iter()
            .filter(guest_thread)
            .any(|e| e["name"] == "running" && e["ph"] == "X"),
        "no running slice of a guest thread"
    );
    assert!(
        events
            .iter()
            .filter(guest_thread)
            .any(|e| e["name"] == "thread_name"
                && e["args"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("split"))),
        "the profile workload's threads are not named"
    );
    trace
}

/// `GET /summary`: 200, an object.
fn summary(server: &Server) -> serde_json::Map<String, Value> {
    let (status, summary) = server.call("GET", "/summary", None);
    assert_eq!(status, 200, "{summary}");
    summary.as_object().expect("an object").clone()
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn test_api_profile_trace_and_summary_while_running_and_after() {
    if !kvm_or_skip("api profile") {
        return;
    }
    let _serial = kvm_lock();
    let dir = scratch("prof");
    let server = Server::start(&[
        "--sample-period-us",
        "1000",
        "--profile-dir",
        dir.to_str().unwrap(),
    ]);
    let answer = server.call("GET", "/profile", None);
    assert_eq!(answer.0, 400);
    assert!(fault(&answer).contains("send InstanceStart"), "{answer:?}");
    let put = |path: &str, body: &str| server.call("PUT", path, Some(body)).0;
    assert_eq!(
        put(
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 96}"#
        ),
        204
    );
    let boot = r#"{"workload": "profile", "duration_s": 600}"#;
    assert_eq!(put("/boot-source", boot), 204);
    // The command line's sampling waits for the API.
    assert_eq!(put("/kperf/sampling", r#"{"on": false}"#), 204);
    assert_eq!(server.action("InstanceStart").0, 204);

    // No samples yet: folded and pprof are empty profiles, an SVG cannot be drawn.
    let empty = get_ok(
        &server,
        "/profile?format=folded",
        "text/plain; charset=utf-8",
    );
    assert_eq!(empty.text(), "");
    let pprof = get_ok(&server, "/profile?format=pprof", "application/octet-stream");
    assert!(pprof.body.starts_with(b"\x1f\x8b"), "gzipped");
    let svg = get_raw(&server, "/profile?format=svg");
    assert_eq!(svg.status, 409);
    assert!(svg.text().contains("switch sampling on"), "{}", svg.text());

    // Bad queries, and PET that is not configured.
    for (path, message) in [
        (
            "/profile?kind=wall",
            "unknown variant `wall`, expected `oncpu` or `pet`",
        ),
        (
            "/profile?format=png",
            "unknown variant `png`, expected one of `folded`, `svg`, `pprof`",
        ),
        ("/profile?seconds=5", "unknown field `seconds`"),
        (
            "/profile?kind=pet",
            "kind=pet refused: PET is not configured",
        ),
    ] {
        let answer = server.call("GET", path, None);
        assert_eq!(answer.0, 400, "{path}");
        assert!(fault(&answer).contains(message), "{path}: {answer:?}");
    }

    // Sampling on through the API: the leaves show up while the guest runs.
    assert_eq!(put("/kperf/sampling", r#"{"on": true}"#), 204);
    let first = folded_with_every_leaf(&server);
    let pprof = get_ok(&server, "/profile?format=pprof", "application/octet-stream");
    check_with_go_pprof(&pprof.body);
    // go tool pprof fetching the live profile itself, through a local proxy.
    let proxy = tcp_proxy(&server.socket);
    let url = format!("http://{proxy}/profile?format=pprof");
    go_pprof_names_the_leaves(&url, &[&url]);
    let svg = get_ok(&server, "/profile?format=svg", "image/svg+xml");
    check_with_rsvg(&svg.body);
    // Not drained: a later fetch has at least as many samples.
    let second = get_ok(&server, "/profile", "text/plain; charset=utf-8");
    assert!(
        folded_samples(second.text()) >= folded_samples(&first),
        "{} then {}",
        folded_samples(&first),
        folded_samples(second.text())
    );

    // The trace so far.
    check_trace(&get_ok(&server, "/trace", "application/json").body);

    // The summary so far: the running state, a growing uptime, the end-only fields null.
    let early = summary(&server);
    let start = Instant::now();
    let later = loop {
        let later = summary(&server);
        if later["guest_uptime_ns"].as_u64() > early["guest_uptime_ns"].as_u64() {
            break later;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "uptime stuck");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(later["state"], "Running");
    for field in ["outcome", "message", "exit_code", "host_wall_to_exit_ns"] {
        assert_eq!(later[field], Value::Null, "{field}");
    }
    assert_eq!(later["vcpus"].as_array().map(Vec::len), Some(2));
    assert!(later["sampling"]["samples"].as_u64() > Some(0));
    assert!(later["clockintr_total"]["run"].as_u64() > Some(0));

    // After the exit: the run's files, byte for byte.
    assert_eq!(put("/kperf/sampling", r#"{"on": false}"#), 204);
    assert_eq!(server.action("SendExit").0, 204);
    let folded = get_ok(&server, "/profile", "text/plain; charset=utf-8");
    assert_eq!(folded.body, read(&dir, "profile.folded"));
    assert!(folded_samples(folded.text()) >= folded_samples(second.text()));
    let svg = get_ok(&server, "/profile?format=svg", "image/svg+xml");
    assert_eq!(svg.body, read(&dir, "profile.svg"));
    let pprof = get_ok(&server, "/profile?format=pprof", "application/octet-stream");
    assert_eq!(pprof.body, read(&dir, "profile.pb.gz"));
    let trace = get_ok(&server, "/trace", "application/json");
    assert_eq!(trace.body, read(&dir, "trace.json"));
    check_trace(&trace.body);
    let answer = server.call("GET", "/profile?kind=pet", None);
    assert_eq!(answer.0, 400, "{answer:?}");

    // The final summary has every field the running one had.
    let last = summary(&server);
    assert_eq!(last["state"], "Exited");
    assert_eq!(last["outcome"], "stopped");
    let keys = |m: &serde_json::Map<String, Value>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&later), keys(&last));
    assert_eq!(server.terminate(), 0);
}
