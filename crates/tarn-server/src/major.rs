//! A new major version of a dataset. The current table is kept, read-only and queryable, as
//! the system dataset `<name>__v<N>` (its days in colder tiers move with it), and the new
//! contract starts a fresh table under the dataset's name. Rows still in flight that were
//! written under the old contract reach the kept table (curate routes by the major version a
//! batch carries).
//!
//! Crash safety: an intent (a document of the metadata store: with files
//! `<data>/catalog/majors/<name>.json`, synced) is written first; every later step is
//! idempotent, and `recover` finishes an interrupted change at start, before curate runs.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tarn_catalog::{Applied, Catalog, Kind};
use tarn_core::DatasetSpec;
use tarn_lake::Lake;
use tarn_lake::tiers::Tiers;

#[derive(Serialize, Deserialize)]
struct Intent {
    from: DatasetSpec,
    to: DatasetSpec,
}

/// What keeps writers off the table while it moves.
#[derive(Clone, Copy, Default)]
pub struct Running<'a> {
    pub curate: Option<&'a tarn_lake::CuratePause>,
    pub query: Option<&'a tarn_query::QueryEngine>,
}

/// Starts major version `to.major` of a dataset whose contract in force is one major
/// version lower.
pub async fn start(
    catalog: &Catalog,
    lake: &Lake,
    tiers: &Tiers,
    to: DatasetSpec,
    running: Running<'_>,
) -> Result<Applied> {
    let Some(from) = catalog.get(&to.name) else {
        bail!("{} does not exist; a new dataset starts at any major version", to.name);
    };
    if to.major != from.major + 1 {
        bail!("{}: major {} does not follow {}", to.name, to.major, from.major);
    }
    tarn_core::evolution::check(&from, &to).map_err(|r| anyhow::anyhow!("{}: {r}", to.name))?;
    DatasetSpec::frozen_of(&from)?;
    let intent = Intent {
        from: (*from).clone(),
        to,
    };
    let name = intent.to.name.clone();
    catalog
        .meta()
        .put(&[(Kind::MajorIntent, &name, &serde_json::to_vec_pretty(&intent)?)])?;
    let frozen = DatasetSpec::frozen_name(&intent.to.name, intent.from.major);
    let res = finish(intent, catalog, lake, tiers, running).await;
    if res.is_err() && !lake.table_exists(&frozen) {
        // Failed before the table moved: nothing happened, so nothing is left to finish.
        let _ = catalog.meta().delete(Kind::MajorIntent, &name);
    }
    res
}

/// Finishes major-version changes a crash interrupted. Runs at start, before curate.
pub async fn recover(catalog: &Catalog, lake: &Lake, tiers: &Tiers) -> Result<()> {
    for (name, body) in catalog.meta().list(Kind::MajorIntent, "")? {
        let intent: Intent = serde_json::from_slice(&body)
            .with_context(|| format!("the major-version intent of {name} is not valid"))?;
        tracing::warn!(dataset = %intent.to.name, major = intent.to.major, "finishing an interrupted new major version");
        finish(intent, catalog, lake, tiers, Running::default()).await?;
    }
    Ok(())
}

async fn finish(
    intent: Intent,
    catalog: &Catalog,
    lake: &Lake,
    tiers: &Tiers,
    running: Running<'_>,
) -> Result<Applied> {
    let name = intent.to.name.clone();
    let frozen = DatasetSpec::frozen_of(&intent.from)?;
    // Done before a crash that came before the intent was removed: the table under the
    // dataset's name is the new major's own.
    if catalog.get(&name).is_some_and(|s| s.major == intent.to.major) && catalog.get(&frozen.name).is_some() {
        catalog.meta().delete(Kind::MajorIntent, &name)?;
        return catalog
            .evolve_major(intent.to)
            .with_context(|| format!("applying major version of {name}"));
    }
    // Curate first (a round in progress ends), then a running compaction (its lock is held
    // for the whole run), then every other writer of the table (tier moves, commits).
    let _paused = match running.curate {
        Some(p) => Some(p.pause().await),
        None => None,
    };
    let lock_path = lake.table_dir(&name).join(tarn_lake::compact::LOCK_FILE);
    let compaction_lock = if lake.table_exists(&name) {
        let p = lock_path.clone();
        Some(
            tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&p)?;
                f.lock()?;
                Ok(f)
            })
            .await?
            .with_context(|| format!("locking {}", lock_path.display()))?,
        )
    } else {
        None
    };
    let _moving = lake.moving(&name).await;
    let _moving_frozen = lake.moving(&frozen.name).await;
    {
        let (lake, tiers, from, to) = (lake.clone(), tiers.clone(), name.clone(), frozen.name.clone());
        tokio::task::spawn_blocking(move || tiers.rename_table(&lake, &from, &to).map_err(anyhow::Error::from))
            .await?
            .with_context(|| format!("keeping the table of {name} as {}", frozen.name))?;
    }
    drop(compaction_lock);
    catalog
        .register(frozen.clone())
        .with_context(|| format!("registering {}", frozen.name))?;
    let applied = catalog
        .evolve_major(intent.to)
        .with_context(|| format!("applying major version of {name}"))?;
    if let Some(q) = running.query {
        q.forget(&name).await;
    }
    catalog.meta().delete(Kind::MajorIntent, &name)?;
    tracing::info!(dataset = %name, kept_as = %frozen.name, "new major version started");
    Ok(applied)
}
