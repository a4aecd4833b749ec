//! Links that end and come back: what membership asks for (dials,
//! control frames, members down), setting a link up again after it ended
//! (with back-off), redialing peers membership wants, dropping links that
//! never came up or that a peer stopped reading, and forgetting members
//! that left.

use super::*;

impl NodeTask {
    /// Relinks that are due (`Engine::poll_relinks`): the smaller id opens
    /// a stream on the live connection; the larger, which must not open one
    /// (both would, and each side would keep a different stream), asks
    /// for one with `Relink`.
    pub(super) async fn relink(&mut self) {
        if self.shutting_down {
            return;
        }
        let links = &self.links;
        let connected = &self.connected;
        let due = self.engine.poll_relinks(
            now(),
            |p| links.get(p).is_some_and(|l| l.reader.is_some()),
            |p| connected.contains_key(p),
        );
        for r in due {
            match r {
                engine::links::Relink::Open(peer) => self.transport.open_stream(peer).await,
                engine::links::Relink::Ask(peer) => {
                    let mut frame = Vec::new();
                    wire::encode(&mut frame, &Frame::Relink);
                    self.control_out
                        .entry(peer)
                        .or_default()
                        .extend_from_slice(&frame);
                }
            }
        }
    }

    /// The peer (larger id) has a connection but no data stream from us:
    /// open a fresh one on its newest connection, closing older ones (they
    /// may belong to its previous run, lingering until QUIC's idle
    /// timeout), unless ours is on its way (`Engine::relink_asked`).
    pub(super) async fn relink_requested(&mut self, peer: NodeId) {
        if self.shutting_down {
            return;
        }
        let now = now();
        let age = self
            .links
            .get(&peer)
            .filter(|l| l.reader.is_some())
            .map(|l| now.duration_since(l.created));
        if !self.engine.relink_asked(&peer, age) {
            return;
        }
        tracing::debug!(%peer, "peer asked for a fresh data stream");
        self.transport.fresh_stream(peer).await;
    }

    /// See `Engine::schedule_relink`.
    pub(super) fn schedule_relink(&mut self, peer: NodeId) {
        self.engine.schedule_relink(now(), peer);
    }

    /// Every [`RECONNECT_INTERVAL`]: dials one member declared down (the
    /// engine picks it) and every bootstrap peer not connected.
    pub(super) async fn reconnect(&mut self) {
        let now = now();
        if now < self.next_reconnect || self.shutting_down {
            return;
        }
        self.next_reconnect = now + RECONNECT_INTERVAL;
        let connected = &self.connected;
        if let Some(node) = self.engine.reconnect_target(|n| connected.contains_key(n)) {
            let addrs = self.addrs_of(&node);
            self.transport.dial_peer(node, addrs).await;
        }
        for addr in self.config.bootstrap.clone() {
            match quic::peer_of(&addr) {
                Some(peer) if self.connected.contains_key(&peer) => {}
                Some(peer) => self.transport.dial_peer(peer, vec![addr]).await,
                // Without a peer id we cannot tell whether we are connected;
                // it was dialed at start.
                None => {}
            }
        }
    }

    pub(super) fn addrs_of(&self, node: &NodeId) -> Vec<Multiaddr> {
        self.engine
            .membership
            .members()
            .find(|m| &m.node == node)
            .map(|m| {
                m.addrs
                    .iter()
                    .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops buffers for peers whose stream never came.
    pub(super) fn expire_links(&mut self) {
        let now = now();
        let stale: Vec<NodeId> = self
            .links
            .iter()
            .filter(|(_, l)| {
                l.reader.is_none() && now.duration_since(l.created) > LINK_SETUP_TIMEOUT
            })
            .map(|(p, _)| *p)
            .collect();
        for peer in stale {
            if let Some(l) = self.remove_link(&peer) {
                self.engine.counters.dropped_unreachable += l.queued;
                tracing::warn!(%peer, messages = l.queued, "no link to peer in time; dropped the messages buffered for it");
                self.engine.links_generation += 1;
                self.engine.work_link_down(now, peer);
                // Still connected: the link is wanted again (with
                // back-off); nothing else would set it up.
                if self.connected.contains_key(&peer) {
                    self.schedule_relink(peer);
                }
            }
        }
    }

    /// Ends the links whose peers let more than `16 * link_buffer` bytes
    /// pile up unread (answers to their requests, deliveries within their
    /// credit; counted in the outbox and in the writer's hands while a
    /// write waits for the peer): what waits for them is freed and the
    /// link is set up again. Checked as bytes are pushed and on every
    /// timer, since a writer may take a large batch and then block with
    /// nothing more pushed.
    /// A peer that reads keeps its outbox near `link_buffer` (publishers
    /// wait beyond that), so only one that stopped reading gets here.
    pub(super) fn shed_overflowing_links(&mut self) {
        let cap = self.config.link_buffer.saturating_mul(OUTBOX_CAP_FACTOR);
        let over: Vec<NodeId> = self
            .links
            .iter()
            .filter(|(_, l)| l.outbox.backlog() > cap)
            .map(|(p, _)| *p)
            .collect();
        for peer in over {
            tracing::warn!(%peer, cap, "peer does not read what it asked for; closing its link");
            self.engine.counters.outbox_overflow += 1;
            if let Some(l) = self.links.get(&peer) {
                l.outbox.abort();
            }
            self.remove_link(&peer);
            self.engine.membership.handle_link_down(now(), peer);
            self.engine.links_generation += 1;
            self.engine.work_link_down(now(), peer);
            self.schedule_relink(peer);
        }
    }

    /// Acts on what membership wants, in order: control frames, dials,
    /// members declared down.
    pub(super) async fn drive_membership(&mut self) {
        for peer in std::mem::take(&mut self.refused.to_disconnect) {
            self.transport.disconnect(peer).await;
        }
        self.relink().await;
        while let Some(t) = self.engine.poll_member_transmit() {
            match t {
                engine::MemberOut::Control { to, frame } => {
                    self.control_out
                        .entry(to)
                        .or_default()
                        .extend_from_slice(&frame);
                }
                engine::MemberOut::Dial { to, addrs } => {
                    let addrs = match addrs {
                        Some(a) => a
                            .into_iter()
                            .filter_map(|a| Multiaddr::try_from(a).ok())
                            .collect(),
                        None => self.addrs_of(&to),
                    };
                    self.transport.dial_peer(to, addrs).await;
                }
                engine::MemberOut::Down(node) => {
                    self.engine.links_generation += 1;
                    self.engine.work_link_down(now(), node);
                    let leaving = self.remove_link(&node).is_some_and(|l| l.leaving);
                    // A peer that said goodbye closes its own connection once
                    // it has our ByeAck; closing it here could lose that.
                    if !leaving {
                        self.transport.disconnect(node).await;
                    }
                }
            }
        }
    }
}
