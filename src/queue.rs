//! The in-memory index of the queue, written through to the `Store`.
//!
//! The daemon schedules from this index and never scans the database while it
//! runs: pending items are ordered by their next attempt time, so that picking
//! the next due item costs a logarithmic lookup even with 100,000 items.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::time::Duration;

use hashbrown::hash_table::{Entry, HashTable};

use crate::store::{ItemState, Record, Store, StoreError, RECORD_VERSION};
use crate::timefmt::now_ms;

/// Facts intake found about a complete archive in the outbox.
#[derive(Debug, Clone)]
pub struct FileFacts {
    pub file: String,
    pub size: u64,
    pub mtime_ns: i128,
    pub inode: u64,
    pub sha256: String,
}

impl FileFacts {
    /// True when the record describes this same file content.
    pub fn matches(&self, record: &Record) -> bool {
        record.size == self.size
            && record.mtime_ns == self.mtime_ns
            && (record.inode == 0 || record.inode == self.inode)
    }
}

/// Counts and ages for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueCounts {
    pub pending: u64,
    pub uploading: u64,
    pub pending_bytes: u64,
    pub oldest_pending_at: Option<u64>,
}

pub struct Queue {
    store: Store,
    /// Boxed, because a `Record` is about 190 bytes: a table of boxes keeps the
    /// empty slots of the hash table small and makes its growth cheap.
    items: HashMap<u64, Box<Record>>,
    by_name: NameIndex,
    /// Pending items by (next attempt in ms since the epoch, id); 0 means due now.
    due: BTreeSet<(u64, u64)>,
}

impl Queue {
    /// Loads every record. `uploading` records become `pending`, because their
    /// upload died with the previous process. A next attempt further away than
    /// `max_delay` (the wall clock stepped back) counts as due.
    pub fn load(store: Store, max_delay: Duration) -> Result<Queue, StoreError> {
        let mut queue = Queue {
            store,
            items: HashMap::new(),
            by_name: NameIndex::default(),
            due: BTreeSet::new(),
        };
        let horizon = now_ms() + max_delay.as_millis() as u64;
        for mut record in queue.store.load_all()? {
            let mut dirty = false;
            if record.state == ItemState::Uploading {
                record.state = ItemState::Pending;
                dirty = true;
            }
            if record.next_attempt_at.is_some_and(|at| at > horizon) {
                record.next_attempt_at = None;
                dirty = true;
            }
            if dirty {
                queue.store.put(&record)?;
            }
            if record.state == ItemState::Pending {
                queue
                    .due
                    .insert((record.next_attempt_at.unwrap_or(0), record.id));
            }
            let (id, file) = (record.id, record.file.clone());
            queue.items.insert(id, Box::new(record));
            if let Some(old) = queue.by_name.insert(&file, id, &queue.items) {
                // Two records for one file name: keep the newer, and drop the
                // older one from the due set too, which must match `items`.
                if let Some(older) = queue.items.remove(&old) {
                    if older.state == ItemState::Pending {
                        queue.due.remove(&(older.next_attempt_at.unwrap_or(0), old));
                    }
                }
                queue.store.remove(old)?;
            }
        }
        Ok(queue)
    }

    /// Returns every record as stored, for reading the queue of a stopped
    /// daemon without changing it.
    pub fn load_readonly(store: &Store) -> Result<Vec<Record>, StoreError> {
        store.load_all()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn get(&self, id: u64) -> Option<&Record> {
        self.items.get(&id).map(Box::as_ref)
    }

    pub fn by_name(&self, file: &str) -> Option<&Record> {
        self.by_name
            .get(file, &self.items)
            .and_then(|id| self.get(id))
    }

    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.items.values().map(Box::as_ref)
    }

    /// Queues a file, or updates the record of a file of the same name whose
    /// content changed (its attempts start again). Returns the item id.
    pub fn accept(&mut self, facts: FileFacts) -> Result<u64, StoreError> {
        if let Some(existing) = self.by_name(&facts.file) {
            if existing.state == ItemState::Uploading {
                // The upload in flight notices the change itself and re-queues.
                return Ok(existing.id);
            }
            let id = existing.id;
            self.remove(id)?;
        }
        let id = self.store.next_id()?;
        let session_id = session_id_of(&facts.file);
        let record = Record {
            v: RECORD_VERSION,
            id,
            file: facts.file,
            size: facts.size,
            mtime_ns: facts.mtime_ns,
            inode: facts.inode,
            sha256: facts.sha256,
            session_id,
            state: ItemState::Pending,
            attempts: 0,
            next_attempt_at: None,
            last_error: None,
            queued_at: now_ms(),
            uploaded_at: None,
        };
        self.store.put(&record)?;
        self.due.insert((0, id));
        let file = record.file.clone();
        self.items.insert(id, Box::new(record));
        self.by_name.insert(&file, id, &self.items);
        Ok(id)
    }

    /// Takes the pending item that is due first, if one is due at `now`, and
    /// marks it uploading. `ignore_backoff` takes the first pending item even if
    /// it is not due, for a probe.
    pub fn take_due(
        &mut self,
        now: u64,
        ignore_backoff: bool,
    ) -> Result<Option<Record>, StoreError> {
        let Some(&(at, id)) = self.due.iter().next() else {
            return Ok(None);
        };
        if at > now && !ignore_backoff {
            return Ok(None);
        }
        let record = self.items.get_mut(&id).expect("due set and items agree");
        record.state = ItemState::Uploading;
        if let Err(err) = self.store.put(record) {
            // Left uploading, the item would never be taken again.
            record.state = ItemState::Pending;
            return Err(err);
        }
        self.due.remove(&(at, id));
        Ok(Some(Record::clone(record)))
    }

    /// Time of the earliest next attempt, if any item is pending.
    pub fn next_due_at(&self) -> Option<u64> {
        self.due.iter().next().map(|&(at, _)| at)
    }

    /// Makes due every pending item whose next attempt is further away than
    /// `max_delay`, which happens only when the wall clock stepped back.
    pub fn clamp_future(&mut self, now: u64, max_delay: Duration) -> Result<(), StoreError> {
        let horizon = now + max_delay.as_millis() as u64;
        while let Some(&(at, id)) = self.due.iter().next_back() {
            if at <= horizon {
                break;
            }
            self.due.remove(&(at, id));
            self.due.insert((0, id));
            if let Some(record) = self.items.get_mut(&id) {
                record.next_attempt_at = None;
                self.store.put(record)?;
            }
        }
        Ok(())
    }

    /// Puts an item back to pending. `failed` counts an attempt; `next_attempt_at`
    /// of `None` keeps the item due now.
    pub fn requeue(
        &mut self,
        id: u64,
        failed: bool,
        next_attempt_at: Option<u64>,
        error: Option<String>,
    ) -> Result<(), StoreError> {
        let Some(record) = self.items.get_mut(&id) else {
            return Ok(());
        };
        if record.state == ItemState::Pending {
            self.due.remove(&(record.next_attempt_at.unwrap_or(0), id));
        }
        record.state = ItemState::Pending;
        if failed {
            record.attempts = record.attempts.saturating_add(1);
        }
        record.next_attempt_at = next_attempt_at;
        if error.is_some() {
            record.last_error = error;
        }
        self.due.insert((record.next_attempt_at.unwrap_or(0), id));
        self.store.put(record)
    }

    /// Makes pending items due now: the named ones, or all when `ids` is empty.
    /// Returns how many were changed.
    pub fn clear_backoff(&mut self, ids: &[u64]) -> Result<usize, StoreError> {
        let targets: Vec<u64> = if ids.is_empty() {
            self.due
                .iter()
                .filter(|(at, _)| *at > 0)
                .map(|&(_, id)| id)
                .collect()
        } else {
            ids.to_vec()
        };
        let mut changed = 0;
        for id in targets {
            let Some(record) = self.items.get_mut(&id) else {
                continue;
            };
            if record.state != ItemState::Pending {
                continue;
            }
            self.due.remove(&(record.next_attempt_at.unwrap_or(0), id));
            record.next_attempt_at = None;
            self.due.insert((0, id));
            self.store.put(record)?;
            changed += 1;
        }
        Ok(changed)
    }

    /// Records a successful upload. The caller flushes the store before it
    /// deletes or moves the file.
    pub fn mark_uploaded(&mut self, id: u64) -> Result<Option<Record>, StoreError> {
        let Some(record) = self.items.get_mut(&id) else {
            return Ok(None);
        };
        if record.state == ItemState::Pending {
            self.due.remove(&(record.next_attempt_at.unwrap_or(0), id));
        }
        record.state = ItemState::Uploaded;
        record.uploaded_at = Some(now_ms());
        record.next_attempt_at = None;
        record.last_error = None;
        let record = Record::clone(record);
        self.store.mark_uploaded(&record)?;
        Ok(Some(record))
    }

    /// Forgets an item (file gone, rejected, or uploaded and cleaned up).
    pub fn remove(&mut self, id: u64) -> Result<Option<Record>, StoreError> {
        let Some(record) = self.items.remove(&id) else {
            return Ok(None);
        };
        if record.state == ItemState::Pending {
            self.due.remove(&(record.next_attempt_at.unwrap_or(0), id));
        }
        self.by_name.remove(&record.file, id);
        self.store.remove(id)?;
        Ok(Some(*record))
    }

    /// Writes the whole in-memory queue to the store and flushes it. After
    /// `Store::reopen` the store contains an older state from disk, so every
    /// record is put and stored records that the queue dropped are removed.
    /// Ids handed out before the failure are never handed out again.
    pub fn rewrite_store(&self) -> Result<(), StoreError> {
        for record in self.items.values() {
            self.store.put(record)?;
        }
        for id in self.store.ids()? {
            if !self.items.contains_key(&id) {
                self.store.remove(id)?;
            }
        }
        if let Some(max_id) = self.items.keys().max() {
            self.store.reserve_ids_through(*max_id)?;
        }
        self.store.flush_blocking()
    }

    /// Removes uploaded records older than `retention`. Returns how many.
    pub fn prune_uploaded(&mut self, now: u64, retention: Duration) -> Result<usize, StoreError> {
        let cutoff = now.saturating_sub(retention.as_millis() as u64);
        let old: Vec<u64> = self
            .items
            .values()
            .filter(|r| r.state == ItemState::Uploaded && r.uploaded_at.unwrap_or(0) <= cutoff)
            .map(|r| r.id)
            .collect();
        for id in &old {
            self.remove(*id)?;
        }
        Ok(old.len())
    }

    pub fn counts(&self) -> QueueCounts {
        let mut counts = QueueCounts::default();
        for record in self.items.values() {
            match record.state {
                ItemState::Pending => {
                    counts.pending += 1;
                    counts.pending_bytes += record.size;
                    counts.oldest_pending_at = Some(
                        counts
                            .oldest_pending_at
                            .map_or(record.queued_at, |t| t.min(record.queued_at)),
                    );
                }
                ItemState::Uploading => {
                    counts.uploading += 1;
                    counts.pending_bytes += record.size;
                    counts.oldest_pending_at = Some(
                        counts
                            .oldest_pending_at
                            .map_or(record.queued_at, |t| t.min(record.queued_at)),
                    );
                }
                ItemState::Uploaded | ItemState::Rejected => {}
            }
        }
        counts
    }

    pub fn pending_len(&self) -> usize {
        self.due.len()
    }
}

/// Item ids by file name. It holds only the ids and hashes each name from the
/// item's record, so that the index keeps no second copy of every file name.
/// Every id in it must have its record in the `items` map passed to `insert`,
/// because growing the table hashes the names again.
#[derive(Default)]
struct NameIndex {
    table: HashTable<u64>,
    hasher: RandomState,
}

impl NameIndex {
    fn get(&self, file: &str, items: &HashMap<u64, Box<Record>>) -> Option<u64> {
        let hash = self.hasher.hash_one(file);
        self.table
            .find(hash, |id| file_of(items, *id) == Some(file))
            .copied()
    }

    /// Points `file` at `id`, whose record is in `items` already. Returns the
    /// id that `file` pointed at before.
    fn insert(&mut self, file: &str, id: u64, items: &HashMap<u64, Box<Record>>) -> Option<u64> {
        let hasher = &self.hasher;
        let entry = self.table.entry(
            hasher.hash_one(file),
            |other| file_of(items, *other) == Some(file),
            |other| hasher.hash_one(file_of(items, *other).unwrap_or_default()),
        );
        match entry {
            Entry::Occupied(mut entry) => Some(std::mem::replace(entry.get_mut(), id)),
            Entry::Vacant(entry) => {
                entry.insert(id);
                None
            }
        }
    }

    /// Removes `file` if it points at `id`.
    fn remove(&mut self, file: &str, id: u64) {
        let hash = self.hasher.hash_one(file);
        if let Ok(entry) = self.table.find_entry(hash, |other| *other == id) {
            entry.remove();
        }
    }
}

fn file_of(items: &HashMap<u64, Box<Record>>, id: u64) -> Option<&str> {
    items.get(&id).map(|record| record.file.as_str())
}

/// Returns the session id of a file: its name without a `.zip` suffix (any case).
pub fn session_id_of(file: &str) -> String {
    let lower = file.to_ascii_lowercase();
    if lower.ends_with(".zip") && file.len() > 4 {
        file[..file.len() - 4].to_string()
    } else {
        file.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(name: &str) -> FileFacts {
        FileFacts {
            file: name.into(),
            size: 10,
            mtime_ns: 5,
            inode: 9,
            sha256: "ab".into(),
        }
    }

    fn open() -> (tempfile::TempDir, Queue) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let queue = Queue::load(store, Duration::from_secs(300)).unwrap();
        (dir, queue)
    }

    #[test]
    fn take_due_orders_by_time() {
        let (_dir, mut queue) = open();
        let a = queue.accept(facts("a.zip")).unwrap();
        let b = queue.accept(facts("b.zip")).unwrap();
        let now = now_ms();
        let taken = queue.take_due(now, false).unwrap().unwrap();
        assert_eq!(taken.id, a);
        queue
            .requeue(a, true, Some(now + 10_000), Some("HTTP 500".into()))
            .unwrap();
        assert_eq!(queue.take_due(now, false).unwrap().unwrap().id, b);
        assert!(
            queue.take_due(now, false).unwrap().is_none(),
            "a is backing off"
        );
        assert_eq!(queue.get(a).unwrap().attempts, 1);
    }

    #[test]
    fn uploading_becomes_pending_on_load() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut queue =
                Queue::load(Store::open(dir.path()).unwrap(), Duration::from_secs(300)).unwrap();
            queue.accept(facts("a.zip")).unwrap();
            queue.take_due(now_ms(), false).unwrap().unwrap();
            queue.store().flush_blocking().unwrap();
        }
        let queue =
            Queue::load(Store::open(dir.path()).unwrap(), Duration::from_secs(300)).unwrap();
        assert_eq!(queue.by_name("a.zip").unwrap().state, ItemState::Pending);
        assert_eq!(queue.counts().pending, 1);
    }

    #[test]
    fn far_future_attempt_is_due() {
        let (_dir, mut queue) = open();
        let a = queue.accept(facts("a.zip")).unwrap();
        queue.take_due(now_ms(), false).unwrap();
        queue
            .requeue(a, true, Some(now_ms() + 86_400_000), None)
            .unwrap();
        queue
            .clamp_future(now_ms(), Duration::from_secs(300))
            .unwrap();
        assert_eq!(
            queue.take_due(now_ms(), false).unwrap().map(|r| r.id),
            Some(a)
        );
    }

    /// Stores item `a.zip` with its next attempt at `at`, then loads the
    /// queue again as a restart does.
    fn reload_with_next_attempt(at: u64) -> (tempfile::TempDir, Queue, u64) {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let store = Store::open(dir.path()).unwrap();
            let mut queue = Queue::load(store, Duration::from_secs(300)).unwrap();
            let id = queue.accept(facts("a.zip")).unwrap();
            queue.take_due(now_ms(), false).unwrap().unwrap();
            queue.requeue(id, true, Some(at), None).unwrap();
            queue.store().flush_blocking().unwrap();
            id
        };
        let store = Store::open(dir.path()).unwrap();
        let queue = Queue::load(store, Duration::from_secs(300)).unwrap();
        (dir, queue, id)
    }

    #[test]
    fn far_future_attempt_is_due_after_reload() {
        // The clock stepped back 30 days after the time was stored.
        let (dir, mut queue, id) = reload_with_next_attempt(now_ms() + 30 * 86_400_000);
        assert_eq!(queue.get(id).unwrap().next_attempt_at, None);
        assert_eq!(queue.get(id).unwrap().attempts, 1, "attempts kept");
        assert_eq!(
            queue.take_due(now_ms(), false).unwrap().map(|r| r.id),
            Some(id)
        );
        queue.store().flush_blocking().unwrap();
        drop(queue);
        let stored = Store::open(dir.path()).unwrap().load_all().unwrap();
        assert_eq!(stored[0].next_attempt_at, None, "the clamp was not stored");
    }

    #[test]
    fn attempt_within_max_delay_kept_on_reload() {
        let at = now_ms() + 60_000;
        let (_dir, mut queue, id) = reload_with_next_attempt(at);
        assert_eq!(queue.get(id).unwrap().next_attempt_at, Some(at));
        assert!(queue.take_due(now_ms(), false).unwrap().is_none());
        assert_eq!(queue.next_due_at(), Some(at));
    }

    #[test]
    fn clamp_future_keeps_near_attempts() {
        let (_dir, mut queue) = open();
        let now = now_ms();
        let far = queue.accept(facts("far.zip")).unwrap();
        let near = queue.accept(facts("near.zip")).unwrap();
        queue.take_due(now, false).unwrap().unwrap();
        queue.take_due(now, false).unwrap().unwrap();
        queue
            .requeue(far, true, Some(now + 86_400_000), None)
            .unwrap();
        queue.requeue(near, true, Some(now + 60_000), None).unwrap();

        queue.clamp_future(now, Duration::from_secs(300)).unwrap();

        assert_eq!(queue.get(far).unwrap().next_attempt_at, None);
        assert_eq!(queue.get(near).unwrap().next_attempt_at, Some(now + 60_000));
        assert_eq!(queue.take_due(now, false).unwrap().map(|r| r.id), Some(far));
        assert!(
            queue.take_due(now, false).unwrap().is_none(),
            "near is not due"
        );
    }

    #[test]
    fn by_name_finds_every_file_after_growth() {
        let (_dir, mut queue) = open();
        let ids: Vec<u64> = (0..1000)
            .map(|i| queue.accept(facts(&format!("f{i}.zip"))).unwrap())
            .collect();
        for (i, id) in ids.iter().enumerate() {
            let found = queue.by_name(&format!("f{i}.zip")).map(|record| record.id);
            assert_eq!(found, Some(*id), "f{i}.zip");
        }
        queue.remove(ids[7]).unwrap();
        assert!(queue.by_name("f7.zip").is_none());
        assert!(queue.by_name("f8.zip").is_some());
    }

    #[test]
    fn accept_same_name_replaces_record() {
        let (_dir, mut queue) = open();
        let first = queue.accept(facts("a.zip")).unwrap();
        let second = queue.accept(facts("a.zip")).unwrap();
        assert_ne!(first, second);
        assert!(queue.get(first).is_none());
        assert_eq!(queue.by_name("a.zip").map(|record| record.id), Some(second));
        assert_eq!(queue.counts().pending, 1);
    }

    #[test]
    fn session_id_strips_zip() {
        assert_eq!(session_id_of("abc.zip"), "abc");
        assert_eq!(session_id_of("abc.ZIP"), "abc");
        assert_eq!(session_id_of("abc.tar"), "abc.tar");
    }

    #[test]
    fn duplicate_name_records_load_once() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            for id in [1, 2] {
                let mut record = Record {
                    v: RECORD_VERSION,
                    id,
                    file: "same.zip".into(),
                    size: 10,
                    mtime_ns: id as i128,
                    inode: 9,
                    sha256: "ab".into(),
                    session_id: "same".into(),
                    state: ItemState::Pending,
                    attempts: 0,
                    next_attempt_at: None,
                    last_error: None,
                    queued_at: 1,
                    uploaded_at: None,
                };
                record.attempts = id as u32;
                store.put(&record).unwrap();
            }
            store.flush_blocking().unwrap();
        }
        let mut queue =
            Queue::load(Store::open(dir.path()).unwrap(), Duration::from_secs(300)).unwrap();
        assert_eq!(queue.counts().pending, 1);
        let taken = queue.take_due(now_ms(), false).unwrap().unwrap();
        assert_eq!(taken.id, 2, "the newer record is kept");
        assert!(queue.take_due(now_ms(), false).unwrap().is_none());
    }
}
