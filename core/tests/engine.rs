//! The engine's behaviour beyond the reference scenarios: values, schemas,
//! capture, atomicity, observers, forward compatibility.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use confluo_core::{
    Change, ChangeSet, Database, Error, Hlc, ManualTimeSource, Options, TimeSource, Value, ValueRef,
};

fn synced(sql: &str, table: &str) -> Database {
    let db = Database::open_in_memory().unwrap();
    db.execute_batch(sql).unwrap();
    db.enable_sync(table).unwrap();
    db
}

#[test]
fn values_round_trip_exactly_through_export_and_apply() {
    let schema = "CREATE TABLE vals(id INTEGER PRIMARY KEY, v)";
    let (src, dst) = (synced(schema, "vals"), synced(schema, "vals"));
    let values = vec![
        Value::Integer(i64::MIN),
        Value::Integer(i64::MAX),
        Value::Integer(0),
        Value::Real(-0.0),
        Value::Real(f64::from_bits(1)), // the smallest subnormal
        Value::Real(f64::MIN_POSITIVE / 3.0),
        Value::Real(f64::INFINITY),
        Value::Real(f64::NEG_INFINITY),
        Value::Real(f64::MAX),
        Value::Real(0.1),
        Value::Blob(vec![]),
        Value::Blob((0..=255).collect()),
        Value::Text(String::new()),
        Value::Text("naïve café, 日本語, emoji 🚀, and \"quotes\"; DROP TABLE vals; --".into()),
        Value::Null,
    ];
    src.write(|tx| {
        for (i, v) in values.iter().enumerate() {
            tx.execute(
                "INSERT INTO vals VALUES (?1, ?2)",
                &[Value::Integer(i as i64), v.clone()],
            )?;
        }
        Ok(())
    })
    .unwrap();
    // What SQLite kept on the source...
    let kept: Vec<Value> = dump(&src, "vals")
        .into_iter()
        .map(|r| r[1].clone())
        .collect();
    assert_eq!(kept[..3], values[..3]);
    assert_eq!(kept[4..], values[4..], "SQLite keeps these bit for bit");
    // ... arrives bit for bit (Value's equality compares f64 bits).
    pull(&dst, &src);
    assert_eq!(dump(&dst, "vals"), dump(&src, "vals"));
}

#[test]
fn composite_keys_of_every_type() {
    let schema =
        "CREATE TABLE m(a INTEGER NOT NULL, b TEXT NOT NULL, c BLOB NOT NULL, d REAL NOT NULL, x, \
                  PRIMARY KEY (a, b, c, d))";
    let (src, dst) = (synced(schema, "m"), synced(schema, "m"));
    src.execute(
        "INSERT INTO m VALUES (?1, ?2, ?3, ?4, 'one')",
        &[
            Value::Integer(-7),
            text("ключ"),
            Value::Blob(vec![0, 1, 2]),
            Value::Real(2.5),
        ],
    )
    .unwrap();
    src.execute("INSERT INTO m VALUES (1, 'b', x'ff', 0.5, 'two')", &[])
        .unwrap();
    pull(&dst, &src);
    assert_eq!(dump(&dst, "m"), dump(&src, "m"));
    // Changing part of a composite key is a delete plus an insert.
    src.execute("UPDATE m SET b = 'moved' WHERE a = 1", &[])
        .unwrap();
    src.execute("UPDATE m SET x = 'edited' WHERE a = -7", &[])
        .unwrap();
    pull(&dst, &src);
    assert_eq!(dump(&dst, "m"), dump(&src, "m"));
    assert_eq!(dump(&dst, "m").len(), 2);
}

#[test]
fn a_first_export_reads_every_row_of_a_key_column_of_mixed_types() {
    // A first export reads the metadata and the table side by side in key
    // order: numbers, then text, then blobs; rows are inserted out of that
    // order, so the table's rowids do not follow it.
    let schema = "CREATE TABLE anyk(k PRIMARY KEY NOT NULL, v)";
    let (src, dst) = (synced(schema, "anyk"), synced(schema, "anyk"));
    let keys = [
        text("b"),
        Value::Integer(3),
        Value::Blob(vec![0]),
        Value::Real(2.5),
        text(""),
        Value::Integer(-5),
        Value::Blob(vec![]),
        text("A"),
        Value::Real(-0.5),
        Value::Integer(i64::MAX),
        text("a"),
        Value::Real(1e300),
    ];
    for (i, k) in keys.iter().enumerate() {
        src.execute(
            "INSERT INTO anyk VALUES (?1, ?2)",
            &[k.clone(), text(&format!("v{i}"))],
        )
        .unwrap();
    }
    src.execute("DELETE FROM anyk WHERE k IN ('A', 2.5, x'00')", &[])
        .unwrap();
    src.execute("UPDATE anyk SET v = NULL WHERE k = 3", &[])
        .unwrap();
    pull(&dst, &src);
    assert_eq!(dump(&dst, "anyk").len(), keys.len() - 3);
    assert_eq!(dump(&dst, "anyk"), dump(&src, "anyk"));
}

#[test]
fn integer_and_real_keys_beyond_2_pow_53_keep_their_own_values() {
    // 2^53 as a real and 2^53 + 1 as an integer are two keys to SQLite, and
    // one number in floating point. a writes one, c the other.
    let schema = "CREATE TABLE anyk(k PRIMARY KEY NOT NULL, v)";
    let (a, b, c) = (
        synced(schema, "anyk"),
        synced(schema, "anyk"),
        synced(schema, "anyk"),
    );
    let big = 1i64 << 53;
    a.execute(
        "INSERT INTO anyk VALUES (?1, 'from a')",
        &[Value::Real(big as f64)],
    )
    .unwrap();
    c.execute(
        "INSERT INTO anyk VALUES (?1, 'from c')",
        &[Value::Integer(big + 1)],
    )
    .unwrap();
    b.execute(
        "INSERT INTO anyk VALUES (?1, 'max'), (?2, '2^63')",
        &[Value::Integer(i64::MAX), Value::Real(2f64.powi(63))],
    )
    .unwrap();
    pull(&b, &a);
    pull(&b, &c);
    assert_eq!(dump(&b, "anyk").len(), 4);
    // b's first export to each: everything, a's own cells left out for a.
    pull(&a, &b);
    pull(&c, &b);
    assert_eq!(dump(&a, "anyk"), dump(&b, "anyk"));
    assert_eq!(dump(&c, "anyk"), dump(&b, "anyk"));
}

#[test]
fn a_key_converted_by_its_column_s_affinity_keeps_its_row_s_values() {
    // A peer with an untyped key column sends 5 and '7'; here the key
    // columns convert them ('5' in a TEXT column, 7 in an INTEGER PRIMARY
    // KEY). Both the first export (everything) and a later one find the
    // rows' values.
    for (typed, sent) in [("TEXT", "5"), ("INTEGER", "'7'")] {
        let untyped = "CREATE TABLE kv(k PRIMARY KEY NOT NULL, v)";
        let schema = format!("CREATE TABLE kv(k {typed} PRIMARY KEY NOT NULL, v)");
        let (a, b, c) = (
            synced(untyped, "kv"),
            synced(&schema, "kv"),
            synced(&schema, "kv"),
        );
        a.execute(&format!("INSERT INTO kv VALUES ({sent}, 'x')"), &[])
            .unwrap();
        pull(&b, &a);
        pull(&c, &b);
        assert_eq!(dump(&c, "kv"), dump(&b, "kv"), "{typed}: a first export");
        a.execute(&format!("UPDATE kv SET v = 'y' WHERE k = {sent}"), &[])
            .unwrap();
        pull(&b, &a);
        pull(&c, &b);
        assert_eq!(dump(&b, "kv")[0][1], text("y"), "{typed}");
        assert_eq!(dump(&c, "kv"), dump(&b, "kv"), "{typed}: a later export");
    }
}

#[test]
fn a_utf16_database_exports_every_row_of_a_text_key() {
    // SQLite orders a UTF-16 database's text by its UTF-16 bytes: 'Ā'
    // (U+0100) comes before 'a' there, after it in UTF-8.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("utf16.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(
            "PRAGMA encoding = 'UTF-16le'; CREATE TABLE kv(k TEXT PRIMARY KEY NOT NULL, v);",
        )
        .unwrap();
    let src = Database::open(&path).unwrap();
    src.enable_sync("kv").unwrap();
    let dst = synced("CREATE TABLE kv(k TEXT PRIMARY KEY NOT NULL, v)", "kv");
    for (k, v) in [("a", "one"), ("\u{100}", "two"), ("z", "three")] {
        src.execute("INSERT INTO kv VALUES (?1, ?2)", &[text(k), text(v)])
            .unwrap();
    }
    pull(&dst, &src);
    let values = |db: &Database| {
        db.query("SELECT k, v FROM kv ORDER BY v", &[])
            .unwrap()
            .rows
    };
    assert_eq!(values(&dst), values(&src));
    assert!(values(&dst).iter().all(|r| r[1] != Value::Null));
}

#[test]
fn an_applied_row_may_not_bring_a_value_larger_than_sync_carries() {
    // This replica's table has a column the sender's has not, whose default
    // is larger than sync carries: a row the apply would make with it is
    // refused, as the same row written here is.
    let small = || Options {
        max_value_bytes: 16,
        ..Options::default()
    };
    let src = Database::open_in_memory_with(small()).unwrap();
    src.execute_batch("CREATE TABLE t(k TEXT PRIMARY KEY NOT NULL, a)")
        .unwrap();
    src.enable_sync("t").unwrap();
    let dst = Database::open_in_memory_with(small()).unwrap();
    dst.execute_batch(
        "CREATE TABLE t(k TEXT PRIMARY KEY NOT NULL, a, big DEFAULT 'forty bytes of default text, far too big')",
    )
    .unwrap();
    dst.enable_sync("t").unwrap();
    assert!(dst
        .execute("INSERT INTO t(k, a) VALUES ('local', 1)", &[])
        .is_err());
    src.execute("INSERT INTO t VALUES ('r', 1)", &[]).unwrap();
    let cs = src.changes_for_peer(dst.site_id(), 0).unwrap();
    assert!(dst.apply(&cs).is_err());
    assert!(dump(&dst, "t").is_empty());
}

#[test]
fn without_rowid_tables_sync_too() {
    let schema = "CREATE TABLE kv(k TEXT PRIMARY KEY, v) WITHOUT ROWID";
    let (src, dst) = (synced(schema, "kv"), synced(schema, "kv"));
    src.execute("INSERT INTO kv VALUES ('a', 1), ('b', 2)", &[])
        .unwrap();
    pull(&dst, &src);
    assert_eq!(
        dump(&dst, "kv"),
        vec![
            vec![text("a"), Value::Integer(1)],
            vec![text("b"), Value::Integer(2)]
        ]
    );
}

#[test]
fn enable_sync_lists_every_problem_at_once() {
    let db = Database::open_in_memory().unwrap();
    db.execute_batch(
        "PRAGMA foreign_keys = ON;
         CREATE TABLE parent(id TEXT PRIMARY KEY NOT NULL);
         CREATE TABLE bad(id TEXT PRIMARY KEY, email TEXT UNIQUE, name TEXT NOT NULL, p TEXT REFERENCES parent(id));
         CREATE TABLE nokey(a, b);",
    )
    .unwrap();
    let err = db.enable_sync("bad").unwrap_err();
    let Error::Schema { table, problems } = &err else {
        panic!("{err}")
    };
    assert_eq!(table, "bad");
    let all = problems.join("\n");
    for expected in [
        "allows NULL",
        "\"name\" is NOT NULL without a DEFAULT",
        "unique index",
        "foreign key",
    ] {
        assert!(all.contains(expected), "{expected:?} missing from {all}");
    }
    assert_eq!(problems.len(), 4, "{all}");
    let err = db.enable_sync("nokey").unwrap_err().to_string();
    assert!(err.contains("no explicit PRIMARY KEY"), "{err}");
    assert!(db
        .enable_sync("missing")
        .unwrap_err()
        .to_string()
        .contains("no such table"));
    // Nothing was half-installed: the tables still take writes from anyone.
    assert!(db.synced_tables().is_empty());
    db.execute("INSERT INTO nokey VALUES (1, 2)", &[]).unwrap();
}

#[test]
fn rows_present_before_sync_become_changes() {
    let db = Database::open_in_memory().unwrap();
    db.execute_batch(TODO_SCHEMA).unwrap();
    db.execute(
        "INSERT INTO todo VALUES ('old', 'written before sync', 'open')",
        &[],
    )
    .unwrap();
    db.enable_sync("todo").unwrap();
    let peer = synced(TODO_SCHEMA, "todo");
    pull(&peer, &db);
    assert_eq!(dump(&peer, "todo"), dump(&db, "todo"));
}

#[test]
fn a_write_without_confluo_functions_fails_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let db = Database::open(&path).unwrap();
    db.execute_batch(TODO_SCHEMA).unwrap();
    db.enable_sync("todo").unwrap();
    db.execute("INSERT INTO todo VALUES ('t1', 'tracked', 'open')", &[])
        .unwrap();

    let raw = rusqlite::Connection::open(&path).unwrap();
    for sql in [
        "INSERT INTO todo VALUES ('t2', 'sneaky', 'open')",
        "UPDATE todo SET title = 'sneaky'",
        "DELETE FROM todo",
    ] {
        let err = raw.execute(sql, []).unwrap_err().to_string();
        assert!(err.contains("no such function: confluo_"), "{sql}: {err}");
    }
    drop(raw);
    assert_eq!(
        dump(&db, "todo"),
        vec![vec![text("t1"), text("tracked"), text("open")]]
    );
}

#[test]
fn transaction_control_in_app_sql_is_refused() {
    let db = synced(TODO_SCHEMA, "todo");
    for sql in [
        "BEGIN",
        "COMMIT",
        "  -- note\n rollback",
        "SAVEPOINT s",
        "RELEASE s",
        "/* x */ END",
    ] {
        let err = db.execute(sql, &[]).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{sql}: {err}");
    }
    let err = db
        .execute_batch("INSERT INTO todo VALUES ('a', 'x', 'y'); COMMIT; BEGIN;")
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert!(
        dump(&db, "todo").is_empty(),
        "the batch was rolled back whole"
    );
}

#[test]
fn a_failed_statement_leaves_no_trace_in_the_metadata() {
    let db = synced(TODO_SCHEMA, "todo");
    db.execute_batch("CREATE TABLE src(id TEXT)").unwrap();
    db.execute("INSERT INTO src VALUES ('n1'), ('n2'), ('k1')", &[])
        .unwrap();
    let tx = db.transaction().unwrap();
    tx.execute("INSERT INTO todo VALUES ('k1', 'first', 'open')", &[])
        .unwrap();
    // Fails on the duplicate key: SQLite undoes the statement, and Confluo
    // forgets what it had captured of it.
    assert!(tx
        .execute("INSERT INTO todo VALUES ('k1', 'again', 'open')", &[])
        .is_err());
    assert!(tx
        .execute("INSERT INTO todo(id) SELECT id FROM src", &[])
        .is_err());
    tx.execute("INSERT INTO todo VALUES ('k2', 'second', 'open')", &[])
        .unwrap();
    tx.commit().unwrap();
    let cs = db.changes_since(0, None).unwrap();
    let mut keys: Vec<&str> = cs
        .changes
        .iter()
        .filter(|c| c.column.is_none())
        .map(|c| c.pk[0].as_str().unwrap())
        .collect();
    keys.sort();
    assert_eq!(keys, vec!["k1", "k2"]);
    let peer = synced(TODO_SCHEMA, "todo");
    pull(&peer, &db);
    assert_eq!(dump(&peer, "todo"), dump(&db, "todo"));
}

#[test]
fn a_prepared_statement_runs_for_many_rows_and_every_row_syncs() {
    let db = synced(TODO_SCHEMA, "todo");
    let ids: Vec<String> = (0..5).map(|i| format!("k{i}")).collect();
    let selected = db
        .write(|tx| {
            let mut insert = tx.prepare("INSERT INTO todo VALUES (?1, ?2, ?3)")?;
            for id in &ids {
                assert_eq!(
                    insert.execute(&[id.into(), "title".into(), None::<&str>.into()])?,
                    1
                );
            }
            let mut update = tx.prepare("UPDATE todo SET status = ?1 WHERE id = ?2")?;
            assert_eq!(update.execute(&["done".into(), (&ids[1]).into()])?, 1);
            assert_eq!(update.execute(&["done".into(), "absent".into()])?, 0);
            let mut delete = tx.prepare("DELETE FROM todo WHERE id = ?1")?;
            delete.execute(&[(&ids[4]).into()])?;
            // A query in the transaction sees its own writes.
            let mut select = tx.prepare("SELECT id FROM todo WHERE status = ?1")?;
            select.query(&[ValueRef::Text("done")])
        })
        .unwrap();
    assert_eq!(selected.rows, vec![vec![text("k1")]]);
    assert_eq!(dump(&db, "todo").len(), 4);
    let peer = synced(TODO_SCHEMA, "todo");
    pull(&peer, &db);
    assert_eq!(dump(&peer, "todo"), dump(&db, "todo"));
    assert_eq!(dump(&peer, "todo")[1][2], text("done"));
}

#[test]
fn a_prepared_statement_refuses_bad_input_and_changes_nothing() {
    let db = synced(TODO_SCHEMA, "todo");
    let tx = db.transaction().unwrap();
    for sql in ["BEGIN", " /* x */ commit", "SAVEPOINT s"] {
        let err = tx.prepare(sql).err().expect("refused");
        assert!(matches!(err, Error::InvalidInput(_)), "{sql}: {err}");
    }
    assert!(
        tx.prepare("INSERT INTO todo(id) VALUES ('a'); COMMIT")
            .is_err(),
        "one statement only"
    );
    let mut insert = tx.prepare("INSERT INTO todo VALUES (?1, ?2, ?3)").unwrap();
    for params in [&["k1".into(), "t".into()][..], &["k1".into(); 4][..], &[]] {
        let err = insert.execute(params).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    }
    let err = tx
        .execute("INSERT INTO todo VALUES (?1, ?2, ?3)", &[text("k9")])
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput(_)),
        "by SQL text too: {err}"
    );
    insert
        .execute(&["k1".into(), "t".into(), "open".into()])
        .unwrap();
    // A failing run (a duplicate key) leaves the statement usable.
    assert!(insert
        .execute(&["k1".into(), "t".into(), "open".into()])
        .is_err());
    insert
        .execute(&["k2".into(), "t".into(), "open".into()])
        .unwrap();
    drop(insert);
    tx.commit().unwrap();
    assert_eq!(dump(&db, "todo").len(), 2);
    let peer = synced(TODO_SCHEMA, "todo");
    pull(&peer, &db);
    assert_eq!(dump(&peer, "todo"), dump(&db, "todo"));
}

#[test]
fn borrowed_values_bind_as_their_owned_counterparts() {
    let db = synced("CREATE TABLE vals(id INTEGER PRIMARY KEY, v)", "vals");
    let values = [
        Value::Null,
        Value::Integer(i64::MIN),
        Value::Real(-0.0),
        Value::Text("naïve".into()),
        Value::Blob(vec![0, 255]),
    ];
    db.write(|tx| {
        let mut insert = tx.prepare("INSERT INTO vals VALUES (?1, ?2)")?;
        for (i, v) in values.iter().enumerate() {
            insert.execute(&[(i as i64).into(), v.into()])?;
        }
        Ok(())
    })
    .unwrap();
    let kept: Vec<Value> = dump(&db, "vals")
        .into_iter()
        .map(|r| r[1].clone())
        .collect();
    assert_eq!(kept, values);
    let back: Vec<Value> = values.iter().map(|v| ValueRef::from(v).into()).collect();
    assert_eq!(back, values);
}

#[test]
fn dropping_a_transaction_rolls_it_back() {
    let db = synced(TODO_SCHEMA, "todo");
    {
        let tx = db.transaction().unwrap();
        tx.execute("INSERT INTO todo VALUES ('k1', 'x', 'y')", &[])
            .unwrap();
    }
    let r: Result<(), Error> = db.write(|tx| {
        tx.execute("INSERT INTO todo VALUES ('k2', 'x', 'y')", &[])?;
        Err(Error::InvalidInput("changed my mind".into()))
    });
    assert!(r.is_err());
    assert!(dump(&db, "todo").is_empty());
    assert!(db.changes_since(0, None).unwrap().is_empty());
    assert_eq!(db.db_version(), 0);
}

#[test]
fn changes_travel_through_a_peer_and_never_echo_back() {
    let clock = clock();
    let (a, b, c) = (
        todo_replica(&clock),
        todo_replica(&clock),
        todo_replica(&clock),
    );
    a.execute("INSERT INTO todo VALUES ('t1', 'from a', 'open')", &[])
        .unwrap();
    pull(&b, &a);
    // B forwards A's change to C...
    pull(&c, &b);
    assert_eq!(dump(&c, "todo"), dump(&a, "todo"));
    // ... but offers none of it back to A.
    let back = b
        .changes_for_peer(a.site_id(), b.seen_version(a.site_id()).unwrap())
        .unwrap();
    assert!(back.is_empty(), "{back:?}");
    // A set made for B, applied at C, does not move C's cursor for A.
    clock.advance(5);
    a.execute("INSERT INTO todo VALUES ('t2', 'second', 'open')", &[])
        .unwrap();
    let for_b = a.changes_for_peer(b.site_id(), 0).unwrap();
    c.apply(&for_b).unwrap();
    assert_eq!(c.seen_version(a.site_id()).unwrap(), 0);
}

#[test]
fn bad_change_sets_are_refused_whole_and_change_nothing() {
    let clock = clock();
    let source = todo_replica(&clock);
    source
        .write(|tx| {
            for i in 0..20 {
                tx.execute(
                    "INSERT INTO todo VALUES (?1, 'title', 'open')",
                    &[text(&format!("s{i:02}"))],
                )?;
            }
            Ok(())
        })
        .unwrap();
    let target = todo_replica(&clock);
    target
        .execute("INSERT INTO todo VALUES ('mine', 'keep me', 'open')", &[])
        .unwrap();
    target
        .execute_batch("CREATE TABLE typed(id TEXT PRIMARY KEY NOT NULL, n INTEGER) STRICT")
        .unwrap();
    target.enable_sync("typed").unwrap();
    let before = digest(&target);
    let good = source.changes_since(0, None).unwrap();
    assert!(good.len() >= 60);

    // Each case: the good set with its last change made hostile.
    type Mutation = Box<dyn Fn(&mut Change)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "quoted table name",
            Box::new(|c| c.table = "todo\"; DROP TABLE todo; --".into()),
        ),
        (
            "sql as table name",
            Box::new(|c| c.table = "x; DELETE FROM todo".into()),
        ),
        (
            "reserved table",
            Box::new(|c| c.table = "sqlite_schema".into()),
        ),
        (
            "metadata table",
            Box::new(|c| c.table = "confluo_sites".into()),
        ),
        (
            "quoted column",
            Box::new(|c| c.column = Some("title\" = 'x'; --".into())),
        ),
        (
            "key arity",
            Box::new(|c| c.pk = vec![text("a"), text("b")].into()),
        ),
        ("null key", Box::new(|c| c.pk = vec![Value::Null].into())),
        (
            "marker with value",
            Box::new(|c| {
                c.column = None;
                c.value = text("x");
            }),
        ),
        (
            "column of a deleted row",
            Box::new(|c| {
                c.column = Some("title".into());
                c.cl = 2;
            }),
        ),
        ("causal length 0", Box::new(|c| c.cl = 0)),
        (
            "causal length near overflow",
            Box::new(|c| c.cl = i64::MAX as u64),
        ),
        ("causal length beyond i64", Box::new(|c| c.cl = u64::MAX)),
        ("clock 0", Box::new(|c| c.hlc = Hlc(0))),
        (
            "oversized value",
            Box::new(|c| {
                c.column = Some("title".into());
                c.value = Value::Blob(vec![0; (1 << 20) + 1]);
            }),
        ),
        (
            "NaN",
            Box::new(|c| {
                c.column = Some("title".into());
                c.value = Value::Real(f64::NAN);
            }),
        ),
        (
            "wrong type for a STRICT column",
            Box::new(|c| {
                c.table = "typed".into();
                c.pk = vec![text("t")].into();
                c.column = Some("n".into());
                c.cl = 1;
                c.value = text("not a number");
            }),
        ),
    ];
    for (name, mutate) in &cases {
        let mut cs = good.clone();
        mutate(cs.changes.last_mut().unwrap());
        let err = target.apply(&cs).expect_err(name);
        assert!(matches!(err, Error::InvalidInput(_)), "{name}: {err}");
        assert_eq!(digest(&target), before, "{name} changed the database");
    }

    // A clock from the future.
    let mut cs = good.clone();
    cs.changes.last_mut().unwrap().hlc = Hlc::new(clock.now_ms() + 2 * 3_600_000, 0);
    assert!(matches!(
        target.apply(&cs).unwrap_err(),
        Error::ClockDrift { .. }
    ));
    assert_eq!(digest(&target), before);

    // Truncated or corrupted bytes.
    let bytes = good.encode();
    for cut in (0..bytes.len()).step_by(7) {
        let err = ChangeSet::decode(&bytes[..cut]).unwrap_err();
        assert!(
            matches!(err, Error::MalformedChangeSet(_)),
            "cut {cut}: {err}"
        );
    }
    let mut garbage = bytes.clone();
    garbage[4] = 200;
    assert!(ChangeSet::decode(&garbage).is_err());
    assert_eq!(digest(&target), before);

    // And the good set still applies afterwards.
    let report = target.apply(&good).unwrap();
    assert_eq!(report.applied, good.len());
}

#[test]
fn a_schema_violation_in_the_middle_rolls_everything_back() {
    let schema = "CREATE TABLE t(id TEXT PRIMARY KEY NOT NULL, n INTEGER CHECK (n < 100))";
    let src = Database::open_in_memory().unwrap();
    src.execute_batch("CREATE TABLE t(id TEXT PRIMARY KEY NOT NULL, n INTEGER)")
        .unwrap();
    src.enable_sync("t").unwrap();
    src.write(|tx| {
        for i in 0..200 {
            tx.execute(
                "INSERT INTO t VALUES (?1, ?2)",
                &[text(&format!("r{i:03}")), Value::Integer(i)],
            )?;
        }
        Ok(())
    })
    .unwrap();
    let dst = synced(schema, "t");
    let before = digest(&dst);
    let err = dst.apply(&src.changes_since(0, None).unwrap()).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert!(err.to_string().contains("CHECK"), "{err}");
    assert_eq!(digest(&dst), before);
}

#[test]
fn changes_for_tables_and_columns_not_here_yet_are_kept_until_they_are() {
    let clock = clock();
    // Bob runs a newer app version: todo has a priority, and there is a tags table.
    let alice = todo_replica(&clock);
    let bob = todo_replica(&clock);
    bob.alter_synced_table("todo", "ALTER TABLE todo ADD COLUMN priority INTEGER")
        .unwrap();
    bob.execute_batch("CREATE TABLE tags(id TEXT PRIMARY KEY NOT NULL, name TEXT)")
        .unwrap();
    bob.enable_sync("tags").unwrap();
    bob.execute("INSERT INTO todo VALUES ('t1', 'ship it', 'open', 5)", &[])
        .unwrap();
    bob.execute("INSERT INTO tags VALUES ('g1', 'work')", &[])
        .unwrap();

    let report = pull(&alice, &bob);
    assert_eq!(
        report.deferred, 3,
        "priority, and the tags row's marker and name: {report:?}"
    );
    assert_eq!(
        dump(&alice, "todo"),
        vec![vec![text("t1"), text("ship it"), text("open")]]
    );

    // Alice's kept changes still reach a third device that knows them.
    let carol = todo_replica(&clock);
    carol
        .alter_synced_table("todo", "ALTER TABLE todo ADD COLUMN priority INTEGER")
        .unwrap();
    pull(&carol, &alice);
    assert_eq!(
        dump(&carol, "todo"),
        vec![vec![
            text("t1"),
            text("ship it"),
            text("open"),
            Value::Integer(5)
        ]]
    );

    // Alice upgrades: the kept changes land.
    alice
        .alter_synced_table("todo", "ALTER TABLE todo ADD COLUMN priority INTEGER")
        .unwrap();
    alice
        .execute_batch("CREATE TABLE tags(id TEXT PRIMARY KEY NOT NULL, name TEXT)")
        .unwrap();
    alice.enable_sync("tags").unwrap();
    assert_eq!(dump(&alice, "todo"), dump(&bob, "todo"));
    assert_eq!(dump(&alice, "tags"), vec![vec![text("g1"), text("work")]]);
    // And later edits of the new column sync as usual.
    clock.advance(10);
    alice.execute("UPDATE todo SET priority = 1", &[]).unwrap();
    pull(&bob, &alice);
    assert_eq!(dump(&bob, "todo")[0][3], Value::Integer(1));
}

#[test]
fn alter_synced_table_is_all_or_nothing() {
    let db = synced(TODO_SCHEMA, "todo");
    let err = db
        .alter_synced_table("todo", "ALTER TABLE todo ADD COLUMN due TEXT NOT NULL")
        .unwrap_err();
    assert!(err.to_string().contains("NOT NULL"), "{err}");
    // The failed migration left the table as it was, still tracked.
    db.execute("INSERT INTO todo VALUES ('k', 'x', 'y')", &[])
        .unwrap();
    assert_eq!(db.changes_since(0, None).unwrap().len(), 3);
    assert!(db.alter_synced_table("nope", "SELECT 1").is_err());
}

#[test]
fn dropped_columns_stop_syncing_and_the_rest_goes_on() {
    let clock = clock();
    let (a, b) = (todo_replica(&clock), todo_replica(&clock));
    a.execute("INSERT INTO todo VALUES ('k', 'x', 'y')", &[])
        .unwrap();
    pull(&b, &a);
    a.alter_synced_table("todo", "ALTER TABLE todo DROP COLUMN status")
        .unwrap();
    clock.advance(1);
    a.execute("UPDATE todo SET title = 'renamed'", &[]).unwrap();
    pull(&b, &a);
    assert_eq!(
        dump(&b, "todo"),
        vec![vec![text("k"), text("renamed"), text("y")]]
    );
}

#[test]
fn observers_fire_after_commits_for_local_and_remote_writes() {
    let clock = clock();
    let (a, b) = (todo_replica(&clock), todo_replica(&clock));
    a.execute_batch("CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)")
        .unwrap();
    let seen: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let s = seen.clone();
    let todo_watch = a.observe(&["todo"], move |tables: &[String]| {
        s.lock().unwrap().push(tables.to_vec())
    });
    let all = Arc::new(AtomicUsize::new(0));
    let n = all.clone();
    let all_watch = a.observe(&[], move |_: &[String]| {
        n.fetch_add(1, Ordering::SeqCst);
    });

    a.execute("INSERT INTO todo VALUES ('k', 'x', 'y')", &[])
        .unwrap();
    a.execute(
        "INSERT INTO notes(body) VALUES ('not watched by the first')",
        &[],
    )
    .unwrap();
    // A rolled-back transaction notifies nobody.
    let _ = a.write(|tx| {
        tx.execute("INSERT INTO todo VALUES ('gone', 'x', 'y')", &[])?;
        Err::<(), _>(Error::InvalidInput("no".into()))
    });
    // Remote changes notify too.
    b.execute("INSERT INTO todo VALUES ('remote', 'x', 'y')", &[])
        .unwrap();
    pull(&a, &b);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![vec!["todo".to_string()], vec!["todo".to_string()]]
    );
    assert_eq!(all.load(Ordering::SeqCst), 3);

    drop(todo_watch);
    a.execute("DELETE FROM todo", &[]).unwrap();
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "a dropped handle stops the observer"
    );
    assert_eq!(all.load(Ordering::SeqCst), 4);
    drop(all_watch);
}

#[test]
fn a_listener_may_use_the_database() {
    let db = Arc::new(synced(TODO_SCHEMA, "todo"));
    db.execute_batch("CREATE TABLE log(n INTEGER)").unwrap();
    let inner = Arc::downgrade(&db);
    let _watch = db.observe(&["todo"], move |_: &[String]| {
        if let Some(db) = inner.upgrade() {
            let count = db.query("SELECT count(*) FROM todo", &[]).unwrap().rows[0][0].clone();
            db.execute("INSERT INTO log VALUES (?1)", &[count]).unwrap();
        }
    });
    db.execute("INSERT INTO todo VALUES ('k', 'x', 'y')", &[])
        .unwrap();
    assert_eq!(dump(&db, "log"), vec![vec![Value::Integer(1)]]);
}

#[test]
fn a_panicking_listener_neither_fails_the_write_nor_silences_the_others() {
    let db = synced(TODO_SCHEMA, "todo");
    let _panics = db.observe(&["todo"], |_: &[String]| panic!("a listener bug"));
    let heard = Arc::new(AtomicUsize::new(0));
    let h = heard.clone();
    let _counts = db.observe(&["todo"], move |_: &[String]| {
        h.fetch_add(1, Ordering::SeqCst);
    });
    let written = db.execute("INSERT INTO todo VALUES ('k', 'x', 'y')", &[]);
    assert_eq!(written.unwrap(), 1, "the write committed and says so");
    assert_eq!(dump(&db, "todo").len(), 1);
    assert_eq!(
        heard.load(Ordering::SeqCst),
        1,
        "later listeners still hear"
    );
    // And again: nothing was left locked or poisoned.
    db.execute("INSERT INTO todo VALUES ('k2', 'x', 'y')", &[])
        .unwrap();
    assert_eq!(heard.load(Ordering::SeqCst), 2);
}

#[test]
fn calling_the_database_from_its_own_write_body_is_refused_at_once() {
    fn refused<T: std::fmt::Debug>(r: Result<T, Error>) {
        assert!(
            matches!(&r, Err(Error::InvalidInput(m)) if m.contains("transaction handle")),
            "{r:?}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.db");
    within_deadline(move || {
        for (db, on_file) in [
            (Database::open_in_memory().unwrap(), false),
            (Database::open(&file).unwrap(), true),
        ] {
            db.execute_batch(TODO_SCHEMA).unwrap();
            db.enable_sync("todo").unwrap();
            db.execute("INSERT INTO todo VALUES ('a', 'x', 'y')", &[])
                .unwrap();
            db.write(|tx| {
                tx.execute("INSERT INTO todo VALUES ('b', 'x', 'y')", &[])?;
                refused(db.execute("INSERT INTO todo VALUES ('c', 'x', 'y')", &[]));
                refused(db.execute_batch("DELETE FROM todo"));
                refused(db.write(|_| Ok(())));
                refused(db.transaction().map(drop));
                refused(db.checkpoint());
                refused(db.close());
                if on_file {
                    // Reads go to a reader, which sees the last commit.
                    let n = db.query("SELECT count(*) FROM todo", &[]).unwrap();
                    assert_eq!(n.rows[0][0], Value::Integer(1));
                    assert_eq!(db.pending_changes().unwrap(), 1);
                } else {
                    // An in-memory database reads through the writer.
                    refused(db.query("SELECT count(*) FROM todo", &[]));
                    refused(db.pending_changes());
                }
                Ok(())
            })
            .unwrap();
            assert_eq!(
                dump(&db, "todo").len(),
                2,
                "the write body's own work committed"
            );
        }
    });
}

#[test]
fn other_threads_wait_for_a_write_body_instead_of_being_refused() {
    let db = Arc::new(synced(TODO_SCHEMA, "todo"));
    let d = db.clone();
    within_deadline(move || {
        let (started, waiting) = std::sync::mpsc::channel();
        let other = d
            .write(|tx| {
                tx.execute("INSERT INTO todo VALUES ('a', 'x', 'y')", &[])?;
                let db = d.clone();
                let other = std::thread::spawn(move || {
                    started.send(()).unwrap();
                    db.execute("INSERT INTO todo VALUES ('b', 'x', 'y')", &[])
                });
                waiting.recv().unwrap();
                Ok(other)
            })
            .unwrap();
        assert_eq!(other.join().unwrap().unwrap(), 1);
    });
    assert_eq!(dump(&db, "todo").len(), 2);
}

#[test]
fn readers_never_see_half_of_a_remote_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let src = synced(TODO_SCHEMA, "todo");
    let rows = 3000;
    src.write(|tx| {
        for i in 0..rows {
            tx.execute(
                "INSERT INTO todo VALUES (?1, 'x', 'y')",
                &[text(&format!("r{i:05}"))],
            )?;
        }
        Ok(())
    })
    .unwrap();
    let cs = src.changes_since(0, None).unwrap();
    let dst = Arc::new(Database::open(dir.path().join("dst.db")).unwrap());
    dst.execute_batch(TODO_SCHEMA).unwrap();
    dst.enable_sync("todo").unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (dst, done, reads) = (dst.clone(), done.clone(), reads.clone());
        std::thread::spawn(move || {
            let mut counts = std::collections::BTreeSet::new();
            while !done.load(Ordering::SeqCst) {
                let n = dst.query("SELECT count(*) FROM todo", &[]).unwrap().rows[0][0]
                    .as_i64()
                    .unwrap();
                counts.insert(n);
                reads.fetch_add(1, Ordering::SeqCst);
            }
            counts
        })
    };
    let wait_for_reads = |at_least: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while reads.load(Ordering::SeqCst) < at_least {
            assert!(
                std::time::Instant::now() < deadline,
                "the reader thread never ran"
            );
            std::thread::yield_now();
        }
    };
    wait_for_reads(1);
    dst.apply(&cs).unwrap();
    // Some reads after the commit too.
    wait_for_reads(reads.load(Ordering::SeqCst) + 2);
    done.store(true, Ordering::SeqCst);
    let counts = reader.join().unwrap();
    assert!(counts.iter().all(|&n| n == 0 || n == rows), "{counts:?}");
    assert!(counts.contains(&0) && counts.contains(&rows), "{counts:?}");
}

#[test]
fn databases_can_be_shared_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Database>();
    send_sync::<ChangeSet>();
}

#[test]
fn site_id_and_clock_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let clock = Arc::new(ManualTimeSource::new(2_000_000_000_000));
    let options = Options {
        time: clock.clone(),
        ..Options::default()
    };
    let (site, hlc) = {
        let db = Database::open_with(&path, options.clone()).unwrap();
        db.execute_batch(TODO_SCHEMA).unwrap();
        db.enable_sync("todo").unwrap();
        db.execute("INSERT INTO todo VALUES ('k', 'x', 'y')", &[])
            .unwrap();
        (db.site_id(), db.current_hlc())
    };
    // The wall clock went back an hour while the app was closed.
    clock.set(2_000_000_000_000 - 3_600_000);
    let db = Database::open_with(&path, options).unwrap();
    assert_eq!(db.site_id(), site);
    db.execute("UPDATE todo SET title = 'later'", &[]).unwrap();
    assert!(
        db.current_hlc() > hlc,
        "a later write must carry a later clock"
    );
    let title = db
        .changes_since(0, None)
        .unwrap()
        .changes
        .into_iter()
        .find(|c| c.column.as_deref() == Some("title"))
        .unwrap();
    assert!(title.hlc > hlc);
    assert_eq!(db.db_version(), 2);
}

#[test]
fn queries_run_on_readers_and_writes_through_query_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path().join("q.db")).unwrap();
    db.execute_batch(TODO_SCHEMA).unwrap();
    db.enable_sync("todo").unwrap();
    let rows = db
        .query("INSERT INTO todo VALUES ('k', 'x', 'y') RETURNING id", &[])
        .unwrap();
    assert_eq!(rows.rows, vec![vec![text("k")]]);
    assert_eq!(
        db.changes_since(0, None).unwrap().len(),
        3,
        "the write was tracked"
    );
    let err = db.query("SELECT * FROM nope", &[]).unwrap_err();
    assert!(err.to_string().contains("no such table: nope"), "{err}");
    db.close().unwrap();
    assert!(matches!(
        db.query("SELECT 1", &[]).unwrap_err(),
        Error::Closed
    ));
    // Closed means closed: the file opens again.
    let again = Database::open(dir.path().join("q.db")).unwrap();
    assert_eq!(dump(&again, "todo").len(), 1);
}

#[test]
fn rows_kept_by_a_failing_insert_or_fail_are_still_tracked() {
    let db = synced(TODO_SCHEMA, "todo");
    db.execute_batch("CREATE TABLE src(id TEXT)").unwrap();
    db.execute("INSERT INTO src VALUES ('n1'), ('n2'), ('k1'), ('n3')", &[])
        .unwrap();
    let tx = db.transaction().unwrap();
    tx.execute("INSERT INTO todo VALUES ('k1', 'first', 'open')", &[])
        .unwrap();
    // OR FAIL keeps n1 and n2, written before the conflict on k1.
    assert!(tx
        .execute("INSERT OR FAIL INTO todo(id) SELECT id FROM src", &[])
        .is_err());
    tx.commit().unwrap();
    assert_eq!(dump(&db, "todo").len(), 3);
    let peer = synced(TODO_SCHEMA, "todo");
    pull(&peer, &db);
    assert_eq!(dump(&peer, "todo"), dump(&db, "todo"));
}

#[test]
fn an_integer_rewritten_as_a_real_is_a_change() {
    let schema = "CREATE TABLE n(id TEXT PRIMARY KEY NOT NULL, v)";
    let (a, b) = (synced(schema, "n"), synced(schema, "n"));
    a.execute("INSERT INTO n VALUES ('k', 1)", &[]).unwrap();
    pull(&b, &a);
    a.execute("UPDATE n SET v = 1.0", &[]).unwrap();
    assert_eq!(dump(&a, "n"), vec![vec![text("k"), Value::Real(1.0)]]);
    pull(&b, &a);
    assert_eq!(dump(&b, "n"), vec![vec![text("k"), Value::Real(1.0)]]);
}

#[test]
fn migrations_are_schema_only_and_names_must_be_syncable() {
    let db = synced(TODO_SCHEMA, "todo");
    let err = db
        .alter_synced_table(
            "todo",
            "ALTER TABLE todo ADD COLUMN due TEXT; UPDATE todo SET due = 'x'",
        )
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert_eq!(dump(&db, "todo"), Vec::<Vec<Value>>::new());
    assert_eq!(
        db.query("SELECT * FROM todo", &[]).unwrap().columns.len(),
        3,
        "the ALTER was rolled back"
    );
    db.execute_batch("CREATE TABLE \"due.dates\"(id TEXT PRIMARY KEY NOT NULL, \"a;b\" TEXT)")
        .unwrap();
    let err = db.enable_sync("due.dates").unwrap_err().to_string();
    assert!(
        err.contains("\"due.dates\"") && err.contains("\"a;b\""),
        "{err}"
    );
}

#[test]
fn db_version_never_goes_back_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let options = Options {
        time: clock.clone(),
        ..Options::default()
    };
    let newer = todo_replica(&clock);
    newer
        .alter_synced_table("todo", "ALTER TABLE todo ADD COLUMN priority INTEGER")
        .unwrap();
    newer
        .execute("INSERT INTO todo VALUES ('t1', 'x', 'open', 1)", &[])
        .unwrap();
    let path = dir.path().join("b.db");
    let before = {
        let b = Database::open_with(&path, options.clone()).unwrap();
        b.execute_batch(TODO_SCHEMA).unwrap();
        b.enable_sync("todo").unwrap();
        pull(&b, &newer);
        b.execute("DELETE FROM todo", &[]).unwrap();
        // A late, stale change for the column B lacks is kept (a new
        // db_version), then merged away by the migration.
        let mut stale = newer.changes_since(0, None).unwrap();
        stale
            .changes
            .retain(|c| c.column.as_deref() == Some("priority"));
        stale.recipient = None;
        b.apply(&stale).unwrap();
        b.alter_synced_table("todo", "ALTER TABLE todo ADD COLUMN priority INTEGER")
            .unwrap();
        b.db_version()
    };
    let b = Database::open_with(&path, options).unwrap();
    assert_eq!(b.db_version(), before);
    b.execute(
        "INSERT INTO todo VALUES ('t2', 'after restart', 'open', 2)",
        &[],
    )
    .unwrap();
    assert!(b.db_version() > before);
}

#[test]
fn two_handles_on_one_file_never_reuse_a_db_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let a = Database::open(&path).unwrap();
    a.execute_batch(TODO_SCHEMA).unwrap();
    a.enable_sync("todo").unwrap();
    let b = Database::open(&path).unwrap();
    a.execute(
        "INSERT INTO todo VALUES ('a', 'from handle a', 'open')",
        &[],
    )
    .unwrap();
    b.execute(
        "INSERT INTO todo VALUES ('b', 'from handle b', 'open')",
        &[],
    )
    .unwrap();
    a.execute("UPDATE todo SET title = 'again'", &[]).unwrap();
    let versions: std::collections::BTreeSet<u64> = a
        .changes_since(0, None)
        .unwrap()
        .changes
        .iter()
        .filter(|c| c.column.is_none())
        .map(|c| c.db_version)
        .collect();
    assert_eq!(
        versions.len(),
        2,
        "each insert has its own db_version: {versions:?}"
    );
    assert_eq!(a.db_version(), 3);
}

#[test]
fn two_handles_on_one_file_work_like_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let a = Database::open(&path).unwrap();
    a.execute_batch(TODO_SCHEMA).unwrap();
    a.enable_sync("todo").unwrap();
    let b = Database::open(&path).unwrap();
    let c = clock();
    let (x, y) = (todo_replica(&c), todo_replica(&c));
    x.execute("INSERT INTO todo VALUES ('x', 'from x', 'open')", &[])
        .unwrap();
    y.execute("INSERT INTO todo VALUES ('y', 'from y', 'open')", &[])
        .unwrap();
    // A learns site x, then B learns site y: each must see the other's
    // site list, not its own cached one.
    pull(&a, &x);
    // B has not seen site x itself, yet exports its row as x's.
    let from_b = b.changes_since(0, None).unwrap().changes;
    assert!(!from_b.is_empty() && from_b.iter().all(|ch| ch.site == x.site_id()));
    pull(&b, &y);
    pull(&a, &y);
    pull(&b, &x);
    assert_eq!(dump(&a, "todo"), dump(&b, "todo"));
    assert_eq!(dump(&a, "todo").len(), 2);
    // Either handle's export names the site each row came from.
    for handle in [&a, &b] {
        for ch in handle.changes_since(0, None).unwrap().changes {
            let from = if ch.pk[0] == text("x") { &x } else { &y };
            assert_eq!(ch.site, from.site_id(), "{ch:?}");
        }
    }

    // A makes a new table synced; B's writes to it are tracked.
    a.execute_batch("CREATE TABLE tag(id TEXT PRIMARY KEY NOT NULL, name TEXT)")
        .unwrap();
    a.enable_sync("tag").unwrap();
    b.execute("INSERT INTO tag VALUES ('t', 'home')", &[])
        .unwrap();
    assert_eq!(b.synced_tables(), vec!["todo", "tag"]);
    let fresh = Database::open_in_memory().unwrap();
    fresh
        .execute_batch(&format!(
            "{TODO_SCHEMA}; CREATE TABLE tag(id TEXT PRIMARY KEY NOT NULL, name TEXT)"
        ))
        .unwrap();
    fresh.enable_sync("todo").unwrap();
    fresh.enable_sync("tag").unwrap();
    fresh.apply(&a.changes_since(0, None).unwrap()).unwrap();
    assert_eq!(dump(&fresh, "tag"), vec![vec![text("t"), text("home")]]);
    assert_eq!(dump(&fresh, "todo").len(), 2);
}

#[test]
fn pending_counts_an_unsent_edit_under_a_newer_server_change() {
    let c = clock();
    let (a, other) = (todo_replica(&c), todo_replica(&c));
    a.execute("INSERT INTO todo VALUES ('t1', 'milk', 'open')", &[])
        .unwrap();
    a.mark_pushed(a.db_version()).unwrap();
    assert_eq!(a.pending_changes().unwrap(), 0);
    c.advance(1);
    a.execute("UPDATE todo SET title = 'oat milk' WHERE id = 't1'", &[])
        .unwrap();
    assert_eq!(a.pending_changes().unwrap(), 1);
    // Another device's edit of the same row arrives from the server before
    // ours went out: the row's newest change is the server's now.
    pull(&other, &a);
    c.advance(1);
    other
        .execute("UPDATE todo SET status = 'done' WHERE id = 't1'", &[])
        .unwrap();
    let theirs: Vec<Change> = other
        .changes_since(0, None)
        .unwrap()
        .changes
        .into_iter()
        .filter(|ch| ch.column.as_deref() == Some("status"))
        .collect();
    let report = a.apply_from_server(&theirs, 1, None).unwrap();
    assert_eq!(report.applied, 1);
    assert_eq!(a.pending_changes().unwrap(), 1, "our title is still unsent");
    let outgoing = a.changes_for_server().unwrap();
    assert_eq!(outgoing.changes.len(), 1);
    assert_eq!(outgoing.changes[0].value, text("oat milk"));
}

#[test]
fn a_push_reads_back_only_the_unsent_edits_under_pulled_changes_of_composite_keys() {
    let schema = "CREATE TABLE item(list TEXT NOT NULL, pos INTEGER NOT NULL, title TEXT, \
                  done INTEGER, PRIMARY KEY(list, pos))";
    let (a, other) = (synced(schema, "item"), synced(schema, "item"));
    a.execute_batch(
        "INSERT INTO item VALUES ('home', 1, 'milk', 0); INSERT INTO item VALUES ('home', 2, 'eggs', 0)",
    )
    .unwrap();
    a.mark_pushed(a.db_version()).unwrap();
    a.execute("UPDATE item SET title = 'oat milk' WHERE pos = 1", &[])
        .unwrap();
    pull(&other, &a);
    other.execute("UPDATE item SET done = 1", &[]).unwrap();
    let theirs: Vec<Change> = other
        .changes_since(0, None)
        .unwrap()
        .changes
        .into_iter()
        .filter(|ch| ch.column.as_deref() == Some("done"))
        .collect();
    assert_eq!(a.apply_from_server(&theirs, 1, None).unwrap().applied, 2);
    // Both rows were last written by the pull; only the first holds an
    // edit of ours, and only that edit goes out.
    let outgoing = a.changes_for_server().unwrap().changes;
    assert_eq!(outgoing.len(), 1, "{outgoing:?}");
    assert_eq!(&outgoing[0].pk[..], &[text("home"), Value::Integer(1)]);
    assert_eq!(outgoing[0].column.as_deref(), Some("title"));
    assert_eq!(outgoing[0].value, text("oat milk"));
}

#[test]
fn a_first_push_after_a_pull_sends_only_our_own_rows() {
    let c = clock();
    let (a, other) = (todo_replica(&c), todo_replica(&c));
    for i in 0..50 {
        other
            .execute(
                "INSERT INTO todo VALUES (?1, 'theirs', 'open')",
                &[text(&format!("t{i}"))],
            )
            .unwrap();
    }
    a.execute("INSERT INTO todo VALUES ('mine', 'milk', 'open')", &[])
        .unwrap();
    let theirs = other.changes_since(0, None).unwrap().changes;
    a.apply_from_server(&theirs, 1, None).unwrap();
    assert_eq!(a.pushed_version().unwrap(), 0, "a device that never pushed");
    a.execute("UPDATE todo SET status = 'done' WHERE id = 't7'", &[])
        .unwrap();
    let mut sent: Vec<(String, Option<String>)> = a
        .changes_for_server()
        .unwrap()
        .changes
        .iter()
        .map(|ch| {
            (
                format!("{:?}", ch.pk[0]),
                ch.column.as_deref().map(String::from),
            )
        })
        .collect();
    sent.sort();
    let mut expected = vec![
        (format!("{:?}", text("t7")), Some("status".to_owned())),
        (format!("{:?}", text("mine")), None),
        (format!("{:?}", text("mine")), Some("status".to_owned())),
        (format!("{:?}", text("mine")), Some("title".to_owned())),
    ];
    expected.sort();
    assert_eq!(sent, expected);
}

#[test]
fn a_pull_with_nothing_unsent_moves_the_push_mark_past_what_it_applied() {
    let c = clock();
    let (a, other) = (todo_replica(&c), todo_replica(&c));
    a.execute("INSERT INTO todo VALUES ('mine', 'milk', 'open')", &[])
        .unwrap();
    a.mark_pushed(a.db_version()).unwrap();
    let mut server_version = 0;
    let mut from_other = |title: &str| {
        c.advance(1);
        other
            .execute(
                "INSERT INTO todo VALUES ('theirs', ?1, 'open') \
                 ON CONFLICT(id) DO UPDATE SET title = excluded.title",
                &[text(title)],
            )
            .unwrap();
        server_version += 1;
        (
            other.changes_since(0, None).unwrap().changes,
            server_version,
        )
    };
    // Everything of ours is on the server: the pulled version needs no
    // push, and the next push starts after it.
    let (theirs, at) = from_other("bread");
    assert_eq!(a.apply_from_server(&theirs, at, None).unwrap().applied, 3);
    assert_eq!(a.pushed_version().unwrap(), a.db_version());
    assert_eq!(a.pending_changes().unwrap(), 0);
    assert!(a.changes_for_server().unwrap().changes.is_empty());
    // An edit of ours waits: the mark stays before it, and the push sends
    // that edit alone.
    a.execute("UPDATE todo SET status = 'done' WHERE id = 'mine'", &[])
        .unwrap();
    let pushed = a.pushed_version().unwrap();
    let (theirs, at) = from_other("rye bread");
    assert_eq!(a.apply_from_server(&theirs, at, None).unwrap().applied, 1);
    assert_eq!(a.pushed_version().unwrap(), pushed);
    assert_eq!(a.pending_changes().unwrap(), 1);
    let outgoing = a.changes_for_server().unwrap().changes;
    assert_eq!(outgoing.len(), 1, "{outgoing:?}");
    assert_eq!(outgoing[0].value, text("done"));
}

/// A replica with a synced `todo`, a synced `history` that an app trigger
/// on `todo` writes (guarded as documented, or not), and a local-only
/// `search` table another trigger keeps up to date.
fn replica_with_triggers(c: &Arc<ManualTimeSource>, guarded: bool) -> Database {
    let db = todo_replica(c);
    let guard = if guarded {
        "WHEN confluo_tracking()"
    } else {
        ""
    };
    db.execute_batch(&format!(
        "CREATE TABLE history(id TEXT PRIMARY KEY NOT NULL, what TEXT);
         CREATE TABLE search(id TEXT PRIMARY KEY NOT NULL, words TEXT);
         CREATE TRIGGER log_insert AFTER INSERT ON todo {guard} BEGIN
           INSERT INTO history VALUES ('added ' || NEW.id, NEW.title);
         END;
         CREATE TRIGGER index_insert AFTER INSERT ON todo BEGIN
           INSERT OR REPLACE INTO search VALUES (NEW.id, lower(NEW.title));
         END;"
    ))
    .unwrap();
    db.enable_sync("history").unwrap();
    db
}

#[test]
fn guarded_app_triggers_run_where_the_write_is_made_and_their_writes_sync() {
    let c = clock();
    let (a, b) = (
        replica_with_triggers(&c, true),
        replica_with_triggers(&c, true),
    );
    a.execute("INSERT INTO todo VALUES ('t1', 'Buy Milk', 'open')", &[])
        .unwrap();
    pull(&b, &a);
    assert_eq!(dump(&b, "todo"), dump(&a, "todo"));
    // One history row, made by A's trigger and synced; B's did not fire.
    assert_eq!(
        dump(&b, "history"),
        vec![vec![text("added t1"), text("Buy Milk")]]
    );
    assert_eq!(dump(&b, "history"), dump(&a, "history"));
    // Unguarded triggers on local-only tables run for remote writes too.
    assert_eq!(dump(&b, "search"), vec![vec![text("t1"), text("buy milk")]]);
}

#[test]
fn an_unguarded_app_trigger_that_writes_a_synced_table_is_refused_during_apply() {
    let c = clock();
    let a = replica_with_triggers(&c, true);
    let b = replica_with_triggers(&c, false);
    a.execute("INSERT INTO todo VALUES ('t1', 'Buy milk', 'open')", &[])
        .unwrap();
    let before = digest(&b);
    // From a peer: the change set is refused whole, nothing changes.
    let err = b
        .apply(&a.changes_for_peer(b.site_id(), 0).unwrap())
        .unwrap_err();
    assert!(
        err.to_string().contains("guard app triggers") && err.to_string().contains("history"),
        "{err}"
    );
    assert_eq!(digest(&b), before);
    // From a server: the row is kept aside with that reason, the rest goes in.
    let changes = a.changes_since(0, None).unwrap().changes;
    let report = b.apply_from_server(&changes, 1, None).unwrap();
    assert_eq!(report.rejected, 3, "t1's marker and two columns");
    assert_eq!(
        dump(&b, "history"),
        vec![vec![text("added t1"), text("Buy milk")]],
        "A's history row arrived; B's trigger wrote nothing"
    );
    assert!(dump(&b, "todo").is_empty());
    let kept = b.rejected_changes().unwrap();
    assert!(
        kept[0].reason.contains("WHEN confluo_tracking()"),
        "{kept:?}"
    );
    // Guarding the trigger lets the kept changes in.
    b.alter_synced_table(
        "todo",
        "DROP TRIGGER log_insert;
         CREATE TRIGGER log_insert AFTER INSERT ON todo WHEN confluo_tracking() BEGIN
           INSERT INTO history VALUES ('added ' || NEW.id, NEW.title);
         END;",
    )
    .unwrap();
    assert_eq!(b.rejected_count().unwrap(), 0);
    assert_eq!(dump(&b, "todo"), dump(&a, "todo"));
    assert_eq!(dump(&b, "history"), dump(&a, "history"));
}

#[test]
fn capture_triggers_of_an_older_shape_are_installed_again_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let db = Database::open(&path).unwrap();
    db.execute_batch(TODO_SCHEMA).unwrap();
    db.enable_sync("todo").unwrap();
    db.close().unwrap();
    // Back to the first trigger shape: guarded by confluo_tracking().
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute_batch(
        "DROP TRIGGER confluo_ai_todo;
         CREATE TRIGGER confluo_ai_todo AFTER INSERT ON todo WHEN confluo_tracking() BEGIN
           SELECT confluo_inserted(1, NEW.id);
         END;
         DELETE FROM confluo_state WHERE key = 'triggers';",
    )
    .unwrap();
    drop(raw);
    let db = Database::open(&path).unwrap();
    let sql = db
        .query(
            "SELECT sql FROM sqlite_schema WHERE name = 'confluo_ai_todo'",
            &[],
        )
        .unwrap();
    let Value::Text(sql) = &sql.rows[0][0] else {
        panic!("{sql:?}")
    };
    assert!(sql.contains("confluo_insert_row("), "{sql}");
    db.execute("INSERT INTO todo VALUES ('t1', 'x', 'open')", &[])
        .unwrap();
    assert_eq!(db.changes_since(0, None).unwrap().changes.len(), 3);
}

#[test]
fn a_text_key_that_is_not_utf8_keeps_one_metadata_row() {
    let db = Database::open_in_memory().unwrap();
    db.execute_batch(
        "CREATE TABLE t(k TEXT PRIMARY KEY NOT NULL, v TEXT);
         INSERT INTO t VALUES (CAST(x'61ff' AS TEXT), 'x');",
    )
    .unwrap();
    db.enable_sync("t").unwrap();
    db.execute("UPDATE t SET v = 'y'", &[]).unwrap();
    let n = db
        .query("SELECT count(*) FROM confluo_meta_t", &[])
        .unwrap()
        .rows;
    assert_eq!(n[0][0], Value::Integer(1));
}

/// A key column collated NOCASE under a BINARY key index: 'a' and 'A' are
/// two rows, and sync keeps them apart.
const NOCASE_KEY: &str =
    "CREATE TABLE t(k TEXT NOT NULL COLLATE NOCASE, v TEXT, PRIMARY KEY (k COLLATE BINARY))";

fn cells(cs: &ChangeSet) -> Vec<String> {
    let mut cells: Vec<String> = cs
        .changes
        .iter()
        .map(|c| format!("{:?}", (&c.pk, &c.column, &c.value)))
        .collect();
    cells.sort();
    cells
}

#[test]
fn a_key_column_collated_nocase_keeps_a_and_upper_a_apart() {
    let a = synced(NOCASE_KEY, "t");
    a.execute("INSERT INTO t VALUES ('z', 'first')", &[])
        .unwrap();
    a.execute("INSERT INTO t VALUES ('a', 'lower'), ('A', 'upper')", &[])
        .unwrap();
    // The first export and the incremental one send the same cells.
    let mut everything = a.changes_since(0, None).unwrap();
    everything.changes.retain(|c| c.pk[0] != text("z"));
    assert_eq!(
        cells(&everything),
        cells(&a.changes_since(1, None).unwrap())
    );
    // An edit of one reaches only that one.
    let b = synced(NOCASE_KEY, "t");
    b.apply(&a.changes_since(0, None).unwrap()).unwrap();
    a.execute(
        "UPDATE t SET v = 'edited' WHERE k = 'a' COLLATE BINARY",
        &[],
    )
    .unwrap();
    let seen = b.seen_version(a.site_id()).unwrap();
    b.apply(&a.changes_for_peer(b.site_id(), seen).unwrap())
        .unwrap();
    let binary_order = |db: &Database| {
        db.query("SELECT * FROM t ORDER BY k COLLATE BINARY", &[])
            .unwrap()
            .rows
    };
    assert_eq!(binary_order(&b), binary_order(&a));
}

#[test]
fn an_integer_key_that_is_not_the_rowid_must_be_not_null() {
    // DESC makes it a column with an index of its own, where NULL goes in.
    let db = Database::open_in_memory().unwrap();
    db.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY DESC, v TEXT)")
        .unwrap();
    let err = db.enable_sync("t").unwrap_err();
    assert!(err.to_string().contains("allows NULL"), "{err}");
    // The rowid's alias cannot be NULL: accepted as it is.
    db.execute_batch("CREATE TABLE u(id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    db.enable_sync("u").unwrap();
    db.execute("INSERT INTO u(v) VALUES ('x')", &[]).unwrap();
    assert_eq!(db.changes_since(0, None).unwrap().changes.len(), 2);
}

#[test]
fn tables_whose_names_extend_one_another_are_all_synced() {
    // The metadata of `a_dbv` must not take a name `a`'s metadata uses.
    let db = Database::open_in_memory().unwrap();
    for t in ["a", "a_dbv", "a_meta"] {
        db.execute_batch(&format!(
            "CREATE TABLE {t}(id TEXT PRIMARY KEY NOT NULL, v TEXT);
             INSERT INTO {t} VALUES ('{t}', 'x');"
        ))
        .unwrap();
        db.enable_sync(t).unwrap();
    }
    let changes = db.changes_since(0, None).unwrap().changes;
    let mut tables: Vec<&str> = changes
        .iter()
        .filter(|c| c.column.is_none())
        .map(|c| &*c.table)
        .collect();
    tables.sort();
    assert_eq!(tables, vec!["a", "a_dbv", "a_meta"]);
}

/// The changes of everything, in an order that does not depend on how
/// the metadata is stored.
fn sorted_changes(db: &Database) -> Vec<String> {
    let mut all: Vec<String> = db
        .changes_since(0, None)
        .unwrap()
        .changes
        .iter()
        .map(|c| {
            format!(
                "{:?}",
                (&c.pk, &c.column, &c.value, c.cl, c.hlc, c.db_version)
            )
        })
        .collect();
    all.sort();
    all
}

#[test]
fn metadata_keyed_by_the_row_key_is_moved_to_row_ids_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("format2.db");
    let db = Database::open(&path).unwrap();
    db.execute_batch(TODO_SCHEMA).unwrap();
    db.enable_sync("todo").unwrap();
    for i in 0..50 {
        db.execute(
            "INSERT INTO todo VALUES (?1, 'x', 'open')",
            &[text(&format!("t{i}"))],
        )
        .unwrap();
    }
    db.execute("UPDATE todo SET title = 'y' WHERE id < 't3'", &[])
        .unwrap();
    db.execute("DELETE FROM todo WHERE id > 't4'", &[]).unwrap();
    let before = sorted_changes(&db);
    db.close().unwrap();
    // Back to format 2: the metadata keyed by the key itself, no row id
    // secret. The app left a view broken (SQLite allows that): the move
    // must not trip over it.
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute_batch(
        "CREATE TABLE confluo_rows_todo(pk PRIMARY KEY, cl INTEGER NOT NULL, dbv INTEGER NOT NULL, clocks BLOB NOT NULL) WITHOUT ROWID;
         INSERT INTO confluo_rows_todo SELECT pk, cl, dbv, clocks FROM confluo_meta_todo;
         DROP TABLE confluo_meta_todo;
         CREATE INDEX confluo_rows_todo_dbv ON confluo_rows_todo(dbv);
         DELETE FROM confluo_state WHERE key = 'row_ids';
         UPDATE confluo_state SET value = 2 WHERE key = 'format';
         CREATE TABLE gone(x); CREATE VIEW stale AS SELECT x FROM gone; DROP TABLE gone;",
    )
    .unwrap();
    drop(raw);

    let db = Database::open(&path).unwrap();
    assert_eq!(sorted_changes(&db), before);
    // Edits find the rows' moved metadata: no second row for a key.
    db.execute("UPDATE todo SET status = 'done' WHERE id = 't1'", &[])
        .unwrap();
    db.execute("INSERT INTO todo VALUES ('t7', 'back', 'open')", &[])
        .unwrap();
    let meta = db
        .query(
            "SELECT count(*), count(DISTINCT pk), max(cl) FROM confluo_meta_todo",
            &[],
        )
        .unwrap();
    assert_eq!(
        meta.rows[0],
        vec![Value::Integer(50), Value::Integer(50), Value::Integer(3)]
    );
    db.close().unwrap();
    let raw = rusqlite::Connection::open(&path).unwrap();
    let (format, old_tables): (i64, i64) = raw
        .query_row(
            "SELECT (SELECT value FROM confluo_state WHERE key = 'format'), \
                    (SELECT count(*) FROM sqlite_schema WHERE name LIKE 'confluo_rows%')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((format, old_tables), (5, 0));
    let peer = synced(TODO_SCHEMA, "todo");
    pull(&peer, &Database::open(&path).unwrap());
    // 50 rows, 15 deleted (t40..=t49, t5..=t9), t7 back.
    assert_eq!(dump(&peer, "todo").len(), 36);
}

#[test]
fn a_value_larger_than_sync_carries_is_refused_when_written() {
    let db = synced(TODO_SCHEMA, "todo");
    let big = Value::Blob(vec![7; (1 << 20) + 1]);
    let err = db
        .execute(
            "INSERT INTO todo VALUES ('t1', ?1, 'open')",
            std::slice::from_ref(&big),
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("larger than sync carries"),
        "{err}"
    );
    assert!(dump(&db, "todo").is_empty());
    db.execute("INSERT INTO todo VALUES ('t1', 'small', 'open')", &[])
        .unwrap();
    let err = db
        .execute("UPDATE todo SET status = ?1", std::slice::from_ref(&big))
        .unwrap_err();
    assert!(
        err.to_string().contains("larger than sync carries"),
        "{err}"
    );
    assert_eq!(db.changes_since(0, None).unwrap().changes.len(), 3);
    // Tables that do not sync take any size.
    db.execute_batch("CREATE TABLE cache(id INTEGER PRIMARY KEY, data BLOB)")
        .unwrap();
    db.execute(
        "INSERT INTO cache VALUES (1, ?1)",
        std::slice::from_ref(&big),
    )
    .unwrap();
    // A table with such a value already in it cannot start syncing.
    let err = db.enable_sync("cache").unwrap_err();
    assert!(
        err.to_string().contains("larger than sync carries"),
        "{err}"
    );
    assert_eq!(db.synced_tables(), vec!["todo"]);
}

#[test]
fn any_error_of_one_row_from_the_server_keeps_that_row_aside_and_the_rest_goes_in() {
    let c = clock();
    let (a, b) = (todo_replica(&c), todo_replica(&c));
    // B's local-only search index parses titles as JSON; some are not.
    b.execute_batch(
        "CREATE TABLE idx(id TEXT PRIMARY KEY, t TEXT);
         CREATE TRIGGER todo_idx AFTER INSERT ON todo BEGIN
           INSERT OR REPLACE INTO idx VALUES (NEW.id, json_extract(NEW.title, '$.t'));
         END;",
    )
    .unwrap();
    a.write(|tx| {
        for i in 0..200 {
            let title = if i % 3 == 0 { "not json" } else { "{\"t\": 1}" };
            tx.execute(
                "INSERT INTO todo VALUES (?1, ?2, 'open')",
                &[format!("t{i:03}").into(), title.into()],
            )?;
        }
        Ok(())
    })
    .unwrap();
    let changes = a.changes_since(0, None).unwrap().changes;
    let report = b.apply_from_server(&changes, 7, None).unwrap();
    assert_eq!(b.server_cursor().unwrap(), 7);
    assert_eq!(report.rejected, 67 * 3, "{report:?}");
    assert_eq!(report.applied, 133 * 3, "{report:?}");
    assert_eq!(dump(&b, "todo").len(), 133);
    assert_eq!(dump(&b, "idx").len(), 133);
    let kept = b.rejected_changes().unwrap();
    assert!(
        kept.iter().all(|r| r.reason.contains("malformed JSON")),
        "{:?}",
        kept[0]
    );
    // Nothing of the refused rows was recorded, nor is pending.
    assert_eq!(b.pending_changes().unwrap(), 0);
    let exported = b.changes_since(0, None).unwrap().changes;
    assert_eq!(exported.len(), 133 * 3);
}

#[test]
fn a_second_handle_exports_with_the_schema_another_handle_migrated_to() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("two.db");
    let h1 = Database::open(&path).unwrap();
    h1.execute_batch(TODO_SCHEMA).unwrap();
    h1.enable_sync("todo").unwrap();
    h1.execute("INSERT INTO todo VALUES ('t1', 'milk', 'open')", &[])
        .unwrap();
    let h2 = Database::open(&path).unwrap();
    h1.alter_synced_table("todo", "ALTER TABLE todo RENAME COLUMN title TO task")
        .unwrap();
    // H2 has not written since: its reads still see the migration.
    let exported = h2.changes_since(0, None).unwrap().changes;
    assert_eq!(exported.len(), 3);
    assert!(exported
        .iter()
        .any(|c| c.column.as_deref() == Some("title") && c.value == text("milk")));
    assert_eq!(h2.pending_changes().unwrap(), 1);
}

#[test]
fn a_row_kept_aside_that_comes_in_later_brings_its_other_cells() {
    let c = clock();
    let (a, b) = (todo_replica(&c), todo_replica(&c));
    b.execute_batch(
        "CREATE TRIGGER no_bad BEFORE INSERT ON todo WHEN NEW.title = 'bad' \
         BEGIN SELECT RAISE(ABORT, 'no bad titles'); END",
    )
    .unwrap();
    a.execute("INSERT INTO todo VALUES ('t1', 'bad', 'important')", &[])
        .unwrap();
    let first = a.changes_since(0, None).unwrap();
    b.apply_from_server(&first.changes, 1, None).unwrap();
    assert_eq!(b.rejected_count().unwrap(), 3);
    c.advance(1);
    a.execute("UPDATE todo SET title = 'good'", &[]).unwrap();
    let later = a.changes_since(first.until, None).unwrap();
    b.apply_from_server(&later.changes, 2, None).unwrap();
    assert_eq!(dump(&b, "todo"), dump(&a, "todo"));
    assert_eq!(
        b.rejected_count().unwrap(),
        0,
        "the stale title is gone too"
    );
}

#[test]
fn a_row_refused_until_a_later_row_of_the_same_pull_comes_in_is_applied_after_it() {
    let c = clock();
    let (a, b) = (todo_replica(&c), todo_replica(&c));
    b.execute_batch(
        "CREATE TRIGGER needs_parent BEFORE INSERT ON todo WHEN NEW.id = 'child' \
         AND NOT EXISTS (SELECT 1 FROM todo WHERE id = 'parent') \
         BEGIN SELECT RAISE(ABORT, 'no parent yet'); END",
    )
    .unwrap();
    a.execute("INSERT INTO todo VALUES ('parent', 'p', 'open')", &[])
        .unwrap();
    a.execute("INSERT INTO todo VALUES ('child', 'c', 'open')", &[])
        .unwrap();
    let mut theirs = a.changes_since(0, None).unwrap().changes;
    // The child first: refused, since its parent is not there yet.
    theirs.sort_by_key(|ch| format!("{:?}", ch.pk));
    let report = b.apply_from_server(&theirs, 1, None).unwrap();
    assert!(report.rejected > 0, "{report:?}");
    assert_eq!(
        b.rejected_count().unwrap(),
        0,
        "the child is still kept aside"
    );
    assert_eq!(dump(&b, "todo"), dump(&a, "todo"));
}

#[test]
fn unbinding_a_space_forgets_its_server_and_pushes_everything_to_the_next() {
    let c = clock();
    let (a, other) = (todo_replica(&c), todo_replica(&c));
    a.bind_space("alice-lsts").unwrap();
    assert_eq!(a.bound_space().unwrap().as_deref(), Some("alice-lsts"));
    a.execute("INSERT INTO todo VALUES ('mine', 'milk', 'open')", &[])
        .unwrap();
    a.mark_pushed(a.db_version()).unwrap();
    other
        .execute("INSERT INTO todo VALUES ('theirs', 'bread', 'open')", &[])
        .unwrap();
    let theirs = other.changes_since(0, None).unwrap().changes;
    a.apply_from_server(&theirs, 7, Some("tag-7")).unwrap();
    assert_eq!(a.pending_changes().unwrap(), 0);
    let refused = a.bind_space("alice-lists").unwrap_err();
    assert!(refused.to_string().contains("alice-lsts"), "{refused}");

    a.unbind_space().unwrap();
    assert_eq!(a.bound_space().unwrap(), None);
    assert_eq!(a.server_cursor().unwrap(), 0);
    assert_eq!(a.pushed_version().unwrap(), 0);
    assert_eq!(a.server_epoch().unwrap(), None);
    a.bind_space("alice-lists").unwrap();
    assert_eq!(a.bound_space().unwrap().as_deref(), Some("alice-lists"));
    // Both rows go to the new space: ours, and the one the old space gave us.
    assert_eq!(a.pending_changes().unwrap(), 2);
    let outgoing = a.changes_for_server().unwrap();
    let rows: std::collections::BTreeSet<String> = outgoing
        .changes
        .iter()
        .map(|ch| format!("{:?}", ch.pk))
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        dump(&a, "todo").len(),
        2,
        "unbinding changes no data, only the bookkeeping"
    );
}
