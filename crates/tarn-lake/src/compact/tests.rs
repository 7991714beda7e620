//! The executor against real tables: rows are conserved, the plan is carried out, a compacted
//! partition is left alone, and compaction racing curate loses and doubles nothing.

use std::sync::Arc;

use deltalake::arrow::array::{Array, StringArray};
use deltalake::datafusion::prelude::SessionContext;

use super::*;
use crate::curate::{CurateOptions, Curator};
use crate::testkit::{SPEC, count, curate_commits, files_on_disk, note, setup};

fn spec() -> DatasetSpec {
    DatasetSpec::from_yaml(SPEC).expect("spec")
}

/// Every event id in the table, sorted.
async fn ids(lake: &Lake) -> Vec<String> {
    let table = lake.open_table("bids").await.expect("table");
    let ctx = SessionContext::new();
    table.update_datafusion_session(&ctx.state()).expect("session");
    ctx.register_table("bids", table.table_provider().await.expect("provider"))
        .expect("register");
    let batches = ctx
        .sql("SELECT event_id FROM bids ORDER BY event_id")
        .await
        .expect("sql")
        .collect()
        .await
        .expect("collect");
    let mut out = Vec::new();
    for b in batches {
        let c =
            deltalake::arrow::compute::cast(b.column(0), &deltalake::arrow::datatypes::DataType::Utf8).expect("cast");
        let c = c.as_any().downcast_ref::<StringArray>().expect("strings");
        out.extend((0..c.len()).map(|i| c.value(i).to_string()));
    }
    out
}

async fn active_files(lake: &Lake) -> Vec<FileInfo> {
    let table = lake.open_table("bids").await.expect("table");
    table_files(&table, &spec()).expect("files")
}

fn no_progress(_: &CompactProgress) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_merges_small_files_and_conserves_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, lake, catalog) = setup(dir.path());
    let cur = Curator::new(&log, lake.clone(), catalog, CurateOptions::default())
        .await
        .expect("curator");
    curate_commits(&cur, &lake, 6).await;
    let before = ids(&lake).await;
    assert_eq!(before.len(), 120);
    assert_eq!(active_files(&lake).await.len(), 12, "six commits over two tenants");

    let dry = CompactOptions {
        dry_run: true,
        ..CompactOptions::default()
    };
    let plan = compact_dataset(&lake, &spec(), &dry, &no_progress)
        .await
        .expect("dry run");
    assert_eq!((plan.partitions, plan.bins.len(), plan.commits), (2, 2, 0));
    assert_eq!(plan.bins.iter().map(|b| b.rows).sum::<u64>(), 120);
    assert_eq!(active_files(&lake).await.len(), 12, "a dry run changes nothing");

    let seen = std::sync::Mutex::new(Vec::new());
    let record = |p: &CompactProgress| seen.lock().expect("lock").push(p.bins_done);
    let done = compact_dataset(&lake, &spec(), &CompactOptions::default(), &record)
        .await
        .expect("compact");
    assert_eq!(
        (done.commits, done.files_removed, done.files_added, done.rows),
        (1, 12, 2, 120),
        "both partitions swapped in one commit"
    );
    assert_eq!(*seen.lock().expect("lock"), vec![0, 1, 2], "progress after every bin");
    assert_eq!(ids(&lake).await, before, "the same rows, none lost, none doubled");
    let files = active_files(&lake).await;
    assert_eq!(files.len(), 2);
    assert!(files.iter().all(|f| f.rows == 60));
    // The removed files stay until vacuum: 12 old plus 2 new on disk.
    assert_eq!(files_on_disk(&lake.table_dir("bids")).len(), 14);

    let again = compact_dataset(&lake, &spec(), &CompactOptions::default(), &no_progress)
        .await
        .expect("again");
    assert_eq!(
        (again.bins.len(), again.commits),
        (0, 0),
        "a compacted partition is not rewritten"
    );

    // New small files arrive: only they and the compacted file are merged, for that day only.
    cur.apply(&[note(&lake, 12, 13)]).await.expect("apply");
    let other_day = CompactOptions {
        day: Some("2026-11-21".into()),
        ..CompactOptions::default()
    };
    let none = compact_dataset(&lake, &spec(), &other_day, &no_progress)
        .await
        .expect("day filter");
    assert_eq!((none.files_before, none.commits), (0, 0));
    let day = CompactOptions {
        day: Some("2026-11-22".into()),
        ..CompactOptions::default()
    };
    let more = compact_dataset(&lake, &spec(), &day, &no_progress)
        .await
        .expect("compact");
    assert_eq!((more.files_removed, more.files_added), (4, 2));
    assert_eq!(count(&lake).await, (140, 140));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_racing_curate_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, lake, catalog) = setup(dir.path());
    let cur = Arc::new(
        Curator::new(&log, lake.clone(), catalog, CurateOptions::default())
            .await
            .expect("curator"),
    );
    curate_commits(&cur, &lake, 4).await;
    let notes: Vec<_> = (4..24).map(|i| note(&lake, i * 2, i * 2 + 1)).collect();
    let writer = {
        let cur = cur.clone();
        tokio::spawn(async move {
            for n in notes {
                cur.apply(&[n]).await.expect("apply during compaction");
            }
        })
    };
    let mut commits = 0;
    while !writer.is_finished() {
        let r = compact_dataset(&lake, &spec(), &CompactOptions::default(), &no_progress)
            .await
            .expect("compact");
        commits += r.commits;
    }
    writer.await.expect("writer");
    let last = compact_dataset(&lake, &spec(), &CompactOptions::default(), &no_progress)
        .await
        .expect("compact");
    commits += last.commits;
    assert!(commits > 0, "compaction ran while curate appended");
    let got = ids(&lake).await;
    let mut expect: Vec<String> = (0..48u64)
        .flat_map(|s| (0..10).map(move |i| format!("s{s}-{i}")))
        .collect();
    expect.sort();
    assert_eq!(got, expect);
    assert_eq!(
        active_files(&lake).await.len(),
        2,
        "each tenant's partition ends as one file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vacuum_keeps_what_readers_can_use_and_deletes_the_rest_after_retention() {
    use crate::vacuum::{RETAIN_MIN, vacuum_dataset};
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, lake, catalog) = setup(dir.path());
    let cur = Curator::new(&log, lake.clone(), catalog, CurateOptions::default())
        .await
        .expect("curator");
    curate_commits(&cur, &lake, 6).await;
    // A reader plans on the current version before compaction removes its files.
    let old = lake.open_table("bids").await.expect("table");
    let ctx = SessionContext::new();
    old.update_datafusion_session(&ctx.state()).expect("session");
    ctx.register_table("old_bids", old.table_provider().await.expect("provider"))
        .expect("register");
    compact_dataset(&lake, &spec(), &CompactOptions::default(), &no_progress)
        .await
        .expect("compact");
    // An orphan of a commit that never landed, written long ago.
    let table_dir = lake.table_dir("bids");
    let orphan = table_dir.join("day=2026-11-22/client_id=acme/part-000-00000000000000000099.zstd.parquet");
    std::fs::write(&orphan, b"never committed").expect("orphan");
    let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(30 * 24 * 3600);
    std::fs::File::options()
        .write(true)
        .open(&orphan)
        .and_then(|f| f.set_modified(long_ago))
        .expect("age the orphan");

    let now = tarn_core::Clock::now_micros(&tarn_core::SystemClock) / 1000;
    let too_short = vacuum_dataset(&lake, "bids", now, std::time::Duration::from_secs(60), false).await;
    assert!(matches!(too_short, Err(Error::Refused(_))), "{too_short:?}");

    let r = vacuum_dataset(&lake, "bids", now, RETAIN_MIN, false)
        .await
        .expect("vacuum");
    assert_eq!(
        (r.files_on_disk, r.files_active, r.files_deleted, r.files_retained),
        (15, 2, 1, 12)
    );
    assert!(!orphan.exists(), "the old orphan goes");
    // The reader that planned before the compaction still reads every row.
    let n = ctx
        .sql("SELECT count(*) FROM old_bids")
        .await
        .expect("sql")
        .collect()
        .await
        .expect("old files are still there");
    assert_eq!(
        n[0].column(0)
            .as_any()
            .downcast_ref::<deltalake::arrow::array::Int64Array>()
            .map(|a| a.value(0)),
        Some(120)
    );

    // Past the retention the removed files go; the table keeps every row.
    let later = now + 3 * 3600 * 1000;
    let dry = vacuum_dataset(&lake, "bids", later, RETAIN_MIN, true)
        .await
        .expect("dry run");
    assert_eq!((dry.files_deleted, files_on_disk(&table_dir).len()), (12, 14));
    let r = vacuum_dataset(&lake, "bids", later, RETAIN_MIN, false)
        .await
        .expect("vacuum");
    assert_eq!(r.files_deleted, 12);
    assert_eq!(files_on_disk(&table_dir).len(), 2);
    assert_eq!(count(&lake).await, (120, 120));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_compactions_at_once_never_double_rows_or_leave_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, lake, catalog) = setup(dir.path());
    let cur = Curator::new(&log, lake.clone(), catalog, CurateOptions::default())
        .await
        .expect("curator");
    curate_commits(&cur, &lake, 6).await;
    let before = ids(&lake).await;
    let run = |lake: Lake| {
        tokio::spawn(async move { compact_dataset(&lake, &spec(), &CompactOptions::default(), &no_progress).await })
    };
    let (a, b) = (run(lake.clone()), run(lake.clone()));
    let (a, b) = (a.await.expect("join").expect("a"), b.await.expect("join").expect("b"));
    assert_eq!(a.commits + b.commits, 1, "both partitions compacted once: {a:?} {b:?}");
    assert_eq!(ids(&lake).await, before, "no row lost or doubled");
    // Only the winners' files remain beside the removed ones.
    assert_eq!(files_on_disk(&lake.table_dir("bids")).len(), 14);
    assert_eq!(active_files(&lake).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_removed_by_another_writer_is_a_conflict_and_leaves_no_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, lake, catalog) = setup(dir.path());
    let cur = Curator::new(&log, lake.clone(), catalog, CurateOptions::default())
        .await
        .expect("curator");
    curate_commits(&cur, &lake, 3).await;
    let mut table = lake.open_table("bids").await.expect("table");
    let files = table_files(&table, &spec()).expect("files");
    let bins = plan(&files, &CompactionRules::default());
    let partition = bins[0].partition.clone();
    let mine: Vec<Bin> = bins.iter().filter(|b| b.partition == partition).cloned().collect();
    // An outside writer removes one input after the plan was made.
    let victim = mine[0].files[0].clone();
    let mut other = lake.open_table("bids").await.expect("table");
    let remove = Action::Remove(Remove {
        path: victim.clone(),
        data_change: true,
        deletion_timestamp: Some(0),
        extended_file_metadata: None,
        partition_values: None,
        size: None,
        tags: None,
        deletion_vector: None,
        base_row_id: None,
        default_row_commit_version: None,
    });
    let op = DeltaOperation::Delete { predicate: None };
    commit_actions(&mut other, "bids", vec![remove], op, CommitProperties::default())
        .await
        .expect("outside delete");
    let on_disk = files_on_disk(&lake.table_dir("bids"));
    let schema = file_schema(&spec(), &table.snapshot().expect("snapshot").snapshot().arrow_schema());
    let info: HashMap<String, FileInfo> = files.into_iter().map(|f| (f.path.clone(), f)).collect();
    let mut written = Vec::new();
    let r = compact_partition(
        &mut table,
        &spec(),
        &schema,
        &info,
        &partition_text(&partition),
        &mine,
        &CompactOptions::default(),
        None,
        &mut written,
        &mut |_| {},
    )
    .await;
    assert!(matches!(&r, Err(Error::Conflict(m)) if m.contains(&victim)), "{r:?}");
    assert_eq!(written.len(), 1, "the merged file was written");
    assert_eq!(files_on_disk(&lake.table_dir("bids")), on_disk, "and deleted again");
}

/// Two compactions (two processes) that both passed the check of their inputs commit the same
/// swap from one snapshot: delta-rs lets removes with `dataChange = false` through, so only the
/// application transaction every compaction commit carries stops the second from doubling rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_transaction_fences_a_second_compaction_of_the_same_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, lake, catalog) = setup(dir.path());
    let cur = Curator::new(&log, lake.clone(), catalog, CurateOptions::default())
        .await
        .expect("curator");
    curate_commits(&cur, &lake, 3).await;
    let before = ids(&lake).await;
    let mut first = lake.open_table("bids").await.expect("table");
    let mut second = lake.open_table("bids").await.expect("table");
    let files = table_files(&first, &spec()).expect("files");
    let schema = file_schema(&spec(), &first.snapshot().expect("snapshot").snapshot().arrow_schema());
    let bin = plan(&files, &CompactionRules::default()).remove(0);
    let info: HashMap<String, FileInfo> = files.into_iter().map(|f| (f.path.clone(), f)).collect();
    let swap = |add: deltalake::kernel::Add| {
        let mut actions = vec![Action::Add(add)];
        actions.extend(bin.files.iter().map(|f| remove_action(&info[f], 0, false)));
        actions
    };
    let fenced =
        || CommitProperties::default().with_application_transaction(Transaction::new(compact_app_id("bids"), 1));
    let op = || DeltaOperation::Optimize {
        predicate: None,
        target_size: 1,
    };
    let dir_of = lake.table_dir("bids");
    let a = write_bin(&dir_of, &spec(), &schema, &bin).await.expect("write a");
    let b = write_bin(&dir_of, &spec(), &schema, &bin).await.expect("write b");
    commit_actions(&mut first, "bids", swap(a), op(), fenced())
        .await
        .expect("the first lands");
    let r = commit_actions(&mut second, "bids", swap(b.clone()), op(), fenced()).await;
    assert!(matches!(&r, Err(Error::Conflict(_))), "the second is fenced off: {r:?}");
    assert_eq!(ids(&lake).await, before, "no row doubled");
    // Without the fence the same second commit lands and doubles the bin's rows: the fence is
    // what stops it.
    let mut third = lake.open_table("bids").await.expect("table");
    third
        .load_version(first.version().expect("v") - 1)
        .await
        .expect("old snapshot");
    commit_actions(&mut third, "bids", swap(b), op(), CommitProperties::default())
        .await
        .expect("unfenced, it lands");
    assert_eq!(ids(&lake).await.len(), before.len() + bin.rows as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sorted_compaction_orders_rows_and_conserves_them() {
    use deltalake::arrow::array::Float64Array;
    use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, lake, catalog) = setup(dir.path());
    let cur = Curator::new(&log, lake.clone(), catalog, CurateOptions::default())
        .await
        .expect("curator");
    curate_commits(&cur, &lake, 5).await;
    let before = ids(&lake).await;
    let mut sorted = spec();
    sorted.compaction.sort_by = vec!["cpm".into()];
    let r = compact_dataset(&lake, &sorted, &CompactOptions::default(), &no_progress)
        .await
        .expect("compact");
    assert_eq!((r.commits, r.files_added, r.rows), (1, 2, 100));
    assert_eq!(ids(&lake).await, before);
    for f in active_files(&lake).await {
        let file = std::fs::File::open(lake.table_dir("bids").join(&f.path)).expect("open");
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .expect("parquet")
            .build()
            .expect("reader");
        let mut cpm = Vec::new();
        for b in reader {
            let b = b.expect("batch");
            let c = b.column_by_name("cpm").expect("cpm");
            let c = c.as_any().downcast_ref::<Float64Array>().expect("f64");
            cpm.extend(c.iter().flatten());
        }
        assert_eq!(cpm.len(), 50);
        assert!(cpm.windows(2).all(|w| w[0] <= w[1]), "{} is sorted by cpm", f.path);
    }
}
