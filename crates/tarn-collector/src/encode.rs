//! The log payload: a version byte, then one Arrow IPC stream holding one record batch. The
//! collector parses JSON once; every later stage reads this typed, columnar form.

use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use tarn_core::contract::{DAY, RECEIVED_AT};
use tarn_core::{DatasetSpec, FieldType};

use crate::{Error, Result};

/// The payload format version written first in every log record.
pub const PAYLOAD_VERSION: u8 = 1;

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The schema metadata key naming the contract's major version a batch was written under
/// (absent: 1). Curate sends a batch of an earlier major version to that version's table.
pub const MAJOR_KEY: &str = "tarn.major";

/// The major version a batch was written under.
pub fn major_of(schema: &Schema) -> Result<u32, String> {
    match schema.metadata().get(MAJOR_KEY) {
        None => Ok(1),
        Some(v) => v.parse().map_err(|_| format!("{MAJOR_KEY} {v:?} is not a number")),
    }
}

/// The Arrow schema of a dataset's events: the declared fields in order, then `_received_at`
/// and the `day` partition column; from major version 2 on, the version in its metadata.
pub fn arrow_schema(spec: &DatasetSpec) -> SchemaRef {
    let mut fields: Vec<Field> = spec
        .fields
        .iter()
        .map(|f| {
            let ty = match f.ty {
                FieldType::String | FieldType::Json => DataType::Utf8,
                FieldType::Int64 => DataType::Int64,
                FieldType::Float64 => DataType::Float64,
                FieldType::Bool => DataType::Boolean,
                FieldType::Timestamp => ts(),
            };
            let nullable = !(f.required || f.name == spec.event_id);
            Field::new(&f.name, ty, nullable)
        })
        .collect();
    fields.push(Field::new(RECEIVED_AT, ts(), false));
    fields.push(Field::new(DAY, DataType::Utf8, false));
    if spec.major > 1 {
        let metadata = [(MAJOR_KEY.to_string(), spec.major.to_string())].into();
        return Arc::new(Schema::new_with_metadata(fields, metadata));
    }
    Arc::new(Schema::new(fields))
}

/// At least the length of a batch's payload: the version byte, the bytes its rows use (of a
/// slice, only the slice's), and a bound on the schema, the message framing and the padding of
/// each buffer to the IPC writer's 64-byte alignment.
pub(crate) fn payload_capacity(batch: &RecordBatch) -> usize {
    let framing = 1024 + 512 * batch.num_columns();
    let body: usize = batch
        .columns()
        .iter()
        .map(|c| {
            let data = c.to_data();
            data.get_slice_memory_size()
                .unwrap_or_else(|_| data.get_buffer_memory_size())
        })
        .sum();
    1 + framing + body
}

pub(crate) fn encode_payload(batch: &RecordBatch) -> Result<Vec<u8>> {
    // Sized once up front: a payload of megabytes grown by doubling is copied about twice
    // over, on the request's own time.
    let mut out = Vec::with_capacity(payload_capacity(batch));
    out.push(PAYLOAD_VERSION);
    let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut out, &batch.schema())
        .map_err(|e| Error::Internal(format!("encoding a batch: {e}")))?;
    w.write(batch)
        .map_err(|e| Error::Internal(format!("encoding a batch: {e}")))?;
    w.finish()
        .map_err(|e| Error::Internal(format!("encoding a batch: {e}")))?;
    drop(w);
    Ok(out)
}

/// Encodes a batch as log payloads of at most `bytes_max` bytes each: one when it fits (always
/// on the embedded log), else the rows split evenly into as many as it takes (a NATS message
/// is at most the server's `max_payload`). Fails only when one event alone is too large.
pub fn encode_payloads(batch: &RecordBatch, bytes_max: usize) -> Result<Vec<Vec<u8>>> {
    let whole = encode_payload(batch)?;
    if whole.len() <= bytes_max {
        return Ok(vec![whole]);
    }
    let rows = batch.num_rows();
    if rows <= 1 {
        return Err(Error::TooLarge(format!(
            "one event encodes to {} bytes, more than the stream's record limit of {bytes_max} bytes",
            whole.len()
        )));
    }
    // Pieces of an even share of the rows, with a margin for what each piece repeats (the
    // schema); a piece that still does not fit is split again.
    let pieces = (whole.len().div_ceil(bytes_max.max(1)) * 5 / 4 + 1).clamp(2, rows);
    let per = rows.div_ceil(pieces);
    let mut out = Vec::with_capacity(pieces);
    let mut at = 0;
    while at < rows {
        let n = per.min(rows - at);
        out.extend(encode_payloads(&batch.slice(at, n), bytes_max)?);
        at += n;
    }
    Ok(out)
}

/// Decodes a log payload back into its record batches.
pub fn decode_payload(payload: &[u8]) -> Result<Vec<RecordBatch>, String> {
    let Some((&version, body)) = payload.split_first() else {
        return Err("empty payload".into());
    };
    if version != PAYLOAD_VERSION {
        return Err(format!(
            "payload version {version} is not supported (expected {PAYLOAD_VERSION})"
        ));
    }
    let reader = arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None)
        .map_err(|e| format!("bad payload: {e}"))?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad payload: {e}"))
}
