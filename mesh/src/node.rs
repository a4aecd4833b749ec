//! The public API: [`Node`], its [`Builder`], [`Subscription`].

use std::{
    collections::VecDeque,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use libp2p::{identity::Keypair, Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use crate::{
    core::{
        membership,
        pubsub::Message,
        topic::{Pattern, Topic, TopicError},
    },
    runtime::{
        self,
        queue::{PublishCmd, SubQueue},
        Command,
    },
};

/// A peer as seen by this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its id.
    pub id: PeerId,
    /// What failure detection says of it.
    pub state: PeerState,
    /// Whether a data link to it is up.
    pub linked: bool,
    /// Whether that link's data moves over shared-memory rings (a peer on
    /// the same host and user) rather than QUIC.
    pub shm: bool,
    /// Addresses it announced.
    pub addrs: Vec<Multiaddr>,
}

/// A peer's liveness.
pub type PeerState = membership::MemberState;

/// Node configuration; see [`Builder`].
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) listen: Vec<Multiaddr>,
    pub(crate) bootstrap: Vec<Multiaddr>,
    pub(crate) data_dir: Option<PathBuf>,
    /// With a data dir: hosted queues and streams live in its store.
    pub(crate) durable: bool,
    pub(crate) mdns: bool,
    /// `mdns` was chosen with [`Builder::mdns`] (else it follows the
    /// mesh: on, off in a private one).
    pub(crate) mdns_chosen: bool,
    pub(crate) membership: membership::Config,
    pub(crate) join_timeout: Duration,
    pub(crate) max_frame: usize,
    pub(crate) inbound_limit: Option<InboundLimit>,
    pub(crate) subscription_capacity: usize,
    pub(crate) link_buffer: usize,
    pub(crate) slow_consumer_timeout: Duration,
    pub(crate) keypair: Option<Keypair>,
    pub(crate) reliable_window: usize,
    pub(crate) gossip: Vec<Pattern>,
    pub(crate) shm: ShmConfig,
    pub(crate) queue: crate::core::queue::Config,
    pub(crate) host_all: bool,
    pub(crate) host_queues: Vec<Arc<str>>,
    pub(crate) queue_full: crate::queue::QueueFull,
    pub(crate) self_host: bool,
    pub(crate) stream: crate::core::stream::Config,
    pub(crate) host_streams: Vec<Arc<str>>,
    pub(crate) admission: crate::security::Admission,
    pub(crate) access: Option<crate::security::AccessPolicy>,
    /// Where to serve metrics over HTTP.
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    /// Set by the simulator: run over its network, clock and disk.
    pub(crate) env: Option<Arc<dyn crate::runtime::Environment>>,
}

impl Config {
    /// Whether this node's runs must repeat (it runs in an environment,
    /// the simulator's): randomness is then derived, never drawn, and no
    /// real transport (shared memory) is used.
    pub(crate) fn replayable(&self) -> bool {
        self.env.is_some()
    }
}

/// Shared-memory links between peers on the same host; see
/// [`Builder::shm`].
#[derive(Debug, Clone)]
pub struct ShmConfig {
    /// Use rings with peers on this host and user (default on).
    pub enabled: bool,
    /// Where ring files are made (default `/dev/shm`).
    pub dir: PathBuf,
    /// Bytes of each ring, a power of two (default 1 MiB; a link has two).
    pub capacity: usize,
    /// How the link tasks wait for data and space.
    pub wait: mesh_transports::shm::WaitPolicy,
}

impl Default for ShmConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: mesh_transports::shm::default_dir(),
            capacity: 1 << 20,
            wait: Default::default(),
        }
    }
}

impl Config {
    /// Whether mDNS runs: as chosen, else on unless the mesh is private.
    pub(crate) fn mdns_enabled(&self) -> bool {
        if self.mdns_chosen {
            self.mdns
        } else {
            self.mdns && !self.admission.is_private()
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: vec!["/ip4/0.0.0.0/udp/0/quic-v1"
                .parse()
                .expect("valid multiaddr")],
            bootstrap: Vec::new(),
            data_dir: None,
            durable: true,
            mdns: true,
            mdns_chosen: false,
            membership: membership::Config::default(),
            join_timeout: Duration::from_secs(5),
            max_frame: mesh_transports::frame::DEFAULT_MAX_FRAME,
            inbound_limit: None,
            subscription_capacity: 64 * 1024,
            link_buffer: 8 * 1024 * 1024,
            slow_consumer_timeout: Duration::from_secs(5),
            keypair: None,
            reliable_window: 4096,
            gossip: Vec::new(),
            shm: ShmConfig::default(),
            queue: Default::default(),
            host_all: false,
            host_queues: Vec::new(),
            queue_full: Default::default(),
            self_host: true,
            stream: Default::default(),
            host_streams: Vec::new(),
            admission: Default::default(),
            access: None,
            metrics_addr: None,
            env: None,
        }
    }
}

/// Builds a [`Node`]: `Node::builder().listen(addr).bootstrap(peer).start().await`.
#[derive(Debug, Clone, Default)]
pub struct Builder {
    config: Config,
}

impl Builder {
    /// Listens on `addr` (default `/ip4/0.0.0.0/udp/0/quic-v1`); the first
    /// call replaces the default, later calls add.
    pub fn listen(mut self, addr: Multiaddr) -> Self {
        if self.config.listen == Config::default().listen {
            self.config.listen.clear();
        }
        self.config.listen.push(addr);
        self
    }

    /// Adds a peer to join through (`/ip4/../udp/../quic-v1/p2p/PEERID`).
    pub fn bootstrap(mut self, addr: Multiaddr) -> Self {
        self.config.bootstrap.push(addr);
        self
    }

    /// Keeps the node identity, and (if the node hosts anything) its
    /// queues and streams, in `dir`: a durable host. Its queued and in
    /// flight messages, stream records and committed group offsets live
    /// in `dir/mesh.db` (SQLite, WAL, `synchronous=FULL`), a send or
    /// append is confirmed only once on disk, and a restart resumes
    /// everything. One node at a time owns a data dir (a second one fails
    /// to start). Without a data dir the identity is ephemeral and state
    /// is in memory.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.data_dir = Some(dir.into());
        self
    }

    /// With a data dir, keeps hosted queues and streams in memory only
    /// (`false`); the default is durable (`true`).
    pub fn durable(mut self, on: bool) -> Self {
        self.config.durable = on;
        self
    }

    /// Uses this identity instead of loading or generating one.
    pub fn identity(mut self, keypair: Keypair) -> Self {
        self.config.keypair = Some(keypair);
        self
    }

    /// Turns mDNS discovery on or off. Default: on, but off in a private
    /// mesh ([`mesh_secret`](Self::mesh_secret) or
    /// [`allow_peers`](Self::allow_peers)), where it would announce this
    /// node's id and addresses to anyone on the LAN and dial whoever
    /// answers; call this to choose either way.
    pub fn mdns(mut self, on: bool) -> Self {
        self.config.mdns = on;
        self.config.mdns_chosen = true;
        self
    }

    /// Failure-detection timings. The defaults mark a dead peer down within
    /// about 3 s in a small mesh.
    pub fn failure_detection(mut self, config: membership::Config) -> Self {
        self.config.membership = config;
        self
    }

    /// How long [`Builder::start`] waits to learn the mesh from a bootstrap
    /// peer before returning anyway (default 5 s).
    pub fn join_timeout(mut self, timeout: Duration) -> Self {
        self.config.join_timeout = timeout;
        self
    }

    /// Largest frame accepted from a peer (default 4 MiB, at least 2 MiB so
    /// that control frames always fit, at most 4 GiB - 1). Every node of a mesh should use the
    /// same value: a peer refuses frames over its own limit.
    pub fn max_frame(mut self, bytes: usize) -> Self {
        // The wire length prefix is a u32.
        self.config.max_frame = bytes.clamp(2 * 1024 * 1024, u32::MAX as usize);
        self
    }

    /// Limits what this node reads from each peer's data link (see
    /// [`InboundLimit`]); unlimited by default.
    pub fn peer_inbound_limit(mut self, limit: InboundLimit) -> Self {
        self.config.inbound_limit = Some(limit);
        self
    }

    /// Messages buffered per subscription before its [`Overflow`] policy
    /// applies (default 65,536; [`SubscribeOptions::buffer`] sets one
    /// subscription's).
    pub fn subscription_capacity(mut self, messages: usize) -> Self {
        self.config.subscription_capacity = messages.max(1);
        self
    }

    /// How long a full subscription may hold the node back (it stops
    /// reading from peers, which pushes back on publishers) before it is
    /// treated as a slow consumer: its new messages are then dropped, and
    /// counted in [`Subscription::dropped`] and reported as
    /// [`Delivery::Lagged`], until it has taken its backlog. Default 5 s
    /// (see [`Overflow::Backpressure`]).
    pub fn slow_consumer_timeout(mut self, timeout: Duration) -> Self {
        self.config.slow_consumer_timeout = timeout;
        self
    }

    /// Makes the mesh private: only peers proving they hold this secret
    /// (or one of its secrets, see [`MeshSecret::from_secrets`]) get a
    /// link; nothing passes before the proof, and refusals are logged and
    /// counted. Read it from a file or the environment
    /// ([`MeshSecret::from_file`], [`MeshSecret::from_env`]), never from a
    /// command line. See [`crate::security`].
    ///
    /// [`MeshSecret::from_secrets`]: crate::security::MeshSecret::from_secrets
    /// [`MeshSecret::from_file`]: crate::security::MeshSecret::from_file
    /// [`MeshSecret::from_env`]: crate::security::MeshSecret::from_env
    pub fn mesh_secret(mut self, secret: crate::security::MeshSecret) -> Self {
        self.config.admission.secret = Some(secret);
        self
    }

    /// Admits only these peers (more calls add to the list); with a
    /// [`mesh_secret`](Self::mesh_secret) too, a peer needs both. Others
    /// are disconnected as soon as they connect, and counted.
    pub fn allow_peers(mut self, peers: impl IntoIterator<Item = PeerId>) -> Self {
        self.config
            .admission
            .allow
            .get_or_insert_with(Default::default)
            .extend(peers);
        self
    }

    /// Enforces an access policy on peers: what each may publish to and
    /// read (see [`AccessPolicy`](crate::security::AccessPolicy)). This
    /// node's own application is not checked.
    pub fn access_policy(mut self, policy: crate::security::AccessPolicy) -> Self {
        self.config.access = Some(policy);
        self
    }

    /// How many recent messages this node keeps, per peer with a reliable
    /// subscription, to send again after a partition or broken link
    /// (default 4096; also capped at 8 MiB of payload per peer). A
    /// subscriber cut off for longer gets [`Delivery::Lagged`].
    pub fn reliable_window(mut self, messages: usize) -> Self {
        self.config.reliable_window = messages.max(1);
        self
    }

    /// Publishes topics matching `pattern` in gossip mode: epidemic
    /// broadcast over a partial-view overlay (HyParView, Plumtree; see
    /// [`crate::core::gossip`]) instead of one copy per subscriber node.
    /// Every node relays (whatever its own setting) and gets each message
    /// about once; meant for wide fan-out. Best effort; headers are not
    /// carried.
    pub fn gossip(mut self, pattern: Pattern) -> Self {
        self.config.gossip.push(pattern);
        self
    }

    /// Hosts these queues (and their dead-letter queues): other nodes hand
    /// their sends to this one (see [`crate::queue`]). Names that are not
    /// valid queue names are ignored with a warning.
    pub fn host_queues<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for n in names {
            match Topic::new(n.as_ref()) {
                Ok(t) => self.config.host_queues.push(t.as_str().into()),
                Err(e) => tracing::warn!(error = %e, "not a queue name; not hosting it"),
            }
        }
        self
    }

    /// Hosts these streams: other nodes hand their appends to this one
    /// (see [`crate::stream`]). Names that are not valid stream names are
    /// ignored with a warning.
    pub fn host_streams<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for n in names {
            match Topic::new(n.as_ref()) {
                Ok(t) => self.config.host_streams.push(t.as_str().into()),
                Err(e) => tracing::warn!(error = %e, "not a stream name; not hosting it"),
            }
        }
        self
    }

    /// Partitions of each stream this node hosts (default 4, at most
    /// 256): records with one key stay in one partition, and a consumer
    /// group spreads partitions over its members.
    pub fn stream_partitions(mut self, n: u32) -> Self {
        self.config.stream.partitions = n.clamp(1, crate::core::stream::MAX_PARTITIONS);
        self
    }

    /// Retention of the streams this node hosts (default: 1,000,000
    /// records or 256 MiB per partition, no age limit).
    pub fn stream_retention(mut self, retention: crate::stream::Retention) -> Self {
        self.config.stream.retention = retention;
        self
    }

    /// Retention of one stream this node hosts.
    pub fn stream_retention_for(mut self, name: &str, retention: crate::stream::Retention) -> Self {
        self.config
            .stream
            .retention_for
            .push((name.into(), retention));
        self
    }

    /// Limits of the stream host in full (streams, bytes, readers).
    pub fn stream_limits(mut self, config: crate::stream::HostConfig) -> Self {
        self.config.stream = config;
        self
    }

    /// Bytes buffered per link before publishers on this node wait
    /// (default 8 MiB). A peer that lets 16 times this pile up unread
    /// (answers and deliveries it asked for) loses its link, and what
    /// waited for it is dropped (`dropped.outbox_overflow`).
    pub fn link_buffer(mut self, bytes: usize) -> Self {
        self.config.link_buffer = bytes.max(64 * 1024);
        self
    }

    /// Hosts every queue and stream (what a long-running `mesh node` does).
    pub fn host_all(mut self) -> Self {
        self.config.host_all = true;
        self
    }

    /// Whether this node hosts queues and streams that nobody hosts when
    /// it sends or appends to them (default on). Off, such sends fail with
    /// [`crate::queue::SendError::NoHost`]: for one-shot tools, which
    /// would lose what they hosted when they exit.
    pub fn self_host(mut self, on: bool) -> Self {
        self.config.self_host = on;
        self
    }

    /// Limits of the queues this node hosts (messages per queue and in
    /// all, bytes in all, dedup window and keys, queues).
    pub fn queue_limits(mut self, config: crate::queue::HostConfig) -> Self {
        self.config.queue = config;
        self
    }

    /// What a send to a full queue does (default: waits).
    pub fn queue_full(mut self, policy: crate::queue::QueueFull) -> Self {
        self.config.queue_full = policy;
        self
    }

    /// Moves data links to peers on the same host (same boot and network
    /// namespace) and user onto a pair of shared-memory rings; membership
    /// and control stay on QUIC. On by default; if the rings cannot be set
    /// up the link stays on QUIC and the log says why.
    pub fn shm(mut self, on: bool) -> Self {
        self.config.shm.enabled = on;
        self
    }

    /// Shared-memory settings in full: ring directory, size, wait policy.
    pub fn shm_config(mut self, config: ShmConfig) -> Self {
        self.config.shm = config;
        self
    }

    /// Serves this node's metrics over HTTP on `addr` (port 0 picks one;
    /// [`Node::metrics_addr`] tells which): `GET /metrics` in the
    /// Prometheus text format, `GET /metrics.json` as JSON (see
    /// [`crate::metrics`]). Stops when the node shuts down.
    #[cfg(feature = "prometheus")]
    pub fn metrics_addr(mut self, addr: std::net::SocketAddr) -> Self {
        self.config.metrics_addr = Some(addr);
        self
    }

    /// Runs the node in `env` (the simulator's network, clock and disk)
    /// instead of on QUIC, the system clock and SQLite.
    #[cfg_attr(not(feature = "sim"), allow(dead_code))]
    pub(crate) fn environment(mut self, env: Arc<dyn crate::runtime::Environment>) -> Self {
        self.config.env = Some(env);
        self.config.mdns = false;
        // Simulated nodes share one process; their links are simulated.
        self.config.shm.enabled = false;
        self.config.listen.clear();
        self
    }

    /// Starts the node. With bootstrap peers, waits (up to the join timeout)
    /// until one of them has told this node the mesh's members and
    /// subscriptions, so a publish right after start reaches existing
    /// subscribers.
    pub async fn start(self) -> Result<Node, StartError> {
        let join_timeout = self.config.join_timeout;
        let has_bootstrap = !self.config.bootstrap.is_empty();
        let metrics_addr = self.config.metrics_addr;
        let node = runtime::start(self.config).await?;
        #[cfg(feature = "prometheus")]
        if let Some(addr) = metrics_addr {
            let server = crate::metrics::serve(&node, addr)
                .await
                .map_err(|source| StartError::Metrics { addr, source })?;
            *node
                .inner
                .metrics_server
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(server);
        }
        #[cfg(not(feature = "prometheus"))]
        let _ = metrics_addr;
        // Listen addresses come up asynchronously; a caller asking for them
        // right after start should get them.
        let _ = tokio::time::timeout(Duration::from_secs(2), node.ask(Command::Listening)).await;
        if has_bootstrap {
            if let Err(e) = node.ready_timeout(join_timeout).await {
                tracing::warn!("{e}; continuing, the node joins when a peer answers");
            }
        }
        Ok(node)
    }
}

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The identity file exists but cannot be read or parsed.
    #[error("identity file {path}: {reason}")]
    Identity {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The data directory cannot be created or written.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The network transport failed to start.
    #[error(transparent)]
    Transport(#[from] mesh_transports::quic::StartError),
    /// What the durable store holds cannot be put back with this
    /// configuration.
    #[error("durable state: {0}")]
    Restore(String),
    /// The metrics endpoint cannot listen on its address.
    #[error("metrics endpoint on {addr}: {source}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The durable store in the data dir cannot be used (corrupt, of a
    /// newer mesh, another application's, or in use by another node).
    #[cfg(feature = "sqlite")]
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// What [`Node::shutdown`] could confirm.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Peers that were sent messages and did not confirm reading them
    /// before the shutdown timeout (also when their link broke meanwhile):
    /// they may have missed some.
    pub unconfirmed: Vec<PeerId>,
    /// Messages dropped over the node's life because a peer's link never
    /// came up in time (also logged when it happened).
    pub dropped_unreachable: u64,
    /// Queue messages this node hosted that were not acked yet: they end
    /// with it (hosts keep messages in memory; also logged).
    pub queued_dropped: u64,
}

impl ShutdownReport {
    /// Whether every peer confirmed and nothing was dropped.
    pub fn is_clean(&self) -> bool {
        self.unconfirmed.is_empty() && self.dropped_unreachable == 0 && self.queued_dropped == 0
    }
}

/// Errors publishing.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The topic is not valid.
    #[error("invalid topic: {0}")]
    Topic(#[from] TopicError),
    /// The payload is larger than a frame may be.
    #[error("message of {size} bytes exceeds the frame limit of {limit} bytes")]
    TooLarge {
        /// The message size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Encoding a typed value failed.
    #[error("cannot encode value: {0}")]
    Encode(#[from] postcard::Error),
    /// More headers than a message may carry ([`crate::wire::MAX_HEADERS`]).
    #[error("{count} headers exceed the limit of {limit} per message")]
    TooManyHeaders {
        /// How many were given.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The node has shut down.
    #[error("node is shut down")]
    Closed,
}

/// Errors subscribing.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// The pattern is not valid.
    #[error("invalid pattern: {0}")]
    Pattern(#[from] TopicError),
    /// This node already declares as many patterns as one node may.
    #[error(
        "too many distinct subscription patterns on this node (limits: {} patterns, {} bytes)",
        crate::core::interest::MAX_PATTERNS_PER_NODE,
        crate::core::interest::MAX_DECLARATION_BYTES
    )]
    TooManyPatterns,
    /// The node has shut down.
    #[error("node is shut down")]
    Closed,
}

/// The node did not join a mesh in time.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadyError {
    /// No peer answered within the timeout.
    #[error("no peer found within {0:?}")]
    Timeout(Duration),
    /// The node has shut down.
    #[error("node is shut down")]
    Closed,
}

/// A running mesh node. Cheap to clone; every clone talks to the same node.
///
/// Dropping the last clone stops the node; [`Node::shutdown`] does so
/// gracefully, flushing what was published to peers first.
#[derive(Debug, Clone)]
pub struct Node {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) peer_id: PeerId,
    pub(crate) cmd: mpsc::Sender<Command>,
    pub(crate) publishes: Arc<crate::runtime::queue::PublishQueue>,
    /// Unbounded, but bounded in practice by the number of live
    /// subscriptions: each sends its id once, when dropped.
    pub(crate) unsubscribe: mpsc::UnboundedSender<u64>,
    pub(crate) max_payload: usize,
    /// Queue sends and requests (bounded: a full one makes them wait).
    pub(crate) work_bounded: Arc<crate::runtime::queue::HandOff<crate::engine::work::Op>>,
    /// Everything else for queues and request/reply (acks, consumers,
    /// answers): bounded by credit and by the requests taken.
    pub(crate) work_control: Arc<crate::runtime::queue::HandOff<crate::engine::work::Op>>,
    /// Numbers consumers and responders.
    pub(crate) next_id: std::sync::atomic::AtomicU32,
    /// The metrics endpoint, if [`Builder::metrics_addr`] started one.
    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))]
    pub(crate) metrics_server: MetricsSlot,
    /// The node's wall clock (virtual in the simulator): stamps records.
    pub(crate) clock: crate::runtime::WallClock,
}

#[cfg(feature = "prometheus")]
pub(crate) type MetricsSlot = std::sync::Mutex<Option<crate::metrics::MetricsServer>>;
#[cfg(not(feature = "prometheus"))]
pub(crate) type MetricsSlot = ();

/// Names starting with `$` are the mesh's own (queue hosts, responders).
pub(crate) fn check_not_reserved(name: &str) -> Result<(), TopicError> {
    if name.starts_with('$') {
        return Err(TopicError::Reserved {
            topic: name.to_owned(),
        });
    }
    Ok(())
}

impl Inner {
    async fn publish(
        &self,
        topic: Topic,
        headers: Vec<(String, Bytes)>,
        payload: Bytes,
    ) -> Result<(), PublishError> {
        // Everything the frame carries: payload, topic (inline at worst) and
        // headers with their length prefixes.
        let size = payload.len()
            + topic.as_str().len()
            + headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 10)
                .sum::<usize>();
        if size > self.max_payload {
            return Err(PublishError::TooLarge {
                size,
                limit: self.max_payload,
            });
        }
        crate::wire::check_header_count(&headers).map_err(|count| {
            PublishError::TooManyHeaders {
                count,
                limit: crate::wire::MAX_HEADERS,
            }
        })?;
        self.publishes
            .push(PublishCmd {
                topic,
                headers,
                payload,
            })
            .await
            .map_err(|_| PublishError::Closed)
    }
}

/// Publishes to one topic; see [`Node::publisher`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Publisher {
    topic: Topic,
    node: Node,
}

impl Publisher {
    /// The topic published to.
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    /// Publishes `payload`; resolves once the node has taken it.
    pub async fn publish(&self, payload: impl Into<Bytes>) -> Result<(), PublishError> {
        self.node
            .inner
            .publish(self.topic.clone(), Vec::new(), payload.into())
            .await
    }

    /// Publishes with headers.
    pub async fn publish_with(
        &self,
        headers: Vec<(String, Bytes)>,
        payload: impl Into<Bytes>,
    ) -> Result<(), PublishError> {
        self.node
            .inner
            .publish(self.topic.clone(), headers, payload.into())
            .await
    }

    /// Publishes a value encoded with postcard.
    pub async fn publish_value<T: serde::Serialize>(&self, value: &T) -> Result<(), PublishError> {
        self.publish(postcard::to_stdvec(value)?).await
    }
}

impl Node {
    /// Starts configuring a node.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// This node's id.
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.inner.cmd.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Addresses this node listens on, each ending in `/p2p/PEERID` so it
    /// can be given to another node as a bootstrap address.
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.ask(Command::ListenAddrs).await.unwrap_or_default()
    }

    /// Known peers and their state.
    pub async fn peers(&self) -> Vec<PeerInfo> {
        self.ask(Command::Peers).await.unwrap_or_default()
    }

    /// Resolves once this node knows the mesh: at once without bootstrap
    /// peers, otherwise when a peer has sent its view.
    pub async fn ready(&self) -> Result<(), ReadyError> {
        self.ask(Command::Ready).await.ok_or(ReadyError::Closed)
    }

    /// [`Node::ready`] with a timeout.
    pub async fn ready_timeout(&self, timeout: Duration) -> Result<(), ReadyError> {
        tokio::time::timeout(timeout, self.ready())
            .await
            .map_err(|_| ReadyError::Timeout(timeout))?
    }

    /// Waits until a peer has told this node the mesh's members and
    /// subscriptions (whether it was configured with bootstrap peers or
    /// finds them by mDNS). One-shot tools use this before publishing.
    pub async fn joined(&self, timeout: Duration) -> Result<(), ReadyError> {
        tokio::time::timeout(timeout, self.ask(Command::Joined))
            .await
            .map_err(|_| ReadyError::Timeout(timeout))?
            .ok_or(ReadyError::Closed)
    }

    /// Publishes `payload` to `topic`. Resolves once the node has taken the
    /// message (waiting if links are congested), not when it is delivered.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<(), PublishError> {
        self.publish_with(topic, Vec::new(), payload).await
    }

    /// Publishes with headers.
    pub async fn publish_with(
        &self,
        topic: &str,
        headers: Vec<(String, Bytes)>,
        payload: impl Into<Bytes>,
    ) -> Result<(), PublishError> {
        let topic = Topic::new(topic)?;
        check_not_reserved(topic.as_str())?;
        self.inner.publish(topic, headers, payload.into()).await
    }

    /// A handle for publishing to one topic, validated once: the fast way
    /// to publish many messages to the same topic.
    pub fn publisher(&self, topic: &str) -> Result<Publisher, TopicError> {
        check_not_reserved(topic)?;
        Ok(Publisher {
            topic: Topic::new(topic)?,
            node: self.clone(),
        })
    }

    /// Publishes a value encoded with postcard.
    pub async fn publish_value<T: serde::Serialize>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<(), PublishError> {
        let bytes = postcard::to_stdvec(value)?;
        self.publish(topic, bytes).await
    }

    /// Subscribes to every topic matching `pattern` (`*` for one segment,
    /// `>` for one or more trailing ones); dropping it unsubscribes.
    ///
    /// Local publishes after this returns reach it at once. Remote
    /// publishers learn of it when the declaration reaches them (one
    /// message latency), and nodes that join later learn of it when they
    /// join; as with NATS or Zenoh, a message published remotely at the same
    /// instant may miss it.
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription, SubscribeError> {
        self.subscribe_inner(pattern, false, SubscribeOptions::new())
            .await
    }

    /// [`subscribe`](Self::subscribe) with a buffer size and an
    /// [`Overflow`] policy of its own.
    pub async fn subscribe_with(
        &self,
        pattern: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, SubscribeError> {
        self.subscribe_inner(pattern, false, options).await
    }

    /// Subscribes reliably: every publisher keeps a retransmit window of
    /// its recent messages for this node (see
    /// [`Builder::reliable_window`]), numbered per publisher, so after a
    /// partition or a broken link shorter than the window this
    /// subscription receives every message exactly once and in order;
    /// beyond the window it gets [`Delivery::Lagged`] with the number
    /// missed, never a silent gap.
    ///
    /// Guarantees hold while both nodes run: a message in a publisher's
    /// window is lost if the publisher crashes before resending it.
    pub async fn subscribe_reliable(
        &self,
        pattern: &str,
    ) -> Result<ReliableSubscription, SubscribeError> {
        self.subscribe_reliable_with(pattern, SubscribeOptions::new())
            .await
    }

    /// [`subscribe_reliable`](Self::subscribe_reliable) with a buffer size
    /// and an [`Overflow`] policy of its own. Messages the policy drops
    /// here are reported as [`Delivery::Lagged`] like those the network
    /// lost.
    pub async fn subscribe_reliable_with(
        &self,
        pattern: &str,
        options: SubscribeOptions,
    ) -> Result<ReliableSubscription, SubscribeError> {
        Ok(ReliableSubscription {
            inner: self.subscribe_inner(pattern, true, options).await?,
        })
    }

    async fn subscribe_inner(
        &self,
        pattern: &str,
        reliable: bool,
        options: SubscribeOptions,
    ) -> Result<Subscription, SubscribeError> {
        let pattern = Pattern::new(pattern)?;
        check_not_reserved(pattern.as_str())?;
        let (id, queue) = self
            .ask(|reply| Command::Subscribe {
                pattern: pattern.clone(),
                reliable,
                options,
                reply,
            })
            .await
            .ok_or(SubscribeError::Closed)??;
        Ok(Subscription {
            _node: self.clone(),
            id,
            pattern,
            queue,
            buffered: VecDeque::new(),
            unsubscribe: self.inner.unsubscribe.clone(),
        })
    }

    /// The peers that a message published now on `topic` would be sent to:
    /// live members that declared a matching subscription.
    pub async fn remote_subscribers(&self, topic: &str) -> Result<Vec<PeerId>, TopicError> {
        let topic = Topic::new(topic)?;
        Ok(self
            .ask(|reply| Command::Route { topic, reply })
            .await
            .unwrap_or_default())
    }

    /// Stops the node: says goodbye to every peer once what was published
    /// has been written (waiting up to 2 s for them to confirm), ends every
    /// subscription, and stops the network. The report says which peers did
    /// not confirm reading what was sent to them (empty when the node was
    /// already shut down).
    pub async fn shutdown(&self) -> ShutdownReport {
        #[cfg(feature = "prometheus")]
        drop(
            self.inner
                .metrics_server
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        self.ask(Command::Shutdown).await.unwrap_or_default()
    }

    /// A snapshot of this node's counters and gauges (see
    /// [`crate::metrics`]); `None` once the node has shut down.
    pub async fn metrics(&self) -> Option<crate::metrics::Metrics> {
        self.ask(Command::Metrics).await
    }
}

/// A stream of the [`Message`]s matching a pattern. Drop it to unsubscribe.
#[derive(Debug)]
pub struct Subscription {
    /// Keeps the node running while the subscription lives.
    _node: Node,
    id: u64,
    pattern: Pattern,
    queue: Arc<SubQueue>,
    buffered: VecDeque<Delivery>,
    unsubscribe: mpsc::UnboundedSender<u64>,
}

impl Subscription {
    /// The pattern subscribed to.
    pub fn pattern(&self) -> &Pattern {
        &self.pattern
    }

    /// Messages dropped for this subscription by its [`Overflow`] policy
    /// (each also reported as [`Delivery::Lagged`] to
    /// [`recv_delivery`](Self::recv_delivery)). Zero for a subscriber that
    /// keeps up.
    pub fn dropped(&self) -> u64 {
        self.queue.dropped()
    }

    /// Whether the node ended this subscription because its buffer filled
    /// ([`Overflow::Disconnect`]); its stream ends once it has yielded what
    /// it held.
    pub fn disconnected(&self) -> bool {
        self.queue.cut_off()
    }

    /// The next message; `None` once the node has shut down (or the
    /// subscription was [`disconnected`](Self::disconnected)).
    pub async fn recv(&mut self) -> Option<Message> {
        futures::StreamExt::next(self).await
    }

    /// The next message, or a report of messages its [`Overflow`] policy
    /// dropped at this point of the stream (the plain stream skips those
    /// reports).
    pub async fn recv_delivery(&mut self) -> Option<Delivery> {
        futures::future::poll_fn(|cx| self.poll_delivery(cx)).await
    }
}

impl futures::Stream for Subscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        match self.poll_delivery(cx) {
            Poll::Ready(Some(Delivery::Message(m))) => Poll::Ready(Some(m)),
            // Only reliable subscriptions are told of losses.
            Poll::Ready(Some(Delivery::Lagged(_))) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Subscription {
    fn poll_delivery(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        if let Some(d) = self.buffered.pop_front() {
            return Poll::Ready(Some(d));
        }
        match self.queue.poll_take(cx, &mut self.buffered) {
            Poll::Ready(true) => Poll::Ready(self.buffered.pop_front()),
            Poll::Ready(false) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// What a [`ReliableSubscription`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The next message.
    Message(Message),
    /// Messages that are gone for good: here in the stream is where they
    /// would have been.
    Lagged(Lagged),
}

/// Messages a subscription will never get, reported where they would have
/// been. For a reliable subscription: they left the publisher's retransmit
/// window before this node could fetch them (a partition or outage longer
/// than the window). For any subscription: its [`Overflow`] policy dropped
/// them because it did not keep up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lagged {
    /// The publisher whose messages were missed.
    pub publisher: PeerId,
    /// How many of its messages were missed. Those the network lost may
    /// match any of this node's reliable subscriptions; those the
    /// overflow policy dropped were this subscription's.
    pub missed: u64,
}

/// What a subscription does when its buffer is full (see
/// [`SubscribeOptions`]). Whatever it does, no message is dropped
/// silently: each is counted (in [`Subscription::dropped`] and the node's
/// [`metrics`](Node::metrics)) and reported in the stream as a
/// [`Delivery::Lagged`] where it would have been.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Overflow {
    /// Push back on publishers: the node stops reading from its peers
    /// (QUIC flow control and the publishers' link buffers then slow them
    /// to this subscriber's pace). Bounded in time: a subscription full
    /// for longer than [`Builder::slow_consumer_timeout`] is cut loose, and
    /// messages for it are dropped until it has taken its backlog, so one
    /// stalled consumer cannot stall the mesh. Publishes from this node are
    /// never held back (a handler that publishes would deadlock): beyond
    /// twice the buffer they are dropped. The default, as in NATS
    /// JetStream's flow control or a Zenoh blocking subscriber.
    #[default]
    Backpressure,
    /// Keep the newest: each message that finds the buffer full evicts the
    /// oldest one (a ring, like Zenoh's `RingChannel` or a tokio broadcast
    /// channel). Never holds publishers back.
    DropOldest,
    /// End the subscription when a message finds its buffer full, as NATS
    /// disconnects a slow consumer: its declaration is withdrawn, its
    /// stream yields what it held, a `Lagged` for the message that did not
    /// fit, and ends; [`Subscription::disconnected`] tells why.
    Disconnect,
}

impl std::str::FromStr for Overflow {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "backpressure" => Ok(Self::Backpressure),
            "drop-oldest" => Ok(Self::DropOldest),
            "disconnect" => Ok(Self::Disconnect),
            _ => Err(format!(
                "unknown overflow policy {s:?} (backpressure, drop-oldest or disconnect)"
            )),
        }
    }
}

/// A limit on the rate at which a node reads from each peer (bytes and
/// frames per second, with a second's worth of burst). A peer over it is
/// not cut off and nothing it sent is dropped: the node pauses reading
/// from that peer alone, so its QUIC flow control window (or its ring)
/// fills and its sends wait. Pauses are counted in
/// [`metrics().links`](crate::metrics::Links).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundLimit {
    pub(crate) bytes_per_sec: u64,
    pub(crate) frames_per_sec: u64,
}

impl InboundLimit {
    /// At most this many bytes per second from each peer (at least 64 KiB,
    /// so that any frame passes within a minute).
    pub fn bytes_per_sec(bytes: u64) -> Self {
        Self {
            bytes_per_sec: bytes.max(64 * 1024),
            frames_per_sec: u64::MAX,
        }
    }

    /// Also at most this many frames per second (each frame carries one
    /// message or a batch of them; at least 1).
    pub fn frames_per_sec(mut self, frames: u64) -> Self {
        self.frames_per_sec = frames.max(1);
        self
    }
}

/// Options of one subscription: its buffer and [`Overflow`] policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    pub(crate) buffer: Option<usize>,
    pub(crate) overflow: Overflow,
}

impl SubscribeOptions {
    /// The node's defaults: [`Builder::subscription_capacity`] messages
    /// and [`Overflow::Backpressure`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Messages buffered for this subscription (at least 1).
    pub fn buffer(mut self, messages: usize) -> Self {
        self.buffer = Some(messages.max(1));
        self
    }

    /// What to do when the buffer is full.
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }
}

/// A reliable subscription (see [`Node::subscribe_reliable`]): a stream of
/// [`Delivery`], messages in order per publisher, exactly once, and
/// explicit [`Delivery::Lagged`] where some could not be recovered. Drop it
/// to unsubscribe.
#[derive(Debug)]
pub struct ReliableSubscription {
    inner: Subscription,
}

impl ReliableSubscription {
    /// The pattern subscribed to.
    pub fn pattern(&self) -> &Pattern {
        &self.inner.pattern
    }

    /// The next delivery; `None` once the node has shut down.
    pub async fn recv(&mut self) -> Option<Delivery> {
        futures::StreamExt::next(self).await
    }

    /// See [`Subscription::dropped`].
    pub fn dropped(&self) -> u64 {
        self.inner.dropped()
    }

    /// See [`Subscription::disconnected`].
    pub fn disconnected(&self) -> bool {
        self.inner.disconnected()
    }

    /// The subscription underneath, whose
    /// [`recv_delivery`](Subscription::recv_delivery) yields what this one
    /// does (messages in order per publisher, and every gap).
    pub fn into_subscription(self) -> Subscription {
        self.inner
    }
}

impl futures::Stream for ReliableSubscription {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.inner.poll_delivery(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.unsubscribe.send(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// mDNS announces a node's id and addresses to the LAN: off by default
    /// in a private mesh, on in an open one, as chosen when chosen.
    #[test]
    fn mdns_is_off_by_default_in_a_private_mesh() {
        let secret = || crate::security::MeshSecret::new("0123456789abcdef-secret").unwrap();
        assert!(Node::builder().config.mdns_enabled());
        assert!(!Node::builder().mesh_secret(secret()).config.mdns_enabled());
        let allow = Node::builder().allow_peers([PeerId::random()]);
        assert!(!allow.config.mdns_enabled());
        let chosen = Node::builder().mesh_secret(secret()).mdns(true);
        assert!(chosen.config.mdns_enabled());
        assert!(!Node::builder().mdns(false).config.mdns_enabled());
    }
}
