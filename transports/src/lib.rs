//! How mesh peers are found and reached, and how framed bytes move between
//! two of them.
//!
//! - [`frame`]: u32-length-prefixed frames, read and written in batches.
//! - [`quic`]: the libp2p swarm (QUIC, mDNS, Kademlia, identify) and one
//!   long-lived data stream per peer.
//! - [`shm`]: single-producer single-consumer byte rings in shared-memory
//!   files, between processes on one host.
//!
//! ```
//! use mesh_transports::frame::{encode_frame, split_frames, DEFAULT_MAX_FRAME};
//! let mut wire = Vec::new();
//! encode_frame(&mut wire, |b| b.extend_from_slice(b"hello"));
//! let mut buf = bytes::BytesMut::from(&wire[..]);
//! let mut frames = Vec::new();
//! split_frames(&mut buf, DEFAULT_MAX_FRAME, &mut frames).unwrap();
//! assert_eq!(frames[0], &b"hello"[..]);
//! ```
#![warn(missing_docs)]

pub mod frame;
pub mod quic;
// The rings map shared memory and wait on futexes: unsafe by nature, kept
// to `shm::sys` and the `Memory` implementation.
#[cfg(unix)]
#[allow(unsafe_code)]
pub mod shm;

pub use libp2p::{identity, Multiaddr, PeerId};

/// A bidirectional byte stream to a peer.
pub trait DuplexStream: futures::AsyncRead + futures::AsyncWrite + Send + Unpin {}
impl<T: futures::AsyncRead + futures::AsyncWrite + Send + Unpin> DuplexStream for T {}

impl std::fmt::Debug for dyn DuplexStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stream")
    }
}

/// A stream as the node runtime sees it, whatever transport carries it
/// (a QUIC stream, or an in-memory pipe in the simulator).
pub type Stream = Box<dyn DuplexStream>;
