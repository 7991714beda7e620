//! Curate against a real Delta table: replayed and overlapping notifications add nothing twice.

use std::sync::Arc;

use tarn_core::DatasetSpec;

use super::*;
use crate::raw::object_path;
use crate::testkit::{SPEC, count, files_on_disk, note, setup};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_carry_statistics_and_a_retried_commit_leaves_no_orphans() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, lake, catalog) = setup(dir.path());
    let cur = Curator::new(&log, lake.clone(), catalog, CurateOptions::default()).expect("curator");
    let a = note(&lake, 0, 2);
    cur.apply(std::slice::from_ref(&a)).await.expect("apply");
    let table = lake.open_table("bids").await.expect("table");
    let snap = table.snapshot().expect("snapshot");
    let mut listed = Vec::new();
    let mut rows = 0;
    for f in snap.log_data().iter() {
        let stats: serde_json::Value = serde_json::from_str(&f.stats().expect("stats")).expect("json");
        let n = stats["numRecords"].as_u64().expect("numRecords");
        rows += n;
        // Rows 0, 2, 4.. of each record are acme with cpm 0, 2, 4..; the rest are beta.
        let client = f.partition_values_map()["client_id"].clone().expect("tenant");
        let (lo, hi) = if client == "acme" { (0.0, 8.0) } else { (1.0, 9.0) };
        assert_eq!(stats["minValues"]["cpm"], lo, "{client}");
        assert_eq!(stats["maxValues"]["cpm"], hi, "{client}");
        assert_eq!(stats["nullCount"]["cpm"], 0);
        assert!(
            stats["minValues"].get("client_id").is_none(),
            "partition columns have no stats"
        );
        listed.push(f.path().into_owned());
    }
    assert_eq!(rows, 30);
    listed.sort();
    assert_eq!(listed.len(), 2, "one file per partition");
    assert_eq!(files_on_disk(&lake.table_dir("bids")), listed);

    // A retry of the same commit whose first attempt wrote its files but never committed (a
    // crash between the two) writes the same names: nothing is left unreferenced.
    let spec = DatasetSpec::from_yaml(SPEC).expect("spec");
    let next = note(&lake, 3, 4);
    let raw = read_object(lake.root(), &next.path).expect("read");
    let batches: Vec<_> = raw.iter().map(|b| without_seq(b).expect("strip")).collect();
    let parts = crate::datafile::group_by_partition(&spec, &batches).expect("group");
    let files = crate::datafile::FileSet {
        table_dir: &lake.table_dir("bids"),
        spec: &spec,
        props: crate::table::writer_properties(&spec, &batches, true),
        shard: 0,
        version: 4,
    };
    for p in &parts {
        files.write(&batches, p).expect("write without commit");
    }
    cur.apply(&[next]).await.expect("apply after the failed attempt");
    assert_eq!(count(&lake).await, (50, 50));
    let table = lake.open_table("bids").await.expect("table");
    let mut listed: Vec<String> = table
        .snapshot()
        .expect("snapshot")
        .log_data()
        .iter()
        .map(|f| f.path().into_owned())
        .collect();
    listed.sort();
    assert_eq!(files_on_disk(&lake.table_dir("bids")), listed);
}
