//! Integration with container engines: the Docker Engine API client (finding a container's network
//! namespace). The Docker network plugin and the CNI plugin live here too as they are added.

pub(crate) mod cni;
pub(crate) mod engine;
