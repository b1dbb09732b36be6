//! Integration with container engines: the Docker Engine API client (finding a container's network
//! namespace), the Docker network and IPAM plugin, and the registry of containers this router put
//! on the mesh (`meshctl ps`, release on container exit).

pub(crate) mod cni;
pub(crate) mod containers;
pub(crate) mod docker;
pub(crate) mod engine;
