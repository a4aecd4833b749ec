//! Host selection, shared by work queues and streams: which names this node
//! hosts, the patterns it declares for them, which remote host a message or
//! record goes to, and the gathers that ask every host of a name for its
//! part of an answer.
//!
//! A node hosts a queue or stream when it is configured to (`host_all`, or
//! the name listed), or when it took the name on itself because it sent or
//! appended to it while nobody hosted it. Hosts say so by declaring a
//! reserved pattern (`prefix` + name); a sender picks among the live
//! declaring hosts by rendezvous hashing, so every sender picks the same
//! host and a host leaving moves only its own names.
//!
//! No I/O, no clock: deadlines come in as `Instant`s.

use std::{sync::Arc, time::Instant};

use rustc_hash::{FxHashMap, FxHashSet};

use crate::core::{topic::Pattern, NodeId};

/// What one node hosts of one kind (queues, or streams).
#[derive(Debug)]
pub(crate) struct Hosting {
    /// What is hosted ("queue", "stream"), for logs.
    kind: &'static str,
    /// The reserved prefix hosts declare names under.
    prefix: &'static str,
    all: bool,
    configured: Vec<Arc<str>>,
    /// Names this node took on itself (nobody hosted them).
    taken: FxHashSet<Arc<str>>,
    /// Whether it takes names nobody hosts (off for one-shot tools).
    self_host: bool,
    /// Most names it takes on itself.
    max_taken: usize,
}

impl Hosting {
    pub(crate) fn new(
        kind: &'static str,
        prefix: &'static str,
        all: bool,
        configured: Vec<Arc<str>>,
        self_host: bool,
        max_taken: usize,
    ) -> Self {
        Self {
            kind,
            prefix,
            all,
            configured,
            taken: FxHashSet::default(),
            self_host,
            max_taken,
        }
    }

    /// Whether `name` is hosted here: configured, or taken.
    pub(crate) fn hosts(&self, name: &str) -> bool {
        self.all || self.taken.contains(name) || self.configured.iter().any(|c| &**c == name)
    }

    /// Whether it takes names nobody hosts.
    pub(crate) fn self_host(&self) -> bool {
        self.self_host
    }

    /// The patterns declared at start: everything under the prefix, or
    /// `patterns_of` each configured name.
    pub(crate) fn configured_patterns(
        &self,
        patterns_of: impl Fn(&str) -> Vec<Pattern>,
    ) -> Vec<Pattern> {
        let mut out = Vec::new();
        if self.all {
            out.extend(Pattern::new(&format!("{}>", self.prefix)));
        }
        for name in &self.configured {
            out.extend(patterns_of(name));
        }
        out
    }

    /// Takes `name` on, to be declared with `patterns`, if this node hosts
    /// fewer than its limit and `has_room` for every pattern; the caller
    /// declares them. Refused (false) otherwise, with a warning.
    pub(crate) fn take(
        &mut self,
        name: &Arc<str>,
        patterns: &[Pattern],
        has_room: impl Fn(&Pattern) -> bool,
    ) -> bool {
        let room = self.taken.len() < self.max_taken && patterns.iter().all(has_room);
        if !room {
            tracing::warn!(
                kind = self.kind,
                %name,
                "cannot host another: at the limit of names hosted or patterns declared"
            );
            return false;
        }
        self.taken.insert(name.clone());
        true
    }
}

/// Where a send or an append goes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// To remote hosts: one of these, by rendezvous (never empty).
    Remote(Vec<NodeId>),
    /// This node hosts it.
    Here,
    /// Nobody hosts it: this node takes it on, then it goes here.
    TakeOn,
    /// Nobody can take it: no host keeps it durably (`volatile`: it
    /// needs a durable host and this node holds memory only), or this
    /// node takes no names on itself.
    NoHost { volatile: bool },
}

/// The routing rule of sends and appends. A name hosted here goes here,
/// unless it needs a durable confirmation this node cannot give
/// (`volatile`); then, or when not hosted here, to a remote host if
/// `remote` names any. With none, a name hosted here still goes here
/// (not volatile), else this node takes it on if it may.
///
/// Failover is this rule again after a host's link ended: the remote
/// hosts no longer include that host ([`failover_hosts`] for appends).
pub(crate) fn route(
    hosted_here: bool,
    volatile: bool,
    self_host: bool,
    remote: impl FnOnce() -> Vec<NodeId>,
) -> Route {
    if hosted_here && !volatile {
        return Route::Here;
    }
    let hosts = remote();
    if !hosts.is_empty() {
        Route::Remote(hosts)
    } else if volatile {
        Route::NoHost { volatile: true }
    } else if hosted_here {
        Route::Here
    } else if self_host {
        Route::TakeOn
    } else {
        Route::NoHost { volatile: false }
    }
}

/// The hosts an append may go to. A first try takes every live host,
/// linked or not yet (a node that just joined is still linking to them,
/// and a key must not go elsewhere meanwhile). A retry after the link to
/// `gone` ended takes the hosts linked now; if none is, any other live
/// one (its link is being set up) rather than host here after a blip.
pub(crate) fn failover_hosts(
    gone: Option<NodeId>,
    linked: impl FnOnce() -> Vec<NodeId>,
    live: impl FnOnce() -> Vec<NodeId>,
) -> Vec<NodeId> {
    let Some(gone) = gone else {
        return live();
    };
    let linked = linked();
    if !linked.is_empty() {
        return linked;
    }
    let mut live = live();
    live.retain(|h| *h != gone);
    live
}

/// The host of queue `queue` among `hosts`: the highest hash of
/// (queue, host). `hosts` need not be sorted.
///
/// Queues and streams hash differently (this `FxHasher`, streams'
/// [`record_host`] a stable SipHash over the record key too); both are
/// what the mesh runs today, and changing either moves placements.
pub(crate) fn queue_host(queue: &str, hosts: &[NodeId]) -> Option<NodeId> {
    use std::hash::{Hash, Hasher};
    hosts.iter().copied().max_by_key(|h| {
        let mut s = rustc_hash::FxHasher::default();
        queue.hash(&mut s);
        h.to_bytes().hash(&mut s);
        s.finish()
    })
}

/// The host of a record of `stream` with `key` among `hosts`: the highest
/// stable hash of (stream, key, host), the same on every node and build.
pub(crate) fn record_host(stream: &str, key: &[u8], hosts: &[NodeId]) -> Option<NodeId> {
    hosts
        .iter()
        .copied()
        .max_by_key(|h| crate::core::stream::stable_hash(&[stream.as_bytes(), key, &h.to_bytes()]))
}

/// The member a partition of a consumer group goes to: the highest stable
/// hash of (stream, group, host, index, member) over `members`, ties to
/// the larger member.
pub(crate) fn partition_owner<T: Copy + Ord>(
    stream: &str,
    group: &str,
    host: &NodeId,
    index: u32,
    members: &[T],
    bytes: impl Fn(&T) -> Vec<u8>,
) -> Option<T> {
    let host = host.to_bytes();
    let index = index.to_le_bytes();
    members.iter().copied().max_by_key(|m| {
        let h = crate::core::stream::stable_hash(&[
            stream.as_bytes(),
            group.as_bytes(),
            &host,
            &index,
            &bytes(m),
        ]);
        (h, *m)
    })
}

/// A question asked of several hosts, answered when each has answered,
/// its link ended, or the deadline passed.
#[derive(Debug)]
pub(crate) struct Gather<R> {
    waiting: FxHashSet<NodeId>,
    deadline: Instant,
    reply: R,
    /// Hosts that did not answer: their link ended, or time ran out.
    missing: Vec<NodeId>,
}

/// A gather that ended: what was gathered, and who did not answer.
#[derive(Debug)]
pub(crate) struct Gathered<R> {
    pub(crate) reply: R,
    pub(crate) missing: Vec<NodeId>,
}

/// The gathers going on, by request id (ids are the caller's).
#[derive(Debug)]
pub(crate) struct Gathers<R> {
    open: FxHashMap<u64, Gather<R>>,
}

impl<R> Default for Gathers<R> {
    fn default() -> Self {
        Self {
            open: FxHashMap::default(),
        }
    }
}

impl<R> Gathers<R> {
    /// Asks `hosts` (request `req`, answers due by `deadline`). With nobody
    /// to ask it has ended already: the reply comes back at once.
    #[must_use]
    pub(crate) fn start(
        &mut self,
        req: u64,
        hosts: impl IntoIterator<Item = NodeId>,
        deadline: Instant,
        reply: R,
    ) -> Option<Gathered<R>> {
        let waiting: FxHashSet<NodeId> = hosts.into_iter().collect();
        if waiting.is_empty() {
            return Some(Gathered {
                reply,
                missing: Vec::new(),
            });
        }
        self.open.insert(
            req,
            Gather {
                waiting,
                deadline,
                reply,
                missing: Vec::new(),
            },
        );
        None
    }

    /// `peer` answered `req`: `add` folds its answer in. An answer to no
    /// open request, or a second one from the same peer, is ignored. The
    /// gather comes back once it was the last answer awaited.
    #[must_use]
    pub(crate) fn answer(
        &mut self,
        req: u64,
        peer: NodeId,
        add: impl FnOnce(&mut R),
    ) -> Option<Gathered<R>> {
        let g = self.open.get_mut(&req)?;
        if !g.waiting.remove(&peer) {
            return None;
        }
        add(&mut g.reply);
        self.finish_if_done(req)
    }

    /// The link to `peer` ended: every gather waiting for it goes on
    /// without it; those it was the last awaited for come back.
    #[must_use]
    pub(crate) fn link_down(&mut self, peer: NodeId) -> Vec<Gathered<R>> {
        let reqs: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, g)| g.waiting.contains(&peer))
            .map(|(r, _)| *r)
            .collect();
        let mut done = Vec::new();
        for req in reqs {
            if let Some(g) = self.open.get_mut(&req) {
                if g.waiting.remove(&peer) {
                    g.missing.push(peer);
                }
            }
            done.extend(self.finish_if_done(req));
        }
        done
    }

    /// The gathers whose deadline is at or before `now`, ended with the
    /// hosts still awaited as missing.
    #[must_use]
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Gathered<R>> {
        let expired: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, g)| g.deadline <= now)
            .map(|(r, _)| *r)
            .collect();
        expired
            .into_iter()
            .filter_map(|req| self.open.remove(&req))
            .map(|mut g| {
                g.missing.extend(g.waiting);
                Gathered {
                    reply: g.reply,
                    missing: g.missing,
                }
            })
            .collect()
    }

    /// The earliest deadline of an open gather.
    #[must_use]
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.open.values().map(|g| g.deadline).min()
    }

    fn finish_if_done(&mut self, req: u64) -> Option<Gathered<R>> {
        if !self.open.get(&req)?.waiting.is_empty() {
            return None;
        }
        let g = self.open.remove(&req)?;
        Some(Gathered {
            reply: g.reply,
            missing: g.missing,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::test_support::{node_id as node, test_origin};

    fn nodes(n: u8) -> Vec<NodeId> {
        (1..=n).map(node).collect()
    }

    #[test]
    fn hosts_what_it_is_configured_for_or_took() {
        let mut h = Hosting::new("queue", "$q.h.", false, vec!["jobs".into()], true, 1);
        assert!(h.hosts("jobs"));
        assert!(!h.hosts("mail"));
        let p = [Pattern::new("$q.h.mail").expect("a pattern")];
        assert!(h.take(&"mail".into(), &p, |_| true));
        assert!(h.hosts("mail"));
        // At the limit of names taken: refused, nothing changes.
        assert!(!h.take(&"news".into(), &p, |_| true));
        assert!(!h.hosts("news"));
        let all = Hosting::new("stream", "$s.h.", true, Vec::new(), false, 0);
        assert!(all.hosts("anything"));
        assert_eq!(
            all.configured_patterns(|_| Vec::new())
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect::<Vec<_>>(),
            ["$s.h.>"]
        );
    }

    #[test]
    fn a_name_is_refused_without_room_for_its_patterns() {
        let mut h = Hosting::new("queue", "$q.h.", false, Vec::new(), true, 8);
        let p = [Pattern::new("$q.h.mail").expect("a pattern")];
        assert!(!h.take(&"mail".into(), &p, |_| false));
        assert!(!h.hosts("mail"));
    }

    #[test]
    fn every_sender_picks_the_same_host_and_a_leaving_host_moves_only_its_names() {
        let hosts = nodes(5);
        let mut reversed = hosts.clone();
        reversed.reverse();
        let names: Vec<String> = (0..200).map(|i| format!("q{i}")).collect();
        let mut per_host: FxHashMap<NodeId, usize> = FxHashMap::default();
        for q in &names {
            let h = queue_host(q, &hosts).expect("a host");
            assert_eq!(queue_host(q, &reversed), Some(h), "order matters not");
            *per_host.entry(h).or_default() += 1;
            // Record placement, likewise.
            let r = record_host(q, b"key", &hosts).expect("a host");
            assert_eq!(record_host(q, b"key", &reversed), Some(r));
        }
        assert_eq!(per_host.len(), 5, "every host gets some queues");
        // Failover: without host 3, its queues move and no other does.
        let gone = node(3);
        let rest: Vec<NodeId> = hosts.iter().copied().filter(|h| *h != gone).collect();
        for q in &names {
            let before = queue_host(q, &hosts).expect("a host");
            let after = queue_host(q, &rest).expect("a host");
            if before == gone {
                assert_ne!(after, gone);
            } else {
                assert_eq!(after, before, "{q} moved though its host stayed");
            }
            let before = record_host(q, b"k", &hosts).expect("a host");
            let after = record_host(q, b"k", &rest).expect("a host");
            assert!(before == gone || after == before);
        }
        assert_eq!(queue_host("q", &[]), None);
        assert_eq!(record_host("s", b"k", &[]), None);
    }

    #[test]
    fn sends_go_here_to_a_remote_host_or_to_a_node_taking_them_on() {
        let remote = || nodes(2);
        let none = Vec::new;
        // Hosted here: here, without asking for remote hosts.
        let asked = std::cell::Cell::new(false);
        let r = route(true, false, true, || {
            asked.set(true);
            nodes(2)
        });
        assert_eq!(r, Route::Here);
        assert!(!asked.get());
        // Hosted here but needing a durable host this node is not: remote.
        assert_eq!(route(true, true, true, remote), Route::Remote(nodes(2)));
        assert_eq!(
            route(true, true, true, none),
            Route::NoHost { volatile: true }
        );
        // Not hosted here.
        assert_eq!(route(false, false, true, remote), Route::Remote(nodes(2)));
        assert_eq!(route(false, false, true, none), Route::TakeOn);
        assert_eq!(
            route(false, false, false, none),
            Route::NoHost { volatile: false }
        );
        assert_eq!(
            route(false, true, true, none),
            Route::NoHost { volatile: true }
        );
    }

    #[test]
    fn a_send_whose_host_went_away_fails_over_to_the_next_by_rendezvous() {
        let hosts = nodes(4);
        let first = queue_host("jobs", &hosts).expect("a host");
        // Its link ends: the live hosts no longer include it.
        let rest: Vec<NodeId> = hosts.iter().copied().filter(|h| *h != first).collect();
        let Route::Remote(left) = route(false, false, true, || rest.clone()) else {
            panic!("expected a remote host");
        };
        let second = queue_host("jobs", &left).expect("a host");
        assert_ne!(second, first);
        // Every sender fails over to the same one.
        let mut shuffled = left.clone();
        shuffled.rotate_left(1);
        assert_eq!(queue_host("jobs", &shuffled), Some(second));
        // The last host gone: this node takes the queue on.
        assert_eq!(route(false, false, true, Vec::new), Route::TakeOn);
    }

    #[test]
    fn an_append_retry_prefers_linked_hosts_then_live_ones_but_the_one_gone() {
        let (a, b, c) = (node(1), node(2), node(3));
        // A first try: every live host, linked or not.
        assert_eq!(
            failover_hosts(None, || vec![a], || vec![a, b, c]),
            [a, b, c]
        );
        // A retry: the linked hosts...
        assert_eq!(failover_hosts(Some(c), || vec![a], || vec![a, b, c]), [a]);
        // ...or, with none linked, the live ones but the one gone.
        assert_eq!(failover_hosts(Some(c), Vec::new, || vec![a, b, c]), [a, b]);
        assert!(failover_hosts(Some(c), Vec::new, || vec![c]).is_empty());
    }

    #[test]
    fn partitions_spread_over_group_members_and_move_only_from_a_leaver() {
        let host = node(9);
        let members: Vec<u64> = vec![1, 2, 3];
        let bytes = |m: &u64| m.to_le_bytes().to_vec();
        let owners: Vec<u64> = (0..64)
            .map(|i| partition_owner("s", "g", &host, i, &members, bytes).expect("an owner"))
            .collect();
        for m in &members {
            assert!(owners.contains(m), "member {m} owns no partition");
        }
        let rest = [1u64, 3];
        for (i, before) in owners.iter().enumerate() {
            let after = partition_owner("s", "g", &host, i as u32, &rest, bytes).expect("owner");
            if *before == 2 {
                assert_ne!(after, 2);
            } else {
                assert_eq!(after, *before);
            }
        }
        assert_eq!(
            partition_owner("s", "g", &host, 0, &[] as &[u64], bytes),
            None
        );
    }

    #[test]
    fn a_gather_ends_when_every_host_answered_left_or_ran_out_of_time() {
        let t0 = test_origin();
        let deadline = t0 + Duration::from_secs(2);
        let mut g: Gathers<Vec<u8>> = Gathers::default();
        // Nobody to ask: done at once.
        let done = g.start(1, [], deadline, vec![0]).expect("done at once");
        assert_eq!(done.reply, [0]);
        // Three hosts: one answers (twice: the second is ignored), one's
        // link ends, the last answers.
        assert!(g.start(2, nodes(3), deadline, Vec::new()).is_none());
        assert_eq!(g.poll_timeout(), Some(deadline));
        assert!(g.answer(2, node(1), |r| r.push(1)).is_none());
        assert!(g.answer(2, node(1), |r| r.push(1)).is_none());
        assert!(
            g.answer(7, node(2), |r| r.push(7)).is_none(),
            "no such request"
        );
        assert!(g.link_down(node(2)).is_empty());
        let done = g.answer(2, node(3), |r| r.push(3)).expect("all answered");
        assert_eq!(done.reply, [1, 3]);
        assert_eq!(done.missing, [node(2)]);
        assert_eq!(g.poll_timeout(), None);
        // A gather whose last host's link ends comes back from link_down.
        assert!(g.start(3, [node(4)], deadline, Vec::new()).is_none());
        let done = g.link_down(node(4));
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].missing, [node(4)]);
        // Time runs out: what came is kept, the rest is missing.
        assert!(g.start(4, nodes(2), deadline, Vec::new()).is_none());
        assert!(g.answer(4, node(2), |r| r.push(2)).is_none());
        assert!(g.expire(deadline - Duration::from_millis(1)).is_empty());
        let done = g.expire(deadline);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].reply, [2]);
        assert_eq!(done[0].missing, [node(1)]);
        assert_eq!(g.poll_timeout(), None);
    }
}
