//! `GET /metrics` (JSON, or the Prometheus text format with
//! `?format=prometheus`), `PUT /metrics` (the metrics sink, pre-boot) and
//! `FlushMetrics`, and the count of the API's answers by status code.
//!
//! The VM's counters are read on the VMM thread, through the request hop
//! ([`crate::VmController::metrics`]); before InstanceStart they are zeros,
//! after the exit the values at the end of the run.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::errors::{ApiError, Fault};
use super::instance::Instance;
use super::openapi::{AnyRequest, BodyRefusals};
use super::routes::ApiJson;
use crate::metrics::{prometheus, VmMetrics};

/// The metrics paths and their methods (for the 404 and 405 messages).
pub const ROUTES: [(&str, &str); 1] = [("/metrics", "GET, PUT")];

/// The metrics routes.
pub fn routes() -> Router<Arc<Instance>> {
    Router::new().route(ROUTES[0].0, get(get_metrics).put(put_metrics))
}

/// The API's answers by status code, counted by [`count_responses`].
#[derive(Debug, Default)]
pub struct RequestCounts(Mutex<BTreeMap<u16, u64>>);

impl RequestCounts {
    /// Counts one answer with `status`.
    pub fn count(&self, status: StatusCode) {
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(status.as_u16())
            .or_insert(0) += 1;
    }

    /// The counts so far, by status code.
    pub fn snapshot(&self) -> BTreeMap<u16, u64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The middleware on the whole router: counts every answer the router
/// gives, 404 and 405 included, once it is made (so a `GET /metrics` counts
/// in the next read, not in its own).
pub async fn count_responses(
    State(instance): State<Arc<Instance>>,
    request: Request,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    instance.requests.count(response.status());
    response
}

/// The formats of `GET /metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MetricsFormat {
    /// JSON ([`MetricsBody`]).
    #[default]
    Json,
    /// The Prometheus text exposition format, version 0.0.4.
    Prometheus,
}

/// The query of `GET /metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    /// `json` (the default) or `prometheus`.
    #[param(inline)]
    pub format: Option<MetricsFormat>,
}

/// `GET /metrics` as JSON, and each line `FlushMetrics` appends to the sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct MetricsBody {
    /// The instance state: `Not started`, `Running`, `Paused` or `Exited`.
    pub state: &'static str,
    /// When these values were read, ms since the Unix epoch.
    pub utc_timestamp_ms: u64,
    /// The VM's metrics (zeros and no vCPUs before InstanceStart).
    #[serde(flatten)]
    pub vm: VmMetrics,
    /// API answers by HTTP status code, this read excluded.
    #[schema(value_type = BTreeMap<String, u64>)]
    pub api_requests: BTreeMap<u16, u64>,
}

/// The body of `PUT /metrics`: where `FlushMetrics` appends the metrics.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricsSink {
    /// A file (created with mode 0600 if missing, appended to) or a FIFO
    /// with a reader.
    pub metrics_path: String,
}

/// The metrics now: the VM's read on its VMM thread, the API's counters here.
async fn read(instance: &Arc<Instance>) -> Result<MetricsBody, ApiError> {
    let state = instance.state_name();
    let vm = instance.vm_metrics().await.unwrap_or_default();
    let utc_timestamp_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Ok(MetricsBody {
        state,
        utc_timestamp_ms,
        vm,
        api_requests: instance.requests.snapshot(),
    })
}

/// The VM's counters and histograms, and the API's answers by status.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "metrics",
    params(MetricsQuery),
    responses(
        (status = 200, description = "The metrics: JSON by default, the Prometheus text format \
            (version 0.0.4) with format=prometheus",
            content(
                (MetricsBody = "application/json"),
                (String = "text/plain; version=0.0.4; charset=utf-8")
            )),
        (status = 400, description = "An unknown query parameter or format",
            body = Fault, content_type = "application/json"),
        AnyRequest,
    )
)]
pub async fn get_metrics(
    State(instance): State<Arc<Instance>>,
    query: Result<Query<MetricsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| {
        ApiError::bad_request(format!(
            "invalid query for GET /metrics: {}; the only parameter is format=json (the default) \
             or format=prometheus",
            e.body_text()
        ))
    })?;
    let body = read(&instance).await?;
    Ok(match query.format.unwrap_or_default() {
        MetricsFormat::Json => Json(body).into_response(),
        MetricsFormat::Prometheus => (
            [(header::CONTENT_TYPE, prometheus::CONTENT_TYPE)],
            prometheus::encode(&body.vm, &body.api_requests),
        )
            .into_response(),
    })
}

/// Sets where `FlushMetrics` appends the metrics, before InstanceStart.
#[utoipa::path(
    put,
    path = "/metrics",
    tag = "metrics",
    request_body(content = MetricsSink, content_type = "application/json"),
    responses(
        (status = 204, description = "The sink is set (it replaces an earlier one); 400 also \
            for a path that cannot be opened, or after InstanceStart"),
        BodyRefusals,
        AnyRequest,
    )
)]
pub async fn put_metrics(
    State(instance): State<Arc<Instance>>,
    ApiJson(sink): ApiJson<MetricsSink>,
) -> Result<StatusCode, ApiError> {
    if sink.metrics_path.is_empty() {
        return Err(ApiError::bad_request(
            "metrics_path is empty: give the path of a file or FIFO to append the metrics to",
        ));
    }
    let path = sink.metrics_path.clone();
    let file = tokio::task::spawn_blocking(move || open_sink(&path))
        .await
        .map_err(|e| ApiError::internal(format!("opening metrics_path failed: {e}")))?
        .map_err(|e| {
            ApiError::bad_request(format!(
                "cannot open metrics_path '{}': {e}",
                sink.metrics_path
            ))
        })?;
    instance.set_metrics_sink(file)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Opens the sink for appending: created 0600 if missing; non-blocking, so
/// that a FIFO without a reader is refused rather than waited for.
fn open_sink(path: &str) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// `FlushMetrics`: appends one JSON line of the metrics to the sink set with
/// `PUT /metrics`; without a sink there is nothing to flush.
pub async fn flush(instance: &Arc<Instance>) -> Result<(), ApiError> {
    let Some(sink) = instance.metrics_sink() else {
        return Ok(());
    };
    let body = read(instance).await?;
    let mut line = serde_json::to_vec(&body)
        .map_err(|e| ApiError::internal(format!("FlushMetrics: cannot encode: {e}")))?;
    line.push(b'\n');
    tokio::task::spawn_blocking(move || {
        let mut file = sink.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(&line)
    })
    .await
    .map_err(|e| ApiError::internal(format!("FlushMetrics failed: {e}")))?
    .map_err(|e| ApiError::internal(format!("FlushMetrics: cannot write the metrics: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::routes::tests::{call_on, new_instance, run};
    use axum::body::Body;
    use tower::ServiceExt;

    #[test]
    fn test_metrics_before_start_are_zeros_and_count_statuses() {
        run(async {
            let instance = new_instance();
            let call = |method, path| call_on(&instance, method, path, "");
            assert_eq!(call("GET", "/nope").await.0, StatusCode::NOT_FOUND);
            assert_eq!(
                call("DELETE", "/metrics").await.0,
                StatusCode::METHOD_NOT_ALLOWED
            );
            assert_eq!(call("GET", "/").await.0, StatusCode::OK);
            let (status, body) = call("GET", "/metrics").await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body["state"], "Not started");
            assert_eq!(body["guest_uptime_ns"], 0);
            assert_eq!(body["vcpus"], serde_json::json!([]));
            assert_eq!(body["kperf"]["samples"], 0);
            assert_eq!(
                body["api_requests"],
                serde_json::json!({"200": 1, "404": 1, "405": 1})
            );
            // The read above is counted in the next one.
            let (_, body) = call("GET", "/metrics?format=json").await;
            assert_eq!(body["api_requests"]["200"], 2);
        });
    }

    #[test]
    fn test_bad_queries_name_the_allowed_values() {
        run(async {
            let instance = new_instance();
            for query in ["format=xml", "format=", "fmt=json", "format=json&x=1"] {
                let (status, body) =
                    call_on(&instance, "GET", &format!("/metrics?{query}"), "").await;
                assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
                let message = body["fault_message"].as_str().unwrap();
                assert!(
                    message.contains("format=json (the default) or format=prometheus"),
                    "{query}: {message}"
                );
            }
            let (status, _) = call_on(&instance, "GET", "/metrics?format=json", "").await;
            assert_eq!(status, StatusCode::OK);
        });
    }

    #[test]
    fn test_prometheus_format_content_type_and_api_counts() {
        run(async {
            let instance = new_instance();
            let _ = call_on(&instance, "GET", "/nowhere", "").await;
            let request = Request::builder()
                .uri("/metrics?format=prometheus")
                .body(Body::empty())
                .unwrap();
            let response = super::super::routes::router(instance.clone())
                .oneshot(request)
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(
                response.headers()[header::CONTENT_TYPE],
                "text/plain; version=0.0.4; charset=utf-8"
            );
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            let text = String::from_utf8(bytes.to_vec()).unwrap();
            assert!(text.contains("metronome_api_requests_total{status=\"404\"} 1\n"));
            let uptime: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix("metronome_guest_uptime_seconds "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(uptime, 0.0);
        });
    }

    #[test]
    fn test_flush_metrics_appends_one_line_per_flush() {
        run(async {
            let instance = new_instance();
            let dir = std::env::temp_dir().join(format!("metronome-sink-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("metrics.jsonl");
            let _ = std::fs::remove_file(&path);
            let (status, body) =
                call_on(&instance, "PUT", "/metrics", r#"{"metrics_path": ""}"#).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert!(body["fault_message"]
                .as_str()
                .unwrap()
                .contains("metrics_path is empty"));
            let bad = r#"{"metrics_path": "/nonexistent-dir/m"}"#;
            let (status, body) = call_on(&instance, "PUT", "/metrics", bad).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert!(body["fault_message"]
                .as_str()
                .unwrap()
                .starts_with("cannot open metrics_path '/nonexistent-dir/m'"));
            let put = format!(r#"{{"metrics_path": "{}"}}"#, path.display());
            let (status, _) = call_on(&instance, "PUT", "/metrics", &put).await;
            assert_eq!(status, StatusCode::NO_CONTENT);
            let flush = r#"{"action_type": "FlushMetrics"}"#;
            for _ in 0..2 {
                let (status, _) = call_on(&instance, "PUT", "/actions", flush).await;
                assert_eq!(status, StatusCode::NO_CONTENT);
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(lines.len(), 2);
            assert_eq!(lines[0]["state"], "Not started");
            // The first flush's answer is counted in the second line.
            assert_eq!(lines[1]["api_requests"]["204"], 2);
            std::fs::remove_dir_all(&dir).unwrap();
        });
    }
}
