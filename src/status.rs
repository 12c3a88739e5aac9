//! The `status --json` document, its one-screen text form, and the exit code
//! that `outboxd status` derives from it.

use std::time::Duration;

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
pub fn exit_code(report: &StatusReport, now: std::time::SystemTime) -> i32 {
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

/// Renders the one-screen text form.
pub fn render_text(report: &StatusReport, now: std::time::SystemTime) -> String {
    let ago = |time: &Option<String>| -> String {
        match time.as_deref().and_then(|t| humantime::parse_rfc3339(t).ok()) {
            Some(at) => match now.duration_since(at) {
                Ok(age) => format!("{} ago", short_duration(age)),
                Err(err) => format!("in {}", short_duration(err.duration())),
            },
            None => "never".to_string(),
        }
    };
    let mut out = String::new();
    let daemon = if report.daemon.running {
        format!(
            "running (pid {}, up {}, version {})",
            report.daemon.pid.unwrap_or(0),
            ago(&report.daemon.started_at).trim_end_matches(" ago"),
            report.daemon.version
        )
    } else {
        "NOT RUNNING (start it with `systemctl --user start outboxd` or `outboxd run`)".to_string()
    };
    out.push_str(&format!("daemon:       {daemon}\n"));
    out.push_str(&format!("server:       {}\n", if report.server_url.is_empty() { "(server_url not set)" } else { &report.server_url }));

    let auth = match report.auth.state.as_str() {
        "ok" => "ok".to_string(),
        "unknown" => "unknown (no upload answered yet)".to_string(),
        held => format!("HELD: {held} since {}", ago(&report.auth.since)),
    };
    out.push_str(&format!("auth:         {auth}\n"));
    if let Some(detail) = &report.auth.detail {
        out.push_str(&format!("              {detail}\n"));
    }
    if report.auth.next_probe_at.is_some() {
        out.push_str(&format!("              next probe {}\n", ago(&report.auth.next_probe_at)));
    }
    if let Some(fingerprint) = &report.token_fingerprint {
        out.push_str(&format!("token:        fingerprint {fingerprint}\n"));
    }

    let destination = match report.destination.state.as_str() {
        "ok" => "ok".to_string(),
        "unknown" => "unknown (not contacted yet)".to_string(),
        state => format!(
            "{} since {}, next attempt {}",
            state.to_uppercase(),
            ago(&report.destination.since),
            ago(&report.destination.next_attempt_at)
        ),
    };
    out.push_str(&format!("destination:  {destination}\n"));
    if report.destination.state != "ok" {
        if let Some(error) = &report.destination.last_error {
            out.push_str(&format!("              {error}\n"));
        }
    }

    let q = &report.queue;
    out.push_str(&format!(
        "queue:        {} pending ({}), {} uploading, {} uploaded, {} rejected\n",
        q.pending,
        human_bytes(q.pending_bytes),
        q.uploading,
        q.uploaded,
        q.rejected
    ));
    if q.oldest_pending_at.is_some() {
        out.push_str(&format!("              oldest pending queued {}\n", ago(&q.oldest_pending_at)));
    }
    if q.rejected > 0 {
        out.push_str(&format!("              rejected files and reasons are in {}/rejected\n", report.outbox));
    }
    for upload in &report.uploads {
        let percent = if upload.size == 0 { 100 } else { upload.bytes_sent * 100 / upload.size };
        out.push_str(&format!(
            "uploading:    {} [{}] {}% of {}\n",
            upload.file,
            progress_bar(percent, 20),
            percent,
            human_bytes(upload.size)
        ));
    }
    out.push_str(&format!("last success: {}\n", ago(&report.last_success_at)));
    if let Some(error) = &report.last_error {
        out.push_str(&format!("last error:   {error}\n"));
    }
    for warning in &report.warnings {
        out.push_str(&format!("warning:      {warning}\n"));
    }
    out
}

fn progress_bar(percent: u64, width: u64) -> String {
    let filled = (percent.min(100) * width / 100) as usize;
    format!("{}{}", "#".repeat(filled), "-".repeat(width as usize - filled))
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
            daemon: DaemonStatus { running, pid: Some(1), version: "0".into(), started_at: None },
            server_url: "http://127.0.0.1/".into(),
            auth: AuthStatus { state: auth.into(), since: None, detail: None, next_probe_at: None },
            destination: DestinationStatus { state: "ok".into(), since: None, next_attempt_at: None, last_error: None },
            queue: QueueStatus { pending: 0, uploading: 0, uploaded: 0, rejected, pending_bytes: 0, oldest_pending_at: None },
            uploads: vec![],
            last_success_at: None,
            last_error: None,
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
        r.destination.since = Some(humantime::format_rfc3339_seconds(now - Duration::from_secs(60)).to_string());
        assert_eq!(exit_code(&r, now), 0);
        r.destination.since = Some(humantime::format_rfc3339_seconds(now - Duration::from_secs(700)).to_string());
        assert_eq!(exit_code(&r, now), 2);
    }

    #[test]
    fn human_bytes_table() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
