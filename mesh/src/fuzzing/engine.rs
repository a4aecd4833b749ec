//! The sans-IO `Engine` alone, fed with the same steps as the node
//! targets: no tokio, no link tasks, no handshake, so many more inputs per
//! second reach the protocol rules. What the node task would do between
//! inputs (end of a turn, transmits taken, events acted on, a peer whose
//! frame was bad losing its link) is done here the same way.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use rand::{rngs::SmallRng, SeedableRng};

use super::{id, structured_body, wait, Family, Input, Step, EPOCH, MAX_STEPS, PEERS};
use crate::{
    core::{membership::Membership, stream::Start, topic::Pattern, NodeId},
    engine::{
        inbox::Inbox,
        reply::Reply,
        streams::{StreamItem, StreamOp},
        work::{DeliveryData, Op, OutMsg},
        Engine, EngineConfig, MemberOut, Parts,
    },
    node::Config,
    security::Signer,
};

/// Every kind of frame, time passing and links coming and going, into one
/// `Engine` that hosts every queue and stream and has subscriptions,
/// queue consumers and a stream consumer of its own.
pub fn engine(data: &[u8]) {
    let Some(mut h) = EngineHarness::new() else {
        return;
    };
    let mut u = Input::new(data);
    for _ in 0..MAX_STEPS {
        if u.is_empty() {
            break;
        }
        let b = u.byte();
        let peer = 1 + usize::from(b >> 6) % (PEERS - 1);
        let step = match b & 0x3f {
            0..=7 => Step::Raw,
            8..=47 => Step::Structured,
            48..=51 => Step::Wait,
            52..=55 => Step::Link,
            _ => {
                h.command(&mut u);
                h.turn();
                continue;
            }
        };
        h.step(&mut u, step, peer);
        h.turn();
    }
    h.finish();
}

struct EngineHarness {
    engine: Engine,
    now: Instant,
    /// Peers whose link is up.
    linked: Vec<NodeId>,
    /// Kept for the engine to fill (never read: their credit bounds them).
    _inboxes: (Vec<Arc<Inbox<DeliveryData>>>, Arc<Inbox<StreamItem>>),
}

impl EngineHarness {
    fn new() -> Option<Self> {
        let key = libp2p::identity::Keypair::ed25519_from_bytes([1; 32]).ok()?;
        let local = key.public().to_peer_id();
        let config = Config {
            host_all: true,
            ..Config::default()
        };
        // The one clock read, in the driver's place: every later time is an
        // offset from it.
        let now = Instant::now();
        let mut engine = Engine::new(
            EngineConfig {
                link_buffer: config.link_buffer,
                reliable_window: config.reliable_window,
                gossip: Vec::new(),
            },
            Parts {
                local,
                membership: Membership::new(
                    local,
                    Vec::new(),
                    EPOCH,
                    config.membership.clone(),
                    now,
                ),
                epoch: EPOCH,
                access: None,
                signer: Signer::new(key),
                rng: SmallRng::seed_from_u64(EPOCH),
                work: crate::engine::work::Work::new(&config),
                streams: crate::engine::streams::Streams::new(&config, local),
                durable: false,
                now,
            },
        );
        engine.work.epoch = EPOCH;
        let hosted: Vec<Pattern> = engine
            .work
            .host_patterns()
            .into_iter()
            .chain(engine.streams.host_patterns())
            .collect();
        for p in hosted {
            engine.interest.subscribe(&p, false);
        }
        for (p, reliable) in [("orders.>", false), ("s", false), ("a.*", true)] {
            engine.subscribe(Pattern::new(p).ok()?, reliable)?;
        }
        let consumers: Vec<Arc<Inbox<DeliveryData>>> = (1..=2).map(|_| Arc::default()).collect();
        for (cid, (inbox, prefetch)) in consumers.iter().zip([1, 64]).enumerate() {
            engine.handle_command(
                now,
                Op::Consume {
                    cid: cid as u32 + 1,
                    queue: "q".into(),
                    options: crate::core::queue::ConsumerOptions {
                        prefetch,
                        ..Default::default()
                    },
                    inbox: inbox.clone(),
                },
            );
        }
        let records: Arc<Inbox<StreamItem>> = Arc::default();
        engine.handle_command(
            now,
            Op::Stream(StreamOp::Consume {
                sid: 1,
                stream: "s".into(),
                group: None,
                start: Start::Earliest,
                window: 64,
                inbox: records.clone(),
            }),
        );
        Some(Self {
            engine,
            now,
            linked: Vec::new(),
            _inboxes: (consumers, records),
        })
    }

    fn step(&mut self, u: &mut Input<'_>, step: Step, peer: usize) {
        let Some(peer) = id(peer) else {
            return;
        };
        match step {
            Step::Raw => {
                let body = u.bytes(usize::from(u16::MAX)).to_vec();
                self.frame(peer, body);
            }
            Step::Structured => {
                let body = structured_body(u, Family::Any);
                self.frame(peer, body);
            }
            Step::Wait => {
                self.now += wait(u);
                self.timers();
            }
            Step::Link => {
                if self.linked.contains(&peer) && u.bool() {
                    self.link_down(peer);
                } else if !self.linked.contains(&peer) {
                    self.engine.handle_connected(peer);
                    self.engine.handle_link_up(self.now, peer, Vec::new());
                    self.engine.links_generation += 1;
                    self.linked.push(peer);
                }
            }
        }
    }

    /// A call of a local handle: a send, an append, a request, a publish.
    fn command(&mut self, u: &mut Input<'_>) {
        let now = self.now;
        let payload = Bytes::copy_from_slice(u.bytes(64));
        let op = match u.byte() % 4 {
            0 => Op::Send {
                queue: "q".into(),
                msg: OutMsg {
                    headers: Vec::new(),
                    payload,
                    delay: None,
                    ttl: None,
                    dedup: None,
                    durable: false,
                },
                reply: Reply::new(|_| {}),
            },
            1 => Op::Stream(StreamOp::Append {
                stream: "s".into(),
                records: vec![crate::core::stream::NewRecord {
                    key: Bytes::copy_from_slice(u.bytes(4)),
                    timestamp_ms: 1,
                    headers: Vec::new(),
                    payload,
                }],
                durable: false,
                reply: Reply::new(|_| {}),
            }),
            2 => Op::Request {
                subject: "r".into(),
                headers: Vec::new(),
                payload,
                timeout: Duration::from_millis(u64::from(u.u16())),
                reply: Reply::new(|_| {}),
            },
            _ => {
                if let Ok(topic) = crate::core::topic::Topic::new("orders.x") {
                    self.engine.publish(now, topic, Vec::new(), payload, 1);
                }
                return;
            }
        };
        self.engine.handle_command(now, op);
    }

    /// `peer` sends `body`; a frame the engine rejects ends the link, as
    /// in the node task.
    fn frame(&mut self, peer: NodeId, body: Vec<u8>) {
        if !self.linked.contains(&peer) {
            return;
        }
        let body = Bytes::from(body);
        if self.engine.handle_frame(self.now, peer, &body).is_err() {
            self.link_down(peer);
        }
    }

    /// As the node task does when a link ends (or its connection).
    fn link_down(&mut self, peer: NodeId) {
        self.linked.retain(|p| *p != peer);
        if self.engine.peers.remove(&peer).is_some_and(|p| p.up) {
            self.engine.membership.handle_link_down(self.now, peer);
        }
        self.engine.handle_disconnected(peer);
        self.engine.links_generation += 1;
        self.engine.work_link_down(self.now, peer);
    }

    fn timers(&mut self) {
        if self.engine.poll_timeout().is_some_and(|t| t <= self.now) {
            self.engine.handle_timeout(self.now);
        }
    }

    /// The end of a node task turn: batched output, transmits taken (and
    /// dropped), events, deliveries and membership's requests acted on.
    fn turn(&mut self) {
        self.engine.work_flush(self.now);
        self.engine.gossip_events();
        self.engine.gossip_out();
        self.engine.gossip_dial.clear();
        let _ = self.engine.take_deliveries();
        while self.engine.poll_event().is_some() {}
        while let Some(out) = self.engine.poll_member_transmit() {
            if let MemberOut::Down(node) = out {
                if self.linked.contains(&node) {
                    self.link_down(node);
                }
            }
        }
        self.engine.poll_transmit(|_, bytes| {
            bytes.clear();
            None
        });
    }

    /// Links go down and every timer runs out.
    fn finish(mut self) {
        for peer in self.linked.clone() {
            self.link_down(peer);
        }
        self.now += Duration::from_secs(3600);
        self.timers();
        self.turn();
    }
}
