//! The node's protocol rules, out of the tokio task: sans-IO state the
//! runtime drives (time comes in as `Instant`, output goes out as values),
//! unit tested here in virtual time.
//!
//! [`Engine`] owns the cores (membership, interest, gossip), the pub/sub
//! state (local subscriptions, routes, reliable windows) and each peer's
//! protocol half of its link ([`Peer`]: frame codecs, the bytes encoded for
//! it, whether it is up or leaving). Its driver (`runtime`) owns the I/O
//! half (outboxes, reader tasks, shared-memory rings) and moves what
//! [`Engine::poll_transmit`] hands out to the links' writers.
//!
//! - `pubsub`: frames of pub/sub and reliable pub/sub, publishing, and
//!   declarations.
//! - `hosting`: which queues and streams this node hosts, which host a
//!   message or record goes to (rendezvous), gathers over hosts.
//! - `access`: the reserved names, who may declare and read what, and
//!   each peer's budget of costly requests.
//! - `group`: which partitions a stream consumer or group member reads,
//!   and where each read starts.
//! - `reliable`: the retransmit windows of reliable pub/sub and what a
//!   receiver does with a numbered message (deliver, drop a duplicate, ask
//!   for a resend, hear that messages were lost).
//! - `counters`: what the engine and its driver count.

pub(crate) mod access;
pub(crate) mod counters;
// Without the `sqlite` feature no backend writes what it describes.
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) mod durable;
pub(crate) mod group;
pub(crate) mod hosting;
pub(crate) mod inbox;
pub(crate) mod links;
pub(crate) mod pubsub;
pub(crate) mod reliable;
pub(crate) mod reply;
pub(crate) mod streams;
#[cfg(test)]
pub(crate) mod testing;
pub(crate) mod work;

use std::{sync::Arc, time::Instant};

use rand::rngs::SmallRng;

use crate::{
    core::{
        gossip::Gossip,
        interest::{Interest, RouteCache},
        membership::{self, Membership},
        pubsub::{LinkDecoder, LinkEncoder, LocalSubscriptions, Message, SubId},
        topic::Pattern,
        NodeId,
    },
    security::{Access, Signer, Verifier},
    wire::{self, Frame, GossipCodec},
};
use access::RequestBudget;
use counters::Counters;
use reliable::Reliable;

/// What the engine takes from the node's configuration.
#[derive(Debug, Clone)]
pub(crate) struct EngineConfig {
    /// Bytes a link may hold before publishing to it waits (or, while it
    /// has no stream, before messages for it are dropped).
    pub(crate) link_buffer: usize,
    /// Reliable messages kept per subscriber for resending.
    pub(crate) reliable_window: usize,
    /// Topics published by gossip instead of direct links.
    pub(crate) gossip: Vec<Pattern>,
}

/// The node's protocol state: see the module docs.
pub(crate) struct Engine {
    pub(crate) local: NodeId,
    pub(crate) config: EngineConfig,
    pub(crate) membership: Membership,
    pub(crate) interest: Interest,
    /// Live nodes subscribed per topic.
    pub(crate) routes: RouteCache,
    pub(crate) subs: LocalSubscriptions,
    /// Reliable subscriptions (their patterns are declared reliable).
    pub(crate) reliable_subs: rustc_hash::FxHashSet<SubId>,
    /// Retransmit windows and receipts of reliable pub/sub; its session
    /// is this run's (its start time).
    pub(crate) reliable: Reliable,
    /// Nodes with a reliable subscription per topic, whatever their state.
    pub(crate) reliable_routes: RouteCache,
    /// Messages decoded or published in the current batch, for the driver
    /// to push to their subscription queues together
    /// ([`Engine::take_deliveries`]).
    pending_delivery: Vec<(SubId, Message)>,
    /// Events for the driver ([`Engine::poll_event`]).
    events: std::collections::VecDeque<Event>,
    pub(crate) peers: Peers,
    /// Peers with a live connection (the driver says).
    connected: rustc_hash::FxHashSet<NodeId>,
    pub(crate) counters: Counters,
    /// The access policy, if any.
    pub(crate) access: Option<Access>,
    /// Signs our gossip messages and declarations.
    pub(crate) signer: Signer,
    /// Checks the origin signature of every declaration taken into the
    /// interest table (relayed ones in a `Sync` too).
    pub(crate) decl_verifier: Verifier,
    /// The number of the last message published here.
    pub(crate) seq: u64,
    /// This run of the node's streams (partitions of another run are other
    /// logs): its start time, or a durable host's stored run.
    pub(crate) stream_epoch: u64,
    pub(crate) rng: SmallRng,
    /// Gossip mode: the overlay and broadcast core.
    pub(crate) gossip: Gossip,
    /// Peers the gossip core sent to that are not connected.
    pub(crate) gossip_dial: Vec<NodeId>,
    pub(crate) gossip_codec: GossipCodec,
    /// Subscriptions matching the last gossip topic delivered, at a
    /// subscription generation.
    pub(crate) gossip_targets: Option<(Arc<str>, u64, Arc<[SubId]>)>,
    /// Work queues and request/reply.
    pub(crate) work: work::Work,
    pub(crate) streams: streams::Streams,
    /// Bumped whenever a link comes up or ends (queue hosts and consumers
    /// re-check whom they talk to).
    pub(crate) links_generation: u64,
    /// A durable host's changes and confirmations waiting for its store.
    pub(crate) durable: Option<durable::Store>,
    /// The time of the input being handled (every input brings it).
    pub(crate) now: Instant,
    /// Links that ended and may need a new one.
    pub(crate) relinks: links::Relinks,
}

/// What the engine tells its driver (besides bytes to send and messages to
/// deliver).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// Reliable messages of `publisher` were lost before this node could
    /// fetch them: every reliable subscription hears of it.
    Lagged { publisher: NodeId, missed: u64 },
    /// A peer sent the last of its view of the mesh: this node is ready
    /// and has joined.
    Synced,
    /// `peer` said it is leaving (its `Bye` is acked): its connection
    /// should close soon.
    Leaving(NodeId),
}

/// What membership asks of the driver, in order
/// ([`Engine::poll_member_transmit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MemberOut {
    /// A control frame for a connected peer (membership travels apart
    /// from the data stream, so a probe measures liveness, not backlog).
    Control { to: NodeId, frame: Vec<u8> },
    /// Dial `to`: at `addrs`, or (`None`) where it was last known to be.
    Dial {
        to: NodeId,
        addrs: Option<Vec<Vec<u8>>>,
    },
    /// `to` was declared down: its link ends and its connection closes
    /// (unless it is leaving, and closes its own).
    Down(NodeId),
}

/// Everything [`Engine::new`] needs besides the configuration.
pub(crate) struct Parts {
    pub(crate) local: NodeId,
    pub(crate) membership: Membership,
    /// This run's start time (µs since the Unix epoch): the declarations'
    /// epoch, the reliable session, and the start of message numbering.
    pub(crate) epoch: u64,
    pub(crate) access: Option<Access>,
    pub(crate) signer: Signer,
    pub(crate) rng: SmallRng,
    pub(crate) work: work::Work,
    pub(crate) streams: streams::Streams,
    /// Whether this node is a durable host (has a store).
    pub(crate) durable: bool,
    /// The time the engine starts at.
    pub(crate) now: Instant,
}

impl Engine {
    pub(crate) fn new(config: EngineConfig, parts: Parts) -> Self {
        let Parts {
            local,
            membership,
            epoch,
            access,
            signer,
            rng,
            work,
            streams,
            durable,
            now,
        } = parts;
        Self {
            local,
            config,
            membership,
            interest: Interest::new(local, epoch),
            routes: RouteCache::default(),
            subs: LocalSubscriptions::default(),
            reliable_subs: Default::default(),
            reliable: Reliable::new(epoch),
            reliable_routes: RouteCache::reliable(),
            pending_delivery: Vec::new(),
            events: Default::default(),
            peers: Peers::default(),
            connected: Default::default(),
            counters: Counters::default(),
            access,
            signer,
            decl_verifier: Default::default(),
            // Message ids stay unique and increasing across restarts: a new
            // start numbers from its start time (16 per µs of uptime before
            // a restart could reuse a number).
            seq: epoch << 4,
            stream_epoch: epoch,
            rng,
            gossip: Gossip::new(local, Default::default()),
            gossip_dial: Vec::new(),
            gossip_codec: Default::default(),
            gossip_targets: None,
            work,
            streams,
            links_generation: 0,
            durable: durable.then(|| durable::Store::new(now)),
            now,
            relinks: Default::default(),
        }
    }

    /// Hands each peer's encoded frames to `send`, which takes them out of
    /// the buffer it is given and writes them to the link. `send` answers
    /// how many bytes wait in the link's outbox while it has no stream yet
    /// (`None` once it has one). Peers new since the last call are in
    /// [`Peers::take_created`] (the driver makes their I/O half first).
    pub(crate) fn poll_transmit(
        &mut self,
        mut send: impl FnMut(&NodeId, &mut Vec<u8>) -> Option<usize>,
    ) {
        for (peer, p) in self.peers.map.iter_mut() {
            if !p.scratch.is_empty() {
                p.unsent = send(peer, &mut p.scratch);
            }
        }
    }

    /// The next event for the driver.
    #[must_use]
    pub(crate) fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Messages for this node's subscriptions since the last call, in
    /// order, each with its subscription (the driver pushes them to the
    /// subscription queues).
    pub(crate) fn take_deliveries(&mut self) -> Vec<(SubId, Message)> {
        std::mem::take(&mut self.pending_delivery)
    }

    /// Gives back the buffer [`Engine::take_deliveries`] handed out,
    /// emptied, so the next batch reuses its allocation.
    pub(crate) fn return_deliveries(&mut self, mut buf: Vec<(SubId, Message)>) {
        buf.clear();
        if self.pending_delivery.is_empty() {
            self.pending_delivery = buf;
        }
    }

    /// When [`Engine::handle_timeout`] is next due.
    #[must_use]
    pub(crate) fn poll_timeout(&mut self) -> Option<Instant> {
        [
            self.membership.poll_timeout(),
            self.gossip.poll_timeout(),
            self.work.poll_timeout(),
            self.streams.poll_timeout(),
            self.relinks.next_due(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs the timers that are due: membership probes and suspicion, the
    /// gossip overlay's shuffles and pulls.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if self.membership.poll_timeout().is_some_and(|t| t <= now) {
            self.membership.handle_timeout(now, &mut self.rng);
        }
        if self.gossip.poll_timeout().is_some_and(|t| t <= now) {
            let before = self.gossip.stats().clone();
            self.gossip.handle_timeout(now, &mut self.rng);
            let after = self.gossip.stats();
            if after.unrecovered > before.unrecovered || after.graft_misses > before.graft_misses {
                tracing::warn!(
                    unrecovered = after.unrecovered,
                    graft_misses = after.graft_misses,
                    "gossip messages lost: announced but no neighbour could send them"
                );
            }
        }
        self.work_timeout(now);
    }

    /// What membership wants done: its messages (control frames to
    /// connected peers, a dial to others) first, then what its events
    /// mean (a member up and not connected is dialed; one down ends its
    /// link). Routes are computed anew after any membership event.
    #[must_use]
    pub(crate) fn poll_member_transmit(&mut self) -> Option<MemberOut> {
        while let Some(t) = self.membership.poll_transmit() {
            if t.to == self.local {
                continue;
            }
            // Membership messages go only on connections that exist; to a
            // member with none we dial instead (the probe then fails or
            // not).
            let to = t.to;
            if !self.connected.contains(&to) {
                return Some(MemberOut::Dial { to, addrs: None });
            }
            let mut frame = Vec::new();
            wire::encode_member(&mut frame, &t.message);
            return Some(MemberOut::Control { to, frame });
        }
        while let Some(ev) = self.membership.poll_event() {
            self.routes.invalidate();
            match ev {
                membership::Event::Up { node, addrs } => {
                    tracing::info!(peer = %node, "peer up");
                    if !self.connected.contains(&node) {
                        let addrs = Some(addrs);
                        return Some(MemberOut::Dial { to: node, addrs });
                    }
                }
                membership::Event::Suspect { node } => {
                    tracing::info!(peer = %node, "peer suspect")
                }
                membership::Event::Down { node } => {
                    tracing::info!(peer = %node, "peer down");
                    self.gossip.handle_link_down(node, &mut self.rng);
                    return Some(MemberOut::Down(node));
                }
                membership::Event::Refuted { incarnation } => {
                    tracing::debug!(incarnation, "refuted suspicion of this node");
                }
            }
        }
        None
    }

    /// A connection to `peer` is open.
    pub(crate) fn handle_connected(&mut self, peer: NodeId) {
        self.connected.insert(peer);
    }

    /// The connection to `peer` closed.
    pub(crate) fn handle_disconnected(&mut self, peer: NodeId) {
        self.connected.remove(&peer);
    }

    /// `peer`'s link is up (its handshake done): membership and gossip
    /// hear of it, and reliable subscriptions fetch what this publisher
    /// kept for us while we were apart (everything it kept, if we never
    /// heard from it).
    pub(crate) fn handle_link_up(&mut self, now: Instant, peer: NodeId, addrs: Vec<Vec<u8>>) {
        let p = self.peers.entry(peer);
        p.up = true;
        self.counters.links_opened += 1;
        if !self.reliable_subs.is_empty() {
            let r = self.reliable.link_up(now, peer);
            let (session, next) = (r.session, r.next);
            wire::encode(&mut p.scratch, &Frame::Resume { session, next });
        }
        self.gossip.handle_peer_up(peer, &mut self.rng);
        if self.gossip.active().is_empty() {
            self.gossip.join(now, peer);
        }
        self.membership.handle_link_up(now, peer, addrs);
    }

    /// Whether `peer` may have one more costly answer now (its
    /// [`RequestBudget`]); a refusal is counted.
    pub(crate) fn request_allowed(&mut self, now: Instant, peer: NodeId) -> bool {
        let ok = self
            .peers
            .get_mut(&peer)
            .is_some_and(|l| l.budget.take(now));
        if !ok {
            self.counters.requests_throttled += 1;
            if self.counters.requests_throttled.is_power_of_two() {
                tracing::warn!(%peer, throttled = self.counters.requests_throttled, "peer over its request budget; answering empty");
            }
        }
        ok
    }
}

/// One peer's link as the protocol sees it: the frame codecs, the bytes
/// encoded for it and not yet handed to its writer, and where the link is
/// in its life. The driver's half of the same link holds the I/O.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) enc: LinkEncoder,
    pub(crate) dec: LinkDecoder,
    /// Frames encoded for the peer, taken by [`Engine::poll_transmit`].
    pub(crate) scratch: Vec<u8>,
    /// The handshake is done (and, in a private mesh, the proof checked).
    pub(crate) up: bool,
    pub(crate) bye_acked: bool,
    /// The peer said `Bye`: it is leaving, and will close the connection.
    pub(crate) leaving: bool,
    /// Messages were encoded for it (shutdown waits for those to go out).
    pub(crate) has_data: bool,
    /// Bytes waiting in the link's outbox while it has no stream yet
    /// (`None` once it has one): the driver says.
    pub(crate) unsent: Option<usize>,
    /// The `Seq` frame just read: (session, rseq, to) of the next `Msg`,
    /// which is that reliable message.
    pub(crate) pending_seq: Option<(u64, u64, u64)>,
    /// Messages dropped because its buffer was full before its stream came.
    pub(crate) dropped: u64,
    /// Messages buffered before its stream came.
    pub(crate) queued: u64,
    /// Topic ids of this peer that the access policy does not let it
    /// publish to: its messages on them are dropped (and counted).
    pub(crate) denied_topics: rustc_hash::FxHashSet<u32>,
    /// Answers this peer may still ask for in this second (peeks, stream
    /// infos, reliable resends): see `access::REQUESTS_PER_SEC`.
    pub(crate) budget: RequestBudget,
}

impl Peer {
    fn new(peer: NodeId) -> Self {
        Self {
            enc: LinkEncoder::default(),
            dec: LinkDecoder::new(peer),
            scratch: Vec::new(),
            up: false,
            bye_acked: false,
            leaving: false,
            has_data: false,
            unsent: Some(0),
            pending_seq: None,
            dropped: 0,
            queued: 0,
            denied_topics: Default::default(),
            budget: RequestBudget::default(),
        }
    }

    /// Whether the link has no stream yet.
    pub(crate) fn waiting(&self) -> bool {
        self.unsent.is_some()
    }
}

/// The peers with a link, or one being set up. Keyed by authenticated peer
/// ids (bounded by connections): a fast non-keyed hash is fine.
#[derive(Debug, Default)]
pub(crate) struct Peers {
    map: rustc_hash::FxHashMap<NodeId, Peer>,
    /// Peers added since the driver last asked, in order.
    created: Vec<NodeId>,
}

impl Peers {
    /// The link to `peer`, created (waiting for a stream) if there is none.
    pub(crate) fn entry(&mut self, peer: NodeId) -> &mut Peer {
        self.map.entry(peer).or_insert_with(|| {
            self.created.push(peer);
            Peer::new(peer)
        })
    }

    /// The peers added since the last call that still have a link, in the
    /// order they came: the driver makes their I/O halves in that order,
    /// so its map of links and this one are built alike.
    pub(crate) fn take_created(&mut self) -> impl Iterator<Item = NodeId> + '_ {
        let map = &self.map;
        self.created.drain(..).filter(|p| map.contains_key(p))
    }

    pub(crate) fn get_mut(&mut self, peer: &NodeId) -> Option<&mut Peer> {
        self.map.get_mut(peer)
    }

    pub(crate) fn remove(&mut self, peer: &NodeId) -> Option<Peer> {
        self.map.remove(peer)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&NodeId, &Peer)> {
        self.map.iter()
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &Peer> {
        self.map.values()
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut Peer> {
        self.map.values_mut()
    }

    /// Whether `peer`'s link is up.
    pub(crate) fn is_up(&self, peer: &NodeId) -> bool {
        self.map.get(peer).is_some_and(|p| p.up)
    }
}
