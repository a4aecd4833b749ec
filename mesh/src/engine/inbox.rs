//! What the engine hands to one receiver outside it (a queue consumer, a
//! responder, a stream consumer): items pushed here, taken all at once by
//! the handle, which a waker tells of new ones.

use std::{
    collections::VecDeque,
    sync::{Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves a plain buffer behind; keep
    // going with whatever it holds rather than poisoning the node.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Items for one receiver outside the node task (a queue consumer, a
/// responder): pushed by the node task, taken all at once by the handle.
/// Bounded by whoever pushes (a consumer's credit, the requests in flight).
#[derive(Debug)]
pub(crate) struct Inbox<T> {
    inner: Mutex<InboxInner<T>>,
}

#[derive(Debug)]
struct InboxInner<T> {
    items: VecDeque<T>,
    waker: Option<Waker>,
    closed: bool,
}

impl<T> Default for Inbox<T> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(InboxInner {
                items: VecDeque::new(),
                waker: None,
                closed: false,
            }),
        }
    }
}

impl<T> Inbox<T> {
    /// Adds an item; gives it back if the inbox is closed.
    pub(crate) fn push(&self, item: T) -> Result<(), T> {
        let mut g = lock(&self.inner);
        if g.closed {
            return Err(item);
        }
        g.items.push_back(item);
        if let Some(w) = g.waker.take() {
            drop(g);
            w.wake();
        }
        Ok(())
    }

    /// Items waiting to be taken.
    pub(crate) fn len(&self) -> usize {
        lock(&self.inner).items.len()
    }

    /// Adds items in order; gives them back if the inbox is closed.
    pub(crate) fn push_many(&self, items: Vec<T>) -> Result<(), Vec<T>> {
        let mut g = lock(&self.inner);
        if g.closed {
            return Err(items);
        }
        g.items.extend(items);
        if let Some(w) = g.waker.take() {
            drop(g);
            w.wake();
        }
        Ok(())
    }

    /// Closes it and returns what was never taken.
    pub(crate) fn close(&self) -> VecDeque<T> {
        let mut g = lock(&self.inner);
        g.closed = true;
        let w = g.waker.take();
        let left = std::mem::take(&mut g.items);
        drop(g);
        if let Some(w) = w {
            w.wake();
        }
        left
    }

    /// The next item, taking everything waiting into `buffered` when it is
    /// empty; `Ready(None)` once closed and empty.
    pub(crate) fn poll_next_item(
        &self,
        cx: &mut Context<'_>,
        buffered: &mut VecDeque<T>,
    ) -> Poll<Option<T>> {
        if buffered.is_empty() {
            match self.poll_take(cx, buffered) {
                Poll::Ready(true) => {}
                Poll::Ready(false) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
        match buffered.pop_front() {
            Some(item) => Poll::Ready(Some(item)),
            None => Poll::Pending,
        }
    }

    /// Moves everything into `out` (empty); `Ready(false)` once closed and
    /// empty.
    pub(crate) fn poll_take(&self, cx: &mut Context<'_>, out: &mut VecDeque<T>) -> Poll<bool> {
        let mut g = lock(&self.inner);
        if !g.items.is_empty() {
            std::mem::swap(&mut g.items, out);
            return Poll::Ready(true);
        }
        if g.closed {
            return Poll::Ready(false);
        }
        g.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}
