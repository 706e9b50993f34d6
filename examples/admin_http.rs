//! A worker that serves the store's admin API over HTTP, with `axum`: the
//! worker holds the database (sled allows one owner per directory), so the
//! command-line tool cannot open it, but an operator can ask the worker.
//!
//! ```text
//! cargo run --example admin_http -- [DB-DIR] [ADDRESS]
//! curl localhost:8080/stats
//! curl 'localhost:8080/namespaces/default/records?state=pending&min_attempts=3'
//! curl -X POST localhost:8080/namespaces/default/records/<id>/release
//! ```
//!
//! Without a database directory it seeds a fresh one with a few records.
//! `tests/admin_http.rs` runs these routes.

use std::path::PathBuf;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use sled_idempotency::admin::ListFilter;
use sled_idempotency::{MessageId, Record, SledIdempotencyStore};

type Reply = Result<Json<Value>, (StatusCode, String)>;

fn failed(status: StatusCode) -> impl Fn(sled_idempotency::Error) -> (StatusCode, String) {
    move |e| (status, e.to_string())
}

fn parse_id(id: &str) -> Result<MessageId, (StatusCode, String)> {
    uuid::Uuid::parse_str(id)
        .map(MessageId::from_uuid)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("{id:?}: {e}")))
}

/// The handle of namespace `name`, which must exist.
async fn namespace(
    store: &SledIdempotencyStore,
    name: &str,
) -> Result<SledIdempotencyStore, (StatusCode, String)> {
    let names = store
        .namespaces()
        .await
        .map_err(failed(StatusCode::SERVICE_UNAVAILABLE))?;
    if !names.iter().any(|n| n == name) {
        return Err((StatusCode::NOT_FOUND, format!("no namespace {name:?}")));
    }
    store
        .namespace(name)
        .await
        .map_err(failed(StatusCode::BAD_REQUEST))
}

fn record(id: &MessageId, r: &Record) -> Value {
    json!({
        "id": id.to_string(),
        "state": format!("{:?}", r.state).to_lowercase(),
        "expires_at": r.expires_at,
        "token": r.token,
        "attempts": r.attempts,
    })
}

/// Every namespace's census.
async fn stats(State(store): State<SledIdempotencyStore>) -> Reply {
    let mut out = Vec::new();
    let names = store
        .namespaces()
        .await
        .map_err(failed(StatusCode::SERVICE_UNAVAILABLE))?;
    for name in names {
        let c = namespace(&store, &name)
            .await?
            .admin()
            .census()
            .await
            .map_err(failed(StatusCode::INTERNAL_SERVER_ERROR))?;
        out.push(json!({
            "namespace": c.namespace,
            "live_pending": c.live_pending,
            "live_done": c.live_done,
            "expired_not_swept": c.expired,
            "attempts": c.attempts,
        }));
    }
    Ok(Json(json!({ "namespaces": out })))
}

#[derive(Deserialize)]
struct ListQuery {
    state: Option<String>,
    min_attempts: Option<u32>,
    limit: Option<usize>,
    after: Option<String>,
}

/// A page of records, filtered as the command-line tool's `list`.
async fn list(
    State(store): State<SledIdempotencyStore>,
    Path(name): Path<String>,
    Query(query): Query<ListQuery>,
) -> Reply {
    let mut filter = ListFilter::new(query.limit.unwrap_or(100).min(10_000))
        .min_attempts(query.min_attempts.unwrap_or(0));
    match query.state.as_deref() {
        None => {}
        Some("pending") => filter = filter.state(sled_idempotency::State::Pending),
        Some("done") => filter = filter.state(sled_idempotency::State::Done),
        Some(other) => {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("state {other:?}: pending or done"),
            ));
        }
    }
    if let Some(after) = &query.after {
        filter = filter.after(parse_id(after)?);
    }
    let records = namespace(&store, &name)
        .await?
        .admin()
        .list(&filter)
        .await
        .map_err(failed(StatusCode::INTERNAL_SERVER_ERROR))?;
    let records: Vec<Value> = records.iter().map(|(id, r)| record(id, r)).collect();
    Ok(Json(json!({ "records": records })))
}

/// Gives one pending claim back; a done record is never erased.
async fn release(
    State(store): State<SledIdempotencyStore>,
    Path((name, id)): Path<(String, String)>,
) -> Reply {
    let id = parse_id(&id)?;
    let handle = namespace(&store, &name).await?;
    let status = StatusCode::INTERNAL_SERVER_ERROR;
    let was = handle.get(&id).await.map_err(failed(status))?;
    handle.release(&id).await.map_err(failed(status))?;
    let now = handle.get(&id).await.map_err(failed(status))?;
    Ok(Json(json!({
        "id": id.to_string(),
        "released": was.is_some() && now.is_none(),
        "record": now.map(|r| record(&id, &r)),
    })))
}

/// The admin routes, on `store`.
pub fn router(store: SledIdempotencyStore) -> Router {
    Router::new()
        .route("/stats", get(stats))
        .route("/namespaces/{namespace}/records", get(list))
        .route(
            "/namespaces/{namespace}/records/{id}/release",
            post(release),
        )
        .with_state(store)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let scratch = tempfile::tempdir()?;
    let (db, seed) = match args.next() {
        Some(dir) => (PathBuf::from(dir), false),
        None => (scratch.path().join("db"), true),
    };
    let address = args.next().unwrap_or_else(|| "127.0.0.1:8080".to_owned());
    let store = SledIdempotencyStore::open(&db).await?;
    if seed {
        for n in 0..5u128 {
            let id = MessageId::from_uuid(uuid::Uuid::from_u128(n));
            store.try_claim(&id, Duration::from_secs(600)).await?;
            if n % 2 == 0 {
                store.mark_done(&id).await?;
            }
        }
    }
    let listener = tokio::net::TcpListener::bind(&address).await?;
    println!(
        "admin API of {} on http://{}",
        db.display(),
        listener.local_addr()?
    );
    axum::serve(listener, router(store.clone()))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    store.close().await?;
    Ok(())
}
