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

use super::Engine;
use crate::{
    core::NodeId,
    security::{Access, Op},
    wire::{self, Frame, Raw, ReplyStatus, StreamWire, WorkWire},
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

impl Engine {
    /// Whether the access policy lets `peer` do what `w` asks; if not, the
    /// peer is told where it waits for an answer (a send, a request), and
    /// the rest (credit, peeks) is dropped. Counted and logged either way.
    pub(crate) fn work_permitted(&mut self, peer: NodeId, w: &WorkWire<'_>) -> bool {
        let Some(access) = &mut self.access else {
            return true;
        };
        let (op, name) = match w {
            WorkWire::Send { queue, .. } | WorkWire::Replay { queue, .. } => (Op::Publish, *queue),
            WorkWire::Request { subject, .. } => (Op::Publish, *subject),
            WorkWire::Flow { queue, .. } => (Op::Consume, *queue),
            WorkWire::Peek { queue, .. } => (Op::Read, *queue),
            _ => return true,
        };
        if access.check(&peer, op, name) {
            return true;
        }
        match w {
            WorkWire::Send { seq, queue, .. } => {
                let reason = format!("access denied: this peer may not send to queue {queue}");
                self.send_work(
                    peer,
                    &WorkWire::Refused {
                        seq: *seq,
                        full: false,
                        reason: &reason,
                    },
                );
            }
            WorkWire::Request { id, .. } => self.send_work(
                peer,
                &WorkWire::Reply {
                    id: *id,
                    status: ReplyStatus::Denied,
                    payload: Raw(&[]),
                },
            ),
            WorkWire::Peek { req, .. } => self.send_work(
                peer,
                &WorkWire::Peeked {
                    req: *req,
                    msgs: Vec::new(),
                },
            ),
            WorkWire::Replay { req, .. } => self.send_work(
                peer,
                &WorkWire::Replayed {
                    req: *req,
                    moved: 0,
                },
            ),
            _ => {}
        }
        false
    }

    /// Whether the access policy lets `peer` do what `w` asks; if not, it
    /// gets the typed refusal it waits for (appends, watches, reads), and
    /// commits are dropped. Counted and logged either way.
    pub(crate) fn stream_permitted(&mut self, peer: NodeId, w: &StreamWire<'_>) -> bool {
        let Some(access) = &mut self.access else {
            return true;
        };
        let (op, name) = match w {
            StreamWire::Append { stream, .. } => (Op::Publish, *stream),
            StreamWire::Watch { stream, .. }
            | StreamWire::Read { stream, .. }
            | StreamWire::Info { stream, .. } => (Op::Read, *stream),
            StreamWire::Commit { stream, .. } => (Op::Consume, *stream),
            _ => return true,
        };
        if access.check(&peer, op, name) {
            return true;
        }
        let verb = match op {
            Op::Publish => "append to",
            Op::Consume => "consume",
            _ => "read",
        };
        let reason = format!("access denied: this peer may not {verb} stream {name}");
        match w {
            StreamWire::Append { seq, .. } => self.send_stream(
                peer,
                &StreamWire::AppendRefused {
                    seq: *seq,
                    full: false,
                    reason: &reason,
                },
            ),
            StreamWire::Watch { sid, .. } => {
                self.send_stream(peer, &StreamWire::WatchRefused { sid: *sid })
            }
            StreamWire::Read { rid, .. } => self.send_stream(
                peer,
                &StreamWire::ReadRefused {
                    rid: *rid,
                    reason: &reason,
                },
            ),
            // Offsets and group commits are not shown: an empty answer.
            StreamWire::Info { req, .. } => self.send_empty_info(peer, *req),
            _ => {}
        }
        false
    }

    /// Answers an `Info` with no partitions (refused or over budget).
    pub(crate) fn send_empty_info(&mut self, peer: NodeId, req: u64) {
        let epoch = self.stream_epoch;
        self.send_stream(
            peer,
            &StreamWire::InfoReply {
                req,
                epoch,
                parts: Vec::new(),
            },
        );
    }

    /// Encodes a work frame for `peer`.
    pub(crate) fn send_work(&mut self, peer: NodeId, w: &WorkWire<'_>) {
        let p = self.peers.entry(peer);
        wire::encode(&mut p.scratch, &Frame::Work(w.clone()));
        p.has_data = true;
    }

    /// Encodes a stream frame for `peer`.
    pub(crate) fn send_stream(&mut self, peer: NodeId, w: &StreamWire<'_>) {
        let p = self.peers.entry(peer);
        wire::encode(&mut p.scratch, &Frame::Stream(w.clone()));
        p.has_data = true;
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
