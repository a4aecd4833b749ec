//! The node task's counters, and the [`Metrics`] snapshot made of them and
//! of the node's state.
//!
//! Counters are plain integers in the node task: each is an add where the
//! node already does the work it counts (per message in a loop that
//! touches the message anyway, or per batch), never a lock or an atomic.

use crate::{
    core::membership::MemberState,
    metrics::{self, Metrics},
};

use super::{NodeTask, ShmState};
pub(crate) use crate::engine::counters::count_link_error;

impl NodeTask {
    /// A snapshot of the counters and gauges.
    pub(crate) fn metrics(&self) -> Metrics {
        let c = &self.engine.counters;
        let mut m = Metrics {
            node: self.engine.local.to_string(),
            ..Default::default()
        };

        m.pubsub.published = c.published;
        m.pubsub.sent = c.sent + self.engine.gossip.stats().payloads;
        m.pubsub.resent = c.resent;
        m.pubsub.received = c.received;
        m.pubsub.delivered = c.delivered;

        let d = &mut m.dropped;
        d.slow_consumer = c.lagged_drops;
        d.subscription_full = self.stats.dropped_slow_subscriber;
        d.subscription_evicted = c.subscription_evicted;
        d.subscription_cut = c.subscription_cut;
        d.declarations_refused = c.declarations_refused;
        d.forged_replies = c.forged_replies;
        d.declarations_forged = c.declarations_forged;
        d.requests_throttled = c.requests_throttled;
        d.outbox_overflow = c.outbox_overflow;
        d.unadmitted_refused = c.unadmitted_refused;
        d.membership_refused = self.engine.membership.refused();
        d.link_buffer_full = c.link_buffer_full;
        // `dropped_unreachable` counts both ways a peer without a link
        // loses messages; the buffer-full ones are counted apart.
        d.unreachable = c.dropped_unreachable.saturating_sub(c.link_buffer_full);
        d.oversize = c.oversize;
        d.malformed = c.malformed;
        d.link_errors = c.link_errors;
        d.duplicate = c.duplicate + self.engine.gossip.stats().duplicates;
        d.out_of_order = c.out_of_order;
        d.reliable_lagged = c.reliable_lagged;
        d.unnumbered = c.unnumbered;
        d.no_subscriber = c.no_subscriber;
        d.gossip_unrecovered =
            self.engine.gossip.stats().unrecovered + self.engine.gossip.stats().graft_misses;
        d.control_sends = c.control_sends;
        d.control_refused = self.stats.control_refused;
        d.auth_refused = self.stats.auth_refused;
        d.acl_denied = self.engine.access.as_ref().map_or(0, |a| a.denied);
        d.gossip_forged = self
            .reader_counts
            .gossip_forged
            .load(std::sync::atomic::Ordering::Relaxed);
        d.stream_repeats = c.stream_repeats;

        self.queue_metrics(&mut m);
        self.stream_metrics(&mut m);

        m.bytes = metrics::TransportBytes {
            quic_sent: c.quic_sent,
            quic_received: c.quic_received,
            shm_sent: c.shm_sent,
            shm_received: c.shm_received,
        };

        let (mut up_quic, mut up_shm) = (0, 0);
        for l in self
            .links
            .iter()
            .filter(|(p, _)| self.engine.peers.is_up(p))
            .map(|(_, l)| l)
        {
            if l.shm == ShmState::On {
                up_shm += 1;
            } else {
                up_quic += 1;
            }
        }
        m.links = metrics::Links {
            opened: c.links_opened,
            // Every link that came up is up or has ended.
            closed: c.links_opened.saturating_sub(up_quic + up_shm),
            refused: self.stats.links_refused,
            up_quic,
            up_shm,
            throttled: self
                .reader_counts
                .pauses
                .load(std::sync::atomic::Ordering::Relaxed),
            throttled_ms: self
                .reader_counts
                .micros
                .load(std::sync::atomic::Ordering::Relaxed)
                / 1000,
        };

        for member in self.engine.membership.members() {
            match member.state {
                MemberState::Alive => m.peers.alive += 1,
                MemberState::Suspect => m.peers.suspect += 1,
                MemberState::Down => m.peers.down += 1,
            }
        }
        m.subscriptions = self.sub_queues.len() as u64;
        m.durable = self.engine.durable.as_ref().map(|d| {
            let (batches_pending, confirmations_held) = d.pending();
            metrics::Durable {
                batches_pending,
                confirmations_held,
            }
        });
        m
    }

    /// The queue counters and gauges of what this node hosts.
    fn queue_metrics(&self, m: &mut Metrics) {
        let c = &self.engine.counters;
        let host = &self.engine.work.host;
        m.queues.sent = c.queue_sent;
        m.queues.stale = host.stale_runs();
        let mut queues: Vec<metrics::QueueGauges> = Vec::new();
        for name in host.all_names() {
            let s = host.stats(name);
            m.queues.accepted += s.accepted;
            m.queues.refused += s.refused;
            m.queues.delivered += s.delivered;
            m.queues.redelivered += s.redelivered;
            m.queues.acked += s.acked;
            m.queues.nacked += s.nacked;
            m.queues.dead_lettered += s.dead_lettered;
            m.queues.stale += s.stale;
            m.dropped.queue_deduplicated += s.deduplicated;
            if let Some(queue) = name.strip_suffix(crate::core::queue::DLQ_SUFFIX) {
                // Dropped letters are counted on both queues; once here.
                m.dropped.dead_letters += s.dead_letters_dropped;
                if let Some(q) = queues.iter_mut().find(|q| q.name == queue) {
                    q.dlq_depth = (s.waiting + s.in_flight) as u64;
                    continue;
                }
                queues.push(metrics::QueueGauges {
                    name: queue.to_owned(),
                    dlq_depth: (s.waiting + s.in_flight) as u64,
                    ..Default::default()
                });
                continue;
            }
            let gauges = metrics::QueueGauges {
                name: name.to_string(),
                depth: s.waiting as u64,
                in_flight: s.in_flight as u64,
                consumers: s.consumers as u64,
                dlq_depth: 0,
            };
            match queues.iter_mut().find(|q| q.name == **name) {
                Some(q) => {
                    *q = metrics::QueueGauges {
                        dlq_depth: q.dlq_depth,
                        ..gauges
                    }
                }
                None => queues.push(gauges),
            }
        }
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        m.hosted_queues = queues;
    }

    /// The stream counters, and the lag of each consumer group.
    fn stream_metrics(&self, m: &mut Metrics) {
        let c = &self.engine.counters;
        let streams = self.engine.streams.host.stats();
        m.streams.appended = streams.appended;
        m.streams.refused = streams.refused;
        m.streams.dispatched = streams.dispatched;
        m.streams.commits = streams.commits;
        m.streams.received = c.stream_received;
        m.dropped.stream_retention = streams.expired;
        m.dropped.stream_evicted = streams.evicted;
        let mut lags: Vec<metrics::GroupLag> = Vec::new();
        for name in self.engine.streams.host.names() {
            for p in self.engine.streams.host.partitions(name) {
                for (group, committed) in &p.committed {
                    let lag = p.next.saturating_sub(*committed);
                    match lags
                        .iter_mut()
                        .find(|l| *l.stream == **name && *l.group == **group)
                    {
                        Some(l) => {
                            l.lag += lag;
                            l.partitions += 1;
                        }
                        None => lags.push(metrics::GroupLag {
                            stream: name.to_string(),
                            group: group.to_string(),
                            lag,
                            partitions: 1,
                        }),
                    }
                }
            }
        }
        lags.sort_by(|a, b| (&a.stream, &a.group).cmp(&(&b.stream, &b.group)));
        m.group_lag = lags;
    }
}
