//! The kernel settings the bench depends on, on for its duration and restored after.

use std::os::fd::{FromRawFd as _, OwnedFd, RawFd};

use anyhow::{Context as _, Result};

/// A sysctl set to another value for the bench's duration when it holds a given one, and
/// restored on drop.
struct Override {
    path: &'static str,
    previous: String,
    changed: bool,
}

impl Override {
    /// Writes `to` to `path` if it reads `from`.
    fn apply(path: &'static str, from: &str, to: &str) -> std::io::Result<Override> {
        let previous = std::fs::read_to_string(path)?.trim().to_owned();
        let changed = previous == from;
        if changed {
            std::fs::write(path, to)?;
        }
        Ok(Override {
            path,
            previous,
            changed,
        })
    }
}

impl Drop for Override {
    fn drop(&mut self) {
        if self.changed
            && let Err(e) = std::fs::write(self.path, &self.previous)
        {
            eprintln!(
                "bench: could not restore {} to {}: {e}",
                self.path, self.previous
            );
        }
    }
}

/// Keeps TIME_WAIT reuse on for loopback while the bench runs (the client side leaves a
/// TIME_WAIT socket per connection, and ephemeral ports would run out), and restores the
/// previous value on drop. 2 (the default: loopback only) already does, so it is left alone.
pub struct TwReuse(Override);

const TW_REUSE: &str = "/proc/sys/net/ipv4/tcp_tw_reuse";

impl TwReuse {
    pub fn ensure() -> Result<TwReuse> {
        Override::apply(TW_REUSE, "0", "1")
            .map(TwReuse)
            .with_context(|| {
                format!("set {TW_REUSE} to 1 for the bench (run as root, or set it yourself)")
            })
    }

    pub fn describe(&self) -> String {
        let o = &self.0;
        if o.changed {
            format!(
                "net.ipv4.tcp_tw_reuse=1 during the bench (restored to {})",
                o.previous
            )
        } else {
            format!("net.ipv4.tcp_tw_reuse={} (unchanged)", o.previous)
        }
    }
}

/// The kernel's per-program run-time statistics (run_time_ns in a program's fdinfo), on while
/// this is alive. They cost two clock reads per program run, the same for every tracer. Held
/// through BPF_ENABLE_STATS rather than the sysctl: the kernel turns them off again when the
/// fd closes, even if the bench is killed.
pub struct BpfStats(Option<OwnedFd>);

impl BpfStats {
    pub fn enable() -> BpfStats {
        const BPF_ENABLE_STATS: libc::c_long = 32;
        const BPF_STATS_RUN_TIME: u32 = 0;
        // union bpf_attr's enable_stats member: just the type; the kernel zero-fills the rest.
        let attr = BPF_STATS_RUN_TIME;
        // SAFETY: bpf(2) reads `size` bytes of attr, which is a live u32.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                &attr as *const u32,
                size_of::<u32>() as libc::c_uint,
            )
        };
        if fd < 0 {
            eprintln!(
                "bench: could not enable BPF run-time stats ({}); no ns/event figure",
                std::io::Error::last_os_error()
            );
            return BpfStats(None);
        }
        // SAFETY: a descriptor the kernel just returned to us and nobody else owns.
        BpfStats(Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
    }

    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }
}

/// Run-time stats switched on for every program by the sysctl (`kernel.bpf_stats_enabled=1`,
/// left on by another tool or by hand) cost each program run two clock reads, in the
/// counted rounds too: they are off for the bench's duration, and restored on drop. The
/// BPF time round still gets its stats through its own `BpfStats` fd.
pub struct StatsSysctlOff {
    /// Held for its drop, which restores the sysctl.
    _restore: Option<Override>,
}

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl StatsSysctlOff {
    pub fn ensure() -> StatsSysctlOff {
        match Override::apply(BPF_STATS_SYSCTL, "1", "0") {
            Ok(o) => {
                if o.changed {
                    eprintln!(
                        "bench: kernel.bpf_stats_enabled was 1 (stats on every program run): 0 during the bench, restored after"
                    );
                }
                StatsSysctlOff { _restore: Some(o) }
            }
            Err(e) => {
                eprintln!(
                    "bench: kernel.bpf_stats_enabled could not be read or turned off ({e}): if it is 1, every tracer's figures include the stats' cost"
                );
                StatsSysctlOff { _restore: None }
            }
        }
    }
}
