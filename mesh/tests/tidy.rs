//! Tidy: `mesh/src` stays sans-IO. Fails if any source file mentions a runtime, the clock, an
//! unseeded RNG or a socket (after TigerBeetle's `tidy.zig`). This file may name them.

use std::fs;
use std::path::{Path, PathBuf};

const BANNED: &[&str] = &[
    "tokio",
    "Instant::now",
    "SystemTime::now",
    "thread_rng",
    "OsRng",
    "std::net::UdpSocket",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("read dir {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("read dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn mesh_src_does_no_io() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        !files.is_empty(),
        "no sources found under {}",
        src.display()
    );
    let mut offences = Vec::new();
    for file in &files {
        let text =
            fs::read_to_string(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        for (i, line) in text.lines().enumerate() {
            for banned in BANNED {
                if line.contains(banned) {
                    offences.push(format!("{}:{}: mentions `{banned}`", file.display(), i + 1));
                }
            }
        }
    }
    assert!(
        offences.is_empty(),
        "mesh/src must stay sans-IO:\n{}",
        offences.join("\n")
    );
}
