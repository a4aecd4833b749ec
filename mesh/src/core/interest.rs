//! Interest: which node subscribes to which patterns.
//!
//! Each node declares the full set of its subscription patterns with a
//! version; a newer version replaces an older one wholesale, so any two nodes
//! that have seen the same declarations agree, whatever order they arrived in
//! (views converge after a partition). A version is `(epoch, seq)`: the epoch
//! is chosen by the driver at start (wall-clock micros in the runtime), so a
//! restarted node's declarations outrank those of its previous life.

use std::{collections::BTreeMap, sync::Arc};

use super::{topic::Pattern, NodeId};

/// Most patterns one node may declare; larger declarations are refused.
pub const MAX_PATTERNS_PER_NODE: usize = 16 * 1024;
/// Most bytes of patterns one node may declare, so that a declaration
/// always fits a frame.
pub const MAX_DECLARATION_BYTES: usize = 1024 * 1024;
/// Most bytes of patterns all other nodes' declarations may hold in one
/// table (about 4,000 nodes at 16 KiB each). Beyond it declarations of
/// nodes not yet known are refused (and counted by the driver); known
/// nodes may still shrink or replace theirs within the limit. Forgotten
/// members' declarations are removed, so the table only fills up under a
/// flood of declarations for nodes that do not exist.
pub const MAX_TABLE_BYTES: usize = 64 * 1024 * 1024;
/// Bytes counted per pattern besides its text (its allocation and the
/// table's entry).
const PATTERN_OVERHEAD: usize = 48;

/// The version of a node's declaration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version {
    /// Chosen at node start; a restart gives a larger one.
    pub epoch: u64,
    /// Bumped on every change within an epoch.
    pub seq: u64,
}

/// A node's full set of subscription patterns at a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declaration {
    /// The declaring node.
    pub node: NodeId,
    /// Its version.
    pub version: Version,
    /// Its patterns, sorted and without duplicates.
    pub patterns: Vec<Pattern>,
    /// The patterns (among `patterns`) with a reliable subscription:
    /// publishers keep a retransmit window of their messages for this node.
    pub reliable: Vec<Pattern>,
    /// The declaring node's signature of it (opaque here: the driver signs
    /// its own and checks others' before they reach the table, so a
    /// relayed declaration cannot be forged). `None` on the local one.
    pub signature: Option<Arc<[u8]>>,
}

/// Why a declaration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeclarationError {
    /// More patterns than [`MAX_PATTERNS_PER_NODE`].
    #[error("declaration of {count} patterns exceeds the limit of {MAX_PATTERNS_PER_NODE}")]
    TooManyPatterns {
        /// How many were declared.
        count: usize,
    },
    /// The table holds [`MAX_TABLE_BYTES`] already.
    #[error("interest table full ({MAX_TABLE_BYTES} bytes of other nodes' patterns)")]
    TableFull,
}

#[derive(Debug)]
struct Entry {
    version: Version,
    patterns: Vec<Pattern>,
    reliable: Vec<Pattern>,
    bytes: usize,
    signature: Option<Arc<[u8]>>,
}

fn pattern_bytes(patterns: &[Pattern]) -> usize {
    patterns
        .iter()
        .map(|p| p.as_str().len() + PATTERN_OVERHEAD)
        .sum()
}

/// The interest table of one node: its own patterns and every other node's
/// latest declaration.
#[derive(Debug)]
pub struct Interest {
    local: NodeId,
    version: Version,
    /// Pattern -> number of local subscriptions using it, and how many of
    /// those are reliable.
    local_patterns: BTreeMap<Pattern, (usize, usize)>,
    /// Remote nodes with reliable patterns.
    reliable_nodes: usize,
    /// Bounded by the membership (the driver removes forgotten nodes)
    /// and by [`MAX_TABLE_BYTES`].
    remote: BTreeMap<NodeId, Entry>,
    /// Bytes of `remote`'s entries.
    remote_bytes: usize,
    generation: u64,
}

impl Interest {
    /// An empty table for `local`, whose declarations use `epoch`.
    pub fn new(local: NodeId, epoch: u64) -> Self {
        Self {
            local,
            version: Version { epoch, seq: 0 },
            local_patterns: BTreeMap::new(),
            reliable_nodes: 0,
            remote: BTreeMap::new(),
            remote_bytes: 0,
            generation: 0,
        }
    }

    /// Bumped whenever the remote interest changes; routing caches compare it.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether adding `pattern` keeps the local declaration within
    /// [`MAX_PATTERNS_PER_NODE`] and [`MAX_DECLARATION_BYTES`].
    pub fn has_room_for(&self, pattern: &Pattern) -> bool {
        if self.local_patterns.contains_key(pattern) {
            return true;
        }
        let bytes: usize = self.local_patterns.keys().map(|p| p.as_str().len()).sum();
        self.local_patterns.len() < MAX_PATTERNS_PER_NODE
            && bytes + pattern.as_str().len() <= MAX_DECLARATION_BYTES
    }

    /// Adds a local subscription. Returns the new declaration to announce if
    /// the set of patterns changed.
    pub fn subscribe(&mut self, pattern: &Pattern, reliable: bool) -> Option<Declaration> {
        let (count, reliables) = self.local_patterns.entry(pattern.clone()).or_insert((0, 0));
        *count += 1;
        *reliables += usize::from(reliable);
        (*count == 1 || (reliable && *reliables == 1)).then(|| self.bump())
    }

    /// Removes a local subscription. Returns the new declaration to announce if
    /// the set of patterns changed.
    pub fn unsubscribe(&mut self, pattern: &Pattern, reliable: bool) -> Option<Declaration> {
        let (count, reliables) = self.local_patterns.get_mut(pattern)?;
        *count -= 1;
        *reliables -= usize::from(reliable);
        if *count > 0 {
            return (reliable && *reliables == 0).then(|| self.bump());
        }
        self.local_patterns.remove(pattern);
        Some(self.bump())
    }

    fn bump(&mut self) -> Declaration {
        self.version.seq += 1;
        self.local_declaration()
    }

    /// The local node's current declaration.
    pub fn local_declaration(&self) -> Declaration {
        Declaration {
            node: self.local,
            version: self.version,
            patterns: self.local_patterns.keys().cloned().collect(),
            reliable: self
                .local_patterns
                .iter()
                .filter(|(_, (_, r))| *r > 0)
                .map(|(p, _)| p.clone())
                .collect(),
            signature: None,
        }
    }

    /// Applies a declaration from the mesh. Returns whether it was newer than
    /// what we had (and so changed the table). [`DeclarationError::TableFull`]
    /// leaves the table as it was.
    pub fn handle_declaration(&mut self, decl: Declaration) -> Result<bool, DeclarationError> {
        let count = decl.patterns.len() + decl.reliable.len();
        if count > MAX_PATTERNS_PER_NODE {
            return Err(DeclarationError::TooManyPatterns { count });
        }
        if decl.node == self.local {
            return Ok(false);
        }
        if let Some(entry) = self.remote.get(&decl.node) {
            if entry.version >= decl.version {
                return Ok(false);
            }
        }
        let mut patterns = decl.patterns;
        patterns.sort();
        patterns.dedup();
        let mut reliable = decl.reliable;
        reliable.sort();
        reliable.dedup();
        let bytes = pattern_bytes(&patterns) + pattern_bytes(&reliable);
        let old_bytes = self.remote.get(&decl.node).map_or(0, |e| e.bytes);
        if bytes > old_bytes && self.remote_bytes - old_bytes + bytes > MAX_TABLE_BYTES {
            return Err(DeclarationError::TableFull);
        }
        self.reliable_nodes += usize::from(!reliable.is_empty());
        self.remote_bytes += bytes;
        let old = self.remote.insert(
            decl.node,
            Entry {
                version: decl.version,
                patterns,
                reliable,
                bytes,
                signature: decl.signature,
            },
        );
        if let Some(old) = old {
            self.reliable_nodes -= usize::from(!old.reliable.is_empty());
            self.remote_bytes -= old.bytes;
        }
        self.generation += 1;
        Ok(true)
    }

    /// Forgets a node (it left the membership for good).
    pub fn remove(&mut self, node: &NodeId) {
        if let Some(old) = self.remote.remove(node) {
            self.reliable_nodes -= usize::from(!old.reliable.is_empty());
            self.remote_bytes -= old.bytes;
            self.generation += 1;
        }
    }

    /// The version of `node`'s declaration, if we have one.
    pub fn version_of(&self, node: &NodeId) -> Option<Version> {
        self.remote.get(node).map(|e| e.version)
    }

    /// Whether any remote node has a reliable subscription.
    pub fn has_reliable(&self) -> bool {
        self.reliable_nodes > 0
    }

    /// Remote nodes with a reliable pattern matching `topic`, in id order.
    pub fn reliable_interested(&self, topic: &str) -> Vec<NodeId> {
        self.remote
            .iter()
            .filter(|(_, e)| e.reliable.iter().any(|p| p.matches(topic)))
            .map(|(node, _)| *node)
            .collect()
    }

    /// Every declaration known, the local one first: what a joining peer is
    /// sent so it knows the mesh's subscriptions before it reports ready.
    pub fn snapshot(&self) -> Vec<Declaration> {
        let mut out = vec![self.local_declaration()];
        out.extend(self.remote.iter().map(|(node, e)| Declaration {
            node: *node,
            version: e.version,
            patterns: e.patterns.clone(),
            reliable: e.reliable.clone(),
            signature: e.signature.clone(),
        }));
        out
    }

    /// Remote nodes with a pattern matching `topic`, in id order.
    pub fn interested(&self, topic: &str) -> Vec<NodeId> {
        self.remote
            .iter()
            .filter(|(_, e)| e.patterns.iter().any(|p| p.matches(topic)))
            .map(|(node, _)| *node)
            .collect()
    }

    /// Remote nodes declaring a reserved pattern (one starting with `$`,
    /// as queue hosts and responders do) that matches `topic`, in id
    /// order. Ordinary subscriptions never count, even `>`.
    pub fn reserved_interested(&self, topic: &str) -> Vec<NodeId> {
        self.remote
            .iter()
            .filter(|(_, e)| {
                e.patterns
                    .iter()
                    .any(|p| p.as_str().starts_with('$') && p.matches(topic))
            })
            .map(|(node, _)| *node)
            .collect()
    }

    /// The remote nodes with a declaration.
    pub fn nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.remote.keys().copied()
    }

    /// Whether `node` has declared any pattern.
    pub fn patterns_of(&self, node: &NodeId) -> &[Pattern] {
        self.remote
            .get(node)
            .map(|e| e.patterns.as_slice())
            .unwrap_or(&[])
    }
}

/// Caches [`Interest::interested`] (filtered by liveness) per topic until
/// the interest changes or the driver calls [`RouteCache::invalidate`].
#[derive(Debug, Default)]
pub struct RouteCache {
    /// Routes to reliable subscribers (whatever their liveness) instead.
    reliable: bool,
    generation: u64,
    // Keys are topics this node publishes to, not peer input: a fast
    // non-keyed hash is safe here.
    routes: rustc_hash::FxHashMap<std::sync::Arc<str>, std::sync::Arc<[NodeId]>>,
    /// The last topic routed: publishers usually repeat one topic, and a
    /// pointer comparison is cheaper than hashing it.
    last: Option<(std::sync::Arc<str>, std::sync::Arc<[NodeId]>)>,
}

/// Most topics cached before the cache is cleared (bounds memory for
/// publishers that use unbounded topic sets).
const MAX_CACHED_ROUTES: usize = 64 * 1024;

impl RouteCache {
    /// A cache of the nodes with a matching reliable subscription.
    pub fn reliable() -> Self {
        Self {
            reliable: true,
            ..Self::default()
        }
    }

    /// Forgets every cached route (call when liveness changes).
    pub fn invalidate(&mut self) {
        self.routes.clear();
        self.last = None;
    }

    /// The remote nodes interested in `topic` for which `usable` holds.
    pub fn route(
        &mut self,
        interest: &Interest,
        topic: &std::sync::Arc<str>,
        usable: impl Fn(&NodeId) -> bool,
    ) -> std::sync::Arc<[NodeId]> {
        self.route_ref(interest, topic, usable);
        self.last
            .as_ref()
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| Vec::new().into())
    }

    /// Like [`RouteCache::route`], but borrows the cached route; when
    /// `topic` is the same allocation as the last one routed this costs a
    /// pointer comparison (publishers usually repeat one topic).
    pub fn route_ref(
        &mut self,
        interest: &Interest,
        topic: &std::sync::Arc<str>,
        usable: impl Fn(&NodeId) -> bool,
    ) -> &[NodeId] {
        if self.generation != interest.generation() || self.routes.len() >= MAX_CACHED_ROUTES {
            self.invalidate();
            self.generation = interest.generation();
        }
        let hit = matches!(&self.last, Some((t, _)) if std::sync::Arc::ptr_eq(t, topic));
        if !hit {
            let r = match self.routes.get(topic) {
                Some(r) => r.clone(),
                None => {
                    let mut nodes = if self.reliable {
                        interest.reliable_interested(topic)
                    } else {
                        interest.interested(topic)
                    };
                    nodes.retain(|n| usable(n));
                    let r: std::sync::Arc<[NodeId]> = nodes.into();
                    self.routes.insert(topic.clone(), r.clone());
                    r
                }
            };
            self.last = Some((topic.clone(), r));
        }
        self.last.as_ref().map(|(_, r)| &**r).unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::new(s).unwrap()
    }

    #[test]
    fn local_refcounts_patterns() {
        let me = NodeId::random();
        let mut i = Interest::new(me, 7);
        let d1 = i.subscribe(&p("a.>"), false).unwrap();
        assert_eq!(d1.version, Version { epoch: 7, seq: 1 });
        assert!(i.subscribe(&p("a.>"), false).is_none());
        assert!(i.unsubscribe(&p("a.>"), false).is_none());
        let d2 = i.unsubscribe(&p("a.>"), false).unwrap();
        assert!(d2.patterns.is_empty());
        assert!(d2.version > d1.version);
        assert!(i.unsubscribe(&p("never"), false).is_none());
    }

    #[test]
    fn newest_version_wins_in_any_order() {
        let a = NodeId::random();
        let decls = [
            Declaration {
                node: a,
                version: Version { epoch: 1, seq: 1 },
                patterns: vec![p("x")],
                reliable: vec![],
                signature: None,
            },
            Declaration {
                node: a,
                version: Version { epoch: 1, seq: 2 },
                patterns: vec![p("y")],
                reliable: vec![],
                signature: None,
            },
            Declaration {
                node: a,
                version: Version { epoch: 2, seq: 1 },
                patterns: vec![p("z")],
                reliable: vec![],
                signature: None,
            },
        ];
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]] {
            let mut i = Interest::new(NodeId::random(), 0);
            for k in order {
                i.handle_declaration(decls[k].clone()).unwrap();
            }
            assert_eq!(i.interested("z"), vec![a]);
            assert!(i.interested("x").is_empty());
        }
    }

    #[test]
    fn route_cache_follows_changes() {
        let a = NodeId::random();
        let mut i = Interest::new(NodeId::random(), 0);
        let mut cache = RouteCache::default();
        let t: std::sync::Arc<str> = "orders.eu".into();
        assert!(cache.route(&i, &t, |_| true).is_empty());
        i.handle_declaration(Declaration {
            node: a,
            version: Version { epoch: 0, seq: 1 },
            patterns: vec![p("orders.*")],
            reliable: vec![],
            signature: None,
        })
        .unwrap();
        assert_eq!(&*cache.route(&i, &t, |_| true), &[a]);
        assert!(cache.route(&i, &t, |_| true).len() == 1, "fast path");
        cache.invalidate();
        assert!(cache.route(&i, &t, |n| n != &a).is_empty(), "filtered");
        i.remove(&a);
        assert!(cache.route(&i, &t, |_| true).is_empty());
    }

    #[test]
    fn oversize_declaration_is_refused() {
        let mut i = Interest::new(NodeId::random(), 0);
        let d = Declaration {
            node: NodeId::random(),
            version: Version::default(),
            patterns: vec![p("a"); MAX_PATTERNS_PER_NODE + 1],
            reliable: vec![],
            signature: None,
        };
        assert!(matches!(
            i.handle_declaration(d),
            Err(DeclarationError::TooManyPatterns { .. })
        ));
    }

    #[test]
    fn reliable_patterns_are_declared_and_routed_separately() {
        let mut local = Interest::new(NodeId::random(), 1);
        let d = local.subscribe(&p("a.>"), false).unwrap();
        assert!(d.reliable.is_empty());
        // A reliable subscription to the same pattern changes the declaration.
        let d = local.subscribe(&p("a.>"), true).unwrap();
        assert_eq!(d.reliable, vec![p("a.>")]);
        let mut remote = Interest::new(NodeId::random(), 1);
        remote.handle_declaration(d).unwrap();
        assert!(remote.has_reliable());
        assert_eq!(remote.reliable_interested("a.x").len(), 1);
        assert!(remote.reliable_interested("b").is_empty());
        // Dropping the reliable one keeps the pattern, but not reliable.
        let d = local.unsubscribe(&p("a.>"), true).unwrap();
        assert_eq!(d.patterns, vec![p("a.>")]);
        assert!(d.reliable.is_empty());
        remote.handle_declaration(d).unwrap();
        assert!(!remote.has_reliable());
        assert_eq!(remote.interested("a.x").len(), 1);
    }

    #[test]
    fn the_table_of_other_nodes_patterns_is_bounded() {
        let mut t = Interest::new(NodeId::random(), 1);
        let long = |i: usize| Pattern::new(&format!("{i:0>1000}")).unwrap();
        let per_node: Vec<Pattern> = (0..1000).map(long).collect();
        let decl = |node, seq, patterns: &[Pattern]| Declaration {
            node,
            version: Version { epoch: 1, seq },
            patterns: patterns.to_vec(),
            reliable: vec![],
            signature: None,
        };
        let mut nodes = Vec::new();
        let refused = loop {
            let node = NodeId::random();
            match t.handle_declaration(decl(node, 1, &per_node)) {
                Ok(true) => nodes.push(node),
                Err(e) => break e,
                Ok(false) => unreachable!("a new node"),
            }
            assert!(nodes.len() < 100, "never refused");
        };
        assert_eq!(refused, DeclarationError::TableFull);
        assert!(t.remote_bytes <= MAX_TABLE_BYTES);
        assert_eq!(
            nodes.len(),
            MAX_TABLE_BYTES / ((1000 + PATTERN_OVERHEAD) * 1000)
        );
        // A known node may still shrink its declaration, and a removed
        // one makes room.
        assert_eq!(
            t.handle_declaration(decl(nodes[0], 2, &per_node[..1])),
            Ok(true)
        );
        t.remove(&nodes[1]);
        assert_eq!(
            t.handle_declaration(decl(NodeId::random(), 1, &per_node)),
            Ok(true)
        );
    }
}
