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
//! Opening with fewer segments than the directory holds is refused: the
//! ones left out could hold the newest entries.
//!
//! The unit on disk is the group, the entries one leader writes with one
//! fdatasync. It starts on a [`BLOCK`] boundary with a header
//! `crc: u32 | body: u32 | first: u64 | count: u32 | magic: u32` and goes on
//! with `count` entries `len: u32 | payload: [u8; len]` (`body` bytes in
//! all), numbered `first`, `first + 1`, …; it is padded with zeros to the
//! next block. All little-endian; `crc` is CRC-32 (crc32fast, already a
//! dependency of sled) of everything after it up to the end of the body, so
//! every entry is checksummed with its number. Sequence numbers (lsn) start
//! at 1 and increase by one per entry across groups, segments and reopens.
//!
//! One checksum per group, not per entry, is what makes a torn write
//! harmless: a group the power cut in the middle of is rejected whole, so
//! no entry of it can be found on its own at some block boundary later,
//! and the numbers it would have used are given out again after recovery
//! without ever meeting its remains. No durable block is written again
//! until its segment is reused, since each group starts a fresh block.
//! Segments are used in turn; a group goes to the next segment when it does
//! not fit in what is left of the current one.
//!
//! # Recovery
//!
//! Each segment is walked from its start, group after group, each found
//! where the previous one's padding ends, never by searching (a payload can
//! hold any bytes, including a well-formed group). A segment's chain ends
//! at the first group whose checksum fails or whose first number is not the
//! one after the previous group's last: a torn group, zeros, or what is
//! left of the segment's previous use, whose numbers are all lower. Chains
//! are joined in lsn order from the checkpoint on; entries from
//! `checkpoint + 1` to the first gap are returned for replay. Groups are
//! written one after the other, each only after the previous one's
//! fdatasync, so only the last group can be torn: a segment whose chain
//! begins beyond the gap was written after an entry that was durable, and
//! that entry has been damaged since. That is an error, never a silent
//! loss. (Damage inside a segment followed only by later groups of the
//! same segment ends its chain there too; those groups are not searched
//! for, for the reason above, and are lost with it.)
//!
//! # Reuse
//!
//! Writing into a segment overwrites its earlier entries, so it may only
//! start once every entry in it is covered by a checkpoint the owner
//! reported with [`Log::checkpointed`]. A group that needs a segment still
//! holding newer entries is left in the buffer; its waiters wait, without
//! blocking a thread, for a checkpoint, which [`Log::checkpoint_wanted`]
//! tells the owner to make.
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
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use tokio::sync::watch;

/// Groups start on and are padded to this boundary.
pub(crate) const BLOCK: usize = 4096;
/// `crc`, `body`, `first`, `count` and `magic`.
const GROUP_HEADER: usize = 24;
/// `len` before each payload.
const ENTRY_HEADER: usize = 4;
/// Largest payload an entry may carry.
pub(crate) const MAX_PAYLOAD: usize = 64 * 1024;
/// The last word of a group header: "WAL1".
const MAGIC: u32 = u32::from_le_bytes(*b"WAL1");
/// Segment files are named with four digits.
const MAX_SEGMENTS: usize = 10_000;

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
        let smallest = (GROUP_HEADER + ENTRY_HEADER + MAX_PAYLOAD).next_multiple_of(BLOCK) as u64;
        if !(2..=MAX_SEGMENTS).contains(&self.segments)
            || self.segment_bytes < smallest
            || self.segment_bytes > u64::from(u32::MAX)
            || !self.segment_bytes.is_multiple_of(BLOCK as u64)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a write-ahead log needs 2 to {MAX_SEGMENTS} segments of a multiple of \
                     {BLOCK} bytes, from {smallest} to 4 GiB; got {} of {}",
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

/// What the log's waiters and its owner watch.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    /// Every entry up to this lsn is durable.
    durable: u64,
    /// Every entry up to this lsn is covered by a checkpoint.
    checkpointed: u64,
    /// The next group waits for a checkpoint covering this lsn.
    wanted: u64,
    failed: bool,
}

impl Progress {
    fn blocked(&self) -> bool {
        self.wanted > self.checkpointed
    }
}

#[derive(Debug)]
struct State {
    next_lsn: u64,
    /// A placeholder for the group header, then the encoded entries not
    /// yet taken by a leader.
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
}

/// What a leader's turn did.
enum Step {
    /// Wrote a group.
    Wrote,
    /// The buffer was empty.
    Idle,
    /// The next group needs a segment no checkpoint has freed yet.
    Blocked,
}

/// A write-ahead log open for appending.
#[derive(Debug)]
pub(crate) struct Log {
    files: Vec<File>,
    segment_bytes: u64,
    state: Mutex<State>,
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

fn exhausted() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "the write-ahead log has used every sequence number",
    )
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
        refuse_extra_segments(dir, config.segments)?;
        let mut files = Vec::with_capacity(config.segments);
        let mut chains = Vec::with_capacity(config.segments);
        for n in 0..config.segments {
            let file = segment(dir, n, config.segment_bytes)?;
            chains.push(scan(&file, config.segment_bytes)?);
            files.push(file);
        }
        let (entries, end) = replay(dir, &chains, checkpointed)?;
        // Reuse waits for a checkpoint past every entry a segment's chain
        // holds; what lies beyond a chain's end is older or torn.
        let highest: Vec<u64> = chains
            .iter()
            .map(|c| c.last().map_or(0, |e| e.lsn))
            .collect();
        let newest = (0..highest.len()).max_by_key(|&n| highest[n]).unwrap_or(0);
        let next_lsn = end
            .max(highest[newest])
            .checked_add(1)
            .ok_or_else(exhausted)?;
        let state = State {
            next_lsn,
            buf: vec![0; GROUP_HEADER],
            ends: Vec::new(),
            spare: (Vec::new(), Vec::new()),
            leading: false,
            // Full: the first group goes to the segment after the newest.
            segment: newest,
            offset: config.segment_bytes,
            highest,
        };
        let log = Log {
            files,
            segment_bytes: config.segment_bytes,
            state: Mutex::new(state),
            progress: watch::channel(Progress {
                durable: end,
                checkpointed,
                wanted: 0,
                failed: false,
            })
            .0,
            failure: OnceLock::new(),
            #[cfg(test)]
            faults: Mutex::new(Vec::new()),
        };
        Ok((log, entries))
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
        let mut state = self.state();
        let lsn = state.next_lsn;
        state.next_lsn = lsn.checked_add(1).ok_or_else(exhausted)?;
        let buf = &mut state.buf;
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(payload);
        let end = buf.len();
        state.ends.push((end, lsn));
        Ok(lsn)
    }

    /// Every entry up to this lsn is durable.
    pub(crate) fn durable(&self) -> u64 {
        self.progress.borrow().durable
    }

    /// Returns once an fdatasync covers `lsn`, leading a group when nobody
    /// else is writing. Fails once the log is latched, and for an lsn that
    /// was never appended (without latching: the log is fine).
    pub(crate) async fn wait(self: &Arc<Self>, lsn: u64) -> io::Result<()> {
        let appended = self.appended();
        if lsn > appended {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("entry {lsn} was never appended; the last one is {appended}"),
            ));
        }
        let mut progress = self.progress.subscribe();
        loop {
            let seen = *progress.borrow_and_update();
            if seen.durable >= lsn {
                return Ok(());
            }
            if seen.failed {
                return Err(self.latched());
            }
            // While the next group waits for a checkpoint nobody leads: the
            // wait below is for the owner's checkpoint, on no thread.
            let lead = !seen.blocked() && {
                let mut state = self.state();
                !std::mem::replace(&mut state.leading, true)
            };
            if lead {
                let log = self.clone();
                off_the_runtime(move || log.lead(lsn)).await;
                continue;
            }
            // The leader clears `leading` before it publishes progress, and
            // `checkpointed` publishes too, so a state seen above changes
            // after the borrow: no lost wake-up.
            if progress.changed().await.is_err() {
                return Err(self.latched());
            }
        }
    }

    /// Writes groups until `lsn` is durable, the log fails or the next
    /// group must wait for a checkpoint, then stops leading. Blocking.
    fn lead(&self, lsn: u64) {
        let _leading = Leading { log: self };
        while self.durable() < lsn && self.failure.get().is_none() {
            match self.group() {
                Ok(Step::Wrote) => {}
                Ok(Step::Blocked) => return,
                // Only one leader writes at a time, and each writes every
                // group it takes before it stops, so an appended entry that
                // is not durable is in the buffer.
                Ok(Step::Idle) => {
                    self.fail(&format!("entry {lsn} is neither buffered nor durable"))
                }
                Err(e) => self.fail(&e.to_string()),
            }
        }
    }

    /// Writes and fdatasyncs the buffered entries (as many as one segment
    /// holds) as one group.
    fn group(&self) -> io::Result<Step> {
        let mut state = self.state();
        if state.ends.is_empty() {
            return Ok(Step::Idle);
        }
        // A group larger than a segment leaves its tail to the next one.
        let fits = state
            .ends
            .partition_point(|&(end, _)| padded(end) <= self.segment_bytes);
        if fits == 0 {
            // `Config::check` makes every segment hold a largest entry.
            return Err(io::Error::other("a log entry is larger than a segment"));
        }
        let cut = state.ends[fits - 1].0;
        let size = padded(cut);
        if state.offset + size > self.segment_bytes {
            let next = (state.segment + 1) % self.files.len();
            let holds = state.highest[next];
            if holds > self.progress.borrow().checkpointed {
                // Left in the buffer; `checkpointed` wakes the waiters.
                drop(state);
                self.progress
                    .send_modify(|p| p.wanted = p.wanted.max(holds));
                return Ok(Step::Blocked);
            }
            state.segment = next;
            state.offset = 0;
        }
        let (mut spare_buf, spare_ends) = std::mem::take(&mut state.spare);
        spare_buf.resize(GROUP_HEADER, 0);
        let mut bytes = std::mem::replace(&mut state.buf, spare_buf);
        let mut ends = std::mem::replace(&mut state.ends, spare_ends);
        if fits < ends.len() {
            state.buf.extend_from_slice(&bytes[cut..]);
            state.ends.extend(
                ends[fits..]
                    .iter()
                    .map(|&(end, lsn)| (end - cut + GROUP_HEADER, lsn)),
            );
            bytes.truncate(cut);
            ends.truncate(fits);
        }
        let (first, last) = (ends[0].1, ends[fits - 1].1);
        let (segment, offset) = (state.segment, state.offset);
        state.offset += size;
        state.highest[segment] = last;
        drop(state);

        seal(&mut bytes, first, fits as u32);
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
        Ok(Step::Wrote)
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
        self.progress
            .send_modify(|p| p.checkpointed = p.checkpointed.max(lsn));
    }

    /// Returns, once the next group waits for a segment to be freed, the
    /// lsn a checkpoint must cover to free it; fails once the log is
    /// latched. The owner's checkpointer waits here.
    pub(crate) async fn checkpoint_wanted(&self) -> io::Result<u64> {
        let mut progress = self.progress.subscribe();
        loop {
            let seen = *progress.borrow_and_update();
            if seen.failed {
                return Err(self.latched());
            }
            if seen.blocked() {
                return Ok(seen.wanted);
            }
            if progress.changed().await.is_err() {
                return Err(self.latched());
            }
        }
    }

    /// The highest lsn handed out so far.
    pub(crate) fn appended(&self) -> u64 {
        self.state().next_lsn - 1
    }

    /// Latches the log with `cause` (the first one wins).
    pub(crate) fn fail(&self, cause: &str) {
        let _ = self.failure.set(cause.to_string());
        self.progress.send_modify(|p| p.failed = true);
    }

    /// Fails once the log is latched.
    pub(crate) fn check(&self) -> io::Result<()> {
        match self.failure.get() {
            Some(_) => Err(self.latched()),
            None => Ok(()),
        }
    }

    /// The error every operation of a latched log returns.
    fn latched(&self) -> io::Error {
        let cause = self.failure.get().map_or("unknown", String::as_str);
        io::Error::other(format!(
            "the write-ahead log failed earlier and acknowledges nothing until it is opened again: {cause}"
        ))
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

/// Fills in the header of `group` (its body follows the header).
fn seal(group: &mut [u8], first: u64, count: u32) {
    let body = (group.len() - GROUP_HEADER) as u32;
    group[4..8].copy_from_slice(&body.to_le_bytes());
    group[8..16].copy_from_slice(&first.to_le_bytes());
    group[16..20].copy_from_slice(&count.to_le_bytes());
    group[20..24].copy_from_slice(&MAGIC.to_le_bytes());
    let crc = crc32fast::hash(&group[4..]);
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

/// Refuses a directory holding segment files past the configured number:
/// left out, they could hold the newest entries.
fn refuse_extra_segments(dir: &Path, segments: usize) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|name| name.strip_suffix(".wal"))
            .filter(|n| n.len() == 4)
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if n >= segments {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the write-ahead log in {} has segment {n}, but is opened with {segments} \
                     segments: open it with at least {}",
                    dir.display(),
                    n + 1
                ),
            ));
        }
    }
    Ok(())
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

/// The chain a segment holds: the entries of its valid groups from its
/// start, in order, each group numbered on from the one before.
fn scan(file: &File, bytes: u64) -> io::Result<Vec<Entry>> {
    let mut data = Vec::with_capacity(bytes as usize);
    (&*file).read_to_end(&mut data)?;
    let mut chain: Vec<Entry> = Vec::new();
    let mut at = 0usize;
    while let Some((entries, end)) = parse(&data, at) {
        let follows = match chain.last() {
            Some(previous) => previous.lsn.checked_add(1) == entries.first().map(|e| e.lsn),
            None => true,
        };
        if !follows {
            break; // what is left of the segment's previous use
        }
        chain.extend(entries);
        at = end.next_multiple_of(BLOCK);
    }
    Ok(chain)
}

/// The group at `at` if it is whole and its checksum holds: its entries
/// and where its body ends.
fn parse(data: &[u8], at: usize) -> Option<(Vec<Entry>, usize)> {
    let header = data.get(at..at.checked_add(GROUP_HEADER)?)?;
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (crc, body, count, magic) = (word(0), word(4) as usize, word(16), word(20));
    let first = u64::from_le_bytes(header[8..16].try_into().ok()?);
    if magic != MAGIC || count == 0 {
        return None;
    }
    let end = (at + GROUP_HEADER).checked_add(body)?;
    let sealed = data.get(at + 4..end)?;
    if crc32fast::hash(sealed) != crc {
        return None;
    }
    first.checked_add(u64::from(count) - 1)?;
    let mut entries = Vec::with_capacity(count as usize);
    let mut next = at + GROUP_HEADER;
    for i in 0..u64::from(count) {
        let len = data.get(next..next + ENTRY_HEADER)?;
        let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
        let payload = data.get(next + ENTRY_HEADER..(next + ENTRY_HEADER).checked_add(len)?)?;
        if len == 0 || len > MAX_PAYLOAD || next + ENTRY_HEADER + len > end {
            return None;
        }
        entries.push(Entry {
            lsn: first + i,
            payload: payload.to_vec(),
        });
        next += ENTRY_HEADER + len;
    }
    (next == end).then_some((entries, end))
}

/// Joins the segments' chains from `checkpointed + 1` to the first gap.
/// Returns the entries and the last lsn returned (or `checkpointed`).
fn replay(dir: &Path, chains: &[Vec<Entry>], checkpointed: u64) -> io::Result<(Vec<Entry>, u64)> {
    let mut out = Vec::new();
    let mut end = checkpointed;
    while let Some(chain) = chains.iter().find(|c| {
        c.first().is_some_and(|e| e.lsn <= end.saturating_add(1))
            && c.last().is_some_and(|e| e.lsn > end)
    }) {
        let from = chain.partition_point(|e| e.lsn <= end);
        out.extend_from_slice(&chain[from..]);
        end = chain.last().map_or(end, |e| e.lsn);
    }
    for (n, chain) in chains.iter().enumerate() {
        if let Some(first) = chain.first().map(|e| e.lsn)
            && first > end.saturating_add(1)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the write-ahead log in {} is damaged: entry {} cannot be read, and \
                     segment {n} begins at entry {first}, written after it was durable",
                    dir.display(),
                    end.saturating_add(1),
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
