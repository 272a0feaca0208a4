//! Everything that touches aya and the kernel: privilege checks, loading the embedded eBPF
//! object with the live tracepoint layout, attaching, reading the ring buffer, and the two
//! ways events can be lost (ring buffer full, and the kernel skipping the program:
//! `recursion_misses`). Nothing else in the crate imports aya.

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{Array, MapData, PerCpuArray, Queue, RingBuf};
use aya::programs::{ProgramError, TracePoint};
use aya::{Ebpf, EbpfError, EbpfLoader};
use aya_log::EbpfLogger;
use tcptrace_common::{
    COUNTER_DEFERRED, COUNTER_FILTERED, COUNTER_READ_ERROR, COUNTER_RINGBUF_FULL,
    COUNTER_RINGBUF_FULL_OTHER, COUNTER_SOCK_MAP_FULL, COUNTER_SUBMITTED, Filter, KOFF_ACCEPT,
    KOFF_TIMEWAIT, SOCK_MAP_ENTRIES, StateEvent,
};
use tokio::io::unix::AsyncFd;

use crate::kernel_btf;
use crate::tracefs::{self, TRACEPOINT_CATEGORY, TRACEPOINT_NAME, TracefsError};

const PROGRAM: &str = "inet_sock_set_state";

/// The object built by build.rs from tcptrace-ebpf, aligned for the ELF parser.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcptrace"));

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "loading the eBPF program needs root or the CAP_BPF and CAP_PERFMON capabilities; run tcptrace with sudo"
    )]
    NotPermitted,
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error(
        "this tcptrace binary was built without its eBPF program (AYA_BUILD_SKIP was set); rebuild it with `cargo xtask run`"
    )]
    NoObject,
    #[error(
        "the kernel rejected the eBPF program ({cause}); verifier's last lines:\n{verifier_tail}"
    )]
    Verifier {
        cause: String,
        verifier_tail: String,
    },
    #[error(
        "attaching to the {tracepoint} tracepoint failed: {cause}; is this a Linux 4.16+ kernel with tracepoints enabled?"
    )]
    Attach { tracepoint: String, cause: String },
    #[error("loading the eBPF object failed: {0}")]
    Load(String),
}

#[derive(Clone, Copy, Debug)]
pub struct TracerConfig {
    /// Ring-buffer size in bytes (a power of two, at least one page).
    pub ring_bytes: u32,
    /// Unread bytes above which the kernel wakes the reader; below it the reader polls.
    pub wakeup_bytes: u64,
    /// Capacity of the kernel map that carries connection identity and owner.
    pub sock_map_entries: u32,
    /// In-kernel filters (see `filter.rs`); the default keeps everything.
    pub filter: Filter,
    /// Follow timewait sockets (TIME_WAIT) through the timer tracepoints.
    pub timewait: bool,
}

impl Default for TracerConfig {
    fn default() -> Self {
        TracerConfig {
            ring_bytes: 32 << 20,
            wakeup_bytes: 256 << 10,
            sock_map_entries: SOCK_MAP_ENTRIES,
            filter: Filter::default(),
            timewait: true,
        }
    }
}

/// Events the kernel side could not deliver, and how many it did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub submitted: u64,
    /// Ring-buffer reserve failed for a state transition: the reader fell behind.
    pub ringbuf_full: u64,
    /// The same for accept, timewait-handoff and vanished events, which change no state.
    pub ringbuf_full_other: u64,
    pub read_errors: u64,
    /// Identity map insert failed (the event still went out, flagged).
    pub sock_map_full: u64,
    /// Dropped on purpose by the in-kernel filters (not a loss).
    pub filtered: u64,
    /// The kernel skipped the state program (it fired while another BPF program ran on
    /// that CPU): each a transition lost.
    pub recursion_misses: u64,
    /// The same for the accept programs: each an accept lost (a socket without its owner).
    pub accept_misses: u64,
    /// The same for the timer hooks: each may have been a timewait socket's state change or
    /// end (most timers are not a timewait socket's, so it is a bound, not a count).
    pub timer_misses: u64,
    /// `→ CLOSE` events that found the ring buffer full and were queued instead: delivered
    /// late (after the ring buffer's backlog), not lost.
    pub deferred: u64,
}

/// A loaded and attached tracer. Dropping it detaches the program.
pub struct Tracer {
    // Field order matters for drop: the ring buffer and maps go before the Ebpf that owns
    // the program and link.
    ring: AsyncFd<RingBuf<MapData>>,
    deferred: Queue<MapData, StateEvent>,
    counters: PerCpuArray<MapData, u64>,
    tombstones: Tombstones,
    logger: AsyncFd<EbpfLogger<&'static dyn log::Log>>,
    /// The state program's fd (its recursion misses are transitions lost), then the
    /// accept programs' (accepts lost) and the timer hooks' (maybe timewait steps lost).
    state_fd: std::os::fd::RawFd,
    accept_fds: Vec<std::os::fd::RawFd>,
    timer_fds: Vec<std::os::fd::RawFd>,
    /// What could not be hooked here, one sentence each (the rest works without it).
    warnings: Vec<String>,
    _ebpf: Ebpf,
}

/// Whether the process may load BPF programs: root, or CAP_BPF + CAP_PERFMON.
pub fn check_privileges() -> Result<(), KernelError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_PERFMON: u64 = 1 << 38;
    const CAP_BPF: u64 = 1 << 39;
    if cap_eff & (CAP_BPF | CAP_PERFMON) == CAP_BPF | CAP_PERFMON {
        Ok(())
    } else {
        Err(KernelError::NotPermitted)
    }
}

fn is_eperm(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

fn verifier_error(e: ProgramError) -> KernelError {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            // The verifier rejects a program with EACCES too: only without its log is
            // EACCES/EPERM about privileges.
            if is_eperm(&io_error) && log.trim().is_empty() {
                return KernelError::NotPermitted;
            }
            let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            KernelError::Verifier {
                cause: io_error.to_string(),
                verifier_tail: tail,
            }
        }
        other => KernelError::Load(other.to_string()),
    }
}

impl Tracer {
    /// Checks privileges, reads the live tracepoint layout, loads and attaches the program.
    /// Must be called inside a tokio runtime.
    pub fn start(cfg: TracerConfig) -> Result<Tracer, KernelError> {
        if EBPF_OBJECT.is_empty() {
            return Err(KernelError::NoObject);
        }
        check_privileges()?;
        let tracefs = tracefs::find_or_mount()?;
        let layout = tracefs::read_layout(&tracefs)?;
        let (mut koffs, mut warnings) = kernel_btf::kernel_offsets();
        if !cfg.timewait {
            koffs.valid &= !KOFF_TIMEWAIT;
        }
        // The eBPF side reads these records at fixed offsets: check them on this kernel.
        for (bit, category, name, fields) in HOOK_RECORDS {
            if koffs.valid & bit != 0
                && let Err(e) = tracefs::check_fields(&tracefs, category, name, fields)
            {
                koffs.valid &= !bit;
                warnings.push(hook_warning(*bit, &e));
            }
        }

        // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lifting it is harmless after.
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit with a valid struct; failure only matters on old kernels.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };

        let mut ebpf = EbpfLoader::new()
            .override_global("LAYOUT", &layout, true)
            .override_global("WAKEUP_BYTES", &cfg.wakeup_bytes, true)
            .override_global("RING_BYTES", &u64::from(cfg.ring_bytes), true)
            .override_global("MAX_TOMBSTONES", &i64::from(cfg.sock_map_entries / 4), true)
            .override_global("FILTER", &cfg.filter, true)
            .override_global("KOFFS", &koffs, true)
            .map_max_entries("EVENTS", cfg.ring_bytes)
            .map_max_entries("SOCKS", cfg.sock_map_entries)
            .map_max_entries("TWS", timewait_capacity())
            .load(EBPF_OBJECT)
            .map_err(|e| match e {
                EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
                    if is_eperm(&io_error) =>
                {
                    KernelError::NotPermitted
                }
                e => KernelError::Load(e.to_string()),
            })?;
        // The logger must outlive the program: dropping it closes the log map's fd.
        let logger = EbpfLogger::init(&mut ebpf).map_err(|e| KernelError::Load(e.to_string()))?;
        // SAFETY: the logger owns its ring buffer's fd and keeps it open while registered.
        let logger =
            unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
                .map_err(|e| KernelError::Load(e.into_parts().1.to_string()))?;

        let state_fd = attach(&mut ebpf, PROGRAM, TRACEPOINT_CATEGORY, TRACEPOINT_NAME)?;
        let (mut accept_fds, mut timer_fds) = (Vec::new(), Vec::new());
        // accept(): each attach on its own; a missing one only loses that call's owners.
        if koffs.valid & KOFF_ACCEPT != 0 {
            for (prog, name) in [
                ("sys_exit_accept4", "sys_exit_accept4"),
                ("sys_exit_accept", "sys_exit_accept"),
            ] {
                match attach(&mut ebpf, prog, "syscalls", name) {
                    Ok(fd) => accept_fds.push(fd),
                    Err(e) => warnings.push(hook_warning(KOFF_ACCEPT, &e.to_string())),
                }
            }
        }
        // Timewait sockets: the end hooks first, so that no timewait socket is followed
        // whose end could not be seen.
        if koffs.valid & KOFF_TIMEWAIT != 0 {
            let hooks = [
                ("tw_timer_expire", "timer_expire_entry"),
                ("tw_timer_cancel", "timer_cancel"),
                ("tw_timer_start", "timer_start"),
            ];
            for (prog, name) in hooks {
                match attach(&mut ebpf, prog, "timer", name) {
                    Ok(fd) => timer_fds.push(fd),
                    Err(e) => {
                        warnings.push(hook_warning(KOFF_TIMEWAIT, &e.to_string()));
                        break;
                    }
                }
            }
        }
        let ring: RingBuf<MapData> = take_map(&mut ebpf, "EVENTS")?;
        // SAFETY: the RingBuf owns the map fd and keeps it open while registered.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| KernelError::Load(e.into_parts().1.to_string()))?;
        let counters = take_map(&mut ebpf, "COUNTERS")?;
        let tombstones = Tombstones {
            shared: take_map(&mut ebpf, "TOMBSTONES")?,
            pending: take_map(&mut ebpf, "TOMBSTONES_PENDING")?,
        };
        let deferred = take_map(&mut ebpf, "DEFERRED")?;
        Ok(Tracer {
            ring,
            deferred,
            counters,
            tombstones,
            logger,
            state_fd,
            accept_fds,
            timer_fds,
            warnings,
            _ebpf: ebpf,
        })
    }

    /// What could not be hooked on this kernel, one sentence each.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Waits until the kernel wakes the reader (enough unread data) or `timeout` passes.
    /// Either way the caller then drains: below the wake-up threshold nothing wakes us, so
    /// the timeout is what bounds the latency of a lone event.
    pub async fn wait(&self, timeout: std::time::Duration) {
        if let Ok(Ok(mut guard)) = tokio::time::timeout(timeout, self.ring.readable()).await {
            guard.clear_ready();
        }
    }

    /// Hands every pending event's bytes to `f`, returns how many. Never blocks. The
    /// deferred `→ CLOSE` events come after the ring buffer's backlog, which holds their
    /// connections' earlier events.
    pub fn drain(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let ring = self.ring.get_mut();
        let mut n = 0;
        while let Some(item) = ring.next() {
            f(&item);
            n += 1;
        }
        // Empty (ENOENT) ends it; bounded, so that a producer refilling the queue as fast as
        // it is emptied cannot hold the reader here.
        for _ in 0..tcptrace_common::DEFERRED_CLOSES {
            let Ok(ev) = self.deferred.pop(0) else { break };
            // SAFETY: StateEvent is plain old data (repr(C), no padding left unwritten by
            // the program); viewed as its bytes, as the ring buffer hands them.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    (&raw const ev).cast::<u8>(),
                    std::mem::size_of::<StateEvent>(),
                )
            };
            f(bytes);
            n += 1;
        }
        n
    }

    /// Forwards the eBPF program's own diagnostics (aya-log) to the daemon's log.
    pub fn flush_logs(&mut self) {
        self.logger.get_mut().flush();
    }

    /// Current kernel-side counters, summed over CPUs.
    pub fn counters(&self) -> KernelCounters {
        let sum = |i: u32| -> u64 {
            self.counters
                .get(&i, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        KernelCounters {
            submitted: sum(COUNTER_SUBMITTED),
            ringbuf_full: sum(COUNTER_RINGBUF_FULL),
            ringbuf_full_other: sum(COUNTER_RINGBUF_FULL_OTHER),
            read_errors: sum(COUNTER_READ_ERROR),
            sock_map_full: sum(COUNTER_SOCK_MAP_FULL),
            filtered: sum(COUNTER_FILTERED),
            deferred: sum(COUNTER_DEFERRED),
            recursion_misses: misses(&[self.state_fd]),
            accept_misses: misses(&self.accept_fds),
            timer_misses: misses(&self.timer_fds),
        }
    }

    /// Ended lives' entries the kernel keeps for the next socket at their address, as its
    /// counts add up: at most a quarter of `sock_map_entries` plus a batch of 64 per CPU
    /// (and at least the entries in the map: the LRU may have evicted some).
    pub fn tombstones(&self) -> i64 {
        let shared = self.tombstones.shared.get(&0, 0).unwrap_or(0);
        let pending: i64 = self
            .tombstones
            .pending
            .get(&0, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0);
        shared + pending
    }

    /// The tracepoint program's kernel info (id, name, run stats, recursion misses).
    pub fn program_info(&self) -> std::io::Result<ProgInfo> {
        prog_info(self.state_fd)
    }
}

/// The program's count of tombstones: what the CPUs have added to the shared count, and
/// what each has not yet.
struct Tombstones {
    shared: Array<MapData, i64>,
    pending: PerCpuArray<MapData, i64>,
}

/// Takes map `name` out of the loaded object as its typed handle.
fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| KernelError::Load(format!("map {name} missing")))?;
    T::try_from(map).map_err(|e| KernelError::Load(e.to_string()))
}

/// The tracepoint records the optional hooks read, with the fields at the offsets the eBPF
/// program uses.
type HookRecord = (
    u32,
    &'static str,
    &'static str,
    &'static [(&'static str, u32, u32)],
);
const HOOK_RECORDS: &[HookRecord] = &[
    (
        KOFF_ACCEPT,
        "syscalls",
        "sys_exit_accept4",
        &[("ret", 16, 8)],
    ),
    (
        KOFF_ACCEPT,
        "syscalls",
        "sys_exit_accept",
        &[("ret", 16, 8)],
    ),
    (
        KOFF_TIMEWAIT,
        "timer",
        "timer_start",
        &[("timer", 8, 8), ("function", 16, 8)],
    ),
    (
        KOFF_TIMEWAIT,
        "timer",
        "timer_expire_entry",
        &[("timer", 8, 8), ("now", 16, 8), ("function", 24, 8)],
    ),
    (KOFF_TIMEWAIT, "timer", "timer_cancel", &[("timer", 8, 8)]),
];

fn hook_warning(bit: u32, cause: &str) -> String {
    match bit {
        KOFF_ACCEPT => format!(
            "accept() owners are not traced ({cause}); accepted sockets keep their listener's owner"
        ),
        _ => format!(
            "TIME_WAIT is not traced ({cause}); lifecycles end at FIN_WAIT2/CLOSING -> CLOSE"
        ),
    }
}

/// Timewait sockets to follow at most: the kernel's own limit (tcp_max_tw_buckets; beyond
/// it, it creates none), within 1k..1M.
fn timewait_capacity() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_max_tw_buckets")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(SOCK_MAP_ENTRIES, |n| n.clamp(1024, 1 << 20) as u32)
}

/// Loads program `prog` and attaches it to tracepoint `category:name`; returns its fd.
fn attach(
    ebpf: &mut Ebpf,
    prog: &str,
    category: &str,
    name: &str,
) -> Result<std::os::fd::RawFd, KernelError> {
    let program: &mut TracePoint = ebpf
        .program_mut(prog)
        .ok_or_else(|| KernelError::Load(format!("program {prog} missing from the object")))?
        .try_into()
        .map_err(|e: ProgramError| KernelError::Load(e.to_string()))?;
    program.load().map_err(verifier_error)?;
    program
        .attach(category, name)
        .map_err(|e| KernelError::Attach {
            tracepoint: format!("{category}:{name}"),
            cause: e.to_string(),
        })?;
    Ok(program
        .fd()
        .map_err(|e| KernelError::Load(e.to_string()))?
        .as_fd()
        .as_raw_fd())
}

/// Runs the kernel skipped, summed over the programs `fds`.
fn misses(fds: &[std::os::fd::RawFd]) -> u64 {
    fds.iter()
        .filter_map(|fd| prog_info(*fd).ok())
        .map(|i| i.recursion_misses)
        .sum()
}

/// The fields of the kernel's `struct bpf_prog_info` (uapi/linux/bpf.h) that aya 0.14 does
/// not expose: `recursion_misses` in particular.
#[derive(Clone, Debug, Default)]
pub struct ProgInfo {
    pub id: u32,
    pub name: String,
    pub run_cnt: u64,
    pub recursion_misses: u64,
}

fn prog_info(fd: std::os::fd::RawFd) -> std::io::Result<ProgInfo> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // Offsets in struct bpf_prog_info, stable uapi (recursion_misses since 5.12).
    const OFF_ID: usize = 4;
    const OFF_NAME: usize = 64;
    const OFF_RUN_CNT: usize = 200;
    const OFF_RECURSION_MISSES: usize = 208;
    #[repr(C, align(8))]
    struct Info([u8; 256]);
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = Info([0; 256]);
    let mut attr = GetInfo {
        bpf_fd: fd as u32,
        info_len: 256,
        info: info.0.as_mut_ptr() as u64,
    };
    // SAFETY: bpf(2) with a correctly sized attr pointing at a buffer we own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut GetInfo,
            std::mem::size_of::<GetInfo>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let b = &info.0;
    let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let name = &b[OFF_NAME..OFF_NAME + 16];
    let end = name.iter().position(|&c| c == 0).unwrap_or(16);
    let len = attr.info_len as usize;
    Ok(ProgInfo {
        id: u32::from_ne_bytes(b[OFF_ID..OFF_ID + 4].try_into().expect("4 bytes")),
        name: String::from_utf8_lossy(&name[..end]).into_owned(),
        run_cnt: if len >= OFF_RUN_CNT + 8 {
            u64_at(OFF_RUN_CNT)
        } else {
            0
        },
        recursion_misses: if len >= OFF_RECURSION_MISSES + 8 {
            u64_at(OFF_RECURSION_MISSES)
        } else {
            0
        },
    })
}

/// Drops every capability of this process: once the programs are attached and their maps
/// open, reading the ring buffer, the counters and the program info only needs the file
/// descriptors already held, and detaching on exit is closing them.
pub fn drop_capabilities() -> Result<(), String> {
    for set in [
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
        caps::CapSet::Inheritable,
    ] {
        caps::clear(None, set).map_err(|e| format!("dropping capabilities failed: {e}"))?;
    }
    // SAFETY: prctl with constant arguments; keeps an exec'd child from regaining any.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    Ok(())
}

/// CLOCK_MONOTONIC now, the clock of the kernel's `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Nanoseconds to add to a CLOCK_MONOTONIC timestamp to get wall-clock (Unix) time.
pub fn wall_offset_ns() -> i128 {
    i128::from(clock_ns(libc::CLOCK_REALTIME)) - i128::from(clock_ns(libc::CLOCK_MONOTONIC))
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid clock id and timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
