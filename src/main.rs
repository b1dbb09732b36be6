//! `meshctl`: the mesh router daemon and its command line.
//!
//! Layers (see README's Architecture section): `cli` parses and dispatches; `daemon` composes the router
//! (control loop owning the sans-IO `mesh::Router`, QUIC `transport`, sleeve `dataplane`, `kernel` glue
//! for bridge/TAP/veth) and serves the local `api` that the CLI talks to.

mod api;
mod cli;
mod daemon;
mod dataplane;
mod dns;
mod kernel;
mod metrics;
mod plugin;
mod transport;

fn main() -> std::process::ExitCode {
    // The name we are called by selects the mode: `meshnet` (a link to us) is the CNI plugin.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let called = std::path::Path::new(&argv0).file_name().unwrap_or_default();
    if called == plugin::cni::PLUGIN_NAME {
        return plugin::cni::main();
    }
    cli::main()
}
