//! Roles, and the worker role: delivery and curate, split between the worker processes of one
//! stream by leases.
//!
//! The work is cut into units by stream shard. On NATS there are [`shared_units`] units; unit
//! `k` is the delivery of shard `k` of every dataset (a dataset has as many shards as its size
//! class says: S 1, M 2, L 4) and the curate of the raw objects those deliveries write (its own
//! consumer group on the objects topic). A worker holds the lease of each unit it runs and
//! renews it every [`TICK`]; the workers of a deployment meet in the membership group
//! `workers`, and each takes about its share (units / live workers, rounded up), giving units
//! back when more workers join and taking the units of a worker whose leases expired
//! ([`LEASE_TTL`]) after it died. One worker also holds the `maintenance` lease and runs the
//! automatic compaction, lifecycle and vacuum.
//!
//! Leases only split work: a unit run twice for a moment (a renewal that came late) writes raw
//! objects under two writer tags and curate keeps each sequence once, so nothing is lost or
//! doubled either way. The embedded log belongs to one process: it has one unit, always held.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, Result};
use tarn_catalog::Catalog;
use tarn_core::Clock;
use tarn_lake::curate::CurateStats;
use tarn_lake::{CurateOptions, CuratePause, Curator, Delivery, DeliveryOptions, Lake};
use tarn_log::Log;
use tokio::sync::watch;

/// How long a lease or a membership lasts unless renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(15);

/// How often a worker renews its leases and looks for work.
pub const TICK: Duration = Duration::from_secs(5);

/// The membership group of workers.
const MEMBERS: &str = "workers";

/// The lease of automatic maintenance.
const MAINTENANCE: &str = "maintenance";

/// Units of work on a shared stream: as many as the largest size class has shards.
pub fn shared_units() -> u32 {
    tarn_core::SizeClass::L.shards()
}

/// What a process does: `--roles collector,worker,query`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// Takes events over HTTP and appends them to the stream.
    pub collector: bool,
    /// Delivers, curates and maintains the lake.
    pub worker: bool,
    /// Answers SQL (HTTP and the PostgreSQL protocol), the catalog, rollups and admin calls.
    pub query: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        collector: true,
        worker: true,
        query: true,
    };

    pub fn parse(s: &str) -> Result<Self> {
        let mut r = Roles {
            collector: false,
            worker: false,
            query: false,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "collector" => r.collector = true,
                "worker" => r.worker = true,
                "query" => r.query = true,
                "all" => r = Roles::ALL,
                other => anyhow::bail!("--roles: unknown role {other:?} (the roles are collector, worker and query)"),
            }
        }
        if r == (Roles {
            collector: false,
            worker: false,
            query: false,
        }) {
            anyhow::bail!("--roles: name at least one of collector, worker and query");
        }
        Ok(r)
    }

    pub fn describe(&self) -> String {
        let names: Vec<&str> = [
            (self.collector, "collector"),
            (self.worker, "worker"),
            (self.query, "query"),
        ]
        .into_iter()
        .filter_map(|(on, n)| on.then_some(n))
        .collect();
        names.join(",")
    }
}

/// What a worker needs to start its units.
pub struct WorkerOptions {
    /// This process in leases and memberships (its id, kept in the data directory).
    pub holder: String,
    /// Delivery's batch size for size class M (`--batch-bytes`) and batch age.
    pub batch_bytes: usize,
    pub batch_age_ms: u64,
    /// Turns true while this process holds the maintenance lease.
    pub maintenance_turn: Arc<AtomicBool>,
}

/// The worker role of one process.
pub struct Worker {
    log: Log,
    lake: Lake,
    catalog: Arc<Catalog>,
    clock: Arc<dyn Clock>,
    opts: WorkerOptions,
    /// This process in leases and memberships.
    holder: String,
    units: u32,
    pub curate_stats: Arc<CurateStats>,
    pub curate_pause: CuratePause,
    background: tokio::runtime::Handle,
    held: std::sync::Mutex<BTreeMap<u32, Unit>>,
    /// Shard topics that exist on the stream, as last listed (dataset, shard).
    topics: std::sync::Mutex<BTreeSet<(String, u32)>>,
}

/// A unit this process runs.
struct Unit {
    stop: watch::Sender<bool>,
    /// Running deliveries of the unit by (dataset, shard), with their batch size.
    deliveries: HashMap<(String, u32), Arc<AtomicUsize>>,
    curate: tokio::task::JoinHandle<()>,
}

impl Worker {
    pub fn new(
        log: Log,
        lake: Lake,
        catalog: Arc<Catalog>,
        clock: Arc<dyn Clock>,
        opts: WorkerOptions,
        background: tokio::runtime::Handle,
    ) -> Self {
        let units = if log.shared() { shared_units() } else { 1 };
        let holder = opts.holder.clone();
        Self {
            log,
            lake,
            catalog,
            clock,
            opts,
            holder,
            units,
            curate_stats: Arc::new(CurateStats::default()),
            curate_pause: CuratePause::default(),
            background,
            held: std::sync::Mutex::new(BTreeMap::new()),
            topics: std::sync::Mutex::new(BTreeSet::new()),
        }
    }

    /// The units this process runs now.
    pub fn held_units(&self) -> Vec<u32> {
        self.lock_held().keys().copied().collect()
    }

    /// How many units the stream's work is cut into.
    pub fn units(&self) -> u32 {
        self.units
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Unit>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many shards a dataset's stream has.
    fn shards_of(&self, spec: &tarn_core::DatasetSpec) -> u32 {
        if self.log.shared() { spec.size.shards() } else { 1 }
    }

    /// Starts, in every unit this process runs, the deliveries of `dataset` that are not
    /// running yet; running ones take the batch size of the dataset's size class now.
    pub fn ensure_delivery(&self, dataset: &str) -> Result<()> {
        let Some(spec) = self.catalog.get(dataset) else {
            anyhow::bail!("{dataset} is not in the catalog");
        };
        if spec.is_frozen() || spec.external.is_some() {
            return Ok(());
        }
        let batch_bytes = spec.size.batch_bytes(self.opts.batch_bytes);
        let mut shards: BTreeSet<u32> = (0..self.shards_of(&spec)).collect();
        // A shard that has a topic but is past the size class (the class went down) is still
        // delivered, so nothing in it is left behind.
        let topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        shards.extend(topics.iter().filter(|(d, _)| d == dataset).map(|(_, s)| *s));
        drop(topics);
        let mut held = self.lock_held();
        for shard in shards {
            let Some(unit) = held.get_mut(&(shard % self.units)) else {
                continue;
            };
            let key = (dataset.to_string(), shard);
            if let Some(b) = unit.deliveries.get(&key) {
                b.store(batch_bytes, Relaxed);
                continue;
            }
            let opts = DeliveryOptions::new(batch_bytes, self.opts.batch_age_ms).with_shard(shard);
            let shared = opts.batch_bytes.clone();
            let d = Delivery::new(&self.log, self.lake.clone(), self.clock.clone(), dataset, opts)
                .with_context(|| format!("starting delivery for {dataset} shard {shard}"))?;
            self.background.spawn(d.run(unit.stop.subscribe()));
            unit.deliveries.insert(key, shared);
        }
        Ok(())
    }

    /// The batch size of a running delivery of a dataset (any shard this process runs).
    pub fn delivery_batch_bytes(&self, dataset: &str) -> Option<usize> {
        self.lock_held()
            .values()
            .flat_map(|u| u.deliveries.iter())
            .find(|((d, _), _)| d == dataset)
            .map(|(_, b)| b.load(Relaxed))
    }

    /// Starts unit `k`: its curate unit, then the deliveries of every dataset's shards in it.
    async fn start(&self, k: u32) -> Result<()> {
        let curator = Curator::new(
            &self.log,
            self.lake.clone(),
            self.catalog.clone(),
            CurateOptions {
                unit: k,
                units: self.units,
                ..CurateOptions::default()
            },
        )
        .await
        .with_context(|| format!("starting curate unit {k}"))?
        .with_stats(self.curate_stats.clone())
        .paused_by(&self.curate_pause);
        let (stop, stop_rx) = watch::channel(false);
        let curate = self.background.spawn(curator.run(stop_rx));
        self.lock_held().insert(
            k,
            Unit {
                stop,
                deliveries: HashMap::new(),
                curate,
            },
        );
        tracing::info!(unit = k, units = self.units, holder = %self.holder, "worker unit started");
        self.ensure_all();
        Ok(())
    }

    /// Stops unit `k`; its tasks end at their next step (a batch being written is finished
    /// and committed, one being gathered is left to the next holder to read again).
    fn stop(&self, k: u32) -> Option<tokio::task::JoinHandle<()>> {
        let unit = self.lock_held().remove(&k)?;
        let _ = unit.stop.send(true);
        tracing::info!(unit = k, holder = %self.holder, "worker unit stopped");
        Some(unit.curate)
    }

    /// Starts the deliveries of every dataset in the catalog in the units held.
    fn ensure_all(&self) {
        for spec in self.catalog.list() {
            if let Err(e) = self.ensure_delivery(&spec.name) {
                tracing::error!(dataset = %spec.name, error = format!("{e:#}"), "cannot start delivery");
            }
        }
    }

    /// Lists the shard topics that exist, for deliveries of shards past a dataset's class.
    async fn list_topics(&self) {
        match self.log.topic_names().await {
            Ok(names) => {
                let found: BTreeSet<(String, u32)> = names
                    .iter()
                    .filter_map(|n| tarn_collector::parse_shard_topic(n))
                    .map(|(d, s)| (d.to_string(), s))
                    .collect();
                *self.topics.lock().unwrap_or_else(|e| e.into_inner()) = found;
            }
            Err(e) => tracing::warn!(error = %e, "listing the stream's topics failed"),
        }
    }

    /// One round: renews membership and leases, gives back units above this process's share,
    /// takes free units up to it, and starts deliveries of new datasets.
    async fn round(&self, ttl: Duration) {
        let workers = match self.log.members(MEMBERS, &self.holder, Some(ttl)).await {
            Ok(m) => m.len().max(1) as u32,
            Err(e) => {
                tracing::warn!(error = %e, "renewing worker membership failed; keeping the units held");
                return;
            }
        };
        let share = self.units.div_ceil(workers);
        let held = self.held_units();
        for &k in &held {
            match self.log.lease(&unit_lease(k), &self.holder, ttl).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(unit = k, "another worker took this unit's lease; stopping it");
                    self.stop(k);
                }
                // Not lost yet: a renewal within the lease's life keeps it.
                Err(e) => tracing::warn!(unit = k, error = %e, "renewing a unit's lease failed"),
            }
        }
        // Units are kept and taken in bit-reversed order (0, 2, 1, 3): two workers then hold
        // 0 and 2, and 1 and 3, so the two shards of a size-M dataset go to different workers.
        let mut held = self.held_units();
        held.sort_by_key(|k| k.reverse_bits());
        while held.len() as u32 > share {
            let Some(k) = held.pop() else { break };
            self.stop(k);
            if let Err(e) = self.log.release(&unit_lease(k), &self.holder).await {
                tracing::warn!(unit = k, error = %e, "giving a unit's lease up failed; it expires");
            }
        }
        let mut order: Vec<u32> = (0..self.units).collect();
        order.sort_by_key(|k| k.reverse_bits());
        for k in order {
            if held.len() as u32 >= share {
                break;
            }
            if held.contains(&k) {
                continue;
            }
            match self.log.lease(&unit_lease(k), &self.holder, ttl).await {
                Ok(true) => match self.start(k).await {
                    Ok(()) => held.push(k),
                    Err(e) => {
                        tracing::error!(unit = k, error = format!("{e:#}"), "cannot start a unit");
                        let _ = self.log.release(&unit_lease(k), &self.holder).await;
                    }
                },
                Ok(false) => {}
                Err(e) => tracing::warn!(unit = k, error = %e, "asking for a unit's lease failed"),
            }
        }
        let maintaining = match self.log.lease(MAINTENANCE, &self.holder, ttl).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "asking for the maintenance lease failed");
                false
            }
        };
        if self.opts.maintenance_turn.swap(maintaining, Relaxed) != maintaining {
            tracing::info!(maintaining, "automatic maintenance turn");
        }
        self.list_topics().await;
        self.ensure_all();
    }

    /// Runs the worker until `shutdown`, then stops its units and gives their leases up.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            self.round(LEASE_TTL).await;
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
        }
        let mut tasks = Vec::new();
        for k in self.held_units() {
            tasks.extend(self.stop(k));
        }
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        for k in 0..self.units {
            let _ = self.log.release(&unit_lease(k), &self.holder).await;
        }
        let _ = self.log.release(MAINTENANCE, &self.holder).await;
        let _ = self.log.members(MEMBERS, &self.holder, None).await;
    }
}

fn unit_lease(k: u32) -> String {
    format!("unit.{k}")
}

#[cfg(test)]
mod tests {
    use super::Roles;

    #[test]
    fn roles_parse() {
        assert_eq!(Roles::parse("collector,worker,query").expect("all"), Roles::ALL);
        assert_eq!(Roles::parse("all").expect("all"), Roles::ALL);
        let w = Roles::parse("worker").expect("worker");
        assert!(w.worker && !w.collector && !w.query);
        assert_eq!(
            Roles::parse(" query , collector").expect("two").describe(),
            "collector,query"
        );
        for bad in ["", ",", "writer", "worker,reader"] {
            assert!(Roles::parse(bad).is_err(), "{bad:?}");
        }
    }
}
