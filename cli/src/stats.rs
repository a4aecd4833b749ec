//! `mesh stats`: a running node's metrics, read from its metrics endpoint
//! (`mesh node --metrics-addr ADDR`) and printed as a table or JSON.
//!
//! It reads `/metrics.json`, not the mesh: a one-shot node joining the
//! mesh could not see another node's counters, and the endpoint is what
//! Prometheus scrapes too, so the two always agree.

use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use mesh::metrics::Metrics;

/// How long the node may take to answer.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read.
const MAX_BODY: u64 = 64 * 1024 * 1024;

pub(super) async fn run(addr: &str, json: bool) -> anyhow::Result<()> {
    let body = tokio::time::timeout(TIMEOUT, fetch(addr, "/metrics.json"))
        .await
        .with_context(|| format!("no answer from {addr} within {TIMEOUT:?}"))??;
    if json {
        println!("{body}");
        return Ok(());
    }
    let m: Metrics = serde_json::from_str(&body)
        .with_context(|| format!("{addr} did not answer with mesh metrics"))?;
    print!("{}", table(&m));
    Ok(())
}

/// `GET path` over plain HTTP/1.1; the body of a 200 answer.
async fn fetch(addr: &str, path: &str) -> anyhow::Result<String> {
    let addr = addr.strip_prefix("http://").unwrap_or(addr);
    let addr = addr.split('/').next().unwrap_or(addr);
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot reach the metrics endpoint at {addr}"))?;
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut answer = Vec::new();
    conn.take(MAX_BODY).read_to_end(&mut answer).await?;
    let answer = String::from_utf8(answer).context("the answer is not text")?;
    let Some((head, body)) = answer.split_once("\r\n\r\n") else {
        bail!("{addr} did not answer HTTP");
    };
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("{addr} answered {status:?}: {}", body.trim());
    }
    Ok(body.to_owned())
}

fn table(m: &Metrics) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut row = |what: &str, cells: &[(&str, u64)]| {
        let cells: Vec<String> = cells.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(out, "{what:<14}{}", cells.join("  "));
    };
    row(
        "peers",
        &[
            ("alive", m.peers.alive),
            ("suspect", m.peers.suspect),
            ("down", m.peers.down),
        ],
    );
    let l = &m.links;
    row(
        "links",
        &[
            ("up-quic", l.up_quic),
            ("up-shm", l.up_shm),
            ("opened", l.opened),
            ("closed", l.closed),
            ("refused", l.refused),
        ],
    );
    row("subscriptions", &[("live", m.subscriptions)]);
    let p = &m.pubsub;
    row(
        "pubsub",
        &[
            ("published", p.published),
            ("sent", p.sent),
            ("resent", p.resent),
            ("received", p.received),
            ("delivered", p.delivered),
        ],
    );
    let q = &m.queues;
    row(
        "queues",
        &[
            ("sent", q.sent),
            ("accepted", q.accepted),
            ("refused", q.refused),
            ("delivered", q.delivered),
            ("redelivered", q.redelivered),
            ("acked", q.acked),
            ("nacked", q.nacked),
            ("dead-lettered", q.dead_lettered),
        ],
    );
    let s = &m.streams;
    row(
        "streams",
        &[
            ("appended", s.appended),
            ("refused", s.refused),
            ("dispatched", s.dispatched),
            ("received", s.received),
            ("commits", s.commits),
        ],
    );
    let b = &m.bytes;
    row(
        "bytes",
        &[
            ("quic-sent", b.quic_sent),
            ("quic-received", b.quic_received),
            ("shm-sent", b.shm_sent),
            ("shm-received", b.shm_received),
        ],
    );
    let drops: Vec<(&str, u64)> = m
        .dropped
        .by_reason()
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .collect();
    if drops.is_empty() {
        row("dropped", &[("none", 0)]);
    } else {
        row("dropped", &drops);
    }
    if let Some(d) = &m.durable {
        row(
            "durable",
            &[
                ("batches-pending", d.batches_pending),
                ("confirmations-held", d.confirmations_held),
            ],
        );
    }
    if !m.hosted_queues.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<30} {:>10} {:>10} {:>10} {:>10}",
            "QUEUE", "DEPTH", "IN-FLIGHT", "CONSUMERS", "DLQ"
        );
        for q in &m.hosted_queues {
            let _ = writeln!(
                out,
                "{:<30} {:>10} {:>10} {:>10} {:>10}",
                q.name, q.depth, q.in_flight, q.consumers, q.dlq_depth
            );
        }
    }
    if !m.group_lag.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<30} {:<20} {:>10} {:>11}",
            "STREAM", "GROUP", "LAG", "PARTITIONS"
        );
        for g in &m.group_lag {
            let _ = writeln!(
                out,
                "{:<30} {:<20} {:>10} {:>11}",
                g.stream, g.group, g.lag, g.partitions
            );
        }
    }
    format!("node {}\n{out}", m.node)
}
