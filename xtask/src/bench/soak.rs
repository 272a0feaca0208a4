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
use super::report::{self, machine};
use super::tracer::{self, Stopped};

const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Length of the untraced run that a share-of-untraced pace is taken from.
const UNTRACED_PROBE: Duration = Duration::from_secs(6);

/// `--soak-rate`: how fast the soak's load runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    Flat,
    PerSecond(f64),
    /// A fraction (0, 1] of the untraced rate, measured right before the soak.
    ShareOfUntraced(f64),
}

impl Pace {
    pub fn parse(s: &str) -> Result<Pace, String> {
        let t = s.trim();
        if t == "flat" {
            return Ok(Pace::Flat);
        }
        if let Some(pct) = t.strip_suffix('%') {
            return match pct.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(Pace::ShareOfUntraced(p / 100.0)),
                _ => Err(format!(
                    "{s:?}: a share of the untraced rate is a percentage above 0 and at most 100"
                )),
            };
        }
        match t.parse::<f64>() {
            Ok(r) if r.is_finite() && r >= 1.0 => Ok(Pace::PerSecond(r)),
            _ => Err(format!(
                "{s:?} is not a soak rate (examples: 50%, 12000, flat)"
            )),
        }
    }
}

/// The pace a soak ran at: what was asked, the untraced rate it was taken from, and the
/// target in connections/s (None: flat out).
#[derive(Clone, Copy, Debug)]
pub struct Paced {
    pub asked: Pace,
    pub untraced: Option<f64>,
    pub target: Option<f64>,
}

/// Resolves `--soak-rate`, running the load untraced first when the pace is a share of it.
pub fn pace(asked: Pace, load: &LoadConfig, abort: &'static AtomicBool) -> Result<Paced> {
    let (untraced, target) = match asked {
        Pace::Flat => (None, None),
        Pace::PerSecond(r) => (None, Some(r)),
        Pace::ShareOfUntraced(share) => {
            eprintln!(
                "bench: soak: the load untraced for {} s, to pace the soak at {:.0}% of it",
                UNTRACED_PROBE.as_secs(),
                share * 100.0
            );
            let probe = LoadConfig {
                duration: UNTRACED_PROBE,
                rate: None,
                ..load.clone()
            };
            let rate = load::run(&probe, abort)?.per_second();
            if rate.is_nan() || rate <= 0.0 {
                anyhow::bail!(
                    "the untraced load completed no connection; nothing to pace the soak by"
                );
            }
            eprintln!("bench: soak: untraced {rate:.0} connections/s");
            (Some(rate), Some((rate * share).round()))
        }
    };
    Ok(Paced {
        asked,
        untraced,
        target,
    })
}

impl Paced {
    fn describe(&self) -> String {
        match (self.asked, self.untraced, self.target) {
            (Pace::ShareOfUntraced(share), Some(u), Some(t)) => format!(
                "paced at {t:.0} connections/s ({:.0}% of the untraced {u:.0}/s measured just before)",
                share * 100.0
            ),
            (_, _, Some(t)) => format!("paced at {t:.0} connections/s"),
            _ => "flat out".to_string(),
        }
    }
}

pub struct Soak {
    pub load: LoadResult,
    pub config: LoadConfig,
    pub pace: Paced,
    /// (seconds since the load started, RSS KiB).
    pub samples: Vec<(f64, u64)>,
    pub daemon: Stopped,
    /// tcptrace's final summary line.
    pub summary: Option<Value>,
}

pub fn run(
    bin: &Path,
    cfg: &LoadConfig,
    pace: Paced,
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
        "bench: soak: tcptrace under the load ({}) for {} s, RSS every {} s",
        pace.describe(),
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
        pace,
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
    /// tcptrace's own count of what it lost, in all and by cause.
    lost: Option<u64>,
    ringbuf_full: Option<u64>,
    recursion_misses: Option<u64>,
    cpu_pct: f64,
}

impl Figures {
    /// RSS that grew by more than 1 MiB and 1 % after the first half is not flat.
    fn flat(&self) -> bool {
        self.drift <= (1024 + self.first / 100) as i64
    }

    /// Expected minus what reached tcptrace, the load's own count of the loss.
    fn missing(&self) -> Option<i64> {
        Some(self.expected as i64 - self.transitions? as i64)
    }
}

fn figures(s: &Soak) -> Figures {
    let rss: Vec<u64> = s.samples.iter().map(|(_, k)| *k).collect();
    let half = rss.len() / 2;
    let max_of = |v: &[u64]| v.iter().copied().max().unwrap_or(0);
    let get = |k: &str| s.summary.as_ref().and_then(|v| v.get(k)?.as_u64());
    let cause = |k: &str| {
        s.summary
            .as_ref()
            .and_then(|v| v.get("loss")?.get(k)?.as_u64())
    };
    Figures {
        first: rss.first().copied().unwrap_or(0),
        last: rss.last().copied().unwrap_or(0),
        max: max_of(&rss).max(s.daemon.peak_rss_kib),
        drift: max_of(&rss[half..]) as i64 - max_of(&rss[..half]) as i64,
        expected: s.load.expected_transitions(),
        transitions: get("transitions"),
        lost: get("lost"),
        ringbuf_full: cause("ringbuf_full"),
        recursion_misses: cause("recursion_misses"),
        cpu_pct: s.daemon.cpu_seconds / s.load.elapsed.as_secs_f64() * 100.0,
    }
}

fn count(n: Option<u64>) -> String {
    n.map_or("?".into(), |n| n.to_string())
}

fn share(n: u64, of: u64) -> String {
    if of == 0 {
        return String::new();
    }
    format!(" ({:.3}% of expected)", n as f64 / of as f64 * 100.0)
}

/// What the soak shows, in two sentences: memory, then loss.
fn verdict(f: &Figures) -> [String; 2] {
    let memory = if f.flat() {
        format!(
            "memory flat: the second half's RSS peak is {:+.1} MiB from the first half's",
            f.drift as f64 / 1024.0
        )
    } else {
        format!(
            "memory NOT flat: RSS grew {:+.1} MiB after the first half",
            f.drift as f64 / 1024.0
        )
    };
    let loss = match (f.ringbuf_full, f.recursion_misses, f.missing(), f.lost) {
        (Some(0), Some(0), Some(0), _) => "no event lost".to_string(),
        (Some(0), Some(r), Some(m), Some(l)) if m == l as i64 => format!(
            "no ring-buffer loss; the {r} events lost are the kernel's recursion misses (a run skipped while it interrupted itself on one CPU), all counted"
        ),
        (Some(rb), _, Some(m), Some(l)) if m == l as i64 => format!(
            "events lost: {l}, all counted ({rb} to a full ring buffer: the daemon fell behind)"
        ),
        (_, _, Some(m), Some(l)) => format!(
            "events lost: the load expected {m} more than reached tcptrace, which counted {l}"
        ),
        _ => "loss unknown: tcptrace wrote no summary".to_string(),
    };
    [memory, loss]
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
        "load:    {} client + {} server threads, {} ports, {} s, {}, {tw_reuse}; tcptrace --output (rotated at 256 MiB)",
        s.config.clients,
        s.config.servers,
        s.config.ports.len(),
        s.load.elapsed.as_secs(),
        s.pace.describe()
    )
    .ok();
    writeln!(w).ok();
    writeln!(
        w,
        "connections {} ({:.0}/s); transitions expected {}, reached tcptrace {}",
        s.load.completed,
        s.load.per_second(),
        f.expected,
        count(f.transitions),
    )
    .ok();
    // Connections that did not complete still made transitions the count does not expect.
    let l = &s.load;
    if l.connect_errors + l.server_errors > 0 || l.connected != l.completed {
        writeln!(
            w,
            "load: connected {}, completed {}, connect errors {}, server errors {} (first: {})",
            l.connected,
            l.completed,
            l.connect_errors,
            l.server_errors,
            l.first_error.as_deref().unwrap_or("-")
        )
        .ok();
    }
    writeln!(
        w,
        "lost, by tcptrace's count: {}{}: ring buffer full {}, recursion misses {}; expected - reached {}",
        count(f.lost),
        f.lost.map_or(String::new(), |l| share(l, f.expected)),
        count(f.ringbuf_full),
        count(f.recursion_misses),
        f.missing().map_or("?".into(), |m| m.to_string()),
    )
    .ok();
    let per_transition = |seconds: f64| {
        f.transitions
            .and_then(|n| report::us_per(seconds, n))
            .unwrap_or(f64::NAN)
    };
    writeln!(
        w,
        "daemon CPU {:.0}% of one core; {:.2} µs per transition that reached it, {:.2} of it in the kernel (system time)",
        f.cpu_pct,
        per_transition(s.daemon.cpu_seconds),
        per_transition(s.daemon.cpu_system_seconds),
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
    let [memory, loss] = verdict(&f);
    writeln!(w, "\nverdict: {memory}; {loss}.").ok();
    out
}

pub fn json(s: &Soak, command: &str) -> Value {
    let f = figures(s);
    json!({
        "schema": 1,
        "command": command,
        "seconds": s.load.elapsed.as_secs_f64(),
        "connections": s.load.completed,
        "connected": s.load.connected,
        "connect_errors": s.load.connect_errors,
        "server_errors": s.load.server_errors,
        "first_error": s.load.first_error,
        "connections_per_second": s.load.per_second(),
        "transitions_expected": f.expected,
        "transitions_reached_tcptrace": f.transitions,
        "pace": {
            "asked": format!("{:?}", s.pace.asked),
            "untraced_connections_per_second": s.pace.untraced,
            "target_connections_per_second": s.pace.target,
        },
        "lost_counted": f.lost,
        "lost_ringbuf_full": f.ringbuf_full,
        "lost_recursion_misses": f.recursion_misses,
        "expected_minus_reached": f.missing(),
        "memory_flat": f.flat(),
        "daemon_cpu_seconds": s.daemon.cpu_seconds,
        "daemon_cpu_system_seconds": s.daemon.cpu_system_seconds,
        "daemon_cpu_percent": f.cpu_pct,
        "rss_kib": { "first": f.first, "last": f.last, "max": f.max, "drift_second_half_vs_first": f.drift },
        "samples": s.samples.iter().map(|(t, k)| json!({ "seconds": t, "rss_kib": k })).collect::<Vec<_>>(),
        "summary": s.summary,
        "exit": s.daemon.exit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_reads_shares_rates_and_flat() {
        assert_eq!(Pace::parse("50%"), Ok(Pace::ShareOfUntraced(0.5)));
        assert_eq!(Pace::parse(" 100 % "), Ok(Pace::ShareOfUntraced(1.0)));
        assert_eq!(Pace::parse("12000"), Ok(Pace::PerSecond(12000.0)));
        assert_eq!(Pace::parse("flat"), Ok(Pace::Flat));
        for bad in ["0%", "120%", "-5", "0", "fast", "", "nan"] {
            assert!(Pace::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn figures(drift_kib: i64, rb: u64, rec: u64, reached: u64) -> Figures {
        Figures {
            first: 100 * 1024,
            last: 100 * 1024,
            max: 100 * 1024,
            drift: drift_kib,
            expected: 1_000_000,
            transitions: Some(reached),
            lost: Some(rb + rec),
            ringbuf_full: Some(rb),
            recursion_misses: Some(rec),
            cpu_pct: 20.0,
        }
    }

    #[test]
    fn verdict_tells_flat_from_growing_and_counted_from_uncounted_loss() {
        let [mem, loss] = verdict(&figures(0, 0, 0, 1_000_000));
        assert!(mem.starts_with("memory flat"), "{mem}");
        assert_eq!(loss, "no event lost");

        // 100 MiB at start: up to 1 MiB + 1 % (2 MiB in all) still counts as flat.
        assert!(figures(2 * 1024, 0, 0, 0).flat());
        assert!(!figures(2 * 1024 + 1, 0, 0, 0).flat());
        let [mem, _] = verdict(&figures(10 * 1024, 0, 0, 1_000_000));
        assert!(mem.starts_with("memory NOT flat"), "{mem}");

        let [_, loss] = verdict(&figures(0, 0, 30, 999_970));
        assert!(
            loss.starts_with("no ring-buffer loss; the 30 events"),
            "{loss}"
        );
        let [_, loss] = verdict(&figures(0, 500, 30, 999_470));
        assert!(
            loss.starts_with("events lost: 530, all counted (500"),
            "{loss}"
        );
        // Fewer reached tcptrace than it accounts for: said, not hidden.
        let [_, loss] = verdict(&figures(0, 0, 30, 999_000));
        assert!(
            loss.contains("expected 1000 more than reached tcptrace, which counted 30"),
            "{loss}"
        );
    }
}
