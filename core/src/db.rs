//! The database handle: one writer connection, a pool of readers (WAL),
//! typed execute/query, write transactions and observers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::capture::{self, lock, SharedState, TxState};
use crate::error::{Error, Result};
use crate::hlc::{Hlc, SystemTimeSource, TimeSource};
use crate::observe::{ChangeListener, Observation, Observers};
use crate::row_ids::RowIds;
use crate::schema::{self, TableInfo};
use crate::site::SiteId;
use crate::thread_lock::{ThreadLock, ThreadLockGuard};
use crate::value::{Value, ValueRef};

/// How a database behaves; `Options::default()` suits most apps.
#[derive(Clone)]
pub struct Options {
    /// A change whose clock is further ahead of this device's clock than
    /// this is refused, so one device with a wrong clock cannot win every
    /// conflict forever.
    pub max_clock_drift: Duration,
    /// The largest text or blob value `apply` accepts.
    pub max_value_bytes: usize,
    /// Reader connections kept open for queries (file databases only).
    pub readers: usize,
    /// Where wall-clock time comes from (tests inject a manual clock).
    pub time: Arc<dyn TimeSource>,
    /// A transaction that updates at least this many rows of one table in
    /// the same columns, or deletes as many, records them as one bulk
    /// entry, instead of rewriting each row's metadata at commit. Tests
    /// lower it to exercise bulk entries with a few rows.
    pub bulk_update_rows: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_clock_drift: Duration::from_secs(3600),
            max_value_bytes: 1 << 20,
            readers: 4,
            time: Arc::new(SystemTimeSource),
            bulk_update_rows: crate::bulk::BULK_UPDATE_ROWS,
        }
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("max_clock_drift", &self.max_clock_drift)
            .field("max_value_bytes", &self.max_value_bytes)
            .field("readers", &self.readers)
            .field("bulk_update_rows", &self.bulk_update_rows)
            .finish_non_exhaustive()
    }
}

/// The result of a query: column names and rows of typed values.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The value of `column` in row `row`, if both exist.
    pub fn get(&self, row: usize, column: &str) -> Option<&Value> {
        let c = self.columns.iter().position(|n| n == column)?;
        self.rows.get(row)?.get(c)
    }
}

pub(crate) struct Inner {
    /// A thread lock: a write body that calls the database instead of its
    /// transaction handle is refused instead of waiting for itself.
    pub writer: ThreadLock<Option<Connection>>,
    /// Held for a whole sync with the server (`Client::sync`), so the syncs
    /// of one database never interleave.
    pub sync_round: ThreadLock<()>,
    readers: Option<ReaderPool>,
    pub state: SharedState,
    pub tables: RwLock<HashMap<String, Arc<TableInfo>>>,
    /// The identities of synced tables that were dropped.
    pub dropped_tables: RwLock<Vec<Arc<str>>>,
    /// Site ids by ordinal (0 is this database).
    pub sites: RwLock<Vec<SiteId>>,
    pub observers: Arc<Observers>,
    /// SQLite's schema cookie when `tables` was loaded: another handle on
    /// the same file (or another process) that makes a table synced or
    /// alters one changes it, and the cache is loaded again.
    schema_cookie: std::sync::atomic::AtomicI64,
    pub site_id: SiteId,
    /// Where rows' metadata goes (see `row_ids`).
    pub row_ids: RowIds,
    /// Bulk stamp entries as read (see `bulk`).
    pub bulk: crate::bulk::BulkCache,
    pub options: Options,
}

/// A Confluo database. `Send + Sync`: share it between threads (in an
/// `Arc`); writes are serialized, reads run in parallel on file databases.
pub struct Database {
    pub(crate) inner: Inner,
}

const METADATA_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS confluo_state(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS confluo_sites(ord INTEGER PRIMARY KEY, site_id BLOB NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS confluo_tables(
  id INTEGER PRIMARY KEY, name TEXT NOT NULL, cid TEXT NOT NULL UNIQUE, live INTEGER NOT NULL,
  steps INTEGER, provisional INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS confluo_columns(
  tbl INTEGER NOT NULL, cid TEXT NOT NULL, name TEXT NOT NULL, pk_pos INTEGER, slot INTEGER,
  live INTEGER NOT NULL, PRIMARY KEY (tbl, cid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS confluo_peers(site_ord INTEGER PRIMARY KEY, seen INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS confluo_pending(
  tbl TEXT NOT NULL, pk BLOB NOT NULL, col TEXT NOT NULL, cl INTEGER NOT NULL, value,
  hlc INTEGER NOT NULL, site BLOB NOT NULL, dbv INTEGER NOT NULL,
  PRIMARY KEY (tbl, pk, col)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS confluo_rejected(
  tbl TEXT NOT NULL, pk BLOB NOT NULL, col TEXT NOT NULL, cl INTEGER NOT NULL, value,
  hlc INTEGER NOT NULL, site BLOB NOT NULL, reason TEXT NOT NULL,
  PRIMARY KEY (tbl, pk, col)) WITHOUT ROWID;
";

/// The layout of Confluo's own tables. 1: tables and columns known by
/// name; 2: by identity (`cid`, see `evolution`), names being aliases;
/// 3: row metadata keyed by an id derived from the row's key (`row_ids`);
/// 4: bulk stamps of updates (`bulk`), which a build that does not read
/// them would take for missing changes; 5: bulk stamps of deletes too
/// (`confluo_bulk.deletes`), which a build of format 4 would take for
/// updates of no column.
const METADATA_FORMAT: i64 = 5;

/// The writer connection's page cache at most, in KiB.
const WRITER_CACHE_KIB: i64 = 16 * 1024;

/// Brings metadata of layout 1 to layout 2: every table and column gets its
/// name as its identity, provisionally: layout 1 recorded a rename as a
/// drop and an add, so the identities are right only for tables never
/// migrated; `enable_sync_with_history` puts them right from the history.
const MIGRATE_FORMAT_1: &str = "
CREATE TABLE confluo_tables_2(
  id INTEGER PRIMARY KEY, name TEXT NOT NULL, cid TEXT NOT NULL UNIQUE, live INTEGER NOT NULL,
  steps INTEGER, provisional INTEGER NOT NULL DEFAULT 0);
INSERT INTO confluo_tables_2(id, name, cid, live, provisional)
  SELECT id, name, name, 1, 1 FROM confluo_tables;
DROP TABLE confluo_tables;
ALTER TABLE confluo_tables_2 RENAME TO confluo_tables;
CREATE TABLE confluo_columns_2(
  tbl INTEGER NOT NULL, cid TEXT NOT NULL, name TEXT NOT NULL, pk_pos INTEGER, slot INTEGER,
  live INTEGER NOT NULL, PRIMARY KEY (tbl, cid)) WITHOUT ROWID;
INSERT INTO confluo_columns_2(tbl, cid, name, pk_pos, slot, live)
  SELECT tbl, name, name, pk_pos, slot, live FROM confluo_columns;
DROP TABLE confluo_columns;
ALTER TABLE confluo_columns_2 RENAME TO confluo_columns;
";

impl Database {
    /// Opens (creating if needed) the database file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Database> {
        Self::open_with(path, Options::default())
    }

    /// Opens a private in-memory database (no reader pool: reads share the
    /// writer connection).
    pub fn open_in_memory() -> Result<Database> {
        Self::open_in_memory_with(Options::default())
    }

    pub fn open_in_memory_with(options: Options) -> Result<Database> {
        let conn = Connection::open_in_memory()?;
        Self::init(conn, None, options)
    }

    pub fn open_with(path: impl AsRef<Path>, options: Options) -> Result<Database> {
        let path = path.as_ref().to_path_buf();
        let conn = Connection::open(&path)?;
        Self::init(conn, Some(path), options)
    }

    fn init(mut conn: Connection, path: Option<PathBuf>, options: Options) -> Result<Database> {
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(64);
        if path.is_some() {
            let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(Error::Sqlite {
                    message: format!("could not enable WAL (journal mode is {mode})"),
                    code: None,
                });
            }
            conn.pragma_update(None, "synchronous", "NORMAL")?;
        }
        // The writer's page cache: SQLite's default 2 MB spills a large
        // transaction's metadata pages (clocks, the dbv index) and reads them
        // again. Pages are only allocated as they are used.
        conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE;{METADATA_SCHEMA}{}{}",
            crate::server_state::SCHEMA,
            crate::bulk::SCHEMA
        ))?;
        let setup = (|| -> Result<(SiteId, Hlc, u64, Vec<SiteId>, RowIds)> {
            let format: Option<i64> = conn
                .query_row(
                    "SELECT value FROM confluo_state WHERE key = 'format'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            let migrate_row_metadata = match format {
                None => {
                    conn.execute(
                        "INSERT INTO confluo_state VALUES ('format', ?1)",
                        [METADATA_FORMAT],
                    )?;
                    conn.execute("INSERT INTO confluo_state VALUES ('hlc', 0)", [])?;
                    false
                }
                Some(METADATA_FORMAT) => false,
                // Format 4 adds `confluo_bulk` (made above with the columns
                // of format 5); format 5, its `deletes` column.
                Some(older @ (3 | 4)) => {
                    if older == 4 {
                        conn.execute_batch(
                            "ALTER TABLE confluo_bulk ADD COLUMN deletes INTEGER NOT NULL DEFAULT 0",
                        )?;
                    }
                    conn.execute(
                        "UPDATE confluo_state SET value = ?1 WHERE key = 'format'",
                        [METADATA_FORMAT],
                    )?;
                    false
                }
                Some(older @ (1 | 2)) => {
                    if older == 1 {
                        conn.execute_batch(MIGRATE_FORMAT_1)?;
                    }
                    conn.execute(
                        "UPDATE confluo_state SET value = ?1 WHERE key = 'format'",
                        [METADATA_FORMAT],
                    )?;
                    true
                }
                Some(other) => {
                    return Err(Error::Sqlite {
                        message: format!(
                            "confluo metadata format {other} is newer than this build"
                        ),
                        code: None,
                    })
                }
            };
            let row_ids = match RowIds::load(&conn)? {
                Some(ids) => ids,
                None if format.is_none() || migrate_row_metadata => RowIds::create(&conn)?,
                None => {
                    return Err(Error::Sqlite {
                        message: "corrupt confluo metadata: the row id secret is missing".into(),
                        code: None,
                    })
                }
            };
            row_ids.register(&conn)?;
            if migrate_row_metadata {
                for t in schema::load_tables(&conn)? {
                    crate::row_ids::migrate_table(&conn, &row_ids, &t)?;
                }
            }
            let site: Option<Vec<u8>> = conn
                .query_row("SELECT site_id FROM confluo_sites WHERE ord = 0", [], |r| {
                    r.get(0)
                })
                .optional()?;
            if site.is_none() {
                let id = SiteId::random();
                conn.execute(
                    "INSERT INTO confluo_sites(ord, site_id) VALUES (0, ?1)",
                    [&id.as_bytes()[..]],
                )?;
            }
            let sites = load_sites(&conn)?;
            let hlc: i64 = conn.query_row(
                "SELECT value FROM confluo_state WHERE key = 'hlc'",
                [],
                |r| r.get(0),
            )?;
            let mut dbv: u64 = conn.query_row(
                "SELECT max(coalesce((SELECT max(dbv) FROM confluo_pending), 0), \
                            coalesce((SELECT max(dbv) FROM confluo_bulk), 0), \
                            coalesce((SELECT value FROM confluo_state WHERE key = 'dbv'), 0))",
                [],
                |r| r.get::<_, i64>(0),
            )? as u64;
            for t in schema::load_tables(&conn)? {
                let max: i64 = conn.query_row(
                    &format!("SELECT coalesce(max(dbv), 0) FROM {}", t.meta_table()),
                    [],
                    |r| r.get(0),
                )?;
                dbv = dbv.max(max as u64);
            }
            let triggers: Option<i64> = conn
                .query_row(
                    "SELECT value FROM confluo_state WHERE key = 'triggers'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            if triggers != Some(schema::TRIGGERS_VERSION) {
                for t in schema::load_tables(&conn)? {
                    schema::drop_triggers(&conn, &t)?;
                    schema::install(&conn, &t)?;
                }
                conn.execute(
                    "INSERT OR REPLACE INTO confluo_state(key, value) VALUES ('triggers', ?1)",
                    [schema::TRIGGERS_VERSION],
                )?;
            }
            Ok((sites[0], Hlc(hlc as u64), dbv, sites, row_ids))
        })();
        let (site_id, hlc, dbv, sites, row_ids) = match setup {
            Ok(v) => {
                conn.execute_batch("COMMIT")?;
                v
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        };
        let state = Arc::new(Mutex::new(TxState::new(options.time.clone(), hlc, dbv)));
        capture::install(&mut conn, &state, options.max_value_bytes)?;
        let tables = schema::load_tables(&conn)?;
        let dropped_tables = schema::load_dropped_tables(&conn)?;
        let cookie: i64 = conn.query_row("PRAGMA schema_version", [], |r| r.get(0))?;
        let readers = path.map(|p| ReaderPool::new(p, options.readers));
        Ok(Database {
            inner: Inner {
                writer: ThreadLock::new(Some(conn)),
                sync_round: ThreadLock::new(()),
                readers,
                state,
                tables: RwLock::new(
                    tables
                        .into_iter()
                        .map(|t| (t.name.to_string(), Arc::new(t)))
                        .collect(),
                ),
                dropped_tables: RwLock::new(dropped_tables),
                sites: RwLock::new(sites),
                observers: Arc::new(Observers::default()),
                schema_cookie: cookie.into(),
                site_id,
                row_ids,
                bulk: Default::default(),
                options,
            },
        })
    }

    /// This database's site id, created once and kept in the file.
    pub fn site_id(&self) -> SiteId {
        self.inner.site_id
    }

    pub fn options(&self) -> &Options {
        &self.inner.options
    }

    /// The newest committed db_version (one per transaction that wrote
    /// synced tables or applied remote changes).
    pub fn db_version(&self) -> u64 {
        lock(&self.inner.state).committed_dbv
    }

    /// The newest clock this database issued or observed.
    pub fn current_hlc(&self) -> Hlc {
        lock(&self.inner.state).hlc.last()
    }

    /// Runs one statement in its own transaction; returns the number of
    /// rows it changed.
    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<usize> {
        self.write(|tx| tx.execute(sql, params))
    }

    /// Runs several statements (a migration, say) in one transaction.
    pub fn execute_batch(&self, sql: &str) -> Result<()> {
        self.write(|tx| tx.execute_batch(sql))
    }

    /// Runs a query. Read-only statements run on a reader connection, so
    /// they never wait behind a write; others run as a write.
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Rows> {
        match &self.inner.readers {
            Some(pool) => {
                let outcome = pool.with(|conn| {
                    // Statements that write (or whose triggers need the
                    // writer's functions to compile) run on the writer.
                    let Ok(mut stmt) = conn.prepare_cached(sql) else {
                        return Ok(None);
                    };
                    if !stmt.readonly() {
                        return Ok(None);
                    }
                    Ok(Some(collect_rows(&mut stmt, params)?))
                })?;
                match outcome {
                    Some(rows) => Ok(rows),
                    None => self.write(|tx| tx.query(sql, params)),
                }
            }
            None => self.write(|tx| tx.query(sql, params)),
        }
    }

    /// Runs `f` in one write transaction: committed if it returns `Ok`,
    /// rolled back if it returns an error. Inside `f`, run statements on
    /// its transaction: a call on this database that needs the writer fails
    /// with `InvalidInput` (reads of a file database go to a reader, and see
    /// the last commit).
    pub fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let tx = self.transaction()?;
        let value = f(&tx)?;
        tx.commit()?;
        Ok(value)
    }

    /// Starts a write transaction. Dropping it without `commit` rolls back.
    pub fn transaction(&self) -> Result<Transaction<'_>> {
        let guard = self.writer()?;
        let conn = guard.as_ref().expect("checked open");
        run_cached(conn, "BEGIN IMMEDIATE")?;
        let tx = Transaction {
            db: self,
            conn: Some(guard),
        };
        self.catch_up_schema(tx.conn())?;
        Ok(tx)
    }

    /// Inside a write transaction: loads the synced tables again if the
    /// file's schema changed since they were loaded (another handle or
    /// process may have made a table synced or altered one).
    fn catch_up_schema(&self, conn: &Connection) -> Result<()> {
        use std::sync::atomic::Ordering;
        let cookie: i64 = conn
            .prepare_cached("PRAGMA schema_version")?
            .query_row([], |r| r.get(0))?;
        if cookie == self.inner.schema_cookie.load(Ordering::Relaxed) {
            return Ok(());
        }
        let tables = schema::load_tables(conn)?;
        *self
            .inner
            .dropped_tables
            .write()
            .unwrap_or_else(|e| e.into_inner()) = schema::load_dropped_tables(conn)?;
        *self.inner.tables.write().unwrap_or_else(|e| e.into_inner()) = tables
            .into_iter()
            .map(|t| (t.name.to_string(), Arc::new(t)))
            .collect();
        self.inner.schema_cookie.store(cookie, Ordering::Relaxed);
        Ok(())
    }

    /// Records the schema cookie the cached tables match.
    pub(crate) fn note_schema_cookie(&self, conn: &Connection) -> Result<()> {
        let cookie: i64 = conn
            .prepare_cached("PRAGMA schema_version")?
            .query_row([], |r| r.get(0))?;
        self.inner
            .schema_cookie
            .store(cookie, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The synced tables as `conn`'s snapshot has them: the cached ones,
    /// unless the file's schema changed since they were loaded (another
    /// handle or process migrated a table), then those of the snapshot.
    pub(crate) fn tables_in(&self, conn: &Connection) -> Result<Vec<Arc<TableInfo>>> {
        use std::sync::atomic::Ordering;
        let cookie: i64 = conn
            .prepare_cached("PRAGMA schema_version")?
            .query_row([], |r| r.get(0))?;
        if cookie == self.inner.schema_cookie.load(Ordering::Relaxed) {
            return Ok(self.all_tables());
        }
        Ok(schema::load_tables(conn)?
            .into_iter()
            .map(Arc::new)
            .collect())
    }

    /// The site list as the file has it, inside a write transaction:
    /// another handle on the same file may have recorded sites since this
    /// one cached them.
    pub(crate) fn sites_in(&self, conn: &Connection) -> Result<Vec<SiteId>> {
        let count = site_count(conn)?;
        let mut cached = self.inner.sites.write().unwrap_or_else(|e| e.into_inner());
        if count != cached.len() {
            *cached = load_sites(conn)?;
        }
        Ok(cached.clone())
    }

    /// The site list as a read snapshot has it, without changing the
    /// cache. Committed ordinals never change, so a cache of the same length
    /// holds the same sites; exports read this at every sync.
    pub(crate) fn sites_as_of(&self, conn: &Connection) -> Result<Vec<SiteId>> {
        let count = site_count(conn)?;
        {
            let cached = self.inner.sites.read().unwrap_or_else(|e| e.into_inner());
            if count == cached.len() {
                return Ok(cached.clone());
            }
        }
        load_sites(conn)
    }

    pub(crate) fn writer(&self) -> Result<ThreadLockGuard<'_, Option<Connection>>> {
        let guard = self.inner.writer.lock().ok_or_else(inside_a_write)?;
        if guard.is_none() {
            return Err(Error::Closed);
        }
        Ok(guard)
    }

    /// Runs `f` on a connection that sees one consistent snapshot of the
    /// database: a reader in a read transaction, or the writer for
    /// in-memory databases.
    pub(crate) fn read_snapshot<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let run = |conn: &Connection| {
            run_cached(conn, "BEGIN")?;
            let out = f(conn);
            let end = run_cached(conn, if out.is_ok() { "COMMIT" } else { "ROLLBACK" });
            let out = out?;
            end?;
            Ok(out)
        };
        match &self.inner.readers {
            Some(pool) => pool.with(run),
            None => {
                let guard = self.writer()?;
                run(guard.as_ref().expect("checked open"))
            }
        }
    }

    /// Checkpoints the WAL into the main file (for size measurements and
    /// before backups).
    pub fn checkpoint(&self) -> Result<()> {
        let guard = self.writer()?;
        guard.as_ref().expect("checked open").query_row(
            "PRAGMA wal_checkpoint(TRUNCATE)",
            [],
            |_| Ok(()),
        )?;
        Ok(())
    }

    /// Calls `listener` after every commit that changed any of `tables`
    /// (all tables when empty), local or remote, with the changed tables.
    /// Dropping the returned handle stops it.
    pub fn observe(&self, tables: &[&str], listener: impl ChangeListener) -> Observation {
        self.inner.observers.add(tables, Arc::new(listener))
    }

    /// Closes the database; later calls fail with `Error::Closed`.
    pub fn close(&self) -> Result<()> {
        let conn = self.inner.writer.lock().ok_or_else(inside_a_write)?.take();
        if let Some(pool) = &self.inner.readers {
            pool.close();
        }
        if let Some(conn) = conn {
            conn.close().map_err(|(_, e)| Error::from(e))?;
        }
        Ok(())
    }

    pub(crate) fn dispatch_changes(&self) {
        let changed = std::mem::take(&mut lock(&self.inner.state).committed_changes);
        if !changed.is_empty() {
            self.inner.observers.notify(&changed);
        }
    }

    /// Commits the writer's open transaction with Confluo's bookkeeping:
    /// the clock is persisted so it never runs backwards across restarts.
    pub(crate) fn commit_conn(&self, conn: &Connection) -> Result<()> {
        lock(&self.inner.state).committing = true;
        let mut persisted = None;
        let result = (|| -> Result<()> {
            self.flush_captured(conn)?;
            let (hlc, dbv) = {
                let st = lock(&self.inner.state);
                let hlc = (st.hlc.last() > st.persisted_hlc).then(|| st.hlc.last());
                (hlc, st.tx_dbv)
            };
            if let Some(hlc) = hlc {
                conn.prepare_cached("UPDATE confluo_state SET value = ?1 WHERE key = 'hlc'")?
                    .execute([hlc.0 as i64])?;
                persisted = Some(hlc);
            }
            // The db_version counter is kept too: the newest db_version in the
            // metadata can disappear (a kept change merged away), and a
            // reused db_version would hide later changes from peers.
            if let Some(dbv) = dbv {
                conn.prepare_cached(
                    "INSERT INTO confluo_state(key, value) VALUES ('dbv', ?1) \
                     ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
                )?
                .execute([dbv as i64])?;
            }
            run_cached(conn, "COMMIT")?;
            Ok(())
        })();
        {
            let mut st = lock(&self.inner.state);
            st.committing = false;
            if let (Ok(()), Some(hlc)) = (&result, persisted) {
                st.persisted_hlc = hlc;
            }
        }
        if result.is_err() && !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        result
    }

    /// Before a transaction takes its db_version and clock, catches up with
    /// what the file says: another `Database` on the same file (or another
    /// process) may have committed since this one last looked. Runs inside
    /// the write transaction, whose lock keeps the answer current.
    pub(crate) fn catch_up_counters(&self, conn: &Connection) -> Result<()> {
        if lock(&self.inner.state).tx_dbv.is_some() {
            return Ok(());
        }
        let (dbv, hlc): (i64, i64) = conn
            .prepare_cached(
                "SELECT coalesce((SELECT value FROM confluo_state WHERE key = 'dbv'), 0), \
                        coalesce((SELECT value FROM confluo_state WHERE key = 'hlc'), 0)",
            )?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let mut st = lock(&self.inner.state);
        st.committed_dbv = st.committed_dbv.max(dbv as u64);
        st.hlc.observe(Hlc(hlc as u64));
        Ok(())
    }

    pub(crate) fn table(&self, name: &str) -> Option<Arc<TableInfo>> {
        self.inner
            .tables
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The synced table whose identity is `cid` (what changes name).
    pub(crate) fn table_by_cid(&self, cid: &str) -> Option<Arc<TableInfo>> {
        self.inner
            .tables
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|t| &*t.cid == cid)
            .cloned()
    }

    /// Whether `cid` is the identity of a synced table that was dropped.
    pub(crate) fn table_dropped(&self, cid: &str) -> bool {
        self.inner
            .dropped_tables
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|t| &**t == cid)
    }

    pub(crate) fn all_tables(&self) -> Vec<Arc<TableInfo>> {
        let mut t: Vec<_> = self
            .inner
            .tables
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        t.sort_by_key(|t| t.id);
        t
    }

    /// The names of the synced tables.
    pub fn synced_tables(&self) -> Vec<String> {
        self.all_tables()
            .iter()
            .map(|t| t.name.to_string())
            .collect()
    }
}

/// The writer is held by this very thread: a write body called the database
/// (or something needing the writer) instead of its transaction handle.
fn inside_a_write() -> Error {
    Error::invalid(
        "this thread is running a write on this database: use that write's transaction handle \
         (the database itself would wait for the write to end, for ever)",
    )
}

/// How many sites `confluo_sites` holds (their ordinals are dense).
fn site_count(conn: &Connection) -> Result<usize> {
    let newest: i64 = conn
        .prepare_cached("SELECT coalesce(max(ord), -1) FROM confluo_sites")?
        .query_row([], |r| r.get(0))?;
    Ok((newest + 1) as usize)
}

pub(crate) fn load_sites(conn: &Connection) -> Result<Vec<SiteId>> {
    let mut stmt = conn.prepare_cached("SELECT ord, site_id FROM confluo_sites ORDER BY ord")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
    let mut sites = Vec::new();
    for row in rows {
        let (ord, bytes) = row?;
        let site = SiteId::from_slice(&bytes).ok_or_else(|| Error::Sqlite {
            message: "corrupt confluo metadata: bad site id".into(),
            code: None,
        })?;
        if ord as usize != sites.len() {
            return Err(Error::Sqlite {
                message: "corrupt confluo metadata: site ordinals are not dense".into(),
                code: None,
            });
        }
        sites.push(site);
    }
    Ok(sites)
}

/// Runs a statement without rows from the connection's cache: the begin
/// and commit of every write would otherwise be parsed again each time.
fn run_cached(conn: &Connection, sql: &str) -> Result<()> {
    conn.prepare_cached(sql)?.raw_execute()?;
    Ok(())
}

/// Confluo runs every write in its own transaction; app SQL that begins,
/// ends or partly rolls back one would skip its bookkeeping.
fn refuse_transaction_control(sql: &str) -> Result<()> {
    let mut rest = sql.trim_start();
    loop {
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.split_once('\n').map_or("", |(_, r)| r).trim_start();
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.split_once("*/").map_or("", |(_, r)| r).trim_start();
        } else {
            break;
        }
    }
    // Checked on every statement: no allocation unless it is refused.
    let end = rest
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(rest.len());
    let word = &rest[..end];
    let controls = ["BEGIN", "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE"];
    if controls.iter().any(|c| c.eq_ignore_ascii_case(word)) {
        return Err(Error::invalid(format!(
            "{} is not allowed here: use Database::write or Database::transaction for transactions",
            word.to_ascii_uppercase()
        )));
    }
    Ok(())
}

/// Binds `params` to `stmt`, refusing a count that differs from the
/// statement's (SQL NULL would silently fill the missing ones).
fn bind<P: rusqlite::ToSql>(stmt: &mut rusqlite::Statement<'_>, params: &[P]) -> Result<()> {
    let expected = stmt.parameter_count();
    if params.len() != expected {
        return Err(Error::invalid(format!(
            "the statement takes {expected} parameters, {} were given",
            params.len()
        )));
    }
    for (i, p) in params.iter().enumerate() {
        stmt.raw_bind_parameter(i + 1, p)?;
    }
    Ok(())
}

fn collect_rows<P: rusqlite::ToSql>(
    stmt: &mut rusqlite::Statement<'_>,
    params: &[P],
) -> Result<Rows> {
    bind(stmt, params)?;
    let mut rows = Vec::new();
    let mut cursor = stmt.raw_query();
    while let Some(row) = cursor.next()? {
        let n = row.as_ref().column_count();
        rows.push(
            (0..n)
                .map(|i| row.get_ref(i).map(Value::from_ref))
                .collect::<rusqlite::Result<Vec<_>>>()?,
        );
    }
    drop(cursor);
    // Read the names after stepping: a statement prepared before a schema
    // change is recompiled by its first step, and `*` may have grown.
    let columns = stmt.column_names().map(String::from).collect();
    Ok(Rows { columns, rows })
}

/// A write transaction. Statements run on the writer connection; reads in
/// it see its own writes. Dropped without `commit`, it rolls back.
pub struct Transaction<'db> {
    db: &'db Database,
    conn: Option<ThreadLockGuard<'db, Option<Connection>>>,
}

impl Transaction<'_> {
    pub(crate) fn conn(&self) -> &Connection {
        self.conn
            .as_ref()
            .and_then(|g| g.as_ref())
            .expect("transaction is open")
    }

    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<usize> {
        let mut stmt = self.prepare_cached(sql)?;
        self.statement(|_| {
            bind(&mut stmt, params)?;
            Ok(stmt.raw_execute()?)
        })
    }

    /// Prepares one statement to run many times in this transaction, with
    /// borrowed parameters: a loop over rows then pays neither the lookup
    /// of its SQL text nor a copy of each parameter per row.
    pub fn prepare(&self, sql: &str) -> Result<Statement<'_>> {
        Ok(Statement {
            tx: self,
            stmt: self.prepare_cached(sql)?,
        })
    }

    /// One statement from the writer's cache, refused if it controls
    /// transactions (the cache only holds single statements: the first
    /// word is the whole story).
    fn prepare_cached(&self, sql: &str) -> Result<rusqlite::CachedStatement<'_>> {
        refuse_transaction_control(sql)?;
        Ok(self.conn().prepare_cached(sql)?)
    }

    /// Runs several statements. Each one that succeeds stays done, as in
    /// SQLite; the first that fails stops the batch with its error.
    pub fn execute_batch(&self, sql: &str) -> Result<()> {
        use fallible_iterator::FallibleIterator;
        let mut batch = rusqlite::Batch::new(self.conn(), sql);
        while let Some(mut stmt) = batch.next()? {
            refuse_transaction_control(&stmt.expanded_sql().unwrap_or_default())?;
            self.statement(|_| {
                let mut rows = stmt.raw_query();
                while rows.next()?.is_some() {}
                Ok(())
            })?;
        }
        Ok(())
    }

    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Rows> {
        let mut stmt = self.prepare_cached(sql)?;
        self.statement(|_| collect_rows(&mut stmt, params))
    }

    /// Runs one statement. A failed statement is usually undone by SQLite,
    /// but not always (`OR FAIL` keeps the rows written before the failure),
    /// so what it captured is kept and checked against the table at commit.
    fn statement<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let mark = lock(&self.db.inner.state).events.len();
        let out = f(self.conn());
        if out.is_err() {
            for e in &mut lock(&self.db.inner.state).events[mark..] {
                e.uncertain = true;
            }
        }
        out
    }

    pub fn commit(self) -> Result<()> {
        self.commit_then(|_| Ok(()))
    }

    /// Commits, then runs `after` on the connection while still holding the
    /// writer lock (so caches of what was committed are updated before any
    /// other write can start), then notifies observers.
    pub(crate) fn commit_then(
        mut self,
        after: impl FnOnce(&Connection) -> Result<()>,
    ) -> Result<()> {
        let guard = self.conn.take().expect("transaction is open");
        let conn = guard.as_ref().expect("checked open");
        let result = self.db.commit_conn(conn).and_then(|()| after(conn));
        drop(guard);
        self.db.dispatch_changes();
        result
    }

    pub fn rollback(mut self) -> Result<()> {
        let guard = self.conn.take().expect("transaction is open");
        guard
            .as_ref()
            .expect("checked open")
            .execute_batch("ROLLBACK")?;
        Ok(())
    }
}

/// A statement prepared by `Transaction::prepare`, run as often as needed
/// while its transaction is open: what plain SQLite code does with one
/// prepared statement and a bind per row. Each run is tracked as any other
/// statement of the transaction.
pub struct Statement<'tx> {
    tx: &'tx Transaction<'tx>,
    stmt: rusqlite::CachedStatement<'tx>,
}

impl Statement<'_> {
    /// Runs the statement with `params`; returns the number of rows it
    /// changed.
    pub fn execute(&mut self, params: &[ValueRef<'_>]) -> Result<usize> {
        let stmt = &mut self.stmt;
        self.tx.statement(|_| {
            bind(stmt, params)?;
            Ok(stmt.raw_execute()?)
        })
    }

    /// Runs the statement as a query and returns its rows.
    pub fn query(&mut self, params: &[ValueRef<'_>]) -> Result<Rows> {
        let stmt = &mut self.stmt;
        self.tx.statement(|_| collect_rows(stmt, params))
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if let Some(guard) = self.conn.take() {
            if let Some(conn) = guard.as_ref() {
                if !conn.is_autocommit() {
                    let _ = conn.execute_batch("ROLLBACK");
                }
            }
        }
    }
}

/// Read-only connections for queries, opened on demand and kept for reuse.
struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    keep: usize,
    closed: std::sync::atomic::AtomicBool,
}

impl ReaderPool {
    fn new(path: PathBuf, keep: usize) -> Self {
        ReaderPool {
            path,
            idle: Mutex::new(Vec::new()),
            keep,
            closed: false.into(),
        }
    }

    fn open(&self) -> Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // A device's push prepares four statements per synced table.
        conn.set_prepared_statement_cache_capacity(64);
        capture::register_pure_functions(&conn)?;
        Ok(conn)
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        use std::sync::atomic::Ordering;
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let conn = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match conn {
            Some(c) => c,
            None => self.open()?,
        };
        let out = f(&conn);
        if !self.closed.load(Ordering::SeqCst) {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < self.keep {
                idle.push(conn);
            }
        }
        out
    }

    fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}
