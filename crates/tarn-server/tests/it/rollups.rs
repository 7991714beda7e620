//! Rollups end to end: every rollup answer equals the same aggregation in SQL over the curated
//! table (exact metrics exactly, sketches within their documented error), read keys scope
//! reads to one tenant, and a kill -9, a restart and a rebuild change no answer.

use std::collections::BTreeMap;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::server::{Server, client, get_json, post_events, sql, wait_for};

const DESCRIPTOR: &str = r#"version: 1
name: auctions
fields:
  - { name: event_id, type: string, required: true }
  - { name: ts, type: timestamp, required: true }
  - { name: client_id, type: string, required: true }
  - { name: bidder, type: string }
  - { name: site, type: string }
  - { name: cpm, type: float64 }
  - { name: latency_ms, type: int64 }
  - { name: user_id, type: string }
event_time: ts
event_id: event_id
partitioning: { tenant: client_id }
rollups:
  - name: auction_stats
    dimensions: [bidder, site]
    grains: [hour, day]
    metrics:
      - { name: events, fn: count }
      - { name: revenue, fn: sum, field: cpm }
      - { name: max_latency, fn: max, field: latency_ms }
      - { name: min_cpm, fn: min, field: cpm }
      - { name: mean_cpm, fn: mean, field: cpm }
      - { name: users, fn: distinct, field: user_id }
      - { name: latency, fn: percentiles, field: latency_ms }
"#;

const TENANTS: [&str; 4] = ["acme", "beta", "gamma", "delta"];
const BIDDERS: [&str; 12] = [
    "b00", "b01", "b02", "b03", "b04", "b05", "b06", "b07", "b08", "b09", "b10", "b11",
];

/// Events over the last three days (the rollup keeps 93 days from the real clock), some
/// with null metric fields.
fn events(rng: &mut StdRng, n: usize, first_id: usize, start: i64) -> Vec<String> {
    let now = chrono::Utc::now().timestamp();
    (0..n)
        .map(|i| {
            let ts = rng.random_range(start..now);
            let t = chrono::DateTime::from_timestamp(ts, 0).expect("time");
            let cpm = if rng.random_bool(0.05) {
                "null".to_string()
            } else {
                format!("{:.3}", rng.random_range(0.01..30.0f64))
            };
            let lat = if rng.random_bool(0.05) {
                "null".to_string()
            } else {
                // Skewed: most fast, a long tail.
                (rng.random_range(1.0f64..12.0).exp() as i64).to_string()
            };
            format!(
                r#"{{"event_id":"e{}","ts":"{}","client_id":"{}","bidder":"{}","site":"s{}","cpm":{cpm},"latency_ms":{lat},"user_id":"u{}"}}"#,
                first_id + i,
                t.format("%Y-%m-%dT%H:%M:%SZ"),
                TENANTS[rng.random_range(0..TENANTS.len())],
                BIDDERS[rng.random_range(0..BIDDERS.len())],
                rng.random_range(0..3),
                rng.random_range(0..3_000),
            )
        })
        .collect()
}

fn start(dir: &Path, keys: &Path) -> Server {
    let ds = dir.join("datasets");
    std::fs::create_dir_all(&ds).expect("mkdir");
    std::fs::write(ds.join("auctions.yaml"), DESCRIPTOR).expect("descriptor");
    Server::start(
        &dir.join("data"),
        &[
            "--datasets",
            ds.to_str().expect("utf8"),
            "--batch-age-ms",
            "50",
            "--rollup-checkpoint-ms",
            "100",
            "--read-keys",
            keys.to_str().expect("utf8"),
        ],
    )
}

const ADMIN: &str = "admin-secret";
const ACME: &str = "acme-secret";

fn sha256(s: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn rollup(c: &reqwest::Client, url: &str, key: &str, query: &str) -> (u16, Value) {
    let r = c
        .get(format!("{url}/v1/rollups/auction_stats?{query}"))
        .bearer_auth(key)
        .send()
        .await
        .expect("rollup");
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

/// Waits until the rollup has applied `n` rows.
async fn wait_applied(c: &reqwest::Client, url: &str, n: u64) {
    let start = std::time::Instant::now();
    loop {
        let r: Value = c
            .get(format!("{url}/v1/rollups"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("json");
        if r["rollups"][0]["rows_applied"].as_u64().unwrap_or(0) >= n {
            return;
        }
        assert!(start.elapsed().as_secs() < 60, "rollup did not apply {n} rows: {r}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()) + 1e-9
}

/// Equal JSON, numbers within a relative 1e-9 (float sums differ with the order of addition).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            close(x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN), 1e-9)
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn secs_of(bucket: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(bucket.as_str().expect("bucket"))
        .expect("rfc3339")
        .timestamp()
}

/// The lower nearest-rank quantile, the definition the rollup documents.
fn quantile(sorted: &[i64], q: f64) -> f64 {
    sorted[(q * (sorted.len() - 1) as f64).floor() as usize] as f64
}

/// Checks every hourly bucket of one tenant against SQL over the table.
async fn check_hourly(c: &reqwest::Client, url: &str, tenant: &str, from: &str) {
    let (st, api) = rollup(
        c,
        url,
        ADMIN,
        &format!("tenant={tenant}&grain=hour&from={from}&quantiles=0.5,0.9,0.99"),
    )
    .await;
    assert_eq!(st, 200, "{api}");
    let (st, want) = sql(
        c,
        url,
        &format!(
            "SELECT CAST(extract(epoch FROM date_trunc('hour', ts)) AS BIGINT) AS b, count(*), sum(cpm), max(latency_ms), \
             min(cpm), avg(cpm), count(DISTINCT user_id) FROM auctions WHERE client_id = '{tenant}' GROUP BY 1 ORDER BY 1"
        ),
    )
    .await;
    assert_eq!(st, 200, "{want}");
    let (_, lat) = sql(
        c,
        url,
        &format!(
            "SELECT CAST(extract(epoch FROM date_trunc('hour', ts)) AS BIGINT) AS b, latency_ms FROM auctions \
             WHERE client_id = '{tenant}' AND latency_ms IS NOT NULL ORDER BY 1, 2"
        ),
    )
    .await;
    let mut lat_by: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for r in lat["rows"].as_array().expect("rows") {
        lat_by
            .entry(r[0].as_i64().expect("b"))
            .or_default()
            .push(r[1].as_i64().expect("lat"));
    }
    let rows = api["rows"].as_array().expect("rows");
    let want = want["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), want.len(), "{tenant}: buckets");
    let mut distinct_err_max = 0.0f64;
    for (a, w) in rows.iter().zip(want) {
        let b = secs_of(&a["bucket"]);
        assert_eq!(b, w[0].as_i64().expect("b"));
        assert_eq!(a["events"], w[1], "{tenant} {b}: count");
        assert!(same(&a["revenue"], &w[2]), "{tenant} {b}: sum {a} {w:?}");
        assert_eq!(a["max_latency"], w[3], "{tenant} {b}: max");
        assert_eq!(a["min_cpm"].as_f64(), w[4].as_f64(), "{tenant} {b}: min");
        assert!(same(&a["mean_cpm"], &w[5]), "{tenant} {b}: mean {a} {w:?}");
        let (d, dw) = (a["users"].as_f64().expect("users"), w[6].as_f64().expect("distinct"));
        // The estimate is rounded to a whole number: one off is rounding, not error. A small
        // bucket's error is the few values whose hashes share a register (about n²/8192 of
        // them, Poisson): three more are allowed there, which the relative bound cannot say
        // (an hourly bucket of 30 users once came out at 27 over the ~300 buckets checked).
        distinct_err_max = distinct_err_max.max(((d - dw).abs() - 1.0 - 3.0).max(0.0) / dw);
        let Some(vals) = lat_by.get(&b) else {
            assert!(a["latency"].is_null(), "{tenant} {b}: no latencies, yet {a}");
            continue;
        };
        for q in [0.5, 0.9, 0.99] {
            let name = format!("p{}", (q * 100_000.0f64).round() / 1000.0);
            let got = a["latency"][&name].as_f64().expect("quantile");
            let exact = quantile(vals, q);
            assert!(close(got, exact, 0.01), "{tenant} {b} {name}: {got} vs {exact}");
        }
    }
    // HyperLogLog with 4096 registers: 1.6% standard error, so within three of them.
    assert!(distinct_err_max < 0.05, "{tenant}: distinct error {distinct_err_max}");
}

/// The top bidders of one tenant-day, by event count, against SQL.
async fn check_top(c: &reqwest::Client, url: &str, key: &str, tenant: &str, day: &str) {
    let (st, api) = rollup(
        c,
        url,
        key,
        &format!("tenant={tenant}&grain=day&from={day}&to={day}&group_by=bidder&top=10"),
    )
    .await;
    assert_eq!(st, 200, "{api}");
    let (_, want) = sql(
        c,
        url,
        &format!(
            "SELECT bidder, count(*) AS n, sum(cpm) FROM auctions WHERE client_id = '{tenant}' AND day = '{day}' \
             GROUP BY 1 ORDER BY n DESC, bidder LIMIT 10"
        ),
    )
    .await;
    let got: Vec<(Value, Value)> = api["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| (r["bidder"].clone(), r["events"].clone()))
        .collect();
    let want: Vec<(Value, Value)> = want["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    assert_eq!(got.len(), 10);
    assert_eq!(got, want, "{tenant} {day}: top 10 bidders");
}

/// Grouped by site, filtered on one bidder, against SQL.
async fn check_filtered(c: &reqwest::Client, url: &str, tenant: &str, from: &str) {
    let (st, api) = rollup(
        c,
        url,
        ADMIN,
        &format!("tenant={tenant}&grain=day&from={from}&group_by=site&filter=bidder:b03"),
    )
    .await;
    assert_eq!(st, 200, "{api}");
    let (_, want) = sql(
        c,
        url,
        &format!(
            "SELECT day, site, count(*), sum(cpm) FROM auctions WHERE client_id = '{tenant}' AND bidder = 'b03' GROUP BY 1, 2 ORDER BY 1, 2"
        ),
    )
    .await;
    let mut got: Vec<(String, Value, Value)> = api["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["bucket"].as_str().expect("b")[..10].to_string(),
                r["site"].clone(),
                r["events"].clone(),
            )
        })
        .collect();
    got.sort_by(|a, b| (&a.0, a.1.as_str()).cmp(&(&b.0, b.1.as_str())));
    let want: Vec<(String, Value, Value)> = want["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| (r[0].as_str().expect("day").to_string(), r[1].clone(), r[2].clone()))
        .collect();
    assert_eq!(got, want, "{tenant}: by site for b03");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_equal_sql_survive_kill_and_rebuild_and_respect_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys.yaml");
    std::fs::write(
        &keys,
        format!(
            "version: 1\nkeys:\n  - {{ name: ops, tenant: \"*\", sha256: {} }}\n  - {{ name: acme, tenant: acme, sha256: {} }}\n",
            sha256(ADMIN),
            sha256(ACME)
        ),
    )
    .expect("keys");
    let mut s = start(dir.path(), &keys);
    let c = client();
    let mut rng = StdRng::seed_from_u64(7);
    // Every event lands in the three days from `first` (two days before today), whenever the
    // test runs, so `from` names the same day all along.
    let now = chrono::Utc::now();
    let first = now.timestamp() - now.timestamp().rem_euclid(86_400) - 2 * 86_400;
    let from = chrono::DateTime::from_timestamp(first, 0)
        .expect("day")
        .format("%Y-%m-%d")
        .to_string();
    let today = now.format("%Y-%m-%d").to_string();
    let all = events(&mut rng, 8_000, 0, first);
    for chunk in all.chunks(1_000) {
        let (st, r) = post_events(&c, &s.url, "auctions", chunk.join("\n")).await;
        assert_eq!((st, r["accepted"].as_u64()), (200, Some(chunk.len() as u64)), "{r}");
    }
    wait_for(&c, &s.url, "SELECT count(*) FROM auctions", 60, |v| {
        v["rows"][0][0] == 8_000
    })
    .await;
    wait_applied(&c, &s.url, 8_000).await;

    for t in TENANTS {
        check_hourly(&c, &s.url, t, &from).await;
        check_filtered(&c, &s.url, t, &from).await;
    }
    check_top(&c, &s.url, ADMIN, "beta", &from).await;
    let page: Value = get_json(&c, &format!("{}/v1/datasets/auctions", s.url)).await;
    assert_eq!(page["lineage"]["read_by"][0]["name"], "auction_stats", "{page}");

    // Keys: none, a wrong one, another tenant's: refused; acme's own key reads acme.
    let r = c
        .get(format!("{}/v1/rollups/auction_stats?tenant=acme&from={from}", s.url))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 401);
    let (st, _) = rollup(&c, &s.url, "wrong", &format!("tenant=acme&from={from}")).await;
    assert_eq!(st, 401);
    let (st, v) = rollup(&c, &s.url, ACME, &format!("tenant=beta&from={from}")).await;
    assert_eq!(st, 403, "{v}");
    check_top(&c, &s.url, ACME, "acme", &from).await;
    let (st, mine) = rollup(&c, &s.url, ACME, &format!("from={from}&grain=hour")).await;
    assert_eq!((st, mine["tenant"].as_str()), (200, Some("acme")), "{mine}");
    let r = c
        .get(format!("{}/v1/rollups", s.url))
        .bearer_auth(ACME)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 403, "a tenant key cannot list every rollup");
    let (st, v) = rollup(&c, &s.url, ADMIN, &format!("tenant=acme&from={from}&grain=minute")).await;
    assert_eq!(st, 400, "{v}");
    // Bad reads get clear errors.
    for (q, want) in [
        (format!("tenant=acme&from={from}&colour=red"), "unknown parameter"),
        ("tenant=acme&from=yesterday".to_string(), "is not a day"),
        (format!("tenant=acme&from={today}&to={from}"), "range is empty"),
        (format!("tenant=acme&from={from}&group_by=country"), "not a dimension"),
        (format!("tenant=acme&from={from}&filter=bidder"), "dimension:value"),
        (format!("tenant=acme&from={from}&top=0"), "from 1 to 10000"),
        (format!("tenant=acme&from={from}&quantiles=2"), "between 0 and 1"),
        (format!("from={from}"), "tenant is required"),
    ] {
        let (st, v) = rollup(&c, &s.url, ADMIN, &q).await;
        assert_eq!(st, 400, "{q}: {v}");
        assert!(
            v["error"]["message"].as_str().is_some_and(|m| m.contains(want)),
            "{q}: {v}"
        );
    }
    let r = c
        .get(format!("{}/v1/rollups/nope?tenant=acme&from={from}", s.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 404);

    // kill -9 while events arrive: after the restart the rollup reloads its checkpoint and
    // replays the rest, and again equals the table, whatever made it in before the kill.
    let more = events(&mut rng, 4_000, 8_000, first);
    let url = s.url.clone();
    let poster = tokio::spawn(async move {
        let c = client();
        for chunk in more.chunks(200) {
            if c.post(format!("{url}/v1/datasets/auctions/events"))
                .body(chunk.join("\n"))
                .send()
                .await
                .is_err()
            {
                break;
            }
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    s.kill9();
    let _ = poster.await;
    let s = start(dir.path(), &keys);
    settle(&c, &s.url).await;
    for t in TENANTS {
        wait_caught_up(&c, &s.url, t, &from).await;
        check_hourly(&c, &s.url, t, &from).await;
    }

    // A rebuild of every day from the table changes no answer, and events that arrive after
    // it are counted once.
    let before = rollup(&c, &s.url, ADMIN, &format!("tenant=gamma&grain=hour&from={from}"))
        .await
        .1["rows"]
        .clone();
    let r = c
        .post(format!("{}/v1/rollups/auction_stats/rebuild", s.url))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"from": from, "to": today}))
        .send()
        .await
        .expect("rebuild");
    let text = r.text().await.expect("body");
    assert!(text.contains("\"done\""), "{text}");
    assert!(text.contains("\"days_total\":3"), "{text}");
    let rebuilt = rollup(&c, &s.url, ADMIN, &format!("tenant=gamma&grain=hour&from={from}"))
        .await
        .1["rows"]
        .clone();
    assert!(
        same(&rebuilt, &before),
        "answers after a rebuild:\n{rebuilt}\nvs\n{before}"
    );
    let later = events(&mut rng, 2_000, 12_000, first);
    let (st, _) = post_events(&c, &s.url, "auctions", later.join("\n")).await;
    assert_eq!(st, 200);
    settle(&c, &s.url).await;
    for t in TENANTS {
        wait_caught_up(&c, &s.url, t, &from).await;
        check_hourly(&c, &s.url, t, &from).await;
    }
}

/// Waits until the table's row count stops changing (curate has replayed what it will).
async fn settle(c: &reqwest::Client, url: &str) {
    let started = std::time::Instant::now();
    let mut last = None;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(1_000)).await;
        let (st, v) = sql(c, url, "SELECT count(*) FROM auctions").await;
        let n = v["rows"][0][0].as_u64();
        if st == 200 && n.is_some() && n == last {
            return;
        }
        last = n;
        assert!(started.elapsed().as_secs() < 60, "table count never settled: {v}");
    }
}

/// Waits until a tenant's events in the rollup (over every day) match its rows in the table.
async fn wait_caught_up(c: &reqwest::Client, url: &str, tenant: &str, from: &str) {
    let start_wait = std::time::Instant::now();
    loop {
        let (_, v) = rollup(c, url, ADMIN, &format!("tenant={tenant}&grain=day&from={from}")).await;
        let (_, w) = sql(
            c,
            url,
            &format!("SELECT count(*) FROM auctions WHERE client_id = '{tenant}'"),
        )
        .await;
        let sum: u64 = v["rows"]
            .as_array()
            .map(|r| r.iter().map(|r| r["events"].as_u64().unwrap_or(0)).sum())
            .unwrap_or(0);
        if Some(sum) == w["rows"][0][0].as_u64() {
            return;
        }
        assert!(start_wait.elapsed().as_secs() < 60, "rollup {sum} vs sql {w}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
