//! The lake: the raw zone, the object-created notification stream, delivery (log to raw
//! objects) and curate (raw objects to partitioned Delta tables).
//!
//! Layout under the lake root:
//! - `raw/<dataset>/shard=<n>/<first:020>-<last:020>.arrow`: one immutable Arrow IPC file
//!   (zstd) per delivery batch, holding a `_seq` column with each row's log sequence.
//! - `tables/<dataset>/`: the dataset's Delta table, partitioned by `day` and the tenant field.
//!
//! The root is a local directory or a prefix in a bucket (`store.rs`); the layout is the same.
//!
//! # Guarantees
//! - A raw object is written to a temporary name, synced and renamed, and its directory synced
//!   (in a bucket: put in one request), before its notification is published; the delivery
//!   offset is committed only after that.
//! - Curate commits each append with a Delta application transaction
//!   (`tarn-curate/<dataset>/<shard>`, version = last log sequence) in the same commit as the
//!   rows, and skips every row whose sequence is at or below the committed version, so replays
//!   and overlapping raw objects never add a row twice.

pub mod compact;
pub mod compaction;
pub mod curate;
pub mod datafile;
pub mod delivery;
#[cfg(test)]
mod faults;
pub mod lifecycle;
pub mod raw;
pub mod storage;
pub mod store;
pub mod table;
#[cfg(test)]
mod testkit;
pub mod tiers;
pub mod vacuum;
pub(crate) mod writeback;

use std::path::PathBuf;

pub use curate::{CurateOptions, CuratePause, Curator};
pub use delivery::{Delivery, DeliveryOptions};
pub use table::Lake;

/// The system topic carrying object-created notifications.
pub const OBJECTS_TOPIC: &str = "system.objects";

/// Errors of the lake, by what the caller can do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("lake io error at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt data in {what}: {reason}")]
    Corrupt { what: String, reason: String },
    /// The object store (a bucket) failed a request.
    #[error("object store error {what}: {source}")]
    Store {
        what: String,
        #[source]
        source: deltalake::ObjectStoreError,
    },
    #[error("log error: {0}")]
    Log(#[from] tarn_log::Error),
    #[error("delta table error on {dataset}: {source}")]
    Delta {
        dataset: String,
        #[source]
        source: deltalake::DeltaTableError,
    },
    #[error("arrow error: {0}")]
    Arrow(#[from] deltalake::arrow::error::ArrowError),
    /// Another writer changed the table first; the work can be planned again.
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

/// Wraps a delta-rs error with the dataset it happened on.
pub(crate) fn delta_err(dataset: &str) -> impl Fn(deltalake::DeltaTableError) -> Error + Copy + '_ {
    move |source| Error::Delta {
        dataset: dataset.to_string(),
        source,
    }
}

/// Syncs a file or a directory (a directory's entries, after files in it were created,
/// renamed or removed).
pub(crate) fn sync_path(p: &std::path::Path) -> Result<()> {
    std::fs::File::open(p).and_then(|f| f.sync_all()).map_err(io_err(p))
}

/// Exponential backoff between failed rounds of a consumer: 100 ms doubling to 10 s.
pub(crate) struct Backoff {
    ms: u64,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self { ms: 100 }
    }

    /// Starts the next failure's wait from the shortest again: called once a round succeeds, so
    /// that occasional failures spread over a long run (a commit conflict between two writers)
    /// never grow the wait to its ceiling.
    pub(crate) fn reset(&mut self) {
        self.ms = 100;
    }

    /// Logs the failure and waits; false when `shutdown` turned true meanwhile.
    pub(crate) async fn after(
        &mut self,
        what: &str,
        e: &Error,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        tracing::error!(what, error = %e, "failed; retrying from the committed offset");
        let wait = std::time::Duration::from_millis(self.ms);
        self.ms = (self.ms * 2).min(10_000);
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = shutdown.changed() => false,
        }
    }
}

/// An object-created notification, as published on [`OBJECTS_TOPIC`] (JSON).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectCreated {
    /// Format version; only 1 exists.
    pub version: u32,
    pub dataset: String,
    pub shard: u32,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Path relative to the lake root.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
}
