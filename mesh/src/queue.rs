//! Work queues: each message to exactly one of competing consumers, with
//! acks, redelivery, poison messages and dead letters (as SQS, RabbitMQ or
//! JetStream work queues), and no broker.
//!
//! ```no_run
//! # async fn example(node: mesh::Node) -> Result<(), Box<dyn std::error::Error>> {
//! use futures::StreamExt;
//! use mesh::queue::ConsumeOptions;
//!
//! let jobs = node.queue("jobs")?;
//! jobs.send("resize image 7").await?; // resolves once the host has it
//!
//! let mut work = jobs.consume(ConsumeOptions::default());
//! while let Some(job) = work.next().await {
//!     match std::str::from_utf8(job.payload()) {
//!         Ok(text) => { println!("{text}"); job.ack(); }
//!         Err(_) => job.reject(), // straight to `jobs.dlq`
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Where messages live: on a *host* of the queue. A node hosts the queues
//! it is configured to ([`crate::Builder::host_queues`],
//! [`crate::Builder::host_all`]; `mesh node` hosts all); a node that does
//! not hands each send to a live host (rendezvous hashing of the queue name
//! over the hosts), and with no host anywhere the sender hosts its own
//! messages. A host holds its messages in memory: they are lost if it
//! crashes before they are acked (durable hosting comes with the SQLite
//! store).
//!
//! Delivery is at least once: a message goes to one consumer at a time,
//! and comes back after its visibility timeout, on a nack, or at once when
//! its consumer's link drops. After `max_attempts` deliveries, or on a
//! reject, it moves to the dead-letter queue `NAME.dlq` with its attempt
//! count and last error; that is a queue like any other (consume it, or
//! [`Queue::replay_dead_letters`]).

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use rustc_hash::FxHashSet;
use tokio::sync::oneshot;

pub use crate::core::queue::{Config as HostConfig, Peeked, QueueStats};
use crate::{
    core::{pubsub::MessageId, queue::ConsumerOptions, topic::Topic},
    engine::{
        inbox::Inbox,
        work::{DeliveryData, Op, OutMsg, Settle},
    },
    node::Node,
    TopicError,
};

/// What a full queue does to a send; see [`crate::Builder::queue_full`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueFull {
    /// The send waits until the queue has room (back-pressure).
    #[default]
    Wait,
    /// The send fails with [`SendError::Full`].
    Fail,
}

/// Why a send failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The queue is full and the node is set to [`QueueFull::Fail`].
    #[error("{0}")]
    Full(String),
    /// The host refused it for good: its access policy does not let this
    /// node send to the queue, or it hosts as many queues as it may.
    #[error("the host refused the message: {0}")]
    Refused(String),
    /// Nobody hosts the queue and this node may not (a one-shot tool).
    #[error("no live host for queue {0:?} (start a `mesh node`, or a node that hosts it)")]
    NoHost(String),
    /// Message and headers are over the frame limit.
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The value could not be encoded.
    #[error("encoding failed: {0}")]
    Encode(String),
    /// More headers than a message may carry ([`crate::wire::MAX_HEADERS`]).
    #[error("{count} headers exceed the limit of {limit} per message")]
    TooManyHeaders {
        /// How many were given.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The node is shut down.
    #[error("node is shut down")]
    Closed,
}

/// Options of [`Queue::send_with`].
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// Not delivered before this much time has passed.
    pub delay: Option<Duration>,
    /// Dead-lettered (reason "expired") if not delivered within this.
    pub ttl: Option<Duration>,
    /// Repeated sends with this key within the host's dedup window (5
    /// minutes by default) are dropped (and still resolve `Ok`).
    pub dedup_key: Option<String>,
    /// Headers.
    pub headers: Vec<(String, Bytes)>,
}

/// Whether a message may be sent: under the frame limit, and not too many
/// headers.
fn check_send(
    queue: &str,
    payload: &Bytes,
    options: &SendOptions,
    limit: usize,
) -> Result<(), SendError> {
    let size = send_size(queue, payload, options);
    if size > limit {
        return Err(SendError::TooLarge { size, limit });
    }
    crate::wire::check_header_count(&options.headers).map_err(|count| SendError::TooManyHeaders {
        count,
        limit: crate::wire::MAX_HEADERS,
    })
}

/// The size a message counts against the frame limit: room is kept for
/// what a delivery adds (the sender's id, and in a dead-letter queue the
/// reason).
fn send_size(queue: &str, payload: &Bytes, options: &SendOptions) -> usize {
    payload.len()
        + queue.len()
        + crate::core::queue::MAX_ERROR_LEN
        + 128
        + options.dedup_key.as_ref().map_or(0, |k| k.len())
        + options
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 10)
            .sum::<usize>()
}

/// Options of [`Queue::consume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumeOptions {
    /// Most unacked messages held at once, per host (default 64).
    pub prefetch: u32,
    /// How long a delivery stays invisible to other consumers before it
    /// comes back (default 30 s; see [`Delivery::extend`]).
    pub visibility_timeout: Duration,
    /// Deliveries before a message goes to the dead-letter queue (default 5).
    pub max_attempts: u32,
    /// Message ids remembered to flag deliveries this consumer had before
    /// ([`Delivery::redelivered`]); 0 (the default) remembers none.
    pub dedup_window: usize,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        let o = ConsumerOptions::default();
        Self {
            prefetch: o.prefetch,
            visibility_timeout: o.visibility_timeout,
            max_attempts: o.max_attempts,
            dedup_window: 0,
        }
    }
}

impl ConsumeOptions {
    /// Sets the prefetch.
    pub fn prefetch(mut self, n: u32) -> Self {
        self.prefetch = n;
        self
    }
    /// Sets the visibility timeout.
    pub fn visibility_timeout(mut self, d: Duration) -> Self {
        self.visibility_timeout = d;
        self
    }
    /// Sets the max attempts.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }
    /// Sets the dedup window.
    pub fn dedup_window(mut self, ids: usize) -> Self {
        self.dedup_window = ids;
        self
    }
}

/// Why listing or replaying failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The node is shut down.
    #[error("node is shut down")]
    Closed,
}

/// A named queue; see [`Node::queue`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Queue {
    node: Node,
    name: Arc<str>,
}

impl Node {
    /// The queue `name` (dot-separated, like a topic, without wildcards).
    pub fn queue(&self, name: &str) -> Result<Queue, TopicError> {
        let t = Topic::new(name)?;
        crate::node::check_not_reserved(t.as_str())?;
        Ok(Queue {
            node: self.clone(),
            name: t.as_str().into(),
        })
    }
}

impl Queue {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its dead-letter queue, `NAME.dlq`.
    pub fn dead_letters(&self) -> Queue {
        Queue {
            node: self.node.clone(),
            name: crate::core::queue::dlq_name(&self.name).into(),
        }
    }

    /// Sends `payload`; resolves once the queue's host has accepted it
    /// (not when it is consumed).
    pub async fn send(&self, payload: impl Into<Bytes>) -> Result<MessageId, SendError> {
        self.send_with(payload, SendOptions::default()).await
    }

    /// Sends a value encoded with postcard.
    pub async fn send_value<T: serde::Serialize>(&self, value: &T) -> Result<MessageId, SendError> {
        let bytes = postcard::to_stdvec(value).map_err(|e| SendError::Encode(e.to_string()))?;
        self.send(bytes).await
    }

    /// Sends with a delay, time to live, dedup key or headers.
    pub async fn send_with(
        &self,
        payload: impl Into<Bytes>,
        options: SendOptions,
    ) -> Result<MessageId, SendError> {
        let payload = payload.into();
        let inner = &self.node.inner;
        check_send(&self.name, &payload, &options, inner.max_payload)?;
        let (tx, rx) = oneshot::channel();
        let op = Op::Send {
            queue: self.name.clone(),
            msg: OutMsg {
                headers: options.headers,
                payload,
                delay: options.delay,
                ttl: options.ttl,
                dedup: options.dedup_key,
                durable: false,
            },
            reply: tx.into(),
        };
        inner
            .work_bounded
            .push(op)
            .await
            .map_err(|_| SendError::Closed)?;
        rx.await.map_err(|_| SendError::Closed)?
    }

    /// [`Queue::send_batch`] with options (delay, time to live, dedup
    /// key, headers) per message.
    pub async fn send_batch_with<I, P>(&self, messages: I) -> Result<Vec<MessageId>, SendError>
    where
        I: IntoIterator<Item = (P, SendOptions)>,
        P: Into<Bytes>,
    {
        self.send_batch_inner(messages, false).await
    }

    /// [`Queue::send_batch_with`] for an outbox relay: confirmed only by a
    /// host that keeps the messages, never by this node hosting them in
    /// memory (with no other host: `NoHost`, to retry later).
    #[cfg(feature = "sqlite")]
    pub(crate) async fn send_batch_durable<I, P>(
        &self,
        messages: I,
    ) -> Result<Vec<MessageId>, SendError>
    where
        I: IntoIterator<Item = (P, SendOptions)>,
        P: Into<Bytes>,
    {
        self.send_batch_inner(messages, true).await
    }

    async fn send_batch_inner<I, P>(
        &self,
        messages: I,
        durable: bool,
    ) -> Result<Vec<MessageId>, SendError>
    where
        I: IntoIterator<Item = (P, SendOptions)>,
        P: Into<Bytes>,
    {
        let inner = &self.node.inner;
        let mut msgs = Vec::new();
        for (p, options) in messages {
            let payload: Bytes = p.into();
            check_send(&self.name, &payload, &options, inner.max_payload)?;
            msgs.push(OutMsg {
                headers: options.headers,
                payload,
                delay: options.delay,
                ttl: options.ttl,
                dedup: options.dedup_key,
                durable,
            });
        }
        let (tx, rx) = oneshot::channel();
        inner
            .work_bounded
            .push(Op::SendBatch {
                queue: self.name.clone(),
                msgs,
                reply: tx.into(),
            })
            .await
            .map_err(|_| SendError::Closed)?;
        rx.await.map_err(|_| SendError::Closed)?
    }

    /// Sends many messages in one hand-off to the node (the fast way to
    /// send at high rates); resolves once the host accepted all of them,
    /// with their ids in order, or with the first error (messages before
    /// and after it may have been accepted).
    pub async fn send_batch<I>(&self, payloads: I) -> Result<Vec<MessageId>, SendError>
    where
        I: IntoIterator,
        I::Item: Into<Bytes>,
    {
        self.send_batch_with(payloads.into_iter().map(|p| (p, SendOptions::default())))
            .await
    }

    /// Starts consuming: a stream of [`Delivery`]s. Dropping it stops the
    /// consumer; deliveries it received and nobody took go back to the
    /// queue at once.
    pub fn consume(&self, options: ConsumeOptions) -> Consumer {
        let inner = &self.node.inner;
        let cid = inner
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let inbox = Arc::new(Inbox::default());
        let _ = inner.work_control.push_now(Op::Consume {
            cid,
            queue: self.name.clone(),
            options: ConsumerOptions {
                prefetch: options.prefetch.max(1),
                visibility_timeout: options.visibility_timeout,
                max_attempts: options.max_attempts.max(1),
            },
            inbox: inbox.clone(),
        });
        Consumer {
            node: self.node.clone(),
            cid,
            inbox,
            buffered: VecDeque::new(),
            seen: Seen::new(options.dedup_window),
        }
    }

    /// Asks the node task something about this queue.
    async fn ask<T>(&self, op: impl FnOnce(oneshot::Sender<T>) -> Op) -> Result<T, QueueError> {
        let (tx, rx) = oneshot::channel();
        self.node
            .inner
            .work_control
            .push_now(op(tx))
            .map_err(|_| QueueError::Closed)?;
        rx.await.map_err(|_| QueueError::Closed)
    }

    /// Up to `limit` (at most 1,000) messages of this queue on its live
    /// hosts, without taking them. `mesh dlq list` is this on `NAME.dlq`.
    pub async fn peek(&self, limit: usize) -> Result<Vec<Peeked>, QueueError> {
        self.ask(|reply| Op::Peek {
            queue: self.name.clone(),
            limit,
            reply: reply.into(),
        })
        .await
    }

    /// Counters of this queue on this node (all zero if it does not host
    /// it): waiting, in flight, consumers, accepted, acked, redelivered,
    /// dead-lettered, ...
    pub async fn host_stats(&self) -> Result<QueueStats, QueueError> {
        self.ask(|reply| Op::Stats {
            queue: self.name.clone(),
            reply: reply.into(),
        })
        .await
    }

    /// Moves every message of `NAME.dlq` (not in flight) back into this
    /// queue on each live host, as new messages. Returns how many moved.
    pub async fn replay_dead_letters(&self) -> Result<u64, QueueError> {
        self.ask(|reply| Op::Replay {
            queue: self.name.clone(),
            reply: reply.into(),
        })
        .await
    }
}

/// Remembers the ids a consumer had, for [`Delivery::redelivered`].
#[derive(Debug)]
struct Seen {
    max: usize,
    set: FxHashSet<MessageId>,
    order: VecDeque<MessageId>,
}

impl Seen {
    fn new(max: usize) -> Self {
        Self {
            max,
            set: FxHashSet::default(),
            order: VecDeque::new(),
        }
    }

    /// Whether `id` was seen before (and remembers it).
    fn check(&mut self, id: MessageId) -> bool {
        if self.max == 0 {
            return false;
        }
        if !self.set.insert(id) {
            return true;
        }
        self.order.push_back(id);
        if self.order.len() > self.max {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        false
    }
}

/// A stream of [`Delivery`]s from a queue; see [`Queue::consume`].
#[derive(Debug)]
pub struct Consumer {
    node: Node,
    cid: u32,
    inbox: Arc<Inbox<DeliveryData>>,
    buffered: VecDeque<DeliveryData>,
    seen: Seen,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let inner = &self.node.inner;
        for d in self.buffered.drain(..) {
            let _ = inner.work_control.push_now(Op::Settle {
                host: d.host,
                cid: d.cid,
                epoch: d.epoch,
                tag: d.tag,
                how: Settle::Release,
            });
        }
        let _ = inner.work_control.push_now(Op::Cancel { cid: self.cid });
    }
}

impl futures::Stream for Consumer {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let this = &mut *self;
        let data = match this.inbox.poll_next_item(cx, &mut this.buffered) {
            Poll::Ready(Some(data)) => data,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        let seen = this.seen.check(data.id);
        Poll::Ready(Some(Delivery {
            node: this.node.clone(),
            seen_before: seen,
            data: Some(data),
        }))
    }
}

/// A message from a queue, to settle with [`Delivery::ack`],
/// [`Delivery::nack`] or [`Delivery::reject`]. Dropping it unsettled gives
/// it back at once (a nack without delay).
#[derive(Debug)]
pub struct Delivery {
    node: Node,
    seen_before: bool,
    data: Option<DeliveryData>,
}

impl Delivery {
    fn data(&self) -> &DeliveryData {
        self.data.as_ref().expect("present until settled")
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.data().payload
    }

    /// The headers.
    pub fn headers(&self) -> &[(String, Bytes)] {
        &self.data().headers
    }

    /// The message id (its sender and the sender's sequence number).
    pub fn id(&self) -> MessageId {
        self.data().id
    }

    /// 1 on the first delivery, 2 on the first redelivery, ...
    pub fn attempt(&self) -> u32 {
        self.data().attempt
    }

    /// Whether this may be a duplicate: delivered before (to any consumer),
    /// or an id this consumer's dedup window has seen.
    pub fn redelivered(&self) -> bool {
        self.seen_before || self.data().attempt > 1
    }

    /// For a message of a dead-letter queue: the deliveries it had before
    /// it died, and why it died.
    pub fn dead_letter(&self) -> Option<(u32, &str)> {
        self.data().dead.as_ref().map(|(n, r)| (*n, r.as_str()))
    }

    /// Decodes the payload as a postcard value.
    pub fn value<T: serde::de::DeserializeOwned>(&self) -> Result<T, postcard::Error> {
        postcard::from_bytes(self.payload())
    }

    fn settle(&mut self, how: Settle) {
        if let Some(d) = self.data.take() {
            let _ = self.node.inner.work_control.push_now(Op::Settle {
                host: d.host,
                cid: d.cid,
                epoch: d.epoch,
                tag: d.tag,
                how,
            });
        }
    }

    /// Done: the host forgets the message. Acks are batched.
    pub fn ack(mut self) {
        self.settle(Settle::Ack);
    }

    /// Give it back, to be delivered again (to any consumer) after `delay`;
    /// after its last attempt it goes to the dead-letter queue instead.
    pub fn nack(mut self, delay: Option<Duration>) {
        self.settle(Settle::Nack(delay));
    }

    /// Straight to the dead-letter queue (a poison message).
    pub fn reject(self) {
        self.reject_with("rejected");
    }

    /// Straight to the dead-letter queue, with a reason kept there.
    pub fn reject_with(mut self, reason: &str) {
        self.settle(Settle::Reject(reason.to_owned()));
    }

    /// Still working on it: its visibility timeout restarts, at `by`.
    pub fn extend(&self, by: Duration) {
        let d = self.data();
        let _ = self.node.inner.work_control.push_now(Op::Settle {
            host: d.host,
            cid: d.cid,
            epoch: d.epoch,
            tag: d.tag,
            how: Settle::Extend(by),
        });
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        self.settle(Settle::Nack(None));
    }
}
