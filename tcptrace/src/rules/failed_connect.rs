//! failed_connect: outgoing connects that never got established (SYN_SENT→CLOSE), grouped
//! per destination.

use super::window::{Snapshot, WindowRule, WindowSpec};
use super::{AlertStatus, Interest, RuleEvent, RulesConfig, text};
use crate::event::{Task, TcpState};
use std::net::SocketAddr;

const NAME: &str = "failed_connect";
const EXPLANATION: &str = "SYN_SENT→CLOSE: the connect was refused (RST: nothing listening), timed out (SYNs \
     unanswered: host down or filtered), or abandoned by the app; the state-change tracepoint \
     alone cannot tell which";

pub struct FailedConnect;

impl FailedConnect {
    pub fn new(cfg: &RulesConfig) -> WindowRule<FailedConnect> {
        WindowRule::new(
            FailedConnect,
            cfg.connect_window_ns,
            cfg.failed_connect_min,
            cfg.max_keys,
        )
    }
}

impl WindowSpec for FailedConnect {
    type Key = SocketAddr;
    const NAME: &'static str = NAME;
    const EXPLANATION: &'static str = EXPLANATION;
    const DESCRIPTION: &'static str = "Connects that failed (SYN_SENT→CLOSE: refused or timed out; the tracepoint cannot tell \
         which), grouped per destination addr:port with counts.";
    const INTEREST: Interest = Interest::leaving(&[TcpState::SynSent]);

    fn sample(&self, ev: &RuleEvent<'_>) -> Option<(SocketAddr, Option<Task>, u64)> {
        let failed = ev.rec.t.old == TcpState::SynSent && ev.rec.t.new == TcpState::Close;
        failed.then_some((ev.remote, ev.rec.owner, 0))
    }

    fn finding(&self, dest: &SocketAddr, s: &Snapshot, window_ns: u64) -> (String, String) {
        let message = match s.status {
            AlertStatus::Resolved => format!(
                "connects to {} stopped failing ({} failed in all)",
                text::peer(dest),
                s.total
            ),
            _ => format!(
                "{} to {} failed (refused or timed out) in the last {}",
                text::count(s.count, "connect", "connects"),
                text::peer(dest),
                text::age(window_ns)
            ),
        };
        (format!("peer={}", text::peer(dest)), message)
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::testkit::*;
    use crate::engine::{CloseKind, EngineConfig};
    use crate::event::TcpState::*;
    use crate::rules::{AlertStatus, RulesConfig};

    const RULE: &str = "failed_connect";

    #[test]
    fn refused_connects_group_per_destination() {
        let cfg = EngineConfig {
            rules: RulesConfig {
                failed_connect_min: 3,
                ..RulesConfig::default()
            },
            ..EngineConfig::default()
        };
        let mut sim = Sim::new(cfg);
        let app = task(60, "worker");
        let mut fired = vec![];
        for i in 0..8u64 {
            let dest = if i % 2 == 0 {
                "10.0.0.8:6379"
            } else {
                "10.0.0.9:6379"
            };
            let s = Sock::new(i, "10.0.0.1:0", dest, app);
            let out = sim.run(&s.path(Close, &[(i * S, SynSent), (i * S + 1, Close)]));
            assert_eq!(
                one_lifecycle(&out).close_kind,
                Some(CloseKind::ConnectFailed)
            );
            fired.extend(
                alerts_of(&out, RULE)
                    .into_iter()
                    .map(|a| (i, a.status, a.key.clone(), a.count)),
            );
        }
        use AlertStatus::*;
        assert_eq!(
            fired,
            vec![
                (4, Firing, "peer=10.0.0.8:6379".into(), 3),
                (5, Firing, "peer=10.0.0.9:6379".into(), 3)
            ],
            "the 3rd failure per destination fires; the 4th is not yet double the 3 reported"
        );
        let r = sim.tick(200 * S);
        assert_eq!(
            r.iter()
                .map(|a| (a.status, a.key.as_str(), a.total))
                .collect::<Vec<_>>(),
            vec![
                (Resolved, "peer=10.0.0.8:6379", 4),
                (Resolved, "peer=10.0.0.9:6379", 4),
            ]
        );
    }

    #[test]
    fn a_single_failure_fires_by_default_with_the_honest_wording() {
        let mut sim = Sim::default();
        let s = Sock::new(1, "10.0.0.1:0", "10.0.0.8:6379", task(60, "worker"));
        let out = sim.run(&s.path(Close, &[(0, SynSent), (3 * S, Close)]));
        let a = alerts_of(&out, RULE);
        assert_eq!(a.len(), 1);
        assert_eq!(
            a[0].message,
            "1 connect to 10.0.0.8:6379 failed (refused or timed out) in the last 1m"
        );
        assert!(a[0].explanation.contains("cannot tell which"));
        assert_eq!(a[0].owner.map(|o| o.pid), Some(60));
    }
}
