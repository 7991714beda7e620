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
    /// Memory of rows a curate commit gathers at most (`--curate-commit-bytes`).
    pub curate_commit_bytes: usize,
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
    /// Tasks of stopped units that may still be ending, by unit.
    stopping: std::sync::Mutex<HashMap<u32, Vec<tokio::task::JoinHandle<()>>>>,
    /// The live workers, as last read.
    members: std::sync::Mutex<Vec<String>>,
    /// Shard topics that exist on the stream, as last listed (dataset, shard).
    topics: std::sync::Mutex<BTreeSet<(String, u32)>>,
}

/// A unit this process runs.
struct Unit {
    stop: watch::Sender<bool>,
    /// Running deliveries of the unit by (dataset, shard), with their batch size.
    deliveries: HashMap<(String, u32), Arc<AtomicUsize>>,
    /// The unit's tasks: its curator and its deliveries.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// When its lease was last renewed (taken, at first).
    renewed: std::time::Instant,
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
            stopping: std::sync::Mutex::new(HashMap::new()),
            members: std::sync::Mutex::new(Vec::new()),
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
            unit.tasks.push(self.background.spawn(d.run(unit.stop.subscribe())));
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
    /// Tasks of an earlier run of the unit in this process end first.
    async fn start(&self, k: u32) -> Result<()> {
        let earlier = self
            .stopping
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&k)
            .unwrap_or_default();
        for t in earlier {
            if tokio::time::timeout(Duration::from_secs(60), t).await.is_err() {
                anyhow::bail!("the earlier run of unit {k} did not end within 60 s");
            }
        }
        let curator = Curator::new(
            &self.log,
            self.lake.clone(),
            self.catalog.clone(),
            CurateOptions {
                unit: k,
                units: self.units,
                commit_bytes_max: self.opts.curate_commit_bytes,
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
                tasks: vec![curate],
                renewed: std::time::Instant::now(),
            },
        );
        tracing::info!(unit = k, units = self.units, holder = %self.holder, "worker unit started");
        self.ensure_all();
        Ok(())
    }

    /// Stops unit `k`; its tasks end at their next step (a batch being written is finished
    /// and committed, one being gathered is left to the next holder to read again).
    fn stop(&self, k: u32) {
        let Some(unit) = self.lock_held().remove(&k) else {
            return;
        };
        let _ = unit.stop.send(true);
        tracing::info!(unit = k, holder = %self.holder, "worker unit stopped");
        let mut stopping = self.stopping.lock().unwrap_or_else(|e| e.into_inner());
        let tasks = stopping.entry(k).or_default();
        tasks.retain(|t| !t.is_finished());
        tasks.extend(unit.tasks);
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

    /// One round: renews membership and leases, gives back the units that are not this
    /// process's, takes its own when they are free, and starts deliveries of new datasets.
    async fn round(&self, ttl: Duration) {
        let members = match self.log.members(MEMBERS, &self.holder, Some(ttl)).await {
            Ok(m) => {
                *self.members.lock().unwrap_or_else(|e| e.into_inner()) = m.clone();
                m
            }
            Err(e) => {
                // The leases are renewed all the same, on the last membership known.
                tracing::warn!(error = %e, "renewing worker membership failed");
                self.members.lock().unwrap_or_else(|e| e.into_inner()).clone()
            }
        };
        let mine = assignment(self.units, &members, &self.holder);
        for k in self.held_units() {
            if !mine.contains(&k) {
                self.stop(k);
                if let Err(e) = self.log.release(&unit_lease(k), &self.holder).await {
                    tracing::warn!(unit = k, error = %e, "giving a unit's lease up failed; it expires");
                }
                continue;
            }
            match self.log.lease(&unit_lease(k), &self.holder, ttl).await {
                Ok(true) => self.renewed(k),
                Ok(false) => {
                    tracing::warn!(unit = k, "another worker took this unit's lease; stopping it");
                    self.stop(k);
                }
                Err(e) => {
                    tracing::warn!(unit = k, error = %e, "renewing a unit's lease failed");
                    // Past its life the lease may be another worker's: stop rather than run
                    // the unit twice for long.
                    if self.renewed_before(k, ttl) {
                        tracing::warn!(
                            unit = k,
                            "this unit's lease was not renewed within its life; stopping it"
                        );
                        self.stop(k);
                    }
                }
            }
        }
        let held = self.held_units();
        for &k in mine.iter().filter(|k| !held.contains(k)) {
            match self.log.lease(&unit_lease(k), &self.holder, ttl).await {
                Ok(true) => {
                    if let Err(e) = self.start(k).await {
                        tracing::error!(unit = k, error = format!("{e:#}"), "cannot start a unit");
                        let _ = self.log.release(&unit_lease(k), &self.holder).await;
                    }
                }
                // Its worker gives it up at its next round (or its lease expires).
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

    fn renewed(&self, k: u32) {
        if let Some(u) = self.lock_held().get_mut(&k) {
            u.renewed = std::time::Instant::now();
        }
    }

    /// Whether unit `k`'s lease was last renewed longer than `ttl` ago (on this process's own
    /// clock).
    fn renewed_before(&self, k: u32, ttl: Duration) -> bool {
        self.lock_held().get(&k).is_some_and(|u| u.renewed.elapsed() >= ttl)
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
        for k in self.held_units() {
            self.stop(k);
        }
        // Every unit's tasks end together, within 10 s; the leases are given up either way.
        let tasks: Vec<_> = std::mem::take(&mut *self.stopping.lock().unwrap_or_else(|e| e.into_inner()))
            .into_values()
            .flatten()
            .collect();
        let _ = tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(tasks)).await;
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

/// The units `holder` runs among the sorted live `members`: the units in bit-reversed order
/// (0, 2, 1, 3) cut into as many even blocks as there are members, the i-th block to the i-th
/// member. Every unit has one owner; two workers get 0 and 2, and 1 and 3, so the two shards of
/// a size-M dataset go to different workers. A process not in the list (its membership not
/// yet read) counts itself in.
pub fn assignment(units: u32, members: &[String], holder: &str) -> Vec<u32> {
    let mut members: Vec<&str> = members.iter().map(String::as_str).collect();
    if !members.contains(&holder) {
        members.push(holder);
    }
    members.sort_unstable();
    let w = members.len() as u64;
    let Some(i) = members.iter().position(|m| *m == holder) else {
        return Vec::new();
    };
    let mut order: Vec<u32> = (0..units).collect();
    order.sort_by_key(|k| k.reverse_bits());
    order
        .into_iter()
        .enumerate()
        .filter(|(p, _)| (*p as u64 * w / u64::from(units.max(1))) as usize == i)
        .map(|(_, k)| k)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{Roles, assignment};

    #[test]
    fn every_unit_has_one_owner_and_the_shards_of_a_size_m_dataset_two() {
        let names = |n: usize| (0..n).map(|i| format!("w{i}")).collect::<Vec<_>>();
        assert_eq!(assignment(4, &[], "a"), [0, 2, 1, 3]);
        assert_eq!(assignment(1, &names(2), "w0"), [0]);
        assert!(assignment(1, &names(2), "w1").is_empty());
        let two = names(2);
        assert_eq!(assignment(4, &two, "w0"), [0, 2]);
        assert_eq!(assignment(4, &two, "w1"), [1, 3]);
        for n in 1..=6 {
            let m = names(n);
            let mut all: Vec<u32> = m.iter().flat_map(|h| assignment(4, &m, h)).collect();
            all.sort_unstable();
            assert_eq!(all, [0, 1, 2, 3], "{n} workers");
            let most = m.iter().map(|h| assignment(4, &m, h).len()).max();
            assert_eq!(most, Some(4usize.div_ceil(n)), "{n} workers: even blocks");
        }
    }

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
