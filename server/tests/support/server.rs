//! A real `confluo-server` process for end-to-end tests, and the devices
//! that talk to it.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use confluo_core::{Database, SyncConfig, Value};
use rand::rngs::StdRng;
use rand::Rng;

pub const BIN: &str = env!("CARGO_BIN_EXE_confluo-server");
pub const SCHEMA: &str = "CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, title TEXT, status TEXT)";
pub const DEV: &str = "dev-token";

// ---------------------------------------------------------------------------
// The server process

/// A running `confluo-server`; dropping it kills the process and reaps it.
pub struct Server {
    pub child: Child,
    pub port: u16,
    /// What `--db` names: a SQLite file or a PostgreSQL URL.
    db: OsString,
    args: Vec<String>,
    log: PathBuf,
}

pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

pub fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

impl Server {
    /// Starts the binary with its database in `dir` and the extra `args`,
    /// on a free port (trying another one if the port was taken meanwhile).
    pub fn start(dir: &Path, args: &[&str]) -> Server {
        Server::start_on(dir.join("server.db").as_os_str(), dir, args)
    }

    /// Starts the binary on the database `db` (a file or a URL), with its
    /// log in `dir`.
    pub fn start_on(db: &OsStr, dir: &Path, args: &[&str]) -> Server {
        let db = db.to_owned();
        let log = dir.join("server.log");
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut failures = Vec::new();
        for _ in 0..5 {
            let port = free_port();
            match launch(port, &db, &args, &log) {
                Ok(child) => {
                    return Server {
                        child,
                        port,
                        db,
                        args,
                        log,
                    }
                }
                Err(e) => failures.push(e),
            }
        }
        panic!("the server did not start: {failures:#?}");
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGKILL (what `Child::kill` sends on unix): no shutdown code runs.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill the server");
        self.child.wait().expect("reap the server");
    }

    /// After `kill`: starts the same binary again with the same database,
    /// address and arguments (retrying while the port is not yet free).
    pub fn restart(&mut self) {
        let mut failures = Vec::new();
        for _ in 0..5 {
            match launch(self.port, &self.db, &self.args, &self.log) {
                Ok(child) => {
                    self.child = child;
                    return;
                }
                Err(e) => {
                    failures.push(e);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        panic!("the server did not restart: {failures:#?}");
    }
}

/// Starts the binary on `port` (output appended to `log`) and waits until
/// `/healthz` answers; an error if the process exits first or the deadline
/// passes (the process is then killed).
pub fn launch(port: u16, db: &OsStr, args: &[String], log: &Path) -> Result<Child, String> {
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("log file: {e}"))?;
    let err = out.try_clone().map_err(|e| format!("log file: {e}"))?;
    let mut child = Command::new(BIN)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--db")
        .arg(db)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .map_err(|e| format!("spawning {BIN}: {e}"))?;
    let timeout = Duration::from_secs(30);
    let deadline = Instant::now() + timeout;
    let agent = agent(Duration::from_secs(2));
    let health = format!("http://127.0.0.1:{port}/healthz");
    loop {
        match child.try_wait() {
            Ok(None) => {}
            Ok(Some(status)) => {
                return Err(format!(
                    "the server exited with {status} before answering /healthz; log:\n{}",
                    log_text()
                ))
            }
            Err(e) => return Err(format!("waiting for the server: {e}")),
        }
        if let Ok(mut resp) = agent.get(&health).call() {
            let body = resp.body_mut().read_to_string().unwrap_or_default();
            if resp.status() == 200 && body == "ok\n" {
                return Ok(child);
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "/healthz did not answer within {timeout:?}; log:\n{}",
                log_text()
            ));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Devices

pub fn device() -> Database {
    let db = Database::open_in_memory().unwrap();
    db.execute_batch(SCHEMA).unwrap();
    db.enable_sync("todo").unwrap();
    db
}

pub fn dump(db: &Database) -> Vec<Vec<Value>> {
    db.query("SELECT * FROM todo ORDER BY id", &[])
        .unwrap()
        .rows
}

pub fn ids(db: &Database) -> BTreeSet<String> {
    dump(db)
        .into_iter()
        .map(|row| row[0].as_str().expect("text id").to_owned())
        .collect()
}

/// What a device that never saw the space gets by syncing: the table and
/// its cursor.
pub fn fresh_view(cfg: &SyncConfig) -> (Vec<Vec<Value>>, u64) {
    let fresh = device();
    fresh.sync_now(cfg).expect("a fresh device syncs");
    (dump(&fresh), fresh.server_cursor().unwrap())
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// Random edits

pub const POOL: usize = 10;
pub const WORDS: [&str; 6] = ["milk", "bread", "eggs", "call mom", "taxes", "run"];
pub const STATUSES: [&str; 3] = ["open", "in_progress", "done"];

/// One random offline edit: insert an absent id of the pool, or update or
/// delete a present one.
pub fn random_edit(db: &Database, rng: &mut StdRng) {
    let id = format!("t{}", rng.random_range(0..POOL));
    let present = !db
        .query("SELECT 1 FROM todo WHERE id = ?1", &[id.clone().into()])
        .unwrap()
        .is_empty();
    let title = format!(
        "{} #{}",
        WORDS[rng.random_range(0..WORDS.len())],
        rng.random_range(0..100)
    );
    let status = STATUSES[rng.random_range(0..STATUSES.len())];
    if !present {
        db.execute(
            "INSERT INTO todo VALUES (?1, ?2, ?3)",
            &[id.into(), title.into(), status.into()],
        )
        .unwrap();
        return;
    }
    match rng.random_range(0..5) {
        0 | 1 => db
            .execute(
                "UPDATE todo SET title = ?2 WHERE id = ?1",
                &[id.into(), title.into()],
            )
            .unwrap(),
        2 | 3 => db
            .execute(
                "UPDATE todo SET status = ?2 WHERE id = ?1",
                &[id.into(), status.into()],
            )
            .unwrap(),
        _ => db
            .execute("DELETE FROM todo WHERE id = ?1", &[id.into()])
            .unwrap(),
    };
}
