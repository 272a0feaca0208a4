//! `inet_sock_set_state` → `EVENTS`. Every connection gets an identity that survives
//! `struct sock` reuse and an owner recorded in the owner's own context, both kept in
//! `SOCKS` and stamped on every event of the connection. Field offsets come from the
//! daemon (read from the live tracefs `format` file) through the read-only global `LAYOUT`.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_F_NO_COMMON_LRU, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_current_uid_gid, bpf_get_smp_processor_id, bpf_jiffies64, bpf_ktime_get_ns,
        bpf_probe_read_kernel, generated,
    },
    macros::{map, tracepoint},
    maps::{Array, LruHashMap, PerCpuArray, Queue, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::error;
use tcptrace_common::{
    AF_INET, AF_INET6, COUNTER_COUNT, COUNTER_DEFERRED, COUNTER_FILTERED, COUNTER_READ_ERROR,
    COUNTER_RINGBUF_FULL, COUNTER_RINGBUF_FULL_OTHER, COUNTER_SOCK_MAP_FULL, COUNTER_SUBMITTED,
    Cidr, DEFERRED_CLOSES, EVENT_F_ACCEPT, EVENT_F_MIDLIFE, EVENT_F_NEW_CONN, EVENT_F_OWNER_KNOWN,
    EVENT_F_TIMEWAIT, EVENT_F_UNACCEPTED, EVENT_F_UNTRACKED, EVENT_F_VANISHED, FILTER_COMM,
    FILTER_FAMILY, FILTER_LADDR, FILTER_NETNS, FILTER_PID, FILTER_PORTS, FILTER_RADDR, Filter,
    IPPROTO_TCP, KOFF_ACCEPT, KOFF_NETNS, KOFF_TIMEWAIT, KernelOffsets, MAX_FILTER_PORTS,
    OWNER_SRC_ACCEPT, OWNER_SRC_CLOSE, OWNER_SRC_CONNECT, OWNER_SRC_LISTEN, OWNER_SRC_LISTENER,
    OWNER_SRC_NONE, Owner, SOCK_MAP_ENTRIES, SockInfo, StateEvent, TP_RECORD_BYTES,
    TracepointLayout, changes_no_state,
};

const TCP_ESTABLISHED: u8 = 1;
const TCP_SYN_SENT: u8 = 2;
const TCP_SYN_RECV: u8 = 3;
const TCP_FIN_WAIT1: u8 = 4;
const TCP_FIN_WAIT2: u8 = 5;
const TCP_TIME_WAIT: u8 = 6;
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;
const TCP_LISTEN: u8 = 10;
const TCP_CLOSING: u8 = 11;

/// TCP_TIMEWAIT_LEN: a timewait socket's timer is rearmed to this when it enters TIME_WAIT.
const TIMEWAIT_LEN_SECS: u64 = 60;

/// Written by the daemon before load (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
static LAYOUT: TracepointLayout = TracepointLayout {
    skaddr: 0,
    oldstate: 0,
    newstate: 0,
    sport: 0,
    dport: 0,
    family: 0,
    protocol: 0,
    protocol_size: 0,
    saddr: 0,
    daddr: 0,
    saddr_v6: 0,
    daddr_v6: 0,
    valid: 0,
    _pad: 0,
};

/// In-kernel filters, written by the daemon before load.
#[unsafe(no_mangle)]
static FILTER: Filter = Filter {
    flags: 0,
    pid: 0,
    family: 0,
    n_ports: 0,
    ports: [0; MAX_FILTER_PORTS],
    _pad: 0,
    laddr: Cidr {
        addr: [0; 16],
        family: 0,
        prefix_len: 0,
        _pad: [0; 5],
    },
    raddr: Cidr {
        addr: [0; 16],
        family: 0,
        prefix_len: 0,
        _pad: [0; 5],
    },
    comm: [0; 16],
    netns: 0,
    _pad2: 0,
};

/// Kernel struct offsets and `tw_timer_handler`'s address, written by the daemon before load.
#[unsafe(no_mangle)]
static KOFFS: KernelOffsets = KernelOffsets {
    valid: 0,
    task_files: 0,
    files_fdt: 0,
    fdt_fd: 0,
    file_private_data: 0,
    socket_sk: 0,
    skc_net: 0,
    net_inum: 0,
    skc_num: 0,
    skc_dport: 0,
    skc_family: 0,
    skc_rcv_saddr: 0,
    skc_daddr: 0,
    skc_v6_rcv_saddr: 0,
    skc_v6_daddr: 0,
    tw_timer: 0,
    tw_substate: 0,
    timer_function: 0,
    timer_expires: 0,
    jiffy_ns: 0,
    tw_handler: 0,
};

/// Bytes of unread data above which a submit wakes the reader. Below it the reader is not
/// woken per event (the expensive part of a ring buffer) and picks the data up on its own
/// short timer instead, which bounds the latency.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = 0;

/// The ring buffer's size in bytes, written by the daemon with the map's size.
#[unsafe(no_mangle)]
static RING_BYTES: u64 = 0;

/// Ended lives' entries (tombstones) `SOCKS` keeps for reuse, at most: written by the
/// daemon, a quarter of the map, so that they never crowd out live connections (an LRU map
/// evicts by age: a leaked socket's entry as soon as an ended life's). 0: none.
#[unsafe(no_mangle)]
static MAX_TOMBSTONES: i64 = 0;

/// Tombstones made minus tombstones reused, as the CPUs have reported them: each CPU adds
/// its changes here in batches of `TOMBSTONE_BATCH`, with an atomic add. One shared count
/// changed at every close and reuse cost ~90 ns per program run (both CPUs writing one
/// line); counts kept per CPU alone drift apart where one CPU ends lives and another starts
/// them at the same addresses (+16,384 against -14,000 within seconds under the bench's
/// load), and the first stops making tombstones while the map holds few.
#[map]
static TOMBSTONES: Array<i64> = Array::with_max_entries(1, 0);

/// This CPU's changes to the count not yet added to `TOMBSTONES`: less than a batch either
/// way, so the map holds at most `MAX_TOMBSTONES` plus a batch per CPU.
#[map]
static TOMBSTONES_PENDING: PerCpuArray<i64> = PerCpuArray::with_max_entries(1, 0);

const TOMBSTONE_BATCH: i64 = 64;

/// Size is set by the daemon at load time.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 24, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// `→ CLOSE` events that found the ring buffer full. Losing one would leave its connection
/// open in the daemon until evicted (memory that grows under sustained overload), so these
/// wait here, whole, and the daemon pops them after each drain of the ring buffer. Only a
/// failed reserve pays for this.
#[map]
static DEFERRED: Queue<StateEvent> = Queue::with_max_entries(DEFERRED_CLOSES, 0);

/// Where a deferred event is built: 144 bytes do not fit on the stack next to the rest.
#[map]
static DEFERRED_SCRATCH: PerCpuArray<StateEvent> = PerCpuArray::with_max_entries(1, 0);

/// Sequence for connection ids, per CPU (the id carries the CPU, so no atomics are needed).
#[map]
static ID_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// skaddr → identity, owner and tuple of the socket's current life. LRU so that sockets
/// whose CLOSE we never see (lost event, predates us) cannot fill it up; per-CPU LRU lists
/// (BPF_F_NO_COMMON_LRU) so that CPUs churning connections don't contend on one lock.
#[map]
static SOCKS: LruHashMap<u64, SockInfo> =
    LruHashMap::with_max_entries(SOCK_MAP_ENTRIES, BPF_F_NO_COMMON_LRU);

/// Listening port → the listener's owner, so that a child the kernel creates for it
/// (LISTEN→SYN_RECV, in softirq) starts life with the owner of its accept queue.
#[map]
static LISTENERS: LruHashMap<u16, Owner> = LruHashMap::with_max_entries(4096, 0);

/// Timewait socket (its address) → the connection it continues: identity, owner, tuple and
/// its current substate (TIME_WAIT, or FIN_WAIT2 when the application closed first).
#[map]
static TWS: LruHashMap<u64, SockInfo> = LruHashMap::with_max_entries(SOCK_MAP_ENTRIES, 0);

/// A timewait socket just armed on this CPU, waiting for the full socket's X→CLOSE that
/// follows in the same call (tcp_time_wait: arm the timer, then tcp_done).
#[repr(C)]
#[derive(Clone, Copy)]
struct PendingTw {
    tw: u64,
    sport: u16,
    substate: u8,
    _pad: [u8; 5],
}

#[map]
static PENDING_TW: PerCpuArray<PendingTw> = PerCpuArray::with_max_entries(1, 0);

/// A timewait socket's timer just cancelled on this CPU: either a rearm (timer_start of the
/// same timer follows at once), an expiry (timer_expire_entry follows), or the socket's
/// end (killed for reuse or by a reset), which is concluded by whatever runs next here.
#[repr(C)]
#[derive(Clone, Copy)]
struct PendingCancel {
    tw: u64,
    ts_ns: u64,
    /// jiffies when cancelled, and the timewait socket's substate and timer expiry read
    /// then (once killed, the socket is freed).
    jiffies: u64,
    expires: u64,
    /// The connection the timewait socket carried when cancelled: by the time the cancel
    /// is settled, another CPU may have reused the freed socket's address for a new one.
    conn_id: u64,
    substate: u8,
    _pad: [u8; 7],
}

#[map]
static PENDING_CANCEL: PerCpuArray<PendingCancel> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn bump(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; our programs don't nest on one CPU.
        unsafe { *c += 1 };
    }
}

/// Counts a tombstone made (`1`, only while the count is under `MAX_TOMBSTONES`: false when
/// there is no room) or reused (`-1`).
#[inline(always)]
fn tombstones_add(delta: i64) -> bool {
    let (Some(all), Some(mine)) = (TOMBSTONES.get_ptr_mut(0), TOMBSTONES_PENDING.get_ptr_mut(0))
    else {
        return false;
    };
    // SAFETY: `mine` is this CPU's slot (our programs don't nest on one CPU); `all` is the
    // map's one i64, aligned, read as it stands and changed only by an atomic add.
    unsafe {
        if delta > 0 && core::ptr::read_volatile(all) + *mine >= ro(&MAX_TOMBSTONES) {
            return false;
        }
        *mine += delta;
        if *mine >= TOMBSTONE_BATCH || *mine <= -TOMBSTONE_BATCH {
            // BPF_ATOMIC add, its result unused (core's AtomicI64 is not offered on this
            // target: no compare-and-swap before BPF v3).
            core::intrinsics::atomic_xadd::<i64, i64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                all, *mine,
            );
            *mine = 0;
        }
    }
    true
}

#[inline(always)]
fn next_conn_id(cpu: u32) -> u64 {
    let seq = match ID_SEQ.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; our programs don't nest on one CPU.
        Some(p) => unsafe {
            *p += 1;
            *p
        },
        None => 0,
    };
    // 12 bits of CPU keep ids unique across CPUs without atomics.
    (seq << 12) | u64::from(cpu & 0xfff)
}

/// Makes the current task the owner in `dst`, written in place; false (and `dst` left as
/// it was) in kernel context, where there is no process to name.
#[inline(always)]
fn set_current_owner(dst: &mut Owner, source: u32) -> bool {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == 0 {
        return false;
    }
    dst.tgid = tgid;
    dst.pid = pid_tgid as u32;
    dst.uid = bpf_get_current_uid_gid() as u32;
    dst.source = source;
    // SAFETY: helper without arguments, allowed for tracing programs.
    dst.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    current_comm_into(&mut dst.comm);
    true
}

/// The current task's name, written straight into `dst` (zero-padded by the helper, and
/// zeroed by it on failure). Through a temporary array, the compiler zeroes and copies it
/// with calls to the linker's byte-at-a-time memset and memmove.
#[inline(always)]
fn current_comm_into(dst: &mut [u8; 16]) {
    // SAFETY: the helper writes at most 16 bytes into `dst`.
    unsafe { generated::bpf_get_current_comm(dst.as_mut_ptr().cast(), 16) };
}

/// Copies a value made of whole 8-byte words, word by word. A plain assignment of a struct
/// or an array is lowered to a call to the linker's memmove, a byte-at-a-time loop on BPF
/// (eight instructions a byte: 96 bytes cost ~800 instructions, as much as the rest of the
/// program's own code).
///
/// # Safety
/// Both pointers valid for a `T` and aligned to 8.
#[inline(always)]
unsafe fn copy_words<T>(dst: *mut T, src: *const T) {
    const { assert!(core::mem::size_of::<T>().is_multiple_of(8)) };
    let (d, s) = (dst.cast::<u64>(), src.cast::<u64>());
    for i in 0..core::mem::size_of::<T>() / 8 {
        // SAFETY: within both values, by the size assertion and the caller's promise.
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
    }
}

/// Zeroes a value made of whole 8-byte words in place, without the memset call that a
/// `Default`/`zeroed` value (or any move of one) is lowered to.
///
/// # Safety
/// `dst` valid for a `T`, aligned to 8; all-zero bytes must be a valid `T`.
#[inline(always)]
unsafe fn zero_words<T>(dst: *mut T) {
    const { assert!(core::mem::size_of::<T>().is_multiple_of(8)) };
    let d = dst.cast::<u64>();
    for i in 0..core::mem::size_of::<T>() / 8 {
        // SAFETY: within the value, by the size assertion and the caller's promise.
        unsafe { core::ptr::write_volatile(d.add(i), 0) };
    }
}

/// Which transitions run in the owner's own system call, so `current` is the owner:
/// connect(), listen(), and close()/shutdown() (→FIN_WAIT1, CLOSE_WAIT→LAST_ACK). Every
/// other transition may fire in softirq on behalf of whatever task was interrupted.
#[inline(always)]
fn owner_source(old: u8, new: u8) -> u32 {
    match (old, new) {
        (TCP_CLOSE, TCP_SYN_SENT) => OWNER_SRC_CONNECT,
        (TCP_CLOSE, TCP_LISTEN) => OWNER_SRC_LISTEN,
        (TCP_ESTABLISHED | TCP_SYN_RECV, TCP_FIN_WAIT1) | (TCP_CLOSE_WAIT, TCP_LAST_ACK) => {
            OWNER_SRC_CLOSE
        }
        _ => OWNER_SRC_NONE,
    }
}

/// A field of one of our read-only globals, read without letting the compiler fold the
/// initialiser the daemon overrides, and without copying the whole struct onto the
/// 512-byte stack.
#[inline(always)]
fn ro<T: Copy>(field: &T) -> T {
    // SAFETY: a valid, aligned reference to our own global.
    unsafe { core::ptr::read_volatile(field) }
}

/// Whether `addr` (of a socket of `family`) is inside `cidr`. A v4 prefix also matches a
/// v4-mapped v6 address.
#[inline(always)]
fn in_cidr(cidr: &Cidr, family: u16, addr: &[u8; 16]) -> bool {
    // Compared as big-endian words under a mask, read at constant indices: a local copy of
    // the address would be zeroed and filled with memset/memmove calls (see `copy_words`),
    // and the verifier refuses the pointer arithmetic of a slice walk.
    let prefix = u32::from(ro(&cidr.prefix_len));
    let want = &cidr.addr;
    if ro(&cidr.family) == AF_INET {
        let a = if family == AF_INET {
            be32(addr, 0)
        } else if be64(addr, 0) == 0 && be32(addr, 8) == 0xffff {
            be32(addr, 12)
        } else {
            return false;
        };
        let mask = match prefix {
            0 => 0,
            p => u32::MAX << (32 - p.min(32)),
        };
        return (a ^ be32_ro(want, 0)) & mask == 0;
    }
    if family != AF_INET6 {
        return false;
    }
    let p = prefix.min(128);
    let mhi = match p {
        0 => 0,
        p if p >= 64 => u64::MAX,
        p => u64::MAX << (64 - p),
    };
    let mlo = if p <= 64 { 0 } else { u64::MAX << (128 - p) };
    let whi = u64::from(be32_ro(want, 0)) << 32 | u64::from(be32_ro(want, 4));
    let wlo = u64::from(be32_ro(want, 8)) << 32 | u64::from(be32_ro(want, 12));
    (be64(addr, 0) ^ whi) & mhi == 0 && (be64(addr, 8) ^ wlo) & mlo == 0
}

/// The big-endian u32 at `at` (a constant) of an address.
#[inline(always)]
fn be32(b: &[u8; 16], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The big-endian u64 at `at` (a constant) of an address.
#[inline(always)]
fn be64(b: &[u8; 16], at: usize) -> u64 {
    u64::from(be32(b, at)) << 32 | u64::from(be32(b, at + 4))
}

/// `be32` of one of our read-only globals.
#[inline(always)]
fn be32_ro(b: &[u8; 16], at: usize) -> u32 {
    u32::from_be_bytes([ro(&b[at]), ro(&b[at + 1]), ro(&b[at + 2]), ro(&b[at + 3])])
}

/// The filters that need no state: family, ports, addresses. Evaluated before any map
/// work, so a filtered-out transition costs only its field reads.
#[inline(always)]
fn keep_tuple(
    flags: u32,
    family: u16,
    sport: u16,
    dport: u16,
    saddr: &[u8; 16],
    daddr: &[u8; 16],
) -> bool {
    if flags & FILTER_FAMILY != 0 && family != ro(&FILTER.family) {
        return false;
    }
    if flags & FILTER_PORTS != 0 {
        let n = usize::from(ro(&FILTER.n_ports));
        let mut hit = false;
        for i in 0..MAX_FILTER_PORTS {
            let p = ro(&FILTER.ports[i]);
            if i < n && (p == sport || p == dport) {
                hit = true;
            }
        }
        if !hit {
            return false;
        }
    }
    if flags & FILTER_LADDR != 0 && !in_cidr(&FILTER.laddr, family, saddr) {
        return false;
    }
    if flags & FILTER_RADDR != 0 && !in_cidr(&FILTER.raddr, family, daddr) {
        return false;
    }
    true
}

/// The filters on the socket's owner (never on the task that happened to run).
#[inline(always)]
fn keep_owner(flags: u32, owner: &Owner) -> bool {
    if flags & (FILTER_PID | FILTER_COMM) == 0 {
        return true;
    }
    if owner.source == OWNER_SRC_NONE {
        return false;
    }
    if flags & FILTER_PID != 0 && owner.tgid != ro(&FILTER.pid) {
        return false;
    }
    if flags & FILTER_COMM != 0 {
        for (have, want) in owner.comm.iter().zip(FILTER.comm.iter()) {
            if *have != ro(want) {
                return false;
            }
        }
    }
    true
}

/// The first `TP_RECORD_BYTES` of the tracepoint record, copied with direct context loads:
/// one instruction per word, where reading each field with `bpf_probe_read_kernel` cost a
/// helper call apiece (a tenth of the program's time). The verifier allows any aligned
/// read of a tracepoint context at a constant offset from 8 on, hence the unrolled copy;
/// the attach refuses a program that reads past the record, hence its exact size. Kept in a
/// per-CPU slot, not on the program's 512-byte stack, which is nearly full.
#[map]
static RECORD: PerCpuArray<[u64; TP_RECORD_WORDS]> = PerCpuArray::with_max_entries(1, 0);

const TP_RECORD_WORDS: usize = TP_RECORD_BYTES / 8;

struct Record(*const [u64; TP_RECORD_WORDS]);

impl Record {
    #[inline(always)]
    fn copy(ctx: &TracePointContext) -> Option<Record> {
        let p = ctx.as_ptr() as *const u64;
        let slot = RECORD.get_ptr_mut(0)?;
        macro_rules! words {
            ($($i:literal)*) => {$(
                // SAFETY: an aligned read of the context at a constant offset within the
                // record buffer, which the verifier checks; `slot` is this CPU's own.
                unsafe { (*slot)[$i] = core::ptr::read_volatile(p.add($i)) };
            )*};
        }
        // Word 0 (the common fields) is not ours to read: the verifier refuses offsets below 8.
        words!(1 2 3 4 5 6 7 8);
        Some(Record(slot))
    }

    /// The field at byte offset `off` (from the daemon's layout, which keeps every field
    /// inside the copy; the clamp is for the verifier).
    #[inline(always)]
    fn field<T: Copy>(&self, off: u16) -> T {
        let off = usize::from(off).min(TP_RECORD_BYTES - core::mem::size_of::<T>());
        // SAFETY: in bounds by the clamp, in this CPU's slot that nothing else writes
        // while the program runs.
        unsafe { core::ptr::read_unaligned(self.0.cast::<u8>().add(off).cast::<T>()) }
    }
}

const _: () = assert!(TP_RECORD_WORDS == 9, "Record::copy unrolls words 1 to 8");

// `copy_words` of addresses and owners between a `SockInfo` and a `StateEvent` needs them
// at 8-aligned offsets of 8-aligned structs.
const _: () = {
    use core::mem::{align_of, offset_of};
    assert!(align_of::<SockInfo>() == 8 && align_of::<StateEvent>() == 8);
    assert!(offset_of!(SockInfo, saddr) % 8 == 0 && offset_of!(SockInfo, daddr) % 8 == 0);
    assert!(offset_of!(SockInfo, owner) % 8 == 0 && offset_of!(StateEvent, owner) % 8 == 0);
    assert!(offset_of!(StateEvent, saddr) % 8 == 0 && offset_of!(StateEvent, daddr) % 8 == 0);
};

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    match try_inet_sock_set_state(&ctx) {
        Ok(()) => 0,
        Err(err) => {
            bump(COUNTER_READ_ERROR);
            // Rare by construction (a failed read of the tracepoint record): worth a log
            // line, which costs a second ring-buffer write, only because it is rare.
            error!(
                &ctx,
                "tcptrace: reading the tracepoint record failed: {}", err
            );
            0
        }
    }
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    let layout = &LAYOUT;
    if ro(&layout.valid) == 0 {
        return Ok(());
    }
    let Some(rec) = Record::copy(ctx) else {
        return Ok(());
    };
    let protocol: u16 = if ro(&layout.protocol_size) == 1 {
        u16::from(rec.field::<u8>(ro(&layout.protocol)))
    } else {
        rec.field::<u16>(ro(&layout.protocol))
    };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    settle_cancel(0);

    let skaddr: u64 = rec.field(ro(&layout.skaddr));
    let old = rec.field::<i32>(ro(&layout.oldstate)) as u8;
    let new = rec.field::<i32>(ro(&layout.newstate)) as u8;
    let family: u16 = rec.field(ro(&layout.family));
    let (saddr, daddr) = if family == AF_INET6 {
        (
            rec.field::<[u8; 16]>(ro(&layout.saddr_v6)),
            rec.field::<[u8; 16]>(ro(&layout.daddr_v6)),
        )
    } else {
        // The v6 fields of an AF_INET socket are not what we want; copy only the v4 ones.
        // Built as words: zeroing a byte array's tail is a memset call (see `copy_words`).
        let s: u32 = rec.field(ro(&layout.saddr));
        let d: u32 = rec.field(ro(&layout.daddr));
        // SAFETY: [u32; 4] and [u8; 16] have the same size, and any bytes are valid.
        unsafe {
            (
                core::mem::transmute::<[u32; 4], [u8; 16]>([s, 0, 0, 0]),
                core::mem::transmute::<[u32; 4], [u8; 16]>([d, 0, 0, 0]),
            )
        }
    };
    let sport: u16 = rec.field(ro(&layout.sport));
    let dport: u16 = rec.field(ro(&layout.dport));
    let filter_flags = ro(&FILTER.flags);
    if filter_flags != 0 && !keep_tuple(filter_flags, family, sport, dport, &saddr, &daddr) {
        bump(COUNTER_FILTERED);
        return Ok(());
    }
    // SAFETY: helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };

    let source = owner_source(old, new);
    let starts_life = (old == TCP_CLOSE && (new == TCP_SYN_SENT || new == TCP_LISTEN))
        || (old == TCP_LISTEN && new == TCP_SYN_RECV);
    let mut flags = 0u32;
    let found = SOCKS.get_ptr_mut(skaddr);
    // An ended life's entry is kept, marked CLOSE (a tombstone), for the next life at the
    // same address to reuse in place: the kernel reuses a freed socket's memory within
    // milliseconds, and an LRU map's insert and delete each take a lock and move a node
    // between lists (a quarter of this program's time under churn, `perf record -a`).
    // SAFETY: a map value we hold no other reference to; read only.
    let live = found.filter(|&p| unsafe { (*p).state } != TCP_CLOSE);
    let tombstone = found.is_some() && live.is_none();
    let existing = if starts_life {
        if let Some(p) = live {
            // SAFETY: a map value we hold no other reference to; read only.
            report_vanished(unsafe { &*p }, skaddr, filter_flags, cpu);
        }
        None
    } else {
        live
    };
    // Built in place and never moved: a move of it is a memmove call (see `copy_words`).
    let mut slot = core::mem::MaybeUninit::<SockInfo>::uninit();
    let info = slot.as_mut_ptr();
    match existing {
        // SAFETY: a map value (aligned to 8) we hold no other reference to; copied out.
        Some(p) => unsafe { copy_words(info, p) },
        None => {
            flags |= if starts_life {
                EVENT_F_NEW_CONN
            } else {
                EVENT_F_MIDLIFE
            };
            // SAFETY: our own local, aligned to 8; all-zero is a valid SockInfo.
            unsafe { zero_words(info) };
            // SAFETY: as above, now initialised.
            let info = unsafe { &mut *info };
            info.conn_id = next_conn_id(cpu);
            info.unaccepted = u8::from(old == TCP_LISTEN && new == TCP_SYN_RECV);
            info.netns = netns_of(skaddr);
        }
    }
    // SAFETY: initialised by one of the two arms.
    let info = unsafe { slot.assume_init_mut() };
    if filter_flags & FILTER_NETNS != 0 && info.netns != ro(&FILTER.netns) {
        bump(COUNTER_FILTERED);
        return Ok(());
    }
    if source != OWNER_SRC_NONE {
        set_current_owner(&mut info.owner, source);
    }
    if old == TCP_LISTEN && new == TCP_SYN_RECV {
        // SAFETY: a plain Owner copied out of the map.
        if let Some(o) = unsafe { LISTENERS.get(sport) }
            && o.tgid != 0
        {
            info.owner = Owner {
                source: OWNER_SRC_LISTENER,
                ..*o
            };
        }
    } else if old == TCP_CLOSE && new == TCP_LISTEN {
        // Two processes listening on one port (SO_REUSEPORT): whose queue a child joins
        // cannot be told, so the owner of that port becomes unknown rather than a guess.
        // SAFETY: a plain Owner copied out of the map.
        let shared = unsafe { LISTENERS.get(sport) }.is_some_and(|o| o.tgid != info.owner.tgid);
        let entry = if shared { Owner::default() } else { info.owner };
        let _ = LISTENERS.insert(sport, entry, 0);
    } else if old == TCP_LISTEN && new == TCP_CLOSE {
        let _ = LISTENERS.remove(sport);
    }
    info.saddr = saddr;
    info.daddr = daddr;
    info.sport = sport;
    info.dport = dport;
    info.family = family;
    info.state = new;

    if new == TCP_CLOSE {
        // This life is over: the next one on this skaddr gets a new identity (and this
        // entry, as a tombstone).
        if let Some(p) = existing {
            if tombstones_add(1) {
                // SAFETY: same map value as above, still ours for this program run.
                unsafe { (*p).state = TCP_CLOSE };
            } else {
                let _ = SOCKS.remove(skaddr);
            }
        }
        if matches!(old, TCP_FIN_WAIT1 | TCP_FIN_WAIT2 | TCP_CLOSING)
            && let Some(tw) = take_pending_tw(sport)
        {
            // The kernel just handed this connection to a timewait socket (tcp_time_wait
            // armed its timer a moment ago on this CPU): it goes on there, in `substate`.
            let (tw, substate) = tw;
            info.state = substate;
            if keep_owner(filter_flags, &info.owner) {
                let _ = insert_tw(&tw, info);
                // `old → old` when it stays in its state (FIN_WAIT2): a handoff, not a change.
                emit(info, tw, old, substate, flags | EVENT_F_TIMEWAIT, cpu, 0);
            } else {
                bump(COUNTER_FILTERED);
            }
            return Ok(());
        }
    } else if let Some(p) = existing.or(found) {
        // The connection's own entry, or the one of an ended (or vanished) life at this
        // address, reused. SAFETY: same map value as above, still ours for this program run.
        unsafe { copy_words(p, info) };
        if tombstone {
            tombstones_add(-1);
        }
    } else if insert_sock(&skaddr, info).is_err() {
        flags |= EVENT_F_UNTRACKED;
        bump(COUNTER_SOCK_MAP_FULL);
    }
    if keep_owner(filter_flags, &info.owner) {
        emit(info, skaddr, old, new, flags, cpu, 0);
    } else {
        bump(COUNTER_FILTERED);
    }
    Ok(())
}

/// A new life starts at `skaddr` while the map still holds `stale`, an earlier connection
/// of that address: the kernel frees a socket only after its end, so that end happened and
/// was missed (the kernel skipped this program: a recursion miss). The daemon is told, so
/// that it stops tracking a connection that no longer exists.
#[inline(always)]
fn report_vanished(stale: &SockInfo, skaddr: u64, filter_flags: u32, cpu: u32) {
    if keep_owner(filter_flags, &stale.owner) {
        emit(
            stale,
            skaddr,
            stale.state,
            stale.state,
            EVENT_F_VANISHED,
            cpu,
            0,
        );
    }
}

/// Reads a kernel value at `base + off`.
#[inline(always)]
fn kread<T>(base: u64, off: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel tolerates any address; offsets come from BTF.
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const T) }.map_err(i64::from)
}

/// Inode number of the network namespace of the socket (or timewait socket) at `sk`; 0
/// when unknown.
#[inline(always)]
fn netns_of(sk: u64) -> u32 {
    if ro(&KOFFS.valid) & KOFF_NETNS == 0 {
        return 0;
    }
    let Ok(net) = kread::<u64>(sk, ro(&KOFFS.skc_net)) else {
        return 0;
    };
    kread::<u32>(net, ro(&KOFFS.net_inum)).unwrap_or(0)
}

/// The timewait socket armed on this CPU for the full socket with local port `sport`, if
/// any; clears the slot either way.
#[inline(always)]
fn take_pending_tw(sport: u16) -> Option<(u64, u8)> {
    if ro(&KOFFS.valid) & KOFF_TIMEWAIT == 0 {
        return None;
    }
    let p = PENDING_TW.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot; our programs don't nest on one CPU.
    let slot = unsafe { &mut *p };
    let tw = slot.tw;
    slot.tw = 0;
    (tw != 0 && slot.sport == sport).then_some((tw, slot.substate))
}

/// A timewait socket's end at `ts_ns` (`jiffies` then), with its substate and timer expiry
/// as last read: reported as `its state → CLOSE`, preceded by FIN_WAIT2 → TIME_WAIT if the
/// peer's FIN moved it there silently (a rearm within the same timer-wheel bucket emits no
/// timer tracepoint). That rearm set expires = then + 60 s, so the time it entered
/// TIME_WAIT is known to a jiffy. `conn_id` (0: any) is the connection it must still carry:
/// if the address now holds another one, that one is not ended.
#[inline(always)]
fn end_tw(tw: u64, conn_id: u64, ts_ns: u64, jiffies: u64, substate: u8, expires: u64) {
    // SAFETY: a map value copied out.
    let Some(mut info) = (unsafe { TWS.get(tw) }).copied() else {
        return;
    };
    if conn_id != 0 && info.conn_id != conn_id {
        return;
    }
    let _ = TWS.remove(tw);
    // SAFETY: helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    // `emit` adds EVENT_F_MIDLIFE for a socket first seen here.
    let flags = EVENT_F_TIMEWAIT;
    if substate == TCP_TIME_WAIT && info.state == TCP_FIN_WAIT2 {
        let jiffy_ns = u64::from(ro(&KOFFS.jiffy_ns));
        let mut at = ts_ns;
        if let Some(hz) = 1_000_000_000u64.checked_div(jiffy_ns) {
            let entered = expires.wrapping_sub(TIMEWAIT_LEN_SECS * hz);
            let ago = jiffies.wrapping_sub(entered);
            if ago <= TIMEWAIT_LEN_SECS * hz * 2 {
                at = ts_ns.saturating_sub(ago * jiffy_ns);
            }
        }
        emit(&info, tw, TCP_FIN_WAIT2, TCP_TIME_WAIT, flags, cpu, at);
        info.state = TCP_TIME_WAIT;
    }
    emit(&info, tw, info.state, TCP_CLOSE, flags, cpu, ts_ns);
}

/// The local and remote port of the timewait socket at `tw`.
#[inline(always)]
fn tw_ports(tw: u64) -> Option<(u16, u16)> {
    let sport = kread::<u16>(tw, ro(&KOFFS.skc_num)).ok()?;
    let dport = kread::<u16>(tw, ro(&KOFFS.skc_dport)).ok()?;
    Some((sport, u16::from_be(dport)))
}

/// Whether the connection `info`, tracked at timewait socket address `tw`, is no longer
/// the one there: its socket was killed (for reuse of its port, or by a reset) and freed,
/// and the address now holds a new timewait socket, while the cancel that would have ended
/// the old one is still pending on the CPU that killed it. The new socket has other ports,
/// or is in FIN_WAIT2 where the old one had reached TIME_WAIT, which it never leaves.
#[inline(always)]
fn tw_entry_stale(info: &SockInfo, ports: (u16, u16), substate: u8) -> bool {
    (info.sport, info.dport) != ports || (info.state == TCP_TIME_WAIT && substate == TCP_FIN_WAIT2)
}

/// A timewait socket we never saw created (it predates the program): starts following it
/// from its own fields, if the filters keep it, so that its end is reported (mid-life).
#[inline(always)]
fn adopt_unknown_tw(tw: u64, substate: u8) -> bool {
    let Ok(family) = kread::<u16>(tw, ro(&KOFFS.skc_family)) else {
        return false;
    };
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    if family == AF_INET6 {
        let (Ok(s), Ok(d)) = (
            kread::<[u8; 16]>(tw, ro(&KOFFS.skc_v6_rcv_saddr)),
            kread::<[u8; 16]>(tw, ro(&KOFFS.skc_v6_daddr)),
        ) else {
            return false;
        };
        saddr = s;
        daddr = d;
    } else if family == AF_INET {
        let (Ok(s), Ok(d)) = (
            kread::<[u8; 4]>(tw, ro(&KOFFS.skc_rcv_saddr)),
            kread::<[u8; 4]>(tw, ro(&KOFFS.skc_daddr)),
        ) else {
            return false;
        };
        saddr[..4].copy_from_slice(&s);
        daddr[..4].copy_from_slice(&d);
    } else {
        return false;
    }
    let sport = kread::<u16>(tw, ro(&KOFFS.skc_num)).unwrap_or(0);
    let dport = u16::from_be(kread::<u16>(tw, ro(&KOFFS.skc_dport)).unwrap_or(0));
    let filter_flags = ro(&FILTER.flags);
    if filter_flags != 0
        && (!keep_tuple(filter_flags, family, sport, dport, &saddr, &daddr)
            || !keep_owner(filter_flags, &Owner::default()))
    {
        return false;
    }
    let netns = netns_of(tw);
    if filter_flags & FILTER_NETNS != 0 && netns != ro(&FILTER.netns) {
        return false;
    }
    // SAFETY: helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let info = SockInfo {
        conn_id: next_conn_id(cpu),
        saddr,
        daddr,
        sport,
        dport,
        family,
        state: substate,
        netns,
        midlife: 1,
        ..SockInfo::default()
    };
    insert_tw(&tw, &info).is_ok()
}

/// Settles the timewait timer cancelled earlier on this CPU against the timer event of
/// timewait socket `tw` happening now (0 for any other event): the same timer's start or
/// expiry makes that cancel a rearm or the expiry itself (true); anything else means the
/// socket was killed then, and its end is reported now, with the cancel's time.
#[inline(always)]
fn settle_cancel(tw: u64) -> bool {
    let Some(slot) = pending_cancel() else {
        return false;
    };
    let pending = slot.tw;
    slot.tw = 0;
    if pending == tw {
        return true;
    }
    conclude_cancel(pending, slot);
    false
}

/// This CPU's pending cancel, if there is one.
#[inline(always)]
fn pending_cancel() -> Option<&'static mut PendingCancel> {
    // Without the timewait hooks nothing is ever pending: no lookup on every event (a
    // read-only global, so the verifier drops the branch it rules out).
    if ro(&KOFFS.valid) & KOFF_TIMEWAIT == 0 {
        return None;
    }
    let p = PENDING_CANCEL.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot; our programs don't nest on one CPU.
    let slot = unsafe { &mut *p };
    (slot.tw != 0).then_some(slot)
}

/// The end of timewait socket `tw`, killed when `slot`'s cancel was taken.
#[inline(always)]
fn conclude_cancel(tw: u64, slot: &PendingCancel) {
    end_tw(
        tw,
        slot.conn_id,
        slot.ts_ns,
        slot.jiffies,
        slot.substate,
        slot.expires,
    );
}

/// Ends the connection `info` tracked at `tw` whose socket is gone (`tw_entry_stale`):
/// with the time of its kill if the cancel that would have concluded it is pending on this
/// CPU, otherwise now. Its kill was a moment ago on another CPU then, which finds the
/// entry gone (or holding another connection) when it settles that cancel.
#[inline(always)]
fn end_stale_tw(tw: u64, info: &SockInfo) {
    if let Some(slot) = pending_cancel()
        && slot.tw == tw
        && slot.conn_id == info.conn_id
    {
        slot.tw = 0;
        conclude_cancel(tw, slot);
        return;
    }
    // SAFETY: helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    emit(info, tw, info.state, TCP_CLOSE, EVENT_F_TIMEWAIT, cpu, 0);
    let _ = TWS.remove(tw);
}

/// Whether a timer with this function is a timewait socket's (and we follow them).
#[inline(always)]
fn is_tw_timer(function: u64) -> bool {
    function == ro(&KOFFS.tw_handler) && ro(&KOFFS.valid) & KOFF_TIMEWAIT != 0
}

/// The timewait socket whose `tw_timer` is at `timer`.
#[inline(always)]
fn tw_of_timer(timer: u64) -> u64 {
    timer.wrapping_sub(u64::from(ro(&KOFFS.tw_timer)))
}

/// timer:timer_start. Fires for every kernel timer: the function compare comes first.
#[tracepoint(category = "timer", name = "timer_start")]
pub fn tw_timer_start(ctx: TracePointContext) -> u32 {
    // SAFETY: fixed offsets of timer_start's record (checked by the daemon from tracefs).
    let Ok(function) = (unsafe { ctx.read_at::<u64>(16) }) else {
        return 0;
    };
    if !is_tw_timer(function) {
        return 0;
    }
    // SAFETY: as above.
    let Ok(timer) = (unsafe { ctx.read_at::<u64>(8) }) else {
        return 0;
    };
    let tw = tw_of_timer(timer);
    let (Some(ports), Ok(substate)) = (tw_ports(tw), kread::<u8>(tw, ro(&KOFFS.tw_substate)))
    else {
        settle_cancel(0);
        return 0;
    };
    // A connection tracked at this address whose socket is not the one there any more ends
    // first; the socket here is then a new one, waiting for its connection's handoff.
    if let Some(p) = TWS.get_ptr_mut(tw) {
        // SAFETY: a map value we hold no other reference to.
        let info = unsafe { &*p };
        if tw_entry_stale(info, ports, substate) {
            end_stale_tw(tw, info);
        }
    }
    let rearm = settle_cancel(tw);
    if let Some(p) = TWS.get_ptr_mut(tw) {
        // SAFETY: a map value we hold no other reference to.
        let info = unsafe { &mut *p };
        if substate != info.state {
            let from = info.state;
            info.state = substate;
            // SAFETY: helper without arguments.
            let cpu = unsafe { bpf_get_smp_processor_id() };
            emit(info, tw, from, substate, EVENT_F_TIMEWAIT, cpu, 0);
        }
        return 0;
    }
    if rearm {
        return 0;
    }
    if let Some(p) = PENDING_TW.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; our programs don't nest on one CPU.
        unsafe {
            (*p).tw = tw;
            (*p).sport = ports.0;
            (*p).substate = substate;
        }
    }
    0
}

/// timer:timer_expire_entry: a timewait socket's timer ran out, so the socket ends now.
#[tracepoint(category = "timer", name = "timer_expire_entry")]
pub fn tw_timer_expire(ctx: TracePointContext) -> u32 {
    // Every CPU expires some timer now and then: a killed timewait socket whose cancel is
    // pending here is concluded soon even on an otherwise idle CPU.
    // SAFETY: fixed offsets of timer_expire_entry's record (checked by the daemon).
    let Ok(timer) = (unsafe { ctx.read_at::<u64>(8) }) else {
        return 0;
    };
    let tw = tw_of_timer(timer);
    settle_cancel(tw);
    // SAFETY: as above.
    let (Ok(function), Ok(now)) = (unsafe { ctx.read_at::<u64>(24) }, unsafe {
        ctx.read_at::<u64>(16)
    }) else {
        return 0;
    };
    if !is_tw_timer(function) {
        return 0;
    }
    // SAFETY: helper without arguments.
    let now_ns = unsafe { bpf_ktime_get_ns() };
    let substate = kread::<u8>(tw, ro(&KOFFS.tw_substate)).unwrap_or(0);
    let expires = kread::<u64>(timer, ro(&KOFFS.timer_expires)).unwrap_or(0);
    // SAFETY: map lookup of a plain value.
    if unsafe { TWS.get(tw) }.is_none() && !adopt_unknown_tw(tw, substate) {
        return 0;
    }
    end_tw(tw, 0, now_ns, now, substate, expires);
    0
}

/// timer:timer_cancel: a timewait socket's timer was taken off the wheel (rearm, expiry,
/// or the socket's end); which one is decided by what follows on this CPU.
#[tracepoint(category = "timer", name = "timer_cancel")]
pub fn tw_timer_cancel(ctx: TracePointContext) -> u32 {
    if ro(&KOFFS.valid) & KOFF_TIMEWAIT == 0 {
        return 0;
    }
    // SAFETY: fixed offset of timer_cancel's record (checked by the daemon).
    let Ok(timer) = (unsafe { ctx.read_at::<u64>(8) }) else {
        return 0;
    };
    let Ok(function) = kread::<u64>(timer, ro(&KOFFS.timer_function)) else {
        return 0;
    };
    if !is_tw_timer(function) {
        return 0;
    }
    let tw = tw_of_timer(timer);
    settle_cancel(tw);
    let substate = kread::<u8>(tw, ro(&KOFFS.tw_substate)).unwrap_or(0);
    // SAFETY: map lookups of a plain value.
    let conn_id = match unsafe { TWS.get(tw) } {
        Some(info) => info.conn_id,
        None if adopt_unknown_tw(tw, substate) => match unsafe { TWS.get(tw) } {
            Some(info) => info.conn_id,
            None => return 0,
        },
        None => return 0,
    };
    let expires = kread::<u64>(timer, ro(&KOFFS.timer_expires)).unwrap_or(0);
    if let Some(p) = PENDING_CANCEL.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; our programs don't nest on one CPU.
        unsafe {
            (*p).tw = tw;
            (*p).ts_ns = bpf_ktime_get_ns();
            (*p).jiffies = bpf_jiffies64();
            (*p).substate = substate;
            (*p).expires = expires;
            (*p).conn_id = conn_id;
        }
    }
    0
}

/// syscalls:sys_exit_accept4 / sys_exit_accept: the calling process now owns the socket
/// behind the returned fd. Follows current->files->fdt->fd[ret]->private_data->sk.
#[inline(always)]
fn on_accept(ctx: &TracePointContext) -> Result<(), i64> {
    if ro(&KOFFS.valid) & KOFF_ACCEPT == 0 {
        return Ok(());
    }
    // SAFETY: `ret` of the syscalls exit record (offset checked by the daemon).
    let fd = unsafe { ctx.read_at::<i64>(16) }.map_err(i64::from)?;
    if !(0..1 << 30).contains(&fd) {
        return Ok(());
    }
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = kread(task, ro(&KOFFS.task_files))?;
    let fdt: u64 = kread(files, ro(&KOFFS.files_fdt))?;
    let fds: u64 = kread(fdt, ro(&KOFFS.fdt_fd))?;
    let file: u64 = kread(fds + 8 * fd as u64, 0)?;
    let socket: u64 = kread(file, ro(&KOFFS.file_private_data))?;
    let sk: u64 = kread(socket, ro(&KOFFS.socket_sk))?;
    let Some(p) = SOCKS.get_ptr_mut(sk) else {
        return Ok(());
    };
    // SAFETY: a map value we hold no other reference to.
    let info = unsafe { &mut *p };
    if info.state == TCP_CLOSE {
        // An ended life's tombstone: this socket's own start was not seen.
        return Ok(());
    }
    if !set_current_owner(&mut info.owner, OWNER_SRC_ACCEPT) {
        return Ok(());
    }
    info.unaccepted = 0;
    // The event is filled from the map value itself, which stays valid for the whole run
    // of the program: a local copy of it would only be read once more.
    let filter_flags = ro(&FILTER.flags);
    if keep_owner(filter_flags, &info.owner)
        && (filter_flags & FILTER_NETNS == 0 || info.netns == ro(&FILTER.netns))
    {
        // SAFETY: helper without arguments.
        let cpu = unsafe { bpf_get_smp_processor_id() };
        emit(info, sk, info.state, info.state, EVENT_F_ACCEPT, cpu, 0);
    } else {
        bump(COUNTER_FILTERED);
    }
    Ok(())
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    let _ = on_accept(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    let _ = on_accept(&ctx);
    0
}

/// By reference on purpose: passing the 96-byte value lets LLVM copy it once more on the
/// 512-byte BPF stack, which then overflows.
#[inline(always)]
fn insert_sock(skaddr: &u64, info: &SockInfo) -> Result<(), i32> {
    SOCKS.insert(skaddr, info, u64::from(BPF_ANY))
}

/// By reference, like `insert_sock`, to keep the value off the stack twice.
#[inline(always)]
fn insert_tw(tw: &u64, info: &SockInfo) -> Result<(), i32> {
    TWS.insert(tw, info, u64::from(BPF_ANY))
}

/// Writes one event for the connection `info` into the ring buffer (or counts its loss).
/// `ts_ns` 0 means now.
#[inline(always)]
fn emit(info: &SockInfo, skaddr: u64, old: u8, new: u8, mut flags: u32, cpu: u32, ts_ns: u64) {
    if info.owner.source != OWNER_SRC_NONE {
        flags |= EVENT_F_OWNER_KNOWN;
    }
    if info.unaccepted != 0 {
        flags |= EVENT_F_UNACCEPTED;
    }
    if info.midlife != 0 {
        flags |= EVENT_F_MIDLIFE;
    }
    const RECORD: u64 = 8 + core::mem::size_of::<StateEvent>() as u64;
    let avail = EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    // The last eighth of the ring buffer is kept for connection ends (a vanished report is
    // one too): under sustained overload the other events are lost anyway (and counted),
    // and an end that gets through lets the daemon retire its connection instead of
    // tracking it until evicted.
    let kept_for_ends = ro(&RING_BYTES) - ro(&RING_BYTES) / 8;
    let is_end = new == TCP_CLOSE || flags & EVENT_F_VANISHED != 0;
    let reserved = if is_end || avail + RECORD <= kept_for_ends {
        EVENTS.reserve::<StateEvent>(0)
    } else {
        None
    };
    // The time is read once the slot is held, so that events that race for the ring buffer
    // (an accept in one CPU's syscall, its socket's softirq transition on another) are
    // stamped in the order they are delivered.
    let ts_ns = if ts_ns != 0 {
        ts_ns
    } else {
        // SAFETY: helper without arguments.
        unsafe { bpf_ktime_get_ns() }
    };
    let Some(mut entry) = reserved else {
        if changes_no_state(flags, old, new) {
            bump(COUNTER_RINGBUF_FULL_OTHER);
        } else if new == TCP_CLOSE && defer(info, skaddr, old, flags, cpu, ts_ns) {
            bump(COUNTER_DEFERRED);
        } else {
            bump(COUNTER_RINGBUF_FULL);
        }
        return;
    };
    fill(
        entry.as_mut_ptr(),
        info,
        skaddr,
        old,
        new,
        flags,
        cpu,
        ts_ns,
    );
    // Wake the reader only when the unread data crosses the threshold (a window of a few
    // records, as the other CPU may cross it in the same instant). Past it the reader is
    // awake or about to poll: waking it on every event is an irq_work per event, the most
    // expensive thing a busy producer could do.
    let avail = avail + RECORD;
    let wake_at = ro(&WAKEUP_BYTES);
    let wake = if avail >= wake_at && avail < wake_at + 4 * RECORD {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(u64::from(wake));
    bump(COUNTER_SUBMITTED);
}

/// Queues a `→ CLOSE` event the ring buffer had no room for; false if the queue is full too.
#[inline(always)]
fn defer(info: &SockInfo, skaddr: u64, old: u8, flags: u32, cpu: u32, ts_ns: u64) -> bool {
    let Some(ev) = DEFERRED_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    fill(ev, info, skaddr, old, TCP_CLOSE, flags, cpu, ts_ns);
    // SAFETY: this CPU's own slot, just filled. By reference: by value, the 144 bytes
    // would be copied onto the stack, which has no room for them.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let queued = DEFERRED.push(unsafe { &*ev }, 0);
    queued.is_ok()
}

/// Every field of the event at `ev`, written in place. Field by field, so the 144-byte
/// event is never built on the 512-byte stack.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fill(
    ev: *mut StateEvent,
    info: &SockInfo,
    skaddr: u64,
    old: u8,
    new: u8,
    flags: u32,
    cpu: u32,
    ts_ns: u64,
) {
    // SAFETY: `ev` is a reserved ring-buffer slot or this CPU's scratch slot, both ours and
    // of size_of::<StateEvent>(); every field is written.
    unsafe {
        (*ev).ts_ns = ts_ns;
        (*ev).skaddr = skaddr;
        (*ev).conn_id = info.conn_id;
        (*ev).pid_tgid = bpf_get_current_pid_tgid();
        copy_words(&raw mut (*ev).saddr, &info.saddr);
        copy_words(&raw mut (*ev).daddr, &info.daddr);
        current_comm_into(&mut (*ev).comm);
        (*ev).sport = info.sport;
        (*ev).dport = info.dport;
        (*ev).family = info.family;
        (*ev).oldstate = old;
        (*ev).newstate = new;
        (*ev).flags = flags;
        (*ev).cpu = cpu;
        copy_words(&raw mut (*ev).owner, &info.owner);
        (*ev).netns = info.netns;
        (*ev)._pad = 0;
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
