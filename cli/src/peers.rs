//! What the benchmarks share: the transport of their data link, the peer
//! process each starts (`mesh bench-peer`) and how it reports, and the
//! latency figures. The benchmarks use this module, never each other.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use mesh::{Node, WaitPolicy};

use crate::{lines_of, read_until, spawn_self, wait_addrs};

pub(crate) fn loopback() -> mesh::Multiaddr {
    "/ip4/127.0.0.1/udp/0/quic-v1"
        .parse()
        .expect("valid multiaddr")
}

/// The wait policy named on the command line.
pub(crate) fn wait_policy(name: &str) -> anyhow::Result<WaitPolicy> {
    match name {
        "spin" => Ok(WaitPolicy::BusySpin),
        "adaptive" => Ok(WaitPolicy::default()),
        other => bail!("unknown wait policy {other:?}: use spin or adaptive"),
    }
}

/// Which transport a benchmark's data link uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Net {
    Quic,
    /// Shared-memory rings, waiting as given.
    Shm(WaitPolicy),
}

impl Net {
    pub(crate) fn parse(transport: &str, wait: &str) -> anyhow::Result<Net> {
        let wait = wait_policy(wait)?;
        match transport {
            "quic" => Ok(Net::Quic),
            "shm" => Ok(Net::Shm(wait)),
            other => bail!("unknown transport {other:?}: use quic or shm"),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Net::Quic => "quic",
            Net::Shm(_) => "shm",
        }
    }

    fn wait_name(self) -> &'static str {
        match self {
            Net::Shm(WaitPolicy::BusySpin) => "spin",
            _ => "adaptive",
        }
    }

    /// A loopback node whose links to local peers use this transport.
    pub(crate) fn builder(self) -> mesh::Builder {
        let b = Node::builder().listen(loopback()).mdns(false);
        match self {
            Net::Quic => b.shm(false),
            Net::Shm(wait) => b.shm_config(mesh::ShmConfig {
                wait,
                ..Default::default()
            }),
        }
    }

    fn args(self) -> Vec<String> {
        vec![
            "--transport".into(),
            self.name().into(),
            "--wait".into(),
            self.wait_name().into(),
        ]
    }
}

pub(crate) type Pair = (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    Node,
);

pub(crate) async fn start_pair(mode: &str, messages: u64, net: Net) -> anyhow::Result<Pair> {
    start_pair_with(mode, messages, net, &[]).await
}

pub(crate) async fn start_pair_with(
    mode: &str,
    messages: u64,
    net: Net,
    extra: &[String],
) -> anyhow::Result<Pair> {
    start_pair_configured(mode, messages, net, extra, |b| b).await
}

/// [`start_pair_with`], this side's node configured by `configure`.
pub(crate) async fn start_pair_configured(
    mode: &str,
    messages: u64,
    net: Net,
    extra: &[String],
    configure: impl FnOnce(mesh::Builder) -> mesh::Builder,
) -> anyhow::Result<Pair> {
    let mut args = vec![
        "bench-peer".into(),
        "--mode".into(),
        mode.into(),
        "--messages".into(),
        messages.to_string(),
    ];
    args.extend(net.args());
    args.extend_from_slice(extra);
    let mut child = spawn_self(&args)?;
    let mut lines = lines_of(&mut child)?;
    let addr: mesh::Multiaddr = read_until(&mut lines, "ADDR ", Duration::from_secs(20))
        .await?
        .parse()?;
    let node = configure(net.builder().bootstrap(addr)).start().await?;
    node.ready_timeout(Duration::from_secs(10))
        .await
        .context("bench peer did not answer")?;
    if let Net::Shm(_) = net {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !node.peers().await.iter().any(|p| p.shm) {
            if Instant::now() > deadline {
                bail!("the link to the bench peer did not move to shared memory (see the log)");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok((child, lines, node))
}

pub(crate) async fn print_addr(node: &Node) -> anyhow::Result<()> {
    let addr = wait_addrs(node)
        .await
        .into_iter()
        .next()
        .context("no listen address")?;
    println!("ADDR {addr}");
    Ok(())
}

/// The child side of `bench queue`: consumes `bench.q`, acking each.
/// One-way latency in µs (half the round trip) at p50 and p99, from round
/// trips in nanoseconds.
pub(crate) fn one_way_p50_p99(rtts: &mut [u64]) -> (f64, f64) {
    rtts.sort_unstable();
    let pct = |p: f64| {
        rtts.get(((rtts.len() as f64 - 1.0) * p) as usize)
            .map_or(0.0, |ns| *ns as f64 / 2.0 / 1000.0)
    };
    (pct(0.5), pct(0.99))
}
