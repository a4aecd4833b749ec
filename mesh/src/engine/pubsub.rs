//! Pub/sub in the engine: the frames of pub/sub, reliable pub/sub, gossip,
//! membership and declarations; publishing; subscribing.

use std::{sync::Arc, time::Instant};

use bytes::Bytes;

use super::{access::may_read, reliable::Accept, reliable::Kept, Engine, Event};
use crate::{
    core::{
        interest::{Declaration, DeclarationError},
        membership::{self, MemberState},
        pubsub::{Message, MessageId, Outgoing, SubId},
        topic::{Pattern, Topic},
        NodeId,
    },
    wire::{self, Frame, MsgWire, SyncWire, WireError},
};

impl Engine {
    /// A frame from `peer`'s data stream, parsed once here and handled:
    /// pub/sub, reliable pub/sub, gossip, membership, declarations,
    /// leaving, and (past the access checks) work queues, requests and
    /// streams. Only the shared-memory frames come back, for the driver
    /// (they switch the link's I/O).
    pub(crate) fn handle_frame<'a>(
        &mut self,
        now: Instant,
        peer: NodeId,
        body: &'a Bytes,
    ) -> Result<Option<Frame<'a>>, WireError> {
        self.now = now;
        match wire::decode(body)? {
            Frame::Msg(m) => self.msg_arrived(now, peer, body, &m)?,
            Frame::Seq { session, rseq, to } => {
                // Peer-supplied counters are checked before any arithmetic:
                // the number after `u64::MAX` does not exist.
                if rseq == u64::MAX {
                    return Err(WireError::Malformed("Seq at u64::MAX".into()));
                }
                let p = self
                    .peers
                    .get_mut(&peer)
                    .ok_or(WireError::Unexpected("Seq"))?;
                p.pending_seq = Some((session, rseq, to));
            }
            Frame::Resume { session, next } => {
                if self.request_allowed(now, peer) {
                    self.resend(peer, session, next);
                }
            }
            Frame::Gossip(g) => {
                let msg = self.gossip_codec.decode(body, &g)?;
                // Its origin's signature was checked by the link reader
                // (`link::GossipCheck`).
                self.gossip.handle_message(now, peer, msg, &mut self.rng);
                self.gossip_events();
                self.gossip_out();
            }
            Frame::Lagged {
                session,
                missed,
                next,
                to,
            } => {
                if next == u64::MAX {
                    return Err(WireError::Malformed("Lagged to u64::MAX".into()));
                }
                // A numbering for an earlier run of this node: not ours.
                if to == self.reliable.session() {
                    self.lagged(peer, session, missed, next);
                }
            }
            Frame::Topic { id, name } => {
                let p = self
                    .peers
                    .get_mut(&peer)
                    .ok_or(WireError::Unexpected("Topic"))?;
                p.dec.handle_topic(id, name)?;
                if let Some(a) = &mut self.access {
                    if !a.check(&peer, crate::security::Op::Publish, name) {
                        p.denied_topics.insert(id);
                    } else {
                        p.denied_topics.remove(&id);
                    }
                }
            }
            Frame::Member(m) => {
                let msg = wire::member_from_wire(&m)?;
                self.membership.handle_message(now, peer, msg);
            }
            Frame::Declare(d) => {
                let decl = wire::decl_from_wire(&d)?;
                if decl.node != peer {
                    return Err(WireError::Unexpected("Declare for another node"));
                }
                self.apply_declaration(decl)?;
            }
            Frame::Sync(s) => self.sync_arrived(now, peer, &s)?,
            Frame::Bye => self.peer_leaving(now, peer)?,
            Frame::ByeAck => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.bye_acked = true;
                }
            }
            Frame::Hello(_) => return Err(WireError::Unexpected("second Hello")),
            Frame::Auth { .. } => return Err(WireError::Unexpected("second Auth")),
            Frame::Relink => return Err(WireError::Unexpected("Relink on a data stream")),
            // What the access policy refuses is answered (or dropped)
            // here: the driver sees only what it may act on.
            Frame::Work(w) if !self.work_permitted(peer, &w) => {}
            Frame::Stream(w) if !self.stream_permitted(peer, &w) => {}
            Frame::Work(w) => self.handle_work(peer, body, w)?,
            Frame::Stream(w) => self.handle_stream(peer, body, w)?,
            f @ (Frame::ShmOffer { .. } | Frame::ShmRefuse { .. } | Frame::ShmSwitch) => {
                return Ok(Some(f))
            }
        }
        Ok(None)
    }

    /// A `Msg` from `peer`: checked against the access policy, decoded,
    /// and delivered to the matching subscriptions (numbered ones through
    /// the reliable window).
    fn msg_arrived(
        &mut self,
        now: Instant,
        peer: NodeId,
        body: &Bytes,
        m: &MsgWire<'_>,
    ) -> Result<(), WireError> {
        let p = self
            .peers
            .get_mut(&peer)
            .ok_or(WireError::Unexpected("Msg"))?;
        let seq = p.pending_seq.take();
        if !p.denied_topics.is_empty() && p.denied_topics.contains(&m.topic) {
            if let Some(a) = &mut self.access {
                a.denied += 1;
            }
            return Ok(());
        }
        let (msg, targets) = p.dec.handle_msg(body, m, &self.subs)?;
        // An inline name was not checked with its `Topic` frame:
        // check it here (every delivery path checks the policy).
        if m.topic == u32::MAX {
            if let Some(a) = &mut self.access {
                if !a.check(&peer, crate::security::Op::Publish, msg.topic.as_str()) {
                    return Ok(());
                }
            }
        }
        self.counters.received += 1;
        if targets.is_empty() {
            self.counters.no_subscriber += 1;
        }
        match seq {
            Some((session, rseq, to)) if to == self.reliable.session() => {
                if !self.accept_reliable(now, peer, session, rseq) {
                    return Ok(());
                }
                self.deliver(msg, &targets);
            }
            // Not numbered (the publisher did not know of our reliable
            // subscriptions yet), or numbered for an earlier run of this
            // node (the publisher held its declaration). The reliable
            // stream starts with the first message numbered for this run,
            // so it has no hole.
            _ if !self.reliable_subs.is_empty()
                && targets.iter().any(|t| self.reliable_subs.contains(t)) =>
            {
                let plain: Vec<SubId> = targets
                    .iter()
                    .copied()
                    .filter(|t| !self.reliable_subs.contains(t))
                    .collect();
                self.counters.unnumbered += (targets.len() - plain.len()) as u64;
                self.deliver(msg, &plain);
            }
            _ => self.deliver(msg, &targets),
        }
        Ok(())
    }

    /// A `Sync` from `peer`: the members and declarations it knows. The
    /// last of them (not `more`) makes this node ready and joined.
    fn sync_arrived(
        &mut self,
        now: Instant,
        peer: NodeId,
        s: &SyncWire<'_>,
    ) -> Result<(), WireError> {
        let updates = s
            .members
            .iter()
            .map(wire::update_from_wire)
            .collect::<Result<Vec<_>, _>>()?;
        self.membership.apply_updates_from(now, peer, updates);
        for d in &s.decls {
            self.apply_declaration(wire::decl_from_wire(d)?)?;
        }
        if !s.more {
            self.events.push_back(Event::Synced);
        }
        Ok(())
    }

    /// `peer` said `Bye`: acked, and marked down at once (a graceful
    /// leave, not a failure to detect).
    fn peer_leaving(&mut self, now: Instant, peer: NodeId) -> Result<(), WireError> {
        let p = self
            .peers
            .get_mut(&peer)
            .ok_or(WireError::Unexpected("Bye"))?;
        wire::encode(&mut p.scratch, &Frame::ByeAck);
        p.leaving = true;
        self.events.push_back(Event::Leaving(peer));
        // A graceful leave: mark it down at its current incarnation now
        // (the membership spreads it) instead of suspecting it after a
        // timeout, and stop routing to it.
        let update =
            self.membership
                .members()
                .find(|m| m.node == peer)
                .map(|m| membership::Update {
                    node: peer,
                    incarnation: m.incarnation,
                    state: MemberState::Down,
                    addrs: m.addrs.clone(),
                    signature: None,
                });
        if let Some(update) = update {
            self.membership.apply_updates(now, [update]);
        }
        self.routes.invalidate();
        Ok(())
    }

    /// A declaration of another node (in a `Declare` or a `Sync`), taken
    /// into the interest table if it is newer and signed by its node.
    pub(crate) fn apply_declaration(&mut self, decl: Declaration) -> Result<(), DeclarationError> {
        let node = decl.node;
        let newer = node != self.local
            && self
                .interest
                .version_of(&node)
                .is_none_or(|v| v < decl.version);
        if !newer {
            return Ok(());
        }
        // Only its node can make a declaration: one relayed by another
        // (in a `Sync`) or sent with a forged or missing signature is
        // ignored, so no peer can speak for another or pin a version.
        if !self.decl_verifier.verify_declaration(&decl) {
            self.counters.declarations_forged += 1;
            if self.counters.declarations_forged.is_power_of_two() {
                tracing::warn!(
                    %node,
                    forged = self.counters.declarations_forged,
                    "ignoring a declaration without its node's signature"
                );
            }
            return Ok(());
        }
        let epoch = decl.version.epoch;
        let before = self.interest.version_of(&node).map(|v| v.epoch);
        match self.interest.handle_declaration(decl) {
            Ok(true) if before.is_some_and(|e| e != epoch) => {
                self.reliable.forget_window(&node);
            }
            Ok(_) => {}
            // Not the sender's fault alone (it may relay a sync): the
            // declaration is ignored, the link kept.
            Err(DeclarationError::TableFull) => {
                self.counters.declarations_refused += 1;
                if self.counters.declarations_refused.is_power_of_two() {
                    tracing::warn!(
                        %node,
                        refused = self.counters.declarations_refused,
                        "interest table full: ignoring declarations of nodes not yet known"
                    );
                }
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Whether reliable message `rseq` of `peer`'s `session` is the next
    /// one to deliver (see [`super::reliable::Reliable::accept`]); a
    /// `Resume` goes out after a gap.
    fn accept_reliable(&mut self, now: Instant, peer: NodeId, session: u64, rseq: u64) -> bool {
        match self.reliable.accept(now, peer, session, rseq) {
            Accept::Deliver => true,
            Accept::Duplicate => {
                self.counters.duplicate += 1;
                false
            }
            Accept::Gap { resume } => {
                self.counters.out_of_order += 1;
                if let (Some(r), Some(p)) = (resume, self.peers.get_mut(&peer)) {
                    let (session, next) = (r.session, r.next);
                    wire::encode(&mut p.scratch, &Frame::Resume { session, next });
                }
                false
            }
        }
    }

    /// `peer` asks for our reliable messages from `next` on.
    fn resend(&mut self, peer: NodeId, session: u64, next: u64) {
        let Some(resend) = self.reliable.resend(&peer, session, next) else {
            return;
        };
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let session = self.reliable.session();
        let to = resend.to;
        if let Some((missed, next)) = resend.lagged {
            let lagged = Frame::Lagged {
                session,
                missed,
                next,
                to,
            };
            wire::encode(&mut p.scratch, &lagged);
        }
        for k in resend.messages() {
            let rseq = k.rseq;
            wire::encode(&mut p.scratch, &Frame::Seq { session, rseq, to });
            p.enc.encode(
                &mut p.scratch,
                &Outgoing {
                    topic: &k.topic,
                    seq: k.seq,
                    timestamp: k.timestamp,
                    headers: &k.headers,
                    payload: &k.payload,
                },
            );
            p.has_data = true;
            self.counters.resent += 1;
        }
    }

    /// `peer` says its messages before `next` are gone: the reliable
    /// subscriptions hear of it, and go on from `next`.
    fn lagged(&mut self, peer: NodeId, session: u64, missed: u64, next: u64) {
        let Some(missed) = self.reliable.lagged(peer, session, missed, next) else {
            return;
        };
        self.counters.reliable_lagged += missed;
        tracing::warn!(publisher = %peer, missed, "reliable messages left the publisher's window before we could fetch them");
        self.events.push_back(Event::Lagged {
            publisher: peer,
            missed,
        });
    }

    fn deliver(&mut self, msg: Message, targets: &[SubId]) {
        let Some((last, rest)) = targets.split_last() else {
            return;
        };
        // Every target but the last gets a clone (reference counts only).
        for id in rest {
            self.pending_delivery.push((*id, msg.clone()));
        }
        self.pending_delivery.push((*last, msg));
    }

    /// A new local subscription to `pattern`; its declaration goes to
    /// every peer. `None` if the interest table has no room for it.
    pub(crate) fn subscribe(&mut self, pattern: Pattern, reliable: bool) -> Option<SubId> {
        if !self.interest.has_room_for(&pattern) {
            return None;
        }
        let id = self.subs.add(pattern.clone());
        if reliable {
            self.reliable_subs.insert(id);
        }
        if let Some(decl) = self.interest.subscribe(&pattern, reliable) {
            self.announce(&decl);
        }
        Some(id)
    }

    /// Ends local subscription `id` (if it is one); peers hear of it.
    pub(crate) fn unsubscribe(&mut self, id: SubId) {
        let reliable = self.reliable_subs.remove(&id);
        if let Some(pattern) = self.subs.remove(id) {
            if let Some(decl) = self.interest.unsubscribe(&pattern, reliable) {
                self.announce(&decl);
            }
        }
    }

    /// Our declaration, signed, to every peer with a link.
    pub(crate) fn announce(&mut self, decl: &Declaration) {
        let mut signed = decl.clone();
        signed.signature = Some(self.signer.sign_declaration(decl));
        let mut frame = Vec::new();
        wire::encode_decl(&mut frame, &signed);
        for p in self.peers.values_mut() {
            p.scratch.extend_from_slice(&frame);
        }
    }

    /// What a new link's peer learns first: the members and declarations
    /// this node knows.
    pub(crate) fn encode_sync(&self, buf: &mut Vec<u8>) {
        // Alive records go with their members' signatures (ours first).
        let mut members = vec![self.membership.local_record()];
        members.extend(self.membership.records());
        let mut decls = self.interest.snapshot();
        // The local declaration (first) goes signed; the others carry the
        // signatures they came with.
        if let Some(local) = decls.first_mut() {
            local.signature = Some(self.signer.sign_declaration(local));
        }
        wire::encode_sync(buf, &members, &decls);
    }

    /// The live peers a message on `topic` goes to now (alive or
    /// suspected, and allowed to read it).
    pub(crate) fn route(&mut self, topic: &Topic) -> &[NodeId] {
        live_route(
            &mut self.routes,
            &self.interest,
            &self.membership,
            self.access.as_ref(),
            topic,
        )
    }

    /// Publishes one message stamped `timestamp` (µs since the Unix
    /// epoch): by gossip on a gossip topic, else encoded for each peer on
    /// its route (numbered for reliable subscribers), and to this node's
    /// own subscriptions.
    pub(crate) fn publish(
        &mut self,
        now: Instant,
        topic: Topic,
        headers: Vec<(String, Bytes)>,
        payload: Bytes,
        timestamp: u64,
    ) {
        self.seq += 1;
        if self.config.gossip.iter().any(|p| p.matches(topic.as_str())) {
            let signature =
                self.signer
                    .sign(self.local, self.seq, timestamp, topic.as_str(), &payload);
            self.gossip.broadcast_with(
                now,
                self.seq,
                topic.as_arc().clone(),
                payload.clone(),
                crate::core::gossip::Stamp {
                    timestamp,
                    signature,
                },
            );
            self.deliver_local(topic, timestamp, headers, payload);
            return;
        }
        let rseqs = self.keep_reliable(&topic, &headers, &payload, timestamp);
        let session = self.reliable.session();
        let seq = self.seq;
        let link_buffer = self.config.link_buffer;
        let route = live_route(
            &mut self.routes,
            &self.interest,
            &self.membership,
            self.access.as_ref(),
            &topic,
        );
        let out = Outgoing {
            topic: topic.as_arc(),
            seq,
            timestamp,
            headers: &headers,
            payload: &payload,
        };
        for peer in route {
            let p = self.peers.entry(*peer);
            if p.unsent
                .is_some_and(|unsent| p.scratch.len() + unsent > link_buffer)
            {
                // No stream yet and its buffer is full: drop, count, and say
                // so once per link.
                if p.dropped == 0 {
                    tracing::warn!(%peer, "no link to peer yet and its buffer is full; dropping messages for it");
                }
                p.dropped += 1;
                self.counters.dropped_unreachable += 1;
                self.counters.link_buffer_full += 1;
                continue;
            }
            if let Some((_, rseq, to)) = rseqs.iter().find(|(p, _, _)| p == peer) {
                let (rseq, to) = (*rseq, *to);
                wire::encode(&mut p.scratch, &Frame::Seq { session, rseq, to });
            }
            p.enc.encode(&mut p.scratch, &out);
            p.has_data = true;
            self.counters.sent += 1;
            if p.waiting() {
                p.queued += 1;
            }
        }
        self.deliver_local(topic, timestamp, headers, payload);
    }

    /// Reliable subscribers of `topic` get a numbered copy kept for
    /// resending, even while down or unreachable: they fetch it when they
    /// are back. Returns (subscriber, number, its run) for each.
    fn keep_reliable(
        &mut self,
        topic: &Topic,
        headers: &[(String, Bytes)],
        payload: &Bytes,
        timestamp: u64,
    ) -> Vec<(NodeId, u64, u64)> {
        let mut rseqs = Vec::new();
        if !self.interest.has_reliable() {
            return rseqs;
        }
        let access = &self.access;
        let reliable = self
            .reliable_routes
            .route(&self.interest, topic.as_arc(), |n| {
                may_read(access.as_ref(), n, topic.as_str())
            });
        for peer in reliable.iter() {
            let kept = Kept {
                rseq: 0,
                seq: self.seq,
                timestamp,
                topic: topic.as_arc().clone(),
                headers: headers.to_vec(),
                payload: payload.clone(),
            };
            let window = self.config.reliable_window;
            // Numbered for the subscriber's current run: a newer
            // declaration (a restart) starts a new numbering.
            let epoch = self.interest.version_of(peer).map_or(0, |v| v.epoch);
            let rseq = self.reliable.keep(*peer, epoch, kept, window);
            rseqs.push((*peer, rseq, epoch));
        }
        rseqs
    }

    /// A message published here, to this node's own subscriptions.
    fn deliver_local(
        &mut self,
        topic: Topic,
        timestamp: u64,
        headers: Vec<(String, Bytes)>,
        payload: Bytes,
    ) {
        if self.subs.is_empty() {
            return;
        }
        let targets = self.subs.matching(topic.as_str());
        if !targets.is_empty() {
            let msg = Message {
                id: MessageId {
                    publisher: self.local,
                    seq: self.seq,
                },
                topic,
                publisher: self.local,
                timestamp,
                headers,
                payload,
            };
            self.deliver(msg, &targets);
        }
    }

    /// Gossip messages received: to this node's subscriptions.
    pub(crate) fn gossip_events(&mut self) {
        while let Some(ev) = self.gossip.poll_event() {
            let crate::core::gossip::Event::Deliver {
                id,
                topic,
                payload,
                stamp,
                ..
            } = ev
            else {
                continue;
            };
            // Every node relays gossip: one without a matching
            // subscription drops nothing.
            self.counters.received += 1;
            if self.subs.is_empty() {
                continue;
            }
            // The origin is authenticated (its signature was checked).
            if let Some(a) = &mut self.access {
                if !a.check(&id.0, crate::security::Op::Publish, &topic) {
                    continue;
                }
            }
            let generation = self.subs.generation();
            let targets = match &self.gossip_targets {
                Some((t, g, targets)) if *g == generation && **t == *topic => targets.clone(),
                _ => {
                    let targets: Arc<[SubId]> = self.subs.matching(&topic).into();
                    self.gossip_targets = Some((topic.clone(), generation, targets.clone()));
                    targets
                }
            };
            if targets.is_empty() {
                continue;
            }
            let msg = Message {
                id: MessageId {
                    publisher: id.0,
                    seq: id.1,
                },
                topic: Topic::from_validated(topic),
                publisher: id.0,
                timestamp: stamp.timestamp,
                headers: Vec::new(),
                payload,
            };
            self.deliver(msg, &targets);
        }
    }

    /// Encodes what the gossip core wants sent into the peers' buffers;
    /// peers not connected are to be dialed ([`Engine::gossip_dial`]).
    pub(crate) fn gossip_out(&mut self) {
        while let Some(t) = self.gossip.poll_transmit() {
            if t.to == self.local {
                continue;
            }
            if !self.connected.contains(&t.to) && !self.gossip_dial.contains(&t.to) {
                self.gossip_dial.push(t.to);
            }
            let p = self.peers.entry(t.to);
            self.gossip_codec.encode(&mut p.scratch, &t.message);
            p.has_data = true;
        }
    }
}

/// The live nodes interested in `topic` (alive or suspected, and allowed
/// to read it), from `routes`' cache: a function of the fields it needs, so
/// `publish` can hold the route while it writes to the peers.
fn live_route<'a>(
    routes: &'a mut crate::core::interest::RouteCache,
    interest: &crate::core::interest::Interest,
    membership: &crate::core::membership::Membership,
    access: Option<&crate::security::Access>,
    topic: &Topic,
) -> &'a [NodeId] {
    routes.route_ref(interest, topic.as_arc(), |n| {
        matches!(
            membership.state_of(n),
            Some(MemberState::Alive | MemberState::Suspect)
        ) && may_read(access, n, topic.as_str())
    })
}

#[cfg(test)]
mod tests {
    //! Two engines with the frames between them carried by hand (like
    //! quinn-proto's `Pair`): real wire frames, no tokio, virtual time.

    use super::*;
    use crate::engine::testing::{transmits, Pair};

    impl Pair {
        fn publish(&mut self, topic: &str, payload: &str) {
            let topic = Topic::new(topic).expect("valid topic");
            let payload = Bytes::copy_from_slice(payload.as_bytes());
            self.b.publish(self.now, topic, Vec::new(), payload, 7);
        }

        /// Payloads `a` delivered since the last call.
        fn delivered(&mut self) -> Vec<String> {
            self.a
                .take_deliveries()
                .into_iter()
                .map(|(_, m)| String::from_utf8(m.payload.to_vec()).expect("utf-8"))
                .collect()
        }
    }

    #[test]
    fn a_publish_reaches_the_matching_subscription_on_the_peer() {
        let mut p = Pair::new(64);
        assert!(p.b.events.contains(&Event::Synced), "b took a's view");
        let sub =
            p.a.subscribe(Pattern::new("t.>").unwrap(), false)
                .expect("room");
        p.drive();
        p.publish("t.x", "one");
        p.publish("u.x", "nobody");
        p.drive();
        let got = p.a.take_deliveries();
        assert_eq!(got.len(), 1);
        let (id, msg) = &got[0];
        assert_eq!(*id, sub);
        assert_eq!(msg.publisher, p.b.local);
        assert_eq!(msg.topic.as_str(), "t.x");
        assert_eq!(&msg.payload[..], b"one");
        // `u.x` matched no declaration of `a`: it never left `b`.
        assert_eq!((p.b.counters.sent, p.a.counters.received), (1, 1));
        // `b` delivers its own publishes to its own subscriptions only.
        assert!(p.b.take_deliveries().is_empty());
        assert!(p.to_driver.is_empty());
    }

    #[test]
    fn an_unsubscribed_pattern_stops_the_publisher_sending() {
        let mut p = Pair::new(64);
        let sub = p.a.subscribe(Pattern::new("t.*").unwrap(), false).unwrap();
        p.drive();
        p.a.unsubscribe(sub);
        p.drive();
        p.publish("t.x", "late");
        p.drive();
        assert_eq!(p.b.counters.sent, 0);
        assert!(p.delivered().is_empty());
    }

    #[test]
    fn a_lost_reliable_message_is_fetched_again_and_delivered_in_order() {
        let mut p = Pair::new(64);
        p.a.subscribe(Pattern::new("r.>").unwrap(), true).unwrap();
        p.drive();
        p.publish("r.x", "1");
        p.drive();
        p.drop_link();
        // Buffered for a link that never comes up, and lost with it.
        p.publish("r.x", "2");
        p.drop_link();
        p.link();
        // 3 crosses the subscriber's Resume: it comes after a hole and is
        // held back; 2 and 3 are sent again.
        p.publish("r.x", "3");
        p.drive();
        assert_eq!(p.delivered(), ["1", "2", "3"]);
        assert_eq!(p.a.counters.out_of_order, 1);
        assert_eq!(p.b.counters.resent, 2);
        // Nothing is delivered twice.
        p.publish("r.x", "4");
        p.drive();
        assert_eq!(p.delivered(), ["4"]);
        assert_eq!(p.a.counters.duplicate, 0);
    }

    #[test]
    fn messages_that_left_the_window_are_reported_lagged() {
        let mut p = Pair::new(2);
        p.a.subscribe(Pattern::new("r.>").unwrap(), true).unwrap();
        p.drive();
        p.drop_link();
        for i in 1..=5 {
            p.publish("r.x", &i.to_string());
        }
        p.drop_link();
        p.link();
        p.drive();
        // The window kept the last two: 4 and 5 come, 1 to 3 are lost and
        // every reliable subscription hears how many.
        assert_eq!(p.delivered(), ["4", "5"]);
        let publisher = p.b.local;
        let lagged: Vec<Event> = std::iter::from_fn(|| p.a.poll_event())
            .filter(|e| matches!(e, Event::Lagged { .. }))
            .collect();
        assert_eq!(
            lagged,
            [Event::Lagged {
                publisher,
                missed: 3
            }]
        );
        assert_eq!(p.a.counters.reliable_lagged, 3);
    }

    #[test]
    fn a_leaving_peer_is_acked_and_marked_down() {
        let mut p = Pair::new(64);
        let (a, b) = (p.a.local, p.b.local);
        assert_eq!(p.a.membership.state_of(&b), Some(MemberState::Alive));
        wire::encode(&mut p.b.peers.entry(a).scratch, &Frame::Bye);
        p.drive();
        assert!(std::iter::from_fn(|| p.a.poll_event()).any(|e| e == Event::Leaving(b)));
        assert_eq!(p.a.membership.state_of(&b), Some(MemberState::Down));
        assert!(p.a.peers.get_mut(&b).unwrap().leaving);
        assert!(
            p.b.peers.get_mut(&a).unwrap().bye_acked,
            "the ack came back"
        );
    }

    #[test]
    fn frames_of_the_driver_come_back_and_bad_ones_are_errors() {
        let mut p = Pair::new(64);
        let b = p.b.local;
        let frame = |f: &Frame<'_>| {
            let mut buf = Vec::new();
            wire::encode(&mut buf, f);
            Bytes::copy_from_slice(&buf[mesh_transports::frame::LEN_PREFIX..])
        };
        let now = p.now;
        let switch = frame(&Frame::ShmSwitch);
        let rest = p.a.handle_frame(now, b, &switch).unwrap();
        assert!(matches!(rest, Some(Frame::ShmSwitch)));
        let bad = frame(&Frame::Seq {
            session: 1,
            rseq: u64::MAX,
            to: 1,
        });
        assert!(matches!(
            p.a.handle_frame(now, b, &bad),
            Err(WireError::Malformed(_))
        ));
        let relink = frame(&Frame::Relink);
        assert!(matches!(
            p.a.handle_frame(now, b, &relink),
            Err(WireError::Unexpected(_))
        ));
        // A peer without a link sends no messages.
        let stranger = crate::test_support::node_id(9);
        let seq = frame(&Frame::Seq {
            session: 1,
            rseq: 1,
            to: 1,
        });
        assert!(p.a.handle_frame(now, stranger, &seq).is_err());
        assert!(p
            .a
            .handle_frame(now, b, &Bytes::from_static(b"\xff\xff"))
            .is_err());
    }

    /// `from`'s timers run and its membership frames reach `to`; how many.
    fn member_exchange(from: &mut Engine, to: &mut Engine, now: Instant) -> usize {
        from.handle_timeout(now);
        let mut n = 0;
        while let Some(out) = from.poll_member_transmit() {
            let crate::engine::MemberOut::Control { to: peer, frame } = out else {
                panic!("a connected, answering peer is sent to: {out:?}");
            };
            assert_eq!(peer, to.local);
            let body = Bytes::copy_from_slice(&frame[mesh_transports::frame::LEN_PREFIX..]);
            assert!(to.handle_frame(now, from.local, &body).unwrap().is_none());
            n += 1;
        }
        n
    }

    #[test]
    fn membership_probes_go_as_control_frames_to_connected_peers_else_a_dial() {
        use crate::engine::MemberOut;
        let mut p = Pair::new(64);
        let (a, b) = (p.a.local, p.b.local);
        p.a.handle_connected(b);
        p.b.handle_connected(a);
        let mut probes = 0;
        for _ in 0..20 {
            p.now += std::time::Duration::from_secs(1);
            let now = p.now;
            probes += member_exchange(&mut p.a, &mut p.b, now);
            probes += member_exchange(&mut p.b, &mut p.a, now);
        }
        assert!(probes > 0, "each probes its one member");
        assert_eq!(p.a.membership.state_of(&b), Some(MemberState::Alive));
        // Without a connection, what a has for b becomes a dial.
        p.a.handle_disconnected(b);
        let mut dialed = false;
        for _ in 0..20 {
            p.now += std::time::Duration::from_secs(1);
            p.a.handle_timeout(p.now);
            while let Some(out) = p.a.poll_member_transmit() {
                match out {
                    MemberOut::Dial { to, .. } => dialed |= to == b,
                    MemberOut::Control { .. } => panic!("no control frame without a connection"),
                    MemberOut::Down(_) => {}
                }
            }
        }
        assert!(dialed);
    }

    #[test]
    fn a_peek_the_policy_refuses_is_answered_empty_and_an_allowed_one_in_full() {
        use crate::engine::{reply::Reply, work};
        use crate::security::{Access, AccessPolicy, Op};
        use crate::wire::WorkWire;
        let mut p = Pair::new(64);
        let b = p.b.local;
        let policy = AccessPolicy::new()
            .allow(&b.to_string(), Op::Read, &["open"])
            .expect("a policy");
        p.a.access = Some(Access::new(policy));
        let now = p.now;
        // a sends one message to each queue; nobody hosts them, so a does.
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        for queue in ["open", "closed"] {
            let sent = sent.clone();
            p.a.handle_command(
                now,
                work::Op::Send {
                    queue: queue.into(),
                    msg: work::OutMsg {
                        headers: Vec::new(),
                        payload: Bytes::from_static(b"job"),
                        delay: None,
                        ttl: None,
                        dedup: None,
                        durable: false,
                    },
                    reply: Reply::new(move |r: Result<_, _>| sent.lock().unwrap().push(r.is_ok())),
                },
            );
        }
        assert_eq!(*sent.lock().unwrap(), [true, true]);
        let peek = |queue: &str, req: u64| {
            let mut buf = Vec::new();
            let w = WorkWire::Peek {
                req,
                queue,
                limit: 10,
            };
            wire::encode(&mut buf, &Frame::Work(w));
            Bytes::copy_from_slice(&buf[mesh_transports::frame::LEN_PREFIX..])
        };
        for (queue, req) in [("open", 1), ("closed", 2)] {
            assert!(p
                .a
                .handle_frame(now, b, &peek(queue, req))
                .unwrap()
                .is_none());
        }
        let (_, frames) = transmits(&mut p.a).pop().expect("answers");
        let answers: Vec<(u64, usize)> = frames
            .iter()
            .filter_map(|f| match wire::decode(f).unwrap() {
                Frame::Work(WorkWire::Peeked { req, msgs }) => Some((req, msgs.len())),
                _ => None,
            })
            .collect();
        // The allowed peek sees the message; the refused one gets an empty
        // answer (so b does not wait) and is counted.
        assert_eq!(answers, [(1, 1), (2, 0)]);
        assert_eq!(p.a.access.as_ref().unwrap().denied, 1);
    }
}
