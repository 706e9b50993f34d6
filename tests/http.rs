//! The `Idempotency-Key` layer on a real axum server on a loopback port,
//! spoken to by a real HTTP/1.1 client (hyper), on sled and on a real
//! `redis-server`: every status the layer answers, concurrent duplicates,
//! two principals with one key, large and streaming bodies, a request
//! dropped mid-flight, and (sled) a retry after the server process was
//! killed with SIGKILL and restarted on the same database.
#![cfg(feature = "http")]

mod common;
#[cfg(feature = "redis")]
mod redis_server;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use sled_idempotency::http::IdempotencyLayer;
use sled_idempotency::{Engine, Lease, SledIdempotencyStore, Store};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use common::TestResult;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The endpoints' shared state: how often each ran, and a gate that holds
/// `/slow` until the test opens it.
#[derive(Clone)]
struct Endpoints {
    runs: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
}

impl Endpoints {
    fn new() -> Self {
        Endpoints {
            runs: Arc::new(AtomicUsize::new(0)),
            gate: Arc::new(Semaphore::new(0)),
        }
    }
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

/// A payment: its number in this process, the lease's fencing token, the
/// body's length and the server's process id.
async fn pay(State(app): State<Endpoints>, request: Request) -> Response {
    let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let token = request.extensions().get::<Lease>().map_or(0, Lease::token);
    let body = axum::body::to_bytes(request.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let json = format!(
        "{{\"payment\":{n},\"token\":{token},\"bytes\":{},\"pid\":{}}}",
        body.len(),
        std::process::id()
    );
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, format!("/payments/{n}")),
            (header::SET_COOKIE, format!("session={n}")),
            (header::CONTENT_TYPE, "application/json".to_string()),
        ],
        json,
    )
        .into_response()
}

/// Waits at the gate, then pays.
async fn slow(State(app): State<Endpoints>, request: Request) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    let permit = app.gate.acquire().await;
    drop(permit);
    app.runs.fetch_sub(1, Ordering::SeqCst);
    pay(State(app), request).await
}

/// Fails with a 500 on its first run, then pays.
async fn flaky(State(app): State<Endpoints>, request: Request) -> Response {
    if app.runs.load(Ordering::SeqCst) == 0 {
        app.runs.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::INTERNAL_SERVER_ERROR, "database down").into_response();
    }
    pay(State(app), request).await
}

/// `n` bytes (the request body's decimal number), streamed in chunks of
/// 1,000, the run number first.
async fn big(State(app): State<Endpoints>, body: String) -> Response {
    let n: usize = body.trim().parse().unwrap_or(0);
    let run = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let mut bytes = format!("{run:08}").into_bytes();
    bytes.resize(n.max(8), b'x');
    let chunks: Vec<Result<Bytes, Infallible>> = bytes
        .chunks(1000)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Body::from_stream(futures_util::stream::iter(chunks)).into_response()
}

/// The request body back, with the run number in a header.
async fn echo(State(app): State<Endpoints>, body: Bytes) -> Response {
    let run = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    ([("x-run", run.to_string())], body).into_response()
}

/// A receipt: a header value that is not ASCII (a UTF-8 file name, as
/// RFC 8187 clients send it raw) and a body that is not UTF-8.
async fn receipt(State(app): State<Endpoints>) -> Response {
    let run = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let disposition =
        axum::http::HeaderValue::from_bytes("attachment; filename=\"reçu.pdf\"".as_bytes())
            .expect("a valid header value");
    let mut body = vec![0xff, 0xfe, 0x00];
    body.extend_from_slice(run.to_string().as_bytes());
    ([(header::CONTENT_DISPOSITION, disposition)], body).into_response()
}

/// The application: keys scoped by the `Authorization` header; `/strict`
/// requires a key; small limits so that large bodies are quick to make.
fn app<E: Engine>(store: Store<E>, endpoints: Endpoints) -> Router {
    app_with(store, endpoints, sled_idempotency::http::DEFAULT_LEASE_TTL)
}

fn app_with<E: Engine>(store: Store<E>, endpoints: Endpoints, lease_ttl: Duration) -> Router {
    let scope = |request: &axum::http::request::Parts| {
        let who = request.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        Some(who.to_owned())
    };
    let layer = IdempotencyLayer::scoped(store, scope)
        .max_request_body(64 * 1024)
        .max_response_body(8 * 1024)
        .lease_ttl(lease_ttl);
    let routes = Router::new()
        .route("/payments", post(pay).get(|| async { "a list" }))
        .route("/slow", post(slow))
        .route("/flaky", post(flaky))
        .route("/big", post(big))
        .route("/echo", post(echo))
        .route("/receipt", post(receipt))
        .layer(layer.clone());
    let strict = Router::new()
        .route("/strict", post(pay))
        .layer(layer.require_key(true));
    routes.merge(strict).with_state(endpoints)
}

/// Serves `app` on a free loopback port.
async fn serve(app: Router) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// What the client got.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// A problem-details answer with this status.
    fn is_problem(&self, status: u16) -> bool {
        self.status.as_u16() == status
            && self
                .headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v == "application/problem+json")
            && self.text().contains(&format!("\"status\":{status}"))
    }
}

/// One request on a new connection.
async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: BoxBody<Bytes, BoxError>,
) -> Result<Reply, BoxError> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender.send_request(request.body(body)?).await?;
    let (parts, body) = response.into_parts();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await?.to_bytes(),
    })
}

fn bytes(body: impl Into<Bytes>) -> BoxBody<Bytes, BoxError> {
    http_body_util::Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A body sent in these chunks, each its own write.
fn chunked(chunks: Vec<&'static [u8]>) -> BoxBody<Bytes, BoxError> {
    let frames = chunks
        .into_iter()
        .map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from_static(c))));
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

async fn post_with(
    addr: SocketAddr,
    path: &str,
    who: &str,
    key: &str,
    body: &'static str,
) -> Result<Reply, BoxError> {
    send(
        addr,
        Method::POST,
        path,
        &[("authorization", who), ("idempotency-key", key)],
        bytes(body),
    )
    .await
}

/// Polls `check` until it holds, for at most ten seconds.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

// ---- the contracts -------------------------------------------------------

/// The first request runs; its retry is the same response byte for byte,
/// marked replayed, without running the endpoint again.
async fn a_retry_is_replayed_byte_for_byte<E: Engine>(store: Store<E>) -> TestResult {
    let endpoints = Endpoints::new();
    let addr = serve(app(store, endpoints.clone())).await?;
    let first = post_with(addr, "/payments", "alice", "k-1", "{\"amount\":5}").await?;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    assert!(!first.replayed());
    assert_eq!(
        first.headers[header::SET_COOKIE],
        "session=1",
        "the first client gets every header"
    );
    for _ in 0..3 {
        let retry = post_with(addr, "/payments", "alice", "k-1", "{\"amount\":5}").await?;
        assert_eq!(retry.status, StatusCode::CREATED);
        assert!(retry.replayed());
        assert_eq!(retry.body, first.body, "byte for byte");
        assert_eq!(
            retry.headers[header::LOCATION],
            first.headers[header::LOCATION]
        );
        assert_eq!(retry.headers[header::CONTENT_TYPE], "application/json");
        assert!(
            retry.headers.get(header::SET_COOKIE).is_none(),
            "no session handed out again"
        );
    }
    assert_eq!(endpoints.runs(), 1);
    // A key in structured-field form is the same key.
    let quoted = post_with(addr, "/payments", "alice", "\"k-1\"", "{\"amount\":5}").await?;
    assert!(quoted.replayed());
    Ok(())
}

/// The same key with another payload is a 422; the endpoint does not run.
async fn another_payload_is_422<E: Engine>(store: Store<E>) -> TestResult {
    let endpoints = Endpoints::new();
    let addr = serve(app(store, endpoints.clone())).await?;
    let first = post_with(addr, "/payments", "alice", "k-2", "{\"amount\":5}").await?;
    assert_eq!(first.status, StatusCode::CREATED);
    let other = post_with(addr, "/payments", "alice", "k-2", "{\"amount\":500}").await?;
    assert!(other.is_problem(422), "{other:?}");
    let other_query = post_with(
        addr,
        "/payments?currency=usd",
        "alice",
        "k-2",
        "{\"amount\":5}",
    )
    .await?;
    assert!(other_query.is_problem(422), "{other_query:?}");
    assert_eq!(endpoints.runs(), 1);
    Ok(())
}

/// Concurrent duplicates while the first is in flight: one runs, every
/// other gets a 409 with Retry-After; once it completes, the replay.
async fn concurrent_duplicates_get_409_then_the_replay<E: Engine>(store: Store<E>) -> TestResult {
    let endpoints = Endpoints::new();
    let addr = serve(app(store, endpoints.clone())).await?;
    let first = tokio::spawn(post_with(addr, "/slow", "alice", "k-3", "{}"));
    eventually("the first request runs", || endpoints.runs() == 1).await;
    let duplicates: Vec<_> = (0..16)
        .map(|_| tokio::spawn(post_with(addr, "/slow", "alice", "k-3", "{}")))
        .collect();
    for duplicate in duplicates {
        let reply = duplicate.await??;
        assert!(reply.is_problem(409), "{reply:?}");
        assert_eq!(reply.headers[header::RETRY_AFTER], "1");
    }
    endpoints.gate.add_permits(100);
    let first = first.await??;
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = post_with(addr, "/slow", "alice", "k-3", "{}").await?;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(endpoints.runs(), 1, "the endpoint ran once");
    Ok(())
}

/// Two principals that pick the same key get their own results.
async fn two_principals_with_one_key_get_their_own<E: Engine>(store: Store<E>) -> TestResult {
    let endpoints = Endpoints::new();
    let addr = serve(app(store, endpoints.clone())).await?;
    let alice = post_with(addr, "/payments", "alice", "same-key", "{}").await?;
    let bob = post_with(addr, "/payments", "bob", "same-key", "{}").await?;
    assert_eq!(
        (alice.status, bob.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert!(!bob.replayed(), "bob's request ran: {}", bob.text());
    assert_ne!(alice.body, bob.body);
    assert_eq!(
        post_with(addr, "/payments", "alice", "same-key", "{}")
            .await?
            .body,
        alice.body
    );
    assert_eq!(
        post_with(addr, "/payments", "bob", "same-key", "{}")
            .await?
            .body,
        bob.body
    );
    // The same key on another route is another key too.
    let strict = post_with(addr, "/strict", "alice", "same-key", "{}").await?;
    assert!(!strict.replayed());
    assert_eq!(endpoints.runs(), 3);
    Ok(())
}

/// Bad or missing keys, a request without a principal, and what passes
/// through.
async fn bad_requests_get_400<E: Engine>(store: Store<E>) -> TestResult {
    let endpoints = Endpoints::new();
    let addr = serve(app(store, endpoints.clone())).await?;
    let none = send(
        addr,
        Method::POST,
        "/strict",
        &[("authorization", "alice")],
        bytes("{}"),
    )
    .await?;
    assert!(
        none.is_problem(400),
        "missing key on a strict route: {none:?}"
    );
    let long = "k".repeat(256);
    for key in [
        "has space",
        "",
        long.as_str(),
        "quote\"inside",
        "\u{e9}t\u{e9}",
    ] {
        let reply = post_with(addr, "/payments", "alice", key, "{}").await;
        // A non-ASCII header value is refused by the client itself.
        if let Ok(reply) = reply {
            assert!(reply.is_problem(400), "key {key:?}: {reply:?}");
        }
    }
    let two = send(
        addr,
        Method::POST,
        "/payments",
        &[
            ("authorization", "alice"),
            ("idempotency-key", "a"),
            ("idempotency-key", "b"),
        ],
        bytes("{}"),
    )
    .await?;
    assert!(two.is_problem(400), "two keys: {two:?}");
    let nobody = send(
        addr,
        Method::POST,
        "/payments",
        &[("idempotency-key", "k")],
        bytes("{}"),
    )
    .await?;
    assert!(nobody.is_problem(400), "no principal: {nobody:?}");
    assert_eq!(endpoints.runs(), 0);
    // Without a key on a route that does not require one, and on methods
    // the layer does not cover, requests pass through.
    let plain = send(addr, Method::POST, "/payments", &[], bytes("{}")).await?;
    assert_eq!(plain.status, StatusCode::CREATED);
    let get = send(
        addr,
        Method::GET,
        "/payments",
        &[("idempotency-key", "k")],
        bytes(""),
    )
    .await?;
    assert_eq!(
        (get.status, get.text().as_str()),
        (StatusCode::OK, "a list")
    );
    Ok(())
}

/// A 5xx is given back: the retry runs the endpoint again, and its
/// success is what is replayed from then on.
async fn a_server_error_is_given_back<E: Engine>(store: Store<E>) -> TestResult {
    let endpoints = Endpoints::new();
    let addr = serve(app(store, endpoints.clone())).await?;
    let failed = post_with(addr, "/flaky", "alice", "k-5", "{}").await?;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(failed.text(), "database down", "the endpoint's own answer");
    let retried = post_with(addr, "/flaky", "alice", "k-5", "{}").await?;
    assert_eq!(retried.status, StatusCode::CREATED);
    assert!(!retried.replayed(), "ran again");
    let replayed = post_with(addr, "/flaky", "alice", "k-5", "{}").await?;
    assert!(replayed.replayed());
    assert_eq!(replayed.body, retried.body);
    Ok(())
}

/// Large bodies: a request over the limit is a 413; a response over the
/// limit is streamed whole and not cached (the retry runs again); a
/// streamed response under it is cached and replayed byte for byte.
async fn large_and_streaming_bodies<E: Engine>(store: Store<E>) -> TestResult {
    let endpoints = Endpoints::new();
    let addr = serve(app(store, endpoints.clone())).await?;
    let huge: &'static str = Box::leak("x".repeat(65 * 1024).into_boxed_str());
    let too_big = post_with(addr, "/echo", "alice", "k-6", huge).await?;
    assert!(too_big.is_problem(413), "{:?}", too_big.status);
    assert_eq!(endpoints.runs(), 0);

    let over = post_with(addr, "/big", "alice", "k-7", "100000").await?;
    assert_eq!((over.status, over.body.len()), (StatusCode::OK, 100_000));
    let again = post_with(addr, "/big", "alice", "k-7", "100000").await?;
    assert_eq!(again.body.len(), 100_000);
    assert!(!again.replayed(), "not cached: ran again");
    assert_eq!(&again.body[..8], b"00000002");

    let small = post_with(addr, "/big", "alice", "k-8", "3000").await?;
    assert_eq!(small.body.len(), 3_000);
    let replay = post_with(addr, "/big", "alice", "k-8", "3000").await?;
    assert!(replay.replayed());
    assert_eq!(replay.body, small.body);

    // A streamed request body: fingerprinted whole, whatever its chunks.
    let streamed = send(
        addr,
        Method::POST,
        "/echo",
        &[("authorization", "alice"), ("idempotency-key", "k-9")],
        chunked(vec![b"hello ", b"streamed ", b"world"]),
    )
    .await?;
    assert_eq!(streamed.text(), "hello streamed world");
    let rechunked = send(
        addr,
        Method::POST,
        "/echo",
        &[("authorization", "alice"), ("idempotency-key", "k-9")],
        chunked(vec![b"hello streamed", b" world"]),
    )
    .await?;
    assert!(rechunked.replayed(), "{rechunked:?}");
    assert_eq!(rechunked.headers["x-run"], streamed.headers["x-run"]);
    let changed = send(
        addr,
        Method::POST,
        "/echo",
        &[("authorization", "alice"), ("idempotency-key", "k-9")],
        chunked(vec![b"hello ", b"other ", b"world"]),
    )
    .await?;
    assert!(changed.is_problem(422));
    Ok(())
}

/// A request whose future is dropped mid-flight (the client went away)
/// gives its key back: the retry runs instead of getting 409s for the
/// lease's whole ttl.
async fn a_dropped_request_gives_its_key_back<E: Engine>(store: Store<E>) -> TestResult {
    let endpoints = Endpoints::new();
    let service = app(store, endpoints.clone());
    let request = || {
        axum::http::Request::post("/slow")
            .header("authorization", "alice")
            .header("idempotency-key", "k-10")
            .body(Body::from("{}"))
    };
    let in_flight = tokio::spawn(service.clone().oneshot(request()?));
    eventually("the request runs", || endpoints.runs() == 1).await;
    in_flight.abort();
    assert!(in_flight.await.is_err_and(|e| e.is_cancelled()));
    endpoints.gate.add_permits(100);
    let started = Instant::now();
    let retry = loop {
        let reply = service.clone().oneshot(request()?).await?;
        if reply.status() != StatusCode::CONFLICT {
            break reply;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the key was never given back"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert!(
        retry.headers().get("idempotent-replayed").is_none(),
        "ran again"
    );
    Ok(())
}

/// A header value that is not ASCII and a body that is not UTF-8 are
/// cached and replayed byte for byte (a header that did not convert to
/// text once made the response uncached and the retry run again); a
/// request body with trailers is refused, since they would escape its
/// fingerprint.
async fn odd_bytes_replay_and_request_trailers_are_refused<E: Engine>(
    store: Store<E>,
) -> TestResult {
    let endpoints = Endpoints::new();
    let service = app(store, endpoints.clone());
    let addr = serve(service.clone()).await?;
    let first = post_with(addr, "/receipt", "alice", "k-11", "{}").await?;
    assert_eq!(first.status, StatusCode::OK);
    let retry = post_with(addr, "/receipt", "alice", "k-11", "{}").await?;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(
        retry.headers[header::CONTENT_DISPOSITION].as_bytes(),
        "attachment; filename=\"reçu.pdf\"".as_bytes()
    );
    assert_eq!(endpoints.runs(), 1);

    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", axum::http::HeaderValue::from_static("abc"));
    let frames = vec![
        Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"{}"))),
        Ok(Frame::trailers(trailers)),
    ];
    // In process: hyper's HTTP/1 client sends no trailers unasked.
    let request = axum::http::Request::post("/payments")
        .header("authorization", "alice")
        .header("idempotency-key", "k-12")
        .body(Body::new(StreamBody::new(futures_util::stream::iter(
            frames,
        ))))?;
    let response = service.oneshot(request).await?;
    let (parts, body) = response.into_parts();
    let with_trailers = Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await?.to_bytes(),
    };
    assert!(with_trailers.is_problem(400), "{with_trailers:?}");
    assert!(with_trailers.text().contains("trailers"));
    assert_eq!(endpoints.runs(), 1);
    Ok(())
}

macro_rules! contracts {
    ($($contract:ident),* $(,)?) => {
        mod sled_engine {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $contract() -> super::TestResult {
                    let dir = tempfile::tempdir()?;
                    let store = super::SledIdempotencyStore::open(dir.path().join("db")).await?;
                    super::$contract(store.namespace("http").await?).await?;
                    store.close().await?;
                    Ok(())
                }
            )*
        }

        #[cfg(feature = "redis")]
        mod redis_engine {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $contract() -> super::TestResult {
                    if !super::redis_server::available() {
                        return Ok(());
                    }
                    let server = super::redis_server::Server::start();
                    let store = super::redis_server::flush_store(server.url(), None).await?;
                    super::$contract(store).await?;
                    Ok(())
                }
            )*
        }
    };
}

contracts!(
    a_retry_is_replayed_byte_for_byte,
    another_payload_is_422,
    concurrent_duplicates_get_409_then_the_replay,
    two_principals_with_one_key_get_their_own,
    bad_requests_get_400,
    a_server_error_is_given_back,
    large_and_streaming_bodies,
    a_dropped_request_gives_its_key_back,
    odd_bytes_replay_and_request_trailers_are_refused,
);

/// A sled store in a temporary directory, on a manual clock.
async fn on_a_manual_clock() -> Result<
    (
        tempfile::TempDir,
        sled_idempotency::ManualClock,
        SledIdempotencyStore,
    ),
    BoxError,
> {
    let dir = tempfile::tempdir()?;
    let clock = sled_idempotency::ManualClock::new(common::T0);
    let store = SledIdempotencyStore::builder(dir.path().join("db"))
        .clock(clock.clone())
        .open()
        .await?;
    Ok((dir, clock, store))
}

/// A request that runs for four lease ttls keeps its key by the
/// heartbeat: retries get 409 all along, and the endpoint runs once. The
/// store's clock is a manual one; the test waits for each beat's effect on
/// the record (sled's admin listing), not for a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_keeps_its_key_by_the_heartbeat() -> TestResult {
    let (_dir, clock, store) = on_a_manual_clock().await?;
    let endpoints = Endpoints::new();
    let lease = Duration::from_millis(300);
    let addr = serve(app_with(store.clone(), endpoints.clone(), lease)).await?;
    let first = tokio::spawn(post_with(addr, "/slow", "alice", "k-slow", "{}"));
    eventually("the request runs", || endpoints.runs() == 1).await;
    let pending = sled_idempotency::admin::ListFilter::new(10);
    for _ in 0..6 {
        clock.advance(Duration::from_millis(200));
        let due = clock.now() + 300;
        let started = Instant::now();
        loop {
            let records = store.admin().list(&pending).await?;
            if records.iter().any(|(_, r)| r.expires_at >= due) {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "no heartbeat");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let retry = post_with(addr, "/slow", "alice", "k-slow", "{}").await?;
        assert!(retry.is_problem(409), "{retry:?}");
    }
    endpoints.gate.add_permits(100);
    assert_eq!(first.await??.status, StatusCode::CREATED);
    assert_eq!(endpoints.runs(), 1);
    store.close().await?;
    Ok(())
}

/// Responses are kept for the layer's retention (a day by default), not
/// for the 30 s lease that held the key while the request ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_is_kept_for_a_day() -> TestResult {
    let (_dir, clock, store) = on_a_manual_clock().await?;
    let endpoints = Endpoints::new();
    let addr = serve(app(store.clone(), endpoints.clone())).await?;
    let first = post_with(addr, "/payments", "alice", "k-day", "{}").await?;
    assert_eq!(first.status, StatusCode::CREATED);
    clock.advance(Duration::from_secs(24 * 3600 - 60));
    let late = post_with(addr, "/payments", "alice", "k-day", "{}").await?;
    assert!(late.replayed(), "a day less a minute later: {late:?}");
    assert_eq!(late.body, first.body);
    clock.advance(Duration::from_secs(120));
    let later = post_with(addr, "/payments", "alice", "k-day", "{}").await?;
    assert_eq!(later.status, StatusCode::CREATED);
    assert!(!later.replayed(), "past the retention the key is new again");
    assert_eq!(endpoints.runs(), 2);
    store.close().await?;
    Ok(())
}

// ---- a server killed and restarted ---------------------------------------

const CHILD_ENV: &str = "SLED_IDEMPOTENCY_HTTP_CHILD";
const CHILD_TEST: &str = "http_server_child";

/// The server's process for the kill test: serves the app on the
/// database named by the environment, prints its address, runs until
/// killed. Does nothing when run without the parent.
#[test]
#[ignore = "the child of `a_retry_after_a_sigkill_is_replayed`"]
fn http_server_child() -> TestResult {
    let Ok(db) = std::env::var(CHILD_ENV) else {
        return Ok(());
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let store = SledIdempotencyStore::open(db).await?;
        let addr = serve(app(store, Endpoints::new())).await?;
        println!("listening {addr}");
        std::future::pending::<TestResult>().await
    })
}

/// Starts the server child on `db` and reads its address.
fn start_child(db: &std::path::Path) -> Result<(std::process::Child, SocketAddr), BoxError> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args([
            CHILD_TEST,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, db)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    for line in std::io::BufReader::new(stdout).lines() {
        if let Some(addr) = line?.split("listening ").nth(1) {
            return Ok((child, addr.trim().parse()?));
        }
    }
    let _ = child.kill();
    Err("the server child exited before listening".into())
}

/// A payment made, the server killed with SIGKILL right after answering,
/// restarted on the same database: the retry is the first response,
/// replayed (the process id in its body is the dead server's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_sigkill_is_replayed() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("db");
    let (mut first_life, addr) = start_child(&db)?;
    let paid = post_with(addr, "/payments", "alice", "k-crash", "{\"amount\":5}").await?;
    assert_eq!(paid.status, StatusCode::CREATED);
    first_life.kill()?; // SIGKILL
    first_life.wait()?;

    common::wait_for_sled_to_let_go(&db);
    let (mut second_life, addr) = start_child(&db)?;
    let retry = post_with(addr, "/payments", "alice", "k-crash", "{\"amount\":5}").await;
    second_life.kill()?;
    second_life.wait()?;
    let retry = retry?;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, paid.body, "the first life's response");
    assert!(
        retry
            .text()
            .contains(&format!("\"pid\":{}", first_life.id()))
    );
    Ok(())
}
