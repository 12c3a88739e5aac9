//! End-to-end tests of `outboxd run` against the fault-injecting server.
//!
//! Each test starts the real binary in a private temporary home with short
//! timings, drops archives into its outbox and checks what the server
//! received and what `outboxd status --json` reports. Tests run in parallel,
//! each with its own folders and ports.

mod common;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};

use common::fault_server::{FaultServer, Reply};
use common::{archive, run_args, sha256_hex, wait_until, Daemon, Home, Status, TOKEN};

/// Time for a batch of archives to reach the server once nothing blocks them.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);

/// Time for the daemon to reach a state that it should enter at once.
const STATE_TIMEOUT: Duration = Duration::from_secs(10);

/// Uploads in flight at once. It is the daemon's default, passed explicitly
/// where a bound depends on it.
const CONCURRENCY: usize = 2;

struct Archive {
    name: String,
    bytes: Vec<u8>,
    sha256: String,
}

/// Builds `count` archives named `<prefix>-<i>.zip`, each with distinct content.
fn archives(prefix: &str, count: usize, size: usize) -> Vec<Archive> {
    (0..count)
        .map(|index| {
            let name = format!("{prefix}-{index:02}.zip");
            let bytes = archive(&name, size);
            let sha256 = sha256_hex(&bytes);
            Archive {
                name,
                bytes,
                sha256,
            }
        })
        .collect()
}

fn single(name: &str, size: usize) -> Archive {
    let bytes = archive(name, size);
    let sha256 = sha256_hex(&bytes);
    Archive {
        name: name.to_string(),
        bytes,
        sha256,
    }
}

fn start_daemon(server: &FaultServer, extra: &[&str]) -> Daemon {
    Daemon::start(&run_args(&server.url(), extra))
}

fn drop_all(home: &Home, archives: &[Archive]) {
    for archive in archives {
        home.drop_zip(&archive.name, &archive.bytes);
    }
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

/// Returns the archives that the server accepted more than once, with their counts.
fn duplicates(server: &FaultServer, archives: &[Archive]) -> Vec<(String, usize)> {
    let deliveries = server.deliveries();
    archives
        .iter()
        .filter_map(|archive| match deliveries.get(&archive.sha256) {
            Some(&count) if count > 1 => Some((archive.name.clone(), count)),
            _ => None,
        })
        .collect()
}

/// Waits until every archive has been accepted and none of them is left in
/// the outbox, then asserts both, with the names in the message.
fn assert_all_delivered(
    daemon: &Daemon,
    server: &FaultServer,
    archives: &[Archive],
    timeout: Duration,
) {
    let arrived = wait_until(timeout, || undelivered(server, archives).is_empty());
    assert!(
        arrived,
        "archives not accepted within {timeout:?}: {:?}",
        undelivered(server, archives)
    );
    let left = || -> Vec<String> {
        let names = outbox_archives(daemon.home());
        archives
            .iter()
            .filter(|archive| names.contains(&archive.name))
            .map(|archive| archive.name.clone())
            .collect()
    };
    let removed = wait_until(STATE_TIMEOUT, || left().is_empty());
    assert!(
        removed,
        "delivered archives still in the outbox: {:?}",
        left()
    );
}

/// Returns the `.zip` files directly in the outbox.
fn outbox_archives(home: &Home) -> Vec<String> {
    home.outbox_files()
        .into_iter()
        .filter(|name| name.ends_with(".zip"))
        .collect()
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

/// Polls `status --json` until the string at `pointer` equals `expected`,
/// and returns the last status read, so the caller's assert shows it.
fn wait_for_text(daemon: &Daemon, pointer: &str, expected: &str, timeout: Duration) -> Status {
    let mut last = daemon.status();
    wait_until(timeout, || {
        last = daemon.status();
        last.text(pointer).as_deref() == Some(expected)
    });
    last
}

/// Polls `status --json` until the integer at `pointer` equals `expected`.
fn wait_for_number(daemon: &Daemon, pointer: &str, expected: i64, timeout: Duration) -> Status {
    let mut last = daemon.status();
    wait_until(timeout, || {
        last = daemon.status();
        last.number(pointer) == Some(expected)
    });
    last
}

/// Returns true when `text` contains `number` as a whole run of digits.
fn contains_number(text: &str, number: u32) -> bool {
    let wanted = number.to_string();
    text.split(|c: char| !c.is_ascii_digit())
        .any(|run| run == wanted)
}

#[test]
fn renamed_archives_all_arrive() {
    let server = FaultServer::start();
    let daemon = start_daemon(&server, &[]);
    let files = archives("renamed", 20, 4096);

    drop_all(daemon.home(), &files);

    assert_all_delivered(&daemon, &server, &files, DELIVERY_TIMEOUT);
    let left = daemon.home().outbox_files();
    assert_eq!(left, Vec::<String>::new(), "files left in the outbox");
    assert_eq!(
        duplicates(&server, &files),
        vec![],
        "archives accepted more than once"
    );
    assert_no_mismatched_hash(&server);
    let status = wait_for_number(&daemon, "/queue/uploaded", 20, STATE_TIMEOUT);
    assert_eq!(
        status.number("/queue/uploaded"),
        Some(20),
        "queue.uploaded: {}",
        status.stdout
    );
    assert_eq!(
        status.number("/queue/pending"),
        Some(0),
        "queue.pending: {}",
        status.stdout
    );
    assert_eq!(
        status.number("/queue/rejected"),
        Some(0),
        "queue.rejected: {}",
        status.stdout
    );
    assert_eq!(status.code, Some(0), "status exit code: {}", status.stdout);
}

#[test]
fn existing_archives_sent_at_start() {
    let server = FaultServer::start();
    let home = Home::new();
    let files = archives("existing", 5, 2048);
    drop_all(&home, &files);

    let daemon = Daemon::start_in(home, &run_args(&server.url(), &[]));

    assert_all_delivered(&daemon, &server, &files, DELIVERY_TIMEOUT);
    assert_eq!(
        duplicates(&server, &files),
        vec![],
        "archives accepted more than once"
    );
}

#[test]
fn in_place_writer_sent_when_finished() {
    let server = FaultServer::start();
    let daemon = start_daemon(&server, &[]);
    let file = single("slow.zip", 64 * 1024);
    let half = file.bytes.len() / 2;
    let path = daemon.home().outbox.join(&file.name);

    let mut writer = File::create(&path).expect("creating slow.zip failed");
    writer
        .write_all(&file.bytes[..half])
        .expect("writing the first half failed");
    writer.sync_data().expect("syncing the first half failed");
    // The writer pauses with the file open, far longer than settle_ms, as a
    // producer that waits for more data would.
    thread::sleep(Duration::from_secs(3));

    assert_eq!(
        server.requests_for(&file.name).len(),
        0,
        "requests during the pause:\n{}",
        server.summary()
    );
    assert_eq!(
        daemon.home().rejected_files(),
        Vec::<String>::new(),
        "rejected during the pause"
    );
    assert!(
        daemon.home().outbox_files().contains(&file.name),
        "slow.zip moved during the pause, outbox: {:?}",
        daemon.home().outbox_files()
    );

    writer
        .write_all(&file.bytes[half..])
        .expect("writing the second half failed");
    drop(writer);

    assert_all_delivered(
        &daemon,
        &server,
        std::slice::from_ref(&file),
        DELIVERY_TIMEOUT,
    );
    let requests = server.requests_for(&file.name);
    assert_eq!(
        requests.len(),
        1,
        "requests for slow.zip:\n{}",
        server.summary()
    );
    let received = requests[0].file().map(|part| part.sha256.clone());
    assert_eq!(
        received,
        Some(file.sha256.clone()),
        "SHA-256 of the content received"
    );
    assert_eq!(
        daemon.home().rejected_files(),
        Vec::<String>::new(),
        "rejected files"
    );
    assert_no_mismatched_hash(&server);
}

#[test]
fn part_file_sent_once_after_rename() {
    let server = FaultServer::start();
    let daemon = start_daemon(&server, &[]);
    let file = single("late.zip", 8192);
    let part_name = "late.zip.part";

    daemon.home().write_in_place(part_name, &file.bytes);
    // A `.part` name does not match `include`. The daemon gets several
    // settle periods in which it could pick the file up by mistake.
    thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        server.request_count(),
        0,
        "requests before the rename:\n{}",
        server.summary()
    );
    assert!(
        daemon
            .home()
            .outbox_files()
            .contains(&part_name.to_string()),
        "late.zip.part moved before the rename, outbox: {:?}",
        daemon.home().outbox_files()
    );

    let outbox = &daemon.home().outbox;
    fs::rename(outbox.join(part_name), outbox.join(&file.name))
        .expect("renaming late.zip.part failed");

    assert_all_delivered(
        &daemon,
        &server,
        std::slice::from_ref(&file),
        DELIVERY_TIMEOUT,
    );
    assert_eq!(
        server.requests_for(&file.name).len(),
        1,
        "requests for late.zip:\n{}",
        server.summary()
    );
    assert_eq!(
        server.requests_for(part_name).len(),
        0,
        "requests for late.zip.part:\n{}",
        server.summary()
    );
    assert_eq!(
        daemon.home().rejected_files(),
        Vec::<String>::new(),
        "rejected files"
    );
}

#[test]
fn non_zip_file_rejected_with_reason() {
    let server = FaultServer::start();
    let daemon = start_daemon(&server, &[]);
    let text = b"id,started,ended\n1,09:00,09:30\n";

    daemon.home().drop_zip("notes.zip", text);

    let rejected = wait_until(STATE_TIMEOUT, || {
        daemon.home().rejected_reason("notes.zip").is_some()
    });
    assert!(
        rejected,
        "no rejected/notes.zip.reason; rejected/: {:?}",
        daemon.home().rejected_files()
    );
    let reason = daemon
        .home()
        .rejected_reason("notes.zip")
        .unwrap_or_default();
    assert!(!reason.trim().is_empty(), "empty reason: {reason:?}");
    assert_eq!(
        reason.trim_end().lines().count(),
        1,
        "reason is not one line: {reason:?}"
    );
    let kept = fs::read(daemon.home().outbox.join("rejected").join("notes.zip")).ok();
    assert_eq!(
        kept.as_deref(),
        Some(&text[..]),
        "content of rejected/notes.zip"
    );
    assert!(
        !daemon
            .home()
            .outbox_files()
            .contains(&"notes.zip".to_string()),
        "notes.zip still in the outbox: {:?}",
        daemon.home().outbox_files()
    );
    assert_eq!(
        server.request_count(),
        0,
        "requests for a non-zip file:\n{}",
        server.summary()
    );

    let status = wait_for_number(&daemon, "/queue/rejected", 1, STATE_TIMEOUT);
    assert_eq!(
        status.number("/queue/rejected"),
        Some(1),
        "queue.rejected: {}",
        status.stdout
    );
    assert_eq!(
        status.code,
        Some(2),
        "status exit code with a rejected file: {}",
        status.stdout
    );
}

#[test]
fn auth_hold_recovers_on_token_fix() {
    let right_token = "right-token-0b7e";
    let server = FaultServer::with_token(right_token);
    let home = Home::new();
    home.write_token("wrong-token-44d2");
    let probe_ms: u64 = 1000;
    let probe_arg = probe_ms.to_string();
    let concurrency_arg = CONCURRENCY.to_string();
    let args = run_args(
        &server.url(),
        &[
            "--auth-probe-ms",
            &probe_arg,
            "--concurrency",
            &concurrency_arg,
        ],
    );
    let daemon = Daemon::start_in(home, &args);
    let files = archives("auth", 3, 2048);

    drop_all(daemon.home(), &files);

    let status = wait_for_text(&daemon, "/auth/state", "token_rejected", STATE_TIMEOUT);
    assert_eq!(
        status.auth_state().as_deref(),
        Some("token_rejected"),
        "auth.state: {}",
        status.stdout
    );
    assert_eq!(
        status.code,
        Some(2),
        "status exit code during the hold: {}",
        status.stdout
    );

    // The hold lasts a few probe intervals before the operator fixes the token.
    thread::sleep(Duration::from_secs(3));

    let status = daemon.status();
    assert_eq!(
        status.auth_state().as_deref(),
        Some("token_rejected"),
        "auth.state late in the hold: {}",
        status.stdout
    );
    // A probe upload in flight counts as uploading, not pending.
    let waiting = status.number("/queue/pending").unwrap_or(0)
        + status.number("/queue/uploading").unwrap_or(0);
    assert_eq!(
        waiting, 3,
        "queue.pending + queue.uploading during the hold: {}",
        status.stdout
    );
    assert_eq!(
        status.number("/queue/rejected"),
        Some(0),
        "queue.rejected during the hold: {}",
        status.stdout
    );
    assert_eq!(
        outbox_archives(daemon.home()).len(),
        3,
        "archives in the outbox during the hold"
    );
    let rejected_401 = server.count_status(401);
    let first_401 = server
        .requests()
        .into_iter()
        .find(|request| request.status == Some(401))
        .map(|request| request.started_at)
        .expect("the server recorded no 401");
    let hold = first_401.elapsed();

    daemon.home().write_token(right_token);

    assert_all_delivered(&daemon, &server, &files, DELIVERY_TIMEOUT);
    // The first failure can hit every upload in flight. After that the
    // daemon sends at most one probe per interval.
    let allowed = CONCURRENCY + (hold.as_millis() as u64 / probe_ms) as usize + 1;
    assert!(
        rejected_401 <= allowed,
        "{rejected_401} requests got 401 in a hold of {hold:?} with {probe_ms} ms probes, allowed {allowed}:\n{}",
        server.summary()
    );
    assert_eq!(
        daemon.home().rejected_files(),
        Vec::<String>::new(),
        "rejected files after the hold"
    );
    let status = wait_for_text(&daemon, "/auth/state", "ok", STATE_TIMEOUT);
    assert_eq!(
        status.auth_state().as_deref(),
        Some("ok"),
        "auth.state after the fix: {}",
        status.stdout
    );
    assert_eq!(
        status.code,
        Some(0),
        "status exit code after the fix: {}",
        status.stdout
    );
}

#[test]
fn forbidden_holds_until_server_fixed() {
    let server = FaultServer::start();
    server.set_default(Reply::status(403));
    let daemon = start_daemon(&server, &["--auth-probe-ms", "1000"]);
    let files = archives("forbidden", 2, 2048);

    drop_all(daemon.home(), &files);

    let status = wait_for_text(&daemon, "/auth/state", "forbidden", STATE_TIMEOUT);
    assert_eq!(
        status.auth_state().as_deref(),
        Some("forbidden"),
        "auth.state: {}",
        status.stdout
    );
    assert_eq!(
        status.code,
        Some(2),
        "status exit code during the hold: {}",
        status.stdout
    );
    let detail = status.text("/auth/detail").unwrap_or_default();
    assert!(
        !detail.is_empty(),
        "auth.detail is empty during the hold: {}",
        status.stdout
    );
    assert_eq!(
        status.number("/queue/rejected"),
        Some(0),
        "queue.rejected during the hold: {}",
        status.stdout
    );
    assert_eq!(
        outbox_archives(daemon.home()).len(),
        2,
        "archives in the outbox during the hold"
    );

    server.set_default(Reply::created());

    assert_all_delivered(&daemon, &server, &files, DELIVERY_TIMEOUT);
    assert_eq!(
        daemon.home().rejected_files(),
        Vec::<String>::new(),
        "rejected files after the hold"
    );
    let status = wait_for_text(&daemon, "/auth/state", "ok", STATE_TIMEOUT);
    assert_eq!(
        status.auth_state().as_deref(),
        Some("ok"),
        "auth.state after the fix: {}",
        status.stdout
    );
}

#[test]
fn server_errors_retried_until_success() {
    let server = FaultServer::start();
    let files = archives("flaky", 3, 2048);
    for file in &files {
        server.push_for_file(&file.name, vec![Reply::status(500); 3]);
    }
    let daemon = start_daemon(&server, &[]);

    drop_all(daemon.home(), &files);

    assert_all_delivered(&daemon, &server, &files, DELIVERY_TIMEOUT);
    for file in &files {
        let statuses: Vec<Option<u16>> = server
            .requests_for(&file.name)
            .iter()
            .map(|r| r.status)
            .collect();
        assert_eq!(
            statuses,
            vec![Some(500), Some(500), Some(500), Some(201)],
            "statuses for {}",
            file.name
        );
    }
    assert_eq!(
        duplicates(&server, &files),
        vec![],
        "archives accepted more than once"
    );
    assert_eq!(
        daemon.home().rejected_files(),
        Vec::<String>::new(),
        "rejected files"
    );
}

#[test]
fn failing_item_does_not_block_others() {
    let server = FaultServer::start();
    let stuck = single("stuck.zip", 2048);
    server.push_for_file(&stuck.name, vec![Reply::status(502); 10_000]);
    let daemon = start_daemon(&server, &[]);
    let files = archives("flowing", 6, 2048);

    daemon.home().drop_zip(&stuck.name, &stuck.bytes);
    drop_all(daemon.home(), &files);

    assert_all_delivered(&daemon, &server, &files, DELIVERY_TIMEOUT);
    assert_eq!(
        server.delivered(&stuck.sha256),
        0,
        "deliveries of stuck.zip"
    );
    assert_eq!(
        outbox_archives(daemon.home()),
        vec![stuck.name.clone()],
        "archives left in the outbox"
    );
    assert_eq!(
        daemon.home().rejected_files(),
        Vec::<String>::new(),
        "rejected files"
    );
}

#[test]
fn connection_reset_mid_body_retried() {
    let server = FaultServer::start();
    let file = single("reset.zip", 1 << 20);
    server.push_for_file(&file.name, [Reply::close_mid_body()]);
    let daemon = start_daemon(&server, &[]);

    daemon.home().drop_zip(&file.name, &file.bytes);

    assert_all_delivered(
        &daemon,
        &server,
        std::slice::from_ref(&file),
        DELIVERY_TIMEOUT,
    );
    assert_eq!(
        server.delivered(&file.sha256),
        1,
        "deliveries of reset.zip:\n{}",
        server.summary()
    );
    assert_eq!(
        daemon.home().rejected_files(),
        Vec::<String>::new(),
        "rejected files"
    );
}

#[test]
fn retry_after_pauses_destination() {
    let server = FaultServer::start();
    server.push_next(Reply::retry_after(503, "3"));
    let daemon = start_daemon(&server, &[]);
    let first = single("first.zip", 2048);
    let second = single("second.zip", 2048);

    daemon.home().drop_zip(&first.name, &first.bytes);

    let throttled = wait_until(STATE_TIMEOUT, || server.count_status(503) == 1);
    assert!(
        throttled,
        "no 503 within {STATE_TIMEOUT:?}:\n{}",
        server.summary()
    );
    let throttled_at = server
        .requests()
        .into_iter()
        .find(|request| request.status == Some(503))
        .map(|request| request.finished_at)
        .expect("the 503 request is recorded");
    let status = wait_for_text(
        &daemon,
        "/destination/state",
        "throttled",
        Duration::from_secs(2),
    );
    assert_eq!(
        status.destination_state().as_deref(),
        Some("throttled"),
        "destination.state: {}",
        status.stdout
    );
    let next_attempt = status.text("/destination/next_attempt_at");
    assert!(
        next_attempt.is_some(),
        "destination.next_attempt_at while throttled: {}",
        status.stdout
    );

    // An archive that arrives during the pause waits for it too.
    daemon.home().drop_zip(&second.name, &second.bytes);

    let both = [first, second];
    assert_all_delivered(&daemon, &server, &both, DELIVERY_TIMEOUT);
    // Retry-After counts from the response; 100 ms allows for rounding.
    let pause = Duration::from_millis(2900);
    for request in server
        .requests()
        .iter()
        .filter(|r| r.started_at > throttled_at)
    {
        let gap = request.started_at - throttled_at;
        assert!(
            gap >= pause,
            "request {gap:?} after the 503 with Retry-After: 3: {request}"
        );
    }
}

#[test]
fn outage_does_not_charge_attempts() {
    let mut server = FaultServer::start();
    server.stop();
    // NOTE: another process could take the free port during the outage. The
    // restart below then fails with a bind error rather than a wrong result.
    let daemon = start_daemon(&server, &[]);
    let files = archives("outage", 4, 2048);

    drop_all(daemon.home(), &files);

    let status = wait_for_text(&daemon, "/destination/state", "unreachable", STATE_TIMEOUT);
    assert_eq!(
        status.destination_state().as_deref(),
        Some("unreachable"),
        "destination.state: {}",
        status.stdout
    );
    assert_eq!(
        status.code,
        Some(0),
        "status exit code for a short outage: {}",
        status.stdout
    );
    // Several destination retries at the 500 ms cap happen in this time.
    thread::sleep(Duration::from_secs(2));
    let status = daemon.status();
    assert_eq!(
        status.destination_state().as_deref(),
        Some("unreachable"),
        "destination.state later: {}",
        status.stdout
    );
    let items = daemon
        .home()
        .list_items()
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(
        items.len(),
        files.len(),
        "items listed during the outage: {items:?}"
    );
    for item in &items {
        let attempts = item.get("attempts").and_then(|value| value.as_u64());
        assert_eq!(
            attempts,
            Some(0),
            "attempts charged during the outage: {item}"
        );
    }

    server.restart();

    assert_all_delivered(&daemon, &server, &files, DELIVERY_TIMEOUT);
    assert_eq!(
        duplicates(&server, &files),
        vec![],
        "archives accepted more than once"
    );
    let status = wait_for_text(&daemon, "/destination/state", "ok", STATE_TIMEOUT);
    assert_eq!(
        status.destination_state().as_deref(),
        Some("ok"),
        "destination.state after: {}",
        status.stdout
    );
}

#[test]
fn bad_request_rejects_only_that_file() {
    let server = FaultServer::start();
    let bad = single("bad.zip", 2048);
    server.push_for_file(
        &bad.name,
        [Reply::status(400).with_body("invalid manifest in archive")],
    );
    let daemon = start_daemon(&server, &[]);
    let good = archives("good", 2, 2048);

    daemon.home().drop_zip(&bad.name, &bad.bytes);
    drop_all(daemon.home(), &good);

    assert_all_delivered(&daemon, &server, &good, DELIVERY_TIMEOUT);
    let rejected = wait_until(STATE_TIMEOUT, || {
        daemon.home().rejected_reason(&bad.name).is_some()
    });
    assert!(
        rejected,
        "no rejected/bad.zip.reason; rejected/: {:?}",
        daemon.home().rejected_files()
    );
    let reason = daemon.home().rejected_reason(&bad.name).unwrap_or_default();
    assert!(
        reason.contains("400"),
        "reason without the status: {reason:?}"
    );
    assert!(
        reason.contains("invalid manifest"),
        "reason without the response body: {reason:?}"
    );
    let kept = fs::read(daemon.home().outbox.join("rejected").join(&bad.name)).ok();
    assert!(
        kept.as_deref() == Some(&bad.bytes[..]),
        "rejected/bad.zip differs from the original"
    );
    assert_eq!(
        server.requests_for(&bad.name).len(),
        1,
        "requests for bad.zip:\n{}",
        server.summary()
    );

    let status = wait_for_number(&daemon, "/queue/rejected", 1, STATE_TIMEOUT);
    assert_eq!(
        status.number("/queue/rejected"),
        Some(1),
        "queue.rejected: {}",
        status.stdout
    );
    assert_eq!(
        status.code,
        Some(2),
        "status exit code with a rejected file: {}",
        status.stdout
    );
}

#[test]
fn redirect_holds_with_config_error() {
    let other = FaultServer::start();
    let server = FaultServer::start();
    server.set_default(Reply::redirect(&other.url()));
    let daemon = start_daemon(&server, &[]);
    let file = single("moved.zip", 2048);

    daemon.home().drop_zip(&file.name, &file.bytes);

    let status = wait_for_text(&daemon, "/auth/state", "config_error", STATE_TIMEOUT);
    assert_eq!(
        status.auth_state().as_deref(),
        Some("config_error"),
        "auth.state: {}",
        status.stdout
    );
    assert_eq!(
        status.code,
        Some(2),
        "status exit code during the hold: {}",
        status.stdout
    );
    let detail = status.text("/auth/detail").unwrap_or_default();
    assert!(
        detail.contains("server_url"),
        "auth.detail does not name server_url: {detail:?}"
    );

    // A redirect followed late would reach the other server in this time.
    thread::sleep(Duration::from_secs(1));
    assert_eq!(
        other.request_count(),
        0,
        "requests at the redirect target:\n{}",
        other.summary()
    );
    let with_token = other
        .requests()
        .iter()
        .filter(|request| {
            request
                .authorization
                .as_deref()
                .is_some_and(|value| value.contains(TOKEN))
        })
        .count();
    assert_eq!(
        with_token, 0,
        "requests with the token at the redirect target"
    );
    assert_eq!(
        server.request_count(),
        1,
        "requests during the hold:\n{}",
        server.summary()
    );
    assert_eq!(
        outbox_archives(daemon.home()),
        vec![file.name.clone()],
        "archives in the outbox"
    );
    assert_eq!(
        daemon.home().rejected_files(),
        Vec::<String>::new(),
        "rejected files"
    );
}

#[test]
fn kill9_restart_delivers_all() {
    let server = FaultServer::start();
    // Each response waits, so that uploads are in flight when the kill comes.
    server.set_default(Reply::created().with_delay(Duration::from_millis(300)));
    let concurrency_arg = CONCURRENCY.to_string();
    let mut daemon = start_daemon(&server, &["--concurrency", &concurrency_arg]);
    let files = archives("crash", 12, 16 * 1024);
    let kills = 2;

    drop_all(daemon.home(), &files);

    for kill in 1..=kills {
        let accepted_before: usize = server.deliveries().values().sum();
        let busy = wait_until(DELIVERY_TIMEOUT, || {
            let accepted: usize = server.deliveries().values().sum();
            accepted >= accepted_before + 2 && server.in_flight() >= 1
        });
        assert!(
            busy,
            "no uploads in flight before kill {kill}:\n{}",
            server.summary()
        );
        daemon.kill9();
        daemon.restart();
    }

    assert_all_delivered(&daemon, &server, &files, DELIVERY_TIMEOUT);
    let duplicated = duplicates(&server, &files);
    let extra: usize = duplicated.iter().map(|(_, count)| count - 1).sum();
    assert!(
        extra <= CONCURRENCY * kills,
        "{extra} duplicate uploads after {kills} kills with concurrency {CONCURRENCY}: {duplicated:?}"
    );
    assert_no_mismatched_hash(&server);
    let keys_match = server
        .requests()
        .iter()
        .filter_map(|request| {
            Some((
                request.idempotency_key.clone()?,
                request.file()?.sha256.clone(),
            ))
        })
        .all(|(key, sha)| key == sha);
    assert!(
        keys_match,
        "an Idempotency-Key differs from its file's SHA-256:\n{}",
        server.summary()
    );
}

#[test]
fn second_daemon_exits_naming_first() {
    let server = FaultServer::start();
    let daemon = start_daemon(&server, &[]);

    let mut second = daemon.spawn_second();
    let exit = second.wait_exit(Duration::from_secs(5));

    let stderr = second.stderr();
    assert_eq!(
        exit.and_then(|status| status.code()),
        Some(1),
        "second daemon exit: {exit:?}, stderr:\n{stderr}"
    );
    let state_dir = daemon.home().state_dir.display().to_string();
    assert!(
        stderr.contains(&state_dir),
        "stderr does not name the state dir {state_dir}:\n{stderr}"
    );
    assert!(
        contains_number(&stderr, daemon.pid()),
        "stderr does not name the first daemon's pid {}:\n{stderr}",
        daemon.pid()
    );
    let status = daemon.status();
    assert_eq!(
        status.number("/daemon/pid"),
        Some(daemon.pid() as i64),
        "daemon.pid after: {}",
        status.stdout
    );
    assert_eq!(
        status.flag("/daemon/running"),
        Some(true),
        "daemon.running after: {}",
        status.stdout
    );
}

#[test]
fn missing_token_file_holds_until_created() {
    let server = FaultServer::with_token(TOKEN);
    let home = Home::without_token();
    // The probe interval is far longer than the test, so only the token file
    // watch can end the hold in time.
    let daemon = Daemon::start_in(
        home,
        &run_args(&server.url(), &["--auth-probe-ms", "600000"]),
    );
    let files = archives("tokenless", 2, 2048);

    drop_all(daemon.home(), &files);

    let status = wait_for_text(&daemon, "/auth/state", "token_missing", STATE_TIMEOUT);
    assert_eq!(
        status.auth_state().as_deref(),
        Some("token_missing"),
        "auth.state: {}",
        status.stdout
    );
    assert_eq!(
        status.code,
        Some(2),
        "status exit code during the hold: {}",
        status.stdout
    );
    let token_path = daemon.home().token_file.display().to_string();
    let detail = status.text("/auth/detail").unwrap_or_default();
    assert!(
        detail.contains(&token_path),
        "auth.detail does not name {token_path}: {detail:?}"
    );
    assert_eq!(
        server.request_count(),
        0,
        "requests without a token:\n{}",
        server.summary()
    );

    let created_at = Instant::now();
    daemon.home().write_token(TOKEN);

    assert_all_delivered(&daemon, &server, &files, DELIVERY_TIMEOUT);
    let first_request = server
        .requests()
        .first()
        .map(|request| request.started_at - created_at);
    assert!(
        first_request.is_some_and(|delay| delay < Duration::from_secs(5)),
        "first request {first_request:?} after the token file appeared"
    );
    assert_eq!(
        server.count_status(401),
        0,
        "requests that got 401:\n{}",
        server.summary()
    );
}

#[test]
fn upload_request_matches_contract() {
    let server = FaultServer::start();
    let daemon = Daemon::start(&run_args(&server.url_with_path("/api/v1/sessions"), &[]));
    let file = single("session-42.zip", 10_000);

    daemon.home().drop_zip(&file.name, &file.bytes);

    assert_all_delivered(
        &daemon,
        &server,
        std::slice::from_ref(&file),
        DELIVERY_TIMEOUT,
    );
    let requests = server.requests();
    assert_eq!(requests.len(), 1, "requests:\n{}", server.summary());
    let request = &requests[0];
    let bearer = format!("Bearer {TOKEN}");
    let user_agent = format!("outboxd/{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(request.method, "POST", "method");
    assert_eq!(request.path, "/api/v1/sessions", "path");
    assert_eq!(
        request.authorization.as_deref(),
        Some(bearer.as_str()),
        "Authorization"
    );
    assert_eq!(
        request.idempotency_key.as_deref(),
        Some(file.sha256.as_str()),
        "Idempotency-Key"
    );
    assert_eq!(
        request.user_agent.as_deref(),
        Some(user_agent.as_str()),
        "User-Agent"
    );
    let content_type = request.content_type.clone().unwrap_or_default();
    assert!(
        content_type.starts_with("multipart/form-data"),
        "Content-Type: {content_type:?}"
    );
    assert!(
        request.content_length.is_some(),
        "no Content-Length; headers: {:?}",
        request.headers
    );
    assert!(request.body_complete, "body incomplete: {request}");

    let field_names: Vec<&str> = request.fields.keys().map(String::as_str).collect();
    assert_eq!(field_names, ["session_id", "sha256", "size"], "text fields");
    let fields: HashMap<&str, &str> = request
        .fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        fields.get("session_id"),
        Some(&"session-42"),
        "session_id field"
    );
    assert_eq!(
        fields.get("sha256"),
        Some(&file.sha256.as_str()),
        "sha256 field"
    );
    let size = file.bytes.len().to_string();
    assert_eq!(fields.get("size"), Some(&size.as_str()), "size field");

    assert_eq!(request.files.len(), 1, "file parts: {:?}", request.files);
    let part = &request.files[0];
    assert_eq!(part.field_name, "file", "file part name");
    assert_eq!(part.file_name, "session-42.zip", "file part file name");
    assert_eq!(
        part.content_type.as_deref(),
        Some("application/zip"),
        "file part Content-Type"
    );
    assert_eq!(part.sha256, file.sha256, "file part SHA-256");
    assert_eq!(part.size, file.bytes.len() as u64, "file part size");

    let status = wait_for_number(&daemon, "/queue/uploaded", 1, STATE_TIMEOUT);
    assert_eq!(
        status.number("/queue/uploaded"),
        Some(1),
        "queue.uploaded: {}",
        status.stdout
    );
    assert!(
        status.text("/last_success_at").is_some(),
        "last_success_at: {}",
        status.stdout
    );
}

#[test]
fn sigterm_exits_zero_keeping_upload() {
    let server = FaultServer::start();
    // The response comes long after the shutdown grace, so the upload is
    // still in flight when the grace ends.
    server.set_default(Reply::created().with_delay(Duration::from_secs(10)));
    let mut daemon = start_daemon(&server, &["--shutdown-grace-ms", "500"]);
    let file = single("long.zip", 4096);

    daemon.home().drop_zip(&file.name, &file.bytes);
    let busy = wait_until(STATE_TIMEOUT, || server.in_flight() >= 1);
    assert!(busy, "no upload in flight:\n{}", server.summary());
    daemon.sigterm();
    let exit = daemon.wait_exit(Duration::from_secs(5));

    assert_eq!(
        exit.and_then(|status| status.code()),
        Some(0),
        "exit after SIGTERM: {exit:?}"
    );
    assert_eq!(
        outbox_archives(daemon.home()),
        vec![file.name.clone()],
        "archives in the outbox after SIGTERM"
    );
    let status = daemon.status();
    assert_eq!(
        status.code,
        Some(3),
        "status exit code with no daemon: {}",
        status.stdout
    );
    assert_eq!(
        status.flag("/daemon/running"),
        Some(false),
        "daemon.running with no daemon: {}",
        status.stdout
    );
    assert_eq!(
        status.auth_state().as_deref(),
        Some("unknown"),
        "auth.state with no daemon: {}",
        status.stdout
    );

    server.set_default(Reply::created());
    daemon.restart();

    let emptied = wait_until(DELIVERY_TIMEOUT, || {
        outbox_archives(daemon.home()).is_empty()
    });
    assert!(
        emptied,
        "archives left after the restart: {:?}",
        outbox_archives(daemon.home())
    );
    let statuses: Vec<Option<u16>> = server
        .requests_for(&file.name)
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(
        statuses,
        vec![Some(201), Some(201)],
        "statuses for long.zip before and after the restart"
    );
}

#[test]
fn second_daemon_on_same_outbox_exits() {
    let server = FaultServer::start();
    let daemon = start_daemon(&server, &[]);
    let home = daemon.home();
    let other_state = home.path.join("other-state");

    // Another state dir, the same outbox: without a lock on the outbox both
    // daemons would upload every file.
    let output = home
        .command("run")
        .arg("--outbox")
        .arg(&home.outbox)
        .arg("--state-dir")
        .arg(&other_state)
        .arg("--token-file")
        .arg(&home.token_file)
        .arg("--server-url")
        .arg(server.url())
        .output()
        .expect("running a second daemon");

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "second daemon stderr:\n{stderr}"
    );
    let outbox = home.outbox.display().to_string();
    assert!(
        stderr.contains(&outbox),
        "stderr does not name the outbox {outbox}:\n{stderr}"
    );
    assert!(
        contains_number(&stderr, daemon.pid()),
        "stderr does not name the first daemon's pid {}:\n{stderr}",
        daemon.pid()
    );
    let leftover: Vec<String> = home.outbox_files();
    assert!(
        leftover.is_empty(),
        "the lock left files in the outbox: {leftover:?}"
    );
}

#[test]
fn deleted_outbox_is_watched_again() {
    let server = FaultServer::start();
    // An hour between rescans, so that only the watcher can find the file.
    let daemon = start_daemon(&server, &["--rescan-ms", "3600000"]);
    let outbox = daemon.home().outbox.clone();

    fs::remove_dir_all(&outbox).expect("deleting the outbox");

    let recreated = wait_until(Duration::from_secs(5), || outbox.is_dir());
    assert!(
        recreated,
        "the outbox {} was not created again",
        outbox.display()
    );
    let files = archives("after-delete", 2, 1024);
    drop_all(daemon.home(), &files);
    assert_all_delivered(&daemon, &server, &files, Duration::from_secs(10));
}
