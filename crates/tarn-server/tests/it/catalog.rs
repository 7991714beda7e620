//! Self-serve descriptors end to end: `tarn validate`, `plan` and `apply` against a running
//! server, producer keys, a field added live, a breaking change refused, versions kept.

use std::path::Path;
use std::process::Command;

use crate::server::{Server, client, get_json, post_events, sql, wait_for};

const AUCTIONS_V1: &str = "name: auctions
description: ad auctions
owner: ads
fields:
  - { name: event_id, type: string, required: true }
  - { name: ts, type: timestamp, required: true }
  - { name: client_id, type: string, required: true }
  - { name: cpm, type: float64 }
event_time: ts
event_id: event_id
partitioning: { tenant: client_id }
";

const BIDS: &str = "name: bids
owner: ads
scope: public
description: bids from the bid service
size: S
fields:
  - { name: event_id, type: string, required: true }
  - { name: bidder, type: string }
  - { name: email, type: string, pii: direct, description: the bidder's contact }
event_id: event_id
producers: [bid-service]
consumers: [finance-report]
";

/// Runs a `tarn` subcommand; returns its exit code and stdout.
pub fn tarn(args: &[&str], server: &str) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tarn"))
        .args(args)
        .env("TARN_SERVER", server)
        .env("TARN_LOG", "warn")
        .output()
        .expect("run tarn");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join(name), text).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_plan_apply_evolve() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let desc = tmp.path().join("descriptors");
    write(&desc, "auctions.yaml", AUCTIONS_V1);
    write(&desc, "bids.yaml", BIDS);
    let d = desc.to_str().expect("utf8");

    // Offline validation: a clean folder, then each kind of mistake with exit code 1.
    let (code, out) = tarn(&["validate", "--offline", d], "http://127.0.0.1:1");
    assert_eq!(code, 0, "{out}");
    let bad = tmp.path().join("bad");
    write(&bad, "clicks.yaml", &AUCTIONS_V1.replace("name: cpm", "name: CPM"));
    write(
        &bad,
        "leads.yaml",
        &BIDS.replace("name: bids", "name: leads").replace("owner: ads\n", ""),
    );
    let (code, out) = tarn(
        &["validate", "--offline", bad.to_str().expect("utf8")],
        "http://127.0.0.1:1",
    );
    assert_eq!(code, 1, "{out}");
    for rule in ["error[file-name]", "error[naming]", "error[pii-owner]"] {
        assert!(out.contains(rule), "{rule} missing from:\n{out}");
    }
    // No server to compare with: exit 2, saying why.
    let (code, out) = tarn(&["validate", d], "http://127.0.0.1:1");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("cannot reach tarn"), "{out}");

    let server = Server::start(&tmp.path().join("data"), &["--batch-age-ms", "50"]);
    let url = server.url.clone();
    let c = client();

    let (code, out) = tarn(&["plan", d], &url);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("+ create auctions") && out.contains("+ create bids"),
        "{out}"
    );
    assert!(out.contains("+ write key for producer bid-service"), "{out}");

    let (code, out) = tarn(&["apply", d], &url);
    assert_eq!(code, 0, "{out}");
    // The tables exist before the first event, with the contract's columns.
    let (status, v) = sql(&c, &url, "SELECT count(*), count(bidder), count(email) FROM bids").await;
    assert_eq!((status, &v["rows"][0]), (200, &serde_json::json!([0, 0, 0])), "{v}");
    let secret = out
        .lines()
        .find(|l| l.starts_with("write key for producer bid-service"))
        .and_then(|l| l.rsplit(' ').next())
        .expect("a key was issued")
        .to_string();
    assert!(secret.starts_with("tarn_wk_"), "{secret}");
    // Idempotent: nothing left to plan, a second apply applies nothing and issues no key.
    let (code, out) = tarn(&["plan", d], &url);
    assert_eq!(code, 0, "{out}");
    let (code, out) = tarn(&["apply", d], &url);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("0 applied, 2 unchanged") && !out.contains("write key"),
        "{out}"
    );

    // A dataset that names producers takes events only with one of their keys.
    let ev = r#"{"bidder": "b1", "email": "a@example.com"}"#.to_string();
    let (status, _) = post_events(&c, &url, "bids", ev.clone()).await;
    assert_eq!(status, 401);
    let r = c
        .post(format!("{url}/v1/datasets/bids/events"))
        .bearer_auth(&secret)
        .body(ev)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 200);

    // A new optional field applies live: the column is queryable at once, and new events
    // fill it.
    let day = "2026-11-20";
    let events = |from: usize, site: bool| -> String {
        (from..from + 50)
            .map(|i| {
                let site = if site {
                    format!(r#","site":"s{}""#, i % 3)
                } else {
                    String::new()
                };
                format!(r#"{{"event_id":"e{i}","ts":"{day}T10:00:00Z","client_id":"acme","cpm":1.5{site}}}"#)
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (status, body) = post_events(&c, &url, "auctions", events(0, false)).await;
    assert_eq!(status, 200, "{body}");
    wait_for(&c, &url, "SELECT count(*) FROM auctions", 30, |v| v["rows"][0][0] == 50).await;
    let (status, body) = post_events(&c, &url, "auctions", events(50, true)).await;
    assert_eq!(status, 400, "site is not declared yet: {body}");
    let v2 = AUCTIONS_V1.replace(
        "  - { name: cpm, type: float64 }\n",
        "  - { name: cpm, type: float64 }\n  - { name: site, type: string }\n",
    );
    write(&desc, "auctions.yaml", &v2);
    let (code, out) = tarn(&["plan", d], &url);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("~ change auctions") && out.contains("additive: new optional field site"),
        "{out}"
    );
    let (code, out) = tarn(&["apply", d], &url);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("changed auctions -> version 1.1 (1 column(s) added"),
        "{out}"
    );
    let (status, v) = sql(&c, &url, "SELECT count(*), count(site) FROM auctions").await;
    assert_eq!((status, &v["rows"][0]), (200, &serde_json::json!([50, 0])), "{v}");
    let (status, body) = post_events(&c, &url, "auctions", events(50, true)).await;
    assert_eq!(status, 200, "{body}");
    let v = wait_for(
        &c,
        &url,
        "SELECT count(*), count(site), count(DISTINCT site) FROM auctions",
        30,
        |v| v["rows"][0][0] == 100,
    )
    .await;
    assert_eq!(v["rows"][0], serde_json::json!([100, 50, 3]));

    // A breaking change is refused by validate, plan and apply, and nothing changes.
    write(&desc, "auctions.yaml", &v2.replace("type: float64", "type: string"));
    let (code, out) = tarn(&["validate", d], &url);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("error[breaking-change]") && out.contains("major: 2"),
        "{out}"
    );
    let (code, out) = tarn(&["apply", d], &url);
    assert_eq!(code, 1, "{out}");
    let versions = get_json(&c, &format!("{url}/v1/datasets/auctions/versions")).await;
    let labels: Vec<_> = versions["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| v["version"].as_str().unwrap_or("?").to_string())
        .collect();
    assert_eq!(labels, ["1.0", "1.1"]);
    // Every version reads back.
    let first = get_json(&c, &format!("{url}/v1/datasets/auctions/versions/1.0")).await;
    assert!(
        first["contract"]["fields"].as_array().is_some_and(|f| f.len() == 4),
        "{first}"
    );
    let page = get_json(&c, &format!("{url}/v1/datasets/bids")).await;
    // Size S: a quarter of the server's 64 MiB batches.
    assert_eq!(page["delivery"]["batch_bytes"], 16 << 20, "{page}");
    assert_eq!(page["lineage"]["read_by"][0]["name"], "finance-report", "{page}");
    assert_eq!(page["lineage"]["reads"][0]["name"], "bid-service", "{page}");
    // A new size class reaches the running delivery.
    write(&desc, "bids.yaml", &BIDS.replace("size: S", "size: L"));
    let (code, out) = tarn(&["apply", d], &url);
    assert_eq!(code, 1, "auctions is still breaking: {out}");
    write(&desc, "auctions.yaml", &v2);
    let (code, out) = tarn(&["apply", d], &url);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("changed bids -> version 1.1"), "{out}");
    let page = get_json(&c, &format!("{url}/v1/datasets/bids")).await;
    assert_eq!(page["delivery"]["batch_bytes"], 256 << 20, "{page}");

    // The same folder at start: what runs matches, so the server starts.
    drop(server);
    let server = Server::start(&tmp.path().join("data"), &["--datasets", d]);
    let (status, v) = sql(&c, &server.url, "SELECT count(site) FROM auctions").await;
    assert_eq!((status, &v["rows"][0][0]), (200, &serde_json::json!(50)), "{v}");
}

const LEDGER_V1: &str = "name: ledger
owner: finance
fields:
  - { name: event_id, type: string, required: true }
  - { name: ts, type: timestamp, required: true }
  - { name: client_id, type: string, required: true }
  - { name: amount, type: float64 }
event_time: ts
event_id: event_id
partitioning: { tenant: client_id }
lifecycle: { infrequent_after_days: 5 }
";

fn ledger_events(n: usize, day: &str, amount: &str) -> String {
    (0..n)
        .map(|i| format!(r#"{{"event_id":"{day}-{i}","ts":"{day}T08:00:00Z","client_id":"acme","amount":{amount}}}"#))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A breaking change under the next major version: the old table stays queryable as
/// `<name>__v1` (its days in a colder tier too), the new contract starts a fresh table, and a
/// change interrupted after its intent was written is finished at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_major_version_keeps_the_old_table() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let desc = tmp.path().join("descriptors");
    write(&desc, "ledger.yaml", LEDGER_V1);
    let d = desc.to_str().expect("utf8");
    let data = tmp.path().join("data");
    let server = Server::start(&data, &["--batch-age-ms", "50"]);
    let url = server.url.clone();
    let c = client();
    let (code, out) = tarn(&["apply", d], &url);
    assert_eq!(code, 0, "{out}");

    // Major 1: an old day (moved to the infrequent tier) and a recent one.
    let old_day = (chrono::Utc::now() - chrono::Duration::days(20))
        .format("%Y-%m-%d")
        .to_string();
    let new_day = (chrono::Utc::now() - chrono::Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();
    for (day, n) in [(&old_day, 30), (&new_day, 20)] {
        let (status, body) = post_events(&c, &url, "ledger", ledger_events(n, day, "2.5")).await;
        assert_eq!(status, 200, "{body}");
    }
    wait_for(&c, &url, "SELECT count(*) FROM ledger", 30, |v| v["rows"][0][0] == 50).await;
    let (code, out) = tarn(&["lifecycle", "--dataset", "ledger", "--server", &url], &url);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 moved"), "{out}");

    // Major 2 retypes a field: refused as major 1, planned and applied as major 2.
    let v2 = LEDGER_V1.replace("type: float64", "type: string");
    write(&desc, "ledger.yaml", &v2);
    let (code, out) = tarn(&["plan", d], &url);
    assert_eq!(code, 1, "{out}");
    write(&desc, "ledger.yaml", &format!("major: 2\n{v2}"));
    let (code, out) = tarn(&["plan", d], &url);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("! new major version of ledger: 1 -> 2"), "{out}");
    let (code, out) = tarn(&["apply", d], &url);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("new_major ledger -> version 2.0"), "{out}");
    let (status, v) = sql(&c, &url, "SELECT count(*) FROM ledger").await;
    assert_eq!(
        (status, &v["rows"][0][0]),
        (200, &serde_json::json!(0)),
        "a fresh table: {v}"
    );

    // The old table, whole, under its new name; its tiered day still reads.
    let (status, v) = sql(&c, &url, "SELECT count(*), sum(amount) FROM ledger__v1").await;
    assert_eq!((status, &v["rows"][0]), (200, &serde_json::json!([50, 125.0])), "{v}");
    let q = format!("SELECT count(*) FROM ledger__v1 WHERE day = '{old_day}' AND amount > 1");
    let (status, v) = sql(&c, &url, &q).await;
    assert_eq!((status, &v["rows"][0][0]), (200, &serde_json::json!(30)), "{v}");
    // It takes no events; the dataset takes major 2's.
    let (status, _) = post_events(&c, &url, "ledger__v1", ledger_events(1, &new_day, "1.0")).await;
    assert_eq!(status, 400);
    let (status, body) = post_events(&c, &url, "ledger", ledger_events(5, &new_day, "3.0")).await;
    assert_eq!(status, 400, "a number is no longer a string: {body}");
    let (status, body) = post_events(&c, &url, "ledger", ledger_events(5, &new_day, "\"3.0 EUR\"")).await;
    assert_eq!(status, 200, "{body}");
    let v = wait_for(&c, &url, "SELECT count(*), max(amount) FROM ledger", 30, |v| {
        v["rows"][0][0] == 5
    })
    .await;
    assert_eq!(v["rows"][0][1], "3.0 EUR");
    let versions = get_json(&c, &format!("{url}/v1/datasets/ledger/versions")).await;
    assert_eq!(versions["versions"][1]["version"], "2.0", "{versions}");
    let (code, out) = tarn(&["validate", d], &url);
    assert_eq!(code, 0, "the folder now matches what runs: {out}");
    drop(server);

    // An interrupted major 3: only its intent was written before the crash.
    let spec = |text: &str| serde_json::to_value(tarn_core::DatasetSpec::from_yaml(text).expect("spec")).expect("json");
    let v3 = format!(
        "major: 3\n{}",
        LEDGER_V1.replace("  - { name: amount, type: float64 }\n", "")
    );
    let intent = serde_json::json!({"from": spec(&format!("major: 2\n{v2}")), "to": spec(&v3)});
    std::fs::create_dir_all(data.join("catalog/majors")).expect("mkdir");
    std::fs::write(data.join("catalog/majors/ledger.json"), intent.to_string()).expect("intent");
    let server = Server::start(&data, &[]);
    let (status, v) = sql(&c, &server.url, "SELECT count(*) FROM ledger__v2").await;
    assert_eq!((status, &v["rows"][0][0]), (200, &serde_json::json!(5)), "{v}");
    let (status, v) = sql(&c, &server.url, "SELECT count(*) FROM ledger__v1").await;
    assert_eq!((status, &v["rows"][0][0]), (200, &serde_json::json!(50)), "{v}");
    let page = get_json(&c, &format!("{}/v1/datasets/ledger", server.url)).await;
    assert_eq!(page["contract"]["major"], 3, "{page}");
    assert!(!data.join("catalog/majors/ledger.json").exists());
}

/// Copies a folder and everything under it.
fn copy_all(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if src.is_dir() {
            copy_all(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).expect("copy");
        }
    }
}

/// Copies the Parquet files of a table folder (its `day=/tenant=` folders, without the Delta
/// log) to `to`: a plain folder of Parquet files such as another tool leaves.
fn copy_parquet(from: &Path, to: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('_') || name.starts_with('.') {
            continue;
        }
        let (src, dst) = (e.path(), to.join(&name));
        if src.is_dir() {
            std::fs::create_dir_all(&dst).expect("mkdir");
            n += copy_parquet(&src, &dst);
        } else if name.ends_with(".parquet") {
            std::fs::copy(&src, &dst).expect("copy");
            n += 1;
        }
    }
    n
}

/// `tarn register` makes a folder of Parquet files and a Delta table written by others
/// queryable in place, with partition pruning, and refuses what it cannot read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_data_is_queryable_in_place() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = crate::server::start_auctions(tmp.path(), &[]);
    let (url, c) = (server.url.clone(), client());
    let body: Vec<String> = (0..60)
        .map(|i| {
            format!(
                r#"{{"event_id":"e{i}","ts":"2026-11-{}T10:00:00Z","client_id":"{}","cpm":{}.5}}"#,
                20 + i % 2,
                if i % 3 == 0 { "acme" } else { "beta" },
                i
            )
        })
        .collect();
    let (status, v) = post_events(&c, &url, "auctions", body.join("\n")).await;
    assert_eq!(status, 200, "{v}");
    wait_for(&c, &url, "SELECT count(*) FROM auctions", 30, |v| v["rows"][0][0] == 60).await;
    let table = tmp.path().join("data/lake/tables/auctions");
    let export = tmp.path().join("export");
    let files = copy_parquet(&table, &export);
    assert!(files >= 4, "{files} files");

    let (code, out) = tarn(&["register", "exported", export.to_str().expect("utf8")], &url);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("(parquet at") && out.contains("partitions [day, client_id]"),
        "{out}"
    );
    // tarn's own table is not taken under another name (its rules would not hold there)...
    let (code, out) = tarn(&["register", "mirror", table.to_str().expect("utf8")], &url);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("inside tarn's data directory"), "{out}");
    // ...but a copy of it elsewhere, Delta log and all, is another tool's Delta table.
    let copy = tmp.path().join("delta-copy");
    copy_all(&table, &copy);
    let (code, out) = tarn(&["register", "mirror", copy.to_str().expect("utf8")], &url);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("(delta at"), "{out}");
    for q in [
        "SELECT count(*), sum(cpm), count(DISTINCT event_id) FROM {}",
        "SELECT count(*), sum(cpm) FROM {} WHERE day = '2026-11-21' AND client_id = 'acme'",
    ] {
        let (_, want) = sql(&c, &url, &q.replace("{}", "auctions")).await;
        for name in ["exported", "mirror"] {
            let (status, got) = sql(&c, &url, &q.replace("{}", name)).await;
            assert_eq!((status, &got["rows"]), (200, &want["rows"]), "{name}: {got}");
        }
    }
    // Partition folders prune: one day of one tenant reads one folder's files.
    let (_, all) = sql(&c, &url, "SELECT count(event_id) FROM exported").await;
    let (_, one) = sql(
        &c,
        &url,
        "SELECT count(event_id) FROM exported WHERE day = '2026-11-21' AND client_id = 'acme'",
    )
    .await;
    let scanned = |v: &serde_json::Value| v["stats"]["files_scanned"].as_u64().unwrap_or(0);
    assert!(scanned(&one) < scanned(&all) && scanned(&one) > 0, "{one} vs {all}");

    // Read in place only: no events, no maintenance.
    let (status, _) = post_events(&c, &url, "exported", r#"{"event_id":"x"}"#.into()).await;
    assert_eq!(status, 400);
    let (code, out) = tarn(&["compact", "--dataset", "exported", "--server", &url], &url);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("read in place"), "{out}");
    // Registering again with nothing new changes nothing; the page shows where it lives.
    let (code, out) = tarn(&["register", "exported", export.to_str().expect("utf8")], &url);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("version unchanged"), "{out}");
    let page = get_json(&c, &format!("{url}/v1/datasets/exported")).await;
    assert_eq!(page["rows"], 60, "{page}");
    assert_eq!(page["contract"]["external"]["format"], "parquet", "{page}");
    // What cannot be read is refused, naming why; a name tarn writes is not taken over.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let (code, out) = tarn(&["register", "nothing", empty.to_str().expect("utf8")], &url);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("no .parquet files"), "{out}");
    let (code, out) = tarn(&["register", "nothing", "/no/such/folder"], &url);
    assert_ne!(code, 0, "{out}");
    let (code, out) = tarn(&["register", "auctions", export.to_str().expect("utf8")], &url);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("tarn writes"), "{out}");
    // It survives a restart.
    drop(server);
    let server = Server::start(&tmp.path().join("data"), &[]);
    let (status, v) = sql(&c, &server.url, "SELECT count(*) FROM mirror").await;
    assert_eq!((status, &v["rows"][0][0]), (200, &serde_json::json!(60)), "{v}");
}
