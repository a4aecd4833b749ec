//! Shared-memory rings between real processes: the test binary runs itself
//! as the other side (`child` below, selected by an environment variable).

#![cfg(unix)]

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Instant,
};

use mesh_transports::shm::{self, Ring, Role, ShmError, WaitPolicy};

const CHILD_ENV: &str = "MESH_SHM_TEST_CHILD";

/// Record `i`: 8 bytes of `i`, then 0 to 192 bytes of a fill derived from
/// `i`, so every length from 8 to 200 and every wrap position occur.
fn record(i: u64, buf: &mut Vec<u8>) {
    let len = 8 + (i.wrapping_mul(7919) % 193) as usize;
    buf.clear();
    buf.extend_from_slice(&i.to_le_bytes());
    buf.resize(len, (i as u8) ^ 0x5a);
}

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// Where the tests make rings: the default directory (files are unlinked
/// as soon as both sides have them, so nothing is left behind).
fn dir() -> PathBuf {
    shm::default_dir()
}

/// A private directory for tests that scan one, removed when dropped.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("mesh-shm-proc-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        TestDir(d)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spawn_child(
    role: &str,
    path: &Path,
    nonce: u64,
    count: u64,
) -> (Child, impl Iterator<Item = String>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(
            CHILD_ENV,
            format!("{role}|{}|{nonce}|{count}", path.display()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let lines = out
        .lines()
        .map_while(Result::ok)
        // libtest's "test child ... " may precede the first line.
        .filter_map(|l| l.find("CHILD ").map(|at| l[at + 6..].to_owned()));
    (child, lines)
}

fn say(what: &str) {
    println!("CHILD {what}");
    std::io::stdout().flush().unwrap();
}

/// The other process. Roles: `read` (check `count` records, report the
/// checksum), `write` (write records without end, until killed), `create`
/// (make a ring and wait to be killed).
#[test]
fn child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let (role, path, nonce, count) = (
        parts[0],
        Path::new(parts[1]),
        parts[2].parse::<u64>().unwrap(),
        parts[3].parse::<u64>().unwrap(),
    );
    match role {
        "read" => {
            let mut rx = Ring::open(path, nonce, Role::Consumer)
                .unwrap()
                .consumer(WaitPolicy::default())
                .unwrap();
            say("READY");
            let (mut seen, mut sum, mut bad) = (0u64, FNV_START, 0u64);
            let mut expected = Vec::new();
            while seen < count {
                let n = rx
                    .poll_blocking(usize::MAX, |r| {
                        record(seen, &mut expected);
                        if r != &expected[..] {
                            bad += 1;
                        }
                        sum = fnv(sum, r);
                        seen += 1;
                        if seen == 1 {
                            say("FIRST");
                        }
                        true
                    })
                    .unwrap();
                assert!(n > 0, "writer closed early at {seen}");
            }
            say(&format!("DONE {seen} {bad} {sum:016x}"));
        }
        "write" => {
            let mut tx = Ring::open(path, nonce, Role::Producer)
                .unwrap()
                .producer(WaitPolicy::default())
                .unwrap();
            say("READY");
            let mut buf = Vec::new();
            for i in 0.. {
                record(i, &mut buf);
                tx.push(&buf).unwrap();
                if i % 16 == 15 {
                    tx.flush();
                }
            }
        }
        "create" => {
            let ring = Ring::create(path, 4096, nonce, Role::Producer).unwrap();
            say(&format!("PATH {}", ring.path().display()));
            std::thread::park();
        }
        other => panic!("unknown child role {other}"),
    }
    std::process::exit(0);
}

#[test]
fn ten_million_variable_records_between_processes() {
    const COUNT: u64 = 10_000_000;
    let ring = Ring::create(&dir(), 1 << 16, 11, Role::Producer).unwrap();
    let (mut child, mut lines) = spawn_child("read", ring.path(), 11, COUNT);
    assert_eq!(lines.next().as_deref(), Some("READY"));
    let mut tx = ring.producer(WaitPolicy::default()).unwrap();
    let mut sum = FNV_START;
    let mut buf = Vec::new();
    for i in 0..COUNT {
        record(i, &mut buf);
        sum = fnv(sum, &buf);
        tx.push(&buf).unwrap();
        if i % 16 == 15 {
            tx.flush();
        }
    }
    tx.flush();
    let done = lines
        .find(|l| l.starts_with("DONE"))
        .expect("child reports");
    assert_eq!(
        done,
        format!("DONE {COUNT} 0 {sum:016x}"),
        "count, mismatches, checksum"
    );
    assert!(child.wait().unwrap().success());
}

#[test]
fn killed_reader_fails_the_writer_with_peer_dead() {
    let ring = Ring::create(&dir(), 1 << 16, 12, Role::Producer).unwrap();
    let path = ring.path().to_owned();
    let (mut child, mut lines) = spawn_child("read", &path, 12, u64::MAX);
    assert_eq!(lines.next().as_deref(), Some("READY"));
    assert!(!path.exists(), "the opener removed the file");
    let mut tx = ring.producer(WaitPolicy::default()).unwrap();
    let mut buf = Vec::new();
    record(0, &mut buf);
    tx.push(&buf).unwrap();
    tx.flush();
    assert_eq!(lines.next().as_deref(), Some("FIRST"));
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    // Nobody reads any more: the ring fills, and the wait for space finds
    // the reader gone instead of blocking for ever.
    let err = (1..)
        .find_map(|i| {
            record(i, &mut buf);
            tx.push(&buf).err()
        })
        .unwrap();
    assert!(matches!(err, ShmError::PeerDead { .. }), "{err}");
    println!(
        "dead reader noticed {:?} after the kill: {err}",
        killed.elapsed()
    );
}

#[test]
fn killed_writer_is_noticed_after_its_last_record() {
    let ring = Ring::create(&dir(), 1 << 16, 13, Role::Consumer).unwrap();
    let (mut child, mut lines) = spawn_child("write", ring.path(), 13, 0);
    assert_eq!(lines.next().as_deref(), Some("READY"));
    let mut rx = ring.consumer(WaitPolicy::default()).unwrap();
    let mut seen = 0u64;
    let mut expected = Vec::new();
    let mut check = |r: &[u8], seen: &mut u64| {
        record(*seen, &mut expected);
        assert_eq!(r, &expected[..], "record {seen} intact and in order");
        *seen += 1;
        true
    };
    while seen < 100_000 {
        rx.poll_blocking(usize::MAX, |r| check(r, &mut seen))
            .unwrap();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    // Everything the writer published before dying is still read, in
    // order; then the wait for more reports the writer dead.
    let err = loop {
        match rx.poll_blocking(usize::MAX, |r| check(r, &mut seen)) {
            Ok(n) => assert!(n > 0, "a killed writer does not close cleanly"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, ShmError::PeerDead { .. }), "{err}");
    println!(
        "dead writer noticed {:?} after the kill, {seen} records read: {err}",
        killed.elapsed()
    );
}

#[test]
fn rings_of_a_killed_creator_are_cleaned_at_start() {
    let guard = TestDir::new("stale");
    let d = guard.0.clone();
    let (mut child, mut lines) = spawn_child("create", &d, 14, 0);
    let path = PathBuf::from(
        lines
            .next()
            .and_then(|l| l.strip_prefix("PATH ").map(str::to_owned))
            .unwrap(),
    );
    assert!(path.exists());
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(shm::remove_stale(&d), 1);
    assert!(!path.exists());
    // Opening it now fails with a clear error rather than hanging.
    assert!(Ring::open(&path, 14, Role::Consumer).is_err());
}
