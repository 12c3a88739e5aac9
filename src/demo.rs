//! `outboxd demo`: the main job on this machine in one command. It starts the
//! reference receiver on loopback and a real daemon process on a temporary
//! outbox, drops real zip archives in, survives an outage and an auth failure,
//! and ends with the status screen. Nothing leaves 127.0.0.1.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};

use crate::control::{self, Request};
use crate::receiver::{self, ReceiverOptions};
use crate::status::{self, StatusReport};
use crate::zipfile;

/// Obviously fake tokens: the first one the server accepts, then the rotated one.
const FIRST_TOKEN: &str = "demo-token-not-a-secret-1";
const ROTATED_TOKEN: &str = "demo-token-not-a-secret-2";

/// Maximum wait for each step; the demo usually finishes in about 15 s.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// A daemon process that is stopped when dropped, so that a failed step does
/// not leave it running.
struct DaemonProcess(Child);

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Demo {
    base: PathBuf,
    outbox: PathBuf,
    state_dir: PathBuf,
    stored: PathBuf,
    server_token: PathBuf,
    daemon_token: PathBuf,
    started: Instant,
    dropped: usize,
}

/// Runs the demo. `keep` leaves the temporary folder in place.
pub async fn run(keep: bool) -> anyhow::Result<()> {
    let root = tempfile::Builder::new()
        .prefix("outboxd-demo-")
        .tempdir()
        .context("creating a temporary folder failed")?;
    let base = root.path().to_path_buf();
    let mut demo = Demo {
        outbox: base.join("outbox"),
        state_dir: base.join("state"),
        stored: base.join("received"),
        server_token: base.join("server-token"),
        daemon_token: base.join("daemon-token"),
        base: base.clone(),
        started: Instant::now(),
        dropped: 0,
    };
    let result = run_steps(&mut demo).await;
    if result.is_err() || keep {
        // On failure the daemon's log is the evidence, so the folder stays.
        let path = root.keep();
        println!("the demo's files are kept in {}", path.display());
    }
    result
}

async fn run_steps(demo: &mut Demo) -> anyhow::Result<()> {
    write_private(&demo.server_token, FIRST_TOKEN)?;
    write_private(&demo.daemon_token, FIRST_TOKEN)?;
    // An empty config file keeps the operator's own config out of the demo.
    std::fs::write(
        demo.base.join("config.toml"),
        "# outboxd demo: every setting is a flag\n",
    )?;

    let options = ReceiverOptions {
        dir: demo.stored.clone(),
        token_file: demo.server_token.clone(),
        ..ReceiverOptions::default()
    };
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let server = receiver::start(loopback, options.clone()).await?;
    let addr = server.addr();
    let url = server.url().to_string();
    demo.say(&format!(
        "receiver listening on {url}, storing into {}",
        demo.stored.display()
    ));

    let daemon = demo.start_daemon(&url)?;
    demo.wait_for("the daemon to be ready", |report| report.daemon.running)
        .await?;
    demo.say(&format!(
        "daemon started (pid {}) on the outbox {}",
        daemon.0.id(),
        demo.outbox.display()
    ));

    demo.drop_archives(5)?;
    demo.say("dropped 5 recordings into the outbox");
    demo.wait_for_delivered(5).await?;
    demo.say("all 5 arrived at the receiver, checked against their SHA-256");

    server.stop().await?;
    demo.say("outage: the receiver is stopped");
    demo.drop_archives(3)?;
    demo.say("dropped 3 more recordings while the server is down");
    let report = demo
        .wait_for("the daemon to notice the outage", |r| {
            r.destination.state == "unreachable"
        })
        .await?;
    demo.say(&format!(
        "the daemon reports destination=unreachable, {} pending, 0 rejected: it backs off and waits",
        report.queue.pending
    ));
    let server = receiver::start(addr, options.clone()).await?;
    demo.say("the receiver is back on the same port");
    demo.wait_for_delivered(8).await?;
    demo.say("the 3 waiting recordings arrived once the server came back");

    write_private(&demo.server_token, ROTATED_TOKEN)?;
    demo.say("auth failure: the server now expects a rotated token that the daemon does not have");
    demo.drop_archives(2)?;
    let report = demo
        .wait_for("the auth hold", |r| r.auth.state == "token_rejected")
        .await?;
    demo.say(&format!(
        "the daemon holds the whole queue: auth.state=token_rejected, {} pending, none rejected",
        report.queue.pending
    ));
    if let Some(detail) = &report.auth.detail {
        demo.say(&format!("  status says: {detail}"));
    }
    write_private(&demo.daemon_token, ROTATED_TOKEN)?;
    demo.say("the operator writes the rotated token into the daemon's token file");
    demo.wait_for_delivered(10).await?;
    demo.wait_for("auth ok", |r| r.auth.state == "ok" && r.queue.pending == 0)
        .await?;
    demo.say("the daemon saw the token change, probed once, lifted the hold and drained the queue");

    let report = demo.report().await?;
    println!();
    print!("{}", status::render_text(&report, SystemTime::now()));
    println!();
    stop_daemon(daemon)?;
    server.stop().await?;
    demo.say(&format!(
        "done: {} recordings dropped, {} delivered, none lost",
        demo.dropped,
        demo.delivered()
    ));
    Ok(())
}

impl Demo {
    fn say(&self, line: &str) {
        println!("[{:>5.1}s] {line}", self.started.elapsed().as_secs_f64());
    }

    fn start_daemon(&self, url: &str) -> anyhow::Result<DaemonProcess> {
        let exe = std::env::current_exe().context("finding the outboxd executable failed")?;
        let log = std::fs::File::create(self.base.join("daemon.log"))
            .context("creating the daemon log failed")?;
        let child = Command::new(exe)
            .arg("run")
            .arg("--config")
            .arg(self.base.join("config.toml"))
            .arg("--outbox")
            .arg(&self.outbox)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--server-url")
            .arg(url)
            .arg("--token-file")
            .arg(&self.daemon_token)
            .args([
                "--settle-ms",
                "200",
                "--backoff-initial-ms",
                "200",
                "--backoff-max-ms",
                "2000",
            ])
            .args(["--unreachable-max-ms", "1000", "--auth-probe-ms", "3000"])
            .env_remove("NOTIFY_SOCKET")
            .env_remove("OUTBOXD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the daemon failed")?;
        Ok(DaemonProcess(child))
    }

    /// Writes each archive under a dot name and renames it in, as producers should.
    fn drop_archives(&mut self, count: usize) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.outbox)?;
        for _ in 0..count {
            self.dropped += 1;
            let name = format!("session-{:03}.zip", self.dropped);
            let events = format!(
                "{{\"session\":{},\"events\":[\"start\",\"click\",\"stop\"]}}",
                self.dropped
            );
            let archive = zipfile::stored_archive("events.json", events.as_bytes());
            let temp = self.outbox.join(format!(".{name}.part"));
            std::fs::write(&temp, archive)?;
            std::fs::rename(&temp, self.outbox.join(&name))?;
        }
        Ok(())
    }

    fn delivered(&self) -> usize {
        std::fs::read_dir(&self.stored)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".zip"))
                    .count()
            })
            .unwrap_or(0)
    }

    async fn wait_for_delivered(&self, count: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while self.delivered() < count {
            if Instant::now() > deadline {
                bail!(
                    "only {} of {count} recordings arrived within {}s; see the daemon log in {}",
                    self.delivered(),
                    STEP_TIMEOUT.as_secs(),
                    self.base.join("daemon.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    async fn report(&self) -> anyhow::Result<StatusReport> {
        let reply = control::request(&self.state_dir, &Request::Status).await?;
        reply.status.context("the daemon's reply has no status")
    }

    async fn wait_for(
        &self,
        what: &str,
        done: impl Fn(&StatusReport) -> bool,
    ) -> anyhow::Result<StatusReport> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Ok(report) = self.report().await {
                if done(&report) {
                    return Ok(report);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {}s waiting for {what}; see the daemon log in {}",
                    STEP_TIMEOUT.as_secs(),
                    self.base.join("daemon.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn stop_daemon(mut daemon: DaemonProcess) -> anyhow::Result<()> {
    // SAFETY: kill with a pid of our own child has no memory-safety preconditions.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    let status = daemon.0.wait().context("waiting for the daemon failed")?;
    if !status.success() {
        bail!("the daemon exited with {status} after SIGTERM");
    }
    Ok(())
}

/// Writes a token file with mode 0600, replacing it atomically.
fn write_private(path: &Path, content: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let temp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .with_context(|| format!("writing {} failed", temp.display()))?;
    writeln!(file, "{content}")?;
    file.sync_all()?;
    std::fs::rename(&temp, path).with_context(|| format!("replacing {} failed", path.display()))?;
    Ok(())
}
