//! Scan accounting from an executed physical plan: the files each scan was planned over (after
//! partition and statistics pruning), the bytes the Parquet reader fetched, and the rows the
//! scans produced.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use deltalake::datafusion::datasource::physical_plan::FileScanConfig;
use deltalake::datafusion::datasource::source::DataSourceExec;
use deltalake::datafusion::physical_plan::ExecutionPlan;
use deltalake::datafusion::physical_plan::metrics::MetricValue;

/// What a query read.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ScanStats {
    /// Rows produced by the table scans.
    pub rows_scanned: u64,
    /// Data files the scans were planned over, after pruning.
    pub files_scanned: u64,
    /// Bytes read from those files.
    pub bytes_scanned: u64,
    /// Rows in the result.
    pub rows_returned: u64,
    pub duration_ms: f64,
    /// `bytes_scanned` priced as a lake query engine charges (the server's scan price).
    #[serde(default)]
    pub estimated_cost_usd: f64,
    /// `bytes_scanned` by dataset.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub bytes_by_dataset: BTreeMap<String, u64>,
    /// Of those, the bytes read from days in the infrequent tier (an estimate: each scan's
    /// bytes shared out by the size of its files).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub bytes_infrequent_by_dataset: BTreeMap<String, u64>,
}

/// Calls `f` on every file scan in the plan.
fn for_each_scan(plan: &Arc<dyn ExecutionPlan>, f: &mut dyn FnMut(&Arc<dyn ExecutionPlan>, &FileScanConfig)) {
    if let Some(exec) = plan.downcast_ref::<DataSourceExec>()
        && let Some(config) = exec.data_source().downcast_ref::<FileScanConfig>()
    {
        f(plan, config);
    }
    for child in plan.children() {
        for_each_scan(child, f);
    }
}

/// The files of one scan and their sizes: a large file split into byte ranges scanned in
/// parallel is one file.
fn scan_files(config: &FileScanConfig) -> HashMap<&str, u64> {
    config
        .file_groups
        .iter()
        .flat_map(|g| g.files())
        .map(|f| (f.object_meta.location.as_ref(), f.object_meta.size))
        .collect()
}

/// The dataset whose table holds the file at `path` (its location is a prefix of the path).
fn dataset_of<'a>(urls: &'a HashMap<String, String>, path: &str) -> Option<(&'a str, &'a str)> {
    urls.iter()
        .find(|(prefix, _)| path.starts_with(prefix.as_str()))
        .map(|(p, d)| (p.as_str(), d.as_str()))
}

/// The (dataset, day) of a file path under one of the tables in `urls`.
fn dataset_day(urls: &HashMap<String, String>, path: &str) -> Option<(String, String)> {
    let (prefix, dataset) = dataset_of(urls, path)?;
    let day = path[prefix.len()..].strip_prefix("day=")?.split('/').next()?;
    Some((dataset.to_string(), day.to_string()))
}

/// Scan statistics of a plan; `urls` maps each table's object store URL, and the path prefix
/// of its files, to its dataset.
pub(crate) fn collect(
    plan: &Arc<dyn ExecutionPlan>,
    urls: &HashMap<String, String>,
    infrequent: &HashSet<(String, String)>,
) -> ScanStats {
    let mut s = ScanStats::default();
    for_each_scan(plan, &mut |plan, config| {
        let files = scan_files(config);
        s.files_scanned += files.len() as u64;
        let Some(m) = plan.metrics() else { return };
        s.rows_scanned += m.output_rows().unwrap_or(0) as u64;
        let mut bytes = 0;
        for metric in m.iter() {
            if let MetricValue::Count { name, count } = metric.value()
                && name == "bytes_scanned"
            {
                bytes += count.value() as u64;
            }
        }
        s.bytes_scanned += bytes;
        // A table's scan goes through a store of its own (its URL names the table) or through
        // one shared store, where its files' paths start with the table's location.
        let dataset = urls
            .get(config.object_store_url.as_str())
            .map(String::as_str)
            .or_else(|| files.keys().next().and_then(|p| dataset_of(urls, p)).map(|(_, d)| d))
            .unwrap_or("(unknown)")
            .to_string();
        if !infrequent.is_empty() {
            let all: u64 = files.values().sum();
            let cold: u64 = files
                .iter()
                .filter(|(p, _)| dataset_day(urls, p).is_some_and(|k| infrequent.contains(&k)))
                .map(|(_, size)| size)
                .sum();
            if cold > 0 {
                let share = (bytes as f64 * cold as f64 / all.max(1) as f64) as u64;
                *s.bytes_infrequent_by_dataset.entry(dataset.clone()).or_default() += share;
            }
        }
        *s.bytes_by_dataset.entry(dataset).or_default() += bytes;
    });
    s
}

/// The (dataset, day) partitions the plan's scans list, from their files' paths.
pub(crate) fn scanned_days(
    plan: &Arc<dyn ExecutionPlan>,
    urls: &HashMap<String, String>,
    out: &mut std::collections::BTreeSet<(String, String)>,
) {
    for_each_scan(plan, &mut |_, config| {
        out.extend(scan_files(config).keys().filter_map(|p| dataset_day(urls, p)));
    });
}

/// (files, bytes) the plan's scans are planned over: within a scan each file once, at its
/// full size; a table scanned twice (a self-join, a UNION) counts twice.
pub(crate) fn planned_files(plan: &Arc<dyn ExecutionPlan>) -> (u64, u64) {
    let mut total = (0, 0);
    for_each_scan(plan, &mut |_, config| {
        let files = scan_files(config);
        total.0 += files.len() as u64;
        total.1 += files.values().sum::<u64>();
    });
    total
}
