//! An HTTP `Idempotency-Key` layer (feature `http`): a [tower](https://docs.rs/tower) layer that
//! makes a non-idempotent endpoint safe to retry, on either engine, built
//! on [`Store::once`](crate::Store::once).
//!
//! ```rust
//! use axum::{Router, routing::post};
//! use sled_idempotency::SledIdempotencyStore;
//! use sled_idempotency::http::IdempotencyLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let store = SledIdempotencyStore::open(dir.path().join("db")).await?;
//! // Keys are scoped by who asks: here the caller's API key.
//! let layer = IdempotencyLayer::scoped(store.namespace("http").await?, |request| {
//!     let key = request.headers.get("x-api-key")?.to_str().ok()?;
//!     Some(key.to_owned())
//! });
//! let app: Router = Router::new()
//!     .route("/payments", post(|| async { "charged" }))
//!     .layer(layer);
//! # drop(app);
//! # Ok(()) }
//! ```
//!
//! For a request on a covered method (POST and PATCH by default) with an
//! `Idempotency-Key` header:
//!
//! | the request | the answer |
//! |---|---|
//! | a new key | the inner service runs; its response is cached and returned |
//! | the same key and payload, after completion | the cached response, byte for byte, with `Idempotent-Replayed: true` |
//! | the same key, another payload | **422**, nothing runs |
//! | the same key while the first is still in flight | **409**, with `Retry-After: 1` |
//! | no key, on a layer that [requires](IdempotencyLayer::require_key) one | **400** |
//! | a malformed or over-long key (over [`MAX_KEY_LEN`] bytes) | **400** |
//! | a body over [`max_request_body`](IdempotencyLayer::max_request_body) | **413** |
//! | a request the scope function finds no principal for | **400** |
//! | a request body with trailers (they could not be fingerprinted) | **400** |
//! | the store failing (an I/O error, a closed store) | **503** |
//!
//! The layer's own answers carry a problem-details body (RFC 9457,
//! `application/problem+json`). Requests on other methods, and requests
//! without a key on a layer that does not require one, pass through
//! untouched.
//!
//! **Scope.** The store key is a SHA-256 hash of the scope, the method, the
//! path and the `Idempotency-Key`. The path is the one the layer sees:
//! inside axum's `Router::nest` the prefix is already stripped, so put the
//! layer on the outer router, or give nested routers layers on different
//! namespaces of the store ([`Store::namespace`](crate::Store::namespace)),
//! or routes under two prefixes share keys. The scope is who is asking (an
//! authenticated user, a tenant, an API key), derived from the request by a
//! function given first, to [`IdempotencyLayer::scoped`]. Without a scope,
//! two clients that pick the same key would be served each other's
//! responses: a data leak. [`IdempotencyLayer::unscoped`] exists for an
//! endpoint with one client, and says so in its name.
//!
//! **Fingerprint.** A SHA-256 hash of the method, the path and query, and
//! the body, recorded with the claim: the same key with another payload is
//! a 422.
//!
//! **What is cached, and what is given back.** The response is the answer
//! to this request, and replayed, when its status is 2xx, 3xx or 4xx, with
//! these exceptions, which are answers a retry of the same request can get
//! differently and so are given back (the key is free again, and the retry
//! runs): 5xx (the server failed; Stripe records 500s instead, as an
//! endpoint may have acted before failing; here the handler is expected to
//! make its effects idempotent with the lease's fencing token, and a
//! transient failure is retried), 408, 409, 425 and 429 (try again later),
//! a response whose body is over [`max_response_body`](IdempotencyLayer::max_response_body)
//! (it is streamed to the client, not buffered), a response with trailers,
//! and one that does not fit
//! the store's `max_result_size` (4 KiB by default, 6 KiB at most, with its
//! status and headers: the layer is for endpoints that answer with a
//! receipt — an id, a status, a location — not with documents). Headers are replayed except those that
//! belong to one connection or one moment (`Connection`, `Keep-Alive`,
//! `Transfer-Encoding`, `TE`, `Trailer`, `Upgrade`, `Proxy-*`,
//! `Content-Length`, recomputed, `Date`) and `Set-Cookie`, which would hand
//! one session's cookie to a replay.
//!
//! **Bodies.** The layer wraps a service whose request body type can be
//! made from [`Bytes`] (axum's `Body`, `Full<Bytes>`): it reads the body
//! to fingerprint it and hands the inner service the same bytes. A plain
//! hyper service on `Incoming` needs a body conversion in front of it.
//!
//! **While it runs** the claim's lease is extended by a heartbeat, and the
//! lease is put in the request's extensions, so the endpoint can read its
//! fencing token (`Extension<Lease>` in axum). A request whose future is
//! dropped (the client went away) gives the claim back. Responses are kept
//! for [`retention`](IdempotencyLayer::retention) (24 hours by default).

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bus_core::MessageId;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::Engine;
use crate::error::Error;
use crate::handler::Outcome;
use crate::lease::Lease;
use crate::store::Store;

/// The request header that carries the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The response header that marks a replay.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 255;
/// How long a request holds its key while it runs, renewed by a heartbeat.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// How long a response is kept for retries.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// The largest request body buffered to fingerprint it.
pub const DEFAULT_MAX_REQUEST_BODY: usize = 1024 * 1024;

/// An error from a body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of the layer's responses: the inner service's, boxed, or a
/// buffered or replayed one.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

type Scope = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

/// The `Idempotency-Key` layer. See the [module docs](self).
pub struct IdempotencyLayer<E: Engine> {
    settings: Arc<Settings<E>>,
}

impl<E: Engine> Clone for IdempotencyLayer<E> {
    fn clone(&self) -> Self {
        IdempotencyLayer {
            settings: self.settings.clone(),
        }
    }
}

impl<E: Engine> fmt::Debug for IdempotencyLayer<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.settings.fmt(f)
    }
}

#[derive(Clone)]
struct Settings<E: Engine> {
    store: Store<E>,
    scope: Option<Scope>,
    methods: Vec<Method>,
    require_key: bool,
    lease_ttl: Duration,
    retention: Duration,
    max_request_body: usize,
    max_response_body: Option<usize>,
}

impl<E: Engine> fmt::Debug for Settings<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("namespace", &self.store.namespace_name())
            .field("scoped", &self.scope.is_some())
            .field("methods", &self.methods)
            .field("require_key", &self.require_key)
            .field("lease_ttl", &self.lease_ttl)
            .field("retention", &self.retention)
            .field("max_request_body", &self.max_request_body)
            .field("max_response_body", &self.max_response_body)
            .finish()
    }
}

impl<E: Engine> IdempotencyLayer<E> {
    /// A layer whose keys are scoped by `scope`: who is asking, derived
    /// from the request (its authenticated user, tenant or API key; an
    /// authentication layer in front of this one can put it in the
    /// request's extensions). A request it returns `None` for is answered
    /// 400.
    pub fn scoped(
        store: Store<E>,
        scope: impl Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        Self::new(store, Some(Arc::new(scope)))
    }

    /// A layer whose keys are not scoped by who is asking: two clients that
    /// send the same key get one response, the first one's. Only for an
    /// endpoint with a single client (or clients that trust each other).
    pub fn unscoped(store: Store<E>) -> Self {
        Self::new(store, None)
    }

    fn new(store: Store<E>, scope: Option<Scope>) -> Self {
        IdempotencyLayer {
            settings: Arc::new(Settings {
                store,
                scope,
                methods: vec![Method::POST, Method::PATCH],
                require_key: false,
                lease_ttl: DEFAULT_LEASE_TTL,
                retention: DEFAULT_RETENTION,
                max_request_body: DEFAULT_MAX_REQUEST_BODY,
                max_response_body: None,
            }),
        }
    }

    fn with(mut self, change: impl FnOnce(&mut Settings<E>)) -> Self {
        change(Arc::make_mut(&mut self.settings));
        self
    }

    /// The methods the layer covers; POST and PATCH by default.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.with(|s| s.methods = methods)
    }

    /// Whether a request on a covered method without a key is answered 400
    /// (`true`) or passes through (`false`, the default).
    pub fn require_key(self, required: bool) -> Self {
        self.with(|s| s.require_key = required)
    }

    /// How long a running request holds its key between heartbeats;
    /// [`DEFAULT_LEASE_TTL`] by default. A server that dies mid-request
    /// keeps the key (409 for retries) this long.
    pub fn lease_ttl(self, ttl: Duration) -> Self {
        self.with(|s| s.lease_ttl = ttl)
    }

    /// How long a response is kept for retries; [`DEFAULT_RETENTION`] by
    /// default (the store's `done_retention` wins when set).
    pub fn retention(self, retention: Duration) -> Self {
        self.with(|s| s.retention = retention)
    }

    /// The largest request body the layer buffers to fingerprint;
    /// [`DEFAULT_MAX_REQUEST_BODY`] by default. A larger one is answered
    /// 413.
    pub fn max_request_body(self, bytes: usize) -> Self {
        self.with(|s| s.max_request_body = bytes)
    }

    /// The largest response body the layer buffers to cache; by default
    /// the store's `max_result_size`. A larger response is streamed to the
    /// client and not cached (the key is given back).
    pub fn max_response_body(self, bytes: usize) -> Self {
        self.with(|s| s.max_response_body = Some(bytes))
    }
}

impl<E: Engine, S> tower_layer::Layer<S> for IdempotencyLayer<E> {
    type Service = Idempotency<E, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            settings: self.settings.clone(),
        }
    }
}

/// The service [`IdempotencyLayer`] wraps around an endpoint.
pub struct Idempotency<E: Engine, S> {
    inner: S,
    settings: Arc<Settings<E>>,
}

impl<E: Engine, S: Clone> Clone for Idempotency<E, S> {
    fn clone(&self) -> Self {
        Idempotency {
            inner: self.inner.clone(),
            settings: self.settings.clone(),
        }
    }
}

impl<E: Engine, S> fmt::Debug for Idempotency<E, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.settings.fmt(f)
    }
}

impl<E, S, B, RB> tower_service::Service<Request<B>> for Idempotency<E, S>
where
    E: Engine,
    S: tower_service::Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    B: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The service that was polled ready serves this request; a clone
        // takes its place.
        let ready = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, ready);
        let settings = self.settings.clone();
        Box::pin(async move { settings.serve(inner, request).await })
    }
}

/// Why a response was not cached: the inner service failed, or its
/// response is not one to replay (returned to the client all the same).
enum NotCached<Er> {
    Service(Er),
    Response(Response<ResponseBody>),
}

/// A response as the store keeps it.
#[derive(Serialize, Deserialize)]
struct Cached {
    status: u16,
    headers: Vec<(String, CachedBody)>,
    body: CachedBody,
}

/// Bytes as JSON can hold them: text as it is, anything else as hex.
#[derive(Serialize, Deserialize)]
enum CachedBody {
    #[serde(rename = "text")]
    Text(String),
    #[serde(rename = "hex")]
    Hex(String),
}

impl<E: Engine> Settings<E> {
    async fn serve<S, B, RB>(
        &self,
        mut inner: S,
        request: Request<B>,
    ) -> Result<Response<ResponseBody>, S::Error>
    where
        S: tower_service::Service<Request<B>, Response = Response<RB>> + Send,
        S::Future: Send,
        B: Body<Data = Bytes> + From<Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
        RB: Body<Data = Bytes> + Send + 'static,
        RB::Error: Into<BoxError>,
    {
        if !self.methods.contains(request.method()) {
            return pass(&mut inner, request).await;
        }
        let key = match idempotency_key(&request) {
            Ok(Some(key)) => key.to_vec(),
            Ok(None) if self.require_key => {
                return Ok(problem(
                    StatusCode::BAD_REQUEST,
                    "this endpoint requires an Idempotency-Key header",
                ));
            }
            Ok(None) => return pass(&mut inner, request).await,
            Err(reason) => return Ok(problem(StatusCode::BAD_REQUEST, reason)),
        };
        let (parts, body) = request.into_parts();
        let scope = match &self.scope {
            None => None,
            Some(scope) => match scope(&parts) {
                Some(scope) => Some(scope),
                None => {
                    return Ok(problem(
                        StatusCode::BAD_REQUEST,
                        "the request has no principal to scope its Idempotency-Key by",
                    ));
                }
            },
        };
        let body = match buffer(body, self.max_request_body).await {
            Buffered::Whole(body) => body,
            Buffered::Over(_) => {
                return Ok(problem(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!(
                        "the request body is over {} bytes, the most this endpoint \
                         fingerprints for its Idempotency-Key",
                        self.max_request_body
                    ),
                ));
            }
            Buffered::Trailers(_) => {
                return Ok(problem(
                    StatusCode::BAD_REQUEST,
                    "a request with an Idempotency-Key cannot carry trailers: \
                     they would not be part of its fingerprint",
                ));
            }
            Buffered::Broken(error) => {
                tracing::debug!(%error, "reading a request body failed");
                return Ok(problem(
                    StatusCode::BAD_REQUEST,
                    "the request body could not be read",
                ));
            }
        };
        let id = store_key(scope.as_deref(), &parts, &key);
        let fingerprint = fingerprint(&parts, &body);
        let request = Request::from_parts(parts, B::from(body));
        let limit = self.store.engine.max_result_size();
        let buffer_limit = self.max_response_body.unwrap_or(limit).min(limit);
        // The first client gets the response as the endpoint made it,
        // every header included; retries get what was cached.
        let mut original = None;
        let slot = &mut original;
        let handler = |lease: Lease| async move {
            let mut request = request;
            request.extensions_mut().insert(lease);
            let response = inner.call(request).await.map_err(NotCached::Service)?;
            let (cached, response) = cache(response, buffer_limit, limit).await?;
            *slot = Some(response);
            Ok(cached)
        };
        let outcome = self
            .store
            .once(&id, self.lease_ttl)
            .keep_result_for(self.retention.max(self.lease_ttl))
            .heartbeat(self.lease_ttl / 3, self.lease_ttl)
            .fingerprint(&fingerprint)
            .run(handler)
            .await;
        match outcome {
            Ok(Outcome::Ran(cached)) => Ok(original.unwrap_or_else(|| replay(cached, false))),
            Ok(Outcome::Replayed(cached)) => Ok(replay(cached, true)),
            Ok(Outcome::InProgress { .. }) => {
                let mut response = problem(
                    StatusCode::CONFLICT,
                    "a request with this Idempotency-Key is still being processed; retry later",
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                Ok(response)
            }
            Ok(Outcome::Conflict { .. }) => Ok(problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "this Idempotency-Key was used with another request payload",
            )),
            Ok(
                Outcome::Failed { error, .. }
                | Outcome::LeaseLost {
                    result: Err(error), ..
                },
            ) => match error {
                NotCached::Service(error) => Err(error),
                NotCached::Response(response) => Ok(response),
            },
            Ok(Outcome::LeaseLost {
                result: Ok(cached), ..
            }) => Ok(original.unwrap_or_else(|| replay(cached, false))),
            Ok(_) => Ok(problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the Idempotency-Key's record holds an outcome this endpoint did not write",
            )),
            Err(Error::UndecodableResult { .. } | Error::NoCachedResult { .. }) => Ok(problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the response recorded for this Idempotency-Key cannot be replayed",
            )),
            Err(
                error @ (Error::InvalidConfig(_)
                | Error::TtlTooShort { .. }
                | Error::TtlOverflow { .. }),
            ) => {
                tracing::error!(%error, "the idempotency layer is misconfigured");
                Ok(problem(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the idempotency layer is misconfigured",
                ))
            }
            Err(error) => {
                tracing::error!(%error, "the idempotency store failed");
                Ok(problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the idempotency store is unavailable; retry later",
                ))
            }
        }
    }
}

/// A request the layer does not cover, served as it is.
async fn pass<S, B, RB>(
    inner: &mut S,
    request: Request<B>,
) -> Result<Response<ResponseBody>, S::Error>
where
    S: tower_service::Service<Request<B>, Response = Response<RB>>,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let response = inner.call(request).await?;
    Ok(response.map(|body| body.map_err(Into::into).boxed_unsync()))
}

/// The request's key: `None` without the header, `Err` when it is not a
/// key (several headers, empty, too long, not visible ASCII). A key sent
/// as a structured-field string (`"…"`, as the IETF draft writes it) is
/// the same key as without its quotes.
fn idempotency_key<B>(request: &Request<B>) -> Result<Option<&[u8]>, &'static str> {
    let mut values = request.headers().get_all(&IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("the request carries more than one Idempotency-Key header");
    }
    let mut key = value.as_bytes();
    if let [b'"', inner @ .., b'"'] = key {
        key = inner;
    }
    if key.is_empty() {
        return Err("the Idempotency-Key header is empty");
    }
    if key.len() > MAX_KEY_LEN {
        return Err("the Idempotency-Key is longer than 255 bytes");
    }
    if !key
        .iter()
        .all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        return Err(
            "the Idempotency-Key must be visible ASCII characters, without quotes or backslashes",
        );
    }
    Ok(Some(key))
}

/// Feeds `fields` into a hash, each with its length, so that no two lists
/// of fields hash alike by moving a boundary.
fn hash(fields: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for field in fields {
        hasher.update((field.len() as u64).to_be_bytes());
        hasher.update(field);
    }
    hasher.finalize().into()
}

/// The store's key for an `Idempotency-Key`: scope, method, path and key,
/// hashed.
fn store_key(scope: Option<&str>, parts: &Parts, key: &[u8]) -> MessageId {
    let scope: &[u8] = match scope {
        None => b"unscoped",
        Some(scope) => &[b"scope:", scope.as_bytes()].concat(),
    };
    let digest = hash(&[
        b"sled-idempotency http key v1",
        scope,
        parts.method.as_str().as_bytes(),
        parts.uri.path().as_bytes(),
        key,
    ]);
    let mut id = [0; 16];
    id.copy_from_slice(&digest[..16]);
    MessageId::from_uuid(uuid::Uuid::from_bytes(id))
}

/// The request's fingerprint: method, path and query, and body, hashed.
fn fingerprint(parts: &Parts, body: &[u8]) -> [u8; 32] {
    let target = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |p| p.as_str());
    hash(&[
        b"sled-idempotency http fingerprint v1",
        parts.method.as_str().as_bytes(),
        target.as_bytes(),
        body,
    ])
}

/// Whether a response with `status` is the answer to its request, to be
/// replayed (module docs, "What is cached").
fn replayable(status: StatusCode) -> bool {
    !(status.is_server_error()
        || status.is_informational()
        || matches!(status.as_u16(), 408 | 409 | 425 | 429))
}

/// Whether a response header is replayed.
fn replayed_header(name: &HeaderName) -> bool {
    !(matches!(
        *name,
        header::CONNECTION
            | header::TRANSFER_ENCODING
            | header::TE
            | header::TRAILER
            | header::UPGRADE
            | header::CONTENT_LENGTH
            | header::DATE
            | header::SET_COOKIE
    ) || name.as_str() == "keep-alive"
        || name.as_str().starts_with("proxy-"))
}

/// The inner service's response as the store keeps it, or, when it is not
/// to be replayed, as the client gets it.
async fn cache<RB, Er>(
    response: Response<RB>,
    buffer_limit: usize,
    store_limit: usize,
) -> Result<(Cached, Response<ResponseBody>), NotCached<Er>>
where
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let (parts, body) = response.into_parts();
    if !replayable(parts.status) {
        return Err(NotCached::Response(Response::from_parts(
            parts,
            body.map_err(Into::into).boxed_unsync(),
        )));
    }
    let body = match buffer(body, buffer_limit).await {
        Buffered::Whole(body) => body,
        Buffered::Over(streamed) | Buffered::Trailers(streamed) => {
            return Err(NotCached::Response(Response::from_parts(
                parts,
                streamed.boxed_unsync(),
            )));
        }
        Buffered::Broken(error) => {
            tracing::warn!(%error, "the response body failed while it was buffered");
            return Err(NotCached::Response(problem(
                StatusCode::BAD_GATEWAY,
                "the endpoint's response body failed",
            )));
        }
    };
    let cached = Cached {
        status: parts.status.as_u16(),
        headers: parts
            .headers
            .iter()
            .filter(|(name, _)| replayed_header(name))
            .map(|(name, value)| (name.as_str().to_owned(), CachedBody::of(value.as_bytes())))
            .collect(),
        body: CachedBody::of(&body),
    };
    // The handler layer wraps the value in `{"ok":…}`: 7 bytes.
    let fits = |cached: &Cached| {
        serde_json::to_vec(cached).is_ok_and(|json| json.len() + 7 <= store_limit)
    };
    let response = Response::from_parts(parts, full(body));
    if fits(&cached) {
        Ok((cached, response))
    } else {
        Err(NotCached::Response(response))
    }
}

impl CachedBody {
    fn of(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => CachedBody::Text(text.to_owned()),
            Err(_) => CachedBody::Hex(hex::encode(bytes)),
        }
    }

    fn bytes(self) -> Option<Bytes> {
        match self {
            CachedBody::Text(text) => Some(Bytes::from(text)),
            CachedBody::Hex(hex) => hex::decode(hex).ok().map(Bytes::from),
        }
    }
}

/// A cached response as the client gets it, marked when it is a replay.
fn replay(cached: Cached, replayed: bool) -> Response<ResponseBody> {
    let unreadable = || {
        problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the response recorded for this Idempotency-Key cannot be replayed",
        )
    };
    let Some(body) = cached.body.bytes() else {
        return unreadable();
    };
    let mut response = Response::new(full(body));
    let Ok(status) = StatusCode::from_u16(cached.status) else {
        return unreadable();
    };
    *response.status_mut() = status;
    let headers = response.headers_mut();
    for (name, value) in cached.headers {
        let name = HeaderName::from_bytes(name.as_bytes());
        let value = value.bytes().map(HeaderValue::from_maybe_shared);
        match (name, value) {
            (Ok(name), Some(Ok(value))) => {
                headers.append(name, value);
            }
            _ => return unreadable(),
        }
    }
    if replayed {
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

/// A body of these bytes.
fn full(bytes: Bytes) -> ResponseBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The layer's own answer: a problem-details body (RFC 9457).
fn problem(status: StatusCode, detail: &str) -> Response<ResponseBody> {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut response = Response::new(full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// A body read up to a limit.
enum Buffered<B> {
    /// All of it.
    Whole(Bytes),
    /// Over the limit: what was read and the rest, as one body again.
    Over(Prefixed<B>),
    /// With trailers, which the layer does not keep: likewise.
    Trailers(Prefixed<B>),
    /// Reading it failed.
    Broken(BoxError),
}

/// Reads `body` whole if it has at most `limit` bytes and no trailers.
async fn buffer<B>(body: B, limit: usize) -> Buffered<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = Box::pin(body);
    let mut data = BytesMut::new();
    loop {
        let frame = match body.frame().await {
            None => return Buffered::Whole(data.freeze()),
            Some(Err(error)) => return Buffered::Broken(error.into()),
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(chunk) if data.len() + chunk.len() <= limit => data.extend_from_slice(&chunk),
            Ok(chunk) => {
                let frames = VecDeque::from([Frame::data(data.freeze()), Frame::data(chunk)]);
                return Buffered::Over(Prefixed { frames, rest: body });
            }
            Err(trailers) => {
                let frames = VecDeque::from([Frame::data(data.freeze()), trailers]);
                return Buffered::Trailers(Prefixed { frames, rest: body });
            }
        }
    }
}

/// The frames read from a body, then the rest of it.
struct Prefixed<B> {
    frames: VecDeque<Frame<Bytes>>,
    rest: Pin<Box<B>>,
}

impl<B> Body for Prefixed<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match this.frames.pop_front() {
            Some(frame) => Poll::Ready(Some(Ok(frame))),
            None => this.rest.as_mut().poll_frame(cx).map_err(Into::into),
        }
    }
}
