//! The spine end to end: ingest over HTTP, Delta tables partitioned by day and tenant, SQL with
//! pruning, and the error answers.

use crate::server::*;

fn event(id: &str, day: u32, client: &str, cpm: f64) -> String {
    format!(
        r#"{{"event_id":"{id}","ts":"2026-11-{day:02}T12:00:00Z","client_id":"{client}","bidder":"b{}","cpm":{cpm}}}"#,
        day % 3
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_sql_out_with_partition_pruning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ds = dir.path().join("datasets");
    write_descriptor(&ds);
    let s = Server::start(
        &dir.path().join("data"),
        &["--datasets", ds.to_str().expect("utf8"), "--batch-age-ms", "100"],
    );
    let c = client();
    let mut lines = Vec::new();
    for i in 0..300 {
        let day = 20 + (i % 3);
        let client = ["acme", "beta", "gamma", "delta"][i as usize % 4];
        lines.push(event(&format!("e{i}"), day, client, i as f64 / 10.0));
    }
    // Two requests: NDJSON, then a JSON array.
    let (st, r) = post_events(&c, &s.url, "auctions", lines[..150].join("\n")).await;
    assert_eq!((st, r["accepted"].as_u64()), (200, Some(150)), "{r}");
    let (st, r) = post_events(&c, &s.url, "auctions", format!("[{}]", lines[150..].join(","))).await;
    assert_eq!((st, r["accepted"].as_u64()), (200, Some(150)), "{r}");

    wait_for(&c, &s.url, "SELECT count(*) AS n FROM auctions", 30, |v| {
        v["rows"][0][0] == 300
    })
    .await;
    // sum() cannot come from file statistics, so this reads every file.
    let (_, all) = sql(&c, &s.url, "SELECT count(*) AS n, sum(cpm) AS revenue FROM auctions").await;
    let full_files = all["stats"]["files_scanned"].as_u64().expect("files");
    assert!(
        full_files >= 12,
        "3 days x 4 clients should make at least 12 files, got {full_files}"
    );

    let (st, v) = sql(&c, &s.url, "SELECT client_id, count(*) AS n, sum(cpm) AS revenue FROM auctions WHERE day = '2026-11-21' GROUP BY 1 ORDER BY 1").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["rows"].as_array().map(Vec::len), Some(4));
    let n: u64 = v["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r[1].as_u64().expect("n"))
        .sum();
    assert_eq!(n, 100);
    let day_files = v["stats"]["files_scanned"].as_u64().expect("files");
    assert!(
        day_files < full_files && day_files >= 4,
        "day pruning: {day_files} of {full_files}"
    );

    let (_, v) = sql(
        &c,
        &s.url,
        "SELECT count(*), sum(cpm) FROM auctions WHERE day = '2026-11-21' AND client_id = 'beta'",
    )
    .await;
    let one = v["stats"]["files_scanned"].as_u64().expect("files");
    assert!(one >= 1 && one < day_files, "tenant pruning: {one} of {day_files}");
    assert_eq!(v["rows"][0][0], 25, "{v}");
    assert!(v["stats"]["bytes_scanned"].as_u64().expect("bytes") > 0, "{v}");
    assert_eq!(v["stats"]["rows_scanned"], 25, "{v}");

    // The dataset's page: rows, days, partitions and freshness from the table itself.
    let page: serde_json::Value = get_json(&c, &format!("{}/v1/datasets/auctions", s.url)).await;
    assert_eq!(page["rows"], 300, "{page}");
    assert!(
        page["last_received_at"].as_str().is_some_and(|t| t.starts_with("20")),
        "{page}"
    );
    let tier = &page["storage"]["tiers"][0];
    assert_eq!(
        (tier["first_day"].as_str(), tier["last_day"].as_str()),
        (Some("2026-11-20"), Some("2026-11-22")),
        "{page}"
    );
    assert_eq!(tier["partitions"], 12, "{page}");
    assert_eq!(page["contract"]["partitioning"]["tenant"], "client_id");
    let r = c.get(format!("{}/v1/datasets/nope", s.url)).send().await.expect("page");
    assert_eq!(r.status().as_u16(), 404);

    // The table on disk is Hive-partitioned Delta.
    let table = s.data_dir.join("lake/tables/auctions");
    assert!(table.join("_delta_log").is_dir());
    assert!(
        table.join("day=2026-11-21/client_id=beta").is_dir(),
        "partition folders"
    );

    // Every event got its columns; event time and receive time are timestamps.
    let (_, v) = sql(
        &c,
        &s.url,
        "SELECT event_id, ts, _received_at FROM auctions WHERE event_id = 'e7'",
    )
    .await;
    assert_eq!(v["rows"][0][0], "e7");
    assert!(
        v["rows"][0][1].as_str().expect("ts").starts_with("2026-11-21T12:00:00"),
        "{v}"
    );

    // Streamed result formats, by parameter and by Accept header.
    let body = |fmt: &str| serde_json::json!({"sql": "SELECT event_id, cpm FROM auctions WHERE client_id = 'acme' ORDER BY event_id", "format": fmt});
    let r = c
        .post(format!("{}/v1/query", s.url))
        .json(&body("csv"))
        .send()
        .await
        .expect("csv");
    assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
    let csv = r.text().await.expect("text");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "event_id,cpm");
    assert_eq!(lines.len(), 76, "header + 75 acme rows");
    let r = c
        .post(format!("{}/v1/query", s.url))
        .header("accept", "application/x-ndjson")
        .json(&serde_json::json!({"sql": "SELECT event_id FROM auctions", "row_limit": 7}))
        .send()
        .await
        .expect("ndjson");
    let text = r.text().await.expect("text");
    assert_eq!(text.lines().count(), 7, "{text}");
    let first: serde_json::Value = serde_json::from_str(text.lines().next().expect("line")).expect("json line");
    assert!(first["event_id"].is_string());
    let r = c
        .post(format!("{}/v1/query", s.url))
        .json(&body("arrow"))
        .send()
        .await
        .expect("arrow");
    let bytes = r.bytes().await.expect("bytes");
    let reader = deltalake::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None).expect("ipc");
    let rows: usize = reader.map(|b| b.expect("batch").num_rows()).sum();
    assert_eq!(rows, 75);
    let r = c
        .post(format!("{}/v1/query", s.url))
        .json(&serde_json::json!({"sql": "SELECT a.event_id, sum(b.cpm) FROM auctions a, auctions b, auctions c GROUP BY 1", "timeout_ms": 50}))
        .send()
        .await
        .expect("timeout query");
    assert_eq!(r.status().as_u16(), 504);
    let r = c
        .post(format!("{}/v1/query", s.url))
        .json(&body("parquet"))
        .send()
        .await
        .expect("bad format");
    assert_eq!(r.status().as_u16(), 400);

    // The CLI against the same server.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tarn"))
        .args([
            "sql",
            "SELECT client_id, count(*) AS n FROM auctions WHERE day = '2026-11-22' GROUP BY 1 ORDER BY 1",
            "--server",
            &s.url,
        ])
        .output()
        .expect("tarn sql");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("acme") && text.contains("client_id"), "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("files"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ds = dir.path().join("datasets");
    write_descriptor(&ds);
    let s = Server::start(
        &dir.path().join("data"),
        &[
            "--datasets",
            ds.to_str().expect("utf8"),
            "--no-infer",
            "--body-bytes-max",
            "100000",
        ],
    );
    let c = client();
    let url = format!("{}/v1/datasets/auctions/events", s.url);

    // Rejected events: index, field, reason; none reaches the table.
    let body = [
        event("ok1", 20, "acme", 1.0),
        r#"{"ts":"2026-11-20T00:00:00Z","client_id":"../../x"}"#.into(),
        r#"{"client_id":"a"}"#.into(),
    ]
    .join("\n");
    let (st, r) = post_events(&c, &s.url, "auctions", body).await;
    assert_eq!(st, 200);
    assert_eq!(
        (r["accepted"].as_u64(), r["rejected"].as_u64()),
        (Some(1), Some(2)),
        "{r}"
    );
    assert_eq!(r["errors"][0]["index"], 1);
    assert_eq!(r["errors"][0]["field"], "client_id");
    assert_eq!(r["errors"][1]["field"], "ts");
    let (st, r) = post_events(&c, &s.url, "auctions", r#"{"client_id":"a"}"#.into()).await;
    assert_eq!(st, 400, "all rejected is a 400: {r}");

    let big = "x".repeat(200_000);
    let r = c.post(&url).body(big).send().await.expect("post");
    assert_eq!(r.status().as_u16(), 413);
    let r = c
        .post(&url)
        .header("content-encoding", "br")
        .body("{}")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 415);
    let r = c.post(&url).body("[1,2").send().await.expect("post");
    assert_eq!(r.status().as_u16(), 400);
    let msg: serde_json::Value = r.json().await.expect("json");
    assert!(
        msg["error"]["message"].as_str().expect("message").contains("JSON"),
        "{msg}"
    );
    let (st, _) = post_events(&c, &s.url, "nothere", "{}".into()).await;
    assert_eq!(st, 404);
    let (st, _) = post_events(&c, &s.url, "Bad..Name", "{}".into()).await;
    assert_eq!(st, 400);

    wait_for(&c, &s.url, "SELECT count(*) FROM auctions", 30, |v| {
        v["rows"][0][0] == 1
    })
    .await;
    let (st, v) = sql(&c, &s.url, "SELECT nope FROM auctions").await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"]["message"].as_str().expect("message").contains("nope"), "{v}");
    let (st, _) = sql(&c, &s.url, "SELEC 1").await;
    assert_eq!(st, 400);

    // The three rejected events are in the dead letters, queryable, as sent; nobody writes
    // there through the API.
    let v = wait_for(
        &c,
        &s.url,
        "SELECT event_index, field, reason, payload FROM auctions__rejected ORDER BY payload",
        30,
        |v| v["rows"].as_array().is_some_and(|r| r.len() == 3),
    )
    .await;
    assert_eq!(v["rows"][0][3], r#"{"client_id":"a"}"#, "{v}");
    assert_eq!(v["rows"][0][1], "ts", "{v}");
    assert_eq!(
        v["rows"][2][3], r#"{"ts":"2026-11-20T00:00:00Z","client_id":"../../x"}"#,
        "{v}"
    );
    assert_eq!(
        (v["rows"][2][0].as_u64(), v["rows"][2][1].as_str()),
        (Some(1), Some("client_id")),
        "{v}"
    );
    let (st, r) = post_events(&c, &s.url, "auctions__rejected", "{}".into()).await;
    assert_eq!(st, 400, "{r}");

    // Discovery finds both by name, the contract first, and a column by its name.
    let found: serde_json::Value = get_json(&c, &format!("{}/v1/catalog/search?q=auctions", s.url)).await;
    assert_eq!(found["hits"][0]["name"], "auctions", "{found}");
    assert_eq!(found["hits"][1]["name"], "auctions__rejected", "{found}");
    let found: serde_json::Value = get_json(&c, &format!("{}/v1/catalog/search?q=bidder", s.url)).await;
    assert_eq!(found["hits"][0]["matched"][0], "column:bidder", "{found}");
    let r = c
        .get(format!("{}/v1/catalog/search?q=x&limit=0", s.url))
        .send()
        .await
        .expect("search");
    assert_eq!(r.status().as_u16(), 400);

    let m = c
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(m.contains("tarn_ingest_events_accepted_total 1"), "{m}");
    assert!(m.contains("tarn_ingest_events_rejected_total 3"), "{m}");
    // Both requests that were read are in the whole-request and prepare histograms; only the one that
    // appended events (not the one whose every event was rejected) is in the append histogram.
    let count = |name: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_count ")))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} in {m}"))
    };
    assert_eq!(count("tarn_ingest_latency_seconds"), 2, "{m}");
    assert_eq!(count("tarn_ingest_prepare_seconds"), 2, "{m}");
    assert_eq!(count("tarn_ingest_prepare_cpu_seconds"), 2, "{m}");
    assert_eq!(count("tarn_ingest_append_seconds"), 1, "{m}");
    // The CPU time of the preparation is real (parsing takes some) and within its wall time,
    // which runs from before the hand-off to the blocking thread until after its return.
    let sum = |name: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_sum ")))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} in {m}"))
    };
    let (cpu, wall) = (
        sum("tarn_ingest_prepare_cpu_seconds"),
        sum("tarn_ingest_prepare_seconds"),
    );
    assert!(cpu > 0.0 && cpu <= wall, "prepare CPU {cpu} s against wall {wall} s");
    let h = c.get(format!("{}/healthz", s.url)).send().await.expect("healthz");
    assert_eq!(h.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inferred_dataset_and_restart_keep_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let c = client();
    {
        let s = Server::start(&data, &["--batch-age-ms", "100"]);
        let body = (0..50)
            .map(|i| {
                format!(
                    r#"{{"ts":"2026-11-22T00:00:{:02}Z","client_id":"c{}","page":"/p{i}","n":{i}}}"#,
                    i % 60,
                    i % 5
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        let (st, r) = post_events(&c, &s.url, "clicks", body).await;
        assert_eq!((st, r["accepted"].as_u64()), (200, Some(50)), "{r}");
        wait_for(&c, &s.url, "SELECT count(*) FROM clicks", 30, |v| v["rows"][0][0] == 50).await;
        // A second server on the same data directory is refused.
        let second = std::process::Command::new(env!("CARGO_BIN_EXE_tarn"))
            .args(["serve", "--http", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .output()
            .expect("second tarn");
        assert!(!second.status.success());
        assert!(String::from_utf8_lossy(&second.stderr).contains("in use"));
    }
    let s = Server::start(&data, &["--batch-age-ms", "100"]);
    let (st, v) = sql(&c, &s.url, "SELECT sum(n) FROM clicks WHERE client_id = 'c1'").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["rows"][0][0], (0..50).filter(|i| i % 5 == 1).sum::<i64>());
    let (st, r) = post_events(
        &c,
        &s.url,
        "clicks",
        r#"{"ts":"2026-11-22T00:00:00Z","client_id":"c1","unknown":1}"#.into(),
    )
    .await;
    assert_eq!(st, 400);
    assert_eq!(r["errors"][0]["field"], "unknown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_answers_503_with_retry_after_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ds = dir.path().join("datasets");
    write_descriptor(&ds);
    // Room for about one 100 KB request at a time.
    let s = Server::start(
        &dir.path().join("data"),
        &[
            "--datasets",
            ds.to_str().expect("utf8"),
            "--inflight-bytes-max",
            "400000",
            "--batch-age-ms",
            "100",
        ],
    );
    let c = client();
    let mut tasks = Vec::new();
    for p in 0..8 {
        let (c, url) = (c.clone(), s.url.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut busy) = (Vec::new(), 0u32);
            for b in 0..10 {
                let ids: Vec<String> = (0..500).map(|i| format!("o{p}-{b}-{i}")).collect();
                let body = ids
                    .iter()
                    .map(|id| event(id, 21, "acme", 1.0))
                    .collect::<Vec<_>>()
                    .join("\n");
                let r = c
                    .post(format!("{url}/v1/datasets/auctions/events"))
                    .body(body)
                    .send()
                    .await
                    .expect("post");
                match r.status().as_u16() {
                    200 => ok.extend(ids),
                    503 => {
                        assert_eq!(r.headers()["retry-after"], "1");
                        let v: serde_json::Value = r.json().await.expect("json");
                        assert_eq!(v["error"]["code"], "overloaded", "{v}");
                        busy += 1;
                    }
                    other => panic!("unexpected status {other}"),
                }
            }
            (ok, busy)
        }));
    }
    let (mut acked, mut busy) = (Vec::new(), 0);
    for t in tasks {
        let (ok, b) = t.await.expect("producer");
        acked.extend(ok);
        busy += b;
    }
    assert!(
        busy > 0,
        "eight concurrent producers past the in-flight limit should see 503s"
    );
    assert!(!acked.is_empty(), "some requests must get through");
    let want = acked.len() as u64;
    wait_for(&c, &s.url, "SELECT count(*), sum(cpm) FROM auctions", 30, |v| {
        v["rows"][0][0] == want
    })
    .await;
    let m = c
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        m.contains(&format!("tarn_ingest_requests_overloaded_total {busy}")),
        "{m}"
    );
}

/// The CPUs a thread of a process may run on, from `/proc` (`Cpus_allowed_list`, e.g. `0-1`).
fn cpus_allowed(pid: u32, tid: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Cpus_allowed_list:"))?;
    Some(line.split_whitespace().nth(1)?.to_string())
}

/// The background threads of a process: id, CPUs allowed, scheduling policy (5 is `SCHED_IDLE`).
fn background_threads(pid: u32) -> Vec<(String, String, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .flatten()
    {
        let tid = t.file_name().to_string_lossy().to_string();
        let Ok(comm) = std::fs::read_to_string(t.path().join("comm")) else {
            continue;
        };
        if comm.trim() != "tarn-background" {
            continue;
        }
        // The fields after the command's closing parenthesis; `policy` is the 41st of the whole line.
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let policy = rest
            .split_whitespace()
            .nth(38)
            .and_then(|p| p.parse().ok())
            .unwrap_or(u32::MAX);
        if let Some(cpus) = cpus_allowed(pid, &tid) {
            out.push((tid, cpus, policy));
        }
    }
    out
}

/// Delivery and curate run in the idle scheduling class, keep off the CPU reserved for ingest
/// while requests arrive, get it back while requests keep every CPU busy, and once they stop.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_keeps_off_the_ingest_cpu_while_requests_arrive() {
    let all = cpus_allowed(std::process::id(), &std::process::id().to_string()).expect("own CPUs");
    if !all.contains(['-', ',']) {
        eprintln!("skipped: this test may use only CPU {all}, so none can be reserved for ingest");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::start(
        &dir.path().join("data"),
        &["--ingest-cpus", "1", "--batch-age-ms", "50"],
    );
    let pid = s.child.id();
    let c = client();
    assert_eq!(metric_total(&c, &s.url, "tarn_ingest_cpus_reserved").await, 1);
    let before = background_threads(pid);
    assert!(!before.is_empty(), "no tarn-background thread found");
    for (tid, cpus, policy) in &before {
        assert_eq!(policy, &5, "thread {tid} is not in the idle class");
        assert_eq!(cpus, &all, "thread {tid} before any request");
    }
    assert_eq!(metric_total(&c, &s.url, "tarn_background_narrowings_total").await, 0);

    // One request held open: its head is in, its body half sent. While it is in flight, however
    // long, every background thread stays off the first CPU.
    let addr = s.url.strip_prefix("http://").expect("http url").to_string();
    let first = HeldRequest::open(&addr, "cpu_test", 0).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while metric_total(&c, &s.url, "tarn_background_narrowed").await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the background never left the ingest CPU"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for round in 0..3 {
        // A thread seen between its start and its first step (where it takes its class and
        // CPUs) is looked at again a moment later.
        let mut wrong = Vec::new();
        for _ in 0..3 {
            let threads = background_threads(pid);
            assert!(!threads.is_empty());
            wrong = threads
                .into_iter()
                .filter(|(_, cpus, policy)| cpus == &all || *policy != 5)
                .collect();
            if wrong.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(
            wrong.is_empty(),
            "threads on every CPU or not in the idle class while a request is in flight (round {round}): {wrong:?}"
        );
        // Longer than the release delay: an open request keeps the CPU reserved.
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    assert_eq!(metric_total(&c, &s.url, "tarn_ingest_saturated").await, 0);

    // Twice as many requests in flight as there are CPUs is ingest that keeps every CPU busy:
    // the background gets the reserved CPU back although requests are still in flight.
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut held = vec![first];
    for i in 1..2 * cpus {
        held.push(HeldRequest::open(&addr, "cpu_test", i).await);
    }
    background_on_every_cpu(
        &c,
        &s.url,
        pid,
        &all,
        true,
        "saturating ingest left the background narrowed",
    )
    .await;
    assert_eq!(metric_total(&c, &s.url, "tarn_ingest_saturations_total").await, 1);
    for h in held {
        h.finish().await;
    }
    assert_eq!(metric_total(&c, &s.url, "tarn_background_narrowings_total").await, 1);

    // Once requests stop, every thread gets every CPU back.
    background_on_every_cpu(&c, &s.url, pid, &all, false, "background still narrowed").await;
    let rows = 1000 * 2 * cpus;
    wait_for(&c, &s.url, "SELECT count(*) AS n FROM cpu_test", 30, |v| {
        v["rows"][0][0] == rows
    })
    .await;
}

/// Waits up to 10 s until no background thread is narrowed and each is on every CPU (`all`),
/// and, if `saturated`, the server says ingest saturates the CPUs.
async fn background_on_every_cpu(c: &reqwest::Client, url: &str, pid: u32, all: &str, saturated: bool, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let threads = background_threads(pid);
        if (!saturated || metric_total(c, url, "tarn_ingest_saturated").await == 1)
            && metric_total(c, url, "tarn_background_narrowed").await == 0
            && threads.iter().all(|(_, cpus, _)| cpus == all)
        {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {threads:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// An ingest request of 1,000 events over raw TCP, its head and half its body sent.
struct HeldRequest {
    conn: tokio::net::TcpStream,
    rest: Vec<u8>,
}

impl HeldRequest {
    async fn open(addr: &str, dataset: &str, n: usize) -> Self {
        use tokio::io::AsyncWriteExt;
        let body = (0..1000)
            .map(|j| event(&format!("r{n}e{j}"), 20 + (j % 3), "acme", 1.0))
            .collect::<Vec<_>>()
            .join("\n");
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST /v1/datasets/{dataset}/events HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes()).await.expect("head");
        let half = body.len() / 2;
        conn.write_all(&body.as_bytes()[..half]).await.expect("first half");
        conn.flush().await.expect("flush");
        Self {
            conn,
            rest: body.as_bytes()[half..].to_vec(),
        }
    }

    /// Sends the rest of the body and checks that all 1,000 events were accepted.
    async fn finish(mut self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.conn.write_all(&self.rest).await.expect("second half");
        let mut answer = String::new();
        self.conn.read_to_string(&mut answer).await.expect("answer");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains(r#""accepted":1000"#), "{answer}");
    }
}
