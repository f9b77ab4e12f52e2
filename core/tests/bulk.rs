//! Bulk stamps: a transaction that updates many rows the same way is
//! recorded as one entry (`confluo_bulk`) instead of a metadata write per
//! row. Every reader must see the rows exactly as if each had been stamped
//! one by one: the tests run the same writes on a database that records
//! bulk entries and on one that never does, and compare what they export.

mod common;

use std::sync::Arc;

use common::*;
use confluo_core::{Change, Database, ManualTimeSource, Options, TimeSource, Value};
use proptest::prelude::*;

/// A todo replica that records updates of `bulk_rows` rows or more as a
/// bulk entry (`usize::MAX`: never).
fn replica(clock: &Arc<ManualTimeSource>, bulk_rows: usize) -> Database {
    todo_replica_with(Options {
        time: clock.clone(),
        bulk_update_rows: bulk_rows,
        ..Options::default()
    })
}

/// What an export says of each cell, without the site (each database has
/// its own): sorted, so two exports compare as sets.
fn cells(changes: &[Change]) -> Vec<String> {
    let mut out: Vec<String> = changes
        .iter()
        .map(|c| {
            format!(
                "{:?} {:?} {:?} hlc={} cl={} dbv={}",
                c.pk,
                c.column.as_deref(),
                c.value,
                c.hlc.0,
                c.cl,
                c.db_version
            )
        })
        .collect();
    out.sort();
    out
}

fn key(i: usize) -> Value {
    text(&format!("k{i:04}"))
}

fn insert_rows(db: &Database, n: usize) {
    db.write(|tx| {
        let mut stmt = tx.prepare("INSERT INTO todo VALUES (?1, 'title', 'open')")?;
        for i in 0..n {
            stmt.execute(&[(&key(i)).into()])?;
        }
        Ok(())
    })
    .unwrap();
}

/// Every export a peer could ask for (after each db_version) is the same
/// from both databases, and so are the push to a server and the count of
/// rows it would send.
fn assert_read_alike(bulk: &Database, plain: &Database) {
    assert_eq!(bulk.db_version(), plain.db_version());
    for since in 0..=bulk.db_version() {
        assert_exports_alike(bulk, plain, since, "");
        assert_eq!(
            bulk.changes_since(since, None).unwrap().until,
            plain.changes_since(since, None).unwrap().until,
            "since {since}"
        );
    }
    assert_push_alike(bulk, plain);
    assert_eq!(dump(bulk, "todo"), dump(plain, "todo"));
}

/// Checks that `a` and `b` export the same after `since`.
/// The push to a server and the count of rows it would send are the same.
fn assert_push_alike(bulk: &Database, plain: &Database) {
    assert_eq!(
        cells(&bulk.changes_for_server().unwrap().changes),
        cells(&plain.changes_for_server().unwrap().changes),
        "the push"
    );
    assert_eq!(
        bulk.pending_changes().unwrap(),
        plain.pending_changes().unwrap(),
        "pending"
    );
}

fn assert_exports_alike(a: &Database, b: &Database, since: u64, context: &str) {
    assert_eq!(
        cells(&a.changes_since(since, None).unwrap().changes),
        cells(&b.changes_since(since, None).unwrap().changes),
        "{context}, since {since}"
    );
}

#[derive(Clone, Debug)]
enum Op {
    /// `UPDATE todo SET <column> = <value> WHERE <key's number> % m = r`.
    UpdateWhere {
        column: usize,
        value: usize,
        m: usize,
        r: usize,
    },
    UpdateOne {
        key: usize,
        column: usize,
        value: usize,
    },
    /// Both columns at once, every row.
    UpdateBoth {
        value: usize,
    },
    Insert {
        key: usize,
    },
    Delete {
        key: usize,
    },
    /// `DELETE FROM todo WHERE <key's number> % m = r`.
    DeleteWhere {
        m: usize,
        r: usize,
    },
    /// A change of the key: a delete and an insert.
    Rekey {
        from: usize,
        to: usize,
    },
    /// A peer's edit of a row, merged into both, as from a peer or as
    /// pulled from a sync server.
    Remote {
        key: usize,
        column: usize,
        value: usize,
        from_server: bool,
    },
    /// The server accepted every change so far.
    MarkPushed,
    /// Several statements in one transaction.
    Together(Vec<Op>),
    Tick,
}

const KEYS: usize = 48;
const COLUMNS: [&str; 2] = ["title", "status"];
const VALUES: [&str; 3] = ["a", "b", "c"];

fn simple_op() -> impl Strategy<Value = Op> {
    let k = 0..KEYS;
    prop_oneof![
        4 => (0..2usize, 0..3usize, 1..4usize, 0..4usize)
            .prop_map(|(column, value, m, r)| Op::UpdateWhere { column, value, m, r: r % m }),
        3 => (k.clone(), 0..2usize, 0..3usize).prop_map(|(key, column, value)| Op::UpdateOne { key, column, value }),
        1 => (0..3usize).prop_map(|value| Op::UpdateBoth { value }),
        2 => k.clone().prop_map(|key| Op::Insert { key }),
        1 => k.clone().prop_map(|key| Op::Delete { key }),
        1 => (2..5usize, 0..5usize).prop_map(|(m, r)| Op::DeleteWhere { m, r: r % m }),
        1 => (k.clone(), k.clone()).prop_map(|(from, to)| Op::Rekey { from, to }),
        2 => (k, 0..2usize, 0..3usize, any::<bool>())
            .prop_map(|(key, column, value, from_server)| Op::Remote { key, column, value, from_server }),
        1 => Just(Op::MarkPushed),
        1 => Just(Op::Tick),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => simple_op(),
        1 => prop::collection::vec(simple_op(), 2..4).prop_map(Op::Together),
    ]
}

/// The statement `op` runs, if it is one.
fn statement(op: &Op) -> Option<(String, Vec<Value>)> {
    Some(match op {
        Op::UpdateWhere {
            column,
            value,
            m,
            r,
        } => (
            format!(
                "UPDATE todo SET {} = ?1 WHERE CAST(substr(id, 2) AS INTEGER) % ?2 = ?3",
                COLUMNS[*column]
            ),
            vec![
                text(VALUES[*value]),
                Value::Integer(*m as i64),
                Value::Integer(*r as i64),
            ],
        ),
        Op::UpdateOne {
            key: k,
            column,
            value,
        } => (
            format!("UPDATE todo SET {} = ?1 WHERE id = ?2", COLUMNS[*column]),
            vec![text(VALUES[*value]), key(*k)],
        ),
        Op::UpdateBoth { value } => (
            "UPDATE todo SET title = ?1, status = ?1".into(),
            vec![text(VALUES[*value])],
        ),
        Op::Insert { key: k } => (
            "INSERT OR IGNORE INTO todo VALUES (?1, 'new', 'open')".into(),
            vec![key(*k)],
        ),
        Op::Delete { key: k } => ("DELETE FROM todo WHERE id = ?1".into(), vec![key(*k)]),
        Op::DeleteWhere { m, r } => (
            "DELETE FROM todo WHERE CAST(substr(id, 2) AS INTEGER) % ?1 = ?2".into(),
            vec![Value::Integer(*m as i64), Value::Integer(*r as i64)],
        ),
        Op::Rekey { from, to } => (
            "UPDATE OR IGNORE todo SET id = ?1 WHERE id = ?2".into(),
            vec![key(*to), key(*from)],
        ),
        Op::Remote { .. } | Op::MarkPushed | Op::Together(_) | Op::Tick => return None,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// The same writes, on a database that records any update of two rows
    /// or more as a bulk entry and on one that stamps every row, read the
    /// same after every step: every export since every db_version.
    #[test]
    fn bulk_entries_read_exactly_like_rows_stamped_one_by_one(
        ops in prop::collection::vec(op(), 1..24)
    ) {
        let clock = clock();
        let bulk = replica(&clock, 2);
        let plain = replica(&clock, usize::MAX);
        // The peer's clock runs well ahead, and moves at each of its edits:
        // its clocks never equal the others', whose ties the two databases
        // would break by their own (random) site ids.
        let peer_clock = Arc::new(ManualTimeSource::new(clock.now_ms() + 10_000));
        let peer = replica(&peer_clock, usize::MAX);
        for db in [&bulk, &plain, &peer] {
            insert_rows(db, KEYS / 2);
        }
        // What the peer sent so far, and the server's version counter.
        let (mut sent, mut server_version) = (0, 0);
        for op in &ops {
            match op {
                Op::Tick => clock.advance(1),
                Op::MarkPushed => {
                    for db in [&bulk, &plain] {
                        db.mark_pushed(db.db_version()).unwrap();
                    }
                }
                Op::Remote { key: k, column, value, from_server } => {
                    peer_clock.advance(1000);
                    peer.execute(
                        &format!("UPDATE todo SET {} = ?1 WHERE id = ?2", COLUMNS[*column]),
                        &[text(VALUES[*value]), key(*k)],
                    )
                    .unwrap();
                    let changes = peer.changes_since(sent, None).unwrap();
                    sent = peer.db_version();
                    for db in [&bulk, &plain] {
                        if *from_server {
                            server_version += 1;
                            db.apply_from_server(&changes.changes, server_version, None)
                                .unwrap();
                        } else {
                            db.apply(&changes).unwrap();
                        }
                    }
                }
                Op::Together(ops) => {
                    for db in [&bulk, &plain] {
                        db.write(|tx| {
                            for (sql, params) in ops.iter().filter_map(statement) {
                                // A statement may break a constraint (a key
                                // taken): then it changes nothing, on both
                                // databases alike.
                                let _ = tx.execute(&sql, &params);
                            }
                            Ok(())
                        })
                        .unwrap();
                    }
                }
                op => {
                    let (sql, params) = statement(op).expect("one statement");
                    for db in [&bulk, &plain] {
                        let _ = db.execute(&sql, &params);
                    }
                }
            }
            assert_read_alike(&bulk, &plain);
        }
        // And a peer that takes everything from the bulk database ends up
        // like one that takes it from the other.
        let (a, b) = (replica(&clock, usize::MAX), replica(&clock, usize::MAX));
        pull(&a, &bulk);
        pull(&b, &plain);
        prop_assert_eq!(dump(&a, "todo"), dump(&b, "todo"));
    }
}

fn count(db: &Database, sql: &str) -> i64 {
    match &db.query(sql, &[]).unwrap().rows[0][0] {
        Value::Integer(n) => *n,
        other => panic!("not a count: {other:?}"),
    }
}

/// Runs each statement on both databases, one tick apart, and checks that
/// they read alike after each.
fn run_alike(bulk: &Database, plain: &Database, clock: &ManualTimeSource, statements: &[&str]) {
    for sql in statements {
        bulk.execute_batch(sql).unwrap();
        plain.execute_batch(sql).unwrap();
        clock.advance(1);
        for since in [0, bulk.db_version() - 1] {
            assert_exports_alike(bulk, plain, since, sql);
        }
    }
}

/// A database with the default threshold and one that never records
/// entries, each with `rows` rows.
fn default_and_plain(clock: &Arc<ManualTimeSource>, rows: usize) -> (Database, Database) {
    let (bulk, plain) = (
        replica(clock, Options::default().bulk_update_rows),
        replica(clock, usize::MAX),
    );
    for db in [&bulk, &plain] {
        insert_rows(db, rows);
    }
    (bulk, plain)
}

/// A peer's edit of the title of row `id`, the peer having taken every
/// row from `from`: only the edit, so that the rows it took from one
/// database do not tie with another's own clocks, broken by their
/// (random) site ids.
fn peer_edit(clock: &Arc<ManualTimeSource>, from: &Database, id: &str) -> confluo_core::ChangeSet {
    let peer = replica(clock, usize::MAX);
    pull(&peer, from);
    clock.advance(1);
    let before = peer.db_version();
    peer.execute(
        "UPDATE todo SET title = 'theirs' WHERE id = ?1",
        &[text(id)],
    )
    .unwrap();
    peer.changes_since(before, None).unwrap()
}

#[test]
fn an_update_of_many_rows_is_one_entry_instead_of_a_write_per_row() {
    let clock = clock();
    let (bulk, plain) = default_and_plain(&clock, 2000);
    run_alike(&bulk, &plain, &clock, &["UPDATE todo SET status = 'done'"]);
    assert_eq!(count(&bulk, "SELECT count(*) FROM confluo_bulk"), 1);
    let newest = "SELECT max(dbv) FROM confluo_meta_todo";
    assert_eq!(count(&plain, newest), 2, "every row restamped");
    assert_eq!(count(&bulk, newest), 1, "no row restamped");
    // Every row's status goes out, stamped with the update's clock.
    let update = bulk.changes_since(1, None).unwrap().changes;
    assert_eq!(update.len(), 2000);
    assert!(update
        .iter()
        .all(|c| c.column.as_deref() == Some("status") && c.hlc == bulk.current_hlc()));

    // The same update again covers the first entry: it goes unfolded.
    run_alike(&bulk, &plain, &clock, &["UPDATE todo SET status = 'open'"]);
    assert_eq!(count(&bulk, "SELECT count(*) FROM confluo_bulk"), 1);
    // Updates of other rows and columns add entries, up to four; the fifth
    // folds the oldest into its rows.
    run_alike(
        &bulk,
        &plain,
        &clock,
        &[
            "UPDATE todo SET title = 'a' WHERE id < 'k1500'",
            "UPDATE todo SET status = 'b' WHERE id >= 'k0500'",
            "UPDATE todo SET title = 'c' WHERE id >= 'k0800'",
        ],
    );
    assert_eq!(count(&bulk, "SELECT count(*) FROM confluo_bulk"), 4);
    run_alike(
        &bulk,
        &plain,
        &clock,
        &["UPDATE todo SET title = 'd', status = 'd' WHERE id < 'k1200'"],
    );
    assert_eq!(count(&bulk, "SELECT count(*) FROM confluo_bulk"), 4);
    assert!(
        count(&bulk, "SELECT max(dbv) FROM confluo_meta_todo") > 1,
        "the oldest entry was written into its rows"
    );
    // Single edits of rows the entries hold, local and merged.
    let theirs = peer_edit(&clock, &plain, "k0007");
    for db in [&bulk, &plain] {
        assert_eq!(db.apply(&theirs).unwrap().applied, 1);
    }
    run_alike(
        &bulk,
        &plain,
        &clock,
        &[
            "UPDATE todo SET status = 'mine' WHERE id = 'k0007'",
            "DELETE FROM todo WHERE id = 'k0008'",
        ],
    );
    for since in 0..=bulk.db_version() {
        assert_exports_alike(&bulk, &plain, since, "at the end");
    }
}

#[test]
fn a_sparse_bulk_update_finds_its_rows_past_long_gaps() {
    let clock = clock();
    let options = |bulk_update_rows| Options {
        time: clock.clone(),
        bulk_update_rows,
        ..Options::default()
    };
    let (bulk, plain) = (
        todo_replica_with(options(40)),
        todo_replica_with(options(usize::MAX)),
    );
    for db in [&bulk, &plain] {
        insert_rows(db, 4000);
    }
    // About 60 rows of 4000: ids far apart in the metadata's order.
    run_alike(
        &bulk,
        &plain,
        &clock,
        &["UPDATE todo SET status = 'done' WHERE CAST(substr(id, 2) AS INTEGER) % 64 = 5"],
    );
    assert_eq!(count(&bulk, "SELECT count(*) FROM confluo_bulk"), 1);
}

#[test]
fn bulk_entries_go_with_the_metadata_they_stand_for() {
    let clock = clock();
    let db = replica(&clock, 2);
    insert_rows(&db, 10);
    db.execute("UPDATE todo SET status = 'done'", &[]).unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM confluo_bulk"), 1);
    db.sign_out_and_clear().unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM confluo_bulk"), 0);
    assert!(db.changes_since(0, None).unwrap().changes.is_empty());
}

/// Two handles on one file in `dir`, with the todo table synced, that
/// record updates of `bulk_rows` rows or more as an entry.
fn two_handles(
    dir: &std::path::Path,
    clock: &Arc<ManualTimeSource>,
    bulk_rows: usize,
) -> (Database, Database) {
    let path = dir.join("shared.db");
    let options = || Options {
        time: clock.clone(),
        bulk_update_rows: bulk_rows,
        ..Options::default()
    };
    let a = Database::open_with(&path, options()).unwrap();
    a.execute_batch(TODO_SCHEMA).unwrap();
    a.enable_sync("todo").unwrap();
    let b = Database::open_with(&path, options()).unwrap();
    (a, b)
}

#[test]
fn two_handles_on_one_file_read_each_other_s_entries() {
    let clock = clock();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_handles(dir.path(), &clock, 2);
    let plain = replica(&clock, usize::MAX);
    insert_rows(&a, 30);
    insert_rows(&plain, 30);
    let statements = [
        "UPDATE todo SET status = 'a'",
        "UPDATE todo SET title = 'b' WHERE id < 'k0020'",
        "UPDATE todo SET status = 'c' WHERE id > 'k0010'",
        "UPDATE todo SET title = 'd' WHERE id > 'k0005'",
        "UPDATE todo SET status = 'e' WHERE id < 'k0015'",
        "UPDATE todo SET title = 'f' WHERE id = 'k0003'",
    ];
    for (i, sql) in statements.iter().enumerate() {
        // The handles take turns: each reads entries the other wrote,
        // folded or dropped since it last looked.
        let writer = if i % 2 == 0 { &a } else { &b };
        writer.execute_batch(sql).unwrap();
        plain.execute_batch(sql).unwrap();
        clock.advance(1);
        for handle in [&a, &b] {
            assert_exports_alike(handle, &plain, 0, sql);
        }
    }
}

/// Databases of formats 3 (no `confluo_bulk`) and 4 (entries of updates
/// only) open as format 5 and record entries of updates and deletes; a
/// newer format is refused, as a build of format 4 refuses format 5 (it
/// would take delete entries for updates of no column).
#[test]
fn databases_of_formats_3_and_4_open_and_record_bulk_entries() {
    for (format, bulk_table) in [
        (3, ""),
        (
            4,
            "CREATE TABLE confluo_bulk(id INTEGER PRIMARY KEY, tbl INTEGER NOT NULL, \
             tag INTEGER NOT NULL, dbv INTEGER NOT NULL, hlc INTEGER NOT NULL, \
             masks BLOB NOT NULL, ids BLOB NOT NULL);",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("older.db");
        let db = Database::open(&path).unwrap();
        db.execute_batch(TODO_SCHEMA).unwrap();
        db.enable_sync("todo").unwrap();
        insert_rows(&db, 5);
        db.close().unwrap();
        let raw = rusqlite::Connection::open(&path).unwrap();
        raw.execute_batch(&format!(
            "DROP TABLE confluo_bulk; {bulk_table} \
             UPDATE confluo_state SET value = {format} WHERE key = 'format';"
        ))
        .unwrap();
        drop(raw);
        let db = Database::open_with(
            &path,
            Options {
                bulk_update_rows: 2,
                ..Options::default()
            },
        )
        .unwrap();
        db.execute("UPDATE todo SET status = 'done'", &[]).unwrap();
        db.execute("DELETE FROM todo WHERE id < 'k0003'", &[])
            .unwrap();
        assert_eq!(
            count(&db, "SELECT count(*) FROM confluo_bulk WHERE deletes"),
            1,
            "format {format}"
        );
        assert_eq!(
            count(&db, "SELECT value FROM confluo_state WHERE key = 'format'"),
            5
        );
        db.close().unwrap();
        let raw = rusqlite::Connection::open(&path).unwrap();
        raw.execute(
            "UPDATE confluo_state SET value = 6 WHERE key = 'format'",
            [],
        )
        .unwrap();
        drop(raw);
        let err = Database::open(&path)
            .err()
            .expect("a newer format is refused");
        assert!(err.to_string().contains("newer than this build"), "{err}");
    }
}

/// A table `t(k PRIMARY KEY NOT NULL, a TEXT, b TEXT)`, synced, with rows
/// 1, 2 and 3.
fn numbered(clock: &Arc<ManualTimeSource>, bulk_rows: usize) -> Database {
    let db = Database::open_in_memory_with(Options {
        time: clock.clone(),
        bulk_update_rows: bulk_rows,
        ..Options::default()
    })
    .unwrap();
    db.execute_batch("CREATE TABLE t(k PRIMARY KEY NOT NULL, a TEXT, b TEXT)")
        .unwrap();
    db.enable_sync("t").unwrap();
    db.execute_batch("INSERT INTO t VALUES (1, 'a', 'b'), (2, 'a', 'b'), (3, 'a', 'b')")
        .unwrap();
    db
}

/// Checks what `assert_read_alike` does, for table `t`.
fn assert_t_alike(bulk: &Database, plain: &Database) {
    for since in 0..=bulk.db_version() {
        assert_exports_alike(bulk, plain, since, "t");
    }
    assert_push_alike(bulk, plain);
}

/// SQLite calls keys 1 and 1.0 one row: an UPDATE that only turns a key
/// into a real is no key change. Both spellings in one transaction are one
/// row's writes, in one entry or none (an entry naming a row twice would be
/// unreadable; a row in an entry and also written one by one at the same
/// db_version would lose the entry's stamps).
#[test]
fn one_row_under_two_key_spellings_in_one_transaction_is_one_row() {
    for second in [
        "UPDATE t SET k = k * 1.0, a = 'y'",
        "UPDATE t SET k = 1.0, b = 'y' WHERE k = 1",
    ] {
        let clock = clock();
        let (bulk, plain) = (numbered(&clock, 2), numbered(&clock, usize::MAX));
        clock.advance(1);
        for db in [&bulk, &plain] {
            db.write(|tx| {
                tx.execute("UPDATE t SET a = 'x'", &[])?;
                tx.execute(second, &[])?;
                Ok(())
            })
            .unwrap();
        }
        assert_t_alike(&bulk, &plain);
        bulk.execute("UPDATE t SET a = 'z' WHERE k = 1", &[])
            .unwrap();
        plain
            .execute("UPDATE t SET a = 'z' WHERE k = 1", &[])
            .unwrap();
        assert_t_alike(&bulk, &plain);
    }
}

/// A row an entry holds counts as pending as long as the entry is newer
/// than the last push, as the row would with its own metadata rewritten,
/// even once the entry's column is dropped.
#[test]
fn pending_counts_rows_of_an_unsent_entry_whatever_its_columns_became() {
    let clock = clock();
    let (bulk, plain) = (numbered(&clock, 2), numbered(&clock, usize::MAX));
    clock.advance(1);
    for db in [&bulk, &plain] {
        db.mark_pushed(db.db_version()).unwrap();
        db.execute("UPDATE t SET b = 'x'", &[]).unwrap();
        db.alter_synced_table("t", "ALTER TABLE t DROP COLUMN b")
            .unwrap();
    }
    assert_eq!(bulk.pending_changes().unwrap(), 3);
    assert_t_alike(&bulk, &plain);
}

/// An entry written by a transaction whose commit then failed is never
/// read again, even when another handle on the file writes the next one
/// in the same millisecond: same db_version, same clock, same row number.
#[test]
fn an_entry_of_a_transaction_that_failed_to_commit_is_never_read() {
    let clock = clock();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_handles(dir.path(), &clock, 1);
    a.execute_batch(
        "CREATE TABLE p(id TEXT PRIMARY KEY);
         CREATE TABLE c(x TEXT REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED);",
    )
    .unwrap();
    insert_rows(&a, 10);
    clock.advance(1);
    let failed = a.write(|tx| {
        // Two entries: recording the second reads the first.
        tx.execute("UPDATE todo SET title = 'x' WHERE id = 'k0000'", &[])?;
        tx.execute("UPDATE todo SET status = 'y' WHERE id = 'k0001'", &[])?;
        tx.execute("INSERT INTO c VALUES ('no such parent')", &[])?;
        Ok(())
    });
    assert!(failed.is_err(), "the deferred foreign key fails the commit");
    b.execute("UPDATE todo SET status = 'z' WHERE id = 'k0005'", &[])
        .unwrap();
    for since in 0..=b.db_version() {
        assert_exports_alike(&a, &b, since, "two handles");
    }
}

#[test]
fn a_delete_of_many_rows_is_one_entry_and_a_row_inserted_again_comes_back_to_life() {
    let clock = clock();
    let (bulk, plain) = default_and_plain(&clock, 3000);
    // A peer's edit of a row that is deleted here meanwhile.
    let theirs = peer_edit(&clock, &plain, "k0005");
    clock.advance(1);
    run_alike(
        &bulk,
        &plain,
        &clock,
        &["DELETE FROM todo WHERE id < 'k1500'"],
    );
    assert_eq!(
        count(&bulk, "SELECT count(*) FROM confluo_bulk WHERE deletes"),
        1
    );
    assert_eq!(
        count(&bulk, "SELECT max(dbv) FROM confluo_meta_todo"),
        1,
        "no row's metadata was written"
    );
    let deleted = bulk.changes_since(bulk.db_version() - 1, None).unwrap();
    assert_eq!(deleted.changes.len(), 1500);
    assert!(deleted
        .changes
        .iter()
        .all(|c| c.column.is_none() && c.cl == 2));
    for db in [&bulk, &plain] {
        db.apply(&theirs).unwrap();
    }
    run_alike(
        &bulk,
        &plain,
        &clock,
        &[
            "INSERT INTO todo VALUES ('k0007', 'again', 'open')",
            "UPDATE todo SET status = 'done' WHERE id >= 'k1400'",
        ],
    );
    let again = bulk.changes_since(0, None).unwrap().changes;
    assert!(again
        .iter()
        .any(|c| c.pk[0] == text("k0007") && c.column.is_none() && c.cl == 3));
    for since in 0..=bulk.db_version() {
        assert_exports_alike(&bulk, &plain, since, "at the end");
    }
    assert_eq!(dump(&bulk, "todo"), dump(&plain, "todo"));
}
