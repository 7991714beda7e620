//! Test helpers shared by the lake's tests: a small dataset, raw objects and notifications for
//! it, and counts over its table.

use std::sync::Arc;

use deltalake::arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use deltalake::datafusion::prelude::SessionContext;
use tarn_catalog::Catalog;
use tarn_core::DatasetSpec;
use tarn_log::Log;

use crate::raw::{object_path, with_seq, write_object};
use crate::{Lake, ObjectCreated};

pub const SPEC: &str = "name: bids\nfields:\n  - { name: event_id, type: string }\n  - { name: client_id, type: string, required: true }\n  - { name: cpm, type: float64 }\nevent_id: event_id\npartitioning: { tenant: client_id }\n";

/// Records of one day written under `spec` (the fields of [`SPEC`], any major version): rows
/// alternate between tenants acme and beta.
pub fn record_of(spec: &DatasetSpec, seq: u64, rows: usize, day: &str) -> RecordBatch {
    let schema = tarn_collector::arrow_schema(spec);
    let ids: Vec<String> = (0..rows).map(|i| format!("s{seq}-{i}")).collect();
    let clients: Vec<&str> = (0..rows).map(|i| if i % 2 == 0 { "acme" } else { "beta" }).collect();
    let cpm: Vec<f64> = (0..rows).map(|i| i as f64).collect();
    let received = deltalake::arrow::array::TimestampMicrosecondArray::from(vec![0i64; rows]).with_timezone("UTC");
    let days = StringArray::from(vec![day; rows]);
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

pub fn note(lake: &Lake, first: u64, last: u64) -> ObjectCreated {
    note_on(lake, first, last, "2026-11-22")
}

/// A raw object of ten rows per sequence, all on `day`, and its notification.
pub fn note_on(lake: &Lake, first: u64, last: u64, day: &str) -> ObjectCreated {
    note_of(lake, first, last, day, &DatasetSpec::from_yaml(SPEC).expect("spec"))
}

/// [`note_on`] with the records written under `spec`.
pub fn note_of(lake: &Lake, first: u64, last: u64, day: &str, spec: &DatasetSpec) -> ObjectCreated {
    let batches: Vec<_> = (first..=last).map(|s| record_of(spec, s, 10, day)).collect();
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

pub fn setup(dir: &std::path::Path) -> (Log, Lake, Arc<Catalog>) {
    let log = Log::open(dir.join("log"), tarn_log::LogOptions::default()).expect("log");
    let lake = Lake::open(dir.join("lake")).expect("lake");
    let catalog = Arc::new(Catalog::open(dir.join("catalog")).expect("catalog"));
    catalog
        .register(DatasetSpec::from_yaml(SPEC).expect("spec"))
        .expect("register");
    (log, lake, catalog)
}

pub async fn count(lake: &Lake) -> (i64, i64) {
    count_of(lake, "bids").await
}

/// Rows and distinct event ids in a table.
pub async fn count_of(lake: &Lake, name: &str) -> (i64, i64) {
    let table = lake.open_table(name).await.expect("table");
    let ctx = SessionContext::new();
    table.update_datafusion_session(&ctx.state()).expect("session");
    ctx.register_table("t", table.table_provider().await.expect("provider"))
        .expect("register");
    let df = ctx
        .sql("SELECT count(*), count(DISTINCT event_id) FROM t")
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

/// Every `.parquet` file under the table directory, relative to it.
pub fn files_on_disk(dir: &std::path::Path) -> Vec<String> {
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p.strip_prefix(root).expect("prefix").to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Curates `n` objects of two records each (sequences 0-1, 2-3, ...), one commit apiece.
pub async fn curate_commits(cur: &crate::Curator, lake: &Lake, n: u64) {
    for i in 0..n {
        cur.apply(&[note(lake, i * 2, i * 2 + 1)]).await.expect("apply");
    }
}
