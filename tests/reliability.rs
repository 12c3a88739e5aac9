//! Reliability tests of `outboxd run` under faults: kill -9 at random
//! moments, a flapping server, keep-alive connections closed by the server,
//! files rewritten while they upload, clock steps, pruning, a full state
//! dir and a small outbox filesystem.
//!
//! Each test runs the real binary against the fault-injecting server on
//! 127.0.0.1 in a private temporary home. Random choices come from a seeded
//! generator: the seed is printed, and `OUTBOXD_TEST_SEED=N` repeats a run.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::fault_server::{FaultServer, Reply};
use common::{
    archive, large_archive, run_args, sha256_hex, wait_until, wait_until_every, Daemon, Home,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Time for a batch of archives to reach the server once nothing blocks them.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Time for the daemon to reach a state that it should enter at once.
const STATE_TIMEOUT: Duration = Duration::from_secs(10);

struct Archive {
    name: String,
    bytes: Vec<u8>,
    sha256: String,
}

impl Archive {
    fn new(name: &str, size: usize) -> Archive {
        Archive::from_bytes(name, archive(name, size))
    }

    /// Builds an archive of many megabytes quickly (see `large_archive`).
    /// `tag` sets the content, so that one name can get several versions.
    fn large(name: &str, tag: &str, size: usize) -> Archive {
        Archive::from_bytes(name, large_archive(tag, size))
    }

    fn from_bytes(name: &str, bytes: Vec<u8>) -> Archive {
        let sha256 = sha256_hex(&bytes);
        Archive {
            name: name.to_string(),
            bytes,
            sha256,
        }
    }
}

/// Builds `count` archives named `<prefix>-<i>.zip` of `size` bytes each.
fn archives(prefix: &str, count: usize, size: usize) -> Vec<Archive> {
    (0..count)
        .map(|index| Archive::new(&format!("{prefix}-{index:04}.zip"), size))
        .collect()
}

/// Returns a generator seeded from `OUTBOXD_TEST_SEED`, or from the clock,
/// and prints the seed so that a failing run can be repeated.
fn seeded_rng(test: &str) -> StdRng {
    let seed = std::env::var("OUTBOXD_TEST_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test}: seed {seed} (repeat with OUTBOXD_TEST_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

/// Returns the names of the archives that the server has not accepted yet.
fn undelivered(server: &FaultServer, archives: &[Archive]) -> Vec<String> {
    let deliveries = server.deliveries();
    archives
        .iter()
        .filter(|archive| !deliveries.contains_key(&archive.sha256))
        .map(|archive| archive.name.clone())
        .collect()
}

/// Returns the `.zip` files directly in the outbox.
fn outbox_archives(home: &Home) -> Vec<String> {
    home.outbox_files()
        .into_iter()
        .filter(|name| name.ends_with(".zip"))
        .collect()
}

/// Waits until every archive was accepted and no archive is left in the
/// outbox, then asserts both.
fn assert_all_delivered(home: &Home, server: &FaultServer, archives: &[Archive]) {
    let arrived = wait_until(DELIVERY_TIMEOUT, || {
        undelivered(server, archives).is_empty()
    });
    assert!(
        arrived,
        "archives not accepted within {DELIVERY_TIMEOUT:?}: {:?}",
        undelivered(server, archives)
    );
    let emptied = wait_until(STATE_TIMEOUT, || outbox_archives(home).is_empty());
    assert!(
        emptied,
        "archives left in the outbox: {:?}",
        outbox_archives(home)
    );
}

fn assert_no_mismatched_hash(server: &FaultServer) {
    let mismatched: Vec<String> = server
        .requests()
        .iter()
        .filter(|request| request.has_mismatched_hash())
        .map(ToString::to_string)
        .collect();
    assert!(
        mismatched.is_empty(),
        "whole bodies whose sha256 field differs from the file part: {mismatched:?}"
    );
}

/// Counts the daemon's log lines that contain `text`.
fn log_lines(daemon: &Daemon, text: &str) -> usize {
    daemon
        .stderr()
        .lines()
        .filter(|line| line.contains(text))
        .count()
}

/// Log message of the daemon when the destination starts backing off.
const UNREACHABLE_LOG: &str = "the server cannot be reached";

#[test]
fn keepalive_idle_close_loses_nothing() {
    const UPLOADS: usize = 300;
    let idle_timeout = Duration::from_millis(50);
    let mut rng = seeded_rng("keepalive_idle_close_loses_nothing");
    let server = FaultServer::start();
    server.set_idle_timeout(Some(idle_timeout));
    let daemon = Daemon::start(&run_args(&server.url(), &["--concurrency", "1"]));
    let files = archives("keepalive", UPLOADS, 2048);

    for (index, file) in files.iter().enumerate() {
        daemon.home().drop_zip(&file.name, &file.bytes);
        let accepted = wait_until_every(DELIVERY_TIMEOUT, Duration::from_millis(1), || {
            server.accepted_count() > index
        });
        assert!(accepted, "upload {index} ({}) not accepted", file.name);
        // The next request should start around the server's idle timeout
        // after this response. The daemon's intake and dispatch add a few
        // milliseconds, so the pauses straddle the timeout from both sides.
        let pause_ms = rng.gen_range(35..=55);
        std::thread::sleep(Duration::from_millis(pause_ms));
    }

    assert_all_delivered(daemon.home(), &server, &files);
    let requests = server.requests();
    let reused: Vec<Duration> = requests
        .iter()
        .filter_map(|request| request.idle_before)
        .collect();
    let near_timeout = reused
        .iter()
        .filter(|idle| idle.abs_diff(idle_timeout) <= Duration::from_millis(5))
        .count();
    let unreachable = log_lines(&daemon, UNREACHABLE_LOG);
    let transient = log_lines(&daemon, "upload failed");
    let resent = log_lines(&daemon, "sending once more on a new connection");
    eprintln!(
        "keep-alive: {} requests, {} on reused connections, {near_timeout} of them within 5 ms of the idle timeout, {} idle closes, {} new connections, {resent} uploads sent again after a lost connection, {unreachable} destination backoffs, {transient} item failures",
        requests.len(),
        reused.len(),
        server.idle_closes(),
        requests.len() - reused.len(),
    );
    assert!(
        server.idle_closes() > 0,
        "the server never closed an idle connection, so no race was tried"
    );
    assert_eq!(transient, 0, "uploads counted as item failures");
    assert_eq!(
        unreachable, 0,
        "a connection closed by the server put the destination into backoff"
    );
    assert_no_mismatched_hash(&server);
    let duplicates: Vec<(String, usize)> = server
        .deliveries()
        .into_iter()
        .filter(|(_, count)| *count > 1)
        .collect();
    eprintln!("keep-alive: {} archives accepted twice", duplicates.len());
}

/// Uploads in flight at once in the crash test; a kill may cause at most this
/// many duplicate deliveries.
const CRASH_CONCURRENCY: usize = 2;

/// Time after a kill within which the server may still start handling a
/// request of the killed daemon: its bytes were in the socket buffers before
/// it died, and the server's handler may start late on a busy machine.
const KILL_SLACK: Duration = Duration::from_secs(1);

/// One kill: the instants just before SIGKILL and after the process was reaped.
#[derive(Clone, Copy)]
struct Kill {
    sent: Instant,
    reaped: Instant,
}

/// For each accepted delivery that repeats an earlier one of the same
/// content, finds the kill that explains it: the first kill after the
/// earlier delivery started and before the repeat started. Failing that, the
/// last kill before the earlier delivery, if the earlier delivery started
/// within `KILL_SLACK` of it (a handler that started late). Returns the
/// repeats per kill index, and the repeats that no kill explains.
fn attribute_duplicates(server: &FaultServer, kills: &[Kill]) -> (Vec<Vec<String>>, Vec<String>) {
    let mut by_sha: HashMap<String, Vec<(Instant, String)>> = HashMap::new();
    for request in server.requests().iter().filter(|r| r.is_accepted()) {
        let part = request.file().expect("accepted requests have a file part");
        by_sha
            .entry(part.sha256.clone())
            .or_default()
            .push((request.started_at, request.to_string()));
    }
    let mut per_kill = vec![Vec::new(); kills.len()];
    let mut unexplained = Vec::new();
    for deliveries in by_sha.values_mut() {
        deliveries.sort_by_key(|(started, _)| *started);
        for pair in deliveries.windows(2) {
            let (earlier, _) = &pair[0];
            let (later, line) = &pair[1];
            let after = kills
                .iter()
                .position(|kill| kill.sent > *earlier && kill.sent < *later);
            let late_handler = || {
                kills
                    .iter()
                    .rposition(|kill| kill.sent <= *earlier)
                    .filter(|&index| kills[index].reaped + KILL_SLACK > *earlier)
            };
            match after.or_else(late_handler) {
                Some(index) => per_kill[index].push(line.clone()),
                None => unexplained.push(line.clone()),
            }
        }
    }
    (per_kill, unexplained)
}

#[test]
fn kill9_loop_loses_nothing() {
    const KILLS: usize = 50;
    const ARCHIVES: usize = 300;
    let mut rng = seeded_rng("kill9_loop_loses_nothing");
    let mut server = FaultServer::start();
    // Each response waits, so that most kills find uploads in flight.
    server.set_default(Reply::created().with_delay(Duration::from_millis(40)));
    let files = archives("crash", ARCHIVES, 6 * 1024);
    for file in &files {
        let reply = match rng.gen_range(0..100) {
            0..=14 => Reply::status(500),
            15..=24 => Reply::close_mid_body(),
            25..=39 => Reply::created().with_delay(Duration::from_millis(rng.gen_range(100..300))),
            _ => continue,
        };
        server.push_for_file(&file.name, [reply]);
    }
    server.start_flapping(Duration::from_millis(1500), Duration::from_millis(300));
    let concurrency = CRASH_CONCURRENCY.to_string();
    let mut daemon = Daemon::start(&run_args(&server.url(), &["--concurrency", &concurrency]));

    let per_round = ARCHIVES.div_ceil(KILLS);
    let mut kills = Vec::with_capacity(KILLS);
    let mut during_start = 0;
    for round in 0..KILLS {
        for file in files.iter().skip(round * per_round).take(per_round) {
            daemon.home().drop_zip(&file.name, &file.bytes);
        }
        let pause = Duration::from_millis(rng.gen_range(0..300));
        std::thread::sleep(pause);
        let sent = Instant::now();
        daemon.kill9();
        kills.push(Kill {
            sent,
            reaped: Instant::now(),
        });
        // One start in five is killed again before it is ready, at any
        // point of loading the queue and scanning the outbox.
        if rng.gen_range(0..5) == 0 {
            during_start += 1;
            daemon.spawn();
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..150)));
            let sent = Instant::now();
            daemon.kill9();
            kills.push(Kill {
                sent,
                reaped: Instant::now(),
            });
        }
        daemon.restart();
    }
    server.stop_flapping();

    assert_all_delivered(daemon.home(), &server, &files);
    assert_eq!(
        daemon.home().rejected_files(),
        Vec::<String>::new(),
        "rejected files"
    );
    assert_no_mismatched_hash(&server);
    let (per_kill, unexplained) = attribute_duplicates(&server, &kills);
    let duplicates: usize = per_kill.iter().map(Vec::len).sum();
    eprintln!(
        "kill -9 loop: {} kills ({during_start} during start-up), {} requests, {} accepted, {duplicates} duplicates, {} flaps, {} requests cut while down",
        kills.len(),
        server.request_count(),
        server.accepted_count(),
        server.flaps(),
        server.down_cuts(),
    );
    assert_eq!(
        unexplained,
        Vec::<String>::new(),
        "repeat deliveries with no kill since the earlier delivery"
    );
    for (index, repeats) in per_kill.iter().enumerate() {
        assert!(
            repeats.len() <= CRASH_CONCURRENCY,
            "kill {index} caused {} duplicate deliveries, more than the concurrency {CRASH_CONCURRENCY}: {repeats:#?}",
            repeats.len()
        );
    }
    let status = daemon.status_json();
    assert_eq!(
        status.pointer("/queue/pending").and_then(|v| v.as_i64()),
        Some(0),
        "queue.pending after the loop: {status}"
    );
}

/// Size of the archives rewritten during their upload. It exceeds the socket
/// buffers between the daemon and the slow server, where the daemon's send
/// buffer alone may grow to 4 MiB, so the daemon has not read the end of the
/// file when the rewrite comes.
const REWRITE_SIZE: usize = 8 << 20;

/// Bytes of each upload the server must have read before the files are
/// rewritten.
const REWRITE_AFTER_BYTES: u64 = 256 * 1024;

/// Returns `bytes_sent` of the upload of `file` in `status --json`.
fn bytes_sent(daemon: &Daemon, file: &str) -> Option<u64> {
    let status = daemon.status_json();
    status
        .pointer("/uploads")?
        .as_array()?
        .iter()
        .find(|upload| upload.pointer("/file").and_then(|f| f.as_str()) == Some(file))?
        .pointer("/bytes_sent")?
        .as_u64()
}

#[test]
fn rewrite_during_upload_sends_final_content() {
    let begun = Instant::now();
    let server = FaultServer::start();
    server.set_read_delay(Duration::from_millis(20));
    let daemon = Daemon::start(&run_args(&server.url(), &["--concurrency", "3"]));
    let home = daemon.home();
    // Three writers: one overwrites in place with new bytes of the same
    // size, one truncates and writes a larger archive, and one renames a new
    // archive over the old name.
    let same_size = (
        Archive::large("overwrite.zip", "overwrite-1", REWRITE_SIZE),
        Archive::large("overwrite.zip", "overwrite-2", REWRITE_SIZE),
    );
    let grown = (
        Archive::large("grow.zip", "grow-1", REWRITE_SIZE),
        Archive::large("grow.zip", "grow-2", REWRITE_SIZE + 300_000),
    );
    let replaced = (
        Archive::large("replace.zip", "replace-1", REWRITE_SIZE),
        Archive::large("replace.zip", "replace-2", REWRITE_SIZE / 2),
    );
    let pairs = [&same_size, &grown, &replaced];
    eprintln!("archives built in {:?}", begun.elapsed());
    for (first, _) in pairs {
        home.drop_zip_unsynced(&first.name, &first.bytes);
    }
    // Each rewrite comes once the server has read the start of that upload.
    let wait_started = |first: &Archive| {
        let started = wait_until(DELIVERY_TIMEOUT, || {
            server.bytes_in_progress(&first.name).unwrap_or(0) >= REWRITE_AFTER_BYTES
        });
        assert!(started, "the upload of {} did not start", first.name);
    };
    // The rewrite in place must come before the daemon read the end of the
    // file, or the abort before the last bytes is never tried.
    let assert_not_read_to_end = |first: &Archive| {
        let sent = bytes_sent(&daemon, &first.name);
        eprintln!(
            "{}: {sent:?} of {} bytes sent at the rewrite ({:?} since the start)",
            first.name,
            first.bytes.len(),
            begun.elapsed()
        );
        assert!(
            sent.is_some_and(|sent| sent + (1 << 20) < first.bytes.len() as u64),
            "{}: the daemon already read near the end ({sent:?} bytes sent) before the rewrite",
            first.name
        );
    };

    wait_started(&same_size.0);
    assert_not_read_to_end(&same_size.0);
    {
        use std::io::{Seek, Write};
        let path = home.outbox.join(&same_size.0.name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("opening the archive for an in-place overwrite failed");
        file.seek(std::io::SeekFrom::Start(0)).unwrap();
        file.write_all(&same_size.1.bytes)
            .expect("overwriting the archive failed");
    }
    wait_started(&grown.0);
    assert_not_read_to_end(&grown.0);
    std::fs::write(home.outbox.join(&grown.0.name), &grown.1.bytes)
        .expect("rewriting the archive with a larger one failed");
    wait_started(&replaced.0);
    home.drop_zip_unsynced(&replaced.1.name, &replaced.1.bytes);
    server.set_read_delay(Duration::ZERO);

    let finals: Vec<&Archive> = pairs.iter().map(|(_, last)| last).collect();
    let arrived = wait_until(DELIVERY_TIMEOUT, || {
        let deliveries = server.deliveries();
        finals
            .iter()
            .all(|last| deliveries.contains_key(&last.sha256))
    });
    assert!(arrived, "the final contents did not all arrive");
    eprintln!("final contents arrived after {:?}", begun.elapsed());
    let emptied = wait_until(STATE_TIMEOUT, || outbox_archives(home).is_empty());
    assert!(emptied, "archives left: {:?}", outbox_archives(home));
    assert_no_mismatched_hash(&server);
    for (first, _) in [&same_size, &grown] {
        assert_eq!(
            server.delivered(&first.sha256),
            0,
            "{}: the content from before the rewrite was accepted",
            first.name
        );
        let aborted = server
            .requests_for(&first.name)
            .iter()
            .filter(|request| !request.body_complete)
            .count();
        assert!(
            aborted >= 1,
            "{}: no upload was aborted mid-body:\n{}",
            first.name,
            server.summary()
        );
    }
    assert!(
        log_lines(&daemon, "the file changed while it was sent") >= 2,
        "the daemon did not log the changed files"
    );
    assert_eq!(
        home.rejected_files(),
        Vec::<String>::new(),
        "rejected files"
    );
}

/// Reads `list --json` and returns the value at `pointer` of the item for
/// `file`, if listed.
fn listed(home: &Home, file: &str, pointer: &str) -> Option<serde_json::Value> {
    let items = home.list_items().ok()?;
    let item = items
        .into_iter()
        .find(|item| item.pointer("/file").and_then(|f| f.as_str()) == Some(file))?;
    item.pointer(pointer).cloned()
}

#[test]
fn far_future_attempt_after_clock_step_is_due() {
    const DAY_MS: u64 = 86_400_000;
    let server = FaultServer::start();
    let file = Archive::new("clock.zip", 2048);
    // One failure gives the item a stored next attempt time.
    server.push_for_file(&file.name, [Reply::status(500)]);
    server.set_default(Reply::status(500));
    let mut daemon = Daemon::start(&run_args(&server.url(), &[]));
    daemon.home().drop_zip(&file.name, &file.bytes);
    let failed = wait_until(DELIVERY_TIMEOUT, || {
        listed(daemon.home(), &file.name, "/attempts").and_then(|v| v.as_u64()) >= Some(1)
    });
    assert!(failed, "the upload never failed:\n{}", server.summary());
    daemon.sigterm();
    let exit = daemon.wait_exit(STATE_TIMEOUT);
    assert!(exit.is_some_and(|e| e.success()), "SIGTERM exit: {exit:?}");

    // The wall clock stepped back 30 days since the attempt time was
    // stored: seen from now, the next attempt is 30 days away.
    let far_future = outboxd::timefmt::now_ms() + 30 * DAY_MS;
    {
        let store = outboxd::store::Store::open(&daemon.home().state_dir)
            .expect("opening the stopped daemon's queue failed");
        let mut records = store.load_all().expect("reading the queue failed");
        let record = records
            .iter_mut()
            .find(|record| record.file == file.name)
            .expect("the queue has no record of clock.zip");
        record.next_attempt_at = Some(far_future);
        store.put(record).expect("writing the record failed");
        store.flush_blocking().expect("flushing the queue failed");
    }
    let stored = outboxd::store::Store::open(&daemon.home().state_dir)
        .and_then(|store| store.load_all())
        .expect("reading the queue back failed");
    assert_eq!(
        stored
            .iter()
            .find(|record| record.file == file.name)
            .and_then(|record| record.next_attempt_at),
        Some(far_future),
        "the edited record did not persist"
    );

    server.set_default(Reply::created());
    daemon.restart();
    // backoff_max_ms is 1 s in FAST_TIMINGS: the item must go within that,
    // not in 30 days.
    let delivered = wait_until(STATE_TIMEOUT, || server.delivered(&file.sha256) >= 1);
    assert!(
        delivered,
        "the item with a next attempt 30 days away was not sent:\n{}",
        server.summary()
    );
}

#[test]
fn uploaded_records_pruned_while_running() {
    let server = FaultServer::start();
    let daemon = Daemon::start(&run_args(
        &server.url(),
        &["--uploaded-retention-ms", "300"],
    ));
    let files = archives("prune", 5, 1024);
    for file in &files {
        daemon.home().drop_zip(&file.name, &file.bytes);
    }
    assert_all_delivered(daemon.home(), &server, &files);

    let mut last = Vec::new();
    let pruned = wait_until(STATE_TIMEOUT, || {
        last = daemon.home().list_items().unwrap_or_default();
        last.is_empty()
    });
    assert!(pruned, "records left after the retention: {last:?}");
    let status = daemon.status_json();
    assert_eq!(
        status.pointer("/queue/uploaded").and_then(|v| v.as_i64()),
        Some(5),
        "queue.uploaded counts uploads, not records: {status}"
    );
}

/// A tmpfs mounted over a test's folder, unmounted when dropped. Mounting
/// needs root; without it, `mount` returns `None` and prints why, and the
/// test skips itself.
struct Tmpfs {
    path: std::path::PathBuf,
}

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Option<Tmpfs> {
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(path)
            .output();
        match output {
            Ok(output) if output.status.success() => Some(Tmpfs {
                path: path.to_path_buf(),
            }),
            Ok(output) => {
                eprintln!(
                    "skipped: mounting a tmpfs on {} failed (root is needed): {}",
                    path.display(),
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                None
            }
            Err(err) => {
                eprintln!("skipped: running mount failed: {err}");
                None
            }
        }
    }

    /// Fills the filesystem with a ballast file until a write fails with
    /// ENOSPC. Returns the ballast's path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.path.join("ballast");
        let mut file = std::fs::File::create(&path).expect("creating the ballast failed");
        let block = vec![0u8; 4096];
        loop {
            if let Err(err) = file.write_all(&block) {
                assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "filling: {err}");
                break;
            }
        }
        // The last partial block may have fit: fill byte by byte to the end.
        while file.write_all(&[0]).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy, so that a daemon still running on it does not block the
        // unmount; its files go with the tmpfs.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Warning of a running daemon whose queue database cannot be written.
const STORE_FAILED_LOG: &str = "the queue database cannot be written";
const STORE_RECOVERED_LOG: &str = "the queue database can be written again";

/// Returns the `warnings` of `status --json`.
fn warnings(daemon: &Daemon) -> Vec<String> {
    daemon
        .status()
        .json()
        .and_then(|json| json.pointer("/warnings").cloned())
        .and_then(|warnings| serde_json::from_value(warnings).ok())
        .unwrap_or_default()
}

#[test]
fn low_space_in_outbox_warns_in_status() {
    let home = Home::new();
    let Some(_tmpfs) = Tmpfs::mount(&home.outbox, "2m") else {
        return;
    };
    let server = FaultServer::start();
    let daemon = Daemon::start_in(home, &run_args(&server.url(), &[]));
    let warnings = warnings(&daemon);
    let low = warnings
        .iter()
        .find(|warning| warning.contains("outbox's filesystem"));
    assert!(low.is_some(), "no low-space warning: {warnings:?}");
    assert!(
        low.is_some_and(|warning| warning.contains("2.0 MiB free")),
        "the warning does not give the free space of the 2 MiB tmpfs: {low:?}"
    );
}

/// Runs a daemon whose state dir is a small tmpfs, breaks the filesystem
/// with `break_disk` after a first upload, drops archives, and checks that
/// uploads pause without repeats and the files stay; then `repair` and
/// checks that everything is delivered.
fn state_disk_trouble(test: &str, break_disk: impl FnOnce(&Tmpfs), repair: impl FnOnce(&Tmpfs)) {
    let home = Home::new();
    let Some(tmpfs) = Tmpfs::mount(&home.state_dir, "8m") else {
        return;
    };
    let server = FaultServer::start();
    let daemon = Daemon::start_in(home, &run_args(&server.url(), &[]));
    let home = daemon.home();
    let first = Archive::new(&format!("{test}-first.zip"), 2048);
    home.drop_zip(&first.name, &first.bytes);
    assert_all_delivered(home, &server, std::slice::from_ref(&first));

    break_disk(&tmpfs);
    let files = archives(test, 5, 2048);
    for file in &files {
        home.drop_zip(&file.name, &file.bytes);
    }
    let noticed = wait_until(DELIVERY_TIMEOUT, || {
        log_lines(&daemon, STORE_FAILED_LOG) > 0
    });
    assert!(noticed, "the daemon did not log the failed queue database");
    let shown = wait_until(STATE_TIMEOUT, || {
        warnings(&daemon)
            .iter()
            .any(|warning| warning.contains("cannot be written"))
    });
    assert!(shown, "status shows no warning: {:?}", warnings(&daemon));
    // An archive whose uploaded mark reached the disk before the failure
    // may be gone; every other one must still be in the outbox.
    let kept = outbox_archives(home);
    let deliveries = server.deliveries();
    let lost: Vec<&String> = files
        .iter()
        .filter(|file| !kept.contains(&file.name) && !deliveries.contains_key(&file.sha256))
        .map(|file| &file.name)
        .collect();
    assert_eq!(
        lost,
        Vec::<&String>::new(),
        "archives gone without delivery"
    );
    assert!(
        !kept.is_empty(),
        "no archive was kept, so the failure came too late to test"
    );

    repair(&tmpfs);
    assert_all_delivered(home, &server, &files);
    assert!(
        log_lines(&daemon, STORE_RECOVERED_LOG) > 0,
        "the daemon did not log the recovery"
    );
    let repeats: Vec<(String, usize)> = server
        .deliveries()
        .into_iter()
        .filter(|(_, count)| *count > 2)
        .collect();
    assert_eq!(
        repeats,
        Vec::new(),
        "archives accepted more than twice: uploads were repeated while their marks could not be stored"
    );
    let cleared = wait_until(STATE_TIMEOUT, || {
        !warnings(&daemon)
            .iter()
            .any(|warning| warning.contains("cannot be written"))
    });
    assert!(
        cleared,
        "the warning stayed after the recovery: {:?}",
        warnings(&daemon)
    );
}

#[test]
fn full_state_dir_pauses_then_resumes() {
    let ballast = std::cell::RefCell::new(None);
    state_disk_trouble(
        "enospc",
        |tmpfs| *ballast.borrow_mut() = Some(tmpfs.fill()),
        |_| {
            let path = ballast.borrow_mut().take().expect("the disk was filled");
            std::fs::remove_file(path).expect("removing the ballast failed");
        },
    );
}

#[test]
fn rejection_of_replaced_file_keeps_new_version() {
    let server = FaultServer::start();
    let old = Archive::new("replaced.zip", 2048);
    let new = Archive::from_bytes("replaced.zip", archive("replaced-v2", 2048));
    // The server refuses the old content, and answers only after the test
    // has renamed the new version over it.
    server.push_for_file(
        &old.name,
        [Reply::status(400).with_delay(Duration::from_millis(500))],
    );
    let daemon = Daemon::start(&run_args(&server.url(), &[]));
    let home = daemon.home();
    home.drop_zip(&old.name, &old.bytes);
    let received = wait_until(STATE_TIMEOUT, || {
        server
            .requests_for(&old.name)
            .iter()
            .any(|request| request.body_complete)
    });
    assert!(received, "the old version never reached the server");
    home.drop_zip(&new.name, &new.bytes);

    let delivered = wait_until(DELIVERY_TIMEOUT, || server.delivered(&new.sha256) >= 1);
    assert!(
        delivered,
        "the new version was not uploaded; rejected/ has {:?}",
        home.rejected_files()
    );
    assert_eq!(
        home.rejected_files(),
        Vec::<String>::new(),
        "files in rejected/ that the server never refused"
    );
}
