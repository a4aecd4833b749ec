//! Raft for one replica set (a queue, a stream partition): leader
//! election with pre-vote and check-quorum, log replication, the commit
//! rule, and term fencing. Sans-IO like the other cores: time and
//! randomness come in, messages, writes for the disk and committed entries
//! go out through [`Raft::poll_output`]. The replica set changes one
//! server at a time ([`Change`]); log compaction is not here yet.
//! [`super::replica`] builds a replicated queue on it.
//!
//! Why a hand-written core and not a crate: `raft` (raft-rs) is sans-IO
//! but draws election timeouts from an unseeded generator of its own (so
//! the simulator's runs would not repeat), has had no release since 2023,
//! and brings protobuf 2 and slog into the wire and the build; `openraft`
//! owns its tasks and timers behind async traits, which the simulator
//! cannot step. Neither batches heartbeats across groups or lets idle groups
//! sleep, which a node hosting thousands of replica sets needs anyway.
//!
//! The rules, from the Raft paper (Ongaro & Ousterhout, 2014) and the
//! lessons of etcd and raft-rs:
//! - **Persist before you speak.** A [`Output::Persist`] (term, vote, log
//!   entries from an index) comes before every output that depends on it;
//!   the driver must have it on disk (a memory host: kept) before it acts
//!   on any later output. A vote or an append acknowledged is never
//!   forgotten by a crash.
//! - **Pre-vote.** A follower whose election timer fires first asks for
//!   votes for `term + 1` without taking that term; only with a majority
//!   does it become a candidate. A node cut off from the others (or a
//!   removed one) cannot push everyone's term up and depose a working
//!   leader when it comes back.
//! - **Leader stickiness and check-quorum.** A node that heard from a
//!   leader within the minimum election timeout grants no (pre-)vote; a
//!   leader that has not heard from a majority within an election timeout
//!   steps down, so a partitioned old leader stops accepting writes.
//! - **Term fencing.** A message of a newer term turns the receiver into
//!   a follower of that term; a message of an older term is answered with
//!   the current term and otherwise ignored. Only a leader proposes, and an
//!   entry is committed only by the leader of its term.
//! - **Commit rule.** The leader commits index N once a majority has it and
//!   the entry at N is of the current term (§5.4.2); a new leader appends a
//!   no-op so entries of earlier terms commit through it.
//! - **Truncate only on a conflict.** A follower drops entries only where
//!   an incoming entry has the same index and another term; a stale or
//!   reordered append never shortens its log.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fmt::Debug,
    time::{Duration, Instant},
};

use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};

/// A Raft term.
pub type Term = u64;
/// A position in the log, from 1 (0: before the first entry).
pub type Index = u64;

/// Timings and limits of a replica set.
#[derive(Debug, Clone)]
pub struct Config {
    /// The election timeout is drawn from `[election, 2 * election)`; a
    /// leader not heard from for that long is replaced.
    pub election: Duration,
    /// How often a leader sends appends (empty ones are heartbeats).
    pub heartbeat: Duration,
    /// Most entries in one append.
    pub max_append: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            election: Duration::from_millis(1000),
            heartbeat: Duration::from_millis(150),
            max_append: 1024,
        }
    }
}

/// What an entry carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload<N, C> {
    /// Appended by a new leader so that earlier entries can commit.
    Noop,
    /// The state machine's command.
    Data(C),
    /// The replica set from this entry on (in effect once appended).
    Members(Members<N>),
}

/// Who is in a replica set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members<N> {
    /// They vote, and count for majorities (sorted, no repeats).
    pub voters: Vec<N>,
    /// They get the log (to catch up before they vote) but do not count
    /// (sorted, no repeats, none a voter).
    pub learners: Vec<N>,
}

impl<N: Ord + Copy> Members<N> {
    /// A set of `voters` and no learners.
    pub fn of(voters: impl IntoIterator<Item = N>) -> Self {
        let mut voters: Vec<N> = voters.into_iter().collect();
        voters.sort_unstable();
        voters.dedup();
        Self {
            voters,
            learners: Vec::new(),
        }
    }

    /// `n` votes.
    pub fn is_voter(&self, n: &N) -> bool {
        self.voters.binary_search(n).is_ok()
    }

    /// `n` is a voter or a learner.
    pub fn contains(&self, n: &N) -> bool {
        self.is_voter(n) || self.learners.binary_search(n).is_ok()
    }

    /// This set after `change`, if it applies.
    fn after(&self, change: Change<N>) -> Option<Self> {
        let mut next = self.clone();
        let insert = |v: &mut Vec<N>, n: N| match v.binary_search(&n) {
            Ok(_) => false,
            Err(at) => {
                v.insert(at, n);
                true
            }
        };
        let remove = |v: &mut Vec<N>, n: &N| match v.binary_search(n) {
            Ok(at) => {
                v.remove(at);
                true
            }
            Err(_) => false,
        };
        let valid = match change {
            Change::AddLearner(n) => !self.contains(&n) && insert(&mut next.learners, n),
            Change::Promote(n) => remove(&mut next.learners, &n) && insert(&mut next.voters, n),
            Change::Remove(n) => {
                let was = remove(&mut next.voters, &n) | remove(&mut next.learners, &n);
                was && !next.voters.is_empty()
            }
        };
        valid.then_some(next)
    }
}

/// One membership change (one at a time, each committed before the next).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<N> {
    /// Start copying the log to a new replica.
    AddLearner(N),
    /// A learner becomes a voter.
    Promote(N),
    /// A voter or learner leaves (a leader that removes itself steps down
    /// once the change commits).
    Remove(N),
}

/// Why a membership change was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeError<N> {
    /// Only the leader changes the set; this is the one it knows of.
    NotLeader(Option<N>),
    /// The previous change is not committed yet, or the leader has not
    /// committed an entry of its own term (a change before that could
    /// overlap an uncommitted change of an earlier leader).
    Pending,
    /// The change does not apply (a learner that is already in the set,
    /// a promotion of a non-learner, removing the last voter).
    Invalid,
}

/// One log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry<N, C> {
    /// The term of the leader that appended it.
    pub term: Term,
    /// Its position in the log.
    pub index: Index,
    /// What it carries.
    pub payload: Payload<N, C>,
}

/// What survives a crash besides the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HardState<N> {
    /// The latest term this replica has seen.
    pub term: Term,
    /// Whom it voted for in that term.
    pub voted_for: Option<N>,
}

/// A message between replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message<N, C> {
    /// Would you vote for me in `term` (the sender's term + 1; the sender
    /// has not taken it)?
    PreVote {
        /// The term the sender would campaign in.
        term: Term,
        /// The index of the sender's last entry.
        last_index: Index,
        /// The term of the sender's last entry.
        last_term: Term,
    },
    /// The answer to a `PreVote`.
    PreVoteReply {
        /// The term asked about if granted, else the receiver's.
        term: Term,
        /// Whether the receiver would vote for the sender.
        granted: bool,
    },
    /// Vote for me in `term` (the sender's current term).
    Vote {
        /// The sender's term.
        term: Term,
        /// The index of the sender's last entry.
        last_index: Index,
        /// The term of the sender's last entry.
        last_term: Term,
    },
    /// The answer to a `Vote`.
    VoteReply {
        /// The receiver's term.
        term: Term,
        /// Whether the receiver voted for the sender.
        granted: bool,
    },
    /// Entries after `prev_index` (whose term is `prev_term`); an empty
    /// one is a heartbeat. `commit`: the leader's commit index.
    Append {
        /// The leader's term.
        term: Term,
        /// The index the entries follow.
        prev_index: Index,
        /// The term of the entry at `prev_index`.
        prev_term: Term,
        /// Entries from `prev_index + 1` on.
        entries: Vec<Entry<N, C>>,
        /// The leader's commit index.
        commit: Index,
    },
    /// `success`: the follower's log matches the leader's up to `index`.
    /// Otherwise `index` is where the leader should try next from (the
    /// follower's hint: its last index, or before the conflicting term).
    AppendReply {
        /// The follower's term.
        term: Term,
        /// Whether the follower's log matched and took the entries.
        success: bool,
        /// See the variant.
        index: Index,
    },
}

impl<N, C> Message<N, C> {
    /// The term the message is of.
    pub fn term(&self) -> Term {
        match self {
            Message::PreVote { term, .. }
            | Message::PreVoteReply { term, .. }
            | Message::Vote { term, .. }
            | Message::VoteReply { term, .. }
            | Message::Append { term, .. }
            | Message::AppendReply { term, .. } => *term,
        }
    }
}

/// What the replica asks of its driver, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<N, C> {
    /// Write the hard state and, if `entries` is not empty, the log from
    /// `entries[0].index` on (dropping what the log held from there).
    /// Everything after this output depends on it being kept.
    Persist {
        /// The term and vote to keep.
        state: HardState<N>,
        /// Log entries to write, in order.
        entries: Vec<Entry<N, C>>,
    },
    /// Send `message` to replica `to`.
    Send {
        /// The replica it is for.
        to: N,
        /// The message.
        message: Message<N, C>,
    },
    /// Entry committed: apply it (each once, in index order).
    Apply(Entry<N, C>),
    /// This replica's role or leader changed.
    Role {
        /// The new role.
        role: Role,
        /// The leader it knows of (itself, when it leads).
        leader: Option<N>,
    },
}

/// A replica's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asking for pre-votes.
    PreCandidate,
    /// Asking for votes in a new term.
    Candidate,
    /// Leads its term.
    Leader,
}

/// Why a proposal was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotLeader<N> {
    /// The leader this replica knows of, if any.
    Leader(Option<N>),
}

/// What a leader knows of one follower.
#[derive(Debug, Clone)]
struct Progress {
    /// The next index to send.
    next: Index,
    /// The highest index known to match.
    matched: Index,
    /// Heard from in the current check-quorum period.
    active: bool,
}

/// A message counted and dropped, with why.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refused {
    /// Of an older term.
    pub stale_term: u64,
    /// From a node outside the replica set.
    pub outsider: u64,
    /// Votes not granted because a leader was heard from recently.
    pub sticky: u64,
    /// Malformed: the last term there is, or entries out of order, of a
    /// later term than their append, or more than `max_append` of them.
    pub malformed: u64,
    /// Appends that would have removed committed entries.
    pub below_commit: u64,
}

/// What a correct replica sends: entries numbered on from `prev_index`,
/// terms that never decrease and are not past the message's, and no more
/// of them than an append carries.
fn well_formed<N, C>(message: &Message<N, C>, max_append: usize) -> bool {
    let Message::Append {
        term,
        prev_index,
        prev_term,
        entries,
        ..
    } = message
    else {
        return true;
    };
    if entries.len() > max_append || prev_term > term {
        return false;
    }
    let mut last_term = *prev_term;
    for (i, e) in entries.iter().enumerate() {
        let expected = prev_index.checked_add(i as u64 + 1);
        if Some(e.index) != expected || e.term < last_term || e.term > *term || e.term == 0 {
            return false;
        }
        last_term = e.term;
    }
    true
}

/// One replica of a replica set.
#[derive(Debug)]
pub struct Raft<N, C> {
    id: N,
    /// The replica set in effect: the last in the log, or `initial`.
    members: Members<N>,
    initial: Members<N>,
    /// The index of the entry `members` comes from (0: `initial`).
    members_at: Index,
    /// Replicas its driver vouches for besides `members` (see
    /// [`Raft::vouch`]).
    vouched: BTreeSet<N>,
    config: Config,
    state: HardState<N>,
    log: Vec<Entry<N, C>>,
    commit: Index,
    applied: Index,
    role: Role,
    leader: Option<N>,
    /// When the election timer fires (followers and candidates), or the
    /// next check-quorum (leaders).
    election_at: Instant,
    /// When a leader sends heartbeats next.
    heartbeat_at: Instant,
    /// When a leader was last heard from (for stickiness).
    leader_seen: Option<Instant>,
    /// Votes (or pre-votes) granted to this candidate.
    votes: BTreeSet<N>,
    progress: BTreeMap<N, Progress>,
    out: VecDeque<Output<N, C>>,
    refused: Refused,
}

impl<N, C> Raft<N, C>
where
    N: Copy + Ord + Debug,
    C: Clone + Debug,
{
    /// A replica of the set `members` (unless its log says otherwise),
    /// with what it had kept (`state`, `log`; both empty for a new one), as
    /// a follower. A replica being added is made with the set that adds it
    /// (as a learner), so that it takes appends from the leader.
    pub fn new(
        id: N,
        members: Members<N>,
        config: Config,
        state: HardState<N>,
        log: Vec<Entry<N, C>>,
        now: Instant,
        rng: &mut impl RngCore,
    ) -> Self {
        let mut r = Self {
            id,
            members: members.clone(),
            initial: members,
            members_at: 0,
            vouched: BTreeSet::new(),
            config,
            state,
            log,
            commit: 0,
            applied: 0,
            role: Role::Follower,
            leader: None,
            election_at: now,
            heartbeat_at: now,
            leader_seen: None,
            votes: BTreeSet::new(),
            progress: BTreeMap::new(),
            out: VecDeque::new(),
            refused: Refused::default(),
        };
        r.refresh_members();
        r.reset_election(now, rng);
        r
    }

    /// The replica set in effect.
    pub fn members(&self) -> &Members<N> {
        &self.members
    }

    /// Replicas whose messages it takes besides those of its set: who the
    /// driver knows may hold this replica set. A replica that missed the
    /// change adding a later leader (it was down) would otherwise refuse
    /// that leader's appends and never catch up. Votes still go to voters
    /// of its own set only.
    pub fn vouch(&mut self, peers: impl IntoIterator<Item = N>) {
        self.vouched = peers.into_iter().filter(|n| *n != self.id).collect();
    }

    /// Proposes a membership change (leaders only): its index once
    /// appended. It is in effect at once; the next may follow once it is
    /// committed.
    pub fn propose_change(&mut self, change: Change<N>) -> Result<Index, ChangeError<N>> {
        if self.role != Role::Leader {
            return Err(ChangeError::NotLeader(self.leader));
        }
        if self.members_at > self.commit || self.term_at(self.commit) != Some(self.state.term) {
            return Err(ChangeError::Pending);
        }
        let next = self.members.after(change).ok_or(ChangeError::Invalid)?;
        let index = self.append_local(Payload::Members(next));
        self.broadcast_append();
        Ok(index)
    }

    /// This replica.
    pub fn id(&self) -> N {
        self.id
    }
    /// Its role now.
    pub fn role(&self) -> Role {
        self.role
    }
    /// The leader it knows of.
    pub fn leader(&self) -> Option<N> {
        self.leader
    }
    /// Its current term.
    pub fn term(&self) -> Term {
        self.state.term
    }
    /// The highest index it knows committed.
    pub fn commit_index(&self) -> Index {
        self.commit
    }
    /// The index of its last entry (0: none).
    pub fn last_index(&self) -> Index {
        self.log.last().map_or(0, |e| e.index)
    }
    /// Its log.
    pub fn log(&self) -> &[Entry<N, C>] {
        &self.log
    }
    /// What it refused, counted.
    pub fn refused(&self) -> Refused {
        self.refused
    }
    /// How far each follower has the log, as the leader knows it (empty
    /// on other roles).
    pub fn matched(&self) -> impl Iterator<Item = (N, Index)> + '_ {
        self.progress.iter().map(|(n, p)| (*n, p.matched))
    }

    /// The next output for the driver.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output<N, C>> {
        self.out.pop_front()
    }

    /// When [`Raft::handle_timeout`] is next due.
    #[must_use]
    pub fn poll_timeout(&self) -> Instant {
        if self.role == Role::Leader {
            self.heartbeat_at.min(self.election_at)
        } else {
            self.election_at
        }
    }

    /// Proposes `data` (leaders only): its index once appended here. It is
    /// confirmed when it comes out as [`Output::Apply`].
    pub fn propose(&mut self, data: C) -> Result<Index, NotLeader<N>> {
        if self.role != Role::Leader {
            return Err(NotLeader::Leader(self.leader));
        }
        let index = self.append_local(Payload::Data(data));
        self.broadcast_append();
        Ok(index)
    }

    /// Timers that are due: an election (pre-vote) for followers and
    /// candidates; heartbeats and check-quorum for leaders.
    pub fn handle_timeout(&mut self, now: Instant, rng: &mut impl RngCore) {
        if self.role == Role::Leader {
            if now >= self.election_at {
                let m = &self.members;
                let active = usize::from(m.is_voter(&self.id))
                    + self
                        .progress
                        .iter()
                        .filter(|(n, p)| p.active && m.is_voter(n))
                        .count();
                if active < self.quorum() {
                    self.become_follower(now, self.state.term, None, rng);
                    return;
                }
                for p in self.progress.values_mut() {
                    p.active = false;
                }
                self.election_at = now + self.config.election;
            }
            if now >= self.heartbeat_at {
                self.broadcast_append();
                self.heartbeat_at = now + self.config.heartbeat;
            }
        } else if now >= self.election_at {
            if self.members.is_voter(&self.id) {
                self.start_pre_vote(now, rng);
            } else {
                // A learner, or removed: it never campaigns.
                self.reset_election(now, rng);
            }
        }
    }

    /// A message from replica `from`.
    pub fn handle_message(
        &mut self,
        now: Instant,
        from: N,
        message: Message<N, C>,
        rng: &mut impl RngCore,
    ) {
        if !(self.members.contains(&from) || self.vouched.contains(&from)) || from == self.id {
            self.refused.outsider += 1;
            return;
        }
        let term = message.term();
        if term == Term::MAX || !well_formed(&message, self.config.max_append) {
            // No term after it exists: taking it would leave the set
            // unable to elect anyone.
            self.refused.malformed += 1;
            return;
        }
        match message {
            // Pre-votes never change terms: they ask about the future.
            Message::PreVote {
                term,
                last_index,
                last_term,
            } => {
                let granted = term > self.state.term
                    && self.members.is_voter(&from)
                    && !self.sticky(now)
                    && self.up_to_date(last_index, last_term);
                if !granted && term > self.state.term {
                    self.refused.sticky += u64::from(self.sticky(now));
                }
                let term = if granted { term } else { self.state.term };
                self.send(from, Message::PreVoteReply { term, granted });
                return;
            }
            Message::PreVoteReply { term, granted } => {
                if self.role == Role::PreCandidate
                    && granted
                    && self.members.is_voter(&from)
                    && term == self.state.term.saturating_add(1)
                {
                    self.votes.insert(from);
                    if self.votes.len() >= self.quorum() {
                        self.start_election(now, rng);
                    }
                } else if !granted && term > self.state.term {
                    self.become_follower(now, term, None, rng);
                }
                return;
            }
            _ => {}
        }
        if term < self.state.term {
            self.refused.stale_term += 1;
            // Tell the sender of the newer term (it steps down); replies
            // of an older term need no answer.
            match message {
                Message::Vote { .. } => self.send(
                    from,
                    Message::VoteReply {
                        term: self.state.term,
                        granted: false,
                    },
                ),
                Message::Append { .. } => self.send(
                    from,
                    Message::AppendReply {
                        term: self.state.term,
                        success: false,
                        index: 0,
                    },
                ),
                _ => {}
            }
            return;
        }
        if term > self.state.term {
            if matches!(message, Message::Vote { .. }) && self.sticky(now) {
                // A leader is alive: a disruptive candidate gets no vote
                // and changes nothing here.
                self.refused.sticky += 1;
                return;
            }
            let leader = matches!(message, Message::Append { .. }).then_some(from);
            self.become_follower(now, term, leader, rng);
        }
        match message {
            Message::Vote {
                term,
                last_index,
                last_term,
            } => {
                let free = self.state.voted_for.is_none_or(|v| v == from);
                let granted = free
                    && self.leader.is_none()
                    && self.members.is_voter(&from)
                    && self.up_to_date(last_index, last_term);
                if granted {
                    self.state.voted_for = Some(from);
                    self.persist(Vec::new());
                    self.reset_election(now, rng);
                }
                self.send(from, Message::VoteReply { term, granted });
            }
            Message::VoteReply { granted, .. } => {
                if self.role == Role::Candidate && granted && self.members.is_voter(&from) {
                    self.votes.insert(from);
                    if self.votes.len() >= self.quorum() {
                        self.become_leader(now);
                    }
                }
            }
            Message::Append {
                prev_index,
                prev_term,
                entries,
                commit,
                ..
            } => self.append_arrived(now, from, prev_index, prev_term, entries, commit, rng),
            Message::AppendReply { success, index, .. } => {
                self.append_answered(from, success, index)
            }
            Message::PreVote { .. } | Message::PreVoteReply { .. } => {}
        }
    }

    fn quorum(&self) -> usize {
        self.members.voters.len() / 2 + 1
    }

    /// `members` anew from the log (after entries were appended or
    /// dropped); a leader tracks whoever is in it.
    fn refresh_members(&mut self) {
        let last = self.log.iter().rev().find_map(|e| match &e.payload {
            Payload::Members(m) => Some((e.index, m.clone())),
            _ => None,
        });
        let (at, members) = last.unwrap_or((0, self.initial.clone()));
        self.members_at = at;
        self.members = members;
        if self.role == Role::Leader {
            let next = self.last_index() + 1;
            let peers = self.peers();
            self.progress.retain(|n, _| peers.contains(n));
            for n in peers {
                self.progress.entry(n).or_insert(Progress {
                    next,
                    matched: 0,
                    active: true,
                });
            }
        }
    }

    /// A leader was heard from within the minimum election timeout.
    fn sticky(&self, now: Instant) -> bool {
        self.role == Role::Leader
            || self
                .leader_seen
                .is_some_and(|t| now.duration_since(t) < self.config.election)
    }

    fn last_term(&self) -> Term {
        self.log.last().map_or(0, |e| e.term)
    }

    fn term_at(&self, index: Index) -> Option<Term> {
        if index == 0 {
            return Some(0);
        }
        let first = self.log.first()?.index;
        let at = usize::try_from(index.checked_sub(first)?).ok()?;
        self.log.get(at).map(|e| e.term)
    }

    /// A candidate's log is at least as up to date as ours (§5.4.1).
    fn up_to_date(&self, last_index: Index, last_term: Term) -> bool {
        (last_term, last_index) >= (self.last_term(), self.last_index())
    }

    fn send(&mut self, to: N, message: Message<N, C>) {
        self.out.push_back(Output::Send { to, message });
    }

    fn persist(&mut self, entries: Vec<Entry<N, C>>) {
        self.out.push_back(Output::Persist {
            state: self.state,
            entries,
        });
    }

    fn reset_election(&mut self, now: Instant, rng: &mut impl RngCore) {
        let base = self.config.election;
        let jitter = rng.gen_range(0..base.as_micros().max(1) as u64);
        self.election_at = now + base + Duration::from_micros(jitter);
    }

    fn set_role(&mut self, role: Role, leader: Option<N>) {
        if (self.role, self.leader) != (role, leader) {
            self.role = role;
            self.leader = leader;
            self.out.push_back(Output::Role { role, leader });
        }
    }

    fn become_follower(
        &mut self,
        now: Instant,
        term: Term,
        leader: Option<N>,
        rng: &mut impl RngCore,
    ) {
        if term > self.state.term {
            self.state = HardState {
                term,
                voted_for: None,
            };
            self.persist(Vec::new());
        }
        self.votes.clear();
        self.progress.clear();
        self.set_role(Role::Follower, leader);
        self.reset_election(now, rng);
    }

    fn start_pre_vote(&mut self, now: Instant, rng: &mut impl RngCore) {
        self.set_role(Role::PreCandidate, None);
        self.leader_seen = None;
        self.votes.clear();
        self.votes.insert(self.id);
        self.reset_election(now, rng);
        if self.votes.len() >= self.quorum() {
            self.start_election(now, rng);
            return;
        }
        let (last_index, last_term) = (self.last_index(), self.last_term());
        let term = self.state.term.saturating_add(1);
        for to in self.other_voters() {
            self.send(
                to,
                Message::PreVote {
                    term,
                    last_index,
                    last_term,
                },
            );
        }
    }

    fn start_election(&mut self, now: Instant, rng: &mut impl RngCore) {
        self.state = HardState {
            term: self.state.term.saturating_add(1),
            voted_for: Some(self.id),
        };
        self.persist(Vec::new());
        self.set_role(Role::Candidate, None);
        self.votes.clear();
        self.votes.insert(self.id);
        self.reset_election(now, rng);
        if self.votes.len() >= self.quorum() {
            self.become_leader(now);
            return;
        }
        let (last_index, last_term) = (self.last_index(), self.last_term());
        let term = self.state.term;
        for to in self.other_voters() {
            self.send(
                to,
                Message::Vote {
                    term,
                    last_index,
                    last_term,
                },
            );
        }
    }

    fn become_leader(&mut self, now: Instant) {
        self.set_role(Role::Leader, Some(self.id));
        self.votes.clear();
        let next = self.last_index() + 1;
        self.progress = self
            .peers()
            .into_iter()
            .map(|n| {
                (
                    n,
                    Progress {
                        next,
                        matched: 0,
                        active: true,
                    },
                )
            })
            .collect();
        self.election_at = now + self.config.election;
        self.heartbeat_at = now + self.config.heartbeat;
        self.append_local(Payload::Noop);
        self.broadcast_append();
        self.advance_commit();
    }

    /// Everyone else in the set: they get appends.
    fn peers(&self) -> Vec<N> {
        let m = &self.members;
        m.voters
            .iter()
            .chain(&m.learners)
            .copied()
            .filter(|n| *n != self.id)
            .collect()
    }

    fn other_voters(&self) -> Vec<N> {
        let v = &self.members.voters;
        v.iter().copied().filter(|n| *n != self.id).collect()
    }

    /// Appends to the leader's own log (persisted first).
    fn append_local(&mut self, payload: Payload<N, C>) -> Index {
        let entry = Entry {
            term: self.state.term,
            index: self.last_index() + 1,
            payload,
        };
        let index = entry.index;
        let members = matches!(entry.payload, Payload::Members(_));
        self.log.push(entry.clone());
        self.persist(vec![entry]);
        if members {
            self.refresh_members();
        }
        self.advance_commit();
        index
    }

    fn broadcast_append(&mut self) {
        for to in self.peers() {
            self.send_append(to);
        }
    }

    /// Sends `to` what it lacks from its next index (at most
    /// `max_append` entries), optimistically moving its next index past
    /// them (a loss shows as a mismatch later and moves it back).
    fn send_append(&mut self, to: N) {
        let Some(next) = self.progress.get(&to).map(|p| p.next) else {
            return;
        };
        let prev_index = next - 1;
        let Some(prev_term) = self.term_at(prev_index) else {
            return;
        };
        let first = self.log.first().map_or(1, |e| e.index);
        let from = usize::try_from(next.saturating_sub(first)).unwrap_or(usize::MAX);
        let entries: Vec<Entry<N, C>> = self
            .log
            .iter()
            .skip(from)
            .take(self.config.max_append)
            .cloned()
            .collect();
        if let (Some(last), Some(p)) = (entries.last(), self.progress.get_mut(&to)) {
            p.next = last.index + 1;
        }
        self.send(
            to,
            Message::Append {
                term: self.state.term,
                prev_index,
                prev_term,
                entries,
                commit: self.commit,
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn append_arrived(
        &mut self,
        now: Instant,
        from: N,
        prev_index: Index,
        prev_term: Term,
        entries: Vec<Entry<N, C>>,
        commit: Index,
        rng: &mut impl RngCore,
    ) {
        // Same term: `from` is its leader (one per term).
        if self.role != Role::Follower || self.leader != Some(from) {
            self.votes.clear();
            self.progress.clear();
            self.set_role(Role::Follower, Some(from));
        }
        self.leader_seen = Some(now);
        self.reset_election(now, rng);
        let term = self.state.term;
        let refused = match self.term_at(prev_index) {
            None => Some(self.last_index() + 1),
            // Skip the whole conflicting term at once.
            Some(t) if t != prev_term => Some(
                self.log
                    .iter()
                    .find(|e| e.term == t)
                    .map_or(prev_index, |e| e.index)
                    .max(self.commit + 1),
            ),
            Some(_) => None,
        };
        if let Some(hint) = refused {
            self.send(
                from,
                Message::AppendReply {
                    term,
                    success: false,
                    index: hint,
                },
            );
            return;
        }
        let last_new = prev_index + entries.len() as u64;
        let conflict = entries
            .iter()
            .find(|e| self.term_at(e.index).is_some_and(|t| t != e.term));
        if conflict.is_some_and(|e| e.index <= self.commit) {
            // Only a leader without a committed entry could send this: a
            // bug or a forgery, never the state machine's loss.
            self.refused.below_commit += 1;
            return;
        }
        let mut new = Vec::new();
        for e in entries {
            match self.term_at(e.index) {
                Some(t) if t == e.term => {}
                Some(_) => {
                    // A conflict: what follows it here is not the leader's.
                    let first = self.log.first().map_or(1, |x| x.index);
                    self.log.truncate((e.index - first) as usize);
                    new.push(e);
                }
                None => new.push(e),
            }
        }
        if !new.is_empty() {
            let truncated = self.members_at >= new[0].index;
            let members = new.iter().any(|e| matches!(e.payload, Payload::Members(_)));
            self.log.extend(new.iter().cloned());
            self.persist(new);
            if members || truncated {
                self.refresh_members();
            }
        }
        let commit = commit.min(last_new);
        if commit > self.commit {
            self.commit = commit;
            self.apply();
        }
        self.send(
            from,
            Message::AppendReply {
                term,
                success: true,
                index: last_new,
            },
        );
    }

    fn append_answered(&mut self, from: N, success: bool, index: Index) {
        if self.role != Role::Leader {
            return;
        }
        let last = self.last_index();
        let Some(p) = self.progress.get_mut(&from) else {
            return;
        };
        p.active = true;
        if success {
            if index > p.matched && index <= last {
                p.matched = index;
                p.next = p.next.max(index + 1);
                self.advance_commit();
            }
            // More to send (the last append was capped)?
            if self.progress.get(&from).is_some_and(|p| p.next <= last) {
                self.send_append(from);
            }
        } else {
            // Back to where the follower says it diverges (never below
            // what it matched: its hint may be, as it cannot know that),
            // and a stale refusal moves nothing up.
            let next = index.clamp(p.matched + 1, last + 1);
            if next < p.next {
                p.next = next;
                self.send_append(from);
            }
        }
    }

    /// The leader's commit index moves to the highest index a majority has
    /// whose entry is of the current term.
    fn advance_commit(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        let m = &self.members;
        let mut matched: Vec<Index> = self
            .progress
            .iter()
            .filter(|(n, _)| m.is_voter(n))
            .map(|(_, p)| p.matched)
            .collect();
        if m.is_voter(&self.id) {
            matched.push(self.last_index());
        }
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let Some(&n) = matched.get(self.quorum() - 1) else {
            return;
        };
        if n > self.commit && self.term_at(n) == Some(self.state.term) {
            self.commit = n;
            self.apply();
            // A leader that removed itself leads until that change is
            // committed, then steps down.
            if !self.members.is_voter(&self.id) && self.commit >= self.members_at {
                self.votes.clear();
                self.progress.clear();
                self.set_role(Role::Follower, None);
            }
        }
    }

    fn apply(&mut self) {
        while self.applied < self.commit {
            let i = self.applied + 1;
            let first = self.log.first().map_or(1, |e| e.index);
            let Some(e) = self.log.get((i - first) as usize).cloned() else {
                return;
            };
            self.applied = i;
            self.out.push_back(Output::Apply(e));
        }
    }
}

#[cfg(test)]
mod tests;
