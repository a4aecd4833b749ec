//! The `mesh` binary as separate processes: node, sub, pub.

mod common;

use std::process::Stdio;

use common::WAIT;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-cli");
const LOOP: &str = "/ip4/127.0.0.1/udp/0/quic-v1";

async fn line_with(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    prefix: &str,
) -> String {
    loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("output in time")
            .unwrap()
            .expect("process still running");
        if let Some(rest) = line.strip_prefix(prefix) {
            return rest.trim().to_owned();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_sub_pub_processes() {
    let (mut node, node_id, addr) = node_process().await;
    assert!(
        addr.ends_with(&format!("/p2p/{node_id}")),
        "{addr} is dialable"
    );

    let mut sub = Command::new(BIN)
        .args([
            "sub",
            "demo.>",
            "--count",
            "3",
            "--no-mdns",
            "--listen",
            LOOP,
            "--bootstrap",
            &addr,
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut sub_out = BufReader::new(sub.stdout.take().unwrap()).lines();

    // Wait until the subscriber's interest is known at the node: a `peers`
    // run through the node lists it (node + subscriber).
    common::eventually("the subscriber to join", || async {
        let out = Command::new(BIN)
            .args([
                "peers",
                "--json",
                "--no-mdns",
                "--listen",
                LOOP,
                "--bootstrap",
                &addr,
            ])
            .output()
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v.as_array()?
            .iter()
            .filter(|p| p["state"] == "alive")
            .count()
            >= 2)
            .then_some(())
    })
    .await;

    let status = Command::new(BIN)
        .args([
            "pub",
            "demo.greeting",
            "hello",
            "--count",
            "2",
            "--no-mdns",
            "--listen",
            LOOP,
            "--bootstrap",
            &addr,
        ])
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap();
    assert!(
        status.status.success(),
        "pub failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let status = Command::new(BIN)
        .args([
            "pub",
            "demo.bin",
            "x",
            "--size",
            "4",
            "--no-mdns",
            "--listen",
            LOOP,
            "--bootstrap",
            &addr,
        ])
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap();
    assert!(
        status.status.success(),
        "pub failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );

    let mut got = Vec::new();
    for _ in 0..3 {
        let line = tokio::time::timeout(WAIT, sub_out.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.push(
            serde_json::from_str::<serde_json::Value>(&line).expect("one JSON object per line"),
        );
    }
    assert_eq!(got[0]["topic"], "demo.greeting");
    assert_eq!(got[0]["payload"], "hello 1");
    assert_eq!(got[1]["payload"], "hello 2");
    assert_eq!(got[0]["encoding"], "utf8");
    assert_eq!(got[2]["topic"], "demo.bin");
    assert_eq!(got[2]["payload"], "x...");
    assert!(got[0]["publisher"].as_str().unwrap().starts_with("12D3"));
    // Ids are publisher/seq, the sequence counting up per publisher.
    let seq = |v: &serde_json::Value| -> u64 {
        let id = v["id"].as_str().unwrap();
        let (publisher, seq) = id.rsplit_once('/').unwrap();
        assert_eq!(publisher, v["publisher"].as_str().unwrap());
        seq.parse().unwrap()
    };
    assert_eq!(seq(&got[1]), seq(&got[0]) + 1);
    // --count 3: the subscriber exits by itself.
    let status = tokio::time::timeout(WAIT, sub.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    node.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_without_peers_fails_clearly() {
    let out = Command::new(BIN)
        .args([
            "pub",
            "a.b",
            "x",
            "--no-mdns",
            "--listen",
            LOOP,
            "--timeout",
            "0.5",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no mesh peer found within 0.5s"), "{err}");

    let out = Command::new(BIN)
        .args(["pub", "a..b", "x", "--no-mdns"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty segment"));
}

/// Node processes on one host move their data links to shared memory with
/// no setting, and each survives the other's SIGKILL: the hub sees a
/// killed subscriber go down and links its successor over shm again; after
/// the hub is killed, a publisher and a subscriber linked through it keep
/// exchanging messages over their own link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_processes_use_shm_and_survive_each_others_crash() {
    let spawn = |args: &[&str]| {
        let mut child = Command::new(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap()).lines();
        (child, out)
    };
    let (mut hub, mut hub_out) = spawn(&["node", "--no-mdns", "--listen", LOOP]);
    line_with(&mut hub_out, "peer id:").await;
    let addr = line_with(&mut hub_out, "listening:").await;
    let sub_args = [
        "sub",
        "crash.>",
        "--no-mdns",
        "--listen",
        LOOP,
        "--bootstrap",
        &addr,
    ];

    // A subscriber joins; the hub's link to it moves to shared memory.
    let (mut sub, _sub_out) = spawn(&sub_args);
    let link = line_with(&mut hub_out, "link ").await;
    let (sub_id, kind) = link.split_once(' ').unwrap();
    assert_eq!(kind, "shm", "same host and user: shared memory by default");
    let sub_id = sub_id.to_owned();

    // SIGKILL it: the hub notices and lives on.
    sub.kill().await.unwrap();
    line_with(&mut hub_out, &format!("peer {sub_id} down")).await;
    assert!(hub.try_wait().unwrap().is_none(), "the hub survived");

    // A new subscriber is linked over shm again.
    let (_sub2, mut sub2_out) = spawn(&sub_args);
    loop {
        let link = line_with(&mut hub_out, "link ").await;
        if link.ends_with(" shm") && !link.starts_with(&sub_id) {
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = hub_out.next_line().await {} });

    // A publisher sends through the mesh; the subscriber receives.
    let (_publisher, _pub_out) = spawn(&[
        "pub",
        "crash.tick",
        "m",
        "--count",
        "100000",
        "--interval-ms",
        "5",
        "--no-mdns",
        "--listen",
        LOOP,
        "--bootstrap",
        &addr,
    ]);
    let number = |line: &str| -> u64 {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["payload"].as_str().unwrap()[2..].parse().unwrap()
    };
    let mut last = 0;
    for _ in 0..20 {
        let line = tokio::time::timeout(WAIT, sub2_out.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        last = number(&line);
    }

    // SIGKILL the hub: publisher and subscriber carry on between them.
    hub.kill().await.unwrap();
    let mut after = 0;
    while after < 50 {
        let line = tokio::time::timeout(WAIT, sub2_out.next_line())
            .await
            .expect("messages keep coming after the hub died")
            .unwrap()
            .unwrap();
        let n = number(&line);
        assert!(n > last, "in order: {n} after {last}");
        last = n;
        after += 1;
    }
}

/// A `mesh node` process (it hosts every queue), its peer id and its
/// dialable address; its later output is drained.
async fn node_process() -> (tokio::process::Child, String, String) {
    let mut node = Command::new(BIN)
        .args(["node", "--no-mdns", "--listen", LOOP])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(node.stdout.take().unwrap()).lines();
    let id = line_with(&mut out, "peer id:").await;
    let addr = line_with(&mut out, "listening:").await;
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    (node, id, addr)
}

/// Runs `mesh ARGS --no-mdns --listen LOOP --bootstrap ADDR` to completion.
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

/// The JSON lines a command printed.
fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

/// A `mesh queue send` process hands five messages to the node, which
/// hosts them until a `mesh queue consume` process takes each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_send_and_consume_processes() {
    let (_node, _, addr) = node_process().await;
    let sent = via(&addr, &["queue", "send", "jobs", "job", "--count", "5"]).await;
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );

    let got = via(&addr, &["queue", "consume", "jobs", "--count", "5"]).await;
    assert!(got.status.success(), "--count 5: it exits by itself");
    let got = json_lines(&got);
    assert_eq!(got.len(), 5);
    let payloads: std::collections::BTreeSet<_> =
        got.iter().map(|v| v["payload"].as_str().unwrap()).collect();
    let all: std::collections::BTreeSet<_> = ["job 1", "job 2", "job 3", "job 4", "job 5"].into();
    assert_eq!(payloads, all, "each message once");
    let mut ids = std::collections::BTreeSet::new();
    for v in &got {
        assert_eq!(v["queue"], "jobs");
        assert_eq!(v["attempt"], 1);
        assert_eq!(v["acked"], true);
        assert_eq!(v["encoding"], "utf8");
        // Ids are sender/seq.
        let (sender, seq) = v["id"].as_str().unwrap().rsplit_once('/').unwrap();
        assert!(sender.starts_with("12D3"), "{sender}");
        seq.parse::<u64>().unwrap();
        assert!(ids.insert(v["id"].as_str().unwrap()), "ids are unique");
    }
}

/// A message nacked on each of its `--max-attempts` deliveries goes to the
/// dead-letter queue: `mesh dlq list` shows it with its attempts and
/// `mesh dlq replay` puts it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_listed_and_replayed() {
    let (_node, _, addr) = node_process().await;
    let sent = via(&addr, &["queue", "send", "fragile", "boom"]).await;
    assert!(sent.status.success());

    let failed = via(
        &addr,
        &[
            "queue",
            "consume",
            "fragile",
            "--fail-every",
            "1",
            "--max-attempts",
            "2",
            "--count",
            "2",
        ],
    )
    .await;
    assert!(failed.status.success());
    let failed = json_lines(&failed);
    assert_eq!(failed.len(), 2);
    for (v, attempt) in failed.iter().zip([1, 2]) {
        assert_eq!(v["payload"], "boom");
        assert_eq!(v["attempt"], attempt);
        assert_eq!(v["acked"], false);
    }

    // The last nack reaches the host asynchronously.
    let dead = common::eventually("the dead letter", || async {
        let out = via(&addr, &["dlq", "list", "fragile"]).await;
        let lines = json_lines(&out);
        (!lines.is_empty()).then_some(lines)
    })
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["queue"], "fragile.dlq");
    assert_eq!(dead[0]["payload"], "boom");
    assert_eq!(dead[0]["attempts"], 2);
    assert_eq!(dead[0]["error"], "nacked after 2 attempts");
    assert_eq!(dead[0]["id"], failed[0]["id"], "the same message");

    let replay = via(&addr, &["dlq", "replay", "fragile"]).await;
    assert!(replay.status.success());
    let said = String::from_utf8_lossy(&replay.stdout);
    assert!(said.starts_with("replayed 1 message(s)"), "{said}");

    // Back in the queue as a new message, at its first attempt.
    let again = via(&addr, &["queue", "consume", "fragile", "--count", "1"]).await;
    let again = json_lines(&again);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["payload"], "boom");
    assert_eq!(again[0]["attempt"], 1);
    let gone = via(&addr, &["dlq", "list", "fragile"]).await;
    assert!(
        json_lines(&gone).is_empty(),
        "the dead-letter queue is empty"
    );
}

/// `(partition, offset, payload)` of JSON lines that have them.
fn places(lines: &[serde_json::Value]) -> std::collections::BTreeSet<(String, u64, String)> {
    lines
        .iter()
        .map(|v| {
            (
                v["partition"].as_str().unwrap().to_owned(),
                v["offset"].as_u64().unwrap(),
                v["payload"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// `mesh stream append` processes hand records to the node, which hosts
/// them after they exit; `mesh stream read` processes replay them from the
/// earliest offset, or from an offset, as JSON lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_append_and_read_processes() {
    let (_node, node_id, addr) = node_process().await;
    let out = via(
        &addr,
        &["stream", "append", "readings", "r", "--count", "10"],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unkeyed = json_lines(&out);
    assert_eq!(unkeyed.len(), 10, "a line per record");
    for (i, v) in unkeyed.iter().enumerate() {
        assert_eq!(v["stream"], "readings");
        assert_eq!(v["payload"], format!("r-{i}"));
        let (host, index) = v["partition"].as_str().unwrap().rsplit_once('/').unwrap();
        assert_eq!(host, node_id, "the node hosts it, not the one-shot process");
        index.parse::<u32>().unwrap();
    }
    let out = via(
        &addr,
        &[
            "stream", "append", "readings", "k", "--key", "sensor-1", "--count", "3",
        ],
    )
    .await;
    assert!(out.status.success());
    let keyed = json_lines(&out);
    assert_eq!(keyed.len(), 3);
    assert!(
        keyed
            .iter()
            .all(|v| v["partition"] == keyed[0]["partition"]),
        "one key, one partition: {keyed:?}"
    );
    let appended: Vec<_> = unkeyed.iter().chain(&keyed).cloned().collect();
    let all = places(&appended);
    assert_eq!(all.len(), 13, "each record has its own place");

    let out = via(
        &addr,
        &[
            "stream", "read", "readings", "--from", "earliest", "--count", "13",
        ],
    )
    .await;
    assert!(out.status.success(), "--count 13: it exits by itself");
    let read = json_lines(&out);
    assert_eq!(places(&read), all, "every record, where append said");
    let mut last: std::collections::BTreeMap<String, u64> = Default::default();
    for v in &read {
        assert_eq!(v["stream"], "readings");
        assert_eq!(v["encoding"], "utf8");
        assert!(v["timestamp"].as_u64().unwrap() > 0);
        let payload = v["payload"].as_str().unwrap();
        let key = if payload.starts_with("k-") {
            "sensor-1"
        } else {
            ""
        };
        assert_eq!(v["key"], key, "{v}");
        let offset = v["offset"].as_u64().unwrap();
        if let Some(prev) = last.insert(v["partition"].as_str().unwrap().to_owned(), offset) {
            assert_eq!(
                offset,
                prev + 1,
                "offset order within a partition: {read:?}"
            );
        }
    }

    // From offset 5 of every partition.
    let from_5: std::collections::BTreeSet<_> =
        all.iter().filter(|(_, o, _)| *o >= 5).cloned().collect();
    let n = from_5.len().to_string();
    let out = via(
        &addr,
        &["stream", "read", "readings", "--from", "5", "--count", &n],
    )
    .await;
    assert!(out.status.success());
    assert_eq!(places(&json_lines(&out)), from_5);
}

/// A `mesh stream read --group` process commits what it printed: `mesh
/// stream info` shows the group's committed offsets with no lag, and the
/// next member of the group resumes after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_group_read_commits_and_info_shows_it() {
    let (_node, _, addr) = node_process().await;
    let out = via(&addr, &["stream", "append", "events", "e", "--count", "6"]).await;
    assert!(out.status.success());
    let appended = places(&json_lines(&out));

    let out = via(
        &addr,
        &[
            "stream", "read", "events", "--group", "audit", "--count", "6",
        ],
    )
    .await;
    assert!(out.status.success());
    assert_eq!(places(&json_lines(&out)), appended);

    // Commits reach the host ahead of the reader's goodbye; ask until the
    // answer shows them (a host that has not answered yet is left out).
    let info = common::eventually("the group's commits in stream info", || async {
        let out = via(&addr, &["stream", "info", "events", "--json"]).await;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["groups"][0]["lag"] == 0).then_some(v)
    })
    .await;
    assert_eq!(info["stream"], "events");
    assert_eq!(info["records"], 6);
    assert_eq!(info["groups"].as_array().unwrap().len(), 1);
    assert_eq!(info["groups"][0]["group"], "audit");
    let parts = info["partitions"].as_array().unwrap();
    let holding: Vec<_> = parts.iter().filter(|p| p["records"] != 0).collect();
    assert!(!holding.is_empty());
    for p in holding {
        assert_eq!(p["first"], 0);
        assert_eq!(p["records"], p["next"]);
        assert!(p["bytes"].as_u64().unwrap() > 0);
        assert_eq!(p["groups"][0]["group"], "audit");
        assert_eq!(p["groups"][0]["committed"], p["next"], "{p}");
        assert_eq!(p["groups"][0]["lag"], 0);
    }

    // Two more; the group resumes after its commits, with just those.
    let out = via(
        &addr,
        &["stream", "append", "events", "late", "--count", "2"],
    )
    .await;
    assert!(out.status.success());
    let late = places(&json_lines(&out));
    let out = via(
        &addr,
        &[
            "stream", "read", "events", "--group", "audit", "--count", "2",
        ],
    )
    .await;
    assert!(out.status.success());
    assert_eq!(places(&json_lines(&out)), late);

    // The text form says the same.
    let out = via(&addr, &["stream", "info", "events"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("stream events: "), "{text}");
    assert!(text.contains("8 record(s)"), "{text}");
}

/// A `mesh stream read --group` process reads a stream alone, a second
/// joins, and the first is SIGKILLed: the second takes over every
/// partition from the group's commits, so every record, those appended
/// after the kill too, reaches the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_group_member_s_partitions_move_to_the_other_process() {
    use std::{
        collections::BTreeSet,
        sync::{Arc, Mutex},
    };
    let (_node, _, addr) = node_process().await;
    let seen: Arc<Mutex<[BTreeSet<String>; 2]>> = Default::default();
    // The member counts each process logged its group assignment with.
    let views: Arc<Mutex<[BTreeSet<usize>; 2]>> = Default::default();
    let member = |i: usize| {
        let mut child = Command::new(BIN)
            .args(["stream", "read", "jobs", "--group", "workers"])
            .args(["--no-mdns", "--listen", LOOP, "--bootstrap", &addr])
            .env("RUST_LOG", "warn,mesh::engine::streams=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
                if let Some(p) = v["payload"].as_str() {
                    seen.lock().unwrap()[i].insert(p.to_owned());
                }
            }
        });
        let mut logs = BufReader::new(child.stderr.take().unwrap()).lines();
        let views = views.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = logs.next_line().await {
                if !line.contains("group assignment changed") {
                    continue;
                }
                let members = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("members=")?.parse().ok());
                if let Some(m) = members {
                    views.lock().unwrap()[i].insert(m);
                }
            }
        });
        child
    };
    let got = |range: std::ops::Range<u32>, who: &[usize]| {
        let s = seen.lock().unwrap();
        range
            .map(|n| format!("j-{n}"))
            .all(|p| who.iter().any(|i| s[*i].contains(&p)))
    };
    let mut a = member(0);
    let out = via(&addr, &["stream", "append", "jobs", "j", "--count", "40"]).await;
    assert!(out.status.success());
    common::eventually("the first member to read all 40", || async {
        got(0..40, &[0]).then_some(())
    })
    .await;
    let _b = member(1);
    // The second member has joined once it has assigned the partitions
    // over both members. (Its share may be empty: rendezvous hashing may
    // leave all four partitions with the first.)
    common::eventually("the second member to see both members", || async {
        views.lock().unwrap()[1].contains(&2).then_some(())
    })
    .await;
    a.start_kill().unwrap();
    let _ = a.wait().await;
    // Four appends: records without a key go round-robin per append, so
    // these fill every partition, those the killed member had too.
    for call in 0..4 {
        let msg = format!("k{call}");
        let out = via(&addr, &["stream", "append", "jobs", &msg, "--count", "10"]).await;
        assert!(out.status.success());
    }
    // The survivor reads every record appended after the kill, whichever
    // member had its partition.
    common::eventually(
        "the survivor to read every record appended after the kill",
        || async {
            let s = seen.lock().unwrap();
            (0..4)
                .all(|c| (0..10).all(|i| s[1].contains(&format!("k{c}-{i}"))))
                .then_some(())
        },
    )
    .await;
}

/// `mesh outbox status --json` for a data dir, parsed (None if it failed).
async fn outbox_status(dir: &std::path::Path) -> Option<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["outbox", "status", "--json", "--data-dir"])
        .arg(dir)
        .output()
        .await
        .unwrap();
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// `mesh queue send --durable` commits its messages to DIR/outbox.db (a
/// directory it creates, mode 0700), relays them to the node's queue and
/// exits once the host confirmed them; `mesh queue consume` then gets
/// each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_queue_send_then_consume() {
    let (_node, _, addr) = node_process().await;
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("data");
    let dir_arg = dir.to_str().unwrap();
    let sent = via(
        &addr,
        &[
            "queue",
            "send",
            "orders",
            "order",
            "--count",
            "4",
            "--durable",
            "--data-dir",
            dir_arg,
        ],
    )
    .await;
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "the data dir is its owner's alone");
    }
    let status = outbox_status(&dir).await.expect("outbox status runs");
    assert_eq!(status["pending"], 0, "{status}");
    assert_eq!(status["sent"], 4, "{status}");
    assert!(status["oldest_pending_us"].is_null());

    let got = via(&addr, &["queue", "consume", "orders", "--count", "4"]).await;
    assert!(got.status.success());
    let payloads: std::collections::BTreeSet<_> = json_lines(&got)
        .iter()
        .map(|v| v["payload"].as_str().unwrap().to_owned())
        .collect();
    let want: std::collections::BTreeSet<_> = (1..=4).map(|i| format!("order {i}")).collect();
    assert_eq!(payloads, want, "each message once");
}

/// A durable send with no peer to send to exits non-zero (75) saying its
/// messages are pending in DIR/outbox.db; `mesh outbox status` shows them;
/// a `mesh node --data-dir DIR` relays them (0 pending after), and a
/// consumer gets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_durable_sends_are_relayed_by_the_next_node() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("data");
    let out = Command::new(BIN)
        .args([
            "queue",
            "send",
            "invoices",
            "inv",
            "--count",
            "3",
            "--durable",
        ])
        .args(["--no-mdns", "--listen", LOOP, "--timeout", "0.5"])
        .env("MESH_DATA_DIR", &dir)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "a temporary failure");
    let err = String::from_utf8_lossy(&out.stderr);
    let file = dir.join("outbox.db");
    assert!(
        err.contains(&format!("3 message(s) still pending in {}", file.display())),
        "{err}"
    );
    assert!(
        err.contains(&format!("mesh node --data-dir {}", dir.display())),
        "{err}"
    );
    assert!(err.contains("nothing is lost"), "{err}");

    let status = outbox_status(&dir).await.expect("outbox status runs");
    assert_eq!(status["pending"], 3, "{status}");
    assert_eq!(status["sent"], 0);
    assert!(status["oldest_pending_us"].as_i64().unwrap() > 0);
    assert_eq!(
        status["by_destination"],
        serde_json::json!([{"destination": "queue:invoices", "pending": 3}])
    );
    // The text form says the same.
    let text = Command::new(BIN)
        .args(["outbox", "status", "--db"])
        .arg(&file)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("pending: 3"), "{text}");
    assert!(text.contains("queue:invoices  3"), "{text}");

    // A node on that data dir relays them (to itself: it hosts every queue).
    let mut node = Command::new(BIN)
        .args(["node", "--no-mdns", "--listen", LOOP, "--data-dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut node_out = BufReader::new(node.stdout.take().unwrap()).lines();
    let addr = line_with(&mut node_out, "listening:").await;
    tokio::spawn(async move { while let Ok(Some(_)) = node_out.next_line().await {} });
    common::eventually("the node to relay the pending messages", || async {
        let s = outbox_status(&dir).await?;
        (s["pending"] == 0 && s["sent"] == 3).then_some(())
    })
    .await;
    let got = via(&addr, &["queue", "consume", "invoices", "--count", "3"]).await;
    assert!(got.status.success());
    let mut payloads: Vec<_> = json_lines(&got)
        .iter()
        .map(|v| v["payload"].as_str().unwrap().to_owned())
        .collect();
    payloads.sort();
    assert_eq!(payloads, ["inv 1", "inv 2", "inv 3"]);
}

/// Rows an application enqueued with the library into its own database are
/// shown by `mesh outbox status --db FILE`, whatever else the file holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_status_reads_an_application_database() {
    use mesh::store::{Destination, Outbox};
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("app.db");
    let mut conn = mesh::store::open(&file).unwrap();
    conn.execute_batch("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
        .unwrap();
    let outbox = Outbox::install(&conn).unwrap();
    let tx = conn.transaction().unwrap();
    for i in 0..5u32 {
        outbox
            .enqueue(&tx, Destination::Queue("billing"), i.to_le_bytes())
            .unwrap();
    }
    outbox
        .enqueue(
            &tx,
            Destination::Stream {
                name: "audit",
                key: b"k",
            },
            b"x",
        )
        .unwrap();
    tx.commit().unwrap();
    let out = Command::new(BIN)
        .args(["outbox", "status", "--json", "--db"])
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pending"], 6);
    assert_eq!(
        v["by_destination"],
        serde_json::json!([
            {"destination": "queue:billing", "pending": 5},
            {"destination": "stream:audit", "pending": 1},
        ])
    );
}

/// An unknown overflow policy is refused before anything starts, naming
/// the ones there are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_overflow_policy_is_a_clear_error() {
    let out = Command::new(BIN)
        .args(["sub", "t", "--no-mdns", "--overflow", "drop-newest"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("backpressure, drop-oldest or disconnect"),
        "{err}"
    );
}

/// A missing outbox is a clear error; a corrupt one gives the store's
/// typed message, from `outbox status`, from a durable send and from `mesh
/// node --data-dir`, and the file is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_corrupt_outboxes_are_clear_errors() {
    let scratch = tempfile::tempdir().unwrap();
    let empty = scratch.path().join("empty");
    let out = Command::new(BIN)
        .args(["outbox", "status", "--data-dir"])
        .arg(&empty)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no such file, so no outbox there"), "{err}");
    assert!(!empty.exists(), "looking creates nothing");

    let dir = scratch.path().join("bad");
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join("outbox.db");
    let junk = vec![0x5a_u8; 8192];
    std::fs::write(&file, &junk).unwrap();
    let corrupt = "not a database, or corrupt";
    let out = Command::new(BIN)
        .args(["outbox", "status", "--data-dir"])
        .arg(&dir)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(corrupt), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");

    let out = Command::new(BIN)
        .args(["queue", "send", "q", "m", "--durable", "--data-dir"])
        .arg(&dir)
        .args(["--no-mdns", "--listen", LOOP, "--timeout", "0.5"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "a refusal, not a pending send");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(corrupt), "{err}");

    let node = Command::new(BIN)
        .args(["node", "--no-mdns", "--listen", LOOP, "--data-dir"])
        .arg(&dir)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, node)
        .await
        .expect("the node exits at once")
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(corrupt), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), junk, "the file is untouched");
}

/// `mesh bench outbox` runs end to end (every message acked once, nothing
/// left pending), also through an inbox; figures are not checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_outbox_runs() {
    for extra in [&[][..], &["--inbox", "--host", "consumer"][..]] {
        let out = Command::new(BIN)
            .args([
                "bench",
                "outbox",
                "--messages",
                "3000",
                "--tx-rows",
                "500",
                "--json",
            ])
            .args(extra)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(WAIT, out)
            .await
            .expect("the bench finishes in time")
            .unwrap();
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = json_lines(&out).pop().unwrap();
        assert_eq!(v["bench"], "outbox");
        assert_eq!(v["acked"], 3000, "{v}");
        assert_eq!(v["consumer_unique"], 3000, "{v}");
        assert_eq!(v["consumer_duplicates"], 0, "{v}");
        assert_eq!(v["pending_after"], 0, "{v}");
        assert_eq!(v["inbox"], !extra.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_node_admits_only_holders_of_the_secret_and_never_logs_it() {
    use std::os::unix::fs::PermissionsExt;
    const SECRET: &str = "cli test secret of the private mesh";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.secret");
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    // A secret file others may read is refused, with the reason.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(BIN)
        .args(["peers", "--no-mdns", "--listen", LOOP])
        .env("MESH_SECRET_FILE", &file)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let data = dir.path().join("node");
    let mut node = Command::new(BIN)
        .args(["node", "--no-mdns", "--listen", LOOP, "--secret-file"])
        .arg(&file)
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut err = BufReader::new(node.stderr.take().unwrap()).lines();
    let logs = tokio::spawn(async move {
        let mut all = String::new();
        while let Ok(Some(l)) = err.next_line().await {
            all.push_str(&l);
            all.push('\n');
        }
        all
    });
    line_with(&mut out, "peer id:").await;
    let addr = line_with(&mut out, "listening:").await;
    // The identity key is private to the user.
    let mode = std::fs::metadata(data.join("identity.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Without the secret: no peer found. With it (from the environment):
    // the node is there.
    let outside = via(&addr, &["peers", "--json", "--timeout", "2"]).await;
    assert!(!outside.status.success());
    let inside = Command::new(BIN)
        .args([
            "peers",
            "--json",
            "--no-mdns",
            "--listen",
            LOOP,
            "--bootstrap",
            &addr,
        ])
        .env("MESH_SECRET", SECRET)
        .env("RUST_LOG", "debug")
        .output()
        .await
        .unwrap();
    assert!(
        inside.status.success(),
        "{}",
        String::from_utf8_lossy(&inside.stderr)
    );
    let peers: serde_json::Value = serde_json::from_slice(&inside.stdout).unwrap();
    assert!(peers
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["state"] == "alive"));

    node.kill().await.unwrap();
    let logs = logs.await.unwrap();
    assert!(
        logs.contains("not admitted to this private mesh"),
        "the refusal is logged"
    );
    for text in [logs.as_str(), &String::from_utf8_lossy(&inside.stderr)] {
        assert!(!text.contains(SECRET), "the secret was logged");
    }
}

/// `mesh node --metrics-addr` serves its metrics; `mesh stats` prints
/// them as JSON and as a table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_metrics_addr_and_stats() {
    let mut node = Command::new(BIN)
        .args(["node", "--no-mdns", "--listen", LOOP])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(node.stdout.take().unwrap()).lines();
    let id = line_with(&mut out, "peer id:").await;
    let addr = line_with(&mut out, "listening:").await;
    let metrics = line_with(&mut out, "metrics:").await;
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });

    // The send resolves once the node (the queue's host) accepted it.
    let sent = via(&addr, &["queue", "send", "jobs", "hello"]).await;
    assert!(sent.status.success(), "{sent:?}");

    let stats = |json: bool| {
        let mut c = Command::new(BIN);
        c.args(["stats", "--metrics-addr", &metrics]);
        if json {
            c.arg("--json");
        }
        c.kill_on_drop(true).output()
    };
    let out = tokio::time::timeout(WAIT, stats(true))
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let m = &json_lines(&out)[0];
    assert_eq!(m["node"], id.as_str());
    assert_eq!(m["queues"]["accepted"], 1, "{m}");
    assert_eq!(m["hosted_queues"][0]["name"], "jobs");
    assert_eq!(m["hosted_queues"][0]["depth"], 1);
    assert_eq!(m["dropped"]["auth_refused"], 0);

    let out = tokio::time::timeout(WAIT, stats(false))
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with(&format!("node {id}")), "{table}");
    for row in [
        "peers ",
        "links ",
        "pubsub ",
        "queues ",
        "accepted 1",
        "dropped ",
    ] {
        assert!(table.contains(row), "no {row:?} in:\n{table}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["jobs", "1", "0", "0", "0"]),
        "{table}"
    );

    // A wrong address is a clear error.
    let out = Command::new(BIN)
        .args(["stats", "--metrics-addr", "127.0.0.1:1"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
    node.kill().await.unwrap();
}
