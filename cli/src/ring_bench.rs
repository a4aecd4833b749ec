//! `mesh bench ring`: the raw shared-memory ring between this process and
//! a child, without a node: records per second one way, or one-way latency
//! over a pair of rings (half the round trip).

use std::{
    io::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use mesh_transports::shm::{self, Consumer, Producer, Ring, Role};

use crate::peers::wait_policy;

use super::{lines_of, read_until, spawn_self};

/// Records written between two publications of the producer's position.
const BATCH: u64 = 32;
/// Round trips before latency is recorded.
const WARMUP: u64 = 10_000;

/// `--wait spin|adaptive`.
fn nonce() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

fn stamp(record: &mut [u8], seq: u64) {
    let n = record.len().min(8);
    record[..n].copy_from_slice(&seq.to_le_bytes()[..n]);
}

fn seq_of(record: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = record.len().min(8);
    b[..n].copy_from_slice(&record[..n]);
    u64::from_le_bytes(b)
}

pub(super) async fn run(
    size: usize,
    messages: u64,
    capacity: usize,
    pattern: &str,
    wait: &str,
    json: bool,
) -> anyhow::Result<()> {
    let policy = wait_policy(wait)?;
    let dir = shm::default_dir();
    let nonce = nonce();
    let pingpong = match pattern {
        "throughput" => false,
        "pingpong" => true,
        other => bail!("unknown pattern {other:?}: use throughput or pingpong"),
    };
    let tx = Ring::create(&dir, capacity, nonce, Role::Producer)?;
    let rx = if pingpong {
        Some(Ring::create(&dir, capacity, nonce, Role::Consumer)?)
    } else {
        None
    };
    if size > tx.capacity() / 2 - shm::ring::RECORD_HEADER {
        bail!("--size {size} does not fit a ring of {capacity} bytes");
    }
    let mut args = vec![
        "bench-ring-peer".to_owned(),
        "--ring".into(),
        tx.path().display().to_string(),
        "--nonce".into(),
        nonce.to_string(),
        "--messages".into(),
        if pingpong {
            (messages + WARMUP).to_string()
        } else {
            messages.to_string()
        },
        "--wait".into(),
        wait.into(),
    ];
    if let Some(rx) = &rx {
        args.extend(["--reply".into(), rx.path().display().to_string()]);
    }
    let mut child = spawn_self(&args)?;
    let mut lines = lines_of(&mut child)?;
    read_until(&mut lines, "READY", Duration::from_secs(20)).await?;
    let mut tx = tx
        .producer(policy)
        .map_err(|_| anyhow::anyhow!("ring role"))?;
    if let Some(rx) = rx {
        let mut rx = rx
            .consumer(policy)
            .map_err(|_| anyhow::anyhow!("ring role"))?;
        let mut rtts =
            tokio::task::spawn_blocking(move || ping(&mut tx, &mut rx, size, messages)).await??;
        let (p50, p99) = crate::peers::one_way_p50_p99(&mut rtts);
        if !json {
            println!(
                "{messages} round trips of {size} B over two rings ({wait}); one-way latency p50 {p50:.2} µs, p99 {p99:.2} µs"
            );
        }
        println!(
            "{}",
            serde_json::json!({
                "bench": "ring", "pattern": "pingpong", "size": size, "messages": messages,
                "wait": wait, "p50_us": (p50 * 100.0).round() / 100.0, "p99_us": (p99 * 100.0).round() / 100.0,
            })
        );
        let _ = child.wait().await;
        return Ok(());
    }
    let start = Instant::now();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut record = vec![0x5au8; size];
        for seq in 0..messages {
            stamp(&mut record, seq);
            tx.push(&record)?;
            if seq % BATCH == BATCH - 1 {
                tx.flush();
            }
        }
        tx.flush();
        Ok(())
    })
    .await??;
    let done = read_until(&mut lines, "DONE ", Duration::from_secs(300)).await?;
    let secs = start.elapsed().as_secs_f64();
    let mut parts = done.split_whitespace();
    let received: u64 = parts.next().unwrap_or("0").parse().unwrap_or(0);
    let in_order = parts.next() == Some("ordered");
    let rate = received as f64 / secs;
    if !json {
        println!(
            "{received} records of {size} B in {secs:.3}s through a {capacity}-byte ring ({wait})"
        );
        println!(
            "{:.2} M records/s, {:.0} MB/s",
            rate / 1e6,
            rate * size as f64 / 1e6
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "ring", "size": size, "messages": messages, "received": received,
            "capacity": capacity, "wait": wait,
            "msgs_per_sec": rate.round(), "mb_per_sec": (rate * size as f64 / 1e6).round(),
        })
    );
    let _ = child.wait().await;
    if received != messages || !in_order {
        bail!("the reader got {received} of {messages} records (in order: {in_order})");
    }
    Ok(())
}

/// Round trips: each one's nanoseconds, after the warm-up.
fn ping(
    tx: &mut Producer,
    rx: &mut Consumer,
    size: usize,
    messages: u64,
) -> anyhow::Result<Vec<u64>> {
    let mut record = vec![0x5au8; size.max(8)];
    record.truncate(size);
    let mut rtts = Vec::with_capacity(messages as usize);
    for seq in 0..messages + WARMUP {
        stamp(&mut record, seq);
        let t = Instant::now();
        tx.push(&record)?;
        tx.flush();
        let mut got = None;
        while got.is_none() {
            if rx.poll_blocking(1, |r| {
                got = Some(seq_of(r));
                true
            })? == 0
            {
                bail!("the echo side closed its ring");
            }
        }
        let elapsed = t.elapsed().as_nanos() as u64;
        if size >= 8 && got != Some(seq) {
            bail!("echo {got:?} for record {seq}");
        }
        if seq >= WARMUP {
            rtts.push(elapsed);
        }
    }
    Ok(rtts)
}

/// The child: reads `messages` records and reports, or echoes each record.
pub(super) fn peer(
    ring: &Path,
    reply: Option<&Path>,
    nonce: u64,
    messages: u64,
    wait: &str,
) -> anyhow::Result<()> {
    let policy = wait_policy(wait)?;
    let mut rx = Ring::open(ring, nonce, Role::Consumer)
        .context("opening the bench ring")?
        .consumer(policy)
        .map_err(|_| anyhow::anyhow!("ring role"))?;
    let mut tx = match reply {
        Some(path) => Some(
            Ring::open(path, nonce, Role::Producer)
                .context("opening the reply ring")?
                .producer(policy)
                .map_err(|_| anyhow::anyhow!("ring role"))?,
        ),
        None => None,
    };
    println!("READY");
    std::io::stdout().flush()?;
    let mut seen = 0u64;
    let mut ordered = true;
    let mut echo_err = None;
    while seen < messages {
        let n = rx.poll_blocking(usize::MAX, |r| {
            ordered &= r.len() < 8 || seq_of(r) == seen;
            seen += 1;
            if let Some(tx) = &mut tx {
                if let Err(e) = tx.push(r) {
                    echo_err = Some(e);
                    return false;
                }
            }
            true
        })?;
        if let Some(tx) = &mut tx {
            tx.flush();
        }
        if let Some(e) = echo_err.take() {
            return Err(e.into());
        }
        if n == 0 {
            break;
        }
    }
    println!(
        "DONE {seen} {}",
        if ordered { "ordered" } else { "out-of-order" }
    );
    Ok(())
}
