//! The hand-off points between the node task and the outside: [`Outbox`]
//! (node task -> link writer, bytes), [`SubQueue`] (node task ->
//! subscription, messages), [`HandOff`] (handles -> node task) and
//! [`Inbox`] (node task -> a queue consumer or responder).
//!
//! Both are filled a batch at a time under one short lock and drained a batch
//! at a time, so the per-message cost is a copy, not a channel operation.
//! Neither blocks the node task: a full one makes the node stop taking new
//! work of that kind until a drain signals `space`.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

use tokio::sync::Notify;

use crate::{
    core::{pubsub::Message, NodeId},
    node::{Delivery, Lagged, Overflow},
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain buffers behind; keep
    // going with whatever they hold rather than poisoning the node.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bytes waiting to be written to one link.
#[derive(Debug)]
pub(crate) struct Outbox {
    inner: Mutex<OutboxInner>,
    wake_writer: Notify,
    /// Node-wide: signalled whenever a writer takes bytes out.
    space: Arc<Notify>,
}

#[derive(Debug, Default)]
struct OutboxInner {
    buf: Vec<u8>,
    closed: bool,
    /// Move to this ring once the first `.0` bytes of `buf` are written.
    switch: Option<(usize, ShmTx)>,
    /// Nothing is handed to the writer until [`Outbox::release_front`]
    /// (a private link waiting for its peer's proof).
    held: bool,
    /// Bytes the writer took and has not finished writing (a peer that
    /// stops reading leaves them there).
    writing: usize,
}

/// The writing end of a link's shared-memory ring.
pub(crate) type ShmTx = mesh_transports::shm::Producer;

/// What [`Outbox::take`] handed over.
#[derive(Debug)]
pub(crate) enum Taken {
    /// Bytes to write.
    Bytes,
    /// Bytes to write on the current stream, after which everything goes
    /// to this ring.
    Switch(ShmTx),
    /// Closed and drained.
    Closed,
}

impl Outbox {
    pub(crate) fn new(space: Arc<Notify>) -> Self {
        Self {
            inner: Mutex::new(OutboxInner::default()),
            wake_writer: Notify::new(),
            space,
        }
    }

    /// Appends `bytes` (whole frames); returns the link's backlog (see
    /// [`Outbox::backlog`]).
    pub(crate) fn push(&self, bytes: &mut Vec<u8>) -> usize {
        let mut g = lock(&self.inner);
        if g.closed {
            bytes.clear();
            return 0;
        }
        if g.buf.is_empty() {
            std::mem::swap(&mut g.buf, bytes);
        } else {
            g.buf.extend_from_slice(bytes);
            bytes.clear();
        }
        let backlog = g.buf.len() + g.writing;
        drop(g);
        self.wake_writer.notify_one();
        backlog
    }

    /// Appends `bytes` (ending with the `ShmSwitch` frame); the writer
    /// writes everything up to here on its stream, then moves to `ring`.
    pub(crate) fn push_and_switch(&self, bytes: &mut Vec<u8>, ring: ShmTx) {
        let mut g = lock(&self.inner);
        if g.closed {
            bytes.clear();
            return;
        }
        g.buf.append(bytes);
        let at = g.buf.len();
        g.switch = Some((at, ring));
        drop(g);
        self.wake_writer.notify_one();
    }

    /// Hands nothing to the writer until [`Outbox::release_front`].
    pub(crate) fn hold(&self) {
        lock(&self.inner).held = true;
    }

    /// Puts `bytes` (whole frames) before everything pending and lets the
    /// writer take it all.
    pub(crate) fn release_front(&self, bytes: &mut Vec<u8>) {
        let mut g = lock(&self.inner);
        g.held = false;
        if g.closed {
            bytes.clear();
        } else {
            let n = bytes.len();
            bytes.append(&mut g.buf);
            std::mem::swap(&mut g.buf, bytes);
            if let Some((at, _)) = g.switch.as_mut() {
                *at += n;
            }
        }
        drop(g);
        self.wake_writer.notify_one();
    }

    pub(crate) fn pending(&self) -> usize {
        lock(&self.inner).buf.len()
    }

    /// Bytes not written yet: pending, and those the writer holds while a
    /// write waits for the peer to read. What a peer that does not read
    /// makes us keep.
    pub(crate) fn backlog(&self) -> usize {
        let g = lock(&self.inner);
        g.buf.len() + g.writing
    }

    /// The writer has written what it last took.
    pub(crate) fn written(&self) {
        lock(&self.inner).writing = 0;
    }

    /// No more pushes, and what was not written yet is dropped (the link
    /// is being ended because its peer does not read).
    pub(crate) fn abort(&self) {
        let mut g = lock(&self.inner);
        g.closed = true;
        g.buf = Vec::new();
        g.switch = None;
        g.writing = 0;
        drop(g);
        self.wake_writer.notify_one();
    }

    /// No more pushes; the writer drains what is there and ends the stream.
    pub(crate) fn close(&self) {
        lock(&self.inner).closed = true;
        self.wake_writer.notify_one();
    }

    /// Takes everything pending into `out` (which must be empty), or
    /// everything up to a switch to shared memory.
    pub(crate) async fn take(&self, out: &mut Vec<u8>) -> Taken {
        loop {
            {
                let mut g = lock(&self.inner);
                if g.held && g.closed {
                    return Taken::Closed;
                }
                if g.held {
                    // Woken by `release_front` (or `close`).
                } else if let Some((at, ring)) = g.switch.take() {
                    out.extend(g.buf.drain(..at));
                    g.writing = out.len();
                    drop(g);
                    self.space.notify_one();
                    return Taken::Switch(ring);
                } else if !g.buf.is_empty() {
                    std::mem::swap(&mut g.buf, out);
                    g.writing = out.len();
                    drop(g);
                    self.space.notify_one();
                    return Taken::Bytes;
                } else if g.closed {
                    return Taken::Closed;
                }
            }
            self.wake_writer.notified().await;
        }
    }
}

/// What [`SubQueue::push`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Pushed {
    /// The queue is now over capacity: the node must stop reading links
    /// until `space` fires (so remote publishers are pushed back and the
    /// overshoot is one batch).
    pub(crate) over: bool,
    /// Messages queued.
    pub(crate) delivered: u64,
    /// Messages refused because the queue is at twice its capacity, which
    /// only the node's own publishes can cause (blocking those could
    /// deadlock a subscriber that publishes from its handler).
    pub(crate) capped: u64,
    /// Messages dropped because the subscription was cut loose as a slow
    /// consumer.
    pub(crate) lagged: u64,
    /// Oldest messages dropped to make room ([`Overflow::DropOldest`]).
    pub(crate) evicted: u64,
    /// Messages that found an [`Overflow::Disconnect`] subscription full
    /// (or arrived after, in the same batch).
    pub(crate) cut: u64,
    /// This push ended the subscription ([`Overflow::Disconnect`]): the
    /// node must withdraw it.
    pub(crate) cut_off: bool,
}

/// Messages waiting for one subscription.
#[derive(Debug)]
pub(crate) struct SubQueue {
    inner: Mutex<SubInner>,
    capacity: usize,
    overflow: Overflow,
    space: Arc<Notify>,
}

#[derive(Debug, Default)]
struct SubInner {
    items: VecDeque<Delivery>,
    waker: Option<Waker>,
    closed: bool,
    /// Cut loose as a slow consumer: new messages are dropped (and
    /// counted) until it has taken what it holds.
    lagging: bool,
    dropped: u64,
    /// The node stopped reading because of us; tell it when we drain.
    over: bool,
    /// Messages dropped before everything in `items` (evicted oldest), per
    /// publisher: reported as [`Lagged`] ahead of them.
    front_gap: Vec<(NodeId, u64)>,
    /// Messages dropped after everything in `items` (newest, refused),
    /// per publisher: reported as [`Lagged`] after them.
    tail_gap: Vec<(NodeId, u64)>,
    /// Ended because its buffer filled ([`Overflow::Disconnect`]).
    cut_off: bool,
}

/// Counts `missed` more dropped messages of `publisher` (a handful of
/// publishers at most, so a list).
fn add_gap(gaps: &mut Vec<(NodeId, u64)>, publisher: NodeId, missed: u64) {
    match gaps.iter_mut().find(|(p, _)| *p == publisher) {
        Some((_, n)) => *n += missed,
        None => gaps.push((publisher, missed)),
    }
}

/// The reports of `gaps`, emptying it.
fn lagged(gaps: &mut Vec<(NodeId, u64)>) -> impl DoubleEndedIterator<Item = Delivery> + '_ {
    gaps.drain(..)
        .map(|(publisher, missed)| Delivery::Lagged(Lagged { publisher, missed }))
}

impl SubInner {
    /// Appends a message after reporting what was refused before it.
    fn accept(&mut self, m: Message) {
        if !self.tail_gap.is_empty() {
            self.items.extend(lagged(&mut self.tail_gap));
        }
        self.items.push_back(Delivery::Message(m));
    }
}

impl SubQueue {
    pub(crate) fn new(capacity: usize, overflow: Overflow, space: Arc<Notify>) -> Self {
        Self {
            inner: Mutex::new(SubInner::default()),
            capacity: capacity.max(1),
            overflow,
            space,
        }
    }

    /// Appends messages as the subscription's [`Overflow`] policy says;
    /// see [`Pushed`]. Every message not queued is counted and reported to
    /// the subscriber as [`Lagged`] where it would have been.
    pub(crate) fn push(&self, msgs: impl IntoIterator<Item = Message>, local: bool) -> Pushed {
        let mut g = lock(&self.inner);
        if g.closed {
            return Pushed::default();
        }
        let mut p = Pushed::default();
        match self.overflow {
            Overflow::Backpressure => {
                // Remote messages are never dropped here: the node stops
                // reading links instead, so they overshoot by at most one
                // read batch. Local publishes are not held back (that
                // could deadlock a subscriber that publishes from its
                // handler): beyond twice the capacity they are refused.
                let hard = if local {
                    self.capacity.saturating_mul(2)
                } else {
                    usize::MAX
                };
                for m in msgs {
                    if g.lagging {
                        p.lagged += 1;
                        add_gap(&mut g.tail_gap, m.publisher, 1);
                    } else if g.items.len() < hard {
                        g.accept(m);
                        p.delivered += 1;
                    } else {
                        p.capped += 1;
                        add_gap(&mut g.tail_gap, m.publisher, 1);
                    }
                }
                p.over = !g.lagging && g.items.len() >= self.capacity;
                g.over |= p.over;
            }
            Overflow::DropOldest => {
                for m in msgs {
                    while g.items.len() >= self.capacity {
                        match g.items.pop_front() {
                            Some(Delivery::Message(old)) => {
                                p.evicted += 1;
                                add_gap(&mut g.front_gap, old.publisher, 1);
                            }
                            Some(Delivery::Lagged(l)) => {
                                add_gap(&mut g.front_gap, l.publisher, l.missed)
                            }
                            None => break,
                        }
                    }
                    g.items.push_back(Delivery::Message(m));
                    p.delivered += 1;
                }
            }
            Overflow::Disconnect => {
                for m in msgs {
                    if !g.cut_off && g.items.len() < self.capacity {
                        g.items.push_back(Delivery::Message(m));
                        p.delivered += 1;
                    } else {
                        g.cut_off = true;
                        p.cut += 1;
                        add_gap(&mut g.tail_gap, m.publisher, 1);
                    }
                }
                if g.cut_off {
                    g.closed = true;
                    p.cut_off = true;
                }
            }
        }
        g.dropped += p.capped + p.lagged + p.evicted + p.cut;
        if let Some(w) = g.waker.take() {
            w.wake();
        }
        p
    }

    /// Tells a reliable subscription that messages are gone for good, at
    /// this point of its stream (never refused: it is rare and small).
    pub(crate) fn push_lagged(&self, lagged: crate::node::Lagged) {
        let mut g = lock(&self.inner);
        if g.closed {
            return;
        }
        g.items.push_back(Delivery::Lagged(lagged));
        if let Some(w) = g.waker.take() {
            w.wake();
        }
    }

    pub(crate) fn is_over(&self) -> bool {
        lock(&self.inner).over
    }

    /// Marks the subscription a slow consumer if it is still full: it no
    /// longer holds the node back, and messages for it are dropped and
    /// counted until it takes its backlog. Returns the backlog, or `None`
    /// if it has drained meanwhile (then it is not slow).
    pub(crate) fn set_lagging(&self) -> Option<usize> {
        let mut g = lock(&self.inner);
        if !g.over {
            return None;
        }
        g.lagging = true;
        g.over = false;
        Some(g.items.len())
    }

    /// Messages dropped because the subscriber did not keep up.
    pub(crate) fn dropped(&self) -> u64 {
        lock(&self.inner).dropped
    }

    /// Ended by the node because its buffer filled
    /// ([`Overflow::Disconnect`]).
    pub(crate) fn cut_off(&self) -> bool {
        lock(&self.inner).cut_off
    }

    /// No more messages will come.
    pub(crate) fn close(&self) {
        let mut g = lock(&self.inner);
        g.closed = true;
        g.over = false;
        if let Some(w) = g.waker.take() {
            w.wake();
        }
    }

    /// Moves every queued message into `out`; `Ready(false)` when closed
    /// and empty.
    pub(crate) fn poll_take(
        &self,
        cx: &mut Context<'_>,
        out: &mut VecDeque<Delivery>,
    ) -> Poll<bool> {
        let mut guard = lock(&self.inner);
        let g = &mut *guard;
        if !g.front_gap.is_empty() {
            for d in lagged(&mut g.front_gap).rev() {
                g.items.push_front(d);
            }
        }
        if !g.items.is_empty() || !g.tail_gap.is_empty() {
            std::mem::swap(&mut g.items, out);
            out.extend(lagged(&mut g.tail_gap));
            // It has taken its backlog: deliver to it again.
            g.lagging = false;
            if std::mem::take(&mut g.over) {
                drop(guard);
                self.space.notify_one();
            }
            return Poll::Ready(true);
        }
        // An empty queue is a caught-up consumer, whatever it was before.
        g.lagging = false;
        if g.closed {
            return Poll::Ready(false);
        }
        g.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A message handed to the node by `publish`.
#[derive(Debug)]
pub(crate) struct PublishCmd {
    pub(crate) topic: crate::core::topic::Topic,
    pub(crate) headers: Vec<(String, bytes::Bytes)>,
    pub(crate) payload: bytes::Bytes,
}

/// Publishes waiting for the node task.
pub(crate) type PublishQueue = HandOff<PublishCmd>;

/// Work waiting for the node task: filled one at a time by any number of
/// handles, taken all at once by the node task. Bounded: a full queue makes
/// `push` wait.
#[derive(Debug)]
pub(crate) struct HandOff<T> {
    inner: Mutex<PubInner<T>>,
    capacity: usize,
    /// Wakes the node task when the queue becomes non-empty.
    pub(crate) wake_node: Notify,
    /// Wakes publishers waiting for room.
    space: Notify,
}

#[derive(Debug)]
struct PubInner<T> {
    items: Vec<T>,
    closed: bool,
}

/// The node is shut down.
#[derive(Debug)]
pub(crate) struct Closed;

impl<T> HandOff<T> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(PubInner {
                items: Vec::new(),
                closed: false,
            }),
            capacity,
            wake_node: Notify::new(),
            space: Notify::new(),
        }
    }

    fn try_push(&self, cmd: T) -> Result<Result<(), T>, Closed> {
        self.push_inner(cmd, self.capacity)
    }

    /// Queues at once, whatever the capacity: for work bounded elsewhere
    /// (acks, bounded by the credit a consumer granted).
    pub(crate) fn push_now(&self, cmd: T) -> Result<(), Closed> {
        self.push_inner(cmd, usize::MAX).map(|_| ())
    }

    fn push_inner(&self, cmd: T, capacity: usize) -> Result<Result<(), T>, Closed> {
        let mut g = lock(&self.inner);
        if g.closed {
            return Err(Closed);
        }
        if g.items.len() >= capacity {
            return Ok(Err(cmd));
        }
        g.items.push(cmd);
        let first = g.items.len() == 1;
        drop(g);
        if first {
            self.wake_node.notify_one();
        }
        Ok(Ok(()))
    }

    /// Queues a publish, waiting while the queue is full.
    pub(crate) async fn push(&self, mut cmd: T) -> Result<(), Closed> {
        loop {
            match self.try_push(cmd)? {
                Ok(()) => return Ok(()),
                Err(back) => cmd = back,
            }
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let g = lock(&self.inner);
                if g.closed || g.items.len() < self.capacity {
                    continue;
                }
            }
            notified.await;
        }
    }

    /// Takes everything queued (swapping with `out`, which must be empty).
    pub(crate) fn take(&self, out: &mut Vec<T>) {
        let mut g = lock(&self.inner);
        std::mem::swap(&mut g.items, out);
        drop(g);
        self.space.notify_waiters();
    }

    /// Refuses further publishes and wakes everyone waiting.
    pub(crate) fn close(&self) {
        lock(&self.inner).closed = true;
        self.space.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{pubsub::MessageId, topic::Topic, NodeId};

    fn msg(seq: u64) -> Message {
        msg_from(NodeId::random(), seq)
    }

    fn msg_from(node: NodeId, seq: u64) -> Message {
        Message {
            id: MessageId {
                publisher: node,
                seq,
            },
            topic: Topic::new("t").unwrap(),
            publisher: node,
            timestamp: 0,
            headers: Vec::new(),
            payload: bytes::Bytes::new(),
        }
    }

    /// A held outbox hands the writer nothing until released; what is
    /// released goes before what was queued meanwhile.
    #[test]
    fn a_held_outbox_waits_and_then_leads_with_the_released_bytes() {
        use std::future::Future as _;
        let outbox = Outbox::new(Arc::new(Notify::new()));
        outbox.hold();
        outbox.push(&mut b"queued".to_vec());
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut out = Vec::new();
        {
            let mut take = std::pin::pin!(outbox.take(&mut out));
            assert!(take.as_mut().poll(&mut cx).is_pending(), "held");
            outbox.release_front(&mut b"sync ".to_vec());
            assert!(matches!(
                take.as_mut().poll(&mut cx),
                Poll::Ready(Taken::Bytes)
            ));
        }
        assert_eq!(out, b"sync queued");
        // Closed while held: nothing is written.
        let outbox = Outbox::new(Arc::new(Notify::new()));
        outbox.hold();
        outbox.push(&mut b"secret".to_vec());
        outbox.close();
        let mut out = Vec::new();
        let mut take = std::pin::pin!(outbox.take(&mut out));
        assert!(matches!(
            take.as_mut().poll(&mut cx),
            Poll::Ready(Taken::Closed)
        ));
    }

    /// `(over, capped)` of a push.
    fn push(q: &SubQueue, msgs: impl IntoIterator<Item = Message>, local: bool) -> (bool, u64) {
        let p = q.push(msgs, local);
        (p.over, p.capped)
    }

    fn take(q: &SubQueue) -> Option<usize> {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut out = VecDeque::new();
        match q.poll_take(&mut cx, &mut out) {
            Poll::Ready(true) => Some(out.len()),
            _ => None,
        }
    }

    #[test]
    fn remote_messages_push_back_then_lag_then_recover() {
        let q = SubQueue::new(4, Overflow::Backpressure, Arc::new(Notify::new()));
        assert_eq!(push(&q, (0..3).map(msg), false), (false, 0));
        // Over capacity: remote messages are kept, the node must stop.
        assert_eq!(push(&q, (3..10).map(msg), false), (true, 0));
        assert!(q.is_over());
        // Cut loose: new messages are dropped and counted.
        assert_eq!(q.set_lagging(), Some(10));
        assert_eq!(push(&q, (10..12).map(msg), false), (false, 0));
        assert_eq!(q.dropped(), 2);
        // Taking the backlog (and a report for each of the two dropped,
        // from different publishers) makes it a normal subscription again.
        assert_eq!(take(&q), Some(12));
        assert_eq!(push(&q, [msg(12)], false), (false, 0));
        assert_eq!(take(&q), Some(1));
    }

    #[test]
    fn a_drained_queue_is_never_cut_loose_and_empty_polls_clear_lagging() {
        let q = SubQueue::new(2, Overflow::Backpressure, Arc::new(Notify::new()));
        push(&q, (0..3).map(msg), false);
        assert_eq!(take(&q), Some(3));
        // The timeout fires just after the consumer caught up.
        assert_eq!(q.set_lagging(), None);
        push(&q, (0..3).map(msg), false);
        assert_eq!(q.set_lagging(), Some(3));
        assert_eq!(take(&q), Some(3));
        // Lagging was cleared with the backlog; an empty poll keeps it so.
        assert_eq!(take(&q), None);
        assert_eq!(push(&q, [msg(9)], false), (false, 0));
        assert_eq!(take(&q), Some(1));
    }

    #[test]
    fn local_messages_stop_at_twice_capacity() {
        let q = SubQueue::new(2, Overflow::Backpressure, Arc::new(Notify::new()));
        assert_eq!(push(&q, (0..6).map(msg), true), (true, 2));
        assert_eq!(q.dropped(), 2);
    }

    /// What a take yields: `Ok(seq)` for messages, `Err(missed)` for
    /// Lagged reports; `None` when closed and empty.
    fn take_all(q: &SubQueue) -> Option<Vec<Result<u64, u64>>> {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut out = VecDeque::new();
        match q.poll_take(&mut cx, &mut out) {
            Poll::Ready(true) => Some(
                out.into_iter()
                    .map(|d| match d {
                        Delivery::Message(m) => Ok(m.id.seq),
                        Delivery::Lagged(l) => Err(l.missed),
                    })
                    .collect(),
            ),
            Poll::Ready(false) => None,
            Poll::Pending => Some(Vec::new()),
        }
    }

    #[test]
    fn drop_oldest_keeps_the_newest_and_reports_the_gap_ahead_of_them() {
        let q = SubQueue::new(3, Overflow::DropOldest, Arc::new(Notify::new()));
        let p = NodeId::random();
        let pushed = q.push((0..5).map(|i| msg_from(p, i)), false);
        assert!(!pushed.over, "drop-oldest never holds the node back");
        assert_eq!((pushed.delivered, pushed.evicted), (5, 2));
        assert_eq!(q.dropped(), 2);
        assert_eq!(take_all(&q), Some(vec![Err(2), Ok(2), Ok(3), Ok(4)]));
        // Local publishes are treated alike.
        q.push((5..9).map(|i| msg_from(p, i)), true);
        assert_eq!(take_all(&q), Some(vec![Err(1), Ok(6), Ok(7), Ok(8)]));
        assert_eq!(q.dropped(), 3);
    }

    #[test]
    fn drop_oldest_keeps_one_report_per_publisher() {
        let q = SubQueue::new(1, Overflow::DropOldest, Arc::new(Notify::new()));
        let (a, b) = (NodeId::random(), NodeId::random());
        q.push(
            [
                msg_from(a, 0),
                msg_from(b, 0),
                msg_from(a, 1),
                msg_from(b, 1),
            ],
            false,
        );
        let waker = futures::task::noop_waker();
        let mut out = VecDeque::new();
        assert_eq!(
            q.poll_take(&mut Context::from_waker(&waker), &mut out),
            Poll::Ready(true)
        );
        let got: Vec<_> = out
            .into_iter()
            .map(|d| match d {
                Delivery::Lagged(l) => (l.publisher, Err(l.missed)),
                Delivery::Message(m) => (m.publisher, Ok(m.id.seq)),
            })
            .collect();
        assert_eq!(got, vec![(a, Err(2)), (b, Err(1)), (b, Ok(1))]);
    }

    #[test]
    fn disconnect_ends_the_subscription_after_what_it_held() {
        let q = SubQueue::new(2, Overflow::Disconnect, Arc::new(Notify::new()));
        let p = NodeId::random();
        let pushed = q.push((0..4).map(|i| msg_from(p, i)), false);
        assert!(pushed.cut_off);
        assert_eq!((pushed.delivered, pushed.cut), (2, 2));
        assert!(q.cut_off());
        // Nothing more is taken in.
        assert_eq!(q.push([msg_from(p, 9)], false), Pushed::default());
        assert_eq!(take_all(&q), Some(vec![Ok(0), Ok(1), Err(2)]));
        assert_eq!(take_all(&q), None, "then the stream ends");
        assert_eq!(q.dropped(), 2);
    }

    #[test]
    fn a_slow_consumer_is_told_where_its_messages_were_dropped() {
        let q = SubQueue::new(2, Overflow::Backpressure, Arc::new(Notify::new()));
        let p = NodeId::random();
        assert!(q.push((0..3).map(|i| msg_from(p, i)), false).over);
        assert_eq!(q.set_lagging(), Some(3));
        assert_eq!(q.push((3..5).map(|i| msg_from(p, i)), false).lagged, 2);
        assert_eq!(take_all(&q), Some(vec![Ok(0), Ok(1), Ok(2), Err(2)]));
        q.push([msg_from(p, 5)], false);
        assert_eq!(take_all(&q), Some(vec![Ok(5)]));
        // Local publishes beyond twice the buffer: the same report.
        let pushed = q.push((6..11).map(|i| msg_from(p, i)), true);
        assert_eq!((pushed.delivered, pushed.capped), (4, 1));
        assert_eq!(take_all(&q), Some(vec![Ok(6), Ok(7), Ok(8), Ok(9), Err(1)]));
        assert_eq!(q.dropped(), 3);
    }
}
