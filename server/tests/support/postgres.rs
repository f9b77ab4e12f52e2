//! A throwaway PostgreSQL for the server's tests and benchmarks.
//!
//! `database()` returns the URL of a new, empty database on a cluster that
//! the test process starts on first use (fsync off: fast, for tests);
//! `durable_database()` does the same on a second cluster with fsync on
//! (for benchmarks). Both clusters live in a temporary folder, listen on a
//! random loopback port and are stopped, and their folder deleted, when the
//! test process ends, however it ends: each runs under a small supervising
//! shell whose stdin is a pipe that only this process holds open; when the
//! process exits (or is killed) the pipe closes, the shell's `read` returns
//! and it stops PostgreSQL and deletes the folder.
//!
//! With `CONFLUO_TEST_POSTGRES` set to the URL of an existing server's
//! maintenance database (with the right to CREATE DATABASE), the databases
//! are created there instead, and dropped when the process ends.
//!
//! The binaries (initdb, pg_ctl, psql) come from PATH or the newest
//! /usr/lib/postgresql/*/bin; `scripts/postgres.sh install` provides them.
//! Anything that fails panics with what to do about it: nothing is skipped.
//!
//! Included by the integration tests as `support::postgres` and by the
//! benchmark with `#[path]`, so it uses nothing but std.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The URL of an existing server to use instead of starting clusters.
pub const ENV: &str = "CONFLUO_TEST_POSTGRES";
const INSTALL: &str = "run scripts/postgres.sh install";
/// How long initdb, and each start of the cluster, may take.
const DEADLINE: Duration = Duration::from_secs(60);
/// Ports tried before giving up (another process may take the free port
/// picked before PostgreSQL binds it).
const PORT_TRIES: usize = 5;

/// A new, empty database on the shared test cluster (fsync off); its URL,
/// `postgres://postgres@127.0.0.1:PORT/NAME`.
pub fn database() -> String {
    create(server(false))
}

/// A new, empty database on the shared durable cluster (fsync on, as in
/// production): for benchmarks.
pub fn durable_database() -> String {
    create(server(true))
}

/// Runs `sql` on the database at `url` with psql and returns its output
/// (unaligned, tuples only: one line per row, columns separated by `|`),
/// without the last newline. Panics when psql fails.
pub fn psql(url: &str, sql: &str) -> String {
    try_psql(url, sql).unwrap_or_else(|e| panic!("{e}"))
}

fn try_psql(url: &str, sql: &str) -> Result<String, String> {
    let psql = psql_binary();
    let out = Command::new(&psql)
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}: {INSTALL}", psql.display()))?;
    if !out.status.success() {
        return Err(format!(
            "psql failed ({}) on {url} running {sql:?}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut text = String::from_utf8(out.stdout).expect("psql printed UTF-8");
    if text.ends_with('\n') {
        text.pop();
    }
    Ok(text)
}

/// A server that databases are created on.
struct Server {
    /// The URL of its maintenance database.
    admin: String,
    /// The supervising shell's stdin, never closed while the process lives
    /// (statics are not dropped). An external server's supervisor reads
    /// the names of the databases created, to drop them at the end.
    supervisor: Mutex<ChildStdin>,
    external: bool,
}

fn server(durable: bool) -> &'static Server {
    static EXTERNAL: OnceLock<Result<Server, String>> = OnceLock::new();
    static FAST: OnceLock<Result<Server, String>> = OnceLock::new();
    static DURABLE: OnceLock<Result<Server, String>> = OnceLock::new();
    let server = match std::env::var(ENV) {
        Ok(url) if !url.is_empty() => EXTERNAL.get_or_init(|| external(url)),
        _ if durable => DURABLE.get_or_init(|| start(true)),
        _ => FAST.get_or_init(|| start(false)),
    };
    match server {
        Ok(server) => server,
        Err(e) => panic!("{e}"),
    }
}

fn create(server: &Server) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = if server.external {
        // A shared server may keep databases of earlier runs (a killed
        // process's, before its supervisor dropped them) with this pid.
        static TAG: OnceLock<u64> = OnceLock::new();
        let tag = TAG.get_or_init(|| {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            now.as_nanos() as u64 % 1_000_000_000
        });
        format!("t_{}_{tag}_{n}", std::process::id())
    } else {
        format!("t_{}_{n}", std::process::id())
    };
    if server.external {
        // Before it exists, so that a process killed in between leaves nothing.
        let mut supervisor = server.supervisor.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(supervisor, "{name}").expect("the database dropper is running");
    }
    psql(&server.admin, &format!("CREATE DATABASE \"{name}\""));
    with_database(&server.admin, &name)
}

/// `url` with its database (path) replaced by `name`, keeping its query.
fn with_database(url: &str, name: &str) -> String {
    let (head, rest) = url.split_at(url.find("://").map_or(0, |i| i + 3));
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let query = tail.find('?').map_or("", |i| &tail[i..]);
    format!("{head}{authority}/{name}{query}")
}

/// The folder of initdb, pg_ctl and psql: PATH's initdb (symlinks
/// resolved), else the newest /usr/lib/postgresql/*/bin.
fn bin_dir() -> Result<PathBuf, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let complete = |dir: &Path| {
        ["initdb", "pg_ctl", "psql"]
            .iter()
            .all(|t| dir.join(t).is_file())
    };
    BIN.get_or_init(|| {
        let path = std::env::var_os("PATH").unwrap_or_default();
        for dir in std::env::split_paths(&path) {
            let Ok(initdb) = dir.join("initdb").canonicalize() else {
                continue;
            };
            if let Some(dir) = initdb.parent().filter(|d| complete(d)) {
                return Ok(dir.to_path_buf());
            }
        }
        let mut found: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let version = name
                    .split('.')
                    .map(|p| p.parse().ok())
                    .collect::<Option<_>>()?;
                let dir = entry.path().join("bin");
                complete(&dir).then_some((version, dir))
            })
            .collect();
        found.sort();
        let missing = "no initdb, pg_ctl and psql on PATH or in /usr/lib/postgresql/*/bin";
        found
            .pop()
            .map(|(_, dir)| dir)
            .ok_or_else(|| format!("PostgreSQL is not installed ({missing}): {INSTALL}"))
    })
    .clone()
}

fn psql_binary() -> PathBuf {
    // Against an external server only the client is needed.
    bin_dir().map_or_else(|_| PathBuf::from("psql"), |dir| dir.join("psql"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Starts a cluster in a new temporary folder under its supervising shell.
/// Protocol on the shell's stdin/stdout: it prints `initialized` (or
/// `failed`) after initdb; then for each port it reads it prints `ready` or
/// `failed`; after `ready` it waits for the end of its stdin, then stops
/// PostgreSQL and deletes the folder (also after a failure).
fn start(durable: bool) -> Result<Server, String> {
    const SUPERVISOR: &str = r#"
set -u
trap '' PIPE HUP INT
dir=$1 bin=$2 as_postgres=$3 fsync=$4
exec 2>>"$dir/supervisor.log"
pg() { if [ "$as_postgres" = 1 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
finish() {
  while read -r _; do :; done
  pg "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1
  rm -rf "$dir"
  exit 0
}
if pg "$bin/initdb" -D "$dir/data" -A trust -U postgres --no-sync -E UTF8 --locale=C >"$dir/initdb.log" 2>&1; then
  printf '%s\n' "listen_addresses = '127.0.0.1'" "unix_socket_directories = '$dir'" \
    "fsync = $fsync" "max_connections = 300" >>"$dir/data/postgresql.conf"
  echo initialized
else
  echo failed
  finish
fi
while read -r port; do
  if pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 -o "-p $port" start >>"$dir/supervisor.log" 2>&1; then
    echo ready
    finish
  fi
  pg "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1
  echo failed
done
finish
"#;
    let bin = bin_dir()?;
    let root = is_root();
    if root
        && !Command::new("id")
            .args(["-u", "postgres"])
            .output()
            .is_ok_and(|o| o.status.success())
    {
        return Err(format!(
            "running as root, PostgreSQL must run as the `postgres` OS user, which does not exist: {INSTALL} (Debian's package creates it)"
        ));
    }
    let kind = if durable { "durable" } else { "fast" };
    let dir = temp_dir(kind)?;
    if root {
        let chown = Command::new("chown").arg("postgres:").arg(&dir).status();
        let reachable = Command::new("runuser")
            .args(["-u", "postgres", "--", "test", "-w"])
            .arg(&dir)
            .status();
        if !chown.is_ok_and(|s| s.success()) || !reachable.is_ok_and(|s| s.success()) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!(
                "running as root, the `postgres` OS user cannot write {} (chown, runuser): set TMPDIR to a folder it can reach, e.g. /tmp",
                dir.display()
            ));
        }
    }
    let mut child = Command::new("sh")
        .args(["-c", SUPERVISOR, "confluo-postgres"])
        .arg(&dir)
        .arg(&bin)
        .arg(if root { "1" } else { "0" })
        .arg(if durable { "on" } else { "off" })
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        // Out of the test's process group: a Ctrl-C must not kill the
        // shell before it has cleaned up.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run sh to supervise PostgreSQL: {e}"))?;
    let mut stdin = child.stdin.take().unwrap();
    let lines = read_lines(child.stdout.take().unwrap());
    let logs = |what: &str| {
        let mut text = format!("{what} ({} cluster in {}):", kind, dir.display());
        let initialized = dir.join("data/postgresql.conf").exists();
        let files = if initialized {
            &["supervisor.log", "postgres.log"][..]
        } else {
            &["supervisor.log", "initdb.log"]
        };
        for log in files {
            if let Ok(content) = std::fs::read_to_string(dir.join(log)) {
                text += &format!("\n--- {log}\n{content}");
            }
        }
        text
    };
    match lines.recv_timeout(DEADLINE).as_deref() {
        Ok("initialized") => {}
        Ok(_) | Err(mpsc::RecvTimeoutError::Disconnected) => return Err(logs("initdb failed")),
        Err(mpsc::RecvTimeoutError::Timeout) => return Err(logs("initdb took more than 60 s")),
    }
    for _ in 0..PORT_TRIES {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("cannot find a free loopback port: {e}"))?
            .port();
        writeln!(stdin, "{port}")
            .map_err(|e| logs(&format!("the supervising shell is gone ({e})")))?;
        match lines.recv_timeout(DEADLINE).as_deref() {
            Ok("ready") => {
                return Ok(Server {
                    admin: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
                    supervisor: Mutex::new(stdin),
                    external: false,
                })
            }
            Ok(_) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(logs("the supervising shell died"))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(logs("PostgreSQL did not start within 60 s"))
            }
        }
    }
    Err(logs(&format!(
        "PostgreSQL did not start on {PORT_TRIES} ports"
    )))
}

fn temp_dir(kind: &str) -> Result<PathBuf, String> {
    let base = std::env::temp_dir();
    for n in 0..100 {
        let dir = base.join(format!("confluo-pg-{kind}-{}-{n}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
        }
    }
    Err(format!(
        "cannot create a folder for PostgreSQL in {}",
        base.display()
    ))
}

/// The lines `out` prints, on a channel (to wait for them with a deadline).
fn read_lines(out: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// An existing server: databases are created through `url` and dropped by
/// a supervising shell when the process ends.
fn external(url: String) -> Result<Server, String> {
    const DROPPER: &str = r#"
set -u
trap '' PIPE HUP INT
psql=$1
names=
while read -r name; do names="$names $name"; done
for name in $names; do
  "$psql" -X -q -d "$CONFLUO_TEST_POSTGRES" -c "DROP DATABASE IF EXISTS \"$name\" WITH (FORCE)" >/dev/null 2>&1 ||
    "$psql" -X -q -d "$CONFLUO_TEST_POSTGRES" -c "DROP DATABASE IF EXISTS \"$name\"" >/dev/null 2>&1
done
"#;
    // Fails early, with psql's message, when the URL does not work.
    try_psql(&url, "SELECT 1").map_err(|e| format!("{ENV} does not reach a server: {e}"))?;
    let mut child = Command::new("sh")
        .args(["-c", DROPPER, "confluo-postgres-dropper"])
        .arg(psql_binary())
        .env(ENV, &url)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run sh: {e}"))?;
    Ok(Server {
        admin: url,
        supervisor: Mutex::new(child.stdin.take().unwrap()),
        external: true,
    })
}
