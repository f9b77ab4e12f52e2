//! Schema evolution: renames, drops and re-adds of columns, and drops of
//! tables, rolled out to replicas at different times with writes on old and
//! new schemas interleaved, converge; a replica synced from scratch (which
//! runs the same migrations) sees every surviving value.
//!
//! The property test checks against a model that knows nothing of the
//! engine's identities: it tracks logical columns (a rename keeps one, a
//! drop ends one, an add starts one) and the last write to each.
//!
//! Cases: 200 by default; `CONFLUO_PROPTEST_CASES` raises it for soak runs.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use confluo_core::{Database, ManualTimeSource, Options, Value};
use proptest::prelude::*;

const CREATE: &str = "CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, name TEXT, note TEXT)";

fn replica(c: &Arc<ManualTimeSource>) -> Database {
    let db = Database::open_in_memory_with(Options {
        time: c.clone(),
        ..Options::default()
    })
    .unwrap();
    db.execute_batch(CREATE).unwrap();
    db.enable_sync("todo").unwrap();
    db
}

/// Both ways, through the wire encoding.
fn sync(a: &Database, b: &Database) {
    pull(a, b);
    pull(b, a);
}

fn rows(db: &Database, columns: &str) -> Vec<Vec<Value>> {
    db.query(&format!("SELECT id, {columns} FROM todo ORDER BY id"), &[])
        .unwrap()
        .rows
}

#[test]
fn a_renamed_column_keeps_its_values_for_a_replica_synced_from_scratch() {
    let c = clock();
    let a = replica(&c);
    a.execute("INSERT INTO todo VALUES ('t1', 'milk', 'two litres')", &[])
        .unwrap();
    a.alter_synced_table("todo", "ALTER TABLE todo RENAME COLUMN name TO task")
        .unwrap();
    // A new install runs the same migrations, then syncs.
    let fresh = replica(&c);
    fresh
        .alter_synced_table("todo", "ALTER TABLE todo RENAME COLUMN name TO task")
        .unwrap();
    pull(&fresh, &a);
    assert_eq!(
        rows(&fresh, "task, note"),
        vec![vec![text("t1"), text("milk"), text("two litres")]]
    );
}

#[test]
fn edits_on_the_old_and_the_new_name_of_a_column_converge() {
    let c = clock();
    let (old, new) = (replica(&c), replica(&c));
    old.execute("INSERT INTO todo VALUES ('t1', 'milk', NULL)", &[])
        .unwrap();
    sync(&old, &new);
    new.alter_synced_table("todo", "ALTER TABLE todo RENAME COLUMN name TO task")
        .unwrap();
    c.advance(1);
    // Still on the old schema, the other replica edits `name`.
    old.execute("UPDATE todo SET name = 'oat milk'", &[])
        .unwrap();
    sync(&old, &new);
    assert_eq!(rows(&new, "task"), vec![vec![text("t1"), text("oat milk")]]);
    c.advance(1);
    new.execute("UPDATE todo SET task = 'soy milk'", &[])
        .unwrap();
    sync(&old, &new);
    assert_eq!(rows(&old, "name"), vec![vec![text("t1"), text("soy milk")]]);
    old.alter_synced_table("todo", "ALTER TABLE todo RENAME COLUMN name TO task")
        .unwrap();
    sync(&old, &new);
    assert_eq!(rows(&old, "task, note"), rows(&new, "task, note"));
}

#[test]
fn a_column_dropped_and_added_again_is_a_new_column() {
    let c = clock();
    let (a, b) = (replica(&c), replica(&c));
    a.execute("INSERT INTO todo VALUES ('t1', 'milk', 'old note')", &[])
        .unwrap();
    sync(&a, &b);
    let remake = "ALTER TABLE todo DROP COLUMN note; ALTER TABLE todo ADD COLUMN note TEXT";
    a.alter_synced_table("todo", remake).unwrap();
    // B never dropped it: its old value must not come back to A.
    sync(&a, &b);
    assert_eq!(rows(&a, "note"), vec![vec![text("t1"), Value::Null]]);
    assert_eq!(rows(&b, "note"), vec![vec![text("t1"), text("old note")]]);
    c.advance(1);
    a.execute("UPDATE todo SET note = 'new note'", &[]).unwrap();
    // B keeps the new column's value until it has the column.
    sync(&a, &b);
    assert_eq!(rows(&b, "note"), vec![vec![text("t1"), text("old note")]]);
    b.alter_synced_table("todo", remake).unwrap();
    sync(&a, &b);
    assert_eq!(rows(&a, "name, note"), rows(&b, "name, note"));
    assert_eq!(rows(&b, "note"), vec![vec![text("t1"), text("new note")]]);
    // And a replica synced from scratch agrees.
    let fresh = replica(&c);
    fresh.alter_synced_table("todo", remake).unwrap();
    pull(&fresh, &b);
    assert_eq!(rows(&fresh, "name, note"), rows(&a, "name, note"));
}

#[test]
fn a_dropped_table_made_again_is_a_new_table() {
    let c = clock();
    let (a, b) = (replica(&c), replica(&c));
    a.execute("INSERT INTO todo VALUES ('t1', 'old row', NULL)", &[])
        .unwrap();
    sync(&a, &b);
    for db in [&a, &b] {
        db.alter_synced_table("todo", "DROP TABLE todo").unwrap();
        assert!(db.synced_tables().is_empty());
        db.execute_batch(CREATE).unwrap();
        db.enable_sync("todo").unwrap();
    }
    // The old incarnation's rows do not come back.
    let late = replica(&c);
    late.execute(
        "INSERT INTO todo VALUES ('t2', 'from the old table', NULL)",
        &[],
    )
    .unwrap();
    a.execute("INSERT INTO todo VALUES ('t3', 'new row', NULL)", &[])
        .unwrap();
    pull(&a, &late);
    sync(&a, &b);
    assert_eq!(rows(&a, "name"), vec![vec![text("t3"), text("new row")]]);
    assert_eq!(rows(&b, "name"), rows(&a, "name"));
}

#[test]
fn a_synced_table_cannot_be_renamed() {
    let c = clock();
    let a = replica(&c);
    let err = a
        .alter_synced_table("todo", "ALTER TABLE todo RENAME TO todo_old")
        .unwrap_err();
    assert!(err.to_string().contains("cannot be renamed"), "{err}");
    assert_eq!(a.synced_tables(), vec!["todo"]);
}

#[test]
fn metadata_of_the_first_layout_gets_identities_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    let db = Database::open(&path).unwrap();
    db.execute_batch(CREATE).unwrap();
    db.enable_sync("todo").unwrap();
    db.execute("INSERT INTO todo VALUES ('t1', 'milk', NULL)", &[])
        .unwrap();
    db.close().unwrap();
    // Back to layout 1: tables and columns by name only.
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute_batch(
        "CREATE TABLE t1(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
         INSERT INTO t1 SELECT id, name FROM confluo_tables;
         DROP TABLE confluo_tables; ALTER TABLE t1 RENAME TO confluo_tables;
         CREATE TABLE c1(tbl INTEGER NOT NULL, name TEXT NOT NULL, pk_pos INTEGER, slot INTEGER,
           live INTEGER NOT NULL, PRIMARY KEY (tbl, name)) WITHOUT ROWID;
         INSERT INTO c1 SELECT tbl, name, pk_pos, slot, live FROM confluo_columns;
         DROP TABLE confluo_columns; ALTER TABLE c1 RENAME TO confluo_columns;
         UPDATE confluo_state SET value = 1 WHERE key = 'format';",
    )
    .unwrap();
    drop(raw);
    let db = Database::open(&path).unwrap();
    db.alter_synced_table("todo", "ALTER TABLE todo RENAME COLUMN name TO task")
        .unwrap();
    let fresh = Database::open_in_memory().unwrap();
    fresh.execute_batch(CREATE).unwrap();
    fresh.enable_sync("todo").unwrap();
    fresh
        .alter_synced_table("todo", "ALTER TABLE todo RENAME COLUMN name TO task")
        .unwrap();
    pull(&fresh, &db);
    assert_eq!(rows(&fresh, "task"), vec![vec![text("t1"), text("milk")]]);
}

// ---------------------------------------------------------------------------
// Property: random migrations, writes and exchanges against a model.

const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
const KEYS: [&str; 3] = ["k0", "k1", "k2"];
const REPLICAS: usize = 3;

/// The model's schema: live columns as (name, logical column).
#[derive(Clone, Debug, Default)]
struct Schema {
    live: Vec<(String, usize)>,
    next: usize,
}

impl Schema {
    fn initial() -> Self {
        Schema {
            live: vec![("name".into(), 0), ("note".into(), 1)],
            next: 2,
        }
    }
}

/// One migration step: its SQL and the schema after it.
#[derive(Clone, Debug)]
struct Step {
    sql: String,
    after: Schema,
}

/// Turns random numbers into a valid migration history.
fn migrations(raw: &[(u8, u8, u8)]) -> Vec<Step> {
    let mut schema = Schema::initial();
    let mut steps = Vec::new();
    for &(kind, x, y) in raw {
        let unused: Vec<&str> = NAMES
            .iter()
            .copied()
            .filter(|n| schema.live.iter().all(|(l, _)| l != n))
            .collect();
        let sql = match kind % 3 {
            0 if !unused.is_empty() => {
                let name = unused[x as usize % unused.len()];
                schema.live.push((name.into(), schema.next));
                schema.next += 1;
                format!("ALTER TABLE todo ADD COLUMN {name} TEXT")
            }
            1 if !unused.is_empty() && !schema.live.is_empty() => {
                let i = x as usize % schema.live.len();
                let to = unused[y as usize % unused.len()];
                let from = std::mem::replace(&mut schema.live[i].0, to.into());
                format!("ALTER TABLE todo RENAME COLUMN {from} TO {to}")
            }
            2 if schema.live.len() > 1 => {
                let (name, _) = schema.live.remove(x as usize % schema.live.len());
                format!("ALTER TABLE todo DROP COLUMN {name}")
            }
            _ => continue,
        };
        steps.push(Step {
            sql,
            after: schema.clone(),
        });
    }
    steps
}

#[derive(Clone, Debug)]
enum Action {
    Migrate(usize),
    Write {
        replica: usize,
        key: usize,
        column: usize,
    },
    Sync(usize, usize),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        1 => (0..REPLICAS).prop_map(Action::Migrate),
        3 => (0..REPLICAS, 0..KEYS.len(), 0..8usize)
            .prop_map(|(replica, key, column)| Action::Write { replica, key, column }),
        2 => (0..REPLICAS, 0..REPLICAS).prop_map(|(a, b)| Action::Sync(a, b)),
    ]
}

fn cases() -> u32 {
    std::env::var("CONFLUO_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

fn run(raw_migrations: &[(u8, u8, u8)], actions: &[Action]) -> Result<(), TestCaseError> {
    let steps = migrations(raw_migrations);
    let schema_at = |p: usize| -> Schema {
        if p == 0 {
            Schema::initial()
        } else {
            steps[p - 1].after.clone()
        }
    };
    let c = clock();
    let replicas: Vec<Database> = (0..REPLICAS).map(|_| replica(&c)).collect();
    let mut position = [0usize; REPLICAS];
    // The model: the last value written to each (key, logical column).
    let mut last: BTreeMap<(usize, usize), String> = BTreeMap::new();
    for (k, key) in KEYS.iter().enumerate() {
        replicas[0]
            .execute(
                "INSERT INTO todo(id, name) VALUES (?1, ?2)",
                &[text(key), text(&format!("{key} first"))],
            )
            .unwrap();
        last.insert((k, 0), format!("{key} first"));
    }
    let migrate = |db: &Database, p: &mut usize| {
        db.alter_synced_table("todo", &steps[*p].sql).unwrap();
        *p += 1;
    };
    for (n, a) in actions.iter().enumerate() {
        c.advance(1);
        match *a {
            Action::Migrate(r) if position[r] < steps.len() => {
                migrate(&replicas[r], &mut position[r]);
            }
            Action::Migrate(_) => {}
            Action::Write {
                replica,
                key,
                column,
            } => {
                let schema = schema_at(position[replica]);
                let (name, logical) = &schema.live[column % schema.live.len()];
                let value = format!("v{n}");
                let changed = replicas[replica]
                    .execute(
                        &format!("UPDATE todo SET {name} = ?1 WHERE id = ?2"),
                        &[text(&value), text(KEYS[key])],
                    )
                    .unwrap();
                if changed == 1 {
                    last.insert((key, *logical), value);
                }
            }
            Action::Sync(x, y) if x != y => sync(&replicas[x], &replicas[y]),
            Action::Sync(..) => {}
        }
    }
    // Everyone migrates to the end and syncs; a new install joins.
    for (r, db) in replicas.iter().enumerate() {
        while position[r] < steps.len() {
            migrate(db, &mut position[r]);
        }
    }
    for _ in 0..2 {
        for x in 0..REPLICAS {
            for y in x + 1..REPLICAS {
                sync(&replicas[x], &replicas[y]);
            }
        }
    }
    let fresh = replica(&c);
    let mut p = 0;
    while p < steps.len() {
        migrate(&fresh, &mut p);
    }
    pull(&fresh, &replicas[0]);
    // And one whose app makes the latest shape directly.
    let end = schema_at(steps.len());
    let columns: Vec<&str> = end.live.iter().map(|(n, _)| n.as_str()).collect();
    let direct = plain(&c);
    let defs: Vec<String> = columns.iter().map(|n| format!("{n} TEXT")).collect();
    direct
        .execute_batch(&format!(
            "CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, {})",
            defs.join(", ")
        ))
        .unwrap();
    let history: Vec<&str> = steps.iter().map(|s| s.sql.as_str()).collect();
    direct
        .enable_sync_with_history("todo", CREATE, &history)
        .unwrap();
    pull(&direct, &replicas[1]);

    let expected: Vec<Vec<Value>> =
        KEYS.iter()
            .enumerate()
            .map(|(k, key)| {
                std::iter::once(text(key))
                    .chain(end.live.iter().map(|(_, logical)| {
                        last.get(&(k, *logical)).map_or(Value::Null, |v| text(v))
                    }))
                    .collect()
            })
            .collect();
    for (i, db) in replicas.iter().chain([&fresh, &direct]).enumerate() {
        prop_assert_eq!(
            rows(db, &columns.join(", ")),
            expected.clone(),
            "replica {} (3: synced from scratch, 4: made in the latest shape) after {:?}",
            i,
            history
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn random_migrations_writes_and_exchanges_converge_to_the_model(
        raw in prop::collection::vec((0u8..3, any::<u8>(), any::<u8>()), 1..6),
        actions in prop::collection::vec(action(), 5..40),
    ) {
        run(&raw, &actions)?;
    }
}

// ---------------------------------------------------------------------------
// enable_sync_with_history: every kind of install ends on the same identities.

const HISTORY: [&str; 2] = [
    "ALTER TABLE todo RENAME COLUMN name TO task",
    "ALTER TABLE todo DROP COLUMN note; ALTER TABLE todo ADD COLUMN note TEXT",
];

fn plain(c: &Arc<ManualTimeSource>) -> Database {
    Database::open_in_memory_with(Options {
        time: c.clone(),
        ..Options::default()
    })
    .unwrap()
}

#[test]
fn a_new_install_made_in_the_latest_shape_takes_the_identities_of_the_history() {
    let c = clock();
    // An install from the first version, migrated step by step.
    let old = plain(&c);
    old.enable_sync_with_history("todo", CREATE, &[]).unwrap();
    old.execute("INSERT INTO todo VALUES ('t1', 'milk', 'old note')", &[])
        .unwrap();
    old.enable_sync_with_history("todo", CREATE, &HISTORY[..1])
        .unwrap();
    c.advance(1);
    old.execute("UPDATE todo SET task = 'oat milk'", &[])
        .unwrap();
    // A new install whose app makes the latest shape directly.
    let new = plain(&c);
    new.execute_batch("CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, task TEXT, note TEXT)")
        .unwrap();
    new.enable_sync_with_history("todo", CREATE, &HISTORY)
        .unwrap();
    sync(&old, &new);
    // The renamed column's values arrive; the dropped note's do not.
    assert_eq!(
        rows(&new, "task, note"),
        vec![vec![text("t1"), text("oat milk"), Value::Null]]
    );
    // A missing table is made and migrated; the old install catches up.
    let fresh = plain(&c);
    fresh
        .enable_sync_with_history("todo", CREATE, &HISTORY)
        .unwrap();
    old.enable_sync_with_history("todo", CREATE, &HISTORY)
        .unwrap();
    c.advance(1);
    old.execute("UPDATE todo SET note = 'new note'", &[])
        .unwrap();
    sync(&old, &new);
    sync(&fresh, &new);
    for db in [&old, &new, &fresh] {
        assert_eq!(
            rows(db, "task, note"),
            vec![vec![text("t1"), text("oat milk"), text("new note")]]
        );
    }
    // Running it again changes nothing; a table off its history is refused.
    old.enable_sync_with_history("todo", CREATE, &HISTORY)
        .unwrap();
    let err = old
        .enable_sync_with_history("todo", CREATE, &HISTORY[..1])
        .unwrap_err();
    assert!(err.to_string().contains("match no step"), "{err}");
}

#[test]
fn changes_kept_aside_name_their_columns_as_this_database_does() {
    let c = clock();
    let (a, b) = (replica(&c), replica(&c));
    b.alter_synced_table("todo", "ALTER TABLE todo RENAME COLUMN name TO task")
        .unwrap();
    b.execute_batch(
        "CREATE TRIGGER no_bad BEFORE INSERT ON todo WHEN NEW.task = 'bad' \
         BEGIN SELECT RAISE(ABORT, 'no bad tasks'); END",
    )
    .unwrap();
    a.execute("INSERT INTO todo VALUES ('t1', 'bad', NULL)", &[])
        .unwrap();
    let changes = a.changes_since(0, None).unwrap().changes;
    b.apply_from_server(&changes, 1, None).unwrap();
    let kept = b.rejected_changes().unwrap();
    let named: Vec<(&str, Option<&str>)> = kept
        .iter()
        .map(|r| (r.table.as_str(), r.column.as_deref()))
        .collect();
    assert!(named.contains(&("todo", Some("task"))), "{named:?}");
    assert!(kept
        .iter()
        .any(|r| r.change.column.as_deref() == Some("name")));
}

#[test]
fn a_kept_change_the_app_refuses_does_not_fail_the_migration_that_adds_its_column() {
    let c = clock();
    let (a, b) = (replica(&c), replica(&c));
    a.execute("INSERT INTO todo VALUES ('t1', 'milk', NULL)", &[])
        .unwrap();
    a.execute("INSERT INTO todo VALUES ('t2', 'bread', NULL)", &[])
        .unwrap();
    sync(&a, &b);
    a.alter_synced_table("todo", "ALTER TABLE todo ADD COLUMN due TEXT")
        .unwrap();
    c.advance(1);
    a.execute("UPDATE todo SET due = 'monday' WHERE id = 't1'", &[])
        .unwrap();
    a.execute("UPDATE todo SET due = 'friday' WHERE id = 't2'", &[])
        .unwrap();
    let changes = a.changes_since(0, None).unwrap().changes;
    assert_eq!(b.apply_from_server(&changes, 1, None).unwrap().deferred, 2);
    // B's migration adds `due`, and a trigger that refuses mondays.
    b.alter_synced_table(
        "todo",
        "ALTER TABLE todo ADD COLUMN due TEXT;
         CREATE TRIGGER no_monday BEFORE UPDATE ON todo WHEN NEW.due = 'monday'
         BEGIN SELECT RAISE(ABORT, 'not on mondays'); END;",
    )
    .unwrap();
    assert_eq!(
        rows(&b, "due"),
        vec![
            vec![text("t1"), Value::Null],
            vec![text("t2"), text("friday")]
        ]
    );
    let kept = b.rejected_changes().unwrap();
    assert_eq!(kept.len(), 1);
    assert!(kept[0].reason.contains("not on mondays"), "{kept:?}");
}

/// Metadata of layout 1 for a replica that renamed `name` to `task` under
/// layout 1 (which recorded a rename as a drop and an add).
fn layout1_replica_that_renamed(path: &std::path::Path) {
    let db = Database::open(path).unwrap();
    db.execute_batch(CREATE).unwrap();
    db.enable_sync("todo").unwrap();
    db.execute("INSERT INTO todo VALUES ('t1', 'milk', NULL)", &[])
        .unwrap();
    db.close().unwrap();
    let raw = rusqlite::Connection::open(path).unwrap();
    raw.execute_batch(
        "CREATE TABLE t1(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
         INSERT INTO t1 SELECT id, name FROM confluo_tables;
         DROP TABLE confluo_tables; ALTER TABLE t1 RENAME TO confluo_tables;
         CREATE TABLE c1(tbl INTEGER NOT NULL, name TEXT NOT NULL, pk_pos INTEGER, slot INTEGER,
           live INTEGER NOT NULL, PRIMARY KEY (tbl, name)) WITHOUT ROWID;
         INSERT INTO c1 SELECT tbl, name, pk_pos, slot, live FROM confluo_columns;
         DROP TABLE confluo_columns; ALTER TABLE c1 RENAME TO confluo_columns;
         UPDATE confluo_state SET value = 1 WHERE key = 'format';
         DELETE FROM confluo_state WHERE key = 'triggers';
         DROP TRIGGER confluo_ai_todo; DROP TRIGGER confluo_au_todo;
         DROP TRIGGER IF EXISTS confluo_aupk_todo; DROP TRIGGER confluo_ad_todo;
         ALTER TABLE todo RENAME COLUMN name TO task;
         UPDATE confluo_columns SET live = 0 WHERE name = 'name';
         INSERT INTO confluo_columns(tbl, name, pk_pos, slot, live)
           SELECT tbl, 'task', NULL, 2, 1 FROM confluo_columns WHERE name = 'id';",
    )
    .unwrap();
}

#[test]
fn a_table_renamed_under_layout_1_takes_its_identities_from_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    layout1_replica_that_renamed(&path);
    let rename = ["ALTER TABLE todo RENAME COLUMN name TO task"];
    // The app starts: the history gives the table its identities.
    let old = Database::open(&path).unwrap();
    old.enable_sync_with_history("todo", CREATE, &rename)
        .unwrap();
    old.execute("UPDATE todo SET task = 'oat milk' WHERE id = 't1'", &[])
        .unwrap();
    let fresh = Database::open_in_memory().unwrap();
    fresh
        .enable_sync_with_history("todo", CREATE, &rename)
        .unwrap();
    fresh
        .execute("INSERT INTO todo VALUES ('t2', 'bread', NULL)", &[])
        .unwrap();
    exchange(&old, &fresh);
    assert_eq!(
        rows(&fresh, "task"),
        vec![
            vec![text("t1"), text("oat milk")],
            vec![text("t2"), text("bread")]
        ]
    );
    assert_eq!(rows(&old, "task, note"), rows(&fresh, "task, note"));
    // Later starts change nothing.
    old.enable_sync_with_history("todo", CREATE, &rename)
        .unwrap();
    assert_eq!(rows(&old, "task, note"), rows(&fresh, "task, note"));
}

#[test]
fn a_column_remade_under_layout_1_keeps_what_was_written_since() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    let remake = "ALTER TABLE todo DROP COLUMN note; ALTER TABLE todo ADD COLUMN note TEXT";
    {
        let db = Database::open(&path).unwrap();
        db.execute_batch(CREATE).unwrap();
        db.enable_sync("todo").unwrap();
        db.close().unwrap();
        let raw = rusqlite::Connection::open(&path).unwrap();
        raw.execute_batch(&format!(
            "CREATE TABLE t1(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
             INSERT INTO t1 SELECT id, name FROM confluo_tables;
             DROP TABLE confluo_tables; ALTER TABLE t1 RENAME TO confluo_tables;
             CREATE TABLE c1(tbl INTEGER NOT NULL, name TEXT NOT NULL, pk_pos INTEGER, slot INTEGER,
               live INTEGER NOT NULL, PRIMARY KEY (tbl, name)) WITHOUT ROWID;
             INSERT INTO c1 SELECT tbl, name, pk_pos, slot, live FROM confluo_columns;
             DROP TABLE confluo_columns; ALTER TABLE c1 RENAME TO confluo_columns;
             UPDATE confluo_state SET value = 1 WHERE key = 'format';
             DELETE FROM confluo_state WHERE key = 'triggers';
             DROP TRIGGER confluo_ai_todo; DROP TRIGGER confluo_au_todo;
             DROP TRIGGER IF EXISTS confluo_aupk_todo; DROP TRIGGER confluo_ad_todo;
             {remake};"
        ))
        .unwrap();
    }
    let db = Database::open(&path).unwrap();
    db.execute(
        "INSERT INTO todo VALUES ('t1', 'milk', 'written after the remake')",
        &[],
    )
    .unwrap();
    db.enable_sync_with_history("todo", CREATE, &[remake])
        .unwrap();
    assert_eq!(
        rows(&db, "note"),
        vec![vec![text("t1"), text("written after the remake")]]
    );
    // And it goes out under the remade column's identity.
    let fresh = Database::open_in_memory().unwrap();
    fresh
        .enable_sync_with_history("todo", CREATE, &[remake])
        .unwrap();
    pull(&fresh, &db);
    assert_eq!(rows(&fresh, "name, note"), rows(&db, "name, note"));
}

#[test]
fn a_table_dropped_and_made_again_in_the_history_is_a_new_table_everywhere() {
    let c = clock();
    let remake =
        "DROP TABLE todo; CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, name TEXT, note TEXT)";
    let a = plain(&c);
    a.enable_sync_with_history("todo", CREATE, &[]).unwrap();
    a.execute("INSERT INTO todo VALUES ('t1', 'old row', NULL)", &[])
        .unwrap();
    let lagging = plain(&c);
    lagging
        .enable_sync_with_history("todo", CREATE, &[])
        .unwrap();
    sync(&a, &lagging);
    a.enable_sync_with_history("todo", CREATE, &[remake])
        .unwrap();
    assert!(
        rows(&a, "name").is_empty(),
        "the old rows went with the table"
    );
    c.advance(1);
    a.execute("INSERT INTO todo VALUES ('t2', 'new row', NULL)", &[])
        .unwrap();
    // A new install made in the latest shape, and one that runs it all.
    let direct = plain(&c);
    direct.execute_batch(CREATE).unwrap();
    direct
        .enable_sync_with_history("todo", CREATE, &[remake])
        .unwrap();
    let fresh = plain(&c);
    fresh
        .enable_sync_with_history("todo", CREATE, &[remake])
        .unwrap();
    c.advance(1);
    lagging
        .execute("UPDATE todo SET name = 'edited on the old table'", &[])
        .unwrap();
    for db in [&direct, &fresh, &lagging] {
        sync(&a, db);
    }
    lagging
        .enable_sync_with_history("todo", CREATE, &[remake])
        .unwrap();
    for db in [&direct, &fresh, &lagging] {
        sync(&a, db);
    }
    for db in [&direct, &fresh, &lagging] {
        assert_eq!(rows(db, "name"), vec![vec![text("t2"), text("new row")]]);
    }
}

#[test]
fn a_rebuild_in_a_migration_makes_a_new_table_on_every_replica() {
    let c = clock();
    let (a, b) = (replica(&c), replica(&c));
    a.execute("INSERT INTO todo VALUES ('t1', 'milk', NULL)", &[])
        .unwrap();
    sync(&a, &b);
    let rebuild = "CREATE TABLE todo_new(id TEXT PRIMARY KEY NOT NULL, name TEXT, note TEXT); \
                   DROP TABLE todo; ALTER TABLE todo_new RENAME TO todo";
    for db in [&a, &b] {
        db.alter_synced_table("todo", rebuild).unwrap();
    }
    c.advance(1);
    b.execute("INSERT INTO todo VALUES ('t2', 'bread', NULL)", &[])
        .unwrap();
    sync(&a, &b);
    assert_eq!(rows(&a, "name"), vec![vec![text("t2"), text("bread")]]);
    assert_eq!(rows(&a, "name, note"), rows(&b, "name, note"));
    // Nothing of the rows that went with the old table comes back.
    let fresh = replica(&c);
    fresh.alter_synced_table("todo", rebuild).unwrap();
    pull(&fresh, &a);
    assert_eq!(rows(&fresh, "name, note"), rows(&a, "name, note"));
}

#[test]
fn every_step_of_a_history_runs_once_even_those_that_change_no_column() {
    let db = Database::open_in_memory().unwrap();
    let add = "ALTER TABLE todo ADD COLUMN due INTEGER";
    db.enable_sync_with_history("todo", CREATE, &[add]).unwrap();
    db.enable_sync_with_history("todo", CREATE, &[add, "CREATE INDEX todo_due ON todo(due)"])
        .unwrap();
    let index = db
        .query(
            "SELECT name FROM sqlite_schema WHERE type = 'index' AND name = 'todo_due'",
            &[],
        )
        .unwrap();
    assert_eq!(index.rows.len(), 1, "the index step ran");
    // Once: a start after that runs nothing again.
    db.enable_sync_with_history("todo", CREATE, &[add, "CREATE INDEX todo_due ON todo(due)"])
        .unwrap();
}
