//! Roles on real servers: two collector processes, two worker processes and a query process
//! on NATS JetStream, the S3-compatible server and PostgreSQL. Producers post at the same
//! time to both collectors; one worker and one collector are killed with -9 mid-run and
//! restarted; every acknowledged event ends in the table exactly once, and both workers did
//! part of the work.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::server::*;

/// What the producers learnt: ids acknowledged with 200, and ids of requests whose answer
/// never came (they may or may not be stored, but at most once).
#[derive(Default)]
struct Sent {
    acked: HashSet<String>,
    unknown: HashSet<String>,
}

/// `n` events of one request, ids `p<producer>-<request>-<i>`, spread over three days and
/// four tenants.
fn events(producer: usize, request: usize, n: usize) -> (Vec<String>, String) {
    let mut ids = Vec::with_capacity(n);
    let mut body = String::new();
    for i in 0..n {
        let id = format!("p{producer}-{request}-{i}");
        let day = 20 + (request + i) % 3;
        body.push_str(&format!(
            r#"{{"event_id":"{id}","ts":"2026-11-{day}T10:00:00Z","client_id":"c{}","cpm":1.5}}"#,
            i % 4
        ));
        body.push('\n');
        ids.push(id);
    }
    (ids, body)
}

/// A worker's gauge of the units it runs.
async fn units_held(c: &reqwest::Client, url: &str) -> Option<u64> {
    let text = c.get(format!("{url}/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("tarn_worker_units_held "))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until the two workers split the units, two each.
async fn wait_split(c: &reqwest::Client, a: &str, b: &str) {
    let start = Instant::now();
    loop {
        let (x, y) = (units_held(c, a).await, units_held(c, b).await);
        if x == Some(2) && y == Some(2) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the workers never split the units: {x:?} and {y:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_collectors_and_two_workers_keep_every_acknowledged_event_once_through_kill9() {
    let Some(services) = Shared::new("roles") else { return };
    let env = &services.env;
    let shared = services.args();
    let with = |role: &'static str| {
        let mut a = shared.to_vec();
        a.extend(["--roles", role]);
        if role != "query" {
            a.extend(["--pg", "off"]);
        }
        a
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |name: &str| dir.path().join(name);
    // The query process applies the descriptor (size M: two shards); the others find it in
    // the metadata store.
    let query = start_auctions_env(&d("q"), &with("query"), env);
    let w_args = {
        let mut a = with("worker");
        a.extend(["--batch-age-ms", "100"]);
        a
    };
    let mut w1 = Server::start_env(&d("w1"), &w_args, env);
    let w2 = Server::start_env(&d("w2"), &w_args, env);
    let mut c1 = Server::start_env(&d("c1"), &with("collector"), env);
    let c2 = Server::start_env(&d("c2"), &with("collector"), env);
    let c = client();

    // Each role answers only its own endpoints.
    let (status, v) = sql(&c, &c1.url, "SELECT 1").await;
    assert_eq!(status, 404, "{v}");
    assert!(v.to_string().contains("collector"), "{v}");
    let (status, _) = post_events(&c, &query.url, "auctions", events(9, 0, 1).1).await;
    assert_eq!(status, 404);
    assert!(query.pg.is_some(), "the query process serves the PostgreSQL protocol");
    wait_split(&c, &w1.url, &w2.url).await;

    // Producers: four at once, each posting to the collectors in turn. A request without an
    // answer (its collector was killed) is not retried with the same ids: its events may be
    // stored, and must then be there once.
    let urls = Arc::new(Mutex::new(vec![c1.url.clone(), c2.url.clone()]));
    let sent = Arc::new(Mutex::new(Sent::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut producers = Vec::new();
    for p in 0..4 {
        let (urls, sent, stop, c) = (urls.clone(), sent.clone(), stop.clone(), c.clone());
        producers.push(tokio::spawn(async move {
            let mut request = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let url = {
                    let u = urls.lock().expect("urls");
                    u[(p + request) % u.len()].clone()
                };
                let (ids, body) = events(p, request, 40);
                request += 1;
                let r = c
                    .post(format!("{url}/v1/datasets/auctions/events"))
                    .body(body)
                    .send()
                    .await;
                let status = r.as_ref().map(|r| r.status().as_u16()).ok();
                {
                    let mut s = sent.lock().expect("sent");
                    // Anything but a 200 may or may not have been stored (an acknowledgement of
                    // the stream lost on its way back is a 503 too).
                    if status == Some(200) {
                        s.acked.extend(ids);
                    } else {
                        s.unknown.extend(ids);
                    }
                }
                if status != Some(200) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            request
        }));
    }
    let acked = |sent: &Arc<Mutex<Sent>>| sent.lock().expect("sent").acked.len();
    // Both workers deliver and curate a part.
    let start = Instant::now();
    while metric_total(&c, &w1.url, "tarn_curate_rows_total").await == 0
        || metric_total(&c, &w2.url, "tarn_curate_rows_total").await == 0
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "both workers should curate rows"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(acked(&sent) > 0);

    // kill -9 one worker and one collector mid-run; producers go on with the other collector.
    let before_kill = acked(&sent);
    urls.lock().expect("urls").retain(|u| *u != c1.url);
    c1.kill9();
    w1.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let w1 = Server::start_env(&d("w1"), &w_args, env);
    let c1 = Server::start_env(&d("c1"), &with("collector"), env);
    urls.lock().expect("urls").push(c1.url.clone());
    // The restarted worker takes its units back (same process id, so no lease to wait for).
    wait_split(&c, &w1.url, &w2.url).await;
    let start = Instant::now();
    while acked(&sent) < before_kill + 2_000 {
        assert!(start.elapsed() < Duration::from_secs(90), "producers stalled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in producers {
        p.await.expect("producer");
    }
    let (acked_ids, unknown) = {
        let s = sent.lock().expect("sent");
        (s.acked.clone(), s.unknown.clone())
    };

    // Every acknowledged event is in the table, once; nothing else but events of requests
    // whose answer was lost, and those once too.
    let n = acked_ids.len() as u64;
    let caught_up = std::time::Instant::now();
    let _ = wait_for(
        &c,
        &query.url,
        "SELECT count(DISTINCT event_id) FROM auctions",
        120,
        |v| v["rows"][0][0].as_u64().is_some_and(|x| x >= n),
    )
    .await;
    eprintln!(
        "roles: {n} acknowledged events queryable {:.1} s after the producers stopped",
        caught_up.elapsed().as_secs_f64()
    );
    // Let replays of the killed processes settle, then read every id.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, v) = sql(
        &c,
        &query.url,
        "SELECT count(*), count(DISTINCT event_id) FROM auctions",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["rows"][0][0], v["rows"][0][1], "a row is doubled: {v}");
    let r = c
        .post(format!("{}/v1/query", query.url))
        .json(&serde_json::json!({"sql": "SELECT event_id FROM auctions", "row_limit": 1_000_000}))
        .send()
        .await
        .expect("query");
    let ids: serde_json::Value = r.json().await.expect("json");
    let stored: HashSet<String> = ids["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r[0].as_str().expect("id").to_string())
        .collect();
    let missing: Vec<_> = acked_ids.difference(&stored).take(5).collect();
    assert!(missing.is_empty(), "acknowledged but not stored: {missing:?}");
    let stray: Vec<_> = stored
        .iter()
        .filter(|i| !acked_ids.contains(*i) && !unknown.contains(*i))
        .take(5)
        .collect();
    assert!(stray.is_empty(), "stored but never sent: {stray:?}");
    eprintln!(
        "roles: {} acknowledged, {} unanswered, {} stored ({v})",
        acked_ids.len(),
        unknown.len(),
        stored.len()
    );
    drop((query, w1, w2, c1, c2));
    services.cleanup().await;
}

/// Runs `tarn serve` expecting a refusal at start; returns what it printed.
fn refused(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tarn"))
        .args(["serve", "--http", "127.0.0.1:0", "--pg", "off"])
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env("TARN_LOG", "warn")
        .output()
        .expect("run tarn");
    assert!(!out.status.success(), "tarn started with {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_roles_need_a_shared_stream_lake_and_metadata_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let msg = refused(dir.path(), &["--roles", "worker"]);
    assert!(msg.contains("the embedded log belongs to one process"), "{msg}");
    let msg = refused(dir.path(), &["--roles", "query,reader"]);
    assert!(msg.contains("unknown role \"reader\""), "{msg}");
    let Some(nats) = nats_server() else { return };
    let ns = nats_namespace("rolesrefused");
    let stream = format!("{nats}/{ns}");
    let msg = refused(dir.path(), &["--roles", "collector", "--stream", &stream]);
    assert!(
        msg.contains("need --lake s3://... and --meta postgres://...") && msg.contains("--lake local"),
        "{msg}"
    );
    nats_cleanup(&nats, &ns).await;
}
