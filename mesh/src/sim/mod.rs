//! Deterministic simulation: many mesh nodes in one process, on a simulated
//! network with partitions and faults, in virtual time.
//!
//! Each simulated node is a real [`Node`], the very type a service embeds:
//! the same runtime and protocol cores run over simulated links instead of
//! QUIC, on a single-threaded executor whose clock only moves when every
//! task is waiting. So a service's own async code runs unchanged on sim
//! nodes, minutes of mesh time take milliseconds, and the same seed gives
//! the same run, event for event.
//!
//! Behind the `sim` feature, which brings tokio's `test-util` (the
//! paused clock): enable it in your `[dev-dependencies]`.
//!
//! ```
//! use std::time::Duration;
//! use futures::StreamExt;
//! use mesh::sim::Sim;
//!
//! let mut sim = Sim::builder().seed(7).build();
//! let a = sim.node("a");
//! let b = sim.node("b");
//! let c = sim.node("c");
//! sim.run_until(|s| s.converged(), Duration::from_secs(30)).expect("mesh forms");
//!
//! let mut sub = sim.block_on(c.subscribe("orders.>")).unwrap();
//! sim.run_until(|s| s.routed("a", "orders.x"), Duration::from_secs(5)).unwrap();
//! // A long partition: the connections time out and each side declares
//! // the other down, so this message has nowhere to go.
//! sim.partition(&[&["a", "b"], &["c"]]);
//! sim.run_for(Duration::from_secs(20));
//! sim.block_on(a.publish("orders.x", "during the partition")).unwrap();
//! sim.run_for(Duration::from_secs(20));
//! sim.heal();
//! sim.run_until(|s| s.converged(), Duration::from_secs(60)).expect("mesh heals");
//! sim.block_on(b.publish("orders.x", "after the heal")).unwrap();
//! let got = sim.block_on_for(Duration::from_secs(5), sub.next()).expect("delivered");
//! assert_eq!(got.unwrap().payload, "after the heal");
//! ```
//!
//! Durable hosts: a node given a data dir ([`Builder::data_dir`]) writes
//! its hosted queues and streams to a simulated disk that survives
//! [`Sim::crash`], so a service can be tested for "nothing confirmed is
//! lost" across crashes of its hosts.
//!
//! Faults: [`Sim::partition`], [`Sim::cut`] (one way), [`Sim::isolate`],
//! [`Sim::heal`], [`Sim::set_link`] (latency and loss of one path),
//! [`Sim::crash`] and [`Sim::restart`], [`Sim::pause`] and [`Sim::resume`].
//! The network model is in `net.rs`: links behave like QUIC connections
//! (reliable ordered streams, lossy control messages, idle timeouts).

mod check;
pub(crate) mod disk;
mod gate;
mod net;
pub mod overlay;
mod queue_check;
mod stream_check;

use std::{collections::BTreeSet, future::Future, ops::Range, time::Duration};

use libp2p::identity::Keypair;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use tokio::sync::mpsc;

pub use check::{Checker, PublisherReport, Report, SubscriberReport};
pub(crate) use gate::Gate;
pub(crate) use net::Endpoint;
pub use net::{LinkFaults, NetStats};
pub use queue_check::{QueueChecker, QueueReport};
pub use stream_check::{StreamChecker, StreamReport};

use crate::{
    core::NodeId,
    node::{Builder, Node, PeerState},
    runtime::{env, Environment, WallClock},
};
use net::{HostId, NetHandle};

/// Unix time (µs) at which every simulation starts: 2026-01-01T00:00:00Z.
const SIM_EPOCH_MICROS: u64 = 1_767_225_600_000_000;

/// A simulated node's environment: the simulated network, its gate, a
/// virtual wall clock, a seed and its simulated disk.
#[derive(Clone)]
pub(crate) struct Hooks {
    net: NetHandle,
    host: HostId,
    gate: std::sync::Arc<Gate>,
    seed: u64,
    clock: WallClock,
    /// The node's simulated disk (used when it has a data dir).
    pub(crate) disk: std::sync::Arc<std::sync::Mutex<disk::MemDisk>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks").field("host", &self.host).finish()
    }
}

impl Environment for Hooks {
    fn attach(
        &self,
        bootstrap: &[libp2p::Multiaddr],
    ) -> (
        Box<dyn env::Transport>,
        mpsc::Receiver<mesh_transports::quic::Event>,
    ) {
        let (endpoint, events) = self.net.attach(self.host, bootstrap);
        (Box::new(endpoint), events)
    }

    fn spawn(&self) -> std::sync::Arc<dyn env::Spawn> {
        std::sync::Arc::new(GateSpawn(self.gate.clone()))
    }

    fn wall_clock(&self) -> WallClock {
        self.clock
    }

    fn seed(&self) -> u64 {
        self.seed
    }

    fn open_store(
        &self,
    ) -> (
        Box<dyn crate::runtime::durable::Backend>,
        mpsc::UnboundedReceiver<u64>,
        crate::engine::durable::Loaded,
    ) {
        disk::MemBackend::open(self.disk.clone())
    }
}

/// Spawns a simulated node's tasks through its gate (which pauses or
/// kills them all), each logging inside the node's span (`node=NAME`).
#[derive(Debug)]
struct GateSpawn(std::sync::Arc<Gate>);

impl env::Spawn for GateSpawn {
    fn spawn(&self, fut: futures::future::BoxFuture<'static, ()>) -> tokio::task::AbortHandle {
        self.0.spawn(tracing::Instrument::in_current_span(fut))
    }
}

/// The simulated network carries a simulated node's links. Its calls take
/// effect at once (they schedule events on the network).
impl env::Transport for Endpoint {
    fn dial_peer(
        &self,
        peer: NodeId,
        addrs: Vec<libp2p::Multiaddr>,
    ) -> futures::future::BoxFuture<'_, ()> {
        Endpoint::dial_peer(self, peer, addrs);
        Box::pin(std::future::ready(()))
    }

    fn send_control(&self, peer: NodeId, bytes: Vec<u8>) -> bool {
        Endpoint::send_control(self, peer, bytes)
    }

    fn fresh_stream(&self, peer: NodeId) -> futures::future::BoxFuture<'_, ()> {
        Endpoint::fresh_stream(self, peer);
        Box::pin(std::future::ready(()))
    }

    fn open_stream(&self, peer: NodeId) -> futures::future::BoxFuture<'_, ()> {
        Endpoint::open_stream(self, peer);
        Box::pin(std::future::ready(()))
    }

    fn disconnect(&self, peer: NodeId) -> futures::future::BoxFuture<'_, ()> {
        Endpoint::disconnect(self, peer);
        Box::pin(std::future::ready(()))
    }

    fn shutdown(&self) -> futures::future::BoxFuture<'_, ()> {
        Endpoint::shutdown(self);
        Box::pin(std::future::ready(()))
    }
}

/// The simulation did not reach what it was run until.
#[derive(Debug, Clone, thiserror::Error)]
#[error("simulation (seed {seed}) did not reach the condition within {limit:?} of virtual time")]
pub struct SimTimeout {
    /// The simulation's seed.
    pub seed: u64,
    /// The virtual time it ran for.
    pub limit: Duration,
}

/// Configures a [`Sim`]: `Sim::builder().seed(42).latency(..).loss(0.01).build()`.
#[derive(Debug, Clone)]
pub struct SimBuilder {
    seed: u64,
    link: LinkFaults,
    duplicate: f64,
    reorder: bool,
    idle_timeout: Duration,
    tick: Duration,
    record_trace: bool,
}

impl Default for SimBuilder {
    fn default() -> Self {
        Self {
            seed: 0,
            link: LinkFaults::default(),
            duplicate: 0.0,
            reorder: true,
            idle_timeout: Duration::from_secs(10),
            tick: Duration::from_millis(1),
            record_trace: false,
        }
    }
}

impl SimBuilder {
    /// The seed of every random choice: latencies, losses, node identities,
    /// protocol randomness. Default 0.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// One-way latency of every path, drawn uniformly per packet. Default
    /// 0.5 to 2 ms.
    pub fn latency(mut self, range: Range<Duration>) -> Self {
        self.link.latency = range;
        self
    }

    /// Probability that a packet is lost. Streams retransmit (delay);
    /// control messages are gone. Default 0.
    pub fn loss(mut self, p: f64) -> Self {
        self.link.loss = p;
        self
    }

    /// Probability that a control message arrives twice. Default 0.
    pub fn duplicate(mut self, p: f64) -> Self {
        self.duplicate = p;
        self
    }

    /// Whether control messages may overtake each other (streams stay
    /// ordered either way). Default true.
    pub fn reorder(mut self, on: bool) -> Self {
        self.reorder = on;
        self
    }

    /// How long a connection that hears nothing stays open (QUIC's idle
    /// timeout). Default 10 s.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// How far [`Sim::step`] moves the clock. Default 1 ms.
    pub fn tick(mut self, tick: Duration) -> Self {
        self.tick = tick.max(Duration::from_micros(1));
        self
    }

    /// Keep a readable line per network event ([`Sim::trace_lines`]), on top
    /// of the trace hash that is always kept.
    pub fn record_trace(mut self, on: bool) -> Self {
        self.record_trace = on;
        self
    }

    /// Builds the simulation.
    pub fn build(self) -> Sim {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a current-thread runtime builds");
        let mut rng = SmallRng::seed_from_u64(self.seed);
        let (net, origin) = {
            let _guard = rt.enter();
            let net = NetHandle::new(
                SmallRng::seed_from_u64(rng.gen()),
                self.link,
                self.duplicate,
                self.reorder,
                self.idle_timeout,
                self.record_trace,
            );
            // QUIC's idle timeout, checked a few times per timeout.
            let period = (self.idle_timeout / 8).max(Duration::from_millis(10));
            let watch = net.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    watch.check_idle();
                }
            });
            (net, tokio::time::Instant::now())
        };
        Sim {
            rt,
            net,
            hosts: Vec::new(),
            seed: self.seed,
            rng,
            origin,
            tick: self.tick,
        }
    }
}

struct SimHost {
    name: String,
    id: HostId,
    keypair: Keypair,
    builder: Builder,
    node: Option<Node>,
    gate: std::sync::Arc<Gate>,
    /// Survives crashes: a node with a data dir keeps its durable state
    /// here.
    disk: std::sync::Arc<std::sync::Mutex<disk::MemDisk>>,
}

/// A deterministic simulated mesh. See the [module docs](self).
pub struct Sim {
    rt: tokio::runtime::Runtime,
    net: NetHandle,
    hosts: Vec<SimHost>,
    seed: u64,
    rng: SmallRng,
    origin: tokio::time::Instant,
    tick: Duration,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("seed", &self.seed)
            .field("now", &self.now())
            .field("nodes", &self.hosts.len())
            .finish()
    }
}

/// A task running in the simulation; see [`Sim::spawn`].
#[derive(Debug)]
pub struct SimTask<T> {
    rx: tokio::sync::oneshot::Receiver<T>,
    done: Option<T>,
}

impl<T> SimTask<T> {
    /// Its output, once it has finished; `None` before (or if it was killed
    /// by a crash of its node).
    pub fn output(&mut self) -> Option<&T> {
        if self.done.is_none() {
            self.done = self.rx.try_recv().ok();
        }
        self.done.as_ref()
    }

    /// Takes its output, if it has finished.
    pub fn take(&mut self) -> Option<T> {
        self.output();
        self.done.take()
    }
}

impl Sim {
    /// Starts configuring a simulation.
    pub fn builder() -> SimBuilder {
        SimBuilder::default()
    }

    /// A simulation with the default network (0.5 to 2 ms, no faults).
    pub fn new(seed: u64) -> Self {
        Self::builder().seed(seed).build()
    }

    /// The seed this run replays from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Virtual time since the simulation started.
    pub fn now(&self) -> Duration {
        let _guard = self.rt.enter();
        self.origin.elapsed()
    }

    /// Starts a node named `name` with the default configuration and
    /// returns it. Nodes find each other as over mDNS.
    pub fn node(&mut self, name: &str) -> Node {
        self.node_with(name, Node::builder())
    }

    /// Starts a node named `name` configured by `builder` (failure
    /// detection, capacities, ...; its addresses, mDNS and identity are the
    /// simulator's).
    pub fn node_with(&mut self, name: &str, builder: Builder) -> Node {
        assert!(
            self.host(name).is_none(),
            "a simulated node named {name:?} exists already"
        );
        // Identities come from the seed, so peer ids (and the order of
        // everything keyed by them) replay too.
        let mut secret: [u8; 32] = self.rng.gen();
        let keypair = Keypair::ed25519_from_bytes(&mut secret).expect("32 bytes make a key");
        let id = self.net.add_host(keypair.public().to_peer_id());
        self.hosts.push(SimHost {
            name: name.to_owned(),
            id,
            keypair,
            builder,
            node: None,
            gate: Default::default(),
            disk: Default::default(),
        });
        self.start(self.hosts.len() - 1)
    }

    fn start(&mut self, index: usize) -> Node {
        let seed = self.rng.gen();
        let h = &mut self.hosts[index];
        h.gate = Default::default();
        let hooks = Hooks {
            net: self.net.clone(),
            host: h.id,
            gate: h.gate.clone(),
            seed,
            clock: WallClock::Virtual {
                unix_micros_at_origin: SIM_EPOCH_MICROS,
                origin: self.origin,
            },
            disk: h.disk.clone(),
        };
        let builder = h
            .builder
            .clone()
            .environment(std::sync::Arc::new(hooks))
            .identity(h.keypair.clone());
        // Its tasks carry this span, so each log line names the node.
        let span = tracing::info_span!("sim", node = %h.name);
        let node = self
            .rt
            .block_on(tracing::Instrument::instrument(builder.start(), span))
            .expect("a simulated node starts");
        self.hosts[index].node = Some(node.clone());
        node
    }

    fn host(&self, name: &str) -> Option<usize> {
        self.hosts.iter().position(|h| h.name == name)
    }

    fn index(&self, name: &str) -> usize {
        self.host(name)
            .unwrap_or_else(|| panic!("no simulated node named {name:?}"))
    }

    /// The running node named `name` (`None` while crashed).
    pub fn get(&self, name: &str) -> Option<Node> {
        self.hosts[self.index(name)].node.clone()
    }

    /// The names of all nodes, in the order they were added.
    pub fn names(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.name.clone()).collect()
    }

    /// The peer id of node `name` (stable across restarts).
    pub fn peer_id(&self, name: &str) -> NodeId {
        self.hosts[self.index(name)].keypair.public().to_peer_id()
    }

    /// The name of the node with peer id `peer`.
    pub fn name_of(&self, peer: &NodeId) -> Option<&str> {
        self.hosts
            .iter()
            .find(|h| h.keypair.public().to_peer_id() == *peer)
            .map(|h| h.name.as_str())
    }

    /// Runs `fut` as a task in the simulation (not tied to any node).
    pub fn spawn<F>(&self, fut: F) -> SimTask<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        SimTask { rx, done: None }
    }

    /// Runs `fut` as a task of node `name`: it stops while the node is
    /// paused and dies when the node crashes, as a thread of that process
    /// would.
    pub fn spawn_on<F>(&self, name: &str, fut: F) -> SimTask<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let gate = self.hosts[self.index(name)].gate.clone();
        let _guard = self.rt.enter();
        gate.spawn(async move {
            let _ = tx.send(fut.await);
        });
        SimTask { rx, done: None }
    }

    /// Runs the simulation until `fut` completes and returns its output.
    /// Virtual time moves as needed.
    ///
    /// # Panics
    ///
    /// If it has not completed after an hour of virtual time (it never
    /// will: use [`Sim::block_on_for`] to wait with a limit).
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        let seed = self.seed;
        self.block_on_for(Duration::from_secs(3600), fut)
            .unwrap_or_else(|e| panic!("{e} (seed {seed})"))
    }

    /// Runs the simulation until `fut` completes, for at most `limit` of
    /// virtual time.
    pub fn block_on_for<F: Future>(
        &self,
        limit: Duration,
        fut: F,
    ) -> Result<F::Output, SimTimeout> {
        let seed = self.seed;
        self.rt
            .block_on(async { tokio::time::timeout(limit, fut).await })
            .map_err(|_| SimTimeout { seed, limit })
    }

    /// Moves virtual time one tick (1 ms unless configured) and runs
    /// everything due by then.
    pub fn step(&mut self) {
        self.run_for(self.tick);
    }

    /// Runs the simulation for `duration` of virtual time.
    pub fn run_for(&mut self, duration: Duration) {
        self.rt
            .block_on(async move { tokio::time::sleep(duration).await });
    }

    /// Runs until `done` holds, checking after every tick; fails after
    /// `limit` of virtual time. Returns the virtual time it took.
    pub fn run_until(
        &mut self,
        mut done: impl FnMut(&Sim) -> bool,
        limit: Duration,
    ) -> Result<Duration, SimTimeout> {
        let start = self.now();
        loop {
            if done(self) {
                return Ok(self.now() - start);
            }
            if self.now() - start >= limit {
                return Err(SimTimeout {
                    seed: self.seed,
                    limit,
                });
            }
            self.step();
        }
    }

    // --- faults ---

    /// Splits the network into `groups`: nodes in different groups cannot
    /// reach each other (both ways); nodes in no group are cut off from
    /// every group. Replaces any earlier partition.
    pub fn partition(&mut self, groups: &[&[&str]]) {
        let mut group_of = vec![None; self.hosts.len()];
        for (g, names) in groups.iter().enumerate() {
            for name in names.iter() {
                group_of[self.hosts[self.index(name)].id] = Some(g);
            }
        }
        let mut blocked = BTreeSet::new();
        for a in 0..self.hosts.len() {
            for b in 0..self.hosts.len() {
                if a != b && (group_of[a].is_none() || group_of[a] != group_of[b]) {
                    blocked.insert((a, b));
                }
            }
        }
        self.set_blocked(blocked);
    }

    /// Cuts the path from `from` to `to` only (a one-way partition); adds to
    /// the current cuts.
    pub fn cut(&mut self, from: &str, to: &str) {
        let mut blocked = self.net.blocked();
        blocked.insert((
            self.hosts[self.index(from)].id,
            self.hosts[self.index(to)].id,
        ));
        self.set_blocked(blocked);
    }

    /// Cuts `name` off from every other node, both ways; adds to the
    /// current cuts.
    pub fn isolate(&mut self, name: &str) {
        let me = self.hosts[self.index(name)].id;
        let mut blocked = self.net.blocked();
        for h in &self.hosts {
            if h.id != me {
                blocked.insert((me, h.id));
                blocked.insert((h.id, me));
            }
        }
        self.set_blocked(blocked);
    }

    /// Removes every partition and cut.
    pub fn heal(&mut self) {
        self.set_blocked(BTreeSet::new());
    }

    fn set_blocked(&mut self, blocked: BTreeSet<(HostId, HostId)>) {
        let _guard = self.rt.enter();
        self.net.set_blocked(blocked);
    }

    /// Sets the latency and loss of the path from `from` to `to` (`None`:
    /// back to the simulation's defaults).
    pub fn set_link(&mut self, from: &str, to: &str, faults: Option<LinkFaults>) {
        let (a, b) = (
            self.hosts[self.index(from)].id,
            self.hosts[self.index(to)].id,
        );
        self.net.set_link(a, b, faults);
    }

    /// Crashes node `name`: its tasks stop at once, its memory is lost, it
    /// sends nothing more (peers notice by their failure detection). A
    /// node built with a data dir ([`Builder::data_dir`]; the path is not
    /// used) keeps its simulated disk: on restart it is a durable host
    /// again, with every queue message, stream record and committed offset
    /// it had confirmed.
    /// Returns false if it was not running.
    pub fn crash(&mut self, name: &str) -> bool {
        let i = self.index(name);
        let Some(_node) = self.hosts[i].node.take() else {
            return false;
        };
        let _guard = self.rt.enter();
        self.net.crash(self.hosts[i].id);
        self.hosts[i].gate.kill();
        // Let the runtime drop the killed tasks now (no time passes), so
        // the crash is complete when this returns.
        self.rt.block_on(async {
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        });
        true
    }

    /// Starts a crashed (or shut down) node again, with the same identity
    /// and configuration and empty memory, and returns the new node.
    ///
    /// # Panics
    ///
    /// If the node is running.
    pub fn restart(&mut self, name: &str) -> Node {
        let i = self.index(name);
        assert!(
            self.hosts[i].node.is_none() || !self.is_up(name),
            "restart of running node {name:?}: crash it first"
        );
        self.start(i)
    }

    /// Pauses node `name`: none of its tasks run and it answers nothing
    /// until [`Sim::resume`] (a stopped-the-world process).
    pub fn pause(&mut self, name: &str) {
        let i = self.index(name);
        let _guard = self.rt.enter();
        self.hosts[i].gate.pause();
        self.net.set_paused(self.hosts[i].id, true);
    }

    /// Resumes a paused node.
    pub fn resume(&mut self, name: &str) {
        let i = self.index(name);
        let _guard = self.rt.enter();
        self.net.set_paused(self.hosts[i].id, false);
        self.hosts[i].gate.resume();
    }

    /// Whether node `name` is running (not crashed, not shut down).
    pub fn is_up(&self, name: &str) -> bool {
        let h = &self.hosts[self.index(name)];
        h.node.is_some() && self.net.lock().host_up(h.id)
    }

    /// Whether node `name` is paused.
    pub fn is_paused(&self, name: &str) -> bool {
        self.hosts[self.index(name)].gate.is_paused()
    }

    // --- observing ---

    /// Whether every running, unpaused node sees every other as alive and
    /// has a link to it.
    pub fn converged(&self) -> bool {
        let live: Vec<(NodeId, Node)> = self
            .hosts
            .iter()
            .filter(|h| !h.gate.is_paused())
            .filter(|h| self.net.lock().host_up(h.id))
            .filter_map(|h| h.node.clone().map(|n| (n.peer_id(), n)))
            .collect();
        for (_, node) in &live {
            let Ok(peers) = self.block_on_for(Duration::from_secs(1), node.peers()) else {
                return false;
            };
            for (other, _) in &live {
                if *other == node.peer_id() {
                    continue;
                }
                if !peers
                    .iter()
                    .any(|p| p.id == *other && p.state == PeerState::Alive && p.linked)
                {
                    return false;
                }
            }
        }
        true
    }

    /// Whether a message that node `from` publishes on `topic` now goes to
    /// at least one other node (it knows of a live remote subscriber).
    pub fn routed(&self, from: &str, topic: &str) -> bool {
        let Some(node) = self.get(from) else {
            return false;
        };
        self.block_on_for(Duration::from_secs(1), node.remote_subscribers(topic))
            .is_ok_and(|r| r.is_ok_and(|peers| !peers.is_empty()))
    }

    /// A hash of everything the network did so far (every packet with its
    /// time, path and bytes; every fault): equal for two runs exactly when
    /// they behaved the same.
    pub fn trace_hash(&self) -> u64 {
        self.net.lock().trace.finish()
    }

    /// Network events so far.
    pub fn trace_len(&self) -> u64 {
        self.net.lock().trace.events
    }

    /// The readable trace, if enabled with [`SimBuilder::record_trace`].
    pub fn trace_lines(&self) -> Vec<String> {
        self.net.lock().trace.lines.clone().unwrap_or_default()
    }

    /// Counts of what the network did.
    pub fn net_stats(&self) -> NetStats {
        self.net.stats()
    }

    /// Records an event of the scenario itself in the trace (so a test's
    /// own steps are part of what two runs must agree on).
    pub fn record(&self, what: &str) {
        let now = self.now();
        self.net.lock().trace.record(now, what, 0, 0, &[]);
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        // Kill every node's tasks before the runtime goes, so nothing tries
        // to shut down gracefully on a runtime that is being torn down.
        for h in &self.hosts {
            h.gate.kill();
        }
    }
}
