//! End to end: the real `confluo-server` binary runs as a child process on a
//! free loopback port, and devices (and raw HTTP requests) talk to it.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use confluo_core::{ChangeSet, Database, Error, SyncConfig, Value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod support;

use support::server::*;

const CHANGESET_TYPE: &str = "application/vnd.confluo.changeset";

// ---------------------------------------------------------------------------
// Raw HTTP

struct Reply {
    status: u16,
    headers: ureq::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts an error answer: `status` and a JSON body
    /// `{"error": {"code": code, "message": "..."}}`.
    fn assert_error(&self, what: &str, status: u16, code: &str) {
        assert_eq!(
            self.status,
            status,
            "{what}: status (body {:?})",
            self.text()
        );
        let json: serde_json::Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {:?}", self.text()));
        assert_eq!(
            json["error"]["code"].as_str(),
            Some(code),
            "{what}: error code in {json}"
        );
        let message = json["error"]["message"].as_str();
        assert!(
            message.is_some_and(|m| !m.is_empty()),
            "{what}: error message in {json}"
        );
    }

    /// The change set of a 200 answer.
    fn changes(&self, what: &str) -> ChangeSet {
        assert_eq!(self.status, 200, "{what}: status (body {:?})", self.text());
        ChangeSet::decode(&self.body)
            .unwrap_or_else(|e| panic!("{what}: the body is not a change set: {e}"))
    }
}

/// `POST /v1/spaces/{space}/sync` with exactly the given headers.
fn post_sync(base: &str, space: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut req = agent(Duration::from_secs(30)).post(format!("{base}/v1/spaces/{space}/sync"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let mut resp = req
        .send(body)
        .unwrap_or_else(|e| panic!("POST to {space}: transport error: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .body_mut()
        .read_to_vec()
        .unwrap_or_else(|e| panic!("POST to {space}: reading the answer: {e}"));
    Reply {
        status,
        headers,
        body,
    }
}

fn healthz(base: &str) -> u16 {
    agent(Duration::from_secs(10))
        .get(format!("{base}/healthz"))
        .call()
        .expect("GET /healthz")
        .status()
        .as_u16()
}

// ---------------------------------------------------------------------------
// 1. Random convergence

fn random_convergence(devices: usize, steps: usize, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--dev"]);
    let cfg = SyncConfig::new(server.url(), "space", DEV);
    let devs: Vec<Database> = (0..devices).map(|_| device()).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut edits, mut syncs) = (0, 0);
    for step in 0..steps {
        let d = rng.random_range(0..devices);
        if rng.random_bool(0.3) {
            devs[d]
                .sync_now(&cfg)
                .unwrap_or_else(|e| panic!("seed {seed}, step {step}: device {d} sync: {e}"));
            syncs += 1;
        } else {
            random_edit(&devs[d], &mut rng);
            edits += 1;
        }
    }
    assert!(edits > 0 && syncs > 0, "edits {edits}, syncs {syncs}");
    // Twice round: the first round's early devices miss the later pushes.
    for _ in 0..2 {
        for (d, db) in devs.iter().enumerate() {
            db.sync_now(&cfg)
                .unwrap_or_else(|e| panic!("seed {seed}: final sync of device {d}: {e}"));
        }
    }
    let expected = dump(&devs[0]);
    assert!(!expected.is_empty(), "seed {seed}: every row was deleted");
    for (d, db) in devs.iter().enumerate() {
        assert_eq!(
            dump(db),
            expected,
            "seed {seed}: device {d} differs from device 0"
        );
        assert_eq!(db.pending_changes().unwrap(), 0, "seed {seed}: device {d}");
    }
    let (fresh, _) = fresh_view(&cfg);
    assert_eq!(fresh, expected, "seed {seed}: a fresh device differs");
}

#[test]
fn two_devices_converge_through_the_server_process() {
    random_convergence(2, 200, 0xC0F1);
}

#[test]
fn five_devices_converge_through_the_server_process() {
    random_convergence(5, 250, 0x5EED_0005);
}

// ---------------------------------------------------------------------------
// 2. Crash safety

#[test]
fn acknowledged_pushes_survive_sigkill_and_restart() {
    const MAX_ITERATIONS: usize = 5_000;
    const OK_AFTER_RESTART: usize = 20;

    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--dev"]);
    let cfg = SyncConfig::new(server.url(), "crash", DEV);
    let writer = Arc::new(device());
    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let oks = Arc::new(AtomicUsize::new(0));
    let restarted = Arc::new(AtomicBool::new(false));

    let thread = {
        let (writer, cfg, acked, oks, restarted) = (
            writer.clone(),
            cfg.clone(),
            acked.clone(),
            oks.clone(),
            restarted.clone(),
        );
        std::thread::spawn(move || {
            let mut inserted: Vec<String> = Vec::new();
            let mut ok_after_restart = 0;
            let mut errors: Vec<String> = Vec::new();
            for i in 0..MAX_ITERATIONS {
                let id = format!("w{i:05}");
                writer
                    .execute(
                        "INSERT INTO todo VALUES (?1, ?2, 'open')",
                        &[id.clone().into(), format!("written at step {i}").into()],
                    )
                    .unwrap();
                inserted.push(id);
                // Read before syncing: an Ok counts as after the restart
                // only if the new server was up before the sync began.
                let after_restart = restarted.load(Ordering::SeqCst);
                match writer.sync_now(&cfg) {
                    Ok(_) => {
                        // Everything written before this sync is on the server.
                        acked.lock().unwrap().extend(inserted.iter().cloned());
                        oks.fetch_add(1, Ordering::SeqCst);
                        if after_restart {
                            ok_after_restart += 1;
                            if ok_after_restart >= OK_AFTER_RESTART {
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        if errors.len() < 5 {
                            errors.push(e.to_string());
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
            (inserted.len(), ok_after_restart, errors)
        })
    };

    wait_until("a first acknowledged push", Duration::from_secs(30), || {
        oks.load(Ordering::SeqCst) >= 1 || thread.is_finished()
    });
    std::thread::sleep(Duration::from_millis(300));
    let oks_before_kill = oks.load(Ordering::SeqCst);
    let acked_before_kill = acked.lock().unwrap().len();
    server.kill();
    server.restart();
    restarted.store(true, Ordering::SeqCst);
    let (inserted, ok_after_restart, errors) = thread.join().expect("the writer thread");
    assert!(oks_before_kill >= 1 && acked_before_kill >= 1);
    assert_eq!(
        ok_after_restart, OK_AFTER_RESTART,
        "the writer ran out of iterations ({inserted} rows); first errors: {errors:?}"
    );
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "crash test: {inserted} rows written, {acked_before_kill} acknowledged before the kill, \
         {} in all; first errors while down: {errors:?}",
        acked.len()
    );

    let fresh = device();
    fresh.sync_now(&cfg).expect("a fresh device syncs");
    let have = ids(&fresh);
    let missing: Vec<&String> = acked.difference(&have).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged rows are lost after SIGKILL: {missing:?}",
        missing.len()
    );
    writer.sync_now(&cfg).expect("the writer syncs again");
    assert_eq!(writer.pending_changes().unwrap(), 0);
    assert_eq!(dump(&writer), dump(&fresh));
    assert_eq!(have.len(), inserted, "every row written reached the server");
}

// ---------------------------------------------------------------------------
// 3. Auth

const WRITER: &str = "team-writer-token-3f9a";
const READER: &str = "team-reader-token-77c2";

#[test]
fn tokens_grant_their_space_and_mode_only() {
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("auth.toml");
    std::fs::write(
        &auth,
        format!(
            r#"jwt_secret = "at least 32 bytes of secret, shared with the app's backend"

[[tokens]]
token = "{WRITER}"
user = "writer"
spaces = ["team"]
mode = "read-write"

[[tokens]]
token = "{READER}"
user = "reader"
spaces = ["team"]
mode = "read"
"#
        ),
    )
    .unwrap();
    let server = Server::start(dir.path(), &["--auth", auth.to_str().unwrap()]);
    let base = server.url();
    let bearer = |t: &str| format!("Bearer {t}");
    let (writer_auth, reader_auth) = (bearer(WRITER), bearer(READER));
    let proto = ("confluo-protocol", "1");
    let ctype = ("content-type", CHANGESET_TYPE);

    let a = device();
    a.execute(
        "INSERT INTO todo VALUES ('t1', 'Plan the offsite', 'open')",
        &[],
    )
    .unwrap();
    let push = a.changes_since(0, None).unwrap().encode();

    post_sync(&base, "team", &[proto], b"").assert_error("no token", 401, "unauthorized");
    post_sync(&base, "team", &[proto, ctype], &push).assert_error(
        "no token, pushing",
        401,
        "unauthorized",
    );
    post_sync(
        &base,
        "team",
        &[proto, ("authorization", "Bearer not-a-token-we-know")],
        b"",
    )
    .assert_error("wrong token", 401, "unauthorized");
    post_sync(&base, "team", &[proto, ("authorization", DEV)], b"").assert_error(
        "not a bearer header",
        401,
        "unauthorized",
    );
    post_sync(
        &base,
        "team",
        &[proto, ("authorization", &bearer(DEV))],
        b"",
    )
    .assert_error("the dev token without --dev", 401, "unauthorized");
    post_sync(
        &base,
        "other",
        &[proto, ("authorization", &writer_auth)],
        b"",
    )
    .assert_error("writer token on another space", 403, "forbidden");
    post_sync(
        &base,
        "other",
        &[proto, ("authorization", &reader_auth)],
        b"",
    )
    .assert_error("reader token on another space", 403, "forbidden");
    let pull = post_sync(
        &base,
        "team",
        &[proto, ("authorization", &reader_auth)],
        b"",
    );
    let cs = pull.changes("reader pull");
    assert_eq!((cs.since, cs.until, cs.changes.len()), (0, 0, 0));
    post_sync(
        &base,
        "team",
        &[proto, ctype, ("authorization", &reader_auth)],
        &push,
    )
    .assert_error("reader push", 403, "forbidden");
    // The refused push stored nothing.
    let pull = post_sync(
        &base,
        "team",
        &[proto, ("authorization", &writer_auth)],
        b"",
    );
    assert_eq!(pull.changes("pull after the refused push").until, 0);

    // Through the engine.
    let read_cfg = SyncConfig::new(base.clone(), "team", READER);
    let write_cfg = SyncConfig::new(base.clone(), "team", WRITER);
    match a.sync_now(&read_cfg) {
        Err(Error::Auth(_)) => {}
        other => panic!("pushing with the read token: expected Error::Auth, got {other:?}"),
    }
    assert_eq!(a.pending_changes().unwrap(), 1, "the row is still unsent");
    match a.sync_now(&SyncConfig::new(
        base.clone(),
        "team",
        "Bearer-less nonsense",
    )) {
        Err(Error::Auth(_)) => {}
        other => panic!("an unknown token: expected Error::Auth, got {other:?}"),
    }
    let r = a
        .sync_now(&write_cfg)
        .expect("pushing with the write token");
    assert_eq!(r.pushed, 3);
    assert_eq!(a.pending_changes().unwrap(), 0);
    // A reader pulls what the writer pushed.
    let b = device();
    let r = b.sync_now(&read_cfg).expect("pulling with the read token");
    assert_eq!(r.applied, 3);
    assert_eq!(dump(&b), dump(&a));
}

// ---------------------------------------------------------------------------
// 4. Bad input

#[test]
fn bad_requests_are_refused_with_json_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--dev", "--max-body-bytes", "65536"]);
    let base = server.url();
    let cfg = SyncConfig::new(base.clone(), "lists", DEV);

    let a = device();
    a.write(|tx| {
        for i in 0..20 {
            tx.execute(
                "INSERT INTO todo VALUES (?1, ?2, 'open')",
                &[format!("a{i:02}").into(), format!("task {i}").into()],
            )?;
        }
        Ok(())
    })
    .unwrap();
    a.sync_now(&cfg).unwrap();
    let auth = format!("Bearer {DEV}");
    let good = [
        ("authorization", auth.as_str()),
        ("confluo-protocol", "1"),
        ("content-type", CHANGESET_TYPE),
    ];
    let server_version = || -> u64 {
        post_sync(&base, "lists", &good[..2], b"")
            .changes("pull")
            .until
    };
    let (snapshot, cursor) = fresh_view(&cfg);
    assert_eq!(snapshot.len(), 20);
    assert_eq!(cursor, 1);
    assert_eq!(server_version(), cursor);

    // New rows, never pushed: if any of these requests were merged, even in
    // part, a fresh device would see it.
    let b = device();
    b.write(|tx| {
        for i in 0..5 {
            tx.execute(
                "INSERT INTO todo VALUES (?1, 'sneaky', 'open')",
                &[format!("b{i}").into()],
            )?;
        }
        Ok(())
    })
    .unwrap();
    let valid = b.changes_since(0, None).unwrap();
    assert_eq!(valid.changes.len(), 15);
    let encoded = valid.encode();

    let mut rng = StdRng::seed_from_u64(0xBAD);
    let mut random = vec![0u8; 4096];
    rng.fill(&mut random[..]);

    let c = device();
    c.write(|tx| {
        for i in 0..50 {
            tx.execute(
                "INSERT INTO todo VALUES (?1, ?2, 'open')",
                &[format!("c{i:02}").into(), "x".repeat(2000).into()],
            )?;
        }
        Ok(())
    })
    .unwrap();
    let oversized = c.changes_since(0, None).unwrap().encode();
    assert!(oversized.len() > 100_000, "{}", oversized.len());

    let mutated = |f: &dyn Fn(&mut ChangeSet)| {
        let mut cs = valid.clone();
        f(&mut cs);
        cs.encode()
    };
    let last = valid.changes.len() - 1;
    let a_column = valid
        .changes
        .iter()
        .rposition(|c| c.column.is_some())
        .expect("a column change");
    let hostile_table =
        mutated(&|cs| cs.changes[last].table = r#"todo"; DROP TABLE todo; --"#.into());
    let hostile_table_everywhere = mutated(&|cs| {
        for c in &mut cs.changes {
            c.table = r#"todo"; DROP TABLE todo; --"#.into();
        }
    });
    let hostile_column = mutated(&|cs| {
        cs.changes[a_column].column = Some(r#"title" = 'pwned'; DROP TABLE todo; --"#.into())
    });
    let schema_table = mutated(&|cs| cs.changes[last].table = "sqlite_schema".into());
    let schema_everywhere = mutated(&|cs| {
        for c in &mut cs.changes {
            c.table = "sqlite_schema".into();
        }
    });

    // A causal length near the top of i64 would overflow the arithmetic of
    // deletes on every device that receives it.
    let huge_causal_length = mutated(&|cs| {
        for c in &mut cs.changes {
            c.cl = u64::MAX;
        }
    });

    let no_protocol = [good[0], good[2]];
    let protocol_2 = [good[0], ("confluo-protocol", "2"), good[2]];
    let refused = |what: &str, headers: &[(&str, &str)], body: &[u8], status: u16, code: &str| {
        let reply = post_sync(&base, "lists", headers, body);
        reply.assert_error(what, status, code);
        assert!(
            reply.header("confluo-server-version").is_none(),
            "{what}: nothing was merged"
        );
        assert_eq!(healthz(&base), 200, "{what}: the server still answers");
        assert_eq!(server_version(), cursor, "{what}: no new version");
    };
    refused("random bytes", &good, &random, 400, "malformed");
    refused("magic only", &good, b"CFCS", 400, "malformed");
    let trailing = [&encoded[..], b"\0garbage"].concat();
    refused("trailing bytes", &good, &trailing, 400, "malformed");
    let half = &encoded[..encoded.len() / 2];
    refused("truncated to half", &good, half, 400, "malformed");
    let all_but_one = &encoded[..encoded.len() - 1];
    refused(
        "truncated by one byte",
        &good,
        all_but_one,
        400,
        "malformed",
    );
    refused("truncated header", &good, &encoded[..10], 400, "malformed");
    refused("over the body limit", &good, &oversized, 413, "too_large");
    let unsupported = "unsupported_protocol";
    refused("protocol 2", &protocol_2, &encoded, 400, unsupported);
    refused(
        "no protocol header",
        &no_protocol,
        &encoded,
        400,
        unsupported,
    );
    let invalid = "invalid_changes";
    refused("hostile table name", &good, &hostile_table, 400, invalid);
    let everywhere = &hostile_table_everywhere;
    refused(
        "hostile table name everywhere",
        &good,
        everywhere,
        400,
        invalid,
    );
    refused("hostile column name", &good, &hostile_column, 400, invalid);
    refused("table sqlite_schema", &good, &schema_table, 400, invalid);
    let everywhere = &schema_everywhere;
    refused(
        "table sqlite_schema everywhere",
        &good,
        everywhere,
        400,
        invalid,
    );
    refused(
        "huge causal length",
        &good,
        &huge_causal_length,
        400,
        invalid,
    );

    assert_eq!(healthz(&base), 200);
    assert_eq!(server_version(), cursor);
    let (after, after_cursor) = fresh_view(&cfg);
    assert_eq!(after, snapshot, "the space is exactly as before");
    assert_eq!(after_cursor, cursor);
    // And the valid change set the hostile ones were made from is accepted.
    let reply = post_sync(&base, "lists", &good, &encoded);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("confluo-server-version"), Some("2"));
    let (after, _) = fresh_view(&cfg);
    assert_eq!(after.len(), 25);
}

// ---------------------------------------------------------------------------
// Lifecycle

#[test]
fn sigterm_ends_long_polls_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--dev"]);
    let url = format!("{}/v1/spaces/lists/changes?cursor=0&wait=30", server.url());
    let poll = std::thread::spawn(move || {
        let started = Instant::now();
        let reply = agent(Duration::from_secs(60))
            .get(&url)
            .header("authorization", "Bearer dev-token")
            .header("confluo-protocol", "1")
            .call()
            .map(|r| r.status().as_u16());
        (reply, started.elapsed())
    });
    // Let the long poll reach the server, then ask it to stop.
    wait_until(
        "the long poll to be waiting",
        Duration::from_secs(20),
        || {
            agent(Duration::from_secs(2))
                .get(&format!("{}/metrics", server.url()))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok())
                .is_some_and(|m| m.contains("confluo_long_polls 1"))
        },
    );
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
    let (reply, waited) = poll.join().unwrap();
    assert_eq!(reply.ok(), Some(200), "the long poll was answered, not cut");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(log.contains("DEVELOPMENT MODE"), "{log}");
    assert!(log.contains("stopped"), "{log}");
}

#[test]
fn dev_mode_is_refused_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["--dev", "--listen", "0.0.0.0:0", "--db"])
        .arg(dir.path().join("s.db"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only allowed on a loopback address"), "{err}");
    let out = Command::new(BIN)
        .args(["--db"])
        .arg(dir.path().join("s.db"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "no --auth and no --dev");
}

// ---------------------------------------------------------------------------
// Overload: connections and requests that stall cannot hold the server.

use std::io::{Read, Write};
use std::net::TcpStream;

fn connect(server: &Server) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

/// Reads until the server closes the connection or answers; `Ok(text)` with
/// what it said (empty when it just closed), `Err` if it did neither before
/// the socket's read timeout.
fn read_until_closed(mut s: TcpStream) -> Result<String, std::io::Error> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(String::from_utf8_lossy(&out).into_owned()),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Ok(String::from_utf8_lossy(&out).into_owned())
            }
            Err(e) => return Err(e),
        }
    }
}

/// One request on a connection of its own, answered with its status line.
fn raw_status(server: &Server, request: &str) -> String {
    let mut s = connect(server);
    s.write_all(request.as_bytes()).unwrap();
    let reply = read_until_closed(s).expect("an answer");
    reply.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn idle_and_half_sent_connections_are_closed_by_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--dev", "--header-timeout-secs", "1"]);
    let mut held = Vec::new();
    for i in 0..40 {
        let mut s = connect(&server);
        if i % 2 == 1 {
            s.write_all(b"POST /v1/spaces/s/sync HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
        }
        held.push(s);
    }
    for (i, s) in held.into_iter().enumerate() {
        read_until_closed(s)
            .unwrap_or_else(|e| panic!("connection {i} was still open after 15 s: {e}"));
    }
    assert_eq!(healthz(&server.url()), 200);
}

#[test]
fn a_body_that_trickles_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            "--dev",
            "--body-timeout-secs",
            "1",
            "--min-body-rate",
            "100000",
        ],
    );
    let mut s = connect(&server);
    s.write_all(
        format!(
            "POST /v1/spaces/s/sync HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {DEV}\r\n\
             Confluo-Protocol: 1\r\nContent-Type: {CHANGESET_TYPE}\r\nContent-Length: 5000\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut writer = s.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        // One byte every 300 ms: 25 minutes for the whole body.
        for _ in 0..50 {
            if writer.write_all(b"x").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let reply = read_until_closed(s).expect("the server answered or closed within 15 s");
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("too_slow"), "{reply}");
    trickle.join().unwrap();
}

#[test]
fn past_the_connection_cap_healthz_is_still_answered() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            "--dev",
            "--max-connections",
            "4",
            "--header-timeout-secs",
            "30",
        ],
    );
    let pull = format!(
        "GET /v1/spaces/s/changes?cursor=0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {DEV}\r\n\
         Confluo-Protocol: 1\r\nConnection: close\r\n\r\n"
    );
    let health = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let held: Vec<TcpStream> = (0..4).map(|_| connect(&server)).collect();
    // Once the server holds the four, others get /healthz and 503 only.
    wait_until("a refused pull", Duration::from_secs(10), || {
        raw_status(&server, &pull).starts_with("HTTP/1.1 503")
    });
    assert!(raw_status(&server, health).starts_with("HTTP/1.1 200"));
    drop(held);
    wait_until("a served pull", Duration::from_secs(10), || {
        raw_status(&server, &pull).starts_with("HTTP/1.1 200")
    });
}

#[test]
fn sigterm_ends_stalled_requests_within_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        dir.path(),
        &[
            "--dev",
            "--shutdown-grace-secs",
            "1",
            "--body-timeout-secs",
            "600",
        ],
    );
    // A push whose body never comes.
    let mut s = connect(&server);
    s.write_all(
        format!(
            "POST /v1/spaces/s/sync HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {DEV}\r\n\
             Confluo-Protocol: 1\r\nContent-Type: {CHANGESET_TYPE}\r\nContent-Length: 5000\r\n\r\nxx"
        )
        .as_bytes(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the server did not stop within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(s);
}

#[test]
fn healthz_answers_while_idle_connections_reach_the_file_descriptor_limit() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = dir.path().join("server.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 256 && exec \"$0\" --dev --listen 127.0.0.1:{port} --db \"$1\" --header-timeout-secs 60"
        ))
        .arg(BIN)
        .arg(dir.path().join("server.db"))
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let healthy = || {
        agent(Duration::from_secs(2))
            .get(format!("{base}/healthz"))
            .call()
            .is_ok_and(|r| r.status() == 200)
    };
    wait_until("the server to start", Duration::from_secs(30), healthy);
    // More idle connections than the process has file descriptors.
    let held: Vec<TcpStream> = (0..300)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    assert!(held.len() >= 256, "{} connections", held.len());
    wait_until("/healthz to answer", Duration::from_secs(10), healthy);
    drop(held);
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(log.contains("file descriptor limit"), "{log}");
}

#[test]
fn long_polls_whose_clients_hang_up_leave_the_gauge_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--dev"]);
    let metrics = || {
        agent(Duration::from_secs(5))
            .get(format!("{}/metrics", server.url()))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .unwrap_or_default()
    };
    let polls: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = connect(&server);
            s.write_all(
                format!(
                    "GET /v1/spaces/s/changes?cursor=0&wait=60 HTTP/1.1\r\nHost: x\r\n\
                     Authorization: Bearer {DEV}\r\nConfluo-Protocol: 1\r\n\r\n"
                )
                .as_bytes(),
            )
            .unwrap();
            s
        })
        .collect();
    wait_until("50 long polls waiting", Duration::from_secs(20), || {
        metrics().contains("confluo_long_polls 50")
    });
    drop(polls);
    wait_until("the gauge back at 0", Duration::from_secs(20), || {
        metrics().contains("confluo_long_polls 0")
    });
    let m = metrics();
    assert!(
        m.contains("confluo_requests_total{route=\"changes\",status=\"499\"} 50"),
        "{m}"
    );
}

#[test]
fn the_server_speaks_https_with_the_certificate_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    let port = free_port();
    let log = dir.path().join("server.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(BIN)
        .args(["--dev", "--listen", &format!("127.0.0.1:{port}"), "--db"])
        .arg(dir.path().join("server.db"))
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap();
    let der = certified.cert.der().to_vec();
    let trusted = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::new_with_certs(&[
            ureq::tls::Certificate::from_der(&der).to_owned(),
        ]))
        .build();
    let https: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(trusted)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let base = format!("https://127.0.0.1:{port}");
    let answered = || {
        https
            .get(format!("{base}/healthz"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
    };
    wait_until("/healthz over https", Duration::from_secs(30), || {
        answered().as_deref() == Some("ok\n")
    });
    // A pull over https, and nothing over plain http.
    let status = https
        .get(format!("{base}/v1/spaces/s/changes?cursor=0"))
        .header("authorization", format!("Bearer {DEV}"))
        .header("confluo-protocol", "1")
        .call()
        .unwrap()
        .status();
    assert_eq!(status, 200);
    assert!(agent(Duration::from_secs(5))
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .call()
        .is_err());
    // A device checks the certificate: here against the bundled web roots,
    // which did not sign this one. Its sync fails on the handshake (so no
    // token or change left it) and its write stays pending.
    let device = device();
    device
        .execute("INSERT INTO todo(id, title) VALUES ('t1', 'unsent')", &[])
        .unwrap();
    let pending = device.pending_changes().unwrap();
    assert!(pending > 0);
    match device.sync_now(&SyncConfig::new(base.clone(), "s", DEV)) {
        Err(Error::Network {
            message,
            retryable: false,
            ..
        }) => {
            assert!(message.contains("certificate"), "{message}")
        }
        other => panic!("a sync through an untrusted certificate: {other:?}"),
    }
    assert_eq!(device.pending_changes().unwrap(), pending);
    let _ = child.kill();
    let _ = child.wait();
}

/// The server process's peak resident memory, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM");
    kib / 1024
}

#[test]
fn a_maximal_push_of_minimal_changes_is_refused_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--dev"]);
    // 16 MiB of the smallest changes there are: 2 bytes each.
    let n = ((16 << 20) - 1024) / 2;
    let pk: Arc<[Value]> = vec![Value::Text("k".into())].into();
    let table: Arc<str> = Arc::from("todo");
    let site = confluo_core::SiteId::random();
    let body = ChangeSet {
        source: site,
        recipient: None,
        since: 0,
        until: 1,
        changes: (0..n)
            .map(|seq| confluo_core::Change {
                table: table.clone(),
                pk: pk.clone(),
                column: None,
                value: Value::Null,
                hlc: confluo_core::Hlc::new(1_700_000_000_000, 0),
                site,
                cl: 1,
                db_version: 1,
                seq: seq as u32,
            })
            .collect(),
    }
    .encode();
    assert!(body.len() <= 16 << 20, "{}", body.len());
    let reply = post_sync(
        &server.url(),
        "big",
        &[
            ("authorization", "Bearer dev-token"),
            ("confluo-protocol", "1"),
            ("content-type", CHANGESET_TYPE),
        ],
        &body,
    );
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert!(reply.text().contains("split the push"), "{}", reply.text());
    let peak = peak_rss_mib(server.child.id());
    assert!(peak < 400, "the server peaked at {peak} MiB");
    assert_eq!(healthz(&server.url()), 200);
}

#[test]
fn spaces_are_forgotten_when_their_long_polls_end() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--dev"]);
    let metrics = || {
        agent(Duration::from_secs(5))
            .get(format!("{}/metrics", server.url()))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .unwrap_or_default()
    };
    let polls: Vec<_> = (0..20)
        .map(|i| {
            let url = format!(
                "{}/v1/spaces/space{i}/changes?cursor=0&wait=2",
                server.url()
            );
            std::thread::spawn(move || {
                agent(Duration::from_secs(30))
                    .get(&url)
                    .header("authorization", "Bearer dev-token")
                    .header("confluo-protocol", "1")
                    .call()
                    .map(|r| r.status().as_u16())
                    .ok()
            })
        })
        .collect();
    wait_until("20 spaces watched", Duration::from_secs(20), || {
        metrics().contains("confluo_watched_spaces 20")
    });
    for p in polls {
        assert_eq!(p.join().unwrap(), Some(200));
    }
    wait_until("no space watched", Duration::from_secs(20), || {
        metrics().contains("confluo_watched_spaces 0")
    });
}

#[test]
fn each_request_is_logged_without_its_token_and_refused_tokens_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--dev"]);
    let pull = |token: &str| {
        agent(Duration::from_secs(10))
            .get(format!("{}/v1/spaces/lists/changes?cursor=0", server.url()))
            .header("authorization", format!("Bearer {token}"))
            .header("confluo-protocol", "1")
            .call()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(pull(DEV), 200);
    for _ in 0..200 {
        assert_eq!(pull("s3cr3t-but-wrong"), 401);
    }
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    let access: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("confluo_server::access"))
        .collect();
    assert!(
        access
            .iter()
            .any(|l| l.contains("route=\"/v1/spaces/{space}/changes\"")
                && l.contains("status=200")
                && l.contains("client=\"127.0.0.1:")
                && l.contains("method=GET")),
        "{log}"
    );
    assert!(access.len() >= 201, "{} access lines", access.len());
    assert!(!log.contains("s3cr3t"), "a token reached the log:\n{log}");
    let refused = log.lines().filter(|l| l.contains("token refused")).count();
    assert!(
        (1..20).contains(&refused),
        "{refused} lines for 200 refused tokens"
    );
}

#[test]
fn quotas_of_the_auth_file_answer_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("auth.toml");
    let mut toml = String::from(
        "[quotas]\nrequests_per_second = 2\nspaces = 2\npush_bytes_per_minute = 2000\n",
    );
    for user in ["rate", "roam", "bulk"] {
        toml.push_str(&format!(
            "[[tokens]]\ntoken = \"{user}-token-123\"\nuser = \"{user}\"\nspaces = [\"*\"]\nmode = \"read-write\"\n"
        ));
    }
    std::fs::write(&auth, toml).unwrap();
    let server = Server::start(dir.path(), &["--auth", auth.to_str().unwrap()]);
    let pull = |token: &str, space: &str| {
        let resp = agent(Duration::from_secs(10))
            .get(format!(
                "{}/v1/spaces/{space}/changes?cursor=0",
                server.url()
            ))
            .header("authorization", format!("Bearer {token}"))
            .header("confluo-protocol", "1")
            .call()
            .unwrap();
        let retry = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        (resp.status().as_u16(), retry)
    };
    // Requests per second: a burst of twice the rate, then 429.
    let statuses: Vec<(u16, Option<String>)> =
        (0..60).map(|_| pull("rate-token-123", "s")).collect();
    let refused: Vec<_> = statuses.iter().filter(|(s, _)| *s == 429).collect();
    assert!(!refused.is_empty(), "{statuses:?}");
    assert!(
        refused.iter().all(|(_, r)| r.as_deref() == Some("1")),
        "{refused:?}"
    );
    // Spaces: two, then 429; other users are not affected.
    assert_eq!(pull("roam-token-123", "one").0, 200);
    assert_eq!(pull("roam-token-123", "two").0, 200);
    assert_eq!(pull("roam-token-123", "three").0, 429);
    assert_eq!(pull("roam-token-123", "one").0, 200);
    // Bytes pushed per minute.
    let db = device();
    db.write(|tx| {
        for i in 0..40 {
            tx.execute(
                "INSERT INTO todo VALUES (?1, ?2, 'open')",
                &[format!("t{i}").into(), "a title of some length".into()],
            )?;
        }
        Ok(())
    })
    .unwrap();
    let err = db
        .sync_now(&SyncConfig::new(server.url(), "bulk", "bulk-token-123"))
        .unwrap_err();
    match err {
        Error::Network {
            retryable: true,
            retry_after: Some(after),
            ref message,
        } => {
            assert!(message.contains("bytes pushed per minute"), "{message}");
            assert!(after <= Duration::from_secs(60), "{after:?}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_answer_has_the_server_clock_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--dev"]);
    let get = |path: &str| {
        agent(Duration::from_secs(5))
            .get(format!("{}{path}", server.url()))
            .call()
            .unwrap()
    };
    for path in ["/nowhere", "/healthz"] {
        let resp = get(path);
        assert!(
            resp.headers().contains_key("confluo-server-time"),
            "{path}: {:?}",
            resp.headers()
        );
    }
    let metrics = get("/metrics").body_mut().read_to_string().unwrap();
    assert!(
        metrics.contains("confluo_requests_total{route=\"unmatched\",status=\"404\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("confluo_requests_total{route=\"healthz\",status=\"200\"}"),
        "{metrics}"
    );
}
