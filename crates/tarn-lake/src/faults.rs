//! The lake in a bucket whose requests fail on a schedule: puts lost before they land, puts
//! that land but whose answer is lost (the case a retried Delta commit meets its own entry),
//! and reads that fail. Raw writes, curate and compaction, each retried as their callers retry
//! them, leave every row in the table exactly once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use deltalake::logstore::object_store::memory::InMemory;
use deltalake::logstore::object_store::path::Path as ObjectPath;
use deltalake::logstore::object_store::{self, ObjectStore, ObjectStoreExt as _, PutPayload};
use tarn_catalog::Catalog;
use tarn_core::DatasetSpec;
use tarn_log::Log;

use crate::compact::{CompactOptions, compact_dataset, table_files};
use crate::curate::{CurateOptions, Curator};
use crate::store::S3Location;
use crate::testkit::{SPEC, count_of, record_of};
use crate::{Lake, ObjectCreated};

/// An in-memory bucket that fails some requests while `on`, drawn from a seeded sequence so
/// that a run repeats: a put is lost before it is stored (one in ten), or stored but answered
/// with an error (one in ten); a read fails (one in twenty).
#[derive(Debug, Default)]
struct Faulty {
    inner: InMemory,
    on: AtomicBool,
    draws: AtomicUsize,
    /// Faults injected so far.
    injected: AtomicUsize,
    /// Delta commit entries stored whose answer was lost.
    commits_answer_lost: AtomicUsize,
}

impl Faulty {
    /// The next draw in 0..100 (a fixed hash of the draw's number), or `None` when off.
    fn draw(&self) -> Option<u64> {
        if !self.on.load(Ordering::SeqCst) {
            return None;
        }
        let n = self.draws.fetch_add(1, Ordering::SeqCst) as u64;
        let mut x = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Some((x ^ (x >> 31)) % 100)
    }
}

impl std::fmt::Display for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Faulty")
    }
}

fn injected(what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "Faulty",
        source: format!("injected fault: {what}").into(),
    }
}

#[async_trait::async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(
        &self,
        location: &ObjectPath,
        payload: PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        match self.draw() {
            Some(0..10) => {
                self.injected.fetch_add(1, Ordering::SeqCst);
                Err(injected("the put never arrived"))
            }
            Some(10..20) => {
                let stored = self.inner.put_opts(location, payload, opts).await;
                if stored.is_ok() {
                    self.injected.fetch_add(1, Ordering::SeqCst);
                    if location.as_ref().contains("_delta_log/") && location.as_ref().ends_with(".json") {
                        self.commits_answer_lost.fetch_add(1, Ordering::SeqCst);
                    }
                    return Err(injected("the put landed but its answer was lost"));
                }
                stored
            }
            _ => self.inner.put_opts(location, payload, opts).await,
        }
    }
    async fn put_multipart_opts(
        &self,
        location: &ObjectPath,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &ObjectPath,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        if self.draw().is_some_and(|d| d < 5) {
            self.injected.fetch_add(1, Ordering::SeqCst);
            return Err(injected("the read failed"));
        }
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<'static, object_store::Result<ObjectPath>>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<ObjectPath>> {
        self.inner.delete_stream(locations)
    }
    fn list(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&ObjectPath>) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &ObjectPath,
        to: &ObjectPath,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// Runs `f` until it succeeds, as a consumer retries from its committed offset; at most 50
/// attempts.
async fn retried<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::Result<T>>,
{
    let mut errors = Vec::new();
    for _ in 0..50 {
        match f().await {
            Ok(v) => return v,
            Err(e) => errors.push(e.to_string()),
        }
    }
    panic!("{what} failed 50 times in a row: {errors:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_writes_curate_and_compaction_through_a_failing_bucket_keep_every_row_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Faulty::default());
    let location = S3Location::parse("s3://faulty/lake").expect("location");
    let lake = Lake::with_bucket_store(dir.path().join("lake"), location, store.clone()).expect("lake");
    let log = Log::open(dir.path().join("log"), tarn_log::LogOptions::default()).expect("log");
    let catalog = Arc::new(Catalog::open(dir.path().join("catalog")).expect("catalog"));
    let spec = DatasetSpec::from_yaml(SPEC).expect("spec");
    catalog.register(spec.clone()).expect("register");
    let cur = Curator::new(&log, lake.clone(), catalog, CurateOptions::default())
        .await
        .expect("curator");

    store.on.store(true, Ordering::SeqCst);
    for i in 0..12u64 {
        let (first, last) = (i * 3, i * 3 + 2);
        let batches: Vec<_> = (first..=last).map(|s| record_of(&spec, s, 10, "2026-11-22")).collect();
        let path = lake.raw_path("bids", 0, first, last);
        let bytes = retried("raw write", || lake.write_raw(&path, batches.clone())).await;
        let note = ObjectCreated {
            version: 1,
            dataset: "bids".into(),
            shard: 0,
            first_seq: first,
            last_seq: last,
            path,
            rows: 30,
            bytes,
        };
        retried("curate", || cur.apply(std::slice::from_ref(&note))).await;
    }
    // Compaction retried until a run finds nothing left to merge.
    let opts = CompactOptions::default();
    let mut runs = 0;
    loop {
        runs += 1;
        assert!(runs <= 50, "compaction never finished");
        match compact_dataset(&lake, &spec, &opts, &|_| {}).await {
            Ok(r) if r.bins.is_empty() => break,
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "compaction failed; run again"),
        }
    }
    store.on.store(false, Ordering::SeqCst);
    let faults = store.injected.load(Ordering::SeqCst);
    assert!(faults >= 10, "the test injected only {faults} faults");
    let lost = store.commits_answer_lost.load(Ordering::SeqCst);
    assert!(
        lost >= 1,
        "no commit landed with its answer lost: the hard case was not met"
    );
    assert_eq!(
        count_of(&lake, "bids").await,
        (360, 360),
        "every row once after {faults} faults ({lost} commits landed unanswered)"
    );
    let table = lake.open_table("bids").await.expect("table");
    let active = table_files(&table, &spec).expect("files");
    assert_eq!(active.len(), 2, "one file per tenant after compaction: {active:?}");
    // Every file the table lists is in the bucket.
    for f in &active {
        let key = ObjectPath::from(format!("lake/tables/bids/{}", f.path));
        store.inner.head(&key).await.expect("an active file is stored");
    }
}
