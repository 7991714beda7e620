//! Curate against a real Delta table: replayed and overlapping notifications add nothing twice.

use std::sync::Arc;

use tarn_core::DatasetSpec;

use super::*;
use crate::raw::{object_path, read_object};
use crate::testkit::{SPEC, count, count_of, files_on_disk, note, note_of, setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_and_overlaps_never_duplicate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, lake, catalog) = setup(dir.path());
    let cur = Curator::new(&log, lake.clone(), catalog, CurateOptions::default())
        .await
        .expect("curator");

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
    let cur2 = Curator::new(&log2, lake.clone(), catalog2, CurateOptions::default())
        .await
        .expect("curator");
    cur2.apply(&[b, c]).await.expect("replay after restart");
    assert_eq!(count(&lake).await, (80, 80));
    // Partition folders by day and tenant.
    assert!(lake.table_dir("bids").join("day=2026-11-22/client_id=acme").is_dir());
}

/// A log record of several batches (its rows in pieces) is curated whole, and its replays,
/// alone or inside a wider object, add nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_of_several_batches_is_taken_whole_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, lake, catalog) = setup(dir.path());
    let cur = Curator::new(&log, lake.clone(), catalog, CurateOptions::default())
        .await
        .expect("curator");
    let spec = DatasetSpec::from_yaml(SPEC).expect("spec");
    let object = |first: u64, last: u64| {
        let mut batches = Vec::new();
        for seq in first..=last {
            let b = crate::testkit::record_of(&spec, seq, 10, "2026-11-22");
            if seq % 2 == 1 {
                batches.extend([b.slice(0, 6), b.slice(6, 4)]);
            } else {
                batches.push(b);
            }
        }
        crate::testkit::object_of(&lake, first, last, &batches)
    };
    let a = object(0, 2);
    cur.apply(std::slice::from_ref(&a)).await.expect("apply");
    assert_eq!(count(&lake).await, (30, 30));
    cur.apply(std::slice::from_ref(&a)).await.expect("replay");
    assert_eq!(count(&lake).await, (30, 30));
    // A wider object over the same records and new ones, the split record 1 among them.
    let b = object(1, 3);
    cur.apply(&[b]).await.expect("apply wider");
    assert_eq!(count(&lake).await, (40, 40));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_raw_object_is_an_error_not_a_skip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, lake, catalog) = setup(dir.path());
    let cur = Curator::new(&log, lake.clone(), catalog, CurateOptions::default())
        .await
        .expect("curator");
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
    let cur = Curator::new(&log, lake.clone(), catalog, opts).await.expect("curator");
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
    let cur = Curator::new(&log, lake.clone(), catalog, CurateOptions::default())
        .await
        .expect("curator");
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
        table_dir: Some(&lake.table_dir("bids")),
        writer: None,
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

/// After a new major version, rows still in flight from the old contract go to the kept
/// table, the new ones to the fresh table, in any interleaving, and replays add nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_go_to_the_table_of_their_major_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, lake, catalog) = setup(dir.path());
    let cur = Curator::new(&log, lake.clone(), catalog.clone(), CurateOptions::default())
        .await
        .expect("curator");
    cur.apply(&[note(&lake, 0, 1)]).await.expect("major 1");
    // Major 2 begins: the table moves to bids__v1 (as `tarn apply` does it).
    let v1 = catalog.get("bids").expect("spec");
    let v2 = DatasetSpec::from_yaml(&format!("major: 2\n{SPEC}")).expect("spec");
    // Curate is paused (its cached table handles dropped) while the table moves.
    let paused = cur.pauser().pause().await;
    crate::tiers::Tiers::under(&lake)
        .expect("tiers")
        .rename_table(&lake, "bids", "bids__v1")
        .expect("move");
    catalog
        .register(DatasetSpec::frozen_of(&v1).expect("frozen"))
        .expect("register");
    catalog.evolve_major(v2.clone()).expect("major 2");
    drop(paused);
    let object = |first: u64, last: u64, spec: &DatasetSpec| note_of(&lake, first, last, "2026-11-22", spec);
    // Old rows in flight, new rows, then a late old one (its request was checked against
    // major 1 just before the change).
    let notes = [
        object(2, 3, &v1),
        object(4, 5, &v2),
        object(6, 6, &v1),
        object(7, 8, &v2),
    ];
    cur.apply(&notes).await.expect("apply");
    assert_eq!(count_of(&lake, "bids__v1").await, (50, 50));
    assert_eq!(count_of(&lake, "bids").await, (40, 40));
    // Replays, also by a fresh curator, add nothing anywhere.
    cur.apply(&notes).await.expect("replay");
    let log2 = Log::open(dir.path().join("log2"), tarn_log::LogOptions::default()).expect("log");
    let catalog2 = Arc::new(Catalog::open(dir.path().join("catalog")).expect("catalog"));
    let cur2 = Curator::new(&log2, lake.clone(), catalog2, CurateOptions::default())
        .await
        .expect("curator");
    cur2.apply(&notes[1..]).await.expect("replay after restart");
    assert_eq!(count_of(&lake, "bids__v1").await, (50, 50));
    assert_eq!(count_of(&lake, "bids").await, (40, 40));
    // A batch from a later major version than the contract in force is refused.
    let v3 = DatasetSpec::from_yaml(&format!("major: 3\n{SPEC}")).expect("spec");
    let err = cur.apply(&[object(9, 9, &v3)]).await.expect_err("from the future");
    assert!(err.to_string().contains("major version 3"), "{err}");
}

#[test]
fn curated_files_of_one_row_group_carry_no_parquet_statistics() {
    use deltalake::arrow::array::{Float64Array, RecordBatch};
    use deltalake::arrow::datatypes::{DataType, Field, Schema};
    use deltalake::parquet::file::properties::EnabledStatistics;
    use deltalake::parquet::schema::types::ColumnPath;
    let spec = DatasetSpec::from_yaml(SPEC).expect("spec");
    let schema = Arc::new(Schema::new(vec![Field::new("cpm", DataType::Float64, true)]));
    let rows = |n: usize| {
        RecordBatch::try_new(schema.clone(), vec![Arc::new(Float64Array::from(vec![1.0; n]))]).expect("batch")
    };
    let cpm = ColumnPath::from("cpm");
    let stats = |batches: &[RecordBatch], small: bool| {
        crate::table::writer_properties(&spec, batches, small).statistics_enabled(&cpm)
    };
    // A curated file's bounds are in the Delta log, however many rows the commit holds (one
    // that spans several row groups turns statistics back on: see the test below).
    assert_eq!(stats(&[rows(1000)], true), EnabledStatistics::None);
    assert_eq!(stats(&[rows(100_000), rows(40_000)], true), EnabledStatistics::None);
    // Compaction's files keep Parquet's statistics, which prune within the file.
    assert_eq!(stats(&[rows(1000)], false), EnabledStatistics::Chunk);
}

/// A curated file of one row group keeps the rows in arrival order, with `_received_at`
/// delta-encoded (a non-decreasing run costs almost nothing); rows for several row groups are
/// sorted by event time, so that each group's statistics prune.
#[test]
fn curated_files_keep_arrival_order_unless_they_span_row_groups() {
    use deltalake::arrow::array::{Array, RecordBatch, StringArray, TimestampMicrosecondArray};
    use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use deltalake::parquet::basic::Encoding;
    let spec = DatasetSpec::from_yaml(
        "name: ev\nfields:\n  - { name: event_id, type: string }\n  - { name: ts, type: timestamp, required: true }\nevent_id: event_id\nevent_time: ts\n",
    )
    .expect("spec");
    // Arrival order runs against event time: the last to arrive happened first.
    let n = 6i64;
    let ts = |v: Vec<i64>| Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"));
    let batch = RecordBatch::try_new(
        tarn_collector::arrow_schema(&spec),
        vec![
            Arc::new(StringArray::from((0..n).map(|i| format!("e{i}")).collect::<Vec<_>>())),
            ts((0..n).map(|i| 1_000_000 * (n - i)).collect()),
            ts((0..n).map(|i| 10 * i).collect()),
            Arc::new(StringArray::from(vec!["1970-01-01"; n as usize])),
        ],
    )
    .expect("batch");
    let batches = vec![batch];
    let parts = crate::datafile::group_by_partition(&spec, &batches).expect("group");
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |props: deltalake::parquet::file::properties::WriterProperties, version: i64| {
        let files = crate::datafile::FileSet {
            table_dir: Some(dir.path()),
            writer: None,
            spec: &spec,
            props,
            shard: 0,
            version,
        };
        let (add, _) = files.write(&batches, &parts[0]).expect("write");
        let file = std::fs::File::open(dir.path().join(&add.path)).expect("open");
        let reader = ParquetRecordBatchReaderBuilder::try_new(file).expect("reader");
        let received = reader.metadata().row_group(0).column(2);
        let received_encodings = received.encodings().collect::<Vec<_>>();
        let with_stats = received.statistics().is_some();
        let ids: Vec<String> = reader
            .build()
            .expect("build")
            .flat_map(|b| {
                let b = b.expect("batch");
                let ids = b.column(0).as_any().downcast_ref::<StringArray>().expect("ids").clone();
                (0..ids.len()).map(move |i| ids.value(i).to_string())
            })
            .collect();
        (ids, received_encodings, with_stats)
    };
    let arrival: Vec<String> = (0..n).map(|i| format!("e{i}")).collect();
    let props = crate::table::writer_properties(&spec, &batches, true);
    let (ids, received, with_stats) = write(props.clone(), 1);
    assert_eq!(ids, arrival, "one row group: arrival order");
    assert!(received.contains(&Encoding::DELTA_BINARY_PACKED), "{received:?}");
    assert!(!received.contains(&Encoding::RLE_DICTIONARY), "{received:?}");
    assert!(!with_stats, "one row group: the bounds are in the Delta log only");
    let groups_of_two = props.into_builder().set_max_row_group_row_count(Some(2)).build();
    let (ids, _, with_stats) = write(groups_of_two, 2);
    let by_time: Vec<String> = arrival.iter().rev().cloned().collect();
    assert_eq!(ids, by_time, "several row groups: event-time order");
    assert!(with_stats, "several row groups: statistics to prune within the file");
}

#[test]
fn one_objects_batches_are_joined_in_order_when_they_share_a_schema() {
    use deltalake::arrow::array::{Array as _, StringArray};

    use crate::testkit::record_of;
    let spec = DatasetSpec::from_yaml(SPEC).expect("spec");
    let ids = |b: &deltalake::arrow::array::RecordBatch| -> Vec<String> {
        let c = b.column_by_name("event_id").expect("ids");
        let c = c.as_any().downcast_ref::<StringArray>().expect("strings");
        c.iter().map(|v| v.unwrap_or_default().to_string()).collect()
    };
    // What an earlier object left stays as it is; this object's three batches become one.
    let mut batches: Vec<_> = (0..4).map(|s| record_of(&spec, s, 3, "2026-11-22")).collect();
    let before: Vec<String> = batches.iter().flat_map(ids).collect();
    coalesce(&mut batches, 1).expect("coalesce");
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0].num_rows(), 3);
    assert_eq!(batches[1].num_rows(), 9);
    assert_eq!(batches.iter().flat_map(ids).collect::<Vec<_>>(), before);
    // One batch, or none, is left alone; so are batches of two schemas.
    coalesce(&mut batches, 1).expect("one");
    coalesce(&mut batches, 2).expect("none");
    assert_eq!(batches.len(), 2);
    let mut v2 = spec.clone();
    v2.major = 2;
    let mut mixed = vec![record_of(&spec, 0, 3, "2026-11-22"), record_of(&v2, 1, 3, "2026-11-22")];
    coalesce(&mut mixed, 0).expect("mixed");
    assert_eq!(mixed.len(), 2);
}
