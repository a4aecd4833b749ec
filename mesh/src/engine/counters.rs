//! What the engine and its driver count that the cores do not.
//!
//! Counters are plain integers: each is an add where the node already does
//! the work it counts, never a lock or an atomic.

/// What the node task counts that its cores do not (the queue and stream
/// hosts and the gossip core keep their own counters, read at snapshot
/// time).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) published: u64,
    pub(crate) sent: u64,
    pub(crate) resent: u64,
    pub(crate) received: u64,
    pub(crate) delivered: u64,
    pub(crate) lagged_drops: u64,
    pub(crate) subscription_evicted: u64,
    pub(crate) subscription_cut: u64,
    pub(crate) declarations_refused: u64,
    pub(crate) forged_replies: u64,
    pub(crate) declarations_forged: u64,
    pub(crate) requests_throttled: u64,
    pub(crate) outbox_overflow: u64,
    pub(crate) unadmitted_refused: u64,
    pub(crate) link_buffer_full: u64,
    pub(crate) oversize: u64,
    pub(crate) malformed: u64,
    pub(crate) link_errors: u64,
    pub(crate) duplicate: u64,
    pub(crate) out_of_order: u64,
    pub(crate) reliable_lagged: u64,
    pub(crate) unnumbered: u64,
    pub(crate) no_subscriber: u64,
    pub(crate) control_sends: u64,
    pub(crate) queue_sent: u64,
    pub(crate) stream_received: u64,
    pub(crate) stream_repeats: u64,
    pub(crate) quic_sent: u64,
    pub(crate) quic_received: u64,
    pub(crate) shm_sent: u64,
    pub(crate) shm_received: u64,
    pub(crate) links_opened: u64,
    /// Messages for peers that had no stream in time or whose buffer was
    /// full before it came.
    pub(crate) dropped_unreachable: u64,
}

/// How a link that ended with an error is counted.
pub(crate) fn count_link_error(c: &mut Counters, error: &str) {
    // The reader reports errors as text; an oversize frame is the frame
    // reader's `FrameError::Oversize` (a unit test keeps the two in step).
    if error.contains(OVERSIZE_MARK) {
        c.oversize += 1;
    } else {
        c.link_errors += 1;
    }
}

const OVERSIZE_MARK: &str = "bytes exceeds the limit of";

impl Counters {
    /// Bytes of frames handed to a link's writer (`ring`: it writes to the
    /// shared-memory ring).
    pub(crate) fn sent_bytes(&mut self, ring: bool, n: usize) {
        if ring {
            self.shm_sent += n as u64;
        } else {
            self.quic_sent += n as u64;
        }
    }

    /// Bytes of frames a link's reader handed over (`ring`: read from the
    /// shared-memory ring; a batch is all from one transport).
    pub(crate) fn received_bytes(&mut self, ring: bool, frames: &[bytes::Bytes]) {
        let n: u64 = frames.iter().map(|f| f.len() as u64 + 4).sum();
        if ring {
            self.shm_received += n;
        } else {
            self.quic_received += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversize_frames_are_told_from_other_link_errors() {
        let oversize = mesh_transports::frame::FrameError::Oversize { len: 10, limit: 5 };
        let mut c = Counters::default();
        count_link_error(&mut c, &oversize.to_string());
        count_link_error(&mut c, "write failed: broken pipe");
        assert_eq!((c.oversize, c.link_errors), (1, 1));
    }
}
