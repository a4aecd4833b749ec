//! Sans-IO protocol cores.
//!
//! Every core here is a plain state machine in the manner of `quinn-proto`:
//! it takes time (`now: Instant`) and randomness (`&mut impl RngCore`) as
//! arguments, never reads a clock, opens a socket or spawns a task. Inputs are
//! `handle_*` methods; outputs are drained with `poll_*` methods. A driver
//! (the tokio [`crate::runtime`], or a simulator) owns the I/O.
//!
//! - [`topic`]: topic names and subscription patterns (`*`, `>`).
//! - [`membership`]: SWIM-style failure detection and member dissemination.
//! - [`interest`]: versioned subscription declarations per node.
//! - [`gossip`]: HyParView overlay and Plumtree broadcast (gossip mode).
//! - [`queue`]: work queues on their host: credits, acks, redelivery,
//!   dead letters.
//! - [`stream`]: stream partitions on their host: append, retention,
//!   credit-based readers, committed group offsets.
//! - [`raft`]: consensus for one replica set (election with pre-vote and
//!   check-quorum, log replication, the commit rule, term fencing).
//! - [`replica`]: a queue replicated over a Raft group: the ops its
//!   replicas copy, the state they build, confirm-on-commit and serving.
//! - [`pubsub`]: routing published messages to interested peers, and
//!   delivering received ones to local subscriptions.

pub mod gossip;
pub mod interest;
pub mod membership;
pub mod pubsub;
pub mod queue;
pub mod raft;
pub mod replica;
pub mod stream;
pub mod topic;

/// The identity of a node in the mesh: its libp2p peer id (derived from its
/// Ed25519 public key).
pub type NodeId = libp2p::PeerId;
