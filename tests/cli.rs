//! The `mesh` binary as separate processes: node, sub, pub.

mod common;

use std::{process::Stdio, time::Duration};

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
    let mut node = Command::new(BIN)
        .args(["node", "--no-mdns", "--listen", LOOP])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut node_out = BufReader::new(node.stdout.take().unwrap()).lines();
    let node_id = line_with(&mut node_out, "peer id:").await;
    let addr = line_with(&mut node_out, "listening:").await;
    assert!(
        addr.ends_with(&format!("/p2p/{node_id}")),
        "{addr} is dialable"
    );
    tokio::spawn(async move { while let Ok(Some(_)) = node_out.next_line().await {} });

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
        .status()
        .await
        .unwrap();
    assert!(status.success());
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
        .status()
        .await
        .unwrap();
    assert!(status.success());

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
    let _ = Duration::ZERO;
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
