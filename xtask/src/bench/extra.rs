//! Figures beyond live overhead, each one function returning a [`Figure`]; add the next one
//! here and list it in `bench::extra_figures`: replay throughput, and the engine's memory per
//! tracked connection at a million open connections.

use std::io::{BufWriter, Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
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
    pub fn unavailable(name: &'static str, why: impl Into<String>) -> Figure {
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
/// file per second of wall time (median of `runs`), and the replay's peak RSS. The same log
/// converted to a binary capture (`analyze -o X --format binary`, not timed) is replayed
/// in the same runs, interleaved, for the two formats side by side.
pub fn replay_throughput(
    bin: Option<&Path>,
    log: Option<(&Path, u64)>,
    runs: usize,
) -> Vec<Figure> {
    const NAME: &str = "replay throughput";
    const BIN_NAME: &str = "replay throughput, binary capture";
    let Some(bin) = bin else {
        return vec![Figure::unavailable(NAME, "tcptrace is not available")];
    };
    let Some((log, transitions)) = log else {
        return vec![Figure::unavailable(
            NAME,
            "no recorded log (no successful tcptrace round)",
        )];
    };
    // A binary without the subcommand, or an empty stub, must not produce a number.
    let help = Command::new(bin).args(["analyze", "--help"]).output();
    match help {
        Ok(o) if o.status.success() && !o.stdout.is_empty() => {}
        _ => {
            return vec![Figure::unavailable(
                NAME,
                "not available yet: `tcptrace analyze` is missing",
            )];
        }
    }
    let capture = log.with_extension("bin");
    // A leftover of an interrupted bench: analyze -o writes only a new file.
    std::fs::remove_file(&capture).ok();
    let converted = Command::new(bin)
        .arg("analyze")
        .arg(log)
        .args(["--view", "none", "--format", "binary", "--output"])
        .arg(&capture)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let capture_walls = match converted {
        Ok(s) if s.success() => Ok(Vec::new()),
        Ok(s) => Err(format!("converting the log failed ({s})")),
        Err(e) => Err(format!("converting the log failed: {e}")),
    };
    let mut inputs = [
        ReplayInput::new(NAME, log.to_path_buf(), Ok(Vec::new())),
        ReplayInput::new(BIN_NAME, capture.clone(), capture_walls),
    ];
    for _ in 0..runs.max(1) {
        for input in &mut inputs {
            let Ok(walls) = &mut input.walls else {
                continue;
            };
            let mut cmd = Command::new(bin);
            cmd.arg("analyze").arg(&input.path).args(["--view", "none"]);
            match run_measured(&mut cmd) {
                Ok((wall, rss)) => {
                    walls.push(wall);
                    input.peak_rss_kib = input.peak_rss_kib.max(rss);
                }
                Err(why) => input.walls = Err(format!("not available yet: {why}")),
            }
        }
    }
    std::fs::remove_file(&capture).ok();
    let ndjson_wall = inputs[0].median();
    inputs
        .into_iter()
        .map(|input| {
            let Some(wall) = input.median() else {
                let why = input.walls.err().unwrap_or_default();
                return Figure::unavailable(input.name, why);
            };
            let walls = input.walls.unwrap_or_default();
            let rate = transitions as f64 / wall.as_secs_f64();
            let vs = match ndjson_wall {
                Some(n) if input.name == BIN_NAME => format!(
                    "; {:.2}x the NDJSON replay's rate, same runs interleaved",
                    n.as_secs_f64() / wall.as_secs_f64()
                ),
                _ => String::new(),
            };
            Figure {
                name: input.name,
                value: Ok((rate, "transitions/s")),
                detail: format!(
                    "`tcptrace analyze {} --view none` on {transitions} transitions ({} MB): {:.2} s (median of {}), peak RSS {} MiB{vs}",
                    input.path.file_name().map(|f| f.to_string_lossy()).unwrap_or_default(),
                    input.bytes / 1_000_000,
                    wall.as_secs_f64(),
                    walls.len(),
                    input.peak_rss_kib / 1024
                ),
                json: json!({
                    "available": true,
                    "transitions_per_second": rate,
                    "transitions": transitions,
                    "file_bytes": input.bytes,
                    "wall_seconds": walls.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
                    "peak_rss_kib": input.peak_rss_kib,
                }),
            }
        })
        .collect()
}

/// One file `replay_throughput` times: its wall times so far, or why it cannot be timed.
struct ReplayInput {
    name: &'static str,
    path: PathBuf,
    /// Its size, read before the runs (the capture is removed after them).
    bytes: u64,
    walls: Result<Vec<Duration>, String>,
    peak_rss_kib: u64,
}

impl ReplayInput {
    fn new(name: &'static str, path: PathBuf, walls: Result<Vec<Duration>, String>) -> Self {
        let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        ReplayInput {
            name,
            path,
            bytes,
            walls,
            peak_rss_kib: 0,
        }
    }

    fn median(&self) -> Option<Duration> {
        let mut walls = self.walls.as_ref().ok()?.clone();
        walls.sort();
        walls.get(walls.len() / 2).copied()
    }
}

/// Memory the lifecycle engine holds per tracked connection with `n` connections open:
/// `tcptrace analyze -` is fed a synthetic log of `n` connections that reach ESTABLISHED and
/// never close; once it has read all of it (and before the log ends, which would close them),
/// its RSS is taken. The same with 1 connection is the baseline; the difference over `n` is
/// the figure. The engine's own accounting of its tables, which `analyze` reports, goes next
/// to it.
pub fn engine_memory_per_connection(bin: Option<&Path>, n: u64) -> Figure {
    const NAME: &str = "engine memory per connection";
    let Some(bin) = bin else {
        return Figure::unavailable(NAME, "tcptrace is not available");
    };
    let n = n.max(2);
    let base = match hold_open(bin, 1) {
        Ok(h) => h,
        Err(why) => return Figure::unavailable(NAME, why),
    };
    let full = match hold_open(bin, n) {
        Ok(h) => h,
        Err(why) => return Figure::unavailable(NAME, why),
    };
    let per_conn = (full.rss_kib as f64 - base.rss_kib as f64) * 1024.0 / n as f64;
    let engine = full
        .engine
        .filter(|(tracked, _)| *tracked > 0)
        .map(|(tracked, bytes)| bytes as f64 / tracked as f64);
    Figure {
        name: NAME,
        value: Ok((per_conn, "bytes of RSS per connection")),
        detail: format!(
            "{n} open connections held by `tcptrace analyze -`: RSS {} MiB vs {} MiB with 1, fed in {:.1} s; engine's own table accounting {}",
            full.rss_kib / 1024,
            base.rss_kib / 1024,
            full.fed.as_secs_f64(),
            match (engine, full.engine) {
                (Some(b), Some((tracked, bytes))) => format!(
                    "{b:.0} B per connection ({} MiB for {tracked} tracked)",
                    bytes / (1 << 20)
                ),
                _ => "not reported".to_owned(),
            }
        ),
        json: json!({
            "available": true,
            "connections": n,
            "rss_bytes_per_connection": per_conn,
            "rss_kib": full.rss_kib,
            "baseline_rss_kib": base.rss_kib,
            "engine_bytes_per_connection": engine,
            "engine_tracked": full.engine.map(|e| e.0),
            "engine_table_bytes": full.engine.map(|e| e.1),
            "feed_seconds": full.fed.as_secs_f64(),
        }),
    }
}

struct Held {
    rss_kib: u64,
    /// (tracked connections, table bytes) as `analyze` reports them at the end of the log.
    engine: Option<(u64, u64)>,
    fed: Duration,
}

/// One synthetic connection that opens (CLOSE→SYN_SENT→ESTABLISHED) and stays open, in the
/// exact form tcptrace writes (so the replay takes its fast path).
fn open_connection_lines(out: &mut impl std::io::Write, i: u64) -> std::io::Result<()> {
    let ts = 1_000_000 + i * 2;
    let (a, b, c) = ((i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
    let sk = 0xffff_8880_0000_0000u64 + i * 0x800;
    for (step, (old, new, starts, in_old)) in [
        ("CLOSE", "SYN_SENT", "true", "null".to_owned()),
        ("SYN_SENT", "ESTABLISHED", "false", "1".to_owned()),
    ]
    .into_iter()
    .enumerate()
    {
        writeln!(
            out,
            r#"{{"type":"transition","schema":1,"ts_ns":{},"time":"1970-01-01T00:00:00.001000000Z","conn_id":{i},"skaddr":"0x{sk:x}","family":"ipv4","laddr":"10.{a}.{b}.{c}","lport":40000,"raddr":"192.0.2.1","rport":443,"old":"{old}","new":"{new}","in_old_state_ns":{in_old},"owner_pid":100,"owner_tid":100,"owner_comm":"bench","owner_source":"kernel","task_pid":100,"task_tid":100,"task_comm":"bench","role":"active_open","legal":true,"gap":false,"starts_conn":{starts},"midlife":false,"cpu":0,"owner_via":"connect","owner_uid":0,"cgroup_id":null,"netns":null,"unaccepted":false}}"#,
            ts + step as u64
        )?;
    }
    Ok(())
}

/// Feeds `n` open connections to `tcptrace analyze -`, waits until it has consumed them
/// (blocked reading an empty pipe, its CPU time still), takes its RSS, then ends the log.
fn hold_open(bin: &Path, n: u64) -> Result<Held, String> {
    let mut child = Command::new(bin)
        .args(["analyze", "-", "--view", "none", "--max-connections"])
        .arg((n + 1024).to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not start {}: {e}", bin.display()))?;
    let pid = child.id() as libc::pid_t;
    let stdin = child.stdin.take().expect("piped stdin");
    let pipe_fd = stdin.as_raw_fd();
    let started = Instant::now();
    let mut w = BufWriter::with_capacity(1 << 20, stdin);
    for i in 0..n {
        if let Err(e) = open_connection_lines(&mut w, i) {
            let _ = child.kill();
            return Err(format!("feeding `tcptrace analyze -` failed: {e}"));
        }
    }
    if let Err(e) = w.flush() {
        let _ = child.kill();
        return Err(format!("feeding `tcptrace analyze -` failed: {e}"));
    }
    let rss = wait_consumed(pid, pipe_fd).and_then(|()| vm_rss_kib(pid));
    let fed = started.elapsed();
    drop(w); // end of log: analyze closes the connections and reports
    let mut out = String::new();
    if let Some(s) = child.stdout.as_mut() {
        s.read_to_string(&mut out).ok();
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for analyze: {e}"))?;
    let Some(rss_kib) = rss else {
        return Err("could not read the replay's RSS".to_owned());
    };
    if !status.success() {
        let mut err = String::new();
        if let Some(s) = child.stderr.as_mut() {
            s.read_to_string(&mut err).ok();
        }
        return Err(format!("`tcptrace analyze -` failed: {}", err.trim()));
    }
    Ok(Held {
        rss_kib,
        engine: engine_line(&out),
        fed,
    })
}

/// `engine at end of log: N connections tracked, tables B bytes …` from analyze's report.
fn engine_line(report: &str) -> Option<(u64, u64)> {
    let line = report
        .lines()
        .find_map(|l| l.strip_prefix("engine at end of log: "))?;
    let mut words = line.split_whitespace();
    let tracked = words.next()?.parse().ok()?;
    let bytes = line
        .split("tables ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((tracked, bytes))
}

/// Waits (up to a minute) until the pipe to `pid` is empty and `pid` sleeps with its CPU time
/// unchanged: it has read and processed everything written so far.
fn wait_consumed(pid: libc::pid_t, pipe_fd: i32) -> Option<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut quiet = 0;
    let mut last_cpu = None;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer; the fd is our open pipe.
        let r = unsafe { libc::ioctl(pipe_fd, libc::FIONREAD, &mut queued) };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let sleeping = fields.first() == Some(&"S");
        let cpu = (fields.get(11)?.to_string(), fields.get(12)?.to_string());
        let still = last_cpu.as_ref() == Some(&cpu);
        last_cpu = Some(cpu);
        if r == 0 && queued == 0 && sleeping && still {
            quiet += 1;
            if quiet >= 3 {
                return Some(());
            }
        } else {
            quiet = 0;
        }
    }
    None
}

/// Resident set size of `pid` now, KiB.
pub fn vm_rss_kib(pid: libc::pid_t) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
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
