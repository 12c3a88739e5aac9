//! `outboxd run`: start-up checks, the lock on the state dir, the dispatcher
//! that starts uploads, the handling of their results, reloads, and shutdown.

mod files;
mod state;

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

use crate::config::{Loaded, RawSettings, Settings};
use crate::control;
use crate::intake::{self, escape_for_log, IncludeMatcher, IntakeConfig, IntakeRequest, QueueSink};
use crate::outcome::{HoldKind, Outcome};
use crate::queue::{FileFacts, Queue};
use crate::status::{self, StatusReport};
use crate::store::{ItemState, Record, Store};
use crate::timefmt::{now_ms, rfc3339};
use crate::token;
use crate::upload::{Attempt, LocalFault, UploadJob, Uploader};

pub use files::{
    count_rejected, finish_interrupted, finish_uploaded, flock_holder, prepare_dirs, ReaderLock,
    StateLock,
};
pub use state::{Auth, Reach};
use state::{AuthState, Core, DestinationState, HoldOrigin, InFlight, TokenState};

/// A start-up failure of `run`, with the exit code to use.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StartError {
    pub code: i32,
    pub message: String,
}

/// The command-line settings of `run`, kept for reloads.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    pub config_flag: Option<PathBuf>,
    pub flags: RawSettings,
}

/// The state shared by the daemon's tasks.
pub struct Shared {
    core: Mutex<Core>,
    wake: Notify,
    launch: Launch,
    store: Store,
    intake: Mutex<Option<mpsc::UnboundedSender<IntakeRequest>>>,
    started_at: u64,
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, Core> {
        // A panic while the lock was held leaves the state as it was at the
        // panic; the daemon keeps serving rather than failing every task.
        self.core
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn examine(&self, file: &str) {
        if let Some(tx) = self
            .intake
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = tx.send(IntakeRequest::Examine(file.to_string()));
        }
    }

    fn rescan(&self) {
        if let Some(tx) = self
            .intake
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = tx.send(IntakeRequest::Rescan);
        }
    }
}

impl QueueSink for Shared {
    fn is_known(&self, name: &str, size: u64, mtime_ns: i128, inode: u64) -> bool {
        let core = self.core();
        core.queue.by_name(name).is_some_and(|record| {
            record.size == size
                && record.mtime_ns == mtime_ns
                && (record.inode == 0 || record.inode == inode)
        })
    }

    fn accept(&self, facts: FileFacts) {
        let file = facts.file.clone();
        let size = facts.size;
        let result = self.core().queue.accept(facts);
        match result {
            Ok(id) => {
                tracing::debug!(id, file = %escape_for_log(&file), size, "queued");
                self.wake.notify_one();
            }
            Err(err) => {
                tracing::error!(file = %escape_for_log(&file), error = %err, "recording a file in the queue failed; the file stays in the outbox and is tried at the next rescan")
            }
        }
    }

    fn forget_missing(&self, present: &HashSet<String>) {
        let mut core = self.core();
        let gone: Vec<(u64, String)> = core
            .queue
            .records()
            .filter(|r| r.state == ItemState::Pending && !present.contains(&r.file))
            .map(|r| (r.id, r.file.clone()))
            .collect();
        for (id, file) in gone {
            tracing::info!(id, file = %escape_for_log(&file), "the file left the outbox before it was uploaded; its record is dropped");
            if let Err(err) = core.queue.remove(id) {
                tracing::error!(id, error = %err, "dropping a queue record failed");
            }
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT. Errors are start-up failures.
pub async fn run(launch: Launch, loaded: Loaded) -> Result<(), StartError> {
    // The handlers go in first: SIGHUP's default action ends the process, and
    // systemd may send it as soon as READY=1 arrives.
    let signals = Signals::install().map_err(|err| StartError {
        code: 1,
        message: err,
    })?;
    let Loaded {
        mut settings,
        problems,
    } = loaded;
    prepare_dirs(&settings).map_err(|message| StartError { code: 2, message })?;
    // notify reports absolute paths, and intake matches events against the
    // outbox path, so a relative --outbox must become absolute.
    for dir in [&mut settings.outbox, &mut settings.state_dir] {
        if let Ok(absolute) = std::fs::canonicalize(&*dir) {
            *dir = absolute;
        }
    }
    let settings = Arc::new(settings);
    let lock = StateLock::acquire(&settings.state_dir)
        .map_err(|message| StartError { code: 1, message })?;
    let outbox_lock = StateLock::acquire_outbox(&settings.outbox)
        .map_err(|message| StartError { code: 1, message })?;

    let store = Store::open(&settings.state_dir).map_err(|err| StartError {
        code: 1,
        message: err.to_string(),
    })?;
    let mut queue = Queue::load(store.clone(), settings.backoff_max).map_err(|err| StartError {
        code: 1,
        message: err.to_string(),
    })?;
    prune_old_uploads(&mut queue, settings.uploaded_retention);
    files::finish_interrupted(&settings, &mut queue);

    let mut config_problems = problems;
    let uploader = build_uploader(&settings, &mut config_problems);
    let token = TokenState::from_lookup(token::lookup_from_process(&settings.token));
    let mut core = Core {
        settings: settings.clone(),
        config_problems,
        uploader,
        token,
        queue,
        auth: AuthState {
            auth: Auth::Unknown,
            origin: HoldOrigin::Server,
            since: None,
            detail: None,
            next_probe_at: None,
        },
        answered: false,
        destination: DestinationState {
            reach: Reach::Unknown,
            since: None,
            next_attempt_at: None,
            last_error: None,
            failures: 0,
        },
        uploads: Default::default(),
        bare_probe_in_flight: false,
        last_success_at: None,
        last_error: None,
        last_error_at: None,
        last_logged_failure: None,
        shutting_down: false,
    };
    log_token_warnings(&core.token);
    core.apply_local_holds();

    let shared = Arc::new(Shared {
        core: Mutex::new(core),
        wake: Notify::new(),
        launch,
        store: store.clone(),
        intake: Mutex::new(None),
        started_at: now_ms(),
    });

    let intake_config = IntakeConfig {
        outbox: settings.outbox.clone(),
        include: IncludeMatcher::new(&settings.include)
            .unwrap_or_else(|_| IncludeMatcher::new("*.zip").expect("*.zip is a valid glob")),
        settle: settings.settle,
        reject_after: settings.reject_after,
        rescan: settings.rescan,
    };
    let (intake_tx, intake_task) =
        intake::start(intake_config, shared.clone())
            .await
            .map_err(|err| StartError {
                code: 1,
                message: format!("{err:#}"),
            })?;
    *shared.intake.lock().unwrap_or_else(|p| p.into_inner()) = Some(intake_tx);

    let _watcher = files::watch_token_and_config(&settings, shared.clone());
    let control_task = control::serve(&settings.state_dir, shared.clone())
        .map_err(|message| StartError { code: 1, message })?;

    let pending = shared.core().queue.pending_len();
    tracing::info!(
        pid = std::process::id(),
        outbox = %settings.outbox.display(),
        state_dir = %settings.state_dir.display(),
        server_url = settings.server_url.as_deref().unwrap_or("(not set)"),
        pending,
        version = env!("CARGO_PKG_VERSION"),
        "outboxd started"
    );
    crate::systemd::ready(&status_line(&shared));

    let dispatcher = tokio::spawn(dispatch(shared.clone()));
    wait_for_signals(&shared, signals).await;

    // Shutdown: no new uploads; those in flight get the grace period.
    shared.core().shutting_down = true;
    shared.wake.notify_one();
    // The settings in force now, which a reload may have changed since start.
    let grace = shared.core().settings.shutdown_grace;
    crate::systemd::stopping(&format!(
        "stopping; uploads in flight get up to {} ms",
        grace.as_millis()
    ));
    let in_flight = match dispatcher.await {
        Ok(set) => set,
        Err(_) => JoinSet::new(),
    };
    drain(in_flight, grace).await;
    {
        let mut core = shared.core();
        let ids: Vec<u64> = core.uploads.keys().copied().collect();
        for id in ids {
            let _ = core.queue.requeue(id, false, None, None);
        }
        core.uploads.clear();
    }
    if let Err(err) = store.flush().await {
        tracing::error!(error = %err, "flushing the queue at shutdown failed");
    }
    control_task.abort();
    intake_task.abort();
    control::remove_socket(&settings.state_dir);
    drop(outbox_lock);
    drop(lock);
    tracing::info!("outboxd stopped");
    Ok(())
}

/// Removes the records of uploads older than `retention`, so that the queue
/// database stays bounded in a daemon that runs for months.
fn prune_old_uploads(queue: &mut Queue, retention: Duration) {
    match queue.prune_uploaded(now_ms(), retention) {
        Ok(0) => {}
        Ok(n) => tracing::debug!(records = n, "pruned records of old uploads"),
        Err(err) => tracing::warn!(error = %err, "pruning records of old uploads failed"),
    }
}

/// Time between prunes of old upload records while the daemon runs: hourly,
/// or as often as the retention when that is shorter (at most once a second).
fn prune_interval(retention: Duration) -> Duration {
    retention.clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

fn build_uploader(settings: &Settings, problems: &mut Vec<String>) -> Option<Uploader> {
    if settings.server_url.is_none()
        || !problems.is_empty() && problems.iter().any(|p| p.starts_with("server_url"))
    {
        if !problems.iter().any(|p| p.starts_with("server_url")) {
            problems.push("server_url is not set; set it in the config file, OUTBOXD_SERVER_URL or --server-url".into());
        }
        return None;
    }
    match Uploader::new(settings) {
        Ok(uploader) => Some(uploader),
        Err(problem) => {
            if !problems.contains(&problem) {
                problems.push(problem);
            }
            None
        }
    }
}

fn log_token_warnings(token: &TokenState) {
    if let TokenState::Ready { warnings, .. } = token {
        for warning in warnings {
            tracing::warn!("{warning}");
        }
    }
}

/// The signal streams of `run`. Signals that arrive before `wait_for_signals`
/// listens are kept, not lost.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, String> {
        use tokio::signal::unix::{signal, SignalKind};
        let install = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|err| format!("installing the {name} handler failed: {err}"))
        };
        Ok(Signals {
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
            hup: install(SignalKind::hangup(), "SIGHUP")?,
        })
    }
}

async fn wait_for_signals(shared: &Arc<Shared>, signals: Signals) {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM received; stopping"); return; }
            _ = int.recv() => { tracing::info!("SIGINT received; stopping"); return; }
            _ = hup.recv() => {
                tracing::info!("SIGHUP received; reloading the configuration and the token");
                reload(shared);
            }
        }
    }
}

/// Waits up to `grace` for uploads in flight, then aborts the rest.
async fn drain(mut in_flight: JoinSet<()>, grace: Duration) {
    if in_flight.is_empty() {
        return;
    }
    tracing::info!(
        uploads = in_flight.len(),
        grace_ms = grace.as_millis() as u64,
        "waiting for uploads in flight"
    );
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        tokio::select! {
            next = in_flight.join_next() => if next.is_none() { return },
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(uploads = in_flight.len(), "uploads still in flight after the grace period are aborted; they stay pending");
                in_flight.abort_all();
                while in_flight.join_next().await.is_some() {}
                return;
            }
        }
    }
}

/// Reloads the settings and the token (SIGHUP, or the config file changed).
/// A new configuration with faults is rejected while the running one is valid.
pub fn reload(shared: &Arc<Shared>) {
    crate::systemd::reloading();
    let loaded = crate::config::load_from_process(
        shared.launch.config_flag.as_deref(),
        shared.launch.flags.clone(),
    );
    {
        let mut core = shared.core();
        let mut problems = loaded.problems;
        let uploader = build_uploader(&loaded.settings, &mut problems);
        if !problems.is_empty() && core.config_problems.is_empty() {
            tracing::error!(
                "the new configuration is rejected and the running one is kept: {}",
                problems.join("; ")
            );
        } else {
            let mut settings = loaded.settings;
            for dir in [&mut settings.outbox, &mut settings.state_dir] {
                if let Ok(absolute) = std::fs::canonicalize(&*dir) {
                    *dir = absolute;
                }
            }
            if settings.outbox != core.settings.outbox
                || settings.state_dir != core.settings.state_dir
            {
                tracing::warn!("outbox and state_dir changes take effect only after a restart");
                settings.outbox = core.settings.outbox.clone();
                settings.state_dir = core.settings.state_dir.clone();
            }
            core.settings = Arc::new(settings);
            core.config_problems = problems;
            core.uploader = uploader;
            tracing::info!("configuration reloaded");
            // A new configuration may fix a server-side hold (URL, CA file).
            if core.auth.origin != HoldOrigin::Settings && matches!(core.auth.auth, Auth::Held(_)) {
                core.set_unknown("the configuration was reloaded");
            }
            if core.auth.origin == HoldOrigin::Settings && core.config_problems.is_empty() {
                core.set_unknown("the configuration is valid again");
            }
        }
        refresh_token(&mut core, true);
        core.destination.next_attempt_at = None;
    }
    shared.wake.notify_one();
    crate::systemd::ready(&status_line(shared));
}

/// Reads the token again. A changed token, or `force`, ends a hold that the
/// token may have caused, so that the next upload probes it.
fn refresh_token(core: &mut Core, force: bool) {
    let fresh = TokenState::from_lookup(token::lookup_from_process(&core.settings.token));
    let changed = fresh.identity() != core.token.identity();
    if changed {
        if let TokenState::Ready { token, source, .. } = &fresh {
            tracing::info!(source = %source, fingerprint = %token.fingerprint(), "the token changed");
        }
        log_token_warnings(&fresh);
    }
    core.token = fresh;
    let local_changed = core.apply_local_holds();
    if (changed || force) && !local_changed && core.auth.origin == HoldOrigin::Server {
        if let Auth::Held(kind) = core.auth.auth {
            if changed
                || matches!(
                    kind,
                    HoldKind::TokenRejected | HoldKind::Forbidden | HoldKind::ConfigError
                )
            {
                core.auth.next_probe_at = Some(now_ms());
            }
        }
    }
}

/// Token file or config file changed on disk.
pub fn on_watched_change(shared: &Arc<Shared>, config_changed: bool) {
    if config_changed {
        tracing::info!("the config file changed; reloading");
        reload(shared);
        return;
    }
    {
        let mut core = shared.core();
        refresh_token(&mut core, false);
    }
    shared.wake.notify_one();
}

/// The request of `outboxd retry`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RetryRequest {
    #[serde(default)]
    pub ids: Vec<u64>,
    #[serde(default)]
    pub rejected: bool,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RetryResult {
    pub cleared: usize,
    pub requeued_rejected: usize,
    pub probing: bool,
    pub unknown_ids: Vec<u64>,
}

/// Clears backoff and probes a hold now.
pub fn retry(shared: &Arc<Shared>, request: &RetryRequest) -> RetryResult {
    let mut result = RetryResult::default();
    {
        let mut core = shared.core();
        result.unknown_ids = request
            .ids
            .iter()
            .copied()
            .filter(|id| core.queue.get(*id).is_none())
            .collect();
        result.cleared = core
            .queue
            .clear_backoff(&request.ids)
            .unwrap_or_else(|err| {
                tracing::error!(error = %err, "clearing backoff failed");
                0
            });
        refresh_token(&mut core, true);
        if matches!(core.auth.auth, Auth::Held(_)) && core.auth.origin != HoldOrigin::Settings {
            core.auth.next_probe_at = Some(now_ms());
            result.probing = true;
        }
        core.destination.next_attempt_at = None;
        if core.destination.reach == Reach::Unreachable {
            core.destination.failures = 0;
        }
        if request.rejected {
            let outbox = core.settings.outbox.clone();
            drop(core);
            result.requeued_rejected = files::requeue_rejected(&outbox);
        }
    }
    tracing::info!(
        cleared = result.cleared,
        rejected = result.requeued_rejected,
        probing = result.probing,
        "retry requested"
    );
    if request.rejected {
        shared.rescan();
    }
    shared.wake.notify_one();
    result
}

/// Builds the one line for `systemctl --user status`. The dispatcher builds it
/// on every turn, so it reads only counts that cost O(1), not `Queue::counts`.
pub fn status_line(shared: &Shared) -> String {
    let core = shared.core();
    let auth = match core.auth.auth {
        Auth::Held(kind) => format!("ON HOLD: {}", kind.as_str()),
        Auth::Ok => "auth ok".into(),
        Auth::Unknown => "auth unknown".into(),
    };
    format!(
        "{} pending, {} uploading; {auth}; destination {}",
        core.queue.pending_len(),
        core.uploads.len(),
        core.destination.reach.as_str()
    )
}

/// Builds the `status --json` document.
pub fn status_report(shared: &Shared) -> StatusReport {
    let core = shared.core();
    let counts = core.queue.counts();
    let auth_state = match core.auth.auth {
        Auth::Unknown => "unknown",
        Auth::Ok => "ok",
        Auth::Held(kind) => kind.as_str(),
    };
    let mut warnings = Vec::new();
    if let TokenState::Ready {
        warnings: token_warnings,
        ..
    } = &core.token
    {
        warnings.extend(token_warnings.iter().cloned());
    }
    if let Some(warning) = files::low_space_warning(&core.settings.outbox) {
        warnings.push(warning);
    }
    if let Some(failure) = shared.store.failure() {
        warnings.push(format!(
            "the queue database in {} cannot be written ({failure}); uploads are paused and the files stay in the outbox until it can, so free space or fix the state dir",
            core.settings.state_dir.display()
        ));
    }
    let uploaded = shared.store.uploaded_total().unwrap_or(0);
    StatusReport {
        daemon: status::DaemonStatus {
            running: true,
            pid: Some(std::process::id()),
            version: env!("CARGO_PKG_VERSION").into(),
            started_at: Some(rfc3339(shared.started_at)),
        },
        server_url: core.settings.server_url.clone().unwrap_or_default(),
        auth: status::AuthStatus {
            state: auth_state.into(),
            since: core.auth.since.map(rfc3339),
            detail: core.auth.detail.clone(),
            next_probe_at: core.auth.next_probe_at.map(rfc3339),
        },
        destination: status::DestinationStatus {
            state: core.destination.reach.as_str().into(),
            since: core.destination.since.map(rfc3339),
            next_attempt_at: core.destination.next_attempt_at.map(rfc3339),
            last_error: core.destination.last_error.clone(),
        },
        queue: status::QueueStatus {
            pending: counts.pending,
            uploading: counts.uploading,
            uploaded,
            rejected: files::count_rejected(&core.settings.outbox),
            pending_bytes: counts.pending_bytes,
            oldest_pending_at: counts.oldest_pending_at.map(rfc3339),
        },
        uploads: core
            .upload_progress()
            .into_iter()
            .map(|(id, file, bytes_sent, size)| status::UploadStatus {
                id: id.to_string(),
                file,
                bytes_sent,
                size,
            })
            .collect(),
        last_success_at: core.last_success_at.map(rfc3339),
        last_error: core.last_error.clone(),
        last_error_at: core.last_error_at.map(rfc3339),
        warnings,
        outbox: core.settings.outbox.display().to_string(),
        state_dir: core.settings.state_dir.display().to_string(),
        token_fingerprint: core.token.token().map(|t| t.fingerprint()),
    }
}

/// Records of the queue for `outboxd list`.
pub fn list_records(shared: &Shared) -> Vec<Record> {
    let core = shared.core();
    core.queue.records().cloned().collect()
}

/// Work that `plan` hands to the dispatcher.
enum Job {
    Upload {
        record: Box<Record>,
        probe: bool,
        progress: Arc<AtomicU64>,
    },
    BareProbe,
}

/// Time between attempts to open the queue database again after a failure.
const STORE_RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// Pauses uploads while the queue database cannot be written (a full state
/// dir, or another write error), and tries every `STORE_RETRY_INTERVAL` to open it
/// again and write the in-memory queue back. Returns true when it can be
/// written. Uploads must wait because an upload whose uploaded mark cannot be
/// stored would be sent again at once, over and over.
fn check_store(shared: &Shared, core: &mut Core, retry_at: &mut Option<u64>) -> bool {
    if !shared.store.is_broken() {
        return true;
    }

    let now = now_ms();
    let interval = STORE_RETRY_INTERVAL.as_millis() as u64;
    let Some(at) = *retry_at else {
        tracing::error!(
            state_dir = %core.settings.state_dir.display(),
            error = shared.store.failure().unwrap_or_default(),
            "the queue database cannot be written; uploads pause and every file stays in the outbox until it can"
        );
        *retry_at = Some(now + interval);
        return false;
    };
    if now < at {
        return false;
    }

    *retry_at = Some(now + interval);
    let recovered = shared
        .store
        .reopen()
        .and_then(|()| core.queue.rewrite_store());
    if let Err(err) = recovered {
        tracing::debug!(error = %err, "the queue database still cannot be written");
        return false;
    }

    tracing::info!("the queue database can be written again; uploads resume");
    *retry_at = None;
    let settings = core.settings.clone();
    files::finish_interrupted(&settings, &mut core.queue);
    // Files that arrived while records could not be written are queued now.
    shared.rescan();
    true
}

/// Minimum time between two updates of the status line for systemd.
const STATUS_LINE_INTERVAL: Duration = Duration::from_secs(1);

/// Starts uploads while the state allows, and sleeps until the next reason to
/// look again. Returns the uploads in flight when shutdown begins.
async fn dispatch(shared: Arc<Shared>) -> JoinSet<()> {
    let mut in_flight = JoinSet::new();
    let watchdog = crate::systemd::watchdog_interval();
    let mut last_status = String::new();
    let mut last_status_at = std::time::Instant::now()
        .checked_sub(STATUS_LINE_INTERVAL)
        .unwrap_or_else(std::time::Instant::now);
    let mut next_prune_at = {
        let retention = shared.core().settings.uploaded_retention;
        now_ms() + prune_interval(retention).as_millis() as u64
    };
    let mut store_retry_at = None;
    loop {
        let (jobs, wake_at, stopping, uploader, token) = {
            let mut core = shared.core();
            let writable = check_store(&shared, &mut core, &mut store_retry_at);
            if writable && now_ms() >= next_prune_at {
                let retention = core.settings.uploaded_retention;
                prune_old_uploads(&mut core.queue, retention);
                next_prune_at = now_ms() + prune_interval(retention).as_millis() as u64;
            }
            let (jobs, wake_at) = if writable || core.shutting_down {
                plan(&mut core)
            } else {
                (Vec::new(), store_retry_at)
            };
            (
                jobs,
                wake_at,
                core.shutting_down,
                core.uploader.clone(),
                core.token.token().cloned(),
            )
        };
        if stopping {
            return in_flight;
        }
        for job in jobs {
            let uploader = uploader.clone();
            let token = token.clone();
            let shared = shared.clone();
            in_flight.spawn(async move {
                match job {
                    Job::Upload {
                        record,
                        probe,
                        progress,
                    } => {
                        let id = record.id;
                        let task = AssertUnwindSafe(upload_one(&shared, *record, probe, progress))
                            .catch_unwind();
                        if task.await.is_err() {
                            // The item would otherwise stay `uploading` until a restart.
                            tracing::error!(
                                id,
                                "an upload task panicked; the item goes back to pending"
                            );
                            let mut core = shared.core();
                            core.uploads.remove(&id);
                            let _ = core.queue.requeue(
                                id,
                                false,
                                None,
                                Some("internal error during upload".into()),
                            );
                        }
                    }
                    Job::BareProbe => match (uploader, token) {
                        (Some(uploader), Some(token)) => {
                            let outcome = uploader.probe(&token).await;
                            complete_bare_probe(&shared, outcome);
                        }
                        _ => shared.core().bare_probe_in_flight = false,
                    },
                }
                shared.wake.notify_one();
            });
        }

        // The line counts the whole queue, which costs a pass over every
        // record: at most once a second, not once per upload.
        if last_status_at.elapsed() >= STATUS_LINE_INTERVAL {
            last_status_at = std::time::Instant::now();
            let line = status_line(&shared);
            if line != last_status {
                crate::systemd::status(&line);
                last_status = line;
            }
        }

        let now = now_ms();
        let mut sleep_ms = wake_at
            .map_or(30_000, |at| at.saturating_sub(now))
            .clamp(1, 30_000)
            .min(next_prune_at.saturating_sub(now).max(1));
        if let Some(interval) = watchdog {
            crate::systemd::watchdog();
            sleep_ms = sleep_ms.min(interval.as_millis() as u64);
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
}

async fn upload_one(shared: &Arc<Shared>, record: Record, probe: bool, progress: Arc<AtomicU64>) {
    let (uploader, token, path) = {
        let core = shared.core();
        (
            core.uploader.clone(),
            core.token.token().cloned(),
            core.settings.outbox.join(&record.file),
        )
    };
    let (Some(uploader), Some(token)) = (uploader, token) else {
        // The settings or token changed since the item was taken.
        let mut core = shared.core();
        core.uploads.remove(&record.id);
        let _ = core
            .queue
            .requeue(record.id, false, record.next_attempt_at, None);
        return;
    };
    let job = UploadJob {
        path,
        file_name: record.file.clone(),
        session_id: record.session_id.clone(),
        size: record.size,
        sha256: record.sha256.clone(),
        mtime_ns: record.mtime_ns,
        inode: record.inode,
    };
    let started = std::time::Instant::now();
    let attempt = uploader.upload(&job, &token, progress).await;
    complete(shared, record, probe, attempt, started.elapsed()).await;
}

/// Decides which uploads start now. Returns them and the next time to look.
fn plan(core: &mut Core) -> (Vec<Job>, Option<u64>) {
    let now = now_ms();
    let mut jobs = Vec::new();
    if core.shutting_down {
        return (jobs, None);
    }
    let max_delay = core.settings.backoff_max;
    if let Err(err) = core.queue.clamp_future(now, max_delay) {
        tracing::error!(error = %err, "updating the queue failed");
    }
    let in_flight = core.uploads.len() + usize::from(core.bare_probe_in_flight);

    if let Auth::Held(_) = core.auth.auth {
        let next_probe = core.auth.next_probe_at;
        match core.auth.origin {
            HoldOrigin::Settings => return (jobs, None),
            HoldOrigin::TokenSource => {
                if next_probe.is_some_and(|at| at <= now) {
                    refresh_token(core, false);
                    if let Auth::Held(_) = core.auth.auth {
                        core.auth.next_probe_at = Some(now + core.token_check_interval());
                        return (jobs, core.auth.next_probe_at);
                    }
                } else {
                    return (jobs, next_probe);
                }
            }
            HoldOrigin::Server => {
                if in_flight > 0 || next_probe.is_some_and(|at| at > now) {
                    return (jobs, next_probe);
                }
                // One probe: the oldest pending upload, whatever its backoff, or a
                // bare probe request when the queue is empty.
                core.auth.next_probe_at = Some(now + core.settings.auth_probe.as_millis() as u64);
                match take(core, now, true) {
                    Some(job) => jobs.push(job.into_probe()),
                    None => {
                        core.bare_probe_in_flight = true;
                        jobs.push(Job::BareProbe);
                    }
                }
                return (jobs, core.auth.next_probe_at);
            }
        }
    }

    // Not held. The destination may be backing off or paused.
    if let Some(at) = core.destination.next_attempt_at {
        if at > now {
            return (jobs, Some(at));
        }
    }
    let probing = core.auth.auth == Auth::Unknown && !core.answered
        || matches!(
            core.destination.reach,
            Reach::Unreachable | Reach::Throttled
        );
    let limit = if probing {
        1
    } else {
        core.settings.concurrency
    };
    let mut running = in_flight;
    while running < limit {
        match take(core, now, false) {
            Some(job) => {
                jobs.push(if probing { job.into_probe() } else { job });
                running += 1;
            }
            None => break,
        }
    }
    // With an empty queue, an unreachable or throttled destination is checked
    // with a bare probe request, so that status does not report an outage long
    // after the server came back.
    let destination_waits = matches!(
        core.destination.reach,
        Reach::Unreachable | Reach::Throttled
    );
    if destination_waits && running == 0 && core.queue.pending_len() == 0 {
        core.bare_probe_in_flight = true;
        core.destination.next_attempt_at = Some(
            now + core
                .destination_schedule()
                .delay(core.destination.failures.max(1))
                .as_millis() as u64,
        );
        jobs.push(Job::BareProbe);
        return (jobs, core.destination.next_attempt_at);
    }
    let next = if running >= limit {
        None
    } else {
        core.queue.next_due_at()
    };
    (jobs, next)
}

impl Job {
    fn into_probe(self) -> Job {
        match self {
            Job::Upload {
                record, progress, ..
            } => Job::Upload {
                record,
                probe: true,
                progress,
            },
            other => other,
        }
    }
}

fn take(core: &mut Core, now: u64, ignore_backoff: bool) -> Option<Job> {
    let record = match core.queue.take_due(now, ignore_backoff) {
        Ok(record) => record?,
        Err(err) => {
            tracing::error!(error = %err, "taking an item from the queue failed");
            return None;
        }
    };
    let progress = Arc::new(AtomicU64::new(0));
    core.uploads.insert(
        record.id,
        InFlight {
            file: record.file.clone(),
            size: record.size,
            bytes_sent: progress.clone(),
        },
    );
    Some(Job::Upload {
        record: Box::new(record),
        probe: false,
        progress,
    })
}

fn complete_bare_probe(shared: &Shared, outcome: Outcome) {
    let mut core = shared.core();
    core.bare_probe_in_flight = false;
    match outcome {
        Outcome::Uploaded { .. } => {
            if matches!(core.auth.auth, Auth::Held(_)) {
                core.set_unknown("the probe request was accepted");
            }
            core.note_reached();
        }
        Outcome::Hold { kind, detail } => {
            core.note_reached();
            core.hold(kind, HoldOrigin::Server, detail);
        }
        Outcome::Unreachable { detail } => {
            core.note_unreachable(&detail);
            shorten_probe(&mut core);
        }
        Outcome::Transient { detail, .. } | Outcome::Rejected { reason: detail } => {
            tracing::debug!(error = %detail, "the probe response was inconclusive");
            core.note_reached();
        }
    }
}

/// During a hold, a probe that could not reach the server is repeated on the
/// destination's schedule, which is shorter than `auth_probe_ms`.
fn shorten_probe(core: &mut Core) {
    if let (Some(probe), Some(retry)) = (core.auth.next_probe_at, core.destination.next_attempt_at)
    {
        core.auth.next_probe_at = Some(probe.min(retry));
    }
}

/// Applies the result of one upload.
async fn complete(
    shared: &Arc<Shared>,
    record: Record,
    probe: bool,
    attempt: Attempt,
    elapsed: Duration,
) {
    let id = record.id;
    let file = record.file.clone();
    let attempt_no = record.attempts + 1;
    let mut flush_then_finish = None;
    {
        let mut core = shared.core();
        let slot = core.uploads.remove(&id);
        match attempt {
            Attempt::Done(Outcome::Uploaded { status }) => {
                core.note_answer(true);
                core.last_logged_failure = None;
                match core.queue.mark_uploaded(id) {
                    Ok(Some(done)) => {
                        tracing::info!(id, file = %escape_for_log(&file), status, size = record.size, elapsed_ms = elapsed.as_millis() as u64, "uploaded");
                        flush_then_finish = Some((done, core.settings.clone()));
                        // The upload counts against the concurrency until its
                        // mark is on disk, because a crash before that makes
                        // the server receive it again.
                        if let Some(slot) = slot {
                            core.uploads.insert(id, slot);
                        }
                    }
                    Ok(None) => {}
                    Err(err) => {
                        tracing::error!(id, file = %escape_for_log(&file), error = %err, "recording the upload failed; the file is kept and will be sent again");
                        let _ = core.queue.requeue(id, false, None, Some(err.to_string()));
                    }
                }
            }
            Attempt::Done(Outcome::Hold { kind, detail }) => {
                let _ = core.queue.requeue(id, false, record.next_attempt_at, None);
                if probe && core.auth.auth == Auth::Held(kind) {
                    tracing::debug!(
                        id,
                        state = kind.as_str(),
                        "the probe upload is still refused; the hold stays"
                    );
                }
                if !matches!(kind, HoldKind::ConfigError) || detail.contains("HTTP") {
                    core.note_reached();
                }
                core.hold(kind, HoldOrigin::Server, detail);
            }
            Attempt::Done(Outcome::Transient { detail, pause }) => {
                core.note_answer(false);
                let delay = core.item_schedule().delay(attempt_no);
                let next = now_ms() + delay.as_millis() as u64;
                let _ = core
                    .queue
                    .requeue(id, true, Some(next), Some(detail.clone()));
                if core.last_logged_failure.as_deref() != Some(detail.as_str()) {
                    tracing::warn!(id, file = %escape_for_log(&file), attempt = attempt_no, delay_ms = delay.as_millis() as u64, error = %detail, "upload failed; retrying later");
                    core.last_logged_failure = Some(detail.clone());
                } else {
                    tracing::debug!(id, file = %escape_for_log(&file), attempt = attempt_no, delay_ms = delay.as_millis() as u64, error = %detail, "upload failed again; retrying later");
                }
                core.last_error = Some(format!("{file}: {detail}"));
                core.last_error_at = Some(now_ms());
                if let Some(pause) = pause {
                    core.note_throttled(pause, &detail);
                }
                if matches!(core.auth.auth, Auth::Held(_)) {
                    shorten_probe(&mut core);
                }
            }
            Attempt::Done(Outcome::Unreachable { detail }) => {
                let _ = core.queue.requeue(
                    id,
                    false,
                    record.next_attempt_at,
                    Some(format!("server unreachable: {detail}")),
                );
                core.note_unreachable(&detail);
                if matches!(core.auth.auth, Auth::Held(_)) {
                    shorten_probe(&mut core);
                }
            }
            Attempt::Done(Outcome::Rejected { reason }) => {
                core.note_answer(false);
                let outbox = core.settings.outbox.clone();
                if !files::unchanged(&outbox.join(&file), &record) {
                    // The refusal is about content that is no longer there.
                    tracing::info!(id, file = %file, reason = %reason, "the server rejected the file, but it changed since it was hashed; the new content is hashed and sent");
                    let _ = core.queue.remove(id);
                    drop(core);
                    shared.examine(&file);
                    return;
                }
                match intake::reject(&outbox, std::ffi::OsStr::new(&file), &reason) {
                    Ok(target) => {
                        tracing::warn!(id, file = %escape_for_log(&file), reason = %reason, rejected = %escape_for_log(&target.display().to_string()), "the server rejected the file; moved to rejected/");
                        let _ = core.queue.remove(id);
                    }
                    Err(err) => {
                        tracing::error!(id, file = %escape_for_log(&file), reason = %reason, error = %err, "the server rejected the file, and moving it to rejected/ failed; it stays queued");
                        let delay = core.item_schedule().delay(attempt_no);
                        let _ = core.queue.requeue(
                            id,
                            true,
                            Some(now_ms() + delay.as_millis() as u64),
                            Some(reason.clone()),
                        );
                    }
                }
                core.last_error = Some(format!("{file}: {reason}"));
                core.last_error_at = Some(now_ms());
            }
            Attempt::Local(LocalFault::Vanished) => {
                tracing::info!(id, file = %escape_for_log(&file), "the file left the outbox before it was uploaded; its record is dropped");
                let _ = core.queue.remove(id);
            }
            Attempt::Local(LocalFault::Changed(why)) => {
                tracing::info!(id, file = %escape_for_log(&file), reason = %why, "the file changed; it is hashed and sent again");
                let _ = core.queue.remove(id);
                drop(core);
                shared.examine(&file);
                return;
            }
            Attempt::Local(LocalFault::Unreadable(why)) => {
                let delay = core.item_schedule().delay(attempt_no);
                tracing::warn!(id, file = %escape_for_log(&file), attempt = attempt_no, delay_ms = delay.as_millis() as u64, error = %why, "the file cannot be read; retrying later");
                let _ = core.queue.requeue(
                    id,
                    true,
                    Some(now_ms() + delay.as_millis() as u64),
                    Some(why),
                );
            }
        }
    }

    if let Some((done, settings)) = flush_then_finish {
        // The uploaded mark must be on disk before the file goes, so that a
        // crash in between never makes the file look undelivered and lost.
        let flushed = shared.store.flush().await;
        shared.core().uploads.remove(&id);
        if let Err(err) = flushed {
            tracing::error!(id, file = %escape_for_log(&file), error = %err, "flushing the queue failed; the file is kept");
            return;
        }
        if !files::finish_uploaded(&settings, &done) {
            shared.examine(&done.file);
        }
    }
}

/// Paths of the state dir.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// Gives the control socket mode 0600.
pub fn set_socket_mode(path: &Path) -> std::io::Result<()> {
    files::set_mode(path, 0o600)
}
