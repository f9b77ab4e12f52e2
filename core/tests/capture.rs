//! What the capture triggers record of local writes: which cells an update
//! stamps, key changes, writes that change nothing, wide tables.

mod common;

use std::collections::BTreeSet;

use common::*;
use confluo_core::{Database, Value};

fn synced(sql: &str, table: &str) -> Database {
    let db = Database::open_in_memory().unwrap();
    db.execute_batch(sql).unwrap();
    db.enable_sync(table).unwrap();
    db
}

/// The (key, column) of every change recorded after `since`; the row
/// marker is the column "-".
fn cells_since(db: &Database, since: u64) -> BTreeSet<(String, String)> {
    db.changes_since(since, None)
        .unwrap()
        .changes
        .iter()
        .map(|c| {
            let key =
                c.pk.iter()
                    .map(|v| format!("{v:?}"))
                    .collect::<Vec<_>>()
                    .join("|");
            (key, c.column.as_deref().unwrap_or("-").to_owned())
        })
        .collect()
}

fn cells(list: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    list.iter()
        .map(|(k, c)| (k.to_string(), c.to_string()))
        .collect()
}

const T: &str = "CREATE TABLE t(id INTEGER PRIMARY KEY, a, b TEXT, c REAL)";

fn three_rows() -> Database {
    let db = synced(T, "t");
    db.execute_batch(
        "INSERT INTO t VALUES (1, 1, 'one', 1.5); INSERT INTO t VALUES (2, 2, 'two', 2.5); \
         INSERT INTO t VALUES (3, 3, 'three', 3.5);",
    )
    .unwrap();
    db
}

#[test]
fn an_update_of_every_row_stamps_only_the_columns_it_changed() {
    let db = three_rows();
    let before = db.db_version();
    let inserted = db.changes_since(0, None).unwrap();
    db.write(|tx| {
        tx.execute("UPDATE t SET b = 'x'", &[])?;
        tx.execute("UPDATE t SET c = 9.0 WHERE id = 2", &[])?;
        Ok(())
    })
    .unwrap();
    assert_eq!(db.db_version(), before + 1);
    assert_eq!(
        cells_since(&db, before),
        cells(&[
            ("Integer(1)", "b"),
            ("Integer(2)", "b"),
            ("Integer(2)", "c"),
            ("Integer(3)", "b"),
        ])
    );
    // The other cells keep the clocks of the insert.
    let now = db.changes_since(0, None).unwrap();
    for c in &now.changes {
        if c.column.as_deref() == Some("a") || c.column.is_none() {
            let was = inserted
                .changes
                .iter()
                .find(|o| o.pk == c.pk && o.column == c.column)
                .unwrap();
            assert_eq!((c.hlc, c.db_version), (was.hlc, was.db_version));
        }
    }
    let replica = synced(T, "t");
    pull(&replica, &db);
    assert_eq!(dump(&replica, "t"), dump(&db, "t"));
}

#[test]
fn a_write_of_the_values_a_row_already_has_records_nothing() {
    let db = three_rows();
    let before = db.db_version();
    db.execute("UPDATE t SET a = a, b = b, c = c", &[]).unwrap();
    db.execute("UPDATE t SET b = 'two' WHERE id = 2", &[])
        .unwrap();
    assert_eq!(db.db_version(), before);
    assert!(cells_since(&db, before).is_empty());
}

#[test]
fn the_same_number_of_another_type_is_a_change() {
    let db = three_rows();
    let before = db.db_version();
    // `a` has no type: 1.0 is kept as a real, unlike the integer 1 before.
    db.execute("UPDATE t SET a = 1.0 WHERE id = 1", &[])
        .unwrap();
    db.execute("UPDATE t SET a = '2' WHERE id = 2", &[])
        .unwrap();
    assert_eq!(
        cells_since(&db, before),
        cells(&[("Integer(1)", "a"), ("Integer(2)", "a")])
    );
    let replica = synced(T, "t");
    pull(&replica, &db);
    assert_eq!(dump(&replica, "t"), dump(&db, "t"));
    assert_eq!(dump(&replica, "t")[0][1], Value::Real(1.0));
}

#[test]
fn an_update_of_the_key_deletes_the_old_row_and_inserts_the_new() {
    let db = three_rows();
    let replica = synced(T, "t");
    pull(&replica, &db);
    let before = db.db_version();
    db.execute("UPDATE t SET id = 10 WHERE id = 1", &[])
        .unwrap();
    assert_eq!(
        cells_since(&db, before),
        cells(&[
            ("Integer(1)", "-"),
            ("Integer(10)", "-"),
            ("Integer(10)", "a"),
            ("Integer(10)", "b"),
            ("Integer(10)", "c"),
        ])
    );
    let changes = db.changes_since(before, None).unwrap().changes;
    let old = changes
        .iter()
        .find(|c| c.pk[0] == Value::Integer(1))
        .unwrap();
    assert_eq!(old.cl % 2, 0, "the old key is deleted");
    pull(&replica, &db);
    assert_eq!(dump(&replica, "t"), dump(&db, "t"));
}

#[test]
fn updates_of_composite_keys_and_of_their_other_columns() {
    let schema = "CREATE TABLE m(a INTEGER NOT NULL, b TEXT NOT NULL, x, y, PRIMARY KEY (a, b))";
    let db = synced(schema, "m");
    db.execute("INSERT INTO m VALUES (1, 'k', 'x', 'y')", &[])
        .unwrap();
    let before = db.db_version();
    db.execute("UPDATE m SET y = 'z'", &[]).unwrap();
    let changes = db.changes_since(before, None).unwrap().changes;
    assert_eq!(changes.len(), 1);
    assert_eq!(&changes[0].pk[..], &[Value::Integer(1), text("k")]);
    assert_eq!(changes[0].column.as_deref(), Some("y"));
    let before = db.db_version();
    db.execute("UPDATE m SET b = 'l'", &[]).unwrap();
    assert_eq!(
        cells_since(&db, before),
        cells(&[
            ("Integer(1)|Text(\"k\")", "-"),
            ("Integer(1)|Text(\"l\")", "-"),
            ("Integer(1)|Text(\"l\")", "x"),
            ("Integer(1)|Text(\"l\")", "y"),
        ])
    );
    let replica = synced(schema, "m");
    pull(&replica, &db);
    assert_eq!(dump(&replica, "m"), dump(&db, "m"));
}

#[test]
fn several_updates_of_a_row_in_one_transaction_stamp_the_union_of_their_columns() {
    let db = three_rows();
    let before = db.db_version();
    db.write(|tx| {
        tx.execute("UPDATE t SET a = 10 WHERE id = 1", &[])?;
        tx.execute("UPDATE t SET c = 0.5 WHERE id = 1", &[])?;
        // Back to what it was: still a write, as the first one was.
        tx.execute("UPDATE t SET a = 1 WHERE id = 1", &[])?;
        Ok(())
    })
    .unwrap();
    assert_eq!(
        cells_since(&db, before),
        cells(&[("Integer(1)", "a"), ("Integer(1)", "c")])
    );
}

#[test]
fn an_update_rolled_back_records_nothing() {
    let db = three_rows();
    let before = db.db_version();
    let failed = db.write(|tx| {
        tx.execute("UPDATE t SET b = 'gone'", &[])?;
        Err::<(), _>(confluo_core::Error::InvalidInput("changed my mind".into()))
    });
    assert!(failed.is_err());
    assert_eq!(db.db_version(), before);
    assert!(cells_since(&db, before).is_empty());
    db.execute("UPDATE t SET c = 0.0 WHERE id = 3", &[])
        .unwrap();
    assert_eq!(cells_since(&db, before), cells(&[("Integer(3)", "c")]));
}

#[test]
fn an_update_of_a_row_without_metadata_records_the_whole_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let db = Database::open(&path).unwrap();
    db.execute_batch(T).unwrap();
    db.enable_sync("t").unwrap();
    db.execute("INSERT INTO t VALUES (1, 1, 'one', 1.5)", &[])
        .unwrap();
    // The metadata table has no triggers: its row can be lost from outside.
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute("DELETE FROM confluo_meta_t", []).unwrap();
    drop(raw);
    let before = db.db_version();
    db.execute("UPDATE t SET b = 'uno'", &[]).unwrap();
    let changes = db.changes_since(before, None).unwrap().changes;
    assert_eq!(changes.len(), 4, "{changes:?}");
    assert!(changes.iter().all(|c| c.cl == 1));
}

#[test]
fn a_table_too_wide_for_one_capture_call_is_tracked_all_the_same() {
    let columns: Vec<String> = (0..600).map(|i| format!("c{i}")).collect();
    let schema = format!(
        "CREATE TABLE w(id INTEGER PRIMARY KEY, {})",
        columns.join(", ")
    );
    let db = synced(&schema, "w");
    let replica = synced(&schema, "w");
    db.execute("INSERT INTO w(id, c0, c599) VALUES (1, 'a', 'b')", &[])
        .unwrap();
    let before = db.db_version();
    db.execute("UPDATE w SET c599 = 'z', c0 = c0", &[]).unwrap();
    assert_eq!(cells_since(&db, before), cells(&[("Integer(1)", "c599")]));
    db.execute("UPDATE w SET id = 2", &[]).unwrap();
    db.execute("INSERT INTO w(id, c300) VALUES (3, 'c')", &[])
        .unwrap();
    db.execute("DELETE FROM w WHERE id = 3", &[]).unwrap();
    pull(&replica, &db);
    assert_eq!(dump(&replica, "w"), dump(&db, "w"));
    assert_eq!(dump(&db, "w").len(), 1);
}

/// 62 columns fit one word of an update's column masks; the trigger of a
/// table of 150 still compares in one call, with three words.
#[test]
fn an_update_of_columns_past_the_first_mask_word_records_just_those() {
    let columns: Vec<String> = (0..150).map(|i| format!("c{i}")).collect();
    let schema = format!(
        "CREATE TABLE w(id INTEGER PRIMARY KEY, {})",
        columns.join(", ")
    );
    let db = synced(&schema, "w");
    let replica = synced(&schema, "w");
    db.execute("INSERT INTO w(id, c0) VALUES (1, 'a')", &[])
        .unwrap();
    let cases: [(&str, &[&str]); 3] = [
        ("c0 = 'b'", &["c0"]),
        ("c70 = 'x', c149 = 'y'", &["c70", "c149"]),
        (
            "c1 = 1, c61 = 2, c62 = 3, c124 = 4",
            &["c1", "c61", "c62", "c124"],
        ),
    ];
    for (set, changed) in cases {
        let before = db.db_version();
        db.execute(&format!("UPDATE w SET {set}, c5 = c5"), &[])
            .unwrap();
        let expected: Vec<(&str, &str)> = changed.iter().map(|c| ("Integer(1)", *c)).collect();
        assert_eq!(cells_since(&db, before), cells(&expected), "{set}");
    }
    pull(&replica, &db);
    assert_eq!(dump(&replica, "w"), dump(&db, "w"));
}

#[test]
fn a_deleted_key_inserted_again_comes_back_with_a_longer_causal_length() {
    let db = three_rows();
    db.execute("DELETE FROM t WHERE id = 2", &[]).unwrap();
    let before = db.db_version();
    db.execute("INSERT INTO t VALUES (2, 5, 'again', NULL)", &[])
        .unwrap();
    let changes = db.changes_since(before, None).unwrap().changes;
    assert_eq!(changes.len(), 4, "{changes:?}");
    assert!(changes.iter().all(|c| c.cl == 3), "{changes:?}");
    let replica = synced(T, "t");
    pull(&replica, &db);
    assert_eq!(dump(&replica, "t"), dump(&db, "t"));
}
