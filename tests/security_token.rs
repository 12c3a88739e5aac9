//! Security tests of the upload token, against the real daemon binary: the
//! token never reaches a log line, `status`, `list` or a reason file, an
//! invalid token puts the queue on hold before any request, and a token file
//! that other users can read or change is reported.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::Duration;

use common::fault_server::{FaultServer, Reply};
use common::{archive, run_args, sha256_hex, wait_until, Daemon, Home, Status, TOKEN};

/// Time for the daemon to reach a state that it should enter at once.
const STATE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time for an archive to reach the server once nothing blocks it.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);

/// Time a daemon gets to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Time that an idle daemon's log is watched for growth.
const IDLE_WINDOW: Duration = Duration::from_secs(1);

/// Maximum growth of an idle daemon's TRACE log in `IDLE_WINDOW`. A log that
/// records its own writes grows by megabytes in that time.
const MAX_IDLE_LOG_GROWTH: u64 = 64 * 1024;

/// Lines of a failing test's daemon log that are printed.
const LOG_TAIL_LINES: usize = 300;

/// A daemon started with `RUST_LOG=trace`, which `Daemon` cannot do because
/// its commands set `RUST_LOG=debug`. Its stderr goes to `log_path`.
struct TracedDaemon {
    home: Home,
    log_path: PathBuf,
    child: Option<Child>,
}

impl TracedDaemon {
    /// Starts `outboxd run` on the home's outbox and state dir with `args`,
    /// and `env` set, and waits until it is ready.
    fn start(home: Home, args: &[String], env: &[(&str, &str)]) -> TracedDaemon {
        let log_path = home.path.join("logs").join("trace.stderr");
        TracedDaemon::start_logging_to(home, log_path, args, env)
    }

    /// Starts the daemon like `start`, with its stderr in `log_path`.
    fn start_logging_to(
        home: Home,
        log_path: PathBuf,
        args: &[String],
        env: &[(&str, &str)],
    ) -> TracedDaemon {
        if let Some(folder) = log_path.parent() {
            fs::create_dir_all(folder).expect("creating the log folder failed");
        }
        let stderr = File::create(&log_path).expect("creating the daemon log failed");

        let mut command = home.command("run");
        command
            .env("RUST_LOG", "trace")
            .arg("--outbox")
            .arg(&home.outbox)
            .arg("--state-dir")
            .arg(&home.state_dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(stderr);
        for (name, value) in env {
            command.env(name, value);
        }

        let child = command.spawn().expect("spawning outboxd run failed");
        let pid = i64::from(child.id());
        let daemon = TracedDaemon {
            home,
            log_path,
            child: Some(child),
        };
        let ready = wait_until(READY_TIMEOUT, || {
            let status = daemon.home.status();
            status.flag("/daemon/running") == Some(true)
                && status.number("/daemon/pid") == Some(pid)
        });
        assert!(ready, "the daemon (pid {pid}) did not become ready");
        daemon
    }

    fn status(&self) -> Status {
        self.home.status()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn sighup(&self) {
        let pid = self.child.as_ref().expect("the daemon runs").id() as libc::pid_t;
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0, "SIGHUP failed");
    }
}

impl Drop for TracedDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            let kept =
                std::env::temp_dir().join(format!("outboxd-trace-{}.log", std::process::id()));
            if fs::copy(&self.log_path, &kept).is_ok() {
                eprintln!("--- daemon log kept at {} ---", kept.display());
            }
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let skipped = lines.len().saturating_sub(LOG_TAIL_LINES);
            eprintln!("--- daemon log, first {skipped} lines skipped ---");
            for line in &lines[skipped..] {
                eprintln!("{line}");
            }
        }
    }
}

/// Runs an `outboxd` command on the home's state dir and returns what it printed.
fn run_cli(home: &Home, arguments: &[&str]) -> String {
    let output = home
        .command(arguments[0])
        .args(&arguments[1..])
        .arg("--state-dir")
        .arg(&home.state_dir)
        .output()
        .expect("running outboxd failed");
    format!(
        "$ outboxd {}\n{}{}",
        arguments.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Captures every output of the command line that could show the token.
fn cli_outputs(home: &Home) -> String {
    [
        run_cli(home, &["status"]),
        run_cli(home, &["status", "--json"]),
        run_cli(home, &["list"]),
        run_cli(home, &["list", "--json"]),
    ]
    .join("\n")
}

fn wait_for_auth(status: impl Fn() -> Status, state: &str) -> Status {
    let mut last = status();
    wait_until(STATE_TIMEOUT, || {
        last = status();
        last.auth_state().as_deref() == Some(state)
    });
    assert_eq!(
        last.auth_state().as_deref(),
        Some(state),
        "auth.state: {}",
        last.stdout
    );
    last
}

/// Writes `bytes` to `path` through a temporary file and a rename, as a
/// deployment tool would.
fn replace_file(path: &Path, bytes: &[u8]) {
    let temp = path.with_extension("tmp");
    fs::write(&temp, bytes).expect("writing the temporary file failed");
    fs::rename(&temp, path).expect("renaming the file into place failed");
}

/// Counts the log lines per level and target, for failure messages.
fn log_targets(log: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in log.lines() {
        let mut words = line.split_whitespace().skip(1);
        if let (Some(level), Some(target)) = (words.next(), words.next()) {
            *counts.entry(format!("{level} {target}")).or_insert(0) += 1;
        }
    }
    counts
}

/// Returns the lines of `text` that contain `needle`.
fn lines_with<'a>(text: &'a str, needle: &str) -> Vec<&'a str> {
    text.lines().filter(|line| line.contains(needle)).collect()
}

#[test]
fn token_absent_from_trace_logs_and_outputs() {
    let server = FaultServer::with_token(TOKEN);
    let elsewhere = FaultServer::start();
    let home = Home::new();
    let token_file = home.token_file.display().to_string();
    let args = run_args(
        &server.url(),
        &["--token-file", &token_file, "--auth-probe-ms", "300"],
    );
    let daemon = TracedDaemon::start(home, &args, &[]);
    let home = &daemon.home;
    let mut outputs = Vec::new();
    // A server that echoes the request, as some error pages and debugging
    // proxies do, puts the token into its response body.
    let echo = format!("request dump: Authorization: Bearer {TOKEN}");

    // Success.
    let first = archive("first", 2048);
    home.drop_zip("first.zip", &first);
    assert!(
        wait_until(DELIVERY_TIMEOUT, || server.delivered(&sha256_hex(&first))
            == 1),
        "first.zip was not delivered:\n{}",
        server.summary()
    );
    outputs.push(cli_outputs(home));

    // 401: the server no longer accepts the token.
    server.set_token(Some("a-token-the-daemon-does-not-have"));
    let second = archive("second", 2048);
    home.drop_zip("second.zip", &second);
    wait_for_auth(|| daemon.status(), "token_rejected");
    outputs.push(cli_outputs(home));

    // 500 with the echo, then success on the next attempt.
    server.set_token(Some(TOKEN));
    server.push_next(Reply::status(500).with_body(&echo));
    outputs.push(run_cli(home, &["retry"]));
    assert!(
        wait_until(DELIVERY_TIMEOUT, || server.count_status(500) == 1),
        "no 500 was sent:\n{}",
        server.summary()
    );
    outputs.push(cli_outputs(home));
    assert!(
        wait_until(DELIVERY_TIMEOUT, || server.delivered(&sha256_hex(&second))
            == 1),
        "second.zip was not delivered after the 500:\n{}",
        server.summary()
    );

    // 400 with the echo: the file goes to rejected/ with the body in its reason.
    server.push_for_file("third.zip", [Reply::status(400).with_body(&echo)]);
    home.drop_zip("third.zip", &archive("third", 2048));
    assert!(
        wait_until(DELIVERY_TIMEOUT, || home
            .rejected_reason("third.zip")
            .is_some()),
        "third.zip was not rejected:\n{}",
        server.summary()
    );
    let reason = home.rejected_reason("third.zip").unwrap_or_default();
    assert!(
        reason.contains("request dump: Authorization: Bearer <redacted>"),
        "the reason does not show the redacted echo: {reason:?}"
    );
    outputs.push(reason);
    outputs.push(cli_outputs(home));

    // A redirect whose target carries the token in its query.
    let target = format!("{}?token={TOKEN}", elsewhere.url());
    server.push_next(Reply::redirect(&target));
    home.drop_zip("fourth.zip", &archive("fourth", 2048));
    let held = wait_for_auth(|| daemon.status(), "config_error");
    let detail = held.text("/auth/detail").unwrap_or_default();
    assert!(
        detail.contains("token=<redacted>"),
        "the redirect detail does not show the redacted target: {detail:?}"
    );
    outputs.push(cli_outputs(home));

    // A config file with the token under a key that does not exist. The reload
    // is rejected and the running configuration is kept.
    let config_dir = home.path.join("config").join("outboxd");
    fs::create_dir_all(&config_dir).expect("creating the config folder failed");
    fs::write(
        config_dir.join("config.toml"),
        format!("token = \"{TOKEN}\"\n"),
    )
    .expect("writing the config file failed");
    daemon.sighup();
    assert!(
        wait_until(STATE_TIMEOUT, || daemon
            .log()
            .contains("the new configuration is rejected")),
        "the reload with the bad config file was not logged"
    );
    outputs.push(cli_outputs(home));
    outputs.push(run_cli(home, &["retry"]));

    assert_eq!(
        elsewhere.request_count(),
        0,
        "requests at the redirect target:\n{}",
        elsewhere.summary()
    );
    // The token was sent, so its absence below is not for want of use.
    assert!(
        server
            .requests()
            .iter()
            .any(|request| request.authorization.as_deref() == Some(&format!("Bearer {TOKEN}"))),
        "no request carried the token:\n{}",
        server.summary()
    );
    let log = daemon.log();
    // The run logged at TRACE from the HTTP client, where a header could leak.
    // hyper itself emits no events unless built with `hyper_unstable_tracing`.
    let http_trace = log
        .lines()
        .filter(|line| line.contains(" TRACE ") && line.contains("hyper_util::"))
        .count();
    assert!(
        http_trace > 0,
        "no TRACE line from hyper_util in the log: {:?}",
        log_targets(&log)
    );
    assert!(
        !lines_with(&log, "reqwest::").is_empty(),
        "no line from reqwest in the log: {:?}",
        log_targets(&log)
    );
    assert_eq!(
        lines_with(&log, TOKEN),
        Vec::<&str>::new(),
        "log lines that contain the token"
    );
    let outputs = outputs.join("\n");
    assert!(
        outputs.contains("<redacted>"),
        "no output shows the redacted echo, so the echo was not exercised:\n{outputs}"
    );
    assert_eq!(
        lines_with(&outputs, TOKEN),
        Vec::<&str>::new(),
        "command outputs that contain the token"
    );
}

#[test]
fn token_in_token_env_never_shown() {
    let server = FaultServer::start();
    let home = Home::without_token();
    let args = run_args(&server.url(), &[]);
    // An operator who pasted the token where the variable name belongs.
    let daemon = TracedDaemon::start(home, &args, &[("OUTBOXD_TOKEN_ENV", TOKEN)]);
    let home = &daemon.home;
    home.drop_zip("held.zip", &archive("held", 1024));

    let status = wait_for_auth(|| daemon.status(), "token_invalid");
    let detail = status.text("/auth/detail").unwrap_or_default();
    assert!(
        detail.contains("token_env"),
        "auth.detail does not name token_env: {detail:?}"
    );
    let outputs = cli_outputs(home);
    thread::sleep(Duration::from_millis(500));
    assert_eq!(server.request_count(), 0, "requests:\n{}", server.summary());
    assert_eq!(
        lines_with(&daemon.log(), TOKEN),
        Vec::<&str>::new(),
        "log lines that contain the token"
    );
    assert_eq!(
        lines_with(&outputs, TOKEN),
        Vec::<&str>::new(),
        "command outputs that contain the token"
    );
}

/// Invalid contents of the token file: a name for the case, the bytes, and the
/// part of the problem that `auth.detail` must contain. Every value contains
/// `s3cr3t`, which must appear nowhere.
const INVALID_TOKEN_FILES: &[(&str, &[u8], &str)] = &[
    ("empty", b"", "empty"),
    ("whitespace only", b" \t \n", "empty"),
    ("double quotes", b"\"s3cr3t\"\n", "quotes"),
    ("one single quote", b"'s3cr3t\n", "quotes"),
    (
        "export",
        b"export OUTBOXD_TOKEN=s3cr3t\n",
        "shell assignment",
    ),
    ("assignment", b"OUTBOXD_TOKEN=s3cr3t\n", "shell assignment"),
    ("$NAME", b"$s3cr3t\n", "$NAME"),
    ("${NAME}", b"${s3cr3t}\n", "$NAME"),
    ("CRLF", b"s3cr3t\r\n", "carriage return"),
    ("escape character", b"s3cr3t\x1b[0m\n", "control character"),
    ("several lines", b"s3cr3t\nsecond-line\n", "several lines"),
    ("byte order mark", b"\xef\xbb\xbfs3cr3t\n", "non-ASCII"),
    ("not UTF-8", b"s3cr3t\xff\xfe\n", "UTF-8"),
];

#[test]
fn invalid_token_file_holds_table() {
    let server = FaultServer::with_token(TOKEN);
    let home = Home::without_token();
    let (_, first, _) = INVALID_TOKEN_FILES[0];
    replace_file(&home.token_file, first);
    let token_path = home.token_file.display().to_string();
    let daemon = Daemon::start_in(home, &run_args(&server.url(), &[]));
    let home = daemon.home();
    let held = archive("held", 4096);
    home.drop_zip("held.zip", &held);

    for (index, (case, bytes, problem)) in INVALID_TOKEN_FILES.iter().enumerate() {
        if index > 0 {
            // A missing file in between makes each case a change of state
            // that the wait below can see.
            fs::remove_file(&home.token_file).expect("removing the token file failed");
            wait_for_auth(|| daemon.status(), "token_missing");
            replace_file(&home.token_file, bytes);
        }
        let mut status = daemon.status();
        wait_until(STATE_TIMEOUT, || {
            status = daemon.status();
            status.auth_state().as_deref() == Some("token_invalid")
                && status
                    .text("/auth/detail")
                    .is_some_and(|detail| detail.contains(problem))
        });
        let detail = status.text("/auth/detail").unwrap_or_default();
        assert_eq!(
            status.auth_state().as_deref(),
            Some("token_invalid"),
            "{case}: auth.state: {}",
            status.stdout
        );
        assert!(detail.contains(problem), "{case}: auth.detail: {detail:?}");
        assert!(
            detail.contains(&token_path),
            "{case}: auth.detail does not name the token file: {detail:?}"
        );
        assert!(
            !status.stdout.contains("s3cr3t"),
            "{case}: status shows the value: {}",
            status.stdout
        );
        assert_eq!(status.code, Some(2), "{case}: status exit code");
        assert_eq!(
            server.request_count(),
            0,
            "{case}: requests during the hold:\n{}",
            server.summary()
        );
    }

    // A valid token ends the hold, so the count above could have moved.
    replace_file(&home.token_file, format!("{TOKEN}\n").as_bytes());
    assert!(
        wait_until(DELIVERY_TIMEOUT, || server.delivered(&sha256_hex(&held))
            == 1),
        "held.zip was not delivered after the token was fixed:\n{}",
        server.summary()
    );
    assert_eq!(
        lines_with(&daemon.stderr(), "s3cr3t"),
        Vec::<&str>::new(),
        "log lines that contain an invalid value"
    );
}

#[test]
fn token_file_permissions_warned() {
    let server = FaultServer::with_token(TOKEN);
    let home = Home::new();
    fs::set_permissions(&home.token_file, fs::Permissions::from_mode(0o644))
        .expect("chmod of the token file failed");
    let token_path = home.token_file.display().to_string();
    let mut daemon = Daemon::start_in(home, &run_args(&server.url(), &[]));

    let status = daemon.status();
    let warnings = status
        .json()
        .and_then(|json| json.pointer("/warnings").cloned());
    let warnings = warnings.map(|w| w.to_string()).unwrap_or_default();
    assert!(
        warnings.contains("mode 0644") && warnings.contains(&token_path),
        "status warnings do not report the readable token file: {warnings}"
    );
    let logged = lines_with(&daemon.stderr(), "other users can read it")
        .iter()
        .filter(|line| line.contains("WARN"))
        .count();
    assert_eq!(logged, 1, "WARN lines about the readable token file");

    // A warning is no hold: uploads go on.
    let sent = archive("sent-despite-warning", 1024);
    daemon.home().drop_zip("sent.zip", &sent);
    assert!(
        wait_until(DELIVERY_TIMEOUT, || server.delivered(&sha256_hex(&sent))
            == 1),
        "sent.zip was not delivered:\n{}",
        server.summary()
    );

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped the ownership case: changing a file's owner needs root");
        return;
    }
    let token_file = daemon.home().token_file.clone();
    fs::set_permissions(&token_file, fs::Permissions::from_mode(0o600))
        .expect("chmod of the token file failed");
    std::os::unix::fs::chown(&token_file, Some(65534), None).expect("chown failed");
    daemon.kill9();
    daemon.restart();
    let status = daemon.status();
    let warnings = status
        .json()
        .and_then(|json| json.pointer("/warnings").cloned());
    let warnings = warnings.map(|w| w.to_string()).unwrap_or_default();
    assert!(
        warnings.contains("owned by uid 65534"),
        "status warnings do not report the owner: {warnings}"
    );
    assert!(
        !warnings.contains("mode 0644"),
        "status still warns about the old mode: {warnings}"
    );
    let logged = lines_with(&daemon.stderr(), "owned by uid 65534")
        .iter()
        .filter(|line| line.contains("WARN"))
        .count();
    assert_eq!(logged, 1, "WARN lines about the token file's owner");
}

#[test]
fn trace_log_beside_token_file_stays_small() {
    let server = FaultServer::with_token(TOKEN);
    let home = Home::new();
    // The daemon watches the token file's folder, and so sees every write to
    // a log file kept there.
    let log_path = home.path.join("daemon-trace.log");
    let token_file = home.token_file.display().to_string();
    let args = run_args(&server.url(), &["--token-file", &token_file]);
    let daemon = TracedDaemon::start_logging_to(home, log_path.clone(), &args, &[]);
    let size = || fs::metadata(&log_path).map_or(0, |metadata| metadata.len());

    thread::sleep(Duration::from_millis(300));
    let before = size();
    thread::sleep(IDLE_WINDOW);
    let growth = size().saturating_sub(before);
    assert!(
        growth < MAX_IDLE_LOG_GROWTH,
        "the idle daemon logged {growth} bytes in {IDLE_WINDOW:?}: {:?}",
        log_targets(&daemon.log())
    );
    // Tracing is still on for the daemon itself.
    assert!(
        daemon.log().contains("TRACE"),
        "no TRACE line in the log: {:?}",
        log_targets(&daemon.log())
    );
}
