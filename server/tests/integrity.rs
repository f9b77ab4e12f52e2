//! Data integrity through the server: whatever the shape of the history and
//! the size of the pages, every device (and a fresh one) ends with the state
//! a direct peer-to-peer merge of every device's changes gives.

use std::sync::Arc;

use confluo_core::{Database, SyncConfig, Value};
use confluo_server::{Auth, BackgroundServer, Config, SqliteStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SCHEMA: &str = "CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, title TEXT, done INTEGER, note TEXT, data BLOB)";

fn device() -> Database {
    let db = Database::open_in_memory().unwrap();
    db.execute_batch(SCHEMA).unwrap();
    db.enable_sync("todo").unwrap();
    db
}

fn server(config: Config) -> BackgroundServer {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    BackgroundServer::start(store, Auth::default().with_dev_token(), config).unwrap()
}

fn dump(db: &Database) -> Vec<Vec<Value>> {
    db.query("SELECT * FROM todo ORDER BY id", &[])
        .unwrap()
        .rows
}

/// The state every replica must reach: every device's full history merged
/// directly, without the server.
fn peer_to_peer_merge(devices: &[&Database]) -> Vec<Vec<Value>> {
    let merged = device();
    for d in devices {
        merged.apply(&d.changes_since(0, None).unwrap()).unwrap();
    }
    dump(&merged)
}

fn text(n: usize, c: char) -> Value {
    Value::Text(std::iter::repeat_n(c, n).collect())
}

#[test]
fn a_cell_older_than_a_page_cut_reaches_a_fresh_device() {
    // The tester's minimal case, at real sizes with the default 4 MiB pages:
    // row r with 2.7 MB of other rows, then 1.8 MB more, then r's title.
    let server = server(Config::default());
    let cfg = SyncConfig::new(server.url(), "s", "dev-token");
    let a = device();
    let bulk = |from: usize, rows: usize| {
        a.write(|tx| {
            for i in from..from + rows {
                tx.execute(
                    "INSERT INTO todo(id, title, note) VALUES (?1, 'bulk', ?2)",
                    &[format!("b{i:05}").into(), text(900, 'x')],
                )?;
            }
            Ok(())
        })
        .unwrap();
    };
    a.execute(
        "INSERT INTO todo VALUES ('r', 'first', 0, 'a note', x'00ff')",
        &[],
    )
    .unwrap();
    bulk(0, 3000);
    a.sync_now(&cfg).unwrap();
    bulk(3000, 2000);
    a.sync_now(&cfg).unwrap();
    a.execute("UPDATE todo SET title = 'edited' WHERE id = 'r'", &[])
        .unwrap();
    a.sync_now(&cfg).unwrap();

    let fresh = device();
    fresh.sync_now(&cfg).unwrap();
    let r = fresh
        .query(
            "SELECT title, done, note, data FROM todo WHERE id = 'r'",
            &[],
        )
        .unwrap();
    assert_eq!(
        r.rows,
        vec![vec![
            Value::Text("edited".into()),
            Value::Integer(0),
            Value::Text("a note".into()),
            Value::Blob(vec![0, 0xff]),
        ]]
    );
    assert_eq!(dump(&fresh), dump(&a));
}

/// One random offline edit of the tester's shapes: upserts (often of ids
/// every device uses), toggles with a new title, deletes, and multi-row
/// transactions; notes sometimes far larger than a page.
fn random_edit(db: &Database, device: usize, rng: &mut StdRng, serial: &mut usize) {
    let shared_id = |rng: &mut StdRng| format!("s{:02}", rng.random_range(0..12));
    let own_id = |rng: &mut StdRng| format!("d{device}-{:03}", rng.random_range(0..40));
    let note = |rng: &mut StdRng| {
        if rng.random_bool(0.15) {
            text(rng.random_range(3_000..9_000), 'n')
        } else {
            Value::Text(format!("note {}", rng.random_range(0..1000)))
        }
    };
    db.write(|tx| {
        for _ in 0..rng.random_range(1..4) {
            *serial += 1;
            let id = if rng.random_bool(0.3) {
                shared_id(rng)
            } else {
                own_id(rng)
            };
            match rng.random_range(0..10) {
                0..=4 => {
                    let data: Vec<u8> = (0..rng.random_range(0..400)).map(|_| rng.random()).collect();
                    tx.execute(
                        "INSERT INTO todo(id, title, note, data) VALUES (?1, ?2, ?3, ?4) \
                         ON CONFLICT(id) DO UPDATE SET title = excluded.title, note = excluded.note",
                        &[
                            id.into(),
                            format!("title {serial}").into(),
                            note(rng),
                            Value::Blob(data),
                        ],
                    )?;
                }
                5..=7 => {
                    tx.execute(
                        "UPDATE todo SET done = 1 - coalesce(done, 0), title = ?2 WHERE id = ?1",
                        &[id.into(), format!("toggled {serial}").into()],
                    )?;
                }
                _ => {
                    tx.execute("DELETE FROM todo WHERE id = ?1", &[id.into()])?;
                }
            }
        }
        Ok(())
    })
    .unwrap();
}

fn several_devices_converge(seed: u64) {
    // Small pages, so that nearly every pull is cut in several pages and
    // many versions are sliced.
    let server = server(Config {
        page_bytes: 4_000,
        ..Config::default()
    });
    let cfg = SyncConfig::new(server.url(), "shared", "dev-token");
    let devices: Vec<Database> = (0..4).map(|_| device()).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut serial = 0;
    for _round in 0..6 {
        for (i, d) in devices.iter().enumerate() {
            for _ in 0..rng.random_range(3..10) {
                random_edit(d, i, &mut rng, &mut serial);
            }
        }
        let mut order: Vec<usize> = (0..devices.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        for i in order {
            devices[i]
                .sync_now(&cfg)
                .unwrap_or_else(|e| panic!("seed {seed}: device {i}: {e}"));
        }
    }
    // Sync until a whole round changes nothing.
    let mut rounds = 0;
    loop {
        let before: Vec<_> = devices.iter().map(dump).collect();
        for d in &devices {
            d.sync_now(&cfg).unwrap();
        }
        if devices.iter().map(dump).collect::<Vec<_>>() == before {
            break;
        }
        rounds += 1;
        assert!(rounds < 5, "seed {seed}: still changing after 5 rounds");
    }
    let expected = peer_to_peer_merge(&devices.iter().collect::<Vec<_>>());
    assert!(!expected.is_empty());
    for (i, d) in devices.iter().enumerate() {
        assert_eq!(d.pending_changes().unwrap(), 0, "seed {seed}: device {i}");
        assert!(
            dump(d) == expected,
            "seed {seed}: device {i} differs from the peer-to-peer merge"
        );
    }
    let fresh = device();
    fresh.sync_now(&cfg).unwrap();
    assert!(
        dump(&fresh) == expected,
        "seed {seed}: a fresh device differs from the peer-to-peer merge"
    );
}

#[test]
fn several_devices_with_small_pages_converge_to_the_peer_to_peer_merge() {
    for seed in 1..=4 {
        several_devices_converge(seed);
    }
}

#[test]
fn a_push_that_contradicts_a_tables_key_is_refused_and_wedges_nobody() {
    let server = server(Config::default());
    let cfg = SyncConfig::new(server.url(), "s", "dev-token");
    let a = device();
    a.execute("INSERT INTO todo(id, title) VALUES ('t1', 'milk')", &[])
        .unwrap();
    a.sync_now(&cfg).unwrap();
    // A device whose `todo` is keyed by two columns.
    let odd = Database::open_in_memory().unwrap();
    odd.execute_batch(
        "CREATE TABLE todo(id TEXT NOT NULL, list TEXT NOT NULL, title TEXT, PRIMARY KEY (id, list))",
    )
    .unwrap();
    odd.enable_sync("todo").unwrap();
    odd.execute("INSERT INTO todo VALUES ('t2', 'home', 'bread')", &[])
        .unwrap();
    let err = odd.sync_now(&cfg).unwrap_err();
    assert!(
        matches!(err, confluo_core::Error::InvalidInput(_))
            && err.to_string().contains("keys of 1 value"),
        "{err}"
    );
    // Everyone else goes on syncing, fresh devices included.
    a.execute("INSERT INTO todo(id, title) VALUES ('t3', 'eggs')", &[])
        .unwrap();
    a.sync_now(&cfg).unwrap();
    let fresh = device();
    fresh.sync_now(&cfg).unwrap();
    assert_eq!(dump(&fresh), dump(&a));
    assert_eq!(fresh.rejected_count().unwrap(), 0);
}

#[test]
fn a_change_a_device_cannot_apply_is_kept_aside_and_the_rest_applied() {
    let server = server(Config::default());
    let cfg = SyncConfig::new(server.url(), "s", "dev-token");
    let a = device();
    // B refuses one title (its app's own rule); A does not.
    let b = device();
    b.execute_batch(
        "CREATE TRIGGER no_bad_titles BEFORE INSERT ON todo WHEN NEW.title = 'bad' \
         BEGIN SELECT RAISE(ABORT, 'no bad titles'); END",
    )
    .unwrap();
    a.write(|tx| {
        for (id, title) in [("t1", "good"), ("t2", "bad"), ("t3", "fine")] {
            tx.execute(
                "INSERT INTO todo(id, title) VALUES (?1, ?2)",
                &[id.into(), title.into()],
            )?;
        }
        Ok(())
    })
    .unwrap();
    a.sync_now(&cfg).unwrap();
    let report = b.sync_now(&cfg).unwrap();
    assert_eq!(
        report.rejected, 5,
        "t2's marker and four columns: {report:?}"
    );
    let ids = |db: &Database| -> Vec<Value> {
        db.query("SELECT id FROM todo ORDER BY id", &[])
            .unwrap()
            .rows
            .into_iter()
            .map(|mut r| r.remove(0))
            .collect()
    };
    assert_eq!(ids(&b), vec![Value::from("t1"), Value::from("t3")]);
    let rejected = b.rejected_changes().unwrap();
    assert_eq!(rejected.len(), 5);
    assert!(
        rejected
            .iter()
            .all(|r| r.change.pk[0] == Value::from("t2") && r.reason.contains("no bad titles")),
        "{rejected:?}"
    );
    // The cursor moved on: later changes arrive as usual.
    a.execute("UPDATE todo SET title = 'better' WHERE id = 't1'", &[])
        .unwrap();
    a.sync_now(&cfg).unwrap();
    b.sync_now(&cfg).unwrap();
    assert_eq!(
        b.query("SELECT title FROM todo WHERE id = 't1'", &[])
            .unwrap()
            .rows,
        vec![vec![Value::from("better")]]
    );
    // A migration that lifts the rule lets the kept changes in.
    b.alter_synced_table("todo", "DROP TRIGGER no_bad_titles")
        .unwrap();
    assert_eq!(b.rejected_count().unwrap(), 0);
    assert_eq!(dump(&b), dump(&a));
    assert_eq!(b.pending_changes().unwrap(), 0, "they came from the server");
}

/// A device whose wall clock is `offset_ms` off the true time.
fn device_with_clock(offset_ms: i64) -> (Database, Arc<confluo_core::ManualTimeSource>) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let clock = Arc::new(confluo_core::ManualTimeSource::new(
        (now + offset_ms) as u64,
    ));
    let db = Database::open_in_memory_with(confluo_core::Options {
        time: clock.clone(),
        ..Default::default()
    })
    .unwrap();
    db.execute_batch(SCHEMA).unwrap();
    db.enable_sync("todo").unwrap();
    (db, clock)
}

#[test]
fn devices_with_skewed_clocks_within_the_servers_limit_sync_both_ways() {
    let server = server(Config::default());
    let cfg = SyncConfig::new(server.url(), "s", "dev-token");
    let minutes = |m: i64| m * 60_000;
    let (fast, _) = device_with_clock(minutes(35));
    let (slow, slow_clock) = device_with_clock(minutes(-35));
    fast.execute(
        "INSERT INTO todo(id, title) VALUES ('t1', 'from fast')",
        &[],
    )
    .unwrap();
    fast.sync_now(&cfg).unwrap();
    // 70 minutes ahead of the slow device's clock, relayed by a server
    // that judged it against its own: taken.
    let report = slow.sync_now(&cfg).unwrap();
    assert_eq!(report.applied, 5);
    let offset = report.clock_offset_ms.expect("the server tells its time");
    assert!(
        (minutes(34)..minutes(36)).contains(&offset),
        "the slow device learns its clock is 35 minutes behind: {offset} ms"
    );
    // Its next edit comes after what it saw, whatever its wall clock says.
    slow_clock.advance(1);
    slow.execute("UPDATE todo SET title = 'from slow' WHERE id = 't1'", &[])
        .unwrap();
    slow.sync_now(&cfg).unwrap();
    fast.sync_now(&cfg).unwrap();
    assert_eq!(dump(&fast), dump(&slow));
    assert_eq!(dump(&fast)[0][1], Value::from("from slow"));
    // Directly between peers the drift guard still holds.
    let (very_slow, _) = device_with_clock(minutes(-90));
    let err = very_slow
        .apply(&fast.changes_since(0, None).unwrap())
        .unwrap_err();
    assert!(
        matches!(err, confluo_core::Error::ClockDrift { .. }),
        "{err}"
    );
}

/// A token provider that fails its calls number `from..` until `heal`.
struct FlakyToken {
    calls: std::sync::atomic::AtomicUsize,
    fail_from: usize,
    healed: std::sync::atomic::AtomicBool,
}

impl confluo_core::TokenProvider for FlakyToken {
    fn token(&self) -> Result<String, String> {
        use std::sync::atomic::Ordering;
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if n >= self.fail_from && !self.healed.load(Ordering::SeqCst) {
            return Err("the network went away".into());
        }
        Ok("dev-token".into())
    }
}

#[test]
fn a_push_retried_after_a_failure_replaces_its_staged_parts() {
    let a = device();
    a.write(|tx| {
        for i in 0..300 {
            tx.execute(
                "INSERT INTO todo(id, title, note) VALUES (?1, 'x', ?2)",
                &[format!("t{i:04}").into(), text(60, 'n')],
            )?;
        }
        Ok(())
    })
    .unwrap();
    // Room for one copy of the push's parts (a little more, for the
    // headers of each part), not for one and a half.
    let whole = a.changes_for_server().unwrap().encode().len() * 6 / 5;
    let store = Arc::new(
        SqliteStore::open_in_memory()
            .unwrap()
            .with_staging_cap(whole),
    );
    let server =
        BackgroundServer::start(store, Auth::default().with_dev_token(), Config::default())
            .unwrap();
    let token = Arc::new(FlakyToken {
        calls: 0.into(),
        fail_from: 8,
        healed: false.into(),
    });
    let mut cfg = SyncConfig::with_token_provider(server.url(), "s", token.clone());
    cfg.max_request_bytes = 2_000;
    // Eight parts are staged, then the push breaks off.
    let err = a.sync_now(&cfg).unwrap_err();
    assert!(matches!(err, confluo_core::Error::Auth(_)), "{err}");
    token
        .healed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let report = a.sync_now(&cfg).unwrap();
    assert_eq!(report.pushed, 1500);
    let fresh = device();
    fresh
        .sync_now(&SyncConfig::new(server.url(), "s", "dev-token"))
        .unwrap();
    assert_eq!(dump(&fresh), dump(&a));
}

#[test]
fn a_row_larger_than_a_request_body_still_syncs() {
    let server = server(Config::default());
    let cfg = SyncConfig::new(server.url(), "s", "dev-token");
    let columns: Vec<String> = (0..17).map(|i| format!("c{i} BLOB")).collect();
    let schema = format!(
        "CREATE TABLE big(id INTEGER PRIMARY KEY, {})",
        columns.join(", ")
    );
    let open = || {
        let db = Database::open_in_memory().unwrap();
        db.execute_batch(&schema).unwrap();
        db.enable_sync("big").unwrap();
        db
    };
    let (a, b) = (open(), open());
    // 17 MiB in one row: more than the server's 16 MiB body limit.
    let values: Vec<Value> = std::iter::once(Value::Integer(1))
        .chain((0..17u8).map(|i| Value::Blob(vec![i; 1 << 20])))
        .collect();
    let marks: Vec<String> = (1..=18).map(|i| format!("?{i}")).collect();
    a.execute(
        &format!("INSERT INTO big VALUES ({})", marks.join(", ")),
        &values,
    )
    .unwrap();
    a.sync_now(&cfg).unwrap();
    assert_eq!(a.pending_changes().unwrap(), 0);
    b.sync_now(&cfg).unwrap();
    let got = b.query("SELECT * FROM big", &[]).unwrap();
    assert_eq!(got.rows, vec![values]);
}

#[test]
fn a_server_restored_from_a_backup_is_noticed_and_gets_every_write_back() {
    let dir = tempfile::tempdir().unwrap();
    let (live, backup) = (dir.path().join("server.db"), dir.path().join("backup.db"));
    let start = |path: &std::path::Path| {
        let store = Arc::new(SqliteStore::open(path).unwrap());
        BackgroundServer::start(store, Auth::default().with_dev_token(), Config::default()).unwrap()
    };
    let (a, b, c) = (device(), device(), device());
    let first = start(&live);
    let cfg = SyncConfig::new(first.url(), "s", "dev-token");
    a.execute(
        "INSERT INTO todo(id, title) VALUES ('t1', 'before the backup')",
        &[],
    )
    .unwrap();
    a.sync_now(&cfg).unwrap();
    rusqlite::Connection::open(&live)
        .unwrap()
        .execute("VACUUM INTO ?1", [backup.to_str().unwrap()])
        .unwrap();
    // Acknowledged after the backup was taken, and seen by B.
    a.execute(
        "INSERT INTO todo(id, title) VALUES ('t2', 'after the backup')",
        &[],
    )
    .unwrap();
    a.sync_now(&cfg).unwrap();
    b.sync_now(&cfg).unwrap();
    assert_eq!(b.server_cursor().unwrap(), 2);
    drop(first);

    // The operator restores the backup; C's push reuses version 2.
    let second = start(&backup);
    let cfg = SyncConfig::new(second.url(), "s", "dev-token");
    c.execute(
        "INSERT INTO todo(id, title) VALUES ('t3', 'after the restore')",
        &[],
    )
    .unwrap();
    c.sync_now(&cfg).unwrap();
    assert_eq!(
        c.server_cursor().unwrap(),
        2,
        "the version number is reused"
    );
    for _ in 0..2 {
        for d in [&a, &b, &c] {
            d.sync_now(&cfg).unwrap();
        }
    }
    let expected = peer_to_peer_merge(&[&a, &b, &c]);
    assert_eq!(expected.len(), 3);
    for d in [&a, &b, &c] {
        assert_eq!(dump(d), expected);
    }
    let fresh = device();
    fresh.sync_now(&cfg).unwrap();
    assert_eq!(dump(&fresh), expected, "t2 is back on the server");
}

#[test]
fn migrations_rolled_out_at_different_times_converge_through_the_server() {
    let server = server(Config::default());
    let cfg = SyncConfig::new(server.url(), "s", "dev-token");
    let migrations = [
        "ALTER TABLE todo RENAME COLUMN title TO task",
        "ALTER TABLE todo DROP COLUMN note; ALTER TABLE todo ADD COLUMN note TEXT",
    ];
    let (a, b) = (device(), device());
    a.execute(
        "INSERT INTO todo(id, title, note) VALUES ('t1', 'milk', 'old note')",
        &[],
    )
    .unwrap();
    a.sync_now(&cfg).unwrap();
    b.sync_now(&cfg).unwrap();
    for m in migrations {
        a.alter_synced_table("todo", m).unwrap();
    }
    a.execute("UPDATE todo SET note = 'new note'", &[]).unwrap();
    a.sync_now(&cfg).unwrap();
    // B, still on the first schema, edits the title.
    b.execute("UPDATE todo SET title = 'oat milk'", &[])
        .unwrap();
    b.sync_now(&cfg).unwrap();
    for m in migrations {
        b.alter_synced_table("todo", m).unwrap();
    }
    b.sync_now(&cfg).unwrap();
    a.sync_now(&cfg).unwrap();
    let fresh = device();
    for m in migrations {
        fresh.alter_synced_table("todo", m).unwrap();
    }
    fresh.sync_now(&cfg).unwrap();
    let view = |db: &Database| {
        db.query("SELECT id, task, note FROM todo", &[])
            .unwrap()
            .rows
    };
    let expected = vec![vec![
        Value::from("t1"),
        Value::from("oat milk"),
        Value::from("new note"),
    ]];
    for db in [&a, &b, &fresh] {
        assert_eq!(view(db), expected);
    }
}

/// A token provider that answers `ok` times, then fails.
struct FailsAfter {
    ok: usize,
    calls: std::sync::atomic::AtomicUsize,
}

impl confluo_core::TokenProvider for FailsAfter {
    fn token(&self) -> Result<String, String> {
        let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if n < self.ok {
            Ok("dev-token".into())
        } else {
            Err("offline".into())
        }
    }
}

#[test]
fn a_restore_to_before_an_accepted_push_is_noticed_while_the_cursor_is_behind_it() {
    let dir = tempfile::tempdir().unwrap();
    let (live, backup) = (dir.path().join("server.db"), dir.path().join("backup.db"));
    let config = || Config {
        page_bytes: 2_000,
        ..Config::default()
    };
    let start = |path: &std::path::Path| {
        let store = Arc::new(SqliteStore::open(path).unwrap());
        BackgroundServer::start(store, Auth::default().with_dev_token(), config()).unwrap()
    };
    let first = start(&live);
    let cfg = SyncConfig::new(first.url(), "s", "dev-token");
    let (a, b) = (device(), device());
    a.execute("INSERT INTO todo(id, title) VALUES ('a0', 'x')", &[])
        .unwrap();
    a.sync_now(&cfg).unwrap();
    // B's writes: more than a page for A to pull later.
    for v in 0..2 {
        b.write(|tx| {
            for i in 0..40 {
                tx.execute(
                    "INSERT INTO todo(id, title) VALUES (?1, ?2)",
                    &[format!("b{v}-{i:02}").into(), text(100, 'y')],
                )?;
            }
            Ok(())
        })
        .unwrap();
        b.sync_now(&cfg).unwrap();
    }
    rusqlite::Connection::open(&live)
        .unwrap()
        .execute("VACUUM INTO ?1", [backup.to_str().unwrap()])
        .unwrap();
    // A's push is accepted; the pull after it breaks off, so A's cursor
    // stays behind the version its push made.
    a.execute(
        "INSERT INTO todo(id, title) VALUES ('a1', 'acknowledged')",
        &[],
    )
    .unwrap();
    let flaky = SyncConfig::with_token_provider(
        first.url(),
        "s",
        Arc::new(FailsAfter {
            ok: 1,
            calls: 0.into(),
        }),
    );
    assert!(a.sync_now(&flaky).is_err());
    assert_eq!(a.pending_changes().unwrap(), 0, "the push was accepted");
    drop(first);
    let second = start(&backup);
    let cfg = SyncConfig::new(second.url(), "s", "dev-token");
    for _ in 0..2 {
        a.sync_now(&cfg).unwrap();
        b.sync_now(&cfg).unwrap();
    }
    let fresh = device();
    fresh.sync_now(&cfg).unwrap();
    assert_eq!(
        fresh
            .query("SELECT title FROM todo WHERE id = 'a1'", &[])
            .unwrap()
            .rows,
        vec![vec![Value::from("acknowledged")]],
        "the acknowledged write came back to the restored server"
    );
    assert_eq!(dump(&fresh), dump(&a));
}

/// Random migrations (add, rename, drop, remake of columns, remake of the
/// table) rolled out at random times, with upserts and deletes on old and
/// new schemas, through a server with tiny pages: every device, and a new
/// install that runs the history, ends the same.
#[test]
fn random_migrations_and_writes_through_a_server_with_tiny_pages_converge() {
    const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
    let base = "CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, name TEXT, note TEXT)";
    for seed in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut live: Vec<String> = vec!["name".into(), "note".into()];
        let mut steps: Vec<String> = Vec::new();
        let mut shapes = vec![live.clone()];
        for _ in 0..rng.random_range(1..6) {
            let unused: Vec<&str> = NAMES
                .iter()
                .copied()
                .filter(|n| !live.iter().any(|l| l == n))
                .collect();
            let sql = match rng.random_range(0..5) {
                0 if !unused.is_empty() => {
                    let n = unused[rng.random_range(0..unused.len())];
                    live.push(n.into());
                    format!("ALTER TABLE todo ADD COLUMN {n} TEXT")
                }
                1 if !unused.is_empty() => {
                    let i = rng.random_range(0..live.len());
                    let to = unused[rng.random_range(0..unused.len())];
                    let from = std::mem::replace(&mut live[i], to.into());
                    format!("ALTER TABLE todo RENAME COLUMN {from} TO {to}")
                }
                2 if live.len() > 1 => {
                    let n = live.remove(rng.random_range(0..live.len()));
                    format!("ALTER TABLE todo DROP COLUMN {n}")
                }
                3 if live.len() > 1 => {
                    let n = live.remove(rng.random_range(0..live.len()));
                    live.push(n.clone());
                    format!(
                        "ALTER TABLE todo DROP COLUMN {n}; ALTER TABLE todo ADD COLUMN {n} TEXT"
                    )
                }
                4 => {
                    let defs: Vec<String> = live.iter().map(|n| format!("{n} TEXT")).collect();
                    format!(
                        "DROP TABLE todo; CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, {})",
                        defs.join(", ")
                    )
                }
                _ => continue,
            };
            steps.push(sql);
            shapes.push(live.clone());
        }
        let server = server(Config {
            page_bytes: 300,
            ..Config::default()
        });
        let cfg = SyncConfig::new(server.url(), "s", "dev-token");
        let open = || {
            let db = Database::open_in_memory().unwrap();
            db.enable_sync_with_history("todo", base, &[]).unwrap();
            db
        };
        let devices: Vec<Database> = (0..3).map(|_| open()).collect();
        let mut at = [0usize; 3];
        for _ in 0..rng.random_range(5..60) {
            let d = rng.random_range(0..3);
            match rng.random_range(0..7) {
                0 if at[d] < steps.len() => {
                    devices[d]
                        .alter_synced_table("todo", &steps[at[d]])
                        .unwrap();
                    at[d] += 1;
                }
                1..=3 => {
                    let columns = &shapes[at[d]];
                    let name = &columns[rng.random_range(0..columns.len())];
                    let key = format!("k{}", rng.random_range(0..4));
                    devices[d]
                        .execute(
                            &format!(
                                "INSERT INTO todo(id, {name}) VALUES (?1, ?2) \
                                 ON CONFLICT(id) DO UPDATE SET {name} = excluded.{name}"
                            ),
                            &[key.into(), text(rng.random_range(1..200), 'x')],
                        )
                        .unwrap();
                }
                4 => {
                    let key = format!("k{}", rng.random_range(0..4));
                    devices[d]
                        .execute("DELETE FROM todo WHERE id = ?1", &[key.into()])
                        .unwrap();
                }
                _ => {
                    devices[d]
                        .sync_now(&cfg)
                        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                }
            }
        }
        for (d, db) in devices.iter().enumerate() {
            while at[d] < steps.len() {
                db.alter_synced_table("todo", &steps[at[d]]).unwrap();
                at[d] += 1;
            }
        }
        for _ in 0..2 {
            for db in &devices {
                db.sync_now(&cfg).unwrap();
            }
        }
        let history: Vec<&str> = steps.iter().map(String::as_str).collect();
        let fresh = Database::open_in_memory().unwrap();
        fresh
            .enable_sync_with_history("todo", base, &history)
            .unwrap();
        fresh.sync_now(&cfg).unwrap();
        let end = shapes.last().unwrap();
        let view = |db: &Database| {
            db.query(
                &format!("SELECT id, {} FROM todo ORDER BY id", end.join(", ")),
                &[],
            )
            .unwrap()
            .rows
        };
        let expected = view(&devices[0]);
        for (i, db) in devices.iter().chain([&fresh]).enumerate() {
            assert!(
                view(db) == expected,
                "seed {seed}: device {i} (3: a new install) differs after {steps:?}"
            );
        }
    }
}

#[test]
fn a_long_sync_tells_its_progress_page_by_page() {
    let server = server(Config {
        page_bytes: 2_000,
        ..Config::default()
    });
    let a = device();
    a.write(|tx| {
        for i in 0..200 {
            tx.execute(
                "INSERT INTO todo(id, title) VALUES (?1, ?2)",
                &[format!("t{i:03}").into(), text(50, 't')],
            )?;
        }
        Ok(())
    })
    .unwrap();
    a.sync_now(&SyncConfig::new(server.url(), "s", "dev-token"))
        .unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut cfg = SyncConfig::new(server.url(), "s", "dev-token");
    let log = seen.clone();
    cfg.progress = Some(Arc::new(move |r: &confluo_core::SyncReport| {
        log.lock().unwrap().push((r.pulled, r.bytes_received));
    }));
    let b = device();
    let report = b.sync_now(&cfg).unwrap();
    let seen = seen.lock().unwrap();
    assert!(seen.len() > 3, "one call per page: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1),
        "{seen:?}"
    );
    assert_eq!(seen.last().unwrap().0, report.pulled);
}
