//! The daemon's model of one TCP state change: states by name, addresses by family, and
//! the owner as the kernel reported it. Everything downstream (engine, rules, sinks) works
//! on [`Transition`]; nothing downstream sees the wire format.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// TCP states as Linux numbers them (include/net/tcp_states.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
    BoundInactive = 13,
}

impl TcpState {
    pub const ALL: [TcpState; 13] = [
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::Closing,
        TcpState::NewSynRecv,
        TcpState::BoundInactive,
    ];

    pub fn from_kernel(n: u8) -> Option<TcpState> {
        match n {
            1..=13 => Some(Self::ALL[usize::from(n) - 1]),
            _ => None,
        }
    }

    /// The name `ss`, bcc and the kernel's tracepoint use.
    pub fn name(self) -> &'static str {
        match self {
            TcpState::Established => "ESTABLISHED",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Listen => "LISTEN",
            TcpState::Closing => "CLOSING",
            TcpState::NewSynRecv => "NEW_SYN_RECV",
            TcpState::BoundInactive => "BOUND_INACTIVE",
        }
    }

    pub fn from_name(s: &str) -> Option<TcpState> {
        Self::from_name_bytes(s.as_bytes())
    }

    /// `from_name` on bytes, as one `match` (a jump on the length, then one compare): the
    /// log parser's hot path.
    #[inline(always)]
    pub fn from_name_bytes(s: &[u8]) -> Option<TcpState> {
        use TcpState::*;
        Some(match s {
            b"ESTABLISHED" => Established,
            b"SYN_SENT" => SynSent,
            b"SYN_RECV" => SynRecv,
            b"FIN_WAIT1" => FinWait1,
            b"FIN_WAIT2" => FinWait2,
            b"TIME_WAIT" => TimeWait,
            b"CLOSE" => Close,
            b"CLOSE_WAIT" => CloseWait,
            b"LAST_ACK" => LastAck,
            b"LISTEN" => Listen,
            b"CLOSING" => Closing,
            b"NEW_SYN_RECV" => NewSynRecv,
            b"BOUND_INACTIVE" => BoundInactive,
            _ => return None,
        })
    }
}

impl serde::Serialize for TcpState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for TcpState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        TcpState::from_name(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown TCP state {s:?}")))
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// A task's command name as the kernel keeps it (at most 15 bytes + NUL).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm(pub [u8; 16]);

impl Comm {
    pub fn new(s: &str) -> Comm {
        let mut b = [0u8; 16];
        let n = s.len().min(15);
        b[..n].copy_from_slice(&s.as_bytes()[..n]);
        Comm(b)
    }

    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        let end = self.0.iter().position(|&c| c == 0).unwrap_or(self.0.len());
        String::from_utf8_lossy(&self.0[..end])
    }
}

impl fmt::Display for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.as_str())
    }
}

impl serde::Serialize for Comm {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Comm {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(Comm::new(&s))
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// The task that was current when the tracepoint fired. In softirq context this is
/// whatever happened to be running, not necessarily the socket's owner.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub struct Task {
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Thread id (the kernel's pid).
    pub tid: u32,
    pub comm: Comm,
}

/// Which call of the owner's the kernel side recorded the owner at.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum OwnerVia {
    /// No owner recorded (yet).
    #[default]
    Unknown,
    Connect,
    Listen,
    /// The process whose accept() returned this socket.
    Accept,
    /// close() or shutdown().
    Close,
    /// Inherited from the listener whose accept queue the socket sits in (not accepted).
    Listener,
    /// Found holding a file descriptor to it in /proc at start-up (the snapshot).
    Fd,
}

impl OwnerVia {
    pub fn name(self) -> &'static str {
        match self {
            OwnerVia::Unknown => "unknown",
            OwnerVia::Connect => "connect",
            OwnerVia::Listen => "listen",
            OwnerVia::Accept => "accept",
            OwnerVia::Close => "close",
            OwnerVia::Listener => "listener",
            OwnerVia::Fd => "fd",
        }
    }

    pub const ALL: [OwnerVia; 7] = [
        OwnerVia::Unknown,
        OwnerVia::Connect,
        OwnerVia::Listen,
        OwnerVia::Accept,
        OwnerVia::Close,
        OwnerVia::Listener,
        OwnerVia::Fd,
    ];

    pub fn from_name(s: &str) -> Option<OwnerVia> {
        Self::from_name_bytes(s.as_bytes())
    }

    /// `from_name` on bytes, as one `match` (the log parser's hot path).
    #[inline(always)]
    pub fn from_name_bytes(s: &[u8]) -> Option<OwnerVia> {
        Some(match s {
            b"unknown" => OwnerVia::Unknown,
            b"connect" => OwnerVia::Connect,
            b"listen" => OwnerVia::Listen,
            b"accept" => OwnerVia::Accept,
            b"close" => OwnerVia::Close,
            b"listener" => OwnerVia::Listener,
            b"fd" => OwnerVia::Fd,
            _ => return None,
        })
    }
}

/// What the kernel side knows about a connection besides its tuple: where its owner was
/// recorded, the owner's uid and cgroup, the socket's network namespace, and whether it
/// still sits unaccepted in a listener's queue. Zero means unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnMeta {
    pub owner_via: OwnerVia,
    /// Owner's uid; meaningful only when `owner_via` is not `Unknown`.
    pub uid: u32,
    /// Owner's cgroup v2 id (the cgroup directory's inode number); 0 unknown.
    pub cgroup_id: u64,
    /// Inode of the socket's network namespace (`/proc/<pid>/ns/net`); 0 unknown.
    pub netns: u32,
    /// A listener's child that no process has accepted yet.
    pub unaccepted: bool,
    /// The owner's container, when its cgroup path shows one: the id's first 12 hex
    /// digits, as `docker ps` shows it; all zero when none.
    pub container: [u8; 12],
}

impl ConnMeta {
    pub fn container(&self) -> Option<&str> {
        (self.container != [0; 12]).then(|| std::str::from_utf8(&self.container).unwrap_or(""))
    }
}

/// What an event says happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum EventKind {
    /// A state change `old` → `new`.
    #[default]
    State,
    /// Not a state change (`old == new`): a process accept()ed the socket and now owns it.
    Accept,
    /// Not a state change (`old == new`): the application has closed the socket and the
    /// kernel moved the connection, still in this state (FIN_WAIT2), to a timewait
    /// mini-socket, which ends on its own after tcp_fin_timeout.
    Handoff,
    /// Not a state change (`old == new`): the socket was found in this state by the
    /// start-up snapshot; it predates the tracer, so its history before is unknown.
    Present,
    /// Not a state change (`old == new`, its last known state): the connection's socket
    /// is gone and its end was never seen (the kernel program missed it). Known because a
    /// new life started at the socket's address, which the kernel reuses only once the
    /// socket is freed.
    Vanished,
}

impl EventKind {
    /// The NDJSON `type` of an event of this kind.
    pub fn record_type(self) -> &'static str {
        match self {
            EventKind::State => "transition",
            EventKind::Accept => "accept",
            EventKind::Handoff => "handoff",
            EventKind::Present => "present",
            EventKind::Vanished => "vanished",
        }
    }

    /// The kind of an NDJSON record `type`; None for the other record types.
    pub fn from_record_type(s: &str) -> Option<EventKind> {
        [
            EventKind::State,
            EventKind::Accept,
            EventKind::Handoff,
            EventKind::Present,
            EventKind::Vanished,
        ]
        .into_iter()
        .find(|k| k.record_type() == s)
    }
}

/// One TCP state change of one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Kernel CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Unique per connection for the life of the tracer, even when `skaddr` is reused.
    pub conn_id: u64,
    pub skaddr: u64,
    pub task: Task,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub old: TcpState,
    pub new: TcpState,
    /// The kernel program gave this socket a new identity here (connect, listen, new child).
    pub starts_conn: bool,
    /// The socket was first seen mid-life: it predates the tracer (or was evicted).
    pub midlife: bool,
    pub cpu: u32,
    /// The socket's owner as recorded in the owner's own context (connect, listen, accept,
    /// close) by the kernel side, when it knows it. `None` means unknown: never guess from
    /// `task`, which in softirq is whatever happened to run.
    pub owner: Option<Task>,
    pub meta: ConnMeta,
    pub kind: EventKind,
}

/// An address as the kernel program's events (and binary records) carry it: IPv4 in the
/// first 4 bytes, the rest zero; IPv6 whole. The inverse of [`ip_from_wire`].
pub fn ip_to_wire(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// An address read by family; an IPv4-mapped IPv6 address is shown as the IPv4 address.
pub fn ip_from_wire(family_v6: bool, bytes: &[u8; 16]) -> IpAddr {
    if family_v6 {
        let v6 = Ipv6Addr::from(*bytes);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_by_number_and_name() {
        for (i, st) in TcpState::ALL.iter().enumerate() {
            assert_eq!(TcpState::from_kernel(i as u8 + 1), Some(*st));
            assert_eq!(TcpState::from_name(st.name()), Some(*st));
        }
        assert_eq!(TcpState::from_kernel(0), None);
        assert_eq!(TcpState::from_kernel(14), None);
        assert_eq!(TcpState::CloseWait.name(), "CLOSE_WAIT");
        assert_eq!(TcpState::SynSent.to_string(), "SYN_SENT");
        assert_eq!(format!("{:<12}|", TcpState::Listen), "LISTEN      |");
    }

    #[test]
    fn v4_mapped_v6_prints_as_v4_and_v4_ignores_tail_junk() {
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&[10, 0, 0, 5]);
        assert_eq!(ip_from_wire(true, &mapped).to_string(), "10.0.0.5");
        let lo6 = Ipv6Addr::LOCALHOST.octets();
        assert_eq!(ip_from_wire(true, &lo6).to_string(), "::1");
        let mut v4 = [0xAAu8; 16];
        v4[..4].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(ip_from_wire(false, &v4).to_string(), "127.0.0.1");
    }

    #[test]
    fn comm_is_nul_terminated_and_truncated() {
        assert_eq!(Comm::new("leaky-server").as_str(), "leaky-server");
        assert_eq!(
            Comm::new("a-very-long-command-name").as_str(),
            "a-very-long-com"
        );
        assert_eq!(Comm::default().as_str(), "");
    }
}
