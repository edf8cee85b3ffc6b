//! The API socket's client side for the integration tests: a
//! `metronome --api-sock` child and a real HTTP client (`curl
//! --unix-socket`). Every answer is checked against the OpenAPI document
//! ([`super::openapi_check`]) as it arrives.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::openapi_check::{check, Exchange};
use super::{metronome, scratch};

/// A `metronome --api-sock` child; SIGTERM and reaped when dropped.
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
}

impl Server {
    /// Serves on a fresh socket with `extra` options (quiet, console to /dev/null).
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with(extra, &[])
    }

    /// [`Server::start`] with environment variables `envs` for the child.
    pub fn start_with(extra: &[&str], envs: &[(&str, &str)]) -> Self {
        let socket = scratch("api.sock");
        let child = metronome()
            .arg("--api-sock")
            .arg(&socket)
            .args(["--quiet", "--console", "/dev/null"])
            .args(extra)
            .envs(envs.iter().copied())
            .spawn()
            .expect("spawn metronome --api-sock");
        let start = Instant::now();
        while !socket.exists() {
            assert!(start.elapsed() < Duration::from_secs(20), "no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, socket }
    }

    /// `METHOD path [body]`: the status and the JSON body (null if empty).
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        call(&self.socket, method, path, body)
    }

    /// `GET /`'s state.
    pub fn state(&self) -> String {
        let (status, info) = self.call("GET", "/", None);
        assert_eq!(status, 200);
        info["state"].as_str().expect("state").to_owned()
    }

    /// `PUT /actions {"action_type": action}`.
    pub fn action(&self, action: &str) -> (u16, Value) {
        self.call(
            "PUT",
            "/actions",
            Some(&format!(r#"{{"action_type": "{action}"}}"#)),
        )
    }

    /// SIGTERM; the exit code.
    pub fn terminate(mut self) -> i32 {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let code = self.child.wait().expect("wait").code().expect("exited");
        assert!(!self.socket.exists(), "the socket file is removed at exit");
        code
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `METHOD path [body]` on `socket` with curl: the status, the
/// `Content-Type` and the body as text.
pub fn call_text(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String, String) {
    let mut curl = Command::new("curl");
    curl.args(["-s", "--max-time", "30", "--unix-socket"])
        .arg(socket)
        .args(["-X", method, "-w", "\n%{content_type}\n%{http_code}"]);
    if let Some(body) = body {
        curl.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ]);
    }
    let output = curl
        .arg(format!("http://localhost{path}"))
        .output()
        .expect("run curl");
    let text = String::from_utf8(output.stdout).expect("UTF-8 answer");
    let (rest, status) = text.rsplit_once('\n').expect("status line");
    let (body, content_type) = rest.rsplit_once('\n').expect("content type line");
    let status: u16 = status.parse().expect("status");
    // Status 000: curl could not connect; there is no answer to check.
    if status != 0 {
        check(Exchange {
            method: method.to_owned(),
            path: path.to_owned(),
            status,
            content_type: content_type.to_owned(),
            body: body.to_owned(),
        });
    }
    (status, content_type.to_owned(), body.to_owned())
}

/// `METHOD path [body]` on `socket`: the status and the JSON body (null if empty).
pub fn call(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let (status, _, body) = call_text(socket, method, path, body);
    let json = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{method} {path}: {e}: {body}"))
    };
    (status, json)
}

/// The `fault_message` of an error answer.
pub fn fault(answer: &(u16, Value)) -> &str {
    answer.1["fault_message"]
        .as_str()
        .unwrap_or_else(|| panic!("no fault_message in {answer:?}"))
}

/// An answer as bytes.
#[derive(Debug)]
pub struct Raw {
    /// The HTTP status.
    pub status: u16,
    /// The Content-Type header.
    pub content_type: String,
    /// The body.
    pub body: Vec<u8>,
}

impl Raw {
    /// The body as UTF-8 text.
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("a UTF-8 body")
    }
}

/// `GET path` on `server`, the answer as bytes (profiles, traces).
pub fn get_raw(server: &Server, path: &str) -> Raw {
    let out = scratch("answer");
    let output = Command::new("curl")
        .args(["-s", "--max-time", "120", "--unix-socket"])
        .arg(&server.socket)
        .arg("-o")
        .arg(&out)
        .args(["-w", "%{http_code}\n%{content_type}"])
        .arg(format!("http://localhost{path}"))
        .output()
        .expect("run curl");
    let text = String::from_utf8(output.stdout).expect("UTF-8 write-out");
    let (status, content_type) = text.split_once('\n').expect("status and content type");
    let body = std::fs::read(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    let status: u16 = status.parse().expect("status");
    check(Exchange {
        method: "GET".into(),
        path: path.to_owned(),
        status,
        content_type: content_type.to_owned(),
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    Raw {
        status,
        content_type: content_type.to_owned(),
        body,
    }
}
