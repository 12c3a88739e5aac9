//! Reading the daemon's state for `status` and `list`: through the control
//! socket when the daemon runs, or from the state dir when it does not.

use std::path::Path;

use crate::config::Settings;
use crate::control::{self, ClientError, Request};
use crate::queue::Queue;
use crate::status::{self, StatusReport};
use crate::store::{ItemState, Record, Store};
use crate::timefmt::rfc3339;

/// Returns the status report of the running daemon, or one built from the
/// state dir when no daemon runs. The error is a message for stderr.
pub async fn fetch_report(settings: &Settings) -> Result<StatusReport, String> {
    match control::request(&settings.state_dir, &Request::Status).await {
        Ok(reply) => reply
            .status
            .ok_or_else(|| "the daemon's reply has no status".to_string()),
        Err(ClientError::NotRunning(_)) => Ok(offline_report(settings)),
        Err(err) => Err(err.to_string()),
    }
}

/// Reads the queue from the state dir, never creating anything there. If a
/// daemon is starting, the queue is not read and the counts are left at zero.
pub fn read_records(settings: &Settings) -> (Vec<Record>, u64, Option<String>) {
    if !settings.state_dir.join("queue").exists() {
        return (Vec::new(), 0, None);
    }
    // A daemon takes the state dir lock before it opens the queue database,
    // whose own lock it waits for only a few seconds. Reading the database
    // then, for example from a status poll every second, could make it exit.
    if let Some(pid) = lock_holder(&settings.state_dir) {
        let message = format!(
            "process {pid} holds the state dir lock but does not answer on the control socket yet \
             (a daemon that is starting), so the queue is not read now; try again in a few seconds"
        );
        return (Vec::new(), 0, Some(message));
    }
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

fn offline_report(settings: &Settings) -> StatusReport {
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
        last_error_at: None,
        warnings: Vec::new(),
        outbox: settings.outbox.display().to_string(),
        state_dir: settings.state_dir.display().to_string(),
        token_fingerprint: None,
    }
}

/// Returns the pid that holds the lock on `state_dir/lock`, read from
/// /proc/locks. Taking the lock to test it, even for a moment, could make a
/// daemon that starts at that moment exit, so it is never taken.
pub fn lock_holder(state_dir: &Path) -> Option<u32> {
    crate::daemon::flock_holder(&state_dir.join("lock"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;

    #[test]
    fn lock_holder_finds_own_lock() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(lock_holder(dir.path()), None, "no lock file");
        let file = std::fs::File::create(dir.path().join("lock")).unwrap();
        assert_eq!(lock_holder(dir.path()), None, "the file is not locked");
        // SAFETY: flock on an open descriptor has no memory-safety preconditions.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(rc, 0);
        assert_eq!(lock_holder(dir.path()), Some(std::process::id()));
    }
}
