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

/// The golden master of the random sweeps: every run's simulator trace
/// hash (each packet's time, path and bytes, each fault) must be the one
/// recorded in `mesh/tests/golden/SUITE.txt` for its seed (seeds not
/// recorded there are not checked), so a refactor that means to change
/// nothing shows that it changed nothing.
///
/// With `MESH_GOLDEN_DIR` set, runs append `SEED HASH` to
/// `MESH_GOLDEN_DIR/SUITE.txt` instead of checking: `scripts/golden
/// record` keeps them as the new golden master (for a change that means
/// to alter behaviour, saying why), `scripts/golden check` lists every
/// seed that behaves differently.
pub fn golden(suite: &str, seed: u64, hash: u64) {
    if let Some(dir) = std::env::var_os("MESH_GOLDEN_DIR") {
        use std::io::Write;
        let path = std::path::Path::new(&dir).join(format!("{suite}.txt"));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // One write of one short line: appends from parallel tests do not mix.
        f.write_all(format!("{seed} {hash:016x}\n").as_bytes())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        return;
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{suite}.txt"));
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    let want = text.lines().find_map(|line| {
        let (s, h) = line.split_once(' ')?;
        (s.parse::<u64>().ok()? == seed).then(|| u64::from_str_radix(h, 16).ok())?
    });
    if let Some(want) = want {
        assert_eq!(
            hash,
            want,
            "suite {suite}, seed {seed}: the run went differently from the golden master \
             ({}); if that is meant, run scripts/golden record and say why in the commit",
            path.display()
        );
    }
}
