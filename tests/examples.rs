//! The examples that check something run as tests too, so they stay true.

use std::time::Duration;

mod common;

#[path = "../examples/partition_test.rs"]
mod partition_test;

#[test]
fn partition_test_example() {
    partition_test::main();
}

/// A host, three worker processes and a producer process: every job done
/// once, the poison job in the dead-letter queue after three attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_queue_example() {
    let exe = common::example("work_queue");
    let run = tokio::process::Command::new(&exe)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the example finishes in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = stdout
        .lines()
        .find(|l| l.starts_with("ok: "))
        .unwrap_or_else(|| panic!("no ok line in:\n{stdout}"));
    assert!(
        ok.starts_with("ok: 29 jobs done by 3 competing workers"),
        "{ok}"
    );
    assert!(
        ok.contains("the poison job is in jobs.dlq after 3 attempts"),
        "{ok}"
    );
    assert!(stdout.contains("jobs per worker (competing consumers): w1 "));
}

/// A host, an aggregator process and three sensor processes: every
/// reading read once, every (window, sensor) average as computed from
/// the readings, none late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_example() {
    let exe = common::example("event_stream");
    let run = tokio::process::Command::new(&exe)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the example finishes in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = stdout
        .lines()
        .find(|l| l.starts_with("ok: "))
        .unwrap_or_else(|| panic!("no ok line in:\n{stdout}"));
    assert!(
        ok.starts_with("ok: 3 sensors x 15 readings, 9 window averages, each as computed from the readings; none late"),
        "{ok}"
    );
    assert!(stdout.contains("summary: average per sensor and 1 s window of event time"));
}

/// A host, a producer process writing orders through the SQLite outbox
/// (killed with SIGKILL half-way and restarted) and a consumer process
/// processing them through the inbox: each order processed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_orders_example() {
    let exe = common::example("outbox_orders");
    let run = tokio::process::Command::new(&exe)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the example finishes in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = stdout
        .lines()
        .find(|l| l.starts_with("ok: "))
        .unwrap_or_else(|| panic!("no ok line in:\n{stdout}"));
    assert!(
        ok.starts_with("ok: 2000 orders committed with their events in one transaction"),
        "{ok}"
    );
    assert!(ok.contains("each order processed exactly once"), "{ok}");
    assert!(
        stdout.contains("duplicates processed 0, lost 0"),
        "{stdout}"
    );
}
