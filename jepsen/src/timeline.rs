//! A one-page picture of a run: every operation as a dot at (completion
//! time, latency), coloured by outcome, throughput per second as a line,
//! and the fault windows shaded, so a latency spike lines up with its
//! cause at a glance.

use std::fmt::Write;

use serde_json::Value;

use crate::history::{Entry, Outcome};

const W: f64 = 1000.0;
const H: f64 = 360.0;
const LEFT: f64 = 60.0;
const TOP: f64 = 20.0;
const PLOT_H: f64 = 280.0;

/// Renders the history as SVG.
pub fn render(entries: &[Entry], title: &str) -> String {
    let end = entries
        .iter()
        .map(|e| match e {
            Entry::Op(o) => o.complete,
            Entry::Nemesis(n) => n.time,
        })
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let x = |t: u64| LEFT + (t as f64 / end) * (W - LEFT - 20.0);
    // Latency on a log scale from 100 µs to 100 s.
    let y = |ns: u64| {
        let l = ((ns.max(100_000) as f64) / 1e5).log10().min(6.0);
        TOP + PLOT_H - l / 6.0 * PLOT_H
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/><text x="{LEFT}" y="14">{}</text>"#,
        escape(title)
    );
    // Fault windows: from each start to the next stop of the same fault.
    let mut open: Vec<(String, u64)> = Vec::new();
    for e in entries {
        let Entry::Nemesis(n) = e else { continue };
        match n.value.get("phase").and_then(Value::as_str) {
            Some("start") => open.push((n.f.clone(), n.time)),
            Some("stop") => {
                let idx = open.iter().position(|(f, _)| *f == n.f || n.f == "heal");
                if let Some(i) = idx {
                    let (f, t0) = open.remove(i);
                    shade(&mut s, x(t0), x(n.time), &f);
                }
            }
            _ => {}
        }
    }
    for (f, t0) in open {
        shade(&mut s, x(t0), x(end as u64), &f);
    }
    // Axes and latency grid.
    for (i, label) in ["100µs", "1ms", "10ms", "100ms", "1s", "10s", "100s"].iter().enumerate() {
        let yy = TOP + PLOT_H - i as f64 / 6.0 * PLOT_H;
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" x2="{}" y1="{yy}" y2="{yy}" stroke="#ddd"/><text x="4" y="{}">{label}</text>"##,
            W - 20.0,
            yy + 4.0
        );
    }
    // Operations.
    let mut per_second: Vec<u32> = vec![0; (end / 1e9) as usize + 1];
    for e in entries {
        let Entry::Op(o) = e else { continue };
        let colour = match o.outcome {
            Outcome::Ok => "#2a7",
            Outcome::Fail => "#d73",
            Outcome::Info => "#a3c",
        };
        if o.outcome == Outcome::Ok {
            if let Some(c) = per_second.get_mut((o.complete / 1_000_000_000) as usize) {
                *c += 1;
            }
        }
        let _ = write!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="1.3" fill="{colour}" fill-opacity="0.6"/>"#,
            x(o.complete),
            y(o.complete.saturating_sub(o.invoke))
        );
    }
    // Throughput (ok ops per second), scaled to the plot.
    let peak = per_second.iter().copied().max().unwrap_or(1).max(1) as f64;
    let points: Vec<String> = per_second
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!("{:.1},{:.1}", x(i as u64 * 1_000_000_000 + 500_000_000), TOP + PLOT_H - *c as f64 / peak * PLOT_H)
        })
        .collect();
    let _ = write!(
        s,
        r##"<polyline points="{}" fill="none" stroke="#37c" stroke-width="1"/><text x="{LEFT}" y="{}">dots: latency (green ok, orange fail, purple unknown); blue line: ok ops/s (peak {peak}); shaded: faults; x: {:.0} s</text></svg>"##,
        points.join(" "),
        TOP + PLOT_H + 30.0,
        end / 1e9
    );
    s
}

fn shade(s: &mut String, x0: f64, x1: f64, label: &str) {
    let _ = write!(
        s,
        r##"<rect x="{x0:.1}" y="{TOP}" width="{:.1}" height="{PLOT_H}" fill="#fc6" fill-opacity="0.25"/><text x="{x0:.1}" y="{}" font-size="9">{}</text>"##,
        (x1 - x0).max(1.0),
        TOP + PLOT_H + 12.0,
        escape(label)
    );
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
