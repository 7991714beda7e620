//! Test helpers shared by the lake's tests: a small dataset, raw objects and notifications for
//! it, and counts over its table.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use deltalake::arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use deltalake::datafusion::prelude::SessionContext;
use deltalake::logstore::object_store::memory::InMemory;
use deltalake::logstore::object_store::path::Path as ObjectPath;
use deltalake::logstore::object_store::{self, ObjectStore, PutPayload};
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
    object_of(lake, first, last, &batches)
}

/// A raw object of `batches` (records `first` to `last` of bids' shard 0) and its notification.
pub fn object_of(lake: &Lake, first: u64, last: u64, batches: &[RecordBatch]) -> ObjectCreated {
    let path = object_path("bids", 0, first, last);
    let bytes = write_object(lake.root(), &path, batches).expect("write");
    ObjectCreated {
        version: 1,
        dataset: "bids".into(),
        shard: 0,
        first_seq: first,
        last_seq: last,
        path,
        rows: batches.iter().map(|b| b.num_rows() as u64).sum(),
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

/// An in-memory bucket that fails some requests while `on`, drawn from a seeded sequence so
/// that a run repeats: a put is lost before it is stored (one in ten), or stored but answered
/// with an error (one in ten); a read fails (one in twenty).
#[derive(Debug, Default)]
pub(crate) struct Faulty {
    pub(crate) inner: InMemory,
    pub(crate) on: AtomicBool,
    /// Forget every put's conditions (as `rclone serve s3` and `s3rver` do), faults or not.
    pub(crate) ignore_conditions: bool,
    pub(crate) draws: AtomicUsize,
    /// Faults injected so far.
    pub(crate) injected: AtomicUsize,
    /// Delta commit entries stored whose answer was lost.
    pub(crate) commits_answer_lost: AtomicUsize,
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
        let opts = if self.ignore_conditions {
            Default::default()
        } else {
            opts
        };
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
