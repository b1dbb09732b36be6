//! The CNI plugin: `meshctl` run under the name `meshnet` (a link to the binary) by a container
//! runtime, which passes the command in `CNI_COMMAND` and the other parameters in `CNI_*`
//! variables, and the network configuration as JSON on stdin.
//!
//! Heads up: read the CNI specification 1.0.0 (SPEC.md of containernetworking/cni, "Execution
//! Protocol", "Result Types" and "Error") before changing this file. Results come in the shape of
//! the `cniVersion` the configuration asks for: 1.0.0, or 0.4.0 / 0.3.x, where each IP also carries
//! `"version": "4"`. Errors go to stdout as `{cniVersion, code, msg, details}` with exit status 1.
//!
//! What each command does, through the router's local API (so the router stays the only owner of
//! IPAM and names, and the bridge is the same one `meshctl attach` uses):
//! - ADD: `/attach` with the IPAM key `cni:CONTAINERID:IFNAME`; the address comes from the mesh
//!   IPAM (the default subnet, or `"subnet"` from the configuration). ADD again for the same
//!   container and interface fails with code 100 and leaves the first attachment alone.
//! - DEL: `/detach` with the same key: removes the veth and releases the address. Idempotent: a
//!   missing interface or namespace is not an error.
//! - CHECK: the interface exists in the namespace and holds every address of `prevResult`.
//! - VERSION: the versions we speak; needs no router.
//!
//! The router is found through the `socket` key of the configuration, else `MESHCTL_SOCKET`, else
//! `MESHCTL_STATE_DIR/meshctl.sock`, else the default socket. The plugin is short-lived and
//! blocking; its one async call runs on a current-thread runtime (netavark#429: no async netlink).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use hyper::Method;
use serde_json::{json, Value};

use crate::api::types::{AttachRequest, AttachResponse, DetachRequest};

/// The name the binary is called by to act as a CNI plugin.
pub(crate) const PLUGIN_NAME: &str = "meshnet";
/// Versions we accept in `cniVersion` and list for VERSION.
const VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// How long ADD waits for an address (IPAM bootstrap) before failing with code 11.
const ALLOC_WAIT_SECS: u64 = 30;

/// A CNI error: one of the spec's codes (1-7, 11) or ours (100 and up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CniError {
    code: u32,
    msg: String,
    details: String,
}

/// Codes from the spec's table of well-known error codes, and ours.
mod code {
    pub(super) const INCOMPATIBLE_VERSION: u32 = 1;
    pub(super) const UNSUPPORTED_FIELD: u32 = 2;
    pub(super) const INVALID_ENV: u32 = 4;
    pub(super) const DECODE: u32 = 6;
    pub(super) const INVALID_CONFIG: u32 = 7;
    pub(super) const TRY_AGAIN_LATER: u32 = 11;
    /// The router refused or failed the request.
    pub(super) const ROUTER: u32 = 100;
    /// CHECK found the container's network not as ADD left it.
    pub(super) const CHECK_FAILED: u32 = 101;
}

fn err(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError {
        code,
        msg: msg.into(),
        details: details.into(),
    }
}

/// The network configuration fields we read; others are ignored, as the spec asks.
#[derive(Debug, Clone)]
struct NetConf {
    cni_version: String,
    socket: Option<PathBuf>,
    subnet: Option<String>,
    prev_result: Option<Value>,
}

impl NetConf {
    fn parse(text: &str) -> Result<NetConf, CniError> {
        let v: Value = serde_json::from_str(text).map_err(|e| {
            err(
                code::DECODE,
                "cannot decode the network configuration",
                e.to_string(),
            )
        })?;
        let field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let cni_version = field("cniVersion").ok_or_else(|| {
            err(
                code::INVALID_CONFIG,
                "the network configuration has no cniVersion",
                "",
            )
        })?;
        if !VERSIONS.contains(&cni_version.as_str()) {
            return Err(err(
                code::INCOMPATIBLE_VERSION,
                format!("meshnet does not speak CNI version {cni_version}"),
                format!("supported: {}", VERSIONS.join(", ")),
            ));
        }
        if field("name").is_none() {
            return Err(err(
                code::INVALID_CONFIG,
                "the network configuration has no name",
                "",
            ));
        }
        if v.get("ipam").is_some_and(|i| !i.is_null()) {
            return Err(err(
                code::UNSUPPORTED_FIELD,
                "meshnet allocates addresses from the mesh IPAM; remove the \"ipam\" section",
                "use \"subnet\": \"CIDR\" to allocate from an isolated subnet",
            ));
        }
        Ok(NetConf {
            cni_version,
            socket: field("socket").map(PathBuf::from),
            subnet: field("subnet"),
            prev_result: v.get("prevResult").cloned(),
        })
    }

    /// The router's API socket: config, then the environment, then the default.
    fn socket(&self, env: &BTreeMap<String, String>) -> PathBuf {
        if let Some(s) = &self.socket {
            return s.clone();
        }
        if let Some(s) = env.get("MESHCTL_SOCKET").filter(|s| !s.is_empty()) {
            return PathBuf::from(s);
        }
        if let Some(d) = env.get("MESHCTL_STATE_DIR").filter(|s| !s.is_empty()) {
            return PathBuf::from(d).join("meshctl.sock");
        }
        PathBuf::from(crate::cli::SOCKET_DEFAULT)
    }
}

/// Entry point when called as `meshnet`: reads the environment and stdin, prints the result or
/// the error, and exits 0 or 1.
pub(crate) fn main() -> ExitCode {
    let env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("CNI_") || k.starts_with("MESHCTL_"))
        .collect();
    let mut stdin = String::new();
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let (version, outcome) = run(&env, &stdin);
    match outcome {
        Ok(Some(result)) => {
            println!("{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            println!(
                "{}",
                json!({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details})
            );
            ExitCode::FAILURE
        }
    }
}

/// Runs one command; returns the cniVersion to answer in and the JSON to print, if any.
fn run(env: &BTreeMap<String, String>, stdin: &str) -> (String, Result<Option<Value>, CniError>) {
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    if command == "VERSION" {
        let asked = serde_json::from_str::<Value>(stdin)
            .ok()
            .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
            .filter(|v| VERSIONS.contains(&v.as_str()))
            .unwrap_or_else(|| "1.0.0".to_string());
        let answer = json!({"cniVersion": asked, "supportedVersions": VERSIONS});
        return (asked, Ok(Some(answer)));
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => return ("1.0.0".to_string(), Err(e)),
    };
    let version = conf.cni_version.clone();
    let outcome = match command {
        "ADD" => add(env, &conf).map(Some),
        "DEL" => del(env, &conf).map(|()| None),
        "CHECK" => check(env, &conf).map(|()| None),
        "" => Err(err(
            code::INVALID_ENV,
            "CNI_COMMAND is not set",
            "meshnet is a CNI plugin; run `meshctl` for the command line",
        )),
        other => Err(err(
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND {other:?}"),
            "expected ADD, DEL, CHECK or VERSION",
        )),
    };
    (version, outcome)
}

fn required<'a>(env: &'a BTreeMap<String, String>, key: &str) -> Result<&'a str, CniError> {
    env.get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| err(code::INVALID_ENV, format!("{key} is not set"), ""))
}

/// The IPAM key of one interface of one container.
fn ipam_key(container: &str, ifname: &str) -> String {
    format!("cni:{container}:{ifname}")
}

/// Calls the router's API on a current-thread runtime.
fn call<B: serde::Serialize, R: serde::de::DeserializeOwned>(
    socket: &std::path::Path,
    path: &str,
    body: &B,
) -> Result<R, CniError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| err(code::ROUTER, "cannot start a runtime", e.to_string()))?;
    runtime
        .block_on(crate::api::client::call(
            socket,
            Method::POST,
            path,
            Some(body),
        ))
        .map_err(|e| {
            let text = format!("{e:#}");
            if !socket.exists()
                || text.contains("no router is running")
                || text.contains("no address")
            {
                err(
                    code::TRY_AGAIN_LATER,
                    format!("the mesh router is not ready ({})", socket.display()),
                    text,
                )
            } else {
                err(
                    code::ROUTER,
                    format!("the mesh router refused {path}"),
                    text,
                )
            }
        })
}

fn add(env: &BTreeMap<String, String>, conf: &NetConf) -> Result<Value, CniError> {
    let container = required(env, "CNI_CONTAINERID")?;
    let netns = required(env, "CNI_NETNS")?;
    let ifname = required(env, "CNI_IFNAME")?;
    if !netns.starts_with('/') {
        return Err(err(
            code::INVALID_ENV,
            format!("CNI_NETNS must be an absolute path, got {netns:?}"),
            "",
        ));
    }
    let req = AttachRequest {
        netns: netns.to_string(),
        ifname: ifname.to_string(),
        ips: conf.subnet.iter().map(|s| format!("net:{s}")).collect(),
        container: None,
        wait_secs: Some(ALLOC_WAIT_SECS),
        name: None,
        key: Some(ipam_key(container, ifname)),
        // What `meshctl ps` shows for it.
        label: Some(format!(
            "cni:{}",
            container.chars().take(12).collect::<String>()
        )),
    };
    let r: AttachResponse = call(&conf.socket(env), "/attach", &req)?;
    Ok(result(&conf.cni_version, netns, &r))
}

/// The ADD result in the shape of `version`.
fn result(version: &str, netns: &str, r: &AttachResponse) -> Value {
    let old = version != "1.0.0";
    let ips: Vec<Value> = r
        .ips
        .iter()
        .map(|cidr| {
            let mut ip = json!({"address": cidr, "interface": 1});
            if old {
                let v = if cidr.contains(':') { "6" } else { "4" };
                ip["version"] = json!(v);
            }
            ip
        })
        .collect();
    json!({
        "cniVersion": version,
        "interfaces": [
            {"name": r.host_ifname},
            {"name": r.ifname, "mac": r.mac, "sandbox": netns},
        ],
        "ips": ips,
        "dns": {},
    })
}

fn del(env: &BTreeMap<String, String>, conf: &NetConf) -> Result<(), CniError> {
    let container = required(env, "CNI_CONTAINERID")?;
    let ifname = required(env, "CNI_IFNAME")?;
    // The namespace may be gone already: DEL must still release the address.
    let netns = env.get("CNI_NETNS").cloned().unwrap_or_default();
    let req = DetachRequest {
        netns,
        ifname: ifname.to_string(),
        container: None,
        name: None,
        key: Some(ipam_key(container, ifname)),
    };
    call::<_, ()>(&conf.socket(env), "/detach", &req)
}

fn check(env: &BTreeMap<String, String>, conf: &NetConf) -> Result<(), CniError> {
    required(env, "CNI_CONTAINERID")?;
    let netns = required(env, "CNI_NETNS")?.to_string();
    let ifname = required(env, "CNI_IFNAME")?.to_string();
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        err(
            code::INVALID_CONFIG,
            "CHECK needs prevResult in the network configuration",
            "",
        )
    })?;
    let wanted: Vec<String> = prev["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str().map(str::to_string))
        .collect();
    if wanted.is_empty() {
        return Err(err(
            code::INVALID_CONFIG,
            "prevResult lists no IP addresses",
            "",
        ));
    }
    // The router must still be there to keep the container on the mesh.
    let _: crate::api::types::Status = {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| err(code::ROUTER, "cannot start a runtime", e.to_string()))?;
        runtime
            .block_on(crate::api::client::call::<(), _>(
                &conf.socket(env),
                Method::GET,
                "/status",
                None,
            ))
            .map_err(|e| {
                err(
                    code::CHECK_FAILED,
                    "the mesh router does not answer",
                    format!("{e:#}"),
                )
            })?
    };
    let have = addresses_in(&netns, &ifname)?;
    for cidr in &wanted {
        if !have.contains(cidr) {
            return Err(err(
                code::CHECK_FAILED,
                format!("{ifname} in {netns} lacks {cidr}"),
                format!("it has: {}", have.join(" ")),
            ));
        }
    }
    Ok(())
}

/// The addresses (`ADDR/PREFIX`) of `ifname` in the namespace at `netns`, read on a thread that
/// joined it (the process itself never changes namespace).
fn addresses_in(netns: &str, ifname: &str) -> Result<Vec<String>, CniError> {
    let file = std::fs::File::open(netns).map_err(|e| {
        err(
            code::CHECK_FAILED,
            format!("cannot open network namespace {netns}"),
            e.to_string(),
        )
    })?;
    let name = ifname.to_string();
    let found = std::thread::spawn(move || -> Result<Option<Vec<String>>, String> {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("join network namespace: {e}"))?;
        let mut exists = false;
        let mut out = Vec::new();
        for a in nix::ifaddrs::getifaddrs().map_err(|e| format!("list addresses: {e}"))? {
            if a.interface_name != name {
                continue;
            }
            exists = true;
            let (Some(addr), Some(mask)) = (a.address, a.netmask) else {
                continue;
            };
            if let (Some(ip), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
                let prefix = u32::from(m.ip()).count_ones();
                out.push(format!("{}/{prefix}", ip.ip()));
            } else if let (Some(ip), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
                let prefix = u128::from(m.ip()).count_ones();
                out.push(format!("{}/{prefix}", ip.ip()));
            }
        }
        Ok(exists.then_some(out))
    })
    .join()
    .map_err(|_| err(code::CHECK_FAILED, "reading the namespace failed", ""))?
    .map_err(|e| err(code::CHECK_FAILED, e, ""))?;
    found.ok_or_else(|| {
        err(
            code::CHECK_FAILED,
            format!("no interface {ifname} in {netns}"),
            "",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn version_lists_what_we_speak_without_a_router() {
        let (v, out) = run(&env(&[("CNI_COMMAND", "VERSION")]), "");
        assert_eq!(v, "1.0.0");
        let out = out.unwrap().unwrap();
        assert_eq!(out["supportedVersions"][3], "1.0.0");
        let (v, _) = run(
            &env(&[("CNI_COMMAND", "VERSION")]),
            r#"{"cniVersion":"0.4.0"}"#,
        );
        assert_eq!(v, "0.4.0");
    }

    #[test]
    fn bad_configurations_get_the_spec_codes() {
        let add = env(&[("CNI_COMMAND", "ADD")]);
        let code_of = |stdin: &str| run(&add, stdin).1.unwrap_err().code;
        assert_eq!(code_of("{not json"), code::DECODE);
        assert_eq!(code_of(r#"{"name":"n"}"#), code::INVALID_CONFIG);
        assert_eq!(
            code_of(r#"{"cniVersion":"9.9.9","name":"n"}"#),
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(
            code_of(r#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"host-local"}}"#),
            code::UNSUPPORTED_FIELD
        );
        assert_eq!(
            code_of(r#"{"cniVersion":"1.0.0","name":"n"}"#),
            code::INVALID_ENV,
            "ADD without CNI_CONTAINERID"
        );
        let (_, out) = run(&env(&[]), r#"{"cniVersion":"1.0.0","name":"n"}"#);
        assert_eq!(out.unwrap_err().code, code::INVALID_ENV);
    }

    #[test]
    fn socket_comes_from_config_then_environment_then_default() {
        let mut conf = NetConf::parse(r#"{"cniVersion":"1.0.0","name":"n"}"#).unwrap();
        assert_eq!(
            conf.socket(&env(&[])),
            PathBuf::from(crate::cli::SOCKET_DEFAULT)
        );
        assert_eq!(
            conf.socket(&env(&[("MESHCTL_STATE_DIR", "/s")])),
            PathBuf::from("/s/meshctl.sock")
        );
        assert_eq!(
            conf.socket(&env(&[
                ("MESHCTL_STATE_DIR", "/s"),
                ("MESHCTL_SOCKET", "/x.sock")
            ])),
            PathBuf::from("/x.sock")
        );
        conf.socket = Some(PathBuf::from("/c.sock"));
        assert_eq!(
            conf.socket(&env(&[("MESHCTL_SOCKET", "/x.sock")])),
            PathBuf::from("/c.sock")
        );
    }

    #[test]
    fn results_take_the_shape_of_the_asked_version() {
        let r = AttachResponse {
            host_ifname: "mc12345678".into(),
            ifname: "eth0".into(),
            mac: "aa:bb:cc:dd:ee:ff".into(),
            ips: vec!["10.32.0.5/12".into()],
        };
        let new = result("1.0.0", "/run/netns/x", &r);
        assert_eq!(new["ips"][0]["address"], "10.32.0.5/12");
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["interfaces"][1]["sandbox"], "/run/netns/x");
        let old = result("0.4.0", "/run/netns/x", &r);
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["cniVersion"], "0.4.0");
    }
}
