//! The stream as the rest of tarn sees it: one `Log`, `Topic` and `Cursor` over either
//! backend, the embedded log or NATS JetStream, with the same semantics.

use std::path::Path;

use crate::embedded::{self, LogOptions, Record, TopicStats};
use crate::nats::{self, NatsOptions};
use crate::{Error, Result};

/// A stream of topics: the embedded log in a directory, or NATS JetStream.
#[derive(Clone)]
pub struct Log(pub(crate) LogKind);

#[derive(Clone)]
pub(crate) enum LogKind {
    Embedded(embedded::Log),
    Nats(nats::NatsLog),
}

impl Log {
    /// Opens (creating if needed) the embedded log rooted at `root`.
    pub fn open(root: impl AsRef<Path>, opts: LogOptions) -> Result<Self> {
        Ok(Self(LogKind::Embedded(embedded::Log::open(root, opts)?)))
    }

    /// Connects to a NATS server with JetStream (`nats://host:port`).
    pub async fn connect_nats(server: &str, opts: NatsOptions) -> Result<Self> {
        Ok(Self(LogKind::Nats(nats::NatsLog::connect(server, opts).await?)))
    }

    /// A handle on one topic (created on first use).
    pub fn topic(&self, name: &str) -> Result<Topic> {
        Ok(Topic(match &self.0 {
            LogKind::Embedded(l) => TopicKind::Embedded(l.topic(name)?),
            LogKind::Nats(l) => TopicKind::Nats(l.topic(name)?),
        }))
    }

    /// Names of the topics that exist.
    pub async fn topic_names(&self) -> Result<Vec<String>> {
        match &self.0 {
            LogKind::Embedded(l) => l.topic_names(),
            LogKind::Nats(l) => l.topic_names().await,
        }
    }

    /// The consumed segment files the embedded log keeps for reuse; `None` on NATS, whose
    /// server keeps its own files.
    pub fn spares(&self) -> Option<embedded::SpareStats> {
        match &self.0 {
            LogKind::Embedded(l) => Some(l.spares()),
            LogKind::Nats(_) => None,
        }
    }

    /// Largest payload one record may have.
    pub fn record_bytes_max(&self) -> usize {
        match &self.0 {
            LogKind::Embedded(l) => l.record_bytes_max(),
            LogKind::Nats(l) => l.record_bytes_max(),
        }
    }

    /// Sets how many bytes a topic may hold before appends are refused. The embedded log
    /// holds what its disk holds, so this applies to NATS only.
    pub async fn set_topic_bytes_max(&self, name: &str, bytes: u64) -> Result<()> {
        match &self.0 {
            LogKind::Embedded(_) => Ok(()),
            LogKind::Nats(l) => l.set_bytes_max(name, bytes).await,
        }
    }

    /// Takes or renews the lease `name` for `holder` for `ttl`; false while another holder
    /// has it. The embedded log belongs to one process: every lease is granted there.
    pub async fn lease(&self, name: &str, holder: &str, ttl: std::time::Duration) -> Result<bool> {
        match &self.0 {
            LogKind::Embedded(_) => Ok(true),
            LogKind::Nats(l) => l.lease(name, holder, ttl).await,
        }
    }

    /// Gives the lease `name` up if `holder` has it, so another process need not wait for it
    /// to expire.
    pub async fn release(&self, name: &str, holder: &str) -> Result<()> {
        match &self.0 {
            LogKind::Embedded(_) => Ok(()),
            LogKind::Nats(l) => l.release(name, holder).await,
        }
    }

    /// Adds `holder` to `group` for `ttl` (renewing it), or takes it out with `None`; returns
    /// the live members, sorted. On the embedded log the only member is the caller.
    pub async fn members(&self, group: &str, holder: &str, ttl: Option<std::time::Duration>) -> Result<Vec<String>> {
        match &self.0 {
            LogKind::Embedded(_) => Ok(ttl.map(|_| holder.to_string()).into_iter().collect()),
            LogKind::Nats(l) => l.members(group, holder, ttl).await,
        }
    }

    /// Whether several processes may share this stream (and so split its work by leases).
    pub fn shared(&self) -> bool {
        matches!(self.0, LogKind::Nats(_))
    }

    /// What this stream is, for the start-up line.
    pub fn describe(&self) -> String {
        match &self.0 {
            LogKind::Embedded(l) => format!("embedded log in {}", l.root().display()),
            LogKind::Nats(l) => l.describe(),
        }
    }
}

/// A handle on one topic.
#[derive(Clone)]
pub struct Topic(TopicKind);

#[derive(Clone)]
enum TopicKind {
    Embedded(embedded::Topic),
    Nats(nats::NatsTopic),
}

impl Topic {
    pub fn name(&self) -> &str {
        match &self.0 {
            TopicKind::Embedded(t) => t.name(),
            TopicKind::Nats(t) => t.name(),
        }
    }

    /// Appends one record; returns its sequence once it is durable.
    pub async fn append(&self, payload: Vec<u8>) -> Result<u64> {
        match &self.0 {
            TopicKind::Embedded(t) => t.append(payload).await,
            TopicKind::Nats(t) => t.append(payload).await,
        }
    }

    /// A cursor reading from `seq`.
    pub fn cursor(&self, seq: u64) -> Cursor {
        Cursor(match &self.0 {
            TopicKind::Embedded(t) => CursorKind::Embedded(t.cursor(seq)),
            TopicKind::Nats(t) => CursorKind::Nats(Box::new(t.cursor(seq))),
        })
    }

    /// Registers a consumer group, starting it at the first record still in the topic, unless
    /// it already has an offset. Returns its offset.
    pub async fn register_group(&self, group: &str) -> Result<u64> {
        match &self.0 {
            TopicKind::Embedded(t) => t.register_group(group),
            TopicKind::Nats(t) => t.register_group(group).await,
        }
    }

    /// The committed offset of a group: the next sequence it has not processed.
    pub async fn committed(&self, group: &str) -> Result<Option<u64>> {
        match &self.0 {
            TopicKind::Embedded(t) => Ok(t.committed(group)),
            TopicKind::Nats(t) => t.committed(group).await,
        }
    }

    /// Durably records that `group` has processed every record before `next`.
    pub async fn commit(&self, group: &str, next: u64) -> Result<()> {
        match &self.0 {
            TopicKind::Embedded(t) => t.commit(group, next),
            TopicKind::Nats(t) => t.commit(group, next).await,
        }
    }

    /// Removes records every registered group has committed past. Returns how many segments
    /// (embedded) or messages (NATS) went.
    pub async fn apply_retention(&self) -> Result<usize> {
        match &self.0 {
            TopicKind::Embedded(t) => t.apply_retention(),
            TopicKind::Nats(t) => t.apply_retention().await,
        }
    }

    pub async fn stats(&self) -> Result<TopicStats> {
        match &self.0 {
            TopicKind::Embedded(t) => Ok(t.stats()),
            TopicKind::Nats(t) => t.stats().await,
        }
    }
}

/// Reads records in order from a starting sequence, never past the durable end.
pub struct Cursor(CursorKind);

enum CursorKind {
    Embedded(embedded::Cursor),
    Nats(Box<nats::NatsCursor>),
}

impl Cursor {
    /// The sequence the next record read will have.
    pub fn next_seq(&self) -> u64 {
        match &self.0 {
            CursorKind::Embedded(c) => c.next_seq(),
            CursorKind::Nats(c) => c.next_seq(),
        }
    }

    /// Reads the records there are now, about `bytes_max` payload bytes at most (at least one
    /// record when any is there). The cursor comes back with them.
    pub async fn fetch(self, bytes_max: usize) -> Result<(Cursor, Vec<Record>)> {
        match self.0 {
            CursorKind::Embedded(c) => {
                let (c, r) = c.read_off_thread(bytes_max).await?;
                Ok((Cursor(CursorKind::Embedded(c)), r))
            }
            CursorKind::Nats(c) => {
                let (c, r) = c.fetch(bytes_max).await?;
                Ok((Cursor(CursorKind::Nats(Box::new(c))), r))
            }
        }
    }

    /// `fetch` without a runtime, for tests and tools over the embedded log (blocking file
    /// IO). NATS is read with `fetch` only.
    pub fn read(&mut self, bytes_max: usize) -> Result<Vec<Record>> {
        match &mut self.0 {
            CursorKind::Embedded(c) => c.read(bytes_max),
            CursorKind::Nats(_) => Err(Error::Stream("a NATS cursor reads with fetch".into())),
        }
    }

    /// Waits until a record at the cursor's position is there.
    pub async fn wait(&mut self) {
        match &mut self.0 {
            CursorKind::Embedded(c) => c.wait().await,
            CursorKind::Nats(c) => c.wait().await,
        }
    }
}
