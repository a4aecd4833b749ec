//! Durable state in SQLite: the transactional outbox, the inbox, and (with
//! a data dir) a durable host's queues and streams.
//!
//! - [`Outbox`]: the application writes its own rows and its outgoing
//!   messages in one SQLite transaction; a [`Relay`] in the node sends
//!   each pending row and deletes it only once the receiving side has
//!   confirmed it, in order per destination, resuming after a restart.
//! - [`Inbox`]: records a message's id in the same transaction as the
//!   consumer's own writes, so a redelivered message is skipped
//!   (effectively-once processing).
//!
//! ```no_run
//! use futures::StreamExt;
//! use mesh::store::{Destination, Inbox, Outbox, RelayOptions};
//! # async fn f(node: mesh::Node, mut consumer: mesh::queue::Consumer) -> Result<(), Box<dyn std::error::Error>> {
//! // The service's own database, with the outbox's tables in it.
//! let mut db = mesh::store::open("shop.db")?;
//! let outbox = Outbox::install(&db)?;
//! let tx = db.transaction()?;
//! tx.execute("INSERT INTO orders (item) VALUES ('book')", [])?;
//! outbox.enqueue(&tx, Destination::Queue("orders"), b"order 1")?; // same transaction
//! tx.commit()?; // both or neither
//! let _relay = outbox.relay(&node, RelayOptions::default())?; // sends, deletes once accepted
//!
//! // A consumer: effectively once.
//! let mut cdb = mesh::store::open("warehouse.db")?;
//! let inbox = Inbox::install(&cdb)?;
//! let d = consumer.next().await.unwrap();
//! let tx = cdb.transaction()?;
//! inbox.process(&tx, &d, |tx| tx.execute("UPDATE stock SET n = n - 1", []))?; // None: a repeat
//! tx.commit()?;
//! d.ack(); // after the commit
//! # Ok(()) }
//! ```
//!
//! Files the store creates are opened in WAL mode with `synchronous=FULL`
//! and a busy timeout, and created with mode 0600. Each component's schema
//! is versioned in the table `mesh_meta` (not `PRAGMA user_version`, which
//! belongs to the application) and migrated in order; a file of a newer
//! schema, a corrupt file, a SQLite file of another application and a
//! full disk give a typed [`StoreError`].

pub(crate) mod host;
mod inbox;
mod outbox;
mod schema;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::{Connection, OpenFlags};

/// The rusqlite this store is built on, for the application's own
/// connections and transactions.
pub use rusqlite;

pub use host::HOST_FILE;
pub use inbox::{Inbox, InboxError, InboxMessage};
pub use outbox::{
    Destination, Outbox, OutboxId, OutboxStatus, Relay, RelayOptions, RelayStats, ID_HEADER,
};

/// How long a writer waits for another connection's lock before
/// [`StoreError::Busy`].
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a store operation failed. Nothing already committed is lost by any
/// of these: SQLite rolls back the transaction that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file is not a SQLite database, or its pages are damaged.
    #[error(
        "{path}: not a database, or corrupt ({detail}); restore it from a backup or move it away"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        detail: String,
    },
    /// A SQLite database of another application where mesh keeps its own
    /// state (a node's data dir).
    #[error("{path}: a database of another application (tables: {tables}), not a mesh store")]
    Foreign {
        /// The file.
        path: PathBuf,
        /// Some of its tables.
        tables: String,
    },
    /// The file was written by a newer mesh, with a schema this one does
    /// not know.
    #[error("{path}: {component} schema version {found} is newer than this mesh supports ({supported}); upgrade mesh")]
    NewerSchema {
        /// The file.
        path: PathBuf,
        /// Which schema (`outbox`, `inbox`, `host`).
        component: &'static str,
        /// The version in the file.
        found: i64,
        /// The newest this mesh knows.
        supported: i64,
    },
    /// The disk (or the database's size limit) is full: the write was
    /// rolled back.
    #[error("{path}: disk full, nothing written ({detail})")]
    Full {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        detail: String,
    },
    /// An inbox was asked to process a message written before the ids it
    /// pruned: it cannot tell whether that message was processed (a
    /// stream replayed from further back than [`Inbox::retention`]).
    /// Nothing was recorded; give the inbox a retention at least as long
    /// as the stream's.
    #[error("{path}: message {id} was written before the inbox's pruned ids (retention {retention:?}); cannot tell whether it was processed: give the inbox a retention at least as long as the stream's")]
    BeyondInboxWindow {
        /// The file.
        path: PathBuf,
        /// The message's inbox id.
        id: String,
        /// The inbox's retention.
        retention: Duration,
    },
    /// Another connection held the write lock for longer than
    /// [`BUSY_TIMEOUT`].
    #[error("{path}: database locked by another writer for longer than the busy timeout")]
    Busy {
        /// The file.
        path: PathBuf,
    },
    /// Another process holds the lock: a node on the same data dir, or a
    /// relay of the same outbox.
    #[error("{path}: in use by another process (a node on the same data dir, or a relay of the same outbox)")]
    InUse {
        /// The lock file.
        path: PathBuf,
    },
    /// A destination name is not a valid topic, queue or stream name.
    #[error("bad destination: {0}")]
    BadDestination(String),
    /// More headers than a message may carry ([`crate::wire::MAX_HEADERS`]).
    #[error("{count} headers exceed the limit of {limit} per message")]
    TooManyHeaders {
        /// How many were given.
        count: usize,
        /// The limit.
        limit: usize,
    },

    /// A value read back does not decode (written by something else).
    #[error("{path}: bad row in {table}: {detail}")]
    BadRow {
        /// The file.
        path: PathBuf,
        /// The table.
        table: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// Any other SQLite or I/O error.
    #[error("{path}: {detail}")]
    Other {
        /// The file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
}

impl StoreError {
    /// Classifies a rusqlite error on `path` (corrupt, full, busy, ...):
    /// for the application's own statements in a transaction it shares
    /// with the outbox or inbox.
    pub fn sqlite(path: &Path, e: rusqlite::Error) -> StoreError {
        use rusqlite::ErrorCode as C;
        let path = path.to_path_buf();
        let detail = e.to_string();
        match e.sqlite_error_code() {
            Some(C::DatabaseCorrupt | C::NotADatabase) => StoreError::Corrupt { path, detail },
            Some(C::DiskFull) => StoreError::Full { path, detail },
            Some(C::DatabaseBusy | C::DatabaseLocked) => StoreError::Busy { path },
            _ => StoreError::Other { path, detail },
        }
    }
}

/// The file a connection is on (empty for an in-memory database).
pub(crate) fn path_of(conn: &Connection) -> PathBuf {
    conn.path().map(PathBuf::from).unwrap_or_default()
}

/// Opens (creating it, mode 0600, if missing) the SQLite file at `path`
/// the way mesh wants its files: WAL journal, `synchronous=FULL` (a
/// commit is on disk before it returns), a busy timeout of
/// [`BUSY_TIMEOUT`], and a quick integrity check.
///
/// Applications may open their own database with it too, so that their
/// commits are as durable as the outbox needs.
pub fn open(path: impl AsRef<Path>) -> Result<Connection, StoreError> {
    let path = path.as_ref();
    create_private(path)?;
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::sqlite(path, e))?;
    configure(&conn, path)?;
    Ok(conn)
}

/// WAL, synchronous=FULL, busy timeout, quick check.
fn configure(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let err = |e| StoreError::sqlite(path, e);
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    // The first statement to read the file: garbage fails here with
    // "file is not a database".
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Other {
            path: path.to_path_buf(),
            detail: format!("could not switch to WAL (journal mode is {mode})"),
        });
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(err)?;
    let check: String = conn
        .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
        .map_err(err)?;
    if check != "ok" {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: check,
        });
    }
    Ok(())
}

/// Creates `path` empty with mode 0600 if it does not exist, so messages
/// on disk are readable by their owner only.
fn create_private(path: &Path) -> Result<(), StoreError> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    match o.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Other {
            path: path.to_path_buf(),
            detail: e.to_string(),
        }),
    }
}

/// Takes the lock file at `path` (created if missing) exclusively; it is
/// released when the returned file is dropped or the process ends,
/// however it ends. Held by another: [`StoreError::InUse`].
pub(crate) fn lock_file(path: &Path) -> Result<std::fs::File, StoreError> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| StoreError::Other {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse {
            path: path.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Other {
            path: path.to_path_buf(),
            detail: e.to_string(),
        }),
    }
}

/// Headers as stored: postcard of `Vec<(String, Vec<u8>)>`.
pub(crate) fn headers_blob(headers: &[(String, bytes::Bytes)]) -> Vec<u8> {
    let v: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
    postcard::to_stdvec(&v).unwrap_or_default()
}

/// Headers read back (`None`: not what [`headers_blob`] writes).
pub(crate) fn headers_of(bytes: &[u8]) -> Option<Vec<(String, bytes::Bytes)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let v: Vec<(String, Vec<u8>)> = postcard::from_bytes(bytes).ok()?;
    Some(
        v.into_iter()
            .map(|(k, v)| (k, bytes::Bytes::from(v)))
            .collect(),
    )
}

/// Microseconds since the Unix epoch, by the wall clock (stored in rows).
pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}
