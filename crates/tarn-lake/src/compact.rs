//! The compaction executor: reads the table's files, asks the planner ([`crate::compaction`])
//! which to merge, writes each bin as one new file by streaming its input files batch by batch
//! (memory stays at a few batches, whatever the bin's size), and swaps each partition's files in
//! one Delta commit (`OPTIMIZE`: removes and adds with `dataChange = false`).
//!
//! One compaction runs per table at a time: delta-rs does not treat two commits that remove the
//! same file with `dataChange = false` as a conflict, so two compactions of one partition could
//! both land and double its rows. Within one data directory an exclusive lock on
//! `_tarn_compaction.lock` in the (local) table directory serialises them. Across processes, on
//! a disk or in a bucket, every compaction commit also carries the application transaction
//! `tarn-compact/<dataset>`: delta-rs refuses a commit whose application id a concurrent commit
//! also wrote, so of two compactions racing to commit one fails with a conflict. Before
//! committing, a run also checks that its inputs are still active at the newest version, which
//! catches a compaction that committed earlier and narrows the window against engines outside
//! tarn.
//!
//! A table in a bucket is compacted through a local staging directory: a bin's inputs are
//! downloaded, the bin is written beside them as on a disk, and the new file is uploaded
//! (multipart past 16 MiB); memory stays as bounded as on a disk, the staging directory holds
//! one bin at a time.
//!
//! Safety beside ingestion and queries: appends only add files, so a concurrent append never
//! conflicts with a compaction commit (delta-rs rebases it); the removed files stay on disk
//! until vacuum, so a query that planned against the old version still reads them. A commit that
//! fails is counted as a conflict and its new files are deleted (in a bucket they are left to
//! vacuum: a commit whose answer was lost may have landed after all); its partitions are planned
//! again from the newest version and retried (a few passes), then left for the next run. The planner never proposes a bin of one file, so a compacted partition is not
//! rewritten again until new small files arrive.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use deltalake::DeltaTable;
use deltalake::arrow::array::{RecordBatch, new_null_array};
use deltalake::arrow::compute::{CastOptions, cast_with_options};
use deltalake::arrow::datatypes::SchemaRef;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::{Action, Remove, Transaction};
use deltalake::logstore::object_store::ObjectStoreExt as _;
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake::protocol::DeltaOperation;
use serde::Serialize;
use tarn_core::DatasetSpec;

use crate::compaction::{Bin, CompactionRules, FileInfo, Partition, plan};
use crate::datafile::{file_schema, new_add, sync_files, write_parquet};
use crate::table::{commit_actions, table_dir_of, writer_properties};
use crate::{Error, Lake, Result, delta_err, io_err};

/// The lock file a compaction holds on its table (Delta readers ignore names starting with `_`).
pub const LOCK_FILE: &str = "_tarn_compaction.lock";

/// The local directory, in the table's local directory, where a table in a bucket is compacted.
const STAGING_DIR: &str = "_tarn_staging";

/// Most partitions swapped by one compaction commit.
const PARTITIONS_PER_COMMIT: usize = 64;

/// Rows per batch when streaming input files.
const READ_BATCH_ROWS: usize = 8_192;

/// What to compact.
#[derive(Debug, Clone, Default)]
pub struct CompactOptions {
    pub rules: CompactionRules,
    /// Only this day's partitions.
    pub day: Option<String>,
    /// Plan only.
    pub dry_run: bool,
}

/// Progress of one run, reported after every bin.
#[derive(Debug, Clone, Serialize)]
pub struct CompactProgress {
    pub dataset: String,
    pub bins_done: usize,
    pub bins_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// One planned bin, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct BinReport {
    pub partition: String,
    pub files: usize,
    pub bytes: u64,
    pub rows: u64,
}

/// What a run did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompactReport {
    pub dataset: String,
    pub dry_run: bool,
    /// Files in the table (within the day filter) before the run.
    pub files_before: usize,
    pub partitions: usize,
    pub bins: Vec<BinReport>,
    pub files_removed: usize,
    pub files_added: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub rows: u64,
    pub commits: usize,
    /// Partitions whose commit failed (left for the next run).
    pub conflicts: usize,
    pub seconds: f64,
}

/// The files of a table as the planner sees them; partitions in partition-column order.
pub fn table_files(table: &DeltaTable, spec: &DatasetSpec) -> Result<Vec<FileInfo>> {
    if table.version().is_none() {
        return Ok(Vec::new());
    }
    let snap = table.snapshot().map_err(delta_err(&spec.name))?;
    let cols = crate::table::partition_columns(spec);
    let mut out = Vec::new();
    for f in snap.log_data().iter() {
        let values = f.partition_values_map();
        let partition = cols
            .iter()
            .map(|c| (c.clone(), values.get(c).cloned().flatten().unwrap_or_default()))
            .collect();
        out.push(FileInfo {
            path: f.path().into_owned(),
            partition,
            size_bytes: u64::try_from(f.size()).unwrap_or(0),
            rows: f.num_records().unwrap_or(0) as u64,
            modified_ms: f.modification_time(),
        });
    }
    Ok(out)
}

/// A path from the Delta log, checked to stay inside the table directory.
fn data_path(table_dir: &Path, rel: &str) -> Result<PathBuf> {
    let p = Path::new(rel);
    if p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(Error::Corrupt {
            what: format!("data file {rel}"),
            reason: "path leaves the table directory".into(),
        });
    }
    Ok(table_dir.join(p))
}

/// Reads a data file batch by batch, aligned to `schema` by column name: a column the file
/// lacks (added after it was written) comes back null, a narrower type is cast.
fn read_aligned(path: PathBuf, schema: SchemaRef) -> Result<impl Iterator<Item = Result<RecordBatch>>> {
    let file = std::fs::File::open(&path).map_err(io_err(&path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.with_batch_size(READ_BATCH_ROWS).build())
        .map_err(|e| Error::Corrupt {
            what: path.display().to_string(),
            reason: e.to_string(),
        })?;
    Ok(reader.map(move |b| align(&b?, &schema)))
}

/// A batch aligned to `schema` by column name: a missing column comes back null, another
/// type is cast (failing rather than nulling a value that does not fit).
fn align(b: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let cols = schema
        .fields()
        .iter()
        .map(|f| match b.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => Ok(cast_with_options(
                c,
                f.data_type(),
                &CastOptions {
                    safe: false,
                    ..CastOptions::default()
                },
            )?),
            None => Ok(new_null_array(f.data_type(), b.num_rows())),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

/// Memory a sorting compaction may use before it spills to disk.
const SORT_MEMORY_BYTES: usize = 256 << 20;

/// The rows of `inputs` sorted by `sort_by` (ascending, nulls first), streamed: DataFusion's
/// external sort, limited to [`SORT_MEMORY_BYTES`] and spilling beyond it.
async fn sorted_rows(
    inputs: &[PathBuf],
    schema: &SchemaRef,
    sort_by: &[String],
    tx: tokio::sync::mpsc::Sender<Result<RecordBatch>>,
) -> Result<()> {
    use deltalake::datafusion::execution::runtime_env::RuntimeEnvBuilder;
    use deltalake::datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext, col};
    use futures::StreamExt;
    let df_err =
        |e: deltalake::datafusion::error::DataFusionError| Error::Internal(format!("sorting for compaction: {e}"));
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_limit(SORT_MEMORY_BYTES, 1.0)
        .build_arc()
        .map_err(df_err)?;
    let ctx = SessionContext::new_with_config_rt(SessionConfig::new().with_target_partitions(1), runtime);
    let paths: Vec<String> = inputs.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let df = ctx
        .read_parquet(paths, ParquetReadOptions::default().schema(schema.as_ref()))
        .await
        .map_err(df_err)?;
    let order = sort_by
        .iter()
        .map(|c| col(format!("\"{c}\"")).sort(true, true))
        .collect();
    let mut stream = df.sort(order).map_err(df_err)?.execute_stream().await.map_err(df_err)?;
    while let Some(b) = stream.next().await {
        let b = b.map_err(df_err).and_then(|b| align(&b, schema));
        let failed = b.is_err();
        if tx.send(b).await.is_err() || failed {
            break;
        }
    }
    Ok(())
}

/// Passes over a table when commits meet conflicts: each pass plans again from the newest
/// version, so what another writer changed is not planned twice.
const CONFLICT_PASSES: usize = 3;

/// Compacts one dataset's table. Partitions whose commit met a conflict are planned again
/// from the newest version and retried, up to [`CONFLICT_PASSES`] passes in all; what still
/// conflicts is reported in `conflicts` and left for the next run.
pub async fn compact_dataset(
    lake: &Lake,
    spec: &DatasetSpec,
    opts: &CompactOptions,
    progress: &(dyn Fn(&CompactProgress) + Send + Sync),
) -> Result<CompactReport> {
    let mut total = compact_pass(lake, spec, opts, progress).await?;
    let mut passes = 1;
    while total.conflicts > 0 && passes < CONFLICT_PASSES && !opts.dry_run {
        passes += 1;
        let again = compact_pass(lake, spec, opts, progress).await?;
        total.conflicts = again.conflicts;
        total.commits += again.commits;
        total.files_removed += again.files_removed;
        total.files_added += again.files_added;
        total.bytes_read += again.bytes_read;
        total.bytes_written += again.bytes_written;
        total.rows += again.rows;
        total.bins.extend(again.bins);
        total.seconds += again.seconds;
    }
    Ok(total)
}

async fn compact_pass(
    lake: &Lake,
    spec: &DatasetSpec,
    opts: &CompactOptions,
    progress: &(dyn Fn(&CompactProgress) + Send + Sync),
) -> Result<CompactReport> {
    let started = std::time::Instant::now();
    let dataset = spec.name.as_str();
    let mut report = CompactReport {
        dataset: dataset.to_string(),
        dry_run: opts.dry_run,
        ..CompactReport::default()
    };
    if !lake.has_table(dataset).await? {
        return Ok(report);
    }
    // One compaction per table at a time in this data directory (across processes the
    // commits' application transaction fences them): delta-rs would let two of them remove
    // the same files and both add their merged copies.
    let lock_path = lake.table_dir(dataset).join(LOCK_FILE);
    let remote = lake.remote().is_some();
    let _lock = tokio::task::spawn_blocking(move || -> Result<std::fs::File> {
        if remote && let Some(dir) = lock_path.parent() {
            // A table in a bucket has a local directory only for this lock and the staging.
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        f.lock().map_err(io_err(&lock_path))?;
        // The table may have moved (a new major version) while this waited: the lock held is
        // then the old table's, not this path's.
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            let held = f.metadata().map_err(io_err(&lock_path))?;
            let now = std::fs::metadata(&lock_path).map_err(io_err(&lock_path))?;
            if (held.dev(), held.ino()) != (now.dev(), now.ino()) {
                return Err(Error::Conflict(format!(
                    "the table of {} moved while compaction waited for it; run it again",
                    lock_path.display()
                )));
            }
        }
        Ok(f)
    })
    .await
    .map_err(|e| Error::Internal(format!("lock task: {e}")))??;
    let mut table = lake.open_table(dataset).await?;
    let stage = match lake.remote() {
        None => None,
        Some(_) => {
            let dir = lake.table_dir(dataset).join(STAGING_DIR);
            // Leftovers of a run that died; the lock held makes the directory this run's.
            let d = dir.clone();
            tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&d) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&d)(e)),
                _ => Ok(()),
            })
            .await
            .map_err(|e| Error::Internal(format!("staging task: {e}")))??;
            Some(Stage {
                dir,
                store: table.log_store().object_store(None),
            })
        }
    };
    let mut files = table_files(&table, spec)?;
    if let Some(day) = &opts.day {
        files.retain(|f| f.partition.first().is_some_and(|(_, v)| v == day));
    }
    report.files_before = files.len();
    let bins = plan(&files, &opts.rules);
    let mut by_partition: Vec<(Partition, Vec<Bin>)> = Vec::new();
    for b in bins {
        match by_partition.last_mut() {
            Some((p, list)) if *p == b.partition => list.push(b),
            _ => by_partition.push((b.partition.clone(), vec![b])),
        }
    }
    report.partitions = by_partition.len();
    report.bins = by_partition
        .iter()
        .flat_map(|(_, bins)| bins.iter())
        .map(|b| BinReport {
            partition: partition_text(&b.partition),
            files: b.files.len(),
            bytes: b.bytes,
            rows: b.rows,
        })
        .collect();
    if opts.dry_run || by_partition.is_empty() {
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    let schema = table.snapshot().map_err(delta_err(dataset))?.snapshot().arrow_schema();
    let schema = file_schema(spec, &schema);
    let info: HashMap<String, FileInfo> = files.into_iter().map(|f| (f.path.clone(), f)).collect();
    let mut state = CompactProgress {
        dataset: dataset.to_string(),
        bins_done: 0,
        bins_total: report.bins.len(),
        bytes_done: 0,
        bytes_total: report.bins.iter().map(|b| b.bytes).sum(),
    };
    progress(&state);
    // Partitions are swapped in groups: each partition's files change in one commit, and one
    // commit carries up to `PARTITIONS_PER_COMMIT` partitions, so that a table of hundreds of
    // small partitions is not hundreds of commits.
    let mut groups: Vec<(usize, String, Vec<Bin>)> = Vec::new();
    for (partition, bins) in by_partition {
        match groups.last_mut() {
            Some((n, _, list)) if *n < PARTITIONS_PER_COMMIT => {
                *n += 1;
                list.extend(bins);
            }
            _ => groups.push((1, partition_text(&partition), bins)),
        }
    }
    for (n, first, bins) in groups {
        let label = if n == 1 {
            first
        } else {
            format!("{n} partitions from {first}")
        };
        let mut written = Vec::new();
        let writing = lake.writing(dataset).await;
        let step = compact_partition(
            &mut table,
            spec,
            &schema,
            &info,
            &label,
            &bins,
            opts,
            stage.as_ref(),
            &mut written,
            &mut |bin: &Bin| {
                state.bins_done += 1;
                state.bytes_done += bin.bytes;
                progress(&state);
            },
        )
        .await;
        drop(writing);
        match step {
            Ok(()) => {
                report.commits += 1;
                report.files_added += bins.len();
                report.files_removed += bins.iter().map(|b| b.files.len()).sum::<usize>();
                report.bytes_read += bins.iter().map(|b| b.bytes).sum::<u64>();
                report.bytes_written += written.iter().map(|(_, size)| size).sum::<u64>();
                report.rows += bins.iter().map(|b| b.rows).sum::<u64>();
            }
            Err(e @ Error::Conflict(_)) => {
                tracing::warn!(dataset, partitions = %label, error = %e,
                    "compaction left the partitions for the next run");
                report.conflicts += n;
                table.update_incremental(None).await.map_err(delta_err(dataset))?;
            }
            Err(e) => return Err(e),
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        dataset,
        commits = report.commits,
        files_removed = report.files_removed,
        files_added = report.files_added,
        seconds = report.seconds,
        "compacted"
    );
    Ok(report)
}

/// Compacts a group of partitions: writes each bin's file (recorded in `written` with its size), syncs
/// them, checks that every input is still active at the newest version, and commits removes and
/// adds as one OPTIMIZE. When anything fails before the commit lands, the new files are deleted
/// here; `Error::Conflict` then means another writer changed the partition first.
#[allow(clippy::too_many_arguments)]
async fn compact_partition(
    table: &mut DeltaTable,
    spec: &DatasetSpec,
    schema: &SchemaRef,
    info: &HashMap<String, FileInfo>,
    label: &str,
    bins: &[Bin],
    opts: &CompactOptions,
    stage: Option<&Stage>,
    written: &mut Vec<(String, u64)>,
    on_bin: &mut (dyn FnMut(&Bin) + Send),
) -> Result<()> {
    let table_dir = match stage {
        Some(s) => s.dir.clone(),
        None => table_dir_of(table)?,
    };
    // Write and sync each bin's file, then check the inputs are still active.
    let prepared: Result<Vec<Action>> = async {
        let dataset = spec.name.as_str();
        let mut actions = Vec::new();
        for bin in bins {
            let add = match stage {
                None => write_bin(&table_dir, spec, schema, bin).await?,
                Some(s) => s.write_bin(spec, schema, bin).await?,
            };
            written.push((add.path.clone(), u64::try_from(add.size).unwrap_or(0)));
            actions.push(Action::Add(add));
            let now = tarn_core::Clock::now_micros(&tarn_core::SystemClock) / 1000;
            for f in &bin.files {
                let fi = info
                    .get(f)
                    .ok_or_else(|| Error::Internal(format!("{f} is not in the plan's files")))?;
                actions.push(remove_action(fi, now, false));
            }
            on_bin(bin);
        }
        if stage.is_none() {
            let dir = table_dir.clone();
            let paths: Vec<String> = written.iter().map(|(p, _)| p.clone()).collect();
            tokio::task::spawn_blocking(move || {
                let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
                sync_files(&dir, &refs)
            })
            .await
            .map_err(|e| Error::Internal(format!("sync task: {e}")))??;
        }
        // delta-rs does not treat two commits removing the same file with dataChange = false as a
        // conflict, so a second compactor (an outside engine's OPTIMIZE) could double rows. Inside
        // tarn one run goes at a time; this re-check narrows the window against outside writers.
        table.update_incremental(None).await.map_err(delta_err(dataset))?;
        let active: std::collections::HashSet<String> = table_files(table, spec)?.into_iter().map(|f| f.path).collect();
        if let Some(gone) = bins.iter().flat_map(|b| &b.files).find(|f| !active.contains(*f)) {
            return Err(Error::Conflict(format!("{gone} was removed by another writer")));
        }
        Ok(actions)
    }
    .await;
    // Files of a commit that did not land are deleted on a disk. In a bucket they stay for
    // vacuum: a commit whose answer was lost may have landed, and a retry that then meets its
    // own application transaction reports a conflict.
    let discard = |written: &[(String, u64)]| {
        if stage.is_none() {
            for (p, _) in written {
                let _ = std::fs::remove_file(table_dir.join(p));
            }
        }
    };
    let actions = match prepared {
        Ok(a) => a,
        Err(e) => {
            discard(written);
            return Err(e);
        }
    };
    let op = DeltaOperation::Optimize {
        predicate: Some(label.to_string()),
        target_size: opts.rules.target_bytes as i64,
    };
    let now_ms = tarn_core::Clock::now_micros(&tarn_core::SystemClock) / 1000;
    let fence = Transaction::new(compact_app_id(&spec.name), now_ms);
    let props = CommitProperties::default().with_application_transaction(fence);
    match commit_actions(table, &spec.name, actions, op, props).await {
        Ok(_) => Ok(()),
        // A conflict means the commit did not land; any other error after the commit started
        // may have landed, so its files are kept.
        Err(e @ Error::Conflict(_)) => {
            discard(written);
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// The application id every compaction commit of a dataset carries: two compactions that
/// race to commit conflict on it.
pub fn compact_app_id(dataset: &str) -> String {
    format!("tarn-compact/{dataset}")
}

/// Where a table in a bucket is compacted: a local directory (in the lake's local root) and
/// the table's store.
struct Stage {
    dir: PathBuf,
    store: deltalake::logstore::ObjectStoreRef,
}

/// How much of an upload is held in memory before it goes multipart.
const UPLOAD_BUFFER_BYTES: usize = 16 << 20;

impl Stage {
    /// Downloads a bin's inputs, writes the bin beside them, uploads the new file, and
    /// empties the staging directory again.
    async fn write_bin(&self, spec: &DatasetSpec, schema: &SchemaRef, bin: &Bin) -> Result<deltalake::kernel::Add> {
        let res = async {
            for f in &bin.files {
                self.download(f).await?;
            }
            let add = write_bin(&self.dir, spec, schema, bin).await?;
            self.upload(&add.path).await?;
            Ok::<_, Error>(add)
        }
        .await;
        let dir = self.dir.clone();
        let cleared = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir).map_err(io_err(&dir)))
            .await
            .map_err(|e| Error::Internal(format!("staging task: {e}")))?;
        let add = res?;
        cleared?;
        Ok(add)
    }

    async fn download(&self, rel: &str) -> Result<()> {
        use futures::StreamExt as _;
        use tokio::io::AsyncWriteExt as _;
        let to = data_path(&self.dir, rel)?;
        if let Some(parent) = to.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io_err(parent))?;
        }
        let store_err = |e| Error::Store {
            what: format!("reading {rel}"),
            source: e,
        };
        let mut body = self
            .store
            .get(&deltalake::Path::from(rel))
            .await
            .map_err(store_err)?
            .into_stream();
        let mut file = tokio::fs::File::create(&to).await.map_err(io_err(&to))?;
        while let Some(chunk) = body.next().await {
            file.write_all(&chunk.map_err(store_err)?).await.map_err(io_err(&to))?;
        }
        file.flush().await.map_err(io_err(&to))
    }

    async fn upload(&self, rel: &str) -> Result<()> {
        use tokio::io::AsyncWriteExt as _;
        let from = data_path(&self.dir, rel)?;
        let mut file = tokio::fs::File::open(&from).await.map_err(io_err(&from))?;
        let mut w = deltalake::logstore::object_store::buffered::BufWriter::with_capacity(
            self.store.clone(),
            deltalake::Path::from(rel),
            UPLOAD_BUFFER_BYTES,
        );
        let failed = |e: std::io::Error| Error::Io {
            path: PathBuf::from(format!("upload of {rel}")),
            source: e,
        };
        if let Err(e) = tokio::io::copy(&mut file, &mut w).await {
            // Parts already uploaded would stay in the bucket, billed and out of vacuum's sight.
            // (The writer can be aborted until it is shut down, not after.)
            if let Err(a) = w.abort().await {
                tracing::warn!(file = rel, error = %a, "aborting a failed multipart upload");
            }
            return Err(failed(e));
        }
        w.shutdown().await.map_err(failed)
    }
}

/// The partition values of a Delta action.
pub(crate) fn partition_values(p: &Partition) -> HashMap<String, Option<String>> {
    p.iter().map(|(k, v)| (k.clone(), Some(v.clone()))).collect()
}

/// A `Remove` action for a file of the table, removed at `now_ms`.
pub(crate) fn remove_action(f: &FileInfo, now_ms: i64, data_change: bool) -> Action {
    Action::Remove(Remove {
        path: f.path.clone(),
        data_change,
        deletion_timestamp: Some(now_ms),
        extended_file_metadata: Some(true),
        partition_values: Some(partition_values(&f.partition)),
        size: Some(f.size_bytes as i64),
        tags: None,
        deletion_vector: None,
        base_row_id: None,
        default_row_commit_version: None,
    })
}

/// `day=2026-11-22/client_id=acme`.
fn partition_text(p: &[(String, String)]) -> String {
    p.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("/")
}

/// Writes one bin as a new file, streaming its inputs; returns its `Add` (`dataChange` false).
async fn write_bin(
    table_dir: &Path,
    spec: &DatasetSpec,
    schema: &SchemaRef,
    bin: &Bin,
) -> Result<deltalake::kernel::Add> {
    let (dir, spec, schema, bin) = (table_dir.to_path_buf(), spec.clone(), schema.clone(), bin.clone());
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let inputs = bin
            .files
            .iter()
            .map(|f| data_path(&dir, f))
            .collect::<Result<Vec<_>>>()?;
        // Writer settings from a sample of the first file, as curate takes them from its rows.
        let sample: Vec<RecordBatch> = read_aligned(inputs[0].clone(), schema.clone())?
            .take(1)
            .collect::<Result<_>>()?;
        let props = writer_properties(&spec, &sample, false);
        let stamp = tarn_core::Clock::now_micros(&tarn_core::SystemClock);
        let rel = format!(
            "{}/compact-{stamp}-{:08x}.zstd.parquet",
            partition_text(&bin.partition),
            name_hash(&bin.files)
        );
        let (size, stats) = if spec.compaction.sort_by.is_empty() {
            let rows = inputs.into_iter().flat_map(|p| match read_aligned(p, schema.clone()) {
                Ok(it) => Box::new(it) as Box<dyn Iterator<Item = Result<RecordBatch>>>,
                Err(e) => Box::new(std::iter::once(Err(e))),
            });
            write_parquet(&dir, &rel, schema.clone(), &props, rows)?
        } else {
            // The sort runs on the async runtime and hands batches over, two at a time.
            let (tx, mut rx) = tokio::sync::mpsc::channel(2);
            let (inputs, schema_s, sort_by) = (inputs.clone(), schema.clone(), spec.compaction.sort_by.clone());
            let sorter = handle.spawn(async move { sorted_rows(&inputs, &schema_s, &sort_by, tx).await });
            let written = write_parquet(
                &dir,
                &rel,
                schema.clone(),
                &props,
                std::iter::from_fn(|| rx.blocking_recv()),
            );
            let sorted = handle
                .block_on(sorter)
                .map_err(|e| Error::Internal(format!("sort task: {e}")));
            match (written, sorted) {
                (Ok(w), Ok(Ok(()))) => w,
                (Err(e), _) | (_, Ok(Err(e))) | (_, Err(e)) => {
                    let _ = std::fs::remove_file(dir.join(&rel));
                    return Err(e);
                }
            }
        };
        if stats.rows() != bin.rows && bin.rows != 0 {
            let _ = std::fs::remove_file(dir.join(&rel));
            return Err(Error::Corrupt {
                what: format!("compaction of {}", partition_text(&bin.partition)),
                reason: format!("read {} rows where the log lists {}", stats.rows(), bin.rows),
            });
        }
        Ok(new_add(rel, partition_values(&bin.partition), size, &stats, false))
    })
    .await
    .map_err(|e| Error::Internal(format!("compaction task: {e}")))?
}

/// A short hash of the input names, so two bins of one partition written in the same
/// microsecond get different names.
fn name_hash(names: &[String]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in names.iter().flat_map(|n| n.bytes()) {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests;
