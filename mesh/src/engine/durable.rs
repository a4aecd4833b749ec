//! Durable hosting: a host's queued messages, stream records and
//! committed offsets written to a store before anything is confirmed.
//!
//! The cores keep their state in memory as always; the queue core
//! journals each change (`core::queue::Journal`) and the stream driver
//! notes each record stored and offset committed. At the end of every
//! driver turn the changes go to the store's writer as one batch, and the
//! confirmations of that turn (`Accepted` frames, local sends, stream
//! appends) wait in `held` until the writer reports the batch on disk. The
//! writer takes every batch waiting when it starts a transaction (group
//! commit), so the rate of commits adapts to the disk. Appended records
//! reach stream readers only once on disk (the stream core's gate), so a
//! reader never sees a record a crash could take back.
//!
//! Messages may reach a queue consumer before they are on disk: a crash
//! then loses a message whose sender was never told it was accepted, and
//! the sender sends it again (at-least-once, as ever).

use std::{collections::VecDeque, sync::Arc, time::Instant};

use rustc_hash::FxHashMap;

use super::{work::SendReply, Engine};
pub(crate) use crate::core::replica::StoredMessage;
use crate::{
    core::{
        pubsub::MessageId,
        queue::Journal,
        replica::{restore_messages, QueueOp},
        stream::Record,
        NodeId,
    },
    queue::SendError,
};

/// One change for the store.
#[derive(Debug)]
pub(crate) enum WriteOp {
    /// A change to the messages of a hosted queue.
    Queue(QueueOp),
    StreamPut {
        stream: Arc<str>,
        index: u32,
        record: Record,
    },
    StreamCommit {
        stream: Arc<str>,
        index: u32,
        group: Arc<str>,
        offset: u64,
    },
    /// Records below `first` left by retention.
    StreamTrim {
        stream: Arc<str>,
        index: u32,
        first: u64,
    },
    Epoch(u64),
}

/// A stored stream partition, as loaded at start.
#[derive(Debug)]
pub(crate) struct StoredPartition {
    pub(crate) stream: String,
    pub(crate) index: u32,
    pub(crate) first: u64,
    pub(crate) records: Vec<Record>,
    pub(crate) committed: Vec<(Arc<str>, u64)>,
}

/// What a durable host had stored.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub(crate) epoch: Option<u64>,
    pub(crate) queue: Vec<StoredMessage>,
    /// Dedup keys: (queue, key, until as Unix µs).
    pub(crate) dedup: Vec<(String, String, i64)>,
    pub(crate) streams: Vec<StoredPartition>,
}

/// A confirmation waiting for its batch to be on disk.
pub(crate) enum Held {
    /// `Accepted` frames for remote sends.
    QueueAccepted(FxHashMap<NodeId, Vec<u64>>),
    /// A local send to a queue hosted here.
    LocalSend(SendReply, Result<MessageId, SendError>),
    /// An `Appended` answer to a remote appender.
    StreamAppended {
        peer: NodeId,
        seq: u64,
        placed: Vec<(u32, u64)>,
    },
    /// A local append call with one more part stored here.
    StreamCall(u64),
}

/// A batch submitted: its number, what it confirms, and the partitions
/// readers may see up to once it is on disk.
type Waiting = (u64, Vec<Held>, Vec<(Arc<str>, u32, u64)>);

/// A durable host's side of the engine: the changes and confirmations of
/// this turn, and the batches the store has not reported on disk yet.
pub(crate) struct Store {
    /// Changes of this turn.
    ops: Vec<WriteOp>,
    /// Confirmations of this turn.
    held: Vec<Held>,
    /// Records of this turn per partition: readers may have them below.
    visible: FxHashMap<(Arc<str>, u32), u64>,
    /// Batches submitted and not yet on disk, oldest first.
    waiting: VecDeque<Waiting>,
    next_seq: u64,
    journal: Vec<Journal>,
    /// First offsets last written, per partition (trims).
    trimmed: FxHashMap<(Arc<str>, u32), u64>,
    next_trim: Instant,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("ops", &self.ops.len())
            .field("waiting", &self.waiting.len())
            .finish()
    }
}

/// How often retention's trims are written.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Store {
    /// An empty store state at `now` (retention's first trims are
    /// written at the first turn).
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            ops: Vec::new(),
            held: Vec::new(),
            visible: FxHashMap::default(),
            waiting: VecDeque::new(),
            next_seq: 0,
            journal: Vec::new(),
            trimmed: FxHashMap::default(),
            next_trim: now,
        }
    }

    /// Batches not yet on disk.
    pub(crate) fn waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Batches submitted and not on disk yet, and the confirmations they
    /// hold back.
    pub(crate) fn pending(&self) -> (u64, u64) {
        let held = self.waiting.iter().map(|(_, h, _)| h.len() as u64).sum();
        (self.waiting.len() as u64, held)
    }

    pub(crate) fn push(&mut self, op: WriteOp) {
        self.ops.push(op);
    }

    pub(crate) fn hold(&mut self, h: Held) {
        self.held.push(h);
    }

    /// Notes a record stored on this host, to write and then show.
    pub(crate) fn stored(&mut self, stream: &Arc<str>, index: u32, record: Record) {
        let upto = self.visible.entry((stream.clone(), index)).or_default();
        *upto = (*upto).max(record.offset + 1);
        self.ops.push(WriteOp::StreamPut {
            stream: stream.clone(),
            index,
            record,
        });
    }
}

impl Engine {
    /// Puts back what the store held: queue messages in journal order,
    /// stream partitions with their commits, and declares them hosted.
    ///
    /// A partition that cannot be put back is an error: going on would
    /// let new appends take its offsets. `now_us` is `now` as µs since the Unix epoch (stored times are).
    pub(crate) fn restore(
        &mut self,
        now: Instant,
        now_us: u64,
        loaded: Loaded,
    ) -> Result<(), String> {
        self.now = now;
        let (mut queues, mut streams) = (0usize, 0usize);
        let msgs = loaded.queue.len();
        let keys = loaded.dedup.len();
        let names = restore_messages(&mut self.work.host, now, now_us, loaded.queue, loaded.dedup);
        for q in names {
            queues += 1;
            self.host_restored_queue(q);
        }
        let mut records = 0usize;
        let partitions = self.streams.host.config().partitions;
        for p in loaded.streams {
            records += p.records.len();
            let name: Arc<str> = p.stream.as_str().into();
            if p.index >= partitions {
                return Err(format!(
                    "the store holds partition {} of stream {:?} but this node has {partitions} partitions per stream; start it with stream_partitions({}) or more",
                    p.index, p.stream, p.index + 1
                ));
            }
            self.streams
                .host
                .restore(now, &p.stream, p.index, p.first, p.records, p.committed)
                .map_err(|e| format!("stream {:?} partition {}: {e}", p.stream, p.index))?;
            if let Some(d) = self.durable.as_mut() {
                d.trimmed.insert((name.clone(), p.index), p.first);
            }
            if self.start_hosting_stream(&name) {
                streams += 1;
            }
        }
        tracing::info!(
            queues,
            messages = msgs,
            dedup_keys = keys,
            streams,
            records,
            "durable state restored"
        );
        Ok(())
    }

    /// End of a driver turn: this turn's changes, as batch number and
    /// write operations for the store (`now_us` is `now` as µs since the
    /// Unix epoch). Nothing without a store or with nothing to write.
    #[must_use]
    pub(crate) fn durable_flush(
        &mut self,
        now: Instant,
        now_us: u64,
    ) -> Option<(u64, Vec<WriteOp>)> {
        self.now = now;
        let d = self.durable.as_mut()?;
        self.work.host.drain_journal(&mut d.journal);
        if !d.journal.is_empty() {
            for j in d.journal.drain(..) {
                d.ops
                    .push(WriteOp::Queue(QueueOp::from_journal(j, now, now_us)));
            }
        }
        if now >= d.next_trim {
            d.next_trim = now + TRIM_EVERY;
            let names: Vec<Arc<str>> = self.streams.host.names().cloned().collect();
            for name in names {
                for p in self.streams.host.partitions(&name) {
                    let key = (name.clone(), p.index);
                    let last = d.trimmed.get(&key).copied().unwrap_or(0);
                    if p.first > last {
                        d.trimmed.insert(key, p.first);
                        d.ops.push(WriteOp::StreamTrim {
                            stream: name.clone(),
                            index: p.index,
                            first: p.first,
                        });
                    }
                }
            }
        }
        if d.ops.is_empty() && d.held.is_empty() {
            return None;
        }
        d.next_seq += 1;
        let seq = d.next_seq;
        let visible: Vec<(Arc<str>, u32, u64)> =
            d.visible.drain().map(|((s, i), o)| (s, i, o)).collect();
        let held = std::mem::take(&mut d.held);
        d.waiting.push_back((seq, held, visible));
        Some((seq, std::mem::take(&mut d.ops)))
    }

    /// Batches up to `upto` are on disk: their confirmations go out.
    pub(crate) fn durable_done(&mut self, now: Instant, upto: u64) {
        self.now = now;
        loop {
            let Some(d) = self.durable.as_mut() else {
                return;
            };
            if d.waiting.front().is_none_or(|(seq, ..)| *seq > upto) {
                return;
            }
            let Some((_, held, visible)) = d.waiting.pop_front() else {
                return;
            };
            for (stream, index, upto) in visible {
                self.streams.host.made_durable(&stream, index, upto);
            }
            for h in held {
                self.release(h);
            }
        }
    }

    fn release(&mut self, h: Held) {
        match h {
            Held::QueueAccepted(accepted) => self.send_accepted(accepted),
            Held::LocalSend(reply, result) => self.resolve_send_now(reply, result),
            Held::StreamAppended { peer, seq, placed } => {
                self.send_appended(peer, seq, placed);
            }
            Held::StreamCall(call) => self.stream_call_stored(call),
        }
    }
}
