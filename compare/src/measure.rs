//! Timing, statistics and the markdown output.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sled_idempotency::{
    DEFAULT_PENDING_RETENTION, Durability, ManualClock, MessageId, SledIdempotencyStore, State,
};

use crate::Settings;
use crate::engines::raw_sled;
use crate::sample::{Sample, runtime};

pub struct Row {
    scenario: String,
    engine: String,
    tasks: usize,
    throughput: f64,
    p50: Duration,
    p99: Duration,
    ours_over_it: f64,
}

impl Row {
    pub fn new(scenario: &str, engine: &str, tasks: usize, sample: &Sample, ours: f64) -> Row {
        Row {
            scenario: scenario.to_owned(),
            engine: engine.to_owned(),
            tasks,
            throughput: sample.throughput(),
            p50: sample.percentile(0.50),
            p99: sample.percentile(0.99),
            ours_over_it: ours / sample.throughput(),
        }
    }
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | engine | tasks | claims/s | p50 | p99 | ours ÷ engine |\n|---|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} | {} | {} | {:.2}× |\n",
            r.scenario,
            r.engine,
            r.tasks,
            r.throughput,
            micros(r.p50),
            micros(r.p99),
            r.ours_over_it
        ));
    }
    out
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A markdown line naming the machine the numbers come from.
pub fn machine() -> String {
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0);
    let kernel = read("/proc/sys/kernel/osrelease");
    let tmp = std::env::temp_dir();
    let fs = read("/proc/mounts")
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, mount, kind) = (f.next()?, f.next()?, f.next()?);
            tmp.starts_with(mount)
                .then(|| (mount.len(), format!("{kind} at {mount}")))
        })
        .max()
        .map_or_else(|| "unknown".into(), |(_, f)| f);
    format!(
        "Machine: {cpu}, {cores} cores, {:.1} GiB, Linux {}, temporary files on {fs}.\n",
        mem_kib as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}

fn key(n: u64) -> MessageId {
    MessageId::from_uuid(uuid::Uuid::from_u128(u128::from(n)))
}

/// Claims new keys from one task until `until()` is false; latencies in ns.
async fn claim_while(
    store: &SledIdempotencyStore,
    first: u64,
    until: impl Fn(u64) -> bool,
) -> Vec<u64> {
    claim_at(store, first, None, until).await
}

/// [`claim_while`], at most `rate` claims per second when given (a claim
/// waits for its slot; the wait is not counted in its latency).
async fn claim_at(
    store: &SledIdempotencyStore,
    first: u64,
    rate: Option<f64>,
    until: impl Fn(u64) -> bool,
) -> Vec<u64> {
    let mut latencies = Vec::new();
    let mut n = first;
    let began = tokio::time::Instant::now();
    while until(n - first) {
        if let Some(rate) = rate {
            let slot = began + Duration::from_secs_f64((n - first) as f64 / rate);
            tokio::time::sleep_until(slot).await;
        }
        let start = Instant::now();
        store
            .try_claim(&key(n), Duration::from_secs(3600))
            .await
            .expect("claim");
        latencies.push(start.elapsed().as_nanos() as u64);
        n += 1;
    }
    latencies
}

/// Claim p99 latency with the store idle, then while the background
/// sweeper removes `settings.big` expired records, per durability mode.
pub fn sweep_impact(settings: &Settings) -> String {
    let rt = runtime();
    let mut out = format!(
        "Claim latency while the background sweeper removes {} expired records (one task claiming new keys, as fast as it can or at a fixed rate):\n\n| durability | claims/s | idle p50 | idle p99 | during sweep p50 | during sweep p99 | sweep p99 ÷ idle p99 | sweep took |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
        settings.big
    );
    for (name, durability, rate) in [
        (
            "Periodic",
            Durability::Periodic(Duration::from_millis(100)),
            None,
        ),
        (
            "Periodic",
            Durability::Periodic(Duration::from_millis(100)),
            Some(30_000.0),
        ),
        ("Sync", Durability::Sync, None),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::new(1_800_000_000_000);
        let (idle, busy, took) = rt.block_on(async {
            let store = fill(
                &dir.path().join("db"),
                &clock,
                settings.big,
                Duration::from_secs(1),
            )
            .await;
            store.close().await.expect("close");
            // The background sweeper, woken every second (its first sweep
            // begins within a second of the clock's jump).
            let store = SledIdempotencyStore::builder(dir.path().join("db"))
                .clock(clock.clone())
                .durability(durability)
                .sweep_interval(Duration::from_secs(1))
                .open()
                .await
                .expect("open");
            let measure = settings.measure;
            let start = Instant::now();
            let idle = claim_at(&store, 1 << 40, rate, |_| start.elapsed() < measure).await;
            let idle = Sample::merge(vec![idle], start.elapsed());
            // Past the claims' expiry and their pending retention.
            clock.advance(Duration::from_secs(1) + DEFAULT_PENDING_RETENTION);
            let swept = |store: &SledIdempotencyStore| {
                let store = store.clone();
                async move { store.stats().await.expect("stats").swept }
            };
            // Claims count from the sweep's first removal to its last.
            let before = swept(&store).await;
            while swept(&store).await == before {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let started = Instant::now();
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let watcher = {
                let (store, done, big) = (store.clone(), done.clone(), settings.big);
                tokio::spawn(async move {
                    while swept(&store).await < before + big {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    done.store(true, std::sync::atomic::Ordering::SeqCst);
                    started.elapsed()
                })
            };
            let busy = claim_at(&store, 1 << 41, rate, |_| {
                !done.load(std::sync::atomic::Ordering::SeqCst)
            })
            .await;
            let busy = Sample::merge(vec![busy], started.elapsed());
            let took = watcher.await.expect("watcher task");
            assert_eq!(swept(&store).await, before + settings.big);
            store.close().await.expect("close");
            (idle, busy, took)
        });
        out.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} | {:.2}× | {:.2?} |\n",
            match rate {
                Some(rate) => format!("{rate:.0}"),
                None => format!("as fast as it can ({:.0} idle)", idle.throughput()),
            },
            micros(idle.percentile(0.5)),
            micros(idle.percentile(0.99)),
            micros(busy.percentile(0.5)),
            micros(busy.percentile(0.99)),
            busy.percentile(0.99).as_secs_f64() / idle.percentile(0.99).as_secs_f64(),
            took
        ));
    }
    out
}

/// Writes `count` claims with one flush at the end (as `raw_fill` does for
/// raw sled), so both databases are written the same way.
async fn fill(path: &Path, clock: &ManualClock, count: u64, ttl: Duration) -> SledIdempotencyStore {
    let store = SledIdempotencyStore::builder(path)
        .durability(Durability::Periodic(Duration::from_secs(3600)))
        .clock(clock.clone())
        .open()
        .await
        .expect("open");
    for n in 0..count {
        store.try_claim(&key(n), ttl).await.expect("fill");
    }
    store
}

fn raw_fill(path: &Path, count: u64) {
    let db = raw_sled(path);
    let tree = db.open_tree("records").expect("tree");
    for n in 0..count {
        let k = u128::from(n).to_be_bytes();
        tree.compare_and_swap(k, None::<&[u8]>, Some(&[7u8; 16][..]))
            .expect("cas")
            .expect("new key");
    }
    db.flush().expect("flush");
}

/// Bytes allocated on disk below `path`.
fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(path).expect("read_dir").flatten() {
        let meta = entry.metadata().expect("metadata");
        total += if meta.is_dir() {
            disk_bytes(&entry.path())
        } else {
            meta.blocks() * 512
        };
    }
    total
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Disk bytes per live record, peak memory, and reopen time, ours against
/// raw sled holding the same keys with 16-byte values.
pub fn space_and_reopen(settings: &Settings) -> String {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let (ours, raw) = (dir.path().join("ours"), dir.path().join("raw"));
    let clock = ManualClock::new(1_800_000_000_000);
    rt.block_on(async {
        let store = fill(&ours, &clock, settings.big, Duration::from_secs(3600)).await;
        store.close().await.expect("close");
    });
    raw_fill(&raw, settings.big);
    let (ours_bytes, raw_bytes) = (disk_bytes(&ours), disk_bytes(&raw));

    // Each reopen runs in a fresh process, as a restarted worker would:
    // same page cache, cold allocator, nothing left over from the last open.
    let mut ours_open = Vec::new();
    let mut raw_open = Vec::new();
    let mut raw_on_ours = Vec::new();
    for _ in 0..5 {
        ours_open.push(reopen_in_child("ours", &ours));
        raw_open.push(reopen_in_child("raw", &raw));
        raw_on_ours.push(reopen_in_child("raw", &ours));
    }
    let raw_on_ours = median(raw_on_ours);
    let (ours_open, raw_open) = (median(ours_open), median(raw_open));
    let per = |bytes: u64| bytes as f64 / settings.big as f64;
    let (ours_peak, raw_peak) = (
        peak_rss("ours", settings.big),
        peak_rss("raw", settings.big),
    );
    format!(
        "Space, memory and reopen with {n} live records (ours: records as written by claims; raw sled: the same keys with 16-byte values; both with a {cache} MiB cache):\n\n| measure | ours | raw sled | ours ÷ raw sled |\n|---|---:|---:|---:|\n| disk bytes per live record | {:.1} | {:.1} | {:.2}× |\n| peak RSS while writing them | {} | {} | {:.2}× |\n| reopen in a fresh process (median of 5) | {:.2?} | {:.2?} | {:.2}× |\n| raw sled opening our database, same way | {raw_on_ours:.2?} | | {:.2}× |\n",
        per(ours_bytes),
        per(raw_bytes),
        ours_bytes as f64 / raw_bytes as f64,
        ours_peak.map_or("n/a".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0)),
        raw_peak.map_or("n/a".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0)),
        match (ours_peak, raw_peak) {
            (Some(o), Some(r)) => o as f64 / r as f64,
            _ => f64::NAN,
        },
        ours_open,
        raw_open,
        ours_open.as_secs_f64() / raw_open.as_secs_f64(),
        raw_on_ours.as_secs_f64() / raw_open.as_secs_f64(),
        n = settings.big,
        cache = sled_idempotency::DEFAULT_CACHE_CAPACITY >> 20,
    )
}

/// Time to open the database at `path` in a fresh child process.
fn reopen_in_child(which: &str, path: &Path) -> Duration {
    let exe = std::env::current_exe().expect("current exe");
    let out = std::process::Command::new(exe)
        .args(["--reopen-child", which])
        .arg(path)
        .output()
        .expect("reopen child");
    let nanos: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("reopen time");
    Duration::from_nanos(nanos)
}

/// In the child: open the database, print how long it took (ns), close.
pub fn reopen_child(args: &[String]) {
    let (which, path) = (args[0].as_str(), Path::new(&args[1]));
    if which == "ours" {
        let rt = runtime();
        let start = Instant::now();
        let store = rt
            .block_on(SledIdempotencyStore::open(path))
            .expect("reopen");
        println!("{}", start.elapsed().as_nanos());
        rt.block_on(store.close()).expect("close");
    } else {
        let start = Instant::now();
        let db = raw_sled(path);
        let tree = db.open_tree("records").expect("tree");
        println!("{}", start.elapsed().as_nanos());
        drop((tree, db));
    }
}

/// Peak RSS (KiB) of a child process writing `count` records.
fn peak_rss(which: &str, count: u64) -> Option<u64> {
    let exe = std::env::current_exe().ok()?;
    let out = std::process::Command::new(exe)
        .args(["--peak-rss-child", which, &count.to_string()])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// In the child: write the records, print VmHWM in KiB.
pub fn peak_rss_child(args: &[String]) {
    let (which, count) = (args[0].as_str(), args[1].parse::<u64>().expect("count"));
    let dir = tempfile::tempdir().expect("tempdir");
    if which == "ours" {
        let rt = runtime();
        let clock = ManualClock::new(1_800_000_000_000);
        rt.block_on(async {
            let store = fill(
                &dir.path().join("db"),
                &clock,
                count,
                Duration::from_secs(3600),
            )
            .await;
            store.close().await.expect("close");
        });
    } else {
        raw_fill(&dir.path().join("db"), count);
    }
    let hwm = read("/proc/self/status")
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmHWM:")
                .map(|v| v.trim().trim_end_matches(" kB").to_owned())
        })
        .unwrap_or_default();
    println!("{hwm}");
}

/// The longest a 1 ms ticker task on the same current-thread runtime was
/// late while `work` ran, and how long `work` took: how much an inspection
/// call holds up the other tasks of the runtime it is awaited on.
async fn stall_during<F: std::future::Future<Output = ()>>(work: F) -> (Duration, Duration) {
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let start = Instant::now();
                tokio::time::sleep(Duration::from_millis(1)).await;
                worst = worst.max(start.elapsed().saturating_sub(Duration::from_millis(1)));
            }
            worst
        })
    };
    tokio::task::yield_now().await; // let the ticker start
    let start = Instant::now();
    work.await;
    let took = start.elapsed();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    (ticker.await.expect("ticker"), took)
}

/// Claims of new keys from one task for `measure`: claims per second.
async fn claim_rate(store: &SledIdempotencyStore, first: u64, measure: Duration) -> f64 {
    let start = Instant::now();
    let done = claim_while(store, first, |_| start.elapsed() < measure).await;
    done.len() as f64 / start.elapsed().as_secs_f64()
}

/// `list` and `stats` on a namespace of `settings.big` done records and 10
/// pending ones (the newest keys): each call's latency (median of 5; the
/// first pending listing alone, since it builds the pending index) and the
/// worst lateness of a 1 ms ticker on the same current-thread runtime; and
/// the claim rate of one task before and after the pending index exists.
pub fn scans(settings: &Settings) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(1_800_000_000_000);
    let big = settings.big;
    let (rows, untracked, tracked) = rt.block_on(async {
        let store = fill(
            &dir.path().join("db"),
            &clock,
            big,
            Duration::from_secs(3600),
        )
        .await;
        for n in 0..big {
            store.mark_done(&key(n)).await.expect("done");
        }
        for n in big..big + 10 {
            store
                .try_claim(&key(n), Duration::from_secs(3600))
                .await
                .expect("claim");
        }
        let untracked = claim_rate(&store, 1 << 40, settings.measure).await;
        let mut rows = Vec::new();
        type Call<'a> =
            Box<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>> + 'a>;
        let pending: Call = Box::new(|| {
            Box::pin(async {
                let page = store
                    .list(Some(State::Pending), None, 10)
                    .await
                    .expect("list");
                assert_eq!(page.len(), 10);
            })
        });
        let (stall, took) = stall_during(pending()).await;
        rows.push((
            "list(Some(Pending), None, 10), first call".to_string(),
            took,
            stall,
        ));
        let tracked = claim_rate(&store, 1 << 41, settings.measure).await;
        let calls: Vec<(&str, Call)> = vec![
            ("list(Some(Pending), None, 10)", pending),
            (
                "list(None, None, 100)",
                Box::new(|| {
                    Box::pin(async {
                        store.list(None, None, 100).await.expect("list");
                    })
                }),
            ),
            (
                "stats()",
                Box::new(|| {
                    Box::pin(async {
                        store.stats().await.expect("stats");
                    })
                }),
            ),
        ];
        for (name, call) in &calls {
            let mut took = Vec::new();
            let mut stalls = Vec::new();
            for _ in 0..5 {
                let (stall, t) = stall_during(call()).await;
                took.push(t);
                stalls.push(stall);
            }
            rows.push((
                name.to_string(),
                median(took),
                stalls.into_iter().max().unwrap_or_default(),
            ));
        }
        store.close().await.expect("close");
        (rows, untracked, tracked)
    });
    let mut out = format!(
        "Inspection on {big} done and 10 pending records (Periodic durability, current-thread runtime):\n\n| call | latency (median of 5) | worst lateness of a 1 ms ticker on the same runtime |\n|---|---:|---:|\n"
    );
    for (name, took, stall) in rows {
        out.push_str(&format!("| `{name}` | {took:.2?} | {stall:.2?} |\n"));
    }
    out.push_str(&format!(
        "\nClaims of new keys, one task: {untracked:.0}/s before the pending index exists, {tracked:.0}/s after ({:.2}×).\n",
        tracked / untracked
    ));
    out
}

/// Removing 100,000 forgotten records from a database that also holds
/// `live` records with a day to live: how long one `sweep_expired` takes.
fn sweep_of_100k_beside(live: u64) -> Duration {
    const EXPIRING: u64 = 100_000;
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(1_800_000_000_000);
    let path = dir.path().join("db");
    let open = || {
        SledIdempotencyStore::builder(&path)
            .durability(Durability::Periodic(Duration::from_secs(1)))
            .pending_retention(Duration::ZERO)
            // Only the sweep measured removes records.
            .sweep_interval(Duration::from_secs(86_400))
            .clock(clock.clone())
            .open()
    };
    rt.block_on(async {
        let store = open().await.expect("open");
        // The expiring claims spread among the live ones, in key order.
        let every = live / EXPIRING + 1;
        let (mut expiring, mut n) = (0, 0);
        while n < live + EXPIRING {
            let ttl = if n % every == 0 && expiring < EXPIRING {
                expiring += 1;
                Duration::from_secs(1)
            } else {
                Duration::from_secs(86_400)
            };
            store.try_claim(&key(n), ttl).await.expect("fill");
            n += 1;
        }
        store.close().await.expect("close");
        let store = open().await.expect("reopen");
        clock.advance(Duration::from_secs(2));
        let start = Instant::now();
        let report = store.sweep_expired().await.expect("sweep");
        let took = start.elapsed();
        assert_eq!(report.removed, expiring, "every expired record removed");
        store.close().await.expect("close");
        took
    })
}

/// Resident and peak memory of this process (kB), from /proc.
fn rss_kb() -> (u64, u64) {
    let status = read("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The scale section: sweep cost against database size, and a churn soak
/// (`SOAK_CLAIMS` claims, default 50,000,000, each living 200 s of a clock
/// that moves 1 ms per claim, so about 200,000 are live; a sweep every
/// 100,000 claims), with disk size and memory every tenth of the run.
pub fn scale(settings: &Settings) -> String {
    let small = 200_000;
    let large = std::env::var("SCALE_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(settings.big * 10);
    eprintln!("scale: sweep beside {small} live records");
    let small_took = sweep_of_100k_beside(small);
    eprintln!("scale: sweep beside {large} live records");
    let large_took = sweep_of_100k_beside(large);
    let out = format!(
        "Sweep cost against database size (`Periodic`, one `sweep_expired()` removing 100,000 forgotten records spread among the live ones):\n\n| live records beside them | sweep took | ÷ the {small} case |\n|---:|---:|---:|\n| {small} | {small_took:.2?} | 1.00× |\n| {large} | {large_took:.2?} | {:.2}× |\n\n",
        large_took.as_secs_f64() / small_took.as_secs_f64()
    );
    // Printed as soon as measured: the soak that follows runs long.
    println!("{out}");
    let claims: u64 = std::env::var("SOAK_CLAIMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if settings.big < 1_000_000 {
            2_000_000
        } else {
            50_000_000
        });
    let churn = soak(claims, settings.big / 5);
    println!("{churn}");
    let messages: u64 = std::env::var("CONSUMER_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(claims.min(20_000_000));
    consumer_soak(messages)
}

/// A consumer's soak: every message claimed and marked done, as a worker
/// does; the default `pending_retention` (a day), a done retention of a
/// minute, a clock that moves 100 µs per message (10,000 messages/s), a
/// sweep every 100,000 messages (10 s of that clock). About 600,000 done
/// records are live at a time once a minute of messages has passed: disk
/// and the expiry index must reach a plateau.
pub fn consumer_soak(messages: u64) -> String {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(1_800_000_000_000);
    let path = dir.path().join("db");
    let step = (messages / 10).max(1);
    let rows = rt.block_on(async {
        let store = SledIdempotencyStore::builder(&path)
            .durability(Durability::Periodic(Duration::from_millis(100)))
            .done_retention(Duration::from_secs(60))
            // The soak sweeps itself (see `soak`).
            .sweep_interval(Duration::from_secs(86_400))
            .clock(clock.clone())
            .open()
            .await
            .expect("open");
        let ttl = Duration::from_secs(30);
        let (mut rows, mut since) = (Vec::new(), Instant::now());
        for n in 0..messages {
            store.try_claim(&key(n), ttl).await.expect("claim");
            store.mark_done(&key(n)).await.expect("done");
            // The clock counts whole milliseconds: 1 ms every ten messages.
            if (n + 1) % 10 == 0 {
                clock.advance(Duration::from_millis(1));
            }
            if (n + 1) % 100_000 == 0 {
                store.sweep_expired().await.expect("sweep");
            }
            if (n + 1) % step == 0 {
                let stats = store.stats().await.expect("stats");
                let index = store.admin().expiry_index().await.expect("index");
                rows.push((
                    n + 1,
                    disk_bytes(&path),
                    index,
                    stats.records_done + stats.records_pending,
                    step as f64 / since.elapsed().as_secs_f64(),
                ));
                eprintln!(
                    "consumer soak: {} messages, {} MiB on disk, index {} entries, {} notes",
                    n + 1,
                    disk_bytes(&path) >> 20,
                    index.entries,
                    index.notes
                );
                since = Instant::now();
            }
        }
        store.close().await.expect("close");
        rows
    });
    let mut out = format!(
        "Consumer soak: {messages} messages from one task, each claimed and marked done (`Periodic(100 ms)`, ttl 30 s, done retention 60 s, default `pending_retention`), a clock that moves 100 µs per message (about 600,000 done records live at a time), `sweep_expired()` every 100,000 messages:\n\n| messages | disk | index entries | index notes | index bytes | records stored (`stats()`) | messages/s over the step |\n|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for (n, disk, index, stored, rate) in &rows {
        out.push_str(&format!(
            "| {n} | {:.0} MiB | {} | {} | {:.1} MiB | {stored} | {rate:.0} |\n",
            *disk as f64 / (1 << 20) as f64,
            index.entries,
            index.notes,
            index.bytes as f64 / (1 << 20) as f64,
        ));
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        out.push_str(&format!(
            "\nLast ÷ first: disk {:.2}×, index notes {:.2}×, records stored {:.2}×.\n",
            last.1 as f64 / first.1 as f64,
            last.2.notes as f64 / first.2.notes.max(1) as f64,
            last.3 as f64 / first.3.max(1) as f64,
        ));
    }
    out
}

fn soak(claims: u64, live: u64) -> String {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(1_800_000_000_000);
    let path = dir.path().join("db");
    let step = claims / 10;
    let rows = rt.block_on(async {
        let store = SledIdempotencyStore::builder(&path)
            .durability(Durability::Periodic(Duration::from_millis(100)))
            .pending_retention(Duration::ZERO)
            // The soak sweeps every 100,000 claims itself; the background
            // sweeper (60 s of real time) would remove records uncounted.
            .sweep_interval(Duration::from_secs(86_400))
            .clock(clock.clone())
            .open()
            .await
            .expect("open");
        let ttl = Duration::from_millis(live);
        let (mut rows, mut since, mut swept) = (Vec::new(), Instant::now(), 0);
        for n in 0..claims {
            store.try_claim(&key(n), ttl).await.expect("claim");
            clock.advance(Duration::from_millis(1));
            if (n + 1) % 100_000 == 0 {
                swept += store.sweep_expired().await.expect("sweep").removed;
            }
            if (n + 1) % step == 0 {
                let stats = store.stats().await.expect("stats");
                let (rss, _) = rss_kb();
                rows.push((
                    n + 1,
                    disk_bytes(&path),
                    rss,
                    stats.records_pending,
                    step as f64 / since.elapsed().as_secs_f64(),
                ));
                eprintln!(
                    "soak: {} claims, {} MiB on disk, {} MiB RSS",
                    n + 1,
                    disk_bytes(&path) >> 20,
                    rss >> 10
                );
                since = Instant::now();
            }
        }
        let counted = store.stats().await.expect("stats").swept;
        store.close().await.expect("close");
        assert_eq!(counted, swept, "only the soak's own sweeps removed records");
        assert!(
            swept + live >= claims,
            "the sweeps kept up: {swept} removed"
        );
        rows
    });
    let mut out = format!(
        "Churn soak: {claims} claims of new keys from one task (`Periodic(100 ms)`), each living {live} ms of a clock that moves 1 ms per claim (about {live} live at a time), `sweep_expired()` every 100,000 claims:\n\n| claims | disk | RSS | records stored (`stats()`) | claims/s over the step |\n|---:|---:|---:|---:|---:|\n"
    );
    for (n, disk, rss, stored, rate) in &rows {
        out.push_str(&format!(
            "| {n} | {:.0} MiB | {:.0} MiB | {stored} | {rate:.0} |\n",
            *disk as f64 / (1 << 20) as f64,
            *rss as f64 / 1024.0
        ));
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        out.push_str(&format!(
            "\nLast ÷ first: disk {:.2}×, RSS {:.2}×, claims/s {:.2}×.\n",
            last.1 as f64 / first.1 as f64,
            last.2 as f64 / first.2 as f64,
            last.4 / first.4
        ));
    }
    out
}

/// Does the background sweeper keep up with the store's own sustained
/// rate? Consumers (claim, then `mark_done`, new keys) run for `secs`
/// seconds of the real clock with a done retention of 5 s and a sweep
/// interval of 2 s (otherwise the defaults: `Periodic(100 ms)` for the
/// writers' speed, `sweep_batch` 64, the adaptive pacing); the table
/// gives the messages/s, what the background sweeper removed per second
/// after the first retention, and the records stored at the end against
/// what 5 s of messages leave live.
pub fn keep_up(secs: u64) -> String {
    let mut out = format!(
        "Sweeper against the store's sustained rate ({secs} s per row, claim + `mark_done` of new keys, done retention 5 s, `sweep_interval` 2 s, default batch and pacing, real clock):\n\n| durability | tasks | messages/s | swept/s (after the first 5 s) | records stored halfway | records stored at the end | of which due for removal | claims slowed |\n|---|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    let periodic = Durability::Periodic(Duration::from_millis(100));
    for (durability, tasks) in [
        (periodic, 1u64),
        (periodic, 64),
        (Durability::Sync, 1),
        (Durability::Sync, 64),
    ] {
        // KEEPUP_ROWS=periodic or sync, or =periodic:64: only those rows.
        if let Ok(only) = std::env::var("KEEPUP_ROWS") {
            let name = format!("{durability:?}").to_lowercase();
            let (kind, count) = only.split_once(':').unwrap_or((&only, ""));
            if !name.starts_with(kind) || !(count.is_empty() || count == tasks.to_string()) {
                continue;
            }
        }
        let rt = runtime();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let row = rt.block_on(async {
            let store = Arc::new(
                SledIdempotencyStore::builder(&path)
                    .durability(durability)
                    .done_retention(Duration::from_secs(5))
                    .sweep_interval(Duration::from_secs(2))
                    .open()
                    .await
                    .expect("open"),
            );
            let started = Instant::now();
            let until = started + Duration::from_secs(secs);
            let workers: Vec<_> = (0..tasks)
                .map(|t| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let mut n = 0u64;
                        while Instant::now() < until {
                            let k = key((t << 40) | n);
                            store
                                .try_claim(&k, Duration::from_secs(30))
                                .await
                                .expect("claim");
                            store.mark_done(&k).await.expect("done");
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            let halfway = {
                let store = store.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(secs) / 2).await;
                    let stats = store.stats().await.expect("stats");
                    stats.records_done + stats.records_pending
                })
            };
            let mut messages = 0;
            for w in workers {
                messages += w.await.expect("worker");
            }
            let elapsed = started.elapsed().as_secs_f64();
            let halfway = halfway.await.expect("halfway");
            let stats = store.stats().await.expect("stats");
            let stored = stats.records_done + stats.records_pending;
            let live = store.admin().census().await.expect("census");
            let store = Arc::try_unwrap(store).unwrap_or_else(|_| panic!("one handle"));
            store.close().await.expect("close");
            (
                messages as f64 / elapsed,
                stats.swept as f64 / (elapsed - 5.0).max(1.0),
                halfway,
                stored,
                live.sweepable,
                stats.claims_slowed as f64 / messages.max(1) as f64,
            )
        });
        out.push_str(&format!(
            "| {durability:?} | {tasks} | {:.0} | {:.0} | {} | {} | {} | {:.0} % |\n",
            row.0,
            row.1,
            row.2,
            row.3,
            row.4,
            row.5 * 100.0
        ));
    }
    out
}
