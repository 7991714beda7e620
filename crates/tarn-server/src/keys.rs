//! Read keys for the rollup API. A key file (`tarn serve --read-keys FILE`) lists keys by the
//! SHA-256 of their secret, each scoped to one tenant (or `*` for every tenant); `tarn keys
//! new` makes a secret and prints its entry. With a key file, every rollup read needs
//! `Authorization: Bearer <secret>` and sees only its tenant's rows; without one, the rollup
//! API is open like the rest of the API (which listens on loopback by default).

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use sha2::Digest as _;

/// One read key as written in the key file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadKey {
    /// A label for logs and the audit of who read what.
    pub name: String,
    /// Lowercase hex SHA-256 of the secret.
    pub sha256: String,
    /// The only tenant the key may read, or `*` for all.
    pub tenant: String,
    /// The most bytes one SQL query with this key may scan (refused before it runs, with the
    /// estimate). Only `*` keys run SQL. Absent: the server's `--query-bytes-max`.
    #[serde(default)]
    pub query_bytes_max: Option<u64>,
}

/// Who runs a SQL query and how much it may scan.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlCaller {
    /// The key's name; `None` without a key.
    pub key: Option<String>,
    /// The key's own budget, if it has one.
    pub bytes_max: Option<u64>,
}

/// Why a SQL request was refused.
#[derive(Debug, PartialEq)]
pub enum SqlDenied {
    /// A key tarn does not know.
    Unknown,
    /// A tenant's key: it reads its rollups only (SQL would see every tenant).
    TenantKey { key: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    version: u32,
    keys: Vec<ReadKey>,
}

/// The loaded keys.
#[derive(Debug, Clone, Default)]
pub struct ReadKeys {
    keys: Vec<ReadKey>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(secret: &str) -> String {
    hex(&sha2::Sha256::digest(secret.as_bytes()))
}

/// What a request may read.
#[derive(Debug, Clone, PartialEq)]
pub enum Scope {
    /// No key file: everything.
    Open,
    /// A key for every tenant.
    All { key: String },
    /// A key for one tenant.
    Tenant { key: String, tenant: String },
}

impl ReadKeys {
    pub fn load(path: &Path) -> Result<ReadKeys> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading the key file {}", path.display()))?;
        let f: KeyFile =
            serde_norway::from_str(&text).with_context(|| format!("the key file {} is not valid", path.display()))?;
        if f.version != 1 {
            bail!("key file version {} is not supported (only 1)", f.version);
        }
        for k in &f.keys {
            if k.sha256.len() != 64
                || !k
                    .sha256
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            {
                bail!("key {:?}: sha256 must be 64 lowercase hex digits", k.name);
            }
            if k.tenant != "*" {
                tarn_core::name::check_tenant_value(&k.tenant)
                    .map_err(|r| anyhow::anyhow!("key {:?}: tenant {:?} {r}", k.name, k.tenant))?;
            }
        }
        Ok(ReadKeys { keys: f.keys })
    }

    /// True without a key file: the API is open.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The caller of a SQL request: anonymous without an `Authorization` header (the
    /// endpoint is open, under the server's budget), else a `*` key with its own budget.
    pub fn sql_caller(&self, authorization: Option<&str>) -> std::result::Result<SqlCaller, SqlDenied> {
        let Some(auth) = authorization else {
            return Ok(SqlCaller {
                key: None,
                bytes_max: None,
            });
        };
        let secret = auth.strip_prefix("Bearer ").map(str::trim).ok_or(SqlDenied::Unknown)?;
        let h = sha256_hex(secret);
        let k = self.keys.iter().find(|k| k.sha256 == h).ok_or(SqlDenied::Unknown)?;
        if k.tenant != "*" {
            return Err(SqlDenied::TenantKey { key: k.name.clone() });
        }
        Ok(SqlCaller {
            key: Some(k.name.clone()),
            bytes_max: k.query_bytes_max,
        })
    }

    /// The scope of a request's `Authorization` header; None when a key is needed and the
    /// header does not carry a known one.
    pub fn scope(&self, authorization: Option<&str>) -> Option<Scope> {
        if self.keys.is_empty() {
            return Some(Scope::Open);
        }
        let secret = authorization?.strip_prefix("Bearer ")?.trim();
        let h = sha256_hex(secret);
        let k = self.keys.iter().find(|k| k.sha256 == h)?;
        Some(if k.tenant == "*" {
            Scope::All { key: k.name.clone() }
        } else {
            Scope::Tenant {
                key: k.name.clone(),
                tenant: k.tenant.clone(),
            }
        })
    }
}

/// `tarn keys new`: a fresh random secret and the entry to add to the key file.
pub fn new_key(name: &str, tenant: &str) -> Result<String> {
    if tenant != "*" {
        tarn_core::name::check_tenant_value(tenant).map_err(|r| anyhow::anyhow!("tenant {tenant:?} {r}"))?;
    }
    let bytes: [u8; 24] = rand::random();
    let secret = format!("tarn_rk_{}", hex(&bytes));
    Ok(format!(
        "secret (give it to the reader; it is not stored): {secret}\n\
         entry for the key file:\n  - {{ name: {name:?}, tenant: {tenant:?}, sha256: {} }}\n",
        sha256_hex(&secret)
    ))
}

/// Write keys of producers, issued by `tarn apply` for the producers a descriptor names and
/// kept in the metadata store (with files, `<data>/keys/producers.json`) as SHA-256 hashes
/// (the secret is shown once). A dataset that names producers accepts events only with one
/// of their keys.
#[derive(Debug)]
pub struct ProducerKeys {
    meta: std::sync::Arc<tarn_catalog::Meta>,
    keys: std::sync::RwLock<Vec<ProducerKey>>,
}

#[derive(Debug, Clone, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProducerKey {
    producer: String,
    sha256: String,
    created_at: String,
}

#[derive(serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProducerKeyFile {
    version: u32,
    keys: Vec<ProducerKey>,
}

/// The one document holding the producer keys.
const PRODUCER_KEYS_DOC: &str = "producers";

/// Why a write was refused.
#[derive(Debug, PartialEq)]
pub enum WriteDenied {
    /// No key, or not one tarn issued.
    Unknown,
    /// A producer's key, but not one the dataset names.
    NotAProducer { producer: String },
}

impl ProducerKeys {
    pub fn open(meta: std::sync::Arc<tarn_catalog::Meta>) -> Result<Self> {
        let keys = Self::load(&meta)?;
        Ok(Self {
            meta,
            keys: std::sync::RwLock::new(keys),
        })
    }

    fn load(meta: &tarn_catalog::Meta) -> Result<Vec<ProducerKey>> {
        let Some(body) = meta.get(tarn_catalog::Kind::ProducerKeys, PRODUCER_KEYS_DOC)? else {
            return Ok(Vec::new());
        };
        let f: ProducerKeyFile = serde_json::from_slice(&body)
            .with_context(|| format!("the producer keys in the {} are not valid", meta.describe()))?;
        if f.version != 1 {
            bail!("producer key file version {} is not supported (only 1)", f.version);
        }
        Ok(f.keys)
    }

    /// Reads the keys again (another process sharing the store may have issued or revoked
    /// some).
    pub fn refresh(&self) -> Result<()> {
        // Read under the lock: a key this process issues meanwhile is not undone by an older read.
        let mut held = self.keys.write().unwrap_or_else(|e| e.into_inner());
        *held = Self::load(&self.meta)?;
        Ok(())
    }

    pub fn has(&self, producer: &str) -> bool {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|k| k.producer == producer)
    }

    /// Issues a key for `producer` and returns its secret; the file is replaced atomically and
    /// synced before the secret is returned.
    pub fn issue(&self, producer: &str) -> Result<String> {
        tarn_core::name::check_app(producer)?;
        let bytes: [u8; 24] = rand::random();
        let secret = format!("tarn_wk_{}", hex(&bytes));
        let key = ProducerKey {
            producer: producer.to_string(),
            sha256: sha256_hex(&secret),
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        self.rewrite(move |keys| keys.push(key))?;
        Ok(secret)
    }

    /// Takes back every key of `producer`.
    pub fn revoke(&self, producer: &str) -> Result<()> {
        let producer = producer.to_string();
        self.rewrite(move |keys| keys.retain(|k| k.producer != producer))
    }

    /// Changes the keys as they are in the store, not as this process last read them (another
    /// process sharing the store may have issued or revoked some since), in one update of the
    /// store; then holds the result.
    fn rewrite(&self, change: impl FnOnce(&mut Vec<ProducerKey>) + Send + 'static) -> Result<()> {
        use tarn_catalog::Kind;
        let mut held = self.keys.write().unwrap_or_else(|e| e.into_inner());
        let result = std::sync::Arc::new(std::sync::Mutex::new(None));
        let out = result.clone();
        self.meta.update(
            Kind::ProducerKeys,
            PRODUCER_KEYS_DOC,
            Box::new(move |current| {
                let invalid = |e: serde_json::Error| tarn_catalog::Error::Corrupt {
                    path: std::path::PathBuf::from("producer keys"),
                    reason: e.to_string(),
                };
                let mut keys = match current {
                    Some(b) => serde_json::from_slice::<ProducerKeyFile>(b).map_err(invalid)?.keys,
                    None => Vec::new(),
                };
                change(&mut keys);
                let text = serde_json::to_vec_pretty(&ProducerKeyFile {
                    version: 1,
                    keys: keys.clone(),
                })
                .map_err(invalid)?;
                *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(keys);
                Ok(vec![(Kind::ProducerKeys, PRODUCER_KEYS_DOC.to_string(), text)])
            }),
        )?;
        if let Some(keys) = result.lock().unwrap_or_else(|e| e.into_inner()).take() {
            *held = keys;
        }
        Ok(())
    }

    /// Checks a write to a dataset naming `producers`: which producer the key belongs to.
    pub fn check_write(
        &self,
        producers: &[tarn_core::App],
        authorization: Option<&str>,
    ) -> std::result::Result<String, WriteDenied> {
        let secret = authorization
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(WriteDenied::Unknown)?;
        let h = sha256_hex(secret);
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let k = keys.iter().find(|k| k.sha256 == h).ok_or(WriteDenied::Unknown)?;
        if producers.iter().any(|p| p.name == k.producer) {
            Ok(k.producer.clone())
        } else {
            Err(WriteDenied::NotAProducer {
                producer: k.producer.clone(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_follow_the_key_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys.yaml");
        let text = format!(
            "version: 1\nkeys:\n  - {{ name: acme, tenant: acme, sha256: {} }}\n  - {{ name: ops, tenant: \"*\", sha256: {} }}\n",
            sha256_hex("s1"),
            sha256_hex("s2")
        );
        std::fs::write(&path, text).expect("write");
        let keys = ReadKeys::load(&path).expect("loads");
        assert_eq!(
            keys.scope(Some("Bearer s1")),
            Some(Scope::Tenant {
                key: "acme".into(),
                tenant: "acme".into()
            })
        );
        assert_eq!(keys.scope(Some("Bearer s2")), Some(Scope::All { key: "ops".into() }));
        assert_eq!(keys.scope(Some("Bearer nope")), None);
        assert_eq!(keys.scope(Some("s1")), None);
        assert_eq!(keys.scope(None), None);
        assert_eq!(ReadKeys::default().scope(None), Some(Scope::Open));
        std::fs::write(&path, "version: 1\nkeys:\n  - { name: x, tenant: acme, sha256: ABC }\n").expect("write");
        let err = ReadKeys::load(&path).expect_err("bad hash").to_string();
        assert!(err.contains("64 lowercase hex"), "{err}");
        std::fs::write(&path, "version: 1\nkeys:\n  - { name: x, tenant: ../x, sha256: abc }\n").expect("write");
        assert!(ReadKeys::load(&path).is_err());
        assert!(new_key("a", "acme").expect("key").contains("sha256: "));
        assert!(new_key("a", "../acme").is_err());
        // SQL: anonymous without a header, a `*` key with its budget, never a tenant key.
        std::fs::write(
            &path,
            format!(
                "version: 1\nkeys:\n  - {{ name: acme, tenant: acme, sha256: {} }}\n  - {{ name: analyst, tenant: \"*\", sha256: {}, query_bytes_max: 1000 }}\n",
                sha256_hex("s1"),
                sha256_hex("s2")
            ),
        )
        .expect("write");
        let keys = ReadKeys::load(&path).expect("loads");
        assert_eq!(
            keys.sql_caller(None),
            Ok(SqlCaller {
                key: None,
                bytes_max: None
            })
        );
        assert_eq!(
            keys.sql_caller(Some("Bearer s2")),
            Ok(SqlCaller {
                key: Some("analyst".into()),
                bytes_max: Some(1000)
            })
        );
        assert_eq!(
            keys.sql_caller(Some("Bearer s1")),
            Err(SqlDenied::TenantKey { key: "acme".into() })
        );
        assert_eq!(keys.sql_caller(Some("Bearer nope")), Err(SqlDenied::Unknown));
    }

    /// Two processes sharing a PostgreSQL store, neither reading the other's changes first:
    /// an issue never drops the other's key, and a revoke is never undone.
    #[test]
    fn keys_changed_by_two_processes_stay_as_both_left_them() {
        let Ok(url) = std::env::var("TARN_TEST_POSTGRES") else {
            let msg = "TARN_TEST_POSTGRES is not set: this test needs PostgreSQL (scripts/test sets it)";
            assert!(std::env::var("CI").is_err(), "{msg}");
            eprintln!("skipped: {msg}");
            return;
        };
        let schema = format!("it_keys_{}", std::process::id());
        let open = || {
            let meta = tarn_catalog::Meta::postgres(&url, &schema).expect("meta");
            ProducerKeys::open(std::sync::Arc::new(meta)).expect("keys")
        };
        let (a, b) = (open(), open());
        a.issue("one").expect("issue");
        b.issue("two").expect("issue");
        a.revoke("one").expect("revoke");
        b.issue("three").expect("issue");
        let c = open();
        assert!(!c.has("one"), "the revoke stands");
        assert!(c.has("two") && c.has("three"), "no issue lost");
        let _ = std::process::Command::new("psql")
            .args([url.as_str(), "-qc"])
            .arg(format!("DROP SCHEMA {schema} CASCADE"))
            .output();
    }

    #[test]
    fn producer_keys_are_kept_hashed_and_scoped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = || std::sync::Arc::new(tarn_catalog::Meta::files(dir.path().join("catalog"), dir.path()));
        let keys = ProducerKeys::open(meta()).expect("open");
        assert!(!keys.has("bids"));
        let secret = keys.issue("bids").expect("issue");
        let other = keys.issue("clicks").expect("issue");
        let text = std::fs::read_to_string(dir.path().join("producers.json")).expect("file");
        assert!(!text.contains(&secret) && text.contains(&sha256_hex(&secret)));
        let keys = ProducerKeys::open(meta()).expect("reopen");
        assert!(keys.has("bids") && keys.has("clicks"));
        let bids = [tarn_core::App {
            name: "bids".into(),
            description: None,
        }];
        assert_eq!(
            keys.check_write(&bids, Some(&format!("Bearer {secret}"))),
            Ok("bids".into())
        );
        assert_eq!(
            keys.check_write(&bids, Some(&format!("Bearer {other}"))),
            Err(WriteDenied::NotAProducer {
                producer: "clicks".into()
            })
        );
        assert_eq!(keys.check_write(&bids, Some("Bearer nope")), Err(WriteDenied::Unknown));
        assert_eq!(keys.check_write(&bids, None), Err(WriteDenied::Unknown));
        assert!(keys.issue("Bad Name").is_err());
        keys.revoke("bids").expect("revoke");
        assert!(!keys.has("bids") && keys.has("clicks"));
        assert_eq!(
            keys.check_write(&bids, Some(&format!("Bearer {secret}"))),
            Err(WriteDenied::Unknown)
        );
    }
}
