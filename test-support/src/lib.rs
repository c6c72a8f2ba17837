//! The harness of Borealis' end-to-end tests (a dev-dependency of storaged, writerd and
//! replicad): the real daemons as child processes on loopback, each logging to a file,
//! and every wait on a condition with a deadline.
//!
//! - `process`: where the binaries are, free ports, and `Proc`, a daemon run as a child
//!   process (its log, waits on log lines, a port another process took, SIGTERM/SIGKILL).
//! - `cluster`: the one launcher of the daemons: `storaged_args` (a storaged's command
//!   line) and `Cluster`, six storage nodes on a volume (two per AZ), with writers and
//!   read replicas started on it.
//! - `client`: what the writer and replica tests do through the client API: loads of
//!   puts, read points, metrics, malformed requests.

pub mod client;
pub mod cluster;
pub mod process;

pub use client::*;
pub use cluster::*;
pub use process::*;
