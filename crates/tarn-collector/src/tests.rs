//! Collector tests: contract checks, encodings and limits, against a real embedded log.

use std::io::Write;

use arrow_array::Array as _;
use arrow_array::cast::AsArray;
use bytes::Bytes;
use tarn_core::ManualClock;

use super::*;

const SPEC: &str = r#"
name: auctions
fields:
  - { name: event_id, type: string }
  - { name: ts, type: timestamp, required: true }
  - { name: client_id, type: string, required: true }
  - { name: cpm, type: float64 }
  - { name: n, type: int64 }
  - { name: ok, type: bool }
  - { name: extra, type: json }
event_time: ts
event_id: event_id
partitioning: { tenant: client_id }
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    log: Log,
    collector: Collector,
    rt: tokio::runtime::Runtime,
}

fn fixture(infer: bool, limits: Limits) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path().join("log"), tarn_log::LogOptions::default()).expect("log");
    let catalog = Arc::new(Catalog::open(dir.path().join("catalog")).expect("catalog"));
    catalog
        .register(DatasetSpec::from_yaml(SPEC).expect("spec"))
        .expect("register");
    let clock = Arc::new(ManualClock::new(1_763_805_600_000_000));
    let collector = Collector::new(
        log.clone(),
        catalog,
        clock,
        CollectorOptions {
            limits,
            infer_datasets: infer,
            sharded: false,
        },
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    Fixture {
        _dir: dir,
        log,
        collector,
        rt,
    }
}

fn read_batches(f: &Fixture, dataset: &str) -> Vec<RecordBatch> {
    let t = f.log.topic(&topic_name(dataset)).expect("topic");
    let recs = t.cursor(0).read(usize::MAX).expect("read");
    recs.iter()
        .flat_map(|r| decode_payload(&r.payload).expect("decode"))
        .collect()
}

use arrow_array::RecordBatch;

#[test]
fn accepts_ndjson_and_reports_each_rejection() {
    let f = fixture(false, Limits::default());
    let body = [
        r#"{"event_id":"e1","ts":"2026-11-22T10:00:00Z","client_id":"acme","cpm":1.5,"n":3,"ok":true,"extra":{"a":[1]}}"#,
        r#"{"ts":1763805600000,"client_id":"beta"}"#,
        r#"{"ts":"yesterday","client_id":"acme"}"#,
        r#"{"ts":"2026-11-22T10:00:00Z"}"#,
        r#"{"ts":"2026-11-22T10:00:00Z","client_id":"../../etc"}"#,
        r#"{"ts":"2026-11-22T10:00:00Z","client_id":"acme","colour":"red"}"#,
        r#"{"ts":"2026-11-22T10:00:00Z","client_id":"acme","n":1.5}"#,
        r#"not json"#,
        r#"[1,2]"#,
        "",
    ]
    .join("\n");
    let r =
        f.rt.block_on(
            f.collector
                .ingest("auctions", Bytes::copy_from_slice(body.as_bytes()), Encoding::Identity),
        )
        .expect("ingest");
    assert_eq!(r.accepted, 2);
    assert_eq!(r.rejected, 7);
    let got: Vec<(usize, Option<&str>)> = r.errors.iter().map(|e| (e.index, e.field.as_deref())).collect();
    assert_eq!(
        got,
        [
            (2, Some("ts")),
            (3, Some("client_id")),
            (4, Some("client_id")),
            (5, Some("colour")),
            (6, Some("n")),
            (7, None),
            (8, None)
        ]
    );
    assert!(r.errors[0].reason.contains("RFC 3339"), "{:?}", r.errors[0]);
    let batches = read_batches(&f, "auctions");
    assert_eq!(batches.len(), 1);
    let b = &batches[0];
    assert_eq!(b.num_rows(), 2);
    let ids = b.column_by_name("event_id").expect("event_id").as_string::<i32>();
    assert_eq!(ids.value(0), "e1");
    assert_eq!(ids.value(1).len(), 32, "generated id");
    let days = b.column_by_name("day").expect("day").as_string::<i32>();
    assert_eq!(days.value(0), "2026-11-22");
    let extra = b.column_by_name("extra").expect("extra").as_string::<i32>();
    assert_eq!(extra.value(0), r#"{"a":[1]}"#);
    assert!(b.column_by_name("_received_at").is_some());
    // Every rejected event is in the dead letters, durable before the answer, as sent.
    assert_eq!(r.dead_letters.as_deref(), Some("auctions__rejected"));
    let dead = read_batches(&f, "auctions__rejected");
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.num_rows(), 7);
    let col = |n: &str| d.column_by_name(n).unwrap_or_else(|| panic!("column {n}"));
    let index = col("event_index").as_primitive::<arrow_array::types::Int64Type>();
    let field = col("field").as_string::<i32>();
    let payload = col("payload").as_string::<i32>();
    assert_eq!((index.value(0), field.value(0)), (2, "ts"));
    assert_eq!(payload.value(0), r#"{"ts":"yesterday","client_id":"acme"}"#);
    assert_eq!(
        (index.value(5), field.is_null(5), payload.value(5)),
        (7, true, "not json")
    );
    assert!(col("reason").as_string::<i32>().value(0).contains("RFC 3339"));
    assert!(!col("payload_truncated").as_boolean().value(0));
}

#[test]
fn dead_letters_keep_every_rejection_beyond_those_reported() {
    let limits = Limits {
        rejections_reported_max: 2,
        ..Limits::default()
    };
    let f = fixture(false, limits);
    let body: Vec<String> = (0..5)
        .map(|i| format!(r#"{{"ts":"2026-11-22T10:00:00Z","n":{i}}}"#))
        .collect();
    let r =
        f.rt.block_on(
            f.collector
                .ingest("auctions", Bytes::from(body.join("\n")), Encoding::Identity),
        )
        .expect("ingest");
    assert_eq!((r.accepted, r.rejected, r.errors.len()), (0, 5, 2));
    let dead = read_batches(&f, "auctions__rejected");
    assert_eq!(dead.iter().map(|b| b.num_rows()).sum::<usize>(), 5);
    // Nothing goes to the events topic.
    let t = f.log.topic(&topic_name("auctions")).expect("topic");
    assert!(t.cursor(0).read(usize::MAX).expect("read").is_empty());
}

#[test]
fn accepts_json_arrays_gzip_and_zstd() {
    let f = fixture(false, Limits::default());
    let body = r#"[{"ts":"2026-11-21T00:00:00Z","client_id":"a"},{"ts":"2026-11-22T00:00:00Z","client_id":"b"}]"#;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(body.as_bytes()).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let zs = zstd::encode_all(body.as_bytes(), 1).expect("zstd");
    for (bytes, enc) in [
        (body.as_bytes().to_vec(), Encoding::Identity),
        (gz, Encoding::Gzip),
        (zs, Encoding::Zstd),
    ] {
        let r =
            f.rt.block_on(f.collector.ingest("auctions", Bytes::copy_from_slice(&bytes), enc))
                .expect("ingest");
        assert_eq!((r.accepted, r.rejected), (2, 0), "{enc:?}");
    }
    assert_eq!(
        read_batches(&f, "auctions").iter().map(|b| b.num_rows()).sum::<usize>(),
        6
    );
    let bad = f.rt.block_on(
        f.collector
            .ingest("auctions", Bytes::copy_from_slice(b"not gzip"), Encoding::Gzip),
    );
    assert!(matches!(bad, Err(Error::BadRequest(_))), "{bad:?}");
    assert!(matches!(
        Encoding::from_header(Some("br")),
        Err(Error::UnsupportedEncoding(_))
    ));
}

#[test]
fn limits_are_enforced() {
    let limits = Limits {
        decompressed_bytes_max: 1000,
        batch_events_max: 3,
        event_bytes_max: 200,
        body_bytes_max: 5000,
        ..Limits::default()
    };
    let f = fixture(false, limits);
    let bomb = zstd::encode_all(&vec![b' '; 100_000][..], 19).expect("zstd");
    assert!(bomb.len() < 1000);
    let r = f.rt.block_on(
        f.collector
            .ingest("auctions", Bytes::copy_from_slice(&bomb), Encoding::Zstd),
    );
    assert!(matches!(r, Err(Error::TooLarge(_))), "{r:?}");
    let many = "{}\n{}\n{}\n{}\n";
    let r = f.rt.block_on(
        f.collector
            .ingest("auctions", Bytes::copy_from_slice(many.as_bytes()), Encoding::Identity),
    );
    assert!(matches!(r, Err(Error::TooLarge(_))), "{r:?}");
    let big = format!(
        r#"{{"ts":"2026-11-22T00:00:00Z","client_id":"a","extra":"{}"}}"#,
        "x".repeat(300)
    );
    let r =
        f.rt.block_on(
            f.collector
                .ingest("auctions", Bytes::copy_from_slice(big.as_bytes()), Encoding::Identity),
        )
        .expect("ingest");
    assert_eq!(r.rejected, 1);
    assert!(r.errors[0].reason.contains("larger than the limit"));
    assert!(matches!(f.collector.admit(6000, false), Err(Error::TooLarge(_))));
    assert!(matches!(
        f.rt.block_on(
            f.collector
                .ingest("auctions", Bytes::copy_from_slice(b"   \n"), Encoding::Identity)
        ),
        Err(Error::BadRequest(_))
    ));
    assert!(matches!(
        f.rt.block_on(
            f.collector
                .ingest("auctions", Bytes::from_static(b"[1,"), Encoding::Identity)
        ),
        Err(Error::BadRequest(_))
    ));
    assert!(matches!(
        f.rt.block_on(
            f.collector
                .ingest("auctions", Bytes::from_static(&[0xff, 0xfe]), Encoding::Identity)
        ),
        Err(Error::BadRequest(_))
    ));
}

#[test]
fn admission_bounds_bytes_in_flight() {
    let f = fixture(
        false,
        Limits {
            ingest_inflight_bytes_max: 20 * 1024,
            ..Limits::default()
        },
    );
    let a = f.collector.admit(5 * 1024, false).expect("first fits");
    assert!(matches!(f.collector.admit(5 * 1024, false), Err(Error::Overloaded(_))));
    drop(a);
    f.collector.admit(5 * 1024, false).expect("fits again after release");
}

#[test]
fn infers_new_datasets_only_when_allowed() {
    let f = fixture(true, Limits::default());
    let body = r#"{"ts":"2026-11-22T00:00:00Z","client_id":"acme","v":1}"#;
    let r =
        f.rt.block_on(
            f.collector
                .ingest("clicks", Bytes::copy_from_slice(body.as_bytes()), Encoding::Identity),
        )
        .expect("ingest");
    assert_eq!(r.accepted, 1);
    let r =
        f.rt.block_on(f.collector.ingest(
            "clicks",
            Bytes::from_static(br#"{"ts":"2026-11-22T00:00:00Z","client_id":"acme","w":1}"#),
            Encoding::Identity,
        ))
        .expect("ingest");
    assert_eq!((r.accepted, r.errors[0].field.as_deref()), (0, Some("w")));
    let strict = fixture(false, Limits::default());
    let r = strict.rt.block_on(strict.collector.ingest(
        "clicks",
        Bytes::copy_from_slice(body.as_bytes()),
        Encoding::Identity,
    ));
    assert!(matches!(r, Err(Error::UnknownDataset(_))));
    let r = strict.rt.block_on(strict.collector.ingest(
        "../x",
        Bytes::copy_from_slice(body.as_bytes()),
        Encoding::Identity,
    ));
    assert!(matches!(r, Err(Error::BadRequest(_))));
}

mod hostile {
    //! Hostile and malformed bodies: whatever arrives, the collector answers with a report or a
    //! classified error, never a panic, and a report accounts for every event.

    use proptest::prelude::*;

    use super::*;

    fn event_text() -> impl Strategy<Value = String> {
        prop_oneof![
            // Plausible events with wrong or odd values.
            (
                prop_oneof![
                    Just("\"2026-11-22T00:00:00Z\"".to_string()),
                    any::<i64>().prop_map(|v| v.to_string()),
                    ".{0,12}".prop_map(|s| format!("{s:?}"))
                ],
                prop_oneof![
                    Just("\"acme\"".to_string()),
                    ".{0,20}".prop_map(|s| format!("{s:?}")),
                    Just("null".to_string())
                ],
                prop_oneof![
                    any::<f64>().prop_map(|v| if v.is_finite() { v.to_string() } else { "1".into() }),
                    Just("\"x\"".into()),
                    Just("[1,{}]".into())
                ],
            )
                .prop_map(|(ts, c, cpm)| format!(
                    r#"{{"ts":{ts},"client_id":{c},"cpm":{cpm},"extra":{{"k":[1,2,{{"z":null}}]}}}}"#
                )),
            // Arbitrary text, including broken JSON and control characters.
            "[^\n]{0,80}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn ndjson_of_anything_is_answered(lines in proptest::collection::vec(event_text(), 1..20)) {
            let f = fixture(false, Limits::default());
            let body = lines.join("\n");
            let nonblank = lines.iter().filter(|l| !l.trim().is_empty()).count();
            match f.rt.block_on(f.collector.ingest("auctions", Bytes::from(body), Encoding::Identity)) {
                Ok(r) => prop_assert_eq!(r.accepted + r.rejected, nonblank),
                Err(Error::BadRequest(_)) => prop_assert!(nonblank == 0 || lines.concat().trim_start().starts_with('[')),
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }

        #[test]
        fn random_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..400), enc in 0u8..3) {
            let f = fixture(true, Limits::default());
            let enc = [Encoding::Identity, Encoding::Gzip, Encoding::Zstd][enc as usize];
            let _ = f.rt.block_on(f.collector.ingest("fuzz", Bytes::from(body), enc));
        }
    }
}

/// A batch larger than one stream record becomes several records, each under the limit, that
/// decode back to every row in order; one event alone over the limit is refused.
#[test]
fn payloads_split_to_fit_a_record_limit() {
    let f = fixture(false, Limits::default());
    let body: String = (0..2000)
        .map(|i| {
            format!(
                r#"{{"event_id":"e{i}","ts":"2026-11-22T10:00:00Z","client_id":"c{}","extra":{{"pad":"{}"}}}}"#,
                i % 5,
                "x".repeat(i % 300)
            ) + "\n"
        })
        .collect();
    f.rt.block_on(f.collector.ingest("auctions", Bytes::from(body), Encoding::Identity))
        .expect("ingest");
    let batch = read_batches(&f, "auctions").remove(0);
    let whole = encode::encode_payload(&batch).expect("encode");
    // The payload is allocated once, at a size that holds it and is not far above it, for the
    // whole batch and for a slice of it alike.
    for (at, n) in [(0, batch.num_rows()), (500, 300)] {
        let part = batch.slice(at, n);
        let (len, cap) = (
            encode::encode_payload(&part).expect("encode").len(),
            encode::payload_capacity(&part),
        );
        assert!(
            len <= cap && cap <= len + 1024 + 512 * batch.num_columns(),
            "{len} bytes, capacity {cap}"
        );
    }
    let limit = whole.len() / 7;
    let parts = encode::encode_payloads(&batch, limit).expect("split");
    assert!(parts.len() >= 7, "{} parts", parts.len());
    assert!(parts.iter().all(|p| p.len() <= limit));
    let ids: Vec<String> = parts
        .iter()
        .flat_map(|p| decode_payload(p).expect("decode"))
        .flat_map(|b| {
            b.column(0)
                .as_string::<i32>()
                .iter()
                .map(|v| v.unwrap_or_default().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(ids, (0..2000).map(|i| format!("e{i}")).collect::<Vec<_>>());
    assert_eq!(encode::encode_payloads(&batch, whole.len()).expect("whole").len(), 1);
    let err = encode::encode_payloads(&batch.slice(0, 1), 10).expect_err("one event over the limit");
    assert!(matches!(err, Error::TooLarge(_)), "{err}");
}

#[test]
fn shard_topics_name_their_dataset_and_shard() {
    use crate::{parse_shard_topic, shard_topic_name};
    assert_eq!(shard_topic_name("auctions", 0), "events.auctions");
    assert_eq!(shard_topic_name("auctions", 3), "events.auctions.3");
    for (d, s) in [("auctions", 0), ("auctions", 3), ("a_b__rejected", 1), ("x2", 0)] {
        assert_eq!(parse_shard_topic(&shard_topic_name(d, s)), Some((d, s)));
    }
    assert_eq!(parse_shard_topic("objects"), None);
    assert_eq!(parse_shard_topic("events.a.0"), None, "shard 0 has no suffix");
    assert_eq!(parse_shard_topic("events.a.x"), None);
}

/// Each log record holds exactly one batch, large requests included: curate tags a batch with
/// its record's sequence and takes each sequence once, so a second batch in a record would be
/// skipped as a replay.
#[test]
fn one_batch_per_log_record() {
    let f = fixture(false, Limits::default());
    for n in [1usize, 3000] {
        let body: String = (0..n)
            .map(|i| {
                format!(
                    r#"{{"event_id":"e{i}","ts":"2026-11-22T10:00:00Z","client_id":"c{}","extra":{{"pad":"{}"}}}}"#,
                    i % 7,
                    "x".repeat(520)
                ) + "\n"
            })
            .collect();
        f.rt.block_on(f.collector.ingest("auctions", Bytes::from(body), Encoding::Identity))
            .expect("ingest");
    }
    let t = f.log.topic(&topic_name("auctions")).expect("topic");
    let recs = t.cursor(0).read(usize::MAX).expect("read");
    assert_eq!(recs.len(), 2);
    for r in &recs {
        assert_eq!(decode_payload(&r.payload).expect("decode").len(), 1, "record {}", r.seq);
    }
}
