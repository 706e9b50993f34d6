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
async fn a_group_spans_blocks_and_an_entry_may_straddle_their_boundary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _) = open(dir.path(), 0);
    // One group: the first entry ends 2 bytes before the block does, so
    // the second one's length crosses into the next block.
    let first = vec![1u8; BLOCK - GROUP_HEADER - ENTRY_HEADER - 2];
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
    damage(
        dir.path(),
        segment,
        offset_of(1, 10) + GROUP_HEADER as u64 + 6,
    );
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

/// Zeros `len` bytes of a segment from `at`: what a write the power cut
/// leaves of the blocks it had not reached.
fn zero(dir: &Path, segment: usize, at: u64, len: usize) {
    let file = OpenOptions::new()
        .write(true)
        .open(dir.join(format!("{segment:04}.wal")))
        .expect("open the segment");
    std::os::unix::fs::FileExt::write_all_at(&file, &vec![0; len], at).expect("write");
}

#[tokio::test]
async fn nothing_of_a_torn_group_comes_back_when_its_numbers_are_used_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _) = open(dir.path(), 0);
    write(&log, 1, 5).await;
    // Entries 5, 6 and 7 as one group over three blocks, entry 6 starting
    // exactly at the second block and entry 7 at the third.
    let fill = BLOCK - GROUP_HEADER - ENTRY_HEADER;
    log.append(&vec![5; fill]).expect("append");
    log.append(&vec![6; BLOCK - ENTRY_HEADER]).expect("append");
    let lsn = log.append(b"seven").expect("append");
    log.wait(lsn).await.expect("durable");
    drop(log);
    // The cut reached the group's last two blocks but not its first.
    zero(dir.path(), 0, offset_of(1, 5), BLOCK);
    let (log, entries) = open(dir.path(), 0);
    assert_eq!(lsns(&entries), vec![1, 2, 3, 4]);
    // Numbers 5 to 8 again, for other entries, in the other segment; then
    // the first of them torn in turn.
    log.checkpointed(4);
    write(&log, 5, 9).await;
    drop(log);
    let (_, entries) = open(dir.path(), 0);
    assert_eq!(lsns(&entries), (1..9).collect::<Vec<_>>());
    for e in &entries {
        assert_eq!(e.payload, payload(e.lsn), "entry {}", e.lsn);
    }
    zero(dir.path(), 1, 0, BLOCK);
    let (log, entries) = open(dir.path(), 0);
    assert_eq!(
        lsns(&entries),
        vec![1, 2, 3, 4],
        "the old group's remains are never chained to the new entries"
    );
    assert_eq!(log.appended(), 4);
}

#[tokio::test]
async fn a_group_forged_inside_a_payload_is_only_a_payload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _) = open(dir.path(), 0);
    // A well-formed group numbered 1000, placed in a payload so that it
    // lands on a block boundary of the segment.
    let mut forged = vec![0u8; GROUP_HEADER];
    forged.extend_from_slice(&3u32.to_le_bytes());
    forged.extend_from_slice(b"bad");
    seal(&mut forged, 1000, 1);
    let at = BLOCK - GROUP_HEADER - ENTRY_HEADER;
    let mut carrier = vec![9u8; at];
    carrier.extend_from_slice(&forged);
    carrier.resize(2 * BLOCK, 9);
    let lsn = log.append(&carrier).expect("append");
    log.wait(lsn).await.expect("durable");
    drop(log);
    let (log, entries) = open(dir.path(), 0);
    assert_eq!(lsns(&entries), vec![1]);
    assert_eq!(entries[0].payload, carrier);
    assert_eq!(log.appended(), 1, "numbering ignores the forged group");
    drop(log);
    // Also when the forged group lies past the end of a torn chain.
    zero(dir.path(), 0, 0, BLOCK);
    let (_, entries) = Log::open(dir.path(), SMALL, 0).expect("an intact log opens");
    assert!(entries.is_empty());
}

#[tokio::test]
async fn segments_left_out_of_a_reopen_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let three = Config {
        segments: 3,
        ..SMALL
    };
    let log = Arc::new(Log::open(dir.path(), three, 0).expect("open").0);
    write(&log, 1, 4).await;
    drop(log);
    let err = Log::open(dir.path(), SMALL, 0).expect_err("segment 2 left out");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("at least 3"), "{err}");
    let (_, entries) = Log::open(dir.path(), three, 0).expect("reopen with all");
    assert_eq!(lsns(&entries), vec![1, 2, 3]);
}

/// Fills both segments, then waits for an entry that needs segment 0
/// again and makes the checkpoint it asks for, both in one task.
async fn wait_and_checkpoint_in_one_task(log: Arc<Log>) {
    let per_segment = SMALL.segment_bytes / BLOCK as u64;
    write(&log, 1, 2 * per_segment + 1).await;
    let lsn = log.append(b"after the checkpoint").expect("append");
    let checkpointer = async {
        let wanted = log.checkpoint_wanted().await.expect("asked for");
        assert_eq!(wanted, per_segment, "segment 0's last entry");
        log.checkpointed(wanted);
    };
    let both = async { tokio::join!(log.wait(lsn), checkpointer).0 };
    tokio::time::timeout(Duration::from_secs(30), both)
        .await
        .expect("the wait for a checkpoint blocks no thread")
        .expect("durable");
}

#[test]
fn waiting_for_a_checkpoint_blocks_no_thread_on_either_runtime() {
    for multi in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = if multi {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        .expect("runtime");
        runtime.block_on(wait_and_checkpoint_in_one_task(open(dir.path(), 0).0));
    }
}

#[tokio::test]
async fn the_last_sequence_numbers_are_an_error_not_an_overflow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = Log::open(dir.path(), SMALL, u64::MAX).expect_err("nothing left to number");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    let (log, _) = open(dir.path(), u64::MAX - 2);
    let lsn = log.append(b"last").expect("append");
    assert_eq!(lsn, u64::MAX - 1);
    assert!(log.append(b"one more").is_err());
    log.wait(lsn).await.expect("durable");
    drop(log);
    let (_, entries) = open(dir.path(), u64::MAX - 2);
    assert_eq!(lsns(&entries), vec![u64::MAX - 1]);
}

#[tokio::test]
async fn waiting_for_an_entry_never_appended_is_refused_without_latching() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _) = open(dir.path(), 0);
    write(&log, 1, 3).await;
    let err = log.wait(10).await.expect_err("never appended");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    write(&log, 3, 5).await;
    assert_eq!(log.durable(), 4);
}
