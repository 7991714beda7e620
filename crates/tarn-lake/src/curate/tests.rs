//! Curate against a real Delta table: replayed and overlapping notifications add nothing twice.

use std::sync::Arc;

use deltalake::arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use deltalake::datafusion::prelude::SessionContext;
use tarn_core::DatasetSpec;

use super::*;
use crate::raw::{object_path, with_seq, write_object};

const SPEC: &str = "name: bids\nfields:\n  - { name: event_id, type: string }\n  - { name: client_id, type: string, required: true }\n  - { name: cpm, type: float64 }\nevent_id: event_id\npartitioning: { tenant: client_id }\n";

fn record(seq: u64, rows: usize) -> RecordBatch {
    let spec = DatasetSpec::from_yaml(SPEC).expect("spec");
    let schema = tarn_collector::arrow_schema(&spec);
    let ids: Vec<String> = (0..rows).map(|i| format!("s{seq}-{i}")).collect();
    let clients: Vec<&str> = (0..rows).map(|i| if i % 2 == 0 { "acme" } else { "beta" }).collect();
    let cpm: Vec<f64> = (0..rows).map(|i| i as f64).collect();
    let received = deltalake::arrow::array::TimestampMicrosecondArray::from(vec![0i64; rows]).with_timezone("UTC");
    let days = StringArray::from(vec!["2026-11-22"; rows]);
    let b = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(StringArray::from(clients)),
            Arc::new(Float64Array::from(cpm)),
            Arc::new(received),
            Arc::new(days),
        ],
    )
    .expect("batch");
    with_seq(&b, seq).expect("seq")
}

fn note(lake: &Lake, first: u64, last: u64) -> ObjectCreated {
    let batches: Vec<_> = (first..=last).map(|s| record(s, 10)).collect();
    let path = object_path("bids", 0, first, last);
    let bytes = write_object(lake.root(), &path, &batches).expect("write");
    ObjectCreated {
        version: 1,
        dataset: "bids".into(),
        shard: 0,
        first_seq: first,
        last_seq: last,
        path,
        rows: (last - first + 1) * 10,
        bytes,
    }
}

fn setup(dir: &std::path::Path) -> (Log, Lake, Arc<Catalog>) {
    let log = Log::open(dir.join("log"), tarn_log::LogOptions::default()).expect("log");
    let lake = Lake::open(dir.join("lake")).expect("lake");
    let catalog = Arc::new(Catalog::open(dir.join("catalog")).expect("catalog"));
    catalog
        .register(DatasetSpec::from_yaml(SPEC).expect("spec"))
        .expect("register");
    (log, lake, catalog)
}

async fn count(lake: &Lake) -> (i64, i64) {
    let table = lake.open_table("bids").await.expect("table");
    let ctx = SessionContext::new();
    table.update_datafusion_session(&ctx.state()).expect("session");
    ctx.register_table("bids", table.table_provider().await.expect("provider"))
        .expect("register");
    let df = ctx
        .sql("SELECT count(*), count(DISTINCT event_id) FROM bids")
        .await
        .expect("sql");
    let b = df.collect().await.expect("collect");
    let col = |i: usize| {
        b[0].column(i)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("i64")
            .value(0)
    };
    (col(0), col(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_and_overlaps_never_duplicate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, lake, catalog) = setup(dir.path());
    let cur = Curator::new(&log, lake.clone(), catalog, CurateOptions::default()).expect("curator");

    let a = note(&lake, 0, 2);
    cur.apply(std::slice::from_ref(&a)).await.expect("apply a");
    assert_eq!(count(&lake).await, (30, 30));
    // The same notification again (a replay after a crash before the offset commit).
    cur.apply(std::slice::from_ref(&a)).await.expect("replay a");
    assert_eq!(count(&lake).await, (30, 30));
    // Delivery replayed and cut a wider batch over the same records, plus new ones.
    let b = note(&lake, 0, 5);
    let c = note(&lake, 6, 7);
    cur.apply(&[a.clone(), b.clone(), c.clone()])
        .await
        .expect("apply overlap");
    assert_eq!(count(&lake).await, (80, 80));
    // A fresh curator (a restart) reads the progress from the table itself.
    let log2 = Log::open(dir.path().join("log2"), tarn_log::LogOptions::default()).expect("log");
    let catalog2 = Arc::new(Catalog::open(dir.path().join("catalog")).expect("catalog"));
    let cur2 = Curator::new(&log2, lake.clone(), catalog2, CurateOptions::default()).expect("curator");
    cur2.apply(&[b, c]).await.expect("replay after restart");
    assert_eq!(count(&lake).await, (80, 80));
    // Partition folders by day and tenant.
    assert!(lake.table_dir("bids").join("day=2026-11-22/client_id=acme").is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_raw_object_is_an_error_not_a_skip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, lake, catalog) = setup(dir.path());
    let cur = Curator::new(&log, lake.clone(), catalog, CurateOptions::default()).expect("curator");
    let mut n = note(&lake, 0, 0);
    n.path = object_path("bids", 0, 5, 9);
    assert!(matches!(cur.apply(&[n.clone()]).await, Err(Error::Io { .. })));
    n.path = "../../etc/passwd".into();
    assert!(matches!(cur.apply(&[n]).await, Err(Error::Corrupt { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_rounds_commit_in_bounded_pieces() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, lake, catalog) = setup(dir.path());
    let opts = CurateOptions {
        commit_bytes_max: 1,
        ..CurateOptions::default()
    };
    let cur = Curator::new(&log, lake.clone(), catalog, opts).expect("curator");
    let notes = [note(&lake, 0, 1), note(&lake, 2, 3), note(&lake, 4, 4)];
    cur.apply(&notes).await.expect("apply");
    assert_eq!(
        cur.stats.commits.load(Relaxed),
        3,
        "one commit per object when the cap is tiny"
    );
    cur.apply(&notes).await.expect("replay");
    assert_eq!(cur.stats.commits.load(Relaxed), 3);
    assert_eq!(count(&lake).await, (50, 50));
}
