//! reset_surge: many connections with one peer ending in a reset within a sliding window.

use super::window::{Snapshot, WindowRule, WindowSpec};
use super::{AlertStatus, Interest, RuleEvent, RulesConfig, text};
use crate::event::{Task, TcpState};
use std::net::SocketAddr;

const NAME: &str = "reset_surge";
const EXPLANATION: &str = "ESTABLISHED/CLOSE_WAIT→CLOSE: connections aborted by a RST, received or sent: the peer \
     crashed or restarted, a load balancer or firewall dropped idle connections, or an app \
     closed with unread data or SO_LINGER 0";

pub struct ResetSurge;

impl ResetSurge {
    pub fn new(cfg: &RulesConfig) -> WindowRule<ResetSurge> {
        WindowRule::new(
            ResetSurge,
            cfg.reset_surge_window_ns,
            cfg.reset_surge_min,
            cfg.max_keys,
        )
    }
}

impl WindowSpec for ResetSurge {
    type Key = SocketAddr;
    const NAME: &'static str = NAME;
    const EXPLANATION: &'static str = EXPLANATION;
    const DESCRIPTION: &'static str = "Connections with one peer reset (ESTABLISHED/CLOSE_WAIT→CLOSE) at least \
         N times (default 50) within a sliding window (default 10s). A \
         client's peer is its service addr:port; a server's is the client address.";
    const INTEREST: Interest = Interest::entering(&[TcpState::Close]);

    fn sample(&self, ev: &RuleEvent<'_>) -> Option<(SocketAddr, Option<Task>, u64)> {
        let t = &ev.rec.t;
        let reset = t.new == TcpState::Close
            && matches!(t.old, TcpState::Established | TcpState::CloseWait);
        reset.then(|| (ev.peer(), ev.rec.owner, 0))
    }

    fn finding(&self, peer: &SocketAddr, s: &Snapshot, window_ns: u64) -> (String, String) {
        let message = match s.status {
            AlertStatus::Resolved => format!(
                "resets with {} are back to normal ({} in all, over {})",
                text::peer(peer),
                s.total,
                text::age(s.duration_ns.unwrap_or(0))
            ),
            _ => format!(
                "{} with {} reset in the last {}",
                text::count(s.count, "connection", "connections"),
                text::peer(peer),
                text::age(window_ns)
            ),
        };
        (format!("peer={}", text::peer(peer)), message)
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::testkit::*;
    use crate::engine::{CloseKind, EngineConfig};
    use crate::event::TcpState::*;
    use crate::rules::{AlertStatus, RulesConfig};

    const RULE: &str = "reset_surge";

    fn cfg() -> EngineConfig {
        let rules = RulesConfig {
            reset_surge_min: 5,
            reset_surge_window_ns: 16 * S,
            ..RulesConfig::default()
        };
        EngineConfig {
            rules,
            ..EngineConfig::default()
        }
    }

    #[test]
    fn resets_from_one_client_address_group_across_its_ports() {
        let mut sim = Sim::new(cfg());
        let mut got = vec![];
        for i in 0..10u64 {
            // Accepted connections from 10.0.0.5 on a new ephemeral port each, reset by it.
            let s = Sock::new(
                i,
                "10.0.0.1:80",
                &format!("10.0.0.5:{}", 40_000 + i),
                task(1, "srv"),
            );
            let out = sim.run(&s.path(
                Listen,
                &[
                    (i * S, SynRecv),
                    (i * S + 1, Established),
                    (i * S + 2, Close),
                ],
            ));
            assert_eq!(one_lifecycle(&out).close_kind, Some(CloseKind::Reset));
            got.extend(
                alerts_of(&out, RULE)
                    .into_iter()
                    .map(|a| (i, a.status, a.count, a.key.clone())),
            );
        }
        use AlertStatus::*;
        assert_eq!(
            got,
            vec![
                (4, Firing, 5, "peer=10.0.0.5".into()),
                (9, Update, 10, "peer=10.0.0.5".into())
            ]
        );
        let r = sim.tick(9 * S + 2 + 16 * S);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].status, Resolved);
        assert_eq!(
            r[0].message,
            "resets with 10.0.0.5 are back to normal (10 in all, over 21s)"
        );
    }

    #[test]
    fn slow_trickle_and_normal_closes_do_not_fire() {
        let mut sim = Sim::new(cfg());
        for i in 0..10u64 {
            // One reset every 4 s: at most 4 in any 16 s window.
            let s = Sock::new(i, "10.0.0.1:0", "10.0.0.6:443", task(2, "cli"));
            let out = sim.run(&s.path(
                Close,
                &[
                    (4 * i * S, SynSent),
                    (4 * i * S + 1, Established),
                    (4 * i * S + 2, Close),
                ],
            ));
            assert!(alerts_of(&out, RULE).is_empty(), "reset {i}");
        }
        for i in 10..20u64 {
            let s = Sock::new(i, "10.0.0.1:0", "10.0.0.6:443", task(2, "cli"));
            let out = sim.run(&s.path(
                Close,
                &[
                    (100 * S, SynSent),
                    (100 * S + 1, Established),
                    (100 * S + 2, FinWait1),
                    (100 * S + 3, FinWait2),
                    (100 * S + 4, Close),
                ],
            ));
            assert!(
                alerts_of(&out, RULE).is_empty(),
                "active closes are not resets"
            );
        }
    }
}
