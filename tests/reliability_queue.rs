//! Property test of the queue's state machine together with the rule that
//! decides when a file leaves the outbox, on real files and a real sled
//! database, without the HTTP side.
//!
//! A harness plays the daemon's part: intake discovers files, uploads start,
//! succeed or fail in each outcome class, and the process crashes (the queue
//! is dropped without a flush) or restarts. A producer writes, rewrites and
//! deletes files in between. After every step the harness checks:
//!
//! - a file leaves the outbox only after the server accepted exactly the
//!   content it had then (or it was rejected into `rejected/`);
//! - after a restart no item is `uploading`, every file in the outbox has a
//!   pending record that matches it, and every pending record has its file;
//! - the in-memory index agrees with the records.
//!
//! At the end, the queue is drained and the outbox must end empty.

mod common;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use common::{archive, sha256_hex};
use outboxd::config::{RawSettings, Settings};
use outboxd::daemon::{finish_interrupted, finish_uploaded};
use outboxd::queue::{FileFacts, Queue};
use outboxd::store::{ItemState, Store};
use outboxd::timefmt::now_ms;
use proptest::prelude::*;
use tempfile::TempDir;

/// File names the producer uses; few, so that names are reused often.
const NAMES: [&str; 2] = ["a.zip", "b.zip"];

/// The daemon's maximum retry interval, which bounds stored attempt times.
const MAX_DELAY: Duration = Duration::from_secs(300);

/// Upper bound of drain rounds at the end of a case.
const DRAIN_ROUNDS: usize = 50;

#[derive(Debug, Clone, Copy)]
enum Failure {
    /// 5xx: the item backs off and is charged an attempt.
    Transient,
    /// No connection: the item waits without an attempt.
    Unreachable,
    /// 401, 403, a wrong URL: the item waits without an attempt.
    Hold,
    /// Another 4xx: the file moves to `rejected/`.
    Rejected,
}

#[derive(Debug, Clone)]
enum Step {
    /// The producer renames a new version of the file into the outbox.
    Write(usize),
    /// The producer rewrites the file in place (same inode).
    Overwrite(usize),
    /// The producer deletes the file.
    Delete(usize),
    /// The producer writes a new version of the file of an upload in flight
    /// (picked by index), in place or by a rename.
    WriteDuringUpload { slot: usize, in_place: bool },
    /// Intake examines the file and queues it unless a record matches it.
    Discover(usize),
    /// The dispatcher takes the next due item; a probe ignores backoff.
    Start { probe: bool },
    /// The server accepts the body of an upload in flight (picked by
    /// index); the daemon has not handled the response yet.
    Accept(usize),
    /// The daemon handles a 2xx: marks the item uploaded, flushes, and
    /// deletes the file. An upload not accepted yet is accepted first.
    Succeed(usize),
    /// An upload not accepted yet fails.
    Fail(usize, Failure),
    /// The server accepts, the daemon marks and flushes, and dies before it
    /// deletes the file.
    SucceedThenCrash(usize),
    /// The server accepts, and the daemon dies before it marks the item.
    AcceptThenCrash(usize),
    /// kill -9: the queue is dropped without a flush, then loaded again.
    Crash,
    /// A clean stop and start.
    Restart,
}

fn failure() -> impl Strategy<Value = Failure> {
    prop_oneof![
        Just(Failure::Transient),
        Just(Failure::Unreachable),
        Just(Failure::Hold),
        Just(Failure::Rejected),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let name = 0..NAMES.len();
    let slot = 0..3usize;
    prop_oneof![
        3 => name.clone().prop_map(Step::Write),
        2 => name.clone().prop_map(Step::Overwrite),
        1 => name.clone().prop_map(Step::Delete),
        2 => (slot.clone(), any::<bool>())
            .prop_map(|(slot, in_place)| Step::WriteDuringUpload { slot, in_place }),
        3 => name.prop_map(Step::Discover),
        4 => any::<bool>().prop_map(|probe| Step::Start { probe }),
        3 => slot.clone().prop_map(Step::Accept),
        3 => slot.clone().prop_map(Step::Succeed),
        2 => (slot.clone(), failure()).prop_map(|(slot, kind)| Step::Fail(slot, kind)),
        1 => slot.clone().prop_map(Step::SucceedThenCrash),
        1 => slot.prop_map(Step::AcceptThenCrash),
        1 => Just(Step::Crash),
        1 => Just(Step::Restart),
    ]
}

/// What a simulated upload found when it read the file.
enum Sent {
    /// The file matched its record; the server got this content.
    Content(String),
    Vanished,
    Changed,
}

struct Harness {
    _root: TempDir,
    outbox: PathBuf,
    state_dir: PathBuf,
    settings: Settings,
    queue: Option<Queue>,
    /// SHA-256 of each file in the outbox, as the producer last wrote it.
    on_disk: HashMap<String, String>,
    /// Contents the server accepted.
    delivered: HashSet<String>,
    /// Contents moved to `rejected/`.
    rejected: HashSet<String>,
    /// Ids of the uploads in flight, with the content the server accepted
    /// for each, once it did.
    in_flight: Vec<(u64, Option<String>)>,
    versions: u32,
}

impl Harness {
    fn new() -> Harness {
        let root = tempfile::tempdir().expect("creating a temporary folder failed");
        let outbox = root.path().join("outbox");
        let state_dir = root.path().join("state");
        fs::create_dir_all(&outbox).unwrap();
        fs::create_dir_all(&state_dir).unwrap();
        let flags = RawSettings {
            outbox: Some(outbox.clone()),
            state_dir: Some(state_dir.clone()),
            ..Default::default()
        };
        let home = root.path().display().to_string();
        let settings =
            outboxd::config::load(None, flags, |name| (name == "HOME").then(|| home.clone()))
                .settings;
        let mut harness = Harness {
            _root: root,
            outbox,
            state_dir,
            settings,
            queue: None,
            on_disk: HashMap::new(),
            delivered: HashSet::new(),
            rejected: HashSet::new(),
            in_flight: Vec::new(),
            versions: 0,
        };
        harness.start();
        harness
    }

    fn queue(&mut self) -> &mut Queue {
        self.queue.as_mut().expect("the queue is open")
    }

    /// Loads the queue as `run` does at start: `uploading` becomes pending,
    /// interrupted deletes finish, records without a file go, and every file
    /// in the outbox is examined.
    fn start(&mut self) {
        let store = Store::open(&self.state_dir).expect("opening the queue failed");
        let mut queue = Queue::load(store, MAX_DELAY).expect("loading the queue failed");
        let uploading: Vec<String> = queue
            .records()
            .filter(|record| record.state == ItemState::Uploading)
            .map(|record| record.file.clone())
            .collect();
        assert!(
            uploading.is_empty(),
            "items still uploading after a restart: {uploading:?}"
        );
        finish_interrupted(&self.settings, &mut queue);
        self.queue = Some(queue);
        self.check_files();
        let outbox = self.outbox.clone();
        let gone: Vec<u64> = self
            .queue()
            .records()
            .filter(|record| record.state == ItemState::Pending)
            .filter(|record| !outbox.join(&record.file).exists())
            .map(|record| record.id)
            .collect();
        for id in gone {
            self.queue().remove(id).unwrap();
        }
        for index in 0..NAMES.len() {
            self.discover(index);
        }
        self.check_after_start();
    }

    fn crash(&mut self) {
        self.in_flight.clear();
        drop(self.queue.take());
        self.start();
    }

    fn restart(&mut self) {
        self.queue().store().flush_blocking().unwrap();
        self.crash();
    }

    fn write(&mut self, index: usize, in_place: bool) {
        self.versions += 1;
        let name = NAMES[index];
        let bytes = archive(&format!("{name}-v{}", self.versions), 64);
        let path = self.outbox.join(name);
        if in_place && path.exists() {
            fs::write(&path, &bytes).unwrap();
        } else {
            let temp = self.outbox.join(format!(".{name}.part"));
            fs::write(&temp, &bytes).unwrap();
            fs::rename(&temp, &path).unwrap();
        }
        self.on_disk.insert(name.to_string(), sha256_hex(&bytes));
    }

    fn delete(&mut self, index: usize) {
        let name = NAMES[index];
        let _ = fs::remove_file(self.outbox.join(name));
        self.on_disk.remove(name);
    }

    fn facts(&self, name: &str) -> Option<FileFacts> {
        let path = self.outbox.join(name);
        let metadata = fs::symlink_metadata(&path).ok()?;
        let bytes = fs::read(&path).ok()?;
        Some(FileFacts {
            file: name.to_string(),
            size: metadata.len(),
            mtime_ns: outboxd::intake::mtime_ns(&metadata),
            inode: metadata.ino(),
            sha256: sha256_hex(&bytes),
        })
    }

    fn discover(&mut self, index: usize) {
        let name = NAMES[index];
        let Some(facts) = self.facts(name) else {
            return;
        };
        let known = self
            .queue()
            .by_name(name)
            .is_some_and(|record| facts.matches(record));
        if !known {
            self.queue().accept(facts).unwrap();
        }
    }

    fn start_upload(&mut self, probe: bool) {
        if let Some(record) = self.queue().take_due(now_ms(), probe).unwrap() {
            self.in_flight.push((record.id, None));
        }
    }

    /// Picks the upload at `slot` among the uploads in flight.
    fn pick(&self, slot: usize) -> Option<usize> {
        (!self.in_flight.is_empty()).then(|| slot % self.in_flight.len())
    }

    /// The server reads the body of the upload at `index` and accepts it.
    /// Returns false when the upload ended with a local fault instead.
    fn accept(&mut self, index: usize) -> bool {
        if self.in_flight[index].1.is_some() {
            return true;
        }
        let id = self.in_flight[index].0;
        match self.send_or_fault(id) {
            Some(sha) => {
                self.delivered.insert(sha.clone());
                self.in_flight[index].1 = Some(sha);
                true
            }
            None => {
                self.in_flight.remove(index);
                false
            }
        }
    }

    /// Reads the file as the uploader does: it must still be the recorded
    /// file (size, mtime, inode) with the recorded SHA-256.
    fn send(&self, id: u64) -> Sent {
        let record = self
            .queue
            .as_ref()
            .and_then(|queue| queue.get(id))
            .expect("an upload in flight has a record");
        match self.facts(&record.file) {
            None => Sent::Vanished,
            Some(facts) if !facts.matches(record) || facts.sha256 != record.sha256 => Sent::Changed,
            Some(facts) => Sent::Content(facts.sha256),
        }
    }

    /// Applies a local fault as the daemon does. Returns the content sent,
    /// if the file was intact.
    fn send_or_fault(&mut self, id: u64) -> Option<String> {
        let file = self.queue().get(id).unwrap().file.clone();
        match self.send(id) {
            Sent::Content(sha) => Some(sha),
            Sent::Vanished => {
                self.queue().remove(id).unwrap();
                None
            }
            Sent::Changed => {
                self.queue().remove(id).unwrap();
                let index = NAMES.iter().position(|n| *n == file).unwrap();
                self.discover(index);
                None
            }
        }
    }

    /// The upload at `slot` succeeds. With `delete`, the daemon marks,
    /// flushes and finishes the file; without, it dies right after the flush.
    fn succeed(&mut self, slot: usize, delete: bool) {
        let Some(index) = self.pick(slot) else {
            return;
        };
        if !self.accept(index) {
            return;
        }
        let (id, _) = self.in_flight.remove(index);
        let done = self
            .queue()
            .mark_uploaded(id)
            .unwrap()
            .expect("the item is in the queue");
        self.queue().store().flush_blocking().unwrap();
        if !delete {
            return;
        }
        if !finish_uploaded(&self.settings, &done) {
            let index = NAMES.iter().position(|n| *n == done.file).unwrap();
            self.discover(index);
        }
        self.check_files();
    }

    fn accept_then_crash(&mut self, slot: usize) {
        if let Some(index) = self.pick(slot) {
            self.accept(index);
        }
        self.crash();
    }

    fn fail(&mut self, slot: usize, kind: Failure) {
        let Some(index) = self.pick(slot) else {
            return;
        };
        if self.in_flight[index].1.is_some() {
            // The server accepted this one; its response cannot be a failure.
            return;
        }
        let (id, _) = self.in_flight.remove(index);
        let record = self.queue().get(id).unwrap().clone();
        match kind {
            Failure::Transient => {
                let next = now_ms() + 60_000;
                let error = Some("HTTP 500".to_string());
                self.queue().requeue(id, true, Some(next), error).unwrap();
            }
            Failure::Unreachable | Failure::Hold => {
                let next = record.next_attempt_at;
                self.queue().requeue(id, false, next, None).unwrap();
            }
            Failure::Rejected => {
                let sha = self.on_disk.get(&record.file).cloned();
                let name = std::ffi::OsStr::new(&record.file);
                match outboxd::intake::reject(&self.outbox, name, "HTTP 400 Bad Request") {
                    Ok(_) => {
                        self.rejected.extend(sha);
                        self.on_disk.remove(&record.file);
                        self.queue().remove(id).unwrap();
                    }
                    Err(_) => self.queue().requeue(id, true, None, None).unwrap(),
                }
            }
        }
    }

    /// Checks that every file the producer left in the outbox is still there
    /// with its content, or was accepted by the server with that content.
    fn check_files(&mut self) {
        let mut left = Vec::new();
        for (name, sha) in &self.on_disk {
            match fs::read(self.outbox.join(name)) {
                Ok(bytes) => assert_eq!(
                    &sha256_hex(&bytes),
                    sha,
                    "{name}: the content in the outbox changed without a write"
                ),
                Err(_) => {
                    assert!(
                        self.delivered.contains(sha),
                        "{name}: left the outbox, but the server never accepted its content {sha}"
                    );
                    left.push(name.clone());
                }
            }
        }
        for name in left {
            self.on_disk.remove(&name);
        }
    }

    /// Checks the state right after a start: every file in the outbox has a
    /// pending record that matches it, and every pending record its file.
    fn check_after_start(&mut self) {
        for name in NAMES {
            let Some(facts) = self.facts(name) else {
                continue;
            };
            let record = self.queue().by_name(name).cloned();
            let record = record.unwrap_or_else(|| panic!("{name} is in the outbox unqueued"));
            assert_eq!(record.state, ItemState::Pending, "{name} after a start");
            assert!(facts.matches(&record), "{name}: record of other content");
        }
        let outbox = self.outbox.clone();
        let orphans: Vec<String> = self
            .queue()
            .records()
            .filter(|record| record.state == ItemState::Pending)
            .filter(|record| !outbox.join(&record.file).exists())
            .map(|record| record.file.clone())
            .collect();
        assert!(
            orphans.is_empty(),
            "pending records without a file: {orphans:?}"
        );
    }

    /// Checks that the index agrees with the records and the uploads in flight.
    fn check_index(&mut self) {
        let in_flight: HashSet<u64> = self.in_flight.iter().map(|(id, _)| *id).collect();
        let queue = self.queue.as_ref().unwrap();
        let mut names = HashSet::new();
        let mut pending = 0;
        for record in queue.records() {
            assert!(
                names.insert(record.file.clone()),
                "two records for {}",
                record.file
            );
            match record.state {
                ItemState::Pending => pending += 1,
                ItemState::Uploading => assert!(
                    in_flight.contains(&record.id),
                    "{} is uploading but not in flight",
                    record.file
                ),
                ItemState::Uploaded | ItemState::Rejected => {}
            }
        }
        for id in &in_flight {
            let state = queue.get(*id).map(|record| record.state);
            assert_eq!(state, Some(ItemState::Uploading), "upload {id} in flight");
        }
        let counts = queue.counts();
        assert_eq!(counts.pending, pending, "counts().pending");
        assert_eq!(
            counts.uploading as usize,
            in_flight.len(),
            "counts().uploading"
        );
        assert_eq!(queue.pending_len() as u64, pending, "pending_len()");
    }

    fn apply(&mut self, step: &Step) {
        match *step {
            Step::Write(index) => self.write(index, false),
            Step::Overwrite(index) => self.write(index, true),
            Step::Delete(index) => self.delete(index),
            Step::WriteDuringUpload { slot, in_place } => {
                if let Some(index) = self.pick(slot) {
                    let id = self.in_flight[index].0;
                    let file = self.queue().get(id).unwrap().file.clone();
                    let name = NAMES.iter().position(|n| *n == file).unwrap();
                    self.write(name, in_place);
                }
            }
            Step::Discover(index) => self.discover(index),
            Step::Start { probe } => self.start_upload(probe),
            Step::Accept(slot) => {
                if let Some(index) = self.pick(slot) {
                    self.accept(index);
                }
            }
            Step::Succeed(slot) => self.succeed(slot, true),
            Step::Fail(slot, kind) => self.fail(slot, kind),
            Step::SucceedThenCrash(slot) => {
                self.succeed(slot, false);
                self.crash();
            }
            Step::AcceptThenCrash(slot) => self.accept_then_crash(slot),
            Step::Crash => self.crash(),
            Step::Restart => self.restart(),
        }
        self.check_files();
        self.check_index();
    }

    /// Uploads everything left, ignoring backoff, until the outbox is empty.
    fn drain(&mut self) {
        self.restart();
        for _ in 0..DRAIN_ROUNDS {
            for index in 0..NAMES.len() {
                self.discover(index);
            }
            self.start_upload(true);
            if self.in_flight.is_empty() {
                break;
            }
            self.succeed(0, true);
            self.check_index();
        }
        self.check_files();
        let left: Vec<&String> = self.on_disk.keys().collect();
        assert!(left.is_empty(), "files never uploaded: {left:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    })]

    #[test]
    fn queue_and_files_keep_invariants(steps in proptest::collection::vec(step(), 1..50)) {
        let mut harness = Harness::new();
        for step in &steps {
            harness.apply(step);
        }
        harness.drain();
    }
}

#[test]
fn rewrite_after_accept_keeps_new_content() {
    // The producer renames a new version in after the server accepted the
    // old one and before the daemon deletes the file: the new version must
    // stay and be uploaded.
    let mut harness = Harness::new();
    for step in [
        Step::Write(0),
        Step::Discover(0),
        Step::Start { probe: false },
        Step::Accept(0),
        Step::Write(0),
        Step::Succeed(0),
        Step::Overwrite(0),
        Step::Discover(0),
        Step::Start { probe: false },
        Step::Accept(0),
        Step::Overwrite(0),
        Step::SucceedThenCrash(0),
    ] {
        harness.apply(&step);
    }
    harness.drain();
}

/// Total size of the files under `path`, in bytes.
fn folder_bytes(path: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in fs::read_dir(path).unwrap().filter_map(Result::ok) {
        let metadata = entry.metadata().unwrap();
        total += if metadata.is_dir() {
            folder_bytes(&entry.path())
        } else {
            metadata.len()
        };
    }
    total
}

#[test]
fn sled_folder_bounded_after_many_cycles() {
    let cycles: usize = std::env::var("OUTBOXD_TEST_CYCLES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(50_000);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut queue = Queue::load(store, MAX_DELAY).unwrap();
    let started = std::time::Instant::now();
    let mut peak = 0;
    for cycle in 0..cycles {
        let facts = FileFacts {
            file: format!("session-{cycle:08}.zip"),
            size: 4096,
            mtime_ns: cycle as i128,
            inode: cycle as u64,
            sha256: sha256_hex(&cycle.to_be_bytes()),
        };
        let id = queue.accept(facts).unwrap();
        queue.take_due(now_ms(), false).unwrap().unwrap();
        queue.mark_uploaded(id).unwrap();
        // The daemon flushes each uploaded mark before it deletes the file.
        queue.store().flush_blocking().unwrap();
        if cycle % 1000 == 999 {
            queue.prune_uploaded(now_ms(), Duration::ZERO).unwrap();
            peak = peak.max(folder_bytes(&dir.path().join("queue")));
        }
    }
    queue.prune_uploaded(now_ms(), Duration::ZERO).unwrap();
    queue.store().flush_blocking().unwrap();
    let end = folder_bytes(&dir.path().join("queue"));
    eprintln!(
        "sled: {cycles} cycles in {:?}, folder peak {peak} bytes, at the end {end} bytes",
        started.elapsed()
    );
    assert!(
        peak <= SLED_FOLDER_BOUND,
        "the sled folder reached {peak} bytes, over {SLED_FOLDER_BOUND}"
    );
}

/// Bound on the sled folder of a queue whose records are pruned: six times
/// the 2.5 MiB measured (see docs/reliability.md), and half of the 31 MiB
/// that the same 50,000 records take when none is pruned.
const SLED_FOLDER_BOUND: u64 = 16 << 20;
