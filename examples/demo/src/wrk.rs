//! Driving `wrk` from the benchmarks: the Lua hook that makes it print one machine-readable
//! line, running it bounded in time, and reading that line back.
//!
//! `fulcrum-compare` and `fulcrum-datapath` both measure through wrk; the script, the parsing
//! and the machine's load average live here once.

use std::{collections::BTreeMap, path::Path, process::Output, time::Duration};

use anyhow::{Context, Result, bail};
use tokio::process::Command;

/// Prints one machine-readable line at the end of a wrk run (latencies in microseconds). wrk 4
/// applies its coordinated-omission correction before `done`, so a stalled connection adds
/// synthetic tail samples.
pub const SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "FULCRUM_RESULT requests=%d duration_us=%d status=%d connect=%d read=%d write=%d timeout=%d p50=%.0f p99=%.0f p999=%.0f\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

/// One wrk run's `FULCRUM_RESULT` fields (`requests`, `duration_us`, `status`, `connect`,
/// `read`, `write`, `timeout`, `p50`, `p99`, `p999`; latencies in microseconds).
#[derive(Debug, Clone)]
pub struct Report(BTreeMap<String, f64>);

impl Report {
    /// A field's value, 0 when wrk did not print it.
    pub fn field(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(0.0)
    }

    /// Requests finished per second of the run.
    pub fn requests_per_second(&self) -> f64 {
        self.field("requests") / (self.field("duration_us") / 1e6).max(1e-9)
    }
}

/// One wrk run against `url` with `connections` over at most two threads for `seconds`,
/// reporting through `script` (a file holding [`SCRIPT`]); killed if it overruns by 30 s.
pub async fn run(
    wrk: &Path,
    script: &Path,
    url: &str,
    connections: u32,
    seconds: u64,
) -> Result<Report> {
    let threads = connections.clamp(1, 2);
    let output: Output = tokio::time::timeout(
        Duration::from_secs(seconds + 30),
        Command::new(wrk)
            .args([
                &format!("-t{threads}"),
                &format!("-c{connections}"),
                &format!("-d{seconds}s"),
                "--timeout",
                "3s",
                "--latency",
                "-s",
            ])
            .arg(script)
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("wrk did not finish in time")?
    .with_context(|| format!("running {}", wrk.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse(&stdout)
}

/// The `key=value` fields of the script's `FULCRUM_RESULT` line.
pub fn parse(stdout: &str) -> Result<Report> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("FULCRUM_RESULT "))
        .with_context(|| format!("wrk printed no FULCRUM_RESULT line:\n{stdout}"))?;
    line.split_whitespace()
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("bad wrk field `{pair}`"))?;
            Ok((key.to_owned(), value.parse()?))
        })
        .collect::<Result<_>>()
        .map(Report)
}

/// `/proc/loadavg`'s three load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_result_line_is_read_among_wrk_output_and_rates_come_from_its_duration() {
        let report = parse(
            "Running 1s test\nFULCRUM_RESULT requests=500 duration_us=2000000 status=3 connect=0 read=0 write=0 timeout=1 p50=120 p99=900 p999=1500\n",
        )
        .unwrap();
        assert_eq!(report.field("status"), 3.0);
        assert_eq!(report.field("p99"), 900.0);
        assert_eq!(report.field("absent"), 0.0);
        assert_eq!(report.requests_per_second(), 250.0);
    }

    #[test]
    fn output_without_the_result_line_or_with_a_bad_field_is_an_error() {
        assert!(parse("Running 1s test\n").is_err());
        assert!(parse("FULCRUM_RESULT requests=abc\n").is_err());
        assert!(parse("FULCRUM_RESULT requests\n").is_err());
    }
}
