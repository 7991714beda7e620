//! Delivery: a consumer of one dataset's log topic that gathers records until a batch is big
//! enough or old enough, writes them as one raw object, publishes an object-created
//! notification, and only then commits its offset.
//!
//! A crash anywhere in that sequence replays records from the last committed offset; the
//! replayed batch may be cut differently, so curate deduplicates by log sequence, not by object.

use std::sync::Arc;
use std::time::Duration;

use deltalake::arrow::array::RecordBatch;
use tarn_core::Clock;
use tarn_log::{Cursor, Log, Topic};
use tokio::sync::watch;

use crate::raw::{object_path, with_seq, write_object};
use crate::{Error, Lake, OBJECTS_TOPIC, ObjectCreated, Result};

/// The consumer group of delivery on each dataset topic.
pub const GROUP: &str = "delivery";

#[derive(Debug, Clone)]
pub struct DeliveryOptions {
    /// Close a batch once it holds this many bytes of log payload.
    pub batch_bytes: usize,
    /// Close a batch once its first record waited this long.
    pub batch_age_ms: u64,
}

/// The delivery consumer of one dataset.
pub struct Delivery {
    dataset: String,
    shard: u32,
    topic: Topic,
    objects: Topic,
    lake: Lake,
    clock: Arc<dyn Clock>,
    opts: DeliveryOptions,
}

struct Pending {
    batches: Vec<RecordBatch>,
    first: u64,
    last: u64,
    bytes: usize,
    rows: u64,
    opened_at_us: i64,
}

impl Delivery {
    pub fn new(log: &Log, lake: Lake, clock: Arc<dyn Clock>, dataset: &str, opts: DeliveryOptions) -> Result<Self> {
        let topic = log.topic(&tarn_collector::topic_name(dataset))?;
        let objects = log.topic(OBJECTS_TOPIC)?;
        topic.register_group(GROUP)?;
        Ok(Self {
            dataset: dataset.to_string(),
            shard: 0,
            topic,
            objects,
            lake,
            clock,
            opts,
        })
    }

    /// Runs until `shutdown` turns true; on an error it logs, waits and resumes from the last
    /// committed offset, so no record is skipped.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = crate::Backoff::new();
        while let Err(e) = self.run_once(&mut shutdown).await {
            if !backoff.after(&self.dataset, &e, &mut shutdown).await {
                return;
            }
        }
    }

    async fn run_once(&self, shutdown: &mut watch::Receiver<bool>) -> Result<()> {
        let start = self.topic.committed(GROUP).unwrap_or(0);
        let mut cursor = Some(self.topic.cursor(start));
        let mut pending: Option<Pending> = None;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let Some(mut c) = cursor.take() else {
                return Err(Error::Internal("cursor lost".into()));
            };
            let read_max = self.opts.batch_bytes.clamp(1 << 20, 16 << 20);
            let (c, recs) = tokio::task::spawn_blocking(move || {
                let r = c.read(read_max);
                (c, r)
            })
            .await
            .map_err(|e| Error::Internal(format!("reader task: {e}")))?;
            let recs = recs?;
            let c: Cursor = c;
            for r in recs {
                let batches = tarn_collector::decode_payload(&r.payload).map_err(|reason| Error::Corrupt {
                    what: format!("log record {} of {}", r.seq, self.dataset),
                    reason,
                })?;
                let p = pending.get_or_insert_with(|| Pending {
                    batches: Vec::new(),
                    first: r.seq,
                    last: r.seq,
                    bytes: 0,
                    rows: 0,
                    opened_at_us: self.clock.now_micros(),
                });
                for b in &batches {
                    p.rows += b.num_rows() as u64;
                    p.batches.push(with_seq(b, r.seq)?);
                }
                p.last = r.seq;
                p.bytes += r.payload.len();
                if p.bytes >= self.opts.batch_bytes {
                    break;
                }
            }
            let due = pending.as_ref().map(|p| {
                let age_ms = (self.clock.now_micros() - p.opened_at_us).max(0) as u64 / 1000;
                (p.bytes >= self.opts.batch_bytes, age_ms)
            });
            match due {
                Some((full, age_ms)) if full || age_ms >= self.opts.batch_age_ms => {
                    if let Some(p) = pending.take() {
                        self.flush(p).await?;
                    }
                }
                Some((_, age_ms)) => {
                    let left = self.opts.batch_age_ms.saturating_sub(age_ms).clamp(1, 50);
                    tokio::select! {
                        _ = c.wait() => {}
                        _ = tokio::time::sleep(Duration::from_millis(left)) => {}
                        _ = shutdown.changed() => {}
                    }
                }
                None => {
                    tokio::select! {
                        _ = c.wait() => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
            cursor = Some(c);
        }
    }

    async fn flush(&self, p: Pending) -> Result<()> {
        let rel = object_path(&self.dataset, self.shard, p.first, p.last);
        let root = self.lake.root().to_path_buf();
        let rel2 = rel.clone();
        let bytes = tokio::task::spawn_blocking(move || write_object(&root, &rel2, &p.batches))
            .await
            .map_err(|e| Error::Internal(format!("writer task: {e}")))??;
        let note = ObjectCreated {
            version: 1,
            dataset: self.dataset.clone(),
            shard: self.shard,
            first_seq: p.first,
            last_seq: p.last,
            path: rel,
            rows: p.rows,
            bytes,
        };
        let payload = serde_json::to_vec(&note).map_err(|e| Error::Internal(e.to_string()))?;
        self.publish(payload).await?;
        self.topic.commit(GROUP, p.last + 1)?;
        self.topic.apply_retention()?;
        tracing::debug!(dataset = %self.dataset, first = p.first, last = p.last, rows = p.rows, bytes, "delivered raw object");
        Ok(())
    }

    async fn publish(&self, payload: Vec<u8>) -> Result<()> {
        let mut wait_ms = 10;
        loop {
            match self.objects.append(payload.clone()).await {
                Ok(_) => return Ok(()),
                Err(tarn_log::Error::Overloaded(_)) => {
                    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                    wait_ms = (wait_ms * 2).min(1000);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
