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

/// Longest reason kept with a nack or reject.
pub const MAX_ERROR_LEN: usize = 1024;

/// The dead-letter queue of `queue`.
pub fn dlq_name(queue: &str) -> String {
    format!("{queue}{DLQ_SUFFIX}")
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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_messages: 1_000_000,
            dedup_window: Duration::from_secs(300),
            max_dedup_keys: 100_000,
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

/// Why a send was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The queue holds its limit of messages.
    #[error("queue {queue:?} is full ({limit} messages)")]
    Full {
        /// The queue.
        queue: String,
        /// Its limit.
        limit: usize,
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
    /// Messages acked.
    pub acked: u64,
    /// Deliveries after the first.
    pub redelivered: u64,
    /// Messages moved to the dead-letter queue.
    pub dead_lettered: u64,
    /// Messages dropped because the dead-letter queue was full.
    pub dead_letters_dropped: u64,
    /// Dedup keys forgotten before their window ended.
    pub dedup_evicted: u64,
    /// Acks, nacks and extends for messages not in flight to that consumer
    /// (stale: it timed out and went elsewhere).
    pub stale: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State<K> {
    Ready,
    Delayed(Instant),
    InFlight { consumer: K, deadline: Instant },
}

#[derive(Debug)]
struct Msg<K> {
    id: MessageId,
    headers: Vec<(String, Bytes)>,
    payload: Bytes,
    expires: Option<Instant>,
    attempts: u32,
    /// The max attempts of the consumer it last went to.
    max_attempts: u32,
    last_error: Option<String>,
    dead: Option<(u32, String)>,
    state: State<K>,
    /// Bumped on every state change; timers carry it, so a stale timer is
    /// told apart.
    generation: u32,
}

#[derive(Debug)]
struct Consumer<K> {
    key: K,
    options: ConsumerOptions,
    in_flight: u32,
}

#[derive(Debug)]
struct Queue<K> {
    name: Arc<str>,
    msgs: FxHashMap<u64, Msg<K>>,
    /// Tags of messages ready for the first time, in acceptance order.
    fresh: VecDeque<u64>,
    /// Tags of messages that came back (or whose delay ended): they go
    /// before `fresh` ones accepted later, smallest (oldest) first.
    again: BTreeSet<u64>,
    consumers: Vec<Consumer<K>>,
    /// Where the round-robin among equally free consumers starts.
    cursor: usize,
    dedup: FxHashMap<String, Instant>,
    dedup_order: VecDeque<(Instant, String)>,
    stats: QueueStats,
}

impl<K: Clone + Eq + Hash> Queue<K> {
    fn new(name: Arc<str>) -> Self {
        Self {
            name,
            msgs: FxHashMap::default(),
            fresh: VecDeque::new(),
            again: BTreeSet::new(),
            consumers: Vec::new(),
            cursor: 0,
            dedup: FxHashMap::default(),
            dedup_order: VecDeque::new(),
            stats: QueueStats::default(),
        }
    }

    fn next_ready(&mut self) -> Option<u64> {
        loop {
            let fresh = self.fresh.front().copied();
            let again = self.again.first().copied();
            let tag = match (fresh, again) {
                (Some(f), Some(a)) if a < f => self.again.pop_first(),
                (Some(_), _) => self.fresh.pop_front(),
                (None, Some(_)) => self.again.pop_first(),
                (None, None) => return None,
            }?;
            // Entries of messages acked meanwhile (acks of messages that had
            // come back) are skipped.
            if self
                .msgs
                .get(&tag)
                .is_some_and(|m| matches!(m.state, State::Ready))
            {
                return Some(tag);
            }
        }
    }

    fn has_ready(&self) -> bool {
        !self.fresh.is_empty() || !self.again.is_empty()
    }

    /// The consumer with the most free credit, round-robin among equals.
    fn pick(&mut self) -> Option<usize> {
        let n = self.consumers.len();
        let mut best: Option<(usize, u32)> = None;
        for i in 0..n {
            let at = (self.cursor + i) % n;
            let c = &self.consumers[at];
            let free = c.options.prefetch.saturating_sub(c.in_flight);
            if free > 0 && best.is_none_or(|(_, f)| free > f) {
                best = Some((at, free));
            }
        }
        let (at, _) = best?;
        self.cursor = (at + 1) % n;
        Some(at)
    }

    fn remember_dedup(&mut self, now: Instant, key: String, config: &Config) {
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
            }
        }
        let until = now + config.dedup_window;
        self.dedup.insert(key.clone(), until);
        self.dedup_order.push_back((until, key));
    }
}

/// Why a consumer could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsumerError {
    /// The queue has [`MAX_CONSUMERS_PER_QUEUE`] consumers.
    #[error("queue {queue:?} has the limit of {MAX_CONSUMERS_PER_QUEUE} consumers")]
    TooMany {
        /// The queue.
        queue: String,
    },
}

/// Every queue a node hosts.
#[derive(Debug)]
pub struct Queues<K> {
    config: Config,
    queues: FxHashMap<Arc<str>, Queue<K>>,
    /// Tag -> queue holding it.
    tags: FxHashMap<u64, Arc<str>>,
    next_tag: u64,
    /// (due, tag, generation): visibility deadlines and delays.
    timers: BinaryHeap<Reverse<(Instant, u64, u32)>>,
    /// Queues that may have something to dispatch.
    dirty: Vec<Arc<str>>,
}

impl<K: Clone + Eq + Hash> Queues<K> {
    /// No queues yet.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            queues: FxHashMap::default(),
            tags: FxHashMap::default(),
            next_tag: 0,
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
        }
    }

    fn queue_mut(&mut self, name: &str) -> &mut Queue<K> {
        if !self.queues.contains_key(name) {
            let name: Arc<str> = name.into();
            self.queues.insert(name.clone(), Queue::new(name));
        }
        self.queues.get_mut(name).expect("inserted above")
    }

    fn mark(&mut self, name: &Arc<str>) {
        if !self.dirty.iter().any(|d| d == name) {
            self.dirty.push(name.clone());
        }
    }

    /// The limits.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether `queue` has room for one more message.
    pub fn has_room(&self, queue: &str) -> bool {
        self.queues
            .get(queue)
            .is_none_or(|q| q.msgs.len() < self.config.max_messages)
    }

    /// Queues `msg` on `queue`.
    pub fn send(
        &mut self,
        now: Instant,
        queue: &str,
        msg: NewMessage,
    ) -> Result<Accepted, SendError> {
        let config = self.config.clone();
        let q = self.queue_mut(queue);
        if let Some(key) = &msg.dedup_key {
            if q.dedup.get(key).is_some_and(|until| *until > now) {
                q.stats.deduplicated += 1;
                return Ok(Accepted::Duplicate);
            }
        }
        if q.msgs.len() >= config.max_messages {
            q.stats.refused += 1;
            return Err(SendError::Full {
                queue: queue.to_owned(),
                limit: config.max_messages,
            });
        }
        if let Some(key) = msg.dedup_key {
            q.remember_dedup(now, key, &config);
        }
        q.stats.accepted += 1;
        let name = q.name.clone();
        self.insert(
            now,
            &name,
            Msg {
                id: msg.id,
                headers: msg.headers,
                payload: msg.payload,
                expires: msg.expires,
                attempts: 0,
                max_attempts: u32::MAX,
                last_error: None,
                dead: None,
                state: State::Ready,
                generation: 0,
            },
            msg.not_before,
        );
        Ok(Accepted::Queued)
    }

    /// Adds a message to `name` (which exists), ready or delayed.
    fn insert(
        &mut self,
        now: Instant,
        name: &Arc<str>,
        mut msg: Msg<K>,
        not_before: Option<Instant>,
    ) {
        self.next_tag += 1;
        let tag = self.next_tag;
        let Some(q) = self.queues.get_mut(name) else {
            return;
        };
        match not_before.filter(|t| *t > now) {
            Some(t) => {
                msg.state = State::Delayed(t);
                self.timers.push(Reverse((t, tag, msg.generation)));
            }
            None => {
                msg.state = State::Ready;
                q.fresh.push_back(tag);
            }
        }
        q.msgs.insert(tag, msg);
        self.tags.insert(tag, name.clone());
        self.mark(name);
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
        let q = self.queue_mut(queue);
        if let Some(c) = q.consumers.iter_mut().find(|c| c.key == key) {
            c.options = options;
        } else if options.prefetch > 0 {
            if q.consumers.len() >= MAX_CONSUMERS_PER_QUEUE {
                return Err(ConsumerError::TooMany {
                    queue: queue.to_owned(),
                });
            }
            q.consumers.push(Consumer {
                key,
                options,
                in_flight: 0,
            });
        }
        if options.prefetch == 0 {
            q.consumers
                .retain(|c| c.options.prefetch > 0 || c.in_flight > 0);
        }
        let name = q.name.clone();
        self.mark(&name);
        Ok(())
    }

    /// A consumer is gone (its node left or its link dropped): everything
    /// in flight to it comes back now. `matches` picks the consumers.
    pub fn remove_consumers(&mut self, now: Instant, matches: impl Fn(&K) -> bool) {
        let mut back = Vec::new();
        for q in self.queues.values_mut() {
            if !q.consumers.iter().any(|c| matches(&c.key)) {
                continue;
            }
            q.consumers.retain(|c| !matches(&c.key));
            for (tag, m) in &q.msgs {
                if let State::InFlight { consumer, .. } = &m.state {
                    if matches(consumer) {
                        back.push(*tag);
                    }
                }
            }
        }
        back.sort_unstable();
        for tag in back {
            self.give_back(now, tag, None, "consumer lost".into());
        }
    }

    /// Takes a message out of flight: frees its consumer's credit. Returns
    /// its queue.
    fn land(&mut self, tag: u64) -> Option<Arc<str>> {
        let name = self.tags.get(&tag)?.clone();
        let q = self.queues.get_mut(&name)?;
        let m = q.msgs.get_mut(&tag)?;
        if let State::InFlight { consumer, .. } = &m.state {
            if let Some(c) = q.consumers.iter_mut().find(|c| &c.key == consumer) {
                c.in_flight = c.in_flight.saturating_sub(1);
            }
            m.state = State::Ready;
            m.generation = m.generation.wrapping_add(1);
            q.consumers
                .retain(|c| c.options.prefetch > 0 || c.in_flight > 0);
        }
        self.mark(&name);
        Some(name)
    }

    /// Whether `tag` is in flight to `consumer`, or waiting (came back, so
    /// an ack of it still counts); `None` for stale and unknown tags.
    fn owned_by(&mut self, tag: u64, consumer: &K) -> Option<()> {
        let name = self.tags.get(&tag)?;
        let q = self.queues.get_mut(name)?;
        let m = q.msgs.get(&tag)?;
        match &m.state {
            State::InFlight { consumer: c, .. } if c == consumer => Some(()),
            State::InFlight { .. } => {
                q.stats.stale += 1;
                None
            }
            _ => Some(()),
        }
    }

    /// `consumer` processed `tag`: the message is gone. Acks of messages
    /// that timed out and wait for redelivery count too; acks of messages
    /// in flight to another consumer are stale and ignored. Returns whether
    /// it was taken.
    pub fn ack(&mut self, tag: u64, consumer: &K) -> bool {
        if self.owned_by(tag, consumer).is_none() {
            return false;
        }
        let Some(name) = self.land(tag) else {
            return false;
        };
        self.tags.remove(&tag);
        if let Some(q) = self.queues.get_mut(&name) {
            q.msgs.remove(&tag);
            q.stats.acked += 1;
        }
        true
    }

    /// `consumer` gives `tag` back, to be delivered again after `delay`
    /// (dead-lettered if that was its last attempt).
    pub fn nack(&mut self, now: Instant, tag: u64, consumer: &K, delay: Option<Duration>) -> bool {
        if !self.in_flight_to(tag, consumer) {
            return false;
        }
        self.give_back(now, tag, delay, "nacked".into());
        true
    }

    /// `consumer` refuses `tag`: straight to the dead-letter queue.
    pub fn reject(&mut self, now: Instant, tag: u64, consumer: &K, reason: &str) -> bool {
        if !self.in_flight_to(tag, consumer) {
            return false;
        }
        let Some(name) = self.land(tag) else {
            return false;
        };
        self.dead_letter(now, &name, tag, truncate(reason));
        true
    }

    /// `consumer` keeps working on `tag`: its visibility timeout restarts
    /// at `by` from now.
    pub fn extend(&mut self, now: Instant, tag: u64, consumer: &K, by: Duration) -> bool {
        if !self.in_flight_to(tag, consumer) {
            return false;
        }
        let Some(m) = self
            .tags
            .get(&tag)
            .and_then(|n| self.queues.get_mut(n))
            .and_then(|q| q.msgs.get_mut(&tag))
        else {
            return false;
        };
        let deadline = now + by;
        if let State::InFlight { deadline: d, .. } = &mut m.state {
            *d = deadline;
        }
        m.generation = m.generation.wrapping_add(1);
        self.timers.push(Reverse((deadline, tag, m.generation)));
        true
    }

    fn in_flight_to(&mut self, tag: u64, consumer: &K) -> bool {
        let Some(q) = self.tags.get(&tag).and_then(|n| self.queues.get_mut(n)) else {
            return false;
        };
        let ok = q.msgs.get(&tag).is_some_and(
            |m| matches!(&m.state, State::InFlight { consumer: c, .. } if c == consumer),
        );
        if !ok {
            q.stats.stale += 1;
        }
        ok
    }

    /// A message leaves flight without an ack: back to the queue (after
    /// `delay`), or to the dead-letter queue after its last attempt.
    fn give_back(&mut self, now: Instant, tag: u64, delay: Option<Duration>, error: String) {
        let Some(name) = self.land(tag) else {
            return;
        };
        let Some(q) = self.queues.get_mut(&name) else {
            return;
        };
        let Some(m) = q.msgs.get_mut(&tag) else {
            return;
        };
        if m.attempts >= m.max_attempts {
            let reason = format!("{error} after {} attempts", m.attempts);
            self.dead_letter(now, &name, tag, reason);
            return;
        }
        m.last_error = Some(error);
        match delay.filter(|d| !d.is_zero()) {
            Some(d) => {
                let due = now + d;
                m.state = State::Delayed(due);
                self.timers.push(Reverse((due, tag, m.generation)));
            }
            None => {
                q.again.insert(tag);
            }
        }
    }

    /// Moves `tag` (not in flight) from `name` to `name.dlq`.
    fn dead_letter(&mut self, now: Instant, name: &Arc<str>, tag: u64, reason: String) {
        let Some(q) = self.queues.get_mut(name) else {
            return;
        };
        let Some(mut m) = q.msgs.remove(&tag) else {
            return;
        };
        self.tags.remove(&tag);
        q.stats.dead_lettered += 1;
        let limit = self.config.max_messages;
        let dlq = self.queue_mut(&dlq_name(name));
        if dlq.msgs.len() >= limit {
            dlq.stats.dead_letters_dropped += 1;
            if let Some(q) = self.queues.get_mut(name) {
                q.stats.dead_letters_dropped += 1;
            }
            return;
        }
        m.dead = Some((m.attempts, reason));
        m.attempts = 0;
        m.max_attempts = u32::MAX;
        m.last_error = None;
        m.generation = m.generation.wrapping_add(1);
        let dlq_name = dlq.name.clone();
        self.insert(now, &dlq_name, m, None);
    }

    /// The next message to hand to a consumer, if any queue has one ready
    /// and a consumer with credit.
    pub fn poll_dispatch(&mut self, now: Instant) -> Option<Dispatch<K>> {
        while let Some(name) = self.dirty.last().cloned() {
            let Some(q) = self.queues.get_mut(&name) else {
                self.dirty.pop();
                continue;
            };
            if !q.has_ready() || !q.consumers.iter().any(|c| c.in_flight < c.options.prefetch) {
                self.dirty.pop();
                continue;
            }
            let Some(tag) = q.next_ready() else {
                self.dirty.pop();
                continue;
            };
            let expired = q
                .msgs
                .get(&tag)
                .and_then(|m| m.expires)
                .is_some_and(|t| t <= now);
            if expired {
                self.dead_letter(now, &name, tag, "expired".into());
                continue;
            }
            let Some(at) = q.pick() else {
                // Credit was checked above; put it back and stop.
                q.again.insert(tag);
                self.dirty.pop();
                continue;
            };
            let c = &mut q.consumers[at];
            c.in_flight += 1;
            let consumer = c.key.clone();
            let deadline = now + c.options.visibility_timeout;
            let max_attempts = c.options.max_attempts.max(1);
            let Some(m) = q.msgs.get_mut(&tag) else {
                continue;
            };
            m.attempts += 1;
            m.max_attempts = max_attempts;
            m.generation = m.generation.wrapping_add(1);
            m.state = State::InFlight {
                consumer: consumer.clone(),
                deadline,
            };
            if m.attempts > 1 {
                q.stats.redelivered += 1;
            }
            self.timers.push(Reverse((deadline, tag, m.generation)));
            return Some(Dispatch {
                queue: name,
                consumer,
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

    /// When [`Queues::handle_timeout`] next has work.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        // Drop stale timers from the top so the driver is not woken for
        // nothing.
        while let Some(Reverse((at, tag, generation))) = self.timers.peek().copied() {
            if self.timer_live(tag, generation) {
                return Some(at);
            }
            self.timers.pop();
        }
        None
    }

    fn timer_live(&self, tag: u64, generation: u32) -> bool {
        self.tags
            .get(&tag)
            .and_then(|n| self.queues.get(n))
            .and_then(|q| q.msgs.get(&tag))
            .is_some_and(|m| m.generation == generation && !matches!(m.state, State::Ready))
    }

    /// Visibility timeouts and delays due by `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, tag, generation))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if !self.timer_live(tag, generation) {
                continue;
            }
            let Some(name) = self.tags.get(&tag).cloned() else {
                continue;
            };
            let Some(q) = self.queues.get_mut(&name) else {
                continue;
            };
            let Some(m) = q.msgs.get_mut(&tag) else {
                continue;
            };
            match m.state {
                State::Delayed(_) => {
                    m.state = State::Ready;
                    m.generation = m.generation.wrapping_add(1);
                    q.again.insert(tag);
                    self.mark(&name);
                }
                State::InFlight { .. } => {
                    self.give_back(now, tag, None, "visibility timeout".into())
                }
                State::Ready => {}
            }
        }
    }

    /// Up to `limit` messages of `queue`, oldest first, without taking them.
    pub fn peek(&self, queue: &str, limit: usize) -> Vec<Peeked> {
        let Some(q) = self.queues.get(queue) else {
            return Vec::new();
        };
        let mut tags: Vec<u64> = q.msgs.keys().copied().collect();
        tags.sort_unstable();
        tags.into_iter()
            .take(limit)
            .filter_map(|t| q.msgs.get(&t))
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
        let dlq = dlq_name(queue);
        let Some(d) = self.queues.get_mut(dlq.as_str()) else {
            return 0;
        };
        let mut tags: Vec<u64> = d
            .msgs
            .iter()
            .filter(|(_, m)| !matches!(m.state, State::InFlight { .. }))
            .map(|(t, _)| *t)
            .collect();
        tags.sort_unstable();
        let limit = self.config.max_messages;
        let target = self.queue_mut(queue).name.clone();
        let mut moved = 0;
        for tag in tags {
            if self
                .queues
                .get(&target)
                .is_none_or(|q| q.msgs.len() >= limit)
            {
                break;
            }
            let Some(mut m) = self
                .queues
                .get_mut(dlq.as_str())
                .and_then(|d| d.msgs.remove(&tag))
            else {
                continue;
            };
            self.tags.remove(&tag);
            m.dead = None;
            m.attempts = 0;
            m.max_attempts = u32::MAX;
            m.last_error = None;
            m.generation = m.generation.wrapping_add(1);
            self.insert(now, &target, m, None);
            moved += 1;
        }
        moved
    }

    /// Counters of `queue`.
    pub fn stats(&self, queue: &str) -> QueueStats {
        let Some(q) = self.queues.get(queue) else {
            return QueueStats::default();
        };
        let in_flight = q
            .msgs
            .values()
            .filter(|m| matches!(m.state, State::InFlight { .. }))
            .count();
        QueueStats {
            waiting: q.msgs.len() - in_flight,
            in_flight,
            consumers: q
                .consumers
                .iter()
                .filter(|c| c.options.prefetch > 0)
                .count(),
            ..q.stats.clone()
        }
    }

    /// Names of the queues with messages or consumers.
    pub fn names(&self) -> impl Iterator<Item = &Arc<str>> + '_ {
        self.queues
            .values()
            .filter(|q| !q.msgs.is_empty() || !q.consumers.is_empty())
            .map(|q| &q.name)
    }

    /// Messages held over every queue.
    pub fn len(&self) -> usize {
        self.tags.len()
    }

    /// Whether no queue holds a message.
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
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
    use crate::core::test_origin;

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
        let t0 = test_origin();
        let mut q = Q::new(Config::default());
        q.set_consumer("jobs", "a", opts(1)).unwrap();
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
        let t0 = test_origin();
        let mut q = Q::new(Config::default());
        q.set_consumer("jobs", "a", opts(1)).unwrap();
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
        let t0 = test_origin();
        let mut q = Q::new(Config::default());
        q.set_consumer("jobs", "a", opts(1)).unwrap();
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
        q.set_consumer("jobs", "a", opts(0)).unwrap();
        assert!(q.ack(d[0].tag, &"a"));
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn acks_from_a_consumer_that_lost_the_message_are_stale() {
        let t0 = test_origin();
        let mut q = Q::new(Config::default());
        q.set_consumer("jobs", "a", opts(1)).unwrap();
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
        let t0 = test_origin();
        let mut q = Q::new(Config::default());
        q.set_consumer("jobs", "a", opts(1)).unwrap();
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
        let t0 = test_origin();
        let mut q = Q::new(Config::default());
        q.set_consumer("jobs", "a", opts(10)).unwrap();
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
        let t0 = test_origin();
        let mut q = Q::new(Config::default());
        q.set_consumer("jobs", "a", opts(1)).unwrap();
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
        let t0 = test_origin();
        let mut q = Q::new(Config::default());
        q.set_consumer("jobs", "a", opts(3)).unwrap();
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

    #[test]
    fn cancelling_a_consumer_keeps_its_messages_until_acked() {
        let t0 = test_origin();
        let mut q = Q::new(Config::default());
        q.set_consumer("jobs", "a", opts(1)).unwrap();
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
