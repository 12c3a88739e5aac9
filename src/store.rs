//! The durable queue: every file the daemon has taken in, as a record in sled.
//!
//! This is the only module that touches sled (0.34, pre-1.0), so that it can be
//! swapped for another store without touching the rest of the daemon.
//!
//! # Key layout
//!
//! - tree `items`: key = item id as 8 bytes big-endian, value = `Record` as
//!   JSON with a format version `v`.
//! - tree `meta`: `next_id` (u64 BE), `uploaded_total` (u64 BE, the count of
//!   uploads since the state dir was created; never decremented when records are
//!   pruned), `created_at` (ms since the epoch, u64 BE).
//!
//! # States
//!
//! ```text
//!   discovered --> pending --> uploading --> uploaded --> (pruned after retention)
//!                    ^  |          |
//!                    |  |          +--> pending (transient, unreachable, hold, shutdown)
//!                    |  +--> rejected: the file is moved to rejected/ and the record removed
//!                    +------------ file changed: re-hashed, attempts reset
//! ```
//!
//! # Crash invariants
//!
//! The file in the outbox is the source of truth for "not delivered yet"; a
//! record adds the hash, attempts and backoff. So:
//!
//! - `uploaded` is flushed to disk before the file is deleted or moved. A crash
//!   between the two leaves an `uploaded` record and the file; start-up then
//!   finishes the delete or move if the file is unchanged.
//! - Other transitions are flushed by sled's periodic flush (every 500 ms) or at
//!   shutdown. Losing one costs at most a repeated attempt, never a file: a file
//!   without a record is queued again on start, a record without a file is dropped.
//! - `uploading` is never trusted after a restart: `open` turns it into `pending`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Version of the record format written by this build.
pub const RECORD_VERSION: u32 = 1;

/// sled's page cache. Its default is about 1 GB, far more than a queue of small
/// records needs.
/// NOTE: sled 0.34 does not keep its memory within this bound. After reading
/// 100,000 records of about 330 bytes it uses about 45 MB, with any cache size
/// from 1 to 64 MiB (measured on Linux x86-64, see BENCHMARKS.md).
const CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// How long `open` waits for sled's own file lock, which `outboxd status` may
/// hold for a moment when it reads the queue while no daemon runs.
const LOCK_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the queue database in {path} cannot be opened: {source}; check that the state dir is writable and not used by another program")]
    Open { path: String, source: sled::Error },
    #[error("the queue database failed: {0}; check the state dir's disk space and permissions")]
    Sled(#[from] sled::Error),
    #[error("a queue record is invalid: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the queue database is closed after a failure and could not be opened again yet")]
    Closed,
}

/// State of an item in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemState {
    Pending,
    Uploading,
    Uploaded,
    Rejected,
}

impl ItemState {
    pub fn as_str(self) -> &'static str {
        match self {
            ItemState::Pending => "pending",
            ItemState::Uploading => "uploading",
            ItemState::Uploaded => "uploaded",
            ItemState::Rejected => "rejected",
        }
    }
}

/// One queued file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub v: u32,
    pub id: u64,
    /// File name in the outbox (valid UTF-8; other names are rejected at intake).
    pub file: String,
    pub size: u64,
    /// Modification time in nanoseconds since the epoch, to notice a changed file.
    pub mtime_ns: i128,
    /// Inode, to notice a file replaced by another of the same size and mtime.
    #[serde(default)]
    pub inode: u64,
    pub sha256: String,
    pub session_id: String,
    pub state: ItemState,
    pub attempts: u32,
    /// Milliseconds since the epoch; `None` means due now.
    pub next_attempt_at: Option<u64>,
    pub last_error: Option<String>,
    pub queued_at: u64,
    pub uploaded_at: Option<u64>,
}

/// The queue database. Clones share one database, and `reopen` replaces it
/// for all of them.
///
/// sled 0.34 keeps failing after a write error: after ENOSPC on a full disk,
/// every later write and flush returned the same error even once space was
/// back, until the database was opened again. So the first error marks
/// the store broken, and the daemon reopens it and writes its in-memory state
/// back (`Queue::rewrite_store`) once the disk takes writes again.
#[derive(Clone)]
pub struct Store {
    path: PathBuf,
    handles: Arc<RwLock<Option<Handles>>>,
    broken: Arc<AtomicBool>,
    /// The error that broke the store, for logs and `status`.
    failure: Arc<Mutex<Option<String>>>,
}

struct Handles {
    db: sled::Db,
    items: sled::Tree,
    meta: sled::Tree,
}

impl Store {
    /// Opens (or creates) the database in `state_dir/queue`, waiting up to a few
    /// seconds for sled's lock.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        Store::open_with_wait(state_dir, LOCK_WAIT)
    }

    fn open_with_wait(state_dir: &Path, wait: Duration) -> Result<Store, StoreError> {
        let path = state_dir.join("queue");
        let handles = open_handles(&path, wait)?;
        Ok(Store {
            path,
            handles: Arc::new(RwLock::new(Some(handles))),
            broken: Arc::new(AtomicBool::new(false)),
            failure: Arc::new(Mutex::new(None)),
        })
    }

    /// Opens the database of a stopped daemon for `status` and `list`, waiting
    /// at most briefly for sled's lock, so that they never delay a daemon.
    pub fn open_read(state_dir: &Path) -> Result<Store, StoreError> {
        Store::open_with_wait(state_dir, Duration::from_millis(300))
    }

    /// True after a write or flush failed: the database takes no more writes
    /// until `reopen` succeeds.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// Returns the error that broke the store, while it is broken.
    pub fn failure(&self) -> Option<String> {
        if !self.is_broken() {
            return None;
        }
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn mark_broken(&self, error: &StoreError) {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
        self.broken.store(true, Ordering::SeqCst);
    }

    /// Closes the database and opens it again. On success the store is no
    /// longer broken, but it holds only what was on disk: the caller writes
    /// its in-memory state back. On failure the store stays closed and broken.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut handles = self.handles.write().unwrap_or_else(|p| p.into_inner());
        // sled's file lock is released only when the old handles are dropped.
        drop(handles.take());
        match open_handles(&self.path, Duration::ZERO) {
            Ok(opened) => {
                *handles = Some(opened);
                self.broken.store(false, Ordering::SeqCst);
                Ok(())
            }
            Err(err) => {
                self.mark_broken(&err);
                Err(err)
            }
        }
    }

    /// Runs `op` on the open handles; an error marks the store broken.
    fn with<T>(&self, op: impl FnOnce(&Handles) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let handles = self.handles.read().unwrap_or_else(|p| p.into_inner());
        let result = match handles.as_ref() {
            Some(handles) => op(handles),
            None => Err(StoreError::Closed),
        };
        if let Err(err @ StoreError::Sled(_)) = &result {
            self.mark_broken(err);
        }
        result
    }

    /// Returns every record. Records that do not decode are skipped with a warning:
    /// their files are still in the outbox and are queued again by the rescan.
    pub fn load_all(&self) -> Result<Vec<Record>, StoreError> {
        self.with(|h| {
            let mut records = Vec::with_capacity(h.items.len());
            for entry in h.items.iter() {
                let (key, value) = entry?;
                match decode(&value) {
                    Ok(record) => records.push(record),
                    Err(err) => {
                        tracing::warn!(key = %hex::encode(&key), error = %err, "dropping an unreadable queue record; its file is queued again");
                        h.items.remove(key)?;
                    }
                }
            }
            Ok(records)
        })
    }

    /// Allocates a new item id.
    pub fn next_id(&self) -> Result<u64, StoreError> {
        self.with(|h| {
            let value = h.meta.update_and_fetch("next_id", |old| {
                let next = old.map(be_u64).unwrap_or(0) + 1;
                Some(next.to_be_bytes().to_vec())
            })?;
            Ok(value.map(|v| be_u64(&v)).unwrap_or(1))
        })
    }

    /// Makes sure that `next_id` never returns `id` or a smaller id, after a
    /// reopen lost ids that were handed out but not written.
    pub fn reserve_ids_through(&self, id: u64) -> Result<(), StoreError> {
        self.with(|h| {
            h.meta.update_and_fetch("next_id", |old| {
                let next = old.map(be_u64).unwrap_or(0).max(id);
                Some(next.to_be_bytes().to_vec())
            })?;
            Ok(())
        })
    }

    /// Writes a record (insert or replace).
    pub fn put(&self, record: &Record) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record)?;
        self.with(|h| {
            h.items.insert(record.id.to_be_bytes(), value)?;
            Ok(())
        })
    }

    pub fn get(&self, id: u64) -> Result<Option<Record>, StoreError> {
        self.with(|h| match h.items.get(id.to_be_bytes())? {
            Some(value) => Ok(Some(decode(&value)?)),
            None => Ok(None),
        })
    }

    pub fn remove(&self, id: u64) -> Result<(), StoreError> {
        self.with(|h| {
            h.items.remove(id.to_be_bytes())?;
            Ok(())
        })
    }

    /// Returns the ids of every stored record.
    pub fn ids(&self) -> Result<Vec<u64>, StoreError> {
        self.with(|h| {
            let mut ids = Vec::with_capacity(h.items.len());
            for key in h.items.iter().keys() {
                ids.push(be_u64(&key?));
            }
            Ok(ids)
        })
    }

    /// Writes an uploaded record and counts the upload. The caller must `flush`
    /// before it deletes or moves the file.
    pub fn mark_uploaded(&self, record: &Record) -> Result<(), StoreError> {
        self.put(record)?;
        self.with(|h| {
            h.meta.update_and_fetch("uploaded_total", |old| {
                Some((old.map(be_u64).unwrap_or(0) + 1).to_be_bytes().to_vec())
            })?;
            Ok(())
        })
    }

    /// Count of uploads since the state dir was created.
    pub fn uploaded_total(&self) -> Result<u64, StoreError> {
        self.with(|h| {
            Ok(h.meta
                .get("uploaded_total")?
                .map(|v| be_u64(&v))
                .unwrap_or(0))
        })
    }

    /// Writes every change to disk and waits until it is durable.
    ///
    /// Runs sled's blocking flush on Tokio's blocking pool instead of calling
    /// `flush_async`, because sled 0.34 hands that to its own thread pool,
    /// whose queue wakes every idle worker (`notify_all`) for each task.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let db = self.with(|h| Ok(h.db.clone()))?;
        let result = match tokio::task::spawn_blocking(move || db.flush()).await {
            Ok(result) => result.map(drop).map_err(StoreError::from),
            Err(err) => Err(StoreError::Sled(sled::Error::Io(std::io::Error::other(
                format!("the flush task failed: {err}"),
            )))),
        };
        if let Err(err) = &result {
            self.mark_broken(err);
        }
        result
    }

    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.with(|h| {
            h.db.flush()?;
            Ok(())
        })
    }
}

/// Opens the sled database at `path`, retrying for up to `wait` while another
/// process holds its lock.
fn open_handles(path: &Path, wait: Duration) -> Result<Handles, StoreError> {
    let deadline = std::time::Instant::now() + wait;
    let db = loop {
        let result = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            .flush_every_ms(Some(500))
            .open();
        match result {
            Ok(db) => break db,
            // sled 0.34 reports its lock as ErrorKind::Other with this text.
            Err(sled::Error::Io(err))
                if (err.kind() == std::io::ErrorKind::WouldBlock
                    || err.to_string().contains("could not acquire lock"))
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(source) => {
                return Err(StoreError::Open {
                    path: path.display().to_string(),
                    source,
                })
            }
        }
    };
    let items = db.open_tree("items")?;
    let meta = db.open_tree("meta")?;
    if meta.get("created_at")?.is_none() {
        meta.insert("created_at", &crate::timefmt::now_ms().to_be_bytes())?;
    }
    Ok(Handles { db, items, meta })
}

fn decode(value: &[u8]) -> Result<Record, serde_json::Error> {
    serde_json::from_slice(value)
}

fn be_u64(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let n = bytes.len().min(8);
    buf[8 - n..].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64) -> Record {
        Record {
            v: RECORD_VERSION,
            id,
            file: format!("s{id}.zip"),
            size: 10,
            mtime_ns: 1,
            inode: 2,
            sha256: "00".repeat(32),
            session_id: format!("s{id}"),
            state: ItemState::Pending,
            attempts: 0,
            next_attempt_at: None,
            last_error: None,
            queued_at: 5,
            uploaded_at: None,
        }
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let id = store.next_id().unwrap();
            store.put(&record(id)).unwrap();
            store.flush_blocking().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let all = store.load_all().unwrap();
        assert_eq!(all, vec![record(1)]);
        assert_eq!(store.next_id().unwrap(), 2);
    }

    #[test]
    fn version_one_record_decodes() {
        // A record as version 1 wrote it, kept verbatim so that a format change
        // that breaks old state dirs fails here.
        let stored = br#"{"v":1,"id":7,"file":"a.zip","size":3,"mtime_ns":12,"sha256":"ab","session_id":"a","state":"uploading","attempts":2,"next_attempt_at":99,"last_error":"HTTP 500","queued_at":1,"uploaded_at":null}"#;
        let record = decode(stored).unwrap();
        assert_eq!(record.state, ItemState::Uploading);
        assert_eq!(record.attempts, 2);
        assert_eq!(record.inode, 0);
    }

    #[tokio::test]
    async fn uploaded_total_counts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut r = record(1);
        r.state = ItemState::Uploaded;
        store.mark_uploaded(&r).unwrap();
        store.mark_uploaded(&r).unwrap();
        store.flush().await.unwrap();
        assert_eq!(store.uploaded_total().unwrap(), 2);
    }
}
