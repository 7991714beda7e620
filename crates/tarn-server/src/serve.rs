//! `tarn serve`: opens the data directory, starts delivery for every dataset and the curate
//! subscriber, and serves HTTP until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use tarn_catalog::Catalog;
use tarn_collector::{Collector, CollectorOptions};
use tarn_core::{Clock, Limits, SystemClock};
use tarn_lake::Lake;
use tarn_lake::curate::CurateStats;
use tarn_log::{Log, LogOptions};
use tarn_query::QueryEngine;
use tarn_query::rollup::{RollupOptions, Rollups};
use tokio::sync::watch;

use crate::maintenance::{AutoCompaction, Maintenance};
use tarn_lake::storage::Prices;
use tarn_lake::tiers::Tiers;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Data directory: log, lake and catalog live here.
    #[arg(long, env = "TARN_DATA_DIR", default_value = "tarn-data")]
    pub data_dir: PathBuf,
    /// The stream: `embedded` (the log in <data-dir>/log) or `nats://HOST:PORT[/NAMESPACE]`,
    /// NATS with JetStream (namespace `tarn` by default: the prefix of every stream and bucket
    /// tarn makes there).
    #[arg(long, env = "TARN_STREAM", default_value = "embedded")]
    pub stream: String,
    /// Replicas of each JetStream stream tarn makes (1, 3 or 5; past 1 takes a NATS cluster).
    #[arg(long, env = "TARN_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
    /// Bytes the stream of a size-M dataset may hold (S: a quarter, L: four times) before
    /// appends are refused with 503 until delivery catches up (0: the NATS server's own limit).
    #[arg(long, env = "TARN_STREAM_BYTES_MAX", default_value_t = 0)]
    pub stream_bytes_max: u64,
    /// Records older than this many hours leave the NATS stream even if not yet delivered
    /// (0: never; a record stays until every consumer group is past it).
    #[arg(long, env = "TARN_STREAM_MAX_AGE_HOURS", default_value_t = 0)]
    pub stream_max_age_hours: u64,
    /// The metadata store (contracts, their versions, producer keys): `files` (in the data
    /// directory) or `postgres://USER[:PASS]@HOST[:PORT]/DB`, shared by every tarn process of a
    /// deployment; migrations are applied at start.
    #[arg(long, env = "TARN_META", default_value = "files")]
    pub meta: String,
    /// The PostgreSQL schema of the metadata store.
    #[arg(long, env = "TARN_META_SCHEMA", default_value = "tarn")]
    pub meta_schema: String,
    /// The lake: `local` (<data-dir>/lake) or `s3://BUCKET[/PREFIX]` on an S3-compatible store,
    /// configured by the standard AWS variables (AWS_ENDPOINT_URL, AWS_REGION,
    /// AWS_ACCESS_KEY_ID, ...) and the profile of ~/.aws/credentials and ~/.aws/config. The
    /// store must honour conditional puts; tarn checks at start and refuses one that does not.
    #[arg(long, env = "TARN_LAKE", default_value = "local")]
    pub lake: String,
    /// What this process does, a comma-separated list: `collector` (ingest over HTTP),
    /// `worker` (delivery, curate and maintenance, shared with the other workers of the stream
    /// by leases), `query` (SQL over HTTP and the PostgreSQL protocol, the catalog, rollups and
    /// admin calls). All three by default.
    #[arg(long, env = "TARN_ROLES", default_value = "collector,worker,query")]
    pub roles: String,
    /// HTTP listen address.
    #[arg(long, env = "TARN_HTTP", default_value = crate::DEFAULT_HTTP)]
    pub http: SocketAddr,
    /// PostgreSQL wire protocol listen address, or `off`.
    #[arg(long, env = "TARN_PG", default_value = crate::pg::DEFAULT_PG)]
    pub pg: String,
    /// Most PostgreSQL connections open at once; past it a new one is closed at once.
    #[arg(long, env = "TARN_PG_CONNECTIONS_MAX", default_value_t = 256)]
    pub pg_connections_max: usize,
    /// Seconds a PostgreSQL cursor may go without a FETCH or MOVE; then its query is stopped,
    /// giving back its turn among the queries at once (a later FETCH from it is an error).
    #[arg(long, env = "TARN_PG_CURSOR_IDLE_S", default_value_t = 300)]
    pub pg_cursor_idle_s: u64,
    /// TLS certificate chain (PEM) for the PostgreSQL listener; with it, clients must use TLS.
    #[arg(long, env = "TARN_PG_TLS_CERT", requires = "pg_tls_key")]
    pub pg_tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the PostgreSQL listener.
    #[arg(long, env = "TARN_PG_TLS_KEY", requires = "pg_tls_cert")]
    pub pg_tls_key: Option<PathBuf>,
    /// Folder of dataset descriptors (*.yaml) to register at start.
    #[arg(long, env = "TARN_DATASETS")]
    pub datasets: Option<PathBuf>,
    /// Refuse writes to datasets without a descriptor instead of inferring their contract.
    #[arg(long, env = "TARN_NO_INFER")]
    pub no_infer: bool,
    /// CPUs kept free of delivery and curate while ingest requests arrive, unless ingest keeps
    /// every CPU busy (the lowest-numbered of those the process may use); by default one in
    /// four, at least one, none on a single CPU. 0 turns it off.
    #[arg(long, env = "TARN_INGEST_CPUS")]
    pub ingest_cpus: Option<usize>,
    /// Delivery closes a batch after this many milliseconds.
    #[arg(long, env = "TARN_BATCH_AGE_MS", default_value_t = Limits::default().delivery_batch_age_ms)]
    pub batch_age_ms: u64,
    /// Delivery closes a batch at this many bytes of encoded events.
    #[arg(long, env = "TARN_BATCH_BYTES", default_value_t = Limits::default().delivery_batch_bytes)]
    pub batch_bytes: usize,
    /// Curate commits the rows it gathered once they take this much memory (when it is behind,
    /// fewer and larger commits: fewer files per partition, more memory held).
    #[arg(long, env = "TARN_CURATE_COMMIT_BYTES", default_value_t = Limits::default().curate_commit_bytes)]
    pub curate_commit_bytes: usize,
    /// The embedded log's segments roll at this many bytes.
    #[arg(long, env = "TARN_LOG_SEGMENT_BYTES", default_value_t = Limits::default().segment_bytes_max)]
    pub log_segment_bytes: u64,
    /// Consumed log segment files kept for reuse by new segments (0: deleted at once).
    #[arg(long, env = "TARN_LOG_SPARE_SEGMENTS", default_value_t = LogOptions::default().spare_segments)]
    pub log_spare_segments: usize,
    /// Largest request body in bytes.
    #[arg(long, env = "TARN_BODY_BYTES_MAX", default_value_t = Limits::default().body_bytes_max)]
    pub body_bytes_max: usize,
    /// Bytes of ingest requests being decoded or awaiting their append at once (each request
    /// counts three times its body size, or three times the decompressed cap when compressed);
    /// past it the collector answers 503 with Retry-After.
    #[arg(long, env = "TARN_INFLIGHT_BYTES_MAX", default_value_t = Limits::default().ingest_inflight_bytes_max)]
    pub inflight_bytes_max: usize,
    /// Compact a partition on its own once it holds this many small files (0: never).
    #[arg(long, env = "TARN_COMPACT_TRIGGER_FILES", default_value_t = 32)]
    pub compact_trigger_files: usize,
    /// Compact a partition on its own, by size tier, once nothing has been written to it for
    /// this many seconds (0: never).
    #[arg(long, env = "TARN_COMPACT_QUIET_S", default_value_t = 60)]
    pub compact_quiet_s: u64,
    /// How often partitions are checked against the compaction triggers, in milliseconds.
    #[arg(long, env = "TARN_COMPACT_CHECK_MS", default_value_t = 30_000)]
    pub compact_check_ms: u64,
    /// Compact every partition with two or more small files this often, then vacuum, in
    /// seconds (0: never).
    #[arg(long, env = "TARN_COMPACT_EVERY_S", default_value_t = 3600)]
    pub compact_every_s: u64,
    /// Memory of all running queries together, in MiB; past it, sorts, joins and aggregations
    /// spill to temporary files.
    #[arg(long, env = "TARN_QUERY_MEMORY_MB", default_value_t = 1024)]
    pub query_memory_mb: usize,
    /// Queries running at once; more wait for a turn.
    #[arg(long, env = "TARN_QUERY_CONCURRENCY", default_value_t = 4)]
    pub query_concurrency: usize,
    /// Refuse, before it runs, any query whose scan would read more than this many bytes
    /// (0: no budget). A request's own `bytes_max` can only lower it.
    #[arg(long, env = "TARN_QUERY_BYTES_MAX", default_value_t = 0)]
    pub query_bytes_max: u64,
    /// Storage price per GB-month of the standard tier, in dollars (cost report).
    #[arg(long, env = "TARN_PRICE_STANDARD_GB_MONTH", default_value_t = Prices::default().standard_gb_month)]
    pub price_standard_gb_month: f64,
    /// Storage price per GB-month of the infrequent tier.
    #[arg(long, env = "TARN_PRICE_INFREQUENT_GB_MONTH", default_value_t = Prices::default().infrequent_gb_month)]
    pub price_infrequent_gb_month: f64,
    /// Retrieval price per GB read from the infrequent tier.
    #[arg(long, env = "TARN_PRICE_RETRIEVAL_GB", default_value_t = Prices::default().infrequent_retrieval_gb)]
    pub price_retrieval_gb: f64,
    /// Storage price per GB-month of the archive tier.
    #[arg(long, env = "TARN_PRICE_ARCHIVE_GB_MONTH", default_value_t = Prices::default().archive_gb_month)]
    pub price_archive_gb_month: f64,
    /// Price per TB scanned by queries.
    #[arg(long, env = "TARN_PRICE_SCAN_TB", default_value_t = Prices::default().scan_tb)]
    pub price_scan_tb: f64,
    /// Directory of the infrequent tier (default: <data-dir>/lake/tiers/infrequent).
    #[arg(long, env = "TARN_TIER_INFREQUENT_DIR")]
    pub tier_infrequent_dir: Option<PathBuf>,
    /// Directory of the archive tier (default: <data-dir>/lake/tiers/archive).
    #[arg(long, env = "TARN_TIER_ARCHIVE_DIR")]
    pub tier_archive_dir: Option<PathBuf>,
    /// S3 storage class of the infrequent tier, for a lake in a bucket (default STANDARD_IA).
    #[arg(long, env = "TARN_TIER_INFREQUENT_CLASS")]
    pub tier_infrequent_class: Option<String>,
    /// S3 storage class of the archive tier, for a lake in a bucket (default GLACIER_IR; a class
    /// that needs a restore before a read, GLACIER or DEEP_ARCHIVE, is refused).
    #[arg(long, env = "TARN_TIER_ARCHIVE_CLASS")]
    pub tier_archive_class: Option<String>,
    /// Vacuum deletes data files unreferenced for longer than this many hours (at least 2).
    #[arg(long, env = "TARN_VACUUM_RETAIN_HOURS", default_value_t = 168)]
    pub vacuum_retain_hours: u64,
    /// Read keys of the rollup API (YAML; see `tarn keys new`). Without it the rollup API is
    /// open, like the rest of the API.
    #[arg(long, env = "TARN_READ_KEYS")]
    pub read_keys: Option<PathBuf>,
    /// Accumulators (group x bucket) one rollup may hold; past it the rollup halts until the
    /// limit is raised and the missing days rebuilt.
    #[arg(long, env = "TARN_ROLLUP_GROUPS_MAX", default_value_t = RollupOptions::default().groups_max)]
    pub rollup_groups_max: usize,
    /// Longest time between rollup checkpoints while batches arrive, in milliseconds.
    #[arg(long, env = "TARN_ROLLUP_CHECKPOINT_MS", default_value_t = RollupOptions::default().checkpoint_ms)]
    pub rollup_checkpoint_ms: u64,
}

/// Everything the HTTP handlers reach.
pub struct App {
    pub roles: crate::worker::Roles,
    pub collector: Collector,
    pub query: QueryEngine,
    pub catalog: Arc<Catalog>,
    pub maintenance: Arc<Maintenance>,
    /// Kept by query processes.
    pub rollups: Option<Rollups>,
    /// Delivery and curate, on worker processes.
    pub worker: Option<Arc<crate::worker::Worker>>,
    pub read_keys: crate::keys::ReadKeys,
    pub producer_keys: Arc<crate::keys::ProducerKeys>,
    /// Pauses this process's curate while a new major version moves a table.
    pub curate_pause: tarn_lake::CuratePause,
    pub tiers: Tiers,
    pub catalog_dir: std::path::PathBuf,
    /// One `tarn apply` at a time.
    pub apply_lock: tokio::sync::Mutex<()>,
    /// The most bytes any one query may scan (refused before it runs).
    pub query_bytes_max: Option<u64>,
    log: Log,
    lake: Lake,
    clock: Arc<dyn Clock>,
    /// The stream byte limit of a size-M dataset (0: none of tarn's own).
    stream_bytes_max: u64,
    /// The size class whose stream limit was last set, per dataset.
    stream_limits_set: std::sync::Mutex<std::collections::HashMap<String, tarn_core::SizeClass>>,
    /// Counters of curate when this process runs no worker.
    no_curate: Arc<CurateStats>,
    shutdown: watch::Receiver<bool>,
    /// The runtime of delivery and curate, apart from the one answering HTTP, so that long
    /// stretches of Parquet encoding never hold up an ingest request's task.
    background: tokio::runtime::Handle,
    /// The CPUs the background threads keep off while ingest requests arrive.
    pub ingest_cpus: Arc<crate::cpus::IngestCpus>,
}

impl App {
    /// Applies the stream byte limit of a dataset's size class to each of its shards (on NATS),
    /// and on a worker starts the deliveries of the dataset's shards it runs; a running one
    /// takes a changed batch size at its next batch.
    pub fn ensure_delivery(&self, dataset: &str) -> Result<()> {
        let size = self.catalog.get(dataset).map(|s| s.size).unwrap_or_default();
        // Set once per dataset and size class: an ingest request calls this each time.
        let changed = self.stream_bytes_max > 0 && {
            let mut set = self.stream_limits_set.lock().unwrap_or_else(|e| e.into_inner());
            set.insert(dataset.to_string(), size) != Some(size)
        };
        if changed {
            let (log, bytes) = (self.log.clone(), size.stream_bytes(self.stream_bytes_max));
            let shards = self.shards_of(size);
            let dataset = dataset.to_string();
            self.background.spawn(async move {
                for shard in 0..shards {
                    let topic = tarn_collector::shard_topic_name(&dataset, shard);
                    if let Err(e) = log.set_topic_bytes_max(&topic, bytes).await {
                        tracing::error!(%topic, error = %e, "setting the stream's byte limit");
                    }
                }
            });
        }
        match &self.worker {
            Some(w) => w.ensure_delivery(dataset),
            None => Ok(()),
        }
    }

    /// How many shards the stream of a dataset of this size class has: as the class says on a
    /// shared stream, one on the embedded log.
    pub fn shards_of(&self, size: tarn_core::SizeClass) -> u32 {
        if self.log.shared() { size.shards() } else { 1 }
    }

    /// The batch size of a running delivery of the dataset on this process.
    pub fn delivery_batch_bytes(&self, dataset: &str) -> Option<usize> {
        self.worker.as_ref()?.delivery_batch_bytes(dataset)
    }

    /// Curate's counters on this process.
    pub fn curate_stats(&self) -> &CurateStats {
        match &self.worker {
            Some(w) => &w.curate_stats,
            None => &self.no_curate,
        }
    }

    /// Turns true when the server shuts down.
    pub fn shutdown_watch(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    pub fn lake(&self) -> &Lake {
        &self.lake
    }

    pub fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    /// Runs a task on the background runtime.
    pub fn spawn_background(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        self.background.spawn(f);
    }

    /// Runs a task on the background runtime and waits for its result.
    pub async fn run_background<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        self.background.spawn(f).await
    }

    /// The consumed segment files the embedded log keeps for reuse (`None` on NATS).
    pub fn log_spares(&self) -> Option<tarn_log::SpareStats> {
        self.log.spares()
    }

    pub async fn log_stats(&self) -> Vec<(String, tarn_log::TopicStats)> {
        let mut out = Vec::new();
        // On NATS each figure is a request: a slow server costs the scrape a few seconds at
        // most, never a hung /metrics.
        let within = std::time::Duration::from_secs(2);
        if let Ok(Ok(names)) = tokio::time::timeout(within, self.log.topic_names()).await {
            for n in names {
                if let Ok(t) = self.log.topic(&n)
                    && let Ok(Ok(st)) = tokio::time::timeout(within, t.stats()).await
                {
                    out.push((n, st));
                }
            }
        }
        out
    }
}

/// The background runtime. A runtime may not be dropped from async code, which every early
/// return from `run` would do; this lets its threads go on their own instead.
struct BackgroundRuntime(Option<tokio::runtime::Runtime>);

impl BackgroundRuntime {
    fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for BackgroundRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Takes an exclusive lock on the data directory so two servers never share it.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File> {
    let path = dir.join("LOCK");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => {
            anyhow::bail!("data directory {} is in use by another tarn process", dir.display())
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

pub async fn run(args: ServeArgs) -> Result<()> {
    let retain = std::time::Duration::from_secs(args.vacuum_retain_hours.saturating_mul(3600));
    if retain < tarn_lake::vacuum::RETAIN_MIN {
        anyhow::bail!(
            "--vacuum-retain-hours {} is below the minimum of {} (a query may run for up to an hour)",
            args.vacuum_retain_hours,
            tarn_lake::vacuum::RETAIN_MIN.as_secs() / 3600
        );
    }
    let roles = crate::worker::Roles::parse(&args.roles)?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    let _lock = lock_data_dir(&args.data_dir)?;
    let limits = Limits {
        delivery_batch_age_ms: args.batch_age_ms,
        delivery_batch_bytes: args.batch_bytes,
        curate_commit_bytes: args.curate_commit_bytes,
        body_bytes_max: args.body_bytes_max,
        ingest_inflight_bytes_max: args.inflight_bytes_max,
        segment_bytes_max: args.log_segment_bytes.max(4096),
        ..Limits::default()
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let log = open_stream(&args, &limits).await?;
    if !log.shared() && roles != crate::worker::Roles::ALL {
        anyhow::bail!(
            "--roles {}: the embedded log belongs to one process, which runs every role; \
             split the roles over processes with a shared stream (--stream nats://...)",
            roles.describe()
        );
    }
    // One event must fit in one stream record (a NATS message is at most the server's
    // max_payload); half of it leaves room for the encoding. A larger event is rejected alone.
    let limits = Limits {
        event_bytes_max: limits.event_bytes_max.min(log.record_bytes_max() / 2),
        ..limits
    };
    let meta = open_meta(&args)?;
    let catalog = Arc::new(Catalog::with_meta(meta.clone()).context("opening the catalog")?);
    let producer_keys = Arc::new(crate::keys::ProducerKeys::open(meta.clone()).context("opening the producer keys")?);
    spawn_meta_refresh(catalog.clone(), producer_keys.clone());
    let lake = open_lake(&args).await?;
    if roles != crate::worker::Roles::ALL && (lake.remote().is_none() || !catalog.meta().shared()) {
        anyhow::bail!(
            "--roles {}: processes with split roles share the lake and the contracts, so they need \
             --lake s3://... and --meta postgres://... (this one has --lake {} and --meta {})",
            roles.describe(),
            args.lake,
            if catalog.meta().shared() { "postgres" } else { "files" }
        );
    }
    if lake.remote().is_some() {
        lake.claim_stream(&stream_identity(&args)?)
            .await
            .context("checking which stream feeds the lake")?;
        if log.shared() {
            // Processes on one NATS namespace share the lake: their commit entries go one at a
            // time, through a lease on the stream's server (see tarn_lake::store::serial).
            let holder = process_id(&args)?;
            tarn_lake::store::share_commit_lock(Arc::new(tarn_lake::store::LeaseLock::new(log.clone(), &holder)));
        }
    }
    let tiers = open_tiers(&args, &lake)?;
    let catalog_dir = args.data_dir.join("catalog");
    crate::major::recover(&catalog, &lake, &tiers)
        .await
        .context("finishing an interrupted new major version")?;
    if let Some(dir) = &args.datasets {
        load_descriptors(&catalog, &lake, &tiers, &producer_keys, dir)
            .await
            .with_context(|| format!("loading dataset descriptors from {}", dir.display()))?;
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let ingest_cpus = Arc::new(crate::cpus::IngestCpus::new(args.ingest_cpus));
    let (started, stopped) = (ingest_cpus.clone(), ingest_cpus.clone());
    let background_rt = BackgroundRuntime(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tarn-background")
            // Delivery and curate may use every idle cycle, but an ingest request that needs the
            // CPU gets it first: the idle scheduling class on Linux (`SCHED_IDLE`, whose threads
            // a woken thread of the normal class preempts at once), and off the CPUs reserved
            // for ingest while requests arrive (`cpus.rs`).
            .on_thread_start(move || {
                if let Err(e) = thread_priority::set_thread_priority_and_policy(
                    thread_priority::thread_native_id(),
                    thread_priority::ThreadPriority::Min,
                    thread_priority::ThreadSchedulePolicy::Normal(thread_priority::NormalThreadSchedulePolicy::Idle),
                ) {
                    tracing::warn!(error = ?e, "cannot lower the priority of a background thread");
                }
                started.thread_started();
            })
            .on_thread_stop(move || stopped.thread_stopped())
            .enable_all()
            .build()
            .context("starting the background runtime")?,
    ));
    let background = background_rt.handle();
    let maintenance_turn = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let id = process_id(&args)?;
    let worker = roles.worker.then(|| {
        Arc::new(crate::worker::Worker::new(
            log.clone(),
            lake.clone(),
            catalog.clone(),
            clock.clone(),
            crate::worker::WorkerOptions {
                holder: id.clone(),
                batch_bytes: limits.delivery_batch_bytes,
                batch_age_ms: limits.delivery_batch_age_ms,
                curate_commit_bytes: limits.curate_commit_bytes,
                maintenance_turn: maintenance_turn.clone(),
            },
            background.clone(),
        ))
    });
    let curate_pause = worker.as_ref().map(|w| w.curate_pause.clone()).unwrap_or_default();
    let worker_task = worker
        .as_ref()
        .map(|w| background.spawn(w.clone().run(shutdown_rx.clone())));
    let read_keys = match &args.read_keys {
        Some(p) => crate::keys::ReadKeys::load(p)?,
        None => crate::keys::ReadKeys::default(),
    };
    let (rollups, rollup_task) = if roles.query {
        let rollups = Rollups::open(
            lake.root().to_path_buf(),
            &log,
            catalog.clone(),
            clock.clone(),
            RollupOptions {
                groups_max: args.rollup_groups_max,
                checkpoint_ms: args.rollup_checkpoint_ms,
                merge_runtime: Some(tokio::runtime::Handle::current()),
                lake: Some(lake.clone()),
                group: rollup_group(&log, &id),
                ..RollupOptions::default()
            },
        )
        .await
        .context("opening the rollups")?;
        let task = background.spawn(rollups.clone().run(shutdown_rx.clone()));
        background.spawn(rollup_retention(rollups.clone(), shutdown_rx.clone()));
        (Some(rollups), Some(task))
    } else {
        (None, None)
    };
    let collector = Collector::new(
        log.clone(),
        catalog.clone(),
        clock.clone(),
        CollectorOptions {
            limits: limits.clone(),
            infer_datasets: !args.no_infer,
            sharded: log.shared(),
        },
    );
    let prices = Prices {
        standard_gb_month: args.price_standard_gb_month,
        infrequent_gb_month: args.price_infrequent_gb_month,
        infrequent_retrieval_gb: args.price_retrieval_gb,
        archive_gb_month: args.price_archive_gb_month,
        scan_tb: args.price_scan_tb,
    };
    let maintenance = Arc::new(Maintenance::new(
        lake.clone(),
        catalog.clone(),
        retain,
        prices,
        tiers.clone(),
        clock.clone(),
    ));
    background.spawn(maintenance.clone().run_auto(
        AutoCompaction {
            check_every: std::time::Duration::from_millis(args.compact_check_ms.max(10)),
            trigger_files: args.compact_trigger_files,
            quiet: std::time::Duration::from_secs(args.compact_quiet_s),
            every: std::time::Duration::from_secs(args.compact_every_s),
            turn: maintenance_turn,
        },
        shutdown_rx.clone(),
    ));
    let app = Arc::new(App {
        roles,
        worker,
        collector,
        query: QueryEngine::new(lake.clone(), catalog.clone())
            .with_tiers(tiers.clone())
            .with_scan_price(args.price_scan_tb)
            .with_concurrency(args.query_concurrency)
            .with_memory_limit(args.query_memory_mb.max(1) << 20)
            .context("setting the query memory limit")?,
        catalog: catalog.clone(),
        maintenance,
        rollups,
        read_keys,
        producer_keys,
        curate_pause,
        tiers: tiers.clone(),
        catalog_dir: catalog_dir.clone(),
        apply_lock: tokio::sync::Mutex::new(()),
        query_bytes_max: (args.query_bytes_max > 0).then_some(args.query_bytes_max),
        log,
        lake,
        clock,
        stream_bytes_max: args.stream_bytes_max,
        stream_limits_set: std::sync::Mutex::new(std::collections::HashMap::new()),
        no_curate: Arc::new(CurateStats::default()),
        shutdown: shutdown_rx.clone(),
        background: background.clone(),
        ingest_cpus: ingest_cpus.clone(),
    });
    if ingest_cpus.reserved() > 0 {
        tokio::spawn(tick_ingest_cpus(ingest_cpus.clone(), shutdown_rx.clone()));
    }
    // The table of an earlier major version has no stream of its own.
    for spec in catalog
        .list()
        .into_iter()
        .filter(|s| !s.is_frozen() && s.external.is_none())
    {
        app.ensure_delivery(&spec.name)?;
    }
    // Tables other processes made in a bucket, for the query role's listings.
    if roles.query {
        spawn_table_discovery(app.lake().clone(), catalog.clone());
    }
    let listener = tokio::net::TcpListener::bind(args.http)
        .await
        .with_context(|| format!("binding HTTP listener on {}", args.http))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let pg_tls = match (&args.pg_tls_cert, &args.pg_tls_key) {
        (Some(c), Some(k)) => Some(crate::pg::tls_acceptor(c, k)?),
        _ => None,
    };
    let pg_listener = match args.pg.as_str() {
        "off" => None,
        _ if !roles.query => None,
        a => {
            let a: SocketAddr = a
                .parse()
                .with_context(|| format!("--pg {a:?}: an address such as 127.0.0.1:7412, or off"))?;
            Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("binding the PostgreSQL listener on {a}"))?,
            )
        }
    };
    tracing::info!(%addr, roles = %roles.describe(), data_dir = %args.data_dir.display(), stream = %app.log.describe(), lake = %app.lake().describe(), "tarn is serving");
    // A line on stdout that scripts wait for, then the PostgreSQL address.
    println!("tarn listening on http://{addr}");
    if let Some(l) = pg_listener {
        let pg_addr = l.local_addr().context("reading the bound address")?;
        println!("tarn postgres on {pg_addr}");
        tokio::spawn(crate::pg::serve(
            app.clone(),
            l,
            pg_tls,
            args.pg_connections_max,
            // Past the query time limit, which stops a cursor anyway, the idle limit means nothing.
            std::time::Duration::from_secs(args.pg_cursor_idle_s.clamp(1, crate::http::QUERY_TIMEOUT_MAX_MS / 1000)),
            app.shutdown_watch(),
        ));
    }
    let router = crate::http::router(app.clone());
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            shutdown_signal().await;
            tracing::info!("shutting down");
        })
        .await
        .context("serving HTTP")?;
    let _ = shutdown_tx.send(true);
    app.query.usage().flush();
    if let Some(t) = worker_task {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(15), t).await;
    }
    if let Some(t) = rollup_task {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), t).await;
    }
    Ok(())
}

/// Applies the descriptors of `--datasets DIR` at start, by the rules of `tarn apply`: the
/// folder must validate, and a change the evolution rules refuse stops the start. Producers
/// without a key are named in the log (`tarn apply` issues keys; a start does not print
/// secrets).
async fn load_descriptors(
    catalog: &Catalog,
    lake: &Lake,
    tiers: &Tiers,
    keys: &crate::keys::ProducerKeys,
    dir: &std::path::Path,
) -> Result<()> {
    use tarn_catalog::plan::Step;
    let sources: Vec<_> = tarn_catalog::read_descriptors(dir)?
        .into_iter()
        .map(|(path, text)| tarn_catalog::validate::Source {
            file: path.display().to_string(),
            text,
        })
        .collect();
    let report = tarn_catalog::validate::validate(&sources, &|n| catalog.get(n), &Default::default());
    for f in &report.findings {
        tracing::warn!("{f}");
    }
    if report.errors() > 0 {
        anyhow::bail!(
            "{} error(s) in the descriptors (check them with `tarn validate --offline {}`)",
            report.errors(),
            dir.display()
        );
    }
    let specs: Vec<_> = report.specs.into_iter().map(|(_, s)| s).collect();
    let plan = tarn_catalog::plan::plan(&specs, &catalog.list(), &|p| keys.has(p));
    for s in &plan.steps {
        match s {
            Step::Refused { dataset, reason } => anyhow::bail!("{dataset}: {reason}"),
            Step::ProducerKey { producer } => {
                tracing::warn!(producer, "producer has no write key yet; `tarn apply` issues one")
            }
            _ => {}
        }
    }
    for spec in specs {
        let new_major = catalog.get(&spec.name).is_some_and(|old| spec.major == old.major + 1);
        let a = if new_major {
            crate::major::start(catalog, lake, tiers, spec, Default::default()).await?
        } else {
            catalog.evolve(spec)?
        };
        if let Some(v) = &a.version {
            tracing::info!(dataset = %a.spec.name, version = %v, changes = a.changes.len(), "descriptor applied");
        }
        if a.created() || a.new_major {
            lake.create_table(&a.spec).await?;
        }
    }
    Ok(())
}

/// Expires rollup buckets past their retention once a minute, so that a quiet stream still
/// drops old days.
async fn rollup_retention(rollups: Rollups, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = rollups.maintain().await {
            tracing::error!(error = %e, "rollup retention");
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// The colder tiers: directories for a lake on the local disk, storage classes for a lake in a
/// bucket; the flags of the other kind are refused.
fn open_tiers(args: &ServeArgs, lake: &Lake) -> anyhow::Result<Tiers> {
    if lake.remote().is_some() {
        if args.tier_infrequent_dir.is_some() || args.tier_archive_dir.is_some() {
            anyhow::bail!(
                "--tier-infrequent-dir and --tier-archive-dir are for a lake on the local disk; in a bucket \
                 the tiers are storage classes (--tier-infrequent-class, --tier-archive-class)"
            );
        }
        let infrequent = args
            .tier_infrequent_class
            .as_deref()
            .unwrap_or(tarn_lake::tiers::DEFAULT_INFREQUENT_CLASS);
        let archive = args
            .tier_archive_class
            .as_deref()
            .unwrap_or(tarn_lake::tiers::DEFAULT_ARCHIVE_CLASS);
        return Tiers::classes(infrequent, archive).context("choosing the storage classes of the tiers");
    }
    if args.tier_infrequent_class.is_some() || args.tier_archive_class.is_some() {
        anyhow::bail!(
            "--tier-infrequent-class and --tier-archive-class are for a lake in a bucket; on the local disk \
             the tiers are directories (--tier-infrequent-dir, --tier-archive-dir)"
        );
    }
    Tiers::new(
        args.tier_infrequent_dir
            .clone()
            .unwrap_or_else(|| lake.root().join("tiers/infrequent")),
        args.tier_archive_dir
            .clone()
            .unwrap_or_else(|| lake.root().join("tiers/archive")),
    )
    .context("opening the tier directories")
}

/// Which stream this process reads, as recorded in a lake in a bucket: `embedded:<id>` (an
/// id kept in the data directory, made on first use) or `nats://HOST:PORT/NAMESPACE`.
fn stream_identity(args: &ServeArgs) -> Result<String> {
    if args.stream != "embedded" {
        let (server, namespace) = parse_nats(&args.stream)?;
        let host = server
            .rsplit('@')
            .next()
            .unwrap_or(&server)
            .trim_start_matches("nats://");
        return Ok(format!("nats://{host}/{namespace}"));
    }
    Ok(format!("embedded:{}", data_dir_id(&args.data_dir, "stream-id", 8)?))
}

/// The id kept in the file `name` of the data directory, made (`bytes` random bytes, in hex)
/// and synced on first use.
fn data_dir_id(dir: &std::path::Path, name: &str, bytes: usize) -> Result<String> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(id) => Ok(id.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id: String = (0..bytes).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
            tarn_catalog::write_synced(dir, name, id.as_bytes())?;
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// This process's id among the processes of a deployment: made on first start and kept in the
/// data directory, so a restarted process is the same holder of its leases (it takes its units
/// back at once instead of waiting for them to expire) and the same rollup consumer.
fn process_id(args: &ServeArgs) -> Result<String> {
    data_dir_id(&args.data_dir, "process-id", 6)
}

/// The consumer group of this process's rollups on the objects topic. Rollup state is kept in
/// the data directory, so on a shared stream each query process reads the notifications with a
/// group of its own (`rollups.<process id>`); one process alone on the embedded log keeps the
/// group `rollups`.
fn rollup_group(log: &Log, id: &str) -> String {
    if log.shared() {
        format!("{}.{id}", tarn_query::rollup::GROUP)
    } else {
        tarn_query::rollup::GROUP.to_string()
    }
}

/// Opens the metadata store `--meta` names: files in the data directory, or PostgreSQL.
fn open_meta(args: &ServeArgs) -> Result<Arc<tarn_catalog::Meta>> {
    if args.meta == "files" {
        let catalog = args.data_dir.join("catalog");
        std::fs::create_dir_all(catalog.join("datasets")).with_context(|| format!("creating {}", catalog.display()))?;
        return Ok(Arc::new(tarn_catalog::Meta::files(catalog, args.data_dir.join("keys"))));
    }
    if !args.meta.starts_with("postgres://") && !args.meta.starts_with("postgresql://") {
        // Not echoed: it may hold a password.
        anyhow::bail!("--meta: the metadata store is `files` or postgres://USER[:PASS]@HOST[:PORT]/DB");
    }
    let meta = tarn_catalog::Meta::postgres(&args.meta, &args.meta_schema)?;
    tracing::info!(meta = %meta.describe(), "metadata store opened");
    Ok(Arc::new(meta))
}

/// Reads a shared metadata store again every [`META_REFRESH`], so that contracts and producer
/// keys another process changed come into force here too.
fn spawn_meta_refresh(catalog: Arc<Catalog>, keys: Arc<crate::keys::ProducerKeys>) {
    if !catalog.meta().shared() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(META_REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (c, k) = (catalog.clone(), keys.clone());
            let r = tokio::task::spawn_blocking(move || -> Result<usize> {
                let n = c.refresh()?;
                k.refresh()?;
                Ok(n)
            })
            .await;
            match r {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::info!(changed = n, "contracts changed by another process are in force"),
                Ok(Err(e)) => tracing::warn!(error = %e, "reading the metadata store again failed"),
                Err(e) => tracing::warn!(error = %e, "metadata refresh task failed"),
            }
        }
    });
}

/// For a lake in a bucket: looks every [`TABLE_DISCOVERY`] for the tables of known datasets
/// that this process has not seen (another process created them), so that listings that do not
/// ask the bucket themselves (the PostgreSQL protocol's catalog) show them too.
fn spawn_table_discovery(lake: Lake, catalog: Arc<Catalog>) {
    if lake.remote().is_none() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TABLE_DISCOVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for spec in catalog.list() {
                if spec.external.is_some() || lake.table_exists(&spec.name) {
                    continue;
                }
                if let Err(e) = lake.has_table(&spec.name).await {
                    tracing::warn!(dataset = %spec.name, error = %e, "looking for a table in the bucket failed");
                }
            }
        }
    });
}

/// How often a process looks for tables other processes created in a bucket.
const TABLE_DISCOVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// How often a shared metadata store is read again.
const META_REFRESH: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens the lake `--lake` names: the local directory in the data directory, or a bucket
/// (then the local directory keeps only this process's own files).
async fn open_lake(args: &ServeArgs) -> Result<Lake> {
    let local = args.data_dir.join("lake");
    if args.lake == "local" {
        return Lake::open(&local).context("opening the lake");
    }
    let location = tarn_lake::store::S3Location::parse(&args.lake)?;
    let settings = tarn_lake::store::S3Settings::from_environment();
    tracing::info!(lake = %location.url(), endpoint = ?settings.endpoint, profile = %settings.profile, "opening the lake in a bucket");
    Lake::open_s3(&local, location, &settings)
        .await
        .with_context(|| format!("opening the lake at {}", args.lake))
}

/// Opens the stream `--stream` names: the embedded log in the data directory, or NATS
/// JetStream.
async fn open_stream(args: &ServeArgs, limits: &Limits) -> Result<Log> {
    if args.stream == "embedded" {
        return Log::open(
            args.data_dir.join("log"),
            LogOptions {
                segment_bytes_max: limits.segment_bytes_max,
                spare_segments: args.log_spare_segments,
                ..LogOptions::default()
            },
        )
        .context("opening the log");
    }
    let (server, namespace) = parse_nats(&args.stream)?;
    let opts = tarn_log::NatsOptions {
        namespace,
        replicas: args.stream_replicas,
        max_age: (args.stream_max_age_hours > 0)
            .then(|| std::time::Duration::from_secs(args.stream_max_age_hours * 3600)),
        ..tarn_log::NatsOptions::default()
    };
    Log::connect_nats(&server, opts)
        .await
        .context("opening the stream on NATS")
}

/// Splits `nats://HOST:PORT[/NAMESPACE]` into the server's address and the namespace.
fn parse_nats(spec: &str) -> Result<(String, String)> {
    let url = url::Url::parse(spec).with_context(|| format!("--stream {spec:?}: not embedded or a nats:// URL"))?;
    if url.scheme() != "nats" {
        anyhow::bail!("--stream {spec:?}: the stream is `embedded` or nats://HOST:PORT[/NAMESPACE]");
    }
    let host = url.host_str().context("--stream: a nats:// URL needs a host")?;
    let port = url.port().unwrap_or(4222);
    let namespace = match url.path().trim_matches('/') {
        "" => tarn_log::NatsOptions::default().namespace,
        ns => ns.to_string(),
    };
    tarn_log::check_namespace(&namespace).map_err(|e| anyhow::anyhow!("--stream {spec:?}: {e}"))?;
    let auth = match (url.username(), url.password()) {
        ("", _) => String::new(),
        (u, Some(p)) => format!("{u}:{p}@"),
        (u, None) => format!("{u}@"),
    };
    Ok((format!("nats://{auth}{host}:{port}"), namespace))
}

/// Measures the ingest load, and gives the background threads every CPU back when ingest
/// saturates them or once requests stop (see `cpus.rs`).
async fn tick_ingest_cpus(cpus: Arc<crate::cpus::IngestCpus>, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(crate::cpus::TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => cpus.tick(),
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod stream_tests {
    use super::parse_nats;

    #[test]
    fn stream_urls() {
        let ok = |s: &str| parse_nats(s).expect(s);
        assert_eq!(
            ok("nats://127.0.0.1:4222"),
            ("nats://127.0.0.1:4222".into(), "tarn".into())
        );
        assert_eq!(ok("nats://n1/prod_a"), ("nats://n1:4222".into(), "prod_a".into()));
        assert_eq!(ok("nats://u:p@n1:4333/x"), ("nats://u:p@n1:4333".into(), "x".into()));
        for bad in ["kafka://x:1", "nats://h:1/Bad-Name", "nats://h:1/a/b", "local"] {
            assert!(parse_nats(bad).is_err(), "{bad}");
        }
    }
}
