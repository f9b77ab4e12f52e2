//! Making tables synced and migrating them: validation, the column
//! registry (see `evolution` for identities), the capture triggers, and the
//! changes that wait for a table or column until it exists here.

use std::sync::Arc;

use rusqlite::{params, Connection};

use crate::capture::{lock, LOCAL_SITE};
use crate::clocks::{encode_uniform, RowClocks};
use crate::db::{load_sites, Database};
use crate::error::{Error, Result};
use crate::evolution;
use crate::schema::{self, quote, TableInfo};

impl Database {
    /// Makes `table` a synced table: validates it (one error listing every
    /// problem), records its columns, installs the capture triggers, turns
    /// the rows already there into changes, and merges any changes for it
    /// that arrived before it was synced. Calling it again on a synced
    /// table refreshes its triggers.
    pub fn enable_sync(&self, table: &str) -> Result<()> {
        self.enable_sync_as(table, None)
    }

    /// Makes `table` synced and brings it to the end of its history:
    /// `create` is the statement that first made it, `migrations` each
    /// later change of it, in order (the same lists on every install, for
    /// the life of the app). Whatever state the table is in (missing, made
    /// by an older version, or made directly in its latest shape by a new
    /// install), it ends with the columns, and the column identities, that
    /// running the whole history gives; so replicas converge even when a
    /// new install never ran the old migrations. Runs only the migrations
    /// the table lacks, so it belongs in every app start.
    pub fn enable_sync_with_history(
        &self,
        table: &str,
        create: &str,
        migrations: &[&str],
    ) -> Result<()> {
        let steps = history(table, create, migrations)?;
        let no_match = || {
            Error::schema(
                table,
                vec!["its columns match no step of the history given".into()],
            )
        };
        // The latest step whose live column names are `names`.
        let by_names = |names: &[String]| steps.iter().rposition(|s| s.names() == names);
        let at = match self.table(table) {
            Some(t) => {
                let (here, recorded, provisional) =
                    self.read_snapshot(|conn| evolution::load_registry(conn, t.id))?;
                if provisional {
                    let at = by_names(&here.names()).ok_or_else(no_match)?;
                    self.adopt_identities(table, &steps[at])?;
                    at
                } else {
                    let same =
                        |s: &evolution::Registry| s.cid == here.cid && s.live() == here.live();
                    match recorded.filter(|&n| steps.get(n).is_some_and(same)) {
                        Some(n) => n,
                        None => steps.iter().rposition(same).ok_or_else(no_match)?,
                    }
                }
            }
            None => match self.read_snapshot(|conn| evolution::column_names(conn, table))? {
                None => {
                    self.execute_batch(create)?;
                    self.enable_sync(table)?;
                    0
                }
                // Made by the app at some step: the latest step whose
                // columns it has gives the identities.
                Some(mut names) => {
                    names.sort();
                    let at = by_names(&names).ok_or_else(no_match)?;
                    self.enable_sync_as(table, Some(&steps[at]))?;
                    at
                }
            },
        };
        for m in &migrations[at..] {
            self.alter_synced_table(table, m)?;
        }
        let t = self
            .table(table)
            .ok_or_else(|| Error::schema(table, vec!["its history drops it".into()]))?;
        self.write(|tx| evolution::set_steps(tx.conn(), t.id, Some(migrations.len())))
    }

    /// Gives a table whose identities are provisional (from metadata of
    /// the first layout) those of `step`, and sends the values of every
    /// column whose identity changed again, under the right one.
    fn adopt_identities(&self, table: &str, step: &evolution::Registry) -> Result<()> {
        let t = self
            .table(table)
            .ok_or_else(|| Error::schema(table, vec!["it is not a synced table".into()]))?;
        let tx = self.transaction()?;
        let conn = tx.conn();
        let changed = evolution::rekey(conn, &t, step)?;
        evolution::set_steps(conn, t.id, None)?;
        let info = Arc::new(
            schema::load_tables(conn)?
                .into_iter()
                .find(|x| x.id == t.id)
                .expect("table just rekeyed"),
        );
        self.restamp(conn, &info, &changed)?;
        tx.commit_then(|conn| self.refresh_caches(conn, Some(info)))
    }

    /// Gives every cell of `slots` this transaction's db_version (keeping
    /// its clock), so the next export sends those values again.
    fn restamp(&self, conn: &Connection, t: &TableInfo, slots: &[usize]) -> Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        self.catch_up_counters(conn)?;
        // Read below without them.
        crate::bulk::fold_all(conn, &self.inner.bulk, t)?;
        let dbv = lock(&self.inner.state).db_version();
        let meta = t.meta_table();
        let rows: Vec<(i64, i64, Vec<u8>)> = conn
            .prepare(&format!(
                "SELECT id, dbv, clocks FROM {meta} WHERE cl % 2 = 1"
            ))?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut write = conn.prepare(&format!(
            "UPDATE {meta} SET dbv = ?2, clocks = ?3 WHERE id = ?1"
        ))?;
        for (id, row_dbv, blob) in rows {
            let mut clocks = RowClocks::decode(&blob, row_dbv as u64)?;
            let mut touched = false;
            for &slot in slots {
                if let Some(Some(stamp)) = clocks.cells.get_mut(slot) {
                    stamp.dbv = dbv;
                    touched = true;
                }
            }
            if touched {
                write.execute(params![id, dbv as i64, clocks.encode(dbv)])?;
            }
        }
        Ok(())
    }

    /// The column registry of a synced table.
    fn registry(&self, table: &str) -> Result<evolution::Registry> {
        let t = self
            .table(table)
            .ok_or_else(|| Error::schema(table, vec!["it is not a synced table".into()]))?;
        self.read_snapshot(|conn| Ok(evolution::load_registry(conn, t.id)?.0))
    }

    /// `enable_sync`, giving a table seen for the first time the column
    /// identities of `preset` (from its history).
    fn enable_sync_as(&self, table: &str, preset: Option<&evolution::Registry>) -> Result<()> {
        let existing = self.table(table);
        let tx = self.transaction()?;
        let conn = tx.conn();
        let (pk, columns) = schema::inspect(conn, table)?;
        if let Some(t) = &existing {
            schema::drop_triggers(conn, t)?;
        }
        let info = Arc::new(match (preset, &existing) {
            (Some(preset), None) => evolution::register_preset(conn, table, &pk, &columns, preset)?,
            _ => evolution::register(conn, table, &pk, &columns, &[])?,
        });
        schema::install(conn, &info)?;
        evolution::forget_dropped_columns(conn, &info)?;
        if existing.is_none() {
            self.record_existing_rows(conn, &info)?;
        }
        self.activate_pending(&tx, &info)?;
        tx.commit_then(|conn| self.refresh_caches(conn, Some(info)))?;
        self.retry_rejected(table)
    }

    /// Runs `alter_sql` (an `ALTER TABLE`, or any migration of `table`) and
    /// re-installs the capture triggers for the table's new shape. Columns
    /// keep their identities through renames (changes made on the old
    /// schema land in the renamed column); a dropped column is gone for
    /// good, and one added later with its name is a new column. Changes for
    /// columns it adds that arrived earlier are merged now. `DROP TABLE`
    /// stops syncing the table, and a table made again with its name (here
    /// or later) is a new table: what was written to the old one stays with
    /// it. All or nothing: on any error the table and its triggers stay as
    /// they were.
    pub fn alter_synced_table(&self, table: &str, alter_sql: &str) -> Result<()> {
        let existing = self.table(table).ok_or_else(|| {
            Error::schema(
                table,
                vec!["it is not a synced table (call enable_sync first)".into()],
            )
        })?;
        let tx = self.transaction()?;
        let conn = tx.conn();
        schema::drop_triggers(conn, &existing)?;
        // What each statement did to the columns, so that a rename is told
        // from a drop and an add.
        let mut ops = Vec::new();
        // Whether the table was gone at some point: made again, it is a new
        // table (its rows did not survive: no data is written here).
        let mut remade = false;
        {
            use fallible_iterator::FallibleIterator;
            let mut last = evolution::column_names(conn, table)?;
            let mut rebuilt = false;
            let mut batch = rusqlite::Batch::new(conn, alter_sql);
            while let Some(mut stmt) = batch.next()? {
                let sql = stmt.expanded_sql().unwrap_or_default();
                let word = sql
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_ascii_uppercase();
                // Writes made here would not be tracked (the triggers are
                // off), so only schema statements are allowed; data
                // migrations go in a transaction of their own afterwards.
                if !matches!(word.as_str(), "ALTER" | "CREATE" | "DROP") {
                    return Err(Error::invalid(format!(
                        "alter_synced_table runs schema statements only (ALTER, CREATE, DROP), not {word}; \
                         write data in a transaction of its own"
                    )));
                }
                if evolution::renames_table(&sql, table) {
                    return Err(Error::schema(
                        table,
                        vec![
                            "a synced table cannot be renamed (its name is its identity); \
                              make a new table, copy the rows, and drop this one"
                                .into(),
                        ],
                    ));
                }
                stmt.raw_execute()?;
                match evolution::column_names(conn, table)? {
                    Some(now) => {
                        if let Some(before) = &last {
                            evolution::diff(before, &now, !rebuilt, &mut ops);
                        }
                        last = Some(now);
                        rebuilt = false;
                    }
                    // Dropped, or in the middle of a rebuild.
                    None => {
                        rebuilt = true;
                        remade = true;
                    }
                }
            }
        }
        if evolution::column_names(conn, table)?.is_none() {
            evolution::retire(conn, &existing)?;
            return tx.commit_then(|conn| {
                self.inner
                    .tables
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(table);
                self.refresh_caches(conn, None)
            });
        }
        let (pk, columns) = schema::inspect(conn, table)?;
        if remade {
            evolution::retire(conn, &existing)?;
            ops.clear();
        }
        let info = Arc::new(evolution::register(conn, table, &pk, &columns, &ops)?);
        // How many steps of a history the table has run is unknown now,
        // until `enable_sync_with_history` says it again.
        conn.execute(
            "UPDATE confluo_tables SET steps = NULL WHERE id = ?1",
            [info.id],
        )?;
        schema::install(conn, &info)?;
        evolution::forget_dropped_columns(conn, &info)?;
        if remade {
            self.record_existing_rows(conn, &info)?;
        }
        self.activate_pending(&tx, &info)?;
        tx.commit_then(|conn| self.refresh_caches(conn, Some(info)))?;
        self.retry_rejected(table)
    }

    /// After a commit, with the writer lock still held: the site list (new
    /// sites may have been recorded), the dropped tables, and the synced
    /// table just changed.
    pub(crate) fn refresh_caches(
        &self,
        conn: &Connection,
        table: Option<Arc<TableInfo>>,
    ) -> Result<()> {
        *self.inner.sites.write().unwrap_or_else(|e| e.into_inner()) = load_sites(conn)?;
        *self
            .inner
            .dropped_tables
            .write()
            .unwrap_or_else(|e| e.into_inner()) = schema::load_dropped_tables(conn)?;
        if let Some(info) = table {
            self.cache_table(info);
        }
        // Nobody else could write since this transaction began: the cache is
        // the file's schema as of now.
        self.note_schema_cookie(conn)
    }

    /// Rows already in a table when it becomes synced are changes too: one
    /// local write, at this transaction's clock.
    fn record_existing_rows(&self, conn: &Connection, t: &TableInfo) -> Result<()> {
        let table = quote(&t.name);
        let any: bool =
            conn.query_row(&format!("SELECT EXISTS (SELECT 1 FROM {table})"), [], |r| {
                r.get(0)
            })?;
        if !any {
            return Ok(());
        }
        // Values sync could not carry are refused now, as a write of them
        // would be (`confluo_fits` raises the error).
        let values: Vec<String> =
            t.pk.iter()
                .map(|c| &**c)
                .chain(t.live_slots().map(|(_, c)| &**c))
                .map(quote)
                .collect();
        conn.query_row(
            &format!(
                "SELECT count(*) FROM {table} WHERE NOT confluo_fits({})",
                values.join(", ")
            ),
            [],
            |_| Ok(()),
        )?;
        self.catch_up_counters(conn)?;
        let (dbv, hlc) = {
            let mut st = lock(&self.inner.state);
            st.mark_changed(&t.name);
            (st.db_version(), st.tx_hlc())
        };
        // Rows that have metadata already (the table was synced before) keep it.
        crate::row_ids::fill(
            conn,
            &self.inner.row_ids,
            t,
            &format!(
                "SELECT {} AS k, 1 AS cl, ?1 AS dbv, ?2 AS clocks FROM {table} AS t",
                t.key_expr("t")
            ),
            params![dbv as i64, encode_uniform(hlc, LOCAL_SITE, t.slots.len())],
        )
    }

    fn cache_table(&self, info: Arc<TableInfo>) {
        self.inner
            .tables
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(info.name.to_string(), info);
    }
}

/// The identities `table` has after each step of its history (`create`,
/// then each migration), from a scratch database that runs it.
fn history(table: &str, create: &str, migrations: &[&str]) -> Result<Vec<evolution::Registry>> {
    let scratch = Database::open_in_memory()?;
    scratch.execute_batch(create)?;
    scratch.enable_sync(table)?;
    let mut steps = vec![scratch.registry(table)?];
    for m in migrations {
        scratch.alter_synced_table(table, m)?;
        steps.push(scratch.registry(table)?);
    }
    Ok(steps)
}
