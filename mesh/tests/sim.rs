//! The simulator: determinism, faults, and delivery checkers.

use std::time::Duration;

use futures::StreamExt;
use mesh::sim::Sim;

const S: Duration = Duration::from_secs(1);

#[test]
fn three_nodes_converge_and_deliver() {
    let mut sim = Sim::builder().seed(1).record_trace(true).build();
    let a = sim.node("a");
    let _b = sim.node("b");
    let c = sim.node("c");
    let took = sim.run_until(|s| s.converged(), 30 * S).expect("converges");
    eprintln!("converged after {took:?}; {} events", sim.trace_len());
    let mut sub = sim.block_on(c.subscribe("t.>")).unwrap();
    sim.run_until(|s| s.routed("a", "t.x"), 5 * S)
        .expect("routed");
    sim.block_on(a.publish("t.x", "hello")).unwrap();
    let got = sim
        .block_on_for(5 * S, sub.next())
        .expect("in time")
        .expect("message");
    assert_eq!(got.payload, "hello");
}
