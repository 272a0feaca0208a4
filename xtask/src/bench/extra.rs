//! Figures beyond live overhead, each one function returning a [`Figure`]; add the next one
//! here and list it in `bench::extra_figures`. Replay throughput is measured; engine memory per
//! connection is the place left for the 1M-connection measurement.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub struct Figure {
    pub name: &'static str,
    /// The number and its unit, or why there is none yet.
    pub value: Result<(f64, &'static str), String>,
    /// How it was measured, for the report.
    pub detail: String,
    pub json: Value,
}

impl Figure {
    fn unavailable(name: &'static str, why: impl Into<String>) -> Figure {
        let why = why.into();
        Figure {
            name,
            json: json!({ "available": false, "reason": why }),
            value: Err(why),
            detail: String::new(),
        }
    }
}

/// `tcptrace analyze` of a log recorded by a traced round, single-threaded: transitions in the
/// file per second of wall time (median of `runs`), and the replay's peak RSS.
pub fn replay_throughput(bin: Option<&Path>, log: Option<(&Path, u64)>, runs: usize) -> Figure {
    const NAME: &str = "replay throughput";
    let Some(bin) = bin else {
        return Figure::unavailable(NAME, "tcptrace is not available");
    };
    let Some((log, transitions)) = log else {
        return Figure::unavailable(NAME, "no recorded log (no successful tcptrace round)");
    };
    // A binary without the subcommand, or an empty stub, must not produce a number.
    let help = Command::new(bin).args(["analyze", "--help"]).output();
    match help {
        Ok(o) if o.status.success() && !o.stdout.is_empty() => {}
        _ => return Figure::unavailable(NAME, "not available yet: `tcptrace analyze` is missing"),
    }
    let mut walls = Vec::new();
    let mut peak_rss_kib = 0;
    for _ in 0..runs.max(1) {
        let mut cmd = Command::new(bin);
        cmd.arg("analyze").arg(log).args(["--view", "none"]);
        match run_measured(&mut cmd) {
            Ok((wall, rss)) => {
                walls.push(wall);
                peak_rss_kib = peak_rss_kib.max(rss);
            }
            Err(why) => return Figure::unavailable(NAME, format!("not available yet: {why}")),
        }
    }
    walls.sort();
    let wall = walls[walls.len() / 2];
    let rate = transitions as f64 / wall.as_secs_f64();
    Figure {
        name: NAME,
        value: Ok((rate, "transitions/s")),
        detail: format!(
            "`tcptrace analyze <log> --view none` on {transitions} transitions: {:.2} s (median of {}), peak RSS {} MiB",
            wall.as_secs_f64(),
            walls.len(),
            peak_rss_kib / 1024
        ),
        json: json!({
            "available": true,
            "transitions_per_second": rate,
            "transitions": transitions,
            "wall_seconds": walls.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
            "peak_rss_kib": peak_rss_kib,
        }),
    }
}

/// Extension point: memory the lifecycle engine holds per tracked connection at 1M open
/// connections. Intended measurement: feed `tcptrace analyze -` a synthetic log of 1M
/// connections that reach ESTABLISHED and never close (generated on the fly into its stdin),
/// take its peak RSS, subtract the peak RSS of the same replay with 1 connection, divide by 1M.
pub fn engine_memory_per_connection() -> Figure {
    Figure::unavailable(
        "engine memory per connection (1M connections)",
        "not wired yet",
    )
}

/// Runs `cmd` to completion with its output discarded; wall time and peak RSS (KiB).
fn run_measured(cmd: &mut Command) -> Result<(Duration, u64), String> {
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not start {cmd:?}: {e}"))?;
    let pid = child.id() as libc::pid_t;
    let mut stderr = child.stderr;
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(s) = stderr.as_mut() {
            std::io::Read::read_to_string(s, &mut text).ok();
        }
        text
    });
    let mut status = 0;
    // SAFETY: all-zero is a valid rusage; pid is our child, reaped only here.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    let err = err_reader.join().unwrap_or_default();
    if r != pid {
        return Err(format!("wait4 failed: {}", std::io::Error::last_os_error()));
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        return Err(format!("`tcptrace analyze` failed: {last}"));
    }
    Ok((wall, usage.ru_maxrss as u64))
}
