//! Real Redis servers for tests: `redis-server` processes on free loopback
//! ports in temporary directories, stopped by pid when dropped, and a
//! three-master cluster built from them with `redis-cli --cluster create`.
//!
//! Without `redis-server` on the PATH the tests that need it skip with a
//! message, except under `CI=true`, where that is a failure.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether Redis tests can run here; panics under `CI=true` when not.
pub fn available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: redis-server is required for the Redis engine's tests (Debian: redis-server)"
        );
        eprintln!("redis-server not found: Redis engine tests skipped");
    }
    found
}

/// A store on the server or cluster at `url`, on `clock` if given. These
/// servers keep no files, so `Flush` (`tests/redis_engine.rs` runs `Sync`
/// on a server that fsyncs every write).
pub async fn flush_store(
    url: String,
    clock: Option<&sled_idempotency::ManualClock>,
) -> sled_idempotency::Result<sled_idempotency::RedisIdempotencyStore> {
    let builder = sled_idempotency::RedisIdempotencyStore::builder(url)
        .durability(sled_idempotency::Durability::Flush);
    match clock {
        Some(clock) => builder.clock(clock.clone()),
        None => builder,
    }
    .open()
    .await
}

/// One `redis-server`.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

/// A loopback port that is free, and whose cluster bus port (+10000) fits.
fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind a loopback port");
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl Server {
    /// A server with no persistence.
    pub fn start() -> Server {
        Server::with(&["--save", "", "--appendonly", "no"])
    }

    /// A server that fsyncs every write to its append-only file.
    pub fn durable() -> Server {
        Server::with(&[
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ])
    }

    pub fn with(extra: &[&str]) -> Server {
        let mut server = Server {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("temporary directory"),
            args: extra.iter().map(|s| s.to_string()).collect(),
        };
        // Another process may take the free port before the server binds it:
        // then try another.
        for _ in 0..5 {
            if server.try_run() {
                return server;
            }
            server.port = free_port();
        }
        panic!("redis-server did not start on any of five free ports");
    }

    /// Starts the server on its port and directory; panics if it does not
    /// come up.
    fn run(&mut self) {
        assert!(
            self.try_run(),
            "redis-server did not start again on port {}",
            self.port
        );
    }

    /// Starts the server and waits until *it* (the directory it reports is
    /// ours) answers; false if it exited, as on a port already in use.
    fn try_run(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let dir = std::fs::canonicalize(self.dir.path())
            .unwrap_or_else(|_| self.dir.path().to_path_buf())
            .display()
            .to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| c.try_wait().ok().flatten().is_some());
            if exited {
                self.child = None;
                return false;
            }
            if self
                .command(&["CONFIG", "GET", "dir"])
                .is_some_and(|r| r.contains(&dir))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer", self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (SIGKILL, by pid) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts it again on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }

    /// One inline command; the raw reply, or `None` if the server cannot be
    /// reached.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).ok()?;
        let mut reply = vec![0; 64 * 1024];
        let n = stream.read(&mut reply).ok()?;
        Some(String::from_utf8_lossy(&reply[..n]).into_owned())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three masters, no replicas, all 16384 slots assigned.
pub struct Cluster {
    pub nodes: Vec<Server>,
}

impl Cluster {
    pub fn start() -> Cluster {
        let nodes: Vec<Server> = (0..3)
            .map(|_| {
                Server::with(&[
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                ])
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .expect("run redis-cli --cluster create");
        assert!(status.success(), "redis-cli --cluster create failed");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let ok = nodes.iter().all(|n| {
                n.command(&["CLUSTER", "INFO"])
                    .is_some_and(|i| i.contains("cluster_state:ok"))
            });
            if ok {
                return Cluster { nodes };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the cluster did not reach cluster_state:ok within 60 s");
    }

    /// The url of one node (any node will do).
    pub fn url(&self) -> String {
        self.nodes[1].url()
    }

    /// Moves `slots` hash slots, with their keys, from node `from` to node
    /// `to` (`redis-cli --cluster reshard`).
    pub fn reshard(&self, from: usize, to: usize, slots: u32) {
        let id = |i: usize| {
            let reply = self.nodes[i]
                .command(&["CLUSTER", "MYID"])
                .expect("CLUSTER MYID");
            reply.lines().last().expect("a node id").trim().to_owned()
        };
        let status = Command::new("redis-cli")
            .args([
                "--cluster",
                "reshard",
                &format!("127.0.0.1:{}", self.nodes[from].port),
            ])
            .args(["--cluster-from", &id(from), "--cluster-to", &id(to)])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .expect("run redis-cli --cluster reshard");
        assert!(status.success(), "redis-cli --cluster reshard failed");
    }

    /// Empties every master.
    pub fn flush(&self) {
        for node in &self.nodes {
            node.command(&["FLUSHALL"]).expect("FLUSHALL");
        }
    }
}
