//! The daemon as a systemd service: the notify protocol (READY, WATCHDOG,
//! RELOADING, STOPPING), reloads on SIGHUP, shutdown on SIGTERM, and the files
//! in packaging/.
//!
//! Each test runs the real `outboxd` binary in its own temporary folder. A test
//! plays the service manager by binding the datagram socket that
//! `NOTIFY_SOCKET` names, and the upload server is an axum app on 127.0.0.1
//! that the test starts itself.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

const BINARY: &str = env!("CARGO_BIN_EXE_outboxd");
const UNIT_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/packaging/systemd/outboxd.service"
);
const EXAMPLE_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/config.example.toml");
const INSTALL_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/install.sh");

/// The token that the test server accepts.
const GOOD_TOKEN: &str = "good-token-1";

/// Upper bound for anything the daemon should do promptly. Generous, because
/// other builds may share the machine's cores.
const PROMPT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Upload server

/// An upload endpoint on 127.0.0.1 that accepts `Bearer GOOD_TOKEN`, returns
/// 401 for any other token, and delays each accepted request by a fixed time
/// before it returns 200.
struct UploadServer {
    url: String,
    /// Requests whose body arrived completely.
    received: Arc<AtomicUsize>,
    /// Requests that got a 200 response.
    accepted: Arc<AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

impl UploadServer {
    fn start(delay: Duration) -> UploadServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let address = listener.local_addr().unwrap();

        let handler = {
            let (received, accepted) = (received.clone(), accepted.clone());
            move |headers: HeaderMap, _body: axum::body::Bytes| {
                let (received, accepted) = (received.clone(), accepted.clone());
                async move {
                    received.fetch_add(1, Ordering::SeqCst);
                    let authorization = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    if authorization != format!("Bearer {GOOD_TOKEN}") {
                        return StatusCode::UNAUTHORIZED;
                    }
                    tokio::time::sleep(delay).await;
                    // A client that disconnects drops this future before here.
                    accepted.fetch_add(1, Ordering::SeqCst);
                    StatusCode::OK
                }
            }
        };
        let app = axum::Router::new().route("/upload", axum::routing::post(handler));
        runtime.spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        UploadServer {
            url: format!("http://{address}/upload"),
            received,
            accepted,
            _runtime: runtime,
        }
    }

    fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------
// Service manager side of the notify protocol

/// A datagram socket in the role of systemd's notification socket. A thread
/// reads it, so that the daemon never blocks on a full socket buffer.
struct NotifySocket {
    path: PathBuf,
    incoming: mpsc::Receiver<String>,
    /// Every message received so far, in order.
    messages: Vec<String>,
    stop: Arc<AtomicBool>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let (sender, incoming) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_reader = stop.clone();
        thread::spawn(move || {
            let mut buffer = vec![0u8; 65536];
            while !stop_reader.load(Ordering::SeqCst) {
                if let Ok(len) = socket.recv(&mut buffer) {
                    let message = String::from_utf8_lossy(&buffer[..len]).into_owned();
                    if sender.send(message).is_err() {
                        return;
                    }
                }
            }
        });
        NotifySocket {
            path,
            incoming,
            messages: Vec::new(),
            stop,
        }
    }

    /// Waits for a message, after index `after` (or from the start), that has
    /// the line `line`, and returns its index in `messages`.
    fn wait_for(&mut self, line: &str, after: Option<usize>, timeout: Duration) -> usize {
        let first = after.map_or(0, |index| index + 1);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(offset) = self
                .messages
                .iter()
                .skip(first)
                .position(|m| has_line(m, line))
            {
                return first + offset;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {line} within {timeout:?}; messages: {:?}",
                self.messages
            );
            if let Ok(message) = self
                .incoming
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                self.messages.push(message);
            }
        }
    }

    /// Collects messages for `duration`.
    fn collect_for(&mut self, duration: Duration) {
        let deadline = Instant::now() + duration;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Ok(message) = self.incoming.recv_timeout(left) {
                self.messages.push(message);
            }
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn has_line(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

fn value_of<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

fn monotonic_usec_now() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for clock_gettime to fill in.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    assert_eq!(status, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000
}

// ---------------------------------------------------------------------------
// The daemon's folders and process

/// A temporary folder with the daemon's outbox, state dir, config file and
/// systemd credentials folder.
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Home {
        let home = Home {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(home.outbox()).unwrap();
        std::fs::create_dir_all(home.credentials()).unwrap();
        home
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn outbox(&self) -> PathBuf {
        self.path().join("outbox")
    }

    fn state_dir(&self) -> PathBuf {
        self.path().join("state")
    }

    fn config(&self) -> PathBuf {
        self.path().join("config.toml")
    }

    fn credentials(&self) -> PathBuf {
        self.path().join("credentials")
    }

    /// Writes a valid config. `extra` contains more `key = value` lines.
    fn write_config(&self, server: &UploadServer, extra: &str) {
        let text = format!(
            "outbox = {:?}\nstate_dir = {:?}\nserver_url = {:?}\nsettle_ms = 100\nauth_probe_ms = 600000\n{extra}",
            self.outbox(),
            self.state_dir(),
            server.url
        );
        self.replace_config(&text);
    }

    /// Replaces the config file in one rename, so that the daemon's file
    /// watcher never reads it half written.
    fn replace_config(&self, text: &str) {
        let temporary = self.path().join(".config.toml.tmp");
        std::fs::write(&temporary, text).unwrap();
        std::fs::rename(&temporary, self.config()).unwrap();
    }

    /// Writes the token as systemd's `LoadCredential=` would.
    fn write_credential(&self, token: &str) {
        let path = self.credentials().join("outboxd-token");
        let temporary = self.credentials().join(".outboxd-token.tmp");
        std::fs::write(&temporary, format!("{token}\n")).unwrap();
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&temporary, path).unwrap();
    }

    /// Drops a zip archive into the outbox under a temporary name, then renames
    /// it, as producers do.
    fn drop_archive(&self, name: &str) {
        let bytes = outboxd::zipfile::stored_archive("session.txt", name.as_bytes());
        let temporary = self.outbox().join(format!(".{name}.part"));
        std::fs::write(&temporary, bytes).unwrap();
        std::fs::rename(&temporary, self.outbox().join(name)).unwrap();
    }

    fn in_outbox(&self, name: &str) -> bool {
        self.outbox().join(name).exists()
    }

    /// Returns an `outboxd` command whose environment has nothing from the
    /// caller's: no systemd variables, no OUTBOXD_* settings, no real home.
    fn command(&self) -> Command {
        let mut command = Command::new(BINARY);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.path())
            .env("XDG_CONFIG_HOME", self.path().join("xdg-config"))
            .env("XDG_DATA_HOME", self.path().join("xdg-data"))
            .env("XDG_STATE_HOME", self.path().join("xdg-state"))
            .env("RUST_LOG", "info");
        command
    }

    /// Runs `outboxd status --json` against the state dir and returns its exit
    /// code and document.
    fn status(&self) -> (i32, Value) {
        let output = self
            .command()
            .args(["status", "--json", "--state-dir"])
            .arg(self.state_dir())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let document = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|err| panic!("status --json printed no JSON ({err}): {output:?}"));
        (output.status.code().unwrap_or(-1), document)
    }

    /// Runs `outboxd list --json` against the state dir.
    fn list(&self) -> Vec<Value> {
        let output = self
            .command()
            .args(["list", "--json", "--state-dir"])
            .arg(self.state_dir())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(output.status.success(), "list --json failed: {output:?}");
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

/// A running `outboxd run`. Dropping it kills the process if it still runs.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts the daemon on the home's config, with the token in the home's
    /// credentials folder, and with `NOTIFY_SOCKET` and `WATCHDOG_USEC` when
    /// `notify` is given.
    fn start(home: &Home, notify: Option<&NotifySocket>) -> Daemon {
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let log = home.path().join(format!(
            "daemon-{}.log",
            STARTS.fetch_add(1, Ordering::SeqCst)
        ));
        let mut command = home.command();
        command
            .arg("run")
            .arg("--config")
            .arg(home.config())
            .env("CREDENTIALS_DIRECTORY", home.credentials())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(socket) = notify {
            command
                .env("NOTIFY_SOCKET", &socket.path)
                .env("WATCHDOG_USEC", "200000");
        }
        Daemon {
            child: command.spawn().unwrap(),
            log,
        }
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child,
        // which is not reaped before `wait_for_exit`.
        let status = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(status, 0, "kill({}, {signal}) failed", self.child.id());
    }

    fn wait_for_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit within {timeout:?}; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `text`.
    fn wait_for_log(&self, text: &str, timeout: Duration) {
        self.wait_for_log_after("", text, timeout);
    }

    /// Waits until the log contains `text` after the first `marker`, and
    /// returns the log from `marker` on.
    fn wait_for_log_after(&self, marker: &str, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if let Some(start) = log.find(marker) {
                if log[start..].contains(text) {
                    return log[start..].to_string();
                }
            }
            assert!(
                Instant::now() < deadline,
                "the log has no {text:?} after {marker:?} within {timeout:?}:\n{log}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `condition` until it holds or `timeout` passes.
fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn queue_count(status: &Value, field: &str) -> i64 {
    status["queue"][field]
        .as_i64()
        .unwrap_or_else(|| panic!("queue.{field} missing in {status}"))
}

// ---------------------------------------------------------------------------
// Notify protocol

#[test]
fn notify_ready_watchdog_reload_stop_in_order() {
    // The server holds every upload for a minute, so the archives stay queued.
    let server = UploadServer::start(Duration::from_secs(60));
    let home = Home::new();
    home.write_config(&server, "shutdown_grace_ms = 300\n");
    home.write_credential(GOOD_TOKEN);
    for name in ["a.zip", "b.zip", "c.zip"] {
        home.drop_archive(name);
    }
    let mut socket = NotifySocket::bind(home.path());
    let mut daemon = Daemon::start(&home, Some(&socket));

    let ready = socket.wait_for("READY=1", None, PROMPT);
    let ready_message = socket.messages[ready].clone();
    let status_line = value_of(&ready_message, "STATUS")
        .unwrap_or_else(|| panic!("no STATUS= in {ready_message:?}"));
    assert!(
        status_line.contains("pending"),
        "status line: {status_line}"
    );
    assert!(
        socket.messages[..ready]
            .iter()
            .all(|m| !has_line(m, "WATCHDOG=1")),
        "WATCHDOG=1 before READY=1: {:?}",
        socket.messages
    );

    // READY=1 promises that the outbox was scanned and the control socket
    // listens: the running daemon must answer with all three archives queued.
    let (_, status) = home.status();
    assert_eq!(status["daemon"]["running"], Value::Bool(true), "{status}");
    assert_eq!(
        queue_count(&status, "pending") + queue_count(&status, "uploading"),
        3,
        "{status}"
    );

    // WATCHDOG_USEC=200000 asks for a ping at least every 200 ms.
    let first_ping = socket.wait_for("WATCHDOG=1", Some(ready), PROMPT);
    socket.collect_for(Duration::from_millis(1000));
    let pings = socket.messages[first_ping..]
        .iter()
        .filter(|m| has_line(m, "WATCHDOG=1"))
        .count();
    assert!(
        pings >= 3,
        "{pings} watchdog pings in about 1 s; messages: {:?}",
        socket.messages
    );

    daemon.signal(libc::SIGHUP);
    let reloading = socket.wait_for("RELOADING=1", Some(first_ping), PROMPT);
    let reloading_message = socket.messages[reloading].clone();
    let stamp: u64 = value_of(&reloading_message, "MONOTONIC_USEC")
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC= with RELOADING=1: {reloading_message:?}"))
        .parse()
        .unwrap();
    let now = monotonic_usec_now();
    assert!(
        stamp <= now,
        "MONOTONIC_USEC={stamp} is after CLOCK_MONOTONIC {now}"
    );
    assert!(
        now - stamp < 60_000_000,
        "MONOTONIC_USEC={stamp} is more than 60 s before {now}"
    );
    let reloaded = socket.wait_for("READY=1", Some(reloading), PROMPT);
    assert!(
        daemon.is_running(),
        "the daemon stopped after SIGHUP; log:\n{}",
        daemon.log()
    );

    daemon.signal(libc::SIGTERM);
    let stopping = socket.wait_for("STOPPING=1", Some(reloaded), PROMPT);
    assert!(
        ready < first_ping && first_ping < reloading && reloading < reloaded && reloaded < stopping
    );
    let exit = daemon.wait_for_exit(PROMPT);
    assert_eq!(exit.code(), Some(0), "log:\n{}", daemon.log());

    for name in ["a.zip", "b.zip", "c.zip"] {
        assert!(
            home.in_outbox(name),
            "{name} left the outbox although the server never answered"
        );
    }
    assert_eq!(server.accepted(), 0);
}

#[test]
fn sighup_right_after_ready_reloads() {
    // systemd may send SIGHUP (ExecReload=) as soon as READY=1 arrives, so the
    // handler must already be in place then: SIGHUP's default action ends the
    // process. Several rounds, because a missing handler loses a race.
    let server = UploadServer::start(Duration::ZERO);
    for round in 0..5 {
        let home = Home::new();
        home.write_config(&server, "");
        home.write_credential(GOOD_TOKEN);
        let mut socket = NotifySocket::bind(home.path());
        let mut daemon = Daemon::start(&home, Some(&socket));
        let ready = socket.wait_for("READY=1", None, PROMPT);
        daemon.signal(libc::SIGHUP);

        let reloading = socket.wait_for("RELOADING=1", Some(ready), PROMPT);
        socket.wait_for("READY=1", Some(reloading), PROMPT);
        assert!(
            daemon.is_running(),
            "round {round}: SIGHUP right after READY=1 ended the daemon: {:?}",
            daemon.child.try_wait()
        );

        daemon.signal(libc::SIGTERM);
        let exit = daemon.wait_for_exit(PROMPT);
        assert_eq!(
            exit.code(),
            Some(0),
            "round {round}; log:\n{}",
            daemon.log()
        );
    }
}

#[test]
fn no_notifications_without_notify_socket() {
    // Started by hand, the daemon must run and stop without systemd.
    let server = UploadServer::start(Duration::ZERO);
    let home = Home::new();
    home.write_config(&server, "");
    home.write_credential(GOOD_TOKEN);
    let mut daemon = Daemon::start(&home, None);
    wait_until("status reports the daemon running", PROMPT, || {
        assert!(
            daemon.is_running(),
            "the daemon exited; log:\n{}",
            daemon.log()
        );
        home.status().1["daemon"]["running"] == Value::Bool(true)
    });
    home.drop_archive("a.zip");
    wait_until("the server accepts a.zip", PROMPT, || {
        server.accepted() == 1
    });

    daemon.signal(libc::SIGTERM);
    assert_eq!(
        daemon.wait_for_exit(PROMPT).code(),
        Some(0),
        "log:\n{}",
        daemon.log()
    );
    assert!(
        !daemon.log().contains("notification"),
        "log:\n{}",
        daemon.log()
    );
}

// ---------------------------------------------------------------------------
// SIGHUP: config and token

#[test]
fn sighup_bad_config_keeps_running_one() {
    let server = UploadServer::start(Duration::ZERO);
    let home = Home::new();
    home.write_config(&server, "");
    home.write_credential(GOOD_TOKEN);
    let mut socket = NotifySocket::bind(home.path());
    let mut daemon = Daemon::start(&home, Some(&socket));
    let ready = socket.wait_for("READY=1", None, PROMPT);
    home.drop_archive("before.zip");
    wait_until("the server accepts before.zip", PROMPT, || {
        server.accepted() == 1
    });

    // A value of the wrong type and an unknown key: both are faults. The daemon
    // also watches the file and may reload on the rename before the SIGHUP.
    let good = std::fs::read_to_string(home.config()).unwrap();
    home.replace_config(&format!(
        "{good}concurrency = \"many\"\nserver-url = \"x\"\n"
    ));
    daemon.signal(libc::SIGHUP);
    let reloading = socket.wait_for("RELOADING=1", Some(ready), PROMPT);
    socket.wait_for("READY=1", Some(reloading), PROMPT);
    let after_sighup = daemon.wait_for_log_after(
        "SIGHUP received",
        "the new configuration is rejected and the running one is kept",
        PROMPT,
    );
    for key in ["\"concurrency\" is invalid", "\"server-url\" is invalid"] {
        assert!(
            after_sighup.contains(key),
            "the log does not name the fault {key}:\n{}",
            daemon.log()
        );
    }
    assert!(daemon.is_running());

    // The config file no longer names the state dir correctly, which is why
    // status gets it as a flag.
    let (code, status) = home.status();
    assert_eq!(code, 0, "{status}");
    assert_eq!(status["daemon"]["running"], Value::Bool(true), "{status}");
    assert_eq!(status["auth"]["state"], "ok", "{status}");
    assert_eq!(status["server_url"], server.url.as_str(), "{status}");

    home.drop_archive("after.zip");
    wait_until("the server accepts after.zip", PROMPT, || {
        server.accepted() == 2
    });
    assert!(!home.in_outbox("after.zip"));

    daemon.signal(libc::SIGTERM);
    assert_eq!(
        daemon.wait_for_exit(PROMPT).code(),
        Some(0),
        "log:\n{}",
        daemon.log()
    );
}

#[test]
fn sighup_fixed_config_ends_config_hold() {
    let server = UploadServer::start(Duration::ZERO);
    let home = Home::new();
    // Faulty from the start: there is no running config to keep, so the daemon
    // holds with config_error until a reload brings a valid one.
    home.write_config(&server, "on_success = \"archive\"\n");
    home.write_credential(GOOD_TOKEN);
    home.drop_archive("a.zip");
    let mut socket = NotifySocket::bind(home.path());
    let mut daemon = Daemon::start(&home, Some(&socket));
    let ready = socket.wait_for("READY=1", None, PROMPT);
    let (code, status) = home.status();
    assert_eq!(status["auth"]["state"], "config_error", "{status}");
    assert_eq!(code, 2, "{status}");

    home.write_config(&server, "");
    daemon.signal(libc::SIGHUP);
    socket.wait_for("RELOADING=1", Some(ready), PROMPT);
    wait_until("the server accepts a.zip", PROMPT, || {
        server.accepted() == 1
    });
    wait_until("auth.state is ok", PROMPT, || {
        home.status().1["auth"]["state"] == "ok"
    });

    daemon.signal(libc::SIGTERM);
    assert_eq!(
        daemon.wait_for_exit(PROMPT).code(),
        Some(0),
        "log:\n{}",
        daemon.log()
    );
}

#[test]
fn sighup_new_token_ends_auth_hold() {
    // The credentials folder is not watched: under systemd it is a copy made
    // at start. So only SIGHUP (or the probe an auth_probe_ms of 10 minutes
    // away) can pick up the new token here.
    let server = UploadServer::start(Duration::ZERO);
    let home = Home::new();
    home.write_config(&server, "");
    home.write_credential("rejected-token");
    home.drop_archive("a.zip");
    let mut daemon = Daemon::start(&home, None);
    wait_until("auth.state is token_rejected", PROMPT, || {
        home.status().1["auth"]["state"] == "token_rejected"
    });
    let (code, status) = home.status();
    assert_eq!(code, 2, "{status}");
    assert_eq!(queue_count(&status, "pending"), 1, "{status}");
    assert_eq!(server.accepted(), 0);

    home.write_credential(GOOD_TOKEN);
    let sent = Instant::now();
    daemon.signal(libc::SIGHUP);
    wait_until("the server accepts a.zip", PROMPT, || {
        server.accepted() == 1
    });
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "the hold ended only after {:?}",
        sent.elapsed()
    );
    wait_until("auth.state is ok", PROMPT, || {
        home.status().1["auth"]["state"] == "ok"
    });
    wait_until("a.zip leaves the outbox", PROMPT, || {
        !home.in_outbox("a.zip")
    });
    daemon.wait_for_log("the token changed", PROMPT);
    assert!(
        !daemon.log().contains(GOOD_TOKEN),
        "the new token is in the log"
    );
    assert!(
        !daemon.log().contains("rejected-token"),
        "the old token is in the log"
    );

    daemon.signal(libc::SIGTERM);
    assert_eq!(
        daemon.wait_for_exit(PROMPT).code(),
        Some(0),
        "log:\n{}",
        daemon.log()
    );
}

// ---------------------------------------------------------------------------
// SIGTERM

#[test]
fn sigterm_aborts_slow_upload_after_grace() {
    let server = UploadServer::start(Duration::from_secs(120));
    let home = Home::new();
    home.write_config(&server, "shutdown_grace_ms = 700\n");
    home.write_credential(GOOD_TOKEN);
    let mut socket = NotifySocket::bind(home.path());
    let mut daemon = Daemon::start(&home, Some(&socket));
    let ready = socket.wait_for("READY=1", None, PROMPT);
    home.drop_archive("slow.zip");
    wait_until("the server has the whole request", PROMPT, || {
        server.received() == 1
    });
    let (_, status) = home.status();
    assert_eq!(queue_count(&status, "uploading"), 1, "{status}");

    let sent = Instant::now();
    daemon.signal(libc::SIGTERM);
    socket.wait_for("STOPPING=1", Some(ready), PROMPT);
    let exit = daemon.wait_for_exit(PROMPT);
    let stopped_after = sent.elapsed();
    assert_eq!(exit.code(), Some(0), "log:\n{}", daemon.log());
    assert!(
        stopped_after >= Duration::from_millis(600),
        "stopped {stopped_after:?} after SIGTERM, before the 700 ms grace"
    );
    assert!(
        daemon.log().contains("they stay pending"),
        "log:\n{}",
        daemon.log()
    );

    assert!(
        home.in_outbox("slow.zip"),
        "the aborted upload's file left the outbox"
    );
    assert_eq!(server.accepted(), 0);
    let items = home.list();
    let item = items
        .iter()
        .find(|i| i["file"] == "slow.zip")
        .unwrap_or_else(|| panic!("slow.zip not listed: {items:?}"));
    assert_eq!(item["state"], "pending", "{item}");
    assert_eq!(
        item["attempts"], 0,
        "an aborted upload spent an attempt: {item}"
    );
}

#[test]
fn sigterm_uses_reloaded_grace() {
    // The grace period comes from the settings in force at SIGTERM, so a
    // reload can shorten it.
    let server = UploadServer::start(Duration::from_secs(120));
    let home = Home::new();
    home.write_config(&server, "shutdown_grace_ms = 60000\n");
    home.write_credential(GOOD_TOKEN);
    let mut socket = NotifySocket::bind(home.path());
    let mut daemon = Daemon::start(&home, Some(&socket));
    let ready = socket.wait_for("READY=1", None, PROMPT);

    home.write_config(&server, "shutdown_grace_ms = 300\n");
    daemon.signal(libc::SIGHUP);
    let reloading = socket.wait_for("RELOADING=1", Some(ready), PROMPT);
    socket.wait_for("READY=1", Some(reloading), PROMPT);
    daemon.wait_for_log_after("SIGHUP received", "configuration reloaded", PROMPT);
    home.drop_archive("slow.zip");
    wait_until("the server has the whole request", PROMPT, || {
        server.received() == 1
    });

    let sent = Instant::now();
    daemon.signal(libc::SIGTERM);
    let exit = daemon.wait_for_exit(Duration::from_secs(30));
    assert_eq!(exit.code(), Some(0), "log:\n{}", daemon.log());
    assert!(
        sent.elapsed() < Duration::from_secs(15),
        "the daemon took {:?} to stop, so it kept the 60 s grace from the start",
        sent.elapsed()
    );
    assert!(home.in_outbox("slow.zip"));
}

#[test]
fn sigterm_lets_upload_finish_within_grace() {
    let server = UploadServer::start(Duration::from_millis(1500));
    let home = Home::new();
    home.write_config(&server, "shutdown_grace_ms = 15000\n");
    home.write_credential(GOOD_TOKEN);
    let mut socket = NotifySocket::bind(home.path());
    let mut daemon = Daemon::start(&home, Some(&socket));
    socket.wait_for("READY=1", None, PROMPT);
    home.drop_archive("quick.zip");
    wait_until("the server has the whole request", PROMPT, || {
        server.received() == 1
    });

    daemon.signal(libc::SIGTERM);
    // Files that arrive after SIGTERM are not uploaded any more, but are kept.
    home.drop_archive("late.zip");
    let exit = daemon.wait_for_exit(PROMPT);
    assert_eq!(exit.code(), Some(0), "log:\n{}", daemon.log());

    assert_eq!(
        server.accepted(),
        1,
        "the upload in flight was not allowed to finish"
    );
    assert!(
        !home.in_outbox("quick.zip"),
        "quick.zip was uploaded but is still in the outbox"
    );
    assert!(home.in_outbox("late.zip"), "late.zip left the outbox");
    assert_eq!(server.received(), 1, "late.zip was sent after SIGTERM");
    let items = home.list();
    assert!(
        items
            .iter()
            .all(|i| i["file"] != "quick.zip" || i["state"] == "uploaded"),
        "quick.zip is not marked uploaded: {items:?}"
    );
}

// ---------------------------------------------------------------------------
// Packaging

/// Returns the values of every `Key=` line of the unit file.
fn unit_values(text: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    text.lines()
        .filter_map(|line| line.trim().strip_prefix(&prefix))
        .map(str::to_string)
        .collect()
}

fn seconds(value: &str) -> u64 {
    value
        .strip_suffix('s')
        .unwrap_or(value)
        .parse()
        .unwrap_or_else(|_| panic!("{value:?} is not in seconds"))
}

#[test]
fn unit_declares_service_contract() {
    let text = std::fs::read_to_string(UNIT_FILE).unwrap();
    let one = |key: &str| {
        let values = unit_values(&text, key);
        assert_eq!(
            values.len(),
            1,
            "{key}= appears {} times in the unit",
            values.len()
        );
        values[0].clone()
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("KillMode"), "mixed");
    assert_eq!(one("LoadCredential"), "outboxd-token:%E/outboxd/token");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("UMask"), "0077");
    assert!(one("ExecStart").ends_with("/outboxd run"));
    assert!(seconds(&one("StartLimitIntervalSec")) > 0);
    assert!(one("StartLimitBurst").parse::<u32>().unwrap() > 0);
    // The dispatcher wakes at least every WatchdogSec/2, and a stop must leave
    // room for the default 5 s grace and the final flush.
    assert!(seconds(&one("WatchdogSec")) >= 10);
    assert!(seconds(&one("TimeoutStopSec")) > 5);
    // The token never travels through the environment.
    assert!(unit_values(&text, "Environment")
        .iter()
        .all(|v| !v.to_ascii_uppercase().contains("TOKEN")));
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let Ok(found) = Command::new("systemd-analyze").arg("--version").output() else {
        println!("note: systemd-analyze is not installed, so the unit is not verified; install the Debian package systemd");
        return;
    };
    assert!(
        found.status.success(),
        "systemd-analyze --version failed: {found:?}"
    );

    // verify checks that ExecStart= names an executable, so the copy points at
    // the binary under test, as install.sh points it at ~/.local/bin.
    let dir = tempfile::tempdir().unwrap();
    let runtime_dir = dir.path().join("runtime");
    std::fs::create_dir(&runtime_dir).unwrap();
    std::fs::set_permissions(&runtime_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let text = std::fs::read_to_string(UNIT_FILE).unwrap();
    let text: String = text
        .lines()
        .map(|line| {
            if line.starts_with("ExecStart=") {
                format!("ExecStart={BINARY} run\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    let unit = dir.path().join("outboxd.service");
    std::fs::write(&unit, text).unwrap();

    let output = Command::new("systemd-analyze")
        .args(["verify", "--user"])
        .arg(&unit)
        .env("XDG_RUNTIME_DIR", &runtime_dir)
        .env("HOME", dir.path())
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("outboxd.service"))
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complains:\n{stderr}"
    );
}

/// Keys whose commented line in the example config is an example, not the default.
const EXAMPLE_ONLY_KEYS: &[&str] = &[
    "server_url",
    "ca_file",
    "token_file",
    "outbox",
    "state_dir",
    "site",
    "agent",
];

/// Returns the example config with every `# key = value` line and the
/// `# [fields]` line uncommented, and the names of those keys.
fn uncommented_example(skip: &[&str]) -> (String, Vec<String>) {
    let text = std::fs::read_to_string(EXAMPLE_CONFIG).unwrap();
    let mut keys = Vec::new();
    let mut out = String::new();
    for line in text.lines() {
        let Some(setting) = line.strip_prefix("# ") else {
            continue;
        };
        if setting == "[fields]" {
            out.push_str("[fields]\n");
            continue;
        }
        let Some((key, _)) = setting.split_once(" = ") else {
            continue;
        };
        if key.is_empty()
            || !key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            || skip.contains(&key)
        {
            continue;
        }
        keys.push(key.to_string());
        out.push_str(setting);
        out.push('\n');
    }
    (out, keys)
}

fn load_config(text: &str) -> outboxd::config::Loaded {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    let env = |name: &str| (name == "HOME").then(|| "/home/alice".to_string());
    let mut loaded =
        outboxd::config::load(Some(&path), outboxd::config::RawSettings::default(), env);
    loaded.settings.config_path = None;
    loaded
}

#[test]
fn example_config_documents_every_key() {
    let (text, keys) = uncommented_example(&[]);
    let loaded = load_config(&text);
    assert!(
        loaded.problems.is_empty(),
        "the uncommented example config has faults: {:?}\n{text}",
        loaded.problems
    );

    let flags =
        <outboxd::config::RawSettings as clap::Args>::augment_args(clap::Command::new("outboxd"));
    for argument in flags.get_arguments() {
        let key = argument.get_id().as_str();
        assert!(
            keys.iter().any(|k| k == key),
            "the example config does not document {key}"
        );
    }
    assert!(
        text.contains("[fields]"),
        "the example config does not document fields"
    );
}

#[test]
fn example_config_shows_defaults() {
    let (text, _) = uncommented_example(EXAMPLE_ONLY_KEYS);
    let documented = load_config(&text);
    let defaults = load_config("");
    assert_eq!(documented.problems, defaults.problems);
    assert_eq!(
        format!("{:?}", documented.settings),
        format!("{:?}", defaults.settings)
    );
}

#[test]
fn example_config_as_installed_is_valid() {
    // As shipped, every line is a comment: the daemon starts with the defaults
    // and holds until server_url is set.
    let text = std::fs::read_to_string(EXAMPLE_CONFIG).unwrap();
    let loaded = load_config(&text);
    assert_eq!(loaded.settings.server_url, None);
    assert_eq!(loaded.problems.len(), 1, "{:?}", loaded.problems);
    assert!(
        loaded.problems[0].starts_with("server_url is not set"),
        "{:?}",
        loaded.problems
    );
}

/// A folder with a stand-in `systemctl` that records its arguments, so that
/// install.sh can run without a systemd user instance.
fn fake_systemctl(dir: &Path) -> (PathBuf, PathBuf) {
    let bin = dir.join("fake-bin");
    let calls = dir.join("systemctl-calls");
    std::fs::create_dir(&bin).unwrap();
    let script = format!(
        "#!/bin/sh\necho \"$*\" >> '{}'\n[ \"$2\" = is-active ] && exit 3\nexit 0\n",
        calls.display()
    );
    std::fs::write(bin.join("systemctl"), script).unwrap();
    std::fs::set_permissions(
        bin.join("systemctl"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    (bin, calls)
}

fn run_install(home: &Path, fake_bin: &Path, stdin: &str, args: &[&str]) -> std::process::Output {
    use std::io::Write;
    let path = format!("{}:/usr/bin:/bin", fake_bin.display());
    let mut child = Command::new("bash")
        .arg(INSTALL_SCRIPT)
        .args(["--binary", BINARY])
        .args(args)
        .env_clear()
        .env("PATH", path)
        .env("HOME", home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn install_script_installs_for_user() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let (fake_bin, calls) = fake_systemctl(dir.path());

    let output = run_install(
        &home,
        &fake_bin,
        "  secret-token-7 \n",
        &["--server-url", "https://uploads.example.com/upload"],
    );
    assert!(output.status.success(), "install.sh failed: {output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !stdout.contains("secret-token-7"),
        "install.sh printed the token"
    );
    if !Path::new("/var/lib/systemd/linger").exists() {
        assert!(
            stdout.contains("loginctl enable-linger"),
            "no linger note:\n{stdout}"
        );
    }

    let binary = home.join(".local/bin/outboxd");
    assert_eq!(mode_of(&binary), 0o755);
    let unit = std::fs::read_to_string(home.join(".config/systemd/user/outboxd.service")).unwrap();
    assert_eq!(
        unit_values(&unit, "ExecStart"),
        vec!["%h/.local/bin/outboxd run".to_string()]
    );
    let config = home.join(".config/outboxd/config.toml");
    let config_text = std::fs::read_to_string(&config).unwrap();
    assert!(
        config_text.contains("\nserver_url = \"https://uploads.example.com/upload\"\n"),
        "{config_text}"
    );
    assert!(load_config(&config_text).problems.is_empty());
    let token = home.join(".config/outboxd/token");
    assert_eq!(std::fs::read_to_string(&token).unwrap(), "secret-token-7\n");
    assert_eq!(mode_of(&token), 0o600);
    assert_eq!(mode_of(&home.join(".config/outboxd")), 0o700);
    let recorded = std::fs::read_to_string(&calls).unwrap();
    assert!(recorded.contains("--user daemon-reload\n"), "{recorded}");
    assert!(
        recorded.contains("--user enable --now outboxd\n"),
        "{recorded}"
    );

    // A second run upgrades the binary and the unit but keeps config and token.
    std::fs::write(&config, "# edited by the operator\n").unwrap();
    let output = run_install(&home, &fake_bin, "other-token\n", &[]);
    assert!(
        output.status.success(),
        "second install.sh failed: {output:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "# edited by the operator\n"
    );
    assert_eq!(std::fs::read_to_string(&token).unwrap(), "secret-token-7\n");
}

#[test]
fn install_script_without_token_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let (fake_bin, calls) = fake_systemctl(dir.path());

    let output = run_install(&home, &fake_bin, "", &[]);
    assert!(
        !output.status.success(),
        "install.sh accepted an empty token"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no token on stdin"), "{stderr}");
    assert!(
        !home.join(".local").exists(),
        "install.sh wrote files before it failed"
    );
    assert!(
        !home.join(".config").exists(),
        "install.sh wrote files before it failed"
    );
    assert!(
        !calls.exists(),
        "install.sh called systemctl before it failed"
    );
}

#[test]
fn install_script_rejects_bad_server_url() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let (fake_bin, _) = fake_systemctl(dir.path());

    let output = run_install(
        &home,
        &fake_bin,
        "token\n",
        &["--server-url", "uploads.example.com/\"x"],
    );
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--server-url"));
    assert!(!home.join(".config").exists());
}
