//! The contenders: the load untraced, under tcptrace (as is, and with a filter that drops
//! every event in the kernel) and under bcc's tcpstates. How each tracer is prepared (once),
//! then started, stopped and counted for one run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context as _, Result};

use super::bcc::{self, Bcc};
use super::count::{self, Seen};
use super::load::{self, LoadConfig};
use super::tracer::{self, Readiness, Spec};
use super::{Run, Tracer, report};

/// The tracers that could be prepared, and why the others could not.
pub struct Contenders {
    pub tcptrace: Option<PathBuf>,
    /// Whether the filtered tcptrace run is in (tcptrace has the filter flag, not skipped).
    pub filtered: bool,
    /// Whether the `--format binary` tcptrace run is in.
    pub binary: bool,
    pub bcc: Option<Bcc>,
    pub unavailable: Vec<(Tracer, String)>,
}

impl Contenders {
    pub fn prepare(
        workspace: &Path,
        no_build: bool,
        skip_bcc: bool,
        skip_filtered: bool,
        skip_binary: bool,
    ) -> Contenders {
        let mut unavailable = Vec::new();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let tcptrace = if root {
            prepare_tcptrace(workspace, no_build)
                .map_err(|why| unavailable.push((Tracer::Tcptrace, why)))
                .ok()
        } else {
            unavailable.push((
                Tracer::Tcptrace,
                "loading eBPF programs needs root".to_owned(),
            ));
            None
        };
        let bcc = if skip_bcc {
            unavailable.push((Tracer::Bcc, "skipped (--skip-bcc)".to_owned()));
            None
        } else {
            bcc::prepare(&workspace.join("target"))
                .map_err(|why| unavailable.push((Tracer::Bcc, why)))
                .ok()
        };
        let filtered = match &tcptrace {
            _ if skip_filtered => {
                unavailable.push((
                    Tracer::TcptraceFiltered,
                    "skipped (--skip-filtered)".to_owned(),
                ));
                false
            }
            Some(bin) if has_flag(bin, "--port") => true,
            Some(_) => {
                unavailable.push((
                    Tracer::TcptraceFiltered,
                    "tcptrace has no --port filter".to_owned(),
                ));
                false
            }
            None => false,
        };
        let binary = match &tcptrace {
            _ if skip_binary => {
                unavailable.push((Tracer::TcptraceBinary, "skipped (--skip-binary)".to_owned()));
                false
            }
            Some(bin) if has_flag(bin, "binary") => true,
            Some(_) => {
                unavailable.push((
                    Tracer::TcptraceBinary,
                    "tcptrace has no --format binary".to_owned(),
                ));
                false
            }
            None => false,
        };
        Contenders {
            tcptrace,
            filtered,
            binary,
            bcc,
            unavailable,
        }
    }

    /// The contenders to run, untraced first.
    pub fn available(&self) -> Vec<Tracer> {
        let mut all = vec![Tracer::Untraced];
        all.extend(self.tcptrace.as_ref().map(|_| Tracer::Tcptrace));
        all.extend(self.binary.then_some(Tracer::TcptraceBinary));
        all.extend(self.filtered.then_some(Tracer::TcptraceFiltered));
        all.extend(self.bcc.as_ref().map(|_| Tracer::Bcc));
        all
    }
}

/// What one run needs besides the tracer.
#[derive(Clone, Copy)]
pub struct RunContext<'a> {
    pub load: &'a LoadConfig,
    pub raw: &'a Path,
    /// Time a tracer gets after the load to drain what it has buffered before it is stopped.
    pub settle: Duration,
    pub abort: &'a AtomicBool,
    /// Nice value the tracers run at (0: the same as the load).
    pub tracer_nice: i32,
}

/// Runs the load once under `tracer`. With `keep_log`, tcptrace's NDJSON is moved there
/// (for the replay figure) and returned with the number of transitions in it.
pub fn run_one(
    ctx: &RunContext,
    contenders: &Contenders,
    tracer: Tracer,
    round: usize,
    keep_log: Option<&Path>,
) -> Result<(Run, Option<(PathBuf, u64)>)> {
    let ports = &ctx.load.ports;
    match tracer {
        Tracer::Untraced => {
            let mut foreign_bpf = tracer::other_bpf_holders(None);
            let load = load::run(ctx.load, ctx.abort)?;
            merge(&mut foreign_bpf, tracer::other_bpf_holders(None));
            let run = Run {
                round,
                tracer,
                load,
                seen: None,
                daemon: None,
                startup: None,
                foreign_bpf,
            };
            Ok((run, None))
        }
        Tracer::Tcptrace | Tracer::TcptraceFiltered | Tracer::TcptraceBinary => {
            let bin = contenders
                .tcptrace
                .as_deref()
                .expect("tcptrace is prepared");
            let (slug, ext, args): (&str, &str, &[&str]) = match tracer {
                // No bench port is 1: the program reads every event and drops it.
                Tracer::TcptraceFiltered => ("tcptrace-filtered", "ndjson", &["--port", "1"]),
                Tracer::TcptraceBinary => ("tcptrace-binary", "bin", &["--format", "binary"]),
                _ => ("tcptrace", "ndjson", &[]),
            };
            let log = ctx.raw.join(format!("{slug}-round{round}.{ext}"));
            let mut spec = tcptrace_spec(bin, &log, ctx.raw, round, ctx.load.duration);
            spec.command.args(args);
            spec.stdout = ctx.raw.join(format!("{slug}-round{round}.out"));
            spec.stderr = ctx.raw.join(format!("{slug}-round{round}.err"));
            spec.name = tracer.label();
            spec.nice = ctx.tracer_nice;
            if tracer == Tracer::TcptraceBinary {
                let run = traced(ctx, round, tracer, spec, || count_capture(bin, &log, ports));
                keep_if_uncounted(&run, &log, slug, ext);
                std::fs::remove_file(&log).ok();
                return Ok((run?, None));
            }
            let keep_log = keep_log.filter(|_| tracer == Tracer::Tcptrace);
            let run = traced(ctx, round, tracer, spec, || {
                count::tcptrace_ndjson(&log, ports)
            });
            keep_if_uncounted(&run, &log, slug, ext);
            let mut kept = None;
            if let (Ok(run), Some(keep)) = (&run, keep_log) {
                let seen = run.seen.as_ref().expect("a traced run has counts");
                // A copy where the log is on another file system (`--log-dir`).
                let moved =
                    std::fs::rename(&log, keep).is_ok() || std::fs::copy(&log, keep).is_ok();
                if moved {
                    kept = Some((
                        keep.to_path_buf(),
                        seen.transitions + seen.other_transitions,
                    ));
                }
            }
            std::fs::remove_file(&log).ok();
            Ok((run?, kept))
        }
        Tracer::Bcc => {
            let b = contenders.bcc.as_ref().expect("bcc is prepared");
            let stdout = ctx.raw.join(format!("bcc-round{round}.out"));
            let stderr = ctx.raw.join(format!("bcc-round{round}.err"));
            let mut spec = bcc_spec(b, &stdout, &stderr);
            spec.nice = ctx.tracer_nice;
            let run = traced(ctx, round, tracer, spec, || {
                count::bcc_tcpstates(&stdout, &stderr, ports)
            });
            std::fs::remove_file(&stdout).ok();
            Ok((run?, None))
        }
    }
}

/// What names a log kept by `keep_if_uncounted`, before its extension.
pub const UNCOUNTED: &str = "-uncounted.";

/// Keeps the log of a round where tcptrace's loss count differs from what is missing from
/// it (`NAME-uncounted.EXT` beside it, until the next bench run empties the directory):
/// such rounds are rare, and the log is the evidence of which connections lost what, when.
fn keep_if_uncounted(run: &Result<Run>, log: &Path, slug: &str, ext: &str) {
    let Ok(run) = run else { return };
    let Some((missing, counted)) = report::count_gap(run) else {
        return;
    };
    let kept = log.with_file_name(format!("{slug}-round{}{UNCOUNTED}{ext}", run.round));
    // A second name for it: the replay figure may take the log too (by rename).
    if std::fs::hard_link(log, &kept).is_ok() {
        eprintln!(
            "bench: round {} {}: {missing} transitions missing from the log, {counted} counted lost; the log is kept in {}",
            run.round,
            run.tracer.label(),
            kept.display()
        );
    }
}

/// Counts a `--format binary` capture as an NDJSON log is counted: on the capture converted
/// by `tcptrace analyze` (after the run, so outside everything measured), with the loss
/// the live run counted taken from the capture's summary line (the conversion writes a
/// summary of its own replay).
fn count_capture(bin: &Path, capture: &Path, ports: &[u16]) -> Result<Seen> {
    let converted = capture.with_extension("ndjson");
    // A leftover of an interrupted bench: analyze -o writes only a new file.
    std::fs::remove_file(&converted).ok();
    let status = Command::new(bin)
        .arg("analyze")
        .arg(capture)
        .args(["--view", "none", "--output"])
        .arg(&converted)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running tcptrace analyze on the capture")?;
    anyhow::ensure!(
        status.success(),
        "tcptrace analyze of the capture failed ({status})"
    );
    let counted = count::tcptrace_ndjson(&converted, ports);
    std::fs::remove_file(&converted).ok();
    let mut seen = counted?;
    seen.set_summary(count::capture_summary(capture)?);
    Ok(seen)
}

/// One traced run: start the tracer, run the load, let it drain, stop it, count what it saw.
fn traced(
    ctx: &RunContext,
    round: usize,
    tracer: Tracer,
    spec: Spec,
    count: impl FnOnce() -> Result<Seen>,
) -> Result<Run> {
    let mut daemon = tracer::start(spec, ctx.abort)?;
    let mut foreign_bpf = tracer::other_bpf_holders(Some(daemon.pid()));
    daemon.mark_load_start();
    let load = load::run(ctx.load, ctx.abort);
    daemon.mark_load_end();
    merge(
        &mut foreign_bpf,
        tracer::other_bpf_holders(Some(daemon.pid())),
    );
    std::thread::sleep(ctx.settle);
    let startup = daemon.startup;
    let stopped = daemon.stop(Duration::from_secs(60));
    let load = load?;
    if stopped.exited_early {
        anyhow::bail!(
            "{} exited during the run ({}): {}",
            tracer.label(),
            stopped.exit,
            stopped.stderr_tail
        );
    }
    let seen = count().with_context(|| format!("counting what {} saw", tracer.label()))?;
    Ok(Run {
        round,
        tracer,
        load,
        seen: Some(seen),
        daemon: Some(stopped),
        startup: Some(startup),
        foreign_bpf,
    })
}

fn merge(into: &mut Vec<String>, more: Vec<String>) {
    for m in more {
        if !into.contains(&m) {
            into.push(m);
        }
    }
}

pub fn tcptrace_spec(bin: &Path, log: &Path, raw: &Path, round: usize, load: Duration) -> Spec {
    let mut command = Command::new(bin);
    // --duration is a safety net: it ends the tracer even if this process is killed outright.
    // Without the TIME_WAIT hooks and the start-up snapshot: the accounting counts each
    // connection's 10 state events, and with TIME_WAIT followed the active closer's last two
    // come up to a minute after the run (the hooks' own cost is measured apart, see README).
    command
        .args([
            "--view",
            "none",
            "--no-timewait",
            "--no-snapshot",
            "--output",
        ])
        .arg(log)
        .args(["--duration", &format!("{}s", load.as_secs() + 120)]);
    Spec {
        name: "tcptrace",
        command,
        stdout: raw.join(format!("tcptrace-round{round}.out")),
        stderr: raw.join(format!("tcptrace-round{round}.err")),
        readiness: Readiness {
            perf_event_fds: 1,
            stderr_words: &["tracing TCP state changes", "attached"],
        },
        ready_timeout: Duration::from_secs(30),
        nice: 0,
    }
}

fn bcc_spec(b: &bcc::Bcc, stdout: &Path, stderr: &Path) -> Spec {
    // Started from a script's background job, a process inherits SIGINT ignored and Python
    // then never turns it into KeyboardInterrupt; env restores the default so SIGINT ends it
    // (and it flushes its output).
    let mut command = Command::new("env");
    command
        .arg("--default-signal=INT")
        .arg(&b.tool)
        .env("BCC_KERNEL_SOURCE", &b.kernel_source);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Spec {
        name: "bcc tcpstates",
        command,
        stdout: stdout.to_path_buf(),
        stderr: stderr.to_path_buf(),
        // The tracepoint's perf event, then one per CPU for the perf buffer.
        readiness: Readiness {
            perf_event_fds: 1 + cpus,
            stderr_words: &[],
        },
        ready_timeout: Duration::from_secs(120),
        nice: 0,
    }
}

/// Builds the release binary (unless told not to) and checks it has the flags the bench uses.
fn prepare_tcptrace(workspace: &Path, no_build: bool) -> Result<PathBuf, String> {
    let bin = workspace.join("target/release/tcptrace");
    if !no_build {
        eprintln!("bench: cargo build --release -p tcptrace");
        crate::build_tracer().map_err(|e| format!("building tcptrace failed: {e:#}"))?;
    }
    let help = Command::new(&bin)
        .arg("--help")
        .output()
        .map_err(|e| format!("could not run {}: {e}", bin.display()))?;
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in ["--duration", "--output", "--view"] {
        if !help.contains(flag) {
            return Err(format!("{} has no {flag} flag yet", bin.display()));
        }
    }
    Ok(bin)
}

fn has_flag(bin: &Path, flag: &str) -> bool {
    Command::new(bin)
        .arg("--help")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
}
