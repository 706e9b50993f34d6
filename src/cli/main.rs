//! `sled-idempotency`: inspect and maintain a database at rest (feature
//! `cli`). A database a running worker holds cannot be opened here (sled
//! allows one owner per directory): that worker can serve the same
//! operations through the library's admin API (`SledIdempotencyStore::admin`).
//!
//! Exit codes: 0 done; 1 the answer is no (`get`: nothing stored, `verify`:
//! problems found, `release`: nothing released, `export`: corrupt records
//! left out); 2 an error (the message says what to do).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use sled_idempotency::admin::{
    ATTEMPTS_BUCKETS, Admin, Census, CompactStep, ListFilter, OnConflict,
};
use sled_idempotency::{
    Builder, DEFAULT_NAMESPACE, Error, MessageId, Record, SledIdempotencyStore, State,
};

mod open;
mod show;

use open::{Opened, Settings};
use show::{Bar, bytes, record_json, record_line, timing};

#[derive(Parser)]
#[command(
    name = "sled-idempotency",
    version,
    about = "Inspect and maintain a sled-idempotency database at rest",
    after_help = "Read-only commands (stats, get, list, verify, export) work on a copy of the \
        database taken under its lock, and never change it. A database a running worker holds \
        cannot be opened: use that worker's admin API (SledIdempotencyStore::admin) instead.\n\n\
        Exit codes: 0 done; 1 the answer is no (get: nothing stored; verify: problems; release: \
        nothing released; export: corrupt records left out); 2 an error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How long an expired pending claim is remembered (seconds), as the
    /// worker's `pending_retention`: decides what a sweep removes.
    #[arg(long, global = true, value_name = "SECONDS")]
    pending_retention: Option<u64>,
}

#[derive(Subcommand)]
enum Command {
    /// Per namespace: live pending and done records, expired records not
    /// swept yet, attempts, bytes; the database's size and format version.
    Stats {
        /// The database directory.
        db: PathBuf,
        /// Only this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// One record, all fields. Exit code 1 when nothing is stored.
    Get(OneKey),
    /// A page of live records in key order (UUIDv7 ids sort by time).
    List {
        /// The database directory.
        db: PathBuf,
        /// The namespace.
        #[arg(long, default_value = DEFAULT_NAMESPACE)]
        namespace: String,
        /// Only records in this state.
        #[arg(long)]
        state: Option<StateArg>,
        /// Only records claimed at least this many times (poison messages).
        #[arg(long, default_value_t = 0)]
        min_attempts: u32,
        /// At most this many records.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this id (the last id of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// Also expired records not swept yet.
        #[arg(long)]
        expired: bool,
        /// Machine-readable output (one JSON object per record).
        #[arg(long)]
        json: bool,
    },
    /// Gives one pending claim back, so that the next delivery is handled.
    /// Never erases a done record.
    Release(OneKey),
    /// Removes every expired record a worker would treat as absent.
    Sweep {
        /// The database directory.
        db: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Decodes every record and checks the metadata; names each bad key.
    Verify {
        /// The database directory.
        db: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Writes the records as JSON Lines (schema version 1; see docs/operating.md).
    Export {
        /// The database directory.
        db: PathBuf,
        /// Only this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The summary as JSON (on standard error when the records go to
        /// standard output).
        #[arg(long)]
        json: bool,
    },
    /// Reads JSON Lines written by `export` into a new or existing database.
    Import {
        /// The database directory (created if absent).
        db: PathBuf,
        /// The JSON Lines file.
        file: PathBuf,
        /// What to do with a key that already holds a different record.
        #[arg(long, value_enum, default_value_t = ConflictArg::Fail)]
        on_conflict: ConflictArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Rewrites the live records into a fresh database and swaps it in
    /// atomically, giving disk space back.
    Compact {
        /// The database directory.
        db: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// A database, one key in it, and the output format.
#[derive(Args)]
struct OneKey {
    /// The database directory.
    db: PathBuf,
    /// The message id (a UUID).
    id: String,
    /// The namespace.
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum StateArg {
    Pending,
    Done,
}

#[derive(Clone, Copy, ValueEnum)]
enum ConflictArg {
    /// Refuse the import, writing nothing.
    Fail,
    /// Keep the stored record.
    Keep,
    /// Replace the stored record.
    Replace,
}

/// What a command ends with: success, a "no" (exit code 1), or an error.
enum Outcome {
    Done,
    No,
}

type CliResult = Result<Outcome, String>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // An interrupted command drops what it opened, and so removes the
    // copy a read-only command made (a kill cannot be caught: that copy is
    // left in the temporary directory).
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = run(cli) => outcome,
            signal = interrupted() => Err(signal),
        }
    });
    match outcome {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::No) => ExitCode::from(1),
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

/// Waits for Ctrl-C or SIGTERM and says which came.
async fn interrupted() -> String {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "interrupted".into();
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted".into(),
        _ = term.recv() => "terminated".into(),
    }
}

async fn run(cli: Cli) -> CliResult {
    let settings = Settings {
        pending_retention: cli.pending_retention.map(Duration::from_secs),
    };
    match cli.command {
        Command::Stats {
            db,
            namespace,
            json,
        } => {
            let opened = Opened::read_only(&db, settings).await?;
            with(opened, async |o| stats(o, namespace, json).await).await
        }
        Command::Get(OneKey {
            db,
            id,
            namespace,
            json,
        }) => {
            parse_id(&id)?;
            let opened = Opened::read_only(&db, settings).await?;
            with(opened, async |o| get(o, &namespace, &id, json).await).await
        }
        Command::List {
            db,
            namespace,
            state,
            min_attempts,
            limit,
            after,
            expired,
            json,
        } => {
            let mut filter = ListFilter::new(limit)
                .min_attempts(min_attempts)
                .include_expired(expired);
            if let Some(state) = state {
                filter = filter.state(match state {
                    StateArg::Pending => State::Pending,
                    StateArg::Done => State::Done,
                });
            }
            if let Some(after) = after {
                filter = filter.after(parse_id(&after)?);
            }
            let opened = Opened::read_only(&db, settings).await?;
            with(opened, async |o| list(o, &namespace, &filter, json).await).await
        }
        Command::Release(OneKey {
            db,
            id,
            namespace,
            json,
        }) => {
            let id = parse_id(&id)?;
            let opened = Opened::in_place(&db, settings).await?;
            with(opened, async |o| release(o, &namespace, &id, json).await).await
        }
        Command::Sweep { db, json } => {
            let opened = Opened::in_place(&db, settings).await?;
            with(opened, async |o| sweep(o, json).await).await
        }
        Command::Verify { db, json } => {
            let opened = Opened::read_only(&db, settings).await?;
            with(opened, async |o| verify(o, json).await).await
        }
        Command::Export {
            db,
            namespace,
            out,
            json,
        } => {
            let opened = Opened::read_only(&db, settings).await?;
            with(opened, async |o| {
                export(o, namespace, out.as_deref(), json).await
            })
            .await
        }
        Command::Import {
            db,
            file,
            on_conflict,
            json,
        } => {
            let on_conflict = match on_conflict {
                ConflictArg::Fail => OnConflict::Fail,
                ConflictArg::Keep => OnConflict::Keep,
                ConflictArg::Replace => OnConflict::Replace,
            };
            let from = std::fs::File::open(&file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let existed = db.exists();
            let opened = Opened::for_import(&db, settings).await?;
            let fresh = opened.created;
            let result = with(opened, async |o| import(o, from, on_conflict, json).await).await;
            if result.is_err() && fresh {
                // Leave no database behind an import that wrote nothing.
                let _ = std::fs::remove_dir_all(&db);
                if existed {
                    let _ = std::fs::create_dir(&db);
                }
            }
            result
        }
        Command::Compact { db, json } => compact(open::builder(&db, settings), &db, json).await,
    }
}

/// Runs `job` on the opened database, then closes it; the first failure
/// is the answer.
async fn with(opened: Opened, job: impl AsyncFnOnce(&Opened) -> CliResult) -> CliResult {
    let result = job(&opened).await;
    opened.close().await.and(result)
}

fn parse_id(id: &str) -> Result<MessageId, String> {
    uuid::Uuid::parse_str(id)
        .map(MessageId::from_uuid)
        .map_err(|e| format!("{id:?} is not a message id (a UUID): {e}"))
}

/// The admin operations of `store`, reporting to a new progress bar.
fn tracked<'a>(store: &'a SledIdempotencyStore, what: &'static str) -> (Admin<'a>, Bar) {
    let bar = Bar::records(what);
    let walked = bar.base();
    (store.admin().progress(move |n| walked.set(n)), bar)
}

fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

fn census_json(census: &Census) -> serde_json::Value {
    let attempts: Vec<_> = ATTEMPTS_BUCKETS
        .iter()
        .zip(census.attempts)
        .map(|(min, records)| json!({ "min": min, "records": records }))
        .collect();
    json!({
        "namespace": census.namespace,
        "live_pending": census.live_pending,
        "live_done": census.live_done,
        "expired_not_swept": census.expired,
        "sweepable": census.sweepable,
        "corrupt": census.corrupt,
        "attempts": attempts,
        "record_bytes": census.record_bytes,
    })
}

async fn stats(opened: &Opened, namespace: Option<String>, json: bool) -> CliResult {
    let names = opened.namespaces(namespace.as_deref()).await?;
    let store = opened.store();
    let bar = Bar::records("counting");
    let mut censuses = Vec::new();
    for name in &names {
        let handle = opened.handle(name).await?;
        let walked = bar.base();
        censuses.push(
            handle
                .admin()
                .progress(move |n| walked.set(n))
                .census()
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    bar.finish();
    let format = store.admin().format_found();
    let size = opened.size_on_disk;
    if json {
        print_json(&json!({
            "database": opened.path.display().to_string(),
            "format_version": format,
            "size_on_disk": size,
            "namespaces": censuses.iter().map(census_json).collect::<Vec<_>>(),
        }));
        return Ok(Outcome::Done);
    }
    println!("database        {}", opened.path.display());
    match format {
        Some(v) => println!("format version  {v}"),
        None => println!("format version  (none recorded)"),
    }
    println!("size on disk    {}", bytes(size));
    for c in &censuses {
        println!();
        println!("namespace {}", c.namespace);
        println!("  live pending          {:>12}", c.live_pending);
        println!("  live done             {:>12}", c.live_done);
        println!(
            "  expired, not swept    {:>12}  ({} removable by a sweep now)",
            c.expired, c.sweepable
        );
        println!("  corrupt               {:>12}", c.corrupt);
        println!("  record bytes          {:>12}", bytes(c.record_bytes));
        println!("  live records by attempts:");
        for (i, (min, records)) in ATTEMPTS_BUCKETS.iter().zip(c.attempts).enumerate() {
            let label = match ATTEMPTS_BUCKETS.get(i + 1) {
                Some(next) if next - min == 1 => format!("{min}"),
                Some(next) => format!("{min}-{}", next - 1),
                None => format!("{min}+"),
            };
            println!("    {label:>6}  {records:>12}");
        }
    }
    Ok(Outcome::Done)
}

async fn get(opened: &Opened, namespace: &str, id: &str, json: bool) -> CliResult {
    let key = parse_id(id)?;
    let handle = opened.handle(namespace).await?;
    let record = handle.get_record(&key).await.map_err(|e| e.to_string())?;
    let now = opened.now();
    let Some(record) = record else {
        if json {
            print_json(&json!({ "namespace": namespace, "id": id, "record": null }));
        } else {
            println!("no record for {id} in namespace {namespace}");
        }
        return Ok(Outcome::No);
    };
    if json {
        print_json(&record_json(namespace, &key, &record, now));
    } else {
        show::record_fields(namespace, &key, &record, now);
    }
    Ok(Outcome::Done)
}

async fn list(opened: &Opened, namespace: &str, filter: &ListFilter, json: bool) -> CliResult {
    let handle = opened.handle(namespace).await?;
    let records = handle
        .admin()
        .list(filter)
        .await
        .map_err(|e| e.to_string())?;
    let now = opened.now();
    if json {
        for (key, record) in &records {
            print_json(&record_json(namespace, key, record, now));
        }
        return Ok(Outcome::Done);
    }
    println!(
        "{:<36}  {:<7}  {:>8}  {:>20}  expires",
        "id", "state", "attempts", "token"
    );
    for (key, record) in &records {
        println!("{}", record_line(key, record, now));
    }
    eprintln!("{} records", records.len());
    Ok(Outcome::Done)
}

async fn release(opened: &Opened, namespace: &str, key: &MessageId, json: bool) -> CliResult {
    let handle = opened.handle(namespace).await?;
    let before: Option<Record> = handle.get_record(key).await.map_err(|e| e.to_string())?;
    handle.release(key).await.map_err(|e| e.to_string())?;
    let after = handle.get_record(key).await.map_err(|e| e.to_string())?;
    let released = before.as_ref().is_some_and(|r| r.state == State::Pending) && after.is_none();
    let why = match (&before, released) {
        (_, true) => "released: the next delivery of this message will be handled",
        (Some(r), false) if r.state == State::Done => {
            "not released: the message is done (release never erases a done record)"
        }
        _ => "not released: no live pending claim for this id",
    };
    if json {
        print_json(&json!({
            "namespace": namespace,
            "id": key.to_string(),
            "released": released,
            "was": before.map(|r| match r.state { State::Pending => "pending", State::Done => "done" }),
        }));
    } else {
        println!("{key}: {why}");
    }
    Ok(if released { Outcome::Done } else { Outcome::No })
}

async fn sweep(opened: &Opened, json: bool) -> CliResult {
    let started = Instant::now();
    let (admin, bar) = tracked(opened.store(), "sweeping");
    let report = admin.sweep().await.map_err(|e| e.to_string())?;
    bar.finish();
    let took = started.elapsed();
    if json {
        print_json(&json!({
            "examined": report.examined,
            "removed": report.removed,
            "corrupt_skipped": report.corrupt,
            "seconds": took.as_secs_f64(),
        }));
    } else {
        println!(
            "examined {} records, removed {} expired, skipped {} corrupt, in {}",
            report.examined,
            report.removed,
            report.corrupt,
            timing(took)
        );
    }
    Ok(Outcome::Done)
}

async fn verify(opened: &Opened, json: bool) -> CliResult {
    let started = Instant::now();
    let (admin, bar) = tracked(opened.store(), "verifying");
    let report = admin.verify().await.map_err(|e| e.to_string())?;
    bar.finish();
    if json {
        let problems: Vec<_> = report
            .problems
            .iter()
            .map(|p| json!({ "namespace": p.namespace, "key": p.key, "reason": p.reason }))
            .collect();
        print_json(&json!({
            "examined": report.examined,
            "namespaces": report.namespaces,
            "problems": problems,
            "ok": report.problems.is_empty(),
        }));
    } else {
        for problem in &report.problems {
            println!("BAD {problem}");
        }
        println!(
            "verified {} records in {} namespaces in {}: {}",
            report.examined,
            report.namespaces,
            timing(started.elapsed()),
            match report.problems.len() {
                0 => "no problems".to_owned(),
                n => format!("{n} problems"),
            }
        );
    }
    Ok(if report.problems.is_empty() {
        Outcome::Done
    } else {
        Outcome::No
    })
}

async fn export(
    opened: &Opened,
    namespace: Option<String>,
    out: Option<&Path>,
    json: bool,
) -> CliResult {
    let started = Instant::now();
    let names = opened.namespaces(namespace.as_deref()).await?;
    let mut sink: Box<dyn std::io::Write + Send> = match out {
        Some(path) => Box::new(
            std::fs::File::create(path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let bar = Bar::records("exporting");
    let (mut records, mut corrupt) = (0, Vec::new());
    for name in &names {
        let handle = opened.handle(name).await?;
        let walked = bar.base();
        let exported = handle
            .admin()
            .progress(move |n| walked.set(n))
            .export(sink)
            .await
            .map_err(|e| e.to_string())?;
        sink = exported.out;
        records += exported.records;
        corrupt.extend(exported.corrupt.into_iter().map(|k| format!("{name}/{k}")));
    }
    bar.finish();
    sink.flush()
        .map_err(|e| format!("writing the export: {e}"))?;
    drop(sink);
    if let Some(path) = out {
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("syncing {}: {e}", path.display()))?;
    }
    let took = started.elapsed();
    let summary = if json {
        json!({
            "records": records,
            "namespaces": names.len(),
            "corrupt_left_out": corrupt,
            "seconds": took.as_secs_f64(),
        })
        .to_string()
    } else {
        format!(
            "exported {records} records from {} namespaces in {}",
            names.len(),
            timing(took)
        )
    };
    // The records own standard output when no file is given.
    if out.is_some() {
        println!("{summary}");
    } else {
        eprintln!("{summary}");
    }
    for key in &corrupt {
        eprintln!("left out a corrupt record: {key} (run verify)");
    }
    Ok(if corrupt.is_empty() {
        Outcome::Done
    } else {
        Outcome::No
    })
}

async fn import(
    opened: &Opened,
    from: std::fs::File,
    on_conflict: OnConflict,
    json: bool,
) -> CliResult {
    let started = Instant::now();
    let (admin, bar) = tracked(opened.store(), "importing");
    let report = admin.import(from, on_conflict).await.map_err(|e| match e {
        Error::ImportConflict { .. } => {
            format!("{e} (--on-conflict keep|replace)")
        }
        e => e.to_string(),
    })?;
    bar.finish();
    let took = started.elapsed();
    if json {
        print_json(&json!({
            "lines": report.lines,
            "written": report.written,
            "unchanged": report.unchanged,
            "kept": report.kept,
            "replaced": report.replaced,
            "token_floor": report.token_floor,
            "seconds": took.as_secs_f64(),
        }));
    } else {
        println!(
            "imported {} lines in {}: {} written, {} unchanged, {} kept, {} replaced; \
             new tokens start above {}",
            report.lines,
            timing(took),
            report.written,
            report.unchanged,
            report.kept,
            report.replaced,
            report.token_floor
        );
    }
    Ok(Outcome::Done)
}

async fn compact(builder: Builder, db: &Path, json: bool) -> CliResult {
    let started = Instant::now();
    let pause_at = std::env::var(open::PAUSE_VARIABLE).ok();
    let pause = move |step: &str| {
        if pause_at.as_deref() == Some(step) {
            open::pause(step);
        }
    };
    let bar = Bar::records("copying");
    let walked = bar.base();
    let progress_pause = pause.clone();
    let compacted = sled_idempotency::admin::compact(
        builder,
        Some(std::sync::Arc::new(move |n| {
            walked.set(n);
            // The first report comes after a few thousand records: mid-copy.
            progress_pause("copying");
        })),
        |step| {
            pause(match step {
                CompactStep::Opened => "opened",
                CompactStep::Copied => "copied",
                CompactStep::Swapped => "swapped",
                _ => "removed",
            })
        },
    )
    .await
    .map_err(|e| open::explain(db, e))?;
    bar.finish();
    let took = started.elapsed();
    let (before, after) = (compacted.bytes_before, compacted.bytes_after);
    if json {
        print_json(&json!({
            "records": compacted.report.records,
            "dropped": compacted.report.dropped,
            "namespaces": compacted.report.namespaces,
            "bytes_before": before,
            "bytes_after": after,
            "token_floor": compacted.report.token_floor,
            "seconds": took.as_secs_f64(),
        }));
    } else {
        println!(
            "compacted {} in {}: {} records kept, {} expired dropped; {} before, {} after ({:.1}%)",
            db.display(),
            timing(took),
            compacted.report.records,
            compacted.report.dropped,
            bytes(before),
            bytes(after),
            100.0 * after as f64 / before.max(1) as f64
        );
    }
    Ok(Outcome::Done)
}
