//! The expiry index: where the sweeper finds forgotten records without
//! reading every record.
//!
//! A separate index insert per claim would cost what the design's
//! measurements found (two inserts per claim ran at ≈ 0.2–0.3× of one).
//! Instead, every write of a record leaves an in-memory *note* (namespace,
//! key, the instant a sweep must look at the record), and the notes
//! gathered since the last time are written as a few index entries at
//! once, before sled is flushed: by every periodic flush, by a group commit
//! once 1,024 notes wait, by every sweep and by the close. An entry's key
//! is the second in which its records fall due (big endian, so entries
//! sort by time) and a unique sequence number; its value lists the keys. A
//! sweep reads only the entries whose second has begun, so its cost grows
//! with what it removes, not with the size of the database.
//!
//! A write notes its record at its *expiry* (`Retention::due_at`), not at
//! the instant it is forgotten: a pending claim is remembered for
//! `pending_retention` (a day by default) after its expiry, but most claims
//! end long before (done, released), and the note of an ended claim then
//! lives for the claim's ttl, not for a day. What the index keeps follows
//! the records that are live or remembered, not the messages seen.
//!
//! Why no record escapes sweeping forever:
//!
//! 1. Every write that stores a record notes it at its expiry, after the
//!    write landed.
//! 2. A sweep of an entry removes the noted records that are forgotten (a
//!    compare-and-swap on the bytes it read); keeps the notes whose record
//!    falls due within the entry's second but not yet; notes again, at
//!    the instant it is forgotten, a claim that expired and is still
//!    remembered (the note it reads is that claim's expiry note, or an
//!    older one); and drops the rest: a key now absent, or holding a record
//!    written later — and that later write left its own note (1).
//! 3. Notes live in memory until written, so a crash can lose notes of
//!    records that reached the disk (sled writes its log out in the
//!    background too). A *complete* marker in the metadata tree says "every
//!    record in this database has its note in the index": `close` (and the
//!    release after a drop) writes it once the last notes are flushed and
//!    fdatasync'ed, before the final flush; `open` takes it out and makes
//!    the removal durable before any write. Without the marker (a crash, a
//!    database written by an older format, a longer `pending_retention`
//!    than the marker was written under) the first
//!    sweep reads every record once — the full scan, the backstop — noting
//!    each one it keeps, and the index is complete again.
//!
//! The power-loss and SIGKILL harnesses check (3): after every cut, every
//! forgotten record of the recovered database is gone after one sweep
//! (`tests/powerloss.rs`, `tests/crash.rs`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sled::IVec;

use crate::error::{Error, Result};
use crate::machine::{self, Retention};
use crate::record::{Record, State};
use crate::sync::lock;

use super::keyspace::{display_key, remove};
use super::sweeper::SweepReport;

/// The index tree.
pub(crate) const INDEX_TREE: &str = "sled-idempotency/expiry";
/// The complete marker, in the metadata tree. Its value is the
/// `pending_retention` (milliseconds, 8 bytes big endian) the notes were
/// written under: a longer retention forgets pending records later than
/// their notes say, so it needs the backstop scan.
const COMPLETE_KEY: &str = "expiry_index_complete";
/// The records each namespace held at the last clean close ([`Counts`]),
/// in the metadata tree; taken out, like the marker, by every open.
const COUNTS_KEY: &str = "record_counts";
/// Width of an index entry's time slot.
pub(crate) const SLOT_MS: u64 = 1_000;
/// Most keys in one index entry (16 bytes each): entries stay small (sled
/// splits a leaf at 16 entries and rewrites it whole now and then).
const MAX_KEYS_PER_ENTRY: usize = 64;
/// Notes gathered before the writer of the last one writes them itself:
/// with a long `Periodic` period, notes would otherwise pile up in memory
/// (40 bytes each) until the next flush.
const MAX_NOTES_IN_MEMORY: usize = 16_384;
/// Notes a group commit waits for before it writes them: a lone `Sync`
/// writer would otherwise pay an index insert with every claim.
const MANY_NOTES: usize = 1_024;
/// Version byte of an entry's value.
const ENTRY_VERSION: u8 = 1;
/// Stripes of the notes not written yet.
const STRIPES: usize = 8;

/// What a write of the notes reuses.
#[derive(Debug, Default)]
struct Spares {
    /// One empty buffer per stripe, swapped with the stripe's notes.
    buffers: [Vec<Note>; STRIPES],
    /// The notes of every stripe, gathered and sorted.
    all: Vec<Note>,
}

/// Records stored per namespace, recorded with the marker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Always true when written by this version (counts are stored only
    /// once exact); false in counts an older version estimated after a
    /// crash, which an open counts again.
    pub(crate) exact: bool,
    /// Namespace, pending records, done records.
    pub(crate) spaces: Vec<(String, u64, u64)>,
}

impl Counts {
    fn encode(&self) -> Vec<u8> {
        let mut value = vec![u8::from(self.exact)];
        for (name, pending, done) in &self.spaces {
            // Namespace names are at most 64 bytes (`validate_namespace`).
            value.push(name.len() as u8);
            value.extend_from_slice(name.as_bytes());
            value.extend_from_slice(&pending.to_be_bytes());
            value.extend_from_slice(&done.to_be_bytes());
        }
        value
    }

    /// The counts, or `None` if `value` does not hold them.
    fn decode(value: &[u8]) -> Option<Counts> {
        fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
            *rest = tail;
            Some(head)
        }
        let u64_of = |b: &[u8]| <[u8; 8]>::try_from(b).ok().map(u64::from_be_bytes);
        let mut rest = value;
        let exact = match take(&mut rest, 1)? {
            [0] => false,
            [1] => true,
            _ => return None,
        };
        let mut spaces = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(*take(&mut rest, 1)?.first()?);
            let name = std::str::from_utf8(take(&mut rest, len)?).ok()?;
            let pending = u64_of(take(&mut rest, 8)?)?;
            let done = u64_of(take(&mut rest, 8)?)?;
            spaces.push((name.to_owned(), pending, done));
        }
        Some(Counts { exact, spaces })
    }
}

/// One record write, noted for the index.
#[derive(Debug, Clone, Copy)]
struct Note {
    /// The namespace's position among this open's namespaces.
    space: u32,
    key: [u8; 16],
    /// When a sweep must look at the record (`Retention::due_at`).
    due: u64,
}

/// The index: the notes not written yet, the index tree, and whether the
/// index covers every record.
#[derive(Debug)]
pub(crate) struct Expiries {
    db: sled::Db,
    tree: sled::Tree,
    meta: sled::Tree,
    /// Notes not written yet, in stripes chosen by a key byte, so that
    /// writers of different keys seldom wait for one another.
    notes: [Mutex<Vec<Note>>; STRIPES],
    /// Notes waiting in `notes`, all stripes together.
    waiting: AtomicUsize,
    /// Namespace names by position (as `Open::trees`).
    spaces: Mutex<Vec<Arc<str>>>,
    /// Held for all of a `write`: once a write returns, every note taken
    /// by an earlier one is in the index (`seal` relies on it). Holds the
    /// empty buffers a write swaps into the stripes, so that writers push
    /// into a vector that keeps its capacity instead of regrowing one.
    writing: Mutex<Spares>,
    /// Shared with the store, which must not hold sled handles (a closed
    /// store lets go of the database while handles live on).
    complete: Arc<Completeness>,
    /// One index sweep at a time.
    sweeping: Mutex<()>,
    /// The `pending_retention` of this open, recorded with the marker.
    pending_ms: u64,
    /// The record counts the last clean close stored (`None`: unknown,
    /// after a crash); new databases start at exact zeros.
    pub(crate) counts: Option<Counts>,
}

impl Expiries {
    /// Opens the index of `db`. `new_database`: nothing was ever stored.
    /// Takes the complete marker and the record counts out (see the
    /// module's point 3).
    pub(crate) fn open(
        db: &sled::Db,
        meta: &sled::Tree,
        pending_ms: u64,
        new_database: bool,
    ) -> Result<Self> {
        let tree = db
            .open_tree(INDEX_TREE)
            .map_err(Error::storage("opening the expiry index"))?;
        let marker = meta
            .remove(COMPLETE_KEY)
            .map_err(Error::storage("reading the expiry index marker"))?;
        let counts = meta
            .remove(COUNTS_KEY)
            .map_err(Error::storage("reading the record counts"))?;
        let written_under = marker
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes);
        let (complete, counts) = if new_database {
            let zero = Counts {
                exact: true,
                ..Counts::default()
            };
            (true, Some(zero))
        } else {
            let complete = written_under.is_some_and(|under| under >= pending_ms);
            (complete, counts.as_deref().and_then(Counts::decode))
        };
        Ok(Self {
            db: db.clone(),
            tree,
            meta: meta.clone(),
            notes: Default::default(),
            waiting: AtomicUsize::new(0),
            spaces: Mutex::new(Vec::new()),
            writing: Mutex::new(Spares::default()),
            complete: Arc::new(Completeness::new(complete)),
            sweeping: Mutex::new(()),
            pending_ms,
            counts,
        })
    }

    /// The namespace at the next position is `name`.
    pub(crate) fn add_space(&self, name: &str) {
        lock(&self.spaces).push(name.into());
    }

    /// Notes a record just written to the namespace at position `space`
    /// under `key`, due for a sweep at `due` (`Retention::due_at`).
    /// Returns `true` once
    /// [`MAX_NOTES_IN_MEMORY`] notes wait: the caller should have them
    /// written soon (a flush writes them).
    pub(crate) fn note(&self, space: usize, key: [u8; 16], due: u64) -> bool {
        let note = Note {
            space: u32::try_from(space).unwrap_or(u32::MAX),
            key,
            due,
        };
        let stripe = &self.notes[usize::from(key[15]) % STRIPES];
        let mut notes = lock(stripe);
        notes.push(note);
        // Counted under the stripe's lock: a write that takes this note
        // subtracts it after it has been counted.
        let waiting = self.waiting.fetch_add(1, Ordering::Relaxed) + 1;
        drop(notes);
        waiting >= MAX_NOTES_IN_MEMORY
    }

    /// Does the index cover every record (no backstop scan needed)?
    pub(crate) fn complete(&self) -> bool {
        self.complete.get()
    }

    /// What [`complete`](Self::complete) reads: a full scan that noted
    /// every record it kept marks it complete.
    pub(crate) fn completeness(&self) -> Arc<Completeness> {
        self.complete.clone()
    }

    fn mark_incomplete(&self) {
        self.complete.mark_incomplete();
    }

    /// [`write`](Self::write)s once [`MANY_NOTES`] or more wait.
    pub(crate) fn write_if_many(&self) -> Result<()> {
        if self.waiting.load(Ordering::Relaxed) >= MANY_NOTES {
            self.write()?;
        }
        Ok(())
    }

    /// Writes the notes gathered so far as index entries: one per
    /// namespace and time slot (split beyond [`MAX_KEYS_PER_ENTRY`]).
    pub(crate) fn write(&self) -> Result<()> {
        let mut writing = lock(&self.writing);
        let Spares { buffers, all } = &mut *writing;
        all.clear();
        for (stripe, buffer) in self.notes.iter().zip(buffers.iter_mut()) {
            std::mem::swap(&mut *lock(stripe), buffer);
            all.append(buffer);
        }
        if all.is_empty() {
            return Ok(());
        }
        self.waiting.fetch_sub(all.len(), Ordering::Relaxed);
        all.sort_unstable_by_key(|n| (n.due / SLOT_MS, n.space));
        let spaces = lock(&self.spaces).clone();
        for group in all.chunk_by(|a, b| (a.due / SLOT_MS, a.space) == (b.due / SLOT_MS, b.space)) {
            let Some(first) = group.first() else { continue };
            let Some(name) = spaces.get(first.space as usize) else {
                // Cannot happen: a namespace is added before its first write.
                self.mark_incomplete();
                continue;
            };
            for chunk in group.chunks(MAX_KEYS_PER_ENTRY) {
                let slot = first.due / SLOT_MS;
                self.insert(slot, name, chunk.iter().map(|n| &n.key))?;
            }
        }
        Ok(())
    }

    /// Writes one index entry: `keys` of namespace `name`, due in `slot`.
    fn insert<'a>(
        &self,
        slot: u64,
        name: &str,
        keys: impl ExactSizeIterator<Item = &'a [u8; 16]>,
    ) -> Result<()> {
        let seq = self
            .db
            .generate_id()
            .map_err(Error::storage("numbering an expiry index entry"))?;
        self.tree
            .insert(entry_key(slot, seq), encode(name, keys))
            .map_err(Error::storage("writing the expiry index"))?;
        Ok(())
    }

    /// Before the final flush of a close, with no writer left: writes the
    /// last notes and makes them durable with `sync` (a flush and
    /// fdatasync); only then writes the record counts (if known: none while
    /// a count after a crash has not finished) and, if the index
    /// covers every record, the complete marker, so that no torn write can
    /// keep the marker and lose a note.
    pub(crate) fn seal(
        &self,
        counts: Option<&Counts>,
        sync: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        self.write()?;
        sync()?;
        if let Some(counts) = counts {
            self.meta
                .insert(COUNTS_KEY, counts.encode())
                .map_err(Error::storage("writing the record counts"))?;
        }
        if self.complete() {
            self.meta
                .insert(COMPLETE_KEY, &self.pending_ms.to_be_bytes())
                .map_err(Error::storage("writing the expiry index marker"))?;
        }
        Ok(())
    }

    /// The end (exclusive) of the index entries due at `now`: a sweep
    /// fixes it when it starts, so that records falling due meanwhile
    /// cannot keep it running.
    pub(crate) fn due_end(now: u64) -> Vec<u8> {
        (now / SLOT_MS).saturating_add(1).to_be_bytes().to_vec()
    }

    /// Sweeps index entries from `from` (empty: the first) up to `end`
    /// ([`due_end`](Self::due_end)), reading at most about `limit` notes.
    /// `space` finds a namespace's tree by name. Entries it keeps (notes
    /// forgotten later in the current slot) are passed over: the next
    /// batch goes on after the last entry read.
    pub(crate) fn sweep_due(
        &self,
        space: &dyn Fn(&str) -> Option<sled::Tree>,
        now: u64,
        rules: Retention,
        (from, end, limit): (&[u8], &[u8], usize),
        removed_tokens: &AtomicU64,
    ) -> Result<Due> {
        let _one_at_a_time = lock(&self.sweeping);
        self.write()?;
        let mut due = Due {
            report: SweepReport::default(),
            removed: Vec::new(),
            next: None,
            oldest_due: u64::MAX,
        };
        for entry in self.tree.range(from..end) {
            let (entry_key, value) = entry.map_err(Error::storage("reading the expiry index"))?;
            if due.report.examined >= limit as u64 {
                due.next = Some(entry_key.to_vec());
                due.oldest_due = slot_of(&entry_key).saturating_mul(SLOT_MS);
                break;
            }
            let slot = slot_of(&entry_key);
            let Some((name, keys)) = decode(&value) else {
                // Not ours to read: drop it, and let the backstop scan note
                // whatever it listed.
                tracing::warn!(entry = %display_key(&entry_key), "dropped an unreadable expiry index entry; a full scan follows");
                self.mark_incomplete();
                self.remove_entry(&entry_key)?;
                continue;
            };
            let Some(tree) = space(&name) else {
                // Not a namespace of this open: leave the entry for later.
                continue;
            };
            let mut kept = Vec::new();
            let mut again = Vec::new();
            for key in keys {
                due.report.examined += 1;
                let value = tree
                    .get(key)
                    .map_err(Error::storage("reading a noted record"))?;
                let Some(value) = value else { continue };
                match Record::decode(&value) {
                    Err(e) => {
                        due.report.corrupt += 1;
                        tracing::warn!(key = %display_key(&key), error = %e, "sweeper skipped a corrupted record");
                    }
                    Ok(r) if machine::sweepable(&r, now, rules) => {
                        if remove(&tree, &key, &value, r.token, removed_tokens)?.is_ok() {
                            due.report.removed += 1;
                            due.removed.push((name.clone(), key, r.state));
                        }
                    }
                    Ok(r) => match look_again(&r, slot, now, rules) {
                        Look::InThisSlot => kept.push(key),
                        Look::At(later) => again.push((later, key)),
                        Look::NotedSince => {}
                    },
                }
            }
            // The notes for later go in before this entry goes, so that no
            // moment holds neither.
            again.sort_unstable_by_key(|(slot, _)| *slot);
            for group in again.chunk_by(|a, b| a.0 == b.0) {
                for chunk in group.chunks(MAX_KEYS_PER_ENTRY) {
                    let later = chunk.first().map_or(slot, |(later, _)| *later);
                    self.insert(later, &name, chunk.iter().map(|(_, key)| key))?;
                }
            }
            if kept.is_empty() {
                self.remove_entry(&entry_key)?;
            } else {
                self.tree
                    .insert(&entry_key, encode(&name, kept.iter()))
                    .map_err(Error::storage("writing the expiry index"))?;
            }
        }
        Ok(due)
    }

    /// Entries, notes and bytes of the index: one walk of it.
    pub(crate) fn size(&self) -> Result<(u64, u64, u64)> {
        let (mut entries, mut notes, mut bytes) = (0, 0, 0);
        for entry in self.tree.iter() {
            let (key, value) = entry.map_err(Error::storage("reading the expiry index"))?;
            entries += 1;
            bytes += (key.len() + value.len()) as u64;
            notes += decode(&value).map_or(0, |(_, keys)| keys.len() as u64);
        }
        Ok((entries, notes, bytes))
    }

    fn remove_entry(&self, key: &IVec) -> Result<()> {
        self.tree
            .remove(key)
            .map_err(Error::storage("removing an expiry index entry"))?;
        Ok(())
    }
}

/// What a sweep of an entry of `slot` does with a noted record it keeps.
#[derive(Debug, PartialEq, Eq)]
enum Look {
    /// It falls due later in this slot: keep it in this entry.
    InThisSlot,
    /// An expired claim, still remembered: note it again in this slot.
    At(u64),
    /// A write since this note noted it itself: drop this note.
    NotedSince,
}

/// When a sweep at `now` of an entry of `slot` must look again at `record`,
/// which it does not remove. A write notes its record at its expiry
/// (`Retention::due_at`); an expired claim that no write ended is still
/// remembered until `forgotten_at`, so the sweep of its expiry note (or of
/// an older one) notes it again then. A note in an earlier slot than the
/// record's expiry is a stale one: the write that set that expiry left
/// its own note.
fn look_again(record: &Record, slot: u64, now: u64, rules: Retention) -> Look {
    let due = rules.due_at(record, now) / SLOT_MS;
    if due <= slot {
        Look::InThisSlot
    } else if record.state == State::Pending
        && record.expires_at <= now
        && record.expires_at / SLOT_MS <= slot
    {
        Look::At(due)
    } else {
        Look::NotedSince
    }
}

/// Whether the index covers every record, and how many times it was found
/// not to: a full scan marks it complete only if nothing marked it
/// incomplete since the scan began.
#[derive(Debug)]
pub(crate) struct Completeness(AtomicU64);

impl Completeness {
    /// Bit 0: complete; the rest: times marked incomplete.
    fn new(complete: bool) -> Self {
        Completeness(AtomicU64::new(u64::from(complete)))
    }

    /// Does the index cover every record?
    pub(crate) fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst) & 1 == 1
    }

    /// Where a full scan starts: pass it to [`mark_complete`](Self::mark_complete).
    pub(crate) fn epoch(&self) -> u64 {
        self.0.load(Ordering::SeqCst) >> 1
    }

    /// Some record may have no note (an unreadable entry was dropped).
    pub(crate) fn mark_incomplete(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(((v >> 1) + 1) << 1)
            });
    }

    /// A full scan that began at `epoch` noted every record it kept: the
    /// index is complete, unless it was marked incomplete meanwhile.
    /// Returns whether it is complete now.
    pub(crate) fn mark_complete(&self, epoch: u64) -> bool {
        let _ = self.0.compare_exchange(
            epoch << 1,
            (epoch << 1) | 1,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        self.get()
    }
}

/// What one index sweep did.
#[derive(Debug)]
pub(crate) struct Due {
    pub(crate) report: SweepReport,
    /// The records removed: namespace, key, and the state each held.
    pub(crate) removed: Vec<(Arc<str>, [u8; 16], State)>,
    /// The entry to go on from: more due entries wait.
    pub(crate) next: Option<Vec<u8>>,
    /// The start of the slot of that entry (ms): how far behind the sweep
    /// is; `u64::MAX` when nothing more is due.
    pub(crate) oldest_due: u64,
}

fn entry_key(slot: u64, seq: u64) -> [u8; 16] {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&slot.to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn slot_of(entry_key: &[u8]) -> u64 {
    entry_key
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(u64::MAX, u64::from_be_bytes)
}

/// Version byte, namespace length (1 byte), namespace, keys (16 bytes each).
fn encode<'a>(space: &str, keys: impl ExactSizeIterator<Item = &'a [u8; 16]>) -> Vec<u8> {
    let mut value = Vec::with_capacity(2 + space.len() + 16 * keys.len());
    value.push(ENTRY_VERSION);
    // Namespace names are at most 64 bytes (`validate_namespace`).
    value.push(space.len() as u8);
    value.extend_from_slice(space.as_bytes());
    for key in keys {
        value.extend_from_slice(key);
    }
    value
}

fn decode(value: &[u8]) -> Option<(Arc<str>, Vec<[u8; 16]>)> {
    let (&version, rest) = value.split_first()?;
    let (&len, rest) = rest.split_first()?;
    if version != ENTRY_VERSION || rest.len() < usize::from(len) {
        return None;
    }
    let (name, keys) = rest.split_at(usize::from(len));
    let name = std::str::from_utf8(name).ok()?;
    let chunks = keys.chunks_exact(16);
    if !chunks.remainder().is_empty() {
        return None;
    }
    let keys = chunks
        .map(|k| <[u8; 16]>::try_from(k).ok())
        .collect::<Option<Vec<_>>>()?;
    Some((name.into(), keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Retention = Retention {
        done_ms: None,
        default_ttl_ms: 10,
        pending_ms: 500,
    };

    fn record(state: State, expires_at: u64, token: u64) -> Record {
        Record {
            state,
            expires_at,
            token,
            attempts: 1,
            ttl_ms: 10,
            fingerprint: None,
            result: None,
        }
    }

    fn setup() -> Result<(sled::Db, sled::Tree, Expiries)> {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(Error::storage("test"))?;
        let tree = db.open_tree("ns").map_err(Error::storage("test"))?;
        let meta = db.open_tree("meta").map_err(Error::storage("test"))?;
        let index = Expiries::open(&db, &meta, RULES.pending_ms, true)?;
        index.add_space("ns");
        Ok((db, tree, index))
    }

    fn put(ix: &Expiries, tree: &sled::Tree, k: u8, r: &Record) -> Result<()> {
        tree.insert([k; 16], r.encode())
            .map_err(Error::storage("test"))?;
        ix.note(0, [k; 16], RULES.due_at(r, 0));
        Ok(())
    }

    fn slots(ix: &Expiries) -> Result<Vec<u64>> {
        let mut slots = Vec::new();
        for entry in ix.tree.iter() {
            let (key, _) = entry.map_err(Error::storage("test"))?;
            slots.push(slot_of(&key));
        }
        Ok(slots)
    }

    fn sweep(ix: &Expiries, tree: &sled::Tree, now: u64) -> Result<Due> {
        let find = |name: &str| (name == "ns").then(|| tree.clone());
        let end = Expiries::due_end(now);
        ix.sweep_due(&find, now, RULES, (&[], &end, 10_000), &AtomicU64::new(0))
    }

    #[test]
    fn counts_round_trip_and_refuse_garbage() {
        let counts = Counts {
            exact: false,
            spaces: vec![("default".into(), 3, 4), ("a.b".into(), u64::MAX, 0)],
        };
        let value = counts.encode();
        assert_eq!(Counts::decode(&value), Some(counts));
        for cut in 0..value.len() {
            // Whole prefixes: no namespace yet, or only the first.
            if cut != 1 && cut != 1 + 1 + 7 + 16 {
                assert_eq!(Counts::decode(&value[..cut]), None, "cut at {cut}");
            }
        }
        let mut bad = value.clone();
        bad[0] = 2;
        assert_eq!(Counts::decode(&bad), None);
    }

    #[test]
    fn entries_round_trip_and_refuse_garbage() {
        let keys = [[1; 16], [2; 16]];
        assert_eq!(
            decode(&encode("a.b", keys.iter())),
            Some(("a.b".into(), keys.to_vec()))
        );
        let mut cut = encode("a", keys.iter());
        cut.pop();
        assert_eq!(decode(&cut), None);
        assert_eq!(decode(&[ENTRY_VERSION + 1, 0]), None);
        assert_eq!(decode(&[]), None);
    }

    /// A sweep reads the notes whose slot has begun, and nothing else.
    #[test]
    fn a_sweep_reads_only_due_notes() -> Result<()> {
        let (_db, tree, ix) = setup()?;
        put(&ix, &tree, 1, &record(State::Done, 1_000, 1))?;
        put(&ix, &tree, 2, &record(State::Done, 5_000, 2))?;
        // Pending: forgotten 500 ms after its expiry.
        put(&ix, &tree, 3, &record(State::Pending, 1_000, 3))?;
        let early = sweep(&ix, &tree, 999)?;
        assert_eq!((early.report.examined, early.report.removed), (0, 0));
        let first = sweep(&ix, &tree, 1_200)?;
        assert_eq!((first.report.examined, first.report.removed), (2, 1));
        assert!(tree.get([1; 16]).map_err(Error::storage("t"))?.is_none());
        // Key 3 stays noted within its slot until it is forgotten.
        let second = sweep(&ix, &tree, 1_500)?;
        assert_eq!((second.report.examined, second.report.removed), (1, 1));
        assert_eq!(sweep(&ix, &tree, 4_999)?.report.examined, 0);
        assert_eq!(sweep(&ix, &tree, 5_000)?.report.removed, 1);
        assert!(tree.is_empty());
        assert!(ix.tree.is_empty(), "every entry swept is gone");
        Ok(())
    }

    /// Notes kept for later in the current slot do not hold up a sweep
    /// that reads in small batches: each batch goes on after the last
    /// entry the one before read.
    #[test]
    fn batches_pass_over_what_they_keep() -> Result<()> {
        let (_db, tree, ix) = setup()?;
        for k in 0..200u8 {
            // Forgotten at 1,900: in the slot of `now`, not yet.
            put(&ix, &tree, k, &record(State::Done, 1_900, 1))?;
            ix.write()?; // one entry each
        }
        put(&ix, &tree, 255, &record(State::Done, 1_000, 1))?;
        let find = |name: &str| (name == "ns").then(|| tree.clone());
        let (mut from, mut batches, mut examined) = (Vec::new(), 0, 0);
        loop {
            let end = Expiries::due_end(1_500);
            let due = ix.sweep_due(&find, 1_500, RULES, (&from, &end, 16), &AtomicU64::new(0))?;
            (batches, examined) = (batches + 1, examined + due.report.examined);
            match due.next {
                Some(next) => from = next,
                None => break,
            }
            assert!(batches < 100, "the sweep keeps reading the same entries");
        }
        assert_eq!(examined, 201, "every note read once");
        assert!(tree.get([255; 16]).map_err(Error::storage("t"))?.is_none());
        assert_eq!(tree.len(), 200);
        Ok(())
    }

    /// An entry of a namespace the sweep does not know (one created while
    /// the batch waited for the store) is left for a later sweep, not
    /// dropped with its notes.
    #[test]
    fn entries_of_an_unknown_namespace_are_kept() -> Result<()> {
        let (_db, tree, ix) = setup()?;
        put(&ix, &tree, 1, &record(State::Done, 1_000, 1))?;
        let unknown = |_: &str| None;
        let end = Expiries::due_end(2_000);
        let due = ix.sweep_due(&unknown, 2_000, RULES, (&[], &end, 100), &AtomicU64::new(0))?;
        assert_eq!(due.report.removed, 0);
        assert_eq!(ix.tree.len(), 1, "the entry is still there");
        assert_eq!(sweep(&ix, &tree, 2_000)?.report.removed, 1);
        Ok(())
    }

    /// A record written again after its note drops the old note: the new
    /// write left its own.
    #[test]
    fn a_rewritten_record_is_swept_by_its_latest_note() -> Result<()> {
        let (_db, tree, ix) = setup()?;
        put(&ix, &tree, 1, &record(State::Pending, 1_000, 1))?;
        put(&ix, &tree, 1, &record(State::Done, 9_000, 1))?;
        let early = sweep(&ix, &tree, 2_000)?;
        assert_eq!((early.report.examined, early.report.removed), (1, 0));
        assert_eq!(ix.tree.len(), 1, "only the later note is left");
        assert_eq!(sweep(&ix, &tree, 9_000)?.report.removed, 1);
        Ok(())
    }

    /// Regression (a day of traffic): a claim was noted at the moment it
    /// would be forgotten, its expiry plus `pending_ms` (a day by default),
    /// and that note stayed after the claim was marked done, so a consumer
    /// kept one dead note per message for a day. A claim is noted at its
    /// expiry now: the note of a finished claim goes with its ttl.
    #[test]
    fn a_finished_claims_note_goes_with_its_ttl() -> Result<()> {
        let (_db, tree, ix) = setup()?;
        let day = Retention {
            pending_ms: 86_400_000,
            ..RULES
        };
        let mut claim = record(State::Pending, 1_000, 1);
        tree.insert([1; 16], claim.encode())
            .map_err(Error::storage("test"))?;
        ix.note(0, [1; 16], day.due_at(&claim, 0));
        (claim.state, claim.expires_at) = (State::Done, 61_000);
        tree.insert([1; 16], claim.encode())
            .map_err(Error::storage("test"))?;
        ix.note(0, [1; 16], day.due_at(&claim, 500));
        ix.write()?;
        assert_eq!(slots(&ix)?, [1, 61]);
        let find = |name: &str| (name == "ns").then(|| tree.clone());
        let now = 1_500;
        let end = Expiries::due_end(now);
        let due = ix.sweep_due(&find, now, day, (&[], &end, 100), &AtomicU64::new(0))?;
        assert_eq!((due.report.examined, due.report.removed), (1, 0));
        assert_eq!(slots(&ix)?, [61], "only the done record's note is left");
        Ok(())
    }

    /// A claim nobody ended is remembered after its expiry: the sweep of
    /// its expiry note notes it again at the moment it is forgotten, and
    /// the sweep then removes it.
    #[test]
    fn an_expired_claim_is_noted_again_until_it_is_forgotten() -> Result<()> {
        let (_db, tree, ix) = setup()?;
        let rules = Retention {
            pending_ms: 5_000,
            ..RULES
        };
        let claim = record(State::Pending, 1_000, 1);
        tree.insert([1; 16], claim.encode())
            .map_err(Error::storage("test"))?;
        ix.note(0, [1; 16], rules.due_at(&claim, 0));
        let find = |name: &str| (name == "ns").then(|| tree.clone());
        let sweep = |now: u64| {
            let end = Expiries::due_end(now);
            ix.sweep_due(&find, now, rules, (&[], &end, 100), &AtomicU64::new(0))
        };
        let at_expiry = sweep(1_200)?;
        assert_eq!(
            (at_expiry.report.examined, at_expiry.report.removed),
            (1, 0)
        );
        assert_eq!(slots(&ix)?, [6], "noted again at 6,000");
        assert_eq!(sweep(5_999)?.report.examined, 0);
        assert_eq!(sweep(6_000)?.report.removed, 1);
        assert!(tree.is_empty() && ix.tree.is_empty());
        Ok(())
    }

    /// What a sweep does with a record it keeps, case by case.
    #[test]
    fn look_again_cases() {
        let rules = Retention {
            pending_ms: 5_000,
            ..RULES
        };
        let pending = record(State::Pending, 1_500, 1);
        let done = record(State::Done, 1_500, 1);
        // Live, due later in the entry's slot: kept there.
        assert_eq!(look_again(&pending, 1, 1_200, rules), Look::InThisSlot);
        assert_eq!(look_again(&done, 1, 1_200, rules), Look::InThisSlot);
        // Expired and remembered: noted again when it is forgotten.
        assert_eq!(look_again(&pending, 1, 1_600, rules), Look::At(6));
        // A stale note from before a write that moved the expiry on.
        let extended = record(State::Pending, 9_000, 1);
        assert_eq!(look_again(&extended, 1, 1_600, rules), Look::NotedSince);
        assert_eq!(
            look_again(&record(State::Done, 9_000, 1), 1, 1_600, rules),
            Look::NotedSince
        );
    }

    /// Regression: a full scan ended by marking the index complete,
    /// whatever happened meanwhile, so a record named only by an entry a
    /// concurrent sweep dropped as unreadable escaped sweeping.
    #[test]
    fn a_scan_does_not_complete_an_index_marked_incomplete_meanwhile() {
        let complete = Completeness::new(false);
        let epoch = complete.epoch();
        complete.mark_incomplete();
        assert!(
            !complete.mark_complete(epoch),
            "marked incomplete during the scan"
        );
        let epoch = complete.epoch();
        assert!(complete.mark_complete(epoch));
        complete.mark_incomplete();
        assert!(!complete.get());
    }

    /// The marker: present after a seal, taken out by the next open, and
    /// not trusted under a longer pending retention.
    #[test]
    fn the_marker_is_written_by_seal_and_taken_by_open() -> Result<()> {
        let (db, _tree, ix) = setup()?;
        let meta = db.open_tree("meta").map_err(Error::storage("test"))?;
        ix.seal(Some(&Counts::default()), || Ok(()))?;
        assert!(Expiries::open(&db, &meta, RULES.pending_ms, false)?.complete());
        assert!(!Expiries::open(&db, &meta, RULES.pending_ms, false)?.complete());
        ix.seal(Some(&Counts::default()), || Ok(()))?;
        assert!(!Expiries::open(&db, &meta, RULES.pending_ms + 1, false)?.complete());
        let incomplete = Expiries::open(&db, &meta, RULES.pending_ms, false)?;
        let counts = Counts {
            exact: true,
            spaces: vec![("ns".into(), 1, 2)],
        };
        incomplete.seal(Some(&counts), || Ok(()))?;
        let reopened = Expiries::open(&db, &meta, RULES.pending_ms, false)?;
        assert!(!reopened.complete(), "an incomplete index writes no marker");
        assert_eq!(
            reopened.counts,
            Some(counts),
            "but the counts of a clean close are kept"
        );
        assert_eq!(
            Expiries::open(&db, &meta, RULES.pending_ms, false)?.counts,
            None,
            "and taken out by the open"
        );
        Ok(())
    }
}
