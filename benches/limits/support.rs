//! Shared pieces of the limits benchmark: the settings read from the
//! environment, archive files, a private home with a real `outboxd run`
//! process in it, the bundled receiver with an inotify watch on its folder,
//! and readings of /proc.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use notify::event::{CreateKind, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use outboxd::receiver::{self, ReceiverHandle, ReceiverOptions};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// The binary under test by default. Cargo builds it with the bench profile
/// (which inherits `release`) before it builds this benchmark.
const BUILT_BIN: &str = env!("CARGO_BIN_EXE_outboxd");

/// Returns the binary under test: `OUTBOXD_BENCH_BIN` when set, to compare
/// another build under the same load, else the one Cargo built.
pub fn binary() -> PathBuf {
    std::env::var_os("OUTBOXD_BENCH_BIN").map_or_else(|| PathBuf::from(BUILT_BIN), PathBuf::from)
}

/// Bearer token of every receiver and daemon in the benchmark.
pub const TOKEN: &str = "bench-upload-token-7d2e";

/// Uploads in flight: the daemon's default `concurrency`, and the
/// concurrency of both baseline clients.
pub const CONCURRENCY: usize = 2;

/// Sizes and repetitions, from `OUTBOXD_BENCH_*` environment variables.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Archives in the throughput figure (`OUTBOXD_BENCH_SMALL`).
    pub small_count: usize,
    /// Content bytes of each of those archives (`OUTBOXD_BENCH_SMALL_KIB`).
    pub small_bytes: usize,
    /// Single drops in the latency figure (`OUTBOXD_BENCH_DROPS`).
    pub drops: usize,
    /// Content bytes of the big archive (`OUTBOXD_BENCH_BIG_MIB`).
    pub big_bytes: usize,
    /// Pending items with the server down (`OUTBOXD_BENCH_RECORDS`).
    pub records: usize,
    /// Repetitions of each figure (`OUTBOXD_BENCH_RUNS`).
    pub runs: usize,
    /// Length of the idle CPU reading (`OUTBOXD_BENCH_IDLE_SECS`).
    pub idle: Duration,
    /// Run the baselines (`OUTBOXD_BENCH_BASELINES=0` skips them, to compare
    /// two builds of the daemon quickly).
    pub baselines: bool,
    /// Keep the temporary folders, daemon logs included, for a look after the
    /// run (`OUTBOXD_BENCH_KEEP=1`).
    pub keep: bool,
    /// Figures to run (`OUTBOXD_BENCH_ONLY`, comma-separated: small, latency,
    /// big, pending); all when unset.
    pub only: Option<Vec<String>>,
}

impl BenchConfig {
    pub fn from_env() -> anyhow::Result<BenchConfig> {
        let only = std::env::var("OUTBOXD_BENCH_ONLY").ok().map(|value| {
            value
                .split(',')
                .map(|name| name.trim().to_string())
                .filter(|name| !name.is_empty())
                .collect()
        });
        Ok(BenchConfig {
            small_count: env_number("OUTBOXD_BENCH_SMALL", 2000)?,
            small_bytes: env_number("OUTBOXD_BENCH_SMALL_KIB", 64)? * 1024,
            drops: env_number("OUTBOXD_BENCH_DROPS", 200)?,
            big_bytes: env_number("OUTBOXD_BENCH_BIG_MIB", 1024)? << 20,
            records: env_number("OUTBOXD_BENCH_RECORDS", 100_000)?,
            runs: env_number("OUTBOXD_BENCH_RUNS", 3)?.max(1),
            idle: Duration::from_secs(env_number("OUTBOXD_BENCH_IDLE_SECS", 10)? as u64),
            baselines: std::env::var("OUTBOXD_BENCH_BASELINES").map_or(true, |value| value != "0"),
            keep: std::env::var("OUTBOXD_BENCH_KEEP").is_ok_and(|value| value == "1"),
            only,
        })
    }

    /// True when the figure group `name` is selected.
    pub fn runs_figure(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == name))
    }
}

fn env_number(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .with_context(|| format!("{name} = {text:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

// ---------------------------------------------------------------------------
// Archives

/// An archive on disk with the fields of its upload request.
#[derive(Debug, Clone)]
pub struct SourceArchive {
    pub path: PathBuf,
    /// File name, also the name it gets in the outbox.
    pub name: String,
    pub session_id: String,
    pub sha256: String,
    pub size: u64,
}

/// Fills `data` with pseudo-random bytes from `seed` (xorshift64), so that
/// every archive has its own SHA-256 and nothing on the path compresses it.
fn fill_pseudo_random(data: &mut [u8], seed: u64) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

/// Writes a stored zip archive `dir/<session_id>.zip` with `content_bytes`
/// bytes of content.
pub fn write_archive(
    dir: &Path,
    session_id: &str,
    content_bytes: usize,
    seed: u64,
) -> anyhow::Result<SourceArchive> {
    let mut data = vec![0u8; content_bytes];
    fill_pseudo_random(&mut data, seed);
    let name = format!("{session_id}.zip");
    let path = dir.join(&name);
    let mut file = std::io::BufWriter::with_capacity(
        1 << 20,
        fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
    );
    outboxd::zipfile::write_stored(&mut file, &[("recording.bin", &data)])
        .and_then(|()| file.flush())
        .with_context(|| format!("writing {}", path.display()))?;
    drop(data);
    let (sha256, size) = hash_file(&path)?;
    Ok(SourceArchive {
        path,
        name,
        session_id: session_id.to_string(),
        sha256,
        size,
    })
}

fn hash_file(path: &Path) -> anyhow::Result<(String, u64)> {
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut file, &mut hasher)
        .with_context(|| format!("hashing {}", path.display()))?;
    Ok((hex::encode(hasher.finalize()), size))
}

/// Hard-links each source into `staging`, so that a run can rename them into
/// the outbox without copying and the daemon's delete leaves the source.
pub fn link_into(sources: &[SourceArchive], staging: &Path) -> anyhow::Result<Vec<PathBuf>> {
    sources
        .iter()
        .map(|source| {
            let target = staging.join(&source.name);
            fs::hard_link(&source.path, &target).with_context(|| {
                format!("linking {} to {}", source.path.display(), target.display())
            })?;
            Ok(target)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Temporary folders and the receiver

/// Root of the benchmark's temporary folders, removed when dropped. It lives
/// under the system temporary folder, which must be on a disk (not tmpfs) for
/// the fsync costs to be real.
pub fn temp_root(prefix: &str) -> anyhow::Result<TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("creating a temporary folder")
}

/// Creates a temporary folder inside `parent`, removed when dropped unless `keep`.
pub fn temp_root_in(parent: &Path, prefix: &str, keep: bool) -> anyhow::Result<TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .disable_cleanup(keep)
        .tempdir_in(parent)
        .with_context(|| format!("creating a temporary folder in {}", parent.display()))
}

/// Writes `TOKEN` into `path` with mode 0600.
pub fn write_token(path: &Path) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{TOKEN}").with_context(|| format!("writing {}", path.display()))
}

/// The bundled receiver on 127.0.0.1 with an inotify watch on its folder,
/// which timestamps each archive as the receiver renames it into place.
///
/// The receiver syncs the archive and its sidecar before that rename and
/// syncs the folder after it, so the timestamp is about one fsync earlier
/// than the moment the store is durable.
pub struct WatchedReceiver {
    handle: Option<ReceiverHandle>,
    events: mpsc::Receiver<(String, Instant)>,
    seen: HashSet<String>,
    _watcher: notify::RecommendedWatcher,
}

impl WatchedReceiver {
    /// Starts a receiver on a free port of 127.0.0.1 that stores into `dir`.
    pub fn start(
        runtime: &tokio::runtime::Runtime,
        dir: &Path,
        token_file: &Path,
    ) -> anyhow::Result<WatchedReceiver> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (sender, events) = mpsc::channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let at = Instant::now();
                let Ok(event) = event else { return };
                let stored = matches!(
                    event.kind,
                    EventKind::Modify(ModifyKind::Name(RenameMode::To))
                        | EventKind::Create(CreateKind::File)
                );
                if !stored {
                    return;
                }
                for path in &event.paths {
                    let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
                        continue;
                    };
                    if name.ends_with(".zip") && !name.starts_with('.') {
                        let _ = sender.send((name.to_string(), at));
                    }
                }
            })
            .context("creating the watcher of the receiver folder")?;
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", dir.display()))?;
        let options = ReceiverOptions {
            dir: dir.to_path_buf(),
            token_file: token_file.to_path_buf(),
            ..ReceiverOptions::default()
        };
        let handle = runtime.block_on(receiver::start(
            "127.0.0.1:0".parse().expect("a valid socket address"),
            options,
        ))?;
        Ok(WatchedReceiver {
            handle: Some(handle),
            events,
            seen: HashSet::new(),
            _watcher: watcher,
        })
    }

    pub fn url(&self) -> String {
        self.handle
            .as_ref()
            .map(|handle| handle.url().to_string())
            .unwrap_or_default()
    }

    /// Waits until `count` more archives were stored, and returns the time
    /// the last of them was.
    pub fn wait_count(&mut self, count: usize, timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        let mut last = Instant::now();
        let mut stored = 0;
        while stored < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok((name, at)) => {
                    if self.seen.insert(name) {
                        stored += 1;
                        last = at;
                    }
                }
                Err(_) => bail!(
                    "the receiver stored {stored} of {count} archives within {timeout:?}; see the daemon log"
                ),
            }
        }
        Ok(last)
    }

    /// Waits until the archive `name` was stored, and returns when it was.
    pub fn wait_for(&mut self, name: &str, timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok((stored, at)) => {
                    let matched = stored == name;
                    self.seen.insert(stored);
                    if matched {
                        return Ok(at);
                    }
                }
                Err(_) => bail!("the receiver did not store {name} within {timeout:?}"),
            }
        }
    }

    /// Stops the receiver and waits until its listener is closed.
    pub fn stop(mut self, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
        match self.handle.take() {
            Some(handle) => runtime.block_on(handle.stop()),
            None => Ok(()),
        }
    }
}

/// Returns a URL on 127.0.0.1 where nothing listens, so that connections are refused.
pub fn refused_url() -> anyhow::Result<String> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("binding a port to find a free one")?;
    let addr = listener.local_addr()?;
    drop(listener);
    Ok(format!("http://{addr}/upload"))
}

// ---------------------------------------------------------------------------
// The daemon

/// Folders of one daemon: outbox, state dir, token file, a staging folder on
/// the same file system for renames into the outbox, and the daemon's log.
pub struct Home {
    pub path: PathBuf,
    pub outbox: PathBuf,
    pub state_dir: PathBuf,
    pub token_file: PathBuf,
    pub staging: PathBuf,
    pub log: PathBuf,
}

impl Home {
    pub fn create(path: &Path) -> anyhow::Result<Home> {
        let home = Home {
            path: path.to_path_buf(),
            outbox: path.join("outbox"),
            state_dir: path.join("state"),
            token_file: path.join("token"),
            staging: path.join("staging"),
            log: path.join("daemon.log"),
        };
        for folder in [&home.outbox, &home.state_dir, &home.staging] {
            fs::create_dir_all(folder).with_context(|| format!("creating {}", folder.display()))?;
        }
        for folder in ["config", "data", "xdg-state", "cache"] {
            fs::create_dir_all(path.join(folder))?;
        }
        write_token(&home.token_file)?;
        Ok(home)
    }

    /// `outboxd <subcommand>` with this home's environment: no `OUTBOXD_*`
    /// or `XDG_*` variable of the caller reaches it.
    pub fn command(&self, subcommand: &str) -> Command {
        let mut command = Command::new(binary());
        command.arg(subcommand);
        for (name, _) in std::env::vars_os() {
            let text = name.to_string_lossy();
            if text.starts_with("OUTBOXD_") || text.starts_with("XDG_") {
                command.env_remove(&name);
            }
        }
        for name in ["CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC"] {
            command.env_remove(name);
        }
        command
            .env("HOME", &self.path)
            .env("XDG_CONFIG_HOME", self.path.join("config"))
            .env("XDG_DATA_HOME", self.path.join("data"))
            .env("XDG_STATE_HOME", self.path.join("xdg-state"))
            .env("XDG_CACHE_HOME", self.path.join("cache"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        command
    }

    /// Starts `outboxd run` with default settings apart from the folders, the
    /// token file and `server_url`. Its log is appended to `self.log`.
    pub fn spawn_daemon(&self, server_url: &str) -> anyhow::Result<DaemonProcess> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let started = Instant::now();
        let child = self
            .command("run")
            .arg("--outbox")
            .arg(&self.outbox)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--token-file")
            .arg(&self.token_file)
            .arg("--server-url")
            .arg(server_url)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} run", binary().display()))?;
        Ok(DaemonProcess {
            pid: child.id(),
            child,
            started,
            socket: self.state_dir.join("control.sock"),
            log: self.log.clone(),
        })
    }

    /// Starts a daemon and waits until it is ready.
    pub fn start_daemon(&self, server_url: &str) -> anyhow::Result<DaemonProcess> {
        let mut daemon = self.spawn_daemon(server_url)?;
        daemon.wait_ready(Duration::from_secs(120))?;
        Ok(daemon)
    }

    /// Number of `*.zip` files directly in the outbox.
    pub fn outbox_archives(&self) -> usize {
        fs::read_dir(&self.outbox)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|entry| entry.file_name().to_string_lossy().ends_with(".zip"))
                    .count()
            })
            .unwrap_or(0)
    }
}

/// A running `outboxd run`. Dropping it kills the process.
pub struct DaemonProcess {
    pub pid: u32,
    child: Child,
    /// When the process was spawned.
    pub started: Instant,
    socket: PathBuf,
    log: PathBuf,
}

impl DaemonProcess {
    /// Polls the control socket every 2 ms until the daemon replies to a status
    /// request with `daemon.running`, and returns the time since the spawn.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let deadline = self.started + timeout;
        loop {
            if let Some(report) = self.request_status() {
                if report.pointer("/daemon/running") == Some(&serde_json::Value::Bool(true)) {
                    return Ok(self.started.elapsed());
                }
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "outboxd run exited with {status} before it was ready; see {}",
                    self.log.display()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "outboxd run was not ready within {timeout:?}; see {}",
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends a status request over the control socket. Returns `None` while no
    /// daemon replies on it.
    pub fn request_status(&self) -> Option<serde_json::Value> {
        let mut stream = UnixStream::connect(&self.socket).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        stream.write_all(b"{\"cmd\":\"status\"}\n").ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).ok()?;
        let reply: serde_json::Value = serde_json::from_str(&line).ok()?;
        reply.get("status").cloned()
    }

    /// Sends SIGTERM and waits for the exit; kills the process after 30 s.
    pub fn stop(mut self) -> anyhow::Result<()> {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child,
        // which has not been reaped yet.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        bail!(
            "outboxd run did not stop within 30 s of SIGTERM; see {}",
            self.log.display()
        )
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// /proc

/// Reads a `VmRSS`, `VmHWM` or other size field of /proc/PID/status, in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            let kib: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .with_context(|| format!("parsing {field} in {path}"))?;
            return Ok(kib * 1024);
        }
    }
    bail!("{path} has no {field} line")
}

/// User plus system CPU time of the process, all threads, from
/// /proc/PID/stat. The kernel counts it in clock ticks (10 ms at 100 Hz).
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name in brackets may contain spaces; fields follow the last ')'.
    let after_name = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("no ')' in /proc/PID/stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; the state (field 3)
    // is the first after the name.
    let ticks: u64 = fields
        .get(11..13)
        .context("short /proc/PID/stat")?
        .iter()
        .map(|field| field.parse::<u64>())
        .sum::<Result<u64, _>>()
        .context("parsing utime and stime")?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_micros(ticks * 1_000_000 / per_second))
}

/// Resource usage of a child process that exited, from wait4.
pub struct ChildUsage {
    pub exit_code: i32,
    pub peak_rss_bytes: u64,
    /// User plus system CPU time.
    pub cpu: Duration,
}

/// Waits for a child process and returns its exit code and resource usage.
pub fn wait_with_usage(child: Child) -> anyhow::Result<ChildUsage> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain old data, so all zero bytes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pointers are valid for the call; the pid is our child, which
    // std has not reaped because `child.wait` is never called on it.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if rc != pid {
        bail!(
            "waiting for process {pid} failed: {}",
            std::io::Error::last_os_error()
        );
    }
    drop(child);
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    let seconds = |time: libc::timeval| {
        Duration::from_secs(time.tv_sec as u64) + Duration::from_micros(time.tv_usec as u64)
    };
    Ok(ChildUsage {
        exit_code: code,
        // ru_maxrss is in KiB on Linux.
        peak_rss_bytes: usage.ru_maxrss as u64 * 1024,
        cpu: seconds(usage.ru_utime) + seconds(usage.ru_stime),
    })
}
