//! The catalog: the registry of datasets and their contracts, kept in the metadata store
//! (`meta.rs`): files in the data directory by default, PostgreSQL beyond one machine.
//!
//! With files, one JSON file per dataset under `<data>/catalog/datasets/`, written to a
//! temporary file, synced and renamed, so a crash leaves either the old or the new contract.
//! Every contract a dataset ever had is kept under `<data>/catalog/versions/<name>/`, one file
//! per version (`<major>.<minor>.json`), written before the current contract is replaced. In
//! PostgreSQL the version and the contract in force are written in one transaction.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use tarn_core::DatasetSpec;
use tarn_core::evolution::{self, Refusal};

pub mod meta;
pub mod plan;
pub mod search;
pub mod validate;

pub use meta::{Kind, Meta};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("catalog io error at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("catalog entry {path} is unreadable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// The metadata store failed (PostgreSQL unreachable, a refused migration).
    #[error("{0}")]
    Meta(String),
    #[error("dataset {name:?} already exists with a different contract")]
    Conflict { name: String },
    #[error("the new contract of {name:?} is refused: {refusal}")]
    Refused { name: String, refusal: Refusal },
    #[error("dataset {name:?} is kept by tarn itself; it cannot be declared or changed")]
    System { name: String },
    #[error("dataset {name:?} is registered data read in place; only `tarn register` changes it")]
    Registered { name: String },
    #[error("dataset {name:?}: a new major version moves the table first (`tarn apply` does it)")]
    NeedsMove { name: String },
    #[error(transparent)]
    Invalid(#[from] tarn_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The dataset registry: the contracts in force, held in memory, and every contract kept in
/// the metadata store ([`meta::Meta`]).
#[derive(Debug)]
pub struct Catalog {
    meta: Arc<Meta>,
    datasets: RwLock<HashMap<String, Arc<DatasetSpec>>>,
}

/// One kept contract of a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    pub major: u32,
    /// Counts the changes made under one major version, from 0.
    pub minor: u32,
    /// When it was applied (RFC 3339, UTC).
    pub applied_at: String,
    /// What changed from the version before (empty for the first).
    #[serde(default)]
    pub changes: Vec<evolution::Change>,
    pub contract: DatasetSpec,
}

impl Version {
    pub fn label(&self) -> String {
        format!("{}.{}", self.major, self.minor)
    }
}

/// What [`Catalog::evolve`] did.
#[derive(Debug, Clone)]
pub struct Applied {
    pub spec: Arc<DatasetSpec>,
    /// The contract it replaced, if any.
    pub previous: Option<Arc<DatasetSpec>>,
    pub changes: Vec<evolution::Change>,
    /// True when the contract started the next major version.
    pub new_major: bool,
    /// The version now in force, `None` when nothing changed.
    pub version: Option<String>,
}

impl Applied {
    pub fn created(&self) -> bool {
        self.previous.is_none()
    }
}

impl Catalog {
    /// Opens the catalog kept in files in `dir` (and producer keys beside it, in `keys`),
    /// creating it if needed.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let datasets = dir.join("datasets");
        std::fs::create_dir_all(&datasets).map_err(io_err(&datasets))?;
        Self::with_meta(Arc::new(Meta::files(dir, dir.with_file_name("keys"))))
    }

    /// Opens the catalog kept in a metadata store.
    pub fn with_meta(meta: Arc<Meta>) -> Result<Self> {
        let catalog = Self {
            datasets: RwLock::new(load_datasets(&meta)?),
            meta,
        };
        // Catalogs from before versions were kept start their history at the current contract.
        for spec in catalog.list() {
            if catalog.versions(&spec.name)?.is_empty() {
                catalog.keep_version(&spec)?;
            }
        }
        Ok(catalog)
    }

    /// The metadata store the catalog keeps its contracts in.
    pub fn meta(&self) -> &Arc<Meta> {
        &self.meta
    }

    /// Reads the contracts in force again from the store (another process sharing it may
    /// have changed them). Returns how many changed, appeared or went.
    pub fn refresh(&self) -> Result<usize> {
        // Read under the lock: a change this process makes meanwhile is not undone by an
        // older read.
        let mut map = self.datasets.write().unwrap_or_else(|e| e.into_inner());
        let fresh = load_datasets(&self.meta)?;
        let changed = fresh.iter().filter(|(k, v)| map.get(*k) != Some(*v)).count()
            + map.keys().filter(|k| !fresh.contains_key(*k)).count();
        if changed > 0 {
            *map = fresh;
        }
        Ok(changed)
    }

    /// Every kept contract of a dataset, oldest first.
    pub fn versions(&self, name: &str) -> Result<Vec<Version>> {
        tarn_core::name::check_any_dataset(name)?;
        let mut out = Vec::new();
        for (doc, body) in self.meta.list(Kind::Version, &format!("{name}/"))? {
            let v: Version = serde_json::from_slice(&body).map_err(|e| Error::Corrupt {
                path: PathBuf::from(format!("version {doc}")),
                reason: e.to_string(),
            })?;
            out.push(v);
        }
        out.sort_by_key(|v| (v.major, v.minor));
        Ok(out)
    }

    /// Creates a dataset with `spec` in force and kept as its first version, together (one
    /// transaction where the store has them; the version first otherwise). Returns the
    /// version's label; `None` when the dataset exists in the store after all (another process
    /// created it).
    fn create(&self, spec: &DatasetSpec) -> Result<Option<String>> {
        let d = Documents::of(spec, 0, &[])?;
        let created = self.meta.create(
            (Kind::Dataset, &spec.name, &d.contract),
            &[(Kind::Version, &d.version_doc, &d.version)],
        )?;
        Ok(created.then_some(d.label))
    }

    /// Replaces the contract `old` with `spec` (and keeps its version) only if `old` is still
    /// the contract in the store: a process sharing the store may have changed it since this
    /// one read it, and the evolution rules were checked against `old`.
    fn replace(
        &self,
        old: &DatasetSpec,
        spec: &DatasetSpec,
        minor: u32,
        changes: &[evolution::Change],
    ) -> Result<String> {
        let Documents {
            label,
            version_doc: doc,
            version,
            contract,
        } = Documents::of(spec, minor, changes)?;
        let (name, old) = (spec.name.clone(), old.clone());
        self.meta.update(
            Kind::Dataset,
            &spec.name,
            Box::new(move |current| {
                let current: Option<DatasetSpec> =
                    current
                        .map(serde_json::from_slice)
                        .transpose()
                        .map_err(|e| Error::Corrupt {
                            path: PathBuf::from(format!("dataset {name}")),
                            reason: e.to_string(),
                        })?;
                if current.as_ref() != Some(&old) {
                    return Err(Error::Meta(format!(
                        "the contract of {name} was changed by another process since this one read it; apply again"
                    )));
                }
                Ok(vec![(Kind::Version, doc, version), (Kind::Dataset, name, contract)])
            }),
        )?;
        Ok(label)
    }

    /// The contract in force of one dataset, read from the store.
    fn load_one(&self, name: &str) -> Result<Arc<DatasetSpec>> {
        let body = self.meta.get(Kind::Dataset, name)?.ok_or_else(|| {
            Error::Meta(format!(
                "dataset {name} was neither created nor found in the {}",
                self.meta.describe()
            ))
        })?;
        let spec: DatasetSpec = serde_json::from_slice(&body).map_err(|e| Error::Corrupt {
            path: PathBuf::from(format!("dataset {name}")),
            reason: e.to_string(),
        })?;
        spec.check()?;
        Ok(Arc::new(spec))
    }

    /// Keeps a version of `spec` without changing what is in force.
    fn keep_version(&self, spec: &DatasetSpec) -> Result<()> {
        let d = Documents::of(spec, 0, &[])?;
        self.meta.put(&[(Kind::Version, &d.version_doc, &d.version)])
    }

    /// Applies a contract: registers a new dataset, or replaces the contract of an existing one
    /// when the evolution rules allow it (`tarn_core::evolution::check`). The new version is
    /// kept before it comes into force. Applying the contract in force changes nothing.
    pub fn evolve(&self, spec: DatasetSpec) -> Result<Applied> {
        self.evolve_inner(spec, false)
    }

    /// [`Catalog::evolve`] that may start the next major version: for the caller that has
    /// moved the current table away (and for registered data, which has no table of tarn's).
    pub fn evolve_major(&self, spec: DatasetSpec) -> Result<Applied> {
        self.evolve_inner(spec, true)
    }

    fn evolve_inner(&self, spec: DatasetSpec, major_allowed: bool) -> Result<Applied> {
        spec.check()?;
        if spec.system {
            return Err(Error::System { name: spec.name });
        }
        let mut map = self.datasets.write().unwrap_or_else(|e| e.into_inner());
        let old = loop {
            if let Some(old) = map.get(&spec.name) {
                break old.clone();
            }
            // New here; created only if no other process sharing the store made it first.
            if let Some(version) = self.create(&spec)? {
                let spec = Arc::new(spec);
                map.insert(spec.name.clone(), spec.clone());
                return Ok(Applied {
                    spec,
                    previous: None,
                    changes: Vec::new(),
                    new_major: false,
                    version: Some(version),
                });
            }
            map.insert(spec.name.clone(), self.load_one(&spec.name)?);
        };
        if old.system {
            return Err(Error::System { name: spec.name });
        }
        if old.external.is_some() != spec.external.is_some() {
            return Err(Error::Registered { name: spec.name });
        }
        let ev = evolution::check(&old, &spec).map_err(|refusal| Error::Refused {
            name: spec.name.clone(),
            refusal,
        })?;
        if ev.new_major && !major_allowed {
            return Err(Error::NeedsMove { name: spec.name });
        }
        if ev.changes.is_empty() {
            return Ok(Applied {
                spec: old.clone(),
                previous: Some(old),
                changes: Vec::new(),
                new_major: false,
                version: None,
            });
        }
        let minor = if ev.new_major {
            0
        } else {
            self.versions(&spec.name)?
                .iter()
                .filter(|v| v.major == spec.major)
                .map(|v| v.minor + 1)
                .max()
                .unwrap_or(0)
        };
        let version = match self.replace(&old, &spec, minor, &ev.changes) {
            Ok(v) => Some(v),
            Err(e) => {
                // Another process changed the contract since this one read it: take its
                // contract, so that applying again evolves from it.
                if let Ok(current) = self.load_one(&spec.name) {
                    map.insert(spec.name.clone(), current);
                }
                return Err(e);
            }
        };
        let spec = Arc::new(spec);
        map.insert(spec.name.clone(), spec.clone());
        Ok(Applied {
            spec,
            previous: Some(old),
            changes: ev.changes,
            new_major: ev.new_major,
            version,
        })
    }

    /// [`Catalog::get`] that, for a dataset not known here, asks a shared store (another
    /// process may have declared it since the last refresh), so that its contract (and who may
    /// write to it) holds from this process's first event on.
    pub fn lookup(&self, name: &str) -> Result<Option<Arc<DatasetSpec>>> {
        if let Some(spec) = self.get(name) {
            return Ok(Some(spec));
        }
        if !self.meta.shared() || tarn_core::name::check_any_dataset(name).is_err() {
            return Ok(None);
        }
        if self.meta.get(Kind::Dataset, name)?.is_none() {
            return Ok(None);
        }
        let spec = self.load_one(name)?;
        let mut map = self.datasets.write().unwrap_or_else(|e| e.into_inner());
        Ok(Some(map.entry(name.to_string()).or_insert(spec).clone()))
    }

    pub fn get(&self, name: &str) -> Option<Arc<DatasetSpec>> {
        self.read().get(name).cloned()
    }

    /// Every dataset, sorted by name.
    pub fn list(&self) -> Vec<Arc<DatasetSpec>> {
        let mut v: Vec<_> = self.read().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Registers a dataset. Registering the same contract again is a no-op; a different
    /// contract under an existing name is a conflict, except that an inferred contract never
    /// replaces one: the contract in force is returned (two first writes raced to infer, or
    /// another process sharing the store declared it first). Returns the contract now in force.
    pub fn register(&self, spec: DatasetSpec) -> Result<Arc<DatasetSpec>> {
        spec.check()?;
        let mut map = self.datasets.write().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(existing) = map.get(&spec.name) {
                if spec.inferred || **existing == spec {
                    return Ok(existing.clone());
                }
                return Err(Error::Conflict { name: spec.name });
            }
            if self.create(&spec)?.is_some() {
                let spec = Arc::new(spec);
                map.insert(spec.name.clone(), spec.clone());
                return Ok(spec);
            }
            map.insert(spec.name.clone(), self.load_one(&spec.name)?);
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<DatasetSpec>>> {
        self.datasets.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads every `*.yaml`/`*.yml` descriptor in `dir` and applies it ([`Catalog::evolve`]).
    pub fn load_descriptors(&self, dir: &Path) -> Result<Vec<Applied>> {
        let mut out = Vec::new();
        for (path, text) in read_descriptors(dir)? {
            let spec = DatasetSpec::from_yaml(&text).map_err(|e| Error::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            out.push(self.evolve(spec)?);
        }
        Ok(out)
    }
}

/// What putting a contract in force writes: its version (label, document name, body) and the
/// contract itself.
struct Documents {
    label: String,
    version_doc: String,
    version: Vec<u8>,
    contract: Vec<u8>,
}

impl Documents {
    fn of(spec: &DatasetSpec, minor: u32, changes: &[evolution::Change]) -> Result<Self> {
        let v = Version {
            major: spec.major,
            minor,
            applied_at: now_rfc3339(),
            changes: changes.to_vec(),
            contract: spec.clone(),
        };
        let corrupt = |e: serde_json::Error| Error::Corrupt {
            path: PathBuf::from(format!("dataset {}", spec.name)),
            reason: e.to_string(),
        };
        Ok(Self {
            version_doc: format!("{}/{}", spec.name, v.label()),
            label: v.label(),
            version: serde_json::to_vec_pretty(&v).map_err(corrupt)?,
            contract: serde_json::to_vec_pretty(spec).map_err(corrupt)?,
        })
    }
}

/// The contracts in force in a store, checked.
fn load_datasets(meta: &Meta) -> Result<HashMap<String, Arc<DatasetSpec>>> {
    let mut datasets = HashMap::new();
    for (name, body) in meta.list(Kind::Dataset, "")? {
        let spec: DatasetSpec = serde_json::from_slice(&body).map_err(|e| Error::Corrupt {
            path: PathBuf::from(format!("dataset {name}")),
            reason: e.to_string(),
        })?;
        spec.check()?;
        datasets.insert(spec.name.clone(), Arc::new(spec));
    }
    Ok(datasets)
}

/// The descriptor files (`*.yaml`, `*.yml`) of a folder and their text, sorted by path; at
/// most 10,000 files of at most 1 MiB each.
pub fn read_descriptors(dir: &Path) -> Result<Vec<(PathBuf, String)>> {
    const FILES_MAX: usize = 10_000;
    const BYTES_MAX: u64 = 1 << 20;
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    paths.sort();
    if paths.len() > FILES_MAX {
        return Err(Error::Corrupt {
            path: dir.to_path_buf(),
            reason: format!("{} descriptors; at most {FILES_MAX} in one folder", paths.len()),
        });
    }
    let mut out = Vec::with_capacity(paths.len());
    for path in paths {
        let len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
        if len > BYTES_MAX {
            return Err(Error::Corrupt {
                path,
                reason: format!("{len} bytes; a descriptor may hold at most 1 MiB"),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        out.push((path, text));
    }
    Ok(out)
}

/// Writes `dir/name` through a synced temporary file and a rename, then syncs the folder:
/// a crash leaves the old file or the new one. Also used for the metadata kept beside the
/// catalog (producer keys, major-version intents).
pub fn write_synced(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    let d = std::fs::File::open(dir).map_err(io_err(dir))?;
    d.sync_all().map_err(io_err(dir))
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-field contract named `name`, with `extra` YAML lines (fields go first).
    pub(crate) fn spec(name: &str, extra: &str) -> DatasetSpec {
        DatasetSpec::from_yaml(&format!(
            "name: {name}\nfields:\n  - {{ name: event_id, type: string }}\n{extra}event_id: event_id\n"
        ))
        .expect("spec")
    }

    #[test]
    fn register_persist_and_conflict() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let c = Catalog::open(dir.path()).expect("open");
            c.register(spec("a", "")).expect("register");
            c.register(spec("a", "")).expect("same again is fine");
            let other = spec("a", "unknown_fields: drop\n");
            assert!(matches!(c.register(other), Err(Error::Conflict { .. })));
            c.register(spec("b", "")).expect("register");
        }
        let c = Catalog::open(dir.path()).expect("reopen");
        let names: Vec<_> = c.list().iter().map(|s| s.name.clone()).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn evolves_and_keeps_every_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Catalog::open(dir.path()).expect("open");
        let v1 = c.evolve(spec("a", "")).expect("create");
        assert!(v1.created() && v1.version.as_deref() == Some("1.0"));
        let again = c.evolve(spec("a", "")).expect("same");
        assert!(again.version.is_none() && again.changes.is_empty());
        let grown = c.evolve(spec("a", "  - { name: n, type: int64 }\n")).expect("additive");
        assert_eq!(grown.version.as_deref(), Some("1.1"));
        let err = c
            .evolve(spec("a", "  - { name: n, type: string }\n"))
            .expect_err("breaking")
            .to_string();
        assert!(
            err.contains("changes type from int64 to string") && err.contains("major: 2"),
            "{err}"
        );
        let two = spec("a", "  - { name: n, type: string }\nmajor: 2\n");
        assert!(matches!(c.evolve(two.clone()), Err(Error::NeedsMove { .. })));
        let bumped = c.evolve_major(two).expect("next major");
        assert!(bumped.new_major && bumped.version.as_deref() == Some("2.0"));
        assert_eq!(c.get("a").map(|s| s.major), Some(2));
        drop(c);
        let c = Catalog::open(dir.path()).expect("reopen");
        let labels: Vec<String> = c.versions("a").expect("versions").iter().map(Version::label).collect();
        assert_eq!(labels, ["1.0", "1.1", "2.0"]);
        let v = c.versions("a").expect("versions");
        assert_eq!(
            v[1].contract.field("n").map(|f| f.ty),
            Some(tarn_core::FieldType::Int64)
        );
        assert!(v[1].changes[0].what.contains("new optional field n"));
        assert!(c.versions("../x").is_err());
        let sys = DatasetSpec::rejected_of("a").expect("spec");
        c.register(sys.clone()).expect("system register");
        assert!(matches!(c.evolve(sys), Err(Error::System { .. })));
    }

    #[test]
    fn the_example_descriptors_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Catalog::open(dir.path()).expect("open");
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/datasets");
        // They pass `tarn validate` with the default norms, without a warning.
        let sources: Vec<_> = read_descriptors(&examples)
            .expect("read")
            .into_iter()
            .map(|(p, text)| validate::Source {
                file: p.display().to_string(),
                text,
            })
            .collect();
        let report = validate::validate(&sources, &|_| None, &validate::Norms::default());
        assert!(report.findings.is_empty(), "{:?}", report.findings);
        let loaded = c.load_descriptors(&examples).expect("examples are valid");
        assert!(
            loaded.iter().any(|a| a.spec.name == "auctions"
                && a.spec.tenant() == Some("client_id")
                && a.spec.rollups.len() == 1)
        );
    }

    #[test]
    fn loads_descriptors_and_reports_bad_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("d");
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(
            d.join("x.yaml"),
            "name: x\nfields:\n  - { name: event_id, type: string }\nevent_id: event_id\n",
        )
        .expect("write");
        let c = Catalog::open(dir.path().join("cat")).expect("open");
        assert_eq!(c.load_descriptors(&d).expect("load").len(), 1);
        std::fs::write(d.join("y.yaml"), "name: Y\nfields: []\nevent_id: e\n").expect("write");
        let err = c.load_descriptors(&d).expect_err("bad descriptor").to_string();
        assert!(err.contains("y.yaml"), "{err}");
    }
}
