//! `mesh queue send|consume`, `mesh dlq list|replay`, `mesh request`,
//! `mesh serve`: one-shot processes that never host a queue, so they can
//! exit at once without losing what they sent while a `mesh node` (which
//! hosts every queue) runs.

use std::{io::Write, time::Duration};

use anyhow::bail;
use base64::Engine as _;
use futures::StreamExt;

use super::NetArgs;
use mesh::queue::ConsumeOptions;

fn payload_json(bytes: &[u8]) -> (String, &'static str) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_owned(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(bytes),
            "base64",
        ),
    }
}

fn id_string(id: mesh::MessageId) -> String {
    format!("{}/{}", id.publisher, id.seq)
}

fn print_line(v: &serde_json::Value) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "{v}")?;
    out.flush()?;
    Ok(())
}

/// Sends `count` messages (numbered if more than one); exits once the
/// queue's host has accepted each.
pub(super) async fn send(
    queue: String,
    message: String,
    count: u64,
    net: NetArgs,
) -> anyhow::Result<()> {
    let node = net.join().await?;
    let q = node.queue(&queue)?;
    let mut result = Ok(());
    for i in 0..count {
        let payload = if count > 1 {
            format!("{message} {}", i + 1)
        } else {
            message.clone()
        };
        if let Err(e) = q.send(payload).await {
            result = Err(anyhow::anyhow!(
                "sent {i} of {count} messages to {queue}: {e}"
            ));
            break;
        }
    }
    node.shutdown().await;
    result
}

/// Consumes, printing a JSON line per delivery, acking each (or nacking
/// every `fail_every`-th).
pub(super) async fn consume(
    queue: String,
    options: ConsumeOptions,
    fail_every: Option<u64>,
    count: Option<u64>,
    net: NetArgs,
) -> anyhow::Result<()> {
    let node = net.join().await?;
    let mut deliveries = node.queue(&queue)?.consume(options);
    let mut seen = 0u64;
    loop {
        if count.is_some_and(|c| seen >= c) {
            break;
        }
        tokio::select! {
            d = deliveries.next() => {
                let Some(d) = d else { break };
                seen += 1;
                let fail = fail_every.is_some_and(|k| k > 0 && seen.is_multiple_of(k));
                let (payload, encoding) = payload_json(d.payload());
                let mut line = serde_json::json!({
                    "queue": queue,
                    "id": id_string(d.id()),
                    "attempt": d.attempt(),
                    "payload": payload,
                    "encoding": encoding,
                    "acked": !fail,
                });
                if let Some((attempts, reason)) = d.dead_letter() {
                    line["dead_after"] = attempts.into();
                    line["error"] = reason.into();
                }
                print_line(&line)?;
                if fail {
                    d.nack(None);
                } else {
                    d.ack();
                }
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    drop(deliveries);
    node.shutdown().await;
    Ok(())
}

/// Lists the dead letters of `queue`.
pub(super) async fn dlq_list(queue: String, limit: usize, net: NetArgs) -> anyhow::Result<()> {
    let node = net.join().await?;
    let dead = node.queue(&queue)?.dead_letters().peek(limit).await?;
    for m in &dead {
        let (payload, encoding) = payload_json(&m.payload);
        let (attempts, error) = m.dead.clone().unwrap_or((m.attempts, String::new()));
        print_line(&serde_json::json!({
            "queue": format!("{queue}.dlq"),
            "id": id_string(m.id),
            "attempts": attempts,
            "error": error,
            "payload": payload,
            "encoding": encoding,
        }))?;
    }
    node.shutdown().await;
    Ok(())
}

/// Moves the dead letters of `queue` back into it.
pub(super) async fn dlq_replay(queue: String, net: NetArgs) -> anyhow::Result<()> {
    let node = net.join().await?;
    let moved = node.queue(&queue)?.replay_dead_letters().await?;
    println!("replayed {moved} message(s) from {queue}.dlq into {queue}");
    node.shutdown().await;
    Ok(())
}

/// Sends one request and prints the answer.
pub(super) async fn request(
    subject: String,
    message: String,
    timeout: Duration,
    net: NetArgs,
) -> anyhow::Result<()> {
    let node = net.join().await?;
    let result = node.request(&subject, message, timeout).await;
    node.shutdown().await;
    match result {
        Ok(answer) => {
            let (payload, _) = payload_json(&answer);
            println!("{payload}");
            Ok(())
        }
        Err(e) => bail!("request to {subject}: {e}"),
    }
}

/// Answers requests on `pattern` with their own payload, prefixed.
pub(super) async fn serve(
    pattern: String,
    prefix: String,
    count: Option<u64>,
    net: NetArgs,
) -> anyhow::Result<()> {
    let node = net.join().await?;
    let mut service = node.serve(&pattern).await?;
    println!("serving {pattern}");
    let mut seen = 0u64;
    loop {
        if count.is_some_and(|c| seen >= c) {
            break;
        }
        tokio::select! {
            r = service.next() => {
                let Some(r) = r else { break };
                seen += 1;
                let mut answer = prefix.clone().into_bytes();
                answer.extend_from_slice(r.payload());
                r.respond(answer);
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    drop(service);
    node.shutdown().await;
    Ok(())
}
