//! Bounded fuzzing in CI: every entry point of `mesh::fuzzing` (the
//! decoders of peer input and the cores fed by peers) on a fixed number of
//! random and structure-aware inputs, plus every regression input under
//! `fuzz/regressions/`. Deterministic (fixed seeds, no persistence files).
//!
//! Each call must not panic, and must not allocate without bound: a
//! counting global allocator records, per call on this thread, the largest
//! single allocation and the peak of live bytes above what was live
//! before, and both must stay under [`bound`].
//!
//! Replay one regression input: `cargo test -p mesh --test fuzz_inputs
//! regressions`; the fuzzers themselves are in `fuzz/` (see its README).

// The counting allocator has to implement `GlobalAlloc`, an unsafe trait;
// it only forwards to the system allocator and counts.
#![allow(unsafe_code)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    path::{Path, PathBuf},
};

use mesh::fuzzing::{self, Family, Input, MAX_FRAME};
use proptest::{
    collection::vec,
    prelude::*,
    test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
};

// ---------------------------------------------------------------------------
// Counting allocator.

struct Counting;

thread_local! {
    // Const-initialised and without destructors: safe to touch from the
    // allocator (no allocation on first use).
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn grew(new: usize, old: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(new).saturating_sub(old);
        live.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
        let _ = LARGEST.try_with(|l| l.set(l.get().max(new)));
    });
}

fn shrank(size: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(size)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size(), 0);
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size(), 0);
        // SAFETY: forwarded as is.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrank(layout.size());
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grew(new_size, layout.size());
        // SAFETY: forwarded as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// What one call allocated: the largest single allocation and the peak of
/// live bytes above those live when it started.
#[derive(Debug, Clone, Copy)]
struct Usage {
    largest: usize,
    peak: usize,
}

fn measure(f: impl FnOnce()) -> Usage {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    LARGEST.with(|l| l.set(0));
    f();
    Usage {
        largest: LARGEST.with(Cell::get),
        peak: PEAK.with(Cell::get).saturating_sub(base),
    }
}

/// The most one call on `len` input bytes may allocate (its largest
/// single allocation and its peak of live bytes alike): twice the frame
/// limit (a peer may announce a frame of up to the limit and the reader
/// makes room for it; `frames` runs two readers side by side), 1 MiB for
/// the state of the cores and read chunks (64 KiB), and 96 bytes per input
/// byte (decoded lists of borrowed fields, and frames that structured steps
/// build from a few bytes each).
fn bound(len: usize) -> usize {
    2 * MAX_FRAME + 1024 * 1024 + 96 * len
}

// ---------------------------------------------------------------------------
// The entry points.

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("frames", fuzzing::frames),
    ("wire", fuzzing::wire),
    ("handshake", fuzzing::handshake),
    ("control", fuzzing::control),
    ("queue_host", fuzzing::queue_host),
    ("queue_consumer", fuzzing::queue_consumer),
    ("stream", fuzzing::stream),
    ("gossip", fuzzing::gossip),
    ("membership", fuzzing::membership),
    ("pubsub", fuzzing::pubsub),
    ("node", fuzzing::node),
    ("engine", fuzzing::engine),
];

fn target(name: &str) -> Target {
    TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no fuzz target {name}"))
}

/// Runs `f` on `input` and checks the allocation bounds.
fn check(name: &str, f: Target, input: &[u8]) -> Result<Usage, TestCaseError> {
    let usage = measure(|| f(input));
    let limit = bound(input.len());
    prop_assert!(
        usage.largest <= limit && usage.peak <= limit,
        "{name}: {} input bytes allocated {usage:?}, over the bound of {limit}",
        input.len()
    );
    Ok(usage)
}

/// Random cases per target and kind of input (each kind runs this many).
const CASES: u32 = 512;

fn runner(seed: u8) -> TestRunner {
    let config = Config {
        cases: CASES,
        failure_persistence: None,
        max_shrink_iters: 2048,
        ..Config::default()
    };
    TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]),
    )
}

fn run(name: &str, seed: u8, strategy: impl Strategy<Value = Vec<u8>>) {
    let f = target(name);
    let most = Cell::new((0, 0, 0));
    let result = runner(seed).run(&strategy, |input| {
        let usage = check(name, f, &input)?;
        let (largest, peak, len) = most.get();
        most.set((
            largest.max(usage.largest),
            peak.max(usage.peak),
            len.max(input.len()),
        ));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    // Seen with --nocapture: how close the cases came to the bound.
    let (largest, peak, len) = most.get();
    println!("{name} (seed {seed}): {CASES} cases, inputs up to {len} bytes, largest allocation {largest}, peak {peak} bytes");
}

// ---------------------------------------------------------------------------
// Structure-aware inputs.

/// How a valid input is mangled.
#[derive(Debug, Clone)]
enum Mutation {
    None,
    Truncate(usize),
    FlipBit(usize, u8),
    /// A byte (a varint length, often) set to a large value.
    Set(usize, u8),
    /// A huge varint spliced in (a length or count of billions).
    HugeVarint(usize),
    /// A u32 length prefix replaced.
    Prefix(usize, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => Just(Mutation::None),
        2 => any::<usize>().prop_map(Mutation::Truncate),
        2 => (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        1 => (any::<usize>(), prop_oneof![Just(0x7f), Just(0xff), any::<u8>()])
            .prop_map(|(i, v)| Mutation::Set(i, v)),
        1 => any::<usize>().prop_map(Mutation::HugeVarint),
        1 => (any::<usize>(), prop_oneof![
            Just(u32::MAX),
            Just(MAX_FRAME as u32),
            Just(MAX_FRAME as u32 + 1),
            Just(0),
            any::<u32>(),
        ])
            .prop_map(|(i, v)| Mutation::Prefix(i, v)),
    ]
}

fn mutate(mut b: Vec<u8>, m: &Mutation) -> Vec<u8> {
    let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
    match *m {
        Mutation::None => {}
        Mutation::Truncate(i) => b.truncate(at(i, b.len() + 1)),
        Mutation::FlipBit(i, bit) => {
            let i = at(i, b.len());
            if let Some(x) = b.get_mut(i) {
                *x ^= 1 << bit;
            }
        }
        Mutation::Set(i, v) => {
            let i = at(i, b.len());
            if let Some(x) = b.get_mut(i) {
                *x = v;
            }
        }
        Mutation::HugeVarint(i) => {
            let i = at(i, b.len() + 1);
            b.splice(i..i, [0xff, 0xff, 0xff, 0xff, 0x0f]);
        }
        Mutation::Prefix(i, v) => {
            let i = at(i, b.len().saturating_sub(3).max(1));
            if b.len() >= i + 4 {
                b[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    b
}

/// A frame body of any variant: a fixed sample of each, or one built from
/// random bytes.
fn body(family: Family) -> impl Strategy<Value = Vec<u8>> {
    let samples = fuzzing::sample_bodies();
    prop_oneof![
        proptest::sample::select(samples),
        vec(any::<u8>(), 0..256)
            .prop_map(move |b| fuzzing::arbitrary_body(&mut Input::new(&b), family)),
    ]
}

fn framed(bodies: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in bodies {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    }
    out
}

/// Valid frame bodies, mangled.
fn mutated_body(family: Family) -> impl Strategy<Value = Vec<u8>> {
    (body(family), mutation()).prop_map(|(b, m)| mutate(b, &m))
}

/// A stream of length-prefixed frames, mangled (lengths too), behind a
/// chunking schedule.
fn mutated_stream(first_hello: bool) -> impl Strategy<Value = Vec<u8>> {
    (
        vec(body(Family::Any), 0..6),
        vec(any::<u8>(), 0..8),
        mutation(),
        any::<u64>(),
    )
        .prop_map(move |(mut bodies, sizes, m, hello)| {
            if first_hello {
                // Variant 0 (Hello), the right magic and version, then
                // random fields.
                let mut seed = vec![0u8, 0, 0];
                seed.extend(hello.to_le_bytes());
                bodies.insert(
                    0,
                    fuzzing::arbitrary_body(&mut Input::new(&seed), Family::Any),
                );
            }
            let mut input = vec![sizes.len() as u8];
            input.extend_from_slice(&sizes);
            input.extend(mutate(framed(&bodies), &m));
            input
        })
}

/// Core harness steps: link-ups first, then raw steps carrying valid
/// (mangled) frame bodies, mixed with structured steps built from random
/// bytes.
fn core_steps(family: Family) -> impl Strategy<Value = Vec<u8>> {
    (
        vec(
            prop_oneof![
                (0u8..4, mutated_body(family)).prop_map(|(peer, b)| {
                    let len = b.len().min(u16::MAX as usize);
                    let mut s = vec![peer << 6];
                    s.extend_from_slice(&(len as u16).to_le_bytes());
                    s.extend_from_slice(&b[..len]);
                    s
                }),
                vec(any::<u8>(), 1..64),
            ],
            0..24,
        ),
        any::<u8>(),
    )
        .prop_map(|(steps, links)| {
            // Link steps (byte 60 + peer) with the 10 zero bytes that
            // build a valid Hello; then the steps.
            let mut input = Vec::new();
            for peer in 0..3u8 {
                if links & (1 << peer) != 0 {
                    input.push(60 | (peer << 6));
                    input.extend_from_slice(&[0; 10]);
                }
            }
            for s in steps {
                input.extend(s);
            }
            input
        })
}

fn random_bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..1024)
}

// ---------------------------------------------------------------------------
// Tests: random bytes, then structure-aware inputs, per target.

#[test]
fn frames() {
    run("frames", 1, random_bytes());
    run("frames", 2, mutated_stream(false));
}

#[test]
fn wire() {
    run("wire", 3, random_bytes());
    run("wire", 4, mutated_body(Family::Any));
}

#[test]
fn handshake() {
    run("handshake", 5, random_bytes());
    run("handshake", 6, mutated_stream(true));
}

#[test]
fn control() {
    run("control", 7, random_bytes());
    run("control", 8, mutated_stream(false));
}

#[test]
fn queue_host() {
    run("queue_host", 9, random_bytes());
    run("queue_host", 10, core_steps(Family::QueueHost));
}

#[test]
fn queue_consumer() {
    run("queue_consumer", 11, random_bytes());
    run("queue_consumer", 12, core_steps(Family::QueueConsumer));
}

#[test]
fn stream() {
    run("stream", 13, random_bytes());
    run("stream", 14, core_steps(Family::Stream));
}

#[test]
fn gossip() {
    run("gossip", 15, random_bytes());
    run("gossip", 16, core_steps(Family::Gossip));
}

#[test]
fn membership() {
    run("membership", 17, random_bytes());
    run("membership", 18, core_steps(Family::Membership));
}

#[test]
fn pubsub() {
    run("pubsub", 19, random_bytes());
    run("pubsub", 20, core_steps(Family::PubSub));
}

#[test]
fn node() {
    run("node", 21, random_bytes());
    run("node", 22, core_steps(Family::Any));
}

#[test]
fn engine() {
    run("engine", 23, random_bytes());
    run("engine", 24, core_steps(Family::Any));
}

/// The harness drives the real node: a peer's `Send` to a queue is
/// accepted by the node's queue host, a `Msg` on a topic it has not named
/// closes the link as malformed, and a garbage frame too.
#[test]
fn the_harness_drives_the_real_node() {
    use mesh::wire::{Frame, MsgWire, Raw, WorkWire};
    let body = |f: &Frame<'_>| postcard::to_stdvec(f).expect("encodes");
    let send = body(&Frame::Work(WorkWire::Send {
        queue: "q",
        seq: 1,
        delay_ms: 0,
        ttl_ms: 0,
        dedup: None,
        headers: vec![],
        payload: Raw(b"job"),
    }));
    let m = fuzzing::through_node(&send).expect("metrics");
    assert_eq!(m.queues.accepted, 1, "{m:?}");
    assert_eq!(m.dropped.malformed, 0, "{m:?}");
    let msg = body(&Frame::Msg(MsgWire {
        topic: 3,
        name: None,
        seq_delta: 1,
        ts_delta: 0,
        headers: vec![],
        payload: Raw(b"x"),
    }));
    for bad in [msg, vec![0xff; 9]] {
        let m = fuzzing::through_node(&bad).expect("metrics");
        assert_eq!(m.dropped.malformed, 1, "{m:?}");
        assert_eq!(m.queues.accepted, 0);
    }
}

/// The samples are valid frames of every variant (so the structure-aware
/// inputs start from each): 14 plain variants of `Frame`, and those of
/// `Member` (4), `Gossip` (11), `Work` (16) and `Stream` (16).
#[test]
fn samples_cover_every_variant() {
    let samples = fuzzing::sample_bodies();
    let mut names = std::collections::BTreeSet::new();
    for b in &samples {
        let frame = mesh::wire::decode(b).unwrap_or_else(|e| panic!("{b:?}: {e}"));
        names.insert(fuzzing::variant_name(&frame));
    }
    assert_eq!(names.len(), 15 + 4 + 11 + 16 + 16, "{names:?}");
}

// ---------------------------------------------------------------------------
// Regression inputs found by the fuzzers.

fn regressions_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions")
}

#[test]
fn regressions() {
    let dir = regressions_dir();
    let Ok(targets) = std::fs::read_dir(&dir) else {
        panic!("no regression inputs at {}", dir.display());
    };
    let mut replayed = 0;
    for t in targets.flatten() {
        let name = t.file_name().to_string_lossy().into_owned();
        let f = target(&name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(t.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for path in files {
            let input = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if let Err(e) = check(&name, f, &input) {
                panic!("{}: {e}", path.display());
            }
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no regression inputs in {}", dir.display());
}

/// Seeds for the fuzzers (not run by default): valid frames of every
/// variant, as each target reads them, into `fuzz/corpus/TARGET/`:
/// `cargo test -p mesh --test fuzz_inputs -- --ignored write_seed_corpus`.
#[test]
#[ignore = "writes fuzz/corpus; run by hand before fuzzing"]
fn write_seed_corpus() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let samples = fuzzing::sample_bodies();
    let write = |target: &str, i: usize, bytes: &[u8]| {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        std::fs::write(dir.join(format!("seed-{i:03}")), bytes).expect("seed file");
    };
    for (i, b) in samples.iter().enumerate() {
        write("wire", i, b);
        // A stream: no chunking schedule, then the frame.
        let mut stream = vec![0];
        stream.extend(framed(std::slice::from_ref(b)));
        for t in ["frames", "handshake", "control"] {
            write(t, i, &stream);
        }
        // A core step: a link comes up, then the frame as a raw step.
        let mut steps = vec![60];
        steps.extend_from_slice(&[0; 10]);
        steps.push(0);
        steps.extend_from_slice(&(b.len().min(u16::MAX as usize) as u16).to_le_bytes());
        steps.extend_from_slice(b);
        for t in [
            "queue_host",
            "queue_consumer",
            "stream",
            "gossip",
            "membership",
            "pubsub",
            "node",
            "engine",
        ] {
            write(t, i, &steps);
        }
    }
}

/// Frames whose lists are as long as a frame of `SIZE` bytes allows, each
/// element as small as it can be: the largest decoded size per wire byte,
/// through the decoder and through a node (after a link-up). A `Graft` of
/// 512k ids decoded into 51 MB (98 bytes per wire byte) until the codec
/// refused Grafts longer than the gossip core's pull window.
#[test]
fn longest_lists() {
    use mesh::wire::{
        AppendWire, DeliverWire, Frame, GossipWire, MemberWire, Raw, StreamWire, UpdateWire,
        WorkWire,
    };
    const SIZE: usize = 1024 * 1024;
    let id = fuzzing::id_bytes(1);
    let n = SIZE / 2;
    let frames: Vec<(&str, Frame<'_>)> = vec![
        (
            "Graft",
            Frame::Gossip(GossipWire::Graft {
                groups: vec![(Raw(id), vec![1; n])],
            }),
        ),
        (
            "IHave",
            Frame::Gossip(GossipWire::IHave {
                groups: vec![(Raw(id), vec![(1, 1); n / 2])],
            }),
        ),
        (
            "Shuffle",
            Frame::Gossip(GossipWire::Shuffle {
                origin: Raw(id),
                ttl: 1,
                nodes: vec![Raw(&[]); n],
            }),
        ),
        (
            "Acks",
            Frame::Work(WorkWire::Acks {
                cid: 1,
                epoch: 1,
                tags: vec![1; n],
            }),
        ),
        (
            "Deliver",
            Frame::Work(WorkWire::Deliver {
                queue: "q",
                cid: 1,
                epoch: 1,
                msgs: vec![
                    DeliverWire {
                        tag: 1,
                        attempt: 1,
                        origin: None,
                        seq: 1,
                        dead: None,
                        headers: vec![],
                        payload: Raw(&[]),
                    };
                    n / 8
                ],
            }),
        ),
        (
            "Append",
            Frame::Stream(StreamWire::Append {
                stream: "s",
                seq: 1,
                records: vec![
                    AppendWire {
                        key: Raw(&[]),
                        ts_ms: 1,
                        headers: vec![],
                        payload: Raw(&[]),
                    };
                    n / 4
                ],
            }),
        ),
        (
            "Ping",
            Frame::Member(MemberWire::Ping {
                seq: 1,
                updates: vec![
                    UpdateWire {
                        node: Raw(id),
                        incarnation: 1,
                        state: mesh::core::membership::MemberState::Alive,
                        addrs: vec![],
                        sig: Raw(&[]),
                    };
                    SIZE / (id.len() + 4)
                ],
            }),
        ),
        (
            "Headers",
            Frame::Work(WorkWire::Request {
                id: 1,
                subject: "a.b",
                headers: vec![("", Raw(&[])); n],
                payload: Raw(&[]),
            }),
        ),
    ];
    // What a node holds anyway (started, a link up, an empty frame): a
    // frame's cost through the node is counted above it. (The node's
    // allocations are counted on this thread: it runs on a current-thread
    // runtime.)
    let idle = measure(|| fuzzing::one_frame(&[])).peak;
    println!("an idle node with a link: peak {idle} bytes");
    for (name, frame) in frames {
        let body = postcard::to_stdvec(&frame).expect("encodes");
        for (target, f) in [
            ("wire", fuzzing::wire as Target),
            ("one_frame", fuzzing::one_frame),
        ] {
            let usage = check(name, f, &body).unwrap_or_else(|e| panic!("{target}: {e}"));
            // Through a node the frame also sits in the harness's stream
            // and in the link reader's buffer (which grows by doubling).
            let base = if target == "one_frame" {
                idle + 3 * body.len()
            } else {
                0
            };
            // Without a frame reader's buffer, only the per-byte cost
            // counts: at most 80 bytes decoded and kept per wire byte (the
            // worst, a stream host's records: 75).
            let limit = base
                + match (name, target) {
                    // Refused by its count before anything is allocated
                    // for the headers (once about 45 bytes per wire byte).
                    ("Headers", _) => 1024 * 1024 + body.len(),
                    // The consumer's inbox takes them (up to its limit of
                    // 64 Ki deliveries, about 320 bytes each) while the
                    // decoded frame (38 per wire byte) is still held: 83
                    // per wire byte at most. The harness before the real
                    // node modelled the inbox as 24-byte tuples.
                    ("Deliver", "one_frame") => 1024 * 1024 + 90 * body.len(),
                    _ => 1024 * 1024 + 80 * body.len(),
                };
            assert!(
                usage.peak <= limit,
                "{name} into {target}: {} bytes allocated {usage:?}, over {limit}",
                body.len()
            );
            println!(
                "{name} into {target}: {} bytes, peak {} bytes ({}x)",
                body.len(),
                usage.peak,
                usage.peak / body.len()
            );
        }
    }
}
