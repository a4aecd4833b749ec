//! Versioned schemas: each component's tables and their migrations, with
//! the version applied kept in `mesh_meta`.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::StoreError;

/// One component's tables: `migrations[i]` takes version `i` to `i + 1`.
/// Append only: a released migration never changes.
#[derive(Debug)]
pub(crate) struct Component {
    pub(crate) name: &'static str,
    pub(crate) migrations: &'static [&'static str],
}

impl Component {
    /// The version this build writes.
    pub(crate) fn version(&self) -> i64 {
        self.migrations.len() as i64
    }
}

pub(crate) const OUTBOX: Component = Component {
    name: "outbox",
    migrations: &[
        // 1: rows waiting to be sent (sent ones are deleted, and counted);
        // AUTOINCREMENT so an id, which names a message, is never reused.
        "CREATE TABLE mesh_outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind INTEGER NOT NULL,
            dest TEXT NOT NULL,
            key BLOB NOT NULL,
            headers BLOB NOT NULL,
            payload BLOB NOT NULL,
            created_us INTEGER NOT NULL
        );
        CREATE TABLE mesh_outbox_state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO mesh_outbox_state VALUES ('instance', abs(random() >> 1)), ('sent', 0);",
    ],
};

pub(crate) const INBOX: Component = Component {
    name: "inbox",
    migrations: &[
        // 1: ids of processed messages, with when (for pruning).
        "CREATE TABLE mesh_inbox (id TEXT PRIMARY KEY, at_us INTEGER NOT NULL) WITHOUT ROWID;
        CREATE INDEX mesh_inbox_at ON mesh_inbox(at_us);",
        // 2: how far pruning went ('pruned_before', Unix µs): a message
        // written before that may have been processed and forgotten.
        "CREATE TABLE mesh_inbox_state (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;",
    ],
};

pub(crate) const HOST: Component = Component {
    name: "host",
    migrations: &[
        // 1: a durable host's queued messages (by journal id, in order),
        // its stream partitions' records, first offsets and committed
        // group offsets, and its run (epoch).
        "CREATE TABLE mesh_host_state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        CREATE TABLE mesh_queue (
            jid INTEGER PRIMARY KEY,
            queue TEXT NOT NULL,
            origin BLOB NOT NULL,
            seq INTEGER NOT NULL,
            headers BLOB NOT NULL,
            payload BLOB NOT NULL,
            not_before_us INTEGER,
            expires_us INTEGER,
            dedup TEXT,
            dead_attempts INTEGER,
            dead_reason TEXT
        );
        CREATE TABLE mesh_stream (
            id INTEGER PRIMARY KEY,
            stream TEXT NOT NULL,
            part INTEGER NOT NULL,
            off INTEGER NOT NULL,
            ts_ms INTEGER NOT NULL,
            key BLOB NOT NULL,
            headers BLOB NOT NULL,
            payload BLOB NOT NULL
        );
        CREATE UNIQUE INDEX mesh_stream_pos ON mesh_stream (stream, part, off);
        CREATE TABLE mesh_stream_first (
            stream TEXT NOT NULL,
            part INTEGER NOT NULL,
            first INTEGER NOT NULL,
            PRIMARY KEY (stream, part)
        ) WITHOUT ROWID;
        CREATE TABLE mesh_stream_commit (
            stream TEXT NOT NULL,
            part INTEGER NOT NULL,
            grp TEXT NOT NULL,
            off INTEGER NOT NULL,
            PRIMARY KEY (stream, part, grp)
        ) WITHOUT ROWID;",
        // 2: dedup keys, kept for their window also once their message
        // is gone (acked), so a resend after a restart is still dropped.
        "CREATE TABLE mesh_queue_dedup (
            queue TEXT NOT NULL,
            key TEXT NOT NULL,
            until_us INTEGER NOT NULL,
            PRIMARY KEY (queue, key)
        ) WITHOUT ROWID;",
    ],
};

/// Creates or migrates `components` in one immediate transaction.
///
/// `own_file`: the file is mesh's alone (a node's data dir), so tables of
/// anything else mean it is some other application's database.
pub(crate) fn install(
    conn: &Connection,
    path: &Path,
    components: &[&Component],
    own_file: bool,
) -> Result<(), StoreError> {
    let err = |e| StoreError::sqlite(path, e);
    // The connection is borrowed (it may be the application's), so the
    // transaction is driven by hand rather than through `&mut`.
    let tx =
        rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate).map_err(err)?;
    if own_file {
        let mut stmt = tx
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table'
                 AND name NOT LIKE 'mesh\\_%' ESCAPE '\\' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'
                 ORDER BY name LIMIT 5",
            )
            .map_err(err)?;
        let others: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .map_err(err)?
            .collect::<Result<_, _>>()
            .map_err(err)?;
        if !others.is_empty() {
            return Err(StoreError::Foreign {
                path: path.to_path_buf(),
                tables: others.join(", "),
            });
        }
    }
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS mesh_meta (
            component TEXT PRIMARY KEY,
            version INTEGER NOT NULL
        )",
    )
    .map_err(err)?;
    for c in components {
        let found: i64 = tx
            .query_row(
                "SELECT version FROM mesh_meta WHERE component = ?1",
                [c.name],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?
            .unwrap_or(0);
        if found > c.version() {
            return Err(StoreError::NewerSchema {
                path: path.to_path_buf(),
                component: c.name,
                found,
                supported: c.version(),
            });
        }
        for (i, m) in c.migrations.iter().enumerate().skip(found.max(0) as usize) {
            tx.execute_batch(m).map_err(err)?;
            tx.execute(
                "INSERT INTO mesh_meta (component, version) VALUES (?1, ?2)
                 ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                rusqlite::params![c.name, i as i64 + 1],
            )
            .map_err(err)?;
            tracing::debug!(component = c.name, version = i + 1, path = %path.display(), "schema migrated");
        }
    }
    tx.commit().map_err(err)
}
