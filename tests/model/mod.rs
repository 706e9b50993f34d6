//! A tiny in-memory model of the store, written straight from the "Semantics"
//! table of docs/semantics.md (it does not reuse the crate's state machine, so a mistake there
//! shows up as a divergence), and a driver that applies one sequence of
//! [`Op`]s to the model and to a real store, comparing after every step.
//!
//! Shared by the proptest driver (`tests/model_based.rs`), the named
//! regression tests, and the cargo-fuzz target (`fuzz/fuzz_targets/model.rs`).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use sled_idempotency::{
    ClaimOutcome, ClaimResult, Durability, Engine, Error, Holder, Lease, ManualClock, MessageId,
    Record, SledEngine, SledIdempotencyStore, State, Store,
};

/// Keys are drawn from a small space so that operations collide.
pub const KEYS: u8 = 4;
/// The durability the fuzz target and most model cases use: acknowledged
/// before any flush, and no flush within a sequence.
pub const PERIODIC: Durability = Durability::Periodic(Duration::from_secs(3600));
/// Start of the model clock (unix ms): the year 2096, in the future of any
/// Redis server the driver runs against, which expires records at the
/// model clock's times.
pub const T0: u64 = 4_000_000_000_000;
/// `default_ttl` of the store under test (retention of an unclaimed done).
pub const DEFAULT_TTL_MS: u64 = 500;
/// `pending_retention` of the store under test: how long an expired claim
/// is remembered. Short enough that sequences reach forgotten claims.
pub const PENDING_RETENTION_MS: u64 = 700;

/// One step applied to both the model and the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `try_claim` through the bus-core semantics.
    TryClaim { key: u8, ttl: u16 },
    /// `mark_done`.
    MarkDone { key: u8 },
    /// `release`.
    Release { key: u8 },
    /// `claim` or `claim_with_fingerprint`; an acquired lease goes to the
    /// next lease slot.
    Claim {
        key: u8,
        ttl: u16,
        fingerprint: Option<u8>,
    },
    /// `complete` (no result) or `complete_with` (a result of that length).
    Complete { slot: u8, result: Option<u8> },
    /// `abandon`.
    Abandon { slot: u8 },
    /// `extend`.
    Extend { slot: u8, ttl: u16 },
    /// Move the clock forward.
    Advance { ms: u16 },
    /// `sweep_expired`.
    Sweep,
    /// `list` of pending records, whole and a page at a time, against a
    /// full listing filtered by state and against the model.
    List,
    /// `close`, then open again.
    CloseReopen,
    /// Drop every handle without `close`, then open again.
    DropReopen,
    /// A failed fdatasync (feature `fault-injection`): with `now`, a flush
    /// runs at once and latches the store; without, the next flush (a
    /// write's group commit, `close`, a drop) fails.
    FailSync { now: bool },
}

impl Op {
    /// Whether the op may write: refused once the store is latched.
    pub fn writes(&self) -> bool {
        !matches!(
            self,
            Op::Advance { .. } | Op::List | Op::CloseReopen | Op::DropReopen | Op::FailSync { .. }
        )
    }
}

impl Op {
    /// Decodes one op from raw bytes (the fuzzer's input), or `None` when the
    /// bytes run out.
    pub fn take(bytes: &mut &[u8]) -> Option<Op> {
        let mut next = || {
            let (&b, rest) = bytes.split_first()?;
            *bytes = rest;
            Some(b)
        };
        let tag = next()?;
        let a = next().unwrap_or(0);
        let b = next().unwrap_or(0);
        let key = a % KEYS;
        let ttl = 1 + u16::from(b) * 4;
        Some(match tag % 16 {
            0 | 1 => Op::TryClaim { key, ttl },
            2 => Op::MarkDone { key },
            3 => Op::Release { key },
            4 | 5 => Op::Claim {
                key,
                ttl,
                fingerprint: None,
            },
            6 => Op::Claim {
                key,
                ttl,
                fingerprint: Some(b % 3),
            },
            7 => Op::Complete {
                slot: a,
                result: None,
            },
            8 => Op::Complete {
                slot: a,
                result: Some(b),
            },
            9 => Op::Abandon { slot: a },
            10 => Op::Extend { slot: a, ttl },
            11 | 12 => Op::Advance {
                ms: u16::from(b) * 8,
            },
            13 => Op::Sweep,
            // Reopening costs milliseconds; keep it a rare input so that
            // the fuzzer spends its time on deep sequences.
            // A listing reads through the blocking pool several times:
            // rarer than a sweep.
            // A sync failure latches the store for the rest of the input:
            // rarer still.
            14 | 15 if a % 32 == 2 => Op::FailSync { now: b % 2 == 0 },
            14 | 15 if a != 0xA5 && a % 8 != 1 => Op::Sweep,
            14 | 15 if a != 0xA5 => Op::List,
            14 => Op::CloseReopen,
            _ => Op::DropReopen,
        })
    }
}

/// What the model keeps for a key. `claim` numbers the claims of a run in
/// order (1, 2, …; 0 for a done record written without a claim); the driver
/// maps it to the store's fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MRecord {
    pending: bool,
    expires_at: u64,
    claim: usize,
    attempts: u32,
    ttl_ms: u64,
    fingerprint: Option<u8>,
    result: Option<Vec<u8>>,
}

/// What the model expects a lease operation to do.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LeaseOutcome {
    Ok,
    Lost(MHolder),
    DifferentResult,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum MHolder {
    Nothing,
    Claim {
        claim: usize,
        expires_at: u64,
        attempts: u32,
    },
    Done {
        claim: usize,
        expires_at: u64,
    },
}

#[derive(Debug, Clone)]
struct MLease {
    key: u8,
    claim: usize,
    expires_at: u64,
}

#[derive(Debug, Default, Clone)]
struct Model {
    now: u64,
    records: BTreeMap<u8, MRecord>,
    claims: usize,
}

impl Model {
    fn live(&self, key: u8) -> Option<&MRecord> {
        self.records.get(&key).filter(|r| self.now < r.expires_at)
    }

    /// docs/semantics.md, "Semantics": a record counts while it is live; an expired claim counts
    /// for the pending retention after its expiry. Anything else is as if
    /// absent, swept or not.
    fn remembered(&self, key: u8) -> Option<&MRecord> {
        self.records.get(&key).filter(|r| {
            let until = if r.pending {
                r.expires_at + PENDING_RETENTION_MS
            } else {
                r.expires_at
            };
            self.now < until
        })
    }

    fn claim(&mut self, key: u8, ttl: u64, fingerprint: Option<u8>) -> ClaimResult {
        if let Some(r) = self.live(key) {
            if let (Some(given), Some(stored)) = (fingerprint, r.fingerprint)
                && given != stored
            {
                return ClaimResult::Conflict { done: !r.pending };
            }
            return if r.pending {
                ClaimResult::InProgress {
                    expires_at: r.expires_at,
                    attempts: r.attempts,
                }
            } else {
                ClaimResult::Done {
                    result: r.result.clone(),
                }
            };
        }
        let attempts = match self.remembered(key) {
            Some(r) => r.attempts + 1, // a remembered, expired claim
            None => 1,
        };
        self.claims += 1;
        let record = MRecord {
            pending: true,
            expires_at: self.now + ttl,
            claim: self.claims,
            attempts,
            ttl_ms: ttl,
            fingerprint,
            result: None,
        };
        self.records.insert(key, record);
        // The driver fills in the real lease; only the outcome kind matters here.
        ClaimResult::InProgress {
            expires_at: u64::MAX,
            attempts,
        }
    }

    fn done_from(&self, r: &MRecord, result: Option<Vec<u8>>) -> MRecord {
        MRecord {
            pending: false,
            expires_at: self.now + r.ttl_ms,
            result,
            ..r.clone()
        }
    }

    fn mark_done(&mut self, key: u8) {
        let new = match self.remembered(key) {
            Some(r) if r.pending => self.done_from(r, None),
            Some(_) => return, // live done
            None => MRecord {
                pending: false,
                expires_at: self.now + DEFAULT_TTL_MS,
                claim: 0,
                attempts: 0,
                ttl_ms: DEFAULT_TTL_MS,
                fingerprint: None,
                result: None,
            },
        };
        self.records.insert(key, new);
    }

    fn release(&mut self, key: u8) {
        if self.remembered(key).is_some_and(|r| r.pending) {
            self.records.remove(&key);
        }
    }

    fn holder(&self, key: u8) -> MHolder {
        match self.remembered(key) {
            None => MHolder::Nothing,
            Some(r) if r.pending => MHolder::Claim {
                claim: r.claim,
                expires_at: r.expires_at,
                attempts: r.attempts,
            },
            Some(r) => MHolder::Done {
                claim: r.claim,
                expires_at: r.expires_at,
            },
        }
    }

    fn holds(&self, lease: &MLease) -> bool {
        self.remembered(lease.key)
            .is_some_and(|r| r.pending && r.claim == lease.claim)
    }

    fn complete(&mut self, lease: &MLease, result: Option<Vec<u8>>) -> LeaseOutcome {
        if let Some(r) = self.live(lease.key)
            && !r.pending
            && r.claim == lease.claim
        {
            // Completing again is fine; with another result it is refused.
            return match result {
                Some(given) if r.result.as_ref() != Some(&given) => LeaseOutcome::DifferentResult,
                _ => LeaseOutcome::Ok,
            };
        }
        if !self.holds(lease) {
            return LeaseOutcome::Lost(self.holder(lease.key));
        }
        let done = self.done_from(&self.records[&lease.key], result);
        self.records.insert(lease.key, done);
        LeaseOutcome::Ok
    }

    fn abandon(&mut self, lease: &MLease) -> LeaseOutcome {
        if !self.holds(lease) {
            return LeaseOutcome::Lost(self.holder(lease.key));
        }
        self.records.remove(&lease.key);
        LeaseOutcome::Ok
    }

    fn extend(&mut self, lease: &mut MLease, ttl: u64) -> LeaseOutcome {
        if !self.holds(lease) {
            return LeaseOutcome::Lost(self.holder(lease.key));
        }
        let expires_at = self.now + ttl;
        if let Some(r) = self.records.get_mut(&lease.key) {
            r.expires_at = expires_at;
        }
        lease.expires_at = expires_at;
        LeaseOutcome::Ok
    }

    /// The sweeper, from the rule: it removes what is no longer remembered.
    fn sweep(&mut self) -> u64 {
        let forgotten: Vec<u8> = (0..KEYS)
            .filter(|k| self.records.contains_key(k) && self.remembered(*k).is_none())
            .collect();
        for key in &forgotten {
            self.records.remove(key);
        }
        forgotten.len() as u64
    }
}

pub fn key_id(key: u8) -> MessageId {
    MessageId::from_uuid(uuid::Uuid::from_u128(u128::from(key) + 1))
}

/// The engine a driver runs on: every op goes through [`Store`]'s own
/// methods, whatever the engine; the sled-only ones (sweep, list, reopen,
/// sync failures) need the sled store.
pub trait Under: Engine {
    /// The store as a sled store, if it is one.
    fn sled(store: &Store<Self>) -> Option<&SledIdempotencyStore>;
    /// A reopened sled store as this engine's, if it is one.
    fn reopened(store: SledIdempotencyStore) -> Option<Store<Self>>;
}

impl Under for SledEngine {
    fn sled(store: &Store<Self>) -> Option<&SledIdempotencyStore> {
        Some(store)
    }
    fn reopened(store: SledIdempotencyStore) -> Option<Store<Self>> {
        Some(store)
    }
}

#[cfg(feature = "redis")]
impl Under for sled_idempotency::redis::RedisEngine {
    fn sled(_: &Store<Self>) -> Option<&SledIdempotencyStore> {
        None
    }
    fn reopened(_: SledIdempotencyStore) -> Option<Store<Self>> {
        None
    }
}

/// Applies ops to a store (the sled engine unless said otherwise) and to
/// the model, comparing after every step.
pub struct Driver<E: Under = SledEngine> {
    dir: std::path::PathBuf,
    durability: Durability,
    clock: ManualClock,
    store: Option<Store<E>>,
    model: Model,
    /// Store token of model claim `n` at index `n` (index 0: no claim).
    tokens: Vec<u64>,
    /// Highest token of earlier sequences on this store: every new token
    /// must exceed it.
    floor: u64,
    leases: Vec<(Lease, MLease)>,
    /// What the store answered to each op but sweeps, tokens written as
    /// claim numbers: the record of outcomes that sweeping must not change.
    outcomes: Vec<String>,
    /// Injected sync failures still waiting for a flush to meet them.
    armed: usize,
    /// The store has met a sync failure: it must refuse every write until
    /// reopened.
    latched: bool,
}

/// Why a step stopped.
enum StepError {
    /// The store refused with `Error::PreviousIo`.
    Latched,
    /// Store and model disagree.
    Diverged(String),
}

impl From<String> for StepError {
    fn from(e: String) -> Self {
        StepError::Diverged(e)
    }
}

/// Maps a store error: `PreviousIo` to [`StepError::Latched`], any other
/// to a divergence naming `what`.
fn failed(what: &'static str) -> impl FnOnce(Error) -> StepError {
    move |e| match e {
        Error::PreviousIo { .. } => StepError::Latched,
        e => StepError::Diverged(format!("{what}: {e}")),
    }
}

impl Driver<SledEngine> {
    pub async fn new(dir: &std::path::Path, durability: Durability) -> Result<Driver, String> {
        let mut driver = Driver::fresh(dir.join("db"), durability, ManualClock::new(T0), None);
        driver.reopen().await?;
        Ok(driver)
    }
}

#[cfg(feature = "redis")]
impl Driver<sled_idempotency::redis::RedisEngine> {
    /// A driver on `store`, a Redis store opened with this module's
    /// retention and a clock at [`T0`] (`clock`), and with no record of
    /// the [`KEYS`] keys in its namespace.
    pub fn redis(store: sled_idempotency::RedisIdempotencyStore, clock: ManualClock) -> Self {
        let durability = store.durability();
        Driver::fresh(std::path::PathBuf::new(), durability, clock, Some(store))
    }
}

impl<E: Under> Driver<E> {
    /// A driver with an empty model at [`T0`].
    fn fresh(
        dir: std::path::PathBuf,
        durability: Durability,
        clock: ManualClock,
        store: Option<Store<E>>,
    ) -> Self {
        Driver {
            dir,
            durability,
            clock,
            store,
            model: Model {
                now: T0,
                ..Model::default()
            },
            tokens: vec![0],
            floor: 0,
            leases: Vec::new(),
            outcomes: Vec::new(),
            armed: 0,
            latched: false,
        }
    }

    async fn reopen(&mut self) -> Result<(), String> {
        if self.store.as_ref().is_some_and(|s| E::sled(s).is_none()) {
            return Err("reopening a Redis store is not a model op".to_owned());
        }
        let store = SledIdempotencyStore::builder(&self.dir)
            .clock(self.clock.clone())
            .durability(self.durability)
            .default_ttl(Duration::from_millis(DEFAULT_TTL_MS))
            .pending_retention(Duration::from_millis(PENDING_RETENTION_MS))
            .sweep_interval(Duration::from_secs(3600))
            .open()
            .await
            .map_err(|e| format!("reopen failed: {e}"))?;
        self.store = Some(E::reopened(store).ok_or("reopening is a sled op")?);
        self.armed = 0;
        self.latched = false;
        Ok(())
    }

    fn store(&self) -> Result<&Store<E>, String> {
        self.store
            .as_ref()
            .ok_or_else(|| "no open store".to_owned())
    }

    /// The store, for the ops only the sled engine has.
    fn sled(&self) -> Result<&SledIdempotencyStore, String> {
        E::sled(self.store()?).ok_or_else(|| "a sled-only op on the Redis engine".to_owned())
    }

    /// The lease in `slot` (modulo the number of leases), if any.
    fn slot(&self, slot: u8) -> Option<usize> {
        (!self.leases.is_empty()).then(|| usize::from(slot) % self.leases.len())
    }

    fn last_token(&self) -> u64 {
        self.tokens.last().copied().unwrap_or(0).max(self.floor)
    }

    fn record_claim(&mut self, lease: &Lease) -> Result<(), String> {
        let last = self.last_token();
        if lease.token() <= last {
            return Err(format!(
                "token {} does not exceed the previous {last}",
                lease.token()
            ));
        }
        self.tokens.push(lease.token());
        Ok(())
    }

    fn holder_matches(&self, store: &Holder, model: &MHolder) -> bool {
        let token = |claim: &usize| self.tokens.get(*claim).copied();
        match (store, model) {
            (Holder::Nothing, MHolder::Nothing) => true,
            (
                Holder::Claim {
                    token: t,
                    expires_at: e,
                    attempts: a,
                },
                MHolder::Claim {
                    claim,
                    expires_at,
                    attempts,
                },
            ) => Some(*t) == token(claim) && e == expires_at && a == attempts,
            (
                Holder::Done {
                    token: t,
                    expires_at: e,
                },
                MHolder::Done { claim, expires_at },
            ) => Some(*t) == token(claim) && e == expires_at,
            _ => false,
        }
    }

    /// `holder` with its token written as the claim number.
    fn holder_outcome(&self, holder: &Holder) -> String {
        let claim = |token: &u64| self.tokens.iter().position(|t| t == token);
        match holder {
            Holder::Nothing => "nothing".to_owned(),
            Holder::Claim {
                token,
                expires_at,
                attempts,
            } => format!(
                "claim {:?} until {expires_at} attempt {attempts}",
                claim(token)
            ),
            Holder::Done { token, expires_at } => {
                format!("done by {:?} until {expires_at}", claim(token))
            }
        }
    }

    fn lease_result(
        &mut self,
        what: &str,
        store: Result<(), Error>,
        model: LeaseOutcome,
    ) -> Result<(), StepError> {
        if let Err(Error::PreviousIo { .. }) = store {
            return Err(StepError::Latched);
        }
        let outcome = match &store {
            Ok(()) => "ok".to_owned(),
            Err(Error::LeaseLost { holds, .. }) => format!("lost: {}", self.holder_outcome(holds)),
            Err(Error::DifferentResult { .. }) => "different result".to_owned(),
            Err(e) => e.to_string(),
        };
        self.outcomes.push(format!("{what}: {outcome}"));
        match (store, model) {
            (Ok(()), LeaseOutcome::Ok) => Ok(()),
            (Err(Error::DifferentResult { .. }), LeaseOutcome::DifferentResult) => Ok(()),
            (Err(Error::LeaseLost { holds, .. }), LeaseOutcome::Lost(expected))
                if self.holder_matches(&holds, &expected) =>
            {
                Ok(())
            }
            (store, model) => Err(format!("{what}: store {store:?}, model {model:?}").into()),
        }
    }

    /// Applies one op to both sides and compares every key afterwards.
    ///
    /// Sync failures: once latched, every op that may write must be
    /// refused with `PreviousIo` and change nothing; reads go on. While an
    /// injected failure waits, the op whose flush meets it must be refused,
    /// and its key is then either as before the op or as after it (its
    /// fate is unknown, docs/durability.md, "After an I/O failure"); an op that meets it and answers `Ok`
    /// acknowledged a write whose flush failed.
    pub async fn step(&mut self, op: &Op) -> Result<(), String> {
        let before = (self.model.clone(), self.tokens.len(), self.outcomes.len());
        // A lease op without any lease does not reach the store.
        let lease_op = matches!(
            op,
            Op::Complete { .. } | Op::Abandon { .. } | Op::Extend { .. }
        );
        let writes = op.writes() && !(lease_op && self.leases.is_empty());
        let applied = self.apply(op).await;
        let what = format!("{op:?}")
            .split([' ', '{'])
            .next()
            .unwrap_or("op")
            .to_owned();
        match applied {
            Ok(()) if self.latched && writes => {
                return Err(format!("{what}: acknowledged by a latched store"));
            }
            // In the modes that flush per write, a write acknowledged while
            // a failure waits must not have met it, and cannot have
            // skipped its flush. (`Periodic` acknowledges before flushing.)
            Ok(())
                if self.armed > 0
                    && writes
                    && !matches!(self.durability, Durability::Periodic(_)) =>
            {
                if self.failures_waiting().await? < self.armed {
                    return Err(format!(
                        "{what}: acknowledged though its flush met the injected failure"
                    ));
                }
                // A sweep removes only forgotten records and need not wait
                // for a flush: a crash that undoes it brings back records
                // that every operation treats as absent.
                let changed =
                    self.model.records != before.0.records || self.model.claims != before.0.claims;
                if changed && *op != Op::Sweep {
                    return Err(format!("{what}: a write acknowledged without a flush"));
                }
            }
            Ok(()) => {}
            Err(StepError::Diverged(e)) => return Err(e),
            Err(StepError::Latched) if self.latched => {
                // Refused, as it must be: nothing changed.
                self.model = before.0;
                self.tokens.truncate(before.1);
                self.outcomes.truncate(before.2);
                if *op != Op::Sweep {
                    self.outcomes.push(format!("{what}: refused"));
                }
            }
            Err(StepError::Latched) if self.armed > 0 => {
                self.latched = true;
                self.model = before.0;
                self.tokens.truncate(before.1);
                self.outcomes.truncate(before.2);
                self.old_or_new(op).await?;
                if *op != Op::Sweep {
                    self.outcomes.push(format!("{what}: its flush failed"));
                }
            }
            Err(StepError::Latched) => {
                return Err(format!("{what}: PreviousIo with no sync failure injected"));
            }
        }
        self.compare().await
    }

    #[cfg(feature = "fault-injection")]
    async fn failures_waiting(&self) -> Result<usize, String> {
        self.sled()?
            .sync_failures_waiting()
            .await
            .map_err(|e| e.to_string())
    }

    #[cfg(not(feature = "fault-injection"))]
    async fn failures_waiting(&self) -> Result<usize, String> {
        Ok(self.armed)
    }

    /// After `op` was refused because its flush failed: the store shows
    /// the model as it was before `op` or as `op` would have left it; the
    /// model takes whichever it is.
    async fn old_or_new(&mut self, op: &Op) -> Result<(), String> {
        let old = (self.model.clone(), self.tokens.len());
        let slot = |slot: u8| self.slot(slot).map(|i| self.leases[i].1.clone());
        let bytes = |result: Option<u8>| result.map(|n| vec![n; usize::from(n)]);
        let claimed = match op.clone() {
            Op::TryClaim { key, ttl } => Some((
                key % KEYS,
                self.model.claim(key % KEYS, u64::from(ttl), None),
            )),
            Op::Claim {
                key,
                ttl,
                fingerprint,
            } => Some((
                key % KEYS,
                self.model.claim(key % KEYS, u64::from(ttl), fingerprint),
            )),
            Op::MarkDone { key } => {
                self.model.mark_done(key % KEYS);
                None
            }
            Op::Release { key } => {
                self.model.release(key % KEYS);
                None
            }
            Op::Complete { slot: s, result } => {
                if let Some(lease) = slot(s) {
                    self.model.complete(&lease, bytes(result));
                }
                None
            }
            Op::Abandon { slot: s } => {
                if let Some(lease) = slot(s) {
                    self.model.abandon(&lease);
                }
                None
            }
            Op::Extend { slot: s, ttl } => {
                if let Some(mut lease) = slot(s) {
                    self.model.extend(&mut lease, u64::from(ttl));
                }
                None
            }
            Op::Sweep => {
                self.model.sweep();
                None
            }
            _ => None,
        };
        if let Some((
            key,
            ClaimResult::InProgress {
                expires_at: u64::MAX,
                ..
            },
        )) = claimed
        {
            // A new claim: its token is whatever the store drew.
            let record = self
                .store()?
                .get_record(&key_id(key))
                .await
                .map_err(|e| e.to_string())?;
            if let Some(r) =
                record.filter(|r| r.state == State::Pending && r.token > self.last_token())
            {
                self.tokens.push(r.token);
            }
        }
        if self.compare().await.is_ok() {
            return Ok(());
        }
        self.model = old.0;
        self.tokens.truncate(old.1);
        self.compare().await.map_err(|e| {
            format!("after a failed flush, neither as before nor as after the op: {e}")
        })
    }

    /// Applies one op to the store and the model.
    async fn apply(&mut self, op: &Op) -> Result<(), StepError> {
        let key_of = |k: u8| key_id(k % KEYS);
        match op.clone() {
            Op::TryClaim { key, ttl } => {
                let store = self
                    .store()?
                    .try_claim(&key_of(key), Duration::from_millis(u64::from(ttl)))
                    .await;
                let store = store.map_err(failed("try_claim"))?;
                let expected = match self.model.claim(key % KEYS, u64::from(ttl), None) {
                    ClaimResult::Done { .. } => ClaimOutcome::AlreadyDone,
                    ClaimResult::InProgress {
                        expires_at: u64::MAX,
                        ..
                    } => ClaimOutcome::Claimed,
                    _ => ClaimOutcome::AlreadyPending,
                };
                if store != expected {
                    return Err(format!("try_claim: store {store:?}, model {expected:?}").into());
                }
                self.outcomes.push(format!("try_claim: {store:?}"));
                if store == ClaimOutcome::Claimed {
                    let record = self
                        .store()?
                        .get_record(&key_of(key))
                        .await
                        .map_err(failed("get_record"))?;
                    let token = record.map(|r| r.token).unwrap_or(0);
                    let last = self.last_token();
                    if token <= last {
                        return Err(format!("token {token} does not exceed {last}").into());
                    }
                    self.tokens.push(token);
                }
            }
            Op::MarkDone { key } => {
                self.store()?
                    .mark_done(&key_of(key))
                    .await
                    .map_err(failed("mark_done"))?;
                self.model.mark_done(key % KEYS);
                self.outcomes.push("mark_done: ok".to_owned());
            }
            Op::Release { key } => {
                self.store()?
                    .release(&key_of(key))
                    .await
                    .map_err(failed("release"))?;
                self.model.release(key % KEYS);
                self.outcomes.push("release: ok".to_owned());
            }
            Op::Claim {
                key,
                ttl,
                fingerprint,
            } => {
                let ttl_d = Duration::from_millis(u64::from(ttl));
                let store = match fingerprint {
                    Some(f) => {
                        self.store()?
                            .claim_with_fingerprint(&key_of(key), ttl_d, &[f])
                            .await
                    }
                    None => self.store()?.claim(&key_of(key), ttl_d).await,
                }
                .map_err(failed("claim"))?;
                let expected = self.model.claim(key % KEYS, u64::from(ttl), fingerprint);
                match (&store, &expected) {
                    (
                        ClaimResult::Acquired(lease),
                        ClaimResult::InProgress {
                            expires_at: u64::MAX,
                            attempts,
                        },
                    ) => {
                        if lease.attempt() != *attempts
                            || lease.expires_at() != self.model.now + u64::from(ttl)
                        {
                            return Err(format!(
                                "claim: lease {lease:?}, model attempts {attempts}"
                            )
                            .into());
                        }
                        self.record_claim(lease)?;
                        self.outcomes.push(format!(
                            "claim: acquired #{} attempt {} until {}",
                            self.model.claims,
                            lease.attempt(),
                            lease.expires_at()
                        ));
                        let mlease = MLease {
                            key: key % KEYS,
                            claim: self.model.claims,
                            expires_at: lease.expires_at(),
                        };
                        self.leases.push((lease.clone(), mlease));
                    }
                    (store, expected) if store == expected => {
                        self.outcomes.push(format!("claim: {store:?}"));
                    }
                    (store, expected) => {
                        return Err(format!("claim: store {store:?}, model {expected:?}").into());
                    }
                }
            }
            Op::Complete { slot, result } => {
                let Some(i) = self.slot(slot) else {
                    return Ok(());
                };
                let (lease, mlease) = self.leases[i].clone();
                let bytes = result.map(|n| vec![n; usize::from(n)]);
                let store = match &bytes {
                    Some(b) => self.store()?.complete_with(&lease, b).await,
                    None => self.store()?.complete(&lease).await,
                };
                let model = self.model.complete(&mlease, bytes);
                self.lease_result("complete", store, model)?;
            }
            Op::Abandon { slot } => {
                let Some(i) = self.slot(slot) else {
                    return Ok(());
                };
                let (lease, mlease) = self.leases[i].clone();
                let store = self.store()?.abandon(&lease).await;
                let model = self.model.abandon(&mlease);
                self.lease_result("abandon", store, model)?;
            }
            Op::Extend { slot, ttl } => {
                let Some(i) = self.slot(slot) else {
                    return Ok(());
                };
                let (lease, mut mlease) = self.leases[i].clone();
                let store = self
                    .store()?
                    .extend(&lease, Duration::from_millis(u64::from(ttl)))
                    .await;
                let model = self.model.extend(&mut mlease, u64::from(ttl));
                let (store, new_lease) = match store {
                    Ok(l) => (Ok(()), Some(l)),
                    Err(e) => (Err(e), None),
                };
                self.lease_result("extend", store, model)?;
                if let Some(new_lease) = new_lease {
                    if new_lease.expires_at() != mlease.expires_at {
                        return Err(format!("extend: lease {new_lease:?}, model {mlease:?}").into());
                    }
                    self.leases[i] = (new_lease, mlease);
                }
            }
            Op::Advance { ms } => {
                self.clock.advance(Duration::from_millis(u64::from(ms)));
                self.model.now += u64::from(ms);
            }
            Op::Sweep => {
                let report = self
                    .sled()?
                    .sweep_expired()
                    .await
                    .map_err(failed("sweep"))?;
                let removed = self.model.sweep();
                if report.removed != removed || report.corrupt != 0 {
                    return Err(format!("sweep: store {report:?}, model removed {removed}").into());
                }
            }
            Op::List => {
                let store = self.sled()?;
                let list = |state, after: Option<MessageId>, limit| async move {
                    store
                        .list(state, after.as_ref(), limit)
                        .await
                        .map_err(|e| format!("list: {e}"))
                };
                let pending = list(Some(State::Pending), None, usize::MAX).await?;
                let mut expected = list(None, None, usize::MAX).await?;
                expected.retain(|(_, r)| r.state == State::Pending);
                let mut paged = Vec::new();
                let mut after = None;
                while let Some(entry) = list(Some(State::Pending), after, 1).await?.pop() {
                    after = Some(entry.0.clone());
                    paged.push(entry);
                }
                let model: Vec<MessageId> = (0..KEYS)
                    .filter(|k| self.model.live(*k).is_some_and(|r| r.pending))
                    .map(key_id)
                    .collect();
                let keys: Vec<MessageId> = pending.iter().map(|(k, _)| k.clone()).collect();
                if pending != expected || paged != expected || keys != model {
                    return Err(format!(
                        "list: pending {pending:?}, paged {paged:?}, filtered {expected:?}, model {model:?}"
                    ).into());
                }
                self.outcomes.push(format!("list: {} pending", keys.len()));
            }
            Op::CloseReopen => {
                self.outcomes.push("reopen".to_owned());
                // The final flush meets a waiting injected failure.
                let failing = self.latched || self.armed > 0;
                match self.store()?.close().await {
                    Ok(()) if !failing => {}
                    Err(Error::PreviousIo { .. }) if failing => {}
                    closed => {
                        return Err(format!(
                            "close: {closed:?} (latched {}, failure waiting {})",
                            self.latched, self.armed
                        )
                        .into());
                    }
                }
                self.reopen().await?;
            }
            Op::DropReopen => {
                self.outcomes.push("reopen".to_owned());
                self.store = None;
                self.reopen().await?;
            }
            Op::FailSync { now } => {
                self.outcomes
                    .push(format!("sync failure injected (now {now})"));
                self.inject_sync_failure(now).await?;
            }
        }
        Ok(())
    }

    #[cfg(feature = "fault-injection")]
    async fn inject_sync_failure(&mut self, now: bool) -> Result<(), String> {
        self.sled()?
            .inject_sync_failure(now)
            .await
            .map_err(|e| format!("injecting a sync failure: {e}"))?;
        if now {
            self.latched = true;
        } else {
            self.armed += 1;
        }
        Ok(())
    }

    #[cfg(not(feature = "fault-injection"))]
    async fn inject_sync_failure(&mut self, _now: bool) -> Result<(), String> {
        Err("Op::FailSync needs the fault-injection feature".to_owned())
    }

    /// Every key: the store's record equals the model's.
    async fn compare(&self) -> Result<(), String> {
        for key in 0..KEYS {
            let stored: Option<Record> = self
                .store()?
                .get_record(&key_id(key))
                .await
                .map_err(|e| format!("get_record: {e}"))?;
            let expected = self.model.records.get(&key);
            let same = match (&stored, expected) {
                (None, None) => true,
                (Some(s), Some(m)) => {
                    s.state
                        == if m.pending {
                            State::Pending
                        } else {
                            State::Done
                        }
                        && s.expires_at == m.expires_at
                        && Some(s.token) == self.tokens.get(m.claim).copied()
                        && s.attempts == m.attempts
                        && s.ttl_ms == m.ttl_ms
                        && s.fingerprint == m.fingerprint.map(|f| vec![f])
                        && s.result == m.result
                }
                _ => false,
            };
            if !same {
                return Err(format!("key {key}: store {stored:?}, model {expected:?}"));
            }
        }
        Ok(())
    }

    /// Starts a new sequence on the same store, as if on a fresh one: the
    /// clock moves a day on (past every ttl and retention the ops can set),
    /// a sweep removes every record (checked against the model), and the
    /// model, the leases and the outcomes start empty. Tokens keep
    /// increasing across sequences.
    pub async fn next_sequence(&mut self) -> Result<(), String> {
        if self.latched {
            self.step(&Op::DropReopen).await?;
        }
        self.step(&Op::Advance { ms: 0 }).await?;
        self.clock.advance(Duration::from_secs(86_400));
        self.model.now += 86_400_000;
        self.step(&Op::Sweep).await?;
        if !self.model.records.is_empty() {
            return Err(format!(
                "records left after a day: {:?}",
                self.model.records
            ));
        }
        self.floor = self.last_token();
        self.tokens = vec![0];
        self.model.claims = 0;
        self.leases.clear();
        self.outcomes.clear();
        Ok(())
    }

    /// Applies every op, comparing after each, and keeps the store open.
    pub async fn steps(&mut self, ops: &[Op]) -> Result<(), String> {
        for (i, op) in ops.iter().enumerate() {
            self.step(op)
                .await
                .map_err(|e| format!("step {i} {op:?}: {e}"))?;
        }
        Ok(())
    }

    /// Applies every op, then closes the store; returns the outcomes.
    pub async fn run(mut self, ops: &[Op]) -> Result<Vec<String>, String> {
        for (i, op) in ops.iter().enumerate() {
            self.step(op)
                .await
                .map_err(|e| format!("step {i} {op:?}: {e}"))?;
        }
        let failing = self.latched || self.armed > 0;
        match self.store()?.close().await {
            Ok(()) if !failing => Ok(self.outcomes),
            Err(Error::PreviousIo { .. }) if failing => Ok(self.outcomes),
            closed => Err(format!("final close: {closed:?}")),
        }
    }
}

/// A temporary directory, in memory-backed `/dev/shm` where there is one.
pub fn scratch() -> Result<tempfile::TempDir, String> {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .map_err(|e| e.to_string())
}

/// Runs `ops` on a fresh store and the model, comparing after every step,
/// and returns the store's outcomes.
pub async fn check(ops: &[Op], durability: Durability) -> Result<Vec<String>, String> {
    let dir = scratch()?;
    Driver::new(dir.path(), durability).await?.run(ops).await
}

/// The first outcome where two drivers that ran the same ops (one with
/// sweeps in between) disagree.
pub fn same_outcomes<E: Under>(without: &Driver<E>, with: &Driver<E>) -> Result<(), String> {
    let (a, b) = (&without.outcomes, &with.outcomes);
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => Err(format!(
            "outcome {i}: without sweeps {:?}, with a sweep before every op {:?}",
            a[i], b[i]
        )),
        None if a.len() != b.len() => Err("outcome counts differ".to_owned()),
        None => Ok(()),
    }
}

/// docs/semantics.md, "Semantics": no outcome depends on when the sweeper runs. Runs `ops`
/// without any sweep and again with a sweep before every op and at the
/// end, each checked against the model, and requires the same outcomes.
pub async fn check_sweep_independence(ops: &[Op], durability: Durability) -> Result<(), String> {
    let unswept: Vec<Op> = ops
        .iter()
        .filter(|op| **op != Op::Sweep)
        .map(|op| match op {
            // A sweep's own flush would meet a waiting failure in one run
            // only: in modes that flush per write, fail at once.
            Op::FailSync { .. } if !matches!(durability, Durability::Periodic(_)) => {
                Op::FailSync { now: true }
            }
            op => op.clone(),
        })
        .collect();
    let swept: Vec<Op> = unswept
        .iter()
        .flat_map(|op| [Op::Sweep, op.clone()])
        .chain([Op::Sweep])
        .collect();
    let dirs = (scratch()?, scratch()?);
    let mut without = Driver::new(dirs.0.path(), durability).await?;
    let mut with = Driver::new(dirs.1.path(), durability).await?;
    without.steps(&unswept).await?;
    with.steps(&swept)
        .await
        .map_err(|e| format!("with sweeps: {e}"))?;
    same_outcomes(&without, &with)?;
    for driver in [without, with] {
        driver.run(&[]).await?; // closes the store
    }
    Ok(())
}
