//! The target list survives a restart: `launch --resume` dials the targets given earlier, both
//! on the command line and later with `meshctl connect`.
//!
//! ```text
//!   [ gsa ]        [ gsb ]        [ gsc ]
//!   launch         launch --no-discovery gsa;  then `meshctl connect gsc`
//!      |              |              |         kill -9 gsb; launch --resume --no-discovery
//!   ==================================
//!          switch (10.250.k.0/24)
//! ```
//! gsa and gsc don't know each other, and gsb runs without discovery, so gsb can only reach
//! both again if it saved both addresses. Asserts what a user sees: `status --json` of gsb
//! lists gsa and gsc as reachable, before and after the restart.

mod common;

use common::lab::{self, Host, Lab};
use std::collections::BTreeSet;
use std::time::Duration;

fn sees(h: &Host, want: &BTreeSet<String>) -> bool {
    wait_reachable(h, want, Duration::from_secs(30))
}

fn wait_reachable(h: &Host, want: &BTreeSet<String>, max: Duration) -> bool {
    lab::wait_for(max, || lab::reachable_nicknames(&h.status_json()) == *want)
}

#[test]
fn resumed_router_reconnects_to_targets_given_before_the_restart() {
    if lab::skip_unless_root("resumed_router_reconnects_to_targets_given_before_the_restart") {
        return;
    }
    let lab = Lab::new();
    let (a, b, c) = (lab.host("gsa"), lab.host("gsb"), lab.host("gsc"));
    let addrs = lab.switch(&[&a, &b, &c]);
    let (addr_a, addr_c) = (addrs[0].to_string(), addrs[2].to_string());
    a.launch(&[]);
    c.launch(&[]);
    b.launch(&["--no-discovery", &addr_a]);
    let (ok, out, err) = b.meshctl(&["connect", &addr_c]);
    assert!(ok.success(), "meshctl connect: {out} {err}");
    let both: BTreeSet<String> = ["gsa", "gsc"].map(str::to_owned).into();
    assert!(
        sees(&b, &both),
        "before the restart gsb sees {:?}\nlog:\n{}",
        lab::reachable_nicknames(&b.status_json()),
        b.log_tail(30)
    );

    b.kill9();
    b.launch(&["--resume", "--no-discovery"]);

    assert!(
        sees(&b, &both),
        "after `launch --resume` gsb sees {:?}\nlog:\n{}",
        lab::reachable_nicknames(&b.status_json()),
        b.log_tail(30)
    );
}
