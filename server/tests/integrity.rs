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
