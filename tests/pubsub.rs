//! Pub/sub between real nodes: one conformance suite, run over every
//! transport (`quic::*` with shared memory off, `shm::*` with the data
//! links on shared-memory rings; membership is on QUIC in both).

#[macro_use]
mod common;

use common::*;
use futures::StreamExt;
use mesh::PeerState;

async fn three_nodes_wildcards_and_fifo(net: Net) {
    let a = net.start(None).await;
    let a_addr = addr(&a).await;
    let b = net.start(Some(&a_addr)).await;
    let c = net.start(Some(&a_addr)).await;
    // Everyone learns everyone through a's view and links directly.
    net.linked(&a, &[b.peer_id(), c.peer_id()]).await;
    net.linked(&b, &[a.peer_id(), c.peer_id()]).await;
    net.linked(&c, &[a.peer_id(), b.peer_id()]).await;

    let mut on_b = b.subscribe("orders.*.created").await.unwrap();
    let mut on_c = c.subscribe("orders.>").await.unwrap();
    until_routed(&a, "orders.x.created", &mut on_b).await;
    until_routed(&a, "orders.x.created", &mut on_c).await;

    for i in 0..100u32 {
        a.publish("orders.eu.created", format!("m{i}"))
            .await
            .unwrap();
    }
    a.publish("orders.eu.paid", "paid").await.unwrap();
    a.publish("invoices.eu", "not for them").await.unwrap();

    for i in 0..100u32 {
        let m = next(&mut on_b).await;
        assert_eq!(m.payload, format!("m{i}"), "FIFO per publisher");
        assert_eq!(m.topic.as_str(), "orders.eu.created");
        assert_eq!(m.publisher, a.peer_id());
        assert_eq!(m.id.publisher, a.peer_id());
    }
    for i in 0..100u32 {
        assert_eq!(next(&mut on_c).await.payload, format!("m{i}"));
    }
    assert_eq!(
        next(&mut on_c).await.payload,
        "paid",
        "orders.> matches orders.eu.paid"
    );

    // b's pattern does not match orders.eu.paid: the next thing b sees is a
    // later message, not "paid".
    a.publish("orders.us.created", "after").await.unwrap();
    assert_eq!(next(&mut on_b).await.payload, "after");

    for n in [a, b, c] {
        n.shutdown().await;
    }
}

async fn late_subscriber_and_unsubscribe(net: Net) {
    let a = net.start(None).await;
    let b = net.start(Some(&addr(&a).await)).await;
    net.linked(&a, &[b.peer_id()]).await;

    // Published before anyone subscribed: goes nowhere.
    a.publish("news", "early").await.unwrap();
    let mut sub = b.subscribe("news").await.unwrap();
    until_routed(&a, "news", &mut sub).await;
    a.publish("news", "late").await.unwrap();
    let m = next(&mut sub).await;
    assert_eq!(
        m.payload, "late",
        "a late subscriber gets only what follows"
    );

    // Local delivery: a node receives its own messages too.
    let mut own = a.subscribe("news").await.unwrap();
    a.publish("news", "self").await.unwrap();
    assert_eq!(next(&mut own).await.payload, "self");
    assert_eq!(next(&mut sub).await.payload, "self");

    // Unsubscribe by dropping; a second subscription on b tells us when the
    // drop has been seen by a (FIFO: b's declaration precedes later routing).
    drop(sub);
    let mut other = b.subscribe("weather").await.unwrap();
    until_routed(&a, "weather", &mut other).await;
    let mut again = b.subscribe("news.>").await.unwrap();
    until_routed(&a, "news.x", &mut again).await;
    a.publish("news", "after unsubscribe").await.unwrap();
    a.publish("news.x", "marker").await.unwrap();
    // The node-level routing no longer sends "news" to b; the marker arrives.
    assert_eq!(next(&mut again).await.payload, "marker");

    a.shutdown().await;
    b.shutdown().await;
}

async fn invalid_topics_are_typed_errors(net: Net) {
    let a = net.start(None).await;
    let err = a.publish("a..b", "x").await.unwrap_err();
    assert!(matches!(
        err,
        mesh::PublishError::Topic(mesh::TopicError::EmptySegment { index: 1, .. })
    ));
    let err = a.subscribe("a.>.b").await.unwrap_err();
    assert!(err.to_string().contains("misplaced wildcard"), "{err}");
    assert!(a.publish("a.*", "x").await.is_err());
    a.shutdown().await;
    // After shutdown, calls fail cleanly.
    assert!(matches!(
        a.publish("a", "x").await,
        Err(mesh::PublishError::Closed)
    ));
}

async fn subscription_ends_on_shutdown(net: Net) {
    let a = net.start(None).await;
    let mut sub = a.subscribe(">").await.unwrap();
    a.shutdown().await;
    assert!(tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .is_none());
}

/// Starts `mesh node` as a separate process and returns it with its id.
async fn spawn_node(
    net: Net,
    dir: &std::path::Path,
    bootstrap: &mesh::Multiaddr,
) -> (tokio::process::Child, mesh::PeerId) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh-cli"))
        .args([
            "node",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--bootstrap",
        ])
        .arg(bootstrap.to_string())
        .args(net.cli_args())
        .arg("--data-dir")
        .arg(dir)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mesh binary runs");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let id = line
        .strip_prefix("peer id: ")
        .expect("first line names the peer id")
        .parse()
        .unwrap();
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, id)
}

async fn killed_peer_is_detected_and_restart_readmitted(net: Net) {
    let dir = tempdir("restart");
    let a = net.start(None).await;
    let a_addr = addr(&a).await;

    let (mut b, b_id) = spawn_node(net, &dir, &a_addr).await;
    peer_state(&a, b_id, PeerState::Alive).await;
    net.linked(&a, &[b_id]).await;

    // SIGKILL: no goodbye, no connection close.
    b.kill().await.unwrap();
    peer_state(&a, b_id, PeerState::Down).await;

    // Same identity (data dir), new life: readmitted.
    let (mut b2, b2_id) = spawn_node(net, &dir, &a_addr).await;
    assert_eq!(b2_id, b_id, "identity persisted in the data dir");
    peer_state(&a, b_id, PeerState::Alive).await;
    net.linked(&a, &[b_id]).await;

    b2.kill().await.unwrap();
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

async fn slow_subscriber_pushes_back_without_loss(net: Net) {
    let a = net.start(None).await;
    // Long enough that a loaded CI machine never cuts the subscriber loose
    // as a slow consumer: these tests are about push-back, not dropping.
    let b = sub_node(net, &addr(&a).await, std::time::Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    let mut sub = b.subscribe("flood").await.unwrap();
    until_routed(&a, "flood", &mut sub).await;
    net.linked(&a, &[b.peer_id()]).await;
    // Far more than the subscription holds, published before b reads any.
    let publisher = a.publisher("flood").unwrap();
    let n = 20_000u32;
    for i in 0..n {
        publisher.publish(i.to_le_bytes().to_vec()).await.unwrap();
    }
    for i in 0..n {
        let m = next(&mut sub).await;
        assert_eq!(&m.payload[..], &i.to_le_bytes()[..], "in order, none lost");
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// A subscriber that stops reading while it is flooded pushes the publisher
/// back, yet both stay up: failure detection travels apart from the data
/// stream, so a full stream is not taken for a dead peer.
async fn stalled_subscriber_is_not_declared_dead(net: Net) {
    // Failure detection still far faster than the stall, but with probe
    // timeouts that a debug build on a loaded 2-core machine meets: with
    // 100 ms ones a busy node task occasionally missed one, suspected the
    // peer and stopped routing to it (seen before shared memory existed).
    let fd = mesh::core::membership::Config {
        probe_interval: std::time::Duration::from_millis(500),
        probe_timeout: std::time::Duration::from_millis(250),
        suspicion_timeout: std::time::Duration::from_millis(1500),
        ..Default::default()
    };
    let a = net
        .builder()
        .failure_detection(fd.clone())
        .start()
        .await
        .unwrap();
    // Long enough that a loaded CI machine never cuts the subscriber loose
    // as a slow consumer: these tests are about push-back, not dropping.
    let b = sub_node(net, &addr(&a).await, std::time::Duration::from_secs(60))
        .failure_detection(fd.clone())
        .start()
        .await
        .unwrap();
    let mut sub = b.subscribe("flood").await.unwrap();
    until_routed(&a, "flood", &mut sub).await;
    net.linked(&a, &[b.peer_id()]).await;

    // Enough to fill the subscription, the QUIC windows and a's link buffer,
    // so a's publisher ends up waiting.
    let n = 600_000u32;
    let publisher = a.publisher("flood").unwrap();
    let flood = tokio::spawn(async move {
        let payload = vec![7u8; 60];
        for i in 0..n {
            let mut p = payload.clone();
            p[..4].copy_from_slice(&i.to_le_bytes());
            publisher.publish(p).await.unwrap();
        }
    });
    // The stall: several suspicion timeouts long (a fault's duration, not a
    // synchronisation).
    tokio::time::sleep(fd.suspicion_timeout * 4).await;
    let state_of =
        |peers: Vec<mesh::PeerInfo>, id| peers.into_iter().find(|p| p.id == id).map(|p| p.state);
    assert_eq!(
        state_of(a.peers().await, b.peer_id()),
        Some(PeerState::Alive)
    );
    assert_eq!(
        state_of(b.peers().await, a.peer_id()),
        Some(PeerState::Alive)
    );

    for i in 0..n {
        let m = next(&mut sub).await;
        assert_eq!(&m.payload[..4], &i.to_le_bytes()[..], "in order, none lost");
    }
    flood.await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

fn sub_node(net: Net, bootstrap: &mesh::Multiaddr, slow: std::time::Duration) -> mesh::Builder {
    net.builder()
        .subscription_capacity(64)
        .slow_consumer_timeout(slow)
        .bootstrap(bootstrap.clone())
}

/// Node `a` floods `n` numbered messages on "bulk" to node `b`, which
/// subscribes to "bulk" (never read by the caller unless it wants) and
/// "live", with a small subscription capacity and the given slow-consumer
/// timeout.
async fn flooded(
    net: Net,
    slow: std::time::Duration,
    n: u32,
) -> (
    mesh::Node,
    mesh::Node,
    mesh::Subscription,
    mesh::Subscription,
) {
    let a = net.start(None).await;
    let b = sub_node(net, &addr(&a).await, slow).start().await.unwrap();
    let mut stuck = b.subscribe("bulk").await.unwrap();
    let mut live = b.subscribe("live").await.unwrap();
    until_routed(&a, "bulk", &mut stuck).await;
    until_routed(&a, "live", &mut live).await;
    net.linked(&a, &[b.peer_id()]).await;
    let bulk = a.publisher("bulk").unwrap();
    for i in 0..n {
        bulk.publish(i.to_le_bytes().to_vec()).await.unwrap();
    }
    (a, b, stuck, live)
}

/// A subscription nobody reads holds the node back only until the
/// slow-consumer timeout; then its messages are dropped and counted, and the
/// node's other subscriptions flow again.
async fn never_polled_subscription_does_not_stall_the_node(net: Net) {
    let (a, b, mut stuck, mut live) =
        flooded(net, std::time::Duration::from_millis(300), 50_000).await;
    for i in 0..10u32 {
        a.publish("live", format!("live {i}")).await.unwrap();
    }
    for i in 0..10u32 {
        assert_eq!(next(&mut live).await.payload, format!("live {i}"));
    }
    assert!(
        stuck.dropped() > 0,
        "the stalled subscription's losses are counted"
    );
    // What it did receive is in order.
    let mut expect = 0u32;
    while let Ok(Some(m)) =
        tokio::time::timeout(std::time::Duration::from_millis(50), stuck.next()).await
    {
        if m.payload == "probe" {
            continue;
        }
        let got = u32::from_le_bytes(m.payload[..4].try_into().unwrap());
        assert!(got >= expect, "order kept");
        expect = got + 1;
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// Dropping a full subscription releases the node at once (no timeout).
async fn dropping_a_full_subscription_releases_the_node(net: Net) {
    let (a, b, stuck, mut live) = flooded(net, std::time::Duration::from_secs(3600), 5_000).await;
    a.publish("live", "after the flood").await.unwrap();
    drop(stuck);
    assert_eq!(next(&mut live).await.payload, "after the flood");
    a.shutdown().await;
    b.shutdown().await;
}

/// A publisher that shuts down learns which subscribers did not confirm
/// reading its messages, instead of losing them silently.
async fn shutdown_reports_peers_that_did_not_confirm(net: Net) {
    use tokio::io::AsyncBufReadExt;
    // Default failure detection: slower than this test's steps.
    let a = mesh::Node::builder()
        .listen(loopback())
        .mdns(false)
        .shm(net == Net::Shm)
        .start()
        .await
        .unwrap();
    let a_addr = addr(&a).await;
    let mut sub = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh-cli"))
        .args([
            "sub",
            "reports",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--bootstrap",
        ])
        .arg(a_addr.to_string())
        .args(net.cli_args())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(sub.stdout.take().unwrap()).lines();
    // Probe until the subscriber prints one: its interest has reached a.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        a.publish("reports", "probe").await.unwrap();
        if let Ok(Ok(Some(_))) =
            tokio::time::timeout(std::time::Duration::from_millis(100), lines.next_line()).await
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscriber never reached"
        );
    }
    let sub_id = a
        .peers()
        .await
        .into_iter()
        .find(|p| p.linked)
        .map(|p| p.id)
        .expect("linked subscriber");
    net.linked(&a, &[sub_id]).await;

    sub.kill().await.unwrap();
    a.publish("reports", "into the void").await.unwrap();
    let report = a.shutdown().await;
    assert_eq!(report.unconfirmed, vec![sub_id]);
    assert!(!report.is_clean());
}

/// Node `a` publishes `n` numbered messages on `topic` to node `b`, whose
/// subscription (with `options`) the caller reads only once the overflow
/// it expects has happened.
async fn overflowed(
    net: Net,
    topic: &str,
    options: mesh::SubscribeOptions,
    n: u32,
) -> (mesh::Node, mesh::Node, mesh::Subscription) {
    let a = net.start(None).await;
    let b = net.start(Some(&addr(&a).await)).await;
    let sub = b.subscribe_with(topic, options).await.unwrap();
    until_routes_to(&a, topic, &b).await;
    net.linked(&a, &[b.peer_id()]).await;
    let p = a.publisher(topic).unwrap();
    for i in 0..n {
        p.publish(i.to_le_bytes().to_vec()).await.unwrap();
    }
    (a, b, sub)
}

fn seq(m: &mesh::Message) -> u32 {
    u32::from_le_bytes(m.payload[..4].try_into().unwrap())
}

/// A drop-oldest subscription that falls behind keeps the newest messages
/// and is told, in its stream, how many it missed from whom; the publisher
/// is never held back.
async fn drop_oldest_subscription_keeps_the_newest_and_reports_the_rest(net: Net) {
    let options = mesh::SubscribeOptions::new()
        .buffer(16)
        .overflow(mesh::Overflow::DropOldest);
    let (a, b, mut sub) = overflowed(net, "ring", options, 1000).await;
    // Drop-oldest takes in every message.
    eventually("b to take in every message", || async {
        (b.metrics().await.unwrap().pubsub.delivered >= 1000).then_some(())
    })
    .await;
    match sub.recv_delivery().await {
        Some(mesh::Delivery::Lagged(l)) => {
            assert_eq!(l.publisher, a.peer_id());
            assert_eq!(l.missed, 1000 - 16);
        }
        other => panic!("expected the gap first, got {other:?}"),
    }
    for i in 1000 - 16..1000 {
        match sub.recv_delivery().await {
            Some(mesh::Delivery::Message(m)) => assert_eq!(seq(&m), i, "the newest, in order"),
            other => panic!("expected message {i}, got {other:?}"),
        }
    }
    assert_eq!(sub.dropped(), 1000 - 16);
    let m = b.metrics().await.unwrap();
    assert_eq!(m.dropped.subscription_evicted, 1000 - 16);
    // It keeps working after the overflow.
    a.publish("ring", 7u32.to_le_bytes().to_vec())
        .await
        .unwrap();
    assert_eq!(seq(&next(&mut sub).await), 7);
    a.shutdown().await;
    b.shutdown().await;
}

/// A disconnect-policy subscription that overflows yields what it held, a
/// report of what did not fit, and ends; its interest is withdrawn from
/// the mesh.
async fn disconnect_subscription_ends_when_full(net: Net) {
    let options = mesh::SubscribeOptions::new()
        .buffer(8)
        .overflow(mesh::Overflow::Disconnect);
    let (a, b, mut sub) = overflowed(net, "strict", options, 100).await;
    // What arrives after the cut, in later batches, has no subscription to
    // go to: the cut itself is what to wait for.
    eventually("the subscription to be cut off", || async {
        sub.disconnected().then_some(())
    })
    .await;
    for i in 0..8 {
        match sub.recv_delivery().await {
            Some(mesh::Delivery::Message(m)) => assert_eq!(seq(&m), i),
            other => panic!("expected message {i}, got {other:?}"),
        }
    }
    let mut missed = 0;
    while let Some(d) = sub.recv_delivery().await {
        match d {
            mesh::Delivery::Lagged(l) => missed += l.missed,
            other => panic!("nothing after the buffer but the report, got {other:?}"),
        }
    }
    assert!(missed >= 1, "the message that did not fit is reported");
    assert_eq!(sub.dropped(), missed);
    assert_eq!(b.metrics().await.unwrap().dropped.subscription_cut, missed);
    eventually("a to forget b's interest", || async {
        a.remote_subscribers("strict")
            .await
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

/// A peer over the inbound limit is slowed, not cut off: everything it
/// sent arrives, in order, and the pauses are counted.
async fn peer_over_the_inbound_limit_is_slowed_not_dropped(net: Net) {
    let a = net.start(None).await;
    let b = net
        .builder()
        .bootstrap(addr(&a).await)
        .peer_inbound_limit(mesh::InboundLimit::bytes_per_sec(u64::MAX).frames_per_sec(100))
        .start()
        .await
        .unwrap();
    let mut sub = b.subscribe("limited").await.unwrap();
    until_routes_to(&a, "limited", &b).await;
    net.linked(&a, &[b.peer_id()]).await;
    let p = a.publisher("limited").unwrap();
    for i in 0..300u32 {
        p.publish(i.to_le_bytes().to_vec()).await.unwrap();
    }
    for i in 0..300u32 {
        assert_eq!(seq(&next(&mut sub).await), i, "all of them, in order");
    }
    let m = b.metrics().await.unwrap();
    assert!(m.links.throttled > 0, "{:?}", m.links);
    assert_eq!(m.dropped.slow_consumer + m.dropped.malformed, 0);
    a.shutdown().await;
    b.shutdown().await;
}

// Each test above, once per transport.
conformance!(
    three_nodes_wildcards_and_fifo,
    late_subscriber_and_unsubscribe,
    invalid_topics_are_typed_errors,
    subscription_ends_on_shutdown,
    killed_peer_is_detected_and_restart_readmitted,
    slow_subscriber_pushes_back_without_loss,
    stalled_subscriber_is_not_declared_dead,
    never_polled_subscription_does_not_stall_the_node,
    dropping_a_full_subscription_releases_the_node,
    drop_oldest_subscription_keeps_the_newest_and_reports_the_rest,
    disconnect_subscription_ends_when_full,
    peer_over_the_inbound_limit_is_slowed_not_dropped,
    shutdown_reports_peers_that_did_not_confirm
);

/// When the rings cannot be made (here: their directory does not exist),
/// the link stays on QUIC and messages flow as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_stays_on_quic_when_rings_cannot_be_made() {
    let broken = mesh::ShmConfig {
        dir: "/nonexistent/mesh-shm".into(),
        ..Default::default()
    };
    let a = Net::Shm
        .builder()
        .shm_config(broken.clone())
        .start()
        .await
        .unwrap();
    let b = Net::Shm
        .builder()
        .shm_config(broken)
        .bootstrap(addr(&a).await)
        .start()
        .await
        .unwrap();
    Net::Quic.linked(&a, &[b.peer_id()]).await;
    let mut sub = b.subscribe("fallback").await.unwrap();
    until_routed(&a, "fallback", &mut sub).await;
    a.publish("fallback", "over quic").await.unwrap();
    assert_eq!(next(&mut sub).await.payload, "over quic");
    assert!(a.peers().await.iter().all(|p| !p.shm));
    a.shutdown().await;
    b.shutdown().await;
}
