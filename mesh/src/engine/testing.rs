//! Engines driven by hand in tests (like quinn-proto's `Pair`): real wire
//! frames carried between them, no tokio, virtual time.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use libp2p::identity::Keypair;
use rand::{rngs::SmallRng, SeedableRng};

use super::{streams::Streams, work::Work, Engine, EngineConfig, Parts};
use crate::{
    core::{membership::Membership, NodeId},
    node::Config,
    security::Signer,
    test_support::test_origin,
};

/// Engine number `i` with the node configuration `config`, declaring what
/// it is configured to host (as the runtime does at start).
pub(crate) fn engine(i: u8, config: &Config, now: Instant) -> Engine {
    let key = Keypair::ed25519_from_bytes([i; 32]).expect("any 32 bytes are a key");
    let local = key.public().to_peer_id();
    let engine_config = EngineConfig {
        link_buffer: 1 << 20,
        reliable_window: config.reliable_window,
        gossip: Vec::new(),
    };
    let mut e = Engine::new(
        engine_config,
        Parts {
            local,
            membership: Membership::new(local, Vec::new(), 1, Default::default(), now),
            epoch: 1_000 + u64::from(i),
            access: None,
            signer: Signer::new(key),
            rng: SmallRng::seed_from_u64(u64::from(i)),
            work: Work::new(config),
            streams: Streams::new(config, local),
            durable: false,
            now,
        },
    );
    e.work.epoch = 1_000 + u64::from(i);
    let hosted: Vec<_> = e
        .work
        .host_patterns()
        .into_iter()
        .chain(e.streams.host_patterns())
        .collect();
    for p in hosted {
        e.interest.subscribe(&p, false);
    }
    e
}

/// The frames `e` has for its peers, split as a link reader would.
pub(crate) fn transmits(e: &mut Engine) -> Vec<(NodeId, Vec<Bytes>)> {
    let mut out = Vec::new();
    e.poll_transmit(|peer, bytes| {
        let mut buf = BytesMut::from(&bytes[..]);
        bytes.clear();
        let mut frames = Vec::new();
        mesh_transports::frame::split_frames(&mut buf, usize::MAX, &mut frames)
            .expect("the engine encodes whole frames");
        assert!(buf.is_empty(), "a partial frame was handed out");
        out.push((*peer, frames));
        None
    });
    out
}

/// Two engines, `a` and `b`, linked.
pub(crate) struct Pair {
    pub(crate) a: Engine,
    pub(crate) b: Engine,
    pub(crate) now: Instant,
    /// Frames the engines gave back for their driver.
    pub(crate) to_driver: Vec<&'static str>,
}

impl Pair {
    /// Two engines of the default configuration keeping `reliable_window`
    /// reliable messages per subscriber.
    pub(crate) fn new(reliable_window: usize) -> Self {
        let config = Config {
            reliable_window,
            ..Config::default()
        };
        Self::with(&config, &config)
    }

    /// Engines of configurations `a` and `b`, linked, with each side's
    /// view of the mesh taken.
    pub(crate) fn with(a: &Config, b: &Config) -> Self {
        let now = test_origin();
        let mut p = Self {
            a: engine(1, a, now),
            b: engine(2, b, now),
            now,
            to_driver: Vec::new(),
        };
        p.link();
        p.drive();
        p
    }

    /// A new link between the two (its first frames are each side's view
    /// of the mesh).
    pub(crate) fn link(&mut self) {
        let (a, b) = (self.a.local, self.b.local);
        for (e, peer) in [(&mut self.a, b), (&mut self.b, a)] {
            let mut sync = Vec::new();
            e.encode_sync(&mut sync);
            e.peers.entry(peer).scratch.extend_from_slice(&sync);
            e.handle_link_up(self.now, peer, Vec::new());
            e.links_generation += 1;
        }
    }

    /// The link ends, and what either side had not sent yet is lost with
    /// it (as when the driver removes a link).
    pub(crate) fn drop_link(&mut self) {
        let (a, b) = (self.a.local, self.b.local);
        for (e, peer) in [(&mut self.a, b), (&mut self.b, a)] {
            e.peers.remove(&peer);
            e.links_generation += 1;
            e.work_link_down(self.now, peer);
        }
    }

    /// Ends a turn of both drivers and carries frames both ways until
    /// neither engine has more.
    pub(crate) fn drive(&mut self) {
        loop {
            self.a.work_flush(self.now);
            self.b.work_flush(self.now);
            let from_a = transmits(&mut self.a);
            let from_b = transmits(&mut self.b);
            if from_a.iter().chain(&from_b).all(|(_, f)| f.is_empty()) {
                return;
            }
            let (a, b) = (self.a.local, self.b.local);
            for (_, frames) in from_a {
                for f in frames {
                    let rest = self.b.handle_frame(self.now, a, &f).expect("good frame");
                    self.to_driver
                        .extend(rest.map(|f| crate::wire::frame_name(&f)));
                }
            }
            for (_, frames) in from_b {
                for f in frames {
                    let rest = self.a.handle_frame(self.now, b, &f).expect("good frame");
                    self.to_driver
                        .extend(rest.map(|f| crate::wire::frame_name(&f)));
                }
            }
        }
    }

    /// Virtual time goes on by `d`: both engines' timers that are due run,
    /// then the frames they made are carried.
    pub(crate) fn advance(&mut self, d: Duration) {
        self.now += d;
        self.a.handle_timeout(self.now);
        self.b.handle_timeout(self.now);
        self.drive();
    }
}
