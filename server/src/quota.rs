//! Per-user quotas (`[quotas]` in auth.toml): requests per second, bytes
//! pushed per minute, and spaces used, so that no token can take the server
//! for itself. Kept in memory, per server process.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// The limits; each one absent is no limit.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// Requests a second a user may make, with bursts of twice that.
    pub requests_per_second: Option<f64>,
    /// Bytes of pushes a user may send in a minute.
    pub push_bytes_per_minute: Option<u64>,
    /// Distinct spaces a user may use (since the server started).
    pub spaces: Option<usize>,
}

/// A request over a quota: which one, and when to try again.
#[derive(Debug, PartialEq)]
pub struct OverQuota {
    pub what: &'static str,
    pub retry_after: Duration,
}

#[derive(Default)]
struct Usage {
    /// Token bucket for requests: tokens left, and when last refilled.
    tokens: f64,
    refilled: Option<Instant>,
    /// Bytes pushed in the minute that started at `window`.
    window: Option<Instant>,
    pushed: u64,
    spaces: HashSet<String>,
    last_seen: Option<Instant>,
}

/// The usage of every user seen recently.
#[derive(Default)]
pub struct Meter {
    quotas: Quotas,
    users: Mutex<HashMap<String, Usage>>,
}

/// Users not seen for this long are forgotten (their usage restarts).
const FORGET_AFTER: Duration = Duration::from_secs(600);

impl Meter {
    pub fn new(quotas: Quotas) -> Self {
        Meter {
            quotas,
            users: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one request of `user` to `space`.
    pub fn request(&self, user: &str, space: &str, now: Instant) -> Result<(), OverQuota> {
        if self.quotas == Quotas::default() {
            return Ok(());
        }
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if users.len() > 10_000 {
            users.retain(|_, u| u.last_seen.is_some_and(|t| now - t < FORGET_AFTER));
        }
        let u = users.entry(user.to_owned()).or_default();
        u.last_seen = Some(now);
        if let Some(rate) = self.quotas.requests_per_second.filter(|r| *r > 0.0) {
            let burst = rate * 2.0;
            let elapsed = u.refilled.map_or(burst / rate, |t| (now - t).as_secs_f64());
            u.tokens = (u.tokens + elapsed * rate).min(burst);
            u.refilled = Some(now);
            if u.tokens < 1.0 {
                return Err(OverQuota {
                    what: "requests per second",
                    retry_after: Duration::from_secs_f64((1.0 - u.tokens) / rate),
                });
            }
            u.tokens -= 1.0;
        }
        if let Some(max) = self.quotas.spaces {
            if !u.spaces.contains(space) {
                if u.spaces.len() >= max {
                    return Err(OverQuota {
                        what: "spaces",
                        retry_after: FORGET_AFTER,
                    });
                }
                u.spaces.insert(space.to_owned());
            }
        }
        Ok(())
    }

    /// Counts `bytes` pushed by `user`.
    pub fn push(&self, user: &str, bytes: u64, now: Instant) -> Result<(), OverQuota> {
        let Some(max) = self.quotas.push_bytes_per_minute else {
            return Ok(());
        };
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let u = users.entry(user.to_owned()).or_default();
        let minute = Duration::from_secs(60);
        let start = match u.window {
            Some(t) if now - t < minute => t,
            _ => {
                u.pushed = 0;
                u.window = Some(now);
                now
            }
        };
        if u.pushed + bytes > max {
            return Err(OverQuota {
                what: "bytes pushed per minute",
                retry_after: minute - (now - start),
            });
        }
        u.pushed += bytes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_past_the_rate_wait_for_the_bucket_to_refill() {
        let meter = Meter::new(Quotas {
            requests_per_second: Some(2.0),
            ..Quotas::default()
        });
        let t0 = Instant::now();
        for _ in 0..4 {
            meter.request("u", "s", t0).unwrap();
        }
        let over = meter.request("u", "s", t0).unwrap_err();
        assert_eq!(over.what, "requests per second");
        assert!(over.retry_after <= Duration::from_millis(500));
        // Others are not affected; after half a second, one more.
        meter.request("v", "s", t0).unwrap();
        meter
            .request("u", "s", t0 + Duration::from_millis(500))
            .unwrap();
    }

    #[test]
    fn spaces_and_bytes_are_capped_per_user() {
        let meter = Meter::new(Quotas {
            spaces: Some(2),
            push_bytes_per_minute: Some(100),
            ..Quotas::default()
        });
        let t0 = Instant::now();
        meter.request("u", "a", t0).unwrap();
        meter.request("u", "b", t0).unwrap();
        meter.request("u", "a", t0).unwrap();
        assert_eq!(meter.request("u", "c", t0).unwrap_err().what, "spaces");
        meter.push("u", 60, t0).unwrap();
        let over = meter
            .push("u", 60, t0 + Duration::from_secs(10))
            .unwrap_err();
        assert_eq!(over.retry_after, Duration::from_secs(50));
        meter.push("u", 60, t0 + Duration::from_secs(61)).unwrap();
    }
}
