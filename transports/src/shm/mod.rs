//! Shared-memory rings between processes on one host.
//!
//! A [`Ring`] is a file (under `/dev/shm` by default) mapped by two
//! processes: a single producer and a single consumer. The file holds a
//! 4 KiB header and a power-of-two byte ring of variable-length records
//! (the protocol is in [`ring`]).
//!
//! Header: magic, layout version, capacity, a nonce (the two sides agree
//! on it over another channel, so a process cannot attach to a ring meant
//! for someone else), the creator's pid, then on separate cache lines the
//! producer's `tail`, the consumer's `head`, each side's sleep flag and
//! futex word, and each side's pid, pid namespace, `closed` flag and
//! heartbeat.
//!
//! Waiting ([`WaitPolicy`]): spin, then yield, then park on a futex after
//! setting a "sleeping" flag, so the other side makes a wake-up syscall
//! only when someone actually sleeps. `BusySpin` never parks.
//!
//! A full ring makes the producer wait: unread data is never overwritten.
//!
//! Safety: files are created `0600` with `O_EXCL`; [`Ring::open`] refuses
//! files of another user or with group/other access, a wrong magic,
//! version, size or nonce. A process-wide thread beats each side's
//! heartbeat every [`HEARTBEAT_INTERVAL`]; a wait notices a peer whose
//! process is gone (same pid namespace) or whose heartbeat is older than
//! [`DEAD_AFTER`], and fails with [`ShmError::PeerDead`]. The side that
//! opens a ring unlinks its file once mapped, and the creator's mapping
//! unlinks it on drop, so files do not outlive a link;
//! [`remove_stale`] removes those of processes that died in between.
//!
//! Rings offered by a peer are opened with [`Ring::open_in`]: only a
//! ring-named file directly in this side's ring directory, never through
//! a symlink (`O_NOFOLLOW`), only a regular file (a FIFO or device is
//! refused before it is read, `O_NONBLOCK`), its size checked on the open
//! descriptor before it is mapped.
//!
//! What a peer that shares the ring can still do: it is a process of the
//! same user on the same host (the link checks both before offering), so
//! it could already signal, ptrace or overwrite this process; the ring
//! adds no power it lacks. It can write garbage records (the frame
//! decoder refuses them and the link closes), and it can truncate the
//! file after both sides mapped it. Shared bytes are only ever copied out
//! through raw pointers (see [`ring`]): no `&[u8]` points into memory the
//! peer can write, so a hostile writer changing bytes under the reader
//! gives wrong bytes in the reader's own buffer (refused by the record
//! checks and the frame decoder), never memory outside the mapping: every
//! offset is masked to the ring's capacity and every length checked
//! against what is left of it before it is read.
//!
//! Truncation: the size is checked (`fstat` on the descriptor that is
//! mapped) before mapping, but the peer keeps a descriptor of the file and
//! can shrink it afterwards; touching a page past the end then raises
//! `SIGBUS`, whose default action kills the process. Sealing
//! (`F_SEAL_SHRINK`) would forbid that in the kernel, but only memfds can
//! be sealed, not files under `/dev/shm`, and a memfd has no path in the
//! ring directory: the peer would have to offer `/proc/<pid>/fd/<n>`, a
//! magic link that `O_NOFOLLOW` and the directory confinement refuse, or
//! pass the descriptor over a Unix socket, which the link does not have.
//! So, as Wayland compositors do for client buffers, each mapping is
//! registered with a process-wide `SIGBUS` handler (module `guard`): a
//! fault inside a ring mapping replaces that mapping with zero pages
//! (`MAP_FIXED`) and marks it lost, and the ring's next operation fails
//! with [`ShmError::Truncated`] (a record copied from the zeros is not
//! handed out); faults elsewhere go to the handler that was there before.
//! Limits: a program that installs its own `SIGBUS` handler after ours
//! without chaining loses the protection; at most 1,024 rings are guarded
//! at once (more are refused with [`ShmError::TooManyRings`]); outside
//! Linux there is no handler.
//!
//! ```
//! use mesh_transports::shm::{Ring, Role, WaitPolicy};
//! let dir = std::env::temp_dir();
//! let ring = Ring::create(&dir, 4096, 42, Role::Producer).unwrap();
//! let peer = Ring::open(ring.path(), 42, Role::Consumer).unwrap();
//! let mut tx = ring.producer(WaitPolicy::default()).unwrap();
//! let mut rx = peer.consumer(WaitPolicy::default()).unwrap();
//! tx.push(b"hello").unwrap();
//! tx.flush();
//! let mut got = Vec::new();
//! rx.poll_blocking(usize::MAX, |r| { got.push(r.to_vec()); true }).unwrap();
//! assert_eq!(got, vec![b"hello".to_vec()]);
//! ```

mod guard;
pub mod ring;
mod sys;

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{fence, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex, Once, Weak,
    },
    time::Duration,
};

use bytes::BytesMut;
pub use ring::{max_record, RingError};
use ring::{ConsumerState, Memory, ProducerState};

/// "MESHRING", little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"MESHRING");
/// Version of the file layout described above.
pub const LAYOUT_VERSION: u32 = 1;
/// Bytes before the data area.
pub const HEADER_SIZE: usize = 4096;
/// Smallest and largest data area accepted.
pub const MIN_CAPACITY: usize = 64;
/// Largest data area accepted: 1 GiB.
pub const MAX_CAPACITY: usize = 1 << 30;
/// How often each side's heartbeat is written.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// A peer whose heartbeat is older than this is taken for dead.
pub const DEAD_AFTER: Duration = Duration::from_millis(1000);
/// How long one park on the futex lasts before the waiter checks the peer.
const PARK_TIMEOUT: Duration = Duration::from_millis(100);
/// File name prefix and suffix of ring files.
const PREFIX: &str = "mesh-";
const SUFFIX: &str = ".ring";

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_CAPACITY: usize = 16;
const OFF_NONCE: usize = 24;
const OFF_CREATOR_PID: usize = 32;
const OFF_CREATOR_ROLE: usize = 36;
const OFF_CREATOR_PIDNS: usize = 40;
const OFF_TAIL: usize = 64;
const OFF_HEAD: usize = 128;
const OFF_CONSUMER_SLEEPING: usize = 192;
const OFF_DATA_SEQ: usize = 196;
const OFF_PRODUCER_SLEEPING: usize = 256;
const OFF_SPACE_SEQ: usize = 260;
/// Per-side slots: pid (u32), closed (u32), heartbeat ms (u64), pid ns
/// (u64), process start time (u64, clock ticks since boot: tells a reused
/// pid apart).
const OFF_PRODUCER_SLOT: usize = 320;
const OFF_CONSUMER_SLOT: usize = 384;

/// Which end of a ring a process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Writes records.
    Producer,
    /// Reads records.
    Consumer,
}

impl Role {
    fn slot(self) -> usize {
        match self {
            Role::Producer => OFF_PRODUCER_SLOT,
            Role::Consumer => OFF_CONSUMER_SLOT,
        }
    }
    fn other(self) -> Role {
        match self {
            Role::Producer => Role::Consumer,
            Role::Consumer => Role::Producer,
        }
    }
    fn code(self) -> u32 {
        match self {
            Role::Producer => 1,
            Role::Consumer => 2,
        }
    }
}

/// How a side waits for data (consumer) or space (producer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitPolicy {
    /// Never sleep: lowest latency, one core busy per waiting side.
    BusySpin,
    /// Spin `spins` times, yield `yields` times, then park on a futex.
    Adaptive {
        /// Checks with a spin-loop hint before yielding.
        spins: u32,
        /// Checks after yielding the thread (or task) before parking.
        yields: u32,
    },
}

impl Default for WaitPolicy {
    fn default() -> Self {
        WaitPolicy::Adaptive {
            spins: 256,
            yields: 16,
        }
    }
}

/// Errors of shared-memory rings.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// Creating, opening or mapping the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The ring file.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The file is not a ring this version can use.
    #[error("{path}: {reason}")]
    BadFile {
        /// The ring file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The capacity is not a power of two within the limits.
    #[error("ring capacity {0} is not a power of two between {MIN_CAPACITY} and {MAX_CAPACITY}")]
    BadCapacity(usize),
    /// The protocol's own errors: a record too large, or corrupt memory.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The other side's process is gone.
    #[error("peer process {pid} is dead ({reason})")]
    PeerDead {
        /// Its pid.
        pid: u32,
        /// How it was noticed.
        reason: String,
    },
    /// The other side closed the ring.
    #[error("the peer closed the ring")]
    Closed,
    /// The file was truncated under our mapping (by the peer): the ring's
    /// memory is lost and the link must be closed.
    #[error("{path}: the ring file was truncated while mapped")]
    Truncated {
        /// The ring file (already unlinked, most likely).
        path: PathBuf,
    },
    /// Too many rings are mapped at once to guard another one.
    #[error("more than {} shared-memory rings are mapped at once", guard::SLOTS)]
    TooManyRings,
}

/// One side's mapping of a ring file.
#[derive(Debug)]
struct Mapping {
    ptr: *mut u8,
    len: usize,
    cap: usize,
    role: Role,
    path: PathBuf,
    created: bool,
    /// Our pid namespace: the peer's pid means something only in the same.
    pidns: u64,
    /// Registration with the `SIGBUS` handler; `None` only while dropping.
    guard: Option<guard::Guard>,
}

// SAFETY: the mapping is plain shared memory; all shared fields are
// accessed through atomics, and the data area through the ring protocol,
// which gives each byte one writer at a time.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Takes over `len` bytes mapped at `ptr`, guarded against truncation;
    /// unmaps them if they cannot be guarded.
    fn new(
        ptr: *mut u8,
        len: usize,
        role: Role,
        path: PathBuf,
        created: bool,
    ) -> Result<Mapping, ShmError> {
        let Some(guard) = guard::Guard::register(ptr, len) else {
            // SAFETY: from `sys::map`, not used by anyone yet.
            unsafe { sys::unmap(ptr, len) };
            return Err(ShmError::TooManyRings);
        };
        Ok(Mapping {
            ptr,
            len,
            cap: len - HEADER_SIZE,
            role,
            path,
            created,
            pidns: sys::namespace("pid"),
            guard: Some(guard),
        })
    }

    /// Whether the file was truncated under us (the memory is zeros now).
    fn lost(&self) -> bool {
        self.guard.as_ref().is_some_and(|g| g.lost())
    }

    /// `Err(Truncated)` once the memory is lost.
    fn check_intact(&self) -> Result<(), ShmError> {
        if self.lost() {
            return Err(ShmError::Truncated {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= HEADER_SIZE);
        // SAFETY: in bounds of the header and 8-aligned (the mapping is
        // page-aligned); lives as long as `self`.
        unsafe { &*(self.ptr.add(off) as *const AtomicU64) }
    }
    fn u32_at(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off.is_multiple_of(4) && off + 4 <= HEADER_SIZE);
        // SAFETY: as above.
        unsafe { &*(self.ptr.add(off) as *const AtomicU32) }
    }

    fn beat(&self, now_ms: u64) {
        self.u64_at(self.role.slot() + 8)
            .store(now_ms, Ordering::Release);
    }

    /// Takes our side's slot; `false` if another process has it.
    fn claim_slot(&self) -> bool {
        let slot = self.role.slot();
        let claimed =
            self.u32_at(slot)
                .compare_exchange(0, sys::pid(), Ordering::AcqRel, Ordering::Acquire);
        if claimed.is_err() {
            return false;
        }
        self.u64_at(slot + 16).store(self.pidns, Ordering::Relaxed);
        self.u64_at(slot + 24).store(
            sys::process_start(sys::pid()).unwrap_or(0),
            Ordering::Relaxed,
        );
        self.beat(sys::monotonic_ms());
        true
    }

    fn peer_closed(&self) -> bool {
        self.u32_at(self.role.other().slot() + 4)
            .load(Ordering::Acquire)
            != 0
    }

    fn close(&self) {
        self.u32_at(self.role.slot() + 4)
            .store(1, Ordering::Release);
        // Wake the peer whichever way it waits.
        self.wake(OFF_DATA_SEQ);
        self.wake(OFF_SPACE_SEQ);
    }

    fn wake(&self, seq_off: usize) {
        let seq = self.u32_at(seq_off);
        seq.fetch_add(1, Ordering::Release);
        sys::futex_wake(seq);
    }

    /// After publishing: wakes the peer if it sleeps (the pairing fence is
    /// in the waits; see the loom test `sleeping_flag_never_loses_a_wakeup`).
    fn notify(&self, sleeping_off: usize, seq_off: usize) {
        fence(Ordering::SeqCst);
        if self.u32_at(sleeping_off).load(Ordering::Relaxed) != 0 {
            self.wake(seq_off);
        }
    }

    /// `Err` if the peer's process is gone or the ring's memory is lost.
    fn check_peer(&self) -> Result<(), ShmError> {
        self.check_intact()?;
        let slot = self.role.other().slot();
        let pid = self.u32_at(slot).load(Ordering::Acquire);
        if pid == 0 {
            // Not attached yet: the caller bounds that wait itself.
            return Ok(());
        }
        let pidns = self.u64_at(slot + 16).load(Ordering::Relaxed);
        if pidns == self.pidns && pidns != 0 {
            // The pid says it all in our namespace: a peer that is only
            // paused (stopped, swapped, starved of CPU) is not dead.
            let start = self.u64_at(slot + 24).load(Ordering::Relaxed);
            if !sys::pid_alive(pid, start) {
                return Err(ShmError::PeerDead {
                    pid,
                    reason: "process exited".into(),
                });
            }
            return Ok(());
        }
        let beat = self.u64_at(slot + 8).load(Ordering::Acquire);
        let age = sys::monotonic_ms().saturating_sub(beat);
        if age > DEAD_AFTER.as_millis() as u64 {
            return Err(ShmError::PeerDead {
                pid,
                reason: format!("no heartbeat for {age} ms"),
            });
        }
        Ok(())
    }

    fn unlink(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.created {
            self.unlink();
        }
        // Unguard first: once unmapped, the address may be reused.
        drop(self.guard.take());
        // SAFETY: from `sys::map`; this is the last reference.
        unsafe { sys::unmap(self.ptr, self.len) };
    }
}

// SAFETY: the data area is `cap` bytes after the header, mapped for the
// mapping's lifetime; positions are atomics in the shared header.
unsafe impl Memory for Mapping {
    fn capacity(&self) -> usize {
        self.cap
    }
    fn load_tail(&self, order: Ordering) -> u64 {
        self.u64_at(OFF_TAIL).load(order)
    }
    fn store_tail(&self, value: u64, order: Ordering) {
        self.u64_at(OFF_TAIL).store(value, order)
    }
    fn load_head(&self, order: Ordering) -> u64 {
        self.u64_at(OFF_HEAD).load(order)
    }
    fn store_head(&self, value: u64, order: Ordering) {
        self.u64_at(OFF_HEAD).store(value, order)
    }
    unsafe fn write(&self, offset: usize, src: &[u8]) {
        debug_assert!(offset + src.len() <= self.cap);
        std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(HEADER_SIZE + offset), src.len());
    }
    unsafe fn read(&self, offset: usize, dst: *mut u8, len: usize) {
        debug_assert!(offset + len <= self.cap);
        // A raw copy, never a `&[u8]` over the shared bytes: a hostile
        // producer writing them meanwhile only makes our copy garbage.
        std::ptr::copy_nonoverlapping(self.ptr.add(HEADER_SIZE + offset), dst, len);
    }
    fn intact(&self) -> bool {
        !self.lost()
    }
}

/// Mappings whose heartbeat the process-wide beat thread writes.
static BEATING: Mutex<Vec<Weak<Mapping>>> = Mutex::new(Vec::new());
static BEAT_THREAD: Once = Once::new();

fn start_beating(m: &Arc<Mapping>) {
    BEAT_THREAD.call_once(|| {
        // One thread per process for all rings; it holds no ring alive.
        let spawned = std::thread::Builder::new()
            .name("mesh-shm-heartbeat".into())
            .spawn(|| loop {
                std::thread::sleep(HEARTBEAT_INTERVAL);
                let now = sys::monotonic_ms();
                let mut live = BEATING.lock().unwrap_or_else(|e| e.into_inner());
                live.retain(|w| match w.upgrade() {
                    Some(m) => {
                        m.beat(now);
                        true
                    }
                    None => false,
                });
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the shm heartbeat thread; peers will see this process as dead");
        }
    });
    BEATING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Arc::downgrade(m));
}

/// One side of a ring file, before it is turned into a [`Producer`] or
/// [`Consumer`].
#[derive(Debug)]
pub struct Ring {
    map: Arc<Mapping>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ShmError + '_ {
    move |source| ShmError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Ring {
    /// Creates a ring file in `dir` with `capacity` bytes of data area and
    /// takes the `role` side of it. The other side opens [`Ring::path`]
    /// with the same `nonce`.
    pub fn create(dir: &Path, capacity: usize, nonce: u64, role: Role) -> Result<Ring, ShmError> {
        if !capacity.is_power_of_two() || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
            return Err(ShmError::BadCapacity(capacity));
        }
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // The nonce stays secret (it is in the header of a 0600 file and in
        // the encrypted offer, not in the name anyone can list).
        let path = dir.join(format!(
            "{PREFIX}{}-{n}-{:016x}{SUFFIX}",
            sys::pid(),
            sys::random_u64()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        let len = HEADER_SIZE + capacity;
        let mapped = sys::allocate(&file, len).and_then(|()| sys::map(&file, len));
        let ptr = match mapped {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(ShmError::Io { path, source: e });
            }
        };
        let map = match Mapping::new(ptr, len, role, path.clone(), true) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        map.u32_at(OFF_VERSION)
            .store(LAYOUT_VERSION, Ordering::Relaxed);
        map.u64_at(OFF_CAPACITY)
            .store(capacity as u64, Ordering::Relaxed);
        map.u64_at(OFF_NONCE).store(nonce, Ordering::Relaxed);
        map.u32_at(OFF_CREATOR_PID)
            .store(sys::pid(), Ordering::Relaxed);
        map.u32_at(OFF_CREATOR_ROLE)
            .store(role.code(), Ordering::Relaxed);
        map.u64_at(OFF_CREATOR_PIDNS)
            .store(map.pidns, Ordering::Relaxed);
        // A fresh file: the slot is free.
        map.claim_slot();
        // Magic last: a file with the magic has a complete header.
        map.u64_at(OFF_MAGIC).store(MAGIC, Ordering::Release);
        start_beating(&map);
        Ok(Ring { map })
    }

    /// Opens a ring made by [`Ring::create`] and takes the `role` side
    /// (the one the creator did not take). Checks owner, mode, layout and
    /// `nonce`, then unlinks the file: once both sides have mapped it, it
    /// needs no name.
    pub fn open(path: &Path, nonce: u64, role: Role) -> Result<Ring, ShmError> {
        let bad = |reason: String| ShmError::BadFile {
            path: path.to_owned(),
            reason,
        };
        // Never through a symlink; never blocking on a FIFO.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    bad("a symlink, not a ring file".into())
                } else {
                    io_err(path)(e)
                }
            })?;
        // Checked on the open descriptor (fstat), not the path.
        let meta = file.metadata().map_err(io_err(path))?;
        if !meta.file_type().is_file() {
            return Err(bad("not a regular file".into()));
        }
        if meta.uid() != sys::uid() {
            return Err(bad(format!(
                "owned by uid {}, not by us ({})",
                meta.uid(),
                sys::uid()
            )));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(bad(format!(
                "mode {:o} gives others access; expected 600",
                meta.mode() & 0o777
            )));
        }
        let len = usize::try_from(meta.len()).map_err(|_| bad("file too large".into()))?;
        let cap = len.saturating_sub(HEADER_SIZE);
        if len < HEADER_SIZE
            || !cap.is_power_of_two()
            || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&cap)
        {
            return Err(bad(format!("size {len} is not a ring's")));
        }
        let ptr = sys::map(&file, len).map_err(io_err(path))?;
        // Shrunk between the fstat and here, or later: the guard turns the
        // fault into `Truncated` (or a bad magic, for a header now zeros).
        let map = Arc::new(Mapping::new(ptr, len, role, path.to_owned(), false)?);
        map.check_intact()?;
        let magic = map.u64_at(OFF_MAGIC).load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(bad(format!("bad magic {magic:#018x}")));
        }
        let version = map.u32_at(OFF_VERSION).load(Ordering::Relaxed);
        if version != LAYOUT_VERSION {
            return Err(bad(format!(
                "layout version {version}, this build reads {LAYOUT_VERSION}"
            )));
        }
        let hdr_cap = map.u64_at(OFF_CAPACITY).load(Ordering::Relaxed);
        if hdr_cap != cap as u64 {
            return Err(bad(format!(
                "header says {hdr_cap} bytes, file holds {cap}"
            )));
        }
        if map.u64_at(OFF_NONCE).load(Ordering::Relaxed) != nonce {
            return Err(bad(
                "nonce does not match: not the ring we were offered".into()
            ));
        }
        if map.u64_at(OFF_TAIL).load(Ordering::Acquire) != 0
            || map.u64_at(OFF_HEAD).load(Ordering::Acquire) != 0
        {
            return Err(bad("ring already in use (positions not at 0)".into()));
        }
        if !map.claim_slot() {
            return Err(bad(format!("{role:?} side already taken")));
        }
        map.unlink();
        start_beating(&map);
        Ok(Ring { map })
    }

    /// [`Ring::open`] for a path a peer offered: only a ring file directly
    /// in `dir` (this side's ring directory), named as [`Ring::create`]
    /// names them, with no `..` or other indirection.
    pub fn open_in(dir: &Path, path: &Path, nonce: u64, role: Role) -> Result<Ring, ShmError> {
        let bad = |reason: String| ShmError::BadFile {
            path: path.to_owned(),
            reason,
        };
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX))
            .ok_or_else(|| bad("not a ring file name".into()))?;
        let plain = path.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        });
        let parent = path.parent().filter(|_| plain && path.is_absolute());
        let canon = |p: &Path| std::fs::canonicalize(p).ok();
        match (parent.and_then(canon), canon(dir)) {
            (Some(p), Some(d)) if p == d => Ring::open(&d.join(name), nonce, role),
            _ => Err(bad(format!(
                "not in this node's ring directory {}",
                dir.display()
            ))),
        }
    }

    /// The ring file (gone once the other side has opened it).
    pub fn path(&self) -> &Path {
        &self.map.path
    }

    /// Bytes of data area.
    pub fn capacity(&self) -> usize {
        self.map.cap
    }

    /// The producer's end; `Err` if this side is the consumer.
    pub fn producer(self, wait: WaitPolicy) -> Result<Producer, Ring> {
        if self.map.role != Role::Producer {
            return Err(self);
        }
        let state = ProducerState::new(&*self.map);
        Ok(Producer {
            map: self.map,
            state,
            wait,
        })
    }

    /// The consumer's end; `Err` if this side is the producer.
    pub fn consumer(self, wait: WaitPolicy) -> Result<Consumer, Ring> {
        if self.map.role != Role::Consumer {
            return Err(self);
        }
        let state = ConsumerState::new(&*self.map);
        Ok(Consumer {
            map: self.map,
            state,
            wait,
        })
    }
}

/// What a waiter does next, per [`WaitPolicy`]: spin, then yield, then
/// park; `BusySpin` spins for ever, checking the peer now and then.
#[derive(Debug)]
struct Backoff {
    policy: WaitPolicy,
    tries: u32,
    /// Busy-spin checks the peer (a syscall and a /proc read) this often.
    last_check: std::time::Instant,
}

#[derive(Debug, PartialEq, Eq)]
enum Step {
    Spin,
    /// Spun a while (busy-spin): let others run, and check the peer if
    /// [`Backoff::check_due`].
    CheckPeer,
    Yield,
    Park,
}

impl Backoff {
    fn new(policy: WaitPolicy) -> Self {
        Self {
            policy,
            tries: 0,
            last_check: std::time::Instant::now(),
        }
    }

    fn check_due(&mut self) -> bool {
        let due = self.last_check.elapsed() >= PARK_TIMEOUT;
        if due {
            self.last_check = std::time::Instant::now();
        }
        due
    }

    fn next(&mut self) -> Step {
        self.tries = self.tries.saturating_add(1);
        match self.policy {
            WaitPolicy::BusySpin if self.tries.is_multiple_of(256) => Step::CheckPeer,
            WaitPolicy::BusySpin => Step::Spin,
            WaitPolicy::Adaptive { spins, .. } if self.tries <= spins => Step::Spin,
            WaitPolicy::Adaptive { spins, yields } if self.tries - spins <= yields => Step::Yield,
            WaitPolicy::Adaptive { .. } => Step::Park,
        }
    }
}

/// Sets the sleeping flag and re-checks `ready` (the Dekker half paired
/// with [`Mapping::notify`]); `Some(seen)`: go to sleep on the futex word
/// while it holds `seen`.
fn prepare_park(
    map: &Mapping,
    sleeping_off: usize,
    seq_off: usize,
    ready: &mut impl FnMut() -> bool,
) -> Option<u32> {
    let seen = map.u32_at(seq_off).load(Ordering::Acquire);
    map.u32_at(sleeping_off).store(1, Ordering::Relaxed);
    fence(Ordering::SeqCst);
    if ready() {
        map.u32_at(sleeping_off).store(0, Ordering::Relaxed);
        return None;
    }
    Some(seen)
}

/// Waits until `ready()` or the peer dies. `ready` returns `true` when the
/// wait is over (data, space, or the peer closed).
fn wait_blocking(
    map: &Mapping,
    policy: WaitPolicy,
    sleeping_off: usize,
    seq_off: usize,
    mut ready: impl FnMut() -> bool,
) -> Result<(), ShmError> {
    let mut backoff = Backoff::new(policy);
    while !ready() {
        match backoff.next() {
            Step::Spin => std::hint::spin_loop(),
            Step::CheckPeer if backoff.check_due() => map.check_peer()?,
            Step::CheckPeer => std::hint::spin_loop(),
            Step::Yield => std::thread::yield_now(),
            Step::Park => {
                let Some(seen) = prepare_park(map, sleeping_off, seq_off, &mut ready) else {
                    return Ok(());
                };
                sys::futex_wait(map.u32_at(seq_off), seen, PARK_TIMEOUT);
                map.u32_at(sleeping_off).store(0, Ordering::Relaxed);
                if !ready() {
                    map.check_peer()?;
                }
            }
        }
    }
    Ok(())
}

/// [`wait_blocking`] for tasks: yields to the runtime instead of the
/// thread, and parks on a blocking-pool thread.
async fn wait_async(
    map: &Arc<Mapping>,
    policy: WaitPolicy,
    sleeping_off: usize,
    seq_off: usize,
    mut ready: impl FnMut() -> bool,
) -> Result<(), ShmError> {
    let mut backoff = Backoff::new(policy);
    while !ready() {
        match backoff.next() {
            Step::Spin => std::hint::spin_loop(),
            Step::CheckPeer => {
                if backoff.check_due() {
                    map.check_peer()?;
                }
                // Busy-spinning must not starve the runtime's other tasks.
                tokio::task::yield_now().await;
            }
            Step::Yield => tokio::task::yield_now().await,
            Step::Park => {
                let Some(seen) = prepare_park(map, sleeping_off, seq_off, &mut ready) else {
                    return Ok(());
                };
                let parked = map.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    sys::futex_wait(parked.u32_at(seq_off), seen, PARK_TIMEOUT)
                })
                .await;
                map.u32_at(sleeping_off).store(0, Ordering::Relaxed);
                if !ready() {
                    map.check_peer()?;
                }
            }
        }
    }
    Ok(())
}

/// The writing end of a ring.
#[derive(Debug)]
pub struct Producer {
    map: Arc<Mapping>,
    state: ProducerState,
    wait: WaitPolicy,
}

impl Producer {
    /// The largest record this ring takes.
    pub fn max_record(&self) -> usize {
        max_record(self.map.cap)
    }

    /// Writes one record if there is room (not yet visible: see
    /// [`Producer::flush`]). `Ok(false)`: the ring is full.
    pub fn try_push(&mut self, record: &[u8]) -> Result<bool, ShmError> {
        self.map.check_intact()?;
        Ok(self.state.try_push(&*self.map, record)?)
    }

    /// Publishes what was written and wakes the consumer if it sleeps.
    pub fn flush(&mut self) {
        if self.state.publish(&*self.map) {
            self.map.notify(OFF_CONSUMER_SLEEPING, OFF_DATA_SEQ);
        }
    }

    fn check_open(&self) -> Result<(), ShmError> {
        if self.map.peer_closed() {
            return Err(ShmError::Closed);
        }
        Ok(())
    }

    /// Writes one record, waiting for room (publishing what is written
    /// first) while the ring is full.
    pub fn push(&mut self, record: &[u8]) -> Result<(), ShmError> {
        while !self.try_push(record)? {
            self.flush();
            self.check_open()?;
            let (map, state, len) = (&self.map, &mut self.state, record.len());
            wait_blocking(map, self.wait, OFF_PRODUCER_SLEEPING, OFF_SPACE_SEQ, || {
                // A corrupt position ends the wait; the push then reports it.
                map.peer_closed() || state.fits(&**map, len).unwrap_or(true)
            })?;
            self.check_open()?;
        }
        Ok(())
    }

    /// Writes `bytes` as records of at most `chunk` bytes, waiting for
    /// room as needed, and publishes them.
    pub async fn write_all(&mut self, mut bytes: &[u8], chunk: usize) -> Result<(), ShmError> {
        let chunk = chunk.clamp(1, self.max_record());
        self.check_open()?;
        while !bytes.is_empty() {
            let n = bytes.len().min(chunk);
            if self.try_push(&bytes[..n])? {
                bytes = &bytes[n..];
                continue;
            }
            self.flush();
            let (map, state) = (&self.map, &mut self.state);
            wait_async(map, self.wait, OFF_PRODUCER_SLEEPING, OFF_SPACE_SEQ, || {
                map.peer_closed() || state.fits(&**map, n).unwrap_or(true)
            })
            .await?;
            self.check_open()?;
        }
        self.flush();
        Ok(())
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.flush();
        self.map.close();
    }
}

/// The reading end of a ring.
#[derive(Debug)]
pub struct Consumer {
    map: Arc<Mapping>,
    state: ConsumerState,
    wait: WaitPolicy,
}

impl Consumer {
    /// Reads up to `max` published records without waiting, calling `f`
    /// with each until it returns `false`. Returns how many were read.
    pub fn try_poll(
        &mut self,
        max: usize,
        f: impl FnMut(&[u8]) -> bool,
    ) -> Result<usize, ShmError> {
        self.map.check_intact()?;
        let n = self
            .state
            .poll(&*self.map, max, f)
            .map_err(|e| self.lost_or(e))?;
        if n > 0 {
            self.map.notify(OFF_PRODUCER_SLEEPING, OFF_SPACE_SEQ);
        }
        Ok(n)
    }

    /// `Truncated` if the memory was lost (whatever the ring made of the
    /// zeros), else `e`.
    fn lost_or(&self, e: RingError) -> ShmError {
        match self.map.check_intact() {
            Err(lost) => lost,
            Ok(()) => e.into(),
        }
    }

    /// Like [`Consumer::try_poll`], appending each payload to `out` (one
    /// copy out of the shared memory) while `out` is shorter than
    /// `max_bytes`.
    fn try_read_into(&mut self, out: &mut BytesMut, max_bytes: usize) -> Result<usize, ShmError> {
        self.map.check_intact()?;
        let map = &*self.map;
        let n = self
            .state
            .poll_payloads(map, usize::MAX, |p| {
                let start = out.len();
                out.reserve(p.len());
                p.copy_to(out.spare_capacity_mut());
                if !map.intact() {
                    // Zeros from a lost mapping, not the peer's record.
                    return None;
                }
                // SAFETY: `copy_to` initialised `p.len()` bytes past `start`.
                unsafe { out.set_len(start + p.len()) };
                Some(out.len() < max_bytes)
            })
            .map_err(|e| self.lost_or(e))?;
        if n > 0 {
            self.map.notify(OFF_PRODUCER_SLEEPING, OFF_SPACE_SEQ);
        }
        Ok(n)
    }

    /// Like [`Consumer::try_poll`], waiting for at least one record.
    /// `Ok(0)`: the producer closed the ring and everything is read.
    pub fn poll_blocking(
        &mut self,
        max: usize,
        mut f: impl FnMut(&[u8]) -> bool,
    ) -> Result<usize, ShmError> {
        loop {
            let n = self.try_poll(max, &mut f)?;
            if n > 0 {
                return Ok(n);
            }
            if self.map.peer_closed() {
                // Everything published before the close is visible now.
                return self.try_poll(max, &mut f);
            }
            let (map, state) = (&self.map, &self.state);
            wait_blocking(map, self.wait, OFF_CONSUMER_SLEEPING, OFF_DATA_SEQ, || {
                state.readable(&**map) || map.peer_closed()
            })?;
        }
    }

    /// Waits for records and appends their payloads to `out`, stopping
    /// once it holds `max_bytes` or more. `Ok(false)`: the producer closed
    /// the ring and everything is read.
    pub async fn read_into(
        &mut self,
        out: &mut BytesMut,
        max_bytes: usize,
    ) -> Result<bool, ShmError> {
        loop {
            if self.try_read_into(out, max_bytes)? > 0 {
                return Ok(true);
            }
            if self.map.peer_closed() {
                return Ok(self.try_read_into(out, max_bytes)? > 0);
            }
            let (map, state) = (&self.map, &self.state);
            wait_async(map, self.wait, OFF_CONSUMER_SLEEPING, OFF_DATA_SEQ, || {
                state.readable(&**map) || map.peer_closed()
            })
            .await?;
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.map.close();
    }
}

/// Identifies this host for choosing shared memory over the network: the
/// kernel's boot id and our network namespace (processes in different
/// network namespaces are treated as different hosts, as containers are).
/// Peers that share it and the uid try shared memory; opening the ring
/// proves it.
pub fn host_id() -> Vec<u8> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    format!("{}/net:{}", boot.trim(), sys::namespace("net")).into_bytes()
}

/// This process's user id.
pub fn uid() -> u32 {
    sys::uid()
}

/// The default directory for ring files: `/dev/shm` where it exists.
pub fn default_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

/// Removes ring files in `dir` left by dead processes of this user: files
/// whose creator's process is gone (same pid namespace) or whose creator's
/// heartbeat stopped over 10 s ago. Returns how many were removed.
pub fn remove_stale(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let me = sys::uid();
    let pidns = sys::namespace("pid");
    let now = sys::monotonic_ms();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(PREFIX) || !name.ends_with(SUFFIX) {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_file() || meta.uid() != me {
            continue;
        }
        let Some(header) = read_header(&path) else {
            continue;
        };
        let field = |off: usize, n: usize| {
            let mut b = [0u8; 8];
            b[..n].copy_from_slice(&header[off..off + n]);
            u64::from_le_bytes(b)
        };
        let stale = if field(OFF_MAGIC, 8) != MAGIC {
            // A creator that died before writing its header; leave files
            // younger than a minute alone (one may be starting now).
            meta.modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(60))
        } else {
            let pid = field(OFF_CREATOR_PID, 4) as u32;
            let slot = if field(OFF_CREATOR_ROLE, 4) == 1 {
                OFF_PRODUCER_SLOT
            } else {
                OFF_CONSUMER_SLOT
            };
            let beat = field(slot + 8, 8);
            let dead_pid = field(OFF_CREATOR_PIDNS, 8) == pidns && !sys::pid_alive(pid, 0);
            dead_pid || now.saturating_sub(beat) > 10_000
        };
        if stale && std::fs::remove_file(&path).is_ok() {
            tracing::info!(path = %path.display(), "removed a stale shared-memory ring file");
            removed += 1;
        }
    }
    removed
}

fn read_header(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    // A short file (its creator died before sizing it) reads as zeros.
    let mut buf = Vec::with_capacity(512);
    File::open(path)
        .ok()?
        .take(512)
        .read_to_end(&mut buf)
        .ok()?;
    buf.resize(512, 0);
    Some(buf)
}

#[cfg(test)]
mod tests;
