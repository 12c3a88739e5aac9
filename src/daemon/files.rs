//! The daemon's folders and files: creating and checking the outbox and state
//! dir, the lock that keeps a second daemon out, what happens to a file after
//! its upload, the `rejected/` folder, and watching the token and config files.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use notify::{RecursiveMode, Watcher};

use crate::config::{OnSuccess, Settings};
use crate::intake::{escape_for_log, move_no_replace, mtime_ns};
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
    restrict_state_dir(&settings.state_dir);
    ensure_dir("rejected folder", &settings.outbox.join("rejected"))?;
    if settings.on_success == OnSuccess::Move {
        ensure_dir("sent folder", &settings.outbox.join("sent"))?;
    }
    Ok(())
}

/// Sets an existing state dir to mode 0700, because it contains the control
/// socket and the queue, which other users must not reach.
fn restrict_state_dir(path: &Path) {
    let Ok(metadata) = std::fs::metadata(path) else {
        return;
    };
    let mode = metadata.mode() & 0o777;
    if mode & 0o077 == 0 {
        return;
    }
    match set_mode(path, 0o700) {
        Ok(()) => {
            tracing::warn!(state_dir = %path.display(), old_mode = %format!("{mode:04o}"), "the state dir was open to other users; set its mode to 0700")
        }
        Err(err) => {
            tracing::warn!(state_dir = %path.display(), error = %err, "the state dir is open to other users and its mode cannot be changed; run chmod 700 on it")
        }
    }
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
/// contains the pid, so that a second daemon can name the first.
pub struct StateLock {
    _file: std::fs::File,
}

impl StateLock {
    /// Locks the state dir (`state_dir/lock`).
    pub fn acquire(state_dir: &Path) -> Result<StateLock, String> {
        StateLock::lock_file(&state_dir.join("lock"), state_dir)
    }

    /// Locks the outbox folder itself, because two daemons on one outbox with
    /// different state dirs would upload every file twice. Locking the folder
    /// leaves no lock file among the archives.
    pub fn acquire_outbox(outbox: &Path) -> Result<StateLock, String> {
        let file = std::fs::File::open(outbox)
            .map_err(|err| format!("the outbox {} cannot be opened: {err}", outbox.display()))?;
        // SAFETY: flock on an open descriptor has no memory-safety preconditions.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let pid = flock_holder(outbox).map_or("unknown".to_string(), |pid| pid.to_string());
            return Err(format!(
                "another outboxd (pid {pid}) is already running on the outbox {}; stop it first, or give this one another --outbox",
                outbox.display()
            ));
        }
        Ok(StateLock { _file: file })
    }

    fn lock_file(path: &Path, state_dir: &Path) -> Result<StateLock, String> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
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
            let pid = std::fs::read_to_string(path).unwrap_or_default();
            let pid = pid.trim();
            let pid = if pid.is_empty() { "unknown" } else { pid };
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

/// Returns the pid that holds a `flock` on `path` (a file or a folder), read
/// from /proc/locks.
pub fn flock_holder(path: &Path) -> Option<u32> {
    let metadata = std::fs::metadata(path).ok()?;
    let device = format!(
        "{:02x}:{:02x}",
        libc::major(metadata.dev()),
        libc::minor(metadata.dev())
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    // Lines look like "1: FLOCK  ADVISORY  WRITE 27800 fe:00:10068041 0 EOF".
    // Lines with "->" are processes waiting for a lock, not holding it.
    let holders: Vec<(u32, &str, u64)> = locks
        .lines()
        .filter(|line| !line.contains("->"))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 6 || fields[1] != "FLOCK" {
                return None;
            }
            let (file_device, inode) = fields[5].rsplit_once(':')?;
            Some((fields[4].parse().ok()?, file_device, inode.parse().ok()?))
        })
        .collect();
    let same_inode = |&&(_, _, inode): &&(u32, &str, u64)| inode == metadata.ino();
    // Some filesystems (btrfs subvolumes) report another device number in
    // stat than in /proc/locks, so an inode match alone is the fallback.
    holders
        .iter()
        .filter(same_inode)
        .find(|(_, file_device, _)| *file_device == device)
        .or_else(|| holders.iter().find(same_inode))
        .map(|&(pid, _, _)| pid)
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
            tracing::info!(id = record.id, file = %escape_for_log(&record.file), "the file changed after it was sent; the new content is queued");
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
        tracing::error!(id = record.id, file = %escape_for_log(&record.file), error = %err, "the file was uploaded but cannot be removed from the outbox; remove it by hand");
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
            tracing::info!(id = record.id, file = %escape_for_log(&record.file), "finishing an upload that a restart interrupted");
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
                tracing::info!(file = %escape_for_log(&text), target = %escape_for_log(&target.display().to_string()), "a rejected file is back in the outbox");
                moved += 1;
            }
            Err(err) => {
                tracing::error!(file = %escape_for_log(&text), error = %err, "moving a rejected file back failed")
            }
        }
    }
    moved
}

/// Returns a warning when the outbox's filesystem is low on space.
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
/// writes, atomic renames and symlink swaps of either are all seen. When a path
/// is a symbolic link, the folder of its target is watched too, so that an edit
/// of the target elsewhere is seen.
pub fn watch_token_and_config(
    settings: &Settings,
    shared: Arc<super::Shared>,
) -> Option<notify::RecommendedWatcher> {
    let mut targets: Vec<WatchTarget> = Vec::new();
    if let Some(token_file) = &settings.token.token_file {
        // Any change in the token's folder leads to a fresh read: the read is
        // cheap, and swaps such as Kubernetes' `..data` rename another entry.
        for path in path_and_target(token_file) {
            targets.push(WatchTarget {
                folder: parent_of(&path),
                name: None,
                config: false,
            });
        }
    }
    // A config folder that does not exist has no file to watch; a config file
    // created there later is read on SIGHUP.
    if let Some(config_file) = settings
        .config_path
        .as_ref()
        .filter(|p| parent_of(p).is_dir())
    {
        for path in path_and_target(config_file) {
            let name = path.file_name().map(|n| n.to_os_string());
            targets.push(WatchTarget {
                folder: parent_of(&path),
                name,
                config: true,
            });
        }
    }
    if targets.is_empty() {
        return None;
    }

    let handle = tokio::runtime::Handle::current();
    let scheduled = [
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    ];
    let watched = targets.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let is_write_close = matches!(
            event.kind,
            notify::EventKind::Access(notify::event::AccessKind::Close(
                notify::event::AccessMode::Write
            ))
        );
        if event.kind.is_access() && !is_write_close {
            return;
        }
        for config in [false, true] {
            let hit = watched.iter().filter(|t| t.config == config).any(|target| {
                event.paths.iter().any(|p| {
                    p.parent() == Some(target.folder.as_path())
                        && target
                            .name
                            .as_deref()
                            .is_none_or(|name| p.file_name() == Some(name))
                })
            });
            let flag = scheduled[usize::from(config)].clone();
            // One read per burst of events: a read is already on its way.
            if !hit || flag.swap(true, Ordering::SeqCst) {
                continue;
            }
            let shared = shared.clone();
            handle.spawn(async move {
                // A writer that truncates and rewrites in place produces several
                // events. Reading at the first one could see an empty file.
                tokio::time::sleep(WATCH_SETTLE).await;
                flag.store(false, Ordering::SeqCst);
                super::on_watched_change(&shared, config)
            });
        }
    })
    .ok()?;
    let mut folders: Vec<&Path> = targets.iter().map(|t| t.folder.as_path()).collect();
    folders.sort();
    folders.dedup();
    for folder in folders {
        if let Err(err) = watcher.watch(folder, RecursiveMode::NonRecursive) {
            tracing::warn!(folder = %folder.display(), error = %err, "watching for token or config changes failed; changes are picked up on SIGHUP and at each periodic check");
        }
    }
    Some(watcher)
}

/// A folder to watch, and the entry name that matters in it (`None`: any).
#[derive(Clone)]
struct WatchTarget {
    folder: PathBuf,
    name: Option<std::ffi::OsString>,
    config: bool,
}

fn parent_of(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// Returns the path, and its resolved target when that differs (a symbolic link).
fn path_and_target(path: &Path) -> Vec<PathBuf> {
    let mut paths = vec![path.to_path_buf()];
    if let Ok(target) = std::fs::canonicalize(path) {
        if parent_of(&target) != parent_of(path) {
            paths.push(target);
        }
    }
    paths
}

/// Sets a file's mode, ignoring failure (used for the control socket).
pub fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load, RawSettings};

    #[test]
    fn prepare_dirs_restricts_open_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        std::fs::create_dir(&state_dir).unwrap();
        set_mode(&state_dir, 0o755).unwrap();
        let flags = RawSettings {
            state_dir: Some(state_dir.clone()),
            outbox: Some(dir.path().join("outbox")),
            ..Default::default()
        };
        let settings = load(None, flags, |_| None).settings;

        prepare_dirs(&settings).unwrap();

        let mode = std::fs::metadata(&state_dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700, "state dir mode {mode:04o}");
        let outbox_mode = std::fs::metadata(dir.path().join("outbox")).unwrap().mode() & 0o777;
        assert_eq!(outbox_mode, 0o700, "new outbox mode {outbox_mode:04o}");
    }

    #[test]
    fn prepare_dirs_rejects_file_as_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = dir.path().join("outbox");
        std::fs::write(&outbox, "not a folder").unwrap();
        let flags = RawSettings {
            state_dir: Some(dir.path().join("state")),
            outbox: Some(outbox.clone()),
            ..Default::default()
        };
        let settings = load(None, flags, |_| None).settings;

        let error = prepare_dirs(&settings).unwrap_err();

        assert!(error.contains(&outbox.display().to_string()), "{error}");
        assert!(error.contains("not a folder"), "{error}");
    }
}
