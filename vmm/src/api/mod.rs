//! The API socket: HTTP/1.1 with JSON bodies over a Unix domain socket, in
//! the manner of Firecracker's, usable with `curl --unix-socket`.
//!
//! - [`server`]: the socket (mode 0600, refused if the path exists unless
//!   forced, removed at the end), the API thread with its current-thread
//!   tokio runtime, the connection loop and its bounds, SIGINT/SIGTERM.
//! - [`routes`]: the endpoints and the JSON body extractor.
//! - [`types`]: the request and answer bodies, and how a pre-boot request
//!   changes the [`crate::VmConfig`].
//! - [`kperf`]: the kperf endpoints, before and after InstanceStart;
//!   [`kperf_routes`]: their routes and the operations on an id or a count.
//! - [`metrics`]: `GET /metrics` (JSON or Prometheus text), the metrics
//!   sink and FlushMetrics, and the middleware counting every answer.
//! - [`config_file`]: `--config-file`, the pre-boot bodies in one file.
//! - [`readout`]: what a run shows while it runs and after: `GET /profile`,
//!   `GET /trace`, `GET /summary`.
//! - [`errors`]: `{"fault_message": "..."}` answers.
//! - [`stall`]: the write deadline that closes a connection whose client
//!   stopped reading.
//! - [`openapi`]: the OpenAPI document, generated from the handlers and
//!   types, served at `GET /openapi.json`; its list of paths is the API's.
//! - [`instance`]: the instance's life: its configuration, the VM on its
//!   VMM thread, the summary after it exited.
//!
//! The bounds, all per process: a request body of at most
//! [`MAX_BODY_BYTES`] read within [`BODY_TIMEOUT`]; request headers of at
//! most [`MAX_HEADER_BYTES`] and [`MAX_HEADERS`] fields, arriving within
//! [`HEADER_TIMEOUT`] (idle keep-alive connections are closed after it too);
//! an answer's writes waiting at most [`WRITE_TIMEOUT`] without progress
//! for a client that stopped reading (closed beyond it); at most [`MAX_CONNECTIONS`] connections served at once, later ones wait
//! in the listen backlog; at most [`readout::MAX_RENDERS`] profiles or
//! traces rendered at once, later ones wait their turn.

pub mod config_file;
pub mod errors;
pub mod instance;
pub mod kperf;
pub mod kperf_routes;
pub mod metrics;
pub mod openapi;
pub mod readout;
pub mod routes;
pub mod server;
pub mod stall;
pub mod types;

use std::time::Duration;

pub use config_file::{ConfigFile, ConfigFileError};
pub use errors::ApiError;
pub use instance::{Instance, OnVmEnd};
pub use server::{serve, serve_with, ApiServeError};

/// Largest request body accepted (413 beyond).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Time a request body has to arrive once its headers have (408 beyond).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head, request line included (431 beyond).
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Most header fields in a request (431 beyond).
pub const MAX_HEADERS: usize = 32;
/// Time a request head has to arrive; the connection is closed beyond it.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a write of an answer may wait for the client to read, without any
/// byte going out; the connection is closed beyond it.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;

/// The hidden, test-only variable that replaces [`HEADER_TIMEOUT`],
/// [`BODY_TIMEOUT`] and [`WRITE_TIMEOUT`] with its value in milliseconds (1 to 60000), so that
/// the integration tests of hostile clients need not wait 10 s each; it is
/// read once, and ignored when out of range.
pub const TEST_TIMEOUT_ENV: &str = "METRONOME_API_TEST_TIMEOUT_MS";

/// The test-only override of the timeouts ([`TEST_TIMEOUT_ENV`]).
fn test_timeout() -> Option<Duration> {
    static OVERRIDE: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *OVERRIDE.get_or_init(|| {
        let ms: u64 = std::env::var(TEST_TIMEOUT_ENV).ok()?.parse().ok()?;
        (1..=60_000)
            .contains(&ms)
            .then(|| Duration::from_millis(ms))
    })
}

/// The time a request head has to arrive: [`HEADER_TIMEOUT`], unless a
/// test set [`TEST_TIMEOUT_ENV`].
pub fn header_timeout() -> Duration {
    test_timeout().unwrap_or(HEADER_TIMEOUT)
}

/// The time a request body has to arrive: [`BODY_TIMEOUT`], unless a test
/// set [`TEST_TIMEOUT_ENV`].
pub fn body_timeout() -> Duration {
    test_timeout().unwrap_or(BODY_TIMEOUT)
}

/// The time a write may wait for the client without progress:
/// [`WRITE_TIMEOUT`], unless a test set [`TEST_TIMEOUT_ENV`].
pub fn write_timeout() -> Duration {
    test_timeout().unwrap_or(WRITE_TIMEOUT)
}
