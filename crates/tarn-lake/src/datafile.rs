//! Data files of curated tables: rows grouped by partition, written as one Parquet file per
//! partition with arrow-rs, synced, and described by a Delta `Add` action whose statistics are
//! computed from the rows themselves.
//!
//! File names are deterministic: `part-<shard>-<version>.zstd.parquet` in the partition's
//! directory, where `version` is the application-transaction version of the commit that adds
//! them. A commit that fails after writing its files and is retried with the same version
//! overwrites them instead of leaving orphans behind.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use deltalake::arrow::array::{Array, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use deltalake::arrow::compute::{cast, interleave_record_batch};
use deltalake::arrow::datatypes::{DataType, Schema, SchemaRef, TimeUnit};
use deltalake::kernel::Add;
use deltalake::parquet::arrow::ArrowWriter;
use deltalake::parquet::arrow::arrow_writer::ArrowWriterOptions;
use deltalake::parquet::file::properties::{EnabledStatistics, WriterProperties};
use serde_json::{Map, Value};
use tarn_core::DatasetSpec;
use tarn_core::contract::DAY;

use crate::writeback;
use crate::{Error, Result, io_err, sync_path};

/// Strings longer than this many bytes get no maximum in file statistics (a truncated maximum
/// would be smaller than the value), and a truncated minimum.
pub const STATS_STRING_MAX: usize = 64;

/// The rows of one partition: its day, its tenant value, and where its rows are in the input
/// batches (batch index, row index).
#[derive(Debug)]
pub struct PartitionRows {
    pub day: String,
    pub tenant: Option<String>,
    pub rows: Vec<(usize, usize)>,
}

/// Groups the rows of `batches` by partition in one hash pass, ordered by (day, tenant).
pub fn group_by_partition(spec: &DatasetSpec, batches: &[RecordBatch]) -> Result<Vec<PartitionRows>> {
    let strings = |b: &RecordBatch, name: &str| -> Result<StringArray> {
        let col = b
            .column_by_name(name)
            .ok_or_else(|| Error::Internal(format!("no {name} column")))?;
        let col = cast(col, &DataType::Utf8)?;
        col.as_any()
            .downcast_ref::<StringArray>()
            .cloned()
            .ok_or_else(|| Error::Internal(format!("{name} is not a string column")))
    };
    type Key = (String, Option<String>);
    let mut groups: HashMap<Key, Vec<(usize, usize)>> = HashMap::new();
    for (bi, b) in batches.iter().enumerate() {
        let days = strings(b, DAY)?;
        let tenants = spec.tenant().map(|t| strings(b, t)).transpose()?;
        // Events of one request mostly share a partition: look the key up once per run.
        let mut i = 0;
        while i < b.num_rows() {
            let day = days.is_valid(i).then(|| days.value(i));
            let tenant = tenants.as_ref().and_then(|t| t.is_valid(i).then(|| t.value(i)));
            let (Some(day), true) = (day, tenants.is_none() || tenant.is_some()) else {
                return Err(Error::Corrupt {
                    what: format!("row {i} of a curated batch"),
                    reason: "a partition value is null".into(),
                });
            };
            let mut j = i + 1;
            while j < b.num_rows()
                && days.is_valid(j)
                && days.value(j) == day
                && tenants
                    .as_ref()
                    .is_none_or(|t| t.is_valid(j) && Some(t.value(j)) == tenant)
            {
                j += 1;
            }
            let key = (day.to_string(), tenant.map(str::to_string));
            groups.entry(key).or_default().extend((i..j).map(|r| (bi, r)));
            i = j;
        }
    }
    let mut out: Vec<PartitionRows> = groups
        .into_iter()
        .map(|((day, tenant), rows)| PartitionRows { day, tenant, rows })
        .collect();
    out.sort_unstable_by(|a, b| (&a.day, &a.tenant).cmp(&(&b.day, &b.tenant)));
    Ok(out)
}

/// The relative directory of a partition: `day=<day>/<tenant field>=<value>`. Values were
/// checked by `tarn_core::name` (days are `YYYY-MM-DD`), so no escaping is needed; a value that
/// would need it is refused.
pub fn partition_dir(spec: &DatasetSpec, day: &str, tenant: Option<&str>) -> Result<String> {
    let safe = |v: &str| !v.is_empty() && v.bytes().all(|c| c.is_ascii_alphanumeric() || b"_-.".contains(&c));
    let mut dir = format!("{DAY}={day}");
    if !safe(day) {
        return Err(Error::Corrupt {
            what: format!("partition {dir}"),
            reason: "the day is not a date".into(),
        });
    }
    if let (Some(field), Some(value)) = (spec.tenant(), tenant) {
        if !safe(value) || value.starts_with('.') {
            return Err(Error::Corrupt {
                what: format!("partition {dir}/{field}={value}"),
                reason: "the tenant value is not a valid path segment".into(),
            });
        }
        dir.push_str(&format!("/{field}={value}"));
    }
    Ok(dir)
}

/// What one commit writes: where to (the table directory, or memory for a table in a bucket,
/// whose files are uploaded whole), the contract, the writer settings, and the name stem
/// shared by its files.
pub struct FileSet<'a> {
    /// `None`: the files are encoded in memory and returned for upload.
    pub table_dir: Option<&'a Path>,
    /// A writer tag for the file names (a lake in a bucket: see `Lake::writer`).
    pub writer: Option<&'a str>,
    pub spec: &'a DatasetSpec,
    pub props: WriterProperties,
    pub shard: u32,
    pub version: i64,
}

impl FileSet<'_> {
    /// Writes one partition's rows as a Parquet file (without the partition columns) and
    /// returns its `Add` action; [`sync_files`] makes it durable. Without a table directory
    /// the file's bytes come back too, to be uploaded under the `Add`'s path.
    pub fn write(&self, batches: &[RecordBatch], part: &PartitionRows) -> Result<(Add, Option<Vec<u8>>)> {
        let refs: Vec<&RecordBatch> = batches.iter().collect();
        let rows = interleave_record_batch(&refs, &part.rows)?;
        let rows = without_partition_columns(self.spec, &rows)?;
        // A file of several row groups is sorted by event time and keeps Parquet's statistics,
        // which then prune within it; one of a single group needs neither (see `writer_properties`).
        let groups = self
            .props
            .max_row_group_row_count()
            .is_some_and(|max| rows.num_rows() > max);
        let rows = if groups {
            sorted_by_event_time(self.spec, rows)?
        } else {
            rows
        };
        let with_stats = groups.then(|| {
            self.props
                .clone()
                .into_builder()
                .set_statistics_enabled(EnabledStatistics::Chunk)
                .build()
        });
        let props = with_stats.as_ref().unwrap_or(&self.props);
        let dir = partition_dir(self.spec, &part.day, part.tenant.as_deref())?;
        let rel = match self.writer {
            None => format!("{dir}/part-{:03}-{:020}.zstd.parquet", self.shard, self.version),
            Some(w) => format!("{dir}/part-{:03}-{:020}-{w}.zstd.parquet", self.shard, self.version),
        };
        let schema = rows.schema();
        let rows = std::iter::once(Ok(rows));
        let (size, stats, body) = match self.table_dir {
            Some(dir) => {
                let (size, stats) = write_parquet(dir, &rel, schema, props, rows)?;
                (size, stats, None)
            }
            None => {
                let (body, stats) = encode_parquet(Vec::new(), &rel, schema, props, rows)?;
                (body.len() as u64, stats, Some(body))
            }
        };
        let mut partition_values = HashMap::new();
        partition_values.insert(DAY.to_string(), Some(part.day.clone()));
        if let Some(t) = self.spec.tenant() {
            partition_values.insert(t.to_string(), part.tenant.clone());
        }
        Ok((new_add(rel, partition_values, size, &stats, true), body))
    }
}

/// The rows ordered by event time, for a file of several row groups: each group then carries a
/// tight range of times to prune on. A file of one row group keeps the rows in the order they
/// arrived (the log's): its bounds are the same either way, and arrival order compresses
/// better, since `_received_at` is then a non-decreasing run that delta-encodes to almost
/// nothing, and event times mostly follow arrival.
fn sorted_by_event_time(spec: &DatasetSpec, rows: RecordBatch) -> Result<RecordBatch> {
    let Some(col) = spec.event_time.as_deref().and_then(|t| rows.column_by_name(t)) else {
        return Ok(rows);
    };
    let opts = deltalake::arrow::compute::SortOptions {
        descending: false,
        nulls_first: true,
    };
    let order = deltalake::arrow::compute::sort_to_indices(col, Some(opts), None)?;
    Ok(deltalake::arrow::compute::take_record_batch(&rows, &order)?)
}

/// An `Add` action for a file written here.
pub fn new_add(
    rel: String,
    partition_values: HashMap<String, Option<String>>,
    size: u64,
    stats: &FileStats,
    data_change: bool,
) -> Add {
    Add {
        path: rel,
        partition_values,
        size: size as i64,
        modification_time: tarn_core::Clock::now_micros(&tarn_core::SystemClock) / 1000,
        data_change,
        stats: Some(stats.to_json().to_string()),
        tags: None,
        deletion_vector: None,
        base_row_id: None,
        default_row_commit_version: None,
        clustering_provider: None,
    }
}

/// Writes `batches` (each with `schema`) as one Parquet file at `table_dir/rel`, creating its
/// directory; returns the file's size and statistics. Its pages go to the disk as it is
/// written (`writeback.rs`), but it is not synced: [`sync_files`] does that for all the files
/// of a commit.
pub fn write_parquet(
    table_dir: &Path,
    rel: &str,
    schema: SchemaRef,
    props: &WriterProperties,
    batches: impl Iterator<Item = Result<RecordBatch>>,
) -> Result<(u64, FileStats)> {
    let path = table_dir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let (w, stats) = encode_parquet(writeback::create(&path)?, rel, schema, props, batches)?;
    let file = writeback::finish(w, &path)?;
    let size = file.metadata().map_err(io_err(&path))?.len();
    Ok((size, stats))
}

/// Encodes `batches` (each with `schema`) as one Parquet file into `w`; returns the writer
/// and the file's statistics.
pub fn encode_parquet<W: std::io::Write + Send>(
    w: W,
    rel: &str,
    schema: SchemaRef,
    props: &WriterProperties,
    batches: impl Iterator<Item = Result<RecordBatch>>,
) -> Result<(W, FileStats)> {
    let opts = ArrowWriterOptions::new()
        .with_properties(props.clone())
        .with_skip_arrow_metadata(true);
    let mut stats = FileStats::new(&schema);
    let mut w = ArrowWriter::try_new_with_options(w, schema, opts).map_err(parquet_err(rel))?;
    for b in batches {
        let b = b?;
        stats.add(&b);
        w.write(&b).map_err(parquet_err(rel))?;
    }
    Ok((w.into_inner().map_err(parquet_err(rel))?, stats))
}

/// Threads syncing the files of one commit. Concurrent fsyncs share the filesystem journal's
/// commits, so many at once cost little more than one.
const SYNC_THREADS: usize = 16;

/// Makes the files of a commit durable, with the directories that name them (each file's
/// directory and every directory above it up to the table): fsyncs in parallel, before the
/// commit that lists the files. Only these files and directories are flushed, not the whole
/// filesystem.
pub fn sync_files(table_dir: &Path, rel_paths: &[&str]) -> Result<()> {
    let mut targets: Vec<std::path::PathBuf> = rel_paths.iter().map(|r| table_dir.join(r)).collect();
    let mut dirs = std::collections::BTreeSet::new();
    for r in rel_paths {
        let mut d = table_dir.join(r);
        while d.pop() && d.starts_with(table_dir) {
            dirs.insert(d.clone());
        }
    }
    targets.extend(dirs);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..SYNC_THREADS.min(targets.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(p) = targets.get(i) else { return };
                    if let Err(e) = sync_path(p) {
                        failed.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn parquet_err(rel: &str) -> impl FnOnce(deltalake::parquet::errors::ParquetError) -> Error + '_ {
    move |e| Error::Internal(format!("writing {rel}: {e}"))
}

/// The batch without its partition columns, which Delta keeps in the log, not in the files.
pub fn without_partition_columns(spec: &DatasetSpec, batch: &RecordBatch) -> Result<RecordBatch> {
    let schema = batch.schema();
    let keep: Vec<usize> = schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| f.name() != DAY && Some(f.name().as_str()) != spec.tenant())
        .map(|(i, _)| i)
        .collect();
    Ok(batch.project(&keep)?)
}

/// The data schema of a table's files: its schema without the partition columns.
pub fn file_schema(spec: &DatasetSpec, schema: &Schema) -> SchemaRef {
    let fields: Vec<_> = schema
        .fields()
        .iter()
        .filter(|f| f.name() != DAY && Some(f.name().as_str()) != spec.tenant())
        .cloned()
        .collect();
    Arc::new(Schema::new(fields))
}

/// Delta file statistics of a batch; see [`FileStats`].
pub fn file_stats(batch: &RecordBatch) -> Value {
    let mut s = FileStats::new(&batch.schema());
    s.add(batch);
    s.to_json()
}

/// Delta file statistics accumulated over the batches of one file: `numRecords`, and per column
/// its null count and, where the type allows it, a minimum and maximum that bound every value.
/// Timestamps are written at millisecond precision, so the minimum is rounded down and the
/// maximum up; a float column holding a NaN gets no bounds, and a string column whose largest
/// value is longer than [`STATS_STRING_MAX`] bytes gets a truncated minimum and no maximum.
#[derive(Debug)]
pub struct FileStats {
    rows: u64,
    columns: Vec<(String, u64, Bound)>,
}

#[derive(Debug)]
enum Bound {
    None,
    Str {
        min: Option<String>,
        max: Option<String>,
        unbounded: bool,
    },
    I64 {
        min: Option<i64>,
        max: Option<i64>,
    },
    F64 {
        min: Option<f64>,
        max: Option<f64>,
        nan: bool,
    },
    Micros {
        min: Option<i64>,
        max: Option<i64>,
    },
}

fn lower<T: PartialOrd>(acc: &mut Option<T>, v: Option<T>) {
    if let Some(v) = v
        && acc.as_ref().is_none_or(|a| v < *a)
    {
        *acc = Some(v);
    }
}

fn upper<T: PartialOrd>(acc: &mut Option<T>, v: Option<T>) {
    if let Some(v) = v
        && acc.as_ref().is_none_or(|a| v > *a)
    {
        *acc = Some(v);
    }
}

impl FileStats {
    pub fn new(schema: &Schema) -> Self {
        let columns = schema
            .fields()
            .iter()
            .map(|f| {
                let b = match f.data_type() {
                    DataType::Utf8 => Bound::Str {
                        min: None,
                        max: None,
                        unbounded: false,
                    },
                    DataType::Int64 => Bound::I64 { min: None, max: None },
                    DataType::Float64 => Bound::F64 {
                        min: None,
                        max: None,
                        nan: false,
                    },
                    DataType::Timestamp(TimeUnit::Microsecond, _) => Bound::Micros { min: None, max: None },
                    _ => Bound::None,
                };
                (f.name().clone(), 0, b)
            })
            .collect();
        Self { rows: 0, columns }
    }

    /// Adds a batch with the schema given to [`FileStats::new`].
    pub fn add(&mut self, batch: &RecordBatch) {
        use deltalake::arrow::compute::{max, max_string, min, min_string};
        self.rows += batch.num_rows() as u64;
        for ((_, nulls, bound), col) in self.columns.iter_mut().zip(batch.columns()) {
            *nulls += col.null_count() as u64;
            let any = col.as_any();
            match bound {
                Bound::Str {
                    min: lo,
                    max: hi,
                    unbounded,
                } => {
                    if let Some(a) = any.downcast_ref::<StringArray>() {
                        lower(lo, min_string(a).map(|s| truncate(s, STATS_STRING_MAX).to_string()));
                        match max_string(a) {
                            Some(s) if s.len() > STATS_STRING_MAX => *unbounded = true,
                            v => upper(hi, v.map(str::to_string)),
                        }
                    }
                }
                Bound::I64 { min: lo, max: hi } => {
                    if let Some(a) = any.downcast_ref::<Int64Array>() {
                        lower(lo, min(a));
                        upper(hi, max(a));
                    }
                }
                Bound::F64 { min: lo, max: hi, nan } => {
                    if let Some(a) = any.downcast_ref::<Float64Array>() {
                        *nan |= a.iter().flatten().any(f64::is_nan);
                        lower(lo, min(a));
                        upper(hi, max(a));
                    }
                }
                Bound::Micros { min: lo, max: hi } => {
                    if let Some(a) = any.downcast_ref::<TimestampMicrosecondArray>() {
                        lower(lo, min(a));
                        upper(hi, max(a));
                    }
                }
                Bound::None => {}
            }
        }
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The statistics as Delta writes them in an `Add` action.
    pub fn to_json(&self) -> Value {
        let mut mins = Map::new();
        let mut maxs = Map::new();
        let mut nulls = Map::new();
        for (name, n, bound) in &self.columns {
            nulls.insert(name.clone(), Value::from(*n));
            let (lo, hi) = bound_values(bound);
            if let Some(lo) = lo {
                mins.insert(name.clone(), lo);
            }
            if let Some(hi) = hi {
                maxs.insert(name.clone(), hi);
            }
        }
        let mut stats = Map::new();
        stats.insert("numRecords".into(), Value::from(self.rows));
        stats.insert("minValues".into(), Value::Object(mins));
        stats.insert("maxValues".into(), Value::Object(maxs));
        stats.insert("nullCount".into(), Value::Object(nulls));
        Value::Object(stats)
    }
}

fn bound_values(b: &Bound) -> (Option<Value>, Option<Value>) {
    match b {
        Bound::None | Bound::F64 { nan: true, .. } => (None, None),
        Bound::Str { min, max, unbounded } => (
            min.clone().map(Value::from),
            max.clone().filter(|_| !unbounded).map(Value::from),
        ),
        Bound::I64 { min, max } => (min.map(Value::from), max.map(Value::from)),
        Bound::F64 { min, max, .. } => (min.map(Value::from), max.map(Value::from)),
        Bound::Micros { min, max } => (
            min.map(|us| us.div_euclid(1000)).and_then(millis_text),
            max.map(|us| us.div_euclid(1000) + i64::from(us.rem_euclid(1000) != 0))
                .and_then(millis_text),
        ),
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn millis_text(ms: i64) -> Option<Value> {
    let t = chrono::DateTime::from_timestamp_millis(ms)?;
    Some(Value::from(t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()))
}

#[cfg(test)]
mod tests {
    use deltalake::arrow::array::ArrayRef;

    use super::*;

    fn stats_of(cols: Vec<(&str, ArrayRef)>) -> Value {
        file_stats(&RecordBatch::try_from_iter(cols).expect("batch"))
    }

    #[test]
    fn timestamp_bounds_round_outwards() {
        let a: ArrayRef = Arc::new(TimestampMicrosecondArray::from(vec![1_500, 2_001, 2_000]).with_timezone("UTC"));
        let s = stats_of(vec![("ts", a)]);
        assert_eq!(s["minValues"]["ts"], "1970-01-01T00:00:00.001Z");
        assert_eq!(s["maxValues"]["ts"], "1970-01-01T00:00:00.003Z");
        let exact: ArrayRef = Arc::new(TimestampMicrosecondArray::from(vec![-1_000, 4_000]));
        let s = stats_of(vec![("ts", exact)]);
        assert_eq!(s["minValues"]["ts"], "1969-12-31T23:59:59.999Z");
        assert_eq!(s["maxValues"]["ts"], "1970-01-01T00:00:00.004Z");
    }

    #[test]
    fn long_strings_get_a_prefix_minimum_and_no_maximum() {
        let long = format!("a{}", "é".repeat(40));
        let a: ArrayRef = Arc::new(StringArray::from(vec![Some(long.as_str()), None, Some("zz")]));
        let s = stats_of(vec![("url", a)]);
        let lo = s["minValues"]["url"].as_str().expect("min");
        assert!(lo.len() <= STATS_STRING_MAX && long.starts_with(lo));
        assert_eq!(s["maxValues"]["url"], "zz");
        assert_eq!(s["nullCount"]["url"], 1);
        let only_long: ArrayRef = Arc::new(StringArray::from(vec![long.as_str()]));
        assert!(stats_of(vec![("url", only_long)])["maxValues"].get("url").is_none());
    }

    #[test]
    fn nan_floats_get_no_bounds_and_nulls_are_counted() {
        let a: ArrayRef = Arc::new(Float64Array::from(vec![Some(1.0), Some(f64::NAN), None]));
        let s = stats_of(vec![("cpm", a)]);
        assert_eq!(s["numRecords"], 3);
        assert_eq!(s["nullCount"]["cpm"], 1);
        assert!(s["minValues"].get("cpm").is_none());
        assert!(s["maxValues"].get("cpm").is_none());
    }

    #[test]
    fn stats_over_several_batches_equal_stats_over_their_concatenation() {
        let batch = |v: Vec<Option<i64>>, t: Vec<Option<&str>>| {
            let a: ArrayRef = Arc::new(Int64Array::from(v));
            let b: ArrayRef = Arc::new(StringArray::from(t));
            RecordBatch::try_from_iter_with_nullable([("n", a, true), ("t", b, true)]).expect("batch")
        };
        let parts = [
            batch(vec![Some(5), None], vec![Some("m"), Some("b")]),
            batch(vec![Some(-3), Some(9)], vec![None, Some("x")]),
        ];
        let mut acc = FileStats::new(&parts[0].schema());
        for p in &parts {
            acc.add(p);
        }
        let whole = deltalake::arrow::compute::concat_batches(&parts[0].schema(), &parts).expect("concat");
        assert_eq!(acc.to_json(), file_stats(&whole));
        let s = acc.to_json();
        assert_eq!(
            (s["minValues"]["n"].clone(), s["maxValues"]["n"].clone()),
            (Value::from(-3), Value::from(9))
        );
        assert_eq!(
            (s["minValues"]["t"].clone(), s["maxValues"]["t"].clone()),
            (Value::from("b"), Value::from("x"))
        );
        assert_eq!(s["nullCount"]["n"], 1);
    }

    #[test]
    fn partition_dirs_refuse_unsafe_values() {
        let spec = DatasetSpec::from_yaml(
            "name: bids\nfields:\n  - { name: event_id, type: string }\n  - { name: client_id, type: string, required: true }\nevent_id: event_id\npartitioning: { tenant: client_id }\n",
        )
        .expect("spec");
        assert_eq!(
            partition_dir(&spec, "2026-11-22", Some("acme")).expect("dir"),
            "day=2026-11-22/client_id=acme"
        );
        for bad in ["../x", "a/b", "", ".hidden", "a b"] {
            assert!(partition_dir(&spec, "2026-11-22", Some(bad)).is_err(), "{bad}");
        }
        assert!(partition_dir(&spec, "../2026", Some("acme")).is_err());
    }
}
