//! Metrics through the `metrics` facade (feature `metrics`). The library
//! only records; the application installs a recorder (Prometheus, say:
//! `examples/prometheus.rs`) before it opens the store, since each
//! namespace registers its handles when it is first opened.
//!
//! Counters, labelled `namespace` and `durability`:
//!
//! | name | counts |
//! |---|---|
//! | `sled_idempotency_claims_total` | claims that acquired the key |
//! | `sled_idempotency_duplicates_total` (label `found`: `pending` or `done`) | claims that found the key claimed or done |
//! | `sled_idempotency_conflicts_total` | claims whose payload fingerprint differed |
//! | `sled_idempotency_completions_total` | pending claims turned done |
//! | `sled_idempotency_late_completions_total` | `mark_done` calls that found no claim |
//! | `sled_idempotency_releases_total` | pending claims given back (`release`, `abandon`) |
//! | `sled_idempotency_lease_conflicts_total` | lease operations refused: the lease was lost |
//! | `sled_idempotency_swept_total` | expired records removed |
//! | `sled_idempotency_claims_slowed_total` | claims made to wait for a sweeper that had fallen behind |
//!
//! Labelled `durability` only (the database's, not a namespace's):
//!
//! | name | kind | what |
//! |---|---|---|
//! | `sled_idempotency_io_failures_total` | counter | I/O failures that latched the store (at most one per open) |
//! | `sled_idempotency_durability_wait_seconds` | histogram | how long an acknowledged write waited for its flush (`Sync`, `Flush`) |
//! | `sled_idempotency_group_commit_size` | histogram | calls one flush released: acknowledged writes, and calls that wrote nothing but waited for a write already made (`Sync`, `Flush`) |
//!
//! And `sled_idempotency_claim_seconds`, a histogram labelled `namespace`
//! and `durability`: the latency of each claim, durability wait included,
//! failed claims too.

use std::time::Duration;

use metrics::{Counter, Histogram, counter, histogram};

use crate::config::Durability;
use crate::count::{COUNTS, Count};

/// The `durability` label of a mode.
pub(crate) fn label(durability: Durability) -> &'static str {
    match durability {
        Durability::Sync => "sync",
        Durability::Flush => "flush",
        Durability::Periodic(_) => "periodic",
    }
}

/// One namespace's metric handles, registered once.
#[derive(Debug)]
pub(crate) struct Meters {
    counters: [Counter; COUNTS],
    claim_seconds: Histogram,
}

impl Meters {
    pub(crate) fn new(namespace: &str, durability: Durability) -> Self {
        let labels = [
            ("namespace", namespace.to_owned()),
            ("durability", label(durability).to_owned()),
        ];
        let duplicates = |found: &'static str| {
            let mut with = labels.to_vec();
            with.push(("found", found.to_owned()));
            counter!("sled_idempotency_duplicates_total", &with)
        };
        let of = |count: Count| match count {
            Count::Claims => counter!("sled_idempotency_claims_total", &labels),
            Count::DuplicatesPending => duplicates("pending"),
            Count::DuplicatesDone => duplicates("done"),
            Count::FingerprintConflicts => counter!("sled_idempotency_conflicts_total", &labels),
            Count::Completions => counter!("sled_idempotency_completions_total", &labels),
            Count::LateCompletions => {
                counter!("sled_idempotency_late_completions_total", &labels)
            }
            Count::Releases => counter!("sled_idempotency_releases_total", &labels),
            Count::LeaseConflicts => counter!("sled_idempotency_lease_conflicts_total", &labels),
            Count::Swept => counter!("sled_idempotency_swept_total", &labels),
            Count::Slowed => counter!("sled_idempotency_claims_slowed_total", &labels),
        };
        Self {
            counters: [
                of(Count::Claims),
                of(Count::DuplicatesPending),
                of(Count::DuplicatesDone),
                of(Count::FingerprintConflicts),
                of(Count::Completions),
                of(Count::LateCompletions),
                of(Count::Releases),
                of(Count::LeaseConflicts),
                of(Count::Swept),
                of(Count::Slowed),
            ],
            claim_seconds: histogram!("sled_idempotency_claim_seconds", &labels),
        }
    }

    pub(crate) fn count(&self, count: Count, n: u64) {
        self.counters[count as usize].increment(n);
    }

    pub(crate) fn claim_took(&self, took: Duration) {
        self.claim_seconds.record(took.as_secs_f64());
    }
}

/// The flusher's metric handles (the whole database's).
#[derive(Debug)]
pub(crate) struct FlushMeters {
    pub(crate) io_failures: Counter,
    pub(crate) durability_wait: Histogram,
    pub(crate) group_commit_size: Histogram,
}

impl FlushMeters {
    pub(crate) fn new(durability: Durability) -> Self {
        let labels = [("durability", label(durability))];
        Self {
            io_failures: counter!("sled_idempotency_io_failures_total", &labels),
            durability_wait: histogram!("sled_idempotency_durability_wait_seconds", &labels),
            group_commit_size: histogram!("sled_idempotency_group_commit_size", &labels),
        }
    }
}
