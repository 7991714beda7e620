//! Query guardrails through the real server: a dry run's estimate, byte budgets (per request and
//! for the server), and datasets that require a partition filter.

use std::process::Command;

use crate::server::*;

async fn query(c: &reqwest::Client, url: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let r = c
        .post(format!("{url}/v1/query"))
        .json(&body)
        .send()
        .await
        .expect("query");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_budgets_and_required_partition_filters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ds = dir.path().join("datasets");
    std::fs::create_dir_all(&ds).expect("mkdir");
    std::fs::write(
        ds.join("guarded.yaml"),
        "name: guarded\nfields:\n  - { name: event_id, type: string, required: true }\n  - { name: ts, type: timestamp, required: true }\n  - { name: client_id, type: string, required: true }\n  - { name: cpm, type: float64 }\nevent_time: ts\nevent_id: event_id\npartitioning: { tenant: client_id }\nquery: { require_partition_filter: true }\n",
    )
    .expect("descriptor");
    let s = Server::start(
        &dir.path().join("data"),
        &["--datasets", ds.to_str().expect("utf8"), "--batch-age-ms", "50"],
    );
    let c = client();
    let body: Vec<String> = (0..40)
        .map(|i| {
            format!(
                r#"{{"event_id":"e{i}","ts":"2026-11-{:02}T12:00:00Z","client_id":"c{}","cpm":{i}}}"#,
                20 + i % 2,
                i % 4
            )
        })
        .collect();
    let (st, v) = post_events(&c, &s.url, "guarded", body.join("\n")).await;
    assert_eq!(st, 200, "{v}");
    let day = "SELECT count(DISTINCT event_id) FROM guarded WHERE day = '2026-11-20'";
    wait_for(&c, &s.url, day, 30, |v| v["rows"][0][0] == 20).await;

    // A filter reaches the Parquet scan once (the engine pushes it down a second time beside
    // the table's own copy; the scan keeps one), and the lookup still finds its row.
    let lookup = "SELECT cpm FROM guarded WHERE client_id = 'c1' AND event_id = 'e5'";
    let (st, v) = sql(&c, &s.url, &format!("EXPLAIN {lookup}")).await;
    assert_eq!(st, 200, "{v}");
    let plan = v["rows"].to_string();
    let predicate = plan
        .split("predicate=")
        .nth(1)
        .and_then(|p| p.split(", pruning_predicate").next())
        .expect("the scan has a predicate");
    assert_eq!(predicate.matches("event_id@").count(), 1, "{plan}");
    let (st, v) = sql(&c, &s.url, lookup).await;
    assert_eq!((st, v["rows"].clone()), (200, serde_json::json!([[5.0]])), "{v}");

    // No partition filter: refused, naming the dataset and its partition columns.
    let (st, v) = sql(&c, &s.url, "SELECT count(DISTINCT event_id) FROM guarded").await;
    assert_eq!(st, 403, "{v}");
    let msg = v["error"]["message"].as_str().expect("message");
    assert!(msg.contains("guarded (filter on day or client_id)"), "{msg}");
    let (st, _) = sql(&c, &s.url, "SELECT sum(cpm) FROM guarded WHERE client_id = 'c1'").await;
    assert_eq!(st, 200, "a tenant filter is a partition filter");
    // Mentioning a partition column is not filtering on it.
    for q in [
        "SELECT sum(cpm) FROM guarded WHERE day IS NOT NULL",
        "SELECT sum(cpm) FROM guarded WHERE day <> '2026-11-20'",
        "SELECT sum(cpm) FROM guarded WHERE cpm > 1 OR day = '2026-11-20'",
        "SELECT sum(cpm) FROM (SELECT * FROM guarded) t WHERE cpm > 1",
    ] {
        let (st, v) = sql(&c, &s.url, q).await;
        assert_eq!(st, 403, "{q}: {v}");
    }
    // SQL only reads: no writes into tables, no files written, no catalog changes.
    let copy_to = dir.path().join("copied.csv");
    for q in [
        "INSERT INTO guarded VALUES ('x', now(), 'c0', 1.0, now(), '2026-11-20')".to_string(),
        "CREATE TABLE t AS SELECT 1".to_string(),
        format!("COPY (SELECT 1) TO '{}'", copy_to.display()),
        "SET datafusion.execution.batch_size = 1".to_string(),
    ] {
        let (st, v) = sql(&c, &s.url, &q).await;
        assert_eq!(st, 400, "{q}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .expect("message")
                .contains("not supported"),
            "{q}: {v}"
        );
    }
    assert!(!copy_to.exists());

    // A dry run estimates without running, and prices the bytes.
    let (st, v) = query(&c, &s.url, serde_json::json!({"sql": day, "dry_run": true})).await;
    assert_eq!(st, 200, "{v}");
    let (files, bytes) = (
        v["estimate"]["files"].as_u64().expect("files"),
        v["estimate"]["bytes"].as_u64().expect("bytes"),
    );
    assert_eq!(files, 2, "even events fall on the 20th, for tenants c0 and c2: {v}");
    assert!(
        bytes > 0 && v["estimate"]["cost_usd"].as_f64().expect("cost") > 0.0,
        "{v}"
    );
    assert!(v.get("rows").is_none(), "nothing ran: {v}");

    // A budget below the estimate refuses the query before it runs, giving the estimate.
    let (st, v) = query(&c, &s.url, serde_json::json!({"sql": day, "bytes_max": bytes - 1})).await;
    assert_eq!(st, 403, "{v}");
    let msg = v["error"]["message"].as_str().expect("message");
    assert!(
        msg.contains(&format!("would read {bytes} bytes in {files} files")),
        "{msg}"
    );
    let (st, _) = query(&c, &s.url, serde_json::json!({"sql": day, "bytes_max": bytes})).await;
    assert_eq!(st, 200);

    // Every query is in the history, however it ended.
    let (st, v) = sql(
        &c,
        &s.url,
        "SELECT who, sql, status, error, rows, bytes_scanned, duration_ms FROM system.queries ORDER BY started_at",
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let rows = v["rows"].as_array().expect("rows");
    let refused = rows
        .iter()
        .find(|r| r[1] == "SELECT count(DISTINCT event_id) FROM guarded")
        .expect("the refused query is listed");
    assert_eq!(
        (refused[0].as_str(), refused[2].as_str()),
        (Some("anonymous"), Some("refused"))
    );
    assert!(
        refused[3]
            .as_str()
            .expect("error")
            .contains("must filter on a partition column")
    );
    let ok = rows
        .iter()
        .rev()
        .find(|r| r[1] == day && r[2] == "ok")
        .expect("the day query is listed");
    assert_eq!(ok[4].as_u64(), Some(1), "one result row");
    assert!(
        ok[5].as_u64().expect("bytes") > 0 && ok[6].as_f64().expect("ms") > 0.0,
        "{ok:?}"
    );
    let (st, v) = sql(&c, &s.url, "SELECT nope FROM guarded WHERE day = '2026-11-20'").await;
    assert_eq!(st, 400, "{v}");
    let (_, v) = sql(&c, &s.url, "SELECT status FROM system.queries WHERE sql LIKE '%nope%'").await;
    assert_eq!(v["rows"][0][0], "error", "{v}");

    let out = Command::new(env!("CARGO_BIN_EXE_tarn"))
        .args(["sql", day, "--dry-run", "--bytes-max", "1", "--server", &s.url])
        .output()
        .expect("tarn sql");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("would read {files} files, {bytes} bytes"))
            && text.contains("over the budget of 1 bytes"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_budget_caps_every_query() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = start_auctions(dir.path(), &["--query-bytes-max", "100"]);
    let c = client();
    let body = r#"{"event_id":"a","ts":"2026-11-22T12:00:00Z","client_id":"acme","bidder":"b","cpm":1.5}"#;
    let (st, v) = post_events(&c, &s.url, "auctions", body.to_string()).await;
    assert_eq!(st, 200, "{v}");
    // count(*) is answered from the log's statistics: no file, no bytes, within any budget.
    wait_for(&c, &s.url, "SELECT count(*) FROM auctions", 30, |v| {
        v["rows"][0][0] == 1
    })
    .await;
    let (st, v) = sql(&c, &s.url, "SELECT sum(cpm) FROM auctions").await;
    assert_eq!(st, 403, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .expect("message")
            .contains("budget of 100 bytes"),
        "{v}"
    );
    // A request cannot raise the server's budget.
    let (st, _) = query(
        &c,
        &s.url,
        serde_json::json!({"sql": "SELECT sum(cpm) FROM auctions", "bytes_max": 1_000_000}),
    )
    .await;
    assert_eq!(st, 403);
}

/// A key's budget replaces the server's for its queries; a tenant key runs no SQL; the
/// history names the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_has_its_own_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sha = |s: &str| {
        use sha2::Digest as _;
        sha2::Sha256::digest(s.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let keys = dir.path().join("keys.yaml");
    std::fs::write(
        &keys,
        format!(
            "version: 1\nkeys:\n  - {{ name: intern, tenant: \"*\", sha256: {}, query_bytes_max: 100 }}\n  - {{ name: analyst, tenant: \"*\", sha256: {}, query_bytes_max: 1000000000 }}\n  - {{ name: acme, tenant: acme, sha256: {} }}\n",
            sha("intern-secret"),
            sha("analyst-secret"),
            sha("acme-secret")
        ),
    )
    .expect("keys");
    let s = start_auctions(
        dir.path(),
        &["--query-bytes-max", "100", "--read-keys", keys.to_str().expect("utf8")],
    );
    let c = client();
    let body = r#"{"event_id":"a","ts":"2026-11-22T12:00:00Z","client_id":"acme","bidder":"b","cpm":1.5}"#;
    let (st, v) = post_events(&c, &s.url, "auctions", body.to_string()).await;
    assert_eq!(st, 200, "{v}");
    wait_for(&c, &s.url, "SELECT count(*) FROM auctions", 30, |v| {
        v["rows"][0][0] == 1
    })
    .await;
    let as_key = |secret: &'static str| {
        let c = c.clone();
        let url = s.url.clone();
        async move {
            let r = c
                .post(format!("{url}/v1/query"))
                .bearer_auth(secret)
                .json(&serde_json::json!({"sql": "SELECT sum(cpm) FROM auctions"}))
                .send()
                .await
                .expect("query");
            (r.status().as_u16(), r.json::<serde_json::Value>().await.expect("json"))
        }
    };
    // Anonymous: the server's 100 bytes. The intern's key: its own 100. The analyst: 1 GB.
    let (st, _) = sql(&c, &s.url, "SELECT sum(cpm) FROM auctions").await;
    assert_eq!(st, 403);
    let (st, v) = as_key("intern-secret").await;
    assert_eq!(st, 403, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("budget of 100 bytes")),
        "{v}"
    );
    let (st, v) = as_key("analyst-secret").await;
    assert_eq!((st, &v["rows"][0][0]), (200, &serde_json::json!(1.5)), "{v}");
    let (st, v) = as_key("acme-secret").await;
    assert_eq!(st, 403, "{v}");
    assert_eq!(v["error"]["code"], "tenant_key");
    let (st, _) = as_key("wrong").await;
    assert_eq!(st, 401);
    let (_, v) = sql(
        &c,
        &s.url,
        "SELECT who, status FROM system.queries WHERE sql = 'SELECT sum(cpm) FROM auctions' ORDER BY started_at",
    )
    .await;
    let whos: Vec<_> = v["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| format!("{}:{}", r[0].as_str().unwrap_or("?"), r[1].as_str().unwrap_or("?")))
        .collect();
    assert_eq!(whos, ["anonymous:refused", "intern:refused", "analyst:ok"], "{v}");
    // With a key file, changing the catalog takes a `*` key.
    let apply = |secret: Option<&'static str>| {
        let c = c.clone();
        let url = s.url.clone();
        async move {
            let mut r = c
                .post(format!("{url}/v1/catalog/apply"))
                .json(&serde_json::json!({"descriptors": []}));
            if let Some(k) = secret {
                r = r.bearer_auth(k);
            }
            r.send().await.expect("apply").status().as_u16()
        }
    };
    assert_eq!(apply(None).await, 401);
    assert_eq!(apply(Some("acme-secret")).await, 403);
    assert_eq!(apply(Some("analyst-secret")).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_by_and_sort_larger_than_the_memory_limit_spill_and_complete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = start_auctions(dir.path(), &["--query-memory-mb", "4", "--query-concurrency", "1"]);
    let c = client();
    let n = 60_000;
    for part in 0..6 {
        let body: Vec<String> = (0..n / 6)
            .map(|i| {
                let id = part * (n / 6) + i;
                format!(
                    r#"{{"event_id":"event-{id:08}-{}","ts":"2026-11-22T12:00:00Z","client_id":"c{}","bidder":"bidder-{}","cpm":{}}}"#,
                    "x".repeat(200),
                    id % 3,
                    id % 1000,
                    id % 97
                )
            })
            .collect();
        let (st, v) = post_events(&c, &s.url, "auctions", body.join("\n")).await;
        assert_eq!(st, 200, "{v}");
    }
    wait_for(&c, &s.url, "SELECT count(*) FROM auctions", 60, |v| {
        v["rows"][0][0] == n
    })
    .await;
    // Every one of 60,000 distinct ids of 214 bytes (12.8 MB of keys), grouped and sorted in
    // 4 MiB: the aggregation and the sort spill to disk.
    let r = c
        .post(format!("{}/v1/query", s.url))
        .json(&serde_json::json!({
            "sql": "SELECT event_id, count(*) AS k, sum(cpm) AS s FROM auctions GROUP BY event_id ORDER BY event_id DESC",
            "format": "ndjson"
        }))
        .send()
        .await
        .expect("query");
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.expect("body");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        n,
        "every group, in order: {}",
        &text[text.len().saturating_sub(300)..]
    );
    let first: serde_json::Value = serde_json::from_str(lines[0]).expect("json");
    assert!(
        first["event_id"].as_str().expect("id").starts_with("event-00059999-"),
        "{first}"
    );
    assert_eq!(first["k"], 1);

    // A client that stops reading a streamed answer does not keep the only query turn past the
    // query's timeout. The answer (eight copies of the table, about 200 MB) is far larger than
    // what the two sockets can hold between them (up to 32 MiB of receive buffer on loopback
    // here), so the server is left waiting to write until the timeout cuts it.
    let copies = ["SELECT * FROM auctions"; 8].join(" UNION ALL ");
    let stalled = c
        .post(format!("{}/v1/query", s.url))
        .json(&serde_json::json!({"sql": copies, "format": "ndjson", "timeout_ms": 500}))
        .send()
        .await
        .expect("query");
    assert_eq!(stalled.status().as_u16(), 200);
    // Meanwhile a query with a short timeout runs out of time waiting for the turn: it answers
    // 504 and the history lists it as stopped.
    let (st, v) = query(
        &c,
        &s.url,
        serde_json::json!({"sql": "SELECT 'waited for a turn'", "timeout_ms": 50}),
    )
    .await;
    assert_eq!(st, 504, "{v}");
    let started = std::time::Instant::now();
    let (st, v) = sql(&c, &s.url, "SELECT count(DISTINCT event_id) FROM auctions").await;
    assert_eq!((st, v["rows"][0][0].as_u64()), (200, Some(n as u64)), "{v}");
    assert!(
        started.elapsed().as_secs() < 10,
        "waited {:?} for a turn",
        started.elapsed()
    );
    // The stalled answer ends in an error, not as if it were complete.
    assert!(stalled.text().await.is_err(), "a cut answer must not look whole");
    let (_, v) = sql(
        &c,
        &s.url,
        "SELECT status FROM system.queries WHERE sql LIKE '%waited for a turn%' AND sql NOT LIKE '%system.queries%'",
    )
    .await;
    assert_eq!(v["rows"][0][0], "stopped", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_table_fails_only_the_queries_that_name_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let s = Server::start(&data, &["--batch-age-ms", "50"]);
    let c = client();
    for ds in ["good", "broken"] {
        let (st, v) = post_events(&c, &s.url, ds, r#"{"k":"v","n":1}"#.to_string()).await;
        assert_eq!(st, 200, "{v}");
        wait_for(&c, &s.url, &format!("SELECT count(*) FROM {ds}"), 30, |v| {
            v["rows"][0][0] == 1
        })
        .await;
    }
    // The next commit of `broken` is garbage.
    let log = data.join("lake/tables/broken/_delta_log");
    let last = std::fs::read_dir(&log)
        .expect("log")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json")?.parse::<u64>().ok())
        .max()
        .expect("a commit");
    std::fs::write(log.join(format!("{:020}.json", last + 1)), b"this is not a commit").expect("write");
    let (st, v) = sql(&c, &s.url, "SELECT sum(n) FROM good").await;
    assert_eq!((st, v["rows"][0][0].as_i64()), (200, Some(1)), "{v}");
    let (st, v) = sql(&c, &s.url, "SELECT sum(n) FROM broken").await;
    assert_eq!(st, 500, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .expect("message")
            .contains("opening the table of broken"),
        "{v}"
    );
}
