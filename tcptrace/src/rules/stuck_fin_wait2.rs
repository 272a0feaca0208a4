//! stuck_fin_wait2: sockets in FIN_WAIT2 beyond tcp_fin_timeout. The kernel times out
//! orphaned FIN_WAIT2 sockets after tcp_fin_timeout, so one still there is half-closed
//! (shutdown() without close()) and its peer has not closed its side — often because the
//! peer is itself stuck in CLOSE_WAIT.

use super::RulesConfig;
use super::stuck::{Stuck, StuckSpec};
use crate::event::TcpState;

const NAME: &str = "stuck_fin_wait2";
const EXPLANATION: &str = "FIN_WAIT2: this side closed and the peer acknowledged, but the peer has not closed its \
     side (it may be leaking the socket in CLOSE_WAIT); past tcp_fin_timeout only a socket \
     still open here (shutdown() without close()) remains";

/// The rule: the shared [`Stuck`] machinery on FIN_WAIT2.
pub fn rule(cfg: &RulesConfig) -> Stuck {
    let spec = StuckSpec {
        rule: NAME,
        state: TcpState::FinWait2,
        explanation: EXPLANATION,
        description: "Sockets in FIN_WAIT2 longer than tcp_fin_timeout (default 60s), grouped per owner \
         process, with the peer they mostly wait on.",
    };
    Stuck::new(spec, cfg.fin_wait2_after_ns, cfg)
}

#[cfg(test)]
mod tests {
    use crate::engine::EngineConfig;
    use crate::engine::testkit::*;
    use crate::event::TcpState::*;
    use crate::rules::{AlertStatus, RulesConfig};

    const RULE: &str = "stuck_fin_wait2";

    #[test]
    fn fires_past_fin_timeout_names_the_closer_and_resolves() {
        let cfg = EngineConfig {
            rules: RulesConfig {
                fin_wait2_after_ns: 5 * S,
                ..RulesConfig::default()
            },
            ..EngineConfig::default()
        };
        let mut sim = Sim::new(cfg);
        let app = task(300, "half-closer");
        let s = Sock::new(1, "10.0.0.1:40000", "10.0.0.5:80", app);
        // shutdown(SHUT_WR) at 1s (owner context), peer ACKs our FIN at 1s+1ms (softirq,
        // carrying some other task).
        sim.run(&s.path(Close, &[(0, SynSent), (MS, Established), (S, FinWait1)]));
        let ack = Sock {
            task: task(1, "ksoftirqd"),
            ..s
        };
        sim.feed(&ack.ev(S + MS, FinWait1, FinWait2));
        assert!(
            sim.tick(6 * S + MS - 1).is_empty(),
            "1 ns before tcp_fin_timeout"
        );
        let a = sim.tick(6 * S + MS);
        assert_eq!(a.len(), 1, "{a:#?}");
        assert_eq!(
            (a[0].rule.as_ref(), a[0].status, a[0].count),
            (RULE, AlertStatus::Firing, 1)
        );
        assert_eq!(a[0].owner.map(|o| o.pid), Some(300));
        assert_eq!(
            a[0].message,
            "pid 300 (half-closer) holds 1 socket in FIN_WAIT2, oldest 5s, mostly to 10.0.0.5:80"
        );
        assert_eq!(a[0].threshold_ns, Some(5 * S));
        // close() on the half-closed socket is a self-transition: still the same wait.
        let out = sim.feed(&s.ev(7 * S, FinWait2, FinWait2));
        assert!(alerts_of(&out, RULE).is_empty());
        let out = sim.feed(&ack.ev(8 * S, FinWait2, Close));
        let r = alerts_of(&out, RULE);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].status, r[0].oldest_age_ns, r[0].total),
            (AlertStatus::Resolved, Some(7 * S - MS), 1)
        );
    }
}
