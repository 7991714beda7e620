//! Raw objects: one Arrow IPC file (zstd-compressed buffers) per delivery batch, each log record
//! a record batch with a `_seq` column carrying its log sequence.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use deltalake::arrow::array::{Array, ArrayRef, RecordBatch, UInt64Array};
use deltalake::arrow::datatypes::{DataType, Field, Schema};
use deltalake::arrow::ipc::CompressionType;
use deltalake::arrow::ipc::reader::FileReader;
use deltalake::arrow::ipc::writer::{FileWriter, IpcWriteOptions};

use crate::writeback;
use crate::{Error, Result, io_err};

/// The column holding each row's log sequence in raw objects.
pub const SEQ: &str = "_seq";

/// The path of a raw object, relative to the lake root.
pub fn object_path(dataset: &str, shard: u32, first: u64, last: u64) -> String {
    format!("raw/{dataset}/shard={shard}/{first:020}-{last:020}.arrow")
}

/// Adds the `_seq` column to one log record's batch.
pub fn with_seq(batch: &RecordBatch, seq: u64) -> Result<RecordBatch> {
    let mut fields: Vec<Arc<Field>> = batch.schema().fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new(SEQ, DataType::UInt64, false)));
    let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
    cols.push(Arc::new(UInt64Array::from(vec![seq; batch.num_rows()])));
    let metadata = batch.schema().metadata().clone();
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new_with_metadata(fields, metadata)),
        cols,
    )?)
}

/// Writes batches (all with one schema) as a raw object: temporary file (its pages sent to the
/// disk as it is written, see `writeback.rs`), fsync, rename, and fsync of the directory.
/// Returns the file size.
pub fn write_object(root: &Path, rel: &str, batches: &[RecordBatch]) -> Result<u64> {
    if batches.is_empty() {
        return Err(Error::Internal("a raw object needs at least one batch".into()));
    }
    let path = root.join(rel);
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root.to_path_buf());
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let tmp: PathBuf = path.with_extension("arrow.tmp");
    let file = writeback::finish(encode_object(writeback::create(&tmp)?, batches)?, &tmp)?;
    file.sync_all().map_err(io_err(&tmp))?;
    let size = file.metadata().map_err(io_err(&tmp))?.len();
    drop(file);
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    let d = std::fs::File::open(&dir).map_err(io_err(&dir))?;
    d.sync_all().map_err(io_err(&dir))?;
    Ok(size)
}

/// Encodes batches (all with one schema, at least one) as a raw object into `w`.
pub fn encode_object<W: Write>(w: W, batches: &[RecordBatch]) -> Result<W> {
    let Some(first) = batches.first() else {
        return Err(Error::Internal("a raw object needs at least one batch".into()));
    };
    let opts = IpcWriteOptions::default().try_with_compression(Some(CompressionType::ZSTD))?;
    let mut w = FileWriter::try_new_with_options(w, &first.schema(), opts)?;
    for b in batches {
        w.write(b)?;
    }
    w.finish()?;
    Ok(w.into_inner()?)
}

/// Refuses an object path (from a notification) that could leave the lake.
pub fn check_rel(rel: &str) -> Result<()> {
    if rel.split('/').any(|c| c == ".." || c.is_empty()) || rel.starts_with('/') {
        return Err(Error::Corrupt {
            what: rel.to_string(),
            reason: "object path escapes the lake".into(),
        });
    }
    Ok(())
}

/// Reads a raw object back, checking it holds the `_seq` column.
pub fn read_object(root: &Path, rel: &str) -> Result<Vec<RecordBatch>> {
    check_rel(rel)?;
    let path = root.join(rel);
    let file = std::fs::File::open(&path).map_err(io_err(&path))?;
    decode_object(rel, std::io::BufReader::new(file))
}

/// Decodes a raw object read from `r`, checking it holds the `_seq` column.
pub fn decode_object<R: std::io::Read + std::io::Seek>(rel: &str, r: R) -> Result<Vec<RecordBatch>> {
    let reader = FileReader::try_new(r, None).map_err(|e| Error::Corrupt {
        what: rel.to_string(),
        reason: e.to_string(),
    })?;
    if reader.schema().index_of(SEQ).is_err() {
        return Err(Error::Corrupt {
            what: rel.to_string(),
            reason: "raw object has no _seq column".into(),
        });
    }
    reader.collect::<Result<Vec<_>, _>>().map_err(|e| Error::Corrupt {
        what: rel.to_string(),
        reason: e.to_string(),
    })
}

/// The log sequence of one raw batch (every row of a batch has the same one).
pub fn batch_seq(batch: &RecordBatch) -> Result<u64> {
    let col = batch
        .column_by_name(SEQ)
        .and_then(|c| c.as_any().downcast_ref::<UInt64Array>())
        .ok_or_else(|| Error::Corrupt {
            what: "raw batch".into(),
            reason: "no UInt64 _seq column".into(),
        })?;
    if col.is_empty() || col.null_count() > 0 {
        return Err(Error::Corrupt {
            what: "raw batch".into(),
            reason: "empty or null _seq".into(),
        });
    }
    Ok(col.value(0))
}

/// Removes the `_seq` column.
pub fn without_seq(batch: &RecordBatch) -> Result<RecordBatch> {
    let idx = batch.schema().index_of(SEQ)?;
    let mut b = batch.clone();
    b.remove_column(idx);
    Ok(b)
}
