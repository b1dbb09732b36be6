//! The embedded name server: answers for container names in the mesh's domain from a snapshot of the
//! gossiped records, and forwards every other name to the host's upstream resolver.
//!
//! The zone snapshot comes through a watch channel (the control loop publishes it when records change),
//! so the server never waits on the control loop. Forwarded queries each get their own socket and task,
//! with a deadline; an upstream that doesn't answer costs the client a SERVFAIL, never a hang.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::wire::{self, Query, Rcode};

/// TTL of our answers: short, containers come and go.
const TTL_SECONDS: u32 = 30;
/// How long an upstream resolver may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// The names we answer for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Zone {
    /// Lowercased, no trailing dot, e.g. `meshctl.local`.
    pub(crate) domain: String,
    /// Full name -> addresses.
    pub(crate) names: BTreeMap<String, Vec<IpAddr>>,
}

impl Zone {
    fn contains(&self, name: &str) -> bool {
        name == self.domain
            || name
                .strip_suffix(&self.domain)
                .is_some_and(|rest| rest.ends_with('.'))
    }
}

/// What the server counts, for status and metrics.
#[derive(Debug, Default)]
pub(crate) struct DnsCounters {
    /// Every message received, well-formed or not.
    pub(crate) queries: AtomicU64,
    pub(crate) answered: AtomicU64,
    pub(crate) nxdomain: AtomicU64,
    pub(crate) forwarded: AtomicU64,
    pub(crate) upstream_failed: AtomicU64,
    pub(crate) malformed: AtomicU64,
}

/// The first nameserver in resolv.conf text that is not one of `ours` (we must not forward to ourselves).
pub(crate) fn upstream_from_resolv_conf(text: &str, ours: &[IpAddr]) -> Option<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse::<IpAddr>().ok())
        .find(|ip| !ours.contains(ip))
        .map(|ip| SocketAddr::new(ip, 53))
}

/// What the UDP and TCP servers share: the zone snapshot, the upstream and the counters.
#[derive(Clone)]
pub(crate) struct Resolver {
    pub(crate) zone: watch::Receiver<Arc<Zone>>,
    pub(crate) upstream: Option<SocketAddr>,
    pub(crate) counters: Arc<DnsCounters>,
}

impl Resolver {
    /// The answer to `raw` if we can give it without asking upstream (names in our zone,
    /// malformed queries, no upstream); otherwise the parsed query, to forward.
    fn answer_locally(&self, raw: &[u8], client: SocketAddr) -> Result<Option<Vec<u8>>, Query> {
        self.counters.queries.fetch_add(1, Ordering::Relaxed);
        let query = match wire::parse_query(raw) {
            Ok(q) => q,
            Err(e) => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%client, "dns: {e}");
                return Ok(wire::format_error(raw));
            }
        };
        let snapshot = self.zone.borrow().clone();
        if snapshot.contains(&query.name) {
            let reply = match snapshot.names.get(&query.name) {
                Some(addrs) => {
                    self.counters.answered.fetch_add(1, Ordering::Relaxed);
                    wire::answer(raw, &query, Rcode::NoError, addrs, TTL_SECONDS)
                }
                None => {
                    self.counters.nxdomain.fetch_add(1, Ordering::Relaxed);
                    wire::answer(raw, &query, Rcode::NxDomain, &[], TTL_SECONDS)
                }
            };
            return Ok(Some(reply));
        }
        if self.upstream.is_none() {
            self.counters
                .upstream_failed
                .fetch_add(1, Ordering::Relaxed);
            return Ok(Some(wire::answer(raw, &query, Rcode::ServFail, &[], 0)));
        }
        Err(query)
    }

    /// Forwards `raw` upstream; SERVFAIL if the upstream fails or is silent.
    async fn forward(&self, raw: &[u8], query: &Query) -> Vec<u8> {
        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
        let reply = match self.upstream {
            Some(upstream) => forward(raw, upstream).await,
            None => None,
        };
        reply.unwrap_or_else(|| {
            self.counters
                .upstream_failed
                .fetch_add(1, Ordering::Relaxed);
            wire::answer(raw, query, Rcode::ServFail, &[], 0)
        })
    }

    /// The answer to one query, forwarding it if needed; None when there is nothing to say.
    async fn respond(&self, raw: &[u8], client: SocketAddr) -> Option<Vec<u8>> {
        match self.answer_locally(raw, client) {
            Ok(reply) => reply,
            Err(query) => Some(self.forward(raw, &query).await),
        }
    }
}

/// Serves UDP until the socket fails. Forwarded queries each get their own task.
pub(crate) async fn serve(socket: UdpSocket, resolver: Resolver) -> std::io::Result<()> {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, client) = socket.recv_from(&mut buf).await?;
        let raw = &buf[..len];
        match resolver.answer_locally(raw, client) {
            Ok(Some(reply)) => {
                let _ = socket.send_to(&reply, client).await;
            }
            Ok(None) => {}
            Err(query) => {
                let (socket, resolver, raw) = (socket.clone(), resolver.clone(), raw.to_vec());
                tokio::spawn(async move {
                    let reply = resolver.forward(&raw, &query).await;
                    let _ = socket.send_to(&reply, client).await;
                });
            }
        }
    }
}

/// How long a TCP client may stay silent between queries.
const TCP_IDLE_MAX: Duration = Duration::from_secs(10);

/// Serves DNS over TCP (RFC 7766: two-byte length prefix, several queries per connection)
/// until the listener fails; one task per connection.
pub(crate) async fn serve_tcp(
    listener: tokio::net::TcpListener,
    resolver: Resolver,
) -> std::io::Result<()> {
    loop {
        let (stream, client) = listener.accept().await?;
        let resolver = resolver.clone();
        tokio::spawn(async move {
            let _ = serve_tcp_connection(stream, client, resolver).await;
        });
    }
}

async fn serve_tcp_connection(
    mut stream: tokio::net::TcpStream,
    client: SocketAddr,
    resolver: Resolver,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE_MAX, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let mut raw = vec![0u8; usize::from(u16::from_be_bytes(len))];
        tokio::time::timeout(TCP_IDLE_MAX, stream.read_exact(&mut raw))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let Some(reply) = resolver.respond(&raw, client).await else {
            return Ok(());
        };
        let Ok(n) = u16::try_from(reply.len()) else {
            return Ok(());
        };
        stream.write_all(&n.to_be_bytes()).await?;
        stream.write_all(&reply).await?;
    }
}

/// Sends the query to `upstream` from a fresh socket and returns the reply with the same id.
async fn forward(raw: &[u8], upstream: SocketAddr) -> Option<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let socket = UdpSocket::bind(bind).await.ok()?;
    socket.send_to(raw, upstream).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let (len, from) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        if from == upstream && len >= 2 && buf[..2] == raw[..2] {
            return Some(buf[..len].to_vec());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::wire::{answer_addrs, query, TYPE_A};

    async fn ask(server: SocketAddr, name: &str) -> Option<(u8, Vec<IpAddr>)> {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client
            .send_to(&query(42, name, TYPE_A), server)
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let (len, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        answer_addrs(&buf[..len])
    }

    #[tokio::test]
    async fn answers_mesh_names_and_forwards_the_rest() {
        // A fake upstream on loopback that answers every query with 192.0.2.1.
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            while let Ok((len, from)) = upstream.recv_from(&mut buf).await {
                let raw = buf[..len].to_vec();
                let q = wire::parse_query(&raw).unwrap();
                let reply = wire::answer(
                    &raw,
                    &q,
                    Rcode::NoError,
                    &["192.0.2.1".parse().unwrap()],
                    60,
                );
                let _ = upstream.send_to(&reply, from).await;
            }
        });
        let zone = Zone {
            domain: "meshctl.local".into(),
            names: [(
                "web.meshctl.local".to_string(),
                vec!["10.32.0.5".parse().unwrap()],
            )]
            .into_iter()
            .collect(),
        };
        let (_tx, rx) = watch::channel(Arc::new(zone));
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = socket.local_addr().unwrap();
        let counters = Arc::new(DnsCounters::default());
        let resolver = Resolver {
            zone: rx,
            upstream: Some(upstream_addr),
            counters: counters.clone(),
        };
        tokio::spawn(serve(socket, resolver.clone()));
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_server = tcp.local_addr().unwrap();
        tokio::spawn(serve_tcp(tcp, resolver));

        assert_eq!(
            ask(server, "WEB.meshctl.local.").await,
            Some((0, vec!["10.32.0.5".parse().unwrap()]))
        );
        assert_eq!(ask(server, "gone.meshctl.local").await, Some((3, vec![])));
        assert_eq!(
            ask(server, "example.org").await,
            Some((0, vec!["192.0.2.1".parse().unwrap()]))
        );
        assert_eq!(counters.forwarded.load(Ordering::Relaxed), 1);
        assert_eq!(counters.nxdomain.load(Ordering::Relaxed), 1);
        assert_eq!(counters.queries.load(Ordering::Relaxed), 3);

        // The same over TCP, two queries on one connection.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(tcp_server).await.unwrap();
        for name in ["web.meshctl.local", "example.org"] {
            let q = query(9, name, TYPE_A);
            stream
                .write_all(&(q.len() as u16).to_be_bytes())
                .await
                .unwrap();
            stream.write_all(&q).await.unwrap();
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await.unwrap();
            let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
            stream.read_exact(&mut reply).await.unwrap();
            let (rcode, addrs) = answer_addrs(&reply).unwrap();
            assert_eq!((rcode, addrs.len()), (0, 1), "{name} over TCP");
        }
    }

    #[test]
    fn upstream_skips_our_own_address() {
        let text = "# comment\nnameserver 10.32.0.1\nnameserver 127.0.0.53\nsearch x\n";
        let ours: Vec<IpAddr> = vec!["10.32.0.1".parse().unwrap()];
        assert_eq!(
            upstream_from_resolv_conf(text, &ours),
            Some("127.0.0.53:53".parse().unwrap())
        );
        assert_eq!(upstream_from_resolv_conf("", &ours), None);
    }

    #[test]
    fn zone_membership_needs_a_label_boundary() {
        let zone = Zone {
            domain: "meshctl.local".into(),
            names: BTreeMap::new(),
        };
        assert!(zone.contains("a.meshctl.local"));
        assert!(zone.contains("meshctl.local"));
        assert!(!zone.contains("evilmeshctl.local"));
    }
}
