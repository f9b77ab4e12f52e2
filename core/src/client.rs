//! The device side of protocol v1: `sync_now` pushes what the server lacks
//! and pulls what it has, over HTTP (ureq, rustls), with a timeout on every
//! request.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::callbacks::guarded;
use crate::changeset::ChangeSet;
use crate::coding::{self, ZSTD};
use crate::db::Database;
use crate::error::{Error, Result};
use crate::server_state::{AcceptedPush, Standing};

pub const PROTOCOL_VERSION: &str = "1";
const CHANGESET_TYPE: &str = "application/vnd.confluo.changeset";

/// Supplies the bearer token for each request, so apps can refresh
/// expiring tokens. Called on the thread that runs the sync, or on the
/// helper thread that fetches a long pull's pages ahead.
pub trait TokenProvider: Send + Sync + 'static {
    fn token(&self) -> std::result::Result<String, String>;

    /// Called once after the server refused the last token (401): the
    /// token the provider holds is stale, fetch a new one. The request is
    /// sent again with it; if that is refused too, the sync fails with
    /// `Error::Auth` (background sync then waits for `sync_soon`).
    fn refreshed_token(&self) -> std::result::Result<String, String> {
        self.token()
    }
}

/// A token that never changes.
pub struct StaticToken(pub String);

impl TokenProvider for StaticToken {
    fn token(&self) -> std::result::Result<String, String> {
        Ok(self.0.clone())
    }
}

/// Hears how a sync is going (see `SyncConfig::progress`).
pub type ProgressListener = Arc<dyn Fn(&SyncReport) + Send + Sync>;

/// Where and how to sync.
#[derive(Clone)]
pub struct SyncConfig {
    /// The server's base URL, e.g. `https://sync.example.com`.
    pub server_url: String,
    pub space: String,
    pub token: Arc<dyn TokenProvider>,
    /// Timeout of each request (a long poll adds its wait).
    pub request_timeout: Duration,
    /// Pushes larger than this, or with more changes than
    /// `max_request_changes`, go in several requests, merged by the server
    /// as one.
    pub max_request_bytes: usize,
    pub max_request_changes: usize,
    /// How long a long poll waits on the server.
    pub long_poll: Duration,
    /// Background sync waits this long after the last local commit.
    pub debounce: Duration,
    /// Background sync's retry delays after failures.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Told how a sync is going after each request (a push part sent, a
    /// page pulled), for a progress display.
    pub progress: Option<ProgressListener>,
    /// Set it (from any thread) to cancel a `sync_now` in flight: no
    /// request starts after that, nothing more is applied, and the sync
    /// fails with `Error::Cancelled`. A request already sent is not cut
    /// short (its timeout bounds it): in a pull of many pages, that can be
    /// the next page's, fetched while one is applied.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Background sync only: whether the platform says the network is up
    /// when it starts (later hints go to `BackgroundSync::set_online`).
    pub online_at_start: bool,
}

impl SyncConfig {
    pub fn new(
        server_url: impl Into<String>,
        space: impl Into<String>,
        token: impl Into<String>,
    ) -> Self {
        Self::with_token_provider(server_url, space, Arc::new(StaticToken(token.into())))
    }

    pub fn with_token_provider(
        server_url: impl Into<String>,
        space: impl Into<String>,
        token: Arc<dyn TokenProvider>,
    ) -> Self {
        SyncConfig {
            server_url: server_url.into().trim_end_matches('/').to_owned(),
            space: space.into(),
            token,
            request_timeout: Duration::from_secs(30),
            max_request_bytes: 8 << 20,
            max_request_changes: 100_000,
            long_poll: Duration::from_secs(25),
            debounce: Duration::from_millis(200),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            progress: None,
            cancel: None,
            online_at_start: true,
        }
    }
}

impl std::fmt::Debug for SyncConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncConfig")
            .field("server_url", &self.server_url)
            .field("space", &self.space)
            .finish_non_exhaustive()
    }
}

/// What one `sync_now` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Changes sent to the server.
    pub pushed: usize,
    /// Changes received from the server.
    pub pulled: usize,
    /// Received changes that won and are now in this database.
    pub applied: usize,
    /// Received changes this database could not apply, kept aside (see
    /// `Database::rejected_changes`).
    pub rejected: usize,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration: Duration,
    /// The server's clock minus this device's, in milliseconds, as of the
    /// last answer (give or take the round trip). Far from zero means this
    /// device's clock is wrong: its changes still sync, but a clock more
    /// than the server's drift limit ahead gets its pushes refused.
    pub clock_offset_ms: Option<i64>,
    /// The server's clock in its last answer (unix milliseconds).
    #[doc(hidden)]
    pub server_time_ms: Option<u64>,
}

/// How the server answered a request.
pub(crate) enum Reply {
    Page(Box<Page>),
    /// A part of a multi-request push was staged (202).
    Staged,
    /// Our cursor is beyond the server's history (410): pull from scratch.
    Gone,
}

/// Whether a sync round finished or must start over from cursor 0.
enum Round {
    Done,
    Gone,
}

/// A page of changes as the server sent it.
pub(crate) struct Page {
    pub changes: ChangeSet,
    /// `changes` as the server encoded them (what is kept when the page is
    /// staged).
    pub encoded: Vec<u8>,
    pub more: bool,
    pub resume: Option<String>,
    /// The space's epoch, when the server named it.
    pub epoch: Option<String>,
    /// The tag of version `until` (see PROTOCOL.md: restores are noticed).
    pub tag: Option<String>,
    /// For a push: the version it reached, and that version's tag.
    pub push: Option<(u64, String)>,
}

/// Who is asking: the device's site id (its own changes are not sent back)
/// and the epoch of the space history it follows (a wiped and regrown space
/// answers 410).
pub(crate) struct Ident {
    pub site: String,
    pub epoch: Option<String>,
    /// Where our last accepted push landed on the server, and that
    /// version's tag: a server restored to before it answers 410 even
    /// while our cursor is still behind it.
    pub pushed: Option<(u64, String)>,
}

impl Ident {
    /// Adds who is asking and where its history stands to a request: its
    /// site, its cursor with that version's tag, the space epoch, and where
    /// its last accepted push landed while the cursor is behind it.
    fn position<B>(
        &self,
        mut req: ureq::RequestBuilder<B>,
        cursor: u64,
        tag: Option<&str>,
    ) -> ureq::RequestBuilder<B> {
        req = req
            .query("cursor", cursor.to_string())
            .query("site", &self.site);
        if let Some(tag) = tag {
            req = req.query("tag", tag);
        }
        if let Some(epoch) = &self.epoch {
            req = req.query("epoch", epoch);
        }
        if let Some((at, tag)) = self.pushed.as_ref().filter(|(at, _)| *at > cursor) {
            req = req
                .query("pushed_at", at.to_string())
                .query("pushed_tag", tag);
        }
        req
    }

    pub fn new(db: &Database, standing: &Standing) -> Ident {
        Ident {
            site: db.site_id().to_string(),
            epoch: standing.epoch.clone(),
            pushed: standing.pushed_to.clone(),
        }
    }
}

pub(crate) struct Client {
    agent: ureq::Agent,
    config: SyncConfig,
    /// Whether a 401 asks the provider for a fresh token (see `authorized`).
    refresh_on_401: bool,
    /// A refreshed token was refused in this sync: no second refresh.
    refresh_refused: AtomicBool,
}

fn network(message: impl Into<String>, retryable: bool) -> Error {
    Error::Network {
        message: message.into(),
        retryable,
        retry_after: None,
    }
}

/// One HTTP agent for the process, so connections to the server are kept
/// alive and reused across syncs (timeouts are set on each request), and
/// server names are looked up once a minute (see `resolve`).
fn shared_agent() -> ureq::Agent {
    static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
    AGENT
        .get_or_init(|| {
            let config = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_connect(Some(Duration::from_secs(10)))
                .max_idle_connections(64)
                .max_idle_connections_per_host(64)
                .tls_config(
                    ureq::tls::TlsConfig::builder()
                        .root_certs(crate::trust::root_certs())
                        .build(),
                )
                .build();
            ureq::Agent::with_parts(
                config,
                ureq::unversioned::transport::DefaultConnector::default(),
                crate::resolve::CachingResolver::default(),
            )
        })
        .clone()
}

impl Client {
    pub fn new(config: SyncConfig) -> Client {
        Client {
            agent: shared_agent(),
            config,
            refresh_on_401: true,
            refresh_refused: AtomicBool::new(false),
        }
    }

    /// A client that takes a 401 as it is: background sync's long poll,
    /// so that one refused token makes one refresh (the worker's), not one
    /// per thread.
    pub fn without_token_refresh(config: SyncConfig) -> Client {
        Client {
            refresh_on_401: false,
            ..Client::new(config)
        }
    }

    fn cancelled(&self) -> bool {
        self.config
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
    }

    fn unless_cancelled<T>(&self, outcome: Result<T>) -> Result<T> {
        if self.cancelled() {
            Err(Error::Cancelled)
        } else {
            outcome
        }
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}/v1/spaces/{}/{path}",
            self.config.server_url, self.config.space
        )
    }

    /// The authorization header; `refresh` after the server refused the
    /// last token.
    fn auth(&self, refresh: bool) -> Result<String> {
        let provider = &self.config.token;
        // A provider that panics is a failure to supply a token, not the
        // end of the sync thread.
        let token = guarded("the token provider", || {
            if refresh {
                provider.refreshed_token()
            } else {
                provider.token()
            }
        })
        .unwrap_or_else(|| Err("the token provider panicked".into()))
        .map_err(|e| Error::Auth(format!("no token: {e}")))?;
        Ok(format!("Bearer {token}"))
    }

    /// Sends a request (again on a lost connection, see
    /// `resend_on_lost_connection`) with the provider's token, and once
    /// more with a refreshed token if the server refused it (401).
    fn authorized(
        &self,
        mut send: impl FnMut(&str, bool) -> Result<Answer, ureq::Error>,
    ) -> Result<Answer> {
        // Checked after the token too: a provider may take a while, and
        // no request starts once cancelled. A request that fails after a
        // cancel reports the cancel, not the failure it caused.
        if self.cancelled() {
            return Err(Error::Cancelled);
        }
        crate::trust::check_ready(&self.config.server_url)?;
        let auth = self.unless_cancelled(self.auth(false))?;
        let answer =
            self.unless_cancelled(resend_on_lost_connection(|fresh| send(&auth, fresh)))?;
        if answer.status != 401
            || !self.refresh_on_401
            || self.refresh_refused.load(Ordering::SeqCst)
        {
            return Ok(answer);
        }
        let auth = self.unless_cancelled(self.auth(true))?;
        let answer =
            self.unless_cancelled(resend_on_lost_connection(|fresh| send(&auth, fresh)))?;
        self.refresh_refused
            .store(answer.status == 401, Ordering::SeqCst);
        Ok(answer)
    }

    /// Turns a response into a page or a typed error.
    fn read_page(&self, answer: Answer, report: &mut SyncReport) -> Result<Reply> {
        let Answer {
            status,
            headers,
            body,
        } = answer;
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        if let Some(t) = header("confluo-server-time").and_then(|t| t.parse().ok()) {
            report.server_time_ms = Some(t);
        }
        report.bytes_received += body.len() as u64;
        let body = if header("content-encoding").is_some_and(|c| c.eq_ignore_ascii_case(ZSTD)) {
            coding::decompress(&body, MAX_ANSWER_BYTES).map_err(|e| {
                Error::MalformedChangeSet(format!("the server's zstd answer: {e:?}"))
            })?
        } else {
            body
        };
        if header("accept-encoding").is_some_and(|h| coding::accepts_zstd(&h)) {
            remember_zstd(&self.config.server_url, true);
        }
        match status {
            200 => Ok(Reply::Page(Box::new(Page {
                changes: ChangeSet::decode(&body)?,
                encoded: body,
                more: header("confluo-more").as_deref() == Some("1"),
                resume: header("confluo-resume"),
                epoch: header("confluo-epoch"),
                tag: header("confluo-version-tag"),
                push: header("confluo-server-version")
                    .and_then(|v| v.parse().ok())
                    .zip(header("confluo-push-tag")),
            }))),
            202 => Ok(Reply::Staged),
            410 => Ok(Reply::Gone),
            _ => {
                let retry_after = header("retry-after")
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                Err(status_error(status, &body, retry_after))
            }
        }
    }

    /// `body` compressed, for a server that said it takes zstd, when there
    /// is something to gain.
    fn packed(&self, body: &[u8]) -> Option<Vec<u8>> {
        (body.len() >= coding::MIN_COMPRESSED_BYTES && takes_zstd(&self.config.server_url))
            .then(|| coding::compress(body))
    }

    /// Posts `body` to the sync endpoint, as `packed` (its compressed form)
    /// when the caller made it, else compressed here if the server takes
    /// zstd; `part` names it in a multi-request push.
    #[allow(clippy::too_many_arguments)]
    fn post_sync(
        &self,
        cursor: u64,
        tag: Option<&str>,
        who: &Ident,
        body: &[u8],
        packed: Option<Vec<u8>>,
        part: Option<(&str, usize, usize)>,
        report: &mut SyncReport,
    ) -> Result<Reply> {
        // A part prepared before the answer that said the server takes zstd
        // (a first push) is compressed now.
        let packed = packed.or_else(|| self.packed(body));
        // Safe to send twice: merging is idempotent, and a part staged
        // twice is kept once.
        let answer = self.authorized(|auth, fresh| {
            let mut req = who
                .position(self.agent.post(self.url("sync")), cursor, tag)
                .header("authorization", auth)
                .header("confluo-protocol", PROTOCOL_VERSION)
                .header("content-type", CHANGESET_TYPE)
                .header("accept-encoding", ZSTD);
            if packed.is_some() {
                req = req.header("content-encoding", ZSTD);
            }
            if let Some((id, i, n)) = part {
                req = req
                    .header("confluo-push-id", id)
                    .header("confluo-push-part", format!("{i}/{n}"));
            }
            let sent = packed.as_deref().unwrap_or(body);
            report.bytes_sent += sent.len() as u64;
            receive(configure(req.config(), self.config.request_timeout, fresh).send(sent)?)
        })?;
        if packed.is_some() && answer.status == 415 {
            // The server behind this address no longer takes zstd (another
            // server, or an older one): send it plain from now on.
            remember_zstd(&self.config.server_url, false);
            return self.post_sync(cursor, tag, who, body, None, part, report);
        }
        self.read_page(answer, report)
    }

    /// A pull without a push; waits up to `wait` for news when `wait` > 0.
    pub fn get_changes(
        &self,
        cursor: u64,
        tag: Option<&str>,
        who: &Ident,
        resume: Option<&str>,
        wait: Duration,
        report: &mut SyncReport,
    ) -> Result<Reply> {
        let answer = self.authorized(|auth, fresh| {
            let mut req = who
                .position(self.agent.get(self.url("changes")), cursor, tag)
                .query("wait", wait.as_secs().to_string())
                .header("authorization", auth)
                .header("confluo-protocol", PROTOCOL_VERSION)
                .header("accept-encoding", ZSTD);
            if let Some(r) = resume {
                req = req.query("after", r);
            }
            let timeout = self.config.request_timeout + wait;
            receive(configure(req.config(), timeout, fresh).call()?)
        })?;
        self.read_page(answer, report)
    }

    /// Pushes, then pulls and applies until caught up. Syncs of one
    /// database run one at a time: two at once would each move the cursor
    /// and push mark under the other, and one's resync from scratch (after
    /// a 410) would pull the history out from under the other. The long
    /// poll does not wait for this: it only reads.
    pub fn sync(&self, db: &Database) -> Result<SyncReport> {
        let _one_at_a_time = db.inner.sync_round.lock().ok_or_else(|| {
            Error::invalid(
                "this thread is already syncing this database (sync_now from a change listener?)",
            )
        })?;
        let started = Instant::now();
        let mut report = SyncReport::default();
        // One refresh per sync at most (the push and the pull would each
        // ask again for a token the server refuses).
        self.refresh_refused.store(false, Ordering::SeqCst);
        let (standing, outgoing) = db.standing_and_outgoing()?;
        if standing.space.as_deref() != Some(self.config.space.as_str()) {
            db.bind_space(&self.config.space)?;
        }
        let confirmed = standing.confirmed;
        if let Round::Gone = self.round(db, standing, outgoing, &mut report)? {
            // The server no longer has the history our cursor points into:
            // pull everything again and push all of ours (see
            // `reset_server_cursor`). Nothing unsent is lost.
            db.reset_server_cursor()?;
            let (standing, outgoing) = db.standing_and_outgoing()?;
            if let Round::Gone = self.round(db, standing, outgoing, &mut report)? {
                return Err(network(
                    "the server keeps losing its history (410 twice)",
                    true,
                ));
            }
        }
        if !confirmed {
            db.confirm_space()?;
        }
        report.duration = started.elapsed();
        report.clock_offset_ms = report
            .server_time_ms
            .map(|t| t as i64 - db.options().time.now_ms() as i64);
        log::debug!(
            "synced with space {:?}: pushed {}, pulled {}, applied {} in {:?}",
            self.config.space,
            report.pushed,
            report.pulled,
            report.applied,
            report.duration
        );
        Ok(report)
    }

    /// Pushes `outgoing` and pulls from where `standing` says this
    /// database stands (both read in one snapshot: see
    /// `Database::standing_and_outgoing`).
    fn round(
        &self,
        db: &Database,
        standing: Standing,
        outgoing: ChangeSet,
        report: &mut SyncReport,
    ) -> Result<Round> {
        let who = &Ident::new(db, &standing);
        let (cursor, tag) = (standing.cursor, standing.cursor_tag);
        let mut accepted = None;
        let first = if outgoing.is_empty() {
            // Only changes that came from the server lie between the last
            // push and now: nothing to send, but the mark moves past them.
            if outgoing.until > outgoing.since {
                db.mark_pushed(outgoing.until)?;
            }
            None
        } else {
            match self.push(db, &outgoing, (cursor, tag.as_deref()), who, report) {
                Ok(Reply::Page(mut page)) => {
                    // The server has it: only now is it marked as sent, with
                    // the page that answers it.
                    accepted = Some(AcceptedPush {
                        until: outgoing.until,
                        at: page.push.take(),
                    });
                    report.pushed += outgoing.changes.len();
                    Some(page)
                }
                Ok(Reply::Gone) => return Ok(Round::Gone),
                Ok(Reply::Staged) => {
                    return Err(network("the server staged the last part of a push", true))
                }
                Err(refused @ (Error::Auth(_) | Error::InvalidInput(_))) => {
                    // The server will not take our changes (a read-only token,
                    // a value over its limits): still take everyone else's,
                    // then report why ours stay unsent.
                    if let Round::Gone = self.pull(db, None, who, (cursor, tag), None, report)? {
                        return Ok(Round::Gone);
                    }
                    return Err(refused);
                }
                Err(e) => return Err(e),
            }
        };
        self.pull(db, first, who, (cursor, tag), accepted, report)
    }

    fn push(
        &self,
        db: &Database,
        outgoing: &ChangeSet,
        (cursor, tag): (u64, Option<&str>),
        who: &Ident,
        report: &mut SyncReport,
    ) -> Result<Reply> {
        let ranges = match split(
            outgoing,
            self.config.max_request_bytes,
            self.config.max_request_changes,
        ) {
            Parts::One(body) => return self.post_sync(cursor, tag, who, &body, None, None, report),
            Parts::Many(ranges) => ranges,
        };
        let n = ranges.len();
        // The same changes go under the same id, however often they are
        // sent again (and whichever handle on this file sends them), so a
        // retry replaces what the server staged; other changes, another id.
        let site: String = db
            .site_id()
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let id = format!("{site}-{}-{}", outgoing.since, outgoing.until);
        // Each part is encoded and compressed on a helper thread while the
        // one before it is on its way: the device's work and the server's
        // (and the network's round trip) overlap. One part waits at most.
        std::thread::scope(|scope| {
            let (next, parts) = std::sync::mpsc::sync_channel(1);
            scope.spawn(move || {
                for range in ranges {
                    let body = outgoing.part(range).encode();
                    let packed = self.packed(&body);
                    // Gone: the push stopped (an error), so no more parts.
                    if next.send((body, packed)).is_err() {
                        return;
                    }
                }
            });
            for (i, (body, packed)) in parts.into_iter().enumerate() {
                let part = Some((id.as_str(), i + 1, n));
                let reply = self.post_sync(cursor, tag, who, &body, packed, part, report)?;
                self.tell_progress(report);
                match reply {
                    Reply::Staged if i + 1 < n => continue,
                    reply => return Ok(reply),
                }
            }
            Err(network("a push with no parts", false))
        })
    }

    fn tell_progress(&self, report: &SyncReport) {
        if let Some(progress) = &self.config.progress {
            crate::callbacks::guarded("a sync progress listener", || progress(report));
        }
    }

    /// Applies pages until the server has nothing more. A version split over
    /// several pages is applied once complete, in one transaction.
    /// `(cursor, tag)`: where this database stands, as the push (if any)
    /// told the server.
    fn pull(
        &self,
        db: &Database,
        first: Option<Box<Page>>,
        who: &Ident,
        (cursor, tag): (u64, Option<String>),
        accepted: Option<AcceptedPush>,
        report: &mut SyncReport,
    ) -> Result<Round> {
        let mut from = PullFrom {
            cursor,
            tag,
            resume: None,
        };
        let mut store = PageStore {
            cursor,
            tag: from.tag.clone(),
            staged: 0,
            accepted,
        };
        let page = match first {
            Some(page) => page,
            None => match self.fetch_page(&from, who, report)? {
                Some(page) => page,
                None => return Ok(Round::Gone),
            },
        };
        from.past(&page);
        if !page.more {
            store.take((self, db, who), *page, report)?;
            return Ok(Round::Done);
        }
        // More pages: each is fetched on a helper thread while the one
        // before it is stored or applied, so the server's work (and the
        // round trip) overlaps the device's. At most one page waits, so
        // memory stays bounded by a few pages, whatever the version. When
        // storing fails, the sync ends once the request in flight does.
        std::thread::scope(|scope| {
            let (next, pages) = std::sync::mpsc::sync_channel(1);
            scope.spawn(move || loop {
                let mut received = SyncReport::default();
                let fetched = self.fetch_page(&from, who, &mut received);
                let more = match &fetched {
                    Ok(Some(page)) => {
                        from.past(page);
                        page.more
                    }
                    _ => false,
                };
                // Gone: the pull stopped (an error), so no more pages.
                if next.send((fetched, received)).is_err() || !more {
                    return;
                }
            });
            store.take((self, db, who), *page, report)?;
            for (fetched, received) in pages {
                // A page fetched before a cancel is not stored after it.
                if self.cancelled() {
                    return Err(Error::Cancelled);
                }
                report.bytes_received += received.bytes_received;
                report.server_time_ms = received.server_time_ms.or(report.server_time_ms);
                let Some(page) = fetched? else {
                    return Ok(Round::Gone);
                };
                let more = page.more;
                store.take((self, db, who), *page, report)?;
                if !more {
                    return Ok(Round::Done);
                }
            }
            Err(network("the server's pages stopped before the last", true))
        })
    }

    /// The page after `from`; `None` when the server no longer has the
    /// history it points into (410).
    fn fetch_page(
        &self,
        from: &PullFrom,
        who: &Ident,
        report: &mut SyncReport,
    ) -> Result<Option<Box<Page>>> {
        let reply = self.get_changes(
            from.cursor,
            from.tag.as_deref(),
            who,
            from.resume.as_deref(),
            Duration::ZERO,
            report,
        )?;
        match reply {
            Reply::Page(page) => Ok(Some(page)),
            Reply::Gone => Ok(None),
            Reply::Staged => Err(network("unexpected 202 to a pull", false)),
        }
    }
}

/// Where the next pull request starts: the cursor and its version's tag,
/// and inside a version larger than a page, the server's resume token.
struct PullFrom {
    cursor: u64,
    tag: Option<String>,
    resume: Option<String>,
}

impl PullFrom {
    /// Moves past `page`.
    fn past(&mut self, page: &Page) {
        self.resume = page.resume.clone();
        if self.resume.is_none() && page.changes.until > self.cursor {
            self.cursor = page.changes.until;
            self.tag = page.tag.clone();
        }
    }
}

/// The pulled pages' way into the database: the cursor applied so far
/// (and its tag), and how many pages of a version larger than one page
/// wait on disk for its last (memory stays bounded by a page).
struct PageStore {
    cursor: u64,
    tag: Option<String>,
    staged: usize,
    /// The push the first page answers, recorded with that page (see
    /// `Database::apply_pulled`).
    accepted: Option<AcceptedPush>,
}

impl PageStore {
    /// Stores `page`: applies it, with the staged pages before it, once it
    /// ends a version (or moves the cursor), else stages it.
    fn take(
        &mut self,
        (client, db, who): (&Client, &Database, &Ident),
        mut page: Page,
        report: &mut SyncReport,
    ) -> Result<()> {
        report.pulled += page.changes.changes.len();
        if let Some(epoch) = &page.epoch {
            if who.epoch.as_deref() != Some(epoch.as_str()) {
                db.set_server_epoch(epoch)?;
            }
        }
        let applies_alone = page.resume.is_none()
            && self.staged == 0
            && (page.changes.until > self.cursor || !page.changes.changes.is_empty());
        let accepted = self.accepted.take();
        if let Some(push) = accepted.as_ref().filter(|_| !applies_alone) {
            db.mark_pushed_to(push)?;
        }
        if page.resume.is_some() {
            db.stage_page(&page.encoded, self.staged == 0)?;
            self.staged += 1;
        } else if page.changes.until > self.cursor || !page.changes.changes.is_empty() {
            let until = page.changes.until.max(self.cursor);
            if until > self.cursor {
                self.tag = page.tag.take();
            }
            let applied = if self.staged > 0 {
                db.apply_staged_from_server(&page.changes.changes, until, self.tag.as_deref())?
            } else {
                let tag = self.tag.as_deref();
                match db.apply_pulled(&page.changes.changes, until, tag, accepted.as_ref()) {
                    Ok(applied) => applied,
                    Err(e) => {
                        // The push stays recorded however the pull fails,
                        // or every sync until it succeeds sends it again.
                        if let Some(push) = &accepted {
                            let _ = db.mark_pushed_to(push);
                        }
                        return Err(e);
                    }
                }
            };
            report.applied += applied.applied;
            report.rejected += applied.rejected;
            self.staged = 0;
            self.cursor = until;
        }
        client.tell_progress(report);
        Ok(())
    }
}

/// How a push goes: one request with the whole change set (encoded), or
/// several, each with a range of its changes.
enum Parts {
    One(Vec<u8>),
    Many(Vec<std::ops::Range<usize>>),
}

/// Splits a change set into parts of at most about `max` bytes encoded.
/// Parts end between rows where they can; a row too large for one part is
/// cut between its changes (the server merges every part of a push in one
/// transaction, so the row still lands whole).
fn split(cs: &ChangeSet, max: usize, max_changes: usize) -> Parts {
    let max_changes = max_changes.max(1);
    if cs.changes.len() <= max_changes {
        let whole = cs.encode();
        if whole.len() <= max {
            return Parts::One(whole);
        }
    }
    let mut parts = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, c) in cs.changes.iter().enumerate() {
        let cost = c.value.payload_len() + c.pk.iter().map(|v| v.payload_len()).sum::<usize>() + 32;
        if size > 0 && (size + cost > max || i - start >= max_changes) {
            parts.push(start..i);
            (start, size) = (i, 0);
        }
        size += cost;
        let row_ends = cs
            .changes
            .get(i + 1)
            .is_none_or(|n| n.table != c.table || n.pk != c.pk);
        if (size >= max / 2 && row_ends) || i + 1 == cs.changes.len() {
            parts.push(start..i + 1);
            (start, size) = (i + 1, 0);
        }
    }
    Parts::Many(parts)
}

impl ChangeSet {
    /// The changes in `range`, as a change set of their own.
    fn part(&self, range: std::ops::Range<usize>) -> ChangeSet {
        ChangeSet {
            source: self.source,
            recipient: self.recipient,
            since: self.since,
            until: self.until,
            changes: self.changes[range].to_vec(),
        }
    }
}

/// The largest answer read (decoded, too).
const MAX_ANSWER_BYTES: usize = 1 << 30;

/// The servers (by URL) that said they take zstd-compressed pushes, as
/// learned from their answers' `Accept-Encoding`, for the process's life.
fn zstd_servers() -> &'static Mutex<HashSet<String>> {
    static SERVERS: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    SERVERS.get_or_init(Default::default)
}

fn takes_zstd(server_url: &str) -> bool {
    zstd_servers()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(server_url)
}

fn remember_zstd(server_url: &str, takes: bool) {
    let mut servers = zstd_servers().lock().unwrap_or_else(|e| e.into_inner());
    if takes {
        if !servers.contains(server_url) {
            servers.insert(server_url.to_owned());
        }
    } else {
        servers.remove(server_url);
    }
}

/// A response read to its end.
struct Answer {
    status: u16,
    headers: ureq::http::HeaderMap,
    body: Vec<u8>,
}

fn receive(mut response: ureq::http::Response<ureq::Body>) -> Result<Answer, ureq::Error> {
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER_BYTES as u64)
        .read_to_vec()?;
    let (parts, _) = response.into_parts();
    Ok(Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

/// Sets a request's timeout; `fresh` keeps it off every pooled connection.
fn configure<B>(
    config: ureq::config::ConfigBuilder<ureq::typestate::RequestScope<B>>,
    timeout: Duration,
    fresh: bool,
) -> ureq::RequestBuilder<B> {
    let config = config.timeout_global(Some(timeout));
    // No idle connection is young enough for an idle age of zero, so the
    // pool opens a new one (and drops the idle ones: likely as stale).
    if fresh {
        config.max_idle_age(Duration::ZERO).build()
    } else {
        config.build()
    }
}

/// Sends a request that is safe to send twice (`attempt` builds and sends
/// it; its argument asks for a new connection). A connection that breaks
/// under the request, typically a pooled keep-alive connection the server
/// has closed meanwhile, gets the request once more on a new connection
/// before the failure is reported.
fn resend_on_lost_connection(
    mut attempt: impl FnMut(bool) -> Result<Answer, ureq::Error>,
) -> Result<Answer> {
    match attempt(false) {
        Err(e) if connection_lost(&e) => attempt(true),
        other => other,
    }
    .map_err(transport_error)
}

/// The peer closed or reset the connection under the request (as opposed to
/// refusing it, or being slow: a new connection would not help those).
fn connection_lost(e: &ureq::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e, ureq::Error::Io(io) if matches!(
        io.kind(),
        BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof | NotConnected
    ))
}

fn transport_error(e: ureq::Error) -> Error {
    match e {
        ureq::Error::BadUri(_) | ureq::Error::Http(_) => network(e.to_string(), false),
        // The server answered but its certificate (or TLS setup) was
        // refused: not offline, and retrying will not fix it.
        ureq::Error::Io(ref io) if tls_refused(io) => {
            network(format!("the TLS handshake failed: {io}"), false)
        }
        ureq::Error::Rustls(_) | ureq::Error::Tls(_) => {
            network(format!("the TLS handshake failed: {e}"), false)
        }
        ureq::Error::Io(_)
        | ureq::Error::Timeout(_)
        | ureq::Error::HostNotFound
        | ureq::Error::ConnectionFailed => Error::Unreachable(e.to_string()),
        other => network(other.to_string(), true),
    }
}

/// Whether an I/O failure is rustls refusing the connection (the handshake
/// reports through the stream's I/O errors).
fn tls_refused(io: &std::io::Error) -> bool {
    io.get_ref()
        .is_some_and(|inner| inner.is::<rustls::Error>())
}

/// Maps an HTTP failure to the engine's errors.
fn status_error(status: u16, body: &[u8], retry_after: Option<Duration>) -> Error {
    #[derive(serde::Deserialize)]
    struct Body {
        error: Detail,
    }
    #[derive(serde::Deserialize)]
    struct Detail {
        code: String,
        message: String,
    }
    let (code, message) = match serde_json::from_slice::<Body>(body) {
        Ok(Body { error }) => (error.code, error.message),
        Err(_) => (
            format!("http_{status}"),
            String::from_utf8_lossy(body).chars().take(200).collect(),
        ),
    };
    let message = format!("{code}: {message} (HTTP {status})");
    match status {
        401 | 403 => Error::Auth(message),
        400 | 413 => Error::InvalidInput(format!("server refused the request: {message}")),
        409 => Error::Schema {
            table: String::new(),
            problems: vec![message],
        },
        429 | 500..=599 => Error::Network {
            message,
            retryable: true,
            retry_after,
        },
        _ => network(message, false),
    }
}

impl Database {
    /// Pushes what the server lacks, then pulls and applies until caught
    /// up. Changes count as sent only once the server has accepted them.
    pub fn sync_now(&self, config: &SyncConfig) -> Result<SyncReport> {
        Client::new(config.clone()).sync(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changeset::Change;
    use crate::hlc::Hlc;
    use crate::site::SiteId;
    use crate::value::Value;

    fn changes(rows: usize, per_row: usize) -> ChangeSet {
        let site = SiteId::random();
        ChangeSet {
            source: site,
            recipient: None,
            since: 0,
            until: 1,
            changes: (0..rows * per_row)
                .map(|i| Change {
                    table: "t".into(),
                    pk: vec![Value::Integer((i / per_row) as i64)].into(),
                    column: Some(format!("c{}", i % per_row).into()),
                    value: Value::Integer(i as i64),
                    hlc: Hlc(1),
                    site,
                    cl: 1,
                    db_version: 1,
                    seq: i as u32,
                })
                .collect(),
        }
    }

    #[test]
    fn parts_hold_at_most_the_changes_a_server_takes_and_lose_none() {
        let cs = changes(10, 3);
        for (max_bytes, max_changes) in [(1 << 20, 4), (1 << 20, 1), (40, 100), (1 << 20, 100)] {
            let decoded: Vec<ChangeSet> = match split(&cs, max_bytes, max_changes) {
                Parts::One(body) => vec![ChangeSet::decode(&body).unwrap()],
                Parts::Many(ranges) => ranges
                    .into_iter()
                    .map(|r| ChangeSet::decode(&cs.part(r).encode()).unwrap())
                    .collect(),
            };
            assert!(
                decoded.iter().all(|p| p.changes.len() <= max_changes),
                "{max_bytes} {max_changes}"
            );
            let all: Vec<Change> = decoded.into_iter().flat_map(|p| p.changes).collect();
            assert_eq!(all.len(), cs.changes.len());
            assert!(all.iter().zip(&cs.changes).all(|(a, b)| a.value == b.value));
        }
        assert!(matches!(split(&cs, 1 << 20, 100), Parts::One(_)));
    }
}
