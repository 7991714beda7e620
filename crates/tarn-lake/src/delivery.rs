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
use tarn_log::{Log, Topic};
use tokio::sync::watch;

use crate::raw::with_seq;
use crate::{Error, Lake, OBJECTS_TOPIC, ObjectCreated, Result};

/// The consumer group of delivery on each dataset topic.
pub const GROUP: &str = "delivery";

#[derive(Debug, Clone)]
pub struct DeliveryOptions {
    /// Close a batch once it holds this many bytes of log payload. Shared, so that a change of
    /// the dataset's size class reaches a running delivery at its next batch.
    pub batch_bytes: Arc<std::sync::atomic::AtomicUsize>,
    /// Close a batch once its first record waited this long.
    pub batch_age_ms: u64,
    /// The shard of the dataset's stream this delivery reads.
    pub shard: u32,
}

impl DeliveryOptions {
    pub fn new(batch_bytes: usize, batch_age_ms: u64) -> Self {
        Self {
            batch_bytes: Arc::new(std::sync::atomic::AtomicUsize::new(batch_bytes)),
            batch_age_ms,
            shard: 0,
        }
    }

    /// The same options for another shard of the stream.
    pub fn with_shard(mut self, shard: u32) -> Self {
        self.shard = shard;
        self
    }
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
        let topic = log.topic(&tarn_collector::shard_topic_name(dataset, opts.shard))?;
        let objects = log.topic(OBJECTS_TOPIC)?;
        Ok(Self {
            dataset: dataset.to_string(),
            shard: opts.shard,
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
        while let Err(e) = self.run_once(&mut shutdown, &mut backoff).await {
            if !backoff
                .after(&format!("{}/{}", self.dataset, self.shard), &e, &mut shutdown)
                .await
            {
                return;
            }
        }
    }

    async fn run_once(&self, shutdown: &mut watch::Receiver<bool>, backoff: &mut crate::Backoff) -> Result<()> {
        let start = self.topic.register_group(GROUP).await?;
        let mut cursor = Some(self.topic.cursor(start));
        let mut pending: Option<Pending> = None;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let Some(c) = cursor.take() else {
                return Err(Error::Internal("cursor lost".into()));
            };
            let room = self
                .opts
                .batch_bytes
                .load(std::sync::atomic::Ordering::Relaxed)
                .saturating_sub(pending.as_ref().map_or(0, |p| p.bytes));
            let read_max = room.clamp(1, 16 << 20);
            let (mut c, recs) = c.fetch(read_max).await?;
            for r in recs {
                let batches = tarn_collector::decode_payload(&r.payload).map_err(|reason| Error::Corrupt {
                    what: format!("log record {} of {}", r.seq, self.dataset),
                    reason,
                })?;
                // A raw object holds one schema: a record written under another contract
                // version (a field added, a new major version) closes the batch before it.
                let other_schema = pending
                    .as_ref()
                    .and_then(|p| p.batches.first())
                    .zip(batches.first())
                    .is_some_and(|(held, new)| !same_schema(held, new));
                if other_schema && let Some(p) = pending.take() {
                    self.flush(p).await?;
                    backoff.reset();
                }
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
                // Every record read joins the batch: the cursor has moved past all of them, so
                // one left out here would be skipped. A batch overshoots its size by at most
                // one read.
            }
            let due = pending.as_ref().map(|p| {
                let age_ms = (self.clock.now_micros() - p.opened_at_us).max(0) as u64 / 1000;
                (
                    p.bytes >= self.opts.batch_bytes.load(std::sync::atomic::Ordering::Relaxed),
                    age_ms,
                )
            });
            match due {
                Some((full, age_ms)) if full || age_ms >= self.opts.batch_age_ms => {
                    if let Some(p) = pending.take() {
                        self.flush(p).await?;
                        backoff.reset();
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
        let rel = self.lake.raw_path(&self.dataset, self.shard, p.first, p.last);
        let bytes = self.lake.write_raw(&rel, p.batches).await?;
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
        self.topic.commit(GROUP, p.last + 1).await?;
        self.topic.apply_retention().await?;
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

/// Whether `new` (a decoded payload batch) has the schema of `held` (a batch with the
/// sequence column added).
fn same_schema(held: &RecordBatch, new: &RecordBatch) -> bool {
    let (h, n) = (held.schema(), new.schema());
    h.metadata() == n.metadata()
        && h.fields().len() == n.fields().len() + 1
        && h.fields().iter().zip(n.fields().iter()).all(|(a, b)| a == b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(seq: u64, rows: usize) -> Vec<u8> {
        payload_of(seq, rows, false)
    }

    /// A log record of `rows` events; `grown` writes it under a contract with one more field.
    fn payload_of(seq: u64, rows: usize, grown: bool) -> Vec<u8> {
        use deltalake::arrow::array::{ArrayRef, StringArray, TimestampMicrosecondArray};
        let extra = if grown {
            "  - { name: site, type: string }\n"
        } else {
            ""
        };
        let spec = tarn_core::DatasetSpec::from_yaml(&format!(
            "name: d\nfields:\n  - {{ name: event_id, type: string }}\n{extra}event_id: event_id\n"
        ))
        .expect("spec");
        let ids: Vec<String> = (0..rows).map(|i| format!("{seq}-{i}")).collect();
        let mut columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from(ids))];
        if grown {
            columns.push(Arc::new(StringArray::from(vec!["s"; rows])));
        }
        columns.push(Arc::new(
            TimestampMicrosecondArray::from(vec![0; rows]).with_timezone("UTC"),
        ));
        columns.push(Arc::new(StringArray::from(vec!["2026-11-22"; rows])));
        let b = RecordBatch::try_new(tarn_collector::arrow_schema(&spec), columns).expect("batch");
        let mut out = vec![tarn_collector::PAYLOAD_VERSION];
        let mut w = deltalake::arrow::ipc::writer::StreamWriter::try_new(&mut out, &b.schema()).expect("writer");
        w.write(&b).expect("write");
        w.finish().expect("finish");
        drop(w);
        out
    }

    /// Records written under two contract versions never share a raw object (an object has one
    /// schema), and every record is delivered once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_schema_closes_the_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::open(dir.path().join("log"), tarn_log::LogOptions::default()).expect("log");
        let lake = Lake::open(dir.path().join("lake")).expect("lake");
        let topic = log.topic(&tarn_collector::topic_name("d")).expect("topic");
        let n = 30u64;
        for seq in 0..n {
            topic
                .append(payload_of(seq, 3, (seq / 5) % 2 == 1))
                .await
                .expect("append");
        }
        let clock = tarn_core::ManualClock::new(0);
        let d = Delivery::new(
            &log,
            lake.clone(),
            Arc::new(clock.clone()),
            "d",
            DeliveryOptions::new(1 << 30, 60_000),
        )
        .expect("delivery");
        let (tx, rx) = watch::channel(false);
        let h = tokio::spawn(d.run(rx));
        let objects = log.topic(OBJECTS_TOPIC).expect("objects");
        let (mut next, mut covered) = (0u64, Vec::new());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while covered.len() < n as usize {
            assert!(std::time::Instant::now() < deadline, "delivery stalled at {covered:?}");
            clock.advance_micros(61_000_000);
            for r in objects.cursor(next).read(1 << 20).expect("read") {
                next = r.seq + 1;
                let note: ObjectCreated = serde_json::from_slice(&r.payload).expect("note");
                let batches = crate::raw::read_object(lake.root(), &note.path).expect("raw object");
                let widths: std::collections::BTreeSet<usize> = batches.iter().map(|b| b.num_columns()).collect();
                assert_eq!(widths.len(), 1, "{} mixes schemas", note.path);
                covered.extend(batches.iter().map(|b| crate::raw::batch_seq(b).expect("seq")));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(covered, (0..n).collect::<Vec<_>>());
        assert!(
            next >= 6,
            "six runs of one schema make at least six objects, got {next}"
        );
        tx.send(true).expect("shutdown");
        h.await.expect("join");
    }

    /// Size-closed batches must cover every record exactly once, in order, with no gap, however
    /// the reads and the size limit fall.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_cover_every_record_without_gaps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::open(dir.path().join("log"), tarn_log::LogOptions::default()).expect("log");
        let lake = Lake::open(dir.path().join("lake")).expect("lake");
        let topic = log.topic(&tarn_collector::topic_name("d")).expect("topic");
        let n = 200u64;
        for seq in 0..n {
            topic
                .append(payload(seq, 1 + (seq as usize % 7)))
                .await
                .expect("append");
        }
        let opts = DeliveryOptions::new(5_000, 60_000);
        let clock = tarn_core::ManualClock::new(0);
        let d = Delivery::new(&log, lake.clone(), Arc::new(clock.clone()), "d", opts).expect("delivery");
        let (tx, rx) = watch::channel(false);
        let h = tokio::spawn(d.run(rx));
        let objects = log.topic(OBJECTS_TOPIC).expect("objects");
        let mut next = 0u64;
        let mut covered = Vec::new();
        let mut idle = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while covered.last().copied() != Some(n - 1) {
            assert!(std::time::Instant::now() < deadline, "delivery stalled at {covered:?}");
            let recs = objects.cursor(next).read(1 << 20).expect("read");
            if recs.is_empty() {
                idle += 1;
                if idle % 20 == 0 {
                    // Nothing new for a while: what is left may be the tail, smaller than a
                    // batch, so let it age out (again, if it was opened after the last push).
                    clock.advance_micros(61_000_000);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            for r in recs {
                next = r.seq + 1;
                let note: ObjectCreated = serde_json::from_slice(&r.payload).expect("note");
                let batches = crate::raw::read_object(lake.root(), &note.path).expect("raw object");
                let seqs: Vec<u64> = batches.iter().map(|b| crate::raw::batch_seq(b).expect("seq")).collect();
                let want: Vec<u64> = (note.first_seq..=note.last_seq).collect();
                assert_eq!(seqs, want, "object {} holds exactly its range", note.path);
                covered.extend(seqs);
            }
        }
        assert_eq!(covered, (0..n).collect::<Vec<_>>());
        assert!(next > 3, "the size limit should close several batches, got {next}");
        assert_eq!(topic.committed(GROUP).await.expect("committed"), Some(n));
        tx.send(true).expect("shutdown");
        h.await.expect("join");
    }
}
