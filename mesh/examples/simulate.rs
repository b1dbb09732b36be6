//! Gossip at scale, measured in the simulator: prints one table row per mesh size.
//!
//! ```sh
//! cargo run -p mesh --release --example simulate              # N = 100, 1000, 10000
//! cargo run -p mesh --release --example simulate -- 100 1000  # chosen sizes
//! ```
//!
//! For each N, with the default connection limit, 1% message loss and 5-50 ms one-way delay,
//! starting from a connected mesh (every peer knows the full topology): (a) time until every
//! peer knows a newly joined peer, (b) time until every peer has routed around a crashed peer
//! (its neighbours notice after the 6 s transport idle timeout), (c) gossip bytes per peer per
//! minute in steady state and per peer to spread one change (the join), (d) memory of one
//! router holding the full topology (unshared, measured with a counting allocator), (e) wall
//! clock. Times are virtual; routers recompute routes at most every 100 ms; IPAM stays idle
//! (`SIM_IPAM_CONSENSUS=1`: every router takes part in a consensus bootstrap instead, to measure
//! what that costs; per-kind byte counts go to stderr).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mesh::ipam::{Init, IpamConfig};
use mesh::sim::{Bootstrap, Sim, SimOptions};
use mesh::{ConnId, Message, PeerName, Router, RouterConfig, CONN_LIMIT_DEFAULT};

/// Links per peer in the starting mesh: up to the limit, as in a mesh that has settled (below
/// it, the first minutes are spent filling up through discovery, not in steady state).
const WARM_DEGREE: usize = CONN_LIMIT_DEFAULT;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Runs in steps of `every` until `done` holds or `max` passes; returns the time taken.
fn time_until(
    sim: &mut Sim,
    max: Duration,
    mut done: impl FnMut(&Sim) -> bool,
) -> Option<Duration> {
    let every = Duration::from_millis(100);
    let t0 = sim.now();
    while sim.now() - t0 <= max {
        if done(sim) {
            return Some(sim.now() - t0);
        }
        sim.run_for(every).expect("no checks run, so no failure");
    }
    None
}

/// Bytes held by one router that decoded the full topology of `sim` from the wire.
fn router_bytes(sim: &Sim, start: Instant) -> usize {
    let (_, any) = sim.routers().next().expect("a router is up");
    let bytes = mesh::encode(&Message::Gossip(any.topology().full_state()));
    let before = LIVE.load(Ordering::Relaxed);
    let mut r = Router::new(RouterConfig::default(), PeerName(1), 1, start);
    let neighbour = any.name();
    r.handle_connected(
        start,
        ConnId(1),
        neighbour,
        "n".into(),
        "192.0.2.1:6783".parse().expect("addr"),
        true,
    );
    r.handle_message(start, ConnId(1), &bytes)
        .expect("valid full state");
    while r.poll_transmit().is_some() {}
    while r.poll_event().is_some() {}
    let after = LIVE.load(Ordering::Relaxed);
    drop(r);
    after.saturating_sub(before)
}

fn fmt_time(d: Option<Duration>) -> String {
    d.map_or("not within limit".into(), |d| {
        format!("{:.2} s", d.as_secs_f64())
    })
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("sizes are numbers"))
        .collect();
    let sizes = if sizes.is_empty() {
        vec![100, 1000, 10_000]
    } else {
        sizes
    };
    println!("conn limit {CONN_LIMIT_DEFAULT}, start degree {WARM_DEGREE}, loss 1%, one-way delay 5-50 ms, route delay 100 ms");
    println!("| N | join known everywhere | failure routed around | steady bytes/peer/min | bytes/peer per change | router memory | largest message | wall clock | peak RSS |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for n in sizes {
        let wall = Instant::now();
        let start = Instant::now();
        let options = SimOptions {
            peers: n,
            seed: 1,
            one_way_delay_min: Duration::from_millis(5),
            one_way_delay_mean: Duration::from_millis(50),
            loss: 0.01,
            check: false,
            bootstrap: Bootstrap::Warm {
                degree: WARM_DEGREE,
            },
            router: RouterConfig {
                route_delay: Duration::from_millis(100),
                // IPAM idle, so the table measures topology gossip. With the default
                // consensus bootstrap every router floods its IPAM state at the first route
                // computation (N = 200: 156,000 messages, 359 MB within 100 ms): an IPAM
                // issue, not a gossip one.
                ipam: IpamConfig {
                    init: if std::env::var_os("SIM_IPAM_CONSENSUS").is_some() {
                        Init::Consensus(3)
                    } else {
                        Init::Observer
                    },
                    ..IpamConfig::default()
                },
                ..RouterConfig::default()
            },
            ..SimOptions::default()
        };
        let mut sim = Sim::new(options, start);
        let phase = |sim: &Sim, what: &str| {
            eprintln!(
                "N={n} {what}: {:.0} s wall, peak RSS {:.0} MiB, live heap {:.0} MiB, {} queued, {} messages, {} connections",
                wall.elapsed().as_secs_f64(),
                peak_rss_mib(),
                LIVE.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
                sim.queued(),
                sim.stats().messages,
                sim.stats().connections
            );
        };
        phase(&sim, "warm");
        // Settle, then measure a minute of steady state.
        sim.run_for(Duration::from_secs(30)).expect("no checks");
        let b0 = sim.stats().bytes;
        sim.run_for(Duration::from_secs(60)).expect("no checks");
        let steady = (sim.stats().bytes - b0) as f64 / n as f64;
        phase(&sim, "steady");
        eprintln!(
            "N={n} bytes by kind since the start: {:?}",
            sim.stats().bytes_by_kind
        );

        // (a) A new peer joins through one existing peer.
        let b1 = sim.stats().bytes;
        let kinds_before = sim.stats().bytes_by_kind.clone();
        let x = sim.add_peer(&[n / 2]);
        let xn = sim.name(x);
        let join = time_until(&mut sim, Duration::from_secs(120), |s| {
            s.routers().all(|(_, r)| r.routes().reaches(r.name(), xn))
        });
        sim.run_for(Duration::from_secs(5)).expect("no checks");
        let per_change = (sim.stats().bytes - b1) as f64 / n as f64;
        phase(&sim, "joined");
        let kinds: Vec<String> = sim
            .stats()
            .bytes_by_kind
            .iter()
            .map(|(k, v)| format!("{k} {}", v - kinds_before.get(k).copied().unwrap_or(0)))
            .collect();
        eprintln!(
            "N={n} bytes to spread the join, by kind: {}",
            kinds.join(", ")
        );

        // (b) A peer crashes; routes must avoid it everywhere.
        let f = n / 3;
        let fname = sim.name(f);
        sim.crash(f);
        let failure = time_until(&mut sim, Duration::from_secs(120), |s| {
            s.routers()
                .all(|(_, r)| !r.routes_pending() && !r.routes().unicast.contains_key(&fname))
        });
        phase(&sim, "failed");
        let memory = router_bytes(&sim, start);
        println!(
            "| {n} | {} | {} | {:.0} | {:.0} | {:.2} MiB | {} B | {:.1} s | {:.0} MiB |",
            fmt_time(join),
            fmt_time(failure),
            steady,
            per_change,
            memory as f64 / (1 << 20) as f64,
            sim.stats().message_bytes_largest,
            wall.elapsed().as_secs_f64(),
            peak_rss_mib()
        );
    }
}
