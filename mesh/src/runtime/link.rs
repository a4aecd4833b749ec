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
    security::{Admission, Nonce, MAX_SECRETS},
    wire::{self, Frame, WireError, MAGIC, PROTOCOL_VERSION},
};

/// How long a peer may take to send its `Hello` and `Auth` after the
/// stream opened.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The largest frame read before the handshake is done: `Hello` and
/// `Auth` are a few hundred bytes.
const HANDSHAKE_MAX_FRAME: usize = 64 * 1024;

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
    /// The peer is not admitted to this private mesh (no valid proof of
    /// the secret, or not on the allow-list); nothing else was read from
    /// it, nor sent to it.
    Refused {
        link: LinkId,
        peer: NodeId,
        reason: String,
    },
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
    #[error("handshake not finished in time")]
    Timeout,
    /// The peer is not admitted (a private mesh).
    #[error("{0}")]
    Refused(&'static str),
}

/// Our side of a link's handshake: what we send and check.
pub(crate) struct Handshake {
    /// Our encoded `Hello` frame (in a private mesh a bare one: magic,
    /// version and nonce only).
    pub(crate) hello: Vec<u8>,
    /// In a private mesh, our full `Hello` (incarnation, addresses, host,
    /// uid), sent once the peer's proof checked, before anything else.
    pub(crate) details: Option<Vec<u8>>,
    /// The nonce in it.
    pub(crate) nonce: Nonce,
    pub(crate) local: NodeId,
    pub(crate) admission: Arc<Admission>,
}

/// The reading end of a link's shared-memory ring, handed to the reader
/// task before the peer's `ShmSwitch` can arrive.
pub(crate) type ShmRxSlot = Arc<std::sync::Mutex<Option<ShmRx>>>;
pub(crate) type ShmRx = mesh_transports::shm::Consumer;

/// Bytes taken from a ring per batch handed to the node task.
const SHM_READ_BATCH: usize = 256 * 1024;
/// Largest ring record the writer makes (a batch spans several).
const SHM_RECORD: usize = 64 * 1024;

/// Starts the reader and writer of a new stream.
///
/// The handshake: each side writes its `Hello`; once it has read the
/// peer's, it writes its `Auth` (proofs over both ids and both nonces);
/// once it has checked the peer's `Auth`, the writer starts on the outbox
/// and the reader reports the link up. So nothing in the outbox (our view
/// of the mesh, our topics) reaches a peer that is not admitted. A node
/// that is not private has nothing to keep from anyone: it writes its
/// `Hello`, an empty `Auth` and its outbox at once.
// Each argument is a distinct part of the link; bundling them would only
// move the list elsewhere.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn(
    spawner: &super::Spawner,
    link: LinkId,
    peer: NodeId,
    stream: Stream,
    handshake: Handshake,
    outbox: Arc<Outbox>,
    shm_rx: ShmRxSlot,
    limits: ReadLimits,
    events: mpsc::Sender<LinkEvent>,
) -> tokio::task::AbortHandle {
    let (read, write) = stream.split();
    let (nonce_tx, nonce_rx) = tokio::sync::oneshot::channel();
    let (admitted_tx, admitted_rx) = tokio::sync::oneshot::channel();
    let handshake = Arc::new(handshake);
    spawner.spawn(write_loop(
        link,
        peer,
        write,
        WriterStart {
            handshake: handshake.clone(),
            peer_nonce: nonce_rx,
            admitted: admitted_rx,
        },
        outbox,
        events.clone(),
    ));
    spawner.spawn(read_loop(
        link,
        peer,
        read,
        ReaderStart {
            handshake,
            peer_nonce: nonce_tx,
            admitted: admitted_tx,
        },
        shm_rx,
        limits,
        events,
    ))
}

/// What a link reader may take from its peer.
#[derive(Debug, Clone)]
pub(crate) struct ReadLimits {
    /// Largest frame.
    pub(crate) max_frame: usize,
    /// The peer's inbound rate, if limited.
    pub(crate) rate: Option<crate::node::InboundLimit>,
    /// Node-wide counts of what the readers did.
    pub(crate) counts: Arc<ReaderCounts>,
}

/// What link readers count (node-wide): pauses for their peers' rate
/// limits, and gossip messages they dropped because the signature did not
/// check.
#[derive(Debug, Default)]
pub(crate) struct ReaderCounts {
    pub(crate) pauses: std::sync::atomic::AtomicU64,
    pub(crate) micros: std::sync::atomic::AtomicU64,
    pub(crate) gossip_forged: std::sync::atomic::AtomicU64,
}

/// Checks the origin signature of every gossip message a link brings,
/// before the node task sees it: the Ed25519 checks are most of a gossip
/// message's cost, and here they run beside the node task (one reader per
/// link), which stays free for membership and everything else. A message
/// that fails is dropped, counted and logged (the first per link).
#[derive(Debug, Default)]
struct GossipCheck {
    codec: wire::GossipCodec,
    verifier: crate::security::Verifier,
    forged: u64,
}

impl GossipCheck {
    /// Drops forged gossip messages from `frames`. Frames that do not
    /// decode are left for the node task, which reports them.
    fn filter(&mut self, peer: NodeId, frames: &mut Vec<Bytes>, counts: &ReaderCounts) {
        let before = self.forged;
        frames.retain(|f| {
            if !wire::is_gossip(f) {
                return true;
            }
            let Ok(wire::Frame::Gossip(g)) = wire::decode(f) else {
                return true;
            };
            let Ok(crate::core::gossip::Message::Gossip {
                id,
                topic,
                payload,
                stamp,
                ..
            }) = self.codec.decode(f, &g)
            else {
                return true;
            };
            let good = self.verifier.verify(
                id.0,
                id.1,
                stamp.timestamp,
                &topic,
                &payload,
                &stamp.signature,
            );
            if !good {
                self.forged += 1;
                if self.forged == 1 {
                    tracing::warn!(%peer, origin = %id.0, seq = id.1, "dropped a gossip message whose signature does not check (forged or altered by a relay); further ones from this link are only counted");
                }
            }
            good
        });
        if self.forged > before {
            counts
                .gossip_forged
                .fetch_add(self.forged - before, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A token bucket per link (one second of burst): a reader that has taken
/// more than the limit pauses before reading on, so the peer's QUIC flow
/// control window (or ring) fills and pushes back on that peer alone.
/// Nothing is dropped.
struct Throttle {
    bytes_per_sec: f64,
    frames_per_sec: f64,
    bytes: f64,
    frames: f64,
    at: tokio::time::Instant,
    counts: Arc<ReaderCounts>,
}

impl Throttle {
    fn new(limits: &ReadLimits) -> Option<Self> {
        let rate = limits.rate?;
        let (bytes_per_sec, frames_per_sec) =
            (rate.bytes_per_sec as f64, rate.frames_per_sec as f64);
        Some(Self {
            bytes_per_sec,
            frames_per_sec,
            bytes: bytes_per_sec,
            frames: frames_per_sec,
            at: tokio::time::Instant::now(),
            counts: limits.counts.clone(),
        })
    }

    /// Charges a batch just read: how long to wait before reading on (the
    /// bucket is in debt), if at all.
    fn charge(&mut self, frames: &[bytes::Bytes]) -> Option<std::time::Duration> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = tokio::time::Instant::now();
        let dt = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        let bytes: usize = frames.iter().map(|f| f.len() + 4).sum();
        self.bytes = (self.bytes + dt * self.bytes_per_sec).min(self.bytes_per_sec) - bytes as f64;
        self.frames =
            (self.frames + dt * self.frames_per_sec).min(self.frames_per_sec) - frames.len() as f64;
        let wait = f64::max(
            -self.bytes / self.bytes_per_sec,
            -self.frames / self.frames_per_sec,
        );
        if wait <= 0.0 {
            return None;
        }
        let wait = std::time::Duration::from_secs_f64(wait.min(3600.0));
        self.counts.pauses.fetch_add(1, Relaxed);
        self.counts
            .micros
            .fetch_add(wait.as_micros() as u64, Relaxed);
        Some(wait)
    }
}

/// What the writer needs for the handshake: the peer's nonce, then word
/// that the peer is admitted (both from the reader; a dropped sender means
/// the handshake failed and the reader reports it).
struct WriterStart {
    handshake: Arc<Handshake>,
    peer_nonce: tokio::sync::oneshot::Receiver<Nonce>,
    admitted: tokio::sync::oneshot::Receiver<()>,
}

struct ReaderStart {
    handshake: Arc<Handshake>,
    peer_nonce: tokio::sync::oneshot::Sender<Nonce>,
    admitted: tokio::sync::oneshot::Sender<()>,
}

async fn write_loop(
    link: LinkId,
    peer: NodeId,
    mut io: WriteHalf<Stream>,
    start: WriterStart,
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
    let hs = &start.handshake;
    if !hs.admission.is_private() {
        // Nothing to keep from anyone: Hello and an empty Auth at once, and
        // the outbox right after, as before private meshes existed.
        let mut first = hs.hello.clone();
        wire::encode(&mut first, &Frame::Auth { proofs: Vec::new() });
        if let Err(e) = io.write_all(&first).await {
            failed(e.to_string()).await;
            return;
        }
    } else if !authenticate(&mut io, start, &peer, &failed).await {
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
        outbox.written();
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

/// A private mesh's side of the handshake for the writer: our Hello, then
/// (once the reader has the peer's Hello) our proofs, then waiting until the
/// reader has checked the peer's. False if the link ends meanwhile (the
/// reader reports why).
async fn authenticate<F, Fut>(
    io: &mut WriteHalf<Stream>,
    start: WriterStart,
    peer: &NodeId,
    failed: &F,
) -> bool
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let hs = &start.handshake;
    if let Err(e) = io.write_all(&hs.hello).await {
        failed(e.to_string()).await;
        return false;
    }
    let Ok(peer_nonce) = start.peer_nonce.await else {
        return false;
    };
    let proofs = hs
        .admission
        .secret
        .as_ref()
        .map(|s| s.proofs(&hs.local, peer, &hs.nonce, &peer_nonce))
        .unwrap_or_default();
    let mut auth = Vec::new();
    wire::encode(&mut auth, &Frame::Auth { proofs });
    if let Err(e) = io.write_all(&auth).await {
        failed(e.to_string()).await;
        return false;
    }
    if start.admitted.await.is_err() {
        return false;
    }
    if let Some(details) = &hs.details {
        if let Err(e) = io.write_all(details).await {
            failed(e.to_string()).await;
            return false;
        }
    }
    true
}

async fn read_loop(
    link: LinkId,
    peer: NodeId,
    io: futures::io::ReadHalf<Stream>,
    start: ReaderStart,
    shm_rx: ShmRxSlot,
    limits: ReadLimits,
    events: mpsc::Sender<LinkEvent>,
) {
    let max_frame = limits.max_frame;
    let mut throttle = Throttle::new(&limits);
    let mut gossip = GossipCheck::default();
    // Until the handshake is done (and in a private mesh, the peer's
    // proof checked) a peer gets no more than a handshake's worth of
    // buffer: an announced 4 MiB frame is refused, not waited for.
    let mut reader = FrameReader::new(io, HANDSHAKE_MAX_FRAME.min(max_frame));
    let ReaderStart {
        handshake: hs,
        peer_nonce,
        admitted,
    } = start;
    let checked = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake(&mut reader, &hs, peer, |nonce| {
            let _ = peer_nonce.send(*nonce);
        }),
    )
    .await
    .unwrap_or(Err(HandshakeError::Timeout));
    let checked = match checked {
        Ok((hello, nonce)) => {
            let _ = admitted.send(());
            if hs.admission.is_private() {
                // The peer's details follow its proof, once it has ours.
                tokio::time::timeout(HANDSHAKE_TIMEOUT, details(&mut reader, &nonce))
                    .await
                    .unwrap_or(Err(HandshakeError::Timeout))
            } else {
                Ok(hello)
            }
        }
        Err(e) => Err(e),
    };
    let error = match checked {
        Ok(hello) => {
            reader.set_max_frame(max_frame);
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
                        gossip.filter(peer, &mut frames, &limits.counts);
                        let pause = throttle.as_mut().and_then(|t| t.charge(&frames));
                        if events
                            .send(LinkEvent::Frames { link, frames })
                            .await
                            .is_err()
                        {
                            return;
                        }
                        if let Some(pause) = pause {
                            tokio::time::sleep(pause).await;
                        }
                        if switch.is_some() {
                            let ring = shm_rx.lock().unwrap_or_else(|e| e.into_inner()).take();
                            break match ring {
                                Some(ring) => {
                                    read_ring(link, ring, max_frame, &events, |frames| {
                                        gossip.filter(peer, frames, &limits.counts);
                                        throttle.as_mut().and_then(|t| t.charge(frames))
                                    })
                                    .await
                                }
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
        Err(HandshakeError::Refused(reason)) => {
            let reason = reason.to_owned();
            let _ = events.send(LinkEvent::Refused { link, peer, reason }).await;
            return;
        }
        Err(e) => Some(format!("handshake failed: {e}")),
    };
    let _ = events.send(LinkEvent::Closed { link, peer, error }).await;
}

/// Reads the rest of the link from its ring: `None` when the peer closed
/// it cleanly, or what went wrong (a dead peer, a corrupt ring). Each
/// batch goes through `check` first (gossip signatures, the inbound
/// limit), which says how long to pause after handing it on.
async fn read_ring(
    link: LinkId,
    mut ring: ShmRx,
    max_frame: usize,
    events: &mpsc::Sender<LinkEvent>,
    mut check: impl FnMut(&mut Vec<Bytes>) -> Option<std::time::Duration>,
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
        let pause = check(&mut frames);
        if frames.is_empty() {
            continue;
        }
        if events
            .send(LinkEvent::Frames { link, frames })
            .await
            .is_err()
        {
            return None;
        }
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
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

/// Reads one `Hello` frame: its details and nonce.
async fn read_hello<R: futures::AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
) -> Result<(PeerHello, Nonce), HandshakeError> {
    let first = reader.read_one().await?.ok_or(HandshakeError::Eof)?;
    match wire::decode(&first)? {
        Frame::Hello(h) => {
            if h.magic != MAGIC {
                return Err(WireError::BadMagic(h.magic).into());
            }
            if h.version != PROTOCOL_VERSION {
                return Err(WireError::UnsupportedVersion(h.version).into());
            }
            let hello = PeerHello {
                incarnation: h.incarnation,
                addrs: h.addrs.iter().map(|a| a.0.to_vec()).collect(),
                features: h.features,
                host: h.host.0.to_vec(),
                uid: h.uid,
            };
            Ok((hello, h.nonce))
        }
        _ => Err(WireError::ExpectedHello.into()),
    }
}

/// In a private mesh, reads the peer's full `Hello`, which follows its
/// proof: the same nonce as its first.
async fn details<R: futures::AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    nonce: &Nonce,
) -> Result<PeerHello, HandshakeError> {
    let (hello, again) = read_hello(reader).await?;
    if again != *nonce {
        return Err(WireError::Unexpected("a second Hello of another link").into());
    }
    Ok(hello)
}

/// Reads and checks the peer's `Hello` (handing its nonce to `on_hello`,
/// so the writer can send our proofs) and then its `Auth`. Returns the
/// `Hello` (bare in a private mesh: [`details`] follow) and its nonce.
pub(crate) async fn handshake<R: futures::AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    ours: &Handshake,
    peer: NodeId,
    on_hello: impl FnOnce(&Nonce),
) -> Result<(PeerHello, Nonce), HandshakeError> {
    // The allow-list first: an outsider gets nothing, not even our proofs.
    if !ours.admission.allows(&peer) {
        return Err(HandshakeError::Refused("not on this node's allow-list"));
    }
    let (hello, nonce) = read_hello(reader).await?;
    on_hello(&nonce);
    let second = reader.read_one().await?.ok_or(HandshakeError::Eof)?;
    let Frame::Auth { proofs } = wire::decode(&second)? else {
        return Err(WireError::Unexpected("a frame before Auth").into());
    };
    if let Some(secret) = &ours.admission.secret {
        let proofs = &proofs[..proofs.len().min(MAX_SECRETS)];
        if proofs.is_empty() {
            return Err(HandshakeError::Refused(
                "no proof of the mesh secret (this is a private mesh)",
            ));
        }
        if !secret.verify(proofs, &peer, &ours.local, &nonce, &ours.nonce) {
            return Err(HandshakeError::Refused(
                "wrong proof of the mesh secret (another or an old secret)",
            ));
        }
    }
    Ok((hello, nonce))
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

    fn ours(admission: Admission) -> Handshake {
        Handshake {
            hello: Vec::new(),
            details: None,
            nonce: [4; 32],
            local: NodeId::random(),
            admission: Arc::new(admission),
        }
    }

    fn run_with(
        ours: &Handshake,
        peer: NodeId,
        bytes: Vec<u8>,
    ) -> Result<PeerHello, HandshakeError> {
        let mut r = FrameReader::new(futures::io::Cursor::new(bytes), 1024);
        futures::executor::block_on(handshake(&mut r, ours, peer, |_| {})).map(|(h, _)| h)
    }

    fn run(bytes: Vec<u8>) -> Result<PeerHello, HandshakeError> {
        run_with(&ours(Admission::default()), NodeId::random(), bytes)
    }

    fn hello() -> Hello<'static> {
        Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            features: 0,
            incarnation: 3,
            addrs: vec![Raw(b"a")],
            host: Raw(b"h"),
            uid: 7,
            nonce: [8; 32],
        }
    }

    #[test]
    fn private_meshes_admit_only_proofs_of_the_secret_and_listed_peers() {
        use crate::security::MeshSecret;
        let secret = MeshSecret::new("the secret of this mesh").unwrap();
        let us = ours(Admission {
            secret: Some(secret.clone()),
            allow: None,
        });
        let peer = NodeId::random();
        let with = |proofs: Vec<[u8; 32]>| {
            let mut b = frame(&Frame::Hello(hello()));
            b.extend(frame(&Frame::Auth { proofs }));
            run_with(&us, peer, b)
        };
        // The right proof: over the peer's id and nonce (its Hello's), then ours.
        let good = secret.proofs(&peer, &us.local, &[8; 32], &us.nonce);
        assert!(with(good.clone()).is_ok());
        for (proofs, why) in [
            (vec![], "no proof"),
            (
                MeshSecret::new("some other secret!!")
                    .unwrap()
                    .proofs(&peer, &us.local, &[8; 32], &us.nonce),
                "wrong proof",
            ),
            // Replayed from another link (other nonce) or made for another id.
            (
                secret.proofs(&peer, &us.local, &[8; 32], &[0; 32]),
                "wrong proof",
            ),
            (
                secret.proofs(&NodeId::random(), &us.local, &[8; 32], &us.nonce),
                "wrong proof",
            ),
        ] {
            let err = with(proofs).unwrap_err();
            assert!(
                matches!(err, HandshakeError::Refused(r) if r.contains(why)),
                "{err}"
            );
        }
        // Data instead of Auth: refused before it is looked at.
        let mut b = frame(&Frame::Hello(hello()));
        b.extend(frame(&Frame::Bye));
        assert!(run_with(&us, peer, b).is_err());
        // The allow-list: checked before anything is read.
        let listed = ours(Admission {
            secret: None,
            allow: Some([peer].into()),
        });
        let mut b = frame(&Frame::Hello(hello()));
        b.extend(frame(&Frame::Auth { proofs: vec![] }));
        assert!(run_with(&listed, peer, b).is_ok());
        assert!(matches!(
            run_with(&listed, NodeId::random(), vec![]),
            Err(HandshakeError::Refused(_))
        ));
    }

    #[test]
    fn handshake_checks_magic_version_and_order() {
        let ok = hello();
        assert_eq!(
            run([
                frame(&Frame::Hello(ok.clone())),
                frame(&Frame::Auth { proofs: vec![] })
            ]
            .concat())
            .unwrap(),
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

    /// Runs a link against a peer that sends `Hello` then `Auth` with
    /// `proofs(peer nonce, our nonce)`; returns what our side wrote and
    /// the first event it reported.
    async fn link_against(
        secret: &crate::security::MeshSecret,
        proofs: impl FnOnce(&NodeId, &NodeId, &Nonce) -> Vec<[u8; 32]>,
    ) -> (Vec<u8>, LinkEvent) {
        use futures::AsyncWriteExt as _;
        use tokio_util::compat::TokioAsyncReadCompatExt;
        let (ours_io, theirs_io) = tokio::io::duplex(1 << 20);
        let local = NodeId::random();
        let peer = NodeId::random();
        let outbox = Arc::new(Outbox::new(Arc::new(tokio::sync::Notify::new())));
        // What the node queued for the peer before the link came up: its
        // view of the mesh and topic names.
        let mut queued = frame(&Frame::Topic {
            id: 1,
            name: "payroll.secret",
        });
        outbox.push(&mut queued);
        let bare = Hello {
            nonce: [1; 32],
            features: 0,
            incarnation: 0,
            addrs: vec![],
            host: Raw(&[]),
            uid: 0,
            ..hello()
        };
        let our_hello = frame(&Frame::Hello(bare));
        let our_details = frame(&Frame::Hello(Hello {
            nonce: [1; 32],
            ..hello()
        }));
        let (events_tx, mut events) = mpsc::channel(8);
        let _reader = spawn(
            &super::super::Spawner::default(),
            1,
            peer,
            Box::new(ours_io.compat()),
            Handshake {
                hello: our_hello,
                details: Some(our_details),
                nonce: [1; 32],
                local,
                admission: Arc::new(Admission {
                    secret: Some(secret.clone()),
                    allow: None,
                }),
            },
            outbox.clone(),
            Default::default(),
            ReadLimits {
                max_frame: 1 << 20,
                rate: None,
                counts: Default::default(),
            },
            events_tx,
        );
        let (mut rd, mut wr) = futures::AsyncReadExt::split(theirs_io.compat());
        // The peer's bare Hello, its proof and (read only if the proof
        // checked) its details.
        let mut theirs = frame(&Frame::Hello(Hello {
            addrs: vec![],
            host: Raw(&[]),
            ..hello()
        }));
        theirs.extend(frame(&Frame::Auth {
            proofs: proofs(&peer, &local, &[1; 32]),
        }));
        theirs.extend(frame(&Frame::Hello(hello())));
        wr.write_all(&theirs).await.unwrap();
        let event = events.recv().await.unwrap();
        // Our side is done with the handshake either way: close it and
        // read everything it wrote.
        outbox.close();
        let mut written = Vec::new();
        let _ = futures::AsyncReadExt::read_to_end(&mut rd, &mut written).await;
        (written, event)
    }

    #[tokio::test]
    async fn nothing_but_the_handshake_reaches_a_peer_without_the_secret() {
        let secret = crate::security::MeshSecret::new("the secret of this mesh").unwrap();
        let outsider = crate::security::MeshSecret::new("a guess at the secret").unwrap();
        let (written, event) = link_against(&secret, |peer, local, our_nonce| {
            outsider.proofs(peer, local, &[8; 32], our_nonce)
        })
        .await;
        assert!(matches!(event, LinkEvent::Refused { .. }), "{event:?}");
        let mut r = FrameReader::new(futures::io::Cursor::new(written), 1 << 20);
        let mut frames = Vec::new();
        while let Ok(Some(f)) = r.read_one().await {
            frames.push(f);
        }
        assert_eq!(frames.len(), 2, "only our Hello and Auth");
        // A bare Hello: nothing of our addresses, host or user.
        match wire::decode(&frames[0]) {
            Ok(Frame::Hello(h)) => {
                assert!(h.addrs.is_empty() && h.host.0.is_empty(), "{h:?}");
                assert_eq!((h.uid, h.incarnation, h.features), (0, 0, 0));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(wire::decode(&frames[1]), Ok(Frame::Auth { .. })));

        // The right proof: the link comes up and the queued frame follows.
        let (written, event) = link_against(&secret, |peer, local, our_nonce| {
            secret.proofs(peer, local, &[8; 32], our_nonce)
        })
        .await;
        // The link is up with the details the peer sent after its proof.
        match &event {
            LinkEvent::Up { hello: h, .. } => {
                assert_eq!((h.addrs.clone(), h.uid), (vec![b"a".to_vec()], 7))
            }
            other => panic!("{other:?}"),
        }
        // Ours followed our proof: a full Hello third.
        let mut r = FrameReader::new(futures::io::Cursor::new(written.clone()), 1 << 20);
        let mut frames = Vec::new();
        while let Ok(Some(f)) = r.read_one().await {
            frames.push(f);
        }
        match wire::decode(&frames[2]) {
            Ok(Frame::Hello(h)) => assert!(!h.addrs.is_empty(), "{h:?}"),
            other => panic!("{other:?}"),
        }
        assert!(written
            .windows(b"payroll.secret".len())
            .any(|w| w == b"payroll.secret"));
    }
}
