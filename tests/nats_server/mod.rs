//! A real `nats-server -js` for tests: on a free loopback port, its
//! JetStream store in a temporary directory, killed by pid when dropped.
//!
//! Without `nats-server` on the PATH the tests that need it skip with a
//! message, except under `CI=true`, where that is a failure (Debian
//! package `nats-server`, which `.ci/run` installs).
#![allow(dead_code)]

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether NATS tests can run here; panics under `CI=true` when not.
pub fn available() -> bool {
    let found = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: nats-server is required for the eventbus-nats tests (Debian: nats-server)"
        );
        eprintln!("nats-server not found: eventbus-nats tests skipped");
    }
    found
}

/// One `nats-server -js`.
pub struct Nats {
    child: Child,
    pub url: String,
    dir: tempfile::TempDir,
}

impl Nats {
    pub fn start() -> Nats {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let log = dir.path().join("nats.log");
        // A port the kernel handed out can be taken before the server binds
        // it: the server then exits, and another port is tried.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
                .port();
            let out = File::create(&log).expect("the server's log file");
            let mut child = Command::new("nats-server")
                .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
                .arg(dir.path().join("js"))
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("the log file"))
                .stderr(out)
                .spawn()
                .expect("start nats-server");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if child.try_wait().expect("the server's status").is_some() {
                    break; // port taken: try another
                }
                // The client port opens once JetStream is up.
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Nats {
                        child,
                        url: format!("nats://127.0.0.1:{port}"),
                        dir,
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "nats-server not ready within 10 s: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!(
            "nats-server did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill(); // SIGKILL, this child only
        let _ = self.child.wait();
    }
}
