//! The lake root and its Delta tables: locating, opening, and appending with an application
//! transaction so that a replayed append is recognised.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use deltalake::DeltaTable;
use deltalake::arrow::array::{RecordBatch, StringArray};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel as _;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, StructType, Transaction};
use deltalake::logstore::object_store::ObjectStoreExt as _;
use deltalake::parquet::basic::{Compression, Encoding, ZstdLevel};
use deltalake::parquet::file::properties::EnabledStatistics;
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::parquet::schema::types::ColumnPath;
use deltalake::protocol::{DeltaOperation, SaveMode};
use tarn_core::contract::{DAY, RECEIVED_AT};
use tarn_core::{DatasetSpec, FieldType};

use crate::datafile::{FileSet, group_by_partition, sync_files};
use crate::store::{Remote, S3Location, S3Settings};
use crate::vacuum::{DiskFile, list_data_files};
use crate::{Error, Result, io_err, sync_path};

/// The lake: its objects on the local filesystem under `root` (the default), or in a bucket
/// (`remote`), in which case `root` holds only what this process keeps for itself (query
/// history and scan counts, rollup state, local tier directories).
#[derive(Debug, Clone)]
pub struct Lake {
    root: PathBuf,
    remote: Option<Remote>,
    /// For a lake in a bucket: a tag of this process's start, in the names of the raw
    /// objects and data files it writes, so that two processes never overwrite each other's
    /// objects (a bucket has no exclusive create for data).
    writer: Option<String>,
    /// Tables of a remote lake known to have a commit: a table, once created, is never
    /// removed from the bucket (a new major version is refused on a remote lake).
    known: Arc<Mutex<HashSet<String>>>,
    /// Per dataset: held shared while data files are written and committed (curate,
    /// compaction), exclusively while a day's directory moves between tiers.
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>>,
}

impl Lake {
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        std::fs::create_dir_all(root.join("raw")).map_err(io_err(&root))?;
        std::fs::create_dir_all(root.join("tables")).map_err(io_err(&root))?;
        let root = root.canonicalize().map_err(io_err(&root))?;
        Ok(Self {
            root,
            remote: None,
            writer: None,
            known: Arc::default(),
            locks: Arc::default(),
        })
    }

    /// A lake in a bucket, with `local` for this process's own files. Refused, with the
    /// reason, when the bucket cannot be written or does not honour conditional puts (see
    /// [`crate::store::probe`]).
    pub async fn open_s3(local: impl AsRef<Path>, location: S3Location, settings: &S3Settings) -> Result<Self> {
        let remote = Remote {
            store: crate::store::register_s3(settings, &location.bucket)?,
            location,
        };
        crate::store::probe(&remote).await?;
        Self::in_bucket(local.as_ref(), remote)
    }

    /// A lake in a bucket served by `store` (a test's own), without the probe.
    #[cfg(test)]
    pub(crate) fn with_bucket_store(
        local: impl AsRef<Path>,
        location: S3Location,
        store: Arc<dyn deltalake::ObjectStore>,
    ) -> Result<Self> {
        crate::store::register_s3_store(&location.bucket, store.clone());
        Self::in_bucket(local.as_ref(), Remote { location, store })
    }

    /// A lake in `remote`, with `local` (created if needed) for this process's own files.
    fn in_bucket(local: &Path, remote: Remote) -> Result<Self> {
        std::fs::create_dir_all(local).map_err(io_err(local))?;
        let root = local.canonicalize().map_err(io_err(local))?;
        Ok(Self {
            root,
            remote: Some(remote),
            writer: Some(writer_tag()),
            known: Arc::default(),
            locks: Arc::default(),
        })
    }

    /// The path of a raw object relative to the lake (see [`crate::raw::object_path`]); in a
    /// bucket it carries this process's writer tag.
    pub fn raw_path(&self, dataset: &str, shard: u32, first: u64, last: u64) -> String {
        let path = crate::raw::object_path(dataset, shard, first, last);
        match &self.writer {
            Some(w) => path.replace(".arrow", &format!("-{w}.arrow")),
            None => path,
        }
    }

    /// This process's writer tag in a bucket (see `writer`).
    pub fn writer(&self) -> Option<&str> {
        self.writer.as_deref()
    }

    /// Records which stream feeds a lake in a bucket, or checks it is this one: the raw
    /// objects, data files and curate's application transactions are named by stream sequence,
    /// so two streams (two embedded logs, two NATS namespaces) writing one lake would skip or
    /// overwrite each other's rows. Refused, saying which stream the lake has, when another.
    pub async fn claim_stream(&self, identity: &str) -> Result<()> {
        let Some(r) = &self.remote else { return Ok(()) };
        let key = r.key("_tarn/stream");
        let opts = deltalake::logstore::object_store::PutOptions {
            mode: deltalake::logstore::object_store::PutMode::Create,
            ..Default::default()
        };
        let store_err = |e| Error::Store {
            what: format!("recording the stream at {key}"),
            source: e,
        };
        match r.store.put_opts(&key, identity.to_string().into(), opts).await {
            Ok(_) => return Ok(()),
            Err(deltalake::ObjectStoreError::AlreadyExists { .. }) => {}
            Err(e) => return Err(store_err(e)),
        }
        let body = async { r.store.get(&key).await?.bytes().await }
            .await
            .map_err(store_err)?;
        let theirs = String::from_utf8_lossy(&body);
        if theirs == identity {
            return Ok(());
        }
        Err(Error::Refused(format!(
            "the lake at {} is fed by the stream {theirs}, and one lake takes one stream (this process's is \
             {identity}): start it on that stream, or give it a lake of its own",
            r.location.url()
        )))
    }

    /// The bucket and prefix of a remote lake; `None` for a lake on the local disk.
    pub fn remote(&self) -> Option<&Remote> {
        self.remote.as_ref()
    }

    /// Refuses an operation that needs the lake's files on the local disk.
    pub fn require_local(&self, what: &str) -> Result<()> {
        match &self.remote {
            None => Ok(()),
            Some(r) => Err(Error::Refused(format!(
                "{what} is not available on a lake in a bucket ({}) yet",
                r.location.url()
            ))),
        }
    }

    /// Where the lake is, for messages: its directory or its `s3://` URL.
    pub fn describe(&self) -> String {
        match &self.remote {
            None => self.root.display().to_string(),
            Some(r) => r.location.url().to_string(),
        }
    }

    fn lock_of(&self, dataset: &str) -> Arc<tokio::sync::RwLock<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(dataset.to_string()).or_default().clone()
    }

    /// Held while writing a dataset's data files and committing them.
    pub async fn writing(&self, dataset: &str) -> tokio::sync::OwnedRwLockReadGuard<()> {
        self.lock_of(dataset).read_owned().await
    }

    /// Held while moving a dataset's files between directories.
    pub async fn moving(&self, dataset: &str) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.lock_of(dataset).write_owned().await
    }

    /// The lake's local directory: the whole lake, or for a lake in a bucket, this process's
    /// own files.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of a dataset's Delta table. The name was checked by `tarn_core::name`.
    pub fn table_dir(&self, dataset: &str) -> PathBuf {
        self.root.join("tables").join(dataset)
    }

    /// The prefix of a table's file paths as the query engine's object store sees them (no
    /// leading `/`, a trailing one), to attribute scanned files to datasets.
    pub fn table_prefix(&self, dataset: &str) -> String {
        match &self.remote {
            Some(r) => format!("{}tables/{dataset}/", r.location.prefix),
            None => format!("{}/", self.table_dir(dataset).to_string_lossy().trim_start_matches('/')),
        }
    }

    pub fn table_url(&self, dataset: &str) -> Result<url::Url> {
        if let Some(r) = &self.remote {
            return r
                .location
                .url()
                .join(&format!("tables/{dataset}/"))
                .map_err(|e| Error::Internal(format!("table URL of {dataset}: {e}")));
        }
        let dir = self.table_dir(dataset);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        url::Url::from_directory_path(&dir).map_err(|_| Error::Internal(format!("no file URL for {}", dir.display())))
    }

    /// Opens a dataset's table; an absent table comes back uninitialised (version `None`).
    pub async fn open_table(&self, dataset: &str) -> Result<DeltaTable> {
        let url = self.table_url(dataset)?;
        let err = crate::delta_err(dataset);
        if !self.has_table(dataset).await? {
            // Loading a table that has no commit yet only logs errors; build it unloaded.
            return deltalake::DeltaTableBuilder::from_url(url)
                .and_then(|b| b.build())
                .map_err(err);
        }
        DeltaTable::try_from_url(url).await.map_err(err)
    }

    /// Whether a dataset's table has at least one commit. For a lake in a bucket this is what
    /// this process has seen (see [`Lake::has_table`], which asks the bucket).
    pub fn table_exists(&self, dataset: &str) -> bool {
        match &self.remote {
            None => self.table_dir(dataset).join("_delta_log").is_dir(),
            Some(_) => self.known.lock().unwrap_or_else(|e| e.into_inner()).contains(dataset),
        }
    }

    /// Whether a dataset's table has at least one commit, asking the bucket of a remote lake
    /// when this process has not seen the table yet (another process may have created it).
    pub async fn has_table(&self, dataset: &str) -> Result<bool> {
        let Some(r) = &self.remote else {
            return Ok(self.table_exists(dataset));
        };
        if self.table_exists(dataset) {
            return Ok(true);
        }
        use futures::StreamExt as _;
        let prefix = r.key(&format!("tables/{dataset}/_delta_log/"));
        let first = r.store.list(Some(&prefix)).next().await;
        match first {
            None => Ok(false),
            Some(Err(e)) => Err(Error::Store {
                what: format!("listing {prefix}"),
                source: e,
            }),
            Some(Ok(_)) => {
                self.known_table(dataset);
                Ok(true)
            }
        }
    }

    fn known_table(&self, dataset: &str) {
        if self.remote.is_some() {
            self.known
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(dataset.to_string());
        }
    }

    /// Every data file of a dataset's table that is stored, referenced or not (not the log,
    /// nor tarn's own `_`/`.` names), with paths relative to the table.
    pub async fn data_files(&self, dataset: &str) -> Result<Vec<DiskFile>> {
        let Some(r) = &self.remote else {
            let dir = self.table_dir(dataset);
            return tokio::task::spawn_blocking(move || list_data_files(&dir))
                .await
                .map_err(|e| Error::Internal(format!("listing task: {e}")))?;
        };
        let prefix = format!("tables/{dataset}/");
        let table_key = format!("{}{prefix}", r.location.prefix);
        let mut out: Vec<DiskFile> = self
            .list_remote(r, &prefix)
            .await?
            .into_iter()
            .filter_map(|m| {
                let rel = m.location.as_ref().strip_prefix(&table_key)?;
                let data =
                    rel.ends_with(".parquet") && !rel.split('/').any(|s| s.starts_with('_') || s.starts_with('.'));
                data.then(|| DiskFile {
                    path: rel.to_string(),
                    bytes: m.size,
                    modified_ms: m.last_modified.timestamp_millis(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// (objects, bytes) of a dataset's raw zone.
    pub async fn raw_usage(&self, dataset: &str) -> Result<(usize, u64)> {
        let Some(r) = &self.remote else {
            let dir = self.root.join("raw").join(dataset);
            return tokio::task::spawn_blocking(move || crate::storage::dir_usage(&dir))
                .await
                .map_err(|e| Error::Internal(format!("listing task: {e}")));
        };
        let all = self.list_remote(r, &format!("raw/{dataset}/")).await?;
        Ok((all.len(), all.iter().map(|m| m.size).sum()))
    }

    /// Deletes data files of a dataset's table (paths relative to it); one already gone is
    /// no error.
    pub async fn delete_data_files(&self, dataset: &str, paths: Vec<String>) -> Result<()> {
        let Some(r) = &self.remote else {
            let dir = self.table_dir(dataset);
            return tokio::task::spawn_blocking(move || crate::vacuum::delete_local_files(&dir, &paths))
                .await
                .map_err(|e| Error::Internal(format!("vacuum task: {e}")))?;
        };
        for rel in paths {
            let key = r.key(&format!("tables/{dataset}/{rel}"));
            match r.store.delete(&key).await {
                Ok(()) | Err(deltalake::ObjectStoreError::NotFound { .. }) => {}
                Err(e) => {
                    return Err(Error::Store {
                        what: format!("deleting {key}"),
                        source: e,
                    });
                }
            }
        }
        Ok(())
    }

    pub(crate) async fn list_remote(&self, r: &Remote, rel_prefix: &str) -> Result<Vec<deltalake::ObjectMeta>> {
        use futures::TryStreamExt as _;
        let prefix = r.key(rel_prefix);
        r.store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| Error::Store {
                what: format!("listing {prefix}"),
                source: e,
            })
    }

    /// Writes a raw object (see [`crate::raw`]) at `rel`: on the local disk synced and renamed
    /// into place, in a bucket in one put. Returns its size.
    pub async fn write_raw(&self, rel: &str, batches: Vec<RecordBatch>) -> Result<u64> {
        let root = self.root.clone();
        let rel_owned = rel.to_string();
        let remote = self.remote.clone();
        let encoded = tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>> {
            match remote {
                None => crate::raw::write_object(&root, &rel_owned, &batches).map(|_| None),
                Some(_) => crate::raw::encode_object(Vec::new(), &batches).map(Some),
            }
        })
        .await
        .map_err(|e| Error::Internal(format!("raw writer task: {e}")))??;
        let Some(body) = encoded else {
            let path = self.root.join(rel);
            return Ok(std::fs::metadata(&path).map_err(io_err(&path))?.len());
        };
        let Some(r) = &self.remote else {
            return Err(Error::Internal("a remote body without a remote lake".into()));
        };
        let size = body.len() as u64;
        let key = r.key(rel);
        r.store.put(&key, body.into()).await.map_err(|e| Error::Store {
            what: format!("writing {key}"),
            source: e,
        })?;
        Ok(size)
    }

    /// Reads a raw object back (see [`crate::raw::read_object`]).
    pub async fn read_raw(&self, rel: &str) -> Result<Vec<RecordBatch>> {
        crate::raw::check_rel(rel)?;
        let Some(r) = &self.remote else {
            let root = self.root.clone();
            let rel = rel.to_string();
            return tokio::task::spawn_blocking(move || crate::raw::read_object(&root, &rel))
                .await
                .map_err(|e| Error::Internal(format!("raw reader task: {e}")))?;
        };
        let key = r.key(rel);
        let body = async { r.store.get(&key).await?.bytes().await }
            .await
            .map_err(|e| Error::Store {
                what: format!("reading {key}"),
                source: e,
            })?;
        let rel = rel.to_string();
        tokio::task::spawn_blocking(move || crate::raw::decode_object(&rel, std::io::Cursor::new(body)))
            .await
            .map_err(|e| Error::Internal(format!("raw reader task: {e}")))?
    }

    /// Creates a dataset's (empty) table from its contract if it has none yet, so that it
    /// answers queries before its first event. Returns whether it was created.
    pub async fn create_table(&self, spec: &DatasetSpec) -> Result<bool> {
        if self.has_table(&spec.name).await? {
            return Ok(false);
        }
        // Exclusive: curate's first append would create the table too.
        let _moving = self.moving(&spec.name).await;
        let table = self.open_table(&spec.name).await?;
        let empty = RecordBatch::new_empty(tarn_collector::arrow_schema(spec));
        let table = ensure_created(table, spec, &empty).await?;
        if let Some(dir) = local_dir_of(&table) {
            tokio::task::spawn_blocking(move || sync_log_tail(&dir, 1))
                .await
                .map_err(|e| Error::Internal(format!("sync task: {e}")))??;
        }
        self.known_table(&spec.name);
        Ok(true)
    }

    /// Adds the contract's fields that the table lacks as nullable columns (one commit, with
    /// the dataset's writers held off), so that a field added to a contract is queryable at once.
    /// Returns how many columns were added; a table without commits is left to its first
    /// append.
    pub async fn add_columns(&self, spec: &DatasetSpec) -> Result<usize> {
        if !self.has_table(&spec.name).await? {
            return Ok(0);
        }
        // Exclusive: a metadata commit beside curate's append would fail one of them.
        let _moving = self.moving(&spec.name).await;
        let mut table = self.open_table(&spec.name).await?;
        let target = tarn_collector::arrow_schema(spec);
        ensure_columns(&mut table, spec, &target).await
    }
}

/// Rows of `batch` in the layout of `target`: columns matched by name, a field the batch lacks
/// (added to the contract after it was written) filled with nulls. A column of another type,
/// or one `target` does not hold, is an error: contracts change only by adding fields.
pub fn conform(batch: &RecordBatch, target: &deltalake::arrow::datatypes::SchemaRef) -> Result<RecordBatch> {
    if batch.schema().fields() == target.fields() {
        return Ok(batch.clone());
    }
    let schema = batch.schema();
    for f in schema.fields() {
        if target.field_with_name(f.name()).is_err() {
            return Err(Error::Corrupt {
                what: format!("a batch with column {}", f.name()),
                reason: "the contract in force has no such field".into(),
            });
        }
    }
    let mut columns = Vec::with_capacity(target.fields().len());
    for f in target.fields() {
        match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => columns.push(c.clone()),
            Some(c) => {
                return Err(Error::Corrupt {
                    what: format!("column {}", f.name()),
                    reason: format!("written as {} but the contract says {}", c.data_type(), f.data_type()),
                });
            }
            None => columns.push(deltalake::arrow::array::new_null_array(f.data_type(), batch.num_rows())),
        }
    }
    RecordBatch::try_new(target.clone(), columns).map_err(|e| Error::Internal(format!("conforming a batch: {e}")))
}

/// Commits the columns of `target` that `table` lacks, as nullable columns at the end.
async fn ensure_columns(
    table: &mut DeltaTable,
    spec: &DatasetSpec,
    target: &deltalake::arrow::datatypes::Schema,
) -> Result<usize> {
    use deltalake::kernel::MetadataExt as _;
    let err = crate::delta_err(&spec.name);
    let snapshot = table.snapshot().map_err(err)?;
    let current = snapshot.schema();
    let missing: Vec<deltalake::arrow::datatypes::Field> = target
        .fields()
        .iter()
        .filter(|f| current.field(f.name()).is_none())
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    if missing.is_empty() {
        return Ok(0);
    }
    let added: StructType = (&deltalake::arrow::datatypes::Schema::new(missing))
        .try_into_kernel()
        .map_err(|e| Error::Internal(format!("schema of {}: {e}", spec.name)))?;
    let merged = StructType::try_new(current.fields().cloned().chain(added.fields().cloned()))
        .map_err(|e| Error::Internal(format!("schema of {}: {e}", spec.name)))?;
    let metadata = snapshot
        .metadata()
        .clone()
        .with_schema(&merged)
        .map_err(|e| Error::Internal(format!("schema of {}: {e}", spec.name)))?;
    let fields: Vec<_> = added.fields().cloned().collect();
    let n = fields.len();
    let op = DeltaOperation::AddColumn { fields };
    commit_actions(
        table,
        &spec.name,
        vec![Action::Metadata(metadata)],
        op,
        CommitProperties::default(),
    )
    .await?;
    tracing::info!(dataset = %spec.name, columns = n, "table columns added from the contract");
    Ok(n)
}

/// The application id under which curate records its progress for one dataset shard.
pub fn curate_app_id(dataset: &str, shard: u32) -> String {
    format!("tarn-curate/{dataset}/{shard}")
}

/// The last version committed under `app_id`, or -1.
pub async fn app_version(table: &DeltaTable, dataset: &str, app_id: &str) -> Result<i64> {
    if table.version().is_none() {
        return Ok(-1);
    }
    let snap = table.snapshot().map_err(crate::delta_err(dataset))?;
    let v = snap
        .transaction_version(table.log_store().as_ref(), app_id)
        .await
        .map_err(crate::delta_err(dataset))?;
    Ok(v.unwrap_or(-1))
}

/// Rows in one Parquet row group at most.
const ROW_GROUP_ROWS_MAX: usize = 128 * 1024;

/// Parquet settings of curated files: zstd (level 1 for `small` files, which compaction
/// rewrites at level 3 later; level 3 otherwise); statistics per column chunk, except in `small`
/// files, whose bounds the Delta log's statistics already hold (files are pruned on those), so
/// Parquet's copy in every footer only made them bigger (page-level indexes too); a `small` file
/// that spans several row groups turns them back on (`FileSet::write`). A dictionary only for
/// the columns whose values repeat (a string column when, in a sample of the rows, fewer than
/// half of its values are distinct; an integer column when fewer than a tenth are); and for the
/// rest an encoding that suits the type: delta encoding for timestamps and integers (rows are in
/// event-time or arrival order, so the deltas are small; `_received_at` too), plain values for
/// floats and strings. Event ids never get a dictionary. Strings without one (ids, URLs) get no
/// Parquet statistics: their bounds are in the Delta log already, and in a footer repeated in
/// every small file they cost more than they prune. `small` files (curate's, one per partition
/// and commit) also skip the offset index, which only helps files of many pages.
pub fn writer_properties(spec: &DatasetSpec, batches: &[RecordBatch], small: bool) -> WriterProperties {
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(if small { 1 } else { 3 }).unwrap_or_default(),
        ))
        .set_statistics_enabled(if small {
            EnabledStatistics::None
        } else {
            EnabledStatistics::Chunk
        })
        .set_offset_index_disabled(small)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS_MAX))
        .set_column_dictionary_enabled(ColumnPath::from(RECEIVED_AT), false)
        .set_column_encoding(ColumnPath::from(RECEIVED_AT), Encoding::DELTA_BINARY_PACKED);
    for f in &spec.fields {
        let path = || ColumnPath::from(f.name.clone());
        let encoding = match f.ty {
            FieldType::Float64 => Some(Encoding::PLAIN),
            FieldType::Timestamp => Some(Encoding::DELTA_BINARY_PACKED),
            FieldType::Int64 if distinct_share(batches, &f.name) >= 0.1 => Some(Encoding::DELTA_BINARY_PACKED),
            FieldType::String | FieldType::Json
                if f.name == spec.event_id || distinct_share(batches, &f.name) >= 0.5 =>
            {
                b = b.set_column_statistics_enabled(path(), EnabledStatistics::None);
                Some(Encoding::PLAIN)
            }
            _ => None,
        };
        if let Some(e) = encoding {
            b = b
                .set_column_dictionary_enabled(path(), false)
                .set_column_encoding(path(), e);
        }
    }
    b.build()
}

/// The share of distinct values among the first 4,096 non-null values of a string or
/// integer column across `batches`; 1 when there are none.
fn distinct_share(batches: &[RecordBatch], column: &str) -> f64 {
    use deltalake::arrow::array::Int64Array;
    let mut strings = std::collections::HashSet::new();
    let mut ints = std::collections::HashSet::new();
    let mut n = 0usize;
    for c in batches.iter().filter_map(|b| b.column_by_name(column)) {
        if let Some(c) = c.as_any().downcast_ref::<StringArray>() {
            for v in c.iter().flatten().take(4096 - n) {
                strings.insert(v);
                n += 1;
            }
        } else if let Some(c) = c.as_any().downcast_ref::<Int64Array>() {
            for v in c.iter().flatten().take(4096 - n) {
                ints.insert(v);
                n += 1;
            }
        }
        if n >= 4096 {
            break;
        }
    }
    if n == 0 {
        1.0
    } else {
        (strings.len() + ints.len()) as f64 / n as f64
    }
}

/// The partition columns of a dataset's table: `day`, then the tenant field if any.
pub fn partition_columns(spec: &DatasetSpec) -> Vec<String> {
    let mut parts = vec![DAY.to_string()];
    if let Some(t) = spec.tenant() {
        parts.push(t.to_string());
    }
    parts
}

/// Creates a dataset's table from the Arrow schema of its rows, if it has no commit yet.
async fn ensure_created(table: DeltaTable, spec: &DatasetSpec, batch: &RecordBatch) -> Result<DeltaTable> {
    if table.version().is_some() {
        return Ok(table);
    }
    let err = crate::delta_err(&spec.name);
    let schema: StructType = batch
        .schema()
        .as_ref()
        .try_into_kernel()
        .map_err(|e| Error::Internal(format!("schema of {}: {e}", spec.name)))?;
    table
        .create()
        .with_columns(schema.fields().cloned())
        .with_partition_columns(partition_columns(spec))
        .with_save_mode(SaveMode::Ignore)
        .await
        .map_err(err)
}

/// How many threads write the files of one commit.
fn write_threads(partitions: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.clamp(1, 4).min(partitions.max(1))
}

/// Appends batches in one commit that also records the application transaction
/// `(curate_app_id(dataset, shard), version)`. Each partition's rows become one Parquet file,
/// written by a few threads and synced 16 at a time; the commit lists their `Add` actions with
/// statistics, and its log entry and directory are synced before this returns.
pub async fn append(
    table: DeltaTable,
    spec: &DatasetSpec,
    batches: Vec<RecordBatch>,
    shard: u32,
    version: i64,
) -> Result<DeltaTable> {
    let stream = spec.name.clone();
    append_as(table, spec, &stream, batches, shard, version, None).await
}

/// [`append`] of rows from the stream of dataset `stream` (which differs from `spec.name` for
/// the table of an earlier major version): the application transaction is the stream's.
/// `writer` tags the file names (a lake in a bucket: see `Lake::writer`).
pub async fn append_as(
    table: DeltaTable,
    spec: &DatasetSpec,
    stream: &str,
    batches: Vec<RecordBatch>,
    shard: u32,
    version: i64,
    writer: Option<&str>,
) -> Result<DeltaTable> {
    let writer = writer.map(str::to_string);
    let dataset = spec.name.clone();
    let target = tarn_collector::arrow_schema(spec);
    let batches = batches
        .iter()
        .map(|b| conform(b, &target))
        .collect::<Result<Vec<_>>>()?;
    let Some(first) = batches.first() else {
        return Err(Error::Internal("an append needs at least one batch".into()));
    };
    let mut table = ensure_created(table, spec, first).await?;
    ensure_columns(&mut table, spec, &target).await?;
    let table_dir = local_dir_of(&table);
    let started = std::time::Instant::now();
    let spec_w = spec.clone();
    let dir = table_dir.clone();
    let written = tokio::task::spawn_blocking(move || -> Result<Vec<(Action, Option<Vec<u8>>)>> {
        let table_dir = dir;
        let t0 = std::time::Instant::now();
        let parts = group_by_partition(&spec_w, &batches)?;
        let group_ms = t0.elapsed().as_millis() as u64;
        let files = FileSet {
            table_dir: table_dir.as_deref(),
            writer: writer.as_deref(),
            spec: &spec_w,
            props: writer_properties(&spec_w, &batches, true),
            shard,
            version,
        };
        let next = AtomicUsize::new(0);
        let out = Mutex::new(Vec::with_capacity(parts.len()));
        let failed = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..write_threads(parts.len()) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(p) = parts.get(i) else { return };
                        match files.write(&batches, p) {
                            Ok((add, body)) => out
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((Action::Add(add), body)),
                            Err(e) => {
                                failed.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                                next.store(parts.len(), Ordering::Relaxed);
                                return;
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        let written = out.into_inner().unwrap_or_else(|e| e.into_inner());
        let Some(table_dir) = table_dir else {
            return Ok(written);
        };
        let paths: Vec<&str> = written
            .iter()
            .filter_map(|(a, _)| match a {
                Action::Add(a) => Some(a.path.as_str()),
                _ => None,
            })
            .collect();
        let t1 = std::time::Instant::now();
        sync_files(&table_dir, &paths)?;
        tracing::debug!(
            group_ms,
            write_ms = (t1 - t0).as_millis() as u64 - group_ms,
            sync_ms = t1.elapsed().as_millis() as u64,
            "data files written and synced"
        );
        Ok(written)
    })
    .await
    .map_err(|e| Error::Internal(format!("writer task: {e}")))??;
    let adds = upload(&table, &dataset, written).await?;
    let files = adds.len();
    let write_ms = started.elapsed().as_millis() as u64;
    let app_id = curate_app_id(stream, shard);
    let props = CommitProperties::default().with_application_transaction(Transaction::new(&app_id, version));
    let op = DeltaOperation::Write {
        mode: SaveMode::Append,
        partition_by: Some(partition_columns(spec)),
        predicate: None,
    };
    let version_committed = commit_actions(&mut table, &dataset, adds, op, props).await?;
    tracing::debug!(dataset, files, write_ms, version = version_committed, "appended");
    Ok(table)
}

/// A tag of this process's start: 8 hex digits from the clock and the process id.
fn writer_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in nanos.to_le_bytes().into_iter().chain(std::process::id().to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{:08x}", h as u32)
}

/// How many files of one commit are uploaded at once to a bucket.
const UPLOADS_AT_ONCE: usize = 8;

/// Uploads the files a commit will list to a table in a bucket (each in one put, which is
/// durable when it returns); files already on the local disk pass through. A failed upload
/// fails the commit; files it uploaded before are left to vacuum (their names are reused by
/// the retry of the same commit).
async fn upload(table: &DeltaTable, dataset: &str, written: Vec<(Action, Option<Vec<u8>>)>) -> Result<Vec<Action>> {
    use futures::{StreamExt as _, TryStreamExt as _};
    let store = table.log_store().object_store(None);
    futures::stream::iter(written)
        .map(|(action, body)| {
            let store = store.clone();
            async move {
                if let (Some(body), Action::Add(add)) = (body, &action) {
                    let key = deltalake::Path::from(add.path.as_str());
                    store.put(&key, body.into()).await.map_err(|e| Error::Store {
                        what: format!("writing {} of {dataset}", add.path),
                        source: e,
                    })?;
                }
                Ok::<_, Error>(action)
            }
        })
        .buffer_unordered(UPLOADS_AT_ONCE)
        .try_collect()
        .await
}

/// Commits `actions` on top of the table's snapshot and returns the version it landed at.
/// `Error::Conflict` means the commit did not land (another writer won, or its entry could not
/// be written), so what it would have added may be deleted; any other error comes after it
/// landed. Once the entry is written it is synced at once, before delta-rs's post-commit work
/// (checkpoints, log cleanup), whose failure is only logged: the commit stands either way. The
/// table is brought up to the new version.
pub async fn commit_actions(
    table: &mut DeltaTable,
    dataset: &str,
    actions: Vec<Action>,
    op: DeltaOperation,
    props: CommitProperties,
) -> Result<u64> {
    let delta_err = crate::delta_err(dataset);
    let dir = local_dir_of(table);
    let snapshot = table.snapshot().map_err(delta_err)?;
    let not_landed = |e: deltalake::DeltaTableError| Error::Conflict(format!("commit to {dataset} did not land: {e}"));
    let post = CommitBuilder::from(props)
        .with_actions(actions)
        .build(Some(snapshot), table.log_store(), op)
        .into_prepared_commit_future()
        .await
        .map_err(not_landed)?
        .await
        .map_err(not_landed)?;
    let version = post.version;
    if let Some(dir) = &dir {
        sync_commit(dir, version)?;
    }
    if let Err(e) = post.await {
        tracing::warn!(dataset, version, error = %e, "post-commit work failed; the commit stands");
    }
    table.update_incremental(Some(version)).await.map_err(delta_err)?;
    Ok(version)
}

/// Syncs the newest `n` commit entries and the log directory: after a failure, rows found
/// already committed may belong to an entry whose sync never ran.
pub fn sync_log_tail(table_dir: &Path, n: usize) -> Result<()> {
    let log_dir = table_dir.join("_delta_log");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&log_dir)
        .map_err(io_err(&log_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    entries.sort();
    for e in entries.iter().rev().take(n) {
        sync_path(e)?;
    }
    sync_path(&log_dir)
}

/// The local directory of a table; `None` for a table in a bucket, where a put is durable
/// when it returns and nothing needs syncing.
pub(crate) fn local_dir_of(table: &DeltaTable) -> Option<PathBuf> {
    let url = table.table_url();
    if url.scheme() == "file" {
        url.to_file_path().ok()
    } else {
        None
    }
}

/// The local directory of a table.
pub(crate) fn table_dir_of(table: &DeltaTable) -> Result<PathBuf> {
    table
        .table_url()
        .to_file_path()
        .map_err(|_| Error::Internal(format!("{} is not a local table", table.table_url())))
}

/// Makes a commit durable: the local log store writes the entry without syncing it, so the
/// entry and the log directory are synced here, before anyone acts on the commit.
pub fn sync_commit(table_dir: &Path, version: u64) -> Result<()> {
    let log_dir = table_dir.join("_delta_log");
    sync_path(&log_dir.join(format!("{version:020}.json")))?;
    sync_path(&log_dir)
}
