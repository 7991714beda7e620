//! The stream on NATS JetStream through the real binary: requests larger than one NATS message,
//! the streams tarn makes from the dataset's size class, and a full stream answering 503
//! without losing what it acknowledged.

use std::time::Duration;

use crate::server::*;

fn events(from: usize, n: usize, pad: usize) -> String {
    (from..from + n)
        .map(|i| {
            format!(
                r#"{{"event_id":"e{i}","ts":"2026-11-22T10:00:00Z","client_id":"c{}","bidder":"{}","cpm":1.5}}"#,
                i % 4,
                "b".repeat(pad)
            ) + "\n"
        })
        .collect()
}

async fn stream_info(nats: &str, name: &str) -> async_nats::jetstream::stream::Info {
    let js = async_nats::jetstream::new(async_nats::connect(nats).await.expect("nats"));
    let mut s = js.get_stream(name).await.expect("stream");
    s.info().await.expect("info").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_a_message_is_split_and_the_stream_follows_the_size_class() {
    let Some(nats) = nats_server() else { return };
    let ns = nats_namespace("split");
    let dir = tempfile::tempdir().expect("tempdir");
    let stream = format!("{nats}/{ns}");
    let server = start_auctions(dir.path(), &["--stream", &stream, "--stream-bytes-max", "400000000"]);
    let c = client();
    // About 6 MB of NDJSON: several NATS messages of at most 1 MiB.
    let (status, v) = post_events(&c, &server.url, "auctions", events(0, 30_000, 150)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["accepted"], 30_000);
    let info = stream_info(&nats, &format!("{ns}-events-auctions")).await;
    assert!(
        info.state.last_sequence >= 3,
        "one request became {} records",
        info.state.last_sequence
    );
    // Size class M (the default) takes --stream-bytes-max as it is.
    assert_eq!(info.config.max_bytes, 400_000_000);
    assert_eq!(info.config.subjects, vec![format!("{ns}.events.auctions")]);
    let v = wait_for(
        &c,
        &server.url,
        "SELECT count(*), count(DISTINCT event_id) FROM auctions",
        60,
        |v| v["rows"][0][0].as_u64() == Some(30_000),
    )
    .await;
    assert_eq!(v["rows"][0][1], 30_000, "{v}");
    // What every group has passed is purged: a run is scheduled after the last commit even
    // when it came within the throttle of the one before.
    let start = std::time::Instant::now();
    loop {
        let info = stream_info(&nats, &format!("{ns}-events-auctions")).await;
        if info.state.messages == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "delivered records still in the stream: {:?}",
            info.state
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(server);
    nats_cleanup(&nats, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_answers_503_and_loses_nothing_it_acknowledged() {
    let Some(nats) = nats_server() else { return };
    let ns = nats_namespace("full");
    let dir = tempfile::tempdir().expect("tempdir");
    let ds = dir.path().join("datasets");
    write_descriptor(&ds);
    // Size class S: a quarter of --stream-bytes-max.
    let yaml = std::fs::read_to_string(ds.join("auctions.yaml")).expect("read");
    std::fs::write(ds.join("auctions.yaml"), format!("{yaml}size: S\n")).expect("write");
    let stream = format!("{nats}/{ns}");
    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--datasets",
            ds.to_str().expect("utf8"),
            "--batch-age-ms",
            "50",
            "--stream",
            &stream,
            "--stream-bytes-max",
            "1200000",
        ],
    );
    let c = client();
    let mut acked = 0u64;
    let mut refused = None;
    // Retention runs at most every 5 s per topic, so a quick burst fills 300 kB.
    for b in 0..20 {
        let (status, v) = post_events(&c, &server.url, "auctions", events(b * 500, 500, 100)).await;
        match status {
            200 => acked += 500,
            503 => {
                refused = Some(v);
                break;
            }
            s => panic!("unexpected status {s}: {v}"),
        }
    }
    let refused = refused.expect("the stream filled up and refused an append");
    assert!(refused.to_string().contains("size limit"), "{refused}");
    let info = stream_info(&nats, &format!("{ns}-events-auctions")).await;
    assert_eq!(info.config.max_bytes, 300_000);
    // Everything acknowledged reaches the table; later the stream takes appends again.
    wait_for(
        &c,
        &server.url,
        "SELECT count(DISTINCT event_id) FROM auctions",
        60,
        |v| v["rows"][0][0].as_u64() == Some(acked),
    )
    .await;
    let mut again = false;
    for _ in 0..100 {
        let (status, _) = post_events(&c, &server.url, "auctions", events(100_000, 10, 1)).await;
        if status == 200 {
            again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(again, "the stream took appends again once delivery caught up");
    drop(server);
    nats_cleanup(&nats, &ns).await;
}
