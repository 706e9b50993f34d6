use std::sync::Arc;
use std::time::Duration;

use super::*;

/// Two segments, each holding a largest entry and a little more.
const SMALL: Config = Config {
    segment_bytes: 80 * 1024,
    segments: 2,
};

fn open(dir: &Path, checkpointed: u64) -> (Arc<Log>, Vec<Entry>) {
    let (log, entries) = Log::open(dir, SMALL, checkpointed).expect("open the log");
    (Arc::new(log), entries)
}

fn payload(n: u64) -> Vec<u8> {
    // Lengths vary so entries straddle block boundaries.
    let len = 1 + (n as usize * 37) % 700;
    (0..len).map(|i| (n as usize + i) as u8).collect()
}

fn lsns(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.lsn).collect()
}

async fn write(log: &Arc<Log>, from: u64, to: u64) {
    for n in from..to {
        let lsn = log.append(&payload(n)).expect("append");
        log.wait(lsn).await.expect("durable");
    }
}

#[tokio::test]
async fn durable_entries_come_back_in_order_after_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, entries) = open(dir.path(), 0);
    assert!(entries.is_empty());
    write(&log, 1, 41).await;
    assert_eq!(log.durable(), 40);
    drop(log);
    let (_, entries) = open(dir.path(), 0);
    assert_eq!(lsns(&entries), (1..41).collect::<Vec<_>>());
    for e in &entries {
        assert_eq!(e.payload, payload(e.lsn));
    }
    let (_, after) = open(dir.path(), 25);
    assert_eq!(
        lsns(&after),
        (26..41).collect::<Vec<_>>(),
        "only what the checkpoint does not cover"
    );
}

#[tokio::test]
async fn an_entry_header_may_straddle_a_block_boundary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _) = open(dir.path(), 0);
    // One group: the first entry ends 4 bytes before the block does, so
    // the second one's header crosses into the next block.
    let first = vec![1u8; BLOCK - 4 - HEADER - TRAILER];
    log.append(&first).expect("append");
    let lsn = log.append(b"second").expect("append");
    log.wait(lsn).await.expect("durable");
    drop(log);
    let (_, entries) = open(dir.path(), 0);
    assert_eq!(lsns(&entries), vec![1, 2]);
    assert_eq!(entries[1].payload, b"second");
}

#[tokio::test]
async fn numbering_goes_on_after_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _) = open(dir.path(), 0);
    write(&log, 1, 6).await;
    drop(log);
    let (log, entries) = open(dir.path(), 0);
    log.checkpointed(entries.last().map_or(0, |e| e.lsn));
    assert_eq!(log.append(b"next").expect("append"), 6);
    log.wait(6).await.expect("durable");
    drop(log);
    let (_, entries) = open(dir.path(), 3);
    assert_eq!(lsns(&entries), vec![4, 5, 6]);
}

/// Flips one byte of the segment file at `at`.
fn damage(dir: &Path, segment: usize, at: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(format!("{segment:04}.wal")))
        .expect("open the segment");
    let mut byte = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, at).expect("read");
    byte[0] ^= 0xff;
    std::os::unix::fs::FileExt::write_all_at(&file, &byte, at).expect("write");
}

/// Offset of entry `lsn` in a segment written from its start with
/// `payload(first..)`, one entry per group.
fn offset_of(first: u64, lsn: u64) -> u64 {
    (lsn - first) * BLOCK as u64
}

#[tokio::test]
async fn recovery_stops_at_a_torn_last_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _) = open(dir.path(), 0);
    write(&log, 1, 11).await;
    let segment = log.state().segment;
    drop(log);
    // The last group's payload, as a torn write would leave it.
    damage(dir.path(), segment, offset_of(1, 10) + HEADER as u64 + 2);
    let (_, entries) = open(dir.path(), 0);
    assert_eq!(lsns(&entries), (1..10).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_damaged_entry_inside_the_log_is_an_error_not_a_silent_loss() {
    let per_segment = SMALL.segment_bytes / BLOCK as u64;
    // Entry 4 with later groups in its own segment, and entry 19 with a
    // later group in the other one.
    for (lsn, segment) in [(4, 0), (per_segment - 1, 0)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, _) = open(dir.path(), 0);
        write(&log, 1, per_segment + 3).await;
        drop(log);
        damage(dir.path(), segment, offset_of(1, lsn) + 1);
        let err = Log::open(dir.path(), SMALL, 0).expect_err("a gap in the log");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let message = err.to_string();
        assert!(
            message.contains(&format!("entry {lsn} cannot be read")),
            "{message}"
        );
        // Covered by a checkpoint, the damage is harmless.
        let (_, entries) = open(dir.path(), per_segment + 1);
        assert_eq!(lsns(&entries), vec![per_segment + 2]);
    }
}

#[tokio::test]
async fn a_reused_segment_replays_none_of_its_previous_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _) = open(dir.path(), 0);
    let per_segment = SMALL.segment_bytes / BLOCK as u64;
    // Around the ring twice, a checkpoint before each reuse.
    let mut next = 1;
    for _ in 0..4 {
        log.checkpointed(next - 1);
        write(&log, next, next + per_segment).await;
        next += per_segment;
    }
    // Half a segment more, over entries of the previous round.
    log.checkpointed(next - 1);
    write(&log, next, next + per_segment / 2).await;
    let end = next + per_segment / 2 - 1;
    drop(log);
    let (_, entries) = open(dir.path(), next - 1);
    assert_eq!(lsns(&entries), (next..=end).collect::<Vec<_>>());
    let (_, all) = open(dir.path(), next - per_segment - 1);
    assert_eq!(all.first().map(|e| e.lsn), Some(next - per_segment));
    assert_eq!(all.last().map(|e| e.lsn), Some(end));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_is_not_written_over_before_its_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _) = open(dir.path(), 0);
    let per_segment = SMALL.segment_bytes / BLOCK as u64;
    // Fill both segments: the next group needs segment 0 again.
    write(&log, 1, 2 * per_segment + 1).await;
    let covered = 2 * per_segment;
    let lsn = log.append(b"waits").expect("append");
    let waiter = {
        let log = log.clone();
        tokio::spawn(async move { log.wait(lsn).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !waiter.is_finished(),
        "segment 0 holds entries no checkpoint covers"
    );
    assert_eq!(log.durable(), covered);
    // A checkpoint short of segment 0's entries frees nothing.
    log.checkpointed(per_segment - 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiter.is_finished());
    log.checkpointed(per_segment);
    waiter
        .await
        .expect("join")
        .expect("durable once segment 0 is covered");
    drop(log);
    let (_, entries) = open(dir.path(), per_segment);
    assert_eq!(entries.first().map(|e| e.lsn), Some(per_segment + 1));
    assert_eq!(
        entries.last().map(|e| e.payload.as_slice()),
        Some(&b"waits"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_writers_share_groups_and_all_come_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Room for every entry: nothing here checkpoints.
    let roomy = Config {
        segment_bytes: 1 << 20,
        segments: 2,
    };
    let log = Arc::new(Log::open(dir.path(), roomy, 0).expect("open").0);
    let writers: Vec<_> = (0..64u64)
        .map(|t| {
            let log = log.clone();
            tokio::spawn(async move {
                for k in 0..20 {
                    let lsn = log.append(&payload(t * 100 + k)).expect("append");
                    log.wait(lsn).await.expect("durable");
                    assert!(log.durable() >= lsn);
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    assert_eq!(log.durable(), 64 * 20);
    drop(log);
    let (_, entries) = Log::open(dir.path(), roomy, 0).expect("reopen");
    assert_eq!(lsns(&entries), (1..=64 * 20).collect::<Vec<_>>());
}

#[test]
fn a_current_thread_runtime_hands_the_write_to_a_blocking_thread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (log, _) = open(dir.path(), 0);
        write(&log, 1, 4).await;
        assert_eq!(log.durable(), 3);
    });
}

#[tokio::test]
async fn a_failed_write_or_fdatasync_latches_the_log() {
    for fault in [Fault::Write, Fault::Sync] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, _) = open(dir.path(), 0);
        write(&log, 1, 4).await;
        log.inject(fault);
        let lsn = log.append(b"lost").expect("append");
        let err = log.wait(lsn).await.expect_err("not acknowledged");
        assert!(err.to_string().contains("injected"), "{fault:?}: {err}");
        assert_eq!(log.durable(), 3, "{fault:?}");
        assert!(
            log.append(b"after").is_err(),
            "{fault:?}: nothing is appended after"
        );
        // Acknowledged before the failure: still acknowledged.
        log.wait(3).await.expect("durable before the failure");
        drop(log);
        let (_, entries) = open(dir.path(), 0);
        assert_eq!(lsns(&entries)[..3], [1, 2, 3], "{fault:?}");
    }
}

#[test]
fn bad_configurations_and_entries_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    for config in [
        Config {
            segment_bytes: SMALL.segment_bytes,
            segments: 1,
        },
        Config {
            segment_bytes: 4096,
            segments: 2,
        },
        Config {
            segment_bytes: SMALL.segment_bytes + 1,
            segments: 2,
        },
    ] {
        let err = Log::open(dir.path(), config, 0).expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{config:?}");
    }
    let (log, _) = Log::open(dir.path(), SMALL, 0).expect("open");
    assert!(log.append(b"").is_err());
    assert!(log.append(&vec![0; MAX_PAYLOAD + 1]).is_err());
    drop(log);
    let bigger = Config {
        segment_bytes: 2 * SMALL.segment_bytes,
        segments: 2,
    };
    let err = Log::open(dir.path(), bigger, 0).expect_err("segments of another size");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn largest_entries_take_a_segment_each_and_wrap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _) = open(dir.path(), 0);
    let big = vec![7u8; MAX_PAYLOAD];
    for n in 1..=7u64 {
        log.checkpointed(n - 1);
        let lsn = log.append(&big).expect("append");
        assert_eq!(lsn, n);
        log.wait(lsn).await.expect("durable");
    }
    drop(log);
    let (_, entries) = open(dir.path(), 5);
    assert_eq!(lsns(&entries), vec![6, 7]);
    assert!(entries.iter().all(|e| e.payload == big));
}
