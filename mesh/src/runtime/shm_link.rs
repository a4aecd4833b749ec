//! Switching a link to shared-memory rings: who may, the offer, opening
//! the peer's rings, and the switch once both sides are ready.

use super::*;

impl NodeTask {
    /// `peer` moved its side of the data link to the shared-memory ring:
    /// ours follows (after what is queued for QUIC).
    pub(super) fn shm_switch(&mut self, peer: NodeId) -> Result<(), WireError> {
        // The reader has turned to the ring already.
        let link = self
            .links
            .get_mut(&peer)
            .ok_or(WireError::Unexpected("ShmSwitch"))?;
        match link.shm {
            // Our `Bye` went out on the network stream: nothing may follow
            // it there, since a peer that read it may drop that stream (and
            // our write would fail, losing the link before its `ByeAck`
            // comes in on the ring). Our reader reads the ring; our side
            // has nothing more to send.
            ShmState::Offered if self.shutting_down => {
                link.shm_tx = None;
                link.shm = ShmState::RingIn;
                return Ok(());
            }
            ShmState::Offered => {
                let ring = link
                    .shm_tx
                    .take()
                    .ok_or(WireError::Unexpected("ShmSwitch"))?;
                let scratch = &mut self.engine.peers.entry(peer).scratch;
                wire::encode(scratch, &Frame::ShmSwitch);
                self.engine.counters.quic_sent += scratch.len() as u64;
                link.outbox.push_and_switch(scratch, ring);
            }
            ShmState::Opened => {}
            _ => return Err(WireError::Unexpected("ShmSwitch")),
        }
        link.shm = ShmState::On;
        tracing::info!(%peer, "data link moved to shared memory");
        Ok(())
    }

    pub(super) fn shm_eligible(&self, peer: NodeId, hello: &PeerHello) -> bool {
        if self.shm_host.is_empty() || hello.features & FEATURE_SHM == 0 {
            return false;
        }
        if hello.host != self.shm_host || hello.uid != shm::uid() {
            tracing::debug!(%peer, "peer is on another host or user; data stays on QUIC");
            return false;
        }
        true
    }

    /// Smaller id: makes the link's two rings and offers them (not once
    /// this node said `Bye`: nothing follows it on a link).
    pub(super) fn offer_shm(&mut self, peer: NodeId, link_id: LinkId) {
        if self.shutting_down {
            return;
        }
        let nonce = self.engine.rng.next_u64();
        let cfg = &self.config.shm;
        let made =
            shm::Ring::create(&cfg.dir, cfg.capacity, nonce, shm::Role::Producer).and_then(|tx| {
                let rx = shm::Ring::create(&cfg.dir, cfg.capacity, nonce, shm::Role::Consumer)?;
                Ok((tx, rx))
            });
        let (tx, rx) = match made {
            Ok(rings) => rings,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot make shared-memory rings; link stays on QUIC");
                return;
            }
        };
        let wait = cfg.wait;
        let (to_you, from_you) = (
            tx.path().to_string_lossy().into_owned(),
            rx.path().to_string_lossy().into_owned(),
        );
        // The files stay until the peer opens them (it unlinks them) or
        // these rings are dropped.
        let (Ok(tx), Ok(rx)) = (tx.producer(wait), rx.consumer(wait)) else {
            tracing::warn!(%peer, "shared-memory rings made with the wrong roles; link stays on QUIC");
            return;
        };
        let Some(link) = self.links.get_mut(&peer).filter(|l| l.id == link_id) else {
            return;
        };
        wire::encode(
            &mut self.engine.peers.entry(peer).scratch,
            &Frame::ShmOffer {
                nonce,
                to_you: &to_you,
                from_you: &from_you,
            },
        );
        *link.shm_rx.lock().unwrap_or_else(|e| e.into_inner()) = Some(rx);
        link.shm_tx = Some(tx);
        link.shm = ShmState::Offered;
    }

    /// Larger id: opens the peer's rings and switches our side to them,
    /// or refuses (the link stays on QUIC).
    pub(super) fn open_shm(
        &mut self,
        peer: NodeId,
        nonce: u64,
        to_you: &str,
        from_you: &str,
    ) -> Result<(), WireError> {
        if self.shutting_down {
            // Our `Bye` is out: nothing may follow it on this stream (see
            // `shm_switch`), not even a refusal. The link stays on QUIC.
            return Ok(());
        }
        let wait = self.config.shm.wait;
        let enabled = !self.shm_host.is_empty();
        // Offers come from the smaller id only, after its Hello.
        let from_offerer = peer < self.engine.local;
        let link = self
            .links
            .get_mut(&peer)
            .filter(|l| l.shm == ShmState::Off && from_offerer)
            .filter(|_| self.engine.peers.is_up(&peer))
            .ok_or(WireError::Unexpected("ShmOffer"))?;
        let ring_path = |p: &str| {
            let path = std::path::Path::new(p);
            let named = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("mesh-") && n.ends_with(".ring"));
            if path.is_absolute() && named {
                Ok(path.to_owned())
            } else {
                Err(format!("{p:?} is not a ring file"))
            }
        };
        let opened = if !enabled {
            Err("shared memory is off on this node".to_owned())
        } else if !link.shm_ok {
            Err("the peer is not on this host as this user".to_owned())
        } else {
            ring_path(to_you).and_then(|rx_path| {
                let tx_path = ring_path(from_you)?;
                // Only rings in our own ring directory (a peer cannot
                // make us open any other file).
                let dir = &self.config.shm.dir;
                let rx = shm::Ring::open_in(dir, &rx_path, nonce, shm::Role::Consumer)
                    .map_err(|e| e.to_string())?;
                let tx = shm::Ring::open_in(dir, &tx_path, nonce, shm::Role::Producer)
                    .map_err(|e| e.to_string())?;
                match (rx.consumer(wait), tx.producer(wait)) {
                    (Ok(rx), Ok(tx)) => Ok((rx, tx)),
                    _ => Err("ring roles do not match".to_owned()),
                }
            })
        };
        match opened {
            Ok((rx, tx)) => {
                *link.shm_rx.lock().unwrap_or_else(|e| e.into_inner()) = Some(rx);
                let scratch = &mut self.engine.peers.entry(peer).scratch;
                wire::encode(scratch, &Frame::ShmSwitch);
                self.engine.counters.quic_sent += scratch.len() as u64;
                link.outbox.push_and_switch(scratch, tx);
                link.shm = ShmState::Opened;
            }
            Err(reason) => {
                tracing::warn!(%peer, %reason, "cannot open the peer's shared-memory rings; link stays on QUIC");
                let scratch = &mut self.engine.peers.entry(peer).scratch;
                wire::encode(scratch, &Frame::ShmRefuse { reason: &reason });
            }
        }
        Ok(())
    }
}
