//! The catalog: the registry of datasets and their contracts.
//!
//! Stored as one JSON file per dataset under `<data>/catalog/datasets/`, written to a
//! temporary file, synced and renamed, so a crash leaves either the old or the new contract.
//! The metadata store of DESIGN.md (SQLite by default, PostgreSQL beyond one machine) replaces
//! this file store behind the same API when runs, keys and schema versions arrive.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tarn_core::DatasetSpec;

pub mod search;

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
    #[error("dataset {name:?} already exists with a different contract; changing a contract is not supported yet")]
    Conflict { name: String },
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

/// The dataset registry.
#[derive(Debug)]
pub struct Catalog {
    dir: PathBuf,
    datasets: RwLock<HashMap<String, Arc<DatasetSpec>>>,
}

impl Catalog {
    /// Opens the catalog kept in `dir`, creating it if needed.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().join("datasets");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut datasets = HashMap::new();
        for e in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
            let spec: DatasetSpec = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            spec.check()?;
            datasets.insert(spec.name.clone(), Arc::new(spec));
        }
        Ok(Self {
            dir,
            datasets: RwLock::new(datasets),
        })
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
    /// contract under an existing name is a conflict. Returns the contract now in force.
    pub fn register(&self, spec: DatasetSpec) -> Result<Arc<DatasetSpec>> {
        spec.check()?;
        let mut map = self.datasets.write().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = map.get(&spec.name) {
            if existing.inferred && spec.inferred {
                // Two first writes raced to infer; the first one won.
                return Ok(existing.clone());
            }
            if **existing == spec {
                return Ok(existing.clone());
            }
            return Err(Error::Conflict { name: spec.name });
        }
        self.write_file(&spec)?;
        let spec = Arc::new(spec);
        map.insert(spec.name.clone(), spec.clone());
        Ok(spec)
    }

    fn write_file(&self, spec: &DatasetSpec) -> Result<()> {
        let path = self.dir.join(format!("{}.json", spec.name));
        let tmp = self.dir.join(format!("{}.json.tmp", spec.name));
        let text = serde_json::to_vec_pretty(spec).map_err(|e| Error::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        {
            let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&text).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        let d = std::fs::File::open(&self.dir).map_err(io_err(&self.dir))?;
        d.sync_all().map_err(io_err(&self.dir))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<DatasetSpec>>> {
        self.datasets.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads every `*.yaml`/`*.yml` descriptor in `dir` and registers it.
    pub fn load_descriptors(&self, dir: &Path) -> Result<Vec<Arc<DatasetSpec>>> {
        let mut out = Vec::new();
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
            let spec = DatasetSpec::from_yaml(&text).map_err(|e| Error::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            out.push(self.register(spec)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, extra: &str) -> DatasetSpec {
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
    fn the_example_descriptors_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Catalog::open(dir.path()).expect("open");
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/datasets");
        let loaded = c.load_descriptors(&examples).expect("examples are valid");
        assert!(
            loaded
                .iter()
                .any(|s| s.name == "auctions" && s.tenant() == Some("client_id") && s.rollups.len() == 1)
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
