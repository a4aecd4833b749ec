//! What the simulator tests share: which seeds a sweep runs.

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
