//! The Redis engine against what Redis users write by hand, on one
//! `redis-server`, each with one multiplexed connection driven from tokio
//! tasks: a bare `SET NX PX` (one round trip and no state machine: the
//! floor) and the AWS Powertools algorithm (`SET NX PX`, then on a
//! duplicate a `GET` to decide on the client: two round trips).

use sled_idempotency::{Durability, MessageId, RedisIdempotencyStore};

use crate::Settings;
use crate::engines::{self, Redis, TTL, fresh, run_tasks};
use crate::measure::{self, Row};

/// Every key claimed by eight calls in a row: seven duplicates in eight.
fn duplicate_heavy() -> u64 {
    fresh() / 8
}

/// A workload: its name, the key sequence, and whether the server fsyncs
/// every write (`appendfsync always`, the store in `Durability::Sync`).
type Workload = (&'static str, fn() -> u64, bool);

pub fn section(settings: &Settings, server: &Redis) -> String {
    let runtime = crate::sample::runtime();
    let mut rows = Vec::new();
    let workloads: [Workload; 3] = [
        ("new keys, no persistence", fresh, false),
        ("new keys, appendfsync always", fresh, true),
        ("7 duplicates in 8, no persistence", duplicate_heavy, false),
    ];
    for (workload, next, durable) in workloads {
        for tasks in [1, 64] {
            server.engine(durable).expect("configure redis-server");
            let scenario = format!("Redis: {workload}");
            eprintln!("running {scenario}, {tasks} tasks");
            let samples = runtime.block_on(async {
                let mode = if durable {
                    Durability::Sync
                } else {
                    Durability::Flush
                };
                let store = RedisIdempotencyStore::builder(server.url())
                    .durability(mode)
                    .open()
                    .await
                    .expect("open the Redis engine");
                let conn = redis::Client::open(server.url())
                    .expect("client")
                    .get_connection_manager()
                    .await
                    .expect("connection");
                let ours = run_tasks(tasks, settings, next, move |n| {
                    let store = store.clone();
                    async move {
                        let key = MessageId::from_uuid(uuid::Uuid::from_u128(u128::from(n)));
                        store.try_claim(&key, TTL).await.expect("claim");
                    }
                })
                .await;
                let bare = {
                    let conn = conn.clone();
                    run_tasks(tasks, settings, next, move |n| {
                        let mut conn = conn.clone();
                        async move {
                            set_nx(&mut conn, n).await;
                        }
                    })
                    .await
                };
                let powertools = run_tasks(tasks, settings, next, move |n| {
                    let mut conn = conn.clone();
                    async move {
                        if !set_nx(&mut conn, n).await {
                            let _: Option<String> = redis::cmd("GET")
                                .arg(n)
                                .query_async(&mut conn)
                                .await
                                .expect("GET");
                        }
                    }
                })
                .await;
                [
                    ("**sled-idempotency Redis engine**", ours),
                    ("bare `SET NX PX`", bare),
                    ("Powertools: `SET NX PX`, then `GET`", powertools),
                ]
            });
            let ours = samples[0].1.throughput();
            for (engine, sample) in &samples {
                rows.push(Row::new(&scenario, engine, tasks, sample, ours));
            }
        }
    }
    format!(
        "### The Redis engine against hand-written Redis claims\n\n{}",
        measure::table(&rows)
    )
}

/// `SET n p NX PX ttl`: true if it set the key.
async fn set_nx(conn: &mut redis::aio::ConnectionManager, n: u64) -> bool {
    let set: Option<String> = engines::set_nx(n).query_async(conn).await.expect("SET NX");
    set.is_some()
}
