//! The sync benchmark, over loopback against the real server binary:
//! 1. 100,000 todo rows from device A through the server to an empty
//!    device B: seconds, rows per second, bytes on the wire per row, and
//!    peak RSS of the server and of the devices' process.
//! 2. 50 devices syncing small edits concurrently for 30 s: syncs per
//!    second, p50/p99 latency, errors.
//!
//! Prints one `RESULT {json}` line per figure.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use confluo_core::{Database, SyncConfig, Value};

#[path = "../../core/benches/workload.rs"]
mod workload;

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

fn start_server(dir: &std::path::Path) -> Server {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_confluo-server"))
        .args(["--dev", "--listen", &format!("127.0.0.1:{port}"), "--db"])
        .arg(dir.join("server.db"))
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
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
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

fn transfer(dir: &std::path::Path, server: &Server) {
    let a = device(dir, "a");
    let b = device(dir, "b");
    // The core benchmark's rows.
    a.write(|tx| {
        for r in workload() {
            tx.execute(
                "INSERT INTO todo VALUES (?1, ?2, ?3, ?4)",
                &[
                    Value::Text(r.id),
                    Value::Text(r.title),
                    Value::Text(r.status.into()),
                    Value::Text(r.body),
                ],
            )?;
        }
        Ok(())
    })
    .unwrap();
    let config = SyncConfig::new(&server.url, "bench", "dev-token");
    let started = Instant::now();
    let up = a.sync_now(&config).unwrap();
    let down = b.sync_now(&config).unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(down.applied, up.pushed);
    let count = b.query("SELECT count(*) FROM todo", &[]).unwrap().rows[0][0].clone();
    assert_eq!(count, Value::Integer(ROWS as i64));
    eprintln!("push {:?}, pull {:?}", up.duration, down.duration);
    result("transfer_100k_a_to_b", secs, "s");
    result("transfer_rows_per_second", ROWS as f64 / secs, "rows/s");
    result(
        "transfer_wire_bytes_per_row",
        (up.bytes_sent + down.bytes_received) as f64 / (2 * ROWS) as f64,
        "bytes",
    );
    result(
        "server_peak_rss",
        peak_rss_mb(&server.child.id().to_string()),
        "MB",
    );
    result("devices_peak_rss", peak_rss_mb("self"), "MB");
}

fn many_devices(dir: &std::path::Path, server: &Server, devices: usize, duration: Duration) {
    let config = SyncConfig::new(&server.url, "crowd", "dev-token");
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..devices)
        .map(|i| {
            let db = device(dir, &format!("crowd{i}"));
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
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let mut l = latencies.lock().unwrap().clone();
    l.sort();
    let pct = |p: f64| l[((l.len() as f64 * p) as usize).min(l.len() - 1)].as_secs_f64() * 1000.0;
    result(
        "crowd_syncs_per_second",
        l.len() as f64 / duration.as_secs_f64(),
        "syncs/s",
    );
    result("crowd_sync_p50", pct(0.50), "ms");
    result("crowd_sync_p99", pct(0.99), "ms");
    result(
        "crowd_errors",
        errors.load(Ordering::Relaxed) as f64,
        "count",
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let seconds: u64 = std::env::var("CONFLUO_BENCH_CROWD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    transfer(dir.path(), &server);
    many_devices(dir.path(), &server, 50, Duration::from_secs(seconds));
}
