//! A simulated process: every task of one node (its node task, its link
//! tasks, and the user's service tasks spawned on it) runs through its
//! [`Gate`], which can stop them all at once (pause: a stopped-the-world
//! process) or kill them (crash: in-memory state is gone).

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

use tokio::task::AbortHandle;

#[derive(Debug, Default)]
struct State {
    paused: bool,
    dead: bool,
    /// Tasks that wanted to run while paused.
    parked: Vec<Waker>,
    /// Every task spawned through the gate (finished ones are pruned).
    tasks: Vec<AbortHandle>,
}

/// Pauses or kills every task of one simulated node.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<State>,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic in a test while holding this lock must not hide the
        // original failure behind a poisoned-lock panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `fut` as a task of this node.
    pub(crate) fn spawn<F>(self: &Arc<Self>, fut: F) -> AbortHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(Gated {
            gate: self.clone(),
            fut: Box::pin(fut),
        })
        .abort_handle();
        let mut st = self.lock();
        if st.dead {
            handle.abort();
        } else {
            if st.tasks.len() >= 64 && st.tasks.len().is_power_of_two() {
                st.tasks.retain(|t| !t.is_finished());
            }
            st.tasks.push(handle.clone());
        }
        handle
    }

    pub(crate) fn pause(&self) {
        self.lock().paused = true;
    }

    pub(crate) fn resume(&self) {
        let parked = {
            let mut st = self.lock();
            st.paused = false;
            std::mem::take(&mut st.parked)
        };
        for w in parked {
            w.wake();
        }
    }

    /// Kills every task; the node's memory is gone.
    pub(crate) fn kill(&self) {
        let (tasks, parked) = {
            let mut st = self.lock();
            st.dead = true;
            (
                std::mem::take(&mut st.tasks),
                std::mem::take(&mut st.parked),
            )
        };
        for t in tasks {
            t.abort();
        }
        drop(parked);
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.lock().paused
    }
}

struct Gated<F> {
    gate: Arc<Gate>,
    fut: Pin<Box<F>>,
}

impl<F: Future<Output = ()>> Future for Gated<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        {
            let mut st = self.gate.lock();
            if st.dead {
                return Poll::Ready(());
            }
            if st.paused {
                st.parked.push(cx.waker().clone());
                return Poll::Pending;
            }
        }
        self.fut.as_mut().poll(cx)
    }
}
