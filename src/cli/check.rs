//! `outboxd check`: a doctor that looks at everything `run` depends on, with
//! the same settings: the config file, the token source, the folders, whether
//! a daemon runs, the server URL, and one authenticated probe request.
//!
//! It changes nothing: it creates no folder, takes no lock and writes no file,
//! so that it can run next to a daemon, or while one starts.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::colour_enabled;
use super::offline::lock_holder;
use crate::config::{self, Loaded, RawSettings, Settings};
use crate::control::{self, ClientError, Request};
use crate::outcome::{HoldKind, Outcome};
use crate::status::{paint, StatusReport, Tone};
use crate::timefmt::short_duration;
use crate::token::{self, Token, TokenLookup, TokenSource};
use crate::upload::{self, Uploader};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    Warn,
    Fail,
    /// Not tried, because a check it depends on failed.
    Skip,
}

/// Prints one line per finding as it is made and counts the failures.
struct Findings {
    colour: bool,
    failed: usize,
    warned: usize,
}

impl Findings {
    fn report(&mut self, level: Level, topic: &str, message: &str) {
        let (label, tone) = match level {
            Level::Ok => ("OK", Tone::Good),
            Level::Warn => ("WARN", Tone::Warn),
            Level::Fail => ("FAIL", Tone::Bad),
            Level::Skip => ("SKIP", Tone::Dim),
        };
        match level {
            Level::Fail => self.failed += 1,
            Level::Warn => self.warned += 1,
            Level::Ok | Level::Skip => {}
        }
        println!(
            "{}  {topic:<10}  {message}",
            paint(&format!("{label:<4}"), tone, self.colour)
        );
    }
}

/// `outboxd check`. Returns 0 when no check failed, 1 otherwise.
pub async fn check(config_flag: Option<PathBuf>, flags: RawSettings) -> i32 {
    let loaded = config::load_from_process(config_flag.as_deref(), flags);
    let settings = &loaded.settings;
    let mut findings = Findings {
        colour: colour_enabled(),
        failed: 0,
        warned: 0,
    };

    check_config(&mut findings, config_flag.as_deref(), &loaded);
    let token = check_token(&mut findings, settings);
    check_folder(
        &mut findings,
        "outbox",
        "outbox",
        &settings.outbox,
        "the archives",
    );
    check_rejected(&mut findings, &settings.outbox);
    check_folder(
        &mut findings,
        "state dir",
        "state_dir",
        &settings.state_dir,
        "the queue and the control socket",
    );
    check_daemon(&mut findings, settings).await;
    if let Some(warning) = crate::service::linger_warning() {
        findings.report(Level::Warn, "linger", &warning);
    }
    let uploader = check_server(&mut findings, settings);
    probe(&mut findings, uploader, token, settings).await;

    println!();
    if findings.failed > 0 {
        println!(
            "{} check(s) failed; fix the FAIL lines above, then run `outboxd check` again",
            findings.failed
        );
        1
    } else if findings.warned > 0 {
        println!("no check failed; {} warning(s)", findings.warned);
        0
    } else {
        println!("all checks passed");
        0
    }
}

fn check_config(findings: &mut Findings, flag: Option<&Path>, loaded: &Loaded) {
    let (path, explicit) = config::config_path(flag, &|name: &str| std::env::var(name).ok());
    // Problems with server_url are reported under "server".
    let problems: Vec<&String> = loaded
        .problems
        .iter()
        .filter(|p| !p.starts_with("server_url"))
        .collect();
    let file_unusable = problems.iter().any(|p| p.starts_with("config file "));
    if path.is_file() && !file_unusable {
        findings.report(
            Level::Ok,
            "config",
            &format!("{} read and parsed", path.display()),
        );
    } else if !path.exists() && !explicit {
        findings.report(
            Level::Ok,
            "config",
            &format!(
                "no config file at {}; the defaults, OUTBOXD_* variables and flags apply",
                path.display()
            ),
        );
    }
    for problem in problems {
        findings.report(
            Level::Fail,
            "config",
            &format!("{problem} (the daemon holds every upload until this is fixed)"),
        );
    }
}

/// Reports where the token comes from and whether it is valid, and returns it.
fn check_token(findings: &mut Findings, settings: &Settings) -> Option<Token> {
    match token::lookup_from_process(&settings.token) {
        TokenLookup::Found {
            token,
            source,
            warnings,
        } => {
            findings.report(
                Level::Ok,
                "token",
                &format!("read from {source}, fingerprint {}", token.fingerprint()),
            );
            if let TokenSource::File(path) | TokenSource::Credential(path) = &source {
                report_token_file(findings, path, &warnings);
            }
            Some(token)
        }
        TokenLookup::Missing(text) => {
            findings.report(Level::Fail, "token", &text);
            None
        }
        TokenLookup::Invalid(text) => {
            findings.report(Level::Fail, "token", &text);
            if let Some(path) = token_file_path(settings).filter(|p| p.is_file()) {
                report_token_file(findings, &path, &token::permission_warnings(&path));
            }
            None
        }
    }
}

/// Returns the token file that the lookup reads, if any: `token_file`, or the
/// systemd credential when it exists.
fn token_file_path(settings: &Settings) -> Option<PathBuf> {
    if let Some(path) = &settings.token.token_file {
        return Some(path.clone());
    }
    let credential =
        PathBuf::from(std::env::var_os("CREDENTIALS_DIRECTORY")?).join(token::CREDENTIAL_NAME);
    credential.exists().then_some(credential)
}

fn report_token_file(findings: &mut Findings, path: &Path, warnings: &[String]) {
    if warnings.is_empty() {
        let mode = std::fs::metadata(path)
            .map(|m| format!("mode {:04o}, ", m.mode() & 0o777))
            .unwrap_or_default();
        findings.report(
            Level::Ok,
            "token file",
            &format!("{}: {mode}owned by this user", path.display()),
        );
    }
    for warning in warnings {
        findings.report(Level::Warn, "token file", warning);
    }
}

/// Checks that a folder exists (or can be created by `run`), is writable, is
/// owned by this user and has mode 0700. `key` is the setting that names it.
fn check_folder(findings: &mut Findings, topic: &str, key: &str, path: &Path, contents: &str) {
    let shown = path.display();
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let ancestor = path.ancestors().skip(1).find(|a| a.is_dir());
            match ancestor {
                Some(ancestor) if is_writable(ancestor) => findings.report(
                    Level::Ok,
                    topic,
                    &format!("{shown} does not exist yet; `outboxd run` creates it with mode 0700"),
                ),
                Some(ancestor) => findings.report(
                    Level::Fail,
                    topic,
                    &format!(
                        "{shown} does not exist, and `outboxd run` cannot create it because {} is not writable; \
                         create it with `mkdir -p -m 700 {shown}` or set {key} to another folder",
                        ancestor.display()
                    ),
                ),
                None => findings.report(
                    Level::Fail,
                    topic,
                    &format!("{shown} does not exist and has no existing parent folder; set {key} to an absolute path"),
                ),
            }
            return;
        }
        Err(err) => {
            findings.report(
                Level::Fail,
                topic,
                &format!("{shown} cannot be read: {err}; fix the permissions of its parent folders or set {key} to another folder"),
            );
            return;
        }
    };
    if !metadata.is_dir() {
        findings.report(
            Level::Fail,
            topic,
            &format!("{shown} is not a folder; remove it or set {key} to another folder"),
        );
        return;
    }
    if !is_writable(path) {
        findings.report(
            Level::Fail,
            topic,
            &format!("{shown} is not writable by this user; run `chmod 700 {shown}` as its owner, or set {key} to another folder"),
        );
        return;
    }
    let mode = metadata.mode() & 0o777;
    // SAFETY: geteuid has no preconditions and always succeeds (POSIX).
    let uid = unsafe { libc::geteuid() };
    let mut clean = true;
    if metadata.uid() != uid {
        clean = false;
        findings.report(
            Level::Warn,
            topic,
            &format!(
                "{shown} is owned by uid {}, not by this user (uid {uid}), so another user controls {contents}; use a folder of your own",
                metadata.uid()
            ),
        );
    }
    if mode & 0o077 != 0 {
        clean = false;
        findings.report(
            Level::Warn,
            topic,
            &format!("{shown} has mode {mode:04o}, so other users can reach {contents}; run `chmod 700 {shown}`"),
        );
    }
    if clean {
        findings.report(
            Level::Ok,
            topic,
            &format!("{shown}: mode {mode:04o}, writable, owned by this user"),
        );
    }
}

fn check_rejected(findings: &mut Findings, outbox: &Path) {
    let count = crate::daemon::count_rejected(outbox);
    if count > 0 {
        findings.report(
            Level::Warn,
            "rejected",
            &format!(
                "{count} file(s) in {}/rejected are not uploaded; `outboxd list --state rejected` shows why, and after a fix `outboxd retry --rejected` queues them again",
                outbox.display()
            ),
        );
    }
}

/// True when this user may create and remove entries in the folder.
fn is_writable(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: c_path is a valid NUL-terminated string that outlives the call.
    unsafe { libc::access(c_path.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

async fn check_daemon(findings: &mut Findings, settings: &Settings) {
    let start_hint = "start it with `systemctl --user start outboxd` or `outboxd run`";
    if !settings.state_dir.is_dir() {
        findings.report(
            Level::Warn,
            "daemon",
            &format!("not running (the state dir does not exist yet); {start_hint}"),
        );
        return;
    }
    let report = match control::request(&settings.state_dir, &Request::Status).await {
        Ok(reply) => reply.status,
        Err(ClientError::NotRunning(path)) => {
            let message = match lock_holder(&settings.state_dir) {
                Some(pid) => format!(
                    "process {pid} holds the state dir lock, but no control socket answers at {path}; the daemon may be starting, \
                     and if this persists, its log (`journalctl --user -u outboxd`) says why"
                ),
                None => format!("not running (the state dir lock is free and no control socket answers); {start_hint}"),
            };
            findings.report(Level::Warn, "daemon", &message);
            return;
        }
        Err(err) => {
            findings.report(
                Level::Fail,
                "daemon",
                &format!("{err}; check that the control socket belongs to this user"),
            );
            return;
        }
    };
    match report {
        Some(report) => report_running_daemon(findings, settings, &report),
        None => findings.report(
            Level::Fail,
            "daemon",
            "the daemon replied without a status; restart it",
        ),
    }
}

/// Reports the running daemon, and where it differs from these settings or
/// has put the uploads on hold.
fn report_running_daemon(findings: &mut Findings, settings: &Settings, report: &StatusReport) {
    let uptime = report
        .daemon
        .started_at
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|at| std::time::SystemTime::now().duration_since(at).ok())
        .map(|age| format!(", up {}", short_duration(age)))
        .unwrap_or_default();
    let pid = report
        .daemon
        .pid
        .map_or("unknown".to_string(), |pid| pid.to_string());
    let version = &report.daemon.version;
    findings.report(
        Level::Ok,
        "daemon",
        &format!("running, pid {pid}, version {version}{uptime}"),
    );

    let own_version = env!("CARGO_PKG_VERSION");
    if version != own_version {
        let message = format!(
            "the daemon runs version {version}, this outboxd is {own_version}; restart the daemon to run this version"
        );
        findings.report(Level::Warn, "daemon", &message);
    }

    let own_url = settings.server_url.clone().unwrap_or_default();
    if report.server_url != own_url {
        let message = format!(
            "the daemon uploads to {:?}, but these settings name {own_url:?}; check that both read the same config file, variables and flags",
            report.server_url
        );
        findings.report(Level::Warn, "daemon", &message);
    }

    if !matches!(report.auth.state.as_str(), "ok" | "unknown") {
        let detail = report.auth.detail.as_deref().unwrap_or("no detail");
        let message = format!(
            "the daemon holds every upload ({}): {detail}; after a fix, `outboxd retry` probes again at once",
            report.auth.state
        );
        findings.report(Level::Warn, "daemon", &message);
    }
}

/// Checks `server_url` and builds the HTTP client. Returns it when the probe
/// can be sent.
fn check_server(findings: &mut Findings, settings: &Settings) -> Option<Uploader> {
    let url = match upload::check_server_url(settings) {
        Ok(url) => url,
        Err(problem) => {
            findings.report(Level::Fail, "server", &problem);
            return None;
        }
    };
    let mut strict = settings.clone();
    strict.allow_insecure_http = false;
    if upload::check_server_url(&strict).is_err() {
        findings.report(
            Level::Warn,
            "server",
            &format!("{url} uses plain http:// to a host that is not loopback, which allow_insecure_http permits, so the token travels in clear text; use https:// unless the network is trusted"),
        );
    } else if url.scheme() == "http" {
        findings.report(
            Level::Ok,
            "server",
            &format!("{url} (plain http:// to loopback)"),
        );
    } else {
        findings.report(Level::Ok, "server", url.as_ref());
    }
    match Uploader::new(settings) {
        Ok(uploader) => {
            if let Some(ca_file) = &settings.ca_file {
                findings.report(
                    Level::Ok,
                    "server",
                    &format!("ca_file {} loaded", ca_file.display()),
                );
            }
            Some(uploader)
        }
        Err(problem) => {
            findings.report(Level::Fail, "server", &problem);
            None
        }
    }
}

/// Sends the probe and classifies the response as the daemon would.
async fn probe(
    findings: &mut Findings,
    uploader: Option<Uploader>,
    token: Option<Token>,
    settings: &Settings,
) {
    let (uploader, token) = match (uploader, token) {
        (Some(uploader), Some(token)) => (uploader, token),
        (None, None) => {
            return findings.report(
                Level::Skip,
                "probe",
                "not sent, because server_url and the token failed their checks",
            )
        }
        (None, Some(_)) => {
            return findings.report(
                Level::Skip,
                "probe",
                "not sent, because server_url failed its check",
            )
        }
        (Some(_), None) => {
            return findings.report(
                Level::Skip,
                "probe",
                "not sent, because there is no valid token",
            )
        }
    };
    let url = uploader.url().clone();
    let limit = settings.connect_timeout + settings.read_timeout;
    let started = Instant::now();
    let answer = tokio::time::timeout(limit, uploader.probe(&token)).await;
    let elapsed = started.elapsed().as_millis();
    let fingerprint = token.fingerprint();
    let Ok(outcome) = answer else {
        let message = format!(
            "{url} did not respond within {}; check that the server runs, or raise connect_timeout_ms and read_timeout_ms",
            short_duration(limit)
        );
        return findings.report(Level::Fail, "probe", &message);
    };
    match outcome {
        Outcome::Uploaded { status } => findings.report(
            Level::Ok,
            "probe",
            &format!("HTTP {status} from {url} in {elapsed} ms: the server was reached and did not refuse the token (fingerprint {fingerprint})"),
        ),
        Outcome::Hold { kind: HoldKind::TokenRejected, detail } => findings.report(
            Level::Fail,
            "probe",
            &format!("token rejected: {detail}; the token sent has fingerprint {fingerprint}"),
        ),
        Outcome::Hold { kind: HoldKind::Forbidden, detail } => findings.report(
            Level::Fail,
            "probe",
            &format!("forbidden: {detail}; the token sent has fingerprint {fingerprint}"),
        ),
        Outcome::Hold { detail, .. } => findings.report(Level::Fail, "probe", &detail),
        Outcome::Unreachable { detail } => findings.report(
            Level::Fail,
            "probe",
            &format!("the server cannot be reached: {detail}; check that it runs, the host and port in server_url, DNS, proxies and firewalls"),
        ),
        Outcome::Transient { detail, .. } => findings.report(
            Level::Warn,
            "probe",
            &format!("the server answered {detail}, a temporary failure, so the token could not be checked; the daemon retries such answers, and a later check may pass"),
        ),
        Outcome::Rejected { reason } => findings.report(
            Level::Warn,
            "probe",
            &format!("the server answered {reason}, which tells nothing about the token; the server may not accept probe requests, so watch `outboxd status` after the first upload"),
        ),
    }
}
