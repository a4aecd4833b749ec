//! The tokio driver: one task runs the [`Engine`] (the protocol state: the
//! cores, pub/sub, each peer's protocol half of its link) over the QUIC
//! transport, and holds the I/O: the links' outboxes, readers and rings,
//! the subscription queues, the transport; and, still here, the queue and
//! stream state (`work`, `streams`).
//!
//! Data path: `Node::publish` hands a command to the node task; it takes
//! commands in batches, and `Engine::publish` routes each message and
//! encodes it into the peers' buffers; at the end of the batch
//! `Engine::poll_transmit` hands each buffer over and it goes into the
//! link's [`queue::Outbox`] for its writer task. Received frames come from
//! the link reader tasks in batches, go through `Engine::handle_frame`, and
//! the messages it delivers are pushed to the matching
//! [`queue::SubQueue`]s.
//!
//! Back-pressure: when a link has more than `link_buffer` bytes pending the
//! node stops taking publish commands (so `publish` waits); when a
//! subscription is over capacity it stops reading links (so QUIC flow
//! control slows the publishers). Membership timers keep running either way.

// Without the `sqlite` feature no backend writes what it describes.
mod connection;
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) mod durable;
pub(crate) mod env;
pub(crate) mod link;
pub(crate) mod metrics;
pub(crate) mod queue;
mod relink;
mod shm_link;
mod shutdown;
mod start;

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use libp2p::{identity::Keypair, multiaddr::Protocol, Multiaddr};
use mesh_transports::quic;
use rand::{rngs::SmallRng, RngCore, SeedableRng};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::{
    core::{
        membership::{MemberState, Membership},
        pubsub::SubId,
        topic::Pattern,
        NodeId,
    },
    engine::{self, work::Op, Engine, EngineConfig, Peer},
    node::{Config, Inner, Node, PeerInfo, StartError},
    wire::{self, Frame, Hello, Raw, WireError, FEATURE_SHM, MAGIC, PROTOCOL_VERSION},
};
use env::Transport;
pub(crate) use env::{Environment, Spawner};
use link::{LinkEvent, LinkId, PeerHello, ShmRxSlot};
use mesh_transports::shm;
use queue::{Outbox, PublishCmd, PublishQueue, ShmTx, SubQueue};
pub(crate) use start::start;

/// The I/O half of `peer`'s link, created (waiting for a stream) if there
/// is none.
fn io_entry<'a>(
    links: &'a mut rustc_hash::FxHashMap<NodeId, Link>,
    next: &mut LinkId,
    space: &Arc<Notify>,
    peer: NodeId,
) -> &'a mut Link {
    links.entry(peer).or_insert_with(|| {
        *next += 1;
        Link::new(*next, space.clone(), now())
    })
}

/// Commands from [`Node`] handles to the node task.
#[derive(Debug)]
pub(crate) enum Command {
    Subscribe {
        pattern: Pattern,
        reliable: bool,
        options: crate::node::SubscribeOptions,
        reply: oneshot::Sender<Result<(SubId, Arc<SubQueue>), crate::node::SubscribeError>>,
    },
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    /// Resolves once the transport listens on at least one address.
    Listening(oneshot::Sender<()>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    Ready(oneshot::Sender<()>),
    /// Resolves once a peer has sent its view of the mesh.
    Joined(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<crate::node::ShutdownReport>),
    Metrics(oneshot::Sender<crate::metrics::Metrics>),
    /// The live peers a message on `topic` would go to now.
    Route {
        topic: crate::core::topic::Topic,
        reply: oneshot::Sender<Vec<NodeId>>,
    },
}

/// Commands taken per wake-up; bounds the latency other events see.
const COMMAND_BATCH: usize = 64;
/// Publishes queued for the node task before `publish` waits.
const PUBLISH_QUEUE: usize = 8192;
/// How long a link to a peer may wait for its stream before its buffered
/// bytes are dropped (and counted).
const LINK_SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Control streams read at once; more are refused.
const MAX_CONTROL_READERS: usize = 256;
/// Control streams read at once from one peer.
const MAX_CONTROL_READERS_PER_PEER: usize = 16;
/// How often a node tries to reach a peer it declared down, and bootstrap
/// peers it is not connected to: a partition that lasted past the failure
/// detector must still heal without outside help (Serf's reconnect).
const RECONNECT_INTERVAL: Duration = Duration::from_secs(2);
/// How long shutdown waits for peers to confirm they read everything.
const BYE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a node that is shutting down waits for a peer to close after
/// acking the peer's `Bye`, when that `Bye` came after our own: the peer may
/// be waiting for our close in turn (both left at once), so this is bounded
/// short rather than by [`BYE_TIMEOUT`].
const BYE_LINGER: Duration = Duration::from_millis(200);

/// The runtime's clock: tokio's, so that the simulator's virtual time
/// (a paused tokio clock) drives every timer and timeout.
/// A handle's `oneshot` channel as the engine's answer slot.
impl<T: Send + 'static> From<oneshot::Sender<T>> for engine::reply::Reply<T> {
    fn from(tx: oneshot::Sender<T>) -> Self {
        Self::new(move |v| {
            let _ = tx.send(v);
        })
    }
}

pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn far_future() -> Instant {
    now() + Duration::from_secs(3600)
}

/// Wall-clock time for message timestamps and membership epochs: the
/// system clock, or in the simulator a fixed start plus virtual time.
#[derive(Debug, Clone, Copy)]
pub(crate) enum WallClock {
    System,
    /// Of an [`Environment`] (the simulator's): a fixed start plus
    /// tokio's (paused) time.
    #[cfg_attr(not(feature = "sim"), allow(dead_code))]
    Virtual {
        unix_micros_at_origin: u64,
        origin: tokio::time::Instant,
    },
}

impl WallClock {
    pub(crate) fn unix_micros(&self) -> u64 {
        match self {
            WallClock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0),
            WallClock::Virtual {
                unix_micros_at_origin,
                origin,
            } => *unix_micros_at_origin + origin.elapsed().as_micros() as u64,
        }
    }
}

#[derive(Debug, Default)]
struct Stats {
    links_refused: u64,
    /// Links refused because the peer is not admitted to the private mesh.
    auth_refused: u64,
    /// Gossip messages dropped because their origin's signature did not
    /// check.
    slow_consumers: u64,
    dropped_slow_subscriber: u64,
    control_refused: u64,
}

/// Whether the access policy (if any) lets `peer` receive `topic`: routes
/// to subscribers leave out those it does not.
/// Peers refused by the private-mesh check: their connections are closed
/// from the node's async loop, and each is logged once (the set is
/// bounded: past its limit it starts over, logging again).
#[derive(Debug, Default)]
struct RefusedPeers {
    to_disconnect: Vec<NodeId>,
    logged: std::collections::HashSet<NodeId>,
}

impl RefusedPeers {
    const MAX_LOGGED: usize = 4096;

    /// Notes a refusal; true if it is the first for this peer.
    fn note(&mut self, peer: NodeId) -> bool {
        if !self.to_disconnect.contains(&peer) && self.to_disconnect.len() < Self::MAX_LOGGED {
            self.to_disconnect.push(peer);
        }
        if self.logged.len() >= Self::MAX_LOGGED {
            self.logged.clear();
        }
        self.logged.insert(peer)
    }
}

/// A link's outbox may hold this many times `link_buffer` before the link
/// is closed as not reading ([`NodeTask::shed_overflowing_links`]).
const OUTBOX_CAP_FACTOR: usize = 16;
/// Links of a private node waiting for their peer's proof at once; more
/// streams are refused (`unadmitted_refused`) until some are admitted or
/// time out (the handshake timeout, 10 s).
const MAX_UNADMITTED: usize = 64;

/// The I/O half of one peer's link (its protocol half is the engine's
/// [`Peer`]).
struct Link {
    id: LinkId,
    outbox: Arc<Outbox>,
    /// `None` while waiting for a stream (data is buffered meanwhile).
    reader: Option<tokio::task::AbortHandle>,
    created: Instant,
    /// Shared memory: the ring the reader turns to at the peer's
    /// `ShmSwitch`, our ring waiting for our own switch, and how far the
    /// move went.
    shm_rx: ShmRxSlot,
    shm_tx: Option<ShmTx>,
    shm: ShmState,
    /// The peer's `Hello` said it shares our host and user (an offer from
    /// anyone else is refused).
    shm_ok: bool,
}

/// How far a link's move to shared memory went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShmState {
    /// On the network (not eligible, refused, or not tried yet).
    Off,
    /// We offered rings (smaller id) and wait for the peer's switch.
    Offered,
    /// We opened the peer's rings and switched our side (larger id).
    Opened,
    /// Both directions run over the rings.
    On,
    /// The peer switched while we were shutting down: our reader reads
    /// the ring, our side stays on the network (after our `Bye` nothing
    /// more goes out; see `shm_switch`).
    RingIn,
}

impl ShmState {
    /// Our side writes to the ring once it has switched: at once when it
    /// opened the peer's rings, on the peer's switch when it offered.
    fn writes_ring(self) -> bool {
        matches!(self, ShmState::Opened | ShmState::On)
    }

    /// The reader turns to the ring after a batch that ends with the
    /// peer's `ShmSwitch`, which moves the link to `On`.
    fn reads_ring(self) -> bool {
        matches!(self, ShmState::On | ShmState::RingIn)
    }
}

impl Link {
    fn new(id: LinkId, space: Arc<Notify>, now: Instant) -> Self {
        Self {
            id,
            outbox: Arc::new(Outbox::new(space)),
            reader: None,
            created: now,
            shm_rx: Default::default(),
            shm_tx: None,
            shm: ShmState::Off,
            shm_ok: false,
        }
    }

    /// Stops the link; whatever is already encoded (`rest`: what the
    /// engine held for it) is still written.
    fn close(&mut self, rest: &mut Vec<u8>) {
        if !rest.is_empty() {
            self.outbox.push(rest);
        }
        self.outbox.close();
        if let Some(r) = self.reader.take() {
            r.abort();
        }
    }
}

struct NodeTask {
    /// The protocol state: the cores, pub/sub, and each peer's protocol
    /// half of its link (this task holds the I/O half in `links`).
    engine: Engine,
    config: Config,
    sub_queues: rustc_hash::FxHashMap<SubId, Arc<SubQueue>>,
    /// One per peer we have, or are setting up, a data stream with.
    // Keyed by authenticated peer ids (bounded by connections): a fast
    // non-keyed hash is fine.
    links: rustc_hash::FxHashMap<NodeId, Link>,
    next_link: LinkId,
    link_events: mpsc::Sender<LinkEvent>,
    transport: Box<dyn Transport>,
    listen_addrs: Vec<Multiaddr>,
    /// Peers with a live connection, and the address seen.
    connected: rustc_hash::FxHashMap<NodeId, Multiaddr>,
    ready: bool,
    ready_waiters: Vec<oneshot::Sender<()>>,
    /// A peer has sent us its view (Sync).
    synced: bool,
    joined_waiters: Vec<oneshot::Sender<()>>,
    listening_waiters: Vec<oneshot::Sender<()>>,
    /// Signalled when an outbox or subscription queue drains.
    space: Arc<Notify>,
    /// What the link readers counted (inbound-limit pauses, forged gossip).
    reader_counts: Arc<link::ReaderCounts>,
    next_reconnect: Instant,
    clock: WallClock,
    spawner: Spawner,
    /// Subscriptions over capacity; links are not read while non-empty.
    /// Full subscriptions holding the node back, with when each filled.
    blocked_subs: std::collections::BTreeMap<SubId, (Arc<SubQueue>, Instant)>,
    stats: Stats,
    last_drop_warning: Option<Instant>,
    shutting_down: bool,
    /// This host as peers compare it (empty: shared memory off).
    shm_host: Vec<u8>,
    /// Peers whose link ended during shutdown while they may not have read
    /// what we sent (for the shutdown report; a link that ended before
    /// leaves messages for that peer waiting in a new one, which counts).
    broken: std::collections::BTreeSet<NodeId>,
    /// Peers whose `Bye` we acked and whose connection is still open, with
    /// how long shutdown waits for them to close: dropping our connections
    /// at once could lose the `ByeAck` in flight, and the peer would count
    /// us as unconfirmed. Removed when the connection closes.
    lingering: std::collections::HashMap<NodeId, tokio::time::Instant>,
    /// Who this node admits (see [`crate::security`]).
    admission: Arc<crate::security::Admission>,
    /// Connected peers that passed the handshake (bounded by the
    /// connections: removed on disconnect): in a private mesh, control
    /// traffic (membership) from anyone else is ignored.
    admitted: std::collections::HashSet<NodeId>,
    /// Control streams of connected peers whose link handshake is not done
    /// yet (private meshes), read once it is (bounded per peer; dropped at
    /// refusal or disconnection).
    unadmitted_control: std::collections::HashMap<NodeId, Vec<quic::Stream>>,
    /// Peers refused in the handshake, to disconnect, and whether each was
    /// logged already (one warning per peer; bounded).
    refused: RefusedPeers,
    /// Control streams being read, per peer (bounded per peer so one peer
    /// cannot take every reader).
    control_inflight: rustc_hash::FxHashMap<NodeId, usize>,
    publishes: Arc<PublishQueue>,
    /// Control frames to send per peer, flushed as one control stream each.
    control_out: rustc_hash::FxHashMap<NodeId, Vec<u8>>,
    control_tx: mpsc::Sender<(NodeId, Result<Vec<Bytes>, String>)>,
    /// Bounds the control streams read at once (each holds at most
    /// `link::MAX_CONTROL_BYTES`).
    control_readers: Arc<tokio::sync::Semaphore>,
    /// Queue, request and stream calls from handles.
    work_bounded: Arc<queue::HandOff<Op>>,
    work_control: Arc<queue::HandOff<Op>>,
    work_scratch: Vec<Op>,
    work_scratch_bounded: Vec<Op>,
    /// A durable host's store (with a data dir).
    durable: Option<durable::Durable>,
}

/// The next batch the store has on disk (never, without a store).
async fn next_stored(rx: &mut Option<mpsc::UnboundedReceiver<u64>>) -> Option<u64> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Whatever ends the node task (shutdown, or its future dropped: a
/// simulated crash, a runtime going away), handles notice: publishing fails
/// and subscriptions end instead of waiting forever.
impl Drop for NodeTask {
    fn drop(&mut self) {
        self.work_close();
        self.publishes.close();
        for q in self.sub_queues.values() {
            q.close();
        }
    }
}

impl NodeTask {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Command>,
        mut unsubs: mpsc::UnboundedReceiver<SubId>,
        mut links: mpsc::Receiver<LinkEvent>,
        mut control: mpsc::Receiver<(NodeId, Result<Vec<Bytes>, String>)>,
        mut transport: mpsc::Receiver<quic::Event>,
    ) {
        let mut batch = Vec::with_capacity(COMMAND_BATCH);
        let mut publish_batch = Vec::new();
        let publishes = self.publishes.clone();
        let work_control = self.work_control.clone();
        let work_bounded = self.work_bounded.clone();
        let mut stored = self.durable.as_mut().and_then(|d| d.take_done());
        let shutdown_reply = loop {
            let congested = self.congested();
            if !congested {
                // Publishes first, all that are queued: they are the hot path.
                publishes.take(&mut publish_batch);
                self.publish_batch(&mut publish_batch);
            }
            self.blocked_subs.retain(|_, (q, _)| q.is_over());
            let reading = self.blocked_subs.is_empty();
            // Push back for a while; a subscription that stays full past the
            // slow-consumer timeout is cut loose (its messages are dropped
            // and counted) so one stalled consumer cannot stall the mesh, or
            // two nodes that publish from their handlers deadlock.
            let slow_deadline = self
                .blocked_subs
                .values()
                .map(|(_, since)| *since + self.config.slow_consumer_timeout)
                .min();
            self.work_ops();
            self.work_flush();
            let work_room = self.engine.work_room();
            let timer = tokio::time::Instant::from_std(self.poll_timeout());
            self.flush();
            // `biased`: a fixed order of checks keeps the simulator's runs
            // reproducible (tokio's default picks a random branch first).
            tokio::select! {
                biased;
                ev = transport.recv() => match ev {
                    Some(ev) => self.handle_transport(ev).await,
                    None => break None,
                },
                ev = links.recv(), if reading => {
                    if let Some(ev) = ev {
                        // Publishes queued before this event arrived go
                        // first: a message published before a peer's new
                        // subscription reached us must not be routed by it.
                        if !congested {
                            publishes.take(&mut publish_batch);
                            self.publish_batch(&mut publish_batch);
                        }
                        // So do the handles' calls: a stream consumer
                        // started before a host's declaration arrived must
                        // count that host as a later one.
                        self.work_ops();
                        self.handle_link_event(ev);
                    }
                }
                // Control frames are read even while data is pushed back.
                Some((peer, frames)) = control.recv() => self.handle_control(peer, frames).await,
                _ = publishes.wake_node.notified(), if !congested => {}
                _ = work_control.wake_node.notified() => {}
                _ = work_bounded.wake_node.notified(), if work_room => {}
                n = cmds.recv_many(&mut batch, COMMAND_BATCH) => {
                    if n == 0 {
                        break None;
                    }
                    let mut shutdown = None;
                    for cmd in batch.drain(..) {
                        if let Command::Shutdown(reply) = cmd {
                            shutdown = Some(reply);
                            break;
                        }
                        self.handle_command(cmd);
                    }
                    if shutdown.is_some() {
                        break shutdown;
                    }
                }
                Some(id) = unsubs.recv() => self.unsubscribe(id),
                Some(upto) = next_stored(&mut stored) => self.durable_done(upto),
                _ = tokio::time::sleep_until(timer) => {
                    self.handle_timeout().await;
                }
                _ = self.space.notified(), if congested || !reading => {}
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(slow_deadline.unwrap_or(far_future()))), if slow_deadline.is_some() => {
                    self.cut_slow_consumers();
                }
            }
            self.drive_membership().await;
            self.drive_gossip().await;
        };
        // What was published, acked or answered before shutdown goes out
        // before the goodbye.
        self.work_ops();
        self.work_flush();
        // A durable host's last batches reach the disk, and what they
        // confirm goes out with the rest.
        if let Some(rx) = stored.as_mut() {
            while self.engine.durable.as_ref().is_some_and(|d| d.waiting()) {
                match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                    Ok(Some(upto)) => self.durable_done(upto),
                    _ => {
                        tracing::error!("the store did not finish writing in time; unconfirmed sends will be sent again by their senders");
                        break;
                    }
                }
            }
        }
        publishes.close();
        publishes.take(&mut publish_batch);
        self.publish_batch(&mut publish_batch);
        let report = self.shutdown(&mut links, &mut transport).await;
        // The store's file and lock are released before the caller hears
        // of the shutdown (it may start a node on the same data dir).
        self.durable = None;
        if let Some(reply) = shutdown_reply {
            let _ = reply.send(report);
        }
    }

    /// A timer is due: the cores', the queues' and streams', reconnects,
    /// links that never came up, departed members.
    async fn handle_timeout(&mut self) {
        self.engine.handle_timeout(now());
        self.reconnect().await;
        self.expire_links();
        self.shed_overflowing_links();
        self.engine.forget_departed();
    }

    /// Subscriptions that stayed full past the slow-consumer timeout are
    /// cut loose: their messages are dropped (and counted) until they
    /// catch up.
    fn cut_slow_consumers(&mut self) {
        let now = now();
        let timeout = self.config.slow_consumer_timeout;
        let expired: Vec<SubId> = self
            .blocked_subs
            .iter()
            .filter(|(_, (_, since))| *since + timeout <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let Some((q, _)) = self.blocked_subs.remove(&id) else {
                continue;
            };
            // It may have drained just now: then it is not slow.
            if let Some(backlog) = q.set_lagging() {
                self.stats.slow_consumers += 1;
                tracing::warn!(
                    subscription = id,
                    backlog,
                    ?timeout,
                    "slow consumer: subscription stayed full; dropping its messages (counted in Subscription::dropped) until it catches up"
                );
            }
        }
    }

    /// When a timer of the engine is next due.
    fn poll_timeout(&mut self) -> Instant {
        [self.engine.poll_timeout(), Some(self.next_reconnect)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(far_future)
    }

    /// Takes what handles queued: control ops always, sends and requests
    /// while fewer than [`engine::work::MAX_PENDING`] wait for answers.
    fn work_ops(&mut self) {
        let mut ops = std::mem::take(&mut self.work_scratch);
        self.work_control.take(&mut ops);
        if self.engine.work_room() {
            let mut bounded = std::mem::take(&mut self.work_scratch_bounded);
            self.work_bounded.take(&mut bounded);
            ops.append(&mut bounded);
            self.work_scratch_bounded = bounded;
        }
        if !ops.is_empty() {
            // One clock read for the whole batch; control ops (acks,
            // answers) go before new sends and requests.
            let now = now();
            for op in ops.drain(..) {
                self.engine.handle_command(now, op);
            }
        }
        self.work_scratch = ops;
    }

    /// End of a turn: the engine's batched queue and stream output, and a
    /// durable host's changes to its store.
    fn work_flush(&mut self) {
        self.engine.work_flush(now());
        let batch = self.engine.durable_flush(now(), self.clock.unix_micros());
        if let (Some((seq, ops)), Some(d)) = (batch, self.durable.as_mut()) {
            d.backend.submit(seq, ops);
        }
    }

    /// The store has batches up to `upto` on disk: what they confirm goes
    /// out.
    fn durable_done(&mut self, upto: u64) {
        if let Some(d) = self.durable.as_mut() {
            d.backend.on_disk(upto);
        }
        self.engine.durable_done(now(), upto);
    }

    /// Shutdown: handles see the node gone.
    fn work_close(&mut self) {
        self.work_bounded.close();
        self.work_control.close();
        self.engine.work_close();
    }

    /// A durable host's store, loaded at start: its queues and streams
    /// come back, and it keeps its stream run (`epoch` if it had none), so
    /// its stored partitions are the same logs and readers resume where
    /// they were.
    fn restore_durable(
        &mut self,
        loaded: engine::durable::Loaded,
        epoch: u64,
    ) -> Result<(), StartError> {
        let stream_epoch = loaded.epoch.unwrap_or(epoch);
        self.engine.set_stream_epoch(stream_epoch);
        if let Some(d) = self.engine.durable.as_mut() {
            d.push(engine::durable::WriteOp::Epoch(stream_epoch));
        }
        self.engine.work.host.set_journal(true);
        self.engine.streams.host.set_gate(true);
        self.engine
            .restore(now(), self.clock.unix_micros(), loaded)
            .map_err(StartError::Restore)
    }

    /// Whether a link with a stream has more than `link_buffer` bytes
    /// waiting. Links still waiting for their stream do not count: one
    /// unreachable peer must not stall publishing to everyone else (their
    /// buffers are capped in `publish` instead).
    fn congested(&self) -> bool {
        self.links
            .values()
            .any(|l| l.reader.is_some() && l.outbox.pending() > self.config.link_buffer)
    }

    /// Moves each link's scratch buffer into its outbox, and sends pending
    /// control frames.
    fn flush(&mut self) {
        for (peer, bytes) in self.control_out.iter_mut() {
            let n = bytes.len();
            if n == 0 {
                continue;
            }
            if self.transport.send_control(*peer, std::mem::take(bytes)) {
                self.engine.counters.quic_sent += n as u64;
            } else {
                self.engine.counters.control_sends += 1;
                tracing::debug!(%peer, "too many control sends in flight; dropped one");
            }
        }
        self.control_out.retain(|_, b| !b.is_empty());
        let cap = self.config.link_buffer.saturating_mul(OUTBOX_CAP_FACTOR);
        self.create_links();
        let mut over = false;
        let (links, next, space) = (&mut self.links, &mut self.next_link, &self.space);
        let (mut quic, mut ring) = (0, 0);
        self.engine.poll_transmit(|peer, bytes| {
            let link = io_entry(links, next, space, *peer);
            if !bytes.is_empty() {
                if link.shm.writes_ring() {
                    ring += bytes.len();
                } else {
                    quic += bytes.len();
                }
                over |= link.outbox.push(bytes) > cap;
            }
            link.reader.is_none().then(|| link.outbox.pending())
        });
        self.engine.counters.sent_bytes(false, quic);
        self.engine.counters.sent_bytes(true, ring);
        if over {
            self.shed_overflowing_links();
        }
    }

    fn our_addrs(&self) -> Vec<Vec<u8>> {
        self.listen_addrs.iter().map(|a| a.to_vec()).collect()
    }

    /// Our `Hello` for a new link, with a fresh nonce: random from the OS,
    /// or in the simulator derived from this node's id, incarnation and
    /// link number (unique without drawing from the node's seeded
    /// generator, so fault schedules stay as they were).
    fn hello(&mut self) -> link::Handshake {
        let mut nonce = [0u8; crate::security::NONCE_LEN];
        if self.config.replayable() {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            h.update(self.engine.local.to_bytes());
            h.update(self.engine.membership.incarnation().to_be_bytes());
            h.update(self.next_link.to_be_bytes());
            nonce.copy_from_slice(&h.finalize());
        } else {
            rand::thread_rng().fill_bytes(&mut nonce);
        }
        let addrs = self.our_addrs();
        let full = Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            features: if self.shm_host.is_empty() {
                0
            } else {
                FEATURE_SHM
            },
            incarnation: self.engine.membership.incarnation(),
            addrs: addrs.iter().map(|a| Raw(a)).collect(),
            host: Raw(&self.shm_host),
            uid: shm::uid(),
            nonce,
        };
        let mut buf = Vec::new();
        let details = if self.admission.is_private() {
            // An outsider learns nothing of us from the handshake: the
            // first Hello is bare, the full one follows our proof and goes
            // out only once the peer's proof checked.
            wire::encode(
                &mut buf,
                &Frame::Hello(Hello {
                    features: 0,
                    incarnation: 0,
                    addrs: Vec::new(),
                    host: Raw(&[]),
                    uid: 0,
                    ..full.clone()
                }),
            );
            let mut details = Vec::new();
            wire::encode(&mut details, &Frame::Hello(full));
            Some(details)
        } else {
            wire::encode(&mut buf, &Frame::Hello(full));
            None
        };
        link::Handshake {
            hello: buf,
            details,
            nonce,
            local: self.engine.local,
            admission: self.admission.clone(),
        }
    }

    /// The I/O half of `peer`'s link, created (waiting for a stream)
    /// with its engine half if there is none.
    fn link_mut(&mut self, peer: NodeId) -> &mut Link {
        self.engine.peers.entry(peer);
        self.create_links();
        io_entry(&mut self.links, &mut self.next_link, &self.space, peer)
    }

    /// The I/O halves of the links the engine added (waiting for a
    /// stream), in the order it added them.
    fn create_links(&mut self) {
        for peer in self.engine.peers.take_created() {
            io_entry(&mut self.links, &mut self.next_link, &self.space, peer);
        }
    }

    /// Ends `peer`'s link: what is encoded for it is still written, and
    /// its protocol half (how it ended) comes back, if it had a link.
    fn remove_link(&mut self, peer: &NodeId) -> Option<Peer> {
        // Every link the engine added has its number, even one that ends
        // before it is flushed (numbers stay those of the order links came).
        self.create_links();
        let mut rest = self.engine.peers.remove(peer);
        if let Some(mut l) = self.links.remove(peer) {
            let mut none = Vec::new();
            l.close(rest.as_mut().map_or(&mut none, |p| &mut p.scratch));
        }
        rest
    }

    fn handle_link_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Up { link, peer, hello } => {
                if self.links.get(&peer).is_none_or(|l| l.id != link) {
                    return;
                }
                self.admitted.insert(peer);
                for stream in self.unadmitted_control.remove(&peer).unwrap_or_default() {
                    self.read_control(peer, stream);
                }
                let shm_ok = self.shm_eligible(peer, &hello);
                if shm_ok && self.engine.local < peer {
                    self.offer_shm(peer, link);
                }
                let PeerHello {
                    incarnation, addrs, ..
                } = hello;
                if self.admission.is_private() {
                    // The proof checked: our view of the mesh goes first,
                    // before anything queued for the peer meanwhile.
                    let mut sync = Vec::new();
                    self.engine.encode_sync(&mut sync);
                    if let Some(l) = self.links.get(&peer) {
                        self.engine
                            .counters
                            .sent_bytes(l.shm.writes_ring(), sync.len());
                        l.outbox.release_front(&mut sync);
                    }
                }
                let Some(l) = self.links.get_mut(&peer) else {
                    return;
                };
                l.shm_ok = shm_ok;
                self.engine.links_generation += 1;
                self.engine.relink_done(&peer);
                tracing::debug!(%peer, incarnation, "link up");
                self.engine.handle_link_up(now(), peer, addrs);
            }
            LinkEvent::Frames { link, frames } => {
                let Some(peer) = self
                    .links
                    .iter()
                    .find(|(_, l)| l.id == link)
                    .map(|(p, _)| *p)
                else {
                    return;
                };
                if let Some(l) = self.links.get(&peer) {
                    self.engine
                        .counters
                        .received_bytes(l.shm.reads_ring(), &frames);
                }
                for frame in frames {
                    if let Err(e) = self.handle_frame(peer, &frame) {
                        tracing::warn!(%peer, error = %e, "closing link: bad frame from peer");
                        self.stats.links_refused += 1;
                        self.engine.counters.malformed += 1;
                        self.remove_link(&peer);
                        self.engine.membership.handle_link_down(now(), peer);
                        self.engine.links_generation += 1;
                        self.engine.work_link_down(now(), peer);
                        self.schedule_relink(peer);
                        break;
                    }
                }
                // Messages before a bad frame were good: deliver them.
                self.flush_deliveries(false);
            }
            LinkEvent::Refused { link, peer, reason } => {
                if self.links.get(&peer).is_none_or(|l| l.id != link) {
                    return;
                }
                self.stats.auth_refused += 1;
                self.admitted.remove(&peer);
                let held = self.unadmitted_control.remove(&peer).map_or(0, |h| h.len());
                self.stats.control_refused += held as u64;
                if self.refused.note(peer) {
                    tracing::warn!(%peer, %reason, "refused a peer: not admitted to this private mesh");
                } else {
                    tracing::debug!(%peer, %reason, "refused a peer again");
                }
                self.remove_link(&peer);
                self.engine.relink_done(&peer);
                self.engine.links_generation += 1;
                self.engine.work_link_down(now(), peer);
            }
            LinkEvent::Closed { link, peer, error } => {
                if self.links.get(&peer).is_none_or(|l| l.id != link) {
                    return;
                }
                let was_up = self.engine.peers.is_up(&peer);
                match &error {
                    Some(e) => {
                        tracing::warn!(%peer, error = %e, "link closed");
                        metrics::count_link_error(&mut self.engine.counters, e);
                    }
                    None => tracing::debug!(%peer, "link closed by peer"),
                }
                if error.is_some() && !was_up {
                    self.stats.links_refused += 1;
                }
                let leaving = match self.remove_link(&peer) {
                    Some(l) => {
                        if self.shutting_down && l.has_data && !l.bye_acked && !l.leaving {
                            self.broken.insert(peer);
                        }
                        l.leaving
                    }
                    None => false,
                };
                if was_up {
                    self.engine.membership.handle_link_down(now(), peer);
                }
                self.engine.links_generation += 1;
                self.engine.work_link_down(now(), peer);
                if !leaving {
                    self.schedule_relink(peer);
                }
            }
        }
    }

    /// A data-stream frame from `peer`: the engine's, or (shared memory,
    /// work queues, streams) still this task's.
    fn handle_frame(&mut self, peer: NodeId, body: &Bytes) -> Result<(), WireError> {
        let rest = self.engine.handle_frame(now(), peer, body);
        self.engine_events();
        match rest? {
            None => {}
            Some(Frame::ShmOffer {
                nonce,
                to_you,
                from_you,
            }) => self.open_shm(peer, nonce, to_you, from_you)?,
            Some(Frame::ShmRefuse { reason }) => {
                let link = self
                    .links
                    .get_mut(&peer)
                    .filter(|l| l.shm == ShmState::Offered)
                    .ok_or(WireError::Unexpected("ShmRefuse"))?;
                tracing::info!(%peer, reason, "peer could not open shared-memory rings; link stays on QUIC");
                link.shm = ShmState::Off;
                link.shm_tx = None;
                link.shm_rx.lock().unwrap_or_else(|e| e.into_inner()).take();
            }
            Some(Frame::ShmSwitch) => self.shm_switch(peer)?,
            Some(f) => unreachable!("the engine handles {} frames", wire::frame_name(&f)),
        }
        Ok(())
    }

    /// Acts on what the engine said: reliable subscriptions hear of lost
    /// messages, waiters of a sync, a leaving peer's connection lingers.
    fn engine_events(&mut self) {
        while let Some(ev) = self.engine.poll_event() {
            match ev {
                engine::Event::Lagged { publisher, missed } => {
                    for id in &self.engine.reliable_subs {
                        if let Some(q) = self.sub_queues.get(id) {
                            q.push_lagged(crate::node::Lagged { publisher, missed });
                        }
                    }
                }
                engine::Event::Synced => {
                    self.ready = true;
                    self.synced = true;
                    for w in self
                        .ready_waiters
                        .drain(..)
                        .chain(self.joined_waiters.drain(..))
                    {
                        let _ = w.send(());
                    }
                }
                engine::Event::Leaving(peer) => {
                    // Our own Bye went out before this ack if we are
                    // shutting down: the peer's ack of it then proves
                    // nothing about this one, and the peer may wait for us
                    // to close first.
                    let linger = if self.shutting_down {
                        BYE_LINGER
                    } else {
                        BYE_TIMEOUT
                    };
                    self.lingering
                        .insert(peer, tokio::time::Instant::now() + linger);
                }
            }
        }
    }

    /// Pushes decoded messages to their subscriptions, one lock per run of
    /// messages for the same subscription.
    fn flush_deliveries(&mut self, local: bool) {
        let mut pending = self.engine.take_deliveries();
        let mut cut_off = Vec::new();
        let mut iter = pending.drain(..).peekable();
        while let Some((id, first)) = iter.next() {
            // The run of messages for one subscription goes straight from
            // the pending list into its queue: messages are a few hundred
            // bytes, and each intermediate copy showed in the profile.
            let run = std::iter::once(first).chain(std::iter::from_fn(|| {
                iter.next_if(|(next, _)| *next == id).map(|(_, m)| m)
            }));
            let Some(q) = self.sub_queues.get(&id) else {
                self.engine.counters.no_subscriber += run.count() as u64;
                continue;
            };
            {
                let pushed = q.push(run, local);
                self.engine.counters.delivered += pushed.delivered;
                self.engine.counters.lagged_drops += pushed.lagged;
                self.engine.counters.subscription_evicted += pushed.evicted;
                self.engine.counters.subscription_cut += pushed.cut;
                if pushed.cut_off {
                    cut_off.push(id);
                }
                let (over, dropped) = (pushed.over, pushed.capped);
                if over {
                    self.blocked_subs
                        .entry(id)
                        .or_insert_with(|| (q.clone(), now()));
                }
                // Drops of a subscription already cut loose were reported
                // when it was; these are the local cap's.
                if dropped > 0 {
                    self.stats.dropped_slow_subscriber += dropped;
                    // At most one warning a second: this can recur per batch.
                    let now = now();
                    if self
                        .last_drop_warning
                        .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
                    {
                        continue;
                    }
                    self.last_drop_warning = Some(now);
                    tracing::warn!(
                        subscription = id,
                        dropped,
                        total = self.stats.dropped_slow_subscriber,
                        "subscription at twice its capacity: dropped local messages"
                    );
                }
            }
        }
        drop(iter);
        self.engine.return_deliveries(pending);
        for id in cut_off {
            tracing::warn!(
                subscription = id,
                "subscription full: disconnected it (its overflow policy is Disconnect)"
            );
            self.unsubscribe(id);
        }
    }

    fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe {
                pattern,
                reliable,
                options,
                reply,
            } => {
                let Some(id) = self.engine.subscribe(pattern, reliable) else {
                    let _ = reply.send(Err(crate::node::SubscribeError::TooManyPatterns));
                    return;
                };
                let queue = Arc::new(SubQueue::new(
                    options.buffer.unwrap_or(self.config.subscription_capacity),
                    options.overflow,
                    self.space.clone(),
                ));
                self.sub_queues.insert(id, queue.clone());
                if reply.send(Ok((id, queue))).is_err() {
                    self.unsubscribe(id);
                }
            }
            Command::ListenAddrs(reply) => {
                let addrs = self
                    .listen_addrs
                    .iter()
                    .map(|a| a.clone().with(Protocol::P2p(self.engine.local)))
                    .collect();
                let _ = reply.send(addrs);
            }
            Command::Peers(reply) => {
                let peers = self
                    .engine
                    .membership
                    .members()
                    .map(|m| PeerInfo {
                        id: m.node,
                        state: m.state,
                        linked: self.engine.peers.is_up(&m.node),
                        shm: self
                            .links
                            .get(&m.node)
                            .is_some_and(|l| l.shm == ShmState::On)
                            && self.engine.peers.is_up(&m.node),
                        addrs: m
                            .addrs
                            .iter()
                            .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
                            .collect(),
                    })
                    .collect();
                let _ = reply.send(peers);
            }
            Command::Ready(reply) => {
                if self.ready {
                    let _ = reply.send(());
                } else {
                    self.ready_waiters.retain(|w| !w.is_closed());
                    self.ready_waiters.push(reply);
                }
            }
            Command::Listening(reply) => {
                if self.listen_addrs.is_empty() {
                    self.listening_waiters.push(reply);
                } else {
                    let _ = reply.send(());
                }
            }
            Command::Joined(reply) => {
                if self.synced {
                    let _ = reply.send(());
                } else {
                    self.joined_waiters.retain(|w| !w.is_closed());
                    self.joined_waiters.push(reply);
                }
            }
            Command::Route { topic, reply } => {
                let _ = reply.send(self.engine.route(&topic).to_vec());
            }
            Command::Metrics(reply) => {
                let _ = reply.send(self.metrics());
            }
            Command::Shutdown(_) => unreachable!("handled by the loop"),
        }
    }

    fn unsubscribe(&mut self, id: SubId) {
        if let Some(q) = self.sub_queues.remove(&id) {
            q.close();
        }
        // A dropped subscription holds nothing back any more.
        self.blocked_subs.remove(&id);
        self.engine.unsubscribe(id);
    }

    fn publish_batch(&mut self, batch: &mut Vec<PublishCmd>) {
        if batch.is_empty() {
            return;
        }
        // One clock read per batch: messages taken together share a time.
        let timestamp = self.clock.unix_micros();
        self.engine.counters.published += batch.len() as u64;
        let now = now();
        for PublishCmd {
            topic,
            headers,
            payload,
        } in batch.drain(..)
        {
            self.engine.publish(now, topic, headers, payload, timestamp);
        }
        self.flush_deliveries(true);
        self.engine.gossip_out();
    }

    async fn drive_gossip(&mut self) {
        self.engine.gossip_events();
        self.flush_deliveries(false);
        self.engine.gossip_out();
        for peer in std::mem::take(&mut self.engine.gossip_dial) {
            let addrs = self.addrs_of(&peer);
            self.transport.dial_peer(peer, addrs).await;
        }
    }
}
