//! The comparison report's chart: keel's throughput as a multiple of
//! etcd's, one horizontal bar per workload, as a standalone SVG that the
//! Markdown report links to.

use std::fmt::Write;

const LABEL_WIDTH: f64 = 390.0;
const BAR_AREA: f64 = 380.0;
const ROW: f64 = 22.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 30.0;

/// An SVG bar chart of `(workload, keel/etcd throughput ratio)`. The axis
/// runs from 0 to the largest ratio rounded up to a whole number (at
/// least 2), with a line at 1x, where keel equals etcd.
pub fn throughput_ratios(rows: &[(String, f64)]) -> String {
    let max = rows.iter().map(|(_, r)| *r).filter(|r| r.is_finite()).fold(2.0_f64, f64::max).ceil();
    let x = |ratio: f64| LABEL_WIDTH + ratio.clamp(0.0, max) / max * BAR_AREA;
    let width = LABEL_WIDTH + BAR_AREA + 60.0;
    let height = TOP + ROW * rows.len() as f64 + BOTTOM;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LABEL_WIDTH:.0}" y="18" font-weight="bold">keel throughput / etcd throughput (same machine, same run)</text>"#
    );
    // Grid every half unit, labelled on whole units.
    let axis_bottom = TOP + ROW * rows.len() as f64;
    for step in 0..=(max * 2.0) as u32 {
        let r = f64::from(step) / 2.0;
        let (stroke, dash) = if step == 2 { ("#444", "") } else { ("#ddd", r#" stroke-dasharray="3,3""#) };
        let _ = writeln!(
            s,
            r#"<line x1="{0:.1}" y1="{TOP:.0}" x2="{0:.1}" y2="{axis_bottom:.0}" stroke="{stroke}"{dash}/>"#,
            x(r)
        );
        if step % 2 == 0 {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.0}" text-anchor="middle">{r:.0}x</text>"#,
                x(r),
                axis_bottom + 16.0
            );
        }
    }
    for (i, (name, ratio)) in rows.iter().enumerate() {
        let y = TOP + ROW * i as f64;
        let fill = if *ratio >= 1.0 { "#2e7d32" } else { "#c62828" };
        let _ = writeln!(
            s,
            r#"<text x="{:.0}" y="{:.1}" text-anchor="end">{}</text>"#,
            LABEL_WIDTH - 8.0,
            y + ROW * 0.68,
            escape(name)
        );
        let _ = writeln!(
            s,
            r#"<rect x="{LABEL_WIDTH:.0}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{fill}"/>"#,
            y + 3.0,
            x(*ratio) - LABEL_WIDTH,
            ROW - 6.0
        );
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}">{ratio:.2}x</text>"#, x(*ratio) + 4.0, y + ROW * 0.68);
    }
    s.push_str("</svg>\n");
    s
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_bar_per_workload_scaled_to_the_axis() {
        let rows = vec![("put, 1 clients".to_string(), 1.0), ("a <b> & c".to_string(), 2.5), ("slow".into(), 0.5)];
        let svg = throughput_ratios(&rows);
        assert!(svg.starts_with("<svg ") && svg.ends_with("</svg>\n"));
        // The background and one bar per row.
        assert_eq!(svg.matches("<rect").count(), 1 + rows.len());
        // Axis 0..3x: 1x is a third of the bar area, 2.5x five sixths.
        assert!(svg.contains(&format!(r#"width="{:.1}""#, BAR_AREA / 3.0)));
        assert!(svg.contains(&format!(r#"width="{:.1}""#, BAR_AREA * 2.5 / 3.0)));
        assert!(svg.contains("a &lt;b&gt; &amp; c"));
        assert!(svg.contains(r##"fill="#c62828""##), "a ratio under 1x is drawn in red");
        assert!(svg.contains(">3x</text>") && !svg.contains(">4x</text>"));
    }
}
