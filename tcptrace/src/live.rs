//! Live tracing: load the program, then read, decode, run the engine and write the sinks
//! until Ctrl-C, SIGTERM, `--duration` or the stdout reader going away; then a summary.

use std::io::{self, Write};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{SignalKind, signal};

use crate::cgroup::{Annotator, CgroupFilter};
use crate::cli::{FileFormat, TraceArgs, View};
use crate::decode::decode;
use crate::engine::{Engine, Output};
use crate::kernel::{self, KernelCounters, Tracer, TracerConfig};
use crate::pipeline::{Pipeline, engine_config};
use crate::preexisting::{Adopted, Adopter};
use crate::sink::terminal::Terminal;
use crate::sink::time::WallClock;
use crate::sink::{Loss, RunSummary, Sink};
use crate::snapshot;

/// How long the reader sleeps when the kernel does not wake it (the kernel wakes it only
/// past a fill threshold): the bound on how late a lone transition is printed.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
const TICK_INTERVAL: Duration = Duration::from_secs(1);

/// How often a batch of idle connections is checked against the kernel's sockets, how long
/// a connection must have had no event to be checked, and how many are checked at most
/// each time (one sock_diag lookup apiece, a few microseconds).
const RECONCILE_EVERY: Duration = Duration::from_secs(5);
const IDLE_BEFORE_CHECK: Duration = Duration::from_secs(10);
const RECONCILE_BATCH: usize = 2000;

/// Retires connections whose end was lost. A recursion miss takes a whole softirq's
/// transitions (often a client's FIN_WAIT1 → FIN_WAIT2 → CLOSE at once), and without this
/// the engine would keep such a connection open until evicted, in its state gauges too.
/// Only sockets of tcptrace's own network namespace can be looked up; others are left.
struct Reconciler {
    prober: snapshot::Prober,
    netns: u32,
    last: Instant,
    /// The engine slot the next batch starts from.
    sweep_at: u32,
}

impl Reconciler {
    fn new() -> Option<Reconciler> {
        let netns = snapshot::own_netns()?;
        match snapshot::Prober::new() {
            Ok(prober) => Some(Reconciler {
                prober,
                netns,
                last: Instant::now(),
                sweep_at: 0,
            }),
            Err(e) => {
                log::warn!(
                    "no sock_diag lookups ({e}): connections whose end was lost stay tracked until evicted"
                );
                None
            }
        }
    }

    /// The idle connections of a batch that the kernel no longer has.
    fn gone(&mut self, pipeline: &mut Pipeline, now_ns: u64) -> Result<Vec<u64>, String> {
        let (idle, next) = pipeline.engine().idle_connections(
            self.sweep_at,
            now_ns,
            IDLE_BEFORE_CHECK.as_nanos() as u64,
            self.netns,
            RECONCILE_BATCH,
        );
        self.sweep_at = next;
        let mut gone = Vec::new();
        for c in idle {
            if !self
                .prober
                .exists(c.local, c.remote)
                .map_err(|e| e.to_string())?
            {
                gone.push(c.conn_id);
            }
        }
        Ok(gone)
    }
}

/// Why the loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    Signal,
    Duration,
    /// stdout's reader went away (`| head`): quiet exit.
    BrokenPipe,
}

pub struct LiveOptions {
    pub tracer: TracerConfig,
    pub duration: Option<Duration>,
    /// Called once the program is attached (the demo starts its traffic then).
    pub on_ready: Option<Box<dyn FnOnce()>>,
    /// Fed the kernel's and the engine's figures every second, for `--metrics`.
    pub metrics: Option<std::sync::Arc<crate::sink::metrics::Metrics>>,
    /// Drop every capability once attached (the daemon's default; the demo keeps them to
    /// start its child processes, tests that load several tracers keep them too).
    pub drop_caps: bool,
    /// Take the start-up snapshot of existing sockets, kept by these filters (the kernel's
    /// own filters, applied in userspace to the snapshot). None: only what happens live.
    pub snapshot: Option<crate::filter::FilterArgs>,
    /// `--cgroup`/`--container`, applied in the daemon.
    pub cgroups: CgroupFilter,
}

/// What an `--output` file could not take, counted by its writer thread.
pub type OutputLoss = Option<std::sync::Arc<crate::output::Lost>>;

/// Builds the sinks a `TraceArgs` asks for, and the count of what the output file (if any)
/// failed to take.
pub fn sinks(args: &TraceArgs, clock: WallClock) -> Result<(Vec<Box<dyn Sink>>, OutputLoss)> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    let mut lost = None;
    let stdout_taken = args.output.as_deref().is_some_and(crate::output::is_stdout);
    // Refused before anything else starts.
    let stdout_out = stdout_taken
        .then(|| crate::output::stdout_output(args.format == FileFormat::Binary))
        .transpose()?;
    if !stdout_taken && args.view != View::None {
        let out = io::BufWriter::with_capacity(1 << 16, io::stdout());
        sinks.push(Box::new(Terminal::new(out, args.view, clock)));
    }
    if let Some(path) = &args.output {
        let w: Box<dyn Write> = if let Some(out) = stdout_out {
            Box::new(out)
        } else {
            let rotation = crate::output::Rotation {
                max_bytes: args.rotate_size,
                keep: args.rotate_keep,
            };
            let file = crate::output::OutputFile::with_rotation(path, rotation)?
                .with_header(crate::sink::file_header(args.format));
            lost = Some(file.lost());
            // Written on its own thread: the ring-buffer reader never waits on the disk. The
            // thread needs no capability, and would otherwise keep them all: they are per
            // thread, and the reader drops its own only once attached.
            Box::new(crate::background::Background::spawn(
                "tcptrace-output",
                file,
                || {
                    if let Err(e) = kernel::drop_capabilities() {
                        log::warn!("output thread: {e}");
                    }
                },
            )?)
        };
        sinks.push(crate::sink::for_format(args.format, w, clock, stdout_taken));
    }
    Ok((sinks, lost))
}

pub async fn trace(args: TraceArgs) -> Result<()> {
    let clock = WallClock::new(kernel::wall_offset_ns());
    let (mut sinks, output_loss) = sinks(&args, clock)?;
    // Bound before the program loads, so a taken port fails fast and costs nothing.
    let metrics = match args.metrics {
        Some(addr) => {
            let m = std::sync::Arc::new(crate::sink::metrics::Metrics::new());
            let server = crate::metrics_http::bind(addr, std::sync::Arc::clone(&m))?;
            tokio::spawn(server.run());
            sinks.push(Box::new(std::sync::Arc::clone(&m)));
            Some(m)
        }
        None => None,
    };
    let mut pipeline = Pipeline::new(Engine::new(engine_config(&args.engine)), sinks);
    let filter = args.filter.to_kernel().map_err(anyhow::Error::msg)?;
    if let Some(ns) = args.filter.netns
        && !crate::filter::netns_exists(ns)
    {
        log::warn!(
            "--netns {ns}: no process is in a network namespace with this inode and none is mounted under /run/netns; tracing it anyway, in case one appears"
        );
    }
    let ring_mb = args.kernel.ring_mb.next_power_of_two();
    if ring_mb != args.kernel.ring_mb {
        log::info!(
            "ring buffer: {ring_mb} MiB (--ring-mb {} rounded up to a power of two, as the kernel needs)",
            args.kernel.ring_mb
        );
    }
    let opts = LiveOptions {
        tracer: TracerConfig {
            ring_bytes: ring_mb << 20,
            filter,
            timewait: !args.kernel.no_timewait,
            ..TracerConfig::default()
        },
        duration: args.duration,
        on_ready: None,
        drop_caps: true,
        metrics,
        snapshot: (!args.kernel.no_snapshot).then(|| args.filter.clone()),
        cgroups: CgroupFilter::new(
            args.filter.cgroup.as_deref(),
            args.filter.container.as_deref(),
        )
        .map_err(anyhow::Error::msg)?,
    };
    let (stop, summary) = run(&mut pipeline, opts).await?;
    match pipeline.summary(&summary) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        r => r.context("writing the summary")?,
    }
    if summary.lost > 0 {
        log::warn!(
            "{} events were lost; see the summary for causes",
            summary.lost
        );
    }
    log::debug!("stopped: {stop:?}");
    // Tracing went on past write errors on the output file; the run as a whole failed if
    // output was lost (once the writer thread has written, or failed to write, the rest).
    drop(pipeline);
    if let (Some(lost), Some(path)) = (output_loss, &args.output) {
        lost.check(path)?;
    }
    Ok(())
}

/// Runs the live loop on `pipeline` until a stop condition; returns the summary (not yet
/// written: the caller decides where).
pub async fn run(pipeline: &mut Pipeline, mut opts: LiveOptions) -> Result<(Stop, RunSummary)> {
    let started = Instant::now();
    let tracer = Tracer::start(opts.tracer)?;
    for w in tracer.warnings() {
        log::warn!("{w}");
    }
    // First in every output, once the programs are attached (a run that could not start
    // writes nothing).
    let clock = crate::sink::time::WallClock::new(kernel::wall_offset_ns());
    pipeline
        .start(&crate::sink::RunStart::now(&clock, kernel::monotonic_ns()))
        .context("writing output")?;
    // After attaching, so that nothing falls between the snapshot and the live stream;
    // before dropping capabilities, which reading other processes' fds and entering
    // their namespaces need.
    let mut intake = Intake {
        tracer,
        adopter: Adopter::default(),
        annotator: Annotator::new(std::mem::take(&mut opts.cgroups)),
        decode_errors: 0,
    };
    if let Some(filter) = &opts.snapshot {
        match snapshot::take() {
            Ok(snap) => {
                for e in &snap.errors {
                    log::warn!("start-up snapshot: {e}");
                }
                let seeds = intake.adopter.seed(&snap, filter, snap.taken_mono_start_ns);
                log::info!(
                    "start-up snapshot: {} TCP sockets already open ({} kept)",
                    snap.sockets.len(),
                    seeds.len()
                );
                for mut t in seeds {
                    if intake.annotator.annotate(&mut t) {
                        pipeline.feed(&t).context("writing output")?;
                    }
                }
            }
            Err(e) => log::warn!(
                "start-up snapshot failed ({e}): sockets opened before tcptrace are seen only when they change state"
            ),
        }
    }
    if opts.drop_caps {
        kernel::drop_capabilities().map_err(anyhow::Error::msg)?;
    }
    log::info!("tracing TCP state changes (sock:inet_sock_set_state); Ctrl-C to stop");
    if let Some(f) = opts.on_ready.take() {
        f();
    }
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let mut last_tick = Instant::now();
    let mut reconciler = Reconciler::new();
    let stop = loop {
        let wait = intake.tracer.wait(POLL_INTERVAL);
        let stop = tokio::select! {
            _ = wait => None,
            _ = sigint.recv() => Some(Stop::Signal),
            _ = sigterm.recv() => Some(Stop::Signal),
            _ = sighup.recv() => {
                crate::output::request_reopen();
                None
            }
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => Some(Stop::Duration),
        };
        let r = intake.drain(pipeline);
        let r = r.and_then(|()| {
            if last_tick.elapsed() >= TICK_INTERVAL {
                last_tick = Instant::now();
                intake.tracer.flush_logs();
                pipeline.tick(kernel::monotonic_ns())?;
                if let Some(m) = &opts.metrics {
                    let k = intake.tracer.counters();
                    m.observe_kernel(&loss(&k, intake.decode_errors), k.submitted, k.deferred);
                    let engine = pipeline.engine();
                    m.observe_engine(&engine.stats(), &engine.current_state_counts());
                }
            }
            if let Some(rec) = reconciler.as_mut()
                && rec.last.elapsed() >= RECONCILE_EVERY
            {
                rec.last = Instant::now();
                match rec.gone(pipeline, kernel::monotonic_ns()) {
                    Ok(gone) if !gone.is_empty() => {
                        // An end that happened before the lookups is in the ring buffer
                        // by now: it goes in first, and that connection is not retired.
                        intake.drain(pipeline)?;
                        let n = pipeline.retire_vanished(&gone, kernel::monotonic_ns())?;
                        log::debug!("{n} connections retired: the kernel no longer has them");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        log::warn!(
                            "sock_diag lookup failed ({e}): connections whose end was lost stay tracked until evicted"
                        );
                        reconciler = None;
                    }
                }
            }
            pipeline.flush()
        });
        match r {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => break Stop::BrokenPipe,
            Err(e) => return Err(e).context("writing output"),
            Ok(()) => {}
        }
        if let Some(s) = stop {
            break s;
        }
    };
    // What is already in the ring buffer was captured: it goes out before we stop.
    if stop != Stop::BrokenPipe {
        intake.drain(pipeline).context("writing output")?;
        pipeline
            .finish(kernel::monotonic_ns())
            .context("writing output")?;
    }
    intake.tracer.flush_logs();
    let counters = intake.tracer.counters();
    if counters.deferred > 0 {
        log::info!(
            "{} connection ends found the ring buffer full and were delivered late, from the kernel's overflow queue",
            counters.deferred
        );
    }
    let loss = loss(&counters, intake.decode_errors);
    let summary = RunSummary {
        transitions: pipeline.transitions(),
        lost: loss.total(),
        loss,
        duration_ns: started.elapsed().as_nanos() as u64,
        engine: pipeline.engine().stats(),
    };
    Ok((stop, summary))
}

/// Every cause of loss: the kernel's counters plus the events userspace could not decode.
pub fn loss(k: &KernelCounters, decode_errors: u64) -> Loss {
    Loss {
        ringbuf_full: k.ringbuf_full,
        recursion_misses: k.recursion_misses,
        read_errors: k.read_errors,
        decode_errors,
        other_events_lost: k.ringbuf_full_other + k.accept_misses,
        timewait_hook_misses: k.timer_misses,
    }
}

/// What turns the ring buffer's bytes into the pipeline's transitions: the tracer, the
/// start-up snapshot's seeds, the cgroup annotations, and the bytes that did not decode.
struct Intake {
    tracer: Tracer,
    adopter: Adopter,
    annotator: Annotator,
    decode_errors: u64,
}

impl Intake {
    /// Feeds everything the ring buffer (and the deferred queue) holds now.
    fn drain(&mut self, pipeline: &mut Pipeline) -> io::Result<()> {
        let Intake {
            tracer,
            adopter,
            annotator,
            decode_errors,
        } = self;
        let mut result = Ok(());
        tracer.drain(|bytes| match decode(bytes) {
            Ok(mut t) => {
                if !annotator.annotate(&mut t) {
                    return;
                }
                let r = match adopter.adopt(&mut t) {
                    Adopted::Feed => pipeline.feed(&t),
                    Adopted::ForgetSeedThenFeed(seed) => pipeline
                        .forget(seed, t.ts_ns)
                        .and_then(|()| pipeline.feed(&t)),
                };
                if let Err(e) = r {
                    result = Err(e);
                }
            }
            Err(e) => {
                *decode_errors += 1;
                log::warn!("undecodable event from the kernel: {e}");
            }
        });
        result
    }
}

/// Collects outputs for callers that inspect them (demo, tests).
pub type Collected = std::rc::Rc<std::cell::RefCell<Vec<Output>>>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the state program's skipped runs are transitions lost; the accept programs'
    /// are accepts lost, and the timer hooks' a bound kept apart.
    #[test]
    fn each_programs_skipped_runs_count_under_their_own_heading() {
        let k = KernelCounters {
            ringbuf_full: 1,
            ringbuf_full_other: 2,
            read_errors: 3,
            recursion_misses: 4,
            accept_misses: 5,
            timer_misses: 6,
            ..KernelCounters::default()
        };
        let l = loss(&k, 7);
        assert_eq!(
            l,
            Loss {
                ringbuf_full: 1,
                recursion_misses: 4,
                read_errors: 3,
                decode_errors: 7,
                other_events_lost: 2 + 5,
                timewait_hook_misses: 6,
            }
        );
        assert_eq!(l.total(), 1 + 4 + 3 + 7);
    }
}
