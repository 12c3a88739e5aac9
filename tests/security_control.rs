//! Security tests of the control socket, with the real daemon binary: the
//! socket and its folder have private modes, a peer of another uid gets no
//! reply, and idle, oversized or malformed requests do not stall the daemon.

mod common;

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::fault_server::FaultServer;
use common::{archive, run_args, sha256_hex, wait_until, Home, BIN};
use serde_json::Value;

/// Time a daemon gets to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Time for an archive to reach the server once nothing blocks it.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);

/// Maximum time `outboxd status` may take while the socket is under abuse. It
/// takes tens of milliseconds when idle, and the margin is for a loaded machine.
const PROMPT_STATUS: Duration = Duration::from_secs(3);

/// Time a test client waits for the daemon's reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections that are opened and never send anything.
const IDLE_CONNECTIONS: usize = 50;

/// Size of the oversized request, far beyond the daemon's limit of 64 KiB.
const OVERSIZED_REQUEST_BYTES: usize = 1024 * 1024;

/// Uid of `nobody`, another user than the daemon's (the tests run as root).
const OTHER_UID: u32 = 65534;

/// A daemon on a state dir that the test chooses, which need not exist yet.
/// `Daemon` cannot do this because it always passes the home's state dir.
struct SocketDaemon {
    home: Home,
    state_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

impl SocketDaemon {
    fn start(home: Home, state_dir: PathBuf, args: &[String]) -> SocketDaemon {
        let log_path = home.path.join("control-test.stderr");
        let stderr = File::create(&log_path).expect("creating the daemon log failed");
        let child = home
            .command("run")
            .arg("--outbox")
            .arg(&home.outbox)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--token-file")
            .arg(&home.token_file)
            .args(args)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawning outboxd run failed");
        let pid = Value::from(child.id());
        let daemon = SocketDaemon {
            home,
            state_dir,
            log_path,
            child: Some(child),
        };

        let ready = wait_until(READY_TIMEOUT, || {
            daemon.status_json().is_some_and(|status| {
                status["daemon"]["running"] == Value::Bool(true) && status["daemon"]["pid"] == pid
            })
        });
        assert!(ready, "the daemon did not become ready:\n{}", daemon.log());
        daemon
    }

    fn socket_path(&self) -> PathBuf {
        self.state_dir.join("control.sock")
    }

    fn status_output(&self) -> Output {
        self.home
            .command("status")
            .arg("--json")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()
            .expect("running outboxd status failed")
    }

    fn status_json(&self) -> Option<Value> {
        serde_json::from_slice(&self.status_output().stdout).ok()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for SocketDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.log());
        }
    }
}

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|err| panic!("{} cannot be read: {err}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Sends `request` as it is and returns the daemon's reply line, or the
/// reason there was none.
fn send_raw(socket: &Path, request: &[u8]) -> Result<String, String> {
    let mut stream = UnixStream::connect(socket).map_err(|err| format!("connect: {err}"))?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(|err| err.to_string())?;
    stream
        .write_all(request)
        .map_err(|err| format!("write: {err}"))?;
    read_reply(&stream)
}

fn read_reply(stream: &UnixStream) -> Result<String, String> {
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|err| format!("read: {err}"))?;
    if line.is_empty() {
        return Err("closed without a reply".into());
    }
    Ok(line)
}

/// Returns the `error` of a reply line, or panics with the line.
fn reply_error(reply: &str) -> String {
    let json: Value = serde_json::from_str(reply)
        .unwrap_or_else(|err| panic!("the reply is not JSON ({err}): {reply:?}"));
    json["error"]
        .as_str()
        .unwrap_or_else(|| panic!("the reply has no error: {reply:?}"))
        .to_string()
}

/// Writes a 1 MiB request line without a line break and returns the reply. A
/// second thread writes, because the daemon stops reading at its limit and the
/// write then blocks until the daemon closes the connection.
fn send_oversized(socket: &Path) -> Result<String, String> {
    let stream = UnixStream::connect(socket).map_err(|err| format!("connect: {err}"))?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(|err| err.to_string())?;
    let mut writer = stream.try_clone().map_err(|err| err.to_string())?;
    writer
        .set_write_timeout(Some(REPLY_TIMEOUT))
        .map_err(|err| err.to_string())?;
    let writing = thread::spawn(move || {
        let garbage = vec![b'x'; OVERSIZED_REQUEST_BYTES];
        // An error here (EPIPE, timeout) is expected once the daemon gives up.
        let _ = writer.write_all(&garbage);
    });
    let reply = read_reply(&stream);
    writing.join().expect("the writer thread panicked");
    reply
}

#[test]
fn socket_and_state_dir_are_private() {
    let server = FaultServer::start();
    let home = Home::new();
    let state_dir = home.path.join("fresh-state");
    let daemon = SocketDaemon::start(home, state_dir, &run_args(&server.url(), &[]));

    let socket = daemon.socket_path();
    let metadata = fs::symlink_metadata(&socket).expect("the control socket is missing");
    assert!(
        metadata.file_type().is_socket(),
        "control.sock is no socket"
    );
    assert_eq!(mode_of(&socket), 0o600, "mode of the control socket");
    assert_eq!(
        mode_of(&daemon.state_dir),
        0o700,
        "mode of the state dir that the daemon created"
    );
}

#[test]
fn abusive_clients_do_not_stall_daemon() {
    let server = FaultServer::start();
    let home = Home::new();
    let state_dir = home.state_dir.clone();
    let daemon = SocketDaemon::start(home, state_dir, &run_args(&server.url(), &[]));
    let socket = daemon.socket_path();

    let idle: Vec<UnixStream> = (0..IDLE_CONNECTIONS)
        .map(|index| {
            UnixStream::connect(&socket)
                .unwrap_or_else(|err| panic!("idle connection {index} failed: {err}"))
        })
        .collect();

    let oversized = send_oversized(&socket);
    match &oversized {
        Ok(reply) => {
            let error = reply_error(reply);
            assert!(error.contains("too large"), "oversized request: {error:?}");
        }
        // Closing the connection without a reply also rejects it.
        Err(reason) => assert!(
            reason.contains("closed") || reason.contains("reset"),
            "oversized request: {reason}"
        ),
    }
    let malformed: [(&str, &[u8]); 4] = [
        ("truncated JSON", b"{\"cmd\": \"status\"\n"),
        ("unknown command", b"{\"cmd\": \"shutdown\"}\n"),
        ("not JSON", b"status please\n"),
        ("not UTF-8", b"\xff\xfe\x00garbage\n"),
    ];
    for (case, request) in malformed {
        let reply = send_raw(&socket, request).unwrap_or_else(|err| panic!("{case}: {err}"));
        let error = reply_error(&reply);
        assert!(
            error.contains("not valid") || error.contains("failed"),
            "{case}: {error:?}"
        );
    }

    // The 50 idle connections are still open while status runs.
    let started = Instant::now();
    let output = daemon.status_output();
    let elapsed = started.elapsed();
    let status: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("outboxd status printed no JSON ({err}): {output:?}"));
    assert_eq!(status["daemon"]["running"], Value::Bool(true), "{status}");
    assert!(
        elapsed < PROMPT_STATUS,
        "outboxd status took {elapsed:?} with {} idle connections",
        idle.len()
    );

    // Uploads go on.
    let bytes = archive("after the abuse", 1024);
    daemon.home.drop_zip("after.zip", &bytes);
    assert!(
        wait_until(DELIVERY_TIMEOUT, || server.delivered(&sha256_hex(&bytes))
            == 1),
        "after.zip was not delivered:\n{}",
        server.summary()
    );
    drop(idle);
}

#[test]
fn other_uid_gets_no_status() {
    if !is_root() {
        eprintln!("skipped: running a client as another uid needs root");
        return;
    }
    let server = FaultServer::start();
    let home = Home::new();
    // The socket must be reachable for the other user, whom the modes would
    // otherwise stop before the daemon's own check. The state dir is in a
    // folder outside the home, because the home is private.
    let shared = tempfile::Builder::new()
        .prefix("outboxd-control-")
        .tempdir()
        .expect("creating a temporary folder failed");
    fs::set_permissions(shared.path(), fs::Permissions::from_mode(0o755))
        .expect("chmod of the temporary folder failed");
    let state_dir = shared.path().join("state");
    let daemon = SocketDaemon::start(home, state_dir.clone(), &run_args(&server.url(), &[]));
    fs::set_permissions(&state_dir, fs::Permissions::from_mode(0o755))
        .expect("chmod of the state dir failed");
    fs::set_permissions(daemon.socket_path(), fs::Permissions::from_mode(0o666))
        .expect("chmod of the socket failed");

    let output = Command::new(BIN)
        .args(["status", "--json", "--state-dir"])
        .arg(&state_dir)
        .env_clear()
        .env("HOME", "/nonexistent")
        .uid(OTHER_UID)
        .gid(OTHER_UID)
        .stdin(Stdio::null())
        .output()
        .expect("running outboxd status as another uid failed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "exit code of status as uid {OTHER_UID}; stdout {stdout:?}, stderr {stderr:?}"
    );
    assert!(
        !stdout.contains("\"pid\""),
        "the other uid got a status: {stdout}"
    );
    // The daemon closes the connection unread, which the client sees as a
    // close, a reset or a broken pipe, depending on timing.
    assert!(
        stderr.contains("talking to the daemon through") && stderr.contains("failed"),
        "status as uid {OTHER_UID}: {stderr:?}"
    );
    let rejected_lines = daemon
        .log()
        .lines()
        .filter(|line| line.contains("from another user") && line.contains("peer_uid=65534"))
        .count();
    assert_eq!(rejected_lines, 1, "log lines about the other uid");

    // The daemon's own user still gets its status.
    let status = daemon
        .status_json()
        .expect("outboxd status printed no JSON");
    assert_eq!(status["daemon"]["running"], Value::Bool(true), "{status}");
}
