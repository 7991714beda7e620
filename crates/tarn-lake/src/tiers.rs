//! Storage tiers on a local disk. A tier is a directory (which may sit on another volume): a
//! day partition in the `infrequent` or `archive` tier lives in
//! `<tier dir>/<dataset>/day=<day>/`, and the table's own `day=<day>` entry is a symbolic link
//! to it, so the Delta log and every reader's paths stay the same. The standard tier is the
//! table directory itself.
//!
//! Moving a day copies its files to the new place, syncs them, then swaps the table's entry in
//! one atomic exchange (`renameat2(RENAME_EXCHANGE)` on Linux): a reader sees the old place or
//! the new one, never neither; files a reader holds open stay readable. Curate and compaction
//! hold the dataset's write lock ([`Lake::writing`]) while they write files, and a move holds it
//! exclusively, so no file lands in a directory while it is being moved.
//!
//! The archive is not read by queries (as an archive storage class cannot be): a query whose
//! scan would touch an archived day fails with the days and the command that restores them.
//! `tarn restore` brings a day back to the standard tier for a number of days, during which
//! lifecycle leaves it there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::store::Remote;
use crate::{Error, Lake, Result, io_err, sync_path};

mod classes;

use classes::{Classes, Recorded, TieredDay};
pub use classes::{DEFAULT_ARCHIVE_CLASS, DEFAULT_INFREQUENT_CLASS};

/// A storage tier, from warmest to coldest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Standard,
    Infrequent,
    Archive,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Standard => "standard",
            Tier::Infrequent => "infrequent",
            Tier::Archive => "archive",
        }
    }

    pub fn from_name(s: &str) -> Option<Tier> {
        match s {
            "standard" => Some(Tier::Standard),
            "infrequent" => Some(Tier::Infrequent),
            "archive" => Some(Tier::Archive),
            _ => None,
        }
    }
}

/// The file recording restored days of a table: day -> last day of the restore.
const RESTORED_FILE: &str = "_tarn_restored.json";

/// Where the colder tiers live: directories on a local disk, or storage classes in a bucket.
#[derive(Debug, Clone)]
pub struct Tiers {
    place: Place,
}

#[derive(Debug, Clone)]
enum Place {
    Dirs { infrequent: PathBuf, archive: PathBuf },
    Classes(Arc<Classes>),
}

/// The tiers of one dataset's days, as read at one moment.
#[derive(Debug, Clone)]
pub struct TierView {
    days: ViewDays,
}

#[derive(Debug, Clone)]
enum ViewDays {
    /// A day's tier is where the table's `day=` entry links to.
    Links {
        table_dir: PathBuf,
        infrequent: PathBuf,
        archive: PathBuf,
        restored: HashMap<String, NaiveDate>,
    },
    Recorded(Arc<Recorded>),
}

impl TierView {
    /// The tier a day is in.
    pub fn tier(&self, day: &str) -> Result<Tier> {
        match &self.days {
            ViewDays::Recorded(r) => Ok(r.days.get(day).map_or(Tier::Standard, |d| d.tier)),
            ViewDays::Links {
                table_dir,
                infrequent,
                archive,
                ..
            } => {
                let entry = table_dir.join(format!("day={day}"));
                match std::fs::read_link(&entry) {
                    Ok(target) if target.starts_with(archive) => Ok(Tier::Archive),
                    Ok(target) if target.starts_with(infrequent) => Ok(Tier::Infrequent),
                    Ok(target) => Err(Error::Corrupt {
                        what: entry.display().to_string(),
                        reason: format!("links to {}, which is no tier directory", target.display()),
                    }),
                    Err(_) => Ok(Tier::Standard),
                }
            }
        }
    }

    /// Restored days and the last day of each restore.
    pub fn restored(&self) -> &HashMap<String, NaiveDate> {
        match &self.days {
            ViewDays::Links { restored, .. } => restored,
            ViewDays::Recorded(r) => &r.restored,
        }
    }
}

impl Tiers {
    /// Tier directories; created if missing.
    pub fn new(infrequent: impl AsRef<Path>, archive: impl AsRef<Path>) -> Result<Self> {
        let mut dirs = Vec::new();
        for d in [infrequent.as_ref(), archive.as_ref()] {
            std::fs::create_dir_all(d).map_err(io_err(d))?;
            dirs.push(d.canonicalize().map_err(io_err(d))?);
        }
        let archive = dirs.pop().unwrap_or_default();
        let infrequent = dirs.pop().unwrap_or_default();
        if infrequent == archive || infrequent.starts_with(&archive) || archive.starts_with(&infrequent) {
            return Err(Error::Refused(format!(
                "the infrequent ({}) and archive ({}) tier directories must be apart",
                infrequent.display(),
                archive.display()
            )));
        }
        Ok(Self {
            place: Place::Dirs { infrequent, archive },
        })
    }

    /// Tiers of a lake in a bucket: the storage class of each colder tier. Refuses a class
    /// whose objects cannot be read without a restore.
    pub fn classes(infrequent: &str, archive: &str) -> Result<Self> {
        Ok(Self {
            place: Place::Classes(Arc::new(Classes::new(infrequent, archive)?)),
        })
    }

    /// The default tiers of a lake: directories under its root, or the default storage
    /// classes for a lake in a bucket.
    pub fn under(lake: &Lake) -> Result<Self> {
        if lake.remote().is_some() {
            return Self::classes(classes::DEFAULT_INFREQUENT_CLASS, classes::DEFAULT_ARCHIVE_CLASS);
        }
        Self::new(lake.root().join("tiers/infrequent"), lake.root().join("tiers/archive"))
    }

    fn dir(&self, tier: Tier) -> Option<&Path> {
        match (&self.place, tier) {
            (Place::Dirs { infrequent, .. }, Tier::Infrequent) => Some(infrequent),
            (Place::Dirs { archive, .. }, Tier::Archive) => Some(archive),
            _ => None,
        }
    }

    /// The bucket and its classes, when the tiers are storage classes; refused when the
    /// tiers and the lake disagree.
    fn bucket<'a>(&'a self, lake: &'a Lake) -> Result<Option<(&'a Remote, &'a Classes)>> {
        match (&self.place, lake.remote()) {
            (Place::Classes(c), Some(r)) => Ok(Some((r, c))),
            (Place::Dirs { .. }, None) => Ok(None),
            (Place::Classes(_), None) => Err(Error::Refused(format!(
                "the lake at {} is on a local disk: its tiers are directories, not storage classes",
                lake.describe()
            ))),
            (Place::Dirs { .. }, Some(r)) => Err(Error::Refused(format!(
                "the lake at {} is in a bucket: its tiers are storage classes, not directories",
                r.location.url()
            ))),
        }
    }

    /// The tiers of a dataset's days. In a bucket the record may be a few seconds old (a move
    /// by another process is seen within that); [`Tiers::view_fresh`] reads it again.
    pub async fn view(&self, lake: &Lake, dataset: &str) -> Result<TierView> {
        self.view_of(lake, dataset, false).await
    }

    /// Like [`Tiers::view`], always read again.
    pub async fn view_fresh(&self, lake: &Lake, dataset: &str) -> Result<TierView> {
        self.view_of(lake, dataset, true).await
    }

    async fn view_of(&self, lake: &Lake, dataset: &str, fresh: bool) -> Result<TierView> {
        if let Some((r, c)) = self.bucket(lake)? {
            let rec = c.recorded(r, dataset, fresh).await?;
            return Ok(TierView {
                days: ViewDays::Recorded(rec),
            });
        }
        let Place::Dirs { infrequent, archive } = &self.place else {
            return Err(Error::Internal("tiers without a place".into()));
        };
        Ok(TierView {
            days: ViewDays::Links {
                table_dir: lake.table_dir(dataset),
                infrequent: infrequent.clone(),
                archive: archive.clone(),
                restored: self.restored_local(lake, dataset)?,
            },
        })
    }

    /// The tier a day of a dataset is in (read again).
    pub async fn tier_of(&self, lake: &Lake, dataset: &str, day: &str) -> Result<Tier> {
        self.view_fresh(lake, dataset).await?.tier(day)
    }

    fn restored_local(&self, lake: &Lake, dataset: &str) -> Result<HashMap<String, NaiveDate>> {
        let path = lake.table_dir(dataset).join(RESTORED_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::Corrupt {
                what: path.display().to_string(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashMap::new()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Brings a day back to the standard tier until `until`; lifecycle leaves it there until
    /// then. Returns the files moved.
    pub async fn restore(&self, lake: &Lake, dataset: &str, day: &str, until: NaiveDate) -> Result<usize> {
        if NaiveDate::parse_from_str(day, "%Y-%m-%d").is_err() {
            return Err(Error::Refused(format!("{day:?} is not a day (YYYY-MM-DD)")));
        }
        // Recorded first: a crash during the move then leaves a day that lifecycle will not
        // send back before the restore ends, and the restore can simply be run again.
        if let Some((r, c)) = self.bucket(lake)? {
            c.update(r, dataset, |rec| {
                rec.restored.insert(day.to_string(), until);
                Ok(())
            })
            .await?;
            return self.move_day(lake, dataset, day, Tier::Standard).await;
        }
        let mut restored = self.restored_local(lake, dataset)?;
        restored.insert(day.to_string(), until);
        let path = lake.table_dir(dataset).join(RESTORED_FILE);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&restored).map_err(|e| Error::Internal(e.to_string()))?;
        std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
        sync_path(&tmp)?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_path(&lake.table_dir(dataset))?;
        self.move_day(lake, dataset, day, Tier::Standard).await
    }

    /// Moves a day of a dataset to `to`; returns the files moved (0 when it is there already or
    /// the day has no files).
    ///
    /// On a local disk the files are copied once without the lock, then, under the dataset's
    /// exclusive lock, whatever arrived since is copied and the entry swapped, so appends wait
    /// only for the last step. In a bucket each file is written again in the tier's class and
    /// then the day's tier is recorded; a day already there has its newer files (written in
    /// the standard class since) moved too.
    pub async fn move_day(&self, lake: &Lake, dataset: &str, day: &str, to: Tier) -> Result<usize> {
        if NaiveDate::parse_from_str(day, "%Y-%m-%d").is_err() {
            return Err(Error::Refused(format!("{day:?} is not a day (YYYY-MM-DD)")));
        }
        if let Some((r, c)) = self.bucket(lake)? {
            return move_in_bucket(lake, r, c, dataset, day, Some(to)).await;
        }
        if self.tier_of(lake, dataset, day).await? == to {
            return Ok(0);
        }
        let table_dir = lake.table_dir(dataset);
        let dest = self.dir(to).map(|d| d.join(dataset).join(format!("day={day}")));
        let (dir, d, dst) = (table_dir.clone(), day.to_string(), dest.clone());
        tokio::task::spawn_blocking(move || prepare_move(&dir, &d, dst.as_deref()))
            .await
            .map_err(|e| Error::Internal(format!("move task: {e}")))??;
        let _exclusive = lake.moving(dataset).await;
        // Checked again under the lock: another move may have come first.
        if self.tier_of(lake, dataset, day).await? == to {
            return Ok(0);
        }
        let day = day.to_string();
        tokio::task::spawn_blocking(move || finish_move(&table_dir, &day, dest))
            .await
            .map_err(|e| Error::Internal(format!("move task: {e}")))?
    }

    /// In a bucket: moves the files of a colder day that were written after its move (late
    /// events, a compaction) to its class. Returns the files moved; 0 on a local disk, where a
    /// day's new files land in its tier's directory already.
    pub async fn settle(&self, lake: &Lake, dataset: &str, day: &str) -> Result<usize> {
        let Some((r, c)) = self.bucket(lake)? else {
            return Ok(0);
        };
        move_in_bucket(lake, r, c, dataset, day, None).await
    }

    /// Forgets the tier of a day that left the table (expired): new rows of that day would
    /// start in the standard tier.
    pub async fn forget_day(&self, lake: &Lake, dataset: &str, day: &str) -> Result<()> {
        if let Some((r, c)) = self.bucket(lake)? {
            let known = c.recorded(r, dataset, true).await?;
            if known.days.contains_key(day) || known.restored.contains_key(day) {
                c.update(r, dataset, |rec| {
                    rec.days.remove(day);
                    rec.restored.remove(day);
                    Ok(())
                })
                .await?;
            }
        }
        Ok(())
    }
}

/// Writes the day's files not yet in `to`'s class again in it, then records the day's tier
/// with the files now in it. Without `to`, the tier is the one the day is recorded in, read in
/// the same read of the record.
async fn move_in_bucket(
    lake: &Lake,
    r: &Remote,
    c: &Classes,
    dataset: &str,
    day: &str,
    to: Option<Tier>,
) -> Result<usize> {
    let rec = c.recorded(r, dataset, true).await?;
    // No tier given: the one the day is recorded in (none: it is in the standard tier).
    let Some(to) = to.or_else(|| rec.days.get(day).map(|d| d.tier)) else {
        return Ok(0);
    };
    let files = classes::day_files(lake, r, dataset, day).await?;
    let already: std::collections::BTreeSet<String> = match rec.days.get(day) {
        Some(d) if d.tier == to => d.files.clone(),
        None if to == Tier::Standard => files.iter().cloned().collect(),
        _ => Default::default(),
    };
    let pending: Vec<String> = files.iter().filter(|f| !already.contains(*f)).cloned().collect();
    // Nothing to write, and the record already says where the day is.
    let recorded_right = (to == Tier::Standard) != rec.days.contains_key(day);
    if pending.is_empty() && recorded_right {
        return Ok(0);
    }
    let moved = classes::rewrite(r, dataset, &pending, c.class_of(to)).await?;
    let listed: std::collections::BTreeSet<String> = files.into_iter().collect();
    let mut now_in: std::collections::BTreeSet<String> = already.intersection(&listed).cloned().collect();
    now_in.extend(moved.iter().cloned());
    let read = rec.days.get(day).cloned();
    c.update(r, dataset, |rec| {
        // Another move of this day (a restore, another process's lifecycle) came in between:
        // its record stands, and this move is tried again at the next run.
        if rec.days.get(day) != read.as_ref() {
            return Err(Error::Conflict(format!(
                "the tier of {dataset} day={day} changed while it moved; tried again at the next run"
            )));
        }
        if to == Tier::Standard {
            rec.days.remove(day);
        } else {
            rec.days.insert(
                day.to_string(),
                TieredDay {
                    tier: to,
                    files: now_in.clone(),
                },
            );
        }
        Ok(())
    })
    .await?;
    Ok(moved.len())
}

impl Tiers {
    /// Moves a dataset's table to another name (a new major version keeps the current table
    /// as `<dataset>__v<N>`): the table directory, its days in colder tiers, and the links to
    /// them. Idempotent, so an interrupted move is finished by running it again. The caller
    /// holds every writer of both names off.
    pub fn rename_table(&self, lake: &Lake, from: &str, to: &str) -> Result<()> {
        lake.require_local("a new major version (it keeps the table under another name)")?;
        let Place::Dirs { infrequent, archive } = &self.place else {
            return Err(Error::Refused(
                "a new major version keeps the table under another name, which tiers as storage classes cannot follow"
                    .into(),
            ));
        };
        let (src, dst) = (lake.table_dir(from), lake.table_dir(to));
        // A table without a commit (an empty folder a reader may have made) stays.
        if lake.table_exists(from) {
            if dst.exists() {
                return Err(Error::Refused(format!(
                    "cannot move the table of {from} to {to}: {} exists",
                    dst.display()
                )));
            }
            std::fs::rename(&src, &dst).map_err(io_err(&src))?;
            sync_parent(&dst)?;
        }
        for base in [infrequent, archive] {
            let (a, b) = (base.join(from), base.join(to));
            if a.exists() {
                if b.exists() {
                    return Err(Error::Refused(format!(
                        "cannot move the {from} days of {} to {to}: {} exists",
                        base.display(),
                        b.display()
                    )));
                }
                std::fs::rename(&a, &b).map_err(io_err(&a))?;
                sync_parent(&b)?;
            }
        }
        if !dst.exists() {
            return Ok(());
        }
        // Each link of a tiered day now names the tier folder of the new name.
        for e in std::fs::read_dir(&dst).map_err(io_err(&dst))? {
            let entry = e.map_err(io_err(&dst))?.path();
            let Ok(target) = std::fs::read_link(&entry) else {
                continue;
            };
            for base in [infrequent, archive] {
                let Ok(rest) = target.strip_prefix(base.join(from)) else {
                    continue;
                };
                let fresh = base.join(to).join(rest);
                let tmp = entry.with_file_name(format!(
                    ".{}.relink",
                    entry.file_name().and_then(|n| n.to_str()).unwrap_or("day")
                ));
                clear_leftover(&tmp)?;
                symlink_dir(&fresh, &tmp)?;
                std::fs::rename(&tmp, &entry).map_err(io_err(&entry))?;
            }
        }
        sync_path(&dst)
    }
}

fn sync_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(p) => sync_path(p),
        None => Ok(()),
    }
}

/// Where a day's files are now: the table's entry itself, or where its link points.
fn current_place(entry: &Path) -> Result<Option<PathBuf>> {
    match std::fs::symlink_metadata(entry) {
        Ok(m) if m.file_type().is_symlink() => Ok(Some(std::fs::read_link(entry).map_err(io_err(entry))?)),
        Ok(_) => Ok(Some(entry.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(entry)(e)),
    }
}

/// Removes what an interrupted move may have left under hidden names: a link is removed
/// without following it; a directory (a partial copy, or the old place after the swap) with
/// its contents.
fn clear_leftover(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => std::fs::remove_file(path).map_err(io_err(path)),
        Ok(_) => std::fs::remove_dir_all(path).map_err(io_err(path)),
        Err(_) => Ok(()),
    }
}

/// Where the day's files are copied to: the tier directory, or (back to standard) a hidden
/// directory in the table that the swap then puts in place.
fn staged_place(table_dir: &Path, day: &str, dest: Option<&Path>) -> PathBuf {
    dest.map(Path::to_path_buf)
        .unwrap_or_else(|| table_dir.join(format!(".day={day}.restore")))
}

/// The first, unlocked copy.
fn prepare_move(table_dir: &Path, day: &str, dest: Option<&Path>) -> Result<()> {
    let entry = table_dir.join(format!("day={day}"));
    let Some(current) = current_place(&entry)? else {
        return Ok(());
    };
    let staged = staged_place(table_dir, day, dest);
    if staged == current {
        return Ok(());
    }
    clear_leftover(&table_dir.join(format!(".day={day}.link")))?;
    if dest.is_none() {
        clear_leftover(&staged)?;
    } else if staged.exists() {
        std::fs::remove_dir_all(&staged).map_err(io_err(&staged))?;
    }
    copy_tree(&current, &staged)?;
    Ok(())
}

/// Under the lock: copies what changed since [`prepare_move`], swaps, and drops the old place.
fn finish_move(table_dir: &Path, day: &str, dest: Option<PathBuf>) -> Result<usize> {
    let entry = table_dir.join(format!("day={day}"));
    let Some(current) = current_place(&entry)? else {
        return Ok(0);
    };
    let staged = staged_place(table_dir, day, dest.as_deref());
    if staged == current {
        return Err(Error::Refused(format!("day={day} is already in {}", staged.display())));
    }
    let files = copy_tree(&current, &staged)?;
    let swap = match &dest {
        Some(d) => {
            let link = table_dir.join(format!(".day={day}.link"));
            clear_leftover(&link)?;
            symlink_dir(d, &link)?;
            link
        }
        None => staged.clone(),
    };
    exchange(&swap, &entry)?;
    sync_path(table_dir)?;
    // `swap` now names what `entry` was: the old directory or the old link.
    if std::fs::symlink_metadata(&swap).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(&swap).map_err(io_err(&swap))?;
        std::fs::remove_dir_all(&current).map_err(io_err(&current))?;
    } else {
        std::fs::remove_dir_all(&swap).map_err(io_err(&swap))?;
    }
    sync_path(table_dir)?;
    Ok(files)
}

/// Copies a directory tree, syncing every file and directory it writes (and the directories
/// above a new tree); a file already there with the same size and a later time is kept.
/// Returns the files in the tree.
fn copy_tree(from: &Path, to: &Path) -> Result<usize> {
    let created = !to.exists();
    std::fs::create_dir_all(to).map_err(io_err(to))?;
    let mut files = 0;
    let mut wrote = false;
    for e in std::fs::read_dir(from).map_err(io_err(from))? {
        let e = e.map_err(io_err(from))?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type().map_err(io_err(&src))?.is_dir() {
            files += copy_tree(&src, &dst)?;
            continue;
        }
        files += 1;
        let sm = e.metadata().map_err(io_err(&src))?;
        let fresh = std::fs::metadata(&dst)
            .is_ok_and(|dm| dm.len() == sm.len() && matches!((sm.modified(), dm.modified()), (Ok(s), Ok(d)) if d >= s));
        if !fresh {
            std::fs::copy(&src, &dst).map_err(io_err(&dst))?;
            sync_path(&dst)?;
            wrote = true;
        }
    }
    if wrote || created {
        sync_path(to)?;
    }
    if created {
        // New directories up to two levels (`<tier>/<dataset>/day=..`) need their entries
        // synced too.
        let mut d = to.parent();
        for _ in 0..2 {
            let Some(p) = d else { break };
            sync_path(p)?;
            d = p.parent();
        }
    }
    Ok(files)
}

#[cfg(unix)]
fn symlink_dir(target: &Path, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link).map_err(io_err(link))
}

#[cfg(not(unix))]
fn symlink_dir(_target: &Path, link: &Path) -> Result<()> {
    Err(Error::Refused(format!(
        "storage tiers need symbolic links ({})",
        link.display()
    )))
}

/// Swaps two directory entries atomically.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).map_err(|e| Error::Io {
        path: b.to_path_buf(),
        source: e.into(),
    })
}

/// Swaps two directory entries (not atomically: a reader may briefly find neither).
#[cfg(not(target_os = "linux"))]
fn exchange(a: &Path, b: &Path) -> Result<()> {
    let aside = b.with_extension("aside");
    std::fs::rename(b, &aside).map_err(io_err(b))?;
    std::fs::rename(a, b).map_err(io_err(a))?;
    std::fs::rename(&aside, a).map_err(io_err(a))
}
