//! Tests of the embedded log: round trips, recovery of torn tails, corruption detection,
//! offsets and retention.

use super::*;
use crate::segment::HEADER_LEN;

fn opts(segment_bytes_max: u64) -> LogOptions {
    LogOptions {
        segment_bytes_max,
        ..LogOptions::default()
    }
}

fn rt() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => panic!("runtime: {e}"),
    }
}

fn read_all(t: &Topic, from: u64) -> Vec<Record> {
    let mut c = t.cursor(from);
    let mut out = Vec::new();
    loop {
        let got = c.read(1 << 20).expect("read");
        if got.is_empty() {
            return out;
        }
        out.extend(got);
    }
}

#[test]
fn append_and_read_back_across_segments_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    {
        let log = Log::open(dir.path(), opts(300)).expect("open");
        let t = log.topic("events").expect("topic");
        rt.block_on(async {
            for i in 0..50u64 {
                let seq = t.append(format!("payload-{i}").into_bytes()).await.expect("append");
                assert_eq!(seq, i);
            }
        });
        assert!(t.stats().segments > 3, "small segments should roll: {:?}", t.stats());
        let recs = read_all(&t, 0);
        assert_eq!(recs.len(), 50);
        assert_eq!(recs[49].payload, b"payload-49");
        let from_mid = read_all(&t, 37);
        assert_eq!(from_mid.first().map(|r| r.seq), Some(37));
    }
    let log = Log::open(dir.path(), opts(300)).expect("reopen");
    let t = log.topic("events").expect("topic");
    assert_eq!(t.durable_end(), 50);
    let seq = rt.block_on(t.append(b"after".to_vec())).expect("append");
    assert_eq!(seq, 50);
    let recs = read_all(&t, 0);
    assert_eq!(recs.len(), 51);
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.seq, i as u64);
    }
}

#[test]
fn concurrent_appends_get_distinct_sequences() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    let log = Log::open(dir.path(), LogOptions::default()).expect("open");
    let t = log.topic("c").expect("topic");
    let seqs = rt.block_on(async {
        let mut hs = Vec::new();
        for i in 0..200u32 {
            let t = t.clone();
            hs.push(tokio::spawn(async move { t.append(i.to_le_bytes().to_vec()).await }));
        }
        let mut seqs = Vec::new();
        for h in hs {
            seqs.push(h.await.expect("join").expect("append"));
        }
        seqs
    });
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 200);
    assert_eq!(read_all(&t, 0).len(), 200);
}

/// Appends `payloads` to `t` in order, each one durable before the next.
fn append_each(rt: &tokio::runtime::Runtime, t: &Topic, payloads: impl IntoIterator<Item = Vec<u8>>) {
    rt.block_on(async {
        for p in payloads {
            t.append(p).await.expect("append");
        }
    });
}

fn last_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let mut segs: Vec<_> = std::fs::read_dir(dir)
        .expect("read_dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    segs.pop().expect("a segment")
}

/// Writes `n` records of `size` bytes (record i holds the byte i) to topic `t`, then closes.
fn fill(dir: &std::path::Path, opts: LogOptions, n: u8, size: usize) {
    let log = Log::open(dir, opts).expect("open");
    let t = log.topic("t").expect("topic");
    append_each(&rt(), &t, (0..n).map(|i| vec![i; size]));
}

#[test]
fn torn_tail_is_truncated_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    fill(dir.path(), LogOptions::default(), 10, 100);
    let seg = last_segment(&dir.path().join("t"));
    let full = std::fs::metadata(&seg).expect("meta").len();
    // Cut the last record in half, as a crash mid-write would.
    let f = std::fs::OpenOptions::new().write(true).open(&seg).expect("open seg");
    f.set_len(full - 50).expect("truncate");
    drop(f);
    let log = Log::open(dir.path(), LogOptions::default()).expect("reopen");
    let t = log.topic("t").expect("topic");
    assert_eq!(t.durable_end(), 9);
    assert_eq!(read_all(&t, 0).len(), 9);
    let seq = rt.block_on(t.append(vec![42; 10])).expect("append");
    assert_eq!(seq, 9);
    let recs = read_all(&t, 0);
    assert_eq!(recs.len(), 10);
    assert_eq!(recs[9].payload, vec![42; 10]);
}

#[test]
fn garbage_tail_is_truncated_and_mid_corruption_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    fill(dir.path(), LogOptions::default(), 5, 64);
    let seg = last_segment(&dir.path().join("t"));
    let mut bytes = std::fs::read(&seg).expect("read");
    let good = bytes.len();
    bytes.extend_from_slice(&[0xAB; 37]);
    std::fs::write(&seg, &bytes).expect("write");
    {
        let log = Log::open(dir.path(), LogOptions::default()).expect("reopen");
        let t = log.topic("t").expect("topic");
        assert_eq!(t.durable_end(), 5);
    }
    assert_eq!(std::fs::metadata(&seg).expect("meta").len() as usize, good);
    // Flip a payload byte of the second record: it is inside the valid range, so recovery
    // truncates from there; a reader never returns the damaged record.
    let mut bytes = std::fs::read(&seg).expect("read");
    let second_payload = (HEADER_LEN as usize) + 16 + 64 + 16 + 3;
    bytes[second_payload] ^= 0xFF;
    std::fs::write(&seg, &bytes).expect("write");
    let log = Log::open(dir.path(), LogOptions::default()).expect("reopen");
    let t = log.topic("t").expect("topic");
    assert_eq!(t.durable_end(), 1);
    let recs = read_all(&t, 0);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].payload, vec![0u8; 64]);
}

#[test]
fn a_torn_segment_header_is_restarted_but_a_damaged_one_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    fill(dir.path(), opts(200), 6, 64);
    let last = last_segment(&dir.path().join("t"));
    let base: u64 = last
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("base");
    // A crash while creating the next segment leaves a short header.
    let next = segment::segment_path(&dir.path().join("t"), 6);
    std::fs::write(&next, &segment::encode_header(&segment::Header::new(6))[..7]).expect("write");
    {
        let log = Log::open(dir.path(), opts(200)).expect("reopen");
        let t = log.topic("t").expect("topic");
        assert_eq!(t.durable_end(), 6);
        assert_eq!(rt.block_on(t.append(vec![9; 8])).expect("append"), 6);
        assert_eq!(read_all(&t, base).len() as u64, 7 - base);
    }
    // A full header with a bad checksum is damage, not a torn write.
    let mut bytes = std::fs::read(&next).expect("read");
    bytes[9] ^= 0xFF;
    std::fs::write(&next, &bytes).expect("write");
    let log = Log::open(dir.path(), opts(200)).expect("reopen");
    assert!(matches!(log.topic("t"), Err(Error::Corrupt { .. })));
}

#[test]
fn corruption_in_a_closed_segment_is_an_error_not_a_skip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let log = Log::open(dir.path(), opts(200)).expect("open");
    let t = log.topic("t").expect("topic");
    append_each(&rt, &t, (0..6u8).map(|i| vec![i; 64]));
    let first = segment::segment_path(&dir.path().join("t"), 0);
    let mut bytes = std::fs::read(&first).expect("read");
    let at = HEADER_LEN as usize + 16 + 5;
    bytes[at] ^= 0x01;
    std::fs::write(&first, &bytes).expect("write");
    let mut c = t.cursor(0);
    match c.read(1 << 20) {
        Err(Error::Corrupt { reason, .. }) => assert!(reason.contains("checksum"), "{reason}"),
        other => panic!("expected a corruption error, got {other:?}"),
    }
}

/// A consumed segment of one topic becomes the first segment of another, with the same
/// record sizes and sequences: its old records line up exactly with where the new ones end, so
/// only the salt in the checksum tells them apart after a restart.
#[test]
fn reused_segments_never_yield_their_old_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let spare_dir = dir.path().join(".spare");
    let spares = || std::fs::read_dir(&spare_dir).expect("spares").count();
    {
        let log = Log::open(dir.path(), opts(400)).expect("open");
        let a = log.topic("a").expect("topic");
        a.register_group("g").expect("group");
        append_each(&rt, &a, (0..8u8).map(|i| vec![i; 50]));
        a.commit("g", 8).expect("commit");
        assert_eq!(a.apply_retention().expect("retention"), 1);
        assert_eq!(spares(), 1, "the consumed segment is kept for reuse");
        let kept = log.spares();
        assert_eq!(kept.segments, 1);
        let seg_len: u64 = std::fs::read_dir(&spare_dir)
            .expect("spares")
            .map(|e| e.expect("entry").metadata().expect("meta").len())
            .sum();
        assert!(seg_len > 300, "{seg_len}");
        assert_eq!(kept.bytes, seg_len, "the gauge counts the kept file's bytes");
        let b = log.topic("b").expect("topic");
        assert_eq!(spares(), 0, "the new topic's first segment is the spare");
        assert_eq!(log.spares(), SpareStats::default());
        let seg = last_segment(&dir.path().join("b"));
        assert!(
            std::fs::metadata(&seg).expect("meta").len() > 300,
            "the reused file still holds the old records"
        );
        append_each(&rt, &b, (0..2u8).map(|i| vec![100 + i; 50]));
    }
    let log = Log::open(dir.path(), opts(400)).expect("reopen");
    let b = log.topic("b").expect("topic");
    assert_eq!(
        b.durable_end(),
        2,
        "the old records 2..5 of topic a are not taken for b's"
    );
    let recs = read_all(&b, 0);
    assert_eq!(recs.iter().map(|r| r.payload[0]).collect::<Vec<_>>(), [100, 101]);
    // Appends go on where the records end.
    append_each(&rt, &b, (2..12u8).map(|i| vec![100 + i; 50]));
    let recs = read_all(&b, 0);
    assert_eq!(recs.len(), 12);
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.payload, vec![100 + i as u8; 50]);
    }
    // A reused file that rolls before its records reach its old length is cut at its last
    // record, so that a closed segment's length is where its records end.
    let a = log.topic("a").expect("topic");
    append_each(&rt, &a, (8..16u8).map(|i| vec![i; 50]));
    a.commit("g", 16).expect("commit");
    assert!(a.apply_retention().expect("retention") >= 1);
    let c = log.topic("c").expect("topic");
    rt.block_on(async {
        c.append(vec![1; 10]).await.expect("append");
        c.append(vec![2; 360]).await.expect("append");
    });
    let first = segment::segment_path(&dir.path().join("c"), 0);
    assert_eq!(std::fs::metadata(&first).expect("meta").len(), HEADER_LEN + 16 + 10);
    drop(log);
    let log = Log::open(dir.path(), opts(400)).expect("reopen");
    let c = log.topic("c").expect("topic");
    let recs = read_all(&c, 0);
    assert_eq!(
        recs.iter().map(|r| (r.payload[0], r.payload.len())).collect::<Vec<_>>(),
        [(1, 10), (2, 360)]
    );
    let topics = log.topic_names().expect("names");
    assert_eq!(topics, ["a", "b", "c"], "the spare folder is not a topic");
}

/// A cursor that reads a reused segment while it is being written never reads ahead into the
/// old bytes past the durable end (they would be stale once the writer overwrites them).
#[test]
fn a_cursor_in_a_reused_segment_reads_each_new_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let log = Log::open(dir.path(), opts(4000)).expect("open");
    let a = log.topic("a").expect("topic");
    a.register_group("g").expect("group");
    append_each(&rt, &a, (0..80u8).map(|i| vec![i; 100]));
    a.commit("g", 80).expect("commit");
    assert!(a.apply_retention().expect("retention") >= 1);
    let b = log.topic("b").expect("topic");
    assert_eq!(b.stats().segments_reused, 1);
    let mut cursor = b.cursor(0);
    for i in 0..20u8 {
        let seq = rt.block_on(b.append(vec![200 - i; 30])).expect("append");
        let recs = cursor.read(1 << 20).expect("a new record, not an old one's bytes");
        assert_eq!(recs.len(), 1, "record {seq}");
        assert_eq!((recs[0].seq, recs[0].payload.clone()), (seq, vec![200 - i; 30]));
    }
}

/// A log written before segments carried a salt is read, recovered and appended to.
#[test]
fn segments_of_the_first_format_are_still_read_and_appended_to() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let t_dir = dir.path().join("t");
    std::fs::create_dir_all(&t_dir).expect("mkdir");
    // Header: magic, base, CRC-32C of both; records: length, CRC over (seq, payload), seq.
    let mut bytes = b"TARNLOG1".to_vec();
    bytes.extend_from_slice(&0u64.to_le_bytes());
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    for seq in 0..3u64 {
        let payload = vec![seq as u8 + 7; 20];
        bytes.extend_from_slice(&20u32.to_le_bytes());
        let c = crc32c::crc32c_append(crc32c::crc32c(&seq.to_le_bytes()), &payload);
        bytes.extend_from_slice(&c.to_le_bytes());
        bytes.extend_from_slice(&seq.to_le_bytes());
        bytes.extend_from_slice(&payload);
    }
    // And half of a fourth record, torn.
    bytes.extend_from_slice(&20u32.to_le_bytes());
    std::fs::write(segment::segment_path(&t_dir, 0), &bytes).expect("write");
    let log = Log::open(dir.path(), opts(200)).expect("open");
    let t = log.topic("t").expect("topic");
    assert_eq!(t.durable_end(), 3);
    append_each(&rt, &t, (3..12u8).map(|i| vec![i + 7; 20]));
    drop(log);
    let log = Log::open(dir.path(), opts(200)).expect("reopen");
    let t = log.topic("t").expect("topic");
    let recs = read_all(&t, 0);
    assert_eq!(recs.len(), 12);
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.payload, vec![i as u8 + 7; 20]);
    }
    assert!(t.stats().segments > 1, "{:?}", t.stats());
}

#[test]
fn offsets_survive_reopen_and_retention_removes_consumed_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    {
        let log = Log::open(dir.path(), opts(400)).expect("open");
        let t = log.topic("t").expect("topic");
        assert_eq!(t.register_group("a").expect("group"), 0);
        assert_eq!(t.register_group("b").expect("group"), 0);
        append_each(&rt, &t, (0..40u8).map(|i| vec![i; 50]));
        let before = t.stats().segments;
        assert!(before > 4);
        t.commit("a", 30).expect("commit");
        // Group b has consumed nothing: nothing may go.
        assert_eq!(t.apply_retention().expect("retention"), 0);
        t.commit("b", 20).expect("commit");
        let removed = t.apply_retention().expect("retention");
        assert!(removed > 0);
        let st = t.stats();
        assert!(st.first_seq <= 20, "{st:?}");
        assert!(matches!(t.cursor(0).read(10), Err(Error::Truncated(0))));
        let recs = read_all(&t, 20);
        assert_eq!(recs.len(), 20);
    }
    let log = Log::open(dir.path(), opts(400)).expect("reopen");
    let t = log.topic("t").expect("topic");
    assert_eq!(t.committed("a"), Some(30));
    assert_eq!(t.committed("b"), Some(20));
    assert_eq!(t.durable_end(), 40);
}

#[test]
fn hostile_names_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), LogOptions::default()).expect("open");
    for bad in ["", "..", "../x", "a/b", "A", ".hidden"] {
        assert!(matches!(log.topic(bad), Err(Error::InvalidName(_))), "{bad:?}");
    }
    let t = log.topic("ok").expect("topic");
    assert!(t.commit("../../x", 1).is_err());
}

#[test]
fn oversize_records_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(
        dir.path(),
        LogOptions {
            record_bytes_max: 10,
            ..LogOptions::default()
        },
    )
    .expect("open");
    let t = log.topic("t").expect("topic");
    let r = rt().block_on(t.append(vec![0; 11]));
    assert!(matches!(r, Err(Error::TooLarge { size: 11, max: 10 })));
}

#[test]
fn waiters_wake_on_append() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let log = Log::open(dir.path(), LogOptions::default()).expect("open");
    let t = log.topic("t").expect("topic");
    rt.block_on(async {
        let c = t.cursor(0);
        let t2 = t.clone();
        let h = tokio::spawn(async move { t2.append(b"x".to_vec()).await });
        tokio::time::timeout(std::time::Duration::from_secs(10), c.wait())
            .await
            .expect("woken");
        h.await.expect("join").expect("append");
    });
}

mod properties {
    //! Property: whatever the record sizes and wherever a crash cuts the last segment, reopening
    //! yields exactly the records that were wholly written before the cut, in order, and new
    //! appends continue right after them.

    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn recovery_keeps_exactly_the_whole_records(
            sizes in proptest::collection::vec(0usize..300, 1..40),
            cut_fraction in 0.0f64..1.0,
            segment_bytes in 200u64..2000,
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let rt = rt();
            let payload = |i: usize, n: usize| -> Vec<u8> { (0..n).map(|j| (i * 31 + j) as u8).collect() };
            {
                let log = Log::open(dir.path(), opts(segment_bytes)).expect("open");
                let t = log.topic("p").expect("topic");
                rt.block_on(async {
                    for (i, n) in sizes.iter().enumerate() {
                        t.append(payload(i, *n)).await.expect("append");
                    }
                });
            }
            let seg = last_segment(&dir.path().join("p"));
            let len = std::fs::metadata(&seg).expect("meta").len();
            let cut = HEADER_LEN + ((len - HEADER_LEN) as f64 * cut_fraction) as u64;
            // Which records survive: those in earlier segments, plus those wholly before the cut.
            let base: u64 = seg.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse().ok()).expect("base");
            let mut pos = HEADER_LEN;
            let mut survivors = base as usize;
            for n in &sizes[base as usize..] {
                let end = pos + 16 + *n as u64;
                if end > cut {
                    break;
                }
                pos = end;
                survivors += 1;
            }
            std::fs::OpenOptions::new().write(true).open(&seg).expect("open").set_len(cut).expect("cut");
            let log = Log::open(dir.path(), opts(segment_bytes)).expect("reopen");
            let t = log.topic("p").expect("topic");
            prop_assert_eq!(t.durable_end(), survivors as u64);
            let recs = read_all(&t, 0);
            prop_assert_eq!(recs.len(), survivors);
            for (i, r) in recs.iter().enumerate() {
                prop_assert_eq!(r.seq, i as u64);
                prop_assert_eq!(&r.payload, &payload(i, sizes[i]));
            }
            let next = rt.block_on(t.append(b"next".to_vec())).expect("append");
            prop_assert_eq!(next, survivors as u64);
        }
    }
}
