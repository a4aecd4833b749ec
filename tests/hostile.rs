//! A peer that sends garbage, truncated, oversize or wrong-version frames
//! loses its link; the node lives on and keeps serving others.

mod common;

use common::*;
use futures::{AsyncReadExt, AsyncWriteExt};
use mesh::wire::{self, Frame, Hello, MAGIC, PROTOCOL_VERSION};
use mesh_transports::{identity::Keypair, quic};

fn frame(f: &Frame<'_>) -> Vec<u8> {
    let mut b = Vec::new();
    wire::encode(&mut b, f);
    b
}

/// A handshake: `Hello`, then the (empty) `Auth` a node outside any
/// private mesh sends.
fn hello(version: u32) -> Vec<u8> {
    let mut b = frame(&Frame::Hello(Hello {
        magic: MAGIC,
        version,
        features: 0,
        incarnation: 1,
        addrs: vec![],
        host: mesh::wire::Raw(b"elsewhere"),
        uid: 0,
        nonce: [0; 32],
    }));
    b.extend(frame(&Frame::Auth { proofs: vec![] }));
    b
}

/// A raw transport connected to `target`, and its data stream.
async fn raw_stream(
    target: &mesh::Multiaddr,
    key: Keypair,
) -> (
    quic::Handle,
    tokio::sync::mpsc::Receiver<quic::Event>,
    quic::Stream,
) {
    let (handle, mut events) = quic::start(
        key,
        quic::Config {
            listen: vec![loopback()],
            bootstrap: vec![target.clone()],
            mdns: false,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let stream = loop {
        match tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("a stream in time")
            .expect("events")
        {
            quic::Event::Stream { stream, .. } => break stream,
            _ => continue,
        }
    };
    (handle, events, stream)
}

/// Connects a raw transport to `target`, writes `bytes` on the data stream,
/// and waits until the node closes that stream.
async fn send_raw(target: &mesh::Multiaddr, bytes: Vec<u8>) {
    let (_handle, _events, mut stream) = raw_stream(target, Keypair::generate_ed25519()).await;
    stream.write_all(&bytes).await.unwrap();
    // End our side too, so a frame cut short is seen as truncated.
    stream.close().await.unwrap();
    // The node answers with its own Hello (and a sync), then closes the
    // stream: reading ends with EOF or a reset, never hangs.
    let mut sink = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "node did not close the link after bad input");
}

/// A raw peer speaking the wire protocol by hand: it sends whatever
/// frames a test wants and reads what the node answers.
struct RawPeer {
    _handle: quic::Handle,
    _events: tokio::sync::mpsc::Receiver<quic::Event>,
    stream: quic::Stream,
    buf: Vec<u8>,
    id: mesh::PeerId,
    key: Keypair,
}

impl RawPeer {
    /// Connects to `target` and says `Hello` (not private).
    async fn connect(target: &mesh::Multiaddr) -> RawPeer {
        let key = Keypair::generate_ed25519();
        let id = key.public().to_peer_id();
        let (handle, events, mut stream) = raw_stream(target, key.clone()).await;
        stream.write_all(&hello(PROTOCOL_VERSION)).await.unwrap();
        RawPeer {
            _handle: handle,
            _events: events,
            stream,
            buf: Vec::new(),
            id,
            key,
        }
    }

    async fn send(&mut self, f: &Frame<'_>) {
        self.stream.write_all(&frame(f)).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// Reads frames until `f` picks one (within [`WAIT`]); `None` if the
    /// node closed the link first.
    async fn until<T>(&mut self, mut f: impl FnMut(&Frame<'_>) -> Option<T>) -> Option<T> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            while self.buf.len() >= 4 {
                let len = u32::from_le_bytes(self.buf[..4].try_into().unwrap()) as usize;
                if self.buf.len() < 4 + len {
                    break;
                }
                let body: Vec<u8> = self.buf.drain(..4 + len).skip(4).collect();
                if let Ok(frame) = wire::decode(&body) {
                    if let Some(v) = f(&frame) {
                        return Some(v);
                    }
                }
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .expect("the node answers in time");
            match n {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// A node that does not host queues nobody hosts (`self_host(false)`, a
/// one-shot tool) refuses a peer's send to such a queue instead of taking
/// it and exiting with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shot_node_refuses_sends_for_queues_it_does_not_host() {
    let a = mesh::Node::builder()
        .listen(loopback())
        .mdns(false)
        .self_host(false)
        .start()
        .await
        .unwrap();
    let mut peer = RawPeer::connect(&addr(&a).await).await;
    peer.send(&Frame::Work(wire::WorkWire::Send {
        queue: "jobs",
        seq: 7,
        delay_ms: 0,
        ttl_ms: 0,
        dedup: None,
        headers: vec![],
        payload: wire::Raw(b"job"),
    }))
    .await;
    let answer = peer
        .until(|f| match f {
            Frame::Work(wire::WorkWire::Accepted { seqs }) if seqs.contains(&7) => Some(Ok(())),
            Frame::Work(wire::WorkWire::Refused { seq: 7, full, .. }) => Some(Err(*full)),
            _ => None,
        })
        .await
        .expect("an answer to the send");
    assert_eq!(answer, Err(false), "refused, and not as full");
    assert_eq!(a.metrics().await.unwrap().queues.accepted, 0);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_lose_their_link_and_the_node_lives_on() {
    let a = start(None).await;
    let a_addr = addr(&a).await;

    let mut hello_then_garbage = hello(PROTOCOL_VERSION);
    hello_then_garbage.extend_from_slice(&[5, 0, 0, 0, 0xff, 0xfe, 0xfd, 0xfc, 0xfb]);
    let mut hello_then_oversize = hello(PROTOCOL_VERSION);
    hello_then_oversize.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut hello_then_unknown_topic = hello(PROTOCOL_VERSION);
    hello_then_unknown_topic.extend(frame(&Frame::Msg(wire::MsgWire {
        topic: 77,
        name: None,
        seq_delta: 1,
        ts_delta: 0,
        headers: vec![],
        payload: wire::Raw(b"x"),
    })));
    let mut truncated = hello(PROTOCOL_VERSION);
    truncated.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3]);
    // 1 MiB of empty headers (2 bytes each) on one message: refused by
    // their count, not decoded into half a million allocations.
    let mut header_bomb = hello(PROTOCOL_VERSION);
    header_bomb.extend(frame(&Frame::Msg(wire::MsgWire {
        topic: 0,
        name: Some("bomb"),
        seq_delta: 1,
        ts_delta: 0,
        headers: vec![("", wire::Raw(&[])); 512 * 1024],
        payload: wire::Raw(b"x"),
    })));

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage instead of a handshake", (0..200u8).collect()),
        ("wrong protocol version", hello(PROTOCOL_VERSION + 1)),
        ("oversize frame", u32::MAX.to_le_bytes().to_vec()),
        ("no Hello first", frame(&Frame::Bye)),
        ("garbage after the handshake", hello_then_garbage),
        ("oversize after the handshake", hello_then_oversize),
        ("undefined topic id", hello_then_unknown_topic),
        ("truncated frame", truncated),
    ];
    for (what, bytes) in cases {
        eprintln!("case: {what}");
        send_raw(&a_addr, bytes).await;
    }
    let malformed = a.metrics().await.unwrap().dropped.malformed;
    send_raw(&a_addr, header_bomb).await;
    eventually("the header bomb to be counted as malformed", || async {
        (a.metrics().await.unwrap().dropped.malformed > malformed).then_some(())
    })
    .await;

    // The node still works for well-behaved peers.
    let b = start(Some(&a_addr)).await;
    let mut sub = b.subscribe("still.alive").await.unwrap();
    until_routed(&a, "still.alive", &mut sub).await;
    a.publish("still.alive", "yes").await.unwrap();
    assert_eq!(next(&mut sub).await.payload, "yes");
    // What a peer may not send is refused here too, with a typed error.
    let headers = vec![(String::from("k"), mesh::Bytes::new()); wire::MAX_HEADERS + 1];
    let err = a
        .publisher("still.alive")
        .unwrap()
        .publish_with(headers.clone(), "no")
        .await
        .unwrap_err();
    assert!(
        matches!(err, mesh::PublishError::TooManyHeaders { count, .. } if count == wire::MAX_HEADERS + 1),
        "{err}"
    );
    let err = a
        .queue("jobs")
        .unwrap()
        .send_with(
            "no",
            mesh::queue::SendOptions {
                headers,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, mesh::queue::SendError::TooManyHeaders { .. }),
        "{err}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// A gossip message altered on the way (here: by the peer that relays it)
/// is dropped by the first node that reads it, and counted; the genuine
/// messages of the same origin, relayed by the same peer, get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_gossip_is_dropped_and_counted() {
    use mesh::core::gossip::{Message, Stamp};
    let a = mesh::Node::builder()
        .listen(loopback())
        .mdns(false)
        .gossip(mesh::Pattern::new("g.>").unwrap())
        .start()
        .await
        .unwrap();
    let mut sub = a.subscribe("g.x").await.unwrap();
    let origin_key = Keypair::generate_ed25519();
    let origin = origin_key.public().to_peer_id();
    let msg = |seq: u64, payload: &'static str, signed: &[u8]| Message::Gossip {
        id: (origin, seq),
        round: 1,
        topic: "g.x".into(),
        payload: mesh::Bytes::from_static(payload.as_bytes()),
        stamp: Stamp {
            timestamp: 1000,
            signature: mesh::fuzzing::sign_gossip(&origin_key, seq, 1000, "g.x", signed),
        },
    };
    let mut codec = wire::GossipCodec::default();
    let mut bytes = hello(PROTOCOL_VERSION);
    // Signed for "pay 10", relayed as "pay 1000".
    codec.encode(&mut bytes, &msg(1, "pay 1000", b"pay 10"));
    codec.encode(&mut bytes, &msg(2, "genuine", b"genuine"));
    send_raw(&addr(&a).await, bytes).await;
    // Had the altered one (read first) got through, it would come first.
    assert_eq!(next(&mut sub).await.payload, "genuine");
    let m = a.metrics().await.unwrap();
    assert_eq!(m.dropped.gossip_forged, 1);
    a.shutdown().await;
}

/// The epoch a node's declarations carry (read from its `Sync`): what a
/// publisher numbers reliable messages for.
async fn declared_epoch(peer: &mut RawPeer, node: mesh::PeerId) -> u64 {
    let id = node.to_bytes();
    peer.until(|f| match f {
        Frame::Sync(s) => s
            .decls
            .iter()
            .find(|d| d.node.0 == id.as_slice())
            .map(|d| d.epoch),
        Frame::Declare(d) if d.node.0 == id.as_slice() => Some(d.epoch),
        _ => None,
    })
    .await
    .expect("the node's declaration")
}

/// A publisher that claims its reliable numbering jumped to `u64::MAX`
/// (a `Lagged`) and then numbers a message `u64::MAX` cannot overflow the
/// subscriber's counter: the claim is refused as malformed, the node
/// lives on and its reliable subscription keeps working for others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reliable_numbering_at_the_top_of_u64_is_refused() {
    let a = start(None).await;
    let mut sub = a.subscribe_reliable("r.>").await.unwrap();
    let mut peer = RawPeer::connect(&addr(&a).await).await;
    let to = declared_epoch(&mut peer, a.peer_id()).await;
    let malformed = a.metrics().await.unwrap().dropped.malformed;
    peer.send(&Frame::Lagged {
        session: 1,
        missed: u64::MAX,
        next: u64::MAX,
        to,
    })
    .await;
    peer.send(&Frame::Seq {
        session: 1,
        rseq: u64::MAX,
        to,
    })
    .await;
    peer.send(&Frame::Msg(wire::MsgWire {
        topic: u32::MAX,
        name: Some("r.x"),
        seq_delta: 1,
        ts_delta: 0,
        headers: vec![],
        payload: wire::Raw(b"x"),
    }))
    .await;
    eventually("the claim to be refused as malformed", || async {
        let m = a.metrics().await?;
        (m.dropped.malformed > malformed).then_some(())
    })
    .await;
    // Still alive and delivering.
    let b = start(Some(&addr(&a).await)).await;
    until_routes_to(&b, "r.ok", &a).await;
    b.publish("r.ok", "ok").await.unwrap();
    let got = tokio::time::timeout(WAIT, sub.recv())
        .await
        .expect("a delivery")
        .expect("the subscription lives");
    assert!(
        matches!(&got, mesh::Delivery::Message(m) if m.payload == "ok"),
        "{got:?}"
    );
    b.shutdown().await;
    a.shutdown().await;
}

/// A message with its topic inline (not interned, as after 16,384
/// topics on a link, or forged so) is checked against the access policy
/// like any other: a peer that may not publish `orders.>` gets nothing
/// through on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_topic_names_are_checked_against_the_policy() {
    let policy = mesh::security::AccessPolicy::new()
        .allow("*", mesh::security::Op::Publish, &["public.>"])
        .unwrap()
        .allow("*", mesh::security::Op::Read, &[">"])
        .unwrap();
    let a = mesh::Node::builder()
        .listen(loopback())
        .mdns(false)
        .access_policy(policy)
        .start()
        .await
        .unwrap();
    let mut sub = a.subscribe(">").await.unwrap();
    let mut peer = RawPeer::connect(&addr(&a).await).await;
    let inline = |name: &'static str| {
        Frame::Msg(wire::MsgWire {
            topic: u32::MAX,
            name: Some(name),
            seq_delta: 1,
            ts_delta: 0,
            headers: vec![],
            payload: wire::Raw(name.as_bytes()),
        })
    };
    peer.send(&inline("orders.forged")).await;
    peer.send(&inline("public.news")).await;
    // Per-link FIFO: had the forged one got through, it would come first.
    assert_eq!(next(&mut sub).await.payload, "public.news");
    assert!(a.metrics().await.unwrap().dropped.acl_denied >= 1);
    a.shutdown().await;
}

/// A reply counts only from the responder the request went to: a peer
/// that floods replies for every id cannot answer someone else's request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replies_from_another_peer_are_ignored() {
    let a = start(None).await;
    let a_addr = addr(&a).await;
    let b = start(Some(&a_addr)).await;
    linked(&a, &[b.peer_id()]).await;
    let mut service = b.serve("svc").await.unwrap();
    // Requests to "svc" reach b once its declaration is in at a.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        use futures::StreamExt;
        let short = std::time::Duration::from_millis(200);
        let probe = a.request("svc", "probe", short);
        let serve = tokio::time::timeout(short, service.next());
        let (_, got) = tokio::join!(probe, serve);
        if let Ok(Some(req)) = got {
            req.respond("probe");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "b's service never known to a"
        );
    }
    let requester = a.clone();
    let pending = tokio::spawn(async move { requester.request("svc", "real", WAIT).await });
    let held = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut service))
        .await
        .expect("the request reaches b")
        .unwrap();
    assert_eq!(held.payload().as_ref(), b"real");

    let mut peer = RawPeer::connect(&a_addr).await;
    for id in 0..=4096u64 {
        peer.send(&Frame::Work(wire::WorkWire::Reply {
            id,
            status: wire::ReplyStatus::Ok,
            payload: wire::Raw(b"forged"),
        }))
        .await;
    }
    // a answers a request of ours after it read every forged reply (one
    // link, in order).
    peer.send(&Frame::Work(wire::WorkWire::Request {
        id: 7,
        subject: "nobody.serves.this",
        headers: vec![],
        payload: wire::Raw(b""),
    }))
    .await;
    peer.until(|f| matches!(f, Frame::Work(wire::WorkWire::Reply { id: 7, .. })).then_some(()))
        .await
        .expect("a answers");
    held.respond("genuine");
    let got = pending.await.unwrap().expect("the real reply");
    assert_eq!(got.as_ref(), b"genuine");
    a.shutdown().await;
    b.shutdown().await;
}

/// Serving, hosting and consumer-group membership are rights of the
/// policy: a member without them that declares itself a responder, a
/// queue host or a stream host gets no request, send or append; one with
/// them does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declarations_of_serving_and_hosting_need_the_rights() {
    use mesh::security::{AccessPolicy, Op};
    let keys: Vec<mesh::Keypair> = (0..3).map(|_| mesh::Keypair::generate_ed25519()).collect();
    let id = |i: usize| keys[i].public().to_peer_id().to_string();
    // a sends and requests; b is a member with no rights to serve or
    // host; c may host and serve.
    let policy = AccessPolicy::new()
        .allow("*", Op::Publish, &[">"])
        .unwrap()
        .allow("*", Op::Read, &[">"])
        .unwrap()
        // c hosts everything (`host_all` declares `>`).
        .allow(&id(2), Op::Host, &[">"])
        .unwrap()
        .allow(&id(2), Op::Serve, &["svc.>"])
        .unwrap();
    let node = |i: usize, bootstrap: Option<mesh::Multiaddr>, host: bool| {
        let mut b = mesh::Node::builder()
            .listen(loopback())
            .mdns(false)
            .failure_detection(fast_fd())
            .identity(keys[i].clone())
            .access_policy(policy.clone());
        if let Some(addr) = bootstrap {
            b = b.bootstrap(addr);
        }
        b = if host {
            b.host_all()
        } else {
            b.self_host(false)
        };
        b.start()
    };
    let a = node(0, None, false).await.unwrap();
    let a_addr = addr(&a).await;
    let b = node(1, Some(a_addr.clone()), true).await.unwrap();
    linked(&a, &[b.peer_id()]).await;
    let mut b_service = b.serve("svc.*").await.unwrap();
    // Once a routes b's later subscription, it holds b's declaration of
    // its service and hosting too, and does not act on them: nothing
    // goes to b.
    let _probe = b.subscribe("probe").await.unwrap();
    until_routes_to(&a, "probe", &b).await;
    let err = a.queue("jobs").unwrap().send("job").await.unwrap_err();
    assert!(matches!(err, mesh::queue::SendError::NoHost(_)), "{err}");
    let err = a
        .stream("events")
        .unwrap()
        .append("k", "e")
        .await
        .unwrap_err();
    assert!(matches!(err, mesh::stream::AppendError::NoHost(_)), "{err}");
    assert_eq!(
        a.request("svc.x", "", WAIT).await,
        Err(mesh::rpc::RequestError::NoResponders)
    );

    // c has the rights: sends, appends and requests go to it.
    let c = node(2, Some(a_addr), true).await.unwrap();
    linked(&a, &[c.peer_id()]).await;
    let mut c_service = c.serve("svc.*").await.unwrap();
    tokio::spawn(async move {
        use futures::StreamExt;
        while let Some(r) = c_service.next().await {
            r.respond("from c");
        }
    });
    eventually("a request answered by c", || async {
        a.request("svc.x", "", std::time::Duration::from_millis(500))
            .await
            .ok()
            .map(|r| assert_eq!(r.as_ref(), b"from c"))
    })
    .await;
    eventually("a send hosted by c", || async {
        a.queue("jobs").unwrap().send("job").await.ok()
    })
    .await;
    let stats = c.queue("jobs").unwrap().host_stats().await.unwrap();
    assert_eq!(stats.waiting, 1);
    let on_b = b.queue("jobs").unwrap().host_stats().await.unwrap();
    assert_eq!(on_b.waiting, 0, "nothing went to b");
    assert!(
        tokio::time::timeout(
            std::time::Duration::from_millis(1),
            futures::StreamExt::next(&mut b_service)
        )
        .await
        .is_err(),
        "no request reached b"
    );
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

/// A declaration only its node can make: one relayed in a `Sync` without
/// the node's signature (here, one that would pin another member's
/// version at `u64::MAX` and silence it) is ignored and counted, and the
/// member's own later declarations still count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_declaration_of_another_member_is_ignored() {
    let a = start(None).await;
    let a_addr = addr(&a).await;
    let b = start(Some(&a_addr)).await;
    linked(&a, &[b.peer_id()]).await;
    let mut peer = RawPeer::connect(&a_addr).await;
    let b_id = b.peer_id().to_bytes();
    peer.send(&Frame::Sync(wire::SyncWire {
        members: vec![],
        decls: vec![wire::DeclWire {
            node: wire::Raw(&b_id),
            epoch: u64::MAX,
            seq: u64::MAX,
            patterns: vec!["$r.>", "$q.h.>"],
            reliable: vec![],
            sig: None,
        }],
        more: false,
    }))
    .await;
    // a has read the Sync once it answers a later request of ours.
    peer.send(&Frame::Work(wire::WorkWire::Request {
        id: 7,
        subject: "nobody.serves.this",
        headers: vec![],
        payload: wire::Raw(b""),
    }))
    .await;
    peer.until(|f| matches!(f, Frame::Work(wire::WorkWire::Reply { id: 7, .. })).then_some(()))
        .await
        .expect("a answers");
    assert!(a.metrics().await.unwrap().dropped.declarations_forged >= 1);
    assert_eq!(
        a.request("anything", "", WAIT).await,
        Err(mesh::rpc::RequestError::NoResponders),
        "the forged responder was not taken"
    );
    let _sub = b.subscribe("after.forgery").await.unwrap();
    until_routes_to(&a, "after.forgery", &b).await;
    a.shutdown().await;
    b.shutdown().await;
}

/// Membership claims about a member only it can make: a peer's `Sync`
/// that introduces members without their signatures, or re-announces an
/// honest member at a higher incarnation with the attacker's addresses,
/// changes nothing and is counted; the honest member's own record stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_membership_records_of_others_are_ignored() {
    let a = start(None).await;
    let a_addr = addr(&a).await;
    let b = start(Some(&a_addr)).await;
    linked(&a, &[b.peer_id()]).await;
    let b_addrs = peer_info(&a, b.peer_id()).await.addrs;
    let mut peer = RawPeer::connect(&a_addr).await;
    let b_id = b.peer_id().to_bytes();
    let bogus = b"/ip4/127.0.0.1/udp/9/quic-v1".to_vec();
    let fakes: Vec<Vec<u8>> = (0..50).map(|_| mesh::PeerId::random().to_bytes()).collect();
    let mut members = vec![wire::UpdateWire {
        node: wire::Raw(&b_id),
        incarnation: u64::from(u32::MAX),
        state: mesh::core::membership::MemberState::Alive,
        addrs: vec![wire::Raw(&bogus)],
        sig: wire::Raw(&[7u8; 64]),
    }];
    members.extend(fakes.iter().map(|id| wire::UpdateWire {
        node: wire::Raw(id),
        incarnation: 1,
        state: mesh::core::membership::MemberState::Alive,
        addrs: vec![wire::Raw(&bogus)],
        sig: wire::Raw(&[]),
    }));
    peer.send(&Frame::Sync(wire::SyncWire {
        members,
        decls: vec![],
        more: false,
    }))
    .await;
    // a has read the Sync once it answers a later request of ours.
    peer.send(&Frame::Work(wire::WorkWire::Request {
        id: 7,
        subject: "nobody.serves.this",
        headers: vec![],
        payload: wire::Raw(b""),
    }))
    .await;
    peer.until(|f| matches!(f, Frame::Work(wire::WorkWire::Reply { id: 7, .. })).then_some(()))
        .await
        .expect("a answers");
    assert!(a.metrics().await.unwrap().dropped.membership_refused >= 51);
    let peers = a.peers().await;
    assert_eq!(peers.len(), 2, "only b and the raw peer: {peers:?}");
    assert_eq!(peer_info(&a, b.peer_id()).await.addrs, b_addrs);
    a.shutdown().await;
    b.shutdown().await;
}

async fn peer_info(node: &mesh::Node, id: mesh::PeerId) -> mesh::PeerInfo {
    node.peers()
        .await
        .into_iter()
        .find(|p| p.id == id)
        .expect("a known peer")
}

/// A peer flooding costly requests (peeks here) gets a bounded number of
/// real answers per second; the rest are answered empty and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peek_flood_gets_a_bounded_number_of_answers() {
    let a = start(None).await;
    a.queue("jobs").unwrap().send("job").await.unwrap();
    let mut peer = RawPeer::connect(&addr(&a).await).await;
    let n = 500u64;
    for req in 0..n {
        peer.send(&Frame::Work(wire::WorkWire::Peek {
            req,
            queue: "jobs",
            limit: 10,
        }))
        .await;
    }
    let (mut answered, mut full) = (0u64, 0u64);
    peer.until(|f| {
        if let Frame::Work(wire::WorkWire::Peeked { msgs, .. }) = f {
            answered += 1;
            full += u64::from(!msgs.is_empty());
        }
        (answered == n).then_some(())
    })
    .await
    .expect("every peek answered");
    assert!(full < n, "{full} of {n} peeks scanned the queue");
    let m = a.metrics().await.unwrap();
    assert_eq!(m.dropped.requests_throttled, n - full);
    a.shutdown().await;
}

/// A peer that asks for deliveries and never reads them cannot make the
/// node hold them without bound: past 16 times the link buffer its link
/// is closed, what waited for it freed, and the messages go back to the
/// queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_read_loses_its_link_not_our_memory() {
    let a = mesh::Node::builder()
        .listen(loopback())
        .mdns(false)
        .link_buffer(64 * 1024)
        .start()
        .await
        .unwrap();
    let q = a.queue("jobs").unwrap();
    let big = vec![7u8; 128 * 1024];
    q.send_batch((0..300).map(|_| big.clone())).await.unwrap();
    let mut peer = RawPeer::connect(&addr(&a).await).await;
    peer.send(&Frame::Work(wire::WorkWire::Flow {
        queue: "jobs",
        cid: 1,
        prefetch: 1000,
        visibility_ms: 600_000,
        max_attempts: 5,
    }))
    .await;
    // It reads nothing from here on.
    eventually("the unread link to be closed", || async {
        (a.metrics().await?.dropped.outbox_overflow >= 1).then_some(())
    })
    .await;
    eventually("the deliveries back in the queue", || async {
        let s = q.host_stats().await.ok()?;
        (s.waiting == 300 && s.in_flight == 0).then_some(())
    })
    .await;
    drop(peer);
    a.shutdown().await;
}

/// A subscriber that floods `Resume` (each would re-encode the whole
/// reliable window for it) gets a bounded number of resends per second;
/// the rest are ignored and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_flood_gets_a_bounded_number_of_resends() {
    let a = start(None).await;
    let mut peer = RawPeer::connect(&addr(&a).await).await;
    let session = declared_epoch(&mut peer, a.peer_id()).await;
    // The raw peer declares a reliable subscription, signed as its own.
    let id = peer.id.to_bytes();
    let sig = mesh::fuzzing::sign_declaration(&peer.key, 1, 1, &["r.>"], &["r.>"]);
    peer.send(&Frame::Declare(wire::DeclWire {
        node: wire::Raw(&id),
        epoch: 1,
        seq: 1,
        patterns: vec!["r.>"],
        reliable: vec!["r.>"],
        sig: Some(wire::Raw(&sig)),
    }))
    .await;
    let me = peer.id;
    eventually("a to route r.x to the raw peer", || async {
        a.remote_subscribers("r.x")
            .await
            .ok()?
            .contains(&me)
            .then_some(())
    })
    .await;
    for i in 0..50u32 {
        a.publish("r.x", i.to_le_bytes().to_vec()).await.unwrap();
    }
    let n = 400u64;
    for _ in 0..n {
        peer.send(&Frame::Resume { session, next: 1 }).await;
    }
    eventually("resumes over the budget to be counted", || async {
        let t = a.metrics().await?.dropped.requests_throttled;
        (t > 0).then_some(())
    })
    .await;
    let m = a.metrics().await.unwrap();
    assert!(m.pubsub.resent < n * 50, "{} resent", m.pubsub.resent);
    a.shutdown().await;
}

/// Before its handshake is done a peer gets no more than a handshake's
/// worth of buffer: a first frame announced at 1 MiB (under the 4 MiB
/// frame limit) is refused as oversize at once, not waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_frame_before_the_handshake_is_refused() {
    let a = start(None).await;
    let before = a.metrics().await.unwrap().dropped.oversize;
    let mut bytes = (1u32 << 20).to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0; 16]);
    send_raw(&addr(&a).await, bytes).await;
    eventually("the announced frame to be refused as oversize", || async {
        (a.metrics().await?.dropped.oversize > before).then_some(())
    })
    .await;
    a.shutdown().await;
}

/// A private node holds at most 64 links waiting for their peer's proof:
/// outsiders that open connections and never prove anything are refused
/// past that, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unproven_links_of_a_private_node_are_capped() {
    let secret = mesh::security::MeshSecret::new("a secret of sixteen bytes or more").unwrap();
    let a = mesh::Node::builder()
        .listen(loopback())
        .mdns(false)
        .mesh_secret(secret)
        .start()
        .await
        .unwrap();
    let target = addr(&a).await;
    let mut outsiders = Vec::new();
    for _ in 0..72 {
        // Each connects, gets a data stream, and says nothing.
        outsiders.push(raw_stream(&target, Keypair::generate_ed25519()).await);
    }
    eventually("the links over the cap to be refused", || async {
        (a.metrics().await?.dropped.unadmitted_refused >= 1).then_some(())
    })
    .await;
    drop(outsiders);
    a.shutdown().await;
}
