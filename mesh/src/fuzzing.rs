//! Fuzzing entry points: every decoder of peer input, and each core fed
//! with frames from peers. Not a public API (hidden from the docs); used by
//! the cargo-fuzz targets in `fuzz/` and by the bounded property test
//! `mesh/tests/fuzz_inputs.rs`.
//!
//! Each entry point takes arbitrary bytes and must never panic. The core
//! harness ([`queue_host`], [`stream`], ...) reads its input as a sequence
//! of steps (see [`Step`]): a raw frame body, a frame built from the input
//! (structure-aware: valid peer ids, topic names and variants, so the
//! fuzzer gets past the decoder), time passing, or a link going up or down.
//! Frames become core calls the way `runtime::NodeTask::handle_frame` (and
//! `runtime::work`, `runtime::streams`) turn them into calls, without the
//! async runtime; outputs are drained and encoded the way the runtime
//! would, and dropped. Reliable pub/sub frames (`Seq`, `Resume`, `Lagged`)
//! drive the runtime's own rules (`engine::reliable`), not a copy.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use mesh_transports::frame::{self as tframe, FrameReader};
use rand::{rngs::SmallRng, SeedableRng};
use rustc_hash::FxHashMap;

use crate::{
    core::{
        gossip::Gossip,
        interest::Interest,
        membership::{self, MemberState, Membership},
        pubsub::{LinkDecoder, LocalSubscriptions, MessageId},
        queue::{self as core_queue, ConsumerOptions, NewMessage, Queues},
        stream::{self as core_stream, NewRecord, Start, Streams},
        topic::{Pattern, Topic},
        NodeId,
    },
    engine::reliable::{Accept, Kept, Reliable, Resume},
    runtime::{
        link,
        streams::start_from_wire,
        work::{headers_from_wire, inbox_limit, slice, MAX_PEEK},
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
    let Some(mut node) = Harness::new() else {
        return;
    };
    let Some(peer) = id(1) else {
        return;
    };
    node.link_up(peer, Vec::new());
    node.frame(peer, Bytes::copy_from_slice(body));
    node.run_timers();
    node.drain();
    node.finish();
}

/// The epoch of the harness node's stream host.
const EPOCH: u64 = 7;

/// The reliable windows of a node that published 6 messages to `peer`,
/// numbered for its epoch [`EPOCH`], in a window of 4: a `Resume` from
/// below 3 is answered with `Lagged`.
fn kept_for(peer: NodeId) -> Reliable {
    let mut r = Reliable::new(EPOCH);
    for seq in 1..=6 {
        let kept = Kept {
            rseq: 0,
            seq,
            timestamp: seq,
            topic: "orders.eu".into(),
            headers: Vec::new(),
            payload: Bytes::from_static(b"kept"),
        };
        r.keep(peer, EPOCH, kept, 4);
    }
    r
}

fn local() -> NodeId {
    id(0).unwrap_or_else(NodeId::random)
}

/// Drives one harness node with the steps of `data`.
pub fn drive(data: &[u8], family: Family) {
    let Some(mut node) = Harness::new() else {
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
        node.step(&mut u, step, peer, family);
    }
    node.finish();
}

#[derive(Debug)]
struct PeerLink {
    dec: LinkDecoder,
    /// (session, rseq, to) of the next `Msg`.
    pending_seq: Option<(u64, u64, u64)>,
}

#[derive(Debug)]
struct Consumer {
    prefetch: u32,
    // Bounded by inbox_limit(prefetch), as in the runtime.
    inbox: VecDeque<(NodeId, u64, u64)>,
}

type ConsumerKey = (NodeId, u32);

struct Harness {
    local: NodeId,
    now: Instant,
    rng: SmallRng,
    links: FxHashMap<NodeId, PeerLink>,
    subs: LocalSubscriptions,
    membership: Membership,
    interest: Interest,
    gossip: Gossip,
    codec: GossipCodec,
    queues: Queues<ConsumerKey>,
    streams: Streams<NodeId>,
    consumers: FxHashMap<u32, Consumer>,
    pending_sends: FxHashMap<u64, NodeId>,
    /// The runtime's reliable windows (`engine::reliable`), real.
    reliable: Reliable,
    /// What the node would send, encoded (cleared after each step).
    out: Vec<u8>,
}

impl Harness {
    fn new() -> Option<Self> {
        let local = id(0)?;
        // The one clock read, made here in the driver's place.
        let now = Instant::now();
        let mut subs = LocalSubscriptions::default();
        let mut interest = Interest::new(local, EPOCH);
        for p in ["orders.>", "a.*", "s"] {
            let p = Pattern::new(p).ok()?;
            interest.subscribe(&p, false);
            subs.add(p);
        }
        let mut streams = Streams::new(core_stream::Config::default());
        streams.exempt_from_quota(local);
        let mut consumers = FxHashMap::default();
        for (cid, prefetch) in [(1, 1), (2, 64)] {
            consumers.insert(
                cid,
                Consumer {
                    prefetch,
                    inbox: VecDeque::new(),
                },
            );
        }
        let peer = id(1)?;
        Some(Self {
            local,
            now,
            rng: SmallRng::seed_from_u64(1),
            links: FxHashMap::default(),
            subs,
            membership: Membership::new(
                local,
                Vec::new(),
                EPOCH,
                membership::Config::default(),
                now,
            ),
            interest,
            gossip: Gossip::new(local, Default::default()),
            codec: GossipCodec::default(),
            queues: Queues::new(core_queue::Config::default()),
            streams,
            consumers,
            pending_sends: (1..=8).map(|s| (s, peer)).collect(),
            reliable: kept_for(peer),
            out: Vec::new(),
        })
    }

    fn step(&mut self, u: &mut Input<'_>, step: Step, peer: usize, family: Family) {
        let Some(peer) = id(peer) else {
            return;
        };
        match step {
            Step::Raw => {
                let body = u.bytes(usize::from(u16::MAX));
                self.frame(peer, Bytes::copy_from_slice(body));
            }
            Step::Structured => {
                let body = arbitrary_body(u, family);
                // Sometimes mangled: cut, or a byte flipped.
                let body = match u.byte() {
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
                };
                self.frame(peer, Bytes::from(body));
            }
            Step::Wait => {
                let ms = match u.byte() % 4 {
                    0 => u64::from(u.byte()),
                    1 => u64::from(u.u16()),
                    2 => u64::from(u.u32()),
                    _ => 1000,
                };
                self.now = self
                    .now
                    .checked_add(Duration::from_millis(ms))
                    .unwrap_or(self.now);
            }
            Step::Link => {
                if self.links.contains_key(&peer) && u.bool() {
                    self.link_down(peer);
                } else {
                    let mut hello = Vec::new();
                    wire::encode(&mut hello, &Frame::Hello(self::hello(u)));
                    wire::encode(&mut hello, &Frame::Auth { proofs: Vec::new() });
                    let mut reader = FrameReader::new(futures::io::Cursor::new(hello), MAX_FRAME);
                    let ours = our_handshake(false);
                    if let Ok(h) = futures::executor::block_on(link::handshake(
                        &mut reader,
                        &ours,
                        peer,
                        |_| {},
                    )) {
                        self.link_up(peer, h.0.addrs);
                    }
                }
            }
        }
        self.run_timers();
        self.drain();
    }

    fn link_up(&mut self, peer: NodeId, addrs: Vec<Vec<u8>>) {
        let resume = self.reliable.link_up(self.now, peer);
        let Resume { session, next } = resume;
        wire::encode(&mut self.out, &Frame::Resume { session, next });
        self.links.insert(
            peer,
            PeerLink {
                dec: LinkDecoder::new(peer),
                pending_seq: None,
            },
        );
        self.gossip.handle_peer_up(peer, &mut self.rng);
        if self.gossip.active().is_empty() {
            self.gossip.join(self.now, peer);
        }
        self.membership.handle_link_up(self.now, peer, addrs);
    }

    /// As the runtime does when a link ends or a peer sent a bad frame.
    fn link_down(&mut self, peer: NodeId) {
        self.links.remove(&peer);
        self.membership.handle_link_down(self.now, peer);
        self.streams.close_all(|k| *k == peer);
        self.queues.remove_consumers(self.now, |k| k.0 == peer);
        self.gossip.handle_link_down(peer, &mut self.rng);
    }

    fn frame(&mut self, peer: NodeId, body: Bytes) {
        if self.handle_frame(peer, &body).is_err() {
            self.link_down(peer);
        }
    }

    /// Mirrors `runtime::NodeTask::handle_frame`.
    fn handle_frame(&mut self, peer: NodeId, body: &Bytes) -> Result<(), WireError> {
        let now = self.now;
        match wire::decode(body)? {
            Frame::Msg(m) => {
                let link = self
                    .links
                    .get_mut(&peer)
                    .ok_or(WireError::Unexpected("Msg"))?;
                let seq = link.pending_seq.take();
                let (msg, targets) = link.dec.handle_msg(body, &m, &self.subs)?;
                let _ = (msg, targets);
                if let Some((session, rseq, to)) = seq {
                    if to == self.reliable.session() {
                        let a = self.reliable.accept(now, peer, session, rseq);
                        if let Accept::Gap {
                            resume: Some(Resume { session, next }),
                        } = a
                        {
                            wire::encode(&mut self.out, &Frame::Resume { session, next });
                        }
                    }
                }
            }
            Frame::Seq { session, rseq, to } => {
                if rseq == u64::MAX {
                    return Err(WireError::Malformed("Seq at u64::MAX".into()));
                }
                let link = self
                    .links
                    .get_mut(&peer)
                    .ok_or(WireError::Unexpected("Seq"))?;
                link.pending_seq = Some((session, rseq, to));
            }
            Frame::Resume { session, next } => {
                if let Some(r) = self.reliable.resend(&peer, session, next) {
                    let ours = self.reliable.session();
                    if let Some((missed, next)) = r.lagged {
                        let to = r.to;
                        let session = ours;
                        wire::encode(
                            &mut self.out,
                            &Frame::Lagged {
                                session,
                                missed,
                                next,
                                to,
                            },
                        );
                    }
                    for k in r.messages() {
                        let (session, rseq, to) = (ours, k.rseq, r.to);
                        wire::encode(&mut self.out, &Frame::Seq { session, rseq, to });
                    }
                }
            }
            Frame::Lagged {
                session,
                missed,
                next,
                to,
            } => {
                if next == u64::MAX {
                    return Err(WireError::Malformed("Lagged to u64::MAX".into()));
                }
                if to == self.reliable.session() {
                    let _ = self.reliable.lagged(peer, session, missed, next);
                }
            }
            Frame::ByeAck => {}
            Frame::Gossip(g) => {
                let msg = self.codec.decode(body, &g)?;
                self.gossip.handle_message(now, peer, msg, &mut self.rng);
            }
            Frame::Topic { id, name } => {
                let link = self
                    .links
                    .get_mut(&peer)
                    .ok_or(WireError::Unexpected("Topic"))?;
                link.dec.handle_topic(id, name)?;
            }
            Frame::Member(m) => {
                let msg = wire::member_from_wire(&m)?;
                self.membership.handle_message(now, peer, msg);
            }
            Frame::Declare(d) => {
                let decl = wire::decl_from_wire(&d)?;
                if decl.node != peer {
                    return Err(WireError::Unexpected("Declare for another node"));
                }
                self.interest.handle_declaration(decl)?;
            }
            Frame::Sync(s) => {
                let updates = s
                    .members
                    .iter()
                    .map(wire::update_from_wire)
                    .collect::<Result<Vec<_>, _>>()?;
                self.membership.apply_updates(now, updates);
                for d in &s.decls {
                    self.interest.handle_declaration(wire::decl_from_wire(d)?)?;
                }
            }
            Frame::Bye => {
                self.links
                    .get_mut(&peer)
                    .ok_or(WireError::Unexpected("Bye"))?;
                let update = self.membership.members().find(|m| m.node == peer).map(|m| {
                    membership::Update {
                        node: peer,
                        incarnation: m.incarnation,
                        state: MemberState::Down,
                        addrs: m.addrs.clone(),
                        signature: None,
                    }
                });
                if let Some(update) = update {
                    self.membership.apply_updates(now, [update]);
                }
            }
            Frame::Hello(_) => return Err(WireError::Unexpected("second Hello")),
            Frame::Auth { .. } => return Err(WireError::Unexpected("second Auth")),
            Frame::Relink => return Err(WireError::Unexpected("Relink on a data stream")),
            // Shared memory is never offered to this node (no shm host).
            Frame::ShmOffer { .. } => return Err(WireError::Unexpected("ShmOffer")),
            Frame::ShmRefuse { .. } => return Err(WireError::Unexpected("ShmRefuse")),
            Frame::ShmSwitch => return Err(WireError::Unexpected("ShmSwitch")),
            Frame::Work(w) => self.handle_work(peer, body, w)?,
            Frame::Stream(s) => self.handle_stream(peer, body, s)?,
        }
        Ok(())
    }

    /// Mirrors `runtime::NodeTask::handle_work`.
    fn handle_work(
        &mut self,
        peer: NodeId,
        body: &Bytes,
        w: WorkWire<'_>,
    ) -> Result<(), WireError> {
        let now = self.now;
        let topic = |t: &str| {
            Topic::new(t)
                .map(|_| ())
                .map_err(|e| WireError::BadTopic(e.to_string()))
        };
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
                topic(queue)?;
                let msg = NewMessage {
                    id: MessageId {
                        publisher: peer,
                        seq,
                    },
                    headers: headers_from_wire(body, &headers),
                    payload: slice(body, payload.0),
                    not_before: (delay_ms > 0)
                        .then(|| core_queue::after(now, Duration::from_millis(delay_ms))),
                    expires: (ttl_ms > 0)
                        .then(|| core_queue::after(now, Duration::from_millis(ttl_ms))),
                    dedup_key: dedup.map(str::to_owned),
                };
                if let Err(e) = self.queues.send(now, queue, msg) {
                    let reason = e.to_string();
                    let full = matches!(e, core_queue::SendError::Full { .. });
                    wire::encode(
                        &mut self.out,
                        &Frame::Work(WorkWire::Refused {
                            seq,
                            full,
                            reason: &reason,
                        }),
                    );
                }
            }
            WorkWire::Accepted { seqs } => {
                for seq in seqs {
                    if self.pending_sends.get(&seq) == Some(&peer) {
                        self.pending_sends.remove(&seq);
                    }
                }
            }
            WorkWire::Refused { seq, .. } => {
                if self.pending_sends.get(&seq) == Some(&peer) {
                    self.pending_sends.remove(&seq);
                }
            }
            WorkWire::Flow {
                queue,
                cid,
                prefetch,
                visibility_ms,
                max_attempts,
            } => {
                topic(queue)?;
                let options = ConsumerOptions {
                    prefetch,
                    visibility_timeout: Duration::from_millis(visibility_ms),
                    max_attempts,
                };
                let _ = self.queues.set_consumer(queue, (peer, cid), options);
            }
            WorkWire::Deliver {
                cid, epoch, msgs, ..
            } => {
                let mut batch = Vec::with_capacity(msgs.len());
                for m in msgs {
                    let publisher = match m.origin {
                        Some(raw) => wire::node_id(raw)?,
                        None => peer,
                    };
                    let _ = headers_from_wire(body, &m.headers);
                    let _ = slice(body, m.payload.0);
                    let _ = (publisher, m.seq, m.attempt, m.dead);
                    batch.push((peer, epoch, m.tag));
                }
                let back = match self.consumers.get_mut(&cid) {
                    Some(c) if c.inbox.len() + batch.len() > inbox_limit(c.prefetch) => batch,
                    Some(c) => {
                        c.inbox.extend(batch);
                        Vec::new()
                    }
                    None => batch,
                };
                // Given back at once, as the runtime does.
                for (host, epoch, tag) in back {
                    let _ = host;
                    wire::encode(
                        &mut self.out,
                        &Frame::Work(WorkWire::Release { cid, epoch, tag }),
                    );
                }
            }
            WorkWire::Acks { cid, tags, .. } => {
                for tag in tags {
                    self.queues.ack(tag, &(peer, cid));
                }
            }
            WorkWire::Nack {
                cid, tag, delay_ms, ..
            } => {
                let delay = (delay_ms > 0).then(|| Duration::from_millis(delay_ms));
                self.queues.nack(now, tag, &(peer, cid), delay);
            }
            WorkWire::Release { cid, tag, .. } => {
                self.queues.release(now, tag, &(peer, cid));
            }
            WorkWire::Reject {
                cid, tag, reason, ..
            } => {
                self.queues.reject(now, tag, &(peer, cid), reason);
            }
            WorkWire::Extend { cid, tag, ms, .. } => {
                self.queues
                    .extend(now, tag, &(peer, cid), Duration::from_millis(ms));
            }
            WorkWire::Peek { queue, limit, .. } => {
                let msgs = self.queues.peek(queue, (limit as usize).min(MAX_PEEK));
                let _ = msgs.len();
            }
            WorkWire::Peeked { msgs, .. } => {
                for m in msgs.iter().take(MAX_PEEK) {
                    wire::node_id(m.origin)?;
                    let _ = headers_from_wire(body, &m.headers);
                    let _ = slice(body, m.payload.0);
                }
            }
            WorkWire::Replay { req, queue } => {
                let moved = self.queues.replay_dead_letters(now, queue) as u64;
                wire::encode(
                    &mut self.out,
                    &Frame::Work(WorkWire::Replayed { req, moved }),
                );
            }
            WorkWire::Replayed { .. } => {}
            WorkWire::Request {
                subject,
                headers,
                payload,
                ..
            } => {
                topic(subject)?;
                let _ = headers_from_wire(body, &headers);
                let _ = slice(body, payload.0);
            }
            WorkWire::Reply { payload, .. } => {
                let _ = slice(body, payload.0);
            }
        }
        Ok(())
    }

    /// Mirrors `runtime::NodeTask::handle_stream`.
    fn handle_stream(
        &mut self,
        peer: NodeId,
        body: &Bytes,
        s: StreamWire<'_>,
    ) -> Result<(), WireError> {
        let now = self.now;
        let topic = |t: &str| {
            Topic::new(t)
                .map(|_| ())
                .map_err(|e| WireError::BadTopic(e.to_string()))
        };
        match s {
            StreamWire::Append {
                stream, records, ..
            } => {
                topic(stream)?;
                let records: Vec<NewRecord> = records
                    .iter()
                    .map(|r| NewRecord {
                        key: slice(body, r.key.0),
                        timestamp_ms: r.ts_ms,
                        headers: headers_from_wire(body, &r.headers),
                        payload: slice(body, r.payload.0),
                    })
                    .collect();
                let _ = self.streams.append(now, stream, records);
            }
            StreamWire::Watch { stream, .. } => topic(stream)?,
            StreamWire::Read {
                rid,
                stream,
                index,
                from,
                credit,
                ..
            } => {
                topic(stream)?;
                let start = start_from_wire(&from);
                if let Start::Committed { group, .. } = &start {
                    if group.len() > core_stream::MAX_GROUP_LEN {
                        return Err(WireError::BadTopic("group name too long".into()));
                    }
                }
                let _ = self.streams.open(peer, rid, stream, index, &start, credit);
            }
            StreamWire::Records { records, .. } => {
                let records: Vec<core_stream::Record> = records
                    .iter()
                    .map(|r| core_stream::Record {
                        offset: r.offset,
                        key: slice(body, r.key.0),
                        timestamp_ms: r.ts_ms,
                        headers: headers_from_wire(body, &r.headers),
                        payload: slice(body, r.payload.0),
                    })
                    .collect();
                let _ = records;
            }
            StreamWire::Credit { rid, n } => self.streams.credit(&peer, rid, n),
            StreamWire::Stop { rid } => self.streams.close(&peer, rid),
            StreamWire::Commit {
                epoch,
                stream,
                group,
                index,
                offset,
            } => {
                if epoch == EPOCH {
                    self.streams.commit(stream, group, index, offset);
                }
            }
            StreamWire::Info { req, stream } => {
                let parts = self.streams.partitions(stream);
                let parts = parts
                    .iter()
                    .map(|p| PartWire {
                        index: p.index,
                        first: p.first,
                        next: p.next,
                        bytes: p.bytes,
                        committed: p
                            .committed
                            .iter()
                            .take(16)
                            .map(|(g, o)| (&**g, *o))
                            .collect(),
                    })
                    .collect();
                wire::encode(
                    &mut self.out,
                    &Frame::Stream(StreamWire::InfoReply {
                        req,
                        epoch: EPOCH,
                        parts,
                    }),
                );
            }
            StreamWire::InfoReply { parts, .. } => {
                let parts: Vec<core_stream::PartitionState> = parts
                    .iter()
                    .filter(|p| p.first <= p.next)
                    .take(core_stream::MAX_PARTITIONS as usize)
                    .map(|p| core_stream::PartitionState {
                        index: p.index,
                        first: p.first,
                        next: p.next,
                        bytes: p.bytes,
                        committed: p
                            .committed
                            .iter()
                            .map(|(g, o)| (std::sync::Arc::from(*g), *o))
                            .collect(),
                    })
                    .collect();
                let _ = parts;
            }
            StreamWire::Parts { partitions, .. } => {
                let _ = partitions.min(core_stream::MAX_PARTITIONS);
            }
            // The consumer's bookkeeping of its own appends and reads.
            StreamWire::Appended { .. }
            | StreamWire::AppendRefused { .. }
            | StreamWire::WatchRefused { .. }
            | StreamWire::Unwatch { .. }
            | StreamWire::ReadStarted { .. }
            | StreamWire::ReadRefused { .. } => {}
        }
        Ok(())
    }

    fn run_timers(&mut self) {
        let now = self.now;
        if self.queues.poll_timeout().is_some_and(|t| t <= now) {
            self.queues.handle_timeout(now);
        }
        if self.streams.poll_timeout().is_some_and(|t| t <= now) {
            self.streams.handle_timeout(now);
        }
        if self.membership.poll_timeout().is_some_and(|t| t <= now) {
            self.membership.handle_timeout(now, &mut self.rng);
        }
        if self.gossip.poll_timeout().is_some_and(|t| t <= now) {
            self.gossip.handle_timeout(now, &mut self.rng);
        }
    }

    /// Takes every output of the cores, encoding what would be sent.
    fn drain(&mut self) {
        let now = self.now;
        while let Some(d) = self.queues.poll_dispatch(now) {
            // The consumer acks at once (a live consumer).
            if d.tag % 3 == 0 {
                self.queues.ack(d.tag, &d.consumer);
            }
        }
        while let Some(b) = self.streams.poll_dispatch() {
            let _ = b;
        }
        while let Some(t) = self.membership.poll_transmit() {
            wire::encode_member(&mut self.out, &t.message);
        }
        while self.membership.poll_event().is_some() {}
        while let Some(t) = self.gossip.poll_transmit() {
            self.codec.encode(&mut self.out, &t.message);
        }
        while self.gossip.poll_event().is_some() {}
        // A local consumer takes its inbox and acks it.
        for (cid, c) in &mut self.consumers {
            let tags: Vec<u64> = c.inbox.drain(..).map(|(_, _, tag)| tag).collect();
            if !tags.is_empty() {
                wire::encode(
                    &mut self.out,
                    &Frame::Work(WorkWire::Acks {
                        cid: *cid,
                        epoch: 0,
                        tags,
                    }),
                );
            }
        }
        let _ = self.subs.matching("orders.eu");
        let _ = self.interest.interested("orders.eu.created");
        self.out.clear();
    }

    fn finish(&mut self) {
        // Everything still held ends: links go down, timers run out.
        let peers: Vec<NodeId> = self.links.keys().copied().collect();
        for p in peers {
            self.link_down(p);
        }
        self.now = self
            .now
            .checked_add(Duration::from_secs(3600))
            .unwrap_or(self.now);
        self.run_timers();
        self.drain();
        let _ = self.local;
    }
}
