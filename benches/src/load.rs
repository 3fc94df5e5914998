//! The load engine: `clients` concurrent tasks issue operations until a
//! total count or a duration is reached, optionally at a fixed rate, and
//! record each latency in a histogram.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub name: String,
    pub clients: usize,
    pub total: Option<u64>,
    pub duration: Option<Duration>,
    /// Operations per second over all clients; None for as fast as
    /// possible.
    pub rate: Option<f64>,
    pub progress: bool,
}

/// What one run measured. Latencies in milliseconds.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub name: String,
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub throughput: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 µs to 10 minutes, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

impl Report {
    pub fn from_histogram(name: &str, h: &Histogram<u64>, errors: u64, elapsed: Duration) -> Report {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let secs = elapsed.as_secs_f64().max(1e-9);
        Report {
            name: name.to_string(),
            ops: h.len(),
            errors,
            seconds: secs,
            throughput: h.len() as f64 / secs,
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: h.max() as f64 / 1000.0,
            first_error: None,
        }
    }

    pub fn table_header() -> String {
        format!(
            "{:<28} {:>9} {:>7} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "workload", "ops", "errors", "ops/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        )
    }

    pub fn table_row(&self) -> String {
        format!(
            "{:<28} {:>9} {:>7} {:>11.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            self.name,
            self.ops,
            self.errors,
            self.throughput,
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms
        )
    }
}

fn progress_bar(cfg: &LoadConfig) -> ProgressBar {
    if !cfg.progress {
        return ProgressBar::hidden();
    }
    let (len, unit) = match (cfg.total, cfg.duration) {
        (Some(t), _) => (t, "ops"),
        (None, Some(d)) => (d.as_secs().max(1), "s"),
        _ => (0, "ops"),
    };
    let pb = ProgressBar::new(len);
    let template = format!("{{prefix:>20}} [{{bar:40}}] {{pos}}/{{len}} {unit} {{per_sec}} eta {{eta}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_prefix(cfg.name.clone());
    pb
}

/// Runs `op(client, sequence)` from `cfg.clients` tasks.
pub async fn run<F, Fut>(cfg: &LoadConfig, op: F) -> Report
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let op = Arc::new(op);
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let pb = progress_bar(cfg);
    let clients = cfg.clients.max(1);
    let interval = cfg.rate.filter(|r| *r > 0.0).map(|r| Duration::from_secs_f64(clients as f64 / r));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let op = op.clone();
        let issued = issued.clone();
        let pb = pb.clone();
        let (total, duration) = (cfg.total, cfg.duration);
        let by_time = total.is_none();
        tasks.push(tokio::spawn(async move {
            let mut h = new_histogram();
            let mut errors = 0u64;
            let mut first_error = None;
            let mut next = Instant::now();
            loop {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if total.is_some_and(|t| n >= t) || duration.is_some_and(|d| started.elapsed() >= d) {
                    break;
                }
                if let Some(i) = interval {
                    next += i;
                    tokio::time::sleep_until(next.into()).await;
                }
                let t0 = Instant::now();
                // No request may stall the run: a request that takes this
                // long counts as an error.
                match tokio::time::timeout(Duration::from_secs(30), op(c, n))
                    .await
                    .unwrap_or_else(|_| Err("timed out after 30 s".into()))
                {
                    Ok(()) => {
                        let _ = h.record((t0.elapsed().as_micros() as u64).max(1));
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
                if by_time {
                    pb.set_position(started.elapsed().as_secs());
                } else {
                    pb.inc(1);
                }
            }
            (h, errors, first_error)
        }));
    }
    let mut h = new_histogram();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        if let Ok((th, e, fe)) = t.await {
            let _ = h.add(&th);
            errors += e;
            if first_error.is_none() {
                first_error = fe;
            }
        }
    }
    pb.finish_and_clear();
    let mut r = Report::from_histogram(&cfg.name, &h, errors, started.elapsed());
    r.first_error = first_error;
    r
}
