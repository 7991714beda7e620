//! The same contract for both backends; PostgreSQL against the real server
//! (`TARN_TEST_POSTGRES`, set by `scripts/test`).

use super::*;

/// The test server, or `None` with the reason outside CI; under CI a missing server fails.
fn pg_url() -> Option<String> {
    match std::env::var("TARN_TEST_POSTGRES") {
        Ok(u) => Some(u),
        Err(_) => {
            let msg = "TARN_TEST_POSTGRES is not set: this test needs PostgreSQL \
                       (scripts/test sets postgres://postgres@127.0.0.1:5432/test)";
            assert!(std::env::var("CI").is_err(), "{msg}");
            eprintln!("skipped: {msg}");
            None
        }
    }
}

/// A schema of one test, dropped when it ends.
struct Schema {
    url: String,
    name: String,
}

impl Schema {
    fn new(url: &str, test: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Self {
            url: url.to_string(),
            name: format!("it_{test}_{}_{nanos}", std::process::id()),
        }
    }

    /// Runs SQL on the test server (outside tarn's store).
    fn sql(&self, sql: &str) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            client.batch_execute(sql).await.expect("sql");
        });
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        self.sql(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
    }
}

fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b).expect("json")
}

fn names(v: &[(String, Vec<u8>)]) -> Vec<&str> {
    v.iter().map(|(n, _)| n.as_str()).collect()
}

/// What every backend must do.
fn conformance(m: &Meta) {
    assert_eq!(m.get(Kind::Dataset, "a").expect("get"), None);
    m.put(&[
        (Kind::Version, "a/0.0", br#"{"v": 0}"#),
        (Kind::Dataset, "a", br#"{"name": "a", "v": 0}"#),
    ])
    .expect("put");
    m.put(&[
        (Kind::Version, "a/0.1", br#"{"v": 1}"#),
        (Kind::Version, "ab/0.0", br#"{"v": 0}"#),
        (Kind::Dataset, "ab", br#"{"name": "ab"}"#),
        (Kind::Dataset, "a", br#"{"name": "a", "v": 1}"#),
    ])
    .expect("put");
    let a = m.get(Kind::Dataset, "a").expect("get").expect("a");
    assert_eq!(json(&a), serde_json::json!({"name": "a", "v": 1}), "replaced");
    assert_eq!(names(&m.list(Kind::Version, "a/").expect("list")), ["a/0.0", "a/0.1"]);
    assert_eq!(
        names(&m.list(Kind::Version, "").expect("list")),
        ["a/0.0", "a/0.1", "ab/0.0"]
    );
    assert_eq!(names(&m.list(Kind::Dataset, "").expect("list")), ["a", "ab"]);
    assert_eq!(m.list(Kind::MajorIntent, "").expect("list"), Vec::new());
    m.put(&[(Kind::MajorIntent, "a", br#"{"to": 2}"#)]).expect("intent");
    m.put(&[(Kind::ProducerKeys, "producers", br#"{"version": 1, "keys": []}"#)])
        .expect("keys");
    assert!(m.get(Kind::ProducerKeys, "producers").expect("get").is_some());
    // Creating what exists writes nothing, not even the documents beside it.
    let created = m
        .create(
            (Kind::Dataset, "a", br#"{"name": "a", "v": 9}"#),
            &[(Kind::Version, "a/9.9", b"{}")],
        )
        .expect("create");
    assert!(!created);
    assert_eq!(json(&m.get(Kind::Dataset, "a").expect("get").expect("a"))["v"], 1);
    assert_eq!(m.get(Kind::Version, "a/9.9").expect("get"), None);
    assert!(
        m.create(
            (Kind::Dataset, "c", br#"{"name": "c"}"#),
            &[(Kind::Version, "c/0.0", b"{}")]
        )
        .expect("create")
    );
    assert!(m.get(Kind::Version, "c/0.0").expect("get").is_some());
    // A read-modify-write sees the document and writes what it returns; an error writes nothing.
    m.update(
        Kind::Dataset,
        "ab",
        Box::new(|cur| {
            let mut v = json(cur.expect("ab exists"));
            v["u"] = serde_json::json!(1);
            Ok(vec![(Kind::Dataset, "ab".into(), v.to_string().into_bytes())])
        }),
    )
    .expect("update");
    assert_eq!(json(&m.get(Kind::Dataset, "ab").expect("get").expect("ab"))["u"], 1);
    let refused = m.update(Kind::Dataset, "ab", Box::new(|_| Err(Error::Meta("refused".into()))));
    assert!(refused.is_err());
    assert_eq!(json(&m.get(Kind::Dataset, "ab").expect("get").expect("ab"))["u"], 1);
    m.delete(Kind::MajorIntent, "a").expect("delete");
    m.delete(Kind::MajorIntent, "a")
        .expect("deleting what is gone is no error");
    assert_eq!(m.get(Kind::MajorIntent, "a").expect("get"), None);
}

#[test]
fn files_keep_the_data_directory_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = Meta::files(dir.path().join("catalog"), dir.path().join("keys"));
    conformance(&m);
    assert!(dir.path().join("catalog/datasets/a.json").is_file());
    assert!(dir.path().join("catalog/versions/a/0.1.json").is_file());
    assert!(dir.path().join("keys/producers.json").is_file());
    assert!(
        m.get(Kind::Dataset, "../escape").is_err(),
        "a name never leaves the store"
    );
    assert!(m.put(&[(Kind::Version, "a/../../x", b"{}")]).is_err());
    assert!(!m.shared());
}

#[test]
fn postgres_keeps_documents_and_migrates_once() {
    let Some(url) = pg_url() else { return };
    let schema = Schema::new(&url, "meta");
    let m = Meta::postgres(&url, &schema.name).expect("open");
    assert!(m.shared());
    conformance(&m);
    // Opening again (another process) applies nothing twice and sees the same documents.
    let again = Meta::postgres(&url, &schema.name).expect("reopen");
    assert_eq!(names(&again.list(Kind::Dataset, "").expect("list")), ["a", "ab", "c"]);
    // A schema newer than this build is refused, with what to do.
    schema.sql(&format!(
        "INSERT INTO {}.migrations (version, description) VALUES (999, 'from the future')",
        schema.name
    ));
    let e = Meta::postgres(&url, &schema.name).expect_err("refused");
    assert!(e.to_string().contains("newer than this tarn knows"), "{e}");
}

#[test]
fn processes_starting_together_migrate_one_schema_once() {
    let Some(url) = pg_url() else { return };
    let schema = Schema::new(&url, "race");
    let opened: Vec<_> = (0..4)
        .map(|_| {
            let (url, name) = (url.clone(), schema.name.clone());
            std::thread::spawn(move || Meta::postgres(&url, &name).map(|_| ()))
        })
        .collect();
    for t in opened {
        t.join().expect("thread").expect("every opener succeeds");
    }
}

#[test]
fn a_bad_schema_or_an_unreachable_server_is_a_clear_error() {
    let e = Meta::postgres("postgres://u@127.0.0.1:5432/db", "Bad-Name").expect_err("bad schema");
    assert!(e.to_string().contains("lowercase identifier"), "{e}");
    for url in [
        "postgres://tarn:hunter2@127.0.0.1:9/db",
        "postgres://tarn@127.0.0.1:9/db?password=hunter2",
        "host=127.0.0.1 port=9 user=tarn password=hunter2 dbname=db",
    ] {
        let e = Meta::postgres(url, "tarn").expect_err("nobody there");
        let msg = e.to_string();
        assert!(
            msg.contains("connecting") && msg.contains("tarn@127.0.0.1:9/db"),
            "{msg}"
        );
        assert!(!msg.contains("hunter2"), "the password is never printed: {msg}");
    }
}

/// Updates from many threads (as from many processes) never lose one another: each is a
/// read-modify-write under the document's lock.
#[test]
fn concurrent_updates_of_one_document_lose_nothing() {
    let Some(url) = pg_url() else { return };
    let schema = Schema::new(&url, "update");
    let m = std::sync::Arc::new(Meta::postgres(&url, &schema.name).expect("open"));
    let others: Vec<_> = (0..3)
        .map(|_| Meta::postgres(&url, &schema.name).expect("open"))
        .collect();
    let stores: Vec<std::sync::Arc<Meta>> = std::iter::once(m.clone())
        .chain(others.into_iter().map(std::sync::Arc::new))
        .collect();
    let threads: Vec<_> = stores
        .iter()
        .cloned()
        .map(|store| {
            std::thread::spawn(move || {
                for _ in 0..10 {
                    store
                        .update(
                            Kind::ProducerKeys,
                            "counter",
                            Box::new(|cur| {
                                let n = cur.map_or(0, |b| json(b)["n"].as_u64().unwrap_or(0));
                                let body = serde_json::json!({ "n": n + 1 }).to_string().into_bytes();
                                Ok(vec![(Kind::ProducerKeys, "counter".into(), body)])
                            }),
                        )
                        .expect("update");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let n = json(&m.get(Kind::ProducerKeys, "counter").expect("get").expect("counter"))["n"].clone();
    assert_eq!(n, 40, "four stores, ten increments each");
}

/// Two processes sharing the store: a contract changed by one since the other read it is not
/// overwritten by the other's change (the rules were checked against what it read); the loser
/// takes the contract in force and says to apply again.
#[test]
fn a_contract_changed_elsewhere_is_not_overwritten() {
    let Some(url) = pg_url() else { return };
    let schema = Schema::new(&url, "cas");
    let open = || crate::Catalog::with_meta(std::sync::Arc::new(Meta::postgres(&url, &schema.name).expect("open")));
    let a = open().expect("a");
    let base = crate::tests::spec("bids", "");
    a.evolve(base.clone()).expect("create");
    let b = open().expect("b");
    let with = |extra: &str| crate::tests::spec("bids", &format!("  - {{ name: {extra}, type: string }}\n"));
    a.evolve(with("x")).expect("a adds x");
    let e = b.evolve(with("y")).expect_err("b read the contract before x");
    assert!(e.to_string().contains("changed by another process"), "{e}");
    let now = b.get("bids").expect("bids");
    assert!(now.fields.iter().any(|f| f.name == "x"), "b took a's contract: {now:?}");
    assert_eq!(
        b.versions("bids").expect("versions").len(),
        2,
        "a's version kept, b's not written"
    );
}
