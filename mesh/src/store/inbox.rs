//! The inbox: effectively-once processing of at-least-once deliveries.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use rusqlite::{Connection, Transaction};

use super::{outbox::ID_HEADER, path_of, schema, StoreError};

/// Something delivered that has a stable id: the same id on every
/// redelivery and every resend.
pub trait InboxMessage {
    /// The id an [`Inbox`] records.
    fn inbox_id(&self) -> String;

    /// When it was written (Unix µs), for messages that can be read again
    /// long after (stream records): one written before the ids the inbox
    /// pruned is refused with [`StoreError::BeyondInboxWindow`] rather
    /// than processed a second time. `None`: not checked.
    fn written_at_us(&self) -> Option<i64> {
        None
    }
}

/// The outbox id a message carries, if it came from an outbox.
fn outbox_id(headers: &[(String, bytes::Bytes)]) -> Option<String> {
    headers
        .iter()
        .rev()
        .find(|(k, _)| k == ID_HEADER)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
        .map(|v| format!("o:{v}"))
}

impl InboxMessage for crate::queue::Delivery {
    /// The outbox id if it has one (stable across resends by the relay),
    /// else the id the sender gave it.
    fn inbox_id(&self) -> String {
        outbox_id(self.headers()).unwrap_or_else(|| {
            let id = self.id();
            format!("q:{}:{}", id.publisher, id.seq)
        })
    }
}

impl InboxMessage for crate::stream::Record {
    /// The outbox id if it has one (the same when a relay appended it
    /// twice), else its partition, its host's run and its offset (a host
    /// that restarts without its log numbers from 0 again).
    fn inbox_id(&self) -> String {
        outbox_id(self.headers()).unwrap_or_else(|| {
            let p = self.partition();
            format!(
                "s:{}/{}@{}:{}",
                p.host,
                p.index,
                self.epoch(),
                self.offset()
            )
        })
    }

    /// Its timestamp (the append time, or the event time it was given).
    fn written_at_us(&self) -> Option<i64> {
        Some(i64::try_from(self.timestamp_ms()).unwrap_or(i64::MAX / 1000) * 1000)
    }
}

impl InboxMessage for crate::Message {
    fn inbox_id(&self) -> String {
        outbox_id(&self.headers)
            .unwrap_or_else(|| format!("p:{}:{}", self.id.publisher, self.id.seq))
    }
}

impl InboxMessage for str {
    fn inbox_id(&self) -> String {
        format!("u:{self}")
    }
}

/// Records processed message ids in the consumer's own database, in the
/// consumer's own transaction: a message whose id is there is skipped.
///
/// ```no_run
/// use mesh::store::rusqlite;
/// # fn f(conn: &mut rusqlite::Connection, inbox: &mesh::store::Inbox, d: mesh::queue::Delivery)
/// # -> Result<(), Box<dyn std::error::Error>> {
/// let tx = conn.transaction()?;
/// let done = inbox.process(&tx, &d, |tx| {
///     tx.execute("UPDATE stock SET n = n - 1", [])?;
///     Ok::<_, rusqlite::Error>(())
/// })?;
/// tx.commit()?;
/// d.ack(); // after the commit: a crash before it redelivers, and the inbox skips it
/// # let _ = done; Ok(()) }
/// ```
///
/// Ids are kept for [`Inbox::retention`] (7 days by default) and pruned
/// as it goes. A stream record written before the pruned ids (a replay
/// from further back) is refused with [`StoreError::BeyondInboxWindow`]
/// instead of processed again: give an inbox that serves a stream a
/// retention at least as long as the stream's (`Duration::MAX`: never
/// prune). A queue message redelivered after the retention would be
/// processed again.
#[derive(Debug)]
pub struct Inbox {
    retention: Duration,
    calls: AtomicU64,
}

/// Why [`Inbox::process`] failed: the store, or the handler.
#[derive(Debug, thiserror::Error)]
pub enum InboxError<E> {
    /// Recording the id failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The handler failed; roll the transaction back.
    #[error("handler failed: {0}")]
    Handler(E),
}

impl Inbox {
    /// Creates (or migrates) the inbox table in `conn`'s database.
    pub fn install(conn: &Connection) -> Result<Inbox, StoreError> {
        schema::install(conn, &path_of(conn), &[&schema::INBOX], false)?;
        Ok(Inbox {
            retention: Duration::from_secs(7 * 24 * 3600),
            calls: AtomicU64::new(0),
        })
    }

    /// Keeps ids for `d` instead of 7 days (`Duration::MAX`: for ever).
    pub fn retention(mut self, d: Duration) -> Self {
        self.retention = d;
        self
    }

    /// Runs `f` in `tx` unless `msg` was processed before, and records it
    /// as processed in the same transaction. Returns `None` for a repeat
    /// (`f` not called). Commit `tx`, then ack the delivery.
    pub fn process<M, T, E>(
        &self,
        tx: &Transaction<'_>,
        msg: &M,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, E>,
    ) -> Result<Option<T>, InboxError<E>>
    where
        M: InboxMessage + ?Sized,
    {
        let id = msg.inbox_id();
        if let Some(written) = msg.written_at_us() {
            if written < self.pruned_before(tx)? && !self.seen_id(tx, &id)? {
                return Err(InboxError::Store(StoreError::BeyondInboxWindow {
                    path: path_of(tx),
                    id,
                    retention: self.retention,
                }));
            }
        }
        if !self.record(tx, &id)? {
            return Ok(None);
        }
        f(tx).map(Some).map_err(InboxError::Handler)
    }

    /// Records `id` as processed in `tx`; false if it was already.
    pub fn record(&self, tx: &Transaction<'_>, id: &str) -> Result<bool, StoreError> {
        let path = path_of(tx);
        let err = |e| StoreError::sqlite(&path, e);
        let now = super::now_us();
        let new = tx
            .prepare_cached("INSERT OR IGNORE INTO mesh_inbox (id, at_us) VALUES (?1, ?2)")
            .map_err(err)?
            .execute(rusqlite::params![id, now])
            .map_err(err)?
            == 1;
        // Pruning as it goes: a little every 1,024 calls.
        if self.calls.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            self.prune_in(tx, now)?;
        }
        Ok(new)
    }

    /// Was `msg` processed (and still remembered)?
    pub fn seen<M: InboxMessage + ?Sized>(
        &self,
        conn: &Connection,
        msg: &M,
    ) -> Result<bool, StoreError> {
        self.seen_id(conn, &msg.inbox_id())
    }

    fn seen_id(&self, conn: &Connection, id: &str) -> Result<bool, StoreError> {
        let path = path_of(conn);
        conn.prepare_cached("SELECT 1 FROM mesh_inbox WHERE id = ?1")
            .and_then(|mut s| s.exists([id]))
            .map_err(|e| StoreError::sqlite(&path, e))
    }

    /// Ids recorded before this (Unix µs) may have been pruned.
    fn pruned_before(&self, conn: &Connection) -> Result<i64, StoreError> {
        let path = path_of(conn);
        conn.prepare_cached("SELECT value FROM mesh_inbox_state WHERE key = 'pruned_before'")
            .and_then(|mut s| {
                s.query_row([], |r| r.get::<_, i64>(0))
                    .or_else(|e| match e {
                        rusqlite::Error::QueryReturnedNoRows => Ok(i64::MIN),
                        e => Err(e),
                    })
            })
            .map_err(|e| StoreError::sqlite(&path, e))
    }

    fn prune_in(&self, conn: &Connection, now: i64) -> Result<(), StoreError> {
        let path = path_of(conn);
        let err = |e| StoreError::sqlite(&path, e);
        let before = now.saturating_sub(self.retention.as_micros().min(i64::MAX as u128) as i64);
        let pruned = conn
            .prepare_cached(
                "DELETE FROM mesh_inbox WHERE id IN
                 (SELECT id FROM mesh_inbox WHERE at_us < ?1 ORDER BY at_us LIMIT 10000)",
            )
            .and_then(|mut s| s.execute([before]))
            .map_err(err)?;
        if pruned > 0 {
            // What was recorded before `before` may be gone: a message
            // written before it cannot be told apart any more.
            conn.prepare_cached(
                "INSERT INTO mesh_inbox_state (key, value) VALUES ('pruned_before', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
            )
            .and_then(|mut s| s.execute([before]))
            .map_err(err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Written(&'static str, i64);

    impl InboxMessage for Written {
        fn inbox_id(&self) -> String {
            self.0.to_owned()
        }
        fn written_at_us(&self) -> Option<i64> {
            Some(self.1)
        }
    }

    /// Once ids are pruned, a message written before them (a stream read
    /// again from further back than the retention) is refused with a
    /// typed error instead of processed again; later ones, and repeats
    /// still remembered, go on as before.
    #[test]
    fn messages_written_before_the_pruned_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = super::super::open(dir.path().join("i.db")).unwrap();
        let inbox = Inbox::install(&conn)
            .unwrap()
            .retention(Duration::from_secs(3600));
        let now = super::super::now_us();
        let hour = 3_600_000_000i64;
        let run = |conn: &mut Connection, m: &Written| {
            let tx = conn.transaction().unwrap();
            let r = inbox.process(&tx, m, |_| Ok::<_, std::convert::Infallible>(()));
            tx.commit().unwrap();
            r
        };
        assert!(matches!(
            run(&mut conn, &Written("old", now - 3 * hour / 2)),
            Ok(Some(()))
        ));
        assert!(matches!(
            run(&mut conn, &Written("kept", now)),
            Ok(Some(()))
        ));
        // Two hours on, "old" (recorded now) is pruned.
        let tx = conn.transaction().unwrap();
        tx.execute(
            "UPDATE mesh_inbox SET at_us = ?1 WHERE id = 'old'",
            [now - 2 * hour],
        )
        .unwrap();
        inbox.prune_in(&tx, now).unwrap();
        tx.commit().unwrap();
        assert!(!inbox.seen(&conn, "u:x").unwrap());
        match run(&mut conn, &Written("old", now - 3 * hour / 2)) {
            Err(InboxError::Store(StoreError::BeyondInboxWindow { id, .. })) => {
                assert_eq!(id, "old")
            }
            other => panic!("expected BeyondInboxWindow, got {other:?}"),
        }
        // Remembered: a repeat, skipped as before.
        assert!(matches!(run(&mut conn, &Written("kept", now)), Ok(None)));
        // Written after the pruned ids: processed.
        assert!(matches!(run(&mut conn, &Written("new", now)), Ok(Some(()))));
    }
}
