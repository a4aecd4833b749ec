//! A real partition between real processes: three network namespaces on a
//! bridge, a `mesh node` hub in `a`, a publisher in `b`, and in `c` a
//! reliable and a best-effort subscriber. The test takes `c` off the bridge
//! while `b` publishes, waits until the hub has declared `c`'s peers down,
//! puts it back, and counts what each subscriber got: the reliable one must
//! have every message exactly once, in order. Needs root and `ip`; skipped
//! with a printed reason otherwise. Namespaces and bridge are removed
//! afterwards, even on failure.

mod netns_common;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Stdio},
    sync::mpsc,
    time::Duration,
};

use netns_common::{unavailable, Net};

const MESSAGES: u64 = 300;

/// Kills its process when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` and forwards its stdout lines to a channel.
fn spawn_lines(mut cmd: std::process::Command) -> (Proc, mpsc::Receiver<String>) {
    cmd.stderr(Stdio::null());
    spawn_lines_keeping_stderr(cmd)
}

/// [`spawn_lines`], with stderr as the caller set it.
fn spawn_lines_keeping_stderr(mut cmd: std::process::Command) -> (Proc, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("start mesh in a namespace");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Proc(child), rx)
}

/// Lines until `done(line)` holds, or fails after `limit`.
fn until(
    rx: &mpsc::Receiver<String>,
    limit: Duration,
    mut done: impl FnMut(&str) -> bool,
    what: &str,
) -> Vec<String> {
    let deadline = std::time::Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let stop = done(&line);
                seen.push(line);
                if stop {
                    return seen;
                }
            }
            Err(_) => panic!(
                "timed out waiting for {what}; saw {} lines: {:?}",
                seen.len(),
                seen.iter().rev().take(5).collect::<Vec<_>>()
            ),
        }
    }
}

/// Message numbers from `mesh sub` JSON lines ("m N" payloads), and lagged counts.
fn numbers(lines: &[String]) -> (Vec<u64>, u64) {
    let mut nums = Vec::new();
    let mut lagged = 0;
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
        if let Some(n) = v["lagged"].as_u64() {
            lagged += n;
        } else if let Some(p) = v["payload"].as_str() {
            nums.push(
                p.trim_start_matches("m ")
                    .parse()
                    .expect("numbered payload"),
            );
        }
    }
    (nums, lagged)
}

/// Lost, duplicated and out-of-order counts against 1..=MESSAGES.
fn counters(nums: &[u64]) -> (u64, u64, u64) {
    let mut seen = std::collections::BTreeSet::new();
    let (mut dup, mut ooo, mut last) = (0, 0, 0);
    for &n in nums {
        if !seen.insert(n) {
            dup += 1;
        } else if n < last {
            ooo += 1;
        }
        last = last.max(n);
    }
    let lost = (1..=MESSAGES).filter(|n| !seen.contains(n)).count() as u64;
    (lost, dup, ooo)
}

#[test]
fn partition_between_processes_loses_nothing_for_a_reliable_subscriber() {
    if let Some(why) = unavailable() {
        eprintln!("SKIPPED partition_between_processes: {why}");
        return;
    }
    let net = match Net::new(&["a", "b", "c"]) {
        Ok(net) => net,
        Err(step) => {
            eprintln!(
                "SKIPPED partition_between_processes: cannot create namespaces ({step} failed)"
            );
            return;
        }
    };

    let mut hub = net.mesh("a");
    hub.args(["node", "--no-mdns", "--listen", &net.listen("a")]);
    let (_hub, hub_out) = spawn_lines(hub);
    let lines = until(
        &hub_out,
        Duration::from_secs(20),
        |l| l.starts_with("listening: "),
        "the hub's address",
    );
    let hub_addr = lines
        .last()
        .unwrap()
        .trim_start_matches("listening: ")
        .to_owned();

    let sub = |reliable: bool| {
        let mut c = net.mesh("c");
        c.args([
            "sub",
            "part.>",
            "--no-mdns",
            "--listen",
            &net.listen("c"),
            "--bootstrap",
            &hub_addr,
        ]);
        if reliable {
            c.arg("--reliable");
        }
        spawn_lines(c)
    };
    let (_reliable, reliable_out) = sub(true);
    let (_plain, plain_out) = sub(false);
    // Both subscribers joined: the hub sees three peers... count "alive" lines.
    until(
        &hub_out,
        Duration::from_secs(20),
        {
            let mut alive = 0;
            move |l| {
                alive += usize::from(l.ends_with(" alive"));
                alive >= 2
            }
        },
        "two subscribers to join",
    );

    let mut publisher = net.mesh("b");
    publisher.args([
        "pub",
        "part.x",
        "m",
        "--count",
        &MESSAGES.to_string(),
        "--interval-ms",
        "50",
        "--no-mdns",
        "--listen",
        &net.listen("b"),
        "--bootstrap",
        &hub_addr,
    ]);
    let pub_err = std::env::temp_dir().join(format!("mesh-netns-pub-{}.err", std::process::id()));
    publisher.stderr(std::fs::File::create(&pub_err).unwrap());
    let (mut publisher, pub_out) = spawn_lines_keeping_stderr(publisher);

    // Some messages arrive, then c is cut off while b goes on publishing.
    let mut got = until(
        &reliable_out,
        Duration::from_secs(30),
        |l| l.contains("\"m 30\""),
        "the first messages",
    );
    assert!(net.set_connected("c", false), "cut c off");
    until(
        &hub_out,
        Duration::from_secs(30),
        {
            let mut down = 0;
            move |l| {
                down += usize::from(l.ends_with(" down"));
                down >= 2
            }
        },
        "the hub to declare c's peers down",
    );
    assert!(net.set_connected("c", true), "reconnect c");

    // The publisher's stdout closes when it exits.
    match pub_out.recv_timeout(Duration::from_secs(90)) {
        Err(mpsc::RecvTimeoutError::Disconnected) => {}
        other => panic!("publisher did not finish: {other:?}"),
    }
    let status = publisher.0.wait().unwrap();
    let stderr = std::fs::read_to_string(&pub_err).unwrap_or_default();
    let _ = std::fs::remove_file(&pub_err);
    assert!(status.success(), "publisher failed: {status}: {stderr}");

    let last = format!("\"m {MESSAGES}\"");
    got.extend(until(
        &reliable_out,
        Duration::from_secs(60),
        |l| l.contains(&last),
        "the reliable subscriber to catch up",
    ));
    let (nums, lagged) = numbers(&got);
    let (lost, dup, ooo) = counters(&nums);
    eprintln!("reliable subscriber: received {} lost {lost} duplicated {dup} out-of-order {ooo} lagged {lagged}", nums.len());
    assert_eq!((lost, dup, ooo, lagged), (0, 0, 0, 0));

    // The best-effort one may have lost the partition's messages; it must
    // not have duplicated or reordered any.
    let plain: Vec<String> = plain_out.try_iter().collect();
    let (nums, _) = numbers(&plain);
    let (lost, dup, ooo) = counters(&nums);
    eprintln!(
        "best-effort subscriber: received {} lost {lost} duplicated {dup} out-of-order {ooo}",
        nums.len()
    );
    assert_eq!((dup, ooo), (0, 0));
    drop(net);
}
