//! The lake in a bucket whose requests fail on a schedule: puts lost before they land, puts
//! that land but whose answer is lost (the case a retried Delta commit meets its own entry),
//! and reads that fail. Raw writes, curate and compaction, each retried as their callers retry
//! them, leave every row in the table exactly once.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use deltalake::logstore::object_store::ObjectStoreExt as _;
use deltalake::logstore::object_store::path::Path as ObjectPath;
use tarn_catalog::Catalog;
use tarn_core::DatasetSpec;
use tarn_log::Log;

use crate::compact::{CompactOptions, compact_dataset, table_files};
use crate::curate::{CurateOptions, Curator};
use crate::store::S3Location;
use crate::testkit::{Faulty, SPEC, count_of, record_of};
use crate::{Lake, ObjectCreated};

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
