//! Exporting what a peer misses, and merging what comes back (atomically,
//! idempotently, in any order).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{params, params_from_iter, CachedStatement, Connection, OptionalExtension};

use crate::bulk::Overlay;
use crate::capture::{lock, SharedState};
use crate::changeset::{Change, ChangeSet};
use crate::clocks::{RowClocks, Stamp};
use crate::codec::{pack_values, unpack_values};
use crate::db::{Database, Transaction};
use crate::error::{Error, Result};
use crate::hlc::Hlc;
use crate::merge::{Cell, Outcome, RowState, Target, Version};
use crate::rejected::keep_aside;
use crate::row_ids::{key_order, key_sorted, same_key, Located, MetaRows};
use crate::schema::{quote, TableInfo};
use crate::site::SiteId;
use crate::validate::{check_change, Limits};
use crate::value::Value;

/// What `apply` did with a change set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Changes in the set.
    pub received: usize,
    /// Changes that won and are now part of this database.
    pub applied: usize,
    /// Changes this database already had, or that lost their merge.
    pub stale: usize,
    /// Changes for tables or columns this database does not have yet: kept
    /// and merged when `enable_sync` or `alter_synced_table` adds them.
    pub deferred: usize,
    /// Changes this database cannot apply (a key of the wrong shape, a
    /// value its schema refuses): kept aside with the reason, see
    /// `rejected_changes`. Only changes relayed by a server are kept aside;
    /// a peer's change set with such a change is refused whole.
    pub rejected: usize,
    /// The local db_version that recorded the applied changes, if any.
    pub db_version: Option<u64>,
}

/// Who sent the changes being applied, which decides how they are judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sender {
    /// Another database directly: its clocks are judged against ours (the
    /// drift guard), and a change set with any bad change is refused whole.
    Peer,
    /// The sync server, which judged every clock against its own already:
    /// clocks are taken by the HLC receive rule however slow ours is, and a
    /// change this database cannot apply is kept aside so that it never
    /// blocks the others.
    Server,
}

/// Turns capture off while remote changes are written, and back on after,
/// whatever happens in between.
pub(crate) struct RemoteWrites<'a>(&'a SharedState);

impl<'a> RemoteWrites<'a> {
    pub(crate) fn begin(state: &'a SharedState) -> Self {
        lock(state).tracking = false;
        RemoteWrites(state)
    }
}

impl Drop for RemoteWrites<'_> {
    fn drop(&mut self) {
        lock(self.0).tracking = true;
    }
}

/// A cell's local bookkeeping beside its version.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Local {
    site: u32,
    dbv: u64,
    /// The change (index into the applied slice) whose value this cell now
    /// holds, when this apply wrote it.
    from: Option<usize>,
}

/// The statements that merge rows into one table, taken from the
/// connection's cache once per apply and held to its end: fetching them for
/// each row (hashing their text, resetting them on return) cost more than
/// the rows' own B-tree work, and preparing them again for each apply cost
/// more than a small apply's rows (a sync of a few edits).
struct TableStatements<'c> {
    /// The rows' metadata: found, then inserted (a row new here) or updated.
    meta: MetaRows<'c>,
    /// Metadata writes held until the rows of a merge call are merged, then
    /// made in id order, the metadata table's own (see `write_held`).
    held: Vec<HeldMeta>,
    held_ids: HashSet<i64, foldhash::fast::RandomState>,
    /// The app table's writes by kind and written slots (a table sees few
    /// shapes, so a short list is searched without building a key).
    writes: Vec<(u8, Vec<usize>, CachedStatement<'c>)>,
    /// The table's bulk entries, read at its first row.
    overlay: Option<Overlay>,
}

/// State shared by the rows of one apply.
pub(crate) struct ApplyCtx<'c> {
    sites: Vec<SiteId>,
    site_ords: HashMap<SiteId, u32>,
    first_new_site: usize,
    last_site: Option<(SiteId, u32)>,
    /// By table id.
    statements: Vec<(i64, TableStatements<'c>)>,
    pub(crate) report: ApplyReport,
    /// The changes of the row being merged when a merge failed.
    failed_row: Option<std::ops::Range<usize>>,
}

impl<'c> ApplyCtx<'c> {
    fn new(sites: Vec<SiteId>) -> Self {
        let site_ords = sites
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, i as u32))
            .collect();
        ApplyCtx {
            first_new_site: sites.len(),
            sites,
            site_ords,
            last_site: None,
            statements: Vec::new(),
            report: ApplyReport::default(),
            failed_row: None,
        }
    }

    pub(crate) fn ord(&mut self, conn: &Connection, site: SiteId) -> Result<u32> {
        // Most changes of an apply come from the site before them.
        match self.last_site {
            Some((s, o)) if s == site => return Ok(o),
            _ => {}
        }
        if let Some(&o) = self.site_ords.get(&site) {
            self.last_site = Some((site, o));
            return Ok(o);
        }
        let ord = self.sites.len() as u32;
        conn.prepare_cached("INSERT INTO confluo_sites(ord, site_id) VALUES (?1, ?2)")?
            .execute(params![ord, &site.as_bytes()[..]])?;
        self.sites.push(site);
        self.site_ords.insert(site, ord);
        Ok(ord)
    }

    /// The statements of `t`, prepared the first time.
    fn statements(
        &mut self,
        conn: &'c Connection,
        t: &TableInfo,
    ) -> Result<&mut TableStatements<'c>> {
        // Asked for several times per row: searching the short list of the
        // tables an apply touches costs less than hashing the id.
        let i = match self.statements.iter().rposition(|(id, _)| *id == t.id) {
            Some(i) => i,
            None => {
                let statements = TableStatements {
                    meta: MetaRows::new(conn, t)?,
                    held: Vec::new(),
                    held_ids: HashSet::default(),
                    writes: Vec::new(),
                    overlay: None,
                };
                self.statements.push((t.id, statements));
                self.statements.len() - 1
            }
        };
        Ok(&mut self.statements[i].1)
    }
}

/// A row's metadata as merged, not written yet.
struct HeldMeta {
    id: i64,
    exists: bool,
    key: Value,
    cl: u64,
    dbv: u64,
    clocks: Vec<u8>,
}

impl<'c> TableStatements<'c> {
    /// Where `key` (whose own id is `id`) is, counting held writes: a row
    /// whose place is held is found after writing what is held.
    fn locate(&mut self, id: i64, key: &Value) -> Result<Located> {
        let at = self.meta.locate(id, key)?;
        if !self.held_ids.contains(&at.id) {
            return Ok(at);
        }
        self.write_held()?;
        self.meta.locate(id, key)
    }

    /// Writes the held metadata in id order: rows arrive in key order (as
    /// a server sends them), which the app table's key index wants, and
    /// written as they come the metadata would go to its pages at random.
    fn write_held(&mut self) -> Result<()> {
        // Positions are sorted, not the held rows, which are ten times
        // larger (moving them cost more than writing some of them).
        let mut order: Vec<(i64, usize)> = self
            .held
            .iter()
            .enumerate()
            .map(|(i, h)| (h.id, i))
            .collect();
        order.sort_unstable();
        for (_, i) in order {
            let h = &self.held[i];
            self.meta
                .write(h.id, h.exists, &h.key, h.cl, h.dbv, &h.clocks)?;
        }
        self.held.clear();
        self.held_ids.clear();
        Ok(())
    }

    /// The app-table statement of `kind` writing `slots`, made from the SQL
    /// `sql` gives the first time.
    fn write(
        &mut self,
        conn: &'c Connection,
        kind: u8,
        slots: &[usize],
        sql: impl FnOnce() -> String,
    ) -> Result<&mut CachedStatement<'c>> {
        let i = match self
            .writes
            .iter()
            .position(|(k, s, _)| *k == kind && s == slots)
        {
            Some(i) => i,
            None => {
                self.writes
                    .push((kind, slots.to_vec(), conn.prepare_cached(&sql())?));
                self.writes.len() - 1
            }
        };
        Ok(&mut self.writes[i].2)
    }
}

fn meta_key(t: &TableInfo, pk: &[Value]) -> Value {
    if t.pk.len() == 1 {
        pk[0].clone()
    } else {
        Value::Blob(pack_values(pk))
    }
}

impl Database {
    /// The newest db_version of `peer` this database has received in full:
    /// the answer to "what have you seen from me?".
    pub fn seen_version(&self, peer: SiteId) -> Result<u64> {
        self.read_snapshot(|conn| {
            Ok(conn
                .query_row(
                    "SELECT p.seen FROM confluo_peers p JOIN confluo_sites s ON s.ord = p.site_ord WHERE s.site_id = ?1",
                    [&peer.as_bytes()[..]],
                    |r| r.get::<_, i64>(0),
                )
                .optional()?
                .unwrap_or(0) as u64)
        })
    }

    /// The changes a peer misses: everything recorded after `since`, minus
    /// what originated at `recipient` (it has those already).
    pub fn changes_since(&self, since: u64, recipient: Option<SiteId>) -> Result<ChangeSet> {
        self.export(since, recipient, false)
    }

    /// Exports what was recorded after `since`. With `skip_server_versions`,
    /// leaves out what was recorded at the db_versions of changes pulled
    /// from the server (`confluo_server_dbvs`): the server has those.
    pub(crate) fn export(
        &self,
        since: u64,
        recipient: Option<SiteId>,
        skip_server_versions: bool,
    ) -> Result<ChangeSet> {
        self.read_snapshot(|conn| self.export_in(conn, since, recipient, skip_server_versions))
    }

    /// `export`, in the read snapshot of `conn`.
    pub(crate) fn export_in(
        &self,
        conn: &Connection,
        since: u64,
        recipient: Option<SiteId>,
        skip_server_versions: bool,
    ) -> Result<ChangeSet> {
        let source = self.site_id();
        let tables = self.tables_in(conn)?;
        let sites = self.sites_as_of(conn)?;
        let exclude = recipient.and_then(|r| sites.iter().position(|s| *s == r).map(|p| p as u32));
        // No versions to skip (the common push: the push mark moved past
        // what was pulled) is the same as not skipping, without the queries
        // that leave them out.
        let skip = if skip_server_versions {
            Some(server_versions_after(conn, since)?).filter(|s| !s.is_empty())
        } else {
            None
        };
        let mut changes = Vec::new();
        let mut until = since;
        for t in &tables {
            let from = ExportFrom {
                since,
                exclude,
                skip: skip.as_ref(),
            };
            let overlay = self.inner.bulk.overlay(conn, t.id)?;
            until = until.max(export_table(conn, t, &overlay, from, &sites, &mut changes)?);
        }
        until = until.max(export_pending(conn, since, recipient, &mut changes)?);
        if let Some(skip) = &skip {
            changes.retain(|c| !skip.contains(&c.db_version));
        }
        number_seqs(&mut changes);
        Ok(ChangeSet {
            source,
            recipient,
            since,
            until,
            changes,
        })
    }

    /// Everything `peer` misses, by what it says it has seen from us.
    pub fn changes_for_peer(&self, peer: SiteId, seen_by_peer: u64) -> Result<ChangeSet> {
        self.changes_since(seen_by_peer, Some(peer))
    }

    /// Merges a change set: atomically (one transaction, with the record of
    /// what was received), idempotently and in any order. A change set with
    /// any invalid change is refused whole, leaving the database unchanged.
    pub fn apply(&self, changeset: &ChangeSet) -> Result<ApplyReport> {
        self.apply_changes(&changeset.changes, Sender::Peer, |db, tx, ctx| {
            db.record_received(tx, ctx, changeset)
        })
    }

    /// Validates and merges `changes` in one transaction, with `bookkeeping`
    /// (what was received from whom) written in the same transaction.
    ///
    /// From a server, a change that cannot be applied is kept aside instead:
    /// the transaction is tried again without the row SQLite refused, so the
    /// common case pays nothing for the rare one.
    pub(crate) fn apply_changes(
        &self,
        changes: &[Change],
        sender: Sender,
        bookkeeping: impl Fn(&Self, &Transaction<'_>, &mut ApplyCtx) -> Result<()>,
    ) -> Result<ApplyReport> {
        if sender == Sender::Peer {
            // Refused whole before anything is written.
            self.validate(changes, sender)?;
        }
        self.apply_chunks(|_, merge| merge(changes), sender, bookkeeping)
    }

    /// As `apply_changes`, for changes that come in chunks (pages kept on
    /// disk): `chunks` calls `merge` with each chunk in turn, and may be
    /// called again from the start (with the same transaction's connection)
    /// when a refused row makes the merge start over carefully. Memory is
    /// bounded by a chunk, whatever the total; a row's changes should not
    /// be split between chunks (merging them in two steps is correct, but
    /// a refused row is then kept aside in parts).
    pub(crate) fn apply_chunks(
        &self,
        chunks: impl Fn(&Connection, &mut dyn FnMut(&[Change]) -> Result<()>) -> Result<()>,
        sender: Sender,
        bookkeeping: impl Fn(&Self, &Transaction<'_>, &mut ApplyCtx) -> Result<()>,
    ) -> Result<ApplyReport> {
        // First all rows in one go; if a row is refused (from a server), all
        // again with each row under a savepoint, so that a refused row is
        // undone alone: twice the work at worst, whatever the number of
        // refused rows.
        let mut careful = false;
        loop {
            let tx = self.transaction()?;
            let remote = RemoteWrites::begin(&self.inner.state);
            let mut ctx = ApplyCtx::new(self.sites_in(tx.conn())?);
            // Refused changes are kept aside after the bookkeeping (which
            // may clear earlier copies of them): few, so held in memory.
            let mut aside: (Vec<Change>, Vec<Option<String>>) = Default::default();
            let mut newest: Option<Hlc> = None;
            let merged = chunks(tx.conn(), &mut |changes: &[Change]| {
                let mut refused = self.refusals(changes, sender);
                ctx.report.received += changes.len();
                if careful {
                    self.merge_rows_guarded(&tx, &mut ctx, changes, &mut refused, None)?;
                } else {
                    self.merge_changes(&tx, &mut ctx, changes, &refused, None)?;
                }
                for (c, r) in changes.iter().zip(&refused) {
                    if r.is_some() {
                        aside.0.push(c.clone());
                        aside.1.push(r.clone());
                    }
                }
                let chunk_newest = changes
                    .iter()
                    .zip(&refused)
                    .filter(|(_, r)| r.is_none())
                    .map(|(c, _)| c.hlc)
                    .max();
                newest = newest.max(chunk_newest);
                Ok(())
            });
            if let Err(err) = merged {
                if sender == Sender::Server
                    && !careful
                    && ctx.failed_row.is_some()
                    && is_data_error(&err)
                {
                    drop(ctx);
                    drop(remote);
                    drop(tx);
                    careful = true;
                    continue;
                }
                return Err(schema_violation_is_bad_input(err));
            }
            ctx.report.db_version = lock(&self.inner.state).tx_dbv;
            bookkeeping(self, &tx, &mut ctx)?;
            ctx.report.rejected = keep_aside(tx.conn(), &aside.0, &aside.1)?;
            if let Some(max) = newest {
                // The HLC receive rule: later local clocks exceed every clock
                // seen, even one ahead of this device's wall clock.
                lock(&self.inner.state).hlc.observe(max);
            }
            drop(remote);
            let new_sites = ctx.sites.len() > ctx.first_new_site;
            // Its statements go before the transaction they were made on.
            let report = std::mem::take(&mut ctx.report);
            drop(ctx);
            tx.commit_then(|conn| {
                if new_sites {
                    self.refresh_caches(conn, None)
                } else {
                    Ok(())
                }
            })?;
            return Ok(report);
        }
    }

    /// Why each change is refused, if it is: a server's changes one by one
    /// (a refused one is kept aside); a peer's were checked whole before.
    fn refusals(&self, changes: &[Change], sender: Sender) -> Vec<Option<String>> {
        let mut refused: Vec<Option<String>> = vec![None; changes.len()];
        if sender == Sender::Server {
            for (i, c) in changes.iter().enumerate() {
                if let Err(e) = self.validate(std::slice::from_ref(c), sender) {
                    refused[i] = Some(e.to_string().replacen("change 0 ", "", 1));
                }
            }
        }
        refused
    }

    /// Merges `changes` row by row, each row under a savepoint: a row that
    /// this database refuses (a data error) is undone, marked `refused`
    /// with the reason, and the others go on.
    fn merge_rows_guarded<'c>(
        &self,
        tx: &'c Transaction<'_>,
        ctx: &mut ApplyCtx<'c>,
        changes: &[Change],
        refused: &mut [Option<String>],
        adding: Option<&Arc<TableInfo>>,
    ) -> Result<()> {
        let conn = tx.conn();
        let mut start = 0;
        while start < changes.len() {
            let end = row_end(changes, start);
            let row = start..end;
            start = end;
            // What the row may leave behind in memory if it is undone.
            let (sites, report) = (ctx.sites.len(), ctx.report.clone());
            let events = lock(&self.inner.state).events.len();
            conn.execute_batch("SAVEPOINT confluo_row")?;
            let merged = self.merge_changes(
                tx,
                ctx,
                &changes[row.clone()],
                &refused[row.clone()],
                adding,
            );
            match merged {
                Ok(()) => conn.execute_batch("RELEASE confluo_row")?,
                Err(err) if is_data_error(&err) => {
                    conn.execute_batch("ROLLBACK TO confluo_row; RELEASE confluo_row")?;
                    ctx.last_site = None;
                    for s in ctx.sites.drain(sites..) {
                        ctx.site_ords.remove(&s);
                    }
                    ctx.report = report;
                    ctx.failed_row = None;
                    lock(&self.inner.state).events.truncate(events);
                    let reason = schema_violation_is_bad_input(Error::Sqlite {
                        message: err.to_string(),
                        code: None,
                    })
                    .to_string();
                    for r in &mut refused[row] {
                        r.get_or_insert_with(|| reason.clone());
                    }
                }
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// Refuses anything a correct sender never sends, before writing a byte.
    /// Changes from a server are not judged by this device's clock.
    fn validate(&self, changes: &[Change], sender: Sender) -> Result<()> {
        let opts = &self.inner.options;
        let limits = Limits {
            max_value_bytes: opts.max_value_bytes,
            max_clock_drift: match sender {
                Sender::Peer => opts.max_clock_drift,
                Sender::Server => Duration::from_millis(u64::MAX),
            },
        };
        let now = opts.time.now_ms();
        for (i, c) in changes.iter().enumerate() {
            let known = self.table_by_cid(&c.table);
            if let Some(t) = &known {
                if c.pk.len() != t.pk.len() {
                    return Err(Error::invalid(format!(
                        "change {i} (table {:?}): the key has {} values, the table's has {}",
                        c.table,
                        c.pk.len(),
                        t.pk.len()
                    )));
                }
            }
            let known_column = |col: &str| {
                known
                    .as_ref()
                    .is_some_and(|t| t.slot_of_cid(col).is_some() || t.dropped(col))
            };
            check_change(i, c, &limits, now, known.is_some(), known_column)?;
        }
        Ok(())
    }

    /// Merges `changes` row by row (consecutive changes of one row merge
    /// together; a row may appear again later, which is just slower).
    /// `adding` is a table being made synced in this transaction, not yet
    /// in the cache.
    fn merge_changes<'c>(
        &self,
        tx: &'c Transaction<'_>,
        ctx: &mut ApplyCtx<'c>,
        changes: &[Change],
        refused: &[Option<String>],
        adding: Option<&Arc<TableInfo>>,
    ) -> Result<()> {
        let merged = self.merge_rows(tx, ctx, changes, refused, adding);
        for (_, statements) in &mut ctx.statements {
            if merged.is_ok() {
                statements.write_held()?;
            } else {
                // Undone with the rows (or the whole transaction).
                statements.held.clear();
                statements.held_ids.clear();
            }
        }
        merged
    }

    fn merge_rows<'c>(
        &self,
        tx: &'c Transaction<'_>,
        ctx: &mut ApplyCtx<'c>,
        changes: &[Change],
        refused: &[Option<String>],
        adding: Option<&Arc<TableInfo>>,
    ) -> Result<()> {
        let conn = tx.conn();
        let mut start = 0;
        while start < changes.len() {
            let end = row_end(changes, start);
            let row = start..end;
            start = end;
            let first = &changes[row.start];
            // Changes kept aside are left out (rare: the row is copied).
            let kept: Vec<Change>;
            let (group, range) = if refused[row.clone()].iter().all(Option::is_none) {
                (changes, row.clone())
            } else {
                kept = changes[row.clone()]
                    .iter()
                    .zip(&refused[row.clone()])
                    .filter(|(_, r)| r.is_none())
                    .map(|(c, _)| c.clone())
                    .collect();
                let n = kept.len();
                (&kept[..], 0..n)
            };
            if range.is_empty() {
                continue;
            }
            let table = match adding {
                Some(t) if t.cid == first.table => Some(t.clone()),
                _ => self.table_by_cid(&first.table),
            };
            let merged = match table {
                Some(t) => self.merge_row(conn, ctx, &t, group, range),
                // A dropped table's changes are stale for good.
                None if self.table_dropped(&first.table) => {
                    ctx.report.stale += range.len();
                    Ok(())
                }
                None => group[range]
                    .iter()
                    .try_for_each(|c| self.defer(conn, ctx, c)),
            };
            if let Err(e) = merged {
                ctx.failed_row = Some(row);
                return Err(e);
            }
        }
        Ok(())
    }

    fn merge_row<'c>(
        &self,
        conn: &'c Connection,
        ctx: &mut ApplyCtx<'c>,
        t: &TableInfo,
        changes: &[Change],
        range: std::ops::Range<usize>,
    ) -> Result<()> {
        let pk = &changes[range.start].pk;
        let key = meta_key(t, pk);
        let statements = ctx.statements(conn, t)?;
        let at = statements.locate(self.inner.row_ids.id(&key), &key)?;
        let overlay = match &mut statements.overlay {
            Some(overlay) => overlay,
            None => statements
                .overlay
                .insert(self.inner.bulk.overlay(conn, t.id)?),
        };
        let mut row: RowState<Local> = match &at.stored {
            None => RowState::unknown(),
            Some(_) => {
                let (cl, clocks) = at.clocks(overlay, t.slots.len())?;
                let to_cell = |s: Stamp| -> Result<Cell<Local>> {
                    let site = *ctx
                        .sites
                        .get(s.site as usize)
                        .ok_or_else(|| Error::Sqlite {
                            message: "corrupt confluo metadata: unknown site ordinal".into(),
                            code: None,
                        })?;
                    Ok(Cell {
                        version: Version { hlc: s.hlc, site },
                        data: Local {
                            site: s.site,
                            dbv: s.dbv,
                            from: None,
                        },
                    })
                };
                RowState {
                    cl,
                    marker: clocks.marker.map(to_cell).transpose()?,
                    cells: clocks
                        .cells
                        .into_iter()
                        .map(|c| c.map(to_cell).transpose())
                        .collect::<Result<_>>()?,
                }
            }
        };
        let was_alive = row.is_alive();
        let mut reset = false;
        let mut won = false;
        for i in range {
            let c = &changes[i];
            let target = match &c.column {
                None => Target::Marker,
                Some(col) => match t.slot_of_cid(col) {
                    Some(slot) => Target::Column(slot),
                    None if t.dropped(col) => {
                        ctx.report.stale += 1;
                        continue;
                    }
                    None => {
                        self.defer(conn, ctx, c)?;
                        continue;
                    }
                },
            };
            let site = ctx.ord(conn, c.site)?;
            let version = Version {
                hlc: c.hlc,
                site: c.site,
            };
            let data = Local {
                site,
                dbv: 0,
                from: Some(i),
            };
            match row.merge(target, c.cl, version, data) {
                Outcome::Stale => ctx.report.stale += 1,
                Outcome::Won { reset: r } => {
                    ctx.report.applied += 1;
                    reset |= r;
                    won = true;
                }
            }
        }
        if !won {
            return Ok(());
        }
        self.catch_up_counters(conn)?;
        let dbv = lock(&self.inner.state).db_version();
        let written: Vec<usize> = row
            .cells
            .iter()
            .enumerate()
            .filter(|(s, c)| {
                t.slots.get(*s).is_some_and(Option::is_some)
                    && c.as_ref().is_some_and(|c| c.data.from.is_some())
            })
            .map(|(s, _)| s)
            .collect();
        let value_of = |slot: usize| -> &Value {
            let from = row.cells[slot]
                .as_ref()
                .and_then(|c| c.data.from)
                .expect("written cell");
            &changes[from].value
        };
        let now_alive = row.is_alive();
        if now_alive && (reset || !was_alive) {
            let stmt = ctx.statements(conn, t)?.write(conn, b'i', &written, || {
                let cols: Vec<String> =
                    t.pk.iter()
                        .map(|c| quote(c))
                        .chain(
                            written
                                .iter()
                                .map(|&s| quote(t.slots[s].as_deref().expect("live"))),
                        )
                        .collect();
                let marks: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
                format!(
                    "INSERT OR REPLACE INTO {}({}) VALUES ({})",
                    quote(&t.name),
                    cols.join(", "),
                    marks.join(", ")
                )
            });
            let values = pk.iter().chain(written.iter().map(|&s| value_of(s)));
            stmt?.execute(params_from_iter(values))?;
        } else if now_alive && !written.is_empty() {
            let stmt = ctx.statements(conn, t)?.write(conn, b'u', &written, || {
                let sets: Vec<String> = written
                    .iter()
                    .enumerate()
                    .map(|(i, &s)| {
                        format!(
                            "{} = ?{}",
                            quote(t.slots[s].as_deref().expect("live")),
                            i + 1
                        )
                    })
                    .collect();
                format!(
                    "UPDATE {} SET {} WHERE {}",
                    quote(&t.name),
                    sets.join(", "),
                    t.key_where(written.len() + 1)
                )
            });
            let values = written.iter().map(|&s| value_of(s)).chain(pk.iter());
            stmt?.execute(params_from_iter(values))?;
        } else if !now_alive && was_alive {
            ctx.statements(conn, t)?
                .write(conn, b'd', &[], || {
                    format!("DELETE FROM {} WHERE {}", quote(&t.name), t.key_where(1))
                })?
                .execute(params_from_iter(pk.iter()))?;
        }
        self.check_no_trigger_writes(t)?;
        if now_alive || was_alive {
            lock(&self.inner.state).mark_changed(&t.name);
        }

        let stamp = |c: &Cell<Local>| Stamp {
            hlc: c.version.hlc,
            site: c.data.site,
            dbv: if c.data.from.is_some() {
                dbv
            } else {
                c.data.dbv
            },
        };
        let clocks = RowClocks {
            marker: row.marker.as_ref().map(stamp),
            cells: row.cells.iter().map(|c| c.as_ref().map(stamp)).collect(),
        };
        let statements = ctx.statements(conn, t)?;
        statements.held_ids.insert(at.id);
        statements.held.push(HeldMeta {
            id: at.id,
            exists: at.stored.is_some(),
            key,
            cl: row.cl,
            dbv,
            clocks: clocks.encode(dbv),
        });
        Ok(())
    }

    /// After the statement that wrote one remote row: the capture triggers
    /// report at most that row's own write. Anything more was written by an
    /// app trigger to a synced table. Such a write is refused: recorded as
    /// a local change it would be made again by every replica that applies
    /// the row (a trigger that stamps the row would bounce between devices
    /// for ever), and left unrecorded it would make this replica differ. An
    /// app trigger that writes synced tables must be guarded with
    /// `WHEN confluo_tracking()`, so that it runs where the write is made
    /// and what it writes syncs from there.
    fn check_no_trigger_writes(&self, t: &TableInfo) -> Result<()> {
        let events = {
            let mut st = lock(&self.inner.state);
            let own = st.events.iter().filter(|e| e.table == t.id).count();
            if own <= 1 && own == st.events.len() {
                // Cleared in place: the next row's write reuses the memory.
                st.events.clear();
                return Ok(());
            }
            std::mem::take(&mut st.events)
        };
        let tables = self.all_tables();
        let mut written: Vec<&str> = events
            .iter()
            .filter_map(|e| tables.iter().find(|x| x.id == e.table))
            .map(|x| &*x.name)
            .collect();
        written.sort_unstable();
        written.dedup();
        Err(Error::invalid(format!(
            "an app trigger wrote the synced table(s) {} while a remote change to {:?} was applied; \
             guard app triggers that write synced tables with WHEN confluo_tracking()",
            written.join(", "),
            &*t.name
        )))
    }

    /// Keeps a change for a table or column this database does not have
    /// yet, merged with what was kept before for the same cell.
    fn defer(&self, conn: &Connection, ctx: &mut ApplyCtx, c: &Change) -> Result<()> {
        self.catch_up_counters(conn)?;
        let dbv = lock(&self.inner.state).db_version();
        let stored = conn
            .prepare_cached(
                "INSERT INTO confluo_pending(tbl, pk, col, cl, value, hlc, site, dbv) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                 ON CONFLICT(tbl, pk, col) DO UPDATE SET cl = excluded.cl, value = excluded.value, \
                 hlc = excluded.hlc, site = excluded.site, dbv = excluded.dbv \
                 WHERE (excluded.cl, excluded.hlc, excluded.site) > (cl, hlc, site)",
            )?
            .execute(params![
                &*c.table,
                pack_values(&c.pk),
                c.column.as_deref().unwrap_or(""),
                c.cl as i64,
                &c.value,
                c.hlc.0 as i64,
                &c.site.as_bytes()[..],
                dbv as i64,
            ])?;
        if stored > 0 {
            ctx.report.deferred += 1;
        } else {
            ctx.report.stale += 1;
        }
        Ok(())
    }

    /// Merges kept changes that `table` can now hold, and forgets them.
    pub(crate) fn activate_pending(&self, tx: &Transaction<'_>, t: &Arc<TableInfo>) -> Result<()> {
        let conn = tx.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT pk, col, cl, value, hlc, site FROM confluo_pending WHERE tbl = ?1 ORDER BY pk, col",
        )?;
        let table: Arc<str> = t.cid.clone();
        let mut changes = Vec::new();
        let mut last_pk: Option<(Vec<u8>, Arc<[Value]>)> = None;
        let rows = stmt.query_map([&*t.cid], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Value>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Vec<u8>>(5)?,
            ))
        })?;
        for row in rows {
            let (pk_bytes, col, cl, value, hlc, site) = row?;
            if !col.is_empty() && t.slot_of_cid(&col).is_none() {
                continue;
            }
            let pk = match &last_pk {
                Some((b, pk)) if *b == pk_bytes => pk.clone(),
                _ => {
                    let pk: Arc<[Value]> = unpack_values(&pk_bytes)?.into();
                    if pk.len() != t.pk.len() {
                        // Kept for a differently keyed table of that name: never mergeable.
                        continue;
                    }
                    last_pk = Some((pk_bytes, pk.clone()));
                    pk
                }
            };
            changes.push(Change {
                table: table.clone(),
                pk,
                column: (!col.is_empty()).then(|| Arc::from(col)),
                value,
                hlc: Hlc(hlc as u64),
                site: site_from(&site)?,
                cl: cl as u64,
                db_version: 0,
                seq: 0,
            });
        }
        drop(stmt);
        if changes.is_empty() {
            return Ok(());
        }
        let remote = RemoteWrites::begin(&self.inner.state);
        let mut ctx = ApplyCtx::new(self.sites_in(conn)?);
        // A kept change this database refuses is kept aside, as it would
        // have been had it arrived after the migration: the migration
        // itself never fails for it.
        let mut refused = vec![None; changes.len()];
        self.merge_rows_guarded(tx, &mut ctx, &changes, &mut refused, Some(t))?;
        drop(remote);
        keep_aside(conn, &changes, &refused)?;
        for c in &changes {
            conn.prepare_cached(
                "DELETE FROM confluo_pending WHERE tbl = ?1 AND pk = ?2 AND col = ?3",
            )?
            .execute(params![
                &*c.table,
                pack_values(&c.pk),
                c.column.as_deref().unwrap_or("")
            ])?;
        }
        // New sites reach the cache when the caller commits (refresh_caches).
        Ok(())
    }

    /// Records, in the apply's transaction, how far this database has now
    /// seen the sender's history. Only a set made for us (or for anyone)
    /// that starts where we are counts: a set filtered for another peer, or
    /// one with a gap before it, does not move the cursor.
    fn record_received(
        &self,
        tx: &Transaction<'_>,
        ctx: &mut ApplyCtx,
        cs: &ChangeSet,
    ) -> Result<()> {
        if cs.source == self.site_id() || cs.recipient.is_some_and(|r| r != self.site_id()) {
            return Ok(());
        }
        let conn = tx.conn();
        let ord = ctx.ord(conn, cs.source)?;
        let seen: u64 = conn
            .query_row(
                "SELECT seen FROM confluo_peers WHERE site_ord = ?1",
                [ord],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .unwrap_or(0) as u64;
        if cs.since <= seen && cs.until > seen {
            conn.prepare_cached(
                "INSERT INTO confluo_peers(site_ord, seen) VALUES (?1, ?2) \
                 ON CONFLICT(site_ord) DO UPDATE SET seen = excluded.seen",
            )?
            .execute(params![ord, cs.until as i64])?;
        }
        Ok(())
    }
}

/// Whether an error came from the data of one row (a constraint, a type,
/// a trigger or function of the app that refused it) rather than from
/// storage: only storage failures stop a whole apply from a server.
fn is_data_error(err: &Error) -> bool {
    // SQLite's primary codes for failures of the database itself.
    const STORAGE: [i32; 14] = [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 26];
    match err {
        Error::Sqlite {
            code: Some(code), ..
        } => !STORAGE.contains(&(code & 0xff)),
        // Confluo's own metadata failing, without a code.
        Error::Sqlite { code: None, .. } => false,
        Error::InvalidInput(_) | Error::MalformedChangeSet(_) => true,
        _ => false,
    }
}

/// A change set that breaks the app's schema (a STRICT column's type, a
/// CHECK, a NOT NULL) is bad input, not a storage failure.
/// Where the run of changes to the row of `changes[start]` ends.
fn row_end(changes: &[Change], start: usize) -> usize {
    let first = &changes[start];
    // Decoded change sets share one Arc per table and key: compared first.
    let same_row = |c: &Change| {
        (Arc::ptr_eq(&c.table, &first.table) || c.table == first.table)
            && (Arc::ptr_eq(&c.pk, &first.pk) || c.pk == first.pk)
    };
    start
        + 1
        + changes[start + 1..]
            .iter()
            .take_while(|c| same_row(c))
            .count()
}

fn schema_violation_is_bad_input(err: Error) -> Error {
    const SQLITE_CONSTRAINT: i32 = 19;
    const SQLITE_MISMATCH: i32 = 20;
    match err {
        Error::Sqlite {
            message,
            code: Some(code),
        } if matches!(code & 0xff, SQLITE_CONSTRAINT | SQLITE_MISMATCH) => Error::invalid(format!(
            "the change set does not fit this database's schema: {message}"
        )),
        other => other,
    }
}

/// Numbers the changes of each db_version in the order they appear (the
/// export keeps a row's changes side by side, so the wire encoding writes
/// its key once).
fn number_seqs(changes: &mut [Change]) {
    // The next seq of the last db_version seen is kept out of the map:
    // consecutive changes mostly share one. A B-tree: integer keys compare
    // faster than SipHash hashes them, and an export sees few versions.
    let mut seqs: std::collections::BTreeMap<u64, u32> = Default::default();
    let mut last: Option<(u64, u32)> = None;
    for c in changes {
        let next = match last {
            Some((v, next)) if v == c.db_version => next,
            _ => {
                if let Some((v, next)) = last {
                    seqs.insert(v, next);
                }
                seqs.get(&c.db_version).copied().unwrap_or(0)
            }
        };
        c.seq = next;
        last = Some((c.db_version, next + 1));
    }
}

/// What an export leaves out: cells stamped at or before `since`, by the
/// site `exclude`, or at a db_version in `skip`.
#[derive(Clone, Copy)]
pub(crate) struct ExportFrom<'a> {
    pub since: u64,
    pub exclude: Option<u32>,
    pub skip: Option<&'a ServerVersions>,
}

impl ExportFrom<'_> {
    /// Whether a cell (or row marker) stamped `s` goes out.
    fn exports(&self, s: &Stamp) -> bool {
        s.dbv > self.since
            && Some(s.site) != self.exclude
            && !self.skip.is_some_and(|skip| skip.contains(&s.dbv))
    }

    /// Whether anything of a row of `t` goes out: its marker, or while the
    /// row is alive a cell of a live column.
    pub(crate) fn takes_row(&self, t: &TableInfo, cl: u64, clocks: &RowClocks) -> bool {
        clocks.marker.is_some_and(|s| self.exports(&s))
            || (cl % 2 == 1
                && t.live_slots().any(|(slot, _)| {
                    clocks
                        .cells
                        .get(slot)
                        .copied()
                        .flatten()
                        .is_some_and(|s| self.exports(&s))
                }))
    }
}

/// Local db_versions (no peer chooses them): hashed with foldhash, looked
/// up for every cell a push reads.
pub(crate) type ServerVersions = HashSet<u64, foldhash::fast::RandomState>;

/// The db_versions after `since` at which changes pulled from the server
/// were recorded.
pub(crate) fn server_versions_after(conn: &Connection, since: u64) -> Result<ServerVersions> {
    let mut stmt = conn.prepare_cached("SELECT dbv FROM confluo_server_dbvs WHERE dbv > ?1")?;
    let versions = stmt
        .query_map([since as i64], |r| r.get::<_, i64>(0))?
        .map(|r| r.map(|v| v as u64))
        .collect::<rusqlite::Result<ServerVersions>>()?;
    Ok(versions)
}

/// Exports the rows of one table changed after `from.since`, their clocks
/// read through the table's bulk entries (`overlay`); returns the table's
/// newest db_version.
fn export_table(
    conn: &Connection,
    t: &TableInfo,
    overlay: &Overlay,
    from: ExportFrom<'_>,
    sites: &[SiteId],
    out: &mut Vec<Change>,
) -> Result<u64> {
    let meta = t.meta_table();
    // Cached: a device exports at every sync, most often a few rows.
    let max_dbv: i64 = conn
        .prepare_cached(&format!("SELECT coalesce(max(dbv), 0) FROM {meta}"))?
        .query_row([], |r| r.get(0))?;
    let max_dbv = max_dbv.max(overlay.max_dbv() as i64);
    let since = from.since;
    let mut export = RowExport {
        t,
        overlay,
        from,
        sites,
        live: t.live_slots().map(|(s, n)| (s, n.clone())).collect(),
        out,
    };
    let cols: String = export
        .live
        .iter()
        .map(|(_, n)| format!(", t.{}", quote(n)))
        .collect();
    let table = quote(&t.name);
    // A first export reads everything anyway. With versions to skip (a
    // device that pulled before it ever pushed), most rows are the server's:
    // they are left out below without their values being read or held.
    if since == 0 && from.skip.is_none() {
        export_everything(conn, &mut export, &cols)?;
        return Ok(max_dbv as u64);
    }
    // Rows last written by a pull from the server are mostly the server's
    // own changes: a device's push after each pull would otherwise read
    // every pulled row back from the table only to leave it out. They are
    // read apart, below, and the table only for those that still hold an
    // unsent local change.
    let pulled = "SELECT dbv FROM confluo_server_dbvs WHERE dbv > ?1";
    let sql = format!(
        "SELECT m.id, m.pk, m.cl, m.dbv, m.clocks{cols} FROM {meta} AS m \
         LEFT JOIN {table} AS t ON m.cl % 2 = 1 AND {join} WHERE m.dbv > ?1{rest}",
        join = key_matches(t, "+m.pk"),
        rest = if from.skip.is_some() {
            format!(" AND m.dbv NOT IN ({pulled})")
        } else {
            String::new()
        }
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query([since as i64])?;
    while let Some(r) = rows.next()? {
        export.joined_row(r)?;
    }
    // Rows whose newest change is a bulk entry's (their own dbv is older).
    if !overlay.is_empty() {
        let mut by_id = conn.prepare_cached(&format!(
            "SELECT m.id, m.pk, m.cl, m.dbv, m.clocks{cols} FROM {meta} AS m \
             LEFT JOIN {table} AS t ON m.cl % 2 = 1 AND {join} WHERE m.id = ?1 AND m.dbv <= ?2",
            join = key_matches(t, "+m.pk"),
        ))?;
        for id in overlay.ids_after(since) {
            if let Some(r) = by_id.query(params![id, since as i64])?.next()? {
                export.joined_row(r)?;
            }
        }
    }
    if from.skip.is_some() {
        let mut pulled_rows = conn.prepare_cached(&format!(
            "SELECT pk, cl, dbv, clocks, id FROM {meta} WHERE dbv IN ({pulled})"
        ))?;
        let mut read_row = conn.prepare_cached(&format!(
            "SELECT {} FROM {table} WHERE {}",
            export
                .live
                .iter()
                .map(|(_, n)| quote(n))
                .chain(std::iter::once("NULL".to_owned()))
                .collect::<Vec<_>>()
                .join(", "),
            t.key_where(1)
        ))?;
        let mut rows = pulled_rows.query([since as i64])?;
        while let Some(r) = rows.next()? {
            let stored = (r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64);
            let (cl, clocks, _) =
                overlay.read(r.get(4)?, stored, r.get_ref(3)?.as_blob()?, t.slots.len())?;
            if !from.takes_row(t, cl, &clocks) {
                continue;
            }
            let pk = row_key(t, Value::from_ref(r.get_ref(0)?))?;
            let values: Vec<Value> = if cl % 2 == 1 {
                read_row
                    .query_row(params_from_iter(pk.iter()), |v| {
                        (0..export.live.len())
                            .map(|i| v.get_ref(i).map(Value::from_ref))
                            .collect::<rusqlite::Result<Vec<Value>>>()
                    })
                    .optional()?
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            export.row(pk, cl, &clocks, |i| {
                Ok(values.get(i).cloned().unwrap_or(Value::Null))
            })?;
        }
    }
    Ok(max_dbv as u64)
}

/// SQL that matches the table's row (`t`) to the metadata key `key` (an
/// expression without affinity): the key column's own affinity converts
/// the key, as for a bound parameter, so a key a peer sent as 5 is found in
/// a TEXT key column that holds '5'.
fn key_matches(t: &TableInfo, key: &str) -> String {
    // Byte for byte, as in `TableInfo::key_where`.
    if t.pk.len() == 1 {
        format!("t.{} = ({key}) COLLATE BINARY", quote(&t.pk[0]))
    } else {
        t.pk.iter()
            .enumerate()
            .map(|(i, c)| format!("t.{} = confluo_unpack({key}, {i}) COLLATE BINARY", quote(c)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }
}

/// A row's key values from its metadata key.
fn row_key(t: &TableInfo, key: Value) -> Result<Arc<[Value]>> {
    if t.pk.len() == 1 {
        return Ok(vec![key].into());
    }
    match key {
        Value::Blob(b) => Ok(unpack_values(&b)?.into()),
        _ => Err(Error::Sqlite {
            message: "corrupt confluo metadata: composite key is not a blob".into(),
            code: None,
        }),
    }
}

/// Exports every row of a table, in key order. A sync server stores rows
/// by key: a first push of a large table in key order lets it append
/// instead of writing at random (1.2-1.4 s against 4.4 s in id order for
/// 100,000 rows). The table and its metadata are each read once, in their
/// own order, and sorted by key in memory (positions are sorted, first
/// bytes compared first); each row's values move into its changes, so this
/// holds little more than the export does anyway. The two are then matched
/// as they are walked, instead of looking each row up in the table's key
/// index, which reads the table's pages at random.
fn export_everything(conn: &Connection, export: &mut RowExport<'_>, cols: &str) -> Result<()> {
    let t = export.t;
    let table = quote(&t.name);
    let live = export.live.len();
    // The table's keys (only matched, never sent: their bytes are kept in
    // one buffer), and its rows' live values side by side (`live` to a row)
    // in one vector.
    let mut keys = KeyBuffer::default();
    let mut values: Vec<Value> = Vec::new();
    {
        let mut read = conn.prepare_cached(&format!(
            "SELECT {key}{cols} FROM {table} AS t",
            key = t.key_expr("t")
        ))?;
        let mut read = read.query([])?;
        while let Some(r) = read.next()? {
            keys.push(r.get_ref(0)?);
            for i in 0..live {
                values.push(Value::from_ref(r.get_ref(1 + i)?));
            }
        }
    }
    // Each row's metadata, its clocks decoded as read (with the bulk
    // entries laid over them) instead of held as blobs.
    let mut metas: Vec<(Value, u64, RowClocks)> = Vec::new();
    {
        let mut read = conn.prepare_cached(&format!(
            "SELECT pk, cl, dbv, clocks, id FROM {}",
            t.meta_table()
        ))?;
        let mut read = read.query([])?;
        while let Some(r) = read.next()? {
            let stored = (r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64);
            let (cl, clocks, _) =
                export
                    .overlay
                    .read(r.get(4)?, stored, r.get_ref(3)?.as_blob()?, t.slots.len())?;
            metas.push((Value::from_ref(r.get_ref(0)?), cl, clocks));
        }
    }
    // A live row whose key the table holds converted by its column's
    // affinity is looked up the way the incremental export's join finds it.
    let mut lookup = conn.prepare_cached(&format!(
        "SELECT 0{cols} FROM {table} AS t WHERE {}",
        key_matches(t, "?1")
    ))?;
    let mut rows_in_order = key_sorted(keys.len(), |r| keys.get(r))
        .into_iter()
        .peekable();
    // Reserved whole: a first export for everyone takes every cell of
    // every live row.
    if export.from.exclude.is_none() {
        export.out.reserve(metas.len() * (1 + live));
    }
    for m in key_sorted(metas.len(), |m| metas[m].0.as_sql()) {
        let (key, cl, clocks) =
            std::mem::replace(&mut metas[m], (Value::Null, 0, RowClocks::default()));
        // A row deleted (by its metadata or a bulk entry) is not looked for;
        // a live row missing from the table reads as NULLs, as in the join.
        let mut looked_up: Vec<Value>;
        let mut row_values: &mut [Value] = &mut [];
        if cl % 2 == 1 {
            while rows_in_order
                .next_if(|&r| key_order(keys.get(r), key.as_sql()).is_lt())
                .is_some()
            {}
            if let Some(r) = rows_in_order.next_if(|&r| same_key(key.as_sql(), keys.get(r))) {
                row_values = &mut values[r * live..(r + 1) * live];
            } else if let Some(r) = lookup.query([&key])?.next()? {
                looked_up = (0..live)
                    .map(|i| Ok(Value::from_ref(r.get_ref(1 + i)?)))
                    .collect::<Result<_>>()?;
                row_values = &mut looked_up;
            }
        }
        export.row(row_key(t, key)?, cl, &clocks, |i| {
            Ok(row_values
                .get_mut(i)
                .map_or(Value::Null, |v| std::mem::replace(v, Value::Null)))
        })?;
    }
    Ok(())
}

/// Keys read from SQLite, their bytes kept in one buffer: an allocation
/// for all of them instead of one each.
#[derive(Default)]
struct KeyBuffer {
    bytes: Vec<u8>,
    keys: Vec<BufferedKey>,
}

enum BufferedKey {
    Null,
    Integer(i64),
    Real(f64),
    /// A range of `bytes`.
    Text(usize, usize),
    Blob(usize, usize),
}

impl KeyBuffer {
    fn push(&mut self, key: ValueRef<'_>) {
        let mut range = |b: &[u8]| {
            self.bytes.extend_from_slice(b);
            (self.bytes.len() - b.len(), self.bytes.len())
        };
        let key = match key {
            ValueRef::Null => BufferedKey::Null,
            ValueRef::Integer(i) => BufferedKey::Integer(i),
            ValueRef::Real(r) => BufferedKey::Real(r),
            ValueRef::Text(t) => {
                let (start, end) = range(t);
                BufferedKey::Text(start, end)
            }
            ValueRef::Blob(b) => {
                let (start, end) = range(b);
                BufferedKey::Blob(start, end)
            }
        };
        self.keys.push(key);
    }

    fn len(&self) -> usize {
        self.keys.len()
    }

    fn get(&self, i: usize) -> ValueRef<'_> {
        match self.keys[i] {
            BufferedKey::Null => ValueRef::Null,
            BufferedKey::Integer(i) => ValueRef::Integer(i),
            BufferedKey::Real(r) => ValueRef::Real(r),
            BufferedKey::Text(start, end) => ValueRef::Text(&self.bytes[start..end]),
            BufferedKey::Blob(start, end) => ValueRef::Blob(&self.bytes[start..end]),
        }
    }
}

/// What one table's export needs to turn a row into changes.
struct RowExport<'a> {
    t: &'a TableInfo,
    /// The table's bulk entries, laid over each row's clocks.
    overlay: &'a Overlay,
    from: ExportFrom<'a>,
    sites: &'a [SiteId],
    /// The live columns by slot: the slot, and the SQL name to read.
    live: Vec<(usize, Arc<str>)>,
    out: &'a mut Vec<Change>,
}

impl RowExport<'_> {
    /// The changes of a row read as `id, pk, cl, dbv, clocks` then its live
    /// columns (the metadata joined to the table).
    fn joined_row(&mut self, r: &rusqlite::Row<'_>) -> Result<()> {
        let key = Value::from_ref(r.get_ref(1)?);
        let stored = (r.get::<_, i64>(2)? as u64, r.get::<_, i64>(3)? as u64);
        let (cl, clocks, _) = self.overlay.read(
            r.get(0)?,
            stored,
            r.get_ref(4)?.as_blob()?,
            self.t.slots.len(),
        )?;
        self.row(row_key(self.t, key)?, cl, &clocks, |i| {
            Ok(Value::from_ref(r.get_ref(5 + i)?))
        })
    }

    /// The changes of one row: its marker and the cells stamped after
    /// `since` by another site than `exclude`; `value(i)` reads the `i`-th
    /// live column of the row.
    fn row(
        &mut self,
        pk: Arc<[Value]>,
        cl: u64,
        clocks: &RowClocks,
        mut value: impl FnMut(usize) -> Result<Value>,
    ) -> Result<()> {
        let from = self.from;
        let fresh = |s: &Stamp| from.exports(s);
        let site_of = |ord: u32| -> Result<SiteId> {
            self.sites
                .get(ord as usize)
                .copied()
                .ok_or_else(|| Error::Sqlite {
                    message: "corrupt confluo metadata: unknown site ordinal".into(),
                    code: None,
                })
        };
        if let Some(s) = clocks.marker.filter(fresh) {
            self.out.push(Change {
                table: self.t.cid.clone(),
                pk: pk.clone(),
                column: None,
                value: Value::Null,
                hlc: s.hlc,
                site: site_of(s.site)?,
                cl,
                db_version: s.dbv,
                seq: 0,
            });
        }
        if cl % 2 == 0 {
            return Ok(());
        }
        for (i, (slot, _)) in self.live.iter().enumerate() {
            if let Some(s) = clocks.cells.get(*slot).copied().flatten().filter(fresh) {
                self.out.push(Change {
                    table: self.t.cid.clone(),
                    pk: pk.clone(),
                    column: Some(self.t.cids[*slot].clone()),
                    value: value(i)?,
                    hlc: s.hlc,
                    site: site_of(s.site)?,
                    cl,
                    db_version: s.dbv,
                    seq: 0,
                });
            }
        }
        Ok(())
    }
}

/// A change kept in `confluo_pending` or `confluo_rejected`, from a row
/// whose first columns are `tbl, pk, col, cl, value, hlc, site`.
pub(crate) fn kept_change(r: &rusqlite::Row<'_>) -> Result<Change> {
    let col: String = r.get(2)?;
    Ok(Change {
        table: Arc::from(r.get::<_, String>(0)?),
        pk: unpack_values(r.get_ref(1)?.as_blob()?)?.into(),
        column: (!col.is_empty()).then(|| Arc::from(col)),
        value: r.get(4)?,
        hlc: Hlc(r.get::<_, i64>(5)? as u64),
        site: site_from(r.get_ref(6)?.as_blob()?)?,
        cl: r.get::<_, i64>(3)? as u64,
        db_version: 0,
        seq: 0,
    })
}

/// A site id read from Confluo's metadata.
pub(crate) fn site_from(bytes: &[u8]) -> Result<SiteId> {
    SiteId::from_slice(bytes).ok_or_else(|| Error::Sqlite {
        message: "corrupt confluo metadata: bad site id".into(),
        code: None,
    })
}

/// Exports kept changes for tables and columns this database does not have,
/// so they still reach peers that do.
fn export_pending(
    conn: &Connection,
    since: u64,
    recipient: Option<SiteId>,
    out: &mut Vec<Change>,
) -> Result<u64> {
    let mut stmt = conn.prepare_cached(
        "SELECT tbl, pk, col, cl, value, hlc, site, dbv FROM confluo_pending WHERE dbv > ?1 ORDER BY tbl, pk",
    )?;
    let mut rows = stmt.query([since as i64])?;
    let mut max = 0u64;
    while let Some(r) = rows.next()? {
        let mut c = kept_change(r)?;
        c.db_version = r.get::<_, i64>(7)? as u64;
        max = max.max(c.db_version);
        if Some(c.site) != recipient {
            out.push(c);
        }
    }
    Ok(max)
}
