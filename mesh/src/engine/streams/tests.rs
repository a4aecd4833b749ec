//! Appends, reads and consumer groups between two engines (see
//! `engine::testing`): the rules of `route_append` and
//! `refresh_consumer`, which had no tests of their own.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use super::*;
use crate::{engine::testing::Pair, engine::work::tests::take, node::Config};

type Placement = Result<Vec<Placed>, AppendFailure>;

/// `a` appends and consumes; `b` hosts `events` (4 partitions).
fn appender_and_host() -> Pair {
    let host = Config {
        host_streams: vec!["events".into()],
        ..Config::default()
    };
    Pair::with(&Config::default(), &host)
}

fn record(key: &'static str, payload: &'static str) -> NewRecord {
    NewRecord {
        key: Bytes::from_static(key.as_bytes()),
        timestamp_ms: 1,
        headers: Vec::new(),
        payload: Bytes::from_static(payload.as_bytes()),
    }
}

/// Appends `records` to `events` from `e`; the answer lands in the
/// returned slot.
fn append(e: &mut Engine, now: Instant, records: Vec<NewRecord>) -> Arc<Mutex<Option<Placement>>> {
    let slot: Arc<Mutex<Option<Placement>>> = Arc::default();
    let answer = slot.clone();
    e.handle_command(
        now,
        crate::engine::work::Op::Stream(StreamOp::Append {
            stream: "events".into(),
            records,
            durable: false,
            reply: Reply::new(move |r| *answer.lock().unwrap() = Some(r)),
        }),
    );
    slot
}

/// Starts consumer `sid` of `events` on `e` (in `group`, if any).
fn consume(e: &mut Engine, now: Instant, sid: u64, group: Option<&str>) -> Arc<Inbox<StreamItem>> {
    let inbox: Arc<Inbox<StreamItem>> = Arc::default();
    e.handle_command(
        now,
        crate::engine::work::Op::Stream(StreamOp::Consume {
            sid,
            stream: "events".into(),
            group: group.map(Into::into),
            start: Start::Earliest,
            window: 64,
            inbox: inbox.clone(),
        }),
    );
    inbox
}

/// The partitions consumer `sid` of `e` reads now: (host, index).
fn reading(e: &Engine, sid: u64) -> BTreeSet<(NodeId, u32)> {
    e.streams.consumers[&sid].active.keys().copied().collect()
}

/// Payloads of the records waiting in `inbox`.
fn payloads(inbox: &Inbox<StreamItem>) -> Vec<String> {
    take(inbox)
        .into_iter()
        .filter_map(|item| match item {
            StreamItem::Record { record, .. } => {
                Some(String::from_utf8(record.payload.to_vec()).expect("utf-8"))
            }
            StreamItem::Gone { .. } => None,
        })
        .collect()
}

#[test]
fn an_append_goes_to_the_streams_host_and_resolves_with_its_offsets() {
    let mut p = appender_and_host();
    let now = p.now;
    let got = append(
        &mut p.a,
        now,
        vec![
            record("k1", "one"),
            record("k1", "two"),
            record("k2", "three"),
        ],
    );
    assert!(got.lock().unwrap().is_none(), "not before the host answers");
    p.drive();
    let placed = got
        .lock()
        .unwrap()
        .take()
        .expect("answered")
        .expect("placed");
    assert_eq!(placed.len(), 3);
    assert!(placed.iter().all(|pl| pl.host == p.b.local));
    // One key, one partition, in order.
    assert_eq!(placed[0].index, placed[1].index);
    assert_eq!(placed[1].offset, placed[0].offset + 1);
    assert_eq!(placed[0].index, core_stream::partition_of(b"k1", 4));
    assert_eq!(placed[2].index, core_stream::partition_of(b"k2", 4));
    assert!(!p.a.streams.hosts_locally("events"));
    assert!(p.a.streams.pending.is_empty() && p.a.streams.calls.is_empty());
}

#[test]
fn an_append_lost_with_its_hosts_link_goes_to_the_next_choice() {
    let mut p = appender_and_host();
    let now = p.now;
    let got = append(&mut p.a, now, vec![record("k1", "one")]);
    p.drop_link();
    // Nobody else hosts it: a does from now on, and the record is there.
    let placed = got
        .lock()
        .unwrap()
        .take()
        .expect("answered")
        .expect("placed");
    assert_eq!(placed[0].host, p.a.local);
    assert!(p.a.streams.hosts_locally("events"));
    assert_eq!(
        p.b.streams
            .host
            .partitions("events")
            .iter()
            .map(|s| s.next)
            .sum::<u64>(),
        0
    );
}

#[test]
fn a_consumer_reads_every_partition_and_resumes_where_it_was_after_a_new_link() {
    let mut p = appender_and_host();
    let now = p.now;
    for (k, v) in [("k1", "one"), ("k2", "two"), ("k3", "three")] {
        append(&mut p.b, now, vec![record(k, v)]);
    }
    let inbox = consume(&mut p.a, now, 1, None);
    p.drive();
    let b = p.b.local;
    assert_eq!(reading(&p.a, 1), (0..4).map(|i| (b, i)).collect());
    let mut got = payloads(&inbox);
    got.sort();
    assert_eq!(got, ["one", "three", "two"]);
    // The link ends and comes back; records appended meanwhile arrive,
    // and none of the earlier ones again.
    p.drop_link();
    assert!(reading(&p.a, 1).is_empty());
    append(&mut p.b, now, vec![record("k1", "four")]);
    p.link();
    p.drive();
    assert_eq!(reading(&p.a, 1).len(), 4);
    assert_eq!(payloads(&inbox), ["four"]);
}

#[test]
fn group_members_split_the_partitions_and_a_leavers_share_goes_to_the_rest() {
    let mut p = appender_and_host();
    let now = p.now;
    let _a_inbox = consume(&mut p.a, now, 1, Some("g"));
    p.drive();
    // The stream has no partitions before its first record...
    assert!(reading(&p.a, 1).is_empty());
    // ...and the host tells its watchers when it appears.
    append(&mut p.b, now, vec![record("k1", "one")]);
    p.drive();
    let b = p.b.local;
    let all: BTreeSet<(NodeId, u32)> = (0..4).map(|i| (b, i)).collect();
    // Alone in the group, a reads every partition.
    assert_eq!(reading(&p.a, 1), all);
    // b joins: each partition goes to one member, none is left out.
    let _b_inbox = consume(&mut p.b, now, 2, Some("g"));
    p.drive();
    let (ra, rb) = (reading(&p.a, 1), reading(&p.b, 2));
    assert!(ra.is_disjoint(&rb), "{ra:?} {rb:?}");
    assert_eq!(ra.union(&rb).copied().collect::<BTreeSet<_>>(), all);
    assert!(!ra.is_empty() && !rb.is_empty(), "{ra:?} {rb:?}");
    // b's member leaves: a takes its partitions back.
    p.b.handle_command(
        now,
        crate::engine::work::Op::Stream(StreamOp::Cancel { sid: 2 }),
    );
    p.drive();
    assert_eq!(reading(&p.a, 1), all);
}
