//! `status` and `list`: through the control socket when the daemon runs, or
//! from the state dir when it does not.

use std::time::SystemTime;

use super::Locate;
use crate::control::{self, ClientError, Request};
use crate::queue::Queue;
use crate::status::{self, StatusReport};
use crate::store::{ItemState, Record, Store};
use crate::timefmt::{now_ms, rfc3339, short_duration};

/// `outboxd status`. Returns the exit code of `status::exit_code`, or 1.
pub async fn status(locate: &Locate, json: bool) -> i32 {
    let loaded = locate.load(None);
    let report = match control::request(&loaded.settings.state_dir, &Request::Status).await {
        Ok(reply) => match reply.status {
            Some(report) => report,
            None => {
                eprintln!("error: the daemon's reply has no status");
                return 1;
            }
        },
        Err(ClientError::NotRunning(_)) => offline_report(&loaded.settings),
        Err(err) => {
            eprintln!("error: {err}");
            return 1;
        }
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(err) => {
                eprintln!("error: encoding the status failed: {err}");
                return 1;
            }
        }
    } else {
        print!("{}", status::render_text(&report, SystemTime::now()));
    }
    status::exit_code(&report, SystemTime::now())
}

/// Reads the queue from the state dir, never creating anything there. If the
/// database is locked (a daemon is starting), the counts are left at zero.
fn read_records(settings: &crate::config::Settings) -> (Vec<Record>, u64, Option<String>) {
    if !settings.state_dir.join("queue").exists() {
        return (Vec::new(), 0, None);
    }
    // The shared lock keeps a daemon from starting while the queue is read. A
    // daemon that holds the lock is starting or stopping, so it is left alone.
    let Some(_lock) = crate::daemon::ReaderLock::try_acquire(&settings.state_dir) else {
        return (
            Vec::new(),
            0,
            Some(
                "a daemon holds the state dir (it is starting or stopping); try again in a moment"
                    .into(),
            ),
        );
    };
    match Store::open_read(&settings.state_dir) {
        Ok(store) => {
            let uploaded = store.uploaded_total().unwrap_or(0);
            match Queue::load_readonly(&store) {
                Ok(records) => (records, uploaded, None),
                Err(err) => (Vec::new(), uploaded, Some(err.to_string())),
            }
        }
        Err(err) => (
            Vec::new(),
            0,
            Some(format!(
                "the queue cannot be read now ({err}); a daemon may be starting"
            )),
        ),
    }
}

fn offline_report(settings: &crate::config::Settings) -> StatusReport {
    let (records, uploaded, problem) = read_records(settings);
    let mut pending = 0;
    let mut pending_bytes = 0;
    let mut oldest: Option<u64> = None;
    for record in &records {
        if matches!(record.state, ItemState::Pending | ItemState::Uploading) {
            pending += 1;
            pending_bytes += record.size;
            oldest = Some(oldest.map_or(record.queued_at, |t| t.min(record.queued_at)));
        }
    }
    let last_success = records.iter().filter_map(|r| r.uploaded_at).max();
    StatusReport {
        daemon: status::DaemonStatus {
            running: false,
            pid: None,
            version: env!("CARGO_PKG_VERSION").into(),
            started_at: None,
        },
        server_url: settings.server_url.clone().unwrap_or_default(),
        auth: status::AuthStatus {
            state: "unknown".into(),
            since: None,
            detail: None,
            next_probe_at: None,
        },
        destination: status::DestinationStatus {
            state: "unknown".into(),
            since: None,
            next_attempt_at: None,
            last_error: None,
        },
        queue: status::QueueStatus {
            pending,
            uploading: 0,
            uploaded,
            rejected: crate::daemon::count_rejected(&settings.outbox),
            pending_bytes,
            oldest_pending_at: oldest.map(rfc3339),
        },
        uploads: Vec::new(),
        last_success_at: last_success.map(rfc3339),
        last_error: problem,
        warnings: Vec::new(),
        outbox: settings.outbox.display().to_string(),
        state_dir: settings.state_dir.display().to_string(),
        token_fingerprint: None,
    }
}

/// One row of `outboxd list --json`.
#[derive(Debug, serde::Serialize)]
struct Row {
    id: String,
    file: String,
    size: u64,
    state: String,
    attempts: u32,
    next_attempt_at: Option<String>,
    last_error: Option<String>,
    queued_at: Option<String>,
}

/// `outboxd list`.
pub async fn list(locate: &Locate, json: bool, state: Option<&str>) -> i32 {
    if let Some(state) = state {
        if !["pending", "uploading", "uploaded", "rejected"].contains(&state) {
            eprintln!(
                "error: --state {state:?} is invalid; use pending, uploading, uploaded or rejected"
            );
            return 2;
        }
    }
    let loaded = locate.load(None);
    let settings = &loaded.settings;
    let (mut records, running) = match control::request(&settings.state_dir, &Request::List).await {
        Ok(reply) => (reply.items.unwrap_or_default(), true),
        Err(ClientError::NotRunning(_)) => {
            let (records, _, problem) = read_records(settings);
            if let Some(problem) = problem {
                eprintln!("warning: {problem}");
            }
            (records, false)
        }
        Err(err) => {
            eprintln!("error: {err}");
            return 1;
        }
    };
    records.sort_by_key(|r| (r.queued_at, r.id));
    let now = now_ms();
    let mut rows: Vec<Row> = records
        .iter()
        .map(|r| Row {
            id: r.id.to_string(),
            file: r.file.clone(),
            size: r.size,
            state: r.state.as_str().into(),
            attempts: r.attempts,
            next_attempt_at: r
                .next_attempt_at
                .filter(|_| r.state == ItemState::Pending)
                .map(rfc3339),
            last_error: r.last_error.clone(),
            queued_at: Some(rfc3339(r.queued_at)),
        })
        .collect();
    rows.extend(rejected_rows(&settings.outbox));
    if let Some(state) = state {
        rows.retain(|row| row.state == state);
    }
    if json {
        match serde_json::to_string_pretty(&rows) {
            Ok(text) => println!("{text}"),
            Err(err) => {
                eprintln!("error: encoding the list failed: {err}");
                return 1;
            }
        }
        return 0;
    }
    if !running {
        eprintln!("note: the daemon is not running; this is the queue as it was last saved");
    }
    println!(
        "{:<8} {:<32} {:>10} {:<10} {:>8} {:<12} LAST ERROR",
        "ID", "FILE", "SIZE", "STATE", "ATTEMPTS", "NEXT"
    );
    for row in &rows {
        let next = match row
            .next_attempt_at
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
        {
            Some(at) => {
                let at_ms = at
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis() as u64;
                if at_ms <= now {
                    "now".to_string()
                } else {
                    format!(
                        "in {}",
                        short_duration(std::time::Duration::from_millis(at_ms - now))
                    )
                }
            }
            None if row.state == "pending" => "now".to_string(),
            None => "-".to_string(),
        };
        println!(
            "{:<8} {:<32} {:>10} {:<10} {:>8} {:<12} {}",
            row.id,
            row.file,
            status::human_bytes(row.size),
            row.state,
            row.attempts,
            next,
            row.last_error.as_deref().unwrap_or("")
        );
    }
    0
}

/// Rows for the files in `rejected/`, with the reason from the `.reason` file.
fn rejected_rows(outbox: &std::path::Path) -> Vec<Row> {
    let folder = outbox.join("rejected");
    let Ok(entries) = std::fs::read_dir(&folder) else {
        return Vec::new();
    };
    let mut rows = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || name.ends_with(".reason") {
            continue;
        }
        let reason = std::fs::read_to_string(folder.join(format!("{name}.reason")))
            .ok()
            .map(|r| r.trim().to_string());
        let metadata = entry.metadata().ok();
        rows.push(Row {
            id: "-".into(),
            file: name,
            size: metadata.as_ref().map_or(0, |m| m.len()),
            state: "rejected".into(),
            attempts: 0,
            next_attempt_at: None,
            last_error: reason,
            queued_at: metadata.and_then(|m| m.modified().ok()).map(|t| {
                rfc3339(
                    t.duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_millis() as u64,
                )
            }),
        });
    }
    rows
}
