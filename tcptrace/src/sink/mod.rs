//! Where records go. Every output (the terminal, NDJSON and CSV files, metrics) is a
//! [`Sink`]: they are siblings fed the same engine outputs, and none of them feeds back.

pub mod binary;
pub mod csv;
pub mod metrics;
pub mod ndjson;
pub mod terminal;
pub mod time;

use std::io;

use serde::Serialize;

use crate::cli::FileFormat;
use crate::engine::{EngineStats, Output};

/// Version of every machine-readable record tcptrace writes (NDJSON and CSV). Bumped on
/// any change that could break a consumer (a field renamed, removed or retyped).
pub const SCHEMA_VERSION: u32 = 1;

/// Events that happened but never reached tcptrace, by cause (see the README).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Loss {
    /// The kernel ring buffer was full: the reader fell behind.
    pub ringbuf_full: u64,
    /// The kernel skipped the program: it fired while another BPF program ran on the CPU.
    pub recursion_misses: u64,
    /// Reading the tracepoint record failed in the program.
    pub read_errors: u64,
    /// Bytes that came out of the ring buffer but did not decode.
    pub decode_errors: u64,
    /// Accept, timewait-handoff and vanished events (no state change, so not in `total`)
    /// that the full ring buffer dropped, and accept-program runs the kernel skipped: each
    /// costs a socket its owner, its timewait follow-up, or its retirement.
    #[serde(default)]
    pub other_events_lost: u64,
    /// Timer-hook runs the kernel skipped (another BPF program ran on that CPU). Each may
    /// have been a timewait socket's step or end, most were other timers': a bound, not a
    /// count, so not in `total`. A timewait end lost is made up when its address is reused.
    #[serde(default)]
    pub timewait_hook_misses: u64,
}

impl Loss {
    /// The causes of lost transitions (what `total` sums), by name, in field order: the
    /// `cause` label values of `tcptrace_events_lost_total`.
    pub const CAUSES: [&'static str; 4] = [
        "ringbuf_full",
        "recursion_misses",
        "read_errors",
        "decode_errors",
    ];

    /// The counts of [`Loss::CAUSES`], in that order.
    pub fn causes(&self) -> [u64; 4] {
        [
            self.ringbuf_full,
            self.recursion_misses,
            self.read_errors,
            self.decode_errors,
        ]
    }

    pub fn total(&self) -> u64 {
        self.causes().iter().sum()
    }
}

/// Losses of several runs, summed (a replay of concatenated logs).
impl std::ops::AddAssign for Loss {
    fn add_assign(&mut self, o: Loss) {
        self.ringbuf_full += o.ringbuf_full;
        self.recursion_misses += o.recursion_misses;
        self.read_errors += o.read_errors;
        self.decode_errors += o.decode_errors;
        self.other_events_lost += o.other_events_lost;
        self.timewait_hook_misses += o.timewait_hook_misses;
    }
}

/// What a run amounts to, written once at the end.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct RunSummary {
    /// Transitions that reached the engine.
    pub transitions: u64,
    /// Events lost before reaching tcptrace, all causes (`loss` has them apart).
    pub lost: u64,
    pub loss: Loss,
    /// Wall time the run lasted.
    pub duration_ns: u64,
    pub engine: EngineStats,
}

/// Where a run begins, written first to every machine-readable output: a log a restarted
/// daemon appended to is told apart by run (`conn_id`s start over with each one), even when
/// a run was killed before its summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RunStart {
    /// CLOCK_MONOTONIC, as every `ts_ns`.
    pub ts_ns: u64,
    /// The same instant, RFC 3339 UTC.
    pub time: String,
    /// tcptrace's version.
    pub version: String,
    pub pid: u32,
    /// The host name, and the kernel's boot id (`ts_ns` restarts at each boot).
    pub host: String,
    pub boot_id: String,
}

impl RunStart {
    /// Now, on this host.
    pub fn now(clock: &time::WallClock, mono_ns: u64) -> RunStart {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        RunStart {
            ts_ns: mono_ns,
            time: clock.rfc3339(mono_ns),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            host: read("/proc/sys/kernel/hostname"),
            boot_id: read("/proc/sys/kernel/random/boot_id"),
        }
    }
}

/// The sink `--format` names, writing to `w`. CSV's header row: on stdout the sink writes
/// it once; into an output file, the file writes it at the start of every file it starts
/// ([`file_header`]).
pub fn for_format(
    format: FileFormat,
    w: Box<dyn io::Write>,
    clock: time::WallClock,
    to_stdout: bool,
) -> Box<dyn Sink> {
    match format {
        FileFormat::Ndjson => Box::new(ndjson::Ndjson::new(w, clock)),
        FileFormat::Csv if to_stdout => Box::new(csv::Csv::new(w, clock)),
        FileFormat::Csv => Box::new(csv::Csv::without_header(w, clock)),
        FileFormat::Binary => Box::new(binary::Binary::new(w, clock)),
    }
}

/// What an output file in `format` begins every file it starts with (see
/// `OutputFile::with_header`): CSV's header row.
pub fn file_header(format: FileFormat) -> Option<Vec<u8>> {
    (format == FileFormat::Csv).then(csv::header)
}

/// One destination for the engine's outputs.
pub trait Sink {
    /// One transition, lifecycle or alert. An error stops tracing only where going on is
    /// pointless (stdout's reader went away); file sinks report their own write errors and
    /// keep the tracer running.
    fn record(&mut self, out: &Output) -> io::Result<()>;
    /// Where a run begins (machine-readable outputs write it first).
    fn start(&mut self, _s: &RunStart) -> io::Result<()> {
        Ok(())
    }
    /// The end-of-run summary.
    fn summary(&mut self, s: &RunSummary) -> io::Result<()>;
    /// The wall clock to show times by, once known: a replay learns it from its log.
    fn set_clock(&mut self, _clock: time::WallClock) {}
    /// Pushes buffered output out (called at least every 250 ms while tracing).
    fn flush(&mut self) -> io::Result<()>;
}

/// A sink shared with its owner (who still reads or reconfigures it, e.g. a replay's
/// printer learning the log's clock).
impl<S: Sink> Sink for std::rc::Rc<std::cell::RefCell<S>> {
    fn record(&mut self, out: &Output) -> io::Result<()> {
        self.borrow_mut().record(out)
    }

    fn start(&mut self, s: &RunStart) -> io::Result<()> {
        self.borrow_mut().start(s)
    }

    fn summary(&mut self, s: &RunSummary) -> io::Result<()> {
        self.borrow_mut().summary(s)
    }

    fn set_clock(&mut self, clock: time::WallClock) {
        self.borrow_mut().set_clock(clock)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.borrow_mut().flush()
    }
}
