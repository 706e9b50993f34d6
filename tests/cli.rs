//! The `sled-idempotency` command-line tool, run as a built binary on real
//! databases: every subcommand, `--json` parsed back, exit codes, the
//! refusal of a database another process holds, bad paths, bad import
//! input, read-only commands that change no byte, and `compact` killed at
//! each of its steps.
#![cfg(feature = "cli")]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{TestResult, copy_dir, id};
use serde_json::Value;
use sled_idempotency::{ClaimResult, ManualClock, SledIdempotencyStore};

const HOUR: Duration = Duration::from_secs(3600);

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sled-idempotency"))
}

fn run(args: &[&str]) -> Output {
    match bin().args(args).output() {
        Ok(output) => output,
        Err(e) => panic!("cannot run the tool: {e}"),
    }
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json(output: &Output) -> Value {
    match serde_json::from_slice(&output.stdout) {
        Ok(value) => value,
        Err(e) => panic!("not JSON ({e}): {}", stdout(output)),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn arg(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

/// A database the tool reads with the real clock: in the default namespace
/// ids 0..20 done and 20..30 pending after three attempts (both live for an
/// hour), 30..40 done two hours ago and expired; in namespace `orders`,
/// ids 100..105 pending. Returns the largest token handed out.
async fn populate(path: &Path, extra_expired: u128) -> Result<u64, sled_idempotency::Error> {
    let clock = ManualClock::new(now_ms() - 2 * HOUR.as_millis() as u64);
    let store = SledIdempotencyStore::builder(path)
        .clock(clock.clone())
        .open()
        .await?;
    for n in 30..40 + extra_expired {
        store.try_claim(&id(n), Duration::from_secs(60)).await?;
        store.mark_done(&id(n)).await?;
    }
    clock.set(now_ms());
    for n in 20..30 {
        for _ in 0..2 {
            store.try_claim(&id(n), Duration::from_millis(1)).await?;
            clock.advance(Duration::from_millis(1));
        }
    }
    let mut highest = 0;
    for n in 0..30 {
        if let ClaimResult::Acquired(lease) = store.claim(&id(n), HOUR).await? {
            highest = highest.max(lease.token());
            if n < 20 {
                store.complete(&lease).await?;
            }
        }
    }
    let orders = store.namespace("orders").await?;
    for n in 100..105 {
        if let ClaimResult::Acquired(lease) = orders.claim(&id(n), HOUR).await? {
            highest = highest.max(lease.token());
        }
    }
    store.close().await?;
    Ok(highest)
}

/// Every file under `path` with its bytes.
fn snapshot(path: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut dirs = vec![path.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.insert(p.clone(), std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    files
}

/// One JSON value per line of standard output.
fn json_lines(output: &Output) -> Vec<Value> {
    stdout(output)
        .lines()
        .map(|line| match serde_json::from_str(line) {
            Ok(value) => value,
            Err(e) => panic!("not JSON ({e}): {line}"),
        })
        .collect()
}

fn ids(values: &[Value]) -> Vec<String> {
    values
        .iter()
        .map(|v| v["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn read_only_commands_answer_exactly_and_change_no_byte() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("db");
    populate(&db, 0).await?;
    let before = snapshot(&db);

    let stats = run(&["stats", arg(&db), "--json"]);
    assert_eq!(code(&stats), 0, "{}", stderr(&stats));
    let stats = json(&stats);
    assert_eq!(stats["format_version"], 3);
    assert!(stats["size_on_disk"].as_u64().unwrap_or(0) > 0);
    let default = &stats["namespaces"][0];
    assert_eq!(default["namespace"], "default");
    assert_eq!(
        (
            &default["live_pending"],
            &default["live_done"],
            &default["expired_not_swept"],
            &default["sweepable"]
        ),
        (
            &Value::from(10),
            &Value::from(20),
            &Value::from(10),
            &Value::from(10)
        )
    );
    assert_eq!(default["attempts"][1]["records"], 20);
    assert_eq!(
        default["attempts"][3],
        serde_json::json!({"min": 3, "records": 10})
    );
    assert_eq!(stats["namespaces"][1]["namespace"], "orders");
    assert_eq!(stats["namespaces"][1]["live_pending"], 5);
    let text = run(&["stats", arg(&db), "--namespace", "orders"]);
    assert!(
        stdout(&text).contains("namespace orders"),
        "{}",
        stdout(&text)
    );
    assert!(!stdout(&text).contains("namespace default"));

    let get = run(&["get", arg(&db), &id(25).to_string(), "--json"]);
    assert_eq!(code(&get), 0);
    let record = json(&get);
    assert_eq!(
        (&record["state"], &record["attempts"], &record["live"]),
        (&Value::from("pending"), &Value::from(3), &Value::from(true))
    );
    let absent = run(&["get", arg(&db), &id(77).to_string()]);
    assert_eq!(code(&absent), 1, "absent: exit code 1");
    let expired = json(&run(&["get", arg(&db), &id(31).to_string(), "--json"]));
    assert_eq!(expired["live"], false);
    let text = run(&[
        "get",
        arg(&db),
        &id(104).to_string(),
        "--namespace",
        "orders",
    ]);
    assert!(
        stdout(&text).contains("state        pending"),
        "{}",
        stdout(&text)
    );

    let poison = run(&["list", arg(&db), "--min-attempts", "3", "--json"]);
    assert_eq!(code(&poison), 0);
    let lines = json_lines(&poison);
    assert_eq!(
        ids(&lines),
        (20..30).map(|n| id(n).to_string()).collect::<Vec<_>>()
    );
    let page = run(&[
        "list",
        arg(&db),
        "--state",
        "done",
        "--limit",
        "3",
        "--after",
        &id(4).to_string(),
        "--json",
    ]);
    let lines = json_lines(&page);
    assert_eq!(
        ids(&lines),
        (5..8).map(|n| id(n).to_string()).collect::<Vec<_>>()
    );
    let with_expired = run(&[
        "list",
        arg(&db),
        "--expired",
        "--after",
        &id(29).to_string(),
    ]);
    assert_eq!(
        stdout(&with_expired).lines().count(),
        1 + 10,
        "header and 30..40"
    );
    let shown = stdout(&with_expired);
    assert!(
        shown.contains(" min ago") || shown.contains(" h ago"),
        "{shown}"
    );

    let verify = run(&["verify", arg(&db), "--json"]);
    assert_eq!(code(&verify), 0, "{}", stdout(&verify));
    assert_eq!(json(&verify)["ok"], true);
    assert_eq!(json(&verify)["examined"], 45);

    let export = run(&["export", arg(&db)]);
    assert_eq!(code(&export), 0, "{}", stderr(&export));
    assert_eq!(
        stdout(&export).lines().count(),
        30 + 5,
        "forgotten records left out"
    );
    assert!(stderr(&export).contains("exported 35 records from 2 namespaces"));

    let missing_ns = run(&["list", arg(&db), "--namespace", "nope"]);
    assert_eq!(code(&missing_ns), 2);
    assert!(stderr(&missing_ns).contains("has no namespace \"nope\" (it has: default, orders)"));

    assert!(
        snapshot(&db) == before,
        "a read-only command changed the database"
    );
    Ok(())
}

#[tokio::test]
async fn release_sweep_export_import_round_trip() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("db");
    let highest = populate(&db, 0).await?;

    let released = run(&["release", arg(&db), &id(21).to_string(), "--json"]);
    assert_eq!(code(&released), 0, "{}", stderr(&released));
    assert_eq!(json(&released)["released"], true);
    assert_eq!(code(&run(&["get", arg(&db), &id(21).to_string()])), 1);
    let done = run(&["release", arg(&db), &id(3).to_string()]);
    assert_eq!(code(&done), 1);
    assert!(stdout(&done).contains("never erases a done record"));
    assert_eq!(
        code(&run(&["get", arg(&db), &id(3).to_string()])),
        0,
        "still done"
    );
    let wrong_ns = run(&["release", arg(&db), &id(100).to_string()]);
    assert_eq!(code(&wrong_ns), 1, "100 is in orders");
    let bad_id = run(&["release", arg(&db), "not-a-uuid"]);
    assert_eq!(code(&bad_id), 2);
    assert!(stderr(&bad_id).contains("is not a message id"));

    let sweep = run(&["sweep", arg(&db), "--json"]);
    assert_eq!(code(&sweep), 0, "{}", stderr(&sweep));
    assert_eq!(
        (
            json(&sweep)["examined"].as_u64(),
            json(&sweep)["removed"].as_u64()
        ),
        (Some(44), Some(10))
    );

    let first = dir.path().join("first.jsonl");
    let out = run(&["export", arg(&db), "--out", arg(&first), "--json"]);
    assert_eq!(json(&out)["records"], 34);
    let copy = dir.path().join("copy");
    let import = run(&["import", arg(&copy), arg(&first), "--json"]);
    assert_eq!(code(&import), 0, "{}", stderr(&import));
    let report = json(&import);
    assert_eq!(
        (report["lines"].as_u64(), report["written"].as_u64()),
        (Some(34), Some(34))
    );
    assert!(report["token_floor"].as_u64().unwrap_or(0) >= highest);
    let second = dir.path().join("second.jsonl");
    assert_eq!(
        code(&run(&["export", arg(&copy), "--out", arg(&second)])),
        0
    );
    assert_eq!(
        std::fs::read(&first)?,
        std::fs::read(&second)?,
        "byte-identical"
    );

    // Importing into the database it came from: nothing conflicts.
    let again = json(&run(&["import", arg(&db), arg(&first), "--json"]));
    assert_eq!(again["unchanged"], 34);

    // A token from the imported database is above every imported token.
    let store = SledIdempotencyStore::open(&copy).await?;
    match store.claim(&id(9_999), HOUR).await? {
        ClaimResult::Acquired(lease) => assert!(lease.token() > highest),
        other => return Err(format!("claim: {other:?}").into()),
    }
    store.close().await?;
    Ok(())
}

#[tokio::test]
async fn bad_import_input_names_the_line_and_writes_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("db");
    populate(&db, 0).await?;
    let export = dir.path().join("export.jsonl");
    assert_eq!(code(&run(&["export", arg(&db), "--out", arg(&export)])), 0);
    let good = std::fs::read_to_string(&export)?;
    let mut lines: Vec<String> = good.lines().map(str::to_owned).collect();
    lines[2] = lines[2].replace("\"token\":", "\"token\":\"x\",\"t\":");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, lines.join("\n") + "\n")?;

    // Into a fresh path: refused, and no database is left behind.
    let fresh = dir.path().join("fresh");
    let refused = run(&["import", arg(&fresh), arg(&bad)]);
    assert_eq!(code(&refused), 2);
    assert!(
        stderr(&refused).contains("line 3 of the import"),
        "{}",
        stderr(&refused)
    );
    assert!(!fresh.exists(), "nothing written");

    // Into an existing database: refused, its records unchanged.
    let before = run(&["export", arg(&db)]).stdout;
    let refused = run(&["import", arg(&db), arg(&bad)]);
    assert_eq!(code(&refused), 2);
    assert!(stderr(&refused).contains("line 3"));
    assert_eq!(run(&["export", arg(&db)]).stdout, before);

    // A conflict is refused unless told how to resolve it.
    let conflicting = good.replacen("\"attempts\":1,", "\"attempts\":9,", 1);
    std::fs::write(&bad, &conflicting)?;
    let refused = run(&["import", arg(&db), arg(&bad)]);
    assert_eq!(code(&refused), 2);
    assert!(
        stderr(&refused).contains("already holds a different record"),
        "{}",
        stderr(&refused)
    );
    assert!(stderr(&refused).contains("--on-conflict keep|replace"));
    assert_eq!(run(&["export", arg(&db)]).stdout, before);
    let replaced = json(&run(&[
        "import",
        arg(&db),
        arg(&bad),
        "--on-conflict",
        "replace",
        "--json",
    ]));
    assert_eq!(replaced["replaced"], 1);
    let missing = run(&["import", arg(&db), arg(&dir.path().join("nope.jsonl"))]);
    assert_eq!(code(&missing), 2);
    assert!(stderr(&missing).contains("cannot read"));
    Ok(())
}

#[tokio::test]
async fn a_held_database_is_refused_at_once_by_every_command() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("db");
    populate(&db, 0).await?;
    let file = dir.path().join("in.jsonl");
    std::fs::write(&file, "")?;
    let store = SledIdempotencyStore::open(&db).await?;
    let key = id(1).to_string();
    let commands: [&[&str]; 9] = [
        &["stats", arg(&db)],
        &["get", arg(&db), &key],
        &["list", arg(&db)],
        &["release", arg(&db), &key],
        &["sweep", arg(&db)],
        &["verify", arg(&db)],
        &["export", arg(&db)],
        &["import", arg(&db), arg(&file)],
        &["compact", arg(&db)],
    ];
    for args in commands {
        let started = Instant::now();
        let output = run(args);
        assert_eq!(code(&output), 2, "{args:?}");
        let message = stderr(&output);
        assert!(
            message.contains("is held by another process"),
            "{args:?}: {message}"
        );
        assert!(message.contains("admin API"), "{args:?}: {message}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{args:?} waited"
        );
    }
    store.close().await?;
    Ok(())
}

#[test]
fn a_path_that_is_not_a_database_fails_clearly() -> TestResult {
    let dir = tempfile::tempdir()?;
    let nothing = dir.path().join("nothing");
    let file = dir.path().join("file");
    std::fs::write(&file, "x")?;
    let other = dir.path().join("other");
    std::fs::create_dir(&other)?;
    std::fs::write(other.join("notes.txt"), "x")?;
    for (path, says) in [
        (&nothing, "nothing is there"),
        (&file, "is not a directory"),
        (&other, "holds no sled database"),
    ] {
        for command in ["stats", "verify", "sweep", "compact"] {
            let output = run(&[command, arg(path)]);
            assert_eq!(code(&output), 2);
            assert!(
                stderr(&output).contains(says),
                "{command}: {}",
                stderr(&output)
            );
        }
    }
    assert!(!nothing.exists(), "no command created a database");
    let import = run(&["import", arg(&other), arg(&file)]);
    assert_eq!(code(&import), 2);
    assert!(
        std::fs::read_dir(&other)?.count() == 1,
        "nothing written into it"
    );
    Ok(())
}

/// Runs `compact` on `db`, paused at `step`, and kills it there with
/// SIGKILL.
fn compact_killed_at(db: &Path, step: &str) -> TestResult {
    let mut child = bin()
        .args(["compact", arg(db)])
        .env("SLED_IDEMPOTENCY_TEST_PAUSE_AT", step)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line == format!("paused at {step}") => break,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                return Err(format!("compact never paused at {step}: {e}").into());
            }
        }
    }
    child.kill()?; // SIGKILL
    child.wait()?;
    Ok(())
}

#[tokio::test]
async fn compact_killed_at_each_step_leaves_a_whole_database() -> TestResult {
    let dir = tempfile::tempdir()?;
    let template = dir.path().join("template");
    // 10 + 5,000 expired done records: the copy reports progress (and can
    // be killed) midway.
    let highest = populate(&template, 5_000).await?;
    let live = run(&["export", arg(&template)]).stdout;
    assert_eq!(String::from_utf8_lossy(&live).lines().count(), 35);

    let steps = [
        ("opened", true),
        ("copying", true),
        ("copied", true),
        ("swapped", false),
        ("removed", false),
    ];
    for (step, old) in steps {
        let db = dir.path().join(format!("db-{step}"));
        copy_dir(&template, &db)?;
        compact_killed_at(&db, step)?;

        // Whole: it opens, verifies, holds exactly the live records, and
        // is the old database (expired records still there) before the
        // exchange, the new one after it.
        let verify = run(&["verify", arg(&db), "--json"]);
        assert_eq!(json(&verify)["ok"], true, "{step}: {}", stdout(&verify));
        assert_eq!(run(&["export", arg(&db)]).stdout, live, "{step}");
        let stats = json(&run(&["stats", arg(&db), "--json"]));
        let expired = stats["namespaces"][0]["expired_not_swept"].as_u64();
        assert_eq!(expired, Some(if old { 5_010 } else { 0 }), "{step}");
        let store = SledIdempotencyStore::open(&db).await?;
        match store.claim(&id(1_000_000), HOUR).await? {
            ClaimResult::Acquired(lease) => assert!(lease.token() > highest, "{step}"),
            other => return Err(format!("{step}: {other:?}").into()),
        }
        store.release(&id(1_000_000)).await?;
        store.close().await?;

        // A compaction run to the end clears what the killed one left.
        let done = run(&["compact", arg(&db), "--json"]);
        assert_eq!(code(&done), 0, "{step}: {}", stderr(&done));
        let report = json(&done);
        assert_eq!(report["records"], 35, "{step}");
        assert!(
            !dir.path().join(format!("db-{step}.compact")).exists(),
            "{step}"
        );
        assert_eq!(run(&["export", arg(&db)]).stdout, live, "{step}");
    }
    Ok(())
}

#[tokio::test]
async fn compact_gives_space_back_and_keeps_fencing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("db");
    let highest = populate(&db, 20_000).await?;
    let live = run(&["export", arg(&db)]).stdout;
    let output = run(&["compact", arg(&db), "--json"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let report = json(&output);
    assert_eq!(
        (report["records"].as_u64(), report["dropped"].as_u64()),
        (Some(35), Some(20_010))
    );
    let (before, after) = (
        report["bytes_before"].as_u64().unwrap_or(0),
        report["bytes_after"].as_u64().unwrap_or(u64::MAX),
    );
    assert!(after < before, "{after} < {before}");
    assert!(report["token_floor"].as_u64().unwrap_or(0) > highest);
    assert_eq!(run(&["export", arg(&db)]).stdout, live);
    let text = run(&["compact", arg(&db)]);
    assert!(stdout(&text).contains("records kept"), "{}", stdout(&text));
    Ok(())
}

/// `compact` keeps what a worker with the given retention remembers, and
/// follows a symbolic link to the database.
#[tokio::test]
async fn compact_honours_the_retention_given_and_follows_a_link() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("db");
    let clock = ManualClock::new(now_ms() - 2 * HOUR.as_millis() as u64);
    let store = SledIdempotencyStore::builder(&db)
        .clock(clock.clone())
        .open()
        .await?;
    // Expired two hours ago: remembered for the default day, forgotten
    // under an hour's retention.
    store.try_claim(&id(1), Duration::from_secs(60)).await?;
    clock.set(now_ms());
    store.try_claim(&id(2), HOUR).await?;
    store.close().await?;

    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&db, &link)?;
    let kept = json(&run(&["compact", arg(&link), "--json"]));
    assert_eq!(
        (kept["records"].as_u64(), kept["dropped"].as_u64()),
        (Some(2), Some(0))
    );
    assert!(
        std::fs::symlink_metadata(&link)?.file_type().is_symlink(),
        "the link stays a link"
    );
    assert!(!dir.path().join("db.compact").exists() && !dir.path().join("link.compact").exists());
    assert_eq!(code(&run(&["get", arg(&db), &id(1).to_string()])), 0);

    let shorter = run(&[
        "--pending-retention",
        "3600",
        "compact",
        arg(&link),
        "--json",
    ]);
    assert_eq!(code(&shorter), 0, "{}", stderr(&shorter));
    let report = json(&shorter);
    assert_eq!(
        (report["records"].as_u64(), report["dropped"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(code(&run(&["get", arg(&db), &id(1).to_string()])), 1);
    assert_eq!(code(&run(&["get", arg(&db), &id(2).to_string()])), 0);
    Ok(())
}
