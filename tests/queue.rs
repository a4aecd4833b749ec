//! Work queues and request/reply between real nodes, over every transport
//! (`quic::*` with shared memory off, `shm::*` on shared-memory rings).

#[macro_use]
mod common;

use std::{collections::BTreeSet, time::Duration};

use common::*;
use futures::StreamExt;
use mesh::Bytes;
use mesh::{
    queue::{ConsumeOptions, Consumer, Delivery, QueueFull, SendError, SendOptions},
    rpc::RequestError,
    Node,
};

async fn next_delivery(c: &mut Consumer) -> Delivery {
    tokio::time::timeout(WAIT, c.next())
        .await
        .expect("a delivery in time")
        .expect("consumer open")
}

fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(d.payload()).into_owned()
}

/// A host (hosts every queue) and `n` more nodes bootstrapped from it, all
/// linked and ready.
async fn mesh_of(net: Net, n: usize, f: impl Fn(mesh::Builder) -> mesh::Builder) -> Vec<Node> {
    common::mesh_of(net, n + 1, |b| b.host_all(), f).await
}

async fn competing_consumers_each_message_to_one(net: Net) {
    let nodes = mesh_of(net, 3, |b| b.self_host(false)).await;
    let (producer, c1, c2) = (&nodes[1], &nodes[2], &nodes[3]);
    let mut w1 = c1
        .queue("jobs")
        .unwrap()
        .consume(ConsumeOptions::default().prefetch(1));
    let q = producer.queue("jobs").unwrap();
    for i in 0..50 {
        q.send(format!("m{i}")).await.expect("accepted by the host");
    }
    // w1 holds one message unacked, so with a prefetch of 1 it gets no
    // other: every other message goes to w2, exactly once.
    let held = next_delivery(&mut w1).await;
    let mut w2 = c2
        .queue("jobs")
        .unwrap()
        .consume(ConsumeOptions::default().prefetch(4));
    let mut seen = BTreeSet::from([text(&held)]);
    for _ in 0..49 {
        let d = next_delivery(&mut w2).await;
        assert_eq!(d.attempt(), 1);
        assert!(!d.redelivered());
        assert_eq!(d.id().publisher, producer.peer_id());
        assert!(seen.insert(text(&d)), "delivered twice: {}", text(&d));
        d.ack();
    }
    let all: BTreeSet<String> = (0..50).map(|i| format!("m{i}")).collect();
    assert_eq!(seen, all);
    held.ack();
    // Nothing is left: a new message goes to whoever has credit.
    q.send("last").await.unwrap();
    let last = tokio::select! {
        d = next_delivery(&mut w1) => d,
        d = next_delivery(&mut w2) => d,
    };
    assert_eq!(text(&last), "last");
    last.ack();
    for n in nodes {
        n.shutdown().await;
    }
}

async fn fifo_per_sender_with_prefetch_one(net: Net) {
    let nodes = mesh_of(net, 2, |b| b).await;
    let (producer, consumer) = (&nodes[1], &nodes[2]);
    let q = producer.queue("fifo").unwrap();
    for i in 0..100 {
        q.send(format!("{i}")).await.unwrap();
    }
    let mut w = consumer
        .queue("fifo")
        .unwrap()
        .consume(ConsumeOptions::default().prefetch(1));
    for i in 0..100 {
        let d = next_delivery(&mut w).await;
        assert_eq!(text(&d), format!("{i}"), "FIFO per sender");
        if i % 10 == 3 {
            // A nacked message comes back before everything after it.
            d.nack(None);
            let again = next_delivery(&mut w).await;
            assert_eq!(text(&again), format!("{i}"));
            assert_eq!(again.attempt(), 2);
            assert!(again.redelivered());
            again.ack();
        } else {
            d.ack();
        }
    }
    for n in nodes {
        n.shutdown().await;
    }
}

async fn poison_messages_reach_the_dead_letter_queue(net: Net) {
    let nodes = mesh_of(net, 2, |b| b.self_host(false)).await;
    let (producer, consumer) = (&nodes[1], &nodes[2]);
    let q = producer.queue("work").unwrap();
    q.send("poison").await.unwrap();
    q.send("bad input").await.unwrap();
    q.send("fine").await.unwrap();
    let mut w = consumer.queue("work").unwrap().consume(
        ConsumeOptions::default()
            .prefetch(1)
            .max_attempts(3)
            .visibility_timeout(Duration::from_secs(60)),
    );
    let mut attempts = Vec::new();
    loop {
        let d = next_delivery(&mut w).await;
        match text(&d).as_str() {
            "poison" => {
                attempts.push(d.attempt());
                d.nack(None);
            }
            "bad input" => d.reject_with("cannot parse"),
            "fine" => {
                d.ack();
                break;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(attempts, [1, 2, 3], "three attempts, then the DLQ");
    let dead = eventually("both dead letters", || async {
        let dead = q.dead_letters().peek(10).await.unwrap();
        (dead.len() == 2).then_some(dead)
    })
    .await;
    assert_eq!(dead[0].payload, "poison");
    assert_eq!(dead[0].dead, Some((3, "nacked after 3 attempts".into())));
    assert_eq!(dead[1].payload, "bad input");
    assert_eq!(dead[1].dead, Some((1, "cannot parse".into())));

    // The DLQ is a queue: consume it.
    let mut dl = consumer
        .queue("work.dlq")
        .unwrap()
        .consume(ConsumeOptions::default());
    let d = next_delivery(&mut dl).await;
    assert_eq!(text(&d), "poison");
    assert_eq!(d.dead_letter(), Some((3, "nacked after 3 attempts")));
    d.ack();
    drop(dl);
    // Replay moves the rest back into the queue, as new.
    let moved = eventually("a replay", || async {
        let n = q.replay_dead_letters().await.unwrap();
        (n > 0).then_some(n)
    })
    .await;
    assert_eq!(moved, 1);
    let d = next_delivery(&mut w).await;
    assert_eq!((text(&d).as_str(), d.attempt()), ("bad input", 1));
    d.ack();
    assert!(q.dead_letters().peek(10).await.unwrap().is_empty());
    for n in nodes {
        n.shutdown().await;
    }
}

async fn a_lost_consumer_gives_its_messages_back_at_once(net: Net) {
    let nodes = mesh_of(net, 3, |b| b).await;
    let (producer, doomed, survivor) = (&nodes[1], &nodes[2], &nodes[3]);
    let q = producer.queue("tasks").unwrap();
    // Long visibility timeout: only the lost link can bring them back soon.
    let opts = ConsumeOptions::default()
        .prefetch(5)
        .visibility_timeout(Duration::from_secs(3600));
    let mut w = doomed.queue("tasks").unwrap().consume(opts);
    for i in 0..5 {
        q.send(format!("t{i}")).await.unwrap();
    }
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(next_delivery(&mut w).await);
    }
    let mut s = survivor.queue("tasks").unwrap().consume(opts);
    // The consumer's node goes away with five messages unacked.
    std::mem::forget(held);
    std::mem::forget(w);
    doomed.shutdown().await;
    let mut got = BTreeSet::new();
    for _ in 0..5 {
        let d = next_delivery(&mut s).await;
        assert_eq!(d.attempt(), 2);
        got.insert(text(&d));
        d.ack();
    }
    assert_eq!(got, (0..5).map(|i| format!("t{i}")).collect());
    for n in nodes {
        n.shutdown().await;
    }
}

async fn dropped_deliveries_and_consumers_give_messages_back(net: Net) {
    let nodes = mesh_of(net, 2, |b| b).await;
    let (producer, consumer) = (&nodes[1], &nodes[2]);
    let q = producer.queue("drops").unwrap();
    for i in 0..3 {
        q.send(format!("d{i}")).await.unwrap();
    }
    let opts = ConsumeOptions::default().prefetch(3);
    let mut w = consumer.queue("drops").unwrap().consume(opts);
    let first = next_delivery(&mut w).await;
    drop(first); // unsettled: back at once
    drop(w); // the two it had and nobody took go back too
    let mut w = consumer.queue("drops").unwrap().consume(opts);
    let mut got = BTreeSet::new();
    while got.len() < 3 {
        let d = next_delivery(&mut w).await;
        got.insert(text(&d));
        d.ack();
    }
    assert_eq!(got, (0..3).map(|i| format!("d{i}")).collect());
    for n in nodes {
        n.shutdown().await;
    }
}

async fn senders_host_their_own_when_nobody_hosts(net: Net) {
    let a = net.start(None).await;
    let a_addr = addr(&a).await;
    let b = net.start(Some(&a_addr)).await;
    b.ready_timeout(WAIT).await.unwrap();
    net.linked(&a, &[b.peer_id()]).await;
    // No host anywhere: a one-shot sender refuses, a node hosts its own.
    let one_shot = net
        .builder()
        .bootstrap(a_addr.clone())
        .self_host(false)
        .start()
        .await
        .unwrap();
    one_shot.ready_timeout(WAIT).await.unwrap();
    assert!(matches!(
        one_shot.queue("own").unwrap().send("x").await,
        Err(SendError::NoHost(_))
    ));
    one_shot.shutdown().await;
    let q = a.queue("own").unwrap();
    q.send_with(
        "hello",
        SendOptions {
            headers: vec![("k".into(), Bytes::from_static(b"v"))],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut w = b.queue("own").unwrap().consume(ConsumeOptions::default());
    let d = next_delivery(&mut w).await;
    assert_eq!(text(&d), "hello");
    assert_eq!(d.headers(), &[("k".to_string(), Bytes::from_static(b"v"))]);
    assert_eq!(d.id().publisher, a.peer_id());
    d.ack();
    // Dedup keys drop repeats.
    for _ in 0..3 {
        q.send_with(
            "once",
            SendOptions {
                dedup_key: Some("k1".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    q.send("after").await.unwrap();
    assert_eq!(text(&next_delivery(&mut w).await), "once");
    assert_eq!(text(&next_delivery(&mut w).await), "after");
    for n in [a, b] {
        n.shutdown().await;
    }
}

async fn a_full_queue_is_a_typed_error_when_so_configured(net: Net) {
    let node = net
        .builder()
        .queue_limits(mesh::queue::HostConfig {
            max_messages: 2,
            ..Default::default()
        })
        .queue_full(QueueFull::Fail)
        .start()
        .await
        .unwrap();
    let q = node.queue("small").unwrap();
    q.send("1").await.unwrap();
    q.send("2").await.unwrap();
    assert!(matches!(q.send("3").await, Err(SendError::Full(_))));
    assert!(node.queue("bad name").is_err());
    assert!(node.queue("$q.h.x").is_err(), "reserved names are refused");
    node.shutdown().await;
}

async fn a_full_queue_makes_sends_wait_by_default(net: Net) {
    let host = net
        .builder()
        .host_all()
        .queue_limits(mesh::queue::HostConfig {
            max_messages: 2,
            ..Default::default()
        })
        .start()
        .await
        .unwrap();
    let sender = net
        .builder()
        .bootstrap(addr(&host).await)
        .self_host(false)
        .start()
        .await
        .unwrap();
    sender.ready_timeout(WAIT).await.unwrap();
    net.linked(&sender, &[host.peer_id()]).await;
    let q = sender.queue("tight").unwrap();
    q.send("1").await.unwrap();
    q.send("2").await.unwrap();
    let third = {
        let q = q.clone();
        tokio::spawn(async move { q.send("3").await })
    };
    // It waits: the queue is full until a consumer takes one.
    let mut w = host
        .queue("tight")
        .unwrap()
        .consume(ConsumeOptions::default().prefetch(1));
    let first = next_delivery(&mut w).await;
    assert_eq!(text(&first), "1");
    first.ack();
    tokio::time::timeout(WAIT, third)
        .await
        .expect("the waiting send goes through once there is room")
        .unwrap()
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = next_delivery(&mut w).await;
        got.push(text(&d));
        d.ack();
    }
    assert_eq!(got, ["2", "3"]);
    for n in [sender, host] {
        n.shutdown().await;
    }
}

async fn request_reply_balances_and_reports_errors(net: Net) {
    let a = net.start(None).await;
    let a_addr = addr(&a).await;
    let b = net.start(Some(&a_addr)).await;
    let c = net.start(Some(&a_addr)).await;
    net.linked(&a, &[b.peer_id(), c.peer_id()]).await;

    assert_eq!(
        a.request("time.now", "", WAIT).await,
        Err(RequestError::NoResponders),
        "nobody serves it: at once"
    );
    for (node, name) in [(&b, "b"), (&c, "c")] {
        let mut service = node.serve("time.*").await.unwrap();
        tokio::spawn(async move {
            while let Some(req) = service.next().await {
                let answer = format!("{name}:{}", String::from_utf8_lossy(req.payload()));
                req.respond(answer);
            }
        });
    }
    eventually("both responders known", || async {
        let mut who = BTreeSet::new();
        for _ in 0..4 {
            if let Ok(r) = a.request("time.now", "x", WAIT).await {
                who.insert(r[..1].to_vec());
            }
        }
        (who.len() == 2).then_some(())
    })
    .await;
    let mut per = [0; 2];
    for i in 0..20 {
        let r = a.request("time.now", format!("{i}"), WAIT).await.unwrap();
        let s = String::from_utf8_lossy(&r).into_owned();
        assert!(s.ends_with(&format!(":{i}")), "{s}");
        per[usize::from(s.starts_with('c'))] += 1;
    }
    assert_eq!(per, [10, 10], "round-robin over the responders");

    // A responder that holds requests: the requester times out.
    let mut slow = a.serve("slow").await.unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(r) = slow.next().await {
            held.push(r);
        }
    });
    eventually("a timeout once slow is known", || async {
        match b.request("slow", "", Duration::from_millis(300)).await {
            Err(RequestError::Timeout(t)) => {
                assert_eq!(t, Duration::from_millis(300));
                Some(())
            }
            Err(RequestError::NoResponders) => None,
            other => panic!("unexpected {other:?}"),
        }
    })
    .await;
    hold.abort();
    // One that drops them unanswered: the requester knows at once.
    let mut rude = c.serve("rude").await.unwrap();
    tokio::spawn(async move {
        while let Some(r) = rude.next().await {
            drop(r);
        }
    });
    eventually("rude is served", || async {
        (b.request("rude", "", WAIT).await == Err(RequestError::NoReply)).then_some(())
    })
    .await;
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

conformance!(
    competing_consumers_each_message_to_one,
    fifo_per_sender_with_prefetch_one,
    poison_messages_reach_the_dead_letter_queue,
    a_lost_consumer_gives_its_messages_back_at_once,
    dropped_deliveries_and_consumers_give_messages_back,
    senders_host_their_own_when_nobody_hosts,
    a_full_queue_is_a_typed_error_when_so_configured,
    a_full_queue_makes_sends_wait_by_default,
    request_reply_balances_and_reports_errors,
);
