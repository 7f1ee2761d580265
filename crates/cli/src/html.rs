//! A surge's report as one self-contained HTML file (`surge --html`,
//! `flashsale report html`): the verdict and the audit first, then plots
//! drawn as SVG by a plotting library (plotters), inline, so the file opens
//! anywhere without a network: buyers per second, latency over time, each
//! sku's stock over time, the consumer groups' lag, the outcomes, and
//! fairness per sku; then the figures, next to an earlier run's with the
//! change when one is given (`--compare`).
//!
//! A few lines of script mark each plot once the browser has laid it out
//! (`data-rendered`), which is what the test in headless Chromium checks.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use plotters::prelude::*;

use crate::surge::SurgeReport;
use crate::thresholds::figures;

#[derive(Debug, thiserror::Error)]
#[error("drawing the plot {plot:?} failed: {why}")]
pub struct PlotError {
    plot: String,
    why: String,
}

const WIDTH: u32 = 820;
const HEIGHT: u32 = 320;
/// Stock plots drawn, one per sku; a sale of more skus lists the rest in
/// its table only.
const MOST_STOCK_PLOTS: usize = 12;

/// Tableau's ten colours: told apart at a glance, and none washed out on
/// white.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// One series of a line plot: its name and its points.
type Series = (String, Vec<(f64, f64)>);

/// The whole page.
pub fn render(report: &SurgeReport, earlier: Option<&SurgeReport>) -> Result<String, PlotError> {
    let mut plots: Vec<(String, String)> = Vec::new();
    let t = |s: &crate::surge::Second| s.t as f64;
    let per_second = |f: fn(&crate::surge::Second) -> u64| -> Vec<(f64, f64)> {
        report
            .timeline
            .iter()
            .map(|s| (t(s), f(s) as f64))
            .collect()
    };
    let title = "Buyers per second";
    plots.push((
        title.into(),
        lines(
            title,
            "seconds since the first arrival",
            "per second",
            &[
                ("due".into(), per_second(|s| s.due)),
                ("answered".into(), per_second(|s| s.answered)),
                ("accepted".into(), per_second(|s| s.accepted)),
                ("shed".into(), per_second(|s| s.shed)),
                ("decided".into(), per_second(|s| s.decided)),
            ],
        )?,
    ));
    let title = "Accept latency of the buyers answered each second";
    let latency = |f: fn(&crate::surge::Second) -> f64| -> Vec<(f64, f64)> {
        report
            .timeline
            .iter()
            .filter(|s| s.answered > 0)
            .map(|s| (t(s), f(s)))
            .collect()
    };
    plots.push((
        title.into(),
        lines(
            title,
            "seconds since the first arrival",
            "milliseconds",
            &[
                ("p50".into(), latency(|s| s.accept_ms.p50)),
                ("p99".into(), latency(|s| s.accept_ms.p99)),
                ("max".into(), latency(|s| s.accept_ms.max)),
            ],
        )?,
    ));
    for sku in report.skus.iter().take(MOST_STOCK_PLOTS) {
        let samples: Vec<_> = report
            .samples
            .stock
            .iter()
            .filter(|s| s.sku == sku.sku)
            .collect();
        let series = |f: fn(&crate::sampler::StockSample) -> i64| -> Vec<(f64, f64)> {
            samples
                .iter()
                .map(|s| (s.t_ms as f64 / 1000.0, f(s) as f64))
                .collect()
        };
        let title = format!("Stock of {} ({} units)", sku.sku, sku.stock);
        plots.push((
            title.clone(),
            lines(
                &title,
                "seconds since the first arrival",
                "units",
                &[
                    ("available".into(), series(|s| s.available)),
                    ("reserved".into(), series(|s| s.reserved)),
                    ("sold".into(), series(|s| s.sold)),
                ],
            )?,
        ));
    }
    let mut groups: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for sample in &report.samples.lag {
        for (group, lag) in &sample.lag {
            groups
                .entry(group)
                .or_default()
                .push((sample.t_ms as f64 / 1000.0, *lag as f64));
        }
    }
    let title = "Consumer lag (records not yet consumed)";
    let lag_series: Vec<Series> = groups
        .into_iter()
        .map(|(g, points)| (g.to_owned(), points))
        .collect();
    plots.push((
        title.into(),
        lines(
            title,
            "seconds since the first arrival",
            "records",
            &lag_series,
        )?,
    ));
    let title = "Outcomes";
    plots.push((
        title.into(),
        bars(
            title,
            "buyers",
            &[
                ("confirmed", report.confirmed),
                ("cancelled", report.cancelled),
                ("rejected", report.rejected),
                ("sold out", report.shed.sold_out),
                ("rate limited", report.shed.rate_limited),
                ("overloaded", report.shed.overloaded),
                ("invalid", report.shed.invalid),
                ("errors", report.errors),
                ("unsettled", report.unsettled),
            ],
        )?,
    ));
    let title = "Fairness: of each sku's first `stock` arrivals, how many got a unit";
    let fairness: Vec<(&str, u64)> = report
        .skus
        .iter()
        .map(|s| {
            let first = s.stock.min(s.buyers).max(1);
            (s.sku.as_str(), s.fairness.winners_among_first * 100 / first)
        })
        .collect();
    plots.push((
        title.into(),
        bars(title, "% of the first arrivals", &fairness)?,
    ));
    Ok(page(report, earlier, &plots))
}

fn lines(title: &str, x: &str, y: &str, series: &[Series]) -> Result<String, PlotError> {
    let fail = |e: &dyn std::fmt::Display| PlotError {
        plot: title.to_owned(),
        why: e.to_string(),
    };
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y1) = (0f64, 1f64, 1f64);
    for (px, py) in points {
        x0 = x0.min(*px);
        x1 = x1.max(*px);
        y1 = y1.max(*py);
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, 0f64..y1 * 1.05)
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .x_desc(x)
            .y_desc(y)
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| fail(&e))?;
        for (i, (name, points)) in series.iter().enumerate() {
            let color = color(i);
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| fail(&e))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        if !series.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .draw()
                .map_err(|e| fail(&e))?;
        }
        root.present().map_err(|e| fail(&e))?;
    }
    Ok(svg)
}

fn bars(title: &str, y: &str, values: &[(&str, u64)]) -> Result<String, PlotError> {
    let fail = |e: &dyn std::fmt::Display| PlotError {
        plot: title.to_owned(),
        why: e.to_string(),
    };
    let top = values.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    let labels: Vec<String> = values.iter().map(|(l, _)| (*l).to_owned()).collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(
                (0..values.len().saturating_sub(1)).into_segmented(),
                0u64..top + top / 10 + 1,
            )
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc(y)
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(|e| fail(&e))?;
        chart
            .draw_series(
                Histogram::vertical(&chart)
                    .style(color(0).filled())
                    .margin(10)
                    .data(values.iter().enumerate().map(|(i, (_, v))| (i, *v))),
            )
            .map_err(|e| fail(&e))?;
        root.present().map_err(|e| fail(&e))?;
    }
    Ok(svg)
}

/// The figures shown in the table, in order: (label, the report's name).
const FIGURES: [(&str, &str); 16] = [
    ("buyers", "buyers"),
    ("accepted", "accepted"),
    ("accepted per second", "accept_rps"),
    ("shed: sold out", "shed.sold_out"),
    ("errors", "errors"),
    ("unsettled", "unsettled"),
    ("units sold", "units_sold"),
    ("oversold", "oversold"),
    ("accept p50 (ms)", "accept_p50_ms"),
    ("accept p99 (ms)", "accept_p99_ms"),
    ("decision p99 (ms)", "decision_p99_ms"),
    ("final answer p99 (ms)", "final_answer_p99_ms"),
    ("sold out after (s)", "sold_out_after_s"),
    ("all decided after (s)", "all_decided_after_s"),
    ("winners among the first", "fairness.winners_among_first"),
    ("inversions", "fairness.inversions"),
];

fn page(report: &SurgeReport, earlier: Option<&SurgeReport>, plots: &[(String, String)]) -> String {
    let verdict = match (report.passed(), report.thresholds_held()) {
        (true, true) => "PASS",
        (true, false) => "FAIL (thresholds)",
        (false, _) => "FAIL",
    };
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>flashsale surge: {verdict}</title>\n<style>{STYLE}</style></head><body>\n\
         <h1>Surge: {} buyers for {} units in {:.1} s <span class=\"verdict {}\">{verdict}</span></h1>\n",
        report.buyers,
        report.stock,
        report.duration_s,
        if verdict == "PASS" { "pass" } else { "fail" },
    );
    let _ = writeln!(
        html,
        "<p>Audit: <b>{}</b>; accepted {}, confirmed {}, cancelled {}, rejected {}, unsettled {}; \
         units sold {} of {} (oversold {}).</p>",
        if report.audit_ok {
            "clean"
        } else {
            "VIOLATIONS"
        },
        report.accepted,
        report.confirmed,
        report.cancelled,
        report.rejected,
        report.unsettled,
        report.units_sold,
        report.stock,
        report.oversold,
    );
    if !report.violations.is_empty() {
        html.push_str("<ul class=\"violations\">");
        for v in &report.violations {
            let _ = write!(html, "<li>{}</li>", escape(v));
        }
        html.push_str("</ul>\n");
    }
    if !report.thresholds.is_empty() {
        html.push_str("<table><tr><th>threshold</th><th>was</th><th></th></tr>");
        for c in &report.thresholds {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
                escape(&c.threshold),
                c.actual.map_or_else(|| "none".into(), |a| format!("{a}")),
                if c.held { "pass" } else { "fail" },
                if c.held { "held" } else { "FAILED" },
            );
        }
        html.push_str("</table>\n");
    }
    for (title, svg) in plots {
        let _ = writeln!(
            html,
            "<figure class=\"plot\"><figcaption>{}</figcaption>{svg}</figure>",
            escape(title)
        );
    }
    html.push_str(&figures_table(report, earlier));
    if report.skus.len() > 1 {
        html.push_str(
            "<h2>Each sku</h2><table><tr><th>sku</th><th>stock</th><th>buyers</th>\
             <th>accepted</th><th>sold</th><th>accept p99 ms</th><th>decision p99 ms</th>\
             <th>all decided after s</th><th>winners among the first</th><th>inversions</th></tr>",
        );
        for s in &report.skus {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td>\
                 <td>{:.0}</td><td>{}</td><td>{} of {}</td><td>{}</td></tr>",
                escape(&s.sku),
                s.stock,
                s.buyers,
                s.accepted,
                s.units_sold,
                s.accept_latency_ms.p99,
                s.decision_latency_ms.p99,
                s.all_decided_after_s
                    .map_or_else(|| "never".into(), |t| format!("{t:.2}")),
                s.fairness.winners_among_first,
                s.stock.min(s.buyers),
                s.fairness.inversions,
            );
        }
        html.push_str("</table>\n");
    }
    let _ = write!(html, "<script>{RENDER_CHECK}</script>\n</body></html>\n");
    html
}

/// The main figures; with an earlier run, its figures and the change.
fn figures_table(report: &SurgeReport, earlier: Option<&SurgeReport>) -> String {
    let now = figures(report);
    let then = earlier.map(figures);
    let mut html = String::from("<h2>Figures</h2><table><tr><th>figure</th><th>this run</th>");
    if then.is_some() {
        html.push_str("<th>earlier run</th><th>change</th>");
    }
    html.push_str("</tr>");
    for (label, name) in FIGURES {
        let value = now.get(name).copied();
        let _ = write!(html, "<tr><td>{label}</td><td>{}</td>", number(value));
        if let Some(then) = &then {
            let before = then.get(name).copied();
            let change = match (value, before) {
                (Some(v), Some(b)) if b != 0.0 => {
                    format!("{:+} ({:+.1}%)", round(v - b), (v - b) / b.abs() * 100.0)
                }
                (Some(v), Some(b)) => format!("{:+}", round(v - b)),
                _ => "-".into(),
            };
            let _ = write!(html, "<td>{}</td><td>{change}</td>", number(before));
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>\n");
    html
}

fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn number(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{}", round(v)))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const STYLE: &str = "body{font-family:sans-serif;max-width:900px;margin:2em auto;color:#222}\
h1{font-size:1.4em}.verdict{padding:.1em .5em;border-radius:.3em;color:#fff}\
.verdict.pass,td.pass{background:#2a7d2a;color:#fff}.verdict.fail,td.fail{background:#b22;color:#fff}\
figure.plot{margin:1.5em 0}figcaption{font-weight:bold;margin-bottom:.3em}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}\
td:first-child,th:first-child{text-align:left}.violations{color:#b22}";

/// Marks each plot once laid out: its drawing has a size and marks in it.
const RENDER_CHECK: &str = "window.addEventListener('load',function(){var n=0;\
document.querySelectorAll('figure.plot').forEach(function(f){var s=f.querySelector('svg');\
var ok=false;if(s){var b=s.getBBox();var marks=s.querySelectorAll('path,polyline,rect,line').length;\
ok=b.width>0&&b.height>0&&marks>0;}f.setAttribute('data-rendered',ok?'yes':'no');if(ok)n++;});\
document.body.setAttribute('data-plots-rendered',String(n));});";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::surge::{Second, SkuReport};

    fn report() -> SurgeReport {
        SurgeReport {
            buyers: 100,
            accepted: 20,
            confirmed: 10,
            stock: 10,
            units_sold: 10,
            audit_ok: true,
            timeline: (0..3)
                .map(|t| Second {
                    t,
                    due: 30 + t,
                    answered: 30,
                    ..Second::default()
                })
                .collect(),
            skus: vec![SkuReport {
                sku: "tv<1>".into(),
                stock: 10,
                buyers: 100,
                ..SkuReport::default()
            }],
            ..SurgeReport::default()
        }
    }

    #[test]
    fn the_page_has_every_plot_escaped_text_and_the_change_against_an_earlier_run() {
        let mut earlier = report();
        earlier.accepted = 10;
        let html = render(&report(), Some(&earlier)).expect("renders");
        // Buyers, latency, one sku's stock, lag, outcomes, fairness.
        assert_eq!(html.matches("<figure class=\"plot\">").count(), 6);
        assert_eq!(html.matches("<svg").count(), 6);
        assert!(html.contains("tv&lt;1&gt;") && !html.contains("tv<1>"));
        assert!(html.contains("+10 (+100.0%)"), "the accepted change");
        // Nothing fetched from anywhere: the file is the whole report.
        assert!(!html.contains("src=\"http") && !html.contains("href=\"http"));
    }
}
