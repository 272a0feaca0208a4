//! Anomaly rules: small detectors fed by the lifecycle engine, each behind the one [`Rule`]
//! trait, each in its own file. Adding a rule: write the file, add one line to
//! [`default_rules`]. Rules are pure like the engine: the only clock is the one passed in.

mod connection_churn;
mod failed_connect;
mod illegal_transition;
mod reset_surge;
mod slow_connect;
mod stuck;
mod stuck_close_wait;
mod stuck_fin_wait2;
mod syn_backlog;
pub mod text;
mod time_wait_buildup;
mod window;

use crate::engine::{LifecycleRecord, Role, TransitionRecord};
use crate::event::{EventKind, Task, TcpState};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::net::SocketAddr;

const SEC: u64 = 1_000_000_000;

/// Thresholds for every rule; the CLI exposes each as a flag. Durations in nanoseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RulesConfig {
    /// stuck_close_wait: a socket in CLOSE_WAIT this long is leaked. Default 30 s: a
    /// healthy app closes within milliseconds of reading EOF; 30 s rules out slow drains.
    pub close_wait_after_ns: u64,
    /// stuck_fin_wait2: the kernel's tcp_fin_timeout (the CLI reads
    /// /proc/sys/net/ipv4/tcp_fin_timeout). Default 60 s, the kernel default.
    pub fin_wait2_after_ns: u64,
    /// slow_connect: a handshake at least this long. Default 1 s: the initial SYN RTO, so
    /// a slower handshake means a SYN or SYN-ACK was lost and retransmitted.
    pub slow_connect_ns: u64,
    /// slow_connect: slow handshakes to one destination within `connect_window_ns` before
    /// it fires. Default 1.
    pub slow_connect_min: u64,
    /// failed_connect: failed connects to one destination within `connect_window_ns` before
    /// it fires. Default 1: any refused or timed-out connect is worth a line.
    pub failed_connect_min: u64,
    /// slow_connect/failed_connect grouping window. Default 60 s.
    pub connect_window_ns: u64,
    /// syn_backlog: concurrent SYN_RECV children of one listener. Default 100.
    pub syn_backlog_min: u64,
    /// reset_surge: resets with one peer within the window. Default 50 in 10 s.
    pub reset_surge_min: u64,
    pub reset_surge_window_ns: u64,
    /// time_wait_buildup: connections with one peer entering TIME_WAIT within the window.
    /// Default 1000 in 60 s (TIME_WAIT lasts 60 s on Linux, so this approximates how many
    /// TIME_WAIT sockets exist at once for that peer).
    pub time_wait_min: u64,
    pub time_wait_window_ns: u64,
    /// connection_churn: short-lived connections (lifetime below `churn_max_lifetime_ns`)
    /// opened by one process to one peer within the window. Default 100 under 1 s in 10 s.
    pub churn_min: u64,
    pub churn_max_lifetime_ns: u64,
    pub churn_window_ns: u64,
    /// illegal_transition: quiet time before a finding about one kind of illegal
    /// transition is resolved. Default 60 s.
    pub illegal_window_ns: u64,
    /// Keys (peers, destinations, owners) each keyed rule keeps at most. Default 4096;
    /// idle keys are forgotten on `tick`, events for new keys beyond this are counted but
    /// not grouped.
    pub max_keys: usize,
    /// Sockets each per-socket rule (stuck_*, syn_backlog) tracks at most; `Engine::new`
    /// lowers it to `max_connections`. Default 1,000,000.
    pub max_sockets: usize,
}

impl Default for RulesConfig {
    fn default() -> RulesConfig {
        RulesConfig {
            close_wait_after_ns: 30 * SEC,
            fin_wait2_after_ns: 60 * SEC,
            slow_connect_ns: SEC,
            slow_connect_min: 1,
            failed_connect_min: 1,
            connect_window_ns: 60 * SEC,
            syn_backlog_min: 100,
            reset_surge_min: 50,
            reset_surge_window_ns: 10 * SEC,
            time_wait_min: 1000,
            time_wait_window_ns: 60 * SEC,
            churn_min: 100,
            churn_max_lifetime_ns: SEC,
            churn_window_ns: 10 * SEC,
            illegal_window_ns: 60 * SEC,
            max_keys: 4096,
            max_sockets: 1_000_000,
        }
    }
}

/// Every rule, in the order their alerts are emitted for one event.
pub fn default_rules(cfg: &RulesConfig) -> Vec<Box<dyn Rule>> {
    vec![
        Box::new(illegal_transition::IllegalTransition::new(cfg)),
        Box::new(stuck_close_wait::rule(cfg)),
        Box::new(stuck_fin_wait2::rule(cfg)),
        Box::new(slow_connect::SlowConnect::new(cfg)),
        Box::new(failed_connect::FailedConnect::new(cfg)),
        Box::new(syn_backlog::SynBacklog::new(cfg)),
        Box::new(reset_surge::ResetSurge::new(cfg)),
        Box::new(time_wait_buildup::TimeWaitBuildup::new(cfg)),
        Box::new(connection_churn::ConnectionChurn::new(cfg)),
    ]
}

/// The events a rule reacts to, so that the engine calls it only for those: a rule is
/// called for an event that matches any part (`engine::Dispatch` turns every rule's
/// interest into lookup tables, one lookup per event for all rules). Each is a superset of
/// what the rule's `on_transition` does anything with (a test feeds every rule every kind of event both
/// ways and compares); most rules care about 1 or 2 of a connection's 10 transitions, and
/// calling all nine for every event was a fifth of a replay's instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest {
    /// Events whose new state is one of these (bit `1 << state`).
    pub new: u16,
    /// Events that may leave one of these states: their old state, or the engine's state
    /// for the connection before them, is one of them.
    pub left: u16,
    /// Events of these kinds whatever their states (bit `1 << kind`).
    pub kinds: u8,
    /// Every transition the engine found illegal.
    pub illegal: bool,
    /// Every event that ended a connection's lifecycle (`RuleEvent::closed`). Not the same
    /// as entering CLOSE: a late accept that says CLOSE ends one, and its record keeps
    /// the connection's own state.
    pub ends: bool,
}

impl Interest {
    /// Every event (the default: a rule that says nothing is called for everything).
    pub const ALL: Interest = Interest {
        new: u16::MAX,
        left: u16::MAX,
        kinds: u8::MAX,
        illegal: true,
        ends: true,
    };
    pub const NONE: Interest = Interest {
        new: 0,
        left: 0,
        kinds: 0,
        illegal: false,
        ends: false,
    };

    pub const fn entering(states: &[TcpState]) -> Interest {
        Interest {
            new: bits(states),
            ..Interest::NONE
        }
    }

    pub const fn leaving(states: &[TcpState]) -> Interest {
        Interest {
            left: bits(states),
            ..Interest::NONE
        }
    }

    /// Events entering or leaving `s`.
    pub const fn passing(s: TcpState) -> Interest {
        Interest {
            new: bits(&[s]),
            left: bits(&[s]),
            ..Interest::NONE
        }
    }

    /// Events entering or leaving `s`, and accepts and handoffs (they move a socket
    /// between owners without a state change).
    pub const fn in_state(s: TcpState) -> Interest {
        Interest {
            kinds: 1 << EventKind::Accept as u8 | 1 << EventKind::Handoff as u8,
            ..Interest::passing(s)
        }
    }
}

const fn bits(states: &[TcpState]) -> u16 {
    let mut b = 0;
    let mut i = 0;
    while i < states.len() {
        b |= 1 << states[i] as u8;
        i += 1;
    }
    b
}

/// One anomaly detector. The engine calls `on_transition` for the events its `interest`
/// names; it must still return fast for the others it is given (match on the states first,
/// look up maps after).
pub trait Rule {
    /// snake_case name, the `rule` field of its alerts.
    fn name(&self) -> &'static str;
    /// What it detects and why it matters, for `--list-rules` and the README.
    fn describe(&self) -> &'static str;
    /// The events `on_transition` may act on; it is not called for the others.
    fn interest(&self) -> Interest {
        Interest::ALL
    }
    fn on_transition(&mut self, ev: &RuleEvent<'_>, out: &mut Vec<Alert>);
    /// Time passed without events: age stuck sockets, let windows slide, resolve, forget.
    fn tick(&mut self, now_ns: u64, out: &mut Vec<Alert>);
    /// The engine stopped tracking `conn_id` without seeing it close (evicted or
    /// superseded); it was in `state`. Rules holding per-socket state must drop it.
    fn on_forget(&mut self, _conn_id: u64, _state: TcpState, _now_ns: u64, _out: &mut Vec<Alert>) {}
    /// End of input: drop all state without claiming anything resolved.
    fn finish(&mut self);
    /// Items (sockets + keys) held, to show memory stays bounded.
    fn footprint(&self) -> usize;
}

/// What the engine knows when a transition arrives, resolved for the rules.
#[derive(Clone, Copy, Debug)]
pub struct RuleEvent<'a> {
    pub rec: &'a TransitionRecord,
    /// The engine's state for the connection before this event; None if first seen.
    pub prev_state: Option<TcpState>,
    /// Best-known 4-tuple (filled in from earlier events).
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Set on entry to ESTABLISHED when the whole handshake was observed.
    pub handshake_ns: Option<u64>,
    /// Set when this transition ended the connection (new state CLOSE).
    pub closed: Option<&'a LifecycleRecord>,
}

impl RuleEvent<'_> {
    pub fn ts(&self) -> u64 {
        self.rec.t.ts_ns
    }

    /// The connection entered `s` now (a self-transition is not an entry).
    pub fn entered(&self, s: TcpState) -> bool {
        self.rec.t.new == s && self.prev_state != Some(s)
    }

    /// The connection left `s` now: the kernel says it was in `s`, or the engine thought so.
    pub fn left(&self, s: TcpState) -> bool {
        self.rec.t.new != s && (self.rec.t.old == s || self.prev_state == Some(s))
    }

    /// The peer as a grouping key: for an accepted connection the client's ephemeral port
    /// is noise, so only its address counts (port 0); otherwise the service's addr:port.
    pub fn peer(&self) -> SocketAddr {
        peer_key(self.rec.role, self.remote)
    }
}

pub fn peer_key(role: Role, remote: SocketAddr) -> SocketAddr {
    match role {
        Role::PassiveOpen => SocketAddr::new(remote.ip(), 0),
        _ => remote,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertStatus {
    /// The first report of a finding.
    Firing,
    /// The finding grew (its count doubled since the last report).
    Update,
    /// The finding is over.
    Resolved,
}

/// The main peer behind a finding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerShare {
    /// `addr:port`, or just the address when the port is the peer's ephemeral one.
    pub peer: String,
    /// How many of the finding's sockets/events involve this peer.
    pub count: u64,
}

/// One report about a finding. Field names are the NDJSON schema.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub ts_ns: u64,
    pub rule: Cow<'static, str>,
    pub status: AlertStatus,
    /// What the finding is grouped by, e.g. `pid=4242`, `peer=10.0.0.5:5432`.
    pub key: String,
    /// The process behind it; None when unknown or when several processes are involved.
    pub owner: Option<Task>,
    /// Current size: sockets stuck now, events in the current window, SYN_RECV now.
    pub count: u64,
    /// Cumulative over the finding: sockets ever stuck, events since it started.
    pub total: u64,
    /// Age of the oldest stuck socket (on resolve: the longest any was stuck).
    pub oldest_age_ns: Option<u64>,
    /// Rule-specific worst value, e.g. the slowest handshake.
    pub max_ns: Option<u64>,
    pub threshold_ns: Option<u64>,
    pub threshold_count: Option<u64>,
    pub window_ns: Option<u64>,
    /// On resolve: how long the finding lasted.
    pub duration_ns: Option<u64>,
    pub mostly_to: Option<PeerShare>,
    /// One line for humans.
    pub message: String,
    /// One line on what the condition means.
    pub explanation: Cow<'static, str>,
}

impl Alert {
    pub fn new(
        rule: &'static str,
        status: AlertStatus,
        ts_ns: u64,
        key: String,
        message: String,
        explanation: &'static str,
    ) -> Alert {
        Alert {
            ts_ns,
            rule: Cow::Borrowed(rule),
            status,
            key,
            owner: None,
            count: 0,
            total: 0,
            oldest_age_ns: None,
            max_ns: None,
            threshold_ns: None,
            threshold_count: None,
            window_ns: None,
            duration_ns: None,
            mostly_to: None,
            message,
            explanation: Cow::Borrowed(explanation),
        }
    }
}

#[cfg(test)]
mod tests;
