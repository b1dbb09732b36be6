//! Network namespaces: naming them and running code inside them.
//!
//! [`resolve`] turns what a user or plugin gives us ("NAME", a PID, a path) into the path of a
//! namespace file. [`run_in`] runs a closure on a fresh std thread that has joined a namespace,
//! so no tokio worker ever changes namespace: a network namespace belongs to a thread, and a
//! runtime thread that moved would take every later task with it.
//!
//! Not here: creating or deleting namespaces (tests use `ip netns`; containers bring their own)
//! and netlink work inside them (callers build a current-thread runtime inside the closure).
//!
//! Invariants: the calling thread never changes namespace; the helper thread ends with the
//! closure, so its namespace dies with it.

use std::fs::File;
use std::path::{Path, PathBuf};

use std::future::Future;

use anyhow::{bail, Context};
use nix::sched::CloneFlags;

use crate::kernel::netlink::Netlink;

/// "NAME" -> /run/netns/NAME; all digits -> /proc/PID/ns/net; an absolute path as is. Error if it
/// doesn't exist, saying which forms are accepted.
pub fn resolve(spec: &str) -> anyhow::Result<PathBuf> {
    const FORMS: &str = "expected a name under /run/netns, a PID, or an absolute path";
    let path = if spec.starts_with('/') {
        PathBuf::from(spec)
    } else if !spec.is_empty() && spec.bytes().all(|b| b.is_ascii_digit()) {
        PathBuf::from(format!("/proc/{spec}/ns/net"))
    } else if !spec.is_empty() && !spec.contains('/') && spec != "." && spec != ".." {
        Path::new("/run/netns").join(spec)
    } else {
        bail!("resolve netns {spec:?}: {FORMS}");
    };
    if !path.exists() {
        bail!(
            "resolve netns {spec:?}: {} does not exist ({FORMS})",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `f` on a fresh std thread that first joins the network namespace at `netns` (nix::sched::
/// setns CLONE_NEWNET). A panic in `f` resumes on the caller.
pub fn run_in<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let file = File::open(netns).with_context(|| format!("open netns {}", netns.display()))?;
    let shown = netns.display().to_string();
    let thread = std::thread::Builder::new()
        .name("netns".to_owned())
        .spawn(move || -> anyhow::Result<T> {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("enter netns {shown}"))?;
            drop(file);
            Ok(f())
        })
        .with_context(|| format!("spawn thread for netns {}", netns.display()))?;
    match thread.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Runs `f` with a [`Netlink`] opened inside the namespace at `netns`, on a current-thread runtime
/// of a fresh std thread ([`run_in`]). Blocks the caller: from async code, wrap it in
/// `tokio::task::spawn_blocking`.
pub fn block_on_in<T, F, Fut>(netns: &Path, f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce(Netlink) -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<T>>,
{
    run_in(netns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("build runtime for netns thread")?;
        runtime.block_on(async move { f(Netlink::open()?).await })
    })?
}

/// Helpers for tests that need a private namespace; used by the tests of `kernel` and `dataplane`.
#[cfg(test)]
pub(crate) mod testing {
    use std::future::Future;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};

    use crate::kernel::netlink::Netlink;

    static NEXT: AtomicU32 = AtomicU32::new(0);

    /// A uniquely named namespace (`kt{pid}x{n}`), deleted on drop, also when the test panics.
    pub(crate) struct TestNetns {
        name: String,
        path: PathBuf,
    }

    impl TestNetns {
        /// Creates the namespace, or returns `None` after printing why (no CAP_NET_ADMIN).
        pub(crate) fn new() -> Option<TestNetns> {
            if !nix::unistd::geteuid().is_root() {
                eprintln!("skipped: namespace tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)");
                return None;
            }
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let name = format!("kt{}x{n}", std::process::id());
            ip(&["netns", "add", &name]);
            let path = Path::new("/run/netns").join(&name);
            Some(TestNetns { name, path })
        }

        pub(crate) fn name(&self) -> &str {
            &self.name
        }

        pub(crate) fn path(&self) -> &Path {
            &self.path
        }

        /// Runs `f` with a [`Netlink`] opened inside this namespace, on a current-thread runtime.
        pub(crate) fn try_block_on<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
        where
            T: Send + 'static,
            F: FnOnce(Netlink) -> Fut + Send + 'static,
            Fut: Future<Output = anyhow::Result<T>>,
        {
            super::block_on_in(&self.path, f)
        }

        /// Like [`Self::try_block_on`], panicking with the whole error chain on failure.
        pub(crate) fn block_on<T, F, Fut>(&self, f: F) -> T
        where
            T: Send + 'static,
            F: FnOnce(Netlink) -> Fut + Send + 'static,
            Fut: Future<Output = anyhow::Result<T>>,
        {
            self.try_block_on(f).unwrap_or_else(|e| panic!("{e:#}"))
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    /// Runs `ip ARGS`, panics unless it succeeds, returns its stdout.
    pub(crate) fn ip(args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(args)
            .output()
            .expect("the ip command is installed for namespace tests");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{ip, TestNetns};
    use super::*;

    #[test]
    fn resolve_accepts_pid_and_absolute_path() {
        let own = std::process::id().to_string();
        assert_eq!(
            resolve(&own).unwrap(),
            PathBuf::from(format!("/proc/{own}/ns/net"))
        );
        assert_eq!(
            resolve("/proc/self/ns/net").unwrap(),
            PathBuf::from("/proc/self/ns/net")
        );
    }

    #[test]
    fn resolve_explains_the_accepted_forms() {
        for bad in [
            "",
            "rel/path",
            "..",
            "no-such-netns-kt",
            "/no/such/file",
            "999999999",
        ] {
            let err = format!("{:#}", resolve(bad).unwrap_err());
            assert!(err.contains("a PID, or an absolute path"), "{bad}: {err}");
        }
    }

    #[test]
    fn resolve_finds_a_named_netns() {
        let Some(ns) = TestNetns::new() else { return };
        assert_eq!(resolve(ns.name()).unwrap(), ns.path());
    }

    #[test]
    fn run_in_runs_inside_the_namespace_and_leaves_the_caller_alone() {
        let Some(ns) = TestNetns::new() else { return };
        ip(&[
            "-n",
            ns.name(),
            "link",
            "add",
            "only-here",
            "type",
            "veth",
            "peer",
            "name",
            "only-here-p",
        ]);
        // /proc/thread-self/net shows the namespace of the reading thread.
        let seen = run_in(ns.path(), || {
            std::fs::read_to_string("/proc/thread-self/net/dev")
                .map(|dev| dev.contains("only-here"))
        })
        .unwrap()
        .unwrap();
        assert!(seen);
        let here = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
        assert!(!here.contains("only-here"));
    }

    #[test]
    fn run_in_fails_on_a_file_that_is_not_a_netns() {
        let Some(_ns) = TestNetns::new() else { return };
        let err = run_in(Path::new("/proc/self/ns/uts"), || ()).unwrap_err();
        assert!(format!("{err:#}").contains("enter netns"), "{err:#}");
    }
}
