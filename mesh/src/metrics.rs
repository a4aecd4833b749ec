//! What a node has done and holds: [`Node::metrics`] returns a [`Metrics`]
//! snapshot; with the `prometheus` feature (on by default) a node can serve
//! it over HTTP ([`crate::Builder::metrics_addr`], [`serve`]) in the
//! Prometheus text format (`GET /metrics`) and as JSON
//! (`GET /metrics.json`, what `mesh stats` reads).
//!
//! Counters are plain integers owned by the node task, copied when a
//! snapshot is asked for: counting costs an add on the paths it counts,
//! no lock and no atomic. They start at zero when the node starts and only
//! grow. Gauges are read from the node's state at snapshot time.
//!
//! Every message the node drops, anywhere, is counted in [`Dropped`] under
//! its reason, so overload is visible: a subscriber that does not keep up
//! shows as `dropped.slow_consumer`, a peer that never linked as
//! `dropped.unreachable`, and so on.
//!
//! ```no_run
//! # async fn f(node: mesh::Node) {
//! let m = node.metrics().await.expect("node running");
//! println!("published {} delivered {} dropped (slow) {}",
//!     m.pubsub.published, m.pubsub.delivered, m.dropped.slow_consumer);
//! # }
//! ```

use serde::{Deserialize, Serialize};

#[cfg(feature = "prometheus")]
use crate::Node;

/// A snapshot of a node's counters and gauges; see the [module
/// docs](self).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Metrics {
    /// The node's peer id.
    pub node: String,
    /// Pub/sub messages.
    pub pubsub: PubSub,
    /// Everything the node dropped, by reason.
    pub dropped: Dropped,
    /// Work queues: this node's sends, and what the queues it hosts did.
    pub queues: Queues,
    /// Streams: what the streams this node hosts did, and what its
    /// consumers received.
    pub streams: Streams,
    /// Bytes over the data links, per transport.
    pub bytes: TransportBytes,
    /// Data links.
    pub links: Links,
    /// Peers by membership state (gauges).
    pub peers: Peers,
    /// Live local subscriptions (gauge).
    pub subscriptions: u64,
    /// Per queue hosted here (gauges), by name; dead-letter queues are
    /// reported with their queue, not on their own.
    pub hosted_queues: Vec<QueueGauges>,
    /// Consumer group lag per stream and group, as far as this node hosts
    /// the group's partitions (gauges).
    pub group_lag: Vec<GroupLag>,
    /// A durable host's writes not yet on disk (`None` without a store).
    pub durable: Option<Durable>,
}

/// Pub/sub counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct PubSub {
    /// Messages published on this node.
    pub published: u64,
    /// Copies sent to peers (one per subscribing peer in direct mode, one
    /// per gossip transmission in gossip mode).
    pub sent: u64,
    /// Reliable messages sent again on a subscriber's request.
    pub resent: u64,
    /// Messages received from peers (direct and gossip).
    pub received: u64,
    /// Messages put into local subscriptions (one per subscription).
    pub delivered: u64,
}

/// Messages (and, where it says so, frames or links) the node dropped,
/// by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Dropped {
    /// Messages for a subscription cut loose as a slow consumer (full for
    /// longer than the slow-consumer timeout), until it took its backlog.
    pub slow_consumer: u64,
    /// Messages published on this node to a local subscription at twice
    /// its capacity.
    pub subscription_full: u64,
    /// Oldest messages evicted from full drop-oldest subscriptions.
    pub subscription_evicted: u64,
    /// Messages that found a disconnect-policy subscription full (which
    /// ended it).
    pub subscription_cut: u64,
    /// Messages buffered for a peer whose link never came up in time.
    pub unreachable: u64,
    /// Messages for a peer whose link is not up yet and whose buffer was
    /// full.
    pub link_buffer_full: u64,
    /// Frames from peers over the frame limit (each closed its link).
    pub oversize: u64,
    /// Malformed or unexpected frames from peers (each closed its link).
    pub malformed: u64,
    /// Links that ended with a transport or protocol error (whatever was
    /// in flight on them).
    pub link_errors: u64,
    /// Duplicate pub/sub messages: reliable resends already delivered, and
    /// gossip copies already seen.
    pub duplicate: u64,
    /// Reliable messages that arrived after a gap (dropped, and fetched
    /// again in order from the publisher's window).
    pub out_of_order: u64,
    /// Reliable messages that left their publisher's window before this
    /// node could fetch them (reported to subscribers as `Lagged`).
    pub reliable_lagged: u64,
    /// Messages received before the publisher knew of this node's reliable
    /// subscription (not numbered; the reliable stream starts after them).
    pub unnumbered: u64,
    /// Messages that arrived for a subscription that had just ended.
    pub no_subscriber: u64,
    /// Gossip messages announced to this node that no neighbour could
    /// send (every announcer asked).
    pub gossip_unrecovered: u64,
    /// Membership (control) sends dropped: too many in flight.
    pub control_sends: u64,
    /// Control streams from peers refused (too many, malformed, slow).
    pub control_refused: u64,
    /// Queue sends dropped as repeats of a dedup key.
    pub queue_deduplicated: u64,
    /// Messages that could not move to their full dead-letter queue: not
    /// dropped, they stay in their queue and are offered again after
    /// `core::queue::DLQ_FULL_RETRY`.
    pub dead_letters: u64,
    /// Stream records removed by retention (count, bytes or age).
    pub stream_retention: u64,
    /// Stream records removed to keep the host under its byte bound.
    pub stream_evicted: u64,
    /// Stream records a consumer received twice (repeats of a re-read).
    pub stream_repeats: u64,
    /// Other nodes' declarations ignored because the interest table was
    /// full (`core::interest::MAX_TABLE_BYTES`).
    pub declarations_refused: u64,
    /// Peeks, stream infos and reliable resends over a peer's budget
    /// (`engine::access::REQUESTS_PER_SEC`): answered empty, or ignored.
    pub requests_throttled: u64,
    /// Links closed because their peer let more than 16 times the link
    /// buffer pile up unread (what waited for it was dropped).
    pub outbox_overflow: u64,
    /// Streams of a private node refused because 64 links were already
    /// waiting for their peers' proofs.
    pub unadmitted_refused: u64,
    /// Membership updates ignored: an incarnation implausibly far ahead
    /// (`core::membership::MAX_INCARNATION_AHEAD`), a member beyond what
    /// one peer may introduce (`MAX_LEARNED_PER_PEER`), or an Alive claim
    /// about another member without that member's signature.
    pub membership_refused: u64,
    /// Declarations without a valid signature of the node they are of
    /// (forged, altered by a relay, or unsigned): ignored.
    pub declarations_forged: u64,
    /// Request replies from a peer the request did not go to (forged,
    /// or aimed at another's request): ignored.
    pub forged_replies: u64,
    /// Peers refused by the private-mesh check.
    pub auth_refused: u64,
    /// Operations refused by the access policy.
    pub acl_denied: u64,
    /// Gossip messages whose origin signature did not check (forged or
    /// altered by a relay).
    pub gossip_forged: u64,
}

/// Work queue counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Queues {
    /// Messages sent by this node's handles (to any host).
    pub sent: u64,
    /// Sends accepted by the queues hosted here.
    pub accepted: u64,
    /// Sends refused by a full queue hosted here (the sender retries or
    /// fails, as `Builder::queue_full` says: not lost).
    pub refused: u64,
    /// Deliveries to consumers by the queues hosted here (redeliveries
    /// included).
    pub delivered: u64,
    /// Deliveries after a message's first.
    pub redelivered: u64,
    /// Messages acked.
    pub acked: u64,
    /// Messages nacked.
    pub nacked: u64,
    /// Messages moved to a dead-letter queue.
    pub dead_lettered: u64,
    /// Acks, nacks and extends ignored by the queues hosted here: for a
    /// message not in flight to that consumer, or for a delivery of a
    /// previous run of this host (before a restart).
    pub stale: u64,
}

/// Stream counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Streams {
    /// Records appended to the streams hosted here.
    pub appended: u64,
    /// Appends refused by a host here (full; the caller is told).
    pub refused: u64,
    /// Records sent to consumers by the streams hosted here.
    pub dispatched: u64,
    /// Records received by this node's consumers.
    pub received: u64,
    /// Group commits taken by the streams hosted here.
    pub commits: u64,
}

/// Bytes moved over data links: what the node task handed to the links'
/// writers and what their readers handed it (frames with their length
/// prefix; membership's control streams count as QUIC).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct TransportBytes {
    /// Sent over QUIC.
    pub quic_sent: u64,
    /// Received over QUIC.
    pub quic_received: u64,
    /// Sent over shared-memory rings.
    pub shm_sent: u64,
    /// Received over shared-memory rings.
    pub shm_received: u64,
}

/// Data link counters and gauges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Links {
    /// Links that came up (the peer's handshake arrived).
    pub opened: u64,
    /// Links that came up and have ended since.
    pub closed: u64,
    /// Links refused: a failed handshake or a bad frame.
    pub refused: u64,
    /// Links up now over QUIC (gauge).
    pub up_quic: u64,
    /// Links up now over shared memory (gauge).
    pub up_shm: u64,
    /// Times a link reader paused because its peer went over the node's
    /// [`InboundLimit`](crate::node::InboundLimit).
    pub throttled: u64,
    /// Time link readers spent in those pauses, ms.
    pub throttled_ms: u64,
}

/// Peers by membership state (gauges).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Peers {
    /// Alive.
    pub alive: u64,
    /// Suspected of having failed.
    pub suspect: u64,
    /// Declared down (and not forgotten yet).
    pub down: u64,
}

/// One queue hosted here (gauges).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct QueueGauges {
    /// The queue.
    pub name: String,
    /// Messages waiting for a consumer (delayed ones included).
    pub depth: u64,
    /// Messages delivered and not settled yet.
    pub in_flight: u64,
    /// Consumers with credit.
    pub consumers: u64,
    /// Messages in its dead-letter queue.
    pub dlq_depth: u64,
}

/// How far a consumer group is behind on the partitions hosted here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct GroupLag {
    /// The stream.
    pub stream: String,
    /// The group.
    pub group: String,
    /// Records after the group's commits, summed over the partitions here
    /// that it has committed on.
    pub lag: u64,
    /// Partitions here with a commit of the group.
    pub partitions: u64,
}

/// A durable host's store (gauges).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Durable {
    /// Write batches submitted and not yet on disk.
    pub batches_pending: u64,
    /// Confirmations (accepted sends, appends) held until their batch is
    /// on disk.
    pub confirmations_held: u64,
}

#[cfg(feature = "prometheus")]
pub use self::prometheus::{serve, MetricsServer};

#[cfg(feature = "prometheus")]
mod prometheus {
    use std::{net::SocketAddr, sync::Arc, time::Duration};

    use metrics::{counter, describe_counter, describe_gauge, gauge};
    use metrics_exporter_prometheus::PrometheusBuilder;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::Metrics;
    use crate::Node;

    /// Scrapes served at once; more wait for the listener.
    const MAX_CONNECTIONS: usize = 16;
    /// Most bytes of a request read (the request line and headers).
    const MAX_REQUEST: usize = 8 * 1024;
    /// How long a client may take to send its request.
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

    impl Metrics {
        /// The snapshot in the Prometheus text exposition format, every
        /// series labelled with `node`.
        ///
        /// Rendered through a `metrics-exporter-prometheus` recorder made
        /// for this call (never installed globally), so several nodes in one
        /// process each render their own figures.
        pub fn to_prometheus(&self) -> String {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::with_local_recorder(&recorder, || self.record());
            handle.render()
        }

        fn record(&self) {
            let node = self.node.clone();
            let c = |name: &'static str, labels: &[(&'static str, String)], v: u64| {
                let mut l = vec![("node", node.clone())];
                l.extend(labels.iter().cloned());
                counter!(name, l.as_slice()).absolute(v);
            };
            let g = |name: &'static str, labels: &[(&'static str, String)], v: u64| {
                let mut l = vec![("node", node.clone())];
                l.extend(labels.iter().cloned());
                gauge!(name, l.as_slice()).set(v as f64);
            };
            let one = |k: &'static str, v: &str| [(k, v.to_owned())];

            describe_counter!("mesh_pubsub_messages_total", "Pub/sub messages, by event");
            let p = &self.pubsub;
            for (event, v) in [
                ("published", p.published),
                ("sent", p.sent),
                ("resent", p.resent),
                ("received", p.received),
                ("delivered", p.delivered),
            ] {
                c("mesh_pubsub_messages_total", &one("event", event), v);
            }

            describe_counter!(
                "mesh_dropped_total",
                "Messages (frames, links where the reason says so) dropped, by reason"
            );
            for (reason, v) in self.dropped.by_reason() {
                c("mesh_dropped_total", &one("reason", reason), v);
            }

            describe_counter!("mesh_queue_messages_total", "Work queue messages, by event");
            let q = &self.queues;
            for (event, v) in [
                ("sent", q.sent),
                ("accepted", q.accepted),
                ("refused", q.refused),
                ("delivered", q.delivered),
                ("redelivered", q.redelivered),
                ("acked", q.acked),
                ("nacked", q.nacked),
                ("dead_lettered", q.dead_lettered),
                ("stale", q.stale),
            ] {
                c("mesh_queue_messages_total", &one("event", event), v);
            }

            describe_counter!("mesh_stream_records_total", "Stream records, by event");
            let s = &self.streams;
            for (event, v) in [
                ("appended", s.appended),
                ("refused", s.refused),
                ("dispatched", s.dispatched),
                ("received", s.received),
            ] {
                c("mesh_stream_records_total", &one("event", event), v);
            }
            describe_counter!("mesh_stream_commits_total", "Group commits taken");
            c("mesh_stream_commits_total", &[], s.commits);

            describe_counter!(
                "mesh_transport_bytes_total",
                "Bytes over data links, by transport and direction"
            );
            let b = &self.bytes;
            for (transport, direction, v) in [
                ("quic", "sent", b.quic_sent),
                ("quic", "received", b.quic_received),
                ("shm", "sent", b.shm_sent),
                ("shm", "received", b.shm_received),
            ] {
                c(
                    "mesh_transport_bytes_total",
                    &[
                        ("transport", transport.to_owned()),
                        ("direction", direction.to_owned()),
                    ],
                    v,
                );
            }

            describe_counter!("mesh_links_total", "Data links, by event");
            let l = &self.links;
            for (event, v) in [
                ("opened", l.opened),
                ("closed", l.closed),
                ("refused", l.refused),
                ("throttled", l.throttled),
            ] {
                c("mesh_links_total", &one("event", event), v);
            }
            describe_counter!(
                "mesh_links_throttled_ms_total",
                "Time link readers paused for peers over the inbound limit, ms"
            );
            c("mesh_links_throttled_ms_total", &[], l.throttled_ms);
            describe_gauge!("mesh_links_up", "Data links up, by transport");
            g("mesh_links_up", &one("transport", "quic"), l.up_quic);
            g("mesh_links_up", &one("transport", "shm"), l.up_shm);

            describe_gauge!("mesh_peers", "Peers by membership state");
            for (state, v) in [
                ("alive", self.peers.alive),
                ("suspect", self.peers.suspect),
                ("down", self.peers.down),
            ] {
                g("mesh_peers", &one("state", state), v);
            }
            describe_gauge!("mesh_subscriptions", "Live local subscriptions");
            g("mesh_subscriptions", &[], self.subscriptions);

            describe_gauge!("mesh_queue_depth", "Messages waiting in a hosted queue");
            describe_gauge!("mesh_queue_in_flight", "Messages delivered, not settled");
            describe_gauge!("mesh_queue_consumers", "Consumers of a hosted queue");
            describe_gauge!(
                "mesh_queue_dlq_depth",
                "Messages in a queue's dead-letter queue"
            );
            for q in &self.hosted_queues {
                let label = one("queue", &q.name);
                g("mesh_queue_depth", &label, q.depth);
                g("mesh_queue_in_flight", &label, q.in_flight);
                g("mesh_queue_consumers", &label, q.consumers);
                g("mesh_queue_dlq_depth", &label, q.dlq_depth);
            }
            describe_gauge!(
                "mesh_stream_group_lag",
                "Records after a group's commits on the partitions hosted here"
            );
            for lag in &self.group_lag {
                g(
                    "mesh_stream_group_lag",
                    &[("stream", lag.stream.clone()), ("group", lag.group.clone())],
                    lag.lag,
                );
            }
            if let Some(d) = &self.durable {
                describe_gauge!(
                    "mesh_durable_batches_pending",
                    "Write batches not yet on disk"
                );
                g("mesh_durable_batches_pending", &[], d.batches_pending);
                describe_gauge!(
                    "mesh_durable_confirmations_held",
                    "Confirmations held until their batch is on disk"
                );
                g("mesh_durable_confirmations_held", &[], d.confirmations_held);
            }
        }
    }

    /// A running metrics endpoint; see [`serve`]. Dropping it (or shutting
    /// the node down, for one started by `Builder::metrics_addr`) stops it.
    #[derive(Debug)]
    pub struct MetricsServer {
        addr: SocketAddr,
        task: tokio::task::AbortHandle,
    }

    impl MetricsServer {
        /// The address it listens on (the real port when bound to port 0).
        pub fn local_addr(&self) -> SocketAddr {
            self.addr
        }
    }

    impl Drop for MetricsServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// Serves `node`'s metrics over HTTP on `addr`: `GET /metrics` in the
    /// Prometheus text format, `GET /metrics.json` as JSON. Each scrape
    /// takes a fresh [`Node::metrics`] snapshot. The server holds no
    /// reference that keeps the node alive.
    pub async fn serve(node: &Node, addr: SocketAddr) -> std::io::Result<MetricsServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let node = Arc::downgrade(&node.inner);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (conn, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "metrics endpoint: accept failed");
                        continue;
                    }
                };
                let node = node.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = answer(conn, node).await {
                        tracing::debug!(error = %e, "metrics endpoint: request failed");
                    }
                });
            }
        })
        .abort_handle();
        tracing::info!(%addr, "serving metrics");
        Ok(MetricsServer { addr, task })
    }

    async fn answer(
        mut conn: tokio::net::TcpStream,
        node: std::sync::Weak<crate::node::Inner>,
    ) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(1024);
        let read = async {
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
                let n = conn.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            Ok::<_, std::io::Error>(())
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        }
        let line = buf.split(|b| *b == b'\r').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut parts = line.split(' ');
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = path.split('?').next().unwrap_or("");
        let (status, kind, body) = if method != "GET" {
            (
                "405 Method Not Allowed",
                "text/plain",
                "GET only\n".to_owned(),
            )
        } else if path != "/metrics" && path != "/metrics.json" {
            (
                "404 Not Found",
                "text/plain",
                "try /metrics or /metrics.json\n".to_owned(),
            )
        } else {
            let node = node.upgrade().map(|inner| Node { inner });
            let metrics = match node {
                Some(n) => n.metrics().await,
                None => None,
            };
            match metrics {
                None => (
                    "503 Service Unavailable",
                    "text/plain",
                    "node is shut down\n".to_owned(),
                ),
                Some(m) if path == "/metrics" => {
                    ("200 OK", "text/plain; version=0.0.4", m.to_prometheus())
                }
                Some(m) => (
                    "200 OK",
                    "application/json",
                    serde_json::to_string(&m).map_err(std::io::Error::other)?,
                ),
            }
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes()).await?;
        conn.write_all(body.as_bytes()).await?;
        conn.shutdown().await
    }
}

impl Dropped {
    /// Every reason with its count, in a fixed order (the names are the
    /// fields' and the Prometheus `reason` label's).
    pub fn by_reason(&self) -> [(&'static str, u64); 32] {
        [
            ("slow_consumer", self.slow_consumer),
            ("subscription_full", self.subscription_full),
            ("subscription_evicted", self.subscription_evicted),
            ("subscription_cut", self.subscription_cut),
            ("unreachable", self.unreachable),
            ("link_buffer_full", self.link_buffer_full),
            ("oversize", self.oversize),
            ("malformed", self.malformed),
            ("link_errors", self.link_errors),
            ("duplicate", self.duplicate),
            ("out_of_order", self.out_of_order),
            ("reliable_lagged", self.reliable_lagged),
            ("unnumbered", self.unnumbered),
            ("no_subscriber", self.no_subscriber),
            ("gossip_unrecovered", self.gossip_unrecovered),
            ("control_sends", self.control_sends),
            ("control_refused", self.control_refused),
            ("queue_deduplicated", self.queue_deduplicated),
            ("dead_letters", self.dead_letters),
            ("stream_retention", self.stream_retention),
            ("stream_evicted", self.stream_evicted),
            ("stream_repeats", self.stream_repeats),
            ("declarations_refused", self.declarations_refused),
            ("auth_refused", self.auth_refused),
            ("acl_denied", self.acl_denied),
            ("gossip_forged", self.gossip_forged),
            ("declarations_forged", self.declarations_forged),
            ("membership_refused", self.membership_refused),
            ("requests_throttled", self.requests_throttled),
            ("outbox_overflow", self.outbox_overflow),
            ("unadmitted_refused", self.unadmitted_refused),
            ("forged_replies", self.forged_replies),
        ]
    }
}

#[cfg(feature = "prometheus")]
impl Node {
    /// The address of the metrics endpoint started by
    /// [`crate::Builder::metrics_addr`], if any.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.inner
            .metrics_server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|s| s.local_addr())
    }
}
