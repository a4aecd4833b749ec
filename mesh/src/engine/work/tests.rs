//! Sends, failover, full queues and consumers between two engines (see
//! `engine::testing`): the rules of `route_send`, `wait_for_room` and the
//! consumer's credit, which had no tests of their own.

use std::sync::{Arc, Mutex};

use super::*;
use crate::{engine::testing::Pair, node::Config};

/// What the calls of a test were answered.
type Answers<T> = Arc<Mutex<Vec<T>>>;

fn answers<T: Send + 'static>() -> (Answers<T>, impl Fn() -> Reply<T>) {
    let got: Answers<T> = Arc::default();
    let slot = got.clone();
    (got, move || {
        let slot = slot.clone();
        Reply::new(move |v| slot.lock().unwrap().push(v))
    })
}

fn job(payload: &'static str) -> OutMsg {
    OutMsg {
        headers: Vec::new(),
        payload: Bytes::from_static(payload.as_bytes()),
        delay: None,
        ttl: None,
        dedup: None,
        durable: false,
    }
}

/// `a` sends and may host what nobody else does; `b` hosts `jobs`.
fn sender_and_host(host: Config) -> Pair {
    let host = Config {
        host_queues: vec!["jobs".into()],
        ..host
    };
    Pair::with(&Config::default(), &host)
}

/// The consumer on `e` acks delivery `d`.
fn ack(e: &mut Engine, now: Instant, d: &DeliveryData) {
    let how = Settle::Ack;
    let (host, cid, epoch, tag) = (d.host, d.cid, d.epoch, d.tag);
    e.handle_command(
        now,
        Op::Settle {
            host,
            cid,
            epoch,
            tag,
            how,
        },
    );
}

fn send(p: &mut Pair, reply: Reply<Result<MessageId, SendError>>, payload: &'static str) {
    p.a.handle_command(
        p.now,
        Op::Send {
            queue: "jobs".into(),
            msg: job(payload),
            reply,
        },
    );
}

#[test]
fn a_send_goes_to_the_queues_host_and_resolves_on_its_accepted() {
    let mut p = sender_and_host(Config::default());
    assert_eq!(p.a.remote_hosts(&"jobs".into()), [p.b.local]);
    let (got, reply) = answers();
    send(&mut p, reply(), "one");
    // Not answered before the host has it.
    assert!(got.lock().unwrap().is_empty());
    p.drive();
    assert!(matches!(got.lock().unwrap()[..], [Ok(_)]));
    assert_eq!(p.b.work.host.stats("jobs").waiting, 1);
    assert!(
        !p.a.work.hosts_locally("jobs"),
        "a sends on, it does not host"
    );
    assert!(p.a.work.pending_sends.is_empty());
}

#[test]
fn a_send_lost_with_its_hosts_link_goes_to_the_next_choice() {
    let mut p = sender_and_host(Config::default());
    let (got, reply) = answers();
    send(&mut p, reply(), "one");
    // The link ends with the send on it: b never gets it.
    p.drop_link();
    // The only other choice is a itself, which hosts the queue from now
    // on rather than lose the message.
    assert!(matches!(got.lock().unwrap()[..], [Ok(_)]));
    assert!(p.a.work.hosts_locally("jobs"));
    assert_eq!(p.a.work.host.stats("jobs").waiting, 1);
    assert_eq!(p.b.work.host.stats("jobs").waiting, 0);
    assert!(p.a.work.pending_sends.is_empty());
}

#[test]
fn a_send_with_no_host_and_no_self_hosting_fails_as_no_host() {
    let tool = Config {
        self_host: false,
        ..Config::default()
    };
    let mut p = Pair::with(&tool, &Config::default());
    let (got, reply) = answers();
    send(&mut p, reply(), "one");
    assert!(
        matches!(&got.lock().unwrap()[..], [Err(SendError::NoHost(q))] if q == "jobs"),
        "{:?}",
        got.lock().unwrap()
    );
}

#[test]
fn a_send_the_full_host_refuses_waits_and_goes_again_when_there_is_room() {
    let host = Config {
        queue: crate::core::queue::Config {
            max_messages: 1,
            ..Default::default()
        },
        ..Config::default()
    };
    let mut p = sender_and_host(host);
    let (got, reply) = answers();
    send(&mut p, reply(), "one");
    send(&mut p, reply(), "two");
    p.drive();
    // The first is in; the second was refused as full and waits to try
    // again (the sender's queue_full is Wait).
    assert_eq!(got.lock().unwrap().len(), 1);
    assert_eq!(p.a.work.retry.len(), 1);
    // Still full at the first retry: it waits longer.
    p.advance(FULL_RETRY);
    assert_eq!(got.lock().unwrap().len(), 1);
    // A consumer on b takes the first message and acks it: room again.
    let inbox: Arc<Inbox<DeliveryData>> = Arc::default();
    p.b.handle_command(
        p.now,
        Op::Consume {
            cid: 1,
            queue: "jobs".into(),
            options: ConsumerOptions::default(),
            inbox: inbox.clone(),
        },
    );
    p.drive();
    let d = take(&inbox).into_iter().next().expect("the first message");
    assert_eq!(&d.payload[..], b"one");
    ack(&mut p.b, p.now, &d);
    p.drive();
    p.advance(FULL_RETRY_MAX);
    let got = got.lock().unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.iter().all(|r| r.is_ok()));
    // It went on to the consumer that made the room.
    let next: Vec<_> = take(&inbox).into_iter().map(|d| d.payload).collect();
    assert_eq!(next, [Bytes::from_static(b"two")]);
}

#[test]
fn a_remote_consumer_gets_credit_deliveries_and_its_acks_settle_them() {
    let mut p = sender_and_host(Config::default());
    let (_, reply) = answers();
    for payload in ["one", "two", "three"] {
        p.b.handle_command(
            p.now,
            Op::Send {
                queue: "jobs".into(),
                msg: job(payload),
                reply: reply(),
            },
        );
    }
    let inbox: Arc<Inbox<DeliveryData>> = Arc::default();
    p.a.handle_command(
        p.now,
        Op::Consume {
            cid: 7,
            queue: "jobs".into(),
            options: ConsumerOptions {
                prefetch: 2,
                ..Default::default()
            },
            inbox: inbox.clone(),
        },
    );
    p.drive();
    // a granted b credit for two: two are in flight, one waits.
    let first: Vec<DeliveryData> = take(&inbox);
    assert_eq!(first.len(), 2);
    assert_eq!(p.b.work.host.stats("jobs").in_flight, 2);
    for d in &first {
        assert_eq!((d.host, d.cid), (p.b.local, 7));
        ack(&mut p.a, p.now, d);
    }
    // The acks go out batched at the end of the turn; the credit they
    // free brings the third.
    p.drive();
    let rest = take(&inbox);
    assert_eq!(rest.len(), 1);
    assert_eq!(&rest[0].payload[..], b"three");
    let stats = p.b.work.host.stats("jobs");
    assert_eq!((stats.waiting, stats.in_flight), (0, 1));
    // The link ends: the message in flight goes back to its queue.
    p.drop_link();
    let stats = p.b.work.host.stats("jobs");
    assert_eq!((stats.waiting, stats.in_flight), (1, 0));
}

/// What waits in `inbox`, taken as a handle would (it stays open).
pub(crate) fn take<T>(inbox: &Inbox<T>) -> Vec<T> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut out = std::collections::VecDeque::new();
    let _ = inbox.poll_take(&mut cx, &mut out);
    out.into()
}
