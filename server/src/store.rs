//! Where a server keeps each space: the latest state of every cell with its
//! metadata, and a per-space version. Storage sits behind `Store` so that a
//! PostgreSQL backend can stand beside the embedded SQLite one.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use confluo_core::merge::{Cell, Outcome, RowState, Target, Version};
use confluo_core::{pack_key, Change, ChangeSet, SiteId};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The device's cursor is ahead of this space's history: the server's
    /// data was reset or restored. The device must pull from scratch.
    #[error("cursor {cursor} is beyond this space's history (version {version})")]
    CursorGone { cursor: u64, version: u64 },
    /// The device knew another incarnation of the space (its data was wiped
    /// and started again): its cursor means nothing here.
    #[error("the space's history was reset (epoch {known} is gone)")]
    EpochGone { known: String },
    /// The version at the device's cursor is not the one it saw: the
    /// server was restored from a backup or rewound, and made another
    /// version of that number since. The device must pull from scratch.
    #[error("the history at version {cursor} is not the one this device saw (the server was restored or rewound)")]
    HistoryRewritten { cursor: u64 },
    #[error("bad input: {0}")]
    BadInput(String),
    #[error("storage: {0}")]
    Storage(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Storage(e.to_string())
    }
}

impl From<confluo_core::Error> for StoreError {
    fn from(e: confluo_core::Error) -> Self {
        match e {
            confluo_core::Error::Sqlite { message, .. } => StoreError::Storage(message),
            other => StoreError::BadInput(other.to_string()),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushOutcome {
    /// The space's version after the push (unchanged if nothing won).
    pub version: u64,
    /// That version's tag (see `Store::version_tag`).
    pub tag: Option<String>,
    pub applied: usize,
    pub stale: usize,
}

/// Where a pull page stopped inside one version too large for one page:
/// after this row of that version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub version: u64,
    pub table: String,
    pub key: Vec<u8>,
}

/// One page of a pull: every change of the versions in `(cursor, until]`,
/// or, when `resume` is set, a slice of version `until + 1..` that goes on
/// in the next page.
#[derive(Debug, Clone)]
pub struct Page {
    pub changes: Vec<Change>,
    pub until: u64,
    /// The tag of version `until` (see `Store::version_tag`).
    pub until_tag: Option<String>,
    pub more: bool,
    pub resume: Option<Resume>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaceState {
    pub version: u64,
    pub epoch: String,
}

pub trait Store: Send + Sync + 'static {
    /// Merges a push (one or more encoded, already validated change sets)
    /// into `space` in one transaction, under one new version.
    fn push(&self, space: &str, parts: &[Vec<u8>]) -> StoreResult<PushOutcome>;
    /// Changes after `cursor` (or after `resume`), up to about `budget`
    /// bytes, never cutting a version unless it alone exceeds the budget.
    /// Changes that originated at `exclude` are left out.
    fn pull(
        &self,
        space: &str,
        cursor: u64,
        resume: Option<&Resume>,
        exclude: Option<SiteId>,
        budget: usize,
    ) -> StoreResult<Page>;
    /// The space's current version and epoch (`None` for a space nobody
    /// pushed to). The epoch is a random id given to a space when it is
    /// created, so a device can tell a wiped and regrown space from its own.
    fn space(&self, space: &str) -> StoreResult<Option<SpaceState>>;
    /// Keeps one part of a push sent in several requests by device `site`.
    /// Sending a part again (a retry after a lost answer) replaces it; a
    /// device has one unfinished push per space at most, so the parts of
    /// its other pushes there are dropped.
    fn stage(
        &self,
        space: &str,
        site: SiteId,
        push_id: &str,
        part: u32,
        body: &[u8],
    ) -> StoreResult<()>;
    /// Takes parts `1..last` of a push, in order, and forgets every part of
    /// it; `None` if one of them is missing.
    fn take_staged(
        &self,
        space: &str,
        push_id: &str,
        last: u32,
    ) -> StoreResult<Option<Vec<Vec<u8>>>>;
    /// This server's own site id (the source of the change sets it sends).
    fn server_site(&self) -> SiteId;
    /// The random tag version `version` of `space` got when it was made
    /// (`None` for versions made before tags were kept). A device sends the
    /// tag of its cursor: a server restored from a backup, or rewound,
    /// has made another version of that number since, with another tag,
    /// and answers 410 instead of silently reusing the number.
    fn version_tag(&self, space: &str, version: u64) -> StoreResult<Option<String>>;
}

/// One row per synced row of a space: its causal length, its newest
/// version, and its winning cells (marker and columns, each with the
/// version that stored it) packed in the engine's change-set encoding. One
/// row per row, not per cell, keeps a push to a couple of B-tree writes
/// per row.
///
/// `row_versions` lists, for each row, every version that one of its
/// winning cells carries. Pulls walk it in version order, so a page that
/// ends at version U carries every cell of the versions up to U, also the
/// cells of rows that a later push has since moved on.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS server_meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS spaces(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, version INTEGER NOT NULL, epoch TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows(
  space INTEGER NOT NULL, tbl TEXT NOT NULL, pk BLOB NOT NULL,
  cl INTEGER NOT NULL, version INTEGER NOT NULL, cells BLOB NOT NULL,
  PRIMARY KEY (space, tbl, pk)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS row_versions(
  space INTEGER NOT NULL, version INTEGER NOT NULL, tbl TEXT NOT NULL, pk BLOB NOT NULL,
  PRIMARY KEY (space, version, tbl, pk)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS versions(
  space INTEGER NOT NULL, version INTEGER NOT NULL, tag TEXT NOT NULL,
  PRIMARY KEY (space, version)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS space_tables(
  space INTEGER NOT NULL, tbl TEXT NOT NULL, key_arity INTEGER NOT NULL,
  PRIMARY KEY (space, tbl)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS staged(
  space TEXT NOT NULL, push_id TEXT NOT NULL, part INTEGER NOT NULL, site BLOB NOT NULL,
  body BLOB NOT NULL, created INTEGER NOT NULL,
  PRIMARY KEY (space, push_id, part)) WITHOUT ROWID;
";

/// The layout of the server's tables. 1: rows found by their newest
/// version (an index), staged parts keyed by push id alone; 2: rows found
/// by every version of their cells (`row_versions`), staged parts keyed by
/// space and push id.
const FORMAT: i64 = 2;

/// Brings a database of an older layout to `FORMAT`, in one transaction.
fn migrate(conn: &Connection) -> StoreResult<()> {
    let format: Option<i64> = conn
        .query_row(
            "SELECT value FROM server_meta WHERE key = 'format'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    match format {
        Some(FORMAT) => return Ok(()),
        Some(f) if f > FORMAT => {
            return Err(StoreError::Storage(format!(
                "the database has layout {f}, newer than this server's {FORMAT}"
            )))
        }
        _ => {}
    }
    let mut read = conn.prepare("SELECT space, tbl, pk, cells FROM rows")?;
    let mut add = conn.prepare(
        "INSERT OR IGNORE INTO row_versions(space, version, tbl, pk) VALUES (?1, ?2, ?3, ?4)",
    )?;
    let mut rows = read.query([])?;
    while let Some(row) = rows.next()? {
        let stored = ChangeSet::decode(row.get_ref(3)?.as_blob().map_err(rusqlite::Error::from)?)
            .map_err(|e| StoreError::Storage(format!("stored row: {e}")))?;
        let (space, tbl, pk): (i64, String, Vec<u8>) = (row.get(0)?, row.get(1)?, row.get(2)?);
        for v in cell_versions(&stored.changes) {
            add.execute(params![space, v as i64, tbl, pk])?;
        }
    }
    conn.execute_batch("DROP INDEX IF EXISTS rows_by_version")?;
    // Staged parts live an hour at most: starting the table anew with its
    // new key only makes a device send an unfinished push again.
    let staged_by_space: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('staged') WHERE name = 'site')",
        [],
        |r| r.get(0),
    )?;
    if !staged_by_space {
        conn.execute_batch("DROP TABLE staged")?;
        conn.execute_batch(SCHEMA)?;
    }
    conn.execute(
        "INSERT OR REPLACE INTO server_meta(key, value) VALUES ('format', ?1)",
        [FORMAT],
    )?;
    Ok(())
}

/// About how many bytes a change takes on the wire.
fn change_size(c: &Change) -> usize {
    24 + c.value.payload_len()
        + c.pk.iter().map(|v| v.payload_len()).sum::<usize>()
        + c.column.as_deref().map_or(0, str::len)
}

/// The distinct versions a row's cells carry, ascending.
fn cell_versions(cells: &[Change]) -> Vec<u64> {
    let mut v: Vec<u64> = cells.iter().map(|c| c.db_version).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The most bytes of unfinished multi-request pushes kept per space.
pub const MAX_STAGED_BYTES: usize = 256 << 20;

/// How long parts of an unfinished multi-request push are kept.
const STAGED_TTL: Duration = Duration::from_secs(3600);

/// The embedded store: one SQLite file, one writer, a few readers.
pub struct SqliteStore {
    path: Option<std::path::PathBuf>,
    writer: FairMutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    site: SiteId,
    max_staged_bytes: usize,
    space_locks: Vec<Mutex<()>>,
    /// Called once, between two steps of a push (tests: to act while a
    /// push runs).
    #[cfg(test)]
    between_steps: Mutex<Option<Box<dyn Fn() + Send>>>,
}

/// A mutex that hands itself out in the order it was asked for, so that a
/// push merged in many steps cannot take the writer back before a push to
/// another space that waits for it (std's `Mutex` makes no such promise).
pub(crate) struct FairMutex<T> {
    next_ticket: std::sync::atomic::AtomicU64,
    serving: Mutex<u64>,
    turn: std::sync::Condvar,
    value: Mutex<T>,
}

/// The value of a `FairMutex`, held; the next in line goes on drop.
pub(crate) struct FairGuard<'a, T> {
    owner: &'a FairMutex<T>,
    guard: Option<std::sync::MutexGuard<'a, T>>,
}

impl<T> FairMutex<T> {
    fn new(value: T) -> Self {
        FairMutex {
            next_ticket: 0.into(),
            serving: Mutex::new(0),
            turn: std::sync::Condvar::new(),
            value: Mutex::new(value),
        }
    }

    fn lock(&self) -> FairGuard<'_, T> {
        let ticket = self
            .next_ticket
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut serving = self.serving.lock().unwrap_or_else(|e| e.into_inner());
        while *serving != ticket {
            serving = self.turn.wait(serving).unwrap_or_else(|e| e.into_inner());
        }
        drop(serving);
        FairGuard {
            owner: self,
            guard: Some(self.value.lock().unwrap_or_else(|e| e.into_inner())),
        }
    }
}

impl<T> std::ops::Deref for FairGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.guard.as_ref().expect("held until drop")
    }
}

impl<T> Drop for FairGuard<'_, T> {
    fn drop(&mut self) {
        self.guard.take();
        *self.owner.serving.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.owner.turn.notify_all();
    }
}

/// Changes merged per transaction of a push (see `SqliteStore::push`).
const PUSH_STEP: usize = 10_000;

/// Locks that serialize pushes to one space.
const SPACE_LOCKS: usize = 64;

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl SqliteStore {
    pub fn open(path: &Path) -> StoreResult<SqliteStore> {
        let conn = Connection::open(path)?;
        Self::init(conn, Some(path.to_path_buf()))
    }

    pub fn open_in_memory() -> StoreResult<SqliteStore> {
        Self::init(Connection::open_in_memory()?, None)
    }

    fn init(conn: Connection, path: Option<std::path::PathBuf>) -> StoreResult<SqliteStore> {
        conn.busy_timeout(Duration::from_secs(10))?;
        if path.is_some() {
            conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
            // A push is acknowledged only once it is on disk.
            conn.pragma_update(None, "synchronous", "FULL")?;
        }
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let setup = conn
            .execute_batch(SCHEMA)
            .map_err(StoreError::from)
            .and_then(|()| migrate(&conn));
        match setup {
            Ok(()) => conn.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
        let site: Option<Vec<u8>> = conn
            .query_row(
                "SELECT value FROM server_meta WHERE key = 'site'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let site = match site.and_then(|b| SiteId::from_slice(&b)) {
            Some(s) => s,
            None => {
                let s = SiteId::random();
                conn.execute(
                    "INSERT INTO server_meta VALUES ('site', ?1)",
                    [&s.as_bytes()[..]],
                )?;
                s
            }
        };
        conn.set_prepared_statement_cache_capacity(64);
        Ok(SqliteStore {
            path,
            writer: FairMutex::new(conn),
            readers: Mutex::new(Vec::new()),
            site,
            max_staged_bytes: MAX_STAGED_BYTES,
            space_locks: (0..SPACE_LOCKS).map(|_| Mutex::new(())).collect(),
            #[cfg(test)]
            between_steps: Mutex::new(None),
        })
    }

    /// Runs `f` in one write transaction on the writer.
    fn in_transaction<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        let conn = self.writer.lock();
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = f(&conn);
        match &result {
            Ok(_) => conn.execute_batch("COMMIT")?,
            Err(_) => {
                let _ = conn.execute_batch("ROLLBACK");
            }
        }
        result
    }

    /// The lock pushes to `space` take (one of a fixed set: spaces that
    /// share one wait for each other, rarely and briefly).
    fn space_lock(&self, space: &str) -> &Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        space.hash(&mut h);
        &self.space_locks[(h.finish() % SPACE_LOCKS as u64) as usize]
    }

    /// Sets how many bytes of unfinished pushes a space may keep.
    pub fn with_staging_cap(mut self, bytes: usize) -> Self {
        self.max_staged_bytes = bytes;
        self
    }

    fn with_reader<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        let Some(path) = &self.path else {
            let conn = self.writer.lock();
            return f(&conn);
        };
        let conn = self.readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match conn {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                c.busy_timeout(Duration::from_secs(10))?;
                c
            }
        };
        conn.execute_batch("BEGIN")?;
        let out = f(&conn);
        let _ = conn.execute_batch("COMMIT");
        let mut idle = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < 8 {
            idle.push(conn);
        }
        out
    }
}

/// Where a cell's winning change is: among the stored cells of the row,
/// or among the pushed changes.
#[derive(Clone, Copy, Debug)]
enum Winner {
    Stored(usize),
    Pushed(usize),
}

fn space_id(conn: &Connection, space: &str) -> StoreResult<Option<(i64, u64)>> {
    Ok(conn
        .prepare_cached("SELECT id, version FROM spaces WHERE name = ?1")?
        .query_row([space], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64))
        })
        .optional()?)
}

fn tag_of(conn: &Connection, space: i64, version: u64) -> StoreResult<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT tag FROM versions WHERE space = ?1 AND version = ?2")?
        .query_row(params![space, version as i64], |r| r.get(0))
        .optional()?)
}

impl Store for SqliteStore {
    /// Merges a push in steps of at most `PUSH_STEP` changes, each its own
    /// transaction, so that pushes to other spaces (which need the one
    /// writer) go between the steps instead of waiting for a large push.
    /// The push stays one version, taken in order and made visible at once:
    /// its rows carry the new version, which readers do not see (pulls stop
    /// at the space's version) until the last step moves the space to it.
    /// Pushes to the same space wait for each other (a lock per space).
    /// Everything that can refuse the push is checked in the first step,
    /// before any row is written; a later step can only fail on storage,
    /// and the device then sends the same push again, which merges the
    /// same way over what the first attempt left.
    fn push(&self, space: &str, parts: &[Vec<u8>]) -> StoreResult<PushOutcome> {
        let _space_lock = self
            .space_lock(space)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (sid, current) = self.in_transaction(|conn| {
            let (sid, current) = match space_id(conn, space)? {
                Some(s) => s,
                None => {
                    conn.execute(
                        "INSERT INTO spaces(name, version, epoch) VALUES (?1, 0, ?2)",
                        params![space, uuid::Uuid::new_v4().to_string()],
                    )?;
                    (conn.last_insert_rowid(), 0)
                }
            };
            let mut shapes = TableShapes::default();
            for part in parts {
                for c in ChangeSet::decode(part)?.changes {
                    shapes.check(conn, sid, &c)?;
                }
            }
            Ok((sid, current))
        })?;
        let version = current + 1;
        let mut outcome = PushOutcome {
            version: current,
            tag: None,
            applied: 0,
            stale: 0,
        };
        for part in parts {
            let cs = ChangeSet::decode(part)?;
            for step in cs.changes.chunks(PUSH_STEP) {
                self.in_transaction(|conn| {
                    merge_into(conn, sid, version, self.site, step, &mut outcome)
                })?;
                #[cfg(test)]
                {
                    let hook = self.between_steps.lock().unwrap().take();
                    if let Some(f) = hook {
                        f();
                    }
                }
            }
        }
        self.in_transaction(|conn| {
            if outcome.applied > 0 {
                conn.execute(
                    "UPDATE spaces SET version = ?1 WHERE id = ?2",
                    params![version as i64, sid],
                )?;
                conn.prepare_cached(
                    "INSERT OR REPLACE INTO versions(space, version, tag) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![
                    sid,
                    version as i64,
                    uuid::Uuid::new_v4().simple().to_string()
                ])?;
                outcome.version = version;
            }
            outcome.tag = tag_of(conn, sid, outcome.version)?;
            Ok(())
        })?;
        Ok(outcome)
    }

    fn pull(
        &self,
        space: &str,
        cursor: u64,
        resume: Option<&Resume>,
        exclude: Option<SiteId>,
        budget: usize,
    ) -> StoreResult<Page> {
        self.with_reader(|conn| {
            let Some((sid, version)) = space_id(conn, space)? else {
                if cursor > 0 {
                    return Err(StoreError::CursorGone { cursor, version: 0 });
                }
                return Ok(Page {
                    changes: Vec::new(),
                    until: 0,
                    until_tag: None,
                    more: false,
                    resume: None,
                });
            };
            if cursor > version {
                return Err(StoreError::CursorGone { cursor, version });
            }
            if let Some(r) = resume {
                if r.version <= cursor || r.version > version {
                    return Err(StoreError::BadInput(
                        "the resume token does not belong to this cursor".into(),
                    ));
                }
            }
            // Only versions up to the space's: a push being merged in steps
            // writes rows at its version before the space moves to it.
            // Each row once per version its cells carry, in version order:
            // a page holds, for each version it covers, that version's
            // cells of every row, whichever version the row is at now.
            const FROM: &str = "SELECT v.version, v.tbl, v.pk, r.cells FROM row_versions AS v \
                 JOIN rows AS r ON r.space = v.space AND r.tbl = v.tbl AND r.pk = v.pk";
            let mut stmt;
            let mut rows = match resume {
                Some(r) => {
                    stmt = conn.prepare_cached(&format!(
                        "{FROM} WHERE v.space = ?1 AND (v.version, v.tbl, v.pk) > (?2, ?3, ?4) \
                         AND v.version <= ?5 ORDER BY v.version, v.tbl, v.pk"
                    ))?;
                    stmt.query(params![
                        sid,
                        r.version as i64,
                        r.table,
                        r.key,
                        version as i64
                    ])?
                }
                None => {
                    stmt = conn.prepare_cached(&format!(
                        "{FROM} WHERE v.space = ?1 AND v.version > ?2 AND v.version <= ?3 \
                         ORDER BY v.version, v.tbl, v.pk"
                    ))?;
                    stmt.query(params![sid, cursor as i64, version as i64])?
                }
            };
            let mut page = Page {
                changes: Vec::new(),
                until: cursor,
                until_tag: None,
                more: false,
                resume: None,
            };
            let mut used = 0usize;
            // The version being read, and the last row read (for resuming).
            let mut reading: Option<u64> = None;
            let mut last_row: Option<(String, Vec<u8>)> = None;
            loop {
                let Some(row) = rows.next()? else {
                    page.until = version;
                    break;
                };
                let v = row.get::<_, i64>(0)? as u64;
                if let Some(done) = reading.filter(|r| *r != v) {
                    page.until = done;
                    if used >= budget {
                        break;
                    }
                }
                reading = Some(v);
                if used >= budget && page.until == cursor {
                    // The first version alone is over the budget: cut it
                    // here; the next page goes on after the last row sent.
                    if let Some((table, key)) = last_row.take() {
                        page.resume = Some(Resume {
                            version: v,
                            table,
                            key,
                        });
                        break;
                    }
                }
                last_row = Some((row.get(1)?, row.get(2)?));
                let stored = ChangeSet::decode(
                    row.get_ref(3)?
                        .as_blob()
                        .map_err(|e| StoreError::Storage(e.to_string()))?,
                )
                .map_err(|e| StoreError::Storage(format!("stored row: {e}")))?;
                // The row's cells of this version, but not the device's own.
                for c in stored.changes {
                    if c.db_version == v && Some(c.site) != exclude {
                        used += change_size(&c);
                        page.changes.push(c);
                    }
                }
            }
            page.more = page.resume.is_some() || page.until < version;
            page.until_tag = tag_of(conn, sid, page.until)?;
            // Seq numbers the changes of each version in page order.
            let mut seq = 0u32;
            let mut prev = None;
            for c in &mut page.changes {
                seq = if prev == Some(c.db_version) {
                    seq + 1
                } else {
                    0
                };
                prev = Some(c.db_version);
                c.seq = seq;
            }
            Ok(page)
        })
    }

    fn space(&self, space: &str) -> StoreResult<Option<SpaceState>> {
        self.with_reader(|conn| {
            Ok(conn
                .prepare_cached("SELECT version, epoch FROM spaces WHERE name = ?1")?
                .query_row([space], |r| {
                    Ok(SpaceState {
                        version: r.get::<_, i64>(0)? as u64,
                        epoch: r.get(1)?,
                    })
                })
                .optional()?)
        })
    }

    fn stage(
        &self,
        space: &str,
        site: SiteId,
        push_id: &str,
        part: u32,
        body: &[u8],
    ) -> StoreResult<()> {
        let conn = self.writer.lock();
        conn.execute(
            "DELETE FROM staged WHERE created < ?1",
            [now_secs() - STAGED_TTL.as_secs() as i64],
        )?;
        conn.execute(
            "DELETE FROM staged WHERE space = ?1 AND site = ?2 AND push_id <> ?3",
            params![space, &site.as_bytes()[..], push_id],
        )?;
        // The part this one replaces does not count against the cap.
        let staged: i64 = conn.query_row(
            "SELECT coalesce(sum(length(body)), 0) FROM staged \
             WHERE space = ?1 AND NOT (push_id = ?2 AND part = ?3)",
            params![space, push_id, part],
            |r| r.get(0),
        )?;
        if staged as usize + body.len() > self.max_staged_bytes {
            return Err(StoreError::BadInput(format!(
                "more than {} bytes of unfinished pushes are waiting for this space",
                self.max_staged_bytes
            )));
        }
        conn.execute(
            "INSERT OR REPLACE INTO staged(space, push_id, part, site, body, created) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![space, push_id, part, &site.as_bytes()[..], body, now_secs()],
        )?;
        Ok(())
    }

    fn take_staged(
        &self,
        space: &str,
        push_id: &str,
        last: u32,
    ) -> StoreResult<Option<Vec<Vec<u8>>>> {
        let conn = self.writer.lock();
        let parts = conn
            .prepare_cached(
                "SELECT part, body FROM staged WHERE space = ?1 AND push_id = ?2 AND part < ?3 ORDER BY part",
            )?
            .query_map(params![space, push_id, last], |r| {
                Ok((r.get::<_, u32>(0)?, r.get::<_, Vec<u8>>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        conn.execute(
            "DELETE FROM staged WHERE space = ?1 AND push_id = ?2",
            params![space, push_id],
        )?;
        let complete = parts.iter().map(|(i, _)| *i).eq(1..last);
        Ok(complete.then(|| parts.into_iter().map(|(_, body)| body).collect()))
    }

    fn server_site(&self) -> SiteId {
        self.site
    }

    fn version_tag(&self, space: &str, version: u64) -> StoreResult<Option<String>> {
        self.with_reader(|conn| match space_id(conn, space)? {
            Some((sid, _)) => tag_of(conn, sid, version),
            None => Ok(None),
        })
    }
}

/// The shape of each table of a space, learned from the first push that
/// names it: a push that contradicts it is refused, since no device could
/// apply it and every pull would carry it.
#[derive(Default)]
struct TableShapes {
    key_arity: std::collections::HashMap<Arc<str>, usize>,
}

impl TableShapes {
    fn check(&mut self, conn: &Connection, space: i64, c: &Change) -> StoreResult<()> {
        let arity = match self.key_arity.get(&c.table) {
            Some(&n) => n,
            None => {
                let known: Option<i64> = conn
                    .prepare_cached(
                        "SELECT key_arity FROM space_tables WHERE space = ?1 AND tbl = ?2",
                    )?
                    .query_row(params![space, &*c.table], |r| r.get(0))
                    .optional()?;
                let n = match known {
                    Some(n) => n as usize,
                    None => {
                        // Rows stored before shapes were kept tell it too.
                        let stored: Option<Vec<u8>> = conn
                            .prepare_cached(
                                "SELECT pk FROM rows WHERE space = ?1 AND tbl = ?2 LIMIT 1",
                            )?
                            .query_row(params![space, &*c.table], |r| r.get(0))
                            .optional()?;
                        let n = match stored {
                            Some(pk) => confluo_core::unpack_key(&pk)
                                .map_err(|e| StoreError::Storage(format!("stored key: {e}")))?
                                .len(),
                            None => c.pk.len(),
                        };
                        conn.prepare_cached(
                            "INSERT INTO space_tables(space, tbl, key_arity) VALUES (?1, ?2, ?3)",
                        )?
                        .execute(params![space, &*c.table, n as i64])?;
                        n
                    }
                };
                self.key_arity.insert(c.table.clone(), n);
                n
            }
        };
        if c.pk.len() != arity {
            return Err(StoreError::BadInput(format!(
                "table {:?} has keys of {arity} value(s) in this space, but a change has a key of {}",
                c.table,
                c.pk.len()
            )));
        }
        Ok(())
    }
}

/// Merges pushed changes row by row with the engine's merge rules.
fn merge_into(
    conn: &Connection,
    space: i64,
    version: u64,
    server: SiteId,
    changes: &[Change],
    outcome: &mut PushOutcome,
) -> StoreResult<()> {
    let mut load =
        conn.prepare_cached("SELECT cells FROM rows WHERE space = ?1 AND tbl = ?2 AND pk = ?3")?;
    let mut save = conn.prepare_cached(
        "INSERT INTO rows(space, tbl, pk, cl, version, cells) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
         ON CONFLICT(space, tbl, pk) DO UPDATE SET cl = excluded.cl, version = excluded.version, cells = excluded.cells",
    )?;
    let mut add_version = conn.prepare_cached(
        "INSERT OR IGNORE INTO row_versions(space, version, tbl, pk) VALUES (?1, ?2, ?3, ?4)",
    )?;
    let mut drop_version = conn.prepare_cached(
        "DELETE FROM row_versions WHERE space = ?1 AND version = ?2 AND tbl = ?3 AND pk = ?4",
    )?;
    let mut shapes = TableShapes::default();
    let mut start = 0;
    while start < changes.len() {
        let first = &changes[start];
        let end = start
            + changes[start..]
                .iter()
                .take_while(|c| c.table == first.table && c.pk == first.pk)
                .count();
        shapes.check(conn, space, first)?;
        let key = pack_key(&first.pk);
        let stored: Vec<Change> = match load
            .query_row(params![space, &*first.table, key], |r| {
                r.get::<_, Vec<u8>>(0)
            })
            .optional()?
        {
            Some(blob) => {
                ChangeSet::decode(&blob)
                    .map_err(|e| StoreError::Storage(format!("stored row: {e}")))?
                    .changes
            }
            None => Vec::new(),
        };
        // Column slots are local to this row.
        let mut columns: Vec<Arc<str>> = Vec::new();
        let mut target = |c: &Change| match &c.column {
            None => Target::Marker,
            Some(name) => Target::Column(match columns.iter().position(|n| n == name) {
                Some(i) => i,
                None => {
                    columns.push(name.clone());
                    columns.len() - 1
                }
            }),
        };
        let mut row: RowState<Winner> = RowState::unknown();
        for (i, c) in stored.iter().enumerate() {
            row.merge(
                target(c),
                c.cl,
                Version {
                    hlc: c.hlc,
                    site: c.site,
                },
                Winner::Stored(i),
            );
        }
        let mut won = false;
        for (i, c) in changes[start..end].iter().enumerate() {
            match row.merge(
                target(c),
                c.cl,
                Version {
                    hlc: c.hlc,
                    site: c.site,
                },
                Winner::Pushed(start + i),
            ) {
                Outcome::Stale => outcome.stale += 1,
                Outcome::Won { .. } => {
                    outcome.applied += 1;
                    won = true;
                }
            }
        }
        if won {
            let winners: Vec<Change> = row
                .marker
                .iter()
                .chain(row.cells.iter().flatten())
                .map(|cell: &Cell<Winner>| match cell.data {
                    Winner::Stored(i) => stored[i].clone(),
                    Winner::Pushed(i) => Change {
                        db_version: version,
                        seq: 0,
                        ..changes[i].clone()
                    },
                })
                .collect();
            let (before, after) = (cell_versions(&stored), cell_versions(&winners));
            let blob = ChangeSet {
                source: server,
                recipient: None,
                since: 0,
                until: version,
                changes: winners,
            }
            .encode();
            save.execute(params![
                space,
                &*first.table,
                key,
                row.cl as i64,
                version as i64,
                blob
            ])?;
            // Versions no cell of the row carries any more are forgotten;
            // the new one is added.
            for v in before.iter().filter(|v| !after.contains(v)) {
                drop_version.execute(params![space, *v as i64, &*first.table, key])?;
            }
            for v in after.iter().filter(|v| !before.contains(v)) {
                add_version.execute(params![space, *v as i64, &*first.table, key])?;
            }
        }
        start = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use confluo_core::{Hlc, Value};

    fn change(pk: &str, column: Option<&str>, hlc: u64) -> Change {
        Change {
            table: Arc::from("t"),
            pk: vec![Value::Text(pk.into())].into(),
            column: column.map(Arc::from),
            value: if column.is_some() {
                Value::Text(format!("{pk}-{hlc}"))
            } else {
                Value::Null
            },
            hlc: Hlc(hlc),
            site: SiteId::from_bytes([7; 16]),
            cl: 1,
            db_version: 1,
            seq: 0,
        }
    }

    fn push(store: &SqliteStore, changes: Vec<Change>) -> PushOutcome {
        let cs = ChangeSet {
            source: SiteId::from_bytes([7; 16]),
            recipient: None,
            since: 0,
            until: 1,
            changes,
        };
        store.push("s", &[cs.encode()]).unwrap()
    }

    #[test]
    fn a_sliced_version_delivers_rows_that_moved_on_between_slices() {
        let store = SqliteStore::open_in_memory().unwrap();
        let mut v1 = Vec::new();
        for r in ["r1", "r2", "r3"] {
            v1.extend([
                change(r, None, 10),
                change(r, Some("a"), 10),
                change(r, Some("b"), 10),
            ]);
        }
        assert_eq!(push(&store, v1).version, 1);
        // A budget so small the first page holds one row of version 1.
        let first = store.pull("s", 0, None, None, 1).unwrap();
        let resume = first.resume.clone().expect("version 1 was cut");
        assert_eq!((first.until, first.changes.len()), (0, 3));
        // Meanwhile r3.a moves on to version 2.
        assert_eq!(push(&store, vec![change("r3", Some("a"), 20)]).version, 2);
        let mut got = first.changes;
        let mut resume = Some(resume);
        let mut until = 0;
        while let Some(r) = resume {
            let page = store.pull("s", 0, Some(&r), None, 1).unwrap();
            got.extend(page.changes);
            resume = page.resume;
            until = page.until;
        }
        assert_eq!(until, 1);
        // Every cell of version 1 arrived (r3.a in its newer form is fine).
        for r in ["r1", "r2", "r3"] {
            for col in [None, Some("b")] {
                assert!(
                    got.iter()
                        .any(|c| c.pk[0] == Value::Text(r.into()) && c.column.as_deref() == col),
                    "{r} {col:?} missing"
                );
            }
        }
        // And the next pull brings version 2.
        let next = store.pull("s", 1, None, None, 1 << 20).unwrap();
        assert_eq!(next.until, 2);
        assert!(next.changes.iter().any(|c| c.hlc == Hlc(20)));
    }

    /// Pulls everything after `cursor` page by page, as a device does.
    fn pull_all(store: &SqliteStore, budget: usize) -> (Vec<Change>, u64) {
        let (mut got, mut cursor, mut resume) = (Vec::new(), 0, None::<Resume>);
        loop {
            let page = store
                .pull("s", cursor, resume.as_ref(), None, budget)
                .unwrap();
            got.extend(page.changes);
            resume = page.resume;
            if resume.is_none() {
                cursor = page.until;
            }
            if !page.more {
                return (got, cursor);
            }
        }
    }

    #[test]
    fn a_page_carries_every_cell_of_its_versions_even_in_rows_that_moved_on() {
        let store = SqliteStore::open_in_memory().unwrap();
        let filler = |prefix: &str| -> Vec<Change> {
            (0..10)
                .flat_map(|i| {
                    let pk = format!("{prefix}{i}");
                    [change(&pk, None, 10), change(&pk, Some("a"), 10)]
                })
                .collect()
        };
        // Version 1: row r in full, with other rows; version 2: other rows;
        // version 3: r's title alone.
        let mut v1 = vec![
            change("r", None, 10),
            change("r", Some("title"), 10),
            change("r", Some("note"), 10),
        ];
        v1.extend(filler("f"));
        push(&store, v1);
        push(&store, filler("g"));
        assert_eq!(
            push(&store, vec![change("r", Some("title"), 30)]).version,
            3
        );
        // Pages small enough to end between versions 2 and 3.
        for budget in [1, 100, 300, 600, 1 << 20] {
            let (got, until) = pull_all(&store, budget);
            assert_eq!(until, 3);
            let r: Vec<_> = got
                .iter()
                .filter(|c| c.pk[0] == Value::Text("r".into()))
                .map(|c| (c.column.as_deref().map(str::to_owned), c.hlc.0))
                .collect();
            for cell in [
                (None, 10),
                (Some("note".to_owned()), 10),
                (Some("title".to_owned()), 30),
            ] {
                assert!(
                    r.contains(&cell),
                    "budget {budget}: {cell:?} missing from {r:?}"
                );
            }
        }
    }

    #[test]
    fn a_database_of_the_first_layout_is_migrated_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.db");
        let store = SqliteStore::open(&path).unwrap();
        push(
            &store,
            vec![change("r1", None, 10), change("r1", Some("a"), 10)],
        );
        push(
            &store,
            vec![change("r1", Some("b"), 20), change("r2", None, 20)],
        );
        drop(store);
        // Back to layout 1: no row_versions, no format.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DELETE FROM row_versions; DELETE FROM server_meta WHERE key = 'format'; \
             CREATE INDEX rows_by_version ON rows(space, version);",
        )
        .unwrap();
        drop(conn);
        let store = SqliteStore::open(&path).unwrap();
        let (got, until) = pull_all(&store, 1 << 20);
        assert_eq!(until, 2);
        assert_eq!(got.len(), 4, "{got:?}");
        let page = store.pull("s", 1, None, None, 1 << 20).unwrap();
        assert_eq!(
            page.changes.len(),
            2,
            "only version 2's cells after cursor 1"
        );
    }

    #[test]
    fn staged_parts_belong_to_their_space_and_a_resent_part_replaces_its_first_copy() {
        let store = SqliteStore::open_in_memory().unwrap().with_staging_cap(250);
        let (x, y) = (SiteId::from_bytes([1; 16]), SiteId::from_bytes([2; 16]));
        store.stage("a", x, "p", 1, &[1; 100]).unwrap();
        store.stage("a", x, "p", 2, &[2; 100]).unwrap();
        // The retry of a push whose answer was lost sends its parts again.
        store.stage("a", x, "p", 1, &[1; 100]).unwrap();
        store.stage("a", x, "p", 2, &[2; 100]).unwrap();
        let err = store.stage("a", y, "q", 1, &[3; 100]).unwrap_err();
        assert!(err.to_string().contains("unfinished pushes"), "{err}");
        // Another space's push of the same id is its own.
        store.stage("b", x, "p", 1, &[9; 10]).unwrap();
        store.stage("a", x, "p", 3, &[3; 10]).unwrap();
        assert_eq!(
            store.take_staged("a", "p", 3).unwrap(),
            Some(vec![vec![1; 100], vec![2; 100]]),
            "parts 1 and 2 of a 3-part push; a stray part 3 is not one of them"
        );
        assert_eq!(store.take_staged("a", "p", 3).unwrap(), None, "taken once");
        assert_eq!(
            store.take_staged("b", "p", 3).unwrap(),
            None,
            "part 2 missing"
        );
        assert_eq!(store.take_staged("b", "p", 2).unwrap(), None, "forgotten");
        // A device's new push drops the parts of its unfinished one.
        store.stage("a", x, "p", 1, &[1; 100]).unwrap();
        store.stage("a", x, "r", 1, &[4; 100]).unwrap();
        store.stage("a", y, "q", 1, &[3; 100]).unwrap();
        assert_eq!(store.take_staged("a", "p", 2).unwrap(), None);
        assert_eq!(
            store.take_staged("a", "r", 2).unwrap(),
            Some(vec![vec![4; 100]])
        );
    }

    #[test]
    fn rows_of_a_push_still_being_merged_are_not_pulled() {
        let store = SqliteStore::open_in_memory().unwrap();
        push(
            &store,
            vec![change("r1", None, 10), change("r1", Some("a"), 10)],
        );
        // A step of the next push: rows at version 2, the space still at 1.
        let sid = store
            .in_transaction(|conn| Ok(space_id(conn, "s")?.unwrap().0))
            .unwrap();
        let mut outcome = PushOutcome {
            version: 1,
            tag: None,
            applied: 0,
            stale: 0,
        };
        store
            .in_transaction(|conn| {
                merge_into(
                    conn,
                    sid,
                    2,
                    store.site,
                    &[change("r2", None, 20)],
                    &mut outcome,
                )
            })
            .unwrap();
        let page = store.pull("s", 0, None, None, 1 << 20).unwrap();
        assert_eq!(page.until, 1);
        assert!(!page.more);
        assert!(
            page.changes.iter().all(|c| c.db_version == 1),
            "{:?}",
            page.changes
        );
    }

    #[test]
    fn another_space_is_pushed_to_between_the_steps_of_a_large_push() {
        let store = Arc::new(SqliteStore::open_in_memory().unwrap());
        let other = store.clone();
        let pushed_meanwhile = Arc::new(Mutex::new(Vec::new()));
        let seen = pushed_meanwhile.clone();
        *store.between_steps.lock().unwrap() = Some(Box::new(move || {
            // On another thread, as a request would: it must get the
            // writer between two steps.
            let store = other.clone();
            let cs = ChangeSet {
                source: SiteId::from_bytes([7; 16]),
                recipient: None,
                since: 0,
                until: 1,
                changes: vec![change("x", None, 99)],
            };
            let done = std::thread::spawn(move || store.push("other", &[cs.encode()]));
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || tx.send(done.join()));
            let outcome = rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("a push to another space finished between two steps")
                .unwrap()
                .unwrap();
            // And the large push is not done: some of its rows are still to
            // come.
            let written: i64 = other
                .in_transaction(|conn| {
                    Ok(conn.query_row(
                        "SELECT count(*) FROM rows WHERE space = (SELECT id FROM spaces WHERE name = 's')",
                        [],
                        |r| r.get(0),
                    )?)
                })
                .unwrap();
            assert!(written < (PUSH_STEP + 10) as i64, "{written} rows already");
            seen.lock().unwrap().push(outcome.version);
        }));
        let big: Vec<Change> = (0..PUSH_STEP + 10)
            .map(|i| change(&format!("r{i}"), None, 10))
            .collect();
        let outcome = push(&store, big);
        assert_eq!(outcome.version, 1);
        let meanwhile = pushed_meanwhile.lock().unwrap();
        assert!(!meanwhile.is_empty(), "no step boundary");
        // The large push's space moved to its version only at the end.
        assert_eq!(store.space("s").unwrap().unwrap().version, 1);
    }

    #[test]
    fn spaces_get_an_epoch_when_created() {
        let store = SqliteStore::open_in_memory().unwrap();
        assert_eq!(store.space("s").unwrap(), None);
        push(&store, vec![change("r1", None, 10)]);
        let state = store.space("s").unwrap().unwrap();
        assert_eq!(state.version, 1);
        assert_eq!(state.epoch.len(), 36);
        let other = SqliteStore::open_in_memory().unwrap();
        push(&other, vec![change("r1", None, 10)]);
        assert_ne!(other.space("s").unwrap().unwrap().epoch, state.epoch);
    }
}
