//! Security tests of intake and upload against hostile entries in the outbox,
//! with the real daemon binary. The entries are symbolic links to secrets
//! elsewhere, a file swapped for such a link after it was queued, hard links to
//! another user's files, and file names with line breaks, quotes, control
//! characters or bytes that are not UTF-8.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::thread;
use std::time::Duration;

use common::fault_server::FaultServer;
use common::{archive, run_args, sha256_hex, wait_until, Daemon, Home};

/// Time for the daemon to reach a state that it should enter at once.
const STATE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time for an archive to reach the server once nothing blocks it.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);

/// Rescan interval of these tests, so that several rescans happen while a
/// test waits and a repeated log line would show.
const RESCAN_MS: &str = "200";

/// Waits that cover several rescans.
const SEVERAL_RESCANS: Duration = Duration::from_millis(1200);

fn start(server: &FaultServer) -> Daemon {
    Daemon::start(&run_args(&server.url(), &["--rescan-ms", RESCAN_MS]))
}

/// Drops an archive named `name` and waits until the server accepted it, which
/// shows that the daemon was uploading while a test looked for a request that
/// must not come.
fn deliver_marker(daemon: &Daemon, server: &FaultServer, name: &str) {
    let bytes = archive(name, 512);
    let sha256 = sha256_hex(&bytes);
    daemon.home().drop_zip(name, &bytes);
    assert!(
        wait_until(DELIVERY_TIMEOUT, || server.delivered(&sha256) == 1),
        "{name} was not delivered:\n{}",
        server.summary()
    );
}

/// Counts the requests that carried a file part with this SHA-256, whole or not.
fn requests_with_content(server: &FaultServer, sha256: &str) -> usize {
    server
        .requests()
        .iter()
        .filter(|request| request.files.iter().any(|part| part.sha256 == sha256))
        .count()
}

/// Counts the daemon's "left in place" log lines that name `file`.
fn left_in_place_lines(daemon: &Daemon, file: &str) -> usize {
    let field = format!("file={file}");
    daemon
        .stderr()
        .lines()
        .filter(|line| line.contains("left in place") && line.contains(&field))
        .count()
}

/// Writes a secret archive outside the outbox and returns its bytes.
fn write_secret(home: &Home, name: &str) -> Vec<u8> {
    let secret = archive(&format!("secret outside the outbox: {name}"), 4096);
    fs::write(home.path.join(name), &secret).expect("writing the secret failed");
    secret
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn symlink_to_secret_never_read() {
    let server = FaultServer::start();
    let daemon = start(&server);
    let home = daemon.home();
    let secret = write_secret(home, "secret.zip");
    let secret_path = home.path.join("secret.zip");
    let link = home.outbox.join("x.zip");
    std::os::unix::fs::symlink(&secret_path, &link).expect("creating the symlink failed");

    assert!(
        wait_until(STATE_TIMEOUT, || left_in_place_lines(&daemon, "x.zip") > 0),
        "the symlink was not reported as left in place"
    );
    deliver_marker(&daemon, &server, "after.zip");
    thread::sleep(SEVERAL_RESCANS);

    assert_eq!(
        requests_with_content(&server, &sha256_hex(&secret)),
        0,
        "requests with the secret:\n{}",
        server.summary()
    );
    let metadata = fs::symlink_metadata(&link).expect("the symlink is gone");
    assert!(
        metadata.file_type().is_symlink(),
        "x.zip is no longer a symlink"
    );
    assert_eq!(
        fs::read_link(&link).expect("reading the symlink failed"),
        secret_path,
        "the symlink's target"
    );
    assert_eq!(
        fs::read(&secret_path).expect("the secret is gone"),
        secret,
        "the secret's content"
    );
    assert_eq!(
        left_in_place_lines(&daemon, "x.zip"),
        1,
        "log lines about the symlink after several rescans"
    );
}

#[test]
fn file_swapped_for_symlink_not_sent() {
    let mut server = FaultServer::start();
    server.stop();
    let daemon = start(&server);
    let home = daemon.home();
    let secret = write_secret(home, "secret.zip");
    let secret_path = home.path.join("secret.zip");
    let original = archive("original", 2048);
    home.drop_zip("x.zip", &original);
    // The server is down, so the item stays queued with its hash recorded.
    assert!(
        wait_until(STATE_TIMEOUT, || home
            .list_items()
            .unwrap_or_default()
            .iter()
            .any(|item| item.to_string().contains("x.zip"))),
        "x.zip was not queued"
    );

    // Between the check at intake and the open for upload, the file becomes
    // a link to the secret.
    let temp_link = home.outbox.join(".x.zip.link");
    std::os::unix::fs::symlink(&secret_path, &temp_link).expect("creating the symlink failed");
    fs::rename(&temp_link, home.outbox.join("x.zip")).expect("swapping in the symlink failed");
    server.restart();

    assert!(
        wait_until(DELIVERY_TIMEOUT, || daemon
            .stderr()
            .contains("the file was replaced by a symbolic link")),
        "the upload did not report the swapped file"
    );
    deliver_marker(&daemon, &server, "after.zip");
    thread::sleep(SEVERAL_RESCANS);

    assert_eq!(
        requests_with_content(&server, &sha256_hex(&secret)),
        0,
        "requests with the secret:\n{}",
        server.summary()
    );
    let link = home.outbox.join("x.zip");
    assert!(
        fs::symlink_metadata(&link)
            .expect("the symlink is gone")
            .file_type()
            .is_symlink(),
        "x.zip is no longer a symlink"
    );
    assert_eq!(
        fs::read(&secret_path).expect("the secret is gone"),
        secret,
        "the secret's content"
    );
    let items = home.list_items().expect("outboxd list failed");
    assert!(
        !items.iter().any(|item| item.to_string().contains("x.zip")),
        "x.zip is still queued: {items:?}"
    );
}

#[test]
fn foreign_hard_link_left_in_place() {
    if !is_root() {
        eprintln!("skipped: a file of another user can only be made as root");
        return;
    }
    let server = FaultServer::start();
    let daemon = start(&server);
    let home = daemon.home();
    let secret = write_secret(home, "secret.zip");
    let secret_path = home.path.join("secret.zip");
    std::os::unix::fs::chown(&secret_path, Some(65534), Some(65534)).expect("chown failed");
    let own = archive("own file linked in", 1024);
    fs::write(home.path.join("own.zip"), &own).expect("writing the own file failed");

    let linked = home.outbox.join("linked.zip");
    fs::hard_link(&secret_path, &linked).expect("linking the secret failed");
    fs::hard_link(home.path.join("own.zip"), home.outbox.join("own-link.zip"))
        .expect("linking the own file failed");

    // A hard link to a file of the daemon's own user is uploaded as usual.
    assert!(
        wait_until(DELIVERY_TIMEOUT, || server.delivered(&sha256_hex(&own))
            == 1),
        "own-link.zip was not delivered:\n{}",
        server.summary()
    );
    assert!(
        wait_until(STATE_TIMEOUT, || left_in_place_lines(&daemon, "linked.zip")
            > 0),
        "the foreign hard link was not reported"
    );
    thread::sleep(SEVERAL_RESCANS);

    assert_eq!(
        requests_with_content(&server, &sha256_hex(&secret)),
        0,
        "requests with the secret:\n{}",
        server.summary()
    );
    let lines: Vec<String> = daemon
        .stderr()
        .lines()
        .filter(|line| line.contains("left in place") && line.contains("file=linked.zip"))
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 1, "log lines about the hard link: {lines:?}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains("uid 65534"),
        "the log line does not warn about the other user: {:?}",
        lines[0]
    );
    let linked_metadata = fs::metadata(&linked).expect("the hard link is gone");
    let secret_metadata = fs::metadata(&secret_path).expect("the secret is gone");
    assert_eq!(
        linked_metadata.ino(),
        secret_metadata.ino(),
        "linked.zip is no longer the secret's inode"
    );
    assert_eq!(secret_metadata.nlink(), 2, "links of the secret");
    assert_eq!(
        fs::read(&secret_path).expect("reading the secret failed"),
        secret,
        "the secret's content"
    );
}

/// File names that a careless or hostile producer may use. Each must be
/// uploaded with its exact stem as the session id.
const UNUSUAL_NAMES: &[&str] = &[
    "line\nbreak.zip",
    "carriage\r\nreturn.zip",
    "tab\tbell\u{7}escape\u{1b}[31m.zip",
    "double\"single'quotes.zip",
    "dot..dot.zip",
    "back\\slash.zip",
    "semi;colon=equals.zip",
    "percent%2F..%2Fslash.zip",
    "ünïcödé €.zip",
];

#[test]
fn unusual_names_sent_safely() {
    let server = FaultServer::start();
    let daemon = start(&server);
    let home = daemon.home();
    // A broken archive whose name would forge a log line if written raw.
    let broken = "broken\nforged line.zip";
    home.drop_zip(broken, b"not a zip archive");
    let mut expected = Vec::new();
    for name in UNUSUAL_NAMES {
        let bytes = archive(name, 1024);
        home.drop_zip(name, &bytes);
        expected.push((*name, sha256_hex(&bytes)));
    }

    for (name, sha256) in &expected {
        assert!(
            wait_until(DELIVERY_TIMEOUT, || server.delivered(sha256) == 1),
            "{name:?} was not delivered:\n{}",
            server.summary()
        );
    }
    for (name, sha256) in &expected {
        let request = server
            .requests()
            .into_iter()
            .find(|request| request.is_accepted() && request.file().unwrap().sha256 == *sha256)
            .expect("the accepted request is recorded");
        let sent_name = request.file_name().unwrap_or_default().to_string();
        assert_eq!(
            sent_name,
            outboxd::upload::safe_file_name(name),
            "multipart file name of {name:?}"
        );
        assert!(
            sent_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c)),
            "unsafe multipart file name {sent_name:?} for {name:?}"
        );
        assert_eq!(
            request.fields.get("session_id").map(String::as_str),
            name.strip_suffix(".zip"),
            "session_id of {name:?}"
        );
    }
    assert_eq!(
        daemon.status().flag("/daemon/running"),
        Some(true),
        "the daemon stopped"
    );
    assert!(
        wait_until(STATE_TIMEOUT, || home.rejected_reason(broken).is_some()),
        "{broken:?} was not rejected"
    );
    assert_eq!(home.outbox_files(), Vec::<String>::new(), "files left");

    let log = daemon.stderr();
    let forged: Vec<&str> = log
        .lines()
        .filter(|line| line.starts_with("forged line.zip") || line.starts_with("break.zip}"))
        .collect();
    assert_eq!(
        forged,
        Vec::<&str>::new(),
        "log lines that a file name began"
    );
    assert!(
        log.lines().any(|line| line.contains("rejected a file")
            && line.contains("file=broken\\nforged line.zip")),
        "no rejection line with the escaped name"
    );
}

#[test]
fn non_utf8_name_rejected() {
    let server = FaultServer::start();
    let daemon = start(&server);
    let home = daemon.home();
    let name = OsStr::from_bytes(b"latin1-\xe9t\xe9.zip");
    let bytes = archive("not utf-8", 1024);
    fs::write(home.outbox.join(name), &bytes).expect("writing the archive failed");

    let rejected = home.outbox.join("rejected");
    let mut reason_name = name.to_os_string();
    reason_name.push(".reason");
    let reason_path = rejected.join(&reason_name);
    assert!(
        wait_until(STATE_TIMEOUT, || reason_path.exists()),
        "no reason file in {}",
        rejected.display()
    );
    let reason = fs::read_to_string(&reason_path).expect("reading the reason failed");
    assert!(
        reason.contains("not valid UTF-8") && reason.contains("rename"),
        "the reason does not ask to rename the file: {reason:?}"
    );
    assert_eq!(
        fs::read(rejected.join(name)).expect("the rejected file is missing"),
        bytes,
        "content of the rejected file"
    );
    assert!(
        !home.outbox.join(name).exists(),
        "the file is still in the outbox"
    );
    deliver_marker(&daemon, &server, "after.zip");
    assert_eq!(
        requests_with_content(&server, &sha256_hex(&bytes)),
        0,
        "requests with the file:\n{}",
        server.summary()
    );
}
