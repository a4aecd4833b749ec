//! Streams: the state machine of the node that hosts stream partitions.
//!
//! A host keeps, per stream, a fixed number of partitions (numbered from
//! 0), each an append-only log of records numbered by offset from 0.
//! Appends pick the partition by key (one key, one partition; records
//! without a key go round-robin per append call). Retention drops the
//! oldest records of a partition past a count, a byte size or an age.
//!
//! Readers (a consumer's view of one partition) start at an offset and
//! are sent records as fast as their credit allows: a reader has at most
//! its credit of records in flight, and gets more as it grants more
//! ([`Streams::credit`]). A host never buffers for a reader: records stay
//! in the log and a reader is a cursor into it, so a slow reader costs
//! nothing but its place. A reader whose cursor falls behind retention is
//! told where the log now starts ([`Batch::gone`]) and continues there.
//!
//! Consumer groups commit offsets here, per group and partition; a commit
//! only moves forward (every commit says "all before this was processed",
//! so the largest is right).
//!
//! Sans-IO: inputs are method calls with the current time; outputs are
//! [`Batch`]es drained with [`Streams::poll_dispatch`], and a retention
//! timer ([`Streams::poll_timeout`], [`Streams::handle_timeout`]).

use std::{
    collections::VecDeque,
    hash::Hash,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use rustc_hash::{FxHashMap, FxHashSet};

/// Most partitions per stream per host.
pub const MAX_PARTITIONS: u32 = 256;
/// Most groups with committed offsets per stream; commits of further
/// groups are refused (and counted).
pub const MAX_GROUPS: usize = 1024;
/// Longest group name.
pub const MAX_GROUP_LEN: usize = 128;
/// Most records a reader may have in flight (its credit is cut to this).
pub const MAX_CREDIT: u32 = 64 * 1024;
/// Most readers one owner (a peer) may have open on a host.
pub const MAX_READERS_PER_OWNER: usize = 4096;

/// When records leave a partition (whichever limit is reached first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Most records per partition.
    pub max_records: u64,
    /// Most bytes (payload, key and headers) per partition.
    pub max_bytes: u64,
    /// Records older than this (since the host stored them) leave.
    pub max_age: Option<Duration>,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_records: 1_000_000,
            max_bytes: 256 * 1024 * 1024,
            max_age: None,
        }
    }
}

/// Host-side configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Partitions of each stream on this host (1 to [`MAX_PARTITIONS`]).
    pub partitions: u32,
    /// Retention of streams without their own.
    pub retention: Retention,
    /// Retention per stream name.
    pub retention_for: Vec<(Arc<str>, Retention)>,
    /// Most streams the host keeps; appends to further streams are refused.
    pub max_streams: usize,
    /// Most bytes over all streams of the host: past it, an append drops
    /// the oldest records of its own stream (counted in
    /// [`Stats::evicted`]) to fit, and is refused ([`AppendError::Full`])
    /// if that stream holds too little to make room.
    pub max_total_bytes: u64,
    /// Most readers over all streams.
    pub max_readers: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            partitions: 4,
            retention: Retention::default(),
            retention_for: Vec::new(),
            max_streams: 1024,
            max_total_bytes: 1024 * 1024 * 1024,
            max_readers: 64 * 1024,
        }
    }
}

/// A record as an appender gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    /// Records with the same key go to the same partition (empty: none).
    pub key: Bytes,
    /// Event time, ms since the Unix epoch (the appender's clock, or the
    /// application's).
    pub timestamp_ms: u64,
    /// Headers.
    pub headers: Vec<(String, Bytes)>,
    /// Payload.
    pub payload: Bytes,
}

/// A record in a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its offset in the partition.
    pub offset: u64,
    /// Key (empty: none).
    pub key: Bytes,
    /// Event time, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Headers.
    pub headers: Vec<(String, Bytes)>,
    /// Payload.
    pub payload: Bytes,
}

impl Record {
    /// Bytes it counts for in retention and the host's total.
    pub fn size(&self) -> u64 {
        record_size(&self.key, &self.headers, &self.payload)
    }
}

/// Bytes a record counts for: its data and what holding it costs (the
/// record and its slot in the log, about [`RECORD_OVERHEAD`], and each
/// header's `String` and `Bytes`), so that byte limits hold for tiny
/// records too (counting 32 per record undercounted them about 4x).
pub fn record_size(key: &[u8], headers: &[(String, Bytes)], payload: &[u8]) -> u64 {
    (key.len()
        + payload.len()
        + headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + HEADER_OVERHEAD)
            .sum::<usize>()
        + RECORD_OVERHEAD) as u64
}

/// What a stored record costs besides its data: the `Record` (key and
/// payload `Bytes`, headers `Vec`, offset, timestamps) and its log slot.
pub const RECORD_OVERHEAD: usize = 144;
/// What each header costs besides its text: a `String` and a `Bytes`.
const HEADER_OVERHEAD: usize = 56;

/// Where a reader starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// The oldest record kept.
    Earliest,
    /// The next record appended.
    Latest,
    /// This offset (before the oldest kept: the oldest, and the reader is
    /// told; past the end: the end).
    Offset(u64),
    /// The first record with a timestamp at or after this (ms since the
    /// Unix epoch).
    Time(u64),
    /// The group's committed offset, or `Start::Earliest`/`Latest` (the
    /// boolean: latest) if it has none.
    Committed {
        /// The group.
        group: Arc<str>,
        /// With no commit: start at the end rather than the beginning.
        latest: bool,
    },
}

/// Why an append was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// The host holds as many bytes as it may.
    #[error(
        "stream host is full ({limit} bytes over all streams) and this stream holds too little to make room"
    )]
    Full {
        /// The limit.
        limit: u64,
    },
    /// The host hosts as many streams as it may.
    #[error("stream host hosts as many streams as it may ({limit})")]
    TooManyStreams {
        /// The limit.
        limit: usize,
    },
}

/// Why a read could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// No such partition on this host.
    #[error("no partition {index} of stream {stream:?} on this host")]
    NoPartition {
        /// The stream.
        stream: String,
        /// The partition asked for.
        index: u32,
    },
    /// The host has as many readers as it may.
    #[error("stream host has as many readers as it may ({limit})")]
    TooManyReaders {
        /// The limit.
        limit: usize,
    },
}

/// A partition as [`Streams::partitions`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionState {
    /// Its number on this host.
    pub index: u32,
    /// Offset of the oldest record kept (`next` when empty).
    pub first: u64,
    /// Offset the next record will get.
    pub next: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Committed offset per group.
    pub committed: Vec<(Arc<str>, u64)>,
}

/// Records for one reader, in offset order, within its credit.
#[derive(Debug)]
pub struct Batch<K> {
    /// The reader's owner.
    pub key: K,
    /// The reader.
    pub rid: u64,
    /// Its partition.
    pub index: u32,
    /// The reader's cursor had fallen behind retention: `(wanted, first)`,
    /// and the records start at `first`.
    pub gone: Option<(u64, u64)>,
    /// The records.
    pub records: Vec<Record>,
}

/// Counters of a host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records appended.
    pub appended: u64,
    /// Records removed by retention.
    pub expired: u64,
    /// Records removed to keep the host under its byte bound.
    pub evicted: u64,
    /// Appends refused.
    pub refused: u64,
    /// Records sent to readers.
    pub dispatched: u64,
    /// Commits taken.
    pub commits: u64,
    /// Commits refused (too many groups, bad names).
    pub commits_refused: u64,
}

/// Most records per [`Batch`].
const BATCH: usize = 512;
/// Payload bytes after which a batch takes no more records.
const BATCH_BYTES: u64 = 256 * 1024;

struct Partition<K> {
    first: u64,
    /// Records below this may be sent to readers (all of them, unless the
    /// host is durable: then those on disk; see [`Streams::set_gate`]).
    visible: u64,
    records: VecDeque<(Record, Instant)>,
    bytes: u64,
    committed: FxHashMap<Arc<str>, u64>,
    readers: FxHashSet<(K, u64)>,
}

impl<K> Partition<K> {
    fn next(&self) -> u64 {
        self.first + self.records.len() as u64
    }

    /// The end of what readers may be sent.
    fn visible(&self) -> u64 {
        self.visible.clamp(self.first, self.next())
    }

    fn state(&self, index: u32) -> PartitionState {
        let mut committed: Vec<(Arc<str>, u64)> = self
            .committed
            .iter()
            .map(|(g, o)| (g.clone(), *o))
            .collect();
        committed.sort();
        PartitionState {
            index,
            first: self.first,
            next: self.visible(),
            bytes: self.bytes,
            committed,
        }
    }
}

struct Log<K> {
    partitions: Vec<Partition<K>>,
    retention: Retention,
    round_robin: u32,
}

struct Reader {
    stream: Arc<str>,
    index: u32,
    /// Next offset to send.
    next: u64,
    /// Records it may still be sent.
    credit: u32,
    /// Its cursor fell behind retention (what it wanted) and it has not
    /// been told yet.
    gone: Option<u64>,
    /// In `ready`.
    queued: bool,
}

/// The streams a node hosts. `K` identifies a reader's owner (the runtime
/// uses the consumer's node).
pub struct Streams<K> {
    config: Config,
    logs: FxHashMap<Arc<str>, Log<K>>,
    readers: FxHashMap<(K, u64), Reader>,
    /// Readers per owner.
    owned: FxHashMap<K, usize>,
    /// Streams with an age limit.
    aged: usize,
    /// The owner without a quota (the host's own node).
    exempt: Option<K>,
    /// Readers that may have records to send.
    ready: VecDeque<(K, u64)>,
    bytes: u64,
    stats: Stats,
    /// Appended records wait for [`Streams::made_durable`] before readers
    /// see them.
    gate: bool,
}

impl<K> std::fmt::Debug for Streams<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("streams", &self.logs.len())
            .field("readers", &self.readers.len())
            .field("bytes", &self.bytes)
            .field("stats", &self.stats)
            .finish()
    }
}

impl<K: Clone + Eq + Hash> Streams<K> {
    /// A host with no streams.
    pub fn new(mut config: Config) -> Self {
        config.partitions = config.partitions.clamp(1, MAX_PARTITIONS);
        Self {
            config,
            logs: FxHashMap::default(),
            readers: FxHashMap::default(),
            owned: FxHashMap::default(),
            aged: 0,
            exempt: None,
            ready: VecDeque::new(),
            bytes: 0,
            stats: Stats::default(),
            gate: false,
        }
    }

    /// With the gate on, appended records reach readers only once the
    /// driver says they are on disk ([`Streams::made_durable`]): a reader
    /// never sees a record a crash could take back.
    pub fn set_gate(&mut self, on: bool) {
        self.gate = on;
    }

    /// Records of partition `index` of `stream` below `upto` are on disk:
    /// readers may have them.
    pub fn made_durable(&mut self, stream: &str, index: u32, upto: u64) {
        let Some(p) = self
            .logs
            .get_mut(stream)
            .and_then(|l| l.partitions.get_mut(index as usize))
        else {
            return;
        };
        if upto > p.visible {
            p.visible = upto.min(p.next());
            self.wake(stream, index);
        }
    }

    /// Puts back a partition a durable host had stored (after a restart):
    /// its first offset, its records in offset order (all visible) and its
    /// committed offsets. The stream is created if new, with at least
    /// `index + 1` partitions. Records count against retention afresh,
    /// arriving now.
    pub fn restore(
        &mut self,
        now: Instant,
        stream: &str,
        index: u32,
        first: u64,
        records: Vec<Record>,
        committed: Vec<(Arc<str>, u64)>,
    ) -> Result<(), AppendError> {
        self.create(stream)?;
        let Some(log) = self.logs.get_mut(stream) else {
            return Ok(());
        };
        while log.partitions.len() <= index as usize {
            log.partitions.push(Partition {
                first: 0,
                visible: 0,
                records: VecDeque::new(),
                bytes: 0,
                committed: FxHashMap::default(),
                readers: FxHashSet::default(),
            });
        }
        let p = &mut log.partitions[index as usize];
        p.first = p.first.max(first);
        for r in records {
            if r.offset < p.next() {
                continue;
            }
            if r.offset > p.next() {
                // A gap (retention trims from the front, so only a damaged
                // file has one): keep what follows it, in order.
                self.bytes -= p.bytes;
                p.bytes = 0;
                p.records.clear();
                p.first = r.offset;
            }
            let size = r.size();
            p.bytes += size;
            self.bytes += size;
            p.records.push_back((r, now));
        }
        p.visible = p.next();
        p.committed.extend(committed);
        Ok(())
    }

    /// Readers of `owner` (the host's own node) are not held to
    /// [`MAX_READERS_PER_OWNER`] (only to the host's `max_readers`).
    pub fn exempt_from_quota(&mut self, owner: K) {
        self.exempt = Some(owner);
    }

    /// The shared name of stream `stream`, if hosted.
    pub fn name(&self, stream: &str) -> Option<&Arc<str>> {
        self.logs.get_key_value(stream).map(|(k, _)| k)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Whether this host has stream `name`.
    pub fn has(&self, name: &str) -> bool {
        self.logs.contains_key(name)
    }

    /// Names of the streams hosted.
    pub fn names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.logs.keys()
    }

    /// Records held over all streams.
    pub fn len(&self) -> usize {
        self.logs
            .values()
            .flat_map(|l| &l.partitions)
            .map(|p| p.records.len())
            .sum()
    }

    /// Whether no records are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held over all streams.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Creates stream `name` (with its partitions) if it does not exist.
    /// True if it was created now.
    pub fn create(&mut self, name: &str) -> Result<bool, AppendError> {
        if self.logs.contains_key(name) {
            return Ok(false);
        }
        if self.logs.len() >= self.config.max_streams {
            return Err(AppendError::TooManyStreams {
                limit: self.config.max_streams,
            });
        }
        let retention = self
            .config
            .retention_for
            .iter()
            .find(|(n, _)| &**n == name)
            .map_or(self.config.retention, |(_, r)| *r);
        let partitions = (0..self.config.partitions)
            .map(|_| Partition {
                first: 0,
                visible: 0,
                records: VecDeque::new(),
                bytes: 0,
                committed: FxHashMap::default(),
                readers: FxHashSet::default(),
            })
            .collect();
        self.aged += usize::from(retention.max_age.is_some());
        self.logs.insert(
            name.into(),
            Log {
                partitions,
                retention,
                round_robin: 0,
            },
        );
        Ok(true)
    }

    /// The partition records with `key` go to.
    pub fn partition_of(&self, key: &[u8]) -> u32 {
        partition_of(key, self.config.partitions)
    }

    /// Appends `records` to stream `name` (created if new), returning each
    /// record's `(partition, offset)` in order. All or nothing.
    pub fn append(
        &mut self,
        now: Instant,
        name: &str,
        records: Vec<NewRecord>,
    ) -> Result<Vec<(u32, u64)>, AppendError> {
        let incoming: u64 = records
            .iter()
            .map(|r| record_size(&r.key, &r.headers, &r.payload))
            .sum();
        if self.bytes.saturating_add(incoming) > self.config.max_total_bytes {
            // The host's bound is retention too: this stream's oldest
            // records make room (another stream's are not ours to take).
            self.evict_oldest(name, incoming);
        }
        if self.bytes.saturating_add(incoming) > self.config.max_total_bytes {
            self.stats.refused += records.len() as u64;
            return Err(AppendError::Full {
                limit: self.config.max_total_bytes,
            });
        }
        if let Err(e) = self.create(name) {
            self.stats.refused += records.len() as u64;
            return Err(e);
        }
        let n = self.config.partitions;
        let Some(log) = self.logs.get_mut(name) else {
            return Ok(Vec::new());
        };
        let unkeyed = log.round_robin % n;
        log.round_robin = log.round_robin.wrapping_add(1);
        let mut placed = Vec::with_capacity(records.len());
        let mut touched = vec![false; n as usize];
        for r in records {
            let index = if r.key.is_empty() {
                unkeyed
            } else {
                partition_of(&r.key, n)
            };
            let p = &mut log.partitions[index as usize];
            let offset = p.next();
            let rec = Record {
                offset,
                key: r.key,
                timestamp_ms: r.timestamp_ms,
                headers: r.headers,
                payload: r.payload,
            };
            let size = rec.size();
            p.bytes += size;
            self.bytes += size;
            p.records.push_back((rec, now));
            if !self.gate {
                p.visible = p.next();
            }
            placed.push((index, offset));
            touched[index as usize] = true;
        }
        self.stats.appended += placed.len() as u64;
        for index in (0..n).filter(|i| touched[*i as usize]) {
            self.retain(name, index, now);
            self.wake(name, index);
        }
        Ok(placed)
    }

    /// Drops the oldest records of stream `name` (over its partitions, by
    /// arrival) until `incoming` more bytes fit in the host's total.
    fn evict_oldest(&mut self, name: &str, incoming: u64) {
        let max = self.config.max_total_bytes;
        let Some(log) = self.logs.get_mut(name) else {
            return;
        };
        let need = self.bytes.saturating_add(incoming).saturating_sub(max);
        let held: u64 = log.partitions.iter().map(|p| p.bytes).sum();
        if held < need {
            return; // it would not fit anyway: drop nothing
        }
        while self.bytes.saturating_add(incoming) > max {
            let oldest = log
                .partitions
                .iter()
                .enumerate()
                .filter_map(|(i, p)| p.records.front().map(|(_, at)| (*at, i)))
                .min();
            let Some((_, i)) = oldest else {
                break;
            };
            let p = &mut log.partitions[i];
            if let Some((r, _)) = p.records.pop_front() {
                let size = r.size();
                p.bytes -= size;
                self.bytes -= size;
                p.first += 1;
                self.stats.evicted += 1;
            }
        }
    }

    /// Applies retention to one partition.
    fn retain(&mut self, name: &str, index: u32, now: Instant) {
        let Some(log) = self.logs.get_mut(name) else {
            return;
        };
        let retention = log.retention;
        let p = &mut log.partitions[index as usize];
        let mut removed = 0;
        while let Some((r, at)) = p.records.front() {
            let over = p.records.len() as u64 > retention.max_records
                || p.bytes > retention.max_bytes
                || retention
                    .max_age
                    .is_some_and(|age| now.saturating_duration_since(*at) >= age);
            if !over {
                break;
            }
            let size = r.size();
            p.bytes -= size;
            self.bytes -= size;
            p.records.pop_front();
            p.first += 1;
            removed += 1;
        }
        self.stats.expired += removed;
    }

    /// Queues the readers of a partition that can be sent something.
    fn wake(&mut self, name: &str, index: u32) {
        let Some(log) = self.logs.get(name) else {
            return;
        };
        let p = &log.partitions[index as usize];
        for key in &p.readers {
            if let Some(r) = self.readers.get_mut(key) {
                if !r.queued && r.credit > 0 && r.next < p.visible() {
                    r.queued = true;
                    self.ready.push_back(key.clone());
                }
            }
        }
    }

    /// Where `start` falls in a partition: the offset, and whether it was
    /// before the oldest record kept.
    ///
    /// The end is what readers may see: on a durable host, records not on
    /// disk yet do not count (a crash could give their offsets to others).
    fn resolve(p: &Partition<K>, start: &Start) -> (u64, Option<u64>) {
        let first = p.first;
        let next = p.visible();
        match start {
            Start::Earliest => (first, None),
            Start::Latest => (next, None),
            Start::Offset(o) if *o < first => (first, Some(*o)),
            Start::Offset(o) => ((*o).min(next), None),
            Start::Time(t) => {
                let visible = (next - first) as usize;
                let i = p
                    .records
                    .iter()
                    .take(visible)
                    .position(|(r, _)| r.timestamp_ms >= *t)
                    .unwrap_or(visible);
                (first + i as u64, None)
            }
            Start::Committed { group, latest } => match p.committed.get(group) {
                // Retention may have passed it: say so.
                Some(o) => Self::resolve(p, &Start::Offset(*o)),
                None if *latest => (next, None),
                None => (first, None),
            },
        }
    }

    /// Starts (or restarts) reader `rid` of `key` on partition `index` of
    /// `stream`, with `credit` records it may be sent. Returns the offset
    /// it starts at. The stream is created if new (a reader may come
    /// before the first append).
    pub fn open(
        &mut self,
        key: K,
        rid: u64,
        stream: &str,
        index: u32,
        start: &Start,
        credit: u32,
    ) -> Result<u64, ReadError> {
        let id = (key, rid);
        let replacing = self.readers.contains_key(&id);
        if !replacing && self.readers.len() >= self.config.max_readers {
            return Err(ReadError::TooManyReaders {
                limit: self.config.max_readers,
            });
        }
        let owned = self.owned.get(&id.0).copied().unwrap_or(0);
        let exempt = self.exempt.as_ref() == Some(&id.0);
        if !replacing && !exempt && owned >= MAX_READERS_PER_OWNER {
            return Err(ReadError::TooManyReaders {
                limit: MAX_READERS_PER_OWNER,
            });
        }
        let credit = credit.min(MAX_CREDIT);
        self.close(&id.0, rid);
        let Some(log) = self.logs.get_mut(stream) else {
            return Err(ReadError::NoPartition {
                stream: stream.to_owned(),
                index,
            });
        };
        let Some(p) = log.partitions.get_mut(index as usize) else {
            return Err(ReadError::NoPartition {
                stream: stream.to_owned(),
                index,
            });
        };
        let (next, gone) = Self::resolve(p, start);
        p.readers.insert(id.clone());
        let name = self
            .logs
            .get_key_value(stream)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| stream.into());
        *self.owned.entry(id.0.clone()).or_default() += 1;
        self.readers.insert(
            id.clone(),
            Reader {
                stream: name,
                index,
                next,
                credit,
                gone,
                queued: false,
            },
        );
        self.queue_reader(&id);
        Ok(next)
    }

    fn queue_reader(&mut self, id: &(K, u64)) {
        let Some(r) = self.readers.get_mut(id) else {
            return;
        };
        if r.queued || r.credit == 0 {
            return;
        }
        let has = r.gone.is_some()
            || self
                .logs
                .get(&r.stream)
                .and_then(|l| l.partitions.get(r.index as usize))
                .is_some_and(|p| r.next < p.visible());
        if has {
            r.queued = true;
            self.ready.push_back(id.clone());
        }
    }

    /// Reader `rid` of `key` may be sent `n` more records.
    pub fn credit(&mut self, key: &K, rid: u64, n: u32) {
        let id = (key.clone(), rid);
        if let Some(r) = self.readers.get_mut(&id) {
            r.credit = r.credit.saturating_add(n).min(MAX_CREDIT);
            self.queue_reader(&id);
        }
    }

    /// Stops reader `rid` of `key`.
    pub fn close(&mut self, key: &K, rid: u64) {
        let id = (key.clone(), rid);
        if let Some(r) = self.readers.remove(&id) {
            if let Some(n) = self.owned.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    self.owned.remove(key);
                }
            }
            if let Some(p) = self
                .logs
                .get_mut(&r.stream)
                .and_then(|l| l.partitions.get_mut(r.index as usize))
            {
                p.readers.remove(&id);
            }
        }
    }

    /// Stops every reader whose owner matches.
    pub fn close_all(&mut self, mut matches: impl FnMut(&K) -> bool) {
        let ids: Vec<(K, u64)> = self
            .readers
            .keys()
            .filter(|(k, _)| matches(k))
            .cloned()
            .collect();
        for (k, rid) in ids {
            self.close(&k, rid);
        }
    }

    /// Readers open.
    pub fn readers(&self) -> usize {
        self.readers.len()
    }

    /// Commits `offset` (the next record the group will read) for `group`
    /// on a partition. Only moves forward, and never past the end.
    /// False if refused (no such partition, too many groups, bad name).
    pub fn commit(&mut self, stream: &str, group: &str, index: u32, offset: u64) -> bool {
        let ok_name = !group.is_empty() && group.len() <= MAX_GROUP_LEN;
        let Some(p) = self
            .logs
            .get_mut(stream)
            .and_then(|l| l.partitions.get_mut(index as usize))
            .filter(|_| ok_name)
        else {
            self.stats.commits_refused += 1;
            return false;
        };
        let offset = offset.min(p.visible());
        if let Some(c) = p.committed.get_mut(group) {
            *c = (*c).max(offset);
            self.stats.commits += 1;
            return true;
        }
        if p.committed.len() >= MAX_GROUPS {
            self.stats.commits_refused += 1;
            return false;
        }
        p.committed.insert(group.into(), offset);
        self.stats.commits += 1;
        true
    }

    /// The partitions of `stream` (empty if this host does not have it).
    pub fn partitions(&self, stream: &str) -> Vec<PartitionState> {
        self.logs.get(stream).map_or_else(Vec::new, |l| {
            l.partitions
                .iter()
                .enumerate()
                .map(|(i, p)| p.state(i as u32))
                .collect()
        })
    }

    /// Records of a partition from `offset`, at most `limit` (for tests
    /// and tools; readers get theirs through [`Streams::poll_dispatch`]).
    pub fn read(&self, stream: &str, index: u32, offset: u64, limit: usize) -> Vec<Record> {
        let Some(p) = self
            .logs
            .get(stream)
            .and_then(|l| l.partitions.get(index as usize))
        else {
            return Vec::new();
        };
        let from = offset.saturating_sub(p.first) as usize;
        p.records
            .iter()
            .skip(from)
            .take(limit)
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// The next batch for a reader, if any has records to send and credit.
    pub fn poll_dispatch(&mut self) -> Option<Batch<K>> {
        while let Some(id) = self.ready.pop_front() {
            let Some(r) = self.readers.get_mut(&id) else {
                continue;
            };
            r.queued = false;
            let Some(p) = self
                .logs
                .get(&r.stream)
                .and_then(|l| l.partitions.get(r.index as usize))
            else {
                continue;
            };
            let mut gone = r.gone.take().map(|wanted| (wanted, p.first));
            if r.next < p.first {
                // Retention passed the cursor since the last batch.
                gone = Some((r.next, p.first));
                r.next = p.first;
            }
            let from = (r.next - p.first) as usize;
            let most = (r.credit as usize)
                .min(BATCH)
                .min(p.visible().saturating_sub(r.next) as usize);
            let mut records =
                Vec::with_capacity(most.min(p.records.len() - from.min(p.records.len())));
            let mut bytes = 0;
            for (rec, _) in p.records.iter().skip(from).take(most) {
                // Keys and headers count too: a batch is one frame.
                let size = rec.size();
                if !records.is_empty() && bytes + size > BATCH_BYTES {
                    break;
                }
                bytes += size;
                records.push(rec.clone());
            }
            if records.is_empty() && gone.is_none() {
                continue;
            }
            let sent = records.len() as u32;
            r.next += u64::from(sent);
            r.credit -= sent;
            let index = r.index;
            let more = r.credit > 0 && r.next < p.visible();
            if more {
                r.queued = true;
                self.ready.push_back(id.clone());
            }
            self.stats.dispatched += u64::from(sent);
            return Some(Batch {
                key: id.0,
                rid: id.1,
                index,
                gone,
                records,
            });
        }
        None
    }

    /// When the oldest record of a stream with an age limit expires.
    pub fn poll_timeout(&self) -> Option<Instant> {
        // Called on every turn of the driver: nothing to scan unless some
        // stream has an age limit.
        if self.aged == 0 {
            return None;
        }
        self.logs
            .values()
            .filter_map(|l| {
                let age = l.retention.max_age?;
                l.partitions
                    .iter()
                    .filter_map(|p| p.records.front().map(|(_, at)| *at))
                    .min()
                    .map(|at| super::queue::after(at, age))
            })
            .min()
    }

    /// Applies age retention.
    pub fn handle_timeout(&mut self, now: Instant) {
        let aged: Vec<(Arc<str>, u32)> = self
            .logs
            .iter()
            .filter(|(_, l)| l.retention.max_age.is_some())
            .flat_map(|(n, l)| (0..l.partitions.len() as u32).map(move |i| (n.clone(), i)))
            .collect();
        for (name, index) in aged {
            self.retain(&name, index, now);
        }
    }
}

/// The partition of `partitions` records with `key` go to.
pub fn partition_of(key: &[u8], partitions: u32) -> u32 {
    (stable_hash(&[key]) % u64::from(partitions.max(1))) as u32
}

/// A hash that is the same on every node, build and run: FNV-1a over the
/// length-prefixed parts, then the splitmix64 finalizer so that similar
/// keys (`sensor-1`, `sensor-2`) spread. Partitions and rendezvous choices
/// must agree across nodes and versions, and survive restarts once
/// records are durable, so this is fixed here rather than taken from a
/// hashing crate whose output may change.
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in (part.len() as u64).to_le_bytes().iter().chain(part.iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::test_origin;

    const PINNED: [u32; 3] = [277, 405, 420];

    fn rec(key: &str, payload: &str) -> NewRecord {
        NewRecord {
            key: Bytes::copy_from_slice(key.as_bytes()),
            timestamp_ms: 1000,
            headers: Vec::new(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        }
    }

    fn host(partitions: u32) -> Streams<u32> {
        Streams::new(Config {
            partitions,
            ..Config::default()
        })
    }

    fn drain(s: &mut Streams<u32>) -> Vec<Batch<u32>> {
        std::iter::from_fn(|| s.poll_dispatch()).collect()
    }

    #[test]
    fn one_key_one_partition_offsets_count_up() {
        let now = test_origin();
        let mut s = host(4);
        let placed = s
            .append(now, "s", vec![rec("a", "1"), rec("b", "2"), rec("a", "3")])
            .unwrap();
        assert_eq!(placed[0].0, placed[2].0);
        assert_eq!(placed[2].1, placed[0].1 + 1);
        assert_eq!(placed[0].0, s.partition_of(b"a"));
        let parts = s.partitions("s");
        assert_eq!(parts.len(), 4);
        assert_eq!(parts.iter().map(|p| p.next).sum::<u64>(), 3);
    }

    #[test]
    fn the_key_hash_is_fixed_and_spreads_similar_keys() {
        // Pinned: a change here moves every key to another partition.
        assert_eq!(stable_hash(&[b"a"]), stable_hash(&[b"a"]));
        assert_ne!(stable_hash(&[b"ab", b"c"]), stable_hash(&[b"a", b"bc"]));
        let pinned: Vec<u32> = ["a", "sensor-1", "order-42"]
            .iter()
            .map(|k| partition_of(k.as_bytes(), 1000))
            .collect();
        assert_eq!(pinned, PINNED);
        let mut per = [0; 4];
        for i in 0..64 {
            per[partition_of(format!("sensor-{i}").as_bytes(), 4) as usize] += 1;
        }
        assert!(per.iter().all(|n| *n >= 8), "{per:?}");
    }

    /// With the gate on, readers get records only once made durable, and
    /// a restored partition goes on at its offsets.
    #[test]
    fn gated_records_wait_until_durable() {
        let now = test_origin();
        let mut s = host(1);
        s.set_gate(true);
        s.create("s").unwrap();
        s.open(7, 1, "s", 0, &Start::Earliest, 100).unwrap();
        s.append(now, "s", vec![rec("", "a"), rec("", "b"), rec("", "c")])
            .unwrap();
        assert!(drain(&mut s).is_empty(), "nothing before it is on disk");
        assert_eq!(s.partitions("s")[0].next, 0);
        // Where a reader starts, and what a commit may reach, count only
        // what is on disk: after a crash those offsets go to others.
        assert_eq!(s.open(8, 2, "s", 0, &Start::Latest, 100), Ok(0));
        assert_eq!(s.open(8, 3, "s", 0, &Start::Offset(3), 100), Ok(0));
        assert!(s.commit("s", "g", 0, 3));
        assert_eq!(s.partitions("s")[0].committed, [("g".into(), 0)]);
        s.close(&8, 2);
        s.close(&8, 3);
        s.made_durable("s", 0, 2);
        let got: Vec<u64> = drain(&mut s)
            .into_iter()
            .flat_map(|b| b.records)
            .map(|r| r.offset)
            .collect();
        assert_eq!(got, [0, 1]);
        s.made_durable("s", 0, 3);
        assert_eq!(drain(&mut s)[0].records[0].offset, 2);

        let mut r = host(1);
        r.set_gate(true);
        let kept: Vec<Record> = s.read("s", 0, 1, 10);
        r.restore(now, "s", 0, 1, kept, vec![("g".into(), 2)])
            .unwrap();
        let p = &r.partitions("s")[0];
        assert_eq!((p.first, p.next), (1, 3));
        assert_eq!(p.committed, [("g".into(), 2)]);
        let placed = r.append(now, "s", vec![rec("", "d")]).unwrap();
        assert_eq!(placed, [(0, 3)]);
    }

    #[test]
    fn unkeyed_appends_go_round_robin_per_call() {
        let now = test_origin();
        let mut s = host(3);
        let a = s
            .append(now, "s", vec![rec("", "1"), rec("", "2")])
            .unwrap();
        let b = s.append(now, "s", vec![rec("", "3")]).unwrap();
        assert_eq!(a[0].0, a[1].0);
        assert_ne!(a[0].0, b[0].0);
    }

    #[test]
    fn reader_gets_records_within_credit_then_more_on_credit() {
        let now = test_origin();
        let mut s = host(1);
        let recs = (0..10).map(|i| rec("", &i.to_string())).collect();
        s.append(now, "s", recs).unwrap();
        assert_eq!(s.open(7, 1, "s", 0, &Start::Earliest, 4).unwrap(), 0);
        let b = drain(&mut s);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].records.len(), 4);
        assert_eq!(b[0].records[3].offset, 3);
        assert!(drain(&mut s).is_empty(), "no credit left");
        s.credit(&7, 1, 100);
        let b = drain(&mut s);
        let offsets: Vec<u64> = b
            .iter()
            .flat_map(|b| &b.records)
            .map(|r| r.offset)
            .collect();
        assert_eq!(offsets, (4..10).collect::<Vec<_>>());
        // Live tail: a new append goes out at once.
        s.append(now, "s", vec![rec("", "x")]).unwrap();
        let b = drain(&mut s);
        assert_eq!(b[0].records[0].offset, 10);
    }

    #[test]
    fn starts_latest_offset_and_time() {
        let now = test_origin();
        let mut s = host(1);
        let recs = (0..5u64)
            .map(|i| NewRecord {
                timestamp_ms: 1000 + i * 10,
                ..rec("", "r")
            })
            .collect();
        s.append(now, "s", recs).unwrap();
        assert_eq!(s.open(1, 1, "s", 0, &Start::Latest, 10).unwrap(), 5);
        assert_eq!(s.open(1, 2, "s", 0, &Start::Offset(3), 10).unwrap(), 3);
        assert_eq!(s.open(1, 3, "s", 0, &Start::Offset(99), 10).unwrap(), 5);
        assert_eq!(s.open(1, 4, "s", 0, &Start::Time(1015), 10).unwrap(), 2);
        assert_eq!(s.open(1, 5, "s", 0, &Start::Time(5000), 10).unwrap(), 5);
        assert!(matches!(
            s.open(1, 6, "s", 9, &Start::Earliest, 10),
            Err(ReadError::NoPartition { index: 9, .. })
        ));
    }

    #[test]
    fn retention_by_count_bytes_and_age() {
        let now = test_origin();
        let mut s = Streams::<u32>::new(Config {
            partitions: 1,
            retention: Retention {
                max_records: 3,
                max_bytes: u64::MAX,
                max_age: None,
            },
            retention_for: vec![
                (
                    "small".into(),
                    Retention {
                        max_records: u64::MAX,
                        max_bytes: 2 * (RECORD_OVERHEAD as u64 + 10),
                        max_age: None,
                    },
                ),
                (
                    "aged".into(),
                    Retention {
                        max_records: u64::MAX,
                        max_bytes: u64::MAX,
                        max_age: Some(Duration::from_secs(10)),
                    },
                ),
            ],
            ..Config::default()
        });
        let recs = (0..5).map(|_| rec("", "r")).collect();
        s.append(now, "s", recs).unwrap();
        let p = &s.partitions("s")[0];
        assert_eq!((p.first, p.next), (2, 5));
        let recs = (0..5).map(|_| rec("", "0123456789")).collect();
        s.append(now, "small", recs).unwrap();
        let p = &s.partitions("small")[0];
        assert_eq!((p.first, p.next), (3, 5));
        s.append(now, "aged", vec![rec("", "old")]).unwrap();
        s.append(now + Duration::from_secs(5), "aged", vec![rec("", "new")])
            .unwrap();
        assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(10)));
        s.handle_timeout(now + Duration::from_secs(10));
        let p = &s.partitions("aged")[0];
        assert_eq!((p.first, p.next), (1, 2));
        assert_eq!(s.stats().expired, 2 + 3 + 1);
        assert_eq!(
            s.bytes(),
            s.partitions("s")[0].bytes + s.partitions("small")[0].bytes + p.bytes
        );
    }

    #[test]
    fn a_reader_behind_retention_is_told_and_continues_at_the_first() {
        let now = test_origin();
        let mut s = Streams::<u32>::new(Config {
            partitions: 1,
            retention: Retention {
                max_records: 3,
                ..Retention::default()
            },
            ..Config::default()
        });
        s.append(now, "s", (0..5).map(|_| rec("", "r")).collect())
            .unwrap();
        assert_eq!(s.open(1, 1, "s", 0, &Start::Offset(0), 100).unwrap(), 2);
        let b = drain(&mut s);
        assert_eq!(b[0].gone, Some((0, 2)));
        assert_eq!(b[0].records[0].offset, 2);
        // A slow reader passed by retention while it had no credit.
        s.open(1, 2, "s", 0, &Start::Offset(2), 1).unwrap();
        drain(&mut s);
        s.append(now, "s", (0..5).map(|_| rec("", "r")).collect())
            .unwrap();
        s.credit(&1, 2, 10);
        let b: Vec<_> = drain(&mut s).into_iter().filter(|b| b.rid == 2).collect();
        assert_eq!(b[0].gone, Some((3, 7)));
        assert_eq!(b[0].records[0].offset, 7);
    }

    #[test]
    fn commits_only_move_forward_and_stay_within_the_log() {
        let now = test_origin();
        let mut s = host(1);
        s.append(now, "s", (0..10).map(|_| rec("", "r")).collect())
            .unwrap();
        assert!(s.commit("s", "g", 0, 5));
        assert!(s.commit("s", "g", 0, 3));
        assert!(s.commit("s", "g", 0, 50));
        assert_eq!(s.partitions("s")[0].committed, vec![("g".into(), 10)]);
        assert!(!s.commit("s", "g", 3, 1), "no such partition");
        assert!(!s.commit("nope", "g", 0, 1));
        assert!(!s.commit("s", "", 0, 1));
        // A group reader resumes at the commit; a new group at the start.
        assert_eq!(
            s.open(
                1,
                1,
                "s",
                0,
                &Start::Committed {
                    group: "g".into(),
                    latest: false
                },
                1
            )
            .unwrap(),
            10
        );
        assert_eq!(
            s.open(
                1,
                2,
                "s",
                0,
                &Start::Committed {
                    group: "h".into(),
                    latest: false
                },
                1
            )
            .unwrap(),
            0
        );
        assert_eq!(
            s.open(
                1,
                3,
                "s",
                0,
                &Start::Committed {
                    group: "h".into(),
                    latest: true
                },
                1
            )
            .unwrap(),
            10
        );
    }

    #[test]
    fn host_limits_refuse_appends_and_readers() {
        let now = test_origin();
        let mut s = Streams::<u32>::new(Config {
            partitions: 1,
            max_streams: 1,
            max_total_bytes: 300,
            max_readers: 1,
            ..Config::default()
        });
        s.append(now, "a", vec![rec("", "x")]).unwrap();
        assert!(matches!(
            s.append(now, "b", vec![rec("", "x")]),
            Err(AppendError::TooManyStreams { limit: 1 })
        ));
        assert!(matches!(
            s.append(now, "a", vec![rec("", &"x".repeat(300))]),
            Err(AppendError::Full { limit: 300 })
        ));
        assert_eq!(s.partitions("a")[0].next, 1, "nothing of a refused append");
        s.open(1, 1, "a", 0, &Start::Earliest, 1).unwrap();
        assert!(
            s.open(1, 1, "a", 0, &Start::Earliest, 1).is_ok(),
            "reopening"
        );
        assert!(matches!(
            s.open(2, 1, "a", 0, &Start::Earliest, 1),
            Err(ReadError::TooManyReaders { limit: 1 })
        ));
        s.close_all(|k| *k == 1);
        assert_eq!(s.readers(), 0);
        assert!(s.open(2, 1, "a", 0, &Start::Earliest, 1).is_ok());
    }

    #[test]
    fn the_host_bound_makes_room_from_the_stream_s_own_oldest_records() {
        let now = test_origin();
        let size = record_size(b"", &[], b"0123456789");
        let mut s = Streams::<u32>::new(Config {
            partitions: 2,
            max_total_bytes: 10 * size,
            ..Config::default()
        });
        s.append(now, "a", (0..6).map(|_| rec("", "0123456789")).collect())
            .unwrap();
        let later = now + Duration::from_secs(1);
        s.append(later, "b", (0..4).map(|_| rec("", "0123456789")).collect())
            .unwrap();
        // Full: b's next append drops b's own oldest, not a's.
        s.append(later, "b", vec![rec("", "0123456789")]).unwrap();
        assert_eq!(s.bytes(), 10 * size);
        let held = |n: &str| {
            s.partitions(n)
                .iter()
                .map(|p| p.next - p.first)
                .sum::<u64>()
        };
        assert_eq!((held("a"), held("b")), (6, 4));
        // A stream with nothing to give is refused.
        assert!(matches!(
            s.append(later, "c", vec![rec("", "x")]),
            Err(AppendError::Full { .. })
        ));
    }

    #[test]
    fn batches_are_bounded() {
        let now = test_origin();
        let mut s = host(1);
        s.append(now, "s", (0..2000).map(|_| rec("", "r")).collect())
            .unwrap();
        s.open(1, 1, "s", 0, &Start::Earliest, u32::MAX).unwrap();
        let b = drain(&mut s);
        assert!(b.iter().all(|b| b.records.len() <= BATCH));
        let offsets: Vec<u64> = b
            .iter()
            .flat_map(|b| &b.records)
            .map(|r| r.offset)
            .collect();
        assert_eq!(offsets, (0..2000).collect::<Vec<_>>());
    }
}
