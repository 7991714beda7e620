//! The injected clock. Everything that depends on time (batch ages, retention, `_received_at`)
//! asks a `Clock`, so tests can move time by hand instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// A source of wall-clock time in microseconds since the Unix epoch (UTC).
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_micros(&self) -> i64;

    fn now_millis(&self) -> i64 {
        self.now_micros().div_euclid(1000)
    }
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> i64 {
        let now = std::time::SystemTime::now();
        match now.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
        }
    }
}

/// A clock that only moves when told to; for tests.
#[derive(Debug, Default, Clone)]
pub struct ManualClock {
    micros: Arc<AtomicI64>,
}

impl ManualClock {
    pub fn new(micros: i64) -> Self {
        Self {
            micros: Arc::new(AtomicI64::new(micros)),
        }
    }

    pub fn advance_micros(&self, by: i64) {
        self.micros.fetch_add(by, Ordering::SeqCst);
    }

    pub fn set_micros(&self, to: i64) {
        self.micros.store(to, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_micros(&self) -> i64 {
        self.micros.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(1_000);
        assert_eq!(c.now_micros(), 1_000);
        c.advance_micros(2_500);
        assert_eq!(c.now_micros(), 3_500);
        assert_eq!(c.now_millis(), 3);
        c.set_micros(-1);
        assert_eq!(c.now_millis(), -1);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now_micros() > 1_577_836_800_000_000);
    }
}
