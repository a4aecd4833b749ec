//! The answer to one call of a handle (a send, a request, a peek), as the
//! engine holds it: a slot it fills once, without knowing what carries the
//! answer back (the runtime fills a `oneshot` channel; a test, a closure).

/// Answers one call once. Dropping it unanswered drops the call's
/// channel, which the caller sees as the node gone.
pub(crate) struct Reply<T>(Box<dyn FnOnce(T) + Send>);

impl<T> Reply<T> {
    pub(crate) fn new(answer: impl FnOnce(T) + Send + 'static) -> Self {
        Self(Box::new(answer))
    }

    /// Gives the caller `value` (if it still waits).
    pub(crate) fn send(self, value: T) {
        (self.0)(value)
    }
}

impl<T> std::fmt::Debug for Reply<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reply")
    }
}
