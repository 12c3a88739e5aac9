//! The daemon's folders and files: creating and checking the outbox and state
//! dir, the lock that keeps a second daemon out, what happens to a file after
//! its upload, the `rejected/` folder, and watching the token and config files.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use notify::{RecursiveMode, Watcher};

use crate::config::{OnSuccess, Settings};
use crate::intake::{move_no_replace, mtime_ns};
use crate::queue::Queue;
use crate::store::{ItemState, Record};

/// How long a start waits for the state dir lock before it gives up.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Wait after a change to the token or config file before reading it.
const WATCH_SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

/// Free space on the outbox's filesystem below which `status` warns.
const LOW_SPACE_BYTES: u64 = 512 * 1024 * 1024;

/// Creates the outbox and state dir (mode 0700) if missing and checks that both
/// are writable folders. The error names the path and the fix.
pub fn prepare_dirs(settings: &Settings) -> Result<(), String> {
    for (what, path) in [
        ("state dir", &settings.state_dir),
        ("outbox", &settings.outbox),
    ] {
        ensure_dir(what, path)?;
    }
    ensure_dir("rejected folder", &settings.outbox.join("rejected"))?;
    if settings.on_success == OnSuccess::Move {
        ensure_dir("sent folder", &settings.outbox.join("sent"))?;
    }
    Ok(())
}

fn ensure_dir(what: &str, path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(metadata) if !metadata.is_dir() => {
            return Err(format!(
                "the {what} {} is not a folder; remove it or choose another path",
                path.display()
            ))
        }
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|err| {
                    format!(
                        "the {what} {} cannot be created: {err}; create it or choose another path",
                        path.display()
                    )
                })?;
        }
        Err(err) => {
            return Err(format!(
                "the {what} {} cannot be read: {err}",
                path.display()
            ))
        }
    }
    let probe = path.join(format!(".outboxd-write-test-{}", std::process::id()));
    std::fs::File::create(&probe)
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|err| {
            format!(
                "the {what} {} is not writable: {err}; fix its permissions",
                path.display()
            )
        })
}

/// An exclusive lock on `state_dir/lock`, held for the daemon's life. The file
/// holds the pid, so that a second daemon can name the first.
pub struct StateLock {
    _file: std::fs::File,
}

impl StateLock {
    pub fn acquire(state_dir: &Path) -> Result<StateLock, String> {
        let path = state_dir.join("lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|err| format!("the lock file {} cannot be opened: {err}", path.display()))?;
        // `status` and `list` take a shared lock for a few milliseconds while they
        // read the queue of a stopped daemon, so a held lock is retried briefly
        // before it counts as another daemon.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            // SAFETY: flock on an open descriptor has no memory-safety preconditions.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                break;
            }
            if std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            let pid = pid.trim();
            let pid = if pid.is_empty() {
                "unknown".to_string()
            } else {
                pid.to_string()
            };
            return Err(format!(
                "another outboxd (pid {pid}) is already running on the state dir {}; stop it first, or give this one another --state-dir",
                state_dir.display()
            ));
        }
        file.set_len(0)
            .map_err(|err| format!("writing the lock file {} failed: {err}", path.display()))?;
        writeln!(file, "{}", std::process::id())
            .map_err(|err| format!("writing the lock file {} failed: {err}", path.display()))?;
        Ok(StateLock { _file: file })
    }
}

/// A shared lock on `state_dir/lock`, held by `status` and `list` while they
/// read the queue of a stopped daemon. `None` when a daemon holds the lock (it
/// is starting or stopping) or no daemon ever ran there.
pub struct ReaderLock {
    _file: std::fs::File,
}

impl ReaderLock {
    pub fn try_acquire(state_dir: &Path) -> Option<ReaderLock> {
        let file = std::fs::File::open(state_dir.join("lock")).ok()?;
        // SAFETY: flock on an open descriptor has no memory-safety preconditions.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        (rc == 0).then_some(ReaderLock { _file: file })
    }
}

/// True when the file at `path` is still the one the record describes.
pub(super) fn unchanged(path: &Path, record: &Record) -> bool {
    match path.symlink_metadata() {
        Ok(m) => {
            m.is_file()
                && m.len() == record.size
                && mtime_ns(&m) == record.mtime_ns
                && (record.inode == 0 || m.ino() == record.inode)
        }
        Err(_) => false,
    }
}

/// Deletes the uploaded file or moves it to `sent/`. Returns false when the
/// file changed after it was hashed: then it is new content and stays.
pub fn finish_uploaded(settings: &Settings, record: &Record) -> bool {
    let path = settings.outbox.join(&record.file);
    if !unchanged(&path, record) {
        if path.symlink_metadata().is_ok() {
            tracing::info!(id = record.id, file = %record.file, "the file changed after it was sent; the new content is queued");
            return false;
        }
        return true;
    }
    let result = match settings.on_success {
        OnSuccess::Delete => std::fs::remove_file(&path).map(|_| None),
        OnSuccess::Move => {
            let folder = settings.outbox.join("sent");
            std::fs::create_dir_all(&folder)
                .and_then(|_| move_no_replace(&path, &folder, OsStr::new(&record.file)))
                .map(Some)
        }
    };
    if let Err(err) = result {
        tracing::error!(id = record.id, file = %record.file, error = %err, "the file was uploaded but cannot be removed from the outbox; remove it by hand");
    }
    true
}

/// Finishes what a crash interrupted: an `uploaded` record whose file is still
/// in the outbox, unchanged, gets its delete or move.
pub fn finish_interrupted(settings: &Settings, queue: &mut Queue) {
    let leftovers: Vec<Record> = queue
        .records()
        .filter(|r| {
            r.state == ItemState::Uploaded
                && settings.outbox.join(&r.file).symlink_metadata().is_ok()
        })
        .cloned()
        .collect();
    for record in leftovers {
        if unchanged(&settings.outbox.join(&record.file), &record) {
            tracing::info!(id = record.id, file = %record.file, "finishing an upload that a restart interrupted");
            finish_uploaded(settings, &record);
        } else if let Err(err) = queue.remove(record.id) {
            tracing::warn!(id = record.id, error = %err, "dropping an old record failed");
        }
    }
}

/// Counts the files in `rejected/` (their `.reason` files aside).
pub fn count_rejected(outbox: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(outbox.join("rejected")) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            !name.starts_with('.') && !name.ends_with(".reason")
        })
        .count() as u64
}

/// Moves every file in `rejected/` back into the outbox and deletes its reason.
/// Returns how many were moved.
pub fn requeue_rejected(outbox: &Path) -> usize {
    let folder = outbox.join("rejected");
    let Ok(entries) = std::fs::read_dir(&folder) else {
        return 0;
    };
    let mut moved = 0;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let text = name.to_string_lossy();
        if text.starts_with('.') || text.ends_with(".reason") {
            continue;
        }
        match move_no_replace(&entry.path(), outbox, &name) {
            Ok(target) => {
                let mut reason = name.clone();
                reason.push(".reason");
                let _ = std::fs::remove_file(folder.join(reason));
                tracing::info!(file = %text, target = %target.display(), "a rejected file is back in the outbox");
                moved += 1;
            }
            Err(err) => {
                tracing::error!(file = %text, error = %err, "moving a rejected file back failed")
            }
        }
    }
    moved
}

/// A warning when the outbox's filesystem is low on space.
pub fn low_space_warning(outbox: &Path) -> Option<String> {
    let path = std::ffi::CString::new(outbox.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs writes only into the zeroed struct passed to it.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stats) };
    if rc != 0 {
        return None;
    }
    let free = stats.f_bavail as u64 * stats.f_frsize as u64;
    (free < LOW_SPACE_BYTES).then(|| {
        format!(
            "the outbox's filesystem has only {} free; producers may fail to write archives",
            crate::status::human_bytes(free)
        )
    })
}

/// Watches the folders of the token file and the config file, so that in-place
/// writes, atomic renames and symlink swaps of either are all seen.
pub fn watch_token_and_config(
    settings: &Settings,
    shared: Arc<super::Shared>,
) -> Option<notify::RecommendedWatcher> {
    let token_file = settings.token.token_file.clone();
    let config_file = settings.config_path.clone();
    let handle = tokio::runtime::Handle::current();
    // A config folder that does not exist has no file to watch; a config file
    // created there later is read on SIGHUP.
    let config_file = config_file.filter(|p| p.parent().is_some_and(Path::is_dir));
    let names: Vec<(PathBuf, bool)> = [
        token_file.map(|p| (p, false)),
        config_file.map(|p| (p, true)),
    ]
    .into_iter()
    .flatten()
    .collect();
    if names.is_empty() {
        return None;
    }
    let watched = names.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access()
            && !matches!(
                event.kind,
                notify::EventKind::Access(notify::event::AccessKind::Close(
                    notify::event::AccessMode::Write
                ))
            )
        {
            return;
        }
        for (path, is_config) in &watched {
            let hit = event
                .paths
                .iter()
                .any(|p| p.file_name() == path.file_name() && p.parent() == path.parent());
            if hit {
                let shared = shared.clone();
                let is_config = *is_config;
                handle.spawn(async move {
                    // A writer that truncates and rewrites in place produces
                    // several events; reading at the first one could see an empty
                    // file and log a spurious invalid token.
                    tokio::time::sleep(WATCH_SETTLE).await;
                    super::on_watched_change(&shared, is_config)
                });
            }
        }
    })
    .ok()?;
    for (path, _) in &names {
        let folder = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if let Err(err) = watcher.watch(folder, RecursiveMode::NonRecursive) {
            tracing::warn!(folder = %folder.display(), error = %err, "watching for token or config changes failed; changes are picked up on SIGHUP and at each probe");
        }
    }
    Some(watcher)
}

/// Sets a file's mode, ignoring failure (used for the control socket).
pub fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}
