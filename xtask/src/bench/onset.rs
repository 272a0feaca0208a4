//! Where loss starts: after the rounds, tcptrace runs once more under the same load paced
//! at rising fractions of the untraced rate, so the report can say up to which rate it
//! loses nothing and from which rate it loses what (all of it counted, as in the rounds).

use serde_json::json;

use super::contenders::{self, Contenders, RunContext};
use super::extra::Figure;
use super::load::LoadConfig;
use super::{Run, Tracer, report};

/// Fractions of the untraced median rate the paced runs aim at.
pub const FRACTIONS: [f64; 4] = [0.2, 0.4, 0.6, 0.8];

pub struct Step {
    pub target: f64,
    pub run: Run,
}

impl Step {
    /// tcptrace's own count of a loss cause: `ringbuf_full` (the daemon fell behind) or
    /// `recursion_misses` (the kernel skipped a run nested on the CPU it ran on).
    fn cause(&self, name: &str) -> u64 {
        self.run
            .seen
            .as_ref()
            .and_then(|s| s.summary.as_ref())
            .and_then(|v| v["loss"][name].as_u64())
            .unwrap_or(0)
    }

    fn achieved(&self) -> f64 {
        self.run.load.per_second()
    }

    fn expected(&self) -> u64 {
        self.run.load.expected_transitions()
    }

    fn lost(&self) -> u64 {
        report::lost(&self.run).unwrap_or(0).max(0) as u64
    }
}

/// The flat-out tcptrace rounds: median rate, and the share of events lost over them all.
pub fn flat_out(runs: &[Run]) -> Option<(f64, f64)> {
    let traced: Vec<&Run> = runs
        .iter()
        .filter(|r| r.tracer == Tracer::Tcptrace)
        .collect();
    let rate = report::median(traced.iter().map(|r| r.load.per_second()).collect())?;
    let expected: u64 = traced.iter().map(|r| r.load.expected_transitions()).sum();
    let lost: i64 = traced.iter().filter_map(|r| report::lost(r)).sum();
    Some((rate, lost.max(0) as f64 / expected.max(1) as f64 * 100.0))
}

/// One paced tcptrace run per fraction of `untraced_rate`; stops at the first failure.
pub fn sweep(
    ctx: &RunContext,
    contenders: &Contenders,
    untraced_rate: f64,
) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    for (i, fraction) in FRACTIONS.iter().enumerate() {
        let target = (untraced_rate * fraction).round();
        eprintln!("bench: loss onset: tcptrace at {target:.0} connections/s");
        let load = LoadConfig {
            rate: Some(target),
            ..ctx.load.clone()
        };
        let paced = RunContext {
            load: &load,
            ..*ctx
        };
        let (run, _) = contenders::run_one(&paced, contenders, Tracer::Tcptrace, 100 + i, None)
            .map_err(|e| format!("{e:#}"))?;
        steps.push(Step { target, run });
    }
    Ok(steps)
}

/// The highest paced rate at which the ring buffer never overflowed (the daemon kept up),
/// with every step, its loss by cause, in the detail.
pub fn figure(steps: Result<Vec<Step>, String>, flat_out: Option<(f64, f64)>) -> Figure {
    const NAME: &str = "loss onset";
    let steps = match steps {
        Ok(s) if !s.is_empty() => s,
        Ok(_) => return Figure::unavailable(NAME, "no paced run"),
        Err(e) => return Figure::unavailable(NAME, e),
    };
    let mut detail: Vec<String> = steps
        .iter()
        .map(|s| {
            format!(
                "{:.0} conn/s ({:.0} events/s): {} lost of {} (ring buffer full {}, recursion misses {}){}",
                s.achieved(),
                s.achieved() * 10.0,
                s.lost(),
                s.expected(),
                s.cause("ringbuf_full"),
                s.cause("recursion_misses"),
                report::cpu_pct(&s.run)
                    .map_or(String::new(), |c| format!(", daemon CPU {c:.0}%"))
            )
        })
        .collect();
    if let Some((rate, lost_pct)) = flat_out {
        detail.push(format!(
            "flat out (the rounds' median) {rate:.0} conn/s: {lost_pct:.1}% lost"
        ));
    }
    let json = json!({
        "available": true,
        "steps": steps.iter().map(|s| json!({
            "target_conn_per_s": s.target,
            "achieved_conn_per_s": s.achieved(),
            "expected": s.expected(),
            "seen": s.run.seen.as_ref().map_or(0, |x| x.transitions),
            "lost": s.lost(),
            "ringbuf_full": s.cause("ringbuf_full"),
            "recursion_misses": s.cause("recursion_misses"),
            "daemon_cpu_percent": report::cpu_pct(&s.run),
        })).collect::<Vec<_>>(),
        "flat_out": flat_out.map(|(r, p)| json!({"conn_per_s": r, "lost_percent": p})),
    });
    let kept_up = |s: &&Step| s.cause("ringbuf_full") == 0;
    let highest = steps
        .iter()
        .filter(kept_up)
        .map(Step::achieved)
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
    let summary = match (highest, steps.iter().find(|s| s.cause("ringbuf_full") > 0)) {
        (Some(_), Some(l)) => format!(
            "the ring buffer first overflows at {:.0} conn/s",
            l.achieved()
        ),
        (Some(_), None) => "the ring buffer never overflowed at a paced rate".to_owned(),
        (None, _) => "the ring buffer overflowed at every paced rate".to_owned(),
    };
    Figure {
        name: NAME,
        value: Ok((
            highest.unwrap_or(0.0),
            "conn/s without ring-buffer overflow",
        )),
        detail: format!("{summary}; {}", detail.join("; ")),
        json,
    }
}
