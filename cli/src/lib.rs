//! The `mesh` command line: run a node, publish, subscribe, list peers,
//! queues, request/reply and streams, run the demo and the benchmarks.
//!
//! A crate of its own, so the library carries no argument parsing or
//! benchmark code; a library so that both the `mesh` binary and the
//! workspace root's binary (`cargo run -- ...`) share it.

#![allow(missing_docs)]

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use clap::{Args, Parser, Subcommand};
use tokio::io::{AsyncBufReadExt, BufReader};

use mesh::{Message, Multiaddr, Node};

#[derive(Debug, Parser)]
#[command(
    name = "mesh",
    version,
    about = "A brokerless peer-to-peer messaging mesh"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a long-lived node until interrupted; it hosts every queue and
    /// stream.
    Node {
        #[command(flatten)]
        net: NetArgs,
        /// Keep the node identity in this directory, and relay the durable
        /// sends left pending in DIR/outbox.db.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Serve metrics over HTTP here (`/metrics` for Prometheus,
        /// `/metrics.json` for `mesh stats`), e.g. 127.0.0.1:9464; port 0
        /// picks one (printed as `metrics: ADDR`).
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Show a running node's metrics (a `mesh node --metrics-addr ADDR`):
    /// counters, drops by reason, peers, links, queues, lag.
    Stats {
        /// The node's metrics address (its `--metrics-addr`).
        #[arg(long)]
        metrics_addr: String,
        /// Print the JSON the node serves instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Subscribe to a pattern and print each message as a JSON line.
    Sub {
        /// Pattern: dot-separated segments, `*` for one segment, `>` for the rest.
        pattern: String,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Subscribe reliably: messages missed during a partition are fetched
        /// from the publishers' windows; a gap beyond them is printed as
        /// `{"lagged": N, "publisher": ID}`.
        #[arg(long)]
        reliable: bool,
        /// Messages buffered for the subscription (default: the node's,
        /// 65,536).
        #[arg(long)]
        buffer: Option<usize>,
        /// What a full buffer does: `backpressure` (hold publishers back,
        /// up to the slow-consumer timeout), `drop-oldest`, or `disconnect`
        /// (end the subscription). Dropped messages are printed as
        /// `{"lagged": N, "publisher": ID}`.
        #[arg(long, default_value = "backpressure")]
        overflow: mesh::Overflow,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Publish a message (or several) and exit once peers have it.
    Pub {
        /// Topic: dot-separated segments.
        topic: String,
        /// The payload.
        message: String,
        /// Publish this many copies (numbered if more than one).
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Pad or cut the payload to this many bytes.
        #[arg(long)]
        size: Option<usize>,
        /// Wait this many milliseconds between messages.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        #[command(flatten)]
        net: NetArgs,
    },
    /// List the peers of the mesh.
    Peers {
        #[command(flatten)]
        net: NetArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Work queues: send to one, consume from one.
    Queue {
        #[command(subcommand)]
        which: QueueCmd,
    },
    /// Dead-letter queues: list or replay a queue's dead letters.
    Dlq {
        #[command(subcommand)]
        which: DlqCmd,
    },
    /// Streams: append records, read them (from any offset, or as a
    /// consumer group), show partitions and offsets.
    Stream {
        #[command(subcommand)]
        which: StreamCmd,
    },
    /// The durable outbox of `mesh queue send --durable`: what is pending.
    Outbox {
        #[command(subcommand)]
        which: OutboxCmd,
    },
    /// Send a request and print the answer.
    Request {
        /// Subject: dot-separated segments.
        subject: String,
        /// The payload.
        message: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 5.0)]
        wait: f64,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Answer requests on a pattern with their payload, prefixed.
    Serve {
        /// Pattern of the subjects served.
        pattern: String,
        /// Put this before each answer.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Exit after this many requests.
        #[arg(long)]
        count: Option<u64>,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Start a few local peers, exchange messages, print a summary.
    Demo,
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
    },
    /// (internal) the remote side of a benchmark.
    #[command(hide = true)]
    BenchPeer {
        #[arg(long)]
        mode: String,
        #[arg(long)]
        messages: u64,
        /// Join through this node, with gossip mode for `bench.>`.
        #[arg(long)]
        gossip_via: Option<Multiaddr>,
        #[arg(long, default_value = "quic")]
        transport: String,
        #[arg(long, default_value = "adaptive")]
        wait: String,
        /// `consume` mode: the consumer's prefetch.
        #[arg(long, default_value_t = 1024)]
        prefetch: u32,
        /// `stream` mode: the consumer's window (records in flight per
        /// partition).
        #[arg(long, default_value_t = 1024)]
        window: u32,
        /// `stream` mode: read as a member of a consumer group,
        /// committing every record.
        #[arg(long)]
        group: bool,
        /// `outbox` mode: process each delivery through an inbox in this
        /// SQLite file.
        #[arg(long)]
        inbox: Option<PathBuf>,
    },
    /// (internal) the warehouse of the demo's outbox scene: consumes
    /// QUEUE through an inbox in its own database.
    #[command(hide = true)]
    DemoWarehouse {
        /// The warehouse's database (shipments and inbox).
        #[arg(long)]
        db: PathBuf,
        /// Exit once this many orders are processed.
        #[arg(long)]
        orders: u64,
        /// The queue of the orders.
        #[arg(long)]
        queue: String,
        #[command(flatten)]
        net: NetArgs,
    },
    /// (internal) the shop of the demo's outbox scene: orders and their
    /// messages committed together, relayed to QUEUE.
    #[command(hide = true)]
    DemoShop {
        /// The shop's database (orders and outbox).
        #[arg(long)]
        db: PathBuf,
        /// Orders in all (a restarted shop goes on after its last one).
        #[arg(long)]
        orders: u64,
        /// Orders per transaction.
        #[arg(long, default_value_t = 100)]
        per_tx: u64,
        /// Milliseconds between transactions.
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        /// The queue the order messages go to.
        #[arg(long)]
        queue: String,
        #[command(flatten)]
        net: NetArgs,
    },
    /// (internal) a process of `bench soak`.
    #[command(hide = true)]
    SoakWorker {
        #[arg(long)]
        role: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        listen: Multiaddr,
        #[arg(long)]
        bootstrap: Vec<Multiaddr>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        start: u64,
        #[arg(long, default_value_t = 100)]
        rate: u32,
        #[arg(long, default_value_t = 4096)]
        reliable_window: usize,
    },
    /// (internal) the remote side of `bench ring`.
    #[command(hide = true)]
    BenchRingPeer {
        /// The ring to read.
        #[arg(long)]
        ring: PathBuf,
        /// For pingpong: the ring to answer on.
        #[arg(long)]
        reply: Option<PathBuf>,
        #[arg(long)]
        nonce: u64,
        #[arg(long)]
        messages: u64,
        #[arg(long, default_value = "spin")]
        wait: String,
    },
}

#[derive(Debug, Subcommand)]
enum QueueCmd {
    /// Send a message (or several); exits once the queue's host has them.
    Send {
        /// The queue.
        queue: String,
        /// The payload.
        message: String,
        /// Send this many (numbered if more than one).
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Commit the messages to DIR/outbox.db first (one transaction, on
        /// disk), then relay them; what cannot be sent now stays there for
        /// the next `mesh node --data-dir DIR` or durable send (exit 75).
        #[arg(long)]
        durable: bool,
        /// With --durable: the data dir (default $MESH_DATA_DIR, else
        /// $XDG_DATA_HOME/mesh, else ~/.local/share/mesh).
        #[arg(long, requires = "durable")]
        data_dir: Option<PathBuf>,
        /// With --durable: seconds to wait for the queue's host to confirm
        /// every pending message.
        #[arg(long, default_value_t = 10.0, requires = "durable")]
        wait: f64,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Consume: print a JSON line per delivery (id, attempt, payload) and
    /// ack it.
    Consume {
        /// The queue.
        queue: String,
        /// Most unacked messages at once.
        #[arg(long, default_value_t = 64)]
        prefetch: u32,
        /// Nack every K-th delivery instead (to show redelivery and dead
        /// letters).
        #[arg(long)]
        fail_every: Option<u64>,
        /// Deliveries before a message goes to the dead-letter queue.
        #[arg(long, default_value_t = 5)]
        max_attempts: u32,
        /// Seconds a delivery stays invisible to other consumers.
        #[arg(long, default_value_t = 30.0)]
        visibility_timeout: f64,
        /// Exit after this many deliveries.
        #[arg(long)]
        count: Option<u64>,
        #[command(flatten)]
        net: NetArgs,
    },
}

#[derive(Debug, Subcommand)]
enum StreamCmd {
    /// Append a record (or several); exits once the stream's host stored
    /// them, printing a JSON line per record with where it went.
    Append {
        /// The stream.
        stream: String,
        /// The payload.
        message: String,
        /// Records with one key go to one partition (default: no key).
        #[arg(long)]
        key: Option<String>,
        /// Append this many, as MESSAGE-0 .. MESSAGE-(N-1).
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Read records from every partition of every live host, printing a
    /// JSON line per record (partition, offset, key, timestamp, payload).
    Read {
        /// The stream.
        stream: String,
        /// Where to start in each partition: `earliest`, `latest` or an
        /// offset. With --group, where partitions the group never
        /// committed start (`earliest` or `latest`).
        #[arg(long, default_value = "earliest")]
        from: String,
        /// Read as a member of this consumer group: only the partitions it
        /// is given, from the group's committed offsets, committing each
        /// record once printed.
        #[arg(long)]
        group: Option<String>,
        /// Exit after this many records.
        #[arg(long)]
        count: Option<u64>,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Show the stream's partitions on its live hosts (offsets, records,
    /// bytes) and each group's committed offsets and lag.
    Info {
        /// The stream.
        stream: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        net: NetArgs,
    },
}

#[derive(Debug, Subcommand)]
enum OutboxCmd {
    /// Pending and sent counts, the age of the oldest pending message and
    /// the pending messages per destination.
    Status {
        /// The data dir whose outbox.db to read (default $MESH_DATA_DIR,
        /// else $XDG_DATA_HOME/mesh, else ~/.local/share/mesh).
        #[arg(long, conflicts_with = "db")]
        data_dir: Option<PathBuf>,
        /// An outbox database file (an application's own database, say).
        #[arg(long)]
        db: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCmd {
    /// Print a JSON line per dead letter of QUEUE (in QUEUE.dlq).
    List {
        /// The queue (not its .dlq).
        queue: String,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Move QUEUE's dead letters back into QUEUE.
    Replay {
        /// The queue (not its .dlq).
        queue: String,
        #[command(flatten)]
        net: NetArgs,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Pub/sub between two processes on loopback.
    Pubsub {
        /// `quic`, or `shm` (shared-memory rings between the two nodes).
        #[arg(long, default_value = "quic")]
        transport: String,
        /// With `shm`: how the link tasks wait, `adaptive` (spin, yield,
        /// then sleep) or `spin` (never sleep).
        #[arg(long, default_value = "adaptive")]
        wait: String,
        /// Payload size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Messages to send.
        #[arg(long, default_value_t = 2_000_000)]
        messages: u64,
        /// `throughput` or `pingpong`.
        #[arg(long, default_value = "throughput")]
        pattern: String,
        /// `direct` (one copy per subscriber node) or `gossip` (epidemic
        /// broadcast; with `--nodes`).
        #[arg(long, default_value = "direct")]
        mode: String,
        /// Nodes in gossip mode (this one publishes, the others subscribe).
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// Print only the JSON result line.
        #[arg(long)]
        json: bool,
    },
    /// Work queue between two processes: messages sent (and hosted) here,
    /// consumed and acked in the other; counts acks back at the host.
    Queue {
        /// `quic`, or `shm` (shared-memory rings between the two nodes).
        #[arg(long, default_value = "quic")]
        transport: String,
        /// With `shm`: `adaptive` or `spin`.
        #[arg(long, default_value = "adaptive")]
        wait: String,
        /// Payload size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Messages to send.
        #[arg(long, default_value_t = 1_000_000)]
        messages: u64,
        /// The consumer's prefetch (unacked messages in flight).
        #[arg(long, default_value_t = 1024)]
        prefetch: u32,
        /// Print only the JSON result line.
        #[arg(long)]
        json: bool,
    },
    /// Stream between two processes: records appended here (and hosted
    /// here, or with `--host consumer` there), consumed from the earliest
    /// offset in the other; the rate counts records consumed there.
    Stream {
        /// `quic`, or `shm` (shared-memory rings between the two nodes).
        #[arg(long, default_value = "quic")]
        transport: String,
        /// With `shm`: `adaptive` or `spin`.
        #[arg(long, default_value = "adaptive")]
        wait: String,
        /// Payload size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Records to append.
        #[arg(long, default_value_t = 1_000_000)]
        messages: u64,
        /// The consumer's window (records in flight per partition).
        #[arg(long, default_value_t = 1024)]
        window: u32,
        /// Where the records are stored: `appender` (it hosts its own
        /// partitions; records cross the link to the consumer) or
        /// `consumer` (appends cross the link; reads are local).
        #[arg(long, default_value = "appender")]
        host: String,
        /// The consumer reads as a consumer group's member and commits
        /// every record.
        #[arg(long)]
        group: bool,
        /// Print only the JSON result line.
        #[arg(long)]
        json: bool,
    },
    /// Durable messages: an application thread commits them to a SQLite
    /// outbox (transactions of --tx-rows, synchronous=FULL) while its
    /// relay sends them to a queue; a consumer process acks each (with
    /// --inbox: through an inbox in its own SQLite file). The rate counts
    /// acks, from the first commit to the last ack.
    Outbox {
        /// `quic`, or `shm` (shared-memory rings between the two nodes).
        #[arg(long, default_value = "quic")]
        transport: String,
        /// With `shm`: `adaptive` or `spin`.
        #[arg(long, default_value = "adaptive")]
        wait: String,
        /// Payload size in bytes (at least 8: messages are numbered).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Messages to commit.
        #[arg(long, default_value_t = 1_000_000)]
        messages: u64,
        /// Rows per producer transaction.
        #[arg(long, default_value_t = 1000)]
        tx_rows: u64,
        /// The consumer processes each delivery through an inbox in its
        /// own SQLite file, one commit per batch of deliveries, before
        /// acking.
        #[arg(long)]
        inbox: bool,
        /// Which process hosts the queue: `producer` (the relay's sends
        /// are accepted locally; deliveries and acks cross the link) or
        /// `consumer` (each relayed batch crosses the link and waits for
        /// the host).
        #[arg(long, default_value = "producer")]
        host: String,
        /// The consumer's prefetch.
        #[arg(long, default_value_t = 1024)]
        prefetch: u32,
        /// Directory for the database files (a fresh directory in it,
        /// removed afterwards; default the system's temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Only the application's commits (no relay, no consumer), next to
        /// plain SQLite inserts of the same rows.
        #[arg(long)]
        producer_only: bool,
        /// The relay's rows per read and per send (the default is
        /// `RelayOptions`'s).
        #[arg(long, default_value_t = 4096)]
        relay_batch: usize,
        /// The relay's most rows sent and not yet confirmed.
        #[arg(long, default_value_t = 65_536)]
        relay_in_flight: usize,
        /// Print only the JSON result line.
        #[arg(long)]
        json: bool,
    },
    /// Request/reply round-trip latency to a responder process.
    Request {
        /// `quic`, or `shm`.
        #[arg(long, default_value = "quic")]
        transport: String,
        /// With `shm`: `adaptive` or `spin`.
        #[arg(long, default_value = "adaptive")]
        wait: String,
        /// Payload size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Requests to time.
        #[arg(long, default_value_t = 10_000)]
        messages: u64,
        /// Print only the JSON result line.
        #[arg(long)]
        json: bool,
    },
    /// The raw shared-memory ring between two processes (no node).
    Ring {
        /// Record size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Records to send.
        #[arg(long, default_value_t = 50_000_000)]
        messages: u64,
        /// Ring size in bytes (a power of two).
        #[arg(long, default_value_t = 1 << 20)]
        capacity: usize,
        /// `throughput` or `pingpong` (one-way latency over two rings).
        #[arg(long, default_value = "throughput")]
        pattern: String,
        /// `spin` (busy-spin, lowest latency) or `adaptive`.
        #[arg(long, default_value = "spin")]
        wait: String,
        /// Print only the JSON result line.
        #[arg(long)]
        json: bool,
    },
    /// Soak: a relay, a durable queue host, queue producers and acking
    /// consumers, a reliable publisher and subscribers as processes, at a
    /// steady rate, while some are SIGKILLed (or SIGSTOPped) and restarted
    /// on a seeded schedule; then checks that nothing confirmed was lost
    /// and that the long-lived processes' memory and fds did not grow.
    Soak {
        /// How long the traffic runs (e.g. 10m, 30s).
        #[arg(long, default_value = "10m")]
        duration: String,
        /// Messages per second per pattern (queue: the producers together;
        /// pub/sub: the publisher).
        #[arg(long, default_value_t = 500)]
        rate: u32,
        /// Memory is compared from the end of the warm-up on.
        #[arg(long, default_value = "60s")]
        warmup: String,
        /// A kill or pause about this often (jittered by 25%).
        #[arg(long, default_value = "15s")]
        kill_every: String,
        /// Most growth of a long-lived process's resident memory after the
        /// warm-up, in percent (judged on runs of 3 minutes or more after
        /// the warm-up).
        #[arg(long, default_value_t = 10.0)]
        max_rss_growth: f64,
        /// Seed of the kill schedule (default: from the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
        /// The publisher's reliable window in messages (small, so that
        /// pauses of a subscriber go beyond it and show `Lagged`).
        #[arg(long, default_value_t = 1024, hide = true)]
        reliable_window: usize,
        /// Print only the JSON result line.
        #[arg(long)]
        json: bool,
    },
    /// Gossip-mode broadcast at scale, simulated in virtual time (HyParView
    /// and Plumtree cores; a partition into halves, then a heal).
    GossipSim {
        /// Number of nodes.
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        /// Messages per phase (steady, partitioned, healed).
        #[arg(long, default_value_t = 200)]
        messages: usize,
        /// Milliseconds between broadcasts.
        #[arg(long, default_value_t = 5)]
        interval_ms: u64,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print only the JSON result line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args, Clone)]
struct NetArgs {
    /// Address to listen on.
    #[arg(long, default_value = "/ip4/0.0.0.0/udp/0/quic-v1")]
    listen: Multiaddr,
    /// Peer to join through (repeatable), e.g. /ip4/127.0.0.1/udp/4001/quic-v1/p2p/12D3...
    #[arg(long)]
    bootstrap: Vec<Multiaddr>,
    /// Do not use mDNS discovery.
    #[arg(long, conflicts_with = "mdns")]
    no_mdns: bool,
    /// Use mDNS discovery also in a private mesh (off there by default:
    /// it announces this node's id and addresses on the LAN).
    #[arg(long)]
    mdns: bool,
    /// Keep data links to peers on this host on QUIC instead of moving
    /// them to shared-memory rings.
    #[arg(long)]
    no_shm: bool,
    /// How long to look for a peer before giving up (seconds).
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
    /// Private mesh: a file holding the mesh secret(s), one per line, mode
    /// 0600 (also `MESH_SECRET_FILE`; or the secret itself in
    /// `MESH_SECRET`). Only peers holding it are admitted. Never give the
    /// secret itself on the command line.
    #[arg(long, env = mesh::security::SECRET_FILE_ENV)]
    secret_file: Option<std::path::PathBuf>,
    /// Private mesh: admit only this peer id (repeatable; with a secret,
    /// a peer needs both).
    #[arg(long = "allow-peer", value_name = "PEER_ID")]
    allow_peers: Vec<mesh::PeerId>,
    /// Access control: a policy file of `role NAME PEER...` and `allow
    /// WHO publish|read|consume|serve|host PATTERN...` lines (see mesh::security::AccessPolicy).
    #[arg(long, value_name = "FILE")]
    access_policy: Option<std::path::PathBuf>,
    /// Read at most this many bytes per second from each peer (a peer over
    /// it is slowed by flow control, nothing is dropped).
    #[arg(long, value_name = "BYTES")]
    peer_bytes_per_sec: Option<u64>,
    /// Read at most this many frames per second from each peer.
    #[arg(long, value_name = "FRAMES")]
    peer_frames_per_sec: Option<u64>,
}

impl NetArgs {
    fn builder(&self) -> anyhow::Result<mesh::Builder> {
        let mut b = Node::builder()
            .listen(self.listen.clone())
            .shm(!self.no_shm);
        if self.no_mdns || self.mdns {
            b = b.mdns(self.mdns);
        }
        for addr in &self.bootstrap {
            b = b.bootstrap(addr.clone());
        }
        if let Some(path) = &self.secret_file {
            b = b.mesh_secret(mesh::security::MeshSecret::from_file(path)?);
        } else if std::env::var_os(mesh::security::SECRET_ENV).is_some() {
            b = b.mesh_secret(mesh::security::MeshSecret::from_env(
                mesh::security::SECRET_ENV,
            )?);
        }
        if !self.allow_peers.is_empty() {
            b = b.allow_peers(self.allow_peers.iter().copied());
        }
        if let Some(path) = &self.access_policy {
            b = b.access_policy(mesh::security::AccessPolicy::from_file(path)?);
        }
        if self.peer_bytes_per_sec.is_some() || self.peer_frames_per_sec.is_some() {
            let mut limit =
                mesh::InboundLimit::bytes_per_sec(self.peer_bytes_per_sec.unwrap_or(u64::MAX));
            if let Some(frames) = self.peer_frames_per_sec {
                limit = limit.frames_per_sec(frames);
            }
            b = b.peer_inbound_limit(limit);
        }
        Ok(b.join_timeout(self.timeout()))
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout.max(0.0))
    }

    /// Starts a short-lived node and waits until it has joined the mesh.
    /// It never hosts a queue or a stream: it can exit at once without
    /// losing what it sent or appended.
    async fn join(&self) -> anyhow::Result<Node> {
        let node = self.builder()?.self_host(false).start().await?;
        if node.joined(self.timeout()).await.is_err() {
            node.shutdown().await;
            bail!(
                "no mesh peer found within {:.1}s (give one with --bootstrap ADDR, or run `mesh node` on this LAN)",
                self.timeout
            );
        }
        Ok(node)
    }
}

/// Runs the CLI with the process arguments.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,libp2p_kad=error")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs piped to a file stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    match rt.block_on(run(cli)) {
        // Not a refusal: the messages are safe and will go later.
        Err(e) if e.is::<outbox::StillPending>() => {
            drop(rt);
            eprintln!("Error: {e}");
            std::process::exit(outbox::PENDING_EXIT)
        }
        r => r,
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Node {
            net,
            data_dir,
            metrics_addr,
        } => run_node(net, data_dir, metrics_addr).await,
        Cmd::Stats { metrics_addr, json } => stats::run(&metrics_addr, json).await,
        Cmd::Sub {
            pattern,
            count,
            reliable,
            buffer,
            overflow,
            net,
        } => {
            let mut options = mesh::SubscribeOptions::new().overflow(overflow);
            if let Some(n) = buffer {
                options = options.buffer(n);
            }
            run_sub(pattern, count, reliable, options, net).await
        }
        Cmd::Pub {
            topic,
            message,
            count,
            size,
            interval_ms,
            net,
        } => run_pub(topic, message, count, size, interval_ms, net).await,
        Cmd::Peers { net, json } => run_peers(net, json).await,
        Cmd::Queue {
            which:
                QueueCmd::Send {
                    queue,
                    message,
                    count,
                    durable: false,
                    net,
                    ..
                },
        } => work::send(queue, message, count, net).await,
        Cmd::Queue {
            which:
                QueueCmd::Send {
                    queue,
                    message,
                    count,
                    durable: true,
                    data_dir,
                    wait,
                    net,
                },
        } => {
            let wait = Duration::from_secs_f64(wait.max(0.0));
            outbox::send_durable(queue, message, count, data_dir, wait, net).await
        }
        Cmd::Outbox {
            which: OutboxCmd::Status { data_dir, db, json },
        } => outbox::status(data_dir, db, json),
        Cmd::DemoWarehouse {
            db,
            orders,
            queue,
            net,
        } => outbox::demo_warehouse(db, orders, queue, net).await,
        Cmd::DemoShop {
            db,
            orders,
            per_tx,
            pause_ms,
            queue,
            net,
        } => {
            let pause = Duration::from_millis(pause_ms);
            outbox::demo_shop(db, orders, per_tx, pause, queue, net).await
        }
        Cmd::Queue {
            which:
                QueueCmd::Consume {
                    queue,
                    prefetch,
                    fail_every,
                    max_attempts,
                    visibility_timeout,
                    count,
                    net,
                },
        } => {
            let options = mesh::queue::ConsumeOptions::default()
                .prefetch(prefetch)
                .max_attempts(max_attempts)
                .visibility_timeout(Duration::from_secs_f64(visibility_timeout.max(0.001)));
            work::consume(queue, options, fail_every, count, net).await
        }
        Cmd::Dlq {
            which: DlqCmd::List { queue, limit, net },
        } => work::dlq_list(queue, limit, net).await,
        Cmd::Dlq {
            which: DlqCmd::Replay { queue, net },
        } => work::dlq_replay(queue, net).await,
        Cmd::Stream {
            which:
                StreamCmd::Append {
                    stream,
                    message,
                    key,
                    count,
                    net,
                },
        } => stream::append(stream, message, key, count, net).await,
        Cmd::Stream {
            which:
                StreamCmd::Read {
                    stream,
                    from,
                    group,
                    count,
                    net,
                },
        } => stream::read(stream, &from, group, count, net).await,
        Cmd::Stream {
            which: StreamCmd::Info { stream, json, net },
        } => stream::info(stream, json, net).await,
        Cmd::Request {
            subject,
            message,
            wait,
            net,
        } => {
            work::request(
                subject,
                message,
                Duration::from_secs_f64(wait.max(0.0)),
                net,
            )
            .await
        }
        Cmd::Serve {
            pattern,
            prefix,
            count,
            net,
        } => work::serve(pattern, prefix, count, net).await,
        Cmd::Demo => crate::demo::run().await,
        Cmd::Bench {
            which:
                BenchCmd::Queue {
                    transport,
                    wait,
                    size,
                    messages,
                    prefetch,
                    json,
                },
        } => {
            bench::queue(
                size,
                messages,
                prefetch,
                peers::Net::parse(&transport, &wait)?,
                json,
            )
            .await
        }
        Cmd::Bench {
            which:
                BenchCmd::Stream {
                    transport,
                    wait,
                    size,
                    messages,
                    window,
                    host,
                    group,
                    json,
                },
        } => {
            bench::stream(
                size,
                messages,
                bench::StreamRead { window, group },
                bench::StreamHost::parse(&host)?,
                peers::Net::parse(&transport, &wait)?,
                json,
            )
            .await
        }
        Cmd::Bench {
            which:
                BenchCmd::Outbox {
                    transport,
                    wait,
                    size,
                    messages,
                    tx_rows,
                    inbox,
                    host,
                    prefetch,
                    dir,
                    producer_only,
                    relay_batch,
                    relay_in_flight,
                    json,
                },
        } => {
            let host_consumer = match host.as_str() {
                "producer" => false,
                "consumer" => true,
                other => bail!("unknown --host {other:?}: use producer or consumer"),
            };
            let b = outbox::BenchOutbox {
                messages,
                size,
                tx_rows,
                inbox,
                host_consumer,
                prefetch,
                dir,
                producer_only,
                relay_batch,
                relay_in_flight,
                json,
            };
            outbox::bench(b, peers::Net::parse(&transport, &wait)?).await
        }
        Cmd::Bench {
            which:
                BenchCmd::Request {
                    transport,
                    wait,
                    size,
                    messages,
                    json,
                },
        } => bench::request(size, messages, peers::Net::parse(&transport, &wait)?, json).await,
        Cmd::Bench {
            which:
                BenchCmd::Pubsub {
                    transport,
                    wait,
                    size,
                    messages,
                    pattern,
                    mode,
                    nodes,
                    json,
                },
        } => {
            let net = peers::Net::parse(&transport, &wait)?;
            match mode.as_str() {
                "direct" => bench::pubsub(size, messages, &pattern, net, json).await,
                "gossip" if net == peers::Net::Quic => {
                    bench::gossip(nodes, size, messages, json).await
                }
                "gossip" => bail!("gossip mode is benchmarked over quic only"),
                other => bail!("unknown mode {other:?}: use direct or gossip"),
            }
        }
        Cmd::Bench {
            which:
                BenchCmd::Ring {
                    size,
                    messages,
                    capacity,
                    pattern,
                    wait,
                    json,
                },
        } => ring_bench::run(size, messages, capacity, &pattern, &wait, json).await,
        Cmd::Bench {
            which:
                BenchCmd::Soak {
                    duration,
                    rate,
                    warmup,
                    kill_every,
                    max_rss_growth,
                    seed,
                    reliable_window,
                    json,
                },
        } => {
            soak::run(soak::Options {
                duration: soak::parse_duration(&duration).context("--duration")?,
                rate,
                warmup: soak::parse_duration(&warmup).context("--warmup")?,
                kill_every: soak::parse_duration(&kill_every).context("--kill-every")?,
                max_rss_growth,
                seed,
                reliable_window,
                json,
            })
            .await
        }
        Cmd::SoakWorker {
            role,
            name,
            listen,
            bootstrap,
            data_dir,
            start,
            rate,
            reliable_window,
        } => {
            soak::worker(soak::Worker {
                role,
                name,
                listen,
                bootstrap,
                data_dir,
                start,
                rate,
                reliable_window,
            })
            .await
        }
        Cmd::BenchRingPeer {
            ring,
            reply,
            nonce,
            messages,
            wait,
        } => ring_bench::peer(&ring, reply.as_deref(), nonce, messages, &wait),
        Cmd::Bench {
            which:
                BenchCmd::GossipSim {
                    nodes,
                    messages,
                    interval_ms,
                    seed,
                    json,
                },
        } => bench::gossip_sim(nodes, messages, interval_ms, seed, json),
        Cmd::BenchPeer {
            mode,
            messages,
            gossip_via,
            transport,
            wait,
            prefetch,
            window,
            group,
            inbox,
        } => {
            bench::peer(
                &mode,
                messages,
                gossip_via,
                peers::Net::parse(&transport, &wait)?,
                bench::PeerOptions {
                    prefetch,
                    window,
                    group,
                    inbox,
                },
            )
            .await
        }
    }
}

async fn run_node(
    net: NetArgs,
    data_dir: Option<PathBuf>,
    metrics_addr: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    // A long-running node hosts every queue and stream (one-shot commands
    // never do).
    let mut b = net.builder()?.host_all();
    if let Some(dir) = &data_dir {
        b = b.data_dir(dir);
    }
    if let Some(addr) = metrics_addr {
        b = b.metrics_addr(addr);
    }
    let node = b.start().await?;
    let addrs = wait_addrs(&node).await;
    println!("peer id: {}", node.peer_id());
    for a in &addrs {
        println!("listening: {a}");
    }
    if let Some(addr) = node.metrics_addr() {
        println!("metrics: {addr}");
    }
    // Durable sends left pending in the data dir go out through this node.
    let mut outbox = match &data_dir {
        Some(dir) => match outbox::NodeOutbox::start(dir, &node) {
            Ok(o) => Some(o),
            Err(e) => {
                node.shutdown().await;
                return Err(e);
            }
        },
        None => None,
    };
    let mut last = Vec::new();
    let mut last_links = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                if let Some(o) = &mut outbox {
                    o.tick(&node);
                }
                let peers = node.peers().await;
                print_changes("peer", &mut last, peers.iter().map(|p| {
                    (p.id.to_string(), format!("{:?}", p.state).to_lowercase())
                }));
                // How each data link runs: "link ID shm|quic|none".
                print_changes("link", &mut last_links, peers.iter().map(|p| {
                    (p.id.to_string(), link_kind(p).to_owned())
                }));
            }
        }
    }
    if let Some(o) = outbox {
        o.stop();
    }
    node.shutdown().await;
    Ok(())
}

/// Prints `WHAT ID VALUE` for each peer whose value differs from `last`
/// (sorted by id), then remembers `now`.
fn print_changes(
    what: &str,
    last: &mut Vec<(String, String)>,
    now: impl Iterator<Item = (String, String)>,
) {
    let mut now: Vec<_> = now.collect();
    now.sort();
    for (id, value) in &now {
        if !last.iter().any(|(i, v)| i == id && v == value) {
            println!("{what} {id} {value}");
        }
    }
    *last = now;
}

/// What carries the data link to a peer, as the CLI prints it.
fn link_kind(p: &mesh::PeerInfo) -> &'static str {
    match (p.linked, p.shm) {
        (true, true) => "shm",
        (true, false) => "quic",
        (false, _) => "none",
    }
}

/// The node's listen addresses, waiting briefly for the first one.
pub(crate) async fn wait_addrs(node: &Node) -> Vec<Multiaddr> {
    for _ in 0..200 {
        let addrs = node.listen_addrs().await;
        if !addrs.is_empty() {
            return addrs;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Vec::new()
}

/// A message as one JSON object.
pub fn message_json(m: &Message) -> serde_json::Value {
    let (payload, encoding) = match std::str::from_utf8(&m.payload) {
        Ok(s) => (s.to_owned(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(&m.payload),
            "base64",
        ),
    };
    serde_json::json!({
        "topic": m.topic.as_str(),
        "id": format!("{}/{}", m.publisher, m.id.seq),
        "seq": m.id.seq,
        "publisher": m.publisher.to_string(),
        "timestamp_us": m.timestamp,
        "payload": payload,
        "encoding": encoding,
    })
}

async fn run_sub(
    pattern: String,
    count: Option<u64>,
    reliable: bool,
    options: mesh::SubscribeOptions,
    net: NetArgs,
) -> anyhow::Result<()> {
    mesh::Pattern::new(&pattern)?;
    let node = net.join().await?;
    let mut sub = if reliable {
        node.subscribe_reliable_with(&pattern, options)
            .await?
            .into_subscription()
    } else {
        node.subscribe_with(&pattern, options).await?
    };
    let mut seen = 0u64;
    use std::io::Write;
    let stdout = std::io::stdout();
    loop {
        if count.is_some_and(|c| seen >= c) {
            break;
        }
        tokio::select! {
            m = sub.recv_delivery() => match m {
                Some(mesh::Delivery::Message(m)) => {
                    seen += 1;
                    let mut out = stdout.lock();
                    writeln!(out, "{}", message_json(&m))?;
                    out.flush()?;
                }
                Some(mesh::Delivery::Lagged(l)) => {
                    let mut out = stdout.lock();
                    let line = serde_json::json!({
                        "lagged": l.missed,
                        "publisher": l.publisher.to_string(),
                    });
                    writeln!(out, "{line}")?;
                    out.flush()?;
                }
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    let cut_off = sub.disconnected();
    drop(sub);
    node.shutdown().await;
    if cut_off {
        anyhow::bail!("the subscription's buffer filled and its overflow policy is disconnect");
    }
    Ok(())
}

async fn run_pub(
    topic: String,
    message: String,
    count: u64,
    size: Option<usize>,
    interval_ms: u64,
    net: NetArgs,
) -> anyhow::Result<()> {
    mesh::Topic::new(&topic)?;
    let node = net.join().await?;
    for i in 0..count {
        let mut payload = if count > 1 {
            format!("{message} {}", i + 1).into_bytes()
        } else {
            message.clone().into_bytes()
        };
        if let Some(size) = size {
            payload.resize(size, b'.');
        }
        node.publish(&topic, payload).await?;
        if interval_ms > 0 {
            tokio::time::sleep(Duration::from_millis(interval_ms)).await;
        }
    }
    let report = node.shutdown().await;
    if !report.is_clean() {
        bail!(
            "not every subscriber confirmed receipt: {} peer(s) did not answer in time{}; messages may be lost",
            report.unconfirmed.len(),
            if report.dropped_unreachable > 0 {
                format!(", {} message(s) dropped for unreachable peers", report.dropped_unreachable)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

async fn run_peers(net: NetArgs, json: bool) -> anyhow::Result<()> {
    let node = net.join().await?;
    let peers = node.peers().await;
    if json {
        let list: Vec<_> = peers
            .iter()
            .map(|p| {
                serde_json::json!({
                    "id": p.id.to_string(),
                    "state": format!("{:?}", p.state).to_lowercase(),
                    "link": link_kind(p),
                    "addrs": p.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
    } else {
        println!("{:<54} {:<8} {:<5} ADDRESSES", "PEER", "STATE", "LINK");
        for p in &peers {
            let addrs: Vec<String> = p.addrs.iter().map(|a| a.to_string()).collect();
            println!(
                "{:<54} {:<8} {:<5} {}",
                p.id,
                format!("{:?}", p.state).to_lowercase(),
                link_kind(p),
                addrs.join(" ")
            );
        }
    }
    node.shutdown().await;
    Ok(())
}

/// Spawns this executable with `args`, stdout piped.
pub(crate) fn spawn_self(args: &[String]) -> anyhow::Result<tokio::process::Child> {
    let exe = std::env::current_exe().context("cannot find the mesh executable")?;
    let mut cmd = tokio::process::Command::new(exe);
    // Children log only errors unless the user asked for more.
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "error");
    }
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start a child mesh process")
}

/// Reads lines from a child's stdout until one starts with `prefix`.
pub(crate) async fn read_until<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
    prefix: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                if let Some(rest) = line.strip_prefix(prefix) {
                    return Ok(rest.trim().to_owned());
                }
            }
            Ok(Ok(None)) => bail!("child process exited before printing {prefix:?}"),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => bail!("timed out waiting for {prefix:?} from a child process"),
        }
    }
}

pub(crate) fn lines_of(
    child: &mut tokio::process::Child,
) -> anyhow::Result<tokio::io::Lines<BufReader<tokio::process::ChildStdout>>> {
    let out = child.stdout.take().context("child stdout not piped")?;
    Ok(BufReader::new(out).lines())
}

mod bench;
mod demo;
mod outbox;
mod peers;
mod ring_bench;
mod soak;
mod stats;
mod stream;
mod work;
