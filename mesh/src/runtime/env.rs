//! What a node runs on besides its own logic: the transport of its links,
//! how its tasks are spawned, its wall clock, its randomness and the store
//! of a durable host. By default the real ones (QUIC, `tokio::spawn`, the
//! system clock, OS entropy, SQLite); an [`Environment`] given to the
//! builder replaces them all, which is how the simulator runs real nodes
//! on its network, clock and disk. The runtime knows only these traits.

use std::{fmt::Debug, future::Future, sync::Arc};

use futures::future::BoxFuture;
use libp2p::Multiaddr;
use mesh_transports::quic;
use tokio::sync::mpsc;

use super::{durable, WallClock};
use crate::core::NodeId;

/// A node's surroundings when they are not the real ones.
pub(crate) trait Environment: Send + Sync + Debug {
    /// Attaches the node to its network: the transport of its links and
    /// the transport's events (the same events QUIC gives).
    fn attach(&self, bootstrap: &[Multiaddr]) -> (Box<dyn Transport>, mpsc::Receiver<quic::Event>);

    /// Runs the node's tasks.
    fn spawn(&self) -> Arc<dyn Spawn>;

    /// The node's wall clock.
    fn wall_clock(&self) -> WallClock;

    /// The seed of the node's randomness. An environment makes runs
    /// repeatable: the node then also derives its request-id key and link
    /// nonces from its identity instead of drawing them.
    fn seed(&self) -> u64;

    /// Opens the durable host's store (for a node with a data dir), with
    /// the reports of batches written and what it held.
    fn open_store(
        &self,
    ) -> (
        Box<dyn durable::Backend>,
        mpsc::UnboundedReceiver<u64>,
        crate::engine::durable::Loaded,
    );
}

/// What carries a node's links: it dials peers, opens their data streams,
/// sends control messages and closes connections. Stream and connection
/// events come back on the channel [`Environment::attach`] returned.
pub(crate) trait Transport: Send + Sync + Debug {
    fn dial_peer(&self, peer: NodeId, addrs: Vec<Multiaddr>) -> BoxFuture<'_, ()>;
    /// Sends a control message (lossy, unordered); false if it could not
    /// be queued.
    fn send_control(&self, peer: NodeId, bytes: Vec<u8>) -> bool;
    /// Opens a new data stream to `peer`, replacing any it has.
    fn fresh_stream(&self, peer: NodeId) -> BoxFuture<'_, ()>;
    /// Opens a data stream to `peer` unless one is open or opening.
    fn open_stream(&self, peer: NodeId) -> BoxFuture<'_, ()>;
    fn disconnect(&self, peer: NodeId) -> BoxFuture<'_, ()>;
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}

/// Spawns a node's tasks (the simulator's gate can pause or kill them).
pub(crate) trait Spawn: Send + Sync + Debug {
    fn spawn(&self, fut: BoxFuture<'static, ()>) -> tokio::task::AbortHandle;
}

/// Spawns the node's tasks: on tokio directly, or through the
/// environment's [`Spawn`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Spawner {
    with: Option<Arc<dyn Spawn>>,
}

impl Spawner {
    pub(crate) fn new(with: Arc<dyn Spawn>) -> Spawner {
        Spawner { with: Some(with) }
    }

    pub(crate) fn spawn<F>(&self, fut: F) -> tokio::task::AbortHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match &self.with {
            None => tokio::spawn(fut).abort_handle(),
            Some(with) => with.spawn(Box::pin(fut)),
        }
    }
}

/// The real transport: the QUIC swarm.
impl Transport for quic::Handle {
    fn dial_peer(&self, peer: NodeId, addrs: Vec<Multiaddr>) -> BoxFuture<'_, ()> {
        Box::pin(quic::Handle::dial_peer(self, peer, addrs))
    }

    fn send_control(&self, peer: NodeId, bytes: Vec<u8>) -> bool {
        quic::Handle::send_control(self, peer, bytes)
    }

    fn fresh_stream(&self, peer: NodeId) -> BoxFuture<'_, ()> {
        Box::pin(quic::Handle::fresh_stream(self, peer))
    }

    fn open_stream(&self, peer: NodeId) -> BoxFuture<'_, ()> {
        Box::pin(quic::Handle::open_stream(self, peer))
    }

    fn disconnect(&self, peer: NodeId) -> BoxFuture<'_, ()> {
        Box::pin(quic::Handle::disconnect(self, peer))
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(quic::Handle::shutdown(self))
    }
}
