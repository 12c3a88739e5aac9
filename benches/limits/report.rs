//! Figures and the table that the benchmark prints.

use std::fmt::Write as _;

/// Target of a figure.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// The median must be below this value.
    Below(f64),
    /// The median divided by the baseline's median must be at least this.
    RatioAtLeast(f64),
    /// Shown for context only.
    None,
}

/// One row of the table: a value per run, and optionally a baseline's value
/// per run measured in the same runs.
#[derive(Debug, Clone)]
pub struct Figure {
    pub name: String,
    pub unit: &'static str,
    pub values: Vec<f64>,
    pub baseline: Option<(String, Vec<f64>)>,
    pub target: Target,
}

impl Figure {
    pub fn new(name: impl Into<String>, unit: &'static str, values: Vec<f64>) -> Figure {
        Figure {
            name: name.into(),
            unit,
            values,
            baseline: None,
            target: Target::None,
        }
    }

    /// Adds the baseline's values; none (baselines skipped) leaves the figure
    /// without a baseline and a ratio target without a verdict.
    pub fn against(mut self, baseline: &str, values: Vec<f64>) -> Figure {
        if !values.is_empty() {
            self.baseline = Some((baseline.to_string(), values));
        }
        self
    }

    pub fn target(mut self, target: Target) -> Figure {
        self.target = target;
        self
    }

    fn ratio(&self) -> Option<f64> {
        let (_, baseline) = self.baseline.as_ref()?;
        let baseline = median(baseline);
        (baseline > 0.0).then(|| median(&self.values) / baseline)
    }

    /// `Some(true)` when the figure meets its target, `None` without a target
    /// or, for a ratio, without a baseline.
    pub fn passes(&self) -> Option<bool> {
        match self.target {
            Target::Below(limit) => Some(median(&self.values) < limit),
            Target::RatioAtLeast(minimum) => self.ratio().map(|ratio| ratio >= minimum),
            Target::None => None,
        }
    }
}

/// Median of `values`; the mean of the two middle values for an even count.
pub fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

/// Returns the `p`th percentile of `values` with linear interpolation between
/// ranks, or 0 for an empty slice.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let low = rank.floor() as usize;
    let high = rank.ceil() as usize;
    sorted[low] + (sorted[high] - sorted[low]) * (rank - low as f64)
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

fn number(value: f64) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// Renders the figures as a Markdown table.
pub fn table(figures: &[Figure]) -> String {
    let mut out = String::new();
    out.push_str(
        "| figure | unit | median | min | max | runs | baseline (median) | ratio | target | result |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for figure in figures {
        let baseline = match &figure.baseline {
            Some((name, values)) => format!("{name}: {}", number(median(values))),
            None => "-".to_string(),
        };
        let ratio = figure
            .ratio()
            .map_or("-".to_string(), |ratio| format!("{ratio:.2}"));
        let target = match figure.target {
            Target::Below(limit) => format!("< {}", number(limit)),
            Target::RatioAtLeast(minimum) => format!("ratio >= {minimum}"),
            Target::None => "-".to_string(),
        };
        let result = match figure.passes() {
            Some(true) => "pass",
            Some(false) => "FAIL",
            None => "-",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {baseline} | {ratio} | {target} | {result} |",
            figure.name,
            figure.unit,
            number(median(&figure.values)),
            number(min(&figure.values)),
            number(max(&figure.values)),
            figure.values.len(),
        );
    }
    out
}
