//! Results: medians, ratios, the table, the goals of issue 4, JSON lines.

use std::fmt::Write as _;

use crate::workers::{Contender, Sample, Workload};

/// One workload at one client count.
#[derive(Clone, Copy, Debug)]
pub struct Cell {
    pub workload: Workload,
    pub clients: usize,
    pub pool: u32,
}

impl Cell {
    pub fn label(&self) -> String {
        format!("{} c={}", self.workload.id(), self.clients)
    }
}

/// All rounds of one contender in one cell.
#[derive(Debug)]
pub struct Series {
    pub contender: Contender,
    pub samples: Vec<Sample>,
}

impl Series {
    pub fn median(&self) -> f64 {
        median(self.samples.iter().map(|s| s.ops_per_sec))
    }
    /// The median of this series' round-by-round ratios to `other`: the two
    /// ran minutes apart at most, in the same round, so slow drifts of a
    /// shared machine cancel out.
    pub fn paired_ratio(&self, other: &Series) -> f64 {
        median(
            self.samples
                .iter()
                .zip(&other.samples)
                .map(|(a, b)| a.ops_per_sec / b.ops_per_sec),
        )
    }
    fn bytes(&self) -> f64 {
        median(self.samples.iter().map(|s| s.bytes_per_op))
    }
    fn allocs(&self) -> f64 {
        median(self.samples.iter().map(|s| s.allocs_per_op))
    }
    /// p50, p99 and p99.9: medians over the rounds; max: the largest of
    /// any round. In µs.
    pub fn latency(&self) -> [f64; 4] {
        let at = |i: usize| median(self.samples.iter().map(|s| s.latency[i]));
        let max = self
            .samples
            .iter()
            .map(|s| s.latency[3])
            .filter(|x| !x.is_nan())
            .fold(f64::NAN, f64::max);
        [at(0), at(1), at(2), max]
    }
    /// Pool timeouts over all rounds.
    pub fn timeouts(&self) -> u64 {
        self.samples.iter().map(|s| s.timeouts).sum()
    }
}

#[derive(Debug)]
pub struct CellResult {
    pub cell: Cell,
    pub series: Vec<Series>,
}

impl CellResult {
    pub fn series_of(&self, c: Contender) -> Option<&Series> {
        self.series.iter().find(|s| s.contender == c)
    }

    pub fn median_of(&self, c: Contender) -> Option<f64> {
        self.series_of(c).map(Series::median)
    }

    /// The reference every ratio in this cell is taken against.
    pub fn reference(&self) -> Option<f64> {
        self.median_of(Contender::Pgassist)
    }
}

pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn thousands(x: f64) -> String {
    if x.is_nan() {
        return "-".into();
    }
    let digits = format!("{:.0}", x);
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(ch);
    }
    out
}

/// µs as ms, three significant-ish digits.
fn ms(micros: f64) -> String {
    if micros.is_nan() {
        return "-".into();
    }
    let ms = micros / 1000.0;
    if ms < 1.0 {
        format!("{ms:.3}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

fn or_dash(x: f64, decimals: usize) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.decimals$}")
    }
}

/// The table: one line per cell × contender; "×pgassist" is this
/// contender's median over pgassist's in the same cell (pgassist = 1.00);
/// latencies of one operation in ms (see [`Series::latency`]); timeouts
/// over all rounds.
pub fn table(results: &[CellResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:<20} {:>4} {:>13} {:>21} {:>10} {:>8} {:>9} {:>7} {:>7} {:>7} {:>7} {:>8}",
        "cell",
        "contender",
        "pool",
        "median ops/s",
        "min .. max",
        "×pgassist",
        "B/op",
        "allocs/op",
        "p50 ms",
        "p99",
        "p99.9",
        "max",
        "timeouts"
    );
    for r in results {
        let _ = writeln!(
            out,
            "-- {} {} ({} clients, pool {})",
            r.cell.workload.id(),
            r.cell.workload.title(),
            r.cell.clients,
            r.cell.pool
        );
        let reference = r.reference().unwrap_or(f64::NAN);
        for s in &r.series {
            let ops = s.samples.iter().map(|x| x.ops_per_sec);
            let (lo, hi) = ops.fold((f64::INFINITY, 0.0_f64), |(lo, hi), x| {
                (lo.min(x), hi.max(x))
            });
            let pool = if s.contender == Contender::Raw || s.contender == Contender::Pgbench {
                "-".to_string()
            } else {
                r.cell.pool.to_string()
            };
            let [p50, p99, p999, max] = s.latency();
            let _ = writeln!(
                out,
                "{:<8} {:<20} {:>4} {:>13} {:>21} {:>10} {:>8} {:>9} {:>7} {:>7} {:>7} {:>7} {:>8}",
                r.cell.label(),
                s.contender.name(),
                pool,
                thousands(s.median()),
                format!("{} .. {}", thousands(lo), thousands(hi)),
                format!("{:.2}", s.median() / reference),
                or_dash(s.bytes(), 0),
                or_dash(s.allocs(), 1),
                ms(p50),
                ms(p99),
                ms(p999),
                ms(max),
                s.timeouts(),
            );
        }
    }
    out
}

/// One goal of issue 4: `subject` (a pgassist variant) ≥ `target` × `peer`.
pub struct Goal {
    pub text: String,
    /// Median over median: what the goal is judged on.
    pub ratio: Option<f64>,
    /// Median of the per-round ratios, for reference on a noisy machine.
    pub paired_ratio: Option<f64>,
    pub target: f64,
}

impl Goal {
    pub fn line(&self) -> String {
        match self.ratio {
            Some(r) if r.is_finite() => format!(
                "{:<9} {:<46} {:>7.3}× (goal ≥ {:.2}×; per-round median {:.3}×)",
                if r >= self.target { "met" } else { "NOT MET" },
                self.text,
                r,
                self.target,
                self.paired_ratio.unwrap_or(f64::NAN)
            ),
            _ => format!("{:<9} {}", "n/a", self.text),
        }
    }
}

pub fn goals(results: &[CellResult]) -> Vec<Goal> {
    let find = |w: Workload, clients: usize| {
        results
            .iter()
            .find(|r| r.cell.workload == w && r.cell.clients == clients)
    };
    let goal = |w: Workload, clients: usize, subject: Contender, peer: Contender, target: f64| {
        let cell = find(w, clients);
        let pair = cell.and_then(|r| Some((r.series_of(subject)?, r.series_of(peer)?)));
        let ratio = pair.map(|(a, b)| a.median() / b.median());
        let paired_ratio = pair.map(|(a, b)| a.paired_ratio(b));
        Goal {
            text: format!(
                "{} c={clients}: {} vs {}",
                w.id(),
                subject.name(),
                peer.name()
            ),
            ratio,
            paired_ratio,
            target,
        }
    };
    use Contender::*;
    use Workload::*;
    let mut out = Vec::new();
    for c in [1, 16, 64] {
        out.push(goal(PointSelect, c, Pgassist, Bb8Tuned, 1.0));
        out.push(goal(PointSelect, c, Pgassist, Deadpool, 1.0));
        out.push(goal(PointSelect, c, Pgassist, Sqlx, 1.4));
    }
    out.push(goal(PointSelect, 1, Pgassist, Pgbench, 0.95));
    out.push(goal(WriteTx, 1, Pgassist, Bb8Tuned, 1.25));
    out.push(goal(WriteTx, 1, Pgassist, Pgbench, 1.15));
    out.push(goal(WriteTx, 16, Pgassist, Bb8Tuned, 1.1));
    out.push(goal(ReadTx, 16, Pgassist, Pgbench, 1.0));
    out.push(goal(ReadTx, 16, PgassistJoin, Pgbench, 1.0));
    out.push(goal(IdleHeavy, 256, Pgassist, Bb8Held, 25.0));
    out.push(goal(IdleHeavy, 256, Pgassist, PgassistPinned, 25.0));
    out.push(goal(IdleHeavy, 256, Pgassist, Bb8Tuned, 1.0));
    out.push(goal(IdleHeavy, 256, PgassistPipelined, Bb8Held, 25.0));
    out.push(goal(
        IdleHeavy,
        256,
        PgassistPipelined,
        PgassistPinned,
        25.0,
    ));
    out.push(goal(IdleHeavy, 256, PgassistPipelined, Bb8Tuned, 1.0));
    // Issue 13: throughput level with the peers under overload.
    out.push(goal(Overload, 256, Pgassist, Bb8Tuned, 0.95));
    out.push(goal(Overload, 256, Pgassist, Deadpool, 0.95));
    out.retain(|g| g.ratio.is_some());
    out
}

/// Issue 13, judged on W5 (overload): pgassist has no timeouts, and its
/// p99.9 is no worse than bb8's and deadpool's.
pub fn tails(results: &[CellResult]) -> Vec<String> {
    let Some(r) = results
        .iter()
        .find(|r| r.cell.workload == Workload::Overload)
    else {
        return Vec::new();
    };
    let Some(us) = r.series_of(Contender::Pgassist) else {
        return Vec::new();
    };
    let mut out = vec![format!(
        "{:<9} W5: pgassist timeouts {}",
        if us.timeouts() == 0 { "met" } else { "NOT MET" },
        us.timeouts()
    )];
    for peer in [Contender::Bb8Tuned, Contender::Deadpool] {
        if let Some(p) = r.series_of(peer) {
            let (a, b) = (us.latency()[2], p.latency()[2]);
            out.push(format!(
                "{:<9} W5: p99.9 pgassist {} ms vs {} {} ms (goal: no worse)",
                if a <= b { "met" } else { "NOT MET" },
                ms(a),
                p.contender.name(),
                ms(b)
            ));
        }
    }
    out
}

/// One JSON object per cell × contender, with every round's values.
pub fn json_lines(results: &[CellResult]) -> String {
    fn num(x: f64) -> String {
        if x.is_finite() {
            format!("{x:.3}")
        } else {
            "null".into()
        }
    }
    fn list(v: impl Iterator<Item = f64>) -> String {
        format!("[{}]", v.map(num).collect::<Vec<_>>().join(","))
    }
    let mut out = String::new();
    for r in results {
        let reference = r.reference().unwrap_or(f64::NAN);
        for s in &r.series {
            let _ = writeln!(
                out,
                "{{\"workload\":\"{}\",\"title\":\"{}\",\"clients\":{},\"pool\":{},\"contender\":\"{}\",\
                 \"unit\":\"ops/s\",\"median\":{},\"ratio_to_pgassist\":{},\"rounds\":{},\
                 \"bytes_per_op\":{},\"allocs_per_op\":{},\"latency_us\":{{\"p50\":{},\"p99\":{},\"p999\":{},\"max\":{}}},\
                 \"timeouts\":{}}}",
                r.cell.workload.id(),
                r.cell.workload.title(),
                r.cell.clients,
                r.cell.pool,
                s.contender.name(),
                num(s.median()),
                num(s.median() / reference),
                list(s.samples.iter().map(|x| x.ops_per_sec)),
                list(s.samples.iter().map(|x| x.bytes_per_op)),
                list(s.samples.iter().map(|x| x.allocs_per_op)),
                num(s.latency()[0]),
                num(s.latency()[1]),
                num(s.latency()[2]),
                num(s.latency()[3]),
                s.timeouts(),
            );
        }
    }
    out
}
