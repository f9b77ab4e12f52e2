//! Background sync: syncs shortly after local commits, keeps a long poll
//! open for changes from other devices, backs off on failure, and reports
//! its status.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::callbacks::guarded;
use crate::client::{Client, Ident, Reply, SyncConfig, SyncReport};
use crate::db::Database;
use crate::error::{Error, ErrorKind, Result};
use crate::observe::Observation;

/// What background sync is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncState {
    /// Background sync is not running (`Database::stopped_status`).
    Stopped,
    /// Caught up (as of `last_synced`).
    Idle,
    Syncing,
    /// No network: the platform said so (`retry_in` is `None`: waiting for
    /// it to come back), or the server cannot be reached (the next attempt
    /// is in `retry_in`).
    Offline {
        retry_in: Option<Duration>,
    },
    /// The last attempt failed; the next one is in `retry_in`.
    Error {
        kind: ErrorKind,
        message: String,
        retry_in: Duration,
    },
    /// The server refused the token, even a refreshed one, or its rights:
    /// the user has to sign in again. No retries until `sync_soon`.
    AuthRequired {
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncStatus {
    pub state: SyncState,
    /// Rows with local changes the server has not accepted yet.
    pub pending: u64,
    /// Changes from the server this database could not apply, kept aside
    /// with their reasons (`Database::rejected_changes`).
    pub rejected: u64,
    pub last_synced: Option<SystemTime>,
    /// The server's clock minus this device's, in milliseconds, from the
    /// last sync (see `SyncReport::clock_offset_ms`): an app can warn the
    /// user whose clock is far off.
    pub clock_offset_ms: Option<i64>,
}

/// Receives every status change.
pub trait SyncStatusListener: Send + Sync + 'static {
    fn on_status(&self, status: &SyncStatus);
}

impl<F: Fn(&SyncStatus) + Send + Sync + 'static> SyncStatusListener for F {
    fn on_status(&self, status: &SyncStatus) {
        self(status)
    }
}

#[derive(Default)]
struct Control {
    stop: bool,
    online: bool,
    /// When the first and the last local commit since the last sync
    /// happened: sync `debounce` after the last, but no later than
    /// `10 × debounce` after the first, so steady writing still syncs.
    first_local_change: Option<Instant>,
    local_change: Option<Instant>,
    /// The long poll saw changes on the server.
    remote_news: bool,
    /// Sync as soon as possible (start, back online, asked for).
    kick: bool,
    /// The server refused our token: nothing but a kick syncs again.
    auth_required: bool,
    /// No attempt before this (backoff after a failure).
    not_before: Option<Instant>,
}

struct Shared {
    control: Mutex<Control>,
    wake: Condvar,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Control)) {
        f(&mut self.control.lock().unwrap_or_else(|e| e.into_inner()));
        self.wake.notify_all();
    }
}

/// Lets statuses through to the listener until stopped; `close` waits for
/// a status being delivered, so none arrives after it returns.
struct StatusGate {
    delivering: Mutex<()>,
    closed: AtomicBool,
}

impl StatusGate {
    fn deliver(&self, f: impl FnOnce()) {
        let _delivering = self.delivering.lock().unwrap_or_else(|e| e.into_inner());
        if !self.closed.load(Ordering::SeqCst) {
            f();
        }
    }

    fn close(&self, on_worker: bool) {
        self.closed.store(true, Ordering::SeqCst);
        // From the listener itself (on the worker) the lock is ours already.
        if !on_worker {
            drop(self.delivering.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }
}

/// A running background sync. Stop it with `stop` (or by dropping it).
pub struct BackgroundSync {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    poller_stop: Arc<AtomicBool>,
    gate: Arc<StatusGate>,
    _observer: Observation,
}

impl BackgroundSync {
    /// The platform's network hint: offline pauses syncing, online resumes
    /// at once.
    pub fn set_online(&self, online: bool) {
        self.shared.update(|c| {
            c.online = online;
            if online {
                c.kick = true;
                c.not_before = None;
            }
        });
    }

    /// Syncs now (or as soon as online), skipping any backoff; after
    /// `AuthRequired`, tries the token provider again.
    pub fn sync_soon(&self) {
        self.shared.update(|c| {
            c.kick = true;
            c.auth_required = false;
            c.not_before = None;
        });
    }

    /// Stops syncing. Returns within about a second even during a long poll
    /// or a slow request: those finish on their own and are discarded. The
    /// listener hears nothing after this returns.
    pub fn stop(mut self) {
        self.shutdown(true);
    }

    /// Stops syncing without waiting for the sync thread (closing the
    /// database ends a sync in flight anyway). The listener hears nothing
    /// after this returns.
    pub fn stop_without_waiting(mut self) {
        self.shutdown(false);
    }

    fn shutdown(&mut self, wait: bool) {
        self.poller_stop.store(true, Ordering::SeqCst);
        self.shared.update(|c| c.stop = true);
        let on_worker = self
            .worker
            .as_ref()
            .is_some_and(|w| w.thread().id() == std::thread::current().id());
        self.gate.close(on_worker);
        if !wait || on_worker {
            self.worker = None;
        }
        if let Some(worker) = self.worker.take() {
            let deadline = Instant::now() + Duration::from_secs(1);
            while !worker.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if worker.is_finished() {
                let _ = worker.join();
            }
        }
    }
}

impl Drop for BackgroundSync {
    fn drop(&mut self) {
        self.shutdown(true);
    }
}

/// Backoff delays: doubling from `min` to `max`, with jitter so that many
/// devices do not retry in step.
fn backoff(config: &SyncConfig, failures: u32) -> Duration {
    let base = config
        .min_backoff
        .saturating_mul(1u32 << failures.min(20))
        .min(config.max_backoff);
    // Jitter in [50%, 100%] of the delay, from the clock's nanoseconds.
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let fraction = 0.5 + f64::from(nanos % 1000) / 2000.0;
    base.mul_f64(fraction).max(config.min_backoff.min(base))
}

impl Database {
    /// The status to show while background sync is not running: `Stopped`,
    /// with the real pending and rejected counts.
    pub fn stopped_status(&self) -> Result<SyncStatus> {
        Ok(SyncStatus {
            state: SyncState::Stopped,
            pending: self.pending_changes()?,
            rejected: self.rejected_count()?,
            last_synced: None,
            clock_offset_ms: None,
        })
    }

    /// Starts background sync with `config`; `listener` hears every status
    /// change. Starts online unless `config.online_at_start` is false; feed
    /// the platform's later hints to `set_online`.
    pub fn start_sync(
        self: &Arc<Self>,
        config: SyncConfig,
        listener: impl SyncStatusListener,
    ) -> Result<BackgroundSync> {
        self.bind_space(&config.space)?;
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                online: config.online_at_start,
                kick: true,
                ..Control::default()
            }),
            wake: Condvar::new(),
        });
        let gate = Arc::new(StatusGate {
            delivering: Mutex::new(()),
            closed: AtomicBool::new(false),
        });
        let on_commit = Arc::downgrade(&shared);
        let observer = self.observe(&[], move |_: &[String]| {
            if let Some(s) = on_commit.upgrade() {
                s.update(|c| {
                    let now = Instant::now();
                    c.first_local_change.get_or_insert(now);
                    c.local_change = Some(now);
                });
            }
        });
        let poller_stop = Arc::new(AtomicBool::new(false));
        spawn_poller(
            self.clone(),
            config.clone(),
            shared.clone(),
            poller_stop.clone(),
        )?;
        let db = self.clone();
        let s = shared.clone();
        let worker_gate = gate.clone();
        let worker = std::thread::Builder::new()
            .name("confluo-sync".into())
            .spawn(move || run_worker(db, config, s, worker_gate, Arc::new(listener)))
            .map_err(|e| Error::invalid(format!("cannot start the sync thread: {e}")))?;
        Ok(BackgroundSync {
            shared,
            worker: Some(worker),
            poller_stop,
            gate,
            _observer: observer,
        })
    }
}

fn run_worker(
    db: Arc<Database>,
    config: SyncConfig,
    shared: Arc<Shared>,
    gate: Arc<StatusGate>,
    listener: Arc<dyn SyncStatusListener>,
) {
    let client = Client::new(config.clone());
    let mut failures = 0u32;
    let mut last_synced: Option<SystemTime> = None;
    let mut last_status: Option<SyncStatus> = None;
    let mut clock_offset_ms: Option<i64> = None;
    let mut emit = |state: SyncState, last_synced: Option<SystemTime>, clock_offset_ms| {
        let status = SyncStatus {
            state,
            pending: db.pending_changes().unwrap_or(0),
            rejected: db.rejected_count().unwrap_or(0),
            last_synced,
            clock_offset_ms,
        };
        if last_status.as_ref() != Some(&status) {
            // A listener that panics must not end syncing for the app.
            gate.deliver(|| {
                guarded("a sync status listener", || listener.on_status(&status));
            });
            last_status = Some(status);
        }
    };
    loop {
        // Wait for a reason to sync.
        let mut guard = shared.control.lock().unwrap_or_else(|e| e.into_inner());
        let reason_now = loop {
            if guard.stop {
                return;
            }
            let now = Instant::now();
            if !guard.online {
                drop(guard);
                emit(
                    SyncState::Offline { retry_in: None },
                    last_synced,
                    clock_offset_ms,
                );
                guard = shared.control.lock().unwrap_or_else(|e| e.into_inner());
                if !guard.online && !guard.stop {
                    guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                continue;
            }
            let debounced = guard.local_change.map(|t| {
                let first = guard.first_local_change.unwrap_or(t);
                (t + config.debounce).min(first + config.debounce * 10)
            });
            if guard.auth_required && !guard.kick {
                guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let backoff_until = guard.not_before.filter(|t| *t > now);
            let wanted = guard.kick || guard.remote_news || debounced.is_some();
            let due = match (backoff_until, debounced) {
                (Some(t), _) => Some(t),
                (None, Some(t)) if !guard.kick && !guard.remote_news => Some(t),
                _ => None,
            };
            match (wanted, due) {
                (true, None) => break true,
                (true, Some(t)) if t <= now => break true,
                (_, Some(t)) => {
                    guard = shared
                        .wake
                        .wait_timeout(guard, t - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                (false, None) => {
                    guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
            }
        };
        debug_assert!(reason_now);
        let local_only = !guard.kick && !guard.remote_news;
        guard.kick = false;
        guard.auth_required = false;
        guard.remote_news = false;
        guard.local_change = None;
        guard.first_local_change = None;
        guard.not_before = None;
        drop(guard);
        // A local commit may be ours (pulled changes are commits too): skip
        // the round trip when nothing is waiting to go out.
        if local_only && failures == 0 && db.pending_changes().unwrap_or(1) == 0 {
            emit(SyncState::Idle, last_synced, clock_offset_ms);
            continue;
        }
        emit(SyncState::Syncing, last_synced, clock_offset_ms);
        match client.sync(&db) {
            Ok(report) => {
                clock_offset_ms = report.clock_offset_ms.or(clock_offset_ms);
                failures = 0;
                last_synced = Some(SystemTime::now());
                emit(SyncState::Idle, last_synced, clock_offset_ms);
            }
            Err(Error::Auth(message)) => {
                // Retrying with a token the server refused (a refreshed one
                // included) cannot help: wait for the app.
                log::warn!("sync: the server refused the token: {message}");
                shared.update(|c| c.auth_required = true);
                emit(
                    SyncState::AuthRequired { message },
                    last_synced,
                    clock_offset_ms,
                );
            }
            Err(err) => {
                log::warn!("sync failed: {err}");
                let mut delay = backoff(&config, failures);
                if let Error::Network {
                    retry_after: Some(after),
                    ..
                } = &err
                {
                    delay = delay.max(*after);
                }
                failures = failures.saturating_add(1);
                shared.update(|c| c.not_before = Some(Instant::now() + delay));
                // Keep trying later even with nothing new to send.
                shared.update(|c| c.kick = true);
                let state = match err {
                    Error::Unreachable(_) => SyncState::Offline {
                        retry_in: Some(delay),
                    },
                    other => SyncState::Error {
                        kind: other.kind(),
                        message: other.to_string(),
                        retry_in: delay,
                    },
                };
                emit(state, last_synced, clock_offset_ms);
            }
        }
    }
}

/// Keeps a long poll open; when the server has news, wakes the worker.
/// Runs on its own thread, which is left to finish its last poll on stop.
fn spawn_poller(
    db: Arc<Database>,
    config: SyncConfig,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    std::thread::Builder::new()
        .name("confluo-long-poll".into())
        .spawn(move || {
            let client = Client::without_token_refresh(config.clone());
            let mut failures = 0u32;
            // The cursor when we last reported news: news again at the same
            // cursor means the worker could not catch up (its sync fails),
            // and polling again at once would spin.
            let mut reported_at: Option<u64> = None;
            let mut stuck = 0u32;
            let pause = |failures: &mut u32| {
                sleep_unless(&stop, backoff(&config, *failures));
                *failures = failures.saturating_add(1);
            };
            while !stop.load(Ordering::SeqCst) {
                let waiting = {
                    let c = shared.control.lock().unwrap_or_else(|e| e.into_inner());
                    !c.online || c.auth_required
                };
                if waiting {
                    sleep_unless(&stop, Duration::from_millis(200));
                    continue;
                }
                // Only a closed database ends the poll; anything else (a
                // busy file, say) is waited out like a failed request.
                let standing = match db.standing() {
                    Ok(standing) => standing,
                    Err(Error::Closed) => break,
                    Err(_) => {
                        pause(&mut failures);
                        continue;
                    }
                };
                let who = Ident::new(&db, &standing);
                let (cursor, tag) = (standing.cursor, standing.cursor_tag);
                if reported_at == Some(cursor) {
                    sleep_unless(&stop, backoff(&config, stuck));
                    stuck = stuck.saturating_add(1);
                } else {
                    stuck = 0;
                }
                let mut report = SyncReport::default();
                match client.get_changes(
                    cursor,
                    tag.as_deref(),
                    &who,
                    None,
                    config.long_poll,
                    &mut report,
                ) {
                    Ok(Reply::Page(page)) => {
                        failures = 0;
                        if page.changes.until > cursor || !page.changes.changes.is_empty() {
                            shared.update(|c| c.remote_news = true);
                            reported_at = Some(cursor);
                            // Let the worker catch up before polling again.
                            sleep_unless(&stop, Duration::from_millis(50));
                        }
                    }
                    Ok(_) => {
                        shared.update(|c| c.remote_news = true);
                        reported_at = Some(cursor);
                        sleep_unless(&stop, Duration::from_millis(200));
                    }
                    // The worker reports failures; the poll just waits.
                    Err(_) => pause(&mut failures),
                }
            }
        })
        .map_err(|e| Error::invalid(format!("cannot start the long-poll thread: {e}")))?;
    Ok(())
}

fn sleep_unless(stop: &AtomicBool, total: Duration) {
    let until = Instant::now() + total;
    while !stop.load(Ordering::SeqCst) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let config = SyncConfig::new("http://x", "s", "t");
        let d0 = backoff(&config, 0);
        assert!(
            d0 >= Duration::from_millis(500) && d0 <= Duration::from_secs(1),
            "{d0:?}"
        );
        let d3 = backoff(&config, 3);
        assert!(
            d3 >= Duration::from_secs(4) && d3 <= Duration::from_secs(8),
            "{d3:?}"
        );
        let capped = backoff(&config, 30);
        assert!(
            capped >= Duration::from_secs(150) && capped <= Duration::from_secs(300),
            "{capped:?}"
        );
    }
}
