//! Scale-out, end to end: two `confluo-server` processes on one PostgreSQL
//! database (a throwaway one, see `support/postgres.rs`), with devices
//! spread over both, as behind a load balancer.

mod support;

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use confluo_core::{Database, SyncConfig, Value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::postgres;
use support::server::*;

/// Two server processes on the database at `url`, each with its own
/// folder for its log.
struct Pair {
    a: Server,
    b: Server,
    _dirs: [tempfile::TempDir; 2],
}

fn pair(url: &str, args: &[&str]) -> Pair {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut args = args.to_vec();
    args.push("--dev");
    let a = Server::start_on(OsStr::new(url), dirs[0].path(), &args);
    let b = Server::start_on(OsStr::new(url), dirs[1].path(), &args);
    Pair { a, b, _dirs: dirs }
}

fn config(server: &Server, space: &str) -> SyncConfig {
    SyncConfig::new(server.url(), space, DEV)
}

/// Syncs every device in turn until a round changes nothing anywhere.
fn settle(devices: &[(Database, SyncConfig)]) {
    for _ in 0..4 {
        for (db, cfg) in devices {
            db.sync_now(cfg).expect("sync");
        }
    }
}

#[test]
fn random_histories_from_devices_spread_over_two_instances_converge() {
    let url = postgres::database();
    let servers = pair(&url, &[]);
    let mut rng = StdRng::seed_from_u64(0x5ca1e);
    let devices: Vec<(Database, SyncConfig)> = (0..6)
        .map(|i| {
            let server = if i % 2 == 0 { &servers.a } else { &servers.b };
            (device(), config(server, "lists"))
        })
        .collect();
    for round in 0..12 {
        for (db, cfg) in &devices {
            for _ in 0..rng.random_range(1..6) {
                random_edit(db, &mut rng);
            }
            // Now and then a device stays offline for a round.
            if rng.random_bool(0.7) {
                db.sync_now(cfg)
                    .unwrap_or_else(|e| panic!("round {round}: {e}"));
            }
        }
    }
    settle(&devices);
    let expected = dump(&devices[0].0);
    assert!(!expected.is_empty());
    for (i, (db, _)) in devices.iter().enumerate() {
        assert_eq!(dump(db), expected, "device {i} diverged");
    }
    // A new device gets the same through either instance.
    for server in [&servers.a, &servers.b] {
        let (rows, _) = fresh_view(&config(server, "lists"));
        assert_eq!(rows, expected);
    }
}

/// The versions of `space` as the database has them, in order.
fn versions(url: &str, space: &str) -> Vec<u64> {
    postgres::psql(
        url,
        &format!(
            "SELECT v.version FROM confluo_versions v JOIN confluo_spaces s ON s.id = v.space \
             WHERE s.name = '{space}' ORDER BY 1"
        ),
    )
    .lines()
    .map(|l| l.parse().unwrap())
    .collect()
}

#[test]
fn concurrent_pushes_to_one_space_through_both_instances_keep_versions_contiguous() {
    let url = postgres::database();
    let servers = pair(&url, &[]);
    let (a, b) = (servers.a.url(), servers.b.url());
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let base = if w % 2 == 0 { a.clone() } else { b.clone() };
            std::thread::spawn(move || {
                let db = device();
                let cfg = SyncConfig::new(base, "race", DEV);
                for i in 0..10 {
                    db.execute(
                        "INSERT INTO todo VALUES (?1, ?2, 'open')",
                        &[format!("w{w}-{i}").into(), "x".into()],
                    )
                    .unwrap();
                    db.sync_now(&cfg).expect("sync");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    let versions = versions(&url, "race");
    assert_eq!(
        versions,
        (1..=60).collect::<Vec<_>>(),
        "one version per push"
    );
    let space_version = postgres::psql(
        &url,
        "SELECT version FROM confluo_spaces WHERE name = 'race'",
    );
    assert_eq!(space_version, "60");
    let (rows, cursor) = fresh_view(&config(&servers.b, "race"));
    assert_eq!((rows.len(), cursor), (60, 60));
}

/// A long poll on `server` from `cursor`: its status, and when it answered.
fn long_poll(
    server: &Server,
    cursor: u64,
    wait_secs: u64,
) -> std::thread::JoinHandle<(u16, Instant)> {
    let url = format!(
        "{}/v1/spaces/live/changes?cursor={cursor}&wait={wait_secs}",
        server.url()
    );
    std::thread::spawn(move || {
        let resp = agent(Duration::from_secs(wait_secs + 30))
            .get(&url)
            .header("authorization", format!("Bearer {DEV}"))
            .header("confluo-protocol", "1")
            .call()
            .expect("long poll");
        (resp.status().as_u16(), Instant::now())
    })
}

#[test]
fn a_long_poll_on_one_instance_wakes_on_a_push_to_the_other() {
    let url = postgres::database();
    // No periodic re-check within the test: only the notification can wake
    // the poll in time.
    let servers = pair(&url, &["--db-recheck-secs", "600"]);
    let writer = device();
    let cfg = config(&servers.a, "live");
    writer
        .execute("INSERT INTO todo VALUES ('t1', 'first', 'open')", &[])
        .unwrap();
    writer.sync_now(&cfg).unwrap();
    let mut latencies = Vec::new();
    for i in 2..5 {
        let cursor = writer.server_cursor().unwrap();
        let poll = long_poll(&servers.b, cursor, 20);
        // The poll is waiting on B before the push.
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !poll.is_finished(),
            "the poll from cursor {cursor} answered with nothing new: {:?}",
            poll.join().unwrap()
        );
        writer
            .execute(
                "INSERT INTO todo VALUES (?1, 'more', 'open')",
                &[format!("t{i}").into()],
            )
            .unwrap();
        writer.sync_now(&cfg).unwrap();
        let pushed = Instant::now();
        let (status, answered) = poll.join().unwrap();
        assert_eq!(status, 200);
        latencies.push(answered.saturating_duration_since(pushed));
    }
    println!("long poll wake across instances: {latencies:?}");
    for l in &latencies {
        // The wake comes by NOTIFY, within milliseconds; the deadline is
        // generous for a loaded machine, and far below the 600 s re-check.
        assert!(*l < Duration::from_secs(3), "{latencies:?}");
    }
}

#[test]
fn killing_an_instance_mid_push_loses_no_acknowledged_change_and_its_devices_carry_on() {
    let url = postgres::database();
    let mut servers = pair(&url, &[]);
    let writer = device();
    let on_a = config(&servers.a, "kill");
    for i in 0..20 {
        writer
            .execute(
                "INSERT INTO todo VALUES (?1, 'acknowledged', 'open')",
                &[format!("ack{i}").into()],
            )
            .unwrap();
    }
    writer.sync_now(&on_a).unwrap();
    let acknowledged = writer.server_cursor().unwrap();
    // A large push, sent in several requests, cut short by SIGKILL.
    writer
        .write(|tx| {
            for i in 0..40_000 {
                tx.execute(
                    "INSERT INTO todo VALUES (?1, 'bulk', 'open')",
                    &[format!("bulk{i:05}").into()],
                )?;
            }
            Ok(())
        })
        .unwrap();
    let mut small = on_a.clone();
    small.max_request_changes = 5_000;
    let push = {
        let (tx, rx) = std::sync::mpsc::channel();
        let cfg = small.clone();
        let db = Arc::new(writer);
        let db2 = db.clone();
        std::thread::spawn(move || tx.send(db2.sync_now(&cfg).map(|_| ())).unwrap());
        (db, rx)
    };
    std::thread::sleep(Duration::from_millis(150));
    servers.a.kill();
    let (writer, outcome) = push;
    let outcome = outcome
        .recv_timeout(Duration::from_secs(60))
        .expect("the sync ends once its server is gone");
    // Through the other instance: everything acknowledged is there, and the
    // cut push either landed whole or not at all.
    let on_b = config(&servers.b, "kill");
    let (rows, cursor) = fresh_view(&on_b);
    assert!(cursor >= acknowledged);
    let ids: Vec<&str> = rows.iter().map(|r| r[0].as_str().unwrap()).collect();
    for i in 0..20 {
        assert!(ids.contains(&format!("ack{i}").as_str()), "ack{i} lost");
    }
    let bulk = ids.iter().filter(|id| id.starts_with("bulk")).count();
    assert!(
        bulk == 0 || bulk == 40_000,
        "a push landed in part: {bulk} rows (sync ended with {outcome:?})"
    );
    // The device carries on through B and its push completes.
    writer
        .sync_now(&on_b)
        .expect("sync through the other instance");
    assert_eq!(writer.pending_changes().unwrap(), 0);
    let (rows, _) = fresh_view(&on_b);
    assert_eq!(rows.len(), 40_020);
    // The killed instance comes back and serves the same space.
    servers.a.restart();
    let (rows_a, _) = fresh_view(&config(&servers.a, "kill"));
    assert_eq!(rows_a, rows);
    assert!(matches!(rows[0][1], Value::Text(_)));
}

#[test]
fn an_unreachable_database_stops_the_server_with_a_clear_error_that_hides_the_password() {
    let url = format!(
        "postgres://confluo:hunter2@127.0.0.1:{}/confluo",
        free_port()
    );
    let mut child = std::process::Command::new(BIN)
        .args(["--dev", "--listen", "127.0.0.1:0", "--db", &url])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the server did not give up");
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!status.success());
    assert!(text.contains("opening postgres://...@127.0.0.1"), "{text}");
    assert!(text.contains("connect"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}
