//! Devices syncing through a server running in this process.

use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Runs `f` on a thread of its own and fails the test if it has not ended
/// within a generous deadline: what a deadlock would otherwise hang.
fn within_deadline<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let worker = std::thread::spawn(f);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !worker.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "still running after 30 s: a deadlock"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    worker
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// `n` rows of 40 characters of title, in one transaction.
fn insert_rows(db: &Database, n: usize) {
    db.write(|tx| {
        for i in 0..n {
            tx.execute(
                "INSERT INTO todo VALUES (?1, ?2, 'open')",
                &[format!("t{i:04}").into(), "x".repeat(40).into()],
            )?;
        }
        Ok(())
    })
    .unwrap();
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
    insert_rows(&a, 500);
    let r = a.sync_now(&cfg).unwrap();
    assert_eq!(r.pushed, 1500);
    let r = b.sync_now(&cfg).unwrap();
    assert_eq!(r.applied, 1500);
    assert_eq!(dump(&a), dump(&b));
    // The whole push is one server version: one transaction for readers.
    assert_eq!(b.server_cursor().unwrap(), 1);
}

#[test]
fn a_version_over_many_pages_lands_whole_or_not_at_all() {
    use std::sync::atomic::AtomicBool;
    let server = server(Config {
        page_bytes: 2_000,
        ..Config::default()
    });
    let cfg = SyncConfig::new(server.url(), "pages", "dev-token");
    let (a, b) = (device(), device());
    insert_rows(&a, 300);
    a.sync_now(&cfg).unwrap();
    // B's pull stops after three of the version's pages.
    let cancel = Arc::new(AtomicBool::new(false));
    let pages = Arc::new(AtomicUsize::new(0));
    let mut cut = cfg.clone();
    cut.cancel = Some(cancel.clone());
    let (p, c) = (pages.clone(), cancel.clone());
    cut.progress = Some(Arc::new(move |_: &confluo_core::SyncReport| {
        if p.fetch_add(1, Ordering::SeqCst) + 1 == 3 {
            c.store(true, Ordering::SeqCst);
        }
    }));
    let err = b.sync_now(&cut).unwrap_err();
    assert!(matches!(err, confluo_core::Error::Cancelled), "{err}");
    assert!(dump(&b).is_empty(), "part of a version was applied");
    assert_eq!(b.server_cursor().unwrap(), 0);
    // The next pull starts the version again and lands it whole.
    let r = b.sync_now(&cfg).unwrap();
    assert_eq!(r.applied, 900);
    assert_eq!(dump(&a), dump(&b));
    assert_eq!(b.server_cursor().unwrap(), 1);
}

/// A token for the first `good` requests, none after: a request that
/// fails at a chosen point of a sync.
struct TokensRunOut {
    good: AtomicUsize,
}

impl confluo_core::TokenProvider for TokensRunOut {
    fn token(&self) -> Result<String, String> {
        match self
            .good
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        {
            Ok(_) => Ok("dev-token".into()),
            Err(_) => Err("the test's tokens ran out".into()),
        }
    }
}

fn failing_after(cfg: &SyncConfig, requests: usize) -> SyncConfig {
    SyncConfig {
        token: Arc::new(TokensRunOut {
            good: AtomicUsize::new(requests),
        }),
        ..cfg.clone()
    }
}

/// Parts and pages travel while the ones before them are prepared or
/// stored: a request that fails in the middle still fails the sync, at
/// once, with nothing of the push or the version half done.
#[test]
fn a_request_failing_midway_through_many_parts_or_pages_lands_nothing() {
    let server = server(Config {
        page_bytes: 2_000,
        ..Config::default()
    });
    let mut cfg = SyncConfig::new(server.url(), "midway", "dev-token");
    cfg.max_request_bytes = 4_000;
    let (a, b) = (Arc::new(device()), Arc::new(device()));
    insert_rows(&a, 300);
    // The push's third part finds no token.
    let (a_cfg, failing) = (cfg.clone(), failing_after(&cfg, 2));
    let err = within_deadline({
        let a = a.clone();
        move || a.sync_now(&failing).unwrap_err()
    });
    assert!(matches!(err, confluo_core::Error::Auth(_)), "{err}");
    assert_eq!(a.pending_changes().unwrap(), 300, "the push was not taken");
    let r = a.sync_now(&a_cfg).unwrap();
    assert_eq!(r.pushed, 900);
    // B's pull: the fifth page's request finds no token.
    for good in [1, 4] {
        let failing = failing_after(&cfg, good);
        let err = within_deadline({
            let b = b.clone();
            move || b.sync_now(&failing).unwrap_err()
        });
        assert!(matches!(err, confluo_core::Error::Auth(_)), "{err}");
        assert!(dump(&b).is_empty(), "part of a version was applied");
        assert_eq!(b.server_cursor().unwrap(), 0);
    }
    let r = b.sync_now(&cfg).unwrap();
    assert_eq!(r.applied, 900);
    assert_eq!(dump(&a), dump(&b));
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

#[test]
fn concurrent_syncs_of_one_database_all_succeed_and_converge() {
    let server = server(Config::default());
    for space in 0..10 {
        let cfg = SyncConfig::new(server.url(), format!("busy-{space}"), "dev-token");
        let (a, b) = (Arc::new(device()), device());
        // Background sync runs beside the explicit ones.
        let mut eager = cfg.clone();
        eager.debounce = std::time::Duration::from_millis(1);
        let background = a
            .start_sync(eager, |_: &confluo_core::SyncStatus| {})
            .unwrap();
        for round in 0..10 {
            let key = |who: &str| Value::Text(format!("{who}-{round}"));
            a.execute("INSERT INTO todo VALUES (?1, 'x', 'y')", &[key("a")])
                .unwrap();
            b.execute("INSERT INTO todo VALUES (?1, 'x', 'y')", &[key("b")])
                .unwrap();
            b.sync_now(&cfg).unwrap();
            std::thread::scope(|s| {
                let syncs: Vec<_> = (0..4).map(|_| s.spawn(|| a.sync_now(&cfg))).collect();
                for sync in syncs {
                    if let Err(e) = sync.join().unwrap() {
                        panic!("space {space}, round {round}: {e}");
                    }
                }
            });
        }
        background.stop();
        b.sync_now(&cfg).unwrap();
        assert_eq!(dump(&a).len(), 20);
        assert_eq!(dump(&a), dump(&b));
        assert_eq!(a.pending_changes().unwrap(), 0);
    }
}

#[test]
fn syncs_of_one_database_never_overlap() {
    use std::sync::{Condvar, Mutex};
    use std::time::{Duration, Instant};
    // Every request asks for a token first. The provider holds each caller
    // until a second caller is inside too, or a while has passed: a second
    // sync of the database that reaches the server meanwhile overlaps.
    #[derive(Default)]
    struct Meeting {
        inside: Mutex<(usize, usize)>,
        arrived: Condvar,
    }
    impl confluo_core::TokenProvider for Meeting {
        fn token(&self) -> Result<String, String> {
            let mut inside = self.inside.lock().unwrap();
            inside.0 += 1;
            inside.1 = inside.1.max(inside.0);
            self.arrived.notify_all();
            let until = Instant::now() + Duration::from_secs(1);
            while inside.0 < 2 && Instant::now() < until {
                inside = self
                    .arrived
                    .wait_timeout(inside, until.saturating_duration_since(Instant::now()))
                    .unwrap()
                    .0;
            }
            inside.0 -= 1;
            Ok("dev-token".into())
        }
    }
    let server = server(Config::default());
    let meeting = Arc::new(Meeting::default());
    let cfg = SyncConfig::with_token_provider(server.url(), "one-at-a-time", meeting.clone());
    let a = device();
    a.execute("INSERT INTO todo VALUES ('k', 'x', 'y')", &[])
        .unwrap();
    std::thread::scope(|s| {
        let syncs: Vec<_> = (0..2).map(|_| s.spawn(|| a.sync_now(&cfg))).collect();
        for sync in syncs {
            sync.join().unwrap().unwrap();
        }
    });
    assert_eq!(meeting.inside.lock().unwrap().1, 1, "two syncs overlapped");
}

#[test]
fn a_listener_that_syncs_from_inside_a_sync_is_refused_not_deadlocked() {
    let server = server(Config::default());
    let cfg = SyncConfig::new(server.url(), "nested", "dev-token");
    let (a, b) = (Arc::new(device()), device());
    b.execute("INSERT INTO todo VALUES ('k', 'x', 'y')", &[])
        .unwrap();
    b.sync_now(&cfg).unwrap();
    let nested: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let (inner, seen, c) = (Arc::downgrade(&a), nested.clone(), cfg.clone());
    let _watch = a.observe(&["todo"], move |_: &[String]| {
        if let Some(a) = inner.upgrade() {
            let r = a.sync_now(&c);
            seen.lock().unwrap().push(format!("{r:?}"));
        }
    });
    // Applying B's row calls the listener on the syncing thread.
    let report = within_deadline({
        let (a, cfg) = (a.clone(), cfg.clone());
        move || a.sync_now(&cfg).unwrap()
    });
    assert_eq!(report.applied, 3);
    let nested = nested.lock().unwrap();
    assert_eq!(nested.len(), 1);
    assert!(nested[0].contains("already syncing"), "{nested:?}");
}

/// A loopback proxy to `upstream` that passes the first request of each
/// connection and hangs up, without a word, on the next one: what a client
/// meets when the server dropped a keep-alive connection it reuses. Each
/// first request waits until `gather` connections have sent theirs (10 s
/// at most), so that many are open at once. Counts the hang-ups.
fn hang_up_on_reused_connections(
    upstream: std::net::SocketAddr,
    gather: usize,
) -> (String, Arc<AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::{Condvar, Mutex};
    use std::time::{Duration, Instant};
    #[derive(Default)]
    struct Shared {
        first_requests: Mutex<usize>,
        arrived: Condvar,
        hung_up: Arc<AtomicUsize>,
    }
    fn relay(
        client: TcpStream,
        upstream: std::net::SocketAddr,
        gather: usize,
        shared: &Shared,
    ) -> std::io::Result<()> {
        let mut server = TcpStream::connect(upstream)?;
        let (mut from_server, mut to_client) = (server.try_clone()?, client.try_clone()?);
        let answers = std::thread::spawn(move || std::io::copy(&mut from_server, &mut to_client));
        // The first request: its head, then a body of its Content-Length.
        let mut reader = BufReader::new(client.try_clone()?);
        let mut head = String::new();
        while !head.ends_with("\r\n\r\n") {
            if reader.read_line(&mut head)? == 0 {
                return Ok(());
            }
        }
        let length = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.trim().parse().unwrap());
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        {
            let mut n = shared.first_requests.lock().unwrap();
            *n += 1;
            shared.arrived.notify_all();
            let until = Instant::now() + Duration::from_secs(10);
            while *n < gather && Instant::now() < until {
                let left = until.saturating_duration_since(Instant::now());
                n = shared.arrived.wait_timeout(n, left).unwrap().0;
            }
        }
        server.write_all(head.as_bytes())?;
        server.write_all(&body)?;
        // The next request on this connection (the answer to the first has
        // arrived by then): counted before the client can see the hang-up.
        if reader.read(&mut [0; 1])? > 0 {
            shared.hung_up.fetch_add(1, Ordering::SeqCst);
        }
        client.shutdown(Shutdown::Both)?;
        server.shutdown(Shutdown::Both)?;
        let _ = answers.join();
        Ok(())
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shared = Arc::new(Shared::default());
    let hung_up = shared.hung_up.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let shared = shared.clone();
            std::thread::spawn(move || relay(client, upstream, gather, &shared));
        }
    });
    (url, hung_up)
}

#[test]
fn a_request_on_a_dropped_keep_alive_connection_is_sent_again_on_a_new_one() {
    let server = server(Config::default());
    let (proxy, hung_up) = hang_up_on_reused_connections(server.addr, 1);
    let via_proxy = SyncConfig::new(proxy, "reused", "dev-token");
    let direct = SyncConfig::new(server.url(), "reused", "dev-token");
    let (a, b) = (device(), device());
    a.execute("INSERT INTO todo VALUES ('k1', 'x', 'y')", &[])
        .unwrap();
    assert_eq!(a.sync_now(&via_proxy).unwrap().pushed, 3);
    // A push on the kept connection, which the proxy hangs up on.
    a.execute("INSERT INTO todo VALUES ('k2', 'x', 'y')", &[])
        .unwrap();
    assert_eq!(a.sync_now(&via_proxy).unwrap().pushed, 3);
    assert_eq!(hung_up.load(Ordering::SeqCst), 1);
    // A pull on the kept connection, likewise.
    b.execute("INSERT INTO todo VALUES ('k3', 'x', 'y')", &[])
        .unwrap();
    b.sync_now(&direct).unwrap();
    assert_eq!(a.sync_now(&via_proxy).unwrap().pulled, 3);
    assert_eq!(hung_up.load(Ordering::SeqCst), 2);
    assert_eq!(dump(&a), dump(&b));
    assert_eq!(dump(&a).len(), 3);
}

#[test]
fn the_resend_takes_no_other_kept_connection() {
    let server = server(Config::default());
    let (proxy, hung_up) = hang_up_on_reused_connections(server.addr, 2);
    let via_proxy = SyncConfig::new(proxy, "kept", "dev-token");
    let (a, b) = (device(), device());
    // Two syncs at once (of two databases) leave two connections kept.
    for (db, key) in [(&a, "a"), (&b, "b")] {
        db.execute(
            "INSERT INTO todo VALUES (?1, 'x', 'y')",
            &[Value::Text(key.into())],
        )
        .unwrap();
    }
    std::thread::scope(|s| {
        for db in [&a, &b] {
            s.spawn(|| db.sync_now(&via_proxy).unwrap());
        }
    });
    // The proxy hangs up on the next request on either; the resend must
    // not take the other.
    a.execute("INSERT INTO todo VALUES ('a2', 'x', 'y')", &[])
        .unwrap();
    assert_eq!(a.sync_now(&via_proxy).unwrap().pushed, 3);
    assert_eq!(hung_up.load(Ordering::SeqCst), 1);
}

mod background {
    use super::*;
    use confluo_core::{SyncState, SyncStatus};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn fast(cfg: &mut SyncConfig) {
        cfg.min_backoff = Duration::from_millis(100);
        cfg.max_backoff = Duration::from_millis(800);
        cfg.long_poll = Duration::from_secs(20);
        cfg.request_timeout = Duration::from_secs(5);
    }

    #[test]
    fn a_write_reaches_the_other_device_through_the_long_poll() {
        let server = server(Config::default());
        let mut cfg = SyncConfig::new(server.url(), "live", "dev-token");
        fast(&mut cfg);
        let (a, b) = (Arc::new(device()), Arc::new(device()));
        let sync_a = a.start_sync(cfg.clone(), |_: &SyncStatus| {}).unwrap();
        let statuses: Arc<Mutex<Vec<SyncStatus>>> = Arc::default();
        let seen = statuses.clone();
        let sync_b = b
            .start_sync(cfg, move |s: &SyncStatus| {
                seen.lock().unwrap().push(s.clone())
            })
            .unwrap();
        // Let B's first sync finish and its long poll open.
        wait_until("B idle", Duration::from_secs(10), || {
            statuses
                .lock()
                .unwrap()
                .iter()
                .any(|s| s.state == SyncState::Idle)
        });
        std::thread::sleep(Duration::from_millis(200));
        a.execute("INSERT INTO todo VALUES ('live', 'from A', 'open')", &[])
            .unwrap();
        wait_until("the row on B", Duration::from_secs(20), || {
            dump(&b).len() == 1
        });
        assert_eq!(dump(&a), dump(&b));
        let states: Vec<SyncState> = statuses
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.state.clone())
            .collect();
        assert!(
            states.contains(&SyncState::Syncing) && states.contains(&SyncState::Idle),
            "{states:?}"
        );
        // Stopping returns promptly, although B's long poll is open.
        let started = Instant::now();
        sync_b.stop();
        sync_a.stop();
        assert!(
            started.elapsed() < Duration::from_millis(2500),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_status_listener_that_panics_does_not_stop_syncing() {
        let server = server(Config::default());
        let mut cfg = SyncConfig::new(server.url(), "resilient", "dev-token");
        fast(&mut cfg);
        let a = Arc::new(device());
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let sync = a
            .start_sync(cfg.clone(), move |_: &SyncStatus| {
                if c.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("a status listener bug");
                }
            })
            .unwrap();
        wait_until("the first status", Duration::from_secs(10), || {
            calls.load(Ordering::SeqCst) > 0
        });
        a.execute(
            "INSERT INTO todo VALUES ('k', 'after the panic', 'open')",
            &[],
        )
        .unwrap();
        let b = device();
        wait_until("the write on the server", Duration::from_secs(20), || {
            b.sync_now(&cfg).unwrap();
            dump(&b).len() == 1
        });
        // The status after that sync comes once the round has ended.
        wait_until(
            "the listener to hear again",
            Duration::from_secs(10),
            || calls.load(Ordering::SeqCst) > 1,
        );
        sync.stop();
    }

    #[test]
    fn with_the_server_down_status_shows_errors_with_growing_retries_then_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.db");
        let store =
            || -> Arc<dyn confluo_server::Store> { Arc::new(SqliteStore::open(&path).unwrap()) };
        let first =
            BackgroundServer::start(store(), Auth::default().with_dev_token(), Config::default())
                .unwrap();
        let addr = first.addr;
        let mut cfg = SyncConfig::new(first.url(), "flaky", "dev-token");
        fast(&mut cfg);
        drop(first);

        let db = Arc::new(device());
        let statuses: Arc<Mutex<Vec<SyncStatus>>> = Arc::default();
        let seen = statuses.clone();
        let sync = db
            .start_sync(cfg, move |s: &SyncStatus| {
                seen.lock().unwrap().push(s.clone())
            })
            .unwrap();
        db.execute(
            "INSERT INTO todo VALUES ('k', 'written offline', 'open')",
            &[],
        )
        .unwrap();
        let retries = || -> Vec<Duration> {
            statuses
                .lock()
                .unwrap()
                .iter()
                .filter_map(|s| match &s.state {
                    // Nobody listens on the port: the device counts as offline.
                    SyncState::Offline { retry_in } => *retry_in,
                    _ => None,
                })
                .collect()
        };
        wait_until("three failed attempts", Duration::from_secs(15), || {
            retries().len() >= 3
        });
        let r = retries();
        assert!(r[2] > r[0], "retry delays grow: {r:?}");
        assert!(statuses.lock().unwrap().iter().any(|s| s.pending == 1));

        // The server comes back on the same address, with its data.
        let _back = BackgroundServer::start_on(
            addr,
            store(),
            Auth::default().with_dev_token(),
            Config::default(),
        )
        .unwrap();
        wait_until("recovery", Duration::from_secs(15), || {
            statuses
                .lock()
                .unwrap()
                .last()
                .is_some_and(|s| s.state == SyncState::Idle && s.pending == 0)
        });
        assert!(statuses
            .lock()
            .unwrap()
            .last()
            .unwrap()
            .last_synced
            .is_some());
        // Offline hint: paused, then resumed at once.
        sync.set_online(false);
        wait_until("offline", Duration::from_secs(5), || {
            statuses
                .lock()
                .unwrap()
                .last()
                .is_some_and(|s| s.state == SyncState::Offline { retry_in: None })
        });
        sync.set_online(true);
        wait_until("online again", Duration::from_secs(5), || {
            statuses
                .lock()
                .unwrap()
                .last()
                .is_some_and(|s| s.state == SyncState::Idle)
        });
        sync.stop();
    }
}

#[test]
fn a_server_that_lost_its_data_gets_it_back_from_the_devices() {
    let first = server(Config::default());
    let a = device();
    a.execute(
        "INSERT INTO todo VALUES ('t1', 'synced before the loss', 'open')",
        &[],
    )
    .unwrap();
    a.sync_now(&SyncConfig::new(first.url(), "lists", "dev-token"))
        .unwrap();
    assert_eq!(a.server_cursor().unwrap(), 1);
    a.execute(
        "INSERT INTO todo VALUES ('t2', 'not synced yet', 'open')",
        &[],
    )
    .unwrap();
    drop(first);

    // A new, empty server: A's cursor points beyond its history (410).
    let second = server(Config::default());
    let cfg = SyncConfig::new(second.url(), "lists", "dev-token");
    let r = a.sync_now(&cfg).unwrap();
    assert_eq!(r.pushed, 6, "everything of A's is pushed again: {r:?}");
    let b = device();
    b.sync_now(&cfg).unwrap();
    assert_eq!(dump(&b), dump(&a));
    assert_eq!(dump(&b).len(), 2);
}

#[test]
fn changes_received_from_a_peer_reach_the_server() {
    let server = server(Config::default());
    let cfg = SyncConfig::new(server.url(), "relay", "dev-token");
    let (a, b, c) = (device(), device(), device());
    a.execute(
        "INSERT INTO todo VALUES ('p2p', 'made offline on A', 'open')",
        &[],
    )
    .unwrap();
    // A and B meet without a network: a direct exchange.
    b.apply(&a.changes_for_peer(b.site_id(), 0).unwrap())
        .unwrap();
    // B syncs with the server: A's change goes with it.
    let r = b.sync_now(&cfg).unwrap();
    assert_eq!(r.pushed, 3);
    c.sync_now(&cfg).unwrap();
    assert_eq!(dump(&c), dump(&a));
}

#[test]
fn a_token_provider_that_panics_is_an_auth_failure() {
    struct Buggy;
    impl confluo_core::TokenProvider for Buggy {
        fn token(&self) -> Result<String, String> {
            panic!("a token provider bug")
        }
    }
    let server = server(Config::default());
    let cfg = SyncConfig::with_token_provider(server.url(), "tokens", Arc::new(Buggy));
    let a = device();
    a.execute("INSERT INTO todo VALUES ('k', 'x', 'y')", &[])
        .unwrap();
    let err = a.sync_now(&cfg).unwrap_err();
    assert!(
        matches!(&err, confluo_core::Error::Auth(m) if m.contains("panicked")),
        "{err}"
    );
    assert_eq!(a.pending_changes().unwrap(), 1, "nothing counts as sent");
}

#[test]
fn the_token_provider_is_asked_for_every_request() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    struct Rotating(AtomicUsize);
    impl confluo_core::TokenProvider for Rotating {
        fn token(&self) -> Result<String, String> {
            match self.0.fetch_add(1, Ordering::SeqCst) {
                0 => Err("the app's backend is unreachable".into()),
                _ => Ok("dev-token".into()),
            }
        }
    }
    let server = server(Config::default());
    let provider = Arc::new(Rotating(AtomicUsize::new(0)));
    let cfg = SyncConfig::with_token_provider(server.url(), "tokens", provider.clone());
    let a = device();
    a.execute("INSERT INTO todo VALUES ('k', 'x', 'y')", &[])
        .unwrap();
    let err = a.sync_now(&cfg).unwrap_err();
    assert!(matches!(err, confluo_core::Error::Auth(_)), "{err}");
    assert_eq!(a.pending_changes().unwrap(), 1, "nothing counts as sent");
    a.sync_now(&cfg).unwrap();
    assert_eq!(a.pending_changes().unwrap(), 0);
    assert!(provider.0.load(Ordering::SeqCst) >= 2);
}

#[test]
fn a_device_whose_push_is_refused_still_receives_the_others() {
    let auth = Auth::from_toml(
        r#"
        [[tokens]]
        token = "writer-token"
        user = "writer"
        spaces = ["shared"]
        mode = "read-write"
        [[tokens]]
        token = "reader-token"
        user = "reader"
        spaces = ["shared"]
        mode = "read"
        "#,
    )
    .unwrap();
    let server = BackgroundServer::start(
        Arc::new(SqliteStore::open_in_memory().unwrap()),
        auth,
        Config::default(),
    )
    .unwrap();
    let (writer, reader) = (device(), device());
    writer
        .execute(
            "INSERT INTO todo VALUES ('w', 'from the writer', 'open')",
            &[],
        )
        .unwrap();
    writer
        .sync_now(&SyncConfig::new(server.url(), "shared", "writer-token"))
        .unwrap();
    // The reader wrote locally too, but may not push: it still gets the rows.
    reader
        .execute("INSERT INTO todo VALUES ('r', 'local only', 'open')", &[])
        .unwrap();
    let err = reader
        .sync_now(&SyncConfig::new(server.url(), "shared", "reader-token"))
        .unwrap_err();
    assert!(matches!(err, confluo_core::Error::Auth(_)), "{err}");
    assert_eq!(dump(&reader).len(), 2);
    assert_eq!(
        reader.pending_changes().unwrap(),
        1,
        "its own write stays unsent"
    );
}

#[test]
fn a_wiped_server_that_grew_past_our_cursor_is_noticed_by_its_epoch() {
    let first = server(Config::default());
    let a = device();
    a.execute("INSERT INTO todo VALUES ('a1', 'from A', 'open')", &[])
        .unwrap();
    a.sync_now(&SyncConfig::new(first.url(), "lists", "dev-token"))
        .unwrap();
    assert_eq!(a.server_cursor().unwrap(), 1);
    drop(first);

    // A new server: B pushes three versions, past A's cursor of 1.
    let second = server(Config::default());
    let cfg = SyncConfig::new(second.url(), "lists", "dev-token");
    let b = device();
    for i in 0..3 {
        b.execute(
            "INSERT INTO todo VALUES (?1, 'from B', 'open')",
            &[format!("b{i}").into()],
        )
        .unwrap();
        b.sync_now(&cfg).unwrap();
    }
    // A's cursor alone would look valid; the epoch says it is another history.
    let r = a.sync_now(&cfg).unwrap();
    assert_eq!(r.pushed, 3, "A pushes its row again: {r:?}");
    assert_eq!(dump(&a).len(), 4);
    b.sync_now(&cfg).unwrap();
    assert_eq!(dump(&a), dump(&b));
}

/// A store that remembers the cursor of every pull, and may be deaf: a store
/// shared by several servers whose reports of each other's pushes never
/// arrive (every notification lost).
struct Spy {
    store: Arc<SqliteStore>,
    deaf: bool,
    pulled_from: std::sync::Mutex<Vec<u64>>,
}

impl Spy {
    fn new(store: Arc<SqliteStore>, deaf: bool) -> Arc<Spy> {
        Arc::new(Spy {
            store,
            deaf,
            pulled_from: Default::default(),
        })
    }

    /// The cursors of the pulls since the last call.
    fn take_pull_cursors(&self) -> Vec<u64> {
        std::mem::take(&mut self.pulled_from.lock().unwrap())
    }
}

impl confluo_server::Store for Spy {
    fn push_parts(
        &self,
        space: &str,
        parts: Vec<confluo_server::store::PushPart<'_>>,
    ) -> confluo_server::store::StoreResult<confluo_server::store::PushOutcome> {
        self.store.push_parts(space, parts)
    }
    fn pull(
        &self,
        space: &str,
        cursor: u64,
        resume: Option<&confluo_server::store::Resume>,
        exclude: Option<confluo_core::SiteId>,
        budget: usize,
    ) -> confluo_server::store::StoreResult<confluo_server::store::Page> {
        self.pulled_from.lock().unwrap().push(cursor);
        self.store.pull(space, cursor, resume, exclude, budget)
    }
    fn space(
        &self,
        space: &str,
    ) -> confluo_server::store::StoreResult<Option<confluo_server::store::SpaceState>> {
        self.store.space(space)
    }
    fn stage(
        &self,
        space: &str,
        site: confluo_core::SiteId,
        push_id: &str,
        part: u32,
        body: &[u8],
    ) -> confluo_server::store::StoreResult<()> {
        self.store.stage(space, site, push_id, part, body)
    }
    fn take_staged(
        &self,
        space: &str,
        push_id: &str,
        last: u32,
    ) -> confluo_server::store::StoreResult<Option<Vec<Vec<u8>>>> {
        self.store.take_staged(space, push_id, last)
    }
    fn server_site(&self) -> confluo_core::SiteId {
        self.store.server_site()
    }
    fn version_tag(
        &self,
        space: &str,
        version: u64,
    ) -> confluo_server::store::StoreResult<Option<String>> {
        self.store.version_tag(space, version)
    }
    fn follow_pushes(&self, feed: confluo_server::store::PushFeed) -> bool {
        // Deaf: claims to follow pushes, and never reports one.
        self.deaf || self.store.follow_pushes(feed)
    }
}

#[test]
fn a_long_poll_on_a_shared_store_wakes_on_a_push_it_was_never_told_of() {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let config = Config {
        shared_store_recheck: std::time::Duration::from_millis(200),
        ..Config::default()
    };
    let start = |store: &Arc<SqliteStore>| {
        BackgroundServer::start(
            Spy::new(store.clone(), true),
            Auth::default().with_dev_token(),
            config.clone(),
        )
        .unwrap()
    };
    let (a, b) = (start(&store), start(&store));
    let writer = device();
    let on_a = SyncConfig::new(a.url(), "s", "dev-token");
    writer
        .execute("INSERT INTO todo VALUES ('t1', 'first', 'open')", &[])
        .unwrap();
    writer.sync_now(&on_a).unwrap();
    let url = format!("{}/v1/spaces/s/changes?cursor=1&wait=30", b.url());
    let polling = std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs(60)))
            .build()
            .into();
        let started = std::time::Instant::now();
        let status = agent
            .get(&url)
            .header("authorization", "Bearer dev-token")
            .header("confluo-protocol", "1")
            .call()
            .map(|r| r.status().as_u16());
        (status.unwrap(), started.elapsed())
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!polling.is_finished(), "the poll waits for a push");
    writer
        .execute("INSERT INTO todo VALUES ('t2', 'second', 'open')", &[])
        .unwrap();
    writer.sync_now(&on_a).unwrap();
    let (status, waited) = within_deadline(move || polling.join().unwrap());
    assert_eq!(status, 200);
    assert!(
        waited < std::time::Duration::from_secs(10),
        "woken by the re-check, not by the poll's end: {waited:?}"
    );
}

#[test]
fn devices_compress_what_they_send_once_the_server_says_it_takes_zstd() {
    let server = server(Config::default());
    let cfg = SyncConfig::new(server.url(), "s", "dev-token");
    let (a, b) = (device(), device());
    let add = |db: &Database, from: usize| {
        db.write(|tx| {
            for i in from..from + 300 {
                tx.execute(
                    "INSERT INTO todo VALUES (?1, 'water the plants on the balcony', 'open')",
                    &[format!("todo-{i:05}").into()],
                )?;
            }
            Ok(())
        })
        .unwrap();
    };
    add(&a, 0);
    let first_size = a.changes_since(0, None).unwrap().encode().len() as u64;
    let first = a.sync_now(&cfg).unwrap();
    // Sent plain: the device did not know yet what the server takes.
    assert!(
        first.bytes_sent >= first_size,
        "{} < {first_size}",
        first.bytes_sent
    );
    // The first answer said the server takes zstd: a first push of several
    // parts sends the first plain, and the others compressed.
    let c = device();
    add(&c, 0);
    let size = c.changes_since(0, None).unwrap().encode().len() as u64;
    let fresh = self::server(Config::default());
    let mut in_parts = SyncConfig::new(fresh.url(), "parts", "dev-token");
    in_parts.max_request_bytes = size as usize / 4;
    let sent = c.sync_now(&in_parts).unwrap().bytes_sent;
    assert!(sent * 2 < size, "sent {sent} for {size} bytes of changes");
    let seen = a.db_version();
    add(&a, 300);
    let second_size = a.changes_since(seen, None).unwrap().encode().len() as u64;
    let second = a.sync_now(&cfg).unwrap();
    assert!(
        second.bytes_sent * 3 < second_size,
        "sent {} for {second_size} bytes of changes",
        second.bytes_sent
    );
    // A push too short to gain from compression goes plain.
    a.execute("INSERT INTO todo VALUES ('one more', 'x', 'open')", &[])
        .unwrap();
    let third_size = a.changes_for_server().unwrap().encode().len();
    assert!(third_size < confluo_core::coding::MIN_COMPRESSED_BYTES);
    let third = a.sync_now(&cfg).unwrap();
    assert_eq!(third.pushed, 3, "{third:?}");
    assert_eq!(third.bytes_sent, third_size as u64, "sent as it is");
    let pulled = b.sync_now(&cfg).unwrap();
    assert!(
        pulled.bytes_received * 3 < first_size + second_size,
        "received {} for {} bytes of changes",
        pulled.bytes_received,
        first_size + second_size
    );
    assert_eq!(dump(&b), dump(&a));
    assert_eq!(dump(&b).len(), 601);
}

#[test]
fn the_answer_to_a_push_from_a_current_device_starts_past_that_push() {
    let spy = Spy::new(Arc::new(SqliteStore::open_in_memory().unwrap()), false);
    let server = BackgroundServer::start(
        spy.clone(),
        Auth::default().with_dev_token(),
        Config::default(),
    )
    .unwrap();
    let cfg = SyncConfig::new(server.url(), "s", "dev-token");
    let (a, b) = (device(), device());
    // The space is empty, so `a` has every version before its push: the
    // answer is read from the push's own version (1), not from 0, where it
    // would read back every row of the push only to leave them out.
    for i in 0..3 {
        a.execute(
            "INSERT INTO todo VALUES (?1, 'from a', 'open')",
            &[format!("a{i}").into()],
        )
        .unwrap();
    }
    a.sync_now(&cfg).unwrap();
    assert_eq!(spy.take_pull_cursors().first(), Some(&1));
    // `b` was not current (it never pulled version 1): its answer starts at
    // its cursor and brings `a`'s rows.
    b.execute("INSERT INTO todo VALUES ('b0', 'from b', 'open')", &[])
        .unwrap();
    let rows = |db: &Database| {
        db.query("SELECT * FROM todo ORDER BY id", &[])
            .unwrap()
            .rows
    };
    b.sync_now(&cfg).unwrap();
    assert_eq!(spy.take_pull_cursors().first(), Some(&0));
    assert_eq!(rows(&b).len(), 4);
    // Nor is `a` now: its next push is answered from its cursor (1), with
    // `b`'s row.
    a.execute("UPDATE todo SET status = 'done' WHERE id = 'a0'", &[])
        .unwrap();
    a.sync_now(&cfg).unwrap();
    assert_eq!(spy.take_pull_cursors().first(), Some(&1));
    assert_eq!(rows(&a).len(), 4);
    b.sync_now(&cfg).unwrap();
    assert_eq!(rows(&a), rows(&b));
    assert_eq!(rows(&a).len(), 4);
}

#[test]
fn a_push_the_server_accepted_stays_recorded_when_the_pull_after_it_fails() {
    let server = server(Config::default());
    let cfg = SyncConfig::new(server.url(), "lists", "dev-token");
    let (a, b) = (device(), device());
    // An app trigger that throws away the transaction it runs in: B's
    // apply of A's row fails whole, not row by row.
    b.alter_synced_table(
        "todo",
        "CREATE TRIGGER no_poison BEFORE INSERT ON todo WHEN NEW.id = 'poison' \
         BEGIN SELECT RAISE(ROLLBACK, 'no poison here'); END",
    )
    .unwrap();
    a.execute("INSERT INTO todo VALUES ('poison', 'p', 'open')", &[])
        .unwrap();
    a.sync_now(&cfg).unwrap();
    b.execute("INSERT INTO todo VALUES ('mine', 'm', 'open')", &[])
        .unwrap();
    assert!(b.sync_now(&cfg).is_err(), "the pull cannot be applied");
    assert_eq!(
        b.pending_changes().unwrap(),
        0,
        "the server has B's row: it is not sent again"
    );
    assert_eq!(a.sync_now(&cfg).unwrap().pulled, 3, "B's row reached A");
}
