//! Scan accounting over time: bytes read by queries, per dataset and calendar month (UTC), kept
//! in a small JSON file so that the storage and cost report can price them. The file is written
//! at most every ten seconds (a crash loses at most that much accounting, never data).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the accounting file is rewritten while queries run.
const SAVE_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Counts {
    /// month ("2026-11") -> dataset -> bytes scanned.
    months: BTreeMap<String, BTreeMap<String, u64>>,
    /// month -> dataset -> bytes of those read from the infrequent tier.
    #[serde(default)]
    retrieved: BTreeMap<String, BTreeMap<String, u64>>,
}

pub struct Usage {
    path: Option<PathBuf>,
    state: Mutex<(Counts, Option<Instant>)>,
}

impl Usage {
    /// Accounting kept in `path` (loaded if present; an unreadable file starts afresh, with a
    /// warning, since it only holds estimates).
    pub fn open(path: PathBuf) -> Self {
        let counts = match std::fs::read(&path).map(|b| serde_json::from_slice::<Counts>(&b)) {
            Ok(Ok(c)) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Counts::default(),
            other => {
                // Kept aside for a person to look at, not overwritten by the next save.
                let aside = path.with_extension("json.unreadable");
                let _ = std::fs::rename(&path, &aside);
                let error = match other {
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                    Ok(Ok(_)) => String::new(),
                };
                tracing::warn!(path = %path.display(), aside = %aside.display(), error, "scan accounting unreadable; starting afresh");
                Counts::default()
            }
        };
        Self {
            path: Some(path),
            state: Mutex::new((counts, None)),
        }
    }

    /// Accounting in memory only.
    pub fn in_memory() -> Self {
        Self {
            path: None,
            state: Mutex::new((Counts::default(), None)),
        }
    }

    /// Adds a query's bytes per dataset to `month` ("YYYY-MM").
    pub fn record(&self, month: &str, by_dataset: &BTreeMap<String, u64>) {
        self.add(month, by_dataset, false);
    }

    /// Adds a query's bytes read from the infrequent tier, per dataset.
    pub fn record_retrieved(&self, month: &str, by_dataset: &BTreeMap<String, u64>) {
        self.add(month, by_dataset, true);
    }

    fn add(&self, month: &str, by_dataset: &BTreeMap<String, u64>, retrieved: bool) {
        if by_dataset.values().all(|b| *b == 0) {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let counts = if retrieved {
            &mut st.0.retrieved
        } else {
            &mut st.0.months
        };
        let m = counts.entry(month.to_string()).or_default();
        for (d, b) in by_dataset {
            *m.entry(d.clone()).or_default() += b;
        }
        if st.1.is_none_or(|t| t.elapsed() >= SAVE_EVERY) {
            st.1 = Some(Instant::now());
            self.save(&st.0);
        }
    }

    /// Writes the file now (for example at shutdown).
    pub fn flush(&self) {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.save(&st.0);
    }

    fn save(&self, counts: &Counts) {
        let Some(path) = &self.path else { return };
        let tmp = path.with_extension("json.tmp");
        let res = serde_json::to_vec_pretty(counts)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, path)
            });
        if let Err(e) = res {
            tracing::warn!(path = %path.display(), error = %e, "cannot save scan accounting");
        }
    }

    /// Bytes scanned in `month` per dataset.
    pub fn month(&self, month: &str) -> BTreeMap<String, u64> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0.months.get(month).cloned().unwrap_or_default()
    }

    /// Bytes read from the infrequent tier in `month` per dataset.
    pub fn retrieved(&self, month: &str) -> BTreeMap<String, u64> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0.retrieved.get(month).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_month_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("scans.json");
        let u = Usage::open(path.clone());
        u.record("2026-11", &[("a".to_string(), 10), ("b".to_string(), 5)].into());
        u.record("2026-11", &[("a".to_string(), 1)].into());
        u.record("2026-12", &[("a".to_string(), 7)].into());
        u.record_retrieved("2026-12", &[("a".to_string(), 3)].into());
        assert_eq!(u.month("2026-11"), [("a".to_string(), 11), ("b".to_string(), 5)].into());
        u.flush();
        let again = Usage::open(path.clone());
        assert_eq!(again.month("2026-12"), [("a".to_string(), 7)].into());
        assert_eq!(again.retrieved("2026-12"), [("a".to_string(), 3)].into());
        std::fs::write(&path, b"{not json").expect("corrupt");
        assert!(Usage::open(path.clone()).month("2026-11").is_empty());
        assert!(
            path.with_extension("json.unreadable").exists(),
            "the unreadable file is kept aside"
        );
    }
}
