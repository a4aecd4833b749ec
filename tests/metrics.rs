//! `Node::metrics` counters and gauges, and the HTTP endpoint serving
//! them, on small meshes over QUIC on 127.0.0.1.

mod common;

use std::time::Duration;

use common::{addr, eventually, loopback, start, WAIT};
use futures::StreamExt;
use mesh::{queue::ConsumeOptions, Metrics, Node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn metrics(node: &Node) -> Metrics {
    node.metrics().await.expect("node running")
}

/// Waits until `node`'s metrics satisfy `ok`, and returns them.
async fn metrics_until(node: &Node, what: &str, ok: impl Fn(&Metrics) -> bool) -> Metrics {
    let mut last = None;
    let got = tokio::time::timeout(WAIT, async {
        loop {
            let m = metrics(node).await;
            if ok(&m) {
                return m;
            }
            last = Some(m);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    match got {
        Ok(m) => m,
        Err(_) => panic!("timed out waiting for {what}; last metrics: {last:#?}"),
    }
}

/// Two nodes, `b` joined through `a`, data links on QUIC (or shared memory
/// when `shm`).
async fn pair(shm: bool) -> (Node, Node) {
    let builder = || {
        Node::builder()
            .listen(loopback())
            .mdns(false)
            .shm(shm)
            .failure_detection(common::fast_fd())
    };
    let a = builder().start().await.unwrap();
    let b = builder().bootstrap(addr(&a).await).start().await.unwrap();
    (a, b)
}

async fn wait_subscriber(publisher: &Node, topic: &str, sub: &Node) {
    eventually("the subscription to reach the publisher", || async {
        publisher
            .remote_subscribers(topic)
            .await
            .unwrap()
            .contains(&sub.peer_id())
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_counters_and_quic_bytes_move() {
    let (a, b) = pair(false).await;
    let mut sub = b.subscribe("orders.>").await.unwrap();
    let mut local = a.subscribe("orders.>").await.unwrap();
    wait_subscriber(&a, "orders.eu", &b).await;
    let before = metrics(&a).await;
    for i in 0..10 {
        a.publish("orders.eu", format!("order {i}")).await.unwrap();
    }
    for _ in 0..10 {
        tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(WAIT, local.next())
            .await
            .unwrap()
            .unwrap();
    }
    let ma = metrics_until(&a, "a's counters", |m| m.pubsub.published == 10).await;
    assert_eq!(ma.pubsub.sent, 10, "{ma:#?}");
    assert_eq!(ma.pubsub.delivered, 10, "local subscription");
    assert!(ma.bytes.quic_sent > before.bytes.quic_sent + 10 * 7);
    assert_eq!(ma.bytes.shm_sent, 0);
    assert_eq!(ma.subscriptions, 1);
    assert_eq!((ma.links.up_quic, ma.links.up_shm), (1, 0));
    assert!(ma.links.opened >= 1);
    assert_eq!(ma.peers.alive, 1);
    let mb = metrics_until(&b, "b's counters", |m| m.pubsub.delivered == 10).await;
    assert_eq!(mb.pubsub.received, 10);
    assert_eq!(mb.pubsub.published, 0);
    assert!(mb.bytes.quic_received >= ma.bytes.quic_sent - before.bytes.quic_sent);
    assert_eq!(mb.dropped, Default::default(), "nothing dropped");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_over_shared_memory_are_counted_as_shm() {
    let (a, b) = pair(true).await;
    eventually("the link on shared memory", || async {
        a.peers().await.iter().any(|p| p.shm).then_some(())
    })
    .await;
    let mut sub = b.subscribe("t").await.unwrap();
    wait_subscriber(&a, "t", &b).await;
    let before = metrics(&a).await;
    a.publish("t", vec![7u8; 1000]).await.unwrap();
    tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap();
    let ma = metrics(&a).await;
    assert!(ma.bytes.shm_sent >= before.bytes.shm_sent + 1000, "{ma:#?}");
    assert_eq!(ma.links.up_shm, 1);
    let mb = metrics_until(&b, "b's shm bytes", |m| m.bytes.shm_received >= 1000).await;
    assert_eq!(mb.links.up_shm, 1);
    a.shutdown().await;
    b.shutdown().await;
}

/// A subscription that never reads holds the node back for the
/// slow-consumer timeout, then its messages are dropped, and counted as
/// `slow_consumer` the same as in `Subscription::dropped`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_drops_are_counted() {
    let a = Node::builder()
        .listen(loopback())
        .mdns(false)
        .shm(false)
        .subscription_capacity(4)
        .slow_consumer_timeout(Duration::from_millis(100))
        .start()
        .await
        .unwrap();
    let b = Node::builder()
        .listen(loopback())
        .mdns(false)
        .shm(false)
        .bootstrap(addr(&a).await)
        .start()
        .await
        .unwrap();
    let stalled = a.subscribe("load").await.unwrap();
    wait_subscriber(&b, "load", &a).await;
    for i in 0..10u32 {
        b.publish("load", i.to_le_bytes().to_vec()).await.unwrap();
    }
    // The subscription is over-full: the node stops reading until it is
    // cut loose, then drops what comes for it (all of the next ten, and
    // any of the first ten still unread then).
    metrics_until(&a, "the first ten read", |m| m.pubsub.received == 10).await;
    for i in 10..20u32 {
        b.publish("load", i.to_le_bytes().to_vec()).await.unwrap();
    }
    let m = metrics_until(&a, "the next ten read", |m| m.pubsub.received == 20).await;
    assert!(m.dropped.slow_consumer >= 10, "{m:#?}");
    assert!(m.pubsub.delivered >= 4);
    assert_eq!(m.pubsub.delivered + m.dropped.slow_consumer, 20);
    assert_eq!(stalled.dropped(), m.dropped.slow_consumer);
    drop(stalled);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_counters_follow_send_ack_nack_and_dead_letters() {
    let node = start(None).await;
    let jobs = node.queue("jobs").unwrap();
    jobs.send("good").await.unwrap();
    jobs.send("poison").await.unwrap();
    let mut work = jobs.consume(ConsumeOptions::default().prefetch(1).max_attempts(2));
    // good: acked; poison: nacked twice, then dead-lettered.
    for _ in 0..3 {
        let job = tokio::time::timeout(WAIT, work.next())
            .await
            .unwrap()
            .unwrap();
        if job.payload() == "good" {
            job.ack();
        } else {
            job.nack(None);
        }
    }
    let m = metrics_until(&node, "the dead letter", |m| m.queues.dead_lettered == 1).await;
    let q = &m.queues;
    assert_eq!(
        (q.sent, q.accepted, q.delivered, q.redelivered),
        (2, 2, 3, 1),
        "{m:#?}"
    );
    assert_eq!((q.acked, q.nacked), (1, 2));
    let jobs_gauges = m
        .hosted_queues
        .iter()
        .find(|q| q.name == "jobs")
        .expect("jobs hosted here");
    assert_eq!(
        (
            jobs_gauges.depth,
            jobs_gauges.in_flight,
            jobs_gauges.dlq_depth
        ),
        (0, 0, 1)
    );
    assert_eq!(jobs_gauges.consumers, 1);
    assert!(m.hosted_queues.iter().all(|q| !q.name.ends_with(".dlq")));
    drop(work);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_counters_and_group_lag() {
    let node = start(None).await;
    let readings = node.stream("readings").unwrap();
    for i in 0..5 {
        readings.append("sensor-1", format!("{i}")).await.unwrap();
    }
    let mut group = readings.group("billing").unwrap().consume();
    for _ in 0..3 {
        let r = tokio::time::timeout(WAIT, group.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        r.commit();
    }
    // Three of five committed, on the one partition the key went to.
    let m = metrics_until(&node, "the group's commit", |m| {
        m.group_lag
            .iter()
            .any(|l| l.group == "billing" && l.lag == 2)
    })
    .await;
    assert_eq!(m.streams.appended, 5, "{m:#?}");
    assert!(m.streams.dispatched >= 5);
    assert!(m.streams.received >= 3);
    assert!(m.streams.commits >= 1);
    let lag = &m.group_lag[0];
    assert_eq!(
        (lag.stream.as_str(), lag.group.as_str(), lag.partitions),
        ("readings", "billing", 1)
    );
    drop(group);
    node.shutdown().await;
}

/// `GET path` on `addr` over plain TCP: status line and body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, conn.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// Two nodes in one process each serve their own figures (no global
/// recorder), in the Prometheus text format and as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_serves_prometheus_text_and_json_per_node() {
    let local: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let builder = || {
        Node::builder()
            .listen(loopback())
            .mdns(false)
            .metrics_addr(local)
    };
    let a = builder().start().await.unwrap();
    let b = builder().bootstrap(addr(&a).await).start().await.unwrap();
    let (a_addr, b_addr) = (a.metrics_addr().unwrap(), b.metrics_addr().unwrap());
    assert_ne!(a_addr.port(), 0);
    assert_ne!(a_addr, b_addr);
    a.publish("t", "x").await.unwrap();
    metrics_until(&a, "the publish", |m| m.pubsub.published == 1).await;

    let (status, text) = get(a_addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    let node_label = format!("node=\"{}\"", a.peer_id());
    for expected in [
        "# TYPE mesh_pubsub_messages_total counter",
        "mesh_pubsub_messages_total{",
        "mesh_dropped_total{",
        "reason=\"slow_consumer\"",
        "reason=\"auth_refused\"",
        "reason=\"acl_denied\"",
        "mesh_queue_messages_total{",
        "mesh_stream_records_total{",
        "mesh_transport_bytes_total{",
        "transport=\"shm\"",
        "mesh_links_total{",
        "mesh_links_up{",
        "# TYPE mesh_peers gauge",
        "mesh_subscriptions{",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
    let published = text
        .lines()
        .find(|l| {
            l.starts_with("mesh_pubsub_messages_total{")
                && l.contains("event=\"published\"")
                && l.contains(&node_label)
        })
        .unwrap_or_else(|| panic!("no published series for a in:\n{text}"));
    assert!(published.ends_with(" 1"), "{published}");
    assert!(!text.contains(&format!("node=\"{}\"", b.peer_id())));

    let (status, json) = get(b_addr, "/metrics.json").await;
    assert!(status.contains("200"), "{status}");
    let mb: Metrics = serde_json::from_str(&json).unwrap();
    assert_eq!(mb.node, b.peer_id().to_string());
    assert_eq!(mb.pubsub.published, 0);

    let (status, _) = get(a_addr, "/nothing").await;
    assert!(status.contains("404"), "{status}");
    a.shutdown().await;
    b.shutdown().await;
    // Shut down: the endpoint goes.
    eventually("the endpoint to close", || async {
        tokio::net::TcpStream::connect(a_addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
}
