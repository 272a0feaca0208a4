//! time_wait_buildup: many connections with one peer entering TIME_WAIT within a window.

use super::window::{Snapshot, WindowRule, WindowSpec};
use super::{AlertStatus, Interest, RuleEvent, RulesConfig, text};
use crate::event::{Task, TcpState};
use std::net::SocketAddr;

const NAME: &str = "time_wait_buildup";
const EXPLANATION: &str = "TIME_WAIT: this side closed first, so the kernel keeps each connection's 4-tuple \
     reserved for 60s; thousands towards one addr:port exhaust ephemeral ports (connect() \
     fails with EADDRNOTAVAIL): reuse connections, or let the peer close first";

pub struct TimeWaitBuildup;

impl TimeWaitBuildup {
    pub fn new(cfg: &RulesConfig) -> WindowRule<TimeWaitBuildup> {
        WindowRule::new(
            TimeWaitBuildup,
            cfg.time_wait_window_ns,
            cfg.time_wait_min,
            cfg.max_keys,
        )
    }
}

/// This transition leaves a TIME_WAIT socket behind. With TIME_WAIT events: the entry.
/// Without: the full socket's FIN_WAIT2/CLOSING→CLOSE, which is when `tcp_time_wait()`
/// hands over to the mini-socket. FIN_WAIT1→CLOSE does not count: the kernel always
/// passes FIN_WAIT2 or CLOSING before TIME_WAIT, so from FIN_WAIT1 it was an abort.
fn enters_time_wait(ev: &RuleEvent<'_>) -> bool {
    use TcpState::*;
    let t = &ev.rec.t;
    ev.entered(TimeWait) || (t.new == Close && matches!(t.old, FinWait2 | Closing))
}

impl WindowSpec for TimeWaitBuildup {
    type Key = SocketAddr;
    const NAME: &'static str = NAME;
    const EXPLANATION: &'static str = EXPLANATION;
    const DESCRIPTION: &'static str = "Connections with one peer entering TIME_WAIT at least N times \
         (default 1000) within a sliding window (default 60s, TIME_WAIT's length), i.e. \
         about that many TIME_WAIT sockets at once.";
    const INTEREST: Interest = Interest::entering(&[TcpState::TimeWait, TcpState::Close]);

    fn sample(&self, ev: &RuleEvent<'_>) -> Option<(SocketAddr, Option<Task>, u64)> {
        enters_time_wait(ev).then(|| (ev.peer(), ev.rec.owner, 0))
    }

    fn finding(&self, peer: &SocketAddr, s: &Snapshot, window_ns: u64) -> (String, String) {
        let message = match s.status {
            AlertStatus::Resolved => format!(
                "TIME_WAIT entries towards {} are back to normal ({} in all, over {})",
                text::peer(peer),
                s.total,
                text::age(s.duration_ns.unwrap_or(0))
            ),
            _ => format!(
                "{} towards {} entered TIME_WAIT in the last {}{}",
                text::count(s.count, "connection", "connections"),
                text::peer(peer),
                text::age(window_ns),
                s.owner
                    .map(|o| format!(", closed by {}", text::owner(Some(&o))))
                    .unwrap_or_default()
            ),
        };
        (format!("peer={}", text::peer(peer)), message)
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::EngineConfig;
    use crate::engine::testkit::*;
    use crate::event::TcpState::*;
    use crate::rules::{AlertStatus, RulesConfig};

    const RULE: &str = "time_wait_buildup";

    #[test]
    fn counts_active_closes_not_aborts_and_names_the_closer() {
        let rules = RulesConfig {
            time_wait_min: 3,
            ..RulesConfig::default()
        };
        let mut sim = Sim::new(EngineConfig {
            rules,
            ..EngineConfig::default()
        });
        let app = task(70, "poller");
        let mut got = vec![];
        let ends: [&[(u64, crate::event::TcpState)]; 5] = [
            &[(3, FinWait2), (4, Close)],
            &[(3, Closing), (4, Close)],
            &[(3, Close)], // FIN_WAIT1→CLOSE: an abort, no TIME_WAIT
            &[(3, FinWait2), (4, TimeWait), (5, Close)], // with TIME_WAIT hooks: counted once
            &[(3, FinWait2), (4, Close)],
        ];
        for (i, end) in ends.iter().enumerate() {
            let s = Sock::new(i as u64, "10.0.0.1:0", "10.0.0.5:80", app);
            let mut out = sim.run(&s.path(Close, &[(0, SynSent), (1, Established), (2, FinWait1)]));
            let last = s.path(FinWait1, end);
            out.extend(sim.run(&last));
            got.extend(
                alerts_of(&out, RULE)
                    .into_iter()
                    .map(|a| (i, a.status, a.count, a.message.clone())),
            );
        }
        assert_eq!(
            got,
            vec![(3, AlertStatus::Firing, 3, "3 connections towards 10.0.0.5:80 entered TIME_WAIT in the last 1m, closed by pid 70 (poller)".into())]
        );
        let _ = sim.tick(30 * S);
        assert_eq!(
            sim.tick(61 * S).len(),
            1,
            "resolved once the window is quiet"
        );
    }
}
