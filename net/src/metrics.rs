//! Metrics shared by every daemon: HdrHistogram-backed distributions
//! rendered as Prometheus summaries, and a minimal HTTP/1.1 responder for
//! `GET /metrics` (a full HTTP stack would be most of our dependency tree for
//! a single read-only page).

use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REQUEST_BYTES_MAX: usize = 8192;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes a metric family's HELP and TYPE lines (`kind`: counter, gauge, summary).
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A latency or size distribution, exported as a Prometheus summary.
pub struct Distribution {
    hist: Mutex<Histogram<u64>>,
}

impl Default for Distribution {
    fn default() -> Self {
        Distribution { hist: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds")) }
    }
}

impl Distribution {
    pub fn record(&self, v: u64) {
        self.hist.lock().expect("metrics lock").saturating_record(v.max(1));
    }

    /// Writes the summary's samples; `labels` is empty or like `pg="0",segment="1"`.
    pub fn render_samples(&self, out: &mut String, name: &str, labels: &str) {
        let h = self.hist.lock().expect("metrics lock");
        let sep = if labels.is_empty() { "" } else { "," };
        for q in [0.5, 0.99, 0.999] {
            let _ = writeln!(out, "{name}{{{labels}{sep}quantile=\"{q}\"}} {}", h.value_at_quantile(q));
        }
        let sum = h.iter_recorded().map(|v| v.value_iterated_to() * v.count_at_value()).sum::<u64>();
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {sum}\n{name}_count{braces} {}", h.len());
    }

    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, "summary", help);
        self.render_samples(out, name, "");
    }
}

/// Serves `render()` at `GET /metrics` until the task is dropped.
pub async fn serve_metrics(listener: tokio::net::TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    loop {
        let mut sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut req = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            let read_request = async {
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < REQUEST_BYTES_MAX {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                true
            };
            if !matches!(tokio::time::timeout(REQUEST_TIMEOUT, read_request).await, Ok(true)) {
                return;
            }
            let (status, body) =
                if req.starts_with(b"GET /metrics ") { ("200 OK", render()) } else { ("404 Not Found", "only GET /metrics is served\n".to_string()) };
            let head = format!("HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
        });
    }
}
