//! Hybrid logical clocks: 48 bits of wall-clock milliseconds and a 16-bit
//! counter in one u64, so clocks compare as plain integers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const COUNTER_BITS: u32 = 16;
const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;
/// The largest wall-clock time an HLC can hold (48 bits of ms: year 10889).
pub const MAX_PHYSICAL_MS: u64 = (1 << 48) - 1;

#[derive(
    Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Hlc(pub u64);

impl Hlc {
    pub fn new(physical_ms: u64, counter: u16) -> Hlc {
        Hlc((physical_ms.min(MAX_PHYSICAL_MS) << COUNTER_BITS) | u64::from(counter))
    }

    pub fn physical_ms(self) -> u64 {
        self.0 >> COUNTER_BITS
    }

    pub fn counter(self) -> u16 {
        (self.0 & COUNTER_MASK) as u16
    }
}

impl std::fmt::Display for Hlc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.physical_ms(), self.counter())
    }
}

/// Where wall-clock time comes from. Tests inject a manual clock so that
/// "the later write" is deterministic.
pub trait TimeSource: Send + Sync {
    fn now_ms(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Default)]
pub struct SystemTimeSource;

impl TimeSource for SystemTimeSource {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// A clock that only moves when told to: for tests and simulations.
#[derive(Debug, Default)]
pub struct ManualTimeSource(AtomicU64);

impl ManualTimeSource {
    pub fn new(start_ms: u64) -> Self {
        ManualTimeSource(AtomicU64::new(start_ms))
    }
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl TimeSource for ManualTimeSource {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The HLC state of one database: the newest clock it issued or observed.
#[derive(Debug, Default, Clone)]
pub struct HlcState {
    last: Hlc,
}

impl HlcState {
    pub fn new(last: Hlc) -> Self {
        HlcState { last }
    }

    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A new clock for a local event, greater than every clock seen so far.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        let now_ms = now_ms.min(MAX_PHYSICAL_MS);
        let last_ms = self.last.physical_ms();
        self.last = if now_ms > last_ms {
            Hlc::new(now_ms, 0)
        } else if self.last.counter() < u16::MAX {
            Hlc(self.last.0 + 1)
        } else {
            // Counter exhausted within one millisecond: borrow the next one.
            Hlc::new(last_ms + 1, 0)
        };
        self.last
    }

    /// HLC receive rule: after seeing `remote`, every local clock issued
    /// later is greater than it.
    pub fn observe(&mut self, remote: Hlc) {
        self.last = self.last.max(remote);
    }
}

/// Refuses a remote clock further ahead of `now_ms` than `max_drift`.
pub fn check_drift(remote: Hlc, now_ms: u64, max_drift: Duration) -> Result<()> {
    let limit_ms = max_drift.as_millis() as u64;
    let ahead_ms = remote.physical_ms().saturating_sub(now_ms);
    if ahead_ms > limit_ms {
        return Err(Error::ClockDrift {
            ahead: Duration::from_millis(ahead_ms),
            limit: max_drift,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_physical_time_and_counter() {
        let h = Hlc::new(1_700_000_000_123, 7);
        assert_eq!(h.physical_ms(), 1_700_000_000_123);
        assert_eq!(h.counter(), 7);
        assert!(Hlc::new(5, 0) > Hlc::new(4, u16::MAX));
    }

    #[test]
    fn tick_is_strictly_monotonic_even_when_the_wall_clock_goes_back() {
        let mut s = HlcState::default();
        let a = s.tick(1000);
        let b = s.tick(1000);
        let c = s.tick(900);
        let d = s.tick(2000);
        assert!(a < b && b < c && c < d);
        assert_eq!(b, Hlc::new(1000, 1));
        assert_eq!(c, Hlc::new(1000, 2));
        assert_eq!(d, Hlc::new(2000, 0));
    }

    #[test]
    fn counter_overflow_borrows_the_next_millisecond() {
        let mut s = HlcState::new(Hlc::new(1000, u16::MAX));
        assert_eq!(s.tick(1000), Hlc::new(1001, 0));
    }

    #[test]
    fn observe_applies_the_receive_rule() {
        let mut s = HlcState::default();
        s.tick(1000);
        s.observe(Hlc::new(5000, 3));
        assert_eq!(s.tick(1000), Hlc::new(5000, 4));
        s.observe(Hlc::new(10, 0));
        assert_eq!(s.tick(1000), Hlc::new(5000, 5));
    }

    #[test]
    fn drift_guard_rejects_clocks_too_far_ahead() {
        let hour = Duration::from_secs(3600);
        assert!(check_drift(Hlc::new(1000 + 3_600_000, 0), 1000, hour).is_ok());
        let err = check_drift(Hlc::new(1001 + 3_600_000, 0), 1000, hour).unwrap_err();
        assert!(matches!(err, Error::ClockDrift { .. }), "{err}");
        // Clocks in the past are always fine.
        assert!(check_drift(Hlc::new(1, 0), 1000, hour).is_ok());
    }
}
