//! QUIC endpoints with mutual TLS: both sides present a certificate signed by
//! the cluster CA; a peer without one is refused during the handshake.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::certs::{ca_cert_path, identity_files};

pub const ALPN: &[u8] = b"borealis/1";
/// Name every cluster certificate carries; clients verify servers against it.
pub const SERVER_NAME: &str = "localhost";

/// Certificates of one cluster member: the CA that vouches for peers, and our own identity.
pub struct TlsIdentity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl TlsIdentity {
    /// Loads `ca.pem` and `NAME.pem`/`NAME.key` from a certificate directory made by `certs::generate`.
    pub fn load(dir: &Path, name: &str) -> Result<Self> {
        let files = identity_files(dir, name);
        Self::from_files(&ca_cert_path(dir), &files.cert, &files.key)
    }

    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).with_context(|| format!("read CA {}", ca.display()))? {
            roots.add(c.with_context(|| format!("parse CA {}", ca.display()))?).context("add CA certificate")?;
        }
        let chain = CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("read certificate {}", cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parse certificate {}", cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("read key {}", key.display()))?;
        Ok(TlsIdentity { roots: Arc::new(roots), chain, key })
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    pub fn server_config(&self) -> Result<quinn::ServerConfig> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), Self::provider()).build().context("build client certificate verifier")?;
        let mut tls = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .context("server certificate")?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.max_early_data_size = 0;
        let crypto = QuicServerConfig::try_from(tls).context("QUIC server crypto")?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(transport()));
        Ok(config)
    }

    pub fn client_config(&self) -> Result<quinn::ClientConfig> {
        let mut tls = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3")?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .context("client certificate")?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicClientConfig::try_from(tls).context("QUIC client crypto")?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport()));
        Ok(config)
    }
}

/// Windows sized for bulk redo streams on a fast link; idle peers time out.
fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window((64u32 << 20).into());
    t.send_window(64 << 20);
    // A writer keeps one append stream per PG it shares with a node, plus short
    // request streams; what the streams hold in memory is bounded by the
    // server's byte budget for frames in flight, not by this count.
    t.max_concurrent_bidi_streams(1024u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Peers ACK every 9th ack-eliciting packet or within 25 ms, not every 2nd: on the
    // one-way feeds (replies to a client that sends nothing more for a while, log chunks
    // to a replica) each ACK is otherwise a datagram that wakes the sender, and a 5 ms
    // bound still cost an ACK per reply (bench-results/README.md, "Design measurements");
    // a lost last packet then waits up to 25 ms longer for its probe.
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(8u32.into()).max_ack_delay(Some(Duration::from_millis(25)));
    t.ack_frequency_config(Some(acks));
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_idle_timeout(Some(Duration::from_secs(10).try_into().expect("10 s fits")));
    t
}

/// Socket buffers for QUIC: the kernel default (~208 KiB) overflows during
/// bursts whenever the receiving process is descheduled for a moment, and
/// every dropped datagram costs a loss-recovery stall of milliseconds.
const UDP_BUFFER_BYTES: libc::c_int = 8 << 20;

fn set_buffer(socket: &std::net::UdpSocket, force: libc::c_int, plain: libc::c_int) {
    use std::os::fd::AsRawFd;
    let size = UDP_BUFFER_BYTES;
    for opt in [force, plain] {
        // SAFETY: setsockopt with a pointer to a live c_int of the given size.
        let rc =
            unsafe { libc::setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, opt, (&size as *const libc::c_int).cast(), std::mem::size_of_val(&size) as u32) };
        // SO_*BUFFORCE needs CAP_NET_ADMIN; without it the plain option is capped at net.core.*mem_max.
        if rc == 0 {
            return;
        }
    }
    tracing::warn!(bytes = size, "could not enlarge UDP socket buffer: {}", std::io::Error::last_os_error());
}

fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr).with_context(|| format!("bind UDP {addr}"))?;
    set_buffer(&socket, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF);
    set_buffer(&socket, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF);
    let runtime = quinn::default_runtime().context("no async runtime for QUIC")?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime).with_context(|| format!("QUIC endpoint on {addr}"))
}

pub fn server_endpoint(identity: &TlsIdentity, listen: SocketAddr) -> Result<quinn::Endpoint> {
    endpoint(listen, Some(identity.server_config()?))
}

/// A client endpoint on an ephemeral port (any IPv4 interface) that presents `identity`.
pub fn client_endpoint(identity: &TlsIdentity) -> Result<quinn::Endpoint> {
    let mut ep = endpoint("0.0.0.0:0".parse().expect("literal address"), None)?;
    ep.set_default_client_config(identity.client_config()?);
    Ok(ep)
}

/// Accepts connections on a server endpoint (a peer without a cluster
/// certificate fails the handshake) and runs `serve` on every bidirectional
/// stream they open, each as its own task, until the endpoint closes.
pub async fn serve_streams<F, Fut>(endpoint: quinn::Endpoint, serve: F)
where
    F: Fn(quinn::SendStream, quinn::RecvStream) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    while let Some(incoming) = endpoint.accept().await {
        let serve = serve.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => return tracing::warn!(%remote, error = %e, "refused connection"),
            };
            tracing::debug!(%remote, "connection established");
            loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => drop(tokio::spawn(serve(send, recv))),
                    Err(e) => return tracing::debug!(%remote, error = %e, "connection closed"),
                }
            }
        });
    }
}

pub async fn connect(endpoint: &quinn::Endpoint, addr: SocketAddr) -> Result<quinn::Connection> {
    endpoint.connect(addr, SERVER_NAME).with_context(|| format!("connect to {addr}"))?.await.with_context(|| format!("QUIC/TLS handshake with {addr}"))
}
