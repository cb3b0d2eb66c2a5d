//! Plots of training runs: one panel per metric (loss, eval loss, learning rate, grad norm
//! and each method's key metrics), the raw curve faint and a smoothed one (TensorBoard's
//! debiased exponential moving average) solid, one colour per run. Written as SVG and PNG
//! at the end of every run (`RUN/plots/metrics.svg`, `RUN/plots/metrics.png`) and by
//! `burnish plot`.

use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;
use std::path::Path;

/// Metrics drawn when a run has them, in this order; other `eval_*` metrics follow.
pub const PANELS: &[&str] = &[
    "loss",
    "eval_loss",
    "lr",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "kl",
    "entropy",
    "completions/mean_length",
    "objective/scores",
    "objective/kl",
    "objective/rlhf_reward",
    "policy/entropy",
    "loss/value",
    "divergence",
    "accuracy",
];

/// TensorBoard's default smoothing weight.
pub const SMOOTHING: f64 = 0.6;

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One run's curves: its label and its metrics records.
pub struct Run {
    pub label: String,
    pub records: Vec<Value>,
}

/// (step, value) points of `key` in a run.
fn series(records: &[Value], key: &str) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter_map(|r| {
            let step = r.get("step")?.as_f64()?;
            let v = r.get(key)?.as_f64()?;
            v.is_finite().then_some((step, v))
        })
        .collect()
}

/// TensorBoard's smoothing: an exponential moving average, debiased for its start.
pub fn smooth(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let mut last = 0.0;
    let mut n = 0;
    points
        .iter()
        .map(|&(x, y)| {
            last = last * weight + (1.0 - weight) * y;
            n += 1;
            let debias = 1.0 - weight.powi(n);
            (x, if debias > 0.0 { last / debias } else { y })
        })
        .collect()
}

/// The panels to draw: the preferred metrics any run has, then its other `eval_*` ones.
pub fn panels(runs: &[Run]) -> Vec<String> {
    let has = |k: &str| runs.iter().any(|r| series(&r.records, k).len() >= 2);
    let mut out: Vec<String> = PANELS
        .iter()
        .filter(|k| has(k))
        .map(|k| k.to_string())
        .collect();
    let mut extra: Vec<String> = runs
        .iter()
        .flat_map(|r| r.records.iter())
        .filter_map(Value::as_object)
        .flat_map(|o| o.keys())
        .filter(|k| k.starts_with("eval_") && !out.contains(k))
        .cloned()
        .collect();
    extra.sort();
    extra.dedup();
    out.extend(extra.into_iter().filter(|k| has(k)));
    out
}

fn font() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            include_bytes!("../../assets/fonts/DejaVuSansMono.ttf"),
        )
        .is_ok()
    });
    match ok {
        true => Ok(()),
        false => bail!("the bundled plot font could not be loaded"),
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    runs: &[Run],
    keys: &[String],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("plot: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let cols = keys.len().clamp(1, 3);
    let rows = keys.len().div_ceil(cols).max(1);
    let areas = root.split_evenly((rows, cols));
    for (key, area) in keys.iter().zip(areas.iter()) {
        let all: Vec<Vec<(f64, f64)>> = runs.iter().map(|r| series(&r.records, key)).collect();
        let points = all.iter().flatten();
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in points {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            continue;
        }
        if x1 - x0 < 1e-12 {
            x1 = x0 + 1.0;
        }
        // A flat curve (a constant learning rate) gets a band around its value.
        let pad = match y1 - y0 {
            span if span > 1e-9 * y1.abs().max(y0.abs()) => span * 0.05,
            _ => (y1.abs() * 0.1).max(1e-9),
        };
        let mut chart = ChartBuilder::on(area)
            .caption(key, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_labels(5)
            .y_labels(5)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| tick(*y))
            .label_style(("sans-serif", 11))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        for (i, pts) in all.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            if pts.len() > 2 {
                chart
                    .draw_series(LineSeries::new(pts.iter().copied(), colour.mix(0.3)))
                    .map_err(err)?;
            }
            let line = chart
                .draw_series(LineSeries::new(
                    smooth(pts, SMOOTHING),
                    colour.stroke_width(2),
                ))
                .map_err(err)?;
            if runs.len() > 1 {
                line.label(runs[i].label.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                });
            }
        }
        if runs.len() > 1 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 11))
                .draw()
                .map_err(err)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

/// A tick label with the digits it needs: `0.0003` as `3.0e-4`, `12.5` as `12.5`.
fn tick(y: f64) -> String {
    let a = y.abs();
    if a < 1e-12 {
        return "0".into();
    }
    if !(1e-2..1e5).contains(&a) {
        format!("{y:.1e}")
    } else {
        let s = format!("{y:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Draw `runs` to `out` (`.svg` or `.png`); returns the metrics drawn.
pub fn plot(runs: &[Run], out: &Path) -> Result<Vec<String>> {
    let keys = panels(runs);
    if keys.is_empty() {
        bail!("nothing to plot: no metric has two logged points");
    }
    let cols = keys.len().clamp(1, 3) as u32;
    let rows = keys.len().div_ceil(cols as usize) as u32;
    let size = (420 * cols, 280 * rows);
    let ext = out.extension().and_then(|e| e.to_str()).unwrap_or("");
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    // Drawn beside its place and renamed: a plot is whole or absent.
    let tmp = out.with_extension(format!("tmp-{}.{ext}", std::process::id()));
    // Both backends measure text with the registered font.
    font()?;
    let drawn = match ext {
        "svg" => draw(
            &SVGBackend::new(&tmp, size).into_drawing_area(),
            runs,
            &keys,
        ),
        "png" => draw(
            &BitMapBackend::new(&tmp, size).into_drawing_area(),
            runs,
            &keys,
        ),
        other => bail!("{}: plots are .svg or .png, not `.{other}`", out.display()),
    };
    if let Err(e) = drawn {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(keys)
}

/// The SVG and PNG of one run, in `RUN/plots/`.
pub fn plot_run(run_dir: &Path) -> Result<()> {
    let records = crate::metrics::read_metrics(&run_dir.join("metrics.jsonl"))?;
    let label = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let runs = [Run { label, records }];
    let dir = run_dir.join("plots");
    plot(&runs, &dir.join("metrics.svg"))?;
    plot(&runs, &dir.join("metrics.png"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_tensorboards_debiased_ema() {
        let s = smooth(&[(0.0, 1.0), (1.0, 3.0)], 0.5);
        assert_eq!(s[0].1, 1.0);
        // (0.25 * 1 + 0.5 * 3) / (1 - 0.25)
        assert!((s[1].1 - (0.25 + 1.5) / 0.75).abs() < 1e-12);
    }

    #[test]
    fn panels_follow_the_preferred_order() {
        let records: Vec<Value> = (0..3)
            .map(|s| serde_json::json!({"step": s, "lr": 0.1, "loss": 1.0, "eval_acc": 0.5, "tokens": 5}))
            .collect();
        let runs = [Run {
            label: "a".into(),
            records,
        }];
        assert_eq!(panels(&runs), ["loss", "lr", "eval_acc"]);
    }
}
