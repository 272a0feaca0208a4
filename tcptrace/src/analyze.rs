//! `tcptrace analyze`: replays a recorded NDJSON log through the same engine as live
//! tracing, with the log's own timestamps as the clock, and summarises it.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::Path;
use std::rc::Rc;

use anyhow::{Context as _, Result};

use crate::cli::{AnalyzeArgs, FileFormat, View};
use crate::engine::{EndReason, Engine, Output};
use crate::event::{TcpState, Transition};
use crate::pipeline::{Pipeline, engine_config};
use crate::sink::binary;
use crate::sink::ndjson::parse_transition_bytes;
use crate::sink::terminal::Terminal;
use crate::sink::time::{WallClock, human};
use crate::sink::{Loss, RunSummary, Sink};

const TICK_NS: u64 = 1_000_000_000;

/// What a replay found, beyond the engine's own counters.
#[derive(Default, Debug)]
pub struct Findings {
    pub lines: u64,
    pub bad_lines: u64,
    /// Transitions into each state, by kernel state number.
    pub entered: [u64; 14],
    pub handshakes_ns: Vec<u64>,
    pub alerts: BTreeMap<String, u64>,
    pub lifecycles: u64,
    /// Connections still open when the log ended (emitted as `end: finished`).
    pub still_open: u64,
    /// Connections the engine tracked when the log ended, and the heap its tables held then
    /// (its own estimate): the memory budget per connection, measurable from a replay.
    pub tracked_at_end: u64,
    pub engine_heap_bytes: u64,
    /// The summary lines of the recorded run(s) (several when logs were concatenated), and
    /// what they say was lost, summed: a replay or a conversion keeps the live run's loss.
    pub recorded_runs: u64,
    pub recorded_lost: u64,
    pub recorded_loss: Loss,
    /// The recorded runs' own durations, summed (a conversion keeps them too).
    pub recorded_duration_ns: u64,
}

impl Findings {
    /// A recorded `summary` line (NDJSON, also how a binary capture keeps it), parsed with
    /// serde. Fields an older log lacks count as 0.
    fn recorded_summary(&mut self, line: &[u8]) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            return;
        };
        if v.get("type").and_then(|t| t.as_str()) != Some("summary") {
            return;
        }
        let top = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
        // In `loss`, or repeated flat at the top level (the older logs' only place).
        let cause = |k: &str| {
            v.get("loss")
                .and_then(|l| l.get(k))
                .and_then(serde_json::Value::as_u64)
                .or_else(|| top(k))
                .unwrap_or(0)
        };
        let loss = Loss {
            ringbuf_full: cause("ringbuf_full"),
            recursion_misses: cause("recursion_misses"),
            read_errors: cause("read_errors"),
            decode_errors: cause("decode_errors"),
            other_events_lost: cause("other_events_lost"),
            timewait_hook_misses: cause("timewait_hook_misses"),
        };
        self.recorded_loss += loss;
        self.recorded_lost += top("lost").unwrap_or_else(|| loss.total());
        self.recorded_duration_ns += top("duration_ns").unwrap_or(0);
        self.recorded_runs += 1;
    }
}

/// Lines of a byte stream, split in place in a large buffer: no per-line copy or
/// allocation (the replay's budget is a few hundred nanoseconds per line).
struct Lines<R: Read> {
    input: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

impl<R: Read> Lines<R> {
    fn new(input: R) -> Lines<R> {
        Lines {
            input,
            buf: vec![0; 4 << 20],
            start: 0,
            end: 0,
            eof: false,
        }
    }

    /// The next line without its newline (the last one may lack it), or None at the end.
    fn next_line(&mut self) -> io::Result<Option<&[u8]>> {
        loop {
            if let Some(pos) = memchr::memchr(b'\n', &self.buf[self.start..self.end]) {
                let line = self.start..self.start + pos;
                self.start += pos + 1;
                return Ok(Some(&self.buf[line]));
            }
            if self.eof {
                if self.start < self.end {
                    let line = self.start..self.end;
                    self.start = self.end;
                    return Ok(Some(&self.buf[line]));
                }
                return Ok(None);
            }
            // Keep the partial line, make room (grow for lines longer than the buffer), refill.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.end == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let n = self.input.read(&mut self.buf[self.end..])?;
            if n == 0 {
                self.eof = true;
            }
            self.end += n;
        }
    }
}

/// stdout for a replay: once its reader goes away (`| head`), writes are dropped and the
/// analysis, its `--output` file included, goes on.
struct UntilClosed<W: Write> {
    w: W,
    closed: bool,
}

impl<W: Write> Write for UntilClosed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.closed {
            return Ok(buf.len());
        }
        match self.w.write(buf) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(buf.len())
            }
            r => r,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.w.flush() {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            r => r,
        }
    }
}

/// A malformed line that stopped the analysis.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct BadLine {
    pub line: u64,
    pub reason: String,
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(i).copied()
}

/// The wall-clock offset a log carries (its `time` against its `ts_ns`), if any.
fn wall_offset(line: &str) -> Option<i128> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let ts = i128::from(v.get("ts_ns")?.as_u64()?);
    let t = humantime::parse_rfc3339(v.get("time")?.as_str()?).ok()?;
    let unix = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos() as i128;
    Some(unix - ts)
}

/// The replay's state between lines: the log's clock and the timers it drives.
struct Feeder<'p> {
    pipeline: &'p mut Pipeline,
    f: Findings,
    next_tick: Option<u64>,
    last_ts: u64,
    clock: Option<i128>,
}

impl Feeder<'_> {
    /// One transition of the log. `offset` is the wall clock a binary record carries; for
    /// NDJSON it is read once per log from `line`'s `time` against its `ts_ns`. The sinks
    /// learn the log's wall clock from its first transition, and again whenever a binary
    /// record's run changes (captures concatenated across reboots).
    #[inline(always)]
    fn feed(&mut self, t: &Transition, offset: Option<i128>, line: &[u8]) -> Result<()> {
        let offset = offset.or_else(|| {
            self.clock
                .is_none()
                .then(|| wall_offset(&String::from_utf8_lossy(line)).unwrap_or(0))
        });
        if let Some(o) = offset
            && self.clock != Some(o)
        {
            self.clock = Some(o);
            self.pipeline.set_clock(WallClock::new(o));
        }
        // The log's clock drives the timers, one tick per second of log time.
        let tick_at = *self.next_tick.get_or_insert(t.ts_ns + TICK_NS);
        if t.ts_ns >= tick_at {
            self.pipeline.tick(t.ts_ns).context("writing output")?;
            self.next_tick = Some(t.ts_ns + TICK_NS);
        }
        self.last_ts = self.last_ts.max(t.ts_ns);
        if t.kind == crate::event::EventKind::State {
            self.f.entered[t.new as usize] += 1;
        }
        self.pipeline.feed(t).context("writing output")
    }

    /// One line of a log, a binary record or an NDJSON line, fed where it is decoded (the
    /// transition is ~150 bytes: passing it out through a `Result` and an `Option` copied
    /// it twice, 5 % of a binary replay). `Ok(Err)` is a bad line; `Err`, failed output.
    #[inline(always)]
    fn line(&mut self, line: &[u8]) -> Result<Result<(), String>> {
        if binary::is_record(line) {
            return Ok(match binary::decode(line) {
                Ok((t, off)) => {
                    self.feed(&t, Some(i128::from(off)), line)?;
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            });
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(Ok(()));
        }
        Ok(match parse_transition_bytes(line) {
            Ok(Some(t)) => {
                self.feed(&t, None, line)?;
                Ok(())
            }
            // A lifecycle (the common case, told apart by its first bytes), an alert, or a
            // recorded run's start or summary.
            Ok(None) => {
                if !line.starts_with(b"{\"type\":\"lifecycle\"") {
                    self.run_record(line)?;
                }
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        })
    }

    /// A line that is no transition nor lifecycle: a recorded run's start goes on to the
    /// outputs, as its first line did, and its summary's loss is kept. Rare: off the
    /// per-line path.
    #[cold]
    #[inline(never)]
    fn run_record(&mut self, line: &[u8]) -> Result<()> {
        if line.starts_with(b"{\"type\":\"start\"")
            && let Ok(s) = serde_json::from_slice::<crate::sink::RunStart>(line)
        {
            self.pipeline.start(&s).context("writing output")?;
        } else if memchr::memmem::find(line, b"\"summary\"").is_some() {
            self.f.recorded_summary(line);
        }
        Ok(())
    }
}

/// Replays `input` (NDJSON, binary records, or both) into `pipeline`; returns the findings,
/// and the first bad line if the replay stopped at one. Never loses what was computed
/// before it.
pub fn replay(
    input: impl Read,
    pipeline: &mut Pipeline,
    skip_bad: bool,
) -> Result<(Findings, Option<BadLine>)> {
    let mut lines = Lines::new(input);
    let mut r = Feeder {
        pipeline,
        f: Findings::default(),
        next_tick: None,
        last_ts: 0,
        clock: None,
    };
    let mut stopped = None;
    while let Some(line) = lines.next_line().context("reading the log")? {
        r.f.lines += 1;
        if let Err(reason) = r.line(line)? {
            if skip_bad {
                r.f.bad_lines += 1;
                if r.f.bad_lines <= 5 {
                    log::warn!("line {}: {reason} (skipped)", r.f.lines);
                }
                continue;
            }
            stopped = Some(BadLine {
                line: r.f.lines,
                reason,
            });
            break;
        }
    }
    let Feeder {
        pipeline,
        mut f,
        last_ts,
        ..
    } = r;
    f.tracked_at_end = pipeline.engine().stats().tracked;
    f.engine_heap_bytes = pipeline.engine().heap_bytes() as u64;
    pipeline.finish(last_ts).context("writing output")?;
    Ok((f, stopped))
}

/// `analyze -o FILE` writes a new file: it refuses one that holds something already (a
/// second conversion appended to a first is replayed twice), and above all the log it
/// reads (it would read its own output for ever). Devices and pipes are fine.
fn check_new_output(out: &Path, input: Option<&std::fs::Metadata>) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(m) = std::fs::metadata(out) else {
        return Ok(());
    };
    if !m.is_file() {
        return Ok(());
    }
    if input.is_some_and(|i| i.dev() == m.dev() && i.ino() == m.ino()) {
        anyhow::bail!(
            "{} is the log being analyzed; analyze -o writes a new file (choose another name)",
            out.display()
        );
    }
    if m.len() > 0 {
        anyhow::bail!(
            "{} already exists and is not empty; analyze -o writes a new file (remove it or choose another name)",
            out.display()
        );
    }
    Ok(())
}

pub fn analyze(args: AnalyzeArgs) -> Result<()> {
    use std::io::IsTerminal as _;
    // Without a file, a terminal on stdin would be read in silence until Ctrl-D: more
    // likely a forgotten argument than a log typed in by hand (`-` still reads it).
    if args.file.is_none() && io::stdin().is_terminal() {
        anyhow::bail!(
            "analyze needs a log: give its path (tcptrace analyze trace.ndjson), or pipe one in"
        );
    }
    let (input, input_meta): (Box<dyn Read>, _) = match args.file.as_deref() {
        Some(p) if p.as_os_str() != "-" => {
            let f = std::fs::File::open(p)
                .with_context(|| format!("cannot open the log {}", p.display()))?;
            let m = f.metadata().ok();
            (Box::new(f), m)
        }
        _ => (
            Box::new(io::stdin().lock()),
            std::fs::metadata("/dev/stdin").ok(),
        ),
    };
    let stdout_taken = args.output.as_deref().is_some_and(crate::output::is_stdout);
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    let mut lost = None;
    // Checked and opened before anything is read.
    if let Some(p) = &args.output {
        let clock = WallClock::identity();
        let file: Box<dyn Write> = if stdout_taken {
            // A reader that goes away (`| head`) ends the output, not the analysis.
            Box::new(UntilClosed {
                w: crate::output::stdout_output(args.format == FileFormat::Binary)?,
                closed: false,
            })
        } else {
            check_new_output(p, input_meta.as_ref())?;
            let f = crate::output::OutputFile::create(p)?
                .for_purpose(crate::output::Purpose::Replay)
                .with_header(crate::sink::file_header(args.format));
            lost = Some(f.lost());
            Box::new(f)
        };
        sinks.push(crate::sink::for_format(
            args.format,
            file,
            clock,
            stdout_taken,
        ));
    }
    // The printer is the live view's own sink; it learns the log's wall clock from the
    // first transition. When the records go to stdout (`-o -`), it prints only the report,
    // on stderr.
    let (screen, view): (Box<dyn Write>, _) = if stdout_taken {
        (Box::new(io::stderr()), View::None)
    } else {
        (Box::new(io::stdout()), args.view)
    };
    let stdout = UntilClosed {
        w: io::BufWriter::with_capacity(1 << 16, screen),
        closed: false,
    };
    let printer = Rc::new(RefCell::new(Terminal::for_replay(stdout, view)));
    sinks.insert(0, Box::new(Rc::clone(&printer)));
    let mut pipeline = Pipeline::new(Engine::new(engine_config(&args.engine)), sinks);
    let collected = Rc::new(RefCell::new(Findings::default()));
    {
        let collected = Rc::clone(&collected);
        pipeline.tap(move |o| {
            let mut f = collected.borrow_mut();
            match o {
                Output::Lifecycle(l) => {
                    f.lifecycles += 1;
                    if l.end == EndReason::Finished {
                        f.still_open += 1;
                    }
                    if let Some(h) = l.handshake_ns {
                        f.handshakes_ns.push(h);
                    }
                }
                Output::Alert(a) => *f.alerts.entry(a.rule.to_string()).or_default() += 1,
                Output::Transition(_) => {}
            }
        });
    }
    let (mut findings, stopped) = replay(input, &mut pipeline, args.skip_bad)?;
    let seen = collected.take();
    findings.handshakes_ns = seen.handshakes_ns;
    findings.handshakes_ns.sort_unstable();
    findings.alerts = seen.alerts;
    findings.lifecycles = seen.lifecycles;
    findings.still_open = seen.still_open;

    let stats = pipeline.engine().stats();
    // The recorded run's losses carry over: a conversion keeps them.
    let summary = RunSummary {
        transitions: pipeline.transitions(),
        lost: findings.recorded_lost,
        loss: findings.recorded_loss,
        duration_ns: findings.recorded_duration_ns,
        engine: stats,
    };
    pipeline
        .summary(&summary)
        .context("writing the output file")?;
    let mut p = printer.borrow_mut();
    let w = p.get_mut();
    print_report(w, &findings, &summary).context("writing the report")?;
    w.flush().context("writing the report")?;
    drop(p);
    // The output file's last flush, then what it could not take.
    drop(pipeline);
    if let (Some(lost), Some(path)) = (lost, &args.output)
        && let Err(e) = lost.check(path)
    {
        if stopped.is_none() {
            return Err(e);
        }
        log::error!("{e}");
    }
    if let Some(bad) = stopped {
        anyhow::bail!(
            "malformed log at {bad}; stopped there (the report above covers lines before it; --skip-bad goes on past bad lines)"
        );
    }
    Ok(())
}

fn print_report(w: &mut impl Write, f: &Findings, s: &RunSummary) -> io::Result<()> {
    let e = &s.engine;
    writeln!(w, "--- tcptrace analyze ---")?;
    writeln!(
        w,
        "{} lines, {} transitions, {} bad lines skipped; {} lifecycles ({} complete, {} partial), {} still open at end of log",
        f.lines,
        s.transitions,
        f.bad_lines,
        f.lifecycles,
        e.lifecycles_complete,
        e.lifecycles_partial,
        f.still_open
    )?;
    let entered: Vec<String> = TcpState::ALL
        .iter()
        .filter(|st| f.entered[**st as usize] > 0)
        .map(|st| format!("{}={}", st.name(), f.entered[*st as usize]))
        .collect();
    writeln!(w, "transitions into: {}", entered.join(" "))?;
    let kinds: Vec<String> = crate::engine::CloseKind::ALL
        .iter()
        .filter(|k| e.close_kinds.get(**k) > 0)
        .map(|k| format!("{}={}", k.name(), e.close_kinds.get(*k)))
        .collect();
    writeln!(
        w,
        "close kinds: {}",
        if kinds.is_empty() {
            "-".into()
        } else {
            kinds.join(" ")
        }
    )?;
    let h = &f.handshakes_ns;
    match (
        percentile(h, 0.5),
        percentile(h, 0.9),
        percentile(h, 0.99),
        h.last(),
    ) {
        (Some(p50), Some(p90), Some(p99), Some(max)) => writeln!(
            w,
            "handshake ({} connections): p50 {} p90 {} p99 {} max {}",
            h.len(),
            human(p50),
            human(p90),
            human(p99),
            human(*max)
        )?,
        _ => writeln!(w, "handshake: no complete handshakes in the log")?,
    }
    let alerts: Vec<String> = f.alerts.iter().map(|(r, n)| format!("{r}={n}")).collect();
    writeln!(
        w,
        "alerts: {}",
        if alerts.is_empty() {
            "none".into()
        } else {
            alerts.join(" ")
        }
    )?;
    writeln!(w, "{}", recorded_loss(f))?;
    writeln!(
        w,
        "illegal transitions {}, gaps (lost events) {}, evicted {}",
        e.illegal, e.gaps, e.evicted
    )?;
    writeln!(
        w,
        "engine at end of log: {} connections tracked, tables {} bytes{}",
        f.tracked_at_end,
        f.engine_heap_bytes,
        match f.engine_heap_bytes.checked_div(f.tracked_at_end) {
            Some(per) => format!(" ({per} B per connection)"),
            None => String::new(),
        }
    )
}

/// What the recorded run(s) lost, from their summary lines, by cause.
fn recorded_loss(f: &Findings) -> String {
    let l = &f.recorded_loss;
    let who = match f.recorded_runs {
        0 => {
            return "recorded loss: unknown (no summary line in the log: the run was still going, or was cut short)".into();
        }
        1 => "the recorded run".to_string(),
        n => format!("the recorded runs ({n})"),
    };
    let causes: Vec<String> = Loss::CAUSES
        .iter()
        .zip(l.causes())
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let mut s = if f.recorded_lost == 0 {
        format!("{who} lost no transitions")
    } else if causes.is_empty() {
        format!("{who} lost {} transitions", f.recorded_lost)
    } else {
        format!(
            "{who} lost {} transitions ({})",
            f.recorded_lost,
            causes.join(", ")
        )
    };
    for (k, n) in [
        ("other_events_lost", l.other_events_lost),
        ("timewait_hook_misses", l.timewait_hook_misses),
    ] {
        if n > 0 {
            s.push_str(&format!("; {k} {n}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_refills_and_without_a_final_newline() {
        let text = b"one\r\ntwo\n\nthree";
        let mut l = Lines::new(&text[..]);
        l.buf = vec![0; 2]; // force refills and growth
        let mut got = Vec::new();
        while let Some(line) = l.next_line().unwrap() {
            got.push(String::from_utf8(line.to_vec()).unwrap());
        }
        assert_eq!(got, ["one\r", "two", "", "three"]);
    }

    #[test]
    fn percentiles_pick_ranked_values() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(51));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn wall_offset_comes_from_time_and_ts() {
        let line =
            r#"{"type":"transition","schema":1,"ts_ns":1000,"time":"1970-01-01T00:00:01.000001Z"}"#;
        assert_eq!(wall_offset(line), Some(1_000_000_000));
        assert_eq!(wall_offset("{}"), None);
    }
}
