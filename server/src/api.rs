//! The HTTP API, protocol version 1 (see PROTOCOL.md).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use confluo_core::{check_change, ChangeSet, SiteId};

use crate::auth::Denied;
use crate::quota::OverQuota;
use crate::store::{Page, PushPart, Resume, SpaceState, StoreError};
use crate::App;
use confluo_core::coding;

pub const PROTOCOL_VERSION: &str = "1";
pub const PROTOCOL_HEADER: &str = "confluo-protocol";
pub const CHANGESET_TYPE: &str = "application/vnd.confluo.changeset";

/// An error as the API reports it: `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<Duration>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn bad(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(after) = self.retry_after {
            let secs = after.as_secs().max(1).to_string();
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from_str(&secs).expect("digits"));
        }
        resp
    }
}

impl From<Denied> for ApiError {
    fn from(d: Denied) -> Self {
        match d {
            Denied::Unauthenticated(m) => {
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m)
            }
            Denied::Forbidden(m) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", m),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::CursorGone { .. }
            | StoreError::EpochGone { .. }
            | StoreError::HistoryRewritten { .. } => {
                ApiError::new(StatusCode::GONE, "cursor_gone", e.to_string())
            }
            StoreError::BadInput(m) => ApiError::bad("invalid_changes", m),
            StoreError::Storage(m) => {
                tracing::error!(error = %m, "storage failure");
                ApiError {
                    retry_after: Some(Duration::from_secs(1)),
                    ..ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        "storage is unavailable; retry",
                    )
                }
            }
        }
    }
}

/// What a connection past the connection cap gets: `/healthz`, and a 503
/// with Retry-After for anything else.
pub fn overflow_router() -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(|| async {
            ApiError {
                retry_after: Some(Duration::from_secs(1)),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the server has as many connections as it serves; retry",
                )
            }
        })
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/spaces/{space}/sync", post(sync))
        .route("/v1/spaces/{space}/changes", get(changes))
        // After the routes: it applies to those registered before it.
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this method is not allowed here (see the Allow header)",
            )
        })
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            access_log,
        ))
        .with_state(app)
}

/// The address a request came from (set per connection by `serve`).
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// One log line per request: method, route (not the URI: no space names
/// or cursors), status, duration, client address. Never a header, so never
/// a token.
///
/// Answers that did not come through `respond` (health, unknown paths and
/// methods) are counted here, and get the server's clock too.
async fn access_log(
    State(app): State<Arc<App>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "(no route)".to_owned(), |m| m.as_str().to_owned());
    let client = req
        .extensions()
        .get::<ClientAddr>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    let mut resp = next.run(req).await;
    if !resp.headers().contains_key("confluo-server-time") {
        stamp_server_time(&mut resp);
        let counted = match route.as_str() {
            "/metrics" => None,
            "/healthz" => Some("healthz"),
            _ => Some("unmatched"),
        };
        if let Some(label) = counted {
            app.metrics.request(label, resp.status().as_u16());
        }
    }
    tracing::info!(
        target: "confluo_server::access",
        %method,
        route,
        status = resp.status().as_u16(),
        ms = started.elapsed().as_millis() as u64,
        client,
        "request"
    );
    resp
}

/// Logs a refused token at most once a second, with how many more were
/// refused since: a client hammering with a bad token cannot flood the log.
fn log_refused_token(status: StatusCode, message: &str) {
    use std::sync::atomic::AtomicU64;
    static LAST_SECOND: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if LAST_SECOND.swap(now, Ordering::Relaxed) == now {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let suppressed = SUPPRESSED.swap(0, Ordering::Relaxed);
    tracing::info!(
        status = status.as_u16(),
        reason = message,
        suppressed,
        "token refused (at most one line a second; `suppressed` counts the rest)"
    );
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    app.metrics.request("metrics", 200);
    let mut text = app.metrics.render();
    text.push_str(&format!(
        "# HELP confluo_watched_spaces Spaces with long polls waiting now.\n\
         # TYPE confluo_watched_spaces gauge\nconfluo_watched_spaces {}\n",
        app.watched_spaces()
    ));
    ([("content-type", "text/plain; version=0.0.4")], text)
}

#[derive(Clone, Default)]
struct PullParams {
    cursor: u64,
    /// Resume token from `Confluo-Resume`.
    after: Option<String>,
    /// The device's site id: its own changes are not sent back to it.
    site: Option<String>,
    /// Long-poll seconds (GET /changes only).
    wait: u64,
    /// The space epoch the device last saw (from `Confluo-Epoch`).
    epoch: Option<String>,
    /// The tag of the version at `cursor` (from `Confluo-Version-Tag`).
    tag: Option<String>,
    /// The version the device's last accepted push reached, and its tag
    /// (from `Confluo-Push-Tag`), while its cursor is still behind it.
    pushed_at: Option<u64>,
    pushed_tag: Option<String>,
    /// Whether the page may be compressed with zstd (from the request's
    /// `Accept-Encoding`, not the query).
    zstd: bool,
}

impl PullParams {
    /// Parses the query by hand rather than with axum's `Query`, whose
    /// refusals are plain text: every error of the API is JSON.
    fn parse(uri: &Uri) -> Result<PullParams, ApiError> {
        let bad = |m: String| ApiError::bad("invalid_query", m);
        let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri)
            .map_err(|_| bad("the query string is not valid URL encoding".into()))?;
        let mut p = PullParams::default();
        let mut seen = std::collections::HashSet::new();
        for (name, value) in pairs {
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| bad(format!("{name} must be a whole number, 0 or more")))
            };
            match name.as_str() {
                "cursor" => p.cursor = number()?,
                "wait" => p.wait = number()?,
                "pushed_at" => p.pushed_at = Some(number()?),
                "after" => p.after = Some(value),
                "site" => p.site = Some(value),
                "epoch" => p.epoch = Some(value),
                "tag" => p.tag = Some(value),
                "pushed_tag" => p.pushed_tag = Some(value),
                // Ignored, so that a newer device can talk to this server.
                _ => continue,
            }
            // Which of two values was meant is anyone's guess.
            if !seen.insert(name.clone()) {
                return Err(bad(format!("{name} is given more than once")));
            }
        }
        Ok(p)
    }
}

fn check_protocol(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers.get(PROTOCOL_HEADER).and_then(|v| v.to_str().ok()) {
        Some(PROTOCOL_VERSION) => Ok(()),
        Some(other) => Err(ApiError::bad(
            "unsupported_protocol",
            format!("protocol version {other:?} is not supported; this server speaks {PROTOCOL_VERSION}"),
        )),
        None => Err(ApiError::bad(
            "unsupported_protocol",
            format!("missing {PROTOCOL_HEADER} header (this server speaks {PROTOCOL_VERSION})"),
        )),
    }
}

fn check_space(space: &str) -> Result<(), ApiError> {
    // `.` and `..` would be resolved away by any proxy that normalises paths.
    let ok = !space.is_empty()
        && space != "."
        && space != ".."
        && space.len() <= 128
        && space
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad(
            "invalid_space",
            "space names are 1-128 characters of A-Z a-z 0-9 - _ . (not . or ..)",
        ))
    }
}

fn auth_header(headers: &HeaderMap) -> Option<&str> {
    headers.get("authorization").and_then(|v| v.to_str().ok())
}

fn parse_site(p: &PullParams) -> Result<Option<SiteId>, ApiError> {
    p.site
        .as_deref()
        .map(|s| {
            SiteId::parse(s).ok_or_else(|| ApiError::bad("invalid_site", "site must be a UUID"))
        })
        .transpose()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn encode_resume(r: &Resume) -> String {
    format!("{}.{}.{}", r.version, hex(r.table.as_bytes()), hex(&r.key))
}

fn decode_resume(s: &str) -> Result<Resume, ApiError> {
    let bad = || ApiError::bad("invalid_resume", "malformed resume token");
    let mut parts = s.split('.');
    let mut next = || parts.next().ok_or_else(bad);
    let version = next()?.parse().map_err(|_| bad())?;
    let table = String::from_utf8(unhex(next()?).ok_or_else(bad)?).map_err(|_| bad())?;
    let key = unhex(next()?).ok_or_else(bad)?;
    Ok(Resume {
        version,
        table,
        key,
    })
}

/// Reads the body, refusing one over the limit with 413, and one that does
/// not arrive in time (its length at the minimum rate, plus a base) with
/// 408, both as JSON.
async fn read_body(app: &App, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let limit = app.config.max_body_bytes;
    let length = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(limit)
        .min(limit);
    let deadline = app.config.body_deadline(length);
    match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request bodies are limited to {limit} bytes; split the push into parts"),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "too_slow",
            format!(
                "the request body did not arrive within {} s",
                deadline.as_secs()
            ),
        )),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    off_thread(move || f().map_err(ApiError::from)).await
}

/// Runs `f` on a blocking thread. A request's store work and encoding go
/// there together: each move to a blocking thread and back is two thread
/// switches, and a sync that made eight of them spent more time switching
/// than in SQLite.
async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
}

/// The body as sent, decoded from its content coding (none, or zstd); it
/// may decode to `max_body_bytes` at most. On a blocking thread.
fn decode_body(app: &App, headers: &HeaderMap, raw: Bytes) -> Result<Bytes, ApiError> {
    let coding = headers
        .get("content-encoding")
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase());
    match coding.as_deref() {
        None | Some("") | Some("identity") => Ok(raw),
        Some(coding::ZSTD) => {
            let limit = app.config.max_body_bytes;
            match coding::decompress(&raw, limit) {
                Ok(body) => Ok(body.into()),
                Err(coding::DecodeError::TooLarge { limit }) => Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("request bodies are limited to {limit} bytes once decoded; split the push into parts"),
                )),
                Err(coding::DecodeError::Malformed(m)) => Err(ApiError::bad(
                    "malformed",
                    format!("the body is not valid zstd: {m}"),
                )),
            }
        }
        Some(other) => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_encoding",
            format!("Content-Encoding {other:?} is not supported; send zstd or no encoding"),
        )),
    }
}

/// Whether the client takes its pages compressed with zstd.
fn wants_zstd(headers: &HeaderMap) -> bool {
    headers
        .get_all("accept-encoding")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(coding::accepts_zstd)
}

/// Decodes and validates a pushed change set: names, types, sizes, clocks.
fn validate_push(app: &App, body: &[u8]) -> Result<ChangeSet, ApiError> {
    // Too many changes is the request's size; a well-formed set can still
    // carry a value no device keeps (NaN): that is the changes' fault, not
    // the encoding's.
    let cs = ChangeSet::decode_at_most(body, app.config.max_changes).map_err(|e| match e {
        confluo_core::Error::InvalidInput(m) if m.contains("changes in one change set") => {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("{m}; split the push into parts"),
            )
        }
        confluo_core::Error::MalformedChangeSet(_) => ApiError::bad("malformed", e.to_string()),
        other => ApiError::bad("invalid_changes", other.to_string()),
    })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for (i, c) in cs.changes.iter().enumerate() {
        check_change(i, c, &app.config.limits, now, false, |_| false).map_err(|e| match e {
            confluo_core::Error::ClockDrift { .. } => ApiError::bad("clock_drift", e.to_string()),
            other => ApiError::bad("invalid_changes", other.to_string()),
        })?;
    }
    Ok(cs)
}

/// Refuses a push whose body is not a change set (415), so that a client
/// sending JSON, say, learns it at once rather than as `malformed`.
fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    match given {
        Some(t) if t.eq_ignore_ascii_case(CHANGESET_TYPE) => Ok(()),
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "a push's Content-Type must be {CHANGESET_TYPE}, not {}",
                other.map_or("none".into(), |t| format!("{t:?}"))
            ),
        )),
    }
}

fn push_part(headers: &HeaderMap) -> Result<Option<(String, u32, u32)>, ApiError> {
    let Some(id) = headers.get("confluo-push-id") else {
        // A part alone would be merged as a whole push, half of one.
        if headers.contains_key("confluo-push-part") {
            return Err(ApiError::bad(
                "invalid_push_part",
                "Confluo-Push-Part needs Confluo-Push-Id",
            ));
        }
        return Ok(None);
    };
    let bad = || {
        ApiError::bad(
            "invalid_push_part",
            "Confluo-Push-Id needs Confluo-Push-Part: i/n",
        )
    };
    let id = id.to_str().map_err(|_| bad())?;
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(bad());
    }
    let part = headers
        .get("confluo-push-part")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(bad)?;
    let (i, n) = part.split_once('/').ok_or_else(bad)?;
    let (i, n): (u32, u32) = (i.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
    if i == 0 || i > n || n > 10_000 {
        return Err(bad());
    }
    Ok(Some((id.to_owned(), i, n)))
}

/// A page as the answer: the encoded change set (compressed with zstd when
/// `zstd`, unless too short to gain from it), with its headers.
fn page_response(
    app: &App,
    page: Page,
    cursor: u64,
    extra: &[(&'static str, String)],
    zstd: bool,
) -> Response {
    let resume = page.resume.as_ref().map(encode_resume);
    let until_tag = page.until_tag.clone();
    let count = page.changes.len();
    let body = ChangeSet {
        source: app.store.server_site(),
        recipient: None,
        since: cursor,
        until: page.until,
        changes: page.changes,
    }
    .encode();
    let zstd = zstd && body.len() >= coding::MIN_COMPRESSED_BYTES;
    let body = if zstd { coding::compress(&body) } else { body };
    app.metrics
        .pulled_changes
        .fetch_add(count as u64, Ordering::Relaxed);
    app.metrics
        .bytes_out
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    let mut resp = ([("content-type", CHANGESET_TYPE)], body).into_response();
    let h = resp.headers_mut();
    // The page depends on the request's Accept-Encoding.
    h.insert("vary", HeaderValue::from_static("accept-encoding"));
    if zstd {
        h.insert("content-encoding", HeaderValue::from_static(coding::ZSTD));
    }
    h.insert(
        "confluo-more",
        HeaderValue::from_static(if page.more { "1" } else { "0" }),
    );
    if let Some(r) = resume {
        h.insert(
            "confluo-resume",
            HeaderValue::from_str(&r).expect("ascii token"),
        );
    }
    if let Some(tag) = until_tag {
        if let Ok(v) = HeaderValue::from_str(&tag) {
            h.insert("confluo-version-tag", v);
        }
    }
    for (name, value) in extra {
        h.insert(*name, HeaderValue::from_str(value).expect("ascii header"));
    }
    resp
}

/// The space of the path; axum's own refusal would be plain text.
fn space_of(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(space)| space)
        .map_err(|_| ApiError::bad("invalid_space", "the space name is not valid URL encoding"))
}

async fn sync(
    State(app): State<Arc<App>>,
    path: Result<Path<String>, PathRejection>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let counted = Counted::new(&app, "sync");
    let result = match space_of(path) {
        Ok(space) => sync_inner(&app, space, uri, headers, body).await,
        Err(e) => Err(e),
    };
    counted.respond(result)
}

/// One up on a gauge while it lives.
struct Gauge<'a>(&'a std::sync::atomic::AtomicI64);

impl<'a> Gauge<'a> {
    fn up(g: &'a std::sync::atomic::AtomicI64) -> Self {
        g.fetch_add(1, Ordering::Relaxed);
        Gauge(g)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request on its way to `requests_total`: counted with its status when
/// answered, and as 499 (nginx's "client closed request") when the client
/// hung up first and the request was dropped.
struct Counted<'a> {
    app: &'a App,
    route: &'static str,
    answered: bool,
}

impl<'a> Counted<'a> {
    fn new(app: &'a App, route: &'static str) -> Self {
        Counted {
            app,
            route,
            answered: false,
        }
    }

    fn respond(mut self, result: Result<Response, ApiError>) -> Response {
        self.answered = true;
        respond(self.app, self.route, result)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.app.metrics.request(self.route, 499);
        }
    }
}

fn respond(app: &App, route: &'static str, result: Result<Response, ApiError>) -> Response {
    let mut resp = result.unwrap_or_else(|e| {
        if e.status == StatusCode::UNAUTHORIZED {
            log_refused_token(e.status, &e.message);
        } else if e.status.is_client_error() {
            tracing::info!(route, status = e.status.as_u16(), code = e.code, message = %e.message, "request refused");
        }
        e.into_response()
    });
    app.metrics.request(route, resp.status().as_u16());
    stamp_server_time(&mut resp);
    // Pushes may come compressed (RFC 7694): said in every answer, so that
    // a device learns it from its first request, whatever the answer (the
    // parts of a device's first push are answered 202, not with a page).
    resp.headers_mut()
        .insert("accept-encoding", HeaderValue::from_static(coding::ZSTD));
    resp
}

/// The server's clock, so a device can tell that its own is wrong.
fn stamp_server_time(resp: &mut Response) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    resp.headers_mut()
        .insert("confluo-server-time", HeaderValue::from(now_ms));
}

async fn sync_inner(
    app: &Arc<App>,
    space: String,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // The token is checked before the body is read, so nobody without one
    // can make the server buffer a large body; write access once we know
    // there is something to write.
    let user = admit(app, &space, &headers)?;
    let params = PullParams {
        zstd: wants_zstd(&headers),
        ..PullParams::parse(&uri)?
    };
    let raw = read_body(app, &headers, body).await?;
    let app = app.clone();
    off_thread(move || sync_with_body(&app, &space, &user, &params, &headers, raw)).await
}

/// The rest of a sync request once its body is in, on one blocking thread:
/// decoding, checks, the push, and the page that answers it.
fn sync_with_body(
    app: &App,
    space: &str,
    user: &str,
    params: &PullParams,
    headers: &HeaderMap,
    raw: Bytes,
) -> Result<Response, ApiError> {
    let wire_bytes = raw.len();
    let body = decode_body(app, headers, raw)?;
    if !body.is_empty() {
        app.auth.check(auth_header(headers), space, true)?;
        app.meter
            .push(user, body.len() as u64, std::time::Instant::now())
            .map_err(over_quota)?;
        check_content_type(headers)?;
    }
    app.metrics
        .bytes_in
        .fetch_add(wire_bytes as u64, Ordering::Relaxed);
    let mut exclude = parse_site(params)?;
    let resume = params.after.as_deref().map(decode_resume).transpose()?;
    // A device whose cursor or epoch is from a history we no longer have
    // must resync first; its push is not merged, so it is sent again after.
    let state = history_of(app, space, params)?;
    let mut extra = Vec::new();
    // Where the answer's page starts reading: past this push's own version
    // when the device was current before it (see below).
    let mut from = params.cursor;
    if !body.is_empty() {
        let validated = validate_push(app, &body)?;
        let (source, pushed) = (validated.source, validated.changes.len());
        exclude = exclude.or(Some(source));
        let staged = match push_part(headers)? {
            Some((id, i, n)) => {
                if i < n {
                    app.store.stage(space, source, &id, i, &body)?;
                    return Ok((
                        StatusCode::ACCEPTED,
                        Json(serde_json::json!({"staged": i, "of": n})),
                    )
                        .into_response());
                }
                // The last part: merge the staged parts and this one together.
                let Some(parts) = app.store.take_staged(space, &id, n)? else {
                    return Err(ApiError::bad(
                        "invalid_push_part",
                        format!("push is missing some of its {n} parts; send them all again"),
                    ));
                };
                parts
            }
            None => Vec::new(),
        };
        // This part was decoded by its validation: not decoded again.
        let mut parts: Vec<PushPart<'_>> = staged.iter().map(|p| PushPart::Encoded(p)).collect();
        parts.push(PushPart::Decoded(validated));
        let outcome = app.store.push_parts(space, parts)?;
        app.metrics
            .pushed_changes
            .fetch_add(pushed as u64, Ordering::Relaxed);
        if outcome.applied > 0 {
            app.metrics.versions.fetch_add(1, Ordering::Relaxed);
            app.notify(space, outcome.version);
        }
        tracing::debug!(
            space,
            version = outcome.version,
            applied = outcome.applied,
            stale = outcome.stale,
            "push merged"
        );
        extra.push(("confluo-server-version", outcome.version.to_string()));
        if let Some(tag) = outcome.tag {
            extra.push(("confluo-push-tag", tag));
        }
        extra.push(("confluo-applied", outcome.applied.to_string()));
        // A device that had every version before its push has nothing to
        // learn from the push's own: that version holds only the cells of
        // its changes that won. Reading them back only to leave them out
        // (the whole push, for a large one) is skipped.
        if resume.is_none() && params.cursor == outcome.previous {
            from = outcome.version;
        }
    }
    page_after(app, space, params, from, resume, exclude, state, extra)
}

/// The checks every request of a space passes first: protocol version,
/// space name, and a token that may read the space.
fn admit(app: &App, space: &str, headers: &HeaderMap) -> Result<String, ApiError> {
    check_protocol(headers)?;
    check_space(space)?;
    let grant = app.auth.check(auth_header(headers), space, false)?;
    app.meter
        .request(&grant.user, space, std::time::Instant::now())
        .map_err(over_quota)?;
    Ok(grant.user)
}

/// 429 with Retry-After, naming the quota.
fn over_quota(q: OverQuota) -> ApiError {
    let secs = q.retry_after.as_secs().max(1);
    ApiError {
        retry_after: Some(Duration::from_secs(secs)),
        ..ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            format!("over this token's quota of {}; retry in {secs} s", q.what),
        )
    }
}

/// Answers with the page of changes after the request's cursor, read from
/// version `from` on (the cursor, or past versions the device already has).
/// On a blocking thread.
#[allow(clippy::too_many_arguments)]
fn page_after(
    app: &App,
    space: &str,
    params: &PullParams,
    from: u64,
    resume: Option<Resume>,
    exclude: Option<SiteId>,
    state: Option<SpaceState>,
    mut extra: Vec<(&'static str, String)>,
) -> Result<Response, ApiError> {
    let page = app
        .store
        .pull(space, from, resume.as_ref(), exclude, app.config.page_bytes)?;
    // An epoch never changes once the space exists; only when it did not
    // (a push may just have created it) is it looked up.
    let state = match state {
        Some(s) => Some(s),
        None => app.store.space(space)?,
    };
    extra.extend(state.map(|s| ("confluo-epoch", s.epoch)));
    Ok(page_response(app, page, params.cursor, &extra, params.zstd))
}

/// Refuses (410) a device whose cursor or epoch belongs to a history this
/// space no longer has.
async fn check_history(
    app: &Arc<App>,
    space: &str,
    params: &PullParams,
) -> Result<Option<SpaceState>, ApiError> {
    let (app, space, params) = (app.clone(), space.to_owned(), params.clone());
    off_thread(move || history_of(&app, &space, &params)).await
}

/// `check_history`, on a blocking thread.
fn history_of(app: &App, space: &str, params: &PullParams) -> Result<Option<SpaceState>, ApiError> {
    let state = app.store.space(space)?;
    if let Some(known) = &params.epoch {
        if state.as_ref().is_none_or(|s| s.epoch != *known) {
            return Err(StoreError::EpochGone {
                known: known.clone(),
            }
            .into());
        }
    }
    let version = state.as_ref().map_or(0, |s| s.version);
    if params.cursor > version {
        return Err(StoreError::CursorGone {
            cursor: params.cursor,
            version,
        }
        .into());
    }
    // The versions the device knows by their tags: its cursor, and where
    // its last accepted push landed (a restore between the two would lose
    // that push without a word).
    let claims = [
        (params.cursor, &params.tag),
        (params.pushed_at.unwrap_or(0), &params.pushed_tag),
    ];
    for (at, known) in claims {
        let Some(known) = known.as_ref().filter(|_| at > 0) else {
            continue;
        };
        if at > version {
            return Err(StoreError::CursorGone {
                cursor: at,
                version,
            }
            .into());
        }
        let tag = app.store.version_tag(space, at)?;
        if tag.is_some_and(|t| t != *known) {
            return Err(StoreError::HistoryRewritten { cursor: at }.into());
        }
    }
    Ok(state)
}

async fn changes(
    State(app): State<Arc<App>>,
    path: Result<Path<String>, PathRejection>,
    request: axum::extract::Request,
) -> Response {
    let counted = Counted::new(&app, "changes");
    let result = match space_of(path) {
        Ok(space) => changes_inner(&app, space, request).await,
        Err(e) => Err(e),
    };
    counted.respond(result)
}

/// Takes the whole request (not its headers and URI as extractors, which
/// clone them and leave the originals with the handler) so that a long
/// poll keeps none of it while it waits: thousands of idle polls each held
/// a kilobyte or two of headers.
async fn changes_inner(
    app: &Arc<App>,
    space: String,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let (parts, _no_body) = request.into_parts();
    admit(app, &space, &parts.headers)?;
    let params = PullParams {
        zstd: wants_zstd(&parts.headers),
        ..PullParams::parse(&parts.uri)?
    };
    drop(parts);
    let exclude = parse_site(&params)?;
    let resume = params.after.as_deref().map(decode_resume).transpose()?;
    let state = check_history(app, &space, &params).await?;
    let extra = Vec::new();
    let wait = Duration::from_secs(params.wait).min(app.config.max_wait);
    if resume.is_none() && !wait.is_zero() {
        // Subscribe before looking, so a push committing in between is seen.
        let mut watch = app.subscribe(&space);
        let deadline = tokio::time::Instant::now() + wait;
        let mut shutdown = app.shutdown.clone();
        // Counted down when the wait ends, or when the client hangs up and
        // the request is dropped.
        let mut waiting = None;
        loop {
            let (store, sp) = (app.store.clone(), space.clone());
            let version = blocking(move || store.space(&sp))
                .await?
                .map_or(0, |s| s.version);
            // A wake is a hint (a re-check of a shared store wakes polls
            // that have nothing new): the space's version decides.
            if version != params.cursor {
                break;
            }
            waiting.get_or_insert_with(|| Gauge::up(&app.metrics.long_polls));
            tokio::select! {
                _ = watch.changed() => {}
                _ = tokio::time::sleep_until(deadline) => break,
                _ = shutdown.changed() => break,
            }
        }
    }
    let app = app.clone();
    off_thread(move || {
        page_after(
            &app,
            &space,
            &params,
            params.cursor,
            resume,
            exclude,
            state,
            extra,
        )
    })
    .await
}
