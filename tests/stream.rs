//! Streams between real nodes, over every transport (`quic::*` with shared
//! memory off, `shm::*` on shared-memory rings): append, replay, live
//! tail, hosting, consumer groups with rebalancing, retention and info.

#[macro_use]
mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime},
};

use common::*;
use mesh::stream::{
    AppendError, AppendOptions, From, GroupOptions, PartitionId, ReadError, Record, Retention,
    StreamConsumer,
};

async fn next_record(c: &mut StreamConsumer) -> Result<Record, ReadError> {
    tokio::time::timeout(WAIT, c.recv())
        .await
        .expect("a record in time")
        .expect("consumer open")
}

async fn records(c: &mut StreamConsumer, n: usize) -> Vec<Record> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        out.push(next_record(c).await.expect("no retention gap"));
    }
    out
}

fn text(r: &Record) -> String {
    String::from_utf8_lossy(r.payload()).into_owned()
}

/// Per partition, the offsets read must count up by one.
fn assert_in_order(recs: &[Record]) {
    let mut last: BTreeMap<PartitionId, u64> = BTreeMap::new();
    for r in recs {
        if let Some(prev) = last.insert(r.partition(), r.offset()) {
            assert_eq!(
                r.offset(),
                prev + 1,
                "offsets of {} skip or go back",
                r.partition()
            );
        }
    }
}

async fn appender_hosts_its_own_and_a_peer_replays_then_tails(net: Net) {
    let nodes = mesh_of(net, 2, |b| b, |b| b).await;
    let (appender, reader) = (&nodes[0], &nodes[1]);
    let s = appender.stream("orders").unwrap();
    let mut placed = Vec::new();
    for i in 0..40 {
        let key = format!("customer-{}", i % 5);
        let at = s.append(key.clone(), format!("{key}:{i}")).await.unwrap();
        assert_eq!(
            at.partition.host,
            appender.peer_id(),
            "the appender hosts its own"
        );
        placed.push((key, at));
    }
    // One key, one partition, offsets counting up.
    let mut by_key: BTreeMap<String, BTreeSet<PartitionId>> = BTreeMap::new();
    for (k, at) in &placed {
        by_key.entry(k.clone()).or_default().insert(at.partition);
    }
    assert!(by_key.values().all(|p| p.len() == 1), "{by_key:?}");

    let mut c = reader.stream("orders").unwrap().consume(From::Earliest);
    let got = records(&mut c, 40).await;
    assert_in_order(&got);
    let texts: BTreeSet<String> = got.iter().map(text).collect();
    assert_eq!(texts.len(), 40);
    for r in &got {
        let key = String::from_utf8_lossy(r.key()).into_owned();
        assert!(text(r).starts_with(&key));
        assert_eq!(by_key[&key].iter().next(), Some(&r.partition()));
    }
    // Live: new records come as they are appended.
    s.append("customer-1", "customer-1:live").await.unwrap();
    let r = next_record(&mut c).await.unwrap();
    assert_eq!(text(&r), "customer-1:live");
}

async fn consumers_start_latest_at_an_offset_or_a_time(net: Net) {
    let nodes = mesh_of(net, 2, |b| b.stream_partitions(1), |b| b).await;
    let (appender, reader) = (&nodes[0], &nodes[1]);
    let s = appender.stream("log").unwrap();
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    for i in 0..10u64 {
        s.append_with(
            format!("r{i}"),
            AppendOptions {
                timestamp: Some(t0 + Duration::from_secs(i)),
                ..AppendOptions::default()
            },
        )
        .await
        .unwrap();
    }
    let rs = reader.stream("log").unwrap();
    let mut at = rs.consume(From::Offset(7));
    let got: Vec<String> = records(&mut at, 3).await.iter().map(text).collect();
    assert_eq!(got, ["r7", "r8", "r9"]);
    let mut by_time = rs.consume(From::Time(t0 + Duration::from_millis(4500)));
    let first = next_record(&mut by_time).await.unwrap();
    assert_eq!((text(&first), first.offset()), ("r5".into(), 5));
    assert_eq!(first.timestamp(), t0 + Duration::from_secs(5));

    let mut latest = rs.consume(From::Latest);
    // A latest consumer starts at the end once it has found the host:
    // append until one reaches it, then only later records follow.
    let mut i = 0;
    let first_new = loop {
        s.append("", format!("new{i}")).await.unwrap();
        i += 1;
        if let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(100), latest.recv()).await {
            break r.unwrap();
        }
        assert!(i < 200, "latest consumer never started");
    };
    assert!(text(&first_new).starts_with("new"));
    assert!(first_new.offset() >= 10, "nothing from before it started");
}

async fn a_one_shot_appender_hands_records_to_the_host_and_leaves(net: Net) {
    let nodes = mesh_of(net, 2, |b| b.host_all(), |b| b.self_host(false)).await;
    let (host, appender) = (&nodes[0], &nodes[1]);
    let s = appender.stream("events").unwrap();
    let placed = s
        .append_batch((0..100).map(|i| (format!("k{}", i % 7), format!("e{i}"))))
        .await
        .unwrap();
    assert_eq!(placed.len(), 100);
    assert!(placed.iter().all(|p| p.partition.host == host.peer_id()));
    let report = appender.shutdown().await;
    assert!(report.is_clean(), "{report:?}");
    // Records stay readable with the appender gone.
    let mut c = host.stream("events").unwrap().consume(From::Earliest);
    let got = records(&mut c, 100).await;
    assert_in_order(&got);
    let texts: BTreeSet<String> = got.iter().map(text).collect();
    assert_eq!(texts, (0..100).map(|i| format!("e{i}")).collect());
    let info = host.stream("events").unwrap().info().await.unwrap();
    assert_eq!(info.partitions.len(), 4);
    assert_eq!(
        info.partitions.iter().map(|p| p.records()).sum::<u64>(),
        100
    );
}

async fn no_host_anywhere_is_an_error_for_a_one_shot_appender(net: Net) {
    let nodes = mesh_of(net, 2, |b| b, |b| b.self_host(false)).await;
    let err = nodes[1].stream("nobody").unwrap().append("", "x").await;
    assert_eq!(err, Err(AppendError::NoHost("nobody".into())));
}

async fn a_group_splits_partitions_and_a_leaver_s_share_moves_on_from_the_commit(net: Net) {
    let nodes = mesh_of(net, 3, |b| b.host_all().stream_partitions(8), |b| b).await;
    let (host, m1, m2) = (&nodes[0], &nodes[1], &nodes[2]);
    let s = host.stream("jobs").unwrap();
    s.append_batch((0..200).map(|i| (format!("k{i}"), format!("j{i}"))))
        .await
        .unwrap();
    let g1 = m1.stream("jobs").unwrap().group("workers").unwrap();
    let g2 = m2.stream("jobs").unwrap().group("workers").unwrap();
    let mut c1 = g1.consume();
    let mut c2 = g2.consume();
    // Both members read and commit until the group has every record. A
    // record may come twice while the members learn of each other (at
    // least once), never not at all.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut from1 = BTreeSet::new();
    let mut from2 = BTreeSet::new();
    while seen.len() < 200 {
        tokio::select! {
            r = next_record(&mut c1) => {
                let r = r.unwrap();
                from1.insert(r.partition());
                *seen.entry(text(&r)).or_default() += 1;
                r.commit();
            }
            r = next_record(&mut c2) => {
                let r = r.unwrap();
                from2.insert(r.partition());
                *seen.entry(text(&r)).or_default() += 1;
                r.commit();
            }
        }
    }
    // One member may have read everything before it learned of the other;
    // once they know each other, new records spread over both.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut n = 0;
    while from1.is_empty() || from2.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the members never split the partitions"
        );
        s.append_batch((0..8).map(|i| (format!("s{n}-{i}"), format!("s{n}-{i}"))))
            .await
            .unwrap();
        n += 1;
        for _ in 0..16 {
            let got = tokio::select! {
                Some(r) = c1.recv() => Some((1, r)),
                Some(r) = c2.recv() => Some((2, r)),
                _ = tokio::time::sleep(Duration::from_millis(50)) => None,
            };
            let Some((who, r)) = got else { break };
            let r = r.unwrap();
            if who == 1 { &mut from1 } else { &mut from2 }.insert(r.partition());
            *seen.entry(text(&r)).or_default() += 1;
            r.commit();
        }
    }
    // Once all is read and committed the group has no lag (reading on
    // while waiting: the last batch may still be on its way).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let lag = g1.lag().await.unwrap();
        if lag.len() == 8 && lag.iter().all(|l| l.lag == 0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "lag never reached 0: {lag:?}"
        );
        let got = tokio::select! {
            Some(r) = c1.recv() => Some(r),
            Some(r) = c2.recv() => Some(r),
            _ = tokio::time::sleep(Duration::from_millis(50)) => None,
        };
        if let Some(r) = got {
            let r = r.unwrap();
            *seen.entry(text(&r)).or_default() += 1;
            r.commit();
        }
    }
    // The members split the partitions (each got some).
    assert!(
        !from1.is_empty() && !from2.is_empty(),
        "{from1:?} {from2:?}"
    );

    // m2 leaves: its partitions move to m1, which resumes from the commit
    // and gets every new record.
    drop(c2);
    s.append_batch((200..300).map(|i| (format!("k{i}"), format!("j{i}"))))
        .await
        .unwrap();
    let mut after = BTreeSet::new();
    while after.len() < 100 {
        let r = next_record(&mut c1).await.unwrap();
        let t = text(&r);
        let n: usize = t[1..].parse().unwrap_or(0);
        if !t.starts_with('j') || n < 200 {
            // A repeat still buffered from the members' overlap.
            assert!(seen.contains_key(&t), "{t} was never seen before");
        } else {
            after.insert(t);
        }
        r.commit();
    }
}

async fn group_auto_commit_resumes_a_new_member_after_the_processed(net: Net) {
    let nodes = mesh_of(net, 2, |b| b.stream_partitions(1), |b| b).await;
    let (host, member) = (&nodes[0], &nodes[1]);
    let s = host.stream("audit").unwrap();
    s.append_batch((0..50).map(|i| ("", format!("a{i}"))))
        .await
        .unwrap();
    let g = member.stream("audit").unwrap().group("auditors").unwrap();
    let options = GroupOptions {
        auto_commit: Some(mesh::stream::AutoCommit {
            every: 10,
            interval: Duration::from_secs(3600),
        }),
        ..GroupOptions::default()
    };
    let mut c = g.consume_with(options);
    let got = records(&mut c, 20).await;
    assert_eq!(text(&got[19]), "a19");
    // Asking for the next record marks the 20 taken as processed; with
    // nothing to read yet the consumer commits them.
    drop(got);
    s.append("", "a-next").await.unwrap();
    let _ = next_record(&mut c).await; // a20
    eventually("the commit of what was processed", || async {
        let lag = g.lag().await.unwrap();
        lag.first()
            .and_then(|l| l.committed)
            .filter(|c| *c >= 20)
            .map(|_| ())
    })
    .await;
    let committed = g.lag().await.unwrap()[0].committed.unwrap();
    drop(c);
    // A new member resumes from the commit, not from the start.
    let mut again = g.consume();
    let r = next_record(&mut again).await.unwrap();
    assert_eq!(r.offset(), committed);
}

async fn retention_removes_old_records_and_reading_them_is_an_error(net: Net) {
    let nodes = mesh_of(
        net,
        2,
        |b| {
            b.stream_partitions(1).stream_retention(Retention {
                max_records: 10,
                ..Retention::default()
            })
        },
        |b| b,
    )
    .await;
    let (host, reader) = (&nodes[0], &nodes[1]);
    let s = host.stream("metrics").unwrap();
    s.append_batch((0..30).map(|i| ("", format!("m{i}"))))
        .await
        .unwrap();
    let info = s.info().await.unwrap();
    assert_eq!(
        (info.partitions[0].first, info.partitions[0].next),
        (20, 30)
    );
    let mut c = reader.stream("metrics").unwrap().consume(From::Offset(5));
    match next_record(&mut c).await {
        Err(ReadError::OffsetGone {
            partition,
            requested,
            first,
        }) => {
            assert_eq!(partition.host, host.peer_id());
            assert_eq!((requested, first), (5, 20));
        }
        other => panic!("expected OffsetGone, got {other:?}"),
    }
    let got = records(&mut c, 10).await;
    assert_eq!(got[0].offset(), 20);
    assert_eq!(text(&got[9]), "m29");
}

async fn a_slow_consumer_gets_everything_in_order(net: Net) {
    let nodes = mesh_of(net, 2, |b| b.stream_partitions(2), |b| b).await;
    let (host, reader) = (&nodes[0], &nodes[1]);
    let s = host.stream("firehose").unwrap();
    let mut c = reader
        .stream("firehose")
        .unwrap()
        .consume_with(From::Earliest, mesh::stream::ConsumeOptions { window: 8 });
    for chunk in 0..20 {
        s.append_batch((0..500).map(|i| (format!("k{}", i % 3), format!("{chunk}-{i}"))))
            .await
            .unwrap();
    }
    // With a window of 8 the host sends only as fast as this reads.
    let got = records(&mut c, 10_000).await;
    assert_in_order(&got);
    let texts: BTreeSet<String> = got.iter().map(text).collect();
    assert_eq!(texts.len(), 10_000);
}

async fn a_latest_consumer_started_before_the_stream_gets_its_first_records(net: Net) {
    let nodes = mesh_of(net, 2, |b| b, |b| b).await;
    let (appender, reader) = (&nodes[0], &nodes[1]);
    // Nobody hosts the stream yet: the appender will host its own.
    let mut latest = reader.stream("fresh").unwrap().consume(From::Latest);
    let s = appender.stream("fresh").unwrap();
    s.append_batch((0..10).map(|i| ("", format!("f{i}"))))
        .await
        .unwrap();
    let got: Vec<String> = records(&mut latest, 10).await.iter().map(text).collect();
    assert_eq!(got, (0..10).map(|i| format!("f{i}")).collect::<Vec<_>>());
}

conformance!(
    a_latest_consumer_started_before_the_stream_gets_its_first_records,
    appender_hosts_its_own_and_a_peer_replays_then_tails,
    consumers_start_latest_at_an_offset_or_a_time,
    a_one_shot_appender_hands_records_to_the_host_and_leaves,
    no_host_anywhere_is_an_error_for_a_one_shot_appender,
    a_group_splits_partitions_and_a_leaver_s_share_moves_on_from_the_commit,
    group_auto_commit_resumes_a_new_member_after_the_processed,
    retention_removes_old_records_and_reading_them_is_an_error,
    a_slow_consumer_gets_everything_in_order,
);
