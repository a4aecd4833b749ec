//! Stream consumers and consumer groups: which partitions a consumer
//! reads, and where each read starts.
//!
//! A consumer watches every host of its stream; each host answers with its
//! run (epoch) and partition count. A plain consumer reads every partition
//! of every host. A group member reads the partitions the group's
//! rendezvous gives it: first among the group's nodes (each node declares
//! the group), then among that node's members of the group
//! ([`hosting::partition_owner`] both times), so every node computes the
//! same assignment from the same declarations, and a member joining or
//! leaving moves only the partitions it takes or gives.
//!
//! A read resumes where the consumer was in that host's run; else a group
//! member starts from the group's commit, and a plain consumer from its
//! start (`Latest` of a partition that appeared after the consumer
//! started is all of it).

use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::hosting;
use crate::core::{stream::Start, NodeId};

/// A consumer's view of one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HostView {
    pub(crate) epoch: u64,
    pub(crate) partitions: u32,
    /// The stream appeared on this host (or the host restarted) after
    /// this consumer first saw it: a consumer from `Latest` reads its
    /// partitions from the start, since all they hold came later.
    pub(crate) late: bool,
}

/// A group consumer's place in its group: the group's nodes (this one
/// among them) and this node's members of it, each sorted.
#[derive(Debug)]
pub(crate) struct Assignment<'a> {
    pub(crate) group: &'a str,
    pub(crate) members: &'a [NodeId],
    pub(crate) locals: &'a [u64],
}

/// A partition a consumer reads: host, index, the host's run, and whether
/// it appeared late (see [`HostView::late`]).
pub(crate) type Wanted = (NodeId, u32, u64, bool);

/// The partitions consumer `sid` of node `local` reads, sorted: all of
/// them, or for a group member its share.
pub(crate) fn wanted(
    stream: &str,
    local: NodeId,
    sid: u64,
    hosts: &FxHashMap<NodeId, HostView>,
    group: Option<&Assignment<'_>>,
) -> Vec<Wanted> {
    let mut want = Vec::new();
    for (h, v) in hosts {
        for i in 0..v.partitions {
            let mine = group.is_none_or(|a| {
                hosting::partition_owner(stream, a.group, h, i, a.members, |m: &NodeId| {
                    m.to_bytes()
                }) == Some(local)
                    && hosting::partition_owner(stream, a.group, h, i, a.locals, |s: &u64| {
                        s.to_le_bytes().to_vec()
                    }) == Some(sid)
            });
            if mine {
                want.push((*h, i, v.epoch, v.late));
            }
        }
    }
    want.sort_unstable();
    want
}

/// Where a read of a partition starts. `position` is where the consumer
/// was in it (host run, next offset), `epoch` the host's run now.
pub(crate) fn read_from(
    start: &Start,
    group: Option<&Arc<str>>,
    position: Option<(u64, u64)>,
    epoch: u64,
    late: bool,
) -> Start {
    // `Latest` means records appended after the consumer started: all of
    // a partition that appeared later.
    let latest = matches!(start, Start::Latest) && !late;
    match position {
        Some((e, next)) if e == epoch => Start::Offset(next),
        _ => match (group, start) {
            (Some(g), _) => Start::Committed {
                group: g.clone(),
                latest,
            },
            (None, Start::Latest) if !latest => Start::Earliest,
            (None, s) => s.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::node_id as node;

    fn hosts(n: u8, partitions: u32) -> FxHashMap<NodeId, HostView> {
        (1..=n)
            .map(|i| {
                let v = HostView {
                    epoch: u64::from(i),
                    partitions,
                    late: false,
                };
                (node(100 + i), v)
            })
            .collect()
    }

    #[test]
    fn a_plain_consumer_reads_every_partition_of_every_host() {
        let h = hosts(2, 4);
        let want = wanted("s", node(1), 1, &h, None);
        assert_eq!(want.len(), 8);
        assert!(want.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
    }

    #[test]
    fn group_members_share_the_partitions_and_a_leaver_gives_only_its_own() {
        let h = hosts(2, 16);
        let nodes = vec![node(1), node(2), node(3)];
        let mut sorted = nodes.clone();
        sorted.sort_unstable();
        let share = |members: &[NodeId], n: NodeId| {
            let a = Assignment {
                group: "g",
                members,
                locals: &[7],
            };
            wanted("s", n, 7, &h, Some(&a))
        };
        let before: Vec<Vec<Wanted>> = nodes.iter().map(|n| share(&sorted, *n)).collect();
        // Every partition has exactly one owner.
        let mut all: Vec<Wanted> = before.concat();
        all.sort_unstable();
        assert_eq!(all, wanted("s", node(1), 7, &h, None));
        assert!(
            before.iter().all(|s| !s.is_empty()),
            "every member has some"
        );
        // Node 3 leaves: 1 and 2 keep what they had and take 3's.
        let rest: Vec<NodeId> = sorted.iter().copied().filter(|n| *n != node(3)).collect();
        for (i, n) in nodes.iter().enumerate().take(2) {
            let after = share(&rest, *n);
            assert!(
                before[i].iter().all(|p| after.contains(p)),
                "{n} lost a partition"
            );
        }
        let mut after = [share(&rest, node(1)), share(&rest, node(2))].concat();
        after.sort_unstable();
        assert_eq!(after, all);
    }

    #[test]
    fn a_node_splits_its_share_among_its_own_members() {
        let h = hosts(1, 32);
        let members = [node(1)];
        let locals = [10u64, 11];
        let a = Assignment {
            group: "g",
            members: &members,
            locals: &locals,
        };
        let x = wanted("s", node(1), 10, &h, Some(&a));
        let y = wanted("s", node(1), 11, &h, Some(&a));
        assert!(!x.is_empty() && !y.is_empty());
        assert!(x.iter().all(|p| !y.contains(p)));
        assert_eq!(x.len() + y.len(), 32);
        // A consumer that is not among the locals reads nothing.
        assert!(wanted("s", node(1), 12, &h, Some(&a)).is_empty());
    }

    #[test]
    fn a_read_resumes_in_the_same_run_else_starts_from_the_commit_or_the_start() {
        let g: Arc<str> = "g".into();
        // Same host run: where it was.
        assert_eq!(
            read_from(&Start::Earliest, None, Some((3, 42)), 3, false),
            Start::Offset(42)
        );
        // The host restarted (another run): its partitions are other logs.
        assert_eq!(
            read_from(&Start::Earliest, None, Some((2, 42)), 3, false),
            Start::Earliest
        );
        // A group member: from the commit (latest if it started there and
        // the partition is not late).
        assert_eq!(
            read_from(&Start::Latest, Some(&g), None, 3, false),
            Start::Committed {
                group: g.clone(),
                latest: true
            }
        );
        assert_eq!(
            read_from(&Start::Latest, Some(&g), None, 3, true),
            Start::Committed {
                group: g.clone(),
                latest: false
            }
        );
        // A plain consumer from Latest reads a late partition whole.
        assert_eq!(
            read_from(&Start::Latest, None, None, 3, false),
            Start::Latest
        );
        assert_eq!(
            read_from(&Start::Latest, None, None, 3, true),
            Start::Earliest
        );
        assert_eq!(
            read_from(&Start::Offset(9), None, None, 3, true),
            Start::Offset(9)
        );
    }
}
