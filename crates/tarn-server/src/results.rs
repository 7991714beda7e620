//! Query results as streamed HTTP bodies: CSV, NDJSON and Arrow IPC stream. Each batch is
//! encoded as it comes out of the engine and sent at once, so a large result is never held
//! whole in memory; a client that goes away drops the stream, which stops the query.

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use deltalake::arrow::array::RecordBatch;
use deltalake::arrow::datatypes::SchemaRef;
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::ipc::writer::StreamWriter;
use tarn_query::QueryStream;

/// A result format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Ndjson,
    Arrow,
}

impl Format {
    pub fn from_name(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "json" => Some(Format::Json),
            "csv" => Some(Format::Csv),
            "ndjson" | "jsonl" => Some(Format::Ndjson),
            "arrow" | "ipc" => Some(Format::Arrow),
            _ => None,
        }
    }

    /// The first media type of an Accept header that names a format.
    pub fn from_accept(accept: &str) -> Option<Self> {
        accept.split(',').find_map(|part| {
            let media = part.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            match media.as_str() {
                "application/json" => Some(Format::Json),
                "text/csv" => Some(Format::Csv),
                "application/x-ndjson" | "application/jsonl" | "application/ndjson" => Some(Format::Ndjson),
                "application/vnd.apache.arrow.stream" => Some(Format::Arrow),
                _ => None,
            }
        })
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Ndjson => "application/x-ndjson",
            Format::Arrow => "application/vnd.apache.arrow.stream",
        }
    }
}

enum Encoder {
    Csv { header_written: bool },
    Ndjson,
    Arrow(Box<StreamWriter<Vec<u8>>>),
}

impl Encoder {
    /// The encoder and the bytes that open the stream (CSV header, Arrow schema).
    fn start(format: Format, schema: &SchemaRef) -> Result<(Self, Vec<u8>), ArrowError> {
        match format {
            Format::Csv | Format::Json => {
                let mut e = Encoder::Csv { header_written: false };
                let head = e.encode(&RecordBatch::new_empty(schema.clone()))?;
                Ok((e, head))
            }
            Format::Ndjson => Ok((Encoder::Ndjson, Vec::new())),
            Format::Arrow => {
                let mut w = StreamWriter::try_new(Vec::new(), schema)?;
                let head = std::mem::take(w.get_mut());
                Ok((Encoder::Arrow(Box::new(w)), head))
            }
        }
    }

    fn encode(&mut self, batch: &RecordBatch) -> Result<Vec<u8>, ArrowError> {
        match self {
            Encoder::Csv { header_written } => {
                let mut w = deltalake::arrow::csv::WriterBuilder::new()
                    .with_header(!*header_written)
                    .build(Vec::new());
                w.write(batch)?;
                *header_written = true;
                Ok(w.into_inner())
            }
            Encoder::Ndjson => {
                let mut w = deltalake::arrow::json::LineDelimitedWriter::new(Vec::new());
                w.write(batch)?;
                w.finish()?;
                Ok(w.into_inner())
            }
            Encoder::Arrow(w) => {
                w.write(batch)?;
                Ok(std::mem::take(w.get_mut()))
            }
        }
    }

    fn finish(&mut self) -> Result<Vec<u8>, ArrowError> {
        match self {
            Encoder::Arrow(w) => {
                w.finish()?;
                Ok(std::mem::take(w.get_mut()))
            }
            _ => Ok(Vec::new()),
        }
    }
}

fn io(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// A body that streams the query's batches in `format`, up to `row_limit` rows, failing (the
/// connection is cut) if the query errs or passes `timeout`.
///
/// The query runs in its own task that hands encoded chunks to the body, two at a time. The
/// deadline holds whether or not the client reads: a client that stops reading does not keep
/// the query, its turn among the running queries, or its memory past the timeout.
pub fn stream_body(
    q: QueryStream,
    format: Format,
    row_limit: Option<usize>,
    timeout: Duration,
) -> Result<Body, ArrowError> {
    let (mut enc, head) = Encoder::start(format, &q.schema)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    let deadline = tokio::time::Instant::now() + timeout;
    let failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failed_w = failed.clone();
    tokio::spawn(async move {
        let mut q = q;
        let mut rows_left = row_limit;
        let stop = |why: &str| {
            failed_w.store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::warn!(why, "query result stream cut");
        };
        let mut item = Ok(Bytes::from(head));
        loop {
            let last = item.is_err();
            match tokio::time::timeout_at(deadline, tx.send(item)).await {
                Ok(Ok(())) => {}
                // The client went away.
                Ok(Err(_)) => return,
                Err(_) => return stop("the client did not read the answer before the query's timeout"),
            }
            if last {
                return;
            }
            let next = if rows_left == Some(0) {
                None
            } else {
                match tokio::time::timeout_at(deadline, q.next()).await {
                    Ok(n) => n,
                    Err(_) => return stop(&format!("query stopped after its timeout of {timeout:?}")),
                }
            };
            item = match next {
                Some(Ok(mut batch)) => {
                    if let Some(left) = rows_left.as_mut() {
                        if batch.num_rows() > *left {
                            batch = batch.slice(0, *left);
                        }
                        *left -= batch.num_rows();
                    }
                    enc.encode(&batch).map(Bytes::from).map_err(io)
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "query failed while its result streamed; the answer is cut");
                    Err(io(e))
                }
                None => {
                    let tail = enc.finish().map(Bytes::from).map_err(io);
                    let _ = tokio::time::timeout_at(deadline, tx.send(tail)).await;
                    return;
                }
            };
        }
    });
    let stream = futures::stream::unfold((rx, failed, false), |(mut rx, failed, ended)| async move {
        if ended {
            return None;
        }
        match rx.recv().await {
            Some(item) => Some((item, (rx, failed, false))),
            // A cut that could not be sent as an error item still ends the body in error.
            None if failed.load(std::sync::atomic::Ordering::SeqCst) => {
                Some((Err(io("query result stream cut")), (rx, failed, true)))
            }
            None => None,
        }
    });
    Ok(Body::from_stream(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_from_names_and_accept_headers() {
        assert_eq!(Format::from_name("CSV"), Some(Format::Csv));
        assert_eq!(Format::from_name("parquet"), None);
        assert_eq!(Format::from_accept("text/html, text/csv;q=0.9"), Some(Format::Csv));
        assert_eq!(
            Format::from_accept("application/vnd.apache.arrow.stream"),
            Some(Format::Arrow)
        );
        assert_eq!(Format::from_accept("*/*"), None);
    }
}
