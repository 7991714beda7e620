//! A physical optimizer rule for the Parquet scans of a plan: a filter reaches the scan both as
//! the table's own predicate and again when the engine pushes the filter above the scan into
//! it, so the scan's predicate holds each conjunct twice (`event_id = x AND event_id = x`) and
//! every file's statistics and every row were checked twice. The rule keeps one of each.

use std::sync::Arc;

use deltalake::datafusion::common::config::ConfigOptions;
use deltalake::datafusion::common::tree_node::{Transformed, TreeNode as _};
use deltalake::datafusion::datasource::physical_plan::{
    FileScanConfig, FileScanConfigBuilder, FileSource as _, ParquetSource,
};
use deltalake::datafusion::datasource::source::DataSourceExec;
use deltalake::datafusion::error::Result;
use deltalake::datafusion::physical_expr::{PhysicalExpr, conjunction, split_conjunction};
use deltalake::datafusion::physical_optimizer::PhysicalOptimizerRule;
use deltalake::datafusion::physical_plan::ExecutionPlan;

#[derive(Debug)]
pub(crate) struct OncePerConjunct;

impl PhysicalOptimizerRule for OncePerConjunct {
    fn optimize(&self, plan: Arc<dyn ExecutionPlan>, _: &ConfigOptions) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(config) = node
                .downcast_ref::<DataSourceExec>()
                .and_then(|e| e.data_source().downcast_ref::<FileScanConfig>())
            else {
                return Ok(Transformed::no(node));
            };
            let Some(parquet) = config.file_source().downcast_ref::<ParquetSource>() else {
                return Ok(Transformed::no(node));
            };
            let Some(predicate) = parquet.filter() else {
                return Ok(Transformed::no(node));
            };
            let all = split_conjunction(&predicate);
            let mut kept: Vec<Arc<dyn PhysicalExpr>> = Vec::with_capacity(all.len());
            for p in &all {
                if !kept.iter().any(|k| k.as_ref() == p.as_ref()) {
                    kept.push(Arc::clone(p));
                }
            }
            if kept.len() == all.len() {
                return Ok(Transformed::no(node));
            }
            let source = parquet.with_predicate(conjunction(kept));
            let config = FileScanConfigBuilder::from(config.clone())
                .with_source(Arc::new(source))
                .build();
            Ok(Transformed::yes(
                DataSourceExec::from_data_source(config) as Arc<dyn ExecutionPlan>
            ))
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "tarn_once_per_conjunct"
    }

    fn schema_check(&self) -> bool {
        true
    }
}
