//! Pub/sub routing: what a published message turns into on each link, and
//! which local subscriptions a received one goes to.
//!
//! Direct mode (the default and, for now, the only one): the publisher
//! routes each message to every live peer whose declared interest matches
//! (see [`super::interest::RouteCache`]) and writes it to that peer's link.
//! A link carries one publisher's messages in order, so delivery is FIFO per
//! publisher. Gossip mode (epidemic broadcast for wide fan-out) will be a
//! second [`Mode`] whose routing picks overlay neighbours instead of
//! subscribers; the per-link encoding below is shared by both.
//!
//! Per-link compression: topics are interned per link direction
//! ([`LinkEncoder`] sends `Topic { id, name }` once, then the id), and the
//! sequence number and timestamp are sent as deltas from the previous
//! message on the link, so a 64-byte message costs 7 bytes of header plus
//! the 4-byte frame length.

use std::{collections::BTreeMap, sync::Arc};

use bytes::Bytes;

use super::{
    topic::{Pattern, Topic},
    NodeId,
};
use crate::wire::{self, Frame, MsgWire, Raw, WireError};

/// How a topic's messages spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The publisher sends to each interested peer over its own link.
    #[default]
    Direct,
}

/// Most topics interned per link direction; further topics go inline.
pub const MAX_TOPICS_PER_LINK: usize = 16 * 1024;

/// A unique message id: publisher and its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    /// The publishing node.
    pub publisher: NodeId,
    /// The publisher's sequence number: increasing, also across restarts
    /// (each start numbers from 16 × its start time in µs).
    pub seq: u64,
}

/// A message received from the mesh (or published locally).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Unique id.
    pub id: MessageId,
    /// The topic it was published to.
    pub topic: Topic,
    /// The publishing node (same as `id.publisher`).
    pub publisher: NodeId,
    /// Publish time, µs since the Unix epoch, by the publisher's clock.
    pub timestamp: u64,
    /// Headers, in the order given.
    pub headers: Vec<(String, Bytes)>,
    /// The payload.
    pub payload: Bytes,
}

/// A message to publish, as handed to the encoder.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// Topic.
    pub topic: &'a Arc<str>,
    /// Publisher sequence number.
    pub seq: u64,
    /// Timestamp, µs since the Unix epoch.
    pub timestamp: u64,
    /// Headers.
    pub headers: &'a [(String, Bytes)],
    /// Payload.
    pub payload: &'a [u8],
}

/// Encoding state of one link direction (the sending side).
#[derive(Debug, Default)]
pub struct LinkEncoder {
    // Our own topics, not peer input: a fast non-keyed hash is safe.
    topics: rustc_hash::FxHashMap<Arc<str>, u32>,
    /// The last topic encoded, compared by pointer before hashing.
    last_topic: Option<(Arc<str>, u32)>,
    last_seq: u64,
    last_ts: u64,
}

impl LinkEncoder {
    /// Appends the frames for `msg` to `buf` (a `Topic` frame first if the
    /// topic is new on this link).
    pub fn encode(&mut self, buf: &mut Vec<u8>, msg: &Outgoing<'_>) {
        let cached = match &self.last_topic {
            Some((t, id)) if Arc::ptr_eq(t, msg.topic) => Some(*id),
            _ => {
                let id = self.topics.get(msg.topic).copied();
                if let Some(id) = id {
                    self.last_topic = Some((msg.topic.clone(), id));
                }
                id
            }
        };
        let (topic, name) = match cached {
            Some(id) => (id, None),
            None if self.topics.len() < MAX_TOPICS_PER_LINK => {
                let id = self.topics.len() as u32;
                self.topics.insert(msg.topic.clone(), id);
                wire::encode(
                    buf,
                    &Frame::Topic {
                        id,
                        name: msg.topic,
                    },
                );
                (id, None)
            }
            None => (u32::MAX, Some(&**msg.topic)),
        };
        let headers: Vec<(&str, Raw<'_>)> = msg
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), Raw(v)))
            .collect();
        let frame = Frame::Msg(MsgWire {
            topic,
            name,
            seq_delta: msg.seq.wrapping_sub(self.last_seq),
            ts_delta: msg.timestamp.wrapping_sub(self.last_ts) as i64,
            headers,
            payload: Raw(msg.payload),
        });
        self.last_seq = msg.seq;
        self.last_ts = msg.timestamp;
        wire::encode(buf, &frame);
    }
}

/// Decoding state of one link direction (the receiving side).
#[derive(Debug)]
pub struct LinkDecoder {
    peer: NodeId,
    /// Interned topics with their matching local subscriptions, cached until
    /// the local subscriptions change. Bounded by [`MAX_TOPICS_PER_LINK`].
    topics: Vec<(Topic, u64, Arc<[SubId]>)>,
    last_seq: u64,
    last_ts: u64,
}

impl LinkDecoder {
    /// A decoder for messages published by `peer`.
    pub fn new(peer: NodeId) -> Self {
        Self {
            peer,
            topics: Vec::new(),
            last_seq: 0,
            last_ts: 0,
        }
    }

    /// Handles a `Topic` frame.
    pub fn handle_topic(&mut self, id: u32, name: &str) -> Result<(), WireError> {
        if id as usize != self.topics.len() {
            return Err(WireError::Unexpected("out-of-order Topic"));
        }
        if self.topics.len() >= MAX_TOPICS_PER_LINK {
            return Err(WireError::TooManyTopics(MAX_TOPICS_PER_LINK));
        }
        let topic = Topic::new(name).map_err(|e| WireError::BadTopic(e.to_string()))?;
        self.topics.push((topic, u64::MAX, Arc::from(Vec::new())));
        Ok(())
    }

    /// Decodes a `Msg` frame whose body is `frame` (payload bytes are shared
    /// with it, not copied) and returns it with the local subscriptions it
    /// goes to.
    pub fn handle_msg(
        &mut self,
        frame: &Bytes,
        m: &MsgWire<'_>,
        subs: &LocalSubscriptions,
    ) -> Result<(Message, Arc<[SubId]>), WireError> {
        let (topic, targets) = if m.topic == u32::MAX {
            let name = m.name.ok_or(WireError::UnknownTopic(u32::MAX))?;
            let topic = Topic::new(name).map_err(|e| WireError::BadTopic(e.to_string()))?;
            let targets: Arc<[SubId]> = subs.matching(topic.as_str()).into();
            (topic, targets)
        } else {
            let entry = self
                .topics
                .get_mut(m.topic as usize)
                .ok_or(WireError::UnknownTopic(m.topic))?;
            if entry.1 != subs.generation() {
                entry.2 = subs.matching(entry.0.as_str()).into();
                entry.1 = subs.generation();
            }
            (entry.0.clone(), entry.2.clone())
        };
        self.last_seq = self.last_seq.wrapping_add(m.seq_delta);
        self.last_ts = self.last_ts.wrapping_add(m.ts_delta as u64);
        let headers = m
            .headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), slice_of(frame, v.0)))
            .collect();
        let msg = Message {
            id: MessageId {
                publisher: self.peer,
                seq: self.last_seq,
            },
            topic,
            publisher: self.peer,
            timestamp: self.last_ts,
            headers,
            payload: slice_of(frame, m.payload.0),
        };
        Ok((msg, targets))
    }
}

/// `Bytes::slice_ref` panics on an empty slice that is not inside `frame`
/// (postcard may hand out a dangling empty slice); handle that case.
fn slice_of(frame: &Bytes, part: &[u8]) -> Bytes {
    if part.is_empty() {
        Bytes::new()
    } else {
        frame.slice_ref(part)
    }
}

/// Identifies a local subscription.
pub type SubId = u64;

/// The local subscriptions of a node.
#[derive(Debug, Default)]
pub struct LocalSubscriptions {
    subs: BTreeMap<SubId, Pattern>,
    next: SubId,
    generation: u64,
}

impl LocalSubscriptions {
    /// Adds a subscription.
    pub fn add(&mut self, pattern: Pattern) -> SubId {
        self.next += 1;
        self.subs.insert(self.next, pattern);
        self.generation += 1;
        self.next
    }

    /// Removes a subscription, returning its pattern.
    pub fn remove(&mut self, id: SubId) -> Option<Pattern> {
        let p = self.subs.remove(&id)?;
        self.generation += 1;
        Some(p)
    }

    /// Changes whenever the set of subscriptions changes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Subscriptions matching `topic`.
    pub fn matching(&self, topic: &str) -> Vec<SubId> {
        self.subs
            .iter()
            .filter(|(_, p)| p.matches(topic))
            .map(|(id, _)| *id)
            .collect()
    }

    /// How many subscriptions there are.
    pub fn len(&self) -> usize {
        self.subs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use mesh_transports::frame::{split_frames, DEFAULT_MAX_FRAME};

    /// Encodes on one side and decodes on the other, through real framing.
    fn pipe(
        msgs: &[(&str, u64, u64, &[u8])],
        subs: &LocalSubscriptions,
    ) -> Vec<(Message, Vec<SubId>)> {
        let peer = NodeId::random();
        let mut enc = LinkEncoder::default();
        let mut buf = Vec::new();
        for (topic, seq, ts, payload) in msgs {
            let topic: Arc<str> = Arc::from(*topic);
            enc.encode(
                &mut buf,
                &Outgoing {
                    topic: &topic,
                    seq: *seq,
                    timestamp: *ts,
                    headers: &[],
                    payload,
                },
            );
        }
        let mut frames = Vec::new();
        split_frames(
            &mut BytesMut::from(&buf[..]),
            DEFAULT_MAX_FRAME,
            &mut frames,
        )
        .unwrap();
        let mut dec = LinkDecoder::new(peer);
        let mut out = Vec::new();
        for f in &frames {
            match wire::decode(f).unwrap() {
                Frame::Topic { id, name } => dec.handle_topic(id, name).unwrap(),
                Frame::Msg(m) => {
                    let (msg, to) = dec.handle_msg(f, &m, subs).unwrap();
                    assert_eq!(msg.publisher, peer);
                    out.push((msg, to.to_vec()));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        out
    }

    #[test]
    fn deltas_and_interning_round_trip() {
        let mut subs = LocalSubscriptions::default();
        let a = subs.add(Pattern::new("a.*").unwrap());
        let all = subs.add(Pattern::new(">").unwrap());
        let got = pipe(
            &[
                ("a.x", 1, 1000, b"one"),
                ("b", 5, 990, b""),
                ("a.x", 6, 2000, b"three"),
            ],
            &subs,
        );
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].0.id.seq, 1);
        assert_eq!(got[1].0.id.seq, 5);
        assert_eq!(got[1].0.timestamp, 990);
        assert_eq!(got[2].0.timestamp, 2000);
        assert_eq!(got[2].0.payload, &b"three"[..]);
        assert_eq!(got[1].0.payload, &b""[..]);
        assert_eq!(got[0].1, vec![a, all]);
        assert_eq!(got[1].1, vec![all]);
    }

    #[test]
    fn unknown_topic_id_is_an_error() {
        let mut dec = LinkDecoder::new(NodeId::random());
        let m = MsgWire {
            topic: 3,
            name: None,
            seq_delta: 1,
            ts_delta: 0,
            headers: vec![],
            payload: Raw(b""),
        };
        let err = dec
            .handle_msg(&Bytes::new(), &m, &LocalSubscriptions::default())
            .unwrap_err();
        assert_eq!(err, WireError::UnknownTopic(3));
        assert!(dec.handle_topic(1, "a").is_err());
        assert!(dec.handle_topic(0, "a..b").is_err());
    }

    #[test]
    fn cached_matches_follow_subscription_changes() {
        let peer = NodeId::random();
        let mut subs = LocalSubscriptions::default();
        let mut dec = LinkDecoder::new(peer);
        dec.handle_topic(0, "t").unwrap();
        let m = MsgWire {
            topic: 0,
            name: None,
            seq_delta: 1,
            ts_delta: 0,
            headers: vec![],
            payload: Raw(b""),
        };
        assert!(dec
            .handle_msg(&Bytes::new(), &m, &subs)
            .unwrap()
            .1
            .is_empty());
        let id = subs.add(Pattern::new("t").unwrap());
        assert_eq!(&*dec.handle_msg(&Bytes::new(), &m, &subs).unwrap().1, &[id]);
        subs.remove(id);
        assert!(dec
            .handle_msg(&Bytes::new(), &m, &subs)
            .unwrap()
            .1
            .is_empty());
    }
}
