//! Namespaces: isolated keyspaces over one database that share its sweeper,
//! its durability and its lifetime.

mod common;

use std::time::Duration;

use common::{Fixture, TTL, TestResult, id};
use sled_idempotency::{ClaimOutcome::*, Durability, Error, IdempotencyStore};

#[tokio::test]
async fn namespaces_are_isolated_keyspaces() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    let billing = store.namespace("billing").await?;
    let shipping = store.namespace("shipping").await?;
    assert_eq!(
        (store.namespace_name(), billing.namespace_name()),
        ("default", "billing")
    );

    assert_eq!(store.try_claim(&id(1), TTL).await?, Claimed);
    assert_eq!(
        billing.try_claim(&id(1), TTL).await?,
        Claimed,
        "same id, other namespace"
    );
    billing.mark_done(&id(1)).await?;
    assert_eq!(shipping.try_claim(&id(1), TTL).await?, Claimed);
    shipping.release(&id(1)).await?;

    assert_eq!(store.try_claim(&id(1), TTL).await?, AlreadyPending);
    assert_eq!(billing.try_claim(&id(1), TTL).await?, AlreadyDone);
    assert_eq!(shipping.try_claim(&id(1), TTL).await?, Claimed);
    assert_eq!(
        store.namespaces().await?,
        ["default", "billing", "shipping"]
    );
    // Asking again returns the same keyspace.
    assert_eq!(
        store
            .namespace("billing")
            .await?
            .try_claim(&id(1), TTL)
            .await?,
        AlreadyDone
    );
    assert_eq!(
        billing
            .namespace("default")
            .await?
            .try_claim(&id(1), TTL)
            .await?,
        AlreadyPending
    );
    Ok(())
}

#[tokio::test]
async fn a_namespace_handle_is_a_bus_core_store_too() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    let orders: std::sync::Arc<dyn IdempotencyStore> =
        std::sync::Arc::new(store.namespace("orders").await?);
    assert_eq!(orders.try_claim(&id(9), TTL).await?, Claimed);
    orders.mark_done(&id(9)).await?;
    assert_eq!(orders.try_claim(&id(9), TTL).await?, AlreadyDone);
    assert_eq!(store.try_claim(&id(9), TTL).await?, Claimed);
    Ok(())
}

#[tokio::test]
async fn one_sweep_covers_every_namespace() -> TestResult {
    let fx = Fixture::new();
    let store = fx
        .builder()
        .pending_retention(Duration::ZERO)
        .open()
        .await?;
    let a = store.namespace("a").await?;
    let b = store.namespace("b").await?;
    for (n, handle) in [&store, &a, &b].into_iter().enumerate() {
        handle.try_claim(&id(1), TTL).await?;
        handle.try_claim(&id(2), TTL * 10).await?;
        handle.try_claim(&id(3 + n as u128), TTL).await?;
    }
    fx.advance(TTL);
    let report = b.sweep_expired().await?;
    assert_eq!((report.examined, report.removed), (6, 6));
    for handle in [&store, &a, &b] {
        assert!(handle.get_record(&id(1)).await?.is_none());
        assert!(handle.get_record(&id(2)).await?.is_some());
        assert_eq!(
            handle.stats().await?.swept,
            2,
            "{}",
            handle.namespace_name()
        );
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn the_background_sweeper_covers_namespaces_created_after_open() -> TestResult {
    let fx = Fixture::new();
    let store = fx
        .builder()
        .durability(Durability::Periodic(Duration::from_secs(3600)))
        .sweep_interval(Duration::from_secs(10))
        .pending_retention(Duration::ZERO)
        .open()
        .await?;
    let late = store.namespace("late").await?;
    late.try_claim(&id(1), TTL).await?;
    fx.advance(TTL);
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(late.get_record(&id(1)).await?.is_none());
    Ok(())
}

#[tokio::test]
async fn namespaces_survive_restarts_and_share_durability() -> TestResult {
    for durability in [
        Durability::Sync,
        Durability::Periodic(Duration::from_secs(3600)),
    ] {
        let fx = Fixture::new();
        let store = fx.open_with(durability).await?;
        let billing = store.namespace("billing").await?;
        billing.try_claim(&id(1), TTL).await?;
        billing.mark_done(&id(1)).await?;
        billing.try_claim(&id(2), TTL).await?;
        drop((store, billing)); // no close: the flusher's final flush covers every namespace
        let store = fx.open_with(durability).await?;
        assert_eq!(
            store.namespaces().await?,
            ["default", "billing"],
            "found on disk at open"
        );
        let billing = store.namespace("billing").await?;
        assert_eq!(billing.try_claim(&id(1), TTL).await?, AlreadyDone);
        assert_eq!(billing.try_claim(&id(2), TTL).await?, AlreadyPending);
        assert_eq!(store.try_claim(&id(1), TTL).await?, Claimed);
        store.close().await?;
    }
    Ok(())
}

#[tokio::test]
async fn closing_any_handle_closes_them_all() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    let billing = store.namespace("billing").await?;
    billing.close().await?;
    assert!(matches!(
        store.try_claim(&id(1), TTL).await,
        Err(Error::Closed)
    ));
    assert!(matches!(
        billing.try_claim(&id(1), TTL).await,
        Err(Error::Closed)
    ));
    assert!(matches!(store.namespace("other").await, Err(Error::Closed)));
    fx.open().await?.close().await?;
    Ok(())
}

#[tokio::test]
async fn invalid_namespace_names_are_refused() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    let long = "n".repeat(65);
    for name in ["", "a/b", "with space", "ümlaut", long.as_str()] {
        let err = store.namespace(name).await.expect_err("invalid name");
        assert!(
            matches!(err, Error::InvalidNamespace { .. }),
            "{name:?}: {err}"
        );
    }
    assert_eq!(
        store.namespaces().await?,
        ["default"],
        "nothing was created"
    );
    store.namespace(&"n".repeat(64)).await?;
    store.namespace("Billing-2.v_1").await?;
    Ok(())
}
