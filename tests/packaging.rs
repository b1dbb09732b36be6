//! What a distribution packager installs is generated from the CLI definition and works: shell
//! completions, the man page and the systemd unit in examples/systemd.
//!
//! No namespaces and no root: these run the built binary and, where installed, the tools that
//! consume its output (bash, zsh, fish, groff, systemd-analyze); a missing tool skips that check
//! with a printed reason.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn meshctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .output()
        .expect("run the meshctl binary")
}

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("SKIP part of this test: {tool} is not installed");
    }
    found
}

/// Runs `tool ARGS` with `input` on stdin.
fn feed(tool: &str, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input)
        .expect("write to the tool");
    child.wait_with_output().expect("wait for the tool")
}

/// A scratch directory removed on drop (also when an assertion fails).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("st-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Goal: `meshctl completions SHELL` prints a script that completes every subcommand, and the
/// shell accepts it. Method: generate for every shell clap knows; parse-check with the shell
/// itself where it is installed.
#[test]
fn completions_name_every_subcommand_and_parse_in_their_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = meshctl(&["completions", shell]);
        assert!(out.status.success(), "completions {shell}: {out:?}");
        let script = String::from_utf8(out.stdout).expect("completions are UTF-8");
        for word in [
            "launch",
            "status",
            "report",
            "attach",
            "ipam",
            "completions",
        ] {
            assert!(
                script.contains(word),
                "{shell} completion lacks {word}:\n{script}"
            );
        }
        let check: Option<(&str, Vec<&str>)> = match shell {
            "bash" => Some(("bash", vec!["-n"])),
            "zsh" => Some(("zsh", vec!["-n"])),
            "fish" => Some(("fish", vec!["--no-execute"])),
            _ => None,
        };
        if let Some((tool, args)) = check {
            if have(tool) {
                let out = feed(tool, &args, script.as_bytes());
                assert!(
                    out.status.success(),
                    "{tool} rejects the completion script: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    let out = meshctl(&["completions", "tcsh"]);
    assert!(!out.status.success(), "an unknown shell must be an error");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tcsh"),
        "the error names the shell: {out:?}"
    );
}

/// Goal: `meshctl man` prints a section 1 manual page that documents the subcommands and renders
/// without warnings. Method: check its roff header and content; render it with groff `-ww`.
#[test]
fn man_page_documents_the_subcommands_and_renders_cleanly() {
    let out = meshctl(&["man"]);
    assert!(out.status.success(), "{out:?}");
    let page = String::from_utf8(out.stdout).expect("the man page is UTF-8");
    assert!(
        page.contains(".TH meshctl 1"),
        "not a section 1 page:\n{page}"
    );
    for word in ["launch", "status", "report", "attach", "SUBCOMMANDS"] {
        assert!(page.contains(word), "the man page lacks {word}:\n{page}");
    }
    if have("groff") {
        let out = feed("groff", &["-man", "-Tutf8", "-ww", "-z"], page.as_bytes());
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && warnings.trim().is_empty(),
            "groff warns about the man page:\n{warnings}"
        );
    }
}

/// Goal: the shipped systemd unit is valid and its commands are ones meshctl accepts. Method:
/// point the unit at the built binary in a scratch copy and run `systemd-analyze verify`; run
/// the binary with `--help` after each command line's arguments to show clap accepts them.
#[test]
fn systemd_unit_verifies_and_runs_commands_meshctl_accepts() {
    let unit_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/systemd/meshctl.service");
    let unit = std::fs::read_to_string(&unit_path).expect("read examples/systemd/meshctl.service");
    let bin = env!("CARGO_BIN_EXE_meshctl");
    for key in ["ExecStart=", "ExecStop="] {
        let line = unit
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("the unit has no {key}"));
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some("/usr/local/bin/meshctl"), "{key}{line}");
        // `$MESHCTL_PEERS` expands to zero or more peers; try one.
        let args: Vec<&str> = words
            .map(|w| {
                if w == "$MESHCTL_PEERS" {
                    "192.0.2.10"
                } else {
                    w
                }
            })
            .collect();
        let out = Command::new(bin)
            .args(&args)
            .arg("--help")
            .output()
            .expect("run meshctl");
        assert!(
            out.status.success(),
            "meshctl rejects the unit's {key}{line}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        unit.contains("Documentation=man:meshctl(1)"),
        "the unit points at the man page"
    );
    if !have("systemd-analyze") {
        return;
    }
    let scratch = Scratch::new("unit");
    let copy = scratch.0.join("meshctl.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/meshctl", bin)).expect("write unit copy");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("meshctl.service:"),
        "systemd-analyze verify complains about the unit:\n{stderr}"
    );
}
