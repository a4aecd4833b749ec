//! Streams in the node task.
//!
//! Who does what (see `core::stream` for the host's rules):
//! - A node *hosts* a stream when configured to (`host_streams`,
//!   `host_all`) or when it appends to a stream nobody hosts (it then
//!   hosts its own partitions). Hosts declare `$s.h.NAME` (or `$s.h.>`).
//! - An appender that does not host the stream hands each record to one
//!   live host, chosen by rendezvous hashing of (stream, key) over the
//!   hosts, so one key stays on one host (and there in one partition)
//!   while the hosts are stable. The append resolves when the host
//!   answers `Appended` with the records' offsets; appends not answered
//!   when the link to the host ends go again, to the next choice.
//! - A consumer `Watch`es every live host (the host answers with its
//!   partition count, now and when the stream appears) and `Read`s the
//!   partitions it wants, with credit; the host sends `Records` within
//!   the credit, and the consumer grants more as its application takes
//!   them. The consumer remembers, per partition, the next offset it
//!   expects: a read that ends with its link starts again there, so
//!   nothing is skipped and nothing repeated.
//! - Group members declare `$s.g.STREAM.GROUP`. Each member node assigns
//!   every partition (host, index) to the member node with the highest
//!   rendezvous hash, from its own view of the members, and reads the ones
//!   it got from the group's committed offset. Commits go to the
//!   partition's host.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::sync::oneshot;

use super::{
    now,
    queue::Inbox,
    work::{headers_from_wire, headers_to_wire, slice},
    NodeTask,
};
use crate::{
    core::{
        membership::MemberState,
        stream::{self as core_stream, NewRecord, Start},
        topic::{Pattern, Topic},
        NodeId,
    },
    engine::{
        group::{self, HostView},
        hosting::{self, Gathered, Gathers, Hosting, Route},
    },
    wire::{self, AppendWire, Frame, PartWire, Raw, RecordWire, StartWire, StreamWire, WireError},
};

/// Reserved pattern prefixes of a stream host's and a consumer group
/// member's declarations.
pub(crate) use crate::engine::access::{GROUP_PREFIX, STREAM_HOST_PREFIX as HOST_PREFIX};
/// How long `info` waits for remote hosts.
const GATHER_TIMEOUT: Duration = Duration::from_secs(2);
/// Most records per `Append` frame.
const APPEND_BATCH: usize = 1024;
/// Payload bytes after which an `Append` or `Records` frame takes no more.
const FRAME_BYTES: usize = 256 * 1024;
/// How long after a refused read it is tried again.
const READ_RETRY: Duration = Duration::from_secs(1);
/// Most watches one peer may have on this host.
const MAX_WATCHES_PER_PEER: usize = 1024;
/// Most consumers watching one stream of this host; more are refused.
const MAX_WATCHERS: usize = 4096;
/// Most watches over all streams of this host.
const MAX_ALL_WATCHERS: usize = 64 * 1024;

/// Where a record was stored: its host, the host's run, partition and
/// offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placed {
    pub(crate) host: NodeId,
    pub(crate) index: u32,
    pub(crate) offset: u64,
}

/// What a consumer handle gets.
#[derive(Debug)]
pub(crate) enum StreamItem {
    Record {
        host: NodeId,
        /// The host's run.
        epoch: u64,
        rid: u64,
        index: u32,
        record: core_stream::Record,
    },
    /// Retention removed offsets `wanted..first` before they were read.
    Gone {
        host: NodeId,
        index: u32,
        wanted: u64,
        first: u64,
    },
}

/// Why an append failed, in the node task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AppendFailure {
    NoHost,
    Refused { full: bool, reason: String },
}

/// Work from stream handles to the node task.
#[derive(Debug)]
pub(crate) enum StreamOp {
    Append {
        stream: Arc<str>,
        records: Vec<NewRecord>,
        /// Confirmed only by a host that keeps it: never by this node
        /// hosting it in memory (an outbox relay's sends).
        durable: bool,
        reply: oneshot::Sender<Result<Vec<Placed>, AppendFailure>>,
    },
    Consume {
        sid: u64,
        stream: Arc<str>,
        group: Option<Arc<str>>,
        start: Start,
        window: u32,
        inbox: Arc<Inbox<StreamItem>>,
    },
    Cancel {
        sid: u64,
    },
    /// The application took `n` records of read `rid`.
    Credit {
        rid: u64,
        n: u32,
    },
    /// Commits gathered by a group consumer's records.
    Commits {
        batch: Arc<CommitBatch>,
    },
    Info {
        stream: Arc<str>,
        reply: oneshot::Sender<InfoReply>,
    },
}

/// What `info` gathered: the hosts' partitions, and hosts that did not
/// answer in time.
pub(crate) type InfoReply = (Vec<HostParts>, Vec<NodeId>);

/// Commits a group consumer's records gathered between two wake-ups of
/// the node task: the largest offset per (host, run, partition).
#[derive(Debug)]
pub(crate) struct CommitBatch {
    pub(crate) stream: Arc<str>,
    pub(crate) group: Arc<str>,
    pending: std::sync::Mutex<FxHashMap<(NodeId, u64, u32), u64>>,
    /// A `Commits` op is on its way to the node task.
    queued: std::sync::atomic::AtomicBool,
}

impl CommitBatch {
    pub(crate) fn new(stream: Arc<str>, group: Arc<str>) -> Self {
        Self {
            stream,
            group,
            pending: Default::default(),
            queued: Default::default(),
        }
    }

    /// Adds a commit; true if the node task must be told (no `Commits`
    /// op is on its way).
    pub(crate) fn add(&self, host: NodeId, epoch: u64, index: u32, next: u64) -> bool {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let o = p.entry((host, epoch, index)).or_default();
        *o = (*o).max(next);
        !self.queued.swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// Everything gathered; later commits are announced again.
    fn take(&self) -> Vec<((NodeId, u64, u32), u64)> {
        self.queued
            .store(false, std::sync::atomic::Ordering::Release);
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.drain().collect()
    }
}

/// One host's partitions of a stream, for `info`.
#[derive(Debug, Clone)]
pub(crate) struct HostParts {
    pub(crate) host: NodeId,
    pub(crate) parts: Vec<core_stream::PartitionState>,
}

struct LocalConsumer {
    stream: Arc<str>,
    group: Option<Arc<str>>,
    start: Start,
    window: u32,
    inbox: Arc<Inbox<StreamItem>>,
    /// Hosts asked for their partitions (`Watch`).
    watched: FxHashSet<NodeId>,
    /// What the hosts answered.
    hosts: FxHashMap<NodeId, HostView>,
    /// Next offset expected per partition, at a host's run.
    positions: FxHashMap<(NodeId, u32), (u64, u64)>,
    /// Reads going on, per partition.
    active: FxHashMap<(NodeId, u32), u64>,
    /// Refreshed at least once (what appears later is late).
    refreshed: bool,
    /// The live hosts of the stream when the consumer started.
    initial_hosts: FxHashSet<NodeId>,
    /// Every host answered: its run, and whether its partitions are late.
    /// Kept across link ends (unlike `hosts`), so a restart is seen as one.
    seen: FxHashMap<NodeId, (u64, bool)>,
    /// A group member's members and partitions when last logged.
    assigned: (usize, usize),
}

struct Read {
    sid: u64,
    host: NodeId,
    index: u32,
    /// Records the host may still send.
    credit: u32,
}

struct PendingAppend {
    stream: Arc<str>,
    host: NodeId,
    records: Vec<NewRecord>,
    /// The append call and its records' places in it.
    call: u64,
    slots: Vec<usize>,
}

struct AppendCall {
    /// See `StreamOp::Append::durable`.
    durable: bool,
    placed: Vec<Option<Placed>>,
    remaining: usize,
    error: Option<AppendFailure>,
    reply: oneshot::Sender<Result<Vec<Placed>, AppendFailure>>,
}

/// An `info` call gathering the hosts' partitions.
struct InfoGather {
    got: Vec<HostParts>,
    reply: oneshot::Sender<InfoReply>,
}

/// Answers an `info` call: the partitions gathered, and the hosts that did
/// not answer (their link ended, or time ran out).
fn finish_info(done: Gathered<InfoGather>) {
    let _ = done.reply.reply.send((done.reply.got, done.missing));
}

/// A commit's host, the host's run, stream, group and partition.
type CommitKey = (NodeId, u64, Arc<str>, Arc<str>, u32);

/// The node task's stream state.
pub(crate) struct Streams {
    pub(crate) host: core_stream::Streams<NodeId>,
    /// The streams this node hosts (configured, or taken on itself).
    hosting: Hosting,
    consumers: FxHashMap<u64, LocalConsumer>,
    reads: FxHashMap<u64, Read>,
    next_rid: u64,
    /// Local members per (stream, group).
    groups: FxHashMap<(Arc<str>, Arc<str>), usize>,
    pending: FxHashMap<u64, PendingAppend>,
    calls: FxHashMap<u64, AppendCall>,
    next_seq: u64,
    /// Commits to send (the host's run, and the largest offset per
    /// partition and group).
    commits: FxHashMap<CommitKey, u64>,
    /// Credit to grant, per (host, read).
    credits: FxHashMap<(NodeId, u64), u32>,
    /// Host side: consumers watching each stream.
    watchers: FxHashMap<Arc<str>, FxHashSet<(NodeId, u64)>>,
    gathers: Gathers<InfoGather>,
    next_req: u64,
    /// Bumped when a consumer's view of the hosts' partitions changes.
    changed: u64,
    /// When refused reads are tried again.
    retry_at: Option<Instant>,
    /// Watches per peer.
    watches: FxHashMap<NodeId, usize>,
    /// The generations consumers were last refreshed at.
    refreshed_at: (u64, u64, u64),
}

impl Streams {
    pub(crate) fn new(config: &crate::node::Config, local: NodeId) -> Self {
        let mut host = core_stream::Streams::new(config.stream.clone());
        host.exempt_from_quota(local);
        Self {
            host,
            hosting: Hosting::new(
                "stream",
                HOST_PREFIX,
                config.host_all,
                config.host_streams.clone(),
                config.self_host,
                config.stream.max_streams,
            ),
            consumers: FxHashMap::default(),
            reads: FxHashMap::default(),
            next_rid: 0,
            groups: FxHashMap::default(),
            pending: FxHashMap::default(),
            calls: FxHashMap::default(),
            next_seq: 0,
            commits: FxHashMap::default(),
            credits: FxHashMap::default(),
            watchers: FxHashMap::default(),
            gathers: Gathers::default(),
            next_req: 0,
            changed: 0,
            retry_at: None,
            watches: FxHashMap::default(),
            refreshed_at: (u64::MAX, u64::MAX, u64::MAX),
        }
    }

    /// The patterns a node configured to host streams declares at start.
    pub(crate) fn host_patterns(&self) -> Vec<Pattern> {
        self.hosting.configured_patterns(|s| {
            Pattern::new(&format!("{HOST_PREFIX}{s}"))
                .into_iter()
                .collect()
        })
    }

    /// Whether `stream` is hosted here: configured, taken, or holding
    /// partitions (restored, or appended to by a peer).
    fn hosts_locally(&self, stream: &str) -> bool {
        self.hosting.hosts(stream) || self.host.has(stream)
    }

    /// Appends waiting for a host's answer.
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let gather = self.gathers.poll_timeout();
        [self.host.poll_timeout(), gather, self.retry_at]
            .into_iter()
            .flatten()
            .min()
    }
}

fn start_to_wire(s: &Start) -> StartWire<'_> {
    match s {
        Start::Earliest => StartWire::Earliest,
        Start::Latest => StartWire::Latest,
        Start::Offset(o) => StartWire::Offset(*o),
        Start::Time(t) => StartWire::Time(*t),
        Start::Committed { group, latest } => StartWire::Committed {
            group,
            latest: *latest,
        },
    }
}

pub(crate) fn start_from_wire(s: &StartWire<'_>) -> Start {
    match s {
        StartWire::Earliest => Start::Earliest,
        StartWire::Latest => Start::Latest,
        StartWire::Offset(o) => Start::Offset(*o),
        StartWire::Time(t) => Start::Time(*t),
        StartWire::Committed { group, latest } => Start::Committed {
            group: (*group).into(),
            latest: *latest,
        },
    }
}

/// An append's records, parsed (their bytes stay in the frame's buffer).
fn new_records_from_wire(body: &Bytes, records: &[AppendWire<'_>]) -> Vec<NewRecord> {
    records
        .iter()
        .map(|r| NewRecord {
            key: slice(body, r.key.0),
            timestamp_ms: r.ts_ms,
            headers: headers_from_wire(body, &r.headers),
            payload: slice(body, r.payload.0),
        })
        .collect()
}

/// Records a host sent a read, parsed.
fn records_from_wire(body: &Bytes, records: &[RecordWire<'_>]) -> Vec<core_stream::Record> {
    records
        .iter()
        .map(|r| core_stream::Record {
            offset: r.offset,
            key: slice(body, r.key.0),
            timestamp_ms: r.ts_ms,
            headers: headers_from_wire(body, &r.headers),
            payload: slice(body, r.payload.0),
        })
        .collect()
}

/// A host's answer to `info`, parsed: its own view of its partitions,
/// those with offsets in order, at most [`core_stream::MAX_PARTITIONS`].
fn host_parts_from_wire(peer: NodeId, parts: &[PartWire<'_>]) -> Option<HostParts> {
    let parts: Vec<&PartWire<'_>> = parts.iter().filter(|p| p.first <= p.next).collect();
    (!parts.is_empty()).then(|| HostParts {
        host: peer,
        parts: parts
            .into_iter()
            .take(core_stream::MAX_PARTITIONS as usize)
            .map(|p| core_stream::PartitionState {
                index: p.index,
                first: p.first,
                next: p.next,
                bytes: p.bytes,
                committed: p
                    .committed
                    .iter()
                    .map(|(g, o)| (Arc::from(*g), *o))
                    .collect(),
            })
            .collect(),
    })
}

/// The group pattern members of `group` on `stream` declare.
pub(crate) fn group_pattern(stream: &str, group: &str) -> Option<Pattern> {
    Pattern::new(&format!("{GROUP_PREFIX}{stream}.{group}")).ok()
}

impl NodeTask {
    /// Live remote hosts of `stream`, with a link up.
    fn stream_hosts(&self, stream: &str) -> Vec<NodeId> {
        let mut hosts = self.declared(&format!("{HOST_PREFIX}{stream}"));
        hosts.sort_unstable();
        hosts
    }

    /// Remote hosts of `stream` alive by membership, with a link or not.
    fn live_stream_hosts(&self, stream: &str) -> Vec<NodeId> {
        let name = format!("{HOST_PREFIX}{stream}");
        let mut hosts: Vec<NodeId> = self
            .engine
            .interest
            .reserved_interested(&name)
            .into_iter()
            .filter(|n| {
                *n != self.engine.local
                    && crate::engine::access::reserved_permitted(
                        self.engine.access.as_ref(),
                        n,
                        &name,
                    )
                    && matches!(
                        self.engine.membership.state_of(n),
                        Some(MemberState::Alive | MemberState::Suspect)
                    )
            })
            .collect();
        hosts.sort_unstable();
        hosts
    }

    /// Answers an `Info` with no partitions (refused or over budget).
    fn send_empty_info(&mut self, peer: NodeId, req: u64) {
        self.engine.send_empty_info(peer, req);
    }

    fn send_stream(&mut self, peer: NodeId, w: &StreamWire<'_>) {
        self.engine.send_stream(peer, w);
    }

    /// This node hosts `stream` from now on (it appended to it when nobody
    /// hosted it, or a peer sent it an append).
    pub(crate) fn start_hosting_stream(&mut self, stream: &Arc<str>) -> bool {
        if self.streams.hosts_locally(stream) {
            return true;
        }
        if !self.streams.hosting.self_host() {
            // A one-shot tool takes no records it would lose on exit.
            return false;
        }
        let Ok(p) = Pattern::new(&format!("{HOST_PREFIX}{stream}")) else {
            return false;
        };
        let interest = &self.engine.interest;
        if !self
            .streams
            .hosting
            .take(stream, std::slice::from_ref(&p), |p| {
                interest.has_room_for(p)
            })
        {
            return false;
        }
        if let Some(decl) = self.engine.interest.subscribe(&p, false) {
            self.engine.announce(&decl);
        }
        true
    }

    /// Commits a group's offset on this host (and writes it, if durable:
    /// the offset as the core kept it, within the partition).
    fn host_commit(&mut self, stream: &str, group: &str, index: u32, offset: u64) -> bool {
        let committed = |s: &Self| {
            s.streams
                .host
                .partitions(stream)
                .get(index as usize)
                .and_then(|p| {
                    p.committed
                        .iter()
                        .find(|(g, _)| **g == *group)
                        .map(|(_, o)| *o)
                })
        };
        let before = self.durable.is_some().then(|| committed(self)).flatten();
        if !self.streams.host.commit(stream, group, index, offset) {
            return false;
        }
        if self.durable.is_some() {
            let after = committed(self);
            if let (Some(d), Some(offset)) = (self.durable.as_mut(), after) {
                if before.is_none_or(|b| offset > b) {
                    d.push(super::durable::WriteOp::StreamCommit {
                        stream: stream.into(),
                        index,
                        group: group.into(),
                        offset,
                    });
                }
            }
        }
        true
    }

    /// The `Appended` answer to a remote appender.
    pub(crate) fn send_appended(&mut self, peer: NodeId, seq: u64, placed: Vec<(u32, u64)>) {
        let epoch = self.engine.stream_epoch;
        self.send_stream(peer, &StreamWire::Appended { seq, epoch, placed });
    }

    /// A local append call's records stored here are on disk.
    pub(crate) fn stream_call_stored(&mut self, call: u64) {
        if let Some(c) = self.streams.calls.get_mut(&call) {
            c.remaining = c.remaining.saturating_sub(1);
        }
        self.finish_call_if_done(call);
    }

    /// This run's epoch (a durable host keeps its stored one).
    pub(crate) fn set_stream_epoch(&mut self, epoch: u64) {
        self.engine.stream_epoch = epoch;
    }

    /// Appends locally; tells watchers when the stream is new.
    fn append_here(
        &mut self,
        stream: &str,
        records: Vec<NewRecord>,
    ) -> Result<Vec<(u32, u64)>, core_stream::AppendError> {
        let existed = self.streams.host.has(stream);
        let kept = self.durable.is_some().then(|| records.clone());
        let placed = self.streams.host.append(now(), stream, records)?;
        if let (Some(d), Some(kept)) = (self.durable.as_mut(), kept) {
            let name: Arc<str> = self
                .streams
                .host
                .name(stream)
                .cloned()
                .unwrap_or_else(|| stream.into());
            for (r, (index, offset)) in kept.into_iter().zip(&placed) {
                d.stored(
                    &name,
                    *index,
                    core_stream::Record {
                        offset: *offset,
                        key: r.key,
                        timestamp_ms: r.timestamp_ms,
                        headers: r.headers,
                        payload: r.payload,
                    },
                );
            }
        }
        if !existed {
            self.stream_created(stream);
        }
        Ok(placed)
    }

    /// A stream appeared on this host: its watchers learn its partitions.
    fn stream_created(&mut self, stream: &str) {
        self.streams.changed += 1;
        let partitions = self.streams.host.config().partitions;
        let epoch = self.engine.stream_epoch;
        let watchers: Vec<(NodeId, u64)> = self
            .streams
            .watchers
            .get(stream)
            .map(|w| w.iter().copied().collect())
            .unwrap_or_default();
        for (peer, sid) in watchers {
            self.send_stream(
                peer,
                &StreamWire::Parts {
                    sid,
                    epoch,
                    partitions,
                },
            );
        }
    }

    pub(crate) fn stream_op(&mut self, op: StreamOp) {
        match op {
            StreamOp::Append {
                stream,
                records,
                durable,
                reply,
            } => self.append(stream, records, durable, reply),
            StreamOp::Consume {
                sid,
                stream,
                group,
                start,
                window,
                inbox,
            } => {
                if let Some(g) = &group {
                    let n = self
                        .streams
                        .groups
                        .entry((stream.clone(), g.clone()))
                        .or_default();
                    *n += 1;
                    if *n == 1 {
                        if let Some(p) = group_pattern(&stream, g) {
                            if let Some(decl) = self.engine.interest.subscribe(&p, false) {
                                self.engine.announce(&decl);
                            }
                        }
                    }
                }
                // The hosts there are as it starts: partitions of hosts that
                // appear later are read from their start by `Latest`.
                let initial_hosts = self.live_stream_hosts(&stream).into_iter().collect();
                self.streams.consumers.insert(
                    sid,
                    LocalConsumer {
                        stream,
                        group,
                        start,
                        window: window.max(1),
                        inbox,
                        watched: FxHashSet::default(),
                        hosts: FxHashMap::default(),
                        positions: FxHashMap::default(),
                        active: FxHashMap::default(),
                        refreshed: false,
                        initial_hosts,
                        seen: FxHashMap::default(),
                        assigned: (0, 0),
                    },
                );
                self.streams.changed += 1;
            }
            StreamOp::Cancel { sid } => self.cancel_stream_consumer(sid),
            StreamOp::Credit { rid, n } => {
                let Some(r) = self.streams.reads.get_mut(&rid) else {
                    return;
                };
                r.credit = r.credit.saturating_add(n);
                let host = r.host;
                if host == self.engine.local {
                    self.streams.host.credit(&host, rid, n);
                } else {
                    *self.streams.credits.entry((host, rid)).or_default() += n;
                }
            }
            StreamOp::Commits { batch } => {
                for ((host, epoch, index), offset) in batch.take() {
                    self.commit(
                        host,
                        epoch,
                        batch.stream.clone(),
                        batch.group.clone(),
                        index,
                        offset,
                    );
                }
            }
            StreamOp::Info { stream, reply } => {
                let mut got = Vec::new();
                if self.streams.host.has(&stream) {
                    got.push(HostParts {
                        host: self.engine.local,
                        parts: self.streams.host.partitions(&stream),
                    });
                }
                let hosts = self.stream_hosts(&stream);
                self.streams.next_req += 1;
                let req = self.streams.next_req;
                for h in &hosts {
                    self.send_stream(
                        *h,
                        &StreamWire::Info {
                            req,
                            stream: &stream,
                        },
                    );
                }
                let deadline = now() + GATHER_TIMEOUT;
                let info = InfoGather { got, reply };
                if let Some(done) = self.streams.gathers.start(req, hosts, deadline, info) {
                    finish_info(done);
                }
            }
        }
    }

    /// A commit for `host`'s partition: at once if it is this node, else
    /// with the next flush (the largest per partition and group).
    fn commit(
        &mut self,
        host: NodeId,
        epoch: u64,
        stream: Arc<str>,
        group: Arc<str>,
        index: u32,
        offset: u64,
    ) {
        if host == self.engine.local {
            if epoch == self.engine.stream_epoch {
                self.host_commit(&stream, &group, index, offset);
            }
        } else {
            // Per run: the host ignores those of a run not its own.
            let c = self
                .streams
                .commits
                .entry((host, epoch, stream, group, index))
                .or_default();
            *c = (*c).max(offset);
        }
    }

    /// Routes an append call's records: here if this node hosts the
    /// stream, else to live hosts by key, else here from now on.
    fn append(
        &mut self,
        stream: Arc<str>,
        records: Vec<NewRecord>,
        durable: bool,
        reply: oneshot::Sender<Result<Vec<Placed>, AppendFailure>>,
    ) {
        self.streams.next_seq += 1;
        let call = self.streams.next_seq;
        let n = records.len();
        self.streams.calls.insert(
            call,
            AppendCall {
                durable,
                placed: vec![None; n],
                remaining: 0,
                error: None,
                reply,
            },
        );
        self.route_append(call, stream, records, (0..n).collect(), None);
        self.finish_call_if_done(call);
    }

    fn route_append(
        &mut self,
        call: u64,
        stream: Arc<str>,
        records: Vec<NewRecord>,
        slots: Vec<usize>,
        retry: Option<NodeId>,
    ) {
        // A call that needs a durable confirmation is not kept in this
        // node's memory alone.
        let volatile =
            self.durable.is_none() && self.streams.calls.get(&call).is_some_and(|c| c.durable);
        let here = self.streams.hosts_locally(&stream);
        let self_host = self.streams.hosting.self_host();
        let remote = || {
            hosting::failover_hosts(
                retry,
                || self.stream_hosts(&stream),
                || self.live_stream_hosts(&stream),
            )
        };
        let hosts = match hosting::route(here, volatile, self_host, remote) {
            Route::Remote(hosts) => hosts,
            Route::NoHost { .. } => return self.fail_call(call, AppendFailure::NoHost),
            Route::TakeOn => {
                tracing::debug!(%stream, "no host for stream; this node hosts its own partitions");
                if !self.start_hosting_stream(&stream) {
                    let reason = format!(
                        "stream {stream:?} has no host, and this node hosts as many streams as it may"
                    );
                    let e = AppendFailure::Refused { full: true, reason };
                    return self.fail_call(call, e);
                }
                return self.append_local(call, &stream, records, slots);
            }
            Route::Here => return self.append_local(call, &stream, records, slots),
        };
        // Records per host, in order; frames of bounded size.
        let mut per_host: Vec<(NodeId, Vec<NewRecord>, Vec<usize>, usize)> = Vec::new();
        let mut open: FxHashMap<NodeId, usize> = FxHashMap::default();
        for (r, slot) in records.into_iter().zip(slots) {
            let h = match hosts.as_slice() {
                [only] => *only,
                _ => match hosting::record_host(&stream, &r.key, &hosts) {
                    Some(h) => h,
                    None => continue,
                },
            };
            let size = core_stream::record_size(&r.key, &r.headers, &r.payload) as usize;
            let at = match open.get(&h) {
                Some(&i)
                    if per_host[i].1.len() < APPEND_BATCH
                        && per_host[i].3 + size <= FRAME_BYTES =>
                {
                    i
                }
                _ => {
                    per_host.push((h, Vec::new(), Vec::new(), 0));
                    open.insert(h, per_host.len() - 1);
                    per_host.len() - 1
                }
            };
            let chunk = &mut per_host[at];
            chunk.1.push(r);
            chunk.2.push(slot);
            chunk.3 += size;
        }
        for (host, records, slots, _) in per_host {
            self.streams.next_seq += 1;
            let seq = self.streams.next_seq;
            let wire_records: Vec<AppendWire<'_>> = records
                .iter()
                .map(|r| AppendWire {
                    key: Raw(&r.key),
                    ts_ms: r.timestamp_ms,
                    headers: headers_to_wire(&r.headers),
                    payload: Raw(&r.payload),
                })
                .collect();
            let link = self.engine.peers.entry(host);
            wire::encode(
                &mut link.scratch,
                &Frame::Stream(StreamWire::Append {
                    stream: &stream,
                    seq,
                    records: wire_records,
                }),
            );
            link.has_data = true;
            if let Some(c) = self.streams.calls.get_mut(&call) {
                c.remaining += 1;
            }
            self.streams.pending.insert(
                seq,
                PendingAppend {
                    stream: stream.clone(),
                    host,
                    records,
                    call,
                    slots,
                },
            );
        }
    }

    /// An append's records go to this node's partitions; the call resolves
    /// once they are placed (and on disk, if durable).
    fn append_local(
        &mut self,
        call: u64,
        stream: &Arc<str>,
        records: Vec<NewRecord>,
        slots: Vec<usize>,
    ) {
        let local = self.engine.local;
        match self.append_here(stream, records) {
            Ok(placed) => {
                if let Some(c) = self.streams.calls.get_mut(&call) {
                    for (slot, (index, offset)) in slots.into_iter().zip(placed) {
                        c.placed[slot] = Some(Placed {
                            host: local,
                            index,
                            offset,
                        });
                    }
                    if let Some(d) = self.durable.as_mut() {
                        // The call resolves once these are on disk.
                        c.remaining += 1;
                        d.hold(super::durable::Held::StreamCall(call));
                    }
                }
            }
            Err(e) => self.fail_call(
                call,
                AppendFailure::Refused {
                    full: matches!(e, core_stream::AppendError::Full { .. }),
                    reason: e.to_string(),
                },
            ),
        }
    }

    fn fail_call(&mut self, call: u64, e: AppendFailure) {
        if let Some(c) = self.streams.calls.get_mut(&call) {
            c.error.get_or_insert(e);
        }
    }

    fn finish_call_if_done(&mut self, call: u64) {
        if self
            .streams
            .calls
            .get(&call)
            .is_some_and(|c| c.remaining == 0)
        {
            if let Some(c) = self.streams.calls.remove(&call) {
                let result = match c.error {
                    Some(e) => Err(e),
                    None => Ok(c.placed.into_iter().flatten().collect()),
                };
                let _ = c.reply.send(result);
            }
        }
    }

    fn cancel_stream_consumer(&mut self, sid: u64) {
        let Some(c) = self.streams.consumers.remove(&sid) else {
            return;
        };
        c.inbox.close();
        for (_, rid) in c.active {
            self.stop_read(rid);
        }
        for h in c.watched {
            if h != self.engine.local {
                self.send_stream(h, &StreamWire::Unwatch { sid });
            }
        }
        if let Some(g) = c.group {
            let key = (c.stream.clone(), g.clone());
            let last = match self.streams.groups.get_mut(&key) {
                Some(n) => {
                    *n -= 1;
                    *n == 0
                }
                None => false,
            };
            if last {
                self.streams.groups.remove(&key);
                if let Some(p) = group_pattern(&c.stream, &g) {
                    if let Some(decl) = self.engine.interest.unsubscribe(&p, false) {
                        self.engine.announce(&decl);
                    }
                }
            }
            // The group's other local members may take its partitions.
            self.streams.changed += 1;
        }
    }

    fn stop_read(&mut self, rid: u64) {
        let Some(r) = self.streams.reads.remove(&rid) else {
            return;
        };
        self.streams.credits.remove(&(r.host, rid));
        if r.host == self.engine.local {
            self.streams.host.close(&r.host, rid);
        } else if self.engine.peers.is_up(&r.host) {
            self.send_stream(r.host, &StreamWire::Stop { rid });
        }
    }

    /// Decides, for every consumer, which partitions it reads, and starts
    /// and stops reads to match.
    fn refresh_stream_consumers(&mut self) {
        let sids: Vec<u64> = self.streams.consumers.keys().copied().collect();
        for sid in sids {
            self.refresh_consumer(sid);
        }
    }

    fn refresh_consumer(&mut self, sid: u64) {
        let local = self.engine.local;
        let Some(c) = self.streams.consumers.get(&sid) else {
            return;
        };
        let stream = c.stream.clone();
        let group = c.group.clone();
        let remote = self.stream_hosts(&stream);
        // Watch new hosts.
        let to_watch: Vec<NodeId> = remote
            .iter()
            .filter(|h| !c.watched.contains(h))
            .copied()
            .collect();
        for h in &to_watch {
            self.send_stream(
                *h,
                &StreamWire::Watch {
                    sid,
                    stream: &stream,
                },
            );
        }
        let local_view = self.streams.host.has(&stream).then(|| HostView {
            epoch: self.engine.stream_epoch,
            partitions: self.streams.host.config().partitions,
            late: false,
        });
        // Members of the group, and this node's members of it.
        let assignment = group.as_ref().map(|g| {
            let mut members = self.declared(&format!("{GROUP_PREFIX}{stream}.{g}"));
            members.push(local);
            members.sort_unstable();
            members.dedup();
            let mut locals: Vec<u64> = self
                .streams
                .consumers
                .iter()
                .filter(|(_, o)| o.stream == stream && o.group.as_ref() == Some(g))
                .map(|(s, _)| *s)
                .collect();
            locals.sort_unstable();
            (g.clone(), members, locals)
        });
        let Some(c) = self.streams.consumers.get_mut(&sid) else {
            return;
        };
        c.watched.extend(to_watch);
        let live: FxHashSet<NodeId> = remote.iter().copied().collect();
        c.watched.retain(|h| live.contains(h));
        c.hosts.retain(|h, _| live.contains(h));
        match local_view {
            Some(mut v) => {
                // Created here after this consumer started: late.
                v.late = c.hosts.get(&local).map_or(c.refreshed, |old| old.late);
                c.hosts.insert(local, v);
            }
            None => {
                c.hosts.remove(&local);
            }
        }
        // The partitions this consumer wants.
        c.refreshed = true;
        let share = assignment
            .as_ref()
            .map(|(g, members, locals)| group::Assignment {
                group: g,
                members,
                locals,
            });
        let want = group::wanted(&stream, local, sid, &c.hosts, share.as_ref());
        let wanted: FxHashSet<(NodeId, u32)> = want.iter().map(|(h, i, ..)| (*h, *i)).collect();
        let stop: Vec<((NodeId, u32), u64)> = c
            .active
            .iter()
            .filter(|(p, _)| !wanted.contains(p))
            .map(|(p, r)| (*p, *r))
            .collect();
        for (p, _) in &stop {
            c.active.remove(p);
            // A group partition that went to another member resumes there
            // from the commit; a host that is only out of reach keeps our
            // place.
            if c.group.is_some() && c.hosts.contains_key(&p.0) {
                c.positions.remove(p);
            }
        }
        let window = c.window;
        let mut start = Vec::new();
        for (h, i, epoch, late) in want {
            if c.active.contains_key(&(h, i)) {
                continue;
            }
            let position = c.positions.get(&(h, i)).copied();
            let from = group::read_from(&c.start, c.group.as_ref(), position, epoch, late);
            if let Start::Offset(o) = from {
                c.positions.insert((h, i), (epoch, o));
            } else {
                c.positions.remove(&(h, i));
            }
            self.streams.next_rid += 1;
            let rid = self.streams.next_rid;
            c.active.insert((h, i), rid);
            start.push((h, i, rid, from));
        }
        if let Some((g, members, _)) = &assignment {
            let assigned = (members.len(), c.active.len());
            if assigned != c.assigned || !stop.is_empty() || !start.is_empty() {
                c.assigned = assigned;
                // What Kafka logs as a rebalance: operators (and tests)
                // see when the members or this member's share change.
                tracing::info!(
                    %stream,
                    group = %g,
                    members = members.len(),
                    partitions = c.active.len(),
                    "group assignment changed"
                );
            }
        }
        for (_, rid) in stop {
            self.stop_read(rid);
        }
        for (host, index, rid, from) in start {
            self.start_read(sid, &stream, window, (host, index, rid), &from);
        }
    }

    /// Read `rid` of consumer `sid` starts on partition `index` of `host`
    /// (this node's partitions read here, a remote host's asked for).
    fn start_read(
        &mut self,
        sid: u64,
        stream: &str,
        window: u32,
        (host, index, rid): (NodeId, u32, u64),
        from: &Start,
    ) {
        let local = self.engine.local;
        self.streams.reads.insert(
            rid,
            Read {
                sid,
                host,
                index,
                credit: window,
            },
        );
        if host == local {
            match self
                .streams
                .host
                .open(local, rid, stream, index, from, window)
            {
                Ok(at) => self.read_started(sid, host, index, at),
                Err(e) => {
                    tracing::warn!(%stream, index, error = %e, "stream read refused");
                    self.read_refused(rid);
                }
            }
        } else {
            self.send_stream(
                host,
                &StreamWire::Read {
                    sid,
                    rid,
                    stream,
                    index,
                    from: start_to_wire(from),
                    credit: window,
                },
            );
        }
    }

    /// A local read starts at `at`: that is where the consumer is.
    /// A read starts at `at` (the host resolved where): that is where the
    /// consumer is, so a read that ends before any record came resumes
    /// there, and a start past the end is not taken for a place.
    fn read_started(&mut self, sid: u64, host: NodeId, index: u32, at: u64) {
        let local_epoch = self.engine.stream_epoch;
        if let Some(c) = self.streams.consumers.get_mut(&sid) {
            let epoch = c.hosts.get(&host).map_or(local_epoch, |v| v.epoch);
            c.positions.insert((host, index), (epoch, at));
        }
    }

    /// A read that could not start is tried again a second later.
    fn read_refused(&mut self, rid: u64) {
        if let Some(r) = self.streams.reads.remove(&rid) {
            if let Some(c) = self.streams.consumers.get_mut(&r.sid) {
                c.active.remove(&(r.host, r.index));
            }
        }
        self.streams
            .retry_at
            .get_or_insert_with(|| now() + READ_RETRY);
    }

    /// Records of read `rid` from `host`, in order: onto the consumer's
    /// inbox, with what was already seen dropped.
    fn records_arrived(
        &mut self,
        host: NodeId,
        rid: u64,
        gone: Option<(u64, u64)>,
        records: Vec<core_stream::Record>,
    ) {
        let Some(r) = self.streams.reads.get_mut(&rid) else {
            return; // stopped meanwhile
        };
        if r.host != host {
            return;
        }
        if records.len() > r.credit as usize {
            // A host that ignores the credit (a bug or a hostile peer)
            // cannot fill our memory: read again from where we are.
            tracing::warn!(%host, rid, "stream host sent more than the credit granted; reading again");
            let (sid, index) = (r.sid, r.index);
            self.stop_read(rid);
            if let Some(c) = self.streams.consumers.get_mut(&sid) {
                c.active.remove(&(host, index));
            }
            self.streams.changed += 1;
            return;
        }
        r.credit -= records.len() as u32;
        let (sid, index) = (r.sid, r.index);
        let epoch = self
            .streams
            .consumers
            .get(&sid)
            .and_then(|c| c.hosts.get(&host))
            .map_or(self.engine.stream_epoch, |v| v.epoch);
        let Some(c) = self.streams.consumers.get_mut(&sid) else {
            return;
        };
        let pos = c.positions.get(&(host, index)).map(|(_, n)| *n);
        let mut next = pos;
        let mut items = Vec::with_capacity(records.len() + 1);
        let mut skipped = 0u32;
        if let Some((wanted, first)) = gone {
            items.push(StreamItem::Gone {
                host,
                index,
                wanted,
                first,
            });
            next = Some(first);
        }
        for record in records {
            match next {
                Some(n) if record.offset < n => {
                    skipped += 1;
                    continue;
                }
                Some(n) if record.offset > n => {
                    tracing::warn!(%host, index, expected = n, got = record.offset, "stream records skipped an offset");
                }
                _ => {}
            }
            next = Some(record.offset.saturating_add(1));
            items.push(StreamItem::Record {
                host,
                epoch,
                rid,
                index,
                record,
            });
        }
        if let Some(n) = next {
            c.positions.insert((host, index), (epoch, n));
        }
        let received = items.len() - usize::from(gone.is_some());
        if c.inbox.push_many(items).is_err() {
            return;
        }
        self.engine.counters.stream_received += received as u64;
        self.engine.counters.stream_repeats += u64::from(skipped);
        if skipped > 0 {
            // Repeats take no room: their credit comes back at once.
            self.stream_op(StreamOp::Credit { rid, n: skipped });
        }
    }

    /// A stream frame from `peer`.
    pub(crate) fn handle_stream(
        &mut self,
        peer: NodeId,
        body: &Bytes,
        w: StreamWire<'_>,
    ) -> Result<(), WireError> {
        match w {
            StreamWire::Append {
                stream,
                seq,
                records,
            } => {
                Topic::new(stream).map_err(|e| WireError::BadTopic(e.to_string()))?;
                let records = new_records_from_wire(body, &records);
                self.host_append(peer, stream, seq, records);
            }
            StreamWire::Appended {
                seq,
                epoch: _,
                placed,
            } => {
                let Some(p) = self.answered_append(peer, seq) else {
                    return Ok(());
                };
                if let Some(c) = self.streams.calls.get_mut(&p.call) {
                    for (slot, (index, offset)) in p.slots.into_iter().zip(placed) {
                        if let Some(s) = c.placed.get_mut(slot) {
                            *s = Some(Placed {
                                host: peer,
                                index,
                                offset,
                            });
                        }
                    }
                    c.remaining -= 1;
                }
                self.finish_call_if_done(p.call);
            }
            StreamWire::AppendRefused { seq, full, reason } => {
                if let Some(p) = self.answered_append(peer, seq) {
                    if let Some(c) = self.streams.calls.get_mut(&p.call) {
                        c.remaining -= 1;
                        c.error.get_or_insert(AppendFailure::Refused {
                            full,
                            reason: reason.to_owned(),
                        });
                    }
                    self.finish_call_if_done(p.call);
                }
            }
            StreamWire::Watch { sid, stream } => {
                Topic::new(stream).map_err(|e| WireError::BadTopic(e.to_string()))?;
                self.host_watch(peer, sid, stream);
            }
            StreamWire::WatchRefused { sid } => {
                if let Some(c) = self.streams.consumers.get_mut(&sid) {
                    if c.watched.remove(&peer) {
                        tracing::warn!(%peer, sid, "stream host refused our watch (its quota is used); trying again in a second");
                        self.streams
                            .retry_at
                            .get_or_insert_with(|| now() + READ_RETRY);
                    }
                }
            }
            StreamWire::Unwatch { sid } => {
                self.host_unwatch(peer, sid);
            }
            StreamWire::Parts {
                sid,
                epoch,
                partitions,
            } => {
                self.parts_arrived(peer, sid, epoch, partitions);
            }
            StreamWire::Read {
                sid: _,
                rid,
                stream,
                index,
                from,
                credit,
            } => {
                Topic::new(stream).map_err(|e| WireError::BadTopic(e.to_string()))?;
                let start = start_from_wire(&from);
                if let Start::Committed { group, .. } = &start {
                    if group.len() > core_stream::MAX_GROUP_LEN {
                        return Err(WireError::BadTopic("group name too long".into()));
                    }
                }
                self.host_read(peer, rid, stream, index, &start, credit);
            }
            StreamWire::ReadStarted { rid, at } => {
                if let Some(r) = self.streams.reads.get(&rid).filter(|r| r.host == peer) {
                    let (sid, index) = (r.sid, r.index);
                    self.read_started(sid, peer, index, at);
                }
            }
            StreamWire::ReadRefused { rid, reason } => {
                if self.streams.reads.get(&rid).is_some_and(|r| r.host == peer) {
                    tracing::warn!(%peer, rid, reason, "stream read refused");
                    self.read_refused(rid);
                }
            }
            StreamWire::Records { rid, gone, records } => {
                let records = records_from_wire(body, &records);
                self.records_arrived(peer, rid, gone, records);
            }
            StreamWire::Credit { rid, n } => self.streams.host.credit(&peer, rid, n),
            StreamWire::Stop { rid } => self.streams.host.close(&peer, rid),
            StreamWire::Commit {
                epoch,
                stream,
                group,
                index,
                offset,
            } => {
                if epoch != self.engine.stream_epoch {
                    tracing::debug!(%peer, stream, group, index, "commit for an earlier run of this host ignored");
                } else if !self.host_commit(stream, group, index, offset) {
                    tracing::debug!(%peer, stream, group, index, "stream commit refused");
                }
            }
            StreamWire::Info { req, .. } if !self.request_allowed(peer) => {
                self.send_empty_info(peer, req);
            }
            StreamWire::Info { req, stream } => {
                self.host_info(peer, req, stream);
            }
            StreamWire::InfoReply {
                req,
                epoch: _,
                parts,
            } => {
                let got = host_parts_from_wire(peer, &parts);
                let done = self
                    .streams
                    .gathers
                    .answer(req, peer, |g| g.got.extend(got));
                if let Some(done) = done {
                    finish_info(done);
                }
            }
        }
        Ok(())
    }

    /// A peer's append to a stream this node hosts (or takes on): placed
    /// and answered (once on disk, if durable), or refused.
    fn host_append(&mut self, peer: NodeId, stream: &str, seq: u64, records: Vec<NewRecord>) {
        // Its appender may think we host it when we do not (a
        // declaration of a previous run): take it, within limits.
        let name: Arc<str> = stream.into();
        let result = if self.start_hosting_stream(&name) {
            self.append_here(stream, records).map_err(|e| {
                (
                    matches!(e, core_stream::AppendError::Full { .. }),
                    e.to_string(),
                )
            })
        } else if !self.streams.hosting.self_host() {
            Err((false, format!("this node does not host stream {stream:?}")))
        } else {
            let e = core_stream::AppendError::TooManyStreams {
                limit: self.streams.host.config().max_streams,
            };
            Err((false, e.to_string()))
        };
        match result {
            Ok(placed) => match self.durable.as_mut() {
                Some(d) => d.hold(super::durable::Held::StreamAppended { peer, seq, placed }),
                None => self.send_appended(peer, seq, placed),
            },
            Err((full, reason)) => self.send_stream(
                peer,
                &StreamWire::AppendRefused {
                    seq,
                    full,
                    reason: &reason,
                },
            ),
        }
    }

    /// The append `seq` waiting for `peer`'s answer, taken out; `None` if
    /// none does (only the host an append went to can answer it).
    fn answered_append(&mut self, peer: NodeId, seq: u64) -> Option<PendingAppend> {
        let ours = self
            .streams
            .pending
            .get(&seq)
            .is_some_and(|p| p.host == peer);
        ours.then(|| self.streams.pending.remove(&seq)).flatten()
    }

    /// Consumer `sid` of `peer` watches `stream` here: it is told this
    /// run's partitions (and told again when they appear), within the
    /// watch quotas.
    fn host_watch(&mut self, peer: NodeId, sid: u64, stream: &str) {
        let total: usize = self.streams.watches.values().sum();
        let mine = self.streams.watches.get(&peer).copied().unwrap_or(0);
        let w = self.streams.watchers.entry(stream.into()).or_default();
        let full =
            w.len() >= MAX_WATCHERS || total >= MAX_ALL_WATCHERS || mine >= MAX_WATCHES_PER_PEER;
        if full && !w.contains(&(peer, sid)) {
            if w.is_empty() {
                self.streams.watchers.remove(stream);
            }
            tracing::warn!(%peer, %stream, "too many consumers watch this stream; refused");
            self.send_stream(peer, &StreamWire::WatchRefused { sid });
            return;
        }
        if w.insert((peer, sid)) {
            *self.streams.watches.entry(peer).or_default() += 1;
        }
        let partitions = if self.streams.host.has(stream) {
            self.streams.host.config().partitions
        } else {
            0
        };
        let epoch = self.engine.stream_epoch;
        self.send_stream(
            peer,
            &StreamWire::Parts {
                sid,
                epoch,
                partitions,
            },
        );
    }

    /// A peer's read of partition `index` of `stream` here: started (and
    /// told where), or refused.
    fn host_read(
        &mut self,
        peer: NodeId,
        rid: u64,
        stream: &str,
        index: u32,
        start: &Start,
        credit: u32,
    ) {
        match self
            .streams
            .host
            .open(peer, rid, stream, index, start, credit)
        {
            Ok(at) => self.send_stream(peer, &StreamWire::ReadStarted { rid, at }),
            Err(e) => {
                let reason = e.to_string();
                self.send_stream(
                    peer,
                    &StreamWire::ReadRefused {
                        rid,
                        reason: &reason,
                    },
                );
            }
        }
    }

    /// Consumer `sid` of `peer` no longer watches.
    fn host_unwatch(&mut self, peer: NodeId, sid: u64) {
        let mut removed = 0;
        self.streams.watchers.retain(|_, w| {
            removed += usize::from(w.remove(&(peer, sid)));
            !w.is_empty()
        });
        if let Some(n) = self.streams.watches.get_mut(&peer) {
            *n = n.saturating_sub(removed);
            if *n == 0 {
                self.streams.watches.remove(&peer);
            }
        }
    }

    /// Host `peer` told consumer `sid` its run and partition count.
    fn parts_arrived(&mut self, peer: NodeId, sid: u64, epoch: u64, partitions: u32) {
        let Some(c) = self.streams.consumers.get_mut(&sid) else {
            return;
        };
        if !c.watched.contains(&peer) {
            return;
        }
        let partitions = partitions.min(core_stream::MAX_PARTITIONS);
        let before = c.seen.get(&peer).copied();
        if before.is_some_and(|(e, _)| e != epoch) {
            // The host restarted: its partitions are new logs.
            c.positions.retain(|(h, _), _| *h != peer);
        }
        let late = partitions == 0
            || !c.initial_hosts.contains(&peer)
            || before.is_some_and(|(e, late)| late || e != epoch);
        if c.seen.len() < 4096 || before.is_some() {
            c.seen.insert(peer, (epoch, late));
        }
        c.hosts.insert(
            peer,
            HostView {
                epoch,
                partitions,
                late,
            },
        );
        self.streams.changed += 1;
    }

    /// A peer asks for this host's partitions of `stream` (`info`).
    fn host_info(&mut self, peer: NodeId, req: u64, stream: &str) {
        let parts = self.streams.host.partitions(stream);
        let wire_parts = parts
            .iter()
            .map(|p| PartWire {
                index: p.index,
                first: p.first,
                next: p.next,
                bytes: p.bytes,
                // Well under the frame limit: at most 16 groups
                // per partition (256 partitions of 16 groups of
                // at most 128 bytes: 512 KiB).
                committed: p
                    .committed
                    .iter()
                    .take(16)
                    .map(|(g, o)| (&**g, *o))
                    .collect(),
            })
            .collect();
        let epoch = self.engine.stream_epoch;
        self.send_stream(
            peer,
            &StreamWire::InfoReply {
                req,
                epoch,
                parts: wire_parts,
            },
        );
    }

    /// The link to `peer` ended: its reads and watches here end, our reads
    /// from it stop (keeping our place), appends waiting for it go
    /// elsewhere.
    pub(crate) fn stream_link_down(&mut self, peer: NodeId) {
        self.streams.host.close_all(|k| *k == peer);
        self.streams.watchers.retain(|_, w| {
            w.retain(|(n, _)| *n != peer);
            !w.is_empty()
        });
        self.streams.watches.remove(&peer);
        self.streams.credits.retain(|(h, _), _| *h != peer);
        self.streams.commits.retain(|(h, ..), _| *h != peer);
        let dead: Vec<u64> = self
            .streams
            .reads
            .iter()
            .filter(|(_, r)| r.host == peer)
            .map(|(rid, _)| *rid)
            .collect();
        for rid in dead {
            if let Some(r) = self.streams.reads.remove(&rid) {
                if let Some(c) = self.streams.consumers.get_mut(&r.sid) {
                    c.active.remove(&(peer, r.index));
                }
            }
        }
        for c in self.streams.consumers.values_mut() {
            c.watched.remove(&peer);
            // Its answer comes again when it is watched again.
            c.hosts.remove(&peer);
        }
        self.streams.changed += 1;
        let mut again: Vec<u64> = self
            .streams
            .pending
            .iter()
            .filter(|(_, p)| p.host == peer)
            .map(|(s, _)| *s)
            .collect();
        again.sort_unstable();
        for seq in again {
            if let Some(p) = self.streams.pending.remove(&seq) {
                if let Some(c) = self.streams.calls.get_mut(&p.call) {
                    c.remaining -= 1;
                }
                self.route_append(p.call, p.stream, p.records, p.slots, Some(peer));
                self.finish_call_if_done(p.call);
            }
        }
        for done in self.streams.gathers.link_down(peer) {
            finish_info(done);
        }
    }

    /// Timers: retention by age, `info` answers that did not come.
    pub(crate) fn stream_timeout(&mut self) {
        let now = now();
        if self.streams.retry_at.is_some_and(|t| t <= now) {
            self.streams.retry_at = None;
            self.streams.changed += 1;
        }
        if self.streams.host.poll_timeout().is_some_and(|t| t <= now) {
            self.streams.host.handle_timeout(now);
        }
        for done in self.streams.gathers.expire(now) {
            tracing::warn!(
                hosts = done.missing.len(),
                "stream hosts did not answer in time; the answer lacks their part"
            );
            finish_info(done);
        }
    }

    /// End of a batch: consumers follow changes in hosts and members,
    /// readers are sent what their credit allows, credit and commits go out.
    pub(crate) fn stream_flush(&mut self) {
        let generation = (
            self.engine.interest.generation(),
            self.links_generation,
            self.streams.changed,
        );
        if self.streams.refreshed_at != generation && !self.streams.consumers.is_empty() {
            self.streams.refreshed_at = generation;
            self.refresh_stream_consumers();
            // Refreshing may have changed things again (local reads).
            self.streams.refreshed_at = (
                self.engine.interest.generation(),
                self.links_generation,
                self.streams.changed,
            );
        }
        while let Some(b) = self.streams.host.poll_dispatch() {
            if b.key == self.engine.local {
                self.records_arrived(b.key, b.rid, b.gone, b.records);
            } else {
                self.send_records(b);
            }
        }
        for ((host, rid), n) in std::mem::take(&mut self.streams.credits) {
            self.send_stream(host, &StreamWire::Credit { rid, n });
        }
        for ((host, epoch, stream, group, index), offset) in
            std::mem::take(&mut self.streams.commits)
        {
            self.send_stream(
                host,
                &StreamWire::Commit {
                    epoch,
                    stream: &stream,
                    group: &group,
                    index,
                    offset,
                },
            );
        }
    }

    fn send_records(&mut self, b: core_stream::Batch<NodeId>) {
        let peer = b.key;
        if !self.engine.peers.is_up(&peer) {
            self.streams.host.close_all(|k| *k == peer);
            return;
        }
        let records: Vec<RecordWire<'_>> = b
            .records
            .iter()
            .map(|r| RecordWire {
                offset: r.offset,
                key: Raw(&r.key),
                ts_ms: r.timestamp_ms,
                headers: headers_to_wire(&r.headers),
                payload: Raw(&r.payload),
            })
            .collect();
        let link = self.engine.peers.entry(peer);
        wire::encode(
            &mut link.scratch,
            &Frame::Stream(StreamWire::Records {
                rid: b.rid,
                gone: b.gone,
                records,
            }),
        );
        link.has_data = true;
    }

    /// Shutdown: handles see the node gone.
    pub(crate) fn stream_close(&mut self) {
        for c in self.streams.consumers.values() {
            c.inbox.close();
        }
    }
}
