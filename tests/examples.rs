//! The examples that check something run as tests too, so they stay true.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

#[path = "../examples/partition_test.rs"]
mod partition_test;

#[test]
fn partition_test_example() {
    partition_test::main();
}

/// Builds example `name` with this test's profile and returns its path.
/// (An example that starts itself as other processes cannot run inside
/// the test binary, and cargo builds examples for `cargo test` only when
/// no target is selected.)
fn example(name: &str) -> PathBuf {
    // This binary is TARGET/PROFILE/deps/examples-HASH.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let mut build = std::process::Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()));
    build.args([
        "build",
        "--quiet",
        "--manifest-path",
        concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
        "--example",
        name,
    ]);
    match profile_dir.file_name().and_then(|p| p.to_str()) {
        Some("debug") => {}
        Some("release") => {
            build.arg("--release");
        }
        Some(other) => {
            build.args(["--profile", other]);
        }
        None => panic!("no profile directory in {}", exe.display()),
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "cargo build --example {name}: {status}");
    let path = profile_dir
        .join("examples")
        .join(name)
        .with_extension(std::env::consts::EXE_EXTENSION);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A host, three worker processes and a producer process: every job done
/// once, the poison job in the dead-letter queue after three attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_queue_example() {
    let exe = example("work_queue");
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
    let exe = example("event_stream");
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
