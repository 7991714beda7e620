//! Every size, count and queue bound of the data path, in one place, with its default.

use serde::{Deserialize, Serialize};

/// Explicit limits. Defaults are documented in the README (Limits).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body accepted by the collector, as sent (possibly compressed).
    pub body_bytes_max: usize,
    /// Largest body after gzip/zstd decompression.
    pub decompressed_bytes_max: usize,
    /// Most events in one request.
    pub batch_events_max: usize,
    /// Largest single event, as JSON text.
    pub event_bytes_max: usize,
    /// Bytes of requests being decoded or waiting for their log append at once; past it the
    /// collector answers 503 with Retry-After.
    pub ingest_inflight_bytes_max: usize,
    /// Delivery closes a batch once it holds this many bytes of encoded events.
    pub delivery_batch_bytes: usize,
    /// Delivery closes a batch once its oldest event waited this long.
    pub delivery_batch_age_ms: u64,
    /// Curate commits the rows it gathered once they take this much memory: when it is behind,
    /// a round over many raw objects holds at most this much, and its commits (one file per
    /// partition each) are as large as this allows.
    pub curate_commit_bytes: usize,
    /// Log segments roll at this size.
    pub segment_bytes_max: u64,
    /// Most rejected events described individually in one response.
    pub rejections_reported_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            body_bytes_max: 16 << 20,
            decompressed_bytes_max: 64 << 20,
            batch_events_max: 100_000,
            event_bytes_max: 1 << 20,
            ingest_inflight_bytes_max: 512 << 20,
            delivery_batch_bytes: 64 << 20,
            delivery_batch_age_ms: 500,
            curate_commit_bytes: 256 << 20,
            segment_bytes_max: 128 << 20,
            rejections_reported_max: 1_000,
        }
    }
}
