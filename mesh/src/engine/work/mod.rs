//! Work queues and request/reply in the node task.
//!
//! Who does what (see `core::queue` for the host's rules):
//! - A node *hosts* a queue when it is configured to (`host_queues`,
//!   `host_all`) or when it sends to a queue nobody hosts (it then hosts its
//!   own messages). Hosts declare the reserved pattern `$q.h.NAME` (or
//!   `$q.h.>`) through the interest table, so every node knows them.
//! - A sender that does not host the queue hands each message to one live
//!   host, chosen by rendezvous hashing of the queue name over the hosts
//!   (so one queue's messages go to one host while the hosts stay), and
//!   resolves the send when that host answers `Accepted`. Sends not
//!   answered when the link to the host ends go again, to the next choice.
//! - A consumer grants credit (`Flow`) to every live host of its queue; the
//!   host delivers (`Deliver`), the consumer settles (`Acks`, batched per
//!   wake-up, `Nack`, `Reject`, `Extend`). A link that ends gives every
//!   message in flight over it back to its queue at once.
//! - Responders declare `$r.PATTERN`; a request goes to one responding
//!   node (round-robin), which hands it to one local responder
//!   (round-robin) and answers on the link it came from.

mod consume;
mod request;
mod send;
#[cfg(test)]
pub(crate) mod tests;

use consume::settle_from_wire;

use std::{
    collections::BinaryHeap,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::engine::reply::Reply;
use bytes::Bytes;
use rustc_hash::{FxHashMap, FxHashSet};

use super::{inbox::Inbox, Engine};
use crate::{
    core::{
        membership::MemberState,
        pubsub::MessageId,
        queue::{self as core_queue, Accepted, ConsumerOptions, Dispatch, NewMessage, Peeked},
        topic::Pattern,
        NodeId,
    },
    engine::hosting::{self, Gathers, Hosting, Route},
    queue::{QueueFull, SendError},
    rpc::RequestError,
    wire::{self, DeliverWire, Frame, PeekedWire, Raw, ReplyStatus, WireError, WorkWire},
};

/// Reserved pattern prefix of a queue host's declaration.
pub(crate) use crate::engine::access::QUEUE_HOST_PREFIX as HOST_PREFIX;
/// Most messages in flight to one remote consumer, whatever credit it
/// grants.
pub(crate) const MAX_REMOTE_PREFETCH: u32 = 65_536;
/// Reserved pattern prefix of a responder's declaration.
pub(crate) use crate::engine::access::SERVE_PREFIX;
/// Most sends and requests waiting for an answer from another node; the
/// node takes no more from handles until some are answered.
pub(crate) const MAX_PENDING: usize = 64 * 1024;
/// How long `peek` and `replay` wait for remote hosts.
const GATHER_TIMEOUT: Duration = Duration::from_secs(2);
/// First retry of a send refused because its queue was full.
const FULL_RETRY: Duration = Duration::from_millis(50);
/// Longest wait between such retries.
const FULL_RETRY_MAX: Duration = Duration::from_secs(1);
/// Most requests waiting for one responder to take them; beyond that the
/// node answers "no responders" (a responder that stopped reading must
/// not fill memory).
const MAX_WAITING_REQUESTS: usize = 64 * 1024;

/// Most deliveries waiting in a consumer's inbox: its credit, from every
/// host, with room to spare.
pub(crate) fn inbox_limit(prefetch: u32) -> usize {
    (prefetch as usize).saturating_mul(64).max(64 * 1024)
}

/// Most tags per `Acks` frame (at most 10 bytes each).
const ACKS_PER_FRAME: usize = 16 * 1024;

/// Most messages per `Deliver` frame.
const DELIVER_BATCH: usize = 512;
/// Payload bytes after which a `Deliver` frame takes no more messages
/// (well under the smallest frame limit).
const DELIVER_BYTES: usize = 256 * 1024;
/// Most messages a `Peeked` answer carries.
pub(crate) const MAX_PEEK: usize = 1000;

/// The interest generation and the link generation: when either moves,
/// the hosts a node talks to may have changed.
type Generation = (u64, u64);

/// A consumer as a host knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ConsumerKey {
    pub(crate) node: NodeId,
    pub(crate) cid: u32,
}

/// A message for a queue, as a handle gives it.
#[derive(Debug)]
pub(crate) struct OutMsg {
    pub(crate) headers: Vec<(String, Bytes)>,
    pub(crate) payload: Bytes,
    pub(crate) delay: Option<Duration>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) dedup: Option<String>,
    /// Confirmed only by a host that keeps it: never by this node hosting
    /// it in memory (an outbox relay's sends).
    pub(crate) durable: bool,
}

/// How a consumer settles a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settle {
    Ack,
    /// Given back unseen (it never reached the application): not an
    /// attempt.
    Release,
    Nack(Option<Duration>),
    Reject(String),
    Extend(Duration),
}

/// A delivery handed to a consumer handle.
#[derive(Debug)]
pub(crate) struct DeliveryData {
    pub(crate) host: NodeId,
    pub(crate) cid: u32,
    /// The host's run the tag is of.
    pub(crate) epoch: u64,
    pub(crate) tag: u64,
    pub(crate) attempt: u32,
    pub(crate) id: MessageId,
    pub(crate) headers: Vec<(String, Bytes)>,
    pub(crate) payload: Bytes,
    pub(crate) dead: Option<(u32, String)>,
}

/// A request handed to a responder handle.
#[derive(Debug)]
pub(crate) struct RequestData {
    pub(crate) from: NodeId,
    pub(crate) id: u64,
    pub(crate) subject: Arc<str>,
    pub(crate) headers: Vec<(String, Bytes)>,
    pub(crate) payload: Bytes,
}

/// Work from handles to the node task.
#[derive(Debug)]
pub(crate) enum Op {
    Send {
        queue: Arc<str>,
        msg: OutMsg,
        reply: Reply<Result<MessageId, SendError>>,
    },
    SendBatch {
        queue: Arc<str>,
        msgs: Vec<OutMsg>,
        reply: Reply<Result<Vec<MessageId>, SendError>>,
    },
    Request {
        subject: Arc<str>,
        headers: Vec<(String, Bytes)>,
        payload: Bytes,
        timeout: Duration,
        reply: Reply<Result<Bytes, RequestError>>,
    },
    Consume {
        cid: u32,
        queue: Arc<str>,
        options: ConsumerOptions,
        inbox: Arc<Inbox<DeliveryData>>,
    },
    Cancel {
        cid: u32,
    },
    Settle {
        host: NodeId,
        cid: u32,
        epoch: u64,
        tag: u64,
        how: Settle,
    },
    Peek {
        queue: Arc<str>,
        limit: usize,
        reply: Reply<Vec<Peeked>>,
    },
    Replay {
        queue: Arc<str>,
        reply: Reply<u64>,
    },
    Stats {
        queue: Arc<str>,
        reply: Reply<core_queue::QueueStats>,
    },
    Serve {
        sid: u32,
        pattern: Pattern,
        inbox: Arc<Inbox<RequestData>>,
    },
    Unserve {
        sid: u32,
    },
    Respond {
        to: NodeId,
        id: u64,
        status: ReplyStatus,
        payload: Bytes,
    },
    /// Streams (see `engine::streams`).
    Stream(super::streams::StreamOp),
}

struct LocalConsumer {
    queue: Arc<str>,
    options: ConsumerOptions,
    inbox: Arc<Inbox<DeliveryData>>,
    /// Hosts that have our `Flow`.
    granted: FxHashSet<NodeId>,
}

/// Whom a send's outcome goes to.
pub(crate) enum SendReply {
    One(Reply<Result<MessageId, SendError>>),
    /// A message of batch `id` (see `Work::batches`).
    Batch(u64),
}

struct Batch {
    ids: Vec<MessageId>,
    remaining: usize,
    error: Option<SendError>,
    reply: Reply<Result<Vec<MessageId>, SendError>>,
}

struct PendingSend {
    queue: Arc<str>,
    host: NodeId,
    msg: OutMsg,
    reply: SendReply,
    /// Refused as full this many times in a row.
    full: u32,
    /// Waiting in `retry` to be sent again (not on any link now).
    waiting: bool,
}

struct PendingRequest {
    /// The responder it went to: only its reply counts.
    to: NodeId,
    deadline: Instant,
    timeout: Duration,
    reply: Reply<Result<Bytes, RequestError>>,
}

enum GatherReply {
    Peek(Reply<Vec<Peeked>>, Vec<Peeked>, usize),
    Replay(Reply<u64>, u64),
}

/// The node task's queue and request/reply state.
pub(crate) struct Work {
    pub(crate) host: core_queue::Queues<ConsumerKey>,
    /// Queues this node hosts without being configured to (it sent to them
    /// when nobody hosted them).
    /// The queues this node hosts (configured, or taken on itself).
    hosting: Hosting,
    full_policy: QueueFull,
    consumers: FxHashMap<u32, LocalConsumer>,
    /// Acks to send, per (host, consumer, host epoch).
    acks: FxHashMap<(NodeId, u32, u64), Vec<u64>>,
    /// This run of the host: in every delivery, checked on every settle,
    /// so a tag of a previous run (before a restart) settles nothing.
    pub(crate) epoch: u64,
    /// Sends answered, per sender.
    accepted: FxHashMap<NodeId, Vec<u64>>,
    pending_sends: FxHashMap<u64, PendingSend>,
    /// Sends refused as full, to try again at the time given.
    retry: BinaryHeap<std::cmp::Reverse<(Instant, u64)>>,
    servers: FxHashMap<u32, (Pattern, Arc<Inbox<RequestData>>)>,
    next_server: usize,
    next_responder: usize,
    requests: FxHashMap<u64, PendingRequest>,
    request_deadlines: BinaryHeap<std::cmp::Reverse<(Instant, u64)>>,
    next_request: u64,
    /// Keys request ids: they are unguessable by other peers (a keyed
    /// hash of a counter), so a peer cannot aim a reply at a request it
    /// never saw even where the responder check would not catch it.
    pub(crate) request_key: [u8; 32],
    gathers: Gathers<GatherReply>,
    /// Host choices per queue, at an interest and link generation.
    host_cache: FxHashMap<Arc<str>, (Generation, Vec<NodeId>)>,
    /// The interest and link generation flows were last granted at.
    flows_at: Generation,
    /// Deliveries from the host core to push at the end of the batch.
    dispatch: Vec<Dispatch<ConsumerKey>>,
    /// `send_batch` calls waiting for all their messages.
    batches: FxHashMap<u64, Batch>,
    next_batch: u64,
}

impl Work {
    /// A fresh request id: a keyed hash of a counter, never 0, never one
    /// in use.
    fn request_id(&mut self) -> u64 {
        use sha2::Digest;
        loop {
            self.next_request += 1;
            let mut h = sha2::Sha256::new();
            h.update(self.request_key);
            h.update(self.next_request.to_le_bytes());
            let digest = h.finalize();
            let id = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
            if id != 0 && !self.requests.contains_key(&id) {
                return id;
            }
        }
    }

    pub(crate) fn new(config: &crate::node::Config) -> Self {
        Self {
            host: core_queue::Queues::new(config.queue.clone()),
            hosting: Hosting::new(
                "queue",
                HOST_PREFIX,
                config.host_all,
                config.host_queues.clone(),
                config.self_host,
                config.queue.max_queues,
            ),
            full_policy: config.queue_full,
            consumers: FxHashMap::default(),
            acks: FxHashMap::default(),
            epoch: 0,
            accepted: FxHashMap::default(),
            pending_sends: FxHashMap::default(),
            retry: BinaryHeap::new(),
            servers: FxHashMap::default(),
            next_server: 0,
            next_responder: 0,
            requests: FxHashMap::default(),
            request_deadlines: BinaryHeap::new(),
            next_request: 0,
            request_key: [0; 32],
            gathers: Gathers::default(),
            host_cache: FxHashMap::default(),
            flows_at: (u64::MAX, u64::MAX),
            dispatch: Vec::new(),
            batches: FxHashMap::default(),
            next_batch: 0,
        }
    }

    /// The patterns a node configured to host queues declares at start.
    pub(crate) fn host_patterns(&self) -> Vec<Pattern> {
        self.hosting.configured_patterns(host_patterns_of)
    }

    /// Whether `queue` is hosted here (a dead-letter queue with its queue).
    fn hosts_locally(&self, queue: &str) -> bool {
        self.hosting.hosts(queue) || dlq_of(queue).is_some_and(|b| self.hosting.hosts(b))
    }

    /// Whether the node may take more sends and requests from handles.
    pub(crate) fn has_room(&self) -> bool {
        self.pending_sends.len() + self.requests.len() < MAX_PENDING
    }

    /// When a timer of this module is next due.
    pub(crate) fn poll_timeout(&mut self) -> Option<Instant> {
        let retry = self.retry.peek().map(|r| r.0 .0);
        let req = self.request_deadlines.peek().map(|r| r.0 .0);
        let gather = self.gathers.poll_timeout();
        [self.host.poll_timeout(), retry, req, gather]
            .into_iter()
            .flatten()
            .min()
    }
}

/// `queue` and its dead-letter queue, as host patterns.
fn host_patterns_of(queue: &str) -> Vec<Pattern> {
    [
        format!("{HOST_PREFIX}{queue}"),
        format!("{HOST_PREFIX}{}", core_queue::dlq_name(queue)),
    ]
    .iter()
    .filter_map(|p| Pattern::new(p).ok())
    .collect()
}

/// The queue whose dead-letter queue `queue` is.
fn dlq_of(queue: &str) -> Option<&str> {
    queue.strip_suffix(core_queue::DLQ_SUFFIX)
}

pub(crate) fn headers_to_wire(headers: &[(String, Bytes)]) -> Vec<(&str, Raw<'_>)> {
    headers.iter().map(|(k, v)| (k.as_str(), Raw(v))).collect()
}

pub(crate) fn headers_from_wire(
    frame: &Bytes,
    headers: &[(&str, Raw<'_>)],
) -> Vec<(String, Bytes)> {
    headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), slice(frame, v.0)))
        .collect()
}

pub(crate) fn slice(frame: &Bytes, part: &[u8]) -> Bytes {
    if part.is_empty() {
        Bytes::new()
    } else {
        frame.slice_ref(part)
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

impl Engine {
    /// Live remote nodes declaring `topic` under a reserved prefix, with a
    /// link up.
    pub(crate) fn declared(&self, topic: &str) -> Vec<NodeId> {
        self.interest
            .reserved_interested(topic)
            .into_iter()
            .filter(|n| {
                crate::engine::access::reserved_permitted(self.access.as_ref(), n, topic)
                    && matches!(
                        self.membership.state_of(n),
                        Some(MemberState::Alive | MemberState::Suspect)
                    )
                    && self.peers.is_up(n)
            })
            .collect()
    }

    /// Remote hosts of `queue` a send may go to now.
    fn remote_hosts(&mut self, queue: &Arc<str>) -> Vec<NodeId> {
        let generation = (self.interest.generation(), self.links_generation);
        if let Some((g, hosts)) = self.work.host_cache.get(queue) {
            if *g == generation {
                return hosts.clone();
            }
        }
        let hosts = self.declared(&format!("{HOST_PREFIX}{queue}"));
        if self.work.host_cache.len() > 4096 {
            self.work.host_cache.clear();
        }
        self.work
            .host_cache
            .insert(queue.clone(), (generation, hosts.clone()));
        hosts
    }

    fn declare(&mut self, patterns: Vec<Pattern>) {
        for p in patterns {
            if let Some(decl) = self.interest.subscribe(&p, false) {
                self.announce(&decl);
            }
        }
    }

    /// Whether the node may take more sends, appends and requests from
    /// handles.
    pub(crate) fn work_room(&self) -> bool {
        self.work.has_room() && self.streams.pending() < MAX_PENDING
    }

    /// A call of a handle: a send, a request, a consumer or responder
    /// starting or ending, a settlement, a peek, a stream call.
    pub(crate) fn handle_command(&mut self, now: Instant, op: Op) {
        self.now = now;
        match op {
            Op::Send { queue, msg, reply } => {
                self.seq += 1;
                self.counters.queue_sent += 1;
                let id = MessageId {
                    publisher: self.local,
                    seq: self.seq,
                };
                self.route_send(id.seq, queue, msg, SendReply::One(reply), 0);
            }
            Op::SendBatch { queue, msgs, reply } => {
                self.work.next_batch += 1;
                let b = self.work.next_batch;
                let n = msgs.len();
                self.counters.queue_sent += n as u64;
                let first = self.seq + 1;
                self.work.batches.insert(
                    b,
                    Batch {
                        ids: (0..n as u64)
                            .map(|i| MessageId {
                                publisher: self.local,
                                seq: first + i,
                            })
                            .collect(),
                        remaining: n,
                        error: None,
                        reply,
                    },
                );
                if n == 0 {
                    self.resolve_send(
                        SendReply::Batch(b),
                        Ok(MessageId {
                            publisher: self.local,
                            seq: 0,
                        }),
                    );
                }
                for msg in msgs {
                    self.seq += 1;
                    self.route_send(self.seq, queue.clone(), msg, SendReply::Batch(b), 0);
                }
            }
            Op::Request {
                subject,
                headers,
                payload,
                timeout,
                reply,
            } => self.request(subject, headers, payload, timeout, reply),
            Op::Consume {
                cid,
                queue,
                options,
                inbox,
            } => {
                let key = ConsumerKey {
                    node: self.local,
                    cid,
                };
                self.work.consumers.insert(
                    cid,
                    LocalConsumer {
                        queue: queue.clone(),
                        options,
                        inbox,
                        granted: FxHashSet::default(),
                    },
                );
                if self.work.hosts_locally(&queue) {
                    if let Err(e) = self.work.host.set_consumer(&queue, key, options) {
                        tracing::warn!(error = %e, "consumer refused");
                    }
                }
                self.work.flows_at = (u64::MAX, u64::MAX);
            }
            Op::Cancel { cid } => self.cancel_consumer(cid),
            Op::Settle {
                host,
                cid,
                epoch,
                tag,
                how,
            } => self.settle(host, cid, epoch, tag, how),
            Op::Peek {
                queue,
                limit,
                reply,
            } => {
                let limit = limit.min(MAX_PEEK);
                let local = self.work.host.peek(&queue, limit);
                let hosts = self.remote_hosts(&queue);
                let req = self.gather(&hosts, GatherReply::Peek(reply, local, limit));
                for h in hosts {
                    self.send_work(
                        h,
                        &WorkWire::Peek {
                            req,
                            queue: &queue,
                            limit: limit as u32,
                        },
                    );
                }
            }
            Op::Replay { queue, reply } => {
                let moved = self.work.host.replay_dead_letters(self.now, &queue) as u64;
                let hosts = self.remote_hosts(&queue);
                let req = self.gather(&hosts, GatherReply::Replay(reply, moved));
                for h in hosts {
                    self.send_work(h, &WorkWire::Replay { req, queue: &queue });
                }
            }
            Op::Stats { queue, reply } => {
                reply.send(self.work.host.stats(&queue));
            }
            Op::Serve {
                sid,
                pattern,
                inbox,
            } => {
                if let Ok(p) = Pattern::new(&format!("{SERVE_PREFIX}{pattern}")) {
                    self.declare(vec![p]);
                }
                self.work.servers.insert(sid, (pattern, inbox));
            }
            Op::Unserve { sid } => {
                if let Some((pattern, inbox)) = self.work.servers.remove(&sid) {
                    if let Ok(p) = Pattern::new(&format!("{SERVE_PREFIX}{pattern}")) {
                        if let Some(decl) = self.interest.unsubscribe(&p, false) {
                            self.announce(&decl);
                        }
                    }
                    for r in inbox.close() {
                        self.respond(r.from, r.id, ReplyStatus::NoResponders, Bytes::new());
                    }
                }
            }
            Op::Respond {
                to,
                id,
                status,
                payload,
            } => self.respond(to, id, status, payload),
            Op::Stream(op) => self.stream_op(op),
        }
    }

    fn gather(&mut self, hosts: &[NodeId], reply: GatherReply) -> u64 {
        self.work.next_request += 1;
        let req = self.work.next_request;
        let deadline = self.now + GATHER_TIMEOUT;
        if let Some(done) = self
            .work
            .gathers
            .start(req, hosts.iter().copied(), deadline, reply)
        {
            finish_gather(done.reply);
        }
        req
    }

    /// A work frame from `peer`.
    pub(crate) fn handle_work(
        &mut self,
        peer: NodeId,
        body: &Bytes,
        w: WorkWire<'_>,
    ) -> Result<(), WireError> {
        match w {
            WorkWire::Send {
                queue,
                seq,
                delay_ms,
                ttl_ms,
                dedup,
                headers,
                payload,
            } => {
                crate::core::topic::Topic::new(queue)
                    .map_err(|e| WireError::BadTopic(e.to_string()))?;
                let msg = OutMsg {
                    headers: headers_from_wire(body, &headers),
                    payload: slice(body, payload.0),
                    delay: (delay_ms > 0).then(|| Duration::from_millis(delay_ms)),
                    ttl: (ttl_ms > 0).then(|| Duration::from_millis(ttl_ms)),
                    dedup: dedup.map(str::to_owned),
                    durable: false,
                };
                self.host_send(peer, queue, seq, msg);
            }
            WorkWire::Accepted { seqs } => {
                tracing::trace!(local = %self.local, %peer, ?seqs, "work: accepted");
                for seq in seqs {
                    if let Some(p) = self.answered_send(peer, seq) {
                        let id = MessageId {
                            publisher: self.local,
                            seq,
                        };
                        self.resolve_send(p.reply, Ok(id));
                    }
                }
            }
            WorkWire::Refused { seq, full, reason } => {
                if let Some(p) = self.answered_send(peer, seq) {
                    if full && self.work.full_policy == QueueFull::Wait {
                        self.wait_for_room(seq, p);
                    } else if full {
                        self.resolve_send(p.reply, Err(SendError::Full(reason.to_owned())));
                    } else {
                        self.resolve_send(p.reply, Err(SendError::Refused(reason.to_owned())));
                    }
                }
            }
            WorkWire::Flow {
                queue,
                cid,
                prefetch,
                visibility_ms,
                max_attempts,
            } => {
                crate::core::topic::Topic::new(queue)
                    .map_err(|e| WireError::BadTopic(e.to_string()))?;
                let options = ConsumerOptions {
                    // A peer's credit is bounded here too: what it is
                    // sent waits in its link's outbox until it reads.
                    prefetch: prefetch.min(MAX_REMOTE_PREFETCH),
                    visibility_timeout: Duration::from_millis(visibility_ms),
                    max_attempts,
                };
                let key = ConsumerKey { node: peer, cid };
                if let Err(e) = self.work.host.set_consumer(queue, key, options) {
                    tracing::warn!(%peer, error = %e, "consumer refused");
                }
            }
            WorkWire::Deliver {
                queue: _,
                cid,
                epoch,
                msgs,
            } => {
                self.deliveries_arrived(peer, body, cid, epoch, msgs)?;
            }
            WorkWire::Acks { cid, epoch, tags } => self.host_acks(peer, cid, epoch, tags),
            w @ (WorkWire::Nack { .. }
            | WorkWire::Release { .. }
            | WorkWire::Reject { .. }
            | WorkWire::Extend { .. }) => {
                if let Some((cid, epoch, tag, how)) = settle_from_wire(&w) {
                    self.host_settle(ConsumerKey { node: peer, cid }, epoch, tag, how);
                }
            }
            WorkWire::Peek { req, .. } if !self.request_allowed(self.now, peer) => {
                self.send_work(
                    peer,
                    &WorkWire::Peeked {
                        req,
                        msgs: Vec::new(),
                    },
                );
            }
            WorkWire::Peek { req, queue, limit } => {
                self.host_peek(peer, req, queue, limit);
            }
            WorkWire::Peeked { req, msgs } => {
                let got = peeked_from_wire(body, &msgs)?;
                self.gathered(req, peer, |r| {
                    if let GatherReply::Peek(_, all, _) = r {
                        all.extend(got);
                    }
                });
            }
            WorkWire::Replay { req, queue } => {
                let moved = self.work.host.replay_dead_letters(self.now, queue) as u64;
                self.send_work(peer, &WorkWire::Replayed { req, moved });
            }
            WorkWire::Replayed { req, moved } => self.gathered(req, peer, |r| {
                if let GatherReply::Replay(_, n) = r {
                    *n += moved;
                }
            }),
            WorkWire::Request {
                id,
                subject,
                headers,
                payload,
            } => {
                crate::core::topic::Topic::new(subject)
                    .map_err(|e| WireError::BadTopic(e.to_string()))?;
                self.serve_locally(RequestData {
                    from: peer,
                    id,
                    subject: subject.into(),
                    headers: headers_from_wire(body, &headers),
                    payload: slice(body, payload.0),
                });
            }
            WorkWire::Reply {
                id,
                status,
                payload,
            } => self.reply_arrived(peer, id, status, slice(body, payload.0)),
        }
        Ok(())
    }

    /// A peer peeks at `queue` here: what this node holds of it, within
    /// one frame.
    fn host_peek(&mut self, peer: NodeId, req: u64, queue: &str, limit: u32) {
        let msgs = self.work.host.peek(queue, (limit as usize).min(MAX_PEEK));
        let ids: Vec<Vec<u8>> = msgs.iter().map(|m| m.id.publisher.to_bytes()).collect();
        // The answer stays well under the frame limit.
        let mut bytes = 0;
        let fit = msgs
            .iter()
            .take_while(|m| {
                bytes += m.payload.len()
                    + m.headers
                        .iter()
                        .map(|(k, v)| k.len() + v.len() + 10)
                        .sum::<usize>()
                    + 256;
                bytes <= DELIVER_BYTES
            })
            .count()
            .max(1)
            .min(msgs.len());
        let wire_msgs = msgs[..fit]
            .iter()
            .zip(&ids)
            .map(|(m, id)| PeekedWire {
                origin: Raw(id),
                seq: m.id.seq,
                attempts: m.attempts,
                in_flight: m.in_flight,
                dead: m.dead.as_ref().map(|(n, r)| (*n, r.as_str())),
                headers: headers_to_wire(&m.headers),
                payload: Raw(&m.payload),
            })
            .collect();
        self.send_work(
            peer,
            &WorkWire::Peeked {
                req,
                msgs: wire_msgs,
            },
        );
    }

    fn gathered(&mut self, req: u64, peer: NodeId, add: impl FnOnce(&mut GatherReply)) {
        if let Some(done) = self.work.gathers.answer(req, peer, add) {
            finish_gather(done.reply);
        }
    }

    /// The link to `peer` ended (or it went down): its consumers' messages
    /// come back, sends waiting for it go elsewhere, it no longer has our
    /// credit, and what we asked of it is answered without it.
    pub(crate) fn work_link_down(&mut self, now: Instant, peer: NodeId) {
        self.now = now;
        self.stream_link_down(peer);
        self.work
            .host
            .remove_consumers(self.now, |k| k.node == peer);
        for c in self.work.consumers.values_mut() {
            c.granted.remove(&peer);
        }
        self.work.flows_at = (u64::MAX, u64::MAX);
        self.work.acks.retain(|(h, _, _), _| *h != peer);
        self.work.host_cache.clear();
        let mut again: Vec<u64> = self
            .work
            .pending_sends
            .iter()
            .filter(|(_, p)| p.host == peer && !p.waiting)
            .map(|(s, _)| *s)
            .collect();
        again.sort_unstable();
        tracing::trace!(local = %self.local, %peer, resend = again.len(), "work: link down");
        for seq in again {
            if let Some(p) = self.work.pending_sends.remove(&seq) {
                self.route_send(seq, p.queue, p.msg, p.reply, p.full);
            }
        }
        for done in self.work.gathers.link_down(peer) {
            finish_gather(done.reply);
        }
    }

    /// Timers: the host core's, sends to retry, requests and gathers that
    /// ran out of time.
    pub(crate) fn work_timeout(&mut self, now: Instant) {
        self.now = now;
        self.stream_timeout();
        if self.work.host.poll_timeout().is_some_and(|t| t <= now) {
            self.work.host.handle_timeout(now);
        }
        while let Some(std::cmp::Reverse((at, seq))) = self.work.retry.peek().copied() {
            if at > now {
                break;
            }
            self.work.retry.pop();
            if self.work.pending_sends.get(&seq).is_some_and(|p| p.waiting) {
                if let Some(p) = self.work.pending_sends.remove(&seq) {
                    self.route_send(seq, p.queue, p.msg, p.reply, p.full);
                }
            }
        }
        while let Some(std::cmp::Reverse((at, id))) = self.work.request_deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.work.request_deadlines.pop();
            if let Some(p) = self.work.requests.get(&id) {
                if p.deadline <= now {
                    if let Some(p) = self.work.requests.remove(&id) {
                        p.reply.send(Err(RequestError::Timeout(p.timeout)));
                    }
                }
            }
        }
        for done in self.work.gathers.expire(now) {
            tracing::warn!(
                hosts = done.missing.len(),
                "queue hosts did not answer in time; the answer lacks their part"
            );
            finish_gather(done.reply);
        }
    }

    /// End of a batch: grant credit to new hosts, hand ready messages to
    /// consumers, send batched acks and acceptances.
    pub(crate) fn work_flush(&mut self, now: Instant) {
        self.now = now;
        let generation = (self.interest.generation(), self.links_generation);
        if self.work.flows_at != generation && !self.work.consumers.is_empty() {
            self.work.flows_at = generation;
            self.grant_flows();
        }
        let mut out = std::mem::take(&mut self.work.dispatch);
        while let Some(d) = self.work.host.poll_dispatch(now) {
            out.push(d);
        }
        // Grouped per consumer, in order: one frame carries many.
        out.sort_by_key(|d| d.slot);
        while !out.is_empty() {
            let slot = out[0].slot;
            let n = out.iter().take_while(|d| d.slot == slot).count();
            let rest = out.split_off(n);
            let ds = std::mem::replace(&mut out, rest);
            let consumer = ds[0].consumer.clone();
            self.deliver_work(consumer, ds);
        }
        self.work.dispatch = out;
        for ((host, cid, epoch), tags) in std::mem::take(&mut self.work.acks) {
            for chunk in tags.chunks(ACKS_PER_FRAME) {
                self.send_work(
                    host,
                    &WorkWire::Acks {
                        cid,
                        epoch,
                        tags: chunk.to_vec(),
                    },
                );
            }
        }
        let accepted = std::mem::take(&mut self.work.accepted);
        if !accepted.is_empty() {
            match self.durable.as_mut() {
                Some(d) => d.hold(super::durable::Held::QueueAccepted(accepted)),
                None => self.send_accepted(accepted),
            }
        }
        self.stream_flush();
    }

    /// Shutdown: handles see the node gone.
    pub(crate) fn work_close(&mut self) {
        for c in self.work.consumers.values() {
            c.inbox.close();
        }
        for (_, inbox) in self.work.servers.values() {
            inbox.close();
        }
        self.stream_close();
    }
}

/// A host's answer to a peek, parsed (at most [`MAX_PEEK`] messages).
fn peeked_from_wire(body: &Bytes, msgs: &[PeekedWire<'_>]) -> Result<Vec<Peeked>, WireError> {
    msgs.iter()
        .take(MAX_PEEK)
        .map(|m| {
            Ok(Peeked {
                id: MessageId {
                    publisher: wire::node_id(m.origin)?,
                    seq: m.seq,
                },
                attempts: m.attempts,
                dead: m.dead.map(|(n, r)| (n, r.to_owned())),
                in_flight: m.in_flight,
                headers: headers_from_wire(body, &m.headers),
                payload: slice(body, m.payload.0),
            })
        })
        .collect()
}

fn finish_gather(reply: GatherReply) {
    match reply {
        GatherReply::Peek(reply, mut all, limit) => {
            all.truncate(limit);
            reply.send(all);
        }
        GatherReply::Replay(reply, n) => {
            reply.send(n);
        }
    }
}
