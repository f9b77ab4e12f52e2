//! Counters for `/metrics`, in Prometheus' text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub pushed_changes: AtomicU64,
    pub pulled_changes: AtomicU64,
    pub versions: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub long_polls: AtomicI64,
    /// Connections past the connection cap (answered for `/healthz` only).
    pub overflow: AtomicU64,
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((route, status))
            .or_default() += 1;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP confluo_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE confluo_requests_total counter\n");
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "confluo_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let counters = [
            (
                "confluo_pushed_changes_total",
                "Changes received in pushes.",
                &self.pushed_changes,
            ),
            (
                "confluo_pulled_changes_total",
                "Changes sent in pulls.",
                &self.pulled_changes,
            ),
            (
                "confluo_versions_total",
                "Space versions created by pushes.",
                &self.versions,
            ),
            (
                "confluo_request_body_bytes_total",
                "Bytes of request bodies.",
                &self.bytes_in,
            ),
            (
                "confluo_response_body_bytes_total",
                "Bytes of change-set responses.",
                &self.bytes_out,
            ),
            (
                "confluo_overflow_connections_total",
                "Connections past the connection cap, answered only for /healthz.",
                &self.overflow,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP confluo_long_polls Long polls waiting now.\n# TYPE confluo_long_polls gauge\nconfluo_long_polls {}",
            self.long_polls.load(Ordering::Relaxed)
        );
        out
    }
}
