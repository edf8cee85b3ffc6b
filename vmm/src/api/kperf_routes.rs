//! The kperf routes, and the annotated operations on an action or timer id
//! and on the counts (the generic handlers they call are in [`super::kperf`]).

use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::Value;
use utoipa::IntoParams;

use super::errors::{ApiError, Fault};
use super::instance::Instance;
use super::kperf::{
    get_count, get_counters, get_limits, get_object, get_pet, get_sampling, put_count, put_object,
    put_pet, put_reset, put_sampling, Api, ApiPath, Count,
};
use super::openapi::{AnyRequest, BodyRefusals, KperfRefusals, StateRefusals};
use super::routes::ApiJson;
use crate::config::{ActionConfig, TimerConfig};

/// The kperf routes.
pub fn routes() -> Router<Arc<Instance>> {
    Router::new()
        .route("/kperf/actions/{id}", get(get_action).put(put_action))
        .route("/kperf/timers/{id}", get(get_timer).put(put_timer))
        .route(
            "/kperf/action-count",
            get(get_action_count).put(put_action_count),
        )
        .route(
            "/kperf/timer-count",
            get(get_timer_count).put(put_timer_count),
        )
        .route("/kperf/pet", get(get_pet).put(put_pet))
        .route("/kperf/sampling", get(get_sampling).put(put_sampling))
        .route("/kperf/reset", put(put_reset))
        .route("/kperf/limits", get(get_limits))
        .route("/kperf/counters", get(get_counters))
}

/// The `{id}` of `/kperf/actions/{id}` and `/kperf/timers/{id}`.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ObjectId {
    /// The action id (0 to action_count; 0 is the null action, read only)
    /// or the timer id (0 to timer_count - 1); not a number: 400.
    #[allow(dead_code)]
    id: u32,
}

/// `GET /kperf/actions/{id}`.
#[utoipa::path(
    get,
    path = "/kperf/actions/{id}",
    tag = "kperf",
    params(ObjectId),
    responses(
        (status = 200, description = "The action (id 0: the null action's defaults, CFG-A-2)", body = ActionConfig),
        (status = 404, description = "The id is beyond the action count (CFG-A-2)", body = Fault),
        StateRefusals,
        AnyRequest,
    )
)]
pub(crate) async fn get_action(instance: Api, id: ApiPath) -> Result<Json<ActionConfig>, ApiError> {
    get_object(instance, id).await
}

/// `PUT /kperf/actions/{id}`: the body is the `--kperf` file's action,
/// its `id` left out (or the path's).
#[utoipa::path(
    put,
    path = "/kperf/actions/{id}",
    tag = "kperf",
    params(ObjectId),
    request_body(content = ActionConfig, description = "The action; `id` may be left out: it is the path's"),
    responses(
        (status = 204, description = "Set; also while sampling (CFG-A-4)"),
        BodyRefusals,
        (status = 404, description = "The id is beyond the action count (CFG-A-2)", body = Fault),
        KperfRefusals,
        AnyRequest,
    )
)]
pub(crate) async fn put_action(
    instance: Api,
    id: ApiPath,
    body: ApiJson<Value>,
) -> Result<StatusCode, ApiError> {
    put_object::<ActionConfig>(instance, id, body).await
}

/// `GET /kperf/timers/{id}`.
#[utoipa::path(
    get,
    path = "/kperf/timers/{id}",
    tag = "kperf",
    params(ObjectId),
    responses(
        (status = 200, description = "The timer, its period in force (raised to the minimum, KT-MIN-1)", body = TimerConfig),
        (status = 404, description = "The id is beyond the timer count", body = Fault),
        StateRefusals,
        AnyRequest,
    )
)]
pub(crate) async fn get_timer(instance: Api, id: ApiPath) -> Result<Json<TimerConfig>, ApiError> {
    get_object(instance, id).await
}

/// `PUT /kperf/timers/{id}`.
#[utoipa::path(
    put,
    path = "/kperf/timers/{id}",
    tag = "kperf",
    params(ObjectId),
    request_body(content = TimerConfig, description = "The timer; `id` may be left out: it is the path's"),
    responses(
        (status = 204, description = "Set"),
        BodyRefusals,
        (status = 404, description = "The id is beyond the timer count", body = Fault),
        KperfRefusals,
        AnyRequest,
    )
)]
pub(crate) async fn put_timer(
    instance: Api,
    id: ApiPath,
    body: ApiJson<Value>,
) -> Result<StatusCode, ApiError> {
    put_object::<TimerConfig>(instance, id, body).await
}

/// `GET /kperf/action-count`.
#[utoipa::path(
    get,
    path = "/kperf/action-count",
    tag = "kperf",
    responses(
        (status = 200, description = "The action count", body = Count),
        StateRefusals,
        AnyRequest,
    )
)]
pub(crate) async fn get_action_count(instance: Api) -> Result<Json<Count>, ApiError> {
    get_count::<false>(instance).await
}

/// `PUT /kperf/action-count`.
#[utoipa::path(
    put,
    path = "/kperf/action-count",
    tag = "kperf",
    request_body = Count,
    responses(
        (status = 204, description = "Set: only growing, up to 32, also while sampling (CFG-A-1)"),
        BodyRefusals,
        KperfRefusals,
        AnyRequest,
    )
)]
pub(crate) async fn put_action_count(
    instance: Api,
    body: ApiJson<Count>,
) -> Result<StatusCode, ApiError> {
    put_count::<false>(instance, body).await
}

/// `GET /kperf/timer-count`.
#[utoipa::path(
    get,
    path = "/kperf/timer-count",
    tag = "kperf",
    responses(
        (status = 200, description = "The timer count", body = Count),
        StateRefusals,
        AnyRequest,
    )
)]
pub(crate) async fn get_timer_count(instance: Api) -> Result<Json<Count>, ApiError> {
    get_count::<true>(instance).await
}

/// `PUT /kperf/timer-count`.
#[utoipa::path(
    put,
    path = "/kperf/timer-count",
    tag = "kperf",
    request_body = Count,
    responses(
        (status = 204, description = "Set: 0 to 8 (CFG-T-1)"),
        BodyRefusals,
        KperfRefusals,
        AnyRequest,
    )
)]
pub(crate) async fn put_timer_count(
    instance: Api,
    body: ApiJson<Count>,
) -> Result<StatusCode, ApiError> {
    put_count::<true>(instance, body).await
}
