//! The API's OpenAPI 3.1 document, generated from the handlers'
//! `#[utoipa::path]` annotations and the request and answer types'
//! `ToSchema` derives, so that it cannot drift from the code. It is served
//! at `GET /openapi.json` and committed as `resources/openapi.json` (a unit
//! test fails when the two differ; `METRONOME_BLESS=1 cargo test -p vmm
//! api::openapi` rewrites the file).
//!
//! [`ApiDoc`]'s `paths(...)` is the one list of the API's operations: a new
//! endpoint's handler, annotated with its responses, is added there and
//! nowhere else. The router's 404 and 405 messages list the paths and
//! methods from the document ([`allowed_methods`], [`paths`]), and a unit
//! test checks that the router serves every operation the document lists.
//!
//! Besides each operation's own answers, the router answers a path it does
//! not know with 404 and a method a path does not take with 405; the
//! document describes these in `components.responses` (`UnknownPath`,
//! `MethodNotAllowed`), as [`RouterAnswers`] adds them.

use std::sync::OnceLock;

use axum::Json;
use utoipa::openapi::path::PathItem;
use utoipa::openapi::{ContentBuilder, OpenApi as Document, Ref, ResponseBuilder};
use utoipa::{IntoResponses, Modify, OpenApi};

use super::errors::Fault;
use super::{kperf, kperf_routes, metrics, readout, routes};

/// The API's OpenAPI document.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Metronome API",
        description = "Metronome's API socket: HTTP/1.1 with JSON bodies on a Unix domain socket \
            (`metronome --api-sock PATH`), in the manner of Firecracker's. Every refusal is \
            `{\"fault_message\": \"...\"}` saying what was wrong and what is allowed. A path \
            not listed here is answered with `components.responses.UnknownPath` (404), a \
            method a path does not take with `components.responses.MethodNotAllowed` (405).",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    paths(
        routes::get_instance,
        routes::get_machine_config,
        routes::put_machine_config,
        routes::get_boot_source,
        routes::put_boot_source,
        routes::get_clock,
        routes::put_clock,
        routes::put_actions,
        readout::get_summary,
        routes::get_clockintr,
        readout::get_profile,
        readout::get_trace,
        metrics::get_metrics,
        metrics::put_metrics,
        kperf_routes::get_action,
        kperf_routes::put_action,
        kperf_routes::get_timer,
        kperf_routes::put_timer,
        kperf_routes::get_action_count,
        kperf_routes::put_action_count,
        kperf_routes::get_timer_count,
        kperf_routes::put_timer_count,
        kperf::get_pet,
        kperf::put_pet,
        kperf::get_sampling,
        kperf::put_sampling,
        kperf::put_reset,
        kperf::get_limits,
        kperf::get_counters,
        get_openapi,
    ),
    components(schemas(Fault)),
    modifiers(&RouterAnswers),
    tags(
        (name = "instance", description = "The instance: its state, start, pause, resume, exit, its figures"),
        (name = "pre-boot", description = "The VM configuration, before InstanceStart"),
        (name = "kperf", description = "kperf's actions, timers, PET and sampling, at any time"),
        (name = "profiling", description = "Profiles and the trace, while the guest runs and after"),
        (name = "metrics", description = "Counters and histograms, JSON or Prometheus text; the metrics sink"),
        (name = "document", description = "This document"),
    )
)]
pub struct ApiDoc;

/// Adds the router's own answers to `components.responses`: 404 for a path
/// the document does not list, 405 for a method a listed path does not take.
#[derive(Debug)]
pub struct RouterAnswers;

impl Modify for RouterAnswers {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let fault = || {
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Fault")))
                .build()
        };
        components.responses.insert(
            "UnknownPath".into(),
            ResponseBuilder::new()
                .description("No such path: the fault_message lists the paths")
                .content("application/json", fault())
                .build()
                .into(),
        );
        components.responses.insert(
            "MethodNotAllowed".into(),
            ResponseBuilder::new()
                .description(
                    "The path does not take this method: the fault_message lists the ones it takes",
                )
                .content("application/json", fault())
                .build()
                .into(),
        );
    }
}

/// What any request may be answered besides its operation's own statuses.
#[derive(Debug, IntoResponses)]
pub enum AnyRequest {
    /// The request head is too large: more than 8 KiB or more than 32
    /// header fields. The HTTP layer answers, without a body, and closes the
    /// connection.
    #[response(status = 431)]
    HeaderFieldsTooLarge,
}

/// What a request with a JSON body may be answered besides its
/// operation's own statuses.
#[derive(Debug, IntoResponses)]
pub enum BodyRefusals {
    /// The request is refused: malformed JSON, a wrong type, a missing or
    /// unknown field, a value out of range or breaking a rule, or a request
    /// the instance's state does not allow.
    #[response(status = 400)]
    BadRequest(Fault),
    /// The body did not arrive within 10 s of the head.
    #[response(status = 408)]
    RequestTimeout(Fault),
    /// The body is larger than 64 KiB.
    #[response(status = 413)]
    PayloadTooLarge(Fault),
}

/// What a request the instance's state may refuse, or the host fail, may
/// be answered besides its operation's own statuses (requests without a
/// body).
#[derive(Debug, IntoResponses)]
pub enum StateRefusals {
    /// The request is refused: a path id that is not a number, or a state
    /// that does not allow it (the instance is starting, not running, or
    /// has exited).
    #[response(status = 400)]
    BadRequest(Fault),
    /// The host failed to do what was asked.
    #[response(status = 500)]
    InternalServerError(Fault),
}

/// What a kperf change may be answered besides [`BodyRefusals`] and its
/// operation's own statuses.
#[derive(Debug, IntoResponses)]
pub enum KperfRefusals {
    /// kperf is busy (EBUSY): the timers are started while sampling is on;
    /// timer, timer-count and PET changes need sampling off.
    #[response(status = 409)]
    Conflict(Fault),
    /// The host failed to do what was asked (the PET sampler thread could
    /// not start, say).
    #[response(status = 500)]
    InternalServerError(Fault),
}

/// The document, generated once.
pub fn document() -> &'static Document {
    static DOCUMENT: OnceLock<Document> = OnceLock::new();
    DOCUMENT.get_or_init(ApiDoc::openapi)
}

/// The document as the committed `resources/openapi.json` holds it: pretty
/// JSON and a final newline.
pub fn document_json() -> String {
    // Cannot panic: the document is made of maps, strings and numbers.
    let mut json = serde_json::to_string_pretty(document()).expect("the document serializes");
    json.push('\n');
    json
}

/// Every path of the document, in order.
pub fn paths() -> impl Iterator<Item = &'static str> {
    document().paths.paths.keys().map(String::as_str)
}

/// The methods a path item takes, as `GET, PUT`.
fn methods(item: &PathItem) -> String {
    let all = [
        ("GET", &item.get),
        ("PUT", &item.put),
        ("POST", &item.post),
        ("PATCH", &item.patch),
        ("DELETE", &item.delete),
    ];
    let names: Vec<&str> = all
        .iter()
        .filter(|(_, operation)| operation.is_some())
        .map(|(name, _)| *name)
        .collect();
    names.join(", ")
}

/// Whether `path` is `template`'s, a `{...}` segment matching any one
/// non-empty segment.
pub fn template_matches(template: &str, path: &str) -> bool {
    let (mut template, mut path) = (template.split('/'), path.split('/'));
    loop {
        match (template.next(), path.next()) {
            (None, None) => return true,
            (Some(t), Some(p)) if t == p || (t.starts_with('{') && !p.is_empty()) => {}
            _ => return false,
        }
    }
}

/// The methods the document lists for `path` (`GET, PUT`), or `None` for a
/// path it does not list.
pub fn allowed_methods(path: &str) -> Option<String> {
    document()
        .paths
        .paths
        .iter()
        .find(|(template, _)| template_matches(template, path))
        .map(|(_, item)| methods(item))
}

/// `GET /openapi.json`: this document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "document",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API", body = Object),
        AnyRequest,
    )
)]
pub(crate) async fn get_openapi() -> Json<&'static Document> {
    Json(document())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::routes::tests::{call_on, new_instance, run};
    use axum::http::StatusCode;

    /// The committed document: `resources/openapi.json`.
    fn committed_path() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/openapi.json")
    }

    #[test]
    fn test_committed_document_is_the_generated_one() {
        let path = committed_path();
        let generated = document_json();
        if std::env::var_os("METRONOME_BLESS").is_some() {
            std::fs::write(&path, &generated).expect("write resources/openapi.json");
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "resources/openapi.json is not the document the code generates; regenerate it with \
             `METRONOME_BLESS=1 cargo test -p vmm api::openapi` and commit it"
        );
    }

    #[test]
    fn test_router_serves_every_documented_operation() {
        run(async {
            let instance = new_instance();
            let mut operations = 0;
            for (template, item) in &document().paths.paths {
                let path = template.replace("{id}", "1");
                for method in methods(item).split(", ") {
                    // A body that parses nowhere: a served PUT refuses it
                    // with 400, never 404 or 405.
                    let (status, body) = call_on(&instance, method, &path, "[").await;
                    assert!(
                        status != StatusCode::NOT_FOUND
                            || !body.to_string().contains("no such path")
                    );
                    assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
                    operations += 1;
                }
            }
            assert_eq!(operations, 30);
        });
    }

    #[test]
    fn test_paths_and_methods_come_from_the_document() {
        assert_eq!(
            allowed_methods("/kperf/actions/7").as_deref(),
            Some("GET, PUT")
        );
        assert_eq!(allowed_methods("/summary").as_deref(), Some("GET"));
        assert_eq!(allowed_methods("/kperf/actions/"), None);
        assert_eq!(allowed_methods("/vm"), None);
        assert!(paths().any(|p| p == "/openapi.json"));
        let json: serde_json::Value = serde_json::from_str(&document_json()).unwrap();
        assert_eq!(json["openapi"], "3.1.0");
        let put = &json["paths"]["/kperf/timers/{id}"]["put"]["responses"];
        for status in ["204", "400", "404", "408", "409", "413", "431"] {
            assert!(
                put.get(status).is_some(),
                "PUT /kperf/timers lists {status}"
            );
        }
        assert!(json["components"]["responses"]["MethodNotAllowed"].is_object());
    }

    #[test]
    fn test_bounds_in_the_document_are_the_constants() {
        use crate::api::{BODY_TIMEOUT, MAX_BODY_BYTES, MAX_HEADERS, MAX_HEADER_BYTES};
        // Doc comments keep their line breaks in the descriptions.
        let json = document_json().replace("\\n", " ");
        let kib = |bytes: usize| format!("{} KiB", bytes / 1024);
        for text in [
            format!(
                "more than {} or more than {MAX_HEADERS} header fields",
                kib(MAX_HEADER_BYTES)
            ),
            format!("larger than {}", kib(MAX_BODY_BYTES)),
            format!("within {} s of the head", BODY_TIMEOUT.as_secs()),
        ] {
            assert!(json.contains(&text), "the document says {text}");
        }
    }

    #[test]
    fn test_get_openapi_json_serves_the_document() {
        run(async {
            let (status, body) = call_on(&new_instance(), "GET", "/openapi.json", "").await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, serde_json::to_value(document()).unwrap());
        });
    }
}
