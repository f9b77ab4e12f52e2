//! The push mark (what the server has of ours) against a model: random
//! pushes and pulls through a simulated server, with two handles on one
//! device file, bulk entries, a peer, and another device. Whatever the
//! interleaving, once everyone is synced the server's log alone rebuilds
//! the device's data: no local change is skipped by the mark.

mod common;

use std::sync::Arc;

use common::*;
use confluo_core::{Change, Database, ManualTimeSource, Options, Value};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Server {
    log: Vec<Vec<Change>>,
}

struct Device<'a> {
    handles: Vec<&'a Database>,
}

fn push(db: &Database, server: &mut Server) {
    let cs = db.changes_for_server().unwrap();
    if !cs.changes.is_empty() {
        server.log.push(cs.changes.clone());
        db.mark_pushed(cs.until).unwrap();
    } else if cs.until > cs.since {
        db.mark_pushed(cs.until).unwrap();
    }
}

fn pull_server(db: &Database, server: &Server) {
    let cursor = db.server_cursor().unwrap() as usize;
    if cursor >= server.log.len() {
        return;
    }
    // One version at a time, as pages would.
    for (i, v) in server.log.iter().enumerate().skip(cursor) {
        db.apply_from_server(v, (i + 1) as u64, None).unwrap();
    }
}

fn local_write(db: &Database, rng: &mut Rng, tick: &Arc<ManualTimeSource>) {
    tick.advance(1);
    let key = format!("k{}", rng.below(12));
    let v = Value::Text(format!("v{}", rng.next() % 1000));
    match rng.below(5) {
        0 | 1 => {
            db.execute(
                "INSERT INTO todo VALUES (?1, ?2, 'open') ON CONFLICT(id) DO UPDATE SET title = excluded.title",
                &[Value::Text(key), v],
            )
            .unwrap();
        }
        2 => {
            db.execute(
                "UPDATE todo SET status = ?1 WHERE id = ?2",
                &[v, Value::Text(key)],
            )
            .unwrap();
        }
        3 => {
            // Many rows alike: a bulk entry (bulk_update_rows is small).
            db.execute("UPDATE todo SET status = ?1", &[v]).unwrap();
        }
        _ => {
            db.execute("DELETE FROM todo WHERE id = ?1", &[Value::Text(key)])
                .unwrap();
        }
    }
}

fn run(seed: u64) {
    let clock = clock();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let opts = || Options {
        time: clock.clone(),
        bulk_update_rows: 3,
        ..Options::default()
    };
    let a1 = Database::open_with(&path, opts()).unwrap();
    a1.execute_batch(TODO_SCHEMA).unwrap();
    a1.enable_sync("todo").unwrap();
    let a2 = Database::open_with(&path, opts()).unwrap();
    let other = todo_replica_with(opts());
    let peer = todo_replica_with(opts());
    let mut server = Server { log: Vec::new() };
    let dev = Device {
        handles: vec![&a1, &a2],
    };
    let mut rng = Rng(seed | 1);
    for _ in 0..300 {
        let h = dev.handles[rng.below(2) as usize];
        match rng.below(9) {
            0 | 1 => local_write(h, &mut rng, &clock),
            2 => local_write(&other, &mut rng, &clock),
            3 => local_write(&peer, &mut rng, &clock),
            4 => {
                push(&other, &mut server);
                pull_server(&other, &server);
            }
            5 => pull_server(h, &server),
            6 => push(h, &mut server),
            7 => {
                // A peer's changes reach the device directly.
                pull(h, &peer);
            }
            _ => {
                pull(&peer, h);
            }
        }
    }
    // Everyone syncs until quiet.
    for _ in 0..3 {
        pull(&a1, &peer);
        push(&a1, &mut server);
        pull_server(&a1, &server);
        push(&other, &mut server);
        pull_server(&other, &server);
    }
    assert_eq!(a1.pending_changes().unwrap(), 0, "seed {seed}");
    let fresh = todo_replica_with(opts());
    pull_server(&fresh, &server);
    assert_eq!(dump(&fresh, "todo"), dump(&a1, "todo"), "seed {seed}");
    assert_eq!(dump(&other, "todo"), dump(&a1, "todo"), "seed {seed}");
    assert_eq!(dump(&a2, "todo"), dump(&a1, "todo"), "seed {seed}");
}

#[test]
fn the_server_log_alone_rebuilds_the_device_whatever_the_interleaving() {
    for seed in 1..60u64 {
        run(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    }
}

/// Rows written before the table was synced are unsent: a pull right
/// after does not move the mark past them.
#[test]
fn rows_written_before_sync_still_go_out_after_a_first_pull() {
    let c = clock();
    let a = Database::open_in_memory_with(Options {
        time: c.clone(),
        ..Options::default()
    })
    .unwrap();
    a.execute_batch(TODO_SCHEMA).unwrap();
    a.execute(
        "INSERT INTO todo VALUES ('mine', 'before sync', 'open')",
        &[],
    )
    .unwrap();
    a.enable_sync("todo").unwrap();
    let other = todo_replica(&c);
    other
        .execute("INSERT INTO todo VALUES ('t', 'theirs', 'open')", &[])
        .unwrap();
    let theirs = other.changes_since(0, None).unwrap().changes;
    a.apply_from_server(&theirs, 1, None).unwrap();
    assert_eq!(a.pending_changes().unwrap(), 1);
    let out = a.changes_for_server().unwrap();
    assert!(
        out.changes.iter().any(|ch| ch.pk[0] == text("mine")),
        "{out:?}"
    );
}
