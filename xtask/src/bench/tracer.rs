//! A tracer daemon under measurement: start it with its output in files, wait until it is
//! attached, account its CPU from the start of the load to its exit, stop it with SIGINT and
//! reap it with `wait4` for its peak RSS.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// How to tell that a tracer is attached. Both tracers open a perf event for the tracepoint
/// when they attach (bcc then one per CPU for its perf buffer), which works without knowing
/// what they print; a line on stderr saying so counts too.
#[derive(Clone, Debug)]
pub struct Readiness {
    pub perf_event_fds: usize,
    pub stderr_words: &'static [&'static str],
}

pub struct Spec {
    pub name: &'static str,
    pub command: Command,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub readiness: Readiness,
    pub ready_timeout: Duration,
    pub nice: i32,
}

pub struct Running {
    pid: libc::pid_t,
    name: &'static str,
    stderr: PathBuf,
    cpu_at_load_start: CpuTimes,
    cpu_at_load_end: f64,
    prog_at_load_start: ProgStats,
    pub startup: Duration,
}

/// The tracer's BPF programs as the kernel accounts them (summed over its program fds).
#[derive(Clone, Copy, Debug, Default)]
pub struct ProgStats {
    pub run_cnt: u64,
    /// 0 unless BPF run-time stats are enabled.
    pub run_time_ns: u64,
    /// Runs the kernel skipped because a BPF program was already running on that CPU
    /// (a tracepoint hit from an interrupt that preempted one): events lost before any buffer.
    pub recursion_misses: u64,
}

impl ProgStats {
    fn since(self, start: ProgStats) -> ProgStats {
        ProgStats {
            run_cnt: self.run_cnt.saturating_sub(start.run_cnt),
            run_time_ns: self.run_time_ns.saturating_sub(start.run_time_ns),
            recursion_misses: self.recursion_misses.saturating_sub(start.recursion_misses),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Stopped {
    /// CPU (user + system) from the start of the load to exit, so the backlog a tracer drains
    /// after the load and its final flush are charged to it; its startup is not.
    pub cpu_seconds: f64,
    /// The part of `cpu_seconds` spent in the kernel on the daemon's behalf (system time:
    /// its writes into the page cache, above all, and its ring-buffer polls).
    pub cpu_system_seconds: f64,
    /// CPU during the load window only.
    pub cpu_seconds_in_load: f64,
    /// ru_maxrss from wait4: the process's VmHWM when it exited.
    pub peak_rss_kib: u64,
    pub exit: String,
    pub stderr_tail: String,
    /// From the start of the load to just before the stop.
    pub prog: ProgStats,
    /// It was gone before it was asked to stop: its figures cover part of the run at most.
    pub exited_early: bool,
}

/// Ensures the tracer dies with us (a daemon left attached would skew every later
/// measurement), and gives it the requested nice value.
fn pre_exec(cmd: &mut Command, nice: i32) {
    // SAFETY: prctl and setpriority are async-signal-safe, which is all pre_exec requires.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT as libc::c_ulong);
            if nice != 0 && libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub fn start(mut spec: Spec, abort: &AtomicBool) -> Result<Running> {
    let stdout =
        File::create(&spec.stdout).with_context(|| format!("create {}", spec.stdout.display()))?;
    let stderr =
        File::create(&spec.stderr).with_context(|| format!("create {}", spec.stderr.display()))?;
    spec.command
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    pre_exec(&mut spec.command, spec.nice);
    let started = Instant::now();
    let child = spec
        .command
        .spawn()
        .with_context(|| format!("start {}: {:?}", spec.name, spec.command))?;
    // Reaped with wait4 in `stop` (for its rusage), never through `child`.
    let pid = child.id() as libc::pid_t;
    drop(child);
    let mut running = Running {
        pid,
        name: spec.name,
        stderr: spec.stderr.clone(),
        cpu_at_load_start: CpuTimes::default(),
        cpu_at_load_end: f64::NAN,
        prog_at_load_start: ProgStats::default(),
        startup: Duration::ZERO,
    };

    loop {
        if let Some((status, _)) = try_reap(pid) {
            bail!(
                "{} exited before it was attached ({status}): {}",
                spec.name,
                tail(&spec.stderr, 12)
            );
        }
        let ready = perf_event_fds(pid) >= spec.readiness.perf_event_fds
            || spec
                .readiness
                .stderr_words
                .iter()
                .any(|w| file_contains(&spec.stderr, w));
        if ready {
            break;
        }
        if abort.load(Ordering::Relaxed) || started.elapsed() > spec.ready_timeout {
            let why = if abort.load(Ordering::Relaxed) {
                "interrupted".to_owned()
            } else {
                format!("not attached after {:?}", spec.ready_timeout)
            };
            let stopped = running.stop(Duration::from_secs(10));
            bail!("{}: {why}: {}", spec.name, stopped.stderr_tail);
        }
        thread::sleep(Duration::from_millis(50));
    }
    running.startup = started.elapsed();
    // Let the first poll of its buffers and any late attach settle before the clock starts.
    thread::sleep(Duration::from_millis(300));
    Ok(running)
}

impl Running {
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    pub fn mark_load_start(&mut self) {
        self.cpu_at_load_start = proc_cpu_times(self.pid).unwrap_or_default();
        self.prog_at_load_start = prog_stats(self.pid);
    }

    pub fn mark_load_end(&mut self) {
        self.cpu_at_load_end = proc_cpu_times(self.pid).map_or(f64::NAN, CpuTimes::total);
    }

    /// SIGINT, then wait up to `grace` for it to flush and exit (SIGKILL after that).
    pub fn stop(self, grace: Duration) -> Stopped {
        let prog = prog_stats(self.pid).since(self.prog_at_load_start);
        let early = try_reap(self.pid);
        let exited_early = early.is_some();
        if !exited_early {
            // SAFETY: pid is our unreaped child, so it cannot have been recycled.
            unsafe { libc::kill(self.pid, libc::SIGINT) };
        }
        let deadline = Instant::now() + grace;
        let (exit, usage) = loop {
            if let Some(done) = early.clone().or_else(|| try_reap(self.pid)) {
                break done;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "bench: {} ignored SIGINT for {grace:?}; killing it",
                    self.name
                );
                // SAFETY: as above.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                break reap_blocking(self.pid);
            }
            thread::sleep(Duration::from_millis(20));
        };
        let at_exit = usage.map(|u| CpuTimes {
            user: timeval_secs(u.ru_utime),
            system: timeval_secs(u.ru_stime),
        });
        let start = self.cpu_at_load_start;
        Stopped {
            cpu_seconds: at_exit.map_or(f64::NAN, |t| t.total() - start.total()),
            cpu_system_seconds: at_exit.map_or(f64::NAN, |t| t.system - start.system),
            cpu_seconds_in_load: self.cpu_at_load_end - start.total(),
            peak_rss_kib: usage.map_or(0, |u| u.ru_maxrss as u64),
            exit,
            stderr_tail: tail(&self.stderr, 12),
            prog,
            exited_early,
        }
    }
}

fn try_reap(pid: libc::pid_t) -> Option<(String, Option<libc::rusage>)> {
    let mut status = 0;
    // SAFETY: all-zero is a valid rusage; wait4 writes into both out-parameters.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
    match r {
        0 => None,
        r if r == pid => Some((describe_status(status), Some(usage))),
        _ => Some(("already reaped".to_owned(), None)),
    }
}

fn reap_blocking(pid: libc::pid_t) -> (String, Option<libc::rusage>) {
    let mut status = 0;
    // SAFETY: as in try_reap.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r == pid {
        (describe_status(status), Some(usage))
    } else {
        ("already reaped".to_owned(), None)
    }
}

fn describe_status(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("wait status {status}")
    }
}

fn timeval_secs(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// CPU time of a process, split into user and system (kernel) time, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuTimes {
    pub user: f64,
    pub system: f64,
}

impl CpuTimes {
    pub fn total(self) -> f64 {
        self.user + self.system
    }
}

/// utime and stime of every thread of `pid` so far, from /proc/<pid>/stat.
pub fn proc_cpu_times(pid: libc::pid_t) -> Option<CpuTimes> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_times(&stat)
}

fn parse_cpu_times(stat: &str) -> Option<CpuTimes> {
    // Fields after the parenthesised command name, which may itself contain spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(CpuTimes {
        user: utime / ticks,
        system: stime / ticks,
    })
}

fn file_contains(path: &Path, needle: &str) -> bool {
    // Only the start matters: readiness lines come first.
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    let mut head = vec![0u8; 64 * 1024];
    let n = std::io::Read::read(&mut f, &mut head).unwrap_or(0);
    String::from_utf8_lossy(&head[..n])
        .to_lowercase()
        .contains(&needle.to_lowercase())
}

/// Sums run_cnt, run_time_ns and recursion_misses over the BPF program fds `pid` holds.
fn prog_stats(pid: libc::pid_t) -> ProgStats {
    let mut total = ProgStats::default();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return total;
    };
    for entry in dir.flatten() {
        let is_prog =
            std::fs::read_link(entry.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf-prog");
        if !is_prog {
            continue;
        }
        let fdinfo = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        for line in std::fs::read_to_string(fdinfo).unwrap_or_default().lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value: u64 = value.trim().parse().unwrap_or(0);
            match key {
                "run_cnt" => total.run_cnt += value,
                "run_time_ns" => total.run_time_ns += value,
                "recursion_misses" => total.recursion_misses += value,
                _ => {}
            }
        }
    }
    total
}

/// Other processes holding BPF programs ("pid comm"): another tracer attached during a run
/// (a colleague's kernel test, say) slows every connection and skews that run.
pub fn other_bpf_holders(ours: Option<libc::pid_t>) -> Vec<String> {
    let me = std::process::id() as libc::pid_t;
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut holders = Vec::new();
    for entry in proc.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if pid == me || Some(pid) == ours {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|t| t.as_os_str() == "anon_inode:bpf-prog");
        if holds {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            holders.push(format!("{pid} {}", comm.trim()));
        }
    }
    holders
}

fn perf_event_fds(pid: libc::pid_t) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.as_os_str() == "anon_inode:[perf_event]")
        .count()
}

/// The last `lines` lines of a (small) diagnostics file, on one line for a report.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = all.len().saturating_sub(lines);
    let joined = all[start..].join(" | ");
    if joined.is_empty() {
        "(no stderr)".to_owned()
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_are_read_after_a_command_name_with_spaces_and_parentheses() {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let stat = "4242 (tcp trace (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0";
        let t = parse_cpu_times(stat).expect("a well-formed stat line");
        assert_eq!(t.user, 250.0 / ticks);
        assert_eq!(t.system, 75.0 / ticks);
        assert_eq!(t.total(), 325.0 / ticks);
        assert_eq!(parse_cpu_times("4242 (cut short) S 1"), None);
    }
}
