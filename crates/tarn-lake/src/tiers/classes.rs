//! Storage tiers in a bucket: a tier is an S3 storage class. A day moves by writing each of its
//! files again under the same key with the tier's class (a file's bytes never change, so a
//! reader in the middle of a range read sees the same bytes either way); which days are in
//! which tier, and which files of each day were written in its class, is recorded in the
//! table's `_tarn_tiers.json`, updated with a conditional put so that two processes never
//! overwrite each other's record.
//!
//! Files that reach a colder day later (a late event, a compaction) are written in the
//! standard class; the next lifecycle run finds them missing from the record and moves them
//! too ([`Tiers::settle`](super::Tiers::settle)).
//!
//! Only classes that are read as they are can be tiers: an object in `GLACIER` or
//! `DEEP_ARCHIVE` cannot be read until it is restored object by object, which tarn does not
//! do, so those are refused at start. The archive tier (by default `GLACIER_IR`) is still
//! refused to queries by tarn, as on a local disk, until `tarn restore` brings the day back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use deltalake::logstore::object_store::{
    self, Attribute, Attributes, ObjectStore, ObjectStoreExt as _, PutMode, PutMultipartOptions, PutOptions,
    UpdateVersion, WriteMultipart,
};
use futures::{StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};

use super::Tier;
use crate::store::Remote;
use crate::{Error, Lake, Result};

/// The record of a table's tiers, beside its Delta log.
pub(super) const TIERS_FILE: &str = "_tarn_tiers.json";

/// Classes whose objects are read like the standard class's.
const READ_AS_THEY_ARE: [&str; 6] = [
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
];

/// Default classes of the colder tiers.
pub const DEFAULT_INFREQUENT_CLASS: &str = "STANDARD_IA";
pub const DEFAULT_ARCHIVE_CLASS: &str = "GLACIER_IR";

/// Files larger than this are written back in parts of this size, so a move holds at most
/// this much of a file in memory.
const PART_BYTES: usize = 8 << 20;
/// Files written back at once.
const REWRITES_AT_ONCE: usize = 4;
/// How long a read record serves queries before it is read again (a move by another process
/// is seen within this).
const CACHE_FOR: Duration = Duration::from_secs(5);
/// Attempts of a conditional update of the record before giving up.
const UPDATE_ATTEMPTS: usize = 16;

/// Checks that `class` can hold the tier `tier`.
pub(super) fn check_class(tier: Tier, class: &str) -> Result<()> {
    if READ_AS_THEY_ARE.contains(&class) {
        return Ok(());
    }
    let why = match class {
        "GLACIER" | "DEEP_ARCHIVE" => {
            format!("an object in {class} cannot be read until it is restored object by object, which tarn does not do")
        }
        _ => format!("{class} is not an S3 storage class tarn knows"),
    };
    Err(Error::Refused(format!(
        "the {} tier cannot be the storage class {class}: {why}; choose one of {} (GLACIER_IR is the \
         archive class that is read without a restore)",
        tier.as_str(),
        READ_AS_THEY_ARE.join(", ")
    )))
}

/// What `_tarn_tiers.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recorded {
    /// Days in a colder tier.
    #[serde(default)]
    pub days: BTreeMap<String, TieredDay>,
    /// Restored days and the last day of each restore.
    #[serde(default)]
    pub restored: HashMap<String, NaiveDate>,
}

/// A day in a colder tier: the tier, and its files (relative to the table) written in the
/// tier's class.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TieredDay {
    pub tier: Tier,
    pub files: BTreeSet<String>,
}

/// The classes of the colder tiers, and the records read lately.
#[derive(Debug)]
pub(super) struct Classes {
    pub infrequent: String,
    pub archive: String,
    cache: Mutex<HashMap<String, (Instant, Arc<Recorded>)>>,
}

impl Classes {
    pub fn new(infrequent: &str, archive: &str) -> Result<Self> {
        check_class(Tier::Infrequent, infrequent)?;
        check_class(Tier::Archive, archive)?;
        Ok(Self {
            infrequent: infrequent.to_string(),
            archive: archive.to_string(),
            cache: Mutex::default(),
        })
    }

    pub fn class_of(&self, tier: Tier) -> &str {
        match tier {
            Tier::Standard => "STANDARD",
            Tier::Infrequent => &self.infrequent,
            Tier::Archive => &self.archive,
        }
    }

    /// The record of a dataset's tiers: read again when `fresh`, else as read within the last
    /// few seconds.
    pub async fn recorded(&self, remote: &Remote, dataset: &str, fresh: bool) -> Result<Arc<Recorded>> {
        if !fresh {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, r)) = cache.get(dataset)
                && at.elapsed() < CACHE_FOR
            {
                return Ok(r.clone());
            }
        }
        let (r, _) = read(remote, dataset).await?;
        Ok(self.remember(dataset, r))
    }

    fn remember(&self, dataset: &str, r: Recorded) -> Arc<Recorded> {
        let r = Arc::new(r);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dataset.to_string(), (Instant::now(), r.clone()));
        r
    }

    /// Changes the record of a dataset with `change`, read and written again until no other
    /// writer came in between.
    /// `change` may refuse (an error) when the record is no longer what its caller read.
    pub async fn update(
        &self,
        remote: &Remote,
        dataset: &str,
        change: impl Fn(&mut Recorded) -> Result<()>,
    ) -> Result<()> {
        let key = record_key(remote, dataset);
        for _ in 0..UPDATE_ATTEMPTS {
            let (mut r, version) = read(remote, dataset).await?;
            change(&mut r)?;
            let body = serde_json::to_vec_pretty(&r).map_err(|e| Error::Internal(e.to_string()))?;
            let mode = match version {
                Some(v) => PutMode::Update(v),
                None => PutMode::Create,
            };
            let opts = PutOptions {
                mode,
                ..Default::default()
            };
            match remote.store.put_opts(&key, body.into(), opts).await {
                Ok(_) => {
                    self.remember(dataset, r);
                    return Ok(());
                }
                Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => continue,
                Err(e) => {
                    return Err(Error::Store {
                        what: format!("writing {key}"),
                        source: e,
                    });
                }
            }
        }
        Err(Error::Conflict(format!(
            "{key} changed under {UPDATE_ATTEMPTS} attempts in a row to update it"
        )))
    }
}

fn record_key(remote: &Remote, dataset: &str) -> object_store::path::Path {
    remote.key(&format!("tables/{dataset}/{TIERS_FILE}"))
}

/// The record and the version to update it from (`None`: there is none yet).
async fn read(remote: &Remote, dataset: &str) -> Result<(Recorded, Option<UpdateVersion>)> {
    let key = record_key(remote, dataset);
    let store_err = |e| Error::Store {
        what: format!("reading {key}"),
        source: e,
    };
    let got = match remote.store.get(&key).await {
        Ok(g) => g,
        Err(object_store::Error::NotFound { .. }) => return Ok((Recorded::default(), None)),
        Err(e) => return Err(store_err(e)),
    };
    let version = UpdateVersion {
        e_tag: got.meta.e_tag.clone(),
        version: got.meta.version.clone(),
    };
    let body = got.bytes().await.map_err(store_err)?;
    let r = serde_json::from_slice(&body).map_err(|e| Error::Corrupt {
        what: key.to_string(),
        reason: e.to_string(),
    })?;
    Ok((r, Some(version)))
}

/// The data files of a day of a dataset's table in the bucket, relative to the table, with
/// tarn's own `_`/`.` names left out.
pub(super) async fn day_files(lake: &Lake, remote: &Remote, dataset: &str, day: &str) -> Result<Vec<String>> {
    let table = remote.key(&format!("tables/{dataset}/")).to_string();
    let metas = lake
        .list_remote(remote, &format!("tables/{dataset}/day={day}/"))
        .await?;
    let mut out: Vec<String> = metas
        .into_iter()
        .filter_map(|m| {
            let rel = m
                .location
                .as_ref()
                .strip_prefix(&table)?
                .trim_start_matches('/')
                .to_string();
            let ours = rel.ends_with(".parquet") && !rel.split('/').any(|s| s.starts_with('_') || s.starts_with('.'));
            ours.then_some(rel)
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Writes each file again in `class`; returns the files written (one gone meanwhile, removed
/// by vacuum after a compaction, is skipped).
pub(super) async fn rewrite(remote: &Remote, dataset: &str, files: &[String], class: &str) -> Result<Vec<String>> {
    let done: Vec<Option<String>> = futures::stream::iter(files.iter().cloned())
        .map(|rel| async move {
            let key = remote.key(&format!("tables/{dataset}/{rel}"));
            let wrote = rewrite_one(&remote.store, &key, class)
                .await
                .map_err(|e| Error::Store {
                    what: format!("writing {key} in the storage class {class}"),
                    source: e,
                })?;
            Ok::<_, Error>(wrote.then_some(rel))
        })
        .buffer_unordered(REWRITES_AT_ONCE)
        .try_collect()
        .await?;
    Ok(done.into_iter().flatten().collect())
}

/// Writes one object again under its key in `class`: in one put when it is small, in parts
/// otherwise. False when the object is gone.
async fn rewrite_one(
    store: &Arc<dyn ObjectStore>,
    key: &object_store::path::Path,
    class: &str,
) -> object_store::Result<bool> {
    let got = match store.get(key).await {
        Ok(g) => g,
        Err(object_store::Error::NotFound { .. }) => return Ok(false),
        Err(e) => return Err(e),
    };
    let attributes = Attributes::from_iter([(Attribute::StorageClass, class.to_string())]);
    if got.meta.size <= PART_BYTES as u64 {
        // Only over the bytes just read: a file deleted (vacuum) or written again meanwhile is
        // left as it is.
        let version = UpdateVersion {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let body = got.bytes().await?;
        let opts = PutOptions {
            mode: PutMode::Update(version),
            attributes,
            ..Default::default()
        };
        return match store.put_opts(key, body.into(), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        };
    }
    let opts = PutMultipartOptions {
        attributes,
        ..Default::default()
    };
    let upload = store.put_multipart_opts(key, opts).await?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
    let mut body = got.into_stream();
    let copied = async {
        while let Some(chunk) = body.next().await {
            writer.wait_for_capacity(2).await?;
            writer.write(&chunk?);
        }
        Ok::<_, object_store::Error>(())
    }
    .await;
    match copied {
        Ok(()) => {
            writer.finish().await?;
            Ok(true)
        }
        Err(e) => {
            // Parts left behind are billed and invisible: abort the upload.
            let _ = writer.abort().await;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_classes_read_as_they_are_can_be_tiers() {
        for c in READ_AS_THEY_ARE {
            assert!(check_class(Tier::Archive, c).is_ok(), "{c}");
        }
        let e = check_class(Tier::Archive, "GLACIER").expect_err("glacier").to_string();
        assert!(
            e.contains("restored object by object") && e.contains("GLACIER_IR"),
            "{e}"
        );
        let e = check_class(Tier::Infrequent, "standard_ia")
            .expect_err("case")
            .to_string();
        assert!(e.contains("not an S3 storage class"), "{e}");
        let c = Classes::new(DEFAULT_INFREQUENT_CLASS, DEFAULT_ARCHIVE_CLASS).expect("defaults");
        assert_eq!(
            [Tier::Standard, Tier::Infrequent, Tier::Archive].map(|t| c.class_of(t)),
            ["STANDARD", "STANDARD_IA", "GLACIER_IR"]
        );
    }

    /// Both ways of writing a file again (one put; parts for a file over 8 MiB) keep its bytes
    /// and give it the class; a file gone meanwhile is skipped. (An in-memory store, because
    /// the S3-compatible server here keeps no class.)
    #[tokio::test]
    async fn a_file_written_again_keeps_its_bytes_and_takes_the_class() {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let small = object_store::path::Path::from("t/day=2026-01-01/a.parquet");
        let large = object_store::path::Path::from("t/day=2026-01-01/b.parquet");
        let big: Vec<u8> = (0..(PART_BYTES * 2 + 12_345)).map(|i| (i % 251) as u8).collect();
        store.put(&small, b"small file".to_vec().into()).await.expect("put");
        store.put(&large, big.clone().into()).await.expect("put");
        for (key, want) in [(&small, b"small file".to_vec()), (&large, big)] {
            assert!(rewrite_one(&store, key, "GLACIER_IR").await.expect("rewrite"));
            let got = store.get(key).await.expect("get");
            assert_eq!(
                got.attributes.get(&Attribute::StorageClass).map(|v| v.as_ref()),
                Some("GLACIER_IR")
            );
            assert_eq!(got.bytes().await.expect("bytes").as_ref(), want.as_slice(), "{key}");
        }
        let gone = object_store::path::Path::from("t/day=2026-01-01/gone.parquet");
        assert!(!rewrite_one(&store, &gone, "GLACIER_IR").await.expect("gone"));
    }

    #[test]
    fn the_record_reads_back_what_it_wrote_and_refuses_what_it_does_not_know() {
        let mut r = Recorded::default();
        r.days.insert(
            "2026-01-01".into(),
            TieredDay {
                tier: Tier::Archive,
                files: ["day=2026-01-01/client_id=a/x.parquet".to_string()].into(),
            },
        );
        r.restored
            .insert("2025-12-01".into(), NaiveDate::from_ymd_opt(2026, 12, 1).expect("date"));
        let back: Recorded = serde_json::from_slice(&serde_json::to_vec(&r).expect("json")).expect("parse");
        assert_eq!(back, r);
        assert!(serde_json::from_str::<Recorded>(r#"{"days":{},"later":1}"#).is_err());
    }
}
