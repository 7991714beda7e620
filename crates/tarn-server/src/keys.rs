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
    }
}
