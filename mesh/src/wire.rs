//! The frames two nodes exchange on a link.
//!
//! Each frame is a postcard-encoded [`Frame`] behind a u32 length prefix
//! (see `mesh_transports::frame`). The first frame each side sends is
//! [`Frame::Hello`] with the protocol version. Bytes from a peer are parsed
//! into typed values here, at the edge, or rejected with a [`WireError`]; a
//! link that sends a bad frame is closed.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::core::{
    interest::{Declaration, Version},
    membership::{self, MemberState},
    topic::Pattern,
    NodeId,
};

/// The protocol version spoken by this build.
pub const PROTOCOL_VERSION: u32 = 8;

/// [`Hello::features`] bit: the sender can move the link's data to
/// shared-memory rings (see [`Frame::ShmOffer`]).
pub const FEATURE_SHM: u64 = 1;

/// Magic number opening every handshake, so a stray stream is told apart
/// from a mesh peer at once.
pub const MAGIC: u32 = 0x4d45_5348; // "MESH"

/// Bytes borrowed from the frame, encoded as a postcard byte string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Raw<'a>(pub &'a [u8]);

impl Serialize for Raw<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Raw<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'de [u8]>::deserialize(d).map(Raw)
    }
}

/// A frame on a link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame<'a> {
    /// First frame of each side of a link.
    Hello(Hello<'a>),
    /// A membership (failure detection) message.
    #[serde(borrow)]
    Member(MemberWire<'a>),
    /// A node's full set of subscription patterns.
    Declare(DeclWire<'a>),
    /// Everything the sender knows of the mesh, sent once after `Hello`.
    Sync(SyncWire<'a>),
    /// Binds a link-local topic id to a topic name, before its first use.
    Topic {
        /// The id, unique per link direction.
        id: u32,
        /// The topic.
        name: &'a str,
    },
    /// A published message.
    Msg(MsgWire<'a>),
    /// The sender is shutting down; nothing follows but `ByeAck`.
    Bye,
    /// Answers `Bye`: everything sent before it has been read.
    ByeAck,
    /// Control only, from the peer with the larger id (which never opens
    /// data streams): "I have a connection to you but no data stream;
    /// open a fresh one". Sent by a restarted node, or after its link
    /// ended while the connection stayed.
    Relink,
    /// The next `Msg` on this link is reliable message `rseq` of the
    /// sender's `session` to the receiver (numbered per receiver).
    Seq {
        /// The sender's reliable session (its start time).
        session: u64,
        /// Number of the message, from 1, per receiver.
        rseq: u64,
        /// The receiver's epoch (start time) this numbering is for: a
        /// numbering begun for an earlier run of the receiver (whose
        /// declaration the sender still held) is not the current run's.
        to: u64,
    },
    /// Asks the sender of reliable messages to send again everything of
    /// `session` from `next` on (after a gap, or when a link comes up).
    Resume {
        /// The session the receiver knows (0: none).
        session: u64,
        /// The first message the receiver has not got.
        next: u64,
    },
    /// Gossip mode (HyParView and Plumtree, see
    /// [`crate::core::gossip`]).
    #[serde(borrow)]
    Gossip(GossipWire<'a>),
    /// Answers `Resume`: messages before `next` left the retransmit
    /// window; `missed` of them never reached the receiver.
    Lagged {
        /// The sender's session.
        session: u64,
        /// How many are gone.
        missed: u64,
        /// The first message that follows.
        next: u64,
        /// The receiver's epoch the numbering is for (as in `Seq`).
        to: u64,
    },
    /// From the peer with the smaller id, when both share a host and user
    /// (see [`Hello::host`]): "I made two rings; open them".
    ShmOffer {
        /// Both ring files carry it, so only the ring offered is opened.
        nonce: u64,
        /// The ring the sender writes and the receiver reads.
        to_you: &'a str,
        /// The ring the receiver writes and the sender reads.
        from_you: &'a str,
    },
    /// Answers `ShmOffer` when the rings cannot be used: the link stays on
    /// the network.
    ShmRefuse {
        /// Why, for the offerer's log.
        reason: &'a str,
    },
    /// The last frame the sender writes on the network stream: everything
    /// after it comes on the shared-memory ring. Sent first by the side
    /// that opened the rings, then in answer by the offerer.
    ShmSwitch,
    /// Work queues and request/reply.
    #[serde(borrow)]
    Work(WorkWire<'a>),
    /// Streams.
    #[serde(borrow)]
    Stream(StreamWire<'a>),
    /// The second frame of each side of a link, after the peer's `Hello`:
    /// proofs that the sender holds the private mesh's secret(s), bound to
    /// both peer ids and both `Hello` nonces (see [`crate::security`]).
    /// Empty when the sender has no secret.
    Auth {
        /// One HMAC-SHA256 per secret the sender holds (at most
        /// [`crate::security::MAX_SECRETS`] are looked at).
        proofs: Vec<[u8; 32]>,
    },
}

/// Whether an encoded frame body is [`Frame::ShmSwitch`] (checked by the
/// link reader on every frame, so without decoding).
pub fn is_shm_switch(body: &[u8]) -> bool {
    body == [SHM_SWITCH_TAG]
}

/// `ShmSwitch`'s postcard variant index (checked in the tests).
const SHM_SWITCH_TAG: u8 = 15;

/// Whether an encoded frame body is a [`Frame::Gossip`] (so that link
/// readers decode only those to check their signatures).
pub fn is_gossip(body: &[u8]) -> bool {
    body.first() == Some(&GOSSIP_TAG)
}

/// `Gossip`'s postcard variant index (checked in the tests).
const GOSSIP_TAG: u8 = 11;

/// Headers on the wire.
pub type HeadersWire<'a> = Vec<(&'a str, Raw<'a>)>;

/// Headers one message may carry: more is a typed error when sending, and a
/// malformed frame (closing the link) when received.
pub const MAX_HEADERS: usize = 128;

/// Headers one frame may carry in all. Senders cut batches at 256 KiB
/// counting at least 10 bytes per header, so theirs stay under about
/// 26,000; the cap bounds what a hostile frame of empty headers (2 bytes
/// each) decodes to at about 3 MB, where it was about 180 MB.
pub const MAX_FRAME_HEADERS: usize = 32 * 1024;

thread_local! {
    /// Headers the frame being decoded on this thread may still carry
    /// (set by [`decode`]; unlimited outside it).
    static HEADER_BUDGET: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
    /// Why the header limits refused the frame being decoded (postcard's
    /// errors do not carry a custom message).
    static HEADER_REFUSAL: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// Too many headers.
const PER_MESSAGE: &str = "more headers on one message than the limit (wire::MAX_HEADERS)";
const PER_FRAME: &str = "more headers in one frame than the limit (wire::MAX_FRAME_HEADERS)";

/// Deserializes headers, refusing more than [`MAX_HEADERS`] per message or
/// [`MAX_FRAME_HEADERS`] per frame before allocating for them.
fn de_headers<'de, D: Deserializer<'de>>(d: D) -> Result<HeadersWire<'de>, D::Error> {
    struct Headers;
    impl<'de> serde::de::Visitor<'de> for Headers {
        type Value = HeadersWire<'de>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "at most {MAX_HEADERS} headers")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            use serde::de::Error;
            let refuse = |why: &'static str| {
                HEADER_REFUSAL.set(Some(why));
                A::Error::custom(why)
            };
            let n = seq.size_hint().unwrap_or(0);
            if n > MAX_HEADERS {
                return Err(refuse(PER_MESSAGE));
            }
            let left = HEADER_BUDGET.get();
            if n > left {
                return Err(refuse(PER_FRAME));
            }
            HEADER_BUDGET.set(left - n);
            let mut headers = Vec::with_capacity(n);
            while let Some(h) = seq.next_element()? {
                if headers.len() == MAX_HEADERS {
                    return Err(refuse(PER_MESSAGE));
                }
                headers.push(h);
            }
            Ok(headers)
        }
    }
    d.deserialize_seq(Headers)
}

/// Checks a message's header count before sending: `Err(count)` if over
/// [`MAX_HEADERS`].
pub(crate) fn check_header_count(headers: &[(String, bytes::Bytes)]) -> Result<(), usize> {
    if headers.len() > MAX_HEADERS {
        Err(headers.len())
    } else {
        Ok(())
    }
}

/// Work queues (see [`crate::core::queue`]) and request/reply. `cid` is a
/// consumer's number on its node; `tag` the host's handle of a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkWire<'a> {
    /// A message for a queue the receiver hosts; answered by `Accepted` or
    /// `Refused`.
    Send {
        /// The queue.
        queue: &'a str,
        /// The sender's sequence number (the message id with its id).
        seq: u64,
        /// Not delivered for this long (ms, 0: at once).
        delay_ms: u64,
        /// Dead-lettered if not acked within this (ms, 0: never).
        ttl_ms: u64,
        /// Repeats within the host's dedup window are dropped.
        dedup: Option<&'a str>,
        /// Headers.
        #[serde(borrow, deserialize_with = "de_headers")]
        headers: HeadersWire<'a>,
        /// Payload.
        payload: Raw<'a>,
    },
    /// These sends are the host's now.
    Accepted {
        /// Their sequence numbers.
        seqs: Vec<u64>,
    },
    /// A send the host did not take.
    Refused {
        /// Its sequence number.
        seq: u64,
        /// The queue was full (try again later); otherwise final.
        full: bool,
        /// Why, for the sender.
        reason: &'a str,
    },
    /// A consumer grants credit on a queue of the receiver (prefetch 0:
    /// no more).
    Flow {
        /// The queue.
        queue: &'a str,
        /// The consumer.
        cid: u32,
        /// Most messages in flight to it.
        prefetch: u32,
        /// Visibility timeout, ms.
        visibility_ms: u64,
        /// Deliveries before dead-lettering.
        max_attempts: u32,
    },
    /// Messages for a consumer of the receiver, in order.
    Deliver {
        /// The queue.
        queue: &'a str,
        /// The consumer.
        cid: u32,
        /// The host's run these tags belong to: settles carry it back, so
        /// a tag from before a host restart settles nothing of the new run.
        epoch: u64,
        /// The messages.
        #[serde(borrow)]
        msgs: Vec<DeliverWire<'a>>,
    },
    /// Done with these messages.
    Acks {
        /// The consumer.
        cid: u32,
        /// The host's run the tags are of (from `Deliver`).
        epoch: u64,
        /// Their tags.
        tags: Vec<u64>,
    },
    /// Give it back, to be delivered again after `delay_ms`.
    Nack {
        /// The consumer.
        cid: u32,
        /// The host's run the tags are of (from `Deliver`).
        epoch: u64,
        /// The message.
        tag: u64,
        /// Delay before redelivery, ms.
        delay_ms: u64,
    },
    /// Given back unseen (the consumer stopped before its application
    /// took it): back at once, and not counted as an attempt.
    Release {
        /// The consumer.
        cid: u32,
        /// The host's run the tags are of (from `Deliver`).
        epoch: u64,
        /// The message.
        tag: u64,
    },
    /// Straight to the dead-letter queue.
    Reject {
        /// The consumer.
        cid: u32,
        /// The host's run the tags are of (from `Deliver`).
        epoch: u64,
        /// The message.
        tag: u64,
        /// Why.
        reason: &'a str,
    },
    /// Restart the visibility timeout at `ms` from now.
    Extend {
        /// The consumer.
        cid: u32,
        /// The host's run the tags are of (from `Deliver`).
        epoch: u64,
        /// The message.
        tag: u64,
        /// The new timeout, ms.
        ms: u64,
    },
    /// Asks for up to `limit` messages of a queue, not taking them.
    Peek {
        /// Request number.
        req: u64,
        /// The queue.
        queue: &'a str,
        /// How many at most.
        limit: u32,
    },
    /// Answers `Peek`.
    Peeked {
        /// Request number.
        req: u64,
        /// The messages.
        #[serde(borrow)]
        msgs: Vec<PeekedWire<'a>>,
    },
    /// Moves a queue's dead letters back into it.
    Replay {
        /// Request number.
        req: u64,
        /// The queue (not its `.dlq`).
        queue: &'a str,
    },
    /// Answers `Replay`.
    Replayed {
        /// Request number.
        req: u64,
        /// How many moved.
        moved: u64,
    },
    /// A request for a responder of the receiver.
    Request {
        /// The requester's number for it.
        id: u64,
        /// The subject.
        subject: &'a str,
        /// Headers.
        #[serde(borrow, deserialize_with = "de_headers")]
        headers: HeadersWire<'a>,
        /// Payload.
        payload: Raw<'a>,
    },
    /// Answers `Request`.
    Reply {
        /// The request's number.
        id: u64,
        /// Whether a responder answered.
        status: ReplyStatus,
        /// Payload.
        payload: Raw<'a>,
    },
}

/// Streams (see [`crate::core::stream`]). `sid` is a consumer's number
/// on its node, `rid` one of its reads (one partition of one host).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StreamWire<'a> {
    /// Records for a stream the receiver hosts; answered by `Appended` or
    /// `AppendRefused`.
    Append {
        /// The stream.
        stream: &'a str,
        /// The appender's number of this append.
        seq: u64,
        /// The records.
        #[serde(borrow)]
        records: Vec<AppendWire<'a>>,
    },
    /// The append is stored: each record's partition and offset, in order.
    Appended {
        /// The append.
        seq: u64,
        /// The host's run (partitions restart when it changes).
        epoch: u64,
        /// Partition and offset per record.
        placed: Vec<(u32, u64)>,
    },
    /// An append the host did not take.
    AppendRefused {
        /// The append.
        seq: u64,
        /// The host is full (try again later); otherwise final.
        full: bool,
        /// Why.
        reason: &'a str,
    },
    /// A consumer wants to know the receiver's partitions of a stream, now
    /// and when the stream appears (answered by `Parts`).
    Watch {
        /// The consumer.
        sid: u64,
        /// The stream.
        stream: &'a str,
    },
    /// The host takes no more watches from the sender (its quota is
    /// used): try again later.
    WatchRefused {
        /// The consumer.
        sid: u64,
    },
    /// No more `Parts` (and no reads) for this consumer.
    Unwatch {
        /// The consumer.
        sid: u64,
    },
    /// The sender's partitions of a stream the consumer watches.
    Parts {
        /// The consumer.
        sid: u64,
        /// The host's run.
        epoch: u64,
        /// How many partitions (0: it has no such stream yet).
        partitions: u32,
    },
    /// Start (or restart) read `rid` of partition `index`.
    Read {
        /// The consumer.
        sid: u64,
        /// The read.
        rid: u64,
        /// The stream.
        stream: &'a str,
        /// The partition.
        index: u32,
        /// Where to start.
        from: StartWire<'a>,
        /// Records the host may send before more credit.
        credit: u32,
    },
    /// The read started at this offset (sent before its first records).
    ReadStarted {
        /// The read.
        rid: u64,
        /// The first offset it will be sent.
        at: u64,
    },
    /// The read could not start.
    ReadRefused {
        /// The read.
        rid: u64,
        /// Why.
        reason: &'a str,
    },
    /// Records of a read, in offset order.
    Records {
        /// The read.
        rid: u64,
        /// The read's cursor had fallen behind retention: what it wanted,
        /// and the first offset kept (where these records start).
        gone: Option<(u64, u64)>,
        /// The records.
        #[serde(borrow)]
        records: Vec<RecordWire<'a>>,
    },
    /// The consumer took this many more records of the read.
    Credit {
        /// The read.
        rid: u64,
        /// How many.
        n: u32,
    },
    /// Stop read `rid`.
    Stop {
        /// The read.
        rid: u64,
    },
    /// A group processed everything of a partition before `offset`.
    Commit {
        /// The host's run the records were of (a commit for another run
        /// is ignored: its offsets number another log).
        epoch: u64,
        /// The stream.
        stream: &'a str,
        /// The group.
        group: &'a str,
        /// The partition.
        index: u32,
        /// The next offset the group will read.
        offset: u64,
    },
    /// Asks for the receiver's partitions of a stream, with offsets.
    Info {
        /// The request.
        req: u64,
        /// The stream.
        stream: &'a str,
    },
    /// Answers `Info`.
    InfoReply {
        /// The request.
        req: u64,
        /// The host's run.
        epoch: u64,
        /// The partitions.
        #[serde(borrow)]
        parts: Vec<PartWire<'a>>,
    },
}

/// A record of an `Append`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppendWire<'a> {
    /// Key (empty: none).
    #[serde(borrow)]
    pub key: Raw<'a>,
    /// Event time, ms since the Unix epoch.
    pub ts_ms: u64,
    /// Headers.
    #[serde(borrow, deserialize_with = "de_headers")]
    pub headers: HeadersWire<'a>,
    /// Payload.
    pub payload: Raw<'a>,
}

/// A record of a `Records` frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordWire<'a> {
    /// Offset in its partition.
    pub offset: u64,
    /// Key (empty: none).
    #[serde(borrow)]
    pub key: Raw<'a>,
    /// Event time, ms since the Unix epoch.
    pub ts_ms: u64,
    /// Headers.
    #[serde(borrow, deserialize_with = "de_headers")]
    pub headers: HeadersWire<'a>,
    /// Payload.
    pub payload: Raw<'a>,
}

/// Where a read starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartWire<'a> {
    /// The oldest record kept.
    Earliest,
    /// The next record appended.
    Latest,
    /// An offset.
    Offset(u64),
    /// A time, ms since the Unix epoch.
    Time(u64),
    /// A group's committed offset (else the start, or the end if `latest`).
    Committed {
        /// The group.
        group: &'a str,
        /// With no commit: the end.
        latest: bool,
    },
}

/// A partition in an `InfoReply`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartWire<'a> {
    /// Its number on the host.
    pub index: u32,
    /// Oldest offset kept.
    pub first: u64,
    /// Next offset.
    pub next: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Committed offsets per group.
    #[serde(borrow)]
    pub committed: Vec<(&'a str, u64)>,
}

/// How a request ended at the responder's node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplyStatus {
    /// Answered.
    Ok,
    /// No responder for the subject there (any more).
    NoResponders,
    /// The responder dropped the request without answering.
    Dropped,
    /// The responder's node does not let the requester send to the
    /// subject (its access policy).
    Denied,
}

/// A message in a `Deliver` frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliverWire<'a> {
    /// The host's handle of it.
    pub tag: u64,
    /// 1 on the first delivery.
    pub attempt: u32,
    /// Who sent it (`None`: the host itself).
    #[serde(borrow)]
    pub origin: Option<Raw<'a>>,
    /// The sender's sequence number.
    pub seq: u64,
    /// Dead letters: deliveries before it died, and why.
    pub dead: Option<(u32, &'a str)>,
    /// Headers.
    #[serde(borrow, deserialize_with = "de_headers")]
    pub headers: HeadersWire<'a>,
    /// Payload.
    pub payload: Raw<'a>,
}

/// A message in a `Peeked` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeekedWire<'a> {
    /// Who sent it.
    #[serde(borrow)]
    pub origin: Raw<'a>,
    /// The sender's sequence number.
    pub seq: u64,
    /// Deliveries so far.
    pub attempts: u32,
    /// In flight now.
    pub in_flight: bool,
    /// Dead letters: deliveries before it died, and why.
    pub dead: Option<(u32, &'a str)>,
    /// Headers.
    #[serde(borrow, deserialize_with = "de_headers")]
    pub headers: HeadersWire<'a>,
    /// Payload.
    pub payload: Raw<'a>,
}

/// Gossip-mode messages on the wire: [`crate::core::gossip::Message`] with
/// raw peer ids, announcements grouped by origin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GossipWire<'a> {
    /// See [`crate::core::gossip::Message::Join`].
    Join,
    /// A join's random walk.
    ForwardJoin {
        /// The joining node.
        #[serde(borrow)]
        node: Raw<'a>,
        /// Steps left.
        ttl: u8,
    },
    /// Asks to become a neighbour.
    Neighbor {
        /// Accept always.
        high: bool,
    },
    /// Answers `Neighbor`.
    NeighborReply {
        /// Accepted.
        accept: bool,
    },
    /// Dropped from the active view.
    Disconnect,
    /// A shuffle walk.
    Shuffle {
        /// Who started it.
        #[serde(borrow)]
        origin: Raw<'a>,
        /// Steps left.
        ttl: u8,
        /// A sample of the origin's views.
        #[serde(borrow)]
        nodes: Vec<Raw<'a>>,
    },
    /// Answers a shuffle.
    ShuffleReply {
        /// A sample of the passive view.
        #[serde(borrow)]
        nodes: Vec<Raw<'a>>,
    },
    /// A broadcast message.
    Msg {
        /// Its origin.
        #[serde(borrow)]
        origin: Raw<'a>,
        /// The origin's sequence number.
        seq: u64,
        /// Hops so far.
        round: u32,
        /// Publish time at the origin, µs since the Unix epoch.
        timestamp: u64,
        /// Topic.
        topic: &'a str,
        /// Payload.
        #[serde(borrow)]
        payload: Raw<'a>,
        /// The origin's Ed25519 signature over origin, seq, timestamp,
        /// topic and payload (relays cannot forge or alter the message).
        #[serde(borrow)]
        signature: Raw<'a>,
    },
    /// Ids the sender has, per origin: (seq, round).
    IHave {
        /// Groups.
        #[serde(borrow)]
        groups: Vec<(Raw<'a>, Vec<(u64, u32)>)>,
    },
    /// Messages wanted, per origin.
    Graft {
        /// Groups.
        #[serde(borrow)]
        groups: Vec<(Raw<'a>, Vec<u64>)>,
    },
    /// Makes the link lazy.
    Prune,
}

/// Most node ids in one shuffle.
pub const MAX_GOSSIP_NODES: usize = 64;

/// Encodes and decodes gossip frames. It remembers the last origin id and
/// topic in each direction: a stream of broadcasts from one origin then
/// costs no id parsing, serialising or topic allocation per message.
#[derive(Debug, Default)]
pub struct GossipCodec {
    origin_in: Option<(Vec<u8>, NodeId)>,
    topic_in: Option<std::sync::Arc<str>>,
    origin_out: Option<(NodeId, Vec<u8>)>,
}

impl GossipCodec {
    fn origin_bytes(&mut self, origin: NodeId) -> &[u8] {
        if self.origin_out.as_ref().is_none_or(|(o, _)| *o != origin) {
            self.origin_out = Some((origin, origin.to_bytes()));
        }
        &self.origin_out.as_ref().expect("set above").1
    }

    fn origin(&mut self, raw: Raw<'_>) -> Result<NodeId, WireError> {
        match &self.origin_in {
            Some((bytes, id)) if bytes.as_slice() == raw.0 => Ok(*id),
            _ => {
                let id = node_id(raw)?;
                self.origin_in = Some((raw.0.to_vec(), id));
                Ok(id)
            }
        }
    }

    fn topic(&mut self, topic: &str) -> Result<std::sync::Arc<str>, WireError> {
        match &self.topic_in {
            Some(t) if &**t == topic => Ok(t.clone()),
            _ => {
                crate::core::topic::Topic::new(topic)
                    .map_err(|e| WireError::BadTopic(e.to_string()))?;
                let t: std::sync::Arc<str> = std::sync::Arc::from(topic);
                self.topic_in = Some(t.clone());
                Ok(t)
            }
        }
    }

    /// Encodes a gossip message as a frame into `buf` (a broadcast
    /// message's `stamp` is its publish timestamp).
    pub fn encode(&mut self, buf: &mut Vec<u8>, msg: &crate::core::gossip::Message) {
        use crate::core::gossip::Message as M;
        let ids = |nodes: &[NodeId]| nodes.iter().map(|n| n.to_bytes()).collect::<Vec<_>>();
        match msg {
            M::Join => encode(buf, &Frame::Gossip(GossipWire::Join)),
            M::ForwardJoin { node, ttl } => {
                let id = node.to_bytes();
                encode(
                    buf,
                    &Frame::Gossip(GossipWire::ForwardJoin {
                        node: Raw(&id),
                        ttl: *ttl,
                    }),
                );
            }
            M::Neighbor { high } => {
                encode(buf, &Frame::Gossip(GossipWire::Neighbor { high: *high }))
            }
            M::NeighborReply { accept } => encode(
                buf,
                &Frame::Gossip(GossipWire::NeighborReply { accept: *accept }),
            ),
            M::Disconnect => encode(buf, &Frame::Gossip(GossipWire::Disconnect)),
            M::Shuffle { origin, ttl, nodes } => {
                let o = origin.to_bytes();
                let ns = ids(nodes);
                encode(
                    buf,
                    &Frame::Gossip(GossipWire::Shuffle {
                        origin: Raw(&o),
                        ttl: *ttl,
                        nodes: ns.iter().map(|n| Raw(n)).collect(),
                    }),
                );
            }
            M::ShuffleReply { nodes } => {
                let ns = ids(nodes);
                encode(
                    buf,
                    &Frame::Gossip(GossipWire::ShuffleReply {
                        nodes: ns.iter().map(|n| Raw(n)).collect(),
                    }),
                );
            }
            M::Gossip {
                id,
                round,
                topic,
                payload,
                stamp,
            } => {
                let o = self.origin_bytes(id.0);
                encode(
                    buf,
                    &Frame::Gossip(GossipWire::Msg {
                        origin: Raw(o),
                        seq: id.1,
                        round: *round,
                        timestamp: stamp.timestamp,
                        topic,
                        payload: Raw(payload),
                        signature: Raw(&stamp.signature),
                    }),
                );
            }
            M::IHave { groups } => {
                let ids: Vec<Vec<u8>> = groups.iter().map(|(o, _)| o.to_bytes()).collect();
                encode(
                    buf,
                    &Frame::Gossip(GossipWire::IHave {
                        groups: groups
                            .iter()
                            .zip(&ids)
                            .map(|((_, list), o)| (Raw(o), list.clone()))
                            .collect(),
                    }),
                );
            }
            M::Graft { ids } => {
                let mut groups: Vec<(Vec<u8>, Vec<u64>)> = Vec::new();
                let mut last: Option<NodeId> = None;
                for (origin, seq) in ids {
                    if last != Some(*origin) {
                        groups.push((origin.to_bytes(), Vec::new()));
                        last = Some(*origin);
                    }
                    groups.last_mut().expect("pushed").1.push(*seq);
                }
                encode(
                    buf,
                    &Frame::Gossip(GossipWire::Graft {
                        groups: groups.iter().map(|(o, v)| (Raw(o), v.clone())).collect(),
                    }),
                );
            }
            M::Prune => encode(buf, &Frame::Gossip(GossipWire::Prune)),
        }
    }

    /// Converts a received gossip message to the core's form (`frame` is the
    /// frame's bytes, for zero-copy payloads).
    pub fn decode(
        &mut self,
        frame: &bytes::Bytes,
        g: &GossipWire<'_>,
    ) -> Result<crate::core::gossip::Message, WireError> {
        use crate::core::gossip::Message as M;
        let nodes = |list: &[Raw<'_>]| {
            if list.len() > MAX_GOSSIP_NODES {
                return Err(WireError::Unexpected("oversized gossip node list"));
            }
            list.iter()
                .map(|r| node_id(*r))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(match g {
            GossipWire::Join => M::Join,
            GossipWire::ForwardJoin { node, ttl } => M::ForwardJoin {
                node: node_id(*node)?,
                ttl: *ttl,
            },
            GossipWire::Neighbor { high } => M::Neighbor { high: *high },
            GossipWire::NeighborReply { accept } => M::NeighborReply { accept: *accept },
            GossipWire::Disconnect => M::Disconnect,
            GossipWire::Shuffle {
                origin,
                ttl,
                nodes: n,
            } => M::Shuffle {
                origin: node_id(*origin)?,
                ttl: *ttl,
                nodes: nodes(n)?,
            },
            GossipWire::ShuffleReply { nodes: n } => M::ShuffleReply { nodes: nodes(n)? },
            GossipWire::Msg {
                origin,
                seq,
                round,
                timestamp,
                topic,
                payload,
                signature,
            } => M::Gossip {
                id: (self.origin(*origin)?, *seq),
                round: *round,
                topic: self.topic(topic)?,
                payload: if payload.0.is_empty() {
                    bytes::Bytes::new()
                } else {
                    frame.slice_ref(payload.0)
                },
                stamp: crate::core::gossip::Stamp {
                    timestamp: *timestamp,
                    signature: if signature.0.is_empty() {
                        bytes::Bytes::new()
                    } else {
                        frame.slice_ref(signature.0)
                    },
                },
            },
            GossipWire::IHave { groups } => M::IHave {
                groups: groups
                    .iter()
                    .map(|(origin, list)| Ok((node_id(*origin)?, list.clone())))
                    .collect::<Result<_, WireError>>()?,
            },
            GossipWire::Graft { groups } => {
                // Each id costs ~90 bytes decoded for 1 on the wire: refuse
                // more than a node ever pulls at once before making them.
                let total = groups.iter().map(|(_, l)| l.len()).sum::<usize>();
                if total > crate::core::gossip::MAX_MISSING {
                    return Err(WireError::Unexpected("oversized Graft"));
                }
                let mut ids = Vec::with_capacity(total);
                for (origin, list) in groups {
                    let o = node_id(*origin)?;
                    ids.extend(list.iter().map(|seq| (o, *seq)));
                }
                M::Graft { ids }
            }
            GossipWire::Prune => M::Prune,
        })
    }
}

/// The handshake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello<'a> {
    /// Always [`MAGIC`].
    pub magic: u32,
    /// The sender's protocol version.
    pub version: u32,
    /// Feature bits (none defined yet).
    pub features: u64,
    /// The sender's membership incarnation.
    pub incarnation: u64,
    /// The sender's dialable addresses (multiaddr bytes).
    #[serde(borrow)]
    pub addrs: Vec<Raw<'a>>,
    /// The sender's host (boot id and network namespace): peers on the
    /// same host and user may move data to shared memory.
    pub host: Raw<'a>,
    /// The sender's user id.
    pub uid: u32,
    /// Fresh random bytes for this link: the peer's proof of the mesh
    /// secret covers them, so it cannot be replayed.
    pub nonce: [u8; 32],
}

/// A membership record on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateWire<'a> {
    /// Peer id bytes.
    #[serde(borrow)]
    pub node: Raw<'a>,
    /// Incarnation.
    pub incarnation: u64,
    /// State.
    pub state: MemberState,
    /// Multiaddr bytes.
    pub addrs: Vec<Raw<'a>>,
    /// The member's signature of an Alive record about itself; empty when
    /// unsigned.
    pub sig: Raw<'a>,
}

/// A membership message on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MemberWire<'a> {
    /// See [`membership::Message::Ping`].
    Ping {
        /// Probe sequence.
        seq: u64,
        /// Piggybacked updates.
        #[serde(borrow)]
        updates: Vec<UpdateWire<'a>>,
    },
    /// See [`membership::Message::Ack`].
    Ack {
        /// Probe sequence.
        seq: u64,
        /// Piggybacked updates.
        #[serde(borrow)]
        updates: Vec<UpdateWire<'a>>,
    },
    /// See [`membership::Message::PingReq`].
    PingReq {
        /// Probe sequence.
        seq: u64,
        /// Who to probe.
        target: Raw<'a>,
        /// Piggybacked updates.
        updates: Vec<UpdateWire<'a>>,
    },
    /// See [`membership::Message::IndirectAck`].
    IndirectAck {
        /// Probe sequence.
        seq: u64,
        /// Who answered.
        target: Raw<'a>,
        /// Piggybacked updates.
        updates: Vec<UpdateWire<'a>>,
    },
}

/// A declaration on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeclWire<'a> {
    /// Peer id bytes.
    #[serde(borrow)]
    pub node: Raw<'a>,
    /// Version epoch.
    pub epoch: u64,
    /// Version sequence.
    pub seq: u64,
    /// Patterns.
    pub patterns: Vec<&'a str>,
    /// Patterns with a reliable subscription.
    pub reliable: Vec<&'a str>,
    /// The node's Ed25519 signature of it (`security::declaration_digest`):
    /// checked by every receiver, so a relayed one cannot be forged.
    #[serde(borrow)]
    pub sig: Option<Raw<'a>>,
}

/// A snapshot of the sender's view of the mesh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncWire<'a> {
    /// Members the sender knows (including itself).
    #[serde(borrow)]
    pub members: Vec<UpdateWire<'a>>,
    /// Declarations the sender knows (including its own).
    pub decls: Vec<DeclWire<'a>>,
    /// More `Sync` frames follow (a large view is split across frames so
    /// that none nears the frame limit).
    pub more: bool,
}

/// A published message. Sequence and timestamp are deltas from the previous
/// message on the same link, so they usually take one or two bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MsgWire<'a> {
    /// Link-local topic id (see [`Frame::Topic`]), or `u32::MAX` when the
    /// name follows inline in `name`.
    pub topic: u32,
    /// The topic name when not interned.
    pub name: Option<&'a str>,
    /// Publisher sequence minus the previous one on this link.
    pub seq_delta: u64,
    /// Timestamp (µs since the Unix epoch) minus the previous one.
    pub ts_delta: i64,
    /// Headers.
    #[serde(borrow, deserialize_with = "de_headers")]
    pub headers: Vec<(&'a str, Raw<'a>)>,
    /// Payload.
    pub payload: Raw<'a>,
}

/// A frame from a peer that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not a valid postcard `Frame`.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The handshake had the wrong magic number.
    #[error("not a mesh peer (bad magic {0:#x})")]
    BadMagic(u32),
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {0} (this node speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u32),
    /// The first frame was not a handshake.
    #[error("expected a Hello frame first")]
    ExpectedHello,
    /// A peer id that does not parse.
    #[error("invalid peer id in frame")]
    BadPeerId,
    /// A pattern that does not parse.
    #[error("invalid pattern in declaration: {0}")]
    BadPattern(String),
    /// A topic that does not parse.
    #[error("invalid topic in message: {0}")]
    BadTopic(String),
    /// A topic id never defined on this link.
    #[error("unknown topic id {0}")]
    UnknownTopic(u32),
    /// The peer defined more topics than allowed per link.
    #[error("too many topics on one link (limit {0})")]
    TooManyTopics(usize),
    /// A frame sent at the wrong time (e.g. a second Hello).
    #[error("unexpected {0} frame")]
    Unexpected(&'static str),
    /// A declaration over the limits.
    #[error("{0}")]
    Declaration(#[from] crate::core::interest::DeclarationError),
}

/// Decodes one frame body (without its length prefix).
pub fn decode(body: &[u8]) -> Result<Frame<'_>, WireError> {
    HEADER_BUDGET.set(MAX_FRAME_HEADERS);
    let frame = postcard::from_bytes(body).map_err(|e| {
        WireError::Malformed(match HEADER_REFUSAL.take() {
            Some(why) => why.to_owned(),
            None => e.to_string(),
        })
    });
    HEADER_BUDGET.set(usize::MAX);
    HEADER_REFUSAL.set(None);
    frame
}

/// Appends a length-prefixed frame to `buf`.
pub fn encode(buf: &mut Vec<u8>, frame: &Frame<'_>) {
    mesh_transports::frame::encode_frame(buf, |b| {
        // Serializing into a Vec cannot fail for these types.
        let taken = std::mem::take(b);
        *b = postcard::to_extend(frame, taken).expect("postcard into Vec is infallible");
    });
}

/// Parses a peer id from frame bytes.
pub fn node_id(raw: Raw<'_>) -> Result<NodeId, WireError> {
    NodeId::from_bytes(raw.0).map_err(|_| WireError::BadPeerId)
}

/// Converts a membership record to its wire form; `buf` keeps the id bytes.
pub fn update_to_wire<'a>(u: &'a membership::Update, ids: &'a [u8]) -> UpdateWire<'a> {
    UpdateWire {
        node: Raw(ids),
        incarnation: u.incarnation,
        state: u.state,
        addrs: u.addrs.iter().map(|a| Raw(a)).collect(),
        sig: Raw(u.signature.as_deref().unwrap_or_default()),
    }
}

/// Parses a membership record.
pub fn update_from_wire(u: &UpdateWire<'_>) -> Result<membership::Update, WireError> {
    Ok(membership::Update {
        node: node_id(u.node)?,
        incarnation: u.incarnation,
        state: u.state,
        addrs: u.addrs.iter().map(|a| a.0.to_vec()).collect(),
        signature: (!u.sig.0.is_empty()).then(|| u.sig.0.into()),
    })
}

fn ids_of(updates: &[membership::Update]) -> Vec<Vec<u8>> {
    updates.iter().map(|u| u.node.to_bytes()).collect()
}

fn wire_updates<'a>(updates: &'a [membership::Update], ids: &'a [Vec<u8>]) -> Vec<UpdateWire<'a>> {
    updates
        .iter()
        .zip(ids)
        .map(|(u, id)| update_to_wire(u, id))
        .collect()
}

/// Encodes a membership message as a frame into `buf`.
pub fn encode_member(buf: &mut Vec<u8>, msg: &membership::Message) {
    use membership::Message as M;
    match msg {
        M::Ping { seq, updates } => {
            let ids = ids_of(updates);
            let updates = wire_updates(updates, &ids);
            encode(buf, &Frame::Member(MemberWire::Ping { seq: *seq, updates }));
        }
        M::Ack { seq, updates } => {
            let ids = ids_of(updates);
            let updates = wire_updates(updates, &ids);
            encode(buf, &Frame::Member(MemberWire::Ack { seq: *seq, updates }));
        }
        M::PingReq {
            seq,
            target,
            updates,
        } => {
            let ids = ids_of(updates);
            let updates = wire_updates(updates, &ids);
            let target = target.to_bytes();
            encode(
                buf,
                &Frame::Member(MemberWire::PingReq {
                    seq: *seq,
                    target: Raw(&target),
                    updates,
                }),
            );
        }
        M::IndirectAck {
            seq,
            target,
            updates,
        } => {
            let ids = ids_of(updates);
            let updates = wire_updates(updates, &ids);
            let target = target.to_bytes();
            encode(
                buf,
                &Frame::Member(MemberWire::IndirectAck {
                    seq: *seq,
                    target: Raw(&target),
                    updates,
                }),
            );
        }
    }
}

/// Parses a membership message.
pub fn member_from_wire(m: &MemberWire<'_>) -> Result<membership::Message, WireError> {
    use membership::Message as M;
    let ups = |u: &[UpdateWire<'_>]| {
        u.iter()
            .map(update_from_wire)
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match m {
        MemberWire::Ping { seq, updates } => M::Ping {
            seq: *seq,
            updates: ups(updates)?,
        },
        MemberWire::Ack { seq, updates } => M::Ack {
            seq: *seq,
            updates: ups(updates)?,
        },
        MemberWire::PingReq {
            seq,
            target,
            updates,
        } => M::PingReq {
            seq: *seq,
            target: node_id(*target)?,
            updates: ups(updates)?,
        },
        MemberWire::IndirectAck {
            seq,
            target,
            updates,
        } => M::IndirectAck {
            seq: *seq,
            target: node_id(*target)?,
            updates: ups(updates)?,
        },
    })
}

/// Parses a declaration, validating every pattern.
pub fn decl_from_wire(d: &DeclWire<'_>) -> Result<Declaration, WireError> {
    let count = d.patterns.len() + d.reliable.len();
    if count > crate::core::interest::MAX_PATTERNS_PER_NODE {
        return Err(crate::core::interest::DeclarationError::TooManyPatterns { count }.into());
    }
    let parse = |list: &[&str]| {
        list.iter()
            .map(|p| Pattern::new(p).map_err(|e| WireError::BadPattern(e.to_string())))
            .collect::<Result<Vec<_>, _>>()
    };
    let patterns = parse(&d.patterns)?;
    let reliable = parse(&d.reliable)?;
    Ok(Declaration {
        node: node_id(d.node)?,
        version: Version {
            epoch: d.epoch,
            seq: d.seq,
        },
        patterns,
        reliable,
        signature: d.sig.map(|s| std::sync::Arc::from(s.0)),
    })
}

/// Encodes a declaration as a frame into `buf`.
pub fn encode_decl(buf: &mut Vec<u8>, d: &Declaration) {
    let id = d.node.to_bytes();
    let frame = Frame::Declare(decl_to_wire(d, &id));
    encode(buf, &frame);
}

/// The wire form of a declaration; `id` holds the node id bytes.
pub fn decl_to_wire<'a>(d: &'a Declaration, id: &'a [u8]) -> DeclWire<'a> {
    DeclWire {
        node: Raw(id),
        epoch: d.version.epoch,
        seq: d.version.seq,
        patterns: d.patterns.iter().map(Pattern::as_str).collect(),
        reliable: d.reliable.iter().map(Pattern::as_str).collect(),
        sig: d.signature.as_deref().map(Raw),
    }
}

/// Encodes a sync snapshot as a frame into `buf`.
pub fn encode_sync(buf: &mut Vec<u8>, members: &[membership::Update], decls: &[Declaration]) {
    // Chunks stay far below any frame limit (members are ~100 bytes,
    // declarations at most MAX_DECLARATION_BYTES).
    const MEMBERS_PER_FRAME: usize = 1024;
    const DECL_BYTES_PER_FRAME: usize = 256 * 1024;
    let member_ids: Vec<Vec<u8>> = members.iter().map(|u| u.node.to_bytes()).collect();
    let decl_ids: Vec<Vec<u8>> = decls.iter().map(|d| d.node.to_bytes()).collect();
    let mut chunks: Vec<SyncWire<'_>> = members
        .chunks(MEMBERS_PER_FRAME)
        .zip(member_ids.chunks(MEMBERS_PER_FRAME))
        .map(|(ms, ids)| SyncWire {
            members: ms
                .iter()
                .zip(ids)
                .map(|(u, id)| update_to_wire(u, id))
                .collect(),
            decls: Vec::new(),
            more: true,
        })
        .collect();
    let mut current = SyncWire {
        members: Vec::new(),
        decls: Vec::new(),
        more: true,
    };
    let mut bytes = 0;
    for (d, id) in decls.iter().zip(&decl_ids) {
        let size = d
            .patterns
            .iter()
            .map(|p| p.as_str().len() + 2)
            .sum::<usize>()
            + 64;
        if bytes + size > DECL_BYTES_PER_FRAME && !current.decls.is_empty() {
            chunks.push(std::mem::replace(
                &mut current,
                SyncWire {
                    members: Vec::new(),
                    decls: Vec::new(),
                    more: true,
                },
            ));
            bytes = 0;
        }
        bytes += size;
        current.decls.push(decl_to_wire(d, id));
    }
    chunks.push(current);
    if let Some(last) = chunks.last_mut() {
        last.more = false;
    }
    for chunk in chunks {
        encode(buf, &Frame::Sync(chunk));
    }
}

/// The name of a frame's kind, for logs and errors.
pub(crate) fn frame_name(f: &Frame<'_>) -> &'static str {
    match f {
        Frame::Hello(_) => "Hello",
        Frame::Member(_) => "Member",
        Frame::Declare(_) => "Declare",
        Frame::Sync(_) => "Sync",
        Frame::Topic { .. } => "Topic",
        Frame::Msg(_) => "Msg",
        Frame::Bye => "Bye",
        Frame::ByeAck => "ByeAck",
        Frame::Relink => "Relink",
        Frame::Gossip(_) => "Gossip",
        Frame::Seq { .. } => "Seq",
        Frame::Resume { .. } => "Resume",
        Frame::Lagged { .. } => "Lagged",
        Frame::ShmOffer { .. } => "ShmOffer",
        Frame::ShmRefuse { .. } => "ShmRefuse",
        Frame::ShmSwitch => "ShmSwitch",
        Frame::Work(_) => "Work",
        Frame::Stream(_) => "Stream",
        Frame::Auth { .. } => "Auth",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn body(frame: &Frame<'_>) -> Vec<u8> {
        postcard::to_stdvec(frame).unwrap()
    }

    #[test]
    fn shm_switch_is_recognised_without_decoding() {
        let b = body(&Frame::ShmSwitch);
        assert!(is_shm_switch(&b), "{b:?}");
        assert!(!is_shm_switch(&body(&Frame::Bye)));
        assert!(is_gossip(&body(&Frame::Gossip(GossipWire::Prune))));
        assert!(!is_gossip(&body(&Frame::Bye)));
        assert!(!is_shm_switch(&body(&Frame::ShmRefuse { reason: "" })));
    }

    #[test]
    fn header_counts_are_limited_per_message_and_per_frame() {
        let msg = |n: usize| {
            body(&Frame::Msg(MsgWire {
                topic: 1,
                name: None,
                seq_delta: 1,
                ts_delta: 0,
                headers: vec![("k", Raw(b"v")); n],
                payload: Raw(&[]),
            }))
        };
        assert!(decode(&msg(MAX_HEADERS)).is_ok());
        let err = decode(&msg(MAX_HEADERS + 1)).unwrap_err();
        assert!(
            matches!(&err, WireError::Malformed(e) if e == PER_MESSAGE),
            "{err}"
        );
        // Many records, each within the limit, but too many in one frame.
        let append = |records: usize| {
            body(&Frame::Stream(StreamWire::Append {
                stream: "s",
                seq: 1,
                records: vec![
                    AppendWire {
                        key: Raw(&[]),
                        ts_ms: 0,
                        headers: vec![("", Raw(&[])); MAX_HEADERS],
                        payload: Raw(&[]),
                    };
                    records
                ],
            }))
        };
        assert!(decode(&append(MAX_FRAME_HEADERS / MAX_HEADERS)).is_ok());
        let err = decode(&append(MAX_FRAME_HEADERS / MAX_HEADERS + 1)).unwrap_err();
        assert!(
            matches!(&err, WireError::Malformed(e) if e == PER_FRAME),
            "{err}"
        );
        // The budget is per frame: the next one starts afresh.
        assert!(decode(&append(MAX_FRAME_HEADERS / MAX_HEADERS)).is_ok());
    }

    #[test]
    fn msg_header_is_compact() {
        let payload = [7u8; 64];
        let frame = Frame::Msg(MsgWire {
            topic: 3,
            name: None,
            seq_delta: 1,
            ts_delta: 12,
            headers: vec![],
            payload: Raw(&payload),
        });
        let b = body(&frame);
        // tag, topic, name, seq, ts, headers, payload length: 7 bytes.
        assert_eq!(b.len(), 64 + 7);
        assert_eq!(decode(&b).unwrap(), frame);
    }

    #[test]
    fn round_trips() {
        let id = NodeId::random();
        let idb = id.to_bytes();
        let frames = vec![
            Frame::Hello(Hello {
                magic: MAGIC,
                version: 1,
                features: 0,
                incarnation: 9,
                addrs: vec![Raw(b"x")],
                host: Raw(b"boot/net:1"),
                uid: 1000,
                nonce: [5; 32],
            }),
            Frame::Auth {
                proofs: vec![[1; 32], [2; 32]],
            },
            Frame::Topic { id: 1, name: "a.b" },
            Frame::ShmOffer {
                nonce: 3,
                to_you: "/dev/shm/a",
                from_you: "/dev/shm/b",
            },
            Frame::ShmRefuse { reason: "no" },
            Frame::ShmSwitch,
            Frame::Declare(DeclWire {
                node: Raw(&idb),
                epoch: 1,
                seq: 2,
                patterns: vec!["a.*", "b.>"],
                reliable: vec![],
                sig: None,
            }),
            Frame::Member(MemberWire::PingReq {
                seq: 4,
                target: Raw(&idb),
                updates: vec![],
            }),
            Frame::Bye,
            Frame::ByeAck,
        ];
        for f in frames {
            assert_eq!(decode(&body(&f)).unwrap(), f);
        }
        let d = Frame::Declare(DeclWire {
            node: Raw(&idb),
            epoch: 1,
            seq: 2,
            patterns: vec!["a.*"],
            reliable: vec![],
            sig: None,
        });
        let bytes = body(&d);
        let Frame::Declare(dw) = decode(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!(decl_from_wire(&dw).unwrap().node, id);
    }

    #[test]
    fn large_sync_is_split_and_round_trips() {
        use bytes::BytesMut;
        let members: Vec<membership::Update> = (0..2500)
            .map(|i| membership::Update {
                node: NodeId::random(),
                incarnation: i,
                state: MemberState::Alive,
                addrs: vec![b"/ip4/127.0.0.1/udp/1/quic-v1".to_vec()],
                signature: None,
            })
            .collect();
        let decls: Vec<Declaration> = (0..300)
            .map(|i| Declaration {
                node: NodeId::random(),
                version: Version { epoch: 1, seq: i },
                patterns: (0..20)
                    .map(|j| Pattern::new(&format!("p{i}.{j}.{}", "x".repeat(60))).unwrap())
                    .collect(),
                reliable: Vec::new(),
                signature: None,
            })
            .collect();
        let mut buf = Vec::new();
        encode_sync(&mut buf, &members, &decls);
        let mut frames = Vec::new();
        mesh_transports::frame::split_frames(
            &mut BytesMut::from(&buf[..]),
            1024 * 1024,
            &mut frames,
        )
        .unwrap();
        assert!(frames.len() > 3, "split into several frames");
        let (mut m, mut d, mut last) = (0, 0, 0);
        for (i, f) in frames.iter().enumerate() {
            let Frame::Sync(s) = decode(f).unwrap() else {
                panic!("not a sync")
            };
            m += s.members.len();
            d += s.decls.len();
            if !s.more {
                last = i;
            }
            for dw in &s.decls {
                decl_from_wire(dw).unwrap();
            }
        }
        assert_eq!((m, d), (2500, 300));
        assert_eq!(
            last,
            frames.len() - 1,
            "only the last frame says no more follow"
        );
    }

    #[test]
    fn bad_values_are_typed_errors() {
        let bad = DeclWire {
            node: Raw(b"nope"),
            epoch: 0,
            seq: 0,
            patterns: vec![],
            reliable: vec![],
            sig: None,
        };
        assert_eq!(decl_from_wire(&bad), Err(WireError::BadPeerId));
        let idb = NodeId::random().to_bytes();
        let bad = DeclWire {
            node: Raw(&idb),
            epoch: 0,
            seq: 0,
            patterns: vec!["a..b"],
            reliable: vec![],
            sig: None,
        };
        assert!(matches!(
            decl_from_wire(&bad),
            Err(WireError::BadPattern(_))
        ));
        assert!(matches!(
            decode(&[0xff, 0xff]),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(decode(&[]), Err(WireError::Malformed(_))));
    }

    proptest! {
        /// Garbage and truncated frames give errors, never panics or huge
        /// allocations.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(Frame::Declare(d)) = decode(&bytes) {
                let _ = decl_from_wire(&d);
            }
            if let Ok(Frame::Member(m)) = decode(&bytes) {
                let _ = member_from_wire(&m);
            }
        }

        #[test]
        fn truncations_of_valid_frames_fail_cleanly(cut in 0usize..80) {
            let payload = [1u8; 64];
            let b = body(&Frame::Msg(MsgWire { topic: 1, name: Some("a.b"), seq_delta: 300, ts_delta: -5, headers: vec![("k", Raw(b"v"))], payload: Raw(&payload) }));
            let cut = cut.min(b.len() - 1);
            prop_assert!(decode(&b[..cut]).is_err());
        }
    }
}
