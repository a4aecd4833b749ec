//! Appends: which host a record goes to (rendezvous over (stream, key)),
//! an append call waiting for its parts' answers, failing over when a
//! host's link ends, and the host's side of a remote append.

use super::*;

impl Engine {
    /// Routes an append call's records: here if this node hosts the
    /// stream, else to live hosts by key, else here from now on.
    pub(super) fn append(
        &mut self,
        stream: Arc<str>,
        records: Vec<NewRecord>,
        durable: bool,
        reply: Reply<Result<Vec<Placed>, AppendFailure>>,
    ) {
        self.streams.next_seq += 1;
        let call = self.streams.next_seq;
        let n = records.len();
        self.streams.calls.insert(
            call,
            AppendCall {
                durable,
                placed: vec![None; n],
                remaining: 0,
                error: None,
                reply,
            },
        );
        self.route_append(call, stream, records, (0..n).collect(), None);
        self.finish_call_if_done(call);
    }

    pub(super) fn route_append(
        &mut self,
        call: u64,
        stream: Arc<str>,
        records: Vec<NewRecord>,
        slots: Vec<usize>,
        retry: Option<NodeId>,
    ) {
        // A call that needs a durable confirmation is not kept in this
        // node's memory alone.
        let volatile =
            self.durable.is_none() && self.streams.calls.get(&call).is_some_and(|c| c.durable);
        let here = self.streams.hosts_locally(&stream);
        let self_host = self.streams.hosting.self_host();
        let remote = || {
            hosting::failover_hosts(
                retry,
                || self.stream_hosts(&stream),
                || self.live_stream_hosts(&stream),
            )
        };
        let hosts = match hosting::route(here, volatile, self_host, remote) {
            Route::Remote(hosts) => hosts,
            Route::NoHost { .. } => return self.fail_call(call, AppendFailure::NoHost),
            Route::TakeOn => {
                tracing::debug!(%stream, "no host for stream; this node hosts its own partitions");
                if !self.start_hosting_stream(&stream) {
                    let reason = format!(
                        "stream {stream:?} has no host, and this node hosts as many streams as it may"
                    );
                    let e = AppendFailure::Refused { full: true, reason };
                    return self.fail_call(call, e);
                }
                return self.append_local(call, &stream, records, slots);
            }
            Route::Here => return self.append_local(call, &stream, records, slots),
        };
        // Records per host, in order; frames of bounded size.
        let mut per_host: Vec<(NodeId, Vec<NewRecord>, Vec<usize>, usize)> = Vec::new();
        let mut open: FxHashMap<NodeId, usize> = FxHashMap::default();
        for (r, slot) in records.into_iter().zip(slots) {
            let h = match hosts.as_slice() {
                [only] => *only,
                _ => match hosting::record_host(&stream, &r.key, &hosts) {
                    Some(h) => h,
                    None => continue,
                },
            };
            let size = core_stream::record_size(&r.key, &r.headers, &r.payload) as usize;
            let at = match open.get(&h) {
                Some(&i)
                    if per_host[i].1.len() < APPEND_BATCH
                        && per_host[i].3 + size <= FRAME_BYTES =>
                {
                    i
                }
                _ => {
                    per_host.push((h, Vec::new(), Vec::new(), 0));
                    open.insert(h, per_host.len() - 1);
                    per_host.len() - 1
                }
            };
            let chunk = &mut per_host[at];
            chunk.1.push(r);
            chunk.2.push(slot);
            chunk.3 += size;
        }
        for (host, records, slots, _) in per_host {
            self.streams.next_seq += 1;
            let seq = self.streams.next_seq;
            let wire_records: Vec<AppendWire<'_>> = records
                .iter()
                .map(|r| AppendWire {
                    key: Raw(&r.key),
                    ts_ms: r.timestamp_ms,
                    headers: headers_to_wire(&r.headers),
                    payload: Raw(&r.payload),
                })
                .collect();
            let link = self.peers.entry(host);
            wire::encode(
                &mut link.scratch,
                &Frame::Stream(StreamWire::Append {
                    stream: &stream,
                    seq,
                    records: wire_records,
                }),
            );
            link.has_data = true;
            if let Some(c) = self.streams.calls.get_mut(&call) {
                c.remaining += 1;
            }
            self.streams.pending.insert(
                seq,
                PendingAppend {
                    stream: stream.clone(),
                    host,
                    records,
                    call,
                    slots,
                },
            );
        }
    }

    /// An append's records go to this node's partitions; the call resolves
    /// once they are placed (and on disk, if durable).
    pub(super) fn append_local(
        &mut self,
        call: u64,
        stream: &Arc<str>,
        records: Vec<NewRecord>,
        slots: Vec<usize>,
    ) {
        let local = self.local;
        match self.append_here(stream, records) {
            Ok(placed) => {
                if let Some(c) = self.streams.calls.get_mut(&call) {
                    for (slot, (index, offset)) in slots.into_iter().zip(placed) {
                        c.placed[slot] = Some(Placed {
                            host: local,
                            index,
                            offset,
                        });
                    }
                    if let Some(d) = self.durable.as_mut() {
                        // The call resolves once these are on disk.
                        c.remaining += 1;
                        d.hold(crate::engine::durable::Held::StreamCall(call));
                    }
                }
            }
            Err(e) => self.fail_call(
                call,
                AppendFailure::Refused {
                    full: matches!(e, core_stream::AppendError::Full { .. }),
                    reason: e.to_string(),
                },
            ),
        }
    }

    pub(super) fn fail_call(&mut self, call: u64, e: AppendFailure) {
        if let Some(c) = self.streams.calls.get_mut(&call) {
            c.error.get_or_insert(e);
        }
    }

    pub(super) fn finish_call_if_done(&mut self, call: u64) {
        if self
            .streams
            .calls
            .get(&call)
            .is_some_and(|c| c.remaining == 0)
        {
            if let Some(c) = self.streams.calls.remove(&call) {
                let result = match c.error {
                    Some(e) => Err(e),
                    None => Ok(c.placed.into_iter().flatten().collect()),
                };
                c.reply.send(result);
            }
        }
    }

    /// A peer's append to a stream this node hosts (or takes on): placed
    /// and answered (once on disk, if durable), or refused.
    pub(super) fn host_append(
        &mut self,
        peer: NodeId,
        stream: &str,
        seq: u64,
        records: Vec<NewRecord>,
    ) {
        // Its appender may think we host it when we do not (a
        // declaration of a previous run): take it, within limits.
        let name: Arc<str> = stream.into();
        let result = if self.start_hosting_stream(&name) {
            self.append_here(stream, records).map_err(|e| {
                (
                    matches!(e, core_stream::AppendError::Full { .. }),
                    e.to_string(),
                )
            })
        } else if !self.streams.hosting.self_host() {
            Err((false, format!("this node does not host stream {stream:?}")))
        } else {
            let e = core_stream::AppendError::TooManyStreams {
                limit: self.streams.host.config().max_streams,
            };
            Err((false, e.to_string()))
        };
        match result {
            Ok(placed) => match self.durable.as_mut() {
                Some(d) => {
                    d.hold(crate::engine::durable::Held::StreamAppended { peer, seq, placed })
                }
                None => self.send_appended(peer, seq, placed),
            },
            Err((full, reason)) => self.send_stream(
                peer,
                &StreamWire::AppendRefused {
                    seq,
                    full,
                    reason: &reason,
                },
            ),
        }
    }

    /// The append `seq` waiting for `peer`'s answer, taken out; `None` if
    /// none does (only the host an append went to can answer it).
    pub(super) fn answered_append(&mut self, peer: NodeId, seq: u64) -> Option<PendingAppend> {
        let ours = self
            .streams
            .pending
            .get(&seq)
            .is_some_and(|p| p.host == peer);
        ours.then(|| self.streams.pending.remove(&seq)).flatten()
    }

    /// The `Appended` answer to a remote appender.
    pub(crate) fn send_appended(&mut self, peer: NodeId, seq: u64, placed: Vec<(u32, u64)>) {
        let epoch = self.stream_epoch;
        self.send_stream(peer, &StreamWire::Appended { seq, epoch, placed });
    }

    /// A local append call's records stored here are on disk.
    pub(crate) fn stream_call_stored(&mut self, call: u64) {
        if let Some(c) = self.streams.calls.get_mut(&call) {
            c.remaining = c.remaining.saturating_sub(1);
        }
        self.finish_call_if_done(call);
    }

    /// Appends locally; tells watchers when the stream is new.
    pub(super) fn append_here(
        &mut self,
        stream: &str,
        records: Vec<NewRecord>,
    ) -> Result<Vec<(u32, u64)>, core_stream::AppendError> {
        let existed = self.streams.host.has(stream);
        let kept = self.durable.is_some().then(|| records.clone());
        let placed = self.streams.host.append(self.now, stream, records)?;
        if let (Some(d), Some(kept)) = (self.durable.as_mut(), kept) {
            let name: Arc<str> = self
                .streams
                .host
                .name(stream)
                .cloned()
                .unwrap_or_else(|| stream.into());
            for (r, (index, offset)) in kept.into_iter().zip(&placed) {
                d.stored(
                    &name,
                    *index,
                    core_stream::Record {
                        offset: *offset,
                        key: r.key,
                        timestamp_ms: r.timestamp_ms,
                        headers: r.headers,
                        payload: r.payload,
                    },
                );
            }
        }
        if !existed {
            self.stream_created(stream);
        }
        Ok(placed)
    }
}

/// An append's records, parsed (their bytes stay in the frame's buffer).
pub(super) fn new_records_from_wire(body: &Bytes, records: &[AppendWire<'_>]) -> Vec<NewRecord> {
    records
        .iter()
        .map(|r| NewRecord {
            key: slice(body, r.key.0),
            timestamp_ms: r.ts_ms,
            headers: headers_from_wire(body, &r.headers),
            payload: slice(body, r.payload.0),
        })
        .collect()
}
