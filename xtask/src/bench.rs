//! `cargo xtask bench`: the overhead of tracing, measured side by side. A loopback churn load
//! runs untraced, traced by tcptrace, traced by tcptrace with an in-kernel filter that drops
//! every event (the cost of a filtered-out event) and traced by bcc's tcpstates, interleaved
//! over several rounds; each traced rate is compared with the untraced rate of its own round.
//! `--soak` instead runs tcptrace under the load for minutes and follows its memory.

mod bcc;
mod contenders;
mod count;
mod extra;
mod load;
mod onset;
mod report;
mod soak;
mod sysctl;
mod tracer;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Args;

use contenders::{Contenders, RunContext};
use count::Seen;
use load::{LoadConfig, LoadResult};
use tracer::Stopped;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Rounds; each runs every tracer once, in an order that rotates from round to round.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Length of each run's load, in seconds.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Leave bcc's tcpstates out (otherwise it is installed when missing and compared).
    #[arg(long)]
    skip_bcc: bool,
    /// Smoke test: 1 round of 3 s.
    #[arg(long)]
    quick: bool,
    /// Client threads connecting flat out. 4 clients + 2 servers gave the most churn on the
    /// 2-core reference VM (~41k connections/s untraced; 2+2 ~36k, 4+4 ~40k, 1+1 ~35k).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Server threads accepting, reading to EOF and closing.
    #[arg(long, default_value_t = 2)]
    servers: usize,
    /// Listening ports on 127.0.0.1 the load is spread over (one port caps near 14k
    /// connections/s in the kernel's ephemeral-port search; beyond 4 no gain was measured).
    #[arg(long, default_value_t = 8)]
    ports: usize,
    /// Nice value for the tracers (e.g. -10 to favour them over the load); the default 0
    /// makes them compete with the load's threads on equal terms, as a daemon usually does.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    tracer_nice: i32,
    /// Use target/release/tcptrace as it is instead of building it first.
    #[arg(long)]
    no_build: bool,
    /// Leave out the tcptrace run whose in-kernel filter drops every event.
    #[arg(long)]
    skip_filtered: bool,
    /// Leave out the tcptrace run that writes `--format binary` instead of NDJSON.
    #[arg(long)]
    skip_binary: bool,
    /// Instead of the rounds: one tcptrace daemon under the load for this long (e.g. 5m,
    /// 300s), its RSS sampled every few seconds; reports first/last/max RSS and the loss.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    soak: Option<Duration>,
    /// The soak's pace: a share of the untraced rate, measured just before (`50%`), a
    /// rate in connections/s (`12000`), or `flat` (as fast as the load goes, where events
    /// are lost and counted). The default, half the untraced rate, is below where loss
    /// starts on the reference machine: there the soak shows whether anything is lost.
    #[arg(long, value_name = "RATE", default_value = "50%", value_parser = soak::Pace::parse)]
    soak_rate: soak::Pace,
    /// Leave out the paced tcptrace runs that find the rate where loss starts.
    #[arg(long)]
    skip_onset: bool,
    /// Where the tracers write their logs (default: target/bench/raw). At flat-out churn
    /// tcptrace writes ~180 MB/s of NDJSON: a tmpfs such as /dev/shm takes the disk out of
    /// the measurement, to tell the daemon's own limits from the disk's.
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// Connections held open in the engine for the memory figure.
    #[arg(long, default_value_t = 1_000_000)]
    memory_connections: u64,
}

/// `5m`, `300s`, `1h`, `90` (seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (examples: 300s, 5m, 1h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" | "min" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m or h)")),
    };
    Ok(Duration::from_secs(secs))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracer {
    Untraced,
    Tcptrace,
    /// tcptrace with `--port 1`: every event is dropped in the kernel, after the program
    /// has read it; what remains is the cost of a filtered-out event.
    TcptraceFiltered,
    /// tcptrace writing `--format binary` instead of NDJSON: the same pipeline, the
    /// output's encoding and size out of the way.
    TcptraceBinary,
    Bcc,
}

impl Tracer {
    pub const ALL: [Tracer; 5] = [
        Tracer::Untraced,
        Tracer::Tcptrace,
        Tracer::TcptraceBinary,
        Tracer::TcptraceFiltered,
        Tracer::Bcc,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Tracer::Untraced => "untraced",
            Tracer::Tcptrace => "tcptrace",
            Tracer::TcptraceFiltered => "tcptrace filtered",
            Tracer::TcptraceBinary => "tcptrace binary",
            Tracer::Bcc => "bcc tcpstates",
        }
    }

    /// Whether the tracer is meant to report the load's events (a filtered one is not).
    pub fn reports_events(self) -> bool {
        matches!(
            self,
            Tracer::Tcptrace | Tracer::TcptraceBinary | Tracer::Bcc
        )
    }
}

/// One run of the load under one tracer.
pub struct Run {
    pub round: usize,
    pub tracer: Tracer,
    pub load: LoadResult,
    pub seen: Option<Seen>,
    pub daemon: Option<Stopped>,
    pub startup: Option<Duration>,
    /// Other processes holding BPF programs before or after the load ("pid comm").
    pub foreign_bpf: Vec<String>,
}

/// Everything the report needs.
pub struct Outcome {
    pub args: BenchArgs,
    pub command: String,
    pub ports: Vec<u16>,
    pub runs: Vec<Run>,
    /// Tracers that never ran, or stopped running, and why.
    pub unavailable: Vec<(Tracer, String)>,
    pub tw_reuse: String,
    pub figures: Vec<extra::Figure>,
    pub interrupted: bool,
    /// Whether the kernel accounted BPF run time (the BPF ns/event column).
    pub bpf_stats: bool,
    /// The runs of the BPF run-time round, which only the BPF ns/event column reads.
    pub stats_runs: Vec<Run>,
    /// /proc/loadavg when the rounds started: other work on the machine skews every figure.
    pub loadavg_at_start: String,
}

static ABORT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    ABORT.store(true, Ordering::Relaxed);
}

/// BPF run time per event, in a round of its own after the counted ones: the kernel's
/// run-time stats cost two clock reads per program run, for every tracer, which the ratios
/// should not include (on this VM ~1 % of all CPU at full churn). A short run of each
/// tracer that has a BPF program; returns whether the stats could be enabled, and the runs.
fn bpf_time_round(
    ctx: &RunContext,
    contenders: &Contenders,
    tracers: &[Tracer],
    seconds: u64,
) -> (bool, Vec<Run>) {
    if ABORT.load(Ordering::Relaxed) {
        return (false, Vec::new());
    }
    let stats = sysctl::BpfStats::enable();
    if !stats.enabled() {
        return (false, Vec::new());
    }
    let load = LoadConfig {
        duration: Duration::from_secs(seconds.min(3)),
        ..ctx.load.clone()
    };
    let stats_ctx = RunContext {
        load: &load,
        ..*ctx
    };
    let mut runs = Vec::new();
    for &tracer in tracers {
        if tracer == Tracer::Untraced
            || ABORT.load(Ordering::Relaxed)
            || contenders.unavailable.iter().any(|(t, _)| *t == tracer)
        {
            continue;
        }
        eprintln!(
            "bench: BPF run time (stats on, not in the ratios): {}",
            tracer.label()
        );
        match contenders::run_one(&stats_ctx, contenders, tracer, 0, None) {
            Ok((run, _)) => {
                eprintln!("bench:   {}", report::one_line(&run));
                runs.push(run);
            }
            Err(e) => eprintln!(
                "bench: {} failed in the BPF run-time round: {e:#}",
                tracer.label()
            ),
        }
    }
    (true, runs)
}

pub fn run(mut args: BenchArgs, workspace: &Path) -> Result<()> {
    if cfg!(debug_assertions) {
        reexec_optimized(workspace);
    }
    if args.quick {
        args.rounds = 1;
        args.seconds = 3;
    }
    if args.rounds == 0
        || args.seconds == 0
        || args.clients == 0
        || args.servers == 0
        || args.ports == 0
    {
        bail!("--rounds, --seconds, --clients, --servers and --ports must all be at least 1");
    }
    let command = format!(
        "cargo xtask {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let target = workspace.join("target");
    let out_dir = target.join("bench");
    // Raw tracer output of this run only; the big files go as soon as they are counted.
    let raw = match &args.log_dir {
        Some(dir) => {
            if !dir.is_dir() {
                bail!("--log-dir {}: not a directory", dir.display());
            }
            dir.join("tcptrace-bench-raw")
        }
        None => out_dir.join("raw"),
    };
    eprintln!("bench: the tracers write their logs in {}", raw.display());
    if raw.exists() {
        std::fs::remove_dir_all(&raw).with_context(|| format!("remove {}", raw.display()))?;
    }
    std::fs::create_dir_all(&raw).with_context(|| format!("create {}", raw.display()))?;

    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }

    let skip_bcc = args.skip_bcc || args.soak.is_some();
    let mut contenders = Contenders::prepare(
        workspace,
        args.no_build,
        skip_bcc,
        args.skip_filtered,
        args.skip_binary,
    );
    let ports = load::pick_ports(args.ports)?;
    let load_cfg = LoadConfig {
        ports: ports.clone(),
        clients: args.clients,
        servers: args.servers,
        duration: Duration::from_secs(args.seconds),
        rate: None,
    };
    let tw_guard = sysctl::TwReuse::ensure()?;
    let _stats_off = sysctl::StatsSysctlOff::ensure();
    let tw_reuse = tw_guard.describe();
    if let Some(length) = args.soak {
        let Some(bin) = contenders.tcptrace.clone() else {
            bail!(
                "the soak needs tcptrace: {}",
                contenders
                    .unavailable
                    .iter()
                    .map(|(t, why)| format!("{}: {why}", t.label()))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        };
        let pace = soak::pace(args.soak_rate, &load_cfg, &ABORT)?;
        let soak_cfg = LoadConfig {
            duration: length,
            rate: pace.target,
            ..load_cfg.clone()
        };
        let result = soak::run(&bin, &soak_cfg, pace, &raw, args.tracer_nice, &ABORT);
        drop(tw_guard);
        remove_big_files(&raw);
        let soak = result?;
        print!("{}", soak::table(&soak, &command, &tw_reuse));
        let json_path = out_dir.join("soak.json");
        std::fs::write(
            &json_path,
            serde_json::to_string_pretty(&soak::json(&soak, &command))?,
        )
        .with_context(|| format!("write {}", json_path.display()))?;
        println!("results: {}", json_path.display());
        if ABORT.load(Ordering::Relaxed) {
            eprintln!("bench: interrupted; partial results above");
            std::process::exit(130);
        }
        return Ok(());
    }

    // The first seconds of churn on an idle machine run faster (no TIME_WAIT yet), which
    // would favour whichever tracer goes first; a warm-up run that is not counted fills it.
    eprintln!("bench: warm-up, untraced");
    let warm_up = LoadConfig {
        duration: Duration::from_secs(2),
        ..load_cfg.clone()
    };
    load::run(&warm_up, &ABORT)?;

    let loadavg_at_start = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let ctx = RunContext {
        load: &load_cfg,
        raw: &raw,
        settle: Duration::from_millis(if args.quick { 500 } else { 1000 }),
        abort: &ABORT,
        tracer_nice: args.tracer_nice,
    };
    let replay_path = out_dir.join("replay.ndjson");
    let mut replay_log: Option<(PathBuf, u64)> = None;
    let mut runs = Vec::new();
    let tracers = contenders.available();
    'rounds: for round in 1..=args.rounds {
        // Rotating the order spreads slow drifts (other work, TIME_WAIT) over every tracer.
        let order = (0..tracers.len()).map(|i| tracers[(i + round - 1) % tracers.len()]);
        for tracer in order {
            if ABORT.load(Ordering::Relaxed) {
                break 'rounds;
            }
            if contenders.unavailable.iter().any(|(t, _)| *t == tracer) {
                continue;
            }
            eprintln!("bench: round {round}/{}: {}", args.rounds, tracer.label());
            let keep = replay_log.is_none().then_some(replay_path.as_path());
            match contenders::run_one(&ctx, &contenders, tracer, round, keep) {
                Ok((run, kept)) => {
                    eprintln!("bench:   {}", report::one_line(&run));
                    replay_log = replay_log.or(kept);
                    runs.push(run);
                }
                Err(e) if ABORT.load(Ordering::Relaxed) => {
                    eprintln!("bench: interrupted: {e:#}");
                    break 'rounds;
                }
                Err(e) if tracer == Tracer::Untraced => return Err(e),
                Err(e) => {
                    eprintln!(
                        "bench: {} failed, left out of later rounds: {e:#}",
                        tracer.label()
                    );
                    contenders.unavailable.push((tracer, format!("{e:#}")));
                }
            }
        }
    }
    // Where loss starts: paced runs below the flat-out rate (not in --quick).
    let onset = (!args.quick
        && !args.skip_onset
        && !ABORT.load(Ordering::Relaxed)
        && contenders.tcptrace.is_some())
    .then(|| {
        let untraced = report::median(
            runs.iter()
                .filter(|r| r.tracer == Tracer::Untraced)
                .map(|r| r.load.per_second())
                .collect(),
        )?;
        Some(onset::figure(
            onset::sweep(&ctx, &contenders, untraced),
            onset::flat_out(&runs),
        ))
    })
    .flatten();
    let (bpf_stats, stats_runs) = bpf_time_round(&ctx, &contenders, &tracers, args.seconds);
    drop(tw_guard);
    remove_big_files(&raw);
    let interrupted = ABORT.load(Ordering::Relaxed);

    let mut figures = if interrupted {
        Vec::new()
    } else {
        extra_figures(contenders.tcptrace.as_deref(), replay_log.as_ref(), &args)
    };
    figures.extend(onset);
    if let Some((log, _)) = &replay_log {
        std::fs::remove_file(log).ok();
    }
    let outcome = Outcome {
        args,
        command,
        ports,
        runs,
        unavailable: contenders.unavailable,
        tw_reuse,
        figures,
        interrupted,
        loadavg_at_start,
        bpf_stats,
        stats_runs,
    };
    print!("{}", report::table(&outcome));
    let json_path = out_dir.join("results.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&report::json(&outcome))?,
    )
    .with_context(|| format!("write {}", json_path.display()))?;
    println!("results: {}", json_path.display());
    if interrupted {
        // The usual exit status of a command stopped by Ctrl-C; not an error to explain.
        eprintln!("bench: interrupted; partial results above");
        std::process::exit(130);
    }
    Ok(())
}

/// `cargo xtask` runs a debug build, in which the load generator is slower and counting a
/// run's NDJSON (gigabytes) takes minutes: build xtask optimized once and become that build.
/// Falls back to carrying on as is if the build fails.
fn reexec_optimized(workspace: &Path) {
    use std::os::unix::process::CommandExt as _;
    eprintln!("bench: building an optimized xtask for the load generator and the counting");
    let built = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "--release",
            "--package",
            "xtask",
            "--bin",
            "xtask",
        ])
        .current_dir(workspace)
        .status();
    if !matches!(built, Ok(s) if s.success()) {
        eprintln!("bench: could not build it; carrying on with this (debug) build");
        return;
    }
    let err = Command::new(workspace.join("target/release/xtask"))
        .args(std::env::args_os().skip(1))
        .exec();
    eprintln!("bench: could not run the optimized xtask ({err}); carrying on with this build");
}

/// Logs of runs that failed half-way; the small stderr files stay for diagnosis.
fn remove_big_files(raw: &Path) {
    let Ok(dir) = std::fs::read_dir(raw) else {
        return;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        // A log kept as evidence of a round whose loss count was off stays (see
        // `contenders::keep_if_uncounted`); the next bench run empties the directory.
        let kept = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains(contenders::UNCOUNTED));
        if !kept
            && path
                .extension()
                .is_some_and(|e| e == "ndjson" || e == "out")
        {
            std::fs::remove_file(&path).ok();
        }
    }
}

/// The figures measured once, after the rounds. The next one goes here (see `extra`).
fn extra_figures(
    tcptrace: Option<&Path>,
    replay_log: Option<&(PathBuf, u64)>,
    args: &BenchArgs,
) -> Vec<extra::Figure> {
    let runs = if args.quick { 1 } else { 3 };
    eprintln!("bench: replay throughput");
    let mut figures =
        extra::replay_throughput(tcptrace, replay_log.map(|(p, n)| (p.as_path(), *n)), runs);
    eprintln!(
        "bench: engine memory at {} open connections",
        args.memory_connections
    );
    figures.push(extra::engine_memory_per_connection(
        tcptrace,
        args.memory_connections,
    ));
    figures
}
