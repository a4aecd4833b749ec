//! The reserved names of the mesh and who may declare them, who may read a
//! topic, and how many costly answers a peer may ask for.
//!
//! Hosts, responders and group members say what they are by declaring a
//! pattern under a reserved prefix (see the constants). With an access
//! policy, a declaration under one counts only for a node the policy lets
//! do that (host the queue or stream, serve the subject, consume the
//! stream); it is checked where it is used, not on receipt, so a policy
//! change needs no new declarations.

use std::time::{Duration, Instant};

use crate::{
    core::NodeId,
    security::{Access, Op},
};

/// Reserved pattern prefix of a queue host's declaration.
pub(crate) const QUEUE_HOST_PREFIX: &str = "$q.h.";
/// Reserved pattern prefix of a responder's declaration.
pub(crate) const SERVE_PREFIX: &str = "$r.";
/// Reserved pattern prefix of a stream host's declaration.
pub(crate) const STREAM_HOST_PREFIX: &str = "$s.h.";
/// Reserved pattern prefix of a consumer group member's declaration
/// (`$s.g.STREAM.GROUP`).
pub(crate) const GROUP_PREFIX: &str = "$s.g.";

/// Costly answers one peer may ask for per second (a `Peek` scans and
/// sorts a queue and answers with up to 256 KiB; a `Resume` re-encodes a
/// reliable window of up to 8 MiB; an `Info` lists every partition).
/// Beyond it a peek or info gets an empty answer and a resume is ignored
/// (the subscriber asks again); each is counted.
pub(crate) const REQUESTS_PER_SEC: u32 = 32;

/// Whether `peer` may read `topic` (no policy: anyone may).
pub(crate) fn may_read(access: Option<&Access>, peer: &NodeId, topic: &str) -> bool {
    access.is_none_or(|a| a.permits(peer, Op::Read, topic))
}

/// Whether the policy lets `node` be what reserved name `name` makes it:
/// the responder for a subject (`$r.SUBJECT`), a queue's or stream's host
/// (`$q.h.QUEUE`, its dead-letter queue with it; `$s.h.STREAM`) or a
/// member of a stream's consumer group (`$s.g.STREAM.GROUP`). Checked
/// where such declarations are looked up to route a request, send, append
/// or group partition, so a node without the right is never chosen (its
/// declaration stays as it was signed and is relayed unchanged). Other
/// names are not reserved: they count.
pub(crate) fn reserved_permitted(access: Option<&Access>, node: &NodeId, name: &str) -> bool {
    let Some(access) = access else {
        return true;
    };
    if let Some(subject) = name.strip_prefix(SERVE_PREFIX) {
        return access.permits(node, Op::Serve, subject);
    }
    if let Some(queue) = name.strip_prefix(QUEUE_HOST_PREFIX) {
        let queue = queue
            .strip_suffix(crate::core::queue::DLQ_SUFFIX)
            .unwrap_or(queue);
        return access.permits(node, Op::Host, queue);
    }
    if let Some(stream) = name.strip_prefix(STREAM_HOST_PREFIX) {
        return access.permits(node, Op::Host, stream);
    }
    if let Some(rest) = name.strip_prefix(GROUP_PREFIX) {
        // `STREAM.GROUP`, where a stream name may have dots itself: any
        // split whose stream part the node may consume.
        return rest
            .match_indices('.')
            .any(|(i, _)| access.permits(node, Op::Consume, &rest[..i]));
    }
    true
}

/// A peer's request budget: [`REQUESTS_PER_SEC`] per one-second window.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RequestBudget {
    window: Option<Instant>,
    used: u32,
}

impl RequestBudget {
    /// Whether one more request fits at `now`.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        if self
            .window
            .is_none_or(|w| now.saturating_duration_since(w) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.used = 0;
        }
        if self.used >= REQUESTS_PER_SEC {
            return false;
        }
        self.used += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::AccessPolicy;
    use crate::test_support::{node_id as node, test_origin};

    #[test]
    fn reserved_declarations_count_only_for_what_the_policy_allows() {
        let (a, b) = (node(1), node(2));
        let policy = AccessPolicy::new()
            .allow(&a.to_string(), Op::Host, &["jobs", "logs.>"])
            .and_then(|p| p.allow(&a.to_string(), Op::Serve, &["svc.*"]))
            .and_then(|p| p.allow(&a.to_string(), Op::Read, &["metrics.s"]))
            .and_then(|p| p.allow("*", Op::Read, &["news"]))
            .expect("a policy");
        let access = Access::new(policy);
        let ok = |n: &NodeId, name: &str| reserved_permitted(Some(&access), n, name);
        assert!(ok(&a, "$q.h.jobs"));
        assert!(
            ok(&a, "$q.h.jobs.dlq"),
            "a dead-letter queue goes with its queue"
        );
        assert!(!ok(&b, "$q.h.jobs"));
        assert!(ok(&a, "$s.h.logs.eu"));
        assert!(!ok(&a, "$s.h.jobs.x"));
        assert!(ok(&a, "$r.svc.echo"));
        assert!(!ok(&b, "$r.svc.echo"));
        // A group member consumes its stream, whose name may have dots:
        // read access covers consuming.
        assert!(ok(&a, "$s.g.metrics.s.billing"));
        assert!(!ok(&b, "$s.g.metrics.s.billing"));
        assert!(ok(&b, "orders.eu"), "not reserved");
        assert!(reserved_permitted(None, &b, "$q.h.jobs"), "no policy");
        assert!(may_read(Some(&access), &b, "news"));
        assert!(!may_read(Some(&access), &b, "metrics.s"));
        assert!(may_read(None, &b, "metrics.s"));
    }

    #[test]
    fn a_peer_gets_its_budget_of_requests_per_second() {
        let t0 = test_origin();
        let mut budget = RequestBudget::default();
        for _ in 0..REQUESTS_PER_SEC {
            assert!(budget.take(t0));
        }
        assert!(!budget.take(t0 + Duration::from_millis(999)));
        // A new window: the full budget again.
        assert!(budget.take(t0 + Duration::from_secs(1)));
        // A clock that went back does not refill it.
        let mut late = RequestBudget::default();
        assert!(late.take(t0 + Duration::from_secs(5)));
        for _ in 1..REQUESTS_PER_SEC {
            assert!(late.take(t0));
        }
        assert!(!late.take(t0));
    }
}
