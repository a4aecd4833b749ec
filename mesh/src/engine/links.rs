//! Links that end and come back, as rules over the membership view: which
//! side of a pair opens a data stream, how long a side waits before
//! asking for one again (back-off), which down member a reconnect round
//! dials, and forgetting what is kept of members that left. The driver
//! does the dialing and stream opening these decide.

use std::time::{Duration, Instant};

use rand::Rng;
use rustc_hash::FxHashMap;

use super::Engine;
use crate::core::{membership::MemberState, NodeId};

/// How long the larger id waits for the smaller id's stream before asking
/// for one (`Relink`); a stream younger than half of it is on its way.
pub(crate) const RELINK_GRACE: Duration = Duration::from_millis(500);
/// Back-off of repeated relinks: from the first to the longest wait.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Peers whose link ended and may need a new one, and when to act.
#[derive(Debug, Default)]
pub(crate) struct Relinks {
    /// Bounded by the number of peers with links.
    due: Vec<(Instant, NodeId)>,
    /// Current back-off per peer; cleared when a link comes up.
    backoff: FxHashMap<NodeId, Duration>,
}

impl Relinks {
    /// When the earliest relink is due.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.due.iter().map(|(at, _)| *at).min()
    }
}

/// What a relink that is due asks of the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Relink {
    /// This node has the smaller id: open a data stream to the peer.
    Open(NodeId),
    /// The peer opens streams: send it `Relink` (on a control stream). It
    /// is asked again later, backing off, until a link comes up.
    Ask(NodeId),
}

impl Engine {
    /// A link to `peer` is wanted: at once on the side that opens streams
    /// (the smaller id); on the other after [`RELINK_GRACE`], in which the
    /// opener's new stream usually arrives and nothing needs tearing down.
    /// Repeated failures back off exponentially (250 ms doubling to 30 s)
    /// until a link comes up, so a peer that fails the same way every time
    /// (another protocol version, say) is not retried in a tight loop.
    pub(crate) fn schedule_relink(&mut self, now: Instant, peer: NodeId) {
        let base = if self.local < peer {
            Duration::ZERO
        } else {
            RELINK_GRACE
        };
        let backoff = self.relinks.backoff.entry(peer).or_insert(Duration::ZERO);
        let delay = base + *backoff;
        *backoff = (*backoff * 2).clamp(BACKOFF_FIRST, BACKOFF_MAX);
        if !self.relinks.due.iter().any(|(_, p)| *p == peer) {
            self.relinks.due.push((now + delay, peer));
        }
    }

    /// A link to `peer` came up: its next failure starts the back-off
    /// afresh.
    pub(crate) fn relink_done(&mut self, peer: &NodeId) {
        self.relinks.backoff.remove(peer);
    }

    /// The relinks due at `now`, for peers that are `connected` and have no
    /// data stream (`linked`); others are dropped (a link came, or the
    /// connection went and a new one starts over). The smaller id opens a
    /// stream if membership has the peer alive; the larger asks, and is
    /// scheduled to ask again.
    #[must_use]
    pub(crate) fn poll_relinks(
        &mut self,
        now: Instant,
        linked: impl Fn(&NodeId) -> bool,
        connected: impl Fn(&NodeId) -> bool,
    ) -> Vec<Relink> {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.relinks.due)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.relinks.due = later;
        let mut out = Vec::new();
        for (_, peer) in due {
            if linked(&peer) || !connected(&peer) {
                continue;
            }
            if self.local < peer {
                match self.membership.state_of(&peer) {
                    Some(MemberState::Alive | MemberState::Suspect) => {
                        out.push(Relink::Open(peer));
                    }
                    // Down for now, but connected: membership may take it
                    // back (a refuted suspicion) with nothing else to set
                    // the link up again, so try later, backing off. A
                    // member that stays down is disconnected, and then
                    // dropped from here.
                    Some(MemberState::Down) => self.schedule_relink(now, peer),
                    // Not a member (any more): nothing to set up.
                    None => {}
                }
            } else {
                out.push(Relink::Ask(peer));
                self.schedule_relink(now, peer);
            }
        }
        out
    }

    /// `peer` asked for a fresh data stream: whether this node opens one.
    /// Only the smaller id opens streams, and a stream it opened less than
    /// half of [`RELINK_GRACE`] ago (`stream_age`) is still on its way.
    #[must_use]
    pub(crate) fn relink_asked(&self, peer: &NodeId, stream_age: Option<Duration>) -> bool {
        self.local < *peer && stream_age.is_none_or(|age| age >= RELINK_GRACE / 2)
    }

    /// The down member a reconnect round dials (one, at random, of those
    /// not `connected`), if any. A down member that answers is readmitted
    /// when its link comes up.
    #[must_use]
    pub(crate) fn reconnect_target(
        &mut self,
        connected: impl Fn(&NodeId) -> bool,
    ) -> Option<NodeId> {
        let down: Vec<NodeId> = self
            .membership
            .members()
            .filter(|m| m.state == MemberState::Down && !connected(&m.node))
            .map(|m| m.node)
            .collect();
        (!down.is_empty()).then(|| down[self.rng.gen_range(0..down.len())])
    }

    /// Forgets the interest, relink back-off and reliable windows of
    /// members the membership has forgotten. Run on the membership timer,
    /// not per event: it walks every declaration.
    pub(crate) fn forget_departed(&mut self) {
        let gone: Vec<NodeId> = self
            .interest
            .nodes()
            .filter(|n| self.membership.state_of(n).is_none())
            .collect();
        for node in gone {
            self.interest.remove(&node);
        }
        let membership = &self.membership;
        let due = &self.relinks.due;
        // A relink still due keeps its back-off, or it would come round
        // again at once.
        self.relinks
            .backoff
            .retain(|n, _| membership.state_of(n).is_some() || due.iter().any(|(_, p)| p == n));
        self.reliable.retain(|n| membership.state_of(n).is_some());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{engine::testing::Pair, node::Config};

    /// The pair's two ids, smaller first, and the pair with `a` the
    /// smaller.
    fn pair() -> (Pair, NodeId, NodeId) {
        let p = Pair::with(&Config::default(), &Config::default());
        let (a, b) = (p.a.local, p.b.local);
        let (small, large) = if a < b { (a, b) } else { (b, a) };
        (p, small, large)
    }

    fn engine_of(p: &mut Pair, id: NodeId) -> &mut Engine {
        if p.a.local == id {
            &mut p.a
        } else {
            &mut p.b
        }
    }

    #[test]
    fn the_smaller_id_opens_at_once_and_the_larger_asks_after_the_grace_backing_off() {
        let (mut p, small, large) = pair();
        let now = p.now;
        let s = engine_of(&mut p, small);
        s.schedule_relink(now, large);
        assert_eq!(
            s.poll_relinks(now, |_| false, |_| true),
            [Relink::Open(large)]
        );
        let l = engine_of(&mut p, large);
        l.schedule_relink(now, small);
        assert!(
            l.poll_relinks(now, |_| false, |_| true).is_empty(),
            "in the grace"
        );
        let mut at = now + RELINK_GRACE;
        assert_eq!(
            l.poll_relinks(at, |_| false, |_| true),
            [Relink::Ask(small)]
        );
        // Asked again later and later: 250 ms, 500 ms, ... on top of the
        // grace, while no link comes.
        for backoff in [250, 500, 1000] {
            let next = at + RELINK_GRACE + Duration::from_millis(backoff);
            assert!(l
                .poll_relinks(next - Duration::from_millis(1), |_| false, |_| true)
                .is_empty());
            assert_eq!(
                l.poll_relinks(next, |_| false, |_| true),
                [Relink::Ask(small)]
            );
            at = next;
        }
        // A link came: the back-off starts afresh, and a due relink of a
        // peer with a stream is dropped.
        l.relink_done(&small);
        assert!(l
            .poll_relinks(at + BACKOFF_MAX * 2, |_| true, |_| true)
            .is_empty());
        l.schedule_relink(at, small);
        assert_eq!(
            l.poll_relinks(at + RELINK_GRACE, |_| false, |_| true),
            [Relink::Ask(small)]
        );
    }

    #[test]
    fn a_relink_to_a_connected_member_down_for_now_is_tried_again() {
        use rand::SeedableRng;
        let start = crate::test_support::test_origin();
        let mut s = crate::engine::testing::engine(1, &Config::default(), start);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        // Peers with larger ids: one membership declares down (its
        // connection still up), one it does not know.
        let mut larger = (2..=255).filter_map(|i| {
            let p = libp2p::identity::Keypair::ed25519_from_bytes([i; 32])
                .expect("any 32 bytes are a key")
                .public()
                .to_peer_id();
            (p > s.local).then_some(p)
        });
        let (peer, stranger) = (larger.next().unwrap(), larger.next().unwrap());
        s.membership.handle_link_up(start, peer, Vec::new());
        s.membership.handle_link_down(start, peer);
        let mut now = start;
        while s.membership.state_of(&peer) != Some(MemberState::Down) {
            now += Duration::from_millis(100);
            assert!(now < start + Duration::from_secs(600), "never down");
            s.membership.handle_timeout(now, &mut rng);
        }
        s.schedule_relink(now, peer);
        s.schedule_relink(now, stranger);
        assert!(s.poll_relinks(now, |_| false, |_| true).is_empty());
        // The stranger is dropped; the member down is tried again after
        // the back-off (forgetting departed members keeps it), not at
        // once and not never.
        s.forget_departed();
        let later = now + BACKOFF_FIRST;
        assert_eq!(s.relinks.next_due(), Some(later));
        assert!(
            s.poll_timeout().is_some_and(|t| t <= later),
            "the relink is a timer"
        );
        // Membership takes it back (a refuted suspicion).
        s.membership.handle_link_up(later, peer, Vec::new());
        assert_eq!(
            s.poll_relinks(later, |_| false, |_| true),
            [Relink::Open(peer)]
        );
        // Not connected any more: dropped.
        s.schedule_relink(later, peer);
        assert!(s
            .poll_relinks(later + BACKOFF_MAX * 2, |_| false, |_| false)
            .is_empty());
        assert!(s.relinks.next_due().is_none());
    }

    #[test]
    fn only_the_smaller_id_answers_a_relink_and_not_with_a_stream_on_its_way() {
        let (mut p, small, large) = pair();
        let s = engine_of(&mut p, small);
        assert!(s.relink_asked(&large, None));
        assert!(!s.relink_asked(&large, Some(RELINK_GRACE / 4)));
        assert!(s.relink_asked(&large, Some(RELINK_GRACE)));
        let l = engine_of(&mut p, large);
        assert!(!l.relink_asked(&small, None));
    }
}
