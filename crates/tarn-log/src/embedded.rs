//! Topics, the group-commit writer thread, cursors and consumer offsets.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, oneshot, watch};

use crate::segment::{self, Header, SegmentReader};
use crate::{Error, Result, io_err, sync_dir};

/// Limits of the log.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// A segment rolls once it holds this many bytes.
    pub segment_bytes_max: u64,
    /// Largest payload of one record.
    pub record_bytes_max: usize,
    /// Appends waiting for the writer; past it `append` fails with `Overloaded`.
    pub queue_max: usize,
    /// Most bytes written in one group commit round.
    pub group_bytes_max: usize,
    /// Consumed segment files kept for reuse by any topic (in `<root>/.spare`), instead of
    /// deleted: a new segment then overwrites blocks the file system has already allocated, so
    /// the sync of an append writes the data alone and never waits for a journal commit (which
    /// is shared with every other file being written). Each holds up to `segment_bytes_max`.
    pub spare_segments: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            segment_bytes_max: 128 << 20,
            record_bytes_max: 256 << 20,
            queue_max: 4096,
            group_bytes_max: 64 << 20,
            spare_segments: 4,
        }
    }
}

/// A record read back from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// Sizes of a topic, for metrics.
#[derive(Debug, Clone, Default)]
pub struct TopicStats {
    pub first_seq: u64,
    pub next_seq: u64,
    pub segments: usize,
    pub bytes: u64,
    /// Segments of this topic started since the process began in a reused file (embedded
    /// log only).
    pub segments_reused: u64,
}

/// Consumed segment files kept for reuse (`<root>/.spare`), which no topic's figures count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpareStats {
    pub segments: usize,
    pub bytes: u64,
}

struct AppendReq {
    topic: Arc<TopicInner>,
    payload: Vec<u8>,
    reply: oneshot::Sender<Result<u64>>,
}

/// An embedded log rooted in one directory.
#[derive(Clone)]
pub struct Log {
    inner: Arc<LogInner>,
}

struct LogInner {
    root: PathBuf,
    opts: LogOptions,
    topics: Mutex<HashMap<String, Arc<TopicInner>>>,
    tx: mpsc::Sender<AppendReq>,
    spares: Arc<Spares>,
}

/// Consumed segment files waiting to be reused, in one folder of the log's root.
struct Spares {
    dir: PathBuf,
    /// The files, and the number the next one is named by.
    pool: Mutex<(Vec<PathBuf>, u64)>,
    max: usize,
}

impl Spares {
    fn open(root: &Path, max: usize) -> Result<Self> {
        let dir = root.join(".spare");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut files = Vec::new();
        let mut next = 0;
        for e in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let name = e.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".spare")?.parse::<u64>().ok())
            else {
                continue;
            };
            next = next.max(n + 1);
            files.push(e.path());
        }
        Ok(Self {
            dir,
            pool: Mutex::new((files, next)),
            max,
        })
    }

    fn take(&self) -> Option<PathBuf> {
        lock(&self.pool).0.pop()
    }

    /// The files in the pool and their bytes. The files are looked at after the lock is let go:
    /// a roll on the log writer's thread takes it too.
    fn stats(&self) -> SpareStats {
        let files = lock(&self.pool).0.clone();
        SpareStats {
            segments: files.len(),
            bytes: files
                .iter()
                .filter_map(|p| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum(),
        }
    }

    /// Moves a consumed segment into the pool if it has room, or deletes it. Returns whether
    /// it was kept (then the pool's folder needs a sync too).
    fn give(&self, path: &Path) -> Result<bool> {
        let mut pool = lock(&self.pool);
        let (files, next) = &mut *pool;
        if files.len() < self.max {
            let to = self.dir.join(format!("{next:020}.spare"));
            *next += 1;
            if std::fs::rename(path, &to).is_ok() {
                files.push(to);
                return Ok(true);
            }
        }
        drop(pool);
        std::fs::remove_file(path).map_err(io_err(path))?;
        Ok(false)
    }
}

#[derive(Debug, Clone)]
struct SegInfo {
    base: u64,
    /// Durable bytes in the file, header included.
    len: u64,
}

struct Active {
    file: File,
    base: u64,
    /// The segment's salt (`None`: a segment of the first format, recovered at open).
    salt: Option<u64>,
    len: u64,
    next_seq: u64,
    buf: Vec<u8>,
}

struct TopicInner {
    name: String,
    dir: PathBuf,
    opts: LogOptions,
    spares: Arc<Spares>,
    segments: Mutex<Vec<SegInfo>>,
    active: Mutex<Active>,
    durable: watch::Sender<u64>,
    offsets: Mutex<HashMap<String, u64>>,
    poisoned: AtomicBool,
    /// Segments started in a reused file.
    reused: AtomicU64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind, never a broken
    // invariant on disk, so the data is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_string()))
    }
}

impl Log {
    /// Opens (creating if needed) the log rooted at `root` and starts its writer thread.
    pub fn open(root: impl AsRef<Path>, opts: LogOptions) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        std::fs::create_dir_all(&root).map_err(io_err(&root))?;
        let (tx, rx) = mpsc::channel(opts.queue_max.max(1));
        let group_bytes_max = opts.group_bytes_max;
        let spares = Arc::new(Spares::open(&root, opts.spare_segments)?);
        std::thread::Builder::new()
            .name("tarn-log-writer".into())
            .spawn(move || writer_loop(rx, group_bytes_max))
            .map_err(io_err(&root))?;
        Ok(Self {
            inner: Arc::new(LogInner {
                root,
                opts,
                topics: Mutex::new(HashMap::new()),
                tx,
                spares,
            }),
        })
    }

    /// Opens (creating or recovering) a topic.
    pub fn topic(&self, name: &str) -> Result<Topic> {
        check_name(name)?;
        let mut topics = lock(&self.inner.topics);
        if let Some(t) = topics.get(name) {
            return Ok(Topic {
                inner: t.clone(),
                tx: self.inner.tx.clone(),
            });
        }
        let t = Arc::new(open_topic(
            &self.inner.root,
            name,
            &self.inner.opts,
            &self.inner.spares,
        )?);
        topics.insert(name.to_string(), t.clone());
        Ok(Topic {
            inner: t,
            tx: self.inner.tx.clone(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The consumed segment files kept for reuse now.
    pub fn spares(&self) -> SpareStats {
        self.inner.spares.stats()
    }

    pub fn record_bytes_max(&self) -> usize {
        self.inner.opts.record_bytes_max
    }

    /// Names of the topics that exist on disk.
    pub fn topic_names(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.inner.root).map_err(io_err(&self.inner.root))? {
            let e = e.map_err(io_err(&self.inner.root))?;
            if e.path().is_dir()
                && let Some(n) = e.file_name().to_str()
                && check_name(n).is_ok()
            {
                out.push(n.to_string());
            }
        }
        out.sort();
        Ok(out)
    }
}

fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut bases = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(".seg")
            && let Ok(base) = stem.parse::<u64>()
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Creates the segment starting at `base`: a spare file when the pool has one (its header
/// rewritten and synced before it takes the segment's name), else a new file. Says whether
/// the file was a spare.
fn create_segment(dir: &Path, base: u64, spares: &Spares) -> Result<(File, Header, bool)> {
    let path = segment::segment_path(dir, base);
    let header = Header::new(base);
    let bytes = segment::encode_header(&header);
    if let Some(spare) = spares.take() {
        let reuse = || -> std::io::Result<File> {
            let f = OpenOptions::new().read(true).write(true).open(&spare)?;
            f.write_all_at(&bytes, 0)?;
            f.sync_data()?;
            std::fs::rename(&spare, &path)?;
            Ok(f)
        };
        match reuse() {
            Ok(f) => {
                sync_dir(dir)?;
                return Ok((f, header, true));
            }
            Err(e) => {
                tracing::warn!(spare = %spare.display(), error = %e, "could not reuse a spare log segment; creating a new one");
                let _ = std::fs::remove_file(&spare);
            }
        }
    }
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .read(true)
        .open(&path)
        .map_err(io_err(&path))?;
    f.write_all_at(&bytes, 0).map_err(io_err(&path))?;
    f.sync_all().map_err(io_err(&path))?;
    sync_dir(dir)?;
    Ok((f, header, false))
}

fn open_topic(root: &Path, name: &str, opts: &LogOptions, spares: &Arc<Spares>) -> Result<TopicInner> {
    let dir = root.join(name);
    let offsets_dir = dir.join("offsets");
    std::fs::create_dir_all(&offsets_dir).map_err(io_err(&offsets_dir))?;
    let mut bases = list_segments(&dir)?;
    let fresh = bases.is_empty();
    if fresh {
        bases.push(0);
    }
    // A new segment holds no record, so it is not recovered (which would cut a reused file's
    // old bytes, and with them the blocks already allocated).
    let mut reused = 0;
    let mut start = |base: u64| -> Result<segment::Recovered> {
        let (_, header, spare) = create_segment(&dir, base, spares)?;
        reused += u64::from(spare);
        Ok(segment::Recovered {
            header,
            valid_len: header.len,
            next_seq: base,
        })
    };
    let mut segments = Vec::with_capacity(bases.len());
    for (i, base) in bases.iter().enumerate() {
        let path = segment::segment_path(&dir, *base);
        if i + 1 == bases.len() {
            continue;
        }
        let len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
        segments.push(SegInfo { base: *base, len });
    }
    let last = *bases.last().unwrap_or(&0);
    let last_path = segment::segment_path(&dir, last);
    let recovered = if fresh {
        start(0)
    } else {
        segment::recover(&last_path, opts.record_bytes_max)
    };
    let rec = match recovered {
        Ok(r) => r,
        Err(Error::Corrupt { offset: 0, .. })
            if std::fs::metadata(&last_path).map_err(io_err(&last_path))?.len() < segment::HEADER_LEN =>
        {
            // The header itself is short: the segment was being created when the process died,
            // so it holds no record. Start it again. A full-length header that fails its check
            // is real damage and stays an error.
            tracing::warn!(path = %last_path.display(), "rewriting torn segment header");
            start(last)?
        }
        Err(e) => return Err(e),
    };
    segments.push(SegInfo {
        base: last,
        len: rec.valid_len,
    });
    // Written at explicit offsets: a reused file holds older bytes past the records.
    let file = OpenOptions::new()
        .write(true)
        .open(&last_path)
        .map_err(io_err(&last_path))?;
    let mut offsets = HashMap::new();
    for e in std::fs::read_dir(&offsets_dir).map_err(io_err(&offsets_dir))? {
        let e = e.map_err(io_err(&offsets_dir))?;
        let Some(group) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if group.ends_with(".tmp") || check_name(&group).is_err() {
            continue;
        }
        offsets.insert(group, read_offset(&e.path())?);
    }
    let (durable, _) = watch::channel(rec.next_seq);
    Ok(TopicInner {
        name: name.to_string(),
        dir,
        opts: opts.clone(),
        spares: spares.clone(),
        segments: Mutex::new(segments),
        active: Mutex::new(Active {
            file,
            base: last,
            salt: rec.header.salt,
            len: rec.valid_len,
            next_seq: rec.next_seq,
            buf: Vec::new(),
        }),
        durable,
        offsets: Mutex::new(offsets),
        poisoned: AtomicBool::new(false),
        reused: AtomicU64::new(reused),
    })
}

fn read_offset(path: &Path) -> Result<u64> {
    let b = std::fs::read(path).map_err(io_err(path))?;
    if b.len() != 12 {
        return Err(Error::Corrupt {
            path: path.into(),
            offset: 0,
            reason: format!("offset file has {} bytes, expected 12", b.len()),
        });
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[..8]);
    let crc = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if crc != crc32c::crc32c(&v) {
        return Err(Error::Corrupt {
            path: path.into(),
            offset: 0,
            reason: "offset checksum mismatch".into(),
        });
    }
    Ok(u64::from_le_bytes(v))
}

fn write_offset(dir: &Path, group: &str, next: u64) -> Result<()> {
    let path = dir.join(group);
    let tmp = dir.join(format!("{group}.tmp"));
    let mut b = next.to_le_bytes().to_vec();
    b.extend_from_slice(&crc32c::crc32c(&next.to_le_bytes()).to_le_bytes());
    {
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&b).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)
}

/// Drains append requests, writes them, syncs once per touched topic, then answers.
fn writer_loop(mut rx: mpsc::Receiver<AppendReq>, group_bytes_max: usize) {
    while let Some(first) = rx.blocking_recv() {
        let mut bytes = first.payload.len();
        let mut batch = vec![first];
        while bytes < group_bytes_max {
            match rx.try_recv() {
                Ok(r) => {
                    bytes += r.payload.len();
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
        commit_round(batch);
    }
}

fn commit_round(batch: Vec<AppendReq>) {
    let mut touched: Vec<Arc<TopicInner>> = Vec::new();
    let mut results: Vec<Result<u64>> = Vec::with_capacity(batch.len());
    // Encode every record into its topic's buffer, rolling segments as needed.
    for req in &batch {
        let t = &req.topic;
        if t.poisoned.load(Ordering::SeqCst) {
            results.push(Err(Error::Closed(format!(
                "topic {} stopped after an io error; restart tarn",
                t.name
            ))));
            continue;
        }
        let mut a = lock(&t.active);
        let pending = a.buf.len() as u64;
        let full = a.len + pending > segment::HEADER_LEN
            && a.len + pending + req.payload.len() as u64 > t.opts.segment_bytes_max;
        if full && let Err(e) = roll(t, &mut a) {
            t.poisoned.store(true, Ordering::SeqCst);
            results.push(Err(e));
            continue;
        }
        let seq = a.next_seq;
        a.next_seq += 1;
        let h = segment::encode_record_header(a.salt, seq, &req.payload);
        a.buf.extend_from_slice(&h);
        a.buf.extend_from_slice(&req.payload);
        results.push(Ok(seq));
        if !touched.iter().any(|x| Arc::ptr_eq(x, t)) {
            touched.push(t.clone());
        }
    }
    // Answer what needs no sync (appends refused above) at once.
    let mut waiting: Vec<(AppendReq, u64)> = Vec::with_capacity(batch.len());
    for (req, res) in batch.into_iter().zip(results) {
        match res {
            Ok(seq) => waiting.push((req, seq)),
            Err(e) => {
                let _ = req.reply.send(Err(e));
            }
        }
    }
    // Write and sync each touched topic once, the topic with the most appends waiting first,
    // and answer a topic's appends as soon as its own sync is done: a round that also carries
    // a notification of delivery's does not make the producers wait for that second sync.
    touched.sort_by_key(|t| std::cmp::Reverse(waiting.iter().filter(|(r, _)| Arc::ptr_eq(&r.topic, t)).count()));
    for t in &touched {
        let res = {
            let mut a = lock(&t.active);
            flush_active(t, &mut a)
        };
        if let Err(e) = &res {
            tracing::error!(topic = %t.name, error = %e, "log write failed; topic stops accepting appends");
            t.poisoned.store(true, Ordering::SeqCst);
        }
        // Only what the syncs made durable is acknowledged: a record buffered before a roll
        // whose own flush failed is not in the file, even when this last flush had nothing
        // left to write.
        let durable = *t.durable.borrow();
        let (mine, rest): (Vec<_>, Vec<_>) = waiting.into_iter().partition(|(r, _)| Arc::ptr_eq(&r.topic, t));
        waiting = rest;
        for (req, seq) in mine {
            let _ = req.reply.send(if res.is_ok() && seq < durable {
                Ok(seq)
            } else {
                Err(Error::Closed(format!("write to topic {} failed", t.name)))
            });
        }
    }
}

/// Writes the buffered records of a topic, syncs, and publishes the new durable end.
fn flush_active(t: &TopicInner, a: &mut Active) -> Result<()> {
    if a.buf.is_empty() {
        return Ok(());
    }
    let path = segment::segment_path(&t.dir, a.base);
    let buf = std::mem::take(&mut a.buf);
    a.file.write_all_at(&buf, a.len).map_err(io_err(&path))?;
    a.file.sync_data().map_err(io_err(&path))?;
    a.len += buf.len() as u64;
    {
        let mut segs = lock(&t.segments);
        if let Some(last) = segs.last_mut()
            && last.base == a.base
        {
            last.len = a.len;
        }
    }
    // Every record given a sequence so far is in `buf`, so all of them are durable now.
    t.durable.send_replace(a.next_seq);
    // Keep the buffer for the next round unless a large round grew it: with many topics, one
    // big burst each must not pin its size in memory for good.
    if buf.capacity() <= 4 << 20 {
        a.buf = buf;
        a.buf.clear();
    }
    Ok(())
}

/// Closes the active segment and starts a new one at the next sequence.
fn roll(t: &TopicInner, a: &mut Active) -> Result<()> {
    flush_active(t, a)?;
    // A closed segment ends at its last record (its length is read back as such after a
    // restart): cut a reused file's older bytes before the next segment exists.
    let path = segment::segment_path(&t.dir, a.base);
    if a.file.metadata().map_err(io_err(&path))?.len() > a.len {
        a.file.set_len(a.len).map_err(io_err(&path))?;
        a.file.sync_all().map_err(io_err(&path))?;
    }
    let base = a.next_seq;
    let (file, header, spare) = create_segment(&t.dir, base, &t.spares)?;
    t.reused.fetch_add(u64::from(spare), Ordering::Relaxed);
    a.file = file;
    a.base = base;
    a.salt = header.salt;
    a.len = header.len;
    lock(&t.segments).push(SegInfo { base, len: header.len });
    Ok(())
}

/// A handle on one topic.
#[derive(Clone)]
pub struct Topic {
    inner: Arc<TopicInner>,
    tx: mpsc::Sender<AppendReq>,
}

impl Topic {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Appends one record; returns its sequence once it is durable.
    pub async fn append(&self, payload: Vec<u8>) -> Result<u64> {
        if payload.len() > self.inner.opts.record_bytes_max {
            return Err(Error::TooLarge {
                size: payload.len(),
                max: self.inner.opts.record_bytes_max,
            });
        }
        let (reply, rx) = oneshot::channel();
        let req = AppendReq {
            topic: self.inner.clone(),
            payload,
            reply,
        };
        self.tx.try_send(req).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Overloaded(self.inner.opts.queue_max),
            mpsc::error::TrySendError::Closed(_) => Error::Closed("writer thread is gone".into()),
        })?;
        rx.await
            .map_err(|_| Error::Closed("writer dropped the request".into()))?
    }

    /// The sequence the next append will get, among durable records.
    pub fn durable_end(&self) -> u64 {
        *self.inner.durable.borrow()
    }

    /// A cursor reading from `seq`.
    pub fn cursor(&self, seq: u64) -> Cursor {
        Cursor {
            topic: self.inner.clone(),
            next_seq: seq,
            reader: None,
        }
    }

    /// Registers a consumer group, starting it at the first record still in the log, unless it
    /// already has an offset. Returns its offset.
    pub fn register_group(&self, group: &str) -> Result<u64> {
        check_name(group)?;
        let mut offs = lock(&self.inner.offsets);
        if let Some(o) = offs.get(group) {
            return Ok(*o);
        }
        let first = lock(&self.inner.segments).first().map(|s| s.base).unwrap_or(0);
        write_offset(&self.inner.dir.join("offsets"), group, first)?;
        offs.insert(group.to_string(), first);
        Ok(first)
    }

    /// The committed offset of a group: the next sequence it has not processed.
    pub fn committed(&self, group: &str) -> Option<u64> {
        lock(&self.inner.offsets).get(group).copied()
    }

    /// Durably records that `group` has processed every record before `next`.
    pub fn commit(&self, group: &str, next: u64) -> Result<()> {
        check_name(group)?;
        let mut offs = lock(&self.inner.offsets);
        write_offset(&self.inner.dir.join("offsets"), group, next)?;
        offs.insert(group.to_string(), next);
        Ok(())
    }

    /// Deletes segments whose every record all registered groups have committed past.
    /// Returns how many segments were removed.
    pub fn apply_retention(&self) -> Result<usize> {
        let min = {
            let offs = lock(&self.inner.offsets);
            match offs.values().min() {
                Some(m) => *m,
                None => return Ok(0),
            }
        };
        // Segments leave the list under the lock, and the files go after it is released: the
        // writer takes this lock after every fsync, and a directory sync under load can take
        // long enough to stall every acknowledgement behind it.
        let doomed: Vec<u64> = {
            let mut segs = lock(&self.inner.segments);
            let mut out = Vec::new();
            while segs.len() > 1 && segs[1].base <= min {
                out.push(segs.remove(0).base);
            }
            out
        };
        let mut kept = false;
        for base in &doomed {
            let path = segment::segment_path(&self.inner.dir, *base);
            kept |= self.inner.spares.give(&path)?;
        }
        if !doomed.is_empty() {
            sync_dir(&self.inner.dir)?;
        }
        if kept {
            sync_dir(&self.inner.spares.dir)?;
        }
        Ok(doomed.len())
    }

    pub fn stats(&self) -> TopicStats {
        let segs = lock(&self.inner.segments);
        TopicStats {
            first_seq: segs.first().map(|s| s.base).unwrap_or(0),
            next_seq: self.durable_end(),
            segments: segs.len(),
            bytes: segs.iter().map(|s| s.len).sum(),
            segments_reused: self.inner.reused.load(Ordering::Relaxed),
        }
    }
}

/// Reads records in order from a starting sequence, never past the durable end.
pub struct Cursor {
    topic: Arc<TopicInner>,
    next_seq: u64,
    reader: Option<SegmentReader>,
}

impl Cursor {
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Reads durable records until about `bytes_max` payload bytes (at least one record when
    /// any is there). Blocking file IO: call from a blocking thread for large reads.
    pub fn read(&mut self, bytes_max: usize) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let record_max = self.topic.opts.record_bytes_max;
        while bytes < bytes_max {
            let durable = *self.topic.durable.borrow();
            if self.next_seq >= durable {
                break;
            }
            let segs = lock(&self.topic.segments).clone();
            let Some(first) = segs.first() else { break };
            if self.next_seq < first.base {
                return Err(Error::Truncated(self.next_seq));
            }
            let idx = segs.partition_point(|s| s.base <= self.next_seq) - 1;
            let seg = &segs[idx];
            let need_open = self.reader.as_ref().is_none_or(|r| r.base() != seg.base);
            if need_open {
                let path = segment::segment_path(&self.topic.dir, seg.base);
                self.reader = Some(SegmentReader::open(&path, seg.base)?);
            }
            let Some(r) = self.reader.as_mut() else { break };
            let step = if r.next_seq != self.next_seq {
                r.seek_to(self.next_seq, seg.len, record_max)
                    .and_then(|()| r.next(seg.len, record_max))
            } else {
                r.next(seg.len, record_max)
            };
            // A segment consumed by every group while this cursor (behind them all) was in
            // it may since have been reused: its file no longer holds these records.
            let step = match step {
                Err(Error::Corrupt { .. }) if lock(&self.topic.segments).first().is_none_or(|f| f.base > seg.base) => {
                    self.reader = None;
                    return Err(Error::Truncated(self.next_seq));
                }
                s => s?,
            };
            match step {
                Some((seq, payload)) => {
                    bytes += payload.len();
                    self.next_seq = seq + 1;
                    out.push(Record { seq, payload });
                }
                None => {
                    if idx + 1 < segs.len() && r.next_seq == segs[idx + 1].base {
                        self.reader = None;
                        continue;
                    }
                    break;
                }
            }
        }
        Ok(out)
    }

    /// `read` on a blocking thread, for async consumers: the cursor comes back with the
    /// records (and is lost only if the task itself fails).
    pub async fn read_off_thread(mut self, bytes_max: usize) -> Result<(Cursor, Vec<Record>)> {
        let (c, r) = tokio::task::spawn_blocking(move || {
            let r = self.read(bytes_max);
            (self, r)
        })
        .await
        .map_err(|e| Error::Reader(e.to_string()))?;
        Ok((c, r?))
    }

    /// Waits until a record at the cursor's position is durable.
    pub async fn wait(&self) {
        let mut rx = self.topic.durable.subscribe();
        let at = self.next_seq;
        let _ = rx.wait_for(|end| *end > at).await;
    }
}

#[cfg(test)]
mod tests;
