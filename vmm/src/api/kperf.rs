//! The kperf endpoints (`/kperf/...`): actions, timers, counts, PET,
//! sampling on and off, reset, limits and counters, at any time, with the
//! spec's rules (CFG-*) and errors (EINVAL 400, EBUSY 409, ECANCELED 400).
//!
//! Before InstanceStart a request acts on an engine built from the pre-boot
//! kperf configuration, which it changes only if the request succeeds and
//! the whole configuration stays valid ([`Instance::pre_boot_kperf`]);
//! `PUT /kperf/sampling` then records whether sampling starts with the VM.
//! Afterwards it acts on the live engine under its lock: a change is made
//! on a copy that replaces the engine only if every step succeeded, so a
//! refused request changes nothing and the vCPUs see a change whole
//! (AMB-16). Every live request runs on the VMM thread
//! ([`super::instance::on_link`]); a sampling stop (off, reset) is
//! synchronous: the VMM thread begins it, its wait for the vCPUs runs on
//! the blocking pool, and the VMM thread finishes it.
//!
//! The bodies are the `--kperf` file's objects (README, "The --kperf
//! file"): an action or a timer without its `id`, which is the path's.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use kperf::{
    Kperf, KperfError, SamplingState, ACTION_MAX, KCALLSTACK_DEPTH_MAX, KCALLSTACK_DEPTH_MIN,
    KPTIMER_MAX, UCALLSTACK_DEPTH_MAX, UCALLSTACK_DEPTH_MIN,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::errors::{ApiError, Fault};
use super::instance::on_link;
use super::instance::Instance;
pub use super::kperf_routes::routes;
use super::openapi::{AnyRequest, BodyRefusals, KperfRefusals, StateRefusals};
use super::routes::ApiJson;
use crate::config::kperf::MAX_PERIOD_NS;
use crate::config::{ActionConfig, KperfConfig, KperfConfigError, PetConfig, TimerConfig};
use crate::summary::KperfLimits;
use crate::vm::{SamplingError, VmmLink};

/// `PUT`/`GET /kperf/action-count` and `/kperf/timer-count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Count {
    /// The number of actions (1..=count are ids) or timers (0..count).
    pub count: u32,
}

/// `PUT`/`GET /kperf/sampling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    /// Sampling is on (reads true only in state ON, CFG-S-2).
    pub on: bool,
}

/// `GET /kperf/counters`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Counters {
    /// `off`, `on` or `shutdown` (CFG-S-1).
    pub sampling: &'static str,
    /// Samples taken so far, all vCPUs.
    pub samples: u64,
    /// Timer fires the vCPUs answered (one per kptimer per expiry).
    pub timer_fires: u64,
    /// PET handler passes (`mycounter`, PET-C-1).
    pub pet_broadcasts: u64,
}

/// `GET /kperf/limits`: the ranges the kperf requests accept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Limits {
    /// The minimum periods (KT-MIN-2); shorter periods are raised to them.
    #[serde(flatten)]
    pub min_periods: KperfLimits,
    /// The longest period accepted (a Metronome rule).
    pub timer_max_period_ns: u64,
    /// The most actions (CFG-A-1).
    pub action_count_max: u32,
    /// The most timers (CFG-T-1).
    pub timer_count_max: u32,
    /// User call-stack depths, frames (CFG-A-3).
    pub user_stack_depth: [u32; 2],
    /// Kernel call-stack depths, frames (CFG-A-3).
    pub kernel_stack_depth: [u32; 2],
}

/// The ECANCELED answer: sampling cannot start without an action.
fn canceled() -> ApiError {
    ApiError::bad_request(
        "sampling cannot be turned on: no action is configured (action_count is 0); set \
         PUT /kperf/action-count first (ECANCELED, CFG-S-1)",
    )
}

/// The EBUSY answer for `what`.
fn busy(what: &str) -> ApiError {
    ApiError::conflict(format!(
        "{what} refused: kperf is busy: the timers are started while sampling is on; timer, \
         timer-count and PET changes need sampling off (PUT /kperf/sampling {{\"on\": false}}) \
         (EBUSY, CFG-T-1, CFG-T-2, CFG-T-3, PET-L-3)"
    ))
}

/// A kperf refusal of `what` as an answer; `inval` words an EINVAL.
fn kperf_error(what: &str, error: KperfError, inval: impl FnOnce() -> String) -> ApiError {
    match error {
        KperfError::Busy => busy(what),
        KperfError::Canceled => canceled(),
        KperfError::Inval => ApiError::bad_request(inval()),
        other => ApiError::internal(format!("{what} failed: {other}")),
    }
}

/// A rule of the kperf configuration broken by `what`: 404 for an action
/// or timer id beyond the counts, 409 for EBUSY, 400 otherwise.
fn config_error(what: &str, error: KperfConfigError) -> ApiError {
    match error {
        KperfConfigError::ActionId { id, .. } if id != 0 => ApiError::not_found(error.to_string()),
        KperfConfigError::TimerId { .. } => ApiError::not_found(error.to_string()),
        KperfConfigError::Engine(e) => kperf_error(what, e, || error.to_string()),
        _ => ApiError::bad_request(error.to_string()),
    }
}

/// A sampling operation's refusal.
fn sampling_error(what: &str, error: SamplingError) -> ApiError {
    match error {
        SamplingError::Kperf(e) => kperf_error(what, e, || format!("{what} refused: {e}")),
        SamplingError::NotRunning | SamplingError::Tier(_) => {
            ApiError::bad_request(format!("{what} refused: {error}"))
        }
        SamplingError::NotConfigured | SamplingError::PetThread(_) => {
            ApiError::internal(format!("{what} failed: {error}"))
        }
    }
}

/// Runs `f` on the kperf engine, wherever it is now ([`Instance::kperf_home`]):
/// live, on the VMM thread ([`on_link`]). With `keep`, what `f` leaves is
/// kept if it succeeds; live, `f` works on a copy that replaces the engine
/// then (AMB-16).
async fn engine<T: Send + 'static>(
    instance: &Instance,
    what: &str,
    keep: bool,
    f: impl FnOnce(&mut Kperf) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    match instance.kperf_home(what)? {
        None => instance.pre_boot_kperf(what, keep, |kperf, _| f(kperf)),
        Some(link) => {
            let owned = what.to_owned();
            on_link(&link, what, move |controller| {
                controller
                    .with_kperf(|live| {
                        let mut copy = live.clone();
                        let out = f(&mut copy)?;
                        if keep {
                            *live = copy;
                        }
                        Ok(out)
                    })
                    .map_err(|e| sampling_error(&owned, e))?
            })
            .await?
        }
    }
}

/// Stops sampling on the running VM behind `link`, synchronously (KT-SP-1),
/// and with `reset` resets kperf (CFG-R-1): the VMM thread begins the stop,
/// the wait for every vCPU's acknowledgement runs on the blocking pool (the
/// event loop runs on meanwhile), then the VMM thread finishes it.
async fn stop_sampling(link: &VmmLink, what: &'static str, reset: bool) -> Result<(), ApiError> {
    let (pending, controller) =
        on_link(link, what, |c| (c.sampling_stop_begin(), c.clone())).await?;
    let pending = pending.map_err(|e| sampling_error(what, e))?;
    if let Some(pending) = pending {
        tokio::task::spawn_blocking(move || controller.sampling_stop_wait(&pending))
            .await
            .map_err(|e| ApiError::internal(format!("{what} failed: {e}")))?;
    }
    on_link(link, what, move |c| c.sampling_stop_finish(pending, reset))
        .await?
        .map_err(|e| sampling_error(what, e))
}

/// The path's id: a number.
fn path_id(kind: &str, id: &str) -> Result<u32, ApiError> {
    id.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "{kind} id '{id}' is not a number: give the id in the path, as in /kperf/{kind}s/1"
        ))
    })
}

/// The body of `PUT /kperf/{kind}s/{id}`: the `--kperf` file's object with
/// the path's id (a body `id`, if given, must be the path's).
fn with_id<T: DeserializeOwned>(kind: &str, id: u32, body: Value) -> Result<T, ApiError> {
    let Value::Object(mut fields) = body else {
        return Err(ApiError::bad_request(format!(
            "invalid request body: expected a JSON object, the {kind}'s fields"
        )));
    };
    match fields.insert("id".into(), id.into()) {
        Some(given) if given != id => {
            return Err(ApiError::bad_request(format!(
                "the body's id {given} is not the path's {id}: leave it out or give the same"
            )))
        }
        _ => {}
    }
    serde_json::from_value(Value::Object(fields))
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

pub(super) type Api = State<Arc<Instance>>;

/// An object `/kperf/{kind}s/{id}` reads and sets: the `--kperf` file's
/// action or timer.
pub(super) trait PathObject: DeserializeOwned + Serialize + Send + 'static {
    /// `action` or `timer`.
    const KIND: &'static str;
    /// What `PUT` refuses before it looks at the engine.
    fn check(&self) -> Result<(), KperfConfigError> {
        Ok(())
    }
    /// Sets it in the engine.
    fn set(&self, kperf: &mut Kperf) -> Result<(), KperfConfigError>;
    /// Reads object `id` from the engine.
    fn read(kperf: &Kperf, id: u32) -> Result<Self, KperfConfigError>;
}

impl PathObject for ActionConfig {
    const KIND: &'static str = "action";

    /// A sampler that captures nothing here (th_dispatch; PMC without a
    /// host PMU, AMB-14) is refused, as in the `--kperf` file.
    fn check(&self) -> Result<(), KperfConfigError> {
        KperfConfig {
            actions: vec![self.clone()],
            ..KperfConfig::default()
        }
        .check_samplers(crate::pmu::probe())
    }

    fn set(&self, kperf: &mut Kperf) -> Result<(), KperfConfigError> {
        self.apply(kperf)
    }

    /// Id 0 reads the null action's defaults (CFG-A-2).
    fn read(kperf: &Kperf, id: u32) -> Result<Self, KperfConfigError> {
        let count = kperf.action_count();
        if id > count {
            return Err(KperfConfigError::ActionId { id, count });
        }
        Ok(Self::from_engine(kperf, id))
    }
}

impl PathObject for TimerConfig {
    const KIND: &'static str = "timer";

    fn set(&self, kperf: &mut Kperf) -> Result<(), KperfConfigError> {
        self.apply(kperf)
    }

    fn read(kperf: &Kperf, id: u32) -> Result<Self, KperfConfigError> {
        Self::from_engine(kperf, id).ok_or(KperfConfigError::TimerId {
            id,
            count: kperf.timer_count(),
        })
    }
}

/// The `{id}` of a path, as its text: a path that does not decode (a
/// percent-escape that is not UTF-8) is a 400 with a `fault_message`, not
/// axum's plain-text refusal (found by the `api_request` fuzz target).
#[derive(Debug)]
pub struct ApiPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ApiPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(Self(id)),
            Err(rejection) => Err(ApiError::bad_request(format!(
                "invalid path '{}': {}",
                parts.uri.path(),
                rejection.body_text()
            ))),
        }
    }
}

/// `GET /kperf/actions/{id}` and `/kperf/timers/{id}`.
pub(super) async fn get_object<T: PathObject>(
    State(instance): Api,
    ApiPath(id): ApiPath,
) -> Result<Json<T>, ApiError> {
    let what = format!("GET /kperf/{}s", T::KIND);
    let id = path_id(T::KIND, &id)?;
    let owned = what.clone();
    let object = engine(&instance, &what, false, move |kperf| {
        T::read(kperf, id).map_err(|e| config_error(&owned, e))
    })
    .await?;
    Ok(Json(object))
}

/// `PUT /kperf/actions/{id}` and `/kperf/timers/{id}`.
pub(super) async fn put_object<T: PathObject>(
    State(instance): Api,
    ApiPath(id): ApiPath,
    ApiJson(body): ApiJson<Value>,
) -> Result<StatusCode, ApiError> {
    let what = format!("PUT /kperf/{}s", T::KIND);
    let object: T = with_id(T::KIND, path_id(T::KIND, &id)?, body)?;
    object.check().map_err(|e| config_error(&what, e))?;
    let owned = what.clone();
    engine(&instance, &what, true, move |kperf| {
        object.set(kperf).map_err(|e| config_error(&owned, e))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /kperf/timer-count` (`TIMERS`) or `/kperf/action-count`.
pub(super) async fn get_count<const TIMERS: bool>(
    State(instance): Api,
) -> Result<Json<Count>, ApiError> {
    let count = engine(&instance, "GET /kperf/...-count", false, |kperf| {
        Ok(if TIMERS {
            kperf.timer_count()
        } else {
            kperf.action_count()
        })
    })
    .await?;
    Ok(Json(Count { count }))
}

/// `PUT /kperf/timer-count` (`TIMERS`: EBUSY while started, CFG-T-1) or
/// `/kperf/action-count` (only growing, also while sampling, CFG-A-1).
pub(super) async fn put_count<const TIMERS: bool>(
    State(instance): Api,
    ApiJson(Count { count }): ApiJson<Count>,
) -> Result<StatusCode, ApiError> {
    let what = if TIMERS {
        "PUT /kperf/timer-count"
    } else {
        "PUT /kperf/action-count"
    };
    engine(&instance, what, true, move |kperf| {
        let now = kperf.action_count();
        let set = if TIMERS {
            kperf.set_timer_count(count)
        } else {
            kperf.set_action_count(count)
        };
        set.map_err(|e| {
            kperf_error(what, e, || {
                if TIMERS {
                    KperfConfigError::TimerCount(count).to_string()
                } else {
                    format!(
                        "action count {count} refused: the count may only grow, up to \
                         {ACTION_MAX} (it is {now}) (CFG-A-1)"
                    )
                }
            })
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /kperf/pet`: the PET timer id as stored (999 when none was set,
/// CFG-T-3), lightweight PET and the idle rate.
#[utoipa::path(
    get,
    path = "/kperf/pet",
    tag = "kperf",
    responses(
        (status = 200, description = "The PET timer (999 when none was set, CFG-T-3) and its knobs", body = PetConfig),
        StateRefusals,
        AnyRequest,
    )
)]
pub(crate) async fn get_pet(State(instance): Api) -> Result<Json<PetConfig>, ApiError> {
    let pet = engine(&instance, "GET /kperf/pet", false, |kperf| {
        Ok(PetConfig {
            timer_id: kperf.pet_timer(),
            lightweight: kperf.lightweight_pet(),
            idle_rate: kperf.pet_idle_rate(),
        })
    })
    .await?;
    Ok(Json(pet))
}

/// `PUT /kperf/pet`.
#[utoipa::path(
    put,
    path = "/kperf/pet",
    tag = "kperf",
    request_body = PetConfig,
    responses(
        (status = 204, description = "Set"),
        BodyRefusals,
        (status = 404, description = "The PET timer is beyond the timer count", body = Fault),
        KperfRefusals,
        AnyRequest,
    )
)]
pub(crate) async fn put_pet(
    State(instance): Api,
    ApiJson(pet): ApiJson<PetConfig>,
) -> Result<StatusCode, ApiError> {
    let what = "PUT /kperf/pet";
    engine(&instance, what, true, move |kperf| {
        pet.apply(kperf).map_err(|e| config_error(what, e))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /kperf/sampling`.
#[utoipa::path(
    get,
    path = "/kperf/sampling",
    tag = "kperf",
    responses(
        (status = 200, description = "Whether sampling is on (before start: whether it starts with the VM)", body = Sampling),
        StateRefusals,
        AnyRequest,
    )
)]
pub(crate) async fn get_sampling(State(instance): Api) -> Result<Json<Sampling>, ApiError> {
    let what = "GET /kperf/sampling";
    let on = match instance.kperf_home(what)? {
        // Before start: whether sampling starts with the VM.
        None => instance.pre_boot_kperf(what, false, |_, at_boot| Ok(*at_boot))?,
        Some(_) => engine(&instance, what, false, |kperf| Ok(kperf.sampling())).await?,
    };
    Ok(Json(Sampling { on }))
}

/// `PUT /kperf/sampling`.
#[utoipa::path(
    put,
    path = "/kperf/sampling",
    tag = "kperf",
    request_body = Sampling,
    responses(
        (status = 204, description = "On, or off synchronously (no sample after the answer, KT-SP-1)"),
        BodyRefusals,
        KperfRefusals,
        AnyRequest,
    )
)]
pub(crate) async fn put_sampling(
    State(instance): Api,
    ApiJson(Sampling { on }): ApiJson<Sampling>,
) -> Result<StatusCode, ApiError> {
    let what = "PUT /kperf/sampling";
    match instance.kperf_home(what)? {
        None => instance.pre_boot_kperf(what, true, |kperf, at_boot| {
            if on && kperf.action_count() == 0 {
                return Err(canceled());
            }
            *at_boot = on;
            Ok(())
        })?,
        Some(link) if on => on_link(&link, what, |c| c.sampling_start())
            .await?
            .map_err(|e| sampling_error(what, e))?,
        Some(link) => stop_sampling(&link, what, false).await?,
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `PUT /kperf/reset` (any body is ignored): sampling off, every timer,
/// PET and action back to the defaults, the counts kept (CFG-R-1).
#[utoipa::path(
    put,
    path = "/kperf/reset",
    tag = "kperf",
    responses(
        (status = 204, description = "Reset: sampling off, every timer, PET and action back to the defaults, the counts kept (CFG-R-1)"),
        (status = 400, description = "The instance is starting or has exited", body = Fault),
        KperfRefusals,
        AnyRequest,
    )
)]
pub(crate) async fn put_reset(State(instance): Api) -> Result<StatusCode, ApiError> {
    let what = "PUT /kperf/reset";
    match instance.kperf_home(what)? {
        None => instance.pre_boot_kperf(what, true, |kperf, at_boot| {
            kperf.reset();
            *at_boot = false;
            Ok(())
        })?,
        Some(link) => stop_sampling(&link, what, true).await?,
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /kperf/limits`.
#[utoipa::path(
    get,
    path = "/kperf/limits",
    tag = "kperf",
    responses(
        (status = 200, description = "The ranges the kperf requests accept", body = Limits),
        AnyRequest,
    )
)]
pub(crate) async fn get_limits() -> Json<Limits> {
    Json(Limits {
        min_periods: Kperf::new().limits().into(),
        timer_max_period_ns: MAX_PERIOD_NS,
        action_count_max: ACTION_MAX,
        // Cannot truncate: 8.
        timer_count_max: KPTIMER_MAX as u32,
        user_stack_depth: [UCALLSTACK_DEPTH_MIN, UCALLSTACK_DEPTH_MAX],
        kernel_stack_depth: [KCALLSTACK_DEPTH_MIN, KCALLSTACK_DEPTH_MAX],
    })
}

/// `GET /kperf/counters`.
#[utoipa::path(
    get,
    path = "/kperf/counters",
    tag = "kperf",
    responses(
        (status = 200, description = "Sampling's state and counters (0 before start)", body = Counters),
        StateRefusals,
        AnyRequest,
    )
)]
pub(crate) async fn get_counters(State(instance): Api) -> Result<Json<Counters>, ApiError> {
    let what = "GET /kperf/counters";
    let (samples, timer_fires) = match instance.kperf_home(what)? {
        None => (0, 0),
        Some(link) => on_link(&link, what, |c| (c.samples_taken(), c.timer_fires())).await?,
    };
    let (state, pet_broadcasts) = engine(&instance, what, false, |kperf| {
        Ok((kperf.sampling_state(), kperf.pet_broadcasts()))
    })
    .await?;
    Ok(Json(Counters {
        sampling: match state {
            SamplingState::Off => "off",
            SamplingState::On => "on",
            SamplingState::Shutdown => "shutdown",
        },
        samples,
        timer_fires,
        pet_broadcasts,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::routes::tests::{call_on, new_instance, run};

    #[test]
    fn test_a_path_id_that_does_not_decode_is_a_fault() {
        run(async {
            let instance = new_instance();
            for method in ["GET", "PUT"] {
                let (status, body) =
                    call_on(&instance, method, "/kperf/timers/%96", "{\"period_ns\": 1}").await;
                assert_eq!(status, StatusCode::BAD_REQUEST);
                let message = body["fault_message"].as_str().unwrap();
                assert!(
                    message.starts_with("invalid path '/kperf/timers/%96': "),
                    "{message}"
                );
            }
        });
    }

    #[test]
    fn test_kperf_before_start_cfg_rules_and_statuses() {
        run(async {
            let instance = new_instance();
            let call = |method, path, body| call_on(&instance, method, path, body);
            // A fresh instance: no action, sampling cannot be turned on.
            let (status, body) = call("PUT", "/kperf/sampling", r#"{"on": true}"#).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert!(body["fault_message"]
                .as_str()
                .unwrap()
                .contains("ECANCELED, CFG-S-1"));
            let (_, body) = call("GET", "/kperf/sampling", "").await;
            assert_eq!(body["on"], false);
            for (path, body) in [
                ("/kperf/action-count", r#"{"count": 1}"#),
                ("/kperf/timer-count", r#"{"count": 1}"#),
                ("/kperf/actions/1", r#"{"samplers": ["th_info", "kstack"]}"#),
                ("/kperf/timers/0", r#"{"period_ns": 1000, "action_id": 1}"#),
                ("/kperf/sampling", r#"{"on": true}"#),
            ] {
                assert_eq!(
                    call("PUT", path, body).await.0,
                    StatusCode::NO_CONTENT,
                    "{path}"
                );
            }
            // The period as kperf holds it: raised to the minimum (KT-MIN-1).
            let (status, timer) = call("GET", "/kperf/timers/0", "").await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(timer["period_ns"], 20_000);
            let (_, action) = call("GET", "/kperf/actions/1", "").await;
            assert_eq!(action["samplers"], serde_json::json!(["th_info", "kstack"]));
            assert_eq!(call("GET", "/kperf/sampling", "").await.1["on"], true);
            let config = instance.config().sampling.unwrap();
            assert!(config.start_at_boot);
            assert_eq!(config.kperf.timers[0].period_ns, 20_000);

            let (status, body) = call("GET", "/kperf/actions/2", "").await;
            assert_eq!(status, StatusCode::NOT_FOUND);
            assert!(body["fault_message"].as_str().unwrap().contains("CFG-A-2"));
            let (status, _) = call(
                "PUT",
                "/kperf/timers/1",
                r#"{"period_ns": 1, "action_id": 1}"#,
            )
            .await;
            assert_eq!(status, StatusCode::NOT_FOUND);
            let (status, body) = call("PUT", "/kperf/action-count", r#"{"count": 0}"#).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert!(body["fault_message"]
                .as_str()
                .unwrap()
                .contains("may only grow"));
            let (status, body) = call(
                "PUT",
                "/kperf/actions/1",
                r#"{"samplers": ["th_info"], "user_stack_depth": 1}"#,
            )
            .await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(
                body["fault_message"],
                "action 1: user_stack_depth 1 is out of range: 2 to 256 frames (CFG-A-3)"
            );
            let (status, body) = call("POST", "/kperf/actions/1", "{}").await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(
                body["fault_message"],
                "method POST is not allowed on /kperf/actions/1: allowed GET, PUT"
            );
            assert_eq!(
                call("GET", "/kperf/reset", "").await.0,
                StatusCode::METHOD_NOT_ALLOWED
            );
            // Reset: sampling off, the timer and action back to the
            // defaults, the counts kept (CFG-R-1).
            assert_eq!(
                call("PUT", "/kperf/reset", "").await.0,
                StatusCode::NO_CONTENT
            );
            assert_eq!(call("GET", "/kperf/sampling", "").await.1["on"], false);
            assert_eq!(call("GET", "/kperf/timers/0", "").await.1["period_ns"], 0);
            assert_eq!(call("GET", "/kperf/action-count", "").await.1["count"], 1);
            let (_, counters) = call("GET", "/kperf/counters", "").await;
            assert_eq!(counters["sampling"], "off");
            assert_eq!(counters["samples"], 0);
            let (_, limits) = call("GET", "/kperf/limits", "").await;
            assert_eq!(limits["timer_min_period_ns"], 20_000);
            assert_eq!(limits["timer_count_max"], 8);
        });
    }

    #[test]
    fn test_kperf_errors_map_to_statuses() {
        let e = config_error("x", KperfConfigError::ActionId { id: 3, count: 2 });
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert!(e.fault_message.contains("(CFG-A-2)"), "{}", e.fault_message);
        let e = config_error("x", KperfConfigError::ActionId { id: 0, count: 2 });
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = config_error("x", KperfConfigError::TimerId { id: 1, count: 1 });
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        let e = config_error(
            "PUT /kperf/timers",
            KperfConfigError::Engine(KperfError::Busy),
        );
        assert_eq!(e.status, StatusCode::CONFLICT);
        assert!(e
            .fault_message
            .starts_with("PUT /kperf/timers refused: kperf is busy"));
        assert!(e.fault_message.contains("EBUSY"));
        let e = sampling_error("x", SamplingError::Kperf(KperfError::Canceled));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.fault_message.contains("ECANCELED, CFG-S-1"));
        let e = config_error("x", KperfConfigError::PetIdleRate);
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.fault_message.contains("AMB-13"));
    }

    #[test]
    fn test_bodies_are_the_kperf_file_objects_with_the_path_id() {
        let body = serde_json::json!({"samplers": ["th_info", "kstack"], "kernel_stack_depth": 8});
        let action: ActionConfig = with_id("action", 2, body).unwrap();
        assert_eq!(action.id, 2);
        assert_eq!(action.kernel_stack_depth, 8);
        assert_eq!(action.user_stack_depth, UCALLSTACK_DEPTH_MAX);
        let body = serde_json::json!({"id": 1, "period_ns": 1000, "action_id": 1});
        let e = with_id::<TimerConfig>("timer", 0, body).unwrap_err();
        assert!(e.fault_message.contains("is not the path's 0"));
        let body = serde_json::json!({"period_ns": 1000, "action": 1});
        let e = with_id::<TimerConfig>("timer", 0, body).unwrap_err();
        assert!(e.fault_message.contains("unknown field `action`"));
        let e = with_id::<TimerConfig>("timer", 0, serde_json::json!([1])).unwrap_err();
        assert!(e.fault_message.contains("expected a JSON object"));
        assert_eq!(
            path_id("timer", "x").unwrap_err().fault_message,
            "timer id 'x' is not a number: give the id in the path, as in /kperf/timers/1"
        );
        let e = serde_json::from_str::<Count>(r#"{"count": 1, "n": 2}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `n`"));
    }
}
