//! Survives a peer truncating a ring file under our mapping.
//!
//! Touching a page of a `MAP_SHARED` mapping beyond the end of its file
//! raises `SIGBUS`, whose default action kills the process. Any process
//! holding the file open can shrink it (the peer does: it made or opened
//! the file), and a tmpfs file cannot be sealed against that (only memfds
//! can; see the module doc of [`super`]). So, as Wayland compositors do
//! for client buffers, a process-wide `SIGBUS` handler looks the faulting
//! address up among the registered ring mappings and, if it is one of
//! them, maps anonymous zero pages over the whole mapping (`MAP_FIXED`)
//! and marks it lost; the faulting access then completes on the zeros,
//! and the ring's next operation reports [`super::ShmError::Truncated`].
//! A fault anywhere else goes to the handler that was there before (Rust's
//! own stack-overflow handler, or the default action).
//!
//! The handler only does async-signal-safe things: atomic loads and
//! stores on a fixed table, `mmap`, `sigaction` and a call to the
//! previous handler.

/// Rings that can be guarded at once; a ring beyond that is refused
/// ([`super::ShmError::TooManyRings`]), as the table must be fixed for
/// the signal handler to read it without locks.
pub(super) const SLOTS: usize = 1024;

#[cfg(target_os = "linux")]
mod imp {
    use std::sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Once,
    };

    use super::SLOTS;

    struct Slot {
        /// Start address of the mapping; 0 when the slot is free.
        start: AtomicUsize,
        /// Its length; 0 while the slot is being filled or emptied.
        len: AtomicUsize,
        /// Set by the handler once it has replaced the mapping.
        lost: AtomicBool,
    }

    #[allow(clippy::declare_interior_mutable_const)]
    const FREE: Slot = Slot {
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        lost: AtomicBool::new(false),
    };
    static TABLE: [Slot; SLOTS] = [FREE; SLOTS];

    /// The `SIGBUS` action before ours, written once before ours is
    /// installed and only read afterwards.
    static mut PREVIOUS: Option<libc::sigaction> = None;
    static INSTALL: Once = Once::new();
    static INSTALLED: AtomicBool = AtomicBool::new(false);

    fn install() {
        INSTALL.call_once(|| {
            // SAFETY: plain sigaction calls with valid structures; PREVIOUS
            // is written here only, before the handler that reads it exists.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                    return;
                }
                *std::ptr::addr_of_mut!(PREVIOUS) = Some(old);
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
                new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
                libc::sigemptyset(&mut new.sa_mask);
                if libc::sigaction(libc::SIGBUS, &new, std::ptr::null_mut()) == 0 {
                    INSTALLED.store(true, Ordering::Release);
                }
            }
        });
    }

    extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
        let addr = unsafe { (*info).si_addr() } as usize;
        for slot in &TABLE {
            let start = slot.start.load(Ordering::Acquire);
            let len = slot.len.load(Ordering::Acquire);
            if start == 0 || addr < start || addr - start >= len {
                continue;
            }
            // SAFETY: replaces exactly a live ring mapping of ours (it is
            // registered until just before it is unmapped) with private
            // zero pages; every access to it stays in bounds.
            let p = unsafe {
                libc::mmap(
                    start as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                slot.lost.store(true, Ordering::Release);
                return;
            }
            break;
        }
        // Not ours (or it could not be repaired): what would have happened
        // without us.
        // SAFETY: PREVIOUS was written before this handler was installed.
        let previous = unsafe { *std::ptr::addr_of!(PREVIOUS) };
        match previous {
            Some(old) if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN => {
                // SAFETY: calling the handler the process had installed,
                // with the arguments the kernel gave us.
                unsafe {
                    if old.sa_flags & libc::SA_SIGINFO != 0 {
                        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                            std::mem::transmute(old.sa_sigaction);
                        f(sig, info, ctx);
                    } else {
                        let f: extern "C" fn(libc::c_int) = std::mem::transmute(old.sa_sigaction);
                        f(sig);
                    }
                }
            }
            _ => {
                // Default action: reset it; the access faults again on
                // return and the process dies of SIGBUS as it would have.
                // SAFETY: a valid default action.
                unsafe {
                    let mut dfl: libc::sigaction = std::mem::zeroed();
                    dfl.sa_sigaction = libc::SIG_DFL;
                    libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
                }
            }
        }
    }

    /// A registered mapping; unregisters on drop.
    #[derive(Debug)]
    pub(in crate::shm) struct Guard {
        slot: usize,
    }

    impl Guard {
        /// Guards `len` bytes at `start`; `None` if the table is full or
        /// the handler cannot be installed.
        pub(in crate::shm) fn register(start: *mut u8, len: usize) -> Option<Guard> {
            install();
            if !INSTALLED.load(Ordering::Acquire) {
                return None;
            }
            let start = start as usize;
            for (i, slot) in TABLE.iter().enumerate() {
                if slot
                    .start
                    .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    slot.lost.store(false, Ordering::Relaxed);
                    slot.len.store(len, Ordering::Release);
                    return Some(Guard { slot: i });
                }
            }
            None
        }

        /// Whether the handler replaced the mapping (it was truncated).
        pub(in crate::shm) fn lost(&self) -> bool {
            TABLE[self.slot].lost.load(Ordering::Acquire)
        }
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            let slot = &TABLE[self.slot];
            slot.len.store(0, Ordering::Release);
            slot.start.store(0, Ordering::Release);
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    /// Elsewhere: no handler; a truncated ring still kills the process.
    #[derive(Debug)]
    pub(in crate::shm) struct Guard;

    impl Guard {
        pub(in crate::shm) fn register(_start: *mut u8, _len: usize) -> Option<Guard> {
            Some(Guard)
        }
        pub(in crate::shm) fn lost(&self) -> bool {
            false
        }
    }
}

pub(super) use imp::Guard;
