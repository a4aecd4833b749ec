//! Event-time windowed aggregation: tumbling and sliding (hopping) windows
//! per key, with a watermark, allowed lateness and bounded state.
//!
//! The core, [`Windowed`], is sans-IO: it never reads a clock. Every record
//! carries its own event time (milliseconds since the Unix epoch) and the
//! watermark is derived from those times, or moved by the caller with
//! [`Windowed::advance_watermark`] when a source is idle. [`aggregate`] is a
//! thin adapter that runs it over a [`futures::Stream`].
//!
//! - [`Windows`]: the window spec (tumbling or sliding), validated up front
//!   ([`WindowError`]).
//! - [`Aggregate`]: what is computed per (window, key); built-ins [`Count`],
//!   [`Sum`], [`Min`], [`Max`], [`Mean`], [`Stats`] and the user's [`Fold`].
//! - [`WindowResult`]: one emitted result.
//!
//! Call order: [`Windowed::push`] for each record, each call returning the
//! results it caused to fire; [`Windowed::advance_watermark`] when no records
//! arrive but time moves on; [`Windowed::flush`] once at end of input.
//!
//! Several sources (the partitions of a stream, several sensors) arrive
//! interleaved, each in its own time: set [`Windowed::out_of_orderness`] to
//! the skew you accept between them, or take the watermark into your own
//! hands: `out_of_orderness(Duration::MAX)` keeps the records from moving
//! it, and [`Windowed::advance_watermark`] with the smallest of the
//! sources' latest event times fires each window once every source is past
//! it (what `mesh demo` does).
//!
//! ```
//! use std::time::Duration;
//! use mesh::window::{Count, Windowed, Windows};
//!
//! let windows = Windows::tumbling(Duration::from_secs(10))?;
//! let mut clicks = Windowed::new(windows, Count);
//! assert!(clicks.push("home", 1_000, ()).is_empty());
//! assert!(clicks.push("home", 4_000, ()).is_empty());
//! // The watermark passes 10 s: the window [0 s, 10 s) fires.
//! let fired = clicks.push("cart", 12_000, ());
//! assert_eq!(fired.len(), 1);
//! assert_eq!((fired[0].key, fired[0].start_ms, fired[0].end_ms), ("home", 0, 10_000));
//! assert_eq!(fired[0].value, 2);
//! // End of input fires what is still open.
//! let rest = clicks.flush();
//! assert_eq!((rest[0].key, rest[0].value), ("cart", 1));
//! # Ok::<(), mesh::window::WindowError>(())
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::marker::PhantomData;
use std::ops::Bound;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};

/// The most windows one record may belong to (`size / slide`, rounded up).
/// A record costs this much work and state, so a spec above it is refused.
pub const MAX_WINDOWS_PER_RECORD: u64 = 10_000;

/// The default of [`Windowed::max_keys`]: open (window, key) states.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// Why a window spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// The window size is zero.
    #[error("window size must be at least 1 ms")]
    ZeroSize,
    /// The slide is zero.
    #[error("window slide must be at least 1 ms")]
    ZeroSlide,
    /// The slide exceeds the size, so windows would leave gaps between them.
    #[error(
        "window slide ({slide_ms} ms) exceeds its size ({size_ms} ms); use a slide of at most the size"
    )]
    SlideExceedsSize {
        /// The window size in milliseconds.
        size_ms: u64,
        /// The slide in milliseconds.
        slide_ms: u64,
    },
    /// Each record would belong to more than [`MAX_WINDOWS_PER_RECORD`]
    /// windows.
    #[error(
        "each record would belong to {per_record} windows (limit {limit}); use a larger slide"
    )]
    TooManyWindows {
        /// `size / slide`, rounded up.
        per_record: u64,
        /// [`MAX_WINDOWS_PER_RECORD`].
        limit: u64,
    },
    /// A duration is not a whole number of milliseconds that fits in a u64.
    #[error(
        "window {what} of {duration:?} is not a whole number of milliseconds (up to u64::MAX)"
    )]
    NotMillis {
        /// `"size"` or `"slide"`.
        what: &'static str,
        /// The duration given.
        duration: Duration,
    },
}

/// A window spec: windows `[start, start + size)` for every `start` that is
/// a multiple of `slide`. Tumbling windows are the case `slide == size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    size_ms: u64,
    slide_ms: u64,
}

impl Windows {
    /// Back-to-back windows of `size`: each record is in exactly one.
    pub fn tumbling(size: Duration) -> Result<Self, WindowError> {
        Self::sliding(size, size)
    }

    /// Overlapping (hopping) windows of `size`, one starting every `slide`:
    /// each record is in about `size / slide` of them. `slide` need not
    /// divide `size`, but may not exceed it.
    pub fn sliding(size: Duration, slide: Duration) -> Result<Self, WindowError> {
        let size_ms = whole_millis("size", size)?;
        let slide_ms = whole_millis("slide", slide)?;
        if size_ms == 0 {
            return Err(WindowError::ZeroSize);
        }
        if slide_ms == 0 {
            return Err(WindowError::ZeroSlide);
        }
        if slide_ms > size_ms {
            return Err(WindowError::SlideExceedsSize { size_ms, slide_ms });
        }
        let per_record = size_ms.div_ceil(slide_ms);
        if per_record > MAX_WINDOWS_PER_RECORD {
            return Err(WindowError::TooManyWindows {
                per_record,
                limit: MAX_WINDOWS_PER_RECORD,
            });
        }
        Ok(Self { size_ms, slide_ms })
    }

    /// The window size.
    pub fn size(&self) -> Duration {
        Duration::from_millis(self.size_ms)
    }

    /// The distance between window starts (the size, for tumbling windows).
    pub fn slide(&self) -> Duration {
        Duration::from_millis(self.slide_ms)
    }

    /// The windows `(start_ms, end_ms)` holding a record at `time_ms`, by
    /// ascending start. `end_ms` saturates at `u64::MAX`.
    pub fn windows_of(&self, time_ms: u64) -> impl Iterator<Item = (u64, u64)> {
        let (size, slide) = (self.size_ms, self.slide_ms);
        // The smallest multiple of `slide` above `time_ms - size`; no overflow
        // since it is at most `time_ms` (slide <= size).
        let first = match time_ms.checked_sub(size) {
            None => 0,
            Some(d) => (d / slide) * slide + slide,
        };
        let mut next = Some(first);
        std::iter::from_fn(move || {
            let start = next.filter(|&s| s <= time_ms)?;
            next = start.checked_add(slide);
            Some((start, start.saturating_add(size)))
        })
    }
}

fn whole_millis(what: &'static str, duration: Duration) -> Result<u64, WindowError> {
    let ms = u64::try_from(duration.as_millis()).ok();
    match ms {
        Some(ms) if duration.subsec_nanos().is_multiple_of(1_000_000) => Ok(ms),
        _ => Err(WindowError::NotMillis { what, duration }),
    }
}

/// Whole milliseconds, rounded down, saturating at `u64::MAX`.
fn millis_saturating(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What is computed per (window, key) over values of type `V`: an
/// accumulator started by [`init`](Aggregate::init), updated by
/// [`add`](Aggregate::add) for each record, read by
/// [`finish`](Aggregate::finish) each time the window fires.
pub trait Aggregate<V> {
    /// The running state of one (window, key).
    type Acc;
    /// The emitted result.
    type Out;
    /// A fresh accumulator, before the first value.
    fn init(&self) -> Self::Acc;
    /// Adds one value.
    fn add(&self, acc: &mut Self::Acc, value: &V);
    /// The result so far; may be called again after more values (late
    /// updates), so it does not consume the accumulator.
    fn finish(&self, acc: &Self::Acc) -> Self::Out;
}

/// The number of records, for values of any type.
#[derive(Debug, Clone, Copy, Default)]
pub struct Count;

impl<V> Aggregate<V> for Count {
    type Acc = u64;
    type Out = u64;
    fn init(&self) -> u64 {
        0
    }
    fn add(&self, acc: &mut u64, _: &V) {
        *acc = acc.saturating_add(1);
    }
    fn finish(&self, acc: &u64) -> u64 {
        *acc
    }
}

/// The sum of the values, as f64.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sum;

impl<V: Into<f64> + Copy> Aggregate<V> for Sum {
    type Acc = f64;
    type Out = f64;
    fn init(&self) -> f64 {
        0.0
    }
    fn add(&self, acc: &mut f64, v: &V) {
        *acc += (*v).into();
    }
    fn finish(&self, acc: &f64) -> f64 {
        *acc
    }
}

/// The smallest value, as f64 (NaNs are ignored, as by [`f64::min`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Min;

impl<V: Into<f64> + Copy> Aggregate<V> for Min {
    type Acc = f64;
    type Out = f64;
    fn init(&self) -> f64 {
        f64::INFINITY
    }
    fn add(&self, acc: &mut f64, v: &V) {
        *acc = acc.min((*v).into());
    }
    fn finish(&self, acc: &f64) -> f64 {
        *acc
    }
}

/// The largest value, as f64 (NaNs are ignored, as by [`f64::max`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Max;

impl<V: Into<f64> + Copy> Aggregate<V> for Max {
    type Acc = f64;
    type Out = f64;
    fn init(&self) -> f64 {
        f64::NEG_INFINITY
    }
    fn add(&self, acc: &mut f64, v: &V) {
        *acc = acc.max((*v).into());
    }
    fn finish(&self, acc: &f64) -> f64 {
        *acc
    }
}

/// The arithmetic mean of the values, as f64.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mean;

impl<V: Into<f64> + Copy> Aggregate<V> for Mean {
    type Acc = Summary;
    type Out = f64;
    fn init(&self) -> Summary {
        Summary::EMPTY
    }
    fn add(&self, acc: &mut Summary, v: &V) {
        acc.add((*v).into());
    }
    fn finish(&self, acc: &Summary) -> f64 {
        acc.mean
    }
}

/// Count, sum, min, max and mean at once, as a [`Summary`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats;

impl<V: Into<f64> + Copy> Aggregate<V> for Stats {
    type Acc = Summary;
    type Out = Summary;
    fn init(&self) -> Summary {
        Summary::EMPTY
    }
    fn add(&self, acc: &mut Summary, v: &V) {
        acc.add((*v).into());
    }
    fn finish(&self, acc: &Summary) -> Summary {
        *acc
    }
}

/// The result of [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// The number of values.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
    /// The smallest (`+inf` when empty).
    pub min: f64,
    /// The largest (`-inf` when empty).
    pub max: f64,
    /// `sum / count` (`NaN` when empty; never emitted empty).
    pub mean: f64,
}

impl Summary {
    const EMPTY: Self = Self {
        count: 0,
        sum: 0.0,
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
        mean: f64::NAN,
    };

    fn add(&mut self, v: f64) {
        self.count = self.count.saturating_add(1);
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.mean = self.sum / self.count as f64;
    }
}

/// A user fold: starts each (window, key) from a clone of `init` and calls
/// `f(&mut acc, &value)` per record; the result is the accumulator.
///
/// ```
/// use mesh::window::Fold;
/// // The longest message seen.
/// let longest = Fold::new(0usize, |acc: &mut usize, v: &String| *acc = (*acc).max(v.len()));
/// # let _ = longest;
/// ```
pub struct Fold<Acc, V, F> {
    init: Acc,
    f: F,
    _value: PhantomData<fn(&V)>,
}

impl<Acc: Clone, V, F: Fn(&mut Acc, &V)> Fold<Acc, V, F> {
    /// A fold from `init` with step `f`.
    pub fn new(init: Acc, f: F) -> Self {
        Self {
            init,
            f,
            _value: PhantomData,
        }
    }
}

impl<Acc: Clone, V, F: Fn(&mut Acc, &V)> Aggregate<V> for Fold<Acc, V, F> {
    type Acc = Acc;
    type Out = Acc;
    fn init(&self) -> Acc {
        self.init.clone()
    }
    fn add(&self, acc: &mut Acc, v: &V) {
        (self.f)(acc, v)
    }
    fn finish(&self, acc: &Acc) -> Acc {
        acc.clone()
    }
}

impl<Acc: fmt::Debug, V, F> fmt::Debug for Fold<Acc, V, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fold")
            .field("init", &self.init)
            .finish_non_exhaustive()
    }
}

/// One result: the aggregate of `key` over the window `[start_ms, end_ms)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowResult<K, O> {
    /// The key.
    pub key: K,
    /// The window start (inclusive), ms since the epoch.
    pub start_ms: u64,
    /// The window end (exclusive), ms since the epoch; saturates at
    /// `u64::MAX`.
    pub end_ms: u64,
    /// The aggregate.
    pub value: O,
    /// This (window, key) was emitted before, and this result, which
    /// includes a late record, replaces that one.
    pub update: bool,
}

/// Keyed event-time windows computing `A` per (window, key).
///
/// Semantics:
/// - The watermark is the largest event time seen minus
///   [`out_of_orderness`](Self::out_of_orderness), or what
///   [`advance_watermark`](Self::advance_watermark) set, whichever is later;
///   it never goes back. It starts at 0, so nothing is late before the first
///   record.
/// - A window `[start, end)` fires once the watermark is `>= end`.
/// - A record for a fired window is still added while
///   `end + allowed_lateness > watermark`, and that (window, key) is emitted
///   again at once; `update` is true if it had been emitted before. A record
///   too late for all its windows is dropped and counted in
///   [`late_dropped`](Self::late_dropped). A window's state is freed once the
///   watermark is `>= end + allowed_lateness`.
/// - At most [`max_keys`](Self::max_keys) (window, key) states are held. Past
///   that, the oldest window is fired early (its unfired keys emitted with
///   what they have) and closed: later records for it count as late. Its
///   states are counted in [`evicted`](Self::evicted).
/// - Each call returns its results by window end, then key.
/// - Arithmetic saturates: times near `u64::MAX` do not overflow or panic.
pub struct Windowed<K, V, A: Aggregate<V>> {
    windows: Windows,
    aggregate: A,
    out_of_orderness_ms: u64,
    allowed_lateness_ms: u64,
    max_keys: usize,
    watermark: u64,
    /// Windows with `end <= closed_through` were evicted: they take no more
    /// records.
    closed_through: u64,
    /// By (end, start), then key. Bounded by `max_keys` states in all.
    state: BTreeMap<(u64, u64), BTreeMap<K, A::Acc>>,
    open: usize,
    late_dropped: u64,
    evicted: u64,
    _value: PhantomData<fn(&V)>,
}

impl<K: Ord + Clone, V, A: Aggregate<V>> Windowed<K, V, A> {
    /// Windows of `windows` computing `aggregate`, with no out-of-orderness,
    /// no allowed lateness and [`DEFAULT_MAX_KEYS`].
    pub fn new(windows: Windows, aggregate: A) -> Self {
        Self {
            windows,
            aggregate,
            out_of_orderness_ms: 0,
            allowed_lateness_ms: 0,
            max_keys: DEFAULT_MAX_KEYS,
            watermark: 0,
            closed_through: 0,
            state: BTreeMap::new(),
            open: 0,
            late_dropped: 0,
            evicted: 0,
            _value: PhantomData,
        }
    }

    /// How far behind the largest event time seen the watermark trails:
    /// records up to this much out of order are on time. Whole ms, rounded
    /// down. Default 0.
    pub fn out_of_orderness(mut self, d: Duration) -> Self {
        self.out_of_orderness_ms = millis_saturating(d);
        self
    }

    /// How long after a window fired its state is kept for late records,
    /// which re-fire it. Whole ms, rounded down. Default 0.
    pub fn allowed_lateness(mut self, d: Duration) -> Self {
        self.allowed_lateness_ms = millis_saturating(d);
        self
    }

    /// The most (window, key) states held at once (at least 1). Default
    /// [`DEFAULT_MAX_KEYS`].
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n.max(1);
        self
    }

    /// Adds a record; returns the results it caused: late updates, early
    /// fires of evicted windows, and windows its time moved the watermark
    /// past.
    #[must_use = "the returned results are the operator's output"]
    pub fn push(&mut self, key: K, time_ms: u64, value: V) -> Vec<WindowResult<K, A::Out>> {
        let mut out = Vec::new();
        self.push_into(key, time_ms, value, &mut out);
        out
    }

    /// [`push`](Self::push), appending the results to `out`.
    pub fn push_into(
        &mut self,
        key: K,
        time_ms: u64,
        value: V,
        out: &mut Vec<WindowResult<K, A::Out>>,
    ) {
        let mut added = false;
        for (start, end) in self.windows.windows_of(time_ms) {
            if end <= self.closed_through
                || end.saturating_add(self.allowed_lateness_ms) <= self.watermark
            {
                continue;
            }
            added = true;
            let keys = self.state.entry((end, start)).or_default();
            let fired = end <= self.watermark;
            let (acc, is_new) = match keys.get_mut(&key) {
                Some(acc) => (acc, false),
                None => (
                    keys.entry(key.clone()).or_insert(self.aggregate.init()),
                    true,
                ),
            };
            self.aggregate.add(acc, &value);
            if fired {
                out.push(WindowResult {
                    key: key.clone(),
                    start_ms: start,
                    end_ms: end,
                    value: self.aggregate.finish(acc),
                    update: !is_new,
                });
            }
            if is_new {
                self.open += 1;
                while self.open > self.max_keys {
                    self.evict_oldest(out);
                }
            }
        }
        if !added {
            self.late_dropped = self.late_dropped.saturating_add(1);
        }
        let watermark = time_ms.saturating_sub(self.out_of_orderness_ms);
        self.fire(watermark, out);
    }

    /// Moves the watermark to `time_ms` (if later) without a record, for an
    /// idle source whose time is known to have moved on; returns the windows
    /// that fired.
    #[must_use = "the returned results are the operator's output"]
    pub fn advance_watermark(&mut self, time_ms: u64) -> Vec<WindowResult<K, A::Out>> {
        let mut out = Vec::new();
        self.fire(time_ms, &mut out);
        out
    }

    /// End of input: fires every open window and frees all state. The
    /// watermark becomes `u64::MAX`, so later records are dropped as late.
    #[must_use = "the returned results are the operator's output"]
    pub fn flush(&mut self) -> Vec<WindowResult<K, A::Out>> {
        self.advance_watermark(u64::MAX)
    }

    /// The current watermark, ms since the epoch.
    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    /// Records dropped because every window they belong to was past its
    /// allowed lateness (or evicted).
    pub fn late_dropped(&self) -> u64 {
        self.late_dropped
    }

    /// (window, key) states freed early to stay within
    /// [`max_keys`](Self::max_keys).
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// (window, key) states held now.
    pub fn open(&self) -> usize {
        self.open
    }

    /// The window spec.
    pub fn windows(&self) -> Windows {
        self.windows
    }

    fn fire(&mut self, watermark: u64, out: &mut Vec<WindowResult<K, A::Out>>) {
        let old = self.watermark;
        if watermark <= old {
            return;
        }
        self.watermark = watermark;
        // Windows ending at or before `old` fired when the watermark got
        // there; late records to them emit as they come.
        let range = (
            Bound::Excluded((old, u64::MAX)),
            Bound::Included((watermark, u64::MAX)),
        );
        for (&(end, start), keys) in self.state.range(range) {
            for (key, acc) in keys {
                out.push(WindowResult {
                    key: key.clone(),
                    start_ms: start,
                    end_ms: end,
                    value: self.aggregate.finish(acc),
                    update: false,
                });
            }
        }
        while let Some(entry) = self.state.first_entry() {
            let (end, _) = *entry.key();
            if end.saturating_add(self.allowed_lateness_ms) > watermark {
                break;
            }
            self.open -= entry.get().len();
            entry.remove();
        }
    }

    fn evict_oldest(&mut self, out: &mut Vec<WindowResult<K, A::Out>>) {
        let Some(((end, start), keys)) = self.state.pop_first() else {
            return;
        };
        self.open -= keys.len();
        self.evicted = self.evicted.saturating_add(keys.len() as u64);
        self.closed_through = self.closed_through.max(end);
        if end > self.watermark {
            for (key, acc) in keys {
                out.push(WindowResult {
                    value: self.aggregate.finish(&acc),
                    key,
                    start_ms: start,
                    end_ms: end,
                    update: false,
                });
            }
        }
    }
}

impl<K, V, A: Aggregate<V>> fmt::Debug for Windowed<K, V, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Windowed")
            .field("windows", &self.windows)
            .field("out_of_orderness_ms", &self.out_of_orderness_ms)
            .field("allowed_lateness_ms", &self.allowed_lateness_ms)
            .field("max_keys", &self.max_keys)
            .field("watermark", &self.watermark)
            .field("open", &self.open)
            .field("late_dropped", &self.late_dropped)
            .field("evicted", &self.evicted)
            .finish_non_exhaustive()
    }
}

/// Runs `windowed` over `input`: `extract` turns each item into
/// `(key, time_ms, value)`, or `None` to skip it; at end of input the
/// operator is flushed. The returned stream is `Unpin`.
///
/// ```
/// use std::time::Duration;
/// use futures::StreamExt;
/// use mesh::window::{self, Sum, Windowed, Windows};
///
/// let trades = futures::stream::iter(vec![("eur", 1_000, 2.0), ("eur", 3_000, 5.0)]);
/// let windowed = Windowed::new(Windows::tumbling(Duration::from_secs(60))?, Sum);
/// let results: Vec<_> = futures::executor::block_on(
///     window::aggregate(trades, windowed, |(k, t, v)| Some((k, t, v))).collect(),
/// );
/// assert_eq!(results[0].value, 7.0);
/// # Ok::<(), mesh::window::WindowError>(())
/// ```
pub fn aggregate<S, K, V, A, F>(
    input: S,
    windowed: Windowed<K, V, A>,
    extract: F,
) -> Aggregated<S, K, V, A, F>
where
    S: Stream,
    K: Ord + Clone,
    A: Aggregate<V>,
    F: FnMut(S::Item) -> Option<(K, u64, V)>,
{
    Aggregated {
        input: Box::pin(input),
        windowed,
        extract,
        pending: VecDeque::new(),
        done: false,
    }
}

/// The stream returned by [`aggregate`].
pub struct Aggregated<S, K, V, A: Aggregate<V>, F> {
    input: Pin<Box<S>>,
    windowed: Windowed<K, V, A>,
    extract: F,
    /// Holds at most the results of one push or the final flush.
    pending: VecDeque<WindowResult<K, A::Out>>,
    done: bool,
}

// No field is ever pinned in place: the input is pinned behind its box.
impl<S, K, V, A: Aggregate<V>, F> Unpin for Aggregated<S, K, V, A, F> {}

impl<S, K, V, A, F> Stream for Aggregated<S, K, V, A, F>
where
    S: Stream,
    K: Ord + Clone,
    A: Aggregate<V>,
    F: FnMut(S::Item) -> Option<(K, u64, V)>,
{
    type Item = WindowResult<K, A::Out>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(r) = this.pending.pop_front() {
                return Poll::Ready(Some(r));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.input.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(item)) => {
                    if let Some((key, time_ms, value)) = (this.extract)(item) {
                        this.pending.extend(this.windowed.push(key, time_ms, value));
                    }
                }
                Poll::Ready(None) => {
                    this.done = true;
                    this.pending.extend(this.windowed.flush());
                }
            }
        }
    }
}

impl<S, K, V, A: Aggregate<V>, F> fmt::Debug for Aggregated<S, K, V, A, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Aggregated")
            .field("windowed", &self.windowed)
            .field("pending", &self.pending.len())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn tumbling(size: u64) -> Windows {
        Windows::tumbling(ms(size)).unwrap()
    }

    /// (key, start, end, value, update) of each result, for short asserts.
    fn flat<K: Clone, O: Clone>(rs: &[WindowResult<K, O>]) -> Vec<(K, u64, u64, O, bool)> {
        rs.iter()
            .map(|r| {
                (
                    r.key.clone(),
                    r.start_ms,
                    r.end_ms,
                    r.value.clone(),
                    r.update,
                )
            })
            .collect()
    }

    #[test]
    fn tumbling_count_per_key() {
        let mut w = Windowed::new(tumbling(10), Count);
        assert!(w.push("b", 1, ()).is_empty());
        assert!(w.push("a", 2, ()).is_empty());
        assert!(w.push("b", 9, ()).is_empty());
        let fired = w.push("a", 10, ());
        assert_eq!(
            flat(&fired),
            vec![("a", 0, 10, 1, false), ("b", 0, 10, 2, false)]
        );
        assert_eq!(flat(&w.flush()), vec![("a", 10, 20, 1, false)]);
        assert_eq!(w.open(), 0);
    }

    #[test]
    fn tumbling_sum_and_mean_per_key() {
        let mut sum = Windowed::new(tumbling(100), Sum);
        let mut mean = Windowed::new(tumbling(100), Mean);
        let (mut sums, mut means) = (Vec::new(), Vec::new());
        for (k, t, v) in [(1u32, 5, 1.0f64), (2, 6, 10.0), (1, 50, 3.0), (2, 150, 7.0)] {
            sums.extend(sum.push(k, t, v));
            means.extend(mean.push(k, t, v));
        }
        sums.extend(sum.flush());
        means.extend(mean.flush());
        assert_eq!(
            flat(&sums),
            vec![
                (1, 0, 100, 4.0, false),
                (2, 0, 100, 10.0, false),
                (2, 100, 200, 7.0, false)
            ]
        );
        assert_eq!(
            flat(&means),
            vec![
                (1, 0, 100, 2.0, false),
                (2, 0, 100, 10.0, false),
                (2, 100, 200, 7.0, false)
            ]
        );
    }

    #[test]
    fn min_max_and_stats() {
        let vals = [3.0f32, -1.5, 8.0];
        let mut min = Windowed::new(tumbling(10), Min);
        let mut max = Windowed::new(tumbling(10), Max);
        let mut stats = Windowed::new(tumbling(10), Stats);
        for (i, v) in vals.into_iter().enumerate() {
            let _ = min.push((), i as u64, v);
            let _ = max.push((), i as u64, v);
            let _ = stats.push((), i as u64, v);
        }
        assert_eq!(min.flush()[0].value, -1.5);
        assert_eq!(max.flush()[0].value, 8.0);
        let s = stats.flush()[0].value;
        assert_eq!((s.count, s.sum, s.min, s.max), (3, 9.5, -1.5, 8.0));
        assert!((s.mean - 9.5 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn sliding_record_is_in_size_over_slide_windows() {
        let w = Windows::sliding(ms(30), ms(10)).unwrap();
        let of = |t| w.windows_of(t).collect::<Vec<_>>();
        assert_eq!(of(25), vec![(0, 30), (10, 40), (20, 50)]);
        assert_eq!(of(30), vec![(10, 40), (20, 50), (30, 60)]);
        // Near the epoch there are no windows with negative starts.
        assert_eq!(of(5), vec![(0, 30)]);
        // A slide that does not divide the size: 10 / 3 -> 3 or 4 windows.
        let odd = Windows::sliding(ms(10), ms(3)).unwrap();
        assert_eq!(
            odd.windows_of(9).collect::<Vec<_>>(),
            vec![(0, 10), (3, 13), (6, 16), (9, 19)]
        );
        assert_eq!(
            odd.windows_of(10).collect::<Vec<_>>(),
            vec![(3, 13), (6, 16), (9, 19)]
        );
    }

    #[test]
    fn sliding_windows_count_each_record_in_each_window() {
        let mut w = Windowed::new(Windows::sliding(ms(20), ms(10)).unwrap(), Count);
        let _ = w.push("k", 5, ());
        let _ = w.push("k", 15, ());
        let fired = w.flush();
        assert_eq!(
            flat(&fired),
            vec![("k", 0, 20, 2, false), ("k", 10, 30, 1, false),]
        );
    }

    #[test]
    fn out_of_order_within_bound_lands_in_its_window() {
        let mut w = Windowed::new(tumbling(10), Count).out_of_orderness(ms(5));
        let _ = w.push("k", 8, ());
        // Watermark 12 - 5 = 7: [0, 10) is still open.
        assert!(w.push("k", 12, ()).is_empty());
        assert_eq!(w.watermark(), 7);
        // Out of order by 9 ms, within bound: goes to [0, 10).
        assert!(w.push("k", 3, ()).is_empty());
        let fired = w.push("k", 15, ());
        assert_eq!(flat(&fired), vec![("k", 0, 10, 2, false)]);
        assert_eq!(w.late_dropped(), 0);
    }

    #[test]
    fn late_within_allowed_lateness_emits_update() {
        let mut w = Windowed::new(tumbling(10), Count).allowed_lateness(ms(10));
        let _ = w.push("k", 1, ());
        assert_eq!(flat(&w.push("k", 12, ())), vec![("k", 0, 10, 1, false)]);
        // Watermark 12 < 10 + 10: still accepted, re-fired as an update.
        assert_eq!(flat(&w.push("k", 2, ())), vec![("k", 0, 10, 2, true)]);
        // A key new to the fired window is a first emission, not an update.
        assert_eq!(flat(&w.push("j", 3, ())), vec![("j", 0, 10, 1, false)]);
        assert_eq!(w.late_dropped(), 0);
        // Watermark 20 frees [0, 10).
        let fired = w.push("k", 20, ());
        assert_eq!(flat(&fired), vec![("k", 10, 20, 1, false)]);
        // [10, 20) is kept for lateness; [20, 30) is open.
        assert_eq!(w.open(), 2);
        assert!(w.push("k", 4, ()).is_empty());
        assert_eq!(w.late_dropped(), 1);
    }

    #[test]
    fn too_late_is_dropped_and_counted() {
        let mut w = Windowed::new(tumbling(10), Count).allowed_lateness(ms(5));
        let _ = w.push("k", 1, ());
        let _ = w.push("k", 15, ());
        assert!(w.push("k", 2, ()).is_empty());
        assert_eq!(w.late_dropped(), 1);
        // Default lateness 0: a record for a fired window is dropped.
        let mut w = Windowed::new(tumbling(10), Count);
        let _ = w.push("k", 10, ());
        assert!(w.push("k", 9, ()).is_empty());
        assert_eq!(w.late_dropped(), 1);
        assert_eq!(flat(&w.flush()), vec![("k", 10, 20, 1, false)]);
    }

    #[test]
    fn sliding_record_late_for_some_windows_only_is_kept() {
        let mut w = Windowed::new(Windows::sliding(ms(20), ms(10)).unwrap(), Count);
        let _ = w.push("k", 20, ()); // fires [0, 20)
                                     // 15 is in [0, 20) (fired, dropped there) and [10, 30) (open).
        assert!(w.push("k", 15, ()).is_empty());
        assert_eq!(w.late_dropped(), 0);
        let fired = w.flush();
        assert_eq!(
            flat(&fired),
            vec![("k", 10, 30, 2, false), ("k", 20, 40, 1, false)]
        );
    }

    #[test]
    fn idle_advance_watermark_fires() {
        let mut w = Windowed::new(tumbling(10), Count).out_of_orderness(ms(100));
        let _ = w.push("k", 1, ());
        assert!(w.advance_watermark(9).is_empty());
        assert_eq!(flat(&w.advance_watermark(10)), vec![("k", 0, 10, 1, false)]);
        // The watermark never goes back.
        assert!(w.advance_watermark(5).is_empty());
        assert_eq!(w.watermark(), 10);
    }

    #[test]
    fn flush_fires_everything_and_closes() {
        let mut w = Windowed::new(tumbling(10), Count).allowed_lateness(ms(1_000));
        let _ = w.push("a", 1, ());
        let _ = w.push("b", 25, ());
        let fired = w.flush();
        assert_eq!(
            flat(&fired),
            vec![("b", 20, 30, 1, false)],
            "[0, 10) fired at watermark 25 already"
        );
        assert_eq!(w.open(), 0);
        assert!(w.flush().is_empty());
        assert!(w.push("a", 40, ()).is_empty());
        assert_eq!(w.late_dropped(), 1);
    }

    #[test]
    fn max_keys_evicts_oldest_window_and_counts() {
        // A large out-of-orderness: nothing fires on its own.
        let mut w = Windowed::new(tumbling(10), Count)
            .out_of_orderness(ms(1_000_000))
            .max_keys(3);
        let _ = w.push(1, 1, ());
        let _ = w.push(2, 2, ());
        let _ = w.push(1, 12, ());
        // A fourth state: [0, 10) is fired early with what it has.
        let early = w.push(2, 13, ());
        assert_eq!(
            flat(&early),
            vec![(1, 0, 10, 1, false), (2, 0, 10, 1, false)]
        );
        assert_eq!(w.evicted(), 2);
        assert_eq!(w.open(), 2);
        // The evicted window is closed: a record for it counts as late.
        assert!(w.push(3, 5, ()).is_empty());
        assert_eq!(w.late_dropped(), 1);
        // Many windows never hold more than max_keys states.
        let mut emitted = 2;
        for k in 0..1_000 {
            emitted += w.push(k, 20 + 10 * k, ()).len();
            assert!(w.open() <= 3);
        }
        emitted += w.flush().len();
        assert_eq!(w.late_dropped(), 1);
        assert_eq!(
            w.evicted() as usize + 3,
            emitted,
            "all but the last 3 evicted"
        );
        // More keys than max_keys in one window: it closes early, and the
        // rest of its records count as late.
        let mut w = Windowed::new(tumbling(10), Count).max_keys(2);
        let early: Vec<_> = (0..5).flat_map(|k| w.push(k, 1, ())).collect();
        assert_eq!(
            flat(&early),
            vec![
                (0, 0, 10, 1, false),
                (1, 0, 10, 1, false),
                (2, 0, 10, 1, false)
            ]
        );
        assert_eq!((w.evicted(), w.late_dropped(), w.open()), (3, 2, 0));
    }

    #[test]
    fn bad_window_specs_are_errors() {
        assert_eq!(Windows::tumbling(ms(0)), Err(WindowError::ZeroSize));
        assert_eq!(Windows::sliding(ms(10), ms(0)), Err(WindowError::ZeroSlide));
        assert_eq!(
            Windows::sliding(ms(10), ms(20)),
            Err(WindowError::SlideExceedsSize {
                size_ms: 10,
                slide_ms: 20
            })
        );
        assert!(matches!(
            Windows::sliding(Duration::from_secs(86_400), ms(1)),
            Err(WindowError::TooManyWindows { .. })
        ));
        assert!(matches!(
            Windows::tumbling(Duration::from_micros(1_500)),
            Err(WindowError::NotMillis { what: "size", .. })
        ));
        assert!(matches!(
            Windows::tumbling(Duration::MAX),
            Err(WindowError::NotMillis { .. })
        ));
        assert!(Windows::sliding(ms(10), ms(3)).is_ok());
    }

    #[test]
    fn user_fold() {
        let longest = Fold::new(String::new(), |acc: &mut String, v: &&str| {
            if v.len() > acc.len() {
                *acc = v.to_string();
            }
        });
        let mut w = Windowed::new(tumbling(10), longest);
        let _ = w.push("k", 1, "ab");
        let _ = w.push("k", 2, "abcd");
        let _ = w.push("k", 3, "abc");
        assert_eq!(w.flush()[0].value, "abcd");
    }

    #[test]
    fn times_near_u64_max_do_not_overflow() {
        let mut w = Windowed::new(Windows::sliding(ms(10), ms(3)).unwrap(), Count)
            .out_of_orderness(Duration::MAX)
            .allowed_lateness(Duration::MAX);
        for t in [u64::MAX, u64::MAX - 1, 0, u64::MAX - 20] {
            let _ = w.push("k", t, ());
        }
        let fired = w.flush();
        assert!(fired.iter().all(|r| r.start_ms <= r.end_ms));
        assert!(fired.iter().any(|r| r.end_ms == u64::MAX));
        let mut w = Windowed::new(tumbling(u64::MAX), Count);
        let _ = w.push("k", u64::MAX - 1, ());
        assert_eq!(flat(&w.flush()), vec![("k", 0, u64::MAX, 1, false)]);
        // u64::MAX is a multiple of the size: its window's end saturates.
        let mut w = Windowed::new(tumbling(u64::MAX), Count);
        let fired = w.push("k", u64::MAX, ());
        assert_eq!(flat(&fired), vec![("k", u64::MAX, u64::MAX, 1, false)]);
        assert_eq!(w.watermark(), u64::MAX);
    }

    #[test]
    fn async_adapter_over_stream_iter() {
        let input = futures::stream::iter(vec![
            ("a", 1u64, 1.0f64),
            ("skip", 2, 0.0),
            ("b", 5, 2.0),
            ("a", 12, 3.0),
        ]);
        let windowed = Windowed::new(tumbling(10), Sum);
        let mut out = aggregate(input, windowed, |(k, t, v)| {
            (k != "skip").then_some((k, t, v))
        });
        let results: Vec<_> = futures::executor::block_on(async {
            let mut v = Vec::new();
            while let Some(r) = out.next().await {
                v.push(r);
            }
            v
        });
        assert_eq!(
            flat(&results),
            vec![
                ("a", 0, 10, 1.0, false),
                ("b", 0, 10, 2.0, false),
                ("a", 10, 20, 3.0, false),
            ]
        );
    }

    proptest! {
        /// Tumbling counts: every record is in the last result of its
        /// (window, key), or counted as dropped; state stays bounded; each
        /// batch is ordered by window end, then key.
        #[test]
        fn tumbling_counts_conserve_records(
            events in proptest::collection::vec((0u8..6, 0u64..500), 0..200),
            size in 1u64..60,
            ooo in 0u64..50,
            lateness in 0u64..50,
            max_keys in 1usize..20,
        ) {
            let mut w = Windowed::new(tumbling(size), Count)
                .out_of_orderness(ms(ooo))
                .allowed_lateness(ms(lateness))
                .max_keys(max_keys);
            let mut last = BTreeMap::new();
            let mut record = |batch: Vec<WindowResult<u8, u64>>| {
                let order: Vec<_> = batch.iter().map(|r| (r.end_ms, r.key)).collect();
                let mut sorted = order.clone();
                sorted.sort();
                prop_assert_eq!(order, sorted);
                for r in batch {
                    last.insert((r.start_ms, r.key), r.value);
                }
                Ok(())
            };
            for &(k, t) in &events {
                record(w.push(k, t, ()))?;
                prop_assert!(w.open() <= max_keys);
            }
            record(w.flush())?;
            let counted: u64 = last.values().sum();
            prop_assert_eq!(counted + w.late_dropped(), events.len() as u64);
            prop_assert_eq!(w.open(), 0);
        }
    }
}
