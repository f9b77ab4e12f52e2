//! A device's life beside syncing: signing out and in again, a binding
//! made by mistake, tokens that expire, and background sync's status when
//! it starts, fails to authenticate and stops.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use confluo_core::{Database, ErrorKind, SyncConfig, SyncState, SyncStatus, TokenProvider, Value};
use confluo_server::{Auth, BackgroundServer, Config, SqliteStore};

const SCHEMA: &str = "CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, title TEXT, status TEXT);
                      CREATE TABLE drafts(id INTEGER PRIMARY KEY, body TEXT)";

fn device() -> Arc<Database> {
    let db = Database::open_in_memory().unwrap();
    db.execute_batch(SCHEMA).unwrap();
    db.enable_sync("todo").unwrap();
    Arc::new(db)
}

fn server() -> BackgroundServer {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    BackgroundServer::start(store, Auth::default().with_dev_token(), Config::default()).unwrap()
}

fn todos(db: &Database) -> Vec<Vec<Value>> {
    db.query("SELECT id, title FROM todo ORDER BY id", &[])
        .unwrap()
        .rows
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn fast(mut cfg: SyncConfig) -> SyncConfig {
    cfg.min_backoff = Duration::from_millis(100);
    cfg.max_backoff = Duration::from_millis(400);
    cfg.long_poll = Duration::from_secs(10);
    cfg.request_timeout = Duration::from_secs(5);
    cfg
}

/// Hands out the tokens of `tokens` in turn (the last one for ever), and
/// counts the plain and the refreshing calls.
struct Tokens {
    tokens: Vec<&'static str>,
    handed: AtomicUsize,
    refreshes: AtomicUsize,
}

impl Tokens {
    fn new(tokens: &[&'static str]) -> Arc<Self> {
        Arc::new(Tokens {
            tokens: tokens.to_vec(),
            handed: AtomicUsize::new(0),
            refreshes: AtomicUsize::new(0),
        })
    }
}

impl TokenProvider for Tokens {
    fn token(&self) -> Result<String, String> {
        // A provider that caches: the same token until told it is stale.
        let i = self.handed.load(Ordering::SeqCst);
        Ok(self.tokens[i.min(self.tokens.len() - 1)].to_owned())
    }

    fn refreshed_token(&self) -> Result<String, String> {
        self.refreshes.fetch_add(1, Ordering::SeqCst);
        self.handed.fetch_add(1, Ordering::SeqCst);
        self.token()
    }
}

#[test]
fn signing_out_clears_synced_rows_unsent_and_lets_the_database_join_another_space() {
    let server = server();
    let alice = device();
    let bob = device();
    let cfg = |space: &str| SyncConfig::new(server.url(), space, "dev-token");
    alice
        .execute("INSERT INTO todo VALUES ('a1', 'alice''s', 'open')", &[])
        .unwrap();
    alice.sync_now(&cfg("alice")).unwrap();
    // Unsent work of the old user, and a table the app keeps for itself.
    alice
        .execute("INSERT INTO todo VALUES ('a2', 'unsent', 'open')", &[])
        .unwrap();
    alice
        .execute("INSERT INTO drafts(body) VALUES ('local only')", &[])
        .unwrap();
    let site = alice.site_id();

    alice.sign_out_and_clear().unwrap();

    assert!(todos(&alice).is_empty());
    assert_eq!(alice.pending_changes().unwrap(), 0);
    assert_eq!(alice.bound_space().unwrap(), None);
    assert_eq!(alice.server_cursor().unwrap(), 0);
    assert_eq!(alice.site_id(), site, "the device keeps its identity");
    let drafts = alice.query("SELECT body FROM drafts", &[]).unwrap().rows;
    assert_eq!(drafts, vec![vec![Value::Text("local only".into())]]);

    // Bob's space: the device gets Bob's rows, and nothing of Alice's goes
    // there (the deletes were not recorded either).
    bob.execute("INSERT INTO todo VALUES ('b1', 'bob''s', 'open')", &[])
        .unwrap();
    bob.sync_now(&cfg("bob")).unwrap();
    let report = alice.sync_now(&cfg("bob")).unwrap();
    assert_eq!(report.pushed, 0, "{report:?}");
    assert!(report.applied > 0, "{report:?}");
    assert_eq!(todos(&alice), todos(&bob));
    bob.sync_now(&cfg("bob")).unwrap();
    assert_eq!(todos(&bob).len(), 1);

    // Alice's space still has her synced row, and not the one she never sent.
    let fresh = device();
    fresh.sync_now(&cfg("alice")).unwrap();
    assert_eq!(
        todos(&fresh),
        vec![vec![
            Value::Text("a1".into()),
            Value::Text("alice's".into())
        ]]
    );
}

#[test]
fn signing_out_tells_observers_and_writes_after_it_are_tracked_again() {
    let server = server();
    let db = device();
    db.execute("INSERT INTO todo VALUES ('k', 'x', 'open')", &[])
        .unwrap();
    let heard: Arc<Mutex<Vec<String>>> = Arc::default();
    let h = heard.clone();
    let _observer = db.observe(&["todo"], move |tables: &[String]| {
        h.lock().unwrap().extend(tables.iter().cloned())
    });
    db.sign_out_and_clear().unwrap();
    assert_eq!(heard.lock().unwrap().as_slice(), ["todo".to_string()]);
    db.execute("INSERT INTO todo VALUES ('n', 'new user', 'open')", &[])
        .unwrap();
    assert_eq!(db.pending_changes().unwrap(), 1);
    let report = db
        .sync_now(&SyncConfig::new(server.url(), "next", "dev-token"))
        .unwrap();
    assert!(report.pushed > 0, "{report:?}");
}

#[test]
fn a_binding_that_never_reached_the_server_can_be_changed() {
    let server = server();
    let db = device();
    db.execute("INSERT INTO todo VALUES ('k', 'x', 'open')", &[])
        .unwrap();
    // A misspelt space under a token the server refuses: nothing answered.
    let refused = SyncConfig::new(server.url(), "tpyo", "not-a-token");
    assert!(matches!(
        db.sync_now(&refused).unwrap_err(),
        confluo_core::Error::Auth(_)
    ));
    assert_eq!(db.bound_space().unwrap().as_deref(), Some("tpyo"));
    let right = SyncConfig::new(server.url(), "typo", "dev-token");
    assert!(db.sync_now(&right).unwrap().pushed > 0);
    assert_eq!(db.bound_space().unwrap().as_deref(), Some("typo"));
    // Now the binding is real: another space is refused.
    let err = db
        .sync_now(&SyncConfig::new(server.url(), "other", "dev-token"))
        .unwrap_err();
    assert!(err.to_string().contains("sign out"), "{err}");
}

#[test]
fn a_refused_token_is_refreshed_once_and_the_request_sent_again() {
    let server = server();
    let db = device();
    db.execute("INSERT INTO todo VALUES ('k', 'x', 'open')", &[])
        .unwrap();
    let tokens = Tokens::new(&["expired", "dev-token"]);
    let cfg = SyncConfig::with_token_provider(server.url(), "refresh", tokens.clone());
    let report = db.sync_now(&cfg).unwrap();
    assert!(report.pushed > 0, "{report:?}");
    assert_eq!(tokens.refreshes.load(Ordering::SeqCst), 1);
    // The fresh token is used from then on.
    db.sync_now(&cfg).unwrap();
    assert_eq!(tokens.refreshes.load(Ordering::SeqCst), 1);

    // A refreshed token that is refused too ends the sync: no loop.
    let stale = Tokens::new(&["expired", "revoked"]);
    let cfg = SyncConfig::with_token_provider(server.url(), "refresh", stale.clone());
    let other = device();
    let err = other.sync_now(&cfg).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert_eq!(stale.refreshes.load(Ordering::SeqCst), 1);
}

fn recorder() -> (
    Arc<Mutex<Vec<SyncStatus>>>,
    impl Fn(&SyncStatus) + Send + Sync + 'static,
) {
    let statuses: Arc<Mutex<Vec<SyncStatus>>> = Arc::default();
    let seen = statuses.clone();
    (statuses, move |s: &SyncStatus| {
        seen.lock().unwrap().push(s.clone())
    })
}

#[test]
fn background_sync_stops_retrying_when_the_token_is_refused_until_asked() {
    let server = server();
    let db = device();
    db.execute("INSERT INTO todo VALUES ('k', 'x', 'open')", &[])
        .unwrap();
    let tokens = Tokens::new(&["expired", "revoked", "revoked", "dev-token"]);
    let cfg = fast(SyncConfig::with_token_provider(
        server.url(),
        "auth",
        tokens.clone(),
    ));
    let (statuses, listener) = recorder();
    let sync = db.start_sync(cfg, listener).unwrap();
    wait_until("AuthRequired", || {
        statuses
            .lock()
            .unwrap()
            .iter()
            .any(|s| matches!(s.state, SyncState::AuthRequired { .. }))
    });
    let asked = tokens.refreshes.load(Ordering::SeqCst);
    // One refused token, one refresh: the long poll does not refresh too.
    assert_eq!(asked, 1);
    // Several backoff periods, and local writes: no new attempt.
    db.execute("INSERT INTO todo VALUES ('k2', 'y', 'open')", &[])
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(tokens.refreshes.load(Ordering::SeqCst), asked);
    let last = statuses.lock().unwrap().last().cloned().unwrap();
    assert!(
        matches!(last.state, SyncState::AuthRequired { .. }),
        "{last:?}"
    );
    assert!(last.pending >= 1, "the first row is still unsent: {last:?}");

    // The user signed in again: the app asks for a sync.
    tokens.handed.store(3, Ordering::SeqCst);
    sync.sync_soon();
    wait_until("everything sent", || {
        statuses
            .lock()
            .unwrap()
            .last()
            .is_some_and(|s| s.state == SyncState::Idle && s.pending == 0)
    });
    sync.stop();
}

#[test]
fn status_is_stopped_with_the_real_pending_count_and_silent_after_stop() {
    let server = server();
    let db = device();
    db.execute("INSERT INTO todo VALUES ('k', 'x', 'open')", &[])
        .unwrap();
    let at_rest = db.stopped_status().unwrap();
    assert_eq!(at_rest.state, SyncState::Stopped);
    assert_eq!(at_rest.pending, 1);

    let mut cfg = fast(SyncConfig::new(server.url(), "quiet", "dev-token"));
    cfg.online_at_start = false;
    let (statuses, listener) = recorder();
    let sync = db.start_sync(cfg, listener).unwrap();
    wait_until("offline", || {
        statuses
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.state == SyncState::Offline { retry_in: None })
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        db.pending_changes().unwrap(),
        1,
        "offline at start: no sync"
    );
    assert!(statuses
        .lock()
        .unwrap()
        .iter()
        .all(|s| s.state != SyncState::Syncing));
    sync.set_online(true);
    wait_until("synced", || db.pending_changes().unwrap() == 0);

    // Writes keep the worker busy; after stop returns, not one status more.
    let writer = {
        let db = db.clone();
        std::thread::spawn(move || {
            for i in 0..40 {
                let _ = db.execute(
                    "INSERT INTO todo VALUES (?1, 'more', 'open')",
                    &[Value::Text(format!("m{i}"))],
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(150));
    sync.stop();
    let heard = statuses.lock().unwrap().len();
    writer.join().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(statuses.lock().unwrap().len(), heard);
}

#[test]
fn stopping_without_waiting_returns_at_once_during_a_slow_request() {
    // A server that accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let _held = std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(4).collect();
        std::thread::sleep(Duration::from_secs(30));
        drop(held);
    });
    let db = device();
    db.execute("INSERT INTO todo VALUES ('k', 'x', 'open')", &[])
        .unwrap();
    let (statuses, listener) = recorder();
    let sync = db
        .start_sync(fast(SyncConfig::new(url, "slow", "dev-token")), listener)
        .unwrap();
    wait_until("syncing", || {
        statuses
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.state == SyncState::Syncing)
    });
    let started = Instant::now();
    sync.stop_without_waiting();
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    db.close().unwrap();
}

#[test]
fn a_cancelled_sync_stops_between_requests_and_the_next_one_goes_on() {
    use std::sync::atomic::AtomicBool;
    let server = server();
    let db = device();
    for i in 0..50 {
        db.execute(
            "INSERT INTO todo VALUES (?1, 'row', 'open')",
            &[Value::Text(format!("r{i:02}"))],
        )
        .unwrap();
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let mut cfg = SyncConfig::new(server.url(), "cancel", "dev-token");
    // Ten rows' changes per request, and a cancel after the first part.
    cfg.max_request_changes = 30;
    cfg.cancel = Some(cancel.clone());
    let parts = Arc::new(AtomicUsize::new(0));
    let (p, c) = (parts.clone(), cancel.clone());
    cfg.progress = Some(Arc::new(move |_: &confluo_core::SyncReport| {
        p.fetch_add(1, Ordering::SeqCst);
        c.store(true, Ordering::SeqCst);
    }));
    let err = db.sync_now(&cfg).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    assert_eq!(
        parts.load(Ordering::SeqCst),
        1,
        "no request after the cancel"
    );
    assert_eq!(db.pending_changes().unwrap(), 50);

    cancel.store(false, Ordering::SeqCst);
    cfg.progress = None;
    db.sync_now(&cfg).unwrap();
    assert_eq!(db.pending_changes().unwrap(), 0);
    let other = device();
    other
        .sync_now(&SyncConfig::new(server.url(), "cancel", "dev-token"))
        .unwrap();
    assert_eq!(todos(&other).len(), 50);
}

#[test]
fn a_cancel_while_the_token_is_fetched_sends_nothing() {
    use std::sync::atomic::AtomicBool;
    struct CancelsWhileFetching(Arc<AtomicBool>);
    impl TokenProvider for CancelsWhileFetching {
        fn token(&self) -> Result<String, String> {
            self.0.store(true, Ordering::SeqCst);
            Ok("dev-token".into())
        }
    }
    let server = server();
    let db = device();
    db.execute("INSERT INTO todo VALUES ('k', 'x', 'open')", &[])
        .unwrap();
    let cancel = Arc::new(AtomicBool::new(false));
    let mut cfg = SyncConfig::with_token_provider(
        server.url(),
        "cancel",
        Arc::new(CancelsWhileFetching(cancel.clone())),
    );
    cfg.cancel = Some(cancel);
    let err = db.sync_now(&cfg).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    let other = device();
    other
        .sync_now(&SyncConfig::new(server.url(), "cancel", "dev-token"))
        .unwrap();
    assert!(
        todos(&other).is_empty(),
        "the push went out after the cancel"
    );
}
