//! Export and import as JSON Lines (feature `admin`); the schema is
//! documented on [`EXPORT_SCHEMA`].

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::{Admin, Ticker, broken_invariant};
use crate::error::{Error, Result};
use crate::machine;
use crate::namespace::validate_namespace;
use crate::record::{MAX_FINGERPRINT_LEN, MAX_RESULT_LIMIT, Record, State};
use crate::sled_engine::keyspace::{cas, display_key, next_token};
use crate::sled_engine::open::FORMAT_VERSION;
use crate::sled_engine::store::{SledEngine, blocking};

/// Version of the export line schema, written in every line.
///
/// # Schema, version 1
///
/// One JSON object per line, one line per record, fields in this order:
///
/// | field | type | meaning |
/// |---|---|---|
/// | `schema` | number | this schema's version, [`EXPORT_SCHEMA`] (1) |
/// | `format` | number | the database format version of the build that wrote the line ([`FORMAT_VERSION`]) |
/// | `namespace` | string | the record's namespace |
/// | `id` | string | the message id, a hyphenated UUID |
/// | `state` | `"pending"` or `"done"` | [`State`] |
/// | `expires_at` | number | unix milliseconds at which the record stops being live |
/// | `token` | number | the fencing token of the claim that wrote it (0: a `mark_done` without a claim) |
/// | `attempts` | number | claims of this key so far |
/// | `ttl_ms` | number | the ttl the key was claimed with |
/// | `fingerprint` | string or null | the payload fingerprint, lowercase hex |
/// | `result` | string or null | the cached result, lowercase hex |
///
/// An export lists namespaces one after the other and each one's records in
/// key order, and leaves out records a sweep would remove. Exporting what
/// an import wrote gives the same bytes.
pub const EXPORT_SCHEMA: u32 = 1;

/// Largest token an import accepts (2^62): the database's tokens continue
/// above the largest imported one and must not run out of room.
pub const MAX_IMPORTED_TOKEN: u64 = 1 << 62;

/// What an import does with a record whose key already holds a different
/// record. A stored record identical to the imported one is never a
/// conflict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnConflict {
    /// Refuse the whole import before writing anything.
    #[default]
    Fail,
    /// Keep the stored record, skip the imported one.
    Keep,
    /// Replace the stored record with the imported one. A fencing token
    /// never goes down along a key's history: an imported record whose
    /// token is not above the stored record's is written with a fresh
    /// token, above every token the database has handed out.
    Replace,
}

/// What [`Admin::export`] wrote.
#[derive(Debug)]
#[non_exhaustive]
pub struct Exported<W> {
    /// The writer, flushed.
    pub out: W,
    /// Lines written (one per record).
    pub records: u64,
    /// Keys whose values do not decode, left out of the export.
    pub corrupt: Vec<String>,
}

/// What [`Admin::import`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImportReport {
    /// Lines read (one per record).
    pub lines: u64,
    /// Records written to keys that held nothing.
    pub written: u64,
    /// Records identical to the stored ones (nothing to do).
    pub unchanged: u64,
    /// Conflicting records skipped ([`OnConflict::Keep`]).
    pub kept: u64,
    /// Stored records replaced ([`OnConflict::Replace`]).
    pub replaced: u64,
    /// The database's token floor afterwards: every token it hands out is
    /// larger than every imported token.
    pub token_floor: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LineState {
    Pending,
    Done,
}

/// One line of an export.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    schema: u32,
    format: u32,
    namespace: String,
    id: String,
    state: LineState,
    expires_at: u64,
    token: u64,
    attempts: u32,
    ttl_ms: u64,
    fingerprint: Option<String>,
    result: Option<String>,
}

impl Line {
    fn of(namespace: &str, key: &[u8], record: &Record) -> Line {
        Line {
            schema: EXPORT_SCHEMA,
            format: FORMAT_VERSION,
            namespace: namespace.to_owned(),
            id: display_key(key),
            state: match record.state {
                State::Pending => LineState::Pending,
                State::Done => LineState::Done,
            },
            expires_at: record.expires_at,
            token: record.token,
            attempts: record.attempts,
            ttl_ms: record.ttl_ms,
            fingerprint: record.fingerprint.as_ref().map(hex::encode),
            result: record.result.as_ref().map(hex::encode),
        }
    }

    /// The record this line holds, checked as the store checks what it
    /// writes.
    fn record(self) -> std::result::Result<(String, [u8; 16], Record), String> {
        if self.schema != EXPORT_SCHEMA {
            return Err(format!(
                "schema {} (this build reads schema {EXPORT_SCHEMA})",
                self.schema
            ));
        }
        if self.format > FORMAT_VERSION {
            return Err(format!(
                "format version {} (this build reads up to {FORMAT_VERSION})",
                self.format
            ));
        }
        validate_namespace(&self.namespace).map_err(|e| e.to_string())?;
        let id = uuid::Uuid::parse_str(&self.id)
            .map_err(|e| format!("id {:?} is not a UUID: {e}", self.id))?;
        let bytes = |field: &str, hex: Option<String>, max: usize| {
            hex.map(|h| {
                let bytes = hex::decode(&h).map_err(|e| format!("{field} is not hex: {e}"))?;
                if bytes.len() > max {
                    return Err(format!("{field} is {} bytes (at most {max})", bytes.len()));
                }
                Ok(bytes)
            })
            .transpose()
        };
        let record = Record {
            state: match self.state {
                LineState::Pending => State::Pending,
                LineState::Done => State::Done,
            },
            expires_at: self.expires_at,
            token: self.token,
            attempts: self.attempts,
            ttl_ms: self.ttl_ms,
            fingerprint: bytes("fingerprint", self.fingerprint, MAX_FINGERPRINT_LEN)?,
            result: bytes("result", self.result, MAX_RESULT_LIMIT)?,
        };
        // Tokens after an import start above the largest imported one:
        // leave them room to grow.
        if let Some(reason) = broken_invariant(&record, MAX_IMPORTED_TOKEN + 1) {
            return Err(reason);
        }
        Ok((self.namespace, *id.as_bytes(), record))
    }
}

/// One record read from an import, with its line number.
struct Incoming {
    line: u64,
    key: [u8; 16],
    record: Record,
    value: Vec<u8>,
}

impl Incoming {
    /// Whether `stored` holds this very record (in any record version). A
    /// value that does not decode never does.
    fn same_as(&self, stored: &[u8]) -> bool {
        Record::decode(stored).is_ok_and(|r| r == self.record)
    }
}

/// Every line of an import, checked, by namespace.
struct Parsed {
    spaces: Vec<(String, Vec<Incoming>)>,
    lines: u64,
    max_token: u64,
}

/// Reads and checks every line; the first bad one is the error.
fn parse(from: impl Read) -> Result<Parsed> {
    let bad = |line: u64, reason: String| Error::ImportLine { line, reason };
    let mut spaces: Vec<(String, Vec<Incoming>)> = Vec::new();
    let mut seen: HashMap<(String, [u8; 16]), u64> = HashMap::new();
    let (mut lines, mut max_token) = (0u64, 0u64);
    for (index, text) in BufReader::new(from).lines().enumerate() {
        let line = index as u64 + 1;
        let text = text.map_err(|e| bad(line, format!("cannot be read: {e}")))?;
        if text.trim().is_empty() {
            return Err(bad(line, "the line is empty".into()));
        }
        let parsed: Line = serde_json::from_str(&text).map_err(|e| bad(line, e.to_string()))?;
        let (namespace, key, record) = parsed.record().map_err(|reason| bad(line, reason))?;
        if let Some(first) = seen.insert((namespace.clone(), key), line) {
            return Err(bad(
                line,
                format!(
                    "key {} in namespace {namespace:?} is also on line {first}",
                    display_key(&key)
                ),
            ));
        }
        lines += 1;
        max_token = max_token.max(record.token);
        let incoming = Incoming {
            line,
            key,
            value: record.encode(),
            record,
        };
        match spaces.iter_mut().find(|(name, _)| *name == namespace) {
            Some((_, records)) => records.push(incoming),
            None => spaces.push((namespace, vec![incoming])),
        }
    }
    Ok(Parsed {
        spaces,
        lines,
        max_token,
    })
}

impl Admin<'_> {
    /// Writes the namespace's records to `out` as JSON Lines (schema:
    /// [`EXPORT_SCHEMA`]), in
    /// key order, leaving out records a sweep would remove. Values that do
    /// not decode are left out and named in [`Exported::corrupt`]. The walk
    /// and the writes run on a blocking thread.
    pub async fn export<W: Write + Send + 'static>(&self, out: W) -> Result<Exported<W>> {
        let now = self.store.inner.clock.now_millis();
        let rules = self.store.inner.retention;
        let namespace = self.store.namespace_name().to_owned();
        let mut ticker = Ticker::new(self.progress.clone());
        self.store
            .scan(move |_, tree| {
                let failed = |e| Error::io("writing the export")(e);
                let mut out = BufWriter::new(out);
                let (mut records, mut corrupt) = (0, Vec::new());
                for entry in tree.iter() {
                    let (key, value) = entry.map_err(Error::storage("exporting records"))?;
                    ticker.tick();
                    match Record::decode(&value) {
                        Err(_) => corrupt.push(display_key(&key)),
                        Ok(r) if machine::sweepable(&r, now, rules) => {}
                        Ok(r) => {
                            serde_json::to_writer(&mut out, &Line::of(&namespace, &key, &r))
                                .map_err(|e| failed(e.into()))?;
                            out.write_all(b"\n").map_err(failed)?;
                            records += 1;
                        }
                    }
                }
                ticker.report();
                let out = out.into_inner().map_err(|e| failed(e.into_error()))?;
                Ok(Exported {
                    out,
                    records,
                    corrupt,
                })
            })
            .await
    }

    /// Reads JSON Lines written by [`export`](Self::export) (of any
    /// namespaces) and writes each record into its namespace of this
    /// database, creating namespaces as needed.
    ///
    /// Every line is read and checked first: a line that is not a valid
    /// record ([`Error::ImportLine`], naming the line), or with
    /// [`OnConflict::Fail`] a key that holds a different record
    /// ([`Error::ImportConflict`]), fails the import with nothing written,
    /// not even a namespace. The token floor is then raised above every
    /// imported token, durably, before any record is written, and the
    /// records are made durable (flush and fdatasync) before this returns.
    /// Re-running an import that was cut short writes only what is missing:
    /// a stored record equal to the imported one is not a conflict,
    /// whichever record version stores it.
    ///
    /// With [`OnConflict::Fail`], a worker that writes a different record
    /// to an imported key while the import runs stops it there with
    /// [`Error::ImportConflict`]; what was written before stays (a re-run
    /// with `Keep` or `Replace` finishes it).
    pub async fn import<R: Read + Send + 'static>(
        &self,
        from: R,
        on_conflict: OnConflict,
    ) -> Result<ImportReport> {
        let Parsed {
            mut spaces,
            lines,
            max_token,
        } = blocking(move || parse(from)).await?;
        // Only namespaces that exist can hold conflicting records; the
        // others are created once the import is known to go ahead.
        let known = self.store.namespaces();
        let mut existing: Vec<Option<SledEngine>> = Vec::with_capacity(spaces.len());
        for (name, _) in &spaces {
            existing.push(match known.contains(name) {
                true => Some(self.store.namespace(name).await?),
                false => None,
            });
        }
        if on_conflict == OnConflict::Fail {
            let guard = self.store.inner.state.clone().read_owned().await;
            let checking = (spaces, existing);
            (spaces, existing) = blocking(move || {
                let open = guard.as_ref().ok_or(Error::Closed)?;
                let (mut first, mut conflicts) = (None, 0);
                for ((_, records), handle) in checking.0.iter().zip(&checking.1) {
                    let Some(handle) = handle else { continue };
                    let tree = open.trees.get(handle.space.index).ok_or(Error::Closed)?;
                    for r in records {
                        let stored = tree
                            .get(r.key)
                            .map_err(Error::storage("reading a record"))?;
                        if stored.is_some_and(|v| !r.same_as(&v)) {
                            conflicts += 1;
                            first.get_or_insert((
                                r.line,
                                handle.namespace_name().to_owned(),
                                r.key,
                            ));
                        }
                    }
                }
                match first {
                    None => Ok(checking),
                    Some((line, namespace, key)) => Err(Error::ImportConflict {
                        line,
                        namespace,
                        key: display_key(&key),
                        conflicts,
                    }),
                }
            })
            .await?;
        }
        let mut handles = Vec::with_capacity(spaces.len());
        for ((name, records), handle) in spaces.into_iter().zip(existing) {
            let handle = match handle {
                Some(handle) => handle,
                None => self.store.namespace(&name).await?,
            };
            handles.push((handle, records));
        }
        let guard = self.store.inner.state.clone().read_owned().await;
        let mut ticker = Ticker::new(self.progress.clone());
        blocking(move || {
            let open = guard.as_ref().ok_or(Error::Closed)?;
            open.flusher.check()?;
            Admin::raise_token_floor(open, max_token)?;
            let mut report = ImportReport {
                lines,
                ..ImportReport::default()
            };
            for (handle, records) in &handles {
                let tree = open.trees.get(handle.space.index).ok_or(Error::Closed)?;
                for r in records {
                    ticker.tick();
                    write_one(open, tree, handle, r, on_conflict, &mut report)?;
                }
            }
            ticker.report();
            open.flusher.sync_blocking()?;
            report.token_floor = open.token_floor.load(Ordering::SeqCst);
            Ok(report)
        })
        .await
    }
}

/// Writes one imported record as `on_conflict` says, counting what it did.
fn write_one(
    open: &crate::sled_engine::Open,
    tree: &sled::Tree,
    handle: &SledEngine,
    r: &Incoming,
    on_conflict: OnConflict,
    report: &mut ImportReport,
) -> Result<()> {
    let mut current = tree
        .get(r.key)
        .map_err(Error::storage("reading a record"))?;
    loop {
        let replacing = match current.as_deref() {
            Some(stored) if r.same_as(stored) => {
                report.unchanged += 1;
                return Ok(());
            }
            None => false,
            Some(_) => match on_conflict {
                OnConflict::Replace => true,
                OnConflict::Keep => {
                    report.kept += 1;
                    return Ok(());
                }
                OnConflict::Fail => {
                    return Err(Error::ImportConflict {
                        line: r.line,
                        namespace: handle.namespace_name().to_owned(),
                        key: display_key(&r.key),
                        conflicts: 1,
                    });
                }
            },
        };
        // Fencing tokens increase along each key's history: a replacement
        // whose token is not above the stored record's gets a fresh one,
        // above every token handed out so far.
        let stored_token = current
            .as_deref()
            .and_then(|v| Record::decode(v).ok())
            .map(|w| w.token);
        let (record, new) = match stored_token {
            Some(token) if replacing && token >= r.record.token => {
                let mut raised = r.record.clone();
                raised.token = open.latch_on(next_token(open))?;
                let value = raised.encode();
                (raised, Some(value))
            }
            _ => (r.record.clone(), Some(r.value.clone())),
        };
        let stored = &handle.space.stored;
        let pass = stored.pass_blocking();
        match open.latch_on(cas(tree, &r.key, current.as_deref(), new))? {
            Ok(()) => {
                // A stored value that does not decode was never counted.
                let was = current.as_deref().and_then(|v| Record::decode(v).ok());
                stored.moved(&pass, &r.key, was.map(|w| w.state), Some(record.state));
                drop(pass);
                let now = handle.inner.clock.now_millis();
                let due = handle.inner.retention.due_at(&record, now);
                if open.expiries.note(handle.space.index, r.key, due) {
                    open.latch_on(open.expiries.write())?;
                }
                if replacing {
                    report.replaced += 1;
                } else {
                    report.written += 1;
                }
                if r.record.state == State::Pending {
                    handle.space.pending.claimed(&r.key);
                } else {
                    handle.space.pending.ended(tree, &r.key);
                }
                return Ok(());
            }
            // A worker wrote the key meanwhile: decide again.
            Err(found) => current = found,
        }
    }
}
