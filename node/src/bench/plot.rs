//! The latency-over-time chart of `parley bench`, as a hand-written SVG: one line per phase
//! (p99 send→deliver per time bucket, log scale), kill -9 events as red vertical lines.
//!
//! Hand-written because a chart of a few polylines does not need a plotting library and its
//! build time; the SVG opens in any browser and diffs as text.

use std::fmt::Write as _;

/// One line of the chart.
pub(crate) struct Series {
    pub label: String,
    /// (seconds since the bench started, milliseconds).
    pub points: Vec<(f64, f64)>,
}

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
/// Lines are told apart by these colours, in phase order (then repeated).
const COLOURS: &[&str] = &["#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#e377c2"];
/// The y axis never goes below this (ms): sub-10 µs buckets are clock noise.
const Y_FLOOR_MS: f64 = 0.01;

/// Render the chart.
pub(crate) fn svg(title: &str, series: &[Series], kills: &[(f64, String)]) -> String {
    let all = series.iter().flat_map(|s| s.points.iter());
    let x_max = all.clone().map(|p| p.0).chain(kills.iter().map(|k| k.0)).fold(1.0_f64, f64::max);
    let y_lo = all.clone().map(|p| p.1.max(Y_FLOOR_MS)).fold(f64::INFINITY, f64::min);
    let y_hi = all.map(|p| p.1.max(Y_FLOOR_MS)).fold(0.0_f64, f64::max);
    let (d_lo, d_hi) = if y_hi > 0.0 {
        (y_lo.log10().floor() as i32, (y_hi.log10().ceil() as i32).max(y_lo.log10().floor() as i32 + 1))
    } else {
        (-1, 1)
    };
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |s: f64| LEFT + s / x_max * plot_w;
    let y = |ms: f64| {
        let v = ms.max(Y_FLOOR_MS).log10();
        TOP + plot_h - (v - d_lo as f64) / (d_hi - d_lo) as f64 * plot_h
    };

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="{LEFT}" y="22" font-size="15">{}</text>"#, escape(title));
    // Decade grid lines and labels.
    for d in d_lo..=d_hi {
        let ms = 10f64.powi(d);
        let yy = y(ms);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{} ms</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            yy + 4.0,
            trim_number(ms)
        );
    }
    // Time axis: about ten ticks on round seconds.
    let step = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]
        .into_iter()
        .find(|s| x_max / s <= 12.0)
        .unwrap_or(1200.0);
    let mut t = 0.0;
    while t <= x_max {
        let xx = x(t);
        let _ = writeln!(
            out,
            r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="#eee"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{t}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 16.0
        );
        t += step;
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since the bench started</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 10.0
    );
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w:.1}" height="{plot_h:.1}" fill="none" stroke="#888"/>"##
    );
    for (at, label) in kills {
        let xx = x(*at);
        let _ = writeln!(
            out,
            r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="#d62728" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}" fill="#d62728" font-size="11">{}</text>"##,
            TOP + plot_h,
            xx + 3.0,
            TOP + 12.0,
            escape(label)
        );
    }
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let pts: Vec<String> = s.points.iter().map(|&(t, ms)| format!("{:.1},{:.1}", x(t), y(ms))).collect();
        if !pts.is_empty() {
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
                pts.join(" ")
            );
        }
        let ly = TOP + 16.0 + i as f64 * 16.0;
        let lx = WIDTH - RIGHT - 230.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{ly:.1}">{}</text>"#,
            ly - 4.0,
            lx + 18.0,
            ly - 4.0,
            lx + 24.0,
            escape(&s.label)
        );
    }
    out.push_str("</svg>\n");
    out
}

fn trim_number(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_lines_and_kills() {
        let s = Series { label: "p99 durable".into(), points: vec![(0.0, 0.5), (1.0, 2.0), (2.0, 150.0)] };
        let out = svg("t", &[s], &[(1.5, "kill n1".into())]);
        assert!(out.starts_with("<svg"));
        assert!(out.contains("<polyline"));
        assert!(out.contains("kill n1"));
        assert!(out.trim_end().ends_with("</svg>"));
    }
}
