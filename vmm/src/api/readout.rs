//! What a run shows while it runs and after it exited: `GET /profile`,
//! `GET /trace` and `GET /summary`.
//!
//! While the guest runs each answer is a snapshot: the stack counts and
//! trace records are copied under their locks (each vCPU's lock only for
//! its copy, the trace's per chunk), nothing is drained, and the end of the
//! run still reports every sample. After the exit the answers are the run's
//! final ones, what the end-of-run files hold. The copying, symbolizing and
//! encoding run on the runtime's blocking pool, never on the API thread,
//! and at most [`MAX_RENDERS`] at a time (a trace of a million records
//! takes a few hundred megabytes while it is rendered); the trace is
//! streamed as it is written.

use std::convert::Infallible;
use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, Semaphore};
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{IntoParams, ToSchema};

use super::errors::ApiError;
use super::instance::{on_link, Instance, Readout};
use super::routes::on_pool;
use crate::profile::ProfileError;
use crate::sampling::export::{ProfileKind, ProfileStacks, RunRecords, TraceCopy};
use crate::Summary;

/// Profiles and traces rendered at once; later requests wait their turn.
pub const MAX_RENDERS: usize = 2;
static RENDERS: Semaphore = Semaphore::const_new(MAX_RENDERS);

/// Bytes of a streamed trace per chunk sent to the connection.
const TRACE_CHUNK: usize = 64 * 1024;

/// The summary fields that only the end of a run knows: null in a summary
/// of a running VM.
pub const END_ONLY_FIELDS: [&str; 5] = [
    "outcome",
    "message",
    "guest_exit_code",
    "exit_code",
    "host_wall_to_exit_ns",
];

type Api = State<Arc<Instance>>;

/// `GET /profile`'s query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ProfileQuery {
    /// Which profile: `oncpu` (the default) or `pet`.
    #[serde(default)]
    #[param(inline)]
    pub kind: ProfileKindParam,
    /// `folded` (the default), `svg` or `pprof`.
    #[serde(default)]
    #[param(inline)]
    pub format: ProfileFormat,
}

/// Which profile `GET /profile` answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProfileKindParam {
    /// The on-CPU timers' samples (`profile.*`).
    #[default]
    Oncpu,
    /// PET's thread samples (`pet.*`).
    Pet,
}

impl ProfileKindParam {
    fn kind(self) -> ProfileKind {
        match self {
            Self::Oncpu => ProfileKind::OnCpu,
            Self::Pet => ProfileKind::Pet,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Oncpu => "on-CPU",
            Self::Pet => "PET",
        }
    }
}

/// The format `GET /profile` answers in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProfileFormat {
    /// Folded stacks (`profile.folded`), `text/plain; charset=utf-8`.
    #[default]
    Folded,
    /// An SVG flame graph (`profile.svg`), `image/svg+xml`.
    Svg,
    /// A gzipped perftools profile (`profile.pb.gz`) for `go tool pprof`,
    /// `application/octet-stream`.
    Pprof,
}

impl ProfileFormat {
    /// The answer's content type.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Folded => "text/plain; charset=utf-8",
            Self::Svg => "image/svg+xml",
            Self::Pprof => "application/octet-stream",
        }
    }
}

/// A query string parsed into `T` (unknown parameters refused by `T`);
/// every error a 400 with a `fault_message`.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::bad_request(format!(
                "invalid query string '{}': {}",
                parts.uri.query().unwrap_or(""),
                rejection
                    .body_text()
                    .trim_start_matches("Failed to deserialize query string: ")
            ))),
        }
    }
}

/// `GET /summary`: the instance state and the summary's fields.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SummaryAnswer {
    /// `Not started`, `Running`, `Paused` or `Exited`.
    pub state: &'static str,
    /// Every field of the summary JSON (none before InstanceStart); while
    /// the VM runs the [`END_ONLY_FIELDS`] are null.
    #[serde(flatten)]
    pub summary: Map<String, Value>,
}

/// The OpenAPI schema: one of `{"state": "Not started"}`, the summary's
/// fields with `state` Running or Paused and the [`END_ONLY_FIELDS`] null,
/// or the summary's fields with `state` Exited.
impl utoipa::PartialSchema for SummaryAnswer {
    fn schema() -> RefOr<Schema> {
        let state = |states: &[&str], description: &str| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(states.iter().copied()))
                .description(Some(description))
        };
        let summary = || {
            let RefOr::T(Schema::Object(object)) = <Summary as utoipa::PartialSchema>::schema()
            else {
                unreachable!("Summary derives an object schema")
            };
            object
        };
        let not_started = ObjectBuilder::new()
            .property("state", state(&["Not started"], "Before InstanceStart"))
            .required("state")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .build();
        let mut running = summary();
        running.description = Some(
            "While the VM runs: the summary so far, the fields only the end knows null".into(),
        );
        for field in END_ONLY_FIELDS {
            running.properties.insert(
                field.into(),
                ObjectBuilder::new().schema_type(Type::Null).into(),
            );
        }
        running.properties.insert(
            "state".into(),
            state(&["Running", "Paused"], "The VM runs or is paused").into(),
        );
        running.required.push("state".into());
        let mut exited = summary();
        exited.description = Some("After exit: the run's summary".into());
        exited.properties.insert(
            "state".into(),
            state(&["Exited"], "The VM has exited").into(),
        );
        exited.required.push("state".into());
        OneOfBuilder::new()
            .item(not_started)
            .item(running)
            .item(exited)
            .description(Some(
                "The instance state and the summary JSON's fields (only `state` before \
                 InstanceStart; the end-only fields null while running)",
            ))
            .into()
    }
}

impl ToSchema for SummaryAnswer {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        <Summary as ToSchema>::schemas(schemas);
    }
}

fn sampling_not_configured(what: &str) -> ApiError {
    ApiError::bad_request(format!("{what} refused: the VM was built without sampling"))
}

/// The stacks of profile `kind`: a copy made on the VMM thread while the VM
/// runs, the final ones after; refused for PET when PET is not configured
/// (and took no samples).
async fn profile_stacks(
    readout: Readout,
    kind: ProfileKindParam,
) -> Result<ProfileStacks, ApiError> {
    let pet_refused = || {
        ApiError::bad_request(
            "kind=pet refused: PET is not configured (and took no samples); configure it with PUT /kperf/pet, switch sampling on, or ask for kind=oncpu",
        )
    };
    match readout {
        Readout::Running(link) => {
            on_link(&link, "GET /profile", move |controller| {
                if kind == ProfileKindParam::Pet && !controller.pet_available() {
                    return Err(pet_refused());
                }
                controller
                    .profile_snapshot(kind.kind())
                    .map_err(|_| sampling_not_configured("GET /profile"))
            })
            .await?
        }
        Readout::Exited { records: None, .. } => Err(sampling_not_configured("GET /profile")),
        Readout::Exited {
            records: Some(records),
            ..
        } => {
            let RunRecords {
                on_cpu,
                pet,
                pet_configured,
                ..
            } = &*records;
            match kind {
                ProfileKindParam::Oncpu => Ok(on_cpu.clone()),
                ProfileKindParam::Pet if *pet_configured || !pet.stacks.is_empty() => {
                    Ok(pet.clone())
                }
                ProfileKindParam::Pet => Err(pet_refused()),
            }
        }
    }
}

/// `stacks` in `format`, as the end-of-run files are written.
fn encode(
    stacks: &ProfileStacks,
    kind: ProfileKindParam,
    format: ProfileFormat,
) -> Result<Vec<u8>, ApiError> {
    let failed = |e: ProfileError| ApiError::internal(format!("cannot render the profile: {e}"));
    let profile = stacks.profile().map_err(failed)?;
    let mut out = Vec::new();
    match format {
        ProfileFormat::Folded => out = profile.folded().into_bytes(),
        ProfileFormat::Svg if profile.total_weight() == 0 => {
            return Err(ApiError::conflict(format!(
                "the {} profile has no samples, so there is no flame graph to draw: switch sampling on (PUT /kperf/sampling {{\"on\": true}}) and fetch it again once GET /kperf/counters shows samples; format=folded and format=pprof answer an empty profile",
                kind.name()
            )))
        }
        ProfileFormat::Svg => profile.write_svg(&mut out).map_err(failed)?,
        ProfileFormat::Pprof => profile.write_pprof(&mut out).map_err(failed)?,
    }
    Ok(out)
}

/// `GET /profile?kind=oncpu|pet&format=folded|svg|pprof`.
#[utoipa::path(
    get,
    path = "/profile",
    tag = "profiling",
    params(ProfileQuery),
    responses(
        (status = 200, description = "The profile: folded stacks, an SVG flame graph, or a gzipped perftools profile (go tool pprof), by `format`", content(
            (String = "text/plain; charset=utf-8"),
            (String = "image/svg+xml"),
            (Vec<u8> = "application/octet-stream"),
        )),
        (status = 400, description = "A bad query, kind=pet without PET, or the instance not started", body = super::errors::Fault, content_type = "application/json"),
        (status = 409, description = "format=svg of a profile with no samples", body = super::errors::Fault, content_type = "application/json"),
        (status = 500, description = "The host failed to render the profile", body = super::errors::Fault, content_type = "application/json"),
        super::openapi::AnyRequest,
    )
)]
pub async fn get_profile(
    State(instance): Api,
    ApiQuery(query): ApiQuery<ProfileQuery>,
) -> Result<Response, ApiError> {
    let readout = instance.readout("GET /profile")?;
    let _turn = RENDERS
        .acquire()
        .await
        .map_err(|e| ApiError::internal(format!("GET /profile failed: {e}")))?;
    let stacks = profile_stacks(readout, query.kind).await?;
    let bytes = on_pool("GET /profile", move || {
        encode(&stacks, query.kind, query.format)
    })
    .await?;
    Ok(([(CONTENT_TYPE, query.format.content_type())], bytes).into_response())
}

/// The trace to render: a copy, or the one the end of the run kept.
enum TraceSource {
    Copy(TraceCopy),
    Kept(Arc<RunRecords>),
}

impl TraceSource {
    fn trace(&self) -> &TraceCopy {
        match self {
            Self::Copy(trace) => trace,
            // Only made when the records hold a trace.
            Self::Kept(records) => records.trace.as_ref().expect("a kept trace"),
        }
    }
}

fn no_trace() -> ApiError {
    ApiError::not_found(
        "this run keeps no trace: start metronome with --trace FILE or --profile-dir DIR (with sampling options) to keep one; --trace-level chooses its events",
    )
}

/// The trace of `readout`: copied on the VMM thread while the VM runs.
async fn trace_source(readout: Readout) -> Result<TraceSource, ApiError> {
    match readout {
        Readout::Running(link) => {
            on_link(&link, "GET /trace", |controller| {
                controller
                    .trace_snapshot()
                    .map_err(|_| sampling_not_configured("GET /trace"))?
                    .map(TraceSource::Copy)
                    .ok_or_else(no_trace)
            })
            .await?
        }
        Readout::Exited {
            records: Some(records),
            ..
        } if records.trace.is_some() => Ok(TraceSource::Kept(records)),
        Readout::Exited { .. } => Err(no_trace()),
    }
}

/// Sends what is written to it down a channel, in chunks of
/// [`TRACE_CHUNK`]; fails once the receiver is gone (the client left).
struct ChannelWriter {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(TRACE_CHUNK),
        ));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::ErrorKind::BrokenPipe.into())
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= TRACE_CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// An answer body of the chunks a [`ChannelWriter`] sends.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}

/// `GET /trace`: Chrome trace-event JSON (`trace.json`), streamed.
#[utoipa::path(
    get,
    path = "/trace",
    tag = "profiling",
    responses(
        (status = 200, description = "The trace so far (while running) or the run's (after exit), Chrome trace-event JSON", body = Object, content_type = "application/json"),
        (status = 400, description = "The instance is not started", body = super::errors::Fault, content_type = "application/json"),
        (status = 404, description = "The run keeps no trace", body = super::errors::Fault, content_type = "application/json"),
        (status = 500, description = "The host failed to copy the trace", body = super::errors::Fault, content_type = "application/json"),
        super::openapi::AnyRequest,
    )
)]
pub async fn get_trace(State(instance): Api) -> Result<Response, ApiError> {
    let readout = instance.readout("GET /trace")?;
    let turn = RENDERS
        .acquire()
        .await
        .map_err(|e| ApiError::internal(format!("GET /trace failed: {e}")))?;
    let source = trace_source(readout).await?;
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        let mut out = ChannelWriter {
            tx,
            buf: Vec::with_capacity(TRACE_CHUNK),
        };
        // A client that left ends the rendering (BrokenPipe): nothing to report.
        if let Err(e) = source.trace().write_chrome(&mut out) {
            log::debug!("GET /trace ended early: {e}");
        }
    });
    Ok((
        [(CONTENT_TYPE, "application/json")],
        Body::new(ChannelBody(rx)),
    )
        .into_response())
}

/// The summary JSON of a running VM: `summary`'s fields with the
/// [`END_ONLY_FIELDS`] null.
pub fn running_fields(summary: &Summary) -> Map<String, Value> {
    let mut fields = match serde_json::to_value(summary) {
        Ok(Value::Object(fields)) => fields,
        _ => Map::new(),
    };
    for field in END_ONLY_FIELDS {
        fields.insert(field.into(), Value::Null);
    }
    fields
}

/// `GET /summary`: the summary so far while the VM runs, the run's after.
#[utoipa::path(
    get,
    path = "/summary",
    tag = "instance",
    responses(
        (status = 200, description = "The instance state and the summary JSON's fields (only `state` before InstanceStart; the end-only fields null while running)", body = SummaryAnswer, content_type = "application/json"),
        (status = 500, description = "The host failed to read the running VM", body = super::errors::Fault, content_type = "application/json"),
        super::openapi::AnyRequest,
    )
)]
pub async fn get_summary(State(instance): Api) -> Result<Json<SummaryAnswer>, ApiError> {
    let exited = |summary: &Summary| match serde_json::to_value(summary) {
        Ok(Value::Object(fields)) => fields,
        _ => Map::new(),
    };
    let mut state = instance.state_name();
    let summary = match instance.readout("GET /summary") {
        Err(_) => Map::new(),
        Ok(Readout::Exited { summary, .. }) => exited(&summary),
        Ok(Readout::Running(link)) => {
            match on_link(&link, "GET /summary", |c| c.live_summary()).await {
                Ok(summary) => {
                    on_pool("GET /summary", move || Ok(running_fields(&summary))).await?
                }
                // The VM is ending: the run's summary, once the end of the
                // run has written it.
                Err(_) => {
                    instance.exited().await;
                    state = instance.state_name();
                    instance.summary().as_ref().map(exited).unwrap_or_default()
                }
            }
        }
    };
    Ok(Json(SummaryAnswer { state, summary }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::routes::tests::{call_on, new_instance, run};
    use axum::http::StatusCode;

    fn stacks(counts: &[(u64, &str, u64)]) -> ProfileStacks {
        ProfileStacks {
            stacks: counts
                .iter()
                .map(|&(tid, name, n)| {
                    (
                        crate::sampling::buffer::StackSample {
                            tid,
                            thread_name: name.into(),
                            user_stack: vec![0x10],
                            ..Default::default()
                        },
                        n,
                    )
                })
                .collect(),
            period_ns: 1_000_000,
            kernel_image: Arc::from(metronome_resources::GUEST_KERNEL),
        }
    }

    #[test]
    fn test_formats_and_their_content_types() {
        let full = stacks(&[(2, "spinner/0", 3), (0, "", 1)]);
        let folded = encode(&full, ProfileKindParam::Oncpu, ProfileFormat::Folded).unwrap();
        assert_eq!(
            String::from_utf8(folded).unwrap(),
            "idle;0x10 1\nspinner/0;0x10 3\n"
        );
        let svg = encode(&full, ProfileKindParam::Oncpu, ProfileFormat::Svg).unwrap();
        assert!(String::from_utf8(svg).unwrap().contains("<svg"));
        let pprof = encode(&full, ProfileKindParam::Oncpu, ProfileFormat::Pprof).unwrap();
        assert_eq!(&pprof[..2], b"\x1f\x8b", "gzipped");
        // As the end-of-run file is written.
        let mut file = Vec::new();
        full.profile().unwrap().write_pprof(&mut file).unwrap();
        assert_eq!(pprof, file);
        assert_eq!(
            ProfileFormat::Folded.content_type(),
            "text/plain; charset=utf-8"
        );
        assert_eq!(ProfileFormat::Svg.content_type(), "image/svg+xml");
        assert_eq!(
            ProfileFormat::Pprof.content_type(),
            "application/octet-stream"
        );
    }

    #[test]
    fn test_an_empty_profile_is_valid_folded_and_pprof_but_no_svg() {
        let empty = stacks(&[]);
        let folded = encode(&empty, ProfileKindParam::Oncpu, ProfileFormat::Folded).unwrap();
        assert!(folded.is_empty());
        let pprof = encode(&empty, ProfileKindParam::Pet, ProfileFormat::Pprof).unwrap();
        assert_eq!(&pprof[..2], b"\x1f\x8b");
        let e = encode(&empty, ProfileKindParam::Pet, ProfileFormat::Svg).unwrap_err();
        assert_eq!(e.status, StatusCode::CONFLICT);
        assert!(
            e.fault_message.starts_with(
                "the PET profile has no samples, so there is no flame graph to draw: switch sampling on"
            ),
            "{}",
            e.fault_message
        );
    }

    #[test]
    fn test_the_profile_path_lists_every_content_type() {
        use utoipa::Path;
        let operation = serde_json::to_value(__path_get_profile::operation()).unwrap();
        let ok = &operation["responses"]["200"]["content"];
        for format in [
            ProfileFormat::Folded,
            ProfileFormat::Svg,
            ProfileFormat::Pprof,
        ] {
            assert!(ok.get(format.content_type()).is_some(), "{format:?}: {ok}");
        }
        for status in ["400", "409"] {
            assert!(operation["responses"].get(status).is_some(), "{status}");
        }
    }

    #[test]
    fn test_running_fields_null_the_end_only_ones() {
        let summary = Summary {
            outcome: "host_error".into(),
            guest_uptime_ns: 5,
            ..Default::default()
        };
        let fields = running_fields(&summary);
        for field in END_ONLY_FIELDS {
            assert_eq!(fields[field], Value::Null, "{field}");
        }
        assert_eq!(fields["guest_uptime_ns"], 5);
        let whole = serde_json::to_value(&summary).unwrap();
        let whole = whole.as_object().unwrap();
        assert_eq!(
            fields.keys().collect::<Vec<_>>(),
            whole.keys().collect::<Vec<_>>(),
            "the same shape"
        );
    }

    #[test]
    fn test_bad_queries_and_requests_before_start() {
        run(async {
            let instance = new_instance();
            let cases = [
                (
                    "/profile?kind=wall",
                    "invalid query string 'kind=wall': kind: unknown variant `wall`, expected `oncpu` or `pet`",
                ),
                (
                    "/profile?format=png",
                    "invalid query string 'format=png': format: unknown variant `png`, expected one of `folded`, `svg`, `pprof`",
                ),
                (
                    "/profile?seconds=30",
                    "invalid query string 'seconds=30': seconds: unknown field `seconds`, expected `kind` or `format`",
                ),
                (
                    "/profile?format=svg",
                    "GET /profile has nothing to show yet: the instance is Not started; send InstanceStart (PUT /actions) first",
                ),
                (
                    "/trace",
                    "GET /trace has nothing to show yet: the instance is Not started; send InstanceStart (PUT /actions) first",
                ),
            ];
            for (path, message) in cases {
                let (status, body) = call_on(&instance, "GET", path, "").await;
                assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
                assert_eq!(body["fault_message"], message, "{path}");
            }
            let (status, body) = call_on(&instance, "GET", "/summary", "").await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, serde_json::json!({"state": "Not started"}));
        });
    }
}
