//! The stream on NATS JetStream, with the embedded log's semantics.
//!
//! - A topic is one JetStream stream, `<namespace>-<topic with '.' as '-'>`, taking the one
//!   subject `<namespace>.<topic>`, file storage, the configured replicas, `discard: new` at
//!   its byte limit (a full stream refuses appends; it never drops an acknowledged record to
//!   make room) and an optional age limit. tarn creates it on first use and updates its
//!   limits when they change.
//! - `append` returns once JetStream has acknowledged the message, which it does after the
//!   message is stored on the stream's replicas. The sequence is JetStream's minus one, so
//!   that both backends count from 0.
//! - A consumer group is a named offset in the key-value bucket `<namespace>-offsets`
//!   (itself a replicated JetStream stream), key `<topic>/<group>`, value the next sequence the
//!   group has not processed; `<topic>/=groups` lists the topic's groups. Groups commit a position after a durable hand-off and may
//!   replay from it with other batch cuts, exactly like the embedded log's offsets; a
//!   JetStream durable consumer's acknowledgement and redelivery timers would fight that.
//! - Cursors read with ordered consumers from a start sequence. A cursor that finds its next
//!   sequence gone (the stream's age limit removed it) fails with `Truncated`.
//! - Retention: past the age and byte limits, records every group has committed past are
//!   purged (`apply_retention`), as the embedded log deletes consumed segments.
//! - A record is one message, so a record may be at most the server's `max_payload` less a
//!   margin for headers (`record_bytes_max`); writers split larger payloads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv, stream};
use futures::{FutureExt, StreamExt};
use tokio::sync::{OnceCell, Semaphore};

use crate::embedded::{Record, TopicStats, check_name, lock};
use crate::{Error, Result};

/// Room left under the server's `max_payload` for the message's protocol headers.
const HEADER_ROOM: usize = 4 << 10;

/// Bytes of messages an ordered consumer asks for in one pull (as a count of the largest
/// messages): with the client's refill at half a batch, a cursor holds at most about 1.5 times
/// this, whatever the server's `max_payload`.
const PULL_BYTES: usize = 32 << 20;

/// Longest a cursor's pull waits on the server before the client asks again.
const PULL_EXPIRES: Duration = Duration::from_secs(2);

/// How long reading every group's offset for retention may take before it gives up (the
/// next commit tries again).
const RETENTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Appends retried after a lost acknowledgement, with the same message id: JetStream drops the
/// copy if the first one was stored (within the stream's duplicate window).
const APPEND_TRIES: u32 = 3;

/// How often `apply_retention` looks at the groups' offsets, at most.
const RETENTION_EVERY: Duration = Duration::from_secs(5);

/// Settings of the NATS JetStream backend.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// Prefix of every stream, subject and bucket tarn creates, so that several tarn
    /// deployments (or tests) can share one NATS server.
    pub namespace: String,
    /// Replicas of each stream and of the offsets bucket (1, 3 or 5 on a cluster).
    pub replicas: usize,
    /// Records older than this are removed even if a group has not read them. `None` keeps
    /// every record until all groups have committed past it.
    pub max_age: Option<Duration>,
    /// Bytes a topic may hold before appends are refused, unless set per topic. `None` leaves
    /// it to the server's own storage limit (a server out of room refuses appends too). A
    /// stream's limit is reserved from the server's storage when the stream is made.
    pub bytes_max: Option<u64>,
    /// Appends waiting for JetStream's acknowledgement; past it `append` fails with
    /// `Overloaded`.
    pub inflight_max: usize,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            namespace: "tarn".into(),
            replicas: 1,
            max_age: None,
            bytes_max: None,
            inflight_max: 4096,
        }
    }
}

fn stream_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::Stream(format!("{what}: {e}"))
}

/// Checks a namespace: it becomes part of stream, subject and bucket names.
pub fn check_namespace(ns: &str) -> Result<()> {
    let ok = !ns.is_empty()
        && ns.len() <= 32
        && ns
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(format!(
            "{ns} (a NATS namespace is 1 to 32 of a-z, 0-9 and _)"
        )))
    }
}

#[derive(Clone)]
pub(crate) struct NatsLog {
    inner: Arc<Shared>,
}

struct Shared {
    /// The server's address without credentials, for messages.
    server: String,
    /// Message ids `<writer>-<n>`: unique per process, so a retried append is recognised.
    writer: u64,
    appended: std::sync::atomic::AtomicU64,
    opts: NatsOptions,
    js: jetstream::Context,
    offsets: kv::Store,
    inflight: Arc<Semaphore>,
    record_bytes_max: usize,
    topics: Mutex<HashMap<String, Arc<TopicInner>>>,
    /// Byte limits set per topic (from the dataset's size class).
    bytes_max: Mutex<HashMap<String, u64>>,
}

struct TopicInner {
    name: String,
    stream_name: String,
    subject: String,
    shared: Arc<Shared>,
    stream: OnceCell<stream::Stream>,
    retention: Mutex<Retention>,
    /// A byte limit below what the stream held, not yet applied.
    limit_deferred: std::sync::atomic::AtomicBool,
}

/// When retention last ran on a topic, and whether a run is waiting for the throttle.
#[derive(Default)]
struct Retention {
    at: Option<Instant>,
    scheduled: bool,
}

impl NatsLog {
    pub(crate) async fn connect(server: &str, opts: NatsOptions) -> Result<Self> {
        check_namespace(&opts.namespace)?;
        if !(1..=5).contains(&opts.replicas) {
            return Err(Error::Stream(format!(
                "{} replicas: JetStream keeps 1 to 5",
                opts.replicas
            )));
        }
        let shown = redact(server);
        let client = async_nats::ConnectOptions::new()
            .name("tarn")
            .connection_timeout(Duration::from_secs(5))
            .connect(server)
            .await
            .map_err(|e| stream_err(format!("cannot connect to NATS at {shown}"), e))?;
        let server = shown.as_str();
        let js = jetstream::new(client.clone());
        // The account's JetStream info, read raw: its typed form follows newer servers.
        let info = client
            .request("$JS.API.INFO", bytes::Bytes::new())
            .await
            .map_err(|e| stream_err(format!("JetStream is not available on {server}"), e))?;
        let info: serde_json::Value = serde_json::from_slice(&info.payload)
            .map_err(|e| stream_err(format!("JetStream is not available on {server}"), e))?;
        if let Some(err) = info.get("error") {
            return Err(Error::Stream(format!(
                "JetStream is not available on {server} (start nats-server with -js): {err}"
            )));
        }
        let bucket = format!("{}-offsets", opts.namespace);
        // The bucket's stream is made here, as a key-value bucket is laid out: the client's own
        // `create_key_value` first reads account details that servers before 2.10 lack.
        js.get_or_create_stream(stream::Config {
            name: offsets_stream(&opts.namespace),
            description: Some("tarn consumer group offsets".into()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            storage: stream::StorageType::File,
            num_replicas: opts.replicas,
            discard: stream::DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            ..Default::default()
        })
        .await
        .map_err(|e| stream_err(format!("creating the offsets bucket {bucket}"), e))?;
        let offsets = js
            .get_key_value(&bucket)
            .await
            .map_err(|e| stream_err(format!("opening the offsets bucket {bucket}"), e))?;
        let record_bytes_max = client.server_info().max_payload.saturating_sub(HEADER_ROOM);
        Ok(Self {
            inner: Arc::new(Shared {
                server: server.to_string(),
                writer: writer_id(),
                appended: std::sync::atomic::AtomicU64::new(0),
                inflight: Arc::new(Semaphore::new(opts.inflight_max.max(1))),
                opts,
                js,
                offsets,
                record_bytes_max,
                topics: Mutex::new(HashMap::new()),
                bytes_max: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "NATS JetStream at {} (namespace {}, {} replica(s))",
            self.inner.server, self.inner.opts.namespace, self.inner.opts.replicas
        )
    }

    pub(crate) fn record_bytes_max(&self) -> usize {
        self.inner.record_bytes_max
    }

    pub(crate) fn topic(&self, name: &str) -> Result<NatsTopic> {
        check_name(name)?;
        if name.contains('-') {
            return Err(Error::InvalidName(format!("{name} (on NATS a topic name has no '-')")));
        }
        let mut topics = lock(&self.inner.topics);
        let t = topics
            .entry(name.to_string())
            .or_insert_with(|| {
                let ns = &self.inner.opts.namespace;
                Arc::new(TopicInner {
                    name: name.to_string(),
                    stream_name: format!("{ns}-{}", name.replace('.', "-")),
                    subject: format!("{ns}.{name}"),
                    shared: self.inner.clone(),
                    stream: OnceCell::new(),
                    retention: Mutex::new(Retention::default()),
                    limit_deferred: std::sync::atomic::AtomicBool::new(false),
                })
            })
            .clone();
        Ok(NatsTopic { inner: t })
    }

    /// Sets the byte limit of one topic; applied to its stream now if it exists, or when it is
    /// created.
    pub(crate) async fn set_bytes_max(&self, name: &str, bytes: u64) -> Result<()> {
        let t = self.topic(name)?;
        lock(&self.inner.bytes_max).insert(name.to_string(), bytes);
        if t.inner.stream.initialized() {
            t.inner.reconcile().await?;
        }
        Ok(())
    }

    /// Takes or renews the lease `name` for `holder`; false when another holder has it.
    pub(crate) async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool> {
        check_name(name)?;
        let key = format!("=lease/{name}");
        swap(&self.inner.offsets, &key, |cur| {
            let v = crate::lease::take(cur, holder, ttl, crate::lease::now_ms());
            let held = v.is_some();
            (v, held)
        })
        .await
    }

    /// Gives the lease `name` up if `holder` has it.
    pub(crate) async fn release(&self, name: &str, holder: &str) -> Result<()> {
        check_name(name)?;
        let key = format!("=lease/{name}");
        swap(&self.inner.offsets, &key, |cur| {
            (crate::lease::give_up(cur, holder), ())
        })
        .await
    }

    /// Adds or renews `holder` in `group` (`ttl` given) or takes it out (`None`); returns the
    /// live members.
    pub(crate) async fn members(&self, group: &str, holder: &str, ttl: Option<Duration>) -> Result<Vec<String>> {
        check_name(group)?;
        let key = format!("=members/{group}");
        swap(&self.inner.offsets, &key, |cur| {
            crate::lease::members(cur, holder, ttl, crate::lease::now_ms())
        })
        .await
    }

    pub(crate) async fn topic_names(&self) -> Result<Vec<String>> {
        let prefix = format!("{}-", self.inner.opts.namespace);
        let mut names = self.inner.js.stream_names();
        let mut out = Vec::new();
        while let Some(n) = names.next().await {
            let n = n.map_err(|e| stream_err("listing streams", e))?;
            if n == offsets_stream(&self.inner.opts.namespace) {
                continue;
            }
            if let Some(rest) = n.strip_prefix(&prefix) {
                out.push(rest.replace('-', "."));
            }
        }
        out.sort();
        Ok(out)
    }
}

impl TopicInner {
    fn config(&self) -> stream::Config {
        let s = &self.shared;
        let bytes = lock(&s.bytes_max).get(&self.name).copied().or(s.opts.bytes_max);
        stream::Config {
            name: self.stream_name.clone(),
            description: Some(format!("tarn topic {}", self.name)),
            subjects: vec![self.subject.clone()],
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::New,
            max_bytes: bytes.map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
            max_age: s.opts.max_age.unwrap_or_default(),
            max_message_size: i32::try_from(s.record_bytes_max + HEADER_ROOM).unwrap_or(i32::MAX),
            storage: stream::StorageType::File,
            num_replicas: s.opts.replicas,
            duplicate_window: Duration::from_secs(120),
            allow_direct: true,
            ..Default::default()
        }
    }

    /// The stream, created or brought to the configured limits on first use.
    async fn stream(&self) -> Result<&stream::Stream> {
        self.stream
            .get_or_try_init(|| async {
                let want = self.config();
                let js = &self.shared.js;
                let s = js
                    .get_or_create_stream(want.clone())
                    .await
                    .map_err(|e| stream_err(format!("opening stream {}", want.name), e))?;
                self.reconcile_with(&s).await?;
                Ok(s)
            })
            .await
    }

    /// Brings an existing stream to the configured limits.
    async fn reconcile(&self) -> Result<()> {
        let s = self.stream().await?;
        self.reconcile_with(s).await
    }

    /// Brings `s` to the configured limits, but never a byte limit below what the stream holds:
    /// JetStream would delete records to fit, acknowledged or not. Such a limit waits until
    /// retention has made room (the next retention run tries again).
    async fn reconcile_with(&self, s: &stream::Stream) -> Result<()> {
        let mut want = self.config();
        let info = s
            .get_info()
            .await
            .map_err(|e| stream_err(format!("reading stream {}", want.name), e))?;
        let (have, held) = (&info.config, info.state.bytes);
        if want.max_bytes >= 0 && (want.max_bytes as u64) < held {
            let keep = if have.max_bytes < 0 {
                -1
            } else {
                have.max_bytes.max(held as i64)
            };
            tracing::warn!(
                stream = %want.name,
                wanted = want.max_bytes,
                held,
                "the stream holds more than its new byte limit; the limit waits until delivery has caught up"
            );
            want.max_bytes = keep;
            self.limit_deferred.store(true, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.limit_deferred.store(false, std::sync::atomic::Ordering::Relaxed);
        }
        let differs = have.max_bytes != want.max_bytes
            || have.max_age != want.max_age
            || have.num_replicas != want.num_replicas
            || have.subjects != want.subjects
            || have.discard != want.discard;
        if differs {
            self.shared
                .js
                .update_stream(&want)
                .await
                .map_err(|e| stream_err(format!("updating stream {}", want.name), e))?;
            tracing::info!(stream = %want.name, max_bytes = want.max_bytes, "stream limits updated");
        }
        Ok(())
    }

    fn offset_key(&self, group: &str) -> String {
        format!("{}/{group}", self.name)
    }

    async fn state(&self) -> Result<stream::State> {
        let info = self
            .stream()
            .await?
            .get_info()
            .await
            .map_err(|e| stream_err(format!("reading stream {}", self.stream_name), e))?;
        Ok(info.state)
    }
}

#[derive(Clone)]
pub(crate) struct NatsTopic {
    inner: Arc<TopicInner>,
}

impl NatsTopic {
    pub(crate) fn name(&self) -> &str {
        &self.inner.name
    }

    pub(crate) async fn append(&self, payload: Vec<u8>) -> Result<u64> {
        let s = &self.inner.shared;
        if payload.len() > s.record_bytes_max {
            return Err(Error::TooLarge {
                size: payload.len(),
                max: s.record_bytes_max,
            });
        }
        let _permit = s
            .inflight
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::Overloaded(s.opts.inflight_max))?;
        self.inner.stream().await?;
        let id = format!(
            "{:016x}-{}",
            s.writer,
            s.appended.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let payload = bytes::Bytes::from(payload);
        let mut tries = 0;
        loop {
            tries += 1;
            let msg = jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(&id);
            let res = async { s.js.send_publish(self.inner.subject.clone(), msg).await?.await }.await;
            match res {
                Ok(ack) => return Ok(ack.sequence.saturating_sub(1)),
                // The acknowledgement was lost, not necessarily the message: the same id again
                // is stored once.
                Err(e)
                    if tries < APPEND_TRIES
                        && matches!(
                            e.kind(),
                            jetstream::context::PublishErrorKind::TimedOut
                                | jetstream::context::PublishErrorKind::BrokenPipe
                        ) =>
                {
                    tracing::warn!(stream = %self.inner.stream_name, error = %e, "append not acknowledged; sending it again");
                }
                Err(e) => {
                    let e = publish_err(&self.inner.stream_name, e);
                    if matches!(e, Error::Full(_)) {
                        // Room comes from retention, which may be waiting for a commit.
                        self.schedule_retention();
                    }
                    return Err(e);
                }
            }
        }
    }

    pub(crate) fn cursor(&self, seq: u64) -> NatsCursor {
        NatsCursor {
            topic: self.inner.clone(),
            next_seq: seq,
            messages: None,
            peeked: None,
            failed: None,
        }
    }

    /// The group's offset, registering it at the first record still there if it has none.
    /// An offset past the stream's end means the stream was deleted or made again under the
    /// group: that is an error, never a silent skip.
    pub(crate) async fn register_group(&self, group: &str) -> Result<u64> {
        check_name(group)?;
        // Named in the topic's group list first: retention reads offsets by that list, and a
        // listed group without an offset yet holds every purge back.
        self.inner.list_group(group).await?;
        let state = self.inner.state().await?;
        let key = self.inner.offset_key(group);
        if let Some(o) = self.committed(group).await? {
            if o > state.last_sequence {
                return Err(Error::Stream(format!(
                    "group {key} is at sequence {o}, past the end of stream {} ({} records): the stream was deleted or made again; \
                     delete the offset key in bucket {}-offsets to start the group over",
                    self.inner.stream_name, state.last_sequence, self.inner.shared.opts.namespace
                )));
            }
            return Ok(o);
        }
        let first = state.first_sequence.saturating_sub(1);
        match self.inner.shared.offsets.create(&key, first.to_string().into()).await {
            Ok(_) => {
                // A purge that read the offsets just before this key existed may have gone past
                // `first`: a new group starts at the first record still there, so it follows.
                let now = self.inner.state().await?.first_sequence.saturating_sub(1);
                if now > first {
                    self.commit(group, now).await?;
                    return Ok(now);
                }
                Ok(first)
            }
            // Another process registered it first: its value stands.
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => self
                .committed(group)
                .await?
                .ok_or_else(|| stream_err(&key, "offset vanished")),
            Err(e) => Err(stream_err(format!("registering group {key}"), e)),
        }
    }

    pub(crate) async fn committed(&self, group: &str) -> Result<Option<u64>> {
        committed(&self.inner, group).await
    }

    pub(crate) async fn commit(&self, group: &str, next: u64) -> Result<()> {
        check_name(group)?;
        let key = self.inner.offset_key(group);
        self.inner
            .shared
            .offsets
            .put(&key, next.to_string().into())
            .await
            .map_err(|e| stream_err(format!("committing offset {key}"), e))?;
        Ok(())
    }

    /// Purges the records every group has committed past. It reads every group's offset, so
    /// it runs at most every few seconds per topic: a call within that time schedules one run
    /// at its end instead, so the last commit of a burst is never left unpurged. Returns how
    /// many messages went now.
    pub(crate) async fn apply_retention(&self) -> Result<usize> {
        if !self.inner.retention_due() {
            self.schedule_retention();
            return Ok(0);
        }
        retain(&self.inner).await
    }

    fn schedule_retention(&self) {
        let wait = {
            let mut r = lock(&self.inner.retention);
            if r.scheduled {
                return;
            }
            r.scheduled = true;
            r.at.map_or(Duration::ZERO, |t| RETENTION_EVERY.saturating_sub(t.elapsed()))
        };
        let inner = self.inner.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            lock(&inner.retention).scheduled = false;
            if inner.retention_due()
                && let Err(e) = retain(&inner).await
            {
                tracing::warn!(stream = %inner.stream_name, error = %e, "stream retention failed; the next commit tries again");
            }
        });
    }

    pub(crate) async fn stats(&self) -> Result<TopicStats> {
        let state = self.inner.state().await?;
        Ok(TopicStats {
            first_seq: state.first_sequence.saturating_sub(1),
            next_seq: state.last_sequence,
            segments: 0,
            bytes: state.bytes,
            segments_reused: 0,
        })
    }
}

impl TopicInner {
    /// Whether retention may run now; if so, the run is counted from now.
    fn retention_due(&self) -> bool {
        let mut r = lock(&self.retention);
        if r.at.is_some_and(|t| t.elapsed() < RETENTION_EVERY) {
            return false;
        }
        r.at = Some(Instant::now());
        true
    }
}

async fn committed(t: &TopicInner, group: &str) -> Result<Option<u64>> {
    let key = t.offset_key(group);
    let v = t
        .shared
        .offsets
        .get(&key)
        .await
        .map_err(|e| stream_err(format!("reading offset {key}"), e))?;
    v.map(|b| {
        std::str::from_utf8(&b)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| stream_err(&key, "offset is not a number"))
    })
    .transpose()
}

impl TopicInner {
    /// The key holding the names of the topic's groups (`=` is in no group name).
    fn groups_key(&self) -> String {
        format!("{}/=groups", self.name)
    }

    async fn groups(&self) -> Result<(Vec<String>, Option<u64>)> {
        let key = self.groups_key();
        let entry = self
            .shared
            .offsets
            .entry(&key)
            .await
            .map_err(|e| stream_err(format!("reading {key}"), e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let names: Vec<String> =
                    serde_json::from_slice(&e.value).map_err(|err| stream_err(format!("reading {key}"), err))?;
                Ok((names, Some(e.revision)))
            }
            Some(e) => Ok((Vec::new(), Some(e.revision))),
            None => Ok((Vec::new(), None)),
        }
    }

    /// Adds a group to the topic's list, once, safely against other processes doing the same.
    async fn list_group(&self, group: &str) -> Result<()> {
        let key = self.groups_key();
        swap(&self.shared.offsets, &key, |cur| {
            let mut names: Vec<String> = match cur.map(serde_json::from_slice).transpose() {
                Ok(names) => names.unwrap_or_default(),
                Err(e) => return (None, Err(stream_err(format!("reading {key}"), e))),
            };
            if names.iter().any(|n| n == group) {
                return (None, Ok(()));
            }
            names.push(group.to_string());
            match serde_json::to_vec(&names) {
                Ok(v) => (Some(v), Ok(())),
                Err(e) => (None, Err(stream_err(&key, e))),
            }
        })
        .await?
    }
}

/// One retention run: the slowest group's offset, the purge below it, then a byte limit that
/// had to wait for room.
async fn retain(t: &TopicInner) -> Result<usize> {
    let min = tokio::time::timeout(RETENTION_TIMEOUT, slowest_group(t))
        .await
        .map_err(|_| stream_err(format!("reading the offsets of {}", t.name), "timed out"))??;
    // Nothing below the slowest group, or nothing at all: JetStream reads a purge up to
    // sequence 1 (ours 0) as "purge everything", so it is never sent.
    let Some(min) = min.filter(|m| *m > 0) else {
        return Ok(0);
    };
    // JetStream removes every message below the given sequence: ours `min` is its `min + 1`.
    let r = t
        .stream()
        .await?
        .purge()
        .sequence(min + 1)
        .await
        .map_err(|e| stream_err(format!("purging stream {}", t.stream_name), e))?;
    if t.limit_deferred.load(std::sync::atomic::Ordering::Relaxed) {
        t.reconcile().await?;
    }
    Ok(usize::try_from(r.purged).unwrap_or(usize::MAX))
}

/// The lowest offset among the topic's groups, or `None` when there is nothing to purge by:
/// no group, or a listed group still registering (no offset yet). Groups are read by the
/// topic's list, never by listing the bucket's keys, which can miss a key being rewritten.
async fn slowest_group(t: &TopicInner) -> Result<Option<u64>> {
    let (names, _) = t.groups().await?;
    let mut min: Option<u64> = None;
    for group in &names {
        match committed(t, group).await? {
            Some(o) => min = Some(min.map_or(o, |m| m.min(o))),
            None => return Ok(None),
        }
    }
    Ok(min)
}

fn publish_err(stream: &str, e: jetstream::context::PublishError) -> Error {
    let text = e.to_string();
    // The stream at its byte limit refuses new messages (discard: new), as does a server or
    // account out of storage: the writer may try again once delivery has caught up and
    // retention has run.
    let full = ["maximum bytes", "maximum messages", "insufficient", "resource limits"];
    if full.iter().any(|f| text.contains(f)) {
        Error::Full(format!(
            "stream {stream} is at its size limit; retry when delivery has caught up ({text})"
        ))
    } else {
        Error::Stream(format!("appending to stream {stream}: {text}"))
    }
}

pub(crate) struct NatsCursor {
    topic: Arc<TopicInner>,
    next_seq: u64,
    messages: Option<consumer::pull::Ordered>,
    /// A record `wait` has taken from the consumer and `fetch` has not yet returned.
    peeked: Option<Record>,
    failed: Option<Error>,
}

impl NatsCursor {
    /// The sequence of the next record `fetch` returns.
    pub(crate) fn next_seq(&self) -> u64 {
        self.peeked.as_ref().map_or(self.next_seq, |r| r.seq)
    }

    async fn open(&mut self) -> Result<()> {
        if self.messages.is_some() {
            return Ok(());
        }
        let stream = self.topic.stream().await?;
        let batch = (PULL_BYTES / self.topic.shared.record_bytes_max.max(1)).clamp(4, 256);
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: self.next_seq + 1,
                },
                max_batch: batch as i64,
                // A pull waits at most this long on the server: the client's refill of an
                // ordered consumer was seen to wait out a whole pull (30 s by default) after a
                // burst, so that records sat in the stream for a minute. Short pulls bound it.
                max_expires: PULL_EXPIRES,
                ..Default::default()
            })
            .await
            .map_err(|e| stream_err(format!("reading stream {}", self.topic.stream_name), e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| stream_err(format!("reading stream {}", self.topic.stream_name), e))?;
        self.messages = Some(messages);
        Ok(())
    }

    /// Turns a message into the record at the cursor, or `None` for one before it (a
    /// consumer made again re-reads from the stream's start).
    fn accept(&mut self, m: jetstream::Message) -> Result<Option<Record>> {
        let js_seq = m
            .info()
            .map_err(|e| stream_err(format!("message of {}", self.topic.stream_name), e))?
            .stream_sequence;
        let seq = js_seq.saturating_sub(1);
        if seq < self.next_seq {
            return Ok(None);
        }
        if seq > self.next_seq {
            // Records are only ever removed from the front: by retention, below every group,
            // or by the age limit the operator set. Only the latter can remove records a
            // reader still needs; without one, a gap is an error.
            if self.topic.shared.opts.max_age.is_none() {
                self.messages = None;
                return Err(Error::Truncated(self.next_seq));
            }
            tracing::error!(
                stream = %self.topic.stream_name,
                from = self.next_seq,
                to = seq - 1,
                "records reached the stream's age limit before they were read; they are lost"
            );
        }
        self.next_seq = seq + 1;
        Ok(Some(Record {
            seq,
            payload: m.payload.to_vec(),
        }))
    }

    /// What a failed pull becomes: the consumer is made again from the cursor at the next read.
    fn lost(&mut self, e: impl std::fmt::Display) -> Error {
        self.messages = None;
        stream_err(format!("reading stream {}", self.topic.stream_name), e)
    }

    pub(crate) async fn fetch(mut self, bytes_max: usize) -> Result<(Self, Vec<Record>)> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        self.open().await?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        if let Some(r) = self.peeked.take() {
            bytes += r.payload.len();
            out.push(r);
        }
        while bytes < bytes_max {
            let Some(messages) = self.messages.as_mut() else { break };
            match messages.next().now_or_never() {
                Some(Some(Ok(m))) => {
                    if let Some(r) = self.accept(m)? {
                        bytes += r.payload.len();
                        out.push(r);
                    }
                }
                Some(Some(Err(e))) => return Err(self.lost(e)),
                Some(None) => return Err(self.lost("the consumer ended")),
                None => break,
            }
        }
        Ok((self, out))
    }

    /// Waits until a record at the cursor is there (or a read would fail).
    pub(crate) async fn wait(&mut self) {
        if self.peeked.is_some() || self.failed.is_some() {
            return;
        }
        if let Err(e) = self.open().await {
            self.failed = Some(e);
            return;
        }
        loop {
            let Some(messages) = self.messages.as_mut() else { return };
            let next = match messages.next().await {
                Some(Ok(m)) => self.accept(m),
                Some(Err(e)) => Err(self.lost(e)),
                None => Err(self.lost("the consumer ended")),
            };
            match next {
                Ok(Some(r)) => {
                    self.peeked = Some(r);
                    return;
                }
                Ok(None) => continue,
                Err(e) => {
                    self.failed = Some(e);
                    return;
                }
            }
        }
    }
}

/// Deletes every stream a namespace holds on a server, its offsets bucket included: all that
/// tarn kept there. Returns how many streams went.
pub async fn delete_namespace(server: &str, ns: &str) -> Result<usize> {
    check_namespace(ns)?;
    let shown = redact(server);
    let client = async_nats::connect(server)
        .await
        .map_err(|e| stream_err(format!("cannot connect to NATS at {shown}"), e))?;
    let js = jetstream::new(client);
    let mut names = js.stream_names();
    let mut doomed = Vec::new();
    while let Some(n) = names.next().await {
        let n = n.map_err(|e| stream_err("listing streams", e))?;
        if n.starts_with(&format!("{ns}-")) || n == offsets_stream(ns) {
            doomed.push(n);
        }
    }
    for n in &doomed {
        js.delete_stream(n)
            .await
            .map_err(|e| stream_err(format!("deleting stream {n}"), e))?;
    }
    Ok(doomed.len())
}

/// The offsets bucket's stream.
fn offsets_stream(ns: &str) -> String {
    format!("KV_{ns}-offsets")
}

/// A server address without its user and password, for messages and logs.
fn redact(server: &str) -> String {
    match server.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => server.to_string(),
        },
        None => server.to_string(),
    }
}

/// A random id for this process's appends.
fn writer_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Rewrites `key` of a bucket from its current value: `f` gives the new value
/// (`None`: leave the key as it is) and an answer. The write holds only if nobody wrote
/// the key in between; otherwise the key is read again and `f` asked again.
async fn swap<T>(kv: &kv::Store, key: &str, mut f: impl FnMut(Option<&[u8]>) -> (Option<Vec<u8>>, T)) -> Result<T> {
    for _ in 0..20 {
        let entry = kv
            .entry(key)
            .await
            .map_err(|e| stream_err(format!("reading {key}"), e))?;
        let (current, revision) = match &entry {
            Some(e) if e.operation == kv::Operation::Put => (Some(&e.value[..]), Some(e.revision)),
            Some(e) => (None, Some(e.revision)),
            None => (None, None),
        };
        let (value, answer) = f(current);
        let Some(value) = value else {
            return Ok(answer);
        };
        let done = match revision {
            Some(r) => kv
                .update(key, value.into(), r)
                .await
                .map(|_| ())
                .map_err(|e| (e.kind() == kv::UpdateErrorKind::WrongLastRevision, e.to_string())),
            None => kv
                .create(key, value.into())
                .await
                .map(|_| ())
                .map_err(|e| (e.kind() == kv::CreateErrorKind::AlreadyExists, e.to_string())),
        };
        match done {
            Ok(()) => return Ok(answer),
            Err((true, _)) => continue,
            Err((false, e)) => return Err(stream_err(format!("writing {key}"), e)),
        }
    }
    Err(stream_err(key, "the key kept changing under 20 tries"))
}

#[cfg(test)]
mod tests;
