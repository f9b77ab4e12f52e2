//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use confluo_core::{ApplyReport, Database, ManualTimeSource, Options, Value};

pub const TODO_SCHEMA: &str =
    "CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, title TEXT, status TEXT)";

/// An in-memory replica with the todo table synced, on a shared manual
/// clock so "later" is decided by the test.
pub fn todo_replica(clock: &Arc<ManualTimeSource>) -> Database {
    todo_replica_with(Options {
        time: clock.clone(),
        ..Options::default()
    })
}

pub fn todo_replica_with(options: Options) -> Database {
    let db = Database::open_in_memory_with(options).unwrap();
    db.execute_batch(TODO_SCHEMA).unwrap();
    db.enable_sync("todo").unwrap();
    db
}

pub fn clock() -> Arc<ManualTimeSource> {
    Arc::new(ManualTimeSource::new(1_700_000_000_000))
}

/// `to` asks `from` for what it misses and applies it.
pub fn pull(to: &Database, from: &Database) -> ApplyReport {
    let seen = to.seen_version(from.site_id()).unwrap();
    let cs = from.changes_for_peer(to.site_id(), seen).unwrap();
    // Always through the wire encoding, as a real exchange would be.
    let cs = confluo_core::ChangeSet::decode(&cs.encode()).unwrap();
    to.apply(&cs).unwrap()
}

pub fn exchange(a: &Database, b: &Database) {
    pull(a, b);
    pull(b, a);
}

/// Every row of `table`, ordered by its first column.
pub fn dump(db: &Database, table: &str) -> Vec<Vec<Value>> {
    db.query(&format!("SELECT * FROM \"{table}\" ORDER BY 1"), &[])
        .unwrap()
        .rows
}

pub fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

/// A digest of every table in the database, Confluo's metadata included.
pub fn digest(db: &Database) -> String {
    let tables = db
        .query(
            "SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name",
            &[],
        )
        .unwrap();
    let mut out = String::new();
    for row in tables.rows {
        let Value::Text(name) = &row[0] else {
            unreachable!()
        };
        out.push_str(name);
        out.push_str(&format!("{:?}\n", dump(db, name)));
    }
    out
}

/// Runs `f` on a thread of its own and fails the test if it has not ended
/// within a generous deadline: what a deadlock would otherwise hang.
pub fn within_deadline<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let worker = std::thread::spawn(f);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !worker.is_finished() {
        assert!(
            Instant::now() < deadline,
            "still running after 30 s: a deadlock"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    worker
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}
