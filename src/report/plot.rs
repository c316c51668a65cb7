//! `loss.png`: the training loss per step (raw, and a trailing moving mean) above the learning
//! rate, drawn with plotters into a bitmap and written atomically; text in the DejaVu Sans subset
//! embedded from `assets/fonts` (no system fonts needed).

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

use super::metrics::StepRecord;

/// The plot's file name in the output folder.
pub(crate) const LOSS_PLOT: &str = "loss.png";
/// Its size in pixels.
pub(crate) const WIDTH: u32 = 900;
pub(crate) const HEIGHT: u32 = 600;

/// The moving-mean window for `n` steps: a tenth of them, from 1 to 50.
pub(crate) fn smoothing_window(n: usize) -> usize {
    n.div_ceil(10).clamp(1, 50)
}

/// The trailing mean of the last `window` values at each point (fewer at the start).
pub(crate) fn moving_mean(values: &[f64], window: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(values.len());
    let mut sum = 0.0;
    for (i, v) in values.iter().enumerate() {
        sum += v;
        if i >= window {
            sum -= values[i - window];
        }
        out.push(sum / (i + 1).min(window) as f64);
    }
    out
}

/// `(lo, hi)` of `values` padded by 5% (and widened when flat), for an axis.
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = if hi > lo { hi - lo } else { lo.abs().max(1e-12) };
    (lo - 0.05 * span, hi + 0.05 * span)
}

/// The colour of the evaluation points.
const EVAL_COLOUR: RGBColor = RGBColor(30, 150, 60);

/// Draw `records` (step order) and the fixed-noise evaluation losses `evals` (`(step, loss)`,
/// as points) as RGB pixels, `WIDTH` x `HEIGHT`.
pub(crate) fn render(records: &[StepRecord], evals: &[(u64, f64)]) -> Result<Vec<u8>> {
    super::pixels::register_font()?;
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {LOSS_PLOT}: {e}");
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    let points: Vec<(f64, f64)> = records.iter().filter(|r| r.loss.is_finite()).map(|r| (r.step as f64, r.loss)).collect();
    let window = smoothing_window(points.len());
    let smooth = moving_mean(&points.iter().map(|p| p.1).collect::<Vec<_>>(), window);
    let first = records.first().map_or(0, |r| r.step) as f64;
    let last = records.last().map_or(1, |r| r.step) as f64;
    let x_range = first.min(last - 1.0).max(0.0)..last.max(first + 1.0);
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (top, bottom) = root.split_vertically(HEIGHT * 64 / 100);

        let evals: Vec<(f64, f64)> = evals.iter().filter(|e| e.1.is_finite()).map(|&(s, e)| (s as f64, e)).collect();
        let (lo, hi) = padded_range(points.iter().chain(&evals).map(|p| p.1));
        let mut loss = ChartBuilder::on(&top)
            .caption(format!("training loss ({} steps)", records.len()), (super::pixels::FAMILY, 22))
            .margin(12)
            .x_label_area_size(28)
            .y_label_area_size(70)
            .build_cartesian_2d(x_range.clone(), lo..hi)
            .map_err(|e| err(&e))?;
        loss.configure_mesh().light_line_style(RGBColor(238, 238, 238)).y_desc("loss").x_label_formatter(&|x| format!("{x:.0}")).y_label_formatter(&|y| format!("{y:.4}")).label_style((super::pixels::FAMILY, 14)).draw().map_err(|e| err(&e))?;
        let raw_colour = RGBColor(120, 160, 220);
        loss.draw_series(LineSeries::new(points.iter().copied(), raw_colour.stroke_width(1)))
            .map_err(|e| err(&e))?
            .label("loss per step")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], raw_colour.stroke_width(2)));
        let smooth_colour = RGBColor(20, 60, 160);
        loss.draw_series(LineSeries::new(points.iter().zip(&smooth).map(|(p, s)| (p.0, *s)), smooth_colour.stroke_width(3)))
            .map_err(|e| err(&e))?
            .label(format!("mean of the last {window} step(s)"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], smooth_colour.stroke_width(3)));
        if !evals.is_empty() {
            loss.draw_series(evals.iter().map(|&p| Circle::new(p, 5, EVAL_COLOUR.filled())))
                .map_err(|e| err(&e))?
                .label("eval loss (fixed noise)")
                .legend(move |(x, y)| Circle::new((x + 10, y), 5, EVAL_COLOUR.filled()));
        }
        loss.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((super::pixels::FAMILY, 14))
            .draw()
            .map_err(|e| err(&e))?;

        let lrs: Vec<(f64, f64)> = records.iter().map(|r| (r.step as f64, r.lr)).collect();
        // From zero (where warm-up starts and decays end), so a constant rate is a flat line
        // at its height.
        let (lo, hi) = match padded_range(lrs.iter().map(|p| p.1)) {
            (lo, hi) if lrs.iter().all(|p| p.1 >= 0.0) => (0.0, hi.max(lo + f64::MIN_POSITIVE)),
            range => range,
        };
        let mut lr = ChartBuilder::on(&bottom)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x_range, lo..hi)
            .map_err(|e| err(&e))?;
        lr.configure_mesh()
            .light_line_style(RGBColor(238, 238, 238))
            .y_labels(5)
            .x_desc("step")
            .y_desc("learning rate")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.1e}"))
            .label_style((super::pixels::FAMILY, 14))
            .draw()
            .map_err(|e| err(&e))?;
        lr.draw_series(LineSeries::new(lrs, RGBColor(200, 90, 20).stroke_width(2))).map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(buf)
}

/// Redraw `out` from the steps of `metrics` (`metrics.jsonl`). Returns false, writing nothing,
/// when there is no step yet.
pub(crate) fn write_loss_plot(metrics: &Path, out: &Path) -> Result<bool> {
    let records = super::metrics::read_steps(metrics)?;
    if records.is_empty() {
        return Ok(false);
    }
    let rgb = render(&records, &super::metrics::read_evals(metrics)?)?;
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, rgb).context("plot buffer size")?;
    let png = super::pixels::encode_png(&img)?;
    crate::util::fs::write_atomic(out, &png).with_context(|| format!("writing {}", out.display()))?;
    Ok(true)
}

/// [`write_loss_plot`] while training: a failure is reported, never fatal to the run.
pub(crate) fn refresh(metrics: &Path, out: &Path) {
    if let Err(e) = write_loss_plot(metrics, out) {
        tracing::warn!("{}: {e:#}", out.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_mean_by_hand() {
        let m = moving_mean(&[1.0, 2.0, 3.0, 4.0, 5.0], 2);
        assert_eq!(m, vec![1.0, 1.5, 2.5, 3.5, 4.5]);
        assert_eq!(moving_mean(&[4.0, 2.0], 5), vec![4.0, 3.0]);
        assert_eq!(smoothing_window(30), 3);
        assert_eq!(smoothing_window(1), 1);
        assert_eq!(smoothing_window(100_000), 50);
    }

    /// Text renders: the caption band (above the plot area, where only the title is drawn) has
    /// dark pixels, which only glyphs can put there; so do the axis-label columns at the left.
    #[test]
    fn draws_curves_and_text() {
        let records: Vec<StepRecord> =
            (1..=40).map(|s| StepRecord { step: s, loss: 1.0 / s as f64 + 0.05 * ((s * 7 % 5) as f64), lr: 1e-3 * (1.0 - s as f64 / 40.0) }).collect();
        let rgb = render(&records, &[]).unwrap();
        let px = |x: u32, y: u32| {
            let i = ((y * WIDTH + x) * 3) as usize;
            [rgb[i], rgb[i + 1], rgb[i + 2]]
        };
        let dark = |x0: u32, x1: u32, y0: u32, y1: u32| (y0..y1).flat_map(|y| (x0..x1).map(move |x| (x, y))).filter(|&(x, y)| px(x, y).iter().all(|&c| c < 100)).count();
        assert!(dark(WIDTH / 3, 2 * WIDTH / 3, 12, 34) > 50, "the title's glyphs in the caption band");
        assert!(dark(0, 70, 40, HEIGHT * 64 / 100 - 40) > 50, "the loss axis labels");
        // The raw-loss colour appears (the curve is drawn).
        let blue = (0..HEIGHT).flat_map(|y| (0..WIDTH).map(move |x| (x, y))).filter(|&(x, y)| px(x, y) == [120, 160, 220]).count();
        assert!(blue > 100, "the raw loss curve: {blue} pixels");
    }

    /// The evaluation points are drawn in their colour, and only when there are some.
    #[test]
    fn draws_the_evaluation_points() {
        let records: Vec<StepRecord> = (1..=20).map(|s| StepRecord { step: s, loss: 1.0, lr: 1e-3 }).collect();
        let count = |rgb: &[u8]| rgb.chunks(3).filter(|c| *c == [EVAL_COLOUR.0, EVAL_COLOUR.1, EVAL_COLOUR.2]).count();
        assert_eq!(count(&render(&records, &[]).unwrap()), 0);
        assert!(count(&render(&records, &[(0, 1.2), (20, 0.8)]).unwrap()) > 40, "two filled circles (and the legend's)");
    }

    #[test]
    fn writes_a_png_of_the_plot_size_or_nothing_without_steps() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.jsonl");
        let out = dir.path().join(LOSS_PLOT);
        assert!(!write_loss_plot(&metrics, &out).unwrap());
        assert!(!out.exists());
        std::fs::write(&metrics, "{\"step\":1,\"loss\":0.3,\"lr\":1e-4}\n").unwrap();
        assert!(write_loss_plot(&metrics, &out).unwrap(), "one step is enough to draw");
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
    }
}
