//! `cargo xtask bench --soak 5m`: one tcptrace daemon under the churn load for minutes, its
//! RSS sampled every few seconds. Memory that grows with time rather than with open
//! connections (a leak, an unbounded table) shows here and nowhere else.

use std::fmt::Write as _;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use super::contenders::tcptrace_spec;
use super::extra::vm_rss_kib;
use super::load::{self, LoadConfig, LoadResult};
use super::report::machine;
use super::tracer::{self, Stopped};

const SAMPLE_EVERY: Duration = Duration::from_secs(5);

pub struct Soak {
    pub load: LoadResult,
    pub config: LoadConfig,
    /// (seconds since the load started, RSS KiB).
    pub samples: Vec<(f64, u64)>,
    pub daemon: Stopped,
    /// tcptrace's final summary line.
    pub summary: Option<Value>,
}

pub fn run(
    bin: &Path,
    cfg: &LoadConfig,
    raw: &Path,
    nice: i32,
    abort: &'static AtomicBool,
) -> Result<Soak> {
    let log = raw.join("soak.ndjson");
    let mut spec = tcptrace_spec(bin, &log, raw, 0, cfg.duration);
    // The log of a long soak would fill the disk: rotate it, keep one old file.
    spec.command
        .args(["--rotate-size", "256M", "--rotate-keep", "1"]);
    spec.name = "tcptrace soak";
    spec.nice = nice;
    eprintln!(
        "bench: soak: tcptrace under the load for {} s, RSS every {} s",
        cfg.duration.as_secs(),
        SAMPLE_EVERY.as_secs()
    );
    let mut daemon = tracer::start(spec, abort)?;
    let pid = daemon.pid();
    daemon.mark_load_start();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let start = Instant::now();
            let mut samples = Vec::new();
            let mut next = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                if start.elapsed() >= next {
                    if let Some(rss) = vm_rss_kib(pid) {
                        samples.push((start.elapsed().as_secs_f64(), rss));
                        let (t, kib) = (start.elapsed().as_secs(), rss);
                        if samples.len() % 12 == 1 {
                            eprintln!("bench: soak: {t} s: RSS {} MiB", kib / 1024);
                        }
                    }
                    next += SAMPLE_EVERY;
                }
                thread::sleep(Duration::from_millis(50));
            }
            if let Some(rss) = vm_rss_kib(pid) {
                samples.push((start.elapsed().as_secs_f64(), rss));
            }
            samples
        })
    };
    let load = load::run(cfg, abort);
    daemon.mark_load_end();
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap_or_default();
    thread::sleep(Duration::from_secs(1));
    let daemon = daemon.stop(Duration::from_secs(60));
    let load = load?;
    if daemon.exited_early {
        anyhow::bail!(
            "tcptrace exited during the soak ({}): {}",
            daemon.exit,
            daemon.stderr_tail
        );
    }
    let summary = last_summary(&log).with_context(|| format!("reading {}", log.display()))?;
    for p in [log.clone(), rotated(&log)] {
        std::fs::remove_file(p).ok();
    }
    Ok(Soak {
        load,
        config: cfg.clone(),
        samples,
        daemon,
        summary,
    })
}

fn rotated(log: &Path) -> PathBuf {
    let mut s = log.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// The summary tcptrace writes last, from the tail of the (current, rotated) log.
fn last_summary(log: &Path) -> Result<Option<Value>> {
    let mut f = std::fs::File::open(log)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
    let mut tail = String::new();
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    tail.push_str(&String::from_utf8_lossy(&bytes));
    Ok(tail
        .lines()
        .rev()
        .filter(|l| l.contains("\"summary\""))
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("type").and_then(Value::as_str) == Some("summary")))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

struct Figures {
    first: u64,
    last: u64,
    max: u64,
    /// Max over the second half minus max over the first half: growth once warmed up.
    drift: i64,
    expected: u64,
    transitions: Option<u64>,
    lost: Option<u64>,
    cpu_pct: f64,
}

fn figures(s: &Soak) -> Figures {
    let rss: Vec<u64> = s.samples.iter().map(|(_, k)| *k).collect();
    let half = rss.len() / 2;
    let max_of = |v: &[u64]| v.iter().copied().max().unwrap_or(0);
    let get = |k: &str| s.summary.as_ref().and_then(|v| v.get(k)?.as_u64());
    Figures {
        first: rss.first().copied().unwrap_or(0),
        last: rss.last().copied().unwrap_or(0),
        max: max_of(&rss).max(s.daemon.peak_rss_kib),
        drift: max_of(&rss[half..]) as i64 - max_of(&rss[..half]) as i64,
        expected: s.load.expected_transitions(),
        transitions: get("transitions"),
        lost: get("lost"),
        cpu_pct: s.daemon.cpu_seconds / s.load.elapsed.as_secs_f64() * 100.0,
    }
}

pub fn table(s: &Soak, command: &str, tw_reuse: &str) -> String {
    let m = machine();
    let f = figures(s);
    let mut out = String::new();
    let w = &mut out;
    writeln!(
        w,
        "\ntcptrace bench --soak: one daemon under loopback churn"
    )
    .ok();
    writeln!(w, "{}", m.line()).ok();
    writeln!(w, "command: {command}").ok();
    writeln!(
        w,
        "load:    {} client + {} server threads, {} ports, {} s, {tw_reuse}; tcptrace --output (rotated at 256 MiB)",
        s.config.clients,
        s.config.servers,
        s.config.ports.len(),
        s.load.elapsed.as_secs()
    )
    .ok();
    writeln!(w).ok();
    writeln!(
        w,
        "connections {} ({:.0}/s); transitions expected {}, reached tcptrace {}, lost (counted by tcptrace) {}{}",
        s.load.completed,
        s.load.per_second(),
        f.expected,
        f.transitions.map_or("?".into(), |n| n.to_string()),
        f.lost.map_or("?".into(), |n| n.to_string()),
        match f.lost {
            Some(l) if f.expected > 0 =>
                format!(" ({:.1}% of expected)", l as f64 / f.expected as f64 * 100.0),
            _ => String::new(),
        }
    )
    .ok();
    writeln!(
        w,
        "daemon CPU {:.0}% of one core; {:.2} µs per transition that reached it",
        f.cpu_pct,
        f.transitions
            .filter(|n| *n > 0)
            .map_or(f64::NAN, |n| s.daemon.cpu_seconds * 1e6 / n as f64)
    )
    .ok();
    writeln!(
        w,
        "RSS ({} samples, every {} s): first {:.1} MiB, last {:.1} MiB, max {:.1} MiB; second-half max - first-half max {:+.1} MiB",
        s.samples.len(),
        SAMPLE_EVERY.as_secs(),
        mib(f.first),
        mib(f.last),
        mib(f.max),
        f.drift as f64 / 1024.0
    )
    .ok();
    let trace: Vec<String> = s
        .samples
        .iter()
        .step_by((s.samples.len() / 12).max(1))
        .map(|(t, k)| format!("{t:.0}s {:.1}", mib(*k)))
        .collect();
    writeln!(w, "RSS MiB over time: {}", trace.join(", ")).ok();
    out
}

pub fn json(s: &Soak, command: &str) -> Value {
    let f = figures(s);
    json!({
        "schema": 1,
        "command": command,
        "seconds": s.load.elapsed.as_secs_f64(),
        "connections": s.load.completed,
        "connections_per_second": s.load.per_second(),
        "transitions_expected": f.expected,
        "transitions_reached_tcptrace": f.transitions,
        "lost_counted": f.lost,
        "daemon_cpu_seconds": s.daemon.cpu_seconds,
        "daemon_cpu_percent": f.cpu_pct,
        "rss_kib": { "first": f.first, "last": f.last, "max": f.max, "drift_second_half_vs_first": f.drift },
        "samples": s.samples.iter().map(|(t, k)| json!({ "seconds": t, "rss_kib": k })).collect::<Vec<_>>(),
        "summary": s.summary,
        "exit": s.daemon.exit,
    })
}
