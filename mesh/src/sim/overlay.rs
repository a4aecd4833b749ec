//! Gossip-mode broadcast at scale: hundreds or thousands of gossip cores
//! ([`crate::core::gossip`]) on a simulated network in virtual time, with a
//! partition and its heal. Reports delivery, latency and network messages
//! per delivered message (`mesh bench gossip-sim`).
//!
//! This drives the cores directly (a discrete-event loop), not whole
//! [`crate::Node`]s as [`super::Sim`] does: the runtime links every member
//! it knows (a full mesh), which is what gossip mode exists to avoid at a
//! thousand nodes. Failure detection is modelled as the runtime provides it:
//! a neighbour across a partition is reported failed after `detect`, and
//! nodes are reported back up `detect` after the heal.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use rand::{rngs::SmallRng, Rng, SeedableRng};

use crate::core::{
    gossip::{Config, Event, Gossip, Message, MsgId},
    NodeId,
};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct OverlayRun {
    /// Number of nodes.
    pub nodes: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// One-way latency range.
    pub latency: std::ops::Range<Duration>,
    /// Messages broadcast in each phase (steady, during the partition,
    /// after the heal), from random origins.
    pub messages: usize,
    /// Time between broadcasts.
    pub interval: Duration,
    /// How long failure detection takes (partition start to link down,
    /// heal to peer up).
    pub detect: Duration,
    /// Gossip tuning.
    pub config: Config,
}

impl OverlayRun {
    /// Defaults for `nodes` nodes: 1 to 10 ms latency, 200 messages per
    /// phase 20 ms apart, 3 s failure detection.
    pub fn new(nodes: usize, seed: u64) -> Self {
        Self {
            nodes,
            seed,
            latency: Duration::from_millis(1)..Duration::from_millis(10),
            messages: 200,
            interval: Duration::from_millis(20),
            detect: Duration::from_secs(3),
            config: Config::default(),
        }
    }
}

/// Delivery figures of one phase.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PhaseReport {
    /// Messages broadcast.
    pub broadcast: u64,
    /// Deliveries that should have happened (messages × other nodes, or
    /// the origin's side of a partition).
    pub expected: u64,
    /// Deliveries that happened.
    pub delivered: u64,
    /// Median delivery latency (virtual), ms.
    pub latency_p50_ms: f64,
    /// 99th percentile delivery latency, ms.
    pub latency_p99_ms: f64,
    /// Largest hop count.
    pub max_hops: u32,
    /// Full messages (payloads) sent per delivery: 1.0 is a perfect tree.
    pub payloads_per_delivery: f64,
    /// Every message sent (payloads, batched announcements, pulls, prunes,
    /// overlay upkeep) per delivery.
    pub messages_per_delivery: f64,
    /// Pulls (`Graft`) and prunes sent in the phase.
    pub grafts: u64,
    /// See `grafts`.
    pub prunes: u64,
}

/// What [`run`] measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OverlayReport {
    /// Nodes.
    pub nodes: usize,
    /// Broadcasts once the overlay has settled.
    pub steady: PhaseReport,
    /// Broadcasts during a partition into two halves (delivery expected
    /// within the origin's half).
    pub partitioned: PhaseReport,
    /// Broadcasts after the heal, once the overlay has repaired: every node
    /// must get every one.
    pub healed: PhaseReport,
    /// Smallest and largest active view at the end.
    pub active_view: (usize, usize),
}

enum Ev {
    Msg {
        to: usize,
        from: usize,
        msg: Message,
    },
    Timer(usize),
    Broadcast {
        phase: usize,
    },
    LinkDown {
        at: usize,
        peer: usize,
    },
    PeerUp {
        at: usize,
        peer: usize,
    },
    Join {
        node: usize,
        contact: usize,
    },
}

struct World {
    now: Instant,
    nodes: Vec<Gossip>,
    rngs: Vec<SmallRng>,
    ids: Vec<NodeId>,
    index: BTreeMap<NodeId, usize>,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    events: BTreeMap<u64, Ev>,
    next: u64,
    timers: Vec<Option<Instant>>,
    net_rng: SmallRng,
    latency: std::ops::Range<Duration>,
    /// Side of each node while partitioned.
    side: Option<Vec<u8>>,
    detect: Duration,
    /// Broadcast time per message.
    sent_at: BTreeMap<MsgId, (Instant, usize)>,
    /// Per phase: latencies, hops, deliveries.
    phase_of: BTreeMap<MsgId, usize>,
    latencies: [Vec<Duration>; 3],
    hops: [u32; 3],
    delivered: [u64; 3],
    broadcast: [u64; 3],
    expected: [u64; 3],
    origins: SmallRng,
}

impl World {
    fn at(&mut self, t: Instant, ev: Ev) {
        let id = self.next;
        self.next += 1;
        self.events.insert(id, ev);
        self.queue.push(Reverse((t, id)));
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.side.as_ref().is_none_or(|s| s[a] == s[b])
    }

    /// Moves node `i`'s outputs into the network, re-arms its timer.
    fn drain(&mut self, i: usize) {
        while let Some(t) = self.nodes[i].poll_transmit() {
            let Some(&to) = self.index.get(&t.to) else {
                continue;
            };
            if self.reachable(i, to) {
                let lat = self.net_rng.gen_range(self.latency.clone());
                let when = self.now + lat;
                self.at(
                    when,
                    Ev::Msg {
                        to,
                        from: i,
                        msg: t.message,
                    },
                );
            } else {
                // Like a dial or send that fails: reported after detection.
                let when = self.now + self.detect;
                self.at(when, Ev::LinkDown { at: i, peer: to });
            }
        }
        while let Some(ev) = self.nodes[i].poll_event() {
            if let Event::Deliver { id, round, .. } = ev {
                if let (Some(&(t0, _)), Some(&phase)) =
                    (self.sent_at.get(&id), self.phase_of.get(&id))
                {
                    self.latencies[phase].push(self.now - t0);
                    self.hops[phase] = self.hops[phase].max(round);
                    self.delivered[phase] += 1;
                }
            }
        }
        if let Some(t) = self.nodes[i].poll_timeout() {
            if self.timers[i] != Some(t) {
                self.timers[i] = Some(t);
                self.at(t, Ev::Timer(i));
            }
        }
    }

    fn run_until(&mut self, end: Instant) {
        while let Some(Reverse((t, id))) = self.queue.peek().copied() {
            if t > end {
                break;
            }
            self.queue.pop();
            self.now = t;
            let Some(ev) = self.events.remove(&id) else {
                continue;
            };
            match ev {
                Ev::Msg { to, from, msg } => {
                    if !self.reachable(from, to) {
                        continue;
                    }
                    let from_id = self.ids[from];
                    self.nodes[to].handle_message(t, from_id, msg, &mut self.rngs[to]);
                    self.drain(to);
                }
                Ev::Timer(i) => {
                    if self.timers[i] != Some(t) {
                        continue;
                    }
                    self.timers[i] = None;
                    self.nodes[i].handle_timeout(t, &mut self.rngs[i]);
                    self.drain(i);
                }
                Ev::Broadcast { phase } => {
                    let origin = self.origins.gen_range(0..self.nodes.len());
                    let id = self.nodes[origin].broadcast(
                        t,
                        Arc::from("gossip.bench"),
                        Bytes::from_static(&[0u8; 64]),
                    );
                    self.sent_at.insert(id, (t, origin));
                    self.phase_of.insert(id, phase);
                    self.broadcast[phase] += 1;
                    self.expected[phase] += match &self.side {
                        None => self.nodes.len() as u64 - 1,
                        Some(s) => s.iter().filter(|x| **x == s[origin]).count() as u64 - 1,
                    };
                    self.drain(origin);
                }
                Ev::LinkDown { at, peer } => {
                    if self.reachable(at, peer) {
                        continue;
                    }
                    let peer_id = self.ids[peer];
                    self.nodes[at].handle_link_down(peer_id, &mut self.rngs[at]);
                    self.drain(at);
                }
                Ev::PeerUp { at, peer } => {
                    let peer_id = self.ids[peer];
                    self.nodes[at].handle_peer_up(peer_id, &mut self.rngs[at]);
                    self.drain(at);
                }
                Ev::Join { node, contact } => {
                    let c = self.ids[contact];
                    self.nodes[node].join(t, c);
                    self.drain(node);
                }
            }
        }
        self.now = end;
    }

    fn totals(&self) -> (u64, u64, u64, u64) {
        let (mut payloads, mut all, mut grafts, mut prunes) = (0, 0, 0, 0);
        for n in &self.nodes {
            let s = n.stats();
            payloads += s.payloads;
            grafts += s.grafts;
            prunes += s.prunes;
            all += s.payloads + s.ihaves + s.grafts + s.prunes + s.overlay;
        }
        (payloads, all, grafts, prunes)
    }

    fn phase(
        &mut self,
        phase: usize,
        messages: usize,
        interval: Duration,
        settle: Duration,
    ) -> PhaseReport {
        let (p0, a0, g0, r0) = self.totals();
        let start = self.now;
        for k in 0..messages {
            self.at(start + interval * k as u32, Ev::Broadcast { phase });
        }
        let end = start + interval * messages as u32 + settle;
        self.run_until(end);
        let (p1, a1, g1, r1) = self.totals();
        let mut lat = std::mem::take(&mut self.latencies[phase]);
        lat.sort();
        let pct = |q: f64| {
            lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        let delivered = self.delivered[phase].max(1) as f64;
        PhaseReport {
            broadcast: self.broadcast[phase],
            expected: self.expected[phase],
            delivered: self.delivered[phase],
            latency_p50_ms: pct(0.5),
            latency_p99_ms: pct(0.99),
            max_hops: self.hops[phase],
            payloads_per_delivery: (p1 - p0) as f64 / delivered,
            messages_per_delivery: (a1 - a0) as f64 / delivered,
            grafts: g1 - g0,
            prunes: r1 - r0,
        }
    }
}

/// Builds the overlay (nodes join one by one through a random earlier
/// node), lets it settle, then broadcasts in three phases: steady state,
/// partitioned into two halves, and after the heal.
pub fn run(cfg: &OverlayRun) -> OverlayReport {
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let n = cfg.nodes.max(2);
    let ids: Vec<NodeId> = (0..n)
        .map(|_| {
            let mut secret: [u8; 32] = rng.gen();
            libp2p::identity::Keypair::ed25519_from_bytes(&mut secret)
                .expect("32 bytes")
                .public()
                .to_peer_id()
        })
        .collect();
    let start = Instant::now();
    let mut w = World {
        now: start,
        nodes: ids
            .iter()
            .map(|id| Gossip::new(*id, cfg.config.clone()))
            .collect(),
        rngs: (0..n).map(|_| SmallRng::seed_from_u64(rng.gen())).collect(),
        index: ids.iter().enumerate().map(|(i, id)| (*id, i)).collect(),
        ids,
        queue: BinaryHeap::new(),
        events: BTreeMap::new(),
        next: 0,
        timers: vec![None; n],
        net_rng: SmallRng::seed_from_u64(rng.gen()),
        latency: cfg.latency.clone(),
        side: None,
        detect: cfg.detect,
        sent_at: BTreeMap::new(),
        phase_of: BTreeMap::new(),
        latencies: Default::default(),
        hops: [0; 3],
        delivered: [0; 3],
        broadcast: [0; 3],
        expected: [0; 3],
        origins: SmallRng::seed_from_u64(rng.gen()),
    };
    // Joins, 10 ms apart, each through a random node already in.
    for i in 1..n {
        let contact = rng.gen_range(0..i);
        w.at(
            start + Duration::from_millis(10 * i as u64),
            Ev::Join { node: i, contact },
        );
    }
    let settle = Duration::from_secs(30) + Duration::from_millis(10 * n as u64);
    w.run_until(start + settle);
    // A first round of broadcasts shapes the tree (prunes), then measure.
    w.phase(0, cfg.messages, cfg.interval, Duration::from_secs(5));
    w.delivered[0] = 0;
    w.broadcast[0] = 0;
    w.expected[0] = 0;
    w.hops[0] = 0;
    let steady = w.phase(0, cfg.messages, cfg.interval, Duration::from_secs(5));

    // Two halves, at random.
    let side: Vec<u8> = (0..n).map(|_| rng.gen_range(0..2)).collect();
    w.side = Some(side.clone());
    // Failure detection reports the cut links.
    let t = w.now + cfg.detect;
    for a in 0..n {
        for b in w.nodes[a]
            .active()
            .iter()
            .map(|id| w.index[id])
            .collect::<Vec<_>>()
        {
            if side[a] != side[b] {
                w.at(t, Ev::LinkDown { at: a, peer: b });
            }
        }
    }
    w.run_until(t + Duration::from_secs(10));
    let partitioned = w.phase(1, cfg.messages, cfg.interval, Duration::from_secs(5));

    // Heal; the membership reports the other side back up.
    w.side = None;
    let t = w.now + cfg.detect;
    for a in 0..n {
        for b in 0..n {
            if side[a] != side[b] {
                w.at(t, Ev::PeerUp { at: a, peer: b });
            }
        }
    }
    w.run_until(t + Duration::from_secs(20));
    let healed = w.phase(2, cfg.messages, cfg.interval, Duration::from_secs(5));
    let sizes = w.nodes.iter().map(|g| g.active().len());
    let active_view = (sizes.clone().min().unwrap_or(0), sizes.max().unwrap_or(0));
    OverlayReport {
        nodes: n,
        steady,
        partitioned,
        healed,
        active_view,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(r: &OverlayReport) {
        assert_eq!(
            r.steady.delivered, r.steady.expected,
            "steady state: all delivered"
        );
        assert_eq!(
            r.partitioned.delivered, r.partitioned.expected,
            "each side of the partition keeps working"
        );
        assert_eq!(
            r.healed.delivered, r.healed.expected,
            "after the heal every node gets every message"
        );
        assert!(r.steady.payloads_per_delivery < 2.0, "{r:#?}");
    }

    #[test]
    fn hundred_nodes_deliver_everything_and_heal_over_seeds() {
        for seed in 0..5 {
            let r = run(&OverlayRun {
                messages: 100,
                interval: Duration::from_millis(10),
                ..OverlayRun::new(100, seed)
            });
            check(&r);
        }
    }

    #[test]
    fn thousand_nodes_deliver_everything_and_heal() {
        let r = run(&OverlayRun {
            messages: 30,
            ..OverlayRun::new(1000, 7)
        });
        check(&r);
        assert!(
            r.active_view.0 >= 1,
            "nobody left alone: {:?}",
            r.active_view
        );
    }
}
