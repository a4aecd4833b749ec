//! Work queues: the state machine of the node that hosts a queue.
//!
//! The host owns each message until a consumer acks it. Consumers grant
//! credit (their prefetch); the host dispatches each ready message to the
//! consumer with the most free credit, round-robin among equals. A message
//! in flight comes back after its visibility timeout, on a nack (after an
//! optional delay), or at once when its consumer is gone; after the
//! consumer's `max_attempts` deliveries, or on a reject, it moves to the
//! dead-letter queue `NAME.dlq`, itself a queue of this host.
//!
//! Order: ready messages leave in the order they were accepted, and a
//! message that comes back goes before every message accepted after it. So
//! with one consumer and a prefetch of 1, each sender's messages are
//! processed in the order sent (FIFO per sender).
//!
//! Sans-IO: inputs are method calls with the current time; outputs are
//! [`Dispatch`]es drained with [`Queues::poll_dispatch`] and a timer
//! ([`Queues::poll_timeout`]) the driver arms and reports back with
//! [`Queues::handle_timeout`]. Consumers are identified by a key chosen by
//! the driver (`K`); the runtime uses node and consumer number.

use std::{
    cmp::Reverse,
    collections::{BTreeSet, BinaryHeap, VecDeque},
    hash::Hash,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use rustc_hash::FxHashMap;

use super::pubsub::MessageId;

/// Suffix of a queue's dead-letter queue.
pub const DLQ_SUFFIX: &str = ".dlq";

/// Most consumers one queue accepts; more are refused.
pub const MAX_CONSUMERS_PER_QUEUE: usize = 4096;

/// Longest delay, visibility timeout or time to live honoured; longer
/// ones are cut to it (so no deadline overflows).
pub const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// `now + d`, with `d` cut to [`MAX_WAIT`].
pub fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d.min(MAX_WAIT)).unwrap_or(now)
}

/// Longest reason kept with a nack or reject.
pub const MAX_ERROR_LEN: usize = 1024;

/// The dead-letter queue of `queue`.
pub fn dlq_name(queue: &str) -> String {
    format!("{queue}{DLQ_SUFFIX}")
}

/// What holding a message costs besides its payload and headers: the
/// message, its slot and its place in the queue's lists.
pub const MESSAGE_OVERHEAD: usize = 192;

/// Bytes a message counts for against [`Config::max_total_bytes`].
fn message_size(headers: &[(String, Bytes)], payload: &Bytes) -> usize {
    payload.len()
        + headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 56)
            .sum::<usize>()
        + MESSAGE_OVERHEAD
}

/// Host-side limits, the same for every queue of a host.
#[derive(Debug, Clone)]
pub struct Config {
    /// Most messages a queue holds (waiting, delayed and in flight); a send
    /// beyond it gets [`SendError::Full`].
    pub max_messages: usize,
    /// How long a dedup key drops repeated sends.
    pub dedup_window: Duration,
    /// Most dedup keys remembered per queue (the oldest are forgotten
    /// first, early, and counted in [`QueueStats::dedup_evicted`]).
    pub max_dedup_keys: usize,
    /// Most messages over all queues of the host.
    pub max_total_messages: usize,
    /// Most bytes over all queues of the host: payloads, headers, and what
    /// holding a message costs besides ([`MESSAGE_OVERHEAD`]), so that a
    /// flood of large messages cannot exhaust memory before the message
    /// counts are reached.
    pub max_total_bytes: usize,
    /// Most queues (with or without messages) the host keeps; sends and
    /// consumers for further queues are refused.
    pub max_queues: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_messages: 1_000_000,
            dedup_window: Duration::from_secs(300),
            max_dedup_keys: 100_000,
            max_total_messages: 4_000_000,
            max_total_bytes: 1024 * 1024 * 1024,
            max_queues: 16 * 1024,
        }
    }
}

/// What a consumer asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerOptions {
    /// Most messages in flight to it at once.
    pub prefetch: u32,
    /// How long a delivered message stays invisible to other consumers.
    pub visibility_timeout: Duration,
    /// Deliveries before a message is dead-lettered.
    pub max_attempts: u32,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            prefetch: 64,
            visibility_timeout: Duration::from_secs(30),
            max_attempts: 5,
        }
    }
}

/// A message handed to a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// Its id (the sender and the sender's sequence number).
    pub id: MessageId,
    /// Headers.
    pub headers: Vec<(String, Bytes)>,
    /// Payload.
    pub payload: Bytes,
    /// Not delivered before this.
    pub not_before: Option<Instant>,
    /// Dead-lettered (reason "expired") if not acked by then.
    pub expires: Option<Instant>,
    /// Repeated sends with this key within the dedup window are dropped.
    pub dedup_key: Option<String>,
}

/// What changed in the messages held, for a durable host to write down
/// (see [`Queues::set_journal`]). A message is named by its journal id,
/// given when it was queued and kept while it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Journal {
    /// A message was queued.
    Stored {
        /// Its journal id.
        jid: u64,
        /// The queue.
        queue: Arc<str>,
        /// The message.
        msg: NewMessage,
    },
    /// A message moved to another queue: dead-lettered (with deliveries
    /// and reason), or replayed from the dead-letter queue (`None`).
    Moved {
        /// Its journal id.
        jid: u64,
        /// The queue it is in now.
        queue: Arc<str>,
        /// Dead-letter details.
        dead: Option<(u32, String)>,
    },
    /// A message is gone: acked, or dropped (the dead-letter queue was
    /// full).
    Removed {
        /// Its journal id.
        jid: u64,
    },
    /// A dedup key is remembered until `until`: a durable host keeps it
    /// across a restart, also once its message is gone.
    Dedup {
        /// The queue.
        queue: Arc<str>,
        /// The key.
        key: String,
        /// The end of its window.
        until: Instant,
    },
    /// A dedup key is forgotten (its window ended, or it was evicted).
    DedupGone {
        /// The queue.
        queue: Arc<str>,
        /// The key.
        key: String,
    },
}

/// Why a send was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The host has its limit of queues.
    #[error("the host has its limit of {limit} queues")]
    TooManyQueues {
        /// The limit.
        limit: usize,
    },
    /// The queue holds its limit of messages.
    #[error("queue {queue:?} is full ({limit} messages)")]
    Full {
        /// The queue.
        queue: String,
        /// Its limit.
        limit: usize,
    },
    /// The host holds its limit of bytes over all its queues.
    #[error("the host of queue {queue:?} is full ({limit} bytes over all its queues)")]
    HostFull {
        /// The queue.
        queue: String,
        /// The host's limit ([`Config::max_total_bytes`]).
        limit: usize,
    },
    /// The node does not host the queue and takes no queue it is not
    /// configured to host (a one-shot node, `self_host(false)`).
    #[error("this node does not host queue {queue:?}")]
    NotHosted {
        /// The queue.
        queue: String,
    },
}

/// A send the queue took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Queued.
    Queued,
    /// Its dedup key was seen within the window: dropped.
    Duplicate,
}

/// A message to hand to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch<K> {
    /// The queue.
    pub queue: Arc<str>,
    /// The consumer.
    pub consumer: K,
    /// The consumer's number on this host (stable while it lives): a cheap
    /// way to group dispatches by consumer.
    pub slot: u32,
    /// The host's handle of the message, for acks.
    pub tag: u64,
    /// 1 on the first delivery.
    pub attempt: u32,
    /// The message id.
    pub id: MessageId,
    /// Headers.
    pub headers: Vec<(String, Bytes)>,
    /// Payload.
    pub payload: Bytes,
    /// In a dead-letter queue: deliveries before it died, and why.
    pub dead: Option<(u32, String)>,
}

/// A message as [`Queues::peek`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peeked {
    /// The message id.
    pub id: MessageId,
    /// Deliveries so far in this queue.
    pub attempts: u32,
    /// In a dead-letter queue: deliveries before it died, and why.
    pub dead: Option<(u32, String)>,
    /// Whether it is in flight to a consumer now.
    pub in_flight: bool,
    /// Headers.
    pub headers: Vec<(String, Bytes)>,
    /// Payload.
    pub payload: Bytes,
}

/// Counters of one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Waiting for a consumer (including delayed ones).
    pub waiting: usize,
    /// Delivered and not yet acked.
    pub in_flight: usize,
    /// Consumers with credit granted.
    pub consumers: usize,
    /// Sends queued.
    pub accepted: u64,
    /// Sends dropped by their dedup key.
    pub deduplicated: u64,
    /// Sends refused because the queue was full.
    pub refused: u64,
    /// Deliveries to consumers (redeliveries included).
    pub delivered: u64,
    /// Messages acked.
    pub acked: u64,
    /// Messages nacked by their consumer.
    pub nacked: u64,
    /// Deliveries after the first.
    pub redelivered: u64,
    /// Messages moved to the dead-letter queue.
    pub dead_lettered: u64,
    /// Messages that could not move to the dead-letter queue because it
    /// was full: kept in their queue instead, and offered again after
    /// [`DLQ_FULL_RETRY`] (not dropped).
    pub dead_letters_dropped: u64,
    /// Dedup keys forgotten before their window ended.
    pub dedup_evicted: u64,
    /// Acks, nacks and extends for messages not in flight to that consumer
    /// (stale: it timed out and went elsewhere).
    pub stale: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ready,
    Delayed(Instant),
    /// In flight to consumer number `consumer` (see `Queues::consumers`).
    InFlight {
        consumer: u32,
        deadline: Instant,
    },
}

#[derive(Debug)]
struct Msg {
    queue: u32,
    /// Journal id (0 when not journaling).
    jid: u64,
    /// Acceptance order (also across queues): oldest first.
    order: u64,
    id: MessageId,
    headers: Vec<(String, Bytes)>,
    payload: Bytes,
    expires: Option<Instant>,
    attempts: u32,
    /// The max attempts of the consumer it last went to.
    max_attempts: u32,
    last_error: Option<String>,
    dead: Option<(u32, String)>,
    /// Bytes it counts for against [`Config::max_total_bytes`] (set when
    /// it is put in a queue).
    size: usize,
    state: State,
    /// The consumer (number) it last went to: after a timeout only that
    /// one may still settle it with a late ack.
    last: Option<u32>,
    /// Bumped on every state change; timers carry it, so a stale timer is
    /// told apart.
    timer: u32,
}

impl Msg {
    /// A message new to queue `queue` (or restored to it, with its
    /// dead-letter details).
    fn new(queue: u32, jid: u64, msg: NewMessage, dead: Option<(u32, String)>) -> Msg {
        Msg {
            queue,
            jid,
            order: 0,
            id: msg.id,
            headers: msg.headers,
            payload: msg.payload,
            expires: msg.expires,
            attempts: 0,
            max_attempts: u32::MAX,
            last_error: None,
            dead,
            size: 0,
            last: None,
            state: State::Ready,
            timer: 0,
        }
    }
}

/// A message's place. A tag is `generation << 32 | index`, so a tag of a
/// message gone (its slot reused) never matches.
#[derive(Debug)]
struct Slot {
    generation: u32,
    msg: Option<Msg>,
}

#[derive(Debug)]
struct Consumer<K> {
    key: K,
    queue: u32,
    options: ConsumerOptions,
    in_flight: u32,
    /// Visibility deadlines in dispatch order (the timeout is the same for
    /// every message, so they are sorted): (deadline, tag, timer).
    deadlines: VecDeque<(Instant, u64, u32)>,
}

#[derive(Debug)]
struct Queue {
    name: Arc<str>,
    /// Messages held (waiting, delayed and in flight).
    held: usize,
    in_flight: usize,
    /// Tags of messages ready for the first time, in acceptance order.
    fresh: VecDeque<u64>,
    /// (order, tag) of messages that came back (or whose delay ended):
    /// they go before `fresh` ones accepted later, oldest first.
    again: BTreeSet<(u64, u64)>,
    /// Its consumers' numbers.
    consumers: Vec<u32>,
    /// Where the round-robin among equally free consumers starts.
    cursor: usize,
    dedup: FxHashMap<String, Instant>,
    dedup_order: VecDeque<(Instant, String)>,
    stats: QueueStats,
}

impl Queue {
    fn new(name: Arc<str>) -> Self {
        Self {
            name,
            held: 0,
            in_flight: 0,
            fresh: VecDeque::new(),
            again: BTreeSet::new(),
            consumers: Vec::new(),
            cursor: 0,
            dedup: FxHashMap::default(),
            dedup_order: VecDeque::new(),
            stats: QueueStats::default(),
        }
    }

    fn has_ready(&self) -> bool {
        !self.fresh.is_empty() || !self.again.is_empty()
    }

    /// Remembers `key` until `until`, forgetting expired keys (and the
    /// oldest beyond the limit); both changes go to `journal` if given.
    fn remember_dedup(
        &mut self,
        now: Instant,
        key: String,
        until: Instant,
        config: &Config,
        mut journal: Option<&mut Vec<Journal>>,
    ) {
        while let Some((t, _)) = self.dedup_order.front() {
            if *t > now && self.dedup_order.len() < config.max_dedup_keys {
                break;
            }
            let Some((t, k)) = self.dedup_order.pop_front() else {
                break;
            };
            if t > now {
                self.stats.dedup_evicted += 1;
            }
            if self.dedup.get(&k) == Some(&t) {
                self.dedup.remove(&k);
                if let Some(j) = journal.as_deref_mut() {
                    j.push(Journal::DedupGone {
                        queue: self.name.clone(),
                        key: k,
                    });
                }
            }
        }
        if let Some(j) = journal {
            j.push(Journal::Dedup {
                queue: self.name.clone(),
                key: key.clone(),
                until,
            });
        }
        self.dedup.insert(key.clone(), until);
        self.dedup_order.push_back((until, key));
    }
}

/// Why a consumer could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsumerError {
    /// The host has its limit of queues.
    #[error("the host has its limit of {limit} queues")]
    TooManyQueues {
        /// The limit.
        limit: usize,
    },
    /// The queue has [`MAX_CONSUMERS_PER_QUEUE`] consumers.
    #[error("queue {queue:?} has the limit of {MAX_CONSUMERS_PER_QUEUE} consumers")]
    TooMany {
        /// The queue.
        queue: String,
    },
}

/// How long a message that could not be dead-lettered (its dead-letter
/// queue was full) waits in its queue before it is offered again.
pub const DLQ_FULL_RETRY: Duration = Duration::from_secs(5);

/// Every queue a node hosts.
///
/// Messages live in a slab (a tag is an index and a generation, so acks
/// need no hashing); consumers in a table of their own, referred to by
/// number; visibility deadlines in a sorted list per consumer.
#[derive(Debug)]
pub struct Queues<K> {
    config: Config,
    queues: Vec<Queue>,
    by_name: FxHashMap<Arc<str>, u32>,
    slots: Vec<Slot>,
    /// Free slots, oldest first (so a slot's generation wraps only after
    /// 2^32 reuses of every slot).
    free: VecDeque<u32>,
    held: usize,
    /// Bytes of the messages held ([`Config::max_total_bytes`]).
    held_bytes: usize,
    next_order: u64,
    consumers: Vec<Option<Consumer<K>>>,
    free_consumers: Vec<u32>,
    /// (due, tag, timer): delays and extended deadlines.
    timers: BinaryHeap<Reverse<(Instant, u64, u32)>>,
    /// Queues that may have something to dispatch.
    dirty: Vec<u32>,
    /// Changes for a durable host, when journaling.
    journal: Option<Vec<Journal>>,
    next_jid: u64,
    /// Settles refused before they reached a queue (of a previous run of
    /// the host, as its driver tells).
    stale_runs: u64,
}

fn split(tag: u64) -> (usize, u32) {
    ((tag & 0xffff_ffff) as usize, (tag >> 32) as u32)
}

impl<K: Clone + Eq + Hash> Queues<K> {
    /// No queues yet.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            queues: Vec::new(),
            by_name: FxHashMap::default(),
            slots: Vec::new(),
            free: VecDeque::new(),
            held: 0,
            held_bytes: 0,
            next_order: 0,
            consumers: Vec::new(),
            free_consumers: Vec::new(),
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            journal: None,
            next_jid: 0,
            stale_runs: 0,
        }
    }

    /// Counts `n` settles the driver refused before naming a queue (tags of
    /// a previous run of this host).
    pub fn count_stale(&mut self, n: usize) {
        self.stale_runs += n as u64;
    }

    /// Settles counted by [`Queues::count_stale`].
    pub fn stale_runs(&self) -> u64 {
        self.stale_runs
    }

    /// Starts (or stops) recording every change to the messages held, for
    /// [`Queues::drain_journal`].
    pub fn set_journal(&mut self, on: bool) {
        self.journal = on.then(Vec::new);
    }

    /// Takes the changes recorded since the last call, in order.
    pub fn drain_journal(&mut self, into: &mut Vec<Journal>) {
        if let Some(j) = self.journal.as_mut() {
            into.append(j);
        }
    }

    fn record(&mut self, j: impl FnOnce() -> Journal) {
        if let Some(journal) = self.journal.as_mut() {
            journal.push(j());
        }
    }

    /// Puts back a message a durable host had stored (after a restart), in
    /// journal order: no limits or dedup checks, since it was accepted
    /// once; its dedup key is remembered afresh. The journal does not
    /// record it again.
    pub fn restore(
        &mut self,
        now: Instant,
        queue: &str,
        jid: u64,
        msg: NewMessage,
        dead: Option<(u32, String)>,
    ) {
        let qi = self.index(queue);
        if let Some(key) = &msg.dedup_key {
            // Journaled: once the message is gone its key must still be on
            // disk for the rest of its window.
            let until = after(now, self.config.dedup_window);
            self.queues[qi as usize].remember_dedup(
                now,
                key.clone(),
                until,
                &self.config,
                self.journal.as_mut(),
            );
        }
        self.next_jid = self.next_jid.max(jid);
        let not_before = msg.not_before;
        self.insert(now, Msg::new(qi, jid, msg, dead), not_before);
    }

    /// Puts back a dedup key a durable host had stored (after a restart):
    /// repeats of it are dropped until `until`. Expired keys are ignored;
    /// the journal does not record it again.
    pub fn restore_dedup(&mut self, now: Instant, queue: &str, key: String, until: Instant) {
        if until <= now {
            return;
        }
        let qi = self.index(queue);
        self.queues[qi as usize].remember_dedup(now, key, until, &self.config, None);
    }

    /// The limits.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether `queue` has room for one more message.
    pub fn has_room(&self, queue: &str) -> bool {
        self.held < self.config.max_total_messages
            && self.held_bytes + MESSAGE_OVERHEAD <= self.config.max_total_bytes
            && self
                .by_name
                .get(queue)
                .is_none_or(|q| self.queues[*q as usize].held < self.config.max_messages)
    }

    /// The queue's number, making it if there is room.
    fn try_index(&mut self, name: &str) -> Option<u32> {
        if let Some(i) = self.by_name.get(name) {
            return Some(*i);
        }
        (self.queues.len() < self.config.max_queues).then(|| self.index(name))
    }

    fn index(&mut self, name: &str) -> u32 {
        if let Some(i) = self.by_name.get(name) {
            return *i;
        }
        let i = self.queues.len() as u32;
        let name: Arc<str> = name.into();
        self.queues.push(Queue::new(name.clone()));
        self.by_name.insert(name, i);
        i
    }

    fn mark(&mut self, q: u32) {
        if !self.dirty.contains(&q) {
            self.dirty.push(q);
        }
    }

    fn msg(&self, tag: u64) -> Option<&Msg> {
        let (i, generation) = split(tag);
        let s = self.slots.get(i)?;
        if s.generation != generation {
            return None;
        }
        s.msg.as_ref()
    }

    fn msg_mut(&mut self, tag: u64) -> Option<&mut Msg> {
        let (i, generation) = split(tag);
        let s = self.slots.get_mut(i)?;
        if s.generation != generation {
            return None;
        }
        s.msg.as_mut()
    }

    /// Takes the message out of its slot (the tag dies with it).
    fn take(&mut self, tag: u64) -> Option<Msg> {
        let (i, generation) = split(tag);
        let s = self.slots.get_mut(i)?;
        if s.generation != generation {
            return None;
        }
        let m = s.msg.take()?;
        s.generation = s.generation.wrapping_add(1);
        self.free.push_back(i as u32);
        self.held -= 1;
        self.held_bytes -= m.size;
        let q = &mut self.queues[m.queue as usize];
        q.held -= 1;
        Some(m)
    }

    /// Queues `msg` on `queue`.
    pub fn send(
        &mut self,
        now: Instant,
        queue: &str,
        msg: NewMessage,
    ) -> Result<Accepted, SendError> {
        let Some(qi) = self.try_index(queue) else {
            return Err(SendError::TooManyQueues {
                limit: self.config.max_queues,
            });
        };
        let total_full = self.held >= self.config.max_total_messages;
        let config = &self.config;
        let q = &mut self.queues[qi as usize];
        if let Some(key) = &msg.dedup_key {
            if q.dedup.get(key).is_some_and(|until| *until > now) {
                q.stats.deduplicated += 1;
                return Ok(Accepted::Duplicate);
            }
        }
        let size = message_size(&msg.headers, &msg.payload);
        if self.held_bytes + size > config.max_total_bytes {
            q.stats.refused += 1;
            return Err(SendError::HostFull {
                queue: queue.to_owned(),
                limit: config.max_total_bytes,
            });
        }
        if q.held >= config.max_messages || total_full {
            q.stats.refused += 1;
            return Err(SendError::Full {
                queue: queue.to_owned(),
                limit: if total_full {
                    config.max_total_messages
                } else {
                    config.max_messages
                },
            });
        }
        self.queues[qi as usize].stats.accepted += 1;
        let jid = if self.journal.is_some() {
            self.next_jid += 1;
            let name = self.queues[qi as usize].name.clone();
            let jid = self.next_jid;
            let stored = msg.clone();
            self.record(|| Journal::Stored {
                jid,
                queue: name,
                msg: stored,
            });
            jid
        } else {
            0
        };
        let mut msg = msg;
        if let Some(key) = msg.dedup_key.take() {
            let until = after(now, self.config.dedup_window);
            self.queues[qi as usize].remember_dedup(
                now,
                key,
                until,
                &self.config,
                self.journal.as_mut(),
            );
        }
        let not_before = msg.not_before;
        self.insert(now, Msg::new(qi, jid, msg, None), not_before);
        Ok(Accepted::Queued)
    }

    /// Adds a message to its queue, ready or delayed.
    fn insert(&mut self, now: Instant, mut msg: Msg, not_before: Option<Instant>) {
        self.next_order += 1;
        msg.order = self.next_order;
        let i = match self.free.pop_front() {
            Some(i) => i as usize,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    msg: None,
                });
                self.slots.len() - 1
            }
        };
        let tag = (u64::from(self.slots[i].generation) << 32) | i as u64;
        let qi = msg.queue;
        msg.size = message_size(&msg.headers, &msg.payload)
            + msg.last_error.as_ref().map_or(0, |e| e.len())
            + msg.dead.as_ref().map_or(0, |(_, r)| r.len());
        self.held_bytes += msg.size;
        let q = &mut self.queues[qi as usize];
        q.held += 1;
        match not_before.filter(|t| *t > now) {
            Some(t) => {
                msg.state = State::Delayed(t);
                self.timers.push(Reverse((t, tag, msg.timer)));
            }
            None => {
                msg.state = State::Ready;
                q.fresh.push_back(tag);
            }
        }
        self.slots[i].msg = Some(msg);
        self.held += 1;
        self.mark(qi);
    }

    /// A consumer grants credit on `queue` (or changes its options); a
    /// prefetch of 0 removes it (its messages in flight stay until acked or
    /// timed out).
    pub fn set_consumer(
        &mut self,
        queue: &str,
        key: K,
        options: ConsumerOptions,
    ) -> Result<(), ConsumerError> {
        let Some(qi) = self.try_index(queue) else {
            return Err(ConsumerError::TooManyQueues {
                limit: self.config.max_queues,
            });
        };
        if let Some(ci) = self.find_consumer(qi, &key) {
            if let Some(c) = self.consumers[ci as usize].as_mut() {
                if c.options.visibility_timeout != options.visibility_timeout {
                    // Its list stays sorted only for one timeout: the
                    // deadlines so far go to the heap.
                    for (at, tag, timer) in c.deadlines.drain(..) {
                        self.timers.push(Reverse((at, tag, timer)));
                    }
                }
                c.options = options;
            }
            if options.prefetch == 0 {
                self.retire(ci);
            }
        } else if options.prefetch > 0 {
            let q = &mut self.queues[qi as usize];
            if q.consumers.len() >= MAX_CONSUMERS_PER_QUEUE {
                return Err(ConsumerError::TooMany {
                    queue: queue.to_owned(),
                });
            }
            let c = Consumer {
                key,
                queue: qi,
                options,
                in_flight: 0,
                deadlines: VecDeque::new(),
            };
            let ci = match self.free_consumers.pop() {
                Some(ci) => {
                    self.consumers[ci as usize] = Some(c);
                    ci
                }
                None => {
                    self.consumers.push(Some(c));
                    (self.consumers.len() - 1) as u32
                }
            };
            q.consumers.push(ci);
        }
        self.mark(qi);
        Ok(())
    }

    fn find_consumer(&self, qi: u32, key: &K) -> Option<u32> {
        self.queues[qi as usize]
            .consumers
            .iter()
            .copied()
            .find(|ci| {
                self.consumers[*ci as usize]
                    .as_ref()
                    .is_some_and(|c| c.key == *key)
            })
    }

    /// Frees a consumer with no credit and nothing in flight.
    fn retire(&mut self, ci: u32) {
        let Some(c) = self.consumers[ci as usize].as_ref() else {
            return;
        };
        if c.options.prefetch > 0 || c.in_flight > 0 {
            return;
        }
        let qi = c.queue as usize;
        self.queues[qi].consumers.retain(|x| *x != ci);
        self.consumers[ci as usize] = None;
        self.free_consumers.push(ci);
    }

    /// A consumer is gone (its node left or its link dropped): everything
    /// in flight to it comes back now. `matches` picks the consumers.
    pub fn remove_consumers(&mut self, now: Instant, matches: impl Fn(&K) -> bool) {
        let gone: Vec<u32> = self
            .consumers
            .iter()
            .enumerate()
            .filter(|(_, c)| c.as_ref().is_some_and(|c| matches(&c.key)))
            .map(|(i, _)| i as u32)
            .collect();
        if gone.is_empty() {
            return;
        }
        let mut back: Vec<(u64, u64)> = Vec::new();
        for &ci in &gone {
            let Some(c) = self.consumers[ci as usize].as_mut() else {
                continue;
            };
            c.options.prefetch = 0;
            let queue = c.queue;
            if c.in_flight > 0 {
                for (_, tag, _) in std::mem::take(&mut c.deadlines) {
                    if let Some(m) = self.msg(tag) {
                        if m.queue == queue
                            && matches!(m.state, State::InFlight { consumer, .. } if consumer == ci)
                        {
                            back.push((m.order, tag));
                        }
                    }
                }
            }
        }
        // Extended deadlines are not in the consumer's list: look for
        // those among the timers.
        for Reverse((_, tag, _)) in self.timers.iter() {
            if let Some(m) = self.msg(*tag) {
                if let State::InFlight { consumer, .. } = m.state {
                    if gone.contains(&consumer) {
                        back.push((m.order, *tag));
                    }
                }
            }
        }
        back.sort_unstable();
        back.dedup();
        for (_, tag) in back {
            self.give_back(now, tag, None, "consumer lost".into());
        }
        for ci in gone {
            if let Some(c) = self.consumers[ci as usize].as_mut() {
                // Anything left would be a stale count: nothing is in
                // flight to it any more.
                c.in_flight = 0;
            }
            self.retire(ci);
        }
    }

    /// Takes a message out of flight: frees its consumer's credit. Returns
    /// its queue.
    fn land(&mut self, tag: u64) -> Option<u32> {
        let m = self.msg_mut(tag)?;
        let qi = m.queue;
        if let State::InFlight { consumer, .. } = m.state {
            m.state = State::Ready;
            m.timer = m.timer.wrapping_add(1);
            self.queues[qi as usize].in_flight -= 1;
            if let Some(c) = self.consumers[consumer as usize].as_mut() {
                c.in_flight = c.in_flight.saturating_sub(1);
                // Acks come mostly in order: drop settled deadlines from the
                // front, and compact when settled ones pile up behind a
                // slow message.
                let live = c.in_flight as usize;
                if c.deadlines.len() > 2 * live + 64 {
                    let slots = &self.slots;
                    c.deadlines.retain(|(_, t, timer)| {
                        let (i, generation) = split(*t);
                        slots.get(i).is_some_and(|s| {
                            s.generation == generation
                                && s.msg.as_ref().is_some_and(|m| m.timer == *timer)
                        })
                    });
                }
            }
            self.retire(consumer);
        }
        self.mark(qi);
        Some(qi)
    }

    /// Whether `tag` is in flight to `consumer`.
    fn in_flight_to(&mut self, tag: u64, key: &K) -> bool {
        let Some(m) = self.msg(tag) else {
            return false;
        };
        let qi = m.queue as usize;
        let ok = match m.state {
            State::InFlight { consumer, .. } => self.consumers[consumer as usize]
                .as_ref()
                .is_some_and(|c| c.key == *key),
            _ => false,
        };
        if !ok {
            self.queues[qi].stats.stale += 1;
        }
        ok
    }

    /// `consumer` processed `tag`: the message is gone. Acks of messages
    /// that timed out and wait for redelivery count too; acks of messages
    /// in flight to another consumer are stale and ignored. Returns whether
    /// it was taken.
    pub fn ack(&mut self, tag: u64, consumer: &K) -> bool {
        let Some(m) = self.msg(tag) else {
            return false;
        };
        if let State::InFlight { .. } = m.state {
            if !self.in_flight_to(tag, consumer) {
                return false;
            }
        } else if !m.last.is_some_and(|ci| {
            self.consumers[ci as usize]
                .as_ref()
                .is_some_and(|c| c.key == *consumer)
        }) {
            // Waiting messages are settled only by the consumer whose
            // delivery of it timed out (its late ack), not by anyone else
            // (nor by a tag that was never delivered).
            let qi = m.queue as usize;
            self.queues[qi].stats.stale += 1;
            return false;
        }
        if self.land(tag).is_none() {
            return false;
        }
        let Some(m) = self.take(tag) else {
            return false;
        };
        self.queues[m.queue as usize].stats.acked += 1;
        self.record(|| Journal::Removed { jid: m.jid });
        true
    }

    /// `consumer` gives `tag` back, to be delivered again after `delay`
    /// (dead-lettered if that was its last attempt).
    pub fn nack(&mut self, now: Instant, tag: u64, consumer: &K, delay: Option<Duration>) -> bool {
        if !self.in_flight_to(tag, consumer) {
            return false;
        }
        if let Some(m) = self.msg(tag) {
            let qi = m.queue as usize;
            self.queues[qi].stats.nacked += 1;
        }
        self.give_back(now, tag, delay, "nacked".into());
        true
    }

    /// `consumer` gives `tag` back unseen (it stopped before its
    /// application took it): it comes back at once, and that delivery does
    /// not count as an attempt.
    pub fn release(&mut self, now: Instant, tag: u64, consumer: &K) -> bool {
        if !self.in_flight_to(tag, consumer) {
            return false;
        }
        if let Some(m) = self.msg_mut(tag) {
            m.attempts = m.attempts.saturating_sub(1);
        }
        self.give_back(now, tag, None, "released".into());
        true
    }

    /// `consumer` refuses `tag`: straight to the dead-letter queue.
    pub fn reject(&mut self, now: Instant, tag: u64, consumer: &K, reason: &str) -> bool {
        if !self.in_flight_to(tag, consumer) {
            return false;
        }
        if self.land(tag).is_none() {
            return false;
        }
        self.dead_letter(now, tag, truncate(reason));
        true
    }

    /// `consumer` keeps working on `tag`: its visibility timeout restarts
    /// at `by` from now.
    pub fn extend(&mut self, now: Instant, tag: u64, consumer: &K, by: Duration) -> bool {
        if !self.in_flight_to(tag, consumer) {
            return false;
        }
        let Some(m) = self.msg_mut(tag) else {
            return false;
        };
        let deadline = after(now, by);
        if let State::InFlight { deadline: d, .. } = &mut m.state {
            *d = deadline;
        }
        m.timer = m.timer.wrapping_add(1);
        let timer = m.timer;
        self.timers.push(Reverse((deadline, tag, timer)));
        self.prune_timers();
        true
    }

    /// Drops stale timers when they outnumber the messages held (repeated
    /// extends leave one behind each).
    fn prune_timers(&mut self) {
        if self.timers.len() > 2 * self.held + 1024 {
            let timers = std::mem::take(&mut self.timers);
            self.timers = timers
                .into_iter()
                .filter(|Reverse((_, tag, timer))| self.timer_live(*tag, *timer))
                .collect();
        }
    }

    /// A message leaves flight without an ack: back to the queue (after
    /// `delay`), or to the dead-letter queue after its last attempt.
    fn give_back(&mut self, now: Instant, tag: u64, delay: Option<Duration>, error: String) {
        let Some(qi) = self.land(tag) else {
            return;
        };
        let Some(m) = self.msg_mut(tag) else {
            return;
        };
        if m.attempts >= m.max_attempts {
            let reason = format!("{error} after {} attempts", m.attempts);
            self.dead_letter(now, tag, reason);
            return;
        }
        m.last_error = Some(error);
        match delay.filter(|d| !d.is_zero()) {
            Some(d) => {
                let due = after(now, d);
                m.state = State::Delayed(due);
                let timer = m.timer;
                self.timers.push(Reverse((due, tag, timer)));
            }
            None => {
                let order = m.order;
                self.queues[qi as usize].again.insert((order, tag));
            }
        }
    }

    /// Moves `tag` (not in flight) to its queue's dead-letter queue.
    fn dead_letter(&mut self, now: Instant, tag: u64, reason: String) {
        let Some(mut m) = self.take(tag) else {
            return;
        };
        let from = m.queue as usize;
        let name = dlq_name(&self.queues[from].name);
        let di = self.index(&name);
        if self.queues[di as usize].held >= self.config.max_messages {
            // The dead-letter queue is full: the message is not dropped. It
            // stays in its queue (on disk too: nothing is journaled) and
            // comes back after DLQ_FULL_RETRY, when its next failure tries
            // the dead-letter queue again. Counted, so a full DLQ shows.
            self.queues[di as usize].stats.dead_letters_dropped += 1;
            self.queues[from].stats.dead_letters_dropped += 1;
            m.last_error = Some(reason);
            m.timer = m.timer.wrapping_add(1);
            self.insert(now, m, Some(after(now, DLQ_FULL_RETRY)));
            return;
        }
        self.queues[from].stats.dead_lettered += 1;
        m.queue = di;
        let (jid, queue, dead) = (
            m.jid,
            self.queues[di as usize].name.clone(),
            (m.attempts, reason.clone()),
        );
        self.record(|| Journal::Moved {
            jid,
            queue,
            dead: Some(dead),
        });
        m.dead = Some((m.attempts, reason));
        m.attempts = 0;
        m.max_attempts = u32::MAX;
        m.last_error = None;
        m.timer = m.timer.wrapping_add(1);
        self.insert(now, m, None);
    }

    /// The next ready tag of queue `qi`, oldest first.
    fn next_ready(&mut self, qi: u32) -> Option<u64> {
        loop {
            let q = &self.queues[qi as usize];
            let fresh = q.fresh.front().copied();
            let again = q.again.first().copied();
            let fresh_order = fresh.and_then(|t| self.msg(t).map(|m| m.order));
            let q = &mut self.queues[qi as usize];
            let tag = match (fresh, fresh_order, again) {
                (Some(_), None, _) => {
                    // Acked while waiting (after coming back): skip.
                    q.fresh.pop_front();
                    continue;
                }
                (Some(_), Some(fo), Some((ao, _))) if ao < fo => q.again.pop_first().map(|a| a.1),
                (Some(_), Some(_), _) => q.fresh.pop_front(),
                (None, _, Some(_)) => q.again.pop_first().map(|a| a.1),
                (None, _, None) => return None,
            }?;
            if self
                .msg(tag)
                .is_some_and(|m| m.queue == qi && matches!(m.state, State::Ready))
            {
                return Some(tag);
            }
        }
    }

    /// The consumer of `qi` with the most free credit, round-robin among
    /// equals.
    fn pick(&mut self, qi: u32) -> Option<u32> {
        let q = &self.queues[qi as usize];
        let n = q.consumers.len();
        let mut best: Option<(usize, u32)> = None;
        for i in 0..n {
            let at = (q.cursor + i) % n;
            let Some(c) = self.consumers[q.consumers[at] as usize].as_ref() else {
                continue;
            };
            let free = c.options.prefetch.saturating_sub(c.in_flight);
            if free > 0 && best.is_none_or(|(_, f)| free > f) {
                best = Some((at, free));
            }
        }
        let (at, _) = best?;
        let q = &mut self.queues[qi as usize];
        q.cursor = (at + 1) % n;
        Some(q.consumers[at])
    }

    fn has_credit(&self, qi: u32) -> bool {
        self.queues[qi as usize].consumers.iter().any(|ci| {
            self.consumers[*ci as usize]
                .as_ref()
                .is_some_and(|c| c.in_flight < c.options.prefetch)
        })
    }

    /// The next message to hand to a consumer, if any queue has one ready
    /// and a consumer with credit.
    pub fn poll_dispatch(&mut self, now: Instant) -> Option<Dispatch<K>> {
        while let Some(qi) = self.dirty.last().copied() {
            if !self.queues[qi as usize].has_ready() || !self.has_credit(qi) {
                self.dirty.pop();
                continue;
            }
            let Some(tag) = self.next_ready(qi) else {
                self.dirty.pop();
                continue;
            };
            let expired = self
                .msg(tag)
                .and_then(|m| m.expires)
                .is_some_and(|t| t <= now);
            if expired {
                self.dead_letter(now, tag, "expired".into());
                continue;
            }
            let Some(ci) = self.pick(qi) else {
                // Credit was checked above; put it back and stop.
                if let Some(order) = self.msg(tag).map(|m| m.order) {
                    self.queues[qi as usize].again.insert((order, tag));
                }
                self.dirty.pop();
                continue;
            };
            let Some(c) = self.consumers[ci as usize].as_mut() else {
                continue;
            };
            let deadline = after(now, c.options.visibility_timeout);
            let max_attempts = c.options.max_attempts.max(1);
            let consumer = c.key.clone();
            let (i, _) = split(tag);
            let Some(m) = self.slots[i].msg.as_mut() else {
                continue;
            };
            c.in_flight += 1;
            m.attempts += 1;
            m.max_attempts = max_attempts;
            m.timer = m.timer.wrapping_add(1);
            m.state = State::InFlight {
                consumer: ci,
                deadline,
            };
            m.last = Some(ci);
            c.deadlines.push_back((deadline, tag, m.timer));
            let q = &mut self.queues[qi as usize];
            q.in_flight += 1;
            q.stats.delivered += 1;
            if m.attempts > 1 {
                q.stats.redelivered += 1;
            }
            return Some(Dispatch {
                queue: q.name.clone(),
                consumer,
                slot: ci,
                tag,
                attempt: m.attempts,
                id: m.id,
                headers: m.headers.clone(),
                payload: m.payload.clone(),
                dead: m.dead.clone(),
            });
        }
        None
    }

    fn timer_live(&self, tag: u64, timer: u32) -> bool {
        self.msg(tag)
            .is_some_and(|m| m.timer == timer && !matches!(m.state, State::Ready))
    }

    /// When [`Queues::handle_timeout`] next has work.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        // Drop stale timers from the fronts so the driver is not woken for
        // nothing.
        while let Some(Reverse((_, tag, timer))) = self.timers.peek().copied() {
            if self.timer_live(tag, timer) {
                break;
            }
            self.timers.pop();
        }
        let mut next = self.timers.peek().map(|r| r.0 .0);
        for ci in 0..self.consumers.len() {
            while let Some((at, tag, timer)) = self.consumers[ci]
                .as_ref()
                .and_then(|c| c.deadlines.front().copied())
            {
                if self.timer_live(tag, timer) {
                    next = Some(next.map_or(at, |n| n.min(at)));
                    break;
                }
                if let Some(c) = self.consumers[ci].as_mut() {
                    c.deadlines.pop_front();
                }
            }
        }
        next
    }

    /// Visibility timeouts and delays due by `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut due = Vec::new();
        while let Some(Reverse((at, tag, timer))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            due.push((tag, timer));
        }
        for c in self.consumers.iter_mut().flatten() {
            while let Some((at, tag, timer)) = c.deadlines.front().copied() {
                if at > now {
                    break;
                }
                c.deadlines.pop_front();
                due.push((tag, timer));
            }
        }
        due.sort_unstable_by_key(|(tag, _)| self.msg(*tag).map(|m| m.order));
        for (tag, timer) in due {
            if !self.timer_live(tag, timer) {
                continue;
            }
            let Some(m) = self.msg_mut(tag) else {
                continue;
            };
            match m.state {
                State::Delayed(_) => {
                    m.state = State::Ready;
                    m.timer = m.timer.wrapping_add(1);
                    let (qi, order) = (m.queue, m.order);
                    self.queues[qi as usize].again.insert((order, tag));
                    self.mark(qi);
                }
                State::InFlight { .. } => {
                    self.give_back(now, tag, None, "visibility timeout".into())
                }
                State::Ready => {}
            }
        }
    }

    /// The tags of `qi`'s messages, oldest first.
    fn tags_of(&self, qi: u32) -> Vec<u64> {
        let mut tags: Vec<(u64, u64)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let m = s.msg.as_ref()?;
                (m.queue == qi).then(|| (m.order, (u64::from(s.generation) << 32) | i as u64))
            })
            .collect();
        tags.sort_unstable();
        tags.into_iter().map(|(_, t)| t).collect()
    }

    /// Up to `limit` messages of `queue`, oldest first, without taking them.
    pub fn peek(&self, queue: &str, limit: usize) -> Vec<Peeked> {
        let Some(qi) = self.by_name.get(queue).copied() else {
            return Vec::new();
        };
        self.tags_of(qi)
            .into_iter()
            .take(limit)
            .filter_map(|t| self.msg(t))
            .map(|m| Peeked {
                id: m.id,
                attempts: m.attempts,
                dead: m.dead.clone(),
                in_flight: matches!(m.state, State::InFlight { .. }),
                headers: m.headers.clone(),
                payload: m.payload.clone(),
            })
            .collect()
    }

    /// Moves every message of `queue`'s dead-letter queue that is not in
    /// flight back to `queue`, as new (attempts from 0), while `queue` has
    /// room. Returns how many moved.
    pub fn replay_dead_letters(&mut self, now: Instant, queue: &str) -> usize {
        let Some(di) = self.by_name.get(dlq_name(queue).as_str()).copied() else {
            return 0;
        };
        let target = self.index(queue);
        let mut moved = 0;
        for tag in self.tags_of(di) {
            if self.queues[target as usize].held >= self.config.max_messages {
                break;
            }
            if self
                .msg(tag)
                .is_none_or(|m| matches!(m.state, State::InFlight { .. }))
            {
                continue;
            }
            let Some(mut m) = self.take(tag) else {
                continue;
            };
            m.queue = target;
            let (jid, queue) = (m.jid, self.queues[target as usize].name.clone());
            self.record(|| Journal::Moved {
                jid,
                queue,
                dead: None,
            });
            m.dead = None;
            m.attempts = 0;
            m.max_attempts = u32::MAX;
            m.last_error = None;
            m.timer = m.timer.wrapping_add(1);
            self.insert(now, m, None);
            moved += 1;
        }
        moved
    }

    /// Counters of `queue`.
    pub fn stats(&self, queue: &str) -> QueueStats {
        let Some(q) = self.by_name.get(queue).map(|i| &self.queues[*i as usize]) else {
            return QueueStats::default();
        };
        QueueStats {
            waiting: q.held - q.in_flight,
            in_flight: q.in_flight,
            consumers: q
                .consumers
                .iter()
                .filter(|ci| {
                    self.consumers[**ci as usize]
                        .as_ref()
                        .is_some_and(|c| c.options.prefetch > 0)
                })
                .count(),
            ..q.stats.clone()
        }
    }

    /// Names of the queues with messages or consumers.
    pub fn names(&self) -> impl Iterator<Item = &Arc<str>> + '_ {
        self.queues
            .iter()
            .filter(|q| q.held > 0 || !q.consumers.is_empty())
            .map(|q| &q.name)
    }

    /// Names of every queue this host has made (queues are never
    /// forgotten, so their counters only grow).
    pub fn all_names(&self) -> impl Iterator<Item = &Arc<str>> + '_ {
        self.queues.iter().map(|q| &q.name)
    }

    /// Messages held over every queue.
    pub fn len(&self) -> usize {
        self.held
    }

    /// Whether no queue holds a message.
    pub fn is_empty(&self) -> bool {
        self.held == 0
    }
}

fn truncate(s: &str) -> String {
    let mut end = s.len().min(MAX_ERROR_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::test_origin;

    type Q = Queues<&'static str>;

    fn node() -> crate::core::NodeId {
        // Any id: the queue never looks inside it.
        libp2p::PeerId::random()
    }

    fn msg(seq: u64, payload: &str) -> NewMessage {
        NewMessage {
            id: MessageId {
                publisher: node(),
                seq,
            },
            headers: Vec::new(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            not_before: None,
            expires: None,
            dedup_key: None,
        }
    }

    fn opts(prefetch: u32) -> ConsumerOptions {
        ConsumerOptions {
            prefetch,
            visibility_timeout: Duration::from_secs(30),
            max_attempts: 3,
        }
    }

    /// Journaling: each change to the messages held is recorded once, in
    /// order, and a restore from the journal gives the same queues.
    #[test]
    fn journal_records_every_change_and_restores() {
        let (now, mut q) = consumed_by_a(10);
        q.set_journal(true);
        for i in 0..4 {
            q.send(now, "jobs", msg(i, &format!("m{i}"))).unwrap();
        }
        let ds = drain(&mut q, now);
        assert!(q.ack(ds[0].tag, &"a"));
        assert!(q.reject(now, ds[1].tag, &"a", "bad"));
        let mut j = Vec::new();
        q.drain_journal(&mut j);
        let kinds: Vec<String> = j
            .iter()
            .map(|e| match e {
                Journal::Stored { jid, queue, .. } => format!("put {jid} {queue}"),
                Journal::Moved { jid, queue, dead } => {
                    format!("move {jid} {queue} {:?}", dead.as_ref().map(|d| &d.1))
                }
                Journal::Removed { jid } => format!("del {jid}"),
                Journal::Dedup { queue, key, .. } => format!("dedup {queue} {key}"),
                Journal::DedupGone { queue, key } => format!("forget {queue} {key}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "put 1 jobs",
                "put 2 jobs",
                "put 3 jobs",
                "put 4 jobs",
                "del 1",
                "move 2 jobs.dlq Some(\"bad\")"
            ]
        );
        q.drain_journal(&mut j);
        assert_eq!(j.len(), 6, "drained once");

        // A new host restored from what is left: 3 and 4 (2 dead).
        let mut r = Q::new(Config::default());
        r.set_journal(true);
        for e in &j {
            if let Journal::Stored { jid, queue, msg } = e {
                if *jid >= 3 {
                    r.restore(now, queue, *jid, msg.clone(), None);
                }
            }
        }
        r.restore(now, "jobs.dlq", 2, msg(1, "m1"), Some((1, "bad".into())));
        let mut none = Vec::new();
        r.drain_journal(&mut none);
        assert!(none.is_empty(), "restores are not journaled again");
        r.set_consumer("jobs", "b", opts(10)).unwrap();
        let got: Vec<Bytes> = drain(&mut r, now).into_iter().map(|d| d.payload).collect();
        assert_eq!(got, ["m2", "m3"]);
        assert_eq!(r.stats("jobs.dlq").waiting, 1);
        // New messages get ids after the restored ones.
        r.send(now, "jobs", msg(9, "m9")).unwrap();
        r.drain_journal(&mut none);
        assert!(matches!(none[..], [Journal::Stored { jid: 5, .. }]));
    }

    /// Dedup keys are journaled when remembered and when forgotten, so a
    /// durable host keeps them for their window after their message is
    /// gone; restored keys drop repeats until their stored end.
    #[test]
    fn dedup_keys_are_journaled_and_restored() {
        let (now, mut q) = consumed_by_a(10);
        q.set_journal(true);
        let keyed = |seq, key: &str| {
            let mut m = msg(seq, "x");
            m.dedup_key = Some(key.into());
            m
        };
        q.send(now, "jobs", keyed(1, "k1")).unwrap();
        let window = q.config().dedup_window;
        let later = now + window + Duration::from_secs(1);
        q.send(later, "jobs", keyed(2, "k2")).unwrap();
        let mut j = Vec::new();
        q.drain_journal(&mut j);
        let keys: Vec<String> = j
            .iter()
            .filter_map(|e| match e {
                Journal::Dedup { key, until, .. } => Some(format!("+{key}@{:?}", *until - now)),
                Journal::DedupGone { key, .. } => Some(format!("-{key}")),
                _ => None,
            })
            .collect();
        let w2 = window + Duration::from_secs(1) + window;
        assert_eq!(
            keys,
            [
                format!("+k1@{window:?}"),
                "-k1".into(),
                format!("+k2@{w2:?}")
            ]
        );

        let mut r = Q::new(Config::default());
        r.restore_dedup(now, "jobs", "k3".into(), now + Duration::from_secs(5));
        r.restore_dedup(now, "jobs", "old".into(), now);
        assert_eq!(r.send(now, "jobs", keyed(3, "k3")), Ok(Accepted::Duplicate));
        assert_eq!(r.send(now, "jobs", keyed(4, "old")), Ok(Accepted::Queued));
        let after = now + Duration::from_secs(6);
        assert_eq!(r.send(after, "jobs", keyed(5, "k3")), Ok(Accepted::Queued));
    }

    /// A fresh host whose queue `jobs` has consumer `a` with `prefetch`.
    fn consumed_by_a(prefetch: u32) -> (Instant, Q) {
        let mut q = Q::new(Config::default());
        q.set_consumer("jobs", "a", opts(prefetch)).unwrap();
        (test_origin(), q)
    }

    fn drain(q: &mut Q, now: Instant) -> Vec<Dispatch<&'static str>> {
        std::iter::from_fn(|| q.poll_dispatch(now)).collect()
    }

    fn payloads(d: &[Dispatch<&'static str>]) -> Vec<String> {
        d.iter()
            .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
            .collect()
    }

    #[test]
    fn messages_wait_for_a_consumer_and_respect_its_credit() {
        let t0 = test_origin();
        let mut q = Q::new(Config::default());
        for i in 0..5 {
            assert_eq!(
                q.send(t0, "jobs", msg(i, &format!("m{i}"))),
                Ok(Accepted::Queued)
            );
        }
        assert!(drain(&mut q, t0).is_empty(), "no consumer yet");
        q.set_consumer("jobs", "a", opts(2)).unwrap();
        let first = drain(&mut q, t0);
        assert_eq!(payloads(&first), ["m0", "m1"]);
        assert!(q.ack(first[0].tag, &"a"));
        let next = drain(&mut q, t0);
        assert_eq!(payloads(&next), ["m2"], "one credit freed, one message");
        let s = q.stats("jobs");
        assert_eq!((s.waiting, s.in_flight, s.acked), (2, 2, 1));
    }

    #[test]
    fn the_consumer_with_most_free_credit_wins_round_robin_among_equals() {
        let (t0, mut q) = consumed_by_a(1);
        q.set_consumer("jobs", "b", opts(1)).unwrap();
        q.set_consumer("jobs", "c", opts(3)).unwrap();
        for i in 0..5 {
            q.send(t0, "jobs", msg(i, "x")).unwrap();
        }
        let got: Vec<&str> = drain(&mut q, t0).iter().map(|d| d.consumer).collect();
        // c has 3 free, then 2; then a, b and c have 1 each, taken in turn.
        assert_eq!(got[..2], ["c", "c"]);
        let mut rest = got[2..].to_vec();
        rest.sort();
        assert_eq!(rest, ["a", "b", "c"]);
    }

    #[test]
    fn unacked_messages_come_back_after_the_visibility_timeout() {
        let (t0, mut q) = consumed_by_a(1);
        q.send(t0, "jobs", msg(1, "x")).unwrap();
        let d = drain(&mut q, t0);
        assert_eq!(d[0].attempt, 1);
        assert_eq!(q.poll_timeout(), Some(t0 + Duration::from_secs(30)));
        q.handle_timeout(t0 + Duration::from_secs(29));
        assert!(drain(&mut q, t0 + Duration::from_secs(29)).is_empty());
        let t1 = t0 + Duration::from_secs(30);
        q.handle_timeout(t1);
        let again = drain(&mut q, t1);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].attempt, 2);
        assert_eq!(again[0].id, d[0].id);
        assert_eq!(q.stats("jobs").redelivered, 1);
    }

    #[test]
    fn extend_pushes_the_deadline_and_late_acks_of_waiting_messages_count() {
        let (t0, mut q) = consumed_by_a(1);
        q.send(t0, "jobs", msg(1, "x")).unwrap();
        let d = drain(&mut q, t0);
        assert!(q.extend(
            t0 + Duration::from_secs(20),
            d[0].tag,
            &"a",
            Duration::from_secs(30)
        ));
        q.handle_timeout(t0 + Duration::from_secs(30));
        assert_eq!(q.stats("jobs").in_flight, 1, "the old deadline is void");
        assert_eq!(q.poll_timeout(), Some(t0 + Duration::from_secs(50)));
        q.handle_timeout(t0 + Duration::from_secs(50));
        assert_eq!(q.stats("jobs").in_flight, 0);
        // Timed out, not yet redelivered: the consumer's late ack still
        // settles it.
        assert!(q.ack(d[0].tag, &"a"));
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn waiting_messages_are_settled_only_by_the_consumer_they_timed_out_from() {
        let (t0, mut q) = consumed_by_a(1);
        q.set_consumer("jobs", "b", opts(0)).unwrap();
        q.send(t0, "jobs", msg(1, "x")).unwrap();
        q.send(t0, "jobs", msg(2, "y")).unwrap();
        let d = drain(&mut q, t0);
        assert_eq!(d.len(), 1);
        // The second message was never delivered: no consumer of the queue
        // may settle it by guessing its tag (tags are slot numbers).
        let (i, generation) = split(d[0].tag);
        let guessed = (u64::from(generation) << 32) | (i as u64 + 1);
        assert!(!q.ack(guessed, &"a"));
        assert!(!q.ack(guessed, &"b"));
        q.handle_timeout(t0 + Duration::from_secs(30));
        // Timed out: another consumer of the queue cannot settle it, the
        // one it went to can.
        assert!(!q.ack(d[0].tag, &"b"));
        assert_eq!(q.stats("jobs").stale, 3);
        assert!(q.ack(d[0].tag, &"a"));
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn acks_from_a_consumer_that_lost_the_message_are_stale() {
        let (t0, mut q) = consumed_by_a(1);
        q.send(t0, "jobs", msg(1, "x")).unwrap();
        let d = drain(&mut q, t0);
        q.set_consumer("jobs", "b", opts(1)).unwrap();
        q.set_consumer("jobs", "a", opts(0)).unwrap();
        q.handle_timeout(t0 + Duration::from_secs(30));
        let again = drain(&mut q, t0 + Duration::from_secs(30));
        assert_eq!(again[0].consumer, "b");
        assert!(!q.ack(d[0].tag, &"a"));
        assert!(!q.nack(t0, d[0].tag, &"a", None));
        assert_eq!(q.stats("jobs").stale, 2);
        assert!(q.ack(again[0].tag, &"b"));
    }

    #[test]
    fn nack_redelivers_after_its_delay_and_first() {
        let (t0, mut q) = consumed_by_a(1);
        q.send(t0, "jobs", msg(1, "m1")).unwrap();
        q.send(t0, "jobs", msg(2, "m2")).unwrap();
        let d = drain(&mut q, t0);
        assert!(q.nack(t0, d[0].tag, &"a", None));
        // No delay: it goes again before m2 (FIFO with prefetch 1).
        let again = drain(&mut q, t0);
        assert_eq!(payloads(&again), ["m1"]);
        assert!(q.nack(t0, again[0].tag, &"a", Some(Duration::from_secs(5))));
        assert_eq!(
            payloads(&drain(&mut q, t0)),
            ["m2"],
            "m1 waits out its delay"
        );
        assert!(q.poll_dispatch(t0).is_none(), "m2 holds the one credit");
    }

    #[test]
    fn delayed_sends_wait() {
        let (t0, mut q) = consumed_by_a(10);
        let mut m = msg(1, "later");
        m.not_before = Some(t0 + Duration::from_secs(2));
        q.send(t0, "jobs", m).unwrap();
        q.send(t0, "jobs", msg(2, "now")).unwrap();
        assert_eq!(payloads(&drain(&mut q, t0)), ["now"]);
        assert_eq!(q.poll_timeout(), Some(t0 + Duration::from_secs(2)));
        q.handle_timeout(t0 + Duration::from_secs(2));
        assert_eq!(
            payloads(&drain(&mut q, t0 + Duration::from_secs(2))),
            ["later"]
        );
    }

    #[test]
    fn max_attempts_and_reject_dead_letter_with_the_count_and_reason() {
        let (t0, mut q) = consumed_by_a(1);
        q.send(t0, "jobs", msg(1, "poison")).unwrap();
        for attempt in 1..=3 {
            let d = drain(&mut q, t0);
            assert_eq!(d.len(), 1);
            assert_eq!(d[0].attempt, attempt);
            assert!(q.nack(t0, d[0].tag, &"a", None));
        }
        assert!(drain(&mut q, t0).is_empty());
        assert_eq!(q.stats("jobs").dead_lettered, 1);
        let dead = q.peek("jobs.dlq", 10);
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].dead, Some((3, "nacked after 3 attempts".into())));
        q.send(t0, "jobs", msg(2, "bad")).unwrap();
        let d = drain(&mut q, t0);
        assert!(q.reject(t0, d[0].tag, &"a", "cannot parse"));
        assert_eq!(
            q.peek("jobs.dlq", 10)[1].dead,
            Some((1, "cannot parse".into()))
        );
        // The dead-letter queue is a queue: consumed like any other.
        q.set_consumer("jobs.dlq", "d", opts(10)).unwrap();
        let dl = drain(&mut q, t0);
        assert_eq!(payloads(&dl), ["poison", "bad"]);
        assert_eq!(dl[0].dead, Some((3, "nacked after 3 attempts".into())));
        assert!(q.ack(dl[0].tag, &"d"));
        // Replay moves the rest back, as new.
        q.remove_consumers(t0, |k| *k == "d");
        assert_eq!(q.replay_dead_letters(t0, "jobs"), 1);
        let back = drain(&mut q, t0);
        assert_eq!(payloads(&back), ["bad"]);
        assert_eq!((back[0].attempt, back[0].dead.clone()), (1, None));
    }

    #[test]
    fn a_lost_consumer_gives_everything_back_at_once_in_order() {
        let (t0, mut q) = consumed_by_a(3);
        for i in 0..4 {
            q.send(t0, "jobs", msg(i, &format!("m{i}"))).unwrap();
        }
        assert_eq!(drain(&mut q, t0).len(), 3);
        q.set_consumer("jobs", "b", opts(10)).unwrap();
        assert_eq!(payloads(&drain(&mut q, t0)), ["m3"]);
        q.remove_consumers(t0, |k| *k == "a");
        let back = drain(&mut q, t0);
        assert_eq!(payloads(&back), ["m0", "m1", "m2"]);
        assert!(back.iter().all(|d| d.consumer == "b" && d.attempt == 2));
    }

    #[test]
    fn released_messages_come_back_without_spending_an_attempt() {
        let (t0, mut q) = consumed_by_a(1);
        q.send(t0, "jobs", msg(1, "x")).unwrap();
        for _ in 0..5 {
            let d = drain(&mut q, t0);
            assert_eq!(d[0].attempt, 1, "a release is not an attempt");
            assert!(q.release(t0, d[0].tag, &"a"));
        }
        assert_eq!(q.stats("jobs").dead_lettered, 0);
    }

    #[test]
    fn waiting_messages_are_acked_only_by_a_consumer_of_their_queue() {
        let (t0, mut q) = consumed_by_a(1);
        q.send(t0, "jobs", msg(1, "x")).unwrap();
        let d = drain(&mut q, t0);
        q.handle_timeout(t0 + Duration::from_secs(30));
        // Waiting again: a stranger's ack (a guessed tag) does nothing.
        assert!(!q.ack(d[0].tag, &"stranger"));
        assert!(q.ack(d[0].tag, &"a"));
    }

    #[test]
    fn huge_durations_and_a_changed_timeout_are_safe() {
        let t0 = test_origin();
        let mut q = Q::new(Config::default());
        let mut o = opts(2);
        o.visibility_timeout = Duration::MAX;
        q.set_consumer("jobs", "a", o).unwrap();
        let m = NewMessage {
            not_before: None,
            ..msg(1, "x")
        };
        q.send(t0, "jobs", m).unwrap();
        let d = drain(&mut q, t0);
        assert!(q.extend(t0, d[0].tag, &"a", Duration::MAX));
        assert!(q.nack(t0, d[0].tag, &"a", Some(Duration::MAX)));
        // A shorter timeout for later deliveries still fires on time.
        q.set_consumer("jobs", "a", opts(2)).unwrap();
        q.send(t0, "jobs", msg(2, "y")).unwrap();
        let d = drain(&mut q, t0);
        assert_eq!(payloads(&d), ["y"]);
        assert_eq!(q.poll_timeout(), Some(t0 + Duration::from_secs(30)));
    }

    #[test]
    fn queues_and_total_messages_are_bounded() {
        let t0 = test_origin();
        let mut q = Q::new(Config {
            max_queues: 2,
            max_total_messages: 3,
            ..Config::default()
        });
        q.send(t0, "a", msg(1, "x")).unwrap();
        q.send(t0, "b", msg(2, "x")).unwrap();
        assert_eq!(
            q.send(t0, "c", msg(3, "x")),
            Err(SendError::TooManyQueues { limit: 2 })
        );
        assert!(q.set_consumer("c", "k", opts(1)).is_err());
        q.send(t0, "a", msg(4, "x")).unwrap();
        assert!(matches!(
            q.send(t0, "b", msg(5, "x")),
            Err(SendError::Full { limit: 3, .. })
        ));
    }

    #[test]
    fn dedup_keys_drop_repeats_within_the_window_only() {
        let t0 = test_origin();
        let mut q = Q::new(Config {
            dedup_window: Duration::from_secs(60),
            ..Config::default()
        });
        let keyed = |seq| NewMessage {
            dedup_key: Some("order-7".into()),
            ..msg(seq, "x")
        };
        assert_eq!(q.send(t0, "jobs", keyed(1)), Ok(Accepted::Queued));
        assert_eq!(
            q.send(t0 + Duration::from_secs(59), "jobs", keyed(2)),
            Ok(Accepted::Duplicate)
        );
        assert_eq!(
            q.send(t0 + Duration::from_secs(60), "jobs", keyed(3)),
            Ok(Accepted::Queued)
        );
        let s = q.stats("jobs");
        assert_eq!((s.accepted, s.deduplicated, s.waiting), (2, 1, 2));
    }

    #[test]
    fn dedup_keys_are_bounded() {
        let t0 = test_origin();
        let mut q = Q::new(Config {
            max_dedup_keys: 2,
            ..Config::default()
        });
        for (i, key) in ["a", "b", "c"].into_iter().enumerate() {
            let m = NewMessage {
                dedup_key: Some(key.into()),
                ..msg(i as u64, "x")
            };
            q.send(t0, "jobs", m).unwrap();
        }
        let again = NewMessage {
            dedup_key: Some("a".into()),
            ..msg(9, "x")
        };
        assert_eq!(
            q.send(t0, "jobs", again),
            Ok(Accepted::Queued),
            "a was evicted"
        );
        assert_eq!(q.stats("jobs").dedup_evicted, 2);
    }

    #[test]
    fn the_host_s_bytes_are_bounded_and_freed_by_acks() {
        let t0 = test_origin();
        let big = "x".repeat(1000);
        let one = 1000 + MESSAGE_OVERHEAD;
        let mut q = Q::new(Config {
            max_total_bytes: 2 * one,
            ..Config::default()
        });
        q.send(t0, "a", msg(1, &big)).unwrap();
        q.send(t0, "b", msg(2, &big)).unwrap();
        assert_eq!(
            q.send(t0, "a", msg(3, &big)),
            Err(SendError::HostFull {
                queue: "a".into(),
                limit: 2 * one
            })
        );
        // Small ones do not fit either: the bound is the host's.
        assert!(matches!(
            q.send(t0, "c", msg(4, "x")),
            Err(SendError::HostFull { .. })
        ));
        q.set_consumer("a", "k", opts(5)).unwrap();
        let d = drain(&mut q, t0);
        q.ack(d[0].tag, &"k");
        assert_eq!(q.send(t0, "a", msg(5, &big)), Ok(Accepted::Queued));
    }

    #[test]
    fn a_full_queue_refuses_sends() {
        let t0 = test_origin();
        let mut q = Q::new(Config {
            max_messages: 2,
            ..Config::default()
        });
        q.send(t0, "jobs", msg(1, "x")).unwrap();
        q.send(t0, "jobs", msg(2, "x")).unwrap();
        assert_eq!(
            q.send(t0, "jobs", msg(3, "x")),
            Err(SendError::Full {
                queue: "jobs".into(),
                limit: 2
            })
        );
        assert_eq!(q.send(t0, "other", msg(4, "x")), Ok(Accepted::Queued));
        q.set_consumer("jobs", "a", opts(5)).unwrap();
        let d = drain(&mut q, t0);
        q.ack(d[0].tag, &"a");
        assert_eq!(q.send(t0, "jobs", msg(5, "x")), Ok(Accepted::Queued));
    }

    #[test]
    fn expired_messages_are_dead_lettered_not_delivered() {
        let t0 = test_origin();
        let mut q = Q::new(Config::default());
        let m = NewMessage {
            expires: Some(t0 + Duration::from_secs(1)),
            ..msg(1, "stale")
        };
        q.send(t0, "jobs", m).unwrap();
        q.send(t0, "jobs", msg(2, "fresh")).unwrap();
        q.set_consumer("jobs", "a", opts(5)).unwrap();
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(payloads(&drain(&mut q, t1)), ["fresh"]);
        assert_eq!(q.peek("jobs.dlq", 5)[0].dead, Some((0, "expired".into())));
    }

    /// A full dead-letter queue drops nothing: the message stays in its
    /// queue, counted, and is offered again later; once the dead-letter
    /// queue has room it moves there.
    #[test]
    fn a_full_dead_letter_queue_keeps_the_message_in_its_queue() {
        let t0 = test_origin();
        let mut q = Q::new(Config {
            max_messages: 1,
            ..Config::default()
        });
        q.set_consumer("jobs", "a", opts(5)).unwrap();
        q.send(t0, "jobs", msg(1, "poison 1")).unwrap();
        let d = drain(&mut q, t0);
        assert!(q.reject(t0, d[0].tag, &"a", "bad"));
        assert_eq!(q.stats("jobs.dlq").waiting, 1, "the DLQ is full now");
        q.send(t0, "jobs", msg(2, "poison 2")).unwrap();
        let d = drain(&mut q, t0);
        assert!(q.reject(t0, d[0].tag, &"a", "bad"));
        assert_eq!(q.stats("jobs").waiting, 1, "kept, not dropped");
        assert_eq!(q.stats("jobs").dead_letters_dropped, 1);
        assert!(drain(&mut q, t0).is_empty(), "not at once");
        let t1 = t0 + DLQ_FULL_RETRY;
        q.handle_timeout(t1);
        let again = drain(&mut q, t1);
        assert_eq!(payloads(&again), ["poison 2"]);
        // The DLQ has room again: the next reject moves it there.
        q.set_consumer("jobs.dlq", "b", opts(1)).unwrap();
        let dead = drain(&mut q, t1);
        assert_eq!(payloads(&dead), ["poison 1"]);
        assert!(q.ack(dead[0].tag, &"b"));
        assert!(q.reject(t1, again[0].tag, &"a", "bad"));
        assert_eq!(q.stats("jobs.dlq").waiting, 1);
        assert_eq!(q.peek("jobs.dlq", 5)[0].payload, "poison 2");
    }

    #[test]
    fn cancelling_a_consumer_keeps_its_messages_until_acked() {
        let (t0, mut q) = consumed_by_a(1);
        q.send(t0, "jobs", msg(1, "m1")).unwrap();
        q.send(t0, "jobs", msg(2, "m2")).unwrap();
        let d = drain(&mut q, t0);
        q.set_consumer("jobs", "a", opts(0)).unwrap();
        assert_eq!(q.stats("jobs").consumers, 0);
        assert!(q.ack(d[0].tag, &"a"));
        assert!(drain(&mut q, t0).is_empty(), "m2 waits for a consumer");
        assert_eq!(q.stats("jobs").waiting, 1);
    }
}
