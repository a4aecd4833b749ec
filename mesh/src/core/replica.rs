//! A queue replicated over a Raft group: what its replicas copy, the
//! state the copies build, and the rules of a leader that serves.
//!
//! A queue and its dead-letter queue form one group (a message moves
//! between them, so they must share a log). Its host runs the queue core
//! ([`super::queue::Queues`]) as an unreplicated host does; each change
//! to the messages held (the core's [`Journal`], with times as Unix µs so
//! that another node's clock can read them) becomes a [`QueueOp`], and
//! the changes of one turn are one entry of the group's log. Every
//! replica applies committed entries to a [`QueueState`]; a store keeps
//! the same ops (see `engine::durable`), so one state serves both.
//!
//! [`QueueGroup`] puts the rules on top of [`Raft`]:
//! - **Confirm on commit.** What a turn confirms (sends accepted, also
//!   duplicates, whose original must be kept first) rides that turn's
//!   entry, and comes out as [`GroupOutput::Confirmed`] only once the
//!   entry is committed: a majority has it. A leader deposed before then
//!   reports the confirmations [`GroupOutput::Unknown`]: the entry may
//!   still commit under the next leader, or not, so the sender sends
//!   again (at-least-once; a dedup key makes it exactly one message).
//! - **Serve only with every committed change.** A new leader takes
//!   sends and consumers ([`GroupOutput::Serve`]) only once the first
//!   entry of its term is committed and applied: by then its state holds
//!   everything any earlier leader confirmed. It rebuilds its live queue
//!   from that state ([`QueueState::restore_into`]).
//! - **Stop at once when deposed.** A leader that steps down (a newer
//!   term, or check-quorum found no majority) gets [`GroupOutput::Stop`]
//!   and drops its live queue; its later changes could never commit.
//!
//! What is not replicated: deliveries in flight and their attempt counts.
//! After a failover, messages that were in flight are delivered again,
//! counted from their first attempt; an ack that was not committed when
//! the leader fell does not count, so its message is delivered again.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt::Debug,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use rand::RngCore;

use super::{
    pubsub::MessageId,
    queue::{Journal, NewMessage, Queues},
    raft::{self, Entry, HardState, Index, Members, Message, NotLeader, Payload, Raft, Role},
};

/// One change to a queue group's messages, as replicas and stores keep it.
/// A message is named by its journal id (`jid`), unique within its host's
/// run and kept by the replicas that copy it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueOp {
    /// A message was queued, with its times as Unix µs.
    Put {
        /// Its journal id.
        jid: u64,
        /// The queue.
        queue: Arc<str>,
        /// The message id.
        id: MessageId,
        /// Headers.
        headers: Vec<(String, Bytes)>,
        /// Payload.
        payload: Bytes,
        /// Not delivered before this.
        not_before_us: Option<i64>,
        /// Dead-lettered if not acked by then.
        expires_us: Option<i64>,
        /// Its dedup key.
        dedup: Option<String>,
    },
    /// A message moved: dead-lettered (attempts and reason), or replayed
    /// from the dead-letter queue (`None`).
    Move {
        /// Its journal id.
        jid: u64,
        /// The queue it is in now.
        queue: Arc<str>,
        /// Dead-letter details.
        dead: Option<(u32, String)>,
    },
    /// A message is gone (acked, or dropped from a full dead-letter queue).
    Del {
        /// Its journal id.
        jid: u64,
    },
    /// A dedup key is remembered until `until_us` (Unix µs).
    Dedup {
        /// The queue.
        queue: Arc<str>,
        /// The key.
        key: String,
        /// The end of its window.
        until_us: i64,
    },
    /// A dedup key is forgotten.
    DedupGone {
        /// The queue.
        queue: Arc<str>,
        /// The key.
        key: String,
    },
}

impl QueueOp {
    /// The op for journal entry `j`, its instants read by the clock's
    /// `now` and `now_us` (µs since the Unix epoch).
    pub fn from_journal(j: Journal, now: Instant, now_us: u64) -> Self {
        match j {
            Journal::Stored { jid, queue, msg } => QueueOp::Put {
                jid,
                queue,
                id: msg.id,
                headers: msg.headers,
                payload: msg.payload,
                not_before_us: msg.not_before.map(|t| to_unix(t, now, now_us)),
                expires_us: msg.expires.map(|t| to_unix(t, now, now_us)),
                dedup: msg.dedup_key,
            },
            Journal::Moved { jid, queue, dead } => QueueOp::Move { jid, queue, dead },
            Journal::Removed { jid } => QueueOp::Del { jid },
            Journal::Dedup { queue, key, until } => QueueOp::Dedup {
                queue,
                key,
                until_us: to_unix(until, now, now_us),
            },
            Journal::DedupGone { queue, key } => QueueOp::DedupGone { queue, key },
        }
    }
}

/// A message held, as a store or a replica keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its journal id.
    pub jid: u64,
    /// The queue it is in.
    pub queue: String,
    /// The message id.
    pub id: MessageId,
    /// Headers.
    pub headers: Vec<(String, Bytes)>,
    /// Payload.
    pub payload: Bytes,
    /// Not delivered before this (Unix µs).
    pub not_before_us: Option<i64>,
    /// Dead-lettered if not acked by then (Unix µs).
    pub expires_us: Option<i64>,
    /// Its dedup key.
    pub dedup: Option<String>,
    /// In a dead-letter queue: attempts before it died, and why.
    pub dead: Option<(u32, String)>,
}

/// The messages and dedup keys that a sequence of [`QueueOp`]s leaves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueState {
    messages: BTreeMap<u64, StoredMessage>,
    dedup: BTreeMap<(String, String), i64>,
}

impl QueueState {
    /// Applies one change. A move or removal of a message not held (it
    /// was queued and acked in one batch a store dropped) changes nothing.
    pub fn apply(&mut self, op: QueueOp) {
        match op {
            QueueOp::Put {
                jid,
                queue,
                id,
                headers,
                payload,
                not_before_us,
                expires_us,
                dedup,
            } => {
                self.messages.insert(
                    jid,
                    StoredMessage {
                        jid,
                        queue: queue.to_string(),
                        id,
                        headers,
                        payload,
                        not_before_us,
                        expires_us,
                        dedup,
                        dead: None,
                    },
                );
            }
            QueueOp::Move { jid, queue, dead } => {
                if let Some(m) = self.messages.get_mut(&jid) {
                    m.queue = queue.to_string();
                    m.dead = dead;
                }
            }
            QueueOp::Del { jid } => {
                self.messages.remove(&jid);
            }
            QueueOp::Dedup {
                queue,
                key,
                until_us,
            } => {
                self.dedup.insert((queue.to_string(), key), until_us);
            }
            QueueOp::DedupGone { queue, key } => {
                self.dedup.remove(&(queue.to_string(), key));
            }
        }
    }

    /// The messages held, in journal order.
    pub fn messages(&self) -> impl Iterator<Item = &StoredMessage> + '_ {
        self.messages.values()
    }

    /// The dedup keys: (queue, key, until as Unix µs).
    pub fn dedup_keys(&self) -> impl Iterator<Item = (&str, &str, i64)> + '_ {
        self.dedup
            .iter()
            .map(|((q, k), until)| (q.as_str(), k.as_str(), *until))
    }

    /// Number of messages held.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether no message is held.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Puts the messages and dedup keys back into a queue core, by the
    /// clock's `now` and `now_us` (see [`restore_messages`]).
    pub fn restore_into<K: Clone + Eq + std::hash::Hash>(
        &self,
        queues: &mut Queues<K>,
        now: Instant,
        now_us: u64,
    ) {
        restore_messages(
            queues,
            now,
            now_us,
            self.messages.values().cloned(),
            self.dedup_keys()
                .map(|(q, k, until)| (q.to_string(), k.to_string(), until)),
        );
    }
}

/// Puts stored messages (in journal order) and dedup keys (queue, key,
/// until as Unix µs) back into a queue core, reading their times by the
/// clock's `now` and `now_us`. Returns the names of the queues that hold
/// messages, sorted.
pub fn restore_messages<K: Clone + Eq + std::hash::Hash>(
    queues: &mut Queues<K>,
    now: Instant,
    now_us: u64,
    messages: impl IntoIterator<Item = StoredMessage>,
    dedup: impl IntoIterator<Item = (String, String, i64)>,
) -> Vec<Arc<str>> {
    let mut names: Vec<Arc<str>> = Vec::new();
    for m in messages {
        if names.last().is_none_or(|n| **n != *m.queue) {
            names.push(m.queue.as_str().into());
        }
        let msg = NewMessage {
            id: m.id,
            headers: m.headers,
            payload: m.payload,
            not_before: m.not_before_us.map(|t| from_unix(t, now, now_us)),
            expires: m.expires_us.map(|t| from_unix(t, now, now_us)),
            dedup_key: m.dedup,
        };
        queues.restore(now, &m.queue, m.jid, msg, m.dead);
    }
    for (queue, key, until_us) in dedup {
        queues.restore_dedup(now, &queue, key, from_unix(until_us, now, now_us));
    }
    names.sort_unstable();
    names.dedup();
    names
}

/// Unix µs of `at`, by the clock's `now` and `now_us`.
pub fn to_unix(at: Instant, now: Instant, now_us: u64) -> i64 {
    let us = if at >= now {
        now_us.saturating_add(at.duration_since(now).as_micros() as u64)
    } else {
        now_us.saturating_sub(now.duration_since(at).as_micros() as u64)
    };
    us.min(i64::MAX as u64) as i64
}

/// The instant of Unix µs `us`, by the clock's `now` and `now_us`.
pub fn from_unix(us: i64, now: Instant, now_us: u64) -> Instant {
    let us = us.max(0) as u64;
    if us >= now_us {
        super::queue::after(now, Duration::from_micros(us - now_us))
    } else {
        now.checked_sub(Duration::from_micros(now_us - us))
            .unwrap_or(now)
    }
}

/// One turn's changes, one log entry.
pub type Batch = Vec<QueueOp>;

/// What a queue group asks of its driver, in order.
#[derive(Debug)]
pub enum GroupOutput<N, T> {
    /// Write the hard state and log entries (see [`raft::Output::Persist`]);
    /// everything after depends on it.
    Persist {
        /// The term and vote.
        state: HardState<N>,
        /// Entries from `entries[0].index` on.
        entries: Vec<Entry<N, Batch>>,
    },
    /// Send `message` to replica `to`.
    Send {
        /// The replica.
        to: N,
        /// The message.
        message: Message<N, Batch>,
    },
    /// This replica leads and its state holds every committed change:
    /// rebuild the live queue from [`QueueGroup::state`] and serve.
    Serve,
    /// No longer the leader: drop the live queue.
    Stop,
    /// What a turn confirmed is committed: tell its senders.
    Confirmed(T),
    /// The turn's entry was not committed before this replica lost the
    /// lead: it may or may not commit later. Its senders must send again.
    Unknown(T),
    /// The role or the leader known changed.
    Role {
        /// The new role.
        role: Role,
        /// The leader it knows of.
        leader: Option<N>,
    },
}

/// Why a turn's changes were not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotServing<N> {
    /// The leader this replica knows of, if any.
    pub leader: Option<N>,
}

/// One replica of a replicated queue group.
#[derive(Debug)]
pub struct QueueGroup<N, T> {
    raft: Raft<N, Batch>,
    state: QueueState,
    /// The first entry of this replica's term as leader: it serves once
    /// that is applied.
    lead_from: Option<Index>,
    serving: bool,
    /// What this leader's turns confirm, by entry index, oldest first.
    pending: VecDeque<(Index, Vec<T>)>,
    out: VecDeque<GroupOutput<N, T>>,
}

impl<N, T> QueueGroup<N, T>
where
    N: Copy + Ord + Debug,
{
    /// A replica of the set `members` with what it had kept (`state`,
    /// `log`; empty for a new one). Its queue state is rebuilt as the
    /// leader tells it what is committed.
    pub fn new(
        id: N,
        members: Members<N>,
        config: raft::Config,
        state: HardState<N>,
        log: Vec<Entry<N, Batch>>,
        now: Instant,
        rng: &mut impl RngCore,
    ) -> Self {
        Self {
            raft: Raft::new(id, members, config, state, log, now, rng),
            state: QueueState::default(),
            lead_from: None,
            serving: false,
            pending: VecDeque::new(),
            out: VecDeque::new(),
        }
    }

    /// The consensus state (role, term, leader, log, progress).
    pub fn raft(&self) -> &Raft<N, Batch> {
        &self.raft
    }

    /// The messages and dedup keys of every committed change applied.
    pub fn state(&self) -> &QueueState {
        &self.state
    }

    /// Whether this replica leads with every committed change applied:
    /// it takes sends and consumers.
    pub fn serving(&self) -> bool {
        self.serving
    }

    /// One turn's changes and what they confirm (serving leaders only):
    /// the confirmations come out once the entry is committed. A turn
    /// with confirmations and no changes is an empty entry: it commits
    /// after every earlier one.
    pub fn propose(&mut self, ops: Batch, confirms: Vec<T>) -> Result<Index, NotServing<N>> {
        if !self.serving {
            return Err(NotServing {
                leader: self.raft.leader(),
            });
        }
        let index = match self.raft.propose(ops) {
            Ok(i) => i,
            Err(NotLeader::Leader(leader)) => return Err(NotServing { leader }),
        };
        if !confirms.is_empty() {
            self.pending.push_back((index, confirms));
        }
        self.pump();
        Ok(index)
    }

    /// A message from replica `from`.
    pub fn handle_message(
        &mut self,
        now: Instant,
        from: N,
        message: Message<N, Batch>,
        rng: &mut impl RngCore,
    ) {
        self.raft.handle_message(now, from, message, rng);
        self.pump();
    }

    /// Timers that are due.
    pub fn handle_timeout(&mut self, now: Instant, rng: &mut impl RngCore) {
        self.raft.handle_timeout(now, rng);
        self.pump();
    }

    /// When [`Self::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Instant {
        self.raft.poll_timeout()
    }

    /// The next thing to do.
    pub fn poll_output(&mut self) -> Option<GroupOutput<N, T>> {
        self.out.pop_front()
    }

    /// Takes Raft's outputs: passes on writes and messages, applies
    /// committed entries, releases confirmations, and starts or stops
    /// serving.
    fn pump(&mut self) {
        while let Some(o) = self.raft.poll_output() {
            match o {
                raft::Output::Persist { state, entries } => {
                    self.out.push_back(GroupOutput::Persist { state, entries });
                }
                raft::Output::Send { to, message } => {
                    self.out.push_back(GroupOutput::Send { to, message });
                }
                raft::Output::Apply(entry) => self.apply(entry),
                raft::Output::Role { role, leader } => {
                    if role == Role::Leader {
                        let term = self.raft.term();
                        self.lead_from = self
                            .raft
                            .log()
                            .iter()
                            .find(|e| e.term == term)
                            .map(|e| e.index);
                    } else {
                        self.step_down();
                    }
                    self.out.push_back(GroupOutput::Role { role, leader });
                }
            }
        }
    }

    fn apply(&mut self, entry: Entry<N, Batch>) {
        if let Payload::Data(ops) = entry.payload {
            for op in ops {
                self.state.apply(op);
            }
        }
        while self.pending.front().is_some_and(|(i, _)| *i <= entry.index) {
            if let Some((_, confirms)) = self.pending.pop_front() {
                self.out
                    .extend(confirms.into_iter().map(GroupOutput::Confirmed));
            }
        }
        if !self.serving && self.lead_from.is_some_and(|i| i <= entry.index) {
            self.serving = true;
            self.out.push_back(GroupOutput::Serve);
        }
    }

    fn step_down(&mut self) {
        self.lead_from = None;
        if self.serving {
            self.serving = false;
            self.out.push_back(GroupOutput::Stop);
        }
        for (_, confirms) in self.pending.drain(..) {
            self.out
                .extend(confirms.into_iter().map(GroupOutput::Unknown));
        }
    }
}

#[cfg(test)]
mod tests;
