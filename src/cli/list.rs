//! `outboxd list`: one row per queued item and per file in `rejected/`.

use super::offline::read_records;
use super::Locate;
use crate::control::{self, ClientError, Request};
use crate::status;
use crate::store::ItemState;
use crate::timefmt::{now_ms, rfc3339, short_duration};

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
            eprintln!("error: --state {state:?} is invalid; use pending, uploading, uploaded or rejected");
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
            next_attempt_at: r.next_attempt_at.filter(|_| r.state == ItemState::Pending).map(rfc3339),
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
    println!("{:<8} {:<32} {:>10} {:<10} {:>8} {:<12} LAST ERROR", "ID", "FILE", "SIZE", "STATE", "ATTEMPTS", "NEXT");
    for row in &rows {
        let next = match row.next_attempt_at.as_deref().and_then(|t| humantime::parse_rfc3339(t).ok()) {
            Some(at) => {
                let at_ms = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
                if at_ms <= now { "now".to_string() } else { format!("in {}", short_duration(std::time::Duration::from_millis(at_ms - now))) }
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
    let Ok(entries) = std::fs::read_dir(&folder) else { return Vec::new() };
    let mut rows = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || name.ends_with(".reason") {
            continue;
        }
        let reason = std::fs::read_to_string(folder.join(format!("{name}.reason"))).ok().map(|r| r.trim().to_string());
        let metadata = entry.metadata().ok();
        rows.push(Row {
            id: "-".into(),
            file: name,
            size: metadata.as_ref().map_or(0, |m| m.len()),
            state: "rejected".into(),
            attempts: 0,
            next_attempt_at: None,
            last_error: reason,
            queued_at: metadata.and_then(|m| m.modified().ok()).map(|t| rfc3339(t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64)),
        });
    }
    rows
}
