//! Fuzzing entry points: every decoder of peer input, and the node fed
//! with frames from peers. Not a public API (hidden from the docs); used by
//! the cargo-fuzz targets in `fuzz/` and by the bounded property test
//! `mesh/tests/fuzz_inputs.rs`. Needs the `sim` feature (a paused clock).
//!
//! Each entry point takes arbitrary bytes and must never panic. The node
//! targets ([`queue_host`], [`stream`], ...) drive the real node: a `Node`
//! started on a current-thread tokio runtime with a paused clock, in an
//! `Environment` whose transport carries nothing, so that the harness
//! hands it connections and in-memory data streams as transport events.
//! The node's own link tasks read them (handshake, frame limits, batches)
//! and its node task handles the frames; nothing of the node is copied
//! here. The input is a sequence of steps (see [`Step`]): a raw frame body,
//! a frame built from the input (structure-aware: valid peer ids, topic
//! names and variants, so the fuzzer gets past the decoder), time passing,
//! or a link going up or down. After each step the node runs until all its
//! tasks wait. What it sends is dropped.

mod engine;

pub use engine::engine;

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use mesh_transports::{
    frame::{self as tframe, FrameReader},
    quic,
};
use rustc_hash::FxHashMap;

use crate::{
    core::{
        membership::MemberState,
        pubsub::{LinkDecoder, LocalSubscriptions},
        topic::Topic,
        NodeId,
    },
    engine::{
        streams::start_from_wire,
        work::{headers_from_wire, slice, MAX_PEEK},
    },
    runtime::{
        env::{Environment, Spawn, Transport},
        link, WallClock,
    },
    wire::{
        self, AppendWire, DeclWire, DeliverWire, Frame, GossipCodec, GossipWire, Hello, MemberWire,
        MsgWire, PartWire, PeekedWire, Raw, RecordWire, ReplyStatus, StartWire, StreamWire,
        SyncWire, UpdateWire, WireError, WorkWire, MAGIC, PROTOCOL_VERSION,
    },
};

/// The node's frame limit on data streams (the default of
/// `Builder::max_frame`).
pub const MAX_FRAME: usize = tframe::DEFAULT_MAX_FRAME;

/// Most steps one input drives a core through.
pub const MAX_STEPS: usize = 512;

// ---------------------------------------------------------------------------
// Reading structured values out of fuzz bytes.

/// Structured values read from fuzz bytes (in the manner of the
/// `arbitrary` crate's `Unstructured`): every read succeeds, an exhausted
/// input reads as zeros.
#[derive(Debug)]
pub struct Input<'a> {
    data: &'a [u8],
}

/// Valid topic names, queue and stream names, and patterns, so that
/// structured frames often pass validation and reach the cores.
const NAMES: &[&str] = &[
    "q",
    "orders",
    "orders.eu",
    "orders.eu.created",
    "a.b",
    "a.b.c",
    "s",
    "q.dlq",
    "orders.dlq",
    "_mesh.q.orders",
    "_mesh.s.s",
    "a.*",
    "orders.>",
    ">",
    "*",
    "a..b",
    "",
];

impl<'a> Input<'a> {
    /// Reads from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// One byte (0 when exhausted).
    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn le(&mut self, n: usize) -> u64 {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head.iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    }

    /// A `u16`, little-endian.
    pub fn u16(&mut self) -> u16 {
        self.le(2) as u16
    }

    /// A `u32`, little-endian.
    pub fn u32(&mut self) -> u32 {
        self.le(4) as u32
    }

    /// A `u64`, little-endian.
    pub fn u64(&mut self) -> u64 {
        self.le(8)
    }

    /// A boolean.
    pub fn bool(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    /// A number below `n` (0 if `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let x = if n <= 256 {
            usize::from(self.byte())
        } else {
            self.u32() as usize
        };
        x % n
    }

    /// A number, often an edge case (0, 1, small, the type's extremes).
    pub fn num(&mut self) -> u64 {
        match self.byte() % 6 {
            0 => u64::from(self.byte() % 8),
            1 => u64::from(self.byte()),
            2 => u64::from(self.u16()),
            3 => self.u64(),
            4 => [
                0,
                1,
                u64::from(u32::MAX),
                u64::MAX,
                u64::MAX - 1,
                i64::MAX as u64,
            ][self.below(6)],
            _ => u64::from(self.u32()),
        }
    }

    /// A `u32` number, often an edge case.
    pub fn num32(&mut self) -> u32 {
        let n = self.num();
        u32::try_from(n).unwrap_or(n as u32 | 0x8000_0000)
    }

    /// At most `max` bytes.
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let len = if max < 256 {
            self.below(max + 1)
        } else {
            usize::from(self.u16()) % (max + 1)
        };
        let len = len.min(self.data.len());
        let (head, rest) = self.data.split_at(len);
        self.data = rest;
        head
    }

    /// A name: usually one of a fixed set of valid (and a few invalid)
    /// topic names and patterns, else bytes of the input.
    pub fn name(&mut self) -> &'a str {
        let pick = self.byte();
        if pick < 224 {
            NAMES[usize::from(pick) % NAMES.len()]
        } else {
            std::str::from_utf8(self.bytes(40)).unwrap_or("x")
        }
    }

    /// A list length below `max`, usually small.
    pub fn count(&mut self, max: usize) -> usize {
        let b = self.byte();
        if b < 240 {
            usize::from(b % 4).min(max)
        } else {
            self.below(max + 1)
        }
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

// ---------------------------------------------------------------------------
// Node ids.

/// Ids of the harness: `0` is the node under test, `1..PEERS` its possible
/// peers, and the last one a node no link ever comes from.
pub const IDS: usize = 5;
const PEERS: usize = 4;

fn ids() -> &'static [(NodeId, Vec<u8>)] {
    static IDS_CELL: OnceLock<Vec<(NodeId, Vec<u8>)>> = OnceLock::new();
    IDS_CELL.get_or_init(|| {
        (0..IDS as u8)
            .filter_map(|i| {
                let key = libp2p::identity::Keypair::ed25519_from_bytes([i + 1; 32]).ok()?;
                let id = key.public().to_peer_id();
                Some((id, id.to_bytes()))
            })
            .collect()
    })
}

/// The signature `key`'s node gives its gossip message `seq` (for tests
/// that forge or alter one).
pub fn sign_gossip(
    key: &libp2p::identity::Keypair,
    seq: u64,
    timestamp: u64,
    topic: &str,
    payload: &[u8],
) -> bytes::Bytes {
    crate::security::Signer::new(key.clone()).sign(
        key.public().to_peer_id(),
        seq,
        timestamp,
        topic,
        payload,
    )
}

/// The signature `key`'s node gives its declaration (for tests that
/// speak the wire protocol by hand). Patterns must be valid.
pub fn sign_declaration(
    key: &libp2p::identity::Keypair,
    epoch: u64,
    seq: u64,
    patterns: &[&str],
    reliable: &[&str],
) -> Vec<u8> {
    let parse = |list: &[&str]| -> Vec<crate::core::topic::Pattern> {
        list.iter()
            .map(|p| crate::core::topic::Pattern::new(p).expect("a valid pattern"))
            .collect()
    };
    let decl = crate::core::interest::Declaration {
        node: key.public().to_peer_id(),
        version: crate::core::interest::Version { epoch, seq },
        patterns: parse(patterns),
        reliable: parse(reliable),
        signature: None,
    };
    crate::security::Signer::new(key.clone())
        .sign_declaration(&decl)
        .to_vec()
}

/// The id bytes of harness node `i` (modulo [`IDS`]).
pub fn id_bytes(i: usize) -> &'static [u8] {
    let all = ids();
    all.get(i % all.len().max(1))
        .map(|(_, b)| b.as_slice())
        .unwrap_or(&[])
}

fn id(i: usize) -> Option<NodeId> {
    ids().get(i).map(|(id, _)| *id)
}

fn raw_id<'a>(u: &mut Input<'a>) -> Raw<'a> {
    let b = u.byte();
    if b < 240 {
        Raw(id_bytes(usize::from(b)))
    } else {
        Raw(u.bytes(48))
    }
}

// ---------------------------------------------------------------------------
// Structured frames.

/// Which frames a structured step builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Any variant of [`Frame`].
    Any,
    /// `Work`, host side (what consumers and senders send a queue host).
    QueueHost,
    /// `Work`, consumer side (what a queue host sends).
    QueueConsumer,
    /// `Stream`.
    Stream,
    /// `Gossip`.
    Gossip,
    /// `Member` and `Sync`.
    Membership,
    /// `Topic`, `Msg`, `Seq`, `Declare`, `Sync`, `Resume`, `Lagged`.
    PubSub,
}

fn headers<'a>(u: &mut Input<'a>) -> Vec<(&'a str, Raw<'a>)> {
    (0..u.count(64))
        .map(|_| (u.name(), Raw(u.bytes(64))))
        .collect()
}

fn payload<'a>(u: &mut Input<'a>) -> Raw<'a> {
    Raw(u.bytes(4096))
}

fn opt_str<'a>(u: &mut Input<'a>) -> Option<&'a str> {
    u.bool().then(|| u.name())
}

fn update<'a>(u: &mut Input<'a>) -> UpdateWire<'a> {
    UpdateWire {
        node: raw_id(u),
        incarnation: u.num(),
        state: match u.byte() % 3 {
            0 => MemberState::Alive,
            1 => MemberState::Suspect,
            _ => MemberState::Down,
        },
        addrs: (0..u.count(16)).map(|_| Raw(u.bytes(64))).collect(),
        sig: Raw(u.bytes(64)),
    }
}

fn updates<'a>(u: &mut Input<'a>) -> Vec<UpdateWire<'a>> {
    (0..u.count(64)).map(|_| update(u)).collect()
}

fn decl<'a>(u: &mut Input<'a>) -> DeclWire<'a> {
    DeclWire {
        node: raw_id(u),
        epoch: u.num(),
        seq: u.num(),
        patterns: (0..u.count(64)).map(|_| u.name()).collect(),
        reliable: (0..u.count(8)).map(|_| u.name()).collect(),
        sig: None,
    }
}

fn member<'a>(u: &mut Input<'a>) -> MemberWire<'a> {
    let seq = u.num();
    match u.byte() % 4 {
        0 => MemberWire::Ping {
            seq,
            updates: updates(u),
        },
        1 => MemberWire::Ack {
            seq,
            updates: updates(u),
        },
        2 => MemberWire::PingReq {
            seq,
            target: raw_id(u),
            updates: updates(u),
        },
        _ => MemberWire::IndirectAck {
            seq,
            target: raw_id(u),
            updates: updates(u),
        },
    }
}

fn sync<'a>(u: &mut Input<'a>) -> SyncWire<'a> {
    SyncWire {
        members: updates(u),
        decls: (0..u.count(16)).map(|_| decl(u)).collect(),
        more: u.bool(),
    }
}

fn hello<'a>(u: &mut Input<'a>) -> Hello<'a> {
    Hello {
        magic: if u.byte() < 240 { MAGIC } else { u.u32() },
        version: if u.byte() < 240 {
            PROTOCOL_VERSION
        } else {
            u.u32()
        },
        features: u.num(),
        incarnation: u.num(),
        addrs: (0..u.count(16)).map(|_| Raw(u.bytes(64))).collect(),
        host: Raw(u.bytes(64)),
        uid: u.num32(),
        nonce: {
            let mut n = [0u8; 32];
            let b = u.bytes(32);
            n[..b.len()].copy_from_slice(b);
            n
        },
    }
}

/// Our side of a handshake in the harness: a fixed identity, and a private
/// mesh (a secret) or not.
fn our_handshake(private: bool) -> link::Handshake {
    let local = libp2p::identity::Keypair::ed25519_from_bytes([7u8; 32])
        .expect("32 bytes make an ed25519 key")
        .public()
        .to_peer_id();
    let admission = crate::security::Admission {
        secret: private.then(|| {
            crate::security::MeshSecret::new("the fuzzing harness's mesh secret")
                .expect("long enough")
        }),
        allow: None,
    };
    link::Handshake {
        hello: Vec::new(),
        details: None,
        nonce: [3; 32],
        local,
        admission: std::sync::Arc::new(admission),
    }
}

fn work_host<'a>(u: &mut Input<'a>) -> WorkWire<'a> {
    let cid = u.byte() as u32 % 4;
    match u.byte() % 11 {
        0 | 1 => WorkWire::Send {
            queue: u.name(),
            seq: u.num(),
            delay_ms: if u.bool() { 0 } else { u.num() },
            ttl_ms: if u.bool() { 0 } else { u.num() },
            dedup: opt_str(u),
            headers: headers(u),
            payload: payload(u),
        },
        2 => WorkWire::Flow {
            queue: u.name(),
            cid,
            prefetch: u.num32(),
            visibility_ms: u.num(),
            max_attempts: u.num32(),
        },
        3 => WorkWire::Acks {
            cid,
            epoch: u.num(),
            tags: (0..u.count(1024)).map(|_| u.num()).collect(),
        },
        4 => WorkWire::Nack {
            cid,
            epoch: u.num(),
            tag: u.num(),
            delay_ms: u.num(),
        },
        5 => WorkWire::Release {
            cid,
            epoch: u.num(),
            tag: u.num(),
        },
        6 => WorkWire::Reject {
            cid,
            epoch: u.num(),
            tag: u.num(),
            reason: u.name(),
        },
        7 => WorkWire::Extend {
            cid,
            epoch: u.num(),
            tag: u.num(),
            ms: u.num(),
        },
        8 => WorkWire::Peek {
            req: u.num(),
            queue: u.name(),
            limit: u.num32(),
        },
        9 => WorkWire::Replay {
            req: u.num(),
            queue: u.name(),
        },
        _ => WorkWire::Request {
            id: u.num(),
            subject: u.name(),
            headers: headers(u),
            payload: payload(u),
        },
    }
}

fn dead<'a>(u: &mut Input<'a>) -> Option<(u32, &'a str)> {
    u.bool().then(|| (u.num32(), u.name()))
}

fn work_consumer<'a>(u: &mut Input<'a>) -> WorkWire<'a> {
    match u.byte() % 6 {
        0 | 1 => WorkWire::Deliver {
            queue: u.name(),
            cid: u.byte() as u32 % 4,
            epoch: u.num(),
            msgs: (0..u.count(600))
                .map(|_| DeliverWire {
                    tag: u.num(),
                    attempt: u.num32(),
                    origin: u.bool().then(|| raw_id(u)),
                    seq: u.num(),
                    dead: dead(u),
                    headers: headers(u),
                    payload: payload(u),
                })
                .collect(),
        },
        2 => WorkWire::Accepted {
            seqs: (0..u.count(64)).map(|_| u.num()).collect(),
        },
        3 => WorkWire::Refused {
            seq: u.num(),
            full: u.bool(),
            reason: u.name(),
        },
        4 => WorkWire::Peeked {
            req: u.num(),
            msgs: (0..u.count(64))
                .map(|_| PeekedWire {
                    origin: raw_id(u),
                    seq: u.num(),
                    attempts: u.num32(),
                    in_flight: u.bool(),
                    dead: dead(u),
                    headers: headers(u),
                    payload: payload(u),
                })
                .collect(),
        },
        _ => match u.byte() % 2 {
            0 => WorkWire::Replayed {
                req: u.num(),
                moved: u.num(),
            },
            _ => WorkWire::Reply {
                id: u.num(),
                status: match u.byte() % 3 {
                    0 => ReplyStatus::Ok,
                    1 => ReplyStatus::NoResponders,
                    _ => ReplyStatus::Dropped,
                },
                payload: payload(u),
            },
        },
    }
}

fn start<'a>(u: &mut Input<'a>) -> StartWire<'a> {
    match u.byte() % 5 {
        0 => StartWire::Earliest,
        1 => StartWire::Latest,
        2 => StartWire::Offset(u.num()),
        3 => StartWire::Time(u.num()),
        _ => StartWire::Committed {
            group: if u.byte() < 250 {
                u.name()
            } else {
                std::str::from_utf8(u.bytes(300)).unwrap_or("g")
            },
            latest: u.bool(),
        },
    }
}

fn stream_frame<'a>(u: &mut Input<'a>) -> StreamWire<'a> {
    let sid = u.num() % 4;
    let rid = u.num();
    match u.byte() % 19 {
        0..=2 => StreamWire::Append {
            stream: u.name(),
            seq: u.num(),
            records: (0..u.count(256))
                .map(|_| AppendWire {
                    key: Raw(u.bytes(32)),
                    ts_ms: u.num(),
                    headers: headers(u),
                    payload: payload(u),
                })
                .collect(),
        },
        3 => StreamWire::Appended {
            seq: u.num(),
            epoch: u.num(),
            placed: (0..u.count(64)).map(|_| (u.num32(), u.num())).collect(),
        },
        4 => StreamWire::AppendRefused {
            seq: u.num(),
            full: u.bool(),
            reason: u.name(),
        },
        5 => StreamWire::Watch {
            sid,
            stream: u.name(),
        },
        6 => StreamWire::WatchRefused { sid },
        7 => StreamWire::Unwatch { sid },
        8 => StreamWire::Parts {
            sid,
            epoch: u.num(),
            partitions: u.num32(),
        },
        9..=10 => StreamWire::Read {
            sid,
            rid,
            stream: u.name(),
            index: u.num32(),
            from: start(u),
            credit: u.num32(),
        },
        11 => StreamWire::ReadStarted { rid, at: u.num() },
        12 => StreamWire::ReadRefused {
            rid,
            reason: u.name(),
        },
        13 => StreamWire::Records {
            rid,
            gone: u.bool().then(|| (u.num(), u.num())),
            records: (0..u.count(256))
                .map(|_| RecordWire {
                    offset: u.num(),
                    key: Raw(u.bytes(32)),
                    ts_ms: u.num(),
                    headers: headers(u),
                    payload: payload(u),
                })
                .collect(),
        },
        14 => StreamWire::Credit { rid, n: u.num32() },
        15 => StreamWire::Stop { rid },
        16 => StreamWire::Commit {
            epoch: if u.bool() { EPOCH } else { u.num() },
            stream: u.name(),
            group: u.name(),
            index: u.num32(),
            offset: u.num(),
        },
        17 => StreamWire::Info {
            req: u.num(),
            stream: u.name(),
        },
        _ => StreamWire::InfoReply {
            req: u.num(),
            epoch: u.num(),
            parts: (0..u.count(300))
                .map(|_| PartWire {
                    index: u.num32(),
                    first: u.num(),
                    next: u.num(),
                    bytes: u.num(),
                    committed: (0..u.count(32)).map(|_| (u.name(), u.num())).collect(),
                })
                .collect(),
        },
    }
}

fn gossip_frame<'a>(u: &mut Input<'a>) -> GossipWire<'a> {
    let nodes = |u: &mut Input<'a>| (0..u.count(80)).map(|_| raw_id(u)).collect::<Vec<_>>();
    match u.byte() % 12 {
        0 => GossipWire::Join,
        1 => GossipWire::ForwardJoin {
            node: raw_id(u),
            ttl: u.byte(),
        },
        2 => GossipWire::Neighbor { high: u.bool() },
        3 => GossipWire::NeighborReply { accept: u.bool() },
        4 => GossipWire::Disconnect,
        5 => GossipWire::Shuffle {
            origin: raw_id(u),
            ttl: u.byte(),
            nodes: nodes(u),
        },
        6 => GossipWire::ShuffleReply { nodes: nodes(u) },
        7 | 8 => GossipWire::Msg {
            origin: raw_id(u),
            seq: u.num(),
            round: u.num32(),
            timestamp: u.num(),
            topic: u.name(),
            payload: payload(u),
            signature: Raw(u.bytes(64)),
        },
        9 => GossipWire::IHave {
            groups: (0..u.count(8))
                .map(|_| {
                    let o = raw_id(u);
                    (o, (0..u.count(256)).map(|_| (u.num(), u.num32())).collect())
                })
                .collect(),
        },
        10 => GossipWire::Graft {
            groups: (0..u.count(8))
                .map(|_| {
                    let o = raw_id(u);
                    (o, (0..u.count(256)).map(|_| u.num()).collect())
                })
                .collect(),
        },
        _ => GossipWire::Prune,
    }
}

fn pubsub_frame<'a>(u: &mut Input<'a>) -> Frame<'a> {
    match u.byte() % 8 {
        0 => Frame::Topic {
            id: if u.bool() {
                u32::from(u.byte() % 8)
            } else {
                u.num32()
            },
            name: u.name(),
        },
        1..=3 => Frame::Msg(MsgWire {
            topic: match u.byte() % 3 {
                0 => u32::MAX,
                1 => u32::from(u.byte() % 8),
                _ => u.num32(),
            },
            name: opt_str(u),
            seq_delta: u.num(),
            ts_delta: u.num() as i64,
            headers: headers(u),
            payload: payload(u),
        }),
        4 => Frame::Seq {
            session: u.num(),
            rseq: u.num(),
            // Often for this node's run, so the windows see it.
            to: if u.bool() { EPOCH } else { u.num() },
        },
        5 => Frame::Declare(decl(u)),
        6 => Frame::Sync(sync(u)),
        _ => match u.byte() % 2 {
            0 => Frame::Resume {
                session: u.num(),
                next: u.num(),
            },
            _ => Frame::Lagged {
                session: u.num(),
                missed: u.num(),
                next: u.num(),
                to: if u.bool() { EPOCH } else { u.num() },
            },
        },
    }
}

/// A frame of `family` built from the input.
pub fn arbitrary_frame<'a>(u: &mut Input<'a>, family: Family) -> Frame<'a> {
    match family {
        Family::QueueHost => Frame::Work(work_host(u)),
        Family::QueueConsumer => Frame::Work(work_consumer(u)),
        Family::Stream => Frame::Stream(stream_frame(u)),
        Family::Gossip => Frame::Gossip(gossip_frame(u)),
        Family::Membership => match u.byte() % 4 {
            0 => Frame::Sync(sync(u)),
            _ => Frame::Member(member(u)),
        },
        Family::PubSub => pubsub_frame(u),
        Family::Any => match u.byte() % 20 {
            0 => Frame::Hello(hello(u)),
            1 => Frame::Member(member(u)),
            2 => Frame::Declare(decl(u)),
            3 => Frame::Sync(sync(u)),
            4 | 5 => pubsub_frame(u),
            6 => Frame::Bye,
            7 => Frame::ByeAck,
            8 => Frame::Relink,
            9 => Frame::Gossip(gossip_frame(u)),
            10 => Frame::ShmOffer {
                nonce: u.num(),
                to_you: u.name(),
                from_you: u.name(),
            },
            11 => Frame::ShmRefuse { reason: u.name() },
            12 => Frame::ShmSwitch,
            13 => Frame::Auth {
                proofs: (0..u.count(8))
                    .map(|_| {
                        let mut p = [0u8; 32];
                        let b = u.bytes(32);
                        p[..b.len()].copy_from_slice(b);
                        p
                    })
                    .collect(),
            },
            14 => Frame::Work(work_host(u)),
            15 | 16 => Frame::Work(work_consumer(u)),
            _ => Frame::Stream(stream_frame(u)),
        },
    }
}

/// The postcard body of a structured frame of `family`.
pub fn arbitrary_body(u: &mut Input<'_>, family: Family) -> Vec<u8> {
    postcard::to_stdvec(&arbitrary_frame(u, family)).unwrap_or_default()
}

/// The name of a frame's variant, with its nested variant: `Bye`,
/// `Work(Send`, `Gossip(Join`.
pub fn variant_name(frame: &Frame<'_>) -> String {
    format!("{frame:?}")
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '(')
        .collect()
}

/// Bodies of frames of every variant of [`Frame`] (and of its nested
/// enums), one per variant, built from fixed values: seeds for the fuzzers
/// and the property test.
pub fn sample_bodies() -> Vec<Vec<u8>> {
    static SAMPLES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SAMPLES
        .get_or_init(|| {
            let mut names = std::collections::BTreeMap::new();
            for family in [
                Family::Any,
                Family::QueueHost,
                Family::QueueConsumer,
                Family::Stream,
                Family::Gossip,
                Family::Membership,
                Family::PubSub,
            ] {
                for (v, w, x) in (0..24u8)
                    .flat_map(|v| (0..24u8).flat_map(move |w| (0..24u8).map(move |x| (v, w, x))))
                {
                    // The first bytes pick the variants (at whichever read
                    // a variant is picked); the filler gives the fields
                    // values (mostly valid ids and names).
                    let mut bytes = vec![v, w, w, w, w, x, x, x, x, x, x, x, x];
                    bytes.extend((0..64u8).map(|i| i.wrapping_mul(37) % 200));
                    let frame = arbitrary_frame(&mut Input::new(&bytes), family);
                    names
                        .entry(variant_name(&frame))
                        .or_insert_with(|| postcard::to_stdvec(&frame).unwrap_or_default());
                }
            }
            names.into_values().collect()
        })
        .clone()
}

// ---------------------------------------------------------------------------
// Entry points: decoders.

/// A reader that hands out `data` in chunks of the given sizes, never
/// pending (the transport's stream, over a fuzz input).
#[derive(Debug)]
pub struct ChunkedReader<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    at: usize,
}

impl<'a> ChunkedReader<'a> {
    /// Reads `data`, `sizes[i]` (0 read as 1, cycling) bytes per read.
    pub fn new(data: &'a [u8], sizes: &'a [u8]) -> Self {
        Self { data, sizes, at: 0 }
    }
}

impl futures::AsyncRead for ChunkedReader<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let size = if self.sizes.is_empty() {
            usize::MAX
        } else {
            let s = self.sizes[self.at % self.sizes.len()];
            self.at += 1;
            // Chunks of 1 to 255 bytes, or 0: everything at once.
            if s == 0 {
                usize::MAX
            } else {
                usize::from(s)
            }
        };
        let n = size.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(n))
    }
}

/// Splits input bytes into a chunking schedule and a byte stream: the
/// first byte says how many of the following bytes are chunk sizes.
fn schedule(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (&[], &[]);
    };
    rest.split_at(usize::from(n % 16).min(rest.len()))
}

/// The length-prefixed frame splitter and reader with the node's frame
/// limit: `split_frames` on the stream cut into chunks, `FrameReader`
/// (`read_batch` and `read_one`) over the same chunks; both must agree.
pub fn frames(data: &[u8]) {
    let (sizes, stream) = schedule(data);
    // split_frames over the chunks, as the ring reader does.
    let mut buf = BytesMut::new();
    let mut split = Vec::new();
    let mut split_err = false;
    let mut at = 0;
    let mut i = 0;
    while at < stream.len() {
        let size = sizes
            .get(i % sizes.len().max(1))
            .map_or(stream.len(), |s| usize::from(*s).max(1));
        i += 1;
        let end = (at + size).min(stream.len());
        buf.extend_from_slice(&stream[at..end]);
        at = end;
        if tframe::split_frames(&mut buf, MAX_FRAME, &mut split).is_err() {
            split_err = true;
            break;
        }
    }
    // FrameReader::read_batch over the same chunks, as a link does.
    let mut reader = FrameReader::new(ChunkedReader::new(stream, sizes), MAX_FRAME);
    let mut batched = Vec::new();
    let batch_err = loop {
        match futures::executor::block_on(reader.read_batch(&mut batched)) {
            Ok(true) => {}
            Ok(false) => break false,
            Err(_) => break true,
        }
    };
    let whole: usize = split.iter().map(|f| f.len() + tframe::LEN_PREFIX).sum();
    assert!(whole <= stream.len(), "frames longer than their input");
    if !split_err && !batch_err {
        assert_eq!(split, batched, "split_frames and FrameReader disagree");
    }
    // read_one, frame by frame (a handshake's reads), then read_batch.
    let mut reader = FrameReader::new(ChunkedReader::new(stream, sizes), MAX_FRAME);
    let mut ones = Vec::new();
    for _ in 0..4 {
        match futures::executor::block_on(reader.read_one()) {
            Ok(Some(f)) => ones.push(f),
            _ => break,
        }
    }
    for (a, b) in ones.iter().zip(&split) {
        assert_eq!(a, b, "read_one and split_frames disagree");
    }
}

/// Decodes a frame body and parses every part the runtime parses at the
/// edge, whatever the variant; a decoded frame also round-trips.
pub fn wire(data: &[u8]) {
    let body = Bytes::copy_from_slice(data);
    let _ = wire::is_shm_switch(&body);
    let Ok(frame) = wire::decode(&body) else {
        return;
    };
    let again = postcard::to_stdvec(&frame).unwrap_or_default();
    assert_eq!(
        wire::decode(&again).ok().as_ref(),
        Some(&frame),
        "a decoded frame does not round-trip"
    );
    let _ = parse_edge(&body, &frame);
}

/// What the runtime parses out of each frame before any core sees it
/// (peer ids, patterns, topics, headers and payload slices).
fn parse_edge(body: &Bytes, frame: &Frame<'_>) -> Result<(), WireError> {
    let topic = |t: &str| {
        Topic::new(t)
            .map(|_| ())
            .map_err(|e| WireError::BadTopic(e.to_string()))
    };
    match frame {
        Frame::Hello(_)
        | Frame::Auth { .. }
        | Frame::Bye
        | Frame::ByeAck
        | Frame::Relink
        | Frame::ShmSwitch => {}
        Frame::Member(m) => {
            wire::member_from_wire(m)?;
        }
        Frame::Declare(d) => {
            wire::decl_from_wire(d)?;
        }
        Frame::Sync(s) => {
            for m in &s.members {
                wire::update_from_wire(m)?;
            }
            for d in &s.decls {
                wire::decl_from_wire(d)?;
            }
        }
        Frame::Topic { id, name } => LinkDecoder::new(local()).handle_topic(*id, name)?,
        Frame::Msg(m) => {
            let mut dec = LinkDecoder::new(local());
            dec.handle_msg(body, m, &LocalSubscriptions::default())?;
        }
        Frame::Seq { .. } | Frame::Resume { .. } | Frame::Lagged { .. } => {}
        Frame::Gossip(g) => {
            GossipCodec::default().decode(body, g)?;
        }
        Frame::ShmOffer { .. } | Frame::ShmRefuse { .. } => {}
        Frame::Work(w) => match w {
            WorkWire::Send {
                queue,
                headers,
                payload,
                ..
            } => {
                topic(queue)?;
                headers_from_wire(body, headers);
                slice(body, payload.0);
            }
            WorkWire::Flow { queue, .. } => topic(queue)?,
            WorkWire::Deliver { msgs, .. } => {
                for m in msgs {
                    if let Some(o) = m.origin {
                        wire::node_id(o)?;
                    }
                    headers_from_wire(body, &m.headers);
                    slice(body, m.payload.0);
                }
            }
            WorkWire::Peeked { msgs, .. } => {
                for m in msgs.iter().take(MAX_PEEK) {
                    wire::node_id(m.origin)?;
                    headers_from_wire(body, &m.headers);
                    slice(body, m.payload.0);
                }
            }
            WorkWire::Request {
                subject,
                headers,
                payload,
                ..
            } => {
                topic(subject)?;
                headers_from_wire(body, headers);
                slice(body, payload.0);
            }
            WorkWire::Reply { payload, .. } => {
                slice(body, payload.0);
            }
            _ => {}
        },
        Frame::Stream(s) => match s {
            StreamWire::Append {
                stream, records, ..
            } => {
                topic(stream)?;
                for r in records {
                    slice(body, r.key.0);
                    headers_from_wire(body, &r.headers);
                    slice(body, r.payload.0);
                }
            }
            StreamWire::Watch { stream, .. } => topic(stream)?,
            StreamWire::Read { stream, from, .. } => {
                topic(stream)?;
                start_from_wire(from);
            }
            StreamWire::Records { records, .. } => {
                for r in records {
                    slice(body, r.key.0);
                    headers_from_wire(body, &r.headers);
                    slice(body, r.payload.0);
                }
            }
            _ => {}
        },
    }
    Ok(())
}

/// The link handshake (`runtime::link::handshake`) reading the first
/// frame(s) of a stream, cut into chunks, with the node's frame limit.
/// The first byte picks a private mesh (a secret to check) or not.
pub fn handshake(data: &[u8]) {
    let (private, data) = match data.split_first() {
        Some((b, rest)) => (b & 1 == 1, rest),
        None => (false, data),
    };
    let (sizes, stream) = schedule(data);
    let mut reader = FrameReader::new(ChunkedReader::new(stream, sizes), MAX_FRAME);
    let ours = our_handshake(private);
    let peer = libp2p::identity::Keypair::ed25519_from_bytes([9u8; 32])
        .expect("32 bytes make an ed25519 key")
        .public()
        .to_peer_id();
    let _ = futures::executor::block_on(link::handshake(&mut reader, &ours, peer, |_| {}));
}

/// A control stream: read to its end under the control limits
/// (`runtime::link::read_control`), then its frames checked the way the
/// node task checks them (membership messages and `Relink` only).
pub fn control(data: &[u8]) {
    let (sizes, stream) = schedule(data);
    let mut reader = link::control_reader(ChunkedReader::new(stream, sizes));
    let Ok(Ok(frames)) = futures::executor::block_on(link::read_control(&mut reader)) else {
        return;
    };
    for body in &frames {
        match wire::decode(body) {
            Ok(Frame::Member(m)) => {
                if wire::member_from_wire(&m).is_err() {
                    return;
                }
            }
            Ok(Frame::Relink) => {}
            _ => return,
        }
    }
}

// ---------------------------------------------------------------------------
// Entry points: the cores, fed by peers.

/// A step of a core harness, chosen by one input byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A frame body taken as it is from the input (`u16` length first).
    Raw,
    /// A frame built from the input.
    Structured,
    /// Time passes (timers run).
    Wait,
    /// A link comes up (after the handshake on a `Hello` built from the
    /// input) or goes down.
    Link,
}

/// Host side of work queues: `Send`, `Flow`, acks, nacks, rejects, peeks
/// and replays from peers, into `core::queue`.
pub fn queue_host(data: &[u8]) {
    drive(data, Family::QueueHost);
}

/// Consumer side of work queues: `Deliver`, `Accepted`, `Refused`,
/// `Peeked`, `Reply` from hosts, into local consumers (bounded inboxes) and
/// pending sends.
pub fn queue_consumer(data: &[u8]) {
    drive(data, Family::QueueConsumer);
}

/// Streams: appends, reads, credit, commits and info from peers into
/// `core::stream`, and a consumer's frames from hosts.
pub fn stream(data: &[u8]) {
    drive(data, Family::Stream);
}

/// Gossip mode: HyParView and Plumtree messages into `core::gossip`.
pub fn gossip(data: &[u8]) {
    drive(data, Family::Gossip);
}

/// Membership: SWIM messages and `Sync` into `core::membership`.
pub fn membership(data: &[u8]) {
    drive(data, Family::Membership);
}

/// Interest and pub/sub: declarations into `core::interest`, topics and
/// messages into the link's `core::pubsub::LinkDecoder`.
pub fn pubsub(data: &[u8]) {
    drive(data, Family::PubSub);
}

/// Every kind of frame into one node.
pub fn node(data: &[u8]) {
    drive(data, Family::Any);
}

/// One frame body of any size from a peer whose link is up, into a node
/// (the core targets' raw steps carry at most 64 KiB).
pub fn one_frame(body: &[u8]) {
    let _ = through_node(body);
}

/// [`one_frame`], and the node's metrics once the frame was handled and
/// the link went down (what shows that the harness drives the node).
pub fn through_node(body: &[u8]) -> Option<crate::Metrics> {
    let mut metrics = None;
    on_paused_clock(async {
        let Some(mut node) = Harness::new().await else {
            return;
        };
        let Some(peer) = id(1) else {
            return;
        };
        node.link_up(peer, hello_bytes(&mut Input::new(&[]))).await;
        node.frame(peer, body).await;
        metrics = node.finish().await;
    });
    metrics
}

/// The harness node's id.
fn local() -> NodeId {
    id(0).unwrap_or_else(NodeId::random)
}

/// The node's run (its epoch): the fixed wall-clock origin of the
/// harness, in µs. Reliable sessions, stream host runs and queue host runs
/// of the node are this, so structured frames can name them.
const EPOCH: u64 = 7;

/// Runs `fut` on a current-thread tokio runtime with a paused clock: time
/// moves only when every task waits, so a run is the same every time.
fn on_paused_clock(fut: impl std::future::Future<Output = ()>) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
    else {
        return;
    };
    rt.block_on(fut);
}

/// Drives the real node (`Node`, its node task and link tasks, on a paused
/// clock) with the steps of `data`: frames from up to three peers on
/// in-memory data streams, time passing, links coming and going.
pub fn drive(data: &[u8], family: Family) {
    on_paused_clock(async {
        let Some(mut node) = Harness::new().await else {
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
                8..=51 => Step::Structured,
                52..=59 => Step::Wait,
                _ => Step::Link,
            };
            node.step(&mut u, step, peer, family).await;
        }
        let _ = node.finish().await;
    });
}

/// A frame body built from the input, sometimes mangled (cut, or a byte
/// flipped): a structured step of the node and engine targets.
fn structured_body(u: &mut Input<'_>, family: Family) -> Vec<u8> {
    let body = arbitrary_body(u, family);
    match u.byte() {
        0..=239 => body,
        240..=247 => {
            let cut = u.below(body.len() + 1);
            body[..cut].to_vec()
        }
        _ => {
            let mut b = body;
            let i = u.below(b.len());
            if let Some(x) = b.get_mut(i) {
                *x ^= 1 << (u.byte() % 8);
            }
            b
        }
    }
}

/// How long a wait step lets time pass: at most a day.
fn wait(u: &mut Input<'_>) -> Duration {
    let ms = match u.byte() % 4 {
        0 => u64::from(u.byte()),
        1 => u64::from(u.u16()),
        2 => u64::from(u.u32()),
        _ => 1000,
    };
    Duration::from_millis(ms.min(86_400_000))
}

/// A `Hello` (built from the input) and the empty `Auth` of a node outside
/// any private mesh: a peer's side of the handshake.
fn hello_bytes(u: &mut Input<'_>) -> Vec<u8> {
    let mut bytes = Vec::new();
    wire::encode(&mut bytes, &Frame::Hello(self::hello(u)));
    wire::encode(&mut bytes, &Frame::Auth { proofs: Vec::new() });
    bytes
}

/// What a peer has written to the node on one data stream, not read yet.
#[derive(Debug, Default)]
struct PipeState {
    buf: VecDeque<u8>,
    /// The peer closed its side: the node reads to the end, then EOF.
    closed: bool,
    reader: Option<std::task::Waker>,
}

type Pipe = std::sync::Arc<std::sync::Mutex<PipeState>>;

fn lock(pipe: &Pipe) -> std::sync::MutexGuard<'_, PipeState> {
    pipe.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes to `pipe` what a peer sends, and wakes the node's reader.
fn send(pipe: &Pipe, bytes: &[u8]) {
    let mut p = lock(pipe);
    if p.closed {
        return;
    }
    p.buf.extend(bytes);
    if let Some(w) = p.reader.take() {
        w.wake();
    }
}

fn close(pipe: &Pipe) {
    let mut p = lock(pipe);
    p.closed = true;
    if let Some(w) = p.reader.take() {
        w.wake();
    }
}

/// The node's end of a data stream with a fuzzed peer: it reads what the
/// harness wrote; what the node writes is dropped.
#[derive(Debug)]
struct PeerStream(Pipe);

impl futures::AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut p = lock(&self.0);
        if p.buf.is_empty() {
            if p.closed {
                return Poll::Ready(Ok(0));
            }
            p.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = out.len().min(p.buf.len());
        for (o, b) in out.iter_mut().zip(p.buf.drain(..n)) {
            *o = b;
        }
        Poll::Ready(Ok(n))
    }
}

impl futures::AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A transport that carries nothing: the harness hands the node its
/// streams as transport events.
#[derive(Debug)]
struct NoTransport;

impl Transport for NoTransport {
    fn dial_peer(&self, _: NodeId, _: Vec<libp2p::Multiaddr>) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn send_control(&self, _: NodeId, _: Vec<u8>) -> bool {
        false
    }

    fn fresh_stream(&self, _: NodeId) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn open_stream(&self, _: NodeId) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn disconnect(&self, _: NodeId) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

#[derive(Debug)]
struct TokioSpawn;

impl Spawn for TokioSpawn {
    fn spawn(&self, fut: BoxFuture<'static, ()>) -> tokio::task::AbortHandle {
        tokio::spawn(fut).abort_handle()
    }
}

/// The harness node's surroundings: no network but the events the
/// harness sends, plain tokio tasks, a wall clock that starts at
/// [`EPOCH`] µs, a fixed seed.
#[derive(Debug)]
struct FuzzEnv {
    events: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<quic::Event>>>,
}

impl Environment for FuzzEnv {
    fn attach(
        &self,
        _: &[libp2p::Multiaddr],
    ) -> (Box<dyn Transport>, tokio::sync::mpsc::Receiver<quic::Event>) {
        let events = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| tokio::sync::mpsc::channel(1).1);
        (Box::new(NoTransport), events)
    }

    fn spawn(&self) -> std::sync::Arc<dyn Spawn> {
        std::sync::Arc::new(TokioSpawn)
    }

    fn wall_clock(&self) -> WallClock {
        WallClock::Virtual {
            unix_micros_at_origin: EPOCH,
            origin: tokio::time::Instant::now(),
        }
    }

    fn seed(&self) -> u64 {
        1
    }

    fn open_store(
        &self,
    ) -> (
        Box<dyn crate::runtime::durable::Backend>,
        tokio::sync::mpsc::UnboundedReceiver<u64>,
        crate::engine::durable::Loaded,
    ) {
        // Never called: the harness node has no data dir.
        crate::sim::disk::MemBackend::open(Default::default())
    }
}

/// The real node under fuzz and its fuzzed peers' data streams.
struct Harness {
    node: crate::Node,
    events: tokio::sync::mpsc::Sender<quic::Event>,
    /// The data stream of each peer whose link the harness opened.
    pipes: FxHashMap<NodeId, Pipe>,
    /// Kept so the node keeps them: subscriptions (one reliable), queue
    /// consumers (cids 1 and 2) and a stream consumer.
    _subs: Vec<crate::Subscription>,
    _reliable: crate::ReliableSubscription,
    _consumers: Vec<crate::queue::Consumer>,
    _stream: Option<crate::stream::StreamConsumer>,
}

impl Harness {
    async fn new() -> Option<Self> {
        let (events, rx) = tokio::sync::mpsc::channel(1024);
        let env = std::sync::Arc::new(FuzzEnv {
            events: std::sync::Mutex::new(Some(rx)),
        });
        let key = libp2p::identity::Keypair::ed25519_from_bytes([1; 32]).ok()?;
        let node = crate::Node::builder()
            .identity(key)
            .environment(env)
            .host_all()
            .start()
            .await
            .ok()?;
        let mut subs = Vec::new();
        for p in ["orders.>", "s"] {
            subs.push(node.subscribe(p).await.ok()?);
        }
        let reliable = node.subscribe_reliable("a.*").await.ok()?;
        let queue = node.queue("q").ok()?;
        let consumers = [1, 64]
            .into_iter()
            .map(|n| queue.consume(crate::queue::ConsumeOptions::default().prefetch(n)))
            .collect();
        let stream = node
            .stream("s")
            .ok()
            .map(|s| s.consume(crate::stream::From::Earliest));
        Some(Self {
            node,
            events,
            pipes: FxHashMap::default(),
            _subs: subs,
            _reliable: reliable,
            _consumers: consumers,
            _stream: stream,
        })
    }

    async fn step(&mut self, u: &mut Input<'_>, step: Step, peer: usize, family: Family) {
        let Some(peer) = id(peer) else {
            return;
        };
        match step {
            Step::Raw => {
                let body = u.bytes(usize::from(u16::MAX));
                self.frame(peer, body).await;
            }
            Step::Structured => {
                let body = structured_body(u, family);
                self.frame(peer, &body).await;
            }
            Step::Wait => {
                // The node's timers run meanwhile.
                tokio::time::sleep(wait(u)).await;
            }
            Step::Link => {
                if self.pipes.contains_key(&peer) && u.bool() {
                    self.link_down(peer).await;
                } else {
                    let hello = hello_bytes(u);
                    self.link_up(peer, hello).await;
                }
            }
        }
    }

    /// Lets the node's tasks run until all of them wait (time moves on by
    /// a millisecond, and the timers due meanwhile run).
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    /// A connection from `peer` and a data stream on it, whose first bytes
    /// are `hello` (a newer stream replaces an older one, as in the node).
    async fn link_up(&mut self, peer: NodeId, hello: Vec<u8>) {
        let pipe = Pipe::default();
        send(&pipe, &hello);
        if let Some(old) = self.pipes.insert(peer, pipe.clone()) {
            close(&old);
        }
        let addr = libp2p::Multiaddr::empty();
        let _ = self
            .events
            .send(quic::Event::Connected { peer, addr })
            .await;
        let stream = quic::Event::Stream {
            peer,
            stream: Box::new(PeerStream(pipe)),
            outbound: false,
        };
        let _ = self.events.send(stream).await;
        Self::settle().await;
    }

    /// `peer`'s stream ends and its connection closes.
    async fn link_down(&mut self, peer: NodeId) {
        if let Some(pipe) = self.pipes.remove(&peer) {
            close(&pipe);
        }
        let _ = self.events.send(quic::Event::Disconnected { peer }).await;
        Self::settle().await;
    }

    /// `peer` sends frame `body` on its data stream, if it has one.
    async fn frame(&mut self, peer: NodeId, body: &[u8]) {
        let Some(pipe) = self.pipes.get(&peer) else {
            return;
        };
        let Ok(len) = u32::try_from(body.len()) else {
            return;
        };
        send(pipe, &len.to_le_bytes());
        send(pipe, body);
        Self::settle().await;
    }

    /// Everything still held ends: links go down, timers run out, the
    /// node shuts down. Its metrics from before the shutdown.
    async fn finish(mut self) -> Option<crate::Metrics> {
        let peers: Vec<NodeId> = self.pipes.keys().copied().collect();
        for p in peers {
            self.link_down(p).await;
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let metrics = self.node.metrics().await;
        self.node.shutdown().await;
        metrics
    }
}
