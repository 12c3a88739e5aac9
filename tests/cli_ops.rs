//! End-to-end tests of the operator commands (`enqueue`, `check`, `status`,
//! `list`, `retry`, `completions`, `man`). They run the real binary on
//! temporary folders, against HTTP servers that the tests start on 127.0.0.1.
//! No test contacts any other address.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};

/// The token the test server accepts. Every test that prints something checks
/// that this value never appears in it.
const TOKEN: &str = "tok-4f1c9e2a7b3d5e6f";

/// Another syntactically valid token, which the server rejects.
const WRONG_TOKEN: &str = "tok-0000wrong0000ffff";

const BIN: &str = env!("CARGO_BIN_EXE_outboxd");

/// Time a daemon gets for a step that normally takes milliseconds.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Helpers: sandbox, command output, test server, daemon.

/// The folders of one test. Commands run with a cleared environment in which
/// HOME and the XDG folders point inside the sandbox, so no real user file is
/// read. `OUTBOXD_OUTBOX` and `OUTBOXD_STATE_DIR` name the sandbox's outbox and
/// state dir, so every command finds the same folders without flags.
struct Sandbox {
    dir: tempfile::TempDir,
}

/// Exit code and output of one command.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// Returns the first stdout line that starts with `prefix`, such as "FAIL  probe".
    fn line(&self, prefix: &str) -> Option<&str> {
        self.stdout.lines().find(|line| line.starts_with(prefix))
    }
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::tempdir().expect("creating a temp dir");
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        std::fs::create_dir_all(dir.path().join("src")).unwrap();
        Sandbox { dir }
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

    /// Writes a token file with mode 0600 and returns its path.
    fn token_file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// Writes a complete zip archive into the source folder and returns its path.
    fn zip(&self, name: &str, payload: &[u8]) -> PathBuf {
        let path = self.path().join("src").join(name);
        std::fs::write(
            &path,
            outboxd::zipfile::stored_archive("session.json", payload),
        )
        .unwrap();
        path
    }

    fn command(&self, args: &[&str]) -> Command {
        let home = self.path().join("home");
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_DATA_HOME", home.join(".local/share"))
            .env("XDG_STATE_HOME", home.join(".local/state"))
            .env("OUTBOXD_OUTBOX", self.outbox())
            .env("OUTBOXD_STATE_DIR", self.state_dir())
            .current_dir(self.path());
        command
    }

    fn run(&self, args: &[&str]) -> Run {
        self.run_with_env(args, &[])
    }

    fn run_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut command = self.command(args);
        for (name, value) in env {
            command.env(name, value);
        }
        let output = command.output().expect("running outboxd");
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// `list --json` parsed.
    fn list_json(&self, extra: &[&str]) -> Vec<serde_json::Value> {
        let mut args = vec!["list", "--json"];
        args.extend_from_slice(extra);
        let run = self.run(&args);
        assert_eq!(run.code, 0, "list --json failed: {run:?}");
        serde_json::from_str(&run.stdout)
            .unwrap_or_else(|err| panic!("list --json is not JSON ({err}): {run:?}"))
    }

    fn status_json(&self) -> serde_json::Value {
        let run = self.run(&["status", "--json"]);
        serde_json::from_str(&run.stdout)
            .unwrap_or_else(|err| panic!("status --json is not JSON ({err}): {run:?}"))
    }

    /// Names of the entries in the outbox that start with a dot.
    fn outbox_dot_files(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.outbox()) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with('.'))
            .collect()
    }
}

/// Polls `condition` every 50 ms until it is true or `timeout` passes.
fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    condition()
}

/// Counters and the configured response status of a `TestServer`.
struct ServerState {
    /// Status returned to requests that carry `TOKEN`.
    status: AtomicU16,
    requests: AtomicUsize,
    probes: AtomicUsize,
}

/// An upload endpoint at `/upload` on 127.0.0.1. Requests without
/// `Authorization: Bearer TOKEN` get 401; the others get the configured status.
/// Other paths get 404.
struct TestServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
    _runtime: tokio::runtime::Runtime,
}

impl TestServer {
    fn start(status: u16) -> TestServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("building the test server's runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ServerState {
            status: AtomicU16::new(status),
            requests: AtomicUsize::new(0),
            probes: AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .route("/upload", axum::routing::post(respond))
            .with_state(state.clone());
        runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TestServer {
            addr,
            state,
            _runtime: runtime,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/upload", self.addr)
    }

    fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    fn probes(&self) -> usize {
        self.state.probes.load(Ordering::SeqCst)
    }
}

async fn respond(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    state.requests.fetch_add(1, Ordering::SeqCst);
    // The probe is a multipart body with the field probe=1 and no file part.
    let text = String::from_utf8_lossy(&body);
    if text.contains("name=\"probe\"") && !text.contains("name=\"file\"") {
        state.probes.fetch_add(1, Ordering::SeqCst);
    }
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if authorization != Some(format!("Bearer {TOKEN}").as_str()) {
        return (StatusCode::UNAUTHORIZED, "invalid token".into());
    }
    let status = StatusCode::from_u16(state.status.load(Ordering::SeqCst)).unwrap();
    (status, format!("test server answered {}", status.as_u16()))
}

/// Returns a loopback URL on which nothing listens: the port of a listener
/// that was bound and closed again.
fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}/upload")
}

/// A daemon started with `outboxd run` in a sandbox, stopped with SIGTERM on
/// drop. Its log goes to `daemon.log` in the sandbox.
struct Daemon {
    child: Child,
}

impl Daemon {
    /// Starts the daemon with a slow retry schedule, so that a retry seen
    /// within a test can only come from `outboxd retry`.
    fn start(sandbox: &Sandbox, server_url: &str, token_file: &Path) -> Daemon {
        let log = std::fs::File::create(sandbox.path().join("daemon.log")).unwrap();
        let child = sandbox
            .command(&[
                "run",
                "--server-url",
                server_url,
                "--token-file",
                token_file.to_str().unwrap(),
                "--settle-ms",
                "100",
                "--backoff-initial-ms",
                "60000",
                "--backoff-max-ms",
                "60000",
                "--auth-probe-ms",
                "60000",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting outboxd run");
        let daemon = Daemon { child };
        let ready = wait_until(STEP_TIMEOUT, || {
            sandbox.status_json()["daemon"]["running"] == true
        });
        assert!(
            ready,
            "the daemon did not become ready; log:\n{}",
            sandbox.log()
        );
        daemon
    }

    /// Sends SIGTERM and waits for the exit. Returns the exit code.
    fn stop(mut self) -> Option<i32> {
        self.terminate()
    }

    fn terminate(&mut self) -> Option<i32> {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions; pid is our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STEP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

impl Sandbox {
    fn log(&self) -> String {
        std::fs::read_to_string(self.path().join("daemon.log")).unwrap_or_default()
    }
}

/// Fails the test when the token appears anywhere in a command's output.
fn assert_no_token(run: &Run, token: &str) {
    assert!(
        !run.all().contains(token),
        "the token appears in the output: {run:?}"
    );
}

// ---------------------------------------------------------------------------
// enqueue

#[test]
fn enqueue_zip_lands_without_temp() {
    let sandbox = Sandbox::new();
    let source = sandbox.zip("s-001.zip", b"{\"events\":[1,2,3]}");
    let run = sandbox.run(&["enqueue", source.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    let placed = sandbox.outbox().join("s-001.zip");
    assert_eq!(
        std::fs::read(&placed).unwrap(),
        std::fs::read(&source).unwrap(),
        "content differs"
    );
    assert!(source.exists(), "a copy must leave the source in place");
    assert_eq!(
        sandbox.outbox_dot_files(),
        Vec::<String>::new(),
        "a temporary file was left"
    );
    let mode = std::fs::metadata(sandbox.outbox())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "a new outbox gets mode 0700");
}

#[test]
fn enqueue_move_removes_source() {
    let sandbox = Sandbox::new();
    let source = sandbox.zip("s-002.zip", b"moved");
    let expected = std::fs::read(&source).unwrap();
    let run = sandbox.run(&["enqueue", "--move", source.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(!source.exists(), "--move must remove the source");
    assert_eq!(
        std::fs::read(sandbox.outbox().join("s-002.zip")).unwrap(),
        expected
    );
    assert_eq!(sandbox.outbox_dot_files(), Vec::<String>::new());
}

#[test]
fn enqueue_move_across_filesystems() {
    use std::os::unix::fs::MetadataExt;
    let sandbox = Sandbox::new();
    // A tmpfs is another filesystem than the sandbox on most Linux machines,
    // where a hard link fails with EXDEV and enqueue copies instead.
    let Ok(other) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("skipped: /dev/shm is not available");
        return;
    };
    let device = |path: &Path| std::fs::metadata(path).unwrap().dev();
    if device(other.path()) == device(sandbox.path()) {
        eprintln!("skipped: /dev/shm is on the same filesystem as the sandbox");
        return;
    }
    let source = other.path().join("s-009.zip");
    let archive = outboxd::zipfile::stored_archive("session.json", b"across");
    std::fs::write(&source, &archive).unwrap();
    let run = sandbox.run(&["enqueue", "--move", source.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        !source.exists(),
        "--move must remove the source after the copy"
    );
    assert_eq!(
        std::fs::read(sandbox.outbox().join("s-009.zip")).unwrap(),
        archive
    );
    assert_eq!(sandbox.outbox_dot_files(), Vec::<String>::new());
}

#[test]
fn enqueue_outbox_flag_wins() {
    let sandbox = Sandbox::new();
    let source = sandbox.zip("s-003.zip", b"x");
    let other = sandbox.path().join("other-outbox");
    let run = sandbox.run(&[
        "enqueue",
        "--outbox",
        other.to_str().unwrap(),
        source.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(other.join("s-003.zip").is_file(), "--outbox was not used");
    assert!(
        !sandbox.outbox().join("s-003.zip").exists(),
        "the file went to the outbox of the environment"
    );
}

#[test]
fn enqueue_non_zip_is_refused() {
    let sandbox = Sandbox::new();
    let text = sandbox.path().join("src/notes.zip");
    std::fs::write(&text, "these are notes, not a zip archive at all\n").unwrap();
    let run = sandbox.run(&["enqueue", text.to_str().unwrap()]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("notes.zip"),
        "the message must name the file: {run:?}"
    );
    assert!(
        run.stderr.contains("not a complete zip archive"),
        "the message must give the reason: {run:?}"
    );
    assert!(!sandbox.outbox().exists(), "the outbox must stay untouched");
    assert!(text.exists(), "the source must stay");
}

#[test]
fn enqueue_truncated_zip_is_refused() {
    let sandbox = Sandbox::new();
    let source = sandbox.zip("s-004.zip", &[7u8; 500]);
    let bytes = std::fs::read(&source).unwrap();
    std::fs::write(&source, &bytes[..bytes.len() - 10]).unwrap();
    let run = sandbox.run(&["enqueue", "--move", source.to_str().unwrap()]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("s-004.zip"), "{run:?}");
    assert!(!sandbox.outbox().exists(), "the outbox must stay untouched");
    assert!(source.exists(), "a refused --move must keep the source");
}

#[test]
fn enqueue_tiny_file_is_refused() {
    let sandbox = Sandbox::new();
    let tiny = sandbox.path().join("src/tiny.zip");
    std::fs::write(&tiny, "PK\n").unwrap();
    let run = sandbox.run(&["enqueue", tiny.to_str().unwrap()]);
    assert_eq!(
        run.code, 1,
        "a 3-byte file must be refused, not crash: {run:?}"
    );
    assert!(run.stderr.contains("tiny.zip"), "{run:?}");
    assert!(!sandbox.outbox().exists());
}

#[test]
fn enqueue_name_collision_keeps_existing() {
    let sandbox = Sandbox::new();
    std::fs::create_dir_all(sandbox.outbox()).unwrap();
    let existing = sandbox.outbox().join("s-005.zip");
    std::fs::write(&existing, b"the earlier archive").unwrap();
    let source = sandbox.zip("s-005.zip", b"the new archive");
    for args in [vec!["enqueue"], vec!["enqueue", "--move"]] {
        let mut args = args.clone();
        args.push(source.to_str().unwrap());
        let run = sandbox.run(&args);
        assert_eq!(run.code, 1, "{args:?}: {run:?}");
        assert!(
            run.stderr.contains("s-005.zip"),
            "the message must name the file: {run:?}"
        );
        assert!(
            run.stderr.contains("rename"),
            "the message must suggest renaming: {run:?}"
        );
        assert_eq!(
            std::fs::read(&existing).unwrap(),
            b"the earlier archive",
            "{args:?} replaced the existing file"
        );
        assert!(source.exists(), "{args:?} lost the source");
        assert_eq!(
            sandbox.outbox_dot_files(),
            Vec::<String>::new(),
            "{args:?} left a temporary file"
        );
    }
}

#[test]
fn enqueue_file_already_in_outbox() {
    let sandbox = Sandbox::new();
    let source = sandbox.zip("s-006.zip", b"x");
    assert_eq!(sandbox.run(&["enqueue", source.to_str().unwrap()]).code, 0);
    let placed = sandbox.outbox().join("s-006.zip");
    let run = sandbox.run(&["enqueue", "--move", placed.to_str().unwrap()]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("already in the outbox"), "{run:?}");
    assert!(placed.is_file(), "the file in the outbox must stay");
}

#[test]
fn enqueue_partial_failure_places_rest() {
    let sandbox = Sandbox::new();
    let good = sandbox.zip("s-007.zip", b"good");
    let bad = sandbox.path().join("src/s-008.zip");
    std::fs::write(&bad, "no zip here, only some text that is long enough").unwrap();
    let run = sandbox.run(&["enqueue", good.to_str().unwrap(), bad.to_str().unwrap()]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        sandbox.outbox().join("s-007.zip").is_file(),
        "the good file must be placed"
    );
    assert!(
        !sandbox.outbox().join("s-008.zip").exists(),
        "the bad file must not be placed"
    );
    assert!(run.stderr.contains("1 of 2"), "{run:?}");
}

#[test]
fn enqueue_name_outside_include() {
    let sandbox = Sandbox::new();
    let source = sandbox.zip("session.bin", b"x");
    let run = sandbox.run(&["enqueue", source.to_str().unwrap()]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("include"), "{run:?}");
    assert!(!sandbox.outbox().exists());
}

#[test]
fn enqueue_without_files_is_usage_error() {
    let sandbox = Sandbox::new();
    let run = sandbox.run(&["enqueue"]);
    assert_eq!(run.code, 2, "{run:?}");
}

// ---------------------------------------------------------------------------
// check

/// Runs `check` against `url` with a token file holding `token_text`.
fn check_with_token(sandbox: &Sandbox, url: &str, token_text: &str) -> Run {
    let token_file = sandbox.token_file("token", token_text);
    sandbox.run(&[
        "check",
        "--server-url",
        url,
        "--token-file",
        token_file.to_str().unwrap(),
    ])
}

#[test]
fn check_good_token_passes() {
    let sandbox = Sandbox::new();
    let server = TestServer::start(201);
    let run = check_with_token(&sandbox, &server.url(), &format!("{TOKEN}\n"));
    assert_eq!(run.code, 0, "{run:?}");
    let probe = run
        .line("OK    probe")
        .unwrap_or_else(|| panic!("no OK probe line: {run:?}"));
    assert!(probe.contains("HTTP 201"), "{probe}");
    let fingerprint = run
        .line("OK    token ")
        .unwrap_or_else(|| panic!("no OK token line: {run:?}"));
    assert!(fingerprint.contains("fingerprint"), "{fingerprint}");
    assert!(run.line("FAIL").is_none(), "{run:?}");
    assert_eq!(server.probes(), 1, "check must send exactly one probe");
    assert_eq!(server.requests(), 1);
    assert_no_token(&run, TOKEN);
}

#[test]
fn check_probe_400_counts_as_reached() {
    let sandbox = Sandbox::new();
    let server = TestServer::start(400);
    let run = check_with_token(&sandbox, &server.url(), TOKEN);
    assert_eq!(
        run.code, 0,
        "a 400 answer to a probe means the token was not refused: {run:?}"
    );
    assert!(run.line("OK    probe").is_some(), "{run:?}");
}

#[test]
fn check_wrong_token_fails() {
    let sandbox = Sandbox::new();
    let server = TestServer::start(201);
    let run = check_with_token(&sandbox, &server.url(), WRONG_TOKEN);
    assert_eq!(run.code, 1, "{run:?}");
    let probe = run
        .line("FAIL  probe")
        .unwrap_or_else(|| panic!("no FAIL probe line: {run:?}"));
    assert!(probe.contains("token rejected"), "{probe}");
    assert!(probe.contains("401"), "{probe}");
    assert_no_token(&run, WRONG_TOKEN);
}

#[test]
fn check_forbidden_token_fails() {
    let sandbox = Sandbox::new();
    let server = TestServer::start(403);
    let run = check_with_token(&sandbox, &server.url(), TOKEN);
    assert_eq!(run.code, 1, "{run:?}");
    let probe = run
        .line("FAIL  probe")
        .unwrap_or_else(|| panic!("no FAIL probe line: {run:?}"));
    assert!(probe.contains("forbidden"), "{probe}");
    assert!(
        probe.contains("upload permission"),
        "the line must say what to do: {probe}"
    );
    assert_no_token(&run, TOKEN);
}

#[test]
fn check_missing_token_file_fails() {
    let sandbox = Sandbox::new();
    let server = TestServer::start(201);
    let absent = sandbox.path().join("no-such-token");
    let run = sandbox.run(&[
        "check",
        "--server-url",
        &server.url(),
        "--token-file",
        absent.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 1, "{run:?}");
    let token = run
        .line("FAIL  token")
        .unwrap_or_else(|| panic!("no FAIL token line: {run:?}"));
    assert!(
        token.contains("no-such-token"),
        "the line must name the path: {token}"
    );
    assert!(token.contains("does not exist"), "{token}");
    assert!(run.line("SKIP  probe").is_some(), "{run:?}");
    assert_eq!(
        server.requests(),
        0,
        "no request may be sent without a token"
    );
}

#[test]
fn check_bad_token_syntax_fails() {
    let cases = [
        (format!("\"{TOKEN}\"\n"), "quotes"),
        (format!("'{TOKEN}'"), "quotes"),
        (
            format!("export OUTBOXD_TOKEN={TOKEN}\n"),
            "shell assignment",
        ),
        (format!("OUTBOXD_TOKEN={TOKEN}\n"), "shell assignment"),
        (format!("{TOKEN}\n{TOKEN}\n"), "several lines"),
    ];
    let server = TestServer::start(201);
    for (contents, problem) in cases {
        let sandbox = Sandbox::new();
        let run = check_with_token(&sandbox, &server.url(), &contents);
        assert_eq!(run.code, 1, "{contents:?}: {run:?}");
        let line = run
            .line("FAIL  token")
            .unwrap_or_else(|| panic!("{contents:?}: no FAIL token line: {run:?}"));
        assert!(
            line.contains(problem),
            "{contents:?}: expected {problem:?} in {line}"
        );
        assert!(
            line.contains("token file"),
            "{contents:?}: the line must name the source: {line}"
        );
        assert!(run.line("SKIP  probe").is_some(), "{contents:?}: {run:?}");
        assert_no_token(&run, TOKEN);
    }
    assert_eq!(
        server.requests(),
        0,
        "no request may be sent with an invalid token"
    );
}

#[test]
fn check_token_from_environment() {
    let sandbox = Sandbox::new();
    let server = TestServer::start(201);
    let run = sandbox.run_with_env(
        &["check", "--server-url", &server.url()],
        &[("OUTBOXD_TOKEN", TOKEN)],
    );
    assert_eq!(run.code, 0, "{run:?}");
    let line = run
        .line("OK    token ")
        .unwrap_or_else(|| panic!("no OK token line: {run:?}"));
    assert!(
        line.contains("environment variable OUTBOXD_TOKEN"),
        "{line}"
    );
    assert_no_token(&run, TOKEN);
}

#[test]
fn check_wrong_url_fails() {
    let sandbox = Sandbox::new();
    let server = TestServer::start(201);
    let url = format!("http://{}/wrong-path", server.addr);
    let run = check_with_token(&sandbox, &url, TOKEN);
    assert_eq!(run.code, 1, "{run:?}");
    let probe = run
        .line("FAIL  probe")
        .unwrap_or_else(|| panic!("no FAIL probe line: {run:?}"));
    assert!(probe.contains("404"), "{probe}");
    assert!(
        probe.contains("server_url"),
        "the line must say to fix server_url: {probe}"
    );
}

#[test]
fn check_server_down_fails() {
    let sandbox = Sandbox::new();
    let run = check_with_token(&sandbox, &closed_port_url(), TOKEN);
    assert_eq!(run.code, 1, "{run:?}");
    let probe = run
        .line("FAIL  probe")
        .unwrap_or_else(|| panic!("no FAIL probe line: {run:?}"));
    assert!(probe.contains("cannot be reached"), "{probe}");
}

#[test]
fn check_plain_http_remote_refused() {
    let sandbox = Sandbox::new();
    let started = Instant::now();
    // The .invalid top-level domain never resolves, and the check must refuse
    // the URL before any lookup or connection anyway.
    let run = check_with_token(&sandbox, "http://uploads.example.invalid/upload", TOKEN);
    assert_eq!(run.code, 1, "{run:?}");
    let server = run
        .line("FAIL  server")
        .unwrap_or_else(|| panic!("no FAIL server line: {run:?}"));
    assert!(server.contains("clear text"), "{server}");
    assert!(
        server.contains("https://"),
        "the line must say what to do: {server}"
    );
    assert!(run.line("SKIP  probe").is_some(), "{run:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the check took {:?}",
        started.elapsed()
    );
    assert_no_token(&run, TOKEN);
}

#[test]
fn check_reports_folder_mode() {
    let sandbox = Sandbox::new();
    let server = TestServer::start(201);
    std::fs::create_dir_all(sandbox.outbox()).unwrap();
    std::fs::set_permissions(sandbox.outbox(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = check_with_token(&sandbox, &server.url(), TOKEN);
    assert_eq!(
        run.code, 0,
        "a wide mode is a warning, not a failure: {run:?}"
    );
    let line = run
        .line("WARN  outbox")
        .unwrap_or_else(|| panic!("no WARN outbox line: {run:?}"));
    assert!(line.contains("0755"), "{line}");
    assert!(line.contains("chmod 700"), "{line}");
}

#[test]
fn check_invalid_config_fails() {
    let sandbox = Sandbox::new();
    let server = TestServer::start(201);
    let config = sandbox.path().join("config.toml");
    std::fs::write(&config, "concurrency = \"two\"\n").unwrap();
    let token_file = sandbox.token_file("token", TOKEN);
    let run = sandbox.run(&[
        "check",
        "--config",
        config.to_str().unwrap(),
        "--server-url",
        &server.url(),
        "--token-file",
        token_file.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 1, "{run:?}");
    let line = run
        .line("FAIL  config")
        .unwrap_or_else(|| panic!("no FAIL config line: {run:?}"));
    assert!(line.contains("config.toml"), "{line}");
}

// ---------------------------------------------------------------------------
// status and list without a daemon, completions, man

#[test]
fn status_without_daemon_exits_3() {
    let sandbox = Sandbox::new();
    let run = sandbox.run(&["status"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stdout.starts_with("outboxd:      NOT RUNNING"),
        "{run:?}"
    );
    let report = sandbox.status_json();
    assert_eq!(report["daemon"]["running"], false);
    assert_eq!(report["auth"]["state"], "unknown");
    assert_eq!(report["queue"]["pending"], 0);
    assert!(
        !sandbox.state_dir().exists(),
        "status must not create the state dir"
    );
}

#[test]
fn list_without_daemon_works() {
    let sandbox = Sandbox::new();
    let run = sandbox.run(&["list"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("not running"), "{run:?}");
    assert_eq!(sandbox.list_json(&[]), Vec::<serde_json::Value>::new());
    let invalid = sandbox.run(&["list", "--state", "lost"]);
    assert_eq!(
        invalid.code, 2,
        "an unknown state is a usage error: {invalid:?}"
    );
}

#[test]
fn retry_without_daemon_fails() {
    let sandbox = Sandbox::new();
    let run = sandbox.run(&["retry"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("not running"), "{run:?}");
}

#[test]
fn completions_bash_produce_script() {
    let sandbox = Sandbox::new();
    let run = sandbox.run(&["completions", "bash"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("complete -F"),
        "not a bash completion script: {}",
        run.stdout
    );
    assert!(run.stdout.contains("enqueue"), "subcommands are missing");
    let unknown = sandbox.run(&["completions", "cmd.exe"]);
    assert_eq!(unknown.code, 2, "{unknown:?}");
}

#[test]
fn man_prints_roff() {
    let sandbox = Sandbox::new();
    let run = sandbox.run(&["man"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains(".TH outboxd 1"),
        "no roff title: {}",
        run.stdout
    );
    assert!(run.stdout.contains(".SH SUBCOMMANDS"), "{}", run.stdout);
    let status = sandbox.run(&["man", "status"]);
    assert_eq!(status.code, 0, "{status:?}");
    assert!(
        status.stdout.contains(".TH outboxd-status 1"),
        "{}",
        status.stdout
    );
    let unknown = sandbox.run(&["man", "nope"]);
    assert_eq!(unknown.code, 2, "{unknown:?}");
}

// ---------------------------------------------------------------------------
// With a running daemon

/// Returns the `list --json` row of `file`, if any.
fn row_of(sandbox: &Sandbox, file: &str) -> Option<serde_json::Value> {
    sandbox
        .list_json(&[])
        .into_iter()
        .find(|row| row["file"] == file)
}

#[test]
fn list_and_retry_clear_backoff() {
    let sandbox = Sandbox::new();
    let server = TestServer::start(500);
    let token_file = sandbox.token_file("token", TOKEN);
    let daemon = Daemon::start(&sandbox, &server.url(), &token_file);

    let source = sandbox.zip("s-010.zip", b"retry me");
    assert_eq!(sandbox.run(&["enqueue", source.to_str().unwrap()]).code, 0);
    let failed_once = wait_until(STEP_TIMEOUT, || {
        row_of(&sandbox, "s-010.zip").is_some_and(|row| row["attempts"] == 1)
    });
    assert!(
        failed_once,
        "the upload was not tried; log:\n{}",
        sandbox.log()
    );

    let row = row_of(&sandbox, "s-010.zip").unwrap();
    assert_eq!(row["state"], "pending", "{row}");
    assert!(
        row["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("HTTP 500"),
        "{row}"
    );
    assert!(
        row["next_attempt_at"].is_string(),
        "a failed item has a next attempt: {row}"
    );
    let text = sandbox.run(&["list"]);
    assert_eq!(text.code, 0, "{text:?}");
    let line = text
        .stdout
        .lines()
        .find(|l| l.contains("s-010.zip"))
        .unwrap_or_else(|| panic!("{text:?}"));
    assert!(
        line.contains(" in "),
        "the next attempt must be relative, like `in 59s`: {line}"
    );

    server.set_status(201);
    let id = row["id"].as_str().unwrap().to_string();
    let retry = sandbox.run(&["retry", &id]);
    assert_eq!(retry.code, 0, "{retry:?}");
    assert!(
        retry.stdout.contains("cleared the backoff of 1 item"),
        "{retry:?}"
    );
    // The backoff is 60 s, so only the retry can make the upload happen now.
    let uploaded = wait_until(STEP_TIMEOUT, || {
        !sandbox.outbox().join("s-010.zip").exists()
    });
    assert!(
        uploaded,
        "retry did not lead to an upload; log:\n{}",
        sandbox.log()
    );
    let row = row_of(&sandbox, "s-010.zip").unwrap();
    assert_eq!(row["state"], "uploaded", "{row}");

    let unknown = sandbox.run(&["retry", "999999"]);
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert!(unknown.stderr.contains("999999"), "{unknown:?}");

    // After a stop, list reads the state dir.
    assert_eq!(daemon.stop(), Some(0), "log:\n{}", sandbox.log());
    let offline = sandbox.run(&["list"]);
    assert_eq!(offline.code, 0, "{offline:?}");
    assert!(offline.stderr.contains("not running"), "{offline:?}");
    assert!(offline.stdout.contains("s-010.zip"), "{offline:?}");
    let status = sandbox.run(&["status"]);
    assert_eq!(status.code, 3, "{status:?}");
}

#[test]
fn retry_rejected_requeues_files() {
    let sandbox = Sandbox::new();
    let server = TestServer::start(422);
    let token_file = sandbox.token_file("token", TOKEN);
    let _daemon = Daemon::start(&sandbox, &server.url(), &token_file);

    let source = sandbox.zip("s-020.zip", b"rejected once");
    assert_eq!(sandbox.run(&["enqueue", source.to_str().unwrap()]).code, 0);
    let rejected = sandbox.outbox().join("rejected/s-020.zip");
    assert!(
        wait_until(STEP_TIMEOUT, || rejected.exists()),
        "the file was not rejected; log:\n{}",
        sandbox.log()
    );

    let rows = sandbox.list_json(&["--state", "rejected"]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["file"], "s-020.zip");
    assert!(
        rows[0]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("HTTP 422"),
        "the reason is missing: {rows:?}"
    );
    let text = sandbox.run(&["list", "--state", "rejected"]);
    assert!(text.stdout.contains("HTTP 422"), "{text:?}");
    let status = sandbox.run(&["status"]);
    assert_eq!(status.code, 2, "rejected files need attention: {status:?}");
    assert!(status.stdout.contains("1 rejected"), "{status:?}");

    server.set_status(201);
    let retry = sandbox.run(&["retry", "--rejected"]);
    assert_eq!(retry.code, 0, "{retry:?}");
    assert!(retry.stdout.contains("moved 1 file"), "{retry:?}");
    let uploaded = wait_until(STEP_TIMEOUT, || {
        !rejected.exists() && !sandbox.outbox().join("s-020.zip").exists() && server.requests() >= 2
    });
    assert!(
        uploaded,
        "the rejected file was not uploaded again; log:\n{}",
        sandbox.log()
    );
    assert!(
        !sandbox.outbox().join("rejected/s-020.zip.reason").exists(),
        "the reason file must go too"
    );
    assert_eq!(sandbox.run(&["status"]).code, 0);
}

#[test]
fn status_shows_token_hold() {
    let sandbox = Sandbox::new();
    let server = TestServer::start(201);
    let token_file = sandbox.token_file("token", WRONG_TOKEN);
    let _daemon = Daemon::start(&sandbox, &server.url(), &token_file);

    let source = sandbox.zip("s-030.zip", b"held");
    assert_eq!(sandbox.run(&["enqueue", source.to_str().unwrap()]).code, 0);
    let held = wait_until(STEP_TIMEOUT, || {
        sandbox.status_json()["auth"]["state"] == "token_rejected"
    });
    assert!(held, "no hold; log:\n{}", sandbox.log());

    let status = sandbox.run(&["status"]);
    assert_eq!(status.code, 2, "{status:?}");
    let first = status.stdout.lines().next().unwrap_or("");
    assert!(first.contains("ON HOLD"), "{first}");
    assert!(first.contains("rejected the upload token"), "{first}");
    assert!(status.stdout.contains("next probe in"), "{status:?}");
    assert_no_token(&status, WRONG_TOKEN);

    let list = sandbox.run(&["list"]);
    let line = list
        .stdout
        .lines()
        .find(|l| l.contains("s-030.zip"))
        .unwrap_or_else(|| panic!("{list:?}"));
    assert!(line.contains("held"), "a held item must say so: {line}");
    assert!(
        sandbox.outbox().join("s-030.zip").exists(),
        "a held file must stay in the outbox"
    );

    // check finds the running daemon and reports the same fault.
    let check = sandbox.run(&[
        "check",
        "--server-url",
        &server.url(),
        "--token-file",
        token_file.to_str().unwrap(),
    ]);
    assert_eq!(check.code, 1, "{check:?}");
    assert!(
        check
            .line("OK    daemon")
            .is_some_and(|l| l.contains("pid")),
        "{check:?}"
    );
    assert!(
        check
            .line("FAIL  probe")
            .is_some_and(|l| l.contains("token rejected")),
        "{check:?}"
    );
    assert_no_token(&check, WRONG_TOKEN);
}

#[test]
fn status_watch_refreshes_until_interrupt() {
    let sandbox = Sandbox::new();
    let mut child = sandbox
        .command(&["status", "--watch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting status --watch");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .take(2)
            .collect::<Vec<String>>()
    });
    let lines = reader.join().unwrap();

    // SAFETY: kill has no memory-safety preconditions; the pid is our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let exited = wait_until(STEP_TIMEOUT, || matches!(child.try_wait(), Ok(Some(_))));
    if !exited {
        let _ = child.kill();
    }
    assert!(exited, "status --watch did not stop on SIGINT");

    assert_eq!(lines.len(), 2, "expected two refreshes: {lines:?}");
    for line in &lines {
        let report: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line}"));
        assert_eq!(report["daemon"]["running"], false, "{line}");
    }
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(3), "the exit code is the last refresh's");
}

#[test]
fn check_warns_unit_without_linger() {
    let sandbox = Sandbox::new();
    let server = TestServer::start(201);
    let units = sandbox.path().join("home/.config/systemd/user");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::write(units.join("outboxd.service"), "[Service]\nType=notify\n").unwrap();

    let run = check_with_token(&sandbox, &server.url(), TOKEN);

    // The linger flag is a file per user name; this test runs as whichever
    // user CI uses, so the expectation follows the machine's real state.
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let lingering = std::fs::read_dir("/var/lib/systemd/linger")
        .map(|entries| {
            entries.filter_map(Result::ok).any(|entry| {
                std::fs::metadata(entry.path()).is_ok()
                    && users_match(&entry.file_name().to_string_lossy(), uid)
            })
        })
        .unwrap_or(false);
    let warning = run.line("WARN  linger");
    if lingering {
        assert!(warning.is_none(), "linger is on, yet check warned: {run:?}");
    } else {
        let warning = warning.unwrap_or_else(|| panic!("no linger warning: {run:?}"));
        assert!(
            warning.contains("enable-linger"),
            "the warning names the fix: {warning}"
        );
    }
}

/// True when the user `name` has the uid `uid`, by /etc/passwd.
fn users_match(name: &str, uid: u32) -> bool {
    std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            Some((
                fields.first()?.to_string(),
                fields.get(2)?.parse::<u32>().ok()?,
            ))
        })
        .any(|(user, id)| user == name && id == uid)
}

#[test]
fn enqueue_fifo_and_folder_are_refused() {
    let sandbox = Sandbox::new();
    let fifo = sandbox.path().join("src/pipe.zip");
    let fifo_c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(fifo_c.as_ptr(), 0o600) },
        0,
        "mkfifo failed"
    );
    let folder = sandbox.path().join("src/folder.zip");
    std::fs::create_dir(&folder).unwrap();

    // Opening a fifo blocks until a writer comes: a regression shows as a hang.
    let started = std::time::Instant::now();
    let run = sandbox.run(&["enqueue", fifo.to_str().unwrap(), folder.to_str().unwrap()]);

    assert!(
        started.elapsed() < Duration::from_secs(10),
        "enqueue took {:?}",
        started.elapsed()
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("pipe.zip is not a regular file"),
        "{run:?}"
    );
    assert!(run.stderr.contains("folder.zip is a folder"), "{run:?}");
    assert!(!sandbox.outbox().exists(), "the outbox must stay untouched");
}
