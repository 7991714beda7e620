//! The PostgreSQL wire protocol with real clients: the `psql` binary and psycopg (installed by
//! `scripts/test` into a virtual environment named by `TARN_TEST_PYTHON`).

use std::process::Command;

use crate::server::*;

/// A client program, or a clear message (and, in CI, a failure) when it is missing.
fn client_program(var: Option<&str>, default: &str) -> Option<String> {
    let prog = var
        .and_then(|v| std::env::var(v).ok())
        .unwrap_or_else(|| default.to_string());
    let found = Command::new(&prog)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(prog);
    }
    let msg = format!("{prog} is not installed: run the tests through scripts/test, which installs it");
    assert!(std::env::var("CI").is_err(), "{msg}");
    eprintln!("skipping: {msg}");
    None
}

/// The bytes of the Parquet files under `dir`.
fn parquet_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            total += parquet_bytes(&p);
        } else if p.extension().is_some_and(|x| x == "parquet") {
            total += e.metadata().expect("metadata").len();
        }
    }
    total
}

fn sha(s: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_psycopg_query_over_the_postgres_protocol() {
    let Some(psql) = client_program(None, "psql") else {
        return;
    };
    let Some(python) = client_program(Some("TARN_TEST_PYTHON"), "python3") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys.yaml");
    std::fs::write(
        &keys,
        format!(
            "version: 1\nkeys:\n  - {{ name: analyst, tenant: \"*\", sha256: {} }}\n  - {{ name: intern, tenant: \"*\", sha256: {}, query_bytes_max: 100 }}\n  - {{ name: acme, tenant: acme, sha256: {} }}\n",
            sha("analyst-secret"),
            sha("intern-secret"),
            sha("acme-secret")
        ),
    )
    .expect("keys");
    let s = start_auctions(dir.path(), &["--read-keys", keys.to_str().expect("utf8")]);
    let pg = s.pg.clone().expect("the postgres listener is on");
    let (host, port) = pg.rsplit_once(':').expect("host:port");
    let c = client();
    let body: Vec<String> = (0..40)
        .map(|i| {
            format!(
                r#"{{"event_id":"e{i}","ts":"2026-11-{}T10:00:00Z","client_id":"{}","cpm":{}}}"#,
                20 + i % 2,
                if i % 4 == 0 { "acme" } else { "beta" },
                f64::from(i) / 4.0
            )
        })
        .collect();
    let (st, v) = post_events(&c, &s.url, "auctions", body.join("\n")).await;
    assert_eq!(st, 200, "{v}");
    wait_for(&c, &s.url, "SELECT count(*) FROM auctions", 30, |v| {
        v["rows"][0][0] == 40
    })
    .await;

    let run_psql = |user: &str, password: &str, sql: &str| {
        let out = Command::new(&psql)
            .args([
                "-h",
                host,
                "-p",
                port,
                "-U",
                user,
                "-d",
                "tarn",
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("run psql");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // psql, simple protocol: rows, several statements, a SHOW, session statements.
    let (code, out, err) = run_psql(
        "analyst",
        "analyst-secret",
        "SELECT client_id, count(*) FROM auctions WHERE day = '2026-11-20' GROUP BY 1 ORDER BY 1",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "acme|10\nbeta|10");
    let (code, out, err) = run_psql(
        "analyst",
        "analyst-secret",
        "BEGIN; SET extra_float_digits = 3; SHOW transaction isolation level; SELECT 2; COMMIT",
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("read committed") && out.contains('2'), "{out}");
    // What psql's \d and BI tools look up on connect: pg_catalog (with OIDs that hold from one
    // statement to the next) and information_schema.
    let (code, out, err) = run_psql("analyst", "analyst-secret", "\\dt");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("public|auctions|table") && out.contains("system|queries|table"),
        "{out}"
    );
    let (code, out, err) = run_psql("analyst", "analyst-secret", "\\d auctions");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("client_id|text")
            && out.contains("cpm|double precision")
            && out.contains("ts|timestamp with time zone"),
        "{out}"
    );
    // \d+ adds storage and the descriptions of the contract; \dt+ the size of the live files
    // and the dataset's description.
    let (code, out, err) = run_psql("analyst", "analyst-secret", "\\d+ auctions");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("cpm|double precision||||plain|||price per thousand impressions")
            && out.contains("event_id|text||not null||extended|||\n"),
        "{out}"
    );
    let (code, out, err) = run_psql("analyst", "analyst-secret", "\\dt+ auctions");
    assert_eq!(code, 0, "{err}");
    let size = out.split('|').nth(6).unwrap_or_default();
    // Nothing was compacted, so every data file is live.
    let live = parquet_bytes(&dir.path().join("data/lake/tables/auctions"));
    let printed = if live < 10 * 1024 {
        format!("{live} bytes")
    } else {
        format!("{} kB", (live / 512).div_ceil(2))
    };
    assert!(
        out.starts_with("public|auctions|table|") && out.ends_with("|ad auctions") && size == printed,
        "{out}: the live files hold {live} bytes"
    );
    let bi = [
        // JDBC's getTables (Metabase, DBeaver, Tableau through JDBC).
        (
            "SELECT NULL AS TABLE_CAT, n.nspname AS TABLE_SCHEM, c.relname AS TABLE_NAME, CASE c.relkind WHEN 'r' THEN 'TABLE' WHEN 'v' THEN 'VIEW' ELSE NULL END AS TABLE_TYPE, d.description AS REMARKS FROM pg_catalog.pg_namespace n, pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_description d ON (c.oid = d.objoid AND d.objsubid = 0 AND d.classoid = 'pg_class'::regclass) WHERE c.relnamespace = n.oid AND c.relkind IN ('r','p','v','m','f') ORDER BY TABLE_TYPE, TABLE_SCHEM, TABLE_NAME",
            "|public|auctions|TABLE|ad auctions",
        ),
        // Redash's schema browser.
        (
            "SELECT table_schema, table_name, column_name FROM information_schema.columns WHERE table_schema NOT IN ('pg_catalog', 'information_schema') AND table_name = 'auctions' ORDER BY ordinal_position LIMIT 1",
            "public|auctions|event_id",
        ),
        ("SELECT typname FROM pg_catalog.pg_type WHERE oid = 20", "int8"),
        ("SELECT current_database(), current_schema()", "datafusion|public"),
        ("SELECT version()", "PostgreSQL 16.0 (tarn"),
        (
            "SELECT nspname FROM pg_catalog.pg_namespace WHERE nspname = 'public'",
            "public",
        ),
    ];
    for (q, want) in bi {
        let (code, out, err) = run_psql("analyst", "analyst-secret", q);
        assert_eq!(code, 0, "{q}: {err}");
        assert!(out.contains(want), "{q}: {out}");
    }

    // Cursors: psql with FETCH_COUNT reads a result through DECLARE and FETCH, seven rows at
    // a time; by hand, FETCH and MOVE go forward, COMMIT closes a cursor without HOLD, one
    // WITH HOLD stays, and backward moves are refused.
    let all = "SELECT event_id FROM auctions ORDER BY event_id";
    let (code, whole, err) = run_psql("analyst", "analyst-secret", all);
    assert_eq!(code, 0, "{err}");
    let out = Command::new(&psql)
        .args(["-h", host, "-p", port, "-U", "analyst", "-d", "tarn", "-X", "-A", "-t"])
        .args(["-v", "ON_ERROR_STOP=1", "-v", "FETCH_COUNT=7", "-c", all])
        .env("PGPASSWORD", "analyst-secret")
        .output()
        .expect("run psql");
    let paged = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(paged, whole);
    assert_eq!(paged.lines().count(), 40);
    let (code, out, err) = run_psql(
        "analyst",
        "analyst-secret",
        &format!(
            "BEGIN; DECLARE c NO SCROLL CURSOR FOR {all}; FETCH 3 FROM c; MOVE 2 IN c; FETCH FORWARD 2 FROM c; \
             CLOSE c; DECLARE h CURSOR WITH HOLD FOR SELECT 42; COMMIT; FETCH ALL h"
        ),
    );
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with('e') || *l == "42").collect();
    assert_eq!(rows, ["e0", "e1", "e10", "e13", "e14", "42"], "{out}");
    for (q, want) in [
        (
            "BEGIN; DECLARE gone CURSOR FOR SELECT 1; COMMIT; FETCH 1 FROM gone",
            "cursor \"gone\" does not exist",
        ),
        (
            "BEGIN; DECLARE c CURSOR FOR SELECT 1; FETCH PRIOR FROM c",
            "forward only",
        ),
        (
            "BEGIN; DECLARE c CURSOR FOR SELECT 1; DECLARE c CURSOR FOR SELECT 2",
            "cursor \"c\" already exists",
        ),
        ("DECLARE d CURSOR FOR DELETE FROM auctions", "declared FOR a query"),
        (
            "BEGIN; DECLARE c CURSOR FOR SELECT 1; FETCH ALL c; FETCH 1 c",
            "still sending the rows of an earlier FETCH",
        ),
    ] {
        let (code, _, err) = run_psql("analyst", "analyst-secret", q);
        assert_ne!(code, 0, "{q}");
        assert!(err.contains(want), "{q}: {err}");
    }

    // Errors are errors, with PostgreSQL's codes: a bad password, a tenant's key, a write,
    // a query over the key's budget.
    let (code, _, err) = run_psql("analyst", "wrong", "SELECT 1");
    assert_ne!(code, 0);
    assert!(err.to_lowercase().contains("password authentication failed"), "{err}");
    let (code, _, _) = run_psql("acme", "acme-secret", "SELECT 1");
    assert_ne!(code, 0, "a tenant key runs no SQL");
    let (code, _, err) = run_psql("analyst", "analyst-secret", "DELETE FROM auctions");
    assert_ne!(code, 0);
    assert!(err.contains("read-only"), "{err}");
    // A literal stays one value however the compatibility rewrite prints it: to the engine a
    // backslash is a backslash and '' a quote, so this matches no client.
    let (code, out, err) = run_psql(
        "analyst",
        "analyst-secret",
        "SELECT count(*) FROM auctions WHERE client_id = 'x\\'' OR 1=1 --'",
    );
    assert_eq!((code, out.as_str()), (0, "0"), "{err}");
    let (code, _, err) = run_psql("intern", "intern-secret", "SELECT sum(cpm) FROM auctions");
    assert_ne!(code, 0);
    assert!(err.contains("budget of 100 bytes"), "{err}");

    // psycopg: the extended protocol with bound parameters, transactions, a refused write.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/pg_client.py");
    let out = Command::new(&python)
        .args([script, host, port, "analyst", "analyst-secret"])
        .output()
        .expect("run python");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No module named 'psycopg'") {
        let msg = "psycopg is not installed: run the tests through scripts/test, which installs it";
        assert!(std::env::var("CI").is_err(), "{msg}");
        eprintln!("skipping: {msg}");
        return;
    }
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["columns"], serde_json::json!(["client_id", "n", "revenue"]), "{v}");
    // Day 2026-11-20 is the even events; cpm > 0.5 leaves out e0 and e2.
    let (_, want) = sql(
        &c,
        &s.url,
        "SELECT client_id, count(*), sum(cpm) FROM auctions WHERE day = '2026-11-20' AND cpm > 0.5 GROUP BY 1 ORDER BY 1",
    )
    .await;
    assert_eq!(v["rows"], want["rows"], "{v}");
    assert_eq!(v["quoted"], "it's");
    assert_eq!(
        v["hostile"],
        serde_json::json!([0, 0, 0]),
        "a parameter changed the query: {v}"
    );
    assert_eq!(
        v["hostile_client_side"],
        serde_json::json!([0, 0, 0]),
        "a literal changed the query: {v}"
    );
    assert_eq!(v["insert_error"], "25006");
    assert_eq!(v["count"], 40);
    let (_, ids) = sql(&c, &s.url, "SELECT event_id FROM auctions ORDER BY event_id").await;
    let ids: Vec<&serde_json::Value> = ids["rows"].as_array().expect("rows").iter().map(|r| &r[0]).collect();
    assert_eq!(v["cursor"]["columns"], serde_json::json!(["event_id", "cpm"]), "{v}");
    assert_eq!(
        (v["cursor"]["first"].as_u64(), v["cursor"]["rest"].as_u64()),
        (Some(5), Some(35)),
        "{v}"
    );
    assert_eq!(
        v["cursor"]["ids"].as_array().expect("ids").iter().collect::<Vec<_>>(),
        ids,
        "{v}"
    );
    assert_eq!(v["simple"], 2);
    // The history names the key.
    let (_, h) = sql(&c, &s.url, "SELECT count(*) FROM system.queries WHERE who = 'analyst'").await;
    assert!(h["rows"][0][0].as_u64().is_some_and(|n| n >= 4), "{h}");
}

/// With a certificate, the listener takes TLS connections only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_required_once_configured() {
    let Some(psql) = client_program(None, "psql") else {
        return;
    };
    let openssl = "openssl";
    if !Command::new(openssl)
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let msg = "openssl is not installed (Debian's openssl package makes the test certificate)";
        assert!(std::env::var("CI").is_err(), "{msg}");
        eprintln!("skipping: {msg}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new(openssl)
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let s = start_auctions(
        dir.path(),
        &[
            "--pg-tls-cert",
            cert.to_str().expect("utf8"),
            "--pg-tls-key",
            key.to_str().expect("utf8"),
        ],
    );
    let pg = s.pg.clone().expect("the postgres listener is on");
    let (host, port) = pg.rsplit_once(':').expect("host:port");
    let run = |mode: &str| {
        let out = Command::new(&psql)
            .args([
                "-h",
                host,
                "-p",
                port,
                "-U",
                "x",
                "-d",
                "tarn",
                "-X",
                "-A",
                "-t",
                "-c",
                "SELECT 40 + 2",
            ])
            .env("PGSSLMODE", mode)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("run psql");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = run("require");
    assert!(ok, "{err}");
    assert_eq!(out, "42");
    let (ok, _, err) = run("disable");
    assert!(!ok);
    assert!(err.contains("TLS connections only"), "{err}");
}

/// Connections past `--pg-connections-max` are closed at once; a freed slot takes the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed() {
    let Some(psql) = client_program(None, "psql") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let s = start_auctions(dir.path(), &["--pg-connections-max", "1"]);
    let pg = s.pg.clone().expect("the postgres listener is on");
    let (host, port) = pg.rsplit_once(':').expect("host:port");
    let run = || {
        let out = Command::new(&psql)
            .args([
                "-h", host, "-p", port, "-U", "x", "-d", "tarn", "-X", "-A", "-t", "-c", "SELECT 7",
            ])
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("run psql");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    };
    let held = std::net::TcpStream::connect(&pg).expect("connect");
    // The server has accepted it once a second client is refused; give the accept a moment.
    let mut refused = false;
    for _ in 0..50 {
        if !run().0 {
            refused = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        refused,
        "a second connection should be closed while the first holds the only slot"
    );
    drop(held);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (ok, out) = run();
        if ok {
            assert_eq!(out, "7");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the freed slot was never taken");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Cursors keep PostgreSQL's transaction rules, and an idle one gives its query's turn back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_follow_transactions_and_idle_ones_are_stopped() {
    let Some(psql) = client_program(None, "psql") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    // Two queries at a time, so two cursors left open hold every turn.
    let s = start_auctions(dir.path(), &["--pg-cursor-idle-s", "2", "--query-concurrency", "2"]);
    let pg = s.pg.clone().expect("the postgres listener is on");
    let (host, port) = pg.rsplit_once(':').expect("host:port");
    let c = client();
    let body: Vec<String> = (0..30)
        .map(|i| format!(r#"{{"event_id":"e{i:02}","ts":"2026-11-20T10:00:00Z","client_id":"acme"}}"#))
        .collect();
    let (st, v) = post_events(&c, &s.url, "auctions", body.join("\n")).await;
    assert_eq!(st, 200, "{v}");
    wait_for(&c, &s.url, "SELECT count(*) FROM auctions", 30, |v| {
        v["rows"][0][0] == 30
    })
    .await;
    let psql_cmd = || {
        let mut cmd = Command::new(&psql);
        cmd.args(["-h", host, "-p", port, "-U", "x", "-d", "tarn", "-X", "-A", "-t"])
            .args(["-v", "ON_ERROR_STOP=1"])
            .env("PGCONNECT_TIMEOUT", "10");
        cmd
    };
    // Each -c is its own simple query on one connection.
    let run = |statements: &[&str]| {
        let mut cmd = psql_cmd();
        for s in statements {
            cmd.args(["-c", s]);
        }
        let out = cmd.output().expect("run psql");
        // Rows only: psql also prints the command tags (BEGIN, DECLARE CURSOR, ...).
        let rows: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with(|c: char| c.is_ascii_uppercase()))
            .map(str::to_string)
            .collect();
        (
            out.status.code().unwrap_or(-1),
            rows.join("\n"),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let first = "SELECT event_id FROM auctions ORDER BY event_id";

    // A cursor without HOLD outside a transaction block is refused, as in PostgreSQL ...
    let (code, _, err) = run(&[&format!("DECLARE c CURSOR FOR {first}")]);
    assert_ne!(code, 0);
    assert!(err.contains("can only be used in transaction blocks"), "{err}");
    // ... but a string of several statements is a transaction of its own: the cursor works in
    // it and is gone after it.
    let (code, out, err) = run(&[
        &format!("DECLARE c CURSOR FOR {first}; FETCH 2 FROM c"),
        "FETCH 1 FROM c",
    ]);
    assert_ne!(code, 0, "{out}");
    assert_eq!(out, "e00\ne01");
    assert!(err.contains("cursor \"c\" does not exist"), "{err}");
    // ROLLBACK closes a WITH HOLD cursor declared in the block it rolls back, and keeps one
    // declared before it.
    let (code, out, err) = run(&[
        "DECLARE kept CURSOR WITH HOLD FOR SELECT 7",
        "BEGIN",
        "DECLARE undone CURSOR WITH HOLD FOR SELECT 8",
        "ROLLBACK",
        "FETCH 1 FROM kept",
        "FETCH 1 FROM undone",
    ]);
    assert_ne!(code, 0, "{out}");
    assert_eq!(out, "7", "{err}");
    assert!(err.contains("cursor \"undone\" does not exist"), "{err}");
    // COMMIT keeps it.
    let (code, out, err) = run(&[
        "BEGIN",
        "DECLARE h CURSOR WITH HOLD FOR SELECT 9",
        "COMMIT",
        "FETCH 1 FROM h",
    ]);
    assert_eq!((code, out.as_str()), (0, "9"), "{err}");

    // A failed statement aborts its block: later statements are refused until it ends, and
    // its COMMIT is a ROLLBACK (which closes the hold cursor declared in it). An error that
    // comes with the rows, after the answer began, aborts it too. A string of several that
    // fails is rolled back, with the hold cursor it declared.
    let out = psql_cmd()
        .args(["-v", "ON_ERROR_STOP=0"])
        .args(["-c", "BEGIN"])
        .args(["-c", "DECLARE inblock CURSOR WITH HOLD FOR SELECT 2"])
        .args(["-c", "SELECT no_such_column FROM auctions"])
        .args(["-c", "SELECT 1"])
        .args(["-c", "COMMIT"])
        .args(["-c", "FETCH 1 FROM inblock"])
        .args([
            "-c",
            "DECLARE s CURSOR WITH HOLD FOR SELECT 3; SELECT no_such_column FROM auctions",
        ])
        .args(["-c", "FETCH 1 FROM s"])
        .args(["-c", "BEGIN"])
        .args(["-c", "SELECT CAST(event_id AS BIGINT) FROM auctions"])
        .args(["-c", "SELECT 5"])
        .args(["-c", "COMMIT"])
        .args(["-c", "SELECT 4"])
        .output()
        .expect("run psql");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "BEGIN",
            "DECLARE CURSOR",
            "ROLLBACK",
            "DECLARE CURSOR",
            "BEGIN",
            "ROLLBACK",
            "4"
        ],
        "{stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("ERROR")).collect();
    let aborted = "current transaction is aborted, commands ignored until end of transaction block";
    assert_eq!(errors.len(), 7, "{stderr}");
    assert!(errors[0].contains("no_such_column"), "{stderr}");
    assert!(errors[1].contains(aborted), "{stderr}");
    assert!(errors[2].contains("cursor \"inblock\" does not exist"), "{stderr}");
    assert!(errors[3].contains("no_such_column"), "{stderr}");
    assert!(errors[4].contains("cursor \"s\" does not exist"), "{stderr}");
    assert!(errors[5].contains("e0"), "the cast fails on a value: {stderr}");
    assert!(errors[6].contains(aborted), "{stderr}");

    // Idle cursors: psql declares two over a result, fetches a row from each, then waits 10 s.
    // Past the 2 s idle limit their queries are stopped, so a turn is free for another query
    // long before psql's connection ends; the cursor's next FETCH is an error.
    let script = dir.path().join("idle.sql");
    std::fs::write(
        &script,
        format!(
            "DECLARE idle CURSOR WITH HOLD FOR {first};\nDECLARE other CURSOR WITH HOLD FOR {first};\n\
             FETCH 1 FROM idle;\nFETCH 1 FROM other;\n\\! sleep 10\nFETCH 1 FROM idle;\n"
        ),
    )
    .expect("script");
    let idle = psql_cmd()
        .args(["-q", "-f", script.to_str().expect("utf8")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run psql");
    let t0 = std::time::Instant::now();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (st, v) = sql(&c, &s.url, "SELECT count(*) FROM auctions").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["rows"][0][0], 30);
    let waited = t0.elapsed();
    let out = idle.wait_with_output().expect("psql ends");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(
        waited < std::time::Duration::from_secs(8),
        "the query waited {waited:?}, until the idle cursor's connection ended: {stderr}"
    );
    assert_eq!(stdout.lines().collect::<Vec<_>>(), ["e00", "e00"], "{stdout}");
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr.contains("idle limit"), "{stderr}");
}
