//! Arrow result batches to JSON rows: numbers and booleans stay JSON numbers and booleans,
//! everything else is its display text (timestamps as RFC 3339).

use deltalake::arrow::array::{Array, RecordBatch};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::DataType;
use deltalake::arrow::util::display::{ArrayFormatter, FormatOptions};
use serde_json::Value;

use crate::{Error, Result};

pub(crate) fn append_rows(batch: &RecordBatch, rows: &mut Vec<Vec<Value>>) -> Result<()> {
    let n = batch.num_rows();
    let start = rows.len();
    rows.extend((0..n).map(|_| Vec::with_capacity(batch.num_columns())));
    let opts = FormatOptions::default().with_null("null");
    for col in batch.columns() {
        let ty = col.data_type();
        let as_int = matches!(
            ty,
            DataType::Int8
                | DataType::Int16
                | DataType::Int32
                | DataType::Int64
                | DataType::UInt8
                | DataType::UInt16
                | DataType::UInt32
        );
        let as_float = matches!(
            ty,
            DataType::Float16 | DataType::Float32 | DataType::Float64 | DataType::UInt64 | DataType::Decimal128(..)
        );
        if as_int {
            let c = cast(col, &DataType::Int64).map_err(|e| Error::Internal(e.to_string()))?;
            let c = c
                .as_any()
                .downcast_ref::<deltalake::arrow::array::Int64Array>()
                .ok_or_else(|| Error::Internal("cast to int64".into()))?;
            for i in 0..n {
                rows[start + i].push(if c.is_null(i) {
                    Value::Null
                } else {
                    Value::from(c.value(i))
                });
            }
        } else if as_float {
            let c = cast(col, &DataType::Float64).map_err(|e| Error::Internal(e.to_string()))?;
            let c = c
                .as_any()
                .downcast_ref::<deltalake::arrow::array::Float64Array>()
                .ok_or_else(|| Error::Internal("cast to float64".into()))?;
            for i in 0..n {
                rows[start + i].push(if c.is_null(i) {
                    Value::Null
                } else {
                    Value::from(c.value(i))
                });
            }
        } else if matches!(ty, DataType::Boolean) {
            let c = col
                .as_any()
                .downcast_ref::<deltalake::arrow::array::BooleanArray>()
                .ok_or_else(|| Error::Internal("boolean".into()))?;
            for i in 0..n {
                rows[start + i].push(if c.is_null(i) {
                    Value::Null
                } else {
                    Value::from(c.value(i))
                });
            }
        } else {
            let f = ArrayFormatter::try_new(col.as_ref(), &opts).map_err(|e| Error::Internal(e.to_string()))?;
            for i in 0..n {
                rows[start + i].push(if col.is_null(i) {
                    Value::Null
                } else {
                    Value::from(f.value(i).to_string())
                });
            }
        }
    }
    Ok(())
}
