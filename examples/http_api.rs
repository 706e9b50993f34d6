//! A small payments API made safe to retry with `Idempotency-Key`: the
//! layer in front of `POST /payments` runs each payment once per key and
//! caller, and answers a retry with the first response.
//!
//! ```text
//! cargo run --example http_api --features http -- [DB-DIR] [ADDR]
//! ```
//!
//! (`./http-api-db` and `127.0.0.1:3000` by default.) The caller is the
//! bearer token of the `Authorization` header: two callers that pick the
//! same key get their own payments. `docs/http.md` shows `curl` retries
//! and what they get.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Extension, State};
use axum::http::{StatusCode, header, request::Parts};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sled_idempotency::http::IdempotencyLayer;
use sled_idempotency::{Lease, SledIdempotencyStore};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Deserialize)]
struct NewPayment {
    amount: u64,
    currency: String,
}

#[derive(Serialize)]
struct Payment {
    id: String,
    amount: u64,
    currency: String,
    status: &'static str,
    /// The fencing token of the claim that made it: the ledger below
    /// would refuse a write carrying a smaller one for the same key.
    fencing_token: u64,
}

/// Payments made by this process (the "ledger").
#[derive(Clone, Default)]
struct Ledger {
    next: Arc<AtomicU64>,
}

async fn create_payment(
    State(ledger): State<Ledger>,
    lease: Option<Extension<Lease>>,
    Json(new): Json<NewPayment>,
) -> impl IntoResponse {
    if new.amount == 0 {
        // A 4xx is this request's answer: cached and replayed like a 201.
        return (StatusCode::BAD_REQUEST, "amount must be positive").into_response();
    }
    let n = ledger.next.fetch_add(1, Ordering::SeqCst) + 1;
    let payment = Payment {
        id: format!("pay_{n:06}"),
        amount: new.amount,
        currency: new.currency,
        status: "succeeded",
        fencing_token: lease.map_or(0, |Extension(lease)| lease.token()),
    };
    let location = format!("/payments/{}", payment.id);
    (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(payment),
    )
        .into_response()
}

/// Who is asking: the bearer token. A real service would use what its
/// authentication layer put in the request's extensions.
fn caller(request: &Parts) -> Option<String> {
    let value = request.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(str::to_owned)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let db = args.next().unwrap_or_else(|| "./http-api-db".into());
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:3000".into());

    let store = SledIdempotencyStore::open(&db).await?;
    let layer = IdempotencyLayer::scoped(store.namespace("payments").await?, caller)
        // Payments without a key are refused: a client that retries
        // without one could pay twice.
        .require_key(true);
    let app = Router::new()
        .route("/payments", post(create_payment))
        .layer(layer)
        .with_state(Ledger::default());

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("payments API on http://{addr} (database {db}); Ctrl-C stops it");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    store.close().await?;
    Ok(())
}
