//! The storage and cost report: per dataset, what its table holds per tier (partition range,
//! bytes, files, mean file size), what waits for vacuum, what the raw zone keeps, and a monthly
//! cost estimate from configurable prices.

use serde::Serialize;

use std::collections::BTreeMap;

use crate::compact::table_files;
use crate::tiers::{Tier, Tiers};
use crate::{Lake, Result};

/// Bytes in a priced gigabyte (cloud storage prices count GiB).
pub const GB: f64 = (1u64 << 30) as f64;
/// Bytes in a priced terabyte of scanned data.
pub const TB: f64 = (1u64 << 40) as f64;

/// Prices, in dollars. Defaults: S3 Standard and Standard-IA as the reference architecture
/// priced them, Glacier Flexible Retrieval for the archive, and $5 per TB scanned as a lake
/// query engine charges.
#[derive(Debug, Clone, Serialize)]
pub struct Prices {
    pub standard_gb_month: f64,
    pub infrequent_gb_month: f64,
    pub infrequent_retrieval_gb: f64,
    pub archive_gb_month: f64,
    pub scan_tb: f64,
}

impl Default for Prices {
    fn default() -> Self {
        Self {
            standard_gb_month: 0.023,
            infrequent_gb_month: 0.0125,
            infrequent_retrieval_gb: 0.01,
            archive_gb_month: 0.004,
            scan_tb: 5.0,
        }
    }
}

impl Prices {
    /// The monthly price of a GB in a tier.
    pub fn gb_month(&self, tier: &str) -> f64 {
        match tier {
            "infrequent" => self.infrequent_gb_month,
            "archive" => self.archive_gb_month,
            _ => self.standard_gb_month,
        }
    }
}

/// One tier of one dataset's table.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TierUsage {
    pub tier: String,
    pub first_day: String,
    pub last_day: String,
    pub partitions: usize,
    pub files: usize,
    pub bytes: u64,
    pub mean_file_bytes: u64,
    pub monthly_cost: f64,
}

/// One dataset's storage.
#[derive(Debug, Clone, Serialize)]
pub struct DatasetStorage {
    pub dataset: String,
    pub tiers: Vec<TierUsage>,
    /// Files on disk the table no longer lists (waiting for vacuum).
    pub unreferenced_files: usize,
    pub unreferenced_bytes: u64,
    /// The raw zone's batch objects of this dataset.
    pub raw_files: usize,
    pub raw_bytes: u64,
    /// Storage of the table, the unreferenced files and the raw zone, per month.
    pub monthly_storage_cost: f64,
}

/// The storage of one dataset, per tier (every day is `standard` without `tiers`).
pub async fn dataset_storage(
    lake: &Lake,
    spec: &tarn_core::DatasetSpec,
    prices: &Prices,
    tiers: Option<&Tiers>,
) -> Result<DatasetStorage> {
    let dataset = spec.name.as_str();
    let files = if lake.has_table(dataset).await? {
        let table = lake.open_table(dataset).await?;
        table_files(&table, spec)?
    } else {
        Vec::new()
    };
    let view = match tiers {
        Some(t) => Some(t.view(lake, dataset).await?),
        None => None,
    };
    let mut day_tier: BTreeMap<String, Tier> = BTreeMap::new();
    let mut by_tier: BTreeMap<Tier, Vec<&crate::compaction::FileInfo>> = BTreeMap::new();
    for f in &files {
        let day = f.partition.first().map(|(_, v)| v.clone()).unwrap_or_default();
        let tier = match day_tier.get(&day) {
            Some(t) => *t,
            None => {
                let t = match &view {
                    Some(v) => v.tier(&day)?,
                    None => Tier::Standard,
                };
                day_tier.insert(day, t);
                t
            }
        };
        by_tier.entry(tier).or_default().push(f);
    }
    let mut tiers_out = Vec::new();
    for (tier, files) in by_tier {
        let mut days: Vec<&str> = files
            .iter()
            .filter_map(|f| f.partition.first().map(|(_, v)| v.as_str()))
            .collect();
        days.sort_unstable();
        let mut partitions: Vec<&crate::compaction::Partition> = files.iter().map(|f| &f.partition).collect();
        partitions.sort();
        partitions.dedup();
        let bytes: u64 = files.iter().map(|f| f.size_bytes).sum();
        tiers_out.push(TierUsage {
            tier: tier.as_str().to_string(),
            first_day: days.first().map(|d| d.to_string()).unwrap_or_default(),
            last_day: days.last().map(|d| d.to_string()).unwrap_or_default(),
            partitions: partitions.len(),
            files: files.len(),
            bytes,
            mean_file_bytes: bytes / files.len().max(1) as u64,
            monthly_cost: bytes as f64 / GB * prices.gb_month(tier.as_str()),
        });
    }
    let tiers = tiers_out;
    let active: std::collections::HashSet<String> = files.iter().map(|f| f.path.clone()).collect();
    let unref: Vec<u64> = lake
        .data_files(dataset)
        .await?
        .iter()
        .filter(|f| !active.contains(&f.path))
        .map(|f| f.bytes)
        .collect();
    let raw = lake.raw_usage(dataset).await?;
    let unreferenced_bytes: u64 = unref.iter().sum();
    let monthly_storage_cost = tiers.iter().map(|t| t.monthly_cost).sum::<f64>()
        + (unreferenced_bytes + raw.1) as f64 / GB * prices.standard_gb_month;
    Ok(DatasetStorage {
        dataset: dataset.to_string(),
        tiers,
        unreferenced_files: unref.len(),
        unreferenced_bytes,
        raw_files: raw.0,
        raw_bytes: raw.1,
        monthly_storage_cost,
    })
}

/// (files, bytes) under a directory; an absent directory holds nothing.
pub(crate) fn dir_usage(dir: &std::path::Path) -> (usize, u64) {
    let mut files = 0;
    let mut bytes = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                let (f, b) = dir_usage(&e.path());
                files += f;
                bytes += b;
            } else {
                files += 1;
                bytes += meta.len();
            }
        }
    }
    (files, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curate::{CurateOptions, Curator};
    use crate::testkit::{SPEC, curate_commits, setup};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_tiers_unreferenced_files_raw_and_cost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, lake, catalog) = setup(dir.path());
        let spec = tarn_core::DatasetSpec::from_yaml(SPEC).expect("spec");
        let prices = Prices::default();
        let empty = dataset_storage(&lake, &spec, &prices, None).await.expect("empty");
        assert!(empty.tiers.is_empty() && empty.monthly_storage_cost == 0.0);

        let cur = Curator::new(&log, lake.clone(), catalog, CurateOptions::default())
            .await
            .expect("curator");
        curate_commits(&cur, &lake, 3).await;
        let r = dataset_storage(&lake, &spec, &prices, None).await.expect("report");
        let t = &r.tiers[0];
        assert_eq!((t.tier.as_str(), t.partitions, t.files), ("standard", 2, 6));
        assert_eq!(
            (t.first_day.as_str(), t.last_day.as_str()),
            ("2026-11-22", "2026-11-22")
        );
        assert_eq!(t.mean_file_bytes, t.bytes / 6);
        assert!((t.monthly_cost - t.bytes as f64 / GB * 0.023).abs() < 1e-15);
        assert_eq!((r.unreferenced_files, r.raw_files), (0, 3));
        crate::compact::compact_dataset(&lake, &spec, &Default::default(), &|_| {})
            .await
            .expect("compact");
        let r = dataset_storage(&lake, &spec, &prices, None).await.expect("report");
        assert_eq!((r.tiers[0].files, r.unreferenced_files), (2, 6));
        let want = (r.tiers[0].bytes as f64 * 0.023 + (r.unreferenced_bytes + r.raw_bytes) as f64 * 0.023) / GB;
        assert!((r.monthly_storage_cost - want).abs() < 1e-12);
    }
}
