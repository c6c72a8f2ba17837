//! `loadgen put|get|delete|txn`: one request to a writer's (or, for `get`, a
//! replica's) client API from the command line, and `loadgen volume`, the
//! volume file of a local cluster.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use borealis_net::api::{ApiClient, ApiError};
use redo_core::api::ApiErrorCode;
use redo_core::page::PageOp;
use redo_core::volume::Volume;
use redo_core::Lsn;

use crate::cluster::local_volume;

/// Which writer to talk to, and as whom.
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// Client API address of the writer [default: `writer` of --volume, else 127.0.0.1:7090].
    #[arg(long)]
    pub writer: Option<SocketAddr>,
    /// Volume file (as written by `scripts/cluster up` to run/cluster/volume.toml) whose `writer` address to use.
    #[arg(long)]
    pub volume: Option<PathBuf>,
    /// Certificate directory of the cluster: ca.pem plus NAME.pem and NAME.key for --cert-name.
    #[arg(long, default_value = "run/cluster/certs")]
    pub certs: PathBuf,
    /// Client certificate to present (the writer refuses clients without one from the cluster CA).
    #[arg(long, default_value = "client")]
    pub cert_name: String,
}

/// Used when neither --writer nor --volume names a writer: scripts/cluster's default.
const DEFAULT_WRITER: &str = "127.0.0.1:7090";

impl Target {
    /// The writer named by --writer or --volume, if either is given.
    pub fn named_writer(&self) -> Result<Option<SocketAddr>> {
        match (&self.writer, &self.volume) {
            (Some(addr), _) => Ok(Some(*addr)),
            (None, Some(path)) => Ok(Some(writer_of(path)?)),
            (None, None) => Ok(None),
        }
    }

    pub fn writer_addr(&self) -> Result<SocketAddr> {
        Ok(self.named_writer()?.unwrap_or_else(|| DEFAULT_WRITER.parse().expect("literal address")))
    }

    /// The client certificate --cert-name from --certs.
    pub fn identity(&self) -> Result<borealis_net::TlsIdentity> {
        borealis_net::TlsIdentity::load(&self.certs, &self.cert_name)
            .with_context(|| format!("load certificate {:?} from {} (see --certs, --cert-name)", self.cert_name, self.certs.display()))
    }
}

fn writer_of(volume: &Path) -> Result<SocketAddr> {
    let text = std::fs::read_to_string(volume).with_context(|| format!("read volume file {}", volume.display()))?;
    let v = Volume::from_toml(&text).with_context(|| format!("volume file {}", volume.display()))?;
    v.writer
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| anyhow!("volume file {}: writer address {:?} does not resolve", volume.display(), v.writer))
}

#[derive(clap::Args, Debug)]
pub struct RequestArgs {
    #[command(flatten)]
    pub target: Target,
    /// Seconds to wait for the connection and the reply before giving up.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
}

#[derive(clap::Args, Debug)]
pub struct PutArgs {
    /// Key, 1 to 1024 bytes.
    pub key: String,
    /// Value, up to 64 KiB.
    pub value: String,
    #[command(flatten)]
    pub request: RequestArgs,
}

#[derive(clap::Args, Debug)]
pub struct KeyArgs {
    /// Key, 1 to 1024 bytes.
    pub key: String,
    #[command(flatten)]
    pub request: RequestArgs,
}

#[derive(clap::Args, Debug)]
pub struct GetArgs {
    /// Key, 1 to 1024 bytes.
    pub key: String,
    /// Read from the replica with this client API address instead of the writer.
    #[arg(long)]
    pub replica: Option<SocketAddr>,
    /// Read at this LSN or later: pass the commit LSN that put/txn printed to read your own
    /// write on a replica (it waits until it has applied that far, else answers Timeout).
    #[arg(long, default_value_t = 0)]
    pub min_lsn: u64,
    #[command(flatten)]
    pub request: RequestArgs,
}

#[derive(clap::Args, Debug)]
pub struct TxnArgs {
    /// Operations, applied atomically in order: `put:KEY=VALUE` (the key ends at the first `=`) or `del:KEY`.
    #[arg(required = true, value_parser = parse_op)]
    pub ops: Vec<PageOp>,
    #[command(flatten)]
    pub request: RequestArgs,
}

fn parse_op(s: &str) -> Result<PageOp, String> {
    let op = if let Some(kv) = s.strip_prefix("put:") {
        let (key, value) = kv.split_once('=').ok_or_else(|| format!("{s:?}: a put is put:KEY=VALUE"))?;
        PageOp::Put { key: key.into(), value: value.into() }
    } else if let Some(key) = s.strip_prefix("del:") {
        PageOp::Delete { key: key.into() }
    } else {
        return Err(format!("{s:?}: an operation is put:KEY=VALUE or del:KEY"));
    };
    op.check().map_err(|e| format!("{s:?}: {e}"))?;
    Ok(op)
}

/// What a get found: the caller exits 1 when the key is absent.
pub enum Outcome {
    Done,
    NotFound,
}

/// Connects to `replica`, else to the writer, sends one request, and prints the reply (commit LSN, or the value).
async fn request(args: &RequestArgs, replica: Option<SocketAddr>, what: &str, call: impl AsyncFnOnce(&ApiClient) -> Result<Outcome>) -> Result<Outcome> {
    let (server, addr, hint) = match replica {
        Some(addr) => ("replica", addr, "is replicad running? see --replica"),
        None => ("writer", args.target.writer_addr()?, "is writerd running? see --writer, --volume"),
    };
    let endpoint = borealis_net::client_endpoint(&args.target.identity()?)?;
    let work = async {
        let client = ApiClient::connect(&endpoint, addr).await?;
        let outcome = call(&client).await;
        client.close();
        outcome
    };
    let outcome = match tokio::time::timeout(Duration::from_secs_f64(args.timeout), work).await {
        Ok(r) => r.with_context(|| format!("{what} at {server} {addr}"))?,
        Err(_) => bail!("{what} at {server} {addr}: no reply within {} s ({hint})", args.timeout),
    };
    endpoint.wait_idle().await;
    Ok(outcome)
}

async fn commit(args: &RequestArgs, what: &str, ops: Vec<PageOp>) -> Result<Outcome> {
    request(args, None, what, async |c: &ApiClient| {
        println!("{}", c.txn(ops).await?);
        Ok(Outcome::Done)
    })
    .await
}

pub async fn put(args: PutArgs) -> Result<Outcome> {
    commit(&args.request, "put", vec![PageOp::Put { key: args.key.into(), value: args.value.into() }]).await
}

pub async fn delete(args: KeyArgs) -> Result<Outcome> {
    commit(&args.request, "delete", vec![PageOp::Delete { key: args.key.into() }]).await
}

pub async fn txn(args: TxnArgs) -> Result<Outcome> {
    commit(&args.request, "txn", args.ops).await
}

pub async fn get(args: GetArgs) -> Result<Outcome> {
    let key = args.key.into_bytes();
    let min_lsn = Lsn(args.min_lsn);
    request(&args.request, args.replica, "get", async |c: &ApiClient| {
        use std::io::Write;
        let value = match c.get_at(&key, min_lsn).await {
            Ok((_, value)) => value,
            Err(ApiError::Refused { code: ApiErrorCode::Timeout, message }) => {
                bail!("its read point did not reach --min-lsn {min_lsn} within its read wait (Timeout: {message})")
            }
            Err(e) => return Err(e.into()),
        };
        match value {
            Some(value) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&value)?;
                out.write_all(b"\n")?;
                Ok(Outcome::Done)
            }
            None => {
                println!("(not found)");
                Ok(Outcome::NotFound)
            }
        }
    })
    .await
}

#[derive(clap::Args, Debug)]
pub struct VolumeArgs {
    /// Storage nodes; node i (from 1) is 127.0.0.1:(base-port + i), two per AZ. Each PG uses nodes 1-6.
    #[arg(long, default_value_t = 6)]
    pub nodes: u32,
    /// Port base of the storage nodes' QUIC addresses.
    #[arg(long, default_value_t = 7100)]
    pub base_port: u16,
    /// Protection groups (numbered from 0), splitting the pages evenly.
    #[arg(long, default_value_t = 2)]
    pub pgs: u32,
    /// Pages of the volume; keys hash onto them.
    #[arg(long, default_value_t = 4096)]
    pub page_count: u64,
    /// Client API address of writerd.
    #[arg(long, default_value = DEFAULT_WRITER)]
    pub writer: SocketAddr,
}

/// Prints a local volume file (TOML) on stdout.
pub fn volume(args: VolumeArgs) -> Result<()> {
    let nodes = (1..=args.nodes).map(|i| {
        let port = args.base_port.checked_add(i as u16).ok_or_else(|| anyhow!("--base-port {} + node {i} exceeds 65535", args.base_port))?;
        Ok((i, SocketAddr::from(([127, 0, 0, 1], port))))
    });
    let v = local_volume(args.writer, nodes.collect::<Result<Vec<_>>>()?, args.pgs, args.page_count)?;
    print!("{}", v.to_toml());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_operations() {
        assert_eq!(parse_op("put:k=v=w").unwrap(), PageOp::Put { key: b"k".to_vec(), value: b"v=w".to_vec() });
        assert_eq!(parse_op("put:k=").unwrap(), PageOp::Put { key: b"k".to_vec(), value: vec![] });
        assert_eq!(parse_op("del:k").unwrap(), PageOp::Delete { key: b"k".to_vec() });
        assert!(parse_op("put:k").unwrap_err().contains("put:KEY=VALUE"));
        assert!(parse_op("del:").unwrap_err().contains("keys are 1 to"));
        assert!(parse_op("get:k").unwrap_err().contains("put:KEY=VALUE or del:KEY"));
    }
}
