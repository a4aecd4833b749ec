//! The simulated network: hosts, connections and streams in memory, under a
//! seeded fault model, on tokio's paused (virtual) clock.
//!
//! It gives the node runtime what the QUIC transport gives it (the same
//! [`Event`]s: connections, data streams, control streams, discovery), so
//! the runtime runs unchanged. The model follows QUIC:
//!
//! - A connection carries reliable, ordered streams. A lost packet is
//!   retransmitted, so on a stream loss shows up as delay (one
//!   retransmission timeout per loss), never as a gap.
//! - Control messages (membership probes) travel on short streams of their
//!   own that the runtime sends and forgets: they can be lost, duplicated
//!   and, with `reorder`, overtake each other.
//! - While a partition cuts a path, bytes written to it are held, and
//!   arrive after the heal if the connection survived. A connection that
//!   hears nothing for the idle timeout (partition, crashed or paused peer)
//!   closes at both ends, as QUIC's idle timeout does.
//! - A crashed host sends nothing, not even a close: its peers find out by
//!   the idle timeout. A restarted process does not know its previous run's
//!   connections (and, as with quinn's per-process reset key, cannot reset
//!   them): they linger until the idle timeout beside its new ones.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    hash::Hasher,
    io,
    ops::Range,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, Weak},
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};
use mesh_transports::quic::Event;
use rand::{rngs::SmallRng, Rng};
use tokio::{sync::mpsc, time::Instant};

pub(crate) type HostId = usize;

/// Bytes a stream holds unread before its writer waits (flow control).
const STREAM_WINDOW: usize = 1024 * 1024;
/// Largest chunk one write moves.
const MAX_CHUNK: usize = 64 * 1024;
/// How long a dial to an unreachable host takes to fail.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Events a node may have queued before the network drops them (a bug in a
/// simulation, reported loudly).
const EVENT_QUEUE: usize = 16 * 1024;

/// Latency and loss of a path (one direction between two hosts).
#[derive(Debug, Clone, PartialEq)]
pub struct LinkFaults {
    /// One-way delay, drawn uniformly from this range per packet.
    pub latency: Range<Duration>,
    /// Probability that a packet is lost (streams retransmit it one
    /// retransmission timeout later; control messages are gone).
    pub loss: f64,
}

impl Default for LinkFaults {
    fn default() -> Self {
        Self {
            latency: Duration::from_micros(500)..Duration::from_millis(2),
            loss: 0.0,
        }
    }
}

/// A running hash of everything the network did: the simulation's trace.
#[derive(Clone)]
pub(crate) struct Trace {
    hash: rustc_hash::FxHasher,
    pub(crate) events: u64,
    pub(crate) lines: Option<Vec<String>>,
}

impl std::fmt::Debug for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trace")
            .field("events", &self.events)
            .finish()
    }
}

impl Trace {
    fn new(record: bool) -> Self {
        Self {
            hash: rustc_hash::FxHasher::default(),
            events: 0,
            lines: record.then(Vec::new),
        }
    }

    pub(crate) fn record(&mut self, at: Duration, what: &str, a: HostId, b: HostId, data: &[u8]) {
        self.events += 1;
        self.hash.write_u128(at.as_nanos());
        self.hash.write(what.as_bytes());
        self.hash.write_usize(a);
        self.hash.write_usize(b);
        self.hash.write_usize(data.len());
        self.hash.write(data);
        if let Some(lines) = &mut self.lines {
            lines.push(format!("{at:?} {what} {a}->{b} {}B", data.len()));
        }
    }

    pub(crate) fn finish(&self) -> u64 {
        self.hash.finish() ^ self.events
    }
}

#[derive(Debug)]
struct Host {
    peer: PeerId,
    addr: Multiaddr,
    /// Bumped at every start: events for an older incarnation are dropped.
    incarnation: u64,
    /// Started and neither crashed nor shut down.
    up: bool,
    paused: bool,
    events: Option<mpsc::Sender<Event>>,
}

#[derive(Debug)]
struct Conn {
    ends: [HostId; 2],
    incarnations: [u64; 2],
    /// Whether each end still has it open.
    open: [bool; 2],
    pipes: Vec<Weak<Pipe>>,
    /// When the connection last stopped hearing from both sides.
    silent_since: Option<Instant>,
}

impl Conn {
    fn side(&self, host: HostId) -> Option<usize> {
        self.ends.iter().position(|h| *h == host)
    }
}

/// The network's state. Lock order: the network, then a pipe.
#[derive(Debug)]
pub(crate) struct Net {
    rng: SmallRng,
    origin: Instant,
    pub(crate) defaults: LinkFaults,
    pub(crate) duplicate: f64,
    pub(crate) reorder: bool,
    pub(crate) idle_timeout: Duration,
    overrides: BTreeMap<(HostId, HostId), LinkFaults>,
    /// Directed paths that are cut.
    blocked: BTreeSet<(HostId, HostId)>,
    hosts: Vec<Host>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    dialing: BTreeSet<(HostId, HostId)>,
    /// Last control delivery per path, to keep them in order without
    /// `reorder`.
    control_last: BTreeMap<(HostId, HostId), Instant>,
    pub(crate) trace: Trace,
    pub(crate) stats: NetStats,
}

/// What the network did, in counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Chunks of stream data sent.
    pub stream_chunks: u64,
    /// Stream bytes sent.
    pub stream_bytes: u64,
    /// Control messages sent.
    pub control_sent: u64,
    /// Control messages lost (loss, partition, or no connection).
    pub control_lost: u64,
    /// Control messages delivered twice.
    pub control_duplicated: u64,
    /// Stream packets lost and retransmitted.
    pub retransmits: u64,
    /// Connections set up.
    pub connections: u64,
    /// Connections closed by the idle timeout.
    pub idle_closes: u64,
}

/// Shared handle to the network.
#[derive(Debug, Clone)]
pub(crate) struct NetHandle(pub(crate) Arc<Mutex<Net>>);

impl NetHandle {
    pub(crate) fn new(
        rng: SmallRng,
        defaults: LinkFaults,
        duplicate: f64,
        reorder: bool,
        idle_timeout: Duration,
        record_trace: bool,
    ) -> Self {
        Self(Arc::new(Mutex::new(Net {
            rng,
            origin: Instant::now(),
            defaults,
            duplicate,
            reorder,
            idle_timeout,
            overrides: BTreeMap::new(),
            blocked: BTreeSet::new(),
            hosts: Vec::new(),
            conns: BTreeMap::new(),
            next_conn: 0,
            dialing: BTreeSet::new(),
            control_last: BTreeMap::new(),
            trace: Trace::new(record_trace),
            stats: NetStats::default(),
        })))
    }

    /// Runs `f` on the network at virtual time `at` (a packet arriving).
    fn at(&self, at: Instant, f: impl FnOnce(&NetHandle, &mut Net) + Send + 'static) {
        let handle = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let mut net = handle.lock();
            f(&handle, &mut net);
        });
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Net> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a host (once per simulated node); returns its id.
    pub(crate) fn add_host(&self, peer: PeerId) -> HostId {
        let mut net = self.lock();
        let id = net.hosts.len();
        net.hosts.push(Host {
            peer,
            addr: Multiaddr::empty().with(Protocol::Memory(id as u64 + 1)),
            incarnation: 0,
            up: false,
            paused: false,
            events: None,
        });
        id
    }

    /// Starts a new incarnation of `host`: its endpoint and event stream.
    pub(crate) fn attach(
        &self,
        host: HostId,
        bootstrap: &[Multiaddr],
    ) -> (Endpoint, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let mut net = self.lock();
        let now = Instant::now();
        let h = &mut net.hosts[host];
        h.incarnation += 1;
        h.up = true;
        h.paused = false;
        h.events = Some(tx);
        let incarnation = h.incarnation;
        let addr = h.addr.clone();
        net.record(now, "start", host, host, &[]);
        let endpoint = Endpoint {
            net: self.clone(),
            host,
            incarnation,
        };
        net.send_event(host, incarnation, Event::Listening(addr));
        // Simulated mDNS: the new host finds every other running host.
        let found: Vec<(PeerId, Multiaddr)> = net
            .hosts
            .iter()
            .enumerate()
            .filter(|(i, h)| *i != host && h.up)
            .map(|(_, h)| (h.peer, h.addr.clone()))
            .collect();
        for (peer, addr) in found {
            net.send_event(
                host,
                incarnation,
                Event::Discovered {
                    peer,
                    addrs: vec![addr],
                },
            );
        }
        drop(net);
        for addr in bootstrap {
            endpoint.dial(addr.clone());
        }
        (endpoint, rx)
    }

    /// The host crashed: it sends and answers nothing from now on.
    pub(crate) fn crash(&self, host: HostId) {
        let mut net = self.lock();
        let now = Instant::now();
        net.record(now, "crash", host, host, &[]);
        let h = &mut net.hosts[host];
        h.up = false;
        h.paused = false;
        h.events = None;
        net.dialing.retain(|(a, _)| *a != host);
    }

    pub(crate) fn set_paused(&self, host: HostId, paused: bool) {
        let mut net = self.lock();
        let now = Instant::now();
        net.record(
            now,
            if paused { "pause" } else { "resume" },
            host,
            host,
            &[],
        );
        net.hosts[host].paused = paused;
    }

    /// Replaces the set of cut paths.
    pub(crate) fn set_blocked(&self, blocked: BTreeSet<(HostId, HostId)>) {
        let mut net = self.lock();
        let now = Instant::now();
        let newly: Vec<_> = blocked.difference(&net.blocked).copied().collect();
        for (a, b) in &newly {
            net.record(now, "cut", *a, *b, &[]);
        }
        let healed: Vec<_> = net.blocked.difference(&blocked).copied().collect();
        for (a, b) in &healed {
            net.record(now, "heal", *a, *b, &[]);
        }
        net.blocked = blocked;
        // Packets in flight on a cut path are lost (and retransmitted after
        // the heal); held ones on a healed path go now.
        net.reschedule_pipes(now);
    }

    pub(crate) fn blocked(&self) -> BTreeSet<(HostId, HostId)> {
        self.lock().blocked.clone()
    }

    pub(crate) fn set_link(&self, a: HostId, b: HostId, faults: Option<LinkFaults>) {
        let mut net = self.lock();
        match faults {
            Some(f) => net.overrides.insert((a, b), f),
            None => net.overrides.remove(&(a, b)),
        };
    }

    /// Closes connections that heard nothing for the idle timeout. Run
    /// periodically by the simulator.
    pub(crate) fn check_idle(&self) {
        let mut net = self.lock();
        let now = Instant::now();
        let idle = net.idle_timeout;
        let ids: Vec<u64> = net.conns.keys().copied().collect();
        for id in ids {
            let (a, b, current) = {
                let c = &net.conns[&id];
                let current = (0..2).all(|s| net.hosts[c.ends[s]].incarnation == c.incarnations[s]);
                (c.ends[0], c.ends[1], current)
            };
            // A connection of a previous run of a host is silent: the new
            // process does not know it (and, like quinn, cannot reset it).
            let live = current
                && net.path_open(a, b)
                && net.path_open(b, a)
                && !net.hosts[a].paused
                && !net.hosts[b].paused;
            let conn = net.conns.get_mut(&id).expect("listed");
            if live {
                conn.silent_since = None;
                continue;
            }
            let since = *conn.silent_since.get_or_insert(now);
            if now.duration_since(since) >= idle {
                net.stats.idle_closes += 1;
                net.record(now, "idle-close", a, b, &[]);
                net.close_conn(id, [true, true]);
            }
        }
    }

    pub(crate) fn stats(&self) -> NetStats {
        self.lock().stats.clone()
    }
}

impl Net {
    fn elapsed(&self, now: Instant) -> Duration {
        now.duration_since(self.origin)
    }

    fn record(&mut self, now: Instant, what: &str, a: HostId, b: HostId, data: &[u8]) {
        let at = self.elapsed(now);
        self.trace.record(at, what, a, b, data);
    }

    pub(crate) fn host_up(&self, host: HostId) -> bool {
        self.hosts[host].up
    }

    fn path_open(&self, from: HostId, to: HostId) -> bool {
        self.hosts[from].up && self.hosts[to].up && !self.blocked.contains(&(from, to))
    }

    fn faults(&self, from: HostId, to: HostId) -> &LinkFaults {
        self.overrides.get(&(from, to)).unwrap_or(&self.defaults)
    }

    fn sample_latency(&mut self, from: HostId, to: HostId) -> Duration {
        let range = self.faults(from, to).latency.clone();
        if range.start >= range.end {
            return range.start;
        }
        self.rng.gen_range(range)
    }

    /// When a stream packet sent now arrives: its latency plus one
    /// retransmission timeout (about two round trips) per loss.
    fn stream_arrival(&mut self, now: Instant, from: HostId, to: HostId) -> Instant {
        let loss = self.faults(from, to).loss.clamp(0.0, 0.99);
        let mut at = now + self.sample_latency(from, to);
        while loss > 0.0 && self.rng.gen_bool(loss) {
            self.stats.retransmits += 1;
            at += self.faults(from, to).latency.end * 4;
        }
        at
    }

    fn send_event(&mut self, host: HostId, incarnation: u64, ev: Event) {
        let h = &self.hosts[host];
        if h.incarnation != incarnation || !h.up {
            return;
        }
        if let Some(tx) = &h.events {
            if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(ev) {
                tracing::error!(host, "simulated node's event queue is full; event dropped");
            }
        }
    }

    fn open_conns(&self, host: HostId, other: HostId) -> impl Iterator<Item = (&u64, &Conn)> {
        self.conns.iter().filter(move |(_, c)| {
            c.side(host).is_some_and(|s| {
                c.open[s]
                    && c.ends[1 - s] == other
                    && c.incarnations[s] == self.hosts[host].incarnation
            })
        })
    }

    /// The incarnation of `host` on connection `conn`, if that end is
    /// still open.
    fn open_end(&self, conn: u64, host: HostId) -> Option<u64> {
        let c = self.conns.get(&conn)?;
        let side = c.side(host)?;
        c.open[side].then_some(c.incarnations[side])
    }

    fn connected(&self, host: HostId, other: HostId) -> bool {
        self.open_conns(host, other).next().is_some()
    }

    /// Closes connection `id` at the ends marked in `at_ends`; its streams
    /// are reset.
    fn close_conn(&mut self, id: u64, at_ends: [bool; 2]) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let mut closed = Vec::new();
        for (side, &close) in at_ends.iter().enumerate() {
            if close && conn.open[side] {
                conn.open[side] = false;
                closed.push((
                    conn.ends[side],
                    conn.ends[1 - side],
                    conn.incarnations[side],
                ));
            }
        }
        for pipe in conn.pipes.drain(..).filter_map(|p| p.upgrade()) {
            pipe.reset();
        }
        if !conn.open[0] && !conn.open[1] {
            self.conns.remove(&id);
        }
        for (host, other, incarnation) in closed {
            if self.hosts[host].incarnation == incarnation && !self.connected(host, other) {
                let peer = self.hosts[other].peer;
                self.send_event(host, incarnation, Event::Disconnected { peer });
            }
        }
    }

    /// After the cut paths changed: packets in flight on a cut path are
    /// held; held packets on an open path are sent again.
    fn reschedule_pipes(&mut self, now: Instant) {
        let pipes: Vec<Arc<Pipe>> = self
            .conns
            .values()
            .flat_map(|c| c.pipes.iter().filter_map(|p| p.upgrade()))
            .collect();
        for pipe in pipes {
            let open = self.path_open(pipe.from, pipe.to);
            let mut st = pipe.lock();
            let mut changed = false;
            let mut last = now;
            for chunk in st.chunks.iter_mut() {
                match chunk.at {
                    Some(at) if !open && at > now => {
                        chunk.at = None;
                        changed = true;
                    }
                    None if open => {
                        // Sent again in order, after one path delay.
                        let lat = self.faults(pipe.from, pipe.to).latency.end;
                        let at = (now + lat).max(last);
                        chunk.at = Some(at);
                        changed = true;
                    }
                    _ => {}
                }
                if let Some(at) = chunk.at {
                    last = last.max(at);
                }
            }
            if open {
                st.last_at = st.last_at.max(last);
            }
            if changed {
                if let Some(w) = st.read_waker.take() {
                    w.wake();
                }
            }
        }
    }

    fn new_stream_pair(
        &mut self,
        handle: &NetHandle,
        conn: u64,
        a: HostId,
        b: HostId,
    ) -> (SimStream, SimStream) {
        let ab = Arc::new(Pipe::new(a, b));
        let ba = Arc::new(Pipe::new(b, a));
        if let Some(c) = self.conns.get_mut(&conn) {
            c.pipes.retain(|p| p.strong_count() > 0);
            c.pipes.push(Arc::downgrade(&ab));
            c.pipes.push(Arc::downgrade(&ba));
        }
        (
            SimStream::new(a, ab.clone(), ba.clone(), handle),
            SimStream::new(b, ba, ab, handle),
        )
    }
}

/// One node incarnation's view of the network: what the runtime calls
/// instead of the QUIC swarm.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    net: NetHandle,
    host: HostId,
    incarnation: u64,
}

impl Endpoint {
    fn current(&self, net: &Net) -> bool {
        let h = &net.hosts[self.host];
        h.up && h.incarnation == self.incarnation
    }

    fn host_of(net: &Net, addr: &Multiaddr) -> Option<HostId> {
        addr.iter().find_map(|p| match p {
            Protocol::Memory(n) if n >= 1 && (n as usize) <= net.hosts.len() => {
                Some(n as usize - 1)
            }
            _ => None,
        })
    }

    fn host_of_peer(net: &Net, peer: &PeerId) -> Option<HostId> {
        net.hosts.iter().position(|h| h.peer == *peer)
    }

    pub(crate) fn dial(&self, addr: Multiaddr) {
        let mut net = self.net.lock();
        if !self.current(&net) {
            return;
        }
        let Some(target) = Self::host_of(&net, &addr) else {
            let error = format!("no simulated host at {addr}");
            net.send_event(
                self.host,
                self.incarnation,
                Event::DialFailed { peer: None, error },
            );
            return;
        };
        self.start_dial(&mut net, target);
    }

    pub(crate) fn dial_peer(&self, peer: PeerId, _addrs: Vec<Multiaddr>) {
        let mut net = self.net.lock();
        if !self.current(&net) {
            return;
        }
        let Some(target) = Self::host_of_peer(&net, &peer) else {
            return;
        };
        if target == self.host
            || net.connected(self.host, target)
            || net.dialing.contains(&(self.host, target))
        {
            return;
        }
        self.start_dial(&mut net, target);
    }

    fn start_dial(&self, net: &mut Net, target: HostId) {
        let now = Instant::now();
        let host = self.host;
        net.dialing.insert((host, target));
        net.record(now, "dial", host, target, &[]);
        let reachable =
            net.path_open(host, target) && net.path_open(target, host) && !net.hosts[target].paused;
        let at = if reachable {
            now + net.sample_latency(host, target) + net.sample_latency(target, host)
        } else {
            now + DIAL_TIMEOUT
        };
        let incarnation = self.incarnation;
        self.net.at(at, move |handle, net| {
            net.dialing.remove(&(host, target));
            let me = &net.hosts[host];
            if !me.up || me.incarnation != incarnation {
                return;
            }
            let ok = net.path_open(host, target)
                && net.path_open(target, host)
                && !net.hosts[target].paused;
            let now = Instant::now();
            if !ok {
                net.record(now, "dial-failed", host, target, &[]);
                let peer = Some(net.hosts[target].peer);
                net.send_event(
                    host,
                    incarnation,
                    Event::DialFailed {
                        peer,
                        error: "simulated host unreachable".into(),
                    },
                );
                return;
            }
            net.record(now, "connected", host, target, &[]);
            net.stats.connections += 1;
            let id = net.next_conn;
            net.next_conn += 1;
            let first = [!net.connected(host, target), !net.connected(target, host)];
            let target_inc = net.hosts[target].incarnation;
            net.conns.insert(
                id,
                Conn {
                    ends: [host, target],
                    incarnations: [incarnation, target_inc],
                    open: [true, true],
                    pipes: Vec::new(),
                    silent_since: None,
                },
            );
            for (side, (me, other, inc)) in
                [(host, target, incarnation), (target, host, target_inc)]
                    .into_iter()
                    .enumerate()
            {
                let peer = net.hosts[other].peer;
                let ev = if first[side] {
                    Event::Connected {
                        peer,
                        addr: net.hosts[other].addr.clone(),
                    }
                } else {
                    Event::ExtraConnection { peer }
                };
                net.send_event(me, inc, ev);
            }
            // As the QUIC transport does: the smaller id opens the data
            // stream on a first connection.
            for (side, (me, other, inc)) in
                [(host, target, incarnation), (target, host, target_inc)]
                    .into_iter()
                    .enumerate()
            {
                if first[side] && net.hosts[me].peer < net.hosts[other].peer {
                    open_stream_locked(handle, net, me, inc, other);
                }
            }
        });
    }

    pub(crate) fn open_stream(&self, peer: PeerId) {
        let mut net = self.net.lock();
        if !self.current(&net) {
            return;
        }
        if let Some(target) = Self::host_of_peer(&net, &peer) {
            open_stream_locked(&self.net, &mut net, self.host, self.incarnation, target);
        }
    }

    pub(crate) fn fresh_stream(&self, peer: PeerId) {
        let mut net = self.net.lock();
        if !self.current(&net) {
            return;
        }
        let Some(target) = Self::host_of_peer(&net, &peer) else {
            return;
        };
        let ids: Vec<u64> = net
            .open_conns(self.host, target)
            .map(|(id, _)| *id)
            .collect();
        if let Some((_, older)) = ids.split_last() {
            for id in older {
                self.close_from_here(&mut net, *id);
            }
        }
        open_stream_locked(&self.net, &mut net, self.host, self.incarnation, target);
    }

    /// Closes `id` here; the other end hears of it if the path is open
    /// (else by its idle timeout).
    fn close_from_here(&self, net: &mut Net, id: u64) {
        let Some(c) = net.conns.get(&id) else { return };
        let Some(side) = c.side(self.host) else {
            return;
        };
        let other = c.ends[1 - side];
        let mut ends = [false, false];
        ends[side] = true;
        ends[1 - side] = net.path_open(self.host, other);
        net.close_conn(id, ends);
    }

    pub(crate) fn disconnect(&self, peer: PeerId) {
        let mut net = self.net.lock();
        if !self.current(&net) {
            return;
        }
        let Some(target) = Self::host_of_peer(&net, &peer) else {
            return;
        };
        let now = Instant::now();
        net.record(now, "disconnect", self.host, target, &[]);
        let ids: Vec<u64> = net
            .open_conns(self.host, target)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.close_from_here(&mut net, id);
        }
    }

    pub(crate) fn send_control(&self, peer: PeerId, bytes: Vec<u8>) -> bool {
        let mut net = self.net.lock();
        if !self.current(&net) {
            return true;
        }
        let Some(target) = Self::host_of_peer(&net, &peer) else {
            return true;
        };
        let now = Instant::now();
        net.stats.control_sent += 1;
        let conn = net.open_conns(self.host, target).map(|(id, _)| *id).last();
        let loss = net.faults(self.host, target).loss;
        let lost = conn.is_none()
            || !net.path_open(self.host, target)
            || (loss > 0.0 && net.rng.gen_bool(loss.clamp(0.0, 1.0)));
        if lost {
            net.stats.control_lost += 1;
            net.record(now, "ctl-lost", self.host, target, &bytes);
            return true;
        }
        let conn = conn.expect("checked");
        net.record(now, "ctl", self.host, target, &bytes);
        let mut at = now + net.sample_latency(self.host, target);
        if !net.reorder {
            let last = net.control_last.entry((self.host, target)).or_insert(now);
            at = at.max(*last);
            *last = at;
        }
        let p = net.duplicate.clamp(0.0, 1.0);
        let duplicate = p > 0.0 && net.rng.gen_bool(p);
        let bytes = Bytes::from(bytes);
        let mut deliveries = vec![at];
        if duplicate {
            net.stats.control_duplicated += 1;
            let again = at + net.sample_latency(self.host, target);
            deliveries.push(again);
        }
        let from = self.host;
        for at in deliveries {
            let bytes = bytes.clone();
            self.net.at(at, move |handle, net| {
                let inc = match net.open_end(conn, target) {
                    Some(inc) if net.path_open(from, target) => inc,
                    _ => {
                        net.stats.control_lost += 1;
                        return;
                    }
                };
                let now = Instant::now();
                net.record(now, "ctl-in", from, target, &bytes);
                let rx = Arc::new(Pipe::new(from, target));
                {
                    let mut st = rx.lock();
                    st.buffered = bytes.len();
                    st.chunks.push_back(Chunk {
                        at: Some(now),
                        data: bytes,
                        fin: false,
                    });
                    st.chunks.push_back(Chunk {
                        at: Some(now),
                        data: Bytes::new(),
                        fin: true,
                    });
                }
                // Writes on a control stream go nowhere: the runtime never
                // answers on one.
                let tx = Arc::new(Pipe::new(target, from));
                tx.lock().reader_gone = true;
                let stream = SimStream::new(target, tx, rx, handle);
                let peer = net.hosts[from].peer;
                net.send_event(
                    target,
                    inc,
                    Event::ControlStream {
                        peer,
                        stream: Box::new(stream),
                    },
                );
            });
        }
        true
    }

    /// The node stopped: its connections close (peers hear of it).
    pub(crate) fn shutdown(&self) {
        let mut net = self.net.lock();
        if !self.current(&net) {
            return;
        }
        let now = Instant::now();
        net.record(now, "stop", self.host, self.host, &[]);
        let ids: Vec<u64> = net
            .conns
            .iter()
            .filter(|(_, c)| c.side(self.host).is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.close_from_here(&mut net, id);
        }
        let h = &mut net.hosts[self.host];
        h.up = false;
        h.events = None;
    }
}

fn open_stream_locked(
    handle: &NetHandle,
    net: &mut Net,
    host: HostId,
    incarnation: u64,
    target: HostId,
) {
    let Some(conn) = net.open_conns(host, target).map(|(id, _)| *id).last() else {
        let peer = net.hosts[target].peer;
        net.send_event(
            host,
            incarnation,
            Event::StreamFailed {
                peer,
                error: "no simulated connection".into(),
            },
        );
        return;
    };
    let now = Instant::now();
    net.record(now, "stream", host, target, &[]);
    let (local, remote) = net.new_stream_pair(handle, conn, host, target);
    let peer = net.hosts[target].peer;
    net.send_event(
        host,
        incarnation,
        Event::Stream {
            peer,
            stream: Box::new(local),
            outbound: true,
        },
    );
    let at = now + net.sample_latency(host, target);
    handle.at(at, move |_, net| {
        let Some(inc) = net.open_end(conn, target) else {
            return;
        };
        let peer = net.hosts[host].peer;
        net.send_event(
            target,
            inc,
            Event::Stream {
                peer,
                stream: Box::new(remote),
                outbound: false,
            },
        );
    });
}

#[derive(Debug)]
struct Chunk {
    /// When it arrives; `None` while its path is cut.
    at: Option<Instant>,
    data: Bytes,
    fin: bool,
}

#[derive(Debug)]
struct PipeState {
    chunks: VecDeque<Chunk>,
    buffered: usize,
    finished: bool,
    reset: bool,
    reader_gone: bool,
    /// Arrival of the last chunk: streams are ordered.
    last_at: Instant,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

/// One direction of a stream.
#[derive(Debug)]
pub(crate) struct Pipe {
    from: HostId,
    to: HostId,
    state: Mutex<PipeState>,
}

impl Pipe {
    fn new(from: HostId, to: HostId) -> Self {
        Self {
            from,
            to,
            state: Mutex::new(PipeState {
                chunks: VecDeque::new(),
                buffered: 0,
                finished: false,
                reset: false,
                reader_gone: false,
                last_at: Instant::now(),
                read_waker: None,
                write_waker: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reset(&self) {
        let mut st = self.lock();
        st.reset = true;
        if let Some(w) = st.read_waker.take() {
            w.wake();
        }
        if let Some(w) = st.write_waker.take() {
            w.wake();
        }
    }
}

/// A simulated stream: one pipe out, one pipe in.
pub(crate) struct SimStream {
    owner: HostId,
    tx: Arc<Pipe>,
    rx: Arc<Pipe>,
    net: NetHandle,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl std::fmt::Debug for SimStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimStream")
            .field("from", &self.tx.from)
            .field("to", &self.tx.to)
            .finish()
    }
}

impl SimStream {
    fn new(owner: HostId, tx: Arc<Pipe>, rx: Arc<Pipe>, net: &NetHandle) -> Self {
        Self {
            owner,
            tx,
            rx,
            net: net.clone(),
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
        }
    }

    fn write_chunk(&mut self, data: Bytes, fin: bool) -> io::Result<()> {
        let mut net = self.net.lock();
        let now = Instant::now();
        let (from, to) = (self.tx.from, self.tx.to);
        let open = net.path_open(from, to);
        let arrival = open.then(|| net.stream_arrival(now, from, to));
        net.stats.stream_chunks += 1;
        net.stats.stream_bytes += data.len() as u64;
        net.record(now, if fin { "fin" } else { "data" }, from, to, &data);
        let mut st = self.tx.lock();
        if st.reset {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        if st.reader_gone {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let at = arrival.map(|a| {
            let a = a.max(st.last_at);
            st.last_at = a;
            a
        });
        st.buffered += data.len();
        st.chunks.push_back(Chunk { at, data, fin });
        if fin {
            st.finished = true;
        }
        if let Some(w) = st.read_waker.take() {
            w.wake();
        }
        Ok(())
    }
}

impl futures::AsyncRead for SimStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let mut st = this.rx.lock();
        if st.reset {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        let now = Instant::now();
        let Some(head) = st.chunks.front_mut() else {
            st.read_waker = Some(cx.waker().clone());
            return Poll::Pending;
        };
        match head.at {
            None => {
                st.read_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Some(at) if at > now => {
                st.read_waker = Some(cx.waker().clone());
                drop(st);
                this.sleep.as_mut().reset(at);
                match this.sleep.as_mut().poll(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(()) => {
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                }
            }
            Some(_) if head.fin => Poll::Ready(Ok(0)),
            Some(_) => {
                let n = head.data.len().min(buf.len());
                buf[..n].copy_from_slice(&head.data[..n]);
                let _ = head.data.split_to(n);
                if head.data.is_empty() {
                    st.chunks.pop_front();
                }
                st.buffered -= n;
                if let Some(w) = st.write_waker.take() {
                    w.wake();
                }
                Poll::Ready(Ok(n))
            }
        }
    }
}

use std::future::Future;

impl futures::AsyncWrite for SimStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        {
            let mut st = self.tx.lock();
            if st.reset {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            if st.finished {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            if st.buffered >= STREAM_WINDOW {
                st.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        let n = buf.len().min(MAX_CHUNK);
        match self.write_chunk(Bytes::copy_from_slice(&buf[..n]), false) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.tx.lock().finished {
            return Poll::Ready(Ok(()));
        }
        Poll::Ready(self.write_chunk(Bytes::new(), true))
    }
}

impl Drop for SimStream {
    fn drop(&mut self) {
        // The peer's writer finds nobody reading.
        self.rx.lock().reader_gone = true;
        // A crashed process says nothing; a live one ends its half. (The
        // network may be locked by this very thread, when it drops an
        // event it could not deliver: then the owner is running.)
        let up = match self.net.0.try_lock() {
            Ok(net) => net.hosts[self.owner].up,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().hosts[self.owner].up,
            Err(std::sync::TryLockError::WouldBlock) => true,
        };
        if !up {
            return;
        }
        let mut st = self.tx.lock();
        if !st.finished && !st.reset {
            st.finished = true;
            let at = st.last_at.max(Instant::now());
            st.chunks.push_back(Chunk {
                at: Some(at),
                data: Bytes::new(),
                fin: true,
            });
            if let Some(w) = st.read_waker.take() {
                w.wake();
            }
        }
    }
}
