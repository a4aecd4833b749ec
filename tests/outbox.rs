//! The SQLite outbox, its relay and the inbox, between real nodes.

#[macro_use]
mod common;

use std::collections::BTreeMap;

use common::{eventually, Net, WAIT};
use futures::StreamExt;
use mesh::{
    queue::ConsumeOptions,
    store::{
        rusqlite::{self, Connection},
        Destination, Inbox, Outbox, RelayOptions, StoreError,
    },
};

fn app_db(dir: &tempfile::TempDir, name: &str) -> Connection {
    let conn = mesh::store::open(dir.path().join(name)).expect("opens");
    conn.execute_batch("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, item TEXT)")
        .unwrap();
    conn
}

/// Orders and their messages commit together; rolled-back ones are never
/// sent; a consumer that processes through the inbox and is redelivered a
/// message it had committed (nacked after its commit) skips the repeat.
async fn outbox_to_queue_is_processed_once(net: Net) {
    let nodes = common::mesh_of(net, 2, |b| b.host_all(), |b| b);
    let nodes = nodes.await;
    let (host, app) = (&nodes[0], &nodes[1]);
    let dir = tempfile::tempdir().unwrap();
    let mut db = app_db(&dir, "app.db");
    let outbox = Outbox::install(&db).unwrap();
    let mut committed = Vec::new();
    for t in 0..50u32 {
        let tx = db.transaction().unwrap();
        let mut ids = Vec::new();
        for i in 0..10u32 {
            let n = t * 10 + i;
            tx.execute("INSERT INTO orders (id, item) VALUES (?1, 'x')", [n])
                .unwrap();
            outbox
                .enqueue(&tx, Destination::Queue("orders"), n.to_le_bytes())
                .unwrap();
            ids.push(n);
        }
        if t % 5 == 4 {
            tx.rollback().unwrap();
        } else {
            tx.commit().unwrap();
            committed.extend(ids);
        }
    }
    let relay = outbox.relay(app, RelayOptions::default()).unwrap();
    assert!(relay.wait_idle(WAIT).await, "the relay sends every row");
    assert_eq!(relay.stats().sent, committed.len() as u64);
    assert_eq!(Outbox::status(&db).unwrap().pending, 0);
    assert_eq!(Outbox::status(&db).unwrap().sent, committed.len() as u64);

    let mut cdb = app_db(&dir, "consumer.db");
    cdb.execute_batch("CREATE TABLE done (n INTEGER)").unwrap();
    let inbox = Inbox::install(&cdb).unwrap();
    let mut consumer = host
        .queue("orders")
        .unwrap()
        .consume(ConsumeOptions::default());
    let (mut processed, mut skipped, mut nacked) = (0usize, 0usize, 0usize);
    while processed < committed.len() {
        let d = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("a delivery in time")
            .expect("consumer open");
        let n = u32::from_le_bytes(d.payload()[..4].try_into().unwrap());
        let tx = cdb.transaction().unwrap();
        let r = inbox
            .process(&tx, &d, |tx| {
                tx.execute("INSERT INTO done (n) VALUES (?1)", [n])
                    .map(|_| ())
            })
            .unwrap();
        tx.commit().unwrap();
        match r {
            Some(()) => processed += 1,
            None => skipped += 1,
        }
        // Every seventh message "crashes" after its commit: it comes back.
        if n % 7 == 0 && !d.redelivered() && d.attempt() == 1 {
            nacked += 1;
            d.nack(None);
        } else {
            d.ack();
        }
    }
    // The nacked ones come back once more each, and are skipped.
    while skipped < nacked {
        let d = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("a redelivery in time")
            .unwrap();
        let tx = cdb.transaction().unwrap();
        assert!(inbox
            .process(&tx, &d, |_| Ok::<_, rusqlite::Error>(()))
            .unwrap()
            .is_none());
        tx.commit().unwrap();
        skipped += 1;
        d.ack();
    }
    let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
    let mut stmt = cdb.prepare("SELECT n FROM done").unwrap();
    for n in stmt.query_map([], |r| r.get::<_, u32>(0)).unwrap() {
        *counts.entry(n.unwrap()).or_default() += 1;
    }
    let want: BTreeMap<u32, u32> = committed.iter().map(|n| (*n, 1)).collect();
    assert_eq!(
        counts, want,
        "each committed order processed once, no other"
    );
    assert!(nacked > 0);
}

/// A relay stopped part way and started again (as after a crash) sends
/// the rest; the queue's dedup keys drop what it sends twice, and one
/// consumer sees every message in the order committed.
async fn relay_resumes_in_order(net: Net) {
    let nodes = common::mesh_of(net, 2, |b| b.host_all(), |b| b).await;
    let (host, app) = (&nodes[0], &nodes[1]);
    let dir = tempfile::tempdir().unwrap();
    let mut db = app_db(&dir, "app.db");
    let outbox = Outbox::install(&db).unwrap();
    let total = 20_000u32;
    for chunk in 0..20u32 {
        let tx = db.transaction().unwrap();
        for i in 0..1000u32 {
            let n = chunk * 1000 + i;
            outbox
                .enqueue(&tx, Destination::Queue("seq"), n.to_le_bytes())
                .unwrap();
        }
        tx.commit().unwrap();
    }
    let small = RelayOptions {
        batch: 256,
        max_in_flight: 1024,
        ..RelayOptions::default()
    };
    let first = outbox.relay(app, small.clone()).unwrap();
    eventually("the first relay to send some", || async {
        (first.stats().sent > 0).then_some(())
    })
    .await;
    first.stop();
    let pending = Outbox::status(&db).unwrap().pending;
    let second = outbox.relay(app, small).unwrap();
    assert!(second.wait_idle(WAIT).await);
    assert_eq!(Outbox::status(&db).unwrap().pending, 0);
    assert!(second.stats().sent >= pending);

    let mut consumer = host
        .queue("seq")
        .unwrap()
        .consume(ConsumeOptions::default().prefetch(1));
    for want in 0..total {
        let d = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("a delivery in time")
            .unwrap();
        let n = u32::from_le_bytes(d.payload()[..4].try_into().unwrap());
        assert_eq!(n, want, "in commit order, each once");
        d.ack();
    }
    let stats = host.queue("seq").unwrap().host_stats().await.unwrap();
    assert_eq!(
        stats.waiting + stats.in_flight,
        0,
        "no repeats left: {stats:?}"
    );
    assert_eq!(stats.accepted, u64::from(total), "{stats:?}");
}

/// Rows for a stream keep their key's order, and carry the outbox id the
/// inbox uses.
async fn outbox_to_stream_keeps_key_order(net: Net) {
    let nodes = common::mesh_of(net, 2, |b| b.host_all(), |b| b).await;
    let (host, app) = (&nodes[0], &nodes[1]);
    let dir = tempfile::tempdir().unwrap();
    let mut db = app_db(&dir, "app.db");
    let outbox = Outbox::install(&db).unwrap();
    let tx = db.transaction().unwrap();
    for i in 0..300u32 {
        let key = format!("k{}", i % 3);
        outbox
            .enqueue(
                &tx,
                Destination::Stream {
                    name: "events",
                    key: key.as_bytes(),
                },
                i.to_le_bytes(),
            )
            .unwrap();
    }
    tx.commit().unwrap();
    let relay = outbox.relay(app, RelayOptions::default()).unwrap();
    assert!(relay.wait_idle(WAIT).await);
    let mut read = host
        .stream("events")
        .unwrap()
        .consume(mesh::stream::From::Earliest);
    let mut last: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
    for _ in 0..300 {
        let r = tokio::time::timeout(WAIT, read.next())
            .await
            .expect("a record in time")
            .unwrap()
            .unwrap();
        let n = u32::from_le_bytes(r.payload()[..4].try_into().unwrap());
        assert_eq!(r.key(), format!("k{}", n % 3).as_bytes());
        if let Some(prev) = last.insert(r.key().to_vec(), n) {
            assert!(prev < n, "key order kept: {prev} then {n}");
        }
        assert!(r.headers().iter().any(|(k, _)| k == mesh::store::ID_HEADER));
    }
}

conformance!(
    outbox_to_queue_is_processed_once,
    relay_resumes_in_order,
    outbox_to_stream_keeps_key_order,
);

#[test]
fn a_garbage_file_is_a_typed_error_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.db");
    let junk = vec![0x5a_u8; 8192];
    std::fs::write(&path, &junk).unwrap();
    match Outbox::open(&path) {
        Err(StoreError::Corrupt { .. }) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        junk,
        "the file is left as it was"
    );
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.db");
    let (_, conn) = Outbox::open(&path).unwrap();
    conn.execute(
        "UPDATE mesh_meta SET version = 99 WHERE component = 'outbox'",
        [],
    )
    .unwrap();
    drop(conn);
    match Outbox::open(&path) {
        Err(StoreError::NewerSchema {
            component: "outbox",
            found: 99,
            supported: 1,
            ..
        }) => {}
        other => panic!("expected NewerSchema, got {other:?}"),
    }
}

/// A full disk (here: the database's page limit) fails the write with
/// `Full`, and every row committed before it stays.
#[test]
fn a_full_disk_fails_the_write_and_keeps_what_was_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, mut conn) = Outbox::open(dir.path().join("full.db")).unwrap();
    let pages: i64 = conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    conn.query_row(
        &format!("PRAGMA max_page_count = {}", pages + 40),
        [],
        |_| Ok(()),
    )
    .unwrap();
    let mut committed = 0u64;
    let err = loop {
        let tx = conn.transaction().unwrap();
        match outbox.enqueue(&tx, Destination::Queue("q"), vec![7u8; 16 * 1024]) {
            Ok(_) => {
                tx.commit().unwrap();
                committed += 1;
            }
            Err(e) => break e,
        }
        assert!(committed < 10_000, "the limit is never hit");
    };
    assert!(matches!(err, StoreError::Full { .. }), "got {err:?}");
    assert!(committed > 0);
    assert_eq!(Outbox::status(&conn).unwrap().pending, committed);
}

#[test]
fn bad_destinations_are_refused_in_the_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, mut conn) = Outbox::open(dir.path().join("o.db")).unwrap();
    let tx = conn.transaction().unwrap();
    for bad in ["", "a..b", "orders.*", "$internal"] {
        match outbox.enqueue(&tx, Destination::Queue(bad), b"x") {
            Err(StoreError::BadDestination(_)) => {}
            other => panic!("{bad:?}: expected BadDestination, got {other:?}"),
        }
    }
    tx.commit().unwrap();
    assert_eq!(Outbox::status(&conn).unwrap().pending, 0);
}

/// One relay per outbox: a second one (another process, or another
/// `mesh queue send --durable` on the same file) is refused, so rows are
/// not sent twice or out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_of_one_outbox_is_refused() {
    let node = common::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _conn) = Outbox::open(dir.path().join("o.db")).unwrap();
    let first = outbox.relay(&node, RelayOptions::default()).unwrap();
    match outbox.relay(&node, RelayOptions::default()) {
        Err(StoreError::InUse { .. }) => {}
        other => panic!("expected InUse, got {other:?}"),
    }
    first.stop();
    outbox
        .relay(&node, RelayOptions::default())
        .expect("free again once the first stopped");
}

/// A relay whose own node is not durable never counts its own in-memory
/// hosting as a confirmation: with no host in the mesh the rows stay in
/// the outbox (and the relay reports why), and they go, and only then are
/// deleted, once a host appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_keeps_rows_until_a_host_other_than_its_volatile_self_confirms() {
    let relay_node = common::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let (outbox, mut conn) = Outbox::open(dir.path().join("o.db")).unwrap();
    let tx = conn.transaction().unwrap();
    for n in 0..20u32 {
        outbox
            .enqueue(&tx, Destination::Queue("orders"), n.to_le_bytes())
            .unwrap();
        outbox
            .enqueue(
                &tx,
                Destination::Stream {
                    name: "audit",
                    key: b"k",
                },
                n.to_le_bytes(),
            )
            .unwrap();
    }
    tx.commit().unwrap();
    let relay = outbox.relay(&relay_node, RelayOptions::default()).unwrap();
    eventually(
        "the relay to report that nothing durable hosts them",
        || async { (relay.stats().failures >= 2).then_some(()) },
    )
    .await;
    assert_eq!(relay.stats().sent, 0, "{:?}", relay.stats());
    assert_eq!(Outbox::status(&conn).unwrap().pending, 40);

    // A host joins: the rows go to it, then leave the outbox.
    let host = common::hosting_all(&common::addr(&relay_node).await).await;
    assert!(relay.wait_idle(WAIT).await, "the relay sends every row");
    assert_eq!(Outbox::status(&conn).unwrap().pending, 0);
    let stats = host.queue("orders").unwrap().host_stats().await.unwrap();
    assert_eq!(stats.waiting, 20, "every row at the host");
    relay.stop();
    host.shutdown().await;
    relay_node.shutdown().await;
}
