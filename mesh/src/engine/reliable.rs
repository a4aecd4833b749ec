//! Reliable pub/sub: the publisher's retransmit window per subscriber and
//! the subscriber's place in each publisher's numbering.
//!
//! A publisher numbers every message it sends to a node with a reliable
//! subscription (`Seq { session, rseq, to }` before the `Msg`): `session`
//! is the publisher's run, `to` the subscriber's (its declaration epoch),
//! `rseq` counts from 1 without gaps. It keeps the last
//! `reliable_window` messages (at most [`WINDOW_BYTES`] of payload) per
//! subscriber, also while the subscriber is unreachable. A subscriber
//! delivers them in order: an earlier number is a duplicate (of a resend);
//! after a gap it drops the message and asks for a resend from the gap
//! (`Resume`), at most every [`RESUME_RETRY`]; on link up it asks for
//! everything kept since its last. A publisher whose window no longer
//! holds what is asked says how many are lost (`Lagged`), and the
//! subscriber's reliable subscriptions are told.
//!
//! No I/O, no clock: `now` comes in, frames to send come out as values.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use rustc_hash::FxHashMap;

use crate::core::NodeId;

/// Most payload bytes kept in one subscriber's retransmit window.
pub(crate) const WINDOW_BYTES: usize = 8 * 1024 * 1024;
/// How long a receiver waits for a requested resend before asking again.
pub(crate) const RESUME_RETRY: Duration = Duration::from_millis(500);

/// A reliable message kept for resending.
#[derive(Debug, Clone)]
pub(crate) struct Kept {
    pub(crate) rseq: u64,
    pub(crate) seq: u64,
    pub(crate) timestamp: u64,
    pub(crate) topic: Arc<str>,
    pub(crate) headers: Vec<(String, Bytes)>,
    pub(crate) payload: Bytes,
}

/// The retransmit window for one subscriber: its reliable messages,
/// numbered from 1 without gaps; the oldest leave when it is full.
#[derive(Debug)]
struct Window {
    /// The subscriber's epoch (its declaration's) this numbering is for.
    epoch: u64,
    next: u64,
    kept: VecDeque<Kept>,
    bytes: usize,
}

impl Window {
    fn new(epoch: u64) -> Self {
        Self {
            epoch,
            next: 1,
            kept: VecDeque::new(),
            bytes: 0,
        }
    }

    fn keep(&mut self, mut kept: Kept, max: usize) -> u64 {
        let rseq = self.next;
        self.next += 1;
        kept.rseq = rseq;
        self.bytes += kept.payload.len();
        self.kept.push_back(kept);
        while self.kept.len() > max || (self.bytes > WINDOW_BYTES && self.kept.len() > 1) {
            if let Some(old) = self.kept.pop_front() {
                self.bytes -= old.payload.len();
            }
        }
        rseq
    }

    /// The first number still in the window.
    fn first(&self) -> u64 {
        self.kept.front().map_or(self.next, |k| k.rseq)
    }
}

/// What a node has received of one publisher's reliable messages to it.
#[derive(Debug)]
struct Receipt {
    session: u64,
    next: u64,
    /// When we last asked for a resend (`None`: not waiting for one).
    asked: Option<Instant>,
}

/// What to do with a numbered message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Accept {
    /// The next one: deliver it.
    Deliver,
    /// Had already (a resend): drop it.
    Duplicate,
    /// After a gap: drop it (the resend brings it again, in order), and
    /// send `Resume` if this says so.
    Gap { resume: Option<Resume> },
}

/// A `Resume` frame to send: messages of `session` from `next` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resume {
    pub(crate) session: u64,
    pub(crate) next: u64,
}

/// What a publisher sends for a `Resume`: `Lagged` first if some are
/// gone, then each kept message from the asked number on.
#[derive(Debug)]
pub(crate) struct Resend<'a> {
    /// The subscriber's epoch the numbering is for (`to` of every frame).
    pub(crate) to: u64,
    /// (missed, next) for a `Lagged` frame.
    pub(crate) lagged: Option<(u64, u64)>,
    from: u64,
    kept: &'a VecDeque<Kept>,
}

impl<'a> Resend<'a> {
    /// The messages to send again, oldest first.
    pub(crate) fn messages(&self) -> impl Iterator<Item = &'a Kept> + 'a {
        let from = self.from;
        self.kept.iter().filter(move |k| k.rseq >= from)
    }
}

/// The reliable windows of this node, as publisher and as subscriber.
#[derive(Debug)]
pub(crate) struct Reliable {
    /// This run's session id (its start time).
    session: u64,
    /// As publisher: a window per subscriber.
    windows: FxHashMap<NodeId, Window>,
    /// As subscriber: our place in each publisher's numbering.
    receipts: FxHashMap<NodeId, Receipt>,
}

impl Reliable {
    pub(crate) fn new(session: u64) -> Self {
        Self {
            session,
            windows: FxHashMap::default(),
            receipts: FxHashMap::default(),
        }
    }

    /// This run's session id, in every `Seq` and `Lagged` we send.
    pub(crate) fn session(&self) -> u64 {
        self.session
    }

    /// Publisher: keeps `kept` for `peer`, whose declaration has `epoch`
    /// (a new epoch, a restart, starts a new numbering), in a window of at
    /// most `max` messages. Its number, for the `Seq` frame.
    pub(crate) fn keep(&mut self, peer: NodeId, epoch: u64, kept: Kept, max: usize) -> u64 {
        let window = self
            .windows
            .entry(peer)
            .or_insert_with(|| Window::new(epoch));
        if window.epoch != epoch {
            *window = Window::new(epoch);
        }
        window.keep(kept, max)
    }

    /// Publisher: `peer` declared anew with another epoch; what we kept for
    /// its previous run is of no use to it.
    pub(crate) fn forget_window(&mut self, peer: &NodeId) {
        self.windows.remove(peer);
    }

    /// Publisher: `peer` asks for our messages of `session` from `next` on.
    /// `None` if we kept nothing for it.
    #[must_use]
    pub(crate) fn resend(&self, peer: &NodeId, session: u64, next: u64) -> Option<Resend<'_>> {
        let window = self.windows.get(peer)?;
        // A peer that knows an older session of ours has nothing of this one.
        let next = if session == self.session { next } else { 1 };
        let first = window.first();
        Some(Resend {
            to: window.epoch,
            lagged: (next < first).then(|| (first - next, first)),
            from: next,
            kept: &window.kept,
        })
    }

    /// Subscriber: the link to `peer` came up; ask for what it kept for us
    /// while we were apart (everything it kept, if we never heard from it).
    #[must_use]
    pub(crate) fn link_up(&mut self, now: Instant, peer: NodeId) -> Resume {
        let r = self.receipts.entry(peer).or_insert(Receipt {
            session: 0,
            next: 1,
            asked: None,
        });
        r.asked = Some(now);
        Resume {
            session: r.session,
            next: r.next,
        }
    }

    /// Subscriber: reliable message `rseq` of `peer`'s `session` came.
    /// Earlier ones are duplicates (of a resend); after a gap we drop it
    /// and ask the publisher to resend from the gap, which resends it too,
    /// in order. (`rseq` is below `u64::MAX`: the parser refuses that.)
    #[must_use]
    pub(crate) fn accept(&mut self, now: Instant, peer: NodeId, session: u64, rseq: u64) -> Accept {
        // First contact: the publisher's window for us starts at 1 (it
        // numbers only what it published after it knew of our interest).
        let state = self.receipts.entry(peer).or_insert(Receipt {
            session,
            next: 1,
            asked: None,
        });
        if state.session == 0 {
            // We asked before we knew its session.
            state.session = session;
        } else if state.session != session {
            // The publisher restarted: its new session starts at 1.
            *state = Receipt {
                session,
                next: 1,
                asked: None,
            };
        }
        tracing::trace!(%peer, session, rseq, next = state.next, "reliable message");
        if rseq < state.next {
            return Accept::Duplicate;
        }
        if rseq == state.next {
            let Some(after) = state.next.checked_add(1) else {
                return Accept::Duplicate;
            };
            state.next = after;
            state.asked = None;
            return Accept::Deliver;
        }
        let resume = state
            .asked
            .is_none_or(|at| now.duration_since(at) >= RESUME_RETRY)
            .then(|| {
                state.asked = Some(now);
                Resume {
                    session,
                    next: state.next,
                }
            });
        Accept::Gap { resume }
    }

    /// Subscriber: `peer` says its messages of `session` before `next` are
    /// gone. How many we missed, if any we had not had (then the reliable
    /// subscriptions are told); we go on from `next`.
    #[must_use]
    pub(crate) fn lagged(
        &mut self,
        peer: NodeId,
        session: u64,
        missed: u64,
        next: u64,
    ) -> Option<u64> {
        let state = self.receipts.entry(peer).or_insert(Receipt {
            session,
            next: 1,
            asked: None,
        });
        if state.session != session {
            state.session = session;
            state.next = 1;
        }
        if next <= state.next {
            return None;
        }
        let missed = missed.min(next - state.next);
        state.next = next;
        state.asked = None;
        Some(missed)
    }

    /// Keeps the windows and receipts of the peers `keep` says.
    pub(crate) fn retain(&mut self, keep: impl Fn(&NodeId) -> bool) {
        self.windows.retain(|n, _| keep(n));
        self.receipts.retain(|n, _| keep(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{node_id as node, test_origin};

    const SUB: u8 = 1;

    fn kept(seq: u64, size: usize) -> Kept {
        Kept {
            rseq: 0,
            seq,
            timestamp: seq,
            topic: "t".into(),
            headers: Vec::new(),
            payload: Bytes::from(vec![0u8; size]),
        }
    }

    /// A publisher and a subscriber, with the frames between them carried
    /// by hand (like quinn-proto's `Pair`): what the publisher sends is fed
    /// to the subscriber, whose `Resume`s go back.
    struct Pair {
        publisher: Reliable,
        subscriber: Reliable,
        pub_id: NodeId,
        sub_id: NodeId,
        now: Instant,
        delivered: Vec<u64>,
        lost: u64,
        resumes: Vec<Resume>,
    }

    impl Pair {
        fn new() -> Self {
            Self {
                publisher: Reliable::new(100),
                subscriber: Reliable::new(200),
                pub_id: node(2),
                sub_id: node(SUB),
                now: test_origin(),
                delivered: Vec::new(),
                lost: 0,
                resumes: Vec::new(),
            }
        }

        /// Publishes `seq`: kept, numbered; its rseq.
        fn publish(&mut self, seq: u64, window: usize) -> u64 {
            self.publisher.keep(self.sub_id, 7, kept(seq, 10), window)
        }

        /// The subscriber receives numbered message `rseq` of `seq`.
        fn arrive(&mut self, rseq: u64, seq: u64) -> Accept {
            let session = self.publisher.session();
            let a = self.subscriber.accept(self.now, self.pub_id, session, rseq);
            match &a {
                Accept::Deliver => self.delivered.push(seq),
                Accept::Gap { resume: Some(r) } => self.resumes.push(*r),
                _ => {}
            }
            a
        }

        /// The last `Resume` goes to the publisher; its answer comes back.
        fn answer_resume(&mut self) {
            let r = self.resumes.pop().expect("a resume to answer");
            let resend = self
                .publisher
                .resend(&self.sub_id, r.session, r.next)
                .expect("a window");
            assert_eq!(resend.to, 7);
            let session = self.publisher.session();
            if let Some((missed, next)) = resend.lagged {
                self.lost += self
                    .subscriber
                    .lagged(self.pub_id, session, missed, next)
                    .unwrap_or(0);
            }
            let again: Vec<(u64, u64)> = resend.messages().map(|k| (k.rseq, k.seq)).collect();
            for (rseq, seq) in again {
                let _ = self.arrive(rseq, seq);
            }
        }
    }

    #[test]
    fn in_order_messages_are_delivered_and_duplicates_dropped() {
        let mut p = Pair::new();
        for seq in 1..=3 {
            let rseq = p.publish(seq, 16);
            assert_eq!(rseq, seq);
            assert_eq!(p.arrive(rseq, seq), Accept::Deliver);
        }
        assert_eq!(p.arrive(2, 2), Accept::Duplicate);
        assert_eq!(p.delivered, [1, 2, 3]);
    }

    #[test]
    fn a_gap_is_filled_by_a_resend_in_order() {
        let mut p = Pair::new();
        let r1 = p.publish(1, 16);
        let _r2 = p.publish(2, 16); // lost on the way
        let r3 = p.publish(3, 16);
        assert_eq!(p.arrive(r1, 1), Accept::Deliver);
        // 3 after a gap: dropped, and 2 on is asked for.
        assert_eq!(
            p.arrive(r3, 3),
            Accept::Gap {
                resume: Some(Resume {
                    session: 100,
                    next: 2
                })
            }
        );
        p.answer_resume();
        assert_eq!(p.delivered, [1, 2, 3]);
        assert_eq!(p.lost, 0);
    }

    #[test]
    fn a_resend_is_asked_for_again_only_after_the_retry_interval() {
        let mut p = Pair::new();
        for seq in 1..=4 {
            p.publish(seq, 16);
        }
        assert_eq!(p.arrive(1, 1), Accept::Deliver);
        assert!(matches!(p.arrive(3, 3), Accept::Gap { resume: Some(_) }));
        // The resend is on its way: more after the gap ask nothing.
        p.now += RESUME_RETRY - Duration::from_millis(1);
        assert_eq!(p.arrive(4, 4), Accept::Gap { resume: None });
        // It did not come in time: ask again.
        p.now += Duration::from_millis(1);
        assert!(matches!(p.arrive(4, 4), Accept::Gap { resume: Some(_) }));
        p.answer_resume();
        assert_eq!(p.delivered, [1, 2, 3, 4]);
    }

    #[test]
    fn messages_gone_from_the_window_are_reported_lagged_and_the_rest_delivered() {
        let mut p = Pair::new();
        // A window of 3: of 10 published while the subscriber was away,
        // 8, 9 and 10 are kept.
        for seq in 1..=10 {
            p.publish(seq, 3);
        }
        // The link comes up: the subscriber asks for everything kept.
        let r = p.subscriber.link_up(p.now, p.pub_id);
        assert_eq!(
            r,
            Resume {
                session: 0,
                next: 1
            }
        );
        p.resumes.push(r);
        p.answer_resume();
        assert_eq!(p.lost, 7);
        assert_eq!(p.delivered, [8, 9, 10]);
        // A second Lagged for what we have is no news.
        assert_eq!(p.subscriber.lagged(p.pub_id, 100, 7, 8), None);
    }

    #[test]
    fn the_window_holds_at_most_its_bytes() {
        let mut r = Reliable::new(1);
        let sub = node(SUB);
        let big = WINDOW_BYTES / 2 + 1;
        for seq in 1..=3 {
            r.keep(sub, 0, kept(seq, big), 1000);
        }
        // Two would be over the byte limit: one is kept.
        let resend = r.resend(&sub, 1, 1).expect("a window");
        assert_eq!(resend.lagged, Some((2, 3)));
        assert_eq!(resend.messages().map(|k| k.seq).collect::<Vec<_>>(), [3]);
        // One message over the limit is still kept (never an empty window).
        let mut r = Reliable::new(1);
        r.keep(sub, 0, kept(1, WINDOW_BYTES + 1), 1000);
        let resend = r.resend(&sub, 1, 1).expect("a window");
        assert_eq!(resend.messages().count(), 1);
    }

    #[test]
    fn a_restarted_subscriber_or_publisher_starts_a_new_numbering() {
        let mut p = Pair::new();
        p.publish(1, 16);
        p.publish(2, 16);
        // The subscriber restarted (a new declaration epoch): numbering
        // starts at 1 again, and the old run's messages are not resent.
        assert_eq!(p.publisher.keep(p.sub_id, 8, kept(3, 10), 16), 1);
        let resend = p.publisher.resend(&p.sub_id, 100, 1).expect("a window");
        assert_eq!(resend.to, 8);
        assert_eq!(resend.messages().map(|k| k.seq).collect::<Vec<_>>(), [3]);
        // A Resume naming an older session of the publisher gets all kept.
        let resend = p.publisher.resend(&p.sub_id, 99, 5).expect("a window");
        assert_eq!(resend.messages().count(), 1);
        assert_eq!(resend.lagged, None);
        // The publisher restarted: its new session's 1 is delivered though
        // the subscriber had 1 and 2 of the old one.
        assert_eq!(
            p.subscriber.accept(p.now, p.pub_id, 100, 1),
            Accept::Deliver
        );
        assert_eq!(
            p.subscriber.accept(p.now, p.pub_id, 100, 2),
            Accept::Deliver
        );
        assert_eq!(
            p.subscriber.accept(p.now, p.pub_id, 101, 1),
            Accept::Deliver
        );
        // Nothing kept for a peer: nothing to resend.
        assert!(p.publisher.resend(&node(9), 100, 1).is_none());
        p.publisher.forget_window(&p.sub_id);
        assert!(p.publisher.resend(&p.sub_id, 100, 1).is_none());
    }

    #[test]
    fn a_subscriber_that_asked_before_it_knew_the_session_takes_the_first_it_hears() {
        let mut r = Reliable::new(1);
        let publisher = node(2);
        let _ = r.link_up(test_origin(), publisher);
        assert_eq!(r.accept(test_origin(), publisher, 55, 1), Accept::Deliver);
        assert_eq!(r.accept(test_origin(), publisher, 55, 1), Accept::Duplicate);
        r.retain(|_| false);
        // Forgotten: 1 is new again.
        assert_eq!(r.accept(test_origin(), publisher, 55, 1), Accept::Deliver);
    }
}
