//! Keeps the host firewall from dropping traffic that crosses the mesh bridge.
//!
//! With `br_netfilter` loaded (Docker loads it and sets `net.bridge.bridge-nf-call-iptables=1`), frames
//! bridged between a container's veth and our TAP or VXLAN port pass the iptables FORWARD chain as
//! `-i BRIDGE -o BRIDGE`, and Docker sets that chain's policy to DROP. We insert one rule per address
//! family and per iptables backend that has a filter table in use (nft-based `iptables` and
//! `iptables-legacy` can both hold rules on one host):
//!
//! `-I FORWARD 1 -i BRIDGE -o BRIDGE -m comment --comment "meshctl bridge BRIDGE" -j ACCEPT`
//!
//! and delete exactly that rule on stop. Nothing else is touched.
//!
//! This runs the `iptables` programs: xtables rules have no stable netlink interface (the nft backend
//! stores them as compat expressions, the legacy one needs the binary ABI of the iptables release), so
//! the programs are the supported way, as Docker and Kubernetes use them. (`ip` is never run: links
//! and addresses go through rtnetlink.)

use std::path::Path;
use std::process::Command;

/// The iptables programs we look at, each for one backend and family.
const PROGRAMS: [&str; 4] = [
    "iptables",
    "ip6tables",
    "iptables-legacy",
    "ip6tables-legacy",
];

/// Rules this router inserted, to delete on stop.
#[derive(Debug, Default)]
pub(crate) struct BridgeRules {
    bridge: String,
    installed: Vec<&'static str>,
}

impl BridgeRules {
    /// Inserts the ACCEPT rule wherever bridged traffic is filtered. Never fails the launch: a program
    /// that is missing or refuses is logged and skipped.
    pub(crate) fn install(bridge: &str) -> BridgeRules {
        let mut rules = BridgeRules {
            bridge: bridge.to_string(),
            installed: Vec::new(),
        };
        if !bridge_netfilter_active() {
            tracing::debug!("br_netfilter is not active here; no firewall rules needed");
            return rules;
        }
        let found = PROGRAMS
            .iter()
            .any(|p| Command::new(p).arg("--version").output().is_ok());
        if !found {
            tracing::warn!(
                "bridged traffic passes iptables here (br_netfilter) but no iptables program was found; \
                 if FORWARD drops by default (Docker does), add on the host: \
                 iptables -I FORWARD 1 -i {bridge} -o {bridge} -j ACCEPT"
            );
        }
        for program in PROGRAMS {
            if !in_use(program) {
                continue;
            }
            let spec = rule_spec(bridge);
            if run(program, "-C", &spec).is_ok() {
                rules.installed.push(program);
                continue;
            }
            match run(program, "-I", &spec) {
                Ok(()) => {
                    tracing::info!("{program}: accepting forwarded traffic on bridge {bridge}");
                    rules.installed.push(program);
                }
                Err(e) => tracing::warn!(
                    "{program}: could not add the FORWARD rule for bridge {bridge} ({e}); \
                     if this host filters bridged traffic, containers on the mesh can't talk"
                ),
            }
        }
        rules
    }

    /// Deletes the rules `install` inserted; returns what went wrong, if anything.
    pub(crate) fn remove(&mut self) -> Vec<String> {
        let spec = rule_spec(&self.bridge);
        let mut problems = Vec::new();
        for program in self.installed.drain(..) {
            // Delete every copy (an earlier router that died by kill -9 may have left one).
            while run(program, "-C", &spec).is_ok() {
                if let Err(e) = run(program, "-D", &spec) {
                    problems.push(format!("{program} -D FORWARD: {e}"));
                    break;
                }
            }
        }
        problems
    }
}

/// Adds (`add`) or removes the masquerading rule for an exposed subnet: traffic from `net` that
/// leaves the host through anything but the bridge gets the host's address.
/// `-t nat POSTROUTING -s NET ! -d NET ! -o BRIDGE -m comment --comment "meshctl expose BRIDGE" -j MASQUERADE`
pub(crate) fn masquerade(net: &str, ipv6: bool, bridge: &str, add: bool) -> Result<(), String> {
    let program = if ipv6 { "ip6tables" } else { "iptables" };
    let comment = format!("meshctl expose {bridge}");
    let spec: Vec<String> = [
        "POSTROUTING",
        "-s",
        net,
        "!",
        "-d",
        net,
        "!",
        "-o",
        bridge,
        "-m",
        "comment",
        "--comment",
        &comment,
        "-j",
        "MASQUERADE",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let nat = |op: &str| {
        let mut args = vec!["-t".to_string(), "nat".to_string()];
        args.extend(command_args(op, &spec));
        let out = Command::new(program).args(&args).output().map_err(|e| {
            format!("run {program} (install iptables to masquerade exposed traffic): {e}")
        })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    };
    let present = nat("-C").is_ok();
    match (add, present) {
        (true, false) => nat("-A").map_err(|e| format!("{program} -t nat -A POSTROUTING: {e}")),
        (false, true) => {
            while nat("-C").is_ok() {
                nat("-D").map_err(|e| format!("{program} -t nat -D POSTROUTING: {e}"))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Whether bridged IPv4 traffic is passed to iptables in this network namespace.
fn bridge_netfilter_active() -> bool {
    let path = Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables");
    std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1")
}

/// True if the program exists and its filter table has a FORWARD chain that isn't simply empty with
/// policy ACCEPT (listing never creates tables on the legacy backend; on nft it reads only).
fn in_use(program: &str) -> bool {
    let Ok(out) = Command::new(program)
        .args(["-w", "5", "-S", "FORWARD"])
        .output()
    else {
        return false;
    };
    if !out.status.success() {
        return false;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .any(|l| l.starts_with("-A ") || (l.starts_with("-P ") && !l.ends_with("ACCEPT")))
}

fn rule_spec(bridge: &str) -> Vec<String> {
    [
        "FORWARD",
        "-i",
        bridge,
        "-o",
        bridge,
        "-m",
        "comment",
        "--comment",
        &format!("meshctl bridge {bridge}"),
        "-j",
        "ACCEPT",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The program's arguments for `op` (-C, -I or -D) on the rule `spec`.
fn command_args(op: &str, spec: &[String]) -> Vec<String> {
    let mut args = vec!["-w".to_string(), "5".to_string(), op.to_string()];
    args.extend_from_slice(spec);
    if op == "-I" {
        // Insert at the top, before Docker's jumps, so its isolation chains can't drop mesh traffic.
        args.insert(4, "1".to_string());
    }
    args
}

fn run(program: &str, op: &str, spec: &[String]) -> Result<(), String> {
    let out = Command::new(program)
        .args(command_args(op, spec))
        .output()
        .map_err(|e| format!("run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_goes_to_the_top_and_check_and_delete_name_the_same_rule() {
        let spec = rule_spec("mesh");
        assert_eq!(&command_args("-I", &spec)[2..5], ["-I", "FORWARD", "1"]);
        let check = command_args("-C", &spec);
        let delete = command_args("-D", &spec);
        assert_eq!(check[3..], delete[3..]);
        assert_eq!(check[3..], spec[..]);
        assert!(spec.contains(&"meshctl bridge mesh".to_string()));
    }
}
