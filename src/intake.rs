//! Outbox intake: noticing files in the outbox, deciding when each one is
//! completely written, and handing complete archives to the queue or moving
//! broken ones to `rejected/`.
//!
//! A file counts as written when its writer closes it (inotify close-write) or
//! when it is renamed in. Where no close can be seen (files present at start,
//! lost events), it counts as written when its size and mtime have not changed
//! for `settle_ms`. A written file that is a complete zip archive is hashed and
//! queued. One that is not is rejected once it was closed and unchanged for
//! `settle_ms`, or unchanged for `reject_after_ms`. A file still being written
//! is never opened for upload, rejected or moved.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use globset::{GlobBuilder, GlobMatcher};
use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RemoveKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::queue::FileFacts;
use crate::zipfile;

/// Matches file names against the `include` glob, case-insensitively. Dot files
/// never match, whatever the glob, because producers write under such names.
#[derive(Debug, Clone)]
pub struct IncludeMatcher(GlobMatcher);

impl IncludeMatcher {
    pub fn new(glob: &str) -> Result<IncludeMatcher, globset::Error> {
        let glob = GlobBuilder::new(glob)
            .case_insensitive(true)
            .literal_separator(true)
            .build()?;
        Ok(IncludeMatcher(glob.compile_matcher()))
    }

    pub fn is_match(&self, name: &OsStr) -> bool {
        !name.as_bytes().starts_with(b".") && self.0.is_match(Path::new(name))
    }
}

/// The queue operations intake needs. The daemon implements them.
pub trait QueueSink: Send + Sync + 'static {
    /// True when a record of this exact file (name, size, mtime, inode) exists.
    fn is_known(&self, name: &str, size: u64, mtime_ns: i128, inode: u64) -> bool;
    /// Queues a complete archive.
    fn accept(&self, facts: FileFacts);
    /// Forgets records whose file is not among `present` (a full rescan).
    fn forget_missing(&self, present: &HashSet<String>);
}

/// Requests to the intake task from the rest of the daemon.
#[derive(Debug)]
pub enum IntakeRequest {
    /// Rescan the outbox now.
    Rescan,
    /// Look at this file again (its upload found it changed).
    Examine(String),
}

/// Settings intake needs.
#[derive(Debug, Clone)]
pub struct IntakeConfig {
    pub outbox: PathBuf,
    pub include: IncludeMatcher,
    pub settle: Duration,
    pub reject_after: Duration,
    pub rescan: Duration,
}

/// The observed state of a file that is not queued yet.
#[derive(Debug, Clone)]
struct Candidate {
    /// Size and mtime at the last look; a change restarts the quiet time.
    seen: Option<(u64, i128)>,
    /// When the size or mtime last changed, or an event reported a change.
    changed_at: Instant,
    /// A close-write or rename-in was seen since the last change.
    closed: bool,
    /// When to look next.
    due: Instant,
}

/// The result of looking at a candidate, computed off the async runtime.
enum Verdict {
    Gone,
    /// Left in place without a log line: a name outside `include`, or `rejected/` and `sent/`.
    Ignore,
    /// Never uploaded and left in place: a symbolic link, a folder, a fifo or
    /// device, or a hard link to another user's file. The message is logged
    /// once per entry, at WARN when `suspicious`.
    Leave {
        message: String,
        suspicious: bool,
    },
    Known,
    /// Still changing, or not yet quiet for long enough: look again at `due`.
    /// `stat` is the size and mtime seen now.
    Wait {
        due: Instant,
        stat: Option<(u64, i128)>,
    },
    Queue(FileFacts),
    Reject(String),
}

/// Starts the watcher and the intake task. Returns the sender for requests.
/// The initial scan runs before this returns, so that the daemon is ready only
/// once the files present at start are known.
pub async fn start(
    config: IntakeConfig,
    sink: Arc<dyn QueueSink>,
) -> anyhow::Result<(
    mpsc::UnboundedSender<IntakeRequest>,
    tokio::task::JoinHandle<()>,
)> {
    let (event_tx, event_rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event| {
        let _ = event_tx.send(event);
    })?;
    watcher
        .watch(&config.outbox, RecursiveMode::NonRecursive)
        .map_err(|err| {
            anyhow::anyhow!(
                "watching the outbox {} failed: {err}",
                config.outbox.display()
            )
        })?;

    // The outbox's own deletion is reported late or not at all while the daemon
    // holds it open (its lock), so the parent folder is watched for it too.
    if let Some(parent) = config.outbox.parent() {
        if let Err(err) = watcher.watch(parent, RecursiveMode::NonRecursive) {
            tracing::debug!(folder = %parent.display(), error = %err, "watching the outbox's parent folder failed; a deleted outbox is noticed at the next rescan");
        }
    }
    let (request_tx, request_rx) = mpsc::unbounded_channel();
    let watched = folder_identity(&config.outbox);
    let mut intake = Intake {
        config,
        sink,
        candidates: HashMap::new(),
        reported: HashSet::new(),
        ready: Vec::new(),
        watcher,
        watched,
    };
    intake.rescan(true).await;
    intake.process_due().await;
    let handle = tokio::spawn(async move {
        intake.run(event_rx, request_rx).await;
    });
    Ok((request_tx, handle))
}

struct Intake {
    config: IntakeConfig,
    sink: Arc<dyn QueueSink>,
    candidates: HashMap<OsString, Candidate>,
    /// Entries already logged as left in place (symlinks, folders, fifos).
    reported: HashSet<OsString>,
    /// Candidates to look at now, in event order.
    ready: Vec<OsString>,
    /// The outbox watcher; it stops when dropped, so intake owns it.
    watcher: notify::RecommendedWatcher,
    /// Device and inode of the watched outbox, to notice it being replaced.
    watched: Option<(u64, u64)>,
}

impl Intake {
    async fn run(
        &mut self,
        mut events: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
        mut requests: mpsc::UnboundedReceiver<IntakeRequest>,
    ) {
        let mut rescan_at = Instant::now() + self.config.rescan;
        loop {
            let next_due = self.candidates.values().map(|c| c.due).min();
            let wake = next_due.map_or(rescan_at, |due| due.min(rescan_at));
            tokio::select! {
                event = events.recv() => {
                    let Some(event) = event else { return };
                    self.on_event(event);
                    // Take every event already queued before looking at files, so
                    // that a burst costs one look per file, not one per event.
                    while let Ok(event) = events.try_recv() {
                        self.on_event(event);
                    }
                }
                request = requests.recv() => match request {
                    Some(IntakeRequest::Rescan) => self.rescan(true).await,
                    Some(IntakeRequest::Examine(name)) => self.touch(OsString::from(name), true),
                    None => return,
                },
                _ = tokio::time::sleep_until(wake.into()) => {
                    if Instant::now() >= rescan_at {
                        self.rescan(true).await;
                        rescan_at = Instant::now() + self.config.rescan;
                    }
                }
            }
            self.process_due().await;
        }
    }

    fn on_event(&mut self, event: notify::Result<notify::Event>) {
        let event = match event {
            Ok(event) => event,
            Err(err) => {
                tracing::warn!(error = %err, "the outbox watcher reported an error; rescanning");
                self.schedule_rescan();
                return;
            }
        };
        if event.need_rescan() {
            tracing::warn!("the outbox watcher lost events (kernel queue overflow); rescanning");
            self.schedule_rescan();
            return;
        }
        let closed = matches!(
            event.kind,
            EventKind::Access(AccessKind::Close(AccessMode::Write))
                | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
        );
        let removed = matches!(
            event.kind,
            EventKind::Remove(RemoveKind::File | RemoveKind::Any)
                | EventKind::Modify(ModifyKind::Name(RenameMode::From))
        );
        let paths: Vec<PathBuf> = match event.kind {
            // Both carries [from, to]; only the destination is of interest.
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                event.paths.into_iter().skip(1).collect()
            }
            _ => event.paths,
        };
        for path in paths {
            if path == self.config.outbox {
                // The outbox itself was deleted or moved away: the rescan
                // creates and watches it again.
                if event.kind.is_remove()
                    || matches!(event.kind, EventKind::Modify(ModifyKind::Name(_)))
                {
                    self.schedule_rescan();
                }
                continue;
            }
            if path.parent() != Some(self.config.outbox.as_path()) {
                continue;
            }
            let Some(name) = path.file_name().map(OsStr::to_os_string) else {
                continue;
            };
            if removed {
                self.candidates.remove(&name);
                self.reported.remove(&name);
            } else if matches!(event.kind, EventKind::Create(CreateKind::Folder)) {
                self.touch(name, false);
            } else {
                self.touch(name, closed);
            }
        }
    }

    /// Notes activity on a file. `closed` means a writer finished with it.
    fn touch(&mut self, name: OsString, closed: bool) {
        let now = Instant::now();
        let candidate = self.candidates.entry(name.clone()).or_insert(Candidate {
            seen: None,
            changed_at: now,
            closed: false,
            due: now,
        });
        if closed {
            candidate.closed = true;
            candidate.due = now;
            self.ready.push(name);
        } else {
            candidate.closed = false;
            candidate.changed_at = now;
            candidate.due = now + self.config.settle;
        }
    }

    fn schedule_rescan(&mut self) {
        // A rescan at the next turn of the loop; the candidate map keeps what
        // events were seen.
        let now = Instant::now();
        self.candidates.entry(OsString::new()).or_insert(Candidate {
            seen: None,
            changed_at: now,
            closed: false,
            due: now,
        });
    }

    /// Lists the outbox and makes a candidate of every entry that is not queued
    /// with the same size, mtime and inode. With `forget`, records whose file is
    /// gone are dropped.
    async fn rescan(&mut self, forget: bool) {
        self.rewatch_if_replaced();
        let outbox = self.config.outbox.clone();
        let sink = self.sink.clone();
        let listing =
            tokio::task::spawn_blocking(move || list_outbox(&outbox, sink.as_ref())).await;
        let (unknown, present) = match listing {
            Ok(Ok(listing)) => listing,
            Ok(Err(err)) => {
                tracing::error!(outbox = %self.config.outbox.display(), error = %err, "listing the outbox failed; retrying at the next rescan");
                return;
            }
            Err(err) => {
                tracing::error!(error = %err, "the outbox rescan task failed");
                return;
            }
        };
        if forget {
            self.sink.forget_missing(&present);
        }
        let now = Instant::now();
        for name in unknown {
            self.candidates.entry(name).or_insert(Candidate {
                seen: None,
                changed_at: now,
                closed: false,
                due: now,
            });
        }
    }

    /// Recreates and watches the outbox again when it was deleted or replaced,
    /// because inotify watches the folder's inode, not its path.
    fn rewatch_if_replaced(&mut self) {
        let outbox = self.config.outbox.clone();
        let current = folder_identity(&outbox);
        if current.is_some() && current == self.watched {
            return;
        }
        if current.is_none() {
            if let Err(err) = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&outbox)
            {
                tracing::error!(outbox = %outbox.display(), error = %err, "the outbox was deleted and cannot be created again; producers cannot drop files");
                return;
            }
        }
        let _ = self.watcher.unwatch(&outbox);
        match self.watcher.watch(&outbox, RecursiveMode::NonRecursive) {
            Ok(()) => {
                tracing::warn!(outbox = %outbox.display(), "the outbox was deleted or replaced; watching the new folder");
                self.watched = folder_identity(&outbox);
            }
            Err(err) => {
                tracing::error!(outbox = %outbox.display(), error = %err, "watching the outbox again failed; files are found by the periodic rescan")
            }
        }
    }

    /// Looks at every candidate that is due, in blocking tasks, and acts on the verdicts.
    async fn process_due(&mut self) {
        let now = Instant::now();
        if self.candidates.remove(&OsString::new()).is_some() {
            self.rescan(true).await;
        }
        // notify reports a rename into the outbox twice: the destination
        // alone, and paired with its source. So a name can be ready twice,
        // but each file is examined, and hashed, once.
        let mut seen: HashSet<OsString> = HashSet::new();
        let mut names: Vec<OsString> = std::mem::take(&mut self.ready);
        names.retain(|name| seen.insert(name.clone()));
        for (name, candidate) in &self.candidates {
            if candidate.due <= now && seen.insert(name.clone()) {
                names.push(name.clone());
            }
        }
        if names.is_empty() {
            return;
        }
        let jobs: Vec<(OsString, Candidate)> = names
            .into_iter()
            .filter_map(|name| self.candidates.get(&name).cloned().map(|c| (name, c)))
            .collect();
        let config = self.config.clone();
        let sink = self.sink.clone();
        let verdicts = tokio::task::spawn_blocking(move || {
            jobs.into_iter()
                .map(|(name, candidate)| {
                    let verdict = examine(&config, sink.as_ref(), &name, &candidate);
                    (name, candidate, verdict)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();

        for (name, before, verdict) in verdicts {
            if !matches!(verdict, Verdict::Leave { .. }) {
                self.reported.remove(&name);
            }
            match verdict {
                Verdict::Gone | Verdict::Ignore | Verdict::Known => {
                    self.candidates.remove(&name);
                }
                Verdict::Leave {
                    message,
                    suspicious,
                } => {
                    self.candidates.remove(&name);
                    // Each rescan finds the entry again, so only the first look logs.
                    if self.reported.insert(name.clone()) {
                        let shown = log_name(&name);
                        if suspicious {
                            tracing::warn!(file = %shown, "left in place: {message}");
                        } else {
                            tracing::info!(file = %shown, "left in place: {message}");
                        }
                    }
                }
                Verdict::Queue(facts) => {
                    self.candidates.remove(&name);
                    self.sink.accept(facts);
                }
                Verdict::Reject(reason) => {
                    self.candidates.remove(&name);
                    let shown = log_name(&name);
                    match reject(&self.config.outbox, &name, &reason) {
                        Ok(target) => {
                            let rejected = log_name(target.as_os_str());
                            tracing::warn!(file = %shown, reason = %reason, rejected = %rejected, "rejected a file; see the reason beside it in rejected/")
                        }
                        Err(err) => {
                            tracing::error!(file = %shown, reason = %reason, error = %err, "moving a broken file to rejected/ failed; it stays in the outbox")
                        }
                    }
                }
                Verdict::Wait { due, stat } => {
                    let Some(candidate) = self.candidates.get_mut(&name) else {
                        continue;
                    };
                    // An event that arrived while the file was examined decides
                    // the next look itself.
                    if candidate.changed_at != before.changed_at
                        || candidate.closed != before.closed
                    {
                        continue;
                    }
                    if stat != before.seen {
                        if before.seen.is_some() {
                            // Changed since the last look: a writer is still at it.
                            candidate.changed_at = Instant::now();
                            candidate.closed = false;
                        }
                        candidate.seen = stat;
                    }
                    candidate.due = due;
                }
            }
        }
        // Entries logged once as left in place.
        self.reported
            .retain(|name| self.config.outbox.join(name).symlink_metadata().is_ok());
    }
}

/// Returns a file name for a log line, lossily decoded, with control
/// characters escaped (see [`escape_for_log`]).
fn log_name(name: &OsStr) -> String {
    escape_for_log(&name.to_string_lossy())
}

/// Escapes the control characters of a file name for a log line. A producer
/// chooses the names in the outbox, and a raw line break in one would let it
/// write a forged line into a text log.
pub fn escape_for_log(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Describes a file that is a hard link to a file of another user, which is
/// never uploaded. Otherwise a user who can write into the outbox could make
/// the daemon send a file that only the daemon's user can read.
fn foreign_hard_link(metadata: &std::fs::Metadata) -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    (metadata.nlink() > 1 && metadata.uid() != euid).then(|| {
        format!(
            "a hard link to a file of uid {} (this daemon runs as uid {euid}) is never uploaded; \
             copy the archive into the outbox, or move it there as its owner",
            metadata.uid()
        )
    })
}

pub fn mtime_ns(metadata: &std::fs::Metadata) -> i128 {
    metadata.mtime() as i128 * 1_000_000_000 + metadata.mtime_nsec() as i128
}

/// Lists the outbox: names not queued as they are now, and the UTF-8 names present.
fn folder_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| (m.dev(), m.ino()))
}

fn list_outbox(
    outbox: &Path,
    sink: &dyn QueueSink,
) -> std::io::Result<(Vec<OsString>, HashSet<String>)> {
    let mut unknown = Vec::new();
    let mut present = HashSet::new();
    for entry in std::fs::read_dir(outbox)? {
        let entry = entry?;
        let name = entry.file_name();
        if let Some(text) = name.to_str() {
            present.insert(text.to_string());
        }
        let Ok(metadata) = entry.metadata() else {
            continue;
        };
        if metadata.is_dir() {
            // rejected/ and sent/ are the daemon's own; other folders are
            // reported once when examined.
            if name == "rejected" || name == "sent" {
                continue;
            }
        }
        let known = name.to_str().is_some_and(|text| {
            sink.is_known(text, metadata.len(), mtime_ns(&metadata), metadata.ino())
        });
        if !known {
            unknown.push(name);
        }
    }
    Ok((unknown, present))
}

/// Decides what to do with one candidate. Runs on the blocking pool.
fn examine(
    config: &IntakeConfig,
    sink: &dyn QueueSink,
    name: &OsStr,
    candidate: &Candidate,
) -> Verdict {
    let path = config.outbox.join(name);
    let shown = log_name(name);
    let metadata = match path.symlink_metadata() {
        Ok(metadata) => metadata,
        Err(_) => return Verdict::Gone,
    };
    let file_type = metadata.file_type();
    if !file_type.is_file() {
        let kind = if file_type.is_symlink() {
            "a symbolic link"
        } else if file_type.is_dir() {
            "a folder"
        } else {
            "not a regular file"
        };
        if file_type.is_dir() && (name == "rejected" || name == "sent") {
            return Verdict::Ignore;
        }
        return Verdict::Leave {
            message: format!("{kind} in the outbox is never uploaded"),
            suspicious: false,
        };
    }
    if !config.include.is_match(name) {
        if !name.as_bytes().starts_with(b".") {
            tracing::debug!(file = %shown, "left in place: the name does not match include");
        }
        return Verdict::Ignore;
    }
    if let Some(message) = foreign_hard_link(&metadata) {
        return Verdict::Leave {
            message,
            suspicious: true,
        };
    }
    let now = Instant::now();
    let stat = (metadata.len(), mtime_ns(&metadata));
    let wait = |delay: Duration| Verdict::Wait {
        due: now + delay.max(Duration::from_millis(10)),
        stat: Some(stat),
    };
    // Quiet time: how long the size and mtime have been seen unchanged, or how
    // long ago the file was last modified, whichever is longer. The second lets
    // a file that was there at start count as written without waiting.
    let observed = if candidate.seen == Some(stat) {
        now.duration_since(candidate.changed_at)
    } else {
        Duration::ZERO
    };
    let mtime_age = metadata
        .modified()
        .ok()
        .and_then(|modified| SystemTime::now().duration_since(modified).ok())
        .unwrap_or_default();
    let quiet = observed.max(mtime_age);
    let written = candidate.closed || quiet >= config.settle;

    let Some(text_name) = name.to_str() else {
        if quiet >= config.settle {
            return Verdict::Reject(
                "the file name is not valid UTF-8; rename it to a UTF-8 name and move it back into the outbox".into(),
            );
        }
        return wait(config.settle - quiet);
    };
    if sink.is_known(text_name, metadata.len(), stat.1, metadata.ino()) {
        return Verdict::Known;
    }
    if !written {
        return wait(config.settle - quiet);
    }

    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)
    {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Verdict::Gone,
        Err(err) => {
            tracing::warn!(file = %shown, error = %err, "the file cannot be opened; it stays in the outbox and is tried again");
            return wait(config.settle.max(Duration::from_secs(5)));
        }
    };
    let Ok(opened) = file.metadata() else {
        return wait(config.settle);
    };
    if !opened.is_file() || opened.ino() != metadata.ino() {
        return wait(config.settle);
    }
    // A link made between the look above and the open.
    if let Some(message) = foreign_hard_link(&opened) {
        return Verdict::Leave {
            message,
            suspicious: true,
        };
    }
    if let Err(problem) = zipfile::check_complete(&mut file, opened.len()) {
        let closed_and_quiet = candidate.closed && quiet >= config.settle;
        if closed_and_quiet || quiet >= config.reject_after {
            return Verdict::Reject(problem.to_string());
        }
        let limit = if candidate.closed {
            config.settle
        } else {
            config.reject_after
        };
        return wait(limit.saturating_sub(quiet));
    }
    use std::io::Seek;
    if file.rewind().is_err() {
        return wait(config.settle);
    }
    let (sha256, hashed) = match crate::upload::sha256_file(&mut file) {
        Ok(result) => result,
        Err(err) => {
            tracing::warn!(file = %shown, error = %err, "reading the file failed; it is tried again");
            return wait(config.settle.max(Duration::from_secs(5)));
        }
    };
    // A writer that kept going while the file was hashed makes the hash stale.
    let after = match file.metadata() {
        Ok(after) => after,
        Err(_) => return wait(config.settle),
    };
    if hashed != opened.len()
        || after.len() != opened.len()
        || mtime_ns(&after) != mtime_ns(&opened)
    {
        return Verdict::Wait {
            due: Instant::now() + config.settle,
            stat: Some((after.len(), mtime_ns(&after))),
        };
    }
    Verdict::Queue(FileFacts {
        file: text_name.to_string(),
        size: opened.len(),
        mtime_ns: mtime_ns(&opened),
        inode: opened.ino(),
        sha256,
    })
}

/// Moves `outbox/name` to `outbox/rejected/` with a `.reason` file beside it.
/// A name already taken there gets a numeric suffix; nothing is overwritten.
pub fn reject(outbox: &Path, name: &OsStr, reason: &str) -> std::io::Result<PathBuf> {
    let folder = outbox.join("rejected");
    std::fs::create_dir_all(&folder)?;
    let target = move_no_replace(&outbox.join(name), &folder, name)?;
    let mut reason_name = target.file_name().unwrap_or(name).to_os_string();
    reason_name.push(".reason");
    let reason_path = folder.join(&reason_name);
    let mut temp_name = OsString::from(".");
    temp_name.push(&reason_name);
    temp_name.push(".tmp");
    let temp = folder.join(temp_name);
    let line: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    // The file is already in rejected/, so a reason that cannot be written (a
    // name at the filesystem's length limit, a full disk) is logged, not returned.
    let written = std::fs::write(&temp, format!("{line}\n"))
        .and_then(|()| std::fs::rename(&temp, &reason_path));
    if let Err(err) = written {
        let _ = std::fs::remove_file(&temp);
        tracing::error!(
            file = %log_name(target.file_name().unwrap_or(name)),
            reason = %reason,
            error = %err,
            "writing the .reason file beside a rejected file failed; the reason is only in this log"
        );
    }
    Ok(target)
}

/// Renames `from` into `folder` under `name`, or `stem.N.ext` when the name is
/// taken, without ever replacing an existing file. Returns the new path.
pub fn move_no_replace(from: &Path, folder: &Path, name: &OsStr) -> std::io::Result<PathBuf> {
    for n in 0..10_000u32 {
        let candidate = if n == 0 {
            name.to_os_string()
        } else {
            numbered(name, n)
        };
        let target = folder.join(&candidate);
        let mut reason = candidate.clone();
        reason.push(".reason");
        if folder.join(&reason).exists() {
            continue;
        }
        match rename_no_replace(from, &target) {
            Ok(()) => return Ok(target),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err),
        }
    }
    Err(std::io::Error::other(format!(
        "no free name for {} in {}",
        name.to_string_lossy(),
        folder.display()
    )))
}

fn numbered(name: &OsStr, n: u32) -> OsString {
    let bytes = name.as_bytes();
    match bytes.iter().rposition(|&b| b == b'.').filter(|&i| i > 0) {
        Some(dot) => {
            let mut out = bytes[..dot].to_vec();
            out.extend_from_slice(format!(".{n}").as_bytes());
            out.extend_from_slice(&bytes[dot..]);
            OsString::from(std::ffi::OsStr::from_bytes(&out))
        }
        None => {
            let mut out = name.to_os_string();
            out.push(format!(".{n}"));
            out
        }
    }
}

/// Renames `from` to `to` unless `to` exists, which fails with `AlreadyExists`.
pub fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    let from_c = CString::new(from.as_os_str().as_bytes())?;
    let to_c = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EINVAL) || err.raw_os_error() == Some(libc::ENOSYS) {
        // Filesystems without RENAME_NOREPLACE: a link fails if the target exists.
        std::fs::hard_link(from, to)?;
        return std::fs::remove_file(from);
    }
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_table() {
        let matcher = IncludeMatcher::new("*.zip").unwrap();
        for (name, expected) in [
            ("a.zip", true),
            ("A.ZIP", true),
            ("a.zip.part", false),
            (".a.zip", false),
            ("a.txt", false),
            ("dir/a.zip", false),
        ] {
            assert_eq!(matcher.is_match(OsStr::new(name)), expected, "{name}");
        }
    }

    #[test]
    fn log_name_escapes_control_characters() {
        assert_eq!(
            log_name(OsStr::new("a\nb\t\u{1b}[31m.zip")),
            "a\\nb\\t\\u{1b}[31m.zip"
        );
        assert_eq!(
            log_name(OsStr::from_bytes(b"bad\xff.zip")),
            "bad\u{fffd}.zip"
        );
        assert_eq!(log_name(OsStr::new("plain name.zip")), "plain name.zip");
    }

    #[test]
    fn reject_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..3 {
            std::fs::write(dir.path().join("bad.zip"), format!("round {round}")).unwrap();
            reject(dir.path(), OsStr::new("bad.zip"), "not a zip").unwrap();
        }
        let folder = dir.path().join("rejected");
        for (name, content) in [
            ("bad.zip", "round 0"),
            ("bad.1.zip", "round 1"),
            ("bad.2.zip", "round 2"),
        ] {
            assert_eq!(
                std::fs::read_to_string(folder.join(name)).unwrap(),
                content,
                "{name}"
            );
            let reason = std::fs::read_to_string(folder.join(format!("{name}.reason"))).unwrap();
            assert_eq!(reason, "not a zip\n");
        }
    }
}
