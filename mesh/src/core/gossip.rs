//! Gossip mode: epidemic broadcast over a partial-view overlay, for topics
//! with wide fan-out.
//!
//! Two protocols, as in the papers (Leitão, Pereira, Rodrigues, 2007):
//!
//! - **HyParView** keeps a small *active view* (the overlay's neighbours,
//!   about log n) and a larger *passive view* (candidates to replace failed
//!   neighbours). Joins spread by random walks (`ForwardJoin`), the passive
//!   view is refreshed by periodic `Shuffle` walks, and a failed neighbour is
//!   replaced from the passive view (`Neighbor`). To heal after a partition,
//!   a node that lost neighbours to failures asks them again when they are
//!   reachable again (one reserve slot above the active size accepts them),
//!   so the two sides' overlays join.
//! - **Plumtree** broadcasts over the active view: full messages go to
//!   *eager* neighbours, only ids (`IHave`, batched) to *lazy* ones. A
//!   duplicate turns its sender lazy (`Prune`); a missing message announced
//!   by `IHave` and not received in time is pulled (`Graft`), turning that
//!   link eager. The eager links settle into a spanning tree, so in steady
//!   state each node receives each message about once.
//!
//! Sans-IO like the other cores: time and randomness come in, messages and
//! events go out through `poll_*`.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::{Duration, Instant},
};

use bytes::Bytes;
use rand::{seq::IteratorRandom, Rng, RngCore};

use super::NodeId;

/// A broadcast message's id: its origin and the origin's sequence number.
pub type MsgId = (NodeId, u64);

/// Tuning; the defaults suit meshes of up to a few thousand nodes.
#[derive(Debug, Clone)]
pub struct Config {
    /// Active view size (the overlay degree).
    pub active_size: usize,
    /// Passive view size.
    pub passive_size: usize,
    /// Length of a join's random walk.
    pub active_walk: u8,
    /// At which remaining walk length a joining node enters passive views.
    pub passive_walk: u8,
    /// How often a node shuffles its passive view.
    pub shuffle_interval: Duration,
    /// Nodes sent per shuffle (from the active and from the passive view).
    pub shuffle_active: usize,
    /// See `shuffle_active`.
    pub shuffle_passive: usize,
    /// How often batched `IHave`s go out.
    pub lazy_interval: Duration,
    /// How long a node waits for an announced message before pulling it.
    pub graft_timeout: Duration,
    /// Message ids remembered for deduplication, and messages kept to
    /// answer `Graft`s.
    pub cache: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            active_size: 5,
            passive_size: 30,
            active_walk: 6,
            passive_walk: 3,
            shuffle_interval: Duration::from_secs(10),
            shuffle_active: 3,
            shuffle_passive: 4,
            lazy_interval: Duration::from_millis(100),
            graft_timeout: Duration::from_secs(1),
            cache: 256 * 1024,
        }
    }
}

/// What gossip nodes say to each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A new node asks to join through the receiver.
    Join,
    /// A join's random walk.
    ForwardJoin {
        /// The joining node.
        node: NodeId,
        /// Steps left.
        ttl: u8,
    },
    /// Asks the receiver to become an active neighbour. `high`: the sender
    /// has no neighbour left (or was chosen by a join), accept always.
    Neighbor {
        /// Priority.
        high: bool,
    },
    /// Answers `Neighbor`.
    NeighborReply {
        /// Whether the receiver is now a neighbour.
        accept: bool,
    },
    /// The sender dropped the receiver from its active view.
    Disconnect,
    /// A shuffle's random walk, carrying a sample of the origin's views.
    Shuffle {
        /// Who started it.
        origin: NodeId,
        /// Steps left.
        ttl: u8,
        /// The sample.
        nodes: Vec<NodeId>,
    },
    /// Answers a shuffle with a sample of the receiver's passive view.
    ShuffleReply {
        /// The sample.
        nodes: Vec<NodeId>,
    },
    /// A broadcast message (eager push, or the answer to a `Graft`).
    Gossip {
        /// Its id.
        id: MsgId,
        /// Hops from the origin.
        round: u32,
        /// Its topic.
        topic: std::sync::Arc<str>,
        /// Its payload.
        payload: Bytes,
        /// Opaque to the core (the runtime's publish timestamp and the
        /// origin's signature).
        stamp: Stamp,
    },
    /// Ids of messages the sender has (lazy push), grouped by origin:
    /// (seq, hops) per message.
    IHave {
        /// Per origin, its messages.
        groups: Vec<(NodeId, Vec<(u64, u32)>)>,
    },
    /// Asks for messages and makes the link eager.
    Graft {
        /// The messages wanted.
        ids: Vec<MsgId>,
    },
    /// Makes the link lazy: the receiver sent a duplicate.
    Prune,
}

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// To whom.
    pub to: NodeId,
    /// What.
    pub message: Message,
}

/// What the application learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A broadcast message arrived for the first time.
    Deliver {
        /// Its id.
        id: MsgId,
        /// Hops it took.
        round: u32,
        /// Its topic.
        topic: std::sync::Arc<str>,
        /// Its payload.
        payload: Bytes,
        /// As given to [`Gossip::broadcast_with`].
        stamp: Stamp,
    },
    /// A node entered the active view.
    NeighborUp(NodeId),
    /// A node left the active view.
    NeighborDown(NodeId),
}

/// Counts of what this node sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// `Gossip` messages (payloads) sent.
    pub payloads: u64,
    /// `Gossip` messages received that were duplicates.
    pub duplicates: u64,
    /// `IHave` batches sent.
    pub ihaves: u64,
    /// `Graft`s sent.
    pub grafts: u64,
    /// `Prune`s sent.
    pub prunes: u64,
    /// Overlay maintenance messages sent (HyParView).
    pub overlay: u64,
    /// `Graft`s for messages no longer kept (the puller loses them).
    pub graft_misses: u64,
    /// Announced messages given up on: every announcer was asked.
    pub unrecovered: u64,
}

/// A message kept to answer pulls: hops, topic, payload, stamp.
type Kept = (u32, std::sync::Arc<str>, Bytes, Stamp);

/// What travels with a broadcast message from its origin, opaque to the
/// core: the runtime's publish timestamp and the origin's signature, which
/// every receiver checks so relays can neither forge nor alter a message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamp {
    /// Publish time, µs since the Unix epoch.
    pub timestamp: u64,
    /// The origin's signature (see the runtime); empty in the core's tests.
    pub signature: Bytes,
}

/// Announcements grouped by origin: (seq, hops) per message.
type Announcements = Vec<(NodeId, Vec<(u64, u32)>)>;

/// Most announced-but-missing messages tracked at once (so also the most
/// one `Graft` asks for).
pub const MAX_MISSING: usize = 64 * 1024;

/// A message announced but not received yet.
#[derive(Debug)]
struct Missing {
    /// When to pull it.
    at: Instant,
    /// Who announced it, in order.
    from: VecDeque<NodeId>,
}

/// One node's gossip state. See the [module docs](self).
#[derive(Debug)]
pub struct Gossip {
    local: NodeId,
    config: Config,
    active: BTreeSet<NodeId>,
    passive: BTreeSet<NodeId>,
    /// Active neighbours that get full messages (the rest get `IHave`s).
    eager: BTreeSet<NodeId>,
    /// Neighbours lost to failures, asked again when they are back.
    lost: BTreeSet<NodeId>,
    /// Neighbour requests in flight (to the passive view).
    asking: BTreeSet<NodeId>,
    seq: u64,
    /// Ids seen, as (hash of origin, seq): 16 bytes each, so the window
    /// can be long at high rates.
    seen: rustc_hash::FxHashSet<(u64, u64)>,
    seen_order: VecDeque<(u64, u64)>,
    /// Recent messages, to answer `Graft`s.
    store: rustc_hash::FxHashMap<(u64, u64), Kept>,
    store_order: VecDeque<(u64, u64)>,
    /// Announced but not received: when to pull, and who has it.
    missing: BTreeMap<MsgId, Missing>,
    /// The earliest deadline in `missing` (kept so `poll_timeout` does not
    /// scan it).
    missing_timer: Option<Instant>,

    /// Announcements waiting for the next batch, per lazy neighbour,
    /// grouped by origin.
    lazy_queue: BTreeMap<NodeId, Announcements>,
    next_lazy: Option<Instant>,
    next_shuffle: Option<Instant>,
    /// The origin whose duplicates shape the tree (see `note_origin`).
    reference: Option<(NodeId, Instant)>,
    out: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: Stats,
    scratch: Vec<NodeId>,
}

impl Gossip {
    /// A node with empty views.
    pub fn new(local: NodeId, config: Config) -> Self {
        Self {
            local,
            config,
            active: BTreeSet::new(),
            passive: BTreeSet::new(),
            eager: BTreeSet::new(),
            lost: BTreeSet::new(),
            asking: BTreeSet::new(),
            seq: 0,
            seen: Default::default(),
            seen_order: VecDeque::new(),
            store: Default::default(),
            store_order: VecDeque::new(),
            missing: BTreeMap::new(),
            missing_timer: None,

            lazy_queue: BTreeMap::new(),
            next_lazy: None,
            next_shuffle: None,
            reference: None,
            out: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            scratch: Vec::new(),
        }
    }

    /// The active view.
    pub fn active(&self) -> &BTreeSet<NodeId> {
        &self.active
    }

    /// The passive view.
    pub fn passive(&self) -> &BTreeSet<NodeId> {
        &self.passive
    }

    /// The eager neighbours (the broadcast tree's links at this node).
    pub fn eager(&self) -> &BTreeSet<NodeId> {
        &self.eager
    }

    /// Whether a message with this id was seen already (a duplicate the
    /// core will drop): lets the runtime skip checking its signature.
    pub fn has_seen(&self, id: &MsgId) -> bool {
        self.seen.contains(&Self::key(id))
    }

    /// What this node sent so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    fn send(&mut self, to: NodeId, message: Message) {
        match &message {
            Message::Gossip { .. } => self.stats.payloads += 1,
            Message::IHave { .. } => self.stats.ihaves += 1,
            Message::Graft { .. } => self.stats.grafts += 1,
            Message::Prune => self.stats.prunes += 1,
            _ => self.stats.overlay += 1,
        }
        self.out.push_back(Transmit { to, message });
    }

    /// Joins the overlay through `contact` (any node already in it).
    pub fn join(&mut self, now: Instant, contact: NodeId) {
        if contact == self.local {
            return;
        }
        self.next_shuffle
            .get_or_insert(now + self.config.shuffle_interval);
        self.send(contact, Message::Join);
    }

    /// A node became reachable again (the membership saw it come back). If
    /// it was a neighbour lost to a failure, it is asked again; otherwise it
    /// becomes a candidate.
    pub fn handle_peer_up(&mut self, node: NodeId, rng: &mut impl RngCore) {
        if node == self.local || self.active.contains(&node) {
            return;
        }
        if self.lost.remove(&node) {
            self.asking.insert(node);
            let high = self.active.is_empty();
            self.send(node, Message::Neighbor { high });
        } else {
            self.add_passive(node, rng);
        }
    }

    /// The link to `node` failed: it leaves the active view, and a passive
    /// node is asked to replace it.
    pub fn handle_link_down(&mut self, node: NodeId, rng: &mut impl RngCore) {
        let was_asked = self.asking.remove(&node);
        let was_active = self.remove_active(node);
        if was_active && self.lost.len() < self.config.passive_size {
            self.lost.insert(node);
        }
        self.passive.remove(&node);
        if was_active || was_asked {
            self.fill_active(rng);
        }
        // Announcements from it will not be answered.
        for m in self.missing.values_mut() {
            m.from.retain(|n| *n != node);
        }
    }

    /// Only duplicates of one origin's messages prune links: the smallest
    /// origin id heard from lately, which every node agrees on. With every
    /// origin pruning, two messages from different origins crossing a cycle
    /// at once cut it twice and split the tree; pulls then rejoin the
    /// pieces from many nodes at once, making new cycles, and the tree
    /// never settles (measured: 1.4 payloads per delivery and a p50 near
    /// the pull timeout at 100 nodes with 100 origins). With one shaping
    /// origin the tree converges as for a single sender, and every origin
    /// uses it.
    fn note_origin(&mut self, now: Instant, origin: NodeId) -> bool {
        const REFERENCE_TTL: Duration = Duration::from_secs(5);
        match &mut self.reference {
            Some((r, seen)) if *r == origin => *seen = now,
            Some((r, seen)) if origin > *r && now.duration_since(*seen) < REFERENCE_TTL => {}
            _ => self.reference = Some((origin, now)),
        }
        self.reference.is_some_and(|(r, _)| r == origin)
    }

    /// Broadcasts a message from this node; returns its id.
    pub fn broadcast(&mut self, now: Instant, topic: std::sync::Arc<str>, payload: Bytes) -> MsgId {
        let seq = self.seq + 1;
        self.broadcast_with(now, seq, topic, payload, Stamp::default())
    }

    /// Broadcasts with the caller's sequence number (which must grow) and
    /// an opaque `stamp` delivered with it.
    pub fn broadcast_with(
        &mut self,
        now: Instant,
        seq: u64,
        topic: std::sync::Arc<str>,
        payload: Bytes,
        stamp: Stamp,
    ) -> MsgId {
        self.seq = self.seq.max(seq);
        let id = (self.local, seq);
        self.note_origin(now, self.local);
        self.remember(id, 0, &topic, &payload, stamp.clone());
        self.push(now, id, 0, &topic, &payload, stamp, None);
        id
    }

    fn key(id: &MsgId) -> (u64, u64) {
        use std::hash::{Hash, Hasher};
        let mut h = rustc_hash::FxHasher::default();
        id.0.hash(&mut h);
        (h.finish(), id.1)
    }

    /// Sends a new message on: full to the eager neighbours, announced to
    /// the lazy ones.
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        now: Instant,
        id: MsgId,
        round: u32,
        topic: &std::sync::Arc<str>,
        payload: &Bytes,
        stamp: Stamp,
        from: Option<NodeId>,
    ) {
        // One scratch list, reused: this runs per message.
        let mut peers = std::mem::take(&mut self.scratch);
        peers.clear();
        peers.extend(self.eager.iter().copied().filter(|n| Some(*n) != from));
        for &n in &peers {
            self.send(
                n,
                Message::Gossip {
                    id,
                    round: round.saturating_add(1),
                    topic: topic.clone(),
                    payload: payload.clone(),
                    stamp: stamp.clone(),
                },
            );
        }
        peers.clear();
        peers.extend(
            self.active
                .iter()
                .copied()
                .filter(|n| Some(*n) != from && !self.eager.contains(n)),
        );
        if !peers.is_empty() {
            for &n in &peers {
                let groups = self.lazy_queue.entry(n).or_default();
                match groups.last_mut() {
                    Some((origin, ids)) if *origin == id.0 => {
                        ids.push((id.1, round.saturating_add(1)))
                    }
                    _ => groups.push((id.0, vec![(id.1, round.saturating_add(1))])),
                }
            }
            self.next_lazy
                .get_or_insert(now + self.config.lazy_interval);
        }
        self.scratch = peers;
    }

    fn remember(
        &mut self,
        id: MsgId,
        round: u32,
        topic: &std::sync::Arc<str>,
        payload: &Bytes,
        stamp: Stamp,
    ) {
        let key = Self::key(&id);
        if self.seen.insert(key) {
            self.seen_order.push_back(key);
            if self.seen_order.len() > self.config.cache {
                if let Some(old) = self.seen_order.pop_front() {
                    self.seen.remove(&old);
                }
            }
        }
        self.store
            .insert(key, (round, topic.clone(), payload.clone(), stamp));
        self.store_order.push_back(key);
        while self.store_order.len() > self.config.cache {
            if let Some(old) = self.store_order.pop_front() {
                self.store.remove(&old);
            }
        }
    }

    /// A message from `from`.
    pub fn handle_message(
        &mut self,
        now: Instant,
        from: NodeId,
        message: Message,
        rng: &mut impl RngCore,
    ) {
        if from == self.local {
            return;
        }
        match message {
            Message::Join => {
                self.next_shuffle
                    .get_or_insert(now + self.config.shuffle_interval);
                self.add_active(from, false, rng);
                self.send(from, Message::NeighborReply { accept: true });
                let others: Vec<NodeId> =
                    self.active.iter().copied().filter(|n| *n != from).collect();
                for n in others {
                    self.send(
                        n,
                        Message::ForwardJoin {
                            node: from,
                            ttl: self.config.active_walk,
                        },
                    );
                }
            }
            Message::ForwardJoin { node, ttl } => {
                if node == self.local {
                    return;
                }
                if ttl == 0 || self.active.len() <= 1 {
                    if !self.active.contains(&node) {
                        self.add_active(node, false, rng);
                        self.send(node, Message::Neighbor { high: true });
                    }
                    return;
                }
                if ttl == self.config.passive_walk {
                    self.add_passive(node, rng);
                }
                let next = self
                    .active
                    .iter()
                    .copied()
                    .filter(|n| *n != from && *n != node)
                    .choose(rng);
                match next {
                    Some(n) => self.send(n, Message::ForwardJoin { node, ttl: ttl - 1 }),
                    None => {
                        if !self.active.contains(&node) {
                            self.add_active(node, false, rng);
                            self.send(node, Message::Neighbor { high: true });
                        }
                    }
                }
            }
            Message::Neighbor { high } => {
                // One reserve slot: a neighbour lost to a partition that
                // asks again is let in, so the healed sides join.
                let returning =
                    self.lost.remove(&from) && self.active.len() <= self.config.active_size;
                let room = self.active.len() < self.config.active_size;
                let accept = high || room || returning || self.active.contains(&from);
                if accept {
                    self.add_active(from, returning, rng);
                }
                self.send(from, Message::NeighborReply { accept });
            }
            Message::NeighborReply { accept } => {
                self.asking.remove(&from);
                if accept {
                    // We asked: take it even if a join filled the view since.
                    self.add_active(from, true, rng);
                } else {
                    self.add_passive(from, rng);
                    self.fill_active(rng);
                }
            }
            Message::Disconnect => {
                if self.remove_active(from) {
                    self.add_passive(from, rng);
                    self.fill_active(rng);
                }
            }
            Message::Shuffle { origin, ttl, nodes } => {
                if origin == self.local {
                    return;
                }
                let next = (ttl > 1 && self.active.len() > 1)
                    .then(|| {
                        self.active
                            .iter()
                            .copied()
                            .filter(|n| *n != from && *n != origin)
                            .choose(rng)
                    })
                    .flatten();
                match next {
                    Some(n) => self.send(
                        n,
                        Message::Shuffle {
                            origin,
                            ttl: ttl - 1,
                            nodes,
                        },
                    ),
                    None => {
                        let reply: Vec<NodeId> = self
                            .passive
                            .iter()
                            .copied()
                            .choose_multiple(rng, nodes.len().max(1));
                        self.send(origin, Message::ShuffleReply { nodes: reply });
                        for n in nodes {
                            self.add_passive(n, rng);
                        }
                    }
                }
            }
            Message::ShuffleReply { nodes } => {
                for n in nodes {
                    self.add_passive(n, rng);
                }
            }
            Message::Gossip {
                id,
                round,
                topic,
                payload,
                stamp,
            } => {
                if self.seen.contains(&Self::key(&id)) {
                    self.stats.duplicates += 1;
                    // A second path to us: keep one.
                    let shaping = self.reference.is_some_and(|(r, _)| r == id.0);
                    if shaping && self.eager.remove(&from) {
                        self.send(from, Message::Prune);
                    }
                    return;
                }
                self.note_origin(now, id.0);
                self.missing.remove(&id);
                self.remember(id, round, &topic, &payload, stamp.clone());
                if self.active.contains(&from) {
                    self.eager.insert(from);
                }
                self.events.push_back(Event::Deliver {
                    id,
                    round,
                    topic: topic.clone(),
                    payload: payload.clone(),
                    stamp: stamp.clone(),
                });
                self.push(now, id, round, &topic, &payload, stamp, Some(from));
            }
            Message::IHave { groups } => {
                let ids = groups.into_iter().flat_map(|(origin, list)| {
                    let h = Self::key(&(origin, 0)).0;
                    list.into_iter()
                        .map(move |(seq, _)| ((h, seq), (origin, seq)))
                });
                for (key, id) in ids {
                    if self.seen.contains(&key) {
                        continue;
                    }
                    // Bounded: a peer announcing more than we can track
                    // (hostile, or far ahead) is not followed further.
                    if self.missing.len() >= MAX_MISSING && !self.missing.contains_key(&id) {
                        self.stats.unrecovered += 1;
                        continue;
                    }
                    // Jittered: the nodes that missed a message (a piece of
                    // the tree cut off by concurrent prunes) must not all
                    // pull it at once, or each pull adds a link and the
                    // tree grows cycles again; the first to pull pushes it
                    // on to the others, which then need not.
                    let base = self.config.graft_timeout;
                    let at = now + base + base.mul_f64(rng.gen::<f64>());
                    let entry = self.missing.entry(id).or_insert_with(|| Missing {
                        at,
                        from: VecDeque::new(),
                    });
                    if !entry.from.contains(&from) {
                        entry.from.push_back(from);
                    }
                    let at = entry.at;
                    self.missing_timer = Some(self.missing_timer.map_or(at, |t| t.min(at)));
                }
            }
            Message::Graft { ids } => {
                if self.active.contains(&from) {
                    self.eager.insert(from);
                }
                for id in ids {
                    let kept = self.store.get(&Self::key(&id)).cloned();
                    if kept.is_none() {
                        self.stats.graft_misses += 1;
                    }
                    if let Some((round, topic, payload, stamp)) = kept {
                        self.send(
                            from,
                            Message::Gossip {
                                id,
                                round: round.saturating_add(1),
                                topic,
                                payload,
                                stamp,
                            },
                        );
                    }
                }
            }
            Message::Prune => {
                self.eager.remove(&from);
            }
        }
    }

    /// Runs timers due by `now`: batched announcements, pulls of missing
    /// messages, shuffles.
    pub fn handle_timeout(&mut self, now: Instant, rng: &mut impl RngCore) {
        if self.next_lazy.is_some_and(|t| t <= now) {
            self.next_lazy = None;
            for (to, groups) in std::mem::take(&mut self.lazy_queue) {
                if self.active.contains(&to) {
                    self.send(to, Message::IHave { groups });
                }
            }
        }
        let mut grafts: BTreeMap<NodeId, Vec<MsgId>> = BTreeMap::new();
        if self.missing_timer.is_some_and(|t| t <= now) {
            let due: Vec<MsgId> = self
                .missing
                .iter()
                .filter(|(_, m)| m.at <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in due {
                let Some(m) = self.missing.get_mut(&id) else {
                    continue;
                };
                match m.from.pop_front() {
                    Some(n) => {
                        // Ask the next announcer if this one does not answer.
                        m.at = now + self.config.graft_timeout / 2;
                        grafts.entry(n).or_default().push(id);
                    }
                    None => {
                        self.missing.remove(&id);
                        self.stats.unrecovered += 1;
                    }
                }
            }
            self.missing_timer = self.missing.values().map(|m| m.at).min();
        }
        for (n, ids) in grafts {
            if self.active.contains(&n) {
                self.eager.insert(n);
            }
            self.send(n, Message::Graft { ids });
        }
        if self.next_shuffle.is_some_and(|t| t <= now) {
            self.next_shuffle = Some(now + self.config.shuffle_interval);
            self.shuffle(rng);
            // Keep the active view full, from the passive one.
            self.fill_active(rng);
        }
    }

    /// When `handle_timeout` next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.next_lazy, self.next_shuffle, self.missing_timer]
            .into_iter()
            .flatten()
            .min()
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn shuffle(&mut self, rng: &mut impl RngCore) {
        let Some(to) = self.active.iter().copied().choose(rng) else {
            return;
        };
        let mut nodes = vec![self.local];
        nodes.extend(
            self.active
                .iter()
                .copied()
                .filter(|n| *n != to)
                .choose_multiple(rng, self.config.shuffle_active),
        );
        nodes.extend(
            self.passive
                .iter()
                .copied()
                .choose_multiple(rng, self.config.shuffle_passive),
        );
        self.send(
            to,
            Message::Shuffle {
                origin: self.local,
                ttl: self.config.active_walk,
                nodes,
            },
        );
    }

    /// Asks passive nodes to become neighbours while the active view is
    /// short (several at once: some may be unreachable).
    fn fill_active(&mut self, rng: &mut impl RngCore) {
        let want = self
            .config
            .active_size
            .saturating_sub(self.active.len() + self.asking.len());
        let candidates = self
            .passive
            .iter()
            .copied()
            .filter(|n| !self.asking.contains(n))
            .choose_multiple(rng, want);
        let high = self.active.is_empty();
        for n in candidates {
            self.asking.insert(n);
            self.send(n, Message::Neighbor { high });
        }
    }

    /// Adds `node` to the active view; a full view drops a random
    /// neighbour first. `reserve`: one slot above the size may be used (a
    /// neighbour lost to a partition, coming back).
    fn add_active(&mut self, node: NodeId, reserve: bool, rng: &mut impl RngCore) {
        if node == self.local || self.active.contains(&node) {
            return;
        }
        let limit = self.config.active_size + usize::from(reserve);
        while self.active.len() >= limit {
            let Some(drop) = self.active.iter().copied().choose(rng) else {
                break;
            };
            self.remove_active(drop);
            self.send(drop, Message::Disconnect);
            self.add_passive(drop, rng);
        }
        self.passive.remove(&node);
        self.lost.remove(&node);
        self.asking.remove(&node);
        self.active.insert(node);
        self.eager.insert(node);
        self.events.push_back(Event::NeighborUp(node));
    }

    fn remove_active(&mut self, node: NodeId) -> bool {
        if !self.active.remove(&node) {
            return false;
        }
        self.eager.remove(&node);
        self.lazy_queue.remove(&node);
        self.events.push_back(Event::NeighborDown(node));
        true
    }

    fn add_passive(&mut self, node: NodeId, rng: &mut impl RngCore) {
        if node == self.local || self.active.contains(&node) || self.passive.contains(&node) {
            return;
        }
        if self.passive.len() >= self.config.passive_size {
            if let Some(old) = self.passive.iter().copied().choose(rng) {
                self.passive.remove(&old);
            }
        }
        self.passive.insert(node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::SmallRng, SeedableRng};

    #[test]
    fn announcements_beyond_the_tracking_limit_are_counted_not_stored() {
        let mut rng = SmallRng::seed_from_u64(1);
        let now = crate::test_support::test_origin();
        let mut g = Gossip::new(NodeId::random(), Config::default());
        let peer = NodeId::random();
        let origin = NodeId::random();
        let ids: Vec<(u64, u32)> = (0..(MAX_MISSING as u64 + 1000)).map(|s| (s, 1)).collect();
        g.handle_message(
            now,
            peer,
            Message::IHave {
                groups: vec![(origin, ids)],
            },
            &mut rng,
        );
        assert_eq!(g.missing.len(), MAX_MISSING);
        assert_eq!(g.stats().unrecovered, 1000);
    }

    #[test]
    fn a_duplicate_prunes_the_later_sender_and_a_pull_grafts() {
        let mut rng = SmallRng::seed_from_u64(2);
        let t0 = crate::test_support::test_origin();
        let me = NodeId::random();
        let (a, b) = (NodeId::random(), NodeId::random());
        let mut g = Gossip::new(me, Config::default());
        g.handle_message(t0, a, Message::Neighbor { high: true }, &mut rng);
        g.handle_message(t0, b, Message::Neighbor { high: true }, &mut rng);
        while g.poll_transmit().is_some() {}
        let msg = |seq| Message::Gossip {
            id: (a, seq),
            round: 0,
            topic: "t".into(),
            payload: Bytes::from_static(b"x"),
            stamp: Stamp::default(),
        };
        g.handle_message(t0, a, msg(1), &mut rng);
        g.handle_message(t0, b, msg(1), &mut rng);
        let sent: Vec<Transmit> = std::iter::from_fn(|| g.poll_transmit()).collect();
        assert!(sent.contains(&Transmit {
            to: b,
            message: Message::Prune
        }));
        assert!(!g.eager().contains(&b) && g.eager().contains(&a));
        // b announces a message we never got: after the timeout we pull it.
        g.handle_message(
            t0,
            b,
            Message::IHave {
                groups: vec![(a, vec![(2, 1)])],
            },
            &mut rng,
        );
        let due = g.poll_timeout().expect("pull timer");
        g.handle_timeout(due, &mut rng);
        let sent: Vec<Transmit> = std::iter::from_fn(|| g.poll_transmit()).collect();
        assert!(sent.contains(&Transmit {
            to: b,
            message: Message::Graft { ids: vec![(a, 2)] }
        }));
        assert!(g.eager().contains(&b), "a pull makes the link eager again");
    }
}
