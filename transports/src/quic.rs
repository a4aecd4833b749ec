//! QUIC between hosts: a libp2p swarm (QUIC, mDNS, Kademlia, identify) and one
//! long-lived data stream per peer (libp2p-stream).
//!
//! The swarm runs in its own task, which must keep being polled; the caller
//! talks to it through a [`Handle`] and receives [`Event`]s. For each new
//! connection the peer with the smaller id opens the data stream, so two
//! peers that dial each other at once still end up with streams on both
//! connections and the caller keeps the newest (see `Event::Stream`).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{
    identify,
    identity::Keypair,
    kad, mdns,
    multiaddr::Protocol,
    swarm::behaviour::toggle::Toggle,
    swarm::dial_opts::{DialOpts, PeerCondition},
    swarm::{ConnectionId, NetworkBehaviour, SwarmEvent},
    Multiaddr, PeerId, StreamProtocol, Swarm,
};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// The protocol name of mesh data streams (one long-lived stream per peer).
pub const DATA_PROTOCOL: StreamProtocol = StreamProtocol::new("/mesh/data/1");
/// The protocol name of control streams: one short-lived stream per batch of
/// control frames, so they never wait behind data on a congested stream.
pub const CONTROL_PROTOCOL: StreamProtocol = StreamProtocol::new("/mesh/ctl/1");
/// Control sends in flight at once; more are dropped (and reported).
const MAX_CONTROL_IN_FLIGHT: usize = 256;
/// How long opening and writing a control stream may take.
const CONTROL_SEND_TIMEOUT: Duration = Duration::from_secs(5);
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/mesh/kad/1");
const IDENTIFY_PROTOCOL: &str = "/mesh/id/1";

/// A stream as the runtime sees it: QUIC streams here, in-memory pipes in
/// the simulator.
pub use crate::Stream;

/// How the swarm is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Addresses to listen on, e.g. `/ip4/127.0.0.1/udp/0/quic-v1`.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (each should end in `/p2p/PEERID`).
    pub bootstrap: Vec<Multiaddr>,
    /// Announce and discover peers on the LAN with mDNS.
    pub mdns: bool,
    /// How long a connection without streams stays open.
    pub idle_timeout: Duration,
    /// Run Kademlia and identify, which answer whoever connects (their
    /// peer id, listen addresses and every peer they know). A private mesh
    /// turns them off: its members find each other through bootstrap
    /// peers, mDNS and their membership's addresses.
    pub discovery: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: vec!["/ip4/0.0.0.0/udp/0/quic-v1"
                .parse()
                .expect("valid multiaddr")],
            bootstrap: Vec::new(),
            mdns: true,
            idle_timeout: Duration::from_secs(30),
            discovery: true,
        }
    }
}

/// What the swarm reports.
#[derive(Debug)]
pub enum Event {
    /// A listen address is active.
    Listening(Multiaddr),
    /// A listen address went away.
    ListenerClosed(Multiaddr),
    /// The first connection to `peer` is up; `addr` is its address as dialed
    /// or seen.
    Connected {
        /// The remote peer.
        peer: PeerId,
        /// The remote address of the connection.
        addr: Multiaddr,
    },
    /// Another connection to an already connected `peer` is up.
    ExtraConnection {
        /// The remote peer.
        peer: PeerId,
    },
    /// The last connection to `peer` closed.
    Disconnected {
        /// The remote peer.
        peer: PeerId,
    },
    /// A data stream with `peer` is open (`outbound`: we opened it).
    Stream {
        /// The remote peer.
        peer: PeerId,
        /// The stream.
        stream: Stream,
        /// Whether this side opened it.
        outbound: bool,
    },
    /// A peer opened a control stream: read its frames, then it ends.
    ControlStream {
        /// The remote peer.
        peer: PeerId,
        /// The stream.
        stream: Stream,
    },
    /// Opening a data stream to `peer` failed.
    StreamFailed {
        /// The remote peer.
        peer: PeerId,
        /// Why.
        error: String,
    },
    /// A peer was found by mDNS or Kademlia, with addresses to dial.
    Discovered {
        /// The peer found.
        peer: PeerId,
        /// Its addresses.
        addrs: Vec<Multiaddr>,
    },
    /// A dial failed.
    DialFailed {
        /// The peer dialed, if known.
        peer: Option<PeerId>,
        /// Why.
        error: String,
    },
}

/// Errors starting the swarm.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The QUIC transport or a behaviour could not be built.
    #[error("cannot build the libp2p swarm: {0}")]
    Build(String),
    /// A listen address was refused.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
}

#[derive(Debug)]
enum Command {
    Dial(Multiaddr),
    DialPeer(PeerId, Vec<Multiaddr>),
    OpenStream(PeerId),
    FreshStream(PeerId),
    Disconnect(PeerId),
    Shutdown(oneshot::Sender<()>),
}

/// Talks to the swarm task. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    cmd: mpsc::Sender<Command>,
    local: PeerId,
    streams: libp2p_stream::Control,
    control_permits: Arc<Semaphore>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Handle {
    /// The local peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    /// Dials an address (ending in `/p2p/PEERID` to authenticate the peer).
    pub async fn dial(&self, addr: Multiaddr) {
        let _ = self.cmd.send(Command::Dial(addr)).await;
    }

    /// Dials `peer` at any of `addrs`, unless already connected or dialing.
    pub async fn dial_peer(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let _ = self.cmd.send(Command::DialPeer(peer, addrs)).await;
    }

    /// Sends `bytes` (whole frames) to a connected peer on a new control
    /// stream, in the background. Returns `false` if too many control sends
    /// are in flight and this one was dropped (control traffic is periodic
    /// or versioned, so a later send supersedes it).
    pub fn send_control(&self, peer: PeerId, bytes: Vec<u8>) -> bool {
        let Ok(permit) = self.control_permits.clone().try_acquire_owned() else {
            return false;
        };
        let mut streams = self.streams.clone();
        tokio::spawn(async move {
            let send = async {
                let mut stream = streams
                    .open_stream(peer, CONTROL_PROTOCOL)
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                stream.write_all(&bytes).await?;
                stream.close().await
            };
            match tokio::time::timeout(CONTROL_SEND_TIMEOUT, send).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "control send failed"),
                Err(_) => tracing::debug!(%peer, "control send timed out"),
            }
            drop(permit);
        });
        true
    }

    /// Closes every connection to `peer` but the newest, then opens a data
    /// stream on that one: for a peer that restarted while its old
    /// connection lingers (until QUIC's idle timeout) and would otherwise
    /// take half of the new streams.
    pub async fn fresh_stream(&self, peer: PeerId) {
        let _ = self.cmd.send(Command::FreshStream(peer)).await;
    }

    /// Opens a fresh data stream to a connected peer.
    pub async fn open_stream(&self, peer: PeerId) {
        let _ = self.cmd.send(Command::OpenStream(peer)).await;
    }

    /// Closes every connection to `peer`.
    pub async fn disconnect(&self, peer: PeerId) {
        let _ = self.cmd.send(Command::Disconnect(peer)).await;
    }

    /// Stops the swarm and waits until it has stopped.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    stream: libp2p_stream::Behaviour,
    identify: Toggle<identify::Behaviour>,
    kad: Toggle<kad::Behaviour<kad::store::MemoryStore>>,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

impl Behaviour {
    fn kad_add_address(&mut self, peer: &PeerId, addr: Multiaddr) {
        if let Some(kad) = self.kad.as_mut() {
            kad.add_address(peer, addr);
        }
    }
}

/// Starts the swarm task. Events arrive on the returned receiver, which the
/// caller must keep draining (it is bounded; a full channel stalls the swarm).
pub async fn start(
    keypair: Keypair,
    config: Config,
) -> Result<(Handle, mpsc::Receiver<Event>), StartError> {
    let local = keypair.public().to_peer_id();
    let mdns_on = config.mdns;
    let discovery = config.discovery;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic_config(|mut c| {
            // Larger windows let one stream fill the link; keep-alive below
            // the idle timeout so quiet links survive.
            c.max_stream_data = 16 * 1024 * 1024;
            c.max_connection_data = 24 * 1024 * 1024;
            c.keep_alive_interval = Duration::from_secs(2);
            c.max_idle_timeout = 10_000;
            c
        })
        .with_behaviour(|key| {
            let peer = key.public().to_peer_id();
            let mut kad_config = kad::Config::new(KAD_PROTOCOL);
            kad_config.set_periodic_bootstrap_interval(Some(Duration::from_secs(30)));
            let mut kad =
                kad::Behaviour::with_config(peer, kad::store::MemoryStore::new(peer), kad_config);
            // Every mesh node answers Kademlia queries; there is no external
            // address confirmation step in a private mesh.
            kad.set_mode(Some(kad::Mode::Server));
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(mdns::Config::default(), peer)?)
            } else {
                None
            };
            let identify = identify::Behaviour::new(identify::Config::new(
                IDENTIFY_PROTOCOL.to_string(),
                key.public(),
            ));
            Ok(Behaviour {
                stream: libp2p_stream::Behaviour::new(),
                identify: Toggle::from(discovery.then_some(identify)),
                kad: Toggle::from(discovery.then_some(kad)),
                mdns: Toggle::from(mdns),
            })
        })
        .map_err(|e| StartError::Build(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_timeout))
        .build();

    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| StartError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }

    let (event_tx, event_rx) = mpsc::channel(1024);
    let (cmd_tx, cmd_rx) = mpsc::channel(256);

    let mut control = swarm.behaviour().stream.new_control();
    let mut incoming = control
        .accept(DATA_PROTOCOL)
        .map_err(|e| StartError::Build(e.to_string()))?;
    let mut incoming_control = control
        .accept(CONTROL_PROTOCOL)
        .map_err(|e| StartError::Build(e.to_string()))?;
    let control_tx = event_tx.clone();
    tokio::spawn(async move {
        while let Some((peer, stream)) = incoming_control.next().await {
            if control_tx
                .send(Event::ControlStream {
                    peer,
                    stream: Box::new(stream),
                })
                .await
                .is_err()
            {
                break;
            }
        }
    });
    // Inbound streams must be accepted continuously: libp2p-stream drops
    // those that find its channel full.
    let inbound_tx = event_tx.clone();
    tokio::spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            let event = Event::Stream {
                peer,
                stream: Box::new(stream),
                outbound: false,
            };
            if inbound_tx.send(event).await.is_err() {
                break;
            }
        }
    });

    for addr in &config.bootstrap {
        if let Some(peer) = peer_of(addr) {
            swarm.behaviour_mut().kad_add_address(&peer, addr.clone());
        }
        if let Err(e) = swarm.dial(addr.clone()) {
            tracing::warn!(%addr, error = %e, "cannot dial bootstrap peer");
        }
    }

    let handle = Handle {
        cmd: cmd_tx,
        local,
        streams: control.clone(),
        control_permits: Arc::new(Semaphore::new(MAX_CONTROL_IN_FLIGHT)),
    };
    let driver = Driver {
        swarm,
        control,
        events: event_tx,
        local,
        connected: HashSet::new(),
        connections: HashMap::new(),
        fresh_pending: HashSet::new(),
    };
    tokio::spawn(driver.run(cmd_rx));
    Ok((handle, event_rx))
}

async fn emit(events: &mpsc::Sender<Event>, event: Event) -> Result<(), ()> {
    events.send(event).await.map_err(|_| ())
}

/// The peer id at the end of a `/p2p/` multiaddr.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

struct Driver {
    swarm: Swarm<Behaviour>,
    control: libp2p_stream::Control,
    events: mpsc::Sender<Event>,
    local: PeerId,
    connected: HashSet<PeerId>,
    /// Open connections per peer, oldest first.
    connections: HashMap<PeerId, Vec<ConnectionId>>,
    /// Peers waiting for their older connections to close before a fresh
    /// stream is opened (so it cannot land on a dead connection).
    fresh_pending: HashSet<PeerId>,
}

impl Driver {
    async fn run(mut self, mut cmds: mpsc::Receiver<Command>) {
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(Command::Shutdown(done)) => {
                        let peers: Vec<_> = self.connected.iter().copied().collect();
                        for peer in peers {
                            let _ = self.swarm.disconnect_peer_id(peer);
                        }
                        let _ = done.send(());
                        return;
                    }
                    Some(cmd) => self.handle_command(cmd),
                    None => return,
                },
                event = self.swarm.select_next_some() => {
                    if self.handle_swarm_event(event).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial(addr) => {
                if let Some(peer) = peer_of(&addr) {
                    if peer == self.local || self.connected.contains(&peer) {
                        return;
                    }
                }
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    tracing::debug!(%addr, error = %e, "dial refused");
                }
            }
            Command::DialPeer(peer, addrs) => {
                if peer == self.local {
                    return;
                }
                let opts = DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                if let Err(e) = self.swarm.dial(opts) {
                    tracing::debug!(%peer, error = %e, "dial refused");
                }
            }
            Command::OpenStream(peer) => self.open_stream(peer),
            Command::FreshStream(peer) => {
                let conns = self.connections.get(&peer).cloned().unwrap_or_default();
                match conns.split_last() {
                    Some((_, older)) if !older.is_empty() => {
                        for id in older {
                            self.swarm.close_connection(*id);
                        }
                        self.fresh_pending.insert(peer);
                    }
                    Some(_) => self.open_stream(peer),
                    None => {}
                }
            }
            Command::Disconnect(peer) => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::Shutdown(_) => unreachable!("handled in run"),
        }
    }

    fn open_stream(&self, peer: PeerId) {
        let mut control = self.control.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            match control.open_stream(peer, DATA_PROTOCOL).await {
                Ok(stream) => {
                    let _ = events
                        .send(Event::Stream {
                            peer,
                            stream: Box::new(stream),
                            outbound: true,
                        })
                        .await;
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "cannot open data stream");
                    let _ = events
                        .send(Event::StreamFailed {
                            peer,
                            error: e.to_string(),
                        })
                        .await;
                }
            }
        });
    }

    async fn handle_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) -> Result<(), ()> {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                emit(&self.events, Event::Listening(address)).await?;
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                emit(&self.events, Event::ListenerClosed(address)).await?;
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                self.connections
                    .entry(peer_id)
                    .or_default()
                    .push(connection_id);
                let addr = endpoint.get_remote_address().clone();
                if endpoint.is_dialer() {
                    self.swarm
                        .behaviour_mut()
                        .kad_add_address(&peer_id, addr.clone());
                }
                if num_established.get() == 1 {
                    self.connected.insert(peer_id);
                    emit(
                        &self.events,
                        Event::Connected {
                            peer: peer_id,
                            addr,
                        },
                    )
                    .await?;
                }
                // One data stream per peer, opened by the smaller id so the
                // two sides never race each other. A further connection is
                // reported instead: the caller decides whether it means a
                // restarted peer (open a fresh stream) or a simultaneous
                // dial (keep the stream it has).
                if num_established.get() == 1 {
                    if self.local < peer_id {
                        self.open_stream(peer_id);
                    }
                } else {
                    emit(&self.events, Event::ExtraConnection { peer: peer_id }).await?;
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                if let Some(list) = self.connections.get_mut(&peer_id) {
                    list.retain(|c| *c != connection_id);
                    if list.is_empty() {
                        self.connections.remove(&peer_id);
                    }
                }
                if num_established == 0 {
                    self.fresh_pending.remove(&peer_id);
                    self.connected.remove(&peer_id);
                    emit(&self.events, Event::Disconnected { peer: peer_id }).await?;
                } else if num_established == 1 && self.fresh_pending.remove(&peer_id) {
                    self.open_stream(peer_id);
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                emit(
                    &self.events,
                    Event::DialFailed {
                        peer: peer_id,
                        error: error.to_string(),
                    },
                )
                .await?;
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                for (peer, addr) in list {
                    self.swarm
                        .behaviour_mut()
                        .kad_add_address(&peer, addr.clone());
                    emit(
                        &self.events,
                        Event::Discovered {
                            peer,
                            addrs: vec![addr],
                        },
                    )
                    .await?;
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad_add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer,
                addresses,
                ..
            })) if peer != self.local && !self.connected.contains(&peer) => {
                emit(
                    &self.events,
                    Event::Discovered {
                        peer,
                        addrs: addresses.into_vec(),
                    },
                )
                .await?;
            }
            _ => {}
        }
        Ok(())
    }
}
