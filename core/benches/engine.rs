//! The engine benchmark: the todo workload through Confluo and through plain
//! SQLite, in the same run, on the same schema. Prints one `RESULT {json}`
//! line per figure (medians over `CONFLUO_BENCH_RUNS` runs, default 3).

use std::path::Path;
use std::time::{Duration, Instant};

use confluo_core::{ChangeSet, Database, Value};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rusqlite::Connection;

#[path = "workload.rs"]
mod workload;

use workload::{workload, Row, ROWS, SCHEMA};

#[derive(Default, Clone)]
struct Times {
    insert: Duration,
    update: Duration,
    delete: Duration,
    export: Duration,
    apply: Duration,
    size: u64,
    wire_bytes: usize,
    /// The same change set as the HTTP content coding sends it (zstd).
    wire_compressed_bytes: usize,
    /// One statement updating a column of every row.
    update_all: Duration,
    /// One statement deleting about a tenth of the rows.
    delete_range: Duration,
    /// Rows alive after the phases, and the bytes of their values.
    live_rows: f64,
    live_raw_bytes: f64,
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn plain(dir: &Path, rows: &[Row], order: &[usize]) -> Times {
    let path = dir.join("plain.db");
    let conn = Connection::open(&path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
    conn.execute_batch(SCHEMA).unwrap();
    // Found before the clock starts: sorting the ids is not the delete.
    let bound = range_bound(rows);
    let mut t = Times {
        insert: timed(|| plain_insert(&conn, rows)),
        update: timed(|| plain_update(&conn, rows, order)),
        update_all: timed(|| plain_update_all(&conn)),
        delete: timed(|| plain_delete(&conn, rows, order)),
        delete_range: timed(|| plain_delete_range(&conn, &bound)),
        ..Times::default()
    };
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    t.size = file_size(&path);
    t
}

fn timed(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

// Each phase is a function of its own, never inlined, so that
// `scripts/instructions.sh` counts its instructions by name.

#[inline(never)]
fn plain_insert(conn: &Connection, rows: &[Row]) {
    let tx = conn.unchecked_transaction().unwrap();
    {
        let mut stmt = tx
            .prepare("INSERT INTO todo VALUES (?1, ?2, ?3, ?4)")
            .unwrap();
        for r in rows {
            stmt.execute((&r.id, &r.title, r.status, &r.body)).unwrap();
        }
    }
    tx.commit().unwrap();
}

#[inline(never)]
fn plain_update(conn: &Connection, rows: &[Row], order: &[usize]) {
    let tx = conn.unchecked_transaction().unwrap();
    {
        let mut stmt = tx
            .prepare("UPDATE todo SET status = ?1 WHERE id = ?2")
            .unwrap();
        for &i in order {
            stmt.execute(("done", &rows[i].id)).unwrap();
        }
    }
    tx.commit().unwrap();
}

#[inline(never)]
fn plain_update_all(conn: &Connection) {
    conn.execute("UPDATE todo SET status = ?1", ["open"])
        .unwrap();
}

#[inline(never)]
fn plain_delete(conn: &Connection, rows: &[Row], order: &[usize]) {
    let tx = conn.unchecked_transaction().unwrap();
    {
        let mut stmt = tx.prepare("DELETE FROM todo WHERE id = ?1").unwrap();
        for &i in &order[..ROWS / 10] {
            stmt.execute([&rows[i].id]).unwrap();
        }
    }
    tx.commit().unwrap();
}

#[inline(never)]
fn plain_delete_range(conn: &Connection, bound: &str) {
    conn.execute("DELETE FROM todo WHERE id < ?1", [bound])
        .unwrap();
}

/// The id below which about a tenth of the rows are (ids are random).
fn range_bound(rows: &[Row]) -> String {
    let mut ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    ids.sort_unstable();
    ids[ROWS / 10].to_owned()
}

fn open(path: &Path) -> Database {
    let db = Database::open(path).unwrap();
    db.execute_batch(SCHEMA).unwrap();
    db.enable_sync("todo").unwrap();
    db
}

fn confluo(dir: &Path, rows: &[Row], order: &[usize]) -> Times {
    let path = dir.join("confluo.db");
    let db = open(&path);
    let bound = range_bound(rows);
    let mut t = Times {
        insert: timed(|| confluo_insert(&db, rows)),
        update: timed(|| confluo_update(&db, rows, order)),
        update_all: timed(|| confluo_update_all(&db)),
        delete: timed(|| confluo_delete(&db, rows, order)),
        delete_range: timed(|| confluo_delete_range(&db, &bound)),
        ..Times::default()
    };

    let live = db
        .query(
            "SELECT count(*), sum(length(id) + length(title) + length(status) + length(body)) FROM todo",
            &[],
        )
        .unwrap();
    let number = |v: &Value| match v {
        Value::Integer(n) => *n as f64,
        other => panic!("not a count: {other:?}"),
    };
    (t.live_rows, t.live_raw_bytes) = (number(&live.rows[0][0]), number(&live.rows[0][1]));

    let mut changes = None;
    t.export = timed(|| changes = Some(confluo_export(&db)));
    let bytes = changes.unwrap().encode();
    t.wire_bytes = bytes.len();
    t.wire_compressed_bytes = confluo_core::coding::compress(&bytes).len();

    let replica = open(&dir.join("replica.db"));
    t.apply = timed(|| confluo_apply(&replica, &bytes));
    let dump = |d: &Database| d.query("SELECT * FROM todo ORDER BY id", &[]).unwrap();
    assert_eq!(
        dump(&db),
        dump(&replica),
        "the replica differs from the source"
    );

    db.checkpoint().unwrap();
    t.size = file_size(&path);
    t
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

// As plain SQLite's side: one statement prepared for the whole loop, and
// the rows' own strings bound as parameters.

#[inline(never)]
fn confluo_insert(db: &Database, rows: &[Row]) {
    db.write(|tx| {
        let mut stmt = tx.prepare("INSERT INTO todo VALUES (?1, ?2, ?3, ?4)")?;
        for r in rows {
            stmt.execute(&[
                (&r.id).into(),
                (&r.title).into(),
                r.status.into(),
                (&r.body).into(),
            ])?;
        }
        Ok(())
    })
    .unwrap();
}

#[inline(never)]
fn confluo_update(db: &Database, rows: &[Row], order: &[usize]) {
    db.write(|tx| {
        let mut stmt = tx.prepare("UPDATE todo SET status = ?1 WHERE id = ?2")?;
        for &i in order {
            stmt.execute(&["done".into(), (&rows[i].id).into()])?;
        }
        Ok(())
    })
    .unwrap();
}

#[inline(never)]
fn confluo_update_all(db: &Database) {
    db.execute("UPDATE todo SET status = ?1", &[text("open")])
        .unwrap();
}

#[inline(never)]
fn confluo_delete(db: &Database, rows: &[Row], order: &[usize]) {
    db.write(|tx| {
        let mut stmt = tx.prepare("DELETE FROM todo WHERE id = ?1")?;
        for &i in &order[..ROWS / 10] {
            stmt.execute(&[(&rows[i].id).into()])?;
        }
        Ok(())
    })
    .unwrap();
}

#[inline(never)]
fn confluo_delete_range(db: &Database, bound: &str) {
    db.execute("DELETE FROM todo WHERE id < ?1", &[text(bound)])
        .unwrap();
}

#[inline(never)]
fn confluo_export(db: &Database) -> ChangeSet {
    db.changes_since(0, None).unwrap()
}

#[inline(never)]
fn confluo_apply(replica: &Database, bytes: &[u8]) {
    let decoded = ChangeSet::decode(bytes).unwrap();
    replica.apply(&decoded).unwrap();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn result(name: &str, value: f64, unit: &str, ratio: Option<f64>) {
    let ratio = ratio.map_or("null".to_owned(), |r| format!("{r:.3}"));
    println!("RESULT {{\"name\":\"{name}\",\"value\":{value:.4},\"unit\":\"{unit}\",\"ratio_to_plain\":{ratio}}}");
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and
    // must not spend a minute here.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runs: usize = std::env::var("CONFLUO_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let rows = workload();
    let mut order: Vec<usize> = (0..ROWS).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));

    let (mut p, mut c) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        p.push(plain(dir.path(), &rows, &order));
        c.push(confluo(dir.path(), &rows, &order));
        eprintln!("run {}/{runs} done", run + 1);
    }
    let secs = |v: &[Times], f: fn(&Times) -> Duration| {
        median(v.iter().map(|t| f(t).as_secs_f64()).collect())
    };
    for (name, f) in [
        (
            "insert_100k",
            (|t: &Times| t.insert) as fn(&Times) -> Duration,
        ),
        ("update_100k", |t: &Times| t.update),
        ("update_all_one_statement", |t: &Times| t.update_all),
        ("delete_10k", |t: &Times| t.delete),
        ("delete_10pct_one_statement", |t: &Times| t.delete_range),
    ] {
        let (pv, cv) = (secs(&p, f), secs(&c, f));
        result(name, cv, "s", Some(cv / pv));
    }
    result("export_100k", secs(&c, |t| t.export), "s", None);
    result("apply_100k_into_empty", secs(&c, |t| t.apply), "s", None);
    let size_p = median(p.iter().map(|t| t.size as f64).collect());
    let size_c = median(c.iter().map(|t| t.size as f64).collect());
    result("db_size", size_c / 1e6, "MB", Some(size_c / size_p));
    let wire = median(c.iter().map(|t| t.wire_bytes as f64).collect());
    let live_rows = median(c.iter().map(|t| t.live_rows).collect());
    let live_raw = median(c.iter().map(|t| t.live_raw_bytes).collect());
    result("wire_bytes_per_row", wire / live_rows, "bytes", None);
    let compressed = median(c.iter().map(|t| t.wire_compressed_bytes as f64).collect());
    result(
        "wire_compressed_bytes_per_row",
        compressed / live_rows,
        "bytes",
        None,
    );
    result("wire_bytes_to_raw_data", wire / live_raw, "ratio", None);
}
