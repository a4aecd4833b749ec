//! Driving a sans-IO core by hand: the driver owns the clock and passes
//! the time in (the cores never read one).

use mesh::core::membership::{Config, Event, Membership};
use rand::{rngs::SmallRng, SeedableRng};
use std::time::{Duration, Instant};

#[test]
fn a_link_up_admits_the_peer_and_it_is_probed_one_period_later() {
    let (a, b) = (mesh::PeerId::random(), mesh::PeerId::random());
    let now = Instant::now();
    let mut rng = SmallRng::seed_from_u64(7);
    let mut m = Membership::new(
        a,
        vec![b"/ip4/10.0.0.1/udp/4001/quic-v1".to_vec()],
        1,
        Config::default(),
        now,
    );

    m.handle_link_up(now, b, Vec::new());
    assert_eq!(
        m.poll_event(),
        Some(Event::Up {
            node: b,
            addrs: Vec::new()
        })
    );

    // One protocol period later, `b` is probed.
    let t = m.poll_timeout().unwrap();
    assert_eq!(t, now + Duration::from_millis(500));
    m.handle_timeout(t, &mut rng);
    let ping = m.poll_transmit().unwrap();
    assert_eq!(ping.to, b);
}
