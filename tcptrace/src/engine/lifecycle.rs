//! The per-connection summary the engine emits once a connection ends (or is let go of),
//! and the timing figures derived from its state path.

use super::close_kind::CloseKind;
use super::conn::{Conn, F_GAP, F_ILLEGAL, F_PARTIAL_START, F_TRUNCATED, Spill, Step, Steps};
use crate::event::{Task, TcpState};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Which side opened the connection, as far as the engine saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Role {
    /// connect(): CLOSE→SYN_SENT.
    ActiveOpen,
    /// An accepted child: LISTEN→SYN_RECV.
    PassiveOpen,
    /// listen(): CLOSE→LISTEN.
    Listener,
    Unknown,
}

impl Role {
    /// The name the NDJSON schema uses (serde's snake_case).
    pub fn name(self) -> &'static str {
        match self {
            Role::ActiveOpen => "active_open",
            Role::PassiveOpen => "passive_open",
            Role::Listener => "listener",
            Role::Unknown => "unknown",
        }
    }

    /// The role a first-seen transition implies; mid-life sockets often cannot say.
    pub fn from_first(old: TcpState, new: TcpState) -> Role {
        use TcpState::*;
        match (old, new) {
            (SynSent, _) | (_, SynSent) => Role::ActiveOpen,
            (Listen, SynRecv) => Role::PassiveOpen,
            (Listen, _) | (_, Listen) => Role::Listener,
            _ => Role::Unknown,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
}

/// Why the record was emitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The connection reached CLOSE.
    Closed,
    /// Dropped to stay under `max_connections` while still open.
    Evicted,
    /// Still open when the input ended (`Engine::finish`).
    Finished,
    /// The kernel side started a new identity under the same conn_id (should not happen).
    Superseded,
    /// Its socket was gone from the kernel while the engine still had it open: its end was
    /// lost (a recursion miss, or a full ring buffer).
    Vanished,
}

impl EndReason {
    pub fn name(self) -> &'static str {
        match self {
            EndReason::Closed => "closed",
            EndReason::Evicted => "evicted",
            EndReason::Finished => "finished",
            EndReason::Superseded => "superseded",
            EndReason::Vanished => "vanished",
        }
    }
}

/// One state the connection passed through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathStep {
    pub state: TcpState,
    /// When the state began (kernel CLOCK_MONOTONIC ns); None when not observed (the
    /// origin state, or a state reached through lost events).
    pub entered_ns: Option<u64>,
    /// Time spent in the state; None when either end was not observed, and for the last.
    pub duration_ns: Option<u64>,
    /// Events were lost just before this step.
    pub gap_before: bool,
}

/// One connection's life, emitted once: at CLOSE, or as a partial record when evicted,
/// superseded or still open at the end of input. Field names are the NDJSON schema.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleRecord {
    pub conn_id: u64,
    /// The fullest local address seen (the SYN_SENT event lacks the port).
    pub local: SocketAddr,
    /// The fullest remote address seen (a child's first event carries its listener's).
    pub remote: SocketAddr,
    pub family: Family,
    pub role: Role,
    pub owner: Option<Task>,
    /// First observed transition.
    pub start_ts_ns: u64,
    /// The CLOSE transition, or when the record was cut (evicted/finished/superseded).
    pub end_ts_ns: u64,
    pub path: Vec<PathStep>,
    /// SYN_SENT (or SYN_RECV for an accepted child) → ESTABLISHED, when both were seen.
    /// A child's clock starts at the final ACK's clone, not at the client's SYN.
    pub handshake_ns: Option<u64>,
    /// Time in ESTABLISHED, when both its start and its end were seen.
    pub established_ns: Option<u64>,
    /// Identity start → CLOSE; None if either was not observed.
    pub lifetime_ns: Option<u64>,
    /// None when the connection did not reach CLOSE.
    pub close_kind: Option<CloseKind>,
    pub end: EndReason,
    /// Seen from its start to CLOSE with no lost events and no illegal transitions.
    pub complete: bool,
    /// First seen mid-life: it predates the tracer, or its start was lost or evicted.
    pub partial_start: bool,
    /// A transition's old state did not match the state last seen: events were lost.
    pub gap: bool,
    /// At least one transition was illegal for Linux's TCP machine.
    pub illegal: bool,
    /// The path hit its length cap; later steps are missing from `path`.
    pub path_truncated: bool,
}

impl LifecycleRecord {
    /// Builds the record from a connection that is being let go of.
    pub fn from_conn(
        c: &Conn,
        spill: &Spill,
        owner: Option<Task>,
        end_ts: u64,
        end: EndReason,
        close_kind: Option<CloseKind>,
    ) -> LifecycleRecord {
        // One pass, one allocation: each step's duration is set when the next one arrives.
        // (Collecting the decoded steps first cost a second vector, grown once a lifecycle
        // for a full path, ~5 % of a replay.) A complete lifecycle has at most 7 steps.
        let mut path: Vec<PathStep> = Vec::with_capacity(8);
        let steps = Steps::new(c.path_bytes(spill), c.first_ts).filter(|s| s.state.is_some());
        for s in steps {
            if let Some(prev) = path.last_mut() {
                prev.duration_ns = match (prev.entered_ns, s.ts) {
                    (Some(a), Some(b)) => b.checked_sub(a),
                    _ => None,
                };
            }
            path.push(PathStep {
                state: s.state.unwrap_or(TcpState::Close),
                entered_ns: s.ts,
                duration_ns: None,
                gap_before: s.gap,
            });
        }
        let (local, remote) = (c.local(), c.remote());
        let family = match if remote.ip().is_unspecified() {
            local
        } else {
            remote
        } {
            SocketAddr::V4(_) => Family::Ipv4,
            SocketAddr::V6(_) => Family::Ipv6,
        };
        let partial_start = c.has(F_PARTIAL_START);
        let closed = end == EndReason::Closed;
        let established_ns = path
            .iter()
            .find(|p| p.state == TcpState::Established)
            .and_then(|p| p.duration_ns);
        LifecycleRecord {
            conn_id: c.conn_id,
            local,
            remote,
            family,
            role: c.role,
            owner,
            start_ts_ns: c.first_ts,
            end_ts_ns: end_ts,
            // From the path just built, not a second decode of its bytes.
            handshake_ns: handshake_ns(path.iter().map(|p| Step {
                state: Some(p.state),
                ts: p.entered_ns,
                gap: p.gap_before,
            })),
            established_ns,
            lifetime_ns: if closed && !partial_start {
                end_ts.checked_sub(c.first_ts)
            } else {
                None
            },
            close_kind,
            end,
            complete: closed && !partial_start && !c.has(F_GAP | F_ILLEGAL | F_TRUNCATED),
            partial_start,
            gap: c.has(F_GAP),
            illegal: c.has(F_ILLEGAL),
            path_truncated: c.has(F_TRUNCATED),
            path,
        }
    }
}

/// SYN_SENT/SYN_RECV entry → ESTABLISHED entry, only when every link between them was
/// observed and the handshake's start time is known.
pub fn handshake_ns(steps: impl Iterator<Item = Step>) -> Option<u64> {
    use TcpState::*;
    // None: not in a handshake; Some(None): in one whose start is unknown.
    let mut start: Option<Option<u64>> = None;
    for s in steps {
        if s.gap {
            start = None;
        }
        match s.state {
            Some(SynSent | SynRecv) => {
                if start.is_none() {
                    start = Some(if s.gap { None } else { s.ts });
                }
            }
            Some(Established) => {
                let (Some(Some(a)), Some(b), false) = (start, s.ts, s.gap) else {
                    return None;
                };
                return b.checked_sub(a);
            }
            _ => start = None,
        }
    }
    None
}

/// The state TIME_WAIT was entered from, if that link was observed: the path's last
/// TIME_WAIT step, not a gap, and a known predecessor.
pub fn time_wait_from(c: &Conn, spill: &Spill) -> Option<TcpState> {
    let mut prev: Option<TcpState> = None;
    let mut found = None;
    for s in Steps::new(c.path_bytes(spill), c.first_ts) {
        if s.state == Some(TcpState::TimeWait) {
            found = if s.gap { None } else { prev };
        }
        prev = s.state;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use TcpState::*;

    fn st(state: TcpState, ts: Option<u64>, gap: bool) -> Step {
        Step {
            state: Some(state),
            ts,
            gap,
        }
    }

    #[test]
    fn handshake_spans_simultaneous_open_and_refuses_gaps() {
        let active = [
            st(Close, None, false),
            st(SynSent, Some(10), false),
            st(Established, Some(35), false),
        ];
        assert_eq!(handshake_ns(active.into_iter()), Some(25));
        let simul = [
            st(SynSent, Some(10), false),
            st(SynRecv, Some(20), false),
            st(Established, Some(50), false),
        ];
        assert_eq!(
            handshake_ns(simul.into_iter()),
            Some(40),
            "from SYN_SENT, not SYN_RECV"
        );
        let passive = [
            st(Listen, None, false),
            st(SynRecv, Some(100), false),
            st(Established, Some(130), false),
        ];
        assert_eq!(handshake_ns(passive.into_iter()), Some(30));
        let midlife = [st(SynSent, None, true), st(Established, Some(50), false)];
        assert_eq!(handshake_ns(midlife.into_iter()), None, "start unseen");
        let lost = [
            st(SynSent, Some(10), false),
            st(SynRecv, None, true),
            st(Established, Some(50), false),
        ];
        assert_eq!(handshake_ns(lost.into_iter()), None, "a link was lost");
        let backwards = [
            st(SynSent, Some(10), false),
            st(Established, Some(5), false),
        ];
        assert_eq!(
            handshake_ns(backwards.into_iter()),
            None,
            "clock went backwards"
        );
    }

    #[test]
    fn roles_from_first_transition() {
        assert_eq!(Role::from_first(Close, SynSent), Role::ActiveOpen);
        assert_eq!(Role::from_first(SynSent, Established), Role::ActiveOpen);
        assert_eq!(Role::from_first(Listen, SynRecv), Role::PassiveOpen);
        assert_eq!(Role::from_first(Listen, Close), Role::Listener);
        assert_eq!(Role::from_first(Close, Listen), Role::Listener);
        assert_eq!(Role::from_first(Established, CloseWait), Role::Unknown);
    }
}
