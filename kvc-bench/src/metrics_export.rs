//! Metrics export: the `metrics` facade's global recorder rendered as Prometheus text and
//! served over plain HTTP from one std thread (no async runtime).
//!
//! The engine records through the facade (see [`crate::engine`]); `kvc-route` records its
//! routing decisions and ingest outcomes the same way, so one endpoint shows both. Families:
//!
//! | family | type | labels |
//! |---|---|---|
//! | `kvc_kv_region_utilisation` | gauge | `region` = `pinned`, `dynamic` |
//! | `kvc_prefix_hit_rate` | gauge | |
//! | `kvc_prompt_tokens_total`, `kvc_prefix_cached_tokens_total` | counter | |
//! | `kvc_reuse_rate` | gauge (finished requests that reused any KV) | |
//! | `kvc_requests_finished_total`, `kvc_requests_reused_total` | counter | |
//! | `kvc_evictions_total` | counter | `cause` = `make_room` (cached blocks), `preempt_recompute`, `preempt_swap` (sequences) |
//! | `kvc_preemptions_total` | counter | `mode` = `recompute`, `swap` |
//! | `kvc_tier_moves_total`, `kvc_tier_bytes_total` | counter | `direction` = `demote` (device→host), `promote` |
//! | `kvc_tier_offloaded_blocks_total`, `kvc_tier_offloaded_bytes_total` | counter | (device blocks written down to the host, disk and shared tiers) |
//! | `kvc_tier_loaded_blocks_total`, `kvc_tier_loaded_bytes_total` | counter | `tier` = `host`, `disk`, `shared` |
//! | `kvc_tier_load_failures_total` | counter | (loads that came back short; the rest recomputed) |
//! | `kvc_ttft_seconds`, `kvc_tbt_seconds` | histogram | `qos` (class rank, 0 = most important) |
//! | `kvc_route_decisions_total` | counter | `engine` |
//! | `kvc_route_cached_blocks_total` | counter | `tier` |
//! | `kvc_route_events_total` | counter | `outcome` = `applied`, `duplicate`, `gap`, `malformed`, `refused`, `resync` |

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use thiserror::Error;

/// Latency buckets in seconds (1 ms to 60 s), for the TTFT and TBT histograms.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];

/// Why the endpoint could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// Another recorder was installed in this process before ours.
    #[error("another metrics recorder is already installed")]
    RecorderTaken,
    /// The listening address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The bucket configuration was refused.
    #[error("metrics exporter: {0}")]
    Exporter(String),
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the process's global `metrics` recorder (once; later
/// calls return the same handle).
///
/// # Errors
/// [`MetricsError::RecorderTaken`] when another recorder was installed first.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| MetricsError::Exporter(e.to_string()))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| MetricsError::RecorderTaken)?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// A Prometheus endpoint: `GET /metrics` answers the exposition text.
#[derive(Debug)]
pub struct MetricsEndpoint {
    addr: SocketAddr,
    handle: PrometheusHandle,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsEndpoint {
    /// Installs the recorder and listens on `addr` (`127.0.0.1:9100`; port 0 picks one).
    ///
    /// # Errors
    /// The recorder could not be installed or the address not bound.
    pub fn serve(addr: &str) -> Result<Self, MetricsError> {
        let handle = install()?;
        let bind_err = |source| MetricsError::Bind {
            addr: addr.to_string(),
            source,
        };
        let listener = TcpListener::bind(addr).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, handle) = (Arc::clone(&stop), handle.clone());
            std::thread::Builder::new()
                .name("kvc-metrics".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        if let Ok(conn) = conn {
                            // A client that goes away mid-request only loses its answer.
                            let _ = answer(conn, &handle);
                        }
                    }
                })
                .map_err(bind_err)?
        };
        Ok(Self {
            addr: local,
            handle,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The exposition text now.
    #[must_use]
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(conn: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Skip the headers.
    let mut line = String::new();
    for _ in 0..100 {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = if method == "GET" && (path == "/metrics" || path == "/") {
        ("200 OK", handle.render())
    } else {
        ("404 Not Found", "not found: try GET /metrics\n".to_string())
    };
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

/// One sample of the exposition text.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name (with `_bucket`, `_sum`, `_count` suffixes for histograms).
    pub name: String,
    /// Labels in order.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

/// Why exposition text could not be parsed.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseError {
    /// A line is not `name{labels} value`.
    #[error("line {line}: {problem}")]
    Line {
        /// 1-based line.
        line: usize,
        /// What is wrong.
        problem: &'static str,
    },
}

/// `(name, kind)` of every `# TYPE` line.
pub type Families = Vec<(String, String)>;

/// Parses Prometheus exposition text: `# TYPE name kind` lines into `(name, kind)` and every
/// sample line.
///
/// # Errors
/// The first line that is neither a comment nor a well-formed sample.
pub fn parse_exposition(text: &str) -> Result<(Families, Vec<Sample>), ParseError> {
    let mut types = Vec::new();
    let mut samples = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let err = |problem| ParseError::Line {
            line: i + 1,
            problem,
        };
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                return Err(err("TYPE line without name and kind"));
            };
            types.push((name.to_string(), kind.to_string()));
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (head, value) = line.rsplit_once(' ').ok_or(err("no value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| err("value is not a number"))?,
        };
        let (name, labels) = match head.split_once('{') {
            None => (head.to_string(), Vec::new()),
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').ok_or(err("unclosed labels"))?;
                let mut labels = Vec::new();
                for pair in inner.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').ok_or(err("label without ="))?;
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .ok_or(err("label value not quoted"))?;
                    labels.push((k.to_string(), v.to_string()));
                }
                (name.to_string(), labels)
            }
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(err("bad metric name"));
        }
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    Ok((types, samples))
}

/// Fetches `GET /metrics` from `addr` over HTTP and returns the body.
///
/// # Errors
/// A connection or read failure, or a status other than 200.
pub fn scrape(addr: impl ToSocketAddrs) -> std::io::Result<String> {
    let mut conn = TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut conn, &mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "status {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_text_parses() {
        let text = "# HELP x help\n# TYPE kvc_a counter\nkvc_a{cause=\"make_room\"} 3\n\
                    kvc_b 0.5\nkvc_c_bucket{qos=\"0\",le=\"+Inf\"} 2\n";
        let (types, samples) = parse_exposition(text).unwrap();
        assert_eq!(types, vec![("kvc_a".into(), "counter".into())]);
        assert_eq!(samples.len(), 3);
        assert_eq!(
            samples[0].labels,
            vec![("cause".to_string(), "make_room".to_string())]
        );
        assert_eq!(samples[2].labels[1].1, "+Inf");
        assert!(parse_exposition("kvc_a{x=1} 2").is_err());
        assert!(parse_exposition("kvc_a").is_err());
    }
}
