//! An order service with a transactional outbox, and a consumer with an
//! inbox: every committed order is processed exactly once, whichever
//! process is killed when.
//!
//! ```text
//! cargo run --example outbox_orders
//! cargo run --example outbox_orders -- --orders 10000
//! ```
//!
//! Run without a role, this process hosts the queue `orders` on a node of
//! its own (`host_all`, as `mesh node` does) and starts itself twice, with
//! a SQLite file each in a scratch directory:
//!
//! - `outbox_orders produce`: writes each order row and its `OrderPlaced`
//!   event in one SQLite transaction (`Outbox::enqueue`), a few orders per
//!   transaction, until its `orders` table holds `--orders` rows; its
//!   relay sends the events to the queue and deletes each row once the
//!   host has accepted it. Then it waits until every row is confirmed and
//!   exits. Restarted, it carries on from the last order it committed.
//! - `outbox_orders consume`: takes each delivery of `orders` and, in one
//!   transaction, records it in the `Inbox` and inserts a row into
//!   `processed` (no unique constraint, so a duplicate would show), then
//!   commits and only then acks. A redelivery of an order it had
//!   committed (it died before the ack) is recognised by the inbox and
//!   skipped.
//!
//! Half-way through, this process kills the producer with SIGKILL and
//! starts it again. Once the consumer has processed every order it
//! reads both files, prints how many orders were committed, processed,
//! processed twice and lost, and exits 0 if none was processed twice or
//! lost; or non-zero, saying what went wrong. Both roles may be killed at
//! any instant (`tests/crash.rs` kills each of them many times). Every
//! wait has a timeout, and the children die with this process.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::ExitStatus,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context as _};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use mesh::{
    queue::ConsumeOptions,
    store::{
        rusqlite::{self, params, Connection, OpenFlags, OptionalExtension, TransactionBehavior},
        Destination, Inbox, Outbox, RelayOptions,
    },
    Multiaddr, Node,
};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

/// The queue the order events go through.
const QUEUE: &str = "orders";
/// Loopback only, port chosen by the system.
const LOOPBACK: &str = "/ip4/127.0.0.1/udp/0/quic-v1";
/// Longest wait for any one step (joining, the relay catching up, the
/// consumer finishing).
const STEP: Duration = Duration::from_secs(60);

#[derive(Parser)]
struct Args {
    /// Orders in the self-contained run.
    #[arg(long, default_value_t = 2000)]
    orders: i64,
    #[command(subcommand)]
    role: Option<Role>,
}

/// The roles this process starts itself in.
#[derive(Subcommand)]
enum Role {
    /// Write orders and their events until the database holds `--orders`,
    /// wait until the host has confirmed every event, exit.
    Produce {
        /// The producer's SQLite file (created if missing).
        #[arg(long)]
        db: PathBuf,
        /// The node to join through (it hosts the queue).
        #[arg(long)]
        bootstrap: Multiaddr,
        /// Orders the `orders` table should hold when this exits.
        #[arg(long)]
        orders: i64,
        /// Orders per transaction.
        #[arg(long, default_value_t = 5)]
        per_tx: i64,
    },
    /// Process order events through the inbox, until killed (or until
    /// `--until` orders are processed).
    Consume {
        /// The consumer's SQLite file (created if missing).
        #[arg(long)]
        db: PathBuf,
        /// The node to join through (it hosts the queue).
        #[arg(long)]
        bootstrap: Multiaddr,
        /// Exit once this many orders are processed (all runs together).
        #[arg(long)]
        until: Option<i64>,
        /// Unacked deliveries held at once.
        #[arg(long, default_value_t = 8)]
        prefetch: u32,
    },
}

/// The event written with each order, the queue message's payload.
#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    id: i64,
    item: String,
    qty: i64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    match args.role {
        None => parent(args.orders).await,
        Some(Role::Produce {
            db,
            bootstrap,
            orders,
            per_tx,
        }) => produce(&db, bootstrap, orders, per_tx).await,
        Some(Role::Consume {
            db,
            bootstrap,
            until,
            prefetch,
        }) => consume(&db, bootstrap, until, prefetch).await,
    }
}

/// A node on loopback that has joined the mesh through `bootstrap`. It
/// never hosts the queue itself (the parent does), so killing it loses
/// nothing the host accepted.
async fn join(bootstrap: Multiaddr) -> anyhow::Result<Node> {
    let node = Node::builder()
        .listen(LOOPBACK.parse()?)
        .mdns(false)
        .bootstrap(bootstrap)
        .self_host(false)
        .start()
        .await?;
    node.ready_timeout(STEP)
        .await
        .context("joining the mesh through the host")?;
    Ok(node)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

async fn produce(db: &Path, bootstrap: Multiaddr, orders: i64, per_tx: i64) -> anyhow::Result<()> {
    ensure!(per_tx >= 1, "--per-tx must be at least 1");
    // WAL and synchronous=FULL: a committed order and its event survive a
    // crash together, or neither was committed.
    let mut conn = mesh::store::open(db)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS orders (
            id INTEGER PRIMARY KEY,
            item TEXT NOT NULL,
            qty INTEGER NOT NULL
        )",
    )?;
    let outbox = Outbox::install(&conn)?;
    let node = join(bootstrap).await?;
    // Small batches, so that a kill finds rows sent and not yet confirmed.
    let relay = outbox.relay(
        &node,
        RelayOptions {
            batch: 64,
            max_in_flight: 512,
            ..RelayOptions::default()
        },
    )?;
    // A restarted producer carries on after the last order it committed.
    let first: i64 = conn.query_row("SELECT coalesce(max(id), 0) + 1 FROM orders", [], |r| {
        r.get(0)
    })?;
    let mut next = first;
    while next <= orders {
        let last = (next + per_tx - 1).min(orders);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for id in next..=last {
            let order = OrderPlaced {
                id,
                item: format!("item-{}", id % 17),
                qty: id % 5 + 1,
            };
            tx.execute(
                "INSERT INTO orders (id, item, qty) VALUES (?1, ?2, ?3)",
                params![order.id, order.item, order.qty],
            )?;
            outbox.enqueue(&tx, Destination::Queue(QUEUE), postcard::to_stdvec(&order)?)?;
        }
        tx.commit()?;
        next = last + 1;
    }
    ensure!(
        relay.wait_idle(STEP).await,
        "the relay did not send every order within {STEP:?}: {:?}",
        relay.stats()
    );
    let status = Outbox::status(&conn)?;
    ensure!(
        status.pending == 0,
        "the relay is idle but {} rows are pending",
        status.pending
    );
    let sent = relay.stats().sent;
    relay.stop();
    node.shutdown().await;
    println!(
        "producer: orders {first}..={orders} committed in this run; the relay sent {sent} events \
         in this run, {} over the file's life",
        status.sent
    );
    Ok(())
}

/// The consumer's tables: what it processed (duplicates allowed, so that
/// they show), and counters of deliveries.
const CONSUMER_SCHEMA: &str = "BEGIN IMMEDIATE;
    CREATE TABLE IF NOT EXISTS processed (order_id INTEGER NOT NULL, at INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
    INSERT OR IGNORE INTO counters (name, n) VALUES ('delivered', 0), ('skipped', 0), ('rejected', 0);
    COMMIT;";

fn bump(tx: &rusqlite::Transaction<'_>, counter: &str) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE counters SET n = n + 1 WHERE name = ?1",
        params![counter],
    )
    .map(|_| ())
}

async fn consume(
    db: &Path,
    bootstrap: Multiaddr,
    until: Option<i64>,
    prefetch: u32,
) -> anyhow::Result<()> {
    let mut conn = mesh::store::open(db)?;
    conn.execute_batch(CONSUMER_SCHEMA)?;
    let inbox = Inbox::install(&conn)?;
    let mut processed: i64 = conn.query_row("SELECT count(*) FROM processed", [], |r| r.get(0))?;
    let node = join(bootstrap).await?;
    // Attempts are not limited in effect: a consumer killed over and over
    // must not send orders to the dead-letter queue. A delivery in flight
    // to a dead consumer comes back when its link ends, or after the
    // visibility timeout at the latest.
    let mut deliveries = node.queue(QUEUE)?.consume(
        ConsumeOptions::default()
            .prefetch(prefetch)
            .max_attempts(10_000)
            .visibility_timeout(Duration::from_secs(5)),
    );
    while until.is_none_or(|n| processed < n) {
        let d = deliveries
            .next()
            .await
            .context("the consumer ended (the node shut down)")?;
        let order: OrderPlaced = match d.value() {
            Ok(o) => o,
            Err(e) => {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                bump(&tx, "rejected")?;
                tx.commit()?;
                d.reject_with(&format!("not an OrderPlaced: {e}"));
                continue;
            }
        };
        // The inbox's record, the order's processing and the counters
        // commit together; the ack comes after the commit. Killed before
        // the commit: nothing happened, and the order comes again. Killed
        // between the commit and the ack: it comes again and the inbox
        // skips it.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let done = inbox.process(&tx, &d, |tx| {
            tx.execute(
                "INSERT INTO processed (order_id, at) VALUES (?1, ?2)",
                params![order.id, now_ms()],
            )
            .map(|_| ())
        })?;
        bump(&tx, "delivered")?;
        if done.is_none() {
            bump(&tx, "skipped")?;
        }
        tx.commit()?;
        d.ack();
        if done.is_some() {
            processed += 1;
        }
    }
    drop(deliveries);
    node.shutdown().await;
    println!("consumer: {processed} orders processed");
    Ok(())
}

/// Opens `path` read-only (it may be in use by a writer: WAL lets a reader
/// in at any time), or `None` if it does not exist yet.
fn read_only(path: &Path) -> anyhow::Result<Option<Connection>> {
    if !path.exists() {
        return Ok(None);
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(Some(conn))
}

/// `SELECT` one number from `path`; 0 if the file or table is not there yet.
fn count(path: &Path, sql: &str) -> anyhow::Result<i64> {
    let Some(conn) = read_only(path)? else {
        return Ok(0);
    };
    match conn.query_row(sql, [], |r| r.get(0)).optional() {
        Ok(n) => Ok(n.unwrap_or(0)),
        Err(rusqlite::Error::SqliteFailure(_, Some(m))) if m.starts_with("no such table") => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// A child process, killed if dropped.
fn spawn(exe: &Path, args: &[&str]) -> anyhow::Result<Child> {
    Command::new(exe)
        .args(args)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", args[0]))
}

/// Waits for `child` to exit; an error if it takes longer than [`STEP`].
async fn exit_of(child: &mut Child, name: &str) -> anyhow::Result<ExitStatus> {
    tokio::time::timeout(STEP, child.wait())
        .await
        .with_context(|| format!("{name} did not finish within {STEP:?}"))?
        .with_context(|| format!("waiting for {name}"))
}

async fn parent(orders: i64) -> anyhow::Result<()> {
    ensure!(orders >= 2, "--orders must be at least 2");
    let started = Instant::now();
    let dir = tempfile::tempdir().context("a scratch directory")?;
    let (pdb, cdb) = (
        dir.path().join("producer.db"),
        dir.path().join("consumer.db"),
    );
    println!(
        "outbox_orders: this process hosts queue {QUEUE:?}; a producer process and a consumer \
         process join it on 127.0.0.1, with their SQLite files in {}\n",
        dir.path().display()
    );
    let host = Node::builder()
        .listen(LOOPBACK.parse()?)
        .mdns(false)
        .host_all()
        .start()
        .await?;
    let deadline = Instant::now() + STEP;
    let addr = loop {
        if let Some(a) = host.listen_addrs().await.into_iter().next() {
            break a.to_string();
        }
        ensure!(Instant::now() < deadline, "the host has no listen address");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("  host {} at {addr}", host.peer_id());

    let exe = std::env::current_exe().context("cannot find this executable")?;
    let (pdb_s, cdb_s) = (pdb.display().to_string(), cdb.display().to_string());
    let n = orders.to_string();
    let mut consumer = spawn(
        &exe,
        &[
            "consume",
            "--db",
            &cdb_s,
            "--bootstrap",
            &addr,
            "--until",
            &n,
        ],
    )?;
    let producer_args = [
        "produce",
        "--db",
        &pdb_s,
        "--bootstrap",
        &addr,
        "--orders",
        &n,
    ];
    let mut producer = spawn(&exe, &producer_args)?;

    // 1. Half-way, the producer dies (SIGKILL: no cleanup of any kind).
    let half = orders / 2;
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(status) = producer.try_wait()? {
            bail!("the producer exited ({status}) before it was killed; see its output above");
        }
        if count(&pdb, "SELECT count(*) FROM orders")? >= half {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the producer did not commit {half} orders within {STEP:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    producer.start_kill()?;
    let status = exit_of(&mut producer, "the killed producer").await?;
    let committed = count(&pdb, "SELECT count(*) FROM orders")?;
    let pending = match read_only(&pdb)? {
        Some(conn) => Outbox::status(&conn)?.pending,
        None => 0,
    };
    println!(
        "  producer killed ({status}) with {committed} orders committed, {pending} of their events \
         not yet confirmed by the host"
    );

    // 2. Restarted, it carries on from its last committed order, and its
    // relay sends what was not confirmed (the host drops what it already
    // had, by the events' dedup keys).
    let mut producer = spawn(&exe, &producer_args)?;
    let status = exit_of(&mut producer, "the restarted producer").await?;
    ensure!(status.success(), "the restarted producer failed: {status}");

    // 3. The consumer exits once it has processed every order; lost ones
    // would keep it waiting, so a timeout is reported with the counts.
    let consumer_exit = exit_of(&mut consumer, "the consumer").await;
    if consumer_exit.is_err() {
        let _ = consumer.start_kill();
        let _ = consumer.wait().await;
    }

    // 4. What the two files say.
    let committed: Vec<i64> = {
        let conn = read_only(&pdb)?.context("the producer's file is missing")?;
        let mut stmt = conn.prepare("SELECT id FROM orders ORDER BY id")?;
        let ids = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        ids
    };
    let mut processed: BTreeMap<i64, u64> = BTreeMap::new();
    let (delivered, skipped) = {
        let conn = read_only(&cdb)?.context("the consumer's file is missing")?;
        let mut stmt = conn.prepare("SELECT order_id FROM processed")?;
        for id in stmt.query_map([], |r| r.get::<_, i64>(0))? {
            *processed.entry(id?).or_default() += 1;
        }
        let counter = |name: &str| -> rusqlite::Result<i64> {
            conn.query_row("SELECT n FROM counters WHERE name = ?1", [name], |r| {
                r.get(0)
            })
        };
        (counter("delivered")?, counter("skipped")?)
    };
    host.shutdown().await;
    let duplicates: u64 = processed.values().map(|n| n - 1).sum();
    let lost: Vec<i64> = committed
        .iter()
        .filter(|id| !processed.contains_key(id))
        .copied()
        .collect();
    let unknown = processed
        .keys()
        .filter(|id| committed.binary_search(id).is_err())
        .count();
    println!("\nsummary:");
    println!(
        "  committed {} orders (producer.db), processed {} distinct (consumer.db)",
        committed.len(),
        processed.len()
    );
    println!(
        "  deliveries {delivered}, of which {skipped} repeats skipped by the inbox \
         (committed before a crash, not acked)"
    );
    println!(
        "  duplicates processed {duplicates}, lost {}, processed but never committed {unknown}",
        lost.len()
    );
    if !lost.is_empty() {
        let some: Vec<String> = lost.iter().take(20).map(i64::to_string).collect();
        println!("  lost orders (first 20): {}", some.join(", "));
    }
    let status = consumer_exit?;
    ensure!(status.success(), "the consumer failed: {status}");
    ensure!(
        duplicates == 0 && lost.is_empty() && unknown == 0,
        "orders were processed twice, lost or invented (see the summary)"
    );
    ensure!(
        committed.len() as i64 == orders,
        "the producer committed {} orders, not {orders}",
        committed.len()
    );
    println!(
        "ok: {} orders committed with their events in one transaction; the producer was killed \
         once and restarted; each order processed exactly once; took {:.1}s",
        committed.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
