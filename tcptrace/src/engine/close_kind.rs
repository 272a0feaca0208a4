//! How a connection ended, decided from the kernel-reported state it left for CLOSE (never
//! from the engine's possibly stale view), so lost events cannot make a close look like
//! something it was not.

use crate::event::TcpState;
use TcpState::*;
use serde::{Deserialize, Serialize};

/// How a connection ended. Serialised in snake_case (`active_close`, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseKind {
    ActiveClose,
    PassiveClose,
    SimultaneousClose,
    Reset,
    ConnectFailed,
    /// Reserved: SYN_SENT→CLOSE after a RST (needs a `reset_seen` signal from the kernel).
    ConnectRefused,
    /// Reserved: SYN_SENT→CLOSE without a RST (needs a `reset_seen` signal from the kernel).
    ConnectTimedOut,
    HandshakeAborted,
    ListenerClosed,
    Unknown,
}

impl CloseKind {
    pub const COUNT: usize = 10;
    pub const ALL: [CloseKind; Self::COUNT] = [
        CloseKind::ActiveClose,
        CloseKind::PassiveClose,
        CloseKind::SimultaneousClose,
        CloseKind::Reset,
        CloseKind::ConnectFailed,
        CloseKind::ConnectRefused,
        CloseKind::ConnectTimedOut,
        CloseKind::HandshakeAborted,
        CloseKind::ListenerClosed,
        CloseKind::Unknown,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The snake_case name used in NDJSON and metrics.
    pub fn name(self) -> &'static str {
        match self {
            CloseKind::ActiveClose => "active_close",
            CloseKind::PassiveClose => "passive_close",
            CloseKind::SimultaneousClose => "simultaneous_close",
            CloseKind::Reset => "reset",
            CloseKind::ConnectFailed => "connect_failed",
            CloseKind::ConnectRefused => "connect_refused",
            CloseKind::ConnectTimedOut => "connect_timed_out",
            CloseKind::HandshakeAborted => "handshake_aborted",
            CloseKind::ListenerClosed => "listener_closed",
            CloseKind::Unknown => "unknown",
        }
    }

    /// One line for humans (README, `--help`, terminal legend).
    pub fn describe(self) -> &'static str {
        match self {
            CloseKind::ActiveClose => {
                "this side closed first (FIN_WAIT1→FIN_WAIT2→CLOSE, the full socket handing over \
                 to a TIME_WAIT mini-socket); FIN_WAIT1→CLOSE means our FIN was never acknowledged \
                 (peer reset or retries exhausted)"
            }
            CloseKind::PassiveClose => "the peer closed first (CLOSE_WAIT→LAST_ACK→CLOSE)",
            CloseKind::SimultaneousClose => "both sides sent FIN at once (through CLOSING)",
            CloseKind::Reset => {
                "an established connection went straight to CLOSE (ESTABLISHED or CLOSE_WAIT→CLOSE): \
                 a RST was received or sent, or the socket was aborted"
            }
            CloseKind::ConnectFailed => {
                "connect() failed (SYN_SENT→CLOSE): refused, timed out, or abandoned by the app; \
                 the state-change tracepoint alone cannot tell these apart"
            }
            CloseKind::ConnectRefused => {
                "connect() was refused: the peer answered the SYN with RST"
            }
            CloseKind::ConnectTimedOut => "connect() timed out: no answer to the SYN retries",
            CloseKind::HandshakeAborted => {
                "an incoming connection died before it was established (SYN_RECV→CLOSE)"
            }
            CloseKind::ListenerClosed => "a listening socket was closed (LISTEN→CLOSE)",
            CloseKind::Unknown => {
                "the path to CLOSE was not observed well enough to say (lost events or an \
                 illegal transition)"
            }
        }
    }
}

/// Facts about a connection beyond its states that can sharpen the classification. Empty
/// today: the hook for a kernel-side `reset_seen` flag, which would split ConnectFailed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloseEvidence {
    /// `Some(true)`: a RST arrived while connecting; `Some(false)`: none did; `None`: unknown.
    pub reset_seen: Option<bool>,
}

/// Classifies a close from the state the kernel says the socket left for CLOSE (`old`),
/// plus, for TIME_WAIT only, the state it entered TIME_WAIT from when that was observed
/// (`time_wait_from`: None if TIME_WAIT's entry was lost).
pub fn classify(
    old: TcpState,
    time_wait_from: Option<TcpState>,
    evidence: CloseEvidence,
) -> CloseKind {
    match old {
        // FIN_WAIT2 is only reached from FIN_WAIT1 and never leads to CLOSING, so these are
        // certain even when earlier events were lost.
        FinWait1 | FinWait2 => CloseKind::ActiveClose,
        Closing => CloseKind::SimultaneousClose,
        LastAck => CloseKind::PassiveClose,
        Established | CloseWait => CloseKind::Reset,
        SynSent => match evidence.reset_seen {
            Some(true) => CloseKind::ConnectRefused,
            Some(false) => CloseKind::ConnectTimedOut,
            None => CloseKind::ConnectFailed,
        },
        SynRecv => CloseKind::HandshakeAborted,
        Listen => CloseKind::ListenerClosed,
        TimeWait => match time_wait_from {
            Some(FinWait1 | FinWait2) => CloseKind::ActiveClose,
            Some(Closing) => CloseKind::SimultaneousClose,
            _ => CloseKind::Unknown,
        },
        Close | NewSynRecv | BoundInactive => CloseKind::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(old: TcpState) -> CloseKind {
        classify(old, None, CloseEvidence::default())
    }

    #[test]
    fn each_final_state_maps_to_one_kind() {
        assert_eq!(plain(FinWait2), CloseKind::ActiveClose);
        assert_eq!(plain(FinWait1), CloseKind::ActiveClose);
        assert_eq!(plain(Closing), CloseKind::SimultaneousClose);
        assert_eq!(plain(LastAck), CloseKind::PassiveClose);
        assert_eq!(plain(Established), CloseKind::Reset);
        assert_eq!(plain(CloseWait), CloseKind::Reset);
        assert_eq!(plain(SynSent), CloseKind::ConnectFailed);
        assert_eq!(plain(SynRecv), CloseKind::HandshakeAborted);
        assert_eq!(plain(Listen), CloseKind::ListenerClosed);
        assert_eq!(plain(Close), CloseKind::Unknown);
        assert_eq!(plain(NewSynRecv), CloseKind::Unknown);
    }

    #[test]
    fn time_wait_needs_its_observed_entry() {
        let ev = CloseEvidence::default();
        assert_eq!(
            classify(TimeWait, Some(FinWait2), ev),
            CloseKind::ActiveClose
        );
        assert_eq!(
            classify(TimeWait, Some(FinWait1), ev),
            CloseKind::ActiveClose
        );
        assert_eq!(
            classify(TimeWait, Some(Closing), ev),
            CloseKind::SimultaneousClose
        );
        assert_eq!(
            classify(TimeWait, None, ev),
            CloseKind::Unknown,
            "entry lost: don't guess"
        );
    }

    #[test]
    fn reset_seen_hook_splits_connect_failed() {
        let refused = CloseEvidence {
            reset_seen: Some(true),
        };
        let silent = CloseEvidence {
            reset_seen: Some(false),
        };
        assert_eq!(classify(SynSent, None, refused), CloseKind::ConnectRefused);
        assert_eq!(classify(SynSent, None, silent), CloseKind::ConnectTimedOut);
        assert_eq!(
            classify(Established, None, refused),
            CloseKind::Reset,
            "only for SYN_SENT"
        );
    }

    #[test]
    fn names_and_indices_are_stable() {
        for (i, k) in CloseKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
            let json = serde_json::to_string(k).expect("serialise");
            assert_eq!(json, format!("\"{}\"", k.name()));
            let back: CloseKind = serde_json::from_str(&json).expect("deserialise");
            assert_eq!(back, *k);
            assert!(!k.describe().is_empty());
        }
        assert!(CloseKind::ConnectFailed.describe().contains("cannot tell"));
    }
}
