//! Seeded random simulations with faults (TigerBeetle's VOPR, in small).
//!
//! Each seed picks its own fault rates (loss, duplication, reordering, partitions, restarts)
//! and mesh size, runs two minutes of virtual time with the safety checkers after every step,
//! then heals everything and requires convergence and loop-free forwarding.
//!
//! CI runs the fixed list below. `MESH_SIM_SEED=N cargo test -p mesh --test sim_random`
//! replays one seed exactly (and prints its per-peer report when it fails);
//! `MESH_SIM_SEEDS=A..B` runs a range (for long runs off CI).

use std::time::{Duration, Instant};

use mesh::sim::{Sim, SimOptions};

/// How many seeds CI runs.
const CI_SEEDS: u64 = 200;

fn options(seed: u64) -> SimOptions {
    options_with(seed, 3 + (seed % 10) as usize)
}

fn options_with(seed: u64, peers: usize) -> SimOptions {
    SimOptions {
        fault_time: Duration::from_secs(60),
        convergence_max: Duration::from_secs(240),
        ..SimOptions::random(seed, peers)
    }
}

fn run(seed: u64) -> Result<mesh::sim::Stats, String> {
    let mut sim = Sim::new(options(seed), Instant::now());
    sim.run().map_err(|f| f.to_string())
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("MESH_SIM_SEED") {
        return vec![s.trim().parse().expect("MESH_SIM_SEED must be a number")];
    }
    if let Ok(range) = std::env::var("MESH_SIM_SEEDS") {
        let (a, b) = range
            .split_once("..")
            .expect("MESH_SIM_SEEDS must look like 1000..2000");
        let a: u64 = a.trim().parse().expect("MESH_SIM_SEEDS start");
        let b: u64 = b.trim().parse().expect("MESH_SIM_SEEDS end");
        return (a..b).collect();
    }
    (0..CI_SEEDS).collect()
}

#[test]
fn random_seeds_with_faults_stay_safe_and_converge() {
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut total = mesh::sim::Stats::default();
    let seeds = seeds();
    for &seed in &seeds {
        let t = Instant::now();
        let result = run(seed);
        if t.elapsed() > Duration::from_secs(1) {
            eprintln!(
                "seed {seed}: slow, {:.1}s {:?}",
                t.elapsed().as_secs_f64(),
                result.as_ref().ok()
            );
        }
        match result {
            Ok(s) => {
                total.messages += s.messages;
                total.restarts += s.restarts;
                total.partitions += s.partitions;
                total.dropped += s.dropped;
                total.frames_traced += s.frames_traced;
                total.frames_hop_limited += s.frames_hop_limited;
            }
            Err(report) => failures.push(report),
        }
    }
    eprintln!(
        "{} seeds in {:.1}s: {} messages, {} dropped, {} restarts, {} partitions, {} frames traced, {} cut by hop limit",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        total.messages,
        total.dropped,
        total.restarts,
        total.partitions,
        total.frames_traced,
        total.frames_hop_limited
    );
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed; the first:\n{}",
        failures.len(),
        seeds.len(),
        failures[0]
    );
}

/// Goal: above 64 peers, where anti-entropy goes through bucket digests
/// (`Message::Buckets`), faults still end in one converged view. CI runs a few seeds of 65 to
/// 101 peers; `MESH_SIM_LARGE_SEEDS=N` runs N of them.
#[test]
fn large_meshes_with_faults_stay_safe_and_converge() {
    let count: u64 = std::env::var("MESH_SIM_LARGE_SEEDS")
        .map(|s| {
            s.trim()
                .parse()
                .expect("MESH_SIM_LARGE_SEEDS must be a number")
        })
        .unwrap_or(6);
    let started = Instant::now();
    let mut buckets = 0;
    for seed in 0..count {
        let peers = 65 + (seed % 10) as usize * 4;
        let mut sim = Sim::new(options_with(seed, peers), Instant::now());
        match sim.run() {
            Ok(stats) => buckets += stats.bytes_by_kind.get("buckets").copied().unwrap_or(0),
            Err(f) => panic!("seed {seed} with {peers} peers:\n{f}"),
        }
    }
    eprintln!(
        "{count} large seeds in {:.1}s, {buckets} bytes of bucket digests and lists",
        started.elapsed().as_secs_f64()
    );
    assert!(buckets > 0, "no anti-entropy went through buckets");
}

#[test]
fn a_seed_replays_exactly() {
    let a = run(7).expect("seed 7 passes");
    let b = run(7).expect("seed 7 passes");
    assert_eq!(
        (a.messages, a.bytes, a.steps),
        (b.messages, b.bytes, b.steps)
    );
}
