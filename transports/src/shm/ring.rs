//! The ring's position protocol, apart from how its memory is mapped.
//!
//! A ring is `capacity` bytes (a power of two) and two free-running `u64`
//! byte positions: `tail`, written only by the producer, and `head`, written
//! only by the consumer. `tail - head` bytes are readable; the rest is free.
//! Records are 8-byte aligned: an 8-byte header (`u32` length, `u32` kind)
//! then the payload, padded to a multiple of 8. A record never wraps: when
//! it does not fit before the end of the ring, a padding record fills the
//! end and the record starts again at offset 0. So a record takes at most
//! half the ring ([`max_record`]), or it might never fit.
//!
//! Ordering: the producer writes record bytes, then stores `tail` with
//! `Release`; the consumer loads `tail` with `Acquire` before reading them.
//! Symmetrically the consumer stores `head` with `Release` once it is done
//! with a batch, and the producer loads it with `Acquire` before reusing
//! that space. Positions are published once per batch, not per record.
//!
//! Everything read from the shared memory is checked before use (a peer
//! may be buggy or hostile): a length or kind that does not fit the ring is
//! [`RingError::Corrupt`], and no read goes outside the data area.
//!
//! Bytes are copied out of the shared memory before anything looks at
//! them: [`Memory::read`] copies through raw pointers into memory the
//! reader owns, and no `&[u8]` ever points into the shared data area. A
//! hostile producer can write published bytes while we copy them; that
//! gives torn, garbage bytes in our buffer, which the record checks (for
//! headers) and the frame decoder (for payloads) reject, but never a
//! reference whose referent changes under it, so the optimiser's
//! assumptions about shared references cannot be broken. Each header is
//! read once into a local before it is checked and used.
//!
//! [`Memory`] abstracts the memory so that the protocol runs both on a
//! mapped file ([`super::Mapping`]) and under the loom model checker (the
//! tests below).

use std::{mem::MaybeUninit, sync::atomic::Ordering};

/// Bytes of a record header.
pub const RECORD_HEADER: usize = 8;
/// A record with a payload.
const KIND_DATA: u32 = 0x4441_5441; // "DATA"
/// Filler up to the end of the ring.
const KIND_PAD: u32 = 0x5041_4444; // "PADD"

/// The largest payload a ring of `capacity` bytes takes.
pub fn max_record(capacity: usize) -> usize {
    capacity / 2 - RECORD_HEADER
}

fn padded(len: usize) -> usize {
    (len + 7) & !7
}

/// What the ring protocol needs of the shared memory.
///
/// # Safety
///
/// Implementations must give `capacity()` bytes of data area that stay
/// valid for the value's lifetime, and positions that are atomics shared
/// with the other side.
pub unsafe trait Memory {
    /// Data area size in bytes: a power of two.
    fn capacity(&self) -> usize;
    /// Loads the producer's position.
    fn load_tail(&self, order: Ordering) -> u64;
    /// Stores the producer's position (producer only).
    fn store_tail(&self, value: u64, order: Ordering);
    /// Loads the consumer's position.
    fn load_head(&self, order: Ordering) -> u64;
    /// Stores the consumer's position (consumer only).
    fn store_head(&self, value: u64, order: Ordering);
    /// Copies `src` to data offset `offset`.
    ///
    /// # Safety
    ///
    /// `offset + src.len() <= capacity()`, and the caller is the producer
    /// writing space that the consumer has released.
    unsafe fn write(&self, offset: usize, src: &[u8]);
    /// Copies the `len` data bytes at `offset` to `dst`, without making a
    /// reference to the shared bytes (the peer may be writing them).
    ///
    /// # Safety
    ///
    /// `offset + len <= capacity()`, `dst` is valid for `len` bytes of
    /// writes and does not overlap the shared memory, and the caller is
    /// the consumer reading bytes that the producer has published.
    unsafe fn read(&self, offset: usize, dst: *mut u8, len: usize);
    /// `false` once the memory is known to be lost (the mapped file was
    /// truncated under us and replaced by zeros): bytes read since then
    /// are not the peer's. Checked after each record is copied.
    fn intact(&self) -> bool {
        true
    }
}

/// One published record's payload, still in the shared memory: copy it
/// out with [`Payload::copy_to`] to look at it. Made only by
/// [`ConsumerState::poll_payloads`], with a checked offset and length.
pub struct Payload<'a, M: ?Sized> {
    mem: &'a M,
    offset: usize,
    len: usize,
}

impl<M: ?Sized> std::fmt::Debug for Payload<'_, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payload")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl<M: Memory + ?Sized> Payload<'_, M> {
    /// The payload's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the payload to the start of `dst` and returns that part,
    /// now initialised. Panics if `dst` is shorter than [`Payload::len`]
    /// (a caller bug: the length is at most [`max_record`]).
    pub fn copy_to<'d>(&self, dst: &'d mut [MaybeUninit<u8>]) -> &'d mut [u8] {
        assert!(dst.len() >= self.len, "payload buffer too short");
        let dst = dst.as_mut_ptr().cast::<u8>();
        // SAFETY: `offset + len <= capacity()` and published (checked by
        // `poll_payloads`, the only maker); `dst` has room for `len` bytes
        // and is ours. Every byte is written, so the slice is initialised.
        unsafe {
            self.mem.read(self.offset, dst, self.len);
            std::slice::from_raw_parts_mut(dst, self.len)
        }
    }
}

/// Errors of the ring protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// A record larger than [`max_record`] can never be written.
    #[error("record of {len} bytes is larger than the ring's limit of {max} bytes")]
    TooLarge {
        /// The record's length.
        len: usize,
        /// The largest record this ring takes.
        max: usize,
    },
    /// The shared memory holds something the protocol never writes.
    #[error("corrupt ring: {0}")]
    Corrupt(String),
}

/// The producer's side of the protocol.
#[derive(Debug, Default)]
pub struct ProducerState {
    /// Where the next record goes (not yet published if above `published`).
    tail: u64,
    published: u64,
    /// The consumer's position as last seen: space below it is free.
    head: u64,
}

impl ProducerState {
    /// Starts at the ring's current tail (normally 0).
    pub fn new<M: Memory>(mem: &M) -> Self {
        let tail = mem.load_tail(Ordering::Acquire);
        Self {
            tail,
            published: tail,
            head: mem.load_head(Ordering::Acquire),
        }
    }

    /// Writes one record if it fits, without publishing it. `Ok(false)`:
    /// the ring is full (publish what is written, then wait for space).
    pub fn try_push<M: Memory>(&mut self, mem: &M, payload: &[u8]) -> Result<bool, RingError> {
        let cap = mem.capacity();
        let max = max_record(cap);
        if payload.len() > max {
            return Err(RingError::TooLarge {
                len: payload.len(),
                max,
            });
        }
        let need = RECORD_HEADER + padded(payload.len());
        let at = (self.tail as usize) & (cap - 1);
        let to_end = cap - at;
        let total = if need <= to_end { need } else { to_end + need };
        if self.free(cap) < total {
            self.load_head(mem)?;
            if self.free(cap) < total {
                return Ok(false);
            }
        }
        let mut at = at;
        if need > to_end {
            let pad = header((to_end - RECORD_HEADER) as u32, KIND_PAD);
            // SAFETY: `at + 8 <= cap` (positions are 8-aligned) and the
            // space is free (checked above).
            unsafe { mem.write(at, &pad) };
            self.tail += to_end as u64;
            at = 0;
        }
        // SAFETY: `at + need <= cap` (it fits before the end) and is free.
        unsafe {
            mem.write(at, &header(payload.len() as u32, KIND_DATA));
            mem.write(at + RECORD_HEADER, payload);
        }
        self.tail += need as u64;
        Ok(true)
    }

    /// Takes the consumer's position, which must be 8-aligned and at
    /// most a ring behind ours (else the peer is broken or hostile).
    fn load_head<M: Memory>(&mut self, mem: &M) -> Result<(), RingError> {
        let head = mem.load_head(Ordering::Acquire);
        let behind = self.tail.wrapping_sub(head);
        if !head.is_multiple_of(8) || behind > mem.capacity() as u64 {
            return Err(RingError::Corrupt(format!(
                "consumer position {head} is not within the ring (producer at {})",
                self.tail
            )));
        }
        self.head = head;
        Ok(())
    }

    fn free(&self, cap: usize) -> usize {
        // `load_head` keeps this within 0..=cap.
        cap - self.tail.wrapping_sub(self.head) as usize
    }

    /// Makes everything written so far visible to the consumer. Returns
    /// whether anything new was published.
    pub fn publish<M: Memory>(&mut self, mem: &M) -> bool {
        if self.tail == self.published {
            return false;
        }
        mem.store_tail(self.tail, Ordering::Release);
        self.published = self.tail;
        true
    }

    /// Whether a record of `len` bytes fits now (after reloading the
    /// consumer's position).
    pub fn fits<M: Memory>(&mut self, mem: &M, len: usize) -> Result<bool, RingError> {
        let cap = mem.capacity();
        self.load_head(mem)?;
        let need = RECORD_HEADER + padded(len.min(max_record(cap)));
        let to_end = cap - ((self.tail as usize) & (cap - 1));
        let total = if need <= to_end { need } else { to_end + need };
        Ok(self.free(cap) >= total)
    }
}

fn header(len: u32, kind: u32) -> [u8; RECORD_HEADER] {
    let mut h = [0; RECORD_HEADER];
    h[..4].copy_from_slice(&len.to_le_bytes());
    h[4..].copy_from_slice(&kind.to_le_bytes());
    h
}

/// The consumer's side of the protocol.
#[derive(Debug, Default)]
pub struct ConsumerState {
    head: u64,
    /// Where [`ConsumerState::poll`] copies each payload before handing it
    /// out. Bounded: it grows to the largest record read, at most
    /// [`max_record`] of the ring's capacity.
    copy: Vec<u8>,
}

impl ConsumerState {
    /// Starts at the ring's current head (normally 0).
    pub fn new<M: Memory>(mem: &M) -> Self {
        Self {
            head: mem.load_head(Ordering::Acquire),
            copy: Vec::new(),
        }
    }

    /// Whether the producer has published bytes not yet read.
    pub fn readable<M: Memory>(&self, mem: &M) -> bool {
        mem.load_tail(Ordering::Acquire) != self.head
    }

    /// Reads published records, calling `f` with a copy of each payload
    /// (in a buffer of ours, not the shared memory), until `f` returns
    /// `false`, `max_records` were read, or none is left; then releases
    /// their space to the producer. Returns the records read.
    pub fn poll<M: Memory>(
        &mut self,
        mem: &M,
        max_records: usize,
        mut f: impl FnMut(&[u8]) -> bool,
    ) -> Result<usize, RingError> {
        let mut copy = std::mem::take(&mut self.copy);
        let result = self.poll_payloads(mem, max_records, |p| {
            copy.clear();
            copy.reserve(p.len());
            let bytes = p.copy_to(copy.spare_capacity_mut());
            if !mem.intact() {
                // Zeros from a lost mapping, not the peer's record.
                return None;
            }
            Some(f(bytes))
        });
        self.copy = copy;
        result
    }

    /// Like [`ConsumerState::poll`], but `f` gets each payload still in
    /// the shared memory and copies it where it wants it (one copy, for
    /// readers that keep the bytes). `f` returns `None` to stop with an
    /// error (the memory was lost), `Some(more)` otherwise; the record it
    /// was given counts as read either way.
    pub fn poll_payloads<M: Memory>(
        &mut self,
        mem: &M,
        max_records: usize,
        mut f: impl FnMut(Payload<'_, M>) -> Option<bool>,
    ) -> Result<usize, RingError> {
        let cap = mem.capacity();
        let tail = mem.load_tail(Ordering::Acquire);
        let avail = tail.wrapping_sub(self.head);
        if avail > cap as u64 || !tail.is_multiple_of(8) || !self.head.is_multiple_of(8) {
            return Err(RingError::Corrupt(format!(
                "producer position {tail} is not within the ring (consumer at {})",
                self.head
            )));
        }
        let mut n = 0;
        let mut head = self.head;
        let result = loop {
            if head == tail || n == max_records {
                break Ok(n);
            }
            let at = (head as usize) & (cap - 1);
            let to_end = cap - at;
            let left = tail.wrapping_sub(head) as usize;
            if left < RECORD_HEADER {
                break Err(RingError::Corrupt("partial record header".into()));
            }
            // Read once into a local: the checks below and the use after
            // them see the same values whatever the peer writes meanwhile.
            let mut h = [0u8; RECORD_HEADER];
            // SAFETY: `at + 8 <= cap` and published (`left >= 8`); `h` is ours.
            unsafe { mem.read(at, h.as_mut_ptr(), RECORD_HEADER) };
            let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
            let kind = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
            match kind {
                KIND_PAD => {
                    if len + RECORD_HEADER != to_end || to_end > left {
                        break Err(RingError::Corrupt(format!(
                            "padding of {len} bytes at offset {at} does not end the ring"
                        )));
                    }
                    head = head.wrapping_add(to_end as u64);
                }
                KIND_DATA => {
                    let need = RECORD_HEADER + padded(len);
                    if len > max_record(cap) || need > to_end || need > left {
                        break Err(RingError::Corrupt(format!(
                            "record of {len} bytes at offset {at} overruns the ring"
                        )));
                    }
                    // Checked: `at + need <= cap` and published (`need <= left`).
                    let more = f(Payload {
                        mem,
                        offset: at + RECORD_HEADER,
                        len,
                    });
                    head = head.wrapping_add(need as u64);
                    n += 1;
                    match more {
                        Some(true) => {}
                        Some(false) => break Ok(n),
                        None => {
                            break Err(RingError::Corrupt(
                                "the shared memory was lost (file truncated)".into(),
                            ))
                        }
                    }
                }
                other => {
                    break Err(RingError::Corrupt(format!(
                        "unknown record kind {other:#x} at offset {at}"
                    )))
                }
            }
        };
        if head != self.head {
            self.head = head;
            mem.store_head(head, Ordering::Release);
        }
        result
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::{
        cell::{Cell, UnsafeCell},
        sync::atomic::AtomicU64,
    };

    /// Heap memory for single-threaded tests of the protocol.
    pub(crate) struct HeapMem {
        data: UnsafeCell<Vec<u8>>,
        tail: AtomicU64,
        head: AtomicU64,
        pub(crate) writes: Cell<usize>,
    }

    impl HeapMem {
        pub(crate) fn new(cap: usize) -> Self {
            Self {
                data: UnsafeCell::new(vec![0xAB; cap]),
                tail: AtomicU64::new(0),
                head: AtomicU64::new(0),
                writes: Cell::new(0),
            }
        }
        pub(crate) fn poke(&self, offset: usize, bytes: &[u8]) {
            unsafe { (&mut *self.data.get())[offset..offset + bytes.len()].copy_from_slice(bytes) }
        }
        pub(crate) fn set_tail(&self, v: u64) {
            self.tail.store(v, Ordering::Relaxed)
        }
    }

    unsafe impl Memory for HeapMem {
        fn capacity(&self) -> usize {
            unsafe { (&*self.data.get()).len() }
        }
        fn load_tail(&self, o: Ordering) -> u64 {
            self.tail.load(o)
        }
        fn store_tail(&self, v: u64, o: Ordering) {
            self.tail.store(v, o)
        }
        fn load_head(&self, o: Ordering) -> u64 {
            self.head.load(o)
        }
        fn store_head(&self, v: u64, o: Ordering) {
            self.head.store(v, o)
        }
        unsafe fn write(&self, offset: usize, src: &[u8]) {
            self.writes.set(self.writes.get() + 1);
            (&mut *self.data.get())[offset..offset + src.len()].copy_from_slice(src)
        }
        unsafe fn read(&self, offset: usize, dst: *mut u8, len: usize) {
            let src = &(&*self.data.get())[offset..offset + len];
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst, len)
        }
    }

    fn drain(c: &mut ConsumerState, m: &HeapMem) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        c.poll(m, usize::MAX, |r| {
            out.push(r.to_vec());
            true
        })
        .unwrap();
        out
    }

    #[test]
    fn empty_ring_reads_nothing() {
        let m = HeapMem::new(64);
        let mut c = ConsumerState::new(&m);
        assert!(!c.readable(&m));
        assert!(drain(&mut c, &m).is_empty());
    }

    #[test]
    fn records_are_invisible_until_published() {
        let m = HeapMem::new(64);
        let (mut p, mut c) = (ProducerState::new(&m), ConsumerState::new(&m));
        assert!(p.try_push(&m, b"abc").unwrap());
        assert!(!c.readable(&m));
        assert!(p.publish(&m));
        assert!(!p.publish(&m), "nothing new to publish");
        assert_eq!(drain(&mut c, &m), vec![b"abc".to_vec()]);
    }

    #[test]
    fn full_ring_refuses_until_consumer_releases() {
        // 64 bytes: three records of 16 (8 header + 8 payload) = 48; a
        // fourth fits exactly; a fifth does not.
        let m = HeapMem::new(64);
        let (mut p, mut c) = (ProducerState::new(&m), ConsumerState::new(&m));
        for i in 0..4u8 {
            assert!(p.try_push(&m, &[i; 8]).unwrap(), "record {i}");
        }
        assert!(
            !p.try_push(&m, &[9; 8]).unwrap(),
            "full: refused, nothing overwritten"
        );
        assert!(!p.fits(&m, 8).unwrap());
        p.publish(&m);
        let got = drain(&mut c, &m);
        assert_eq!(got, (0..4u8).map(|i| vec![i; 8]).collect::<Vec<_>>());
        assert!(p.fits(&m, 8).unwrap());
        assert!(p.try_push(&m, &[9; 8]).unwrap());
    }

    #[test]
    fn wrap_inserts_padding_and_keeps_order() {
        let m = HeapMem::new(64);
        let (mut p, mut c) = (ProducerState::new(&m), ConsumerState::new(&m));
        // 24 + 24 = 48: the next 24-byte record does not fit in the last
        // 16 bytes, so they become padding and it goes to offset 0.
        assert!(p.try_push(&m, &[1; 16]).unwrap());
        assert!(p.try_push(&m, &[2; 13]).unwrap()); // padded to 16
        p.publish(&m);
        assert_eq!(drain(&mut c, &m).len(), 2);
        assert!(p.try_push(&m, &[3; 16]).unwrap());
        assert_eq!(p.tail, 48 + 16 + 24, "padding of 16 then the record");
        p.publish(&m);
        assert_eq!(drain(&mut c, &m), vec![vec![3; 16]]);
    }

    #[test]
    fn many_variable_records_through_a_small_ring() {
        let m = HeapMem::new(256);
        let (mut p, mut c) = (ProducerState::new(&m), ConsumerState::new(&m));
        let mut sent = 0u32;
        let mut got = 0u32;
        while got < 10_000 {
            loop {
                let len = (sent as usize * 7) % 120;
                let rec: Vec<u8> = (0..len).map(|i| (sent as usize + i) as u8).collect();
                if sent == 10_000 || !p.try_push(&m, &rec).unwrap() {
                    break;
                }
                sent += 1;
            }
            p.publish(&m);
            c.poll(&m, 3, |r| {
                let len = (got as usize * 7) % 120;
                assert_eq!(r.len(), len);
                assert!(r
                    .iter()
                    .enumerate()
                    .all(|(i, b)| *b == (got as usize + i) as u8));
                got += 1;
                true
            })
            .unwrap();
        }
        assert!(!c.readable(&m));
    }

    #[test]
    fn empty_and_max_records() {
        let m = HeapMem::new(64);
        let (mut p, mut c) = (ProducerState::new(&m), ConsumerState::new(&m));
        assert_eq!(max_record(64), 24);
        assert!(p.try_push(&m, b"").unwrap());
        assert!(p.try_push(&m, &[7; 24]).unwrap());
        assert_eq!(
            p.try_push(&m, &[0; 25]),
            Err(RingError::TooLarge { len: 25, max: 24 })
        );
        p.publish(&m);
        assert_eq!(drain(&mut c, &m), vec![vec![], vec![7; 24]]);
        // The largest record always fits eventually, wherever the tail is.
        for _ in 0..20 {
            assert!(p.try_push(&m, &[5; 24]).unwrap());
            p.publish(&m);
            assert_eq!(drain(&mut c, &m), vec![vec![5; 24]]);
        }
    }

    #[test]
    fn stop_early_releases_only_what_was_read() {
        let m = HeapMem::new(64);
        let (mut p, mut c) = (ProducerState::new(&m), ConsumerState::new(&m));
        for i in 0..3u8 {
            p.try_push(&m, &[i]).unwrap();
        }
        p.publish(&m);
        let mut seen = Vec::new();
        c.poll(&m, usize::MAX, |r| {
            seen.push(r[0]);
            false
        })
        .unwrap();
        assert_eq!(seen, vec![0]);
        assert_eq!(m.load_head(Ordering::Relaxed), 16);
        assert_eq!(drain(&mut c, &m), vec![vec![1], vec![2]]);
    }

    #[test]
    fn corrupt_consumer_position_is_an_error_for_the_producer() {
        for head in [3u64, 1 << 40, u64::MAX - 7] {
            let m = HeapMem::new(64);
            let mut p = ProducerState::new(&m);
            for _ in 0..4 {
                assert!(p.try_push(&m, &[1; 8]).unwrap());
            }
            p.publish(&m);
            m.head.store(head, Ordering::Relaxed);
            assert!(
                matches!(p.try_push(&m, &[1; 8]), Err(RingError::Corrupt(_))),
                "head {head}"
            );
            assert!(p.fits(&m, 8).is_err(), "head {head}");
        }
    }

    #[test]
    fn corrupt_records_are_errors_not_reads_out_of_bounds() {
        type Corruption = Box<dyn Fn(&HeapMem)>;
        let cases: Vec<(&str, Corruption)> = vec![
            (
                "length beyond the ring",
                Box::new(|m| {
                    m.poke(0, &header(1_000_000, KIND_DATA));
                    m.set_tail(1_000_008);
                }),
            ),
            (
                "record overruns",
                Box::new(|m| {
                    m.poke(0, &header(20, KIND_DATA));
                    m.set_tail(16);
                }),
            ),
            (
                "unknown kind",
                Box::new(|m| {
                    m.poke(0, &header(0, 7));
                    m.set_tail(8);
                }),
            ),
            (
                "padding not at the end",
                Box::new(|m| {
                    m.poke(0, &header(8, KIND_PAD));
                    m.set_tail(16);
                }),
            ),
            (
                "unaligned tail",
                Box::new(|m| {
                    m.set_tail(3);
                }),
            ),
            (
                "tail behind head",
                Box::new(|m| {
                    m.set_tail(u64::MAX - 7);
                }),
            ),
        ];
        for (what, corrupt) in cases {
            let m = HeapMem::new(64);
            let mut c = ConsumerState::new(&m);
            corrupt(&m);
            let err = c.poll(&m, usize::MAX, |_| true);
            assert!(matches!(err, Err(RingError::Corrupt(_))), "{what}: {err:?}");
        }
    }
}

/// The position protocol under loom: every interleaving (within loom's
/// bounds) of a producer and a consumer on a tiny ring delivers every
/// record once, in order, intact, and never reads bytes the producer has
/// not published (loom flags such a read as a data race).
#[cfg(test)]
mod loom_tests {
    use super::*;
    use loom::{
        cell::UnsafeCell,
        sync::{
            atomic::{fence, AtomicU32, AtomicU64},
            Arc,
        },
        thread,
    };

    /// Data as one loom cell per 8-byte word, so loom tracks each word's
    /// accesses (records are 8-aligned, so a record owns whole words).
    struct LoomMem {
        words: Vec<UnsafeCell<u64>>,
        tail: AtomicU64,
        head: AtomicU64,
    }

    impl LoomMem {
        fn new(cap: usize) -> Self {
            Self {
                words: (0..cap / 8).map(|_| UnsafeCell::new(0)).collect(),
                tail: AtomicU64::new(0),
                head: AtomicU64::new(0),
            }
        }
    }

    unsafe impl Memory for LoomMem {
        fn capacity(&self) -> usize {
            self.words.len() * 8
        }
        fn load_tail(&self, o: Ordering) -> u64 {
            self.tail.load(o)
        }
        fn store_tail(&self, v: u64, o: Ordering) {
            self.tail.store(v, o)
        }
        fn load_head(&self, o: Ordering) -> u64 {
            self.head.load(o)
        }
        fn store_head(&self, v: u64, o: Ordering) {
            self.head.store(v, o)
        }
        unsafe fn write(&self, offset: usize, src: &[u8]) {
            // Writes start on a word; a short last word keeps its other bytes.
            for (i, chunk) in src.chunks(8).enumerate() {
                self.words[offset / 8 + i].with_mut(|w| {
                    let mut b = (*w).to_le_bytes();
                    b[..chunk.len()].copy_from_slice(chunk);
                    *w = u64::from_le_bytes(b);
                });
            }
        }
        unsafe fn read(&self, offset: usize, dst: *mut u8, len: usize) {
            let mut buf = Vec::with_capacity(len + 8);
            for i in 0..padded(len) / 8 {
                buf.extend_from_slice(&self.words[offset / 8 + i].with(|w| (*w).to_le_bytes()));
            }
            std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, len)
        }
    }

    #[test]
    fn positions_hand_over_records_safely() {
        loom::model(|| {
            // 32 bytes: records of 16 (8 + 1..3 payload), so the third
            // record waits for space and reuses the first record's words.
            let mem = Arc::new(LoomMem::new(32));
            let p_mem = mem.clone();
            let producer = thread::spawn(move || {
                let mut p = ProducerState::new(&*p_mem);
                for i in 1..=3u8 {
                    while !p.try_push(&*p_mem, &vec![i; i as usize]).unwrap() {
                        p.publish(&*p_mem);
                        thread::yield_now();
                    }
                    p.publish(&*p_mem);
                }
            });
            let mut c = ConsumerState::new(&*mem);
            let mut next = 1u8;
            while next <= 3 {
                c.poll(&*mem, usize::MAX, |r| {
                    assert_eq!(r, &vec![next; next as usize][..]);
                    next += 1;
                    true
                })
                .unwrap();
                thread::yield_now();
            }
            producer.join().unwrap();
        });
    }

    /// The sleep/wake handshake of [`super::super`]'s waits: the consumer
    /// sets its sleeping flag, fences, and checks for data; the producer
    /// publishes, fences, and checks the flag. In every interleaving,
    /// either the consumer sees the data or the producer sees the flag (so
    /// it wakes the sleeper): no lost wake-up.
    #[test]
    fn sleeping_flag_never_loses_a_wakeup() {
        loom::model(|| {
            let tail = Arc::new(AtomicU64::new(0));
            let sleeping = Arc::new(AtomicU32::new(0));
            let (t2, s2) = (tail.clone(), sleeping.clone());
            let producer = thread::spawn(move || {
                t2.store(1, Ordering::Release);
                fence(Ordering::SeqCst);
                s2.load(Ordering::Relaxed) != 0
            });
            sleeping.store(1, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            let consumer_saw_data = tail.load(Ordering::Acquire) != 0;
            let producer_saw_sleeper = producer.join().unwrap();
            assert!(consumer_saw_data || producer_saw_sleeper);
        });
    }
}
