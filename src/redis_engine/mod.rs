//! The Redis engine (feature `redis`): the same contract as the sled store,
//! shared by every worker that reaches one Redis server or Redis Cluster.
//!
//! Each operation is one Redis Function (`library.lua`) that reads the
//! record, decides as [`machine`](crate::machine) does and writes, in one
//! atomic step and one network round trip. Records expire on the server
//! (`SET … PXAT` at the moment they are forgotten), so this engine runs no
//! sweeper.

mod conn;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bus_core::MessageId;
use redis::Value;

use self::conn::{Conn, redis_error};
use crate::clock::{Clock, millis};
use crate::config::{Common, Durability};
use crate::engine::{Acquired, Engine, Finished, Ops};
use crate::error::{Error, Result};
use crate::lease::ClaimResult;
use crate::machine::Holder;
use crate::namespace::{DEFAULT_NAMESPACE, validate_namespace};
use crate::record::{Record, State};
use crate::stats::Counters;
use crate::store::Store;

/// Largest ttl or retention the Redis engine takes: 2^52 ms (about 142,000
/// years). Its functions compute in Lua numbers, exact below 2^53.
pub const REDIS_MAX_MILLIS: u64 = 1 << 52;

/// Default bound on each call's reply from Redis.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Key of the set that names every namespace used (one key: one slot).
const NAMESPACES_KEY: &str = "sid:namespaces";

/// The Redis engine: what a [`RedisIdempotencyStore`] keeps its records
/// in. Used only as [`Store`]'s type parameter; it has no methods of its
/// own.
#[derive(Debug, Clone)]
pub struct RedisEngine {
    shared: Arc<Shared>,
    namespace: Arc<str>,
    /// This handle's counters (they feed the `metrics` feature; the Redis
    /// engine offers no `stats`).
    counters: Arc<Counters>,
}

#[derive(Debug)]
struct Shared {
    conn: Conn,
    clock: Option<Arc<dyn Clock>>,
    /// The retention arguments every function call passes, as decimal
    /// text (the done retention empty when unset).
    default_ttl_arg: String,
    done_arg: String,
    pending_arg: String,
    max_result_size: usize,
    durability: Durability,
    closed: AtomicBool,
}

/// Configures and opens a [`RedisIdempotencyStore`].
///
/// ```no_run
/// # async fn demo() -> Result<(), sled_idempotency::Error> {
/// use sled_idempotency::{Durability, RedisIdempotencyStore};
/// use std::time::Duration;
///
/// let store = RedisIdempotencyStore::builder("redis://127.0.0.1:6379/")
///     .durability(Durability::Sync)
///     .done_retention(Duration::from_secs(24 * 3600))
///     .open()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RedisBuilder {
    url: String,
    common: Common,
    response_timeout: Duration,
    #[cfg(feature = "redis-tls")]
    root_certificate: Option<Vec<u8>>,
}

impl RedisBuilder {
    /// What an acknowledged write survives. On Redis:
    ///
    /// - [`Durability::Sync`] (the default): the open checks that every master runs
    ///   `appendonly yes` with `appendfsync always`, so the server fsyncs
    ///   each write before it answers: an acknowledged write survives a
    ///   server crash and power loss of that server. A failover to a replica
    ///   can still lose the last writes (replication is asynchronous).
    /// - [`Durability::Flush`] and [`Durability::Periodic`]:
    ///   a write is acknowledged once it is in the server's memory; it
    ///   survives the worker's crash, and the server's crash only as far
    ///   as the server's own persistence (`appendfsync everysec`: the last
    ///   second) allows. The period is the server's, not the argument's.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.common.durability = durability;
        self
    }

    /// Retention of a `mark_done` with no claim to take a ttl from.
    /// Default [`DEFAULT_TTL`](crate::DEFAULT_TTL).
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.common.default_ttl = ttl;
        self
    }

    /// How long done records are kept, instead of the claim's ttl. Unset
    /// by default: a done record is kept for the ttl it was claimed with.
    pub fn done_retention(mut self, retention: Duration) -> Self {
        self.common.done_retention = Some(retention);
        self
    }

    /// How long an expired claim is remembered after its expiry (for its
    /// attempt counter and lease checks). Default
    /// [`DEFAULT_PENDING_RETENTION`](crate::DEFAULT_PENDING_RETENTION).
    pub fn pending_retention(mut self, retention: Duration) -> Self {
        self.common.pending_retention = retention;
        self
    }

    /// Largest result `complete_with` caches. Default
    /// [`DEFAULT_MAX_RESULT_SIZE`](crate::DEFAULT_MAX_RESULT_SIZE), at most
    /// [`MAX_RESULT_LIMIT`](crate::MAX_RESULT_LIMIT).
    pub fn max_result_size(mut self, bytes: usize) -> Self {
        self.common.max_result_size = bytes;
        self
    }

    /// Bound on each call's reply. Default [`DEFAULT_RESPONSE_TIMEOUT`]. A
    /// write that times out is reported as an unknown outcome.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// For `rediss://` urls (feature `redis-tls`): trust the certificate
    /// authority in `pem` (a PEM-encoded root certificate) instead of the
    /// system's root certificates, as a private CA needs.
    #[cfg(feature = "redis-tls")]
    pub fn tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificate = Some(pem.into());
        self
    }

    /// Decide expiry with `clock` instead of the server's `TIME`. Every
    /// worker sharing the server should then use the same clock, reading
    /// wall-clock unix milliseconds as [`Clock`] says. The server keeps each
    /// record at least until this clock forgets it (counted on the server's
    /// own clock from the write when this clock is behind it), so skew
    /// between the two never loses a record early. Tests use a
    /// [`ManualClock`](crate::ManualClock) and move it without sleeping.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.common.clock = Some(Arc::new(clock));
        self
    }

    /// Connects, detects a cluster, loads the function library on every
    /// master and, for [`Durability::Sync`], checks the servers' fsync
    /// settings.
    pub async fn open(self) -> Result<RedisIdempotencyStore> {
        self.open_engine().await.map(Store::new)
    }

    async fn open_engine(self) -> Result<RedisEngine> {
        let bounded = |d: Duration, what: &str| {
            let ms = millis(d);
            if ms >= REDIS_MAX_MILLIS {
                return Err(Error::InvalidConfig(format!(
                    "{what} {d:?} is too large for the Redis engine (at most 2^52 ms)"
                )));
            }
            Ok(ms)
        };
        let common = self.common;
        common.validate()?;
        let default_ttl_ms = bounded(common.default_ttl, "default_ttl")?;
        let done_ms = common
            .done_retention
            .map(|d| bounded(d, "done_retention"))
            .transpose()?;
        let pending_ms = bounded(common.pending_retention, "pending_retention")?;
        let settings = conn::Settings {
            response_timeout: self.response_timeout,
            #[cfg(feature = "redis-tls")]
            root_certificate: self.root_certificate,
        };
        let conn = Conn::open(&self.url, &settings).await?;
        conn.load_library().await?;
        if common.durability == Durability::Sync {
            conn.check_fsync_always().await?;
        }
        tracing::debug!(cluster = conn.is_cluster(), "Redis store opened");
        Ok(RedisEngine {
            shared: Arc::new(Shared {
                conn,
                clock: common.clock,
                default_ttl_arg: default_ttl_ms.to_string(),
                done_arg: done_ms.map(|d| d.to_string()).unwrap_or_default(),
                pending_arg: pending_ms.to_string(),
                max_result_size: common.max_result_size,
                durability: common.durability,
                closed: AtomicBool::new(false),
            }),
            namespace: DEFAULT_NAMESPACE.into(),
            counters: Arc::new(Counters::new(DEFAULT_NAMESPACE, common.durability)),
        })
    }
}

/// A function's reply: its first element names the outcome.
struct Reply(Vec<Value>);

impl Reply {
    fn outcome(&self) -> &[u8] {
        match self.0.first() {
            Some(Value::BulkString(b)) => b,
            _ => b"",
        }
    }

    fn bytes(&self, i: usize) -> Option<Vec<u8>> {
        match self.0.get(i) {
            Some(Value::BulkString(b)) => Some(b.clone()),
            _ => None,
        }
    }

    fn int(&self, i: usize) -> Result<u64> {
        match self.0.get(i) {
            Some(Value::Int(n)) => u64::try_from(*n).map_err(|_| self.unexpected()),
            _ => Err(self.unexpected()),
        }
    }

    fn attempts(&self, i: usize) -> Result<u32> {
        u32::try_from(self.int(i)?).map_err(|_| self.unexpected())
    }

    fn unexpected(&self) -> Error {
        conn::unexpected("reading a function's reply", format!("{:?}", self.0))
    }

    /// A `lost` reply as the holder it names.
    fn holder(&self) -> Result<Holder> {
        match self.bytes(1).as_deref() {
            Some(b"nothing") => Ok(Holder::Nothing),
            Some(b"claim") => Ok(Holder::Claim {
                token: self.int(2)?,
                expires_at: self.int(3)?,
                attempts: self.attempts(4)?,
            }),
            Some(b"done") => Ok(Holder::Done {
                token: self.int(2)?,
                expires_at: self.int(3)?,
            }),
            _ => Err(self.unexpected()),
        }
    }
}

impl RedisEngine {
    pub(crate) async fn namespace(&self, name: &str) -> Result<RedisEngine> {
        validate_namespace(name)?;
        self.check_open()?;
        let mut cmd = redis::cmd("SADD");
        cmd.arg(NAMESPACES_KEY).arg(name);
        self.shared
            .conn
            .query(&cmd)
            .await
            .map_err(redis_error("recording a namespace"))?;
        Ok(RedisEngine {
            shared: self.shared.clone(),
            namespace: name.into(),
            counters: Arc::new(Counters::new(name, self.shared.durability)),
        })
    }

    pub(crate) async fn namespaces(&self) -> Result<Vec<String>> {
        self.check_open()?;
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(NAMESPACES_KEY);
        let value = self
            .shared
            .conn
            .query(&cmd)
            .await
            .map_err(redis_error("listing namespaces"))?;
        let mut names: Vec<String> = parse(value, "listing namespaces")?;
        names.retain(|n| n != DEFAULT_NAMESPACE);
        names.sort();
        names.insert(0, DEFAULT_NAMESPACE.to_string());
        Ok(names)
    }

    fn check_open(&self) -> Result<()> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// The record key and its token counter: `sid:{bucket}:ns:id` and
    /// `sid:{bucket}:token`. The bucket (the id's last four hex digits) is
    /// the hash tag, so that a record and its counter share a slot while
    /// records spread over every slot.
    fn keys(&self, key: &MessageId) -> (String, String) {
        let hex = key.as_uuid().simple().to_string();
        let bucket = &hex[hex.len() - 4..];
        (
            format!("sid:{{{bucket}}}:{}:{hex}", self.namespace),
            format!("sid:{{{bucket}}}:token"),
        )
    }

    /// Runs function `name` on `key` with the common arguments (time,
    /// retention) followed by `args`.
    async fn call(
        &self,
        context: &'static str,
        name: &str,
        key: &MessageId,
        args: &[&[u8]],
    ) -> Result<Reply> {
        self.check_open()?;
        let shared = &self.shared;
        let now = match &shared.clock {
            Some(clock) => {
                let now = clock.now_millis();
                if now >= REDIS_MAX_MILLIS {
                    return Err(Error::ClockOutOfRange {
                        now_ms: now,
                        max_ms: REDIS_MAX_MILLIS - 1,
                    });
                }
                now.to_string()
            }
            None => String::new(),
        };
        let mut all: Vec<&[u8]> = vec![
            now.as_bytes(),
            shared.pending_arg.as_bytes(),
            shared.done_arg.as_bytes(),
        ];
        all.extend_from_slice(args);
        let (record, counter) = self.keys(key);
        match shared
            .conn
            .fcall(context, name, [&record, &counter], &all)
            .await
        {
            Ok(reply) => Ok(Reply(reply)),
            Err(Error::Redis { source, .. }) if source.0.code() == Some("CORRUPT") => {
                Err(Error::Corrupt {
                    key: key.to_string(),
                    reason: source.0.detail().unwrap_or("not a record").to_owned(),
                })
            }
            Err(e) => Err(e),
        }
    }

    pub(crate) async fn get(&self, key: &MessageId) -> Result<Option<Record>> {
        let (server_now, record) = self.read(key).await?;
        let now = match &self.shared.clock {
            Some(clock) => clock.now_millis(),
            None => server_now,
        };
        Ok(record.filter(|r| r.is_live(now)))
    }

    pub(crate) async fn get_record(&self, key: &MessageId) -> Result<Option<Record>> {
        Ok(self.read(key).await?.1)
    }

    /// The server's clock (ms) and the record stored for `key`.
    async fn read(&self, key: &MessageId) -> Result<(u64, Option<Record>)> {
        let reply = self.call("reading a record", "sid1_get", key, &[]).await?;
        let now = reply.int(0)?;
        if reply.0.len() == 1 {
            return Ok((now, None));
        }
        let state = match reply.bytes(1).as_deref() {
            Some(b"p") => State::Pending,
            Some(b"d") => State::Done,
            _ => return Err(reply.unexpected()),
        };
        let record = Record {
            state,
            expires_at: reply.int(2)?,
            token: reply.int(3)?,
            attempts: reply.attempts(4)?,
            ttl_ms: reply.int(5)?,
            fingerprint: reply.bytes(6),
            result: reply.bytes(7),
        };
        Ok((now, Some(record)))
    }

    pub(crate) async fn close(&self) -> Result<()> {
        self.shared.closed.store(true, Ordering::SeqCst);
        Ok(())
    }
}

fn parse<T: redis::FromRedisValue>(value: Value, context: &'static str) -> Result<T> {
    redis::from_redis_value(value).map_err(|e| redis_error(context)(e.into()))
}

/// A ttl within what the functions compute exactly (below 2^52 ms).
fn bounded(ttl: Duration, ttl_ms: u64) -> Result<String> {
    if ttl_ms >= REDIS_MAX_MILLIS {
        return Err(Error::TtlOverflow { ttl });
    }
    Ok(ttl_ms.to_string())
}

/// An idempotency store on Redis or Redis Cluster — more exactly, a handle on
/// one namespace of it. The same operations and answers as
/// [`SledIdempotencyStore`](crate::SledIdempotencyStore), shared by every
/// process that connects to the same server.
///
/// ```no_run
/// # async fn demo() -> Result<(), sled_idempotency::Error> {
/// use sled_idempotency::{ClaimResult, MessageId, RedisIdempotencyStore};
/// use std::time::Duration;
///
/// let store = RedisIdempotencyStore::open("redis://127.0.0.1:6379/").await?;
/// let id = MessageId::new();
/// if let ClaimResult::Acquired(lease) = store.claim(&id, Duration::from_secs(30)).await? {
///     // ... run the handler, then:
///     store.complete(&lease).await?;
/// }
/// store.close().await?;
/// # Ok(()) }
/// ```
///
/// **Clock.** Expiry is decided by the Redis server's clock (`TIME`, read
/// inside each function), unless the builder is given a [`Clock`]: one
/// clock per key for every worker, whatever their own clocks say. In a
/// cluster each key is decided by the clock of the master that holds it.
///
/// **Fencing tokens** strictly increase along each key's history, across
/// releases, abandons, expiry and server restarts: a claim draws its token
/// in the same atomic step that writes the record, from a counter kept per
/// bucket of keys beside the records (same hash slot), and the token is
/// never below the server's clock in microseconds. A token can repeat only
/// if the server loses acknowledged writes (a failover to a replica that
/// had not received them, or a restart without `appendfsync always`) *and*
/// the node that serves the key afterwards has a clock behind the lost
/// token's time.
pub type RedisIdempotencyStore = Store<RedisEngine>;

/// The methods only a Redis store has.
impl Store<RedisEngine> {
    /// Opens the store at `url` (`redis://host:port/`, `rediss://` with the
    /// feature `redis-tls`; any node of a cluster) with default settings.
    pub async fn open(url: &str) -> Result<Self> {
        Self::builder(url).open().await
    }

    /// A builder for a store at `url`.
    pub fn builder(url: impl Into<String>) -> RedisBuilder {
        RedisBuilder {
            url: url.into(),
            common: Common::default(),
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            #[cfg(feature = "redis-tls")]
            root_certificate: None,
        }
    }

    /// Whether the store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.engine.shared.conn.is_cluster()
    }

    /// The durability mode the store was opened with.
    pub fn durability(&self) -> Durability {
        self.engine.shared.durability
    }
}

/// The Redis engine's atomic operations: one function call each.
impl Ops for RedisEngine {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    async fn open_namespace(&self, name: &str) -> Result<Self> {
        RedisEngine::namespace(self, name).await
    }

    async fn namespaces(&self) -> Result<Vec<String>> {
        RedisEngine::namespaces(self).await
    }

    async fn get(&self, key: &MessageId) -> Result<Option<Record>> {
        RedisEngine::get(self, key).await
    }

    async fn get_record(&self, key: &MessageId) -> Result<Option<Record>> {
        RedisEngine::get_record(self, key).await
    }

    async fn close(&self) -> Result<()> {
        RedisEngine::close(self).await
    }

    fn counters(&self) -> Option<&Counters> {
        Some(&self.counters)
    }

    fn max_result_size(&self) -> usize {
        self.shared.max_result_size
    }

    async fn acquire(
        &self,
        key: &MessageId,
        ttl: Duration,
        ttl_ms: u64,
        fingerprint: Option<&[u8]>,
    ) -> Result<Acquired> {
        let ttl_ms = bounded(ttl, ttl_ms)?;
        let (flag, fp): (&[u8], &[u8]) = match fingerprint {
            Some(fp) => (b"1", fp),
            None => (b"0", b""),
        };
        let reply = self
            .call(
                "claiming",
                "sid1_claim",
                key,
                &[ttl_ms.as_bytes(), flag, fp],
            )
            .await?;
        Ok(match reply.outcome() {
            b"claimed" => Acquired::Lease {
                token: reply.int(1)?,
                expires_at: reply.int(2)?,
                attempts: reply.attempts(3)?,
            },
            b"pending" => Acquired::Not(ClaimResult::InProgress {
                expires_at: reply.int(1)?,
                attempts: reply.attempts(2)?,
            }),
            b"done" => Acquired::Not(ClaimResult::Done {
                result: reply.bytes(1),
            }),
            b"conflict" => Acquired::Not(ClaimResult::Conflict {
                done: reply.bytes(1).as_deref() == Some(b"d"),
            }),
            _ => return Err(reply.unexpected()),
        })
    }

    async fn done(&self, key: &MessageId) -> Result<Option<bool>> {
        let default_ttl = &self.shared.default_ttl_arg;
        let reply = self
            .call("marking done", "sid1_done", key, &[default_ttl.as_bytes()])
            .await?;
        match reply.outcome() {
            b"completed" => Ok(Some(false)),
            b"late" => Ok(Some(true)),
            b"already" => Ok(None),
            _ => Err(reply.unexpected()),
        }
    }

    async fn release(&self, key: &MessageId) -> Result<bool> {
        let reply = self.call("releasing", "sid1_release", key, &[]).await?;
        match reply.outcome() {
            b"removed" => Ok(true),
            b"kept" => Ok(false),
            _ => Err(reply.unexpected()),
        }
    }

    async fn complete(
        &self,
        key: &MessageId,
        token: u64,
        result: Option<&[u8]>,
    ) -> Result<Result<Finished, Holder>> {
        let token = token.to_string();
        let (flag, bytes): (&[u8], &[u8]) = match result {
            Some(r) => (b"1", r),
            None => (b"0", b""),
        };
        let args = [token.as_bytes(), flag, bytes];
        let reply = self.call("completing", "sid1_complete", key, &args).await?;
        match reply.outcome() {
            b"completed" => Ok(Ok(Finished::Wrote)),
            b"already" => Ok(Ok(Finished::Already)),
            b"different" => Ok(Ok(Finished::DifferentResult)),
            b"lost" => Ok(Err(reply.holder()?)),
            _ => Err(reply.unexpected()),
        }
    }

    async fn abandon(&self, key: &MessageId, token: u64) -> Result<Result<(), Holder>> {
        let token = token.to_string();
        let reply = self
            .call("abandoning", "sid1_abandon", key, &[token.as_bytes()])
            .await?;
        match reply.outcome() {
            b"abandoned" => Ok(Ok(())),
            b"lost" => Ok(Err(reply.holder()?)),
            _ => Err(reply.unexpected()),
        }
    }

    async fn extend(
        &self,
        key: &MessageId,
        token: u64,
        ttl: Duration,
        ttl_ms: u64,
    ) -> Result<Result<u64, Holder>> {
        let ttl_ms = bounded(ttl, ttl_ms)?;
        let token = token.to_string();
        let args = [token.as_bytes(), ttl_ms.as_bytes()];
        let reply = self
            .call("extending a lease", "sid1_extend", key, &args)
            .await?;
        match reply.outcome() {
            b"extended" => Ok(Ok(reply.int(1)?)),
            b"lost" => Ok(Err(reply.holder()?)),
            _ => Err(reply.unexpected()),
        }
    }
}

impl Engine for RedisEngine {}
