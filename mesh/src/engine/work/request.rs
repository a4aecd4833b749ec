//! Request/reply: a request goes to one responding node (round-robin),
//! which hands it to one local responder (round-robin) and answers on the
//! link it came from; a request not answered in time fails.

use super::*;

impl Engine {
    pub(super) fn request(
        &mut self,
        subject: Arc<str>,
        headers: Vec<(String, Bytes)>,
        payload: Bytes,
        timeout: Duration,
        reply: Reply<Result<Bytes, RequestError>>,
    ) {
        let local = self.work.servers.values().any(|(p, _)| p.matches(&subject));
        let remote = self.declared(&format!("{SERVE_PREFIX}{subject}"));
        let n = remote.len() + usize::from(local);
        if n == 0 {
            reply.send(Err(RequestError::NoResponders));
            return;
        }
        self.work.next_responder = self.work.next_responder.wrapping_add(1);
        let pick = self.work.next_responder % n;
        let id = self.work.request_id();
        let to = if pick < remote.len() {
            remote[pick]
        } else {
            self.local
        };
        let deadline = core_queue::after(self.now, timeout);
        self.work.requests.insert(
            id,
            PendingRequest {
                to,
                deadline,
                timeout,
                reply,
            },
        );
        self.work
            .request_deadlines
            .push(std::cmp::Reverse((deadline, id)));
        if pick < remote.len() {
            self.send_work(
                remote[pick],
                &WorkWire::Request {
                    id,
                    subject: &subject,
                    headers: headers_to_wire(&headers),
                    payload: Raw(&payload),
                },
            );
        } else {
            let from = self.local;
            self.serve_locally(RequestData {
                from,
                id,
                subject,
                headers,
                payload,
            });
        }
    }

    /// Hands a request to one local responder, or answers that there is
    /// none.
    pub(super) fn serve_locally(&mut self, r: RequestData) {
        let mut matching: Vec<u32> = self
            .work
            .servers
            .iter()
            .filter(|(_, (p, _))| p.matches(&r.subject))
            .map(|(sid, _)| *sid)
            .collect();
        matching.sort_unstable();
        let mut r = r;
        for i in 0..matching.len() {
            self.work.next_server = self.work.next_server.wrapping_add(1);
            let sid = matching[(self.work.next_server + i) % matching.len()];
            let Some((_, inbox)) = self.work.servers.get(&sid) else {
                continue;
            };
            if inbox.len() >= MAX_WAITING_REQUESTS {
                continue;
            }
            match inbox.push(r) {
                Ok(()) => return,
                Err(back) => r = back,
            }
        }
        self.respond(r.from, r.id, ReplyStatus::NoResponders, Bytes::new());
    }

    pub(super) fn respond(&mut self, to: NodeId, id: u64, status: ReplyStatus, payload: Bytes) {
        if to == self.local {
            let local = self.local;
            self.reply_arrived(local, id, status, payload);
            return;
        }
        self.send_work(
            to,
            &WorkWire::Reply {
                id,
                status,
                payload: Raw(&payload),
            },
        );
    }

    pub(super) fn reply_arrived(
        &mut self,
        from: NodeId,
        id: u64,
        status: ReplyStatus,
        payload: Bytes,
    ) {
        match self.work.requests.get(&id) {
            None => return, // timed out already
            Some(p) if p.to != from => {
                // Not from the responder it went to: forged, or a reply
                // aimed at someone else's request.
                tracing::debug!(%from, "reply from a peer the request did not go to ignored");
                self.counters.forged_replies += 1;
                return;
            }
            Some(_) => {}
        }
        let Some(p) = self.work.requests.remove(&id) else {
            return;
        };
        let result = match status {
            ReplyStatus::Ok => Ok(payload),
            ReplyStatus::NoResponders => Err(RequestError::NoResponders),
            ReplyStatus::Dropped => Err(RequestError::NoReply),
            ReplyStatus::Denied => Err(RequestError::Denied),
        };
        p.reply.send(result);
    }
}
