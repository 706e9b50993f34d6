//! Side-by-side comparison of sled-idempotency with what a user would pick
//! instead, in one run on one machine: raw sled (the limit beneath the
//! store), SQLite through rusqlite (WAL, an `INSERT … ON CONFLICT DO
//! NOTHING` claim) and Redis through the `redis` crate (`SET NX PX`
//! against a `redis-server` started here on loopback). Prints markdown.
//!
//! Run: `cargo run --release` (from `compare/`); `-- --smoke` for a
//! seconds-long run that only checks everything works.

mod engines;
mod measure;
mod redis_engine;
mod sample;
// The crate's write-ahead log, compiled here on its own: it is not public.
#[allow(dead_code)]
#[path = "../../src/sled_engine/wal.rs"]
mod wal;

use std::time::Duration;

use engines::{Device, Engine, LogAlone, Ours, RawSled, Redis, Sqlite};
use measure::Row;
use sample::Sample;
use sled_idempotency::Durability;

pub struct Settings {
    pub warmup: Duration,
    pub measure: Duration,
    pub big: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--peak-rss-child") {
        measure::peak_rss_child(&args[i + 1..]);
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--reopen-child") {
        measure::reopen_child(&args[i + 1..]);
        return;
    }
    let smoke = args.iter().any(|a| a == "--smoke");
    let mut settings = if smoke {
        Settings {
            warmup: Duration::from_millis(100),
            measure: Duration::from_millis(400),
            big: 20_000,
        }
    } else {
        Settings {
            warmup: Duration::from_millis(500),
            measure: Duration::from_secs(4),
            big: 1_000_000,
        }
    };
    if let Some(big) = std::env::var("COMPARE_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        settings.big = big; // for quick experiments; the committed table uses the default
    }
    let redis = match Redis::server() {
        Ok(server) => Some(server),
        Err(why) => {
            eprintln!("redis rows skipped: {why}");
            None
        }
    };

    println!("{}", measure::machine());
    println!(
        "Command: `cd compare && cargo run --release{}`\n",
        if smoke { " -- --smoke" } else { "" }
    );

    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    if let Some(section) = only.as_deref() {
        match section {
            "sweep" => println!("{}", measure::sweep_impact(&settings)),
            "space" => println!("{}", measure::space_and_reopen(&settings)),
            "scans" => println!("{}", measure::scans(&settings)),
            "scale" => println!("{}", measure::scale(&settings)),
            "consumer" => {
                let messages = std::env::var("CONSUMER_MESSAGES")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(if smoke { 300_000 } else { 20_000_000 });
                println!("{}", measure::consumer_soak(messages))
            }
            "keepup" => {
                let secs = std::env::var("KEEPUP_SECS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(if smoke { 6 } else { 60 });
                println!("{}", measure::keep_up(secs))
            }
            "claims" => println!("{}", measure::table(&claims(&settings, redis.as_ref()))),
            "redis" => match &redis {
                Some(server) => println!("{}", redis_engine::section(&settings, server)),
                None => eprintln!("the redis section needs redis-server"),
            },
            other => eprintln!(
                "unknown section {other}: use claims, sweep, space, scans, scale, consumer, keepup or redis"
            ),
        }
        return;
    }
    println!("{}", measure::table(&claims(&settings, redis.as_ref())));
    if let Some(server) = &redis {
        println!("{}", redis_engine::section(&settings, server));
    }

    println!("{}", measure::sweep_impact(&settings));
    println!("{}", measure::space_and_reopen(&settings));
}

/// Claims of new keys by every engine, durable and not, 1 and 64 tasks;
/// beside the durable single writers, this disk's own limit for one.
fn claims(settings: &Settings, redis: Option<&Redis>) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    let periodic = Durability::Periodic(Duration::from_millis(100));
    for (durable, tasks) in [(false, 1), (true, 1), (false, 64), (true, 64)] {
        let scenario = format!(
            "claim of a new key, {}, {tasks} task{}",
            if durable { "durable" } else { "not durable" },
            if tasks == 1 { "" } else { "s" }
        );
        let mut engines: Vec<Box<dyn Engine>> = vec![
            Box::new(Ours::open(if durable {
                Durability::Sync
            } else {
                periodic
            })),
            Box::new(RawSled::open(durable)),
            Box::new(Sqlite::open(durable)),
        ];
        if let Some(server) = redis {
            match server.engine(durable) {
                Ok(engine) => engines.push(Box::new(engine)),
                Err(why) => eprintln!("redis skipped for {scenario}: {why}"),
            }
        }
        if durable {
            engines.push(Box::new(LogAlone::open()));
        }
        if durable && tasks == 1 {
            // What one durable writer could reach on this disk.
            engines.push(Box::new(Device::open(true)));
            engines.push(Box::new(Device::open(false)));
        }
        let samples: Vec<(String, Sample)> = engines
            .iter()
            .map(|e| {
                eprintln!("running {scenario}: {}", e.label());
                (e.label(), e.run(tasks, settings))
            })
            .collect();
        let ours = samples[0].1.throughput();
        for (label, sample) in samples {
            rows.push(Row::new(&scenario, &label, tasks, &sample, ours));
        }
    }
    rows
}
