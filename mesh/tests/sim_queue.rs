//! Work queues under simulated faults: consumer crashes, partitions between
//! host and consumer, an isolated host, poison messages, and random fault
//! schedules over many seeds, judged by the total-queue checker (nothing
//! lost while its host lived, nothing unexpected).

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use mesh::{
    queue::ConsumeOptions,
    sim::{QueueChecker, Sim},
    Node,
};
use rand::{rngs::SmallRng, Rng, SeedableRng};

const S: Duration = Duration::from_secs(1);

type Shared = Arc<Mutex<QueueChecker>>;

/// How a consumer service treats what it gets.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    /// Acks everything.
    Ack,
    /// Holds every delivery forever (a consumer stuck mid-message).
    Hold,
    /// Nacks "poison" payloads, acks the rest.
    NackPoison,
    /// Nacks one delivery in `n` (chosen by the payload), acks the rest.
    Flaky(u64),
}

fn options() -> ConsumeOptions {
    ConsumeOptions::default()
        .prefetch(8)
        .visibility_timeout(5 * S)
        .max_attempts(4)
}

/// A consumer service on `node`.
fn start_consumer(sim: &Sim, checker: &Shared, node: &str, queue: &str, how: Behaviour) {
    let Some(n) = sim.get(node) else { return };
    let checker = checker.clone();
    let queue = queue.to_owned();
    sim.spawn_on(node, async move {
        let mut c = n.queue(&queue).expect("queue name").consume(options());
        let mut held = Vec::new();
        while let Some(d) = c.next().await {
            let name = String::from_utf8_lossy(d.payload()).into_owned();
            checker.lock().unwrap().delivered(&name);
            let n: u64 = name
                .rsplit(':')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            match how {
                Behaviour::Hold => held.push(d),
                Behaviour::NackPoison if name.starts_with("poison") => d.nack(None),
                Behaviour::Flaky(k) if (n + u64::from(d.attempt())).is_multiple_of(k) => {
                    d.nack(Some(Duration::from_millis(200)))
                }
                _ => {
                    checker.lock().unwrap().acked(&name);
                    d.ack();
                }
            }
        }
    });
}

/// A service that consumes a dead-letter queue, recording what it sees.
fn start_dlq_consumer(sim: &Sim, checker: &Shared, node: &str, queue: &str) {
    let Some(n) = sim.get(node) else { return };
    let checker = checker.clone();
    let dlq = n.queue(queue).expect("queue name").dead_letters();
    sim.spawn_on(node, async move {
        let mut c = dlq.consume(options());
        while let Some(d) = c.next().await {
            let name = String::from_utf8_lossy(d.payload()).into_owned();
            checker.lock().unwrap().dead_lettered(&name);
            d.ack();
        }
    });
}

/// A producer service: `count` messages named `who:i`, one every `every`.
fn start_producer(
    sim: &Sim,
    checker: &Shared,
    node: &str,
    who: &str,
    count: u64,
    every: Duration,
) -> mesh::sim::SimTask<u64> {
    let n = sim.get(node).expect("producer node");
    let checker = checker.clone();
    let who = who.to_owned();
    sim.spawn_on(node, async move {
        let q = n.queue("jobs").expect("queue name");
        let mut sent = 0;
        for i in 0..count {
            let name = format!("{who}:{i}");
            tracing::info!(%name, "producer sends");
            checker.lock().unwrap().sending(&name);
            if q.send(name.clone()).await.is_ok() {
                checker.lock().unwrap().sent(&name);
                sent += 1;
            }
            tokio::time::sleep(every).await;
        }
        sent
    })
}

/// A host `h`, a producer `p` and consumers `c1`, `c2`, converged.
fn setup(seed: u64) -> (Sim, Shared) {
    let mut sim = Sim::builder()
        .seed(seed)
        .latency(Duration::from_millis(1)..Duration::from_millis(10))
        .build();
    sim.node_with("h", Node::builder().host_all());
    for n in ["p", "c1", "c2"] {
        sim.node(n);
    }
    sim.run_until(|s| s.converged(), 30 * S)
        .expect("mesh converges");
    (sim, Shared::default())
}

fn settle(sim: &mut Sim, checker: &Shared, limit: Duration) {
    let c = checker.clone();
    let settled = sim.run_until(move |_| c.lock().unwrap().settled(), limit);
    let report = checker.lock().unwrap().report();
    assert!(
        settled.is_ok() && report.ok(),
        "seed {}: not settled or unsafe: {report}",
        sim.seed()
    );
}

#[test]
fn a_consumer_that_crashes_mid_message_loses_nothing() {
    let (mut sim, checker) = setup(1);
    start_consumer(&sim, &checker, "c1", "jobs", Behaviour::Hold);
    let mut producer = start_producer(&sim, &checker, "p", "p", 20, Duration::from_millis(10));
    sim.run_until(|_| producer.output().is_some(), 20 * S)
        .expect("sent");
    // c1 holds up to its prefetch unacked; it crashes with them.
    assert!(sim.crash("c1"));
    start_consumer(&sim, &checker, "c2", "jobs", Behaviour::Ack);
    settle(&mut sim, &checker, 30 * S);
    let r = checker.lock().unwrap().report();
    assert_eq!(r.acked, 20);
    assert!(r.duplicated >= 8, "c1's prefetch was redelivered: {r}");
}

#[test]
fn a_partition_between_host_and_consumer_loses_nothing() {
    let (mut sim, checker) = setup(2);
    start_consumer(&sim, &checker, "c1", "jobs", Behaviour::Ack);
    let mut p = start_producer(&sim, &checker, "p", "p", 200, Duration::from_millis(20));
    sim.run_for(S);
    // c1 is cut off from everyone while messages are in flight to it.
    sim.partition(&[&["h", "p", "c2"], &["c1"]]);
    start_consumer(&sim, &checker, "c2", "jobs", Behaviour::Ack);
    sim.run_for(10 * S);
    sim.heal();
    sim.run_until(|_| p.output().is_some(), 60 * S)
        .expect("producer done");
    settle(&mut sim, &checker, 60 * S);
    assert_eq!(checker.lock().unwrap().report().acked, 200);
}

#[test]
fn an_isolated_host_heals_and_loses_nothing() {
    let (mut sim, checker) = setup(3);
    start_consumer(&sim, &checker, "c1", "jobs", Behaviour::Ack);
    start_consumer(&sim, &checker, "c2", "jobs", Behaviour::Ack);
    let mut p = start_producer(&sim, &checker, "p", "p", 300, Duration::from_millis(20));
    sim.run_for(2 * S);
    // The host is cut off: what it holds waits for the heal; the producer
    // hosts its own meanwhile.
    sim.isolate("h");
    sim.run_for(15 * S);
    sim.heal();
    sim.run_until(|_| p.output().is_some(), 60 * S)
        .expect("producer done");
    settle(&mut sim, &checker, 60 * S);
    assert_eq!(checker.lock().unwrap().report().acked, 300);
}

#[test]
fn a_poison_message_reaches_the_dead_letter_queue_after_max_attempts() {
    let (mut sim, checker) = setup(4);
    start_consumer(&sim, &checker, "c1", "jobs", Behaviour::NackPoison);
    start_consumer(&sim, &checker, "c2", "jobs", Behaviour::NackPoison);
    start_dlq_consumer(&sim, &checker, "c2", "jobs");
    let p = sim.get("p").unwrap();
    let c = checker.clone();
    sim.block_on(async move {
        let q = p.queue("jobs").unwrap();
        for name in ["good:0", "poison:1", "good:2"] {
            q.send(name).await.unwrap();
            c.lock().unwrap().sent(name);
        }
    });
    settle(&mut sim, &checker, 30 * S);
    let r = checker.lock().unwrap().report();
    assert_eq!((r.acked, r.dead_lettered), (2, 1));
    // Four attempts (max_attempts), by either consumer, then the DLQ.
    assert_eq!(r.duplicated, 3, "{r}");
}

// --- random fault schedules over many seeds ---

const NODES: [&str; 5] = ["h", "p1", "p2", "c1", "c2"];
const CONSUMERS: [&str; 3] = ["c1", "c2", "p2"];

fn random_run(seed: u64, durable: bool) -> Result<mesh::sim::QueueReport, String> {
    // MESH_SIM_LOG=mesh=debug: the nodes' logs, for replaying one seed.
    if let Ok(filter) = std::env::var("MESH_SIM_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x9e3779b9);
    let max_latency = rng.gen_range(1..30);
    let mut sim = Sim::builder()
        .seed(seed)
        .latency(Duration::from_micros(200)..Duration::from_millis(max_latency))
        .loss(rng.gen_range(0.0..0.05))
        .duplicate(rng.gen_range(0.0..0.05))
        .reorder(rng.gen_bool(0.5))
        .build();
    // A durable host keeps its messages on its (simulated) disk.
    let host = if durable {
        Node::builder().host_all().data_dir("/sim/h")
    } else {
        Node::builder().host_all()
    };
    sim.node_with("h", host);
    for n in &NODES[1..] {
        sim.node(n);
    }
    sim.run_until(|s| s.converged(), 30 * S)
        .map_err(|e| format!("initial convergence: {e}"))?;
    if std::env::var_os("MESH_SIM_LOG").is_some() {
        for n in NODES {
            tracing::info!(name = n, id = %sim.peer_id(n), "node");
        }
    }
    let checker: Shared = Default::default();
    let flaky = Behaviour::Flaky(rng.gen_range(3..8));
    for c in CONSUMERS {
        start_consumer(&sim, &checker, c, "jobs", flaky);
    }
    start_dlq_consumer(&sim, &checker, "c1", "jobs");
    let mut producers = [
        start_producer(&sim, &checker, "p1", "p1", 300, Duration::from_millis(50)),
        start_producer(&sim, &checker, "p2", "p2", 300, Duration::from_millis(50)),
    ];

    // Faults for 20 s of mesh time. A host in memory loses its messages
    // when it crashes, so a crash of `h` excuses what was open (see
    // `QueueChecker::host_crashed`); a durable one must lose nothing.
    // Consumers and the host crash and restart, everyone is partitioned.
    let mut faults = common::Faults::default();
    let end = sim.now() + 20 * S;
    while sim.now() < end {
        match faults.step(&mut sim, &mut rng, &NODES, &["c1", "c2", "h"]) {
            common::Fault::Crashed("h") if !durable => checker.lock().unwrap().host_crashed(),
            common::Fault::Restarted(n) => restart_consumers(&sim, &checker, n, flaky),
            _ => {}
        }
    }
    for n in faults.end(&mut sim) {
        restart_consumers(&sim, &checker, n, flaky);
    }
    // Producers finish (15 s of sends each, longer while cut off), then
    // everything settles.
    sim.run_until(
        |_| producers.iter_mut().all(|p| p.output().is_some()),
        120 * S,
    )
    .map_err(|e| format!("producers did not finish: {e}"))?;
    let c = checker.clone();
    let settled = sim.run_until(move |_| c.lock().unwrap().settled(), 180 * S);
    common::golden(
        if durable { "queue-durable" } else { "queue" },
        seed,
        sim.trace_hash(),
    );
    let report = checker.lock().unwrap().report();
    if !report.ok() || settled.is_err() {
        return Err(format!("not settled or unsafe after the heal: {report}"));
    }
    if report.sent == 0 {
        return Err("nothing was sent".into());
    }
    Ok(report)
}

/// A restarted node's consumers start again.
fn restart_consumers(sim: &Sim, checker: &Shared, node: &str, flaky: Behaviour) {
    start_consumer(sim, checker, node, "jobs", flaky);
    if node == "c1" {
        start_dlq_consumer(sim, checker, node, "jobs");
    }
}

fn sweep(range: std::ops::Range<u64>) {
    sweep_with(range, false);
}

fn sweep_with(range: std::ops::Range<u64>, durable: bool) {
    let seeds = common::seeds(range);
    let started = std::time::Instant::now();
    let (mut sent, mut dup) = (0, 0);
    for &seed in &seeds {
        match random_run(seed, durable) {
            Ok(r) => {
                sent += r.sent;
                dup += r.duplicated;
            }
            Err(e) => panic!(
                "seed {seed} (durable host: {durable}): {e}\nreplay: MESH_SIM_SEED={seed} cargo test -p mesh --test sim_queue {} -- --exact",
                if durable { "queue_random_durable" } else { "queue_random" }
            ),
        }
    }
    eprintln!(
        "{} seeds in {:?}: {sent} messages sent, none lost, {dup} duplicate deliveries",
        seeds.len(),
        started.elapsed()
    );
}

fn per_test() -> u64 {
    common::per_test("MESH_SIM_QUEUE_SEEDS", 2, 50)
}

/// The same faults with a durable host: its crashes lose nothing either
/// (no message is excused).
#[test]
fn queue_random_durable() {
    let n = per_test();
    sweep_with(0..n, true);
}

#[test]
fn queue_random() {
    let n = per_test();
    sweep(0..n);
}

#[test]
fn queue_random_2() {
    let n = per_test();
    sweep(n..2 * n);
}
