//! slow_connect: outgoing handshakes slower than a threshold, grouped per destination.

use super::window::{Snapshot, WindowRule, WindowSpec};
use super::{Alert, AlertStatus, Interest, RuleEvent, RulesConfig, text};
use crate::engine::Role;
use crate::event::{Task, TcpState};
use std::net::SocketAddr;

const NAME: &str = "slow_connect";
const EXPLANATION: &str = "a handshake this slow usually means a SYN or SYN-ACK was lost and retransmitted \
     (the first retransmission waits 1s), or the destination's accept queue is full";

pub struct SlowConnect {
    slow_ns: u64,
}

impl SlowConnect {
    pub fn new(cfg: &RulesConfig) -> WindowRule<SlowConnect> {
        let spec = SlowConnect {
            slow_ns: cfg.slow_connect_ns,
        };
        WindowRule::new(
            spec,
            cfg.connect_window_ns,
            cfg.slow_connect_min,
            cfg.max_keys,
        )
    }
}

impl WindowSpec for SlowConnect {
    type Key = SocketAddr;
    const NAME: &'static str = NAME;
    const EXPLANATION: &'static str = EXPLANATION;
    const DESCRIPTION: &'static str = "Outgoing handshakes (SYN_SENT→ESTABLISHED) slower than a threshold (default 1s), \
         grouped per destination addr:port with counts and the slowest.";
    const INTEREST: Interest = Interest::entering(&[TcpState::Established]);

    fn sample(&self, ev: &RuleEvent<'_>) -> Option<(SocketAddr, Option<Task>, u64)> {
        let hs = ev.handshake_ns?;
        (ev.rec.role == Role::ActiveOpen && hs >= self.slow_ns).then_some((
            ev.remote,
            ev.rec.owner,
            hs,
        ))
    }

    fn finding(&self, dest: &SocketAddr, s: &Snapshot, window_ns: u64) -> (String, String) {
        let message = match s.status {
            AlertStatus::Resolved => format!(
                "connects to {} are fast again: {} slow, the slowest {}",
                text::peer(dest),
                s.total,
                text::age(s.max_value)
            ),
            _ => format!(
                "{} to {} in the last {}, the slowest {}",
                text::count(s.count, "slow handshake", "slow handshakes"),
                text::peer(dest),
                text::age(window_ns),
                text::age(s.max_value)
            ),
        };
        (format!("peer={}", text::peer(dest)), message)
    }

    fn decorate(&self, a: &mut Alert, s: &Snapshot) {
        a.max_ns = Some(s.max_value);
        a.threshold_ns = Some(self.slow_ns);
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::testkit::*;
    use crate::event::TcpState::*;
    use crate::rules::AlertStatus;

    const RULE: &str = "slow_connect";

    #[test]
    fn handshakes_at_threshold_fire_faster_ones_do_not() {
        let mut sim = Sim::default();
        let app = task(50, "client");
        let fast = Sock::new(1, "10.0.0.1:0", "10.0.0.7:443", app);
        let out = sim.run(&fast.path(Close, &[(0, SynSent), (S - 1, Established)]));
        assert!(alerts_of(&out, RULE).is_empty(), "1 ns under 1 s");
        let slow = Sock::new(2, "10.0.0.1:0", "10.0.0.7:443", app);
        let out = sim.run(&slow.path(Close, &[(10 * S, SynSent), (11 * S, Established)]));
        let a = alerts_of(&out, RULE);
        assert_eq!(a.len(), 1);
        assert_eq!(
            (a[0].status, a[0].count, a[0].max_ns),
            (AlertStatus::Firing, 1, Some(S))
        );
        assert_eq!(a[0].key, "peer=10.0.0.7:443");
        assert_eq!(a[0].owner.map(|o| o.pid), Some(50));
        assert_eq!(
            a[0].message,
            "1 slow handshake to 10.0.0.7:443 in the last 1m, the slowest 1s"
        );
        // A second, slower one doubles the total: an update with the new worst.
        let s3 = Sock::new(3, "10.0.0.1:0", "10.0.0.7:443", app);
        let out = sim.run(&s3.path(Close, &[(20 * S, SynSent), (23 * S, Established)]));
        let a = alerts_of(&out, RULE);
        assert_eq!(
            (a[0].status, a[0].count, a[0].total, a[0].max_ns),
            (AlertStatus::Update, 2, 2, Some(3 * S))
        );
        // Quiet for a window: resolved.
        assert!(
            sim.tick(23 * S + 56 * S).is_empty(),
            "still inside the 60 s window"
        );
        let r = sim.tick(23 * S + 61 * S);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].status, AlertStatus::Resolved);
        assert_eq!(
            r[0].message,
            "connects to 10.0.0.7:443 are fast again: 2 slow, the slowest 3s"
        );
    }

    #[test]
    fn passive_and_simultaneous_open() {
        let mut sim = Sim::default();
        let srv = Sock::new(1, "10.0.0.1:80", "10.0.0.9:5555", task(1, "srv"));
        let out = sim.run(&srv.path(Listen, &[(0, SynRecv), (5 * S, Established)]));
        assert!(
            alerts_of(&out, RULE).is_empty(),
            "accepted connections are not connects"
        );
        let simul = Sock::new(2, "10.0.0.1:7000", "10.0.0.9:7000", task(2, "p2p"));
        let out = sim.run(&simul.path(Close, &[(0, SynSent), (S, SynRecv), (2 * S, Established)]));
        let a = alerts_of(&out, RULE);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].max_ns, Some(2 * S), "measured from SYN_SENT");
    }
}
