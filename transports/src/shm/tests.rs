use std::os::unix::fs::PermissionsExt;

use super::*;

/// Where the tests make rings: the default directory (files are unlinked
/// as soon as both sides have them, so nothing is left behind).
fn dir() -> PathBuf {
    default_dir()
}

/// A private directory for tests that scan one, removed when dropped.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("mesh-shm-unit-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        TestDir(d)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pair(cap: usize) -> (Producer, Consumer) {
    let ring = Ring::create(&dir(), cap, 7, Role::Producer).unwrap();
    let other = Ring::open(ring.path(), 7, Role::Consumer).unwrap();
    (
        ring.producer(WaitPolicy::default()).unwrap(),
        other.consumer(WaitPolicy::default()).unwrap(),
    )
}

#[test]
fn create_open_and_pass_records() {
    let (mut tx, mut rx) = pair(4096);
    for i in 0..100u32 {
        tx.push(&i.to_le_bytes()).unwrap();
    }
    tx.flush();
    let mut got = Vec::new();
    while got.len() < 100 {
        rx.poll_blocking(usize::MAX, |r| {
            got.push(u32::from_le_bytes(r.try_into().unwrap()));
            true
        })
        .unwrap();
    }
    assert_eq!(got, (0..100).collect::<Vec<_>>());
}

#[test]
fn file_is_private_and_gone_once_opened() {
    let ring = Ring::create(&dir(), 4096, 1, Role::Producer).unwrap();
    let path = ring.path().to_owned();
    let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let _other = Ring::open(&path, 1, Role::Consumer).unwrap();
    assert!(!path.exists(), "the opener unlinks the file");
}

#[test]
fn creator_drop_removes_an_unopened_file() {
    let ring = Ring::create(&dir(), 4096, 1, Role::Producer).unwrap();
    let path = ring.path().to_owned();
    assert!(path.exists());
    drop(ring);
    assert!(!path.exists());
}

#[test]
fn open_refuses_wrong_nonce_side_mode_and_garbage() {
    let ring = Ring::create(&dir(), 4096, 5, Role::Producer).unwrap();
    let err = Ring::open(ring.path(), 6, Role::Consumer).unwrap_err();
    assert!(err.to_string().contains("nonce"), "{err}");
    let err = Ring::open(ring.path(), 5, Role::Producer).unwrap_err();
    assert!(err.to_string().contains("already taken"), "{err}");

    std::fs::set_permissions(ring.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Ring::open(ring.path(), 5, Role::Consumer).unwrap_err();
    assert!(err.to_string().contains("mode 644"), "{err}");

    let junk = dir().join(format!("mesh-junk-{}.ring", std::process::id()));
    std::fs::write(&junk, vec![0x55u8; HEADER_SIZE + 4096]).unwrap();
    std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = Ring::open(&junk, 5, Role::Consumer).unwrap_err();
    assert!(err.to_string().contains("bad magic"), "{err}");
    std::fs::write(&junk, vec![0u8; 100]).unwrap();
    let err = Ring::open(&junk, 5, Role::Consumer).unwrap_err();
    assert!(err.to_string().contains("size 100"), "{err}");
    std::fs::remove_file(&junk).unwrap();
    assert!(Ring::open(&junk, 5, Role::Consumer).is_err());
}

#[test]
fn bad_capacity_is_refused() {
    for cap in [0, 100, 32, MAX_CAPACITY * 2] {
        assert!(matches!(
            Ring::create(&dir(), cap, 1, Role::Producer),
            Err(ShmError::BadCapacity(_))
        ));
    }
}

#[test]
fn record_larger_than_the_ring_is_a_typed_error() {
    let (mut tx, _rx) = pair(4096);
    let err = tx.push(&vec![0; 4096]).unwrap_err();
    assert!(
        matches!(
            err,
            ShmError::Ring(RingError::TooLarge {
                len: 4096,
                max: 2040
            })
        ),
        "{err}"
    );
}

#[test]
fn corrupt_position_closes_with_an_error() {
    let (tx, mut rx) = pair(4096);
    // A hostile producer moves its position past the ring.
    tx.map.u64_at(OFF_TAIL).store(1 << 40, Ordering::Release);
    let err = rx.try_poll(usize::MAX, |_| true).unwrap_err();
    assert!(
        matches!(err, ShmError::Ring(RingError::Corrupt(_))),
        "{err}"
    );
}

#[test]
fn full_ring_blocks_the_producer_until_read() {
    let (mut tx, mut rx) = pair(4096);
    let writer = std::thread::spawn(move || {
        for i in 0..10_000u32 {
            tx.push(&[i as u8; 100]).unwrap();
        }
        tx.flush();
    });
    let mut n = 0u32;
    while n < 10_000 {
        rx.poll_blocking(usize::MAX, |r| {
            assert_eq!(r, &[n as u8; 100][..], "record {n}: nothing overwritten");
            n += 1;
            true
        })
        .unwrap();
    }
    writer.join().unwrap();
}

#[test]
fn close_is_seen_after_the_last_record() {
    let (mut tx, mut rx) = pair(4096);
    tx.push(b"last").unwrap();
    drop(tx);
    let mut got = Vec::new();
    let n = rx
        .poll_blocking(usize::MAX, |r| {
            got.push(r.to_vec());
            true
        })
        .unwrap();
    assert_eq!((n, got), (1, vec![b"last".to_vec()]));
    assert_eq!(rx.poll_blocking(usize::MAX, |_| true).unwrap(), 0, "closed");
}

#[test]
fn consumer_close_fails_the_waiting_producer() {
    let (mut tx, rx) = pair(4096);
    drop(rx);
    let mut result = Ok(());
    for _ in 0..100 {
        result = tx.push(&[0; 1000]);
        if result.is_err() {
            break;
        }
    }
    assert!(matches!(result, Err(ShmError::Closed)), "{result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_write_all_and_read_into() {
    let (mut tx, mut rx) = pair(4096);
    let total: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let expected = total.clone();
    let writer = tokio::spawn(async move {
        tx.write_all(&total, 1000).await.unwrap();
    });
    let mut got = BytesMut::new();
    while got.len() < expected.len() {
        assert!(rx.read_into(&mut got, 64 * 1024).await.unwrap());
    }
    writer.await.unwrap();
    assert_eq!(&got[..], &expected[..]);
    // The writer dropped its end: the reader sees the end.
    assert!(!rx.read_into(&mut got, 1024).await.unwrap());
}

#[test]
fn stale_files_of_dead_processes_are_removed() {
    let guard = TestDir::new("stale");
    let d = guard.0.clone();
    let live = Ring::create(&d, 4096, 3, Role::Producer).unwrap();
    // A ring whose creator "died": our file, with a creator pid that does
    // not exist.
    let dead = Ring::create(&d, 4096, 4, Role::Producer).unwrap();
    dead.map
        .u32_at(OFF_CREATOR_PID)
        .store(i32::MAX as u32 - 1, Ordering::Relaxed);
    let dead_path = dead.path().to_owned();
    std::mem::forget(dead); // as a crash would: no unlink
    assert_eq!(remove_stale(&d), 1);
    assert!(!dead_path.exists());
    assert!(live.path().exists(), "a live process's ring stays");
}

#[test]
fn host_id_is_stable() {
    assert_eq!(host_id(), host_id());
    assert!(!host_id().is_empty());
}

#[test]
fn pid_liveness_tells_a_reused_pid_apart() {
    let me = std::process::id();
    let start = sys::process_start(me).expect("our own start time");
    assert!(sys::pid_alive(me, start));
    assert!(sys::pid_alive(me, 0), "start unknown: the pid decides");
    assert!(
        !sys::pid_alive(me, start + 1),
        "another process with our pid"
    );
    assert!(!sys::pid_alive(i32::MAX as u32 - 1, 0));
}

#[test]
fn open_refuses_a_ring_already_in_use() {
    let ring = Ring::create(&dir(), 4096, 9, Role::Producer).unwrap();
    ring.map.u64_at(OFF_TAIL).store(8, Ordering::Release);
    let err = Ring::open(ring.path(), 9, Role::Consumer).unwrap_err();
    assert!(err.to_string().contains("already in use"), "{err}");
}

#[test]
fn ring_names_do_not_reveal_the_nonce() {
    let ring = Ring::create(&dir(), 4096, 0x1234_5678_9abc_def0, Role::Producer).unwrap();
    let name = ring
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(!name.contains("123456789abcdef0"), "{name}");
}

/// A peer offers ring paths: only ring files directly in our ring
/// directory are opened, never through a symlink, a `..`, another
/// directory, or a file that is not a regular file of a ring's size.
#[test]
fn offered_paths_are_confined_to_the_ring_directory() {
    let ours = TestDir::new("confine-ours");
    let theirs = TestDir::new("confine-theirs");
    let refused = |path: &Path| match Ring::open_in(&ours.0, path, 9, Role::Consumer) {
        Err(ShmError::BadFile { reason, .. }) => reason,
        Err(e) => panic!("{}: expected BadFile, got {e}", path.display()),
        Ok(_) => panic!("{}: opened", path.display()),
    };
    // A genuine ring elsewhere: refused, though it is a valid ring.
    let elsewhere = Ring::create(&theirs.0, 4096, 9, Role::Producer).unwrap();
    assert!(refused(elsewhere.path()).contains("ring directory"));
    // The same through `..` from our directory.
    let name = elsewhere.path().file_name().unwrap().to_owned();
    let dotted = ours
        .0
        .join("..")
        .join(theirs.0.file_name().unwrap())
        .join(&name);
    assert!(refused(&dotted).contains("ring directory"));
    // A symlink in our directory to it.
    let link = ours.0.join("mesh-link-1-0.ring");
    std::os::unix::fs::symlink(elsewhere.path(), &link).unwrap();
    assert!(refused(&link).contains("symlink"));
    // A FIFO named as a ring: refused without blocking.
    let fifo = ours.0.join("mesh-fifo-1-0.ring");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string; mkfifo only creates a file.
    #[allow(unsafe_code)]
    let made = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(made, 0);
    assert!(refused(&fifo).contains("regular"));
    // A ring-named file of the wrong size (a ring cut short before it was
    // opened): refused before anything is mapped, so no SIGBUS.
    let short = ours.0.join("mesh-short-1-0.ring");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&short)
        .unwrap()
        .set_len(100)
        .unwrap();
    assert!(refused(&short).contains("size"));
    // Not a ring name.
    assert!(refused(&ours.0.join("passwd")).contains("name"));
    // The genuine case still opens.
    let good = Ring::create(&ours.0, 4096, 9, Role::Producer).unwrap();
    Ring::open_in(&ours.0, good.path(), 9, Role::Consumer).expect("a ring in our directory");
}

/// A peer that shrinks the ring file after both sides mapped it costs the
/// link, not the process: the SIGBUS of the next access is caught, and
/// both sides fail with `Truncated` instead of handing out the zeros.
#[tokio::test]
async fn a_ring_truncated_under_the_mapping_fails_with_truncated() {
    let ring = Ring::create(&dir(), 4096, 11, Role::Producer).unwrap();
    // The hostile peer's own descriptor, taken before the file is unlinked.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(ring.path())
        .unwrap();
    let other = Ring::open(ring.path(), 11, Role::Consumer).unwrap();
    let mut tx = ring.producer(WaitPolicy::default()).unwrap();
    let mut rx = other.consumer(WaitPolicy::default()).unwrap();
    tx.push(b"before").unwrap();
    tx.flush();
    let mut got = BytesMut::new();
    assert!(rx.read_into(&mut got, 1024).await.unwrap());
    assert_eq!(&got[..], b"before");

    tx.push(b"published, then lost").unwrap();
    tx.flush();
    file.set_len(0).unwrap();
    got.clear();
    let err = rx.read_into(&mut got, 1024).await.unwrap_err();
    assert!(matches!(err, ShmError::Truncated { .. }), "{err}");
    assert!(got.is_empty(), "no record is made of the zeros");
    // The producer's side of the same mapping: the next write faults too.
    let mut lost = false;
    for _ in 0..2 {
        match tx.try_push(&[7u8; 512]) {
            Err(ShmError::Truncated { .. }) => {
                lost = true;
                break;
            }
            Ok(_) => tx.flush(),
            Err(e) => panic!("{e}"),
        }
    }
    assert!(lost, "the producer sees the loss");
    let err = rx.try_poll(usize::MAX, |_| true).unwrap_err();
    assert!(matches!(err, ShmError::Truncated { .. }), "{err}");
}
