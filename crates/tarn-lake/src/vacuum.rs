//! Vacuum: deletes data files the table no longer references, once they have been
//! unreferenced for longer than the retention window.
//!
//! A file on disk that the current snapshot does not list is either a tombstone (removed by a
//! compaction or an expiry; its age counts from the removal) or an orphan (written by a commit
//! that never landed; its age counts from its modification time). Only files older than the
//! retention are deleted. The retention must exceed the longest a query may run
//! ([`RETAIN_MIN`]), so a query planned on an older version still finds every file it lists,
//! and a commit still being prepared never loses its files (they are minutes old at most).
//!
//! The planner is pure; the executor lists the disk, asks it, deletes, and reports.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;

use crate::{Error, Lake, Result, io_err};

/// The shortest retention vacuum accepts: two hours, twice the longest query timeout.
pub const RETAIN_MIN: Duration = Duration::from_secs(2 * 3600);
/// The default retention: seven days, as Delta's own default for removed files.
pub const RETAIN_DEFAULT: Duration = Duration::from_secs(7 * 24 * 3600);

/// A data file found on disk, relative to the table directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFile {
    pub path: String,
    pub bytes: u64,
    /// Modification time, ms since the epoch.
    pub modified_ms: i64,
}

/// Plans a vacuum: the files on disk that are neither active nor unreferenced for less than
/// `retain`. `removed_ms` holds the removal times the log still knows.
pub fn plan(
    on_disk: &[DiskFile],
    active: &HashSet<String>,
    removed_ms: &HashMap<String, i64>,
    now_ms: i64,
    retain: Duration,
) -> Vec<DiskFile> {
    let cutoff = now_ms.saturating_sub(i64::try_from(retain.as_millis()).unwrap_or(i64::MAX));
    on_disk
        .iter()
        .filter(|f| !active.contains(&f.path))
        .filter(|f| {
            // Unreferenced since the later of its removal and its last write.
            let since = removed_ms.get(&f.path).copied().unwrap_or(i64::MIN).max(f.modified_ms);
            since < cutoff
        })
        .cloned()
        .collect()
}

/// What a vacuum did (or would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct VacuumReport {
    pub dataset: String,
    pub dry_run: bool,
    pub files_on_disk: usize,
    pub files_active: usize,
    pub files_deleted: usize,
    pub bytes_deleted: u64,
    /// Unreferenced files kept because they are within the retention window.
    pub files_retained: usize,
}

/// Every data file under a table directory (not `_delta_log`), relative to it.
pub fn list_data_files(table_dir: &Path) -> Result<Vec<DiskFile>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<DiskFile>) -> Result<()> {
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(dir)(e)),
        };
        for e in rd {
            let e = e.map_err(io_err(dir))?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            // Hidden and `_` names are tarn's own (the log, locks, an interrupted move's
            // leftovers): never data, and never followed.
            if name.starts_with('.') || name.starts_with('_') {
                continue;
            }
            let p = e.path();
            // Followed through links: a day in a colder tier is a link to its directory. A
            // link to nothing holds nothing.
            let meta = match std::fs::metadata(&p) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&p)(e)),
            };
            if meta.is_dir() {
                walk(root, &p, out)?;
            } else if p.extension().is_some_and(|x| x == "parquet") {
                let modified_ms = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as i64);
                let rel = p
                    .strip_prefix(root)
                    .map_err(|_| Error::Internal("path outside the table".into()))?;
                out.push(DiskFile {
                    path: rel.to_string_lossy().into_owned(),
                    bytes: meta.len(),
                    modified_ms,
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(table_dir, table_dir, &mut out)?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Vacuums one dataset's table at `now_ms`.
pub async fn vacuum_dataset(
    lake: &Lake,
    dataset: &str,
    now_ms: i64,
    retain: Duration,
    dry_run: bool,
) -> Result<VacuumReport> {
    if retain < RETAIN_MIN {
        return Err(Error::Refused(format!(
            "a vacuum retention of {} s is shorter than the minimum of {} s (queries may run for up to an hour)",
            retain.as_secs(),
            RETAIN_MIN.as_secs()
        )));
    }
    let mut report = VacuumReport {
        dataset: dataset.to_string(),
        dry_run,
        ..VacuumReport::default()
    };
    if !lake.has_table(dataset).await? {
        return Ok(report);
    }
    let table = lake.open_table(dataset).await?;
    let delta_err = crate::delta_err(dataset);
    let snap = table.snapshot().map_err(delta_err)?;
    let active: HashSet<String> = snap.log_data().iter().map(|f| f.path().into_owned()).collect();
    let mut removed_ms = HashMap::new();
    let log_store = table.log_store();
    let mut tombstones = snap.all_tombstones(log_store.as_ref());
    while let Some(t) = tombstones.next().await {
        let t = t.map_err(delta_err)?;
        if let Some(ts) = t.deletion_timestamp() {
            removed_ms.insert(t.path().into_owned(), ts);
        }
    }
    // Listed after the snapshot was read: a file committed in between is newer than any
    // cutoff, so it is never taken for garbage.
    let on_disk = lake.data_files(dataset).await?;
    let doomed = plan(&on_disk, &active, &removed_ms, now_ms, retain);
    report.files_on_disk = on_disk.len();
    report.files_active = on_disk.iter().filter(|f| active.contains(&f.path)).count();
    report.files_retained = on_disk.len() - report.files_active - doomed.len();
    report.files_deleted = doomed.len();
    report.bytes_deleted = doomed.iter().map(|f| f.bytes).sum();
    if !dry_run {
        lake.delete_data_files(dataset, doomed.into_iter().map(|f| f.path).collect())
            .await?;
    }
    Ok(report)
}

/// Deletes files of a table directory (paths relative to it), and the partition
/// directories they leave empty. A file already gone is no error.
pub(crate) fn delete_local_files(dir: &Path, paths: &[String]) -> Result<()> {
    for rel in paths {
        let p = dir.join(rel);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&p)(e)),
        }
        let mut d = p.parent();
        while let Some(parent) = d.filter(|x| *x != dir) {
            if std::fs::remove_dir(parent).is_err() {
                break;
            }
            d = parent.parent();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(path: &str, modified_ms: i64) -> DiskFile {
        DiskFile {
            path: path.into(),
            bytes: 10,
            modified_ms,
        }
    }

    const HOUR: i64 = 3_600_000;

    #[test]
    fn only_old_unreferenced_files_go() {
        let retain = Duration::from_secs(2 * 3600);
        let now = 100 * HOUR;
        let disk = vec![
            f("active-old", 0),
            f("removed-long-ago", 0),
            f("removed-just-now", 0),
            f("orphan-old", 0),
            f("orphan-new", now - HOUR),
            // Written long ago, rewritten (same name) by a retried commit a minute ago.
            f("rewritten", now - 60_000),
        ];
        let active: HashSet<String> = ["active-old".to_string()].into();
        let removed: HashMap<String, i64> = [
            ("removed-long-ago".to_string(), now - 3 * HOUR),
            ("removed-just-now".to_string(), now - HOUR),
            ("rewritten".to_string(), now - 5 * HOUR),
        ]
        .into();
        let got: Vec<String> = plan(&disk, &active, &removed, now, retain)
            .into_iter()
            .map(|f| f.path)
            .collect();
        assert_eq!(got, vec!["removed-long-ago", "orphan-old"]);
    }

    #[test]
    fn the_boundary_is_exclusive_and_active_files_never_go() {
        let retain = Duration::from_secs(7200);
        let now = 10 * HOUR;
        let disk = vec![f("a", now - 2 * HOUR), f("b", now - 2 * HOUR - 1), f("c", 0)];
        let active: HashSet<String> = ["c".to_string()].into();
        let got: Vec<String> = plan(&disk, &active, &HashMap::new(), now, retain)
            .into_iter()
            .map(|f| f.path)
            .collect();
        assert_eq!(got, vec!["b"]);
    }
}
