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
        "| strategy | batch | scenario | makespan ms | reference ms | orders/s | p50 | p95 | p99 | max | 201 | 409 | 503 | other | early 409 | retries | lock wait avg ms | mean batch | final stock | correct |"
    );
    let _ = writeln!(
        md,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
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
            "| {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.strategy,
            c.batch_max.map_or_else(|| "default".to_owned(), |b| b.to_string()),
            c.scenario,
            ms(r.makespan),
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
                "makespanMs": c.median.makespan.as_secs_f64() * 1000.0,
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
