//! The store's own write-ahead log: appended entries made durable by one
//! write and one fdatasync per group, in preallocated segment files that are
//! written over, never grown.
//!
//! This module is the log alone: it knows bytes and sequence numbers, not
//! records. It depends on `std`, `tokio` and `crc32fast` only, so that
//! `compare/` can measure it on its own against the device.
//!
//! # On disk
//!
//! A log is `segments` files `0000.wal`, `0001.wal`, … in one directory,
//! each exactly `segment_bytes` long, created full of zeros (written, not
//! `fallocate`d: an unwritten extent would make the first write of each
//! block commit an extent conversion) under a temporary name, synced,
//! renamed and the directory synced. After that a segment's size never
//! changes, so its fdatasync commits data only: one device round trip.
//!
//! An entry is `crc: u32 | len: u32 | payload: [u8; len] | lsn: u64`, all
//! little-endian; `crc` is CRC-32 (crc32fast, already a dependency of sled)
//! of everything after it. The top bit of `len` marks the first entry of a
//! group. Sequence numbers (lsn) start at 1 and increase by one per entry
//! across segments and reopens.
//!
//! A group (the entries one leader writes) starts on a [`BLOCK`] boundary and
//! is padded with zeros to the next one, so no block that an fdatasync has
//! made durable is ever written again until its segment is reused: a torn
//! write can only damage the group it belongs to, which nobody was told is
//! durable. Segments are used in turn; a group goes to the next segment when
//! it does not fit in what is left of the current one.
//!
//! # Recovery
//!
//! Each segment is read from its start, entry after entry (inside a group
//! the next entry follows at once, its header possibly straddling a block
//! boundary; where none does, a group's first entry may start the next
//! block),
//! and its chain ends at the first entry whose checksum fails or whose lsn
//! is not the one after the previous: a torn entry, zeros, or what is left
//! of the segment's previous use, whose numbers are all lower. Chains are
//! joined in lsn order from the checkpoint on; entries from `checkpoint + 1`
//! to the first gap are returned for replay. Groups are written one after
//! the other, each only after the previous one's fdatasync, so only the
//! last group can be torn: a valid first entry of a group beyond the gap,
//! found at any block boundary of any segment, means an entry that was
//! durable has been damaged since. That is an error, never a silent loss.
//!
//! # Reuse
//!
//! Writing into a segment overwrites its earlier entries, so it may only
//! start once every entry in it is covered by a checkpoint the owner
//! reported with [`Log::checkpointed`]. A leader that needs a segment
//! still holding newer entries waits for that checkpoint.
//!
//! # Group commit
//!
//! [`Log::append`] puts an entry in the buffer and returns its lsn; it
//! never waits for I/O. [`Log::wait`] returns once an fdatasync covers that
//! lsn. The first waiter that finds nobody writing becomes the leader: it
//! takes the whole buffer, writes it and fdatasyncs on its own thread
//! (`block_in_place` on a multi-thread runtime, so a lone writer pays no
//! hand-off; `spawn_blocking` on a current-thread one), and stops leading
//! once its own entry is durable. Entries appended meanwhile form the next
//! group, led by one of their waiters.
//!
//! # Failures
//!
//! The first failed write or fdatasync latches the log: Linux may have
//! dropped the failed pages, so nothing after it is acknowledged, every
//! waiter and every later append fails, until the log is opened again.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};

use tokio::sync::watch;

/// Groups start on and are padded to this boundary.
pub(crate) const BLOCK: usize = 4096;
/// `crc` and `len`.
const HEADER: usize = 8;
/// The lsn after the payload.
const TRAILER: usize = 8;
/// Largest payload an entry may carry.
pub(crate) const MAX_PAYLOAD: usize = 64 * 1024;
/// Set in `len` on the first entry of each group.
const GROUP_START: u32 = 1 << 31;

/// How many segments, and how large.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    /// Bytes in each segment file; a multiple of [`BLOCK`] that holds at
    /// least one largest entry.
    pub(crate) segment_bytes: u64,
    /// How many segment files are used in turn; at least two, so that one
    /// can be written while the other waits for its checkpoint.
    pub(crate) segments: usize,
}

impl Config {
    fn check(&self) -> io::Result<()> {
        let smallest = (HEADER + MAX_PAYLOAD + TRAILER).next_multiple_of(BLOCK) as u64;
        if self.segments < 2
            || self.segment_bytes < smallest
            || !self.segment_bytes.is_multiple_of(BLOCK as u64)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a write-ahead log needs at least 2 segments of a multiple of {BLOCK} bytes, \
                     at least {smallest}; got {} of {}",
                    self.segments, self.segment_bytes
                ),
            ));
        }
        Ok(())
    }
}

/// One entry found by recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) lsn: u64,
    pub(crate) payload: Vec<u8>,
}

/// What the log's waiters watch.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    /// Every entry up to this lsn is durable.
    durable: u64,
    failed: bool,
}

#[derive(Debug)]
struct State {
    next_lsn: u64,
    /// Encoded entries not yet taken by a leader.
    buf: Vec<u8>,
    /// End offset in `buf` and lsn of each entry in it.
    ends: Vec<(usize, u64)>,
    /// The buffers a leader gave back, kept for their capacity.
    spare: (Vec<u8>, Vec<(usize, u64)>),
    leading: bool,
    /// Where the next group goes.
    segment: usize,
    offset: u64,
    /// The highest lsn written into each segment.
    highest: Vec<u64>,
    /// Every entry up to this lsn is covered by a checkpoint.
    checkpointed: u64,
}

/// A write-ahead log open for appending.
#[derive(Debug)]
pub(crate) struct Log {
    dir: PathBuf,
    files: Vec<File>,
    segment_bytes: u64,
    state: Mutex<State>,
    /// Signalled when a checkpoint may free a segment, or on failure.
    freed: Condvar,
    progress: watch::Sender<Progress>,
    failure: OnceLock<String>,
    /// Fault seam: faults met by the next groups, last first.
    #[cfg(test)]
    faults: Mutex<Vec<Fault>>,
}

/// A fault injected into the next group's I/O.
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fault {
    /// The write fails.
    Write,
    /// The fdatasync fails.
    Sync,
}

impl Log {
    /// Opens the log in `dir` (creating its segments on first use) and
    /// returns, in order, the entries after `checkpointed` that must be
    /// replayed. Appending may overwrite none of them until the owner
    /// reports a checkpoint covering them.
    pub(crate) fn open(
        dir: &Path,
        config: Config,
        checkpointed: u64,
    ) -> io::Result<(Log, Vec<Entry>)> {
        config.check()?;
        let fresh = !dir.exists();
        std::fs::create_dir_all(dir)?;
        if fresh && let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        let mut files = Vec::with_capacity(config.segments);
        let mut scans = Vec::with_capacity(config.segments);
        for n in 0..config.segments {
            let file = segment(dir, n, config.segment_bytes)?;
            scans.push(scan(&file, config.segment_bytes)?);
            files.push(file);
        }
        let (entries, end) = replay(dir, &scans, checkpointed)?;
        // Reuse waits for a checkpoint past every entry a segment holds,
        // readable or not: a group start beyond a segment's chain counts.
        let highest: Vec<u64> = scans
            .iter()
            .map(|s| {
                let chained = s.chain.last().map_or(0, |e| e.lsn);
                s.group_starts.iter().copied().fold(chained, u64::max)
            })
            .collect();
        let newest = (0..highest.len()).max_by_key(|&n| highest[n]).unwrap_or(0);
        let state = State {
            next_lsn: end.max(highest[newest]) + 1,
            buf: Vec::new(),
            ends: Vec::new(),
            spare: (Vec::new(), Vec::new()),
            leading: false,
            // Full: the first group goes to the segment after the newest.
            segment: newest,
            offset: config.segment_bytes,
            highest,
            checkpointed,
        };
        let log = Log {
            dir: dir.to_path_buf(),
            files,
            segment_bytes: config.segment_bytes,
            state: Mutex::new(state),
            freed: Condvar::new(),
            progress: watch::channel(Progress {
                durable: end,
                failed: false,
            })
            .0,
            failure: OnceLock::new(),
            #[cfg(test)]
            faults: Mutex::new(Vec::new()),
        };
        Ok((log, entries))
    }

    /// The directory the segments are in.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Plain numbers and buffers; a panic cannot leave them half-updated
        // in a way a later group could not write.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts an entry in the buffer and returns its lsn. Never waits for
    /// I/O; [`Log::wait`] makes it durable.
    pub(crate) fn append(&self, payload: &[u8]) -> io::Result<u64> {
        self.check()?;
        if payload.is_empty() || payload.len() > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a log entry carries 1 to {MAX_PAYLOAD} bytes, not {}",
                    payload.len()
                ),
            ));
        }
        let len = (payload.len() as u32).to_le_bytes();
        // Hashed before the lock; only the lsn is hashed under it.
        let mut crc = crc32fast::Hasher::new();
        crc.update(&len);
        crc.update(payload);
        let mut state = self.state();
        let lsn = state.next_lsn;
        state.next_lsn += 1;
        crc.update(&lsn.to_le_bytes());
        let buf = &mut state.buf;
        buf.extend_from_slice(&crc.finalize().to_le_bytes());
        buf.extend_from_slice(&len);
        buf.extend_from_slice(payload);
        buf.extend_from_slice(&lsn.to_le_bytes());
        let end = buf.len();
        state.ends.push((end, lsn));
        Ok(lsn)
    }

    /// Every entry up to this lsn is durable.
    pub(crate) fn durable(&self) -> u64 {
        self.progress.borrow().durable
    }

    /// Returns once an fdatasync covers `lsn`, leading a group when nobody
    /// else is writing. Fails once the log is latched.
    pub(crate) async fn wait(self: &Arc<Self>, lsn: u64) -> io::Result<()> {
        let mut progress = self.progress.subscribe();
        loop {
            let seen = *progress.borrow_and_update();
            if seen.durable >= lsn {
                return Ok(());
            }
            if seen.failed {
                return self.check();
            }
            let lead = {
                let mut state = self.state();
                !std::mem::replace(&mut state.leading, true)
            };
            if lead {
                let log = self.clone();
                off_the_runtime(move || log.lead(lsn)).await;
                continue;
            }
            // The leader clears `leading` before it publishes progress, so a
            // leader seen above publishes after the borrow: no lost wake-up.
            if progress.changed().await.is_err() {
                return self.check();
            }
        }
    }

    /// Writes groups until `lsn` is durable or the log fails, then stops
    /// leading. Blocking.
    fn lead(&self, lsn: u64) {
        let _leading = Leading { log: self };
        while self.durable() < lsn && self.failure.get().is_none() {
            match self.group() {
                Ok(true) => {}
                // Only one leader writes at a time, and each writes every
                // group it takes before it stops, so an entry that is not
                // durable is in the buffer.
                Ok(false) => self.fail(&format!("entry {lsn} is neither buffered nor durable")),
                Err(e) => self.fail(&e.to_string()),
            }
        }
    }

    /// Writes and fdatasyncs the buffered entries (as many as one segment
    /// holds) as one group. False when there was nothing to write.
    fn group(&self) -> io::Result<bool> {
        let mut state = self.state();
        if state.ends.is_empty() {
            return Ok(false);
        }
        let spare = std::mem::take(&mut state.spare);
        let mut bytes = std::mem::replace(&mut state.buf, spare.0);
        let mut ends = std::mem::replace(&mut state.ends, spare.1);
        // A group larger than a segment leaves its tail to the next one.
        let fits = ends.partition_point(|&(end, _)| padded(end) <= self.segment_bytes);
        if fits == 0 {
            // `Config::check` makes every segment hold a largest entry.
            return Err(io::Error::other("a log entry is larger than a segment"));
        }
        if fits < ends.len() {
            let cut = ends[fits - 1].0;
            state.buf.extend_from_slice(&bytes[cut..]);
            state
                .ends
                .extend(ends[fits..].iter().map(|&(end, lsn)| (end - cut, lsn)));
            bytes.truncate(cut);
            ends.truncate(fits);
        }
        let last = ends.last().map_or(0, |&(_, lsn)| lsn);
        let size = padded(bytes.len());
        if state.offset + size > self.segment_bytes {
            let next = (state.segment + 1) % self.files.len();
            while state.highest[next] > state.checkpointed {
                self.check()?;
                state = self
                    .freed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            state.segment = next;
            state.offset = 0;
        }
        let (segment, offset) = (state.segment, state.offset);
        state.offset += size;
        state.highest[segment] = last;
        drop(state);

        mark_group_start(&mut bytes);
        bytes.resize(size as usize, 0);
        self.write(segment, &bytes, offset)?;

        bytes.clear();
        ends.clear();
        let mut state = self.state();
        if state.spare.0.capacity() < bytes.capacity() {
            state.spare = (bytes, ends);
        }
        drop(state);
        self.progress
            .send_modify(|p| p.durable = p.durable.max(last));
        Ok(true)
    }

    fn write(&self, segment: usize, bytes: &[u8], offset: u64) -> io::Result<()> {
        let file = &self.files[segment];
        #[cfg(test)]
        let fault = self.faults.lock().ok().and_then(|mut f| f.pop());
        #[cfg(test)]
        if let Some(Fault::Write) = fault {
            return Err(io::Error::other("injected write error"));
        }
        write_at(file, bytes, offset).map_err(|e| {
            annotate(
                e,
                &format!("writing segment {segment} of the write-ahead log"),
            )
        })?;
        #[cfg(test)]
        if let Some(Fault::Sync) = fault {
            return Err(io::Error::other("injected fdatasync error"));
        }
        file.sync_data().map_err(|e| {
            annotate(
                e,
                &format!("fdatasync of segment {segment} of the write-ahead log"),
            )
        })
    }

    /// The owner made every entry up to `lsn` durable elsewhere (a
    /// checkpoint): segments holding nothing newer may be written over.
    pub(crate) fn checkpointed(&self, lsn: u64) {
        let mut state = self.state();
        state.checkpointed = state.checkpointed.max(lsn);
        drop(state);
        self.freed.notify_all();
    }

    /// The highest lsn handed out so far.
    pub(crate) fn appended(&self) -> u64 {
        self.state().next_lsn - 1
    }

    /// Latches the log with `cause` (the first one wins).
    pub(crate) fn fail(&self, cause: &str) {
        let _ = self.failure.set(cause.to_string());
        self.progress.send_modify(|p| p.failed = true);
        // A leader waiting for a checkpoint gives up.
        drop(self.state());
        self.freed.notify_all();
    }

    /// Fails once the log is latched.
    pub(crate) fn check(&self) -> io::Result<()> {
        match self.failure.get() {
            Some(cause) => Err(io::Error::other(format!(
                "the write-ahead log failed earlier and acknowledges nothing until it is opened again: {cause}"
            ))),
            None => Ok(()),
        }
    }

    /// Fault seam: the next group meets `fault`.
    #[cfg(test)]
    pub(crate) fn inject(&self, fault: Fault) {
        if let Ok(mut faults) = self.faults.lock() {
            faults.push(fault);
        }
    }
}

/// Clears `leading` and publishes progress when the leader is done, also
/// when it unwinds (a panic latches: its group's fate is unknown).
struct Leading<'a> {
    log: &'a Log,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.log.fail("a write-ahead log leader panicked");
        }
        self.log.state().leading = false;
        // Wakes the waiters, one of which leads the next group.
        self.log.progress.send_modify(|_| {});
    }
}

/// Runs blocking `job` without blocking the runtime's other tasks.
async fn off_the_runtime<F: FnOnce() + Send + 'static>(job: F) {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(job)
        }
        // The job finishes even if this future is dropped; a panic in it
        // has latched the log already.
        Ok(_) => {
            let _ = tokio::task::spawn_blocking(job).await;
        }
        Err(_) => job(),
    }
}

/// Sets [`GROUP_START`] on the entry at the start of `group`, and its
/// checksum again.
fn mark_group_start(group: &mut [u8]) {
    let len = u32::from_le_bytes(word(group, 4)) | GROUP_START;
    group[4..HEADER].copy_from_slice(&len.to_le_bytes());
    let end = HEADER + (len & !GROUP_START) as usize + TRAILER;
    let crc = crc32fast::hash(&group[4..end]);
    group[..4].copy_from_slice(&crc.to_le_bytes());
}

/// `len` rounded up to a whole number of blocks.
fn padded(len: usize) -> u64 {
    len.next_multiple_of(BLOCK) as u64
}

fn annotate(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(unix)]
fn write_at(file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, offset)
}

#[cfg(windows)]
fn write_at(file: &File, mut bytes: &[u8], mut offset: u64) -> io::Result<()> {
    while !bytes.is_empty() {
        let n = std::os::windows::fs::FileExt::seek_write(file, bytes, offset)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
        offset += n as u64;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    // Windows cannot open a directory to sync it; NTFS journals renames.
    if cfg!(windows) {
        return Ok(());
    }
    File::open(dir).and_then(|d| d.sync_all())
}

/// Opens segment `n`, creating it full of zeros if it is not there.
fn segment(dir: &Path, n: usize, bytes: u64) -> io::Result<File> {
    let path = dir.join(format!("{n:04}.wal"));
    if !path.exists() {
        let tmp = dir.join(format!("{n:04}.wal.tmp"));
        let mut file = File::create(&tmp)?;
        let zeros = vec![0u8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(zeros.len() as u64);
            file.write_all(&zeros[..n as usize])?;
            left -= n;
        }
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, &path)?;
        sync_dir(dir)?;
    }
    let file = OpenOptions::new().read(true).write(true).open(&path)?;
    let len = file.metadata()?.len();
    if len != bytes {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is {len} bytes, not the {bytes} a segment of this log has",
                path.display()
            ),
        ));
    }
    Ok(file)
}

/// What one segment holds: the valid entries at its start, in order, and
/// the lsns of the first entries of groups found at any block boundary.
#[derive(Debug, Default)]
struct Scan {
    chain: Vec<Entry>,
    group_starts: Vec<u64>,
}

fn scan(file: &File, bytes: u64) -> io::Result<Scan> {
    let mut data = Vec::with_capacity(bytes as usize);
    (&*file).read_to_end(&mut data)?;
    let mut chain: Vec<Entry> = Vec::new();
    let mut at = 0usize;
    loop {
        // Inside a group the next entry follows at once (its header may
        // straddle a block boundary); after a group's zero padding it starts
        // the next block.
        let found = parse(&data, at).map(|(entry, _)| (entry, at)).or_else(|| {
            let block = at.next_multiple_of(BLOCK);
            match parse(&data, block) {
                Some((entry, true)) => Some((entry, block)),
                _ => None,
            }
        });
        let Some((entry, from)) = found else { break };
        if chain
            .last()
            .is_some_and(|previous| entry.lsn != previous.lsn + 1)
        {
            break; // what is left of the segment's previous use
        }
        at = from + HEADER + entry.payload.len() + TRAILER;
        chain.push(entry);
    }
    let group_starts = (0..data.len())
        .step_by(BLOCK)
        .filter_map(|at| match parse(&data, at) {
            Some((entry, true)) => Some(entry.lsn),
            _ => None,
        })
        .collect();
    Ok(Scan {
        chain,
        group_starts,
    })
}

/// The entry at `at` if it is whole and its checksum holds, and whether it
/// starts a group.
fn parse(data: &[u8], at: usize) -> Option<(Entry, bool)> {
    let flagged = u32::from_le_bytes(word(data, at + 4));
    let len = (flagged & !GROUP_START) as usize;
    if len == 0 || len > MAX_PAYLOAD || at + HEADER + len + TRAILER > data.len() {
        return None;
    }
    let crc = u32::from_le_bytes(word(data, at));
    if crc32fast::hash(&data[at + 4..at + HEADER + len + TRAILER]) != crc {
        return None;
    }
    let lsn_at = at + HEADER + len;
    let lsn = u64::from_le_bytes(data[lsn_at..lsn_at + TRAILER].try_into().ok()?);
    let entry = Entry {
        lsn,
        payload: data[at + HEADER..lsn_at].to_vec(),
    };
    Some((entry, flagged & GROUP_START != 0))
}

/// The four bytes at `at`, zeros past the end.
fn word(data: &[u8], at: usize) -> [u8; 4] {
    data.get(at..at + 4)
        .and_then(|w| w.try_into().ok())
        .unwrap_or([0; 4])
}

/// Joins the segments' chains from `checkpointed + 1` to the first gap.
/// Returns the entries and the last lsn returned (or `checkpointed`).
fn replay(dir: &Path, scans: &[Scan], checkpointed: u64) -> io::Result<(Vec<Entry>, u64)> {
    let mut out = Vec::new();
    let mut end = checkpointed;
    while let Some(chain) = scans.iter().map(|s| &s.chain).find(|c| {
        c.first().is_some_and(|e| e.lsn <= end + 1) && c.last().is_some_and(|e| e.lsn > end)
    }) {
        let from = chain.partition_point(|e| e.lsn <= end);
        out.extend_from_slice(&chain[from..]);
        end = chain.last().map_or(end, |e| e.lsn);
    }
    for (n, scan) in scans.iter().enumerate() {
        if let Some(&lsn) = scan.group_starts.iter().find(|&&lsn| lsn > end) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the write-ahead log in {} is damaged: entry {} cannot be read, and \
                     segment {n} holds a later group starting at entry {lsn}, written after \
                     it was durable",
                    dir.display(),
                    end + 1,
                ),
            ));
        }
    }
    Ok((out, end))
}

// Named by path so that `compare/`, which compiles this file on its own,
// finds it too.
#[cfg(test)]
#[path = "wal/tests.rs"]
mod tests;
