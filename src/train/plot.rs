//! The run's curves as one PNG (`output_dir/training.png`, written at the end of training and by
//! `moeq plot RUN_DIR`), from its `metrics.jsonl`: training loss (and validation loss where
//! the run evaluated), learning rate, tokens/s, and a heat map of the tokens each layer routed
//! to each expert over the run (each layer's row as shares of its tokens, so an unbalanced
//! router shows as bright cells). Drawn with plotters into a bitmap; text in the embedded
//! DejaVu Sans (`assets/fonts`), so no system font is needed.

use plotters::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The file name the plot gets in a run's directory.
pub const PLOT_FILE: &str = "training.png";

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// What `metrics.jsonl` records, by step.
#[derive(Debug, Default, PartialEq)]
pub struct Curves {
    /// (step, mean training loss over the logging window).
    pub loss: Vec<(f64, f64)>,
    pub eval_loss: Vec<(f64, f64)>,
    pub lr: Vec<(f64, f64)>,
    pub tokens_per_s: Vec<(f64, f64)>,
    /// [layer][global expert] tokens routed, summed over the records (empty for dense models).
    pub expert_tokens: Vec<Vec<u64>>,
}

/// The curves of a `metrics.jsonl`: records without a field leave that curve alone, skipped
/// steps and unreadable lines (a line cut by a crash) are passed over.
pub fn read_curves(path: &Path) -> Result<Curves, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "{}: {e} (give the output_dir of a moeq training run)",
            path.display()
        )
    })?;
    let mut c = Curves::default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(step) = v.get("step").and_then(Value::as_f64) else {
            continue;
        };
        let point = |key: &str, into: &mut Vec<(f64, f64)>| {
            if let Some(y) = v.get(key).and_then(Value::as_f64).filter(|y| y.is_finite()) {
                into.push((step, y));
            }
        };
        point("loss", &mut c.loss);
        point("eval_loss", &mut c.eval_loss);
        point("lr", &mut c.lr);
        point("tokens_per_s", &mut c.tokens_per_s);
        if let Some(layers) = v.get("expert_tokens").and_then(Value::as_array) {
            for (l, row) in layers.iter().enumerate() {
                let row: Vec<u64> = row
                    .as_array()
                    .map(|r| r.iter().map(|x| x.as_u64().unwrap_or(0)).collect())
                    .unwrap_or_default();
                if c.expert_tokens.len() <= l {
                    c.expert_tokens.push(Vec::new());
                }
                let acc = &mut c.expert_tokens[l];
                if acc.len() < row.len() {
                    acc.resize(row.len(), 0);
                }
                acc.iter_mut().zip(&row).for_each(|(a, x)| *a += x);
            }
        }
    }
    if c.loss.is_empty() {
        return Err(format!(
            "{}: no training steps recorded yet (nothing to plot)",
            path.display()
        ));
    }
    Ok(c)
}

/// Draws `curves` into a PNG at `out` (written beside it first, then renamed into place).
pub fn draw(curves: &Curves, title: &str, out: &Path) -> Result<(), String> {
    register_font()?;
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("plot");
    let tmp = out.with_file_name(format!(".{name}.partial.png"));
    let result = draw_into(curves, title, &tmp)
        .and_then(|()| std::fs::rename(&tmp, out).map_err(|e| e.to_string()));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| format!("plot {}: {e}", out.display()))
}

/// `read_curves` of `dir/metrics.jsonl` drawn into `dir/training.png` (or `out`).
pub fn plot_run(dir: &Path, out: Option<&Path>) -> Result<PathBuf, String> {
    let curves = read_curves(&dir.join("metrics.jsonl"))?;
    let out = out.map_or_else(|| dir.join(PLOT_FILE), Path::to_path_buf);
    let title = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    draw(&curves, &format!("moeq: {title}"), &out)?;
    Ok(out)
}

fn register_font() -> Result<(), String> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err("the embedded font did not load".into())
    }
}

type Panel<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw_into(c: &Curves, title: &str, path: &Path) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let root = BitMapBackend::new(path, (1600, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 28))
        .map_err(|e| err(&e))?;
    let panels = root.split_evenly((2, 2));
    let mut losses = vec![("training loss", &c.loss, BLUE)];
    if !c.eval_loss.is_empty() {
        losses.push(("validation loss", &c.eval_loss, RED));
    }
    line_panel(&panels[0], "loss", &losses).map_err(|e| err(&e))?;
    line_panel(&panels[1], "learning rate", &[("lr", &c.lr, GREEN)]).map_err(|e| err(&e))?;
    line_panel(
        &panels[2],
        "tokens/s",
        &[("tokens/s", &c.tokens_per_s, MAGENTA)],
    )
    .map_err(|e| err(&e))?;
    heat_map(&panels[3], &c.expert_tokens).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

type DrawResult =
    Result<(), DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

/// A named curve of (step, value) points and its colour.
type Line<'a> = (&'a str, &'a Vec<(f64, f64)>, RGBColor);

/// Lines over steps, each named in a legend; an empty panel says there is nothing to show.
fn line_panel(area: &Panel, caption: &str, lines: &[Line]) -> DrawResult {
    let points = lines.iter().flat_map(|(_, p, _)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        area.draw(&Text::new(
            format!("{caption}: not recorded"),
            (40, 40),
            ("sans-serif", 20),
        ))?;
        return Ok(());
    }
    let pad = ((y1 - y0) * 0.05).max(y1.abs() * 1e-3).max(1e-12);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format_tick(*y))
        .label_style(("sans-serif", 14))
        .draw()?;
    for (name, pts, color) in lines {
        let color = *color;
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    // A legend only where a panel has more than one line (the caption names a single one).
    if lines.len() > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    Ok(())
}

/// Tokens per expert per layer over the run, each layer's row as shares of its tokens, on a
/// white (none) to dark red (the layer's busiest expert) scale.
fn heat_map(area: &Panel, tokens: &[Vec<u64>]) -> DrawResult {
    let experts = tokens.iter().map(Vec::len).max().unwrap_or(0);
    if experts == 0 {
        area.draw(&Text::new(
            "tokens per expert: no routed experts recorded",
            (40, 40),
            ("sans-serif", 20),
        ))?;
        return Ok(());
    }
    let layers = tokens.len();
    let mut chart = ChartBuilder::on(area)
        .caption(
            "tokens per expert and layer (share of the layer's tokens)",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (0..experts - 1).into_segmented(),
            (0..layers - 1).into_segmented(),
        )?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("expert")
        .y_desc("layer")
        .label_style(("sans-serif", 14))
        .draw()?;
    let busiest = tokens
        .iter()
        .map(|row| {
            let total: u64 = row.iter().sum();
            row.iter()
                .map(|&t| t as f64 / total.max(1) as f64)
                .fold(0.0, f64::max)
        })
        .fold(0.0, f64::max)
        .max(1e-12);
    chart.draw_series(tokens.iter().enumerate().flat_map(|(l, row)| {
        let total: u64 = row.iter().sum();
        row.iter().enumerate().map(move |(e, &t)| {
            let share = t as f64 / total.max(1) as f64 / busiest;
            let fill = shade(share);
            Rectangle::new(
                [
                    (SegmentValue::Exact(e), SegmentValue::Exact(l)),
                    (SegmentValue::Exact(e + 1), SegmentValue::Exact(l + 1)),
                ],
                fill.filled(),
            )
        })
    }))?;
    Ok(())
}

/// White at 0 through orange to dark red at 1.
fn shade(v: f64) -> RGBColor {
    let v = v.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64, t: f64| (a + (b - a) * t).round() as u8;
    if v < 0.5 {
        let t = v / 0.5;
        RGBColor(255, lerp(255.0, 165.0, t), lerp(255.0, 0.0, t))
    } else {
        let t = (v - 0.5) / 0.5;
        RGBColor(lerp(255.0, 139.0, t), lerp(165.0, 0.0, t), 0)
    }
}

/// A tick label with the precision its magnitude needs (learning rates are ~1e-4).
fn format_tick(y: f64) -> String {
    let a = y.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-2..1e5).contains(&a) {
        format!("{y:.1e}")
    } else if a >= 100.0 {
        format!("{y:.0}")
    } else {
        format!("{y:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_are_read_by_field_and_skip_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(
            &path,
            concat!(
                "{\"step\":1,\"loss\":3.0,\"lr\":0.0,\"tokens_per_s\":100.0,\"expert_tokens\":[[1,2],[3,0]]}\n",
                "{\"step\":2,\"skipped\":true,\"skipped_steps\":1}\n",
                "{\"step\":3,\"loss\":2.5,\"lr\":1e-4,\"tokens_per_s\":120.0,\"expert_tokens\":[[1,0],[0,4]]}\n",
                "{\"step\":3,\"eval_loss\":2.7,\"eval_accuracy\":0.1}\n",
                "{\"step\":4,\"loss\":2.",
            ),
        )
        .unwrap();
        let c = read_curves(&path).unwrap();
        assert_eq!(c.loss, vec![(1.0, 3.0), (3.0, 2.5)]);
        assert_eq!(c.eval_loss, vec![(3.0, 2.7)]);
        assert_eq!(c.lr, vec![(1.0, 0.0), (3.0, 1e-4)]);
        assert_eq!(c.tokens_per_s, vec![(1.0, 100.0), (3.0, 120.0)]);
        assert_eq!(c.expert_tokens, vec![vec![2, 2], vec![3, 4]]);
    }

    #[test]
    fn a_file_without_steps_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"step\":1,\"skipped\":true}\n").unwrap();
        let e = read_curves(&path).unwrap_err();
        assert!(
            e.contains("metrics.jsonl") && e.contains("no training steps"),
            "{e}"
        );
        let e = read_curves(&dir.path().join("missing.jsonl")).unwrap_err();
        assert!(e.contains("output_dir of a moeq training run"), "{e}");
    }

    #[test]
    fn shades_run_from_white_to_dark_red() {
        assert_eq!(shade(0.0), RGBColor(255, 255, 255));
        assert_eq!(shade(0.5), RGBColor(255, 165, 0));
        assert_eq!(shade(1.0), RGBColor(139, 0, 0));
        assert_eq!(format_tick(2e-4), "2.0e-4");
        assert_eq!(format_tick(2.5), "2.500");
        assert_eq!(format_tick(12345.0), "12345");
    }
}
