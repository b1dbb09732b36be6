//! Twenty real routers on one switch form a mesh by discovery from a single seed, and
//! reconverge after five of them are killed with SIGKILL.
//!
//! ```text
//!   [ h0 ] [ h1 ] [ h2 ] ... [ h19 ]      h0: `launch`
//!     |      |      |           |         hK: `launch h0`   (one seed address; discovery
//!   ==================================        and the connection limit do the rest)
//!              switch (10.250.k.0/24)
//! ```
//! Asserts what a user sees: every `meshctl status --json` lists 19 reachable peers; after
//! `kill -9` of five routers, every survivor shows those five unreachable or gone, and the
//! other 14 still reachable, within a deadline. Prints each router's RSS.

mod common;

use common::lab::{self, Host, Lab};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const ROUTERS: usize = 20;
const KILLED: usize = 5;
/// Transport idle timeout (6 s) plus gossip and route computation, with room for a busy CI.
const RECONVERGE_MAX: Duration = Duration::from_secs(30);

fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn all_see(hosts: &[&Host], expected: impl Fn(&Host) -> BTreeSet<String>) -> bool {
    hosts
        .iter()
        .all(|h| lab::reachable_nicknames(&h.status_json()) == expected(h))
}

#[test]
fn twenty_routers_converge_from_one_seed_and_route_around_five_killed() {
    if lab::skip_unless_root("twenty_routers_converge_from_one_seed_and_route_around_five_killed") {
        return;
    }
    let lab = Lab::new();
    let hosts: Vec<Host> = (0..ROUTERS).map(|i| lab.host(&format!("h{i}"))).collect();
    let refs: Vec<&Host> = hosts.iter().collect();
    let addrs = lab.switch(&refs);
    let started = Instant::now();
    hosts[0].launch(&[]);
    let seed = addrs[0].to_string();
    for h in &hosts[1..] {
        h.launch(&[&seed]);
    }
    let names: BTreeSet<String> = hosts.iter().map(|h| h.name.clone()).collect();
    let others = |h: &Host, alive: &BTreeSet<String>| -> BTreeSet<String> {
        alive.iter().filter(|n| **n != h.name).cloned().collect()
    };
    let converged = lab::wait_for(Duration::from_secs(40), || {
        all_see(&refs, |h| others(h, &names))
    });
    let report: Vec<String> = hosts
        .iter()
        .map(|h| {
            format!(
                "{}: {:?}",
                h.name,
                lab::reachable_nicknames(&h.status_json()).len()
            )
        })
        .collect();
    assert!(
        converged,
        "not every router shows {} reachable peers: {report:?}\nh1 log:\n{}",
        ROUTERS - 1,
        hosts[1].log_tail(30)
    );
    let formed = started.elapsed();
    let rss: Vec<u64> = hosts
        .iter()
        .filter_map(|h| h.daemon_pid().and_then(rss_kib))
        .collect();
    eprintln!(
        "{ROUTERS} routers converged {:.1}s after the first launch; RSS KiB min {} max {} mean {}",
        formed.as_secs_f64(),
        rss.iter().min().copied().unwrap_or(0),
        rss.iter().max().copied().unwrap_or(0),
        rss.iter().sum::<u64>() / rss.len().max(1) as u64
    );

    // Kill five (not the seed: the survivors must not depend on it either way).
    let (survivors, victims) = hosts.split_at(ROUTERS - KILLED);
    let killed_at = Instant::now();
    for v in victims {
        v.kill9();
    }
    let alive: BTreeSet<String> = survivors.iter().map(|h| h.name.clone()).collect();
    let survivor_refs: Vec<&Host> = survivors.iter().collect();
    let reconverged = lab::wait_for(RECONVERGE_MAX, || {
        all_see(&survivor_refs, |h| others(h, &alive))
    });
    let report: Vec<String> = survivors
        .iter()
        .map(|h| {
            format!(
                "{}: {:?}",
                h.name,
                lab::reachable_nicknames(&h.status_json())
            )
        })
        .collect();
    assert!(
        reconverged,
        "survivors still see killed routers (or lost live ones) after {}s: {report:#?}",
        RECONVERGE_MAX.as_secs()
    );
    eprintln!(
        "{} survivors routed around {KILLED} killed routers in {:.1}s",
        survivors.len(),
        killed_at.elapsed().as_secs_f64()
    );
}
