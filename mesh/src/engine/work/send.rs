//! Sends to queues: which host a message goes to, a send waiting for its
//! host's answer, failing over when the host's link ends, waiting when
//! the queue is full, and the host's side of a remote send.

use super::*;

impl Engine {
    /// Sends message `seq` to its host: this node if it hosts the queue,
    /// else a remote host, else this node from now on
    /// ([`hosting::route`]).
    pub(super) fn route_send(
        &mut self,
        seq: u64,
        queue: Arc<str>,
        msg: OutMsg,
        reply: SendReply,
        full: u32,
    ) {
        // A send that needs a durable confirmation is not kept in this
        // node's memory alone.
        let volatile = msg.durable && self.durable.is_none();
        let here = self.work.hosts_locally(&queue);
        let self_host = self.work.hosting.self_host();
        let hosts = match hosting::route(here, volatile, self_host, || self.remote_hosts(&queue)) {
            Route::Remote(hosts) => hosts,
            Route::Here => return self.send_here(seq, queue, msg, reply, full),
            Route::TakeOn => {
                tracing::debug!(%queue, "no host for queue; this node hosts its own messages");
                if !self.start_hosting(queue.clone()) {
                    let e = SendError::Full(format!(
                        "queue {queue:?} has no host, and this node hosts as many queues as it may"
                    ));
                    return self.resolve_send(reply, Err(e));
                }
                return self.send_here(seq, queue, msg, reply, full);
            }
            Route::NoHost { volatile: true } => {
                let e = SendError::NoHost(format!(
                    "{queue} (no host keeps it, and this node holds queues in memory only)"
                ));
                return self.resolve_send(reply, Err(e));
            }
            Route::NoHost { volatile: false } => {
                return self.resolve_send(reply, Err(SendError::NoHost(queue.to_string())));
            }
        };
        let Some(host) = hosting::queue_host(&queue, &hosts) else {
            // `Route::Remote` names a host; a caller still hears why not.
            return self.resolve_send(reply, Err(SendError::NoHost(queue.to_string())));
        };
        let w = WorkWire::Send {
            queue: &queue,
            seq,
            delay_ms: msg.delay.map(millis).unwrap_or(0),
            ttl_ms: msg.ttl.map(millis).unwrap_or(0),
            dedup: msg.dedup.as_deref(),
            headers: headers_to_wire(&msg.headers),
            payload: Raw(&msg.payload),
        };
        tracing::trace!(local = %self.local, %queue, seq, %host, "send handed to host");
        let link = self.peers.entry(host);
        wire::encode(&mut link.scratch, &Frame::Work(w));
        link.has_data = true;
        let p = PendingSend {
            queue,
            host,
            msg,
            reply,
            full,
            waiting: false,
        };
        self.work.pending_sends.insert(seq, p);
    }

    /// Message `seq` goes to this node's host core: it waits for room if
    /// the queue is full and the policy says wait; a durable host confirms
    /// it once on disk.
    pub(super) fn send_here(
        &mut self,
        seq: u64,
        queue: Arc<str>,
        msg: OutMsg,
        reply: SendReply,
        full: u32,
    ) {
        let now = self.now;
        let id = MessageId {
            publisher: self.local,
            seq,
        };
        if !self.work.host.has_room(&queue) {
            if self.work.full_policy == QueueFull::Wait {
                let p = PendingSend {
                    queue,
                    host: self.local,
                    msg,
                    reply,
                    full,
                    waiting: true,
                };
                self.wait_for_room(seq, p);
            } else {
                let limit = self.work.host.config().max_messages;
                let e = SendError::Full(format!("queue {queue:?} is full ({limit} messages)"));
                self.resolve_send(reply, Err(e));
            }
            return;
        }
        let result = self
            .work
            .host
            .send(now, &queue, new_message(id, msg, now))
            .map(|_| id)
            .map_err(|e| SendError::Full(e.to_string()));
        match self.durable.as_mut() {
            // Confirmed once on disk.
            Some(d) if result.is_ok() => {
                d.hold(crate::engine::durable::Held::LocalSend(reply, result))
            }
            _ => self.resolve_send(reply, result),
        }
    }

    /// This node hosts `queue` from now on: it says so to the mesh, and
    /// its own consumers of the queue (and of its dead-letter queue)
    /// consume here too.
    ///
    /// Refused (false) when this node hosts its limit of queues or its
    /// declaration has no room for more patterns.
    pub(super) fn start_hosting(&mut self, queue: Arc<str>) -> bool {
        let patterns = host_patterns_of(&queue);
        let interest = &self.interest;
        if !self
            .work
            .hosting
            .take(&queue, &patterns, |p| interest.has_room_for(p))
        {
            return false;
        }
        self.declare(patterns);
        let local = self.local;
        for (cid, c) in &self.work.consumers {
            if c.queue == queue || dlq_of(&c.queue) == Some(&queue) {
                let key = ConsumerKey {
                    node: local,
                    cid: *cid,
                };
                if let Err(e) = self.work.host.set_consumer(&c.queue, key, c.options) {
                    tracing::warn!(error = %e, "consumer refused");
                }
            }
        }
        true
    }

    /// Tells a send's caller how it ended (a batch once all its messages
    /// did).
    pub(crate) fn resolve_send_now(
        &mut self,
        reply: SendReply,
        result: Result<MessageId, SendError>,
    ) {
        self.resolve_send(reply, result);
    }

    /// A queue restored from the store is hosted here (a dead-letter queue
    /// with its queue).
    pub(crate) fn host_restored_queue(&mut self, queue: Arc<str>) {
        let base: Arc<str> = dlq_of(&queue).map_or(queue.clone(), Arc::from);
        if !self.work.hosts_locally(&base) && !self.start_hosting(base.clone()) {
            tracing::error!(queue = %base, "restored queue cannot be declared hosted (at the limit of queues); its messages are held but not offered");
        }
    }

    /// `Accepted` frames for remote sends.
    pub(crate) fn send_accepted(&mut self, accepted: FxHashMap<NodeId, Vec<u64>>) {
        for (peer, seqs) in accepted {
            self.send_work(peer, &WorkWire::Accepted { seqs });
        }
    }

    pub(super) fn resolve_send(&mut self, reply: SendReply, result: Result<MessageId, SendError>) {
        match reply {
            SendReply::One(tx) => {
                tx.send(result);
            }
            SendReply::Batch(b) => {
                let Some(batch) = self.work.batches.get_mut(&b) else {
                    return;
                };
                if let Err(e) = result {
                    batch.error.get_or_insert(e);
                }
                batch.remaining = batch.remaining.saturating_sub(1);
                if batch.remaining == 0 {
                    if let Some(batch) = self.work.batches.remove(&b) {
                        batch.reply.send(match batch.error {
                            Some(e) => Err(e),
                            None => Ok(batch.ids),
                        });
                    }
                }
            }
        }
    }

    /// Tries send `seq` again later (its queue was full).
    pub(super) fn wait_for_room(&mut self, seq: u64, mut p: PendingSend) {
        p.full += 1;
        p.waiting = true;
        let wait = FULL_RETRY
            .saturating_mul(1 << p.full.min(5))
            .min(FULL_RETRY_MAX);
        self.work
            .retry
            .push(std::cmp::Reverse((self.now + wait, seq)));
        self.work.pending_sends.insert(seq, p);
    }

    /// The send `seq` waiting for `peer`'s answer, taken out; `None` if
    /// none does (only the host a send went to can settle it).
    pub(super) fn answered_send(&mut self, peer: NodeId, seq: u64) -> Option<PendingSend> {
        let ours = self
            .work
            .pending_sends
            .get(&seq)
            .is_some_and(|p| p.host == peer && !p.waiting);
        ours.then(|| self.work.pending_sends.remove(&seq)).flatten()
    }

    /// A peer's send to a queue this node hosts (or takes on): accepted
    /// with the next batch of `Accepted`, or refused at once.
    pub(super) fn host_send(&mut self, peer: NodeId, queue: &str, seq: u64, msg: OutMsg) {
        let id = MessageId {
            publisher: peer,
            seq,
        };
        // Its sender may think we host it when we do not (a
        // declaration of a previous run of ours): take it rather
        // than lose it, within this node's limits.
        // A one-shot node (`self_host(false)`) takes nothing it
        // would exit with.
        let hosted = self.work.hosts_locally(queue)
            || (self.work.hosting.self_host() && self.start_hosting(queue.into()));
        tracing::trace!(local = %self.local, %peer, seq, "work: send received");
        let now = self.now;
        let result = if hosted {
            self.work.host.send(now, queue, new_message(id, msg, now))
        } else if !self.work.hosting.self_host() {
            Err(core_queue::SendError::NotHosted {
                queue: queue.to_owned(),
            })
        } else {
            Err(core_queue::SendError::TooManyQueues {
                limit: self.work.host.config().max_queues,
            })
        };
        match result {
            Ok(Accepted::Queued | Accepted::Duplicate) => {
                self.work.accepted.entry(peer).or_default().push(seq)
            }
            Err(e) => {
                let reason = e.to_string();
                let full = matches!(
                    e,
                    core_queue::SendError::Full { .. } | core_queue::SendError::HostFull { .. }
                );
                self.send_work(
                    peer,
                    &WorkWire::Refused {
                        seq,
                        full,
                        reason: &reason,
                    },
                );
            }
        }
    }
}

pub(super) fn new_message(id: MessageId, msg: OutMsg, now: Instant) -> NewMessage {
    NewMessage {
        id,
        headers: msg.headers,
        payload: msg.payload,
        not_before: msg.delay.map(|d| core_queue::after(now, d)),
        expires: msg.ttl.map(|d| core_queue::after(now, d)),
        dedup_key: msg.dedup,
    }
}
