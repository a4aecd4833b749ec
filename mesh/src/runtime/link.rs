//! Per-link I/O tasks: a writer that drains the link's [`Outbox`] into the
//! stream, and a reader that checks the peer's handshake and hands frames to
//! the node task in batches.

use std::sync::Arc;

use bytes::Bytes;
use futures::{io::WriteHalf, AsyncReadExt, AsyncWriteExt};
use mesh_transports::{frame::FrameReader, quic::Stream};
use tokio::sync::mpsc;

use super::queue::Outbox;
use crate::{
    core::NodeId,
    wire::{self, Frame, WireError, MAGIC, PROTOCOL_VERSION},
};

/// Identifies one link (one stream) for the node task's lifetime.
pub(crate) type LinkId = u64;

/// What a link's tasks report to the node task.
#[derive(Debug)]
pub(crate) enum LinkEvent {
    /// The peer's handshake arrived and is valid.
    Up {
        link: LinkId,
        peer: NodeId,
        incarnation: u64,
        addrs: Vec<Vec<u8>>,
    },
    /// Frames after the handshake, in order.
    Frames { link: LinkId, frames: Vec<Bytes> },
    /// The link ended: the stream closed, failed, or the peer misbehaved.
    Closed {
        link: LinkId,
        peer: NodeId,
        error: Option<String>,
    },
}

/// Why a link was dropped during the handshake.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("{0}")]
    Frame(#[from] mesh_transports::frame::FrameError),
    #[error("stream closed before the handshake")]
    Eof,
}

/// Starts the reader and writer of a new stream. `hello` is our encoded
/// handshake frame, written before anything in the outbox.
// Each argument is a distinct part of the link; bundling them would only
// move the list elsewhere.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn(
    spawner: &super::Spawner,
    link: LinkId,
    peer: NodeId,
    stream: Stream,
    hello: Vec<u8>,
    outbox: Arc<Outbox>,
    max_frame: usize,
    events: mpsc::Sender<LinkEvent>,
) -> tokio::task::AbortHandle {
    let (read, write) = stream.split();
    spawner.spawn(write_loop(write, hello, outbox));
    spawner.spawn(read_loop(link, peer, read, max_frame, events))
}

async fn write_loop(mut io: WriteHalf<Stream>, hello: Vec<u8>, outbox: Arc<Outbox>) {
    if let Err(e) = io.write_all(&hello).await {
        tracing::debug!(error = %e, "link write failed");
        outbox.close();
        return;
    }
    let mut chunk = Vec::with_capacity(64 * 1024);
    while outbox.take(&mut chunk).await {
        if let Err(e) = io.write_all(&chunk).await {
            tracing::debug!(error = %e, "link write failed");
            outbox.close();
            return;
        }
        chunk.clear();
        // Give the buffer back its usual size after a burst.
        if chunk.capacity() > 1024 * 1024 {
            chunk = Vec::with_capacity(64 * 1024);
        }
    }
    let _ = io.flush().await;
    let _ = io.close().await;
}

async fn read_loop(
    link: LinkId,
    peer: NodeId,
    io: futures::io::ReadHalf<Stream>,
    max_frame: usize,
    events: mpsc::Sender<LinkEvent>,
) {
    let mut reader = FrameReader::new(io, max_frame);
    let error = match handshake(&mut reader).await {
        Ok((incarnation, addrs)) => {
            let up = LinkEvent::Up {
                link,
                peer,
                incarnation,
                addrs,
            };
            if events.send(up).await.is_err() {
                return;
            }
            loop {
                let mut frames = Vec::new();
                match reader.read_batch(&mut frames).await {
                    Ok(true) => {
                        if events
                            .send(LinkEvent::Frames { link, frames })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(false) => break None,
                    Err(e) => break Some(e.to_string()),
                }
            }
        }
        // A peer that goes away before saying anything is churn, not an error.
        Err(HandshakeError::Eof) => None,
        Err(e) => Some(format!("handshake failed: {e}")),
    };
    let _ = events.send(LinkEvent::Closed { link, peer, error }).await;
}

/// Most frames one control stream may carry.
const MAX_CONTROL_FRAMES: usize = 64;
/// Largest control frame: membership messages are small.
const MAX_CONTROL_FRAME: usize = 64 * 1024;
/// Most bytes one control stream may carry.
pub(crate) const MAX_CONTROL_BYTES: usize = 256 * 1024;
/// How long a peer may take to deliver one control stream.
const CONTROL_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads one control stream (a few frames, then end of stream) and hands
/// its frames, or why they were refused, to the node task.
pub(crate) fn spawn_control_reader(
    spawner: &super::Spawner,
    peer: NodeId,
    stream: Stream,
    permit: tokio::sync::OwnedSemaphorePermit,
    events: mpsc::Sender<(NodeId, Result<Vec<Bytes>, String>)>,
) {
    spawner.spawn(async move {
        let _permit = permit;
        let mut reader = FrameReader::new(stream, MAX_CONTROL_FRAME);
        let read = async {
            let mut frames = Vec::new();
            let mut bytes = 0;
            while reader.read_batch(&mut frames).await? {
                bytes = frames.iter().map(|f| f.len()).sum::<usize>();
                if frames.len() > MAX_CONTROL_FRAMES || bytes > MAX_CONTROL_BYTES {
                    return Ok::<_, mesh_transports::frame::FrameError>(Err(format!(
                        "control stream over its limits ({} frames, {bytes} bytes)",
                        frames.len()
                    )));
                }
            }
            let _ = bytes;
            Ok(Ok(frames))
        };
        let result = match tokio::time::timeout(CONTROL_READ_TIMEOUT, read).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("control stream not finished in time".to_owned()),
        };
        let _ = events.send((peer, result)).await;
    });
}

async fn handshake<R: futures::AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
) -> Result<(u64, Vec<Vec<u8>>), HandshakeError> {
    let first = reader.read_one().await?.ok_or(HandshakeError::Eof)?;
    match wire::decode(&first)? {
        Frame::Hello(h) => {
            if h.magic != MAGIC {
                return Err(WireError::BadMagic(h.magic).into());
            }
            if h.version != PROTOCOL_VERSION {
                return Err(WireError::UnsupportedVersion(h.version).into());
            }
            Ok((
                h.incarnation,
                h.addrs.iter().map(|a| a.0.to_vec()).collect(),
            ))
        }
        _ => Err(WireError::ExpectedHello.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Hello, Raw};

    fn frame(f: &Frame<'_>) -> Vec<u8> {
        let mut b = Vec::new();
        wire::encode(&mut b, f);
        b
    }

    fn run(bytes: Vec<u8>) -> Result<(u64, Vec<Vec<u8>>), HandshakeError> {
        let mut r = FrameReader::new(futures::io::Cursor::new(bytes), 1024);
        futures::executor::block_on(handshake(&mut r))
    }

    #[test]
    fn handshake_checks_magic_version_and_order() {
        let ok = Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            features: 0,
            incarnation: 3,
            addrs: vec![Raw(b"a")],
        };
        assert_eq!(
            run(frame(&Frame::Hello(ok.clone()))).unwrap(),
            (3, vec![b"a".to_vec()])
        );
        let bad_version = Hello {
            version: 99,
            ..ok.clone()
        };
        let err = run(frame(&Frame::Hello(bad_version)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported protocol version 99"), "{err}");
        let bad_magic = Hello { magic: 1, ..ok };
        assert!(run(frame(&Frame::Hello(bad_magic)))
            .unwrap_err()
            .to_string()
            .contains("magic"));
        assert!(matches!(
            run(frame(&Frame::Bye)),
            Err(HandshakeError::Wire(WireError::ExpectedHello))
        ));
        assert!(matches!(run(vec![]), Err(HandshakeError::Eof)));
        // Garbage, truncated and oversize inputs: errors, no panic.
        assert!(run(vec![3, 0, 0, 0, 0xff, 0xff, 0xff]).is_err());
        assert!(run(vec![3, 0, 0]).is_err());
        assert!(run(vec![0xff, 0xff, 0xff, 0x7f]).is_err());
    }
}
