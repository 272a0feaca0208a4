//! reset_surge: many connections with one peer ending in a reset within a sliding window.

use super::window::{Episodes, Snapshot};
use super::{Alert, AlertStatus, Rule, RuleEvent, RulesConfig, text};
use crate::event::TcpState;
use std::net::SocketAddr;

const NAME: &str = "reset_surge";
const EXPLANATION: &str = "ESTABLISHED/CLOSE_WAIT→CLOSE: connections aborted by a RST, received or sent: the peer \
     crashed or restarted, a load balancer or firewall dropped idle connections, or an app \
     closed with unread data or SO_LINGER 0";

pub struct ResetSurge {
    eps: Episodes<SocketAddr>,
}

impl ResetSurge {
    pub fn new(cfg: &RulesConfig) -> ResetSurge {
        ResetSurge {
            eps: Episodes::new(cfg.reset_surge_window_ns, cfg.reset_surge_min, cfg.max_keys),
        }
    }

    fn alert(&self, peer: &SocketAddr, s: &Snapshot, now: u64) -> Alert {
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
                text::age(self.eps.window_ns())
            ),
        };
        let mut a = s.alert(
            NAME,
            format!("peer={}", text::peer(peer)),
            now,
            message,
            EXPLANATION,
        );
        a.threshold_count = Some(self.eps.min_count());
        a.window_ns = Some(self.eps.window_ns());
        a
    }
}

impl Rule for ResetSurge {
    fn name(&self) -> &'static str {
        NAME
    }
    fn describe(&self) -> &'static str {
        "Connections with one peer reset (ESTABLISHED/CLOSE_WAIT→CLOSE) at least \
         N times (default 50) within a sliding window (default 10s). A \
         client's peer is its service addr:port; a server's is the client address."
    }
    fn on_transition(&mut self, ev: &RuleEvent<'_>, out: &mut Vec<Alert>) {
        let t = &ev.rec.t;
        if t.new != TcpState::Close || !matches!(t.old, TcpState::Established | TcpState::CloseWait)
        {
            return;
        }
        let peer = ev.peer();
        if let Some(s) = self.eps.record(&peer, ev.ts(), ev.rec.owner, 0) {
            out.push(self.alert(&peer, &s, ev.ts()));
        }
    }
    fn tick(&mut self, now_ns: u64, out: &mut Vec<Alert>) {
        for (peer, s) in self.eps.sweep(now_ns) {
            out.push(self.alert(&peer, &s, now_ns));
        }
    }
    fn finish(&mut self) {
        self.eps.clear();
    }
    fn footprint(&self) -> usize {
        self.eps.len()
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
