//! Lake maintenance inside the server: compaction by request (`POST /v1/compact`), when a
//! partition collects enough small files, and on a schedule. One run at a time; runs go on the
//! background runtime, at the lowest priority, beside ingestion and queries.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tarn_catalog::Catalog;
use tarn_core::DatasetSpec;
use tarn_lake::Lake;
use tarn_lake::compact::{CompactOptions, CompactProgress, CompactReport, compact_dataset};
use tarn_lake::compaction::CompactionRules;
use tarn_lake::lifecycle::LifecycleReport;
use tarn_lake::storage::{Prices, dataset_storage};
use tarn_lake::tiers::Tiers;
use tarn_lake::vacuum::{VacuumReport, vacuum_dataset};
use tokio::sync::{mpsc, watch};

/// When compaction runs on its own.
#[derive(Debug, Clone)]
pub struct AutoCompaction {
    /// How often partitions are checked against `trigger_files`.
    pub check_every: Duration,
    /// A partition with this many small files is compacted at the next check (0: never).
    pub trigger_files: usize,
    /// A partition that no file has been written to for this long has gone quiet: it is
    /// compacted at the next check by size tier (`CompactionRules::quiet_before_ms`; zero:
    /// never).
    pub quiet: Duration,
    /// Every partition with two or more small files is compacted this often, and then every
    /// table vacuumed (zero: never).
    pub every: Duration,
    /// Runs only while this is true: the process holds the deployment's maintenance lease (one
    /// worker of many compacts, expires and vacuums at a time).
    pub turn: Arc<std::sync::atomic::AtomicBool>,
}

pub struct Maintenance {
    lake: Lake,
    catalog: Arc<Catalog>,
    running: tokio::sync::Mutex<()>,
    /// How long an unreferenced data file is kept before vacuum deletes it.
    retain: Duration,
    prices: Prices,
    tiers: Tiers,
    clock: Arc<dyn tarn_core::Clock>,
}

/// A vacuum request, as `POST /v1/vacuum` takes it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VacuumRequest {
    #[serde(default)]
    pub dataset: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
}

/// A compaction request, as `POST /v1/compact` takes it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompactRequest {
    #[serde(default)]
    pub dataset: Option<String>,
    #[serde(default)]
    pub day: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
}

/// Why a request was refused before it started.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    Bad(String),
    #[error("dataset {0:?} does not exist")]
    UnknownDataset(String),
}

/// One line of the streamed answer to `POST /v1/compact`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CompactEvent {
    Progress {
        dataset: String,
        bins_done: usize,
        bins_total: usize,
        bytes_done: u64,
        bytes_total: u64,
    },
    Report {
        report: serde_json::Value,
    },
    Error {
        message: String,
    },
    Done,
}

impl From<&CompactProgress> for CompactEvent {
    fn from(p: &CompactProgress) -> Self {
        CompactEvent::Progress {
            dataset: p.dataset.clone(),
            bins_done: p.bins_done,
            bins_total: p.bins_total,
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
        }
    }
}

impl Maintenance {
    pub fn new(
        lake: Lake,
        catalog: Arc<Catalog>,
        retain: Duration,
        prices: Prices,
        tiers: Tiers,
        clock: Arc<dyn tarn_core::Clock>,
    ) -> Self {
        Self {
            lake,
            catalog,
            running: tokio::sync::Mutex::new(()),
            retain,
            prices,
            tiers,
            clock,
        }
    }

    /// Today (UTC) by the injected clock.
    pub fn today(&self) -> chrono::NaiveDate {
        chrono::DateTime::from_timestamp_micros(self.clock.now_micros())
            .unwrap_or_default()
            .date_naive()
    }

    /// Applies lifecycle rules at `today` (UTC) to the given datasets.
    pub async fn lifecycle(
        &self,
        specs: &[Arc<DatasetSpec>],
        today: chrono::NaiveDate,
        dry_run: bool,
    ) -> tarn_lake::Result<Vec<LifecycleReport>> {
        let _one = self.running.lock().await;
        let mut out = Vec::new();
        for spec in specs {
            out.push(tarn_lake::lifecycle::apply(&self.lake, &self.tiers, spec, today, dry_run).await?);
        }
        Ok(out)
    }

    /// Restores a day of a dataset to the standard tier for `days` days.
    pub async fn restore(&self, dataset: &str, day: &str, days: u32) -> tarn_lake::Result<usize> {
        let _one = self.running.lock().await;
        let until = self.today() + chrono::Duration::days(i64::from(days));
        self.tiers.restore(&self.lake, dataset, day, until).await
    }

    /// The storage and cost report: each dataset's storage, plus the bytes its queries
    /// scanned in `month` (`scanned`) and their price.
    pub async fn storage(
        &self,
        specs: &[Arc<DatasetSpec>],
        scanned: &BTreeMap<String, u64>,
        retrieved: &BTreeMap<String, u64>,
        month: &str,
    ) -> tarn_lake::Result<serde_json::Value> {
        let mut datasets = Vec::new();
        let mut total = 0.0;
        for spec in specs {
            let s = dataset_storage(&self.lake, spec, &self.prices, Some(&self.tiers)).await?;
            let bytes = scanned.get(&spec.name).copied().unwrap_or(0);
            let scan_cost = bytes as f64 / tarn_lake::storage::TB * self.prices.scan_tb;
            let cold = retrieved.get(&spec.name).copied().unwrap_or(0);
            let retrieval_cost = cold as f64 / tarn_lake::storage::GB * self.prices.infrequent_retrieval_gb;
            let monthly = s.monthly_storage_cost + scan_cost + retrieval_cost;
            total += monthly;
            let mut v = serde_json::to_value(&s).unwrap_or_default();
            v["scanned_bytes_month"] = bytes.into();
            v["scan_cost_month"] = scan_cost.into();
            v["retrieved_bytes_month"] = cold.into();
            v["retrieval_cost_month"] = retrieval_cost.into();
            v["monthly_cost"] = monthly.into();
            datasets.push(v);
        }
        Ok(serde_json::json!({
            "month": month,
            "prices": self.prices,
            "datasets": datasets,
            "total_monthly_cost": total,
        }))
    }

    /// Vacuums the given datasets (after any compaction going on).
    pub async fn vacuum(&self, specs: &[Arc<DatasetSpec>], dry_run: bool) -> tarn_lake::Result<Vec<VacuumReport>> {
        let _one = self.running.lock().await;
        self.vacuum_locked(specs, dry_run).await
    }

    async fn vacuum_locked(&self, specs: &[Arc<DatasetSpec>], dry_run: bool) -> tarn_lake::Result<Vec<VacuumReport>> {
        let now_ms = self.clock.now_micros() / 1000;
        let mut out = Vec::new();
        for spec in specs {
            out.push(vacuum_dataset(&self.lake, &spec.name, now_ms, self.retain, dry_run).await?);
        }
        Ok(out)
    }

    /// Checks a request before it starts: the dataset exists, the day is a date.
    pub fn check(&self, req: &CompactRequest) -> Result<Vec<Arc<DatasetSpec>>, RequestError> {
        if let Some(day) = &req.day
            && chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").is_err()
        {
            return Err(RequestError::Bad(format!("day {day:?} is not a date (YYYY-MM-DD)")));
        }
        self.datasets(req.dataset.as_deref())
    }

    /// One dataset's storage: tiers, partitions, files and bytes.
    pub async fn storage_of(&self, spec: &DatasetSpec) -> tarn_lake::Result<tarn_lake::storage::DatasetStorage> {
        dataset_storage(&self.lake, spec, &self.prices, Some(&self.tiers)).await
    }

    /// The datasets whose tables tarn writes (registered data is read in place, never
    /// compacted, moved or vacuumed).
    fn owned(&self) -> Vec<Arc<DatasetSpec>> {
        self.catalog
            .list()
            .into_iter()
            .filter(|s| s.external.is_none())
            .collect()
    }

    /// One dataset, or every dataset.
    pub fn datasets(&self, dataset: Option<&str>) -> Result<Vec<Arc<DatasetSpec>>, RequestError> {
        match dataset {
            Some(d) => match self.catalog.get(d) {
                Some(s) if s.external.is_none() => Ok(vec![s]),
                Some(_) => Err(RequestError::Bad(format!(
                    "{d} is registered data read in place; tarn does not compact, move or vacuum it"
                ))),
                None => Err(RequestError::UnknownDataset(d.to_string())),
            },
            None => Ok(self.owned()),
        }
    }

    /// Runs a request, sending progress, one report per dataset, then `Done` (or `Error`).
    /// Waits for a run already going to finish first.
    pub async fn run_request(
        &self,
        specs: Vec<Arc<DatasetSpec>>,
        req: CompactRequest,
        tx: mpsc::UnboundedSender<CompactEvent>,
    ) {
        let _one = self.running.lock().await;
        for spec in specs {
            let opts = CompactOptions {
                rules: CompactionRules::for_spec(&spec, 2),
                day: req.day.clone(),
                dry_run: req.dry_run,
            };
            let report_to = tx.clone();
            let progress = move |p: &CompactProgress| {
                let _ = report_to.send(CompactEvent::from(p));
            };
            match compact_dataset(&self.lake, &spec, &opts, &progress).await {
                Ok(r) => {
                    let report = serde_json::to_value(&r).unwrap_or_default();
                    let _ = tx.send(CompactEvent::Report { report });
                }
                Err(e) => {
                    let _ = tx.send(CompactEvent::Error {
                        message: format!("compacting {}: {e}", spec.name),
                    });
                    return;
                }
            }
        }
        let _ = tx.send(CompactEvent::Done);
    }

    /// One automatic pass over every dataset; skipped while another run is going.
    async fn auto_pass(&self, min_small_files: usize, quiet_before_ms: Option<i64>) -> Vec<CompactReport> {
        let Ok(_one) = self.running.try_lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for spec in self.owned() {
            let opts = CompactOptions {
                rules: CompactionRules {
                    quiet_before_ms,
                    ..CompactionRules::for_spec(&spec, min_small_files)
                },
                ..CompactOptions::default()
            };
            match compact_dataset(&self.lake, &spec, &opts, &|_| {}).await {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!(dataset = %spec.name, error = %e, "automatic compaction failed"),
            }
        }
        out
    }

    /// Runs automatic compaction until `shutdown` turns true.
    pub async fn run_auto(self: Arc<Self>, auto: AutoCompaction, mut shutdown: watch::Receiver<bool>) {
        if auto.trigger_files == 0 && auto.every.is_zero() && auto.quiet.is_zero() {
            return;
        }
        let started = tokio::time::Instant::now();
        let mut last_full = started;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(auto.check_every) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            if !auto.turn.load(std::sync::atomic::Ordering::Relaxed) {
                continue;
            }
            let full = !auto.every.is_zero() && last_full.elapsed() >= auto.every;
            let min = match (full, auto.trigger_files) {
                (true, _) => 2,
                (false, 0) => usize::MAX,
                (false, n) => n,
            };
            let quiet_ms = i64::try_from(auto.quiet.as_millis()).unwrap_or(i64::MAX);
            // Against the wall clock, as the Delta log's modification times are.
            let quiet_before = (!full && quiet_ms > 0)
                .then(|| tarn_core::Clock::now_millis(&tarn_core::SystemClock).saturating_sub(quiet_ms));
            if min == usize::MAX && quiet_before.is_none() {
                continue;
            }
            for r in self.auto_pass(min, quiet_before).await {
                if r.commits > 0 {
                    tracing::info!(dataset = %r.dataset, files_removed = r.files_removed, files_added = r.files_added,
                        scheduled = full, "automatic compaction");
                }
            }
            if full {
                last_full = tokio::time::Instant::now();
                let today = self.today();
                match self.lifecycle(&self.owned(), today, false).await {
                    Ok(reports) => {
                        for r in reports.iter().filter(|r| !r.steps.is_empty()) {
                            tracing::info!(dataset = %r.dataset, steps = r.steps.len(), moved = r.files_moved,
                                expired = r.files_expired, "lifecycle applied");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "scheduled lifecycle failed"),
                }
                let _one = self.running.lock().await;
                match self.vacuum_locked(&self.owned(), false).await {
                    Ok(reports) => {
                        for r in reports.iter().filter(|r| r.files_deleted > 0) {
                            tracing::info!(dataset = %r.dataset, files = r.files_deleted, bytes = r.bytes_deleted, "vacuumed");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "scheduled vacuum failed"),
                }
            }
        }
    }
}
