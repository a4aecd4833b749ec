//! The replicated queue in virtual time: the state its ops build, and
//! seeded runs of three replicas with a producer and a consumer under
//! losses, duplicates, partitions and crashes of leaders and followers
//! (a crash keeps what was persisted). Checked: nothing confirmed is lost,
//! a dedup key holds across failovers, and every replica ends the same.

use std::collections::{BTreeMap, BTreeSet};

use rand::{rngs::SmallRng, Rng, SeedableRng};

use super::*;
use crate::{
    core::queue::{self, Accepted, ConsumerOptions},
    test_support::test_origin,
};

type Node = u8;
/// A send's number: its confirmation token, id seq and dedup key.
type Seq = u64;

/// What a turn confirms: a send taken, or an ack of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Sent(Seq),
    Acked(Seq),
}

type Group = QueueGroup<Node, Token>;

const QUEUE: &str = "jobs";
/// The Unix µs of the test's origin: every replica's clock reads the same.
const EPOCH_US: u64 = 1_767_225_600_000_000;

fn publisher() -> crate::core::NodeId {
    libp2p::identity::Keypair::ed25519_from_bytes([7; 32])
        .expect("any 32 bytes are a key")
        .public()
        .to_peer_id()
}

fn msg(seq: Seq) -> NewMessage {
    NewMessage {
        id: MessageId {
            publisher: publisher(),
            seq,
        },
        headers: vec![("h".into(), Bytes::from_static(b"v"))],
        payload: Bytes::from(seq.to_string()),
        not_before: None,
        expires: None,
        dedup_key: Some(format!("k{seq}")),
    }
}

fn consumer() -> ConsumerOptions {
    ConsumerOptions {
        prefetch: 8,
        visibility_timeout: Duration::from_secs(2),
        max_attempts: 1_000,
    }
}

fn now_us(origin: Instant, now: Instant) -> u64 {
    EPOCH_US + now.duration_since(origin).as_micros() as u64
}

#[test]
fn the_state_of_the_ops_restores_the_same_queue() {
    let now = test_origin();
    let mut live: Queues<u8> = Queues::new(queue::Config::default());
    live.set_journal(true);
    for s in 0..6 {
        live.send(now, QUEUE, msg(s)).unwrap();
    }
    live.set_consumer(QUEUE, 1, consumer()).unwrap();
    let first = live.poll_dispatch(now).expect("a delivery");
    assert!(live.ack(first.tag, &1));
    let second = live.poll_dispatch(now).expect("a delivery");
    assert!(live.reject(now, second.tag, &1, "bad"));
    let mut journal = Vec::new();
    live.drain_journal(&mut journal);
    let mut state = QueueState::default();
    for j in journal {
        state.apply(QueueOp::from_journal(j, now, EPOCH_US));
    }
    // Four waiting (one more in flight), one acked, one dead-lettered.
    assert_eq!(state.len(), 5);
    assert!(state.messages().all(|m| m.id.seq != first.id.seq));
    let dead: Vec<_> = state.messages().filter(|m| m.dead.is_some()).collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id.seq, second.id.seq);
    assert_eq!(dead[0].queue, queue::dlq_name(QUEUE));
    assert_eq!(
        state.dedup_keys().count(),
        6,
        "acked keys stay for the window"
    );

    let mut restored: Queues<u8> = Queues::new(queue::Config::default());
    state.restore_into(&mut restored, now, EPOCH_US);
    assert_eq!(restored.peek(QUEUE, 10).len(), 4);
    assert_eq!(restored.peek(&queue::dlq_name(QUEUE), 10).len(), 1);
    // The dedup window holds in the restored queue, also for the acked.
    assert_eq!(
        restored.send(now, QUEUE, msg(first.id.seq)),
        Ok(Accepted::Duplicate)
    );
}

#[test]
fn a_lone_replica_serves_after_its_first_entry_and_confirms_on_commit() {
    let now = test_origin();
    let mut rng = SmallRng::seed_from_u64(1);
    let mut g: Group = QueueGroup::new(
        1,
        Members::of([1]),
        raft::Config::default(),
        HardState::default(),
        Vec::new(),
        now,
        &mut rng,
    );
    assert_eq!(
        g.propose(Vec::new(), vec![Token::Sent(0)]),
        Err(NotServing { leader: None })
    );
    g.handle_timeout(g.poll_timeout(), &mut rng);
    let mut outs = Vec::new();
    while let Some(o) = g.poll_output() {
        outs.push(o);
    }
    assert!(outs.iter().any(|o| matches!(o, GroupOutput::Serve)));
    assert!(g.serving());
    let put = QueueOp::from_journal(
        Journal::Stored {
            jid: 1,
            queue: QUEUE.into(),
            msg: msg(1),
        },
        now,
        EPOCH_US,
    );
    g.propose(vec![put], vec![Token::Sent(1)]).unwrap();
    let mut confirmed = Vec::new();
    while let Some(o) = g.poll_output() {
        if let GroupOutput::Confirmed(s) = o {
            confirmed.push(s);
        }
    }
    assert_eq!(confirmed, [Token::Sent(1)]);
    assert_eq!(g.state().len(), 1);
}

/// What a crash keeps of a replica.
#[derive(Debug, Clone, Default)]
struct Disk {
    state: HardState<Node>,
    log: Vec<Entry<Node, Batch>>,
}

struct Replica {
    group: Group,
    /// The queue it serves (while it serves).
    live: Option<Queues<Node>>,
}

struct InFlight {
    at: Instant,
    seq: u64,
    from: Node,
    to: Node,
    message: Message<Node, Batch>,
}

/// Three replicas, a producer of numbered sends with dedup keys (sent
/// again when their fate is unknown), and a consumer that acks most of
/// what it gets.
struct World {
    origin: Instant,
    now: Instant,
    rng: SmallRng,
    replicas: BTreeMap<Node, Option<Replica>>,
    disks: BTreeMap<Node, Disk>,
    net: Vec<InFlight>,
    net_seq: u64,
    cut: BTreeSet<Node>,
    loss: u32,
    dup: u32,
    /// Sends waiting to be taken (new, or sent again).
    to_send: VecDeque<Seq>,
    next: Seq,
    /// Sends a replica took and has not answered yet.
    taken: BTreeMap<Seq, Node>,
    confirmed: BTreeSet<Seq>,
    /// Acks committed.
    acked: BTreeSet<Seq>,
    deliveries: BTreeMap<Seq, u32>,
    /// Leaders that began to serve.
    serves: u64,
    /// When the serving leader crashed, until another serves.
    leader_lost: Option<Instant>,
    /// Virtual time from a serving leader's crash (the others up and
    /// connected) to the next serving, with no other fault in between.
    gaps: Vec<Duration>,
    unknown: u64,
}

impl World {
    fn new(seed: u64) -> Self {
        let origin = test_origin();
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut replicas = BTreeMap::new();
        for i in 1..=3 {
            replicas.insert(i, Some(Self::replica(i, Disk::default(), origin, &mut rng)));
        }
        Self {
            origin,
            now: origin,
            rng,
            replicas,
            disks: (1..=3).map(|i| (i, Disk::default())).collect(),
            net: Vec::new(),
            net_seq: 0,
            cut: BTreeSet::new(),
            loss: 0,
            dup: 0,
            to_send: VecDeque::new(),
            next: 0,
            taken: BTreeMap::new(),
            confirmed: BTreeSet::new(),
            acked: BTreeSet::new(),
            deliveries: BTreeMap::new(),
            serves: 0,
            leader_lost: None,
            gaps: Vec::new(),
            unknown: 0,
        }
    }

    fn replica(i: Node, disk: Disk, now: Instant, rng: &mut SmallRng) -> Replica {
        Replica {
            group: QueueGroup::new(
                i,
                Members::of([1, 2, 3]),
                raft::Config::default(),
                disk.state,
                disk.log,
                now,
                rng,
            ),
            live: None,
        }
    }

    /// Takes replica `i`'s outputs: writes, messages, serving, and what
    /// is confirmed.
    fn drain(&mut self, i: Node) {
        let now = self.now;
        let now_us = now_us(self.origin, now);
        loop {
            let out = match self.replicas.get_mut(&i) {
                Some(Some(r)) => r.group.poll_output(),
                _ => None,
            };
            let Some(out) = out else {
                return;
            };
            match out {
                GroupOutput::Persist { state, entries } => {
                    let d = self.disks.get_mut(&i).unwrap();
                    d.state = state;
                    if let Some(first) = entries.first() {
                        // Indices run on from 1: what is from `first` on
                        // goes.
                        d.log.truncate(first.index.saturating_sub(1) as usize);
                        d.log.extend(entries);
                    }
                }
                GroupOutput::Send { to, message } => self.send(i, to, message),
                GroupOutput::Serve => {
                    let Some(Some(r)) = self.replicas.get_mut(&i) else {
                        unreachable!("it has just spoken");
                    };
                    let mut live = Queues::new(queue::Config::default());
                    r.group.state().restore_into(&mut live, now, now_us);
                    live.set_journal(true);
                    // The restore's own journal (dedup keys afresh) is
                    // not news to the replicas.
                    live.drain_journal(&mut Vec::new());
                    live.set_consumer(QUEUE, 1, consumer()).unwrap();
                    r.live = Some(live);
                    self.serves += 1;
                    if let Some(at) = self.leader_lost.take() {
                        self.gaps.push(now - at);
                    }
                }
                GroupOutput::Stop => {
                    let Some(Some(r)) = self.replicas.get_mut(&i) else {
                        unreachable!("it has just spoken");
                    };
                    r.live = None;
                }
                GroupOutput::Confirmed(Token::Sent(s)) => {
                    self.taken.remove(&s);
                    self.confirmed.insert(s);
                }
                GroupOutput::Confirmed(Token::Acked(s)) => {
                    self.acked.insert(s);
                }
                GroupOutput::Unknown(Token::Sent(s)) => {
                    self.taken.remove(&s);
                    self.unknown += 1;
                    self.to_send.push_back(s);
                }
                // The message comes back to a consumer of the next leader.
                GroupOutput::Unknown(Token::Acked(_)) => {}
                GroupOutput::Role { .. } => {}
            }
        }
    }

    fn send(&mut self, from: Node, to: Node, message: Message<Node, Batch>) {
        if self.cut.contains(&from) || self.cut.contains(&to) {
            return;
        }
        if self.rng.gen_range(0..1000) < self.loss {
            return;
        }
        let copies = if self.rng.gen_range(0..1000) < self.dup {
            2
        } else {
            1
        };
        for _ in 0..copies {
            self.net_seq += 1;
            let at = self.now + Duration::from_millis(self.rng.gen_range(1..15));
            self.net.push(InFlight {
                at,
                seq: self.net_seq,
                from,
                to,
                message: message.clone(),
            });
        }
    }

    /// One 5 ms step: messages and timers due, then the services' turn on
    /// every serving replica (sends, deliveries, acks), each turn one
    /// proposal.
    fn step(&mut self, produce: u32, ack_per_mille: u32) {
        self.now += Duration::from_millis(5);
        let now = self.now;
        self.net.sort_by_key(|m| (m.at, m.seq));
        while self.net.first().is_some_and(|m| m.at <= now) {
            let m = self.net.remove(0);
            if let Some(Some(r)) = self.replicas.get_mut(&m.to) {
                r.group
                    .handle_message(now, m.from, m.message, &mut self.rng);
            }
            self.drain(m.to);
        }
        let ids: Vec<Node> = self.replicas.keys().copied().collect();
        for &i in &ids {
            if let Some(Some(r)) = self.replicas.get_mut(&i) {
                if r.group.poll_timeout() <= now {
                    r.group.handle_timeout(now, &mut self.rng);
                }
            }
            self.drain(i);
        }
        for _ in 0..produce {
            self.to_send.push_back(self.next);
            self.next += 1;
        }
        // The producer sends to the first replica it finds serving (an
        // old leader that has not noticed yet may be the one).
        let server = ids.iter().copied().find(|i| {
            self.replicas[i]
                .as_ref()
                .is_some_and(|r| r.live.is_some() && r.group.serving())
        });
        for &i in &ids {
            self.turn(i, server == Some(i), ack_per_mille);
            self.drain(i);
        }
    }

    fn turn(&mut self, i: Node, produce: bool, ack_per_mille: u32) {
        let now = self.now;
        let now_us = now_us(self.origin, now);
        let Some(Some(r)) = self.replicas.get_mut(&i) else {
            return;
        };
        let Some(live) = r.live.as_mut() else {
            return;
        };
        let mut confirms = Vec::new();
        if produce {
            while let Some(s) = self.to_send.pop_front() {
                match live.send(now, QUEUE, msg(s)) {
                    Ok(_) => {
                        confirms.push(Token::Sent(s));
                        self.taken.insert(s, i);
                    }
                    Err(e) => panic!("send {s} refused: {e}"),
                }
            }
        }
        if live.poll_timeout().is_some_and(|t| t <= now) {
            live.handle_timeout(now);
        }
        while let Some(d) = live.poll_dispatch(now) {
            *self.deliveries.entry(d.id.seq).or_default() += 1;
            if self.rng.gen_range(0..1000) < ack_per_mille {
                assert!(live.ack(d.tag, &1), "a fresh delivery acks");
                confirms.push(Token::Acked(d.id.seq));
            }
        }
        let mut journal = Vec::new();
        live.drain_journal(&mut journal);
        let ops: Batch = journal
            .into_iter()
            .map(|j| QueueOp::from_journal(j, now, now_us))
            .collect();
        if ops.is_empty() && confirms.is_empty() {
            return;
        }
        if let Err(e) = r.group.propose(ops, confirms) {
            panic!("a serving replica refused its turn: {e:?}");
        }
    }

    fn crash(&mut self, i: Node) {
        // Failover is timed from a clean start: the others up and
        // connected.
        let served = self.replicas[&i]
            .as_ref()
            .is_some_and(|r| r.group.serving());
        let others_up = self.replicas.values().all(Option::is_some);
        if served && others_up && self.cut.is_empty() {
            self.leader_lost = Some(self.now);
        }
        self.replicas.insert(i, None);
        // Sends it took and did not answer: their senders time out and
        // send again.
        let lost: Vec<Seq> = self
            .taken
            .iter()
            .filter(|(_, n)| **n == i)
            .map(|(s, _)| *s)
            .collect();
        for s in lost {
            self.taken.remove(&s);
            self.to_send.push_back(s);
        }
        self.net.retain(|m| m.to != i);
    }

    fn restart(&mut self, i: Node) {
        if self.replicas[&i].is_none() {
            let disk = self.disks[&i].clone();
            let r = Self::replica(i, disk, self.now, &mut self.rng);
            self.replicas.insert(i, Some(r));
        }
    }

    /// No two messages held with the same dedup key: a send taken again
    /// after a failover was known to be a duplicate.
    fn check_dedup(&self) {
        for r in self.replicas.values().flatten() {
            let mut seen = BTreeSet::new();
            for m in r.group.state().messages() {
                assert!(
                    seen.insert(m.id.seq),
                    "send {} held twice by replica {}",
                    m.id.seq,
                    r.group.raft().id()
                );
            }
        }
    }

    fn run(&mut self, d: Duration, produce_every: u32, ack_per_mille: u32) {
        let steps = d.as_millis() / 5;
        for k in 0..steps {
            let produce = u32::from(produce_every > 0 && k % u128::from(produce_every) == 0);
            self.step(produce, ack_per_mille);
            if k % 20 == 0 {
                self.check_dedup();
            }
        }
    }
}

/// One seeded run: 30 s of faults under load, then 30 s healed with the
/// consumer acking everything.
fn random_run(seed: u64) -> (u64, u64, u64, Vec<Duration>) {
    let mut w = World::new(seed);
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xfa17);
    w.loss = rng.gen_range(0..30);
    w.dup = rng.gen_range(0..20);
    w.run(Duration::from_secs(3), 2, 700);
    let end = w.now + Duration::from_secs(30);
    while w.now < end {
        let d = Duration::from_millis(rng.gen_range(200..2500));
        w.run(d, 2, 700);
        let pick = rng.gen_range(1..=3);
        // A failover being timed is not timed through another fault.
        w.leader_lost = None;
        match rng.gen_range(0..100) {
            // Crash the leader, or whoever was picked.
            0..=29 => {
                let leader = (1..=3).find(|i| {
                    w.replicas[i]
                        .as_ref()
                        .is_some_and(|r| r.group.raft().role() == Role::Leader)
                });
                let down = w.replicas.values().filter(|r| r.is_none()).count();
                if down == 0 {
                    w.crash(leader.unwrap_or(pick));
                }
            }
            30..=49 => w.restart(pick),
            // Isolate one replica (a partitioned leader must not confirm).
            50..=69 => {
                w.cut.clear();
                w.cut.insert(pick);
            }
            70..=84 => w.cut.clear(),
            _ => {
                w.crash(pick);
                w.restart(pick);
            }
        }
    }
    w.cut.clear();
    w.loss = 0;
    w.dup = 0;
    for i in 1..=3 {
        w.restart(i);
    }
    w.run(Duration::from_secs(30), 0, 1000);
    assert!(w.to_send.is_empty(), "seed {seed}: sends never taken");
    assert!(
        w.taken.is_empty(),
        "seed {seed}: sends never answered: {:?}",
        w.taken
    );
    // By the committed log (every replica's, all committed by now):
    // each send queued once, failovers or not, and consumed (its
    // message removed by an ack). An ack reported unknown may have
    // committed: the log tells.
    for r in w.replicas.values().flatten() {
        let raft = r.group.raft();
        assert_eq!(raft.commit_index(), raft.last_index(), "seed {seed}");
        let mut puts = BTreeMap::<Seq, u32>::new();
        let mut holding = BTreeMap::<u64, Seq>::new();
        let mut consumed = BTreeSet::new();
        for e in raft.log() {
            let Payload::Data(ops) = &e.payload else {
                continue;
            };
            for op in ops {
                match op {
                    QueueOp::Put { jid, id, .. } => {
                        *puts.entry(id.seq).or_default() += 1;
                        holding.insert(*jid, id.seq);
                    }
                    QueueOp::Del { jid } => {
                        let s = holding.remove(jid).expect("a removal of a message held");
                        consumed.insert(s);
                    }
                    _ => {}
                }
            }
        }
        let twice: Vec<_> = puts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "seed {seed}: queued twice: {twice:?}");
        let lost: Vec<Seq> = w.confirmed.difference(&consumed).copied().collect();
        assert!(
            lost.is_empty(),
            "seed {seed}: confirmed and never consumed: {lost:?}"
        );
        assert!(
            w.acked.is_subset(&consumed),
            "seed {seed}: an ack confirmed and its message not removed"
        );
        for s in 0..w.next {
            assert!(
                consumed.contains(&s),
                "seed {seed}: send {s} was never consumed (sent again until taken)"
            );
        }
    }
    let states: Vec<&QueueState> = w
        .replicas
        .values()
        .flatten()
        .map(|r| r.group.state())
        .collect();
    for s in &states {
        assert!(
            s.is_empty(),
            "seed {seed}: a replica still holds {} messages",
            s.len()
        );
        assert_eq!(*s, states[0], "seed {seed}: replicas differ");
    }
    let redelivered = w.deliveries.values().filter(|n| **n > 1).count() as u64;
    (w.serves, w.unknown, redelivered, w.gaps)
}

#[test]
fn random_faults_lose_nothing_confirmed() {
    let seeds: u64 = std::env::var("MESH_REPLICA_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let (mut serves, mut unknown, mut redelivered) = (0, 0, 0);
    let mut gaps = Vec::new();
    for seed in 0..seeds {
        let (s, u, r, g) = random_run(seed);
        serves += s;
        unknown += u;
        redelivered += r;
        gaps.extend(g);
    }
    gaps.sort();
    let pct = |p: usize| gaps.get((gaps.len() * p / 100).min(gaps.len().saturating_sub(1)));
    // The runs must have exercised failover, or they proved nothing.
    assert!(serves > seeds * 2, "too few failovers: {serves}");
    eprintln!(
        "{seeds} seeds: {serves} leaders served, {unknown} confirmations unknown (sent again), {redelivered} messages delivered more than once; \
         serving leader crashed to the next serving ({} clean crashes, virtual time): p50 {:?}, p99 {:?}, max {:?}",
        gaps.len(),
        pct(50),
        pct(99),
        gaps.last()
    );
}
