//! `tarn bench --rollups`: read latency of rollups while ingestion runs. Half the events
//! span the 93 days up to today and are ingested and rolled up first; the other half, today's,
//! is posted while two reads repeat: a 93-day hourly series of the largest customer and its
//! top 10 bidders today. The same answers computed by SQL over the curated table are timed in
//! the same run, and the answers are checked against each other at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bench::{
    BenchArgs, DESCRIPTOR, count, cut_bodies, generate_from, peak_rss_kib, percentile, post_all, spawn_server,
};

const ROLLUP: &str = r#"rollups:
  - name: auction_stats
    dimensions: [bidder]
    grains: [hour, day]
    metrics:
      - { name: events, fn: count }
      - { name: revenue, fn: sum, field: cpm }
      - { name: slowest, fn: max, field: latency_ms }
      - { name: pages, fn: distinct, field: page_url }
      - { name: latency, fn: percentiles, field: latency_ms }
"#;

const CUSTOMER: &str = "client_000";

async fn timed_get(c: &reqwest::Client, url: &str) -> Result<(f64, serde_json::Value)> {
    let t = Instant::now();
    let r = c.get(url).send().await?;
    let st = r.status();
    let v: serde_json::Value = r.json().await?;
    if !st.is_success() {
        bail!("{url} answered {st}: {v}");
    }
    Ok((t.elapsed().as_secs_f64() * 1000.0, v))
}

async fn timed_sql(c: &reqwest::Client, url: &str, sql: &str) -> Result<(f64, serde_json::Value)> {
    let t = Instant::now();
    let r = c
        .post(format!("{url}/v1/query"))
        .json(&serde_json::json!({"sql": sql, "row_limit": 100_000}))
        .send()
        .await?;
    let st = r.status();
    let v: serde_json::Value = r.json().await?;
    if !st.is_success() {
        bail!("query answered {st}: {v}");
    }
    Ok((t.elapsed().as_secs_f64() * 1000.0, v))
}

async fn rows_applied(c: &reqwest::Client, url: &str) -> Result<u64> {
    let v: serde_json::Value = c.get(format!("{url}/v1/rollups")).send().await?.json().await?;
    Ok(v["rollups"][0]["rows_applied"].as_u64().unwrap_or(0))
}

fn line(name: &str, mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&ms, 0.5), percentile(&ms, 0.99));
    println!(
        "  {name:<44} p50 {p50:>8.2} ms   p99 {p99:>8.2} ms   ({} reads)",
        ms.len()
    );
    (p50, p99)
}

pub async fn run(a: &BenchArgs) -> Result<()> {
    if a.dir.exists() {
        std::fs::remove_dir_all(&a.dir).with_context(|| format!("wiping {}", a.dir.display()))?;
    }
    std::fs::create_dir_all(a.dir.join("datasets"))?;
    let now = chrono::Utc::now().timestamp();
    let today = now - now.rem_euclid(86_400);
    let first_day = today - 92 * 86_400;
    // The history: half the events over the 93 days up to today, ingested and rolled up
    // before the reads. The live half: today's events, posted while the reads run.
    let history = a.dir.join("history.ndjson");
    let live = a.dir.join("live.ndjson");
    eprintln!(
        "generating {} events: half over the 93 days up to today, half today...",
        a.events
    );
    generate_from(&history, a.events / 2, first_day, 93, a.customers, 42)?;
    generate_from(&live, a.events - a.events / 2, today, 1, a.customers, 43)?;
    std::fs::write(a.dir.join("datasets/auctions.yaml"), format!("{DESCRIPTOR}{ROLLUP}"))?;
    let first = cut_bodies(&history, a.batch)?;
    let second = cut_bodies(&live, a.batch)?;
    let first_events: u64 = first.iter().map(|(n, _)| *n as u64).sum();
    let (mut child, url) = spawn_server(&a.dir, &[])?;
    let pid = child.id();
    let res = async {
        let c = reqwest::Client::new();
        post_all(&url, "auctions", Arc::new(first), a.clients, None).await?;
        let t = Instant::now();
        while count(&url, "auctions").await? < first_events || rows_applied(&c, &url).await? < first_events {
            if t.elapsed() > Duration::from_secs(600) {
                bail!("the first half was not curated and rolled up within 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let day = chrono::DateTime::from_timestamp(today, 0).context("day")?.format("%Y-%m-%d").to_string();
        let from = chrono::DateTime::from_timestamp(first_day, 0).context("day")?.format("%Y-%m-%d").to_string();
        let series = format!("{url}/v1/rollups/auction_stats?tenant={CUSTOMER}&grain=hour&from={from}&metrics=events,revenue");
        let top = format!("{url}/v1/rollups/auction_stats?tenant={CUSTOMER}&grain=day&from={day}&to={day}&group_by=bidder&top=10&metrics=events,revenue");
        let series_sql = format!(
            "SELECT date_trunc('hour', ts) AS hour, count(*) AS events, sum(cpm) AS revenue FROM auctions \
             WHERE client_id = '{CUSTOMER}' AND day >= '{from}' GROUP BY 1 ORDER BY 1"
        );
        let top_sql = format!(
            "SELECT bidder, count(*) AS events, sum(cpm) AS revenue FROM auctions WHERE client_id = '{CUSTOMER}' \
             AND day = '{day}' GROUP BY 1 ORDER BY events DESC, bidder LIMIT 10"
        );
        // The second half goes in while the reads run.
        let ingest_url = url.clone();
        let second_events: u64 = second.iter().map(|(n, _)| *n as u64).sum();
        let clients = a.clients.clamp(1, 2);
        // Paced to last about 20 s, so that every read below runs while events arrive.
        let pace = (second_events as f64 / 20.0).max(1.0);
        let ingest = tokio::spawn(async move {
            let t = Instant::now();
            post_all(&ingest_url, "auctions", Arc::new(second), clients, Some(pace)).await?;
            Ok::<_, anyhow::Error>(t.elapsed().as_secs_f64())
        });
        let (mut r_series, mut r_top, mut s_series, mut s_top) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut buckets = 0;
        let mut server_us = Vec::new();
        let mut i = 0usize;
        while !ingest.is_finished() {
            let (ms, v) = timed_get(&c, &series).await?;
            buckets = v["buckets_read"].as_u64().unwrap_or(0);
            server_us.push(v["took_us"].as_f64().unwrap_or(0.0) / 1000.0);
            r_series.push(ms);
            let (ms, v) = timed_get(&c, &top).await?;
            server_us.push(v["took_us"].as_f64().unwrap_or(0.0) / 1000.0);
            r_top.push(ms);
            // SQL is slower by orders of magnitude: one SQL pair every 20 rollup pairs.
            if i.is_multiple_of(20) {
                s_series.push(timed_sql(&c, &url, &series_sql).await?.0);
                s_top.push(timed_sql(&c, &url, &top_sql).await?.0);
            }
            i += 1;
            if i > 100_000 {
                break;
            }
        }
        let ingest_s = ingest.await??;
        let acked = Instant::now();
        println!("rollup reads while {second_events} events were ingested ({:.0} events/s), {} customers, 93 days", second_events as f64 / ingest_s, a.customers);
        let (rs50, rs99) = line(&format!("rollup: hourly series, 93 days ({buckets} buckets)"), r_series);
        let (ss50, ss99) = line("SQL:    the same series", s_series);
        let (rt50, rt99) = line("rollup: top 10 bidders, one customer-day", r_top);
        let (st50, st99) = line("SQL:    the same top 10", s_top);
        line("rollup: time inside the server, both reads", server_us);
        println!("  SQL / rollup, hourly series                  p50 {:.0}x   p99 {:.0}x", ss50 / rs50, ss99 / rs99);
        println!("  SQL / rollup, top 10                         p50 {:.0}x   p99 {:.0}x", st50 / rt50, st99 / rt99);
        println!("  goal p99 under 20 ms: {}", if rs99.max(rt99) < 20.0 { "met" } else { "not met" });

        // Once everything is in, the rollup and SQL give the same counts.
        let total = a.events as u64;
        while rows_applied(&c, &url).await? < total {
            if acked.elapsed() > Duration::from_secs(600) {
                bail!("the second half was not rolled up within 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!("  rollup lag: every event applied {:.2} s after the last ack", acked.elapsed().as_secs_f64());
        while count(&url, "auctions").await? < total {
            if acked.elapsed() > Duration::from_secs(600) {
                bail!("the second half was not curated within 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (_, rv) = timed_get(&c, &top).await?;
        let (_, sv) = timed_sql(&c, &url, &top_sql).await?;
        let got: Vec<(String, u64)> = rv["rows"]
            .as_array()
            .context("rows")?
            .iter()
            .map(|r| (r["bidder"].as_str().unwrap_or("").to_string(), r["events"].as_u64().unwrap_or(0)))
            .collect();
        let want: Vec<(String, u64)> = sv["rows"]
            .as_array()
            .context("rows")?
            .iter()
            .map(|r| (r[0].as_str().unwrap_or("").to_string(), r[1].as_u64().unwrap_or(0)))
            .collect();
        let (_, rs) = timed_get(&c, &series).await?;
        let (_, ss) = timed_sql(&c, &url, &series_sql).await?;
        let rsum: u64 = rs["rows"].as_array().context("rows")?.iter().map(|r| r["events"].as_u64().unwrap_or(0)).sum();
        let ssum: u64 = ss["rows"].as_array().context("rows")?.iter().map(|r| r[1].as_u64().unwrap_or(0)).sum();
        println!(
            "  answers agree: top 10 {}, series {} buckets / {} events in both: {}",
            if got == want { "yes" } else { "NO" },
            rs["rows"].as_array().map(Vec::len).unwrap_or(0),
            rsum,
            if rsum == ssum && rs["rows"].as_array().map(Vec::len) == ss["rows"].as_array().map(Vec::len) { "yes" } else { "NO" }
        );
        let st: serde_json::Value = c.get(format!("{url}/v1/rollups")).send().await?.json().await?;
        println!(
            "  rollup state: {} groups, {:.0} MB in its chunk files; server peak RSS {:.0} MiB",
            st["rollups"][0]["groups"],
            st["rollups"][0]["bytes_on_disk"].as_f64().unwrap_or(0.0) / 1e6,
            peak_rss_kib(pid) as f64 / 1024.0
        );
        Ok(())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    res
}
