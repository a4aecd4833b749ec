//! The simulator: determinism, every fault, and the delivery checkers over
//! many random seeds.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use mesh::{
    sim::{Checker, Sim},
    Node, Pattern, PeerState,
};
use rand::{rngs::SmallRng, Rng, SeedableRng};

const S: Duration = Duration::from_secs(1);

/// How `peer` looks from `node`.
fn state(sim: &Sim, node: &str, peer: &str) -> Option<PeerState> {
    let n = sim.get(node)?;
    let id = sim.peer_id(peer);
    sim.block_on(n.peers())
        .into_iter()
        .find(|p| p.id == id)
        .map(|p| p.state)
}

fn mesh_of(sim: &mut Sim, names: &[&str]) -> Vec<Node> {
    let nodes = names.iter().map(|n| sim.node(n)).collect();
    sim.run_until(|s| s.converged(), 30 * S)
        .expect("mesh converges");
    nodes
}

#[test]
fn three_nodes_converge_and_deliver() {
    let mut sim = Sim::new(1);
    let nodes = mesh_of(&mut sim, &["a", "b", "c"]);
    let mut sub = sim.block_on(nodes[2].subscribe("t.>")).unwrap();
    sim.run_until(|s| s.routed("a", "t.x"), 5 * S)
        .expect("routed");
    sim.block_on(nodes[0].publish("t.x", "hello")).unwrap();
    let got = sim.block_on_for(5 * S, sub.next()).expect("in time");
    assert_eq!(got.unwrap().payload, "hello");
}

/// A scenario with faults of every kind and traffic; returns the trace hash.
fn scenario(seed: u64) -> (u64, u64) {
    let mut sim = Sim::builder()
        .seed(seed)
        .latency(Duration::from_millis(1)..Duration::from_millis(20))
        .loss(0.02)
        .duplicate(0.02)
        .build();
    let nodes = mesh_of(&mut sim, &["a", "b", "c", "d"]);
    let mut sub = sim.block_on(nodes[3].subscribe(">")).unwrap();
    sim.run_until(|s| ["a", "b", "c"].iter().all(|p| s.routed(p, "x")), 5 * S)
        .unwrap();
    for i in 0..50u32 {
        sim.block_on(nodes[i as usize % 3].publish("x", i.to_string()))
            .unwrap();
    }
    sim.run_for(S);
    sim.partition(&[&["a", "b"], &["c", "d"]]);
    sim.run_for(15 * S);
    sim.crash("b");
    sim.pause("c");
    sim.run_for(3 * S);
    sim.resume("c");
    sim.restart("b");
    sim.heal();
    sim.run_until(|s| s.converged(), 60 * S).unwrap();
    let mut got = 0;
    while let Ok(Some(_)) = sim.block_on_for(S, sub.next()) {
        got += 1;
    }
    (sim.trace_hash(), got)
}

#[test]
fn same_seed_same_trace() {
    let (h1, got1) = scenario(42);
    let (h2, got2) = scenario(42);
    assert_eq!(h1, h2, "two runs of seed 42 diverged");
    assert_eq!(got1, got2);
    assert_eq!(got1, 50, "all sent before the partition arrive");
    let (h3, _) = scenario(43);
    assert_ne!(h1, h3, "another seed, another run");
}

#[test]
fn partition_is_detected_and_heals() {
    let mut sim = Sim::new(2);
    let nodes = mesh_of(&mut sim, &["a", "b", "c"]);
    let mut sub = sim.block_on(nodes[2].subscribe("t")).unwrap();
    sim.run_until(|s| s.routed("a", "t"), 5 * S).unwrap();

    sim.partition(&[&["a", "b"], &["c"]]);
    sim.run_until(
        |s| {
            state(s, "a", "c") == Some(PeerState::Down)
                && state(s, "c", "b") == Some(PeerState::Down)
        },
        30 * S,
    )
    .expect("both sides declare the other down");
    assert_eq!(
        state(&sim, "a", "b"),
        Some(PeerState::Alive),
        "a and b still see each other"
    );
    // Nobody to send to on a's side of the partition.
    assert!(!sim.routed("a", "t"));

    sim.heal();
    let took = sim.run_until(|s| s.converged(), 60 * S).expect("heals");
    eprintln!("converged {took:?} after the heal");
    sim.run_until(|s| s.routed("a", "t"), 10 * S).unwrap();
    sim.block_on(nodes[0].publish("t", "after")).unwrap();
    let got = sim.block_on_for(5 * S, sub.next()).expect("delivered");
    assert_eq!(got.unwrap().payload, "after");
}

#[test]
fn short_partition_loses_nothing_on_a_live_connection() {
    // Shorter than the idle timeout and the failure detector's patience:
    // the connection survives and holds what was written meanwhile.
    let mut sim = Sim::new(3);
    let config = mesh::core::membership::Config {
        suspicion_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let a = sim.node_with("a", Node::builder().failure_detection(config.clone()));
    let b = sim.node_with("b", Node::builder().failure_detection(config));
    sim.run_until(|s| s.converged(), 10 * S).unwrap();
    let mut sub = sim.block_on(b.subscribe("t")).unwrap();
    sim.run_until(|s| s.routed("a", "t"), 5 * S).unwrap();
    sim.partition(&[&["a"], &["b"]]);
    for i in 0..10 {
        sim.block_on(a.publish("t", format!("{i}"))).unwrap();
    }
    sim.run_for(2 * S);
    assert!(
        sim.block_on_for(Duration::from_millis(10), sub.next())
            .is_err(),
        "held by the partition"
    );
    sim.heal();
    for i in 0..10 {
        let m = sim
            .block_on_for(5 * S, sub.next())
            .expect("delivered")
            .unwrap();
        assert_eq!(m.payload, format!("{i}"));
    }
}

fn linked(sim: &Sim, node: &str, peer: &str) -> bool {
    let n = sim.get(node).unwrap();
    let id = sim.peer_id(peer);
    sim.block_on(n.peers())
        .iter()
        .any(|p| p.id == id && p.linked)
}

#[test]
fn one_way_partition_breaks_the_link_and_heals() {
    let mut sim = Sim::new(4);
    mesh_of(&mut sim, &["a", "b", "c"]);
    sim.cut("a", "c");
    // The connection times out (c hears nothing from a); both stay alive
    // to the failure detector, which probes around the cut through b.
    sim.run_until(|s| !linked(s, "a", "c") && !linked(s, "c", "a"), 30 * S)
        .expect("a one-way cut breaks the pair's link");
    assert_ne!(state(&sim, "a", "b"), Some(PeerState::Down));
    sim.heal();
    sim.run_until(|s| s.converged(), 60 * S).expect("heals");
}

#[test]
fn isolated_node_rejoins() {
    let mut sim = Sim::new(5);
    mesh_of(&mut sim, &["a", "b", "c", "d"]);
    sim.isolate("d");
    sim.run_until(|s| state(s, "a", "d") == Some(PeerState::Down), 30 * S)
        .expect("isolation detected");
    sim.heal();
    sim.run_until(|s| s.converged(), 60 * S).expect("rejoins");
}

#[test]
fn crashed_node_is_declared_down_and_restarts_with_empty_memory() {
    let mut sim = Sim::new(6);
    let nodes = mesh_of(&mut sim, &["a", "b", "c"]);
    let _sub = sim.block_on(nodes[2].subscribe("t")).unwrap();
    sim.run_until(|s| s.routed("a", "t"), 5 * S).unwrap();
    assert!(sim.crash("c"));
    assert!(!sim.is_up("c"));
    assert!(sim.get("c").is_none());
    // Its handles fail: the process is gone.
    assert!(sim.block_on(nodes[2].publish("t", "x")).is_err());
    sim.run_until(|s| state(s, "a", "c") == Some(PeerState::Down), 30 * S)
        .expect("crash detected");
    assert!(!sim.routed("a", "t"));

    let c = sim.restart("c");
    assert_eq!(c.peer_id(), sim.peer_id("c"), "same identity");
    sim.run_until(|s| s.converged(), 60 * S).expect("rejoins");
    // The subscription died with the process.
    sim.run_for(2 * S);
    assert!(!sim.routed("a", "t"));
    let mut sub = sim.block_on(c.subscribe("t")).unwrap();
    sim.run_until(|s| s.routed("a", "t"), 5 * S).unwrap();
    sim.block_on(nodes[0].publish("t", "again")).unwrap();
    let got = sim.block_on_for(5 * S, sub.next()).expect("delivered");
    assert_eq!(got.unwrap().payload, "again");
}

#[test]
fn quick_restart_is_seen_through_the_stale_connection() {
    let mut sim = Sim::new(7);
    mesh_of(&mut sim, &["a", "b"]);
    sim.crash("b");
    sim.run_for(Duration::from_millis(100));
    sim.restart("b");
    sim.run_until(|s| s.converged(), 30 * S).expect("relinks");
}

#[test]
fn paused_node_is_suspected_then_resumes() {
    let mut sim = Sim::new(8);
    let nodes = mesh_of(&mut sim, &["a", "b", "c"]);
    let mut tick = sim.spawn_on("c", async move {
        // A service task on c: stops while c is paused.
        tokio::time::sleep(Duration::from_secs(5)).await;
        "done"
    });
    sim.pause("c");
    assert!(sim.is_paused("c"));
    sim.run_until(|s| state(s, "a", "c") == Some(PeerState::Down), 30 * S)
        .expect("a paused process looks dead");
    assert!(tick.output().is_none(), "paused tasks do not run");
    sim.resume("c");
    sim.run_until(|s| s.converged(), 60 * S)
        .expect("resumes and rejoins");
    // Its 5 s started when it first ran, after the resume.
    sim.run_for(6 * S);
    assert_eq!(tick.take(), Some("done"));
    drop(nodes);
}

#[test]
fn crash_kills_the_nodes_service_tasks() {
    let mut sim = Sim::new(9);
    mesh_of(&mut sim, &["a"]);
    let mut task = sim.spawn_on("a", async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        1
    });
    sim.crash("a");
    sim.run_for(10 * S);
    assert_eq!(task.take(), None);
}

#[test]
fn minutes_of_mesh_time_take_little_real_time() {
    let mut sim = Sim::new(10);
    mesh_of(&mut sim, &["a", "b", "c", "d", "e"]);
    let before = sim.now();
    sim.run_for(Duration::from_secs(600));
    assert_eq!(sim.now() - before, Duration::from_secs(600));
    assert!(sim.converged());
}

// --- randomised fault schedules over many seeds ---

const PUBLISHERS: [&str; 3] = ["n0", "n1", "n2"];
const TOPICS: [&str; 3] = ["t.0", "t.1", "t.2"];
/// (subscriber node, pattern).
const SUBSCRIBERS: [(&str, &str); 3] = [("n3", "t.>"), ("n4", "t.1"), ("n2", "t.*")];
const NODES: [&str; 5] = ["n0", "n1", "n2", "n3", "n4"];

type Shared = Arc<Mutex<Checker>>;

/// The node with a reliable subscription to every topic.
const RELIABLE_NODE: &str = "n4";

/// What a reliable subscriber saw, per run of its node.
#[derive(Debug, Clone)]
enum REntry {
    Msg(String, u64),
    Lagged(mesh::PeerId),
}
type RLog = Arc<Mutex<Vec<Vec<REntry>>>>;

/// The reliable subscriber service: logs deliveries and gaps.
fn start_reliable_subscriber(sim: &Sim, log: &RLog) {
    let Some(n) = sim.get(RELIABLE_NODE) else {
        return;
    };
    let log = log.clone();
    let run = {
        let mut l = log.lock().unwrap();
        l.push(Vec::new());
        l.len() - 1
    };
    sim.spawn_on(RELIABLE_NODE, async move {
        let mut sub = n.subscribe_reliable("t.>").await.expect("subscribes");
        while let Some(d) = sub.next().await {
            let entry = match d {
                mesh::Delivery::Lagged(l) => REntry::Lagged(l.publisher),
                mesh::Delivery::Message(m) => {
                    let text = String::from_utf8_lossy(&m.payload).into_owned();
                    let (who, n) = text.rsplit_once(':').expect("checker payload");
                    REntry::Msg(who.to_owned(), n.parse().expect("number"))
                }
            };
            log.lock().unwrap()[run].push(entry);
        }
    });
}

/// Never a silent gap: per publisher run, numbers arrive in order, once,
/// and a skipped number is announced by a `Lagged` from that publisher.
fn check_reliable(sim: &Sim, log: &RLog) -> Result<(), String> {
    for (run, entries) in log.lock().unwrap().iter().enumerate() {
        let mut last: std::collections::BTreeMap<&str, u64> = Default::default();
        let mut lagged: std::collections::BTreeSet<mesh::PeerId> = Default::default();
        for e in entries {
            match e {
                REntry::Lagged(p) => {
                    lagged.insert(*p);
                }
                REntry::Msg(who, n) => {
                    let node = who.split('/').next().unwrap();
                    let peer = sim.peer_id(node);
                    if let Some(prev) = last.get(who.as_str()) {
                        if *n <= *prev {
                            return Err(format!(
                                "reliable subscriber run {run}: {who}:{n} after {who}:{prev}"
                            ));
                        }
                        if *n != prev + 1 && !lagged.contains(&peer) {
                            return Err(format!(
                                "reliable subscriber run {run}: silent gap {who}:{prev} -> {who}:{n}"
                            ));
                        }
                    }
                    lagged.remove(&peer);
                    last.insert(who, *n);
                }
            }
        }
    }
    Ok(())
}

/// The subscriber service: records every delivery.
fn start_subscriber(sim: &Sim, checker: &Shared, node: &str, pattern: &str) {
    let Some(n) = sim.get(node) else { return };
    let checker = checker.clone();
    let name = node.to_owned();
    let pattern = pattern.to_owned();
    sim.spawn_on(node, async move {
        let mut sub = n.subscribe(&pattern).await.expect("subscribes");
        while let Some(m) = sub.next().await {
            checker.lock().unwrap().received_message(&name, &m);
        }
    });
}

/// The publisher service: publishes `count` messages, one every `every`.
fn start_publisher(
    sim: &Sim,
    checker: &Shared,
    node: &str,
    incarnation: u32,
    first: u64,
    count: u64,
    every: Duration,
) {
    let Some(n) = sim.get(node) else { return };
    let checker = checker.clone();
    let who = format!("{node}/{incarnation}");
    sim.spawn_on(node, async move {
        for i in first..first + count {
            let topic = TOPICS[i as usize % TOPICS.len()];
            if n.publish(topic, Checker::payload(&who, i)).await.is_ok() {
                checker.lock().unwrap().published(&who, i, topic);
            }
            tokio::time::sleep(every).await;
        }
    });
}

struct Outcome {
    report: mesh::sim::Report,
    converge: Duration,
}

/// Numbers of the final batch (published after convergence) that the
/// reliable subscriber's current run did not get (the first ten).
fn reliable_missing_final(log: &RLog, final_names: &[String]) -> Vec<String> {
    let log = log.lock().unwrap();
    let current = log.last().cloned().unwrap_or_default();
    let mut missing = Vec::new();
    for who in final_names {
        for n in 0..FINAL_BATCH {
            let got = current
                .iter()
                .any(|e| matches!(e, REntry::Msg(w, m) if w == who && *m == n));
            if !got && missing.len() < 10 {
                missing.push(format!("{who}:{n}"));
            }
        }
    }
    missing
}

const FINAL_BATCH: u64 = 30;

fn random_run(seed: u64, private: bool) -> Result<Outcome, String> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed);
    let max_latency = rng.gen_range(1..30);
    let mut sim = Sim::builder()
        .seed(seed)
        .latency(Duration::from_micros(200)..Duration::from_millis(max_latency))
        .loss(rng.gen_range(0.0..0.05))
        .duplicate(rng.gen_range(0.0..0.05))
        .reorder(rng.gen_bool(0.5))
        .record_trace(std::env::var_os("MESH_SIM_TRACE").is_some())
        .build();
    for n in NODES {
        if private {
            // A private mesh: each link's outbox waits for the handshake.
            let secret = mesh::security::MeshSecret::new("the simulated mesh's secret").unwrap();
            sim.node_with(n, Node::builder().mesh_secret(secret));
        } else {
            sim.node(n);
        }
    }
    sim.run_until(|s| s.converged(), 30 * S)
        .map_err(|e| format!("initial convergence: {e}"))?;
    let checker: Shared = Default::default();
    for (node, pattern) in SUBSCRIBERS {
        checker
            .lock()
            .unwrap()
            .subscriber(node, Pattern::new(pattern).unwrap());
        start_subscriber(&sim, &checker, node, pattern);
    }
    let rlog: RLog = Default::default();
    start_reliable_subscriber(&sim, &rlog);
    let mut incarnation = [0u32; NODES.len()];
    for p in PUBLISHERS {
        start_publisher(&sim, &checker, p, 0, 0, 400, Duration::from_millis(100));
    }

    // Faults for 40 s of mesh time.
    let mut crashed: Vec<&str> = Vec::new();
    let mut paused: Vec<&str> = Vec::new();
    let end = sim.now() + 40 * S;
    while sim.now() < end {
        sim.run_for(Duration::from_millis(rng.gen_range(200..4000)));
        let pick = NODES[rng.gen_range(0..NODES.len())];
        match rng.gen_range(0..100) {
            0..=24 => {
                let mut a = Vec::new();
                let mut b = Vec::new();
                for n in NODES {
                    if rng.gen_bool(0.5) {
                        a.push(n)
                    } else {
                        b.push(n)
                    }
                }
                sim.record("partition");
                sim.partition(&[&a, &b]);
            }
            25..=34 => {
                let other = NODES[rng.gen_range(0..NODES.len())];
                if other != pick {
                    sim.cut(pick, other);
                }
            }
            35..=44 => sim.isolate(pick),
            45..=69 => sim.heal(),
            70..=79 if crashed.len() < 2 && !paused.contains(&pick) && sim.crash(pick) => {
                crashed.push(pick);
            }
            80..=89 if !crashed.is_empty() => {
                let n = crashed.swap_remove(rng.gen_range(0..crashed.len()));
                restart(&mut sim, &checker, &rlog, n, &mut incarnation);
            }
            90..=94 if !crashed.contains(&pick) && !paused.contains(&pick) => {
                sim.pause(pick);
                paused.push(pick);
            }
            95..=99 if !paused.is_empty() => {
                let n = paused.swap_remove(0);
                sim.resume(n);
            }
            _ => {}
        }
    }

    // Liveness: after the last heal, membership converges in bounded time.
    sim.heal();
    for n in paused.drain(..) {
        sim.resume(n);
    }
    for n in crashed.drain(..) {
        restart(&mut sim, &checker, &rlog, n, &mut incarnation);
    }
    let converge = sim
        .run_until(|s| s.converged(), 60 * S)
        .map_err(|e| format!("no convergence after the last heal: {e}"))?;
    // ... and every subscriber's interest is known to every publisher.
    sim.run_until(
        |s| {
            PUBLISHERS.iter().all(|p| {
                TOPICS.iter().all(|t| {
                    let want = SUBSCRIBERS
                        .iter()
                        .filter(|(n, pat)| n != p && Pattern::new(pat).unwrap().matches(t))
                        .count();
                    let node = s.get(p).unwrap();
                    s.block_on(node.remote_subscribers(t)).unwrap().len() >= want
                })
            })
        },
        20 * S,
    )
    .map_err(|e| format!("subscriptions not known everywhere after convergence: {e}"))?;
    // Messages published after convergence reach every matching subscriber.
    sim.run_for(S);
    sim.record("final publishes");
    let mut final_names = Vec::new();
    for (i, p) in PUBLISHERS.iter().enumerate() {
        let who = format!("{p}/{}", incarnation[i] + 1000);
        final_names.push(who.clone());
        for (sub, _) in SUBSCRIBERS {
            checker.lock().unwrap().expect_from(sub, &who, 0);
        }
        start_publisher(
            &sim,
            &checker,
            p,
            incarnation[i] + 1000,
            0,
            FINAL_BATCH,
            Duration::from_millis(10),
        );
    }
    // Earlier publishers (still running or not) are best-effort: excuse
    // their losses but not duplicates or reordering.
    {
        let mut c = checker.lock().unwrap();
        for (i, p) in PUBLISHERS.iter().enumerate() {
            for inc in 0..=incarnation[i] {
                for (sub, _) in SUBSCRIBERS {
                    c.expect_from(sub, &format!("{p}/{inc}"), u64::MAX);
                }
            }
        }
    }
    sim.run_for(10 * S);
    if let Some(path) = std::env::var_os("MESH_SIM_TRACE") {
        let names: Vec<String> = NODES
            .iter()
            .map(|n| format!("{n}={}", sim.peer_id(n)))
            .collect();
        let mut lines = names;
        lines.extend(sim.trace_lines());
        std::fs::write(path, lines.join("\n")).expect("trace written");
    }
    common::golden(
        if private { "sim-private" } else { "sim" },
        seed,
        sim.trace_hash(),
    );
    let report = checker.lock().unwrap().report();
    check_reliable(&sim, &rlog)?;
    let missing = reliable_missing_final(&rlog, &final_names);
    if !missing.is_empty() {
        return Err(format!(
            "reliable subscriber missed messages published after convergence: {missing:?}"
        ));
    }
    Ok(Outcome { report, converge })
}

fn restart(
    sim: &mut Sim,
    checker: &Shared,
    rlog: &RLog,
    node: &'static str,
    incarnation: &mut [u32],
) {
    sim.restart(node);
    if node == RELIABLE_NODE {
        start_reliable_subscriber(sim, rlog);
    }
    let i = NODES.iter().position(|n| *n == node).unwrap();
    incarnation[i] += 1;
    // Its services start again with it.
    for (n, pattern) in SUBSCRIBERS {
        if n == node {
            start_subscriber(sim, checker, n, pattern);
        }
    }
    if PUBLISHERS.contains(&node) {
        start_publisher(
            sim,
            checker,
            node,
            incarnation[i],
            0,
            400,
            Duration::from_millis(100),
        );
    }
}

fn check_seed(seed: u64, private: bool) -> Result<Duration, String> {
    // MESH_SIM_LOG=mesh=debug: the nodes' logs, for replaying one seed.
    if let Ok(filter) = std::env::var("MESH_SIM_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    let out = random_run(seed, private)?;
    let r = &out.report;
    if !r.safe() {
        return Err(format!("safety violated:\n{r}"));
    }
    if r.lost() > 0 {
        return Err(format!(
            "messages published after convergence were lost:\n{r}"
        ));
    }
    Ok(out.converge)
}

fn replay_hint(seed: u64, private: bool) -> String {
    let test = if private {
        "sim_random_private"
    } else {
        "sim_random"
    };
    format!("replay: MESH_SIM_SEED={seed} cargo test -p mesh --test sim {test} -- --exact")
}

/// Seeds `range` (or just `MESH_SIM_SEED`), each a random fault schedule.
fn sweep(range: std::ops::Range<u64>, private: bool) {
    let seeds = common::seeds(range);
    let started = std::time::Instant::now();
    let mut worst = Duration::ZERO;
    for &seed in &seeds {
        match check_seed(seed, private) {
            Ok(converge) => worst = worst.max(converge),
            Err(e) => panic!("seed {seed}: {e}\n{}", replay_hint(seed, private)),
        }
    }
    eprintln!(
        "{} seeds in {:?}; slowest convergence after the last heal: {worst:?} of virtual time",
        seeds.len(),
        started.elapsed()
    );
}

/// The number of seeds per sweep test (four tests run in parallel).
fn per_test() -> u64 {
    common::per_test("MESH_SIM_SEEDS", 4, 125)
}

#[test]
fn sim_random() {
    let n = per_test();
    sweep(0..n, false);
}

#[test]
fn sim_random_2() {
    let n = per_test();
    sweep(n..2 * n, false);
}

#[test]
fn sim_random_3() {
    let n = per_test();
    sweep(2 * n..3 * n, false);
}

#[test]
fn sim_random_4() {
    let n = per_test();
    sweep(3 * n..4 * n, false);
}

/// The same schedules in a private mesh, where each link's writer sends
/// nothing until the peer has proved it holds the secret.
#[test]
fn sim_random_private() {
    let n = per_test() / 2;
    sweep(0..n, true);
}

// --- reliable pub/sub ---

fn reliable_pair(
    seed: u64,
    window: usize,
) -> (Sim, Node, mesh::ReliableSubscription, mesh::Subscription) {
    let mut sim = Sim::new(seed);
    let a = sim.node_with("a", Node::builder().reliable_window(window));
    let _b = sim.node("b");
    let c = sim.node("c");
    let d = sim.node("d");
    sim.run_until(|s| s.converged(), 30 * S).unwrap();
    let reliable = sim.block_on(c.subscribe_reliable("t.>")).unwrap();
    // A best-effort subscriber (on a node without reliable ones).
    let best_effort = sim.block_on(d.subscribe("t.>")).unwrap();
    sim.run_until(
        |s| s.block_on(a.remote_subscribers("t.x")).unwrap().len() == 2,
        5 * S,
    )
    .unwrap();
    (sim, a, reliable, best_effort)
}

/// Publishes `n` numbered messages from `from`, 10 ms apart.
fn publish_numbered(sim: &mut Sim, node: &Node, from: u64, n: u64) {
    for i in from..from + n {
        sim.block_on(node.publish("t.x", i.to_string())).unwrap();
        sim.run_for(Duration::from_millis(10));
    }
}

fn number(d: &mesh::Delivery) -> Option<u64> {
    match d {
        mesh::Delivery::Message(m) => std::str::from_utf8(&m.payload).ok()?.parse().ok(),
        mesh::Delivery::Lagged(_) => None,
    }
}

#[test]
fn reliable_subscriber_gets_every_message_after_a_long_partition() {
    let (mut sim, a, mut reliable, mut best_effort) = reliable_pair(11, 4096);
    publish_numbered(&mut sim, &a, 0, 20);
    // Long enough for the connection to time out and c to be declared down.
    sim.partition(&[&["a", "b"], &["c", "d"]]);
    sim.run_until(|s| !s.routed("a", "t.x"), 30 * S)
        .expect("c declared down");
    publish_numbered(&mut sim, &a, 20, 300);
    sim.heal();
    sim.run_until(|s| s.converged(), 60 * S).expect("heals");
    publish_numbered(&mut sim, &a, 320, 20);
    sim.run_for(2 * S);

    let mut got = Vec::new();
    while let Ok(Some(d)) = sim.block_on_for(Duration::from_millis(100), reliable.next()) {
        got.push(number(&d).expect("no loss within the window"));
    }
    assert_eq!(
        got,
        (0..340).collect::<Vec<_>>(),
        "every message, once, in order"
    );

    // The best-effort subscriber lost the partition's.
    let mut plain = 0;
    while let Ok(Some(_)) = sim.block_on_for(Duration::from_millis(100), best_effort.next()) {
        plain += 1;
    }
    assert!(plain < 340, "best effort lost messages ({plain})");
}

#[test]
fn reliable_subscriber_cut_off_past_the_window_gets_lagged() {
    let (mut sim, a, mut reliable, _) = reliable_pair(12, 50);
    publish_numbered(&mut sim, &a, 0, 10);
    sim.partition(&[&["a", "b"], &["c", "d"]]);
    sim.run_until(|s| !s.routed("a", "t.x"), 30 * S)
        .expect("c declared down");
    publish_numbered(&mut sim, &a, 10, 200);
    sim.heal();
    sim.run_until(|s| s.converged(), 60 * S).expect("heals");
    // Let c's resume request reach a before a publishes again (a later
    // publish would push one more message out of the window).
    sim.run_for(S);
    publish_numbered(&mut sim, &a, 210, 5);
    sim.run_for(2 * S);

    let mut got = Vec::new();
    let mut lagged = Vec::new();
    while let Ok(Some(d)) = sim.block_on_for(Duration::from_millis(100), reliable.next()) {
        match d {
            mesh::Delivery::Lagged(l) => {
                assert_eq!(l.publisher, a.peer_id());
                lagged.push((got.len(), l.missed));
            }
            m => got.push(number(&m).unwrap()),
        }
    }
    // 10 before, then 200 during of which the window kept the last 50.
    assert_eq!(
        lagged,
        vec![(10, 150)],
        "one explicit gap where it happened"
    );
    let want: Vec<u64> = (0..10).chain(160..215).collect();
    assert_eq!(got, want);
}

#[test]
fn reliable_subscription_survives_a_publisher_restart() {
    let (mut sim, a, mut reliable, _) = reliable_pair(13, 4096);
    publish_numbered(&mut sim, &a, 0, 5);
    sim.crash("a");
    let a = sim.restart("a");
    sim.run_until(|s| s.converged(), 60 * S).expect("rejoins");
    sim.run_until(|s| s.routed("a", "t.x"), 10 * S).unwrap();
    publish_numbered(&mut sim, &a, 5, 5);
    sim.run_for(2 * S);
    let mut got = Vec::new();
    while let Ok(Some(d)) = sim.block_on_for(Duration::from_millis(100), reliable.next()) {
        got.push(number(&d).expect("a new session is not a gap"));
    }
    assert_eq!(got, (0..10).collect::<Vec<_>>());
}

// --- gossip mode on whole nodes ---

#[test]
fn gossip_mode_reaches_every_node_and_heals() {
    let mut sim = Sim::new(21);
    let names: Vec<String> = (0..12).map(|i| format!("g{i}")).collect();
    let nodes: Vec<Node> = names
        .iter()
        .map(|n| sim.node_with(n, Node::builder().gossip(Pattern::new("g.>").unwrap())))
        .collect();
    sim.run_until(|s| s.converged(), 30 * S).unwrap();
    sim.run_for(2 * S);
    let mut subs: Vec<_> = nodes
        .iter()
        .map(|n| sim.block_on(n.subscribe("g.>")).unwrap())
        .collect();
    sim.run_for(S);
    let count = |sim: &Sim, subs: &mut Vec<mesh::Subscription>, want: usize| -> Vec<usize> {
        subs.iter_mut()
            .map(|s| {
                let mut got = 0;
                while got < want {
                    match sim.block_on_for(Duration::from_secs(2), s.next()) {
                        Ok(Some(_)) => got += 1,
                        _ => break,
                    }
                }
                got
            })
            .collect()
    };
    for i in 0..50 {
        sim.block_on(nodes[i % 3].publish("g.x", format!("{i}")))
            .unwrap();
        sim.run_for(Duration::from_millis(5));
    }
    assert_eq!(
        count(&sim, &mut subs, 50),
        vec![50; 12],
        "every node gets every message"
    );

    let (left, right): (Vec<&str>, Vec<&str>) = names
        .iter()
        .map(String::as_str)
        .partition(|n| n[1..].parse::<u32>().unwrap() % 2 == 0);
    sim.partition(&[&left, &right]);
    sim.run_for(20 * S);
    sim.heal();
    sim.run_until(|s| s.converged(), 60 * S).expect("heals");
    sim.run_for(5 * S);
    for i in 0..50 {
        sim.block_on(nodes[1].publish("g.x", format!("after {i}")))
            .unwrap();
        sim.run_for(Duration::from_millis(5));
    }
    let after = count(&sim, &mut subs, 50);
    assert_eq!(
        after,
        vec![50; 12],
        "after the heal every node gets every message"
    );
}
