//! The control socket: `state_dir/control.sock`, through which `status`, `list`
//! and `retry` talk to the running daemon.
//!
//! Protocol: the client sends one JSON object on one line and reads one JSON
//! object back. Every reply carries the daemon's version. The socket has mode
//! 0600 inside the 0700 state dir, and the daemon also checks that the peer runs
//! as the same user, because a socket's mode alone is not honoured everywhere.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::daemon::{self, RetryRequest, RetryResult, Shared};
use crate::status::StatusReport;
use crate::store::Record;

/// Largest request accepted, in bytes. Real requests are far smaller.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// Time a client gets to send its request, so that a slow client cannot hold a
/// connection open for long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    List,
    Retry(RetryRequest),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<Record>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryResult>,
}

impl Reply {
    fn new() -> Reply {
        Reply {
            version: env!("CARGO_PKG_VERSION").into(),
            error: None,
            status: None,
            items: None,
            retry: None,
        }
    }
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    daemon::socket_path(state_dir)
}

/// Binds the socket and serves it in a task. The caller holds the state dir
/// lock, so a socket file already there is left over from a crash.
pub fn serve(state_dir: &Path, shared: Arc<Shared>) -> Result<tokio::task::JoinHandle<()>, String> {
    let path = socket_path(state_dir);
    if path.exists() {
        std::fs::remove_file(&path).map_err(|err| {
            format!(
                "the old control socket {} cannot be removed: {err}",
                path.display()
            )
        })?;
    }
    let listener = UnixListener::bind(&path).map_err(|err| {
        format!(
            "the control socket {} cannot be created: {err}",
            path.display()
        )
    })?;
    crate::daemon::set_socket_mode(&path).map_err(|err| {
        format!(
            "setting the mode of the control socket {} failed: {err}",
            path.display()
        )
    })?;
    Ok(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    tokio::spawn(async move { handle(stream, shared).await });
                }
                Err(err) => {
                    tracing::warn!(error = %err, "accepting a control connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

pub fn remove_socket(state_dir: &Path) {
    let _ = std::fs::remove_file(socket_path(state_dir));
}

async fn handle(stream: UnixStream, shared: Arc<Shared>) {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == uid => {}
        Ok(cred) => {
            tracing::warn!(
                peer_uid = cred.uid(),
                "a control connection from another user was refused"
            );
            return;
        }
        Err(err) => {
            tracing::warn!(error = %err, "the peer of a control connection cannot be checked; refused");
            return;
        }
    }
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST_BYTES + 1));
    let mut line = String::new();
    let reply = match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => error_reply("the request was not received in time"),
        Ok(Err(err)) => error_reply(&format!("reading the request failed: {err}")),
        Ok(Ok(_)) if line.len() as u64 > MAX_REQUEST_BYTES => {
            error_reply("the request is too large")
        }
        Ok(Ok(_)) => match serde_json::from_str::<Request>(line.trim()) {
            Ok(request) => answer(&shared, request),
            Err(err) => error_reply(&format!("the request is not valid: {err}")),
        },
    };
    let mut bytes = serde_json::to_vec(&reply).unwrap_or_default();
    bytes.push(b'\n');
    let _ = tokio::time::timeout(Duration::from_secs(30), write.write_all(&bytes)).await;
    let _ = write.shutdown().await;
}

fn error_reply(message: &str) -> Reply {
    Reply {
        error: Some(message.to_string()),
        ..Reply::new()
    }
}

fn answer(shared: &Arc<Shared>, request: Request) -> Reply {
    match request {
        Request::Status => Reply {
            status: Some(daemon::status_report(shared)),
            ..Reply::new()
        },
        Request::List => Reply {
            items: Some(daemon::list_records(shared)),
            ..Reply::new()
        },
        Request::Retry(retry) => Reply {
            retry: Some(daemon::retry(shared, &retry)),
            ..Reply::new()
        },
    }
}

/// The failure of a client request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the daemon is not running (no control socket answers at {0})")]
    NotRunning(String),
    #[error("talking to the daemon through {path} failed: {message}")]
    Failed { path: String, message: String },
}

/// Sends one request to the daemon of `state_dir`.
pub async fn request(state_dir: &Path, request: &Request) -> Result<Reply, ClientError> {
    let path = socket_path(state_dir);
    let display = path.display().to_string();
    let fail = |message: String| ClientError::Failed {
        path: display.clone(),
        message,
    };
    let mut stream =
        match tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(&path)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(err))
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Err(ClientError::NotRunning(display));
            }
            Ok(Err(err)) => return Err(fail(err.to_string())),
            Err(_) => return Err(fail("connecting timed out".into())),
        };
    let mut bytes = serde_json::to_vec(request).map_err(|err| fail(err.to_string()))?;
    bytes.push(b'\n');
    stream
        .write_all(&bytes)
        .await
        .map_err(|err| fail(err.to_string()))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    match tokio::time::timeout(Duration::from_secs(30), reader.read_line(&mut line)).await {
        Ok(Ok(0)) => Err(fail(
            "the daemon closed the connection without a reply".into(),
        )),
        Ok(Ok(_)) => {
            let reply: Reply = serde_json::from_str(&line)
                .map_err(|err| fail(format!("the reply is not valid: {err}")))?;
            match &reply.error {
                Some(error) => Err(fail(error.clone())),
                None => Ok(reply),
            }
        }
        Ok(Err(err)) => Err(fail(err.to_string())),
        Err(_) => Err(fail("the daemon did not reply within 30 s".into())),
    }
}
