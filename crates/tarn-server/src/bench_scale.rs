//! The scale-out benchmark (`tarn bench --scale-out`): the same requests, in one run, into tarn
//! on its embedded defaults, into tarn on NATS JetStream + an S3-compatible bucket + PostgreSQL
//! (one process with every role, then a collector/query process beside two worker processes),
//! and published raw to JetStream by as many clients, each waiting for its acknowledgement as
//! tarn's collector does. The ratios say what the distributed engines cost against the
//! embedded ones, and how much tarn adds on top of the engine it appends to.

use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bench::{BenchArgs, count, cut_bodies, generate, post_all, spawn_server};

/// One setup's figures.
struct Run {
    ack_s: f64,
    queryable_s: f64,
}

impl Run {
    fn line(&self, name: &str, events: usize) {
        println!(
            "  {name:<44} {:>9.0} events/s to ack  {:>9.0} events/s end to end  (ack {:.2} s, then queryable {:.2} s)",
            events as f64 / self.ack_s,
            events as f64 / (self.ack_s + self.queryable_s),
            self.ack_s,
            self.queryable_s
        );
    }

    fn end_to_end(&self, events: usize) -> f64 {
        events as f64 / (self.ack_s + self.queryable_s)
    }

    fn to_ack(&self, events: usize) -> f64 {
        events as f64 / self.ack_s
    }
}

/// Kills the processes of a setup when it ends, however it ends.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Posts every body to `ingest`, then waits until `query` counts them all.
async fn measure(ingest: &str, query: &str, bodies: Arc<Vec<(usize, bytes::Bytes)>>, a: &BenchArgs) -> Result<Run> {
    let t0 = Instant::now();
    post_all(ingest, "auctions", bodies, a.clients, None).await?;
    let ack_s = t0.elapsed().as_secs_f64();
    let acked = Instant::now();
    let deadline = Duration::from_secs(900);
    while count(query, "auctions").await? < a.events as u64 {
        if acked.elapsed() > deadline {
            bail!("rows not queryable {deadline:?} after the last acknowledgement");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Run {
        ack_s,
        queryable_s: acked.elapsed().as_secs_f64(),
    })
}

/// A data directory of its own for one process of a setup, with the benchmark's descriptor
/// in size class L: four shards on a shared stream, so that every unit of work has a shard and
/// two workers share them (the embedded log keeps one shard whatever the class).
fn process_dir(root: &Path, name: &str) -> Result<std::path::PathBuf> {
    let dir = root.join(name);
    std::fs::create_dir_all(dir.join("datasets"))?;
    let descriptor = crate::bench::DESCRIPTOR.replacen("name: auctions\n", "name: auctions\nsize: L\n", 1);
    if descriptor == crate::bench::DESCRIPTOR {
        bail!("the benchmark's descriptor has no `name: auctions` line to add the size class after");
    }
    std::fs::write(dir.join("datasets/auctions.yaml"), descriptor)?;
    Ok(dir)
}

/// Drops the metadata schema a setup made.
fn drop_schema(meta: &str, schema: &str) {
    let _ = std::process::Command::new("psql")
        .args([meta, "-qc"])
        .arg(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .output();
}

pub async fn run(a: &BenchArgs) -> Result<()> {
    let (Some(nats), Some(lake), Some(meta)) = (&a.stream, &a.lake, &a.meta) else {
        bail!("--scale-out needs --stream nats://..., --lake s3://... and --meta postgres://...");
    };
    let nats = nats.trim_end_matches('/');
    if a.dir.exists() {
        std::fs::remove_dir_all(&a.dir).with_context(|| format!("wiping {}", a.dir.display()))?;
    }
    std::fs::create_dir_all(&a.dir)?;
    let ndjson = a.dir.join("events.ndjson");
    eprintln!("generating {} events...", a.events);
    let input_bytes = generate(&ndjson, a.events, a.days, a.customers)?;
    std::fs::File::open(&ndjson)?.sync_all()?;
    let bodies = Arc::new(cut_bodies(&ndjson, a.batch)?);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let lake = lake.trim_end_matches('/');

    eprintln!("embedded defaults, one process...");
    let embedded = {
        let dir = process_dir(&a.dir, "embedded")?;
        let (child, url) = spawn_server(&dir, &[])?;
        let _p = Processes(vec![child]);
        measure(&url, &url, bodies.clone(), a).await?
    };

    // The distributed setups: a namespace, a lake prefix and a metadata schema of their own.
    let distributed = |tag: &str| -> Vec<String> {
        vec![
            "--stream".into(),
            format!("{nats}/tarnbench_{tag}"),
            "--lake".into(),
            format!("{lake}/bench-{stamp}-{tag}"),
            "--meta".into(),
            meta.to_string(),
            "--meta-schema".into(),
            format!("tarnbench_{tag}_{stamp}"),
        ]
    };
    eprintln!("NATS + S3 + PostgreSQL, one process...");
    crate::bench_stream::reset(nats, "tarnbench_one").await?;
    let one = {
        let args = distributed("one");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (child, url) = spawn_server(&process_dir(&a.dir, "one")?, &args)?;
        let _p = Processes(vec![child]);
        measure(&url, &url, bodies.clone(), a).await
    };
    drop_schema(meta, &format!("tarnbench_one_{stamp}"));
    let one = one?;

    eprintln!("NATS + S3 + PostgreSQL, a collector/query process and two workers...");
    crate::bench_stream::reset(nats, "tarnbench_split").await?;
    let split = {
        let shared = distributed("split");
        let with = |roles: &str| -> Vec<String> {
            let mut v = shared.clone();
            v.extend(["--roles".into(), roles.into()]);
            v
        };
        let front = with("collector,query");
        let front: Vec<&str> = front.iter().map(String::as_str).collect();
        let (c0, url) = spawn_server(&process_dir(&a.dir, "front")?, &front)?;
        let mut procs = Processes(vec![c0]);
        let worker = with("worker");
        let worker: Vec<&str> = worker.iter().map(String::as_str).collect();
        for name in ["worker1", "worker2"] {
            let (c, _) = spawn_server(&process_dir(&a.dir, name)?, &worker)?;
            procs.0.push(c);
        }
        // The workers split the units before the clock starts (a lease round is 5 s).
        tokio::time::sleep(Duration::from_secs(12)).await;
        let r = measure(&url, &url, bodies.clone(), a).await;
        drop(procs);
        r
    };
    drop_schema(meta, &format!("tarnbench_split_{stamp}"));
    let split = split?;

    eprintln!("raw JetStream publish...");
    let raw_s = crate::bench_stream::raw_publish(nats, bodies.clone(), a.clients).await?;
    let raw_rate = a.events as f64 / raw_s;
    for ns in ["tarnbench_one", "tarnbench_split"] {
        crate::bench_stream::reset(nats, ns).await?;
    }

    let n = a.events;
    println!(
        "tarn bench --scale-out: {} events ({:.1} MB NDJSON), {} per request, {} clients",
        n,
        input_bytes as f64 / 1e6,
        a.batch,
        a.clients
    );
    embedded.line("embedded log, local lake, files (1 process)", n);
    one.line("NATS + S3 + PostgreSQL (1 process)", n);
    split.line("NATS + S3 + PostgreSQL (collector+query, 2 workers)", n);
    println!(
        "  {:<44} {:>9.0} events/s to ack  ({raw_s:.2} s)",
        "raw JetStream publish of the same requests", raw_rate
    );
    println!(
        "  ratio NATS+S3+PG (1 process) / raw JetStream, to ack        {:.2}x",
        one.to_ack(n) / raw_rate
    );
    println!(
        "  ratio NATS+S3+PG (1 process) / embedded, end to end         {:.2}x",
        one.end_to_end(n) / embedded.end_to_end(n)
    );
    println!(
        "  ratio 2 workers / 1 process on NATS+S3+PG, end to end       {:.2}x",
        split.end_to_end(n) / one.end_to_end(n)
    );
    Ok(())
}
