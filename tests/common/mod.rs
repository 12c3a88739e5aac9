//! Harness for the end-to-end tests: runs the real `outboxd` binary in a
//! private temporary home, drops archives into its outbox, and reads
//! `outboxd status --json` and `outboxd list --json`.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod fault_server;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_outboxd");

/// Token that `Home::new()` writes into the token file.
pub const TOKEN: &str = "e2e-upload-token-5c1f";

/// Timings that keep each test to a few seconds.
pub const FAST_TIMINGS: &[&str] = &[
    "--settle-ms",
    "200",
    "--backoff-initial-ms",
    "100",
    "--backoff-max-ms",
    "1000",
    "--unreachable-max-ms",
    "500",
];

/// Time a daemon gets to report `daemon.running == true` after it starts.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Lines of daemon stderr printed when a test fails.
const STDERR_TAIL_LINES: usize = 400;

/// Polls `condition` every 50 ms until it returns true or `timeout` passes.
/// Returns whether it became true.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Polls `condition` every `interval` until it returns true or `timeout`
/// passes, for conditions that are cheap to check and must be seen soon.
/// Returns whether it became true.
pub fn wait_until_every(
    timeout: Duration,
    interval: Duration,
    mut condition: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(interval);
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Builds a stored zip archive of about `size` bytes of content that depends
/// on `tag`, so archives with different tags have different SHA-256 hashes.
pub fn archive(tag: &str, size: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(size + 32);
    let mut block = Sha256::digest(tag.as_bytes());
    while data.len() < size {
        data.extend_from_slice(&block);
        block = Sha256::digest(block);
    }
    data.truncate(size);
    outboxd::zipfile::stored_archive(&format!("{tag}.json"), &data)
}

/// Builds a stored zip archive of `size` bytes of content quickly, for
/// archives of many megabytes: the content repeats one 32-byte block that
/// depends on `tag`, so archives with different tags still differ.
pub fn large_archive(tag: &str, size: usize) -> Vec<u8> {
    let block = Sha256::digest(tag.as_bytes());
    let mut data = block.as_slice().repeat(size / block.len() + 1);
    data.truncate(size);
    outboxd::zipfile::stored_archive(&format!("{tag}.json"), &data)
}

/// Builds the arguments of `run` after the folder and token flags: the
/// server URL, `FAST_TIMINGS`, then `extra`, which may override them.
pub fn run_args(server_url: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--server-url".to_string(), server_url.to_string()];
    args.extend(FAST_TIMINGS.iter().map(|arg| arg.to_string()));
    args.extend(extra.iter().map(|arg| arg.to_string()));
    args
}

/// A private home for one daemon: outbox, state dir, token file, XDG folders
/// and the stderr log, all under one temporary folder.
pub struct Home {
    root: Option<TempDir>,
    pub path: PathBuf,
    pub outbox: PathBuf,
    pub state_dir: PathBuf,
    pub token_file: PathBuf,
}

impl Home {
    /// Creates the folders and writes `TOKEN` into the token file.
    pub fn new() -> Home {
        let home = Home::without_token();
        home.write_token(TOKEN);
        home
    }

    /// Creates the folders. The token file path is set, but the file does not exist.
    pub fn without_token() -> Home {
        let root = tempfile::Builder::new()
            .prefix("outboxd-e2e-")
            .tempdir()
            .expect("creating a temporary folder failed");
        let path = root.path().to_path_buf();
        for folder in [
            "outbox",
            "state",
            "config",
            "data",
            "xdg-state",
            "cache",
            "runtime",
        ] {
            fs::create_dir_all(path.join(folder)).expect("creating a test folder failed");
        }
        Home {
            outbox: path.join("outbox"),
            state_dir: path.join("state"),
            token_file: path.join("token"),
            path,
            root: Some(root),
        }
    }

    /// Replaces the token file atomically: writes a dot file, then renames it.
    pub fn write_token(&self, token: &str) {
        let temp = self.path.join(".token.tmp");
        fs::write(&temp, format!("{token}\n")).expect("writing the token failed");
        fs::rename(&temp, &self.token_file).expect("renaming the token file into place failed");
    }

    /// Places an archive the way producers should: written under a dot name in
    /// the outbox, synced, then renamed to `name`.
    pub fn drop_zip(&self, name: &str, bytes: &[u8]) {
        let temp = self.outbox.join(format!(".{name}.tmp"));
        let mut file = File::create(&temp).expect("creating the temporary archive failed");
        file.write_all(bytes)
            .expect("writing the temporary archive failed");
        file.sync_all()
            .expect("syncing the temporary archive failed");
        drop(file);
        fs::rename(&temp, self.outbox.join(name))
            .expect("renaming the archive into the outbox failed");
    }

    /// Places an archive like `drop_zip`, without syncing it to disk first,
    /// for large archives and bursts where the sync is only a cost.
    pub fn drop_zip_unsynced(&self, name: &str, bytes: &[u8]) {
        let temp = self.outbox.join(format!(".{name}.tmp"));
        fs::write(&temp, bytes).expect("writing the temporary archive failed");
        fs::rename(&temp, self.outbox.join(name))
            .expect("renaming the archive into the outbox failed");
    }

    /// Writes `bytes` directly to `name` in the outbox, with no rename.
    pub fn write_in_place(&self, name: &str, bytes: &[u8]) {
        fs::write(self.outbox.join(name), bytes).expect("writing the archive in place failed");
    }

    /// Names of the regular files directly in the outbox, dot files included, sorted.
    pub fn outbox_files(&self) -> Vec<String> {
        regular_files(&self.outbox)
    }

    /// Names of the files in `rejected/`, `.reason` files included, sorted.
    pub fn rejected_files(&self) -> Vec<String> {
        regular_files(&self.outbox.join("rejected"))
    }

    pub fn rejected_reason(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.outbox.join("rejected").join(format!("{name}.reason"))).ok()
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.path.join("daemon.stderr")
    }

    /// Builds the command `outboxd <subcommand>` with the environment of this home.
    pub fn command(&self, subcommand: &str) -> Command {
        let mut command = Command::new(BIN);
        command.arg(subcommand);
        // Settings and token sources from the developer's environment must
        // not reach the daemon under test.
        for (name, _) in std::env::vars_os() {
            let name_text = name.to_string_lossy();
            let is_inherited_setting =
                name_text.starts_with("OUTBOXD_") || name_text.starts_with("XDG_");
            if is_inherited_setting {
                command.env_remove(&name);
            }
        }
        for name in [
            "CREDENTIALS_DIRECTORY",
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
        ] {
            command.env_remove(name);
        }
        command
            .env("HOME", &self.path)
            .env("XDG_CONFIG_HOME", self.path.join("config"))
            .env("XDG_DATA_HOME", self.path.join("data"))
            .env("XDG_STATE_HOME", self.path.join("xdg-state"))
            .env("XDG_CACHE_HOME", self.path.join("cache"))
            .env("XDG_RUNTIME_DIR", self.path.join("runtime"))
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null());
        command
    }

    /// Runs `outboxd status --json` on this home's state dir.
    pub fn status(&self) -> Status {
        let output = self
            .command("status")
            .arg("--json")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()
            .expect("running outboxd status failed");
        Status {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Runs `outboxd list --json` on this home's state dir and returns its items.
    pub fn list_items(&self) -> Result<Vec<Value>, String> {
        let output = self
            .command("list")
            .arg("--json")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()
            .expect("running outboxd list failed");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let json: Value = serde_json::from_str(&stdout).map_err(|err| {
            format!(
                "outboxd list --json printed no JSON ({err}); exit {:?}, stdout {stdout:?}, stderr {:?}",
                output.status.code(),
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
        // The spec fixes one row per item but not the wrapping, so both a bare
        // array and an object with an `items` array are read.
        match json {
            Value::Array(items) => Ok(items),
            Value::Object(ref object) => match object.get("items") {
                Some(Value::Array(items)) => Ok(items.clone()),
                _ => Err(format!("outboxd list --json printed no item array: {json}")),
            },
            other => Err(format!(
                "outboxd list --json printed no item array: {other}"
            )),
        }
    }

    /// Keeps the temporary folder after the test, for a look at a failure.
    fn keep(&mut self) {
        if let Some(root) = self.root.take() {
            let _ = root.keep();
        }
    }
}

fn regular_files(folder: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_type()
                .map(|kind| kind.is_file())
                .unwrap_or(false)
        })
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Output of one `outboxd status --json`.
#[derive(Debug, Clone)]
pub struct Status {
    /// Exit code; `None` when the command was killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Status {
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.stdout).ok()
    }

    /// Returns the string at a JSON pointer such as `/auth/state`.
    pub fn text(&self, pointer: &str) -> Option<String> {
        self.json()?.pointer(pointer)?.as_str().map(str::to_string)
    }

    /// Returns the integer at a JSON pointer such as `/queue/pending`.
    pub fn number(&self, pointer: &str) -> Option<i64> {
        self.json()?.pointer(pointer)?.as_i64()
    }

    pub fn flag(&self, pointer: &str) -> Option<bool> {
        self.json()?.pointer(pointer)?.as_bool()
    }

    pub fn auth_state(&self) -> Option<String> {
        self.text("/auth/state")
    }

    pub fn destination_state(&self) -> Option<String> {
        self.text("/destination/state")
    }
}

/// A running `outboxd run` process in its own `Home`. Dropping it kills the
/// process; when the test is failing, the daemon's stderr is printed and the
/// temporary folder is kept.
pub struct Daemon {
    home: Home,
    args: Vec<String>,
    child: Option<Child>,
    starts: u32,
}

impl Daemon {
    /// Starts a daemon in a fresh `Home` with `TOKEN` in its token file, and
    /// waits until it is ready.
    pub fn start(args: &[String]) -> Daemon {
        Daemon::start_in(Home::new(), args)
    }

    /// Starts a daemon in `home` without waiting until it is ready; call
    /// `wait_ready_within`.
    pub fn spawn_in(home: Home, args: &[String]) -> Daemon {
        let mut daemon = Daemon {
            home,
            args: args.to_vec(),
            child: None,
            starts: 0,
        };
        daemon.spawn();
        daemon
    }

    /// Starts a daemon in `home` and waits until it is ready. The outbox,
    /// state dir and token file flags come first; `args` follow them.
    pub fn start_in(home: Home, args: &[String]) -> Daemon {
        let mut daemon = Daemon {
            home,
            args: args.to_vec(),
            child: None,
            starts: 0,
        };
        daemon.spawn();
        daemon.wait_ready();
        daemon
    }

    pub fn home(&self) -> &Home {
        &self.home
    }

    /// Returns the full argument list of `run`.
    pub fn run_command_args(&self) -> Vec<String> {
        let mut all = vec![
            "--outbox".to_string(),
            self.home.outbox.display().to_string(),
            "--state-dir".to_string(),
            self.home.state_dir.display().to_string(),
            "--token-file".to_string(),
            self.home.token_file.display().to_string(),
        ];
        all.extend(self.args.iter().cloned());
        all
    }

    fn run_command(&self, stderr_path: &Path) -> Command {
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(stderr_path)
            .expect("opening the daemon's stderr file failed");
        let mut command = self.home.command("run");
        command
            .args(self.run_command_args())
            .stdout(Stdio::null())
            .stderr(stderr);
        command
    }

    /// Spawns the process without waiting for it to be ready. Its stderr is
    /// appended to the home's log, after a line that numbers the start.
    pub fn spawn(&mut self) {
        assert!(
            self.child.is_none(),
            "spawn() while the daemon is running (pid {})",
            self.pid()
        );
        self.starts += 1;
        let stderr_path = self.home.stderr_path();
        append_line(
            &stderr_path,
            &format!("===== test harness: start {} =====", self.starts),
        );
        let child = self
            .run_command(&stderr_path)
            .spawn()
            .unwrap_or_else(|err| panic!("spawning {BIN} run failed: {err}"));
        self.child = Some(child);
    }

    /// Waits until `status` reports `daemon.running == true` with this pid.
    /// Panics at once if the process exits first.
    pub fn wait_ready(&mut self) {
        self.wait_ready_within(READY_TIMEOUT);
    }

    /// Waits like `wait_ready`, up to `timeout`, for a start that has much
    /// to load first.
    pub fn wait_ready_within(&mut self, timeout: Duration) {
        let pid = self.pid() as i64;
        let mut last = None;
        let mut exit = None;
        wait_until(timeout, || {
            let status = self.home.status();
            let running = status.flag("/daemon/running") == Some(true);
            let same_pid = status.number("/daemon/pid") == Some(pid);
            last = Some(status);
            exit = self.try_exit_status();
            (running && same_pid) || exit.is_some()
        });
        let ready = last.as_ref().is_some_and(|status| {
            status.flag("/daemon/running") == Some(true)
                && status.number("/daemon/pid") == Some(pid)
        });
        if !ready || exit.is_some() {
            panic!(
                "daemon pid {pid} did not become ready (timeout {timeout:?}); process exit: {exit:?}; last status: {last:?}"
            );
        }
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("the daemon is not running")
    }

    pub fn status(&self) -> Status {
        self.home.status()
    }

    /// Runs `status --json` and parses it; panics with the output if it is not JSON.
    pub fn status_json(&self) -> Value {
        let status = self.status();
        status
            .json()
            .unwrap_or_else(|| panic!("outboxd status --json printed no JSON: {status:?}"))
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill9(&mut self) {
        let mut child = self
            .child
            .take()
            .expect("kill9() on a daemon that is not running");
        child.kill().expect("sending SIGKILL to the daemon failed");
        child.wait().expect("waiting for the killed daemon failed");
    }

    /// Sends SIGTERM. `wait_exit` returns the result.
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    pub fn sighup(&self) {
        self.signal(libc::SIGHUP);
    }

    /// Stops the process with SIGSTOP, so that it runs no code until `sigcont`.
    pub fn sigstop(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn sigcont(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        let result = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            result,
            0,
            "kill({pid}, {signal}) failed: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Waits up to `timeout` for the process to exit and returns its status,
    /// or `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut exit = None;
        wait_until(timeout, || {
            exit = self.try_exit_status();
            exit.is_some()
        });
        if exit.is_some() {
            self.child = None;
        }
        exit
    }

    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        child
            .try_wait()
            .expect("checking the daemon process failed")
    }

    /// Starts the daemon again on the same home, after `kill9` or an exit,
    /// and waits until it is ready.
    pub fn restart(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    /// Spawns another `run` on the same outbox, state dir and arguments,
    /// with its stderr in its own file.
    pub fn spawn_second(&self) -> SecondDaemon {
        let stderr_path = self.home.path.join("second.stderr");
        let child = self
            .run_command(&stderr_path)
            .spawn()
            .unwrap_or_else(|err| panic!("spawning a second {BIN} run failed: {err}"));
        SecondDaemon { child, stderr_path }
    }

    /// Reads the stderr of every start of this daemon so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.home.stderr_path()).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            let stderr = self.stderr();
            let lines: Vec<&str> = stderr.lines().collect();
            let skipped = lines.len().saturating_sub(STDERR_TAIL_LINES);
            eprintln!(
                "--- daemon stderr ({} lines, first {skipped} skipped), home kept at {} ---",
                lines.len(),
                self.home.path.display()
            );
            for line in &lines[skipped..] {
                eprintln!("{line}");
            }
            self.home.keep();
        }
    }
}

/// A second `run` on a state dir that a `Daemon` already uses.
pub struct SecondDaemon {
    child: Child,
    pub stderr_path: PathBuf,
}

impl SecondDaemon {
    /// Waits up to `timeout` for the process to exit. Kills it and returns
    /// `None` if it did not.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut exit = None;
        wait_until(timeout, || {
            exit = self
                .child
                .try_wait()
                .expect("checking the second daemon failed");
            exit.is_some()
        });
        if exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        exit
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for SecondDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn append_line(path: &Path, line: &str) {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("opening the daemon's stderr file failed");
    writeln!(file, "{line}").expect("writing to the daemon's stderr file failed");
}
