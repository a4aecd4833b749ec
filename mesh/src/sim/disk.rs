//! The simulator's durable store: a disk in memory that survives a
//! simulated crash, written a batch at a time after a simulated fsync.

use std::{collections::VecDeque, sync::Arc};

use tokio::sync::mpsc;

use crate::{
    core::{replica::QueueState, stream::Record},
    engine::durable::{Loaded, StoredPartition, WriteOp},
    runtime::durable::Backend,
};

/// The simulator's disk: what a simulated durable host wrote, kept across
/// its crashes and restarts. A batch reaches it when the driver takes the
/// report that it is written, just before confirming what it holds; a
/// crash before that loses the batch, as a crash before an fsync would
/// (so the simulator explores the window where records are in memory and
/// not yet on disk).
#[derive(Debug, Default)]
pub(crate) struct MemDisk {
    epoch: Option<u64>,
    queue: QueueState,
    streams: std::collections::BTreeMap<(String, u32), MemPartition>,
}

#[derive(Debug, Default)]
struct MemPartition {
    first: u64,
    records: std::collections::BTreeMap<u64, Record>,
    committed: std::collections::BTreeMap<Arc<str>, u64>,
}

impl MemDisk {
    fn apply(&mut self, ops: Vec<WriteOp>) {
        for op in ops {
            match op {
                WriteOp::Queue(op) => self.queue.apply(op),
                WriteOp::StreamPut {
                    stream,
                    index,
                    record,
                } => {
                    self.streams
                        .entry((stream.to_string(), index))
                        .or_default()
                        .records
                        .insert(record.offset, record);
                }
                WriteOp::StreamCommit {
                    stream,
                    index,
                    group,
                    offset,
                } => {
                    let p = self.streams.entry((stream.to_string(), index)).or_default();
                    let c = p.committed.entry(group).or_default();
                    *c = (*c).max(offset);
                }
                WriteOp::StreamTrim {
                    stream,
                    index,
                    first,
                } => {
                    let p = self.streams.entry((stream.to_string(), index)).or_default();
                    p.records = p.records.split_off(&first);
                    p.first = p.first.max(first);
                }
                WriteOp::Epoch(e) => self.epoch = Some(e),
            }
        }
    }

    fn load(&self) -> Loaded {
        Loaded {
            epoch: self.epoch,
            queue: self.queue.messages().cloned().collect(),
            dedup: self
                .queue
                .dedup_keys()
                .map(|(q, k, u)| (q.to_string(), k.to_string(), u))
                .collect(),
            streams: self
                .streams
                .iter()
                .map(|((stream, index), p)| StoredPartition {
                    stream: stream.clone(),
                    index: *index,
                    first: p.first,
                    records: p.records.values().cloned().collect(),
                    committed: p.committed.iter().map(|(g, o)| (g.clone(), *o)).collect(),
                })
                .collect(),
        }
    }
}

/// How long a simulated disk takes to write a batch.
const SIM_WRITE: std::time::Duration = std::time::Duration::from_millis(2);

/// A simulated host's store: batches wait in it (lost with a crash) until
/// the driver takes their report, then go to its [`MemDisk`].
pub(crate) struct MemBackend {
    disk: Arc<std::sync::Mutex<MemDisk>>,
    done: mpsc::UnboundedSender<u64>,
    pending: VecDeque<(u64, Vec<WriteOp>)>,
}

impl MemBackend {
    /// The backend on `disk`, and what it holds.
    pub(crate) fn open(
        disk: Arc<std::sync::Mutex<MemDisk>>,
    ) -> (Box<dyn Backend>, mpsc::UnboundedReceiver<u64>, Loaded) {
        let loaded = disk.lock().map(|d| d.load()).unwrap_or_default();
        let (done, rx) = mpsc::unbounded_channel();
        let backend = MemBackend {
            disk,
            done,
            pending: VecDeque::new(),
        };
        (Box::new(backend), rx, loaded)
    }
}

impl Backend for MemBackend {
    fn submit(&mut self, seq: u64, ops: Vec<WriteOp>) {
        self.pending.push_back((seq, ops));
        // A write takes a while (an fsync), in virtual time: a crash meanwhile
        // finds records in memory that are not on disk.
        let done = self.done.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SIM_WRITE).await;
            let _ = done.send(seq);
        });
    }

    fn on_disk(&mut self, upto: u64) {
        let Ok(mut d) = self.disk.lock() else {
            return;
        };
        while self.pending.front().is_some_and(|(seq, _)| *seq <= upto) {
            if let Some((_, ops)) = self.pending.pop_front() {
                d.apply(ops);
            }
        }
    }
}
