//! Ingest counters and a latency histogram, rendered by the server in Prometheus text format.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (milliseconds) of the ingest latency histogram buckets.
pub const LATENCY_BUCKETS_MS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

#[derive(Debug, Default)]
pub struct IngestMetrics {
    pub requests_ok: AtomicU64,
    pub requests_failed: AtomicU64,
    pub requests_overloaded: AtomicU64,
    pub events_accepted: AtomicU64,
    pub events_rejected: AtomicU64,
    pub body_bytes: AtomicU64,
    /// Cumulative counts per bucket, plus +Inf at the end.
    pub latency_buckets: [AtomicU64; 13],
    pub latency_sum_us: AtomicU64,
}

impl IngestMetrics {
    pub(crate) fn record_ok(&self, bytes: usize, accepted: usize, rejected: usize, took: Duration) {
        self.requests_ok.fetch_add(1, Relaxed);
        self.body_bytes.fetch_add(bytes as u64, Relaxed);
        self.events_accepted.fetch_add(accepted as u64, Relaxed);
        self.events_rejected.fetch_add(rejected as u64, Relaxed);
        let ms = took.as_secs_f64() * 1000.0;
        for (i, b) in LATENCY_BUCKETS_MS.iter().enumerate() {
            if ms <= *b {
                self.latency_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.latency_buckets[12].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(took.as_micros() as u64, Relaxed);
    }

    pub(crate) fn count_failed(&self) {
        self.requests_failed.fetch_add(1, Relaxed);
    }

    pub(crate) fn count_overloaded(&self) {
        self.requests_overloaded.fetch_add(1, Relaxed);
    }
}
