//! Rollup state tests on real raw objects, a real log and real chunk files: replays, late
//! events, retention by the injected clock, checkpoints and reopening, halts at the limit.

use std::sync::Arc;

use deltalake::arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use deltalake::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use serde_json::Value;
use tarn_catalog::Catalog;
use tarn_core::{DatasetSpec, Grain, ManualClock};
use tarn_lake::ObjectCreated;
use tarn_lake::raw::{object_path, with_seq, write_object};
use tarn_log::{Log, LogOptions};

use super::*;

const SPEC: &str = r#"
version: 1
name: auctions
fields:
  - { name: event_id, type: string, required: true }
  - { name: ts, type: timestamp, required: true }
  - { name: client_id, type: string, required: true }
  - { name: bidder, type: string }
  - { name: site, type: string }
  - { name: cpm, type: float64 }
  - { name: latency_ms, type: int64 }
  - { name: user_id, type: string }
event_time: ts
event_id: event_id
partitioning: { tenant: client_id }
rollups:
  - name: stats
    dimensions: [bidder, site]
    grains: [hour, day]
    retention_days: 3
    metrics:
      - { name: events, fn: count }
      - { name: revenue, fn: sum, field: cpm }
      - { name: slowest, fn: max, field: latency_ms }
      - { name: fastest, fn: min, field: latency_ms }
      - { name: mean_cpm, fn: mean, field: cpm }
      - { name: users, fn: distinct, field: user_id }
      - { name: latency, fn: percentiles, field: latency_ms }
"#;

/// 2026-11-20T00:00:00Z
const DAY0: i64 = 1_763_596_800;

struct Row<'a> {
    secs: i64,
    tenant: &'a str,
    bidder: &'a str,
    site: &'a str,
    cpm: f64,
    latency: i64,
    user: &'a str,
}

/// A batch as the collector encodes it: the declared fields in order, then `_received_at`
/// and `day`.
fn batch(rows: &[Row]) -> RecordBatch {
    let ts = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let schema = Schema::new(vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("ts", ts(), false),
        Field::new("client_id", DataType::Utf8, false),
        Field::new("bidder", DataType::Utf8, true),
        Field::new("site", DataType::Utf8, true),
        Field::new("cpm", DataType::Float64, true),
        Field::new("latency_ms", DataType::Int64, true),
        Field::new("user_id", DataType::Utf8, true),
        Field::new("_received_at", ts(), false),
        Field::new("day", DataType::Utf8, false),
    ]);
    let micros: Vec<i64> = rows.iter().map(|r| r.secs * 1_000_000).collect();
    RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(StringArray::from(
                rows.iter()
                    .enumerate()
                    .map(|(i, r)| format!("{}-{i}", r.secs))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(TimestampMicrosecondArray::from(micros.clone()).with_timezone("UTC")),
            Arc::new(StringArray::from(rows.iter().map(|r| r.tenant).collect::<Vec<_>>())),
            // An empty bidder stands for a missing one.
            Arc::new(StringArray::from(
                rows.iter()
                    .map(|r| (!r.bidder.is_empty()).then_some(r.bidder))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(rows.iter().map(|r| r.site).collect::<Vec<_>>())),
            Arc::new(Float64Array::from(rows.iter().map(|r| r.cpm).collect::<Vec<_>>())),
            Arc::new(Int64Array::from(rows.iter().map(|r| r.latency).collect::<Vec<_>>())),
            Arc::new(StringArray::from(rows.iter().map(|r| r.user).collect::<Vec<_>>())),
            Arc::new(TimestampMicrosecondArray::from(micros.clone()).with_timezone("UTC")),
            Arc::new(StringArray::from(
                micros
                    .iter()
                    .map(|m| tarn_core::contract::day_of_micros(*m))
                    .collect::<Vec<_>>(),
            )),
        ],
    )
    .expect("batch")
}

struct Fixture {
    dir: tempfile::TempDir,
    log: Log,
    catalog: Arc<Catalog>,
    clock: ManualClock,
    rollups: Rollups,
}

async fn fixture(opts: RollupOptions) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path().join("log"), LogOptions::default()).expect("log");
    let catalog = Arc::new(Catalog::open(dir.path().join("catalog")).expect("catalog"));
    catalog
        .register(DatasetSpec::from_yaml(SPEC).expect("spec"))
        .expect("register");
    let clock = ManualClock::new((DAY0 + 86_400 + 3_600) * 1_000_000);
    let rollups = Rollups::open(
        dir.path().join("lake"),
        &log,
        catalog.clone(),
        Arc::new(clock.clone()),
        opts,
    )
    .await
    .expect("open");
    Fixture {
        dir,
        log,
        catalog,
        clock,
        rollups,
    }
}

impl Fixture {
    /// Writes one raw object holding `batches` at sequences first.. and returns its
    /// notification.
    fn object(&self, first: u64, batches: &[RecordBatch]) -> ObjectCreated {
        let last = first + batches.len() as u64 - 1;
        let rel = object_path("auctions", 0, first, last);
        let with: Vec<RecordBatch> = batches
            .iter()
            .enumerate()
            .map(|(i, b)| with_seq(b, first + i as u64).expect("seq"))
            .collect();
        let bytes = write_object(&self.dir.path().join("lake"), &rel, &with).expect("write");
        ObjectCreated {
            version: 1,
            dataset: "auctions".into(),
            shard: 0,
            first_seq: first,
            last_seq: last,
            path: rel,
            rows: batches.iter().map(|b| b.num_rows() as u64).sum(),
            bytes,
        }
    }

    async fn reopen(&mut self) {
        self.rollups = Rollups::open(
            self.dir.path().join("lake"),
            &self.log,
            self.catalog.clone(),
            Arc::new(self.clock.clone()),
            RollupOptions::default(),
        )
        .await
        .expect("reopen");
    }

    fn read(
        &self,
        grain: Grain,
        group_by: Option<&str>,
        filters: &[(&str, &str)],
    ) -> Vec<serde_json::Map<String, Value>> {
        self.rollups
            .query(
                "stats",
                &RollupQuery {
                    tenant: "acme".into(),
                    from_secs: DAY0 - 10 * 86_400,
                    to_secs: DAY0 + 10 * 86_400,
                    grain,
                    group_by: group_by.map(str::to_string),
                    filters: filters.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
                    top: None,
                    order_by: None,
                    metrics: None,
                    quantiles: vec![0.5, 1.0],
                },
            )
            .expect("query")
            .rows
    }
}

fn rows_a() -> Vec<Row<'static>> {
    vec![
        Row {
            secs: DAY0 + 3_600 + 5,
            tenant: "acme",
            bidder: "x",
            site: "s1",
            cpm: 1.5,
            latency: 10,
            user: "u1",
        },
        Row {
            secs: DAY0 + 3_600 + 50,
            tenant: "acme",
            bidder: "y",
            site: "s1",
            cpm: 2.0,
            latency: 30,
            user: "u2",
        },
        Row {
            secs: DAY0 + 7_200,
            tenant: "acme",
            bidder: "x",
            site: "s2",
            cpm: 4.0,
            latency: 20,
            user: "u1",
        },
        Row {
            secs: DAY0 + 7_300,
            tenant: "beta",
            bidder: "x",
            site: "s2",
            cpm: 9.0,
            latency: 90,
            user: "u9",
        },
    ]
}

#[tokio::test]
async fn buckets_groups_and_metrics() {
    let fx = fixture(RollupOptions::default()).await;
    let n = fx.object(0, &[batch(&rows_a())]);
    fx.rollups.apply_object(&n).await.expect("apply");
    let hours = fx.read(Grain::Hour, None, &[]);
    assert_eq!(hours.len(), 2, "{hours:?}");
    assert_eq!(hours[0]["bucket"], "2025-11-20T01:00:00Z");
    assert_eq!(hours[0]["events"], 2);
    assert_eq!(hours[0]["revenue"], 3.5);
    assert_eq!(hours[0]["slowest"], 30);
    assert_eq!(hours[0]["fastest"], 10);
    assert_eq!(hours[0]["mean_cpm"], 1.75);
    assert_eq!(hours[0]["users"], 2);
    assert_eq!(hours[0]["latency"]["p100"], 30.0);
    let days = fx.read(Grain::Day, Some("bidder"), &[]);
    assert_eq!(days.len(), 2);
    assert_eq!(
        (days[0]["bidder"].clone(), days[0]["events"].clone()),
        (Value::from("x"), Value::from(2))
    );
    assert_eq!(days[0]["users"], 1, "x was seen by u1 twice");
    // A filter goes through the full cuboid and merges what matches.
    let s1 = fx.read(Grain::Day, Some("bidder"), &[("site", "s1")]);
    assert_eq!(s1.len(), 2);
    assert!(s1.iter().all(|r| r["events"] == 1), "{s1:?}");
    let err = fx
        .rollups
        .query(
            "stats",
            &RollupQuery {
                grain: Grain::Minute,
                ..base_query()
            },
        )
        .expect_err("minute is not kept")
        .to_string();
    assert!(err.contains("keeps the grains hour, day"), "{err}");
}

fn base_query() -> RollupQuery {
    RollupQuery {
        tenant: "acme".into(),
        from_secs: DAY0,
        to_secs: DAY0 + 86_400,
        grain: Grain::Day,
        group_by: None,
        filters: Vec::new(),
        top: None,
        order_by: None,
        metrics: None,
        quantiles: vec![0.5],
    }
}

#[tokio::test]
async fn a_replayed_object_changes_nothing_and_late_events_find_their_bucket() {
    let fx = fixture(RollupOptions::default()).await;
    let n = fx.object(0, &[batch(&rows_a())]);
    fx.rollups.apply_object(&n).await.expect("apply");
    let before = fx.read(Grain::Hour, Some("site"), &[]);
    fx.rollups.apply_object(&n).await.expect("replay");
    assert_eq!(fx.read(Grain::Hour, Some("site"), &[]), before);
    // An object overlapping the applied sequences adds only its new batch, which holds an
    // event a day late.
    let late = [Row {
        secs: DAY0 + 3_600 + 59,
        tenant: "acme",
        bidder: "z",
        site: "s1",
        cpm: 1.0,
        latency: 5,
        user: "u3",
    }];
    let n2 = fx.object(0, &[batch(&rows_a()), batch(&late)]);
    fx.rollups.apply_object(&n2).await.expect("overlap");
    let hours = fx.read(Grain::Hour, None, &[]);
    assert_eq!(hours[0]["events"], 3);
    assert_eq!(hours[0]["users"], 3);
    assert_eq!(hours[1]["events"], 1);
}

#[tokio::test]
async fn retention_drops_old_rows_and_buckets() {
    let fx = fixture(RollupOptions::default()).await;
    // Retention is 3 days: with the clock on DAY0 + 1, DAY0 - 1 is kept and DAY0 - 2 not.
    let old = [
        Row {
            secs: DAY0 - 86_400,
            tenant: "acme",
            bidder: "x",
            site: "s",
            cpm: 1.0,
            latency: 1,
            user: "a",
        },
        Row {
            secs: DAY0 - 2 * 86_400,
            tenant: "acme",
            bidder: "x",
            site: "s",
            cpm: 1.0,
            latency: 1,
            user: "a",
        },
    ];
    let n = fx.object(0, &[batch(&old)]);
    fx.rollups.apply_object(&n).await.expect("apply");
    let days = fx.read(Grain::Day, None, &[]);
    assert_eq!(days.len(), 1, "{days:?}");
    let st = fx.rollups.status().expect("status");
    assert_eq!((st[0].rows_applied, st[0].rows_expired), (1, 1));
    fx.clock.set_micros((DAY0 + 2 * 86_400) * 1_000_000);
    fx.rollups.maintain().await.expect("maintain");
    assert!(fx.read(Grain::Day, None, &[]).is_empty());
    assert_eq!(fx.rollups.status().expect("status")[0].groups, 0);
}

#[tokio::test]
async fn checkpoints_survive_reopening_and_damage_is_reported() {
    let mut fx = fixture(RollupOptions::default()).await;
    let n = fx.object(0, &[batch(&rows_a())]);
    fx.rollups.apply_object(&n).await.expect("apply");
    let want = (
        fx.read(Grain::Hour, Some("bidder"), &[]),
        fx.read(Grain::Day, Some("site"), &[("bidder", "x")]),
    );
    fx.rollups.maintain().await.expect("checkpoint");
    // A stray file from a checkpoint that never wrote its manifest goes on open.
    let dir = fx.dir.path().join("lake/rollups/stats");
    std::fs::write(dir.join("hour-0-99.chunk"), b"junk").expect("stray");
    fx.reopen().await;
    assert!(!dir.join("hour-0-99.chunk").exists());
    assert_eq!(
        (
            fx.read(Grain::Hour, Some("bidder"), &[]),
            fx.read(Grain::Day, Some("site"), &[("bidder", "x")])
        ),
        want
    );
    // The reopened rollup knows what it applied: the same object again adds nothing.
    fx.rollups.apply_object(&n).await.expect("replay");
    assert_eq!(fx.read(Grain::Hour, Some("bidder"), &[]), want.0);
    // A damaged chunk fails the open with its path, never loads silently.
    let chunk = std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "chunk"))
        .expect("a chunk");
    let mut bytes = std::fs::read(&chunk).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&chunk, bytes).expect("damage");
    let err = Rollups::open(
        fx.dir.path().join("lake"),
        &fx.log,
        fx.catalog.clone(),
        Arc::new(fx.clock.clone()),
        RollupOptions::default(),
    )
    .await
    .err()
    .expect("damaged chunk")
    .to_string();
    assert!(err.contains("checksum") && err.contains(".chunk"), "{err}");
}

#[tokio::test]
async fn a_rollup_past_its_group_limit_halts_instead_of_answering_partly() {
    let fx = fixture(RollupOptions {
        groups_max: 10,
        ..RollupOptions::default()
    })
    .await;
    let many: Vec<Row> = (0..20)
        .map(|i| Row {
            secs: DAY0 + i * 3_600,
            tenant: "acme",
            bidder: "x",
            site: "s",
            cpm: 1.0,
            latency: 1,
            user: "a",
        })
        .collect();
    let n = fx.object(0, &[batch(&many)]);
    fx.rollups.apply_object(&n).await.expect("apply");
    let err = fx
        .rollups
        .query("stats", &base_query())
        .expect_err("halted")
        .to_string();
    assert!(err.contains("more than 10 groups") && err.contains("restart"), "{err}");
    assert!(fx.rollups.status().expect("status")[0].halted.is_some());
}

#[tokio::test]
async fn a_rebuild_behind_curate_counts_every_row_once() {
    let fx = fixture(RollupOptions::default()).await;
    let lake = tarn_lake::Lake::open(fx.dir.path().join("lake")).expect("lake");
    let curator = tarn_lake::Curator::new(
        &fx.log,
        lake.clone(),
        fx.catalog.clone(),
        tarn_lake::CurateOptions::default(),
    )
    .await
    .expect("curate");
    let n1 = fx.object(0, &[batch(&rows_a())]);
    fx.rollups.apply_object(&n1).await.expect("apply");
    // Curate goes ahead of the rollup: the table holds sequence 1, the rollup only 0.
    let late = [Row {
        secs: DAY0 + 60,
        tenant: "acme",
        bidder: "z",
        site: "s3",
        cpm: 3.0,
        latency: 7,
        user: "u7",
    }];
    let n2 = fx.object(1, &[batch(&late)]);
    curator.apply(&[n1.clone(), n2.clone()]).await.expect("curate");
    let mut days = 0;
    let report = fx
        .rollups
        .rebuild("stats", "2025-11-20", "2025-11-20", &lake, &mut |p| days = p.days_done)
        .await
        .expect("rebuild");
    assert_eq!((report.days, report.rows, days), (1, 5, 1), "{report:?}");
    let total = |fx: &Fixture| -> u64 {
        fx.read(Grain::Day, None, &[])
            .iter()
            .map(|r| r["events"].as_u64().unwrap_or(0))
            .sum()
    };
    assert_eq!(
        total(&fx),
        4,
        "the rebuilt day holds the table's acme rows, late one included"
    );
    // The subscriber reaches sequence 1: the rebuild counted it already.
    fx.rollups.apply_object(&n2).await.expect("apply");
    assert_eq!(total(&fx), 4);
    assert_eq!(fx.read(Grain::Hour, Some("bidder"), &[("site", "s3")]).len(), 1);
    // And the rebuilt range is forgotten once the subscriber has passed it.
    let st = fx.rollups.get("stats").expect("rollup");
    assert!(st.state.read().expect("lock").manifest.rebuilt.is_empty());
}

#[tokio::test]
async fn top_orders_by_the_metric_then_the_value_with_nulls_last() {
    let fx = fixture(RollupOptions::default()).await;
    let row = |bidder: &'static str, cpm: f64| Row {
        secs: DAY0 + 10,
        tenant: "acme",
        bidder,
        site: "s",
        cpm,
        latency: 1,
        user: "u",
    };
    let rows = vec![
        row("", 1.0),
        row("", 1.0),
        row("y", 1.0),
        row("y", 1.0),
        row("x", 1.0),
        row("x", 1.0),
        row("w", 5.0),
    ];
    let n = fx.object(0, &[batch(&rows)]);
    fx.rollups.apply_object(&n).await.expect("apply");
    let q = |top: usize, order_by: Option<&str>| {
        fx.rollups
            .query(
                "stats",
                &RollupQuery {
                    group_by: Some("bidder".into()),
                    top: Some(top),
                    order_by: order_by.map(str::to_string),
                    ..base_query()
                },
            )
            .expect("query")
            .rows
            .iter()
            .map(|r| r["bidder"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(q(3, None), vec![Value::from("x"), Value::from("y"), Value::Null]);
    assert_eq!(q(1, Some("revenue")), vec![Value::from("w")]);
    let err = fx
        .rollups
        .query(
            "stats",
            &RollupQuery {
                order_by: Some("nope".into()),
                ..base_query()
            },
        )
        .expect_err("unknown metric")
        .to_string();
    assert!(err.contains("order_by \"nope\""), "{err}");
}

/// A batch written before a field was added lacks its column: it folds as nulls. A new
/// major version is another rollup state.
#[test]
fn missing_columns_fold_as_nulls_and_other_majors_are_skipped() {
    let spec = DatasetSpec::from_yaml(SPEC).expect("spec");
    let def = cube::Def::new(&spec, &spec.rollups[0]).expect("def");
    let rows = [Row {
        secs: DAY0 + 10,
        tenant: "acme",
        bidder: "x",
        site: "s",
        cpm: 1.5,
        latency: 7,
        user: "u",
    }];
    let full = batch(&rows);
    let idx = full.schema().index_of("site").expect("site");
    let mut old = full.clone();
    old.remove_column(idx);
    let (cube, n, _) = cube::Cube::from_batch(&def, &old, i64::MIN, &|_| true).expect("fold");
    assert_eq!(n, 1);
    drop(cube);
    let two = DatasetSpec::from_yaml(&format!("major: 2\n{SPEC}")).expect("spec");
    let def2 = cube::Def::new(&two, &two.rollups[0]).expect("def");
    assert_ne!(
        def.fingerprint(),
        def2.fingerprint(),
        "a new major version starts afresh"
    );
}

mod props {
    use proptest::prelude::*;

    use super::*;

    fn def() -> cube::Def {
        let spec = DatasetSpec::from_yaml(SPEC).expect("spec");
        cube::Def::new(&spec, &spec.rollups[0]).expect("def")
    }

    /// Rows over three tenants, a few bidders (one missing), two days; cpm in halves, so
    /// that float sums are exact in any order and cubes compare equal.
    fn rows() -> impl Strategy<Value = Vec<(i64, usize, usize, u8, i64, u16)>> {
        proptest::collection::vec(
            (0i64..2 * 86_400, 0usize..3, 0usize..4, 0u8..40, 0i64..5_000, 0u16..300),
            1..120,
        )
    }

    fn batch_of(rows: &[(i64, usize, usize, u8, i64, u16)]) -> RecordBatch {
        const TENANTS: [&str; 3] = ["acme", "beta", "gamma"];
        const BIDDERS: [&str; 4] = ["", "x", "y", "z"];
        let users: Vec<String> = rows.iter().map(|r| format!("u{}", r.5)).collect();
        let rows: Vec<Row> = rows
            .iter()
            .zip(&users)
            .map(|(r, u)| Row {
                secs: DAY0 + r.0,
                tenant: TENANTS[r.1],
                bidder: BIDDERS[r.2],
                site: "s",
                cpm: f64::from(r.3) / 2.0,
                latency: r.4,
                user: u.as_str(),
            })
            .collect();
        batch(&rows)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Folding rows in two parts and merging equals folding them at once, and a cube
        /// survives its chunk encoding: what replays, checkpoints and rebuilds rely on.
        #[test]
        fn merge_is_a_union_and_chunks_round_trip(rows in rows(), cut in 0usize..120) {
            let def = def();
            let cut = cut.min(rows.len());
            let all = batch_of(&rows);
            let (whole, n, _) = cube::Cube::from_batch(&def, &all, i64::MIN, &|_| true).expect("fold");
            prop_assert_eq!(n as usize, rows.len());
            let (mut a, _, _) = cube::Cube::from_batch(&def, &batch_of(&rows[..cut]), i64::MIN, &|_| true).expect("fold");
            if cut < rows.len() {
                let (b, _, _) = cube::Cube::from_batch(&def, &batch_of(&rows[cut..]), i64::MIN, &|_| true).expect("fold");
                prop_assert_eq!(a.groups + a.new_groups(&b), whole.groups);
                a.absorb(b);
            }
            prop_assert_eq!(&a, &whole);
            let mut back = cube::Cube::default();
            for g in [Grain::Hour, Grain::Day] {
                let start = store::chunk_of(g, DAY0 - 86_400);
                let end = store::chunk_of(g, DAY0 + 3 * 86_400) + store::chunk_span(g);
                let mut from = start;
                while from < end {
                    let bytes = whole.encode_range(g, from, from + store::chunk_span(g));
                    back.decode_into(g, &def, &bytes).expect("decode");
                    from += store::chunk_span(g);
                }
            }
            prop_assert_eq!(&back, &whole);
        }
    }
}
