//! `meshctl` as the CNI plugin `meshnet`, run exactly as a container runtime runs it: a link named
//! `meshnet` to the binary, `CNI_*` variables, the network configuration on stdin, the result or
//! the error JSON on stdout. Two hosts, one container each, connected through the mesh.
//!
//! ```text
//!   [ a ] --u1-- [ b ]      routers with the mesh IPAM (consensus=2)
//!    ca           cb        namespaces set up by `meshnet` ADD, cniVersion 1.0.0 on a, 0.4.0 on b
//! ```

mod common;

use common::lab::{self, Host, Lab, WAIT_MAX};
use serde_json::{json, Value};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What one plugin run printed and how it exited.
struct Run {
    ok: bool,
    out: Value,
    text: String,
}

/// Runs `meshnet` inside `host`'s netns with only the given environment and `conf` on stdin.
fn meshnet(plugin: &Path, host: &Host, env: &[(&str, &str)], conf: &Value) -> Run {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &host.netns])
        .arg(plugin)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn meshnet");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("write config");
    let out = child.wait_with_output().expect("wait for meshnet");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Run {
        ok: out.status.success(),
        out: serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        text,
    }
}

fn netns_path(ns: &str) -> String {
    format!("/var/run/netns/{ns}")
}

/// The container's IPv4 addresses on `ifname` as `ADDR/PREFIX`.
fn addrs_of(ns: &str, ifname: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", ns, "-4", "-o", "addr", "show", "dev", ifname])
        .output()
        .expect("run ip");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "inet")
        .map(|w| w[1].to_string())
        .collect()
}

fn allocation_releasing(host: &Host, key: &str) -> Option<bool> {
    let (status, out, _) = host.meshctl(&["ipam", "--json"]);
    if !status.success() {
        return None;
    }
    let v: Value = serde_json::from_str(&out).ok()?;
    v["allocations"]
        .as_array()?
        .iter()
        .find(|a| a["container"] == key)
        .map(|a| a["releasing"] == true)
}

#[test]
fn meshnet_adds_checks_and_deletes_containers_as_a_runtime_calls_it() {
    if lab::skip_unless_root("meshnet_adds_checks_and_deletes_containers_as_a_runtime_calls_it") {
        return;
    }
    let lab = Lab::new();
    let plugin: PathBuf = lab.dir().join("meshnet");
    std::os::unix::fs::symlink(lab::meshctl_bin(), &plugin).expect("link meshnet");
    let (a, b) = (lab.host("a"), lab.host("b"));
    let (a_ip, _) = lab.link(&a, &b);
    a.launch(&["--ipalloc-init", "consensus=2"]);
    b.launch(&["--ipalloc-init", "consensus=2", &a_ip.to_string()]);
    let (ca, cb) = (lab.container(&a), lab.container(&b));
    let (ca_path, cb_path) = (netns_path(&ca.netns), netns_path(&cb.netns));
    let a_dir = a.state_dir.display().to_string();
    let b_socket = b.state_dir.join("meshctl.sock").display().to_string();

    // a: cniVersion 1.0.0, router found through MESHCTL_STATE_DIR.
    let conf_a = json!({"cniVersion": "1.0.0", "name": "dnmesh", "type": "meshnet"});
    let env_a = |cmd: &'static str| {
        vec![
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "dnctr-a"),
            ("CNI_NETNS", ca_path.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            ("MESHCTL_STATE_DIR", a_dir.as_str()),
        ]
    };
    let add_a = meshnet(&plugin, &a, &env_a("ADD"), &conf_a);
    assert!(add_a.ok, "ADD on a: {}\n{}", add_a.text, lab.report());
    let r = &add_a.out;
    assert_eq!(r["cniVersion"], "1.0.0", "{r}");
    assert_eq!(r["interfaces"][1]["name"], "eth0", "{r}");
    assert_eq!(r["interfaces"][1]["sandbox"], ca_path.as_str(), "{r}");
    assert!(
        r["ips"][0].get("version").is_none(),
        "1.0.0 has no ip version: {r}"
    );
    let ca_cidr = r["ips"][0]["address"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(addrs_of(&ca.netns, "eth0"), vec![ca_cidr.clone()]);

    // b: cniVersion 0.4.0, router found through the `socket` key (the environment points nowhere).
    let conf_b = json!({"cniVersion": "0.4.0", "name": "dnmesh", "type": "meshnet",
        "socket": b_socket});
    let env_b = |cmd: &'static str| {
        vec![
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "dnctr-b"),
            ("CNI_NETNS", cb_path.as_str()),
            ("CNI_IFNAME", "net1"),
            ("CNI_PATH", "/opt/cni/bin"),
            ("MESHCTL_SOCKET", "/nonexistent/dn.sock"),
        ]
    };
    let add_b = meshnet(&plugin, &b, &env_b("ADD"), &conf_b);
    assert!(add_b.ok, "ADD on b: {}\n{}", add_b.text, lab.report());
    assert_eq!(add_b.out["cniVersion"], "0.4.0");
    assert_eq!(add_b.out["ips"][0]["version"], "4", "{}", add_b.out);
    let cb_cidr = add_b.out["ips"][0]["address"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(addrs_of(&cb.netns, "net1"), vec![cb_cidr.clone()]);
    assert_ne!(ca_cidr, cb_cidr, "IPAM gave one address twice");

    // Across hosts through the mesh.
    let cb_ip: Ipv4Addr = cb_cidr.split('/').next().unwrap().parse().unwrap();
    let ca_ip: Ipv4Addr = ca_cidr.split('/').next().unwrap().parse().unwrap();
    assert!(
        lab::wait_for(WAIT_MAX, || lab::ping(&ca.netns, cb_ip)),
        "ca can't reach cb:\n{}",
        lab.report()
    );
    assert!(lab::ping(&cb.netns, ca_ip), "cb can't reach ca");

    // ADD again: refused with error JSON, the first attachment untouched.
    let again = meshnet(&plugin, &a, &env_a("ADD"), &conf_a);
    assert!(!again.ok, "second ADD succeeded: {}", again.text);
    assert_eq!(again.out["code"], 100, "{}", again.text);
    assert_eq!(again.out["cniVersion"], "1.0.0", "{}", again.text);
    assert!(
        again.out["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        again.text
    );
    assert!(lab::ping(&ca.netns, cb_ip), "second ADD broke ca");

    // CHECK with the ADD result as prevResult passes; with another address it fails.
    let mut check = conf_a.clone();
    check["prevResult"] = add_a.out.clone();
    let ok = meshnet(&plugin, &a, &env_a("CHECK"), &check);
    assert!(ok.ok, "CHECK: {}", ok.text);
    check["prevResult"]["ips"][0]["address"] = json!("10.99.0.1/12");
    let bad = meshnet(&plugin, &a, &env_a("CHECK"), &check);
    assert!(
        !bad.ok && bad.out["code"] == 101,
        "CHECK of a wrong address: {}",
        bad.text
    );

    // VERSION needs no router.
    let v = meshnet(&plugin, &a, &[("CNI_COMMAND", "VERSION")], &conf_a);
    assert!(v.ok, "{}", v.text);
    assert!(
        v.out["supportedVersions"]
            .as_array()
            .is_some_and(|s| s.contains(&json!("0.4.0")) && s.contains(&json!("1.0.0"))),
        "{}",
        v.out
    );

    // Bad input: error JSON with the spec's codes and a non-zero exit.
    let mut garbage = env_a("ADD");
    garbage.retain(|(k, _)| *k != "CNI_NETNS");
    let missing = meshnet(&plugin, &a, &garbage, &conf_a);
    assert!(
        !missing.ok && missing.out["code"] == 4,
        "no CNI_NETNS: {}",
        missing.text
    );
    let old = meshnet(
        &plugin,
        &a,
        &env_a("ADD"),
        &json!({"cniVersion": "0.1.0", "name": "dnmesh", "type": "meshnet"}),
    );
    assert!(
        !old.ok && old.out["code"] == 1,
        "cniVersion 0.1.0: {}",
        old.text
    );
    let no_router = meshnet(
        &plugin,
        &a,
        &env_a("ADD"),
        &json!({"cniVersion": "1.0.0", "name": "dnmesh", "socket": "/nonexistent/dn.sock"}),
    );
    assert!(
        !no_router.ok && no_router.out["code"] == 11,
        "no router: {}",
        no_router.text
    );
    let mut cmd = Command::new(&plugin);
    let decode = cmd
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(b"{not json")?;
            c.wait_with_output()
        })
        .expect("run meshnet");
    let out: Value = serde_json::from_slice(&decode.stdout).unwrap_or(Value::Null);
    assert!(
        decode.status.code() == Some(1) && out["code"] == 6 && out["msg"].is_string(),
        "undecodable config: {out}"
    );

    // DEL removes the interface and releases the address; DEL again (also without a netns,
    // as after the container is gone) succeeds.
    let del = meshnet(&plugin, &a, &env_a("DEL"), &conf_a);
    assert!(del.ok && del.text.trim().is_empty(), "DEL: {}", del.text);
    assert!(addrs_of(&ca.netns, "eth0").is_empty(), "eth0 left in ca");
    assert_eq!(
        allocation_releasing(&a, "cni:dnctr-a:eth0"),
        Some(true),
        "DEL didn't release the address"
    );
    let del2 = meshnet(&plugin, &a, &env_a("DEL"), &conf_a);
    assert!(del2.ok, "second DEL: {}", del2.text);
    let mut gone = env_b("DEL");
    gone.retain(|(k, _)| *k != "CNI_NETNS");
    let del3 = meshnet(&plugin, &b, &gone, &conf_b);
    assert!(del3.ok, "DEL without CNI_NETNS: {}", del3.text);
    assert!(
        !lab::ping(&ca.netns, cb_ip),
        "ca still on the mesh after DEL"
    );
}
