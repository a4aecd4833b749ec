//! A short run of `mesh bench soak` (the long one is in BENCHMARKS.md):
//! a durable queue host, a relay, producers, consumers, a reliable
//! publisher and subscribers as processes, some SIGKILLed or SIGSTOPped
//! and restarted on a seeded schedule. Nothing confirmed may be lost:
//! every confirmed queue message delivered, every reliable pub/sub
//! message delivered or reported in a `Lagged` gap. Memory is not judged
//! here (the run is too short; the bench says so), nor is any timing.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mesh-cli");

fn seed() -> u64 {
    match std::env::var("MESH_SOAK_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("MESH_SOAK_SEED={s:?} is not a u64")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    }
}

#[test]
fn short_soak_loses_nothing() {
    let seed = seed();
    println!("seed {seed} (replay: MESH_SOAK_SEED={seed} cargo test --test soak -- --nocapture)");
    let out = Command::new(BIN)
        .args([
            "bench",
            "soak",
            "--duration",
            "20s",
            "--warmup",
            "5s",
            "--kill-every",
            "4s",
            "--rate",
            "200",
            "--seed",
            &seed.to_string(),
            "--json",
        ])
        .output()
        .expect("the soak runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stdout.lines().last().unwrap_or_default();
    let r: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!("no JSON result ({e}); seed {seed}\nstdout:\n{stdout}\nstderr:\n{stderr}")
    });
    println!("{}", serde_json::to_string_pretty(&r).unwrap());
    assert_eq!(r["queue"]["lost"], 0, "queue messages lost; seed {seed}");
    assert_eq!(
        r["pubsub"]["lost"], 0,
        "reliable messages lost; seed {seed}"
    );
    assert!(r["queue"]["sent"].as_u64().unwrap() > 0, "nothing sent");
    assert!(
        r["pubsub"]["sent"].as_u64().unwrap() > 0,
        "nothing published"
    );
    assert!(r["kills"].as_u64().unwrap() > 0, "no kills; seed {seed}");
    assert!(
        r["restarts"].as_u64().unwrap() > 0,
        "no restarts; seed {seed}"
    );
    assert_eq!(
        r["memory_judged"], false,
        "a 20 s run is too short to judge memory"
    );
    assert!(
        out.status.success(),
        "the soak failed: {}; seed {seed}\nstderr:\n{stderr}",
        r["failures"]
    );
}

#[test]
fn bad_soak_options_are_clear_errors() {
    for (args, says) in [
        (&["--duration", "10x"][..], "unit must be ms, s, m or h"),
        (
            &["--duration", "20s", "--warmup", "30s"][..],
            "--warmup must be shorter",
        ),
        (&["--rate", "0"][..], "--rate must be between"),
        (&["--kill-every", "abc"][..], "bad duration"),
    ] {
        let out = Command::new(BIN)
            .args(["bench", "soak"])
            .args(args)
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
