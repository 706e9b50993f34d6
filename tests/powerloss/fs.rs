//! A test-only, in-memory FUSE file system that can lose power.
//!
//! Every regular file has a *live* content (what reads see) and a *durable*
//! content (what a power cut leaves). Writes and truncations change the live
//! content only; an `fsync`/`fdatasync` of the file copies live to durable.
//! Every directory has live and durable entries in the same way: creating,
//! renaming, linking or removing a name changes the live entries only; an
//! `fsync` of the directory makes its entries durable. A file reachable only
//! through a non-durable entry is gone after a cut.
//!
//! [`PowerLossFs::cut`] unmounts, throws away everything volatile (see
//! [`Model`]) and mounts again, so no kernel cache survives the cut. Every
//! file is opened `direct_io` and writeback caching is never enabled, so the
//! kernel's page cache never holds file data that the file system has not
//! seen.
//!
//! Mounting uses fuser without libfuse: as root, fuser calls mount(2) on
//! `/dev/fuse` itself (`fusermount` is only needed by non-root users, which
//! these tests do not support). Locks (`flock`, `fcntl`) are not
//! implemented here, so the kernel handles them locally, per mount.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

/// Unit of tearing and of dirty tracking.
pub const PAGE: usize = 4096;
const ROOT: u64 = 1;
/// File type bits of a mode, and the type of a regular file (`st_mode`).
const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
/// Nothing is cached by the kernel: every lookup and attribute comes from
/// the model, so a reply can never be stale.
const TTL: Duration = Duration::ZERO;

/// What a power cut keeps of data written since the last `fsync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// Everything not synced is lost: each file goes back to its durable
    /// content.
    Drop,
    /// Each 4 KiB page that differs between live and durable content keeps
    /// one of the two at random (seeded), and the file's size is a random
    /// size between the durable and the live one (zeros where neither
    /// reaches): a disk that wrote some pages of a write and not others.
    Torn,
}

/// Failing `fsync` with EIO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// Number (counting from 1 from the moment the fault is set) of the
    /// first matching `fsync` to fail.
    pub nth: u64,
    /// Fail every matching `fsync` from the `nth` on; otherwise only the
    /// `nth`.
    pub sticky: bool,
    /// Count and fail only `fsync`s of files of this name (`None`: all
    /// regular files).
    pub name: Option<OsString>,
}

/// What a cut found volatile, for reports.
#[derive(Debug, Default, Clone)]
pub struct CutReport {
    /// Directory entries that existed but were not durable (lost by the
    /// cut), as paths relative to the mount.
    pub lost_entries: Vec<String>,
    /// Durable directory entries that had been removed or replaced (back
    /// after the cut).
    pub revived_entries: Vec<String>,
    /// Reachable files whose content was not durable: path, live size,
    /// durable size, differing pages, size after the cut.
    pub unsynced_files: Vec<(String, usize, usize, usize, usize)>,
}

impl std::fmt::Display for CutReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "  entries lost (not durable): {:?}", self.lost_entries)?;
        writeln!(
            f,
            "  entries revived (removal not durable): {:?}",
            self.revived_entries
        )?;
        for (path, live, durable, pages, after) in &self.unsynced_files {
            writeln!(
                f,
                "  file {path}: live {live} B, durable {durable} B, \
                 {pages} page(s) differ, {after} B after the cut"
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct FileData {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Pages written since the last `fsync` (a superset of the pages that
    /// differ, except after a failed `fsync`, which drops them as Linux
    /// drops failed dirty pages).
    dirty: BTreeSet<usize>,
}

impl FileData {
    fn mark(&mut self, from: usize, to: usize) {
        if to > from {
            self.dirty.extend(from / PAGE..=(to - 1) / PAGE);
        }
    }

    fn write(&mut self, offset: usize, data: &[u8]) {
        let end = offset + data.len();
        if self.live.len() < end {
            self.live.resize(end, 0);
        }
        self.live[offset..end].copy_from_slice(data);
        self.mark(offset, end);
    }

    fn set_len(&mut self, len: usize) {
        let old = self.live.len();
        self.live.resize(len, 0);
        self.mark(old.min(len), old.max(len));
    }

    fn sync(&mut self) {
        let len = self.live.len();
        self.durable.resize(len, 0);
        for page in std::mem::take(&mut self.dirty) {
            let (start, end) = (page * PAGE, ((page + 1) * PAGE).min(len));
            if start < end {
                self.durable[start..end].copy_from_slice(&self.live[start..end]);
            }
        }
    }

    /// Pages whose live and durable bytes differ (a page that one of the
    /// two ends inside differs unless both end at the same place).
    fn differing(&self) -> Vec<usize> {
        let len = self.live.len().max(self.durable.len());
        fn page(v: &[u8], p: usize) -> &[u8] {
            &v[(p * PAGE).min(v.len())..((p + 1) * PAGE).min(v.len())]
        }
        (0..len.div_ceil(PAGE))
            .filter(|&p| page(&self.live, p) != page(&self.durable, p))
            .collect()
    }

    fn cut(&mut self, model: Model, rng: &mut impl FnMut() -> u64) {
        let content = match model {
            Model::Drop => self.durable.clone(),
            Model::Torn => {
                let (low, high) = (
                    self.durable.len().min(self.live.len()),
                    self.durable.len().max(self.live.len()),
                );
                let size = low + (rng() % (high - low + 1) as u64) as usize;
                let mut out = self.durable.clone();
                out.resize(size, 0);
                for page in self.differing() {
                    if rng().is_multiple_of(2) {
                        continue; // this page keeps its durable bytes
                    }
                    let start = page * PAGE;
                    let end = ((page + 1) * PAGE).min(size);
                    if start >= end {
                        continue;
                    }
                    for (i, byte) in out[start..end].iter_mut().enumerate() {
                        *byte = self.live.get(start + i).copied().unwrap_or(0);
                    }
                }
                out
            }
        };
        self.live = content.clone();
        self.durable = content;
        self.dirty.clear();
    }
}

#[derive(Debug, Default)]
struct DirData {
    live: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, u64>,
    parent: u64,
}

#[derive(Debug)]
enum Body {
    File(FileData),
    Dir(DirData),
}

#[derive(Debug)]
struct Inode {
    body: Body,
    perm: u16,
    uid: u32,
    gid: u32,
    /// Live names pointing at a file (hard links).
    links: u32,
    /// The last name it was given (for faults and reports).
    name: OsString,
    mtime: SystemTime,
}

#[derive(Debug)]
struct State {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    next_fh: u64,
    fault: Option<Fault>,
    /// `fsync`s counted by the fault's name filter.
    fsyncs: u64,
    /// Every `fsync` and `fsyncdir`, for reports.
    all_fsyncs: u64,
    fsyncdirs: u64,
    failed_fsyncs: u64,
}

impl State {
    fn new() -> Self {
        let mut inodes = HashMap::new();
        inodes.insert(
            ROOT,
            Inode {
                body: Body::Dir(DirData {
                    parent: ROOT,
                    ..DirData::default()
                }),
                perm: 0o755,
                uid: 0,
                gid: 0,
                links: 1,
                name: "/".into(),
                mtime: SystemTime::now(),
            },
        );
        Self {
            inodes,
            next_ino: ROOT + 1,
            next_fh: 1,
            fault: None,
            fsyncs: 0,
            all_fsyncs: 0,
            fsyncdirs: 0,
            failed_fsyncs: 0,
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let node = self.inodes.get(&ino)?;
        let (kind, size, nlink) = match &node.body {
            Body::File(f) => (FileType::RegularFile, f.live.len() as u64, node.links),
            Body::Dir(_) => (FileType::Directory, 0, 2),
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            crtime: node.mtime,
            kind,
            perm: node.perm,
            nlink,
            uid: node.uid,
            gid: node.gid,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    fn dir(&mut self, ino: u64) -> Result<&mut DirData, Errno> {
        match self.inodes.get_mut(&ino).map(|n| &mut n.body) {
            Some(Body::Dir(d)) => Ok(d),
            Some(Body::File(_)) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn file(&mut self, ino: u64) -> Result<&mut FileData, Errno> {
        match self.inodes.get_mut(&ino).map(|n| &mut n.body) {
            Some(Body::File(f)) => Ok(f),
            Some(Body::Dir(_)) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn child(&mut self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.dir(parent)?
            .live
            .get(name)
            .copied()
            .ok_or(Errno::ENOENT)
    }

    fn new_node(&mut self, parent: u64, name: &OsStr, body: Body, mode: u32, req: &Request) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(
            ino,
            Inode {
                body,
                perm: (mode & 0o7777) as u16,
                uid: req.uid(),
                gid: req.gid(),
                links: 1,
                name: name.to_owned(),
                mtime: SystemTime::now(),
            },
        );
        if let Ok(dir) = self.dir(parent) {
            dir.live.insert(name.to_owned(), ino);
        }
        ino
    }

    /// Drops one live name of `ino` (a file loses a link; a directory's
    /// inode stays until a cut collects it, as durable entries may still
    /// point at it).
    fn unlinked(&mut self, ino: u64) {
        if let Some(node) = self.inodes.get_mut(&ino) {
            node.links = node.links.saturating_sub(1);
        }
    }

    fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        body: Body,
        mode: u32,
        req: &Request,
    ) -> Result<FileAttr, Errno> {
        if self.dir(parent)?.live.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.new_node(parent, name, body, mode, req);
        if let Body::Dir(d) = &mut self.inodes.get_mut(&ino).ok_or(Errno::EIO)?.body {
            d.parent = parent;
        }
        self.attr(ino).ok_or(Errno::EIO)
    }

    fn remove(&mut self, parent: u64, name: &OsStr, want_dir: bool) -> Result<(), Errno> {
        let ino = self.child(parent, name)?;
        match (&self.inodes.get(&ino).ok_or(Errno::ENOENT)?.body, want_dir) {
            (Body::Dir(d), true) if !d.live.is_empty() => return Err(Errno::ENOTEMPTY),
            (Body::Dir(_), true) | (Body::File(_), false) => {}
            (Body::Dir(_), false) => return Err(Errno::EISDIR),
            (Body::File(_), true) => return Err(Errno::ENOTDIR),
        }
        self.dir(parent)?.live.remove(name);
        self.unlinked(ino);
        Ok(())
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return Err(Errno::EINVAL);
        }
        let ino = self.child(parent, name)?;
        let is_dir = matches!(self.inodes.get(&ino).map(|n| &n.body), Some(Body::Dir(_)));
        if let Some(&target) = self.dir(new_parent)?.live.get(new_name) {
            if target == ino {
                return Ok(());
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            match (&self.inodes.get(&target).ok_or(Errno::EIO)?.body, is_dir) {
                (Body::Dir(d), true) if !d.live.is_empty() => return Err(Errno::ENOTEMPTY),
                (Body::Dir(_), true) | (Body::File(_), false) => {}
                (Body::Dir(_), false) => return Err(Errno::EISDIR),
                (Body::File(_), true) => return Err(Errno::ENOTDIR),
            }
            self.unlinked(target);
        }
        self.dir(parent)?.live.remove(name);
        self.dir(new_parent)?.live.insert(new_name.to_owned(), ino);
        let node = self.inodes.get_mut(&ino).ok_or(Errno::EIO)?;
        node.name = new_name.to_owned();
        if let Body::Dir(d) = &mut node.body {
            d.parent = new_parent;
        }
        Ok(())
    }

    fn fsync(&mut self, ino: u64) -> Result<(), Errno> {
        self.all_fsyncs += 1;
        let name = self.inodes.get(&ino).ok_or(Errno::ENOENT)?.name.clone();
        let counted = self
            .fault
            .as_ref()
            .is_none_or(|f| f.name.as_ref().is_none_or(|n| *n == name));
        if counted {
            self.fsyncs += 1;
        }
        let fail = counted
            && self
                .fault
                .as_ref()
                .is_some_and(|f| self.fsyncs == f.nth || (f.sticky && self.fsyncs > f.nth));
        let file = self.file(ino)?;
        if fail {
            // Like Linux after a failed writeback: the dirty pages are
            // marked clean without reaching the disk, so a later successful
            // fsync does not cover them.
            file.dirty.clear();
            self.failed_fsyncs += 1;
            return Err(Errno::EIO);
        }
        file.sync();
        Ok(())
    }

    /// Paths of every live-reachable inode (the first path found).
    fn paths(&self) -> HashMap<u64, String> {
        let mut paths = HashMap::from([(ROOT, String::new())]);
        let mut queue = vec![ROOT];
        while let Some(dir) = queue.pop() {
            let Some(Body::Dir(d)) = self.inodes.get(&dir).map(|n| &n.body) else {
                continue;
            };
            let base = paths.get(&dir).cloned().unwrap_or_default();
            for (name, &ino) in d.live.iter().chain(d.durable.iter()) {
                if paths.contains_key(&ino) {
                    continue;
                }
                paths.insert(ino, format!("{base}/{}", name.to_string_lossy()));
                queue.push(ino);
            }
        }
        paths
    }

    fn cut(&mut self, model: Model, seed: u64) -> CutReport {
        let mut rng = crate::harness::Rng(seed);
        let mut next = move || rng.next();
        let paths = self.paths();
        let path_of = |ino: &u64| {
            paths
                .get(ino)
                .cloned()
                .unwrap_or_else(|| format!("<inode {ino}>"))
        };
        let mut report = CutReport::default();
        let mut inos: Vec<u64> = self.inodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in &inos {
            let Some(node) = self.inodes.get_mut(ino) else {
                continue;
            };
            match &mut node.body {
                Body::Dir(d) => {
                    let base = path_of(ino);
                    for (name, child) in &d.live {
                        if d.durable.get(name) != Some(child) {
                            report
                                .lost_entries
                                .push(format!("{base}/{}", name.to_string_lossy()));
                        }
                    }
                    for (name, child) in &d.durable {
                        if d.live.get(name) != Some(child) {
                            report
                                .revived_entries
                                .push(format!("{base}/{}", name.to_string_lossy()));
                        }
                    }
                    d.live = d.durable.clone();
                }
                Body::File(f) => {
                    let differing = f.differing().len();
                    let (live, durable) = (f.live.len(), f.durable.len());
                    f.cut(model, &mut next);
                    if differing > 0 {
                        report.unsynced_files.push((
                            path_of(ino),
                            live,
                            durable,
                            differing,
                            f.live.len(),
                        ));
                    }
                }
            }
        }
        // Collect what the durable entries no longer reach; count links.
        let mut links: HashMap<u64, u32> = HashMap::from([(ROOT, 1)]);
        let mut queue = vec![ROOT];
        let mut parents = Vec::new();
        while let Some(dir) = queue.pop() {
            let Some(Body::Dir(d)) = self.inodes.get(&dir).map(|n| &n.body) else {
                continue;
            };
            for &child in d.live.values() {
                let seen = links.contains_key(&child);
                *links.entry(child).or_default() += 1;
                if !seen {
                    parents.push((child, dir));
                    queue.push(child);
                }
            }
        }
        self.inodes.retain(|ino, _| links.contains_key(ino));
        for (ino, node) in &mut self.inodes {
            node.links = links.get(ino).copied().unwrap_or(1);
        }
        for (child, parent) in parents {
            if let Some(Body::Dir(d)) = self.inodes.get_mut(&child).map(|n| &mut n.body) {
                d.parent = parent;
            }
        }
        report
    }
}

/// The file system as fuser serves it: a handle on the shared state.
struct Served(Arc<Mutex<State>>);

impl Served {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state is plain data; a panic in a handler leaves it usable.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn entry(reply: ReplyEntry, attr: Result<FileAttr, Errno>) {
    match attr {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn empty(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn offset(offset: u64, len: usize) -> Result<usize, Errno> {
    usize::try_from(offset)
        .ok()
        .filter(|o| o.checked_add(len).is_some_and(|end| end < 1 << 40))
        .ok_or(Errno::EFBIG)
}

impl Filesystem for Served {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut state = self.state();
        let attr = state
            .child(parent.0, name)
            .and_then(|ino| state.attr(ino).ok_or(Errno::ENOENT));
        entry(reply, attr);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = self.state();
        let result = (|| {
            if let Some(size) = size {
                let len = offset(size, 0)?;
                state.file(ino.0)?.set_len(len);
            }
            let node = state.inodes.get_mut(&ino.0).ok_or(Errno::ENOENT)?;
            if let Some(mode) = mode {
                node.perm = (mode & 0o7777) as u16;
            }
            node.uid = uid.unwrap_or(node.uid);
            node.gid = gid.unwrap_or(node.gid);
            node.mtime = SystemTime::now();
            state.attr(ino.0).ok_or(Errno::ENOENT)
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & S_IFMT != S_IFREG {
            reply.error(Errno::EPERM); // only regular files
            return;
        }
        let body = Body::File(FileData::default());
        let attr = self
            .state()
            .create(parent.0, name, body, mode & !umask, req);
        entry(reply, attr);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let body = Body::Dir(DirData::default());
        let attr = self
            .state()
            .create(parent.0, name, body, mode & !umask, req);
        entry(reply, attr);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.state().remove(parent.0, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.state().remove(parent.0, name, true));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = self
            .state()
            .rename(parent.0, name, newparent.0, newname, flags);
        empty(reply, result);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut state = self.state();
        let result = (|| {
            state.file(ino.0)?; // no hard links to directories
            let dir = state.dir(newparent.0)?;
            if dir.live.contains_key(newname) {
                return Err(Errno::EEXIST);
            }
            dir.live.insert(newname.to_owned(), ino.0);
            let node = state.inodes.get_mut(&ino.0).ok_or(Errno::ENOENT)?;
            node.links += 1;
            state.attr(ino.0).ok_or(Errno::ENOENT)
        })();
        entry(reply, result);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut state = self.state();
        if !state.inodes.contains_key(&ino.0) {
            reply.error(Errno::ENOENT);
            return;
        }
        state.next_fh += 1;
        // direct_io: reads and writes bypass the kernel's page cache.
        reply.opened(FileHandle(state.next_fh), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut state = self.state();
        let body = Body::File(FileData::default());
        match state.create(parent.0, name, body, mode & !umask, req) {
            Ok(attr) => {
                state.next_fh += 1;
                reply.created(
                    &TTL,
                    &attr,
                    Generation(0),
                    FileHandle(state.next_fh),
                    FopenFlags::FOPEN_DIRECT_IO,
                );
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut state = self.state();
        match state.file(ino.0) {
            Ok(file) => {
                let start =
                    usize::try_from(offset).map_or(file.live.len(), |o| o.min(file.live.len()));
                let end = start.saturating_add(size as usize).min(file.live.len());
                reply.data(&file.live[start..end]);
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset_: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut state = self.state();
        let result = (|| {
            let at = offset(offset_, data.len())?;
            state.file(ino.0)?.write(at, data);
            Ok(())
        })();
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok(); // close(2) makes nothing durable
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.state().fsync(ino.0));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut state = self.state();
        let entries: Vec<(u64, OsString)> = match state.dir(ino.0) {
            Ok(d) => [(ino.0, ".".into()), (d.parent, "..".into())]
                .into_iter()
                .chain(d.live.iter().map(|(n, &i)| (i, n.clone())))
                .collect(),
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        for (i, (child, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            let kind = match state.inodes.get(&child).map(|n| &n.body) {
                Some(Body::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            if reply.add(INodeNo(child), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = self.state();
        state.fsyncdirs += 1;
        let result = state.dir(ino.0).map(|d| d.durable = d.live.clone());
        empty(reply, result);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(
            1 << 24,
            1 << 23,
            1 << 23,
            1 << 20,
            1 << 19,
            PAGE as u32,
            255,
            PAGE as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset_: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        let mut state = self.state();
        let result = (|| {
            let end = offset(offset_, 0)?
                .checked_add(offset(length, 0)?)
                .ok_or(Errno::EFBIG)?;
            let file = state.file(ino.0)?;
            if file.live.len() < end {
                file.set_len(end);
            }
            Ok(())
        })();
        empty(reply, result);
    }
}

/// Counters of what the file system was asked to make durable.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncCounts {
    /// Every file `fsync`.
    pub all_fsyncs: u64,
    /// Directory `fsync`s.
    pub fsyncdirs: u64,
    /// `fsync`s failed by the fault.
    pub failed: u64,
}

/// A mounted power-loss file system.
pub struct PowerLossFs {
    state: Arc<Mutex<State>>,
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
}

impl PowerLossFs {
    /// Mounts an empty file system at `mountpoint` (an existing, empty
    /// directory).
    pub fn mount(mountpoint: &Path) -> io::Result<Self> {
        let mut fs = Self {
            state: Arc::new(Mutex::new(State::new())),
            mountpoint: mountpoint.to_path_buf(),
            session: None,
        };
        fs.attach()?;
        Ok(fs)
    }

    fn attach(&mut self) -> io::Result<()> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("sled-idempotency-powerloss".into()),
            MountOption::NoAtime,
        ];
        config.n_threads = Some(1);
        let session = fuser::spawn_mount(Served(self.state.clone()), &self.mountpoint, &config)?;
        self.session = Some(session);
        Ok(())
    }

    /// Does a descriptor of this process point into the mount?
    fn open_here(&self) -> bool {
        let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
            return false;
        };
        fds.flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|target| target.starts_with(&self.mountpoint))
    }

    fn detach(&mut self) -> io::Result<()> {
        if let Some(session) = self.session.take() {
            // No child of this process may be between fork and exec (with
            // copies of this mount's open files) while it is unmounted.
            let _no_fork = crate::harness::SPAWNING
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // A file of this mount another thread of this process closes
            // right now holds the mount until its release is through: wait
            // (bounded) until no descriptor of the process points into it.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while self.open_here() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            match session.umount_and_join() {
                // The unmount worked; the serving thread's last read of
                // /dev/fuse may see the connection aborted rather than
                // gone (seen now and then on Linux 6.18).
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "unmounting {} (is a file still open?): {e}",
                            self.mountpoint.display()
                        ),
                    ));
                }
                Ok(()) => {}
            }
            if self.is_mounted()? {
                return Err(io::Error::other(format!(
                    "{} is still mounted after the unmount",
                    self.mountpoint.display()
                )));
            }
        }
        Ok(())
    }

    fn is_mounted(&self) -> io::Result<bool> {
        let mounts = std::fs::read_to_string("/proc/self/mounts")?;
        let canonical = self.mountpoint.canonicalize()?;
        let target = canonical.to_string_lossy();
        Ok(mounts
            .lines()
            .any(|line| line.split(' ').nth(1) == Some(&*target)))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where the file system is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// A power cut: unmounts (every process using the file system must be
    /// gone, and every file closed), discards what was not durable
    /// according to `model` (random choices seeded by `seed`), drops what
    /// no durable entry reaches, and mounts again.
    pub fn cut(&mut self, model: Model, seed: u64) -> io::Result<CutReport> {
        self.detach()?;
        let report = self.state().cut(model, seed);
        self.attach()?;
        Ok(report)
    }

    /// Makes `fsync`s fail from now on as `fault` says (`None`: none fail).
    /// Resets the counter of matching `fsync`s to zero.
    pub fn set_fault(&self, fault: Option<Fault>) {
        let mut state = self.state();
        state.fault = fault;
        state.fsyncs = 0;
    }

    /// What was synced so far.
    pub fn sync_counts(&self) -> SyncCounts {
        let state = self.state();
        SyncCounts {
            all_fsyncs: state.all_fsyncs,
            fsyncdirs: state.fsyncdirs,
            failed: state.failed_fsyncs,
        }
    }
}

impl Drop for PowerLossFs {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            eprintln!("powerloss: {e}");
        }
    }
}
