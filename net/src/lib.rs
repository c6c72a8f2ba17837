//! QUIC + mutual TLS plumbing shared by every Borealis daemon and tool:
//! the cluster CA, endpoint configuration, and message framing on streams.

pub mod certs;
pub mod frame;
pub mod storage;
pub mod tls;

pub use tls::{client_endpoint, connect, server_endpoint, TlsIdentity};
