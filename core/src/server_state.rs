//! A device's bookkeeping for syncing with a server: which space it syncs
//! with, how far it has pulled (the server's cursor), how far the server has
//! accepted its pushes, and which local db_versions came from the server (so
//! they are never pushed back).

use std::cell::Cell;

use rusqlite::{params, Connection, OptionalExtension};

use crate::capture::lock;
use crate::changeset::{Change, ChangeSet};
use crate::db::Database;
use crate::error::{Error, Result};
use crate::replication::{ApplyReport, Sender};
use crate::schema::quote;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS confluo_sync(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS confluo_server_dbvs(dbv INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS confluo_inbox(seq INTEGER PRIMARY KEY, page BLOB NOT NULL);
";

fn get(conn: &Connection, key: &str) -> Result<Option<rusqlite::types::Value>> {
    Ok(conn
        .prepare_cached("SELECT value FROM confluo_sync WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?)
}

fn get_u64(conn: &Connection, key: &str) -> Result<u64> {
    Ok(match get(conn, key)? {
        Some(rusqlite::types::Value::Integer(i)) => i as u64,
        _ => 0,
    })
}

/// Whether a sync with the bound space ever succeeded or moved a mark:
/// after that, the binding is real.
fn heard_from_server(conn: &Connection) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT EXISTS(SELECT 1 FROM confluo_sync WHERE key IN ('confirmed', 'epoch', 'cursor', 'pushed', 'pushed_tag', 'cursor_tag'))",
        )?
        .query_row([], |r| r.get(0))?)
}

/// The bookkeeping of a pull, in the transaction that merged it: which
/// local version came from the server (never pushed back), and the cursor.
fn record_pulled(
    conn: &Connection,
    ctx: &crate::replication::ApplyCtx,
    cursor: u64,
    tag: Option<&str>,
) -> Result<()> {
    if let Some(dbv) = ctx.report.db_version {
        record_server_version(conn, dbv)?;
    }
    set(conn, "cursor", cursor as i64)?;
    match tag {
        Some(tag) => set(conn, "cursor_tag", tag),
        None => {
            conn.prepare_cached("DELETE FROM confluo_sync WHERE key = 'cursor_tag'")?
                .execute([])?;
            Ok(())
        }
    }
}

/// Notes that local version `dbv` holds only changes that came from the
/// server, which are never pushed back. When every version before it is
/// pushed already, the push mark moves onto it instead: the next push then
/// starts after it, rather than reading its rows back only to leave them
/// out (for a device that syncs often, most of what a push read).
pub(crate) fn record_server_version(conn: &Connection, dbv: u64) -> Result<()> {
    if get_u64(conn, "pushed")? + 1 == dbv {
        return set(conn, "pushed", dbv as i64);
    }
    conn.prepare_cached("INSERT OR IGNORE INTO confluo_server_dbvs(dbv) VALUES (?1)")?
        .execute([dbv as i64])?;
    Ok(())
}

fn set(conn: &Connection, key: &str, value: impl rusqlite::ToSql) -> Result<()> {
    conn.prepare_cached("INSERT INTO confluo_sync(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value")?
        .execute(params![key, value])?;
    Ok(())
}

/// A push the server accepted: every change up to local db_version
/// `until`, into the server's version `at` (with that version's tag).
#[derive(Debug)]
pub(crate) struct AcceptedPush {
    pub until: u64,
    pub at: Option<(u64, String)>,
}

/// Where this database stands with its server, as `confluo_sync` says:
/// everything a sync reads before it talks to the server.
#[derive(Debug, Default)]
pub(crate) struct Standing {
    /// The space this database syncs with, once it has tried to.
    pub space: Option<String>,
    /// Whether a sync with that space ever succeeded.
    pub confirmed: bool,
    /// The epoch of the space's history this database follows.
    pub epoch: Option<String>,
    /// The server version pulled up to, and the tag the server gave it.
    pub cursor: u64,
    pub cursor_tag: Option<String>,
    /// Where our last accepted push landed on the server, and that
    /// version's tag.
    pub pushed_to: Option<(u64, String)>,
}

impl Standing {
    /// Reads it in the caller's snapshot, in one statement (the table
    /// holds a handful of keys).
    fn read(conn: &Connection) -> Result<Standing> {
        use rusqlite::types::Value::{Integer, Text};
        let mut standing = Standing::default();
        let mut pushed_at = 0;
        let mut pushed_tag = None;
        let mut stmt = conn.prepare_cached("SELECT key, value FROM confluo_sync")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let value: rusqlite::types::Value = row.get(1)?;
            match (row.get_ref(0)?.as_str()?, value) {
                ("space", Text(s)) => standing.space = Some(s),
                ("confirmed", _) => standing.confirmed = true,
                ("epoch", Text(e)) => standing.epoch = Some(e),
                ("cursor", Integer(c)) => standing.cursor = c as u64,
                ("cursor_tag", Text(t)) => standing.cursor_tag = Some(t),
                ("pushed_at", Integer(at)) => pushed_at = at as u64,
                ("pushed_tag", Text(t)) => pushed_tag = Some(t),
                _ => {}
            }
        }
        standing.pushed_to = pushed_tag.map(|tag| (pushed_at, tag));
        Ok(standing)
    }
}

impl Database {
    /// Where this database stands with its server (see `Standing`).
    pub(crate) fn standing(&self) -> Result<Standing> {
        self.read_snapshot(Standing::read)
    }

    /// Where this database stands with its server, and what to push (as
    /// `changes_for_server`), in one snapshot: a sync reads both before it
    /// talks to the server, and each snapshot costs a read transaction on
    /// a reader whose page cache the last write emptied.
    pub(crate) fn standing_and_outgoing(&self) -> Result<(Standing, ChangeSet)> {
        self.read_snapshot(|conn| Ok((Standing::read(conn)?, self.outgoing_in(conn)?)))
    }

    /// Ties this database to `space` the first time it syncs; later calls
    /// with another space are refused (one database syncs with one space),
    /// unless no sync with the bound space ever got an answer from the
    /// server: then the binding was a mistake (a misspelt space, say) and
    /// `space` replaces it.
    pub fn bind_space(&self, space: &str) -> Result<()> {
        let bound = self.read_snapshot(|conn| get(conn, "space"))?;
        if matches!(&bound, Some(rusqlite::types::Value::Text(b)) if b == space) {
            return Ok(());
        }
        self.write(|tx| {
            let conn = tx.conn();
            match get(conn, "space")? {
                Some(rusqlite::types::Value::Text(bound))
                    if bound != space && heard_from_server(conn)? =>
                {
                    Err(Error::invalid(format!(
                        "this database syncs with space {bound:?}, not {space:?} \
                         (sign out and clear it to sync with another space)"
                    )))
                }
                Some(rusqlite::types::Value::Text(bound)) if bound == space => Ok(()),
                _ => set(conn, "space", space),
            }
        })
    }

    /// Signs out: forgets the space this database syncs with and everything
    /// learnt from its server (as `unbind_space`), and deletes every row of
    /// every synced table with its sync metadata, the changes kept aside and
    /// what peers were seen, in one transaction. The deletes are not
    /// recorded as changes: they are never pushed, to the old space or the
    /// next one. Local tables that are not synced stay as they are; so do
    /// the synced tables' schemas and this database's site id. Waits for a
    /// sync running on another thread; stop background sync first.
    pub fn sign_out_and_clear(&self) -> Result<()> {
        let _no_sync = self.inner.sync_round.lock().ok_or_else(|| {
            Error::invalid("this thread is syncing this database; sign out after the sync")
        })?;
        self.write(|tx| {
            let conn = tx.conn();
            // App triggers see the deletes as remote writes; the capture
            // triggers report them all the same, and the reports are
            // dropped: these deletes are not changes to sync.
            let _untracked = crate::replication::RemoteWrites::begin(&self.inner.state);
            let reported = lock(&self.inner.state).events.len();
            for table in self.tables_in(conn)? {
                conn.execute(&format!("DELETE FROM {}", quote(&table.name)), [])?;
                conn.execute(&format!("DELETE FROM {}", table.meta_table()), [])?;
                crate::bulk::forget(conn, table.id)?;
            }
            lock(&self.inner.state).events.truncate(reported);
            conn.execute_batch(
                "DELETE FROM confluo_sync;
                 DELETE FROM confluo_server_dbvs;
                 DELETE FROM confluo_pending;
                 DELETE FROM confluo_rejected;
                 DELETE FROM confluo_peers;",
            )?;
            Ok(())
        })
    }

    /// Records that a sync with the bound space succeeded: from then on the
    /// binding holds (see `bind_space`). Writes only the first time.
    pub(crate) fn confirm_space(&self) -> Result<()> {
        if self.read_snapshot(|conn| get(conn, "confirmed"))?.is_some() {
            return Ok(());
        }
        self.write(|tx| set(tx.conn(), "confirmed", 1i64))
    }

    /// The space this database syncs with, once it has tried to.
    pub fn bound_space(&self) -> Result<Option<String>> {
        self.read_snapshot(|conn| {
            Ok(match get(conn, "space")? {
                Some(rusqlite::types::Value::Text(s)) => Some(s),
                _ => None,
            })
        })
    }

    /// Forgets the space this database syncs with, and everything learnt
    /// from that space's server (cursor, epoch, tags, push marks), so that
    /// the next sync may bind another space. The whole database is pushed
    /// there, rows pulled from the old space included: they are this
    /// device's data now, and the new space has never seen them. Waits for
    /// a sync running on another thread; stop background sync first (it
    /// would bind its space again).
    pub fn unbind_space(&self) -> Result<()> {
        // A sync running meanwhile would write the old space's cursor back.
        let _no_sync = self.inner.sync_round.lock().ok_or_else(|| {
            Error::invalid("this thread is syncing this database; unbind after the sync")
        })?;
        self.write(|tx| {
            tx.conn().execute(
                "DELETE FROM confluo_sync WHERE key IN ('space', 'confirmed', 'cursor', 'epoch', 'cursor_tag', 'pushed', 'pushed_at', 'pushed_tag')",
                [],
            )?;
            tx.conn().execute("DELETE FROM confluo_server_dbvs", [])?;
            Ok(())
        })
    }

    /// The server version this database has pulled up to.
    pub fn server_cursor(&self) -> Result<u64> {
        self.read_snapshot(|conn| get_u64(conn, "cursor"))
    }

    /// The local db_version up to which the server has everything: our
    /// pushes it accepted, and the versions pulled from it in between.
    pub fn pushed_version(&self) -> Result<u64> {
        self.read_snapshot(|conn| get_u64(conn, "pushed"))
    }

    /// What to push: everything recorded after the last accepted push,
    /// except changes that came from the server.
    pub fn changes_for_server(&self) -> Result<ChangeSet> {
        self.read_snapshot(|conn| self.outgoing_in(conn))
    }

    /// `changes_for_server` in the caller's snapshot. The mark and the
    /// export are read in one: a pull committed in between may move the
    /// mark past its version instead of listing it as the server's, and
    /// that version's rows would go back.
    fn outgoing_in(&self, conn: &Connection) -> Result<ChangeSet> {
        self.export_in(conn, get_u64(conn, "pushed")?, None, true)
    }

    /// Records a push the server accepted, in one transaction.
    pub(crate) fn mark_pushed_to(&self, push: &AcceptedPush) -> Result<()> {
        self.write(|tx| self.record_accepted(tx, push))
    }

    /// Records a push the server accepted, in the caller's transaction.
    fn record_accepted(&self, tx: &crate::db::Transaction<'_>, push: &AcceptedPush) -> Result<()> {
        if let Some((version, tag)) = &push.at {
            set(tx.conn(), "pushed_at", *version as i64)?;
            set(tx.conn(), "pushed_tag", tag.as_str())?;
        }
        self.record_pushed(tx, push.until)
    }

    /// Records that the server accepted every change up to `until`.
    pub fn mark_pushed(&self, until: u64) -> Result<()> {
        self.write(|tx| self.record_pushed(tx, until))
    }

    fn record_pushed(&self, tx: &crate::db::Transaction<'_>, until: u64) -> Result<()> {
        let conn = tx.conn();
        if until > get_u64(conn, "pushed")? {
            set(conn, "pushed", until as i64)?;
            // Cached: it runs at every sync that pushed.
            conn.prepare_cached("DELETE FROM confluo_server_dbvs WHERE dbv <= ?1")?
                .execute([until as i64])?;
        }
        Ok(())
    }

    /// Merges changes pulled from the server and moves the cursor to
    /// `cursor`, whose version the server tagged `tag`, in one transaction:
    /// a crash leaves either both or neither.
    pub fn apply_from_server(
        &self,
        changes: &[Change],
        cursor: u64,
        tag: Option<&str>,
    ) -> Result<ApplyReport> {
        self.apply_pulled(changes, cursor, tag, None)
    }

    /// `apply_from_server`, recording in the same transaction the push
    /// whose answer brought the changes (`accepted`): most syncs then
    /// commit once, not twice. It is recorded before the pull's own marks,
    /// as when it was committed before the pull.
    pub(crate) fn apply_pulled(
        &self,
        changes: &[Change],
        cursor: u64,
        tag: Option<&str>,
        accepted: Option<&AcceptedPush>,
    ) -> Result<ApplyReport> {
        // Whether changes were kept aside before: asked in the apply's
        // transaction, where most often the answer is no and costs no read
        // transaction of its own. Those this apply keeps aside are in its
        // report.
        let keeps_aside = Cell::new(false);
        let report = self.apply_changes(changes, Sender::Server, |_, tx, ctx| {
            if let Some(push) = accepted {
                self.record_accepted(tx, push)?;
            }
            record_pulled(tx.conn(), ctx, cursor, tag)?;
            keeps_aside.set(crate::rejected::any_kept_aside(tx.conn())?);
            Ok(())
        })?;
        if report.applied > 0 && (keeps_aside.get() || report.rejected > 0) {
            self.retry_rejected_rows(changes)?;
        }
        Ok(report)
    }

    /// Keeps one page of a server version too large for one page (encoded
    /// as the server sent it) until the version's last page arrives: then
    /// `apply_staged_from_server` merges them and it in one transaction,
    /// reading one page at a time. `first` starts a new version (what an
    /// interrupted pull left is dropped).
    pub(crate) fn stage_page(&self, encoded: &[u8], first: bool) -> Result<()> {
        self.write(|tx| {
            let conn = tx.conn();
            if first {
                conn.prepare_cached("DELETE FROM confluo_inbox")?
                    .execute([])?;
            }
            conn.prepare_cached("INSERT INTO confluo_inbox(page) VALUES (?1)")?
                .execute([encoded])?;
            Ok(())
        })
    }

    /// Merges the staged pages (see `stage_page`), then `last`, the
    /// version's last page, and moves the cursor, as `apply_from_server`
    /// does, in one transaction that also empties the inbox.
    pub(crate) fn apply_staged_from_server(
        &self,
        last: &[Change],
        cursor: u64,
        tag: Option<&str>,
    ) -> Result<ApplyReport> {
        let pages = |conn: &Connection, merge: &mut dyn FnMut(&[Change]) -> Result<()>| {
            let mut stmt = conn.prepare_cached("SELECT page FROM confluo_inbox ORDER BY seq")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let page = ChangeSet::decode(row.get_ref(0)?.as_blob()?)?;
                merge(&page.changes)?;
            }
            merge(last)
        };
        let keeps_aside = Cell::new(false);
        let report = self.apply_chunks(pages, Sender::Server, |_, tx, ctx| {
            tx.conn()
                .prepare_cached("DELETE FROM confluo_inbox")?
                .execute([])?;
            record_pulled(tx.conn(), ctx, cursor, tag)?;
            keeps_aside.set(crate::rejected::any_kept_aside(tx.conn())?);
            Ok(())
        })?;
        if report.applied > 0 && (keeps_aside.get() || report.rejected > 0) {
            // The pages are gone: every change kept aside is tried again
            // (there are few, and most often none).
            self.retry_rejected_where(|_| true)?;
        }
        Ok(report)
    }

    /// Starts over with a server that lost (or dropped) the history our
    /// cursor points into: the next sync pulls everything, and pushes every
    /// local change again (unsent ones included), so what the server lost
    /// of ours comes back. Changes that came from the server stay unsent.
    pub fn reset_server_cursor(&self) -> Result<()> {
        self.write(|tx| {
            set(tx.conn(), "cursor", 0i64)?;
            set(tx.conn(), "pushed", 0i64)?;
            tx.conn().execute(
                "DELETE FROM confluo_sync WHERE key IN ('epoch', 'cursor_tag', 'pushed_at', 'pushed_tag')",
                [],
            )?;
            Ok(())
        })
    }

    /// The epoch of the space's history this database follows (the server
    /// gives each incarnation of a space a new one).
    pub fn server_epoch(&self) -> Result<Option<String>> {
        self.read_snapshot(|conn| {
            Ok(match get(conn, "epoch")? {
                Some(rusqlite::types::Value::Text(e)) => Some(e),
                _ => None,
            })
        })
    }

    pub(crate) fn set_server_epoch(&self, epoch: &str) -> Result<()> {
        if self.server_epoch()?.as_deref() == Some(epoch) {
            return Ok(());
        }
        self.write(|tx| set(tx.conn(), "epoch", epoch))
    }

    /// How many rows have local changes the server has not accepted yet:
    /// the rows the next push would send. A row whose newest change came
    /// from the server may still hold an older unsent local change, so its
    /// cells are looked at one by one.
    pub fn pending_changes(&self) -> Result<u64> {
        self.read_snapshot(|conn| {
            let tables = self.tables_in(conn)?;
            let pushed = get_u64(conn, "pushed")?;
            let from_server = crate::replication::server_versions_after(conn, pushed)?;
            let unsent = |dbv: u64| dbv > pushed && !from_server.contains(&dbv);
            let push = crate::replication::ExportFrom {
                since: pushed,
                exclude: None,
                skip: Some(&from_server),
            };
            let mut total = 0u64;
            for t in &tables {
                let overlay = self.inner.bulk.overlay(conn, t.id)?;
                // Whether the push sends anything of a row: its newest change
                // is unsent (its own, or that of a bulk entry that holds it),
                // or one of its cells is, under a newer change from the server.
                let counts = |r: &rusqlite::Row<'_>| -> Result<bool> {
                    let stored = (r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64);
                    if unsent(stored.1) {
                        return Ok(true);
                    }
                    let (cl, clocks, newest) =
                        overlay.read(r.get(3)?, stored, r.get_ref(2)?.as_blob()?, t.slots.len())?;
                    Ok(unsent(newest) || push.takes_row(t, cl, &clocks))
                };
                let meta = t.meta_table();
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT cl, dbv, clocks, id FROM {meta} WHERE dbv > ?1"
                ))?;
                let mut rows = stmt.query([pushed as i64])?;
                while let Some(r) = rows.next()? {
                    if counts(r)? {
                        total += 1;
                    }
                }
                // Rows whose newest change is a bulk entry's.
                if !overlay.is_empty() {
                    let mut by_id = conn.prepare_cached(&format!(
                        "SELECT cl, dbv, clocks, id FROM {meta} WHERE id = ?1 AND dbv <= ?2"
                    ))?;
                    for id in overlay.ids_after(pushed) {
                        if let Some(r) =
                            by_id.query(rusqlite::params![id, pushed as i64])?.next()?
                        {
                            if counts(r)? {
                                total += 1;
                            }
                        }
                    }
                }
            }
            let mut stmt = conn.prepare_cached("SELECT dbv FROM confluo_pending WHERE dbv > ?1")?;
            let kept = stmt
                .query_map([pushed as i64], |r| r.get::<_, i64>(0))?
                .filter(|r| r.as_ref().is_ok_and(|dbv| unsent(*dbv as u64)))
                .count();
            Ok(total + kept as u64)
        })
    }
}
