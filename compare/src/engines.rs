//! One adapter trait and its implementations: the same claim semantics
//! (insert the key if absent, else report it) on each engine.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use sled_idempotency::{Durability, MessageId, SledIdempotencyStore};

use crate::Settings;
use crate::sample::Sample;

pub const TTL: Duration = Duration::from_secs(3600);

/// Keys never repeat across engines or runs of one process.
static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

pub fn fresh() -> u64 {
    NEXT_KEY.fetch_add(1, Ordering::Relaxed)
}

/// An engine that can claim keys.
pub trait Engine {
    /// Name and durability setting, for the table.
    fn label(&self) -> String;
    /// Claims fresh keys from `tasks` concurrent workers: a warm-up, then
    /// `settings.measure` of timed claims.
    fn run(&self, tasks: usize, settings: &Settings) -> Sample;
}

/// Runs `tasks` OS threads, each with its own connection from `connect`,
/// claiming with `claim` until the measurement ends.
fn run_threads<C>(
    tasks: usize,
    settings: &Settings,
    connect: impl Fn() -> C + Sync,
    claim: impl Fn(&mut C, u64) + Sync,
) -> Sample {
    let barrier = Barrier::new(tasks);
    let (warmup, measure) = (settings.warmup, settings.measure);
    let start = std::sync::OnceLock::new();
    let parts: Vec<Vec<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                s.spawn(|| {
                    let mut conn = connect();
                    barrier.wait();
                    let warm_until = Instant::now() + warmup;
                    while Instant::now() < warm_until {
                        claim(&mut conn, fresh());
                    }
                    barrier.wait();
                    let begin = *start.get_or_init(Instant::now);
                    let mut latencies = Vec::new();
                    while begin.elapsed() < measure {
                        let t = Instant::now();
                        claim(&mut conn, fresh());
                        latencies.push(t.elapsed().as_nanos() as u64);
                    }
                    latencies
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker thread"))
            .collect()
    });
    let elapsed = start.get().map_or(measure, |s| s.elapsed());
    Sample::merge(parts, elapsed)
}

/// sled-idempotency, driven from tokio tasks as a worker would.
pub struct Ours {
    _dir: tempfile::TempDir,
    store: SledIdempotencyStore,
    runtime: tokio::runtime::Runtime,
    durability: Durability,
}

impl Ours {
    pub fn open(durability: Durability) -> Ours {
        let runtime = crate::sample::runtime();
        let dir = tempfile::tempdir().expect("tempdir");
        let store = runtime
            .block_on(
                SledIdempotencyStore::builder(dir.path().join("db"))
                    .durability(durability)
                    .open(),
            )
            .expect("open the store");
        Ours {
            _dir: dir,
            store,
            runtime,
            durability,
        }
    }
}

impl Engine for Ours {
    fn label(&self) -> String {
        format!("**sled-idempotency** {:?}", self.durability)
    }

    fn run(&self, tasks: usize, settings: &Settings) -> Sample {
        let store = self.store.clone();
        let claim = move |n: u64| {
            let store = store.clone();
            async move {
                let key = MessageId::from_uuid(uuid::Uuid::from_u128(u128::from(n)));
                store.try_claim(&key, TTL).await.expect("claim");
            }
        };
        self.runtime
            .block_on(run_tasks(tasks, settings, fresh, claim))
    }
}

/// Runs `tasks` tokio tasks, each calling `claim(next())` in a loop: a
/// warm-up, then `settings.measure` of timed calls.
pub async fn run_tasks<F, Fut>(
    tasks: usize,
    settings: &Settings,
    next: fn() -> u64,
    claim: F,
) -> Sample
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let (warmup, measure) = (settings.warmup, settings.measure);
    let barrier = Arc::new(tokio::sync::Barrier::new(tasks));
    let start = Arc::new(std::sync::OnceLock::new());
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (claim, barrier, start) = (claim.clone(), barrier.clone(), start.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let warm_until = Instant::now() + warmup;
                while Instant::now() < warm_until {
                    claim(next()).await;
                }
                barrier.wait().await;
                let begin = *start.get_or_init(Instant::now);
                let mut latencies = Vec::new();
                while begin.elapsed() < measure {
                    let t = Instant::now();
                    claim(next()).await;
                    latencies.push(t.elapsed().as_nanos() as u64);
                }
                latencies
            })
        })
        .collect();
    let mut parts = Vec::new();
    for h in handles {
        parts.push(h.await.expect("task"));
    }
    let elapsed = start.get().map_or(measure, |s: &Instant| s.elapsed());
    Sample::merge(parts, elapsed)
}

/// Opens raw sled at `path` configured as the store configures it: the
/// store's default cache, no background flusher.
pub fn raw_sled(path: &std::path::Path) -> sled::Db {
    sled::Config::new()
        .path(path)
        .cache_capacity(sled_idempotency::DEFAULT_CACHE_CAPACITY)
        .flush_every_ms(None)
        .open()
        .expect("open raw sled")
}

/// Raw sled: one compare-and-swap per claim, plus `flush()` per write when
/// durable. The limit beneath the store.
pub struct RawSled {
    _dir: tempfile::TempDir,
    db: sled::Db,
    tree: sled::Tree,
    durable: bool,
}

impl RawSled {
    pub fn open(durable: bool) -> RawSled {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = raw_sled(dir.path());
        let tree = db.open_tree("records").expect("tree");
        RawSled {
            _dir: dir,
            db,
            tree,
            durable,
        }
    }
}

impl Engine for RawSled {
    fn label(&self) -> String {
        format!(
            "raw sled CAS{}",
            if self.durable {
                " + flush() per write"
            } else {
                ""
            }
        )
    }

    fn run(&self, tasks: usize, settings: &Settings) -> Sample {
        run_threads(
            tasks,
            settings,
            || (),
            |_, n| {
                let key = u128::from(n).to_be_bytes();
                let swapped = self
                    .tree
                    .compare_and_swap(key, None::<&[u8]>, Some(&[1u8; 18][..]));
                assert!(matches!(swapped, Ok(Ok(()))), "a fresh key is claimed");
                if self.durable {
                    self.db.flush().expect("flush");
                }
            },
        )
    }
}

/// SQLite in WAL mode, one connection per worker thread.
pub struct Sqlite {
    _dir: tempfile::TempDir,
    path: PathBuf,
    durable: bool,
}

impl Sqlite {
    pub fn open(durable: bool) -> Sqlite {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("claims.db");
        let conn = rusqlite::Connection::open(&path).expect("open sqlite");
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE claims (key BLOB PRIMARY KEY, state INTEGER NOT NULL, expires_at INTEGER NOT NULL) WITHOUT ROWID;",
        )
        .expect("schema");
        Sqlite {
            _dir: dir,
            path,
            durable,
        }
    }

    fn connect(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(&self.path).expect("connect");
        conn.busy_timeout(Duration::from_secs(30))
            .expect("busy timeout");
        let sync = if self.durable { "FULL" } else { "OFF" };
        conn.execute_batch(&format!("PRAGMA synchronous={sync};"))
            .expect("pragma");
        conn
    }
}

impl Engine for Sqlite {
    fn label(&self) -> String {
        format!(
            "SQLite WAL synchronous={}",
            if self.durable { "FULL" } else { "OFF" }
        )
    }

    fn run(&self, tasks: usize, settings: &Settings) -> Sample {
        run_threads(
            tasks,
            settings,
            || self.connect(),
            |conn, n| {
                let key = u128::from(n).to_be_bytes();
                let inserted = conn
                    .prepare_cached(
                        "INSERT INTO claims (key, state, expires_at) VALUES (?1, 0, ?2) ON CONFLICT(key) DO NOTHING",
                    )
                    .and_then(|mut s| s.execute(rusqlite::params![&key[..], 4_000_000_000_000i64]))
                    .expect("insert");
                if inserted == 0 {
                    let _state: i64 = conn
                        .query_row("SELECT state FROM claims WHERE key = ?1", [&key[..]], |r| {
                            r.get(0)
                        })
                        .expect("select");
                }
            },
        )
    }
}

/// A `redis-server` started on a free loopback port in a temporary
/// directory, stopped when dropped.
pub struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    pub fn server() -> Result<Redis, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("cannot start redis-server ({e}); install it (Debian: redis-server)")
            })?;
        let server = Redis {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if server.ping().is_ok() {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("redis-server did not answer PING within 10 s".into())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn client(&self) -> redis::RedisResult<redis::Client> {
        redis::Client::open(self.url())
    }

    fn ping(&self) -> redis::RedisResult<()> {
        let mut conn = self.client()?.get_connection()?;
        redis::cmd("PING").query::<String>(&mut conn).map(|_| ())
    }

    /// Switches persistence to `appendfsync always` (durable) or off, and
    /// returns an engine for it.
    pub fn engine(&self, durable: bool) -> redis::RedisResult<RedisEngine> {
        let client = self.client()?;
        let mut conn = client.get_connection()?;
        redis::cmd("FLUSHALL").query::<()>(&mut conn)?;
        let (appendonly, fsync) = if durable {
            ("yes", "always")
        } else {
            ("no", "no")
        };
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("appendonly")
            .arg(appendonly)
            .query::<()>(&mut conn)?;
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("appendfsync")
            .arg(fsync)
            .query::<()>(&mut conn)?;
        Ok(RedisEngine { client, durable })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `SET n p NX PX ttl`: the claim Redis users write by hand.
pub fn set_nx(n: u64) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(n)
        .arg("p")
        .arg("NX")
        .arg("PX")
        .arg(TTL.as_millis() as u64);
    cmd
}

/// Redis `SET key value NX PX ttl`.
pub struct RedisEngine {
    client: redis::Client,
    durable: bool,
}

impl Engine for RedisEngine {
    fn label(&self) -> String {
        if self.durable {
            "Redis appendfsync always".into()
        } else {
            "Redis, no persistence".into()
        }
    }

    fn run(&self, tasks: usize, settings: &Settings) -> Sample {
        run_threads(
            tasks,
            settings,
            || self.client.get_connection().expect("redis connection"),
            |conn, n| {
                let set: Option<String> = set_nx(n).query(conn).expect("SET NX");
                if set.is_none() {
                    let _: Option<String> = redis::cmd("GET").arg(n).query(conn).expect("GET");
                }
            },
        )
    }
}

/// This disk's own limit for one durable writer: 4 KiB writes, each
/// followed by fdatasync, the loop a write-ahead log runs. `preallocated`
/// writes over a file already written and synced to its full size (nothing
/// but data to commit, as a reused log segment); otherwise each write
/// appends to a growing file (its size is metadata the sync must commit
/// too).
pub struct Device {
    _dir: tempfile::TempDir,
    path: PathBuf,
    preallocated: bool,
}

/// Size of the preallocated file: the writes wrap around inside it.
const DEVICE_FILE: u64 = 64 << 20;
const DEVICE_WRITE: usize = 4096;

impl Device {
    pub fn open(preallocated: bool) -> Device {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("device");
        let mut file = std::fs::File::create(&path).expect("create");
        if preallocated {
            // Written, not fallocate'd: unwritten extents would make every
            // first write of a block commit an extent conversion.
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..DEVICE_FILE >> 20 {
                file.write_all(&zeros).expect("preallocate");
            }
        }
        file.sync_all().expect("sync");
        std::fs::File::open(dir.path())
            .and_then(|d| d.sync_all())
            .expect("sync the directory");
        Device {
            _dir: dir,
            path,
            preallocated,
        }
    }
}

impl Engine for Device {
    fn label(&self) -> String {
        format!(
            "this disk: 4 KiB write + fdatasync, {}",
            if self.preallocated {
                "preallocated file"
            } else {
                "appending to a growing file"
            }
        )
    }

    fn run(&self, tasks: usize, settings: &Settings) -> Sample {
        use std::os::unix::fs::FileExt;
        let block = [0x5au8; DEVICE_WRITE];
        let offset = AtomicU64::new(0);
        run_threads(
            tasks,
            settings,
            || {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&self.path)
                    .expect("open")
            },
            |file, _| {
                let at = offset.fetch_add(DEVICE_WRITE as u64, Ordering::Relaxed);
                let at = if self.preallocated {
                    at % DEVICE_FILE
                } else {
                    at
                };
                file.write_all_at(&block, at).expect("write");
                file.sync_data().expect("fdatasync");
            },
        )
    }
}

/// The crate's write-ahead log (`src/sled_engine/wal.rs`) on its own, behind a
/// sled compare-and-swap: what the store's `Sync` path costs once the log
/// carries it. Each claim is a CAS of a fresh key (no sled flush), a 64-byte
/// entry appended, and a wait for the group's fdatasync; a checkpoint
/// thread flushes sled and fdatasyncs its file every 100 ms and then lets
/// the log reuse what that covers, as the store's will.
pub struct LogAlone {
    _dir: tempfile::TempDir,
    tree: sled::Tree,
    log: Arc<crate::wal::Log>,
    runtime: tokio::runtime::Runtime,
    stop: Arc<std::sync::atomic::AtomicBool>,
    checkpointer: Option<std::thread::JoinHandle<()>>,
}

impl LogAlone {
    pub fn open() -> LogAlone {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = raw_sled(&dir.path().join("sled"));
        let tree = db.open_tree("records").expect("tree");
        let config = crate::wal::Config {
            segment_bytes: 64 << 20,
            segments: 2,
        };
        let (log, _) =
            crate::wal::Log::open(&dir.path().join("wal"), config, 0).expect("open the log");
        let log = Arc::new(log);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let checkpointer = {
            let (log, stop) = (log.clone(), stop.clone());
            let sled_log =
                std::fs::File::open(dir.path().join("sled").join("db")).expect("sled's log");
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    // Every entry up to `covered` was appended after its CAS
                    // landed, so the flush that starts now covers them.
                    let covered = log.appended();
                    db.flush().expect("flush sled");
                    sled_log.sync_data().expect("fdatasync sled's log");
                    log.checkpointed(covered);
                }
            })
        };
        LogAlone {
            _dir: dir,
            tree,
            log,
            runtime: tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            stop,
            checkpointer: Some(checkpointer),
        }
    }
}

impl Drop for LogAlone {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.checkpointer.take() {
            let _ = thread.join();
        }
    }
}

impl Engine for LogAlone {
    fn label(&self) -> String {
        "sled CAS + the crate's write-ahead log alone (not yet in the store)".into()
    }

    fn run(&self, tasks: usize, settings: &Settings) -> Sample {
        let (tree, log) = (self.tree.clone(), self.log.clone());
        let claim = move |n: u64| {
            let (tree, log) = (tree.clone(), log.clone());
            async move {
                let key = u128::from(n).to_be_bytes();
                let swapped = tree.compare_and_swap(key, None::<&[u8]>, Some(&[1u8; 18][..]));
                assert!(matches!(swapped, Ok(Ok(()))), "a fresh key is claimed");
                let mut entry = [0u8; 64];
                entry[..16].copy_from_slice(&key);
                let lsn = log.append(&entry).expect("append");
                log.wait(lsn).await.expect("durable");
            }
        };
        self.runtime
            .block_on(run_tasks(tasks, settings, fresh, claim))
    }
}
