//! The bench's results: one table on stdout (machine and command first) and the same figures
//! as JSON in target/bench/results.json.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::tracer::Stopped;
use super::{Outcome, Run, Tracer};

impl Machine {
    /// The report's `machine:` line.
    pub fn line(&self) -> String {
        format!(
            "machine: {} ({} cores), Linux {}, {:.1} GiB RAM",
            self.cpu, self.cores, self.kernel, self.memory_gib
        )
    }
}

pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_gib: f64,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0.0);
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        memory_gib: mem_kib / 1024.0 / 1024.0,
    }
}

fn rate(run: &Run) -> f64 {
    run.load.per_second()
}

/// CPU seconds the daemon used per second of load, in percent of one core.
pub(super) fn cpu_pct(run: &Run) -> Option<f64> {
    let d = run.daemon.as_ref()?;
    Some(d.cpu_seconds / run.load.elapsed.as_secs_f64() * 100.0)
}

/// The daemon's CPU per event it reported (issue #6's userspace target: 0.5 µs).
fn us_per_event(run: &Run) -> Option<f64> {
    per_event_us(run, |d| d.cpu_seconds)
}

/// The kernel's part of `us_per_event`: the daemon's system time per event it reported.
fn sys_us_per_event(run: &Run) -> Option<f64> {
    per_event_us(run, |d| d.cpu_system_seconds)
}

/// Some of the daemon's CPU seconds, per event it reported, in µs.
fn per_event_us(run: &Run, seconds: impl Fn(&Stopped) -> f64) -> Option<f64> {
    us_per(
        seconds(run.daemon.as_ref()?),
        run.seen.as_ref()?.transitions,
    )
}

/// `seconds` of CPU per one of `events`, in µs (none without events or a known time).
pub(super) fn us_per(seconds: f64, events: u64) -> Option<f64> {
    (events > 0 && seconds.is_finite()).then(|| seconds / events as f64 * 1e6)
}

/// Mean run time of the tracer's BPF program per invocation (needs BPF stats on).
fn bpf_ns_per_event(run: &Run) -> Option<f64> {
    let p = run.daemon.as_ref()?.prog;
    (p.run_cnt > 0 && p.run_time_ns > 0).then(|| p.run_time_ns as f64 / p.run_cnt as f64)
}

fn ratio(outcome: &Outcome, run: &Run) -> Option<f64> {
    let base = outcome
        .runs
        .iter()
        .find(|r| r.round == run.round && r.tracer == Tracer::Untraced)?;
    Some(rate(run) / rate(base))
}

pub(super) fn lost(run: &Run) -> Option<i64> {
    let seen = run.seen.as_ref()?;
    Some(run.load.expected_transitions() as i64 - seen.transitions as i64)
}

/// What is missing from a tracer's log and what the tracer counted lost, when the two
/// differ; only for the tcptrace contenders whose log is meant to hold every transition of
/// the load (the filtered one drops them all on purpose, and bcc's own count is known to
/// be short).
pub(super) fn count_gap(run: &Run) -> Option<(i64, u64)> {
    if !matches!(run.tracer, Tracer::Tcptrace | Tracer::TcptraceBinary) {
        return None;
    }
    let missing = lost(run)?;
    let counted = run.seen.as_ref()?.tool_reported_lost?;
    (missing != counted as i64).then_some((missing, counted))
}

/// The rounds where tcptrace's own count of what it lost differs from what is missing from
/// its log, with the transitions short of one per connection: which kinds went missing
/// unseen is where to look for the cause.
fn uncounted(runs: &[Run]) -> Vec<String> {
    let mut lines = Vec::new();
    for run in runs {
        let (Some(seen), Some((missing, counted))) = (&run.seen, count_gap(run)) else {
            continue;
        };
        let short: Vec<String> = seen
            .by_kind
            .iter()
            .filter(|(k, _)| !k.contains("LISTEN"))
            .filter_map(|(k, &n)| {
                let gap = run.load.completed as i64 - n as i64;
                (gap != 0).then(|| format!("{k} {gap}"))
            })
            .collect();
        lines.push(format!(
            "round {} {}: {} transitions missing from the log, {} counted lost by tcptrace ({:+} not accounted for); short of one per connection: {}",
            run.round,
            run.tracer.label(),
            thousands(missing as f64),
            thousands(counted as f64),
            missing - counted as i64,
            if short.is_empty() {
                "none".to_owned()
            } else {
                short.join(", ")
            }
        ));
    }
    lines
}

pub fn one_line(run: &Run) -> String {
    let mut s = format!(
        "{:.0} connections/s ({} in {:.2} s)",
        rate(run),
        run.load.completed,
        run.load.elapsed.as_secs_f64()
    );
    if let Some(seen) = &run.seen {
        write!(
            s,
            ", events expected {} seen {}",
            run.load.expected_transitions(),
            seen.transitions
        )
        .ok();
    }
    if let Some(cpu) = cpu_pct(run) {
        write!(s, ", daemon CPU {cpu:.0}%").ok();
    }
    if let Some(us) = us_per_event(run) {
        write!(s, " ({us:.2} µs/event").ok();
        if let Some(sys) = sys_us_per_event(run) {
            write!(s, ", {sys:.2} of it in the kernel").ok();
        }
        write!(s, ")").ok();
    }
    if let Some(ns) = bpf_ns_per_event(run) {
        write!(s, ", BPF {ns:.0} ns/event").ok();
    }
    if run.load.connect_errors + run.load.server_errors > 0
        || run.load.connected != run.load.completed
    {
        write!(
            s,
            " [connected {}, connect errors {}, server errors {}: {}]",
            run.load.connected,
            run.load.connect_errors,
            run.load.server_errors,
            run.load.first_error.as_deref().unwrap_or("-")
        )
        .ok();
    }
    s
}

pub(super) fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn range(v: &[f64]) -> Option<(f64, f64)> {
    let min = v.iter().copied().min_by(f64::total_cmp)?;
    let max = v.iter().copied().max_by(f64::total_cmp)?;
    Some((min, max))
}

/// Thousands separators: 23456 → "23,456".
fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0.0 { format!("-{out}") } else { out }
}

struct Row {
    tracer: Tracer,
    rates: Vec<f64>,
    ratios: Vec<f64>,
    expected: u64,
    seen: u64,
    tool_lost: Option<u64>,
    cpu: Vec<f64>,
    us_per_event: Vec<f64>,
    sys_us_per_event: Vec<f64>,
    peak_rss_kib: u64,
    startup: Vec<f64>,
    bpf_ns: Vec<f64>,
    recursion_misses: u64,
}

fn rows(outcome: &Outcome) -> Vec<Row> {
    Tracer::ALL
        .into_iter()
        .filter_map(|tracer| {
            let runs: Vec<&Run> = outcome.runs.iter().filter(|r| r.tracer == tracer).collect();
            if runs.is_empty() {
                return None;
            }
            let tool_lost: Vec<u64> = runs
                .iter()
                .filter_map(|r| r.seen.as_ref()?.tool_reported_lost)
                .collect();
            Some(Row {
                tracer,
                rates: runs.iter().map(|r| rate(r)).collect(),
                ratios: runs.iter().filter_map(|r| ratio(outcome, r)).collect(),
                expected: runs
                    .iter()
                    .filter(|r| r.seen.is_some())
                    .map(|r| r.load.expected_transitions())
                    .sum(),
                seen: runs
                    .iter()
                    .filter_map(|r| Some(r.seen.as_ref()?.transitions))
                    .sum(),
                tool_lost: (!tool_lost.is_empty()).then(|| tool_lost.iter().sum()),
                cpu: runs.iter().filter_map(|r| cpu_pct(r)).collect(),
                us_per_event: runs.iter().filter_map(|r| us_per_event(r)).collect(),
                sys_us_per_event: runs.iter().filter_map(|r| sys_us_per_event(r)).collect(),
                peak_rss_kib: runs
                    .iter()
                    .filter_map(|r| Some(r.daemon.as_ref()?.peak_rss_kib))
                    .max()
                    .unwrap_or(0),
                bpf_ns: outcome
                    .stats_runs
                    .iter()
                    .filter(|r| r.tracer == tracer)
                    .filter_map(bpf_ns_per_event)
                    .collect(),
                recursion_misses: runs
                    .iter()
                    .filter_map(|r| Some(r.daemon.as_ref()?.prog.recursion_misses))
                    .sum(),
                startup: runs
                    .iter()
                    .filter_map(|r| Some(r.startup?.as_secs_f64()))
                    .collect(),
            })
        })
        .collect()
}

pub fn table(outcome: &Outcome) -> String {
    let m = machine();
    let a = &outcome.args;
    let mut s = String::new();
    let w = &mut s;
    writeln!(
        w,
        "\ntcptrace bench: loopback TCP churn, untraced vs traced"
    )
    .ok();
    writeln!(w, "{}", m.line()).ok();
    writeln!(w, "command: {}", outcome.command).ok();
    writeln!(
        w,
        "loadavg: {} when the rounds started (other work on the machine skews the figures)",
        outcome.loadavg_at_start
    )
    .ok();
    writeln!(
        w,
        "load:    {} client + {} server threads, {} ports 127.0.0.1:{}-{}, {} round(s) x {} s, interleaved (order rotates), {}, tracers at nice {}",
        a.clients,
        a.servers,
        outcome.ports.len(),
        outcome.ports.first().unwrap_or(&0),
        outcome.ports.last().unwrap_or(&0),
        a.rounds,
        a.seconds,
        outcome.tw_reuse,
        a.tracer_nice
    )
    .ok();
    if outcome.interrupted {
        writeln!(w, "INTERRUPTED: partial results").ok();
    }
    writeln!(w).ok();
    writeln!(
        w,
        "{:<17} {:>9} {:>17}   {:>6} {:>13}   {:>11} {:>11} {:>18}   {:>6} {:>6} {:>5} {:>9} {:>9}",
        "tracer",
        "conn/s",
        "(min-max)",
        "ratio",
        "(min-max)",
        "expected",
        "seen",
        "lost (%)",
        "CPU %",
        "µs/ev",
        "sys",
        "peak RSS",
        "BPF ns/ev"
    )
    .ok();
    for row in rows(outcome) {
        let (lo, hi) = range(&row.rates).unwrap_or_default();
        write!(
            w,
            "{:<17} {:>9} {:>17}   ",
            row.tracer.label(),
            thousands(median(row.rates.clone()).unwrap_or(0.0)),
            format!("({}-{})", thousands(lo), thousands(hi)),
        )
        .ok();
        if row.tracer == Tracer::Untraced {
            writeln!(
                w,
                "{:>6} {:>13}   {:>11} {:>11} {:>18}   {:>6} {:>6} {:>5} {:>9} {:>9}",
                "1.000", "", "-", "-", "-", "-", "-", "-", "-", "-"
            )
            .ok();
            continue;
        }
        let (rlo, rhi) = range(&row.ratios).unwrap_or_default();
        let lost = row.expected as i64 - row.seen as i64;
        let pct = if row.expected > 0 {
            lost as f64 / row.expected as f64 * 100.0
        } else {
            0.0
        };
        let (expected, seen, lost) = if row.tracer.reports_events() {
            (
                thousands(row.expected as f64),
                thousands(row.seen as f64),
                format!("{} ({pct:.1}%)", thousands(lost as f64)),
            )
        } else {
            (
                thousands(row.expected as f64),
                thousands(row.seen as f64),
                "filtered out".to_owned(),
            )
        };
        writeln!(
            w,
            "{:>6.3} {:>13}   {:>11} {:>11} {:>18}   {:>6.1} {:>6} {:>5} {:>5} MiB {:>9}",
            median(row.ratios.clone()).unwrap_or(f64::NAN),
            format!("({rlo:.3}-{rhi:.3})"),
            expected,
            seen,
            lost,
            median(row.cpu.clone()).unwrap_or(f64::NAN),
            median(row.us_per_event.clone()).map_or("-".to_owned(), |us| format!("{us:.2}")),
            median(row.sys_us_per_event.clone()).map_or("-".to_owned(), |us| format!("{us:.2}")),
            row.peak_rss_kib / 1024,
            median(row.bpf_ns.clone()).map_or("-".to_owned(), |ns| format!("{ns:.0}")),
        )
        .ok();
    }
    for (tracer, why) in &outcome.unavailable {
        if outcome.runs.iter().any(|r| r.tracer == *tracer) {
            writeln!(w, "{:<17} stopped early: {why}", tracer.label()).ok();
        } else {
            writeln!(w, "{:<17} not available: {why}", tracer.label()).ok();
        }
    }
    writeln!(w).ok();
    writeln!(
        w,
        "conn/s: connections that completed the full lifecycle per second (median over rounds)."
    )
    .ok();
    writeln!(
        w,
        "ratio: traced conn/s / untraced conn/s of the same round (median, range over rounds)."
    )
    .ok();
    writeln!(
        w,
        "expected = 10 transitions per connection + 2 per listener (open, close), summed over rounds;"
    )
    .ok();
    writeln!(
        w,
        "  seen = the tracer's transitions on the bench's ports; lost = expected - seen."
    )
    .ok();
    writeln!(
        w,
        "CPU %: the daemon's user+system CPU from load start to its exit (drain and flush included)"
    )
    .ok();
    writeln!(
        w,
        "  / load wall time, in % of one core (median); peak RSS: its VmHWM at exit (max)."
    )
    .ok();
    writeln!(
        w,
        "µs/ev: that CPU time / the events it reported (seen), in microseconds (median); sys: the"
    )
    .ok();
    writeln!(
        w,
        "  part of it the kernel spent on the daemon's behalf (system time: writing its output"
    )
    .ok();
    writeln!(w, "  into the page cache, above all).").ok();
    if outcome
        .runs
        .iter()
        .any(|r| r.tracer == Tracer::TcptraceFiltered)
    {
        writeln!(
            w,
            "tcptrace filtered: tcptrace --port 1, whose in-kernel filter drops every event of the load;"
        )
        .ok();
        writeln!(
            w,
            "  its ratio, CPU and BPF ns/ev are the cost of events a filter leaves out."
        )
        .ok();
    }
    writeln!(
        w,
        "BPF ns/ev: kernel run time of the tracer's BPF program per invocation, from a short run of\n  each tracer after the rounds with the kernel's run-time stats on (they cost two clock reads\n  per run, kept out of the ratios){}.",
        if outcome.bpf_stats {
            ""
        } else {
            " - BPF stats could not be enabled"
        }
    )
    .ok();
    for row in rows(outcome) {
        let startup = median(row.startup.clone());
        let mut notes = Vec::new();
        if let Some(l) = row.tool_lost {
            let causes = loss_causes(outcome, row.tracer);
            notes.push(if causes.is_empty() {
                format!("the tool itself reported {} lost", thousands(l as f64))
            } else {
                format!(
                    "the tool itself reported {} lost ({causes})",
                    thousands(l as f64)
                )
            });
        }
        if row.recursion_misses > 0 {
            notes.push(format!(
                "the kernel skipped its BPF program {} times (recursion_misses: a tracepoint hit while it ran on that CPU)",
                thousands(row.recursion_misses as f64)
            ));
        }
        if let Some(st) = startup {
            notes.push(format!("attached in {st:.1} s"));
        }
        if !notes.is_empty() {
            writeln!(w, "{}: {}.", row.tracer.label(), notes.join(", ")).ok();
        }
    }
    for line in uncounted(&outcome.runs) {
        writeln!(w, "{line}").ok();
    }
    let disturbed: Vec<String> = outcome
        .runs
        .iter()
        .filter(|r| !r.foreign_bpf.is_empty())
        .map(|r| {
            format!(
                "round {} {} ({})",
                r.round,
                r.tracer.label(),
                r.foreign_bpf.join(", ")
            )
        })
        .collect();
    if !disturbed.is_empty() {
        writeln!(
            w,
            "WARNING: other BPF programs were loaded during: {}",
            disturbed.join("; ")
        )
        .ok();
    }
    let errors: u64 = outcome
        .runs
        .iter()
        .map(|r| r.load.connect_errors + r.load.server_errors)
        .sum();
    if errors > 0 {
        writeln!(w, "load errors: {errors} (see results.json)").ok();
    }
    writeln!(w).ok();
    for round in 1..=a.rounds {
        let runs: Vec<String> = outcome
            .runs
            .iter()
            .filter(|r| r.round == round)
            .map(|r| match ratio(outcome, r) {
                Some(x) if r.tracer != Tracer::Untraced => {
                    format!("{} {} ({x:.3})", r.tracer.label(), thousands(rate(r)))
                }
                _ => format!("{} {}", r.tracer.label(), thousands(rate(r))),
            })
            .collect();
        if !runs.is_empty() {
            writeln!(w, "round {round}: {}", runs.join(" | ")).ok();
        }
    }
    writeln!(w).ok();
    for f in &outcome.figures {
        match &f.value {
            Ok((v, unit)) => {
                writeln!(w, "{}: {} {unit} ({})", f.name, thousands(*v), f.detail).ok()
            }
            Err(why) => writeln!(w, "{}: {why}", f.name).ok(),
        };
    }
    s
}

/// The non-zero loss causes of tcptrace's summaries (`"loss": {cause: n}`), summed over runs.
fn loss_causes(outcome: &Outcome, tracer: Tracer) -> String {
    let mut causes: std::collections::BTreeMap<String, u64> = Default::default();
    for run in outcome.runs.iter().filter(|r| r.tracer == tracer) {
        let loss = run
            .seen
            .as_ref()
            .and_then(|s| s.summary.as_ref()?.get("loss")?.as_object());
        for (cause, n) in loss.into_iter().flatten() {
            *causes.entry(cause.clone()).or_default() += n.as_u64().unwrap_or(0);
        }
    }
    // Not a part of `lost`: tcptrace counts the accepts and handoffs it dropped apart.
    let other = causes.remove(OTHER_EVENTS_LOST).unwrap_or(0);
    let parts = causes
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(c, n)| format!("{c} {}", thousands(*n as f64)))
        .collect::<Vec<_>>()
        .join(", ");
    match other {
        0 => parts,
        n => format!(
            "{parts}; and apart from them, {} accept/handoff events (not transitions)",
            thousands(n as f64)
        ),
    }
}

/// The key of tcptrace's summary that counts dropped events which are not transitions.
const OTHER_EVENTS_LOST: &str = "other_events_lost";

fn run_json(outcome: &Outcome, run: &Run) -> Value {
    let l = &run.load;
    let mut v = json!({
        "round": run.round,
        "tracer": run.tracer.label(),
        "connections": l.completed,
        "connected": l.connected,
        "connect_errors": l.connect_errors,
        "server_errors": l.server_errors,
        "first_error": l.first_error,
        "seconds": l.elapsed.as_secs_f64(),
        "connections_per_second": rate(run),
        "ratio_vs_untraced": ratio(outcome, run),
        "other_bpf_holders": run.foreign_bpf,
    });
    if let Some(seen) = &run.seen {
        v["events"] = json!({
            "expected": l.expected_transitions(),
            "seen": seen.transitions,
            "lost": lost(run),
            "by_transition": seen.by_kind,
            "other_connections": seen.other_transitions,
            "unreadable_lines": seen.unreadable,
            "tool_reported_lost": seen.tool_reported_lost,
            "summary": seen.summary,
        });
    }
    if let Some(d) = &run.daemon {
        v["daemon"] = json!({
            "cpu_seconds": d.cpu_seconds,
            "cpu_seconds_during_load": d.cpu_seconds_in_load,
            "cpu_percent": cpu_pct(run),
            "cpu_us_per_event": us_per_event(run),
            "cpu_system_seconds": d.cpu_system_seconds,
            "cpu_system_us_per_event": sys_us_per_event(run),
            "peak_rss_kib": d.peak_rss_kib,
            "exit": d.exit,
            "startup_seconds": run.startup.map(|s| s.as_secs_f64()),
            "bpf": {
                "run_cnt": d.prog.run_cnt,
                "run_time_ns": d.prog.run_time_ns,
                "ns_per_event": bpf_ns_per_event(run),
                "recursion_misses": d.prog.recursion_misses,
            },
            "stderr_tail": d.stderr_tail,
        });
    }
    v
}

pub fn json(outcome: &Outcome) -> Value {
    let m = machine();
    let a = &outcome.args;
    let summary: Vec<Value> = rows(outcome)
        .iter()
        .map(|r| {
            json!({
                "tracer": r.tracer.label(),
                "connections_per_second": { "median": median(r.rates.clone()), "min": range(&r.rates).map(|x| x.0), "max": range(&r.rates).map(|x| x.1) },
                "ratio_vs_untraced": { "median": median(r.ratios.clone()), "min": range(&r.ratios).map(|x| x.0), "max": range(&r.ratios).map(|x| x.1) },
                "events": (r.tracer != Tracer::Untraced).then(|| json!({
                    "expected": r.expected, "seen": r.seen, "lost": r.expected as i64 - r.seen as i64,
                    "tool_reported_lost": r.tool_lost,
                })),
                "daemon_cpu_percent_median": median(r.cpu.clone()),
                "bpf_ns_per_event_median": median(r.bpf_ns.clone()),
                "bpf_recursion_misses": (r.tracer != Tracer::Untraced).then_some(r.recursion_misses),
                "daemon_peak_rss_kib": (r.tracer != Tracer::Untraced).then_some(r.peak_rss_kib),
            })
        })
        .collect();
    json!({
        "schema": 1,
        "command": outcome.command,
        "machine": { "cpu": m.cpu, "cores": m.cores, "kernel": m.kernel, "memory_gib": m.memory_gib },
        "config": {
            "rounds": a.rounds, "seconds": a.seconds, "clients": a.clients, "servers": a.servers,
            "ports": outcome.ports, "tw_reuse": outcome.tw_reuse, "tracer_nice": a.tracer_nice,
        },
        "interrupted": outcome.interrupted,
        "loadavg_at_start": outcome.loadavg_at_start,
        "bpf_stats_enabled": outcome.bpf_stats,
        "unavailable": outcome.unavailable.iter().map(|(t, why)| json!({ "tracer": t.label(), "reason": why })).collect::<Vec<_>>(),
        "summary": summary,
        "runs": outcome.runs.iter().map(|r| run_json(outcome, r)).collect::<Vec<_>>(),
        "bpf_run_time_runs": outcome.stats_runs.iter().map(|r| run_json(outcome, r)).collect::<Vec<_>>(),
        "figures": outcome.figures.iter().map(|f| { let mut j = f.json.clone(); j["name"] = json!(f.name); j }).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::count::Seen;
    use crate::bench::load::LoadResult;

    fn run(tracer: Tracer, connections: u64, short: u64, counted: u64) -> Run {
        let mut seen = Seen::default();
        for kind in [
            "CLOSE->SYN_SENT",
            "FIN_WAIT1->FIN_WAIT2",
            "FIN_WAIT2->CLOSE",
        ] {
            let n = if kind.starts_with("FIN") {
                connections - short
            } else {
                connections
            };
            seen.by_kind.insert(kind.to_owned(), n);
        }
        seen.transitions = 10 * connections - 2 * short;
        seen.tool_reported_lost = Some(counted);
        Run {
            round: 1,
            tracer,
            load: LoadResult {
                completed: connections,
                ..LoadResult::default()
            },
            seen: Some(seen),
            daemon: None,
            startup: None,
            foreign_bpf: Vec::new(),
        }
    }

    #[test]
    fn only_rounds_whose_loss_count_differs_are_named_with_the_kinds_short() {
        let runs = [
            // Counted exactly: nothing to say.
            run(Tracer::TcptraceBinary, 1000, 40, 80),
            // 91 pairs more missing than counted.
            run(Tracer::TcptraceBinary, 1000, 131, 80),
            // bcc's own count is known to be short: not ours to explain.
            run(Tracer::Bcc, 1000, 131, 80),
            // The filtered contender's log is empty on purpose.
            run(Tracer::TcptraceFiltered, 1000, 1000, 80),
        ];
        assert_eq!(
            uncounted(&runs),
            [
                "round 1 tcptrace binary: 262 transitions missing from the log, 80 counted lost by tcptrace (+182 not accounted for); short of one per connection: FIN_WAIT1->FIN_WAIT2 131, FIN_WAIT2->CLOSE 131"
            ]
        );
        // What decides whether a round's log is kept as evidence, too.
        let gaps: Vec<_> = runs.iter().map(count_gap).collect();
        assert_eq!(gaps, [None, Some((262, 80)), None, None]);
    }
}
