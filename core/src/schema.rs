//! Synced-table schema: introspection and validation of app tables, the
//! stored column slots, and the capture triggers.

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension};

use crate::error::{Error, Result};

/// Quotes an SQL identifier, so any name (quotes included) is safe in SQL.
pub(crate) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Names the engine accepts for tables and columns it does not know yet
/// (changes from a peer on a newer app version). Anything else is hostile.
pub(crate) fn plausible_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !reserved(name)
        && name
            .chars()
            .all(|c| c == '_' || c == '$' || c == '-' || c == ' ' || c.is_alphanumeric())
}

fn reserved(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("confluo_") || lower.starts_with("sqlite_")
}

/// A synced table as the engine sees it.
///
/// Tables and columns have identities (`cid`s) besides their SQL names:
/// changes name the identity, so a renamed column is the same column to
/// every replica, and a column (or table) made again with the name of a
/// dropped one is a new one. An identity is the name the column had when
/// it was made, with `#k` appended for the k-th remake of that name (see
/// `evolution`); for a column never renamed nor remade it is its name.
#[derive(Debug)]
pub(crate) struct TableInfo {
    /// Stable id, used by the triggers to report which table changed.
    pub id: i64,
    /// The table's SQL name.
    pub name: Arc<str>,
    /// The table's identity: the name changes carry.
    pub cid: Arc<str>,
    pub pk: Vec<Arc<str>>,
    /// Live columns' SQL names by slot; `None` for slots of dropped columns.
    pub slots: Vec<Option<Arc<str>>>,
    /// The identity of each slot's column, dropped ones included.
    pub cids: Vec<Arc<str>>,
}

impl TableInfo {
    /// The metadata table's name, quoted (see `row_ids` for its layout).
    pub fn meta_table(&self) -> String {
        quote(&format!("confluo_meta_{}", self.name))
    }

    /// The slot of the live column with identity `cid`.
    pub fn slot_of_cid(&self, cid: &str) -> Option<usize> {
        self.cids
            .iter()
            .position(|c| &**c == cid)
            .filter(|&s| self.slots.get(s).is_some_and(Option::is_some))
    }

    /// Whether `cid` names a column of this table that was dropped.
    pub fn dropped(&self, cid: &str) -> bool {
        self.cids
            .iter()
            .position(|c| &**c == cid)
            .is_some_and(|s| self.slots.get(s).is_none_or(Option::is_none))
    }

    pub fn live_slots(&self) -> impl Iterator<Item = (usize, &Arc<str>)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
    }

    /// SQL for the metadata key of a row, from a row alias (`NEW`, `t`).
    /// One-column keys are stored as the value; composite keys are packed.
    pub fn key_expr(&self, alias: &str) -> String {
        let cols: Vec<String> = self
            .pk
            .iter()
            .map(|c| format!("{alias}.{}", quote(c)))
            .collect();
        if cols.len() == 1 {
            cols[0].clone()
        } else {
            format!("confluo_pack({})", cols.join(", "))
        }
    }

    /// `a = ?1 AND b = ?2` over the key columns, parameters from `first`.
    /// Compared byte for byte, as the key's index (BINARY, see `inspect`)
    /// does, whatever the column's own collation: `'a'` is not `'A'`.
    pub fn key_where(&self, first: usize) -> String {
        self.pk
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{} = ?{} COLLATE BINARY", quote(c), first + i))
            .collect::<Vec<_>>()
            .join(" AND ")
    }
}

/// What SQLite says of an app table's columns.
struct ColumnFacts {
    name: String,
    declared_type: String,
    not_null: bool,
    has_default: bool,
    pk_pos: i64,
    generated: bool,
}

/// The synced columns of a table as it is now: key columns in key order,
/// then the other columns in table order. Validates against the rules
/// every synced table must meet and reports every problem at once.
pub(crate) fn inspect(conn: &Connection, table: &str) -> Result<(Vec<String>, Vec<String>)> {
    let kind: Option<(String, i64)> = conn
        .query_row(
            "SELECT type, wr FROM pragma_table_list WHERE schema = 'main' AND name = ?1",
            [table],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((kind, without_rowid)) = kind else {
        return Err(Error::schema(table, vec!["no such table".into()]));
    };
    let mut problems = Vec::new();
    if kind != "table" {
        problems.push(format!("it is a {kind}, not an ordinary table"));
    }
    if reserved(table) {
        problems.push("names starting with confluo_ or sqlite_ are reserved".into());
    } else if !plausible_name(table) {
        problems.push(format!(
            "the name {table:?} is not one a sync server accepts (letters, digits, _ $ - and spaces, up to 128 bytes)"
        ));
    }
    let mut stmt = conn.prepare(
        "SELECT name, type, \"notnull\", dflt_value IS NOT NULL, pk, hidden \
         FROM pragma_table_xinfo(?1) ORDER BY cid",
    )?;
    let columns = stmt
        .query_map([table], |r| {
            Ok(ColumnFacts {
                name: r.get(0)?,
                declared_type: r.get(1)?,
                not_null: r.get(2)?,
                has_default: r.get(3)?,
                pk_pos: r.get(4)?,
                generated: r.get::<_, i64>(5)? >= 2,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;

    let mut pk: Vec<&ColumnFacts> = columns.iter().filter(|c| c.pk_pos > 0).collect();
    pk.sort_by_key(|c| c.pk_pos);
    if pk.is_empty() {
        problems.push("it has no explicit PRIMARY KEY".into());
    }
    // `INTEGER PRIMARY KEY DESC` is no alias of the rowid (it has an index
    // of its own) and takes NULL like any other key column.
    let key_index: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_index_list(?1) WHERE origin = 'pk')",
        [table],
        |r| r.get(0),
    )?;
    let rowid_alias = without_rowid == 0
        && pk.len() == 1
        && pk[0].declared_type.eq_ignore_ascii_case("INTEGER")
        && !key_index;
    for c in &pk {
        if !c.not_null && !rowid_alias && without_rowid == 0 {
            problems.push(format!(
                "primary key column {:?} allows NULL (declare it NOT NULL)",
                c.name
            ));
        }
    }
    for c in columns.iter().filter(|c| !c.generated) {
        if !plausible_name(&c.name) {
            problems.push(format!(
                "column name {:?} is not one a sync server accepts (letters, digits, _ $ - and spaces, up to 128 bytes)",
                c.name
            ));
        }
    }
    for c in columns.iter().filter(|c| c.pk_pos == 0 && !c.generated) {
        if c.not_null && !c.has_default {
            problems.push(format!("column {:?} is NOT NULL without a DEFAULT", c.name));
        }
    }

    let mut idx = conn.prepare("SELECT name, \"unique\", origin FROM pragma_index_list(?1)")?;
    let indexes = idx
        .query_map([table], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, bool>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    for (name, unique, origin) in &indexes {
        if *unique && origin != "pk" {
            problems.push(format!("unique index {name:?} besides the primary key"));
        }
        if origin == "pk" {
            let mut coll =
                conn.prepare("SELECT name, coll FROM pragma_index_xinfo(?1) WHERE key = 1")?;
            let colls = coll
                .query_map([name], |r| {
                    Ok((r.get::<_, Option<String>>(0)?, r.get::<_, String>(1)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            for (col, coll) in colls {
                if !coll.eq_ignore_ascii_case("BINARY") {
                    problems.push(format!(
                        "primary key column {:?} uses collation {coll} (only BINARY keys merge exactly)",
                        col.unwrap_or_default()
                    ));
                }
            }
        }
    }

    let fk_enforced: bool = conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0))?;
    if fk_enforced {
        let mut fk = conn.prepare("SELECT DISTINCT \"table\" FROM pragma_foreign_key_list(?1)")?;
        for parent in fk.query_map([table], |r| r.get::<_, String>(0))? {
            problems.push(format!("enforced foreign key to {:?}", parent?));
        }
    }

    if !problems.is_empty() {
        return Err(Error::schema(table, problems));
    }
    let pk_names = pk.iter().map(|c| c.name.clone()).collect();
    let others = columns
        .iter()
        .filter(|c| c.pk_pos == 0 && !c.generated)
        .map(|c| c.name.clone())
        .collect();
    Ok((pk_names, others))
}

/// The live synced tables.
pub(crate) fn load_tables(conn: &Connection) -> Result<Vec<TableInfo>> {
    let mut tables = Vec::new();
    let mut stmt =
        conn.prepare("SELECT id, name, cid FROM confluo_tables WHERE live = 1 ORDER BY id")?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut cols = conn.prepare(
        "SELECT cid, name, pk_pos, slot, live FROM confluo_columns WHERE tbl = ?1 ORDER BY pk_pos, slot",
    )?;
    for (id, name, cid) in rows {
        let mut pk = Vec::new();
        let mut slots: Vec<Option<Arc<str>>> = Vec::new();
        let mut cids: Vec<Arc<str>> = Vec::new();
        let entries = cols
            .query_map([id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, bool>(4)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for (col_cid, col, pk_pos, slot, live) in entries {
            match (pk_pos, slot) {
                (Some(_), _) => pk.push(Arc::from(col)),
                (None, Some(slot)) => {
                    let slot = slot as usize;
                    if slots.len() <= slot {
                        slots.resize(slot + 1, None);
                        cids.resize(slot + 1, Arc::from(""));
                    }
                    slots[slot] = live.then(|| Arc::from(col));
                    cids[slot] = Arc::from(col_cid);
                }
                (None, None) => {}
            }
        }
        tables.push(TableInfo {
            id,
            name: Arc::from(name),
            cid: Arc::from(cid),
            pk,
            slots,
            cids,
        });
    }
    Ok(tables)
}

/// The identities of synced tables that were dropped: changes for them
/// are stale.
pub(crate) fn load_dropped_tables(conn: &Connection) -> Result<Vec<Arc<str>>> {
    let mut stmt = conn.prepare("SELECT cid FROM confluo_tables WHERE live = 0")?;
    let rows = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .map(|r| r.map(Arc::from))
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

fn trigger_names(t: &TableInfo) -> [String; 4] {
    ["ai", "au", "aupk", "ad"].map(|k| quote(&format!("confluo_{k}_{}", t.name)))
}

pub(crate) fn drop_triggers(conn: &Connection, t: &TableInfo) -> Result<()> {
    for name in trigger_names(t) {
        conn.execute_batch(&format!("DROP TRIGGER IF EXISTS {name};"))?;
    }
    Ok(())
}

/// The shape of the capture triggers `install` writes; databases with
/// triggers of an older shape get them installed again when opened.
/// 1: guarded by `confluo_tracking()` (silent while remote changes are
/// applied); 2: guarded by `confluo_capturing()` (always reporting);
/// 3: values checked against the size sync carries (`confluo_fits`);
/// 4: one trigger per kind of write, one call into Rust per row, which
/// compares the old and new values itself (`capture`).
pub(crate) const TRIGGERS_VERSION: i64 = 4;

/// SQLite's limit on a function's arguments (`SQLITE_MAX_FUNCTION_ARG` of
/// the bundled build).
const MAX_FUNCTION_ARGS: usize = 1000;

/// Creates the metadata table and the capture triggers. The triggers only
/// report the write (see `capture`); they report writes made while remote
/// changes are applied too, so that a write by an app trigger then is
/// caught (see `Database::apply`). They call functions that only Confluo's
/// writer defines: a write from any other connection fails instead of
/// going untracked.
pub(crate) fn install(conn: &Connection, t: &TableInfo) -> Result<()> {
    create_meta_table(conn, t)?;
    let live = t.live_slots().count();
    // The row functions take every value of the row, old and new.
    let triggers = if 3 + 2 * (t.pk.len() + live) <= MAX_FUNCTION_ARGS {
        row_triggers(t)
    } else {
        compared_in_sql_triggers(t)
    };
    conn.execute_batch(&triggers)?;
    Ok(())
}

/// The metadata table of `t` (keyed by id, see `row_ids`) and its index of
/// rows by db_version, unless they exist.
pub(crate) fn create_meta_table(conn: &Connection, t: &TableInfo) -> Result<()> {
    let meta = t.meta_table();
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {meta}(id INTEGER PRIMARY KEY, pk NOT NULL, cl INTEGER NOT NULL, dbv INTEGER NOT NULL, clocks BLOB NOT NULL);
         CREATE INDEX IF NOT EXISTS {dbv_index} ON {meta}(dbv);",
        dbv_index = dbv_index(t)
    ))?;
    Ok(())
}

/// Its own prefix: `confluo_meta_<table>_dbv` could be the metadata table
/// of a table named `<table>_dbv`.
fn dbv_index(t: &TableInfo) -> String {
    quote(&format!("confluo_dbv_{}", t.name))
}

/// The triggers of tables of any width but the widest: each passes the
/// row's values to one function (`capture`), which compares old and new
/// values in Rust. Each comparison written in SQL costs a function call of
/// its own (`typeof`), and a trigger's `WHEN` costs a call too.
fn row_triggers(t: &TableInfo) -> String {
    let table = quote(&t.name);
    let id = t.id;
    let npk = t.pk.len();
    let [ai, au, _, ad] = trigger_names(t);
    let cols = |alias: &str, names: &mut dyn Iterator<Item = &Arc<str>>| {
        names
            .map(|c| format!("{alias}.{}", quote(c)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let new_key = cols("NEW", &mut t.pk.iter());
    let old_key = cols("OLD", &mut t.pk.iter());
    let new_values = cols("NEW", &mut t.live_slots().map(|(_, c)| c));
    let values = if new_values.is_empty() {
        String::new()
    } else {
        format!(", {new_values}")
    };
    // The slot of each column passed, two bytes each (little-endian).
    let slots: String = t
        .live_slots()
        .map(|(s, _)| format!("{:02x}{:02x}", s & 0xff, s >> 8))
        .collect();
    let pairs: String = t
        .live_slots()
        .map(|(_, c)| {
            let c = quote(c);
            format!(", NEW.{c}, OLD.{c}")
        })
        .collect();
    format!(
        "CREATE TRIGGER {ai} AFTER INSERT ON {table} BEGIN
           SELECT confluo_insert_row({id}, {npk}, {new_key}{values});
         END;
         CREATE TRIGGER {au} AFTER UPDATE ON {table} BEGIN
           SELECT confluo_update_row({id}, {npk}, X'{slots}', {new_key}, {old_key}{pairs});
         END;
         CREATE TRIGGER {ad} AFTER DELETE ON {table} BEGIN
           SELECT confluo_delete_row({id}, {npk}, {old_key});
         END;"
    )
}

/// The triggers of tables too wide for `row_triggers` (a function takes at
/// most `MAX_FUNCTION_ARGS` arguments): the changed columns are found in
/// SQL, and each trigger is guarded by `confluo_capturing()`.
fn compared_in_sql_triggers(t: &TableInfo) -> String {
    let table = quote(&t.name);
    let id = t.id;
    let slots = t.slots.len();
    let [ai, au, aupk, ad] = trigger_names(t);
    let new_key = t.key_expr("NEW");
    let old_key = t.key_expr("OLD");
    let same_key =
        t.pk.iter()
            .map(|c| format!("NEW.{0} IS OLD.{0}", quote(c)))
            .collect::<Vec<_>>()
            .join(" AND ");
    // A column counts as changed when its value differs byte for byte,
    // whatever the column's collation says.
    // (`IS NOT` alone calls 1 and 1.0 equal; the stored types differ.)
    let differs = |c: &str| {
        let c = quote(c);
        format!("(NEW.{c} IS NOT OLD.{c} COLLATE BINARY OR typeof(NEW.{c}) IS NOT typeof(OLD.{c}))")
    };
    let changed: Vec<String> = t.live_slots().map(|(_, c)| differs(c)).collect();
    let any_changed = if changed.is_empty() {
        "0".to_owned()
    } else {
        changed.join(" OR ")
    };
    // The changed-column bitmask, 62 slots per integer argument.
    let mut masks = Vec::new();
    for chunk_start in (0..slots).step_by(62) {
        let terms: Vec<String> = t
            .live_slots()
            .filter(|(s, _)| (chunk_start..chunk_start + 62).contains(s))
            .map(|(s, c)| format!("({} << {})", differs(c), s - chunk_start))
            .collect();
        masks.push(if terms.is_empty() {
            "0".to_owned()
        } else {
            terms.join(" | ")
        });
    }
    let masks = if masks.is_empty() {
        "0".to_owned()
    } else {
        masks.join(", ")
    };
    // Every value written must be one that sync can carry: checked as it
    // is written, so a too-large value is refused then and there instead of
    // being refused by the server at every push for ever.
    let fits = {
        let values: Vec<String> =
            t.pk.iter()
                .map(|c| &**c)
                .chain(t.live_slots().map(|(_, c)| &**c))
                .map(|c| format!("NEW.{}", quote(c)))
                .collect();
        format!("confluo_fits({})", values.join(", "))
    };
    format!(
        "CREATE TRIGGER {ai} AFTER INSERT ON {table} WHEN confluo_capturing() BEGIN
           SELECT confluo_inserted({id}, {new_key}), {fits};
         END;
         CREATE TRIGGER {au} AFTER UPDATE ON {table} WHEN confluo_capturing() AND {same_key} AND ({any_changed}) BEGIN
           SELECT confluo_updated({id}, {new_key}, {masks}), {fits};
         END;
         CREATE TRIGGER {aupk} AFTER UPDATE ON {table} WHEN confluo_capturing() AND NOT ({same_key}) BEGIN
           SELECT confluo_deleted({id}, {old_key}), confluo_inserted({id}, {new_key}), {fits};
         END;
         CREATE TRIGGER {ad} AFTER DELETE ON {table} WHEN confluo_capturing() BEGIN
           SELECT confluo_deleted({id}, {old_key});
         END;"
    )
}
