//! Data registered in place (`tarn register`, the crawler's job): a folder of Parquet files,
//! whose Hive-style `key=value` folders become partition columns, or a Delta table. tarn reads
//! it where it is and never writes, compacts or moves it.

use std::path::Path;
use std::sync::Arc;

use deltalake::arrow::datatypes::{DataType, SchemaRef};
use deltalake::datafusion::catalog::TableProvider;
use deltalake::datafusion::datasource::file_format::parquet::ParquetFormat;
use deltalake::datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use deltalake::datafusion::prelude::SessionContext;
use serde::Serialize;
use tarn_core::{ExternalFormat, Field, FieldType, Pii};

use crate::{Error, Result};

/// Most files a registered Parquet folder may hold.
pub const FILES_MAX: usize = 1_000_000;
/// Most entries (files and folders of any kind) looked at while listing a folder.
pub const ENTRIES_MAX: usize = 10_000_000;

/// What registration found.
#[derive(Debug, Clone, Serialize)]
pub struct Inspected {
    pub format: ExternalFormat,
    /// The canonical absolute path.
    pub location: String,
    pub fields: Vec<Field>,
    pub partitions: Vec<String>,
    pub files: u64,
    pub bytes: u64,
}

/// Reads what a folder holds: its format (a `_delta_log` folder means Delta, unless `format`
/// says otherwise), columns, partitions, files and bytes.
pub async fn inspect(location: &Path, format: Option<ExternalFormat>) -> Result<Inspected> {
    let dir = location
        .canonicalize()
        .map_err(|e| Error::BadQuery(format!("{}: {e}", location.display())))?;
    if !dir.is_dir() {
        return Err(Error::BadQuery(format!("{} is not a folder", dir.display())));
    }
    let text = dir
        .to_str()
        .ok_or_else(|| Error::BadQuery(format!("{} is not UTF-8", dir.display())))?
        .to_string();
    let format = format.unwrap_or(if dir.join("_delta_log").is_dir() {
        ExternalFormat::Delta
    } else {
        ExternalFormat::Parquet
    });
    match format {
        ExternalFormat::Delta => {
            let table = open_delta(&text).await?;
            let snap = table.snapshot().map_err(|e| Error::BadQuery(format!("{text}: {e}")))?;
            let schema = snap.snapshot().arrow_schema();
            let partitions = snap.metadata().partition_columns().to_vec();
            let (mut files, mut bytes) = (0u64, 0u64);
            for f in snap.log_data().iter() {
                files += 1;
                bytes += u64::try_from(f.size()).unwrap_or(0);
            }
            let fields = schema
                .fields()
                .iter()
                .map(|f| field_of(f.name(), f.data_type()))
                .collect();
            Ok(Inspected {
                format,
                location: text,
                fields,
                partitions,
                files,
                bytes,
            })
        }
        ExternalFormat::Parquet => {
            let d = dir.clone();
            let (files, bytes, partitions) = tokio::task::spawn_blocking(move || walk_parquet(&d))
                .await
                .map_err(|e| Error::Internal(format!("listing task: {e}")))??;
            let ctx = SessionContext::new();
            let file_schema = parquet_options(&partitions)
                .infer_schema(&ctx.state(), &listing_url(&text)?)
                .await
                .map_err(|e| Error::BadQuery(format!("reading the Parquet schema under {text}: {e}")))?;
            let mut fields: Vec<Field> = file_schema
                .fields()
                .iter()
                .map(|f| field_of(f.name(), f.data_type()))
                .collect();
            for p in &partitions {
                if fields.iter().any(|f| f.name == *p) {
                    return Err(Error::BadQuery(format!(
                        "{p} is both a column of the files and a partition folder under {text}"
                    )));
                }
                fields.push(field_of(p, &DataType::Utf8));
            }
            Ok(Inspected {
                format,
                location: text,
                fields,
                partitions,
                files,
                bytes,
            })
        }
    }
}

/// The table provider of a registered dataset, and its file schema for Parquet (cached by
/// the caller: inferring it reads every footer).
pub async fn provider(
    ctx: &SessionContext,
    ext: &tarn_core::External,
    file_schema: Option<SchemaRef>,
) -> Result<(Arc<dyn TableProvider>, Option<SchemaRef>)> {
    match ext.format {
        ExternalFormat::Delta => {
            let table = open_delta(&ext.location).await?;
            Ok((crate::delta_provider(&table, ctx).await?, None))
        }
        ExternalFormat::Parquet => {
            let config = ListingTableConfig::new(listing_url(&ext.location)?)
                .with_listing_options(parquet_options(&ext.partitions));
            let config = match file_schema {
                Some(s) => config.with_schema(s),
                None => config
                    .infer_schema(&ctx.state())
                    .await
                    .map_err(|e| Error::Internal(format!("reading the Parquet schema under {}: {e}", ext.location)))?,
            };
            let schema = config.file_schema.clone();
            let table = ListingTable::try_new(config).map_err(|e| Error::Internal(e.to_string()))?;
            Ok((Arc::new(table), schema))
        }
    }
}

async fn open_delta(location: &str) -> Result<deltalake::DeltaTable> {
    let url = url::Url::from_directory_path(location)
        .map_err(|_| Error::BadQuery(format!("{location} is not an absolute path")))?;
    deltalake::DeltaTable::try_from_url(url)
        .await
        .map_err(|e| Error::BadQuery(format!("{location} is not a Delta table: {e}")))
}

fn listing_url(location: &str) -> Result<ListingTableUrl> {
    let url = url::Url::from_directory_path(location)
        .map_err(|_| Error::BadQuery(format!("{location} is not an absolute path")))?;
    ListingTableUrl::parse(url.as_str()).map_err(|e| Error::BadQuery(format!("{location}: {e}")))
}

fn parquet_options(partitions: &[String]) -> ListingOptions {
    ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(".parquet")
        .with_table_partition_cols(partitions.iter().map(|p| (p.clone(), DataType::Utf8)).collect())
}

/// Every `.parquet` file under `dir` (hidden and `_` names skipped): how many, their bytes,
/// and the partition keys of their folders, which must be the same everywhere.
fn walk_parquet(dir: &Path) -> Result<(u64, u64, Vec<String>)> {
    let mut stack = vec![dir.to_path_buf()];
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut keys: Option<Vec<String>> = None;
    let mut seen = 0usize;
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| Error::BadQuery(format!("{}: {e}", d.display())))?;
        for e in entries {
            let e = e.map_err(|e| Error::BadQuery(format!("{}: {e}", d.display())))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.starts_with('_') {
                continue;
            }
            seen += 1;
            if seen > ENTRIES_MAX {
                return Err(Error::BadQuery(format!(
                    "more than {ENTRIES_MAX} entries under {}",
                    dir.display()
                )));
            }
            let path = e.path();
            // Links are not followed: a loop, or a link out of the folder, is not walked.
            let meta =
                std::fs::symlink_metadata(&path).map_err(|e| Error::BadQuery(format!("{}: {e}", path.display())))?;
            if meta.file_type().is_symlink() {
                continue;
            }
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            if !name.ends_with(".parquet") {
                continue;
            }
            files += 1;
            if files as usize > FILES_MAX {
                return Err(Error::BadQuery(format!(
                    "more than {FILES_MAX} Parquet files under {}",
                    dir.display()
                )));
            }
            bytes += meta.len();
            let rel = path.strip_prefix(dir).unwrap_or(&path);
            let these: Vec<String> = rel
                .parent()
                .into_iter()
                .flat_map(|p| p.components())
                .filter_map(|c| c.as_os_str().to_str())
                .filter_map(|c| c.split_once('=').map(|(k, _)| k.to_string()))
                .collect();
            match &keys {
                None => keys = Some(these),
                Some(k) if *k == these => {}
                Some(k) => {
                    return Err(Error::BadQuery(format!(
                        "partition folders differ under {}: {} against {}",
                        dir.display(),
                        k.join("/"),
                        these.join("/")
                    )));
                }
            }
        }
    }
    if files == 0 {
        return Err(Error::BadQuery(format!("no .parquet files under {}", dir.display())));
    }
    Ok((files, bytes, keys.unwrap_or_default()))
}

/// The contract type closest to an Arrow type; one it cannot say is `json`, with the real
/// type in the field's description.
fn field_of(name: &str, dt: &DataType) -> Field {
    let ty = match dt {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Some(FieldType::String),
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => Some(FieldType::Int64),
        DataType::Float16 | DataType::Float32 | DataType::Float64 => Some(FieldType::Float64),
        DataType::Boolean => Some(FieldType::Bool),
        DataType::Timestamp(_, _) => Some(FieldType::Timestamp),
        _ => None,
    };
    Field {
        name: name.to_string(),
        ty: ty.unwrap_or(FieldType::Json),
        required: false,
        description: Some(format!("stored as {dt}")),
        pii: Pii::None,
    }
}
