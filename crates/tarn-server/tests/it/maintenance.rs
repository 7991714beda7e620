//! Compaction through the real server: by hand with `tarn compact` (dry run, then for real), and
//! on its own when partitions collect small files. Rows are the same before and after; the
//! files a full scan reads drop to one per partition.

use std::process::Command;

use crate::server::*;

fn event(id: usize, client: &str) -> String {
    format!(
        r#"{{"event_id":"e{id}","ts":"2026-11-22T12:00:00Z","client_id":"{client}","bidder":"b{}","cpm":{}}}"#,
        id % 3,
        id as f64 / 4.0
    )
}

/// Posts `requests` requests of 10 events over two tenants, each waited on until queryable so
/// that each becomes its own commit and so its own small file per partition.
pub async fn post_in_pieces(c: &reqwest::Client, url: &str, requests: usize) {
    for r in 0..requests {
        let body: Vec<String> = (0..10)
            .map(|i| event(r * 10 + i, if i % 2 == 0 { "acme" } else { "beta" }))
            .collect();
        let (st, v) = post_events(c, url, "auctions", body.join("\n")).await;
        assert_eq!(st, 200, "{v}");
        let want = (r + 1) * 10;
        wait_for(c, url, "SELECT count(*) FROM auctions", 30, |v| v["rows"][0][0] == want).await;
    }
}

/// (rows, sum of cpm, files scanned) of a full scan.
pub async fn scan(c: &reqwest::Client, url: &str) -> (u64, f64, u64) {
    let (st, v) = sql(c, url, "SELECT count(*), sum(cpm) FROM auctions").await;
    assert_eq!(st, 200, "{v}");
    (
        v["rows"][0][0].as_u64().expect("count"),
        v["rows"][0][1].as_f64().expect("sum"),
        v["stats"]["files_scanned"].as_u64().expect("files"),
    )
}

pub fn tarn_compact(url: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["compact"];
    all.extend_from_slice(args);
    tarn_cli(url, &all)
}

/// A dataset whose days move to the infrequent tier after 30 days, to the archive after a
/// year, and expire after 3,000 days.
pub const CLICKS_WITH_LIFECYCLE: &str = "name: clicks\nfields:\n  - { name: event_id, type: string, required: true }\n  - { name: ts, type: timestamp, required: true }\n  - { name: client_id, type: string, required: true }\nevent_time: ts\nevent_id: event_id\npartitioning: { tenant: client_id }\nlifecycle: { infrequent_after_days: 30, archive_after_days: 365, expire_after_days: 3000 }\n";

/// Days 4,000, 400 and 100 days ago and today: one to expire, one for the archive, one for the
/// infrequent tier and one that stays.
pub fn lifecycle_days() -> [chrono::NaiveDate; 4] {
    let today = chrono::Utc::now().date_naive();
    [4000, 400, 100, 0].map(|n| today - chrono::Duration::days(n))
}

/// A scan over every day of `clicks` is refused with 409, naming the archived `day` and how to
/// restore it.
pub async fn archived_day_is_refused(c: &reqwest::Client, url: &str, day: chrono::NaiveDate) {
    let (st, v) = sql(c, url, "SELECT count(DISTINCT event_id) FROM clicks").await;
    assert_eq!(st, 409, "{v}");
    let msg = v["error"]["message"].as_str().expect("message");
    assert!(
        msg.contains(&format!("clicks day={day}")) && msg.contains("tarn restore"),
        "{msg}"
    );
}

/// `tarn restore` of one day of `clicks` (one file) for three days.
pub fn restore_for_three_days(url: &str, day: chrono::NaiveDate) {
    let day = day.to_string();
    let restored = tarn_ok(url, &["restore", "--dataset", "clicks", "--day", &day, "--days", "3"]);
    assert!(
        restored.contains("1 files back in the standard tier for 3 days"),
        "{restored}"
    );
}

/// `tarn storage --json`, whose first dataset has days in every tier, warmest first.
pub fn storage_with_every_tier(url: &str) -> serde_json::Value {
    let r: serde_json::Value = serde_json::from_str(&tarn_ok(url, &["storage", "--json"])).expect("json");
    let tiers: Vec<&str> = r["datasets"][0]["tiers"]
        .as_array()
        .expect("tiers")
        .iter()
        .map(|t| t["tier"].as_str().expect("tier"))
        .collect();
    assert_eq!(tiers, ["standard", "infrequent", "archive"], "{r}");
    r
}

/// Posts one `clicks` event on each day and waits until all are queryable.
pub async fn post_one_click_a_day(c: &reqwest::Client, url: &str, days: &[chrono::NaiveDate]) {
    let body: Vec<String> = days
        .iter()
        .enumerate()
        .map(|(i, d)| format!(r#"{{"event_id":"e{i}","ts":"{d}T12:00:00Z","client_id":"acme"}}"#))
        .collect();
    let (st, v) = post_events(c, url, "clicks", body.join("\n")).await;
    assert_eq!(st, 200, "{v}");
    wait_for(c, url, "SELECT count(*) FROM clicks", 30, |v| {
        v["rows"][0][0] == days.len()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_by_hand_keeps_every_row_and_cuts_the_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = start_auctions(dir.path(), &AUTO_COMPACTION_OFF);
    let c = client();
    post_in_pieces(&c, &s.url, 6).await;
    let before = scan(&c, &s.url).await;
    assert_eq!((before.0, before.2), (60, 12), "six commits over two tenants");

    let (ok, out, err) = tarn_compact(&s.url, &["--dataset", "auctions", "--dry-run"]);
    assert!(ok, "{err}");
    assert!(out.contains("would merge 12 files into 2 in 2 partitions"), "{out}");
    assert_eq!(scan(&c, &s.url).await, before, "a dry run changes nothing");

    let (ok, out, err) = tarn_compact(&s.url, &["--dataset", "auctions", "--day", "2026-11-22"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("auctions: 12 files -> 2 in 2 partitions (1 commit(s), 0 partition(s) left"),
        "{out}"
    );
    assert!(err.contains("2/2 bins"), "a progress bar on stderr: {err}");
    let after = scan(&c, &s.url).await;
    assert_eq!((after.0, after.2), (60, 2));
    assert!((after.1 - before.1).abs() < 1e-9, "same rows: {after:?} vs {before:?}");

    let (ok, out, _) = tarn_compact(&s.url, &[]);
    assert!(ok);
    assert!(out.contains("auctions: 0 files -> 0"), "nothing left to do: {out}");

    // The storage report: the compacted table, the files waiting for vacuum, and the bytes the
    // queries above scanned, priced.
    let (_, q) = sql(&c, &s.url, "SELECT sum(cpm) FROM auctions").await;
    let scanned = q["stats"]["bytes_by_dataset"]["auctions"]
        .as_u64()
        .unwrap_or_else(|| panic!("bytes by dataset: {q}"));
    assert!(
        scanned > 0 && scanned == q["stats"]["bytes_scanned"].as_u64().expect("bytes"),
        "{q}"
    );
    let cost = q["stats"]["estimated_cost_usd"].as_f64().expect("cost");
    assert!((cost - scanned as f64 / (1u64 << 40) as f64 * 5.0).abs() < 1e-18, "{q}");
    let out = Command::new(env!("CARGO_BIN_EXE_tarn"))
        .args(["storage", "--json", "--server", &s.url])
        .output()
        .expect("run tarn storage");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let d = &r["datasets"][0];
    assert_eq!(d["dataset"], "auctions");
    assert_eq!(
        (d["tiers"][0]["files"].as_u64(), d["tiers"][0]["partitions"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(d["unreferenced_files"].as_u64(), Some(12));
    assert!(d["scanned_bytes_month"].as_u64().expect("scanned") >= scanned, "{d}");
    let bytes = d["tiers"][0]["bytes"].as_f64().expect("bytes");
    let storage = (bytes + (d["unreferenced_bytes"].as_f64().expect("u") + d["raw_bytes"].as_f64().expect("r")))
        * 0.023
        / (1u64 << 30) as f64;
    let cost = d["monthly_storage_cost"].as_f64().expect("cost");
    assert!((cost - storage).abs() < 1e-12, "{cost} vs {storage}");
    let text = Command::new(env!("CARGO_BIN_EXE_tarn"))
        .args(["storage", "--dataset", "auctions", "--server", &s.url])
        .output()
        .expect("run tarn storage");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("standard   2026-11-22 .. 2026-11-22  2 partitions, 2 files"),
        "{text}"
    );
    let (ok, _, err) = tarn_compact(&s.url, &["--dataset", "nope"]);
    assert!(!ok && err.contains("dataset \"nope\" does not exist"), "{err}");
    let (ok, _, err) = tarn_compact(&s.url, &["--day", "22/11/2026"]);
    assert!(!ok && err.contains("is not a date"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_with_enough_small_files_are_compacted_on_their_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = start_auctions(
        dir.path(),
        &[
            "--compact-trigger-files",
            "4",
            "--compact-check-ms",
            "200",
            "--compact-every-s",
            "0",
            "--compact-quiet-s",
            "0",
        ],
    );
    let c = client();
    // Each tenant's partition reaches the trigger of four small files with the fourth request.
    post_in_pieces(&c, &s.url, 4).await;
    let start = std::time::Instant::now();
    loop {
        let (rows, _, files) = scan(&c, &s.url).await;
        assert_eq!(rows, 40, "no row lost or doubled while compacting");
        if files <= 2 {
            break;
        }
        assert!(start.elapsed().as_secs() < 30, "still {files} files after 30 s");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_gone_quiet_are_compacted_on_their_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Neither the small-file trigger nor the schedule runs: only the quiet rule can compact.
    let s = start_auctions(
        dir.path(),
        &[
            "--compact-trigger-files",
            "0",
            "--compact-every-s",
            "0",
            "--compact-quiet-s",
            "2",
            "--compact-check-ms",
            "200",
        ],
    );
    let c = client();
    post_in_pieces(&c, &s.url, 3).await;
    let start = std::time::Instant::now();
    loop {
        let (rows, sum, files) = scan(&c, &s.url).await;
        assert_eq!(rows, 30, "no row lost or doubled while compacting");
        assert_eq!(sum, (0..30).map(|i| i as f64 / 4.0).sum::<f64>());
        if files == 2 {
            break;
        }
        assert!(start.elapsed().as_secs() < 30, "still {files} files after 30 s");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vacuum_keeps_recently_removed_files_and_refuses_short_retention() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ds = dir.path().join("datasets");
    write_descriptor(&ds);
    let data = dir.path().join("data");
    let short = Command::new(env!("CARGO_BIN_EXE_tarn"))
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--vacuum-retain-hours",
            "1",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .expect("run tarn serve");
    assert!(!short.status.success());
    assert!(String::from_utf8_lossy(&short.stderr).contains("below the minimum of 2"));
    // A failure after the background runtime started is an error too, not a panic.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let busy = Command::new(env!("CARGO_BIN_EXE_tarn"))
        .args(["serve", "--http", &addr, "--data-dir"])
        .arg(&data)
        .output()
        .expect("run tarn serve");
    let err = String::from_utf8_lossy(&busy.stderr);
    assert_eq!(busy.status.code(), Some(1), "{err}");
    assert!(
        err.contains("binding HTTP listener") && !err.contains("panicked"),
        "{err}"
    );

    let s = Server::start(
        &data,
        &[
            "--datasets",
            ds.to_str().expect("utf8"),
            "--batch-age-ms",
            "50",
            "--compact-trigger-files",
            "0",
            "--compact-quiet-s",
            "0",
        ],
    );
    let c = client();
    post_in_pieces(&c, &s.url, 3).await;
    let (ok, _, err) = tarn_compact(&s.url, &[]);
    assert!(ok, "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_tarn"))
        .args(["vacuum", "--server", &s.url, "--dataset", "auctions"])
        .output()
        .expect("run tarn vacuum");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains(
            "auctions: 8 files on disk, 2 active; deleted 0 files (0.0 MB), 6 kept within the retention window"
        ),
        "{text}"
    );
    assert_eq!(scan(&c, &s.url).await.0, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_days_refuse_queries_until_restored_and_old_days_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ds = dir.path().join("datasets");
    std::fs::create_dir_all(&ds).expect("mkdir");
    std::fs::write(ds.join("clicks.yaml"), CLICKS_WITH_LIFECYCLE).expect("descriptor");
    let cold = dir.path().join("cold-volume");
    let s = Server::start(
        &dir.path().join("data"),
        &[
            "--datasets",
            ds.to_str().expect("utf8"),
            "--batch-age-ms",
            "50",
            "--tier-archive-dir",
            cold.to_str().expect("utf8"),
        ],
    );
    let c = client();
    let days = lifecycle_days();
    post_one_click_a_day(&c, &s.url, &days).await;
    let run = |args: &[&str]| tarn_ok(&s.url, args);
    let plan = run(&["lifecycle", "--dry-run"]);
    assert!(plan.contains("clicks: 3 step(s) planned"), "{plan}");
    assert!(plan.contains(&format!("day={} expire", days[0])), "{plan}");
    assert!(plan.contains(&format!("day={} standard -> archive", days[1])), "{plan}");
    assert!(
        plan.contains(&format!("day={} standard -> infrequent", days[2])),
        "{plan}"
    );
    let done = run(&["lifecycle"]);
    assert!(
        done.contains("clicks: 3 step(s); 0 files compacted first, 2 moved, 1 expired"),
        "{done}"
    );
    assert!(
        cold.join(format!("clicks/day={}", days[1])).is_dir(),
        "the archive is its own volume"
    );

    // count(*) alone is answered from the log's statistics and reads no file, archived or not.
    let (st, v) = sql(&c, &s.url, "SELECT count(*) FROM clicks").await;
    assert_eq!((st, v["rows"][0][0].as_u64()), (200, Some(3)), "{v}");
    archived_day_is_refused(&c, &s.url, days[1]).await;
    let since = days[2].to_string();
    let (st, v) = sql(
        &c,
        &s.url,
        &format!("SELECT count(DISTINCT event_id) FROM clicks WHERE day >= '{since}'"),
    )
    .await;
    assert_eq!(
        (st, v["rows"][0][0].as_u64()),
        (200, Some(2)),
        "the infrequent tier is read: {v}"
    );

    let r = storage_with_every_tier(&s.url);
    let d = &r["datasets"][0];
    let cold = d["retrieved_bytes_month"].as_u64().expect("retrieved");
    assert!(
        cold > 0 && cold <= d["scanned_bytes_month"].as_u64().expect("scanned"),
        "{d}"
    );
    let priced = cold as f64 / (1u64 << 30) as f64 * 0.01;
    assert!(
        (d["retrieval_cost_month"].as_f64().expect("cost") - priced).abs() < 1e-15,
        "{d}"
    );

    restore_for_three_days(&s.url, days[1]);
    let (st, v) = sql(&c, &s.url, "SELECT count(*) FROM clicks").await;
    assert_eq!(
        (st, v["rows"][0][0].as_u64()),
        (200, Some(3)),
        "restored, and the expired day is gone: {v}"
    );
    let again = run(&["lifecycle", "--dry-run"]);
    assert!(
        again.contains("clicks: 0 step(s) planned"),
        "a restored day stays: {again}"
    );
}
