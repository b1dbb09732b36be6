//! The control loop's side of container names: registering and removing them in the router, and
//! publishing the router's records to the name service (`crate::dns`) when they change.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::Control;
use crate::api::types::{DnsRecord, DnsStatus};

impl Control {
    /// Registers `name` (qualified) for each address; returns how many records were new.
    pub(super) fn dns_add(&mut self, name: &str, addrs: &[IpAddr]) -> usize {
        let added = addrs
            .iter()
            .filter(|&&a| self.router.dns_add(name, a))
            .count();
        tracing::info!(%name, ?addrs, added, "dns: registered");
        // Before the answer leaves, so the caller's next lookup sees the change.
        self.publish_names();
        added
    }

    /// Removes this host's records of `name` (only `addr` if given); returns how many.
    pub(super) fn dns_remove(&mut self, now: Instant, name: &str, addr: Option<IpAddr>) -> usize {
        let removed = self.router.dns_remove(now, name, addr);
        tracing::info!(%name, ?addr, removed, "dns: removed");
        self.publish_names();
        removed
    }

    /// Hands the router's records to the name service if they changed since last time.
    pub(super) fn publish_names(&mut self) {
        let generation = self.router.dns().generation();
        if self.dns_published != Some(generation) {
            self.settings.dns.publish(self.router.dns());
            self.dns_published = Some(generation);
        }
    }

    pub(super) fn dns_status(&self) -> DnsStatus {
        let dns = &self.settings.dns;
        let c = dns.counters();
        let mut records: Vec<DnsRecord> = self
            .router
            .dns()
            .live()
            .map(|r| DnsRecord {
                name: r.name.clone(),
                address: r.addr.to_string(),
                peer: r.origin.to_string(),
                nickname: self
                    .router
                    .topology()
                    .peers()
                    .find(|p| p.name == r.origin)
                    .map(|p| p.nickname.clone()),
            })
            .collect();
        records.sort_by(|a, b| (&a.name, &a.address).cmp(&(&b.name, &b.address)));
        DnsStatus {
            domain: dns.domain().to_string(),
            listening: dns.listening().iter().map(|a| a.to_string()).collect(),
            upstream: dns.upstream().map(|u| u.to_string()),
            queries: c.queries.load(Ordering::Relaxed),
            answered: c.answered.load(Ordering::Relaxed),
            nxdomain: c.nxdomain.load(Ordering::Relaxed),
            forwarded: c.forwarded.load(Ordering::Relaxed),
            upstream_failed: c.upstream_failed.load(Ordering::Relaxed),
            malformed: c.malformed.load(Ordering::Relaxed),
            records,
        }
    }
}
