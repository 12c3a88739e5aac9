//! Load tests of `outboxd run`: a burst of files larger than the kernel's
//! inotify queue, and a queue of 100,000 records. They check function (all
//! uploaded; the daemon ready and `status` returning), not timings: the benchmarks in
//! `benches/` measure those. Each prints what it measured.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::fault_server::FaultServer;
use common::{archive, run_args, sha256_hex, wait_until, Daemon, Home};

/// More files than the default inotify queue (16384 events) can report.
const BURST_FILES: usize = 20_000;

/// Enough files to overflow the default inotify queue: each file dropped by
/// writing a temporary name and renaming it costs five events (create,
/// modify, close after writing, and the two halves of the rename).
const SMALL_BURST_FILES: usize = 4_000;

const RECORDS: usize = 100_000;

/// Reads `/proc/sys/fs/inotify/max_queued_events`.
fn inotify_queue_limit() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[test]
fn burst_past_inotify_queue_all_uploaded() {
    burst_all_uploaded(SMALL_BURST_FILES);
}

/// Runs the burst with 20,000 files. Each upload costs one fsync (the
/// uploaded mark is flushed before the file is deleted), so it took about
/// 2.5 minutes on a shared 2-core machine and runs only when requested:
/// `cargo test --test reliability_load -- --ignored`.
#[test]
#[ignore]
fn burst_of_20000_all_uploaded() {
    burst_all_uploaded(BURST_FILES);
}

/// Stops the daemon with SIGSTOP, writes `files` archives, lets it go on,
/// and checks that all arrive, found by the rescan that the overflow of
/// the inotify queue triggers.
fn burst_all_uploaded(files: usize) {
    let limit = inotify_queue_limit();
    // Each file costs five events (see SMALL_BURST_FILES), so the burst
    // overflows any queue shorter than five times its file count.
    if limit.is_some_and(|limit| limit >= 5 * files) {
        eprintln!(
            "skipped: the inotify queue holds {limit:?} events, so {files} files cannot overflow it"
        );
        return;
    }
    let server = FaultServer::start();
    // No periodic rescan within the test: only the overflow can find the
    // files whose events were lost.
    let daemon = Daemon::start(&run_args(
        &server.url(),
        &["--rescan-ms", "3600000", "--concurrency", "4"],
    ));
    let home = daemon.home();
    let mut expected = HashSet::new();

    daemon.sigstop();
    let written = Instant::now();
    for index in 0..files {
        let name = format!("burst-{index:05}.zip");
        let bytes = archive(&name, 64);
        expected.insert(sha256_hex(&bytes));
        home.drop_zip_unsynced(&name, &bytes);
    }
    eprintln!("burst: {files} files written in {:?}", written.elapsed());
    daemon.sigcont();

    let uploading = Instant::now();
    // About 8 ms per upload on a shared 2-core machine, bound by the fsync
    // of each uploaded mark; the deadline leaves a wide margin.
    let deadline = Duration::from_millis(50 * files as u64);
    let all = wait_until(deadline, || server.accepted_count() >= files);
    assert!(
        all,
        "{} of {files} accepted; outbox still has {} files",
        server.accepted_count(),
        home.outbox_files().len()
    );
    eprintln!(
        "burst: all accepted {:?} after SIGCONT",
        uploading.elapsed()
    );
    let delivered: HashSet<String> = server.deliveries().into_keys().collect();
    let missing = expected.difference(&delivered).count();
    assert_eq!(missing, 0, "archives never accepted");
    let emptied = wait_until(Duration::from_secs(30), || home.outbox_files().is_empty());
    assert!(
        emptied,
        "{} files left in the outbox",
        home.outbox_files().len()
    );
    assert!(
        daemon.stderr().contains("the outbox watcher lost events"),
        "the burst did not overflow the inotify queue (limit {limit:?}), so the rescan on overflow was not tried"
    );
}

#[test]
fn hundred_thousand_records_start_and_status() {
    let mut server = FaultServer::start();
    // The server is down: every item stays pending.
    server.stop();
    let home = Home::new();
    let bytes = archive("record", 64);
    let written = Instant::now();
    for index in 0..RECORDS {
        std::fs::write(home.outbox.join(format!("r-{index:06}.zip")), &bytes)
            .expect("writing an archive failed");
    }
    eprintln!(
        "records: {RECORDS} files written in {:?}",
        written.elapsed()
    );

    let args = run_args(&server.url(), &[]);
    let first = Instant::now();
    let mut daemon = Daemon::spawn_in(home, &args);
    daemon.wait_ready_within(Duration::from_secs(600));
    eprintln!(
        "records: first start (hashing and queueing every file) ready in {:?}",
        first.elapsed()
    );
    // With the server down, one upload at a time probes it, and that item
    // counts as uploading while it is tried.
    let waiting = |status: &common::Status| {
        status.number("/queue/pending").unwrap_or(0)
            + status.number("/queue/uploading").unwrap_or(0)
    };
    assert_eq!(
        waiting(&daemon.status()),
        RECORDS as i64,
        "queue.pending + queue.uploading after the first start"
    );

    daemon.sigterm();
    let exit = daemon.wait_exit(Duration::from_secs(60));
    assert!(exit.is_some_and(|e| e.success()), "SIGTERM exit: {exit:?}");
    let offline = daemon.status();
    assert_eq!(
        offline.code,
        Some(3),
        "status of a stopped daemon: {offline:?}"
    );
    assert_eq!(
        offline.number("/queue/pending"),
        Some(RECORDS as i64),
        "queue.pending read from the state dir"
    );

    let restart = Instant::now();
    daemon.spawn();
    daemon.wait_ready_within(Duration::from_secs(120));
    eprintln!(
        "records: restart with {RECORDS} records ready in {:?}",
        restart.elapsed()
    );
    let asked = Instant::now();
    let status = daemon.status();
    eprintln!("records: status --json answered in {:?}", asked.elapsed());
    assert_eq!(
        waiting(&status),
        RECORDS as i64,
        "queue.pending + queue.uploading after the restart: {}",
        status.stderr
    );
    assert_eq!(
        status.flag("/daemon/running"),
        Some(true),
        "daemon.running after the restart"
    );
}
