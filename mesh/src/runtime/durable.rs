//! The driver's side of a durable host: the store its batches go to
//! (`Backend`) and the channel it reports them on disk on. What goes into
//! a batch and what waits for it is the engine's (`engine::durable`).

use tokio::sync::mpsc;

use crate::engine::durable::WriteOp;

/// Where batches go: the SQLite writer thread (or, later, a simulated
/// disk that survives a simulated crash).
pub(crate) trait Backend: Send {
    /// Writes batch `seq` after those before it; reports on the done
    /// channel the highest batch on disk.
    fn submit(&mut self, seq: u64, ops: Vec<WriteOp>);

    /// The driver took the report that batches up to `upto` are on disk,
    /// and is about to confirm what they hold.
    fn on_disk(&mut self, _upto: u64) {}
}

/// A durable host's store, as the node task drives it.
pub(crate) struct Durable {
    pub(crate) backend: Box<dyn Backend>,
    done: Option<mpsc::UnboundedReceiver<u64>>,
}

impl Durable {
    pub(crate) fn new(backend: Box<dyn Backend>, done: mpsc::UnboundedReceiver<u64>) -> Self {
        Self {
            backend,
            done: Some(done),
        }
    }

    /// The channel batches are reported done on (taken once by the run
    /// loop).
    pub(crate) fn take_done(&mut self) -> Option<mpsc::UnboundedReceiver<u64>> {
        self.done.take()
    }
}
