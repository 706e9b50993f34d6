//! Leases and fencing: a worker whose lease expired and was re-claimed can
//! no longer complete, abandon or extend; the new holder can; the error says
//! what the record holds; `extend` keeps a long handler's claim; tokens
//! strictly increase across restarts.

mod common;

use std::time::Duration;

use common::{Fixture, TTL, TestResult, id};
use sled_idempotency::{
    ClaimResult, DEFAULT_PENDING_RETENTION, Error, Holder, Lease, SledIdempotencyStore, State,
};

async fn acquire(
    store: &SledIdempotencyStore,
    n: u128,
    ttl: Duration,
) -> Result<Lease, Box<dyn std::error::Error + Send + Sync>> {
    match store.claim(&id(n), ttl).await? {
        ClaimResult::Acquired(lease) => Ok(lease),
        other => Err(format!("expected a lease for key {n}, got {other:?}").into()),
    }
}

/// The token, holder and message of a `LeaseLost` error.
fn lost<T: std::fmt::Debug>(result: Result<T, Error>) -> Result<(u64, Holder, String), String> {
    match result {
        Err(e) => {
            let text = e.to_string();
            match e {
                Error::LeaseLost { token, holds, .. } => Ok((token, holds, text)),
                _ => Err(format!("expected LeaseLost, got {text}")),
            }
        }
        Ok(v) => Err(format!("expected LeaseLost, got Ok({v:?})")),
    }
}

#[tokio::test]
async fn a_taken_over_lease_can_no_longer_complete_abandon_or_extend() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    let old = acquire(&store, 1, TTL).await?;
    assert_eq!(
        (old.attempt(), old.key(), old.namespace()),
        (1, &id(1), "default")
    );
    fx.advance(TTL);
    let new = acquire(&store, 1, TTL).await?;
    assert!(new.token() > old.token());
    assert_eq!(new.attempt(), 2);

    let expected = Holder::Claim {
        token: new.token(),
        expires_at: new.expires_at(),
        attempts: 2,
    };
    let (token, holds, text) = lost(store.complete(&old).await)?;
    assert_eq!((token, holds), (old.token(), expected));
    assert!(
        text.contains(&format!("token {}", new.token())),
        "the message names the new holder: {text}"
    );
    assert_eq!(lost(store.abandon(&old).await)?.1, expected);
    assert_eq!(lost(store.extend(&old, TTL).await)?.1, expected);
    assert_eq!(lost(store.complete_with(&old, b"stale").await)?.1, expected);

    // None of that touched the new holder's claim.
    let record = store.get(&id(1)).await?.ok_or("record missing")?;
    assert_eq!((record.state, record.token), (State::Pending, new.token()));
    store.complete(&new).await?;
    assert_eq!(store.get(&id(1)).await?.map(|r| r.state), Some(State::Done));
    // Once done, the old lease learns that too.
    assert!(
        matches!(lost(store.complete(&old).await)?.1, Holder::Done { token, .. } if token == new.token())
    );
    Ok(())
}

#[tokio::test]
async fn an_expired_lease_nobody_reclaimed_is_still_held() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    let a = acquire(&store, 1, TTL).await?;
    let b = acquire(&store, 2, TTL).await?;
    let c = acquire(&store, 3, TTL).await?;
    fx.advance(TTL * 2);
    store.complete(&a).await?;
    store.abandon(&b).await?;
    let c2 = store.extend(&c, TTL).await?;
    assert_eq!(c2.expires_at(), fx.clock.now() + 30_000);
    assert_eq!(c2.token(), c.token());
    assert_eq!(store.get(&id(1)).await?.map(|r| r.state), Some(State::Done));
    assert!(store.get_record(&id(2)).await?.is_none());
    assert_eq!(
        store.get(&id(3)).await?.map(|r| r.expires_at),
        Some(c2.expires_at())
    );
    Ok(())
}

#[tokio::test]
async fn extend_keeps_a_long_handler_from_being_taken_over() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    let ttl = Duration::from_secs(10);
    let mut lease = acquire(&store, 1, ttl).await?;
    for _ in 0..5 {
        fx.advance(Duration::from_secs(8)); // the handler is still running
        lease = store.extend(&lease, ttl).await?;
        let rival = store.claim(&id(1), ttl).await?;
        assert_eq!(
            rival,
            ClaimResult::InProgress {
                expires_at: lease.expires_at(),
                attempts: 1
            }
        );
    }
    store.complete(&lease).await?;
    // Without the extension the same timeline would have lost the claim.
    let other = acquire(&store, 2, ttl).await?;
    fx.advance(Duration::from_secs(16));
    let thief = acquire(&store, 2, ttl).await?;
    assert!(lost(store.extend(&other, ttl).await).is_ok());
    store.complete(&thief).await?;
    Ok(())
}

#[tokio::test]
async fn completing_twice_is_fine_abandoning_a_completed_lease_is_not() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    let lease = acquire(&store, 1, TTL).await?;
    store.complete(&lease).await?;
    let done = store.get_record(&id(1)).await?;
    store.complete(&lease).await?;
    assert_eq!(store.get_record(&id(1)).await?, done, "no second write");
    assert!(matches!(
        lost(store.abandon(&lease).await)?.1,
        Holder::Done { .. }
    ));
    let held = acquire(&store, 2, TTL).await?;
    store.abandon(&held).await?;
    assert!(
        store.get_record(&id(2)).await?.is_none(),
        "abandon removes a held claim"
    );
    Ok(())
}

#[tokio::test]
async fn a_released_or_swept_lease_holds_nothing() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    let released = acquire(&store, 1, TTL).await?;
    store.release(&id(1)).await?;
    assert_eq!(lost(store.complete(&released).await)?.1, Holder::Nothing);

    let swept = acquire(&store, 2, TTL).await?;
    fx.advance(TTL + DEFAULT_PENDING_RETENTION);
    assert_eq!(store.sweep_expired().await?.removed, 1);
    assert_eq!(lost(store.extend(&swept, TTL).await)?.1, Holder::Nothing);
    Ok(())
}

#[tokio::test]
async fn a_lease_is_refused_on_another_namespace() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    let billing = store.namespace("billing").await?;
    let lease = acquire(&store, 1, TTL).await?;
    let err = billing.complete(&lease).await.expect_err("wrong namespace");
    assert!(matches!(err, Error::WrongNamespace { .. }), "{err}");
    store.complete(&lease).await?;
    Ok(())
}

#[tokio::test]
async fn extend_validates_its_ttl() -> TestResult {
    let fx = Fixture::new();
    let store = fx.open().await?;
    let lease = acquire(&store, 1, TTL).await?;
    assert!(matches!(
        store.extend(&lease, Duration::ZERO).await,
        Err(Error::TtlTooShort { .. })
    ));
    assert!(matches!(
        store.extend(&lease, Duration::MAX).await,
        Err(Error::TtlOverflow { .. })
    ));
    assert_eq!(
        store.get(&id(1)).await?.map(|r| r.expires_at),
        Some(lease.expires_at())
    );
    Ok(())
}

#[tokio::test]
async fn lease_tokens_strictly_increase_across_restarts() -> TestResult {
    let fx = Fixture::new();
    let mut last = 0;
    for restart in 0..4u128 {
        let store = fx.open().await?;
        let billing = store.namespace("billing").await?;
        for n in 0..10 {
            for handle in [&store, &billing] {
                let lease = acquire(handle, restart * 100 + n, TTL).await?;
                assert!(
                    lease.token() > last,
                    "restart {restart}: {} after {last}",
                    lease.token()
                );
                last = lease.token();
            }
        }
        if restart % 2 == 0 {
            store.close().await?;
        } else {
            drop((store, billing));
        }
    }
    Ok(())
}
