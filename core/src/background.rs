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
use crate::error::{Error, Result};
use crate::observe::Observation;

/// What background sync is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncState {
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
        message: String,
        retry_in: Duration,
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

/// A running background sync. Stop it with `stop` (or by dropping it).
pub struct BackgroundSync {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    poller_stop: Arc<AtomicBool>,
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

    /// Syncs now (or as soon as online), skipping any backoff.
    pub fn sync_soon(&self) {
        self.shared.update(|c| {
            c.kick = true;
            c.not_before = None;
        });
    }

    /// Stops syncing. Returns within about a second even during a long poll
    /// or a slow request: those finish on their own and are discarded.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.poller_stop.store(true, Ordering::SeqCst);
        self.shared.update(|c| c.stop = true);
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
        self.shutdown();
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
    /// Starts background sync with `config`; `listener` hears every status
    /// change. Starts online; feed the platform's hint to `set_online`.
    pub fn start_sync(
        self: &Arc<Self>,
        config: SyncConfig,
        listener: impl SyncStatusListener,
    ) -> Result<BackgroundSync> {
        self.bind_space(&config.space)?;
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                online: true,
                kick: true,
                ..Control::default()
            }),
            wake: Condvar::new(),
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
        let worker = std::thread::Builder::new()
            .name("confluo-sync".into())
            .spawn(move || run_worker(db, config, s, Arc::new(listener)))
            .map_err(|e| Error::invalid(format!("cannot start the sync thread: {e}")))?;
        Ok(BackgroundSync {
            shared,
            worker: Some(worker),
            poller_stop,
            _observer: observer,
        })
    }
}

fn run_worker(
    db: Arc<Database>,
    config: SyncConfig,
    shared: Arc<Shared>,
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
            guarded("a sync status listener", || listener.on_status(&status));
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
            Err(err) => {
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
            let client = Client::new(config.clone());
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
                let online = shared
                    .control
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .online;
                if !online {
                    sleep_unless(&stop, Duration::from_millis(200));
                    continue;
                }
                // Only a closed database ends the poll; anything else (a
                // busy file, say) is waited out like a failed request.
                let (cursor, tag) = match db.server_position() {
                    Ok(position) => position,
                    Err(Error::Closed) => break,
                    Err(_) => {
                        pause(&mut failures);
                        continue;
                    }
                };
                if reported_at == Some(cursor) {
                    sleep_unless(&stop, backoff(&config, stuck));
                    stuck = stuck.saturating_add(1);
                } else {
                    stuck = 0;
                }
                let who = match Ident::of(&db) {
                    Ok(who) => who,
                    Err(Error::Closed) => break,
                    Err(_) => {
                        pause(&mut failures);
                        continue;
                    }
                };
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
