//! Lifecycle: day partitions move to colder tiers as they age and are expired at the end.
//!
//! The planner is pure: given each day's tier, today's date and the rules, it returns the steps.
//! A day only ever moves colder on its own; a restored day is left where it was put until its
//! restore ends. The executor ([`apply`]) compacts a day before moving it, moves its directory
//! (see [`crate::tiers`]), and expires a day by removing its files from the table in one commit
//! (vacuum deletes them after the retention window).

use std::collections::BTreeMap;

use chrono::NaiveDate;
use deltalake::kernel::Action;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::protocol::DeltaOperation;
use serde::Serialize;
use tarn_core::{DatasetSpec, Lifecycle};

use crate::compact::{CompactOptions, compact_dataset, remove_action, table_files};
use crate::table::commit_actions;
use crate::tiers::{Tier, Tiers};
use crate::{Lake, Result};

/// A step of a lifecycle plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    Move { day: NaiveDate, from: Tier, to: Tier },
    Expire { day: NaiveDate },
}

/// Plans the steps for `days` (each day's current tier, and the end of its restore if it was
/// restored) at `today`.
pub fn plan(days: &BTreeMap<NaiveDate, (Tier, Option<NaiveDate>)>, today: NaiveDate, rules: &Lifecycle) -> Vec<Step> {
    let mut out = Vec::new();
    for (&day, &(tier, restored_until)) in days {
        let age = (today - day).num_days();
        let reached = |after: Option<u32>| after.is_some_and(|n| age >= i64::from(n));
        if reached(rules.expire_after_days) {
            out.push(Step::Expire { day });
            continue;
        }
        if restored_until.is_some_and(|until| today < until) {
            continue;
        }
        let target = if reached(rules.archive_after_days) {
            Tier::Archive
        } else if reached(rules.infrequent_after_days) {
            Tier::Infrequent
        } else {
            Tier::Standard
        };
        if target > tier {
            out.push(Step::Move {
                day,
                from: tier,
                to: target,
            });
        }
    }
    out
}

/// What a lifecycle run did (or would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct LifecycleReport {
    pub dataset: String,
    pub dry_run: bool,
    pub steps: Vec<Step>,
    /// Files compacted before their day moved.
    pub compacted_files: usize,
    pub files_moved: usize,
    pub files_expired: usize,
}

/// Applies a dataset's lifecycle rules at `today`.
pub async fn apply(
    lake: &Lake,
    tiers: &Tiers,
    spec: &DatasetSpec,
    today: NaiveDate,
    dry_run: bool,
) -> Result<LifecycleReport> {
    let dataset = spec.name.as_str();
    let mut report = LifecycleReport {
        dataset: dataset.to_string(),
        dry_run,
        ..LifecycleReport::default()
    };
    if spec.lifecycle == Lifecycle::default() || !lake.has_table(dataset).await? {
        return Ok(report);
    }
    let mut table = lake.open_table(dataset).await?;
    let files = table_files(&table, spec)?;
    let view = tiers.view_fresh(lake, dataset).await?;
    let mut days: BTreeMap<NaiveDate, (Tier, Option<NaiveDate>)> = BTreeMap::new();
    for f in &files {
        let Some((_, d)) = f.partition.first() else { continue };
        let Ok(day) = NaiveDate::parse_from_str(d, "%Y-%m-%d") else {
            continue;
        };
        if let std::collections::btree_map::Entry::Vacant(e) = days.entry(day) {
            e.insert((view.tier(d)?, view.restored().get(d).copied()));
        }
    }
    report.steps = plan(&days, today, &spec.lifecycle);
    if dry_run {
        return Ok(report);
    }
    for step in report.steps.clone() {
        match step {
            Step::Move { day, to, .. } => {
                let d = day.format("%Y-%m-%d").to_string();
                let opts = CompactOptions {
                    day: Some(d.clone()),
                    rules: crate::compaction::CompactionRules::for_spec(spec, 2),
                    dry_run: false,
                };
                let c = compact_dataset(lake, spec, &opts, &|_| {}).await?;
                report.compacted_files += c.files_removed;
                report.files_moved += tiers.move_day(lake, dataset, &d, to).await?;
            }
            Step::Expire { day } => {
                let d = day.format("%Y-%m-%d").to_string();
                table
                    .update_incremental(None)
                    .await
                    .map_err(crate::delta_err(dataset))?;
                let now = tarn_core::Clock::now_micros(&tarn_core::SystemClock) / 1000;
                let actions: Vec<Action> = table_files(&table, spec)?
                    .into_iter()
                    .filter(|f| f.partition.first().is_some_and(|(_, v)| *v == d))
                    .map(|f| remove_action(&f, now, true))
                    .collect();
                if actions.is_empty() {
                    continue;
                }
                report.files_expired += actions.len();
                let op = DeltaOperation::Delete {
                    predicate: Some(format!("day = '{d}'")),
                };
                commit_actions(&mut table, dataset, actions, op, CommitProperties::default()).await?;
                tiers.forget_day(lake, dataset, &d).await?;
            }
        }
    }
    // In a bucket, files that reached a colder day after it moved (late rows, a compaction)
    // are still in the standard class: move them too.
    if lake.remote().is_some() {
        let moved: std::collections::BTreeSet<NaiveDate> = report
            .steps
            .iter()
            .map(|s| match s {
                Step::Move { day, .. } | Step::Expire { day } => *day,
            })
            .collect();
        for (day, (tier, _)) in &days {
            if *tier > Tier::Standard && !moved.contains(day) {
                let d = day.format("%Y-%m-%d").to_string();
                report.files_moved += tiers.settle(lake, dataset, &d).await?;
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").expect("date")
    }

    fn rules() -> Lifecycle {
        Lifecycle {
            infrequent_after_days: Some(90),
            archive_after_days: Some(365),
            expire_after_days: Some(400),
        }
    }

    /// 400+ simulated days: every day of data is written on its day, then the planner runs
    /// each day and its steps are applied; each day's tier follows its age exactly.
    #[test]
    fn four_hundred_days_through_every_rule() {
        let start = d("2025-01-01");
        let mut days: BTreeMap<NaiveDate, (Tier, Option<NaiveDate>)> = BTreeMap::new();
        let mut expired = Vec::new();
        for n in 0..420 {
            let today = start + chrono::Duration::days(n);
            days.insert(today, (Tier::Standard, None));
            for step in plan(&days, today, &rules()) {
                match step {
                    Step::Move { day, from, to } => {
                        let e = days.get_mut(&day).expect("day");
                        assert_eq!(e.0, from);
                        assert!(to > from, "never warmer on its own");
                        e.0 = to;
                    }
                    Step::Expire { day } => {
                        days.remove(&day);
                        expired.push((day, today));
                    }
                }
            }
            for (day, (tier, _)) in &days {
                let age = (today - *day).num_days();
                let want = match age {
                    ..90 => Tier::Standard,
                    90..365 => Tier::Infrequent,
                    _ => Tier::Archive,
                };
                assert_eq!(*tier, want, "{day} at age {age} on {today}");
                assert!(age < 400);
            }
        }
        assert_eq!(expired.len(), 20);
        assert!(expired.iter().all(|(day, on)| (*on - *day).num_days() == 400));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn days_move_compacted_expire_and_come_back_on_a_real_table() {
        use crate::curate::{CurateOptions, Curator};
        use crate::testkit::{SPEC, count, files_on_disk, note_on, setup};
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, lake, catalog) = setup(dir.path());
        let cur = Curator::new(&log, lake.clone(), catalog, CurateOptions::default())
            .await
            .expect("curator");
        let days = ["2025-11-01", "2026-01-01", "2026-01-01", "2026-06-01", "2026-11-20"];
        for (i, day) in days.iter().enumerate() {
            let s = i as u64 * 2;
            cur.apply(&[note_on(&lake, s, s + 1, day)]).await.expect("apply");
        }
        assert_eq!(count(&lake).await.0, 100);
        let mut spec = DatasetSpec::from_yaml(SPEC).expect("spec");
        spec.lifecycle = Lifecycle {
            infrequent_after_days: Some(90),
            archive_after_days: Some(300),
            expire_after_days: Some(365),
        };
        let tiers = Tiers::under(&lake).expect("tiers");
        let today = d("2026-11-22");
        let dry = apply(&lake, &tiers, &spec, today, true).await.expect("dry run");
        assert_eq!(
            dry.steps,
            vec![
                Step::Expire { day: d("2025-11-01") },
                Step::Move {
                    day: d("2026-01-01"),
                    from: Tier::Standard,
                    to: Tier::Archive
                },
                Step::Move {
                    day: d("2026-06-01"),
                    from: Tier::Standard,
                    to: Tier::Infrequent
                },
            ]
        );
        assert_eq!(
            tiers.tier_of(&lake, "bids", "2026-01-01").await.expect("tier"),
            Tier::Standard
        );

        let r = apply(&lake, &tiers, &spec, today, false).await.expect("apply");
        assert_eq!(
            r.compacted_files, 4,
            "the archived day's two files per tenant were merged first"
        );
        // The merged files move along with the ones they replaced (readers of older versions
        // may still use those until vacuum): 4 + 2 of the archived day, 2 of the other.
        assert_eq!((r.files_moved, r.files_expired), (8, 2));
        assert_eq!(
            tiers.tier_of(&lake, "bids", "2026-01-01").await.expect("tier"),
            Tier::Archive
        );
        assert_eq!(
            tiers.tier_of(&lake, "bids", "2026-06-01").await.expect("tier"),
            Tier::Infrequent
        );
        assert_eq!(
            tiers.tier_of(&lake, "bids", "2026-11-20").await.expect("tier"),
            Tier::Standard
        );
        assert!(
            lake.root()
                .join("tiers/archive/bids/day=2026-01-01/client_id=acme")
                .is_dir()
        );
        // Every row is still readable through the same paths, except the expired day's.
        assert_eq!(count(&lake).await.0, 80);
        assert!(
            apply(&lake, &tiers, &spec, today, false)
                .await
                .expect("again")
                .steps
                .is_empty()
        );

        // Back to standard for a week: lifecycle leaves it there until then.
        let until = d("2026-11-29");
        assert_eq!(
            tiers
                .restore(&lake, "bids", "2026-01-01", until)
                .await
                .expect("restore"),
            6
        );
        assert_eq!(
            tiers.tier_of(&lake, "bids", "2026-01-01").await.expect("tier"),
            Tier::Standard
        );
        assert!(!lake.root().join("tiers/archive/bids/day=2026-01-01").exists());
        assert!(
            apply(&lake, &tiers, &spec, d("2026-11-28"), true)
                .await
                .expect("plan")
                .steps
                .is_empty()
        );
        let later = apply(&lake, &tiers, &spec, until, true).await.expect("plan");
        assert_eq!(later.steps.len(), 1, "{later:?}");
        assert_eq!(count(&lake).await.0, 80);

        // Vacuum, past the retention, deletes the expired day's files (and the compacted ones),
        // following the links into the tier directories for the rest.
        let now = tarn_core::Clock::now_micros(&tarn_core::SystemClock) / 1000 + 3 * 3_600_000;
        let v = crate::vacuum::vacuum_dataset(&lake, "bids", now, crate::vacuum::RETAIN_MIN, false)
            .await
            .expect("vacuum");
        assert_eq!(v.files_deleted, 6, "{v:?}");
        assert_eq!(files_on_disk(&lake.table_dir("bids")).len(), v.files_active);
        assert_eq!(count(&lake).await.0, 80);

        // A crash between a restore's swap and its cleanup leaves a hidden link to the archive;
        // once the day is archived again, vacuum must not take the files behind that link for
        // garbage, and the next move clears the leftover.
        let r = apply(&lake, &tiers, &spec, until, false).await.expect("archive again");
        assert_eq!(r.steps.len(), 1);
        let leftover = lake.table_dir("bids").join(".day=2026-01-01.restore");
        std::os::unix::fs::symlink(lake.root().join("tiers/archive/bids/day=2026-01-01"), &leftover).expect("link");
        let far = now + 30 * 24 * 3_600_000;
        let v = crate::vacuum::vacuum_dataset(&lake, "bids", far, crate::vacuum::RETAIN_MIN, false)
            .await
            .expect("vacuum");
        assert_eq!(v.files_deleted, 0, "{v:?}");
        assert_eq!(count(&lake).await.0, 80);
        tiers
            .restore(&lake, "bids", "2026-01-01", d("2026-12-31"))
            .await
            .expect("restore");
        assert!(
            std::fs::symlink_metadata(&leftover).is_err(),
            "the leftover link is gone"
        );
        assert_eq!(count(&lake).await.0, 80);
    }

    #[test]
    fn restored_days_stay_until_their_restore_ends_and_missing_rules_do_nothing() {
        let today = d("2026-11-22");
        let old = d("2025-06-01");
        let mut days = BTreeMap::new();
        days.insert(old, (Tier::Standard, Some(d("2026-11-25"))));
        let r = Lifecycle {
            archive_after_days: Some(365),
            ..Lifecycle::default()
        };
        assert!(plan(&days, today, &r).is_empty());
        assert_eq!(
            plan(&days, d("2026-11-25"), &r),
            vec![Step::Move {
                day: old,
                from: Tier::Standard,
                to: Tier::Archive
            }]
        );
        // A day skipping a tier goes straight to the colder one.
        days.insert(old, (Tier::Standard, None));
        assert_eq!(plan(&days, today, &rules()).len(), 1);
        assert!(plan(&days, today, &Lifecycle::default()).is_empty());
    }
}
