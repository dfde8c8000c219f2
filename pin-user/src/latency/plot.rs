//! Pictures of a latency run (plotters, pure Rust): the latency histogram with
//! log-scale counts, like the classic cyclictest frequency plots, and the
//! noise timeline of the measured CPU (each slot's longest wait, colored by
//! its cause, over the intruder slices).
//!
//! Text is rasterized with ab_glyph from a TrueType font found on the host
//! (no fontconfig/freetype), so labels look the same in SVG and PNG.
use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use plotters::{
    coord::Shift,
    prelude::*,
    style::{
        FontStyle, register_font,
        text_anchor::{HPos, Pos, VPos},
    },
};
use thiserror::Error;

use super::{
    attribution::Category,
    compare::Run,
    report::{Report, fmt_ns},
};

#[derive(Debug, Error, Clone)]
pub enum PlotError {
    #[error(
        "no TrueType font for the pictures' labels: install fonts-dejavu-core (Debian/Ubuntu) or \
         dejavu-sans-fonts (Fedora/RHEL), or set {FONT_ENV} to a .ttf file"
    )]
    NoFont,
    #[error("font {path}: {reason}")]
    BadFont { path: PathBuf, reason: String },
    #[error("drawing the {what}: {reason}")]
    Draw { what: &'static str, reason: String },
    #[error("writing {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// Environment variable naming the font file to use.
pub const FONT_ENV: &str = "PINGUARD_FONT";

/// Where distributions put a sans-serif TrueType font.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

pub const SIZE: (u32, u32) = (1000, 600);
/// Bottom of the histogram's log axis: below 1, so single samples get a visible bar.
const BASE: f64 = 0.5;
/// Histogram bars and the overflow bar.
pub const BAR: RGBColor = RGBColor(0x1F, 0x77, 0xB4);
pub const OVERFLOW: RGBColor = RGBColor(0xD6, 0x27, 0x28);
/// Intruder slices in the timeline.
pub const SPAN: RGBColor = RGBColor(0x94, 0x67, 0xBD);
const BACKGROUND: RGBColor = WHITE;

/// Color of a cause category (see `Cause::category`).
pub fn cause_color(category: Category) -> RGBColor {
    match category {
        Category::Irq => RGBColor(0xD6, 0x27, 0x28),
        Category::Softirq => RGBColor(0xFF, 0x7F, 0x0E),
        Category::Intruder => RGBColor(0x6A, 0x3D, 0x9A),
        Category::KernelThread => RGBColor(0x8C, 0x56, 0x4B),
        Category::Thread => RGBColor(0x17, 0xBE, 0xCF),
        Category::Nmi => RGBColor(0xE3, 0x77, 0xC2),
        Category::IdleExit => RGBColor(0x2C, 0xA0, 0x2C),
        Category::WakeupPath => RGBColor(0x7F, 0x7F, 0x7F),
    }
}

/// Every category, in legend order, with its legend label.
const CATEGORIES: &[(Category, &str)] = &[
    (Category::Intruder, "intruder thread"),
    (Category::KernelThread, "kernel thread"),
    (Category::Thread, "other thread"),
    (Category::Irq, "hard IRQ"),
    (Category::Softirq, "softirq"),
    (Category::Nmi, "NMI"),
    (Category::IdleExit, "exit from idle"),
    (Category::WakeupPath, "wake-up path"),
];

/// Finds and registers the labels' font once per process; call it before a
/// long run so a missing font fails fast.
pub fn ensure_font() -> Result<PathBuf, PlotError> {
    static FONT: OnceLock<Result<PathBuf, PlotError>> = OnceLock::new();
    FONT.get_or_init(|| {
        let path = find_font().ok_or(PlotError::NoFont)?;
        let bytes = std::fs::read(&path).map_err(|e| PlotError::BadFont {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        // plotters keeps registered fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        for style in [FontStyle::Normal, FontStyle::Bold] {
            register_font("sans-serif", style, bytes).map_err(|_| PlotError::BadFont {
                path: path.clone(),
                reason: "not a TrueType/OpenType font".into(),
            })?;
        }
        Ok(path)
    })
    .clone()
}

fn find_font() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(FONT_ENV) {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = FONT_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
    {
        return Some(p);
    }
    // Any .ttf under /usr/share/fonts, sans-serif faces first.
    let mut found = Vec::new();
    collect_ttf(Path::new("/usr/share/fonts"), 4, &mut found);
    found.sort_by_key(|p| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        (
            !name.contains("sans"),
            name.contains("mono"),
            name.contains("bold") || name.contains("italic"),
            p.clone(),
        )
    });
    found.into_iter().next()
}

fn collect_ttf(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() && depth > 0 {
            collect_ttf(&p, depth - 1, out);
        } else if p.extension().is_some_and(|x| x.eq_ignore_ascii_case("ttf")) {
            out.push(p);
        }
    }
}

fn draw_err<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> PlotError {
    move |e| PlotError::Draw {
        what,
        reason: format!("{e:?}"),
    }
}

/// Axis labels without needless decimals: 1000, 40, 0.5.
fn number(v: f64) -> String {
    if v >= 10.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn title(r: &Report, what: &str) -> String {
    format!(
        "{what}, CPU {}: {} {}",
        r.run.cpu, r.host.kernel_release, r.host.preemption.model
    )
}

/// What a histogram's x axis shows of one run: its buckets, where its
/// bulk ends, and what lies past the bulk (overflows, the max).
#[derive(Debug, Clone, Copy)]
pub struct Extent {
    /// Where the bulk ends: p99.9, or the last bucket when p99.9 is among the overflows.
    pub bulk_us: u64,
    pub max_us: u64,
}

impl Extent {
    pub fn of(buckets: &[(u64, u64)], p99_9_us: u64, p99_9_overflowed: bool, max_us: u64) -> Self {
        let last = buckets.last().map_or(0, |b| b.0);
        Self {
            bulk_us: if p99_9_overflowed {
                last
            } else {
                p99_9_us.min(last.max(1))
            },
            max_us,
        }
    }
}

/// 1, 2, 5, 10, 20, 50, ...: the smallest at least `v`.
fn nice_ceiling(v: u64) -> u64 {
    let mut base = 1u64;
    loop {
        for m in [1, 2, 5] {
            if base * m >= v {
                return base * m;
            }
        }
        base *= 10;
    }
}

/// Where the x axis ends (µs): at the largest sample when that is not far
/// past the bulk of every run, else at the bulk (the largest p99.9) with a
/// margin, rounded up, so one 17 ms outlier does not squash 20-80 µs into
/// a few pixels; what lies beyond is annotated, not drawn.
pub fn axis_end(runs: &[Extent]) -> u64 {
    let bulk = runs.iter().map(|r| r.bulk_us).max().unwrap_or(0);
    let max = runs.iter().map(|r| r.max_us).max().unwrap_or(0);
    let cut = nice_ceiling((bulk + bulk / 2).max(20));
    if max <= cut * 2 {
        (max + (max / 20).max(2)).max(10)
    } else {
        cut
    }
}

/// "3 samples beyond 200 µs, 22 overflows (≥1000 µs), max 16974 µs", or
/// `None` when the axis shows everything.
pub fn beyond_note(
    buckets: &[(u64, u64)],
    overflows: u64,
    range_us: Option<u64>,
    max_us: u64,
    end_us: u64,
) -> Option<String> {
    let beyond: u64 = buckets.iter().filter(|b| b.0 > end_us).map(|b| b.1).sum();
    if beyond == 0 && overflows == 0 {
        return None;
    }
    let mut parts = Vec::new();
    if beyond > 0 {
        parts.push(format!("{beyond} beyond {end_us} µs"));
    }
    if overflows > 0 {
        parts.push(match range_us {
            Some(r) => format!("{overflows} overflows (≥{r} µs)"),
            None => format!("{overflows} overflows"),
        });
    }
    parts.push(format!("max {max_us} µs"));
    Some(parts.join(", "))
}

/// Draws the latency histogram: one bar per non-empty 1-µs bucket (at least
/// a pixel wide), counts on a log scale; the axis ends past the bulk (see
/// [`axis_end`]) and what lies beyond it, overflows included, is one red
/// bar at the right edge, annotated.
pub fn draw_histogram<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    r: &Report,
) -> Result<(), PlotError> {
    const W: &str = "latency histogram";
    let h = &r.histogram;
    let l = &r.latency;
    root.fill(&BACKGROUND).map_err(draw_err(W))?;
    let end = axis_end(&[Extent::of(
        &h.buckets,
        l.p99_9_us,
        l.above_histogram.iter().any(|p| p == "p99.9"),
        l.max_us,
    )]);
    let note = beyond_note(&h.buckets, h.overflows, Some(h.max_us), l.max_us, end);
    let beyond: u64 = h
        .buckets
        .iter()
        .filter(|b| b.0 > end)
        .map(|b| b.1)
        .sum::<u64>()
        + h.overflows;
    let x_max = (end as f64 * 1.06).max(10.0);
    let peak = h
        .buckets
        .iter()
        .map(|b| b.1)
        .chain([beyond])
        .max()
        .unwrap_or(1)
        .max(1);
    let y_max = (peak as f64 * 3.0).max(10.0);
    let mut chart = ChartBuilder::on(root)
        .caption(title(r, "cyclictest latency"), ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..x_max, (BASE..y_max).log_scale())
        .map_err(draw_err(W))?;
    chart
        .configure_mesh()
        .x_desc(format!("latency (µs), up to {end} µs"))
        .y_desc("samples (log scale)")
        .x_label_formatter(&|v| number(*v))
        .y_label_formatter(&|v| number(*v))
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 13))
        .light_line_style(BACKGROUND)
        .draw()
        .map_err(draw_err(W))?;
    let px = x_max / f64::from(chart.plotting_area().dim_in_pixel().0.max(1));
    let width = (1.2 * px).max(1.0);
    chart
        .draw_series(h.buckets.iter().filter(|b| b.0 <= end).map(|&(us, c)| {
            Rectangle::new(
                [(us as f64, BASE), (us as f64 + width, c as f64)],
                BAR.filled(),
            )
        }))
        .map_err(draw_err(W))?;
    if let Some(note) = note {
        let x = end as f64 + 2.0 * px;
        chart
            .draw_series([Rectangle::new(
                [(x, BASE), (x + (3.0 * px).max(1.0), beyond as f64)],
                OVERFLOW.filled(),
            )])
            .map_err(draw_err(W))?;
        chart
            .draw_series([Text::new(
                note,
                (x, beyond as f64 * 2.5),
                TextStyle::from(("sans-serif", 13).into_font())
                    .color(&OVERFLOW)
                    .pos(Pos::new(HPos::Right, VPos::Bottom)),
            )])
            .map_err(draw_err(W))?;
    }
    let summary = [
        format!("samples {}", l.samples),
        format!(
            "min {} / avg {:.1} / max {} µs",
            l.min_us, l.avg_us, l.max_us
        ),
        format!("p99 {} µs, p99.9 {} µs", l.p99_us, l.p99_9_us),
        format!("most frequent {} µs ({} samples)", l.mode_us, l.mode_count),
    ];
    let (w, _) = root.dim_in_pixel();
    for (i, line) in summary.iter().enumerate() {
        root.draw(&Text::new(
            line.clone(),
            (w as i32 - 30, 60 + 20 * i as i32),
            TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Right, VPos::Top)),
        ))
        .map_err(draw_err(W))?;
    }
    root.present().map_err(draw_err(W))
}

/// One colour per run of the overlay (tab10).
pub const RUN_COLORS: [RGBColor; 10] = [
    RGBColor(0x1F, 0x77, 0xB4),
    RGBColor(0xD6, 0x27, 0x28),
    RGBColor(0x2C, 0xA0, 0x2C),
    RGBColor(0xFF, 0x7F, 0x0E),
    RGBColor(0x94, 0x67, 0xBD),
    RGBColor(0x8C, 0x56, 0x4B),
    RGBColor(0xE3, 0x77, 0xC2),
    RGBColor(0x17, 0xBE, 0xCF),
    RGBColor(0x7F, 0x7F, 0x7F),
    RGBColor(0xBC, 0xBD, 0x22),
];

/// Bins per decade of the overlay's logarithmic latency axis.
pub const BINS_PER_DECADE: f64 = 20.0;

/// Log-spaced bins from 1 µs: bin `k` holds latencies in
/// `[10^(k/20), 10^((k+1)/20))` (0 µs falls in bin 0).
fn log_bin(us: u64) -> usize {
    ((us.max(1) as f64).log10() * BINS_PER_DECADE).floor() as usize
}

fn bin_edge(k: usize) -> f64 {
    10f64.powf(k as f64 / BINS_PER_DECADE)
}

/// Counts per log-spaced bin (see [`log_bin`]), up to the last non-empty one.
fn log_bins(buckets: &[(u64, u64)]) -> Vec<u64> {
    let mut out = Vec::new();
    for &(us, c) in buckets {
        let k = log_bin(us);
        if out.len() <= k {
            out.resize(k + 1, 0);
        }
        out[k] += c;
    }
    out
}

/// Draws every run's histogram in one picture: a stepped line per run in
/// its own colour, counts on a log scale over a logarithmic latency axis
/// (20 bins per decade), so a bulk at 5-50 µs and a tail at 20 ms are both
/// readable whichever run is noisiest; the legend names each run with its
/// samples, cyclictest's overflows (samples past its -h range, whose values
/// it does not give) and its max.
pub fn draw_overlay<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    runs: &[Run],
) -> Result<(), PlotError> {
    const W: &str = "latency histograms";
    root.fill(&BACKGROUND).map_err(draw_err(W))?;
    let binned: Vec<Vec<u64>> = runs.iter().map(|r| log_bins(&r.buckets)).collect();
    let bins = binned.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let peak = binned.iter().flatten().copied().max().unwrap_or(1).max(1);
    let first = binned
        .iter()
        .filter_map(|b| b.iter().position(|c| *c > 0))
        .min()
        .unwrap_or(0);
    let x_min = (bin_edge(first) * 0.8).max(0.8);
    let x_max = bin_edge(bins) * 1.25;
    let y_max = (peak as f64 * 4.0).max(10.0);
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!("cyclictest latency, {} runs", runs.len()),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d((x_min..x_max).log_scale(), (BASE..y_max).log_scale())
        .map_err(draw_err(W))?;
    chart
        .configure_mesh()
        .x_desc("latency (µs, log scale)")
        .y_desc(format!(
            "samples per bin ({BINS_PER_DECADE} per decade, log scale)"
        ))
        .x_label_formatter(&|v| number(*v))
        .y_label_formatter(&|v| number(*v))
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 13))
        .light_line_style(BACKGROUND)
        .draw()
        .map_err(draw_err(W))?;
    for (i, (run, counts)) in runs.iter().zip(&binned).enumerate() {
        let color = RUN_COLORS[i % RUN_COLORS.len()];
        let y = |c: u64| if c == 0 { BASE } else { c as f64 };
        let start = counts.iter().position(|c| *c > 0).unwrap_or(0);
        let mut points: Vec<(f64, f64)> = vec![(bin_edge(start), BASE)];
        for (k, c) in counts.iter().enumerate().skip(start) {
            points.push((bin_edge(k), y(*c)));
            points.push((bin_edge(k + 1), y(*c)));
        }
        points.push((bin_edge(counts.len()), BASE));
        let mut label = format!("{} ({} samples", run.label, run.samples);
        if run.overflows > 0 {
            match run.histogram_range_us {
                Some(r) => label.push_str(&format!(", {} overflows ≥{r} µs", run.overflows)),
                None => label.push_str(&format!(", {} overflows", run.overflows)),
            }
        }
        label.push_str(&format!(", max {} µs)", run.max_us));
        chart
            .draw_series([PathElement::new(points, color.stroke_width(2))])
            .map_err(draw_err(W))?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x - 6, y - 3), (x + 6, y + 3)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 13))
        .background_style(BACKGROUND.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err(W))?;
    root.present().map_err(draw_err(W))
}

/// The overlay as an SVG document.
pub fn overlay_svg(runs: &[Run]) -> Result<String, PlotError> {
    ensure_font()?;
    let mut s = String::new();
    draw_overlay(
        &SVGBackend::with_string(&mut s, SIZE).into_drawing_area(),
        runs,
    )?;
    Ok(s)
}

/// File name of the overlay picture.
pub const OVERLAY: &str = "latency-compare";

/// Writes the overlay of `runs` as SVG into `svg_dir` and/or PNG into
/// `png_dir` (created if missing); returns the files written.
pub fn write_overlay(
    runs: &[Run],
    svg_dir: Option<&Path>,
    png_dir: Option<&Path>,
) -> Result<Vec<PathBuf>, PlotError> {
    let mut written = Vec::new();
    let create = |dir: &Path| {
        std::fs::create_dir_all(dir).map_err(|e| PlotError::Write {
            path: dir.to_owned(),
            reason: e.to_string(),
        })
    };
    if let Some(dir) = svg_dir {
        create(dir)?;
        let p = dir.join(format!("{OVERLAY}.svg"));
        std::fs::write(&p, overlay_svg(runs)?).map_err(|e| PlotError::Write {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        written.push(p);
    }
    if let Some(dir) = png_dir {
        create(dir)?;
        ensure_font()?;
        let p = dir.join(format!("{OVERLAY}.png"));
        {
            let root = BitMapBackend::new(&p, SIZE).into_drawing_area();
            draw_overlay(&root, runs).map_err(|e| match e {
                PlotError::Draw { reason, .. } => PlotError::Write {
                    path: p.clone(),
                    reason,
                },
                e => e,
            })?;
        }
        written.push(p);
    }
    Ok(written)
}

/// Draws the noise timeline: x the time in the run, y (log) each slot's
/// longest wake-up-to-run wait, colored by its cause; intruder slices as
/// shaded spans; the worst waits labelled with their cause.
pub fn draw_timeline<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    r: &Report,
) -> Result<(), PlotError> {
    const W: &str = "noise timeline";
    let t = &r.timeline;
    root.fill(&BACKGROUND).map_err(draw_err(W))?;
    let end_ns = t
        .points
        .iter()
        .map(|p| p.offset_ns)
        .chain(t.spans.iter().map(|s| s.offset_ns + s.run_ns))
        .chain([r.run.elapsed_ns, r.run.planned_duration_ns])
        .max()
        .unwrap_or(0);
    let x_max = (end_ns as f64 / 1e9 * 1.01).max(0.001);
    let us = |ns: u64| (ns as f64 / 1e3).max(0.1);
    let y_min = t
        .points
        .iter()
        .map(|p| us(p.wait_ns))
        .fold(f64::MAX, f64::min)
        .min(1.0)
        * 0.5;
    let y_max = t
        .points
        .iter()
        .map(|p| us(p.wait_ns))
        .chain(t.spans.iter().map(|s| us(s.run_ns)))
        .fold(10.0, f64::max)
        * 4.0;
    let mut chart = ChartBuilder::on(root)
        .caption(
            title(r, "wake-up to running of cyclictest"),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())
        .map_err(draw_err(W))?;
    chart
        .configure_mesh()
        .x_desc("time in run (s)")
        .y_desc("wait (µs, log scale)")
        .y_label_formatter(&|v| number(*v))
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 13))
        .light_line_style(BACKGROUND)
        .draw()
        .map_err(draw_err(W))?;
    let px = x_max / f64::from(chart.plotting_area().dim_in_pixel().0.max(1));
    let span_style = SPAN.mix(0.35).filled();
    if !t.spans.is_empty() {
        chart
            .draw_series(t.spans.iter().map(|s| {
                let x0 = s.offset_ns as f64 / 1e9;
                let x1 = (x0 + s.run_ns as f64 / 1e9).max(x0 + 2.0 * px);
                Rectangle::new([(x0, y_min), (x1, y_max)], span_style)
            }))
            .map_err(draw_err(W))?
            .label("intruder run slice")
            .legend(move |(x, y)| Rectangle::new([(x - 6, y - 6), (x + 6, y + 6)], span_style));
    }
    for &(cat, label) in CATEGORIES {
        let color = cause_color(cat);
        let points: Vec<_> = t.points.iter().filter(|p| p.cause == cat).collect();
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(
                points.iter().map(|p| {
                    Circle::new((p.offset_ns as f64 / 1e9, us(p.wait_ns)), 3, color.filled())
                }),
            )
            .map_err(draw_err(W))?
            .label(format!("{label} ({})", points.len()))
            .legend(move |(x, y)| Rectangle::new([(x - 5, y - 5), (x + 5, y + 5)], color.filled()));
    }
    chart
        .draw_series(r.worst.iter().take(3).map(|w| {
            let x = w.offset_ns as f64 / 1e9;
            // Labels on the right half extend to the left, so they stay inside.
            let h = if x > x_max * 0.6 {
                HPos::Right
            } else {
                HPos::Left
            };
            Text::new(
                format!("{} {}", fmt_ns(w.wait_ns), w.cause.who()),
                (x, us(w.wait_ns) * 1.3),
                TextStyle::from(("sans-serif", 13).into_font()).pos(Pos::new(h, VPos::Bottom)),
            )
        }))
        .map_err(draw_err(W))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 13))
        .background_style(BACKGROUND.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err(W))?;
    root.present().map_err(draw_err(W))
}

/// The histogram as an SVG document.
pub fn histogram_svg(r: &Report) -> Result<String, PlotError> {
    ensure_font()?;
    let mut s = String::new();
    draw_histogram(
        &SVGBackend::with_string(&mut s, SIZE).into_drawing_area(),
        r,
    )?;
    Ok(s)
}

/// The timeline as an SVG document.
pub fn timeline_svg(r: &Report) -> Result<String, PlotError> {
    ensure_font()?;
    let mut s = String::new();
    draw_timeline(
        &SVGBackend::with_string(&mut s, SIZE).into_drawing_area(),
        r,
    )?;
    Ok(s)
}

fn png(path: &Path, r: &Report, timeline: bool) -> Result<(), PlotError> {
    ensure_font()?;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    let drawn = if timeline {
        draw_timeline(&root, r)
    } else {
        draw_histogram(&root, r)
    };
    drawn.map_err(|e| match e {
        // The bitmap backend writes the file in present(): name the file.
        PlotError::Draw { reason, .. }
            if reason.contains("Io") || reason.contains("ImageError") =>
        {
            PlotError::Write {
                path: path.to_owned(),
                reason,
            }
        }
        e => e,
    })
}

/// File names of the pictures for CPU `cpu`.
pub fn file_names(cpu: u32) -> [String; 2] {
    [
        format!("latency-histogram-cpu{cpu}"),
        format!("noise-timeline-cpu{cpu}"),
    ]
}

/// Writes both pictures as SVG into `svg_dir` and/or PNG into `png_dir`
/// (created if missing); returns the files written.
pub fn write_pictures(
    r: &Report,
    svg_dir: Option<&Path>,
    png_dir: Option<&Path>,
) -> Result<Vec<PathBuf>, PlotError> {
    let [hist, timeline] = file_names(r.run.cpu);
    let mut written = Vec::new();
    let create = |dir: &Path| {
        std::fs::create_dir_all(dir).map_err(|e| PlotError::Write {
            path: dir.to_owned(),
            reason: e.to_string(),
        })
    };
    if let Some(dir) = svg_dir {
        create(dir)?;
        for (name, doc) in [(&hist, histogram_svg(r)?), (&timeline, timeline_svg(r)?)] {
            let p = dir.join(format!("{name}.svg"));
            std::fs::write(&p, doc).map_err(|e| PlotError::Write {
                path: p.clone(),
                reason: e.to_string(),
            })?;
            written.push(p);
        }
    }
    if let Some(dir) = png_dir {
        create(dir)?;
        let p = dir.join(format!("{hist}.png"));
        png(&p, r, false)?;
        written.push(p);
        let p = dir.join(format!("{timeline}.png"));
        png(&p, r, true)?;
        written.push(p);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latency::report::tests::sample_report;

    fn fill_count(svg: &str, color: RGBColor, tag: &str) -> usize {
        let fill = format!("fill=\"#{:02X}{:02X}{:02X}\"", color.0, color.1, color.2);
        svg.split(&format!("<{tag} "))
            .skip(1)
            .filter(|el| {
                el.split("/>")
                    .next()
                    .is_some_and(|attrs| attrs.contains(&fill))
            })
            .count()
    }

    #[test]
    fn histogram_svg_has_a_bar_per_bucket_and_labels() {
        let r = sample_report("6.18.44", "PREEMPT_DYNAMIC", 2100);
        let svg = histogram_svg(&r).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        assert_eq!(fill_count(&svg, BAR, "rect"), r.histogram.buckets.len());
        assert_eq!(fill_count(&svg, OVERFLOW, "rect"), 1, "one overflow bar");
        for needle in [
            "latency (µs)",
            "samples (log scale)",
            "6.18.44 PREEMPT_DYNAMIC",
            "2 overflows (≥60 µs), max 2100 µs",
            "most frequent 15 µs (800 samples)",
        ] {
            assert!(svg.contains(needle), "{needle:?} missing");
        }
        // Every bar is visible (at least one pixel wide and tall).
        for el in svg
            .split("<rect ")
            .skip(1)
            .filter(|e| e.contains("fill=\"#1F77B4\""))
        {
            let attr = |n: &str| -> i64 {
                el.split(&format!("{n}=\""))
                    .nth(1)
                    .and_then(|v| v.split('"').next())
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            assert!(
                attr("width") >= 1 && attr("height") >= 1,
                "invisible bar: {el}"
            );
        }
    }

    #[test]
    fn timeline_svg_shows_every_point_and_span() {
        let r = sample_report("6.18.44", "PREEMPT_DYNAMIC", 2100);
        let svg = timeline_svg(&r).unwrap();
        assert_eq!(svg.matches("<circle ").count(), r.timeline.points.len());
        assert_eq!(
            fill_count(&svg, cause_color(Category::Intruder), "circle"),
            1
        );
        assert_eq!(
            fill_count(&svg, cause_color(Category::IdleExit), "circle"),
            1
        );
        // One span in the plot and one in the legend.
        assert_eq!(fill_count(&svg, SPAN, "rect"), 2);
        for needle in [
            "time in run (s)",
            "wait (µs, log scale)",
            "intruder pg-spiker (tid 4242)",
            "intruder run slice",
        ] {
            assert!(svg.contains(needle), "{needle:?} missing");
        }
    }

    #[test]
    fn pngs_are_written_and_show_the_bars() {
        let r = sample_report("6.18.44", "PREEMPT_DYNAMIC", 2100);
        let dir = tempfile::tempdir().unwrap();
        let written = write_pictures(
            &r,
            Some(&dir.path().join("svg")),
            Some(&dir.path().join("png")),
        )
        .unwrap();
        assert_eq!(written.len(), 4);
        for p in &written {
            assert!(
                std::fs::metadata(p).unwrap().len() > 1000,
                "{} is too small",
                p.display()
            );
        }
        let decoder = png::Decoder::new(std::fs::File::open(&written[2]).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), SIZE);
        assert_eq!(info.color_type, png::ColorType::Rgb);
        let bar_pixels = buf[..info.buffer_size()]
            .chunks(3)
            .filter(|p| *p == [BAR.0, BAR.1, BAR.2])
            .count();
        assert!(bar_pixels > 100, "only {bar_pixels} bar-colored pixels");
    }

    #[test]
    fn the_axis_ends_past_the_bulk_not_at_the_outlier() {
        // Bulk up to 80 µs, one 17 ms outlier: cut at 200 µs (80 x 1.5, rounded up).
        let e = Extent::of(&[(20, 900), (80, 5), (17_000, 1)], 80, false, 17_000);
        assert_eq!(axis_end(&[e]), 200);
        // Nothing far out: everything is shown.
        let e = Extent::of(&[(20, 900), (150, 1)], 80, false, 150);
        assert_eq!(axis_end(&[e]), 157);
        // p99.9 among the overflows: the bulk ends at the last bucket.
        let e = Extent::of(&[(12, 3), (55, 5)], 2100, true, 2100);
        assert_eq!(axis_end(&[e]), 100);
        // The widest bulk of several runs decides.
        let a = Extent::of(&[(10, 9)], 10, false, 5000);
        let b = Extent::of(&[(300, 9)], 300, false, 400);
        assert_eq!(axis_end(&[a, b]), 500);
        assert_eq!(
            beyond_note(&[(10, 9), (900, 3)], 22, Some(1000), 16974, 500).unwrap(),
            "3 beyond 500 µs, 22 overflows (≥1000 µs), max 16974 µs"
        );
        assert_eq!(beyond_note(&[(10, 9)], 0, Some(1000), 10, 500), None);
        // 20 log bins per decade: 1 µs in bin 0, 10 µs in bin 20, 100 in 40.
        assert_eq!(
            (log_bin(0), log_bin(1), log_bin(10), log_bin(100)),
            (0, 0, 20, 40)
        );
        let b = log_bins(&[(1, 2), (10, 3), (11, 1), (100, 4)]);
        assert_eq!((b.len(), b[0], b[20], b[40]), (41, 2, 4, 4));
        assert!((bin_edge(20) - 10.0).abs() < 1e-9);
    }

    #[test]
    fn the_overlay_has_one_line_per_run_and_a_legend() {
        use crate::latency::compare::{self, DEFAULT_THRESHOLDS_US};
        let dir = tempfile::tempdir().unwrap();
        let mut runs = Vec::new();
        for (name, r) in [
            ("gp.json", sample_report("6.18.44", "PREEMPT_DYNAMIC", 2100)),
            ("rt.json", sample_report("6.1.0-rt", "PREEMPT_RT", 95)),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, serde_json::to_string(&r).unwrap()).unwrap();
            runs.push(compare::load(&p, DEFAULT_THRESHOLDS_US).unwrap());
        }
        let p = dir.path().join("h.txt");
        std::fs::write(&p, include_str!("../../tests/fixtures/cyclictest-h.txt")).unwrap();
        runs.push(compare::load(&p, DEFAULT_THRESHOLDS_US).unwrap());
        compare::label_runs(&mut runs, &[]).unwrap();
        let svg = overlay_svg(&runs).unwrap();
        for (i, run) in runs.iter().enumerate() {
            let c = RUN_COLORS[i];
            let stroke = format!("stroke=\"#{:02X}{:02X}{:02X}\"", c.0, c.1, c.2);
            let lines = svg
                .split("<polyline ")
                .skip(1)
                .filter(|el| el.split("/>").next().is_some_and(|a| a.contains(&stroke)))
                .count();
            assert_eq!(lines, 1, "run {i}: {lines} lines of its colour");
            assert_eq!(fill_count(&svg, c, "rect"), 1, "run {i}: one legend mark");
            assert!(svg.contains(&run.label), "{} not in the legend", run.label);
        }
        // The fixture's overflows (values unknown) and its max are named.
        assert!(
            svg.contains("22 overflows ≥1000 µs, max 16974 µs"),
            "no overflow note"
        );
        assert!(svg.contains("latency (µs, log scale)"), "no x axis label");
        let dir = tempfile::tempdir().unwrap();
        let written = write_overlay(&runs, Some(dir.path()), Some(dir.path())).unwrap();
        assert_eq!(written.len(), 2);
        assert!(std::fs::metadata(&written[1]).unwrap().len() > 1000);
    }

    #[test]
    fn a_bad_font_is_reported() {
        let e = PlotError::NoFont.to_string();
        assert!(
            e.contains("fonts-dejavu-core") && e.contains(FONT_ENV),
            "{e}"
        );
    }
}
