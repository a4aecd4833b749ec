//! `mesh demo`: three node processes on loopback, two subscribers and a
//! publisher, then competing queue workers and a dead letter, then sensors
//! appending to a stream, its replay and a windowed aggregate, then a shop
//! process SIGKILLed while its outbox relays orders to an inbox consumer,
//! then a summary. Exits by itself.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{lines_of, read_until, spawn_self};

const LOOPBACK: &str = "/ip4/127.0.0.1/udp/0/quic-v1";

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

pub(super) async fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    println!("mesh demo: a brokerless mesh of separate processes on 127.0.0.1\n");

    // 1. Three long-lived nodes; the first is everyone's bootstrap peer.
    let mut nodes = Vec::new();
    let mut node_ids = Vec::new();
    let mut first_addr = String::new();
    for i in 1..=3 {
        let mut a = args(&["node", "--no-mdns", "--listen", LOOPBACK]);
        if i > 1 {
            a.extend(args(&["--bootstrap", &first_addr]));
        }
        let mut child = spawn_self(&a)?;
        let mut lines = lines_of(&mut child)?;
        let id = read_until(&mut lines, "peer id:", Duration::from_secs(15)).await?;
        let addr = read_until(&mut lines, "listening:", Duration::from_secs(15)).await?;
        println!("  node-{i} started: {id}\n          at {addr}");
        node_ids.push((id, format!("node-{i}")));
        if i == 1 {
            first_addr = addr;
        }
        nodes.push((child, lines));
    }

    // 2. Two subscribers with wildcard patterns, joining through node-1.
    let mut subs = Vec::new();
    for (name, pattern, count) in [("sub-eu", "orders.eu.*", 3u64), ("sub-all", "orders.>", 5)] {
        let mut child = spawn_self(&args(&[
            "sub",
            pattern,
            "--count",
            &count.to_string(),
            "--no-mdns",
            "--listen",
            LOOPBACK,
            "--bootstrap",
            &first_addr,
        ]))?;
        let lines = lines_of(&mut child)?;
        println!("  {name} subscribed to {pattern:?} (expects {count} messages)");
        subs.push((name, pattern, count, child, lines));
    }

    // 3. Wait until every node sees the others and both subscriptions are known.
    let deadline = Instant::now() + Duration::from_secs(15);
    let seen = loop {
        let out = spawn_self(&args(&[
            "peers",
            "--json",
            "--no-mdns",
            "--listen",
            LOOPBACK,
            "--bootstrap",
            &first_addr,
        ]))?
        .wait_with_output()
        .await?;
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let alive: Vec<String> = list
            .as_array()
            .map(|l| {
                l.iter()
                    .filter(|p| p["state"] == "alive")
                    .filter_map(|p| p["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        // 3 nodes + 2 subscribers, as seen by a newcomer joining via node-1.
        if alive.len() >= 5 || Instant::now() > deadline {
            break alive;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "\n  discovery: a newcomer joining via node-1 learns {} live peers (3 nodes + 2 subscribers):",
        seen.len()
    );
    for id in &seen {
        println!("      {id}");
    }
    // How node-1's data links run, from its `link ID shm|quic|none` lines:
    // all on one host, so shared memory (membership stays on QUIC).
    let mut links = std::collections::BTreeMap::new();
    let node1 = &mut nodes[0].1;
    // Its peers: two nodes and two subscribers.
    let deadline = Instant::now() + Duration::from_secs(5);
    while links.values().filter(|k| *k == "shm").count() < 4 && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(300), node1.next_line()).await {
            Ok(Ok(Some(line))) => {
                if let Some((id, kind)) = line.strip_prefix("link ").and_then(|l| l.split_once(' '))
                {
                    links.insert(id.to_owned(), kind.to_owned());
                }
            }
            Ok(_) => break,
            Err(_) => {}
        }
    }
    let count = |kind: &str| links.values().filter(|k| *k == kind).count();
    println!(
        "  node-1's data links: {} over shared memory, {} over QUIC (same host: rings in /dev/shm; membership on QUIC)",
        count("shm"),
        count("quic")
    );
    println!();

    // 4. Publish from a one-shot process; it exits once peers have the messages.
    let publishes = [
        ("orders.eu.created", "order 1 (eu)"),
        ("orders.us.created", "order 2 (us)"),
        ("orders.eu.paid", "order 1 paid"),
        ("orders.eu.shipped", "order 1 shipped"),
        ("orders.us.paid", "order 2 paid"),
    ];
    for (topic, msg) in publishes {
        let status = spawn_self(&args(&[
            "pub",
            topic,
            msg,
            "--no-mdns",
            "--listen",
            LOOPBACK,
            "--bootstrap",
            &first_addr,
        ]))?
        .wait()
        .await?;
        println!(
            "  published {topic:<20} {msg:?} ({})",
            if status.success() { "ok" } else { "FAILED" }
        );
    }

    // 5. Collect what each subscriber printed.
    println!();
    let mut all_ok = true;
    for (name, pattern, count, mut child, mut lines) in subs {
        let mut got = Vec::new();
        while (got.len() as u64) < count {
            match tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await {
                Ok(Ok(Some(line))) => {
                    let v: serde_json::Value =
                        serde_json::from_str(&line).context("subscriber printed bad JSON")?;
                    got.push(format!(
                        "{} = {}",
                        v["topic"].as_str().unwrap_or("?"),
                        v["payload"]
                    ));
                }
                _ => break,
            }
        }
        let ok = got.len() as u64 == count;
        all_ok &= ok;
        println!("  {name} ({pattern}) received {}/{count}:", got.len());
        for g in got {
            println!("      {g}");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    }

    // 6. Work queues, hosted by the three nodes.
    let work = work_queues(&first_addr).await?;

    // 7. A stream, hosted by the three nodes.
    let streams = stream_scene(&first_addr, &node_ids).await?;

    // 8. A transactional outbox surviving a SIGKILL, to an inbox.
    let outbox = outbox_scene(&first_addr).await?;

    for (mut child, _) in nodes {
        let _ = child.kill().await;
    }
    println!(
        "\nsummary: 3 nodes, 2 subscribers, 5 messages published; every subscriber got exactly its matching messages: {}",
        if all_ok { "yes" } else { "NO" },
    );
    println!(
        "         work queue: 6 jobs to 2 competing workers, {}; each job done exactly once: {}",
        work.split,
        if work.jobs_ok { "yes" } else { "NO" },
    );
    println!(
        "         poison message: {} deliveries, then in the dead-letter queue: {}",
        work.poison_attempts,
        if work.dead_ok { "yes" } else { "NO" },
    );
    println!(
        "         stream: {} of {} readings replayed in offset order: {}; per-sensor 1 s averages as expected: {}",
        streams.replayed,
        SENSORS.len() * READINGS,
        if streams.replay_ok { "yes" } else { "NO" },
        if streams.windows_ok { "yes" } else { "NO" },
    );
    println!(
        "         outbox: the shop was SIGKILLed with {} of its {} committed orders unsent; restarted: committed {} = processed {}, duplicates {}, lost {}: {}",
        outbox.pending_at_kill,
        outbox.committed_at_kill,
        outbox.committed,
        outbox.processed,
        outbox.duplicates,
        outbox.lost,
        if outbox.ok() { "yes" } else { "NO" },
    );
    println!("         took {:.1}s", started.elapsed().as_secs_f64());
    if !all_ok {
        anyhow::bail!("demo failed: some messages did not arrive");
    }
    if !work.jobs_ok || !work.dead_ok {
        anyhow::bail!("demo failed: the work queues did not behave as shown");
    }
    if !streams.replay_ok || !streams.windows_ok {
        anyhow::bail!("demo failed: the stream did not behave as shown");
    }
    if !outbox.ok() {
        anyhow::bail!("demo failed: the outbox did not deliver every committed order once");
    }
    Ok(())
}

/// The net flags of a process joining through `addr`.
fn via(addr: &str) -> Vec<String> {
    args(&["--no-mdns", "--listen", LOOPBACK, "--bootstrap", addr])
}

/// Runs a one-shot `mesh` command to completion (bounded), returning its
/// stdout if it succeeded.
async fn one_shot(list: &[&str], addr: &str) -> anyhow::Result<Option<String>> {
    let mut a = args(list);
    a.extend(via(addr));
    let out = tokio::time::timeout(Duration::from_secs(15), spawn_self(&a)?.wait_with_output())
        .await
        .with_context(|| format!("`mesh {}` did not finish in time", list.join(" ")))??;
    Ok(out
        .status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// What the work-queue scene showed.
struct WorkResult {
    /// Who did how many jobs, e.g. "worker-a did 4, worker-b did 2".
    split: String,
    /// Every job acked, none twice.
    jobs_ok: bool,
    /// Deliveries of the poison message.
    poison_attempts: u32,
    /// The poison message listed in the dead-letter queue after 3 attempts.
    dead_ok: bool,
}

/// Competing workers with a redelivery on queue `jobs`, then a poison
/// message on queue `imports` that ends in `imports.dlq`.
///
/// Each worker exits after a set number of deliveries, and the numbers add
/// up whatever the timing: worker-a acks 4 jobs; worker-b acks its 1st and
/// 3rd and nacks its 2nd (`--fail-every 2`), which is delivered again to
/// one of them; 4 + 2 acks are the 6 jobs.
async fn work_queues(addr: &str) -> anyhow::Result<WorkResult> {
    println!("\n  work queues (every node hosts them; each message goes to one consumer):");
    let workers = [("worker-a", 4u64, None), ("worker-b", 3, Some("2"))];
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(&'static str, String)>(64);
    let mut children = Vec::new();
    for (name, count, fail_every) in workers {
        let count = count.to_string();
        let mut a = args(&[
            "queue",
            "consume",
            "jobs",
            "--prefetch",
            "1",
            "--count",
            &count,
        ]);
        if let Some(k) = fail_every {
            a.extend(args(&["--fail-every", k]));
        }
        a.extend(via(addr));
        let mut child = spawn_self(&a)?;
        let mut lines = lines_of(&mut child)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send((name, line)).await.is_err() {
                    break;
                }
            }
        });
        println!(
            "    {name} consumes jobs one at a time (--prefetch 1){}",
            if fail_every.is_some() {
                ", failing every 2nd delivery (--fail-every 2)"
            } else {
                ""
            }
        );
        children.push(child);
    }
    drop(tx);
    let sent = one_shot(&["queue", "send", "jobs", "job", "--count", "6"], addr).await?;
    println!(
        "    sent \"job 1\" .. \"job 6\" to queue jobs ({})",
        if sent.is_some() { "ok" } else { "FAILED" }
    );
    // 7 deliveries in all: the 6 jobs and the nacked one again.
    let mut acked: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let mut did: BTreeMap<&str, usize> = workers.iter().map(|(n, ..)| (*n, 0)).collect();
    let mut redeliveries = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((name, line))) = tokio::time::timeout(left, rx.recv()).await else {
            break;
        };
        let v: serde_json::Value =
            serde_json::from_str(&line).context("a consumer printed bad JSON")?;
        let payload = v["payload"].as_str().unwrap_or("?").to_owned();
        let attempt = v["attempt"].as_u64().unwrap_or(0);
        let ok = v["acked"] == true;
        if attempt > 1 {
            redeliveries += 1;
        }
        println!(
            "    {name} got {payload:?} (attempt {attempt}): {}",
            if ok {
                "done, acked"
            } else {
                "failed, nacked: back to the queue"
            }
        );
        if ok {
            acked.entry(payload).or_default().push(name);
            *did.entry(name).or_default() += 1;
        }
    }
    for mut child in children {
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    }
    let jobs_ok = acked.len() == 6
        && acked.values().all(|by| by.len() == 1)
        && (1..=6).all(|i| acked.contains_key(&format!("job {i}")));
    let split = did
        .iter()
        .map(|(n, c)| format!("{n} did {c}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!("    {split}; redeliveries: {redeliveries}");

    // A poison message: its worker fails it every time (--fail-every 1);
    // after 3 deliveries (--max-attempts 3) the host dead-letters it.
    let sent = one_shot(&["queue", "send", "imports", "corrupt.csv"], addr).await?;
    println!(
        "\n    sent \"corrupt.csv\" to queue imports ({})",
        if sent.is_some() { "ok" } else { "FAILED" }
    );
    let mut child = spawn_self(&{
        let mut a = args(&[
            "queue",
            "consume",
            "imports",
            "--fail-every",
            "1",
            "--max-attempts",
            "3",
            "--count",
            "3",
        ]);
        a.extend(via(addr));
        a
    })?;
    println!(
        "    worker-c consumes imports, failing every delivery (--fail-every 1 --max-attempts 3)"
    );
    let mut lines = lines_of(&mut child)?;
    let mut poison_attempts = 0;
    while poison_attempts < 3 {
        let Ok(Ok(Some(line))) =
            tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await
        else {
            break;
        };
        let v: serde_json::Value =
            serde_json::from_str(&line).context("a consumer printed bad JSON")?;
        poison_attempts += 1;
        let attempt = v["attempt"].as_u64().unwrap_or(0);
        println!(
            "    worker-c got {} (attempt {attempt}): failed, nacked{}",
            v["payload"],
            if attempt >= 3 {
                ": its last attempt, to imports.dlq"
            } else {
                ": back to the queue"
            }
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;

    // The last nack reaches the host asynchronously: list until it is there.
    let deadline = Instant::now() + Duration::from_secs(10);
    let dead = loop {
        let out = one_shot(&["dlq", "list", "imports"], addr)
            .await?
            .unwrap_or_default();
        if !out.trim().is_empty() || Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("    mesh dlq list imports:");
    let mut dead_ok = false;
    for line in dead.lines() {
        println!("      {line}");
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        dead_ok |= v["payload"] == "corrupt.csv" && v["attempts"] == 3;
    }
    Ok(WorkResult {
        split,
        jobs_ok,
        poison_attempts,
        dead_ok,
    })
}

/// The stream of the stream scene, and its sensors.
const READINGS_STREAM: &str = "sensors.readings";
const SENSORS: [&str; 3] = ["sensor-1", "sensor-2", "sensor-3"];
/// Readings per sensor, one every [`READING_EVERY_MS`] of event time.
const READINGS: usize = 6;
const READING_EVERY_MS: u64 = 500;
/// Event time of the first reading (a whole second, so that the 1 s
/// windows start with it): the records carry it, the demo reads no clock
/// for it, and the windows come out the same on every run.
const EVENT_BASE_MS: u64 = 1_700_000_000_000;

/// Sensor `s`'s reading `i`: a slow rise from a sensor's own base.
fn reading(s: usize, i: usize) -> f64 {
    18.0 + 2.0 * s as f64 + 0.4 * i as f64
}

/// What the stream scene showed.
struct StreamResult {
    /// Records the replay printed.
    replayed: usize,
    /// Every reading replayed once, offsets counting up by one from where
    /// each sensor started, in the partition its appends reported.
    replay_ok: bool,
    /// The aggregate gave the expected average for every (window, sensor).
    windows_ok: bool,
}

/// A node in this process joined through `addr`; like the one-shot
/// commands it never hosts a stream (the node processes do).
async fn join_here(addr: &str) -> anyhow::Result<mesh::Node> {
    let node = mesh::Node::builder()
        .listen(LOOPBACK.parse()?)
        .mdns(false)
        .bootstrap(addr.parse()?)
        .self_host(false)
        .start()
        .await?;
    node.joined(Duration::from_secs(10))
        .await
        .context("a demo node did not join the mesh")?;
    Ok(node)
}

/// Waits until `node` has data links up to the nodes `names` lists.
async fn linked_to(node: &mesh::Node, names: &[(String, String)]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let peers = node.peers().await;
        let linked = |id: &str| peers.iter().any(|p| p.linked && p.id.to_string() == id);
        if names.iter().all(|(id, _)| linked(id)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("a demo node did not link to every node within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Three sensors (nodes in this process) append readings with explicit
/// event times to `sensors.readings`, which the three node processes host;
/// `mesh stream read --from earliest` replays it with offsets; a consumer
/// here averages each sensor's readings per 1 s window of event time with
/// `mesh::window`.
async fn stream_scene(addr: &str, names: &[(String, String)]) -> anyhow::Result<StreamResult> {
    use mesh::{
        stream::{AppendOptions, From},
        window::{Mean, Windowed, Windows},
    };
    println!("\n  streams (every node hosts {READINGS_STREAM}; records keep their offsets, and can be read again):");
    // "PEERID/INDEX" with the node's name instead of its id.
    let name_of = |partition: &str| -> String {
        match partition.rsplit_once('/') {
            Some((id, index)) => {
                let node = names
                    .iter()
                    .find(|(i, _)| i == id)
                    .map_or(id, |(_, n)| n.as_str());
                format!("{node}/{index}")
            }
            None => partition.to_owned(),
        }
    };

    // 1. The sensors, one after the other so that offsets come out the
    // same on every run; one key per sensor, so one partition each.
    let mut placed: BTreeMap<&str, Vec<mesh::stream::RecordPos>> = BTreeMap::new();
    for (s, sensor) in SENSORS.iter().enumerate() {
        let node = join_here(addr).await?;
        // A keyed append goes to one of the hosts this node has a data link
        // to: with all three up, the sensor's key picks one partition for
        // all its readings.
        linked_to(&node, names).await?;
        let readings = node.stream(READINGS_STREAM)?;
        for i in 0..READINGS {
            let at = readings
                .append_with(
                    format!("{:.1}", reading(s, i)),
                    AppendOptions {
                        key: sensor.as_bytes().to_vec().into(),
                        timestamp: Some(
                            std::time::UNIX_EPOCH
                                + Duration::from_millis(
                                    EVENT_BASE_MS + i as u64 * READING_EVERY_MS,
                                ),
                        ),
                        ..Default::default()
                    },
                )
                .await
                .with_context(|| format!("{sensor} could not append"))?;
            placed.entry(sensor).or_default().push(at);
        }
        node.shutdown().await;
    }
    println!(
        "    {} (nodes in this process) appended {READINGS} readings each, {READING_EVERY_MS} ms apart in event time, and left",
        SENSORS.join(", ")
    );

    // 2. The replay, from a one-shot process.
    let total = SENSORS.len() * READINGS;
    let out = one_shot(
        &[
            "stream",
            "read",
            READINGS_STREAM,
            "--from",
            "earliest",
            "--count",
            &total.to_string(),
        ],
        addr,
    )
    .await?
    .unwrap_or_default();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    println!("    mesh stream read {READINGS_STREAM} --from earliest --count {total}: {} records; by sensor:", lines.len());
    let mut replay_ok = lines.len() == total;
    for (s, sensor) in SENSORS.iter().enumerate() {
        let mut mine: Vec<&serde_json::Value> =
            lines.iter().filter(|v| v["key"] == *sensor).collect();
        mine.sort_by_key(|v| v["offset"].as_u64());
        let at = &placed[sensor];
        let partition = at
            .first()
            .map(|p| p.partition.to_string())
            .unwrap_or_default();
        let offsets: Vec<u64> = mine.iter().filter_map(|v| v["offset"].as_u64()).collect();
        let expected: Vec<u64> = at.iter().map(|p| p.offset).collect();
        let values: Vec<&str> = mine.iter().filter_map(|v| v["payload"].as_str()).collect();
        let right_values = (0..READINGS)
            .map(|i| format!("{:.1}", reading(s, i)))
            .eq(values.iter().map(|v| v.to_string()));
        replay_ok &= offsets == expected
            && right_values
            && mine.iter().all(|v| v["partition"] == partition.as_str());
        println!(
            "      {sensor} in partition {}, offsets {}..={}: {}",
            name_of(&partition),
            offsets.first().copied().unwrap_or(0),
            offsets.last().copied().unwrap_or(0),
            values.join(" ")
        );
    }

    // 3. The aggregate: a consumer here, from the earliest offset. The
    // sensors' partitions arrive interleaved in any way, so the watermark
    // is the least of the sensors' latest event times (each sensor's
    // readings come in order, from one partition): a window fires once
    // every sensor is past it, and no reading is ever late.
    let node = join_here(addr).await?;
    let mut records = node.stream(READINGS_STREAM)?.consume(From::Earliest);
    let mut windowed = Windowed::new(Windows::tumbling(Duration::from_secs(1))?, Mean)
        .out_of_orderness(Duration::MAX);
    let mut latest: BTreeMap<String, u64> = BTreeMap::new();
    let mut results = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..total {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(Ok(r))) = tokio::time::timeout(left, records.recv()).await else {
            break;
        };
        let sensor = String::from_utf8_lossy(r.key()).into_owned();
        let value: f64 = std::str::from_utf8(r.payload())
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(f64::NAN);
        latest.insert(sensor.clone(), r.timestamp_ms());
        results.extend(windowed.push(sensor, r.timestamp_ms(), value));
        if latest.len() == SENSORS.len() {
            let watermark = latest.values().copied().min().unwrap_or(0);
            results.extend(windowed.advance_watermark(watermark));
        }
    }
    // The sensors are done: the last windows close.
    results.extend(windowed.flush());
    drop(records);
    node.shutdown().await;

    println!("    per-sensor average per 1 s window of event time (mesh::window, tumbling, Mean):");
    println!(
        "      {:<12} {}",
        "window",
        SENSORS.map(|s| format!("{s:>9}")).join("")
    );
    let windows = (READINGS as u64 * READING_EVERY_MS).div_ceil(1000);
    let mut windows_ok = results.len() == SENSORS.len() * windows as usize;
    for w in 0..windows {
        let start = EVENT_BASE_MS + w * 1000;
        let mut row = String::new();
        for (s, sensor) in SENSORS.iter().enumerate() {
            let got = results
                .iter()
                .find(|r| r.key == *sensor && r.start_ms == start)
                .map(|r| r.value);
            // The readings of sensor `s` in this window.
            let mine: Vec<f64> = (0..READINGS)
                .filter(|i| (*i as u64 * READING_EVERY_MS) / 1000 == w)
                .map(|i| reading(s, i))
                .collect();
            let expected = mine.iter().sum::<f64>() / mine.len() as f64;
            windows_ok &= got.is_some_and(|g| (g - expected).abs() < 1e-9);
            row += &match got {
                Some(g) => format!("{g:>9.2}"),
                None => format!("{:>9}", "-"),
            };
        }
        println!("      {:<12} {row}", format!("{w}-{} s", w + 1));
    }
    Ok(StreamResult {
        replayed: lines.len(),
        replay_ok,
        windows_ok,
    })
}

/// Orders the outbox scene's shop commits, and the queue they go to.
const SHOP_ORDERS: u64 = 20_000;
const SHOP_QUEUE: &str = "shop.orders";
/// The shop is killed once it has committed at least this many.
const KILL_AFTER: u64 = 6_000;

/// What the outbox scene showed.
struct OutboxResult {
    /// Orders in the shop's database when it was killed.
    committed_at_kill: u64,
    /// Of those, messages still in its outbox (not confirmed by the host).
    pending_at_kill: u64,
    /// Orders in the shop's database at the end.
    committed: u64,
    /// Distinct orders the warehouse processed (committed in its database).
    processed: u64,
    /// Orders the warehouse processed more than once.
    duplicates: u64,
    /// Committed orders the warehouse never processed.
    lost: u64,
}

impl OutboxResult {
    fn ok(&self) -> bool {
        self.committed == SHOP_ORDERS
            && self.processed == self.committed
            && self.duplicates == 0
            && self.lost == 0
    }
}

/// A shop process (`mesh demo-shop`) commits orders to its own SQLite
/// database, each transaction with the orders' messages in the outbox of
/// the same database, while its relay sends them to the queue
/// `shop.orders` (hosted by the node processes). It is SIGKILLed mid-way,
/// then restarted: it goes on after its last committed order, and its
/// relay first sends what the killed run left pending. A warehouse process
/// (`mesh demo-warehouse`) processes each order through an inbox in its
/// own database, one transaction per batch, and acks after the commit.
async fn outbox_scene(addr: &str) -> anyhow::Result<OutboxResult> {
    use mesh::store::{self, rusqlite};
    println!("\n  transactional outbox (each order and its message commit together; the relay sends what is committed):");
    let scratch = super::outbox::ScratchDir::new(None, "mesh-demo-outbox")?;
    let shop_db = scratch.path().join("shop.db");
    let warehouse_db = scratch.path().join("warehouse.db");

    // The warehouse, consuming as orders come.
    let mut warehouse = spawn_self(&{
        let mut a = args(&[
            "demo-warehouse",
            "--db",
            &warehouse_db.display().to_string(),
            "--orders",
            &SHOP_ORDERS.to_string(),
            "--queue",
            SHOP_QUEUE,
        ]);
        a.extend(via(addr));
        a
    })?;
    let mut warehouse_out = lines_of(&mut warehouse)?;

    let shop_args = |pause_ms: &str| {
        let mut a = args(&[
            "demo-shop",
            "--db",
            &shop_db.display().to_string(),
            "--orders",
            &SHOP_ORDERS.to_string(),
            "--per-tx",
            "200",
            "--pause-ms",
            pause_ms,
            "--queue",
            SHOP_QUEUE,
        ]);
        a.extend(via(addr));
        a
    };
    // 1. The shop, paced a little so that the kill lands mid-stream.
    let mut shop = spawn_self(&shop_args("5"))?;
    let mut lines = lines_of(&mut shop)?;
    println!(
        "    shop (a process) commits {SHOP_ORDERS} orders, 200 per transaction, into its orders table and its outbox"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n: u64 = read_until(&mut lines, "COMMITTED ", left)
            .await?
            .parse()
            .context("the shop printed a bad count")?;
        if n >= KILL_AFTER {
            break;
        }
    }
    shop.start_kill().context("cannot kill the shop")?;
    let _ = shop.wait().await;

    // 2. What the killed shop left: its orders, and its outbox.
    let (committed_at_kill, pending_at_kill) = {
        let conn = store::open(&shop_db)?;
        let orders: i64 = conn
            .query_row("SELECT count(*) FROM orders", [], |r| r.get(0))
            .context("reading the shop's orders")?;
        let status = mesh::store::Outbox::status(&conn)?;
        (orders as u64, status.pending)
    };
    println!(
        "    SIGKILLed the shop after it had committed {committed_at_kill} orders; `mesh outbox status --db shop.db` says:"
    );
    let out = spawn_self(&args(&[
        "outbox",
        "status",
        "--db",
        &shop_db.display().to_string(),
    ]))?
    .wait_with_output()
    .await?;
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        println!("    {}", line.trim_end());
    }

    // 3. The shop again: it resumes after its last order, and its relay
    // sends the rows the killed run left first.
    let mut shop = spawn_self(&shop_args("0"))?;
    let mut lines = lines_of(&mut shop)?;
    let resumed = read_until(&mut lines, "RESUMING ", Duration::from_secs(15)).await?;
    let relayed = read_until(&mut lines, "RELAYED ", Duration::from_secs(30)).await?;
    let _ = tokio::time::timeout(Duration::from_secs(10), shop.wait()).await;
    println!(
        "    restarted, the shop resumed at order {resumed}; its relay sent the {pending_at_kill} left pending, then the new ones ({relayed} messages in this run)"
    );

    // 4. The warehouse finishes (or is stopped, and what it committed is
    // counted).
    let skipped = read_until(&mut warehouse_out, "DONE ", Duration::from_secs(20))
        .await
        .ok()
        .and_then(|d| d.split_whitespace().nth(1)?.parse::<u64>().ok());
    let _ = warehouse.kill().await;
    let ids = |path: &std::path::Path, sql: &str| -> anyhow::Result<Vec<i64>> {
        let conn = store::open(path)?;
        let mut stmt = conn.prepare(sql)?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, rusqlite::Error>>()?)
    };
    let committed: std::collections::BTreeSet<i64> = ids(&shop_db, "SELECT id FROM orders")?
        .into_iter()
        .collect();
    let shipped = ids(&warehouse_db, "SELECT order_id FROM shipments")?;
    let distinct: std::collections::BTreeSet<i64> = shipped.iter().copied().collect();
    let result = OutboxResult {
        committed_at_kill,
        pending_at_kill,
        committed: committed.len() as u64,
        processed: distinct.len() as u64,
        duplicates: (shipped.len() - distinct.len()) as u64,
        lost: committed.difference(&distinct).count() as u64,
    };
    println!(
        "    warehouse (a process, through an inbox in its own SQLite file): {} processed, {} duplicates, {} lost; {} repeat deliveries skipped by the inbox",
        result.processed,
        result.duplicates,
        result.lost,
        skipped.map_or("?".into(), |n| n.to_string()),
    );
    Ok(result)
}
