//! Query history: every query, however it ended, as a row of the system table
//! `system.queries` (who, SQL, start, duration, rows, bytes scanned, status, error). The newest
//! [`HISTORY_ROWS`] are kept in memory and served; each is also appended to an NDJSON file,
//! rotated at [`FILE_BYTES_MAX`] (one older file kept), from which the memory is refilled at
//! start.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use deltalake::arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};

/// Queries kept in memory (and served by `system.queries`).
pub const HISTORY_ROWS: usize = 10_000;
/// Characters of a query's SQL kept in the history.
pub const SQL_CHARS_MAX: usize = 4_096;
/// Size at which the history file is rotated.
pub const FILE_BYTES_MAX: u64 = 64 << 20;

/// One query of the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryRecord {
    /// Who ran it: the caller's identity once tarn has credentials, `anonymous` until then.
    pub who: String,
    pub sql: String,
    /// Start, µs since the epoch.
    pub started_us: i64,
    pub duration_ms: f64,
    pub rows: u64,
    pub bytes_scanned: u64,
    /// `ok`, `error`, `refused` or `stopped` (cut at its row limit, cancelled or timed out).
    pub status: String,
    pub error: Option<String>,
}

pub struct History {
    path: Option<PathBuf>,
    rows: Mutex<VecDeque<QueryRecord>>,
}

impl History {
    /// History kept in `path`, refilled from it.
    pub fn open(path: PathBuf) -> Self {
        let mut rows = VecDeque::new();
        for p in [path.with_extension("ndjson.1"), path.clone()] {
            if let Ok(text) = std::fs::read_to_string(&p) {
                for line in text.lines() {
                    if let Ok(r) = serde_json::from_str::<QueryRecord>(line) {
                        if rows.len() == HISTORY_ROWS {
                            rows.pop_front();
                        }
                        rows.push_back(r);
                    }
                }
            }
        }
        Self {
            path: Some(path),
            rows: Mutex::new(rows),
        }
    }

    pub fn in_memory() -> Self {
        Self {
            path: None,
            rows: Mutex::new(VecDeque::new()),
        }
    }

    /// Records a query; its SQL is kept up to [`SQL_CHARS_MAX`] characters. The file is
    /// appended under the same lock as the memory, so rotation has one writer.
    pub fn record(&self, mut r: QueryRecord) {
        if let Some((cut, _)) = r.sql.char_indices().nth(SQL_CHARS_MAX) {
            r.sql.truncate(cut);
            r.sql.push_str(" …");
        }
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = &self.path
            && let Err(e) = append_line(path, &r)
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot append to the query history");
        }
        if rows.len() == HISTORY_ROWS {
            rows.pop_front();
        }
        rows.push_back(r);
    }

    pub fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("who", DataType::Utf8, false),
            Field::new("sql", DataType::Utf8, false),
            Field::new(
                "started_at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("duration_ms", DataType::Float64, false),
            Field::new("rows", DataType::Int64, false),
            Field::new("bytes_scanned", DataType::Int64, false),
            Field::new("status", DataType::Utf8, false),
            Field::new("error", DataType::Utf8, true),
        ]))
    }

    /// The history as one batch of the `system.queries` schema.
    pub fn batch(&self) -> Result<RecordBatch, deltalake::arrow::error::ArrowError> {
        let rows = self.rows.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.who.as_str()))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.sql.as_str()))),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.started_us)).with_timezone("UTC"),
            ),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.duration_ms))),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| i64::try_from(r.rows).unwrap_or(i64::MAX)),
            )),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| i64::try_from(r.bytes_scanned).unwrap_or(i64::MAX)),
            )),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.status.as_str()))),
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.error.clone()).collect::<Vec<_>>(),
            )),
        ];
        RecordBatch::try_new(Self::schema(), cols)
    }
}

fn append_line(path: &std::path::Path, r: &QueryRecord) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::fs::metadata(path).is_ok_and(|m| m.len() >= FILE_BYTES_MAX) {
        std::fs::rename(path, path.with_extension("ndjson.1"))?;
    }
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(&line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: i64, status: &str) -> QueryRecord {
        QueryRecord {
            who: "anonymous".into(),
            sql: format!("SELECT {i}"),
            started_us: i,
            duration_ms: 1.5,
            rows: 1,
            bytes_scanned: 10,
            status: status.into(),
            error: (status == "error").then(|| "boom".into()),
        }
    }

    #[test]
    fn keeps_the_newest_and_refills_from_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("queries.ndjson");
        let h = History::open(path.clone());
        for i in 0..(HISTORY_ROWS as i64 + 5) {
            h.record(rec(i, if i % 2 == 0 { "ok" } else { "error" }));
        }
        let b = h.batch().expect("batch");
        assert_eq!(b.num_rows(), HISTORY_ROWS);
        let again = History::open(path);
        let b2 = again.batch().expect("batch");
        assert_eq!(b2.num_rows(), HISTORY_ROWS);
        assert_eq!(
            b2.column(1)
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("sql")
                .value(0),
            "SELECT 5"
        );
        assert_eq!(b2.column(7).null_count(), HISTORY_ROWS / 2);
    }
}
