//! What the per-namespace counters count: the names shared by `stats`
//! (the counters) and `metrics` (the same counts through the facade).

/// What a counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Count {
    Claims,
    DuplicatesPending,
    DuplicatesDone,
    FingerprintConflicts,
    Completions,
    LateCompletions,
    Releases,
    LeaseConflicts,
    Swept,
    Slowed,
}

/// Number of [`Count`]s.
pub(crate) const COUNTS: usize = 10;
