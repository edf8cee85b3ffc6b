//! The API's error answers, in Firecracker's shape: a status and
//! `{"fault_message": "..."}` saying what was wrong and what is allowed.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::ConfigError;

/// A refused request: the status and the message the client reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// 400, 404, 405, 408, 409, 413 or 500 (431 comes from the HTTP layer).
    pub status: StatusCode,
    /// What was wrong and what is allowed.
    pub fault_message: String,
}

/// The body of every error answer (Firecracker's shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"fault_message": "vcpu_count 65 is out of range: a VM has 1 to 64 vCPUs"}))]
pub struct Fault {
    /// What was wrong and what is allowed.
    pub fault_message: String,
}

impl ApiError {
    /// 400: the request is malformed, breaks a rule, or is not allowed in
    /// the instance's state.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            fault_message: message.into(),
        }
    }

    /// 404: no such thing (a kperf action or timer beyond the counts).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            fault_message: message.into(),
        }
    }

    /// 409: kperf is busy (EBUSY): the request conflicts with sampling.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::CONFLICT,
            fault_message: message.into(),
        }
    }

    /// 500: the host failed to do what was asked.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            fault_message: message.into(),
        }
    }

    /// 400 for a configuration rule the candidate configuration breaks, in
    /// the API's field names (the rules and their wording are the command
    /// line's, [`crate::VmConfig::validate`]).
    pub fn config(error: &ConfigError) -> Self {
        Self::bad_request(api_wording(&error.to_string()))
    }
}

/// The command line's option names in a [`ConfigError`] message, as the
/// API's fields.
const FIELD_NAMES: [(&str, &str); 5] = [
    ("--vcpus ", "vcpu_count "),
    ("--mem-mib ", "mem_size_mib "),
    ("--duration ", "duration_s "),
    ("--hz ", "hz "),
    ("clockintr_init: ", ""),
];

/// `message` with the command line's option names replaced by the API's.
fn api_wording(message: &str) -> String {
    FIELD_NAMES
        .iter()
        .fold(message.to_owned(), |text, (cli, api)| {
            text.replace(cli, api)
        })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(Fault {
            fault_message: self.fault_message,
        });
        (self.status, body).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_config_errors_name_the_api_fields() {
        let e = ApiError::config(&ConfigError::Vcpus(0));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(
            e.fault_message
                .starts_with("vcpu_count 0 is out of range: a VM has 1 to"),
            "{}",
            e.fault_message
        );
        let e = ApiError::config(&ConfigError::Memory(1));
        assert!(e
            .fault_message
            .starts_with("mem_size_mib 1 is out of range"));
        let e = ApiError::config(&ConfigError::Clock(clockintr::Error::Hz(0)));
        assert_eq!(
            e.fault_message,
            "invalid clock configuration: hz 0 is out of range: 1 to 1000000000 (CI-INIT-3)"
        );
    }
}
