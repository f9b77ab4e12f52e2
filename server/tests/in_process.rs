//! Devices syncing through a server running in this process.

use std::sync::Arc;

use confluo_core::{Database, SyncConfig, Value};
use confluo_server::{Auth, BackgroundServer, Config, SqliteStore};

const SCHEMA: &str = "CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, title TEXT, status TEXT)";

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

#[test]
fn two_devices_converge_through_the_server() {
    let server = server(Config::default());
    let cfg = SyncConfig::new(server.url(), "lists", "dev-token");
    let (a, b) = (device(), device());
    a.execute(
        "INSERT INTO todo VALUES ('t1', 'Buy groceries', 'in_progress')",
        &[],
    )
    .unwrap();
    let r = a.sync_now(&cfg).unwrap();
    assert_eq!(r.pushed, 3);
    assert_eq!(r.pulled, 0, "no echo of our own changes");
    let r = b.sync_now(&cfg).unwrap();
    assert_eq!((r.pushed, r.pulled, r.applied), (0, 3, 3));
    assert_eq!(dump(&a), dump(&b));

    std::thread::sleep(std::time::Duration::from_millis(3));
    a.execute("UPDATE todo SET status = 'done'", &[]).unwrap();
    b.execute("UPDATE todo SET title = 'Buy groceries and milk'", &[])
        .unwrap();
    a.sync_now(&cfg).unwrap();
    let r = b.sync_now(&cfg).unwrap();
    assert_eq!(r.pushed, 1);
    assert_eq!(
        r.pulled, 1,
        "only Alice's status comes back to Bob, not his own title"
    );
    let r = a.sync_now(&cfg).unwrap();
    assert_eq!(
        (r.pushed, r.pulled),
        (0, 1),
        "nothing pulled is pushed back"
    );
    assert_eq!(dump(&a), dump(&b));
    assert_eq!(dump(&a)[0][1], Value::Text("Buy groceries and milk".into()));
    assert_eq!(a.pending_changes().unwrap(), 0);
}

#[test]
fn large_pushes_and_versions_travel_in_parts() {
    // Tiny limits force multi-request pushes and versions split over pages.
    let config = Config {
        page_bytes: 2_000,
        ..Config::default()
    };
    let server = server(config);
    let mut cfg = SyncConfig::new(server.url(), "big", "dev-token");
    cfg.max_request_bytes = 4_000;
    let (a, b) = (device(), device());
    a.write(|tx| {
        for i in 0..500 {
            tx.execute(
                "INSERT INTO todo VALUES (?1, ?2, 'open')",
                &[format!("t{i:04}").into(), "x".repeat(40).into()],
            )?;
        }
        Ok(())
    })
    .unwrap();
    let r = a.sync_now(&cfg).unwrap();
    assert_eq!(r.pushed, 1500);
    let r = b.sync_now(&cfg).unwrap();
    assert_eq!(r.applied, 1500);
    assert_eq!(dump(&a), dump(&b));
    // The whole push is one server version: one transaction for readers.
    assert_eq!(b.server_cursor().unwrap(), 1);
}

#[test]
fn a_space_is_bound_to_one_database() {
    let server = server(Config::default());
    let a = device();
    a.sync_now(&SyncConfig::new(server.url(), "one", "dev-token"))
        .unwrap();
    let err = a
        .sync_now(&SyncConfig::new(server.url(), "two", "dev-token"))
        .unwrap_err();
    assert!(
        err.to_string().contains("syncs with space \"one\""),
        "{err}"
    );
}
