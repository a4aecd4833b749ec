//! The transactional outbox and its relay.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc as std_mpsc, Arc,
    },
    thread::JoinHandle,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};
use tokio::sync::{mpsc, watch};

use super::{path_of, schema, StoreError};
use crate::{queue::SendOptions, stream::AppendOptions, Node};

/// The header every relayed message carries with its [`OutboxId`], which
/// an [`super::Inbox`] uses to skip repeats.
pub const ID_HEADER: &str = "mesh-id";

/// Where an outbox row goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination<'a> {
    /// A work queue: done once its host has accepted the message (durably,
    /// if the host is durable). Sent with the row's id as dedup key, so a
    /// resend after a crash within the host's dedup window is dropped.
    Queue(&'a str),
    /// A stream, with the record's key: done once the host stored it.
    Stream {
        /// The stream.
        name: &'a str,
        /// The record key (empty: any partition).
        key: &'a [u8],
    },
    /// A pub/sub topic: done once the node has taken the message. Pub/sub
    /// has no acknowledgement, so this is at-most-once past the node;
    /// prefer a queue or stream for what must arrive.
    Publish(&'a str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Queue = 0,
    Stream = 1,
    Publish = 2,
}

impl Kind {
    fn from_i64(v: i64) -> Option<Kind> {
        match v {
            0 => Some(Kind::Queue),
            1 => Some(Kind::Stream),
            2 => Some(Kind::Publish),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Queue => "queue",
            Kind::Stream => "stream",
            Kind::Publish => "publish",
        }
    }
}

/// A message's id in the outbox: the outbox's random instance and the
/// row's number, unique across restarts (and across outboxes, with
/// overwhelming odds). Its text form is the [`ID_HEADER`] value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutboxId {
    /// The outbox.
    pub instance: u64,
    /// The row (increasing in commit order within one transaction, and
    /// across transactions in the order they took the write lock).
    pub seq: i64,
}

impl fmt::Display for OutboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{}", self.instance, self.seq)
    }
}

/// Counts of an outbox file, for `mesh outbox status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxStatus {
    /// Rows not yet confirmed.
    pub pending: u64,
    /// Rows confirmed and deleted, ever.
    pub sent: u64,
    /// When the oldest pending row was written (µs since the epoch).
    pub oldest_pending_us: Option<i64>,
    /// Pending rows per destination (`queue:NAME`, `stream:NAME`,
    /// `publish:TOPIC`), the 100 largest.
    pub by_destination: Vec<(String, u64)>,
}

/// A handle on the outbox tables of one SQLite database (usually the
/// application's own, so its rows and its messages commit together).
#[derive(Debug, Clone)]
pub struct Outbox {
    instance: u64,
    path: PathBuf,
    /// The last destination found valid (most enqueues repeat it).
    checked: Arc<std::sync::Mutex<Option<(Kind, String)>>>,
}

impl Outbox {
    /// Creates (or migrates) the outbox tables in `conn`'s database.
    ///
    /// For the relay to see what was committed, `conn` must be on a file;
    /// open it with [`super::open`] (WAL, `synchronous=FULL`) or set the
    /// same pragmas: with `synchronous=OFF` a power cut may lose commits.
    pub fn install(conn: &Connection) -> Result<Outbox, StoreError> {
        let path = path_of(conn);
        schema::install(conn, &path, &[&schema::OUTBOX], false)?;
        let instance: i64 = conn
            .query_row(
                "SELECT value FROM mesh_outbox_state WHERE key = 'instance'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| StoreError::sqlite(&path, e))?;
        Ok(Outbox {
            instance: instance as u64,
            path,
            checked: Arc::default(),
        })
    }

    /// Opens (creating it) a database file of its own for the outbox, as
    /// `mesh queue send --durable` does.
    pub fn open(path: impl AsRef<Path>) -> Result<(Outbox, Connection), StoreError> {
        let conn = super::open(path.as_ref())?;
        let outbox = Outbox::install(&conn)?;
        Ok((outbox, conn))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds a message to `dest` in the application's transaction `tx`: it
    /// is sent once (and only if) `tx` commits.
    pub fn enqueue(
        &self,
        tx: &Transaction<'_>,
        dest: Destination<'_>,
        payload: impl AsRef<[u8]>,
    ) -> Result<OutboxId, StoreError> {
        self.enqueue_with(tx, dest, payload, &[])
    }

    /// [`Outbox::enqueue`] with headers.
    pub fn enqueue_with(
        &self,
        tx: &Transaction<'_>,
        dest: Destination<'_>,
        payload: impl AsRef<[u8]>,
        headers: &[(String, Bytes)],
    ) -> Result<OutboxId, StoreError> {
        let (kind, name, key) = match dest {
            Destination::Queue(q) => (Kind::Queue, q, &[][..]),
            Destination::Stream { name, key } => (Kind::Stream, name, key),
            Destination::Publish(t) => (Kind::Publish, t, &[][..]),
        };
        self.check(kind, name)?;
        crate::wire::check_header_count(headers).map_err(|count| StoreError::TooManyHeaders {
            count,
            limit: crate::wire::MAX_HEADERS,
        })?;
        let headers = super::headers_blob(headers);
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO mesh_outbox (kind, dest, key, headers, payload, created_us)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .map_err(|e| StoreError::sqlite(&self.path, e))?;
        stmt.execute(rusqlite::params![
            kind as i64,
            name,
            key,
            headers,
            payload.as_ref(),
            super::now_us()
        ])
        .map_err(|e| StoreError::sqlite(&self.path, e))?;
        Ok(OutboxId {
            instance: self.instance,
            seq: tx.last_insert_rowid(),
        })
    }

    /// Whether `name` is a valid destination (the last one found valid is
    /// remembered).
    fn check(&self, kind: Kind, name: &str) -> Result<(), StoreError> {
        let mut last = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_ref().is_some_and(|(k, n)| *k == kind && n == name) {
            return Ok(());
        }
        crate::core::topic::Topic::new(name)
            .and_then(|t| crate::node::check_not_reserved(t.as_str()))
            .map_err(|e| StoreError::BadDestination(format!("{} {name:?}: {e}", kind.name())))?;
        *last = Some((kind, name.to_owned()));
        Ok(())
    }

    /// Pending and sent counts of the outbox in `conn`'s database.
    pub fn status(conn: &Connection) -> Result<OutboxStatus, StoreError> {
        let path = path_of(conn);
        let err = |e| StoreError::sqlite(&path, e);
        let exists: Option<i64> = conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'mesh_outbox'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        if exists.is_none() {
            return Ok(OutboxStatus::default());
        }
        let (pending, oldest): (i64, Option<i64>) = conn
            .query_row(
                "SELECT count(*), min(created_us) FROM mesh_outbox",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(err)?;
        let sent: i64 = conn
            .query_row(
                "SELECT value FROM mesh_outbox_state WHERE key = 'sent'",
                [],
                |r| r.get(0),
            )
            .map_err(err)?;
        let mut stmt = conn
            .prepare(
                "SELECT kind, dest, count(*) AS n FROM mesh_outbox GROUP BY kind, dest
                 ORDER BY n DESC LIMIT 100",
            )
            .map_err(err)?;
        let by_destination = stmt
            .query_map([], |r| {
                let kind: i64 = r.get(0)?;
                let dest: String = r.get(1)?;
                let n: i64 = r.get(2)?;
                let kind = Kind::from_i64(kind).map_or("unknown", Kind::name);
                Ok((format!("{kind}:{dest}"), n as u64))
            })
            .map_err(err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        Ok(OutboxStatus {
            pending: pending as u64,
            sent: sent as u64,
            oldest_pending_us: oldest,
            by_destination,
        })
    }

    /// Starts relaying this outbox's rows through `node` on a thread of its
    /// own (with its own connection). Must be called within a tokio
    /// runtime, which the sends run on.
    pub fn relay(&self, node: &Node, options: RelayOptions) -> Result<Relay, StoreError> {
        Relay::start(self.clone(), node.clone(), options)
    }
}

/// The relay's wait for the write lock: 100 µs at a time, for up to
/// [`super::BUSY_TIMEOUT`].
fn relay_busy(tries: i32) -> bool {
    const STEP: Duration = Duration::from_micros(100);
    std::thread::sleep(STEP);
    (tries as u128) < super::BUSY_TIMEOUT.as_micros() / STEP.as_micros()
}

/// The lock file of an outbox's relay: `FILE.relay-lock`.
fn relay_lock_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".relay-lock");
    PathBuf::from(p)
}

/// How a [`Relay`] works.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Most rows read per pass, and per send to one destination.
    pub batch: usize,
    /// Most rows sent and not yet confirmed.
    pub max_in_flight: usize,
    /// Longest wait between looks for new rows when idle (the first look
    /// after activity comes after 1 ms, doubling up to this).
    pub max_poll: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            batch: 4096,
            max_in_flight: 65_536,
            max_poll: Duration::from_millis(20),
        }
    }
}

/// What a relay has done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Rows confirmed and deleted by this relay.
    pub sent: u64,
    /// Rows sent and not confirmed yet.
    pub in_flight: u64,
    /// Failed sends (each retried).
    pub failures: u64,
    /// The last failure.
    pub last_error: Option<String>,
    /// Passes over the table (for [`Relay::wait_idle`]).
    pub passes: u64,
    /// The last pass found nothing new and nothing is in flight.
    pub idle: bool,
    /// The relay stopped (the node shut down, or the file failed).
    pub stopped: Option<String>,
}

/// Sends an outbox's pending rows and deletes each once confirmed; stops
/// when dropped. Rows of one destination go in the order of their ids; a
/// failed send is retried (with backoff) before anything after it, so
/// order per destination holds across failures and restarts.
#[derive(Debug)]
pub struct Relay {
    stop: Arc<AtomicBool>,
    stats: watch::Receiver<RelayStats>,
    thread: Option<JoinHandle<()>>,
}

/// A row as read for sending.
struct Row {
    id: i64,
    key: Bytes,
    headers: Vec<(String, Bytes)>,
    payload: Bytes,
    created_us: i64,
}

type LaneKey = (Kind, String);

/// A lane's report: rows confirmed, or a failure.
enum Report {
    Done(LaneKey, Vec<i64>),
    Failed(String),
    Fatal(String),
}

impl Relay {
    fn start(outbox: Outbox, node: Node, options: RelayOptions) -> Result<Relay, StoreError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| StoreError::Other {
            path: outbox.path.clone(),
            detail: "the relay must be started within a tokio runtime".into(),
        })?;
        // Two relays would each send every row (duplicates, and no order
        // between them).
        let lock = super::lock_file(&relay_lock_path(&outbox.path))?;
        let conn = super::open(&outbox.path)?;
        // The relay's deletes may be lost by a power cut: that only
        // resends a message (which inboxes and dedup keys absorb).
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| StoreError::sqlite(&outbox.path, e))?;
        // The application holds the write lock for most of the time when
        // it commits fast; SQLite's own busy wait sleeps up to 100 ms at a
        // time and would miss the gaps between its transactions.
        conn.busy_handler(Some(relay_busy))
            .map_err(|e| StoreError::sqlite(&outbox.path, e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (stats_tx, stats) = watch::channel(RelayStats::default());
        let worker = Worker {
            outbox,
            conn,
            node,
            handle,
            options,
            stop: stop.clone(),
            stats: stats_tx,
            lanes: HashMap::new(),
            last_read: 0,
            in_flight: 0,
            retry: Vec::new(),
            _lock: lock,
        };
        let thread = std::thread::Builder::new()
            .name("mesh-outbox-relay".into())
            .spawn(move || worker.run())
            .map_err(|e| StoreError::Other {
                path: PathBuf::new(),
                detail: format!("spawning the relay thread: {e}"),
            })?;
        Ok(Relay {
            stop,
            stats,
            thread: Some(thread),
        })
    }

    /// What it has done so far.
    pub fn stats(&self) -> RelayStats {
        self.stats.borrow().clone()
    }

    /// Waits until every row committed before this call has been sent and
    /// confirmed, or `timeout` passes (returns false), or the relay stops.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let mut rx = self.stats.clone();
        let start = rx.borrow().passes;
        let wait = async {
            rx.wait_for(|s| s.stopped.is_some() || (s.idle && s.passes > start + 1))
                .await
                .is_ok_and(|s| s.stopped.is_none())
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// Stops the relay and waits for its thread. Rows in flight stay in
    /// the table and are sent again by the next relay.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shut();
    }
}

struct Worker {
    outbox: Outbox,
    conn: Connection,
    node: Node,
    handle: tokio::runtime::Handle,
    options: RelayOptions,
    stop: Arc<AtomicBool>,
    stats: watch::Sender<RelayStats>,
    /// Per destination: the sender to its lane and its rows in flight.
    lanes: HashMap<LaneKey, (mpsc::UnboundedSender<Vec<Row>>, usize)>,
    last_read: i64,
    in_flight: usize,
    /// Confirmed rows whose delete failed (locked, full): tried again.
    retry: Vec<(LaneKey, Vec<i64>)>,
    /// Held while the relay runs: one relay per outbox file.
    _lock: std::fs::File,
}

impl Worker {
    fn run(mut self) {
        let (report_tx, reports) = std_mpsc::channel::<Report>();
        let mut poll = Duration::from_millis(1);
        let why = loop {
            if self.stop.load(Ordering::Relaxed) {
                break None;
            }
            // Confirmations first: they free room.
            let mut done = Vec::new();
            let mut fatal = None;
            while let Ok(r) = reports.try_recv() {
                fatal = fatal.or(self.note(r, &mut done));
            }
            if let Some(e) = fatal {
                break Some(e);
            }
            let confirmed = !done.is_empty();
            if let Err(e) = self.confirm(done) {
                break Some(e.to_string());
            }
            let read = match self.read(&report_tx) {
                Ok(n) => n,
                Err(e) => break Some(e.to_string()),
            };
            let in_flight = self.in_flight as u64;
            self.stats.send_modify(|s| {
                s.passes += 1;
                s.in_flight = in_flight;
                s.idle = read == 0 && in_flight == 0;
            });
            if read > 0 || confirmed {
                poll = Duration::from_millis(1);
                continue;
            }
            // Nothing to do: wait for a confirmation or the next look.
            // (Never disconnected: this thread holds a sender.)
            match reports.recv_timeout(poll) {
                Ok(r) => {
                    let mut done = Vec::new();
                    if let Some(e) = self.note(r, &mut done) {
                        break Some(e);
                    }
                    if let Err(e) = self.confirm(done) {
                        break Some(e.to_string());
                    }
                }
                Err(_) => poll = (poll * 2).min(self.options.max_poll),
            }
        };
        if let Some(e) = &why {
            tracing::error!(path = %self.outbox.path.display(), error = %e, "outbox relay stopped");
        }
        self.stats
            .send_modify(|s| s.stopped = Some(why.unwrap_or_else(|| "stopped".into())));
    }

    /// Takes in a lane's report; returns a fatal error.
    fn note(&self, r: Report, done: &mut Vec<(LaneKey, Vec<i64>)>) -> Option<String> {
        match r {
            Report::Done(k, ids) => done.push((k, ids)),
            Report::Failed(e) => self.stats.send_modify(|s| {
                s.failures += 1;
                s.last_error = Some(e);
            }),
            Report::Fatal(e) => return Some(e),
        }
        None
    }

    /// Deletes confirmed rows and counts them. A locked or full database
    /// is waited out: the rows are deleted on a later pass (a crash
    /// meanwhile only sends them again).
    fn confirm(&mut self, mut done: Vec<(LaneKey, Vec<i64>)>) -> Result<(), StoreError> {
        done.append(&mut self.retry);
        if done.is_empty() {
            return Ok(());
        }
        match self.delete(&done) {
            Ok(()) => Ok(()),
            Err(e @ (StoreError::Busy { .. } | StoreError::Full { .. })) => {
                tracing::warn!(error = %e, rows = done.iter().map(|d| d.1.len()).sum::<usize>(), "outbox: confirmed rows not deleted yet; retrying");
                let e = e.to_string();
                self.stats.send_modify(|s| {
                    s.failures += 1;
                    s.last_error = Some(e);
                });
                self.retry = done;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes confirmed rows and counts them, in one transaction.
    fn delete(&mut self, done: &[(LaneKey, Vec<i64>)]) -> Result<(), StoreError> {
        let path = self.outbox.path.clone();
        let err = |e| StoreError::sqlite(&path, e);
        let tx =
            Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate).map_err(err)?;
        let mut n = 0u64;
        {
            // Rows of one destination mostly follow each other: one
            // statement per run of consecutive ids.
            let mut ids: Vec<i64> = done
                .iter()
                .flat_map(|(_, ids)| ids.iter().copied())
                .collect();
            ids.sort_unstable();
            let mut del = tx
                .prepare_cached("DELETE FROM mesh_outbox WHERE id BETWEEN ?1 AND ?2")
                .map_err(err)?;
            let mut i = 0;
            while i < ids.len() {
                let mut j = i;
                while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
                    j += 1;
                }
                n += del.execute([ids[i], ids[j]]).map_err(err)? as u64;
                i = j + 1;
            }
            tx.execute(
                "UPDATE mesh_outbox_state SET value = value + ?1 WHERE key = 'sent'",
                [n as i64],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        for (k, ids) in done {
            self.in_flight -= ids.len();
            if let Some(lane) = self.lanes.get_mut(k) {
                lane.1 -= ids.len();
                if lane.1 == 0 {
                    // Idle lanes end (their task exits); one is made again
                    // when the destination has rows.
                    self.lanes.remove(k);
                }
            }
        }
        self.stats.send_modify(|s| s.sent += n);
        Ok(())
    }

    /// Reads rows after the last read and hands them to their lanes.
    fn read(&mut self, reports: &std_mpsc::Sender<Report>) -> Result<usize, StoreError> {
        let room = self.options.max_in_flight.saturating_sub(self.in_flight);
        if room == 0 {
            return Ok(0);
        }
        let limit = room.min(self.options.batch.max(1));
        let path = self.outbox.path.clone();
        let err = |e| StoreError::sqlite(&path, e);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, kind, dest, key, headers, payload, created_us FROM mesh_outbox
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(err)?;
        let mut rows = stmt
            .query(rusqlite::params![self.last_read, limit as i64])
            .map_err(err)?;
        // Consecutive rows of one destination go as one chunk.
        let mut chunks: Vec<(LaneKey, Vec<Row>)> = Vec::new();
        let mut n = 0;
        while let Some(r) = rows.next().map_err(err)? {
            let id: i64 = r.get(0).map_err(err)?;
            let kind: i64 = r.get(1).map_err(err)?;
            let dest: String = r.get(2).map_err(err)?;
            let key: Vec<u8> = r.get(3).map_err(err)?;
            let headers: Vec<u8> = r.get(4).map_err(err)?;
            let payload: Vec<u8> = r.get(5).map_err(err)?;
            let created_us: i64 = r.get(6).map_err(err)?;
            let bad = |detail: String| StoreError::BadRow {
                path: path.clone(),
                table: "mesh_outbox",
                detail: format!("row {id}: {detail}"),
            };
            self.last_read = id;
            let parsed = Kind::from_i64(kind)
                .ok_or_else(|| bad(format!("unknown kind {kind}")))
                .and_then(|k| {
                    super::headers_of(&headers)
                        .map(|h| (k, h))
                        .ok_or_else(|| bad("bad headers".into()))
                });
            let (kind, headers) = match parsed {
                Ok(v) => v,
                Err(e) => {
                    // Not something enqueue writes: left in the table (it
                    // shows as pending) and skipped, so the rest goes on.
                    tracing::error!(error = %e, "outbox row skipped");
                    let e = e.to_string();
                    self.stats.send_modify(|s| {
                        s.failures += 1;
                        s.last_error = Some(e);
                    });
                    continue;
                }
            };
            let row = Row {
                id,
                key: key.into(),
                headers,
                payload: payload.into(),
                created_us,
            };
            n += 1;
            match chunks.last_mut() {
                Some((k, rows)) if k.0 == kind && k.1 == dest => rows.push(row),
                _ => chunks.push(((kind, dest), vec![row])),
            }
        }
        drop(rows);
        drop(stmt);
        for (k, rows) in chunks {
            self.in_flight += rows.len();
            let count = rows.len();
            let lane = self.lanes.entry(k.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                let lane = Lane {
                    key: k.clone(),
                    node: self.node.clone(),
                    instance: self.outbox.instance,
                    batch: self.options.batch.max(1),
                    reports: reports.clone(),
                };
                self.handle.spawn(lane.run(rx));
                (tx, 0)
            });
            lane.1 += count;
            // The lane ends only when its sender is dropped.
            let _ = lane.0.send(rows);
        }
        Ok(n)
    }
}

/// Sends one destination's rows, in order, retrying each send until it
/// is confirmed.
struct Lane {
    key: LaneKey,
    node: Node,
    instance: u64,
    batch: usize,
    reports: std_mpsc::Sender<Report>,
}

impl Lane {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Vec<Row>>) {
        let mut backlog: Vec<Row> = Vec::new();
        loop {
            if backlog.is_empty() {
                match rx.recv().await {
                    Some(rows) => backlog = rows,
                    None => return,
                }
            }
            while backlog.len() < self.batch {
                match rx.try_recv() {
                    Ok(rows) => backlog.extend(rows),
                    Err(_) => break,
                }
            }
            let n = backlog.len().min(self.batch);
            let rows: Vec<Row> = backlog.drain(..n).collect();
            let mut backoff = Duration::from_millis(50);
            loop {
                match self.send(&rows).await {
                    Ok(()) => break,
                    Err(Stop::Closed) => {
                        let _ = self
                            .reports
                            .send(Report::Fatal("the node shut down".into()));
                        return;
                    }
                    Err(Stop::Retry(e)) => {
                        let what = format!("{} {:?}: {e}", self.key.0.name(), self.key.1);
                        tracing::warn!(error = %what, retry_in = ?backoff, "outbox send failed");
                        let _ = self.reports.send(Report::Failed(what));
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            let ids = rows.iter().map(|r| r.id).collect();
            if self
                .reports
                .send(Report::Done(self.key.clone(), ids))
                .is_err()
            {
                return;
            }
        }
    }

    fn headers(&self, r: &Row) -> (String, Vec<(String, Bytes)>) {
        let id = OutboxId {
            instance: self.instance,
            seq: r.id,
        }
        .to_string();
        let mut h = r.headers.clone();
        h.push((ID_HEADER.to_owned(), Bytes::from(id.clone())));
        (id, h)
    }

    async fn send(&self, rows: &[Row]) -> Result<(), Stop> {
        let name = &self.key.1;
        match self.key.0 {
            Kind::Queue => {
                let q = self
                    .node
                    .queue(name)
                    .map_err(|e| Stop::Retry(e.to_string()))?;
                let msgs = rows.iter().map(|r| {
                    let (id, headers) = self.headers(r);
                    (
                        r.payload.clone(),
                        SendOptions {
                            dedup_key: Some(id),
                            headers,
                            ..SendOptions::default()
                        },
                    )
                });
                match q.send_batch_durable(msgs).await {
                    Ok(_) => Ok(()),
                    Err(crate::queue::SendError::Closed) => Err(Stop::Closed),
                    Err(e) => Err(Stop::Retry(e.to_string())),
                }
            }
            Kind::Stream => {
                let s = self
                    .node
                    .stream(name)
                    .map_err(|e| Stop::Retry(e.to_string()))?;
                let recs = rows.iter().map(|r| {
                    let (_, headers) = self.headers(r);
                    let at = UNIX_EPOCH + Duration::from_micros(r.created_us.max(0) as u64);
                    (
                        r.payload.clone(),
                        AppendOptions {
                            key: r.key.clone(),
                            timestamp: Some(at.min(SystemTime::now())),
                            headers,
                        },
                    )
                });
                match s.append_batch_durable(recs).await {
                    Ok(_) => Ok(()),
                    Err(crate::stream::AppendError::Closed) => Err(Stop::Closed),
                    Err(e) => Err(Stop::Retry(e.to_string())),
                }
            }
            Kind::Publish => {
                for r in rows {
                    let (_, headers) = self.headers(r);
                    match self
                        .node
                        .publish_with(name, headers, r.payload.clone())
                        .await
                    {
                        Ok(()) => {}
                        Err(crate::node::PublishError::Closed) => return Err(Stop::Closed),
                        Err(e) => return Err(Stop::Retry(e.to_string())),
                    }
                }
                Ok(())
            }
        }
    }
}

enum Stop {
    Closed,
    Retry(String),
}
