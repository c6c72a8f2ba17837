//! Local storage nodes for benchmarks: certificates, data dirs, ports, and
//! child processes that are stopped (SIGTERM, then SIGKILL) when dropped.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use borealis_net::storage::StorageConn;

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The `storaged` binary next to this one (cargo builds them side by side), or $BOREALIS_STORAGED.
pub fn storaged_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("BOREALIS_STORAGED") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().context("locate loadgen binary")?;
    let p = exe.with_file_name("storaged");
    if !p.exists() {
        bail!("{} not found: build it (cargo build --release -p storaged) or set BOREALIS_STORAGED", p.display());
    }
    Ok(p)
}

pub fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0").context("probe free UDP port")?.local_addr()?.port())
}

pub fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0").context("probe free TCP port")?.local_addr()?.port())
}

pub struct StorageNode {
    pub node_id: u32,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    child: Child,
}

pub struct LocalStorage {
    pub dir: PathBuf,
    pub nodes: Vec<StorageNode>,
}

impl LocalStorage {
    /// Starts `count` storage nodes, each hosting `pgs`, under `dir`.
    pub fn start(dir: &Path, count: u32, pgs: &[u32], extra_args: &[String]) -> Result<Self> {
        let certs = dir.join("certs");
        let mut names: Vec<String> = (1..=count).map(|i| format!("storaged-{i}")).collect();
        names.push("loadgen".into());
        borealis_net::certs::generate(&certs, &names)?;
        let bin = storaged_binary()?;
        let pgs_arg = pgs.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",");
        let mut nodes = Vec::new();
        for node_id in 1..=count {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
            let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()?).parse()?;
            let log = std::fs::File::create(dir.join(format!("storaged-{node_id}.log"))).context("create node log")?;
            let child = Command::new(&bin)
                .arg("serve")
                .args(["--node-id", &node_id.to_string()])
                .args(["--az", &format!("az{}", (node_id - 1) / 2 + 1)])
                .args(["--listen", &addr.to_string()])
                .args(["--metrics-listen", &metrics_addr.to_string()])
                .arg("--data-dir")
                .arg(dir.join(format!("data-{node_id}")))
                .arg("--certs")
                .arg(&certs)
                .args(["--pgs", &pgs_arg])
                .args(extra_args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("start {}", bin.display()))?;
            nodes.push(StorageNode { node_id, addr, metrics_addr, child });
        }
        Ok(LocalStorage { dir: dir.to_path_buf(), nodes })
    }

    pub fn identity(&self) -> Result<borealis_net::TlsIdentity> {
        borealis_net::TlsIdentity::load(&self.dir.join("certs"), "loadgen")
    }

    /// Connects to every node, retrying until each answers or the deadline passes.
    pub async fn connect_all(&mut self, endpoint: &quinn::Endpoint) -> Result<Vec<StorageConn>> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut conns = Vec::new();
        for node in &mut self.nodes {
            loop {
                if let Some(status) = node.child.try_wait()? {
                    bail!("storaged-{} exited during start-up ({status}); see {}/storaged-{}.log", node.node_id, self.dir.display(), node.node_id);
                }
                match StorageConn::connect(endpoint, node.addr).await {
                    Ok(c) => break conns.push(c),
                    Err(e) if Instant::now() > deadline => return Err(e).context("storage node did not become ready"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
        Ok(conns)
    }

    /// Stops every node with SIGTERM (each flushes and exits), SIGKILL after a timeout.
    pub fn stop(&mut self) -> Result<()> {
        for n in &self.nodes {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(n.child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for n in &mut self.nodes {
            loop {
                if let Some(status) = n.child.try_wait()? {
                    if !status.success() {
                        bail!("storaged-{} exited with {status}", n.node_id);
                    }
                    break;
                }
                if Instant::now() > deadline {
                    let _ = n.child.kill();
                    let _ = n.child.wait();
                    bail!("storaged-{} did not stop within {STOP_TIMEOUT:?}", n.node_id);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }
}

impl Drop for LocalStorage {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if matches!(n.child.try_wait(), Ok(None)) {
                let _ = n.child.kill();
                let _ = n.child.wait();
            }
        }
    }
}

/// Reads one unlabelled-or-labelled sample value from a Prometheus text page:
/// the sum over all series of `name` whose labels contain `label_filter`.
pub fn metric_sum(page: &str, name: &str, label_filter: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.contains(label_filter)).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Fetches http://addr/metrics.
pub async fn scrape(addr: SocketAddr) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connect metrics {addr}"))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    let (_, page) = body.split_once("\r\n\r\n").context("metrics reply without body")?;
    Ok(page.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn metric_sum_filters_by_name_and_label() {
        let page = "# HELP x\nfoo{node=\"1\",pg=\"0\"} 5\nfoo{node=\"1\",pg=\"1\"} 7\nfoo_sum 100\nbar 3\nfoo{quantile=\"0.99\"} 9\n";
        assert_eq!(super::metric_sum(page, "foo", "pg="), 12.0);
        assert_eq!(super::metric_sum(page, "bar", ""), 3.0);
        assert_eq!(super::metric_sum(page, "foo", "quantile=\"0.99\""), 9.0);
    }
}
