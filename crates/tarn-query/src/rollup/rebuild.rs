//! `tarn rollup rebuild`: recomputes a rollup's buckets for a range of days from the curated
//! table, one day at a time.
//!
//! For each day the live subscriber is paused (it waits on the apply lock), curate is allowed
//! to catch up with what the rollup has applied, and the day is read from one snapshot of the
//! table. The rows of that snapshot replace the day's buckets, and the sequences curated into
//! it (per shard) are recorded as a rebuilt range, so that the subscriber, which may not have
//! applied all of them yet, skips exactly those rows of that day when it gets to them. The
//! pause lasts one day's scan; the rollup then catches up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deltalake::datafusion::prelude::SessionContext;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tarn_core::Grain;
use tarn_lake::Lake;
use tarn_lake::table::{app_version, curate_app_id};

use super::cube::{Cube, Def};
use super::store::{Rebuilt, chunk_of};
use super::{Rollups, lock_err};
use crate::{Error, Result};

/// How long a rebuild waits for curate to reach what the rollup has applied.
const CURATE_WAIT_MAX: Duration = Duration::from_secs(120);
/// Most days one rebuild covers.
pub const REBUILD_DAYS_MAX: i64 = 3_660;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RebuildProgress {
    pub day: String,
    pub days_done: usize,
    pub days_total: usize,
    pub rows: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RebuildReport {
    pub rollup: String,
    pub from: String,
    pub to: String,
    pub days: usize,
    pub rows: u64,
    pub took_ms: u64,
}

fn day_secs(day: &str) -> Result<i64> {
    let d = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d")
        .map_err(|_| Error::BadQuery(format!("{day:?} is not a day (YYYY-MM-DD)")))?;
    Ok(d.and_hms_opt(0, 0, 0).map(|t| t.and_utc().timestamp()).unwrap_or(0))
}

impl Rollups {
    /// Rebuilds the days `from` to `to` (inclusive) of rollup `name` from its dataset's table.
    pub async fn rebuild(
        &self,
        name: &str,
        from: &str,
        to: &str,
        lake: &Lake,
        progress: &mut (dyn FnMut(RebuildProgress) + Send),
    ) -> Result<RebuildReport> {
        let started = Instant::now();
        let l = self.get(name)?;
        let (first, last) = (day_secs(from)?, day_secs(to)?);
        if last < first {
            return Err(Error::BadQuery(format!("--to {to} comes before --from {from}")));
        }
        let days_total = ((last - first) / 86_400 + 1) as usize;
        if days_total as i64 > REBUILD_DAYS_MAX {
            return Err(Error::BadQuery(format!(
                "{days_total} days; a rebuild covers at most {REBUILD_DAYS_MAX}"
            )));
        }
        let cutoff = self.cutoff(&l.def);
        let has_table = lake
            .has_table(&l.def.dataset)
            .await
            .map_err(|e| Error::Internal(format!("looking for the table of {}: {e}", l.def.dataset)))?;
        let mut rows = 0u64;
        let mut done = 0usize;
        let mut day = first;
        while day <= last {
            let text = tarn_core::contract::day_of_micros(day * 1_000_000);
            if day >= cutoff && has_table {
                rows += self.rebuild_day(&l, day, lake).await?;
            }
            done += 1;
            progress(RebuildProgress {
                day: text,
                days_done: done,
                days_total,
                rows,
            });
            day += 86_400;
        }
        {
            let _apply = self.inner.apply.lock().await;
            self.checkpoint_all().await?;
        }
        Ok(RebuildReport {
            rollup: name.to_string(),
            from: from.to_string(),
            to: to.to_string(),
            days: done,
            rows,
            took_ms: started.elapsed().as_millis() as u64,
        })
    }

    async fn rebuild_day(&self, l: &Arc<super::Live>, day: i64, lake: &Lake) -> Result<u64> {
        let def = &l.def;
        let _apply = self.inner.apply.lock().await;
        // The subscriber reloads every rollup after a failed round: work on a dropped copy
        // would be lost.
        if !Arc::ptr_eq(&self.get(&def.spec.name)?, l) {
            return Err(Error::Unavailable(format!(
                "rollup {:?} was reloaded during the rebuild; run the rebuild again",
                def.spec.name
            )));
        }
        let applied = l.state.read().map_err(lock_err)?.manifest.applied.clone();
        // Every shard the table may hold rows of: those the rollup applied, and every shard a
        // stream may have (a shard whose rows curate committed before the rollup applied any
        // of them must be fenced too, or the subscriber would count them again).
        let mut shards: Vec<u32> = applied.keys().copied().collect();
        shards.extend(0..tarn_core::SizeClass::L.shards());
        shards.sort_unstable();
        shards.dedup();
        // Curate must hold at least what the rollup applied, or the rebuilt day would miss
        // rows the subscriber will never apply again.
        let waited = Instant::now();
        let (table, through) = loop {
            let table = lake
                .open_table(&def.dataset)
                .await
                .map_err(|e| Error::Internal(e.to_string()))?;
            let mut through = std::collections::BTreeMap::new();
            let mut behind = None;
            for s in &shards {
                let v = app_version(&table, &def.dataset, &curate_app_id(&def.dataset, *s))
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))?;
                if applied
                    .get(s)
                    .is_some_and(|a| v < i64::try_from(*a).unwrap_or(i64::MAX))
                {
                    behind = Some((*s, v));
                }
                // A shard without a commit has no rows in the table: nothing of it is fenced.
                if let Ok(v) = u64::try_from(v) {
                    through.insert(*s, v);
                }
            }
            match behind {
                None => break (table, through),
                Some((s, v)) if waited.elapsed() > CURATE_WAIT_MAX => {
                    return Err(Error::Unavailable(format!(
                        "curate of {} shard {s} is at sequence {v}, behind the rollup; it did not catch up within {}s",
                        def.dataset,
                        CURATE_WAIT_MAX.as_secs()
                    )));
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let text = tarn_core::contract::day_of_micros(day * 1_000_000);
        let fresh = scan_day(def, table, &text).await?;
        let rows = fresh.1;
        let mut st = l.state.write().map_err(lock_err)?;
        for g in &def.spec.grains {
            let (from, to) = match g {
                Grain::Day => (day, day + 1),
                _ => (day, day + 86_400),
            };
            st.cube.clear_range(*g, from, to);
            let mut b = from;
            while b < to {
                st.dirty.insert((*g, chunk_of(*g, b)));
                b += g.seconds().max(3_600);
            }
        }
        st.cube.absorb(fresh.0);
        st.manifest.rebuilt.push(Rebuilt {
            from_secs: day,
            to_secs: day + 86_400,
            through,
        });
        let applied_now = st.manifest.applied.clone();
        st.manifest
            .rebuilt
            .retain(|r| r.through.iter().any(|(s, t)| applied_now.get(s).is_none_or(|a| a < t)));
        st.manifest_changed = true;
        Ok(rows)
    }
}

/// Reads one day of the table and folds it into a cube.
async fn scan_day(def: &Def, table: deltalake::DeltaTable, day: &str) -> Result<(Cube, u64)> {
    let ctx = SessionContext::new();
    let provider = crate::delta_provider(&table, &ctx).await?;
    ctx.register_table("t", provider)
        .map_err(|e| Error::Internal(e.to_string()))?;
    let mut cols: Vec<String> = vec![def.time.clone(), def.tenant.clone()];
    cols.extend(def.dims.iter().map(|(d, _)| d.clone()));
    cols.extend(def.spec.metrics.iter().filter_map(|m| m.field.clone()));
    cols.sort();
    cols.dedup();
    let list: Vec<String> = cols.iter().map(|c| format!("\"{c}\"")).collect();
    // Day values are checked dates and the column names checked field names: nothing here
    // comes from unchecked input.
    let sql = format!("SELECT {} FROM t WHERE day = '{day}'", list.join(", "));
    let df = ctx.sql(&sql).await.map_err(|e| Error::Internal(e.to_string()))?;
    let mut stream = df.execute_stream().await.map_err(|e| Error::Internal(e.to_string()))?;
    let mut cube = Cube::default();
    let mut rows = 0u64;
    let def = Arc::new(def.clone());
    while let Some(b) = stream.next().await {
        let b = b.map_err(|e| Error::Internal(e.to_string()))?;
        let d = def.clone();
        let (c, folded) = tokio::task::spawn_blocking(move || {
            let r = cube.fold(&d, &b, i64::MIN, &|_| true);
            (cube, r)
        })
        .await
        .map_err(|e| Error::Internal(format!("rollup task: {e}")))?;
        cube = c;
        rows += folded.map_err(Error::Internal)?.0;
    }
    Ok((cube, rows))
}
