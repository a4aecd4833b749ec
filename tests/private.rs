//! Private meshes over real QUIC links: only holders of the mesh secret (or
//! allow-listed peers) get in; outsiders can neither publish, subscribe,
//! consume nor learn topic names; a node restarted with a rotated secret
//! rejoins.

mod common;

use std::time::Duration;

use common::*;
use futures::{FutureExt, StreamExt};
use mesh::{security::MeshSecret, Node, PeerState};

const S1: &str = "first secret of the private mesh";
const S2: &str = "second secret, after rotation";

fn secret(secrets: &[&str]) -> MeshSecret {
    MeshSecret::from_secrets(secrets.iter().map(|s| s.as_bytes().to_vec())).unwrap()
}

fn builder(secrets: &[&str], bootstrap: Option<&mesh::Multiaddr>) -> mesh::Builder {
    let mut b = Net::Quic.builder();
    if !secrets.is_empty() {
        b = b.mesh_secret(secret(secrets));
    }
    if let Some(addr) = bootstrap {
        b = b.bootstrap(addr.clone());
    }
    b
}

/// An outsider's node: it tries to join through `addr` and must not.
async fn outsider(secrets: &[&str], addr: &mesh::Multiaddr) -> Node {
    let node = builder(secrets, Some(addr))
        .self_host(false)
        .start()
        .await
        .unwrap();
    // It never gets the member's view: nothing passes before the proof.
    assert!(
        node.joined(Duration::from_secs(2)).await.is_err(),
        "an outsider joined"
    );
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_can_neither_publish_subscribe_consume_nor_learn_topics() {
    let a = builder(&[S1], None).host_all().start().await.unwrap();
    let a_addr = addr(&a).await;
    let b = builder(&[S1], Some(&a_addr)).start().await.unwrap();
    Net::Quic.linked(&a, &[b.peer_id()]).await;
    Net::Quic.linked(&b, &[a.peer_id()]).await;
    let mut on_b = b.subscribe("orders.>").await.unwrap();
    until_routed(&a, "orders.probe", &mut on_b).await;
    b.queue("jobs").unwrap().send("job 1").await.unwrap();

    // No secret, and a wrong one.
    let none = outsider(&[], &a_addr).await;
    let wrong = outsider(&["a guess at the mesh secret"], &a_addr).await;
    for o in [&none, &wrong] {
        // It learned no member, so no topic either.
        assert!(
            o.peers()
                .await
                .iter()
                .all(|p| p.state != PeerState::Alive || !p.linked),
            "an outsider has a live link"
        );
        let mut sub = o.subscribe("orders.>").await.unwrap();
        let mut jobs = o.queue("jobs").unwrap().consume(Default::default());
        o.publish("orders.forged", "from outside").await.unwrap();
        a.publish("orders.real", "for members").await.unwrap();
        // The member gets a's message and never the outsider's.
        let m = next(&mut on_b).await;
        assert_eq!(m.payload, "for members");
        assert_eq!(m.publisher, a.peer_id());
        // Its own message reaches its own subscription, nothing else.
        while let Some(Some(m)) = sub.next().now_or_never() {
            assert_eq!(m.publisher, o.peer_id(), "outsider got a member's message");
        }
        assert!(jobs.next().now_or_never().is_none(), "outsider got a job");
    }
    // Both were refused and counted.
    let refused = a.metrics().await.unwrap().dropped.auth_refused;
    assert!(refused >= 2, "auth_refused = {refused}");
    // The queue's message is still there for a member.
    let mut jobs = b.queue("jobs").unwrap().consume(Default::default());
    let job = tokio::time::timeout(WAIT, jobs.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.payload().as_ref(), b"job 1");
    for n in [none, wrong, b, a] {
        n.shutdown().await;
    }
}

/// Kademlia and identify are off in a private mesh: an outsider that
/// connects learns no other member's id or address from it (they answered
/// anyone before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_learn_no_members_through_discovery() {
    use mesh_transports::quic;
    let a = builder(&[S1], None).start().await.unwrap();
    let a_addr = addr(&a).await;
    let b = builder(&[S1], Some(&a_addr)).start().await.unwrap();
    peer_state(&a, b.peer_id(), PeerState::Alive).await;
    let (_outsider, mut events) = quic::start(
        mesh_transports::identity::Keypair::generate_ed25519(),
        quic::Config {
            listen: vec![loopback()],
            bootstrap: vec![a_addr],
            mdns: false,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // Everything the outsider hears for a while (Kademlia's first
    // bootstrap query runs as soon as it knows a peer).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut connected_to_a = false;
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, events.recv()).await {
        match ev {
            quic::Event::Connected { peer, .. } => {
                assert_ne!(peer, b.peer_id(), "the outsider reached b");
                connected_to_a |= peer == a.peer_id();
            }
            quic::Event::Discovered { peer, .. } => {
                assert_ne!(peer, b.peer_id(), "the outsider learned of b");
            }
            _ => {}
        }
    }
    assert!(connected_to_a, "the outsider did connect to a");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_with_a_rotated_secret_rejoins() {
    let a_key = mesh::Keypair::generate_ed25519();
    let b_key = mesh::Keypair::generate_ed25519();
    let a = builder(&[S1], None)
        .identity(a_key.clone())
        .start()
        .await
        .unwrap();
    let a_addr = addr(&a).await;
    let b = builder(&[S1], Some(&a_addr))
        .identity(b_key.clone())
        .start()
        .await
        .unwrap();
    Net::Quic.linked(&a, &[b.peer_id()]).await;

    // Step 1: b learns the new secret (and still holds the old one).
    b.shutdown().await;
    let b = builder(&[S2, S1], Some(&a_addr))
        .identity(b_key.clone())
        .start()
        .await
        .unwrap();
    Net::Quic.linked(&a, &[b.peer_id()]).await;
    Net::Quic.linked(&b, &[a.peer_id()]).await;

    // Step 2: a moves to the new secret only.
    let b_addr = addr(&b).await;
    a.shutdown().await;
    let a = builder(&[S2], Some(&b_addr))
        .identity(a_key)
        .start()
        .await
        .unwrap();
    Net::Quic.linked(&b, &[a.peer_id()]).await;
    let mut on_a = a.subscribe("after.rotation").await.unwrap();
    until_routed(&b, "after.rotation", &mut on_a).await;

    // Step 3: b drops the old secret; a node that only has it is outside.
    b.shutdown().await;
    let a_addr = addr(&a).await;
    let b = builder(&[S2], Some(&a_addr))
        .identity(b_key)
        .start()
        .await
        .unwrap();
    Net::Quic.linked(&a, &[b.peer_id()]).await;
    let old = outsider(&[S1], &a_addr).await;
    for n in [old, b, a] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_list_admits_only_listed_peers() {
    // Both members list each other: an outsider that learns b's address
    // from a (libp2p discovery answers anyone) must not get in there either.
    let a_key = mesh::Keypair::generate_ed25519();
    let b_key = mesh::Keypair::generate_ed25519();
    let members = [a_key.public().to_peer_id(), b_key.public().to_peer_id()];
    let a = Net::Quic
        .builder()
        .identity(a_key)
        .allow_peers(members)
        .start()
        .await
        .unwrap();
    let a_addr = addr(&a).await;
    let b = Net::Quic
        .builder()
        .identity(b_key)
        .allow_peers(members)
        .bootstrap(a_addr.clone())
        .start()
        .await
        .unwrap();
    Net::Quic.linked(&a, &[b.peer_id()]).await;
    let c = outsider(&[], &a_addr).await;
    assert!(a.peers().await.iter().all(|p| p.id != c.peer_id()));
    assert!(a.metrics().await.unwrap().dropped.auth_refused >= 1);
    for n in [c, b, a] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_policy_is_enforced_by_the_nodes_that_hold_or_forward_data() {
    use mesh::{
        queue::SendError,
        rpc::RequestError,
        security::{AccessPolicy, Op},
        stream::AppendError,
    };
    let keys: Vec<mesh::Keypair> = (0..4).map(|_| mesh::Keypair::generate_ed25519()).collect();
    let id = |i: usize| keys[i].public().to_peer_id();
    // a hosts; b writes; c reads; d may only read and write public.>.
    let policy = AccessPolicy::new()
        .role("writers", [id(1)])
        .allow(
            "role:writers",
            Op::Publish,
            &["orders.>", "public.>", "jobs", "events", "svc.>"],
        )
        .unwrap()
        .allow(
            &id(2).to_string(),
            Op::Read,
            &["orders.>", "jobs", "events", "public.>"],
        )
        .unwrap()
        .allow("*", Op::Read, &["public.>"])
        .unwrap()
        .allow(&id(3).to_string(), Op::Publish, &["public.>"])
        .unwrap()
        // a hosts every queue and stream; c serves svc.>.
        .allow(&id(0).to_string(), Op::Host, &[">"])
        .unwrap()
        .allow(&id(2).to_string(), Op::Serve, &["svc.>"])
        .unwrap();
    let node = |i: usize, bootstrap: Option<&mesh::Multiaddr>| {
        let mut b = Net::Quic
            .builder()
            .identity(keys[i].clone())
            .access_policy(policy.clone());
        if let Some(addr) = bootstrap {
            b = b.bootstrap(addr.clone());
        }
        if i == 0 {
            b = b.host_all();
        } else {
            b = b.self_host(false);
        }
        b.start()
    };
    let a = node(0, None).await.unwrap();
    let a_addr = addr(&a).await;
    let b = node(1, Some(&a_addr)).await.unwrap();
    let c = node(2, Some(&a_addr)).await.unwrap();
    let d = node(3, Some(&a_addr)).await.unwrap();
    for n in [&a, &b, &c, &d] {
        let others: Vec<_> = [&a, &b, &c, &d]
            .iter()
            .map(|o| o.peer_id())
            .filter(|p| *p != n.peer_id())
            .collect();
        Net::Quic.linked(n, &others).await;
    }

    // Pub/sub: b's node sends orders only to c (d may not read them); d's
    // forged order is dropped by c's node.
    let mut on_c = c.subscribe(">").await.unwrap();
    let mut on_d = d.subscribe(">").await.unwrap();
    until_routed(&b, "public.probe", &mut on_c).await;
    until_routed(&b, "public.probe", &mut on_d).await;
    b.publish("orders.1", "order").await.unwrap();
    b.publish("public.news", "news").await.unwrap();
    assert_eq!(next(&mut on_c).await.payload, "order");
    assert_eq!(next(&mut on_c).await.payload, "news");
    // Per publisher FIFO: had the order been sent to d, it came first.
    assert_eq!(next(&mut on_d).await.payload, "news");
    d.publish("orders.forged", "forged").await.unwrap();
    d.publish("public.from-d", "from d").await.unwrap();
    assert_eq!(next(&mut on_c).await.payload, "from d");

    // Queues: a refuses d's send and ignores d's consumer.
    let err = d.queue("jobs").unwrap().send("job").await.unwrap_err();
    assert!(
        matches!(&err, SendError::Refused(r) if r.contains("access denied")),
        "{err}"
    );
    let mut d_jobs = d.queue("jobs").unwrap().consume(Default::default());
    b.queue("jobs").unwrap().send("job from b").await.unwrap();
    let mut c_jobs = c.queue("jobs").unwrap().consume(Default::default());
    let job = tokio::time::timeout(WAIT, c_jobs.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.payload().as_ref(), b"job from b");
    assert!(d_jobs.next().now_or_never().is_none());

    // Streams: a refuses d's append; b's is stored.
    b.stream("events").unwrap().append("k", "e1").await.unwrap();
    let err = d
        .stream("events")
        .unwrap()
        .append("k", "e2")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AppendError::Refused(r) if r.contains("access denied")),
        "{err}"
    );

    // Request/reply: c's node refuses d's request.
    let mut service = c.serve("svc.*").await.unwrap();
    tokio::spawn(async move {
        while let Some(req) = service.next().await {
            req.respond("ok");
        }
    });
    eventually("b's request answered", || async {
        b.request("svc.x", "q", WAIT).await.ok()
    })
    .await;
    assert_eq!(
        d.request("svc.x", "q", WAIT).await,
        Err(RequestError::Denied)
    );
    // Each refusal was counted where it was enforced.
    let denied = |m: Option<mesh::metrics::Metrics>| m.unwrap().dropped.acl_denied;
    assert!(
        denied(a.metrics().await) >= 2,
        "a: queue send, stream append"
    );
    assert!(denied(c.metrics().await) >= 2, "c: forged order, request");
    for n in [d, c, b, a] {
        n.shutdown().await;
    }
}
