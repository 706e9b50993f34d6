//! Feeds arbitrary operation sequences to the store and to the in-memory
//! model of `tests/model/mod.rs`, comparing after every step; any
//! divergence aborts with a description of the first differing step.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sled_idempotency::Durability;

#[path = "../../tests/model/mod.rs"]
mod model;

use model::Op;

fuzz_target!(|data: &[u8]| {
    let mut bytes = data;
    let mut ops = Vec::new();
    while ops.len() < 64 {
        match Op::take(&mut bytes) {
            Some(op) => ops.push(op),
            None => break,
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let durability = Durability::Periodic(std::time::Duration::from_secs(3600));
    if let Err(divergence) = runtime.block_on(model::check(&ops, durability)) {
        panic!("store and model diverge: {divergence}\nops: {ops:?}");
    }
});
