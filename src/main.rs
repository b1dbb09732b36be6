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
    cli::main()
}
