//! Samples and how they are summarised: median, p99 (nearest rank), min
//! and max, and the table every figure ends up in.

use std::fmt::Write as _;
use std::time::Duration;

/// Repeated measurements of one thing.
#[derive(Clone, Debug, Default)]
pub struct Samples(Vec<f64>);

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64());
    }

    pub fn push_value(&mut self, v: f64) {
        self.0.push(v);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    /// The `p`-th percentile by nearest rank (`p` in 0..=100).
    pub fn percentile(&self, p: f64) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    pub fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    pub fn p99(&self) -> f64 {
        self.percentile(99.0)
    }

    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }
}

/// Seconds as `850 µs`, `4.21 ms`, `1.35 s`.
pub fn secs(s: f64) -> String {
    if s.is_nan() {
        "–".to_owned()
    } else if s < 1e-3 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// `median / p99` of durations.
pub fn med_p99(s: &Samples) -> String {
    format!("{} / {}", secs(s.median()), secs(s.p99()))
}

/// `min–max` of durations.
pub fn min_max(s: &Samples) -> String {
    format!("{} – {}", secs(s.min()), secs(s.max()))
}

/// KiB as `12.3 MiB`.
pub fn mib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}

/// One line of the table.
pub struct Row {
    pub id: &'static str,
    pub what: String,
    pub n: String,
    pub measured: String,
    pub baseline: String,
    pub ratio: String,
    pub goal: String,
    /// `Some(true)` met, `Some(false)` missed, `None` no goal.
    pub met: Option<bool>,
}

impl Row {
    pub fn new(id: &'static str, what: impl Into<String>) -> Row {
        Row {
            id,
            what: what.into(),
            n: String::new(),
            measured: String::new(),
            baseline: String::new(),
            ratio: String::new(),
            goal: String::new(),
            met: None,
        }
    }

    pub fn n(mut self, n: impl ToString) -> Row {
        self.n = n.to_string();
        self
    }

    pub fn measured(mut self, s: impl Into<String>) -> Row {
        self.measured = s.into();
        self
    }

    pub fn baseline(mut self, s: impl Into<String>) -> Row {
        self.baseline = s.into();
        self
    }

    pub fn ratio(mut self, r: f64) -> Row {
        self.ratio = format!("{r:.2}×");
        self
    }

    pub fn goal(mut self, goal: impl Into<String>, met: bool) -> Row {
        self.goal = goal.into();
        self.met = Some(met);
        self
    }

    /// A figure that could not be measured here, and why.
    pub fn skipped(id: &'static str, what: impl Into<String>, why: impl Into<String>) -> Row {
        Row::new(id, what).measured(format!("skipped: {}", why.into()))
    }
}

/// The table, as Markdown (it goes into docs/performance.md as printed).
pub fn render(rows: &[Row]) -> String {
    let header = [
        "#",
        "figure",
        "n",
        "certctl (median / p99)",
        "baseline, same run (median / p99)",
        "ratio",
        "goal",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            let goal = match r.met {
                Some(true) => format!("{} ✓", r.goal),
                Some(false) => format!("{} ✗", r.goal),
                None => r.goal.clone(),
            };
            [
                r.id.to_owned(),
                r.what.clone(),
                r.n.clone(),
                r.measured.clone(),
                r.baseline.clone(),
                r.ratio.clone(),
                goal,
            ]
        })
        .collect();
    let mut width = header.map(|h| h.chars().count());
    for c in &cells {
        for (w, cell) in width.iter_mut().zip(c) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cols: &[String]| {
        let mut s = String::from("|");
        for (c, w) in cols.iter().zip(width) {
            let pad = w - c.chars().count();
            let _ = write!(s, " {c}{} |", " ".repeat(pad));
        }
        s.push('\n');
        s
    };
    let mut out = line(&header.map(str::to_owned));
    out.push_str(&line(&width.map(|w| "-".repeat(w))));
    for c in &cells {
        out.push_str(&line(c));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles_and_median() {
        let mut s = Samples::default();
        for v in 1..=100 {
            s.push_value(f64::from(v));
        }
        assert_eq!(s.median(), 50.5);
        assert_eq!(s.p99(), 99.0);
        assert_eq!(s.percentile(100.0), 100.0);
        assert_eq!(s.min(), 1.0);
        let mut one = Samples::default();
        one.push_value(3.0);
        assert_eq!(one.p99(), 3.0);
        assert_eq!(one.median(), 3.0);
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(secs(0.000_85), "850 µs");
        assert_eq!(secs(0.004_213), "4.21 ms");
        assert_eq!(secs(1.354), "1.35 s");
    }
}
