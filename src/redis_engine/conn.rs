//! The connection to one Redis server or a Redis Cluster: detecting which at
//! open, loading the function library, calling a function with one round
//! trip, and the durability check.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
use redis::{Cmd, ErrorKind, RedisError, ServerErrorKind, Value};

use crate::error::{Error, Result};

/// The function library, loaded at open (`FUNCTION LOAD REPLACE`). Redis
/// keeps it across restarts, failovers and replicas, unlike the script
/// cache.
pub(crate) const LIBRARY: &str = include_str!("library.lua");

/// How often a call that the server refused before running it (a slot that
/// moved, a cluster that is electing, a server that is loading) is tried.
const NOT_RUN_TRIES: u32 = 5;

/// How to connect.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) response_timeout: Duration,
    /// A PEM root certificate to trust instead of the system's (feature
    /// `redis-tls`).
    #[cfg(feature = "redis-tls")]
    pub(crate) root_certificate: Option<Vec<u8>>,
}

impl Settings {
    fn client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        #[cfg(feature = "redis-tls")]
        if let Some(root) = &self.root_certificate {
            return redis::Client::build_with_tls(url, self.certificates(root));
        }
        redis::Client::open(url)
    }

    fn cluster(&self, builder: ClusterClientBuilder) -> ClusterClientBuilder {
        #[cfg(feature = "redis-tls")]
        if let Some(root) = &self.root_certificate {
            return builder.certs(self.certificates(root));
        }
        builder
    }

    #[cfg(feature = "redis-tls")]
    fn certificates(&self, root: &[u8]) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(root.to_vec()),
        }
    }
}

/// A connection to a single server or to a cluster. Both multiplex calls
/// and are cheap to clone.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::Single(_) => "Conn::Single",
            Conn::Cluster(_) => "Conn::Cluster",
        })
    }
}

pub(crate) fn redis_error(context: &'static str) -> impl FnOnce(RedisError) -> Error {
    move |source| Error::Redis {
        context,
        outcome_unknown: false,
        source: crate::error::RedisError(source),
    }
}

pub(crate) fn unexpected(context: &'static str, what: String) -> Error {
    Error::Redis {
        context,
        outcome_unknown: false,
        source: crate::error::RedisError(RedisError::from((
            ErrorKind::UnexpectedReturnType,
            "unexpected reply",
            what,
        ))),
    }
}

impl Conn {
    /// Connects to `url`; a node of a cluster (`cluster_enabled:1` in
    /// `INFO cluster`) gives a cluster connection, found from that node.
    pub(crate) async fn open(url: &str, settings: &Settings) -> Result<Conn> {
        let response_timeout = settings.response_timeout;
        let client = settings
            .client(url)
            .map_err(redis_error("parsing the Redis url"))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(2);
        let mut single = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(redis_error("connecting to Redis"))?;
        let info: String = redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut single)
            .await
            .map_err(redis_error("reading INFO cluster"))?;
        if !info.lines().any(|l| l.trim() == "cluster_enabled:1") {
            return Ok(Conn::Single(single));
        }
        // No automatic retries: the client would resend a call whose
        // connection dropped, and a resent abandon or claim could answer
        // wrongly. Calls the server refused unrun are retried in `fcall`.
        let builder = ClusterClientBuilder::new(vec![url])
            .retries(0)
            .response_timeout(response_timeout);
        let cluster = settings
            .cluster(builder)
            .build()
            .map_err(redis_error("configuring the cluster client"))?;
        let conn = cluster
            .get_async_connection()
            .await
            .map_err(redis_error("connecting to the Redis cluster"))?;
        Ok(Conn::Cluster(conn))
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    pub(crate) async fn query(&self, cmd: &Cmd) -> redis::RedisResult<Value> {
        match self {
            Conn::Single(conn) => cmd.query_async(&mut conn.clone()).await,
            Conn::Cluster(conn) => cmd.query_async(&mut conn.clone()).await,
        }
    }

    /// `cmd` on every master (the single server, or each cluster master);
    /// an error from any one of them is the error.
    async fn on_masters(&self, cmd: Cmd) -> redis::RedisResult<Value> {
        let reply = match self {
            Conn::Single(conn) => cmd.query_async(&mut conn.clone()).await,
            Conn::Cluster(conn) => {
                let route = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                conn.clone().route_command(cmd, route).await
            }
        };
        reply.and_then(Value::extract_error)
    }

    /// Loads (or replaces) the function library on every master.
    pub(crate) async fn load_library(&self) -> Result<()> {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LOAD").arg("REPLACE").arg(LIBRARY);
        self.on_masters(cmd).await.map(|_| ()).map_err(redis_error(
            "loading the function library (FUNCTION LOAD; Redis 7.0 or later is needed)",
        ))
    }

    /// Calls function `name` on the record `keys[0]` (with its token
    /// counter `keys[1]`): one round trip. A call the server refused
    /// without running it is tried again; a failed connection is reported
    /// as an unknown outcome, never retried.
    pub(crate) async fn fcall(
        &self,
        context: &'static str,
        name: &str,
        keys: [&str; 2],
        args: &[&[u8]],
    ) -> Result<Vec<Value>> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(name).arg(2).arg(keys[0]).arg(keys[1]);
        for arg in args {
            cmd.arg(*arg);
        }
        let mut tries = 0;
        loop {
            tries += 1;
            let error = match self.query(&cmd).await {
                Ok(Value::Array(items)) => return Ok(items),
                Ok(other) => return Err(unexpected(context, format!("{other:?}"))),
                Err(e) => e,
            };
            if tries < NOT_RUN_TRIES && function_missing(&error) {
                // A server restarted without persistence, or a new node.
                self.load_library().await?;
                continue;
            }
            if tries < NOT_RUN_TRIES && not_run(&error) {
                tokio::time::sleep(Duration::from_millis(20 << tries)).await;
                continue;
            }
            return Err(Error::Redis {
                context,
                outcome_unknown: error.is_io_error() || error.is_timeout(),
                source: crate::error::RedisError(error),
            });
        }
    }

    /// Fails unless every master has `appendonly yes` and `appendfsync
    /// always`: what `Durability::Sync` means on Redis before 7.2.
    pub(crate) async fn check_fsync_always(&self) -> Result<()> {
        for (setting, wanted) in [("appendonly", "yes"), ("appendfsync", "always")] {
            let mut cmd = redis::cmd("CONFIG");
            cmd.arg("GET").arg(setting);
            let reply = self.on_masters(cmd).await.map_err(redis_error(
                "reading the server's persistence settings (CONFIG GET)",
            ))?;
            let mut values = Vec::new();
            setting_values(&reply, setting, &mut values);
            if values.is_empty() {
                return Err(Error::InvalidConfig(format!(
                    "Durability::Sync on Redis needs `{setting} {wanted}` on every master, \
                     and CONFIG GET {setting} returned nothing"
                )));
            }
            if let Some(bad) = values.iter().find(|v| *v != wanted) {
                return Err(Error::InvalidConfig(format!(
                    "Durability::Sync on Redis needs `{setting} {wanted}` on every master \
                     (an acknowledged write must be on disk), but a master has `{setting} {bad}`; \
                     set it, or choose Durability::Flush"
                )));
            }
        }
        Ok(())
    }
}

/// Every value that follows `name` in a (possibly nested) CONFIG GET reply.
fn setting_values(reply: &Value, name: &str, out: &mut Vec<String>) {
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    match reply {
        Value::Array(items) | Value::Set(items) => {
            for pair in items.chunks(2) {
                if let [k, v] = pair
                    && text(k).as_deref() == Some(name)
                    && let Some(v) = text(v)
                {
                    out.push(v);
                }
            }
            for item in items {
                setting_values(item, name, out);
            }
        }
        Value::Map(pairs) => {
            for (k, v) in pairs {
                match (text(k), text(v)) {
                    (Some(k), Some(v)) if k == name => out.push(v),
                    _ => setting_values(v, name, out),
                }
            }
        }
        _ => {}
    }
}

fn function_missing(e: &RedisError) -> bool {
    e.detail().is_some_and(|d| d.contains("Function not found"))
}

/// Errors the server returns without running the call, and after which
/// the same call may succeed: a slot that moved (the client refreshes its
/// slot map), a cluster electing, a server loading. (`ASK`, a slot being
/// migrated, is not followed: that needs `ASKING` on the target node's
/// connection, which the cluster client does only in its own retries, and
/// those would also resend calls whose connection dropped. The call fails
/// with the error, not run.)
fn not_run(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::Moved
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::BusyLoading
                | ServerErrorKind::MasterDown
        )
    )
}
