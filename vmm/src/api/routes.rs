//! The endpoints: one handler per method and path, JSON bodies parsed by
//! [`ApiJson`] (bounded, every error a `fault_message`), 404 and 405
//! answered in the same shape.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{Method, StatusCode, Uri};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;

use super::errors::{ApiError, Fault};
use super::instance::{on_link, Instance};
use super::openapi::{self, AnyRequest, BodyRefusals, StateRefusals};
use super::types::{
    ActionType, BootSource, BootSourceInfo, ClockConfig, ClockintrInfo, InstanceAction,
    InstanceInfo, MachineConfig, PreBootSection,
};
use super::{body_timeout, MAX_BODY_BYTES};
use crate::vm::{ControlError, ResumeMode, VmController};

/// The API's router over `instance`: each route's handler is an operation
/// of the OpenAPI document ([`super::openapi::ApiDoc`]).
pub fn router(instance: Arc<Instance>) -> Router {
    Router::new()
        .route("/", get(get_instance))
        .route(
            MachineConfig::PATH,
            get(get_machine_config).put(put_machine_config),
        )
        .route(BootSource::PATH, get(get_boot_source).put(put_boot_source))
        .route(ClockConfig::PATH, get(get_clock).put(put_clock))
        .route("/actions", axum::routing::put(put_actions))
        .route("/summary", get(super::readout::get_summary))
        .route("/clockintr", get(get_clockintr))
        .route("/profile", get(super::readout::get_profile))
        .route("/trace", get(super::readout::get_trace))
        .route("/openapi.json", get(openapi::get_openapi))
        .merge(super::kperf::routes())
        .merge(super::metrics::routes())
        .fallback(unknown_path)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            instance.clone(),
            super::metrics::count_responses,
        ))
        .with_state(instance)
}

type Api = State<Arc<Instance>>;

async fn unknown_path(uri: Uri) -> ApiError {
    let paths: Vec<&str> = openapi::paths().collect();
    ApiError {
        status: StatusCode::NOT_FOUND,
        fault_message: format!(
            "no such path '{}': the paths are {}",
            uri.path(),
            paths.join(", ")
        ),
    }
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    let allowed = openapi::allowed_methods(uri.path()).unwrap_or_else(|| "none".into());
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        fault_message: format!(
            "method {method} is not allowed on {}: allowed {allowed}",
            uri.path()
        ),
    }
}

/// A JSON request body: at most [`MAX_BODY_BYTES`], read within
/// [`body_timeout`], parsed into `T` (unknown fields refused by `T`).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let timeout = body_timeout();
        let bytes = match tokio::time::timeout(timeout, Bytes::from_request(req, state)).await {
            Err(_) => {
                return Err(ApiError {
                    status: StatusCode::REQUEST_TIMEOUT,
                    fault_message: format!(
                        "the request body did not arrive within {} s",
                        timeout.as_secs_f64()
                    ),
                })
            }
            Ok(Err(rejection)) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    fault_message: format!(
                        "the request body is too large: at most {MAX_BODY_BYTES} bytes"
                    ),
                })
            }
            Ok(Err(rejection)) => {
                return Err(ApiError {
                    status: rejection.status(),
                    fault_message: format!(
                        "cannot read the request body: {}",
                        rejection.body_text()
                    ),
                })
            }
            Ok(Ok(bytes)) => bytes,
        };
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
    }
}

/// `GET /`.
#[utoipa::path(
    get,
    path = "/",
    tag = "instance",
    responses(
        (status = 200, description = "What the instance is", body = InstanceInfo),
        AnyRequest,
    )
)]
pub(crate) async fn get_instance(State(instance): Api) -> Json<InstanceInfo> {
    Json(InstanceInfo {
        id: format!("metronome-{}", std::process::id()),
        state: instance.state_name(),
        vmm_version: env!("CARGO_PKG_VERSION"),
        app_name: "metronome",
    })
}

/// `GET` of a pre-boot section: its values in the configuration.
async fn get_section<T: PreBootSection>(State(instance): Api) -> Json<T::Current> {
    Json(T::current(&instance.config()))
}

/// `PUT` of a pre-boot section: the configuration changed, if still valid.
async fn put_section<T: PreBootSection>(
    State(instance): Api,
    ApiJson(section): ApiJson<T>,
) -> Result<StatusCode, ApiError> {
    instance.configure(T::PATH, |config, defaults| section.apply(config, defaults))?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /machine-config`.
#[utoipa::path(
    get,
    path = "/machine-config",
    tag = "pre-boot",
    responses(
        (status = 200, description = "The machine configuration", body = MachineConfig),
        AnyRequest,
    )
)]
pub(crate) async fn get_machine_config(instance: Api) -> Json<MachineConfig> {
    get_section::<MachineConfig>(instance).await
}

/// `PUT /machine-config`.
#[utoipa::path(
    put,
    path = "/machine-config",
    tag = "pre-boot",
    request_body = MachineConfig,
    responses(
        (status = 204, description = "Changed; pre-boot only (400 after InstanceStart)"),
        BodyRefusals,
        AnyRequest,
    )
)]
pub(crate) async fn put_machine_config(
    instance: Api,
    body: ApiJson<MachineConfig>,
) -> Result<StatusCode, ApiError> {
    put_section(instance, body).await
}

/// `GET /boot-source`.
#[utoipa::path(
    get,
    path = "/boot-source",
    tag = "pre-boot",
    responses(
        (status = 200, description = "The boot source in force", body = BootSourceInfo),
        AnyRequest,
    )
)]
pub(crate) async fn get_boot_source(instance: Api) -> Json<BootSourceInfo> {
    get_section::<BootSource>(instance).await
}

/// `PUT /boot-source`.
#[utoipa::path(
    put,
    path = "/boot-source",
    tag = "pre-boot",
    request_body = BootSource,
    responses(
        (status = 204, description = "Changed; pre-boot only (400 after InstanceStart)"),
        BodyRefusals,
        AnyRequest,
    )
)]
pub(crate) async fn put_boot_source(
    instance: Api,
    body: ApiJson<BootSource>,
) -> Result<StatusCode, ApiError> {
    put_section(instance, body).await
}

/// `GET /clock`.
#[utoipa::path(
    get,
    path = "/clock",
    tag = "pre-boot",
    responses(
        (status = 200, description = "The clock configuration, every field", body = ClockConfig),
        AnyRequest,
    )
)]
pub(crate) async fn get_clock(instance: Api) -> Json<ClockConfig> {
    get_section::<ClockConfig>(instance).await
}

/// `PUT /clock`.
#[utoipa::path(
    put,
    path = "/clock",
    tag = "pre-boot",
    request_body = ClockConfig,
    responses(
        (status = 204, description = "Changed; pre-boot only (400 after InstanceStart)"),
        BodyRefusals,
        AnyRequest,
    )
)]
pub(crate) async fn put_clock(
    instance: Api,
    body: ApiJson<ClockConfig>,
) -> Result<StatusCode, ApiError> {
    put_section(instance, body).await
}

/// A control operation's refusal as a 400 naming `action`.
fn refused(action: &'static str) -> impl Fn(ControlError) -> ApiError {
    move |e| ApiError::bad_request(format!("{action} refused: {e}"))
}

/// Runs `work` on the blocking pool, off the API thread; `what` names the
/// request for the message if the pool fails it.
pub(super) async fn on_pool<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("{what} failed: {e}")))?
}

/// `PUT /actions`.
#[utoipa::path(
    put,
    path = "/actions",
    tag = "instance",
    request_body = InstanceAction,
    responses(
        (status = 204, description = "Done: InstanceStart once the VM runs, Pause and Resume once \
            every vCPU is parked or let run, SendExit once the VM has stopped and its summary is \
            ready"),
        BodyRefusals,
        (status = 500, description = "The host failed: the VMM thread or the VM could not be made", body = Fault),
        AnyRequest,
    )
)]
pub(crate) async fn put_actions(
    State(instance): Api,
    ApiJson(action): ApiJson<InstanceAction>,
) -> Result<StatusCode, ApiError> {
    match action.action_type {
        ActionType::InstanceStart => instance.start().await?,
        ActionType::Pause => {
            // The VMM thread asks the vCPUs to park; the wait for them runs
            // on the blocking pool, so its event loop runs on meanwhile.
            instance
                .on_vmm_then_wait("Pause", VmController::begin_pause, |c, begun| {
                    begun.map(|()| c.wait_paused())
                })
                .await?
                .map_err(refused("Pause"))?;
            instance.set_paused(true);
        }
        ActionType::Resume => {
            // Re-synchronised (CI-CPU-6): the guest re-runs clockintr_cpu_init
            // on every vCPU, so no missed hardclock runs; kptimer deadlines
            // that passed meanwhile fire once, then dead reckoning (KT-F-2)
            // puts every vCPU back on the cadence from now.
            instance
                .on_vmm("Resume", |c| c.resume(ResumeMode::Reinit))
                .await?
                .map_err(refused("Resume"))?;
            instance.set_paused(false);
        }
        ActionType::FlushMetrics => super::metrics::flush(&instance).await?,
        ActionType::SendExit => {
            let link = instance.link("SendExit")?;
            // Refused only when the VM is ending already: wait for its end too.
            let _ = on_link(&link, "SendExit", VmController::stop).await;
            instance.exited().await;
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /clockintr`.
#[utoipa::path(
    get,
    path = "/clockintr",
    tag = "instance",
    responses(
        (status = 200, description = "Every vCPU's clockintr statistics and pending events", body = ClockintrInfo),
        StateRefusals,
        AnyRequest,
    )
)]
pub(crate) async fn get_clockintr(State(instance): Api) -> Result<Json<ClockintrInfo>, ApiError> {
    let info = instance
        .on_vmm("GET /clockintr", |controller| {
            let (vcpus, total) = controller.clockintr_stats();
            ClockintrInfo {
                uptime_ns: controller.uptime_ns(),
                vcpus,
                total,
                clocks: controller.vcpu_clocks(),
                dump: controller.dump_clockintr(),
            }
        })
        .await?;
    Ok(Json(info))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::VmConfig;
    use axum::body::Body;
    use tower::ServiceExt;

    async fn call(method: &str, path: &str, body: &str) -> (StatusCode, serde_json::Value) {
        call_on(&new_instance(), method, path, body).await
    }

    /// An instance not started, on the default configuration.
    pub(crate) fn new_instance() -> Arc<Instance> {
        Instance::new(VmConfig::default(), Box::new(|_, _| {}))
    }

    /// `method path body` on `instance`'s router: the status and the JSON
    /// body (null if empty).
    pub(crate) async fn call_on(
        instance: &Arc<Instance>,
        method: &str,
        path: &str,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::from(body.to_owned()))
            .unwrap();
        let response = router(instance.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let json = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, json)
    }

    /// Runs `f` on a current-thread runtime, as the API thread does.
    pub(crate) fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn test_errors_have_the_firecracker_shape() {
        run(async {
            let (status, body) = call("GET", "/nope", "").await;
            assert_eq!(status, StatusCode::NOT_FOUND);
            assert!(body["fault_message"]
                .as_str()
                .unwrap()
                .contains("no such path '/nope'"));
            let (status, body) = call("POST", "/machine-config", "{}").await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(
                body["fault_message"],
                "method POST is not allowed on /machine-config: allowed GET, PUT"
            );
            let (status, body) = call("PUT", "/machine-config", "{").await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert!(body["fault_message"]
                .as_str()
                .unwrap()
                .starts_with("invalid request body: EOF"));
            let big = format!("{{\"x\": \"{}\"}}", "a".repeat(MAX_BODY_BYTES));
            let (status, body) = call("PUT", "/clock", &big).await;
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
            assert!(body["fault_message"]
                .as_str()
                .unwrap()
                .contains("at most 65536 bytes"));
        });
    }

    #[test]
    fn test_pre_boot_requests_before_start() {
        run(async {
            let (status, body) = call("GET", "/", "").await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body["state"], "Not started");
            assert_eq!(body["app_name"], "metronome");
            let (status, _) = call(
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 1, "mem_size_mib": 64}"#,
            )
            .await;
            assert_eq!(status, StatusCode::NO_CONTENT);
            let (status, body) = call("PUT", "/actions", r#"{"action_type": "Pause"}"#).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(
                body["fault_message"],
                "Pause needs a running instance (Running or Paused); the instance is Not started"
            );
            let (status, body) = call("GET", "/summary", "").await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body["state"], "Not started");
            let (status, _) = call("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#).await;
            assert_eq!(status, StatusCode::NO_CONTENT);
        });
    }
}
