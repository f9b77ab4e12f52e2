//! Schema evolution: the identities of synced tables and columns, and how
//! migrations move them.
//!
//! A column's identity (`cid`) is the name it had when it was made; a
//! rename keeps it (the new name is an alias), a drop retires it for good,
//! and a column made later with a name that was used before gets a new
//! identity, `name#k` for the k-th such remake. Every replica that runs the
//! same migrations in the same order therefore gives every column the same
//! identity, whatever it is called locally, and changes travel under
//! identities: an edit made on the old schema lands in the renamed column,
//! and the values of a dropped column never reach the one that replaced it.
//! Tables work the same way.

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{Error, Result};
use crate::schema::{load_tables, TableInfo};

/// What one migration statement did to a table's columns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ColumnOp {
    Rename { from: String, to: String },
    Drop(String),
    Add(String),
}

/// The columns of `table` (key columns included, generated ones not), in
/// table order; `None` when there is no such table.
pub(crate) fn column_names(conn: &Connection, table: &str) -> Result<Option<Vec<String>>> {
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_list WHERE schema = 'main' AND name = ?1)",
        [table],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(None);
    }
    let mut stmt =
        conn.prepare("SELECT name FROM pragma_table_xinfo(?1) WHERE hidden < 2 ORDER BY cid")?;
    let names = stmt
        .query_map([table], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Some(names))
}

/// What changed between two states of a table's columns. SQLite renames a
/// column in place, so one name changed at one position (and nothing else)
/// is a rename; `renames` is false when the table was rebuilt in between
/// and positions mean nothing.
pub(crate) fn diff(before: &[String], after: &[String], renames: bool, ops: &mut Vec<ColumnOp>) {
    if renames && before.len() == after.len() {
        let changed: Vec<usize> = (0..before.len())
            .filter(|&i| before[i] != after[i])
            .collect();
        if let [i] = changed[..] {
            if !before.contains(&after[i]) {
                ops.push(ColumnOp::Rename {
                    from: before[i].clone(),
                    to: after[i].clone(),
                });
                return;
            }
        }
    }
    for name in before.iter().filter(|n| !after.contains(n)) {
        ops.push(ColumnOp::Drop(name.clone()));
    }
    for name in after.iter().filter(|n| !before.contains(n)) {
        ops.push(ColumnOp::Add(name.clone()));
    }
}

/// The identity a thing named `name` gets when made, given the identities
/// its kind already used (live or retired): `name`, or `name#k` when `k`
/// identities were made with that name before.
pub(crate) fn new_identity<'a>(name: &str, used: impl Iterator<Item = &'a str>) -> String {
    let k = used.filter(|cid| base(cid) == name).count();
    if k == 0 {
        name.to_owned()
    } else {
        format!("{name}#{k}")
    }
}

/// The name an identity was made with.
fn base(cid: &str) -> &str {
    match cid.rsplit_once('#') {
        Some((b, k)) if !k.is_empty() && k.bytes().all(|c| c.is_ascii_digit()) => b,
        _ => cid,
    }
}

/// Whether `s` is an identity made from a plausible name: `name`, or
/// `name#k` with at most ten digits.
pub(crate) fn plausible_identity(s: &str, plausible_name: impl Fn(&str) -> bool) -> bool {
    let b = base(s);
    plausible_name(b) && s.len() - b.len() <= 11
}

/// One column as the registry keeps it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Column {
    pub cid: String,
    pub name: String,
    pub pk_pos: Option<i64>,
    pub slot: Option<i64>,
    pub live: bool,
}

/// Loads the columns of table `id`.
pub(crate) fn load_columns(conn: &Connection, id: i64) -> Result<Vec<Column>> {
    let mut stmt =
        conn.prepare("SELECT cid, name, pk_pos, slot, live FROM confluo_columns WHERE tbl = ?1")?;
    let cols = stmt
        .query_map([id], |r| {
            Ok(Column {
                cid: r.get(0)?,
                name: r.get(1)?,
                pk_pos: r.get(2)?,
                slot: r.get(3)?,
                live: r.get(4)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(cols)
}

fn save_columns(conn: &Connection, id: i64, cols: &[Column]) -> Result<()> {
    conn.execute("DELETE FROM confluo_columns WHERE tbl = ?1", [id])?;
    let mut insert = conn.prepare(
        "INSERT INTO confluo_columns(tbl, cid, name, pk_pos, slot, live) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for c in cols {
        insert.execute(params![id, c.cid, c.name, c.pk_pos, c.slot, c.live])?;
    }
    Ok(())
}

fn add_column(cols: &mut Vec<Column>, name: &str) {
    let cid = new_identity(name, cols.iter().map(|c| c.cid.as_str()));
    let slot = cols
        .iter()
        .filter_map(|c| c.slot)
        .max()
        .map_or(0, |s| s + 1);
    cols.push(Column {
        cid,
        name: name.to_owned(),
        pk_pos: None,
        slot: Some(slot),
        live: true,
    });
}

/// Records the synced table `table` with key columns `pk` and other
/// columns `columns`, after the column operations `ops` (a migration; empty
/// for `enable_sync`). A table seen for the first time, or again after its
/// synced predecessor of that name was dropped, gets a new identity.
/// Columns keep their identities through renames; columns present that the
/// registry does not know (changed outside `alter_synced_table`) are added,
/// and those gone are dropped.
pub(crate) fn register(
    conn: &Connection,
    table: &str,
    pk: &[String],
    columns: &[String],
    ops: &[ColumnOp],
) -> Result<TableInfo> {
    let existing: Option<i64> = conn
        .query_row(
            "SELECT id FROM confluo_tables WHERE name = ?1 AND live = 1",
            [table],
            |r| r.get(0),
        )
        .optional()?;
    let id = match existing {
        Some(id) => id,
        None => {
            let used: Vec<String> = conn
                .prepare("SELECT cid FROM confluo_tables")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let cid = new_identity(table, used.iter().map(String::as_str));
            conn.execute(
                "INSERT INTO confluo_tables(name, cid, live) VALUES (?1, ?2, 1)",
                params![table, cid],
            )?;
            let id = conn.last_insert_rowid();
            let cols: Vec<Column> = pk
                .iter()
                .enumerate()
                .map(|(i, name)| Column {
                    cid: name.clone(),
                    name: name.clone(),
                    pk_pos: Some(i as i64),
                    slot: None,
                    live: true,
                })
                .collect();
            save_columns(conn, id, &cols)?;
            id
        }
    };
    let mut cols = load_columns(conn, id)?;
    let live_named =
        |cols: &mut Vec<Column>, name: &str| cols.iter_mut().position(|c| c.live && c.name == name);
    for op in ops {
        match op {
            ColumnOp::Rename { from, to } => {
                if let Some(i) = live_named(&mut cols, from) {
                    cols[i].name = to.clone();
                }
            }
            ColumnOp::Drop(name) => {
                if let Some(i) = live_named(&mut cols, name) {
                    cols[i].live = false;
                }
            }
            ColumnOp::Add(name) => {
                if live_named(&mut cols, name).is_none() {
                    add_column(&mut cols, name);
                }
            }
        }
    }
    let mut old_pk: Vec<&Column> = cols.iter().filter(|c| c.pk_pos.is_some()).collect();
    old_pk.sort_by_key(|c| c.pk_pos);
    let old_pk: Vec<String> = old_pk.iter().map(|c| c.name.clone()).collect();
    if old_pk != pk {
        return Err(Error::schema(
            table,
            vec![format!(
                "the primary key changed from {old_pk:?} to {pk:?}; a synced table keeps its key"
            )],
        ));
    }
    // Whatever the operations did not explain: by name.
    for c in cols.iter_mut().filter(|c| c.pk_pos.is_none() && c.live) {
        if !columns.contains(&c.name) {
            c.live = false;
        }
    }
    for name in columns {
        if !cols
            .iter()
            .any(|c| c.pk_pos.is_none() && c.live && &c.name == name)
        {
            add_column(&mut cols, name);
        }
    }
    save_columns(conn, id, &cols)?;
    let info = load_tables(conn)?
        .into_iter()
        .find(|t| t.id == id)
        .expect("table just registered");
    Ok(info)
}

/// A synced table's identities at one step of its history.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Registry {
    pub cid: String,
    pub columns: Vec<Column>,
}

impl Registry {
    /// The live columns as (name, identity), sorted.
    pub fn live(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .columns
            .iter()
            .filter(|c| c.live)
            .map(|c| (c.name.clone(), c.cid.clone()))
            .collect();
        v.sort();
        v
    }

    /// The live columns' names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.live().into_iter().map(|(name, _)| name).collect()
    }
}

/// The registry of live table `id`, with what the table row records: how
/// many steps of a history it has run (`None`: unknown), and whether its
/// identities are provisional (from metadata of layout 1).
pub(crate) fn load_registry(conn: &Connection, id: i64) -> Result<(Registry, Option<usize>, bool)> {
    let (cid, steps, provisional): (String, Option<i64>, bool) = conn.query_row(
        "SELECT cid, steps, provisional FROM confluo_tables WHERE id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let columns = load_columns(conn, id)?;
    Ok((
        Registry { cid, columns },
        steps.map(|s| s as usize),
        provisional,
    ))
}

/// Records that live table `id` has run `steps` steps of its history (and
/// that its identities are the history's).
pub(crate) fn set_steps(conn: &Connection, id: i64, steps: Option<usize>) -> Result<()> {
    conn.execute(
        "UPDATE confluo_tables SET steps = ?2, provisional = 0 WHERE id = ?1",
        params![id, steps.map(|s| s as i64)],
    )?;
    Ok(())
}

/// Gives table `t`, whose identities are provisional, those of `step` (the
/// step of its history its columns match): each live column takes the
/// identity its name has there, and the step's dropped identities are
/// recorded as dropped. Returns the slots whose identity changed.
pub(crate) fn rekey(conn: &Connection, t: &TableInfo, step: &Registry) -> Result<Vec<usize>> {
    let mut cols = load_columns(conn, t.id)?;
    let mut changed = Vec::new();
    for c in cols.iter_mut().filter(|c| c.live && c.pk_pos.is_none()) {
        let Some(target) = step
            .columns
            .iter()
            .find(|s| s.live && s.pk_pos.is_none() && s.name == c.name)
        else {
            continue;
        };
        if c.cid != target.cid {
            c.cid = target.cid.clone();
            changed.extend(c.slot.map(|s| s as usize));
        }
    }
    // Identities now taken by a live column that a retired local entry
    // (layout 1 kept retired names) also holds: the retired one goes.
    let live: Vec<String> = cols
        .iter()
        .filter(|c| c.live)
        .map(|c| c.cid.clone())
        .collect();
    cols.retain(|c| c.live || !live.contains(&c.cid));
    let mut next = cols
        .iter()
        .filter_map(|c| c.slot)
        .max()
        .map_or(0, |s| s + 1);
    for dropped in step.columns.iter().filter(|s| !s.live) {
        if !cols.iter().any(|c| c.cid == dropped.cid) {
            cols.push(Column {
                slot: Some(next),
                live: false,
                ..dropped.clone()
            });
            next += 1;
        }
    }
    save_columns(conn, t.id, &cols)?;
    conn.execute(
        "UPDATE confluo_tables SET cid = ?2 WHERE id = ?1",
        params![t.id, step.cid],
    )?;
    Ok(changed)
}

/// Records `table`, seen here for the first time, with the identities of
/// `preset` (the registry its history gives, dropped columns included),
/// which must match its key `pk` and its other columns `columns`.
pub(crate) fn register_preset(
    conn: &Connection,
    table: &str,
    pk: &[String],
    columns: &[String],
    preset: &Registry,
) -> Result<TableInfo> {
    let cid = preset.cid.as_str();
    let preset = &preset.columns[..];
    let mut preset_pk: Vec<&Column> = preset.iter().filter(|c| c.pk_pos.is_some()).collect();
    preset_pk.sort_by_key(|c| c.pk_pos);
    let mut live: Vec<&str> = preset
        .iter()
        .filter(|c| c.live && c.pk_pos.is_none())
        .map(|c| c.name.as_str())
        .collect();
    let mut have: Vec<&str> = columns.iter().map(String::as_str).collect();
    live.sort_unstable();
    have.sort_unstable();
    if preset_pk.iter().map(|c| &c.name).ne(pk.iter()) || live != have {
        return Err(Error::schema(
            table,
            vec!["its columns are not those of the step of its history they match".into()],
        ));
    }
    let taken: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM confluo_tables WHERE cid = ?1)",
        [cid],
        |r| r.get(0),
    )?;
    if taken {
        return Err(Error::schema(
            table,
            vec![format!(
                "its history makes it table {cid:?}, which this database had and dropped"
            )],
        ));
    }
    conn.execute(
        "INSERT INTO confluo_tables(name, cid, live) VALUES (?1, ?2, 1)",
        params![table, cid],
    )?;
    let id = conn.last_insert_rowid();
    save_columns(conn, id, preset)?;
    let info = load_tables(conn)?
        .into_iter()
        .find(|t| t.id == id)
        .expect("table just registered");
    Ok(info)
}

/// Retires a synced table that a migration dropped: its identity is never
/// used again (a table made later with its name is a new one), and its
/// metadata and kept changes go.
pub(crate) fn retire(conn: &Connection, t: &TableInfo) -> Result<()> {
    conn.execute("UPDATE confluo_tables SET live = 0 WHERE id = ?1", [t.id])?;
    conn.execute_batch(&format!("DROP TABLE IF EXISTS {};", t.meta_table()))?;
    crate::bulk::forget(conn, t.id)?;
    conn.execute("DELETE FROM confluo_pending WHERE tbl = ?1", [&*t.cid])?;
    conn.execute("DELETE FROM confluo_rejected WHERE tbl = ?1", [&*t.cid])?;
    Ok(())
}

/// Forgets the changes kept for columns of `t` that are dropped now.
pub(crate) fn forget_dropped_columns(conn: &Connection, t: &TableInfo) -> Result<()> {
    let mut stmt =
        conn.prepare_cached("DELETE FROM confluo_pending WHERE tbl = ?1 AND col = ?2")?;
    for (slot, cid) in t.cids.iter().enumerate() {
        if t.slots.get(slot).is_none_or(Option::is_none) {
            stmt.execute(params![&*t.cid, &**cid])?;
        }
    }
    Ok(())
}

/// Whether a statement renames `table` itself (which a synced table cannot
/// do: its identity is its name's).
pub(crate) fn renames_table(sql: &str, table: &str) -> bool {
    let words: Vec<String> = sql
        .split_whitespace()
        .take(6)
        .map(|w| {
            w.trim_matches(|c| c == '"' || c == '`' || c == '[' || c == ']')
                .to_owned()
        })
        .collect();
    matches!(&words[..], [alter, kw, name, rename, to, ..]
        if alter.eq_ignore_ascii_case("ALTER")
            && kw.eq_ignore_ascii_case("TABLE")
            && name.eq_ignore_ascii_case(table)
            && rename.eq_ignore_ascii_case("RENAME")
            && to.eq_ignore_ascii_case("TO"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_change_in_place_is_a_rename_and_anything_else_drops_and_adds() {
        let mut ops = Vec::new();
        diff(
            &names(&["id", "name", "done"]),
            &names(&["id", "task", "done"]),
            true,
            &mut ops,
        );
        assert_eq!(
            ops,
            vec![ColumnOp::Rename {
                from: "name".into(),
                to: "task".into()
            }]
        );
        ops.clear();
        diff(&names(&["id", "name"]), &names(&["id"]), true, &mut ops);
        diff(&names(&["id"]), &names(&["id", "name"]), true, &mut ops);
        assert_eq!(
            ops,
            vec![ColumnOp::Drop("name".into()), ColumnOp::Add("name".into())]
        );
        ops.clear();
        // After a rebuild positions mean nothing.
        diff(&names(&["id", "a"]), &names(&["id", "b"]), false, &mut ops);
        assert_eq!(
            ops,
            vec![ColumnOp::Drop("a".into()), ColumnOp::Add("b".into())]
        );
    }

    #[test]
    fn remade_names_get_new_identities() {
        assert_eq!(new_identity("x", ["id", "y"].into_iter()), "x");
        assert_eq!(new_identity("x", ["id", "x"].into_iter()), "x#1");
        assert_eq!(new_identity("x", ["x", "x#1", "xy"].into_iter()), "x#2");
        assert_eq!(base("x#12"), "x");
        assert_eq!(base("x#"), "x#");
        assert_eq!(base("x#a"), "x#a");
    }

    #[test]
    fn only_renaming_the_table_itself_is_a_table_rename() {
        assert!(renames_table("ALTER TABLE todo RENAME TO todo_old", "todo"));
        assert!(renames_table("alter table \"todo\" rename to x", "todo"));
        assert!(!renames_table(
            "ALTER TABLE todo RENAME COLUMN a TO b",
            "todo"
        ));
        assert!(!renames_table(
            "ALTER TABLE new_todo RENAME TO todo",
            "todo"
        ));
    }
}
