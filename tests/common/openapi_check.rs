//! The check of every API answer the tests see against the committed
//! OpenAPI document (`resources/openapi.json`): the status must be
//! documented for the operation (or be the router's 404/405 for a path or
//! method the document does not list), the content type must be the
//! documented one, and a JSON body must validate against its schema (the
//! whole document is the schema root, so `#/components/...` resolves).

use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// One answer the tests saw.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub method: String,
    /// The request path, query string included.
    pub path: String,
    pub status: u16,
    /// The `Content-Type` header, empty when there is none.
    pub content_type: String,
    pub body: String,
}

/// The committed document.
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/resources/openapi.json");
        let text = std::fs::read_to_string(path).expect("resources/openapi.json");
        serde_json::from_str(&text).expect("resources/openapi.json is JSON")
    })
}

/// Every answer checked so far, in order.
pub fn checked() -> Vec<Exchange> {
    CHECKED.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

static CHECKED: Mutex<Vec<Exchange>> = Mutex::new(Vec::new());

/// Whether `path` is `template`'s, a `{...}` segment matching any one
/// non-empty segment.
fn template_matches(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| t == p || (t.starts_with('{') && !p.is_empty()))
}

/// The document's response object for `exchange`, with its location for
/// messages; panics if the document does not describe it.
fn documented_response(exchange: &Exchange) -> (String, &'static Value) {
    let doc = document();
    let path = exchange.path.split('?').next().unwrap_or_default();
    let method = exchange.method.to_lowercase();
    let item = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .find(|(template, _)| template_matches(template, path));
    let (location, response) = match item {
        None => {
            assert_eq!(exchange.status, 404, "an undocumented path: {exchange:?}");
            (
                "components.responses.UnknownPath".to_owned(),
                &doc["components"]["responses"]["UnknownPath"],
            )
        }
        Some((_, item)) if item.get(&method).is_none() => {
            assert_eq!(exchange.status, 405, "an undocumented method: {exchange:?}");
            (
                "components.responses.MethodNotAllowed".to_owned(),
                &doc["components"]["responses"]["MethodNotAllowed"],
            )
        }
        Some((template, item)) => {
            let status = exchange.status.to_string();
            let response = item[&method]["responses"].get(&status).unwrap_or_else(|| {
                panic!(
                    "{} {template} does not document status {status}: {exchange:?}",
                    exchange.method
                )
            });
            (format!("{} {template} {status}", exchange.method), response)
        }
    };
    // A reusable response: `{"$ref": "#/components/responses/X"}`.
    match response["$ref"].as_str() {
        Some(reference) => {
            let name = reference.rsplit('/').next().expect("a reference");
            (location, &doc["components"]["responses"][name])
        }
        None => (location, response),
    }
}

/// A validator of `schema` (a schema object of the document), with the
/// whole document as its root so that `#/components/...` references
/// resolve; cached by `key`.
fn validate(key: &str, schema: &Value, instance: &Value) -> Result<(), String> {
    static VALIDATORS: OnceLock<Mutex<HashMap<String, jsonschema::Validator>>> = OnceLock::new();
    let mut validators = VALIDATORS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let validator = validators.entry(key.to_owned()).or_insert_with(|| {
        let mut root = document().clone();
        let root_map = root.as_object_mut().expect("the document is an object");
        for (keyword, value) in schema.as_object().expect("a schema object") {
            root_map.insert(keyword.clone(), value.clone());
        }
        jsonschema::draft202012::new(&root).unwrap_or_else(|e| panic!("schema of {key}: {e}"))
    });
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Checks `exchange` against the document (panicking with what does not
/// match) and records it.
pub fn check(exchange: Exchange) {
    let (location, response) = documented_response(&exchange);
    match response.get("content").and_then(Value::as_object) {
        None => assert!(
            exchange.body.is_empty(),
            "{location} documents no body, and the answer has one: {exchange:?}"
        ),
        Some(content) => {
            let media = exchange
                .content_type
                .split(';')
                .next()
                .unwrap_or_default()
                .trim();
            // The documented key is the media type, or the whole content
            // type when its parameters matter (Prometheus's version).
            let schema = content
                .get(exchange.content_type.as_str())
                .or_else(|| content.get(media))
                .unwrap_or_else(|| {
                panic!(
                    "{location} documents the content types {:?}, the answer is '{media}': {exchange:?}",
                    content.keys().collect::<Vec<_>>()
                )
            });
            if media == "application/json" {
                let body: Value = serde_json::from_str(&exchange.body).unwrap_or_else(|e| {
                    panic!("{location}: the body is not JSON ({e}): {exchange:?}")
                });
                if let Err(errors) = validate(&location, &schema["schema"], &body) {
                    panic!(
                        "{location}: the body does not match its schema: {errors}\n{exchange:?}"
                    );
                }
            }
        }
    }
    CHECKED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(exchange);
}
