//! What only the Redis engine has: the durability check at open, expiry
//! set on the server, corrupted records reported by key and left alone,
//! the function library reloaded by a server that lost
//! it, a server killed and restarted mid-run (no acknowledged `Done` lost,
//! no token handed out twice), a connection dropped or timed out mid-call
//! (a clear error, never a wrong answer), and keys spread over a cluster.
#![cfg(feature = "redis")]

mod redis_server;

use std::collections::HashSet;
#[cfg(feature = "redis-tls")]
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis_server::{Cluster, Server};
use sled_idempotency::{
    ClaimResult, Durability, Error, ManualClock, MessageId, RedisIdempotencyStore, State,
};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const TTL: Duration = Duration::from_secs(60);

fn lease(result: ClaimResult) -> sled_idempotency::Lease {
    match result {
        ClaimResult::Acquired(lease) => lease,
        other => panic!("expected a lease, got {other:?}"),
    }
}

/// A store on `server` that asks nothing of its persistence.
async fn flushing(server: &Server) -> sled_idempotency::Result<RedisIdempotencyStore> {
    RedisIdempotencyStore::builder(server.url())
        .durability(Durability::Flush)
        .open()
        .await
}

/// The integer reply of an inline command (`:n`).
fn integer(server: &Server, args: &[&str]) -> i64 {
    let reply = server.command(args).expect("server reachable");
    reply
        .trim()
        .strip_prefix(':')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{args:?}: not an integer reply: {reply:?}"))
}

/// The record key of `id` in the default namespace.
fn record_key(id: &MessageId) -> String {
    let hex = id.as_uuid().simple().to_string();
    format!("sid:{{{}}}:default:{hex}", &hex[28..])
}

/// The Redis client's error behind one of the crate's.
fn client_error(e: &sled_idempotency::redis::RedisError) -> Option<&redis::RedisError> {
    std::error::Error::source(e)?.downcast_ref()
}

/// Runs `call` until it stops failing because the server was away (the
/// store reconnects by itself), for at most 20 s. Any other error is
/// returned at once.
///
/// The client's error is reached through `source()`, as a user reaches it:
/// the crate's own error type does not expose the client's.
async fn retried<T, F, Fut>(mut call: F) -> sled_idempotency::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = sled_idempotency::Result<T>>,
{
    for _ in 0..400 {
        match call().await {
            Err(Error::Redis { source, .. })
                if client_error(&source).is_some_and(|e| {
                    e.is_io_error()
                        || e.is_connection_dropped()
                        || e.is_connection_refusal()
                        || e.is_timeout()
                }) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => return other,
        }
    }
    call().await
}

#[tokio::test]
async fn sync_needs_every_write_fsynced_before_the_answer() -> TestResult {
    if !redis_server::available() {
        return Ok(());
    }
    let open = |url: String| {
        RedisIdempotencyStore::builder(url)
            .durability(Durability::Sync)
            .open()
    };
    let plain = Server::start();
    let refused = open(plain.url()).await.expect_err("no AOF: refused");
    assert!(refused.to_string().contains("appendonly yes"), "{refused}");
    let everysec = Server::with(&["--appendonly", "yes", "--appendfsync", "everysec"]);
    let refused = open(everysec.url()).await.expect_err("everysec: refused");
    assert!(
        refused.to_string().contains("appendfsync always"),
        "{refused}"
    );
    let durable = Server::durable();
    let store = open(durable.url()).await?;
    assert_eq!(store.durability(), Durability::Sync);
    // `Flush` asks nothing of the server.
    RedisIdempotencyStore::builder(plain.url())
        .durability(Durability::Flush)
        .open()
        .await?;
    Ok(())
}

#[tokio::test]
async fn records_expire_on_the_server_when_they_are_forgotten() -> TestResult {
    if !redis_server::available() {
        return Ok(());
    }
    let server = Server::start();
    let pending_retention = Duration::from_secs(3600);
    // The server's clock decides (no clock given).
    let store = RedisIdempotencyStore::builder(server.url())
        .durability(Durability::Flush)
        .pending_retention(pending_retention)
        .default_ttl(Duration::from_secs(90))
        .open()
        .await?;
    let id = MessageId::new();
    let claimed = lease(store.claim(&id, TTL).await?);
    let expire = |id: &MessageId| integer(&server, &["PEXPIRETIME", &record_key(id)]) as u64;
    assert_eq!(
        expire(&id),
        claimed.expires_at() + 3_600_000,
        "pending: expiry + retention"
    );
    assert!(
        store.get(&id).await?.is_some(),
        "live by the server's clock"
    );
    let longer = store.extend(&claimed, Duration::from_secs(600)).await?;
    assert_eq!(
        expire(&id),
        longer.expires_at() + 3_600_000,
        "extended: the new expiry + retention"
    );
    store.complete(&longer).await?;
    let done = store.get_record(&id).await?.expect("done record");
    assert_eq!(done.state, State::Done);
    assert_eq!(expire(&id), done.expires_at, "done: at its expiry");
    let late = MessageId::new();
    store.mark_done(&late).await?;
    let record = store.get_record(&late).await?.expect("late done");
    assert_eq!(record.ttl_ms, 90_000);
    assert_eq!(expire(&late), record.expires_at);
    Ok(())
}

/// The server's clock in microseconds.
fn server_micros(server: &Server) -> u64 {
    let reply = server.command(&["TIME"]).expect("reachable");
    let parts: Vec<u64> = reply
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(parts.len(), 2, "TIME reply {reply:?}");
    parts[0] * 1_000_000 + parts[1]
}

/// Tokens come from the counter of the key's bucket, in the same atomic
/// step: one far ahead of the clock is followed exactly; otherwise a token
/// is at least the server's clock in microseconds.
#[tokio::test]
async fn tokens_come_from_the_bucket_counter_and_never_fall_below_the_clock() -> TestResult {
    if !redis_server::available() {
        return Ok(());
    }
    let server = Server::start();
    let store = flushing(&server).await?;
    let id = MessageId::new();
    let hex = id.as_uuid().simple().to_string();
    let counter = format!("sid:{{{}}}:token", &hex[28..]);
    let before = server_micros(&server);
    let first = lease(store.claim(&id, TTL).await?);
    assert!(
        first.token() >= before,
        "{} below the clock {before}",
        first.token()
    );
    let ahead = server_micros(&server) + 1_000_000_000_000;
    server.command(&["SET", &counter, &ahead.to_string()]);
    store.release(&id).await?;
    let next = lease(store.claim(&id, TTL).await?);
    assert_eq!(next.token(), ahead + 1, "the counter, not only the clock");
    Ok(())
}

/// A caller's clock an hour behind the server's: records must not expire
/// on the server before that clock forgets them.
#[tokio::test]
async fn a_caller_clock_behind_the_server_loses_no_record() -> TestResult {
    if !redis_server::available() {
        return Ok(());
    }
    let server = Server::start();
    let behind = server_micros(&server) / 1000 - 3_600_000;
    let store = RedisIdempotencyStore::builder(server.url())
        .durability(Durability::Flush)
        .clock(ManualClock::new(behind))
        .open()
        .await?;
    let id = MessageId::new();
    let claimed = lease(store.claim(&id, TTL).await?);
    assert!(matches!(
        store.claim(&id, TTL).await?,
        ClaimResult::InProgress { .. }
    ));
    store.complete(&claimed).await?;
    assert_eq!(
        store.claim(&id, TTL).await?,
        ClaimResult::Done { result: None }
    );
    let expire = integer(&server, &["PEXPIRETIME", &record_key(&id)]) as u64;
    assert!(
        expire * 1000 >= server_micros(&server) + 55_000_000,
        "kept a ttl's worth: {expire}"
    );
    Ok(())
}

/// The builder checks what the sled builder checks, and the bounds of the
/// functions' arithmetic.
#[tokio::test]
async fn bad_settings_are_refused_with_a_clear_error() -> TestResult {
    if !redis_server::available() {
        return Ok(());
    }
    let server = Server::start();
    let builder = || RedisIdempotencyStore::builder(server.url()).durability(Durability::Flush);
    let cases = [
        (
            "done_retention",
            builder().done_retention(Duration::from_micros(10)),
        ),
        ("default_ttl", builder().default_ttl(Duration::ZERO)),
        (
            "default_ttl",
            builder().default_ttl(Duration::from_secs(u64::MAX / 1000)),
        ),
        (
            "pending_retention",
            builder().pending_retention(Duration::MAX),
        ),
        ("max_result_size", builder().max_result_size(1 << 20)),
        (
            "Periodic",
            builder().durability(Durability::Periodic(Duration::ZERO)),
        ),
    ];
    for (setting, builder) in cases {
        match builder.open().await {
            Err(Error::InvalidConfig(why)) => assert!(why.contains(setting), "{why}"),
            other => panic!("{setting}: expected InvalidConfig, got {other:?}"),
        }
    }
    let far = builder().clock(ManualClock::new(1 << 53)).open().await?;
    match far.claim(&MessageId::new(), TTL).await {
        Err(e @ Error::ClockOutOfRange { now_ms, .. }) => {
            assert_eq!(now_ms, 1 << 53);
            assert!(e.to_string().contains("clock"), "{e}");
        }
        other => panic!("a clock past 2^52 ms: expected ClockOutOfRange, got {other:?}"),
    }
    let bad_url = RedisIdempotencyStore::open("not a url").await;
    assert!(matches!(bad_url, Err(Error::Redis { .. })), "{bad_url:?}");
    Ok(())
}

#[tokio::test]
async fn a_corrupted_record_is_reported_by_key_and_never_overwritten() -> TestResult {
    if !redis_server::available() {
        return Ok(());
    }
    let server = Server::start();
    let store = flushing(&server).await?;
    let (garbage, hash) = (MessageId::new(), MessageId::new());
    server.command(&["SET", &record_key(&garbage), "not a record"]);
    server.command(&["HSET", &record_key(&hash), "s", "p"]);
    for id in [&garbage, &hash] {
        for answer in [
            store.claim(id, TTL).await.map(|_| ()),
            store.mark_done(id).await,
            store.release(id).await,
            store.get_record(id).await.map(|_| ()),
        ] {
            match answer {
                Err(Error::Corrupt { key, .. }) => assert_eq!(key, id.to_string()),
                other => panic!("expected Corrupt, got {other:?}"),
            }
        }
    }
    let kept = server
        .command(&["GET", &record_key(&garbage)])
        .expect("reachable");
    assert!(kept.contains("not a record"), "left as it was: {kept}");
    lease(store.claim(&MessageId::new(), TTL).await?); // other keys unaffected
    Ok(())
}

#[tokio::test]
async fn a_server_that_lost_the_functions_gets_them_again() -> TestResult {
    if !redis_server::available() {
        return Ok(());
    }
    let mut server = Server::start(); // keeps nothing across a restart
    let store = flushing(&server).await?;
    lease(store.claim(&MessageId::new(), TTL).await?);
    server.restart();
    let listed = server.command(&["FUNCTION", "LIST"]).expect("reachable");
    assert!(
        !listed.contains("sled_idempotency"),
        "the restart lost them"
    );
    let id = MessageId::new();
    lease(retried(|| store.claim(&id, TTL)).await?);
    let listed = server.command(&["FUNCTION", "LIST"]).expect("reachable");
    assert!(listed.contains("sled_idempotency_1"), "{listed}");
    Ok(())
}

/// Workers claim and complete while the server (`appendfsync always`,
/// `Durability::Sync`) is killed with SIGKILL and restarted, three times.
/// Every completion acknowledged before a kill is still done after it, and
/// no token is handed out twice or below one handed out before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_loses_no_acknowledged_done_and_reissues_no_token() -> TestResult {
    if !redis_server::available() {
        return Ok(());
    }
    let mut server = Server::durable();
    let store = RedisIdempotencyStore::builder(server.url())
        .durability(Durability::Sync)
        .response_timeout(Duration::from_secs(2))
        .open()
        .await?;
    let done: Arc<Mutex<Vec<MessageId>>> = Arc::default();
    let mut tokens = HashSet::new();
    let mut highest = 0;
    for round in 0..3 {
        let stop = Arc::new(AtomicBool::new(false));
        let acquired: Arc<Mutex<Vec<u64>>> = Arc::default();
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let (store, stop) = (store.clone(), stop.clone());
                let (done, acquired) = (done.clone(), acquired.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let id = MessageId::new();
                        let Ok(ClaimResult::Acquired(lease)) = store.claim(&id, TTL).await else {
                            break; // the server went away: an unknown outcome
                        };
                        acquired.lock().expect("lock").push(lease.token());
                        if store.complete(&lease).await.is_err() {
                            break;
                        }
                        done.lock().expect("lock").push(id);
                    }
                })
            })
            .collect();
        // Kill once this round has acknowledged some completions.
        let target = (round + 1) * 150;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while done.lock().expect("lock").len() < target {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the workers stopped short of {target} completions"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        server.kill();
        stop.store(true, Ordering::SeqCst);
        for worker in workers {
            worker.await?;
        }
        server.restart();
        let before: Vec<u64> = acquired.lock().expect("lock").clone();
        for token in &before {
            assert!(tokens.insert(*token), "token {token} handed out twice");
            assert!(
                *token > highest,
                "token {token} not above {highest}, from before the kill"
            );
        }
        let max_before = before.iter().copied().max().unwrap_or(0);
        let acknowledged = done.lock().expect("lock").clone();
        for id in &acknowledged {
            let answer = retried(|| store.claim(id, TTL)).await?;
            assert!(
                matches!(answer, ClaimResult::Done { .. }),
                "round {round}: acknowledged done {id} lost: {answer:?}"
            );
        }
        let next = MessageId::new();
        let fresh = lease(retried(|| store.claim(&next, TTL)).await?);
        assert!(
            fresh.token() > max_before,
            "after the restart: token {} not above {max_before}",
            fresh.token()
        );
        highest = fresh.token();
        tokens.insert(highest);
        eprintln!(
            "round {round}: {} acknowledged done records survived the kill",
            acknowledged.len()
        );
    }
    Ok(())
}

/// Paused server, then the store's connection killed while its claim
/// waits: the call fails and says the outcome is unknown, and the claim
/// was indeed not applied. A timed-out call is also an unknown outcome, and
/// what it applied shows afterwards as a duplicate, never as a second
/// lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_or_timed_out_call_is_an_unknown_outcome_not_a_wrong_answer() -> TestResult {
    if !redis_server::available() {
        return Ok(());
    }
    let server = Server::start();
    let clock = ManualClock::new(4_000_000_000_000);
    let store = RedisIdempotencyStore::builder(server.url())
        .durability(Durability::Flush)
        .response_timeout(Duration::from_secs(30))
        .clock(clock)
        .open()
        .await?;
    let blocked = || {
        server
            .command(&["INFO", "clients"])
            .is_some_and(|info| info.lines().any(|l| l.trim() == "blocked_clients:1"))
    };

    // 1. The connection drops while the claim waits on the paused server.
    let id = MessageId::new();
    server.command(&["CLIENT", "PAUSE", "30000", "WRITE"]);
    let call = tokio::spawn({
        let (store, id) = (store.clone(), id.clone());
        async move { store.claim(&id, TTL).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !blocked() {
        assert!(
            std::time::Instant::now() < deadline,
            "the claim never waited on the paused server"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.command(&["CLIENT", "KILL", "TYPE", "normal"]);
    server.command(&["CLIENT", "UNPAUSE"]);
    match call.await? {
        Err(
            e @ Error::Redis {
                outcome_unknown: true,
                ..
            },
        ) => {
            assert!(e.to_string().contains("may or may not have applied"), "{e}");
        }
        other => panic!("expected an unknown outcome, got {other:?}"),
    }
    let again = retried(|| store.claim(&id, TTL)).await?;
    assert_eq!(
        lease(again).attempt(),
        1,
        "the dropped claim was not applied"
    );

    // 2. The reply does not come within the response timeout.
    let impatient = RedisIdempotencyStore::builder(server.url())
        .durability(Durability::Flush)
        .response_timeout(Duration::from_millis(200))
        .clock(ManualClock::new(4_000_000_000_000))
        .open()
        .await?;
    let id = MessageId::new();
    server.command(&["CLIENT", "PAUSE", "1000", "WRITE"]);
    match impatient.claim(&id, TTL).await {
        Err(Error::Redis {
            outcome_unknown: true,
            ..
        }) => {}
        other => panic!("expected an unknown outcome, got {other:?}"),
    }
    server.command(&["CLIENT", "UNPAUSE"]);
    // The server ran it once unpaused: the key is claimed, by a lease
    // nobody was given, and a second claim says so instead of taking it.
    let answer = retried(|| impatient.claim(&id, TTL)).await?;
    assert!(
        matches!(answer, ClaimResult::InProgress { attempts: 1, .. }),
        "{answer:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_cluster_node_opens_the_cluster_and_keys_spread_over_every_master() -> TestResult {
    if !redis_server::available() {
        return Ok(());
    }
    let cluster = Cluster::start();
    let mut stores = Vec::new();
    for node in &cluster.nodes {
        let store = RedisIdempotencyStore::builder(node.url())
            .durability(Durability::Flush)
            .open()
            .await?;
        assert!(store.is_cluster(), "{} opens the cluster", node.url());
        stores.push(store);
    }
    let ids: Vec<MessageId> = (0..300).map(|_| MessageId::new()).collect();
    for (i, id) in ids.iter().enumerate() {
        lease(stores[i % 3].claim(id, TTL).await?);
    }
    for (i, id) in ids.iter().enumerate() {
        // Every node's store sees every claim, whichever master holds it.
        let answer = stores[(i + 1) % 3].claim(id, TTL).await?;
        assert!(
            matches!(answer, ClaimResult::InProgress { .. }),
            "{answer:?}"
        );
    }
    for node in &cluster.nodes {
        let keys = integer(node, &["DBSIZE"]);
        assert!(keys > 50, "a master holds only {keys} keys");
    }
    Ok(())
}

/// `rediss://` with a private certificate authority (feature `redis-tls`):
/// refused while the CA is unknown, served once the builder trusts it.
/// The certificates come from the `openssl` command line.
#[cfg(feature = "redis-tls")]
#[tokio::test]
async fn tls_with_a_private_certificate_authority() -> TestResult {
    if !redis_server::available() {
        return Ok(());
    }
    let certs = tempfile::tempdir()?;
    let path = |name: &str| certs.path().join(name).display().to_string();
    std::fs::write(path("san.ext"), "subjectAltName=IP:127.0.0.1\n")?;
    let [ca_key, ca_crt, key, csr, crt, san] = [
        "ca.key",
        "ca.crt",
        "server.key",
        "server.csr",
        "server.crt",
        "san.ext",
    ]
    .map(path);
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    openssl(&format!(
        "req -x509 -days 1 -subj /CN=test-ca {ec} -keyout {ca_key} -out {ca_crt}"
    ));
    openssl(&format!(
        "req -subj /CN=127.0.0.1 {ec} -keyout {key} -out {csr}"
    ));
    openssl(&format!(
        "x509 -req -days 1 -in {csr} -CA {ca_crt} -CAkey {ca_key} -CAcreateserial \
         -out {crt} -extfile {san}"
    ));
    let tls_port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let tls_port = tls_port.to_string();
    let _server = Server::with(&[
        "--save",
        "",
        "--appendonly",
        "no",
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &crt,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca_crt,
        "--tls-auth-clients",
        "no",
    ]);
    let url = format!("rediss://127.0.0.1:{tls_port}/");
    let unknown = RedisIdempotencyStore::builder(url.clone())
        .durability(Durability::Flush)
        .open()
        .await;
    assert!(matches!(unknown, Err(Error::Redis { .. })), "{unknown:?}");
    let store = RedisIdempotencyStore::builder(url)
        .durability(Durability::Flush)
        .tls_root_certificate(std::fs::read(&ca_crt)?)
        .open()
        .await?;
    let id = MessageId::new();
    lease(store.claim(&id, TTL).await?);
    assert!(matches!(
        store.claim(&id, TTL).await?,
        ClaimResult::InProgress { .. }
    ));
    Ok(())
}

/// Runs `openssl` with `args` (split on whitespace; the paths hold none).
#[cfg(feature = "redis-tls")]
fn openssl(args: &str) {
    let status = std::process::Command::new("openssl")
        .args(args.split_whitespace())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("the TLS test needs the openssl command (Debian: openssl)");
    assert!(status.success(), "openssl {args} failed");
}

/// Slots moved from one master to another while a store holds the old slot
/// map: its calls meet `MOVED`, are retried on the new owner (they did not
/// run), and find the records that moved with their slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_follow_slots_moved_between_masters() -> TestResult {
    if !redis_server::available() {
        return Ok(());
    }
    let cluster = Cluster::start();
    let store = RedisIdempotencyStore::builder(cluster.url())
        .durability(Durability::Flush)
        .open()
        .await?;
    let ids: Vec<MessageId> = (0..200).map(|_| MessageId::new()).collect();
    let mut leases = Vec::new();
    for id in &ids {
        leases.push(lease(store.claim(id, TTL).await?));
    }
    cluster.reshard(0, 1, 4000);
    for id in &ids {
        let answer = store.claim(id, TTL).await?;
        assert!(
            matches!(answer, ClaimResult::InProgress { .. }),
            "{answer:?}"
        );
    }
    for held in &leases {
        store.complete(held).await?;
    }
    for _ in 0..100 {
        lease(store.claim(&MessageId::new(), TTL).await?);
    }
    Ok(())
}
