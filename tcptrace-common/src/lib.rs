//! The wire format between the eBPF program and the daemon: one fixed-size `#[repr(C)]`
//! event per TCP state change, the tracepoint layout the daemon hands to the program, and
//! the indices of the program's per-CPU counters. Defined once, used by both sides.
#![no_std]

/// One TCP state change as the kernel program writes it into the ring buffer.
///
/// Addresses are in network byte order as the tracepoint stores them; for AF_INET only the
/// first four bytes of `saddr`/`daddr` are meaningful. Ports are host order (the tracepoint
/// already converts them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateEvent {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the `struct sock`; reused by the kernel after the socket is freed.
    pub skaddr: u64,
    /// Identity of the connection, unique for the program's lifetime even when `skaddr` is
    /// reused: assigned when a socket starts a life (connect, listen, a new child of a
    /// listener) or is first seen, and forgotten when it reaches CLOSE.
    pub conn_id: u64,
    /// `bpf_get_current_pid_tgid()` of whatever task was running (tgid << 32 | pid).
    pub pid_tgid: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// `bpf_get_current_comm()`; NUL-padded.
    pub comm: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    pub oldstate: u8,
    pub newstate: u8,
    /// `EVENT_F_*` bits.
    pub flags: u32,
    /// CPU the event fired on.
    pub cpu: u32,
    /// The socket's owner, recorded in the owner's own context (connect, listen, accept,
    /// close); valid when `EVENT_F_OWNER_KNOWN` is set. Unlike `pid_tgid`/`comm`, which
    /// name whatever task ran when the event fired (often a softirq's random victim).
    pub owner: Owner,
    /// Inode number of the socket's network namespace; 0 when it could not be read.
    pub netns: u32,
    pub _pad: u32,
}

/// The process that owns a socket, as seen from inside that process's own system call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    pub tgid: u32,
    pub pid: u32,
    pub uid: u32,
    /// `OWNER_SRC_*`: which call the owner was recorded at.
    pub source: u32,
    /// cgroup v2 id of the owner (`bpf_get_current_cgroup_id`).
    pub cgroup_id: u64,
    pub comm: [u8; 16],
}

pub const OWNER_SRC_NONE: u32 = 0;
pub const OWNER_SRC_CONNECT: u32 = 1;
pub const OWNER_SRC_LISTEN: u32 = 2;
pub const OWNER_SRC_CLOSE: u32 = 3;
/// Inherited from the listener when the kernel created the child: the socket sits in that
/// listener's accept queue until some process's close() names its real owner.
pub const OWNER_SRC_LISTENER: u32 = 4;
/// Recorded when the owner's accept() returned the socket.
pub const OWNER_SRC_ACCEPT: u32 = 5;

/// What the kernel keeps per socket (key: skaddr): identity, owner and last tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockInfo {
    pub conn_id: u64,
    pub owner: Owner,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    /// 1 for a listener's child whose owner is not known yet (no accept seen).
    pub unaccepted: u8,
    /// The TCP state the socket is in (after its last event). CLOSE marks an ended life's
    /// entry (a tombstone), kept for the next socket at the same address to reuse in place.
    pub state: u8,
    /// Inode number of the socket's network namespace; 0 unknown.
    pub netns: u32,
    /// 1 for a timewait socket first seen at its end (it predates the program).
    pub midlife: u8,
    pub _pad: [u8; 3],
}

/// Size of [`StateEvent`] on the wire; the decoder checks it.
pub const STATE_EVENT_SIZE: usize = core::mem::size_of::<StateEvent>();

/// This event gave the socket a new `conn_id` at a transition that starts a life
/// (CLOSE→SYN_SENT, CLOSE→LISTEN, LISTEN→SYN_RECV).
pub const EVENT_F_NEW_CONN: u32 = 1 << 0;
/// The socket was first seen mid-life (it predates the program): its history is partial.
pub const EVENT_F_MIDLIFE: u32 = 1 << 1;
/// The connection-identity map was full, so `conn_id` could not be remembered for this
/// socket; later events of it will look mid-life. Counted in `COUNTER_SOCK_MAP_FULL`.
pub const EVENT_F_UNTRACKED: u32 = 1 << 2;
/// `owner` is valid.
pub const EVENT_F_OWNER_KNOWN: u32 = 1 << 3;
/// A listener's child that no process has accepted yet (it sits in the accept queue).
pub const EVENT_F_UNACCEPTED: u32 = 1 << 4;
/// Not a state change (`oldstate == newstate`): the owner's accept() returned the socket.
pub const EVENT_F_ACCEPT: u32 = 1 << 5;
/// The event is about the socket's timewait mini-socket (TIME_WAIT, or FIN_WAIT2 after
/// the application closed), which the kernel's state tracepoint never reports.
pub const EVENT_F_TIMEWAIT: u32 = 1 << 6;
/// Not a state change (`oldstate == newstate`, its last known state): the connection's
/// socket is gone, its end unseen. A new life started at its socket's address, which the
/// kernel frees only after the socket's end; that end was lost (a recursion miss).
pub const EVENT_F_VANISHED: u32 = 1 << 7;

/// Whether an event is no state change: an accept, a timewait handoff (`old → old`), or a
/// vanished connection.
/// The program counts the ones it loses apart from transitions by this, and the daemon
/// classifies the ones it receives by it, so the two always agree.
#[inline(always)]
pub fn changes_no_state(flags: u32, old: u8, new: u8) -> bool {
    flags & (EVENT_F_ACCEPT | EVENT_F_VANISHED) != 0
        || (flags & EVENT_F_TIMEWAIT != 0 && old == new)
}

/// Bytes at the start of the `inet_sock_set_state` record the program copies with direct
/// context loads (one instruction per word, where a helper call per field costs tens of
/// nanoseconds). Every field it reads must lie within, past the 8 bytes of common fields,
/// and the record must be at least this long (it is 72 bytes from 4.16 to 6.18, with a u8
/// or a u16 protocol); the daemon checks the live layout.
pub const TP_RECORD_BYTES: usize = 72;

/// Byte offsets of the `sock:inet_sock_set_state` fields in the raw tracepoint record,
/// read by the daemon from tracefs and written into the program's read-only globals before
/// load. The layout changed across kernels (`protocol` was a u8 before 5.6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracepointLayout {
    pub skaddr: u16,
    pub oldstate: u16,
    pub newstate: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    /// 1 or 2 bytes.
    pub protocol_size: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    /// Nonzero once the daemon filled this in; the program refuses to guess.
    pub valid: u16,
    pub _pad: u16,
}

/// Byte offsets of kernel struct fields, read by the daemon from the kernel's BTF
/// (`/sys/kernel/btf/vmlinux`) and the address of `tw_timer_handler` from /proc/kallsyms,
/// written into a read-only global before load. Each `KOFF_*` bit in `valid` enables the
/// hook that needs those offsets; without it that hook does nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `KOFF_*` bits.
    pub valid: u32,
    /// task_struct.files
    pub task_files: u32,
    /// files_struct.fdt
    pub files_fdt: u32,
    /// fdtable.fd
    pub fdt_fd: u32,
    /// file.private_data
    pub file_private_data: u32,
    /// socket.sk
    pub socket_sk: u32,
    /// sock_common.skc_net (possible_net_t: its first word is the `struct net *`)
    pub skc_net: u32,
    /// net.ns.inum
    pub net_inum: u32,
    /// sock_common.skc_num (local port, host order)
    pub skc_num: u32,
    /// sock_common.skc_dport (remote port, network order)
    pub skc_dport: u32,
    /// sock_common.skc_family
    pub skc_family: u32,
    /// sock_common.skc_rcv_saddr / skc_daddr (IPv4, network order)
    pub skc_rcv_saddr: u32,
    pub skc_daddr: u32,
    /// sock_common.skc_v6_rcv_saddr / skc_v6_daddr
    pub skc_v6_rcv_saddr: u32,
    pub skc_v6_daddr: u32,
    /// inet_timewait_sock.tw_timer
    pub tw_timer: u32,
    /// inet_timewait_sock.tw_substate
    pub tw_substate: u32,
    /// timer_list.function
    pub timer_function: u32,
    /// timer_list.expires (jiffies)
    pub timer_expires: u32,
    /// Nanoseconds per jiffy (1e9 / CONFIG_HZ); 0 when unknown.
    pub jiffy_ns: u32,
    /// Kernel address of `tw_timer_handler`, the timer function of every timewait socket.
    pub tw_handler: u64,
}

/// accept() hooks: task → fd table → file → socket → sock.
pub const KOFF_ACCEPT: u32 = 1 << 0;
/// The socket's network namespace.
pub const KOFF_NETNS: u32 = 1 << 1;
/// Timewait sockets through the timer tracepoints.
pub const KOFF_TIMEWAIT: u32 = 1 << 2;

/// An address prefix for the in-kernel filters. `family` is AF_INET or AF_INET6; a v4 prefix
/// also matches IPv4-mapped IPv6 addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr {
    pub addr: [u8; 16],
    pub family: u16,
    pub prefix_len: u8,
    pub _pad: [u8; 5],
}

pub const MAX_FILTER_PORTS: usize = 8;
pub const FILTER_FAMILY: u32 = 1 << 0;
pub const FILTER_PORTS: u32 = 1 << 1;
pub const FILTER_LADDR: u32 = 1 << 2;
pub const FILTER_RADDR: u32 = 1 << 3;
pub const FILTER_PID: u32 = 1 << 4;
pub const FILTER_COMM: u32 = 1 << 5;
pub const FILTER_NETNS: u32 = 1 << 6;

/// In-kernel filters, written by the daemon into a read-only global before load, so that
/// filtered-out transitions never reach the ring buffer. All set filters must match.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// `FILTER_*` bits of the filters in use; 0 keeps everything.
    pub flags: u32,
    /// Owner's process id (tgid), with `FILTER_PID`.
    pub pid: u32,
    /// AF_INET or AF_INET6, with `FILTER_FAMILY`.
    pub family: u16,
    pub n_ports: u16,
    /// Local or remote port, any of the first `n_ports`.
    pub ports: [u16; MAX_FILTER_PORTS],
    pub _pad: u32,
    pub laddr: Cidr,
    pub raddr: Cidr,
    /// Owner's comm, NUL-padded, with `FILTER_COMM`.
    pub comm: [u8; 16],
    /// The socket's network namespace inode, with `FILTER_NETNS`.
    pub netns: u32,
    pub _pad2: u32,
}

/// Per-CPU counters kept by the program, indices into its `COUNTERS` array.
pub const COUNTER_SUBMITTED: u32 = 0;
/// A ring-buffer reserve failed for a state transition: it is lost, and counted here.
pub const COUNTER_RINGBUF_FULL: u32 = 1;
/// A read of the tracepoint record failed: the event is lost, and counted here.
pub const COUNTER_READ_ERROR: u32 = 2;
/// The connection-identity map was full (see `EVENT_F_UNTRACKED`).
pub const COUNTER_SOCK_MAP_FULL: u32 = 3;
/// TCP transitions the in-kernel filters dropped (on purpose; not a loss).
pub const COUNTER_FILTERED: u32 = 4;
/// A `→ CLOSE` event found the ring buffer full and went to `DEFERRED_CLOSES` instead,
/// which the daemon empties after the ring buffer: delivered late, not lost.
pub const COUNTER_DEFERRED: u32 = 5;
/// A ring-buffer reserve failed for an event that is no state change (an accept, or a
/// timewait handoff): lost and counted here, apart from the transitions, so that each
/// count can be checked against what did arrive.
pub const COUNTER_RINGBUF_FULL_OTHER: u32 = 6;
pub const COUNTER_COUNT: u32 = 7;

/// Capacity of the queue of deferred `→ CLOSE` events (144 bytes each). A connection whose
/// end is lost stays in the engine until evicted; this keeps bursts from doing that.
pub const DEFERRED_CLOSES: u32 = 16384;

/// Default capacity of the kernel map that carries identity and owner across a socket's
/// events (~130 bytes each, preallocated); `--max-sockets` changes it at load time.
pub const SOCK_MAP_ENTRIES: u32 = 131_072;

pub const IPPROTO_TCP: u16 = 6;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are #[repr(C)], contain only integers and arrays of integers, and have
    // no padding the compiler could leave uninitialised (checked by the size asserts).
    unsafe impl aya::Pod for super::StateEvent {}
    unsafe impl aya::Pod for super::TracepointLayout {}
    unsafe impl aya::Pod for super::SockInfo {}
    unsafe impl aya::Pod for super::Filter {}
    unsafe impl aya::Pod for super::KernelOffsets {}
}

const _: () = assert!(core::mem::size_of::<StateEvent>() == 144);
const _: () = assert!(core::mem::size_of::<Owner>() == 40);
const _: () = assert!(core::mem::size_of::<SockInfo>() == 96);
const _: () = assert!(core::mem::size_of::<TracepointLayout>() == 28);
const _: () = assert!(core::mem::size_of::<Cidr>() == 24);
const _: () = assert!(core::mem::size_of::<Filter>() == 104);
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 88);
