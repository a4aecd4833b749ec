//! Streams under simulated faults: a partition between host and consumer,
//! a group member that crashes, and random fault schedules over many
//! seeds, judged by the stream checker (nothing lost or skipped, offsets
//! in order and where the host said).

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use mesh::{
    sim::{Sim, StreamChecker},
    stream::{From, GroupOptions},
    Node,
};
use rand::{rngs::SmallRng, Rng, SeedableRng};

const S: Duration = Duration::from_secs(1);

/// One checker for what groups read (every record must reach the group)
/// and one for whole-stream readers (every record, in order, no gaps).
#[derive(Debug, Default)]
struct Checkers {
    group: StreamChecker,
    reader: StreamChecker,
}

impl Checkers {
    fn both(&mut self, f: impl Fn(&mut StreamChecker)) {
        f(&mut self.group);
        f(&mut self.reader);
    }
}

type Shared = Arc<Mutex<Checkers>>;

/// Which checkers a test judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Judge {
    Group,
    Reader,
    Both,
}

/// A reader of the whole stream on `node`, named `reader`.
fn start_reader(sim: &Sim, checker: &Shared, node: &str, reader: &str) {
    start_reader_from(sim, checker, node, reader, From::Earliest)
}

/// A reader of the whole stream on `node` from `from`.
fn start_reader_from(sim: &Sim, checker: &Shared, node: &str, reader: &str, from: From) {
    let Some(n) = sim.get(node) else { return };
    let checker = checker.clone();
    checker.lock().unwrap().reader.whole_reader(reader);
    let reader = reader.to_owned();
    sim.spawn_on(node, async move {
        let mut c = n.stream("events").expect("stream name").consume(from);
        while let Some(r) = c.next().await {
            let Ok(r) = r else { continue };
            let name = String::from_utf8_lossy(r.payload()).into_owned();
            checker
                .lock()
                .unwrap()
                .reader
                .read(&reader, &name, r.partition(), r.offset());
        }
    });
}

/// A member of group `g` on `node`: records each record, then commits it.
fn start_member(sim: &Sim, checker: &Shared, node: &str) {
    let Some(n) = sim.get(node) else { return };
    let checker = checker.clone();
    let reader = format!("g@{node}");
    sim.spawn_on(node, async move {
        let g = n
            .stream("events")
            .expect("stream name")
            .group("g")
            .expect("group name");
        let mut c = g.consume_with(GroupOptions {
            window: 16,
            ..GroupOptions::default()
        });
        while let Some(r) = c.next().await {
            let Ok(r) = r else { continue };
            let name = String::from_utf8_lossy(r.payload()).into_owned();
            checker
                .lock()
                .unwrap()
                .group
                .read(&reader, &name, r.partition(), r.offset());
            r.commit();
        }
    });
}

/// An appender: `count` records named `who:i` (keyed by `i % 5`), one
/// every `every`.
fn start_appender(
    sim: &Sim,
    checker: &Shared,
    node: &str,
    who: &str,
    count: u64,
    every: Duration,
) -> mesh::sim::SimTask<u64> {
    let n = sim.get(node).expect("appender node");
    let checker = checker.clone();
    let who = who.to_owned();
    sim.spawn_on(node, async move {
        let s = n.stream("events").expect("stream name");
        let mut appended = 0;
        for i in 0..count {
            let name = format!("{who}:{i}");
            checker.lock().unwrap().both(|c| c.appending(&name));
            if let Ok(at) = s.append(format!("k{}", i % 5), name.clone()).await {
                checker
                    .lock()
                    .unwrap()
                    .both(|c| c.appended(&name, at.partition, at.offset));
                appended += 1;
            }
            tokio::time::sleep(every).await;
        }
        appended
    })
}

/// A host `h` (hosts every stream), an appender `p`, consumers `c1`, `c2`.
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

/// Runs until the judged checkers settle; the verdicts, or why not.
fn settled(
    sim: &mut Sim,
    checker: &Shared,
    judge: Judge,
    limit: Duration,
) -> Result<Vec<mesh::sim::StreamReport>, String> {
    let pick = move |c: &Checkers| -> Vec<StreamChecker> {
        match judge {
            Judge::Group => vec![c.group.clone()],
            Judge::Reader => vec![c.reader.clone()],
            Judge::Both => vec![c.group.clone(), c.reader.clone()],
        }
    };
    let c = checker.clone();
    let done = sim.run_until(
        move |_| {
            let c = c.lock().unwrap();
            match judge {
                Judge::Group => c.group.settled(),
                Judge::Reader => c.reader.settled(),
                Judge::Both => c.group.settled() && c.reader.settled(),
            }
        },
        limit,
    );
    let reports: Vec<_> = pick(&checker.lock().unwrap())
        .iter()
        .map(|c| c.report())
        .collect();
    let text: Vec<String> = reports.iter().map(|r| r.to_string()).collect();
    if done.is_err() || reports.iter().any(|r| !r.ok()) {
        return Err(format!("not settled or unsafe: {}", text.join(" | ")));
    }
    Ok(reports)
}

fn settle(
    sim: &mut Sim,
    checker: &Shared,
    judge: Judge,
    limit: Duration,
) -> mesh::sim::StreamReport {
    match settled(sim, checker, judge, limit) {
        Ok(mut r) => r.remove(0),
        Err(e) => panic!("seed {}: {e}", sim.seed()),
    }
}

/// Records are stamped by the node's clock, which in the simulator is
/// virtual: a run's records (and so its bytes on the wire) do not depend
/// on when it runs.
#[test]
fn records_are_stamped_with_virtual_time() {
    let (mut sim, _) = setup(7);
    // The simulator's wall clock starts at 2026-01-01T00:00:00Z.
    const ORIGIN_MS: u64 = 1_767_225_600_000;
    let p = sim.get("p").unwrap();
    let c = sim.get("c1").unwrap();
    sim.run_for(3 * S);
    let before = sim.now().as_millis() as u64;
    sim.block_on(p.stream("events").unwrap().append("k", "stamped"))
        .expect("appended");
    let after = sim.now().as_millis() as u64;
    let mut consumer = c.stream("events").unwrap().consume(From::Earliest);
    let r = sim
        .block_on_for(30 * S, consumer.next())
        .expect("read in time")
        .expect("a record")
        .expect("no error");
    assert_eq!(r.payload(), "stamped".as_bytes());
    let at = r.timestamp_ms();
    assert!(
        (ORIGIN_MS + before..=ORIGIN_MS + after).contains(&at),
        "stamped {at}, appended between {} and {}",
        ORIGIN_MS + before,
        ORIGIN_MS + after
    );
}

#[test]
fn a_partition_between_host_and_reader_heals_with_no_gap_and_no_repeat() {
    let (mut sim, checker) = setup(1);
    start_reader(&sim, &checker, "c1", "r1");
    let mut p = start_appender(&sim, &checker, "p", "p", 300, Duration::from_millis(20));
    sim.run_for(2 * S);
    // The reader is cut off from everyone while records keep coming.
    sim.partition(&[&["h", "p", "c2"], &["c1"]]);
    sim.run_for(10 * S);
    sim.heal();
    sim.run_until(|_| p.output().is_some(), 60 * S)
        .expect("appender done");
    let r = settle(&mut sim, &checker, Judge::Reader, 60 * S);
    assert_eq!(r.appended, 300);
    assert_eq!(r.read, 300);
    // The reader resumed where it was: nothing read twice either.
    assert_eq!(r.duplicated, 0, "{r}");
}

#[test]
fn a_crashed_group_member_s_partitions_move_and_resume_from_the_commit() {
    let (mut sim, checker) = setup(2);
    start_member(&sim, &checker, "c1");
    start_member(&sim, &checker, "c2");
    let mut p = start_appender(&sim, &checker, "p", "p", 400, Duration::from_millis(10));
    sim.run_for(2 * S);
    assert!(sim.crash("c1"));
    sim.run_until(|_| p.output().is_some(), 60 * S)
        .expect("appender done");
    let r = settle(&mut sim, &checker, Judge::Group, 60 * S);
    assert_eq!((r.appended, r.read), (400, 400));
    // c2 resumed c1's partitions from their commits: at most the records
    // c1 read and had not committed yet come twice.
    assert!(r.duplicated <= 64, "{r}");
    // And the group's commits reached the end on every partition.
    let c2 = sim.get("c2").unwrap();
    let lag =
        sim.block_on(async move { c2.stream("events").unwrap().group("g").unwrap().lag().await });
    let lag = lag.expect("lag");
    assert!(!lag.is_empty());
    let total: u64 = lag.iter().map(|l| l.lag).sum();
    assert!(total <= 4, "uncommitted after settling: {lag:?}");
}

#[test]
fn an_isolated_host_heals_and_its_records_are_read() {
    let (mut sim, checker) = setup(3);
    start_member(&sim, &checker, "c1");
    start_member(&sim, &checker, "c2");
    start_reader(&sim, &checker, "c2", "r2");
    let mut p = start_appender(&sim, &checker, "p", "p", 300, Duration::from_millis(20));
    sim.run_for(2 * S);
    // The host is cut off: its records wait for the heal; the appender
    // hosts its own partitions meanwhile.
    sim.isolate("h");
    sim.run_for(10 * S);
    sim.heal();
    sim.run_until(|_| p.output().is_some(), 60 * S)
        .expect("appender done");
    let r = settle(&mut sim, &checker, Judge::Both, 60 * S);
    assert_eq!(r.appended, 300);
}

#[test]
fn a_latest_reader_gets_everything_appended_after_it_started_across_a_host_restart() {
    let mut sim = Sim::builder()
        .seed(5)
        .latency(Duration::from_millis(1)..Duration::from_millis(10))
        .build();
    sim.node_with("h", Node::builder().host_all());
    // The appender never hosts: its records go to h, or fail while h is
    // down, and land in h's new run after the restart.
    sim.node_with("p", Node::builder().self_host(false));
    sim.node("c1");
    sim.run_until(|s| s.converged(), 30 * S)
        .expect("mesh converges");
    let checker = Shared::default();
    // Started before the first append: everything appended is "later".
    start_reader_from(&sim, &checker, "c1", "latest", From::Latest);
    sim.run_for(S);
    let mut p = start_appender(&sim, &checker, "p", "p", 300, Duration::from_millis(20));
    sim.run_for(2 * S);
    // The host crashes and comes back: its new run is a new log, read
    // from its start, not from its end.
    assert!(sim.crash("h"));
    let h = sim.peer_id("h");
    checker.lock().unwrap().both(|c| c.host_crashed(h));
    sim.run_for(2 * S);
    sim.restart("h");
    sim.run_until(|_| p.output().is_some(), 60 * S)
        .expect("appender done");
    let r = settle(&mut sim, &checker, Judge::Reader, 60 * S);
    assert!(r.appended >= 100, "{r}");
}

// --- random fault schedules over many seeds ---

const NODES: [&str; 5] = ["h", "p1", "p2", "c1", "c2"];
const MEMBERS: [&str; 3] = ["c1", "c2", "p2"];

fn random_run(seed: u64, durable: bool) -> Result<mesh::sim::StreamReport, String> {
    if let Ok(filter) = std::env::var("MESH_SIM_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5151_7e57);
    let max_latency = rng.gen_range(1..30);
    let mut sim = Sim::builder()
        .seed(seed)
        .latency(Duration::from_micros(200)..Duration::from_millis(max_latency))
        .loss(rng.gen_range(0.0..0.05))
        .duplicate(rng.gen_range(0.0..0.05))
        .reorder(rng.gen_bool(0.5))
        .build();
    // A durable host keeps records, offsets and commits on its
    // (simulated) disk.
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
    let checker: Shared = Default::default();
    for m in MEMBERS {
        start_member(&sim, &checker, m);
    }
    start_reader(&sim, &checker, "c1", "r");
    let mut appenders = [
        start_appender(&sim, &checker, "p1", "p1", 300, Duration::from_millis(50)),
        start_appender(&sim, &checker, "p2", "p2", 300, Duration::from_millis(50)),
    ];
    // Faults for 20 s of mesh time: partitions, one-way cuts, isolation,
    // crashes and restarts of members and of the host (a host in memory
    // loses its records, so its crash excuses what nobody read yet; a
    // durable one must lose nothing and keep its offsets), pauses.
    let mut faults = common::Faults::default();
    let end = sim.now() + 20 * S;
    while sim.now() < end {
        match faults.step(&mut sim, &mut rng, &NODES, &["c1", "c2", "h"]) {
            common::Fault::Crashed("h") if !durable => {
                let h = sim.peer_id("h");
                checker.lock().unwrap().both(|c| c.host_crashed(h));
            }
            common::Fault::Restarted(n) => restart_services(&sim, &checker, n),
            _ => {}
        }
    }
    for n in faults.end(&mut sim) {
        restart_services(&sim, &checker, n);
    }
    sim.run_until(
        |_| appenders.iter_mut().all(|p| p.output().is_some()),
        120 * S,
    )
    .map_err(|e| format!("appenders did not finish: {e}"))?;
    let settled = settled(&mut sim, &checker, Judge::Both, 180 * S);
    common::golden(
        if durable { "stream-durable" } else { "stream" },
        seed,
        sim.trace_hash(),
    );
    let mut reports = settled.map_err(|e| format!("after the heal: {e}"))?;
    let report = reports.remove(0);
    if report.appended == 0 {
        return Err("nothing was appended".into());
    }
    Ok(report)
}

/// A restarted node runs its services again.
fn restart_services(sim: &Sim, checker: &Shared, node: &str) {
    if MEMBERS.contains(&node) {
        start_member(sim, checker, node);
    }
    if node == "c1" {
        // A new reader: it starts again from the beginning.
        let reader = format!("r{}", sim.now().as_millis());
        start_reader(sim, checker, node, &reader);
    }
}

fn sweep(range: std::ops::Range<u64>) {
    sweep_with(range, false);
}

fn sweep_with(range: std::ops::Range<u64>, durable: bool) {
    let seeds = common::seeds(range);
    let started = std::time::Instant::now();
    let (mut appended, mut dup, mut twice) = (0, 0, 0);
    for &seed in &seeds {
        match random_run(seed, durable) {
            Ok(r) => {
                appended += r.appended;
                dup += r.duplicated;
                twice += r.appended_twice;
            }
            Err(e) => panic!(
                "seed {seed} (durable host: {durable}): {e}\nreplay: MESH_SIM_SEED={seed} cargo test -p mesh --test sim_stream {} -- --exact",
                if durable { "stream_random_durable" } else { "stream_random" }
            ),
        }
    }
    eprintln!(
        "{} seeds in {:?}: {appended} records appended, none lost or skipped, {dup} duplicate reads, {twice} records stored twice (retried appends)",
        seeds.len(),
        started.elapsed()
    );
}

fn per_test() -> u64 {
    common::per_test("MESH_SIM_STREAM_SEEDS", 2, 50)
}

/// The same faults with a durable host: its crashes lose and skip
/// nothing (no record is excused).
#[test]
fn stream_random_durable() {
    let n = per_test();
    sweep_with(0..n, true);
}

#[test]
fn stream_random() {
    let n = per_test();
    sweep(0..n);
}

#[test]
fn stream_random_2() {
    let n = per_test();
    sweep(n..2 * n);
}
