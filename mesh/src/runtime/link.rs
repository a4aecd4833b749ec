//! Per-link I/O tasks: a writer that drains the link's [`Outbox`] into the
//! stream, and a reader that checks the peer's handshake and hands frames to
//! the node task in batches.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{io::WriteHalf, AsyncReadExt, AsyncWriteExt};
use mesh_transports::{
    frame::{split_frames, FrameReader},
    quic::Stream,
};
use tokio::sync::mpsc;

use super::queue::{Outbox, Taken};
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
        hello: PeerHello,
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

/// What the peer's `Hello` said, parsed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PeerHello {
    pub(crate) incarnation: u64,
    pub(crate) addrs: Vec<Vec<u8>>,
    pub(crate) features: u64,
    pub(crate) host: Vec<u8>,
    pub(crate) uid: u32,
}

/// Why a link was dropped during the handshake.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("{0}")]
    Frame(#[from] mesh_transports::frame::FrameError),
    #[error("stream closed before the handshake")]
    Eof,
}

/// The reading end of a link's shared-memory ring, handed to the reader
/// task before the peer's `ShmSwitch` can arrive.
pub(crate) type ShmRxSlot = Arc<std::sync::Mutex<Option<ShmRx>>>;
pub(crate) type ShmRx = mesh_transports::shm::Consumer;

/// Bytes taken from a ring per batch handed to the node task.
const SHM_READ_BATCH: usize = 256 * 1024;
/// Largest ring record the writer makes (a batch spans several).
const SHM_RECORD: usize = 64 * 1024;

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
    shm_rx: ShmRxSlot,
    max_frame: usize,
    events: mpsc::Sender<LinkEvent>,
) -> tokio::task::AbortHandle {
    let (read, write) = stream.split();
    spawner.spawn(write_loop(link, peer, write, hello, outbox, events.clone()));
    spawner.spawn(read_loop(link, peer, read, shm_rx, max_frame, events))
}

async fn write_loop(
    link: LinkId,
    peer: NodeId,
    mut io: WriteHalf<Stream>,
    hello: Vec<u8>,
    outbox: Arc<Outbox>,
    events: mpsc::Sender<LinkEvent>,
) {
    // A failed write ends the link: the node must stop routing to it even
    // if the reader has not noticed (a ring's reader and writer fail apart).
    let failed = |error: String| {
        let (outbox, events) = (&outbox, &events);
        async move {
            tracing::debug!(%error, "link write failed");
            outbox.close();
            let error = Some(format!("write failed: {error}"));
            let _ = events.send(LinkEvent::Closed { link, peer, error }).await;
        }
    };
    if let Err(e) = io.write_all(&hello).await {
        failed(e.to_string()).await;
        return;
    }
    let mut ring: Option<super::queue::ShmTx> = None;
    let mut chunk = Vec::with_capacity(64 * 1024);
    loop {
        let switch = match outbox.take(&mut chunk).await {
            Taken::Closed => break,
            Taken::Bytes => None,
            Taken::Switch(r) => Some(r),
        };
        let written = match &mut ring {
            Some(r) => r
                .write_all(&chunk, SHM_RECORD)
                .await
                .map_err(|e| e.to_string()),
            None => io.write_all(&chunk).await.map_err(|e| e.to_string()),
        };
        if let Err(e) = written {
            failed(e).await;
            return;
        }
        if let Some(r) = switch {
            // Everything before the switch is on the network stream; the
            // peer reads it all before it turns to the ring.
            if let Err(e) = io.flush().await {
                failed(e.to_string()).await;
                return;
            }
            ring = Some(r);
        }
        chunk.clear();
        // Give the buffer back its usual size after a burst.
        if chunk.capacity() > 1024 * 1024 {
            chunk = Vec::with_capacity(64 * 1024);
        }
    }
    // Dropping the ring's producer closes it: the peer reads to its end.
    drop(ring);
    let _ = io.flush().await;
    let _ = io.close().await;
}

async fn read_loop(
    link: LinkId,
    peer: NodeId,
    io: futures::io::ReadHalf<Stream>,
    shm_rx: ShmRxSlot,
    max_frame: usize,
    events: mpsc::Sender<LinkEvent>,
) {
    let mut reader = FrameReader::new(io, max_frame);
    let error = match handshake(&mut reader).await {
        Ok(hello) => {
            if events
                .send(LinkEvent::Up { link, peer, hello })
                .await
                .is_err()
            {
                return;
            }
            loop {
                let mut frames = Vec::new();
                match reader.read_batch(&mut frames).await {
                    Ok(true) => {
                        let switch = frames.iter().position(|f| wire::is_shm_switch(f));
                        if let Some(at) = switch {
                            if at + 1 != frames.len() || reader.buffered() > 0 {
                                break Some("data after ShmSwitch on the network stream".into());
                            }
                        }
                        if events
                            .send(LinkEvent::Frames { link, frames })
                            .await
                            .is_err()
                        {
                            return;
                        }
                        if switch.is_some() {
                            let ring = shm_rx.lock().unwrap_or_else(|e| e.into_inner()).take();
                            break match ring {
                                Some(ring) => read_ring(link, ring, max_frame, &events).await,
                                None => Some("ShmSwitch without shared-memory rings".into()),
                            };
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

/// Reads the rest of the link from its ring: `None` when the peer closed
/// it cleanly, or what went wrong (a dead peer, a corrupt ring).
async fn read_ring(
    link: LinkId,
    mut ring: ShmRx,
    max_frame: usize,
    events: &mpsc::Sender<LinkEvent>,
) -> Option<String> {
    // Room for a batch plus one more record, so that taking records never
    // reallocates (and copies) the buffer; frames are slices of it.
    const ROOM: usize = SHM_READ_BATCH + SHM_RECORD;
    let mut buf = BytesMut::with_capacity(ROOM);
    loop {
        if buf.capacity() - buf.len() < ROOM {
            buf.reserve(ROOM);
        }
        let limit = buf.len() + SHM_READ_BATCH;
        match ring.read_into(&mut buf, limit).await {
            Ok(true) => {}
            Ok(false) if buf.is_empty() => return None,
            Ok(false) => return Some("shared-memory ring ended inside a frame".into()),
            Err(e) => return Some(format!("shared-memory ring: {e}")),
        }
        let mut frames = Vec::new();
        if let Err(e) = split_frames(&mut buf, max_frame, &mut frames) {
            return Some(e.to_string());
        }
        if !frames.is_empty()
            && events
                .send(LinkEvent::Frames { link, frames })
                .await
                .is_err()
        {
            return None;
        }
    }
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
        let mut reader = control_reader(stream);
        let read = read_control(&mut reader);
        let result = match tokio::time::timeout(CONTROL_READ_TIMEOUT, read).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("control stream not finished in time".to_owned()),
        };
        let _ = events.send((peer, result)).await;
    });
}

/// A reader of one control stream, with its frame limit.
pub(crate) fn control_reader<R: futures::AsyncRead + Unpin>(io: R) -> FrameReader<R> {
    FrameReader::new(io, MAX_CONTROL_FRAME)
}

/// Reads a control stream to its end: its frames, or why they were refused.
pub(crate) async fn read_control<R: futures::AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
) -> Result<Result<Vec<Bytes>, String>, mesh_transports::frame::FrameError> {
    let mut frames = Vec::new();
    while reader.read_batch(&mut frames).await? {
        let bytes = frames.iter().map(|f| f.len()).sum::<usize>();
        if frames.len() > MAX_CONTROL_FRAMES || bytes > MAX_CONTROL_BYTES {
            return Ok(Err(format!(
                "control stream over its limits ({} frames, {bytes} bytes)",
                frames.len()
            )));
        }
    }
    Ok(Ok(frames))
}

pub(crate) async fn handshake<R: futures::AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
) -> Result<PeerHello, HandshakeError> {
    let first = reader.read_one().await?.ok_or(HandshakeError::Eof)?;
    match wire::decode(&first)? {
        Frame::Hello(h) => {
            if h.magic != MAGIC {
                return Err(WireError::BadMagic(h.magic).into());
            }
            if h.version != PROTOCOL_VERSION {
                return Err(WireError::UnsupportedVersion(h.version).into());
            }
            Ok(PeerHello {
                incarnation: h.incarnation,
                addrs: h.addrs.iter().map(|a| a.0.to_vec()).collect(),
                features: h.features,
                host: h.host.0.to_vec(),
                uid: h.uid,
            })
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

    fn run(bytes: Vec<u8>) -> Result<PeerHello, HandshakeError> {
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
            host: Raw(b"h"),
            uid: 7,
        };
        assert_eq!(
            run(frame(&Frame::Hello(ok.clone()))).unwrap(),
            PeerHello {
                incarnation: 3,
                addrs: vec![b"a".to_vec()],
                features: 0,
                host: b"h".to_vec(),
                uid: 7,
            }
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
