//! `outboxd list`: one row per queued item and per file in `rejected/`,
//! oldest first, from the running daemon or from the state dir.

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use super::offline::read_records;
use super::{colour_enabled, Locate, StateFilter};
use crate::config::Settings;
use crate::control::{self, ClientError, Request};
use crate::status::{self, paint, Tone};
use crate::store::Record;
use crate::timefmt::{now_ms, rfc3339, short_duration};

/// One row of `outboxd list --json`.
#[derive(Debug, serde::Serialize)]
struct Row {
    /// Item id, or `-` for a file in `rejected/`, which has no queue record.
    id: String,
    file: String,
    size: u64,
    state: String,
    attempts: u32,
    next_attempt_at: Option<String>,
    /// The last failure, or for a rejected file the reason beside it.
    last_error: Option<String>,
    queued_at: Option<String>,
    /// Sort key: when the file entered the queue, in ms since the epoch.
    #[serde(skip)]
    queued_ms: u64,
    /// Next attempt in ms since the epoch, as the record stores it.
    #[serde(skip)]
    next_attempt_ms: Option<u64>,
}

/// Queue records and daemon state that `list` renders.
struct QueueView {
    records: Vec<Record>,
    running: bool,
    /// The outbox of the running daemon, or the one the settings name.
    outbox: PathBuf,
    /// Auth state of a hold on every upload, if the daemon has one.
    hold: Option<String>,
    /// No upload starts before this time (destination backoff or Retry-After).
    destination_next_ms: Option<u64>,
}

/// `outboxd list`. Returns 0, or 1 when the queue cannot be read.
pub async fn list(locate: Locate, json: bool, state: Option<StateFilter>) -> i32 {
    let settings = locate.load_warning();
    let view = match read_queue(&settings).await {
        Ok(view) => view,
        Err(message) => {
            eprintln!("error: {message}");
            return 1;
        }
    };
    if !view.running {
        eprintln!("note: the daemon is not running; this is the queue as it was last saved");
    }
    let mut rows: Vec<Row> = view.records.iter().map(record_row).collect();
    rows.extend(rejected_rows(&view.outbox));
    if let Some(state) = state {
        rows.retain(|row| row.state == state.as_str());
    }
    rows.sort_by(|a, b| (a.queued_ms, &a.file).cmp(&(b.queued_ms, &b.file)));

    if json {
        return match serde_json::to_string_pretty(&rows) {
            Ok(text) => {
                println!("{text}");
                0
            }
            Err(err) => {
                eprintln!("error: encoding the list failed: {err}");
                1
            }
        };
    }
    if rows.is_empty() {
        match state {
            Some(state) => println!("no {} items", state.as_str()),
            None => println!("no items: the queue is empty and rejected/ has no files"),
        }
        return 0;
    }
    if let Some(hold) = &view.hold {
        println!("uploads are on hold ({hold}); `outboxd status` says why\n");
    }
    print!("{}", render_table(&rows, &view, colour_enabled()));
    0
}

async fn read_queue(settings: &Settings) -> Result<QueueView, String> {
    match control::request(&settings.state_dir, &Request::List).await {
        Ok(reply) => {
            // The status names the hold and the daemon's own outbox, which
            // differs from the one of these settings when the daemon was
            // started with other flags.
            let report = control::request(&settings.state_dir, &Request::Status)
                .await
                .ok()
                .and_then(|r| r.status);
            let hold = report
                .as_ref()
                .map(|r| r.auth.state.clone())
                .filter(|state| !matches!(state.as_str(), "ok" | "unknown"));
            let outbox = report
                .as_ref()
                .map(|r| PathBuf::from(&r.outbox))
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or_else(|| settings.outbox.clone());
            let destination_next_ms = report
                .as_ref()
                .and_then(|r| parse_ms(&r.destination.next_attempt_at));
            Ok(QueueView {
                records: reply.items.unwrap_or_default(),
                running: true,
                outbox,
                hold,
                destination_next_ms,
            })
        }
        Err(ClientError::NotRunning(_)) => {
            let (records, _, problem) = read_records(settings);
            if let Some(problem) = problem {
                eprintln!("warning: {problem}");
            }
            Ok(QueueView {
                records,
                running: false,
                outbox: settings.outbox.clone(),
                hold: None,
                destination_next_ms: None,
            })
        }
        Err(err) => Err(err.to_string()),
    }
}

fn record_row(record: &Record) -> Row {
    let pending = record.state == crate::store::ItemState::Pending;
    Row {
        id: record.id.to_string(),
        file: record.file.clone(),
        size: record.size,
        state: record.state.as_str().into(),
        attempts: record.attempts,
        next_attempt_at: record.next_attempt_at.filter(|_| pending).map(rfc3339),
        last_error: record.last_error.clone(),
        queued_at: Some(rfc3339(record.queued_at)),
        queued_ms: record.queued_at,
        next_attempt_ms: record.next_attempt_at.filter(|_| pending),
    }
}

/// Rows for the files in `rejected/`, with the reason from the `.reason` file.
/// Their queue time is the file's mtime, which a rejection keeps, so it is when
/// the producer finished writing the file.
fn rejected_rows(outbox: &Path) -> Vec<Row> {
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
        let modified_ms = metadata
            .as_ref()
            .and_then(|m| m.modified().ok())
            .map(|t| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64);
        rows.push(Row {
            id: "-".into(),
            file: name,
            size: metadata.as_ref().map_or(0, |m| m.len()),
            state: "rejected".into(),
            attempts: 0,
            next_attempt_at: None,
            last_error: reason,
            queued_at: modified_ms.map(rfc3339),
            queued_ms: modified_ms.unwrap_or(0),
            next_attempt_ms: None,
        });
    }
    rows
}

fn render_table(rows: &[Row], view: &QueueView, colour: bool) -> String {
    let now = now_ms();
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|row| {
            [
                row.id.clone(),
                row.file.clone(),
                status::human_bytes(row.size),
                row.state.clone(),
                row.attempts.to_string(),
                next_attempt_text(row, view, now),
            ]
        })
        .collect();
    let headers = ["ID", "FILE", "SIZE", "STATE", "ATTEMPTS", "NEXT ATTEMPT"];
    let mut widths = headers.map(str::len);
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let [id, file, size, state, attempts, next] = widths;
    let mut out = format!(
        "{:<id$}  {:<file$}  {:>size$}  {:<state$}  {:>attempts$}  {:<next$}  LAST ERROR\n",
        headers[0], headers[1], headers[2], headers[3], headers[4], headers[5]
    );
    for (row, cell) in rows.iter().zip(&cells) {
        let tone = match row.state.as_str() {
            "rejected" => Tone::Bad,
            "uploaded" | "uploading" => Tone::Good,
            _ => Tone::Plain,
        };
        let state_text = paint(&format!("{:<state$}", cell[3]), tone, colour);
        let line = format!(
            "{:<id$}  {:<file$}  {:>size$}  {state_text}  {:>attempts$}  {:<next$}  {}",
            cell[0],
            cell[1],
            cell[2],
            cell[4],
            cell[5],
            row.last_error.as_deref().unwrap_or("")
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// When the daemon tries the item next, as people read it: `in 2m10s`, `now`,
/// `at start` (no daemon runs), `sending`, `held`, or `-` for items that wait
/// for nothing.
fn next_attempt_text(row: &Row, view: &QueueView, now: u64) -> String {
    match row.state.as_str() {
        "uploading" => "sending".into(),
        "pending" if view.hold.is_some() => "held".into(),
        "pending" => {
            // The destination's backoff delays every item, whatever its own time.
            let at = row
                .next_attempt_ms
                .unwrap_or(0)
                .max(view.destination_next_ms.unwrap_or(0));
            if at <= now && !view.running {
                "at start".into()
            } else if at <= now {
                "now".into()
            } else {
                format!("in {}", short_duration(Duration::from_millis(at - now)))
            }
        }
        _ => "-".into(),
    }
}

fn parse_ms(time: &Option<String>) -> Option<u64> {
    let at = humantime::parse_rfc3339(time.as_deref()?).ok()?;
    Some(at.duration_since(UNIX_EPOCH).ok()?.as_millis() as u64)
}
