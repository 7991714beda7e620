//! Scan accounting from an executed physical plan: the files each scan was planned over (after
//! partition and statistics pruning), the bytes the Parquet reader fetched, and the rows the
//! scans produced.

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
}

pub(crate) fn collect(plan: &Arc<dyn ExecutionPlan>) -> ScanStats {
    let mut s = ScanStats::default();
    walk(plan, &mut s);
    s
}

fn walk(plan: &Arc<dyn ExecutionPlan>, s: &mut ScanStats) {
    if let Some(exec) = plan.downcast_ref::<DataSourceExec>()
        && let Some(config) = exec.data_source().downcast_ref::<FileScanConfig>()
    {
        s.files_scanned += config.file_groups.iter().map(|g| g.len() as u64).sum::<u64>();
        if let Some(m) = plan.metrics() {
            s.rows_scanned += m.output_rows().unwrap_or(0) as u64;
            for metric in m.iter() {
                if let MetricValue::Count { name, count } = metric.value()
                    && name == "bytes_scanned"
                {
                    s.bytes_scanned += count.value() as u64;
                }
            }
        }
    }
    for child in plan.children() {
        walk(child, s);
    }
}
