//! Streams: partitioned append-only logs with offsets, replay from any
//! point, consumer groups with committed offsets, and retention (as Kafka,
//! Redis Streams or JetStream streams), with no broker.
//!
//! ```no_run
//! # async fn example(node: mesh::Node) -> Result<(), Box<dyn std::error::Error>> {
//! use futures::StreamExt;
//! use mesh::stream::From;
//!
//! let readings = node.stream("sensors.readings")?;
//! let at = readings.append("sensor-7", "21.5").await?; // stored by its host
//! println!("partition {} offset {}", at.partition, at.offset);
//!
//! // Every record from the beginning, then live ones.
//! let mut all = readings.consume(From::Earliest);
//! while let Some(record) = all.next().await {
//!     let record = record?; // an error says retention passed our place
//!     println!("{} {:?}", record.offset(), record.payload());
//! }
//!
//! // A consumer group: partitions split among the group's live members,
//! // each resuming from the group's committed offsets.
//! let mut work = readings.group("averager")?.consume();
//! while let Some(record) = work.next().await {
//!     let record = record?;
//!     // ... process it ...
//!     record.commit();
//! }
//! # Ok(()) }
//! ```
//!
//! Where records live: on the *hosts* of the stream. Each host owns its own
//! partitions (4 by default, [`crate::Builder::stream_partitions`]), so an
//! append needs no coordination: a node configured to host the stream
//! ([`crate::Builder::host_streams`], [`crate::Builder::host_all`]; `mesh
//! node` hosts all) stores it, a node that does not hands it to a live
//! host (rendezvous hashing of the key over the hosts, so one key stays in
//! one partition while the hosts are stable), and with no host anywhere
//! the appender hosts its own partitions. A partition is named by its host
//! and number ([`PartitionId`]); records with the same key from the same
//! node land in the same partition. Hosts keep records in memory (durable
//! hosting comes with the SQLite store): a host that crashes takes its
//! records with it.
//!
//! Reading: a consumer reads every partition of every live host, in offset
//! order within each, and is sent records as fast as it takes them (credit:
//! at most [`ConsumeOptions::window`] records in flight per partition).
//! When its link to a host ends and comes back, it resumes where it was:
//! nothing skipped, nothing repeated.
//!
//! Consumer groups: members (any number per node) split the partitions by
//! rendezvous hashing over the members each node sees, with no
//! coordinator. Commits ([`Record::commit`], or auto-commit) are stored
//! with the partition's host; a partition that moves to another member
//! resumes there from the committed offset, so delivery is at least once.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use rustc_hash::FxHashMap;
use tokio::sync::oneshot;

pub use crate::core::stream::{Config as HostConfig, Retention};
use crate::{
    core::{
        stream::{NewRecord, Start},
        topic::Topic,
    },
    engine::{
        inbox::Inbox,
        streams::{AppendFailure, CommitBatch, Placed, StreamItem, StreamOp},
        work::Op,
    },
    node::Node,
    PeerId, TopicError,
};

/// A partition: the host that owns it and its number there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionId {
    /// The host.
    pub host: PeerId,
    /// Its number on the host.
    pub index: u32,
}

impl std::fmt::Display for PartitionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.host, self.index)
    }
}

/// Where an appended record was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordPos {
    /// Its partition.
    pub partition: PartitionId,
    /// Its offset there.
    pub offset: u64,
}

/// Where a consumer starts, in each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// The oldest record kept.
    Earliest,
    /// The next record appended (what was there before is skipped).
    Latest,
    /// This offset in every partition (if retention removed it, the first
    /// item is [`ReadError::OffsetGone`] and reading goes on from the
    /// oldest record kept).
    Offset(u64),
    /// The first record with a timestamp at or after this.
    Time(SystemTime),
}

impl From {
    fn start(self) -> Start {
        match self {
            From::Earliest => Start::Earliest,
            From::Latest => Start::Latest,
            From::Offset(o) => Start::Offset(o),
            From::Time(t) => Start::Time(unix_ms(t)),
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64)
        .unwrap_or(0)
}

/// Why an append failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// Nobody hosts the stream and this node may not (a one-shot tool).
    #[error("no live host for stream {0:?} (start a `mesh node`, or a node that hosts it)")]
    NoHost(String),
    /// The host is at its limit of bytes or streams.
    #[error("{0}")]
    Full(String),
    /// The host refused it.
    #[error("{0}")]
    Refused(String),
    /// Record and headers are over the frame limit.
    #[error("record of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// More headers than a message may carry ([`crate::wire::MAX_HEADERS`]).
    #[error("{count} headers exceed the limit of {limit} per message")]
    TooManyHeaders {
        /// How many were given.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The value could not be encoded.
    #[error("encoding failed: {0}")]
    Encode(String),
    /// The node is shut down.
    #[error("node is shut down")]
    Closed,
}

/// Why a consumer could not read something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// Retention removed offsets `requested..first` of a partition before
    /// they were read; reading goes on at `first`.
    #[error("offsets {requested}..{first} of partition {partition} were removed by retention; reading goes on at {first}")]
    OffsetGone {
        /// The partition.
        partition: PartitionId,
        /// The offset wanted.
        requested: u64,
        /// The oldest offset kept.
        first: u64,
    },
}

/// Why `info` or `lag` failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The node is shut down.
    #[error("node is shut down")]
    Closed,
}

/// Options of [`Stream::append_with`].
#[derive(Debug, Clone, Default)]
pub struct AppendOptions {
    /// Records with the same key go to the same partition (empty: any).
    pub key: Bytes,
    /// Event time (default: now, on the appending node's clock).
    pub timestamp: Option<SystemTime>,
    /// Headers.
    pub headers: Vec<(String, Bytes)>,
}

/// Options of [`Stream::consume_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumeOptions {
    /// Most records in flight per partition: sent by the host, not yet
    /// taken by the application (default 1,024, at most 65,536).
    pub window: u32,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        Self { window: 1024 }
    }
}

/// When a group consumer commits by itself; see [`GroupOptions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoCommit {
    /// After this many records processed.
    pub every: u32,
    /// Or when this much time passed since the last commit.
    pub interval: Duration,
}

impl Default for AutoCommit {
    fn default() -> Self {
        Self {
            every: 1000,
            interval: Duration::from_millis(500),
        }
    }
}

/// Where a group starts on a partition it never committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupStart {
    /// The oldest record kept (the default).
    #[default]
    Earliest,
    /// The next record appended.
    Latest,
}

/// Options of [`Group::consume_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupOptions {
    /// Where a partition starts when the group has no commit for it.
    pub start: GroupStart,
    /// Commit by itself (default: off; commit with [`Record::commit`]). A
    /// record counts as processed once the application asks for the next
    /// one, so nothing is committed before it is handled, as long as the
    /// application handles one record at a time: with combinators that
    /// take several before handling them (`chunks`, `ready_chunks`,
    /// `buffer_unordered`, `for_each_concurrent`), commit yourself.
    pub auto_commit: Option<AutoCommit>,
    /// Most records in flight per partition (default 1,024).
    pub window: u32,
}

impl Default for GroupOptions {
    fn default() -> Self {
        Self {
            start: GroupStart::Earliest,
            auto_commit: None,
            window: 1024,
        }
    }
}

/// A partition as [`Stream::info`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// The partition.
    pub partition: PartitionId,
    /// Offset of the oldest record kept.
    pub first: u64,
    /// Offset the next record will get (the last is `next - 1`).
    pub next: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Committed offsets, per group.
    pub committed: Vec<(String, u64)>,
}

impl PartitionInfo {
    /// Records held.
    pub fn records(&self) -> u64 {
        self.next.saturating_sub(self.first)
    }
}

/// A stream's partitions on its live hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// The stream.
    pub name: String,
    /// Its partitions, by host and number.
    pub partitions: Vec<PartitionInfo>,
    /// Hosts that did not answer in time (their partitions are not in
    /// `partitions`).
    pub missing: Vec<PeerId>,
}

/// How far a group is behind on one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// The partition.
    pub partition: PartitionId,
    /// The group's committed offset (`None`: never committed).
    pub committed: Option<u64>,
    /// The partition's next offset.
    pub next: u64,
    /// Records not yet committed (counting from the oldest kept when the
    /// group never committed).
    pub lag: u64,
}

/// A named stream; see [`Node::stream`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Stream {
    node: Node,
    name: Arc<str>,
}

impl Node {
    /// The stream `name` (dot-separated, like a topic, without wildcards).
    pub fn stream(&self, name: &str) -> Result<Stream, TopicError> {
        let t = Topic::new(name)?;
        crate::node::check_not_reserved(t.as_str())?;
        Ok(Stream {
            node: self.clone(),
            name: t.as_str().into(),
        })
    }
}

impl Stream {
    /// Now by the node's wall clock, in Unix milliseconds: the time a
    /// record without an event time is stamped with.
    fn now_ms(&self) -> u64 {
        self.node.inner.clock.unix_micros() / 1000
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Appends `payload` with `key` (empty: none); resolves once the
    /// record's host stored it, with where.
    pub async fn append(
        &self,
        key: impl Into<Bytes>,
        payload: impl Into<Bytes>,
    ) -> Result<RecordPos, AppendError> {
        self.append_with(
            payload,
            AppendOptions {
                key: key.into(),
                ..AppendOptions::default()
            },
        )
        .await
    }

    /// Appends a value encoded with postcard.
    pub async fn append_value<T: serde::Serialize>(
        &self,
        key: impl Into<Bytes>,
        value: &T,
    ) -> Result<RecordPos, AppendError> {
        let bytes = postcard::to_stdvec(value).map_err(|e| AppendError::Encode(e.to_string()))?;
        self.append(key, bytes).await
    }

    /// Appends with a key, an event time or headers.
    pub async fn append_with(
        &self,
        payload: impl Into<Bytes>,
        options: AppendOptions,
    ) -> Result<RecordPos, AppendError> {
        let record = NewRecord {
            key: options.key,
            timestamp_ms: options.timestamp.map_or_else(|| self.now_ms(), unix_ms),
            headers: options.headers,
            payload: payload.into(),
        };
        let mut placed = self.submit(vec![record], false).await?;
        placed
            .pop()
            .ok_or_else(|| AppendError::Refused("the host answered nothing".into()))
    }

    /// Appends many `(key, payload)` records in one hand-off to the node
    /// (the fast way at high rates); resolves once every record is stored,
    /// with their places in order, or with the first error (records before
    /// and after it may have been stored).
    pub async fn append_batch<I, K, P>(&self, records: I) -> Result<Vec<RecordPos>, AppendError>
    where
        I: IntoIterator<Item = (K, P)>,
        K: Into<Bytes>,
        P: Into<Bytes>,
    {
        let ts = self.now_ms();
        let records = records
            .into_iter()
            .map(|(k, p)| NewRecord {
                key: k.into(),
                timestamp_ms: ts,
                headers: Vec::new(),
                payload: p.into(),
            })
            .collect();
        self.submit(records, false).await
    }

    /// Appends many records, each with its own key, event time and
    /// headers, in one hand-off (as [`Stream::append_batch`]).
    pub async fn append_batch_with<I, P>(&self, records: I) -> Result<Vec<RecordPos>, AppendError>
    where
        I: IntoIterator<Item = (P, AppendOptions)>,
        P: Into<Bytes>,
    {
        self.submit(new_records(records, self.now_ms()), false)
            .await
    }

    /// [`Stream::append_batch_with`] for an outbox relay: confirmed only
    /// by a host that keeps the records, never by this node hosting them
    /// in memory (with no other host: `NoHost`, to retry later).
    #[cfg(feature = "sqlite")]
    pub(crate) async fn append_batch_durable<I, P>(
        &self,
        records: I,
    ) -> Result<Vec<RecordPos>, AppendError>
    where
        I: IntoIterator<Item = (P, AppendOptions)>,
        P: Into<Bytes>,
    {
        self.submit(new_records(records, self.now_ms()), true).await
    }

    async fn submit(
        &self,
        records: Vec<NewRecord>,
        durable: bool,
    ) -> Result<Vec<RecordPos>, AppendError> {
        let inner = &self.node.inner;
        for r in &records {
            let size = r.payload.len()
                + r.key.len()
                + self.name.len()
                + 128
                + r.headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 10)
                    .sum::<usize>();
            if size > inner.max_payload {
                return Err(AppendError::TooLarge {
                    size,
                    limit: inner.max_payload,
                });
            }
            crate::wire::check_header_count(&r.headers).map_err(|count| {
                AppendError::TooManyHeaders {
                    count,
                    limit: crate::wire::MAX_HEADERS,
                }
            })?;
        }
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let (tx, rx) = oneshot::channel();
        inner
            .work_bounded
            .push(Op::Stream(StreamOp::Append {
                stream: self.name.clone(),
                records,
                durable,
                reply: tx.into(),
            }))
            .await
            .map_err(|_| AppendError::Closed)?;
        let placed = rx.await.map_err(|_| AppendError::Closed)?;
        match placed {
            Ok(p) => Ok(p.into_iter().map(pos).collect()),
            Err(AppendFailure::NoHost) => Err(AppendError::NoHost(self.name.to_string())),
            Err(AppendFailure::Refused { full: true, reason }) => Err(AppendError::Full(reason)),
            Err(AppendFailure::Refused {
                full: false,
                reason,
            }) => Err(AppendError::Refused(reason)),
        }
    }

    /// Reads every partition of the stream from `from`, then live records:
    /// a [`futures::Stream`] of records, in offset order per partition.
    pub fn consume(&self, from: From) -> StreamConsumer {
        self.consume_with(from, ConsumeOptions::default())
    }

    /// [`Stream::consume`] with options.
    pub fn consume_with(&self, from: From, options: ConsumeOptions) -> StreamConsumer {
        StreamConsumer::start(
            &self.node,
            &self.name,
            None,
            from.start(),
            options.window,
            None,
        )
    }

    /// The stream's partitions on its live hosts, with offsets and the
    /// groups' commits.
    pub async fn info(&self) -> Result<StreamInfo, StreamError> {
        let (tx, rx) = oneshot::channel();
        self.node
            .inner
            .work_control
            .push_now(Op::Stream(StreamOp::Info {
                stream: self.name.clone(),
                reply: tx.into(),
            }))
            .map_err(|_| StreamError::Closed)?;
        let (hosts, mut missing) = rx.await.map_err(|_| StreamError::Closed)?;
        missing.sort();
        let mut partitions: Vec<PartitionInfo> = hosts
            .into_iter()
            .flat_map(|h| {
                h.parts.into_iter().map(move |p| PartitionInfo {
                    partition: PartitionId {
                        host: h.host,
                        index: p.index,
                    },
                    first: p.first,
                    next: p.next,
                    bytes: p.bytes,
                    committed: p
                        .committed
                        .into_iter()
                        .map(|(g, o)| (g.to_string(), o))
                        .collect(),
                })
            })
            .collect();
        partitions.sort_by_key(|a| a.partition);
        Ok(StreamInfo {
            name: self.name.to_string(),
            partitions,
            missing,
        })
    }

    /// The consumer group `name` of this stream (one word: letters,
    /// digits, `-` and `_`).
    pub fn group(&self, name: &str) -> Result<Group, TopicError> {
        let t = Topic::new(name)?;
        if name.contains('.') || name.len() > crate::core::stream::MAX_GROUP_LEN {
            return Err(TopicError::BadGroup {
                name: name.to_owned(),
            });
        }
        crate::node::check_not_reserved(t.as_str())?;
        Ok(Group {
            stream: self.clone(),
            name: t.as_str().into(),
        })
    }
}

fn pos(p: Placed) -> RecordPos {
    RecordPos {
        partition: PartitionId {
            host: p.host,
            index: p.index,
        },
        offset: p.offset,
    }
}

/// A consumer group of a stream; see [`Stream::group`].
#[derive(Debug, Clone)]
pub struct Group {
    stream: Stream,
    name: Arc<str>,
}

impl Group {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Joins the group: a stream of the records of the partitions this
    /// member is given, from the group's committed offsets. Commit with
    /// [`Record::commit`].
    pub fn consume(&self) -> StreamConsumer {
        self.consume_with(GroupOptions::default())
    }

    /// [`Group::consume`] with options.
    pub fn consume_with(&self, options: GroupOptions) -> StreamConsumer {
        let start = match options.start {
            GroupStart::Latest => Start::Latest,
            GroupStart::Earliest => Start::Earliest,
        };
        StreamConsumer::start(
            &self.stream.node,
            &self.stream.name,
            Some(self.name.clone()),
            start,
            options.window,
            options.auto_commit,
        )
    }

    /// Per partition of the stream: the group's committed offset and how
    /// many records it has not committed yet.
    pub async fn lag(&self) -> Result<Vec<PartitionLag>, StreamError> {
        let info = self.stream.info().await?;
        Ok(info
            .partitions
            .into_iter()
            .map(|p| {
                let committed = p
                    .committed
                    .iter()
                    .find(|(g, _)| *g == *self.name)
                    .map(|(_, o)| *o);
                let from = committed.unwrap_or(p.first).max(p.first);
                PartitionLag {
                    partition: p.partition,
                    committed,
                    next: p.next,
                    lag: p.next.saturating_sub(from),
                }
            })
            .collect())
    }
}

/// What a group record's commit needs. Commits gather here, the largest
/// per partition, and reach the node task in one hand-off per wake-up of
/// it (not one per record).
#[derive(Debug)]
struct Committer {
    node: Node,
    pending: Arc<CommitBatch>,
}

impl Committer {
    fn commit(&self, partition: PartitionId, epoch: u64, next: u64) {
        if self
            .pending
            .add(partition.host, epoch, partition.index, next)
        {
            let _ = self
                .node
                .inner
                .work_control
                .push_now(Op::Stream(StreamOp::Commits {
                    batch: self.pending.clone(),
                }));
        }
    }
}

/// A record of a stream.
#[derive(Debug, Clone)]
pub struct Record {
    partition: PartitionId,
    /// The host's run the record is of.
    epoch: u64,
    inner: crate::core::stream::Record,
    committer: Option<Arc<Committer>>,
}

impl Record {
    /// The run of its host the record is of (a host that restarts without
    /// its log starts a new one). Read by the inbox.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Its partition.
    pub fn partition(&self) -> PartitionId {
        self.partition
    }

    /// Its offset in the partition.
    pub fn offset(&self) -> u64 {
        self.inner.offset
    }

    /// Its key (empty: none).
    pub fn key(&self) -> &Bytes {
        &self.inner.key
    }

    /// Its event time.
    pub fn timestamp(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.inner.timestamp_ms)
    }

    /// Its event time, ms since the Unix epoch.
    pub fn timestamp_ms(&self) -> u64 {
        self.inner.timestamp_ms
    }

    /// Its headers.
    pub fn headers(&self) -> &[(String, Bytes)] {
        &self.inner.headers
    }

    /// Its payload.
    pub fn payload(&self) -> &Bytes {
        &self.inner.payload
    }

    /// Decodes the payload as a postcard value.
    pub fn value<T: serde::de::DeserializeOwned>(&self) -> Result<T, postcard::Error> {
        postcard::from_bytes(self.payload())
    }

    /// For a group's record: the group processed this record and every
    /// record before it in its partition (commits are batched, and only
    /// move forward). Does nothing for a plain consumer's record.
    pub fn commit(&self) {
        if let Some(c) = &self.committer {
            c.commit(
                self.partition,
                self.epoch,
                self.inner.offset.saturating_add(1),
            );
        }
    }
}

/// Per-read credit the consumer owes its hosts.
#[derive(Debug, Default)]
struct Taken {
    n: u32,
}

/// Auto-commit state of a group consumer.
#[derive(Debug)]
struct Auto {
    config: AutoCommit,
    /// Offset after the last record handed out, per partition: processed
    /// once the application asks for the next record.
    taken: FxHashMap<PartitionId, (u64, u64)>,
    /// Processed and not yet committed: (host's run, next offset).
    processed: FxHashMap<PartitionId, (u64, u64)>,
    since_commit: u32,
    last_commit: tokio::time::Instant,
}

impl Auto {
    fn flush(&mut self, committer: &Committer) {
        for (p, (epoch, next)) in self.processed.drain() {
            committer.commit(p, epoch, next);
        }
        self.since_commit = 0;
        self.last_commit = tokio::time::Instant::now();
    }
}

/// Records of a stream or of a group's share of it; see
/// [`Stream::consume`] and [`Group::consume`]. Dropping it stops reading
/// (and leaves the group).
#[derive(Debug)]
pub struct StreamConsumer {
    node: Node,
    sid: u64,
    window: u32,
    inbox: Arc<Inbox<StreamItem>>,
    buffered: VecDeque<StreamItem>,
    taken: FxHashMap<u64, Taken>,
    committer: Option<Arc<Committer>>,
    auto: Option<Auto>,
}

impl StreamConsumer {
    fn start(
        node: &Node,
        stream: &Arc<str>,
        group: Option<Arc<str>>,
        start: Start,
        window: u32,
        auto_commit: Option<AutoCommit>,
    ) -> Self {
        let inner = &node.inner;
        let sid = u64::from(
            inner
                .next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        );
        let window = window.clamp(1, crate::core::stream::MAX_CREDIT);
        let inbox = Arc::new(Inbox::default());
        let committer = group.as_ref().map(|g| {
            Arc::new(Committer {
                node: node.clone(),
                pending: Arc::new(CommitBatch::new(stream.clone(), g.clone())),
            })
        });
        let _ = inner.work_control.push_now(Op::Stream(StreamOp::Consume {
            sid,
            stream: stream.clone(),
            group: group.clone(),
            start,
            window,
            inbox: inbox.clone(),
        }));
        let auto = match (&group, auto_commit) {
            (Some(_), Some(config)) => Some(Auto {
                config,
                taken: FxHashMap::default(),
                processed: FxHashMap::default(),
                since_commit: 0,
                last_commit: tokio::time::Instant::now(),
            }),
            _ => None,
        };
        Self {
            node: node.clone(),
            sid,
            window,
            inbox,
            buffered: VecDeque::new(),
            taken: FxHashMap::default(),
            committer,
            auto,
        }
    }

    /// Gives back the credit of records taken.
    fn return_credit(&mut self, all: bool) {
        let half = (self.window / 2).max(1);
        let inner = &self.node.inner;
        self.taken.retain(|rid, t| {
            if t.n >= half || (all && t.n > 0) {
                let _ = inner
                    .work_control
                    .push_now(Op::Stream(StreamOp::Credit { rid: *rid, n: t.n }));
                t.n = 0;
            }
            t.n > 0
        });
    }

    /// The next record (or error); `None` once the node is shut down.
    pub async fn recv(&mut self) -> Option<Result<Record, ReadError>> {
        futures::StreamExt::next(self).await
    }
}

impl Drop for StreamConsumer {
    fn drop(&mut self) {
        if let (Some(a), Some(c)) = (&mut self.auto, &self.committer) {
            a.flush(c);
        }
        let _ = self
            .node
            .inner
            .work_control
            .push_now(Op::Stream(StreamOp::Cancel { sid: self.sid }));
    }
}

impl futures::Stream for StreamConsumer {
    type Item = Result<Record, ReadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        // Asking for the next record: what was handed out before is
        // processed.
        if let (Some(a), Some(c)) = (&mut this.auto, &this.committer) {
            for (p, next) in a.taken.drain() {
                a.processed.insert(p, next);
            }
            if !a.processed.is_empty()
                && (a.since_commit >= a.config.every
                    || a.last_commit.elapsed() >= a.config.interval)
            {
                a.flush(c);
            }
        }
        let item = match this.inbox.poll_next_item(cx, &mut this.buffered) {
            Poll::Ready(Some(item)) => item,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {
                // Caught up: all credit back, and commit what is done.
                this.return_credit(true);
                if let (Some(a), Some(c)) = (&mut this.auto, &this.committer) {
                    if !a.processed.is_empty() {
                        a.flush(c);
                    }
                }
                return Poll::Pending;
            }
        };
        match item {
            StreamItem::Gone {
                host,
                index,
                wanted,
                first,
            } => Poll::Ready(Some(Err(ReadError::OffsetGone {
                partition: PartitionId { host, index },
                requested: wanted,
                first,
            }))),
            StreamItem::Record {
                host,
                epoch,
                rid,
                index,
                record,
            } => {
                let t = this.taken.entry(rid).or_default();
                t.n += 1;
                if t.n >= (this.window / 2).max(1) {
                    this.return_credit(false);
                }
                let partition = PartitionId { host, index };
                if let Some(a) = &mut this.auto {
                    a.taken
                        .insert(partition, (epoch, record.offset.saturating_add(1)));
                    a.since_commit += 1;
                }
                Poll::Ready(Some(Ok(Record {
                    partition,
                    epoch,
                    inner: record,
                    committer: this.committer.clone(),
                })))
            }
        }
    }
}

/// Records to append, stamped now where they carry no event time.
fn new_records<I, P>(records: I, ts: u64) -> Vec<NewRecord>
where
    I: IntoIterator<Item = (P, AppendOptions)>,
    P: Into<Bytes>,
{
    records
        .into_iter()
        .map(|(p, o)| NewRecord {
            key: o.key,
            timestamp_ms: o.timestamp.map_or(ts, unix_ms),
            headers: o.headers,
            payload: p.into(),
        })
        .collect()
}
