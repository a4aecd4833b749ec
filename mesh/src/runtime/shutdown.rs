//! Shutdown: what was published and acked goes out, peers hear `Bye` and
//! ack it, and the report says who may have missed what.

use super::*;

impl NodeTask {
    pub(super) async fn shutdown(
        &mut self,
        links: &mut mpsc::Receiver<LinkEvent>,
        transport: &mut mpsc::Receiver<quic::Event>,
    ) -> crate::node::ShutdownReport {
        // Say goodbye after everything already queued, then wait until every
        // peer confirms it has read up to the goodbye (links still being set
        // up get the same time to come up and drain).
        let deadline = tokio::time::Instant::now() + BYE_TIMEOUT;
        self.shutting_down = true;
        for p in self.engine.peers.values_mut() {
            wire::encode(&mut p.scratch, &Frame::Bye);
        }
        self.flush();
        loop {
            // Wait for peers with a stream, and for those we still owe
            // messages to (their stream may yet come up). A link that never
            // came up and holds no message (only our own declarations, say
            // to a peer that has left meanwhile) owes nothing.
            //
            // And for peers that said Bye to close their connection (they
            // do once they have our ByeAck), so the ack is not lost in
            // flight when we drop ours.
            let waiting = self
                .engine
                .peers
                .values()
                .any(|p| !p.bye_acked && !p.leaving && (!p.waiting() || p.queued > 0));
            let now = tokio::time::Instant::now();
            self.lingering
                .retain(|p, until| *until > now && self.connected.contains_key(p));
            let linger = self.lingering.values().min().copied();
            if !waiting && linger.is_none() {
                break;
            }
            let wake = linger.map_or(deadline, |l| l.min(deadline));
            tokio::select! {
                biased;
                ev = links.recv() => match ev {
                    Some(ev) => self.handle_link_event(ev),
                    None => break,
                },
                ev = transport.recv() => match ev {
                    Some(ev) => self.handle_transport(ev).await,
                    None => break,
                },
                _ = tokio::time::sleep_until(wake) => {
                    if wake < deadline {
                        continue;
                    }
                    for (peer, p) in self.engine.peers.iter().filter(|(_, p)| !p.bye_acked && !p.leaving) {
                        tracing::debug!(%peer, up = p.up, stream = !p.waiting(), "shutdown: peer did not confirm in time");
                    }
                    break;
                }
            }
            self.flush();
        }
        // Peers we sent messages to that did not confirm reading them.
        let mut unconfirmed: Vec<NodeId> = self
            .engine
            .peers
            .iter()
            .filter(|(_, p)| {
                p.has_data && !p.bye_acked && !p.leaving && (!p.waiting() || p.queued > 0)
            })
            .map(|(p, _)| *p)
            .chain(std::mem::take(&mut self.broken))
            .collect();
        unconfirmed.sort();
        unconfirmed.dedup();
        let peers: Vec<NodeId> = self.links.keys().copied().collect();
        for peer in peers {
            self.remove_link(&peer);
        }
        for (_, q) in self.sub_queues.drain() {
            q.close();
        }
        self.transport.shutdown().await;
        tracing::debug!(
            links_refused = self.stats.links_refused,
            dropped_unreachable = self.engine.counters.dropped_unreachable,
            "node stopped"
        );
        // A durable host keeps them on disk for its next start.
        let queued_dropped = if self.durable.is_some() {
            0
        } else {
            self.engine.work.host.len() as u64
        };
        if queued_dropped > 0 {
            let queues: Vec<String> = self
                .engine
                .work
                .host
                .names()
                .map(|n| n.to_string())
                .collect();
            tracing::warn!(
                messages = queued_dropped,
                ?queues,
                "shutting down with queue messages not acked yet; they are lost with this node (hosts keep messages in memory)"
            );
        }
        crate::node::ShutdownReport {
            unconfirmed,
            dropped_unreachable: self.engine.counters.dropped_unreachable,
            queued_dropped,
        }
    }
}
