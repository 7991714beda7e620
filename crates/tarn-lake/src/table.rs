//! The lake root and its Delta tables: locating, opening, and appending with an application
//! transaction so that a replayed append is recognised.

use std::path::{Path, PathBuf};

use deltalake::DeltaTable;
use std::collections::HashMap;

use deltalake::arrow::array::{Array, RecordBatch, StringArray, UInt32Array};
use deltalake::arrow::compute::cast;
use deltalake::arrow::compute::{concat_batches, take_record_batch};
use deltalake::arrow::datatypes::DataType;
use deltalake::kernel::Transaction;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::properties::EnabledStatistics;
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::parquet::schema::types::ColumnPath;
use deltalake::protocol::SaveMode;
use tarn_core::contract::{DAY, RECEIVED_AT};
use tarn_core::{DatasetSpec, FieldType};

use crate::{Error, Result, io_err};

/// The lake root on the local filesystem.
#[derive(Debug, Clone)]
pub struct Lake {
    root: PathBuf,
}

impl Lake {
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        std::fs::create_dir_all(root.join("raw")).map_err(io_err(&root))?;
        std::fs::create_dir_all(root.join("tables")).map_err(io_err(&root))?;
        let root = root.canonicalize().map_err(io_err(&root))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of a dataset's Delta table. The name was checked by `tarn_core::name`.
    pub fn table_dir(&self, dataset: &str) -> PathBuf {
        self.root.join("tables").join(dataset)
    }

    pub fn table_url(&self, dataset: &str) -> Result<url::Url> {
        let dir = self.table_dir(dataset);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        url::Url::from_directory_path(&dir).map_err(|_| Error::Internal(format!("no file URL for {}", dir.display())))
    }

    /// Opens a dataset's table; an absent table comes back uninitialised (version `None`).
    pub async fn open_table(&self, dataset: &str) -> Result<DeltaTable> {
        let url = self.table_url(dataset)?;
        let err = |source| Error::Delta {
            dataset: dataset.to_string(),
            source,
        };
        if !self.table_exists(dataset) {
            // Loading a table that has no commit yet only logs errors; build it unloaded.
            return deltalake::DeltaTableBuilder::from_url(url)
                .and_then(|b| b.build())
                .map_err(err);
        }
        DeltaTable::try_from_url(url).await.map_err(err)
    }

    /// Whether a dataset's table has at least one commit.
    pub fn table_exists(&self, dataset: &str) -> bool {
        self.table_dir(dataset).join("_delta_log").is_dir()
    }
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
    let snap = table.snapshot().map_err(|source| Error::Delta {
        dataset: dataset.to_string(),
        source,
    })?;
    let v = snap
        .transaction_version(table.log_store().as_ref(), app_id)
        .await
        .map_err(|source| Error::Delta {
            dataset: dataset.to_string(),
            source,
        })?;
    Ok(v.unwrap_or(-1))
}

/// Parquet settings of curated files: zstd; statistics per column chunk (what pruning uses;
/// page-level indexes only make small files bigger); and a dictionary only for the columns
/// whose values repeat. Event ids, timestamps and floats never get one; a string column gets
/// one when, in a sample of the batch, fewer than half of its values are distinct.
pub fn writer_properties(spec: &DatasetSpec, batch: &RecordBatch) -> WriterProperties {
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default()))
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_max_row_group_row_count(Some(128 * 1024));
    for f in &spec.fields {
        let repeats = match f.ty {
            FieldType::Float64 | FieldType::Timestamp => false,
            _ if f.name == spec.event_id => false,
            FieldType::String | FieldType::Json => batch
                .column_by_name(&f.name)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .is_none_or(|c| distinct_share(c) < 0.5),
            FieldType::Int64 | FieldType::Bool => true,
        };
        if !repeats {
            b = b.set_column_dictionary_enabled(ColumnPath::from(f.name.clone()), false);
        }
    }
    b = b.set_column_dictionary_enabled(ColumnPath::from(RECEIVED_AT), false);
    b.build()
}

/// The share of distinct values among the first 4,096 non-null values.
fn distinct_share(c: &StringArray) -> f64 {
    let mut seen = std::collections::HashSet::new();
    let mut n = 0usize;
    for v in c.iter().flatten().take(4096) {
        seen.insert(v);
        n += 1;
    }
    if n == 0 { 0.0 } else { seen.len() as f64 / n as f64 }
}

/// Concatenates the batches and groups the rows by partition (day and tenant), so that the
/// writer gets each partition's rows as one slice instead of thousands of small ones. Grouping
/// is one hash pass, not a sort.
pub fn gather_by_partition(spec: &DatasetSpec, batches: Vec<RecordBatch>) -> Result<RecordBatch> {
    let Some(first) = batches.first() else {
        return Err(Error::Internal("nothing to gather".into()));
    };
    let schema = first.schema();
    let all = concat_batches(&schema, &batches)?;
    drop(batches);
    let strings = |name: &str| -> Result<StringArray> {
        let col = all
            .column_by_name(name)
            .ok_or_else(|| Error::Internal(format!("no {name} column")))?;
        let col = cast(col, &DataType::Utf8)?;
        col.as_any()
            .downcast_ref::<StringArray>()
            .cloned()
            .ok_or_else(|| Error::Internal(format!("{name} is not a string column")))
    };
    let days = strings(DAY)?;
    let tenants = spec.tenant().map(&strings).transpose()?;
    let mut groups: HashMap<(&str, &str), Vec<u32>> = HashMap::new();
    for i in 0..all.num_rows() {
        let day = if days.is_null(i) { "" } else { days.value(i) };
        let tenant = match &tenants {
            Some(t) if !t.is_null(i) => t.value(i),
            _ => "",
        };
        groups.entry((day, tenant)).or_default().push(i as u32);
    }
    let mut order: Vec<u32> = Vec::with_capacity(all.num_rows());
    let mut keys: Vec<_> = groups.into_iter().collect();
    keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    for (_, rows) in keys {
        order.extend(rows);
    }
    Ok(take_record_batch(&all, &UInt32Array::from(order))?)
}

/// Appends batches in one commit that also records `(app_id, version)`.
pub async fn append(
    table: DeltaTable,
    spec: &DatasetSpec,
    batches: Vec<RecordBatch>,
    app_id: &str,
    version: i64,
) -> Result<DeltaTable> {
    let dataset = spec.name.as_str();
    let t = std::time::Instant::now();
    let batch = gather_by_partition(spec, batches)?;
    let props_w = writer_properties(spec, &batch);
    tracing::debug!(
        dataset,
        rows = batch.num_rows(),
        gather_ms = t.elapsed().as_millis() as u64,
        "gathered rows by partition"
    );
    let mut parts = vec![DAY.to_string()];
    if let Some(t) = spec.tenant() {
        parts.push(t.to_string());
    }
    let props = CommitProperties::default().with_application_transaction(Transaction::new(app_id, version));
    table
        .write([batch])
        .with_save_mode(SaveMode::Append)
        .with_partition_columns(parts)
        .with_writer_properties(props_w)
        .with_commit_properties(props)
        .await
        .map_err(|source| Error::Delta {
            dataset: dataset.to_string(),
            source,
        })
}
