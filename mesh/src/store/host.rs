//! A durable host's own SQLite file (`DATA_DIR/mesh.db`): the writer
//! thread that commits the runtime's batches, and loading at start.

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::{mpsc as std_mpsc, Arc},
    time::Duration,
};

use rusqlite::{Connection, TransactionBehavior};
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::sync::mpsc;

use super::{schema, StoreError};
use crate::{
    core::{pubsub::MessageId, replica::QueueOp, stream::Record, NodeId},
    engine::durable::{Loaded, StoredMessage, StoredPartition, WriteOp},
    runtime::durable::Backend,
};

/// The file of a node's durable state in its data dir.
pub const HOST_FILE: &str = "mesh.db";
/// Held (locked) by the node that owns the data dir.
const LOCK_FILE: &str = "mesh.lock";

/// An open host store: its connection (moved to the writer thread) and
/// the lock that keeps a second node off the same data dir.
pub(crate) struct HostStore {
    conn: Connection,
    path: PathBuf,
    lock: File,
}

impl HostStore {
    /// Opens (creating) `dir/mesh.db`, checks and migrates it, and takes
    /// the data dir's lock.
    pub(crate) fn open(dir: &Path) -> Result<(HostStore, Loaded), StoreError> {
        let path = dir.join(HOST_FILE);
        let lock = super::lock_file(&dir.join(LOCK_FILE))?;
        let conn = super::open(&path)?;
        schema::install(&conn, &path, &[&schema::HOST], true)?;
        let loaded = load(&conn, &path)?;
        Ok((HostStore { conn, path, lock }, loaded))
    }

    /// Starts the writer thread; batches are reported on `done`.
    pub(crate) fn spawn(
        self,
        done: mpsc::UnboundedSender<u64>,
    ) -> Result<Box<dyn Backend>, StoreError> {
        let (tx, rx) = std_mpsc::channel::<(u64, Vec<WriteOp>)>();
        let path = self.path.clone();
        let thread = std::thread::Builder::new()
            .name("mesh-store".into())
            .spawn(move || self.write_loop(rx, done))
            .map_err(|e| StoreError::Other {
                path,
                detail: format!("spawning the store thread: {e}"),
            })?;
        Ok(Box::new(Writer {
            tx: Some(tx),
            thread: Some(thread),
        }))
    }

    fn write_loop(
        self,
        rx: std_mpsc::Receiver<(u64, Vec<WriteOp>)>,
        done: mpsc::UnboundedSender<u64>,
    ) {
        let _lock = &self.lock;
        let mut backoff = Duration::from_millis(50);
        let mut failures = 0u64;
        while let Ok(first) = rx.recv() {
            // Everything waiting goes in one transaction: group commit.
            let mut upto = first.0;
            let mut ops = first.1;
            while let Ok((seq, more)) = rx.try_recv() {
                upto = seq;
                ops.extend(more);
            }
            loop {
                match write(&self.conn, &self.path, &ops) {
                    Ok(()) => {
                        if failures > 0 {
                            tracing::info!(path = %self.path.display(), failures, "store writes succeed again");
                            failures = 0;
                            backoff = Duration::from_millis(50);
                        }
                        break;
                    }
                    Err(e) => {
                        // Nothing of the batch is confirmed while it
                        // fails: senders wait (and queues fill) rather than
                        // be told of what a crash would lose.
                        failures += 1;
                        tracing::error!(path = %self.path.display(), error = %e, retry_in = ?backoff, "store write failed; confirmations wait");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        loop {
                            match rx.try_recv() {
                                Ok((seq, more)) => {
                                    upto = seq;
                                    ops.extend(more);
                                }
                                Err(std_mpsc::TryRecvError::Empty) => break,
                                Err(std_mpsc::TryRecvError::Disconnected) => {
                                    // The node is gone: what could not be
                                    // written was never confirmed.
                                    tracing::error!(path = %self.path.display(), "node stopped while the store could not write; unconfirmed work is not kept");
                                    return;
                                }
                            }
                        }
                    }
                }
            }
            if done.send(upto).is_err() {
                return;
            }
        }
    }
}

struct Writer {
    tx: Option<std_mpsc::Sender<(u64, Vec<WriteOp>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend for Writer {
    fn submit(&mut self, seq: u64, ops: Vec<WriteOp>) {
        if let Some(tx) = &self.tx {
            // The thread ends only when closed; a send after is moot.
            let _ = tx.send((seq, ops));
        }
    }
}

/// The node is gone: the writer finishes what it has and ends, releasing
/// the file and the data dir's lock before this returns (so the node can
/// start again at once).
impl Drop for Writer {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes one group of batches in one immediate transaction. A message
/// queued and acked within it never touches the disk.
fn write(conn: &Connection, path: &Path, ops: &[WriteOp]) -> Result<(), StoreError> {
    let err = |e| StoreError::sqlite(path, e);
    let gone: FxHashSet<u64> = ops
        .iter()
        .filter_map(|o| match o {
            WriteOp::Queue(QueueOp::Del { jid }) => Some(*jid),
            _ => None,
        })
        .collect();
    let mut put_here: FxHashSet<u64> = FxHashSet::default();
    let tx =
        rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate).map_err(err)?;
    {
        let mut put = tx
            .prepare_cached(
                "INSERT OR REPLACE INTO mesh_queue
                 (jid, queue, origin, seq, headers, payload, not_before_us, expires_us, dedup)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .map_err(err)?;
        let mut mv = tx
            .prepare_cached(
                "UPDATE mesh_queue SET queue = ?2, dead_attempts = ?3, dead_reason = ?4 WHERE jid = ?1",
            )
            .map_err(err)?;
        let mut del = tx
            .prepare_cached("DELETE FROM mesh_queue WHERE jid = ?1")
            .map_err(err)?;
        let mut dedup_put = tx
            .prepare_cached(
                "INSERT OR REPLACE INTO mesh_queue_dedup (queue, key, until_us) VALUES (?1, ?2, ?3)",
            )
            .map_err(err)?;
        let mut dedup_del = tx
            .prepare_cached("DELETE FROM mesh_queue_dedup WHERE queue = ?1 AND key = ?2")
            .map_err(err)?;
        let mut rec = tx
            .prepare_cached(
                "INSERT OR REPLACE INTO mesh_stream (stream, part, off, ts_ms, key, headers, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .map_err(err)?;
        for op in ops {
            match op {
                WriteOp::Queue(QueueOp::Put {
                    jid,
                    queue,
                    id,
                    headers,
                    payload,
                    not_before_us,
                    expires_us,
                    dedup,
                }) => {
                    if gone.contains(jid) {
                        put_here.insert(*jid);
                        continue;
                    }
                    put.execute(rusqlite::params![
                        *jid as i64,
                        &**queue,
                        id.publisher.to_bytes(),
                        id.seq as i64,
                        super::headers_blob(headers),
                        &payload[..],
                        not_before_us,
                        expires_us,
                        dedup.as_deref(),
                    ])
                    .map_err(err)?;
                }
                WriteOp::Queue(QueueOp::Move { jid, queue, dead }) => {
                    if put_here.contains(jid) {
                        continue;
                    }
                    let (attempts, reason) = match dead {
                        Some((a, r)) => (Some(i64::from(*a)), Some(r.as_str())),
                        None => (None, None),
                    };
                    mv.execute(rusqlite::params![*jid as i64, &**queue, attempts, reason])
                        .map_err(err)?;
                }
                WriteOp::Queue(QueueOp::Del { jid }) => {
                    if put_here.contains(jid) {
                        continue;
                    }
                    del.execute([*jid as i64]).map_err(err)?;
                }
                WriteOp::Queue(QueueOp::Dedup {
                    queue,
                    key,
                    until_us,
                }) => {
                    dedup_put
                        .execute(rusqlite::params![&**queue, key, until_us])
                        .map_err(err)?;
                }
                WriteOp::Queue(QueueOp::DedupGone { queue, key }) => {
                    dedup_del
                        .execute(rusqlite::params![&**queue, key])
                        .map_err(err)?;
                }
                WriteOp::StreamPut {
                    stream,
                    index,
                    record,
                } => {
                    rec.execute(rusqlite::params![
                        &**stream,
                        index,
                        record.offset as i64,
                        record.timestamp_ms as i64,
                        &record.key[..],
                        super::headers_blob(&record.headers),
                        &record.payload[..],
                    ])
                    .map_err(err)?;
                }
                WriteOp::StreamCommit {
                    stream,
                    index,
                    group,
                    offset,
                } => {
                    tx.prepare_cached(
                        "INSERT INTO mesh_stream_commit (stream, part, grp, off) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (stream, part, grp) DO UPDATE SET off = max(off, excluded.off)",
                    )
                    .and_then(|mut s| {
                        s.execute(rusqlite::params![&**stream, index, &**group, *offset as i64])
                    })
                    .map_err(err)?;
                }
                WriteOp::StreamTrim {
                    stream,
                    index,
                    first,
                } => {
                    tx.prepare_cached(
                        "DELETE FROM mesh_stream WHERE stream = ?1 AND part = ?2 AND off < ?3",
                    )
                    .and_then(|mut s| s.execute(rusqlite::params![&**stream, index, *first as i64]))
                    .map_err(err)?;
                    tx.prepare_cached(
                        "INSERT INTO mesh_stream_first (stream, part, first) VALUES (?1, ?2, ?3)
                         ON CONFLICT (stream, part) DO UPDATE SET first = max(first, excluded.first)",
                    )
                    .and_then(|mut s| s.execute(rusqlite::params![&**stream, index, *first as i64]))
                    .map_err(err)?;
                }
                WriteOp::Epoch(e) => {
                    tx.execute(
                        "INSERT INTO mesh_host_state (key, value) VALUES ('epoch', ?1)
                         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        [*e as i64],
                    )
                    .map_err(err)?;
                }
            }
        }
    }
    tx.commit().map_err(err)
}

/// A stored partition number and offset mesh could have written.
fn check_position(index: u32, offset: i64) -> Result<(), String> {
    if index >= crate::core::stream::MAX_PARTITIONS {
        return Err(format!("partition {index} is beyond the limit"));
    }
    if !(0..i64::MAX / 2).contains(&offset) {
        return Err(format!("offset {offset} out of range"));
    }
    Ok(())
}

fn load(conn: &Connection, path: &Path) -> Result<Loaded, StoreError> {
    let err = |e| StoreError::sqlite(path, e);
    let bad = |table: &'static str, detail: String| StoreError::BadRow {
        path: path.to_path_buf(),
        table,
        detail,
    };
    let epoch: Option<i64> = conn
        .query_row(
            "SELECT value FROM mesh_host_state WHERE key = 'epoch'",
            [],
            |r| r.get(0),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })
        .map_err(err)?;
    let mut queue = Vec::new();
    {
        let mut stmt = conn
            .prepare(
                "SELECT jid, queue, origin, seq, headers, payload, not_before_us, expires_us,
                        dedup, dead_attempts, dead_reason
                 FROM mesh_queue ORDER BY jid",
            )
            .map_err(err)?;
        let mut rows = stmt.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let jid: i64 = r.get(0).map_err(err)?;
            let origin: Vec<u8> = r.get(2).map_err(err)?;
            let publisher = NodeId::from_bytes(&origin)
                .map_err(|e| bad("mesh_queue", format!("message {jid}: bad sender id: {e}")))?;
            let headers: Vec<u8> = r.get(4).map_err(err)?;
            let headers = super::headers_of(&headers)
                .ok_or_else(|| bad("mesh_queue", format!("message {jid}: bad headers")))?;
            let payload: Vec<u8> = r.get(5).map_err(err)?;
            let dead_attempts: Option<i64> = r.get(9).map_err(err)?;
            let dead_reason: Option<String> = r.get(10).map_err(err)?;
            queue.push(StoredMessage {
                jid: jid as u64,
                queue: r.get(1).map_err(err)?,
                id: MessageId {
                    publisher,
                    seq: r.get::<_, i64>(3).map_err(err)? as u64,
                },
                headers,
                payload: payload.into(),
                not_before_us: r.get(6).map_err(err)?,
                expires_us: r.get(7).map_err(err)?,
                dedup: r.get(8).map_err(err)?,
                dead: dead_attempts.map(|a| (a as u32, dead_reason.unwrap_or_default())),
            });
        }
    }
    let mut parts: FxHashMap<(String, u32), StoredPartition> = FxHashMap::default();
    fn part<'a>(
        parts: &'a mut FxHashMap<(String, u32), StoredPartition>,
        stream: &str,
        index: u32,
    ) -> &'a mut StoredPartition {
        parts
            .entry((stream.to_owned(), index))
            .or_insert_with(|| StoredPartition {
                stream: stream.to_owned(),
                index,
                first: 0,
                records: Vec::new(),
                committed: Vec::new(),
            })
    }
    {
        let mut stmt = conn
            .prepare("SELECT stream, part, first FROM mesh_stream_first")
            .map_err(err)?;
        let mut rows = stmt.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let s: String = r.get(0).map_err(err)?;
            let i: u32 = r.get(1).map_err(err)?;
            let first: i64 = r.get(2).map_err(err)?;
            check_position(i, first)
                .map_err(|d| bad("mesh_stream_first", format!("{s}/{i}: {d}")))?;
            part(&mut parts, &s, i).first = first as u64;
        }
        let mut stmt = conn
            .prepare("SELECT stream, part, grp, off FROM mesh_stream_commit")
            .map_err(err)?;
        let mut rows = stmt.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let s: String = r.get(0).map_err(err)?;
            let i: u32 = r.get(1).map_err(err)?;
            let g: String = r.get(2).map_err(err)?;
            let o: i64 = r.get(3).map_err(err)?;
            check_position(i, o).map_err(|d| bad("mesh_stream_commit", format!("{s}/{i}: {d}")))?;
            part(&mut parts, &s, i)
                .committed
                .push((Arc::from(g), o as u64));
        }
        let mut stmt = conn
            .prepare(
                "SELECT stream, part, off, ts_ms, key, headers, payload FROM mesh_stream
                 ORDER BY stream, part, off",
            )
            .map_err(err)?;
        let mut rows = stmt.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let s: String = r.get(0).map_err(err)?;
            let i: u32 = r.get(1).map_err(err)?;
            let off: i64 = r.get(2).map_err(err)?;
            check_position(i, off).map_err(|d| bad("mesh_stream", format!("{s}/{i}: {d}")))?;
            let headers: Vec<u8> = r.get(5).map_err(err)?;
            let headers = super::headers_of(&headers)
                .ok_or_else(|| bad("mesh_stream", format!("{s}/{i}@{off}: bad headers")))?;
            let key: Vec<u8> = r.get(4).map_err(err)?;
            let payload: Vec<u8> = r.get(6).map_err(err)?;
            part(&mut parts, &s, i).records.push(Record {
                offset: off as u64,
                key: key.into(),
                timestamp_ms: r.get::<_, i64>(3).map_err(err)? as u64,
                headers,
                payload: payload.into(),
            });
        }
    }
    let mut streams: Vec<StoredPartition> = parts.into_values().collect();
    streams.sort_by(|a, b| (&a.stream, a.index).cmp(&(&b.stream, b.index)));
    let mut dedup = Vec::new();
    {
        let mut stmt = conn
            .prepare("SELECT queue, key, until_us FROM mesh_queue_dedup ORDER BY until_us")
            .map_err(err)?;
        let mut rows = stmt.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            dedup.push((
                r.get(0).map_err(err)?,
                r.get(1).map_err(err)?,
                r.get(2).map_err(err)?,
            ));
        }
    }
    Ok(Loaded {
        epoch: epoch.map(|e| e as u64),
        queue,
        dedup,
        streams,
    })
}
