//! `mesh bench pubsub|queue|stream|request`: a publisher (sender,
//! appender, requester) here and a subscriber (consumer, responder) in a
//! child process, on loopback.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::{FutureExt, StreamExt};

use crate::peers::{
    loopback, one_way_p50_p99, print_addr, start_pair, start_pair_configured, start_pair_with, Net,
};
use crate::{lines_of, read_until, spawn_self, wait_addrs};
use mesh::Node;

const DATA: &str = "bench.data";
const PING: &str = "bench.ping";
const PONG: &str = "bench.pong";

/// Settings of a bench peer's consumer.
#[derive(Debug, Clone)]
pub(super) struct PeerOptions {
    /// `consume`: the queue consumer's prefetch.
    pub(super) prefetch: u32,
    /// `stream`: the stream consumer's window.
    pub(super) window: u32,
    /// `stream`: read as a group member, committing every record.
    pub(super) group: bool,
    /// `outbox`: process each delivery through an inbox in this file.
    pub(super) inbox: Option<std::path::PathBuf>,
}

/// How the consumer of `bench stream` reads.
#[derive(Debug, Clone, Copy)]
pub(super) struct StreamRead {
    /// Records in flight per partition.
    pub(super) window: u32,
    /// As a consumer group's member, committing every record.
    pub(super) group: bool,
}

/// The child side: `sink` counts `bench.data`, `echo` answers pings,
/// `consume` acks `bench.q`, `stream` reads `bench.s`, `serve` answers
/// `bench.rpc`, `outbox` acks the outbox bench's queue (`outbox-host`:
/// and hosts it).
pub(super) async fn peer(
    mode: &str,
    messages: u64,
    gossip_via: Option<mesh::Multiaddr>,
    net: Net,
    options: PeerOptions,
) -> anyhow::Result<()> {
    let mut builder = net.builder();
    if let Some(addr) = &gossip_via {
        builder = builder
            .bootstrap(addr.clone())
            .gossip(mesh::Pattern::new("bench.>")?);
    }
    if mode == "stream-host" {
        builder = builder.host_streams([STREAM]);
    }
    if mode == "outbox-host" {
        builder = builder.host_queues([super::outbox::BENCH_QUEUE]);
    }
    let node = builder.start().await?;
    match mode {
        "outbox" | "outbox-host" => {
            return super::outbox::bench_peer(node, messages, options.prefetch, options.inbox).await
        }
        "consume" => return consume_peer(node, messages, options.prefetch).await,
        "stream" | "stream-host" => {
            return stream_peer(node, messages, options.window, options.group).await
        }
        "serve" => return serve_peer(node, messages).await,
        _ => {}
    }
    let topic = match mode {
        "sink" => DATA,
        "echo" => PING,
        other => bail!("unknown bench peer mode {other:?}"),
    };
    let mut sub = node.subscribe(topic).await?;
    print_addr(&node).await?;
    let mut seen = 0u64;
    let mut first = None;
    let mut warm = false;
    let idle = Duration::from_secs(30);
    while seen < messages {
        // Take what is already buffered without arming a timer per message.
        let next = match sub.next().now_or_never() {
            Some(m) => Ok(m),
            None => tokio::time::timeout(idle, sub.next()).await,
        };
        match next {
            // Gossip warm-up messages (0x00) say the overlay reaches us.
            Ok(Some(m)) if gossip_via.is_some() && m.payload.first() == Some(&0) => {
                if !warm {
                    warm = true;
                    println!("WARM");
                }
            }
            Ok(Some(m)) => {
                seen += 1;
                first.get_or_insert_with(Instant::now);
                if mode == "echo" {
                    node.publish(PONG, m.payload).await?;
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    let elapsed = first.map(|t| t.elapsed().as_micros()).unwrap_or(0);
    if sub.dropped() > 0 {
        eprintln!(
            "bench peer: {} messages dropped as a slow consumer",
            sub.dropped()
        );
    }
    println!("DONE {seen} {elapsed}");
    node.shutdown().await;
    Ok(())
}

async fn consume_peer(node: Node, messages: u64, prefetch: u32) -> anyhow::Result<()> {
    let mut c = node
        .queue(QUEUE)?
        .consume(mesh::queue::ConsumeOptions::default().prefetch(prefetch));
    print_addr(&node).await?;
    let mut seen = 0u64;
    let mut first = None;
    let idle = Duration::from_secs(30);
    while seen < messages {
        let next = match c.next().now_or_never() {
            Some(d) => Ok(d),
            None => tokio::time::timeout(idle, c.next()).await,
        };
        match next {
            Ok(Some(d)) => {
                seen += 1;
                first.get_or_insert_with(Instant::now);
                d.ack();
            }
            Ok(None) | Err(_) => break,
        }
    }
    let elapsed = first.map(|t| t.elapsed().as_micros()).unwrap_or(0);
    println!("DONE {seen} {elapsed}");
    drop(c);
    node.shutdown().await;
    Ok(())
}

/// The child side of `bench stream`: reads `bench.s` from the earliest
/// offset (as the host appears and its records come), checking that
/// offsets count up by one in each partition.
async fn stream_peer(node: Node, messages: u64, window: u32, group: bool) -> anyhow::Result<()> {
    let mut c = if group {
        node.stream(STREAM)?
            .group("bench")?
            .consume_with(mesh::stream::GroupOptions {
                window,
                ..Default::default()
            })
    } else {
        node.stream(STREAM)?.consume_with(
            mesh::stream::From::Earliest,
            mesh::stream::ConsumeOptions { window },
        )
    };
    print_addr(&node).await?;
    let mut seen = 0u64;
    let mut first = None;
    // Next offset expected per partition (the appender has 4).
    let mut next: Vec<(mesh::stream::PartitionId, u64)> = Vec::new();
    let mut disorder = 0u64;
    let idle = Duration::from_secs(30);
    while seen < messages {
        let r = match c.next().now_or_never() {
            Some(r) => Ok(r),
            None => tokio::time::timeout(idle, c.next()).await,
        };
        match r {
            Ok(Some(Ok(r))) => {
                seen += 1;
                first.get_or_insert_with(Instant::now);
                if group {
                    r.commit();
                }
                let p = r.partition();
                match next.iter_mut().find(|(q, _)| *q == p) {
                    Some((_, n)) => {
                        disorder += u64::from(*n != r.offset());
                        *n = r.offset() + 1;
                    }
                    None => {
                        disorder += u64::from(r.offset() != 0);
                        next.push((p, r.offset() + 1));
                    }
                }
            }
            Ok(Some(Err(e))) => bail!("bench stream: {e}"),
            Ok(None) | Err(_) => break,
        }
    }
    let elapsed = first.map(|t| t.elapsed().as_micros()).unwrap_or(0);
    if disorder > 0 {
        eprintln!("bench peer: {disorder} records out of offset order");
    }
    println!("DONE {seen} {elapsed} {disorder}");
    drop(c);
    node.shutdown().await;
    Ok(())
}

/// The child side of `bench request`: answers `bench.rpc` with the payload.
async fn serve_peer(node: Node, messages: u64) -> anyhow::Result<()> {
    let mut service = node.serve(RPC).await?;
    print_addr(&node).await?;
    let mut seen = 0u64;
    while seen < messages {
        match tokio::time::timeout(Duration::from_secs(30), service.next()).await {
            Ok(Some(r)) => {
                seen += 1;
                let p = r.payload().clone();
                r.respond(p);
            }
            Ok(None) | Err(_) => break,
        }
    }
    println!("DONE {seen} 0");
    drop(service);
    node.shutdown().await;
    Ok(())
}

const QUEUE: &str = "bench.q";
const STREAM: &str = "bench.s";
const RPC: &str = "bench.rpc";

/// `mesh bench queue`: this process sends (and hosts the queue, as a
/// sender with no host does); a consumer process acks every message. The
/// rate counts messages acked back at the host.
pub(super) async fn queue(
    size: usize,
    messages: u64,
    prefetch: u32,
    net: Net,
    json: bool,
) -> anyhow::Result<()> {
    let (mut child, mut lines, node) = start_pair_with(
        "consume",
        messages,
        net,
        &["--prefetch".into(), prefetch.to_string()],
    )
    .await?;
    let q = node.queue(QUEUE)?;
    let payload = bytes::Bytes::from(vec![0xa5u8; size]);
    let start = Instant::now();
    // Batches of 1,024, several in flight; each resolves when the host
    // accepted all of it.
    let batch = 1024u64;
    let mut sends = futures::stream::iter((0..messages).step_by(batch as usize))
        .map(|first| {
            let n = batch.min(messages - first) as usize;
            q.send_batch(std::iter::repeat_n(payload.clone(), n))
        })
        .buffer_unordered(8);
    while let Some(r) = sends.next().await {
        r?;
    }
    let sent = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    let acked = loop {
        let s = q.host_stats().await?;
        if s.acked >= messages || Instant::now() > deadline {
            break s.acked;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let elapsed = start.elapsed();
    let _ = read_until(&mut lines, "DONE ", Duration::from_secs(30)).await;
    let secs = elapsed.as_secs_f64();
    let rate = acked as f64 / secs;
    if !json {
        println!(
            "sent {messages} x {size} B in {:.3}s (accepted by the host); {acked} acked back at the host in {secs:.3}s (prefetch {prefetch})",
            sent.as_secs_f64()
        );
        println!(
            "{:.0} acked msgs/s, {:.1} MB/s",
            rate,
            rate * size as f64 / 1e6
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "queue", "transport": net.name(), "size": size, "messages": messages,
            "prefetch": prefetch, "acked": acked,
            "msgs_per_sec": rate.round(), "mb_per_sec": (rate * size as f64 / 1e6 * 10.0).round() / 10.0,
        })
    );
    node.shutdown().await;
    let _ = child.wait().await;
    if acked < messages {
        bail!("{acked} of {messages} messages acked");
    }
    Ok(())
}

/// Where `mesh bench stream`'s records are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamHost {
    /// On the appender: it hosts its own partitions, as an appender with
    /// no host does; records cross the link to the consumer.
    Appender,
    /// On the consumer's node (`host_streams`): appends cross the link,
    /// reads are local.
    Consumer,
}

impl StreamHost {
    pub(crate) fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "appender" => Ok(Self::Appender),
            "consumer" => Ok(Self::Consumer),
            other => bail!("unknown --host {other:?}: use appender or consumer"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Appender => "appender",
            Self::Consumer => "consumer",
        }
    }
}

/// `mesh bench stream`: this process appends; a consumer process reads
/// from the earliest offset. The host of the records is this process (by
/// default) or the consumer's. The rate counts records the consumer read,
/// from the first append to its report that it has all of them.
pub(super) async fn stream(
    size: usize,
    messages: u64,
    read: StreamRead,
    host: StreamHost,
    net: Net,
    json: bool,
) -> anyhow::Result<()> {
    let mode = match host {
        StreamHost::Appender => "stream",
        StreamHost::Consumer => "stream-host",
    };
    let StreamRead { window, group } = read;
    let mut peer_args = vec!["--window".to_owned(), window.to_string()];
    if group {
        peer_args.push("--group".to_owned());
    }
    // With a remote host, never host here: an append the host's
    // declaration has not reached yet fails rather than staying local.
    let (mut child, mut lines, node) =
        start_pair_configured(mode, messages, net, &peer_args, |b| {
            b.self_host(host == StreamHost::Appender)
        })
        .await?;
    let s = node.stream(STREAM)?;
    let payload = bytes::Bytes::from(vec![0xa5u8; size]);
    let start = Instant::now();
    // Batches of 1,024 (unkeyed: round-robin over the partitions per
    // batch), several in flight; each resolves once stored.
    let batch = 1024u64;
    let mut appends = futures::stream::iter((0..messages).step_by(batch as usize))
        .map(|first| {
            let n = batch.min(messages - first) as usize;
            s.append_batch(std::iter::repeat_n(
                (bytes::Bytes::new(), payload.clone()),
                n,
            ))
        })
        .buffer_unordered(8);
    while let Some(r) = appends.next().await {
        r?;
    }
    let appended = start.elapsed();
    let done = read_until(&mut lines, "DONE ", Duration::from_secs(120)).await?;
    let elapsed = start.elapsed();
    let mut done = done
        .split_whitespace()
        .map(|n| n.parse::<u64>().unwrap_or(0));
    let received = done.next().unwrap_or(0);
    let disorder = done.nth(1).unwrap_or(0);
    let secs = elapsed.as_secs_f64();
    let rate = received as f64 / secs;
    if !json {
        println!(
            "appended {messages} x {size} B in {:.3}s (stored by the {}); the consumer read {received} in {secs:.3}s (window {window})",
            appended.as_secs_f64(),
            host.name()
        );
        println!(
            "{:.0} records/s, {:.1} MB/s",
            rate,
            rate * size as f64 / 1e6
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "stream", "transport": net.name(), "size": size, "messages": messages,
            "window": window, "host": host.name(), "group": group, "received": received,
            "msgs_per_sec": rate.round(), "mb_per_sec": (rate * size as f64 / 1e6 * 10.0).round() / 10.0,
            "append_per_sec": (messages as f64 / appended.as_secs_f64()).round(),
        })
    );
    node.shutdown().await;
    let _ = child.wait().await;
    if received < messages {
        bail!("the consumer read {received} of {messages} records");
    }
    if disorder > 0 {
        bail!("the consumer read {disorder} records out of offset order");
    }
    Ok(())
}

/// `mesh bench request`: request/reply round trips to a responder process.
pub(super) async fn request(
    size: usize,
    messages: u64,
    net: Net,
    json: bool,
) -> anyhow::Result<()> {
    let warmup = 200u64;
    // The responder answers the first probe too.
    let (mut child, _lines, node) = start_pair("serve", messages + warmup + 1, net).await?;
    let payload = bytes::Bytes::from(vec![0x5au8; size]);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Until the responder's declaration arrives there are no responders.
    while node
        .request(RPC, payload.clone(), Duration::from_secs(5))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("the responder never answered");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut rtts = Vec::with_capacity(messages as usize);
    for i in 0..messages + warmup {
        let t = Instant::now();
        node.request(RPC, payload.clone(), Duration::from_secs(5))
            .await
            .context("request failed")?;
        if i >= warmup {
            rtts.push(t.elapsed().as_nanos() as u64);
        }
    }
    rtts.sort_unstable();
    let pct = |p: f64| {
        rtts.get(((rtts.len() as f64 - 1.0) * p) as usize)
            .map_or(0.0, |ns| *ns as f64 / 1000.0)
    };
    let (p50, p99) = (pct(0.5), pct(0.99));
    if !json {
        println!(
            "{} requests of {size} B; round trip p50 {p50:.1} µs, p99 {p99:.1} µs",
            rtts.len()
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "request", "transport": net.name(), "size": size,
            "messages": rtts.len(), "p50_us": (p50 * 10.0).round() / 10.0, "p99_us": (p99 * 10.0).round() / 10.0,
        })
    );
    node.shutdown().await;
    let _ = child.kill().await;
    Ok(())
}

pub(super) async fn pubsub(
    size: usize,
    messages: u64,
    pattern: &str,
    net: Net,
    json: bool,
) -> anyhow::Result<()> {
    match pattern {
        "throughput" => throughput(size, messages, net, json).await,
        "pingpong" => pingpong(size, messages, net, json).await,
        other => bail!("unknown pattern {other:?}: use throughput or pingpong"),
    }
}

async fn throughput(size: usize, messages: u64, net: Net, json: bool) -> anyhow::Result<()> {
    let (mut child, mut lines, node) = start_pair("sink", messages, net).await?;
    let payload = bytes::Bytes::from(vec![0xa5u8; size]);
    let publisher = node.publisher(DATA)?;
    let start = Instant::now();
    for _ in 0..messages {
        publisher.publish(payload.clone()).await?;
    }
    let sent = start.elapsed();
    let done = read_until(&mut lines, "DONE ", Duration::from_secs(120)).await?;
    let elapsed = start.elapsed();
    let received: u64 = done
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    let secs = elapsed.as_secs_f64();
    let rate = received as f64 / secs;
    if !json {
        println!(
            "published {messages} x {size} B in {:.3}s; subscriber received {received} in {secs:.3}s",
            sent.as_secs_f64()
        );
        println!("{:.0} msgs/s, {:.1} MB/s", rate, rate * size as f64 / 1e6);
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "pubsub", "transport": net.name(), "size": size, "messages": messages,
            "received": received,
            "msgs_per_sec": rate.round(), "mb_per_sec": (rate * size as f64 / 1e6 * 10.0).round() / 10.0,
        })
    );
    node.shutdown().await;
    let _ = child.wait().await;
    if received < messages {
        bail!("subscriber received {received} of {messages} messages");
    }
    Ok(())
}

async fn pingpong(size: usize, messages: u64, net: Net, json: bool) -> anyhow::Result<()> {
    let warmup = 200u64;
    let (mut child, lines, node) = start_pair("echo", messages + warmup + 1000, net).await?;
    let mut pongs = node.subscribe(PONG).await?;
    let payload = bytes::Bytes::from(vec![0x5au8; size]);
    // Until the echo side has our subscription, pings go unanswered.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        node.publish(PING, payload.clone()).await?;
        if tokio::time::timeout(Duration::from_millis(100), pongs.next())
            .await
            .is_ok()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("echo peer never answered");
        }
    }
    // Drain stray pongs from the warm-up retries.
    while tokio::time::timeout(Duration::from_millis(50), pongs.next())
        .await
        .is_ok()
    {}
    let mut rtts = Vec::with_capacity(messages as usize);
    for i in 0..messages + warmup {
        let t = Instant::now();
        node.publish(PING, payload.clone()).await?;
        match tokio::time::timeout(Duration::from_secs(5), pongs.next()).await {
            Ok(Some(_)) => {}
            _ => bail!("no pong within 5 s"),
        }
        if i >= warmup {
            rtts.push(t.elapsed().as_nanos() as u64);
        }
    }
    let (p50, p99) = one_way_p50_p99(&mut rtts);
    if !json {
        println!(
            "{messages} round trips of {size} B; one-way latency p50 {p50:.1} µs, p99 {p99:.1} µs"
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "pubsub", "transport": net.name(), "pattern": "pingpong", "size": size,
            "messages": messages, "p50_us": (p50 * 10.0).round() / 10.0, "p99_us": (p99 * 10.0).round() / 10.0,
        })
    );
    node.shutdown().await;
    let _ = child.kill().await;
    let _ = lines;
    Ok(())
}

/// `mesh bench gossip-sim`: see [`mesh::sim::overlay`].
pub(super) fn gossip_sim(
    nodes: usize,
    messages: usize,
    interval_ms: u64,
    seed: u64,
    json: bool,
) -> anyhow::Result<()> {
    use mesh::sim::overlay::{run, OverlayRun, PhaseReport};
    let cfg = OverlayRun {
        messages,
        interval: Duration::from_millis(interval_ms),
        ..OverlayRun::new(nodes, seed)
    };
    let started = Instant::now();
    let r = run(&cfg);
    let took = started.elapsed();
    let phase = |p: &PhaseReport| {
        serde_json::json!({
            "broadcast": p.broadcast,
            "expected_deliveries": p.expected,
            "deliveries": p.delivered,
            "latency_p50_ms": (p.latency_p50_ms * 10.0).round() / 10.0,
            "latency_p99_ms": (p.latency_p99_ms * 10.0).round() / 10.0,
            "max_hops": p.max_hops,
            "payloads_per_delivery": (p.payloads_per_delivery * 1000.0).round() / 1000.0,
            "messages_per_delivery": (p.messages_per_delivery * 1000.0).round() / 1000.0,
            "grafts": p.grafts,
            "prunes": p.prunes,
        })
    };
    let line = serde_json::json!({
        "bench": "gossip-sim",
        "nodes": r.nodes,
        "seed": seed,
        "interval_ms": interval_ms,
        "steady": phase(&r.steady),
        "partitioned": phase(&r.partitioned),
        "healed": phase(&r.healed),
        "active_view": [r.active_view.0, r.active_view.1],
        "wall_ms": took.as_millis() as u64,
    });
    if !json {
        for (name, p) in [
            ("steady", &r.steady),
            ("partitioned", &r.partitioned),
            ("healed", &r.healed),
        ] {
            println!(
                "{name:>11}: {}/{} delivered, latency p50 {:.1} ms p99 {:.1} ms, {} hops max, {:.3} payloads and {:.3} messages per delivery",
                p.delivered, p.expected, p.latency_p50_ms, p.latency_p99_ms, p.max_hops, p.payloads_per_delivery, p.messages_per_delivery
            );
        }
    }
    println!("{line}");
    if r.healed.delivered != r.healed.expected {
        bail!(
            "after the heal {} of {} deliveries happened",
            r.healed.delivered,
            r.healed.expected
        );
    }
    Ok(())
}

/// `mesh bench pubsub --mode gossip --nodes N`: this node publishes in
/// gossip mode, `N - 1` child processes subscribe (and relay); the rate is
/// messages delivered to every node per second.
pub(super) async fn gossip(
    nodes: usize,
    size: usize,
    messages: u64,
    json: bool,
) -> anyhow::Result<()> {
    if nodes < 2 {
        bail!("--nodes must be at least 2");
    }
    let node = Node::builder()
        .listen(loopback())
        .mdns(false)
        .gossip(mesh::Pattern::new("bench.>")?)
        .start()
        .await?;
    let addr = wait_addrs(&node)
        .await
        .into_iter()
        .next()
        .context("no listen address")?;
    let mut children = Vec::new();
    for _ in 1..nodes {
        let mut child = spawn_self(&[
            "bench-peer".into(),
            "--mode".into(),
            "sink".into(),
            "--messages".into(),
            messages.to_string(),
            "--gossip-via".into(),
            addr.to_string(),
        ])?;
        let lines = lines_of(&mut child)?;
        children.push((child, lines));
    }
    for (_, lines) in children.iter_mut() {
        read_until(lines, "ADDR ", Duration::from_secs(20)).await?;
    }
    // Warm up until the overlay reaches every node.
    let warm = bytes::Bytes::from(vec![0u8; size.max(1)]);
    let deadline = Instant::now() + Duration::from_secs(30);
    for (_, lines) in children.iter_mut() {
        loop {
            node.publish(DATA, warm.clone()).await?;
            if tokio::time::timeout(
                Duration::from_millis(20),
                read_until(lines, "WARM", Duration::from_secs(1)),
            )
            .await
            .is_ok_and(|r| r.is_ok())
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("gossip overlay did not reach every node within 30 s");
            }
        }
    }
    let payload = bytes::Bytes::from(vec![0xa5u8; size.max(1)]);
    let publisher = node.publisher(DATA)?;
    let start = Instant::now();
    for _ in 0..messages {
        publisher.publish(payload.clone()).await?;
    }
    let mut received = Vec::new();
    for (_, lines) in children.iter_mut() {
        let done = read_until(lines, "DONE ", Duration::from_secs(120)).await?;
        received.push(
            done.split_whitespace()
                .next()
                .unwrap_or("0")
                .parse::<u64>()
                .unwrap_or(0),
        );
    }
    let secs = start.elapsed().as_secs_f64();
    let min = received.iter().copied().min().unwrap_or(0);
    let rate = min as f64 / secs;
    if !json {
        println!(
            "gossip over {nodes} nodes: {messages} x {size} B; every node received at least {min} in {secs:.3}s"
        );
        println!("{rate:.0} msgs/s delivered to every node");
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "pubsub", "transport": "quic", "mode": "gossip", "nodes": nodes, "size": size,
            "messages": messages, "received_min": min, "msgs_per_sec": rate.round(),
        })
    );
    node.shutdown().await;
    for (mut child, _) in children {
        let _ = child.wait().await;
    }
    if min < messages {
        bail!("a node received {min} of {messages} messages");
    }
    Ok(())
}
