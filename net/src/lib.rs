//! QUIC + mutual TLS plumbing shared by every Borealis daemon and tool:
//! the cluster CA, endpoint configuration, and message framing on streams.

pub mod api;
pub mod api_server;
pub mod certs;
pub mod frame;
pub mod metrics;
pub mod storage;
pub mod tls;

pub use tls::{client_endpoint, connect, serve_streams, server_endpoint, TlsIdentity};

/// Logs to stderr at `default_level` unless RUST_LOG says otherwise; colours only on a terminal.
pub fn init_logging(default_level: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The tokio runtime of a daemon: one thread for `worker_threads == 1`, else a
/// work-stealing pool of that many.
pub fn runtime(worker_threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    let mut b = match worker_threads {
        0 => anyhow::bail!("--worker-threads must be at least 1"),
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    b.enable_all().build().context("start tokio runtime")
}

/// A loopback port free a moment ago for both UDP (QUIC) and TCP (metrics, PostgreSQL), for
/// local clusters and tests: a random one below the kernel's ephemeral range, so that no
/// socket bound to port 0 meanwhile (every client, in this or any process) can take it
/// before the daemon it is meant for binds it. Never one this process handed out before.
pub fn free_port() -> std::io::Result<u16> {
    use std::hash::BuildHasher;
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    const LOWEST: u16 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|&low| low > LOWEST + 1000)
        .unwrap_or(32768);
    let mut given = GIVEN.lock().expect("ports lock");
    for _ in 0..1000 {
        // RandomState is keyed differently per instance: a random number without a dependency.
        let random = std::collections::hash_map::RandomState::new().hash_one(());
        let port = LOWEST + (random % u64::from(ephemeral_low - LOWEST)) as u16;
        if given.contains(&port) {
            continue;
        }
        let free = std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free {
            given.push(port);
            return Ok(port);
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, format!("no free loopback port in {LOWEST}..{ephemeral_low} after 1000 tries")))
}

/// Reads and validates a volume layout file (TOML).
pub fn load_volume(path: &std::path::Path) -> anyhow::Result<redo_core::volume::Volume> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path).with_context(|| format!("read volume file {}", path.display()))?;
    redo_core::volume::Volume::from_toml(&text).with_context(|| format!("volume file {}", path.display()))
}

/// Parses `4096`, `64KiB`, `8MiB`, `1GiB`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size like 4096, 64KiB, 8MiB, 1GiB"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?}: use B, KiB, MiB or GiB")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("64KiB"), Ok(65536));
        assert_eq!(parse_bytes("8MiB"), Ok(8 << 20));
        assert!(parse_bytes("8MB").is_err());
        assert!(parse_bytes("lots").is_err());
    }
}
