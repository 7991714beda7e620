//! Query: SQL over every dataset's Delta table through DataFusion, with partition pruning on
//! `day` and the tenant column (Delta partition values), and scan accounting read from the
//! executed plan's metrics.

mod convert;
pub mod external;
pub mod history;
mod pg_catalog;
pub mod rollup;
mod scan_rule;
mod stats;
pub mod usage;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltalake::arrow::array::RecordBatch;
use deltalake::arrow::datatypes::SchemaRef;
use deltalake::datafusion::execution::SendableRecordBatchStream;
use deltalake::datafusion::physical_plan::ExecutionPlan;

use deltalake::datafusion::error::DataFusionError;
use deltalake::datafusion::prelude::{SessionConfig, SessionContext};
use futures::StreamExt;
use tarn_catalog::Catalog;
use tarn_lake::Lake;
use tarn_lake::tiers::{Tier, Tiers};

pub use history::{History, QueryRecord};
pub use stats::ScanStats;
pub use usage::Usage;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The SQL is wrong: syntax, unknown table or column, type mismatch.
    #[error("{0}")]
    BadQuery(String),
    #[error("query failed: {0}")]
    Execution(String),
    #[error("query stopped after its timeout of {0:?}")]
    Timeout(Duration),
    /// The scan would read days in the archive tier, which must be restored first.
    #[error("{0}")]
    Archived(String),
    /// A guardrail refused the query before it ran: a byte budget or a required partition
    /// filter.
    #[error("{0}")]
    Refused(String),
    /// No such rollup (or other named object).
    #[error("{0}")]
    NotFound(String),
    /// The answer cannot be given now: a halted rollup, or curate far behind a rebuild.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A result column.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
}

/// The answer to a query.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QueryResult {
    pub columns: Vec<Column>,
    pub rows: Vec<Vec<serde_json::Value>>,
    /// True when the result had more rows than `row_limit` and was cut.
    pub truncated: bool,
    pub stats: ScanStats,
}

/// Limits of one query.
#[derive(Debug, Clone)]
pub struct QueryOptions {
    /// Most rows returned; when the result has more, it is cut and marked truncated.
    pub row_limit: usize,
    /// A query still running after this is stopped.
    pub timeout: Duration,
    /// Refuse the query, before it runs, when its scan would read more than this many bytes.
    pub bytes_max: Option<u64>,
    /// Who asks (a key's name), for the history; absent: `anonymous`.
    pub who: Option<String>,
}

/// What a query would read, from its plan, before it runs.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Estimate {
    /// Data files the scans would read, after partition and statistics pruning.
    pub files: u64,
    /// Their size in bytes (an upper bound of what the scans read).
    pub bytes: u64,
    /// `bytes` priced at the scan price.
    pub cost_usd: f64,
}

impl Default for QueryOptions {
    fn default() -> Self {
        Self {
            row_limit: 10_000,
            timeout: Duration::from_secs(300),
            bytes_max: None,
            who: None,
        }
    }
}

/// Runs SQL over the catalog's tables.
pub struct QueryEngine {
    lake: Lake,
    catalog: Arc<Catalog>,
    usage: Arc<Usage>,
    history: Arc<History>,
    tiers: Option<Tiers>,
    /// Dollars per TiB scanned, for each query's cost estimate.
    scan_price_tb: f64,
    /// Shared by every query: the memory pool (past it, sorts, joins and aggregations spill to
    /// disk) and the spill files.
    runtime: Arc<deltalake::datafusion::execution::runtime_env::RuntimeEnv>,
    memory_limit: usize,
    /// Queries running at once; more wait for a turn.
    permits: Arc<tokio::sync::Semaphore>,
    /// Each dataset's table as last loaded: a query brings it up to date by reading only the
    /// commits made since, instead of replaying the log.
    tables: tokio::sync::Mutex<HashMap<String, deltalake::DeltaTable>>,
    /// The file schema of each registered Parquet folder, by dataset and location: inferring
    /// it reads every footer, so it is done once (`forget` drops it).
    external_schemas: std::sync::Mutex<HashMap<String, (String, SchemaRef)>>,
    /// `pg_catalog` for PostgreSQL clients, made at the first of their statements.
    pg_catalog: std::sync::OnceLock<Arc<dyn deltalake::datafusion::catalog::SchemaProvider>>,
}

/// Default memory of all running queries together: 1 GiB.
pub const MEMORY_LIMIT_DEFAULT: usize = 1 << 30;
/// Default number of queries running at once.
pub const CONCURRENCY_DEFAULT: usize = 4;

/// A runtime whose memory pool shares `bytes` fairly among the operators that can spill, so
/// that one aggregation cannot starve a sort or a top-k that cannot; the pool's errors name
/// the largest consumers.
fn runtime_with_limit(bytes: usize) -> Result<Arc<deltalake::datafusion::execution::runtime_env::RuntimeEnv>> {
    use deltalake::datafusion::execution::memory_pool::{FairSpillPool, TrackConsumersPool};
    let top = std::num::NonZeroUsize::new(5).unwrap_or(std::num::NonZeroUsize::MIN);
    let pool = TrackConsumersPool::new(FairSpillPool::new(bytes), top);
    deltalake::datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(pool))
        .build_arc()
        .map_err(classify)
}

/// The month ("YYYY-MM", UTC) a query's scan is accounted to.
pub fn current_month() -> String {
    chrono_month(tarn_core::Clock::now_micros(&tarn_core::SystemClock))
}

fn chrono_month(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .unwrap_or_default()
        .format("%Y-%m")
        .to_string()
}

fn classify(e: DataFusionError) -> Error {
    match e {
        DataFusionError::SQL(..)
        | DataFusionError::Plan(_)
        | DataFusionError::SchemaError(..)
        | DataFusionError::NotImplemented(_) => Error::BadQuery(e.to_string()),
        DataFusionError::Diagnostic(_, inner) => classify(*inner),
        DataFusionError::Collection(mut errs) if !errs.is_empty() => classify(errs.remove(0)),
        DataFusionError::Shared(inner) => match &*inner {
            DataFusionError::SQL(..) | DataFusionError::Plan(_) | DataFusionError::SchemaError(..) => {
                Error::BadQuery(inner.to_string())
            }
            other => Error::Execution(other.to_string()),
        },
        DataFusionError::Context(ctx, inner) => match classify(*inner) {
            Error::BadQuery(m) => Error::BadQuery(format!("{ctx}: {m}")),
            Error::Execution(m) => Error::Execution(format!("{ctx}: {m}")),
            Error::Timeout(d) => Error::Timeout(d),
            Error::Archived(m) => Error::Archived(m),
            Error::Refused(m) => Error::Refused(m),
            Error::Internal(m) => Error::Internal(format!("{ctx}: {m}")),
            e @ (Error::NotFound(_) | Error::Unavailable(_)) => e,
        },
        other => Error::Execution(other.to_string()),
    }
}

impl QueryEngine {
    /// An engine whose scan accounting lives in `<lake>/_usage/scans.json`.
    pub fn new(lake: Lake, catalog: Arc<Catalog>) -> Self {
        let usage = Arc::new(Usage::open(lake.root().join("_usage").join("scans.json")));
        let history = Arc::new(History::open(lake.root().join("_usage").join("queries.ndjson")));
        let runtime = runtime_with_limit(MEMORY_LIMIT_DEFAULT)
            .unwrap_or_else(|_| Arc::new(deltalake::datafusion::execution::runtime_env::RuntimeEnv::default()));
        Self {
            lake,
            catalog,
            usage,
            history,
            tiers: None,
            scan_price_tb: 5.0,
            runtime,
            memory_limit: MEMORY_LIMIT_DEFAULT,
            permits: Arc::new(tokio::sync::Semaphore::new(CONCURRENCY_DEFAULT)),
            tables: tokio::sync::Mutex::new(HashMap::new()),
            external_schemas: std::sync::Mutex::new(HashMap::new()),
            pg_catalog: std::sync::OnceLock::new(),
        }
    }

    /// Limits the memory of all running queries together; past it, sorts, joins and
    /// aggregations spill to temporary files.
    pub fn with_memory_limit(mut self, bytes: usize) -> Result<Self> {
        self.runtime = runtime_with_limit(bytes)?;
        self.memory_limit = bytes;
        Ok(self)
    }

    /// Lets at most `n` queries run at once; the others wait for a turn.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.permits = Arc::new(tokio::sync::Semaphore::new(n.max(1)));
        self
    }

    /// Prices each query's scan at `dollars` per TiB (default 5).
    pub fn with_scan_price(mut self, dollars_per_tb: f64) -> Self {
        self.scan_price_tb = dollars_per_tb;
        self
    }

    /// Refuses scans over days in the archive tier of `tiers`.
    pub fn with_tiers(mut self, tiers: Tiers) -> Self {
        self.tiers = Some(tiers);
        self
    }

    /// Fails when the plan would read a day in the archive tier, naming the days and how to
    /// restore them.
    /// Returns the (dataset, day) partitions the plan reads from the infrequent tier.
    async fn check_archive(&self, plan: &Arc<dyn ExecutionPlan>, urls: &HashMap<String, String>) -> Result<Infrequent> {
        let Some(tiers) = &self.tiers else {
            return Ok(Infrequent::default());
        };
        let mut days = std::collections::BTreeSet::new();
        stats::scanned_days(plan, urls, &mut days);
        let mut archived = Vec::new();
        let mut infrequent = Infrequent::default();
        let mut views: HashMap<String, tarn_lake::tiers::TierView> = HashMap::new();
        for (dataset, day) in days {
            if !views.contains_key(&dataset) {
                let v = tiers
                    .view(&self.lake, &dataset)
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))?;
                views.insert(dataset.clone(), v);
            }
            let Some(view) = views.get(&dataset) else { continue };
            match view.tier(&day).map_err(|e| Error::Internal(e.to_string()))? {
                Tier::Archive => archived.push((dataset, day)),
                Tier::Infrequent => {
                    infrequent.insert((dataset, day));
                }
                Tier::Standard => {}
            }
        }
        let Some((first_ds, first_day)) = archived.first().cloned() else {
            return Ok(infrequent);
        };
        let list: Vec<String> = archived.iter().map(|(d, day)| format!("{d} day={day}")).collect();
        Err(Error::Archived(format!(
            "the query would read {} archived partition(s): {}; restore them first (for example `tarn restore --dataset {first_ds} --day {first_day}`) or leave them out with a filter on day",
            archived.len(),
            list.join(", ")
        )))
    }

    /// Drops the cached table of a dataset (its table moved away for a new major version).
    pub async fn forget(&self, dataset: &str) {
        self.tables.lock().await.remove(dataset);
        self.external_schemas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(dataset);
    }

    /// Registers a dataset read in place into a session.
    async fn register_external(
        &self,
        ctx: &SessionContext,
        spec: &tarn_core::DatasetSpec,
        ext: &tarn_core::External,
        urls: &mut HashMap<String, String>,
    ) -> Result<()> {
        let cached = self
            .external_schemas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&spec.name)
            .filter(|(loc, _)| *loc == ext.location)
            .map(|(_, s)| s.clone());
        let (provider, schema) = external::provider(ctx, ext, cached).await?;
        if let Some(s) = schema {
            self.external_schemas
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(spec.name.clone(), (ext.location.clone(), s));
        }
        ctx.register_table(spec.name.as_str(), provider).map_err(classify)?;
        urls.insert(
            format!("{}/", ext.location.trim_start_matches('/').trim_end_matches('/')),
            spec.name.clone(),
        );
        Ok(())
    }

    /// A dataset's table at its newest version: the cached one, updated incrementally (or
    /// opened afresh when that fails).
    async fn current_table(&self, dataset: &str) -> Result<deltalake::DeltaTable> {
        let cached = self.tables.lock().await.get(dataset).cloned();
        let table = match cached {
            Some(mut t) => match t.update_incremental(None).await {
                Ok(()) => t,
                Err(e) => {
                    tracing::warn!(dataset, error = %e, "table update failed; opening it afresh");
                    self.lake
                        .open_table(dataset)
                        .await
                        .map_err(|e| Error::Internal(e.to_string()))?
                }
            },
            None => self
                .lake
                .open_table(dataset)
                .await
                .map_err(|e| Error::Internal(e.to_string()))?,
        };
        self.tables.lock().await.insert(dataset.to_string(), table.clone());
        Ok(table)
    }

    /// Bytes scanned by queries, per dataset and month.
    pub fn usage(&self) -> &Usage {
        &self.usage
    }

    /// The query history (`system.queries`).
    pub fn history(&self) -> &History {
        &self.history
    }

    /// A session with every dataset that has a table registered under its name, and the
    /// object store URL of each table (how a scan is traced back to its dataset).
    async fn session(&self, sql: &str, pg: bool) -> Result<(SessionContext, HashMap<String, String>)> {
        use deltalake::logstore::LogStore as _;
        // A sort holds back a share of memory for merging its spill files; with a small limit
        // that share must shrink too.
        let reserve = (self.memory_limit / 4).min(10 << 20);
        // Small limits also get small batches and one partition per operator, so that the
        // memory each operator holds at a time stays well under its share.
        let small = self.memory_limit < (64 << 20);
        let mut config = SessionConfig::new()
            .with_information_schema(true)
            .with_batch_size(if small { 1024 } else { 8192 });
        if small {
            config = config.with_target_partitions(1);
        }
        // tarn writes no Parquet bloom filters, so looking for them in every row group of its
        // files is wasted reads (a tenth of a point lookup's time); registered data may have
        // them, and keeps them in use when the statement names it.
        let external = self
            .catalog
            .list()
            .iter()
            .any(|s| s.external.is_some() && mentions(sql, &s.name));
        config.options_mut().execution.parquet.bloom_filter_on_read = external;
        let config = config.with_sort_spill_reservation_bytes(reserve);
        let state = deltalake::datafusion::execution::session_state::SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(self.runtime.clone())
            .with_default_features()
            .with_physical_optimizer_rule(Arc::new(scan_rule::OncePerConjunct))
            .build();
        let ctx = SessionContext::new_with_state(state);
        let mut urls = HashMap::new();
        use deltalake::datafusion::catalog::SchemaProvider as _;
        let system = Arc::new(deltalake::datafusion::catalog::MemorySchemaProvider::new());
        // The history is copied into the session only for a statement that can name it: most
        // queries do not pay for up to 10,000 rows they never read.
        let wanted = sql.to_ascii_lowercase().contains("queries");
        let rows = if wanted {
            vec![self.history.batch().map_err(|e| Error::Internal(e.to_string()))?]
        } else {
            vec![RecordBatch::new_empty(History::schema())]
        };
        let queries =
            deltalake::datafusion::datasource::MemTable::try_new(History::schema(), vec![rows]).map_err(classify)?;
        system
            .register_table("queries".into(), Arc::new(queries))
            .map_err(classify)?;
        if let Some(catalog) = ctx.catalog("datafusion") {
            catalog.register_schema("system", system).map_err(classify)?;
        }
        if pg {
            // The functions PostgreSQL clients call, and the engine's one `pg_catalog` (its
            // OIDs stay the same from one statement to the next).
            datafusion_pg_catalog::setup_pg_catalog(
                &ctx,
                "datafusion",
                datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider,
            )
            .map_err(|e| Error::Internal(format!("setting up pg_catalog: {e}")))?;
            let provider = match self.pg_catalog.get() {
                Some(p) => p.clone(),
                None => {
                    let p = pg_catalog::provider(self.catalog.clone(), self.lake.clone())
                        .map_err(|e| Error::Internal(format!("setting up pg_catalog: {e}")))?;
                    self.pg_catalog.get_or_init(|| p).clone()
                }
            };
            if let Some(catalog) = ctx.catalog("datafusion") {
                catalog.register_schema("pg_catalog", provider).map_err(classify)?;
            }
            ctx.register_udf(pg_catalog::size_pretty_udf());
            // Clients read the server's kind and version from version().
            let text = format!(
                "PostgreSQL 16.0 (tarn {}, Apache DataFusion)",
                env!("CARGO_PKG_VERSION")
            );
            ctx.register_udf(deltalake::datafusion::logical_expr::create_udf(
                "version",
                vec![],
                deltalake::arrow::datatypes::DataType::Utf8,
                deltalake::datafusion::logical_expr::Volatility::Immutable,
                Arc::new(move |_: &[deltalake::datafusion::logical_expr::ColumnarValue]| {
                    Ok(deltalake::datafusion::logical_expr::ColumnarValue::Scalar(
                        deltalake::datafusion::scalar::ScalarValue::Utf8(Some(text.clone())),
                    ))
                }),
            ));
        }
        for spec in self.catalog.list() {
            if let Some(ext) = &spec.external {
                // Registered data is opened only for a statement that names it: reading a
                // Delta log or a folder listing costs more than a table of tarn's.
                if !mentions(sql, &spec.name) {
                    continue;
                }
                match self.register_external(&ctx, &spec, ext, &mut urls).await {
                    Ok(()) => {}
                    Err(e) if !mentions(sql, &spec.name) => {
                        tracing::warn!(dataset = %spec.name, error = %e, "registered data cannot be read; left out of this query");
                    }
                    Err(e) => {
                        return Err(Error::Internal(format!(
                            "reading {} at {}: {e}",
                            spec.name, ext.location
                        )));
                    }
                }
                continue;
            }
            // A table in a bucket that this process has not seen yet is looked for only when
            // the statement may name it.
            let exists = self.lake.table_exists(&spec.name)
                || (mentions(sql, &spec.name)
                    && self
                        .lake
                        .has_table(&spec.name)
                        .await
                        .map_err(|e| Error::Internal(format!("looking for the table of {}: {e}", spec.name)))?);
            if !exists {
                continue;
            }
            // A table that cannot be opened fails only the statements that name it; the
            // others run over the rest.
            let opened = async {
                let table = self.current_table(&spec.name).await?;
                let provider = delta_provider(&table, &ctx).await?;
                Ok::<_, Error>((table, provider))
            }
            .await;
            let (table, provider) = match opened {
                Ok(p) => p,
                Err(e) if !mentions(sql, &spec.name) => {
                    tracing::warn!(dataset = %spec.name, error = %e, "table cannot be opened; left out of this query");
                    continue;
                }
                Err(e) => return Err(Error::Internal(format!("opening the table of {}: {e}", spec.name))),
            };
            ctx.register_table(spec.name.as_str(), provider).map_err(classify)?;
            urls.insert(
                table.log_store().object_store_url().as_str().to_string(),
                spec.name.clone(),
            );
            urls.insert(self.lake.table_prefix(&spec.name), spec.name.clone());
        }
        Ok((ctx, urls))
    }

    /// Plans a statement and starts it; batches are computed as they are pulled, so a caller
    /// that stops pulling (or drops the stream) stops the work.
    pub async fn stream(&self, who: &str, sql: &str, bytes_max: Option<u64>, pg: bool) -> Result<QueryStream> {
        let started = Instant::now();
        let started_us = tarn_core::Clock::now_micros(&tarn_core::SystemClock);
        let res = self.start(who, sql, bytes_max, pg, started, started_us).await;
        if let Err(e) = &res {
            let status = match e {
                Error::Refused(_) | Error::Archived(_) => "refused",
                _ => "error",
            };
            self.record_unstarted(who, sql, started_us, started, status, e);
        }
        res
    }

    /// Records a query that ended before it had a stream: refused, failed to plan, or out of
    /// time while it waited for a turn or planned.
    pub fn record_unstarted(&self, who: &str, sql: &str, started_us: i64, started: Instant, status: &str, e: &Error) {
        self.history.record(QueryRecord {
            who: who.into(),
            sql: sql.to_string(),
            started_us,
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            rows: 0,
            bytes_scanned: 0,
            status: status.into(),
            error: Some(e.to_string()),
        });
    }

    /// Starts a query within `timeout`; one that runs out of time before it starts is
    /// recorded in the history as stopped.
    pub async fn stream_within(
        &self,
        who: &str,
        sql: &str,
        bytes_max: Option<u64>,
        pg: bool,
        timeout: Duration,
    ) -> Result<QueryStream> {
        let started = Instant::now();
        let started_us = tarn_core::Clock::now_micros(&tarn_core::SystemClock);
        match tokio::time::timeout(timeout, self.stream(who, sql, bytes_max, pg)).await {
            Ok(r) => r,
            Err(_) => {
                let e = Error::Timeout(timeout);
                self.record_unstarted(who, sql, started_us, started, "stopped", &e);
                Err(e)
            }
        }
    }

    async fn start(
        &self,
        who: &str,
        sql: &str,
        bytes_max: Option<u64>,
        pg: bool,
        started: Instant,
        started_us: i64,
    ) -> Result<QueryStream> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Internal("query permits closed".into()))?;
        let Planned {
            ctx,
            urls,
            schema,
            plan,
            infrequent,
        } = self.plan(sql, pg).await?;
        let est = self.estimate_plan(&plan);
        if let Some(max) = bytes_max
            && est.bytes > max
        {
            return Err(Error::Refused(format!(
                "the query would read {} bytes in {} files (about ${:.6}), more than its budget of {max} bytes; filter on day or the tenant column to read less",
                est.bytes, est.files, est.cost_usd
            )));
        }
        let batches =
            deltalake::datafusion::physical_plan::execute_stream(plan.clone(), ctx.task_ctx()).map_err(classify)?;
        Ok(QueryStream {
            schema,
            batches,
            plan,
            started,
            rows: 0,
            urls,
            infrequent,
            usage: self.usage.clone(),
            scan_price_tb: self.scan_price_tb,
            history: self.history.clone(),
            sql: sql.to_string(),
            who: who.to_string(),
            started_us,
            finished: false,
            error: None,
            _permit: permit,
        })
    }

    /// Plans a read-only statement and checks the guardrails that need no budget: required
    /// partition filters and archived days.
    async fn plan(&self, sql: &str, pg: bool) -> Result<Planned> {
        let (ctx, urls) = self.session(sql, pg).await?;
        let df = ctx.sql_with_options(sql, read_only()).await.map_err(classify)?;
        self.check_partition_filters(&df)?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        let plan = df.create_physical_plan().await.map_err(classify)?;
        let infrequent = self.check_archive(&plan, &urls).await?;
        Ok(Planned {
            ctx,
            urls,
            schema,
            plan,
            infrequent,
        })
    }

    /// What a statement would read, planned but not run (the guardrails apply as they would).
    /// The columns a statement would answer with, from its plan, without running it.
    pub async fn describe(&self, sql: &str, pg: bool) -> Result<SchemaRef> {
        let df = {
            let (ctx, _) = self.session(sql, pg).await?;
            ctx.sql_with_options(sql, read_only()).await.map_err(classify)?
        };
        Ok(Arc::new(df.schema().as_arrow().clone()))
    }

    pub async fn estimate(&self, sql: &str) -> Result<Estimate> {
        let planned = self.plan(sql, false).await?;
        Ok(self.estimate_plan(&planned.plan))
    }

    fn estimate_plan(&self, plan: &Arc<dyn ExecutionPlan>) -> Estimate {
        let (files, bytes) = stats::planned_files(plan);
        Estimate {
            files,
            bytes,
            cost_usd: scan_cost_usd(bytes, self.scan_price_tb),
        }
    }

    /// Refuses a query that scans a dataset whose contract requires a partition filter without
    /// one, naming the dataset and its partition columns.
    fn check_partition_filters(&self, df: &deltalake::datafusion::prelude::DataFrame) -> Result<()> {
        use deltalake::datafusion::common::tree_node::TreeNodeRecursion;
        use deltalake::datafusion::logical_expr::LogicalPlan;
        let guarded: Vec<_> = self
            .catalog
            .list()
            .into_iter()
            .filter(|s| s.query.require_partition_filter)
            .collect();
        if guarded.is_empty() {
            return Ok(());
        }
        let plan = df.clone().into_optimized_plan().map_err(classify)?;
        let mut missing: Vec<String> = Vec::new();
        plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node
                && let Some(spec) = guarded.iter().find(|s| scan.table_name.table() == s.name)
            {
                let parts = tarn_lake::table::partition_columns(spec);
                let filtered = scan
                    .filters
                    .iter()
                    .flat_map(|f| deltalake::datafusion::logical_expr::utils::split_conjunction(f))
                    .any(|e| narrows_partition(e, &parts));
                if !filtered {
                    missing.push(format!("{} (filter on {})", spec.name, parts.join(" or ")));
                }
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .map_err(classify)?;
        if missing.is_empty() {
            return Ok(());
        }
        Err(Error::Refused(format!(
            "a query over {} must filter on a partition column",
            missing.join(", ")
        )))
    }

    /// Plans and runs one SQL statement, keeping at most `row_limit` rows and giving up after
    /// `timeout`.
    pub async fn sql(&self, sql: &str, opts: &QueryOptions) -> Result<QueryResult> {
        let deadline = tokio::time::Instant::now() + opts.timeout;
        let who = opts.who.as_deref().unwrap_or(ANONYMOUS);
        let mut q = self
            .stream_within(who, sql, opts.bytes_max, false, opts.timeout)
            .await?;
        let mut rows = Vec::new();
        let mut truncated = false;
        while let Some(batch) = tokio::time::timeout_at(deadline, q.next())
            .await
            .map_err(|_| Error::Timeout(opts.timeout))?
        {
            let batch = batch?;
            let room = opts.row_limit - rows.len();
            let take = batch.num_rows().min(room);
            convert::append_rows(&batch.slice(0, take), &mut rows)?;
            if take < batch.num_rows() {
                // More rows exist than were asked for: stop computing them.
                truncated = true;
                break;
            }
        }
        let mut stats = q.stats();
        stats.rows_returned = rows.len() as u64;
        let columns = q
            .schema
            .fields()
            .iter()
            .map(|f| Column {
                name: f.name().clone(),
                ty: f.data_type().to_string(),
            })
            .collect();
        Ok(QueryResult {
            columns,
            rows,
            truncated,
            stats,
        })
    }
}

/// A statement planned and past the guardrails that need no budget.
struct Planned {
    ctx: SessionContext,
    urls: HashMap<String, String>,
    schema: SchemaRef,
    plan: Arc<dyn ExecutionPlan>,
    infrequent: Infrequent,
}

/// Dollars for scanning `bytes` at `price_tb` dollars per TiB.
fn scan_cost_usd(bytes: u64, price_tb: f64) -> f64 {
    bytes as f64 / (1u64 << 40) as f64 * price_tb
}

/// A running query.
pub struct QueryStream {
    pub schema: SchemaRef,
    batches: SendableRecordBatchStream,
    plan: Arc<dyn ExecutionPlan>,
    started: Instant,
    rows: u64,
    urls: HashMap<String, String>,
    infrequent: Infrequent,
    usage: Arc<Usage>,
    scan_price_tb: f64,
    history: Arc<History>,
    sql: String,
    who: String,
    started_us: i64,
    finished: bool,
    error: Option<String>,
    /// The query's turn; released when the stream is dropped.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// A Delta table as a DataFusion table, with the session set up to read it.
pub(crate) async fn delta_provider(
    table: &deltalake::DeltaTable,
    ctx: &SessionContext,
) -> Result<Arc<dyn deltalake::datafusion::catalog::TableProvider>> {
    table
        .update_datafusion_session(&ctx.state())
        .map_err(|e| Error::Internal(e.to_string()))?;
    table.table_provider().await.map_err(|e| Error::Internal(e.to_string()))
}

/// Whether `sql` may name `dataset` (a whole-word, case-insensitive match).
fn mentions(sql: &str, dataset: &str) -> bool {
    let sql = sql.to_ascii_lowercase();
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    sql.match_indices(dataset).any(|(i, m)| {
        let before = sql[..i].chars().next_back();
        let after = sql[i + m.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}

/// SQL that only reads: no DDL (CREATE, DROP), no DML (INSERT, COPY), no SET or other
/// statements. Tables change through ingestion and maintenance only.
fn read_only() -> deltalake::datafusion::execution::context::SQLOptions {
    deltalake::datafusion::execution::context::SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// Whether one conjunct of a scan's filters narrows it by a partition column: a comparison,
/// `IN` list or `BETWEEN` of a partition column against literals. A filter that only mentions
/// one (`day IS NOT NULL`, `day <> 'x'`, `x = 1 OR day = 'y'`) does not count.
fn narrows_partition(e: &deltalake::datafusion::logical_expr::Expr, parts: &[String]) -> bool {
    use deltalake::datafusion::logical_expr::{Between, BinaryExpr, Expr, Operator};
    let is_part = |e: &Expr| matches!(e, Expr::Column(c) if parts.contains(&c.name));
    let is_lit = |e: &Expr| matches!(e, Expr::Literal(..));
    match e {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            matches!(
                op,
                Operator::Eq | Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq
            ) && ((is_part(left) && is_lit(right)) || (is_lit(left) && is_part(right)))
        }
        Expr::InList(l) => !l.negated && is_part(&l.expr) && l.list.iter().all(is_lit),
        Expr::Between(Between {
            expr,
            negated,
            low,
            high,
            ..
        }) => !negated && is_part(expr) && is_lit(low) && is_lit(high),
        _ => false,
    }
}

/// A statement from a PostgreSQL client in the form the engine reads: PostgreSQL-only syntax
/// that BI tools and `psql` send (`::regclass` casts, `pg_catalog` idioms) rewritten to what
/// DataFusion plans. The text comes back unchanged when it does not parse as one statement.
///
/// The rewrite parses and prints the statement again, and the printer keeps a quote that
/// follows a backslash as it is, which reads back as the end of the literal. A literal with
/// a backslash (`'x\'' OR 1=1 --'` is one value to the engine) is therefore lifted out before
/// the rewrite and put back, byte for byte, after it: no value can change the statement.
pub fn postgres_statement(sql: &str) -> String {
    use deltalake::datafusion::sql::sqlparser::dialect::GenericDialect;
    use deltalake::datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, sql).with_unescape(false).tokenize() else {
        return sql.to_string();
    };
    let tokens = pg_catalog::builtin_regclass(tokens);
    let highest = tokens
        .iter()
        .filter_map(|t| match t {
            Token::Placeholder(p) => p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let mut lifted: Vec<String> = Vec::new();
    let mut text = String::with_capacity(sql.len());
    for t in &tokens {
        match t {
            Token::SingleQuotedString(raw) if raw.contains('\\') => {
                lifted.push(raw.clone());
                text.push_str(&format!("${}", highest + lifted.len()));
            }
            other => text.push_str(&other.to_string()),
        }
    }
    let parser = datafusion_pg_catalog::sql::PostgresCompatibilityParser::new();
    let rewritten = match parser.parse(&text) {
        Ok(mut v) if v.len() == 1 => v
            .pop()
            .map(|mut s| {
                pg_catalog::catalog_rewrites(&mut s);
                s.to_string()
            })
            .unwrap_or(text),
        _ => return sql.to_string(),
    };
    if lifted.is_empty() {
        return rewritten;
    }
    // Put each lifted literal back where its placeholder is (outside other literals).
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, &rewritten)
        .with_unescape(false)
        .tokenize()
    else {
        return sql.to_string();
    };
    let mut out = String::with_capacity(rewritten.len());
    for t in &tokens {
        let back = match t {
            Token::Placeholder(p) => p
                .strip_prefix('$')
                .and_then(|n| n.parse::<usize>().ok())
                .and_then(|n| n.checked_sub(highest + 1))
                .and_then(|i| lifted.get(i)),
            _ => None,
        };
        match back {
            Some(raw) => out.push_str(&format!("'{raw}'")),
            None => out.push_str(&t.to_string()),
        }
    }
    out
}

/// Who a query without a key is recorded as.
pub const ANONYMOUS: &str = "anonymous";

/// (dataset, day) partitions in the infrequent tier, whose reads are priced as retrievals.
type Infrequent = std::collections::HashSet<(String, String)>;

impl Drop for QueryStream {
    /// However the query ended (done, cut at its row limit, cancelled, timed out), what it read
    /// is accounted.
    fn drop(&mut self) {
        let s = self.stats();
        let month = current_month();
        self.usage.record(&month, &s.bytes_by_dataset);
        self.usage.record_retrieved(&month, &s.bytes_infrequent_by_dataset);
        let status = match (&self.error, self.finished) {
            (Some(_), _) => "error",
            (None, true) => "ok",
            (None, false) => "stopped",
        };
        self.history.record(QueryRecord {
            who: std::mem::take(&mut self.who),
            sql: std::mem::take(&mut self.sql),
            started_us: self.started_us,
            duration_ms: s.duration_ms,
            rows: s.rows_returned,
            bytes_scanned: s.bytes_scanned,
            status: status.into(),
            error: self.error.take(),
        });
    }
}

impl QueryStream {
    /// The next batch of the result.
    pub async fn next(&mut self) -> Option<Result<RecordBatch>> {
        let Some(b) = self.batches.next().await else {
            self.finished = true;
            return None;
        };
        Some(match b {
            Ok(b) => {
                self.rows += b.num_rows() as u64;
                Ok(b)
            }
            Err(e) => {
                let e = classify(e);
                self.error = Some(e.to_string());
                Err(e)
            }
        })
    }

    /// What the query has read so far (all of it, once the stream is exhausted).
    pub fn stats(&self) -> ScanStats {
        let mut s = stats::collect(&self.plan, &self.urls, &self.infrequent);
        s.rows_returned = self.rows;
        s.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        s.estimated_cost_usd = scan_cost_usd(s.bytes_scanned, self.scan_price_tb);
        s
    }
}

#[cfg(test)]
mod postgres_tests {
    use super::*;

    #[test]
    fn no_literal_ends_early_through_the_rewrite() {
        // One value each to the engine (a backslash is a backslash, '' is a quote).
        for sql in [
            "SELECT count(*) FROM t WHERE c = 'x\\'' OR 1=1 --'",
            "SELECT 'a\\', 'b''c', $1 FROM t WHERE c = 'd\\'' OR true --'",
        ] {
            let out = postgres_statement(sql);
            let count = |s: &str| {
                use deltalake::datafusion::sql::sqlparser::dialect::GenericDialect;
                use deltalake::datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
                let toks = Tokenizer::new(&GenericDialect {}, s)
                    .tokenize()
                    .unwrap_or_else(|e| panic!("{e}: {s:?}"));
                let lits: Vec<String> = toks
                    .into_iter()
                    .filter_map(|t| match t {
                        Token::SingleQuotedString(v) => Some(v),
                        _ => None,
                    })
                    .collect();
                lits
            };
            assert_eq!(count(&out), count(sql), "{sql} became {out}");
        }
    }
}

#[cfg(test)]
mod name_tests {
    use super::mentions;

    #[test]
    fn a_dataset_is_mentioned_only_as_a_whole_word() {
        assert!(mentions("SELECT * FROM Clicks WHERE x = 1", "clicks"));
        assert!(mentions("select count(*) from clicks", "clicks"));
        assert!(!mentions("SELECT * FROM clicks_daily", "clicks"));
        assert!(!mentions("SELECT * FROM my_clicks", "clicks"));
        assert!(!mentions("SELECT 1", "clicks"));
    }
}
