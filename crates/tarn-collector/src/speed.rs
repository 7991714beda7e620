//! A measurement, not a test: how fast one request's events are split, parsed, checked and
//! encoded, beside serde_json parsing the same events into trees (the reference, in the same
//! run on the same data). Run it optimised, on a quiet machine:
//!
//! ```text
//! cargo test --profile bench-release -p tarn-collector speed -- --ignored --nocapture
//! ```

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tarn_core::{DatasetSpec, Limits};

use crate::{decode, encode, validate};

/// The contract of `tarn bench`'s events.
const AUCTIONS: &str = r#"
name: auctions
fields:
  - { name: event_id, type: string, required: true }
  - { name: ts, type: timestamp, required: true }
  - { name: client_id, type: string, required: true }
  - { name: site, type: string }
  - { name: ad_unit, type: string }
  - { name: bidder, type: string }
  - { name: cpm, type: float64 }
  - { name: currency, type: string }
  - { name: country, type: string }
  - { name: device, type: string }
  - { name: user_agent, type: string }
  - { name: page_url, type: string }
  - { name: consent, type: bool }
  - { name: latency_ms, type: int64 }
event_time: ts
event_id: event_id
partitioning: { tenant: client_id }
"#;

/// `n` events shaped as `tarn bench` makes them (about 500 bytes each), as NDJSON.
fn events(n: usize) -> String {
    let mut rng = StdRng::seed_from_u64(7);
    let uas = [
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    ];
    let mut out = String::new();
    for i in 0..n {
        let c = rng.random_range(0..200);
        let t =
            chrono::DateTime::from_timestamp(1_763_596_800 + rng.random_range(0..3 * 86_400), 0).unwrap_or_default();
        out.push_str(&format!(
            concat!(
                r#"{{"event_id":"{:016x}{:016x}","ts":"{}","client_id":"client_{:03}","site":"site{}.example.com","#,
                r#""ad_unit":"slot_{}","bidder":"rubicon","cpm":{:.4},"currency":"USD","country":"DE","device":"mobile","#,
                r#""user_agent":"{}","page_url":"https://site{}.example.com/articles/{}/{}?ref=home","consent":{},"latency_ms":{}}}"#,
                "\n"
            ),
            rng.random::<u64>(),
            i,
            t.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            c,
            c * 7,
            rng.random_range(0..12),
            rng.random_range(0.01..25.0f64),
            uas[rng.random_range(0..uas.len())],
            c * 7,
            rng.random_range(0..5000),
            rng.random_range(100_000..999_999),
            rng.random_bool(0.8),
            rng.random_range(5..900),
        ));
    }
    out
}

/// The best of `rounds` timings of `f`.
fn best(rounds: usize, mut f: impl FnMut()) -> Duration {
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

#[test]
#[ignore = "a measurement; run it optimised with --ignored --nocapture"]
fn speed() {
    let spec = DatasetSpec::from_yaml(AUCTIONS).expect("spec");
    let limits = Limits::default();
    let n = 5_000;
    let body = events(n);
    let rounds = 30;
    let split = best(rounds, || {
        let raw = decode::split_events(body.as_bytes(), &limits).expect("split");
        assert_eq!(raw.len(), n);
    });
    let raw = decode::split_events(body.as_bytes(), &limits).expect("split");
    let check = best(rounds, || {
        let (batch, rejected) = validate::check_and_build(&spec, &raw, 0, &limits).expect("check");
        assert!(rejected.is_empty(), "{rejected:?}");
        assert_eq!(batch.map(|b| b.num_rows()), Some(n));
    });
    let (batch, _) = validate::check_and_build(&spec, &raw, 0, &limits).expect("check");
    let batch = batch.expect("rows");
    let encode = best(rounds, || {
        encode::encode_payloads(&batch, usize::MAX).expect("encode");
    });
    let serde = best(rounds, || {
        for r in &raw {
            let v: serde_json::Value = serde_json::from_str(r.text).expect("json");
            assert!(v.is_object());
        }
    });
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let total = split + check + encode;
    println!(
        "{n} events, {} bytes: split {:.2} ms, check and build {:.2} ms, encode {:.2} ms; total {:.2} ms ({:.0} ns per event)",
        body.len(),
        ms(split),
        ms(check),
        ms(encode),
        ms(total),
        total.as_nanos() as f64 / n as f64
    );
    println!(
        "reference, serde_json into trees: {:.2} ms; tarn's whole preparation / reference = {:.2}x",
        ms(serde),
        total.as_secs_f64() / serde.as_secs_f64()
    );
}
