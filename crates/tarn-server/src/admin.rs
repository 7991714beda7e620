//! The maintenance commands: `tarn compact`, `tarn vacuum` and `tarn storage` ask a running
//! server to compact (drawing its progress on stderr), to vacuum, or for the storage and cost
//! report, and print the answer (with `--dry-run`, the plan).

use anyhow::{Context, Result, bail};
use clap::Args;
use futures::StreamExt;

use crate::maintenance::CompactEvent;

#[derive(Args, Debug)]
pub struct CompactArgs {
    /// Only this dataset (default: every dataset).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Only this day's partitions (YYYY-MM-DD).
    #[arg(long)]
    pub day: Option<String>,
    /// Print the plan without changing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// The server to ask.
    #[arg(long, env = "TARN_SERVER", default_value = concat!("http://", "127.0.0.1:7411"))]
    pub server: String,
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

/// A one-line progress bar.
pub fn bar(done: u64, total: u64) -> String {
    const WIDTH: u64 = 30;
    let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH).min(WIDTH);
    format!(
        "[{}{}]",
        "#".repeat(filled as usize),
        ".".repeat((WIDTH - filled) as usize)
    )
}

/// The lines printed for one dataset's report.
pub fn render_report(r: &serde_json::Value) -> String {
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    let name = r["dataset"].as_str().unwrap_or("?");
    let bins = r["bins"].as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    if r["dry_run"].as_bool().unwrap_or(false) {
        out.push_str(&format!(
            "{name}: {} files; would merge {} files into {} in {} partitions\n",
            n("files_before"),
            bins.iter().map(|b| b["files"].as_u64().unwrap_or(0)).sum::<u64>(),
            bins.len(),
            n("partitions")
        ));
        for b in &bins {
            out.push_str(&format!(
                "  {}: {} files, {:.1} MB, {} rows\n",
                b["partition"].as_str().unwrap_or("?"),
                b["files"],
                mb(b["bytes"].as_u64().unwrap_or(0)),
                b["rows"]
            ));
        }
    } else {
        out.push_str(&format!(
            "{name}: {} files -> {} in {} partitions ({} commit(s), {} partition(s) left for the next run); \
             {:.1} MB read, {:.1} MB written, {} rows, {:.1} s\n",
            n("files_removed"),
            n("files_added"),
            n("partitions"),
            n("commits"),
            n("conflicts"),
            mb(n("bytes_read")),
            mb(n("bytes_written")),
            n("rows"),
            r["seconds"].as_f64().unwrap_or(0.0)
        ));
    }
    out
}

pub async fn run_compact(a: CompactArgs) -> Result<()> {
    let url = format!("{}/v1/compact", a.server.trim_end_matches('/'));
    let resp = reqwest::Client::new()
        .post(&url)
        .json(&serde_json::json!({"dataset": a.dataset, "day": a.day, "dry_run": a.dry_run}))
        .send()
        .await
        .with_context(|| format!("cannot reach tarn at {url}; is `tarn serve` running?"))?;
    let status = resp.status();
    if !status.is_success() {
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let msg = body["error"]["message"].as_str().unwrap_or("unknown error");
        bail!("{msg} (HTTP {status})");
    }
    let mut stream = resp.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    let mut finished = false;
    let mut drew = false;
    while let Some(chunk) = stream.next().await {
        pending.extend_from_slice(&chunk.context("reading the answer")?);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let ev: CompactEvent = serde_json::from_slice(&line).context("decoding a progress line")?;
            match ev {
                CompactEvent::Progress {
                    dataset,
                    bins_done,
                    bins_total,
                    bytes_done,
                    bytes_total,
                } => {
                    eprint!(
                        "\r{dataset} {} {bins_done}/{bins_total} bins, {:.1}/{:.1} MB",
                        bar(bytes_done, bytes_total),
                        mb(bytes_done),
                        mb(bytes_total)
                    );
                    drew = true;
                }
                CompactEvent::Report { report } => {
                    if drew {
                        eprintln!();
                        drew = false;
                    }
                    print!("{}", render_report(&report));
                }
                CompactEvent::Error { message } => bail!("{message}"),
                CompactEvent::Done => finished = true,
            }
        }
    }
    if !finished {
        bail!("the server stopped answering before compaction finished; run again to go on");
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct VacuumArgs {
    /// Only this dataset (default: every dataset).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Report what would be deleted without deleting.
    #[arg(long)]
    pub dry_run: bool,
    /// The server to ask.
    #[arg(long, env = "TARN_SERVER", default_value = concat!("http://", "127.0.0.1:7411"))]
    pub server: String,
}

pub async fn run_vacuum(a: VacuumArgs) -> Result<()> {
    let body = post_json(
        &a.server,
        "/v1/vacuum",
        serde_json::json!({"dataset": a.dataset, "dry_run": a.dry_run}),
    )
    .await?;
    for r in body["reports"].as_array().cloned().unwrap_or_default() {
        let n = |k: &str| r[k].as_u64().unwrap_or(0);
        println!(
            "{}: {} files on disk, {} active; {} {} files ({:.1} MB), {} kept within the retention window",
            r["dataset"].as_str().unwrap_or("?"),
            n("files_on_disk"),
            n("files_active"),
            if a.dry_run { "would delete" } else { "deleted" },
            n("files_deleted"),
            mb(n("bytes_deleted")),
            n("files_retained")
        );
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct LifecycleArgs {
    /// Only this dataset (default: every dataset).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Print the steps without taking them.
    #[arg(long)]
    pub dry_run: bool,
    /// The server to ask.
    #[arg(long, env = "TARN_SERVER", default_value = concat!("http://", "127.0.0.1:7411"))]
    pub server: String,
}

/// Posts a maintenance request and returns the JSON answer, or the server's error.
async fn post_json(server: &str, path: &str, body: serde_json::Value) -> Result<serde_json::Value> {
    let url = format!("{}{path}", server.trim_end_matches('/'));
    json_answer(reqwest::Client::new().post(&url).json(&body), &url).await
}

/// Sends a request and returns its JSON answer, or the server's error message.
pub async fn json_answer(req: reqwest::RequestBuilder, url: &str) -> Result<serde_json::Value> {
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach tarn at {url}; is `tarn serve` running?"))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.context("reading the answer")?;
    if !status.is_success() {
        let msg = body["error"]["message"].as_str().unwrap_or("unknown error");
        bail!("{msg} (HTTP {status})");
    }
    Ok(body)
}

pub async fn run_lifecycle(a: LifecycleArgs) -> Result<()> {
    let body = post_json(
        &a.server,
        "/v1/lifecycle",
        serde_json::json!({"dataset": a.dataset, "dry_run": a.dry_run}),
    )
    .await?;
    for r in body["reports"].as_array().cloned().unwrap_or_default() {
        let steps = r["steps"].as_array().cloned().unwrap_or_default();
        println!(
            "{}: {} step(s){}; {} files compacted first, {} moved, {} expired",
            r["dataset"].as_str().unwrap_or("?"),
            steps.len(),
            if a.dry_run { " planned" } else { "" },
            r["compacted_files"],
            r["files_moved"],
            r["files_expired"]
        );
        for s in steps {
            match s["step"].as_str() {
                Some("move") => println!(
                    "  day={} {} -> {}",
                    s["day"].as_str().unwrap_or("?"),
                    s["from"].as_str().unwrap_or("?"),
                    s["to"].as_str().unwrap_or("?")
                ),
                _ => println!("  day={} expire", s["day"].as_str().unwrap_or("?")),
            }
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    #[arg(long)]
    pub dataset: String,
    /// The day to bring back to the standard tier (YYYY-MM-DD).
    #[arg(long)]
    pub day: String,
    /// How many days it stays there before lifecycle may move it again.
    #[arg(long, default_value_t = 7)]
    pub days: u32,
    /// The server to ask.
    #[arg(long, env = "TARN_SERVER", default_value = concat!("http://", "127.0.0.1:7411"))]
    pub server: String,
}

pub async fn run_restore(a: RestoreArgs) -> Result<()> {
    let body = post_json(
        &a.server,
        "/v1/restore",
        serde_json::json!({"dataset": a.dataset, "day": a.day, "days": a.days}),
    )
    .await?;
    println!(
        "{} day={}: {} files back in the standard tier for {} days",
        a.dataset, a.day, body["files"], a.days
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct StorageArgs {
    /// Only this dataset (default: every dataset).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// The server to ask.
    #[arg(long, env = "TARN_SERVER", default_value = concat!("http://", "127.0.0.1:7411"))]
    pub server: String,
}

pub async fn run_storage(a: StorageArgs) -> Result<()> {
    let url = format!("{}/v1/storage", a.server.trim_end_matches('/'));
    let mut req = reqwest::Client::new().get(&url);
    if let Some(d) = &a.dataset {
        req = req.query(&[("dataset", d)]);
    }
    let body = json_answer(req, &url).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        print!("{}", render_storage(&body));
    }
    Ok(())
}

/// The storage report as text: a line per dataset and tier, then the extras and the costs.
pub fn render_storage(r: &serde_json::Value) -> String {
    let mut out = format!("storage and cost, month {}\n", r["month"].as_str().unwrap_or("?"));
    for d in r["datasets"].as_array().cloned().unwrap_or_default() {
        let n = |k: &str| d[k].as_u64().unwrap_or(0);
        let name = d["dataset"].as_str().unwrap_or("?");
        out.push_str(&format!("{name}\n"));
        for t in d["tiers"].as_array().cloned().unwrap_or_default() {
            out.push_str(&format!(
                "  {:<10} {} .. {}  {} partitions, {} files, {:.1} MB, mean file {:.2} MB, ${:.4}/month\n",
                t["tier"].as_str().unwrap_or("?"),
                t["first_day"].as_str().unwrap_or("?"),
                t["last_day"].as_str().unwrap_or("?"),
                t["partitions"],
                t["files"],
                mb(t["bytes"].as_u64().unwrap_or(0)),
                mb(t["mean_file_bytes"].as_u64().unwrap_or(0)),
                t["monthly_cost"].as_f64().unwrap_or(0.0)
            ));
        }
        out.push_str(&format!(
            "  waiting for vacuum {} files, {:.1} MB; raw zone {} files, {:.1} MB\n",
            n("unreferenced_files"),
            mb(n("unreferenced_bytes")),
            n("raw_files"),
            mb(n("raw_bytes"))
        ));
        out.push_str(&format!(
            "  scanned this month {:.1} MB, ${:.4}; retrieved from infrequent {:.1} MB, ${:.4}; storage ${:.4}/month; total ${:.4}/month\n",
            mb(n("scanned_bytes_month")),
            d["scan_cost_month"].as_f64().unwrap_or(0.0),
            mb(n("retrieved_bytes_month")),
            d["retrieval_cost_month"].as_f64().unwrap_or(0.0),
            d["monthly_storage_cost"].as_f64().unwrap_or(0.0),
            d["monthly_cost"].as_f64().unwrap_or(0.0)
        ));
    }
    out.push_str(&format!(
        "total ${:.4}/month\n",
        r["total_monthly_cost"].as_f64().unwrap_or(0.0)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_and_reports() {
        assert_eq!(bar(0, 10), format!("[{}]", ".".repeat(30)));
        assert_eq!(bar(5, 10), format!("[{}{}]", "#".repeat(15), ".".repeat(15)));
        assert_eq!(bar(0, 0), format!("[{}]", "#".repeat(30)));
        let dry = serde_json::json!({"dataset": "a", "dry_run": true, "files_before": 12, "partitions": 2,
            "bins": [{"partition": "day=2026-11-22/client_id=x", "files": 6, "bytes": 2_000_000, "rows": 60}]});
        let text = render_report(&dry);
        assert!(text.contains("would merge 6 files into 1 in 2 partitions"), "{text}");
        assert!(
            text.contains("day=2026-11-22/client_id=x: 6 files, 2.0 MB, 60 rows"),
            "{text}"
        );
    }
}

#[derive(Args, Debug)]
pub struct CatalogSearchArgs {
    /// Words to look for in names, tags, domains, owners, columns and descriptions.
    pub text: String,
    /// Most hits.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Print the JSON answer.
    #[arg(long)]
    pub json: bool,
    /// The server to ask.
    #[arg(long, env = "TARN_SERVER", default_value = concat!("http://", "127.0.0.1:7411"))]
    pub server: String,
}

pub async fn run_catalog_search(a: CatalogSearchArgs) -> Result<()> {
    let url = format!("{}/v1/catalog/search", a.server.trim_end_matches('/'));
    let req = reqwest::Client::new()
        .get(&url)
        .query(&[("q", a.text.as_str()), ("limit", &a.limit.to_string())]);
    let body = json_answer(req, &url).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let hits = body["hits"].as_array().cloned().unwrap_or_default();
    if hits.is_empty() {
        println!("no dataset matches {:?}", a.text);
    }
    for h in hits {
        println!(
            "{:<32} {:>4}  {}  [{}]",
            h["name"].as_str().unwrap_or("?"),
            h["score"],
            h["description"].as_str().unwrap_or(""),
            h["matched"]
                .as_array()
                .map(|m| m.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        );
    }
    Ok(())
}
