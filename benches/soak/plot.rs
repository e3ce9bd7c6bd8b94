//! Report and plot

use crate::*;

/// An SVG of the samples: four panels over time, the warm-up end and load
/// end as dashed lines, each fault as a coloured band.
pub(crate) fn plot(
    samples: &[Sample],
    events: &[(Duration, Duration, usize, FaultKind)],
    warm: f64,
    load_end: f64,
    title: &str,
) -> String {
    let (w, ph, left, top, gap) = (960.0, 150.0, 70.0, 40.0, 40.0);
    let plot_w = w - left - 20.0;
    let t_max = samples.last().map(|s| s.t).unwrap_or(1.0).max(1.0);
    let x = |t: f64| left + plot_w * t / t_max;
    type Get = fn(&Sample) -> f64;
    let panels: [(&str, Get); 4] = [
        ("daemon RSS (MiB)", |s| s.rss_kib as f64 / 1024.0),
        ("open fds", |s| s.fds as f64),
        ("tokio tasks (tunneler_runtime_tasks)", |s| s.tasks as f64),
        ("active streams (daemon; client-side dashed)", |s| {
            s.active as f64
        }),
    ];
    let h = top + panels.len() as f64 * (ph + gap) + 40.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="20" font-size="14">{title}</text>"#
    );
    for (p, (name, get)) in panels.iter().enumerate() {
        let y0 = top + p as f64 * (ph + gap);
        let vmax = samples
            .iter()
            .map(get)
            .chain(if p == 3 {
                samples.iter().map(|s| s.client_open as f64).collect()
            } else {
                vec![]
            })
            .fold(0.0f64, f64::max)
            .max(1.0)
            * 1.1;
        let y = |v: f64| y0 + ph - ph * v / vmax;
        let _ = writeln!(
            svg,
            r##"<rect x="{left}" y="{y0}" width="{plot_w}" height="{ph}" fill="none" stroke="#999"/>"##
        );
        let _ = writeln!(svg, r#"<text x="{left}" y="{}">{name}</text>"#, y0 - 5.0);
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{:.0}</text>"#,
            left - 4.0,
            y0 + 10.0,
            vmax
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">0</text>"#,
            left - 4.0,
            y0 + ph
        );
        for (s, e, _, kind) in events {
            let (xs, xe) = (x(s.as_secs_f64()), x(e.as_secs_f64()));
            let _ = writeln!(
                svg,
                r#"<rect x="{xs:.1}" y="{y0}" width="{:.1}" height="{ph}" fill="{}" fill-opacity="0.15"/>"#,
                (xe - xs).max(1.0),
                kind.color()
            );
        }
        for (t, label) in [(warm, "warm-up end"), (load_end, "load stops")] {
            let _ = writeln!(
                svg,
                r##"<line x1="{0:.1}" x2="{0:.1}" y1="{y0}" y2="{1}" stroke="#555" stroke-dasharray="4,3"/><text x="{2:.1}" y="{3}" fill="#555">{label}</text>"##,
                x(t),
                y0 + ph,
                x(t) + 3.0,
                y0 + 12.0
            );
        }
        let pts: Vec<String> = samples
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.t), y(get(s))))
            .collect();
        let _ = writeln!(
            svg,
            r##"<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{}"/>"##,
            pts.join(" ")
        );
        if p == 3 {
            let pts: Vec<String> = samples
                .iter()
                .map(|s| format!("{:.1},{:.1}", x(s.t), y(s.client_open as f64)))
                .collect();
            let _ = writeln!(
                svg,
                r##"<polyline fill="none" stroke="#333" stroke-dasharray="3,3" stroke-width="1" points="{}"/>"##,
                pts.join(" ")
            );
        }
    }
    let ly = h - 20.0;
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="{ly}">minutes: 0 .. {:.1}; faults:</text>"#,
        t_max / 60.0
    );
    for (i, k) in FAULT_ORDER.iter().enumerate() {
        let lx = left + 190.0 + i as f64 * 120.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{lx}" y="{}" width="10" height="10" fill="{}" fill-opacity="0.5"/><text x="{}" y="{ly}">{}</text>"#,
            ly - 9.0,
            k.color(),
            lx + 14.0,
            k.label()
        );
    }
    svg.push_str("</svg>\n");
    svg
}

pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
