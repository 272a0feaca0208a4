//! Linux's TCP state machine as the `inet_sock_set_state` tracepoint shows it: which
//! transitions are legal, which start a connection's identity, and which fire in the
//! socket owner's own (process) context so that the reported task can be trusted.

use crate::event::TcpState;
use TcpState::*;

/// Whether the kernel can report `old → new` for a full TCP socket.
///
/// Sources (net/ipv4): `tcp_v4_connect`/`tcp_v6_connect` (CLOSE→SYN_SENT),
/// `inet_csk_listen_start` (CLOSE→LISTEN), `inet_csk_clone_lock` (a child is cloned from its
/// listener, so LISTEN→SYN_RECV), `tcp_rcv_synsent_state_process` (SYN_SENT→ESTABLISHED, or
/// SYN_RECV on a simultaneous open), `tcp_rcv_state_process` (SYN_RECV→ESTABLISHED,
/// FIN_WAIT1→FIN_WAIT2), `tcp_fin` (ESTABLISHED/SYN_RECV→CLOSE_WAIT, FIN_WAIT1→CLOSING),
/// `tcp_close_state` (ESTABLISHED/SYN_RECV→FIN_WAIT1, CLOSE_WAIT→LAST_ACK, SYN_SENT/LISTEN→
/// CLOSE) and `tcp_done`/`tcp_disconnect`/`tcp_abort` (any state → CLOSE).
///
/// `tcp_close_state` maps CLOSE, FIN_WAIT1, FIN_WAIT2, CLOSING and LAST_ACK to themselves,
/// and the tracepoint fires even when the state does not change, so close() after
/// shutdown() (or on a never-connected socket) shows up as a legal self-transition.
///
/// The X→TIME_WAIT entries are for the TIME_WAIT hooks to come: today the full socket goes
/// to CLOSE when its TIME_WAIT mini-socket replaces it. NEW_SYN_RECV (request sockets) and
/// BOUND_INACTIVE (a bind-bucket marker) never appear on a full socket: any transition
/// involving them is illegal.
pub fn is_legal(old: TcpState, new: TcpState) -> bool {
    match (old, new) {
        (NewSynRecv | BoundInactive, _) | (_, NewSynRecv | BoundInactive) => false,
        // Abort, reset, timeout or tcp_disconnect: every real state can drop to CLOSE.
        (_, Close) => true,
        (Close, SynSent | Listen) => true,
        (Listen, SynRecv) => true,
        (SynSent, Established | SynRecv) => true,
        (SynRecv, Established | FinWait1 | CloseWait) => true,
        (Established, FinWait1 | CloseWait) => true,
        (FinWait1, FinWait2 | Closing | TimeWait | FinWait1) => true,
        (FinWait2, TimeWait | FinWait2) => true,
        (Closing, TimeWait | Closing) => true,
        (CloseWait, LastAck) => true,
        (LastAck, LastAck) => true,
        _ => false,
    }
}

/// A new connection identity begins with this transition (connect, listen, accepted child).
pub fn starts_identity(old: TcpState, new: TcpState) -> bool {
    matches!(
        (old, new),
        (Close, SynSent) | (Close, Listen) | (Listen, SynRecv)
    )
}

/// The transition runs in the socket owner's own syscall context (connect, listen, close,
/// shutdown), so `Transition::task` names the owner. Everything else can fire in softirq,
/// where the task is whoever was running — on loopback usually the peer process.
pub fn in_owner_context(old: TcpState, new: TcpState) -> bool {
    matches!(
        (old, new),
        (Close, SynSent)
            | (Close, Listen)
            | (Established | SynRecv, FinWait1)
            | (CloseWait, LastAck)
            // Only tcp_close_state (close()/shutdown()) reports these self-transitions.
            | (FinWait1, FinWait1)
            | (FinWait2, FinWait2)
            | (Closing, Closing)
            | (LastAck, LastAck)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The full legal table, written out so a change to `is_legal` has to change this too.
    const LEGAL: &[(TcpState, TcpState)] = &[
        (Close, SynSent),
        (Close, Listen),
        (Close, Close),
        (Listen, SynRecv),
        (Listen, Close),
        (SynSent, Established),
        (SynSent, SynRecv),
        (SynSent, Close),
        (SynRecv, Established),
        (SynRecv, FinWait1),
        (SynRecv, CloseWait),
        (SynRecv, Close),
        (Established, FinWait1),
        (Established, CloseWait),
        (Established, Close),
        (FinWait1, FinWait2),
        (FinWait1, Closing),
        (FinWait1, TimeWait),
        (FinWait1, Close),
        (FinWait1, FinWait1),
        (FinWait2, TimeWait),
        (FinWait2, Close),
        (FinWait2, FinWait2),
        (Closing, TimeWait),
        (Closing, Close),
        (Closing, Closing),
        (CloseWait, LastAck),
        (CloseWait, Close),
        (LastAck, Close),
        (LastAck, LastAck),
        (TimeWait, Close),
    ];

    #[test]
    fn legal_table_is_exactly_the_kernel_machine() {
        let mut legal = 0;
        for old in TcpState::ALL {
            for new in TcpState::ALL {
                let want = LEGAL.contains(&(old, new));
                assert_eq!(is_legal(old, new), want, "{old}→{new}");
                legal += usize::from(want);
            }
        }
        assert_eq!(legal, 31, "13×13 pairs, 31 legal");
    }

    #[test]
    fn reverse_and_skipping_transitions_are_illegal() {
        assert!(!is_legal(Established, SynSent));
        assert!(!is_legal(Established, Listen));
        assert!(
            !is_legal(Established, LastAck),
            "LAST_ACK only from CLOSE_WAIT"
        );
        assert!(!is_legal(CloseWait, FinWait1));
        assert!(
            !is_legal(Close, Established),
            "connect always passes SYN_SENT"
        );
        assert!(!is_legal(TimeWait, Established));
        assert!(!is_legal(Established, Established));
        assert!(!is_legal(NewSynRecv, Close));
        assert!(!is_legal(Close, BoundInactive));
    }

    #[test]
    fn identity_starts_and_owner_context() {
        assert!(starts_identity(Close, SynSent));
        assert!(starts_identity(Close, Listen));
        assert!(starts_identity(Listen, SynRecv));
        assert!(
            !starts_identity(SynSent, SynRecv),
            "simultaneous open keeps the identity"
        );
        assert!(in_owner_context(Close, SynSent));
        assert!(in_owner_context(Close, Listen));
        assert!(in_owner_context(Established, FinWait1));
        assert!(in_owner_context(SynRecv, FinWait1));
        assert!(in_owner_context(CloseWait, LastAck));
        assert!(in_owner_context(FinWait2, FinWait2));
        assert!(
            !in_owner_context(Established, CloseWait),
            "softirq: the peer's FIN"
        );
        assert!(
            !in_owner_context(Listen, SynRecv),
            "softirq: the client's final ACK"
        );
        assert!(!in_owner_context(SynSent, Established));
        assert!(
            !in_owner_context(Established, Close),
            "RST in softirq or `ss -K`"
        );
        assert!(
            !in_owner_context(Listen, Close),
            "`ss -K` kills from another process"
        );
    }
}
