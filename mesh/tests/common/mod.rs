//! What the simulator tests share: which seeds a sweep runs, and random
//! fault schedules.
#![allow(dead_code)]

use std::ops::Range;

/// The seeds of a sweep: `range`, or only `MESH_SIM_SEED` when it is set
/// (to replay one).
pub fn seeds(range: Range<u64>) -> Vec<u64> {
    match std::env::var("MESH_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("MESH_SIM_SEED is a number")],
        Err(_) => range.collect(),
    }
}

/// Seeds per sweep test: the total in `var`, split over `tests` tests that
/// run in parallel, or `default` each.
pub fn per_test(var: &str, tests: u64, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .map(|n: u64| n.div_ceil(tests))
        .unwrap_or(default)
}

/// What a step of a random fault schedule did that the test must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// This node crashed.
    Crashed(&'static str),
    /// This node was restarted (its services must start again).
    Restarted(&'static str),
    /// Nothing the test must act on (a partition, a cut, a heal, ...).
    Other,
}

/// A random fault schedule over `nodes`: partitions, one-way cuts,
/// isolation, heals, crashes and restarts of `crashable` nodes, pauses.
/// The same seed gives the same schedule.
#[derive(Debug, Default)]
pub struct Faults {
    crashed: Vec<&'static str>,
    paused: Vec<&'static str>,
}

impl Faults {
    /// Runs the mesh for a random while, then applies one random fault.
    pub fn step(
        &mut self,
        sim: &mut mesh::sim::Sim,
        rng: &mut rand::rngs::SmallRng,
        nodes: &[&'static str],
        crashable: &[&str],
    ) -> Fault {
        use rand::Rng;
        sim.run_for(std::time::Duration::from_millis(rng.gen_range(200..3000)));
        let pick = nodes[rng.gen_range(0..nodes.len())];
        match rng.gen_range(0..100) {
            0..=24 => {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                for n in nodes {
                    if rng.gen_bool(0.5) {
                        a.push(*n)
                    } else {
                        b.push(*n)
                    }
                }
                sim.partition(&[&a, &b]);
            }
            25..=34 => {
                let other = nodes[rng.gen_range(0..nodes.len())];
                if other != pick {
                    sim.cut(pick, other);
                }
            }
            35..=44 => sim.isolate(pick),
            45..=69 => sim.heal(),
            70..=84
                if crashable.contains(&pick) && !self.paused.contains(&pick) && sim.crash(pick) =>
            {
                tracing::info!(node = pick, "crashed");
                self.crashed.push(pick);
                return Fault::Crashed(pick);
            }
            85..=89 if !self.crashed.is_empty() => {
                let n = self
                    .crashed
                    .swap_remove(rng.gen_range(0..self.crashed.len()));
                sim.restart(n);
                return Fault::Restarted(n);
            }
            90..=94 if !self.crashed.contains(&pick) && !self.paused.contains(&pick) => {
                sim.pause(pick);
                self.paused.push(pick);
            }
            95..=99 if !self.paused.is_empty() => {
                let n = self.paused.swap_remove(0);
                sim.resume(n);
            }
            _ => {}
        }
        Fault::Other
    }

    /// Heals the network, resumes paused nodes and restarts crashed ones;
    /// returns those restarted.
    pub fn end(&mut self, sim: &mut mesh::sim::Sim) -> Vec<&'static str> {
        sim.heal();
        for n in self.paused.drain(..) {
            sim.resume(n);
        }
        let restarted: Vec<&'static str> = self.crashed.drain(..).collect();
        for n in &restarted {
            sim.restart(n);
        }
        restarted
    }
}
