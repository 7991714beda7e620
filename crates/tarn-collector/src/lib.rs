//! The collector: decodes request bodies within capped sizes, checks every event against its
//! dataset's contract, encodes the accepted events once as an Arrow record batch, and appends it
//! to the dataset's log topic. `ingest` returns only after the append is durable.
//!
//! HTTP is not known here: the server maps `Error` and `IngestReport` to responses.

mod decode;
mod encode;
mod flat;
mod metrics;
mod parse;
mod validate;

use std::sync::Arc;

use bytes::Bytes;
use tarn_catalog::Catalog;
use tarn_core::{Clock, DatasetSpec, Limits};
use tarn_log::{Log, Topic};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use decode::Encoding;
pub use encode::{MAJOR_KEY, PAYLOAD_VERSION, arrow_schema, decode_payload, major_of};
pub use metrics::{Histogram, IngestMetrics, LATENCY_BUCKETS_MS};
pub use validate::Rejection;

/// Errors of an ingest request, by what the caller can do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("unsupported content encoding {0:?}; use gzip, zstd or none")]
    UnsupportedEncoding(String),
    #[error("dataset {0:?} does not exist and inferring new datasets is turned off")]
    UnknownDataset(String),
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The topic holding a dataset's events (its first shard).
pub fn topic_name(dataset: &str) -> String {
    format!("events.{dataset}")
}

/// The topic of one shard of a dataset's events: `events.<dataset>` for shard 0 (so a stream
/// made before shards existed is shard 0), `events.<dataset>.<shard>` for the others.
pub fn shard_topic_name(dataset: &str, shard: u32) -> String {
    if shard == 0 {
        topic_name(dataset)
    } else {
        format!("events.{dataset}.{shard}")
    }
}

/// The dataset and shard of a topic [`shard_topic_name`] made, if it is one.
pub fn parse_shard_topic(topic: &str) -> Option<(&str, u32)> {
    let rest = topic.strip_prefix("events.")?;
    match rest.rsplit_once('.') {
        Some((dataset, shard)) => Some((dataset, shard.parse().ok().filter(|s| *s > 0)?)),
        None => Some((rest, 0)),
    }
}

/// The outcome of one accepted request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IngestReport {
    pub dataset: String,
    pub accepted: usize,
    pub rejected: usize,
    /// The first rejections, up to `Limits::rejections_reported_max`.
    pub errors: Vec<Rejection>,
    /// The log sequence of the appended record, when any event was accepted.
    pub sequence: Option<u64>,
    /// The shard of the dataset's stream the events went to.
    pub shard: u32,
    /// The table the rejected events were written to, with their raw text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<String>,
}

/// Options of the collector.
#[derive(Debug, Clone)]
pub struct CollectorOptions {
    pub limits: Limits,
    /// Create a dataset with an inferred contract on its first write.
    pub infer_datasets: bool,
    /// Spread requests over the shards of each dataset's stream (as many as its size class
    /// has), so that several workers can deliver one dataset; off, every event goes to shard 0.
    pub sharded: bool,
}

/// The ingest front of the data path.
pub struct Collector {
    log: Log,
    catalog: Arc<Catalog>,
    clock: Arc<dyn Clock>,
    opts: CollectorOptions,
    inflight: Arc<Semaphore>,
    /// Counts requests, to spread them over shards in turn.
    turn: std::sync::atomic::AtomicU32,
    pub metrics: Arc<IngestMetrics>,
}

/// Admission of a request's bytes; held until the request is answered.
pub struct Admission(#[allow(dead_code)] OwnedSemaphorePermit);

const PERMIT_UNIT: usize = 1024;

impl Collector {
    pub fn new(log: Log, catalog: Arc<Catalog>, clock: Arc<dyn Clock>, opts: CollectorOptions) -> Self {
        let permits = (opts.limits.ingest_inflight_bytes_max / PERMIT_UNIT).max(1);
        Self {
            log,
            catalog,
            clock,
            inflight: Arc::new(Semaphore::new(permits)),
            turn: std::sync::atomic::AtomicU32::new(0),
            opts,
            metrics: Arc::new(IngestMetrics::default()),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.opts.limits
    }

    /// Reserves memory for a request of (up to) `bytes` bytes before its body is read. The
    /// reservation counts the decompressed size cap for compressed bodies.
    pub fn admit(&self, bytes: usize, compressed: bool) -> Result<Admission> {
        let l = &self.opts.limits;
        if bytes > l.body_bytes_max {
            return Err(Error::TooLarge(format!(
                "request body of {bytes} bytes is larger than the limit of {} bytes",
                l.body_bytes_max
            )));
        }
        // Decoding holds the body, its parsed events and the encoded batch: about 3x.
        let cost = if compressed { l.decompressed_bytes_max } else { bytes };
        let units = u32::try_from((cost.saturating_mul(3) / PERMIT_UNIT).max(1)).unwrap_or(u32::MAX);
        match self.inflight.clone().try_acquire_many_owned(units) {
            Ok(p) => Ok(Admission(p)),
            Err(_) => {
                self.metrics.count_overloaded();
                Err(Error::Overloaded(format!(
                    "{} bytes of requests are already in flight; retry shortly",
                    l.ingest_inflight_bytes_max
                )))
            }
        }
    }

    /// Decodes, checks and durably appends the events of one request. Decoding and checking
    /// run on a blocking thread so that a large body never stalls the async runtime.
    pub async fn ingest(&self, dataset: &str, body: Bytes, encoding: Encoding) -> Result<IngestReport> {
        let started = std::time::Instant::now();
        let len = body.len();
        let res = self.ingest_inner(dataset, body, encoding).await;
        match &res {
            Ok(r) => self.metrics.record_ok(len, r.accepted, r.rejected, started.elapsed()),
            Err(_) => self.metrics.count_failed(),
        }
        res
    }

    async fn ingest_inner(&self, dataset: &str, body: Bytes, encoding: Encoding) -> Result<IngestReport> {
        tarn_core::name::check_dataset(dataset).map_err(|e| Error::BadRequest(e.to_string()))?;
        let prep = Prepare {
            record_bytes_max: self.log.record_bytes_max(),
            catalog: self.catalog.clone(),
            limits: self.opts.limits.clone(),
            infer: self.opts.infer_datasets,
            dataset: dataset.to_string(),
            received_at: self.clock.now_micros(),
        };
        let preparing = std::time::Instant::now();
        let (p, cpu) = tokio::task::spawn_blocking(move || {
            let cpu = metrics::thread_cpu();
            let p = prep.run(&body, encoding);
            // The body's memory goes back on this thread's time too.
            drop(body);
            (p, metrics::thread_cpu().saturating_sub(cpu))
        })
        .await
        .map_err(|e| Error::Internal(format!("decoder task: {e}")))?;
        let p = p?;
        self.metrics.prepare.record(preparing.elapsed());
        self.metrics.prepare_cpu.record(cpu);
        // One request goes to one shard, its records in order; the next request to the next.
        let turn = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Dead letters are durable before the answer too: a rejected event is never only in a
        // response the producer may not read.
        let dead_letters = match p.dead {
            Some((name, payloads)) => {
                let shard = self.shard_of(&name, turn);
                for payload in payloads {
                    self.append(&name, shard, payload).await?;
                }
                Some(name)
            }
            None => None,
        };
        // A request larger than one stream record is several records, appended in order; the
        // answer is sent only after the last is durable.
        let mut sequence = None;
        let shard = self.shard_of(dataset, turn);
        let appending = std::time::Instant::now();
        for payload in p.payloads {
            sequence = Some(self.append(dataset, shard, payload).await?);
        }
        if sequence.is_some() {
            self.metrics.append.record(appending.elapsed());
        }
        let mut errors = p.rejections;
        let rejected = errors.len();
        errors.truncate(self.opts.limits.rejections_reported_max);
        Ok(IngestReport {
            dataset: dataset.to_string(),
            accepted: p.accepted,
            rejected,
            errors,
            sequence,
            shard,
            dead_letters,
        })
    }

    /// The shard a request's events of `dataset` go to on its `turn`.
    fn shard_of(&self, dataset: &str, turn: u32) -> u32 {
        if !self.opts.sharded {
            return 0;
        }
        let shards = self.catalog.get(dataset).map_or(1, |s| s.size.shards()).max(1);
        turn % shards
    }

    async fn append(&self, dataset: &str, shard: u32, payload: Vec<u8>) -> Result<u64> {
        self.topic(dataset, shard)?.append(payload).await.map_err(|e| match e {
            tarn_log::Error::Overloaded(_) | tarn_log::Error::Full(_) => Error::Overloaded(e.to_string()),
            tarn_log::Error::TooLarge { .. } => Error::TooLarge(e.to_string()),
            other => Error::Unavailable(other.to_string()),
        })
    }

    fn topic(&self, dataset: &str, shard: u32) -> Result<Topic> {
        self.log
            .topic(&shard_topic_name(dataset, shard))
            .map_err(|e| Error::Unavailable(e.to_string()))
    }
}

/// How long each stage of preparing one request's events took (`tarn bench --prepare`).
#[derive(Debug, Clone, Copy)]
pub struct PrepareTimes {
    /// Cutting the body into events.
    pub split: std::time::Duration,
    /// Parsing, checking and building the batch.
    pub check: std::time::Duration,
    /// Encoding the batch as log payloads.
    pub encode: std::time::Duration,
    pub accepted: usize,
    pub rejected: usize,
}

/// Prepares an uncompressed `body` for `spec` as an ingest request does (split, checks, batch,
/// payloads), timing each stage; nothing is appended anywhere.
pub fn time_prepare(spec: &DatasetSpec, body: &[u8], limits: &Limits) -> Result<PrepareTimes> {
    let started = std::time::Instant::now();
    let raw = decode::split_events(body, limits)?;
    let split = started.elapsed();
    let started = std::time::Instant::now();
    let (batch, rejections) = validate::check_and_build(spec, &raw, 0, limits)?;
    let check = started.elapsed();
    let started = std::time::Instant::now();
    if let Some(b) = &batch {
        encode::encode_payloads(b, usize::MAX)?;
    }
    Ok(PrepareTimes {
        split,
        check,
        encode: started.elapsed(),
        accepted: batch.map_or(0, |b| b.num_rows()),
        rejected: rejections.len(),
    })
}

/// The CPU-bound part of a request, run on a blocking thread.
struct Prepare {
    record_bytes_max: usize,
    catalog: Arc<Catalog>,
    limits: Limits,
    infer: bool,
    dataset: String,
    received_at: i64,
}

/// A request checked and encoded: the accepted events' payload, every rejection, and the
/// dead letters' dataset and payload.
struct Prepared {
    payloads: Vec<Vec<u8>>,
    accepted: usize,
    rejections: Vec<Rejection>,
    dead: Option<(String, Vec<Vec<u8>>)>,
}

impl Prepare {
    fn run(&self, body: &[u8], encoding: Encoding) -> Result<Prepared> {
        let dataset = self.dataset.as_str();
        let text = decode::decompress(body, encoding, &self.limits)?;
        let raw = decode::split_events(&text, &self.limits)?;
        let spec = match self.catalog.get(dataset) {
            Some(s) => s,
            None if self.infer => self.infer(dataset, &raw)?,
            None => return Err(Error::UnknownDataset(dataset.to_string())),
        };
        if spec.system {
            return Err(Error::BadRequest(format!(
                "{dataset} is kept by tarn itself (dead letters or an earlier major version); it takes no events"
            )));
        }
        if let Some(ext) = &spec.external {
            return Err(Error::BadRequest(format!(
                "{dataset} is registered data read in place at {}; it takes no events",
                ext.location
            )));
        }
        let (batch, rejections) = validate::check_and_build(&spec, &raw, self.received_at, &self.limits)?;
        let accepted = batch.as_ref().map(|b| b.num_rows()).unwrap_or(0);
        let payloads = match &batch {
            Some(b) => encode::encode_payloads(b, self.record_bytes_max)?,
            None => Vec::new(),
        };
        let dead = if rejections.is_empty() || spec.system {
            None
        } else {
            let dl = self.dead_letter_spec(dataset)?;
            let batch = validate::dead_letters(&dl, &raw, &rejections, self.received_at)?;
            Some((dl.name.clone(), encode::encode_payloads(&batch, self.record_bytes_max)?))
        };
        Ok(Prepared {
            payloads,
            accepted,
            rejections,
            dead,
        })
    }

    /// The dead-letter dataset of `dataset`, registered on its first rejection.
    fn dead_letter_spec(&self, dataset: &str) -> Result<Arc<DatasetSpec>> {
        let spec = DatasetSpec::rejected_of(dataset).map_err(|e| Error::Internal(e.to_string()))?;
        if let Some(s) = self.catalog.get(&spec.name) {
            return Ok(s);
        }
        self.catalog
            .register(spec)
            .map_err(|e| Error::Unavailable(e.to_string()))
    }

    fn infer(&self, dataset: &str, raw: &[decode::RawEvent<'_>]) -> Result<Arc<DatasetSpec>> {
        let sample: Vec<_> = raw
            .iter()
            .take(1000)
            .filter_map(|r| match serde_json::from_str::<serde_json::Value>(r.text) {
                Ok(serde_json::Value::Object(m)) => Some(m),
                _ => None,
            })
            .collect();
        if sample.is_empty() {
            return Err(Error::BadRequest(format!(
                "dataset {dataset:?} does not exist and no event in this request is a JSON object to infer its contract from"
            )));
        }
        let spec = DatasetSpec::infer(dataset, &sample).map_err(|e| Error::BadRequest(e.to_string()))?;
        tracing::info!(
            dataset,
            fields = spec.fields.len(),
            "created dataset with an inferred contract"
        );
        self.catalog.register(spec).map_err(|e| match e {
            tarn_catalog::Error::Invalid(e) => Error::BadRequest(e.to_string()),
            other => Error::Unavailable(other.to_string()),
        })
    }
}

#[cfg(test)]
mod tests;
