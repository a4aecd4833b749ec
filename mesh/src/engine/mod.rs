//! The node's protocol rules that are not in a core, out of the tokio task:
//! sans-IO state machines the runtime drives (time comes in as `Instant`,
//! output goes out as values), unit tested here in virtual time.
//!
//! - `hosting`: which queues and streams this node hosts, which host a
//!   message or record goes to (rendezvous), gathers over hosts.
//! - `access`: the reserved names, who may declare and read what, and
//!   each peer's budget of costly requests.
//! - `group`: which partitions a stream consumer or group member reads,
//!   and where each read starts.
//! - `reliable`: the retransmit windows of reliable pub/sub and what a
//!   receiver does with a numbered message (deliver, drop a duplicate, ask
//!   for a resend, hear that messages were lost).

pub(crate) mod access;
pub(crate) mod group;
pub(crate) mod hosting;
pub(crate) mod reliable;
