//! The NATS JetStream backend against a real server (`TARN_TEST_NATS`, which `scripts/test`
//! sets and starts): the embedded log's semantics, each test in its own namespace.

use std::sync::atomic::{AtomicU32, Ordering};

use super::*;
use crate::{Cursor, Log, Topic};

/// The server's URL, or `None` (with the reason printed) outside CI when none is configured.
fn server() -> Option<String> {
    match std::env::var("TARN_TEST_NATS") {
        Ok(url) => Some(url),
        Err(_) => {
            let msg = "TARN_TEST_NATS is not set: these tests need NATS with JetStream \
                       (scripts/test starts it and sets nats://127.0.0.1:4222)";
            assert!(std::env::var("CI").is_err(), "{msg}");
            eprintln!("skipped: {msg}");
            None
        }
    }
}

fn namespace() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("t{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

fn opts(ns: &str) -> NatsOptions {
    NatsOptions {
        namespace: ns.to_string(),
        ..NatsOptions::default()
    }
}

/// Deletes the streams and bucket of a test's namespace.
async fn cleanup(url: &str, ns: &str) {
    delete_namespace(url, ns).await.expect("cleanup");
}

/// Reads `n` records from `from` (failing after 30 s), then checks that no more come.
async fn read_n(t: &Topic, from: u64, n: usize) -> Vec<Record> {
    let mut c: Cursor = t.cursor(from);
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while out.len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "read {} of {n} records",
            out.len()
        );
        let (next, got) = c.fetch(1 << 20).await.expect("fetch");
        c = next;
        if got.is_empty() {
            let _ = tokio::time::timeout(Duration::from_millis(500), c.wait()).await;
        }
        out.extend(got);
    }
    let _ = tokio::time::timeout(Duration::from_millis(300), c.wait()).await;
    let (_, more) = c.fetch(1 << 20).await.expect("fetch");
    assert!(more.is_empty(), "{} records past the {n} expected", more.len());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_read_back_in_order_from_any_sequence_across_connections() {
    let Some(url) = server() else { return };
    let ns = namespace();
    {
        let log = Log::connect_nats(&url, opts(&ns)).await.expect("connect");
        let t = log.topic("events.d").expect("topic");
        for i in 0..30u64 {
            let seq = t.append(format!("p-{i}").into_bytes()).await.expect("append");
            assert_eq!(seq, i, "sequences count from 0 without gaps");
        }
        let all = read_n(&t, 0, 30).await;
        assert!(
            all.iter()
                .enumerate()
                .all(|(i, r)| r.seq == i as u64 && r.payload == format!("p-{i}").as_bytes())
        );
        let mid = read_n(&t, 17, 13).await;
        assert_eq!(mid.first().map(|r| r.seq), Some(17));
        assert_eq!(log.topic_names().await.expect("names"), vec!["events.d".to_string()]);
    }
    // A new connection (a restarted process) sees the same records and goes on numbering.
    let log = Log::connect_nats(&url, opts(&ns)).await.expect("reconnect");
    let t = log.topic("events.d").expect("topic");
    assert_eq!(t.append(b"after".to_vec()).await.expect("append"), 30);
    let st = t.stats().await.expect("stats");
    assert_eq!((st.first_seq, st.next_seq), (0, 31));
    assert_eq!(
        read_n(&t, 29, 2).await.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![29, 30]
    );
    cleanup(&url, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_get_distinct_sequences_and_a_waiting_cursor_wakes() {
    let Some(url) = server() else { return };
    let ns = namespace();
    let log = Log::connect_nats(&url, opts(&ns)).await.expect("connect");
    let t = log.topic("events.c").expect("topic");
    let mut c = t.cursor(0);
    let waiter = tokio::spawn(async move {
        c.wait().await;
        let (_, got) = c.fetch(1 << 20).await.expect("fetch");
        got
    });
    let mut tasks = Vec::new();
    for w in 0..8 {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..25 {
                seqs.push(t.append(format!("{w}-{i}").into_bytes()).await.expect("append"));
            }
            seqs
        }));
    }
    let mut seqs = Vec::new();
    for task in tasks {
        seqs.extend(task.await.expect("task"));
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (0..200).collect::<Vec<u64>>());
    let first = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiting cursor woke")
        .expect("task");
    assert_eq!(first.first().map(|r| r.seq), Some(0));
    let all = read_n(&t, 0, 200).await;
    assert!(all.iter().enumerate().all(|(i, r)| r.seq == i as u64));
    cleanup(&url, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_offsets_are_durable_and_retention_keeps_what_a_group_still_needs() {
    let Some(url) = server() else { return };
    let ns = namespace();
    let log = Log::connect_nats(&url, opts(&ns)).await.expect("connect");
    let t = log.topic("system.objects").expect("topic");
    for i in 0..20u64 {
        t.append(vec![i as u8; 10]).await.expect("append");
    }
    assert_eq!(t.register_group("curate").await.expect("register"), 0);
    assert_eq!(t.register_group("rollups").await.expect("register"), 0);
    t.commit("curate", 15).await.expect("commit");
    t.commit("rollups", 8).await.expect("commit");
    // Registering again (another process) keeps the committed offset.
    let log2 = Log::connect_nats(&url, opts(&ns)).await.expect("connect");
    let t2 = log2.topic("system.objects").expect("topic");
    assert_eq!(t2.register_group("curate").await.expect("register"), 15);
    assert_eq!(t2.committed("rollups").await.expect("committed"), Some(8));
    assert_eq!(t2.committed("nobody").await.expect("committed"), None);
    // Retention removes only what the slowest group has committed past.
    assert_eq!(t.apply_retention().await.expect("retention"), 8);
    let st = t.stats().await.expect("stats");
    assert_eq!((st.first_seq, st.next_seq), (8, 20));
    read_n(&t, 8, 12).await;
    // A cursor before the first record still there fails instead of skipping silently.
    let c = t.cursor(3);
    let mut c = c;
    let mut err = None;
    for _ in 0..50 {
        match c.fetch(1 << 20).await {
            Ok((next, got)) if got.is_empty() => {
                c = next;
                let _ = tokio::time::timeout(Duration::from_millis(200), c.wait()).await;
            }
            Ok((_, got)) => panic!("read {} records from a removed position", got.len()),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    assert!(matches!(err, Some(Error::Truncated(3))), "{err:?}");
    // A group registered now starts at the first record still there.
    assert_eq!(t.register_group("late").await.expect("register"), 8);
    // An offset past the stream's end (the stream was made again under it) is an error.
    t.commit("ghost", 1000).await.expect("commit");
    let err = t.register_group("ghost").await.expect_err("stale offset");
    assert!(err.to_string().contains("past the end"), "{err}");
    cleanup(&url, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_instead_of_dropping() {
    let Some(url) = server() else { return };
    let ns = namespace();
    let log = Log::connect_nats(&url, opts(&ns)).await.expect("connect");
    let max = log.record_bytes_max();
    assert!(max > 0);
    let t = log.topic("events.l").expect("topic");
    assert!(matches!(t.append(vec![0; max + 1]).await, Err(Error::TooLarge { .. })));
    // A limit below what the stream holds waits: JetStream would delete records to fit it.
    for _ in 0..20 {
        t.append(vec![1; 500]).await.expect("append");
    }
    log.set_topic_bytes_max("events.l", 4096).await.expect("limit");
    let js = jetstream::new(async_nats::connect(&url).await.expect("client"));
    let max_bytes = || async {
        let mut s = js.get_stream(format!("{ns}-events-l")).await.expect("stream");
        s.info().await.expect("info").config.clone().max_bytes
    };
    assert_eq!(max_bytes().await, -1, "no limit yet");
    read_n(&t, 0, 20).await;
    // Once the records are delivered and purged, the limit applies.
    t.register_group("delivery").await.expect("register");
    t.commit("delivery", 20).await.expect("commit");
    assert_eq!(t.apply_retention().await.expect("retention"), 20);
    assert_eq!(max_bytes().await, 4096);
    // A full topic refuses appends and keeps every record it acknowledged.
    let mut acked = 0u64;
    let full = loop {
        match t.append(vec![7; 500]).await {
            Ok(_) => acked += 1,
            Err(e) => break e,
        }
        assert!(acked < 100, "a 4 KiB topic took {acked} records of 500 bytes");
    };
    assert!(matches!(full, Error::Full(_)), "{full}");
    assert!(acked > 0);
    read_n(&t, 20, acked as usize).await;
    // The stream tarn made: its subject, file storage, discard new, the limit.
    let mut s = js.get_stream(format!("{ns}-events-l")).await.expect("stream");
    let cfg = s.info().await.expect("info").config.clone();
    assert_eq!(cfg.subjects, vec![format!("{ns}.events.l")]);
    assert_eq!(cfg.max_bytes, 4096);
    assert_eq!(cfg.discard, stream::DiscardPolicy::New);
    assert_eq!(cfg.storage, stream::StorageType::File);
    assert_eq!(cfg.num_replicas, 1);
    // Names that cannot be mapped are refused.
    assert!(matches!(log.topic("events.a-b"), Err(Error::InvalidName(_))));
    assert!(matches!(
        Log::connect_nats(&url, opts("Bad.NS")).await,
        Err(Error::InvalidName(_))
    ));
    cleanup(&url, &ns).await;
}

#[tokio::test]
async fn an_unreachable_server_is_a_clear_error() {
    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let err = Log::connect_nats(&format!("nats://127.0.0.1:{port}"), NatsOptions::default())
        .await
        .err()
        .expect("no server there");
    assert!(err.to_string().contains("cannot connect to NATS"), "{err}");
}

#[test]
fn credentials_never_reach_messages() {
    assert_eq!(redact("nats://u:secret@h:4222"), "nats://***@h:4222");
    assert_eq!(redact("nats://h:4222"), "nats://h:4222");
}

/// Retention never passes a group that is behind, however busy the others are: offsets are
/// read by the topic's group list, not by listing keys while they are rewritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_never_passes_a_group_that_is_behind() {
    let Some(url) = server() else { return };
    let ns = namespace();
    let log = Log::connect_nats(&url, opts(&ns)).await.expect("connect");
    let nlog = match &log.0 {
        crate::stream::LogKind::Nats(l) => l.clone(),
        crate::stream::LogKind::Embedded(_) => unreachable!("a NATS log"),
    };
    let t = log.topic("system.objects").expect("topic");
    for i in 0..50u64 {
        t.append(vec![i as u8; 8]).await.expect("append");
    }
    assert_eq!(t.register_group("slow").await.expect("register"), 0);
    t.register_group("fast").await.expect("register");
    let inner = nlog.topic("system.objects").expect("topic").inner;
    let busy = {
        let t = t.clone();
        tokio::spawn(async move {
            for i in 1..=200u64 {
                t.commit("fast", (i % 50) + 1).await.expect("commit");
            }
        })
    };
    for _ in 0..40 {
        assert_eq!(retain(&inner).await.expect("retention"), 0);
    }
    busy.await.expect("task");
    assert_eq!(
        t.stats().await.expect("stats").first_seq,
        0,
        "nothing passed the slow group"
    );
    t.commit("slow", 30).await.expect("commit");
    t.commit("fast", 40).await.expect("commit");
    assert_eq!(retain(&inner).await.expect("retention"), 30);
    cleanup(&url, &ns).await;
}

/// Two processes' handles on one namespace: a lease goes to one holder at a time, passes on
/// when given up or expired, and racing takers of a free lease get it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_and_members_are_shared_through_the_server() {
    let Some(url) = server() else { return };
    let ns = namespace();
    let a = Log::connect_nats(&url, opts(&ns)).await.expect("connect a");
    let b = Log::connect_nats(&url, opts(&ns)).await.expect("connect b");
    let ttl = Duration::from_secs(30);
    assert!(a.lease("shard.0", "a", ttl).await.expect("a takes"));
    assert!(!b.lease("shard.0", "b", ttl).await.expect("b asks"), "a holds it");
    assert!(a.lease("shard.0", "a", ttl).await.expect("a renews"));
    b.release("shard.0", "b").await.expect("b cannot give up what it lacks");
    assert!(!b.lease("shard.0", "b", ttl).await.expect("b asks again"));
    a.release("shard.0", "a").await.expect("a gives up");
    assert!(b.lease("shard.0", "b", ttl).await.expect("b takes"));
    // A short lease expires on its own.
    assert!(
        a.lease("shard.1", "a", Duration::from_millis(200))
            .await
            .expect("short")
    );
    assert!(!b.lease("shard.1", "b", ttl).await.expect("not yet"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(b.lease("shard.1", "b", ttl).await.expect("expired"));
    // Eight takers race for one free lease: one wins.
    let mut racers = Vec::new();
    for i in 0..8 {
        let log = if i % 2 == 0 { a.clone() } else { b.clone() };
        racers.push(tokio::spawn(async move {
            log.lease("shard.2", &format!("r{i}"), Duration::from_secs(30)).await
        }));
    }
    let mut won = 0;
    for r in racers {
        won += usize::from(r.await.expect("join").expect("lease"));
    }
    assert_eq!(won, 1, "exactly one racer holds the lease");
    // Membership.
    assert_eq!(a.members("workers", "a", Some(ttl)).await.expect("a joins"), ["a"]);
    assert_eq!(b.members("workers", "b", Some(ttl)).await.expect("b joins"), ["a", "b"]);
    assert_eq!(b.members("workers", "b", None).await.expect("b leaves"), ["a"]);
    assert_eq!(
        a.members("workers", "c", Some(Duration::from_millis(100)))
            .await
            .expect("c"),
        ["a", "c"]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.members("workers", "a", Some(ttl)).await.expect("c expired"), ["a"]);
    // The lease keys are no topic.
    assert!(a.topic_names().await.expect("names").is_empty());
    cleanup(&url, &ns).await;
}
