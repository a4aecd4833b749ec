//! mesh: a brokerless peer-to-peer messaging mesh.
//!
//! Every service embeds a [`Node`]; nodes find each other (bootstrap peers,
//! mDNS, Kademlia) and talk directly over QUIC, with no broker anywhere.
//!
//! Layout:
//! - [`core`]: sans-IO protocol state machines (topics, membership,
//!   interest, pub/sub routing). No tokio, no sockets, no clock.
//! - [`wire`]: the frames peers exchange.
//! - `runtime`: the tokio driver that runs the cores over QUIC links.
//! - [`node`]: the public API ([`Node`], [`Subscription`], [`Message`]).
//! - [`metrics`]: [`Node::metrics`] counters and gauges, and (feature
//!   `prometheus`, on by default) an HTTP endpoint serving them.
//! - [`queue`]: work queues ([`Node::queue`]): acks, redelivery, dead
//!   letters.
//! - [`rpc`]: request/reply ([`Node::request`], [`Node::serve`]).
//! - [`stream`]: partitioned logs ([`Node::stream`]): offsets, replay,
//!   consumer groups, retention.
//! - [`window`]: windowed aggregation over streams of records.
//! - `store` (feature `sqlite`, on by default): the SQLite outbox, inbox
//!   and durable host state.
//! - [`sim`]: the deterministic simulator: many nodes, a simulated network
//!   with partitions and faults, virtual time.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use futures::StreamExt;
//!
//! let a = mesh::Node::builder().listen("/ip4/127.0.0.1/udp/0/quic-v1".parse()?).start().await?;
//! let addr = a.listen_addrs().await.remove(0);
//! let b = mesh::Node::builder().bootstrap(addr).start().await?;
//!
//! let mut sub = a.subscribe("orders.>").await?;
//! b.publish("orders.eu.created", "order 42").await?;
//! let msg = sub.next().await.expect("node running");
//! assert_eq!(msg.payload, "order 42");
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod core;
pub(crate) mod engine;
// It drives the real node on a paused clock: the simulator's feature.
#[cfg(feature = "sim")]
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod node;
pub mod queue;
pub mod rpc;
pub(crate) mod runtime;
pub mod security;
#[cfg(feature = "sqlite")]
pub mod store;
pub mod stream;

/// What the unit tests of the cores share, outside the cores.
#[cfg(test)]
pub(crate) mod test_support {
    /// The start of virtual time in the cores' tests. The cores never read
    /// a clock; a test only needs some `Instant` to count from, and every
    /// later time is an offset from it. The one clock read of those tests,
    /// made here in the driver's place.
    pub(crate) fn test_origin() -> std::time::Instant {
        std::time::Instant::now()
    }

    /// A node id from a fixed key (`[i; 32]`): the same in every run.
    pub(crate) fn node_id(i: u8) -> crate::core::NodeId {
        libp2p::identity::Keypair::ed25519_from_bytes([i; 32])
            .expect("any 32 bytes are an Ed25519 key")
            .public()
            .to_peer_id()
    }
}
#[cfg(feature = "sim")]
pub mod sim;
pub mod window;
pub mod wire;

pub use crate::core::{
    pubsub::{Message, MessageId},
    topic::{Pattern, Topic, TopicError},
    NodeId,
};
pub use bytes::Bytes;
pub use libp2p::{identity::Keypair, Multiaddr, PeerId};
pub use mesh_transports::shm::WaitPolicy;
pub use metrics::Metrics;
pub use node::{
    Builder, Delivery, InboundLimit, Lagged, Node, Overflow, PeerInfo, PeerState, PublishError,
    Publisher, ReadyError, ReliableSubscription, ShmConfig, ShutdownReport, StartError,
    SubscribeError, SubscribeOptions, Subscription,
};
