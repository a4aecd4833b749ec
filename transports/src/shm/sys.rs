//! The few system calls the rings need: mapping, futexes, clocks, pids.

use std::{fs::File, io, os::unix::io::AsRawFd, sync::atomic::AtomicU32, time::Duration};

/// Maps `len` bytes of `file` shared, read and write.
pub(super) fn map(file: &File, len: usize) -> io::Result<*mut u8> {
    // SAFETY: a fresh mapping of a file we hold open; the kernel picks the
    // address. The mapping outlives the file descriptor by design.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(ptr.cast())
}

/// Unmaps a mapping made by [`map`].
///
/// # Safety
///
/// `ptr` and `len` come from one [`map`] call, and nothing uses the
/// mapping afterwards.
pub(super) unsafe fn unmap(ptr: *mut u8, len: usize) {
    libc::munmap(ptr.cast(), len);
}

/// Reserves the file's blocks now, so that a full tmpfs is an error at
/// creation instead of a SIGBUS when a page is first written.
pub(super) fn allocate(file: &File, len: usize) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    match rc {
        0 => Ok(()),
        // Filesystems without fallocate: fall back to a sparse file.
        libc::EOPNOTSUPP | libc::EINVAL => file.set_len(len as u64),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Sleeps while `word` holds `expected`, at most `timeout`; returns early
/// on a wake-up, a signal, or if the word already differs. Shared (not
/// process-private), so it pairs with [`futex_wake`] in another process.
#[cfg(target_os = "linux")]
pub(super) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every waiter on `word`.
#[cfg(target_os = "linux")]
pub(super) fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

// Elsewhere: poll (the waits re-check their condition after each return).
#[cfg(not(target_os = "linux"))]
pub(super) fn futex_wait(_word: &AtomicU32, _expected: u32, timeout: Duration) {
    std::thread::sleep(timeout.min(Duration::from_micros(200)));
}

#[cfg(not(target_os = "linux"))]
pub(super) fn futex_wake(_word: &AtomicU32) {}

/// Milliseconds of the system-wide monotonic clock (the same for every
/// process on the host).
pub(super) fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

pub(super) fn pid() -> u32 {
    std::process::id()
}

pub(super) fn uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// Whether process `pid` (of our pid namespace) exists and has not exited.
/// A zombie (killed, not yet reaped) counts as gone, and so does a process
/// that started at another time than `start` (a reused pid; 0: unknown).
pub(super) fn pid_alive(pid: u32, start: u64) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    if rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    match stat_fields(pid) {
        Some((state, started)) => !matches!(state, 'Z' | 'X') && (start == 0 || started == start),
        None => rc == 0,
    }
}

/// When process `pid` started (clock ticks since boot).
pub(super) fn process_start(pid: u32) -> Option<u64> {
    stat_fields(pid).map(|(_, start)| start)
}

/// A process's state letter and start time, from `/proc/PID/stat`.
fn stat_fields(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself hold ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 22 of the file: the 19th after the state (field 3).
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// A random number from the kernel (for file names that cannot be guessed).
pub(super) fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: `b` is a valid buffer of its length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // No entropy source: names stay unique by pid and counter anyway.
        return monotonic_ms() ^ (u64::from(pid()) << 40);
    }
    u64::from_le_bytes(b)
}

/// The inode of one of our namespaces (`net`, `pid`), 0 if unknown.
pub(super) fn namespace(kind: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/self/ns/{kind}"))
        .map(|m| m.ino())
        .unwrap_or(0)
}
