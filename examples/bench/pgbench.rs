//! pgbench as a subprocess: loading the tables, and running the workloads
//! as custom scripts with `-M prepared` — the C client, as the limit.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::Command;

use crate::workers::{BoxError, Res, Workload};

/// The pgbench binary: on PATH, else next to the PostgreSQL server binaries.
pub fn binary() -> Res<PathBuf> {
    let candidates = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(
            std::fs::read_dir("/usr/lib/postgresql")
                .into_iter()
                .flatten()
                .flatten()
                .map(|d| d.path().join("bin")),
        );
    for dir in candidates {
        let path = dir.join("pgbench");
        if path.is_file() {
            return Ok(path);
        }
    }
    Err("pgbench not found (Debian: apt-get install postgresql-contrib)".into())
}

/// `pgbench -i -s SCALE`: the four tables, 100 000 × scale accounts, vacuumed.
pub async fn load(pgbench: &Path, url: &str, scale: i32) -> Res<Duration> {
    let started = Instant::now();
    let out = Command::new(pgbench)
        .args(["-i", "-q", "-s", &scale.to_string(), url])
        .output()
        .await?;
    if !out.status.success() {
        return Err(format!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(started.elapsed())
}

/// Writes the three scripts into `dir` and returns their paths by workload.
pub fn write_scripts(dir: &Path, scale: i32) -> Res<Scripts> {
    std::fs::create_dir_all(dir)?;
    let accounts = 100_000 * scale;
    let aid = format!("\\set aid random(1, {accounts})\n");
    let w1 = format!("{aid}SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n");
    let w2 = format!(
        "{aid}\\set delta random(-5000, 5000)\nBEGIN;\n\
         UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;\nEND;\n"
    );
    let w3 = format!(
        "{aid}\\set tid random(1, {})\n\\set bid random(1, {scale})\nBEGIN;\n\
         SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n\
         SELECT tbalance FROM pgbench_tellers WHERE tid = :tid;\n\
         SELECT bbalance FROM pgbench_branches WHERE bid = :bid;\nEND;\n",
        10 * scale
    );
    let mut paths = Vec::new();
    for (name, text) in [("w1.sql", w1), ("w2.sql", w2), ("w3.sql", w3)] {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        paths.push(path);
    }
    let [w1, w2, w3] = <[PathBuf; 3]>::try_from(paths).expect("three scripts");
    Ok(Scripts { w1, w2, w3 })
}

pub struct Scripts {
    w1: PathBuf,
    w2: PathBuf,
    w3: PathBuf,
}

impl Scripts {
    fn for_workload(&self, w: Workload) -> Option<&Path> {
        match w {
            Workload::PointSelect => Some(&self.w1),
            Workload::WriteTx => Some(&self.w2),
            Workload::ReadTx => Some(&self.w3),
            Workload::IdleHeavy | Workload::Overload => None,
        }
    }
}

/// How long one pgbench run lasts: `-T` whole seconds (at least one),
/// unless `short` asks for a sub-second run, which pgbench can only do as a
/// transaction count per client (`-t`), sized from an estimate of its rate.
/// Short runs undercount at many clients (clients that finish early idle
/// while the rest run), so only `--quick` uses them.
pub fn duration_args(
    window: Duration,
    clients: usize,
    estimate_tps: Option<f64>,
    short: bool,
) -> Vec<String> {
    let secs = window.as_secs_f64();
    match estimate_tps {
        Some(tps) if short && secs < 1.0 => {
            let per_client = (tps * secs / clients as f64).round().max(10.0) as u64;
            vec!["-t".into(), per_client.to_string()]
        }
        _ => vec!["-T".into(), secs.round().max(1.0).to_string()],
    }
}

/// Runs one workload with pgbench and returns its tps (one script
/// execution = one operation, as in the Rust contenders), excluding the
/// time to connect.
pub async fn run(
    pgbench: &Path,
    scripts: &Scripts,
    url: &str,
    workload: Workload,
    clients: usize,
    duration: &[String],
) -> Res<f64> {
    let script = scripts
        .for_workload(workload)
        .ok_or("pgbench does not run this workload")?;
    let threads = clients.min(2);
    let out = Command::new(pgbench)
        .args(["-n", "-M", "prepared", "-f"])
        .arg(script)
        .args(["-c", &clients.to_string(), "-j", &threads.to_string()])
        .args(duration)
        .arg(url)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "pgbench failed: {}{}",
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    parse_tps(&stdout).ok_or_else(|| -> BoxError { format!("no tps in: {stdout}").into() })
}

/// `tps = 12345.678901 (without initial connection time)`
fn parse_tps(stdout: &str) -> Option<f64> {
    stdout
        .lines()
        .find(|l| l.starts_with("tps = ") && l.contains("without initial connection"))
        .and_then(|l| l["tps = ".len()..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_tps() {
        let out = "latency average = 0.1 ms\ntps = 9123.456 (without initial connection time)\n";
        assert_eq!(super::parse_tps(out), Some(9123.456));
    }
}
