//! Ingest counters and a latency histogram, rendered by the server in Prometheus text format.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (milliseconds) of the ingest latency histogram buckets.
pub const LATENCY_BUCKETS_MS: [f64; 16] = [
    1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

/// A latency histogram over [`LATENCY_BUCKETS_MS`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// Cumulative counts per bucket, plus +Inf at the end.
    pub buckets: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    pub sum_us: AtomicU64,
}

impl Histogram {
    pub fn record(&self, took: Duration) {
        let ms = took.as_secs_f64() * 1000.0;
        for (i, b) in LATENCY_BUCKETS_MS.iter().enumerate() {
            if ms <= *b {
                self.buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.buckets[LATENCY_BUCKETS_MS.len()].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(took.as_micros() as u64, Relaxed);
    }

    /// The histogram in Prometheus text format, in seconds, as `name`.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        use std::fmt::Write as _;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in LATENCY_BUCKETS_MS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {}",
                b / 1000.0,
                self.buckets[i].load(Relaxed)
            );
        }
        let total = self.buckets[LATENCY_BUCKETS_MS.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {total}");
    }
}

#[derive(Debug, Default)]
pub struct IngestMetrics {
    pub requests_ok: AtomicU64,
    pub requests_failed: AtomicU64,
    pub requests_overloaded: AtomicU64,
    pub events_accepted: AtomicU64,
    pub events_rejected: AtomicU64,
    pub body_bytes: AtomicU64,
    /// Whole requests: decoding, checking, encoding and the durable append.
    pub latency: Histogram,
    /// Decoding, checking and encoding a request's events on a blocking thread, from the
    /// hand-off (so a wait for a free thread counts) to the encoded records.
    pub prepare: Histogram,
    /// The CPU time the blocking thread spent on that work: what `prepare` adds to it is time
    /// spent waiting (for a free thread, for a CPU, for memory the kernel gives back).
    pub prepare_cpu: Histogram,
    /// The durable appends of a request's records alone (the wait for a turn in a group
    /// commit, the write and the sync).
    pub append: Histogram,
}

impl IngestMetrics {
    pub(crate) fn record_ok(&self, bytes: usize, accepted: usize, rejected: usize, took: Duration) {
        self.requests_ok.fetch_add(1, Relaxed);
        self.body_bytes.fetch_add(bytes as u64, Relaxed);
        self.events_accepted.fetch_add(accepted as u64, Relaxed);
        self.events_rejected.fetch_add(rejected as u64, Relaxed);
        self.latency.record(took);
    }

    pub(crate) fn count_failed(&self) {
        self.requests_failed.fetch_add(1, Relaxed);
    }

    pub(crate) fn count_overloaded(&self) {
        self.requests_overloaded.fetch_add(1, Relaxed);
    }
}

/// The CPU time the calling thread has used so far (its `CLOCK_THREAD_CPUTIME_ID`).
pub(crate) fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec.max(0) as u64, t.tv_nsec.clamp(0, 999_999_999) as u32)
}
