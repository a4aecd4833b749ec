//! Request/reply: one request, one answer, balanced over the responders of
//! a subject (as NATS request or Zenoh queryables).
//!
//! ```no_run
//! # async fn example(a: mesh::Node, b: mesh::Node) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use futures::StreamExt;
//!
//! let mut service = b.serve("time.now").await?;
//! tokio::spawn(async move {
//!     while let Some(req) = service.next().await {
//!         req.respond("12:00");
//!     }
//! });
//! let answer = a.request("time.now", "", Duration::from_secs(1)).await?;
//! assert_eq!(answer, "12:00");
//! # Ok(()) }
//! ```
//!
//! A request goes to one responding node (round-robin over those that
//! declared a matching [`Node::serve`]), which hands it to one of its
//! responders (round-robin); the answer comes back on the same link. With
//! no responder anywhere, `request` fails at once with
//! [`RequestError::NoResponders`]. A request is sent once: if its
//! responder dies, the request times out.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::{
    core::topic::{Pattern, Topic},
    engine::{
        inbox::Inbox,
        work::{Op, RequestData},
    },
    node::Node,
    wire::ReplyStatus,
    NodeId, TopicError,
};

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No node serves the subject (known at once).
    #[error("no responders for the subject")]
    NoResponders,
    /// No answer within the timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The responder dropped the request without answering.
    #[error("the responder dropped the request without answering")]
    NoReply,
    /// The responder's node does not let this node send to the subject
    /// (its access policy).
    #[error("access denied: this node may not send requests to the subject")]
    Denied,
    /// Not a valid subject.
    #[error("{0}")]
    Subject(#[from] TopicError),
    /// Payload and headers are over the frame limit.
    #[error("request of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// More headers than a message may carry ([`crate::wire::MAX_HEADERS`]).
    #[error("{count} headers exceed the limit of {limit} per message")]
    TooManyHeaders {
        /// How many were given.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The node is shut down.
    #[error("node is shut down")]
    Closed,
}

impl Node {
    /// Sends a request to one responder of `subject` and waits up to
    /// `timeout` for its answer.
    pub async fn request(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes, RequestError> {
        self.request_with(subject, Vec::new(), payload, timeout)
            .await
    }

    /// [`Node::request`] with headers.
    pub async fn request_with(
        &self,
        subject: &str,
        headers: Vec<(String, Bytes)>,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes, RequestError> {
        let subject = Topic::new(subject)?;
        crate::node::check_not_reserved(subject.as_str())?;
        let payload = payload.into();
        let size = payload.len()
            + subject.as_str().len()
            + headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 10)
                .sum::<usize>();
        let limit = self.inner.max_payload;
        if size > limit {
            return Err(RequestError::TooLarge { size, limit });
        }
        crate::wire::check_header_count(&headers).map_err(|count| {
            RequestError::TooManyHeaders {
                count,
                limit: crate::wire::MAX_HEADERS,
            }
        })?;
        let (tx, rx) = oneshot::channel();
        self.inner
            .work_bounded
            .push(Op::Request {
                subject: subject.as_str().into(),
                headers,
                payload,
                timeout,
                reply: tx.into(),
            })
            .await
            .map_err(|_| RequestError::Closed)?;
        rx.await.map_err(|_| RequestError::Closed)?
    }

    /// Serves requests on subjects matching `pattern` (wildcards allowed);
    /// a stream of [`Request`]s. Dropping it stops serving (requests it
    /// held and nobody took are answered "no responders").
    pub async fn serve(&self, pattern: &str) -> Result<Service, TopicError> {
        let pattern = Pattern::new(pattern)?;
        crate::node::check_not_reserved(pattern.as_str())?;
        let sid = self
            .inner
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let inbox = Arc::new(Inbox::default());
        let _ = self.inner.work_control.push_now(Op::Serve {
            sid,
            pattern: pattern.clone(),
            inbox: inbox.clone(),
        });
        Ok(Service {
            node: self.clone(),
            sid,
            pattern,
            inbox,
            buffered: VecDeque::new(),
        })
    }
}

/// Requests for a pattern; see [`Node::serve`].
#[derive(Debug)]
pub struct Service {
    node: Node,
    sid: u32,
    pattern: Pattern,
    inbox: Arc<Inbox<RequestData>>,
    buffered: VecDeque<RequestData>,
}

impl Service {
    /// The pattern served.
    pub fn pattern(&self) -> &Pattern {
        &self.pattern
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        for r in self.buffered.drain(..) {
            let _ = self.node.inner.work_control.push_now(Op::Respond {
                to: r.from,
                id: r.id,
                status: ReplyStatus::NoResponders,
                payload: Bytes::new(),
            });
        }
        let _ = self
            .node
            .inner
            .work_control
            .push_now(Op::Unserve { sid: self.sid });
    }
}

impl futures::Stream for Service {
    type Item = Request;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Request>> {
        let this = &mut *self;
        this.inbox.poll_next_item(cx, &mut this.buffered).map(|d| {
            d.map(|data| Request {
                node: this.node.clone(),
                data: Some(data),
            })
        })
    }
}

/// A request to answer with [`Request::respond`]; dropping it unanswered
/// tells the requester at once ([`RequestError::NoReply`]).
#[derive(Debug)]
pub struct Request {
    node: Node,
    data: Option<RequestData>,
}

impl Request {
    fn data(&self) -> &RequestData {
        self.data.as_ref().expect("present until answered")
    }

    /// The subject it was sent to.
    pub fn subject(&self) -> &str {
        &self.data().subject
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.data().payload
    }

    /// The headers.
    pub fn headers(&self) -> &[(String, Bytes)] {
        &self.data().headers
    }

    /// The requesting node.
    pub fn requester(&self) -> NodeId {
        self.data().from
    }

    fn answer(&mut self, status: ReplyStatus, payload: Bytes) {
        if let Some(d) = self.data.take() {
            let _ = self.node.inner.work_control.push_now(Op::Respond {
                to: d.from,
                id: d.id,
                status,
                payload,
            });
        }
    }

    /// Answers.
    pub fn respond(mut self, payload: impl Into<Bytes>) {
        self.answer(ReplyStatus::Ok, payload.into());
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        self.answer(ReplyStatus::Dropped, Bytes::new());
    }
}
