//! The `status --json` document, its one-screen text form, and the exit code
//! that `outboxd status` derives from it.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::timefmt::short_duration;

/// Destination unreachable for longer than this makes `status` exit 2.
pub const UNREACHABLE_ALERT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub daemon: DaemonStatus,
    pub server_url: String,
    pub auth: AuthStatus,
    pub destination: DestinationStatus,
    pub queue: QueueStatus,
    pub uploads: Vec<UploadStatus>,
    pub last_success_at: Option<String>,
    /// The most recent error of any kind, for the text form.
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub last_error_at: Option<String>,
    /// Warnings that need no hold, such as a group-readable token file.
    #[serde(default)]
    pub warnings: Vec<String>,
    #[serde(default)]
    pub outbox: String,
    #[serde(default)]
    pub state_dir: String,
    /// Fingerprint of the token in use (first 8 hex digits of its SHA-256).
    #[serde(default)]
    pub token_fingerprint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DaemonStatus {
    pub running: bool,
    pub pid: Option<u32>,
    pub version: String,
    pub started_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuthStatus {
    pub state: String,
    pub since: Option<String>,
    pub detail: Option<String>,
    pub next_probe_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DestinationStatus {
    pub state: String,
    pub since: Option<String>,
    pub next_attempt_at: Option<String>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueStatus {
    pub pending: u64,
    pub uploading: u64,
    pub uploaded: u64,
    pub rejected: u64,
    pub pending_bytes: u64,
    pub oldest_pending_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UploadStatus {
    pub id: String,
    pub file: String,
    pub bytes_sent: u64,
    pub size: u64,
}

/// Exit code of `outboxd status`: 0 healthy or idle, 2 attention needed, 3 the
/// daemon is not running (wins over 2).
pub fn exit_code(report: &StatusReport, now: SystemTime) -> i32 {
    if !report.daemon.running {
        return 3;
    }
    let held = !matches!(report.auth.state.as_str(), "ok" | "unknown");
    let long_unreachable = report.destination.state == "unreachable"
        && report
            .destination
            .since
            .as_deref()
            .and_then(|since| humantime::parse_rfc3339(since).ok())
            .and_then(|since| now.duration_since(since).ok())
            .is_some_and(|age| age > UNREACHABLE_ALERT);
    if held || report.queue.rejected > 0 || long_unreachable {
        2
    } else {
        0
    }
}

/// Options of the text form.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// Use ANSI colours (only on a terminal, and never with `NO_COLOR`).
    pub colour: bool,
    /// Send rate in bytes per second of each upload in flight, by upload id.
    /// `status --watch` measures it between two refreshes; a single `status`
    /// has no second sample, so it shows no rate.
    pub rates: HashMap<String, f64>,
}

/// Tone of a piece of text, mapped to an ANSI colour when colour is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    Good,
    Warn,
    Bad,
    Dim,
    Plain,
}

/// Wraps `text` in the ANSI colour of `tone` when `colour` is true.
pub fn paint(text: &str, tone: Tone, colour: bool) -> String {
    let code = match tone {
        Tone::Good => "32",
        Tone::Warn => "33",
        Tone::Bad => "1;31",
        Tone::Dim => "2",
        Tone::Plain => return text.to_string(),
    };
    if colour {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

/// Renders the one-screen text form without colour or rates.
pub fn render_text(report: &StatusReport, now: SystemTime) -> String {
    render_text_with(report, now, &RenderOptions::default())
}

/// Renders the one-screen text form. The first line is the verdict: whether
/// uploads work, and if not, the cause. The lines below give the details.
pub fn render_text_with(report: &StatusReport, now: SystemTime, options: &RenderOptions) -> String {
    let colour = options.colour;
    let mut out = String::new();
    let mut line = |label: &str, text: &str| {
        if label.is_empty() {
            out.push_str(&format!("{:14}{text}\n", ""));
        } else {
            out.push_str(&format!("{:14}{text}\n", format!("{label}:")));
        }
    };

    let (tone, verdict) = verdict(report, now);
    line("outboxd", &paint(&verdict, tone, colour));

    if report.daemon.running {
        let uptime = relative(&report.daemon.started_at, now)
            .map(|t| t.trim_end_matches(" ago").to_string());
        line(
            "daemon",
            &format!(
                "running, pid {}, up {}, version {}",
                report
                    .daemon
                    .pid
                    .map_or("unknown".to_string(), |pid| pid.to_string()),
                uptime.as_deref().unwrap_or("unknown"),
                report.daemon.version
            ),
        );
    } else {
        line("daemon", &paint("not running", Tone::Bad, colour));
        if !report.state_dir.is_empty() {
            line(
                "",
                &paint(
                    &format!("the queue below is as last saved in {}", report.state_dir),
                    Tone::Dim,
                    colour,
                ),
            );
        }
    }

    let server = if report.server_url.is_empty() {
        "(server_url is not set)"
    } else {
        report.server_url.as_str()
    };
    line("server", server);
    line("destination", &destination_text(report, now, colour));
    if report.destination.state != "ok" {
        if let Some(error) = &report.destination.last_error {
            line("", error);
        }
    }

    for (index, text) in auth_lines(report, now, colour).iter().enumerate() {
        line(if index == 0 { "auth" } else { "" }, text);
    }

    let q = &report.queue;
    // pending_bytes counts the uploads in flight too: it is what is left to send.
    let mut queue = format!(
        "{} pending, {} uploading, {} to send",
        q.pending,
        q.uploading,
        human_bytes(q.pending_bytes)
    );
    if let Some(age) = relative(&q.oldest_pending_at, now) {
        queue.push_str(&format!(", oldest queued {age}"));
    }
    line("queue", &queue);
    let rejected = format!("{} rejected", q.rejected);
    let rejected = if q.rejected > 0 {
        paint(&rejected, Tone::Warn, colour)
    } else {
        rejected
    };
    line("", &format!("{} uploaded in total, {rejected}", q.uploaded));
    if q.rejected > 0 {
        let folder = if report.outbox.is_empty() {
            "rejected/".to_string()
        } else {
            format!("{}/rejected", report.outbox)
        };
        line("", &format!("see `outboxd list --state rejected` and {folder}; `outboxd retry --rejected` queues them again"));
    }

    for upload in &report.uploads {
        line(
            "uploading",
            &upload_text(upload, options.rates.get(&upload.id).copied(), colour),
        );
    }

    // The daemon keeps its last success in memory only, so "never" means
    // "not since it started"; without a daemon it comes from the queue records.
    let never = if report.daemon.running {
        "none since the daemon started"
    } else {
        "none recorded"
    };
    let success = relative(&report.last_success_at, now).unwrap_or_else(|| never.to_string());
    line("last success", &success);
    if let Some(error) = &report.last_error {
        let repeated = report.auth.detail.as_deref() == Some(error.as_str());
        if !repeated {
            let text = match relative(&report.last_error_at, now) {
                Some(when) => format!("{error} ({when})"),
                None => error.clone(),
            };
            line("last error", &text);
        }
    }
    for warning in &report.warnings {
        line("warning", &paint(warning, Tone::Warn, colour));
    }
    out
}

/// Returns the first line of the text form: whether uploads work, and if not, why.
fn verdict(report: &StatusReport, now: SystemTime) -> (Tone, String) {
    let q = &report.queue;
    if !report.daemon.running {
        return (
            Tone::Bad,
            "NOT RUNNING: nothing is uploaded; start it with `systemctl --user start outboxd` or `outboxd run`".into(),
        );
    }
    if !matches!(report.auth.state.as_str(), "ok" | "unknown") {
        return (
            Tone::Bad,
            format!(
                "ON HOLD: {}; no uploads until it is fixed",
                auth_cause(&report.auth.state)
            ),
        );
    }
    match report.destination.state.as_str() {
        "unreachable" => {
            let since =
                relative(&report.destination.since, now).unwrap_or_else(|| "a while".into());
            let tone = if exit_code(report, now) == 2 {
                Tone::Bad
            } else {
                Tone::Warn
            };
            return (tone, format!("WAITING: the server cannot be reached (since {since}); uploads resume when it answers"));
        }
        "throttled" => {
            let until = relative(&report.destination.next_attempt_at, now)
                .unwrap_or_else(|| "later".into());
            return (
                Tone::Warn,
                format!("PAUSED: the server asked to wait (Retry-After); uploads resume {until}"),
            );
        }
        _ => {}
    }
    if q.rejected > 0 {
        return (
            Tone::Warn,
            format!(
                "ATTENTION: {} file(s) rejected; the rest uploads normally",
                q.rejected
            ),
        );
    }
    if q.uploading > 0 || !report.uploads.is_empty() {
        return (
            Tone::Good,
            format!(
                "WORKING: uploading {} file(s), {} pending",
                q.uploading.max(report.uploads.len() as u64),
                q.pending
            ),
        );
    }
    if q.pending > 0 {
        return (
            Tone::Good,
            format!("WORKING: {} file(s) pending", q.pending),
        );
    }
    (Tone::Good, "IDLE: nothing to upload".into())
}

/// Describes the cause of an auth or config hold in plain words.
fn auth_cause(state: &str) -> String {
    match state {
        "token_missing" => "no upload token is configured".into(),
        "token_invalid" => "the configured upload token is malformed".into(),
        "token_rejected" => "the server rejected the upload token (HTTP 401)".into(),
        "forbidden" => "the token is not allowed to upload (HTTP 403)".into(),
        "config_error" => "the configuration or server_url is wrong".into(),
        other => format!("auth state {other}"),
    }
}

fn auth_lines(report: &StatusReport, now: SystemTime, colour: bool) -> Vec<String> {
    let auth = &report.auth;
    let fingerprint = report
        .token_fingerprint
        .as_deref()
        .map(|f| format!(", token fingerprint {f}"))
        .unwrap_or_default();
    let mut lines = Vec::new();
    match auth.state.as_str() {
        "ok" => lines.push(format!("{}{fingerprint}", paint("ok", Tone::Good, colour))),
        "unknown" if report.daemon.running => {
            lines.push(format!("unknown: the server has accepted no upload yet, so the next upload tests the token{fingerprint}"))
        }
        "unknown" => lines.push("unknown (the daemon is not running)".into()),
        state => {
            let since = relative(&auth.since, now).map(|t| format!(" since {t}")).unwrap_or_default();
            lines.push(format!("{}{since}{fingerprint}", paint(&format!("HELD ({state})"), Tone::Bad, colour)));
            if let Some(detail) = &auth.detail {
                lines.push(detail.clone());
            }
            match relative(&auth.next_probe_at, now) {
                Some(at) => lines.push(format!("next probe {at}; `outboxd retry` probes now")),
                None => lines.push("no probe until the configuration changes: fix it, then send SIGHUP or restart".into()),
            }
        }
    }
    lines
}

fn destination_text(report: &StatusReport, now: SystemTime, colour: bool) -> String {
    let destination = &report.destination;
    match destination.state.as_str() {
        "ok" => paint("reachable", Tone::Good, colour),
        "unknown" if report.daemon.running => "not contacted yet".into(),
        "unknown" => "unknown".into(),
        state => {
            let since = relative(&destination.since, now)
                .map(|t| format!(" since {t}"))
                .unwrap_or_default();
            let next = relative(&destination.next_attempt_at, now)
                .map(|t| format!(", next attempt {t}"))
                .unwrap_or_default();
            format!(
                "{}{since}{next}",
                paint(&state.to_uppercase(), Tone::Warn, colour)
            )
        }
    }
}

fn upload_text(upload: &UploadStatus, rate: Option<f64>, colour: bool) -> String {
    // An empty file counts as sent.
    let percent = (upload.bytes_sent.min(upload.size) * 100)
        .checked_div(upload.size)
        .unwrap_or(100) as usize;
    let mut text = format!(
        "{} {} {percent:>3}% {} / {}",
        upload.file,
        progress_bar(percent, 20, colour),
        human_bytes(upload.bytes_sent),
        human_bytes(upload.size)
    );
    if let Some(rate) = rate.filter(|r| r.is_finite() && *r >= 0.0) {
        text.push_str(&format!(", {}/s", human_bytes(rate as u64)));
        let left = upload.size.saturating_sub(upload.bytes_sent);
        if rate >= 1.0 && left > 0 {
            text.push_str(&format!(
                ", {} left",
                short_duration(Duration::from_secs_f64(left as f64 / rate))
            ));
        }
    }
    text
}

/// Formats an RFC 3339 time relative to `now`: `5m10s ago`, `in 30s`, `now`.
/// Returns `None` for a missing or unparsable time.
pub fn relative(time: &Option<String>, now: SystemTime) -> Option<String> {
    let at = humantime::parse_rfc3339(time.as_deref()?).ok()?;
    Some(match now.duration_since(at) {
        Ok(age) if age < Duration::from_secs(1) => "now".to_string(),
        Ok(age) => format!("{} ago", short_duration(age)),
        Err(err) if err.duration() < Duration::from_secs(1) => "now".to_string(),
        Err(err) => format!("in {}", short_duration(err.duration())),
    })
}

fn progress_bar(percent: usize, width: usize, colour: bool) -> String {
    let filled = percent.min(100) * width / 100;
    let done = "#".repeat(filled);
    format!(
        "[{}{}]",
        paint(&done, Tone::Good, colour && filled > 0),
        "-".repeat(width - filled)
    )
}

/// Formats a byte count with a binary unit: `512 B`, `1.5 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn report(running: bool, auth: &str, rejected: u64) -> StatusReport {
        StatusReport {
            daemon: DaemonStatus {
                running,
                pid: Some(1),
                version: "0".into(),
                started_at: None,
            },
            server_url: "http://127.0.0.1/".into(),
            auth: AuthStatus {
                state: auth.into(),
                since: None,
                detail: None,
                next_probe_at: None,
            },
            destination: DestinationStatus {
                state: "ok".into(),
                since: None,
                next_attempt_at: None,
                last_error: None,
            },
            queue: QueueStatus {
                pending: 0,
                uploading: 0,
                uploaded: 0,
                rejected,
                pending_bytes: 0,
                oldest_pending_at: None,
            },
            uploads: vec![],
            last_success_at: None,
            last_error: None,
            last_error_at: None,
            warnings: vec![],
            outbox: String::new(),
            state_dir: String::new(),
            token_fingerprint: None,
        }
    }

    #[test]
    fn exit_code_table() {
        let now = SystemTime::now();
        assert_eq!(exit_code(&report(true, "ok", 0), now), 0);
        assert_eq!(exit_code(&report(true, "unknown", 0), now), 0);
        assert_eq!(exit_code(&report(true, "token_rejected", 0), now), 2);
        assert_eq!(exit_code(&report(true, "ok", 1), now), 2);
        assert_eq!(exit_code(&report(false, "token_rejected", 1), now), 3);
    }

    #[test]
    fn long_unreachable_needs_attention() {
        let now = SystemTime::now();
        let mut r = report(true, "ok", 0);
        r.destination.state = "unreachable".into();
        r.destination.since =
            Some(humantime::format_rfc3339_seconds(now - Duration::from_secs(60)).to_string());
        assert_eq!(exit_code(&r, now), 0);
        r.destination.since =
            Some(humantime::format_rfc3339_seconds(now - Duration::from_secs(700)).to_string());
        assert_eq!(exit_code(&r, now), 2);
    }

    #[test]
    fn text_first_line_names_hold() {
        let now = SystemTime::now();
        let mut r = report(true, "forbidden", 0);
        r.auth.detail = Some("the server refused the upload (HTTP 403 Forbidden)".into());
        r.auth.next_probe_at =
            Some(humantime::format_rfc3339_seconds(now + Duration::from_secs(90)).to_string());
        let text = render_text(&r, now);
        let first = text.lines().next().unwrap();
        assert!(first.contains("ON HOLD"), "{first}");
        assert!(first.contains("not allowed to upload"), "{first}");
        assert!(text.contains("HTTP 403 Forbidden"), "{text}");
        assert!(text.contains("next probe in 1m"), "{text}");
    }

    #[test]
    fn text_first_line_for_each_state() {
        let now = SystemTime::now();
        let cases: &[(bool, &str, &str, u64, &str)] = &[
            (false, "ok", "ok", 0, "NOT RUNNING"),
            (true, "token_missing", "ok", 0, "no upload token"),
            (true, "ok", "unreachable", 0, "WAITING"),
            (true, "ok", "throttled", 0, "PAUSED"),
            (true, "ok", "ok", 2, "ATTENTION: 2 file(s) rejected"),
            (true, "ok", "ok", 0, "IDLE"),
        ];
        for (running, auth, destination, rejected, expected) in cases {
            let mut r = report(*running, auth, *rejected);
            r.destination.state = destination.to_string();
            let text = render_text(&r, now);
            let first = text.lines().next().unwrap();
            assert!(
                first.contains(expected),
                "{running} {auth} {destination} {rejected}: {first}"
            );
        }
    }

    #[test]
    fn text_shows_upload_progress_and_rate() {
        let now = SystemTime::now();
        let mut r = report(true, "ok", 0);
        r.queue.uploading = 1;
        r.uploads = vec![UploadStatus {
            id: "7".into(),
            file: "s.zip".into(),
            bytes_sent: 512 * 1024,
            size: 1024 * 1024,
        }];
        let plain = render_text(&r, now);
        assert!(
            plain.contains("s.zip [##########----------]  50% 512.0 KiB / 1.0 MiB"),
            "{plain}"
        );
        assert!(
            !plain.contains("/s"),
            "a single status has no rate: {plain}"
        );
        let options = RenderOptions {
            colour: false,
            rates: HashMap::from([("7".to_string(), 256.0 * 1024.0)]),
        };
        let watched = render_text_with(&r, now, &options);
        assert!(watched.contains("256.0 KiB/s, 2s left"), "{watched}");
    }

    #[test]
    fn colour_only_when_asked() {
        let now = SystemTime::now();
        let r = report(true, "token_rejected", 0);
        assert!(!render_text(&r, now).contains('\x1b'));
        let coloured = render_text_with(
            &r,
            now,
            &RenderOptions {
                colour: true,
                rates: HashMap::new(),
            },
        );
        assert!(coloured.contains("\x1b[1;31m"), "{coloured}");
    }

    #[test]
    fn human_bytes_table() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }

    #[test]
    fn text_dates_last_error() {
        let now = SystemTime::now();
        let mut r = report(true, "ok", 0);
        r.last_error = Some("a.zip: HTTP 500 Internal Server Error".into());
        r.last_error_at =
            Some(humantime::format_rfc3339_seconds(now - Duration::from_secs(125)).to_string());
        let text = render_text(&r, now);
        let line = text
            .lines()
            .find(|line| line.starts_with("last error"))
            .unwrap_or_else(|| panic!("no last error line in:\n{text}"));
        assert!(line.contains("HTTP 500"), "{line}");
        assert!(line.contains("(2m5s ago)"), "{line}");
    }
}
