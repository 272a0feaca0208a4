//! connection_churn: one process opening and closing many short-lived connections to the
//! same peer, where one kept-alive connection would do.

use super::window::{Snapshot, WindowRule, WindowSpec};
use super::{Alert, AlertStatus, Interest, RuleEvent, RulesConfig, text};
use crate::engine::Role;
use crate::event::{Task, TcpState};
use std::net::SocketAddr;

const NAME: &str = "connection_churn";
const EXPLANATION: &str = "a new short-lived connection per request where one kept-alive or pooled connection \
     would do: each costs a handshake and leaves a TIME_WAIT socket, the usual cause of \
     TIME_WAIT build-up and ephemeral-port exhaustion";

pub struct ConnectionChurn {
    max_lifetime_ns: u64,
}

impl ConnectionChurn {
    pub fn new(cfg: &RulesConfig) -> WindowRule<ConnectionChurn> {
        let spec = ConnectionChurn {
            max_lifetime_ns: cfg.churn_max_lifetime_ns,
        };
        WindowRule::new(spec, cfg.churn_window_ns, cfg.churn_min, cfg.max_keys)
    }
}

impl WindowSpec for ConnectionChurn {
    type Key = (Option<u32>, SocketAddr);
    const NAME: &'static str = NAME;
    const EXPLANATION: &'static str = EXPLANATION;
    const DESCRIPTION: &'static str = "One process opening connections to one peer that live less than a lifetime \
         threshold (default 1s), at least N times (default 100) within a window (default \
         10s).";
    const INTEREST: Interest = Interest {
        ends: true,
        ..Interest::NONE
    };

    fn sample(&self, ev: &RuleEvent<'_>) -> Option<(Self::Key, Option<Task>, u64)> {
        let lc = ev.closed?;
        let life = lc.lifetime_ns?;
        let established = lc.path.iter().any(|p| p.state == TcpState::Established);
        if lc.role != Role::ActiveOpen || !established || life >= self.max_lifetime_ns {
            return None;
        }
        Some(((lc.owner.map(|o| o.pid), ev.peer()), lc.owner, life))
    }

    fn finding(&self, key: &Self::Key, s: &Snapshot, window_ns: u64) -> (String, String) {
        let who = match (key.0, s.owner) {
            (Some(_), Some(o)) => text::owner(Some(&o)),
            (Some(pid), None) => format!("pid {pid}"),
            (None, _) => text::owner(None),
        };
        let message = match s.status {
            AlertStatus::Resolved => format!(
                "{who} stopped churning connections to {} ({} short-lived in all, over {})",
                text::peer(&key.1),
                s.total,
                text::age(s.duration_ns.unwrap_or(0))
            ),
            _ => format!(
                "{who} opened and closed {} to {} in the last {}, each under {}",
                text::count(s.count, "connection", "connections"),
                text::peer(&key.1),
                text::age(window_ns),
                text::age(self.max_lifetime_ns)
            ),
        };
        (
            format!("{} peer={}", text::owner_key(key.0), text::peer(&key.1)),
            message,
        )
    }

    fn decorate(&self, a: &mut Alert, _s: &Snapshot) {
        a.threshold_ns = Some(self.max_lifetime_ns);
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::EngineConfig;
    use crate::engine::testkit::*;
    use crate::event::TcpState::*;
    use crate::rules::{AlertStatus, RulesConfig};

    const RULE: &str = "connection_churn";

    #[test]
    fn short_lived_connections_per_owner_and_peer() {
        let rules = RulesConfig {
            churn_min: 5,
            churn_window_ns: 16 * S,
            ..RulesConfig::default()
        };
        let mut sim = Sim::new(EngineConfig {
            rules,
            ..EngineConfig::default()
        });
        let mut got = vec![];
        for i in 0..8u64 {
            let (pid, life) = match i % 4 {
                0 | 1 => (100, S - 1), // churner: just under 1 s
                2 => (200, 10),        // another process: its own key
                _ => (100, S),         // 1 s exactly is not short-lived
            };
            let s = Sock::new(i, "10.0.0.1:0", "10.0.0.5:8080", task(pid, "app"));
            let t0 = i * S;
            let out = sim.run(&s.path(
                Close,
                &[
                    (t0, SynSent),
                    (t0 + 1, Established),
                    (t0 + 2, FinWait1),
                    (t0 + 3, FinWait2),
                    (t0 + life, Close),
                ],
            ));
            got.extend(
                alerts_of(&out, RULE)
                    .into_iter()
                    .map(|a| (i, a.status, a.key.clone(), a.count)),
            );
        }
        assert!(
            got.is_empty(),
            "pid 100 churned 4 (i = 0, 1, 4, 5), one short of 5: {got:?}"
        );
        let mut msgs = vec![];
        for i in 8..10u64 {
            let s = Sock::new(i, "10.0.0.1:0", "10.0.0.5:8080", task(100, "app"));
            let out = sim.run(&s.path(
                Close,
                &[
                    (i * S, SynSent),
                    (i * S + 1, Established),
                    (i * S + 2, FinWait1),
                    (i * S + 3, Close),
                ],
            ));
            got.extend(
                alerts_of(&out, RULE)
                    .into_iter()
                    .map(|a| (i, a.status, a.key.clone(), a.count)),
            );
            msgs.extend(alerts_of(&out, RULE).into_iter().map(|a| a.message.clone()));
        }
        assert_eq!(
            msgs,
            vec![
                "pid 100 (app) opened and closed 5 connections to 10.0.0.5:8080 in the last 16s, each under 1s"
            ]
        );
        assert_eq!(
            got,
            vec![(
                8,
                AlertStatus::Firing,
                "pid=100 peer=10.0.0.5:8080".into(),
                5
            )]
        );
        let a = sim.tick(9 * S);
        assert!(a.is_empty());
        let r = sim.tick(9 * S + 3 + 16 * S);
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0].message,
            "pid 100 (app) stopped churning connections to 10.0.0.5:8080 (6 short-lived in all, over 17s)"
        );
        // Connects that failed are not churn.
        let f = Sock::new(50, "10.0.0.1:0", "10.0.0.5:8080", task(300, "x"));
        for k in 0..10 {
            let s = Sock { id: 50 + k, ..f };
            let out = sim.run(&s.path(Close, &[(20 * S, SynSent), (20 * S + 1, Close)]));
            assert!(alerts_of(&out, RULE).is_empty());
        }
    }
}
