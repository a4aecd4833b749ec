//! `mesh demo`: three node processes on loopback, two subscribers and a
//! publisher, then a summary. Exits by itself.

use std::time::{Duration, Instant};

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

    for (mut child, _) in nodes {
        let _ = child.kill().await;
    }
    println!(
        "\nsummary: 3 nodes, 2 subscribers, 5 messages published; every subscriber got exactly its matching messages: {}; took {:.1}s",
        if all_ok { "yes" } else { "NO" },
        started.elapsed().as_secs_f64()
    );
    if !all_ok {
        anyhow::bail!("demo failed: some messages did not arrive");
    }
    Ok(())
}
