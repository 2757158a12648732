//! The agent's metrics: per-job figures, their Prometheus text, written to a textfile after
//! every job (node_exporter's textfile collector) and served on `[metrics] listen`.
//!
//! The endpoint is a minimal HTTP/1 responder on the agent's runtime: `GET /metrics` gets the
//! text as it stands, anything else a 404; a request must arrive within [`READ_TIMEOUT`] and fit
//! in [`MAX_REQUEST`] bytes, and each connection answers one request and closes, so a client
//! that connects and says nothing holds nothing for long. It serves figures only (no names of
//! files, no secrets); bind it to loopback or a monitoring network.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::error::{Error, Result};

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request read.
const MAX_REQUEST: usize = 8 << 10;

/// Per-job figures for the metrics file.
#[derive(Clone, Debug, Default)]
pub(super) struct JobMetrics {
    pub(super) last_success: Option<i64>,
    pub(super) last_duration: f64,
    pub(super) last_ok: bool,
    pub(super) failures: u64,
    /// Failed runs by the kind of their error ([`crate::ErrorKind::name`]).
    pub(super) failures_by_kind: BTreeMap<&'static str, u64>,
    pub(super) bytes_read: u64,
    pub(super) bytes_new: u64,
}

/// The figures of every job since the agent started; kept across a reload.
#[derive(Debug, Default)]
pub(super) struct Metrics {
    pub(super) jobs: Mutex<BTreeMap<String, JobMetrics>>,
}

/// The Prometheus text of `metrics`, for the textfile and the endpoint.
pub(super) fn render(metrics: &BTreeMap<String, JobMetrics>) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: &dyn Fn(&JobMetrics) -> Option<f64>| {
        out.push_str(&format!(
            "# HELP tresor_job_{name} {help}\n# TYPE tresor_job_{name} gauge\n"
        ));
        for (job, m) in metrics {
            if let Some(v) = value(m) {
                let job = job.replace('\\', "\\\\").replace('"', "\\\"");
                out.push_str(&format!("tresor_job_{name}{{job=\"{job}\"}} {v}\n"));
            }
        }
    };
    gauge(
        "last_success_timestamp_seconds",
        "When the job last succeeded.",
        &|m| m.last_success.map(|t| t as f64),
    );
    gauge(
        "last_duration_seconds",
        "How long the last run took, retries included.",
        &|m| Some(m.last_duration),
    );
    gauge("last_run_ok", "1 if the last run succeeded.", &|m| {
        Some(m.last_ok as u8 as f64)
    });
    gauge("failures", "Failed runs since the agent started.", &|m| {
        Some(m.failures as f64)
    });
    gauge(
        "bytes_read",
        "Bytes read by the last successful run.",
        &|m| Some(m.bytes_read as f64),
    );
    gauge(
        "bytes_new",
        "New bytes stored by the last successful run.",
        &|m| Some(m.bytes_new as f64),
    );
    gauge(
        "dedup_ratio",
        "Share of the bytes read that were already stored.",
        &|m| (m.bytes_read > 0).then(|| 1.0 - m.bytes_new as f64 / m.bytes_read as f64),
    );
    out.push_str(
        "# HELP tresor_job_failures_by_kind Failed runs since the agent started, by the kind of error.\n\
         # TYPE tresor_job_failures_by_kind gauge\n",
    );
    for (job, m) in metrics {
        let job = job.replace('\\', "\\\\").replace('"', "\\\"");
        for (kind, n) in &m.failures_by_kind {
            out.push_str(&format!(
                "tresor_job_failures_by_kind{{job=\"{job}\",kind=\"{kind}\"}} {n}\n"
            ));
        }
    }
    out
}

/// Binds `addr` and serves `metrics` on it until the agent exits.
///
/// # Errors
/// [`Error::Io`] naming the address when it cannot be bound (in use, not this host's).
pub(super) async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("[metrics] listen = \"{addr}\""), e))?;
    tracing::info!("metrics served on http://{addr}/metrics");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, Arc::clone(&metrics)));
                }
                Err(e) => {
                    tracing::warn!("metrics endpoint: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

/// Answers one request on `stream`.
async fn answer(mut stream: TcpStream, metrics: Arc<Metrics>) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    if read != Ok(true) {
        return;
    }
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let (status, kind, body) = if line.starts_with(b"GET /metrics ") {
        let text = render(&metrics.jobs.lock().expect("metrics lock"));
        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text)
    } else {
        (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only GET /metrics is served here\n".to_string(),
        )
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}
