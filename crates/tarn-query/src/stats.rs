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

/// Scan statistics of a plan; `urls` maps each table's object store URL, and the path prefix
/// of its files, to its dataset.
pub(crate) fn collect(
    plan: &Arc<dyn ExecutionPlan>,
    urls: &HashMap<String, String>,
    infrequent: &HashSet<(String, String)>,
) -> ScanStats {
    let mut s = ScanStats::default();
    walk(plan, urls, infrequent, &mut s);
    s
}

/// The (dataset, day) of a file path under one of the tables in `urls`.
fn dataset_day(urls: &HashMap<String, String>, path: &str) -> Option<(String, String)> {
    let (prefix, dataset) = urls.iter().find(|(p, _)| path.starts_with(p.as_str()))?;
    let day = path[prefix.len()..].strip_prefix("day=")?.split('/').next()?;
    Some((dataset.clone(), day.to_string()))
}

fn walk(
    plan: &Arc<dyn ExecutionPlan>,
    urls: &HashMap<String, String>,
    infrequent: &HashSet<(String, String)>,
    s: &mut ScanStats,
) {
    if let Some(exec) = plan.downcast_ref::<DataSourceExec>()
        && let Some(config) = exec.data_source().downcast_ref::<FileScanConfig>()
    {
        // A large file may be split into byte ranges scanned in parallel: count it once.
        let distinct: std::collections::HashSet<&str> = config
            .file_groups
            .iter()
            .flat_map(|g| g.files())
            .map(|f| f.object_meta.location.as_ref())
            .collect();
        s.files_scanned += distinct.len() as u64;
        if let Some(m) = plan.metrics() {
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
            let first_file = config
                .file_groups
                .iter()
                .flat_map(|g| g.files())
                .next()
                .map(|f| f.object_meta.location.as_ref().to_string());
            let dataset = urls
                .get(config.object_store_url.as_str())
                .or_else(|| {
                    let path = first_file?;
                    urls.iter()
                        .find(|(prefix, _)| path.starts_with(prefix.as_str()))
                        .map(|(_, d)| d)
                })
                .cloned()
                .unwrap_or_else(|| "(unknown)".to_string());
            if !infrequent.is_empty() {
                let (mut cold, mut all) = (0u64, 0u64);
                for f in config.file_groups.iter().flat_map(|g| g.files()) {
                    let size = f.object_meta.size;
                    all += size;
                    if dataset_day(urls, f.object_meta.location.as_ref()).is_some_and(|k| infrequent.contains(&k)) {
                        cold += size;
                    }
                }
                if cold > 0 {
                    let share = (bytes as f64 * cold as f64 / all.max(1) as f64) as u64;
                    *s.bytes_infrequent_by_dataset.entry(dataset.clone()).or_default() += share;
                }
            }
            *s.bytes_by_dataset.entry(dataset).or_default() += bytes;
        }
    }
    for child in plan.children() {
        walk(child, urls, infrequent, s);
    }
}

/// The (dataset, day) partitions the plan's scans list, from their files' paths.
pub(crate) fn scanned_days(
    plan: &Arc<dyn ExecutionPlan>,
    urls: &HashMap<String, String>,
    out: &mut std::collections::BTreeSet<(String, String)>,
) {
    if let Some(exec) = plan.downcast_ref::<DataSourceExec>()
        && let Some(config) = exec.data_source().downcast_ref::<FileScanConfig>()
    {
        for f in config.file_groups.iter().flat_map(|g| g.files()) {
            if let Some(k) = dataset_day(urls, f.object_meta.location.as_ref()) {
                out.insert(k);
            }
        }
    }
    for child in plan.children() {
        scanned_days(child, urls, out);
    }
}

/// (files, bytes) the plan's scans are planned over: within a scan each file once (a file
/// split into byte ranges is one file), at its full size; a table scanned twice (a self-join,
/// a UNION) counts twice.
pub(crate) fn planned_files(plan: &Arc<dyn ExecutionPlan>) -> (u64, u64) {
    fn walk(plan: &Arc<dyn ExecutionPlan>, total: &mut (u64, u64)) {
        if let Some(exec) = plan.downcast_ref::<DataSourceExec>()
            && let Some(config) = exec.data_source().downcast_ref::<FileScanConfig>()
        {
            let mut seen: HashMap<&str, u64> = HashMap::new();
            for f in config.file_groups.iter().flat_map(|g| g.files()) {
                seen.insert(f.object_meta.location.as_ref(), f.object_meta.size);
            }
            total.0 += seen.len() as u64;
            total.1 += seen.values().sum::<u64>();
        }
        for child in plan.children() {
            walk(child, total);
        }
    }
    let mut total = (0, 0);
    walk(plan, &mut total);
    total
}
