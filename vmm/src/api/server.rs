//! The API server: the socket, the API thread, the connection loop.
//!
//! [`serve`] blocks SIGINT and SIGTERM (SIGTERM alone when SIGINT was
//! ignored on entry: [`crate::stop_signals::note_inherited`]) in the calling
//! thread before it spawns anything, so that every thread of the process
//! (the API thread, the VMM thread, the vCPUs) has them blocked, and the signal thread
//! ([`crate::stop_signals`], no signalfd) hands them to the API thread: a
//! signal ends the server, stops a running VM with that signal as its
//! outcome, joins the VMM thread, and the socket file is removed. The VM is
//! started with [`crate::SignalWatch::Caller`] so that it does not watch them.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{mpsc, Semaphore};

use super::{
    header_timeout, instance::Instance, routes, stall::WriteDeadline, write_timeout,
    MAX_CONNECTIONS, MAX_HEADERS, MAX_HEADER_BYTES,
};
use crate::seccomp::{self, ThreadKind};
use crate::stop_signals;

/// Why the API server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ApiServeError {
    /// The socket path exists and replacing it was not asked for.
    #[error("the API socket path '{0}' exists: remove it, or pass --api-sock-force to replace it")]
    SocketExists(PathBuf),
    /// The existing socket path could not be removed.
    #[error("cannot remove the existing API socket path '{path}'")]
    RemoveSocket {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The socket could not be created.
    #[error("cannot create the API socket '{path}'")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// SIGINT and SIGTERM could not be blocked and watched.
    #[error("cannot watch SIGINT and SIGTERM")]
    Signals(#[source] std::io::Error),
    /// The API thread or its runtime could not start, or it failed.
    #[error("the API thread failed")]
    Thread(#[source] std::io::Error),
    /// The VM booted at once (`--config-file`) could not be started.
    #[error("the VM could not be started: {}", .0.fault_message)]
    Boot(super::ApiError),
}

/// The socket file, removed when dropped.
#[derive(Debug)]
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Creates the socket at `path`, mode 0600 from the start.
fn bind(path: &Path, force: bool) -> Result<StdUnixListener, ApiServeError> {
    if std::fs::symlink_metadata(path).is_ok() {
        if !force {
            return Err(ApiServeError::SocketExists(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(|source| ApiServeError::RemoveSocket {
            path: path.to_owned(),
            source,
        })?;
    }
    // SAFETY: umask only swaps the process's file-mode mask; no pointers.
    // The mask makes bind create the socket 0600, with no window in which
    // another user could connect; it is restored right after.
    let old = unsafe { libc::umask(0o177) };
    let bound = StdUnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let bind_error = |source| ApiServeError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = bound.map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    Ok(listener)
}

/// Serves the API on a socket at `path` for `instance` until SIGINT or
/// SIGTERM (SIGTERM alone when SIGINT was ignored on entry), then stops a
/// running VM, joins the VMM thread, removes the socket and returns the
/// signal's number.
///
/// Call it before the process spawns threads (it blocks the stop signals
/// for every thread spawned afterwards, and changes the umask briefly).
///
/// # Errors
///
/// The socket path exists without `force`, or the socket, the signal
/// thread, the API thread or its runtime cannot be made.
pub fn serve(path: &Path, force: bool, instance: Arc<Instance>) -> Result<i32, ApiServeError> {
    serve_with(path, force, instance, false)
}

/// [`serve`]; with `boot`, the instance is started (InstanceStart) once the
/// socket exists and before the first connection is served
/// (`--config-file` with `--api-sock`).
///
/// # Errors
///
/// As [`serve`], and [`ApiServeError::Boot`] when the VM cannot start.
pub fn serve_with(
    path: &Path,
    force: bool,
    instance: Arc<Instance>,
    boot: bool,
) -> Result<i32, ApiServeError> {
    let (signal_tx, signals) = mpsc::unbounded_channel();
    let _watch = stop_signals::watch(move |signo| {
        // The API thread has gone only when the server ends.
        let _ = signal_tx.send(signo);
    })
    .map_err(ApiServeError::Signals)?;
    let listener = bind(path, force)?;
    let _socket = SocketFile(path.to_owned());
    // Spawned before the API thread is filtered, so that the VMM thread
    // does not inherit the API's filter (crate::seccomp).
    instance
        .prepare_vmm_thread()
        .map_err(ApiServeError::Thread)?;
    let thread = std::thread::Builder::new()
        .name("metronome-api".into())
        .spawn(move || -> Result<i32, ApiServeError> {
            seccomp::install(ThreadKind::Api)
                .map_err(|e| ApiServeError::Thread(std::io::Error::other(e.chain())))?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                // The blocking pool runs under the API's filter, inherited.
                .on_thread_start(seccomp::label_current_thread)
                .build()
                .map_err(ApiServeError::Thread)?;
            let served = match boot.then(|| runtime.block_on(instance.start())) {
                Some(Err(e)) => Err(ApiServeError::Boot(e)),
                _ => runtime
                    .block_on(accept_loop(listener, signals, instance.clone()))
                    .map_err(ApiServeError::Thread),
            };
            // A VM still running ends with the signal (or, if the server
            // failed, as stopped); the VMM thread reports and is joined.
            instance.shut_down(*served.as_ref().unwrap_or(&libc::SIGTERM));
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            served
        })
        .map_err(ApiServeError::Thread)?;
    // This thread now only waits for the API thread and removes the socket.
    seccomp::install(ThreadKind::Main)
        .map_err(|e| ApiServeError::Thread(std::io::Error::other(e.chain())))?;
    match thread.join() {
        Ok(result) => result,
        Err(_) => Err(ApiServeError::Thread(std::io::Error::other(
            "the API thread panicked",
        ))),
    }
}

/// The next SIGINT or SIGTERM.
async fn next_signal(signals: &mut mpsc::UnboundedReceiver<i32>) -> std::io::Result<i32> {
    signals
        .recv()
        .await
        .ok_or_else(|| std::io::Error::other("the signal watch ended"))
}

/// hyper's HTTP/1.1 server with the API's bounds on a request head (its
/// size, its fields, the time it has to arrive).
pub fn http1_builder() -> http1::Builder {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout())
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    http
}

/// Accepts connections (at most [`MAX_CONNECTIONS`] at once) and serves
/// each on its own task until a signal arrives.
async fn accept_loop(
    listener: StdUnixListener,
    mut signals: mpsc::UnboundedReceiver<i32>,
    instance: Arc<Instance>,
) -> std::io::Result<i32> {
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let router = routes::router(instance);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let http = http1_builder();
    loop {
        let slot = tokio::select! {
            signo = next_signal(&mut signals) => return signo,
            slot = slots.clone().acquire_owned() => slot,
        };
        // Cannot panic: the semaphore is never closed.
        let slot = slot.expect("the connection semaphore is open");
        let stream = tokio::select! {
            signo = next_signal(&mut signals) => return signo,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of fds, say: the client's problem is its own; pause
                    // briefly so that the loop does not spin.
                    log::warn!("API socket: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let connection = http.serve_connection(
            TokioIo::new(WriteDeadline::new(stream, write_timeout())),
            TowerToHyperService::new(router.clone()),
        );
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                log::debug!("API connection: {e}");
            }
            drop(slot);
        });
    }
}
