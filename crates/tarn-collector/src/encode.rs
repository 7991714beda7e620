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

pub(crate) fn encode_payload(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut out = vec![PAYLOAD_VERSION];
    let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut out, &batch.schema())
        .map_err(|e| Error::Internal(format!("encoding a batch: {e}")))?;
    w.write(batch)
        .map_err(|e| Error::Internal(format!("encoding a batch: {e}")))?;
    w.finish()
        .map_err(|e| Error::Internal(format!("encoding a batch: {e}")))?;
    drop(w);
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
