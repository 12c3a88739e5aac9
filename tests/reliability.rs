//! Reliability tests of `outboxd run` under faults: kill -9 at random
//! moments, a flapping server, keep-alive connections closed by the server,
//! files rewritten while they upload, clock steps, pruning, and a full or
//! read-only disk.
//!
//! Each test runs the real binary against the fault-injecting server on
//! 127.0.0.1 in a private temporary home. Random choices come from a seeded
//! generator: the seed is printed, and `OUTBOXD_TEST_SEED=N` repeats a run.

mod common;

use std::time::Duration;

use common::fault_server::FaultServer;
use common::{archive, run_args, sha256_hex, wait_until, wait_until_every, Daemon, Home};
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
        let bytes = archive(name, size);
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

/// Waits until every archive was accepted and the outbox holds no archive,
/// then asserts both.
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
