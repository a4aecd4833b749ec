//! Raft in virtual time: elections and replication by hand, then seeded
//! random runs (losses, duplicates, delays, partitions, crashes that keep
//! only what was persisted) with Raft's safety properties checked after
//! every step: one leader per term, log matching, leader completeness,
//! and applied entries the same on every replica.

use std::collections::HashMap;

use rand::{rngs::SmallRng, Rng, SeedableRng};

use super::*;
use crate::test_support::test_origin;

type Node = u8;

/// What a crash keeps of a replica: what it was told to persist.
#[derive(Debug, Clone, Default)]
struct Disk {
    state: HardState<Node>,
    log: Vec<Entry<Node, u32>>,
}

impl Disk {
    fn write(&mut self, state: HardState<Node>, entries: &[Entry<Node, u32>]) {
        self.state = state;
        if let Some(first) = entries.first() {
            self.log.retain(|e| e.index < first.index);
            self.log.extend(entries.iter().cloned());
        }
    }
}

/// A message in flight, due at `at`.
#[derive(Debug, Clone)]
struct InFlight {
    at: Instant,
    seq: u64,
    from: Node,
    to: Node,
    message: Message<Node, u32>,
}

struct Cluster {
    now: Instant,
    rng: SmallRng,
    config: Config,
    nodes: BTreeMap<Node, Option<Raft<Node, u32>>>,
    /// The replica set never changes.
    fixed: bool,
    /// The set each replica was made with.
    initial: BTreeMap<Node, Members<Node>>,
    disks: BTreeMap<Node, Disk>,
    net: Vec<InFlight>,
    seq: u64,
    /// Links cut (both ways are listed separately).
    cut: BTreeSet<(Node, Node)>,
    /// Loss and duplication, per mille.
    loss: u32,
    dup: u32,
    /// The leader of each term seen.
    leaders: BTreeMap<Term, Node>,
    /// The committed log as applied (the first replica to apply an index
    /// sets it; every other must apply the same).
    applied: BTreeMap<Index, Entry<Node, u32>>,
    /// Per replica, the last index applied (reset by a crash: the state
    /// machine is rebuilt from the log).
    applied_at: BTreeMap<Node, Index>,
}

impl Cluster {
    fn new(n: Node, seed: u64) -> Self {
        let now = test_origin();
        let mut rng = SmallRng::seed_from_u64(seed);
        let config = Config::default();
        let ids: Vec<Node> = (1..=n).collect();
        let mut nodes = BTreeMap::new();
        for &i in &ids {
            let r = Raft::new(
                i,
                Members::of(ids.clone()),
                config.clone(),
                HardState::default(),
                Vec::new(),
                now,
                &mut rng,
            );
            nodes.insert(i, Some(r));
        }
        Self {
            now,
            rng,
            config,
            disks: ids.iter().map(|i| (*i, Disk::default())).collect(),
            applied_at: ids.iter().map(|i| (*i, 0)).collect(),
            initial: ids.iter().map(|i| (*i, Members::of(ids.clone()))).collect(),
            fixed: true,
            nodes,
            net: Vec::new(),
            seq: 0,
            cut: BTreeSet::new(),
            loss: 0,
            dup: 0,
            leaders: BTreeMap::new(),
            applied: BTreeMap::new(),
        }
    }

    fn node(&mut self, i: Node) -> Option<&mut Raft<Node, u32>> {
        self.nodes.get_mut(&i).and_then(|n| n.as_mut())
    }

    /// Takes every output of `i`: persisted at once, sent into the
    /// network, applied and checked.
    fn drain(&mut self, i: Node) {
        while let Some(out) = self.node(i).and_then(|r| r.poll_output()) {
            match out {
                Output::Persist { state, entries } => {
                    self.disks.get_mut(&i).unwrap().write(state, &entries);
                }
                Output::Send { to, message } => {
                    if self.cut.contains(&(i, to)) || self.rng.gen_range(0..1000) < self.loss {
                        continue;
                    }
                    let copies = if self.rng.gen_range(0..1000) < self.dup {
                        2
                    } else {
                        1
                    };
                    for _ in 0..copies {
                        let delay = Duration::from_millis(self.rng.gen_range(1..20));
                        self.seq += 1;
                        self.net.push(InFlight {
                            at: self.now + delay,
                            seq: self.seq,
                            from: i,
                            to,
                            message: message.clone(),
                        });
                    }
                }
                Output::Apply(e) => {
                    let at = self.applied_at.get_mut(&i).unwrap();
                    assert_eq!(e.index, *at + 1, "replica {i} applied out of order");
                    *at = e.index;
                    match self.applied.get(&e.index) {
                        Some(first) => assert_eq!(first, &e, "replica {i} applied another entry"),
                        None => {
                            self.applied.insert(e.index, e);
                        }
                    }
                }
                Output::Role { role, leader } => {
                    if role == Role::Leader {
                        let r = self.node(i).unwrap();
                        let term = r.term();
                        let log: Vec<Entry<Node, u32>> = r.log().to_vec();
                        if let Some(other) = self.leaders.insert(term, i) {
                            assert_eq!(other, i, "two leaders in term {term}");
                        }
                        // Leader completeness: it has every applied entry.
                        for (index, e) in &self.applied {
                            assert!(
                                log.iter().any(|l| l == e),
                                "leader {i} of term {term} lacks committed entry {index}"
                            );
                        }
                    }
                    let _ = leader;
                }
            }
        }
    }

    /// Logs match: where two replicas hold an entry of the same index and
    /// term, everything before it is the same.
    fn check_logs(&self) {
        let logs: Vec<&[Entry<Node, u32>]> =
            self.nodes.values().flatten().map(|r| r.log()).collect();
        for a in &logs {
            for b in &logs {
                let n = a.len().min(b.len());
                if let Some(k) = (0..n).rev().find(|&k| a[k].term == b[k].term) {
                    assert_eq!(a[..=k], b[..=k], "logs differ before a matching entry");
                }
            }
        }
        // Nothing applied is missing from a majority's disks (of a fixed
        // set: a changing one is checked by its own test).
        for (index, e) in self.applied.iter().filter(|_| self.fixed) {
            let holders = self
                .disks
                .values()
                .filter(|d| d.log.iter().any(|l| l == e))
                .count();
            assert!(
                holders > self.nodes.len() / 2,
                "committed entry {index} lost"
            );
        }
    }

    /// Runs until `until`: timers and deliveries in time order.
    fn run_until(&mut self, until: Instant) {
        loop {
            let ids: Vec<Node> = self.nodes.keys().copied().collect();
            for &i in &ids {
                self.drain(i);
            }
            let timer = self
                .nodes
                .iter()
                .filter_map(|(i, r)| r.as_ref().map(|r| (r.poll_timeout(), *i)))
                .min();
            let msg = self.net.iter().map(|m| (m.at, m.seq)).min();
            let next = match (timer, msg) {
                (Some((t, _)), Some((m, _))) => t.min(m),
                (Some((t, _)), None) => t,
                (None, Some((m, _))) => m,
                (None, None) => until,
            };
            if next > until {
                self.now = until;
                return;
            }
            self.now = self.now.max(next);
            if let Some((_, seq)) = msg.filter(|(m, _)| *m <= self.now) {
                let k = self.net.iter().position(|m| m.seq == seq).unwrap();
                let m = self.net.swap_remove(k);
                let now = self.now;
                if let Some(Some(r)) = self.nodes.get_mut(&m.to) {
                    r.handle_message(now, m.from, m.message, &mut self.rng);
                }
                self.drain(m.to);
            } else if let Some((_, i)) = timer.filter(|(t, _)| *t <= self.now) {
                let now = self.now;
                if let Some(Some(r)) = self.nodes.get_mut(&i) {
                    r.handle_timeout(now, &mut self.rng);
                }
                self.drain(i);
            }
            self.check_logs();
        }
    }

    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    fn leader(&self) -> Option<Node> {
        let mut leaders: Vec<(Term, Node)> = self
            .nodes
            .values()
            .flatten()
            .filter(|r| r.role() == Role::Leader)
            .map(|r| (r.term(), r.id()))
            .collect();
        leaders.sort();
        leaders.last().map(|l| l.1)
    }

    fn crash(&mut self, i: Node) {
        self.nodes.insert(i, None);
        self.net.retain(|m| m.to != i);
        self.applied_at.insert(i, 0);
    }

    fn restart(&mut self, i: Node) {
        let disk = self.disks[&i].clone();
        let r = Raft::new(
            i,
            self.initial[&i].clone(),
            self.config.clone(),
            disk.state,
            disk.log,
            self.now,
            &mut self.rng,
        );
        self.nodes.insert(i, Some(r));
        if !self.fixed {
            self.vouch_all();
        }
    }

    /// A new, empty replica `i`, made with the set that adds it.
    fn add_node(&mut self, i: Node, members: Members<Node>) {
        self.fixed = false;
        let r = Raft::new(
            i,
            members.clone(),
            self.config.clone(),
            HardState::default(),
            Vec::new(),
            self.now,
            &mut self.rng,
        );
        self.nodes.insert(i, Some(r));
        self.disks.insert(i, Disk::default());
        self.applied_at.insert(i, 0);
        self.initial.insert(i, members);
        self.vouch_all();
    }

    /// Every replica takes messages from every other (as a driver that
    /// knows who may hold the set).
    fn vouch_all(&mut self) {
        let ids: Vec<Node> = self.nodes.keys().copied().collect();
        for r in self.nodes.values_mut().flatten() {
            r.vouch(ids.iter().copied());
        }
    }

    fn isolate(&mut self, i: Node) {
        for &j in self.nodes.keys() {
            if j != i {
                self.cut.insert((i, j));
                self.cut.insert((j, i));
            }
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
    }

    /// Proposes `v` at the current leader, if any.
    fn propose(&mut self, v: u32) -> Option<Index> {
        let l = self.leader()?;
        let index = self.node(l)?.propose(v).ok();
        self.drain(l);
        index
    }

    fn applied_values(&self) -> Vec<u32> {
        self.applied
            .values()
            .filter_map(|e| match e.payload {
                Payload::Data(v) => Some(v),
                Payload::Noop | Payload::Members(_) => None,
            })
            .collect()
    }
}

#[test]
fn three_replicas_elect_one_leader_and_commit_on_a_majority() {
    let mut c = Cluster::new(3, 1);
    c.run_for(Duration::from_secs(5));
    let l = c.leader().expect("a leader");
    for v in 1..=10 {
        c.propose(v).expect("taken by the leader");
    }
    c.run_for(Duration::from_secs(1));
    assert_eq!(c.applied_values(), (1..=10).collect::<Vec<_>>());
    // Every replica applied all of it.
    let last = *c.applied.keys().last().unwrap();
    assert!(
        c.applied_at.values().all(|a| *a == last),
        "{:?}",
        c.applied_at
    );
    // A follower refuses proposals and names the leader.
    let f = (1..=3).find(|i| *i != l).unwrap();
    assert_eq!(
        c.node(f).unwrap().propose(99),
        Err(NotLeader::Leader(Some(l)))
    );
}

#[test]
fn an_isolated_leader_cannot_commit_steps_down_and_a_new_one_takes_over() {
    let mut c = Cluster::new(3, 2);
    c.run_for(Duration::from_secs(5));
    let old = c.leader().unwrap();
    let old_term = c.node(old).unwrap().term();
    c.isolate(old);
    // Written to the old leader alone: never committed.
    let lost = c.node(old).unwrap().propose(7).unwrap();
    c.drain(old);
    c.run_for(Duration::from_secs(5));
    let new = c.leader().unwrap();
    assert_ne!(new, old);
    assert!(c.node(new).unwrap().term() > old_term);
    // Check-quorum: the old leader stepped down without hearing anyone.
    assert_ne!(c.node(old).unwrap().role(), Role::Leader);
    c.propose(8).unwrap();
    c.run_for(Duration::from_secs(1));
    c.heal();
    c.run_for(Duration::from_secs(5));
    assert_eq!(c.applied_values(), [8]);
    // The old leader's unconfirmed entry was replaced by the new log.
    let log = c.node(old).unwrap().log().to_vec();
    assert!(log.iter().all(|e| e.payload != Payload::Data(7)), "{log:?}");
    assert!(c
        .applied
        .get(&lost)
        .is_some_and(|e| e.payload != Payload::Data(7)));
}

#[test]
fn a_node_cut_off_and_back_does_not_depose_the_leader() {
    let mut c = Cluster::new(3, 3);
    c.run_for(Duration::from_secs(5));
    let l = c.leader().unwrap();
    let term = c.node(l).unwrap().term();
    let f = (1..=3).find(|i| *i != l).unwrap();
    c.isolate(f);
    c.run_for(Duration::from_secs(20));
    // Pre-vote: its elections went nowhere, so its term did not grow.
    assert_eq!(c.node(f).unwrap().term(), term);
    c.heal();
    c.run_for(Duration::from_secs(5));
    assert_eq!(c.leader(), Some(l));
    assert_eq!(c.node(l).unwrap().term(), term);
}

#[test]
fn a_restarted_replica_keeps_its_vote_and_log_and_catches_up() {
    let mut c = Cluster::new(3, 4);
    c.run_for(Duration::from_secs(5));
    for v in 1..=5 {
        c.propose(v).unwrap();
    }
    c.run_for(Duration::from_secs(1));
    let l = c.leader().unwrap();
    let f = (1..=3).find(|i| *i != l).unwrap();
    let before = c.disks[&f].clone();
    c.crash(f);
    for v in 6..=9 {
        c.propose(v).unwrap();
    }
    c.run_for(Duration::from_secs(1));
    c.restart(f);
    assert_eq!(c.node(f).unwrap().term(), before.state.term);
    assert_eq!(c.node(f).unwrap().log(), &before.log[..]);
    c.run_for(Duration::from_secs(2));
    assert_eq!(c.applied_values(), (1..=9).collect::<Vec<_>>());
    assert_eq!(c.applied_at[&f], *c.applied.keys().last().unwrap());
}

#[test]
fn messages_from_outside_the_set_and_of_old_terms_are_refused_and_counted() {
    let mut c = Cluster::new(3, 5);
    c.run_for(Duration::from_secs(5));
    let l = c.leader().unwrap();
    let now = c.now;
    let mut rng = SmallRng::seed_from_u64(9);
    let r = c.node(l).unwrap();
    let term = r.term();
    let log = r.log().to_vec();
    let forged = Message::Append {
        term: term + 5,
        prev_index: 0,
        prev_term: 0,
        entries: Vec::new(),
        commit: 0,
    };
    r.handle_message(now, 42, forged, &mut rng);
    assert_eq!((r.term(), r.role()), (term, Role::Leader));
    let f = if l == 1 { 2 } else { 1 };
    let stale = Message::Append {
        term: term - 1,
        prev_index: 0,
        prev_term: 0,
        entries: Vec::new(),
        commit: 1,
    };
    r.handle_message(now, f, stale, &mut rng);
    assert_eq!(r.log(), &log[..], "a stale append changes nothing");
    assert_eq!(r.refused().outsider, 1);
    assert_eq!(r.refused().stale_term, 1);
}

/// Seeded random runs: 5 replicas, losses, duplicates, partitions,
/// crashes and restarts while proposals go on; safety is checked after
/// every step, and everything settles once the faults stop.
#[test]
fn random_faults_never_break_safety_and_the_set_recovers() {
    let seeds: u64 = std::env::var("MESH_RAFT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    for seed in 0..seeds {
        random_run(seed);
    }
}

fn random_run(seed: u64) {
    let mut c = Cluster::new(5, 1000 + seed);
    c.loss = 50;
    c.dup = 20;
    let mut v = 0;
    let mut confirmed: HashMap<u32, Index> = HashMap::new();
    let mut down: Vec<Node> = Vec::new();
    for _ in 0..40 {
        match c.rng.gen_range(0..10) {
            0 => {
                let i = c.rng.gen_range(1..=5);
                if down.len() < 2 && !down.contains(&i) {
                    c.crash(i);
                    down.push(i);
                }
            }
            1 => {
                if let Some(i) = down.pop() {
                    c.restart(i);
                }
            }
            2 => {
                let i = c.rng.gen_range(1..=5);
                c.isolate(i);
            }
            3 => c.heal(),
            _ => {
                for _ in 0..c.rng.gen_range(1..5) {
                    v += 1;
                    let _ = c.propose(v);
                }
            }
        }
        let d = Duration::from_millis(c.rng.gen_range(10..3000));
        c.run_for(d);
        for e in c.applied.values() {
            if let Payload::Data(x) = e.payload {
                confirmed.insert(x, e.index);
            }
        }
    }
    // The faults stop: every replica comes back and the set settles.
    c.heal();
    c.loss = 0;
    c.dup = 0;
    for i in down.drain(..) {
        c.restart(i);
    }
    c.run_for(Duration::from_secs(10));
    let leader = c
        .leader()
        .unwrap_or_else(|| panic!("seed {seed}: no leader after healing"));
    v += 1;
    c.propose(v).unwrap();
    c.run_for(Duration::from_secs(3));
    let last = *c.applied.keys().last().unwrap();
    assert!(
        c.applied_at.values().all(|a| *a == last),
        "seed {seed}: replicas did not all apply up to {last}: {:?} (leader {leader})",
        c.applied_at
    );
    assert_eq!(c.applied_values().last(), Some(&v), "seed {seed}");
    // Nothing confirmed moved or went away.
    for (x, index) in confirmed {
        assert_eq!(
            c.applied.get(&index).map(|e| &e.payload),
            Some(&Payload::Data(x)),
            "seed {seed}: confirmed {x} lost"
        );
    }
}

/// Replica 1 of the set {1, 2, 3}, with what it kept.
fn replica_1_of_3(
    state: HardState<Node>,
    log: Vec<Entry<Node, u32>>,
    now: Instant,
    rng: &mut SmallRng,
) -> Raft<Node, u32> {
    Raft::new(
        1,
        Members::of([1, 2, 3]),
        Config::default(),
        state,
        log,
        now,
        rng,
    )
}

/// Figure 8 of the Raft paper: a leader must not count replicas to commit
/// an entry of an earlier term; it commits once an entry of its own term
/// is on a majority (and the earlier ones with it).
#[test]
fn a_leader_commits_earlier_terms_only_through_an_entry_of_its_own() {
    let now = test_origin();
    let mut rng = SmallRng::seed_from_u64(8);
    let entry = |term, index| Entry {
        term,
        index,
        payload: Payload::Data(index as u32),
    };
    let mut r = replica_1_of_3(
        HardState {
            term: 3,
            voted_for: Some(1),
        },
        vec![entry(1, 1), entry(2, 2)],
        now,
        &mut rng,
    );
    r.become_leader(now);
    assert_eq!(r.log().last().map(|e| (e.term, e.index)), Some((3, 3)));
    while r.poll_output().is_some() {}
    // Replica 2 has the term-2 entry, not the leader's no-op yet: a
    // majority holds index 2, but it is of term 2.
    r.handle_message(
        now,
        2,
        Message::AppendReply {
            term: 3,
            success: true,
            index: 2,
        },
        &mut rng,
    );
    assert_eq!(r.commit_index(), 0);
    // The no-op (term 3) reaches replica 2: everything up to it commits.
    r.handle_message(
        now,
        2,
        Message::AppendReply {
            term: 3,
            success: true,
            index: 3,
        },
        &mut rng,
    );
    assert_eq!(r.commit_index(), 3);
    let applied: Vec<Index> = std::iter::from_fn(|| r.poll_output())
        .filter_map(|o| match o {
            Output::Apply(e) => Some(e.index),
            _ => None,
        })
        .collect();
    assert_eq!(applied, [1, 2, 3]);
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let run = |seed| {
        let mut c = Cluster::new(5, seed);
        c.loss = 100;
        c.run_for(Duration::from_secs(5));
        for v in 0..20 {
            let _ = c.propose(v);
            c.run_for(Duration::from_millis(37));
        }
        c.run_for(Duration::from_secs(2));
        (c.leaders.clone(), c.applied.clone())
    };
    assert_eq!(run(77), run(77));
}

/// A follower's hint may lie below what the leader knows matched (it
/// points at the start of the conflicting term): the leader still backs
/// up, to just past the match, instead of waiting forever.
#[test]
fn a_refusal_hinting_below_the_match_still_moves_the_follower_back() {
    let now = test_origin();
    let mut rng = SmallRng::seed_from_u64(3);
    let entry = |index| Entry {
        term: 1,
        index,
        payload: Payload::Data(index as u32),
    };
    let mut r = replica_1_of_3(
        HardState {
            term: 2,
            voted_for: Some(1),
        },
        vec![entry(1), entry(2), entry(3)],
        now,
        &mut rng,
    );
    r.become_leader(now);
    while r.poll_output().is_some() {}
    let p = r.progress.get_mut(&2).unwrap();
    (p.matched, p.next) = (2, 5);
    let refusal = Message::AppendReply {
        term: 2,
        success: false,
        index: 1,
    };
    r.handle_message(now, 2, refusal, &mut rng);
    assert_eq!(r.progress[&2].next, 5, "sent on at once: 3 and 4 went out");
    let sent: Vec<(Index, usize)> = std::iter::from_fn(|| r.poll_output())
        .filter_map(|o| match o {
            Output::Send {
                to: 2,
                message:
                    Message::Append {
                        prev_index,
                        entries,
                        ..
                    },
            } => Some((prev_index, entries.len())),
            _ => None,
        })
        .collect();
    assert_eq!(sent, [(2, 2)]);
}

#[test]
fn malformed_appends_are_refused_and_counted_and_change_nothing() {
    let now = test_origin();
    let mut rng = SmallRng::seed_from_u64(4);
    let mut r = replica_1_of_3(HardState::default(), Vec::new(), now, &mut rng);
    let append = |term, prev_index, entries: Vec<(Term, Index)>| Message::Append {
        term,
        prev_index,
        prev_term: 0,
        entries: entries
            .into_iter()
            .map(|(term, index)| Entry {
                term,
                index,
                payload: Payload::Data(0),
            })
            .collect(),
        commit: 5,
    };
    for bad in [
        append(1, 0, vec![(1, 5)]),         // a gap
        append(1, 0, vec![(1, 1), (1, 1)]), // the same index twice
        append(1, 0, vec![(2, 1)]),         // a term past the append's
        append(2, 0, vec![(2, 1), (1, 2)]), // terms going down
        append(Term::MAX, 0, vec![]),       // no term after it
        append(1, u64::MAX, vec![(1, 0)]),  // numbered past the end
    ] {
        r.handle_message(now, 2, bad, &mut rng);
    }
    assert_eq!(r.refused().malformed, 6);
    assert_eq!((r.term(), r.last_index(), r.commit_index()), (0, 0, 0));
    // A committed entry is never taken back, whatever a leader says.
    r.handle_message(now, 2, append(1, 0, vec![(1, 1)]), &mut rng);
    assert_eq!(r.commit_index(), 1);
    r.handle_message(now, 3, append(2, 0, vec![(2, 1)]), &mut rng);
    assert_eq!(r.refused().below_commit, 1);
    assert_eq!(r.log()[0].term, 1);
}

/// A replica joins as a learner, catches up and is promoted; then the
/// leader removes itself, steps down once that commits, and the new set
/// elects a leader and goes on. One change at a time.
#[test]
fn a_replica_joins_catches_up_is_promoted_and_a_leader_removes_itself() {
    let mut c = Cluster::new(3, 6);
    c.run_for(Duration::from_secs(5));
    for v in 1..=5 {
        c.propose(v).unwrap();
    }
    c.run_for(Duration::from_secs(1));
    let l = c.leader().unwrap();
    let mut with_4 = Members::of([1, 2, 3]);
    with_4.learners.push(4);
    c.add_node(4, with_4);
    c.node(l)
        .unwrap()
        .propose_change(Change::AddLearner(4))
        .unwrap();
    // The next change waits for this one to commit.
    assert_eq!(
        c.node(l).unwrap().propose_change(Change::Promote(4)),
        Err(ChangeError::Pending)
    );
    c.drain(l);
    c.run_for(Duration::from_secs(1));
    let last = *c.applied.keys().last().unwrap();
    assert_eq!(c.applied_at[&4], last, "the learner caught up");
    assert_eq!(c.node(4).unwrap().role(), Role::Follower);
    c.node(l)
        .unwrap()
        .propose_change(Change::Promote(4))
        .unwrap();
    c.drain(l);
    c.run_for(Duration::from_secs(1));
    for i in 1..=4 {
        let m = c.node(i).unwrap().members().clone();
        assert_eq!(m, Members::of([1, 2, 3, 4]), "replica {i}");
    }
    assert_eq!(
        c.node(l).unwrap().propose_change(Change::Promote(4)),
        Err(ChangeError::Invalid)
    );
    c.node(l)
        .unwrap()
        .propose_change(Change::Remove(l))
        .unwrap();
    c.drain(l);
    c.run_for(Duration::from_secs(6));
    assert_ne!(c.node(l).unwrap().role(), Role::Leader, "stepped down");
    let new = c.leader().expect("a new leader");
    assert_ne!(new, l);
    let removed_term = c.node(l).unwrap().term();
    c.propose(100).unwrap();
    c.run_for(Duration::from_secs(5));
    assert_eq!(c.applied_values().last(), Some(&100));
    let last = *c.applied.keys().last().unwrap();
    for i in (1..=4).filter(|i| *i != l) {
        assert_eq!(c.applied_at[&i], last, "replica {i}");
    }
    // The removed replica does not campaign and disturbs nobody.
    assert_eq!(c.node(l).unwrap().term(), removed_term);
    assert_eq!(c.leader(), Some(new));
}

/// Seeded random runs with membership changes among the faults: replicas
/// join as learners, are promoted and removed (one change at a time, as
/// the leader allows), while links are cut and replicas crash. Safety is
/// checked after every step; once faults stop, the final set applies
/// everything.
#[test]
fn random_membership_changes_with_faults_keep_safety() {
    let seeds: u64 = std::env::var("MESH_RAFT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(30, |n: u64| n / 2);
    for seed in 0..seeds {
        random_changes(seed);
    }
}

fn random_changes(seed: u64) {
    let mut c = Cluster::new(3, 5000 + seed);
    c.loss = 30;
    let mut next_id: Node = 4;
    let mut down: Option<Node> = None;
    let mut v = 0;
    for _ in 0..60 {
        let leader = c.leader();
        match c.rng.gen_range(0..12) {
            0 | 1 => {
                // A new replica joins as a learner.
                if let Some(l) = leader.filter(|_| next_id < 10) {
                    let members = c.node(l).unwrap().members().clone();
                    if let Some(after) = members.after(Change::AddLearner(next_id)) {
                        if c.node(l)
                            .unwrap()
                            .propose_change(Change::AddLearner(next_id))
                            .is_ok()
                        {
                            c.add_node(next_id, after);
                            next_id += 1;
                        }
                        c.drain(l);
                    }
                }
            }
            2 | 3 => {
                if let Some(l) = leader {
                    let learner = c.node(l).unwrap().members().learners.first().copied();
                    if let Some(n) = learner {
                        let _ = c.node(l).unwrap().propose_change(Change::Promote(n));
                        c.drain(l);
                    }
                }
            }
            4 => {
                if let Some(l) = leader {
                    let voters = c.node(l).unwrap().members().voters.clone();
                    if voters.len() > 3 {
                        let n = voters[c.rng.gen_range(0..voters.len())];
                        let _ = c.node(l).unwrap().propose_change(Change::Remove(n));
                        c.drain(l);
                    }
                }
            }
            5 => {
                if down.is_none() {
                    let ids: Vec<Node> = c.nodes.keys().copied().collect();
                    let i = ids[c.rng.gen_range(0..ids.len())];
                    c.crash(i);
                    down = Some(i);
                }
            }
            6 => {
                if let Some(i) = down.take() {
                    c.restart(i);
                }
            }
            7 => {
                let ids: Vec<Node> = c.nodes.keys().copied().collect();
                let i = ids[c.rng.gen_range(0..ids.len())];
                c.isolate(i);
            }
            8 => c.heal(),
            _ => {
                v += 1;
                let _ = c.propose(v);
            }
        }
        let d = Duration::from_millis(c.rng.gen_range(10..2000));
        c.run_for(d);
    }
    c.heal();
    c.loss = 0;
    if let Some(i) = down.take() {
        c.restart(i);
    }
    c.run_for(Duration::from_secs(15));
    let leader = c
        .leader()
        .unwrap_or_else(|| panic!("seed {seed}: no leader after healing"));
    v += 1;
    c.propose(v).unwrap();
    c.run_for(Duration::from_secs(3));
    let members = c.node(leader).unwrap().members().clone();
    let last = *c.applied.keys().last().unwrap();
    for n in members.voters.iter().chain(&members.learners) {
        assert_eq!(
            c.applied_at[n], last,
            "seed {seed}: replica {n} of {members:?} did not apply up to {last}"
        );
    }
    assert_eq!(c.applied_values().last(), Some(&v), "seed {seed}");
}
