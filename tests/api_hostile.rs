//! Bad input and hostile HTTP on a running guest: a real `metronome
//! --api-sock` process boots a KVM guest, then every refusal of the bad-input
//! matrix is asserted (status and `fault_message`), and hostile clients talk
//! raw bytes to the socket: garbage, a head that never ends, huge or too many
//! headers, a body too large or never complete, a client that stops reading,
//! connections beyond the limit, a hundred at once. Afterwards the guest is
//! still running and its clock still ticks. Every answer with a request
//! behind it is checked against the OpenAPI document.
//!
//! The server runs with the hidden test-only timeout override
//! (`METRONOME_API_TEST_TIMEOUT_MS`, 2 s instead of 10 s), so that the
//! timeouts are observed without waiting 10 s each.

// An integration-test crate is test-only as a whole.
#![allow(clippy::tests_outside_test_module)]

mod common;
use common::api::{fault, Server};
use common::openapi_check::{check, Exchange};
use common::{kvm_lock, kvm_or_skip};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The header, body and write timeouts the server runs with, ms.
const TEST_TIMEOUT_MS: &str = "2000";
/// How long a test waits for anything before it fails: far beyond the
/// timeouts, only a bound against hanging.
const PATIENCE: Duration = Duration::from_secs(60);

/// An answer read from a raw connection.
#[derive(Debug, Default)]
struct RawAnswer {
    /// `None` when the server closed without answering.
    status: Option<u16>,
    content_type: String,
    body: String,
}

/// Reads until the server closes the connection (or resets it), at most
/// [`PATIENCE`], and parses what came as one HTTP answer.
fn read_answer(stream: &mut UnixStream) -> RawAnswer {
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut bytes = Vec::new();
    match stream.read_to_end(&mut bytes) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("reading the answer: {e} (after {} bytes)", bytes.len()),
    }
    let text = String::from_utf8_lossy(&bytes);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        assert!(bytes.is_empty(), "not an HTTP answer: {text:?}");
        return RawAnswer::default();
    };
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok());
    let content_type = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.trim().to_owned())
        .unwrap_or_default();
    RawAnswer {
        status,
        content_type,
        body: body.to_owned(),
    }
}

/// Connects to the server's socket.
fn connect(server: &Server) -> UnixStream {
    UnixStream::connect(&server.socket).expect("connect to the API socket")
}

/// Sends `head` and `body` on a new connection (a write the server cut
/// short by answering early is not an error) and reads the answer, which is
/// checked against the document as the answer to `method path`.
fn raw_request(server: &Server, method: &str, path: &str, head: &str, body: &[u8]) -> RawAnswer {
    let mut stream = connect(server);
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body));
    let answer = read_answer(&mut stream);
    if let Some(status) = answer.status {
        check(Exchange {
            method: method.to_owned(),
            path: path.to_owned(),
            status,
            content_type: answer.content_type.clone(),
            body: answer.body.clone(),
        });
    }
    answer
}

/// The `fault_message` of a raw answer.
fn raw_fault(answer: &RawAnswer) -> String {
    let json: serde_json::Value =
        serde_json::from_str(&answer.body).unwrap_or_else(|e| panic!("not JSON ({e}): {answer:?}"));
    json["fault_message"]
        .as_str()
        .expect("fault_message")
        .to_owned()
}

/// Guest uptime (`GET /summary`) and clockintr dispatches (`GET
/// /clockintr`: prompt and early dispatches over every vCPU).
fn clock_figures(server: &Server) -> (u64, u64) {
    let (status, summary) = server.call("GET", "/summary", None);
    assert_eq!(status, 200);
    let uptime = summary["guest_uptime_ns"]
        .as_u64()
        .expect("guest_uptime_ns");
    let (status, clockintr) = server.call("GET", "/clockintr", None);
    assert_eq!(status, 200);
    let total = &clockintr["total"];
    let dispatches = total["prompt"].as_u64().unwrap() + total["early"].as_u64().unwrap();
    (uptime, dispatches)
}

/// Polls until the guest's uptime and clockintr dispatches both exceed
/// `before`, within [`PATIENCE`]; the new figures.
fn clock_grows_past(server: &Server, before: (u64, u64)) -> (u64, u64) {
    let start = Instant::now();
    loop {
        let now = clock_figures(server);
        if now.0 > before.0 && now.1 > before.1 {
            return now;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the guest clock stopped: {before:?} then {now:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts `answer` is `status` with a `fault_message` starting `start`.
#[track_caller]
fn refused(answer: (u16, serde_json::Value), status: u16, start: &str) {
    assert_eq!(answer.0, status, "{answer:?}");
    assert!(fault(&answer).starts_with(start), "{answer:?}");
}

/// Asserts `answer` is `status` with a `fault_message` containing `part`.
#[track_caller]
fn refused_with(answer: (u16, serde_json::Value), status: u16, part: &str) {
    assert_eq!(answer.0, status, "{answer:?}");
    assert!(fault(&answer).contains(part), "{answer:?}");
}

/// The bad-input matrix on a running guest with no kperf action yet.
fn bad_input_matrix(server: &Server) {
    let put = |path: &str, body: &str| server.call("PUT", path, Some(body));
    let get = |path: &str| server.call("GET", path, None);
    // Sampling with no action configured: ECANCELED.
    refused(
        put("/kperf/sampling", r#"{"on": true}"#),
        400,
        "sampling cannot be turned on: no action is configured (action_count is 0); set \
         PUT /kperf/action-count first (ECANCELED, CFG-S-1)",
    );
    // Malformed JSON, wrong types, unknown fields, not an object.
    refused(
        put("/kperf/sampling", r#"{"on": tru}"#),
        400,
        "invalid request body: expected ident",
    );
    refused(put("/actions", ""), 400, "invalid request body: EOF");
    for (path, body, part) in [
        (
            "/kperf/sampling",
            r#"{"on": "yes"}"#,
            r#"invalid type: string "yes", expected a boolean"#,
        ),
        (
            "/kperf/action-count",
            r#"{"count": -1}"#,
            "invalid value: integer `-1`, expected u32",
        ),
        (
            "/actions",
            r#"{"action_type": "Reboot"}"#,
            "unknown variant `Reboot`, expected one of `InstanceStart`",
        ),
        (
            "/kperf/pet",
            r#"{"timer_id": 0, "period": 5}"#,
            "unknown field `period`",
        ),
        (
            "/kperf/timers/0",
            r#"{"period_ns": 1000000, "action": 1}"#,
            "unknown field `action`",
        ),
        (
            "/kperf/actions/1",
            "[1]",
            "invalid request body: expected a JSON object, the action's fields",
        ),
    ] {
        refused_with(put(path, body), 400, part);
    }
    refused(
        get("/kperf/timers/zero"),
        400,
        "timer id 'zero' is not a number: give the id in the path, as in /kperf/timers/1",
    );

    // One action, one timer.
    assert_eq!(put("/kperf/action-count", r#"{"count": 1}"#).0, 204);
    assert_eq!(put("/kperf/timer-count", r#"{"count": 1}"#).0, 204);
    let action = r#"{"samplers": ["th_info", "kstack"]}"#;
    assert_eq!(put("/kperf/actions/1", action).0, 204);
    let timer = r#"{"period_ns": 1000000, "action_id": 1}"#;
    assert_eq!(put("/kperf/timers/0", timer).0, 204);

    // Out of range.
    for (path, body, part) in [
        (
            "/kperf/actions/1",
            r#"{"samplers": ["th_info"], "user_stack_depth": 1}"#,
            "action 1: user_stack_depth 1 is out of range: 2 to 256 frames (CFG-A-3)",
        ),
        (
            "/kperf/actions/1",
            r#"{"samplers": ["bogus"]}"#,
            "(CFG-A-5)",
        ),
        (
            "/kperf/timer-count",
            r#"{"count": 9}"#,
            "timer_count 9 is out of range: 0 to 8 timers (CFG-T-1, KT-S-1)",
        ),
        (
            "/kperf/timers/0",
            r#"{"period_ns": 10000000001, "action_id": 1}"#,
            "timer 0: period_ns 10000000001 is out of range: 0 (inactive) to 10000000000 ns",
        ),
        (
            "/kperf/action-count",
            r#"{"count": 0}"#,
            "action count 0 refused: the count may only grow, up to 32 (it is 1) (CFG-A-1)",
        ),
        (
            "/kperf/pet",
            r#"{"timer_id": 0, "idle_rate": 0}"#,
            "the PET idle rate 0 is refused: it is at least 1 (AMB-13",
        ),
    ] {
        refused_with(put(path, body), 400, part);
    }

    // Unknown paths.
    refused(
        get("/kperf/nothing"),
        404,
        "no such path '/kperf/nothing': the paths are /, /actions, /boot-source",
    );
    refused(
        get("/kperf/actions/"),
        404,
        "no such path '/kperf/actions/'",
    );
    refused(get("/v1/"), 404, "no such path '/v1/'");
    // Ids beyond the configured counts.
    refused(
        get("/kperf/actions/2"),
        404,
        "action id 2 is out of range: action ids are 1 to action_count (1) (CFG-A-2)",
    );
    refused_with(put("/kperf/actions/33", action), 404, "(CFG-A-2)");
    refused_with(get("/kperf/timers/1"), 404, "timer");
    refused_with(put("/kperf/timers/8", timer), 404, "timer");
    // Wrong methods.
    refused(
        server.call("DELETE", "/kperf/sampling", None),
        405,
        "method DELETE is not allowed on /kperf/sampling: allowed GET, PUT",
    );
    refused(
        server.call("POST", "/actions", Some("{}")),
        405,
        "method POST is not allowed on /actions: allowed PUT",
    );
    refused(
        put("/kperf/limits", "{}"),
        405,
        "method PUT is not allowed on /kperf/limits: allowed GET",
    );
    refused(
        server.call("PATCH", "/kperf/timers/0", Some(timer)),
        405,
        "method PATCH is not allowed on /kperf/timers/0: allowed GET, PUT",
    );

    // While sampling: timer and count changes are busy (EBUSY).
    assert_eq!(put("/kperf/sampling", r#"{"on": true}"#).0, 204);
    refused(
        put("/kperf/timers/0", timer),
        409,
        "PUT /kperf/timers refused: kperf is busy: the timers are started while sampling is on",
    );
    refused(
        put("/kperf/timer-count", r#"{"count": 2}"#),
        409,
        "PUT /kperf/timer-count refused: kperf is busy",
    );
    refused_with(put("/kperf/pet", r#"{"timer_id": 0}"#), 409, "(EBUSY");
    assert_eq!(put("/kperf/sampling", r#"{"on": false}"#).0, 204);

    // Pre-boot sections after start.
    for (path, body) in [
        (
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 64}"#,
        ),
        ("/boot-source", r#"{"workload": "demo"}"#),
        ("/clock", r#"{"hz": 100}"#),
    ] {
        refused(
            put(path, body),
            400,
            &format!(
                "{path} is pre-boot only: it can be changed before InstanceStart, and the \
                 instance has started"
            ),
        );
    }
    refused_with(server.action("InstanceStart"), 400, "allowed once");
}

/// Garbage, a hanging head, huge and too many headers, a body too large or
/// never complete.
fn malformed_http(server: &Server) {
    // Garbage bytes: 400 or closed; the server keeps serving.
    let mut stream = connect(server);
    stream
        .write_all(b"\x16\x03\x01\x02\x00\xff\xfe garbage \x00\r\n\r\n")
        .unwrap();
    let answer = read_answer(&mut stream);
    assert!(
        answer.status.is_none() || answer.status == Some(400),
        "{answer:?}"
    );
    assert_eq!(server.state(), "Running");

    // A head left hanging: others are served meanwhile, and it is closed,
    // unanswered, after the header timeout.
    let mut hanging = connect(server);
    hanging
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    assert_eq!(server.state(), "Running");
    let answer = read_answer(&mut hanging);
    assert_eq!(answer.status, None, "{answer:?}");

    // A request head beyond 8 KiB, and one with more than 32 fields: 431.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9 * 1024)
    );
    let answer = raw_request(server, "GET", "/", &big, b"");
    assert_eq!(answer.status, Some(431), "{answer:?}");
    let many: String = (0..40).map(|i| format!("X-Field-{i}: {i}\r\n")).collect();
    let head = format!("GET / HTTP/1.1\r\nHost: localhost\r\n{many}\r\n");
    let answer = raw_request(server, "GET", "/", &head, b"");
    assert_eq!(answer.status, Some(431), "{answer:?}");

    // A body beyond 64 KiB: 413.
    let body = vec![b' '; 70 * 1024];
    let head = format!(
        "PUT /kperf/sampling HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let answer = raw_request(server, "PUT", "/kperf/sampling", &head, &body);
    assert_eq!(answer.status, Some(413), "{answer:?}");
    assert_eq!(
        raw_fault(&answer),
        "the request body is too large: at most 65536 bytes"
    );

    // A body that never completes: 408 after the body timeout; others are
    // served meanwhile.
    let mut stream = connect(server);
    stream
        .write_all(
            b"PUT /kperf/sampling HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\nConnection: close\r\n\r\n{\"on\"",
        )
        .unwrap();
    assert_eq!(server.state(), "Running");
    let answer = read_answer(&mut stream);
    assert_eq!(answer.status, Some(408), "{answer:?}");
    assert_eq!(
        raw_fault(&answer),
        "the request body did not arrive within 2 s"
    );
    check(Exchange {
        method: "PUT".into(),
        path: "/kperf/sampling".into(),
        status: 408,
        content_type: answer.content_type,
        body: answer.body,
    });
}

/// A client that stops reading large answers holds its connection, not the
/// server: others are still served.
fn slow_reader(server: &Server) {
    let mut stream = connect(server);
    // About 3 MB of answers, far beyond the socket buffers.
    let request = "GET /openapi.json HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(30);
    stream.write_all(request.as_bytes()).unwrap();
    // Until the server's writes to it block, and after.
    for _ in 0..3 {
        assert_eq!(server.state(), "Running");
        assert_eq!(server.call("GET", "/openapi.json", None).0, 200);
    }
    drop(stream);
}

/// Clients that stop reading hold their slots only until the write
/// timeout: with every slot held by one, another client is answered once
/// the server has closed a stalled connection (without the timeout it would
/// wait for ever, and [`read_answer`] fails after [`PATIENCE`]).
fn stalled_readers(server: &Server) {
    let request = "GET /openapi.json HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(30);
    let stalled: Vec<UnixStream> = (0..16)
        .map(|_| {
            let mut stream = connect(server);
            stream.write_all(request.as_bytes()).unwrap();
            stream
        })
        .collect();
    let mut next = connect(server);
    next.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let answer = read_answer(&mut next);
    assert_eq!(answer.status, Some(200), "{answer:?}");
    drop(stalled);
}

/// Connections beyond the limit wait until a slot frees: with every slot
/// held by an idle connection, one more is answered only once the server
/// has closed one of them (after the header timeout).
fn connection_limit(server: &Server) {
    let idle: Vec<UnixStream> = (0..16).map(|_| connect(server)).collect();
    let mut next = connect(server);
    next.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let answer = read_answer(&mut next);
    assert_eq!(answer.status, Some(200), "{answer:?}");
    // The server closed an idle connection before it took this one: its
    // end is already readable.
    let closed = idle
        .iter()
        .filter(|stream| {
            stream.set_nonblocking(true).unwrap();
            matches!((&**stream).read(&mut [0; 1]), Ok(0))
        })
        .count();
    assert!(
        closed >= 1,
        "answered while 16 idle connections held every slot"
    );
}

/// A hundred clients at once: each is served or refused cleanly.
fn hundred_at_once(server: &Server) {
    let socket = server.socket.clone();
    let clients: Vec<_> = (0..100)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let Ok(mut stream) = UnixStream::connect(&socket) else {
                    return None;
                };
                let request = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
                stream.write_all(request).ok()?;
                let answer = read_answer(&mut stream);
                answer.status.map(|status| (status, answer))
            })
        })
        .collect();
    let mut served = 0;
    for client in clients {
        // Cannot panic unless the client thread did (a test failure).
        if let Some((status, answer)) = client.join().expect("client thread") {
            assert_eq!(status, 200, "{answer:?}");
            check(Exchange {
                method: "GET".into(),
                path: "/".into(),
                status,
                content_type: answer.content_type,
                body: answer.body,
            });
            served += 1;
        }
    }
    assert!(served > 0, "no client of a hundred was served");
}

#[test]
fn test_api_bad_inputs_and_hostile_http_on_a_running_guest() {
    if !kvm_or_skip("api bad inputs and hostile HTTP") {
        return;
    }
    let _serial = kvm_lock();
    let server = Server::start_with(&[], &[("METRONOME_API_TEST_TIMEOUT_MS", TEST_TIMEOUT_MS)]);
    let machine = r#"{"vcpu_count": 2, "mem_size_mib": 96}"#;
    assert_eq!(server.call("PUT", "/machine-config", Some(machine)).0, 204);
    let boot = r#"{"workload": "demo", "duration_s": 600}"#;
    assert_eq!(server.call("PUT", "/boot-source", Some(boot)).0, 204);
    assert_eq!(server.action("InstanceStart").0, 204);
    let started = clock_figures(&server);

    bad_input_matrix(&server);
    assert_eq!(server.state(), "Running");
    let after_matrix = clock_grows_past(&server, started);

    malformed_http(&server);
    slow_reader(&server);
    stalled_readers(&server);
    connection_limit(&server);
    hundred_at_once(&server);

    // The guest still runs, its clock still ticks, the API still answers.
    assert_eq!(server.state(), "Running");
    clock_grows_past(&server, after_matrix);
    assert_eq!(server.action("SendExit").0, 204);
    let (_, summary) = server.call("GET", "/summary", None);
    assert_eq!(summary["outcome"], "stopped");
    assert_eq!(server.terminate(), 0);
}
