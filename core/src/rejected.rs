//! Changes kept aside: changes from the server that this database cannot
//! apply (its schema or a trigger refuses them) wait here with the reason,
//! so they never block the others, and are tried again after a migration.

use rusqlite::{params, Connection};

use crate::changeset::Change;
use crate::codec::pack_values;
use crate::db::Database;
use crate::error::Result;
use crate::replication::{kept_change, Sender};

/// A change kept aside because this database could not apply it.
#[derive(Clone, Debug, PartialEq)]
pub struct RejectedChange {
    /// The change as it travels (table and column by identity).
    pub change: Change,
    /// The table's and the column's names here, where they are known.
    pub table: String,
    pub column: Option<String>,
    pub reason: String,
}

/// Whether any change is kept aside, in the caller's transaction.
pub(crate) fn any_kept_aside(conn: &Connection) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT EXISTS(SELECT 1 FROM confluo_rejected)")?
        .query_row([], |r| r.get(0))?)
}

impl Database {
    /// The changes kept aside because this database could not apply them,
    /// with the reasons.
    pub fn rejected_changes(&self) -> Result<Vec<RejectedChange>> {
        self.read_snapshot(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT tbl, pk, col, cl, value, hlc, site, reason FROM confluo_rejected ORDER BY tbl, pk, col",
            )?;
            let mut rows = stmt.query([])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                let change = kept_change(r)?;
                let here = self.table_by_cid(&change.table);
                let column = change.column.as_deref().map(|cid| {
                    here.as_ref()
                        .and_then(|t| t.slot_of_cid(cid).and_then(|s| t.slots[s].clone()))
                        .map_or_else(|| cid.to_owned(), |n| n.to_string())
                });
                out.push(RejectedChange {
                    table: here.map_or_else(|| change.table.to_string(), |t| t.name.to_string()),
                    column,
                    change,
                    reason: r.get(7)?,
                });
            }
            Ok(out)
        })
    }

    /// How many changes are kept aside (see `rejected_changes`).
    pub fn rejected_count(&self) -> Result<u64> {
        self.read_snapshot(|conn| {
            Ok(conn
                .prepare_cached("SELECT count(*) FROM confluo_rejected")?
                .query_row([], |r| r.get::<_, i64>(0))? as u64)
        })
    }

    /// Tries the changes kept aside for `table` again (after a migration
    /// that may let them fit); those that still do not fit stay aside.
    pub(crate) fn retry_rejected(&self, table: &str) -> Result<()> {
        let Some(cid) = self.table(table).map(|t| t.cid.clone()) else {
            return Ok(());
        };
        self.retry_rejected_where(|c| c.table == cid)
    }

    /// Tries again the changes kept aside for rows that `applied` just
    /// changed: a row refused whole may have come in through a later change
    /// of one of its cells, and its other cells must follow. The caller
    /// knows changes are kept aside (see `Database::apply_pulled`).
    pub(crate) fn retry_rejected_rows(&self, applied: &[Change]) -> Result<()> {
        let rows: std::collections::HashSet<(&str, &[crate::value::Value])> =
            applied.iter().map(|c| (&*c.table, &*c.pk)).collect();
        self.retry_rejected_where(|c| rows.contains(&(&*c.table, &*c.pk)))
    }

    pub(crate) fn retry_rejected_where(&self, wanted: impl Fn(&Change) -> bool) -> Result<()> {
        let kept: Vec<Change> = self
            .rejected_changes()?
            .into_iter()
            .map(|r| r.change)
            .filter(|c| wanted(c))
            .collect();
        if kept.is_empty() {
            return Ok(());
        }
        self.apply_changes(&kept, Sender::Server, |_, tx, ctx| {
            for c in &kept {
                tx.conn()
                    .prepare_cached(
                        "DELETE FROM confluo_rejected WHERE tbl = ?1 AND pk = ?2 AND col = ?3 \
                         AND hlc = ?4 AND site = ?5",
                    )?
                    .execute(params![
                        &*c.table,
                        pack_values(&c.pk),
                        c.column.as_deref().unwrap_or(""),
                        c.hlc.0 as i64,
                        &c.site.as_bytes()[..]
                    ])?;
            }
            // They came from the server: never pushed back to it.
            if let Some(dbv) = ctx.report.db_version {
                crate::server_state::record_server_version(tx.conn(), dbv)?;
            }
            Ok(())
        })?;
        Ok(())
    }
}

/// Keeps aside the changes marked `refused`, each with its reason, merged
/// with what was kept before for the same cell. Returns how many.
pub(crate) fn keep_aside(
    conn: &Connection,
    changes: &[Change],
    refused: &[Option<String>],
) -> Result<usize> {
    let mut kept = 0;
    for (c, reason) in changes.iter().zip(refused) {
        let Some(reason) = reason else { continue };
        conn.prepare_cached(
            "INSERT INTO confluo_rejected(tbl, pk, col, cl, value, hlc, site, reason) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
             ON CONFLICT(tbl, pk, col) DO UPDATE SET cl = excluded.cl, value = excluded.value, \
             hlc = excluded.hlc, site = excluded.site, reason = excluded.reason \
             WHERE (excluded.cl, excluded.hlc, excluded.site) >= (cl, hlc, site)",
        )?
        .execute(params![
            &*c.table,
            pack_values(&c.pk),
            c.column.as_deref().unwrap_or(""),
            c.cl as i64,
            &c.value,
            c.hlc.0 as i64,
            &c.site.as_bytes()[..],
            reason,
        ])?;
        kept += 1;
    }
    Ok(kept)
}
