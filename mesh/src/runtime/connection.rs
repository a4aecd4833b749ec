//! Connections: the transport's events (connections up and down, data
//! and control streams), the handshake on a new data stream, and control
//! frames.

use super::*;

impl NodeTask {
    pub(super) async fn handle_transport(&mut self, ev: quic::Event) {
        match ev {
            quic::Event::Listening(addr) => {
                tracing::debug!(%addr, "listening");
                if !self.listen_addrs.contains(&addr) {
                    self.listen_addrs.push(addr);
                    self.engine.membership.set_local_addrs(self.our_addrs());
                }
                for w in self.listening_waiters.drain(..) {
                    let _ = w.send(());
                }
            }
            quic::Event::ListenerClosed(addr) => {
                self.listen_addrs.retain(|a| a != &addr);
                self.engine.membership.set_local_addrs(self.our_addrs());
            }
            quic::Event::Connected { peer, addr } => {
                tracing::debug!(%peer, %addr, "connected");
                if !self.admission.allows(&peer) {
                    self.stats.auth_refused += 1;
                    if self.refused.note(peer) {
                        tracing::warn!(%peer, "refused a peer that is not on the allow-list");
                    }
                    self.transport.disconnect(peer).await;
                    return;
                }
                self.connected.insert(peer, addr);
                self.engine.handle_connected(peer);
                // The larger id waits for the peer's stream; if none comes
                // in the grace period it asks for one.
                if self.engine.local > peer {
                    self.schedule_relink(peer);
                }
            }
            quic::Event::Disconnected { peer } => {
                tracing::debug!(%peer, "disconnected");
                self.connected.remove(&peer);
                self.engine.handle_disconnected(peer);
                self.lingering.remove(&peer);
                self.admitted.remove(&peer);
                let held = self.unadmitted_control.remove(&peer).map_or(0, |h| h.len());
                self.stats.control_refused += held as u64;
                if let Some(link) = self.remove_link(&peer) {
                    if self.shutting_down && link.has_data && !link.bye_acked && !link.leaving {
                        self.broken.insert(peer);
                    }
                    if link.up {
                        self.engine.membership.handle_link_down(now(), peer);
                    }
                    self.engine.links_generation += 1;
                    self.engine.work_link_down(now(), peer);
                }
            }
            quic::Event::Stream {
                peer,
                stream,
                outbound,
            } => {
                tracing::debug!(%peer, outbound, "data stream");
                self.attach_stream(peer, stream);
            }
            quic::Event::ControlStream { peer, stream } => {
                if self.admission.is_private() && !self.admitted.contains(&peer) {
                    // A private mesh listens to members only. A member's
                    // control stream may come before its link's handshake
                    // is done (a reconnect): it waits, unread, for that
                    // (dropping it cost SWIM its pings and falsely
                    // suspected members after every reconnect).
                    // Held for at most as many peers as may wait for
                    // their proof.
                    let room = self.unadmitted_control.contains_key(&peer)
                        || self.unadmitted_control.len() < MAX_UNADMITTED;
                    let held = self.unadmitted_control.entry(peer).or_default();
                    if room && held.len() < MAX_CONTROL_READERS_PER_PEER {
                        held.push(stream);
                    } else {
                        // Dropping the stream resets it.
                        self.stats.control_refused += 1;
                        tracing::debug!(%peer, "control streams from a peer not admitted yet; refused one");
                    }
                    return;
                }
                self.read_control(peer, stream);
            }
            quic::Event::ExtraConnection { peer } => {
                // A simultaneous or late dial: the data stream we have stays
                // (closing its connection would lose what is in flight on
                // it). A restarted peer tells us instead: it opens a stream
                // itself (smaller id) or asks for one (`Relink`).
                tracing::debug!(%peer, "extra connection");
            }
            quic::Event::StreamFailed { peer, error } => {
                tracing::debug!(%peer, %error, "data stream failed to open");
                self.schedule_relink(peer);
            }
            quic::Event::Discovered { peer, addrs } => {
                if peer != self.engine.local
                    && !self.connected.contains_key(&peer)
                    && self.engine.membership.state_of(&peer) != Some(MemberState::Down)
                {
                    self.transport.dial_peer(peer, addrs).await;
                }
            }
            quic::Event::DialFailed { peer, error } => {
                tracing::debug!(?peer, %error, "dial failed");
            }
        }
    }

    pub(super) fn attach_stream(&mut self, peer: NodeId, stream: quic::Stream) {
        // A newer stream replaces an older one: the older was from a
        // connection that is going away. Bytes buffered while waiting for
        // a first stream go out on it.
        let reuse = matches!(self.links.get(&peer), Some(l) if l.reader.is_none());
        if self.shutting_down && !reuse {
            // Nothing to say to a new peer while leaving; dropping the
            // stream resets it.
            return;
        }
        if self.admission.is_private() && !self.engine.peers.is_up(&peer) {
            // Links still waiting for their peer's proof are capped: an
            // outsider opening connections cannot make us hold many.
            let waiting = self
                .links
                .iter()
                .filter(|(p, l)| l.reader.is_some() && !self.engine.peers.is_up(p))
                .count();
            if waiting >= MAX_UNADMITTED {
                self.engine.counters.unadmitted_refused += 1;
                if self.engine.counters.unadmitted_refused.is_power_of_two() {
                    tracing::warn!(%peer, waiting, "too many links waiting for their proof; refused one");
                }
                return;
            }
        }
        if !reuse && self.remove_link(&peer).is_some() {
            // What was in flight on it may be lost with it.
            self.engine.links_generation += 1;
            self.engine.work_link_down(now(), peer);
        }
        // Links the engine added get their numbers first, in order (the
        // handshake's nonce in the simulator is made of the next one).
        self.create_links();
        let handshake = self.hello();
        let private = self.admission.is_private();
        let mut sync = Vec::new();
        if !private {
            // A private link's sync waits for the peer's proof (link up).
            self.engine.encode_sync(&mut sync);
        }
        let limits = link::ReadLimits {
            max_frame: self.config.max_frame,
            rate: self.config.inbound_limit,
            counts: self.reader_counts.clone(),
        };
        let events = self.link_events.clone();
        let spawner = self.spawner.clone();
        let link = self.link_mut(peer);
        if private {
            // Nothing goes out (nor is the sync made) before the proof.
            link.outbox.hold();
        }
        link.reader = Some(link::spawn(
            &spawner,
            link.id,
            peer,
            stream,
            handshake,
            link.outbox.clone(),
            link.shm_rx.clone(),
            limits,
            events,
        ));
        let p = self.engine.peers.entry(peer);
        p.unsent = None;
        if !private {
            // State (sync, declarations) travels on the ordered, reliable
            // data stream; the sync goes first so the peer is ready early.
            sync.append(&mut p.scratch);
            p.scratch = sync;
        }
    }

    /// Reads a control stream from an admitted (or any, in an open mesh)
    /// peer, within the per-peer and node-wide limits.
    pub(super) fn read_control(&mut self, peer: NodeId, stream: quic::Stream) {
        let inflight = self.control_inflight.entry(peer).or_insert(0);
        if *inflight >= MAX_CONTROL_READERS_PER_PEER {
            self.stats.control_refused += 1;
            tracing::debug!(%peer, "peer has too many control streams being read; refused one");
            return;
        }
        match self.control_readers.clone().try_acquire_owned() {
            Ok(permit) => {
                *inflight += 1;
                link::spawn_control_reader(
                    &self.spawner,
                    peer,
                    stream,
                    permit,
                    self.control_tx.clone(),
                )
            }
            Err(_) => {
                // Dropping the stream resets it; SWIM tolerates the loss.
                self.stats.control_refused += 1;
                tracing::debug!(%peer, "too many control streams being read; refused one");
            }
        }
    }

    /// Frames from a control stream: only membership messages belong there.
    /// They travel apart from the data stream so that a probe measures
    /// whether the peer is alive, not how much data is queued before it
    /// (a subscriber pushing back stops reading its data streams).
    pub(super) async fn handle_control(
        &mut self,
        peer: NodeId,
        frames: Result<Vec<Bytes>, String>,
    ) {
        let mut relink = false;
        if let Some(n) = self.control_inflight.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.control_inflight.remove(&peer);
            }
        }
        let result = frames.and_then(|frames| {
            self.engine.counters.received_bytes(false, &frames);
            for body in &frames {
                match wire::decode(body).map_err(|e| e.to_string())? {
                    Frame::Member(_) => self.handle_frame(peer, body).map_err(|e| e.to_string())?,
                    Frame::Relink => relink = true,
                    other => {
                        return Err(format!(
                            "{} frame on a control stream",
                            wire::frame_name(&other)
                        ))
                    }
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            // Only this batch is refused: control traffic is periodic, and a
            // reset or slow control stream says nothing about the data link.
            self.stats.control_refused += 1;
            tracing::warn!(%peer, error = %e, "refused a control stream from peer");
        } else if relink {
            self.relink_requested(peer).await;
        }
    }
}
