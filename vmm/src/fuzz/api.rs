//! The API's edges: a request into the router, and raw bytes into hyper's
//! HTTP/1.1 server in front of it.
//!
//! The instance is never started and no file is created: a request that
//! would boot a VM (`InstanceStart`) or open a file (`PUT /metrics`) is left
//! out, decided on what the handler would see (the body parsed as JSON, the
//! path as routed).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

use super::block_on;
use crate::api::{routes, Instance};
use crate::VmConfig;

/// Separates requests in an `api_request` input.
const SEPARATOR: &[u8] = b"\n---\n";

/// The statuses the router may answer a client of an instance not started
/// (README, "Errors"): success, or a refusal that is the client's.
const STATUSES: [u16; 9] = [200, 204, 400, 404, 405, 408, 409, 413, 431];

/// An instance not started, on the default configuration.
fn instance() -> Arc<Instance> {
    Instance::new(VmConfig::default(), Box::new(|_, _| {}))
}

/// Whether a JSON value names `InstanceStart` or `metrics_path` anywhere:
/// a request the harness must not send (it boots a VM or opens a file).
fn side_effect(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s == "InstanceStart",
        serde_json::Value::Array(items) => items.iter().any(side_effect),
        serde_json::Value::Object(map) => map
            .iter()
            .any(|(k, v)| k == "metrics_path" || side_effect(v)),
        _ => false,
    }
}

/// Checks one answer of the router: a refusal is a listed 4xx with a JSON
/// `{"fault_message": "..."}` body saying something; a success with a body
/// is JSON unless it is the Prometheus text.
async fn check_answer(response: Response, what: &str) {
    let status = response.status();
    assert!(
        STATUSES.contains(&status.as_u16()),
        "{what}: status {status} is not one the API documents for an instance not started"
    );
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let Ok(bytes) = axum::body::to_bytes(response.into_body(), usize::MAX).await else {
        panic!("{what}: the answer's body failed");
    };
    if status.is_client_error() {
        assert!(json, "{what}: a {status} refusal without a JSON body");
        let body: serde_json::Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{what}: a {status} refusal's body is not JSON: {e}"));
        let message = body["fault_message"].as_str().unwrap_or_default();
        assert!(
            !message.is_empty() && body.as_object().is_some_and(|o| o.len() == 1),
            "{what}: a {status} refusal without a fault_message: {body}"
        );
    } else if json && !bytes.is_empty() {
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            panic!("{what}: a {status} answer's JSON body does not parse: {e}");
        }
    }
}

/// Target `api_request`: requests separated by `\n---\n`, each a line
/// `METHOD PATH[?QUERY]` and the body after it, through the router of one
/// instance not started, in order.
///
/// # Panics
///
/// When an answer breaks the API's rules (see [`super`]), or the instance's
/// configuration stops validating.
pub fn api_request(data: &[u8]) {
    let instance = instance();
    block_on(async {
        for chunk in split(data, SEPARATOR).take(16) {
            let (head, body) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (&chunk[..i], &chunk[i + 1..]),
                None => (chunk, &[][..]),
            };
            let head = String::from_utf8_lossy(head);
            let (method, uri) = head.split_once(' ').unwrap_or((&head, "/"));
            if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
                if side_effect(&value) {
                    continue;
                }
            }
            let Ok(request) = Request::builder()
                .method(method)
                .uri(uri)
                .body(Body::from(body.to_vec()))
            else {
                // Not a request hyper would hand over: `api_http`'s part.
                continue;
            };
            let what = format!("{method} {uri}");
            let response = routes::router(instance.clone())
                .oneshot(request)
                .await
                .unwrap_or_else(|e| match e {});
            check_answer(response, &what).await;
            if let Err(e) = instance.config().validate() {
                panic!("{what}: the instance's configuration no longer validates: {e}");
            }
        }
    });
}

/// `data` cut at every `separator`.
fn split<'a>(data: &'a [u8], separator: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let now = rest?;
        match now.windows(separator.len()).position(|w| w == separator) {
            Some(i) => {
                rest = Some(&now[i + separator.len()..]);
                Some(&now[..i])
            }
            None => {
                rest = None;
                Some(now)
            }
        }
    })
}

/// The middleware of the `api_http` harness: a `PUT` that could reach
/// `/actions` or `/metrics` is answered 409 here (it may boot a VM or
/// open a file); every other request goes to the router.
async fn guard(request: Request, next: axum::middleware::Next) -> Response {
    let path = request.uri().path().to_ascii_lowercase();
    let risky = ["actions", "metrics", "%"].iter().any(|p| path.contains(p));
    if request.method() == axum::http::Method::PUT && risky {
        return (StatusCode::CONFLICT, "left out by the fuzz harness").into_response();
    }
    next.run(request).await
}

/// Target `api_http`: `data` is what a client writes on one connection,
/// then it closes its side; the server is hyper's HTTP/1.1 with the API's
/// bounds ([`crate::api::server::http1_builder`]) in front of the router.
///
/// # Panics
///
/// When the connection does not end within 10 s of the client's close, or
/// the server writes something that is not an HTTP/1.1 answer.
pub fn api_http(data: &[u8]) {
    let router = routes::router(instance()).layer(axum::middleware::from_fn(guard));
    let service = hyper_util::service::TowerToHyperService::new(router);
    let request = data.to_vec();
    let answer = block_on(async move {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let serving = tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(server);
            // A malformed request ends the connection with an error: that
            // is hyper refusing it, not a failure.
            let _ = crate::api::server::http1_builder()
                .serve_connection(io, service)
                .await;
        });
        let (mut read, mut write) = tokio::io::split(client);
        let writing = async move {
            let _ = write.write_all(&request).await;
            let _ = write.shutdown().await;
        };
        let mut answer = Vec::new();
        let reading = read.read_to_end(&mut answer);
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            let (_, read) = tokio::join!(writing, reading);
            let _ = read;
            serving.await
        })
        .await;
        match ended {
            Ok(Ok(())) => answer,
            Ok(Err(e)) => panic!("the connection task failed: {e}"),
            Err(_) => panic!("the connection did not end within 10 s of the client's close"),
        }
    });
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 ") || answer.starts_with(b"HTTP/1.0 "),
        "the server wrote something that is not an HTTP/1.x answer: {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(64)])
    );
}

/// Seeds of `api_request`: one request of each route, and a sequence.
pub fn seeds() -> Vec<Vec<u8>> {
    super::texts(&[
        "GET /",
        "PUT /machine-config\n{\"vcpu_count\": 2, \"mem_size_mib\": 128}",
        "GET /machine-config",
        "PUT /boot-source\n{\"workload\": \"demo\", \"duration_s\": 1.5}",
        "PUT /clock\n{\"hz\": 100, \"stathz\": 128, \"profhz\": 1024}",
        "PUT /actions\n{\"action_type\": \"Pause\"}",
        "PUT /actions\n{\"action_type\": \"FlushMetrics\"}",
        "GET /summary",
        "GET /clockintr",
        "GET /profile?format=folded",
        "GET /trace",
        "GET /metrics?format=prometheus",
        "GET /kperf/actions/1",
        "PUT /kperf/actions/1\n{\"samplers\": [\"th_info\", \"ustack\"], \"user_stack_depth\": 64}",
        "PUT /kperf/timers/0\n{\"period_ns\": 1000000, \"action_id\": 1}",
        "PUT /kperf/action-count\n{\"count\": 2}",
        "PUT /kperf/timer-count\n{\"count\": 2}",
        "PUT /kperf/pet\n{\"timer_id\": 0, \"lightweight\": true}",
        "PUT /kperf/sampling\n{\"enabled\": true}",
        "PUT /kperf/reset\n{}",
        "GET /kperf/limits",
        "GET /kperf/counters",
        "GET /openapi.json",
        "PUT /kperf/action-count\n{\"count\": 1}\n---\nPUT /kperf/timer-count\n{\"count\": 1}\n---\n\
         PUT /kperf/timers/0\n{\"period_ns\": 20000, \"action_id\": 1}\n---\nGET /kperf/timers/0",
    ])
}

/// Seeds of `api_http`: whole HTTP/1.1 requests, pipelined and chunked.
pub fn http_seeds() -> Vec<Vec<u8>> {
    super::texts(&[
        "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 20\r\n\r\n{\"vcpu_count\": 2}   ",
        "PUT /clock HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
         a\r\n{\"hz\": 100\r\n1\r\n}\r\n0\r\n\r\n",
        "GET /kperf/limits HTTP/1.1\r\nHost: x\r\n\r\nGET /summary HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /metrics?format=prometheus HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /nope HTTP/1.0\r\n\r\n",
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::tests::check_target;

    #[test]
    fn test_api_request_property() {
        check_target("api_request", 1500, 11);
    }

    #[test]
    fn test_api_http_property() {
        check_target("api_http", 600, 12);
    }

    /// Found by libFuzzer: an `{id}` whose percent-escape is not UTF-8 was
    /// refused by axum's `Path` in plain text, without a `fault_message`.
    #[test]
    fn test_regression_path_id_not_utf8_is_a_fault() {
        api_request(include_bytes!("regressions/api_request-path-not-utf8.txt"));
        api_request(b"GET /kperf/timers/%ff");
    }

    #[test]
    fn test_side_effects_are_found_behind_escapes() {
        let body: serde_json::Value =
            serde_json::from_str(r#"{"action_type": "\u0049nstanceStart"}"#).unwrap();
        assert!(side_effect(&body));
        let body: serde_json::Value = serde_json::from_str(r#"{"metrics_path": "/x"}"#).unwrap();
        assert!(side_effect(&body));
        let body: serde_json::Value = serde_json::from_str(r#"{"action_type": "Pause"}"#).unwrap();
        assert!(!side_effect(&body));
    }

    #[test]
    fn test_a_refusal_without_a_fault_message_is_caught() {
        let response = (StatusCode::BAD_REQUEST, "plain").into_response();
        let check = std::panic::AssertUnwindSafe(|| block_on(check_answer(response, "x")));
        let caught = std::panic::catch_unwind(check);
        assert!(caught.is_err());
    }
}
