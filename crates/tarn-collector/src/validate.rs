//! Contract checks: each event is parsed, checked field by field against the dataset's
//! contract, and, when it passes, appended to the Arrow column builders of the batch.

use std::sync::Arc;

use arrow_array::builder::{BooleanBuilder, Float64Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use tarn_core::contract::{DAY, DayOf, RECEIVED_AT, day_of_micros};
use tarn_core::{DatasetSpec, FieldType, Limits, UnknownFields};

use crate::decode::RawEvent;
use crate::encode::arrow_schema;
use crate::parse::{Cell, Shape, Slots, parse_event};
use crate::{Error, Result};

/// Why one event was refused.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Rejection {
    /// Position of the event in the request, from 0.
    pub index: usize,
    /// The field at fault, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub reason: String,
}

enum Col {
    Str(StringBuilder),
    I64(Int64Builder),
    F64(Float64Builder),
    Bool(BooleanBuilder),
    Ts(TimestampMicrosecondBuilder),
}

impl Col {
    fn new(ty: FieldType, cap: usize) -> Self {
        match ty {
            FieldType::String | FieldType::Json => Col::Str(StringBuilder::with_capacity(cap, cap * 16)),
            FieldType::Int64 => Col::I64(Int64Builder::with_capacity(cap)),
            FieldType::Float64 => Col::F64(Float64Builder::with_capacity(cap)),
            FieldType::Bool => Col::Bool(BooleanBuilder::with_capacity(cap)),
            FieldType::Timestamp => Col::Ts(TimestampMicrosecondBuilder::with_capacity(cap).with_timezone("UTC")),
        }
    }

    fn push(&mut self, c: Cell) {
        match (self, c) {
            (Col::Str(b), Cell::Str(s)) => b.append_value(s),
            (Col::Str(b), _) => b.append_null(),
            (Col::I64(b), Cell::I64(v)) => b.append_value(v),
            (Col::I64(b), _) => b.append_null(),
            (Col::F64(b), Cell::F64(v)) => b.append_value(v),
            (Col::F64(b), _) => b.append_null(),
            (Col::Bool(b), Cell::Bool(v)) => b.append_value(v),
            (Col::Bool(b), _) => b.append_null(),
            (Col::Ts(b), Cell::Ts(v)) => b.append_value(v),
            (Col::Ts(b), _) => b.append_null(),
        }
    }

    fn finish(self) -> ArrayRef {
        match self {
            Col::Str(mut b) => Arc::new(b.finish()),
            Col::I64(mut b) => Arc::new(b.finish()),
            Col::F64(mut b) => Arc::new(b.finish()),
            Col::Bool(mut b) => Arc::new(b.finish()),
            Col::Ts(mut b) => Arc::new(b.finish()),
        }
    }
}

fn new_event_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Checks every event; returns the batch of accepted ones (if any) and every rejection.
pub(crate) fn check_and_build(
    spec: &DatasetSpec,
    raw: &[RawEvent<'_>],
    received_at: i64,
    limits: &Limits,
) -> Result<(Option<RecordBatch>, Vec<Rejection>)> {
    let n = raw.len();
    let mut cols: Vec<Col> = spec.fields.iter().map(|f| Col::new(f.ty, n)).collect();
    let mut received = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut days = StringBuilder::with_capacity(n, n * 10);
    let mut day_of = DayOf::default();
    let mut errors = Vec::new();
    let mut accepted = 0usize;
    let time_idx = spec
        .event_time
        .as_ref()
        .and_then(|t| spec.fields.iter().position(|f| &f.name == t));
    let tenant_idx = spec.tenant().and_then(|t| spec.fields.iter().position(|f| f.name == t));
    let id_idx = spec.fields.iter().position(|f| f.name == spec.event_id);
    let mut cells: Vec<Cell> = Vec::with_capacity(spec.fields.len());
    let shape = Shape::new(
        spec.fields.iter().map(|f| (f.name.as_str(), f.ty)),
        spec.unknown_fields == UnknownFields::Reject,
    );
    let mut slots = Slots::new(spec.fields.len());
    for (index, ev) in raw.iter().enumerate() {
        cells.clear();
        let reject = |field: Option<&str>, reason: String| Rejection {
            index,
            field: field.map(str::to_string),
            reason,
        };
        let outcome: Result<(), Rejection> = (|| {
            if ev.text.len() > limits.event_bytes_max {
                return Err(reject(
                    None,
                    format!(
                        "event of {} bytes is larger than the limit of {} bytes",
                        ev.text.len(),
                        limits.event_bytes_max
                    ),
                ));
            }
            parse_event(ev.text, &shape, &mut slots).map_err(|e| {
                if e.contains("expected a JSON object") {
                    reject(None, format!("event must be a JSON object: {e}"))
                } else {
                    reject(None, format!("invalid JSON: {e}"))
                }
            })?;
            for (i, f) in spec.fields.iter().enumerate() {
                let cell = match slots.cells[i].take() {
                    None => Cell::Null,
                    Some(Ok(c)) => c,
                    Some(Err(r)) => return Err(reject(Some(&f.name), r)),
                };
                let cell = match cell {
                    Cell::Null if Some(i) == id_idx => Cell::Str(new_event_id().into()),
                    Cell::Null if f.required => {
                        return Err(reject(Some(&f.name), "required field is missing or null".into()));
                    }
                    Cell::Str(s) if Some(i) == tenant_idx => {
                        tarn_core::name::check_tenant_value(&s).map_err(|r| reject(Some(&f.name), r.to_string()))?;
                        Cell::Str(s)
                    }
                    Cell::Str(s) if Some(i) == id_idx && (s.is_empty() || s.len() > 256) => {
                        return Err(reject(Some(&f.name), "event id must be 1 to 256 characters".into()));
                    }
                    c => c,
                };
                cells.push(cell);
            }
            if let Some(k) = &slots.unknown {
                return Err(reject(Some(k), "field is not in the dataset's contract".into()));
            }
            Ok(())
        })();
        if let Err(r) = outcome {
            errors.push(r);
            continue;
        }
        let time = match time_idx.map(|i| &cells[i]) {
            Some(Cell::Ts(t)) => *t,
            _ => received_at,
        };
        days.append_value(day_of.of(time));
        received.append_value(received_at);
        for (col, cell) in cols.iter_mut().zip(cells.drain(..)) {
            col.push(cell);
        }
        accepted += 1;
    }
    if accepted == 0 {
        return Ok((None, errors));
    }
    let mut arrays: Vec<ArrayRef> = cols.into_iter().map(Col::finish).collect();
    arrays.push(Arc::new(received.finish()));
    arrays.push(Arc::new(days.finish()));
    let batch = RecordBatch::try_new(arrow_schema(spec), arrays)
        .map_err(|e| Error::Internal(format!("building the batch for {}: {e}", spec.name)))?;
    debug_assert_eq!(batch.schema().field(batch.num_columns() - 2).name(), RECEIVED_AT);
    debug_assert_eq!(batch.schema().field(batch.num_columns() - 1).name(), DAY);
    Ok((Some(batch), errors))
}

/// The dead letters of a request: one row per rejected event of the `<dataset>__rejected`
/// contract, with its raw text.
pub(crate) fn dead_letters(
    spec: &DatasetSpec,
    raw: &[RawEvent<'_>],
    rejections: &[Rejection],
    received_at: i64,
) -> Result<RecordBatch> {
    use arrow_array::builder::BooleanBuilder;
    let n = rejections.len();
    let mut ids = StringBuilder::with_capacity(n, n * 32);
    let mut index = Int64Builder::with_capacity(n);
    let mut field = StringBuilder::with_capacity(n, n * 8);
    let mut reason = StringBuilder::with_capacity(n, n * 32);
    let mut payload = StringBuilder::with_capacity(n, n * 64);
    let mut cut = BooleanBuilder::with_capacity(n);
    for r in rejections {
        let text = raw.get(r.index).map(|e| e.text).unwrap_or("");
        let mut end = text.len().min(tarn_core::contract::DEAD_LETTER_PAYLOAD_MAX);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        ids.append_value(new_event_id());
        index.append_value(r.index as i64);
        field.append_option(r.field.as_deref());
        reason.append_value(&r.reason);
        payload.append_value(&text[..end]);
        cut.append_value(end < text.len());
    }
    let mut received = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut days = StringBuilder::with_capacity(n, n * 10);
    let day = day_of_micros(received_at);
    for _ in 0..n {
        received.append_value(received_at);
        days.append_value(&day);
    }
    let arrays: Vec<ArrayRef> = vec![
        Arc::new(ids.finish()),
        Arc::new(index.finish()),
        Arc::new(field.finish()),
        Arc::new(reason.finish()),
        Arc::new(payload.finish()),
        Arc::new(cut.finish()),
        Arc::new(received.finish()),
        Arc::new(days.finish()),
    ];
    RecordBatch::try_new(arrow_schema(spec), arrays)
        .map_err(|e| Error::Internal(format!("building the dead letters for {}: {e}", spec.name)))
}
