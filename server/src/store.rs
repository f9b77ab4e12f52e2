//! Where a server keeps each space: the latest state of every cell with its
//! metadata, and a per-space version. Storage sits behind `Store` so that a
//! PostgreSQL backend can stand beside the embedded SQLite one.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use confluo_core::merge::{Cell, Outcome, RowState, Target, Version};
use confluo_core::{pack_key, Change, ChangeSet, SiteId};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::group::Group;

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
    /// The space's version before the push.
    pub previous: u64,
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

/// One part of a push, already validated: as it was received (a part kept
/// until the last one arrived), or decoded by the request that brought it
/// (the last part), so that it is not decoded again.
pub enum PushPart<'a> {
    Encoded(&'a [u8]),
    Decoded(ChangeSet),
}

impl PushPart<'_> {
    /// The tables the part writes, with the number of values of their
    /// keys (see `ChangeSet::key_shapes`).
    pub(crate) fn key_shapes(&self) -> StoreResult<Vec<(Arc<str>, usize)>> {
        match self {
            PushPart::Encoded(bytes) => Ok(ChangeSet::key_shapes(bytes)?),
            PushPart::Decoded(cs) => Ok(decoded_key_shapes(&cs.changes)),
        }
    }

    pub(crate) fn decode(self) -> StoreResult<ChangeSet> {
        match self {
            PushPart::Encoded(bytes) => Ok(ChangeSet::decode(bytes)?),
            PushPart::Decoded(cs) => Ok(cs),
        }
    }
}

/// `PushPart::key_shapes` of decoded changes.
fn decoded_key_shapes(changes: &[Change]) -> Vec<(Arc<str>, usize)> {
    let mut shapes: Vec<(Arc<str>, usize)> = Vec::new();
    for run in row_runs(changes) {
        let (table, arity) = (&run[0].table, run[0].pk.len());
        if !shapes.iter().any(|(t, n)| t == table && *n == arity) {
            shapes.push((table.clone(), arity));
        }
    }
    shapes
}

pub trait Store: Send + Sync + 'static {
    /// Merges a push (one or more already validated change sets) into
    /// `space` in one transaction, under one new version.
    fn push_parts(&self, space: &str, parts: Vec<PushPart<'_>>) -> StoreResult<PushOutcome>;
    /// `push_parts` of encoded parts.
    fn push(&self, space: &str, parts: &[Vec<u8>]) -> StoreResult<PushOutcome> {
        self.push_parts(space, parts.iter().map(|p| PushPart::Encoded(p)).collect())
    }
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
    /// The current versions of those of `spaces` that exist.
    fn versions(&self, spaces: &[String]) -> StoreResult<Vec<(String, u64)>> {
        let mut found = Vec::new();
        for name in spaces {
            if let Some(s) = self.space(name)? {
                found.push((name.clone(), s.version));
            }
        }
        Ok(found)
    }
    /// For a store that other server processes write to as well: sends
    /// `feed` every push any of them commits, for as long as the store
    /// lives, and returns `true`. A store only this process writes to
    /// returns `false` (its pushes are known without it).
    fn follow_pushes(&self, _feed: PushFeed) -> bool {
        false
    }
}

/// Where a shared store reports committed pushes: `Some((space, version))`
/// for each, or `None` when some may have been missed (the store lost and
/// regained its feed), so that every watcher looks again.
pub type PushFeed = Arc<dyn Fn(Option<(&str, u64)>) + Send + Sync>;

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
CREATE INDEX IF NOT EXISTS staged_by_age ON staged(created);
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
pub(crate) fn cell_versions(cells: &[Change]) -> Vec<u64> {
    let mut v: Vec<u64> = cells.iter().map(|c| c.db_version).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Refuses a pull from `cursor` (and `resume`) that does not belong to a
/// space at `version`.
pub(crate) fn check_pull(cursor: u64, resume: Option<&Resume>, version: u64) -> StoreResult<()> {
    if cursor > version {
        return Err(StoreError::CursorGone { cursor, version });
    }
    match resume {
        Some(r) if r.version <= cursor || r.version > version => Err(StoreError::BadInput(
            "the resume token does not belong to this cursor".into(),
        )),
        _ => Ok(()),
    }
}

/// Fills a pull page from rows read in `(version, table, key)` order, one
/// per version a row's cells carry: a page holds, for each version it
/// covers, that version's cells of every row, whichever version the row is
/// at now. It ends at a version boundary once over its budget: after the
/// last whole version when it fills up in the middle of the next one, and
/// when the first version alone is over it, that one is cut after a row
/// and the next page resumes there. So a page stays near its budget however
/// large the versions.
pub(crate) struct PageBuilder {
    page: Page,
    cursor: u64,
    budget: usize,
    exclude: Option<SiteId>,
    used: usize,
    /// The version being read, where its changes start in the page, and
    /// the last row read (for resuming).
    reading: Option<u64>,
    reading_from: usize,
    last_row: Option<(String, Vec<u8>)>,
}

impl PageBuilder {
    pub(crate) fn new(cursor: u64, budget: usize, exclude: Option<SiteId>) -> Self {
        PageBuilder {
            page: Page {
                changes: Vec::new(),
                until: cursor,
                until_tag: None,
                more: false,
                resume: None,
            },
            cursor,
            budget,
            exclude,
            used: 0,
            reading: None,
            reading_from: 0,
            last_row: None,
        }
    }

    /// Takes the next row read (at `version`, its stored `cells`; `key`
    /// gives its table and packed key); `false` when the page is full and
    /// the row was left for the next page.
    pub(crate) fn offer(
        &mut self,
        version: u64,
        cells: &[u8],
        key: impl FnOnce() -> StoreResult<(String, Vec<u8>)>,
    ) -> StoreResult<bool> {
        if let Some(done) = self.reading.filter(|r| *r != version) {
            self.page.until = done;
            if self.used >= self.budget {
                return Ok(false);
            }
            self.reading_from = self.page.changes.len();
        }
        self.reading = Some(version);
        if self.used >= self.budget && self.page.until > self.cursor {
            // Full in the middle of a version after whole ones: the page
            // ends after those, and the next one starts with this version.
            self.page.changes.truncate(self.reading_from);
            return Ok(false);
        }
        if self.used >= self.budget && self.page.until == self.cursor {
            if let Some((table, key)) = self.last_row.take() {
                self.page.resume = Some(Resume {
                    version,
                    table,
                    key,
                });
                return Ok(false);
            }
        }
        self.last_row = Some(key()?);
        // The row's cells of this version, but not the device's own.
        for c in decode_stored(cells)? {
            if c.db_version == version && Some(c.site) != self.exclude {
                self.used += change_size(&c);
                self.page.changes.push(c);
            }
        }
        Ok(true)
    }

    /// The page, once the rows ran out (`exhausted`) or it is full; `version`
    /// is the space's. The caller sets `until_tag`.
    pub(crate) fn finish(mut self, exhausted: bool, version: u64) -> Page {
        if exhausted {
            self.page.until = version;
        }
        let page = &mut self.page;
        page.more = page.resume.is_some() || page.until < version;
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
        self.page
    }
}

/// A pull's query: the rows of `row_versions` matching `$where`, with their
/// cells, in version order.
macro_rules! pull_query {
    ($where:literal) => {
        concat!(
            "SELECT v.version, v.tbl, v.pk, r.cells FROM row_versions AS v \
             JOIN rows AS r ON r.space = v.space AND r.tbl = v.tbl AND r.pk = v.pk WHERE ",
            $where,
            " ORDER BY v.version, v.tbl, v.pk"
        )
    };
}

/// A pull's rows after its cursor, up to the space's version (a push
/// merged in steps writes rows at its version before the space moves to
/// it): each row once per version its cells carry, in version order, so a
/// page holds, for each version it covers, that version's cells of every
/// row, whichever version the row is at now.
const PULL_FROM_CURSOR: &str = pull_query!("v.space = ?1 AND v.version > ?2 AND v.version <= ?3");

/// `PULL_FROM_CURSOR` from inside a version, after the row a page ended at.
const PULL_RESUMED: &str =
    pull_query!("v.space = ?1 AND (v.version, v.tbl, v.pk) > (?2, ?3, ?4) AND v.version <= ?5");

/// The most bytes of unfinished multi-request pushes kept per space.
pub const MAX_STAGED_BYTES: usize = 256 << 20;

/// How long parts of an unfinished multi-request push are kept.
pub(crate) const STAGED_TTL: Duration = Duration::from_secs(3600);

/// The embedded store: one SQLite file, one writer, a few readers.
pub struct SqliteStore {
    path: Option<std::path::PathBuf>,
    writer: FairMutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    site: SiteId,
    max_staged_bytes: usize,
    space_locks: Vec<FairMutex<()>>,
    /// Small pushes waiting to be committed together.
    pushes: Group<GroupedPush, Grouped>,
    /// Called once, between two steps of a push (tests: to act while a
    /// push runs).
    #[cfg(test)]
    between_steps: Mutex<Option<Box<dyn Fn() + Send>>>,
}

/// A mutex that hands itself out in the order it was asked for: unlocking
/// passes it to the longest waiter (parking_lot's fair unlock) instead of
/// letting whoever asks next take it. For the writer, so that a push merged
/// in many steps cannot take it back before a push to another space that
/// waits for it; for the space locks, so that pushes to a busy space are
/// served in turn (with std's `Mutex`, 50 devices pushing to one space saw
/// a p99 twice their median: some waited while others went by).
pub(crate) struct FairMutex<T>(parking_lot::Mutex<T>);

/// The value of a `FairMutex`, held; the next in line gets it on drop.
pub(crate) struct FairGuard<'a, T>(Option<parking_lot::MutexGuard<'a, T>>);

impl<T> FairMutex<T> {
    fn new(value: T) -> Self {
        FairMutex(parking_lot::Mutex::new(value))
    }

    fn lock(&self) -> FairGuard<'_, T> {
        FairGuard(Some(self.0.lock()))
    }

    fn try_lock(&self) -> Option<FairGuard<'_, T>> {
        self.0.try_lock().map(|g| FairGuard(Some(g)))
    }
}

impl<T> std::ops::Deref for FairGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0.as_ref().expect("held until drop")
    }
}

impl<T> std::ops::DerefMut for FairGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.0.as_mut().expect("held until drop")
    }
}

impl<T> Drop for FairGuard<'_, T> {
    fn drop(&mut self) {
        if let Some(guard) = self.0.take() {
            parking_lot::MutexGuard::unlock_fair(guard);
        }
    }
}

/// Changes merged per transaction of a push (see `SqliteStore::push`).
const PUSH_STEP: usize = 10_000;

/// Locks that serialize pushes to one space.
const SPACE_LOCKS: usize = 64;

/// Which of the space locks `space` takes (spaces that share one wait for
/// each other, rarely and briefly).
fn space_lock_index(space: &str) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    space.hash(&mut h);
    (h.finish() % SPACE_LOCKS as u64) as usize
}

/// A push of one decoded part, waiting to be committed with others.
struct GroupedPush {
    space: String,
    changes: Arc<ChangeSet>,
}

/// What became of a grouped push.
enum Grouped {
    Merged(StoreResult<PushOutcome>),
    /// Its space was held by a push in steps: it goes alone, after it.
    SpaceBusy,
}

/// Runs `f` in one write transaction on `conn`.
fn transaction_on<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> StoreResult<T>,
) -> StoreResult<T> {
    run_cached(conn, "BEGIN IMMEDIATE")?;
    let _open = RollbackIfOpen(conn);
    let result = f(conn);
    if result.is_ok() {
        run_cached(conn, "COMMIT")?;
    }
    result
}

/// Rolls back the transaction open on a connection when dropped (an
/// early return, a failed COMMIT, a panic): the writer is never left
/// inside one, which would fail every later write.
struct RollbackIfOpen<'c>(&'c Connection);

impl Drop for RollbackIfOpen<'_> {
    fn drop(&mut self) {
        if !self.0.is_autocommit() {
            let _ = run_cached(self.0, "ROLLBACK");
        }
    }
}

/// The writer, set not to wait for the disk at commit: set back when
/// ended, or when dropped on any other way out.
struct Unsynced<'c>(&'c Connection);

impl Unsynced<'_> {
    fn end(self) -> rusqlite::Result<()> {
        let conn = self.0;
        std::mem::forget(self);
        conn.pragma_update(None, "synchronous", "FULL")
    }
}

impl Drop for Unsynced<'_> {
    fn drop(&mut self) {
        let _ = self.0.pragma_update(None, "synchronous", "FULL");
    }
}

/// Runs `count` pieces of work (`work(conn, i)`) in one transaction, each
/// under a savepoint of its own when there are several, so that one that
/// fails is undone alone; returns each one's result. If the commit fails,
/// every piece fails with it.
fn grouped_transaction<T>(
    conn: &Connection,
    count: usize,
    mut work: impl FnMut(&Connection, usize) -> StoreResult<T>,
) -> Vec<StoreResult<T>> {
    let everyone = |e: &StoreError| {
        (0..count)
            .map(|_| Err(StoreError::Storage(e.to_string())))
            .collect()
    };
    if let Err(e) = run_cached(conn, "BEGIN IMMEDIATE") {
        return everyone(&e.into());
    }
    let _open = RollbackIfOpen(conn);
    let mut results = Vec::with_capacity(count);
    for i in 0..count {
        let result = if count == 1 {
            work(conn, i)
        } else {
            match in_savepoint(conn, |conn| work(conn, i)) {
                Ok(result) => result,
                // Then what the piece wrote may stay: nothing is kept.
                Err(e) => return everyone(&e.into()),
            }
        };
        results.push(result);
        if conn.is_autocommit() {
            // SQLite rolled the whole transaction back (a full disk, an I/O
            // error): what came before is undone too, and what comes after
            // must not run outside it. A piece alone keeps its own error.
            if count == 1 && results[0].is_err() {
                return results;
            }
            return everyone(&StoreError::Storage(
                "the transaction was rolled back".into(),
            ));
        }
    }
    // One alone that failed is not committed: `_open` rolls it back.
    if count > 1 || results[0].is_ok() {
        if let Err(e) = run_cached(conn, "COMMIT") {
            return everyone(&e.into());
        }
    }
    results
}

/// Runs `f` under a savepoint: undone if it fails, kept otherwise. The
/// outer error is the savepoint's own.
fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> StoreResult<T>,
) -> rusqlite::Result<StoreResult<T>> {
    run_cached(conn, "SAVEPOINT grouped")?;
    let result = f(conn);
    if result.is_err() {
        run_cached(conn, "ROLLBACK TO grouped")?;
    }
    run_cached(conn, "RELEASE grouped")?;
    Ok(result)
}

/// A push of one decoded part, in the open transaction.
fn merge_push(
    conn: &Connection,
    server: SiteId,
    space: &str,
    cs: &ChangeSet,
) -> StoreResult<PushOutcome> {
    let (sid, mut outcome) = begin_push(conn, space, &decoded_key_shapes(&cs.changes))?;
    let version = outcome.previous + 1;
    merge_into(conn, sid, version, server, &cs.changes, &mut outcome)?;
    finish_push(conn, sid, &mut outcome)?;
    Ok(outcome)
}

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
        keep_plans(&conn)?;
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
            space_locks: (0..SPACE_LOCKS).map(|_| FairMutex::new(())).collect(),
            pushes: Group::new(|| {
                Grouped::Merged(Err(StoreError::Storage(
                    "the commit of this push failed".into(),
                )))
            }),
            #[cfg(test)]
            between_steps: Mutex::new(None),
        })
    }

    /// Runs `f` in one write transaction on the writer.
    fn in_transaction<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        transaction_on(&self.writer.lock(), f)
    }

    /// `in_transaction`, committed without waiting for the disk (see
    /// `push_parts`): durable once a later transaction commits.
    fn in_transaction_unsynced<T>(
        &self,
        f: impl FnOnce(&Connection) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let conn = self.writer.lock();
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Whatever happens (a busy BEGIN, a panic): every other write
        // waits for the disk.
        let unsynced = Unsynced(&conn);
        let result = transaction_on(&conn, f);
        unsynced.end()?;
        result
    }

    /// The lock pushes to `space` take (one of a fixed set: spaces that
    /// share one wait for each other, rarely and briefly).
    fn space_lock(&self, space: &str) -> &FairMutex<()> {
        &self.space_locks[space_lock_index(space)]
    }

    /// Merges a push of one decoded part together with the pushes that
    /// arrive while another is committed: one transaction and one wait for
    /// the disk for all of them (50 devices syncing to one space: 1,300
    /// syncs a second with a commit each, against 1,900 without waiting
    /// for the disk at all). Each push still gets its own version, and is
    /// acknowledged only once the commit that holds it is on disk; a push
    /// that fails is undone alone (a savepoint each).
    fn push_together(&self, space: &str, cs: Arc<ChangeSet>) -> StoreResult<PushOutcome> {
        let job = GroupedPush {
            space: space.to_owned(),
            changes: cs.clone(),
        };
        match self.pushes.run(job, |line| self.commit_grouped(line)) {
            Grouped::Merged(outcome) => outcome,
            // A push in steps holds the space: wait for it, as pushes did
            // before they were grouped.
            Grouped::SpaceBusy => {
                let _space_lock = self.space_lock(space).lock();
                self.in_transaction(|conn| merge_push(conn, self.site, space, &cs))
            }
        }
    }

    /// Commits the pushes waiting in line (those that fit one step), in one
    /// transaction.
    fn commit_grouped(&self, line: &Group<GroupedPush, Grouped>) {
        let conn = self.writer.lock();
        // Taken once the writer is ours: pushes that arrived while it was
        // busy join this commit.
        let mut changes = 0;
        let batch = line.take(|push| {
            changes += push.changes.changes.len();
            changes <= PUSH_STEP
        });
        // The space locks are only tried: a push in steps holds its space's
        // lock while it waits for the writer, which is held here.
        let mut held: Vec<(usize, FairGuard<'_, ()>)> = Vec::new();
        let mut merging = Vec::new();
        for slot in &batch.slots {
            let lock = space_lock_index(&slot.job.space);
            if !held.iter().any(|(l, _)| *l == lock) {
                match self.space_locks[lock].try_lock() {
                    Some(guard) => held.push((lock, guard)),
                    None => {
                        line.finish(slot, Grouped::SpaceBusy);
                        continue;
                    }
                }
            }
            merging.push(slot);
        }
        if merging.is_empty() {
            return;
        }
        let merged = grouped_transaction(&conn, merging.len(), |conn, i| {
            let push = &merging[i].job;
            merge_push(conn, self.site, &push.space, &push.changes)
        });
        for (slot, outcome) in merging.into_iter().zip(merged) {
            line.finish(slot, Grouped::Merged(outcome));
        }
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
                keep_plans(&c)?;
                c
            }
        };
        run_cached(&conn, "BEGIN")?;
        let out = f(&conn);
        let _ = run_cached(&conn, "COMMIT");
        let mut idle = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < 8 {
            idle.push(conn);
        }
        out
    }
}

/// Makes SQLite keep each prepared statement's plan whatever is bound to
/// it (its query planner stability guarantee). Otherwise a statement whose
/// `= ?` parameter is bound again over a 0 or a 1 is prepared anew at its
/// next step, since its plan might favour those values: every request of a
/// server's first space (id 1) re-parsed its queries. The server's queries
/// have one good plan whatever the values.
fn keep_plans(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

/// Runs a statement without parameters through the connection's cache:
/// transactions begin and end on every request, and parsing their SQL each
/// time costs more than a small push's rows.
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
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
    /// writer) go between the steps instead of waiting for a large push
    /// (a push that fits one step is one transaction, checks included).
    /// The push stays one version, taken in order and made visible at once:
    /// its rows carry the new version, which readers do not see (pulls stop
    /// at the space's version) until the last step moves the space to it.
    /// Pushes to the same space wait for each other (a lock per space).
    /// Everything that can refuse the push is checked in the first step,
    /// before any row is written; a later step can only fail on storage,
    /// and the device then sends the same push again, which merges the
    /// same way over what the first attempt left.
    ///
    /// The steps before the last are committed without waiting for the
    /// disk: the last step's commit writes the log through to the disk,
    /// and with it every step before (SQLite's log is replayed in order up
    /// to its first incomplete commit). A crash before it loses no
    /// acknowledged push: this one was not acknowledged, and its rows were
    /// not visible.
    fn push_parts(&self, space: &str, parts: Vec<PushPart<'_>>) -> StoreResult<PushOutcome> {
        // The common push (a device's few edits, decoded by its validation)
        // is merged in one transaction, with the pushes that arrive while
        // another commits (see `push_together`).
        if let [PushPart::Decoded(cs)] = &parts[..] {
            if cs.changes.len() <= PUSH_STEP {
                let Some(PushPart::Decoded(cs)) = parts.into_iter().next() else {
                    unreachable!("matched above")
                };
                return self.push_together(space, Arc::new(cs));
            }
        }
        let _space_lock = self.space_lock(space).lock();
        let (sid, mut outcome) = self.in_transaction(|conn| {
            let mut shapes = Vec::new();
            for part in &parts {
                shapes.extend(part.key_shapes()?);
            }
            begin_push(conn, space, &shapes)
        })?;
        let version = outcome.previous + 1;
        for part in parts {
            let cs = part.decode()?;
            for step in cs.changes.chunks(PUSH_STEP) {
                self.in_transaction_unsynced(|conn| {
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
        self.in_transaction(|conn| finish_push(conn, sid, &mut outcome))?;
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
                check_pull(cursor, None, 0)?;
                return Ok(PageBuilder::new(0, budget, exclude).finish(true, 0));
            };
            check_pull(cursor, resume, version)?;
            let mut stmt;
            let mut rows = match resume {
                Some(r) => {
                    stmt = conn.prepare_cached(PULL_RESUMED)?;
                    stmt.query(params![
                        sid,
                        r.version as i64,
                        r.table,
                        r.key,
                        version as i64
                    ])?
                }
                None => {
                    stmt = conn.prepare_cached(PULL_FROM_CURSOR)?;
                    stmt.query(params![sid, cursor as i64, version as i64])?
                }
            };
            let mut page = PageBuilder::new(cursor, budget, exclude);
            let mut exhausted = true;
            while let Some(row) = rows.next()? {
                let cells = row
                    .get_ref(3)?
                    .as_blob()
                    .map_err(|e| StoreError::Storage(e.to_string()))?;
                let taken = page.offer(row.get::<_, i64>(0)? as u64, cells, || {
                    Ok((row.get(1)?, row.get(2)?))
                })?;
                if !taken {
                    exhausted = false;
                    break;
                }
            }
            let mut page = page.finish(exhausted, version);
            page.until_tag = tag_of(conn, sid, page.until)?;
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
        // Not waited for on disk: a part lost in a crash is missed when the
        // last part comes, and the device is told to send them all again.
        self.in_transaction_unsynced(|conn| self.stage_in(conn, space, site, push_id, part, body))
    }

    fn take_staged(
        &self,
        space: &str,
        push_id: &str,
        last: u32,
    ) -> StoreResult<Option<Vec<Vec<u8>>>> {
        // Parts forgotten here and found again after a crash are harmless:
        // kept an hour at most, and replaced by the same push sent again.
        self.in_transaction_unsynced(|conn| take_staged_in(conn, space, push_id, last))
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

impl SqliteStore {
    /// Keeps a part as `Store::stage` says, in the caller's transaction.
    fn stage_in(
        &self,
        conn: &Connection,
        space: &str,
        site: SiteId,
        push_id: &str,
        part: u32,
        body: &[u8],
    ) -> StoreResult<()> {
        // By its index: `created` comes after the body, and a scan reaching
        // it read every staged body's overflow pages, at every part staged.
        conn.prepare_cached("DELETE FROM staged WHERE created < ?1")?
            .execute([now_secs() - STAGED_TTL.as_secs() as i64])?;
        conn.prepare_cached("DELETE FROM staged WHERE space = ?1 AND site = ?2 AND push_id <> ?3")?
            .execute(params![space, &site.as_bytes()[..], push_id])?;
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
}

/// Takes the parts of a push `SqliteStore::take_staged` asks for.
fn take_staged_in(
    conn: &Connection,
    space: &str,
    push_id: &str,
    last: u32,
) -> StoreResult<Option<Vec<Vec<u8>>>> {
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

/// The shape of each table of a space, learned from the first push that
/// names it: a push that contradicts it is refused, since no device could
/// apply it and every pull would carry it.
#[derive(Default)]
struct TableShapes {
    key_arity: std::collections::HashMap<Arc<str>, usize>,
}

impl TableShapes {
    /// Checks that keys of `table` have `len` values.
    fn check(
        &mut self,
        conn: &Connection,
        space: i64,
        table: &Arc<str>,
        len: usize,
    ) -> StoreResult<()> {
        let arity = match self.key_arity.get(table) {
            Some(&n) => n,
            None => {
                let known: Option<i64> = conn
                    .prepare_cached(
                        "SELECT key_arity FROM space_tables WHERE space = ?1 AND tbl = ?2",
                    )?
                    .query_row(params![space, &**table], |r| r.get(0))
                    .optional()?;
                let n = match known {
                    Some(n) => n as usize,
                    None => {
                        // Rows stored before shapes were kept tell it too.
                        let stored: Option<Vec<u8>> = conn
                            .prepare_cached(
                                "SELECT pk FROM rows WHERE space = ?1 AND tbl = ?2 LIMIT 1",
                            )?
                            .query_row(params![space, &**table], |r| r.get(0))
                            .optional()?;
                        let n = match stored {
                            Some(pk) => confluo_core::unpack_key(&pk)
                                .map_err(|e| StoreError::Storage(format!("stored key: {e}")))?
                                .len(),
                            None => len,
                        };
                        conn.prepare_cached(
                            "INSERT INTO space_tables(space, tbl, key_arity) VALUES (?1, ?2, ?3)",
                        )?
                        .execute(params![space, &**table, n as i64])?;
                        n
                    }
                };
                self.key_arity.insert(table.clone(), n);
                n
            }
        };
        if len != arity {
            return Err(StoreError::BadInput(format!(
                "table {table:?} has keys of {arity} value(s) in this space, but a change has a key of {len}"
            )));
        }
        Ok(())
    }
}

/// A push's first step: the space (made on its first push) and its
/// version, and every check that can refuse the push, before any row is
/// written. The outcome starts at the space's current version.
fn begin_push(
    conn: &Connection,
    space: &str,
    shapes: &[(Arc<str>, usize)],
) -> StoreResult<(i64, PushOutcome)> {
    let (sid, current) = match space_id(conn, space)? {
        Some(s) => s,
        None => {
            conn.prepare_cached("INSERT INTO spaces(name, version, epoch) VALUES (?1, 0, ?2)")?
                .execute(params![space, uuid::Uuid::new_v4().to_string()])?;
            (conn.last_insert_rowid(), 0)
        }
    };
    let mut known = TableShapes::default();
    for (table, len) in shapes {
        known.check(conn, sid, table, *len)?;
    }
    let outcome = PushOutcome {
        previous: current,
        version: current,
        tag: None,
        applied: 0,
        stale: 0,
    };
    Ok((sid, outcome))
}

/// A push's last step: the space moves to the push's version (which makes
/// its rows visible) when a change won, and the outcome gets its tag.
fn finish_push(conn: &Connection, sid: i64, outcome: &mut PushOutcome) -> StoreResult<()> {
    if outcome.applied > 0 {
        let version = outcome.previous + 1;
        conn.prepare_cached("UPDATE spaces SET version = ?1 WHERE id = ?2")?
            .execute(params![version as i64, sid])?;
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
    for run in row_runs(changes) {
        let first = &run[0];
        shapes.check(conn, space, &first.table, first.pk.len())?;
        let key = pack_key(&first.pk);
        let stored: Vec<Change> = match load
            .query_row(params![space, &*first.table, key], |r| {
                r.get::<_, Vec<u8>>(0)
            })
            .optional()?
        {
            Some(blob) => decode_stored(&blob)?,
            None => Vec::new(),
        };
        let Some(merged) = merge_row(&stored, run, version, outcome) else {
            continue;
        };
        let (before, after) = (cell_versions(&stored), cell_versions(&merged.cells));
        save.execute(params![
            space,
            &*first.table,
            key,
            merged.cl as i64,
            version as i64,
            merged.encode(server, version)
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
    Ok(())
}

/// Splits changes into runs of one row each (a change set lists a row's
/// changes together).
pub(crate) fn row_runs(changes: &[Change]) -> impl Iterator<Item = &[Change]> {
    changes.chunk_by(|a, b| a.table == b.table && a.pk == b.pk)
}

/// A row's stored cells, decoded.
pub(crate) fn decode_stored(blob: &[u8]) -> StoreResult<Vec<Change>> {
    Ok(ChangeSet::decode(blob)
        .map_err(|e| StoreError::Storage(format!("stored row: {e}")))?
        .changes)
}

/// A row's winning cells after a push, to be stored.
pub(crate) struct MergedRow {
    pub cl: u64,
    pub cells: Vec<Change>,
}

impl MergedRow {
    /// The cells packed in the engine's change-set encoding, as stored.
    pub(crate) fn encode(self, server: SiteId, version: u64) -> Vec<u8> {
        ChangeSet {
            source: server,
            recipient: None,
            since: 0,
            until: version,
            changes: self.cells,
        }
        .encode()
    }
}

/// Merges the pushed changes of one row into its stored cells with the
/// engine's merge rules, counting what won and what was stale. `None` when
/// nothing won (the stored row stays as it is); otherwise the row's
/// winning cells, those pushed carrying `version`.
pub(crate) fn merge_row(
    stored: &[Change],
    pushed: &[Change],
    version: u64,
    outcome: &mut PushOutcome,
) -> Option<MergedRow> {
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
    for (i, c) in pushed.iter().enumerate() {
        let at = Version {
            hlc: c.hlc,
            site: c.site,
        };
        match row.merge(target(c), c.cl, at, Winner::Pushed(i)) {
            Outcome::Stale => outcome.stale += 1,
            Outcome::Won { .. } => {
                outcome.applied += 1;
                won = true;
            }
        }
    }
    if !won {
        return None;
    }
    let cells = row
        .marker
        .iter()
        .chain(row.cells.iter().flatten())
        .map(|cell: &Cell<Winner>| match cell.data {
            Winner::Stored(i) => stored[i].clone(),
            Winner::Pushed(i) => Change {
                db_version: version,
                seq: 0,
                ..pushed[i].clone()
            },
        })
        .collect();
    Some(MergedRow { cl: row.cl, cells })
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

    /// Pulls everything page by page, as a device does.
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

    /// The first space of a server has id 1, and SQLite re-prepares a
    /// statement whose `= ?` parameter is bound again over a 0 or a 1 (its
    /// plan may favour such values): every pull of that space re-parsed its
    /// query, 6% of the server's CPU with 50 devices syncing.
    #[test]
    fn pulls_of_the_first_space_reuse_their_prepared_query() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("server.db")).unwrap();
        for hlc in [10, 20, 30] {
            push(&store, vec![change(&format!("r{hlc}"), None, hlc)]);
        }
        for cursor in [0, 1, 2, 0, 3] {
            store.pull("s", cursor, None, None, 1 << 20).unwrap();
        }
        let reprepared = store
            .with_reader(|conn| {
                Ok(conn
                    .prepare_cached(PULL_FROM_CURSOR)?
                    .get_status(rusqlite::StatementStatus::RePrepare))
            })
            .unwrap();
        assert_eq!(reprepared, 0);
    }

    /// Staging a part drops the parts an hour old: found by their age's
    /// index, not by a scan that reads past every staged body (`created`
    /// comes after it) at every part.
    #[test]
    fn staging_a_part_reads_no_other_staged_body() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("server.db")).unwrap();
        let site = SiteId::random();
        let body = vec![7u8; 1 << 20];
        for part in 1..=3 {
            store.stage("s", site, "push-1", part, &body).unwrap();
        }
        let conn = store.writer.lock();
        let plan: Vec<String> = conn
            .prepare("EXPLAIN QUERY PLAN DELETE FROM staged WHERE created < ?1")
            .unwrap()
            .query_map([0], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(
            plan.iter().any(|step| step.contains("INDEX staged_by_age")),
            "{plan:?}"
        );
        let staged: i64 = conn
            .query_row("SELECT count(*) FROM staged", [], |r| r.get(0))
            .unwrap();
        assert_eq!(staged, 3);
    }

    /// The writer's `PRAGMA synchronous` (2: FULL, waits for the disk).
    fn synchronous(store: &SqliteStore) -> i64 {
        store
            .writer
            .lock()
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn every_write_but_a_push_s_inner_steps_waits_for_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("server.db")).unwrap();
        const FULL: i64 = 2;
        let big: Vec<Change> = (0..PUSH_STEP + 10)
            .map(|i| change(&format!("r{i}"), None, 10))
            .collect();
        assert_eq!(push(&store, big).version, 1);
        assert_eq!(synchronous(&store), FULL);
        // Also after a step that failed.
        let failed = store.in_transaction_unsynced(|_| -> StoreResult<()> {
            Err(StoreError::Storage("injected".into()))
        });
        assert!(failed.is_err());
        assert_eq!(synchronous(&store), FULL);
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
            previous: 0,
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

    /// Whether thread `tid` of this process is asleep (parked on a lock).
    #[cfg(target_os = "linux")]
    fn asleep(tid: i64) -> bool {
        let stat =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('S'))
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_fair_mutex_goes_to_its_waiters_in_turn() {
        let lock = Arc::new(FairMutex::new(()));
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = lock.lock();
        let mut waiters = Vec::new();
        for i in 1..=3 {
            let (lock, order) = (lock.clone(), order.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            waiters.push(std::thread::spawn(move || {
                tx.send(unsafe { libc::gettid() } as i64).unwrap();
                // Twice, asking again at once: a lock that lets whoever asks
                // take it would go back to the thread that just let it go
                // (parking_lot's own unlock is fair only now and then).
                for _ in 0..2 {
                    let _turn = lock.lock();
                    order.lock().unwrap().push(i);
                }
            }));
            // The next waiter comes only once this one waits.
            let tid = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !asleep(tid) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "waiter {i} never waited"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        drop(held);
        for w in waiters {
            w.join().unwrap();
        }
        // In the order they waited; then each once more before any twice
        // (the order they ask again in is theirs: a thread let go may be
        // slower to ask again than the next one).
        let order = order.lock().unwrap().clone();
        assert_eq!(order[..3], [1, 2, 3], "{order:?}");
        let mut second = order[3..].to_vec();
        second.sort();
        assert_eq!(second, [1, 2, 3], "{order:?}");
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

    /// A push of `changes` as the API hands it over (decoded by validation).
    fn decoded(changes: Vec<Change>) -> Vec<PushPart<'static>> {
        vec![PushPart::Decoded(ChangeSet {
            source: SiteId::from_bytes([7; 16]),
            recipient: None,
            since: 0,
            until: 1,
            changes,
        })]
    }

    /// Pushes that arrive while the writer is busy are committed together:
    /// one commit (one wait for the disk) for all of them, each under a
    /// version of its own, each acknowledged with its own outcome.
    #[test]
    fn pushes_that_arrive_while_one_commits_share_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("server.db")).unwrap());
        let commits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut writer = store.writer.lock();
        let counted = commits.clone();
        writer
            .commit_hook(Some(move || {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                false
            }))
            .unwrap();
        let pushes: Vec<_> = (0..8u64)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let row = format!("r{i}");
                    store.push_parts("s", decoded(vec![change(&row, Some("a"), 10 + i)]))
                })
            })
            .collect();
        store.pushes.wait_for_line(8);
        drop(writer);
        let mut versions: Vec<u64> = pushes
            .into_iter()
            .map(|p| p.join().unwrap().unwrap().version)
            .collect();
        versions.sort();
        assert_eq!(versions, (1..=8).collect::<Vec<_>>());
        assert_eq!(commits.load(std::sync::atomic::Ordering::SeqCst), 1);
        let (got, until) = pull_all(&store, 1 << 20);
        assert_eq!((got.len(), until), (8, 8));
    }

    /// A push refused inside a shared commit is undone alone (it created
    /// its space before its keys were found to disagree), and the others
    /// in the commit keep their versions, without a gap.
    #[test]
    fn a_push_refused_in_a_shared_commit_is_undone_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("server.db")).unwrap());
        let writer = store.writer.lock();
        let good = |i: u64| {
            let store = store.clone();
            std::thread::spawn(move || {
                let row = format!("r{i}");
                store.push_parts("s", decoded(vec![change(&row, Some("a"), 10 + i)]))
            })
        };
        let first = good(1);
        store.pushes.wait_for_line(1);
        // One key of table t with one value, another with two.
        let mut two_values = change("x", Some("a"), 5);
        two_values.pk = vec![Value::Text("x".into()), Value::Integer(1)].into();
        let refused = {
            let store = store.clone();
            std::thread::spawn(move || {
                store.push_parts(
                    "fresh",
                    decoded(vec![change("x", Some("a"), 5), two_values]),
                )
            })
        };
        store.pushes.wait_for_line(2);
        let second = good(2);
        store.pushes.wait_for_line(3);
        drop(writer);
        assert!(matches!(
            refused.join().unwrap(),
            Err(StoreError::BadInput(_))
        ));
        let versions = [first, second].map(|p| p.join().unwrap().unwrap().version);
        assert_eq!(versions, [1, 2]);
        assert!(
            store.space("fresh").unwrap().is_none(),
            "the refused push left its space"
        );
        let spaces: i64 = store
            .writer
            .lock()
            .query_row("SELECT count(*) FROM spaces", [], |r| r.get(0))
            .unwrap();
        assert_eq!(spaces, 1);
    }

    /// A small push to a space that a push in steps holds waits for it,
    /// and does not hold up the pushes to other spaces it lined up with.
    #[test]
    fn a_push_to_a_space_held_by_a_push_in_steps_waits_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("server.db")).unwrap());
        let in_steps = store.space_lock("busy").lock();
        let writer = store.writer.lock();
        let push = |space: &'static str| {
            let store = store.clone();
            std::thread::spawn(move || {
                store.push_parts(space, decoded(vec![change("r", Some("a"), 10)]))
            })
        };
        let to_busy = push("busy");
        store.pushes.wait_for_line(1);
        let to_free = push("free");
        store.pushes.wait_for_line(2);
        drop(writer);
        assert_eq!(to_free.join().unwrap().unwrap().version, 1);
        assert!(store.space("busy").unwrap().is_none(), "merged while held");
        assert!(!to_busy.is_finished());
        drop(in_steps);
        assert_eq!(to_busy.join().unwrap().unwrap().version, 1);
        assert_eq!(store.space("busy").unwrap().unwrap().version, 1);
    }

    /// A push that panics in the middle of a shared commit (a bug, not an
    /// input) leaves the writer out of any transaction: the next push works.
    #[test]
    fn a_panic_inside_a_shared_commit_leaves_the_writer_usable() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("server.db")).unwrap();
        let cs = ChangeSet {
            source: SiteId::from_bytes([7; 16]),
            recipient: None,
            since: 0,
            until: 1,
            changes: vec![change("r", Some("a"), 1)],
        };
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let conn = store.writer.lock();
            grouped_transaction(&conn, 2, |conn, i| {
                assert!(i == 0, "the second push panics");
                merge_push(conn, store.site, "s", &cs)
            })
        }));
        assert!(panicked.is_err());
        assert!(
            store.writer.lock().is_autocommit(),
            "left inside a transaction"
        );
        assert!(
            store.space("s").unwrap().is_none(),
            "the first push was kept"
        );
        let next = store.push_parts("s", decoded(vec![change("q", Some("a"), 2)]));
        assert_eq!(next.unwrap().version, 1);
    }

    /// A step of a large push that cannot begin (another process holds
    /// the file) still sets the writer back to waiting for the disk: the
    /// pushes after it are acknowledged only once on disk.
    #[test]
    fn a_step_that_cannot_begin_leaves_the_writer_waiting_for_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.db");
        let store = SqliteStore::open(&path).unwrap();
        store
            .writer
            .lock()
            .busy_timeout(Duration::from_millis(50))
            .unwrap();
        let other: Arc<Mutex<Option<Connection>>> = Arc::default();
        let holder = other.clone();
        *store.between_steps.lock().unwrap() = Some(Box::new(move || {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            *holder.lock().unwrap() = Some(conn);
        }));
        let changes = (0..2 * PUSH_STEP + 10)
            .map(|i| change(&format!("r{i}"), None, 10))
            .collect();
        assert!(store.push_parts("s", decoded(changes)).is_err());
        drop(other.lock().unwrap().take());
        assert_eq!(synchronous(&store), 2, "FULL");
    }
}
