//! Metrics in Prometheus's text format: the application installs
//! `metrics-exporter-prometheus` as the recorder of the `metrics` facade
//! *before* it opens the store, and serves what the handle renders (here
//! printed once, after a few claims).
//!
//! ```text
//! cargo run --example prometheus --features metrics
//! ```

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use sled_idempotency::{Durability, MessageId, SledIdempotencyStore};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let metrics = PrometheusBuilder::new().install_recorder()?;
    let dir = tempfile::tempdir()?;
    let store = SledIdempotencyStore::builder(dir.path().join("db"))
        .durability(Durability::Sync)
        .open()
        .await?;
    let orders = store.namespace("orders").await?;
    for n in 0..100u128 {
        let id = MessageId::from_uuid(uuid::Uuid::from_u128(n % 80));
        orders.try_claim(&id, Duration::from_secs(60)).await?;
        orders.mark_done(&id).await?;
    }
    store.close().await?;
    // An application serves this at /metrics.
    print!("{}", metrics.render());
    Ok(())
}
