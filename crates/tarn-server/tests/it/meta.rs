//! The metadata store in PostgreSQL (`--meta postgres://`, the server of `TARN_TEST_POSTGRES`
//! that `scripts/test` names): two processes with data directories of their own share
//! contracts and producer keys, a process started later finds everything, and a bad store
//! stops tarn at start with the reason.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::catalog::tarn;
use crate::server::*;

const CLICKS: &str = "name: clicks
owner: web
description: clicks from the web app
fields:
  - { name: event_id, type: string, required: true }
  - { name: page, type: string }
event_id: event_id
producers: [web-app]
";

/// Posts `body` to `dataset` on `url` with `key` until it is accepted, for at most `secs`.
async fn post_until_accepted(c: &reqwest::Client, url: &str, dataset: &str, key: &str, body: &str, secs: u64) {
    let start = Instant::now();
    loop {
        let r = c
            .post(format!("{url}/v1/datasets/{dataset}/events"))
            .bearer_auth(key)
            .body(body.to_string())
            .send()
            .await
            .expect("post");
        let status = r.status().as_u16();
        if status == 200 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{dataset} on {url} still answers {status}: {}",
            r.text().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_share_contracts_and_producer_keys_through_postgres() {
    let Some(pg) = pg_url() else { return };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let schema = format!("it_meta_{}_{nanos}", std::process::id());
    let meta = ["--meta", pg.as_str(), "--meta-schema", schema.as_str()];
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start_auctions(&dir.path().join("a"), &meta);
    let mut b_args = meta.to_vec();
    b_args.extend(["--batch-age-ms", "50"]);
    let b = Server::start(&dir.path().join("b/data"), &b_args);
    let c = client();

    // B never saw the auctions descriptor: the contract A put in force is in the store.
    let (status, v) = post_events(
        &c,
        &b.url,
        "auctions",
        r#"{"event_id":"x1","ts":"2026-11-22T10:00:00Z","client_id":"c1","cpm":1.0}"#.into(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let bad = r#"{"event_id":"x2","ts":"not a time","client_id":"c1"}"#;
    let (status, v) = post_events(&c, &b.url, "auctions", bad.into()).await;
    assert_eq!(status, 400, "B checks A's contract: {v}");

    // A applies a dataset with a producer; on B the very first event without a key is
    // refused (B looks the dataset up in the store rather than inferring one), and the key A
    // issued opens B too.
    let desc = dir.path().join("descriptors");
    std::fs::create_dir_all(&desc).expect("mkdir");
    std::fs::write(desc.join("clicks.yaml"), CLICKS).expect("write");
    let (code, out) = tarn(&["apply", desc.to_str().expect("utf8")], &a.url);
    assert_eq!(code, 0, "{out}");
    let (status, v) = post_events(&c, &b.url, "clicks", r#"{"event_id":"k0"}"#.into()).await;
    assert_eq!(status, 401, "{v}");
    let secret = out
        .lines()
        .find(|l| l.starts_with("write key for producer web-app"))
        .and_then(|l| l.rsplit(' ').next())
        .expect("a key was issued")
        .to_string();
    post_until_accepted(&c, &b.url, "clicks", &secret, r#"{"event_id":"k1","page":"/"}"#, 15).await;
    let (status, _) = post_events(&c, &b.url, "clicks", r#"{"event_id":"k2"}"#.into()).await;
    assert_eq!(status, 401, "a key is still needed on B");
    wait_for(&c, &b.url, "SELECT count(*) FROM clicks", 30, |v| v["rows"][0][0] == 1).await;

    // Versions kept by A are B's history too.
    let versions = get_json(&c, &format!("{}/v1/datasets/clicks/versions", b.url)).await;
    assert!(versions.to_string().contains("\"1.0\""), "{versions}");

    // A process started later, with an empty data directory, finds every contract.
    drop(a);
    let later = Server::start(&dir.path().join("c/data"), &meta);
    let v = get_json(&c, &format!("{}/v1/datasets", later.url)).await;
    let names = v.to_string();
    assert!(names.contains("\"auctions\"") && names.contains("\"clicks\""), "{v}");

    // The schema is tarn's own: its migrations table says what was applied.
    let out = Command::new("psql")
        .args([pg.as_str(), "-Atc"])
        .arg(format!("SELECT version, description FROM {schema}.migrations"))
        .output();
    if let Ok(out) = out {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("1|metadata documents by kind and name"), "{text}");
        drop_schema(&pg, &schema);
    }
}

#[test]
fn a_metadata_store_that_cannot_be_used_stops_tarn_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tarn"))
            .args(["serve", "--http", "127.0.0.1:0", "--pg", "off", "--data-dir"])
            .arg(dir.path())
            .args(args)
            .env("TARN_LOG", "warn")
            .output()
            .expect("run tarn");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--meta", "mysql://x"]);
    assert!(err.contains("`files` or postgres://"), "{err}");
    let err = run(&["--meta", "postgres://tarn:hunter2@127.0.0.1:9/db"]);
    assert!(err.contains("connecting") && !err.contains("hunter2"), "{err}");
    let err = run(&["--meta", "postgres://tarn@127.0.0.1:9/db", "--meta-schema", "No"]);
    assert!(err.contains("lowercase identifier"), "{err}");
}
