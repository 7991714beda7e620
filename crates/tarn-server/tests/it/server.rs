//! Starting and stopping the real `tarn` process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub url: String,
    pub data_dir: PathBuf,
    /// The PostgreSQL listener's address (`host:port`), when it is on.
    pub pg: Option<String>,
}

impl Server {
    /// Starts `tarn serve` on `data_dir` with extra arguments and waits for its listening line.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Self::start_env(data_dir, extra, &[])
    }

    /// [`Server::start`] with environment variables set for the process.
    pub fn start_env(data_dir: &Path, extra: &[&str], env: &[(String, String)]) -> Server {
        // A free port for the PostgreSQL listener too, unless the test sets it.
        let pg = if extra.contains(&"--pg") {
            &[][..]
        } else {
            &["--pg", "127.0.0.1:0"][..]
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_tarn"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--http", "127.0.0.1:0"])
            .args(pg)
            .args(extra)
            .env("TARN_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tarn");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining so the child never blocks on a full pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("tarn printed its address");
        let url = line
            .strip_prefix("tarn listening on ")
            .expect("listening line")
            .to_string();
        let pg = rx
            .recv_timeout(Duration::from_millis(if extra.contains(&"off") { 200 } else { 10_000 }))
            .ok()
            .and_then(|l| l.strip_prefix("tarn postgres on ").map(str::to_string));
        Server {
            child,
            url,
            data_dir: data_dir.to_path_buf(),
            pg,
        }
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The flags that turn every kind of automatic compaction off.
pub const AUTO_COMPACTION_OFF: [&str; 6] = [
    "--compact-trigger-files",
    "0",
    "--compact-every-s",
    "0",
    "--compact-quiet-s",
    "0",
];

/// A metric of `/metrics`, summed over its labelled series (0 when it has none).
pub async fn metric_total(c: &reqwest::Client, url: &str, name: &str) -> u64 {
    let text = c
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter(|r| r.starts_with(' ') || r.starts_with('{'))
        .filter_map(|r| r.rsplit(' ').next()?.trim().parse::<u64>().ok())
        .sum()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

pub async fn post_events(c: &reqwest::Client, url: &str, dataset: &str, body: String) -> (u16, serde_json::Value) {
    let r = c
        .post(format!("{url}/v1/datasets/{dataset}/events"))
        .body(body)
        .send()
        .await
        .expect("post");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// GETs a URL and returns its JSON answer.
pub async fn get_json(c: &reqwest::Client, url: &str) -> serde_json::Value {
    c.get(url).send().await.expect("get").json().await.expect("json")
}

pub async fn sql(c: &reqwest::Client, url: &str, q: &str) -> (u16, serde_json::Value) {
    let r = c
        .post(format!("{url}/v1/query"))
        .json(&serde_json::json!({"sql": q, "row_limit": 1_000_000}))
        .send()
        .await
        .expect("query");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json"))
}

/// Polls a query until `done` accepts its answer, for at most `secs` seconds.
pub async fn wait_for(
    c: &reqwest::Client,
    url: &str,
    q: &str,
    secs: u64,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let (status, v) = sql(c, url, q).await;
        if status == 200 && done(&v) {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out waiting on {q}: last answer {status} {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts `tarn serve` on `dir/data` with the auctions descriptor (written to `dir/datasets`)
/// and delivery batches closing after 50 ms, plus `extra` flags.
pub fn start_auctions(dir: &Path, extra: &[&str]) -> Server {
    start_auctions_env(dir, extra, &[])
}

/// [`start_auctions`] with environment variables set for the process.
pub fn start_auctions_env(dir: &Path, extra: &[&str], env: &[(String, String)]) -> Server {
    let ds = dir.join("datasets");
    write_descriptor(&ds);
    let mut args = vec!["--datasets", ds.to_str().expect("utf8"), "--batch-age-ms", "50"];
    args.extend_from_slice(extra);
    Server::start_env(&dir.join("data"), &args, env)
}

pub fn write_descriptor(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(
        dir.join("auctions.yaml"),
        r#"version: 1
name: auctions
description: ad auctions
fields:
  - { name: event_id, type: string, required: true }
  - { name: ts, type: timestamp, required: true }
  - { name: client_id, type: string, required: true }
  - { name: bidder, type: string }
  - { name: cpm, type: float64, description: price per thousand impressions }
event_time: ts
event_id: event_id
partitioning: { tenant: client_id }
"#,
    )
    .expect("write descriptor");
}

/// The NATS server of the tests (`TARN_TEST_NATS`, set by `scripts/test`), or `None` with the
/// reason printed outside CI; under CI a missing server fails the test.
pub fn nats_server() -> Option<String> {
    match std::env::var("TARN_TEST_NATS") {
        Ok(url) => Some(url.trim_end_matches('/').to_string()),
        Err(_) => {
            let msg = "TARN_TEST_NATS is not set: this test needs NATS with JetStream \
                       (scripts/test starts it and sets nats://127.0.0.1:4222)";
            assert!(std::env::var("CI").is_err(), "{msg}");
            eprintln!("skipped: {msg}");
            None
        }
    }
}

/// A namespace of one test on the shared NATS server.
pub fn nats_namespace(test: &str) -> String {
    format!("it_{test}_{}", std::process::id())
}

/// Deletes the streams and offsets bucket of a test's namespace.
pub async fn nats_cleanup(url: &str, ns: &str) {
    tarn_log::delete_namespace(url, ns).await.expect("cleanup");
}

/// The S3-compatible server of the tests (`TARN_TEST_S3`, set by `scripts/test` as
/// `http://ACCESS_KEY:SECRET@HOST:PORT/BUCKET`).
#[derive(Debug, Clone)]
pub struct S3 {
    pub endpoint: String,
    pub access_key: String,
    pub secret: String,
    pub bucket: String,
}

impl S3 {
    /// The AWS variables that point tarn (or the deltalake package) at this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", &self.access_key),
            ("AWS_SECRET_ACCESS_KEY", &self.secret),
            ("AWS_REGION", "us-east-1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// A lake of its own for one test: `s3://BUCKET/it-<test>-<pid>-<nanos>`.
    pub fn lake(&self, test: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        format!("s3://{}/it-{test}-{}-{nanos}", self.bucket, std::process::id())
    }
}

/// The S3-compatible server, or `None` with the reason printed outside CI; under CI a missing
/// server fails the test.
pub fn s3_server() -> Option<S3> {
    let Ok(raw) = std::env::var("TARN_TEST_S3") else {
        let msg = "TARN_TEST_S3 is not set: this test needs an S3-compatible server \
                   (scripts/test builds and starts s3s-fs on 127.0.0.1:8014)";
        assert!(std::env::var("CI").is_err(), "{msg}");
        eprintln!("skipped: {msg}");
        return None;
    };
    let url = url::Url::parse(&raw).expect("TARN_TEST_S3 is http://KEY:SECRET@HOST:PORT/BUCKET");
    let bucket = url.path().trim_matches('/').to_string();
    assert!(!bucket.is_empty(), "TARN_TEST_S3 names no bucket: {raw}");
    Some(S3 {
        endpoint: format!(
            "{}://{}:{}",
            url.scheme(),
            url.host_str().expect("host"),
            url.port_or_known_default().expect("port")
        ),
        access_key: url.username().to_string(),
        secret: url.password().unwrap_or_default().to_string(),
        bucket,
    })
}

/// The PostgreSQL server of the tests (`TARN_TEST_POSTGRES`, set by `scripts/test`), or `None`
/// with the reason printed outside CI; under CI a missing server fails the test.
pub fn pg_url() -> Option<String> {
    match std::env::var("TARN_TEST_POSTGRES") {
        Ok(u) => Some(u),
        Err(_) => {
            let msg = "TARN_TEST_POSTGRES is not set: this test needs PostgreSQL \
                       (scripts/test sets postgres://postgres@127.0.0.1:5432/test)";
            assert!(std::env::var("CI").is_err(), "{msg}");
            eprintln!("skipped: {msg}");
            None
        }
    }
}

/// Drops a test's metadata schema.
pub fn drop_schema(pg: &str, schema: &str) {
    let _ = Command::new("psql")
        .args([pg, "-qc"])
        .arg(format!("DROP SCHEMA {schema} CASCADE"))
        .output();
}

/// Runs a `tarn` command against the server at `url`: (success, stdout, stderr).
pub fn tarn_cli(url: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tarn"))
        .args(args)
        .args(["--server", url])
        .output()
        .expect("run tarn");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a `tarn` command against the server at `url` that must succeed; returns its stdout.
pub fn tarn_ok(url: &str, args: &[&str]) -> String {
    let (ok, out, err) = tarn_cli(url, args);
    assert!(ok, "tarn {args:?}: {err}");
    out
}

/// A NATS namespace, a lake in the S3-compatible server and a PostgreSQL schema of one test's
/// own, for processes that share all three.
pub struct Shared {
    nats: String,
    ns: String,
    pg: String,
    pub lake: String,
    pub stream: String,
    pub schema: String,
    /// The AWS variables that reach the S3-compatible server.
    pub env: Vec<(String, String)>,
}

impl Shared {
    /// `None` (with the reason; a failure under CI) when a service is missing.
    pub fn new(test: &str) -> Option<Self> {
        let s3 = s3_server()?;
        let nats = nats_server()?;
        let pg = pg_url()?;
        let ns = nats_namespace(test);
        Some(Self {
            stream: format!("{nats}/{ns}"),
            schema: format!("it_{test}_{}", std::process::id()),
            lake: s3.lake(test),
            env: s3.env(),
            nats,
            ns,
            pg,
        })
    }

    /// The `tarn serve` arguments naming the three.
    pub fn args(&self) -> [&str; 8] {
        [
            "--lake",
            &self.lake,
            "--stream",
            &self.stream,
            "--meta",
            &self.pg,
            "--meta-schema",
            &self.schema,
        ]
    }

    /// Removes the namespace's streams and the schema.
    pub async fn cleanup(&self) {
        nats_cleanup(&self.nats, &self.ns).await;
        drop_schema(&self.pg, &self.schema);
    }
}
