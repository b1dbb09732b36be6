//! The QUIC endpoint that carries control connections between routers.
//!
//! One quinn endpoint per router, bound to the control port, both listens and dials, so the remote address
//! of an inbound connection is the remote router's own listening address (which discovery can announce).
//!
//! TLS here only gives a confidential, integrity-protected channel: every router presents a self-signed
//! certificate made from its persistent Ed25519 identity, and the client accepts any certificate whose
//! handshake signature verifies. Who may join the mesh is decided by the password handshake
//! ([`super::handshake`]) that runs inside the connection and is bound to it through the TLS exporter.
//!
//! Not here: the handshake messages (`handshake.rs`), and what the connection carries afterwards (the
//! control loop, `daemon/control.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// ALPN protocol name; a router of another major protocol fails the TLS handshake cleanly.
const ALPN: &[u8] = b"meshctl/1";
/// TLS server name used when dialing; certificates are not checked against it.
pub(crate) const SERVER_NAME: &str = "meshctl";
/// How often an idle connection sends a keep-alive, and how long silence means the peer is gone.
const KEEP_ALIVE: Duration = Duration::from_secs(1);
const IDLE_TIMEOUT: Duration = Duration::from_secs(6);

/// Builds the endpoint bound to `bind`, serving and dialing with the identity in `pkcs8` (Ed25519 PKCS#8).
pub(crate) fn endpoint(bind: SocketAddr, pkcs8: &[u8]) -> Result<quinn::Endpoint> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key_pair = rcgen::KeyPair::try_from(pkcs8).context("load identity key for TLS")?;
    let cert = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
        .context("certificate parameters")?
        .self_signed(&key_pair)
        .context("self-sign certificate")?;
    let cert_der = CertificateDer::from(cert.der().to_vec());
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.to_vec()));

    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 server config")?
        .with_no_client_auth()
        .with_single_cert(vec![cert_der], key_der)
        .context("install TLS certificate")?;
    server_tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)
            .context("QUIC server config")?,
    ));
    server.transport_config(transport_config());

    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 client config")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)
            .context("QUIC client config")?,
    ));
    client.transport_config(transport_config());

    let socket = std::net::UdpSocket::bind(bind).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "UDP port {} is already in use: another router (or program) holds it; \
                 stop it with `meshctl stop` or choose another --port",
                bind.port()
            )
        } else {
            anyhow::Error::new(e).context(format!("bind control socket {bind}"))
        }
    })?;
    let runtime = quinn::default_runtime().context("no async runtime for QUIC")?;
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        runtime,
    )
    .with_context(|| format!("start QUIC endpoint on {bind}"))?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .expect("invariant: 6 s fits a QUIC idle timeout"),
    ));
    transport.max_concurrent_uni_streams(0u32.into());
    transport.max_concurrent_bidi_streams(4u32.into());
    Arc::new(transport)
}

/// Accepts any server certificate but still checks the TLS handshake signature against it, so the session
/// is bound to the key the certificate names. Membership is proven by the password handshake instead.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "TLS 1.2 is not used by meshctl".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
