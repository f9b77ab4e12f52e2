//! Making tables synced and migrating them: validation, the column
//! registry (see `evolution` for identities), the capture triggers, and the
//! changes that wait for a table or column until it exists here.

use std::sync::Arc;

use rusqlite::{params, Connection};

use crate::capture::{lock, LOCAL_SITE};
use crate::clocks::encode_uniform;
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
        // The identities the history gives, step by step, from a scratch
        // database that runs it.
        let scratch = Database::open_in_memory()?;
        scratch.execute_batch(create)?;
        scratch.enable_sync(table)?;
        let mut steps = vec![scratch.registry(table)?];
        for m in migrations {
            scratch.alter_synced_table(table, m)?;
            steps.push(scratch.registry(table)?);
        }
        let live = |cols: &[evolution::Column]| -> Vec<(String, String)> {
            let mut v: Vec<(String, String)> = cols
                .iter()
                .filter(|c| c.live)
                .map(|c| (c.name.clone(), c.cid.clone()))
                .collect();
            v.sort();
            v
        };
        let at = match self.table(table) {
            Some(_) => {
                let here = live(&self.registry(table)?);
                steps.iter().rposition(|s| live(s) == here).ok_or_else(|| {
                    Error::schema(
                        table,
                        vec!["its columns match no step of the history given".into()],
                    )
                })?
            }
            None => match self.read_snapshot(|conn| evolution::column_names(conn, table))? {
                None => {
                    self.execute_batch(create)?;
                    self.enable_sync(table)?;
                    0
                }
                Some(mut names) => {
                    // Made by the app at some step: the latest step whose
                    // columns it has gives the identities.
                    names.sort();
                    let at = steps
                        .iter()
                        .rposition(|s| {
                            let mut n: Vec<String> =
                                live(s).into_iter().map(|(name, _)| name).collect();
                            n.sort();
                            n == names
                        })
                        .ok_or_else(|| {
                            Error::schema(
                                table,
                                vec!["its columns match no step of the history given".into()],
                            )
                        })?;
                    self.enable_sync_as(table, Some(&steps[at]))?;
                    at
                }
            },
        };
        for m in &migrations[at..] {
            self.alter_synced_table(table, m)?;
        }
        Ok(())
    }

    /// The column registry of a synced table.
    fn registry(&self, table: &str) -> Result<Vec<evolution::Column>> {
        let t = self
            .table(table)
            .ok_or_else(|| Error::schema(table, vec!["it is not a synced table".into()]))?;
        self.read_snapshot(|conn| evolution::load_columns(conn, t.id))
    }

    /// `enable_sync`, giving a table seen for the first time the column
    /// identities of `preset` (from its history).
    fn enable_sync_as(&self, table: &str, preset: Option<&[evolution::Column]>) -> Result<()> {
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
    /// stops syncing the table (a table made later with its name is a new
    /// one). All or nothing: on any error the table and its triggers stay
    /// as they were.
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
                    None => rebuilt = true,
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
        let info = Arc::new(evolution::register(conn, table, &pk, &columns, &ops)?);
        schema::install(conn, &info)?;
        evolution::forget_dropped_columns(conn, &info)?;
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
        Ok(())
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
        conn.execute(
            &format!(
                "INSERT INTO {meta}(pk, cl, dbv, clocks) SELECT {key}, 1, ?1, ?2 FROM {table} AS t WHERE true \
                 ON CONFLICT(pk) DO NOTHING",
                meta = t.meta_table(),
                key = t.key_expr("t"),
            ),
            params![dbv as i64, encode_uniform(hlc, LOCAL_SITE, t.slots.len())],
        )?;
        Ok(())
    }

    fn cache_table(&self, info: Arc<TableInfo>) {
        self.inner
            .tables
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(info.name.to_string(), info);
    }
}
