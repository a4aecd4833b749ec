//! The SQLite outbox from the command line: `mesh queue send --durable`,
//! `mesh outbox status`, the relay of `mesh node --data-dir`, `mesh bench
//! outbox` (both sides) and the shop process of the demo's outbox scene.
//!
//! A data dir holds `outbox.db`: rows a durable send committed and its
//! relay has not had confirmed yet. Whoever runs a relay over it next (the
//! next durable send, or a `mesh node --data-dir` on that dir) sends them.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use futures::{FutureExt, StreamExt};

use super::NetArgs;
use mesh::{
    store::{self, rusqlite, Destination, Inbox, Outbox, Relay, RelayOptions, StoreError},
    Node,
};

/// The outbox file in a data dir.
pub(super) const OUTBOX_FILE: &str = "outbox.db";

/// A durable send could not be confirmed in time: its messages wait in
/// the outbox. The process exits with [`PENDING_EXIT`] for it.
#[derive(Debug, thiserror::Error)]
#[error("{pending} message(s) still pending in {path} ({why}); they are kept there and will be sent by the next `mesh node --data-dir {dir}` or `mesh queue send --durable --data-dir {dir}` run: nothing is lost")]
pub(super) struct StillPending {
    pending: u64,
    path: String,
    dir: String,
    why: String,
}

/// Exit status of a durable send whose messages stay pending
/// (`EX_TEMPFAIL`: try again later), to tell it apart from a refusal (1).
pub(super) const PENDING_EXIT: i32 = 75;

/// The data dir: `given`, else `$MESH_DATA_DIR`, else
/// `$XDG_DATA_HOME/mesh`, else `~/.local/share/mesh`.
pub(super) fn data_dir(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = given {
        return Ok(dir);
    }
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("MESH_DATA_DIR") {
        return Ok(dir);
    }
    // The XDG spec says to ignore a relative XDG_DATA_HOME.
    if let Some(dir) = var("XDG_DATA_HOME").filter(|d| d.is_absolute()) {
        return Ok(dir.join("mesh"));
    }
    if let Some(home) = var("HOME") {
        return Ok(home.join(".local").join("share").join("mesh"));
    }
    bail!("no data dir: give --data-dir DIR or set MESH_DATA_DIR")
}

/// Creates `dir` (and missing parents) with mode 0700: the messages in it
/// are its owner's alone.
pub(super) fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
        .with_context(|| format!("cannot create the data dir {}", dir.display()))
}

/// What `--count` numbering gives message `i` (as `mesh queue send`).
fn numbered(message: &str, i: u64, count: u64) -> String {
    if count > 1 {
        format!("{message} {}", i + 1)
    } else {
        message.to_owned()
    }
}

/// `mesh queue send --durable`: commits the messages to DIR/outbox.db in
/// one transaction, then relays them (with whatever earlier runs left
/// pending) through a one-shot node; succeeds once every row is confirmed
/// by the queue's host, else fails with [`StillPending`].
pub(super) async fn send_durable(
    queue: String,
    message: String,
    count: u64,
    dir: Option<PathBuf>,
    wait: Duration,
    net: NetArgs,
) -> anyhow::Result<()> {
    let dir = data_dir(dir)?;
    create_private_dir(&dir)?;
    let path = dir.join(OUTBOX_FILE);
    let (outbox, mut conn) = Outbox::open(&path)?;
    let sql = |e| StoreError::sqlite(&path, e);
    // On disk (synchronous=FULL) before anything is sent.
    let tx = conn.transaction().map_err(sql)?;
    for i in 0..count {
        outbox.enqueue(
            &tx,
            Destination::Queue(&queue),
            numbered(&message, i, count),
        )?;
    }
    tx.commit().map_err(sql)?;

    let pending = |why: String| -> anyhow::Error {
        match Outbox::status(&conn) {
            Ok(s) => StillPending {
                pending: s.pending,
                path: path.display().to_string(),
                dir: dir.display().to_string(),
                why,
            }
            .into(),
            Err(e) => anyhow::Error::from(e).context(why),
        }
    };
    // One-shot: never hosts the queue, so what it relays is confirmed by
    // a host that outlives it.
    let node = match net.builder()?.self_host(false).start().await {
        Ok(node) => node,
        Err(e) => return Err(pending(format!("the node did not start: {e}"))),
    };
    if node.joined(net.timeout()).await.is_err() {
        node.shutdown().await;
        return Err(pending(format!(
            "no mesh peer found within {:.1}s; give one with --bootstrap ADDR",
            net.timeout
        )));
    }
    let relay = match outbox.relay(&node, RelayOptions::default()) {
        Ok(relay) => relay,
        Err(e) => {
            node.shutdown().await;
            return Err(pending(format!("the relay did not start: {e}")));
        }
    };
    let confirmed = relay.wait_idle(wait).await;
    let stats = relay.stats();
    relay.stop();
    node.shutdown().await;
    if confirmed {
        return Ok(());
    }
    // Another relay (a `mesh node` on this dir) may have sent them.
    if Outbox::status(&conn)?.pending == 0 {
        return Ok(());
    }
    let why = match (stats.stopped, stats.last_error) {
        (Some(stopped), _) => format!("the relay stopped: {stopped}"),
        (None, Some(e)) => format!(
            "not confirmed within {:.1}s; last error: {e}",
            wait.as_secs_f64()
        ),
        (None, None) => format!("not confirmed within {:.1}s", wait.as_secs_f64()),
    };
    Err(pending(why))
}

/// The relay of `mesh node --data-dir DIR` over DIR/outbox.db, started as
/// soon as that file exists (a durable send that could not finish may
/// create it while the node runs).
#[derive(Debug)]
pub(super) struct NodeOutbox {
    path: PathBuf,
    relay: Option<Relay>,
    /// `sent` of the relay when last printed.
    printed: u64,
    /// After a failure, when to try again.
    retry_at: Option<Instant>,
}

impl NodeOutbox {
    /// Starts the relay if DIR/outbox.db exists; a file that is there but
    /// cannot be opened (corrupt, newer schema, another application's) is
    /// an error.
    pub(super) fn start(dir: &Path, node: &Node) -> anyhow::Result<NodeOutbox> {
        let mut me = NodeOutbox {
            path: dir.join(OUTBOX_FILE),
            relay: None,
            printed: 0,
            retry_at: None,
        };
        if me.path.exists() {
            me.open(node)
                .with_context(|| format!("cannot relay {}", me.path.display()))?;
        }
        Ok(me)
    }

    fn open(&mut self, node: &Node) -> Result<(), StoreError> {
        let (outbox, conn) = Outbox::open(&self.path)?;
        let pending = Outbox::status(&conn)?.pending;
        self.relay = Some(outbox.relay(node, RelayOptions::default())?);
        println!(
            "outbox {}: relaying, {pending} pending",
            self.path.display()
        );
        Ok(())
    }

    /// Called every tick of `mesh node`: starts the relay once the file
    /// appears, prints `outbox sent N` as the count moves, and restarts a
    /// relay that stopped on an error (after 5 s).
    pub(super) fn tick(&mut self, node: &Node) {
        if let Some(relay) = &self.relay {
            let stats = relay.stats();
            if stats.sent != self.printed {
                self.printed = stats.sent;
                println!("outbox sent {}", stats.sent);
            }
            if let Some(why) = stats.stopped {
                tracing::error!(path = %self.path.display(), error = %why, "outbox relay stopped; retrying in 5 s");
                self.relay = None;
                self.retry_at = Some(Instant::now() + Duration::from_secs(5));
            }
            return;
        }
        if self.retry_at.is_some_and(|t| Instant::now() < t) || !self.path.exists() {
            return;
        }
        self.retry_at = None;
        if let Err(e) = self.open(node) {
            tracing::error!(error = %e, "cannot relay the outbox; retrying in 5 s");
            self.retry_at = Some(Instant::now() + Duration::from_secs(5));
        }
    }

    /// Stops the relay (rows in flight are sent again by the next one).
    pub(super) fn stop(self) {
        if let Some(r) = self.relay {
            r.stop();
        }
    }
}

/// `mesh outbox status`: the counts of DIR/outbox.db (or FILE).
pub(super) fn status(dir: Option<PathBuf>, db: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let path = match db {
        Some(file) => file,
        None => data_dir(dir)?.join(OUTBOX_FILE),
    };
    if !path.is_file() {
        bail!(
            "{}: no such file, so no outbox there (`mesh queue send --durable` creates DIR/{OUTBOX_FILE}; give --data-dir DIR or --db FILE)",
            path.display()
        );
    }
    // Read-only: looking must not change the file (not even to WAL mode,
    // if it is an application's database).
    let sql = |e| StoreError::sqlite(&path, e);
    let conn = rusqlite::Connection::open_with_flags(
        &path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql)?;
    conn.busy_timeout(store::BUSY_TIMEOUT).map_err(sql)?;
    // The first read of the file: garbage fails here, as Corrupt.
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'mesh_outbox'",
            [],
            |r| r.get(0),
        )
        .map_err(sql)?;
    if tables == 0 {
        bail!(
            "{}: a SQLite database without a mesh outbox (no table mesh_outbox)",
            path.display()
        );
    }
    let s = Outbox::status(&conn)?;
    let age = s.oldest_pending_us.map(|us| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        (now - us).max(0) as f64 / 1e6
    });
    if json {
        let by: Vec<_> = s
            .by_destination
            .iter()
            .map(|(d, n)| serde_json::json!({ "destination": d, "pending": n }))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "path": path.display().to_string(),
                "pending": s.pending,
                "sent": s.sent,
                "oldest_pending_us": s.oldest_pending_us,
                "oldest_pending_age_secs": age.map(|a| (a * 1000.0).round() / 1000.0),
                "by_destination": by,
            })
        );
        return Ok(());
    }
    let oldest = age.map_or(String::new(), |a| {
        format!(" (the oldest written {} ago)", human_secs(a))
    });
    println!("outbox {}", path.display());
    println!("  pending: {}{oldest}", s.pending);
    println!("  sent:    {}", s.sent);
    if !s.by_destination.is_empty() {
        println!("  pending by destination:");
        let width = s
            .by_destination
            .iter()
            .map(|(d, _)| d.len())
            .max()
            .unwrap_or(0);
        for (d, n) in &s.by_destination {
            println!("    {d:<width$}  {n}");
        }
    }
    Ok(())
}

/// `12.3s`, `4m05s`, `2h03m`, `3d04h`.
fn human_secs(s: f64) -> String {
    let whole = s as u64;
    match whole {
        0..60 => format!("{s:.1}s"),
        60..3600 => format!("{}m{:02}s", whole / 60, whole % 60),
        3600..86400 => format!("{}h{:02}m", whole / 3600, whole / 60 % 60),
        _ => format!("{}d{:02}h", whole / 86400, whole / 3600 % 24),
    }
}

/// A fresh directory (mode 0700) for a run's database files, removed when
/// dropped.
#[derive(Debug)]
pub(super) struct ScratchDir(PathBuf);

impl ScratchDir {
    /// `base/NAME-PID-NANOS`.
    pub(super) fn new(base: Option<PathBuf>, name: &str) -> anyhow::Result<ScratchDir> {
        let base = base.unwrap_or_else(std::env::temp_dir);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = base.join(format!("{name}-{}-{nanos}", std::process::id()));
        create_private_dir(&dir)?;
        Ok(ScratchDir(dir))
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The queue of `mesh bench outbox`.
pub(super) const BENCH_QUEUE: &str = "bench.outbox";

/// How `mesh bench outbox` runs.
#[derive(Debug, Clone)]
pub(super) struct BenchOutbox {
    pub(super) messages: u64,
    pub(super) size: usize,
    /// Rows per producer transaction.
    pub(super) tx_rows: u64,
    /// The consumer processes through an inbox in its own SQLite file.
    pub(super) inbox: bool,
    /// The consumer's process hosts the queue (else this one does).
    pub(super) host_consumer: bool,
    pub(super) prefetch: u32,
    /// Where the database files go (a fresh directory in it).
    pub(super) dir: Option<PathBuf>,
    /// Only commit (no relay, no consumer), and compare with plain inserts.
    pub(super) producer_only: bool,
    /// The relay's rows per read and per send.
    pub(super) relay_batch: usize,
    /// The relay's most rows sent and not yet confirmed.
    pub(super) relay_in_flight: usize,
    pub(super) json: bool,
}

/// `mesh bench outbox`: an application thread here commits numbered
/// messages into an outbox (`synchronous=FULL`, `tx_rows` per
/// transaction) while the relay sends them to the queue; a consumer
/// process acks each (through an inbox with `--inbox`). The rate counts
/// messages acked, from the first commit to the last ack.
pub(super) async fn bench(b: BenchOutbox, net: crate::peers::Net) -> anyhow::Result<()> {
    if b.size < 8 {
        bail!("bench outbox numbers its messages: --size must be at least 8");
    }
    if b.tx_rows == 0 {
        bail!("--tx-rows must be at least 1");
    }
    let scratch = ScratchDir::new(b.dir.clone(), "mesh-bench-outbox")?;
    if b.producer_only {
        return producer_only(&b, scratch.path());
    }
    let mode = if b.host_consumer {
        "outbox-host"
    } else {
        "outbox"
    };
    let mut extra = vec!["--prefetch".to_owned(), b.prefetch.to_string()];
    if b.inbox {
        extra.push("--inbox".into());
        extra.push(scratch.path().join("inbox.db").display().to_string());
    }
    // With the consumer hosting, never host here: a send before the host's
    // declaration arrived is retried by the relay rather than kept here.
    // Hosting here, the node is durable (its own data dir): a relay takes
    // no confirmation from a host that keeps the queue in memory only.
    let node_dir = scratch.path().join("node");
    let (mut child, mut lines, node) =
        crate::peers::start_pair_configured(mode, b.messages, net, &extra, |builder| {
            if b.host_consumer {
                builder.self_host(false)
            } else {
                builder.self_host(true).data_dir(&node_dir)
            }
        })
        .await?;
    let app = scratch.path().join("app.db");
    let (outbox, conn) = Outbox::open(&app)?;
    let options = RelayOptions {
        batch: b.relay_batch,
        max_in_flight: b.relay_in_flight,
        ..RelayOptions::default()
    };
    let relay = outbox.relay(&node, options)?;
    let (messages, size, tx_rows) = (b.messages, b.size, b.tx_rows);
    let start = Instant::now();
    let producer =
        tokio::task::spawn_blocking(move || produce(&outbox, &app, messages, size, tx_rows));
    let committed = producer.await.context("the producer thread failed")??;
    let q = node.queue(BENCH_QUEUE)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    // Acks: counted back at the host here, or the consumer's report when it
    // hosts the queue itself.
    let (acked, done) = if b.host_consumer {
        let done = read_until_bench(&mut lines, deadline).await?;
        (done.unique, Some(done))
    } else {
        let acked = loop {
            let s = q.host_stats().await?;
            if s.acked >= messages || Instant::now() > deadline {
                break s.acked;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        (acked, None)
    };
    let elapsed = start.elapsed();
    let done = match done {
        Some(d) => d,
        None => read_until_bench(&mut lines, Instant::now() + Duration::from_secs(30)).await?,
    };
    // Every row confirmed, so the relay deletes them all shortly.
    let idle = relay.wait_idle(Duration::from_secs(30)).await;
    let stats = relay.stats();
    relay.stop();
    let status = Outbox::status(&conn)?;
    let secs = elapsed.as_secs_f64();
    let rate = acked as f64 / secs;
    let commit_rate = messages as f64 / committed.as_secs_f64();
    if !b.json {
        println!(
            "committed {messages} x {size} B in transactions of {tx_rows} in {:.3}s ({commit_rate:.0} rows/s, relay running); {acked} acked{} in {secs:.3}s",
            committed.as_secs_f64(),
            if b.inbox { " (through an inbox, one commit per batch)" } else { "" },
        );
        println!(
            "{rate:.0} durable msgs/s through the outbox, {:.1} MB/s",
            rate * size as f64 / 1e6
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "outbox", "transport": net.name(), "size": size, "messages": messages,
            "tx_rows": tx_rows, "inbox": b.inbox,
            "relay_batch": b.relay_batch, "relay_in_flight": b.relay_in_flight,
            "host": if b.host_consumer { "consumer" } else { "producer" },
            "prefetch": b.prefetch, "acked": acked,
            "msgs_per_sec": rate.round(),
            "commit_per_sec": commit_rate.round(),
            "relay_sent": stats.sent, "relay_failures": stats.failures,
            "pending_after": status.pending,
            "consumer_unique": done.unique, "consumer_duplicates": done.duplicates,
            "inbox_skipped": done.skipped,
        })
    );
    node.shutdown().await;
    let _ = child.wait().await;
    drop(conn);
    if acked < messages || done.unique < messages {
        bail!(
            "{acked} of {messages} messages acked ({} distinct at the consumer)",
            done.unique
        );
    }
    if !idle || status.pending > 0 {
        bail!(
            "{} rows still pending in the outbox after the run",
            status.pending
        );
    }
    Ok(())
}

/// The application of `mesh bench outbox`: commits `messages` numbered
/// rows into `outbox` (its own connection to `app`), `tx_rows` per
/// transaction; returns the time it took.
fn produce(
    outbox: &Outbox,
    app: &Path,
    messages: u64,
    size: usize,
    tx_rows: u64,
) -> Result<Duration, StoreError> {
    let mut conn = store::open(app)?;
    let sql = |e| StoreError::sqlite(app, e);
    let begun = Instant::now();
    let mut payload = vec![0xa5u8; size];
    let mut seq = 0u64;
    while seq < messages {
        let tx = conn.transaction().map_err(sql)?;
        for _ in 0..tx_rows.min(messages - seq) {
            payload[..8].copy_from_slice(&seq.to_le_bytes());
            outbox.enqueue(&tx, Destination::Queue(BENCH_QUEUE), &payload)?;
            seq += 1;
        }
        tx.commit().map_err(sql)?;
    }
    Ok(begun.elapsed())
}

/// `mesh bench outbox --producer-only`: the commits alone (no relay, no
/// consumer), and plain SQLite inserts of the same rows for comparison.
fn producer_only(b: &BenchOutbox, dir: &Path) -> anyhow::Result<()> {
    let app = dir.join("app.db");
    let (outbox, conn) = Outbox::open(&app)?;
    let took = produce(&outbox, &app, b.messages, b.size, b.tx_rows)?;
    let pending = Outbox::status(&conn)?.pending;
    // The same transactions as plain inserts into a table of one blob.
    let plain = dir.join("plain.db");
    let mut conn = store::open(&plain)?;
    let sql = |e| StoreError::sqlite(&plain, e);
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
        .map_err(sql)?;
    let begun = Instant::now();
    let mut payload = vec![0xa5u8; b.size];
    let mut seq = 0u64;
    while seq < b.messages {
        let tx = conn.transaction().map_err(sql)?;
        {
            let mut insert = tx
                .prepare_cached("INSERT INTO t (payload) VALUES (?1)")
                .map_err(sql)?;
            for _ in 0..b.tx_rows.min(b.messages - seq) {
                payload[..8].copy_from_slice(&seq.to_le_bytes());
                insert.execute([&payload]).map_err(sql)?;
                seq += 1;
            }
        }
        tx.commit().map_err(sql)?;
    }
    let plain_took = begun.elapsed();
    let rate = b.messages as f64 / took.as_secs_f64();
    let plain_rate = b.messages as f64 / plain_took.as_secs_f64();
    if !b.json {
        println!(
            "committed {} x {} B to the outbox in transactions of {} in {:.3}s: {rate:.0} rows/s (plain SQLite inserts: {plain_rate:.0} rows/s)",
            b.messages,
            b.size,
            b.tx_rows,
            took.as_secs_f64()
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "outbox", "producer_only": true, "size": b.size, "messages": b.messages,
            "tx_rows": b.tx_rows, "pending": pending,
            "commit_per_sec": rate.round(), "plain_insert_per_sec": plain_rate.round(),
        })
    );
    Ok(())
}

/// The bench consumer's `DONE unique elapsed_us duplicates skipped` line.
#[derive(Debug)]
struct BenchDone {
    unique: u64,
    duplicates: u64,
    skipped: u64,
}

async fn read_until_bench<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
    deadline: Instant,
) -> anyhow::Result<BenchDone> {
    let left = deadline.saturating_duration_since(Instant::now());
    let done = super::read_until(lines, "DONE ", left).await?;
    let n: Vec<u64> = done
        .split_whitespace()
        .map(|n| n.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| n.get(i).copied().unwrap_or(0);
    Ok(BenchDone {
        unique: at(0),
        duplicates: at(2),
        skipped: at(3),
    })
}

/// The child side of `mesh bench outbox`: consumes the queue, acking every
/// message; with `inbox`, each batch of deliveries is first processed
/// through an [`Inbox`] in that SQLite file and committed. Counts each
/// message number once; repeats are counted apart.
pub(super) async fn bench_peer(
    node: Node,
    messages: u64,
    prefetch: u32,
    inbox: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut db = match &inbox {
        Some(path) => {
            let conn = store::open(path)?;
            let inbox = Inbox::install(&conn)?;
            Some((conn, inbox, path.clone()))
        }
        None => None,
    };
    let mut c = node
        .queue(BENCH_QUEUE)?
        .consume(mesh::queue::ConsumeOptions::default().prefetch(prefetch));
    crate::peers::print_addr(&node).await?;
    let mut seen = vec![0u64; (messages as usize).div_ceil(64)];
    let (mut unique, mut duplicates, mut skipped, mut strange) = (0u64, 0u64, 0u64, 0u64);
    let mut first = None;
    let idle = Duration::from_secs(30);
    let mut batch = Vec::with_capacity(prefetch as usize);
    while unique < messages {
        match tokio::time::timeout(idle, c.next()).await {
            Ok(Some(d)) => batch.push(d),
            Ok(None) | Err(_) => break,
        }
        first.get_or_insert_with(Instant::now);
        // What is already here, without arming a timer per message.
        while batch.len() < prefetch.max(1) as usize {
            match c.next().now_or_never() {
                Some(Some(d)) => batch.push(d),
                _ => break,
            }
        }
        if let Some((conn, inbox, path)) = &mut db {
            let sql = |e| StoreError::sqlite(path, e);
            let tx = conn.transaction().map_err(sql)?;
            for d in &batch {
                let done = inbox
                    .process(&tx, d, |_| Ok::<_, rusqlite::Error>(()))
                    .map_err(|e| anyhow::anyhow!("inbox: {e}"))?;
                skipped += u64::from(done.is_none());
            }
            tx.commit().map_err(sql)?;
        }
        for d in batch.drain(..) {
            let n = d
                .payload()
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map_or(u64::MAX, u64::from_le_bytes);
            match seen.get_mut((n / 64) as usize) {
                Some(word) if n < messages => {
                    let bit = 1u64 << (n % 64);
                    if *word & bit == 0 {
                        *word |= bit;
                        unique += 1;
                    } else {
                        duplicates += 1;
                    }
                }
                _ => strange += 1,
            }
            d.ack();
        }
    }
    let elapsed = first.map(|t| t.elapsed().as_micros()).unwrap_or(0);
    if strange > 0 {
        eprintln!("bench peer: {strange} messages with no valid number");
    }
    println!("DONE {unique} {elapsed} {duplicates} {skipped}");
    drop(c);
    node.shutdown().await;
    Ok(())
}

/// The demo's shop (`mesh demo-shop`): each transaction inserts orders
/// into the shop's own table and their messages into the outbox of the
/// same database; a relay sends them to `queue`. Restarted, it goes on
/// after the last order it committed, and its relay first sends what the
/// last run left pending. Prints `RESUMING N`, `COMMITTED N` after each
/// commit, and `RELAYED N` once all is confirmed.
pub(super) async fn demo_shop(
    db: PathBuf,
    orders: u64,
    per_tx: u64,
    pause: Duration,
    queue: String,
    net: NetArgs,
) -> anyhow::Result<()> {
    let mut conn = store::open(&db)?;
    let sql = |e| StoreError::sqlite(&db, e);
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, item TEXT NOT NULL)",
    )
    .map_err(sql)?;
    let outbox = Outbox::install(&conn)?;
    let node = net.join().await?;
    let relay = outbox.relay(&node, RelayOptions::default())?;
    let last: i64 = conn
        .query_row("SELECT coalesce(max(id), 0) FROM orders", [], |r| r.get(0))
        .map_err(sql)?;
    let mut next = last as u64 + 1;
    let mut out = std::io::stdout();
    writeln!(out, "RESUMING {next}")?;
    while next <= orders {
        let end = (next + per_tx.max(1) - 1).min(orders);
        let tx = conn.transaction().map_err(sql)?;
        for id in next..=end {
            tx.execute(
                "INSERT INTO orders (id, item) VALUES (?1, ?2)",
                rusqlite::params![id as i64, format!("book #{id}")],
            )
            .map_err(sql)?;
            outbox.enqueue(&tx, Destination::Queue(&queue), format!("order {id}"))?;
        }
        tx.commit().map_err(sql)?;
        writeln!(out, "COMMITTED {end}")?;
        out.flush()?;
        next = end + 1;
        tokio::time::sleep(pause).await;
    }
    let done = relay.wait_idle(Duration::from_secs(20)).await;
    let stats = relay.stats();
    relay.stop();
    node.shutdown().await;
    if !done {
        bail!(
            "the shop's relay did not finish: {}",
            stats.last_error.unwrap_or_default()
        );
    }
    writeln!(out, "RELAYED {}", stats.sent)?;
    Ok(())
}

/// The demo's warehouse (`mesh demo-warehouse`): processes each order of
/// `queue` through an inbox (a shipment row, and the message id, in one
/// transaction per batch of deliveries), acking after the commit; prints
/// `DONE processed skipped` once `orders` are processed.
pub(super) async fn demo_warehouse(
    db: PathBuf,
    orders: u64,
    queue: String,
    net: NetArgs,
) -> anyhow::Result<()> {
    let mut conn = store::open(&db)?;
    let sql = |e| StoreError::sqlite(&db, e);
    conn.execute_batch("CREATE TABLE IF NOT EXISTS shipments (order_id INTEGER NOT NULL)")
        .map_err(sql)?;
    let inbox = Inbox::install(&conn)?;
    let node = net.join().await?;
    let mut deliveries = node
        .queue(&queue)?
        .consume(mesh::queue::ConsumeOptions::default().prefetch(512));
    let (mut processed, mut skipped) = (0u64, 0u64);
    while processed < orders {
        let Some(first) = deliveries.next().await else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < 512 {
            match deliveries.next().now_or_never() {
                Some(Some(d)) => batch.push(d),
                _ => break,
            }
        }
        let tx = conn.transaction().map_err(sql)?;
        for d in &batch {
            let id: i64 = std::str::from_utf8(d.payload())
                .ok()
                .and_then(|p| p.strip_prefix("order "))
                .and_then(|n| n.parse().ok())
                .context("an order message the shop did not write")?;
            let done = inbox
                .process(&tx, d, |tx| {
                    tx.execute("INSERT INTO shipments (order_id) VALUES (?1)", [id])
                        .map(|_| ())
                })
                .map_err(|e| anyhow::anyhow!("{}: {e}", db.display()))?;
            match done {
                Some(()) => processed += 1,
                None => skipped += 1,
            }
        }
        tx.commit().map_err(sql)?;
        // Acked once committed: a crash before this redelivers them, and
        // the inbox skips them.
        for d in batch {
            d.ack();
        }
    }
    println!("DONE {processed} {skipped}");
    drop(deliveries);
    node.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_well() {
        assert_eq!(human_secs(3.21), "3.2s");
        assert_eq!(human_secs(245.0), "4m05s");
        assert_eq!(human_secs(7380.0), "2h03m");
        assert_eq!(human_secs(3.0 * 86400.0 + 4.0 * 3600.0), "3d04h");
    }

    #[test]
    fn numbering_matches_the_plain_send() {
        assert_eq!(numbered("job", 0, 1), "job");
        assert_eq!(numbered("job", 0, 3), "job 1");
        assert_eq!(numbered("job", 2, 3), "job 3");
    }
}
