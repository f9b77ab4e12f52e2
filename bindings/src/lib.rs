//! Confluo's FFI: a thin UniFFI layer over `confluo-core` for Kotlin and
//! Swift. It converts types and errors and holds no logic; every behaviour
//! lives (and is tested) in the core.

use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::thread::ThreadId;
use std::time::{Duration, UNIX_EPOCH};

use confluo_core as core;

#[cfg(target_os = "android")]
mod android;

uniffi::setup_scaffolding!();

/// The one error type of the SDK's foreign API.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum ConfluoError {
    /// The input was refused (bad SQL parameters, a malformed change set,
    /// a misused transaction...). Nothing was changed.
    #[error("{detail}")]
    InvalidInput { detail: String },
    /// A table cannot be synced as it is, or a migration was refused.
    #[error("{detail}")]
    Schema { detail: String },
    /// SQLite failed (the message is SQLite's own), or storage is broken.
    #[error("{detail}")]
    Storage { detail: String },
    /// The sync server was unreachable or failed; `retryable` failures go
    /// away by retrying later.
    #[error("{detail}")]
    Network { detail: String, retryable: bool },
    /// The server refused the token or its rights.
    #[error("{detail}")]
    Auth { detail: String },
    /// The database was closed.
    #[error("the database is closed")]
    Closed,
    /// The call was cancelled (`SyncCancellation::cancel`).
    #[error("cancelled")]
    Cancelled,
}

/// The single place where engine errors become foreign errors.
impl From<core::Error> for ConfluoError {
    fn from(e: core::Error) -> Self {
        let detail = e.to_string();
        match e {
            core::Error::InvalidInput(_)
            | core::Error::MalformedChangeSet(_)
            | core::Error::ClockDrift { .. } => ConfluoError::InvalidInput { detail },
            core::Error::Schema { .. } => ConfluoError::Schema { detail },
            // SQLite's own message, without the engine's prefix.
            core::Error::Sqlite { message, .. } => ConfluoError::Storage { detail: message },
            core::Error::Network { retryable, .. } => ConfluoError::Network { detail, retryable },
            core::Error::Unreachable(_) => ConfluoError::Network {
                detail,
                retryable: true,
            },
            core::Error::Auth(_) => ConfluoError::Auth { detail },
            core::Error::Closed => ConfluoError::Closed,
            core::Error::Cancelled => ConfluoError::Cancelled,
        }
    }
}

/// A foreign callback that threw: reported as invalid input, never a panic.
impl From<uniffi::UnexpectedUniFFICallbackError> for ConfluoError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        ConfluoError::InvalidInput {
            detail: format!("a callback failed: {}", e.reason),
        }
    }
}

/// Turns a foreign error back into an engine error, to roll back a write.
fn to_core(e: &ConfluoError) -> core::Error {
    core::Error::InvalidInput(e.to_string())
}

type Result<T, E = ConfluoError> = std::result::Result<T, E>;

/// One SQLite value.
#[derive(Clone, Debug, PartialEq, uniffi::Enum)]
pub enum SqlValue {
    Null,
    Integer { value: i64 },
    Real { value: f64 },
    Text { value: String },
    Blob { value: Vec<u8> },
}

impl From<SqlValue> for core::Value {
    fn from(v: SqlValue) -> Self {
        match v {
            SqlValue::Null => core::Value::Null,
            SqlValue::Integer { value } => core::Value::Integer(value),
            SqlValue::Real { value } => core::Value::Real(value),
            SqlValue::Text { value } => core::Value::Text(value),
            SqlValue::Blob { value } => core::Value::Blob(value),
        }
    }
}

impl From<core::Value> for SqlValue {
    fn from(v: core::Value) -> Self {
        match v {
            core::Value::Null => SqlValue::Null,
            core::Value::Integer(value) => SqlValue::Integer { value },
            core::Value::Real(value) => SqlValue::Real { value },
            core::Value::Text(value) => SqlValue::Text { value },
            core::Value::Blob(value) => SqlValue::Blob { value },
        }
    }
}

fn values(params: Vec<SqlValue>) -> Vec<core::Value> {
    params.into_iter().map(Into::into).collect()
}

/// Rows of a query: column names and rows of values.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<SqlValue>>,
}

impl From<core::Rows> for QueryResult {
    fn from(r: core::Rows) -> Self {
        QueryResult {
            columns: r.columns,
            rows: r
                .rows
                .into_iter()
                .map(|row| row.into_iter().map(Into::into).collect())
                .collect(),
        }
    }
}

/// What merging a change set did.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct ApplyReport {
    pub received: u64,
    pub applied: u64,
    pub stale: u64,
    pub deferred: u64,
    /// Changes kept aside because this database could not apply them
    /// (see `rejected_changes`).
    pub rejected: u64,
}

/// A change from the server this database could not apply, kept aside with
/// the reason. `table` and `column` (None for the row itself) are identities:
/// the name each was made with (a rename keeps it), `name#k` when made again
/// after a drop.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct RejectedChange {
    pub table: String,
    pub key: Vec<SqlValue>,
    pub column: Option<String>,
    pub reason: String,
}

impl From<core::RejectedChange> for RejectedChange {
    fn from(r: core::RejectedChange) -> Self {
        RejectedChange {
            table: r.table,
            key: r.change.pk.iter().cloned().map(Into::into).collect(),
            column: r.column,
            reason: r.reason,
        }
    }
}

/// Where and how to sync. Durations in milliseconds; zero means the
/// engine's default.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct SyncConfig {
    pub server_url: String,
    pub space: String,
    pub request_timeout_ms: u64,
    pub long_poll_ms: u64,
    pub debounce_ms: u64,
    pub min_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

/// What one sync did.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct SyncReport {
    pub pushed: u64,
    pub pulled: u64,
    pub applied: u64,
    /// Received changes this database could not apply, kept aside.
    pub rejected: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: u64,
    /// The server's clock minus this device's, in milliseconds, from the
    /// last answer.
    pub clock_offset_ms: Option<i64>,
}

/// What kind of failure a sync status reports (the `ConfluoError` case it
/// would be), for an app to branch on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum ErrorKind {
    InvalidInput,
    Schema,
    Storage,
    Network,
    Auth,
    Closed,
    Cancelled,
}

impl From<core::ErrorKind> for ErrorKind {
    fn from(k: core::ErrorKind) -> Self {
        match k {
            core::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
            core::ErrorKind::Schema => ErrorKind::Schema,
            core::ErrorKind::Storage => ErrorKind::Storage,
            core::ErrorKind::Network => ErrorKind::Network,
            core::ErrorKind::Auth => ErrorKind::Auth,
            core::ErrorKind::Closed => ErrorKind::Closed,
            core::ErrorKind::Cancelled => ErrorKind::Cancelled,
        }
    }
}

#[derive(Clone, Debug, PartialEq, uniffi::Enum)]
pub enum SyncState {
    /// Background sync is not running.
    Stopped,
    Idle,
    Syncing,
    /// No network (the platform said so: `retry_in_ms` is None), or the
    /// server cannot be reached (the next attempt is in `retry_in_ms`).
    Offline {
        retry_in_ms: Option<u64>,
    },
    Error {
        kind: ErrorKind,
        message: String,
        retry_in_ms: u64,
    },
    /// The server refused the token, a refreshed one too: the user must
    /// sign in again. No retries until `sync_soon`.
    AuthRequired {
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct SyncStatus {
    pub state: SyncState,
    pub pending: u64,
    /// Changes from the server kept aside (see `rejected_changes`).
    pub rejected: u64,
    /// Milliseconds since the Unix epoch of the last successful sync.
    pub last_synced_ms: Option<u64>,
    /// The server's clock minus this device's, in milliseconds, from the
    /// last sync.
    pub clock_offset_ms: Option<i64>,
}

impl From<&core::SyncStatus> for SyncStatus {
    fn from(s: &core::SyncStatus) -> Self {
        SyncStatus {
            state: match &s.state {
                core::SyncState::Stopped => SyncState::Stopped,
                core::SyncState::Idle => SyncState::Idle,
                core::SyncState::Syncing => SyncState::Syncing,
                core::SyncState::Offline { retry_in } => SyncState::Offline {
                    retry_in_ms: retry_in.map(|d| d.as_millis() as u64),
                },
                core::SyncState::Error {
                    kind,
                    message,
                    retry_in,
                } => SyncState::Error {
                    kind: (*kind).into(),
                    message: message.clone(),
                    retry_in_ms: retry_in.as_millis() as u64,
                },
                core::SyncState::AuthRequired { message } => SyncState::AuthRequired {
                    message: message.clone(),
                },
            },
            pending: s.pending,
            rejected: s.rejected,
            last_synced_ms: s
                .last_synced
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64),
            clock_offset_ms: s.clock_offset_ms,
        }
    }
}

/// Called after each commit that changed watched tables. A failure (a
/// thrown exception) is reported and ignored: the commit stands.
#[uniffi::export(foreign)]
pub trait ChangeListener: Send + Sync {
    fn on_change(&self, tables: Vec<String>) -> Result<()>;
}

/// Called on every change of background sync's status. A failure is
/// reported and ignored: syncing goes on.
#[uniffi::export(foreign)]
pub trait SyncStatusListener: Send + Sync {
    fn on_status(&self, status: SyncStatus) -> Result<()>;
}

/// Supplies the bearer token for each request. `invalidate` is true once
/// after the server refused the token the provider gave: fetch a new one
/// (a refresh). Called on a sync thread, never the app's main thread, so
/// it may block on the network.
#[uniffi::export(foreign)]
pub trait TokenProvider: Send + Sync {
    fn token(&self, invalidate: bool) -> Result<String>;
}

/// How much a log message matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, uniffi::Enum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

impl From<log::Level> for LogLevel {
    fn from(l: log::Level) -> Self {
        match l {
            log::Level::Error => LogLevel::Error,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Info => LogLevel::Info,
            log::Level::Debug => LogLevel::Debug,
            log::Level::Trace => LogLevel::Trace,
        }
    }
}

/// Receives the engine's log messages (for Logcat, OSLog or the app's own
/// logger). Called on whatever thread logged; a failure is ignored.
#[uniffi::export(foreign)]
pub trait Logger: Send + Sync {
    fn log(&self, level: LogLevel, target: String, message: String) -> Result<()>;
}

/// The installed foreign logger: the `log` facade allows one logger per
/// process, set once; this forwards to whichever the app installed last.
static LOGGER: RwLock<Option<Arc<dyn Logger>>> = RwLock::new(None);

struct ForeignLog;

impl log::Log for ForeignLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let logger = LOGGER.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(logger) = logger {
            // A logger that fails has nowhere to be reported: ignored.
            let _ = logger.log(
                record.level().into(),
                record.target().to_owned(),
                record.args().to_string(),
            );
        }
    }

    fn flush(&self) {}
}

/// Sends the engine's messages of `max_level` and above to `logger`
/// (replacing the one set before); `None` turns logging off.
#[uniffi::export]
pub fn set_logger(logger: Option<Arc<dyn Logger>>, max_level: LogLevel) {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        // Fails only if another logger owns the facade (an app linking the
        // engine with its own Rust logger): then that one gets the logs.
        let _ = log::set_logger(&ForeignLog);
    });
    let on = logger.is_some();
    *LOGGER.write().unwrap_or_else(|e| e.into_inner()) = logger;
    log::set_max_level(if on {
        max_level.filter()
    } else {
        log::LevelFilter::Off
    });
}

/// The body of a write transaction: committed if it returns normally,
/// rolled back if it throws.
#[uniffi::export(foreign)]
pub trait TransactionBody: Send + Sync {
    fn run(&self, tx: Arc<WriteTransaction>) -> Result<()>;
}

struct ForeignToken(Arc<dyn TokenProvider>);

impl core::TokenProvider for ForeignToken {
    fn token(&self) -> std::result::Result<String, String> {
        self.0.token(false).map_err(|e| e.to_string())
    }

    fn refreshed_token(&self) -> std::result::Result<String, String> {
        self.0.token(true).map_err(|e| e.to_string())
    }
}

fn ms(v: u64, default: Duration) -> Duration {
    if v == 0 {
        default
    } else {
        Duration::from_millis(v)
    }
}

fn core_config(c: SyncConfig, token: Arc<dyn TokenProvider>) -> core::SyncConfig {
    let mut cfg =
        core::SyncConfig::with_token_provider(c.server_url, c.space, Arc::new(ForeignToken(token)));
    cfg.request_timeout = ms(c.request_timeout_ms, cfg.request_timeout);
    cfg.long_poll = ms(c.long_poll_ms, cfg.long_poll);
    cfg.debounce = ms(c.debounce_ms, cfg.debounce);
    cfg.min_backoff = ms(c.min_backoff_ms, cfg.min_backoff);
    cfg.max_backoff = ms(c.max_backoff_ms, cfg.max_backoff);
    cfg
}

fn site(s: &str) -> Result<core::SiteId> {
    core::SiteId::parse(s).ok_or_else(|| ConfluoError::InvalidInput {
        detail: format!("{s:?} is not a site id"),
    })
}

/// A Confluo database.
#[derive(uniffi::Object)]
pub struct Database {
    inner: Arc<core::Database>,
    /// The background sync started last, and the platform's network hint,
    /// kept while no sync runs. One lock, so that `start_sync`,
    /// `set_online`, `sign_out_and_clear` and `close_database` never
    /// interleave.
    sync: Mutex<SyncSlot>,
}

struct SyncSlot {
    current: Weak<BackgroundSync>,
    online: bool,
}

impl Database {
    fn wrap(inner: core::Database) -> Arc<Self> {
        Arc::new(Database {
            inner: Arc::new(inner),
            sync: Mutex::new(SyncSlot {
                current: Weak::new(),
                online: true,
            }),
        })
    }

    fn sync_slot(&self) -> std::sync::MutexGuard<'_, SyncSlot> {
        self.sync.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[uniffi::export]
impl Database {
    /// Opens (creating if needed) the database file at `path`.
    #[uniffi::constructor]
    pub fn open(path: String) -> Result<Arc<Self>> {
        Ok(Database::wrap(core::Database::open(path)?))
    }

    /// Opens a private in-memory database.
    #[uniffi::constructor]
    pub fn open_in_memory() -> Result<Arc<Self>> {
        Ok(Database::wrap(core::Database::open_in_memory()?))
    }

    pub fn execute(&self, sql: String, params: Vec<SqlValue>) -> Result<u64> {
        Ok(self.inner.execute(&sql, &values(params))? as u64)
    }

    pub fn execute_batch(&self, sql: String) -> Result<()> {
        Ok(self.inner.execute_batch(&sql)?)
    }

    pub fn query(&self, sql: String, params: Vec<SqlValue>) -> Result<QueryResult> {
        Ok(self.inner.query(&sql, &values(params))?.into())
    }

    /// Runs `body` in one write transaction.
    pub fn write(&self, body: Arc<dyn TransactionBody>) -> Result<()> {
        let mut failure: Option<ConfluoError> = None;
        let outcome = self.inner.write(|tx| {
            let handle = Arc::new(WriteTransaction::open(tx));
            // Ends the handle however `run` returns (even by unwinding), so
            // a kept handle can never reach the finished transaction.
            let _end = EndOnDrop(handle.clone());
            let result = body.run(handle.clone());
            result.map_err(|e| {
                let core_error = to_core(&e);
                failure = Some(e);
                core_error
            })
        });
        match (outcome, failure) {
            (_, Some(e)) => Err(e),
            (Err(e), None) => Err(e.into()),
            (Ok(()), None) => Ok(()),
        }
    }

    pub fn enable_sync(&self, table: String) -> Result<()> {
        Ok(self.inner.enable_sync(&table)?)
    }

    pub fn alter_synced_table(&self, table: String, sql: String) -> Result<()> {
        Ok(self.inner.alter_synced_table(&table, &sql)?)
    }

    /// Makes `table` synced and brings it to the end of its history
    /// (`create`, then `migrations` in order), whatever state it is in.
    pub fn enable_sync_with_history(
        &self,
        table: String,
        create: String,
        migrations: Vec<String>,
    ) -> Result<()> {
        let migrations: Vec<&str> = migrations.iter().map(String::as_str).collect();
        Ok(self
            .inner
            .enable_sync_with_history(&table, &create, &migrations)?)
    }

    pub fn site_id(&self) -> String {
        self.inner.site_id().to_string()
    }

    pub fn db_version(&self) -> u64 {
        self.inner.db_version()
    }

    /// Rows with local changes the sync server has not accepted yet.
    pub fn pending_changes(&self) -> Result<u64> {
        Ok(self.inner.pending_changes()?)
    }

    /// The changes from the server kept aside because this database could
    /// not apply them, with the reasons.
    pub fn rejected_changes(&self) -> Result<Vec<RejectedChange>> {
        Ok(self
            .inner
            .rejected_changes()?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    pub fn rejected_count(&self) -> Result<u64> {
        Ok(self.inner.rejected_count()?)
    }

    /// Calls `listener` after each commit that changed any of `tables`
    /// (all tables when empty). Stops when the returned handle is closed.
    pub fn observe(&self, tables: Vec<String>, listener: Arc<dyn ChangeListener>) -> Arc<Observer> {
        let names: Vec<&str> = tables.iter().map(String::as_str).collect();
        let handle = self.inner.observe(&names, move |changed: &[String]| {
            if let Err(e) = listener.on_change(changed.to_vec()) {
                core::report_callback_failure("a change listener", &e);
            }
        });
        Arc::new(Observer {
            handle: Mutex::new(Some(handle)),
        })
    }

    /// Everything recorded after `since`, encoded for the wire.
    pub fn changes_since(&self, since: u64) -> Result<Vec<u8>> {
        Ok(self.inner.changes_since(since, None)?.encode())
    }

    /// What `peer` misses, given what it has seen from us.
    pub fn changes_for_peer(&self, peer_site_id: String, seen_by_peer: u64) -> Result<Vec<u8>> {
        Ok(self
            .inner
            .changes_for_peer(site(&peer_site_id)?, seen_by_peer)?
            .encode())
    }

    /// How much of `peer`'s history this database has received.
    pub fn seen_version(&self, peer_site_id: String) -> Result<u64> {
        Ok(self.inner.seen_version(site(&peer_site_id)?)?)
    }

    /// Merges an encoded change set.
    pub fn apply_changes(&self, changeset: Vec<u8>) -> Result<ApplyReport> {
        let report = self.inner.apply(&core::ChangeSet::decode(&changeset)?)?;
        Ok(ApplyReport {
            received: report.received as u64,
            applied: report.applied as u64,
            stale: report.stale as u64,
            deferred: report.deferred as u64,
            rejected: report.rejected as u64,
        })
    }

    /// Pushes and pulls once, until caught up. `cancellation` (optional)
    /// stops it between requests: it then fails with `Cancelled`.
    pub fn sync_now(
        &self,
        config: SyncConfig,
        token: Arc<dyn TokenProvider>,
        cancellation: Option<Arc<SyncCancellation>>,
    ) -> Result<SyncReport> {
        let mut config = core_config(config, token);
        config.cancel = cancellation.map(|c| c.flag.clone());
        let r = self.inner.sync_now(&config)?;
        Ok(SyncReport {
            pushed: r.pushed as u64,
            pulled: r.pulled as u64,
            applied: r.applied as u64,
            rejected: r.rejected as u64,
            bytes_sent: r.bytes_sent,
            bytes_received: r.bytes_received,
            duration_ms: r.duration.as_millis() as u64,
            clock_offset_ms: r.clock_offset_ms,
        })
    }

    /// Starts background sync (stopping the one started before, if it
    /// still runs); `listener` hears every status change. It starts with
    /// the last network hint given to `set_online` (online if none).
    pub fn start_sync(
        &self,
        config: SyncConfig,
        token: Arc<dyn TokenProvider>,
        listener: Arc<dyn SyncStatusListener>,
    ) -> Result<Arc<BackgroundSync>> {
        let mut slot = self.sync_slot();
        if let Some(previous) = slot.current.upgrade() {
            previous.stop();
        }
        let mut config = core_config(config, token);
        config.online_at_start = slot.online;
        let sync = self.inner.start_sync(config, move |s: &core::SyncStatus| {
            if let Err(e) = listener.on_status(s.into()) {
                core::report_callback_failure("a sync status listener", &e);
            }
        })?;
        let sync = Arc::new(BackgroundSync {
            inner: Mutex::new(Some(sync)),
        });
        slot.current = Arc::downgrade(&sync);
        Ok(sync)
    }

    /// The platform's network hint: remembered while no sync runs (the
    /// next `start_sync` starts with it), passed on to the one running.
    pub fn set_online(&self, online: bool) {
        let mut slot = self.sync_slot();
        slot.online = online;
        if let Some(sync) = slot.current.upgrade() {
            sync.set_online(online);
        }
    }

    /// The status while background sync is not running: `Stopped`, with
    /// the real pending and rejected counts.
    pub fn stopped_status(&self) -> Result<SyncStatus> {
        Ok((&self.inner.stopped_status()?).into())
    }

    /// The space this database syncs with, once it has tried to.
    pub fn bound_space(&self) -> Result<Option<String>> {
        Ok(self.inner.bound_space()?)
    }

    /// Signs out: stops background sync, then, in one transaction, forgets
    /// the space, the cursor and the push marks, and deletes every synced
    /// row with its metadata (the deletes are not synced). Local tables
    /// stay. Afterwards the database can sync with another space.
    pub fn sign_out_and_clear(&self) -> Result<()> {
        let slot = self.sync_slot();
        if let Some(sync) = slot.current.upgrade() {
            sync.stop();
        }
        Ok(self.inner.sign_out_and_clear()?)
    }

    /// Closes the database; later calls fail with `Closed`. Background
    /// sync stops without being waited for (its listener hears nothing
    /// more). (Not `close`: the generated Kotlin class already has
    /// `close()` from AutoCloseable.)
    pub fn close_database(&self) -> Result<()> {
        let slot = self.sync_slot();
        if let Some(sync) = slot.current.upgrade() {
            sync.halt();
        }
        Ok(self.inner.close()?)
    }
}

/// Cancels a `sync_now` from another thread (a coroutine's or a Task's
/// cancellation): no request starts after `cancel`.
#[derive(uniffi::Object, Default)]
pub struct SyncCancellation {
    flag: Arc<std::sync::atomic::AtomicBool>,
}

#[uniffi::export]
impl SyncCancellation {
    #[uniffi::constructor]
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn cancel(&self) {
        self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// An observer registration; `cancel` (or releasing it) stops it.
#[derive(uniffi::Object)]
pub struct Observer {
    handle: Mutex<Option<core::Observation>>,
}

#[uniffi::export]
impl Observer {
    pub fn cancel(&self) {
        self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Running background sync.
#[derive(uniffi::Object)]
pub struct BackgroundSync {
    inner: Mutex<Option<core::BackgroundSync>>,
}

#[uniffi::export]
impl BackgroundSync {
    /// The platform's network hint.
    pub fn set_online(&self, online: bool) {
        if let Some(s) = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            s.set_online(online);
        }
    }

    pub fn sync_soon(&self) {
        if let Some(s) = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            s.sync_soon();
        }
    }

    /// Stops syncing; returns within about a second, and the listener
    /// hears nothing after it returns.
    pub fn stop(&self) {
        let sync = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(s) = sync {
            s.stop();
        }
    }
}

impl BackgroundSync {
    /// Stops without waiting for the sync thread.
    fn halt(&self) {
        let sync = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(s) = sync {
            s.stop_without_waiting();
        }
    }
}

/// The transaction a `TransactionBody` runs in. Usable only during `run`,
/// on the thread that called it.
#[derive(uniffi::Object)]
pub struct WriteTransaction {
    tx: Mutex<Option<TxRef>>,
    thread: ThreadId,
}

struct EndOnDrop(Arc<WriteTransaction>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A pointer to the engine transaction (its lifetime erased), valid
/// between `open` and `end`.
struct TxRef(*const ());

// SAFETY: the pointer is only dereferenced on the thread that created it
// (checked in `with`), while the transaction it points to is alive.
unsafe impl Send for TxRef {}

impl WriteTransaction {
    fn open(tx: &core::Transaction<'_>) -> Self {
        let ptr = (tx as *const core::Transaction<'_>).cast::<()>();
        WriteTransaction {
            tx: Mutex::new(Some(TxRef(ptr))),
            thread: std::thread::current().id(),
        }
    }

    fn end(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn with<T>(&self, f: impl FnOnce(&core::Transaction<'_>) -> core::Result<T>) -> Result<T> {
        if std::thread::current().id() != self.thread {
            return Err(ConfluoError::InvalidInput {
                detail: "a transaction can only be used on the thread running it".into(),
            });
        }
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let Some(ptr) = guard.as_ref() else {
            return Err(ConfluoError::InvalidInput {
                detail: "the transaction has ended".into(),
            });
        };
        // SAFETY: `end` clears the pointer before `Database::write` returns,
        // so while it is set the transaction is alive; the thread check
        // keeps the (not Sync) transaction on its own thread.
        let tx = unsafe { &*ptr.0.cast::<core::Transaction<'_>>() };
        Ok(f(tx)?)
    }
}

#[uniffi::export]
impl WriteTransaction {
    pub fn execute(&self, sql: String, params: Vec<SqlValue>) -> Result<u64> {
        self.with(|tx| tx.execute(&sql, &values(params)).map(|n| n as u64))
    }

    pub fn execute_batch(&self, sql: String) -> Result<()> {
        self.with(|tx| tx.execute_batch(&sql))
    }

    pub fn query(&self, sql: String, params: Vec<SqlValue>) -> Result<QueryResult> {
        self.with(|tx| tx.query(&sql, &values(params)))
            .map(Into::into)
    }
}
