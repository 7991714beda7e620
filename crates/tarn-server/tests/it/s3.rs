//! The lake in a bucket of a real S3-compatible server (s3s-fs, started by `scripts/test`),
//! fed by a stream on NATS: events in, rows out, a kill -9 and restart without a lost or
//! doubled row, a second process with an empty data directory on the same stream reading the
//! same tables, a process with another stream refused, the deltalake Python package reading
//! the tables from the bucket, and stores that cannot hold a lake refused at start.

use std::time::Duration;

use crate::interop::{check_read_back, post_three_days, python_with_deltalake, read_with_deltalake};
use crate::server::*;

/// Files under `dir` whose name ends with `suffix`.
fn files_ending(dir: &std::path::Path, suffix: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_ending(&p, suffix));
        } else if p.to_string_lossy().ends_with(suffix) {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lake_in_a_bucket_survives_kill9_serves_a_second_process_and_reads_back_in_deltalake() {
    let Some(s3) = s3_server() else { return };
    let Some(python) = python_with_deltalake() else { return };
    let Some(nats) = nats_server() else { return };
    let ns = nats_namespace("s3spine");
    let stream = format!("{nats}/{ns}");
    let lake = s3.lake("spine");
    let env = s3.env();
    let args = ["--lake", lake.as_str(), "--stream", stream.as_str()];
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = start_auctions_env(dir.path(), &args, &env);
    let ours = post_three_days(&server.url).await;

    // Another engine reads the table from the bucket.
    let v = read_with_deltalake(&python, &format!("{lake}/tables/auctions"), &env);
    check_read_back(&v, &ours);
    // Nothing of the lake is on the local disk: no raw object, no data file.
    let local = dir.path().join("data/lake");
    assert_eq!(files_ending(&local, ".parquet"), Vec::<std::path::PathBuf>::new());
    assert_eq!(files_ending(&local, ".arrow"), Vec::<std::path::PathBuf>::new());

    // kill -9 while more events arrive, restart on the same lake, and send the rest.
    let c = client();
    let more = |from: usize, n: usize| -> String {
        (from..from + n)
            .map(|i| format!(r#"{{"event_id":"k{i}","ts":"2026-11-22T11:00:00Z","client_id":"c9","cpm":2.0}}"#) + "\n")
            .collect()
    };
    let (status, _) = post_events(&c, &server.url, "auctions", more(0, 500)).await;
    assert_eq!(status, 200);
    server.kill9();
    let server = start_auctions_env(dir.path(), &args, &env);
    let (status, _) = post_events(&c, &server.url, "auctions", more(500, 500)).await;
    assert_eq!(status, 200);
    let v = wait_for(
        &c,
        &server.url,
        "SELECT count(*), count(DISTINCT event_id) FROM auctions",
        60,
        |v| v["rows"][0][0].as_u64() == Some(3100),
    )
    .await;
    assert_eq!(v["rows"][0][1], 3100, "no row doubled: {v}");
    // Still no more after the replays settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, v) = sql(&c, &server.url, "SELECT count(*) FROM auctions").await;
    assert_eq!(v["rows"][0][0], 3100, "{v}");
    let (_, v) = sql(&c, &server.url, "SELECT count(*) FROM auctions WHERE client_id = 'c9'").await;
    assert_eq!(v["rows"][0][0], 1000, "{v}");

    // A second process with an empty data directory on the same stream reads the same
    // tables from the bucket.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let other = start_auctions_env(dir2.path(), &args, &env);
    let (status, v) = sql(
        &c,
        &other.url,
        "SELECT count(*), count(DISTINCT event_id), min(day), max(day) FROM auctions",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["rows"][0],
        serde_json::json!([3100, 3100, "2026-11-20", "2026-11-22"]),
        "{v}"
    );
    // Scanned files are attributed to the dataset in the bucket too.
    assert!(v["stats"]["files_scanned"].as_u64().unwrap_or(0) > 0, "{v}");

    // A process with a stream of its own (its embedded log) would number its records from 0
    // again and skip or overwrite rows: the lake refuses it, naming its stream.
    let dir3 = tempfile::tempdir().expect("tempdir");
    let msg = serve_refused(dir3.path(), &lake, &env);
    assert!(
        msg.contains("is fed by the stream nats://") && msg.contains(&ns),
        "{msg}"
    );
    drop((server, other));
    nats_cleanup(&nats, &ns).await;
}

/// Runs `tarn serve` expecting it to refuse to start; returns what it printed.
fn serve_refused(dir: &std::path::Path, lake: &str, env: &[(String, String)]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tarn"))
        .args(["serve", "--http", "127.0.0.1:0", "--pg", "off", "--lake", lake])
        .arg("--data-dir")
        .arg(dir)
        .env("TARN_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run tarn");
    assert!(!out.status.success(), "tarn started on {lake}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_bucket_that_cannot_hold_the_lake_is_refused_at_start() {
    let Some(s3) = s3_server() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    // Nothing listens at the endpoint.
    let mut nobody = s3.env();
    for (k, v) in &mut nobody {
        if k == "AWS_ENDPOINT_URL" {
            *v = "http://127.0.0.1:9".into();
        }
    }
    let lake = s3.lake("refused");
    let msg = serve_refused(dir.path(), &lake, &nobody);
    assert!(msg.contains("cannot be written"), "{msg}");
    assert!(msg.contains(&format!("{lake}/")), "the lake is named: {msg}");

    let mut wrong = s3.env();
    for (k, v) in &mut wrong {
        if k == "AWS_SECRET_ACCESS_KEY" {
            *v = "not-the-secret".into();
        }
    }
    let msg = serve_refused(dir.path(), &lake, &wrong);
    assert!(msg.contains("cannot be written"), "{msg}");
    assert!(!msg.contains("not-the-secret"), "the secret is never printed: {msg}");

    let msg = serve_refused(dir.path(), "s3://Bad_Bucket", &s3.env());
    assert!(msg.contains("bucket name"), "{msg}");
}

fn tarn_admin(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tarn"))
        .args(args)
        .output()
        .expect("run tarn");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Compaction, vacuum and the storage report on a lake in a bucket; two processes compacting
/// the same table at once never double a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lake_in_a_bucket_is_compacted_vacuumed_and_reported() {
    use crate::maintenance::{post_in_pieces, scan, tarn_compact};
    let Some(s3) = s3_server() else { return };
    let Some(nats) = nats_server() else { return };
    let ns = nats_namespace("s3maint");
    let stream = format!("{nats}/{ns}");
    let lake = s3.lake("maintenance");
    let env = s3.env();
    let mut manual = vec!["--lake", lake.as_str(), "--stream", stream.as_str()];
    manual.extend(AUTO_COMPACTION_OFF);
    let dir = tempfile::tempdir().expect("tempdir");
    let s = start_auctions_env(dir.path(), &manual, &env);
    let c = client();
    post_in_pieces(&c, &s.url, 6).await;
    let before = scan(&c, &s.url).await;
    assert_eq!((before.0, before.2), (60, 12), "six commits over two tenants");

    let (ok, out, err) = tarn_compact(&s.url, &["--dataset", "auctions"]);
    assert!(ok, "{err}");
    assert!(out.contains("auctions: 12 files -> 2 in 2 partitions"), "{out}");
    let after = scan(&c, &s.url).await;
    assert_eq!((after.0, after.2), (60, 2));
    assert!((after.1 - before.1).abs() < 1e-9, "same rows: {after:?} vs {before:?}");
    // The staging directory is empty again: the lake's files are in the bucket only.
    let staged = files_ending(&dir.path().join("data/lake"), ".parquet");
    assert!(staged.is_empty(), "{staged:?}");

    // The removed files are in the bucket until vacuum; within the retention window it keeps
    // them, and the storage report counts them.
    let (ok, out, err) = tarn_admin(&["vacuum", "--server", &s.url, "--dataset", "auctions"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(
            "auctions: 14 files on disk, 2 active; deleted 0 files (0.0 MB), 12 kept within the retention window"
        ),
        "{out}"
    );
    let (ok, out, err) = tarn_admin(&["storage", "--json", "--server", &s.url]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("json");
    let d = &r["datasets"][0];
    assert_eq!(d["tiers"][0]["files"].as_u64(), Some(2), "{d}");
    assert_eq!(d["unreferenced_files"].as_u64(), Some(12), "{d}");
    assert!(
        d["raw_files"].as_u64().unwrap_or(0) >= 6,
        "the raw zone is in the bucket: {d}"
    );

    // A second process on the same lake; both compact new small files at the same moment.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let s2 = start_auctions_env(dir2.path(), &manual, &env);
    for round in 0..3 {
        post_in_pieces_from(&c, &s.url, 60 + round * 40, 4).await;
        let (u1, u2) = (s.url.clone(), s2.url.clone());
        let a = std::thread::spawn(move || tarn_compact(&u1, &["--dataset", "auctions"]));
        let b = std::thread::spawn(move || tarn_compact(&u2, &["--dataset", "auctions"]));
        let (a, b) = (a.join().expect("a"), b.join().expect("b"));
        assert!(a.0 && b.0, "{a:?} {b:?}");
        let want = 60 + (round as u64 + 1) * 40;
        for url in [&s.url, &s2.url] {
            let (st, v) = sql(&c, url, "SELECT count(*), count(DISTINCT event_id) FROM auctions").await;
            assert_eq!(st, 200, "{v}");
            assert_eq!(
                v["rows"][0],
                serde_json::json!([want, want]),
                "round {round}: {a:?} {b:?}"
            );
        }
    }
    drop((s, s2));
    nats_cleanup(&nats, &ns).await;
}

/// Posts `requests` requests of 10 events from id `first`, each waited on until queryable.
async fn post_in_pieces_from(c: &reqwest::Client, url: &str, first: usize, requests: usize) {
    for r in 0..requests {
        let body: Vec<String> = (0..10)
            .map(|i| {
                let id = first + r * 10 + i;
                let client = if i % 2 == 0 { "acme" } else { "beta" };
                format!(r#"{{"event_id":"e{id}","ts":"2026-11-22T12:00:00Z","client_id":"{client}","cpm":1.0}}"#)
            })
            .collect();
        let (st, v) = post_events(c, url, "auctions", body.join("\n")).await;
        assert_eq!(st, 200, "{v}");
        let want = first + (r + 1) * 10;
        wait_for(c, url, "SELECT count(*) FROM auctions", 30, |v| v["rows"][0][0] == want).await;
    }
}

/// A process that learns of a dataset from the shared metadata store finds its table, made
/// by another process in the bucket, on its own: the PostgreSQL protocol's catalog (which does
/// not ask the bucket) lists it within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_made_by_another_process_shows_in_the_postgres_catalog() {
    let Some(services) = Shared::new("s3pgcat") else { return };
    let (env, args) = (&services.env, services.args());
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start_auctions_env(dir.path(), &args, env);
    let c = client();
    let (status, v) = post_events(
        &c,
        &a.url,
        "auctions",
        r#"{"event_id":"p1","ts":"2026-11-22T10:00:00Z","client_id":"c1","cpm":1.0}"#.into(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    wait_for(&c, &a.url, "SELECT count(*) FROM auctions", 30, |v| {
        v["rows"][0][0] == 1
    })
    .await;

    // B has no descriptor: it knows auctions from the store, and its table from the bucket.
    let b = Server::start_env(&dir.path().join("b/data"), &args, env);
    let addr = b.pg.clone().expect("postgres listener");
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let start = std::time::Instant::now();
    loop {
        let out = std::process::Command::new("psql")
            .args([
                "-h", host, "-p", port, "-U", "tarn", "-d", "tarn", "-X", "-A", "-t", "-c",
            ])
            .arg("SELECT table_name FROM information_schema.tables")
            .output()
            .expect("psql (scripts/test installs it)");
        let text = String::from_utf8_lossy(&out.stdout);
        if text.lines().any(|l| l.trim() == "auctions") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "auctions never listed: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop((a, b));
    services.cleanup().await;
}

/// Tiers in a bucket are storage classes: a move writes each file of the day again with its
/// tier's class, so a server that does not know the class refuses the move (s3s-fs takes only
/// STANDARD and REDUCED_REDUNDANCY, which shows that the class reaches it) and the day stays
/// where it was; with classes the server takes, days move, an archived day refuses queries
/// until it is restored, a late file of a colder day follows it at the next run, and old days
/// expire. A class that needs a restore before each read, and tier directories, are refused at
/// start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiers_in_a_bucket_are_storage_classes() {
    use crate::maintenance::{
        CLICKS_WITH_LIFECYCLE, archived_day_is_refused, lifecycle_days, post_one_click_a_day, restore_for_three_days,
        storage_with_every_tier,
    };
    let Some(s3) = s3_server() else { return };
    let env = s3.env();
    let lake = s3.lake("tiers");
    let dir = tempfile::tempdir().expect("tempdir");
    let ds = dir.path().join("datasets");
    std::fs::create_dir_all(&ds).expect("mkdir");
    std::fs::write(ds.join("clicks.yaml"), CLICKS_WITH_LIFECYCLE).expect("descriptor");
    let data = dir.path().join("data");
    let base = [
        "--lake",
        lake.as_str(),
        "--datasets",
        ds.to_str().expect("utf8"),
        "--batch-age-ms",
        "50",
    ];

    // Refused at start: a class read only after a restore, and tier directories.
    for (flag, value, says) in [
        ("--tier-archive-class", "GLACIER", "restored object by object"),
        ("--tier-infrequent-dir", "/tmp", "in a bucket"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tarn"))
            .args(["serve", "--http", "127.0.0.1:0", "--pg", "off"])
            .arg("--data-dir")
            .arg(&data)
            .args(base)
            .args([flag, value])
            .env("TARN_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run tarn");
        let msg = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && msg.contains(says), "{flag} {value}: {msg}");
    }

    // The default classes (STANDARD_IA, GLACIER_IR) reach the server, which refuses them.
    let s = Server::start_env(&data, &base, &env);
    let c = client();
    let days = lifecycle_days();
    post_one_click_a_day(&c, &s.url, &days).await;
    let (ok, _, err) = tarn_cli(&s.url, &["lifecycle"]);
    assert!(!ok, "the server took a class it does not know");
    assert!(
        err.contains("in the storage class GLACIER_IR") && err.contains("InvalidStorageClass"),
        "{err}"
    );
    // The oldest day expired first; the day the move failed on is still read.
    let (st, v) = sql(&c, &s.url, "SELECT count(DISTINCT event_id) FROM clicks").await;
    assert_eq!((st, v["rows"][0][0].as_u64()), (200, Some(3)), "{v}");
    let plan = tarn_ok(&s.url, &["lifecycle", "--dry-run"]);
    assert!(plan.contains("clicks: 2 step(s) planned"), "{plan}");
    drop(s);

    let mut args = base.to_vec();
    args.extend([
        "--tier-infrequent-class",
        "REDUCED_REDUNDANCY",
        "--tier-archive-class",
        "REDUCED_REDUNDANCY",
    ]);
    let s = Server::start_env(&data, &args, &env);
    let done = tarn_ok(&s.url, &["lifecycle"]);
    assert!(
        done.contains("clicks: 2 step(s); 0 files compacted first, 2 moved, 0 expired"),
        "{done}"
    );
    archived_day_is_refused(&c, &s.url, days[1]).await;
    let since = days[2].to_string();
    let recent = format!("SELECT count(DISTINCT event_id) FROM clicks WHERE day >= '{since}'");
    let (st, v) = sql(&c, &s.url, &recent).await;
    assert_eq!(
        (st, v["rows"][0][0].as_u64()),
        (200, Some(2)),
        "the infrequent tier is read: {v}"
    );
    storage_with_every_tier(&s.url);

    // A late event for the infrequent day is a new file in the standard class: the next run
    // moves it and nothing else.
    let late = format!(r#"{{"event_id":"late","ts":"{since}T13:00:00Z","client_id":"beta"}}"#);
    let (st, v) = post_events(&c, &s.url, "clicks", late).await;
    assert_eq!(st, 200, "{v}");
    wait_for(&c, &s.url, &recent, 30, |v| v["rows"][0][0] == 3).await;
    let again = tarn_ok(&s.url, &["lifecycle"]);
    assert!(
        again.contains("clicks: 0 step(s); 0 files compacted first, 1 moved, 0 expired"),
        "{again}"
    );
    let settled = tarn_ok(&s.url, &["lifecycle"]);
    assert!(
        settled.contains("0 step(s); 0 files compacted first, 0 moved"),
        "{settled}"
    );

    restore_for_three_days(&s.url, days[1]);
    let (st, v) = sql(&c, &s.url, "SELECT count(DISTINCT event_id) FROM clicks").await;
    assert_eq!((st, v["rows"][0][0].as_u64()), (200, Some(4)), "restored: {v}");
    let plan = tarn_ok(&s.url, &["lifecycle", "--dry-run"]);
    assert!(
        plan.contains("clicks: 0 step(s) planned"),
        "a restored day stays: {plan}"
    );
}
