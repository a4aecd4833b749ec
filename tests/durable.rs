//! Durable hosts: queues and streams in the data dir's SQLite file,
//! across restarts and SIGKILL.

mod common;

use std::{collections::BTreeSet, path::Path, process::Stdio};

use common::{eventually, loopback, WAIT};
use futures::StreamExt;
use mesh::{
    queue::ConsumeOptions,
    store::StoreError,
    stream::{From, GroupOptions},
    Node, StartError,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};

async fn durable_host(dir: &Path) -> Node {
    Node::builder()
        .listen(loopback())
        .mdns(false)
        .failure_detection(common::fast_fd())
        .data_dir(dir)
        .host_all()
        .start()
        .await
        .expect("durable host starts")
}

fn n_of(payload: &[u8]) -> u32 {
    u32::from_le_bytes(payload[..4].try_into().unwrap())
}

/// Sent messages are on disk when the send resolves; after a restart the
/// host holds exactly those not acked (in flight ones too), and its dead
/// letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_survives_a_host_restart() {
    let dir = tempfile::tempdir().unwrap();
    let host = durable_host(dir.path()).await;
    let q = host.queue("jobs").unwrap();
    q.send_batch((0..1000u32).map(|n| n.to_le_bytes().to_vec()))
        .await
        .unwrap();
    let mut consumer = q.consume(ConsumeOptions::default().prefetch(16).max_attempts(1));
    let mut acked = BTreeSet::new();
    let mut held = Vec::new();
    let mut rejected = None;
    for i in 0..301 {
        let d = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("a delivery")
            .unwrap();
        let n = n_of(d.payload());
        match i {
            0 => {
                rejected = Some(n);
                d.reject_with("bad");
            }
            1..=10 => held.push(d),
            _ => {
                acked.insert(n);
                d.ack();
            }
        }
    }
    assert_eq!(acked.len(), 290);
    let report = host.shutdown().await;
    assert_eq!(report.queued_dropped, 0, "kept on disk, not dropped");
    drop((consumer, held, q, host));

    let host = durable_host(dir.path()).await;
    let q = host.queue("jobs").unwrap();
    let stats = q.host_stats().await.unwrap();
    assert_eq!(stats.waiting, 709, "{stats:?}");
    let dlq = q.dead_letters().peek(10).await.unwrap();
    assert_eq!(dlq.len(), 1);
    assert_eq!(n_of(&dlq[0].payload), rejected.unwrap());
    assert_eq!(dlq[0].dead.as_ref().map(|d| d.1.as_str()), Some("bad"));

    // A consumer on another node gets each of the rest once.
    let addr = common::addr(&host).await;
    let other = common::start(Some(&addr)).await;
    other.ready_timeout(WAIT).await.unwrap();
    let mut consumer = other
        .queue("jobs")
        .unwrap()
        .consume(ConsumeOptions::default());
    let mut got = BTreeSet::new();
    while got.len() < 709 {
        let d = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("a delivery")
            .unwrap();
        assert!(got.insert(n_of(d.payload())), "delivered once");
        d.ack();
    }
    let want: BTreeSet<u32> = (0..1000)
        .filter(|n| !acked.contains(n) && Some(*n) != rejected)
        .collect();
    assert_eq!(got, want);
}

/// Records, offsets and group commits survive a restart; the host keeps
/// its run, so offsets go on, and the group resumes from its commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_survives_a_host_restart() {
    let dir = tempfile::tempdir().unwrap();
    let host = durable_host(dir.path()).await;
    let s = host.stream("events").unwrap();
    s.append_batch((0..1000u32).map(|n| (format!("k{}", n % 10), n.to_le_bytes().to_vec())))
        .await
        .unwrap();
    let before = s.info().await.unwrap();
    let mut group = s.group("g").unwrap().consume_with(GroupOptions::default());
    let mut committed = BTreeSet::new();
    for _ in 0..400 {
        let r = tokio::time::timeout(WAIT, group.next())
            .await
            .expect("a record")
            .unwrap()
            .unwrap();
        committed.insert(n_of(r.payload()));
        r.commit();
    }
    let g = s.group("g").unwrap();
    eventually("the commits to reach the host", || async {
        let lag: u64 = g.lag().await.ok()?.iter().map(|l| l.lag).sum();
        (lag == 600).then_some(())
    })
    .await;
    host.shutdown().await;
    drop((group, g, s, host));

    let host = durable_host(dir.path()).await;
    let s = host.stream("events").unwrap();
    let after = s.info().await.unwrap();
    assert_eq!(
        after.partitions,
        before
            .partitions
            .iter()
            .map(|p| {
                let mut p = p.clone();
                p.committed = after
                    .partitions
                    .iter()
                    .find(|a| a.partition == p.partition)
                    .map(|a| a.committed.clone())
                    .unwrap_or_default();
                p
            })
            .collect::<Vec<_>>(),
        "same partitions, offsets and bytes"
    );
    let lag: u64 = s
        .group("g")
        .unwrap()
        .lag()
        .await
        .unwrap()
        .iter()
        .map(|l| l.lag)
        .sum();
    assert_eq!(lag, 600);
    // Offsets go on after the restart.
    let pos = s.append("k0", b"after".to_vec()).await.unwrap();
    let p0 = before
        .partitions
        .iter()
        .find(|p| p.partition == pos.partition)
        .unwrap();
    assert_eq!(pos.offset, p0.next);
    // The group resumes from its commits: the other 600, and the new one.
    let mut group = s.group("g").unwrap().consume();
    let mut rest = BTreeSet::new();
    for _ in 0..601 {
        let r = tokio::time::timeout(WAIT, group.next())
            .await
            .expect("a record")
            .unwrap()
            .unwrap();
        if r.payload().as_ref() != b"after" {
            assert!(rest.insert(n_of(r.payload())));
        }
    }
    let want: BTreeSet<u32> = (0..1000).filter(|n| !committed.contains(n)).collect();
    assert_eq!(rest, want);
    // A replay reads every record with its offsets.
    let mut all = s.consume(From::Earliest);
    let mut n = 0;
    while n < 1001 {
        tokio::time::timeout(WAIT, all.next())
            .await
            .expect("a record")
            .unwrap()
            .unwrap();
        n += 1;
    }
}

async fn start_err(dir: &Path) -> StoreError {
    match Node::builder()
        .listen(loopback())
        .mdns(false)
        .data_dir(dir)
        .host_all()
        .start()
        .await
    {
        Err(StartError::Store(e)) => e,
        Err(e) => panic!("expected a store error, got {e}"),
        Ok(_) => panic!("expected a store error, the node started"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_data_dirs_are_typed_errors() {
    // Garbage where the store should be.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(mesh::store::HOST_FILE), vec![0x42u8; 4096]).unwrap();
    assert!(matches!(
        start_err(dir.path()).await,
        StoreError::Corrupt { .. }
    ));

    // Another application's database.
    let dir = tempfile::tempdir().unwrap();
    let conn = mesh::store::open(dir.path().join(mesh::store::HOST_FILE)).unwrap();
    conn.execute_batch("CREATE TABLE users (id INTEGER PRIMARY KEY)")
        .unwrap();
    drop(conn);
    match start_err(dir.path()).await {
        StoreError::Foreign { tables, .. } => assert_eq!(tables, "users"),
        e => panic!("expected Foreign, got {e}"),
    }

    // A store written by a newer mesh.
    let dir = tempfile::tempdir().unwrap();
    let host = durable_host(dir.path()).await;
    host.shutdown().await;
    drop(host);
    let conn = mesh::store::open(dir.path().join(mesh::store::HOST_FILE)).unwrap();
    conn.execute(
        "UPDATE mesh_meta SET version = 7 WHERE component = 'host'",
        [],
    )
    .unwrap();
    drop(conn);
    assert!(matches!(
        start_err(dir.path()).await,
        StoreError::NewerSchema {
            component: "host",
            found: 7,
            ..
        }
    ));

    // One node per data dir.
    let dir = tempfile::tempdir().unwrap();
    let _host = durable_host(dir.path()).await;
    assert!(matches!(
        start_err(dir.path()).await,
        StoreError::InUse { .. }
    ));
}

const BIN: &str = env!("CARGO_BIN_EXE_mesh-cli");
const LOOP: &str = "/ip4/127.0.0.1/udp/0/quic-v1";

/// A `mesh node --data-dir` process and its address.
async fn node_process(dir: &Path) -> (tokio::process::Child, String) {
    let mut node = Command::new(BIN)
        .args(["node", "--no-mdns", "--listen", LOOP, "--data-dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(node.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = tokio::time::timeout(WAIT, out.next_line())
            .await
            .expect("output in time")
            .unwrap()
            .expect("node running");
        if let Some(a) = line.strip_prefix("listening:") {
            break a.trim().to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    (node, addr)
}

async fn via(addr: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(BIN)
        .args(args)
        .args(["--no-mdns", "--listen", LOOP, "--bootstrap", addr])
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(WAIT, out)
        .await
        .expect("the command finishes in time")
        .unwrap()
}

fn payloads(out: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON lines");
            v["payload"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

/// What `mesh queue send` and `mesh stream append` were told was stored
/// is there after the durable node is SIGKILLed and started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_durable_node_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, addr) = node_process(dir.path()).await;
    let out = via(&addr, &["queue", "send", "jobs", "job", "--count", "200"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = via(&addr, &["stream", "append", "ev", "e", "--count", "100"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.start_kill().unwrap();
    let _ = node.wait().await;

    let (_node, addr) = node_process(dir.path()).await;
    let out = via(&addr, &["queue", "consume", "jobs", "--count", "200"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: BTreeSet<String> = payloads(&out).into_iter().collect();
    let want: BTreeSet<String> = (1..=200).map(|i| format!("job {i}")).collect();
    assert_eq!(got, want);
    let out = via(
        &addr,
        &[
            "stream", "read", "ev", "--from", "earliest", "--count", "100",
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: BTreeSet<String> = payloads(&out).into_iter().collect();
    let want: BTreeSet<String> = (0..100).map(|i| format!("e-{i}")).collect();
    assert_eq!(got, want);
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop;
/// `None` (and why) where mounting is not allowed.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().ok()?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipped: cannot mount a tmpfs (needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(SmallDisk { dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// A durable host whose disk fills up confirms nothing it could not
/// write: the sends wait, and complete once there is room again; after a
/// restart every confirmed message is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_confirmations_and_loses_nothing() {
    let Some(disk) = SmallDisk::mount("8m") else {
        return;
    };
    let dir = disk.dir.path().join("node");
    std::fs::create_dir(&dir).unwrap();
    let host = durable_host(&dir).await;
    let q = host.queue("jobs").unwrap();
    q.send_batch((0..100u32).map(|n| n.to_le_bytes().to_vec()))
        .await
        .unwrap();
    // Fill the disk.
    let filler = disk.dir.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    // 1,000 messages of 4 KiB cannot be written now.
    let big = q.clone();
    let sending = tokio::spawn(async move {
        big.send_batch((100..1100u32).map(|n| {
            let mut v = n.to_le_bytes().to_vec();
            v.resize(4096, 7);
            v
        }))
        .await
    });
    // Room again: they are written, and only then confirmed.
    let pending = eventually("the store to hold the big batch back", || async {
        let s = q.host_stats().await.ok()?;
        (s.waiting >= 1100).then_some(())
    });
    pending.await;
    std::fs::remove_file(&filler).unwrap();
    tokio::time::timeout(WAIT, sending)
        .await
        .expect("the sends complete once there is room")
        .unwrap()
        .unwrap();
    host.shutdown().await;
    drop((q, host));
    let host = durable_host(&dir).await;
    let stats = host.queue("jobs").unwrap().host_stats().await.unwrap();
    assert_eq!(stats.waiting, 1100, "every confirmed message kept");
    host.shutdown().await;
}

async fn next_delivery(c: &mut mesh::queue::Consumer) -> mesh::queue::Delivery {
    tokio::time::timeout(WAIT, c.next())
        .await
        .expect("a delivery")
        .unwrap()
}

/// A late ack of a delivery made before the host restarted must not
/// settle another message: the restarted host numbers its messages
/// afresh, so without a host epoch in the tag the stale ack of M1 would
/// land on whatever now has M1's old tag (M2 here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_ack_from_before_a_host_restart_settles_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let host = durable_host(dir.path()).await;
    let q = host.queue("jobs").unwrap();
    q.send_batch((0..10u32).map(|n| n.to_le_bytes().to_vec()))
        .await
        .unwrap();
    let host_addr = common::addr(&host).await;
    let consumer_node = Node::builder()
        .listen(loopback())
        .mdns(false)
        .failure_detection(common::fast_fd())
        .self_host(false)
        .bootstrap(host_addr)
        .start()
        .await
        .unwrap();
    consumer_node.ready_timeout(WAIT).await.unwrap();
    let mut consumer = consumer_node
        .queue("jobs")
        .unwrap()
        .consume(ConsumeOptions::default().prefetch(1));
    let m0 = next_delivery(&mut consumer).await;
    assert_eq!(n_of(m0.payload()), 0);
    m0.ack();
    let m1 = next_delivery(&mut consumer).await;
    assert_eq!(n_of(m1.payload()), 1);

    // The host restarts (on the same data dir) while M1 is held.
    host.shutdown().await;
    drop((q, host));
    let consumer_addr = common::addr(&consumer_node).await;
    let host = Node::builder()
        .listen(loopback())
        .mdns(false)
        .failure_detection(common::fast_fd())
        .data_dir(dir.path())
        .host_all()
        .bootstrap(consumer_addr)
        .start()
        .await
        .unwrap();

    // The consumer re-registers and gets M1 again from the new run; only
    // then is the old delivery of M1 acked.
    let again = next_delivery(&mut consumer).await;
    assert_eq!(n_of(again.payload()), 1, "M1 redelivered after the restart");
    m1.ack();
    again.ack();
    let mut rest = Vec::new();
    while rest.len() < 8 {
        let d = next_delivery(&mut consumer).await;
        rest.push(n_of(d.payload()));
        d.ack();
    }
    assert_eq!(rest, (2..10).collect::<Vec<_>>(), "M2 and the rest kept");
    host.shutdown().await;
}

/// A durable host keeps the dedup keys of messages it delivered and had
/// acked for the dedup window, across a restart: a resend of an acked
/// message with the same key is dropped, not delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_keys_of_acked_messages_survive_a_host_restart() {
    use mesh::queue::SendOptions;
    let dir = tempfile::tempdir().unwrap();
    let keyed = |key: &str| SendOptions {
        dedup_key: Some(key.to_owned()),
        ..SendOptions::default()
    };
    let host = durable_host(dir.path()).await;
    let q = host.queue("jobs").unwrap();
    q.send_with("first", keyed("k1")).await.unwrap();
    q.send_with("second", keyed("k2")).await.unwrap();
    let mut consumer = q.consume(ConsumeOptions::default());
    for _ in 0..2 {
        next_delivery(&mut consumer).await.ack();
    }
    eventually("both acked", || async {
        let s = q.host_stats().await.ok()?;
        (s.waiting == 0 && s.in_flight == 0).then_some(())
    })
    .await;
    drop(consumer);
    host.shutdown().await;
    drop((q, host));

    let host = durable_host(dir.path()).await;
    let q = host.queue("jobs").unwrap();
    q.send_with("first again", keyed("k1")).await.unwrap();
    q.send_with("new", keyed("k3")).await.unwrap();
    let stats = q.host_stats().await.unwrap();
    assert_eq!(stats.waiting, 1, "only the new key queued: {stats:?}");
    let mut consumer = q.consume(ConsumeOptions::default());
    assert_eq!(
        next_delivery(&mut consumer).await.payload().as_ref(),
        b"new"
    );
    host.shutdown().await;
}
