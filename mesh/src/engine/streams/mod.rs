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

mod append;
mod read;
#[cfg(test)]
mod tests;

use append::new_records_from_wire;
use read::records_from_wire;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use crate::engine::reply::Reply;
use bytes::Bytes;
use rustc_hash::{FxHashMap, FxHashSet};

use super::{
    inbox::Inbox,
    work::{headers_from_wire, headers_to_wire, slice},
    Engine,
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
        reply: Reply<Result<Vec<Placed>, AppendFailure>>,
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
        reply: Reply<InfoReply>,
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
    reply: Reply<Result<Vec<Placed>, AppendFailure>>,
}

/// An `info` call gathering the hosts' partitions.
struct InfoGather {
    got: Vec<HostParts>,
    reply: Reply<InfoReply>,
}

/// Answers an `info` call: the partitions gathered, and the hosts that did
/// not answer (their link ended, or time ran out).
fn finish_info(done: Gathered<InfoGather>) {
    done.reply.reply.send((done.reply.got, done.missing));
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

impl Engine {
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
            .interest
            .reserved_interested(&name)
            .into_iter()
            .filter(|n| {
                *n != self.local
                    && crate::engine::access::reserved_permitted(self.access.as_ref(), n, &name)
                    && matches!(
                        self.membership.state_of(n),
                        Some(MemberState::Alive | MemberState::Suspect)
                    )
            })
            .collect();
        hosts.sort_unstable();
        hosts
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
        let interest = &self.interest;
        if !self
            .streams
            .hosting
            .take(stream, std::slice::from_ref(&p), |p| {
                interest.has_room_for(p)
            })
        {
            return false;
        }
        if let Some(decl) = self.interest.subscribe(&p, false) {
            self.announce(&decl);
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

    /// This run's epoch (a durable host keeps its stored one).
    pub(crate) fn set_stream_epoch(&mut self, epoch: u64) {
        self.stream_epoch = epoch;
    }

    /// A stream appeared on this host: its watchers learn its partitions.
    fn stream_created(&mut self, stream: &str) {
        self.streams.changed += 1;
        let partitions = self.streams.host.config().partitions;
        let epoch = self.stream_epoch;
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
                            if let Some(decl) = self.interest.subscribe(&p, false) {
                                self.announce(&decl);
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
                if host == self.local {
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
                        host: self.local,
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
                let deadline = self.now + GATHER_TIMEOUT;
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
        if host == self.local {
            if epoch == self.stream_epoch {
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
                            .get_or_insert_with(|| self.now + READ_RETRY);
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
                if epoch != self.stream_epoch {
                    tracing::debug!(%peer, stream, group, index, "commit for an earlier run of this host ignored");
                } else if !self.host_commit(stream, group, index, offset) {
                    tracing::debug!(%peer, stream, group, index, "stream commit refused");
                }
            }
            StreamWire::Info { req, .. } if !self.request_allowed(self.now, peer) => {
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
        let epoch = self.stream_epoch;
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
        let now = self.now;
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
            self.interest.generation(),
            self.links_generation,
            self.streams.changed,
        );
        if self.streams.refreshed_at != generation && !self.streams.consumers.is_empty() {
            self.streams.refreshed_at = generation;
            self.refresh_stream_consumers();
            // Refreshing may have changed things again (local reads).
            self.streams.refreshed_at = (
                self.interest.generation(),
                self.links_generation,
                self.streams.changed,
            );
        }
        while let Some(b) = self.streams.host.poll_dispatch() {
            if b.key == self.local {
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

    /// Shutdown: handles see the node gone.
    pub(crate) fn stream_close(&mut self) {
        for c in self.streams.consumers.values() {
            c.inbox.close();
        }
    }
}
