//! Curate: the subscriber of the object-created stream that appends each raw object's rows to
//! its dataset's Delta table. Notifications read together are grouped per dataset into one
//! Delta commit. Each commit carries the application transaction `(tarn-curate/<dataset>/<shard>,
//! last sequence)`; rows at or below the version already committed are skipped, so a replayed
//! notification or an overlapping raw object adds nothing twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use deltalake::DeltaTable;
use tarn_catalog::Catalog;
use tarn_core::Clock as _;
use tarn_log::{Log, Topic};
use tokio::sync::watch;

use crate::raw::{batch_seq, without_seq};
use crate::table::{app_version, append_as, curate_app_id};
use crate::{Error, Lake, OBJECTS_TOPIC, ObjectCreated, Result};

/// The consumer group of curate on the objects topic.
pub const GROUP: &str = "curate";

#[derive(Debug, Clone)]
pub struct CurateOptions {
    /// Most notification bytes read for one round of commits.
    pub read_bytes_max: usize,
    /// A commit is made as soon as the rows gathered for it take this much memory, so one round
    /// over many raw objects never holds them all at once.
    pub commit_bytes_max: usize,
    /// Curate is split into `units` by stream shard: this curator applies the raw objects of
    /// shards `s` with `s % units == unit`, with a consumer group of its own (`curate` for unit
    /// 0, `curate.<unit>` for the others). One unit (the default) applies every object.
    pub unit: u32,
    pub units: u32,
}

impl Default for CurateOptions {
    fn default() -> Self {
        Self {
            read_bytes_max: 1 << 20,
            commit_bytes_max: tarn_core::Limits::default().curate_commit_bytes,
            unit: 0,
            units: 1,
        }
    }
}

impl CurateOptions {
    /// The consumer group of this unit on the objects topic.
    pub fn group(&self) -> String {
        match self.unit {
            0 => GROUP.to_string(),
            u => format!("{GROUP}.{u}"),
        }
    }

    /// Whether this unit applies the raw objects of `shard`.
    fn owns(&self, shard: u32) -> bool {
        shard % self.units.max(1) == self.unit
    }
}

/// Progress counters of curate.
#[derive(Debug, Default)]
pub struct CurateStats {
    pub rows: AtomicU64,
    pub commits: AtomicU64,
    pub objects: AtomicU64,
    pub errors: AtomicU64,
    /// Milliseconds spent in Delta appends.
    pub commit_ms: AtomicU64,
    /// The next objects-topic sequence curate has not processed.
    pub next_notification: AtomicU64,
    /// Wall time (µs) of the last successful commit.
    pub last_commit_us: AtomicI64,
}

/// The curate subscriber.
pub struct Curator {
    objects: Topic,
    group: String,
    /// Held shared by each round; a pause takes it alone.
    gate: Arc<tokio::sync::RwLock<()>>,
    lake: Lake,
    catalog: Arc<Catalog>,
    opts: CurateOptions,
    tables: Arc<Tables>,
    pub stats: Arc<CurateStats>,
}

impl Curator {
    pub async fn new(log: &Log, lake: Lake, catalog: Arc<Catalog>, opts: CurateOptions) -> Result<Self> {
        if opts.unit >= opts.units.max(1) {
            return Err(Error::Internal(format!(
                "curate unit {} of {} does not exist",
                opts.unit, opts.units
            )));
        }
        let objects = log.topic(OBJECTS_TOPIC)?;
        let group = opts.group();
        let start = objects.register_group(&group).await?;
        let stats = Arc::new(CurateStats::default());
        stats.next_notification.store(start, Relaxed);
        Ok(Self {
            objects,
            group,
            gate: Arc::default(),
            lake,
            catalog,
            opts,
            tables: Arc::new(tokio::sync::Mutex::new(HashMap::new())),
            stats,
        })
    }

    /// A handle that pauses this curator.
    pub fn pauser(&self) -> CuratePause {
        let p = CuratePause {
            curators: Arc::default(),
            gate: self.gate.clone(),
        };
        p.add(&self.tables);
        p
    }

    /// Counts into `stats` (shared by the curators of one process) instead of its own.
    pub fn with_stats(mut self, stats: Arc<CurateStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Lets `pause` pause this curator too.
    pub fn paused_by(mut self, pause: &CuratePause) -> Self {
        pause.add(&self.tables);
        self.gate = pause.gate.clone();
        self
    }

    /// Runs until `shutdown` turns true, retrying failed rounds with backoff from the committed
    /// offset.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = crate::Backoff::new();
        while let Err(e) = self.run_once(&mut shutdown, &mut backoff).await {
            self.stats.errors.fetch_add(1, Relaxed);
            self.tables.lock().await.clear();
            if !backoff.after(&self.group, &e, &mut shutdown).await {
                return;
            }
        }
    }

    async fn run_once(&self, shutdown: &mut watch::Receiver<bool>, backoff: &mut crate::Backoff) -> Result<()> {
        let start = self.objects.register_group(&self.group).await?;
        let mut cursor = Some(self.objects.cursor(start));
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let Some(c) = cursor.take() else {
                return Err(Error::Internal("cursor lost".into()));
            };
            let max = self.opts.read_bytes_max;
            let (mut c, recs) = c.fetch(max).await?;
            if recs.is_empty() {
                tokio::select! {
                    _ = c.wait() => {}
                    _ = shutdown.changed() => {}
                }
                cursor = Some(c);
                continue;
            }
            let mut notes = Vec::with_capacity(recs.len());
            for r in &recs {
                let n: ObjectCreated = serde_json::from_slice(&r.payload).map_err(|e| Error::Corrupt {
                    what: format!("notification {}", r.seq),
                    reason: e.to_string(),
                })?;
                if self.opts.owns(n.shard) {
                    notes.push(n);
                }
            }
            self.apply(&notes).await?;
            let next = c.next_seq();
            self.objects.commit(&self.group, next).await?;
            self.objects.apply_retention().await?;
            backoff.reset();
            if self.opts.unit == 0 {
                self.stats.next_notification.store(next, Relaxed);
            }
            cursor = Some(c);
        }
    }

    /// Applies notifications: per dataset and shard, in order, one commit; waits while curate
    /// is paused.
    pub async fn apply(&self, notes: &[ObjectCreated]) -> Result<()> {
        let _round = self.gate.read().await;
        let mut order: Vec<(String, u32)> = Vec::new();
        let mut groups: HashMap<(String, u32), Vec<&ObjectCreated>> = HashMap::new();
        for n in notes {
            if n.version != 1 {
                return Err(Error::Corrupt {
                    what: n.path.clone(),
                    reason: format!("notification version {} is not supported", n.version),
                });
            }
            let key = (n.dataset.clone(), n.shard);
            if !groups.contains_key(&key) {
                order.push(key.clone());
            }
            groups.entry(key).or_default().push(n);
        }
        for key in order {
            let list = groups.remove(&key).unwrap_or_default();
            self.apply_dataset(&key.0, key.1, &list).await?;
        }
        Ok(())
    }

    async fn apply_dataset(&self, dataset: &str, shard: u32, notes: &[&ObjectCreated]) -> Result<()> {
        // The contract is read under the lock a new major version holds while it moves the
        // table: a round that waited for it routes by the new contract.
        let mut tables = self.tables.lock().await;
        let spec = self.catalog.get(dataset).ok_or_else(|| Error::Corrupt {
            what: format!("notification for {dataset}"),
            reason: "dataset is not in the catalog".into(),
        })?;
        // Rows go to the table of the major version they were written under: the dataset's own
        // table, or `<dataset>__v<N>` for a batch written before major version N+1 began. Each
        // table records the sequences of this stream it holds, so each skips its own replays.
        let mut cur: Option<Target> = None;
        let mut floor = None;
        let mut skipped = false;
        for n in notes {
            let last_seq = i64::try_from(n.last_seq).map_err(|_| Error::Corrupt {
                what: n.path.clone(),
                reason: "sequence out of range".into(),
            })?;
            if floor.is_none() {
                floor = Some(self.floor(&spec, shard, &mut tables).await?);
            }
            if floor.is_some_and(|f| last_seq <= f) {
                skipped = true;
                continue;
            }
            let t = std::time::Instant::now();
            let raw = self.lake.read_raw(&n.path).await?;
            tracing::debug!(path = %n.path, read_ms = t.elapsed().as_millis() as u64, "raw object read");
            // Where this object's rows start in the target they go to (one object holds one
            // schema, so one major version and one target).
            let mut fresh: Option<(String, usize)> = None;
            // The sequence whose batches this object is adding now: one log record may hold
            // several batches, back to back in one object, all of its sequence.
            let mut adding: Option<i64> = None;
            for b in raw {
                let seq = batch_seq(&b)? as i64;
                let major = tarn_collector::major_of(&b.schema()).map_err(|reason| Error::Corrupt {
                    what: n.path.clone(),
                    reason,
                })?;
                let name = if major == spec.major {
                    spec.name.clone()
                } else if major < spec.major {
                    tarn_core::DatasetSpec::frozen_name(dataset, major)
                } else {
                    return Err(Error::Corrupt {
                        what: n.path.clone(),
                        reason: format!("written under major version {major}, after {}", spec.major),
                    });
                };
                if cur.as_ref().is_none_or(|t| t.spec.name != name) {
                    if let Some(t) = cur.take() {
                        self.finish(t, dataset, shard, &mut tables).await?;
                    }
                    cur = Some(self.target(&name, dataset, shard, &mut tables).await?);
                }
                let Some(t) = cur.as_mut() else {
                    return Err(Error::Internal("no target table".into()));
                };
                if seq < t.last || (seq == t.last && adding != Some(seq)) {
                    t.replayed |= seq <= t.done;
                    continue;
                }
                adding = Some(seq);
                t.last = seq;
                t.rows += b.num_rows() as u64;
                t.held += b.get_array_memory_size();
                if fresh.as_ref().is_none_or(|(name, _)| *name != t.spec.name) {
                    fresh = Some((t.spec.name.clone(), t.batches.len()));
                }
                t.batches.push(without_seq(&b)?);
            }
            if let (Some((name, start)), Some(t)) = (fresh, cur.as_mut())
                && t.spec.name == name
            {
                coalesce(&mut t.batches, start)?;
            }
            self.stats.objects.fetch_add(1, Relaxed);
            if let Some(t) = cur.as_mut()
                && t.held >= self.opts.commit_bytes_max
            {
                self.commit_held(t, dataset, shard).await?;
            }
        }
        if let Some(t) = cur.take() {
            self.finish(t, dataset, shard, &mut tables).await?;
        }
        if skipped {
            // Rows of a replay were committed before a failure that may have come before the
            // commit's entry was synced: sync the newest entries before the offset moves past.
            for name in dataset_tables(&spec) {
                let dir = self.lake.table_dir(&name);
                if self.lake.remote().is_some() || !self.lake.table_exists(&name) {
                    continue;
                }
                tokio::task::spawn_blocking(move || crate::table::sync_log_tail(&dir, 16))
                    .await
                    .map_err(|e| Error::Internal(format!("sync task: {e}")))??;
            }
        }
        Ok(())
    }

    /// The lowest sequence of this stream that every one of the dataset's tables (its own and
    /// those of earlier major versions) already holds: a notification at or below it is a
    /// replay and is not read.
    async fn floor(
        &self,
        spec: &tarn_core::DatasetSpec,
        shard: u32,
        tables: &mut HashMap<String, DeltaTable>,
    ) -> Result<i64> {
        let mut floor = i64::MAX;
        for name in dataset_tables(spec) {
            if self.catalog.get(&name).is_none() {
                continue;
            }
            let t = self.target(&name, &spec.name, shard, tables).await?;
            floor = floor.min(t.done);
            if let Some(table) = t.table {
                tables.insert(name, table);
            }
        }
        Ok(if floor == i64::MAX { -1 } else { floor })
    }

    /// Opens (or takes from the cache) the table of `name` for rows of the stream `dataset`.
    async fn target(
        &self,
        name: &str,
        dataset: &str,
        shard: u32,
        tables: &mut HashMap<String, DeltaTable>,
    ) -> Result<Target> {
        let spec = self.catalog.get(name).ok_or_else(|| Error::Corrupt {
            what: format!("rows of {dataset}"),
            reason: format!("they belong to {name}, which is not in the catalog"),
        })?;
        let table = match tables.remove(name) {
            // Another writer may have committed since (columns added by `tarn apply`, a
            // compaction): start from the newest version.
            Some(mut t) if t.version().is_some() => {
                t.update_incremental(None).await.map_err(crate::delta_err(name))?;
                t
            }
            _ => self.lake.open_table(name).await?,
        };
        let done = app_version(&table, name, &curate_app_id(dataset, shard)).await?;
        Ok(Target {
            spec,
            table: Some(table),
            done,
            last: done,
            batches: Vec::new(),
            held: 0,
            rows: 0,
            replayed: false,
        })
    }

    async fn commit_held(&self, t: &mut Target, dataset: &str, shard: u32) -> Result<()> {
        if t.batches.is_empty() {
            return Ok(());
        }
        let batches = std::mem::take(&mut t.batches);
        let table = self
            .commit(t.table.take(), &t.spec, dataset, batches, shard, t.last, t.rows)
            .await?;
        t.table = Some(table);
        t.held = 0;
        t.rows = 0;
        Ok(())
    }

    /// Commits what a target holds and puts its table back in the cache.
    async fn finish(
        &self,
        mut t: Target,
        dataset: &str,
        shard: u32,
        tables: &mut HashMap<String, DeltaTable>,
    ) -> Result<()> {
        self.commit_held(&mut t, dataset, shard).await?;
        if t.replayed && self.lake.remote().is_none() {
            // Rows of a replay were committed before a failure that may have come before the
            // commit's entry was synced: sync the newest entries before the offset moves past.
            let dir = self.lake.table_dir(&t.spec.name);
            tokio::task::spawn_blocking(move || crate::table::sync_log_tail(&dir, 16))
                .await
                .map_err(|e| Error::Internal(format!("sync task: {e}")))??;
        }
        if let Some(table) = t.table {
            tables.insert(t.spec.name.clone(), table);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn commit(
        &self,
        table: Option<DeltaTable>,
        spec: &tarn_core::DatasetSpec,
        stream: &str,
        batches: Vec<deltalake::arrow::array::RecordBatch>,
        shard: u32,
        version: i64,
        rows: u64,
    ) -> Result<DeltaTable> {
        let table = match table {
            Some(t) => t,
            None => self.lake.open_table(&spec.name).await?,
        };
        let started = std::time::Instant::now();
        let writing = self.lake.writing(&spec.name).await;
        let table = append_as(table, spec, stream, batches, shard, version, self.lake.writer()).await?;
        drop(writing);
        let took_ms = started.elapsed().as_millis() as u64;
        self.stats.commit_ms.fetch_add(took_ms, Relaxed);
        self.stats.rows.fetch_add(rows, Relaxed);
        self.stats.commits.fetch_add(1, Relaxed);
        self.stats
            .last_commit_us
            .store(tarn_core::SystemClock.now_micros(), Relaxed);
        tracing::info!(dataset = %spec.name, rows, version, took_ms, "curated");
        Ok(table)
    }
}

/// Joins `batches[start..]` (one raw object's rows: a batch per log record, so hundreds of
/// small ones when requests are small) into one batch, when they share a schema. Writing a
/// partition gathers its rows from every batch held, column by column, and that costs a check
/// and a copy of each batch's array handles per column and partition: with 600 partitions and
/// 300 batches, millions of them a commit. One copy of the rows here is cheaper, and holds at
/// most one object's rows twice, briefly.
fn coalesce(batches: &mut Vec<deltalake::arrow::array::RecordBatch>, start: usize) -> Result<()> {
    let Some(first) = batches.get(start) else {
        return Ok(());
    };
    let schema = first.schema();
    if batches.len() - start < 2 || batches[start..].iter().any(|b| b.schema() != schema) {
        return Ok(());
    }
    let whole = deltalake::arrow::compute::concat_batches(&schema, &batches[start..])?;
    batches.truncate(start);
    batches.push(whole);
    Ok(())
}

/// The tables rows of a dataset's stream may go to: its own and those of its earlier major
/// versions.
fn dataset_tables(spec: &tarn_core::DatasetSpec) -> Vec<String> {
    let mut names = vec![spec.name.clone()];
    names.extend((1..spec.major).map(|m| tarn_core::DatasetSpec::frozen_name(&spec.name, m)));
    names
}

/// Rows gathered for one table in a round.
struct Target {
    spec: Arc<tarn_core::DatasetSpec>,
    table: Option<DeltaTable>,
    /// The newest sequence of the stream the table held when the round began.
    done: i64,
    /// The newest sequence gathered or committed.
    last: i64,
    batches: Vec<deltalake::arrow::array::RecordBatch>,
    held: usize,
    rows: u64,
    /// Some rows were already in the table.
    replayed: bool,
}

type Tables = tokio::sync::Mutex<HashMap<String, DeltaTable>>;

/// Pauses the curators it was given, those given later too: while the guard lives, none of
/// them runs a round and none caches a table (a new major version moves the dataset's table
/// away). A curator that has stopped drops out on its own.
#[derive(Clone, Default)]
pub struct CuratePause {
    curators: Arc<std::sync::Mutex<Vec<std::sync::Weak<Tables>>>>,
    /// Each round holds it shared; a pause holds it alone.
    gate: Arc<tokio::sync::RwLock<()>>,
}

/// Curate stays paused while this lives.
pub struct Paused(#[allow(dead_code)] tokio::sync::OwnedRwLockWriteGuard<()>);

impl CuratePause {
    fn add(&self, tables: &Arc<Tables>) {
        let mut all = self.curators.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(tables));
    }

    pub async fn pause(&self) -> Paused {
        // Rounds in progress end first; no round starts until the guard is dropped.
        let gate = self.gate.clone().write_owned().await;
        let live: Vec<Arc<Tables>> = {
            let all = self.curators.lock().unwrap_or_else(|e| e.into_inner());
            all.iter().filter_map(|w| w.upgrade()).collect()
        };
        for t in live {
            t.lock().await.clear();
        }
        Paused(gate)
    }
}

#[cfg(test)]
mod tests;
