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
//!   group has not processed. Groups commit a position after a durable hand-off and may
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

use crate::embedded::{Record, TopicStats, check_name};
use crate::{Error, Result};

/// Room left under the server's `max_payload` for the message's protocol headers.
const HEADER_ROOM: usize = 4 << 10;

/// Most messages an ordered consumer asks for in one pull; with `max_payload` at most 64 MiB
/// (NATS's own ceiling) this bounds what a cursor holds in memory.
const PULL_BATCH: i64 = 64;

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
    server: String,
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
    retention_at: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        let client = async_nats::ConnectOptions::new()
            .name("tarn")
            .connection_timeout(Duration::from_secs(5))
            .connect(server)
            .await
            .map_err(|e| stream_err(format!("cannot connect to NATS at {server}"), e))?;
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
            name: format!("KV_{bucket}"),
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
                    retention_at: Mutex::new(None),
                })
            })
            .clone();
        Ok(NatsTopic { inner: t })
    }

    /// Sets the byte limit of one topic; applied to its stream now if it exists, or when it is
    /// created.
    pub(crate) async fn set_bytes_max(&self, name: &str, bytes: u64) -> Result<()> {
        let t = self.topic(name)?;
        let changed = lock(&self.inner.bytes_max).insert(name.to_string(), bytes) != Some(bytes);
        if changed && t.inner.stream.initialized() {
            let cfg = t.inner.config();
            self.inner
                .js
                .update_stream(&cfg)
                .await
                .map_err(|e| stream_err(format!("updating stream {}", cfg.name), e))?;
        }
        Ok(())
    }

    pub(crate) async fn topic_names(&self) -> Result<Vec<String>> {
        let prefix = format!("{}-", self.inner.opts.namespace);
        let mut names = self.inner.js.stream_names();
        let mut out = Vec::new();
        while let Some(n) = names.next().await {
            let n = n.map_err(|e| stream_err("listing streams", e))?;
            if n == format!("KV_{}-offsets", self.inner.opts.namespace) {
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
                match js.get_stream(&want.name).await {
                    Ok(mut s) => {
                        let have = s
                            .info()
                            .await
                            .map_err(|e| stream_err(format!("reading stream {}", want.name), e))?
                            .config
                            .clone();
                        let differs = have.max_bytes != want.max_bytes
                            || have.max_age != want.max_age
                            || have.num_replicas != want.num_replicas
                            || have.subjects != want.subjects
                            || have.discard != want.discard;
                        if differs {
                            js.update_stream(&want)
                                .await
                                .map_err(|e| stream_err(format!("updating stream {}", want.name), e))?;
                            tracing::info!(stream = %want.name, "stream limits updated");
                        }
                        Ok(s)
                    }
                    Err(_) => js
                        .get_or_create_stream(want.clone())
                        .await
                        .map_err(|e| stream_err(format!("creating stream {}", want.name), e)),
                }
            })
            .await
    }

    fn offset_key(&self, group: &str) -> String {
        format!("{}/{group}", self.name)
    }

    async fn first_seq(&self) -> Result<u64> {
        let info = self
            .stream()
            .await?
            .get_info()
            .await
            .map_err(|e| stream_err(format!("reading stream {}", self.stream_name), e))?;
        Ok(info.state.first_sequence.saturating_sub(1))
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
        let ack =
            s.js.publish(self.inner.subject.clone(), payload.into())
                .await
                .map_err(|e| publish_err(&self.inner.stream_name, e))?
                .await
                .map_err(|e| publish_err(&self.inner.stream_name, e))?;
        Ok(ack.sequence.saturating_sub(1))
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

    pub(crate) async fn register_group(&self, group: &str) -> Result<u64> {
        check_name(group)?;
        if let Some(o) = self.committed(group).await? {
            return Ok(o);
        }
        let first = self.inner.first_seq().await?;
        let key = self.inner.offset_key(group);
        match self.inner.shared.offsets.create(&key, first.to_string().into()).await {
            Ok(_) => Ok(first),
            // Another process registered it first: its value stands.
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => self
                .committed(group)
                .await?
                .ok_or_else(|| stream_err(&key, "offset vanished")),
            Err(e) => Err(stream_err(format!("registering group {key}"), e)),
        }
    }

    pub(crate) async fn committed(&self, group: &str) -> Result<Option<u64>> {
        let key = self.inner.offset_key(group);
        let v = self
            .inner
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

    /// Purges the records every group has committed past (at most every few seconds, since it
    /// reads every group's offset). Returns how many messages went.
    pub(crate) async fn apply_retention(&self) -> Result<usize> {
        {
            let mut at = lock(&self.inner.retention_at);
            if at.is_some_and(|t| t.elapsed() < RETENTION_EVERY) {
                return Ok(0);
            }
            *at = Some(Instant::now());
        }
        let prefix = format!("{}/", self.inner.name);
        let offsets = &self.inner.shared.offsets;
        let mut keys = offsets.keys().await.map_err(|e| stream_err("listing offsets", e))?;
        let mut min: Option<u64> = None;
        while let Some(k) = keys.next().await {
            let k = k.map_err(|e| stream_err("listing offsets", e))?;
            let Some(group) = k.strip_prefix(&prefix) else { continue };
            if group.contains('/') {
                continue;
            }
            if let Some(o) = self.committed(group).await? {
                min = Some(min.map_or(o, |m| m.min(o)));
            }
        }
        let Some(min) = min else { return Ok(0) };
        let stream = self.inner.stream().await?;
        // JetStream removes every message below the given sequence: ours `min` is its `min + 1`.
        let r = stream
            .purge()
            .sequence(min + 1)
            .await
            .map_err(|e| stream_err(format!("purging stream {}", self.inner.stream_name), e))?;
        Ok(usize::try_from(r.purged).unwrap_or(usize::MAX))
    }

    pub(crate) async fn stats(&self) -> Result<TopicStats> {
        let info = self
            .inner
            .stream()
            .await?
            .get_info()
            .await
            .map_err(|e| stream_err(format!("reading stream {}", self.inner.stream_name), e))?;
        Ok(TopicStats {
            first_seq: info.state.first_sequence.saturating_sub(1),
            next_seq: info.state.last_sequence,
            segments: 0,
            bytes: info.state.bytes,
        })
    }
}

fn publish_err(stream: &str, e: jetstream::context::PublishError) -> Error {
    let text = e.to_string();
    // The stream at its byte limit refuses new messages (discard: new): the writer may try
    // again once delivery has caught up and retention has run.
    if text.contains("maximum bytes") || text.contains("maximum messages") || text.contains("insufficient") {
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
    peeked: Option<Record>,
    failed: Option<Error>,
}

impl NatsCursor {
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    async fn open(&mut self) -> Result<()> {
        if self.messages.is_some() {
            return Ok(());
        }
        let stream = self.topic.stream().await?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: self.next_seq + 1,
                },
                max_batch: PULL_BATCH,
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

    /// Turns a message into the record at the cursor, or `None` for one before it.
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
            self.messages = None;
            return Err(Error::Truncated(self.next_seq));
        }
        self.next_seq = seq + 1;
        Ok(Some(Record {
            seq,
            payload: m.payload.to_vec(),
        }))
    }

    /// What a failed pull becomes: the consumer is recreated from the cursor at the next read.
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

#[cfg(test)]
mod tests;
