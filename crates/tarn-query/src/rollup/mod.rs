//! Rollups: declared aggregations kept current by a second subscriber of the object-created
//! stream, beside curate, and served in milliseconds from memory.
//!
//! Each raw batch (one log record, one sequence) is folded into a small cube without a lock
//! and merged into the live cube; the rollup records the last sequence it applied per shard,
//! and skips every batch at or below it, so a replayed notification changes nothing. Events
//! land in the bucket of their event time, however late they arrive, unless that bucket is
//! past the retention (counted as `rows_expired`; the lake still has them). State is
//! checkpointed to chunk files (`store.rs`) at most every `checkpoint_ms`, and only then does
//! the subscriber commit its offset on the objects topic: after a crash it replays from the
//! last checkpoint, which the recorded sequences make exact.
//!
//! `rebuild` recomputes a day range from the curated table (`rebuild.rs`).

mod codec;
pub mod cube;
mod rebuild;
pub mod sketch;
pub mod store;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

use serde::Serialize;
use serde_json::{Map, Value};
use tarn_catalog::Catalog;
use tarn_core::{Clock, Grain};
use tarn_lake::raw::{batch_seq, read_object};
use tarn_lake::{OBJECTS_TOPIC, ObjectCreated};
use tarn_log::{Log, Topic};
use tokio::sync::watch;

use crate::{Error, Result};
use cube::{Acc, Cube, Def, Dim};
pub use rebuild::{RebuildProgress, RebuildReport};
use store::{Manifest, Rebuilt, chunk_of};

/// When the subscriber checkpoints.
struct Checkpoints {
    /// Batches were applied since the last checkpoint.
    pending: bool,
    last: std::time::Instant,
    took_ms: u64,
}

impl Checkpoints {
    /// While batches arrive, a checkpoint waits at least `min_ms` and ten times as long as the
    /// last one took, so checkpoints of a large state (late events touch old chunks) never
    /// take more than a tenth of the time; a quiet stream checkpoints at once.
    fn due(&self, idle: bool, min_ms: u64) -> bool {
        let wait = min_ms.max(self.took_ms.saturating_mul(10));
        self.pending && (idle || self.last.elapsed().as_millis() as u64 >= wait)
    }
}

/// Buckets merged under one hold of a rollup's state lock.
const MERGE_PART_BUCKETS: usize = 64;

/// The consumer group of the rollups subscriber on the objects topic.
pub const GROUP: &str = "rollups";

#[derive(Debug, Clone)]
pub struct RollupOptions {
    /// Accumulators (group x bucket) one rollup may hold; past it the rollup halts rather
    /// than answer with part of its data.
    pub groups_max: usize,
    /// Longest time between checkpoints while batches arrive.
    pub checkpoint_ms: u64,
    /// Most notification bytes read in one round.
    pub read_bytes_max: usize,
    /// Most rows in one answer.
    pub answer_rows_max: usize,
    /// Where merges into the live state run (they hold the lock readers take); None: on the
    /// subscriber's own threads.
    pub merge_runtime: Option<tokio::runtime::Handle>,
    /// The lake raw objects are read from when it is in a bucket; None: they are files under
    /// the lake root given to [`Rollups::open`].
    pub lake: Option<tarn_lake::Lake>,
    /// The consumer group of the subscriber on the objects topic.
    pub group: String,
}

impl Default for RollupOptions {
    fn default() -> Self {
        Self {
            groups_max: 4_000_000,
            checkpoint_ms: 2_000,
            read_bytes_max: 1 << 20,
            answer_rows_max: 100_000,
            merge_runtime: None,
            lake: None,
            group: GROUP.to_string(),
        }
    }
}

/// Why a rollup stopped applying batches. While one is halted the subscriber's offset stays
/// at the first notification it could not apply, so the stream keeps every notification
/// since; a restart (with a higher limit) replays them, and the rollup misses nothing.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Halt {
    pub reason: String,
    /// When it halted (epoch seconds).
    pub since_secs: i64,
}

struct LiveState {
    cube: Cube,
    manifest: Manifest,
    /// Chunks changed since the last checkpoint.
    dirty: BTreeSet<(Grain, i64)>,
    /// The manifest's own fields (rebuilt ranges) changed since the last checkpoint.
    manifest_changed: bool,
    reset: Option<String>,
    /// Set when the rollup stopped applying batches; in memory only (see `Halt`).
    halted: Option<Halt>,
}

struct Live {
    def: Def,
    dir: PathBuf,
    state: RwLock<LiveState>,
    /// Held for the whole of a checkpoint, so two never interleave (each reads the manifest
    /// the one before it wrote).
    checkpointing: std::sync::Mutex<()>,
    rows: AtomicU64,
    rows_expired: AtomicU64,
    batches: AtomicU64,
    checkpoints: AtomicU64,
}

/// What a rollup reports about itself.
#[derive(Debug, Clone, Serialize)]
pub struct RollupStatus {
    pub name: String,
    pub dataset: String,
    pub dimensions: Vec<String>,
    pub metrics: Vec<String>,
    pub grains: Vec<&'static str>,
    pub retention_days: u32,
    pub groups: usize,
    /// Bytes of the state's chunk files as of the last checkpoint (memory holds a few
    /// times as much).
    pub bytes_on_disk: u64,
    pub rows_applied: u64,
    pub rows_expired: u64,
    pub batches_applied: u64,
    pub checkpoints: u64,
    pub applied: std::collections::BTreeMap<u32, u64>,
    pub halted: Option<Halt>,
    pub reset: Option<String>,
}

/// A read of a rollup.
#[derive(Debug, Clone)]
pub struct RollupQuery {
    pub tenant: String,
    /// Bucket starts in `[from_secs, to_secs)`.
    pub from_secs: i64,
    pub to_secs: i64,
    pub grain: Grain,
    pub group_by: Option<String>,
    /// Dimension = value, all must match.
    pub filters: Vec<(String, String)>,
    /// Per bucket, the first `top` groups by `order_by` (descending).
    pub top: Option<usize>,
    /// A metric name; default the first metric.
    pub order_by: Option<String>,
    /// Metrics to return; default all.
    pub metrics: Option<Vec<String>>,
    /// Quantiles of percentile metrics; default 0.5, 0.9, 0.99.
    pub quantiles: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RollupAnswer {
    pub rollup: String,
    pub tenant: String,
    pub grain: &'static str,
    pub rows: Vec<Map<String, Value>>,
    /// Buckets read and accumulators merged to answer.
    pub buckets_read: usize,
    pub groups_read: usize,
}

/// The rollups of every dataset, their state and their subscriber.
#[derive(Clone)]
pub struct Rollups {
    inner: Arc<Inner>,
}

struct Inner {
    /// The lake's root: raw objects are read from it, state kept under `rollups/`.
    lake_root: PathBuf,
    catalog: Arc<Catalog>,
    clock: Arc<dyn Clock>,
    opts: RollupOptions,
    objects: Topic,
    live: RwLock<HashMap<String, Arc<Live>>>,
    /// Held by the subscriber while it applies a round and by a rebuild while it swaps state.
    apply: tokio::sync::Mutex<()>,
}

fn lock_err<T>(_: T) -> Error {
    Error::Internal("rollup state lock poisoned".into())
}

impl Rollups {
    /// Opens every declared rollup's state (under `<lake>/rollups/`) and registers the
    /// subscriber's consumer group.
    pub async fn open(
        lake_root: PathBuf,
        log: &Log,
        catalog: Arc<Catalog>,
        clock: Arc<dyn Clock>,
        opts: RollupOptions,
    ) -> Result<Self> {
        let objects = log
            .topic(OBJECTS_TOPIC)
            .map_err(|e| Error::Internal(format!("objects topic: {e}")))?;
        objects
            .register_group(&opts.group)
            .await
            .map_err(|e| Error::Internal(format!("registering {}: {e}", opts.group)))?;
        let r = Rollups {
            inner: Arc::new(Inner {
                lake_root,
                catalog,
                clock,
                opts,
                objects,
                live: RwLock::new(HashMap::new()),
                apply: tokio::sync::Mutex::new(()),
            }),
        };
        r.refresh()?;
        Ok(r)
    }

    /// Opens rollups declared since the last call (a rollup's name is unique over every
    /// dataset; a second declaration of a name is refused here).
    pub fn refresh(&self) -> Result<()> {
        let mut found = Vec::new();
        for spec in self.inner.catalog.list() {
            for r in &spec.rollups {
                found.push((spec.clone(), r.clone()));
            }
        }
        let mut live = self.inner.live.write().map_err(lock_err)?;
        for (spec, r) in found {
            let def = Def::new(&spec, &r).map_err(Error::BadQuery)?;
            if let Some(l) = live.get(&r.name) {
                if l.def.dataset != spec.name {
                    return Err(Error::BadQuery(format!(
                        "rollup {:?} is declared by datasets {} and {}; rollup names are unique",
                        r.name, l.def.dataset, spec.name
                    )));
                }
                if l.def == def {
                    continue;
                }
            }
            let dir = self.inner.lake_root.join("rollups").join(&r.name);
            let opened = store::open(&dir, &def).map_err(Error::Internal)?;
            if let Some(why) = &opened.reset {
                tracing::warn!(rollup = %r.name, "{why}");
            }
            live.insert(
                r.name.clone(),
                Arc::new(Live {
                    def,
                    dir,
                    state: RwLock::new(LiveState {
                        cube: opened.cube,
                        manifest: opened.manifest,
                        dirty: BTreeSet::new(),
                        manifest_changed: false,
                        reset: opened.reset,
                        halted: None,
                    }),
                    checkpointing: std::sync::Mutex::new(()),
                    rows: AtomicU64::new(0),
                    rows_expired: AtomicU64::new(0),
                    batches: AtomicU64::new(0),
                    checkpoints: AtomicU64::new(0),
                }),
            );
        }
        Ok(())
    }

    fn get(&self, name: &str) -> Result<Arc<Live>> {
        self.inner
            .live
            .read()
            .map_err(lock_err)?
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no rollup named {name:?}")))
    }

    fn of_dataset(&self, dataset: &str) -> Vec<Arc<Live>> {
        match self.inner.live.read() {
            Ok(l) => l.values().filter(|x| x.def.dataset == dataset).cloned().collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Fails with `NotFound` unless a rollup has this name.
    pub fn check_exists(&self, name: &str) -> Result<()> {
        self.get(name).map(|_| ())
    }

    pub fn status(&self) -> Result<Vec<RollupStatus>> {
        let lives: Vec<Arc<Live>> = self.inner.live.read().map_err(lock_err)?.values().cloned().collect();
        let mut out = Vec::new();
        for l in lives {
            let st = l.state.read().map_err(lock_err)?;
            let bytes: u64 = st.manifest.chunks.iter().map(|c| c.bytes).sum();
            out.push(RollupStatus {
                name: l.def.spec.name.clone(),
                dataset: l.def.dataset.clone(),
                dimensions: l.def.spec.dimensions.clone(),
                metrics: l.def.spec.metrics.iter().map(|m| m.name.clone()).collect(),
                grains: l.def.spec.grains.iter().map(|g| g.as_str()).collect(),
                retention_days: l.def.spec.retention_days(),
                groups: st.cube.groups,
                bytes_on_disk: bytes,
                rows_applied: l.rows.load(Relaxed),
                rows_expired: l.rows_expired.load(Relaxed),
                batches_applied: l.batches.load(Relaxed),
                checkpoints: l.checkpoints.load(Relaxed),
                applied: st.manifest.applied.clone(),
                halted: st.halted.clone(),
                reset: st.reset.clone(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The start (epoch seconds) of the oldest day a rollup keeps now.
    fn cutoff(&self, def: &Def) -> i64 {
        let today = Grain::Day.bucket_of(self.inner.clock.now_micros().div_euclid(1_000_000));
        today - (i64::from(def.spec.retention_days()) - 1) * 86_400
    }

    /// Runs the subscriber until `shutdown` turns true, retrying failed rounds from the
    /// committed offset with backoff.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff_ms = 100u64;
        loop {
            match self.run_once(&mut shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::error!(error = %e, "rollups failed; retrying from the last checkpoint");
                    if let Err(e) = self.reload().await {
                        tracing::error!(error = %e, "reloading rollups");
                    }
                    let wait = std::time::Duration::from_millis(backoff_ms);
                    backoff_ms = (backoff_ms * 2).min(10_000);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }

    /// Drops the in-memory state of every rollup and loads its last checkpoint again, so a
    /// round that failed halfway leaves nothing behind.
    async fn reload(&self) -> Result<()> {
        let _apply = self.inner.apply.lock().await;
        let _lives: Vec<Arc<Live>> = {
            let mut live = self.inner.live.write().map_err(lock_err)?;
            live.drain().map(|(_, l)| l).collect()
        };
        // No checkpoint of the dropped state may be in flight while its files are reopened.
        for l in &_lives {
            drop(l.checkpointing.lock().map_err(lock_err)?);
        }
        self.refresh()
    }

    async fn run_once(&self, shutdown: &mut watch::Receiver<bool>) -> Result<()> {
        let objects = &self.inner.objects;
        let start = objects
            .register_group(&self.inner.opts.group)
            .await
            .map_err(|e| Error::Internal(format!("registering {}: {e}", self.inner.opts.group)))?;
        let mut cursor = Some(objects.cursor(start));
        let mut ck = Checkpoints {
            pending: false,
            last: std::time::Instant::now(),
            took_ms: 0,
        };
        // The first notification a halted rollup skipped: the offset never passes it.
        let mut hold: Option<u64> = None;
        loop {
            let Some(c) = cursor.take() else {
                return Err(Error::Internal("cursor lost".into()));
            };
            if *shutdown.borrow() {
                if ck.pending {
                    self.commit(hold.unwrap_or(c.next_seq())).await?;
                }
                return Ok(());
            }
            let max = self.inner.opts.read_bytes_max;
            let (mut c, recs) = c
                .fetch(max)
                .await
                .map_err(|e| Error::Internal(format!("reading notifications: {e}")))?;
            let idle = recs.is_empty();
            if !idle {
                let _apply = self.inner.apply.lock().await;
                self.refresh()?;
                for r in &recs {
                    let n: ObjectCreated = serde_json::from_slice(&r.payload)
                        .map_err(|e| Error::Internal(format!("notification {}: {e}", r.seq)))?;
                    if self.apply_object(&n).await? && hold.is_none() {
                        hold = Some(r.seq);
                    }
                }
                self.expire_all()?;
                ck.pending = true;
            }
            if ck.due(idle, self.inner.opts.checkpoint_ms) {
                let t = std::time::Instant::now();
                self.commit(hold.unwrap_or(c.next_seq())).await?;
                ck.took_ms = t.elapsed().as_millis() as u64;
                ck.pending = false;
                ck.last = std::time::Instant::now();
            }
            if idle {
                tokio::select! {
                    _ = c.wait() => {}
                    _ = shutdown.changed() => {}
                }
            }
            cursor = Some(c);
        }
    }

    /// Checkpoints every rollup, then commits the objects offset `next` and trims the topic.
    async fn commit(&self, next: u64) -> Result<()> {
        {
            let _apply = self.inner.apply.lock().await;
            self.checkpoint_all().await?;
        }
        let objects = &self.inner.objects;
        objects
            .commit(&self.inner.opts.group, next)
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        objects
            .apply_retention()
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(())
    }

    /// Applies one raw object to every rollup of its dataset. True when a halted rollup
    /// skipped it.
    async fn apply_object(&self, n: &ObjectCreated) -> Result<bool> {
        let lives = self.of_dataset(&n.dataset);
        let mut todo = Vec::new();
        let mut skipped = false;
        for l in lives {
            let st = l.state.read().map_err(lock_err)?;
            let behind = st.manifest.applied.get(&n.shard).is_none_or(|s| *s < n.last_seq);
            if behind && st.halted.is_some() {
                skipped = true;
            } else if behind {
                drop(st);
                todo.push(l);
            }
        }
        if todo.is_empty() {
            return Ok(skipped);
        }
        let rel = n.path.clone();
        let batches = match self.inner.opts.lake.as_ref().filter(|l| l.remote().is_some()) {
            Some(lake) => lake
                .read_raw(&rel)
                .await
                .map_err(|e| Error::Internal(format!("raw object {rel}: {e}")))?,
            None => {
                let root = self.inner.lake_root.clone();
                tokio::task::spawn_blocking(move || {
                    read_object(&root, &rel).map_err(|e| format!("raw object {rel}: {e}"))
                })
                .await
                .map_err(|e| Error::Internal(format!("reader task: {e}")))?
                .map_err(Error::Internal)?
            }
        };
        for l in todo {
            let cutoff = self.cutoff(&l.def);
            let shard = n.shard;
            let (applied, rebuilt) = {
                let st = l.state.read().map_err(lock_err)?;
                (st.manifest.applied.get(&shard).copied(), st.manifest.rebuilt.clone())
            };
            let def = l.def.clone();
            let batches = batches.clone();
            let t_fold = std::time::Instant::now();
            // Fold the object's new batches into one small cube off the async threads.
            let folded = tokio::task::spawn_blocking(move || -> Result<(Cube, u64, u64, u64, u64)> {
                let mut delta = Cube::default();
                let (mut rows, mut expired, mut count, mut last) = (0u64, 0u64, 0u64, 0u64);
                for b in &batches {
                    let seq = batch_seq(b).map_err(|e| Error::Internal(e.to_string()))?;
                    if applied.is_some_and(|a| seq <= a) {
                        continue;
                    }
                    // Rows written under another major version belong to another table.
                    let major = b
                        .schema()
                        .metadata()
                        .get("tarn.major")
                        .and_then(|v| v.parse::<u32>().ok())
                        .unwrap_or(1);
                    if major != def.major {
                        continue;
                    }
                    let skip = rebuilt_filter(&def, b, &rebuilt, shard, seq)?;
                    let keep = |i: usize| !skip.get(i).copied().unwrap_or(false);
                    let (applied, x) = delta.fold(&def, b, cutoff, &keep).map_err(Error::Internal)?;
                    rows += applied;
                    expired += x;
                    count += 1;
                    last = last.max(seq);
                }
                Ok((delta, rows, expired, count, last))
            })
            .await
            .map_err(|e| Error::Internal(format!("rollup task: {e}")))??;
            let (delta, rows, expired, count, last) = folded;
            if count == 0 {
                continue;
            }
            // Only this task changes the cube, so what the check reads holds for the merge.
            let over = {
                let st = l.state.read().map_err(lock_err)?;
                st.cube.groups + st.cube.new_groups(&delta) > self.inner.opts.groups_max
            };
            if over {
                let mut st = l.state.write().map_err(lock_err)?;
                let halt = Halt {
                    reason: format!(
                        "rollup {:?} would hold more than {} groups (--rollup-groups-max); it stopped applying batches",
                        l.def.spec.name, self.inner.opts.groups_max
                    ),
                    since_secs: self.inner.clock.now_micros().div_euclid(1_000_000),
                };
                tracing::error!(rollup = %l.def.spec.name, "{}", halt.reason);
                st.halted = Some(halt);
                skipped = true;
                continue;
            }
            let fold_ms = t_fold.elapsed().as_millis() as u64;
            let t_merge = std::time::Instant::now();
            // Merged a part at a time: readers wait at most one part's merge, never a whole
            // batch's. A reader may see some tenants' buckets of this object before others';
            // no checkpoint runs meanwhile (they share the apply lock), so none records half.
            let parts = delta.into_parts(MERGE_PART_BUCKETS);
            let live = l.clone();
            let merge = move || -> Result<()> {
                for part in parts {
                    let mut st = live.state.write().map_err(lock_err)?;
                    for (g, b) in st.cube.absorb(part) {
                        st.dirty.insert((g, chunk_of(g, b)));
                    }
                }
                Ok(())
            };
            // A lock holder at the lowest priority could be preempted for long while readers
            // wait on it: the short merges run on the caller's runtime of normal priority.
            match &self.inner.opts.merge_runtime {
                Some(h) => h
                    .spawn_blocking(merge)
                    .await
                    .map_err(|e| Error::Internal(format!("merge task: {e}")))??,
                None => merge()?,
            }
            tracing::debug!(rollup = %l.def.spec.name, rows, fold_ms, merge_ms = t_merge.elapsed().as_millis() as u64, "rollup batch");
            let mut st = l.state.write().map_err(lock_err)?;
            st.manifest.applied.insert(shard, last);
            let applied_now = st.manifest.applied.clone();
            st.manifest
                .rebuilt
                .retain(|r| r.through.iter().any(|(s, t)| applied_now.get(s).is_none_or(|a| a < t)));
            l.rows.fetch_add(rows, Relaxed);
            l.rows_expired.fetch_add(expired, Relaxed);
            l.batches.fetch_add(count, Relaxed);
        }
        Ok(skipped)
    }

    /// Drops buckets past each rollup's retention.
    fn expire_all(&self) -> Result<()> {
        let lives: Vec<Arc<Live>> = self.inner.live.read().map_err(lock_err)?.values().cloned().collect();
        for l in lives {
            let cutoff = self.cutoff(&l.def);
            let mut st = l.state.write().map_err(lock_err)?;
            for (g, b) in st.cube.expire(cutoff) {
                st.dirty.insert((g, chunk_of(g, b)));
            }
        }
        Ok(())
    }

    /// Expires old buckets and checkpoints every rollup with changes; the maintenance loop
    /// calls it so that retention runs on a quiet stream too.
    pub async fn maintain(&self) -> Result<()> {
        let _apply = self.inner.apply.lock().await;
        self.expire_all()?;
        self.checkpoint_all().await
    }

    /// Checkpoints every rollup with changes, on a blocking thread (it syncs files). Callers
    /// hold the apply lock, so no batch, expiry or rebuild changes a cube meanwhile.
    async fn checkpoint_all(&self) -> Result<()> {
        let lives: Vec<Arc<Live>> = self.inner.live.read().map_err(lock_err)?.values().cloned().collect();
        tokio::task::spawn_blocking(move || lives.iter().try_for_each(|l| checkpoint(l)))
            .await
            .map_err(|e| Error::Internal(format!("checkpoint task: {e}")))?
    }

    /// Answers a read from memory.
    pub fn query(&self, name: &str, q: &RollupQuery) -> Result<RollupAnswer> {
        let l = self.get(name)?;
        let def = &l.def;
        let bad = |m: String| Err(Error::BadQuery(m));
        if !def.spec.grains.contains(&q.grain) {
            let kept: Vec<&str> = def.spec.grains.iter().map(|g| g.as_str()).collect();
            return bad(format!(
                "rollup {name:?} keeps the grains {}, not {}",
                kept.join(", "),
                q.grain.as_str()
            ));
        }
        if q.from_secs >= q.to_secs {
            return bad("the range is empty: from must come before to".into());
        }
        let dim_index = |d: &str| def.dims.iter().position(|(n, _)| n == d);
        let group = match &q.group_by {
            None => None,
            Some(d) => match dim_index(d) {
                Some(i) => Some(i),
                None => return bad(format!("{d:?} is not a dimension of rollup {name:?}")),
            },
        };
        let mut filters = Vec::new();
        for (d, v) in &q.filters {
            let Some(i) = dim_index(d) else {
                return bad(format!("filter on {d:?}, which is not a dimension of rollup {name:?}"));
            };
            let Some(val) = Dim::parse(def.dims[i].1, v) else {
                return bad(format!("filter value {v:?} is not a {}", def.dims[i].1.as_str()));
            };
            filters.push((i, val));
        }
        let metrics: Vec<usize> = match &q.metrics {
            None => (0..def.spec.metrics.len()).collect(),
            Some(names) => {
                let mut out = Vec::new();
                for m in names {
                    match def.spec.metrics.iter().position(|x| &x.name == m) {
                        Some(i) => out.push(i),
                        None => return bad(format!("{m:?} is not a metric of rollup {name:?}")),
                    }
                }
                out
            }
        };
        let order = match &q.order_by {
            None => 0,
            Some(m) => match def.spec.metrics.iter().position(|x| &x.name == m) {
                Some(i) => i,
                None => return bad(format!("order_by {m:?} is not a metric of rollup {name:?}")),
            },
        };
        for x in &q.quantiles {
            if !(0.0..=1.0).contains(x) {
                return bad(format!("quantile {x} is not between 0 and 1"));
            }
        }
        let st = l.state.read().map_err(lock_err)?;
        if let Some(h) = &st.halted {
            return Err(Error::Unavailable(format!(
                "{} at {}; raise the limit and restart tarn: the rollup then replays what it skipped, which the stream keeps meanwhile",
                h.reason,
                bucket_text(h.since_secs)
            )));
        }
        let mut ans = RollupAnswer {
            rollup: name.to_string(),
            tenant: q.tenant.clone(),
            grain: q.grain.as_str(),
            rows: Vec::new(),
            buckets_read: 0,
            groups_read: 0,
        };
        let Some(buckets) = st.cube.grains.get(&q.grain).and_then(|t| t.get(q.tenant.as_str())) else {
            return Ok(ans);
        };
        let gname = group.map(|i| def.dims[i].0.as_str());
        for (start, b) in buckets.range(q.from_secs..q.to_secs) {
            ans.buckets_read += 1;
            let mut groups: Vec<(Option<Dim>, std::borrow::Cow<Acc>)> = Vec::new();
            if group.is_none() && filters.is_empty() {
                groups.push((None, std::borrow::Cow::Borrowed(&b.total)));
                ans.groups_read += 1;
            } else if let (Some(i), true) = (group, filters.is_empty()) {
                for (k, a) in &b.by_dim[i] {
                    groups.push((Some(k.clone()), std::borrow::Cow::Borrowed(a)));
                }
                ans.groups_read += b.by_dim[i].len();
            } else {
                let mut merged: HashMap<Option<Dim>, Acc> = HashMap::new();
                let mut visit = |key: &[Dim], a: &Acc| {
                    if filters.iter().all(|(i, v)| &key[*i] == v) {
                        let g = group.map(|i| key[i].clone());
                        match merged.get_mut(&g) {
                            Some(m) => m.merge(a),
                            None => {
                                merged.insert(g, a.clone());
                            }
                        }
                    }
                };
                if def.dims.len() == 1 {
                    for (k, a) in &b.by_dim[0] {
                        visit(std::slice::from_ref(k), a);
                    }
                    ans.groups_read += b.by_dim[0].len();
                } else {
                    for (k, a) in &b.full {
                        visit(k, a);
                    }
                    ans.groups_read += b.full.len();
                }
                groups.extend(merged.into_iter().map(|(k, a)| (k, std::borrow::Cow::Owned(a))));
            }
            if group.is_some() {
                groups.sort_by(|x, y| {
                    let kx = x.1.states[order].order_key(x.1.events);
                    let ky = y.1.states[order].order_key(y.1.events);
                    match (kx, ky) {
                        (Some(a), Some(b)) => b.total_cmp(&a),
                        (Some(_), None) => std::cmp::Ordering::Less,
                        (None, Some(_)) => std::cmp::Ordering::Greater,
                        (None, None) => std::cmp::Ordering::Equal,
                    }
                    .then_with(|| nulls_last(&x.0, &y.0))
                });
                if let Some(n) = q.top {
                    groups.truncate(n);
                }
            }
            let bucket = bucket_text(*start);
            for (k, a) in groups {
                let mut row = Map::new();
                row.insert("bucket".into(), Value::from(bucket.clone()));
                if let (Some(n), Some(k)) = (gname, &k) {
                    row.insert(n.to_string(), k.to_json());
                }
                for i in &metrics {
                    row.insert(
                        def.spec.metrics[*i].name.clone(),
                        a.states[*i].value(a.events, &q.quantiles),
                    );
                }
                ans.rows.push(row);
            }
            if ans.rows.len() > self.inner.opts.answer_rows_max {
                return bad(format!(
                    "the answer would hold more than {} rows; narrow the range, use a coarser grain or top",
                    self.inner.opts.answer_rows_max
                ));
            }
        }
        Ok(ans)
    }
}

#[cfg(test)]
mod tests;

/// Orders group values ascending with a missing value last, as SQL's `ORDER BY x` does.
fn nulls_last(a: &Option<Dim>, b: &Option<Dim>) -> std::cmp::Ordering {
    let rank = |d: &Option<Dim>| matches!(d, None | Some(Dim::Null));
    rank(a).cmp(&rank(b)).then_with(|| a.cmp(b))
}

/// RFC 3339 text of a bucket start.
pub fn bucket_text(secs: i64) -> String {
    use chrono::{Datelike as _, Timelike as _};
    // Written field by field: a strftime pattern is parsed again on every call, and a
    // 93-day hourly series formats 2,232 of these per read.
    match chrono::DateTime::from_timestamp(secs, 0) {
        Some(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        None => secs.to_string(),
    }
}

/// Which rows of a batch a rebuild already counted: those in a rebuilt day range whose
/// sequence is at or below what the rebuild read from the table.
fn rebuilt_filter(
    def: &Def,
    b: &deltalake::arrow::array::RecordBatch,
    rebuilt: &[Rebuilt],
    shard: u32,
    seq: u64,
) -> Result<Vec<bool>> {
    let ranges: Vec<&Rebuilt> = rebuilt
        .iter()
        .filter(|r| r.through.get(&shard).is_some_and(|t| seq <= *t))
        .collect();
    if ranges.is_empty() {
        return Ok(Vec::new());
    }
    let secs = cube::event_secs(def, b).map_err(Error::Internal)?;
    Ok(secs
        .iter()
        .map(|s| s.is_some_and(|s| ranges.iter().any(|r| (r.from_secs..r.to_secs).contains(&s))))
        .collect())
}

fn checkpoint(l: &Live) -> Result<()> {
    let _one = l.checkpointing.lock().map_err(lock_err)?;
    let (dirty, mut manifest) = {
        let mut st = l.state.write().map_err(lock_err)?;
        if st.dirty.is_empty() && st.manifest.generation > 0 && !st.manifest_changed {
            return Ok(());
        }
        st.manifest_changed = false;
        (std::mem::take(&mut st.dirty), st.manifest.clone())
    };
    // Nothing changes the cube during a checkpoint (see `checkpoint_all`), so chunks encoded
    // one at a time under the read lock agree with the sequences taken above; readers share
    // that lock, so they never wait on a checkpoint.
    let mut chunks: Vec<((Grain, i64), Vec<u8>)> = Vec::with_capacity(dirty.len());
    for (g, start) in dirty {
        let st = l.state.read().map_err(lock_err)?;
        chunks.push(((g, start), st.cube.encode_range(g, start, start + store::chunk_span(g))));
    }
    let t = std::time::Instant::now();
    let written = store::checkpoint(&l.dir, &mut manifest, &chunks).map_err(Error::Internal);
    let mut st = l.state.write().map_err(lock_err)?;
    // Whatever happened, `manifest` says which generation and chunks are on disk now; the
    // sequences and rebuilt ranges in memory may be newer and stay.
    st.manifest.generation = manifest.generation;
    st.manifest.chunks = manifest.chunks;
    match written {
        Ok(bytes) => {
            l.checkpoints.fetch_add(1, Relaxed);
            tracing::debug!(rollup = %l.def.spec.name, bytes, ms = t.elapsed().as_millis() as u64, "rollup checkpoint");
            Ok(())
        }
        Err(e) => {
            st.dirty.extend(chunks.into_iter().map(|(k, _)| k));
            st.manifest_changed = true;
            Err(e)
        }
    }
}
