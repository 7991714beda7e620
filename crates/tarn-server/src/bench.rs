//! `tarn bench`: the end-to-end ingestion benchmark. It generates realistic ad-auction events,
//! starts a fresh `tarn serve` (this same binary) on a scratch data directory, posts the events
//! from concurrent keep-alive clients, and reports throughput to durable ack, ack latency at
//! half the peak rate, time from the last ack until every row is queryable, the server's peak
//! RSS, bytes on disk, and the table at rest once the server's own compaction has merged its
//! partitions. With `--duckdb` it runs `bench/duckdb_convert.py` on the same events
//! and prints the ratios.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Events to generate.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Events per request.
    #[arg(long, default_value_t = 5_000)]
    pub batch: usize,
    /// The rate of the latency phase, in events/s (default: half the rate to ack measured in
    /// the same run). A fixed rate makes the latency of runs of different builds comparable:
    /// the measured peak varies from run to run, and the latency with it.
    #[arg(long)]
    pub paced_rate: Option<f64>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Scratch directory (wiped first).
    #[arg(long, default_value = "bench-data")]
    pub dir: PathBuf,
    /// Also run DuckDB on the same events (needs `python3 -m pip install duckdb`).
    #[arg(long)]
    pub duckdb: bool,
    /// Days of event time the events span.
    #[arg(long, default_value_t = 3)]
    pub days: u32,
    /// Customers (client_id values); their traffic is skewed (Zipf-like).
    #[arg(long, default_value_t = 200)]
    pub customers: u32,
    /// Instead: time one request's preparation (splitting, checks, batch building and
    /// encoding) of `--batch` events, best of 30 passes, beside serde_json parsing the same
    /// events into trees; no server runs.
    #[arg(long)]
    pub prepare: bool,
    /// Instead: the compaction benchmark, over one partition of `--files` small files of
    /// `--batch` events each.
    #[arg(long)]
    pub compaction: bool,
    /// Small files in the compaction benchmark.
    #[arg(long, default_value_t = 1_000)]
    pub files: usize,
    /// Instead: the rollup benchmark: read latency of a 93-day hourly series and of a top-10
    /// by bidder while ingestion runs, beside the same answers computed by SQL.
    #[arg(long)]
    pub rollups: bool,
    /// Also time eight analytics queries in tarn and in DuckDB over the same Parquet files
    /// (needs `--duckdb`).
    #[arg(long)]
    pub queries: bool,
    /// Run tarn with its stream on this NATS server (`nats://HOST:PORT`, namespace
    /// `tarnbench`, wiped first), and time a raw JetStream publish of the same requests.
    #[arg(long)]
    pub stream: Option<String>,
    /// Instead: the scale-out benchmark: the same requests into tarn on its embedded defaults,
    /// into tarn on NATS + S3 + PostgreSQL (one process, then a collector/query process and two
    /// workers), and a raw JetStream publish. Needs `--stream`, `--lake` and `--meta`; the
    /// bucket's endpoint and keys come from the AWS variables, as for `tarn serve`.
    #[arg(long)]
    pub scale_out: bool,
    /// The lake of the scale-out benchmark: `s3://BUCKET/PREFIX` (each setup under a prefix
    /// of its own).
    #[arg(long)]
    pub lake: Option<String>,
    /// The metadata store of the scale-out benchmark: `postgres://...` (each setup in a schema
    /// of its own, dropped after).
    #[arg(long)]
    pub meta: Option<String>,
}

/// The analytics queries: (name, tarn SQL, DuckDB SQL).
fn analytics_queries(event_id: &str) -> Vec<(&'static str, String, String)> {
    let same = |name: &'static str, q: &str| (name, q.to_string(), q.to_string());
    vec![
        same(
            "pruned count",
            "SELECT count(*) FROM auctions WHERE day = '2025-11-21' AND client_id = 'client_003'",
        ),
        same(
            "revenue by bidder, one day",
            "SELECT bidder, sum(cpm) AS revenue FROM auctions WHERE day = '2025-11-21' GROUP BY bidder ORDER BY revenue DESC",
        ),
        same(
            "top countries, all days",
            "SELECT country, count(*) AS n FROM auctions GROUP BY country ORDER BY n DESC LIMIT 5",
        ),
        (
            "p95 latency by device",
            "SELECT device, approx_percentile_cont(latency_ms, 0.95) AS p95 FROM auctions GROUP BY device".into(),
            "SELECT device, approx_quantile(latency_ms, 0.95) AS p95 FROM auctions GROUP BY device".into(),
        ),
        same(
            "hourly series, one customer",
            "SELECT date_trunc('hour', ts) AS h, count(*) AS n FROM auctions WHERE client_id = 'client_001' GROUP BY 1 ORDER BY 1",
        ),
        same("count everything", "SELECT count(*) FROM auctions"),
        same(
            "point lookup by event id",
            &format!("SELECT * FROM auctions WHERE event_id = '{event_id}'"),
        ),
        same(
            "distinct URLs, customer-day",
            "SELECT count(DISTINCT page_url) FROM auctions WHERE client_id = 'client_002' AND day = '2025-11-21'",
        ),
    ]
}

/// Times each query in tarn (best of three, over HTTP) and DuckDB (best of three, in
/// process) and prints the ratios.
async fn compare_queries(url: &str, table_dir: &Path, event_id: &str) -> Result<()> {
    let queries = analytics_queries(event_id);
    let client = reqwest::Client::new();
    let mut tarn = Vec::new();
    for (name, sql, _) in &queries {
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let r = client
                .post(format!("{url}/v1/query"))
                .json(&serde_json::json!({"sql": sql}))
                .send()
                .await?;
            let status = r.status();
            let body = r.text().await?;
            if !status.is_success() {
                bail!("query {name:?} answered {status}: {body}");
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        tarn.push(best);
    }
    let list: Vec<_> = queries
        .iter()
        .map(|(name, _, duck)| serde_json::json!({"name": name, "sql": duck}))
        .collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/duckdb_queries.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(table_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running bench/duckdb_queries.py")?;
    child
        .stdin
        .take()
        .context("duckdb stdin")?
        .write_all(serde_json::to_string(&list)?.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("duckdb queries failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let duck: serde_json::Value = serde_json::from_slice(&out.stdout).context("duckdb output")?;
    println!("  queries (best of 3; tarn over HTTP, DuckDB in process, same Parquet files)");
    let mut worst: f64 = 0.0;
    for ((name, _, _), t) in queries.iter().zip(&tarn) {
        let d = duck[*name].as_f64().unwrap_or(f64::NAN);
        worst = worst.max(t / d);
        println!(
            "    {name:<30} tarn {:>8.1} ms  duckdb {:>8.1} ms  ratio tarn/duckdb {:.2}x",
            t * 1000.0,
            d * 1000.0,
            t / d
        );
    }
    println!("  slowest query relative to DuckDB  {worst:.2}x");
    Ok(())
}

pub const DESCRIPTOR: &str = r#"version: 1
name: auctions
description: ad auctions, as generated by `tarn bench`
fields:
  - { name: event_id, type: string, required: true }
  - { name: ts, type: timestamp, required: true }
  - { name: client_id, type: string, required: true }
  - { name: site, type: string }
  - { name: ad_unit, type: string }
  - { name: bidder, type: string }
  - { name: cpm, type: float64 }
  - { name: currency, type: string }
  - { name: country, type: string }
  - { name: device, type: string }
  - { name: user_agent, type: string }
  - { name: page_url, type: string }
  - { name: consent, type: bool }
  - { name: latency_ms, type: int64 }
event_time: ts
event_id: event_id
partitioning: { tenant: client_id }
"#;

/// `tarn bench --prepare`: the collector's work on one request of `--batch` events, outside
/// the server, against serde_json parsing the same events (the reference, same run, same data).
fn prepare(a: &BenchArgs) -> Result<()> {
    const PASSES: usize = 30;
    std::fs::create_dir_all(&a.dir)?;
    let path = a.dir.join("prepare.ndjson");
    generate(&path, a.batch, a.days, a.customers)?;
    let body = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let text = std::str::from_utf8(&body).context("generated events are UTF-8")?;
    let spec = tarn_core::DatasetSpec::from_yaml(DESCRIPTOR)?;
    let limits = tarn_core::Limits::default();
    let mut best: Option<tarn_collector::PrepareTimes> = None;
    for _ in 0..PASSES {
        let t = tarn_collector::time_prepare(&spec, &body, &limits)?;
        if t.accepted != a.batch || t.rejected != 0 {
            bail!("{} of {} events accepted, {} rejected", t.accepted, a.batch, t.rejected);
        }
        let total = |t: &tarn_collector::PrepareTimes| t.split + t.check + t.encode;
        if best.as_ref().is_none_or(|b| total(&t) < total(b)) {
            best = Some(t);
        }
    }
    let best = best.context("no pass ran")?;
    let mut reference = Duration::MAX;
    for _ in 0..PASSES {
        let started = Instant::now();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)?;
            if !v.is_object() {
                bail!("an event is not a JSON object");
            }
        }
        reference = reference.min(started.elapsed());
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let total = best.split + best.check + best.encode;
    println!(
        "one request of {} events, {} bytes, best of {PASSES} passes:",
        a.batch,
        body.len()
    );
    println!(
        "  tarn: split {:.2} ms, checks and batch {:.2} ms, encoding {:.2} ms; {:.2} ms in all, {:.0} ns an event",
        ms(best.split),
        ms(best.check),
        ms(best.encode),
        ms(total),
        total.as_nanos() as f64 / a.batch.max(1) as f64
    );
    println!("  serde_json into trees (reference): {:.2} ms", ms(reference));
    println!(
        "  ratio tarn/reference time: {:.2}x",
        total.as_secs_f64() / reference.as_secs_f64()
    );
    Ok(())
}

/// Writes `n` events as NDJSON, one per line; returns the byte count.
pub fn generate(path: &Path, n: usize, days: u32, customers: u32) -> Result<u64> {
    // 2025-11-20T00:00:00Z: fixed, so that runs are comparable.
    generate_from(path, n, 1_763_596_800, days, customers, 42)
}

/// Writes `n` events as NDJSON whose event times span `days` days from `start` (epoch
/// seconds); returns the byte count.
pub fn generate_from(path: &Path, n: usize, start: i64, days: u32, customers: u32, seed: u64) -> Result<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let bidders = [
        "appnexus",
        "rubicon",
        "pubmatic",
        "openx",
        "ix",
        "triplelift",
        "sovrn",
        "criteo",
        "amazon",
        "smart",
    ];
    let countries = ["US", "GB", "DE", "FR", "JP", "BR", "IN", "CA", "AU", "ES", "IT", "NL"];
    let devices = ["desktop", "mobile", "tablet", "ctv"];
    let currencies = ["USD", "EUR", "GBP"];
    let uas = [
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.0 Safari/605.1.15",
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Mobile Safari/537.36",
    ];
    // Zipf-like weights: customer k gets traffic proportional to 1/(k+1).
    let weights: Vec<f64> = (0..customers).map(|k| 1.0 / (k as f64 + 1.0)).collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(weights.len());
    let mut acc = 0.0;
    for w in &weights {
        acc += w / total;
        cdf.push(acc);
    }
    let span = i64::from(days) * 86_400;
    let mut bytes = 0u64;
    for i in 0..n {
        let u: f64 = rng.random();
        let c = cdf.partition_point(|x| *x < u).min(cdf.len() - 1);
        let ts = start + rng.random_range(0..span);
        let ms = rng.random_range(0..1000);
        let t = chrono::DateTime::from_timestamp(ts, ms * 1_000_000).unwrap_or_default();
        let line = format!(
            concat!(
                r#"{{"event_id":"{:016x}{:016x}","ts":"{}","client_id":"client_{:03}","site":"site{}.example.com","#,
                r#""ad_unit":"slot_{}","bidder":"{}","cpm":{:.4},"currency":"{}","country":"{}","device":"{}","#,
                r#""user_agent":"{}","page_url":"https://site{}.example.com/articles/{}/{}?ref=home","consent":{},"latency_ms":{}}}"#,
                "\n"
            ),
            rng.random::<u64>(),
            i,
            t.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            c,
            c * 7 % 1000,
            rng.random_range(0..12),
            bidders[rng.random_range(0..bidders.len())],
            rng.random_range(0.01..25.0f64),
            currencies[rng.random_range(0..currencies.len())],
            countries[rng.random_range(0..countries.len())],
            devices[rng.random_range(0..devices.len())],
            uas[rng.random_range(0..uas.len())],
            c * 7 % 1000,
            rng.random_range(0..5000),
            rng.random_range(100_000..999_999),
            rng.random_bool(0.8),
            rng.random_range(5..900),
        );
        bytes += line.len() as u64;
        w.write_all(line.as_bytes())?;
    }
    w.flush()?;
    Ok(bytes)
}

fn du(path: &Path, suffix: Option<&str>) -> u64 {
    let mut total = 0;
    let Ok(rd) = std::fs::read_dir(path) else { return 0 };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            total += du(&p, suffix);
        } else if suffix.is_none_or(|s| p.to_string_lossy().ends_with(s)) {
            total += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    total
}

pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The disk's own durable-append latency, the reference for tarn's ack latency: the requests'
/// bytes appended to one file at the pace `rate` (events/s) and made durable with `fdatasync`
/// by one writer that gathers every request due by the time it is free into one write and one
/// sync (a group commit with no decoding, checking or encoding). Returns per-request latencies
/// in ms, from when the request was due to when its sync returned.
pub fn disk_appends(dir: &Path, bodies: &[(usize, bytes::Bytes)], rate: f64) -> Result<Vec<f64>> {
    let path = dir.join("disk-reference.seg");
    let mut f = std::fs::File::create(&path)?;
    let mut due = Vec::with_capacity(bodies.len());
    let mut events = 0usize;
    for (n, _) in bodies {
        due.push(Duration::from_secs_f64(events as f64 / rate));
        events += n;
    }
    let started = Instant::now();
    let mut lat = Vec::with_capacity(bodies.len());
    let mut i = 0;
    let mut buf = Vec::new();
    while i < bodies.len() {
        let now = started.elapsed();
        if due[i] > now {
            std::thread::sleep(due[i] - now);
        }
        let now = started.elapsed();
        let first = i;
        buf.clear();
        while i < bodies.len() && due[i] <= now {
            buf.extend_from_slice(&bodies[i].1);
            i += 1;
        }
        f.write_all(&buf)?;
        f.sync_data()?;
        let done = started.elapsed();
        lat.extend(due[first..i].iter().map(|d| (done - *d).as_secs_f64() * 1000.0));
    }
    drop(f);
    std::fs::remove_file(&path)?;
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(lat)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Posts every body from `clients` concurrent clients; with `pace`, each client waits so that
/// the total rate is about `pace` events/s. Returns per-request latencies in ms.
pub async fn post_all(
    url: &str,
    dataset: &str,
    bodies: Arc<Vec<(usize, bytes::Bytes)>>,
    clients: usize,
    pace: Option<f64>,
) -> Result<Vec<f64>> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (bodies, next) = (bodies.clone(), next.clone());
        let url = format!("{url}/v1/datasets/{dataset}/events");
        let client = reqwest::Client::builder().pool_max_idle_per_host(1).build()?;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut sent_events = 0usize;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some((n, body)) = bodies.get(i) else { break };
                if let Some(rate) = pace {
                    // Requests are handed out in order, so request i should start when the
                    // events before it have had their share of time.
                    let due = Duration::from_secs_f64((i as f64 * *n as f64) / rate);
                    let now = started.elapsed();
                    if due > now {
                        tokio::time::sleep(due - now).await;
                    }
                }
                loop {
                    let t = Instant::now();
                    let r = client.post(&url).body(body.clone()).send().await?;
                    let status = r.status();
                    let text = r.text().await?;
                    if status.as_u16() == 503 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    if !status.is_success() {
                        bail!("ingest answered {status}: {text}");
                    }
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    sent_events += n;
                    break;
                }
            }
            Ok::<_, anyhow::Error>((lat, sent_events))
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let (lat, _) = t.await??;
        all.extend(lat);
    }
    all.sort_by(|a, b| a.total_cmp(b));
    Ok(all)
}

pub async fn count(url: &str, table: &str) -> Result<u64> {
    let r: serde_json::Value = reqwest::Client::new()
        .post(format!("{url}/v1/query"))
        .json(&serde_json::json!({"sql": format!("SELECT count(*) FROM {table}")}))
        .send()
        .await?
        .json()
        .await?;
    Ok(r["rows"][0][0].as_u64().unwrap_or(0))
}

/// The fewest requests the half-peak phase sends, so that its p99 is not one or two requests'
/// worth of luck: the bodies are sent again, in order, until there are this many.
const PACED_REQUESTS_MIN: usize = 1000;

/// `bodies` repeated in order until there are at least `n` (all of them, once, when more).
fn at_least(bodies: &[(usize, bytes::Bytes)], n: usize) -> Vec<(usize, bytes::Bytes)> {
    if bodies.is_empty() {
        return Vec::new();
    }
    bodies.iter().cycle().take(n.max(bodies.len())).cloned().collect()
}

/// Request bodies of `batch` NDJSON lines each, cut up front so the clients only send.
pub fn cut_bodies(ndjson: &Path, batch: usize) -> Result<Vec<(usize, bytes::Bytes)>> {
    let text = std::fs::read(ndjson)?;
    let mut bodies = Vec::new();
    let mut start = 0usize;
    let mut lines = 0usize;
    for (i, b) in text.iter().enumerate() {
        if *b == b'\n' {
            lines += 1;
            if lines == batch {
                bodies.push((lines, bytes::Bytes::copy_from_slice(&text[start..=i])));
                start = i + 1;
                lines = 0;
            }
        }
    }
    if start < text.len() {
        bodies.push((lines, bytes::Bytes::copy_from_slice(&text[start..])));
    }
    Ok(bodies)
}

/// Starts `tarn serve` (this binary) on `dir/data` with the descriptors in `dir/datasets`;
/// returns the child and its URL.
pub fn spawn_server(dir: &Path, extra: &[&str]) -> Result<(std::process::Child, String)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["serve", "--http", "127.0.0.1:0", "--pg", "off", "--datasets"])
        .arg(dir.join("datasets"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(extra)
        .env("TARN_LOG", std::env::var("TARN_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::piped())
        .spawn()
        .context("starting tarn serve")?;
    let stdout = child.stdout.take().context("server stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let url = line
        .trim()
        .strip_prefix("tarn listening on ")
        .context("server address")?
        .to_string();
    Ok((child, url))
}

pub async fn run(a: BenchArgs) -> Result<()> {
    if a.compaction {
        return crate::bench_compaction::run(&a).await;
    }
    if a.rollups {
        return crate::bench_rollups::run(&a).await;
    }
    if a.scale_out {
        return crate::bench_scale::run(&a).await;
    }
    if a.prepare {
        return prepare(&a);
    }
    if let Some(r) = a.paced_rate
        && !(r.is_finite() && r > 0.0)
    {
        bail!("--paced-rate is events per second and must be more than 0, not {r}");
    }
    if a.dir.exists() {
        std::fs::remove_dir_all(&a.dir).with_context(|| format!("wiping {}", a.dir.display()))?;
    }
    std::fs::create_dir_all(a.dir.join("datasets"))?;
    let ndjson = a.dir.join("events.ndjson");
    eprintln!("generating {} events...", a.events);
    let input_bytes = generate(&ndjson, a.events, a.days, a.customers)?;
    // The input is the benchmark's own: flushed now, so that tarn's syncs do not pay for it.
    std::fs::File::open(&ndjson)?.sync_all()?;
    eprintln!(
        "{} events, {:.1} MB, {:.0} bytes/event",
        a.events,
        input_bytes as f64 / 1e6,
        input_bytes as f64 / a.events as f64
    );
    std::fs::write(a.dir.join("datasets/auctions.yaml"), DESCRIPTOR)?;
    std::fs::write(
        a.dir.join("datasets/auctions_paced.yaml"),
        DESCRIPTOR.replace("name: auctions", "name: auctions_paced"),
    )?;

    let bodies = Arc::new(cut_bodies(&ndjson, a.batch)?);
    let stream_arg = match &a.stream {
        Some(nats) => {
            crate::bench_stream::reset(nats, crate::bench_stream::NAMESPACE).await?;
            vec![
                "--stream".to_string(),
                format!("{}/{}", nats.trim_end_matches('/'), crate::bench_stream::NAMESPACE),
            ]
        }
        None => Vec::new(),
    };
    let stream_args: Vec<&str> = stream_arg.iter().map(String::as_str).collect();
    let (mut child, url) = spawn_server(&a.dir, &stream_args)?;
    let pid = child.id();
    let data = a.dir.join("data");

    let res = async {
        // Phase 1: flat out.
        let t0 = Instant::now();
        let lat = post_all(&url, "auctions", bodies.clone(), a.clients, None).await?;
        let ack_s = t0.elapsed().as_secs_f64();
        let last_ack = Instant::now();
        let deadline = Duration::from_secs(600);
        while count(&url, "auctions").await? < a.events as u64 {
            if last_ack.elapsed() > deadline {
                bail!("rows not queryable after {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let queryable_s = last_ack.elapsed().as_secs_f64();
        let rate = a.events as f64 / ack_s;
        // The table as curated, right after ingestion.
        let table_dir = data.join("lake/tables/auctions");
        let table_bytes = du(&table_dir, None);
        let parquet_bytes = du(&table_dir, Some(".parquet"));
        let files = walk_count(&table_dir, ".parquet");
        // Phase 2: half the peak rate, for ack latency.
        const PARTS: [&str; 4] = [
            "tarn_ingest_latency_seconds",
            "tarn_ingest_prepare_seconds",
            "tarn_ingest_prepare_cpu_seconds",
            "tarn_ingest_append_seconds",
        ];
        let mut before = Vec::new();
        for name in PARTS {
            before.push(histogram(&url, name).await?);
        }
        let reused_before = log_counter(&url, "tarn_log_segments_reused_total").await?;
        let paced_bodies = Arc::new(at_least(&bodies, PACED_REQUESTS_MIN));
        let paced_events: usize = paced_bodies.iter().map(|(n, _)| n).sum();
        let paced_rate = a.paced_rate.unwrap_or(rate / 2.0);
        let paced = post_all(&url, "auctions_paced", paced_bodies.clone(), a.clients, Some(paced_rate)).await?;
        let reused = log_counter(&url, "tarn_log_segments_reused_total").await? - reused_before;
        let rss_kib = peak_rss_kib(pid);
        // p50 and p99 bucket bounds of the whole request, its decoding and checks (wall and CPU), and its append.
        let mut parts = Vec::new();
        for (name, was) in PARTS.iter().zip(&before) {
            let now = histogram(&url, name).await?;
            parts.push(format!("p50 <= {} p99 <= {}", bucket_quantile(was, &now, 0.5), bucket_quantile(was, &now, 0.99)));
        }
        while count(&url, "auctions_paced").await? < paced_events as u64 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The reference for the ack latency: the disk alone, same bytes, same pace.
        let (disk_dir, disk_bodies) = (data.clone(), paced_bodies.clone());
        let disk = tokio::task::spawn_blocking(move || disk_appends(&disk_dir, &disk_bodies, paced_rate)).await??;
        if a.queries && a.duckdb {
            let first_id = std::fs::read_to_string(&ndjson)?
                .lines()
                .nth(a.events / 2)
                .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .and_then(|v| v["event_id"].as_str().map(str::to_string))
                .unwrap_or_default();
            compare_queries(&url, &table_dir, &first_id).await?;
            if walk_count(&table_dir, ".parquet") != files {
                bail!(
                    "the server's own compaction of auctions began before the query comparison ended, so \
                     tarn and DuckDB may not have read the same files: run again"
                );
            }
        }
        // At rest: no command is run; the server's own compaction merges each partition's files
        // by size tier once nothing has been written to it for `--compact-quiet-s` (60 s by
        // default, checked every 30 s). At rest means one file per partition, or no change for
        // 35 s (longer than a check) once the first check after the quiet time has passed.
        let partitions = partition_dirs(&table_dir);
        let mut seen = (0, files, Instant::now());
        let (rest_bytes, rest_files, at_rest) = loop {
            let (bytes, n) = live_files(&url, "auctions").await?;
            if n != seen.1 {
                seen = (bytes, n, Instant::now());
            }
            let settled = last_ack.elapsed() > Duration::from_secs(100) && seen.2.elapsed() > Duration::from_secs(35);
            if n <= partitions || settled || last_ack.elapsed() > Duration::from_secs(600) {
                break (bytes, n, n <= partitions || settled);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let rest_s = seen.2.duration_since(last_ack).as_secs_f64();
        let rest_disk = du(&table_dir, Some(".parquet"));
        println!(
            "tarn bench: {} events ({:.1} MB NDJSON), {} per request, {} clients, stream {}",
            a.events,
            input_bytes as f64 / 1e6,
            a.batch,
            a.clients,
            a.stream.as_deref().unwrap_or("embedded")
        );
        println!(
            "  ingest to durable ack      {:>10.0} events/s  {:>7.1} MB/s  ({:.2} s)",
            rate,
            input_bytes as f64 / 1e6 / ack_s,
            ack_s
        );
        println!(
            "  ack latency at full speed  p50 {:.1} ms  p99 {:.1} ms",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99)
        );
        println!(
            "  ack latency at half peak   p50 {:.1} ms  p99 {:.1} ms  ({} requests, {} events, at {:.0} events/s{})",
            percentile(&paced, 0.5),
            percentile(&paced, 0.99),
            paced.len(),
            paced_events,
            paced_rate,
            if a.paced_rate.is_some() { " as given by --paced-rate" } else { "" }
        );
        println!(
            "  the disk alone at half peak p50 {:.1} ms  p99 {:.1} ms (the same bytes appended and fdatasynced at the same pace, one group-commit writer); tarn/disk p99 {:.2}x",
            percentile(&disk, 0.5),
            percentile(&disk, 0.99),
            percentile(&paced, 0.99) / percentile(&disk, 0.99)
        );
        println!(
            "  in the server at half peak: whole request {}; decoding and checks (waiting for a thread included) {}, their CPU time {}; the log append (group commit turn, write, fsync) {}; {reused} log segments started in reused files",
            parts[0], parts[1], parts[2], parts[3]
        );
        println!("  last ack -> all queryable  {queryable_s:.2} s");
        println!(
            "  end to end (ack + query)   {:>10.0} events/s",
            a.events as f64 / (ack_s + queryable_s)
        );
        println!("  server peak RSS            {:.0} MiB", rss_kib as f64 / 1024.0);
        println!(
            "  table on disk              {:.1} MB ({} parquet files, {:.1} MB parquet)",
            table_bytes as f64 / 1e6,
            files,
            parquet_bytes as f64 / 1e6
        );
        println!(
            "  at rest                    {:.1} MB parquet in {rest_files} files for {partitions} partitions, since {rest_s:.0} s after the last ack{} (the server's own compaction; {:.1} MB of parquet on disk until vacuum deletes the files it replaced)",
            rest_bytes as f64 / 1e6,
            if at_rest { "" } else { ": NOT at rest after 600 s" },
            rest_disk as f64 / 1e6
        );
        if let Some(nats) = &a.stream {
            let secs = crate::bench_stream::raw_publish(nats, bodies.clone(), a.clients).await?;
            let raw_rate = a.events as f64 / secs;
            println!(
                "  raw JetStream publish of the same requests  {:>10.0} events/s  {:>7.1} MB/s  ({secs:.2} s)",
                raw_rate,
                input_bytes as f64 / 1e6 / secs
            );
            println!("  ratio tarn/raw JetStream (to ack)          {:.2}x", rate / raw_rate);
        }
        if a.duckdb {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/duckdb_convert.py");
            let out = Command::new("python3")
                .arg(&script)
                .arg(&ndjson)
                .arg(a.dir.join("duckdb-out"))
                .output()
                .context("running bench/duckdb_convert.py")?;
            if !out.status.success() {
                bail!("duckdb run failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("duckdb output")?;
            let secs = v["seconds"].as_f64().unwrap_or(f64::NAN);
            let bytes = v["bytes"].as_f64().unwrap_or(f64::NAN);
            let duck_rate = a.events as f64 / secs;
            println!(
                "  duckdb NDJSON -> hive zstd parquet  {:>10.0} events/s ({secs:.2} s), {:.1} MB ({} files)",
                duck_rate,
                bytes / 1e6,
                v["files"]
            );
            println!(
                "  ratio tarn/duckdb throughput (end to end)  {:.2}x",
                (a.events as f64 / (ack_s + queryable_s)) / duck_rate
            );
            println!("  ratio tarn/duckdb throughput (to ack)      {:.2}x", rate / duck_rate);
            println!(
                "  ratio tarn/duckdb output size (parquet)    {:.3}x",
                parquet_bytes as f64 / bytes
            );
            println!(
                "  ratio tarn/duckdb output size at rest      {:.3}x",
                rest_bytes as f64 / bytes
            );
        }
        Ok(())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    res
}

/// One of the server's cumulative latency histograms: (upper bound in seconds, count).
async fn histogram(url: &str, name: &str) -> Result<Vec<(String, u64)>> {
    let text = reqwest::get(format!("{url}/metrics")).await?.text().await?;
    let prefix = format!("{name}_bucket{{le=\"");
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|l| {
            let (le, rest) = l.split_once("\"} ")?;
            Some((le.to_string(), rest.trim().parse().ok()?))
        })
        .collect())
}

/// The bucket holding the quantile `q` of the requests between two histogram readings.
fn bucket_quantile(before: &[(String, u64)], after: &[(String, u64)], q: f64) -> String {
    let diff: Vec<(String, u64)> = after
        .iter()
        .map(|(le, n)| {
            let was = before.iter().find(|(b, _)| b == le).map_or(0, |(_, n)| *n);
            (le.clone(), n.saturating_sub(was))
        })
        .collect();
    let total = diff.last().map_or(0, |(_, n)| *n);
    diff.iter().find(|(_, n)| *n as f64 >= q * total as f64).map_or_else(
        || "?".into(),
        |(le, _)| match le.parse::<f64>() {
            Ok(s) => format!("{:.0} ms", s * 1000.0),
            Err(_) => le.clone(),
        },
    )
}

/// A per-topic counter of the server's, summed over topics.
async fn log_counter(url: &str, name: &str) -> Result<u64> {
    let text = reqwest::get(format!("{url}/metrics")).await?.text().await?;
    let prefix = format!("{name}{{");
    Ok(text
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// The bytes and number of the files a dataset's current version lists (`/v1/storage`).
async fn live_files(url: &str, dataset: &str) -> Result<(u64, u64)> {
    let storage: serde_json::Value = reqwest::get(format!("{url}/v1/storage?dataset={dataset}"))
        .await?
        .json()
        .await?;
    let tiers = storage["datasets"][0]["tiers"].as_array().context("storage tiers")?;
    Ok(tiers.iter().fold((0, 0), |(b, n), t| {
        (
            b + t["bytes"].as_u64().unwrap_or(0),
            n + t["files"].as_u64().unwrap_or(0),
        )
    }))
}

/// Folders under `path` that hold Parquet files, but for `_delta_log`: a table's partitions.
fn partition_dirs(path: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(path) else { return 0 };
    let (mut dirs, mut here) = (0, false);
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() && !e.file_name().to_string_lossy().starts_with('_') {
            dirs += partition_dirs(&p);
        } else if p.to_string_lossy().ends_with(".parquet") {
            here = true;
        }
    }
    dirs + u64::from(here)
}

fn walk_count(path: &Path, suffix: &str) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(path) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                n += walk_count(&p, suffix);
            } else if p.to_string_lossy().ends_with(suffix) {
                n += 1;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_collector_accepts_every_generated_event() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("e.ndjson");
        generate(&p, 500, 3, 200).expect("generate");
        let body = std::fs::read(&p).expect("read");
        let spec = tarn_core::DatasetSpec::from_yaml(DESCRIPTOR).expect("descriptor");
        let t = tarn_collector::time_prepare(&spec, &body, &tarn_core::Limits::default()).expect("prepare");
        assert_eq!((t.accepted, t.rejected), (500, 0));
    }

    #[test]
    fn the_half_peak_phase_repeats_bodies_in_order_up_to_its_minimum() {
        let bodies: Vec<(usize, bytes::Bytes)> = (0..3).map(|i| (i, bytes::Bytes::from(vec![i as u8]))).collect();
        let n: Vec<usize> = at_least(&bodies, 7).iter().map(|(n, _)| *n).collect();
        assert_eq!(n, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(at_least(&bodies, 2).len(), 3, "never fewer than all of them");
        assert!(at_least(&[], 5).is_empty());
    }

    #[tokio::test]
    async fn a_paced_rate_that_is_no_rate_is_refused_before_any_work() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let scratch = dir.path().join("scratch");
        for bad in ["0", "inf", "NaN"] {
            let cli = <Cli as clap::Parser>::try_parse_from([
                "bench",
                "--paced-rate",
                bad,
                "--dir",
                scratch.to_str().expect("utf-8 path"),
            ])
            .expect("arguments");
            let err = run(cli.bench).await.expect_err(bad).to_string();
            assert!(err.contains("--paced-rate"), "{bad}: {err}");
            assert!(!scratch.exists(), "{bad}: nothing is generated before the check");
        }
    }

    #[test]
    fn generated_events_are_realistic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("e.ndjson");
        let bytes = generate(&p, 2000, 3, 200).expect("generate");
        let per = bytes as f64 / 2000.0;
        assert!((400.0..650.0).contains(&per), "~500 bytes per event, got {per}");
        let text = std::fs::read_to_string(&p).expect("read");
        let mut per_client = std::collections::HashMap::new();
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            *per_client
                .entry(v["client_id"].as_str().expect("client").to_string())
                .or_insert(0) += 1;
        }
        let top = per_client.get("client_000").copied().unwrap_or(0);
        let tail = per_client.get("client_150").copied().unwrap_or(0);
        assert!(top > 10 * tail.max(1), "skewed: top {top}, tail {tail}");
        let spec = tarn_core::DatasetSpec::from_yaml(DESCRIPTOR).expect("descriptor");
        assert_eq!(spec.fields.len(), 14);
    }
}
