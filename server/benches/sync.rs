//! The sync benchmark, over loopback against the real server binary:
//! 1. 100,000 todo rows from device A through the server to an empty
//!    device B: seconds, rows per second, bytes on the wire per row, and
//!    peak RSS of the server and of the devices' process.
//! 2. 50 devices syncing small edits concurrently for 30 s: syncs per
//!    second, p50/p99 latency, errors.
//! 3. A maximal push of minimal changes (16 MiB): the server's peak RSS;
//!    and during a maximal push the server takes, how long a one-row push
//!    to another space waits.
//!
//! 6. 10,000 idle long polls held open: the server's resident memory.
//!
//! 5. The first sync of a 1,000,000-row space onto an empty device, the
//!    device in a process of its own: peak RSS of that process and of the
//!    server while it serves the sync (`initial_sync_1m_*`), and seconds.
//!
//! 4. Figures 1 and 2 again with two server processes sharing one
//!    PostgreSQL database (a throwaway cluster the benchmark starts, fsync
//!    on): device A pushes through one and B pulls through the other, the
//!    50 devices are spread over both. Their names end in `_pg`.
//!
//! Prints one `RESULT {json}` line per figure. `CONFLUO_BENCH_ONLY` runs
//! one figure alone: `transfer` (1, on SQLite), `crowd` (2, on SQLite),
//! `initial_sync` (5) or `idle_long_polls` (6).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use confluo_core::{Change, ChangeSet, Database, Hlc, SiteId, SyncConfig, Value};

#[path = "../../core/benches/workload.rs"]
mod workload;

#[path = "../tests/support/postgres.rs"]
mod postgres;

use workload::{workload, ROWS, SCHEMA};

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the server binary on the store `db` (a SQLite file or a
/// PostgreSQL URL).
fn start_server(db: &std::ffi::OsStr) -> Server {
    start_server_with(db, &[])
}

fn start_server_with(db: &std::ffi::OsStr, extra: &[&str]) -> Server {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_confluo-server"))
        .args(["--dev", "--listen", &format!("127.0.0.1:{port}"), "--db"])
        .arg(db)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while ureq::get(&format!("{url}/healthz")).call().is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server { child, url }
}

/// Peak resident memory of a process, in MB (VmHWM).
fn peak_rss_mb(pid: &str) -> f64 {
    memory_mb(pid, "VmHWM:")
}

/// A memory figure of `/proc/<pid>/status` (VmHWM, VmRSS...), in MB.
fn memory_mb(pid: &str, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// CPU time a process has used so far, all its threads, in milliseconds
/// (`utime + stime` of `/proc/<pid>/stat`, in Linux's fixed 100 ticks a
/// second).
fn cpu_ms(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may
    // hold spaces: utime and stime are the 12th and 13th of them.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: Vec<f64> = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    if ticks.len() == 2 {
        (ticks[0] + ticks[1]) * 10.0
    } else {
        f64::NAN
    }
}

fn result(name: &str, value: f64, unit: &str) {
    println!("RESULT {{\"name\":\"{name}\",\"value\":{value:.4},\"unit\":\"{unit}\",\"ratio_to_plain\":null}}");
}

fn device(dir: &std::path::Path, name: &str) -> Database {
    let db = Database::open(dir.join(format!("{name}.db"))).unwrap();
    db.execute_batch(SCHEMA).unwrap();
    db.enable_sync("todo").unwrap();
    db
}

/// Inserts the core benchmark's rows in one transaction, `id_suffix`
/// appended to their ids (for more rows than one workload).
fn insert_workload(db: &Database, id_suffix: &str) {
    db.write(|tx| {
        for r in workload() {
            tx.execute(
                "INSERT INTO todo VALUES (?1, ?2, ?3, ?4)",
                &[
                    Value::Text(r.id + id_suffix),
                    Value::Text(r.title),
                    Value::Text(r.status.into()),
                    Value::Text(r.body),
                ],
            )?;
        }
        Ok(())
    })
    .unwrap();
}

/// Device A pushes through `up`, device B pulls through `down`; figure
/// names end in `suffix`.
fn transfer(dir: &std::path::Path, up: &Server, down: &Server, suffix: &str) {
    let a = device(dir, "a");
    let b = device(dir, "b");
    let up_server_pid = up.child.id().to_string();
    insert_workload(&a, "");
    let started = Instant::now();
    let up_report = a
        .sync_now(&SyncConfig::new(&up.url, "bench", "dev-token"))
        .unwrap();
    let (up, down) = (
        up_report,
        b.sync_now(&SyncConfig::new(&down.url, "bench", "dev-token"))
            .unwrap(),
    );
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(down.applied, up.pushed);
    let count = b.query("SELECT count(*) FROM todo", &[]).unwrap().rows[0][0].clone();
    assert_eq!(count, Value::Integer(ROWS as i64));
    eprintln!("push {:?}, pull {:?}", up.duration, down.duration);
    result(&format!("transfer_100k_a_to_b{suffix}"), secs, "s");
    result(
        &format!("transfer_rows_per_second{suffix}"),
        ROWS as f64 / secs,
        "rows/s",
    );
    if !suffix.is_empty() {
        return;
    }
    result(
        "transfer_wire_bytes_per_row",
        (up.bytes_sent + down.bytes_received) as f64 / (2 * ROWS) as f64,
        "bytes",
    );
    result("server_peak_rss", peak_rss_mb(&up_server_pid), "MB");
    result("devices_peak_rss", peak_rss_mb("self"), "MB");
}

/// `devices` devices spread over `servers` sync small edits for `duration`;
/// figure names end in `suffix`.
fn many_devices(
    dir: &std::path::Path,
    servers: &[&Server],
    devices: usize,
    duration: Duration,
    suffix: &str,
) {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..devices)
        .map(|i| {
            let db = device(dir, &format!("crowd{suffix}{i}"));
            let config = SyncConfig::new(&servers[i % servers.len()].url, "crowd", "dev-token");
            let (config, latencies, errors, stop) = (config.clone(), latencies.clone(), errors.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let id = format!("d{i}-{}", n % 20);
                    db.execute(
                        "INSERT INTO todo VALUES (?1, ?2, 'open', '') ON CONFLICT(id) DO UPDATE SET title = excluded.title",
                        &[Value::Text(id), Value::Text(format!("edit {n}"))],
                    )
                    .unwrap();
                    let started = Instant::now();
                    match db.sync_now(&config) {
                        Ok(_) => latencies.lock().unwrap().push(started.elapsed()),
                        Err(e) => {
                            eprintln!("sync error: {e}");
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    let server_pids: Vec<String> = servers.iter().map(|s| s.child.id().to_string()).collect();
    let servers_cpu = || server_pids.iter().map(|p| cpu_ms(p)).sum::<f64>();
    let (devices_before, servers_before) = (cpu_ms("self"), servers_cpu());
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let (devices_cpu, servers_cpu) = (
        cpu_ms("self") - devices_before,
        servers_cpu() - servers_before,
    );
    let mut l = latencies.lock().unwrap().clone();
    l.sort();
    let pct = |p: f64| l[((l.len() as f64 * p) as usize).min(l.len() - 1)].as_secs_f64() * 1000.0;
    result(
        &format!("crowd_syncs_per_second{suffix}"),
        l.len() as f64 / duration.as_secs_f64(),
        "syncs/s",
    );
    result(&format!("crowd_sync_p50{suffix}"), pct(0.50), "ms");
    result(&format!("crowd_sync_p99{suffix}"), pct(0.99), "ms");
    // Where the machine's time goes: the devices' process (each sync with
    // the local edit before it) and the servers, per sync.
    result(
        &format!("crowd_device_cpu_per_sync{suffix}"),
        devices_cpu / l.len() as f64,
        "ms",
    );
    result(
        &format!("crowd_server_cpu_per_sync{suffix}"),
        servers_cpu / l.len() as f64,
        "ms",
    );
    result(
        &format!("crowd_errors{suffix}"),
        errors.load(Ordering::Relaxed) as f64,
        "count",
    );
}

/// POSTs an encoded change set to `space`; the HTTP status.
fn post(url: &str, space: &str, body: &[u8]) -> u16 {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    agent
        .post(format!("{url}/v1/spaces/{space}/sync"))
        .header("authorization", "Bearer dev-token")
        .header("confluo-protocol", "1")
        .header("content-type", "application/vnd.confluo.changeset")
        .send(body)
        .map_or(0, |r| r.status().as_u16())
}

/// `n` changes with `value`: each of its own row, or all markers of one row.
fn changes(n: usize, value: Value, distinct_rows: bool) -> Vec<u8> {
    let site = SiteId::random();
    let table: Arc<str> = Arc::from("todo");
    let same: Arc<[Value]> = vec![Value::Text("k".into())].into();
    let hlc = Hlc::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
        0,
    );
    ChangeSet {
        source: site,
        recipient: None,
        since: 0,
        until: 1,
        changes: (0..n)
            .map(|i| Change {
                table: table.clone(),
                pk: if distinct_rows {
                    vec![Value::Integer(i as i64)].into()
                } else {
                    same.clone()
                },
                column: distinct_rows.then(|| Arc::from("title")),
                value: value.clone(),
                hlc,
                site,
                cl: 1,
                db_version: 1,
                seq: i as u32,
            })
            .collect(),
    }
    .encode()
}

fn maximal_pushes(dir: &std::path::Path) {
    // The smallest changes there are, as many as 16 MiB holds.
    let server = start_server(dir.join("max").join("server.db").as_os_str());
    let minimal = changes(((16 << 20) - 1024) / 2, Value::Null, false);
    let status = post(&server.url, "minimal", &minimal);
    eprintln!("maximal push of minimal changes: HTTP {status}");
    result(
        "max_push_minimal_changes_server_rss",
        peak_rss_mb(&server.child.id().to_string()),
        "MB",
    );
    // A push the server takes (most of 16 MiB, under its change cap), and
    // meanwhile a one-row push to another space.
    let big = changes(150_000, Value::Text("x".repeat(70)), true);
    assert!(big.len() < 16 << 20, "{}", big.len());
    let big_push = {
        let url = server.url.clone();
        std::thread::spawn(move || post(&url, "big", &big))
    };
    std::thread::sleep(Duration::from_millis(200));
    let small = changes(1, Value::Text("one row".into()), true);
    let started = Instant::now();
    let status = post(&server.url, "other", &small);
    let waited = started.elapsed();
    assert_eq!(status, 200);
    assert_eq!(big_push.join().unwrap(), 200);
    result(
        "other_space_push_ms_during_max_push",
        waited.as_secs_f64() * 1000.0,
        "ms",
    );
}

/// How many idle long polls the server holds for its memory figure.
const IDLE_POLLS: usize = 10_000;

/// Opens `IDLE_POLLS` long polls on a space with nothing new (one device
/// each would be one connection each), checks that the server holds them
/// all, and reports the server's resident memory then.
fn idle_long_polls(dir: &std::path::Path) {
    use std::io::{Read, Write};
    let server = start_server_with(
        dir.join("idle.db").as_os_str(),
        &["--max-connections", &(IDLE_POLLS + 100).to_string()],
    );
    let seed = device(dir, "idle-seed");
    seed.execute("INSERT INTO todo VALUES ('k', 'x', 'open', '')", &[])
        .unwrap();
    seed.sync_now(&SyncConfig::new(&server.url, "idle", "dev-token"))
        .unwrap();
    let pid = server.child.id().to_string();
    let before = memory_mb(&pid, "VmRSS:");
    let addr = server.url.trim_start_matches("http://").to_owned();
    let request = "GET /v1/spaces/idle/changes?cursor=1&wait=60 HTTP/1.1\r\nHost: bench\r\n\
                   Authorization: Bearer dev-token\r\nConfluo-Protocol: 1\r\n\r\n";
    let mut polls = Vec::with_capacity(IDLE_POLLS);
    for _ in 0..IDLE_POLLS {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        polls.push(s);
    }
    std::thread::sleep(Duration::from_secs(3));
    // Every poll is held: none has been answered.
    let answered = polls
        .iter()
        .filter(|s| {
            s.set_nonblocking(true).unwrap();
            let mut stream: &std::net::TcpStream = s;
            !matches!(stream.read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count();
    assert_eq!(answered, 0, "polls answered before their wait ended");
    let held = memory_mb(&pid, "VmRSS:");
    eprintln!("idle polls: server RSS {before:.1} MB before, {held:.1} MB with {IDLE_POLLS}");
    result("idle_long_polls_10k_server_rss", held, "MB");
}

/// How many rows the first-sync figure's space holds.
const INITIAL_SYNC_ROWS: usize = 1_000_000;
/// Set in the child process that plays the empty device: `url space dir`.
const DEVICE_ROLE: &str = "CONFLUO_BENCH_EMPTY_DEVICE";

/// The empty device's side of `initial_sync`: one `sync_now`, then its
/// row count and its own peak RSS on stdout.
fn empty_device(args: &str) {
    let mut parts = args.splitn(3, ' ');
    let (url, space, dir) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let db = device(std::path::Path::new(dir), "empty");
    let report = db
        .sync_now(&SyncConfig::new(url, space, "dev-token"))
        .unwrap();
    let count = db.query("SELECT count(*) FROM todo", &[]).unwrap().rows[0][0].clone();
    println!(
        "{count:?} {} {}",
        report.bytes_received,
        peak_rss_mb("self")
    );
}

/// Fills a space with `INITIAL_SYNC_ROWS` rows (pushed 100,000 at a time
/// by one device), then syncs an empty device in a process of its own
/// through a server started afresh on that data (so that its peak is the
/// sync's, not what the allocator kept from the seeding).
fn initial_sync(dir: &std::path::Path) {
    let db = dir.join("server.db");
    let server = start_server(db.as_os_str());
    let seed = device(dir, "seed");
    let cfg = SyncConfig::new(&server.url, "large", "dev-token");
    for round in 0..INITIAL_SYNC_ROWS / ROWS {
        insert_workload(&seed, &format!("-{round}"));
        seed.sync_now(&cfg).unwrap();
    }
    drop(seed);
    drop(server);
    let server = start_server(db.as_os_str());
    let server_pid = server.child.id().to_string();
    let started = Instant::now();
    let out = Command::new(std::env::current_exe().unwrap())
        .env(
            DEVICE_ROLE,
            format!("{} large {}", server.url, dir.display()),
        )
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "the empty device failed");
    let out = String::from_utf8(out.stdout).unwrap();
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(
        fields[0],
        format!("Integer({INITIAL_SYNC_ROWS})"),
        "the device's rows: {out}"
    );
    eprintln!("initial sync: {} bytes received", fields[1]);
    result("initial_sync_1m_seconds", secs, "s");
    result(
        "initial_sync_1m_device_rss",
        fields[2].parse().unwrap(),
        "MB",
    );
    result("initial_sync_1m_server_rss", peak_rss_mb(&server_pid), "MB");
}

fn main() {
    if let Ok(args) = std::env::var(DEVICE_ROLE) {
        return empty_device(&args);
    }
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    match std::env::var("CONFLUO_BENCH_ONLY").as_deref() {
        Ok("initial_sync") => return initial_sync(tempfile::tempdir().unwrap().path()),
        Ok("idle_long_polls") => return idle_long_polls(tempfile::tempdir().unwrap().path()),
        _ => {}
    }
    let seconds: u64 = std::env::var("CONFLUO_BENCH_CROWD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path().join("server.db").as_os_str());
    // One figure alone, on the SQLite store, to judge a change quickly.
    match std::env::var("CONFLUO_BENCH_ONLY").as_deref() {
        Ok("transfer") => return transfer(dir.path(), &server, &server, ""),
        Ok("crowd") => {
            return many_devices(dir.path(), &[&server], 50, Duration::from_secs(seconds), "")
        }
        _ => {}
    }
    transfer(dir.path(), &server, &server, "");
    many_devices(dir.path(), &[&server], 50, Duration::from_secs(seconds), "");
    drop(server);
    initial_sync(tempfile::tempdir().unwrap().path());
    idle_long_polls(tempfile::tempdir().unwrap().path());
    std::fs::create_dir_all(dir.path().join("max")).unwrap();
    maximal_pushes(dir.path());
    // Two server processes on one PostgreSQL database.
    let pg_dir = tempfile::tempdir().unwrap();
    let url = postgres::durable_database();
    let (one, two) = (
        start_server(std::ffi::OsStr::new(&url)),
        start_server(std::ffi::OsStr::new(&url)),
    );
    transfer(pg_dir.path(), &one, &two, "_pg");
    many_devices(
        pg_dir.path(),
        &[&one, &two],
        50,
        Duration::from_secs(seconds),
        "_pg",
    );
}
