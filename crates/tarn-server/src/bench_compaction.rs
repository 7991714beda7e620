//! `tarn bench --compaction`: one partition of many small files, as a day of small batches
//! leaves it, built through the real collector, log, raw zone and curate (one commit per
//! batch). It measures a query before compaction, compaction itself (MB/s of input), the same
//! query after, and DuckDB merging the same files into one as the reference.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use tarn_catalog::Catalog;
use tarn_collector::{Collector, CollectorOptions, Encoding};
use tarn_core::{DatasetSpec, Limits, SystemClock};
use tarn_lake::compact::{CompactOptions, compact_dataset};
use tarn_lake::raw::{object_path, with_seq, write_object};
use tarn_lake::{CurateOptions, Curator, Lake, ObjectCreated};
use tarn_log::{Log, LogOptions};
use tarn_query::{QueryEngine, QueryOptions};

use crate::bench::{BenchArgs, DESCRIPTOR, generate};

/// The query timed before and after: reads every row of the partition.
const QUERY: &str = "SELECT bidder, count(*), avg(cpm), max(latency_ms) FROM auctions GROUP BY 1";

/// Best of three runs: (ms, files scanned).
async fn time_query(q: &QueryEngine) -> Result<(f64, u64)> {
    let mut best = f64::MAX;
    let mut files = 0;
    for _ in 0..3 {
        let t = Instant::now();
        let r = q.sql(QUERY, &QueryOptions::default()).await?;
        best = best.min(t.elapsed().as_secs_f64() * 1000.0);
        files = r.stats.files_scanned;
    }
    Ok((best, files))
}

pub async fn run(a: &BenchArgs) -> Result<()> {
    if a.dir.exists() {
        std::fs::remove_dir_all(&a.dir).with_context(|| format!("wiping {}", a.dir.display()))?;
    }
    std::fs::create_dir_all(&a.dir)?;
    let files = a.files;
    let rows = a.batch;
    eprintln!("building one partition of {files} files of {rows} events each...");
    let ndjson = a.dir.join("events.ndjson");
    generate(&ndjson, files * rows, 1, 1)?;
    let text = std::fs::read(&ndjson)?;

    let log = Log::open(a.dir.join("log"), LogOptions::default())?;
    let catalog = Arc::new(Catalog::open(a.dir.join("catalog"))?);
    catalog.register(DatasetSpec::from_yaml(DESCRIPTOR)?)?;
    let lake = Lake::open(a.dir.join("lake"))?;
    let collector = Collector::new(
        log.clone(),
        catalog.clone(),
        Arc::new(SystemClock),
        CollectorOptions {
            limits: Limits::default(),
            infer_datasets: false,
            sharded: false,
        },
    );
    let curator = Curator::new(&log, lake.clone(), catalog.clone(), CurateOptions::default()).await?;
    let topic = log.topic(&tarn_collector::topic_name("auctions"))?;
    let mut cursor = topic.cursor(0);
    let mut lines = text.split_inclusive(|b| *b == b'\n');
    for i in 0..files {
        let body: Vec<u8> = lines.by_ref().take(rows).flatten().copied().collect();
        let r = collector
            .ingest("auctions", bytes::Bytes::from(body), Encoding::Identity)
            .await?;
        if r.rejected > 0 {
            bail!("{} events rejected", r.rejected);
        }
        for rec in cursor.read(usize::MAX)? {
            let batches = tarn_collector::decode_payload(&rec.payload).map_err(anyhow::Error::msg)?;
            let mut with = Vec::with_capacity(batches.len());
            for b in &batches {
                with.push(with_seq(b, rec.seq)?);
            }
            let path = object_path("auctions", 0, rec.seq, rec.seq);
            let bytes = write_object(lake.root(), &path, &with)?;
            let note = ObjectCreated {
                version: 1,
                dataset: "auctions".into(),
                shard: 0,
                first_seq: rec.seq,
                last_seq: rec.seq,
                path,
                rows: rows as u64,
                bytes,
            };
            curator.apply(&[note]).await?;
        }
        if (i + 1) % 100 == 0 {
            eprintln!("  {} files", i + 1);
        }
    }
    let spec = catalog.get("auctions").context("dataset")?;
    let query = QueryEngine::new(lake.clone(), catalog.clone());
    let (before_ms, before_files) = time_query(&query).await?;

    // The reference: DuckDB merging the same files, read from a copy of the partition.
    let table_dir = lake.table_dir("auctions");
    let part_dir = std::fs::read_dir(table_dir.join(format!("day={}", first_day(&table_dir)?)))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .context("partition directory")?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/duckdb_merge.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&part_dir)
        .arg(a.dir.join("duckdb-merged.parquet"))
        .output()
        .context("running bench/duckdb_merge.py")?;
    if !out.status.success() {
        bail!("duckdb run failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("duckdb output")?;
    let duck_s = v["seconds"].as_f64().unwrap_or(f64::NAN);
    let duck_bytes = v["bytes"].as_f64().unwrap_or(f64::NAN);

    let report = compact_dataset(&lake, &spec, &CompactOptions::default(), &|_| {}).await?;
    let (after_ms, after_files) = time_query(&query).await?;
    let in_mb = report.bytes_read as f64 / 1e6;
    println!("tarn bench --compaction: one partition, {files} files of {rows} events");
    println!(
        "  compaction          {:.1} MB in {} files -> {:.1} MB in {} file(s), {:.2} s, {:.1} MB/s",
        in_mb,
        report.files_removed,
        report.bytes_written as f64 / 1e6,
        report.files_added,
        report.seconds,
        in_mb / report.seconds
    );
    println!(
        "  duckdb merge        {:.1} MB -> {:.1} MB, {duck_s:.2} s, {:.1} MB/s",
        in_mb,
        duck_bytes / 1e6,
        in_mb / duck_s
    );
    println!("  ratio tarn/duckdb compaction speed  {:.2}x", duck_s / report.seconds);
    println!("  query before        {before_ms:.1} ms over {before_files} files");
    println!("  query after         {after_ms:.1} ms over {after_files} files");
    println!(
        "  ratio before/after  files {:.0}x, query time {:.2}x",
        before_files as f64 / after_files.max(1) as f64,
        before_ms / after_ms
    );
    Ok(())
}

/// The one day partition of the table.
fn first_day(table_dir: &Path) -> Result<String> {
    std::fs::read_dir(table_dir)?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("day="))
                .map(str::to_string)
        })
        .next()
        .context("no day partition")
}
