//! Statistics per cell (the median run of N), the Markdown table beside the reference's figures, and the SVG
//! chart of makespans.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use crate::scenario::{RunResult, Scenario};

/// One strategy in one scenario: the run with the median makespan, and whether every run was correct.
#[derive(Debug, Clone)]
pub struct Cell {
    pub strategy: String,
    pub scenario: Scenario,
    pub batch_max: Option<u32>,
    pub runs: usize,
    pub median: RunResult,
    pub all_correct: bool,
}

impl Cell {
    pub fn median_of(strategy: &str, scenario: Scenario, batch_max: Option<u32>, mut runs: Vec<RunResult>) -> Self {
        let all_correct = runs.iter().all(|r| r.correct);
        let count = runs.len();
        runs.sort_by_key(|r| r.makespan);
        let median = runs.swap_remove(count / 2);
        Self { strategy: strategy.to_owned(), scenario, batch_max, runs: count, median, all_correct }
    }
}

/// The reference's time to the last response, where it published one (1,000 buyers on 1,000 units, one node).
fn reference_ms(strategy: &str, scenario: &Scenario) -> Option<u64> {
    if (scenario.buyers, scenario.stock, scenario.instances) != (1000, 1000, 1) {
        return None;
    }
    match strategy {
        "pessimistic" => Some(6_000),
        "redis-pubsub" => Some(7_000),
        "redis-redlock" => Some(11_000),
        _ => None,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64)).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

/// Writes `latest.md`, `latest.json` and `makespan.svg` into `out`; returns the Markdown table.
pub fn write(out: &Path, cells: &[Cell], pay: bool) -> std::io::Result<String> {
    std::fs::create_dir_all(out)?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| strategy | batch | scenario | makespan ms | floor ms | x floor | reference ms | orders/s | p50 | p95 | p99 | max | 201 | 409 | 503 | other | early 409 | retries | lock wait avg ms | mean batch | final stock | correct |"
    );
    let _ = writeln!(
        md,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for c in cells {
        let r = &c.median;
        let mut sorted = r.latencies.clone();
        sorted.sort();
        let throughput = r.latencies.len() as f64 / r.makespan.as_secs_f64().max(1e-9);
        let reference = reference_ms(&c.strategy, &c.scenario).map_or_else(
            || "—".to_owned(),
            |rf| format!("{rf} ({:.0}x)", rf as f64 / (r.makespan.as_secs_f64() * 1000.0)),
        );
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.strategy,
            c.batch_max.map_or_else(|| "default".to_owned(), |b| b.to_string()),
            c.scenario,
            ms(r.makespan),
            r.floor.map_or_else(|| "—".to_owned(), ms),
            r.floor.map_or_else(
                || "—".to_owned(),
                |f| format!("{:.1}x", r.makespan.as_secs_f64() / f.as_secs_f64().max(1e-9))
            ),
            reference,
            throughput,
            ms(percentile(&sorted, 50.0)),
            ms(percentile(&sorted, 95.0)),
            ms(percentile(&sorted, 99.0)),
            ms(sorted.last().copied().unwrap_or_default()),
            r.created,
            r.out_of_stock,
            r.unavailable,
            r.other,
            r.counters.refused_early,
            r.counters.retries,
            if r.counters.lock_acquisitions == 0 {
                "—".to_owned()
            } else {
                format!("{:.1}", r.counters.lock_wait_micros as f64 / r.counters.lock_acquisitions as f64 / 1000.0)
            },
            if r.counters.order_batches == 0 {
                "—".to_owned()
            } else {
                format!("{:.1}", r.created as f64 / r.counters.order_batches as f64)
            },
            r.final_stock,
            if c.all_correct { format!("yes ({} runs)", c.runs) } else { "**NO**".to_owned() },
        );
    }
    if cells.iter().any(|c| c.median.cold.is_some()) {
        let _ = writeln!(
            md,
            "\nA flash sale beside the catalogue (`catalogue`): the hot option's buyers and everyone else's, released \
             at once:\n"
        );
        let _ = writeln!(
            md,
            "| strategy | batch | hot makespan ms | hot p50 | hot p99 | other options' p50 | p99 | max | their orders |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
        for c in cells {
            let Some((cold, created)) = &c.median.cold else { continue };
            let (mut hot, mut cold) = (c.median.latencies.clone(), cold.clone());
            hot.sort();
            cold.sort();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                c.strategy,
                c.batch_max.map_or_else(|| "default".to_owned(), |b| b.to_string()),
                ms(c.median.makespan),
                ms(percentile(&hot, 50.0)),
                ms(percentile(&hot, 99.0)),
                ms(percentile(&cold, 50.0)),
                ms(percentile(&cold, 99.0)),
                ms(cold.last().copied().unwrap_or_default()),
                created
            );
        }
    }
    if cells.iter().any(|c| c.median.events.is_some()) {
        let _ = writeln!(
            md,
            "\nThe outbox's relay over the run (every event recorded to delivered, read from the outbox once \
             empty):\n"
        );
        let _ = writeln!(md, "| strategy | batch | scenario | events | lag p50 ms | lag p99 ms | events/s |");
        let _ = writeln!(md, "|---|---|---|---:|---:|---:|---:|");
        for c in cells {
            let Some(e) = c.median.events else { continue };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:.1} | {:.1} | {:.0} |",
                c.strategy,
                c.batch_max.map_or_else(|| "default".to_owned(), |b| b.to_string()),
                c.scenario,
                e.delivered,
                e.lag_p50_ms,
                e.lag_p99_ms,
                e.per_second
            );
        }
    }
    if pay {
        let _ = writeln!(md, "\nPayment phase (every buyer with an order pays it, all at once):\n");
        let _ = writeln!(md, "| strategy | batch | scenario | makespan ms | payments/s | p50 | p99 | paid |");
        let _ = writeln!(md, "|---|---|---|---:|---:|---:|---:|---:|");
        for c in cells {
            if let Some((makespan, latencies, paid)) = &c.median.payment {
                let mut sorted = latencies.clone();
                sorted.sort();
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {:.0} | {} | {} | {} |",
                    c.strategy,
                    c.batch_max.map_or_else(|| "default".to_owned(), |b| b.to_string()),
                    c.scenario,
                    ms(*makespan),
                    latencies.len() as f64 / makespan.as_secs_f64().max(1e-9),
                    ms(percentile(&sorted, 50.0)),
                    ms(percentile(&sorted, 99.0)),
                    paid
                );
            }
        }
    }
    std::fs::write(out.join("latest.md"), &md)?;
    std::fs::write(out.join("latest.json"), json(cells))?;
    std::fs::write(out.join("makespan.svg"), svg(cells))?;
    if let Some(chart) = curves(cells) {
        std::fs::write(out.join("throughput.svg"), chart)?;
    }
    Ok(md)
}

fn json(cells: &[Cell]) -> String {
    let rows: Vec<serde_json::Value> = cells
        .iter()
        .map(|c| {
            serde_json::json!({
                "strategy": c.strategy,
                "batchMax": c.batch_max,
                "buyers": c.scenario.buyers,
                "stock": c.scenario.stock,
                "instances": c.scenario.instances,
                "runs": c.runs,
                "hotOptions": c.scenario.hot,
                "makespanMs": c.median.makespan.as_secs_f64() * 1000.0,
                "floorMs": c.median.floor.map(|f| f.as_secs_f64() * 1000.0),
                "created": c.median.created,
                "outOfStock": c.median.out_of_stock,
                "unavailable": c.median.unavailable,
                "other": c.median.other,
                "finalStock": c.median.final_stock,
                "retries": c.median.counters.retries,
                "refusedEarly": c.median.counters.refused_early,
                "orderBatches": c.median.counters.order_batches,
                "lockAcquisitions": c.median.counters.lock_acquisitions,
                "lockWaitMicros": c.median.counters.lock_wait_micros,
                "correct": c.all_correct,
                "referenceMs": reference_ms(&c.strategy, &c.scenario),
                "otherOptionsLatenciesMs": c.median.cold.as_ref().map(|(l, _)| {
                    let mut l = l.clone();
                    l.sort();
                    serde_json::json!({
                        "p50": percentile(&l, 50.0).as_secs_f64() * 1000.0,
                        "p99": percentile(&l, 99.0).as_secs_f64() * 1000.0,
                    })
                }),
            })
        })
        .collect();
    serde_json::to_string_pretty(&rows).unwrap_or_default()
}

/// A horizontal bar chart of makespans, with the reference's figure as a grey bar under ours where it has one.
fn svg(cells: &[Cell]) -> String {
    let row = 34.0;
    let (left, width) = (330.0, 560.0);
    let mut bars: Vec<(String, f64, bool)> = Vec::new();
    for c in cells {
        let label = format!(
            "{} · {}{}",
            c.strategy,
            c.scenario,
            c.batch_max.map_or_else(String::new, |b| format!(" · batch {b}"))
        );
        if let Some(rf) = reference_ms(&c.strategy, &c.scenario) {
            bars.push((format!("reference {} (NestJS)", c.strategy), rf as f64, true));
        }
        bars.push((label, c.median.makespan.as_secs_f64() * 1000.0, false));
    }
    let max = bars.iter().map(|b| b.1).fold(1.0, f64::max);
    let height = 50.0 + row * bars.len() as f64;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">
<text x="10" y="20" font-size="14">Time to the last response (ms), median of runs; grey: the reference</text>
"#,
        w = left + width + 80.0
    );
    for (i, (label, value, reference)) in bars.iter().enumerate() {
        let y = 35.0 + row * i as f64;
        let len = (value / max) * width;
        let fill = if *reference { "#b0b0b0" } else { "#3b7dd8" };
        let _ = writeln!(
            s,
            r#"<text x="{tx}" y="{ty}" text-anchor="end">{label}</text><rect x="{left}" y="{y}" width="{len:.1}" height="22" fill="{fill}"/><text x="{vx:.1}" y="{ty}">{value:.0}</text>"#,
            tx = left - 8.0,
            ty = y + 15.0,
            vx = left + len + 6.0,
            label = label.replace('&', "&amp;").replace('<', "&lt;"),
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Orders/s of one cell: its buyers over its makespan.
fn orders_per_second(c: &Cell) -> f64 {
    c.median.latencies.len() as f64 / c.median.makespan.as_secs_f64().max(1e-9)
}

/// Two line charts, one line per strategy and batch setting: orders/s against buyers (one hot option, one
/// instance) and against hot options (the largest buyer count measured over several); `None` unless one of them
/// has a line of two points or more.
fn curves(cells: &[Cell]) -> Option<String> {
    let plain = |c: &&Cell| c.scenario.instances == 1 && !c.scenario.sequential && c.scenario.cold.is_none();
    let line_of =
        |c: &Cell| format!("{}{}", c.strategy, c.batch_max.map_or_else(String::new, |b| format!(" · batch {b}")));
    let spread_buyers = cells.iter().filter(plain).filter(|c| c.scenario.hot > 1).map(|c| c.scenario.buyers).max();
    let mut by_buyers: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut by_options: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let add = |lines: &mut Vec<(String, Vec<(f64, f64)>)>, name: String, point: (f64, f64)| match lines
        .iter_mut()
        .find(|(n, _)| *n == name)
    {
        Some((_, points)) => points.push(point),
        None => lines.push((name, vec![point])),
    };
    for c in cells.iter().filter(plain) {
        if c.scenario.hot == 1 {
            add(&mut by_buyers, line_of(c), (c.scenario.buyers as f64, orders_per_second(c)));
        }
        if Some(c.scenario.buyers) == spread_buyers {
            add(&mut by_options, line_of(c), (c.scenario.hot as f64, orders_per_second(c)));
        }
    }
    let worth = |lines: &[(String, Vec<(f64, f64)>)]| lines.iter().any(|(_, p)| p.len() > 1);
    if !worth(&by_buyers) && !worth(&by_options) {
        return None;
    }
    let (panel_w, panel_h) = (520.0, 300.0);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<text x="10" y="20" font-size="14">Orders/s (median of runs), one instance, PostgreSQL</text>
"#,
        w = 2.0 * panel_w + 60.0,
        h = panel_h + 120.0
    );
    let options_title = format!("against hot options ({} buyers)", spread_buyers.unwrap_or(0));
    for (k, (title, lines)) in
        [("against buyers (one hot option)".to_owned(), by_buyers), (options_title, by_options)].into_iter().enumerate()
    {
        panel(&mut s, 20.0 + k as f64 * (panel_w + 20.0), 40.0, panel_w, panel_h, &title, &lines);
    }
    s.push_str("</svg>\n");
    Some(s)
}

const COLOURS: [&str; 8] = ["#3b7dd8", "#d8563b", "#3bb273", "#a23bd8", "#d8a23b", "#3bc4d8", "#7d7d7d", "#d83b8f"];

/// One panel: a log-scale x axis (the measured values as ticks), a linear y axis from 0, a polyline per line.
fn panel(s: &mut String, x0: f64, y0: f64, w: f64, h: f64, title: &str, lines: &[(String, Vec<(f64, f64)>)]) {
    let (left, bottom) = (60.0, 40.0);
    let (pw, ph) = (w - left - 10.0, h - bottom - 20.0);
    let xs: Vec<f64> = {
        let mut xs: Vec<f64> = lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        xs
    };
    let ymax = lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)).fold(1.0, f64::max) * 1.1;
    let (lo, hi) = (xs.first().copied().unwrap_or(1.0).ln(), xs.last().copied().unwrap_or(1.0).ln());
    let x_at = |x: f64| x0 + left + if hi > lo { (x.ln() - lo) / (hi - lo) * pw } else { pw / 2.0 };
    let y_at = |y: f64| y0 + 20.0 + ph - y / ymax * ph;
    let _ = writeln!(s, r#"<text x="{}" y="{}">{}</text>"#, x0 + left, y0 + 12.0, title);
    let _ = writeln!(
        s,
        r##"<line x1="{a}" y1="{b}" x2="{c}" y2="{b}" stroke="#444"/><line x1="{a}" y1="{b}" x2="{a}" y2="{d}" stroke="#444"/>"##,
        a = x0 + left,
        b = y0 + 20.0 + ph,
        c = x0 + left + pw,
        d = y0 + 20.0
    );
    for x in &xs {
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{x}</text>"#, x_at(*x), y0 + 36.0 + ph);
    }
    for i in 0..=4 {
        let y = ymax * f64::from(i) / 4.0;
        let _ =
            writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{y:.0}</text>"#, x0 + left - 6.0, y_at(y) + 4.0);
    }
    for (i, (name, points)) in lines.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut points = points.clone();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let path: Vec<String> = points.iter().map(|(x, y)| format!("{:.1},{:.1}", x_at(*x), y_at(*y))).collect();
        let _ =
            writeln!(s, r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#, path.join(" "));
        for (x, y) in &points {
            let _ = writeln!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#, x_at(*x), y_at(*y));
        }
        let ly = y0 + 60.0 + ph + 14.0 * (i / 2) as f64;
        let lx = x0 + left + (i % 2) as f64 * (pw / 2.0);
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{}" width="10" height="10" fill="{colour}"/><text x="{}" y="{ly}">{}</text>"#,
            ly - 9.0,
            lx + 14.0,
            name.replace('&', "&amp;").replace('<', "&lt;")
        );
    }
}
