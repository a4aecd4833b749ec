//! Stream consumers: watching every live host, which partitions a
//! consumer or group member reads (refreshed when hosts or members
//! change), reads with credit, records into the consumer's inbox, and the
//! host's side of watches and reads.

use super::*;

impl Engine {
    pub(super) fn cancel_stream_consumer(&mut self, sid: u64) {
        let Some(c) = self.streams.consumers.remove(&sid) else {
            return;
        };
        c.inbox.close();
        for (_, rid) in c.active {
            self.stop_read(rid);
        }
        for h in c.watched {
            if h != self.local {
                self.send_stream(h, &StreamWire::Unwatch { sid });
            }
        }
        if let Some(g) = c.group {
            let key = (c.stream.clone(), g.clone());
            let last = match self.streams.groups.get_mut(&key) {
                Some(n) => {
                    *n -= 1;
                    *n == 0
                }
                None => false,
            };
            if last {
                self.streams.groups.remove(&key);
                if let Some(p) = group_pattern(&c.stream, &g) {
                    if let Some(decl) = self.interest.unsubscribe(&p, false) {
                        self.announce(&decl);
                    }
                }
            }
            // The group's other local members may take its partitions.
            self.streams.changed += 1;
        }
    }

    pub(super) fn stop_read(&mut self, rid: u64) {
        let Some(r) = self.streams.reads.remove(&rid) else {
            return;
        };
        self.streams.credits.remove(&(r.host, rid));
        if r.host == self.local {
            self.streams.host.close(&r.host, rid);
        } else if self.peers.is_up(&r.host) {
            self.send_stream(r.host, &StreamWire::Stop { rid });
        }
    }

    /// Decides, for every consumer, which partitions it reads, and starts
    /// and stops reads to match.
    pub(super) fn refresh_stream_consumers(&mut self) {
        let sids: Vec<u64> = self.streams.consumers.keys().copied().collect();
        for sid in sids {
            self.refresh_consumer(sid);
        }
    }

    pub(super) fn refresh_consumer(&mut self, sid: u64) {
        let local = self.local;
        let Some(c) = self.streams.consumers.get(&sid) else {
            return;
        };
        let stream = c.stream.clone();
        let group = c.group.clone();
        let remote = self.stream_hosts(&stream);
        // Watch new hosts.
        let to_watch: Vec<NodeId> = remote
            .iter()
            .filter(|h| !c.watched.contains(h))
            .copied()
            .collect();
        for h in &to_watch {
            self.send_stream(
                *h,
                &StreamWire::Watch {
                    sid,
                    stream: &stream,
                },
            );
        }
        let local_view = self.streams.host.has(&stream).then(|| HostView {
            epoch: self.stream_epoch,
            partitions: self.streams.host.config().partitions,
            late: false,
        });
        // Members of the group, and this node's members of it.
        let assignment = group.as_ref().map(|g| {
            let mut members = self.declared(&format!("{GROUP_PREFIX}{stream}.{g}"));
            members.push(local);
            members.sort_unstable();
            members.dedup();
            let mut locals: Vec<u64> = self
                .streams
                .consumers
                .iter()
                .filter(|(_, o)| o.stream == stream && o.group.as_ref() == Some(g))
                .map(|(s, _)| *s)
                .collect();
            locals.sort_unstable();
            (g.clone(), members, locals)
        });
        let Some(c) = self.streams.consumers.get_mut(&sid) else {
            return;
        };
        c.watched.extend(to_watch);
        let live: FxHashSet<NodeId> = remote.iter().copied().collect();
        c.watched.retain(|h| live.contains(h));
        c.hosts.retain(|h, _| live.contains(h));
        match local_view {
            Some(mut v) => {
                // Created here after this consumer started: late.
                v.late = c.hosts.get(&local).map_or(c.refreshed, |old| old.late);
                c.hosts.insert(local, v);
            }
            None => {
                c.hosts.remove(&local);
            }
        }
        // The partitions this consumer wants.
        c.refreshed = true;
        let share = assignment
            .as_ref()
            .map(|(g, members, locals)| group::Assignment {
                group: g,
                members,
                locals,
            });
        let want = group::wanted(&stream, local, sid, &c.hosts, share.as_ref());
        let wanted: FxHashSet<(NodeId, u32)> = want.iter().map(|(h, i, ..)| (*h, *i)).collect();
        let stop: Vec<((NodeId, u32), u64)> = c
            .active
            .iter()
            .filter(|(p, _)| !wanted.contains(p))
            .map(|(p, r)| (*p, *r))
            .collect();
        for (p, _) in &stop {
            c.active.remove(p);
            // A group partition that went to another member resumes there
            // from the commit; a host that is only out of reach keeps our
            // place.
            if c.group.is_some() && c.hosts.contains_key(&p.0) {
                c.positions.remove(p);
            }
        }
        let window = c.window;
        let mut start = Vec::new();
        for (h, i, epoch, late) in want {
            if c.active.contains_key(&(h, i)) {
                continue;
            }
            let position = c.positions.get(&(h, i)).copied();
            let from = group::read_from(&c.start, c.group.as_ref(), position, epoch, late);
            if let Start::Offset(o) = from {
                c.positions.insert((h, i), (epoch, o));
            } else {
                c.positions.remove(&(h, i));
            }
            self.streams.next_rid += 1;
            let rid = self.streams.next_rid;
            c.active.insert((h, i), rid);
            start.push((h, i, rid, from));
        }
        if let Some((g, members, _)) = &assignment {
            let assigned = (members.len(), c.active.len());
            if assigned != c.assigned || !stop.is_empty() || !start.is_empty() {
                c.assigned = assigned;
                // What Kafka logs as a rebalance: operators (and tests)
                // see when the members or this member's share change.
                tracing::info!(
                    %stream,
                    group = %g,
                    members = members.len(),
                    partitions = c.active.len(),
                    "group assignment changed"
                );
            }
        }
        for (_, rid) in stop {
            self.stop_read(rid);
        }
        for (host, index, rid, from) in start {
            self.start_read(sid, &stream, window, (host, index, rid), &from);
        }
    }

    /// Read `rid` of consumer `sid` starts on partition `index` of `host`
    /// (this node's partitions read here, a remote host's asked for).
    pub(super) fn start_read(
        &mut self,
        sid: u64,
        stream: &str,
        window: u32,
        (host, index, rid): (NodeId, u32, u64),
        from: &Start,
    ) {
        let local = self.local;
        self.streams.reads.insert(
            rid,
            Read {
                sid,
                host,
                index,
                credit: window,
            },
        );
        if host == local {
            match self
                .streams
                .host
                .open(local, rid, stream, index, from, window)
            {
                Ok(at) => self.read_started(sid, host, index, at),
                Err(e) => {
                    tracing::warn!(%stream, index, error = %e, "stream read refused");
                    self.read_refused(rid);
                }
            }
        } else {
            self.send_stream(
                host,
                &StreamWire::Read {
                    sid,
                    rid,
                    stream,
                    index,
                    from: start_to_wire(from),
                    credit: window,
                },
            );
        }
    }

    /// A local read starts at `at`: that is where the consumer is.
    /// A read starts at `at` (the host resolved where): that is where the
    /// consumer is, so a read that ends before any record came resumes
    /// there, and a start past the end is not taken for a place.
    pub(super) fn read_started(&mut self, sid: u64, host: NodeId, index: u32, at: u64) {
        let local_epoch = self.stream_epoch;
        if let Some(c) = self.streams.consumers.get_mut(&sid) {
            let epoch = c.hosts.get(&host).map_or(local_epoch, |v| v.epoch);
            c.positions.insert((host, index), (epoch, at));
        }
    }

    /// A read that could not start is tried again a second later.
    pub(super) fn read_refused(&mut self, rid: u64) {
        if let Some(r) = self.streams.reads.remove(&rid) {
            if let Some(c) = self.streams.consumers.get_mut(&r.sid) {
                c.active.remove(&(r.host, r.index));
            }
        }
        self.streams
            .retry_at
            .get_or_insert_with(|| self.now + READ_RETRY);
    }

    /// Records of read `rid` from `host`, in order: onto the consumer's
    /// inbox, with what was already seen dropped.
    pub(super) fn records_arrived(
        &mut self,
        host: NodeId,
        rid: u64,
        gone: Option<(u64, u64)>,
        records: Vec<core_stream::Record>,
    ) {
        let Some(r) = self.streams.reads.get_mut(&rid) else {
            return; // stopped meanwhile
        };
        if r.host != host {
            return;
        }
        if records.len() > r.credit as usize {
            // A host that ignores the credit (a bug or a hostile peer)
            // cannot fill our memory: read again from where we are.
            tracing::warn!(%host, rid, "stream host sent more than the credit granted; reading again");
            let (sid, index) = (r.sid, r.index);
            self.stop_read(rid);
            if let Some(c) = self.streams.consumers.get_mut(&sid) {
                c.active.remove(&(host, index));
            }
            self.streams.changed += 1;
            return;
        }
        r.credit -= records.len() as u32;
        let (sid, index) = (r.sid, r.index);
        let epoch = self
            .streams
            .consumers
            .get(&sid)
            .and_then(|c| c.hosts.get(&host))
            .map_or(self.stream_epoch, |v| v.epoch);
        let Some(c) = self.streams.consumers.get_mut(&sid) else {
            return;
        };
        let pos = c.positions.get(&(host, index)).map(|(_, n)| *n);
        let mut next = pos;
        let mut items = Vec::with_capacity(records.len() + 1);
        let mut skipped = 0u32;
        if let Some((wanted, first)) = gone {
            items.push(StreamItem::Gone {
                host,
                index,
                wanted,
                first,
            });
            next = Some(first);
        }
        for record in records {
            match next {
                Some(n) if record.offset < n => {
                    skipped += 1;
                    continue;
                }
                Some(n) if record.offset > n => {
                    tracing::warn!(%host, index, expected = n, got = record.offset, "stream records skipped an offset");
                }
                _ => {}
            }
            next = Some(record.offset.saturating_add(1));
            items.push(StreamItem::Record {
                host,
                epoch,
                rid,
                index,
                record,
            });
        }
        if let Some(n) = next {
            c.positions.insert((host, index), (epoch, n));
        }
        let received = items.len() - usize::from(gone.is_some());
        if c.inbox.push_many(items).is_err() {
            return;
        }
        self.counters.stream_received += received as u64;
        self.counters.stream_repeats += u64::from(skipped);
        if skipped > 0 {
            // Repeats take no room: their credit comes back at once.
            self.stream_op(StreamOp::Credit { rid, n: skipped });
        }
    }

    /// Consumer `sid` of `peer` watches `stream` here: it is told this
    /// run's partitions (and told again when they appear), within the
    /// watch quotas.
    pub(super) fn host_watch(&mut self, peer: NodeId, sid: u64, stream: &str) {
        let total: usize = self.streams.watches.values().sum();
        let mine = self.streams.watches.get(&peer).copied().unwrap_or(0);
        let w = self.streams.watchers.entry(stream.into()).or_default();
        let full =
            w.len() >= MAX_WATCHERS || total >= MAX_ALL_WATCHERS || mine >= MAX_WATCHES_PER_PEER;
        if full && !w.contains(&(peer, sid)) {
            if w.is_empty() {
                self.streams.watchers.remove(stream);
            }
            tracing::warn!(%peer, %stream, "too many consumers watch this stream; refused");
            self.send_stream(peer, &StreamWire::WatchRefused { sid });
            return;
        }
        if w.insert((peer, sid)) {
            *self.streams.watches.entry(peer).or_default() += 1;
        }
        let partitions = if self.streams.host.has(stream) {
            self.streams.host.config().partitions
        } else {
            0
        };
        let epoch = self.stream_epoch;
        self.send_stream(
            peer,
            &StreamWire::Parts {
                sid,
                epoch,
                partitions,
            },
        );
    }

    /// A peer's read of partition `index` of `stream` here: started (and
    /// told where), or refused.
    pub(super) fn host_read(
        &mut self,
        peer: NodeId,
        rid: u64,
        stream: &str,
        index: u32,
        start: &Start,
        credit: u32,
    ) {
        match self
            .streams
            .host
            .open(peer, rid, stream, index, start, credit)
        {
            Ok(at) => self.send_stream(peer, &StreamWire::ReadStarted { rid, at }),
            Err(e) => {
                let reason = e.to_string();
                self.send_stream(
                    peer,
                    &StreamWire::ReadRefused {
                        rid,
                        reason: &reason,
                    },
                );
            }
        }
    }

    /// Consumer `sid` of `peer` no longer watches.
    pub(super) fn host_unwatch(&mut self, peer: NodeId, sid: u64) {
        let mut removed = 0;
        self.streams.watchers.retain(|_, w| {
            removed += usize::from(w.remove(&(peer, sid)));
            !w.is_empty()
        });
        if let Some(n) = self.streams.watches.get_mut(&peer) {
            *n = n.saturating_sub(removed);
            if *n == 0 {
                self.streams.watches.remove(&peer);
            }
        }
    }

    /// Host `peer` told consumer `sid` its run and partition count.
    pub(super) fn parts_arrived(&mut self, peer: NodeId, sid: u64, epoch: u64, partitions: u32) {
        let Some(c) = self.streams.consumers.get_mut(&sid) else {
            return;
        };
        if !c.watched.contains(&peer) {
            return;
        }
        let partitions = partitions.min(core_stream::MAX_PARTITIONS);
        let before = c.seen.get(&peer).copied();
        if before.is_some_and(|(e, _)| e != epoch) {
            // The host restarted: its partitions are new logs.
            c.positions.retain(|(h, _), _| *h != peer);
        }
        let late = partitions == 0
            || !c.initial_hosts.contains(&peer)
            || before.is_some_and(|(e, late)| late || e != epoch);
        if c.seen.len() < 4096 || before.is_some() {
            c.seen.insert(peer, (epoch, late));
        }
        c.hosts.insert(
            peer,
            HostView {
                epoch,
                partitions,
                late,
            },
        );
        self.streams.changed += 1;
    }

    pub(super) fn send_records(&mut self, b: core_stream::Batch<NodeId>) {
        let peer = b.key;
        if !self.peers.is_up(&peer) {
            self.streams.host.close_all(|k| *k == peer);
            return;
        }
        let records: Vec<RecordWire<'_>> = b
            .records
            .iter()
            .map(|r| RecordWire {
                offset: r.offset,
                key: Raw(&r.key),
                ts_ms: r.timestamp_ms,
                headers: headers_to_wire(&r.headers),
                payload: Raw(&r.payload),
            })
            .collect();
        let link = self.peers.entry(peer);
        wire::encode(
            &mut link.scratch,
            &Frame::Stream(StreamWire::Records {
                rid: b.rid,
                gone: b.gone,
                records,
            }),
        );
        link.has_data = true;
    }
}

/// Records a host sent a read, parsed.
pub(super) fn records_from_wire(
    body: &Bytes,
    records: &[RecordWire<'_>],
) -> Vec<core_stream::Record> {
    records
        .iter()
        .map(|r| core_stream::Record {
            offset: r.offset,
            key: slice(body, r.key.0),
            timestamp_ms: r.ts_ms,
            headers: headers_from_wire(body, &r.headers),
            payload: slice(body, r.payload.0),
        })
        .collect()
}

pub(super) fn start_to_wire(s: &Start) -> StartWire<'_> {
    match s {
        Start::Earliest => StartWire::Earliest,
        Start::Latest => StartWire::Latest,
        Start::Offset(o) => StartWire::Offset(*o),
        Start::Time(t) => StartWire::Time(*t),
        Start::Committed { group, latest } => StartWire::Committed {
            group,
            latest: *latest,
        },
    }
}
