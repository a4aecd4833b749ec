//! Length-prefixed frames, read and written in batches.
//!
//! A frame on the wire is a little-endian `u32` length followed by that many
//! bytes. The reader pulls large chunks from the transport and splits every
//! complete frame out of them at once, so a batch of small frames costs one
//! read; the writer side is a plain byte buffer ([`encode_frame`]) that the
//! caller flushes with one write per batch.
//!
//! Limits are enforced on receive: a frame longer than the configured limit
//! is an error ([`FrameError::Oversize`]) and the link must be closed.

use bytes::{Buf, Bytes, BytesMut};
use futures::{AsyncRead, AsyncReadExt};

/// Bytes taken by the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Default largest frame accepted from a peer: 4 MiB.
pub const DEFAULT_MAX_FRAME: usize = 4 * 1024 * 1024;

/// How much the reader asks the transport for at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Errors reading frames from a peer.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame longer than the limit.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    Oversize {
        /// Announced length.
        len: usize,
        /// Configured limit.
        limit: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the incomplete frame that had arrived.
        buffered: usize,
    },
    /// The transport failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Appends one frame to `buf`: a length prefix, then whatever `body` writes.
///
/// Returns the body length. Panics only if the body exceeds `u32::MAX` bytes,
/// which callers rule out by their own size limits.
pub fn encode_frame(buf: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0; LEN_PREFIX]);
    body(buf);
    let len = buf.len() - start - LEN_PREFIX;
    let len32 = u32::try_from(len).expect("frame body larger than u32::MAX");
    buf[start..start + LEN_PREFIX].copy_from_slice(&len32.to_le_bytes());
    len
}

/// Splits complete frames out of `buf`, appending them to `out`.
///
/// Incomplete trailing bytes stay in `buf`. Fails on a frame longer than
/// `max_frame`.
pub fn split_frames(
    buf: &mut BytesMut,
    max_frame: usize,
    out: &mut Vec<Bytes>,
) -> Result<(), FrameError> {
    loop {
        if buf.len() < LEN_PREFIX {
            return Ok(());
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > max_frame {
            return Err(FrameError::Oversize {
                len,
                limit: max_frame,
            });
        }
        if buf.len() < LEN_PREFIX + len {
            // Make room for the rest of this frame in one go.
            buf.reserve(LEN_PREFIX + len - buf.len());
            return Ok(());
        }
        buf.advance(LEN_PREFIX);
        out.push(buf.split_to(len).freeze());
    }
}

/// Reads frames from an [`AsyncRead`] in batches.
#[derive(Debug)]
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    max_frame: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps `io`, refusing frames longer than `max_frame`.
    pub fn new(io: R, max_frame: usize) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            max_frame,
        }
    }

    /// Reads until at least one frame is complete, then appends every complete
    /// frame to `out`. Returns `Ok(false)` on a clean end of stream (between
    /// frames).
    pub async fn read_batch(&mut self, out: &mut Vec<Bytes>) -> Result<bool, FrameError> {
        let before = out.len();
        loop {
            split_frames(&mut self.buf, self.max_frame, out)?;
            if out.len() > before {
                return Ok(true);
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            let len = self.buf.len();
            // Safe-code read into spare capacity: zero-fill then truncate.
            // At most one chunk at a time, so a large reservation (for a big
            // frame) is not zeroed again on every small read.
            let room = (self.buf.capacity() - len).min(READ_CHUNK);
            self.buf.resize(len + room, 0);
            let n = match self.io.read(&mut self.buf[len..]).await {
                Ok(n) => n,
                Err(e) => {
                    self.buf.truncate(len);
                    return Err(e.into());
                }
            };
            self.buf.truncate(len + n);
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(false)
                } else {
                    Err(FrameError::Truncated {
                        buffered: self.buf.len(),
                    })
                };
            }
        }
    }

    /// Reads exactly one frame (for handshakes); `Ok(None)` on clean end.
    pub async fn read_one(&mut self) -> Result<Option<Bytes>, FrameError> {
        // Frames beyond the first stay buffered: split at most one out.
        loop {
            if self.buf.len() >= LEN_PREFIX {
                let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if len > self.max_frame {
                    return Err(FrameError::Oversize {
                        len,
                        limit: self.max_frame,
                    });
                }
                if self.buf.len() >= LEN_PREFIX + len {
                    self.buf.advance(LEN_PREFIX);
                    return Ok(Some(self.buf.split_to(len).freeze()));
                }
            }
            let len = self.buf.len();
            self.buf.resize(len + 4096, 0);
            let n = match self.io.read(&mut self.buf[len..]).await {
                Ok(n) => n,
                Err(e) => {
                    self.buf.truncate(len);
                    return Err(e.into());
                }
            };
            self.buf.truncate(len + n);
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated {
                        buffered: self.buf.len(),
                    })
                };
            }
        }
    }

    /// Changes the largest frame taken from here on (a handshake reads
    /// with a small limit, the link after it with the full one).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// Bytes read but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The underlying reader.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.io
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode_all(bodies: &[Vec<u8>]) -> Vec<u8> {
        let mut buf = Vec::new();
        for b in bodies {
            encode_frame(&mut buf, |v| v.extend_from_slice(b));
        }
        buf
    }

    #[test]
    fn oversize_is_refused() {
        let mut buf = BytesMut::from(&encode_all(&[vec![0; 100]])[..]);
        let err = split_frames(&mut buf, 99, &mut Vec::new()).unwrap_err();
        assert!(matches!(
            err,
            FrameError::Oversize {
                len: 100,
                limit: 99
            }
        ));
    }

    #[test]
    fn truncated_stream_is_an_error() {
        let mut wire = encode_all(&[b"hello".to_vec()]);
        wire.pop();
        let mut reader = FrameReader::new(futures::io::Cursor::new(wire), DEFAULT_MAX_FRAME);
        let err = futures::executor::block_on(reader.read_batch(&mut Vec::new())).unwrap_err();
        assert!(matches!(err, FrameError::Truncated { buffered: 8 }));
    }

    #[test]
    fn read_one_leaves_the_rest() {
        let wire = encode_all(&[b"a".to_vec(), b"bc".to_vec(), b"def".to_vec()]);
        let mut reader = FrameReader::new(futures::io::Cursor::new(wire), DEFAULT_MAX_FRAME);
        futures::executor::block_on(async {
            assert_eq!(reader.read_one().await.unwrap().unwrap(), &b"a"[..]);
            let mut out = Vec::new();
            assert!(reader.read_batch(&mut out).await.unwrap());
            assert_eq!(out, vec![Bytes::from("bc"), Bytes::from("def")]);
            assert!(!reader.read_batch(&mut out).await.unwrap());
        });
    }

    proptest! {
        /// Whatever the chunking of the byte stream, the frames come out whole
        /// and in order.
        #[test]
        fn round_trip_any_chunking(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..50),
            cut in 1usize..97,
        ) {
            let wire = encode_all(&bodies);
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for chunk in wire.chunks(cut) {
                buf.extend_from_slice(chunk);
                split_frames(&mut buf, DEFAULT_MAX_FRAME, &mut out).unwrap();
            }
            prop_assert!(buf.is_empty());
            let got: Vec<Vec<u8>> = out.iter().map(|b| b.to_vec()).collect();
            prop_assert_eq!(got, bodies);
        }

        /// Garbage never panics: it yields frames, waits for more, or errors.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = split_frames(&mut buf, 1024, &mut Vec::new());
        }
    }
}
