//! Where the lake's objects live: a local directory (the default) or a prefix in a bucket of
//! an S3-compatible store (`--lake s3://bucket/prefix`).
//!
//! The S3 connection is configured the way AWS tools are: the standard environment variables
//! (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, ...) first, then the profile
//! (`AWS_PROFILE`, else `default`) of the shared files `~/.aws/credentials` and `~/.aws/config`
//! (or `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE`). [`S3Settings::resolve`] is pure, so
//! the precedence is tested without touching the process environment.
//!
//! Delta commits on S3 are safe with several writers only if the store refuses a second
//! create of the same key (`If-None-Match: *`): delta-rs writes each commit entry that way, and
//! a store that ignores the header lets two writers overwrite each other's commit. [`probe`]
//! checks it before the lake is used, and a store that fails it is refused.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deltalake::DeltaResult;
use deltalake::logstore::object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use deltalake::logstore::object_store::path::Path as ObjectPath;
use deltalake::logstore::object_store::{self, ObjectStore, ObjectStoreExt as _, PutMode, PutPayload};
use deltalake::logstore::{LogStore, LogStoreFactory, ObjectStoreFactory, ObjectStoreRef, StorageConfig};
use url::Url;

mod serial;

pub use serial::{CommitLock, LeaseLock, share_commit_lock};

use crate::{Error, Result};

/// How long one request to the store may take, retries included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The S3 connection settings, resolved from the environment and the shared AWS files.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    /// The profile the files were read for.
    pub profile: String,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "***"))
            .field("session_token", &self.session_token.as_ref().map(|_| "***"))
            .field("profile", &self.profile)
            .finish()
    }
}

impl S3Settings {
    /// Resolves the settings: an environment variable wins over the profile's value in
    /// `credentials` (for keys) or `config` (for the region and endpoint). `env` reads one
    /// variable; the files are given as their text, absent when there is no such file.
    pub fn resolve(env: &dyn Fn(&str) -> Option<String>, credentials: Option<&str>, config: Option<&str>) -> Self {
        let var = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let profile = var("AWS_PROFILE")
            .or_else(|| var("AWS_DEFAULT_PROFILE"))
            .unwrap_or_else(|| "default".into());
        let creds = credentials.map(|t| ini_section(t, &profile)).unwrap_or_default();
        // In the config file a profile other than the default is headed `[profile NAME]`.
        let conf = config
            .map(|t| {
                let named = ini_section(t, &format!("profile {profile}"));
                if named.is_empty() {
                    ini_section(t, &profile)
                } else {
                    named
                }
            })
            .unwrap_or_default();
        let from_files = |k: &str| creds.get(k).or_else(|| conf.get(k)).cloned();
        // Keys come from one source as a unit, as AWS tools take them: the environment when it
        // names a key, the profile otherwise (a profile's session token never pairs with keys
        // from the environment).
        let (access_key_id, secret_access_key, session_token) = match var("AWS_ACCESS_KEY_ID") {
            Some(k) => (Some(k), var("AWS_SECRET_ACCESS_KEY"), var("AWS_SESSION_TOKEN")),
            None => (
                from_files("aws_access_key_id"),
                from_files("aws_secret_access_key"),
                from_files("aws_session_token"),
            ),
        };
        Self {
            endpoint: var("AWS_ENDPOINT_URL_S3")
                .or_else(|| var("AWS_ENDPOINT_URL"))
                .or_else(|| var("AWS_ENDPOINT"))
                .or_else(|| conf.get("endpoint_url").cloned()),
            region: var("AWS_REGION")
                .or_else(|| var("AWS_DEFAULT_REGION"))
                .or_else(|| conf.get("region").cloned()),
            access_key_id,
            secret_access_key,
            session_token,
            profile,
        }
    }

    /// [`S3Settings::resolve`] over the process environment and the shared files in `home`.
    pub fn from_environment() -> Self {
        let env = |k: &str| std::env::var(k).ok();
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let file = |var: &str, default: &str| -> Option<String> {
            let path = env(var)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".aws").join(default)))?;
            std::fs::read_to_string(path).ok()
        };
        let credentials = file("AWS_SHARED_CREDENTIALS_FILE", "credentials");
        let config = file("AWS_CONFIG_FILE", "config");
        Self::resolve(&env, credentials.as_deref(), config.as_deref())
    }

    /// A client for one bucket. Commits need `If-None-Match` on create, which
    /// `S3ConditionalPut::ETagMatch` sends; [`probe`] checks that the store honours it.
    pub fn store(&self, bucket: &str) -> Result<Arc<dyn ObjectStore>> {
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_region(self.region.clone().unwrap_or_else(|| "us-east-1".into()))
            .with_retry(object_store::RetryConfig {
                max_retries: 4,
                retry_timeout: REQUEST_TIMEOUT,
                ..Default::default()
            });
        if let Some(e) = &self.endpoint {
            // An endpoint written with http:// is a plain-HTTP server on purpose.
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        if let (Some(k), Some(s)) = (&self.access_key_id, &self.secret_access_key) {
            b = b.with_access_key_id(k).with_secret_access_key(s);
        }
        if let Some(t) = &self.session_token {
            b = b.with_token(t);
        }
        let store = b
            .build()
            .map_err(|e| Error::Refused(format!("S3 bucket {bucket}: {e}")))?;
        Ok(Arc::new(store))
    }
}

/// The `key = value` pairs of one `[section]` of an INI text (the shape of the AWS shared
/// files). Comments (`#`, `;`) and indented sub-keys are skipped; keys are lowercased.
pub fn ini_section(text: &str, section: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut inside = false;
    for line in text.lines() {
        let indented = line.starts_with([' ', '\t']);
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
            continue;
        }
        if !inside || indented {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim();
            if !v.is_empty() {
                out.insert(k.trim().to_ascii_lowercase(), v.to_string());
            }
        }
    }
    out
}

/// A lake location given on the command line: `s3://bucket[/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// The key prefix with a trailing `/`, or empty.
    pub prefix: String,
}

impl S3Location {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::Refused(format!("--lake {s}: {why} (expected s3://BUCKET[/PREFIX])"));
        let rest = s.strip_prefix("s3://").ok_or_else(|| bad("not an s3:// URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.');
        if !bucket_ok {
            return Err(bad("a bucket name is 3 to 63 lowercase letters, digits, '-' or '.'"));
        }
        let prefix = prefix.trim_matches('/');
        let segment_ok = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_.=".contains(&c))
        };
        if !prefix.is_empty() && !prefix.split('/').all(segment_ok) {
            return Err(bad("prefix segments are letters, digits, '-', '_', '.' or '='"));
        }
        Ok(Self {
            bucket: bucket.to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        })
    }

    /// `s3://bucket/prefix/`, the base that relative lake paths join onto.
    pub fn url(&self) -> Url {
        // Checked by `parse`: the bucket and prefix are URL-safe.
        Url::parse(&format!("s3://{}/{}", self.bucket, self.prefix)).unwrap_or_else(|_| unreachable!())
    }
}

/// A lake in a bucket: the store (rooted at the bucket) and the key prefix of the lake.
#[derive(Clone)]
pub struct Remote {
    pub location: S3Location,
    pub store: Arc<dyn ObjectStore>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote({})", self.location.url())
    }
}

impl Remote {
    /// The key of a path relative to the lake root.
    pub fn key(&self, rel: &str) -> ObjectPath {
        ObjectPath::from(format!("{}{}", self.location.prefix, rel.trim_start_matches('/')))
    }
}

/// Checks that the bucket answers and refuses a second create of one key, so that two
/// writers can never overwrite each other's Delta commit. Leaves nothing behind.
pub async fn probe(remote: &Remote) -> Result<()> {
    let url = remote.location.url();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let key = remote.key(&format!("_tarn/probe-{}-{nanos}", std::process::id()));
    let create = || async {
        let opts = object_store::PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let put = remote
            .store
            .put_opts(&key, PutPayload::from_static(b"tarn conditional-put probe"), opts);
        tokio::time::timeout(REQUEST_TIMEOUT, put).await
    };
    let cannot = |e: String| Error::Refused(format!("the lake at {url} cannot be written: {e}"));
    match create().await {
        Err(_) => return Err(cannot(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))),
        Ok(Err(e)) => return Err(cannot(e.to_string())),
        Ok(Ok(_)) => {}
    }
    let second = create().await;
    let _ = remote.store.delete(&key).await;
    match second {
        Ok(Err(object_store::Error::AlreadyExists { .. })) => Ok(()),
        Ok(Ok(_)) => Err(Error::Refused(format!(
            "the store behind {url} ignored a conditional put (If-None-Match: *): it let a key be \
             created twice, so two writers could overwrite each other's Delta commits. Use a store \
             that supports conditional writes (AWS S3, MinIO, Cloudflare R2, s3s-fs)"
        ))),
        Ok(Err(e)) => Err(cannot(format!("the second conditional put failed unexpectedly: {e}"))),
        Err(_) => Err(cannot(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))),
    }
}

/// Makes delta-rs open `s3://` tables with stores built from `settings` (one client per
/// bucket, shared) and commit through its default log store, whose commits are conditional
/// puts; returns the shared client of `bucket`, for the lake's own objects. Process-wide, as
/// delta-rs's registries are; the last call's settings win.
pub fn register_s3(settings: &S3Settings, bucket: &str) -> Result<Arc<dyn ObjectStore>> {
    let factory = Arc::new(S3Factory {
        settings: settings.clone(),
        stores: Mutex::default(),
    });
    let store = factory.bucket_store(bucket)?;
    install(factory);
    Ok(store)
}

/// Makes delta-rs open tables in `bucket` through `store` (a test's own store).
#[cfg(test)]
pub(crate) fn register_s3_store(bucket: &str, store: Arc<dyn ObjectStore>) {
    install(Arc::new(S3Factory {
        settings: S3Settings::default(),
        stores: Mutex::new(HashMap::from([(bucket.to_string(), store)])),
    }));
}

/// Puts `factory` in delta-rs's registries for the `s3://` scheme.
fn install(factory: Arc<S3Factory>) {
    let scheme = Url::parse("s3://").unwrap_or_else(|_| unreachable!());
    deltalake::logstore::object_store_factories().insert(scheme.clone(), factory.clone());
    deltalake::logstore::logstore_factories().insert(scheme, factory);
}

struct S3Factory {
    settings: S3Settings,
    stores: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
}

impl S3Factory {
    fn bucket_store(&self, bucket: &str) -> Result<Arc<dyn ObjectStore>> {
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = stores.get(bucket) {
            return Ok(s.clone());
        }
        let s = self.settings.store(bucket)?;
        stores.insert(bucket.to_string(), s.clone());
        Ok(s)
    }
}

impl ObjectStoreFactory for S3Factory {
    fn parse_url_opts(&self, url: &Url, _config: &StorageConfig) -> DeltaResult<(ObjectStoreRef, ObjectPath)> {
        let bucket = url
            .host_str()
            .ok_or_else(|| deltalake::DeltaTableError::InvalidTableLocation(url.to_string()))?;
        let store = self
            .bucket_store(bucket)
            .map_err(|e| deltalake::DeltaTableError::Generic(e.to_string()))?;
        let path = ObjectPath::from_url_path(url.path())
            .map_err(|e| deltalake::DeltaTableError::InvalidTableLocation(format!("{url}: {e}")))?;
        Ok((store, path))
    }
}

impl LogStoreFactory for S3Factory {
    fn with_options(
        &self,
        prefixed_store: ObjectStoreRef,
        root_store: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> DeltaResult<Arc<dyn LogStore>> {
        Ok(Arc::new(serial::SerialCommits {
            inner: deltalake::logstore::default_logstore(prefixed_store, root_store, location, options),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k: &str| m.get(k).cloned()
    }

    const CREDENTIALS: &str = "\
[default]
aws_access_key_id = AKDEFAULT
aws_secret_access_key = secretdefault

# a comment
[lake]
aws_access_key_id=AKLAKE
aws_secret_access_key = secretlake
aws_session_token = tok
";

    const CONFIG: &str = "\
[default]
region = eu-west-1
[profile lake]
region = eu-central-1
endpoint_url = http://127.0.0.1:8014
s3 =
  addressing_style = path
";

    #[test]
    fn files_give_the_default_profile() {
        let s = S3Settings::resolve(&env(&[]), Some(CREDENTIALS), Some(CONFIG));
        assert_eq!(s.access_key_id.as_deref(), Some("AKDEFAULT"));
        assert_eq!(s.secret_access_key.as_deref(), Some("secretdefault"));
        assert_eq!(s.region.as_deref(), Some("eu-west-1"));
        assert_eq!(s.endpoint, None);
        assert_eq!(s.session_token, None);
    }

    #[test]
    fn a_named_profile_reads_its_profile_section_of_the_config() {
        let s = S3Settings::resolve(&env(&[("AWS_PROFILE", "lake")]), Some(CREDENTIALS), Some(CONFIG));
        assert_eq!(s.access_key_id.as_deref(), Some("AKLAKE"));
        assert_eq!(s.session_token.as_deref(), Some("tok"));
        assert_eq!(s.region.as_deref(), Some("eu-central-1"));
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:8014"));
        assert_eq!(s.profile, "lake");
    }

    #[test]
    fn environment_variables_win_over_the_files() {
        let e = env(&[
            ("AWS_PROFILE", "lake"),
            ("AWS_ACCESS_KEY_ID", "AKENV"),
            ("AWS_SECRET_ACCESS_KEY", "secretenv"),
            ("AWS_REGION", "us-west-2"),
            ("AWS_ENDPOINT_URL", "http://localhost:9000"),
            ("AWS_DEFAULT_REGION", "ignored-because-AWS_REGION-is-set"),
        ]);
        let s = S3Settings::resolve(&e, Some(CREDENTIALS), Some(CONFIG));
        assert_eq!(s.access_key_id.as_deref(), Some("AKENV"));
        assert_eq!(s.secret_access_key.as_deref(), Some("secretenv"));
        assert_eq!(s.region.as_deref(), Some("us-west-2"));
        assert_eq!(s.endpoint.as_deref(), Some("http://localhost:9000"));
        // Keys from the environment come as a unit: the profile's session token does not join them.
        assert_eq!(s.session_token, None);
    }

    #[test]
    fn no_files_and_no_variables_leave_everything_unset() {
        let s = S3Settings::resolve(&env(&[("AWS_REGION", "  ")]), None, None);
        assert_eq!(
            s,
            S3Settings {
                profile: "default".into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn secrets_are_not_printed() {
        let s = S3Settings::resolve(&env(&[]), Some(CREDENTIALS), Some(CONFIG));
        assert!(!format!("{s:?}").contains("secretdefault"));
    }

    fn remote(store: Arc<dyn ObjectStore>) -> Remote {
        Remote {
            location: S3Location::parse("s3://lake/probe-test").expect("location"),
            store,
        }
    }

    #[tokio::test]
    async fn the_probe_passes_a_store_that_refuses_a_second_create_and_leaves_nothing() {
        use futures::StreamExt as _;
        let store = Arc::new(object_store::memory::InMemory::new());
        probe(&remote(store.clone())).await.expect("an honest store passes");
        assert_eq!(store.list(None).count().await, 0, "the probe cleaned up");
    }

    #[tokio::test]
    async fn the_probe_refuses_a_store_that_ignores_conditional_puts() {
        let store = Arc::new(crate::testkit::Faulty {
            ignore_conditions: true,
            ..Default::default()
        });
        let e = probe(&remote(store)).await.expect_err("refused");
        let msg = e.to_string();
        assert!(msg.contains("ignored a conditional put"), "{msg}");
        assert!(msg.contains("s3://lake/probe-test/"), "{msg}");
    }

    #[test]
    fn lake_locations_parse_and_refuse_bad_input() {
        let l = S3Location::parse("s3://tarn-lake/prod/events/").expect("valid");
        assert_eq!(l.bucket, "tarn-lake");
        assert_eq!(l.prefix, "prod/events/");
        assert_eq!(l.url().as_str(), "s3://tarn-lake/prod/events/");
        let bare = S3Location::parse("s3://lake").expect("valid");
        assert_eq!(bare.prefix, "");
        assert_eq!(bare.url().as_str(), "s3://lake/");
        for bad in [
            "lake",
            "file:///tmp",
            "s3://",
            "s3://UPPER",
            "s3://ab",
            "s3://b/../x",
            "s3://b/a b",
            "s3://b/a//c",
        ] {
            assert!(S3Location::parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
