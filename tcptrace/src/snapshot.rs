//! A one-shot picture of every TCP socket on the host, in every network namespace, with the
//! processes holding each: how the tracer learns of connections that predate it (a socket
//! stuck in CLOSE_WAIT for hours). It reads the kernel through sock_diag and /proc only.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CStr;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read as _};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use netlink_packet_core::{
    DoneBuffer, ErrorBuffer, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer,
    NetlinkHeader, NetlinkMessage, Parseable,
};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags, Timer,
};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY, SockDiagMessage,
};
use netlink_sys::Socket;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use crate::event::{Comm, TcpState, ip_from_wire};

/// A process holding an fd to a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// From /proc/<pid>/comm, read while the fd scan saw the process.
    pub comm: Comm,
}

/// One TCP socket as sock_diag reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapSocket {
    /// The state the kernel reports, as `ss` shows it: a timewait mini-socket reports its
    /// substate (TIME_WAIT or FIN_WAIT2), a request socket (NEW_SYN_RECV) reports SYN_RECV.
    pub state: TcpState,
    /// A timewait mini-socket: no file, no owner, uid 0, zero queues.
    pub timewait: bool,
    /// IPv4-mapped IPv6 addresses are shown as IPv4, as [`ip_from_wire`] does.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Socket-fs inode; 0 when no file refers to it: timewait and request sockets, children
    /// still in a listener's accept queue, and sockets their process has closed (orphans).
    pub inode: u64,
    /// Owner uid as seen from tcptrace's user namespace (0 for timewait/request sockets).
    pub uid: u32,
    /// The kernel's socket cookie (SO_COOKIE); a timewait socket keeps its full socket's.
    pub cookie: u64,
    /// Inode of the network namespace the socket lives in (`net:[N]`).
    pub netns: u64,
    /// Processes holding an fd to it, sorted by pid; empty when none.
    pub owners: Vec<Holder>,
    /// Bytes not yet read (a received FIN counts one); for a listener, the accept-queue length.
    pub rqueue: u32,
    /// Bytes not yet acknowledged; for a listener, its backlog.
    pub wqueue: u32,
}

/// Every TCP socket the host had while the snapshot was taken, each listed once.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// In dump order: the caller's namespace first, then the others by inode.
    pub sockets: Vec<SnapSocket>,
    /// CLOCK_MONOTONIC (the clock of `bpf_ktime_get_ns`) just before the first dump.
    pub taken_mono_start_ns: u64,
    /// CLOCK_MONOTONIC just after the last dump.
    pub taken_mono_end_ns: u64,
    /// Namespaces and processes that could not be read, one sentence each.
    pub errors: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "sock_diag {what} failed: {error}; the kernel needs inet_diag and tcp_diag (modprobe tcp_diag)"
    )]
    Netlink {
        what: &'static str,
        error: io::Error,
    },
    #[error("malformed sock_diag reply: {0}")]
    Decode(String),
    #[error("cannot read {path}: {error}; is /proc mounted?")]
    Proc { path: String, error: io::Error },
}

/// Large enough for the biggest dump batch the kernel sends (it grows batches to 32 KiB
/// once it has seen a big enough receive buffer).
const RECV_BUF_LEN: usize = 64 * 1024;

/// Takes a snapshot of every TCP socket in every network namespace that a task or
/// /run/netns holds (a namespace kept alive only by sockets is not found).
///
/// The calling thread's namespace is dumped on it; every other namespace is dumped from a
/// short-lived thread that has entered it. A namespace or process that can't be read is
/// reported in [`Snapshot::errors`]; only a failure in the caller's namespace is an error.
///
/// Each namespace costs two kernel walks of the host-wide established hash (one per
/// family), however few sockets it has; the /proc fd scan afterwards dominates on busy hosts.
pub fn take() -> Result<Snapshot, SnapshotError> {
    let mut errors = Vec::new();
    let mut denied = Vec::new();
    let own_netns = netns_inode("/proc/thread-self/ns/net")?;
    let foreign = foreign_namespaces(own_netns, &mut errors, &mut denied)?;

    let mut sockets = Vec::new();
    let taken_mono_start_ns = monotonic_ns();
    dump_current_netns(own_netns, &mut sockets)?;
    for (&netns, path) in &foreign {
        // setns moves only the calling thread, which then exits with the namespace.
        let outcome = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("tcptrace-netns".into())
                .spawn_scoped(scope, || dump_foreign_netns(netns, path, &mut sockets))
                .map_err(|e| format!("network namespace {netns}: cannot start a thread: {e}"))?
                .join()
                .unwrap_or_else(|_| Err(format!("network namespace {netns}: dump panicked")))
        });
        if let Err(e) = outcome {
            errors.push(e);
        }
    }
    let taken_mono_end_ns = monotonic_ns();
    keep_last_report(&mut sockets);

    attach_owners(&mut sockets, &mut errors, &mut denied)?;
    if !denied.is_empty() {
        denied.sort_unstable();
        denied.dedup();
        let have_ptrace = caps::has_cap(
            None,
            caps::CapSet::Effective,
            caps::Capability::CAP_SYS_PTRACE,
        )
        .unwrap_or(false);
        errors.push(denied_message(&denied, have_ptrace));
    }
    Ok(Snapshot {
        sockets,
        taken_mono_start_ns,
        taken_mono_end_ns,
        errors,
    })
}

/// Sockets per state as `ss -tan` lists them (index = kernel state number, 1..=13), over
/// one namespace or all of them.
pub fn state_counts(snapshot: &Snapshot, netns: Option<u64>) -> [u64; 14] {
    let mut counts = [0; 14];
    for s in snapshot.sockets.iter() {
        if netns.is_none_or(|n| s.netns == n) {
            counts[s.state as usize] += 1;
        }
    }
    counts
}

/// Keeps the last report of each socket (cookies are unique host-wide). A dump is not
/// atomic: the kernel resumes each batch by position in a hash bucket, so a socket that
/// moves meanwhile can be listed twice, e.g. as a full socket and as its timewait successor.
fn keep_last_report(sockets: &mut Vec<SnapSocket>) {
    let mut last: HashMap<u64, usize> = HashMap::with_capacity(sockets.len());
    for (i, s) in sockets.iter().enumerate() {
        last.insert(s.cookie, i);
    }
    if last.len() == sockets.len() {
        return;
    }
    let mut i = 0;
    sockets.retain(|s| {
        let keep = last.get(&s.cookie) == Some(&i);
        i += 1;
        keep
    });
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn netns_inode(path: &str) -> Result<u64, SnapshotError> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|error| SnapshotError::Proc {
            path: path.to_string(),
            error,
        })
}

/// Indices of the network interfaces of the calling thread's namespace.
fn interface_indices() -> Vec<u32> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array ended by a zero entry, or null; freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            out.push((*p).if_index);
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// Inode of the calling thread's network namespace, as the kernel program reports a
/// socket's (`netns`); None if /proc cannot tell.
pub fn own_netns() -> Option<u32> {
    netns_inode("/proc/thread-self/ns/net")
        .ok()
        .and_then(|i| u32::try_from(i).ok())
}

/// A process that exited while we looked is not an error.
fn vanished(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
}

/// Calls `f` with every all-digit entry of `dir` (pids, tids).
fn for_each_number(dir: &str, mut f: impl FnMut(u32)) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let Ok(entry) = entry else { break };
        if let Some(n) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            f(n);
        }
    }
    Ok(())
}

/// Every network namespace other than `own` that a task or an `ip netns` bind mount holds,
/// with a path to enter it by. Threads are looked at too: unshare(2) can give one thread
/// its own namespace.
fn foreign_namespaces(
    own: u64,
    errors: &mut Vec<String>,
    denied: &mut Vec<u32>,
) -> Result<BTreeMap<u64, PathBuf>, SnapshotError> {
    let mut found = BTreeMap::new();
    let mut pids = Vec::new();
    for_each_number("/proc", |pid| pids.push(pid)).map_err(|error| SnapshotError::Proc {
        path: "/proc".into(),
        error,
    })?;
    let mut path = String::new();
    for pid in pids {
        path.clear();
        let _ = write!(path, "/proc/{pid}/task");
        let mut tids = Vec::new();
        if let Err(e) = for_each_number(&path, |tid| tids.push(tid)) {
            note_proc_error(pid, "task list", &e, errors, denied);
            continue;
        }
        for tid in tids {
            path.clear();
            let _ = write!(path, "/proc/{pid}/task/{tid}/ns/net");
            match std::fs::metadata(&path) {
                Ok(m) if m.ino() != own => {
                    found.entry(m.ino()).or_insert_with(|| PathBuf::from(&path));
                }
                Ok(_) => {}
                Err(e) => note_proc_error(pid, "network namespace", &e, errors, denied),
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for entry in dir.flatten() {
            if let Ok(m) = std::fs::metadata(entry.path())
                && m.ino() != own
            {
                found.entry(m.ino()).or_insert_with(|| entry.path());
            }
        }
    }
    Ok(found)
}

fn note_proc_error(
    pid: u32,
    what: &str,
    e: &io::Error,
    errors: &mut Vec<String>,
    denied: &mut Vec<u32>,
) {
    if vanished(e) {
        return;
    }
    if e.kind() == io::ErrorKind::PermissionDenied {
        denied.push(pid);
    } else {
        errors.push(format!("pid {pid}: cannot read its {what}: {e}"));
    }
}

/// Runs on a thread of its own: enters namespace `netns` through `path` and dumps it.
fn dump_foreign_netns(netns: u64, path: &Path, out: &mut Vec<SnapSocket>) -> Result<(), String> {
    let ns = File::open(path).map_err(|e| {
        format!(
            "network namespace {netns}: cannot open {}: {e}",
            path.display()
        )
    })?;
    // The task may have exited and its pid been reused since the namespace was found.
    match ns.metadata() {
        Ok(m) if m.ino() == netns => {}
        _ => {
            return Err(format!(
                "network namespace {netns}: {} no longer refers to it (its task exited)",
                path.display()
            ));
        }
    }
    // SAFETY: setns with an open nsfs fd; CLONE_NEWNET moves only the calling thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "network namespace {netns}: cannot enter it ({}); run as root",
            io::Error::last_os_error()
        ));
    }
    dump_current_netns(netns, out).map_err(|e| format!("network namespace {netns}: {e}"))
}

/// Dumps every IPv4 and IPv6 TCP socket of the calling thread's network namespace (a
/// netlink socket answers for the namespace it was created in).
fn dump_current_netns(netns: u64, out: &mut Vec<SnapSocket>) -> Result<(), SnapshotError> {
    let socket = diag_socket()?;
    let mut buf = vec![0u8; RECV_BUF_LEN];
    for (seq, family) in [(1, AF_INET), (2, AF_INET6)] {
        let any = if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        let flags = NLM_F_REQUEST | NLM_F_DUMP;
        send_tcp_request(&socket, flags, seq, family, any, "request")?;
        receive_dump(&socket, &mut buf, seq, netns, out)?;
    }
    Ok(())
}

/// A sock_diag socket, answering for the calling thread's network namespace.
fn diag_socket() -> Result<Socket, SnapshotError> {
    Socket::new(NETLINK_SOCK_DIAG).map_err(|error| SnapshotError::Netlink {
        what: "socket",
        error,
    })
}

/// Sends one sock_diag request for TCP sockets of `family` in every state (`ss -a`'s; the
/// kernel adds request sockets for SYN_RECV): a dump with `NLM_F_DUMP`, else the exact
/// lookup of the socket `id` names.
fn send_tcp_request(
    socket: &Socket,
    flags: u16,
    seq: u32,
    family: u8,
    id: SocketId,
    what: &'static str,
) -> Result<(), SnapshotError> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: id,
        })
        .into(),
    );
    request.finalize();
    let mut bytes = vec![0u8; request.buffer_len()];
    request.serialize(&mut bytes);
    socket
        .send(&bytes, 0)
        .map_err(|error| SnapshotError::Netlink { what, error })?;
    Ok(())
}

/// Looks sockets up one at a time by their addresses, with sock_diag's exact lookup, in the
/// network namespace of the thread that made it: whether the kernel still has a connection
/// the engine thinks is open. No capability is needed for one's own namespace.
pub struct Prober {
    socket: Socket,
    buf: Vec<u8>,
    seq: u32,
}

impl Prober {
    pub fn new() -> Result<Prober, SnapshotError> {
        Ok(Prober {
            socket: diag_socket()?,
            buf: vec![0u8; RECV_BUF_LEN],
            seq: 0,
        })
    }

    /// Whether the kernel has a TCP socket (full, request or timewait) connected from
    /// `local` to `remote`. A socket bound to a device (SO_BINDTODEVICE, a VRF, an IPv6
    /// link-local address's scope) matches only a lookup that names that device, so a miss
    /// is tried again on each interface; with more than `MAX_INTERFACES` of them, a miss is
    /// not taken as proof and the socket counts as present.
    pub fn exists(&mut self, local: SocketAddr, remote: SocketAddr) -> Result<bool, SnapshotError> {
        const MAX_INTERFACES: usize = 32;
        if self.lookup(local, remote, 0)? {
            return Ok(true);
        }
        let interfaces = interface_indices();
        if interfaces.len() > MAX_INTERFACES {
            return Ok(true);
        }
        for ifindex in interfaces {
            if self.lookup(local, remote, ifindex)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// One exact lookup, on interface `ifindex` (0: sockets bound to no device). The
    /// kernel's lookup falls back to a listener on `local` when no connection matches,
    /// which is not this connection: that counts as absent.
    fn lookup(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        ifindex: u32,
    ) -> Result<bool, SnapshotError> {
        let netlink = |what, error| SnapshotError::Netlink { what, error };
        let v4 = local.is_ipv4() && remote.is_ipv4();
        let as_family = |ip: IpAddr| match (v4, ip) {
            (false, IpAddr::V4(a)) => IpAddr::V6(a.to_ipv6_mapped()),
            _ => ip,
        };
        self.seq = self.seq.wrapping_add(1);
        let id = SocketId {
            source_port: local.port(),
            destination_port: remote.port(),
            source_address: as_family(local.ip()),
            destination_address: as_family(remote.ip()),
            interface_id: ifindex,
            // INET_DIAG_NOCOOKIE: any socket with these addresses.
            cookie: [0xff; 8],
        };
        let family = if v4 { AF_INET } else { AF_INET6 };
        send_tcp_request(&self.socket, NLM_F_REQUEST, self.seq, family, id, "lookup")?;
        let decode = |e: netlink_packet_core::DecodeError| SnapshotError::Decode(e.to_string());
        loop {
            let n = self
                .socket
                .recv(&mut &mut self.buf[..], 0)
                .map_err(|e| netlink("lookup", e))?
                .min(self.buf.len());
            let mut at = 0;
            while at < n {
                let msg = NetlinkBuffer::new_checked(&self.buf[at..n]).map_err(decode)?;
                at += (msg.length() as usize).next_multiple_of(4);
                if msg.sequence_number() != self.seq {
                    continue;
                }
                match msg.message_type() {
                    SOCK_DIAG_BY_FAMILY => {
                        let h = InetResponseHeader::parse(msg.payload()).map_err(decode)?;
                        let found = snap_socket(&h, 0)?;
                        return Ok(
                            found.state != TcpState::Listen && found.remote.port() == remote.port()
                        );
                    }
                    NLMSG_ERROR => {
                        let err = ErrorBuffer::new_checked(msg.payload()).map_err(decode)?;
                        return match err.code().map(|c| -c.get()) {
                            Some(libc::ENOENT) => Ok(false),
                            Some(code) => {
                                Err(netlink("lookup", io::Error::from_raw_os_error(code)))
                            }
                            // An acknowledgement with no socket: not proof it is gone.
                            None => Ok(true),
                        };
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Reads one dump until NLMSG_DONE. Only the fixed header of each reply is parsed: the
/// attributes are not needed, and skipping them keeps the dump free of allocations.
fn receive_dump(
    socket: &Socket,
    buf: &mut [u8],
    seq: u32,
    netns: u64,
    out: &mut Vec<SnapSocket>,
) -> Result<(), SnapshotError> {
    let decode = |e: netlink_packet_core::DecodeError| SnapshotError::Decode(e.to_string());
    loop {
        let n = socket
            .recv(&mut &mut buf[..], 0)
            .map_err(|error| SnapshotError::Netlink {
                what: "dump",
                error,
            })?;
        if n > buf.len() {
            return Err(SnapshotError::Decode(format!(
                "a {n}-byte batch was truncated"
            )));
        }
        let mut at = 0;
        while at < n {
            let msg = NetlinkBuffer::new_checked(&buf[at..n]).map_err(decode)?;
            at += (msg.length() as usize).next_multiple_of(4);
            if msg.sequence_number() != seq {
                continue;
            }
            match msg.message_type() {
                SOCK_DIAG_BY_FAMILY => {
                    let h = InetResponseHeader::parse(msg.payload()).map_err(decode)?;
                    out.push(snap_socket(&h, netns)?);
                }
                NLMSG_DONE => {
                    let code = DoneBuffer::new_checked(msg.payload())
                        .map_err(decode)?
                        .code();
                    return match code {
                        0 => Ok(()),
                        c => Err(SnapshotError::Netlink {
                            what: "dump",
                            error: io::Error::from_raw_os_error(-c),
                        }),
                    };
                }
                NLMSG_ERROR => {
                    let err = ErrorBuffer::new_checked(msg.payload()).map_err(decode)?;
                    if let Some(code) = err.code() {
                        return Err(SnapshotError::Netlink {
                            what: "dump",
                            error: io::Error::from_raw_os_error(-code.get()),
                        });
                    }
                }
                _ => {}
            }
        }
    }
}

fn snap_socket(h: &InetResponseHeader, netns: u64) -> Result<SnapSocket, SnapshotError> {
    let state = TcpState::from_kernel(h.state)
        .ok_or_else(|| SnapshotError::Decode(format!("unknown TCP state {}", h.state)))?;
    let id = &h.socket_id;
    // The kernel stores the 64-bit cookie as two host-order u32s, low half first.
    let c = id.cookie;
    let low = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
    let high = u32::from_ne_bytes([c[4], c[5], c[6], c[7]]);
    Ok(SnapSocket {
        state,
        // Only timewait mini-sockets report timer 3; full sockets use 0, 1, 2 or 4.
        timewait: h.timer == Some(Timer::TimeWait),
        local: SocketAddr::new(unmapped(id.source_address), id.source_port),
        remote: SocketAddr::new(unmapped(id.destination_address), id.destination_port),
        inode: u64::from(h.inode),
        uid: h.uid,
        cookie: u64::from(high) << 32 | u64::from(low),
        netns,
        owners: Vec::new(),
        rqueue: h.recv_queue,
        wqueue: h.send_queue,
    })
}

fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => ip_from_wire(true, &v6.octets()),
        v4 => v4,
    }
}

/// Fills [`SnapSocket::owners`] from one pass over /proc/*/fd. Socket inodes are global
/// (one socket filesystem for all namespaces), so the inode alone is the key: a process
/// may hold sockets of a namespace other than its own.
fn attach_owners(
    sockets: &mut [SnapSocket],
    errors: &mut Vec<String>,
    denied: &mut Vec<u32>,
) -> Result<(), SnapshotError> {
    let mut pids = Vec::new();
    for_each_number("/proc", |pid| pids.push(pid)).map_err(|error| SnapshotError::Proc {
        path: "/proc".into(),
        error,
    })?;
    // (socket inode, pid), one per fd; sorted, then each socket's holders are one range.
    let mut held: Vec<(u64, u32)> = Vec::new();
    let mut comms: HashMap<u32, Comm> = HashMap::new();
    let mut path = String::new();
    for pid in pids {
        let before = held.len();
        if let Err(e) = socket_fds(pid, &mut path, |ino| held.push((ino, pid))) {
            note_proc_error(pid, "fds", &e, errors, denied);
        }
        if held.len() > before
            && let Some(comm) = read_comm(pid, &mut path)
        {
            comms.insert(pid, comm);
        }
    }
    held.sort_unstable();
    held.dedup();
    for s in sockets.iter_mut().filter(|s| s.inode != 0) {
        let first = held.partition_point(|&(ino, _)| ino < s.inode);
        let count = held[first..]
            .iter()
            .take_while(|&&(ino, _)| ino == s.inode)
            .count();
        if count > 0 {
            s.owners = held[first..first + count]
                .iter()
                .map(|&(_, pid)| Holder {
                    pid,
                    comm: comms.get(&pid).copied().unwrap_or_default(),
                })
                .collect();
        }
    }
    Ok(())
}

fn read_comm(pid: u32, path: &mut String) -> Option<Comm> {
    path.clear();
    let _ = write!(path, "/proc/{pid}/comm");
    let mut raw = [0u8; 17];
    let n = File::open(&*path).and_then(|mut f| f.read(&mut raw)).ok()?;
    let name = raw[..n].strip_suffix(b"\n").unwrap_or(&raw[..n]);
    let mut comm = Comm::default();
    let len = name.len().min(15);
    comm.0[..len].copy_from_slice(&name[..len]);
    Some(comm)
}

/// Closes a directory stream on drop.
struct DirStream(*mut libc::DIR);

impl Drop for DirStream {
    fn drop(&mut self) {
        // SAFETY: the stream came from a successful opendir and is closed once.
        unsafe { libc::closedir(self.0) };
    }
}

/// Calls `found` with the inode of every socket among `pid`'s open fds. One readlinkat per
/// fd, relative to the directory, into a stack buffer: a host may hold 100k+ fds.
fn socket_fds(pid: u32, path: &mut String, mut found: impl FnMut(u64)) -> io::Result<()> {
    path.clear();
    let _ = write!(path, "/proc/{pid}/fd\0");
    let dir_path = CStr::from_bytes_with_nul(path.as_bytes()).map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated path; the stream is owned by `dir` below.
    let raw = unsafe { libc::opendir(dir_path.as_ptr()) };
    if raw.is_null() {
        return Err(io::Error::last_os_error());
    }
    let dir = DirStream(raw);
    // SAFETY: `dir` is an open stream.
    let dir_fd = unsafe { libc::dirfd(dir.0) };
    // "socket:[4294967295]" is 19 bytes; anything longer is not a socket.
    let mut link = [0u8; 32];
    loop {
        // SAFETY: `dir` is open; the entry stays valid until the next readdir on it. A
        // process that exits mid-listing ends the listing (NULL), which is what we want.
        let entry = unsafe { libc::readdir(dir.0) };
        if entry.is_null() {
            return Ok(());
        }
        // SAFETY: d_name is NUL-terminated inside the entry.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name.to_bytes().first() == Some(&b'.') {
            continue;
        }
        // SAFETY: `name` is NUL-terminated; readlinkat writes at most link.len() bytes.
        let n = unsafe {
            libc::readlinkat(dir_fd, name.as_ptr(), link.as_mut_ptr().cast(), link.len())
        };
        if let Ok(n) = usize::try_from(n)
            && let Some(ino) = socket_link_inode(&link[..n])
        {
            found(ino);
        }
    }
}

/// The inode in an fd link of the form `socket:[12345]`.
fn socket_link_inode(link: &[u8]) -> Option<u64> {
    let digits = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Why some processes' owners are missing. Without CAP_SYS_PTRACE that is the fix; with
/// it, the kernel's ptrace check refused anyway (a process of another user namespace, one
/// a security module protects), and asking for the capability would mislead.
fn denied_message(pids: &[u32], have_ptrace: bool) -> String {
    let sample: Vec<String> = pids.iter().take(8).map(u32::to_string).collect();
    let why = if have_ptrace {
        "the kernel's ptrace check refused although tcptrace has CAP_SYS_PTRACE, as it does for a process of another user namespace or one a security module protects"
    } else {
        "needs root with CAP_SYS_PTRACE"
    };
    format!(
        "permission denied reading the fds or namespaces of {} processes ({why}), e.g. pids {}",
        pids.len(),
        sample.join(", ")
    )
}

#[cfg(test)]
mod tests {
    /// The exact lookup against real loopback sockets (sock_diag, no BPF): a connection
    /// is found from both ends, in IPv4 and IPv6, and is gone once both ends are closed
    /// and reset; a listener on the local address is not taken for the connection.
    #[test]
    fn prober_finds_live_connections_and_not_gone_ones() {
        use std::net::{TcpListener, TcpStream};
        let mut p = super::Prober::new().expect("NETLINK_SOCK_DIAG");
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let listener = TcpListener::bind(bind).unwrap();
            let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().unwrap();
            let (c, s) = (client.local_addr().unwrap(), server.local_addr().unwrap());
            assert!(p.exists(c, s).unwrap(), "client end {c} -> {s}");
            assert!(p.exists(s, c).unwrap(), "server end {s} -> {c}");
            // Linger 0: both ends go straight to CLOSE, no TIME_WAIT left behind.
            for sock in [&client, &server] {
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: a valid socket fd and a live linger struct of the size given.
                let r = unsafe {
                    libc::setsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(sock),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        size_of::<libc::linger>() as libc::socklen_t,
                    )
                };
                assert_eq!(r, 0, "SO_LINGER");
            }
            drop(client);
            drop(server);
            assert!(!p.exists(c, s).unwrap(), "closed client end {c} -> {s}");
            // The listener still has the server's local address: not this connection.
            assert!(!p.exists(s, c).unwrap(), "closed server end {s} -> {c}");
        }
    }

    /// A socket bound to a device is matched only by a lookup naming that device: found
    /// through the retry on each interface, not taken for gone.
    #[test]
    fn prober_finds_a_connection_bound_to_a_device() {
        use std::net::{TcpListener, TcpStream};
        use std::os::fd::FromRawFd;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = listener.local_addr().unwrap();
        // SAFETY: plain socket calls on a fresh fd, with live buffers of the sizes given;
        // the fd is handed to a TcpStream that closes it.
        let client = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(fd >= 0, "socket");
            let dev = b"lo\0";
            let r = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                dev.as_ptr().cast(),
                dev.len() as libc::socklen_t,
            );
            assert_eq!(r, 0, "SO_BINDTODEVICE lo (needs CAP_NET_RAW)");
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: to.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
                },
                sin_zero: [0; 8],
            };
            let r = libc::connect(
                fd,
                (&sa as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            assert_eq!(r, 0, "connect");
            TcpStream::from_raw_fd(fd)
        };
        let (_server, _) = listener.accept().unwrap();
        let c = client.local_addr().unwrap();
        let mut p = super::Prober::new().expect("NETLINK_SOCK_DIAG");
        assert!(
            !p.lookup(c, to, 0).unwrap(),
            "a device-less lookup misses it"
        );
        assert!(
            p.exists(c, to).unwrap(),
            "the retry on each interface finds it"
        );
    }

    #[test]
    fn a_denied_process_is_explained_by_what_tcptrace_lacks() {
        let m = super::denied_message(&[1, 7], false);
        assert_eq!(
            m,
            "permission denied reading the fds or namespaces of 2 processes (needs root with CAP_SYS_PTRACE), e.g. pids 1, 7"
        );
        let m = super::denied_message(&[1], true);
        assert!(m.contains("although tcptrace has CAP_SYS_PTRACE"), "{m}");
        assert!(!m.contains("needs root"), "{m}");
    }

    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// Under CI=true a test that cannot run fails; elsewhere it says why it skipped.
    fn cannot_run(why: &str) {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("CI=true: {why}");
        }
        eprintln!("SKIPPED: {why}");
    }

    fn own_netns() -> u64 {
        netns_inode("/proc/thread-self/ns/net").expect("own netns")
    }

    fn euid() -> u32 {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    }

    /// This process as /proc shows it; the comm is the executable's name cut to 15 bytes.
    fn us() -> Holder {
        let exe = std::env::current_exe().expect("current_exe");
        let name = exe.file_name().expect("exe name").to_string_lossy();
        Holder {
            pid: std::process::id(),
            comm: Comm::new(&name),
        }
    }

    fn inode_of(fd: &impl AsRawFd) -> u64 {
        // SAFETY: fstat fills one stat buffer for an open fd.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0, "fstat");
        st.st_ino
    }

    fn cookie_of(fd: &impl AsRawFd) -> u64 {
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: SO_COOKIE writes one u64 into `cookie`.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "SO_COOKIE: {}", io::Error::last_os_error());
        cookie
    }

    /// A listener on `addr` with an exact backlog, so the snapshot's `wqueue` is known.
    fn listen(addr: &str, backlog: i32) -> TcpListener {
        let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        // SAFETY: listen again on a listening socket only changes its backlog.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), backlog) }, 0);
        l
    }

    fn take_ok() -> Snapshot {
        take().unwrap_or_else(|e| panic!("snapshot failed: {e}"))
    }

    /// Snapshots until `ready` holds (loopback settles in microseconds, but not atomically
    /// with close()), for at most two seconds; returns the last one either way.
    fn take_until(ready: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let snap = take_ok();
            if ready(&snap) || Instant::now() > deadline {
                return snap;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn matching(snap: &Snapshot, local: SocketAddr, remote: SocketAddr) -> Vec<&SnapSocket> {
        snap.sockets
            .iter()
            .filter(|s| s.local == local && s.remote == remote)
            .collect()
    }

    /// The one socket with this tuple in namespace `netns`, fails showing all candidates;
    /// without holders that are our own transient children (see `settled`).
    fn one_in(snap: &Snapshot, netns: u64, local: SocketAddr, remote: SocketAddr) -> SnapSocket {
        let found: Vec<_> = matching(snap, local, remote)
            .into_iter()
            .filter(|s| s.netns == netns)
            .collect();
        assert_eq!(found.len(), 1, "{local} -> {remote}: {found:#?}");
        settled(found[0])
    }

    fn one(snap: &Snapshot, local: SocketAddr, remote: SocketAddr) -> SnapSocket {
        one_in(snap, own_netns(), local, remote)
    }

    /// `s` without the holders that are children of this process: between fork and exec a
    /// child (an `ss` or a server another test starts) holds a copy of every fd we have.
    fn settled(s: &SnapSocket) -> SnapSocket {
        let me = std::process::id();
        let parent = |pid: u32| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().nth(1)?.parse::<u32>().ok()
        };
        let mut s = s.clone();
        s.owners
            .retain(|h| h.pid == me || parent(h.pid).is_some_and(|p| p != me));
        s
    }

    fn has_state(snap: &Snapshot, local: SocketAddr, remote: SocketAddr, st: TcpState) -> bool {
        matching(snap, local, remote).iter().any(|s| s.state == st)
    }

    fn unspecified(v6: bool) -> SocketAddr {
        let ip: IpAddr = if v6 {
            Ipv6Addr::UNSPECIFIED.into()
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        };
        SocketAddr::new(ip, 0)
    }

    fn listener_socket(l: &TcpListener, backlog: u32, rqueue: u32) -> SnapSocket {
        let local = l.local_addr().expect("listener addr");
        SnapSocket {
            state: TcpState::Listen,
            timewait: false,
            local,
            remote: unspecified(local.is_ipv6()),
            inode: inode_of(l),
            uid: euid(),
            cookie: cookie_of(l),
            netns: own_netns(),
            owners: vec![us()],
            rqueue,
            wqueue: backlog,
        }
    }

    fn fin_timeout_s() -> u64 {
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fin_timeout")
            .expect("tcp_fin_timeout")
            .trim()
            .parse()
            .expect("tcp_fin_timeout is a number")
    }

    /// A client that closed first and got the peer's ACK. With tcp_fin_timeout <= 60 s
    /// (TCP_TIMEWAIT_LEN) tcp_close turns it straight into a timewait mini-socket whose
    /// substate is FIN_WAIT2; otherwise the orphaned full socket waits in FIN_WAIT2.
    fn closed_client(local: SocketAddr, remote: SocketAddr, cookie: u64) -> SnapSocket {
        let timewait = fin_timeout_s() <= 60;
        SnapSocket {
            state: TcpState::FinWait2,
            timewait,
            local,
            remote,
            inode: 0,
            uid: if timewait { 0 } else { euid() },
            cookie,
            netns: own_netns(),
            owners: vec![],
            rqueue: 0,
            wqueue: 0,
        }
    }

    #[test]
    fn close_wait_server_listener_and_fin_wait2_client() {
        let listener = listen("127.0.0.1:0", 7);
        let laddr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(laddr).expect("connect");
        let caddr = client.local_addr().expect("client addr");
        let client_cookie = cookie_of(&client);
        let (server, _) = listener.accept().expect("accept");
        drop(client);
        let snap = take_until(|s| {
            has_state(s, laddr, caddr, TcpState::CloseWait)
                && has_state(s, caddr, laddr, TcpState::FinWait2)
        });
        assert!(snap.taken_mono_start_ns <= snap.taken_mono_end_ns);

        let expected_server = SnapSocket {
            state: TcpState::CloseWait,
            timewait: false,
            local: laddr,
            remote: caddr,
            inode: inode_of(&server),
            uid: euid(),
            cookie: cookie_of(&server),
            netns: own_netns(),
            owners: vec![us()],
            // The FIN occupies one sequence number the application has not read yet.
            rqueue: 1,
            wqueue: 0,
        };
        assert_eq!(one(&snap, laddr, caddr), expected_server);
        assert_ne!(expected_server.inode, 0);
        assert_eq!(
            one(&snap, laddr, unspecified(false)),
            listener_socket(&listener, 7, 0)
        );
        assert_eq!(
            one(&snap, caddr, laddr),
            closed_client(caddr, laddr, client_cookie)
        );
    }

    #[test]
    fn unaccepted_child_has_no_file_and_fills_the_accept_queue() {
        let listener = listen("127.0.0.1:0", 5);
        let laddr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(laddr).expect("connect");
        let caddr = client.local_addr().expect("client addr");
        let client_cookie = cookie_of(&client);
        drop(client);
        let snap = take_until(|s| {
            has_state(s, laddr, caddr, TcpState::CloseWait)
                && has_state(s, caddr, laddr, TcpState::FinWait2)
        });

        let child = one(&snap, laddr, caddr);
        assert_ne!(child.cookie, 0, "sock_diag generates a cookie on demand");
        let expected_child = SnapSocket {
            state: TcpState::CloseWait,
            timewait: false,
            local: laddr,
            remote: caddr,
            inode: 0,
            // The child inherits the listener's owner uid before anyone accepts it.
            uid: euid(),
            cookie: child.cookie,
            netns: own_netns(),
            owners: vec![],
            rqueue: 1,
            wqueue: 0,
        };
        assert_eq!(child, expected_child);
        assert_eq!(
            one(&snap, laddr, unspecified(false)),
            listener_socket(&listener, 5, 1)
        );
        assert_eq!(
            one(&snap, caddr, laddr),
            closed_client(caddr, laddr, client_cookie)
        );
    }

    fn established(stream: &TcpStream) -> SnapSocket {
        let unmap = |a: SocketAddr| SocketAddr::new(unmapped(a.ip()), a.port());
        SnapSocket {
            state: TcpState::Established,
            timewait: false,
            local: unmap(stream.local_addr().expect("local")),
            remote: unmap(stream.peer_addr().expect("peer")),
            inode: inode_of(stream),
            uid: euid(),
            cookie: cookie_of(stream),
            netns: own_netns(),
            owners: vec![us()],
            rqueue: 0,
            wqueue: 0,
        }
    }

    #[test]
    fn ipv6_loopback_and_v4_mapped_peers() {
        let Ok(listener) = TcpListener::bind("[::1]:0") else {
            return cannot_run("no IPv6 loopback (::1) on this host");
        };
        // SAFETY: as in `listen`.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 9) }, 0);
        let laddr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(laddr).expect("connect ::1");
        let (server, _) = listener.accept().expect("accept");

        // A dual-stack listener: the accepted socket is AF_INET6 with v4-mapped addresses.
        let dual = listen("[::]:0", 3);
        let v4_target = SocketAddr::new(
            Ipv4Addr::LOCALHOST.into(),
            dual.local_addr().expect("addr").port(),
        );
        let v4_client = TcpStream::connect(v4_target).expect("connect 127.0.0.1");
        let (v4_server, _) = dual.accept().expect("accept v4");
        let snap = take_ok();

        let caddr = client.local_addr().expect("client addr");
        assert!(caddr.is_ipv6());
        assert_eq!(one(&snap, laddr, caddr), established(&server));
        assert_eq!(one(&snap, caddr, laddr), established(&client));
        assert_eq!(
            one(&snap, laddr, unspecified(true)),
            listener_socket(&listener, 9, 0)
        );

        let v4_caddr = v4_client.local_addr().expect("client addr");
        assert!(
            v4_server.local_addr().expect("local").is_ipv6(),
            "std does not unmap"
        );
        assert_eq!(one(&snap, v4_target, v4_caddr), established(&v4_server));
        assert_eq!(one(&snap, v4_caddr, v4_target), established(&v4_client));
        assert_eq!(
            one(&snap, dual.local_addr().expect("addr"), unspecified(true)),
            listener_socket(&dual, 3, 0)
        );
    }

    /// Brings `lo` up in the calling thread's network namespace.
    fn bring_lo_up() -> io::Result<()> {
        let udp = std::net::UdpSocket::bind("0.0.0.0:0")?;
        // SAFETY: an all-zero ifreq is valid; the ioctls read and write only it.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, &s) in ifr.ifr_name.iter_mut().zip(b"lo") {
            *d = s as libc::c_char;
        }
        // SAFETY: see above.
        unsafe {
            if libc::ioctl(udp.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) != 0 {
                return Err(io::Error::last_os_error());
            }
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(udp.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// What the namespace thread made: its namespace, a listener and an accepted pair.
    struct InNetns {
        netns: u64,
        listener: SnapSocket,
        server: SnapSocket,
        client: SnapSocket,
    }

    /// In a thread of its own: a new network namespace with a listener and one
    /// established connection, kept open until `stop` is dropped.
    fn sockets_in_new_netns(stop: mpsc::Receiver<()>) -> io::Result<InNetns> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let made = (|| {
                // SAFETY: unsharing the network namespace affects only this thread.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                bring_lo_up()?;
                let listener = listen("127.0.0.1:0", 4);
                let client = TcpStream::connect(listener.local_addr()?)?;
                let (server, _) = listener.accept()?;
                let netns = own_netns();
                let at_home = |mut s: SnapSocket| {
                    s.netns = netns;
                    s
                };
                let made = InNetns {
                    netns,
                    listener: at_home(listener_socket(&listener, 4, 0)),
                    server: at_home(established(&server)),
                    client: at_home(established(&client)),
                };
                Ok((made, (listener, client, server)))
            })();
            match made {
                Ok((made, sockets)) => {
                    let _ = tx.send(Ok(made));
                    let _ = stop.recv();
                    drop(sockets);
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
        rx.recv().expect("namespace thread answers")
    }

    #[test]
    fn sockets_of_another_network_namespace() {
        let (stop, stopped) = mpsc::channel::<()>();
        let made = match sockets_in_new_netns(stopped) {
            Ok(made) => made,
            Err(e) => return cannot_run(&format!("cannot create a network namespace: {e}")),
        };
        assert_ne!(made.netns, own_netns());
        let snap = take_ok();
        drop(stop);

        for want in [made.listener, made.server, made.client] {
            assert_eq!(one_in(&snap, made.netns, want.local, want.remote), want);
        }
        assert!(
            !snap
                .errors
                .iter()
                .any(|e| e.contains(&made.netns.to_string())),
            "{:?}",
            snap.errors
        );
    }

    fn ss_state(name: &str) -> TcpState {
        match name {
            "ESTAB" => TcpState::Established,
            "SYN-SENT" => TcpState::SynSent,
            "SYN-RECV" => TcpState::SynRecv,
            "FIN-WAIT-1" => TcpState::FinWait1,
            "FIN-WAIT-2" => TcpState::FinWait2,
            "TIME-WAIT" => TcpState::TimeWait,
            "CLOSE" | "UNCONN" => TcpState::Close,
            "CLOSE-WAIT" => TcpState::CloseWait,
            "LAST-ACK" => TcpState::LastAck,
            "LISTEN" => TcpState::Listen,
            "CLOSING" => TcpState::Closing,
            other => panic!("unknown ss state {other:?}"),
        }
    }

    /// The port of an ss address (`127.0.0.1:80`, `[::1]:80`, `*:*`).
    fn port_of(ss_addr: &str) -> Option<u16> {
        ss_addr.rsplit_once(':')?.1.parse().ok()
    }

    #[test]
    fn state_counts_match_ss() {
        match std::process::Command::new("ss").arg("-V").output() {
            Ok(out) if out.status.success() => {}
            other => return cannot_run(&format!("`ss` (iproute2) is not runnable: {other:?}")),
        }
        // LISTEN, an ESTAB pair, a CLOSE-WAIT + FIN-WAIT-2 pair, a TIME-WAIT (its server
        // closed too), an unaccepted CLOSE-WAIT child + FIN-WAIT-2 client; an ESTAB pair
        // and a LISTEN over IPv6.
        let l4 = listen("127.0.0.1:0", 16);
        let a4 = l4.local_addr().expect("addr");
        let est_c = TcpStream::connect(a4).expect("connect");
        let (est_s, _) = l4.accept().expect("accept");
        let cw_c = TcpStream::connect(a4).expect("connect");
        let (cw_s, _) = l4.accept().expect("accept");
        drop(cw_c);
        let tw_c = TcpStream::connect(a4).expect("connect");
        let (mut tw_s, _) = l4.accept().expect("accept");
        let tw_addr = tw_c.local_addr().expect("addr");
        drop(tw_c);
        assert_eq!(tw_s.read(&mut [0u8; 1]).expect("EOF"), 0);
        drop(tw_s);
        let orphan_c = TcpStream::connect(a4).expect("connect");
        drop(orphan_c);
        let l6 = TcpListener::bind("[::1]:0").ok();
        let v6 = l6.as_ref().map(|l| {
            let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect ::1");
            (c, l.accept().expect("accept ::1").0)
        });
        let ports: Vec<u16> = [
            Some(a4.port()),
            l6.as_ref().map(|l| l.local_addr().expect("addr").port()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let ours = |local: Option<u16>, remote: Option<u16>| {
            local.is_some_and(|p| ports.contains(&p)) || remote.is_some_and(|p| ports.contains(&p))
        };
        let mine = |snap: &Snapshot| Snapshot {
            sockets: snap
                .sockets
                .iter()
                .filter(|s| ours(Some(s.local.port()), Some(s.remote.port())))
                .cloned()
                .collect(),
            ..Snapshot::default()
        };
        let quiet = |snap: &Snapshot| {
            let c = state_counts(&mine(snap), Some(own_netns()));
            c[TcpState::CloseWait as usize] == 2
                && c[TcpState::FinWait2 as usize] == 2
                && c[TcpState::TimeWait as usize] == 1
                && c[TcpState::LastAck as usize] == 0
        };

        let started = Instant::now();
        let snap = take_until(quiet);
        let out = std::process::Command::new("ss")
            .arg("-Htan")
            .output()
            .expect("run ss -Htan");
        assert!(out.status.success(), "ss -Htan: {out:?}");
        let mut from_ss = [0u64; 14];
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            assert!(cols.len() >= 5, "unexpected ss line {line:?}");
            if ours(port_of(cols[3]), port_of(cols[4])) {
                from_ss[ss_state(cols[0]) as usize] += 1;
            }
        }
        let from_snapshot = state_counts(&mine(&snap), Some(own_netns()));
        eprintln!("ports {ports:?}: snapshot {from_snapshot:?}, ss {from_ss:?}");
        assert_eq!(from_snapshot, from_ss);
        let v6_pairs = if v6.is_some() { 2 } else { 0 };
        let mut expected = [0u64; 14];
        expected[TcpState::Listen as usize] = ports.len() as u64;
        expected[TcpState::Established as usize] = 2 + v6_pairs;
        expected[TcpState::CloseWait as usize] = 2;
        expected[TcpState::FinWait2 as usize] = 2;
        expected[TcpState::TimeWait as usize] = 1;
        assert_eq!(from_snapshot, expected);
        let tw = one(&snap, tw_addr, a4);
        assert_eq!(
            (tw.state, tw.timewait, tw.inode, tw.uid),
            (TcpState::TimeWait, true, 0, 0)
        );
        assert!(tw.owners.is_empty());
        drop((est_c, est_s, cw_s, v6));

        // How long one snapshot takes here (the whole host, all namespaces).
        let t = Instant::now();
        let snap = take_ok();
        eprintln!(
            "take(): {:?} for {} sockets ({} owned) in {} namespaces, dump window {} us; errors {:?} (test ran {:?})",
            t.elapsed(),
            snap.sockets.len(),
            snap.sockets.iter().filter(|s| !s.owners.is_empty()).count(),
            snap.sockets
                .iter()
                .map(|s| s.netns)
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            (snap.taken_mono_end_ns - snap.taken_mono_start_ns) / 1000,
            snap.errors,
            started.elapsed(),
        );
    }

    #[test]
    fn a_socket_listed_twice_keeps_its_last_report() {
        let at = |port: u16, cookie: u64, state: TcpState| SnapSocket {
            state,
            timewait: state == TcpState::TimeWait,
            local: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
            remote: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 80),
            inode: 0,
            uid: 0,
            cookie,
            netns: 1,
            owners: vec![],
            rqueue: 0,
            wqueue: 0,
        };
        let mut sockets = vec![
            at(1, 10, TcpState::FinWait1),
            at(2, 20, TcpState::Established),
            at(1, 10, TcpState::TimeWait),
            at(3, 30, TcpState::Listen),
        ];
        keep_last_report(&mut sockets);
        let kept: Vec<_> = sockets.iter().map(|s| (s.cookie, s.state)).collect();
        assert_eq!(
            kept,
            [
                (20, TcpState::Established),
                (10, TcpState::TimeWait),
                (30, TcpState::Listen)
            ]
        );
    }

    #[test]
    fn socket_links_parse() {
        assert_eq!(socket_link_inode(b"socket:[12345]"), Some(12345));
        assert_eq!(socket_link_inode(b"socket:[4294967295]"), Some(4294967295));
        assert_eq!(socket_link_inode(b"pipe:[12345]"), None);
        assert_eq!(socket_link_inode(b"socket:[12"), None);
        assert_eq!(socket_link_inode(b"/dev/null"), None);
    }
}
