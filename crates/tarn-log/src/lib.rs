//! The stream: topics of records with durable consumer-group offsets, on one of two
//! backends behind `Log`, `Topic` and `Cursor` (`stream.rs`): the embedded log below, or NATS
//! JetStream (`nats.rs`, which states how it keeps the same guarantees).
//!
//! # Guarantees of the embedded log
//! - `Topic::append` returns only after the record is written and `fsync`ed. Appends from many
//!   callers are gathered by one writer thread into a group commit: one `fdatasync` per touched
//!   segment per round.
//! - Readers never see a record before it is durable: they read up to the durable end, which
//!   the writer advances only after the sync.
//! - Each record carries a CRC-32C over its sequence number and payload, checked on every read.
//!   On open, a torn or corrupt tail of the last segment (a crash mid-write) is truncated; a
//!   corrupt record anywhere else is reported as `Error::Corrupt`, never skipped silently.
//! - Consumer offsets are written to a temporary file, synced and renamed, then the directory
//!   is synced: after a crash an offset is either the old or the new value.
//! - A segment is deleted only when every consumer group has committed past its last record.
//!   Up to `spare_segments` such files are kept in `<root>/.spare` instead, and the next new
//!   segment of any topic reuses one: its header (with a new salt, which every record's CRC
//!   covers) is synced before the file takes the segment's name, and the old bytes past the
//!   new records fail their checks, so recovery stops at the last record written under the
//!   new header. A segment that rolls is first cut at its last record.
//!
//! # Layout
//! `<root>/<topic>/<base:020>.seg` segment files, `<root>/<topic>/offsets/<group>` offsets,
//! `<root>/.spare/<n:020>.spare` consumed segment files kept for reuse.
//! This crate knows nothing about what the payloads hold.

mod embedded;
mod lease;
mod nats;
mod segment;
mod stream;

pub use embedded::{LogOptions, Record, SpareStats, TopicStats};
pub use nats::{NatsOptions, check_namespace, delete_namespace};
pub use stream::{Cursor, Log, Topic};

use std::path::PathBuf;

/// Errors of the log, by what the caller can do about them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("log io error at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt log data in {path} at byte {offset}: {reason}")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    #[error("log is overloaded: {0} appends are queued; retry later")]
    Overloaded(usize),
    #[error("record of {size} bytes is larger than the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("invalid topic or group name {0:?}")]
    InvalidName(String),
    #[error("sequence {0} is no longer in the log (removed by retention)")]
    Truncated(u64),
    #[error("the log writer has stopped: {0}")]
    Closed(String),
    /// The stream server failed or could not be reached; the operation may be retried.
    #[error("stream error: {0}")]
    Stream(String),
    /// The topic is at its size limit; appends succeed again once consumers catch up.
    #[error("{0}")]
    Full(String),
    /// The blocking task of `Cursor::read_off_thread` ended without an answer.
    #[error("log reader task failed: {0}")]
    Reader(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

/// Syncs a directory so that a created, renamed or removed entry survives a crash.
pub(crate) fn sync_dir(dir: &std::path::Path) -> Result<()> {
    let f = std::fs::File::open(dir).map_err(io_err(dir))?;
    f.sync_all().map_err(io_err(dir))
}
