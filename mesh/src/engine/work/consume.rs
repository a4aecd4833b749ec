//! Queue consumers: credit (`Flow`) to every live host of a queue,
//! deliveries into a consumer's inbox, settlements (batched acks, nacks,
//! rejects, extensions) back to the host, and the host's side of each.

use super::*;

impl Engine {
    pub(super) fn cancel_consumer(&mut self, cid: u32) {
        let Some(c) = self.work.consumers.remove(&cid) else {
            return;
        };
        // Deliveries never taken go back now.
        for d in c.inbox.close() {
            self.settle(d.host, d.cid, d.epoch, d.tag, Settle::Release);
        }
        let local = self.local;
        self.work
            .host
            .remove_consumers(self.now, |k| k.node == local && k.cid == cid);
        for h in c.granted {
            self.send_work(
                h,
                &WorkWire::Flow {
                    queue: &c.queue,
                    cid,
                    prefetch: 0,
                    visibility_ms: 0,
                    max_attempts: 0,
                },
            );
        }
    }

    pub(super) fn settle(&mut self, host: NodeId, cid: u32, epoch: u64, tag: u64, how: Settle) {
        if host == self.local {
            let key = ConsumerKey {
                node: self.local,
                cid,
            };
            self.host_settle(key, epoch, tag, how);
            return;
        }
        match how {
            Settle::Ack => self
                .work
                .acks
                .entry((host, cid, epoch))
                .or_default()
                .push(tag),
            Settle::Release => self.send_work(host, &WorkWire::Release { cid, epoch, tag }),
            Settle::Nack(delay) => self.send_work(
                host,
                &WorkWire::Nack {
                    cid,
                    epoch,
                    tag,
                    delay_ms: delay.map(millis).unwrap_or(0),
                },
            ),
            Settle::Reject(reason) => self.send_work(
                host,
                &WorkWire::Reject {
                    cid,
                    epoch,
                    tag,
                    reason: &reason,
                },
            ),
            Settle::Extend(by) => self.send_work(
                host,
                &WorkWire::Extend {
                    cid,
                    epoch,
                    tag,
                    ms: millis(by),
                },
            ),
        }
    }

    pub(super) fn host_settle(&mut self, key: ConsumerKey, epoch: u64, tag: u64, how: Settle) {
        if epoch != self.work.epoch {
            // A delivery of a previous run of this host: its tag may name
            // another message now.
            self.work.host.count_stale(1);
            tracing::debug!(consumer = %key.node, epoch, "settle of a previous run ignored");
            return;
        }
        let now = self.now;
        let h = &mut self.work.host;
        match how {
            Settle::Ack => h.ack(tag, &key),
            Settle::Release => h.release(now, tag, &key),
            Settle::Nack(delay) => h.nack(now, tag, &key, delay),
            Settle::Reject(reason) => h.reject(now, tag, &key, &reason),
            Settle::Extend(by) => h.extend(now, tag, &key, by),
        };
    }

    /// `peer`'s consumer `cid` acks `tags` of host run `epoch` (those of
    /// another run, before a restart, ack nothing).
    pub(super) fn host_acks(&mut self, peer: NodeId, cid: u32, epoch: u64, tags: Vec<u64>) {
        let key = ConsumerKey { node: peer, cid };
        if epoch != self.work.epoch {
            self.work.host.count_stale(tags.len());
            tracing::debug!(%peer, epoch, "acks of a previous run ignored");
        } else {
            for tag in tags {
                self.work.host.ack(tag, &key);
            }
        }
    }

    /// A host delivered `msgs` to our consumer `cid`: into its inbox, or
    /// back to the host if it is gone or over the credit it granted.
    pub(super) fn deliveries_arrived(
        &mut self,
        peer: NodeId,
        body: &Bytes,
        cid: u32,
        epoch: u64,
        msgs: Vec<DeliverWire<'_>>,
    ) -> Result<(), WireError> {
        let fits = match self.work.consumers.get(&cid) {
            // A host that ignores the credit we granted (a bug or a
            // hostile peer) cannot fill our memory: what is over goes
            // back, before anything is built for it.
            Some(c) if c.inbox.len() + msgs.len() > inbox_limit(c.options.prefetch) => {
                tracing::warn!(%peer, cid, "queue host sent more than the credit granted; giving the excess back");
                false
            }
            Some(_) => true,
            None => false,
        };
        if !fits {
            // Checked as if taken: a bad origin ends the link either way.
            for m in &msgs {
                if let Some(raw) = m.origin {
                    wire::node_id(raw)?;
                }
            }
            for m in &msgs {
                self.settle(peer, cid, epoch, m.tag, Settle::Release);
            }
            return Ok(());
        }
        let mut batch = Vec::with_capacity(msgs.len());
        for m in msgs {
            let publisher = match m.origin {
                Some(raw) => wire::node_id(raw)?,
                None => peer,
            };
            batch.push(DeliveryData {
                host: peer,
                cid,
                epoch,
                tag: m.tag,
                attempt: m.attempt,
                id: MessageId {
                    publisher,
                    seq: m.seq,
                },
                headers: headers_from_wire(body, &m.headers),
                payload: slice(body, m.payload.0),
                dead: m.dead.map(|(n, r)| (n, r.to_owned())),
            });
        }
        let back = self
            .work
            .consumers
            .get(&cid)
            .and_then(|c| c.inbox.push_many(batch).err());
        // That consumer's inbox closed: give them back at once.
        for d in back.into_iter().flatten() {
            self.settle(peer, d.cid, d.epoch, d.tag, Settle::Release);
        }
        Ok(())
    }

    pub(super) fn grant_flows(&mut self) {
        let cids: Vec<u32> = self.work.consumers.keys().copied().collect();
        for cid in cids {
            let Some(queue) = self.work.consumers.get(&cid).map(|c| c.queue.clone()) else {
                continue;
            };
            let hosts = self.declared(&format!("{HOST_PREFIX}{queue}"));
            for h in hosts {
                let Some(c) = self.work.consumers.get_mut(&cid) else {
                    break;
                };
                if !c.granted.insert(h) {
                    continue;
                }
                let o = c.options;
                self.send_work(
                    h,
                    &WorkWire::Flow {
                        queue: &queue,
                        cid,
                        prefetch: o.prefetch,
                        visibility_ms: millis(o.visibility_timeout),
                        max_attempts: o.max_attempts,
                    },
                );
            }
        }
    }

    /// Hands `ds` (dispatched in this order, all to `consumer`) over: to
    /// a local consumer's inbox, or in `Deliver` frames on its node's link.
    pub(super) fn deliver_work(&mut self, consumer: ConsumerKey, ds: Vec<Dispatch<ConsumerKey>>) {
        if consumer.node == self.local {
            let data: Vec<DeliveryData> = ds
                .into_iter()
                .map(|d| DeliveryData {
                    host: self.local,
                    cid: consumer.cid,
                    epoch: self.work.epoch,
                    tag: d.tag,
                    attempt: d.attempt,
                    id: d.id,
                    headers: d.headers,
                    payload: d.payload,
                    dead: d.dead,
                })
                .collect();
            let back = match self.work.consumers.get(&consumer.cid) {
                Some(c) => c.inbox.push_many(data).err(),
                None => Some(data),
            };
            if let Some(back) = back {
                self.work
                    .host
                    .remove_consumers(self.now, |k| *k == consumer);
                for d in back {
                    self.host_settle(consumer.clone(), d.epoch, d.tag, Settle::Release);
                }
            }
            return;
        }
        let peer = consumer.node;
        if !self.peers.is_up(&peer) {
            // Its link went: the messages come back (the consumer is
            // removed by then, so this is rare: a race within a batch).
            self.work
                .host
                .remove_consumers(self.now, |k| k.node == peer);
            return;
        }
        let local = self.local;
        let origins: Vec<Option<Vec<u8>>> = ds
            .iter()
            .map(|d| (d.id.publisher != local).then(|| d.id.publisher.to_bytes()))
            .collect();
        let epoch = self.work.epoch;
        let link = self.peers.entry(peer);
        link.has_data = true;
        // Frames of at most DELIVER_BATCH messages and about
        // DELIVER_BYTES of payload.
        let mut at = 0;
        while at < ds.len() {
            let mut end = at;
            let mut bytes = 0;
            while end < ds.len() && end - at < DELIVER_BATCH {
                let d = &ds[end];
                let size = d.payload.len()
                    + d.headers
                        .iter()
                        .map(|(k, v)| k.len() + v.len() + 10)
                        .sum::<usize>()
                    + d.dead.as_ref().map_or(0, |(_, r)| r.len())
                    + 128;
                if end > at && bytes + size > DELIVER_BYTES {
                    break;
                }
                bytes += size;
                end += 1;
            }
            let msgs = ds[at..end]
                .iter()
                .zip(&origins[at..end])
                .map(|(d, o)| DeliverWire {
                    tag: d.tag,
                    attempt: d.attempt,
                    origin: o.as_deref().map(Raw),
                    seq: d.id.seq,
                    dead: d.dead.as_ref().map(|(n, r)| (*n, r.as_str())),
                    headers: headers_to_wire(&d.headers),
                    payload: Raw(&d.payload),
                })
                .collect();
            wire::encode(
                &mut link.scratch,
                &Frame::Work(WorkWire::Deliver {
                    queue: &ds[at].queue,
                    cid: consumer.cid,
                    epoch,
                    msgs,
                }),
            );
            at = end;
        }
    }
}

/// A consumer's settlement of one delivery (`Nack`, `Release`, `Reject`,
/// `Extend`): (consumer id, host epoch, tag, how); `None` for other frames.
pub(super) fn settle_from_wire(w: &WorkWire<'_>) -> Option<(u32, u64, u64, Settle)> {
    Some(match *w {
        WorkWire::Nack {
            cid,
            epoch,
            tag,
            delay_ms,
        } => {
            let delay = (delay_ms > 0).then(|| Duration::from_millis(delay_ms));
            (cid, epoch, tag, Settle::Nack(delay))
        }
        WorkWire::Release { cid, epoch, tag } => (cid, epoch, tag, Settle::Release),
        WorkWire::Reject {
            cid,
            epoch,
            tag,
            reason,
        } => (cid, epoch, tag, Settle::Reject(reason.to_owned())),
        WorkWire::Extend {
            cid,
            epoch,
            tag,
            ms,
        } => (cid, epoch, tag, Settle::Extend(Duration::from_millis(ms))),
        _ => return None,
    })
}
