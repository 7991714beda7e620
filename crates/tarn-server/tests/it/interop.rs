//! Other engines read what tarn writes: the Delta tables read back with the `deltalake` Python
//! package (PyPI; `scripts/test` installs it into the test virtual environment), compared with
//! tarn's own answers.

use crate::server::*;

/// The test Python with `deltalake` and `pyarrow`, or `None` (with the reason) outside CI.
pub fn python_with_deltalake() -> Option<String> {
    let python = std::env::var("TARN_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let found = std::process::Command::new(&python)
        .args(["-c", "import deltalake, pyarrow"])
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(python);
    }
    let msg = format!("{python} lacks the deltalake package: run the tests through scripts/test, which installs it");
    assert!(std::env::var("CI").is_err(), "{msg}");
    eprintln!("skipping: {msg}");
    None
}

/// Reads a Delta table with the deltalake package: rows, distinct ids, days, the rows of one
/// day through a partition filter, and the version. A table in a bucket is reached through the
/// standard AWS variables of the environment.
const READ: &str = r#"
import json, os, sys
from deltalake import DeltaTable
opts = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION") if k in os.environ}
if opts.get("AWS_ENDPOINT_URL", "").startswith("http://"):
    opts["AWS_ALLOW_HTTP"] = "true"
t = DeltaTable(sys.argv[1], storage_options=opts or None)
a = t.to_pyarrow_table()
one = t.to_pyarrow_table(partitions=[("day", "=", "2026-11-21")])
print(json.dumps({
    "rows": a.num_rows,
    "distinct": len(set(a.column("event_id").to_pylist())),
    "days": sorted(set(a.column("day").to_pylist())),
    "clients": sorted(set(a.column("client_id").to_pylist())),
    "one_day": one.num_rows,
    "partitions": t.metadata().partition_columns,
    "version": t.version(),
}), flush=True)
# The package's runtime can abort while the interpreter shuts down; the answer is out.
os._exit(0)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_tables_read_back_with_the_deltalake_python_package() {
    let Some(python) = python_with_deltalake() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_auctions(dir.path(), &[]);
    let ours = post_three_days(&server.url).await;
    let table = dir.path().join("data/lake/tables/auctions");
    let v = read_with_deltalake(&python, table.to_str().expect("utf8"), &[]);
    check_read_back(&v, &ours);
}

/// The deltalake package's reading of a table (see `READ`).
pub fn read_with_deltalake(python: &str, table: &str, env: &[(String, String)]) -> serde_json::Value {
    let out = std::process::Command::new(python)
        .args(["-c", READ])
        .arg(table)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("python");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "deltalake failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(text.trim()).expect("json")
}

/// What the deltalake package must read of the 2,100 events [`post_three_days`] sends, beside
/// tarn's own count of one day (`ours`).
pub fn check_read_back(v: &serde_json::Value, ours: &serde_json::Value) {
    assert_eq!(v["rows"], 2100, "{v}");
    assert_eq!(v["distinct"], 2100, "{v}");
    assert_eq!(v["days"], serde_json::json!(["2026-11-20", "2026-11-21", "2026-11-22"]));
    assert_eq!(v["clients"], serde_json::json!(["c0", "c1", "c2", "c3"]));
    assert_eq!(v["partitions"], serde_json::json!(["day", "client_id"]));
    assert_eq!(v["one_day"], ours["rows"][0][0], "{v} vs {ours}");
    assert_eq!(v["one_day"], 700);
}

/// Posts 700 events on each of three days, waits until all 2,100 are queryable, and returns
/// tarn's count of the middle day.
pub async fn post_three_days(url: &str) -> serde_json::Value {
    let c = client();
    for d in 0..3 {
        let body: String = (0..700)
            .map(|i| {
                format!(
                    r#"{{"event_id":"d{d}-{i}","ts":"2026-11-2{d}T10:00:00Z","client_id":"c{}","cpm":1.5}}"#,
                    i % 4
                ) + "\n"
            })
            .collect();
        let (status, v) = post_events(&c, url, "auctions", body).await;
        assert_eq!(status, 200, "{v}");
    }
    wait_for(&c, url, "SELECT count(*) FROM auctions", 60, |v| {
        v["rows"][0][0].as_u64() == Some(2100)
    })
    .await;
    let (_, ours) = sql(&c, url, "SELECT count(*) FROM auctions WHERE day = '2026-11-21'").await;
    ours
}
