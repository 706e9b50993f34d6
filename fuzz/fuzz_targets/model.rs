//! Feeds arbitrary operation sequences to the store and to the in-memory
//! model of `tests/model/mod.rs`, comparing after every step, and checks
//! that no outcome depends on when the sweeper runs: the input's sweeps run
//! on one store only, the rest of the sequence on both, and both stores
//! must answer alike. Injected sync failures (`Op::FailSync`, through the
//! store's `fault-injection` feature) latch the store: every later write
//! must be refused until a reopen, and `close` must report the failure.
//! The stores run `Periodic` (acknowledged before any flush), so a write
//! whose own flush fails is not reached here: `tests/model_based.rs` covers
//! it under `Flush` and `Sync`. Any divergence aborts with a description of the first differing step.
//!
//! Speed: the two stores live for many inputs, not one; each input starts a
//! new sequence on them (the clock moves a day on and a sweep empties them,
//! checked against the model; a latched store is reopened). Reopening stays
//! one of the ops, as a rare input: sled's open costs milliseconds, so the
//! inputs that reopen set the rate.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/model/mod.rs"]
mod model;

use model::{Driver, Op};

struct Stores {
    runtime: tokio::runtime::Runtime,
    unswept: Driver,
    swept: Driver,
    inputs: u32,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// Inputs run on one pair of stores before fresh ones replace them: sled's
/// log only grows, and a reopen replays it, so long-lived stores made the
/// rare reopen inputs ever slower (a corpus replay took 8.4 s with 500
/// inputs per store, 6.2 s with 100).
const INPUTS_PER_STORE: u32 = 100;

fn stores() -> Stores {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let dirs = (
        model::scratch().expect("a scratch directory"),
        model::scratch().expect("a scratch directory"),
    );
    let durability = model::PERIODIC;
    let (unswept, swept) = runtime.block_on(async {
        (
            Driver::new(dirs.0.path(), durability).await.expect("open"),
            Driver::new(dirs.1.path(), durability).await.expect("open"),
        )
    });
    Stores {
        runtime,
        unswept,
        swept,
        inputs: 0,
        _dirs: dirs,
    }
}

thread_local! {
    static STORES: RefCell<Option<Stores>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = data;
    let mut swept_ops = Vec::new();
    while swept_ops.len() < 64 {
        match Op::take(&mut bytes) {
            Some(op) => swept_ops.push(op),
            None => break,
        }
    }
    let ops: Vec<Op> = swept_ops
        .iter()
        .filter(|op| **op != Op::Sweep)
        .cloned()
        .collect();
    STORES.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_some_and(|s| s.inputs >= INPUTS_PER_STORE) {
            *cell = None;
        }
        let s = cell.get_or_insert_with(stores);
        s.inputs += 1;
        let result = s.runtime.block_on(async {
            s.unswept.next_sequence().await?;
            s.swept.next_sequence().await?;
            s.unswept.steps(&ops).await?;
            s.swept
                .steps(&swept_ops)
                .await
                .map_err(|e| format!("with sweeps: {e}"))?;
            model::same_outcomes(&s.unswept, &s.swept)
        });
        if let Err(divergence) = result {
            panic!("store and model diverge: {divergence}\nops: {ops:?}");
        }
    });
});
