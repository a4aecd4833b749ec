//! `mesh stream append|read|info`: one-shot processes that never host a
//! stream, so `append` exits as soon as the stream's host stored its
//! records, while a `mesh node` (which hosts every stream) runs.

use std::io::Write;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use futures::StreamExt;

use super::NetArgs;
use mesh::stream::{self, PartitionInfo, Record, RecordPos};

/// Records per `append_batch` call of `append --count`.
const BATCH: u64 = 1024;

/// Bytes as a JSON string: UTF-8 when valid, else base64.
fn text_json(bytes: &[u8]) -> (String, &'static str) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_owned(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(bytes),
            "base64",
        ),
    }
}

/// A record as one JSON object: `partition` ("PEERID/INDEX"), `offset`,
/// `key`, `timestamp` (ms since the Unix epoch), `payload` and
/// `encoding`; `key_encoding` and `headers` only when there is something
/// to say.
fn record_json(stream: &str, r: &Record) -> serde_json::Value {
    let (payload, encoding) = text_json(r.payload());
    let (key, key_encoding) = text_json(r.key());
    let mut v = serde_json::json!({
        "stream": stream,
        "partition": r.partition().to_string(),
        "offset": r.offset(),
        "key": key,
        "timestamp": r.timestamp_ms(),
        "payload": payload,
        "encoding": encoding,
    });
    if key_encoding != "utf8" {
        v["key_encoding"] = key_encoding.into();
    }
    if !r.headers().is_empty() {
        let headers: serde_json::Map<String, serde_json::Value> = r
            .headers()
            .iter()
            .map(|(k, v)| (k.clone(), text_json(v).0.into()))
            .collect();
        v["headers"] = headers.into();
    }
    v
}

/// Appends `count` records (`MESSAGE-0` .. `MESSAGE-(N-1)` if more than
/// one), in batches, printing where each went; exits once the host stored
/// them all.
pub(super) async fn append(
    stream: String,
    message: String,
    key: Option<String>,
    count: u64,
    net: NetArgs,
) -> anyhow::Result<()> {
    let node = net.join().await?;
    let s = node.stream(&stream)?;
    let key = mesh::Bytes::from(key.unwrap_or_default());
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut result = Ok(());
    let mut done = 0u64;
    // One batch at a time: records of one key keep their order, and the
    // batch is the unit the node hands to the host anyway.
    while done < count {
        let n = BATCH.min(count - done);
        let payloads: Vec<String> = (done..done + n)
            .map(|i| {
                if count > 1 {
                    format!("{message}-{i}")
                } else {
                    message.clone()
                }
            })
            .collect();
        let placed = match s
            .append_batch(payloads.iter().map(|p| (key.clone(), p.clone())))
            .await
        {
            Ok(placed) => placed,
            Err(e) => {
                result = Err(anyhow::anyhow!(
                    "appended {done} of {count} records to {stream}: {e}"
                ));
                break;
            }
        };
        for (p, at) in payloads.iter().zip(&placed) {
            writeln!(out, "{}", placed_json(&stream, &key, p, at))?;
        }
        done += n;
    }
    out.flush()?;
    drop(out);
    node.shutdown().await;
    result
}

fn placed_json(stream: &str, key: &[u8], payload: &str, at: &RecordPos) -> serde_json::Value {
    serde_json::json!({
        "stream": stream,
        "partition": at.partition.to_string(),
        "offset": at.offset,
        "key": text_json(key).0,
        "payload": payload,
    })
}

/// Where `--from` says to start.
fn parse_from(from: &str) -> anyhow::Result<stream::From> {
    Ok(match from {
        "earliest" => stream::From::Earliest,
        "latest" => stream::From::Latest,
        n => stream::From::Offset(n.parse().with_context(|| {
            format!("--from {n:?}: use earliest, latest or an offset (a number)")
        })?),
    })
}

/// Reads from `from` (or as a member of `group`), printing a JSON line per
/// record; with a group, each record is committed once printed.
pub(super) async fn read(
    stream: String,
    from: &str,
    group: Option<String>,
    count: Option<u64>,
    net: NetArgs,
) -> anyhow::Result<()> {
    let from = parse_from(from)?;
    if let (Some(_), stream::From::Offset(_)) = (&group, from) {
        bail!("with --group, reading resumes from the group's commits: --from takes earliest or latest (for partitions it never committed)");
    }
    let node = net.join().await?;
    let s = node.stream(&stream)?;
    let mut records = match &group {
        None => s.consume(from),
        Some(g) => s.group(g)?.consume_with(stream::GroupOptions {
            start: match from {
                stream::From::Latest => stream::GroupStart::Latest,
                _ => stream::GroupStart::Earliest,
            },
            ..Default::default()
        }),
    };
    let mut seen = 0u64;
    let stdout = std::io::stdout();
    loop {
        if count.is_some_and(|c| seen >= c) {
            break;
        }
        tokio::select! {
            r = records.next() => match r {
                Some(Ok(r)) => {
                    seen += 1;
                    let mut out = stdout.lock();
                    writeln!(out, "{}", record_json(&stream, &r))?;
                    out.flush()?;
                    r.commit();
                }
                Some(Err(stream::ReadError::OffsetGone { partition, requested, first })) => {
                    let mut out = stdout.lock();
                    let line = serde_json::json!({
                        "gone": { "partition": partition.to_string(), "requested": requested, "first": first },
                    });
                    writeln!(out, "{line}")?;
                    out.flush()?;
                }
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    drop(records);
    node.shutdown().await;
    Ok(())
}

/// Per group, its committed offset and lag in one partition.
fn group_lags(p: &PartitionInfo) -> Vec<(String, u64, u64)> {
    let mut groups: Vec<(String, u64, u64)> = p
        .committed
        .iter()
        .map(|(g, committed)| {
            let lag = p.next.saturating_sub((*committed).max(p.first));
            (g.clone(), *committed, lag)
        })
        .collect();
    groups.sort();
    groups
}

/// Prints the stream's partitions and the groups' commits and lag.
pub(super) async fn info(stream: String, json: bool, net: NetArgs) -> anyhow::Result<()> {
    let node = net.join().await?;
    let result = node.stream(&stream)?.info().await;
    node.shutdown().await;
    let info = result?;
    // Groups over all partitions: a group that never committed in a
    // partition lags by all the partition holds.
    let mut names: Vec<&str> = info
        .partitions
        .iter()
        .flat_map(|p| p.committed.iter().map(|(g, _)| g.as_str()))
        .collect();
    names.sort_unstable();
    names.dedup();
    let total_lag = |g: &str| -> u64 {
        info.partitions
            .iter()
            .map(|p| {
                let from = p
                    .committed
                    .iter()
                    .find(|(n, _)| n == g)
                    .map_or(p.first, |(_, o)| (*o).max(p.first));
                p.next.saturating_sub(from)
            })
            .sum()
    };
    let records: u64 = info.partitions.iter().map(PartitionInfo::records).sum();
    let bytes: u64 = info.partitions.iter().map(|p| p.bytes).sum();
    let mut hosts: Vec<_> = info.partitions.iter().map(|p| p.partition.host).collect();
    hosts.dedup();
    if json {
        let partitions: Vec<_> = info
            .partitions
            .iter()
            .map(|p| {
                let groups: Vec<_> = group_lags(p)
                    .into_iter()
                    .map(|(g, committed, lag)| {
                        serde_json::json!({ "group": g, "committed": committed, "lag": lag })
                    })
                    .collect();
                serde_json::json!({
                    "partition": p.partition.to_string(),
                    "first": p.first,
                    "next": p.next,
                    "records": p.records(),
                    "bytes": p.bytes,
                    "groups": groups,
                })
            })
            .collect();
        let groups: Vec<_> = names
            .iter()
            .map(|g| serde_json::json!({ "group": g, "lag": total_lag(g) }))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "stream": info.name,
                "hosts": hosts.len(),
                "records": records,
                "bytes": bytes,
                "partitions": partitions,
                "groups": groups,
                "missing": info.missing.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
            })
        );
        return Ok(());
    }
    for h in &info.missing {
        println!("host {h} did not answer in time: its partitions are not listed");
    }
    if info.partitions.is_empty() {
        println!("stream {}: no live host holds it", info.name);
        return Ok(());
    }
    println!(
        "stream {}: {} partition(s) on {} host(s), {records} record(s), {bytes} bytes",
        info.name,
        info.partitions.len(),
        hosts.len()
    );
    println!(
        "{:<56} {:>10} {:>10} {:>10} {:>12}",
        "PARTITION", "FIRST", "NEXT", "RECORDS", "BYTES"
    );
    for p in &info.partitions {
        println!(
            "{:<56} {:>10} {:>10} {:>10} {:>12}",
            p.partition.to_string(),
            p.first,
            p.next,
            p.records(),
            p.bytes
        );
        for (g, committed, lag) in group_lags(p) {
            println!("    group {g}: committed {committed}, lag {lag}");
        }
    }
    for g in &names {
        println!("group {g}: lag {} record(s) in all", total_lag(g));
    }
    Ok(())
}
