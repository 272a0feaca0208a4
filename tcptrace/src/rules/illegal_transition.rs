//! illegal_transition: transitions Linux's TCP machine does not make, grouped per kind.

use super::window::{Episodes, Snapshot};
use super::{Alert, AlertStatus, Interest, Rule, RuleEvent, RulesConfig, text};
use crate::event::TcpState;

const NAME: &str = "illegal_transition";
const EXPLANATION: &str = "a transition Linux's TCP state machine never makes: events were lost or reordered, the \
     kernel side decoded them wrongly, or this kernel behaves in a way the tracer does not know";

pub struct IllegalTransition {
    eps: Episodes<(TcpState, TcpState)>,
}

impl IllegalTransition {
    pub fn new(cfg: &RulesConfig) -> IllegalTransition {
        IllegalTransition {
            eps: Episodes::new(cfg.illegal_window_ns, 1, cfg.max_keys),
        }
    }

    fn alert(
        &self,
        k: &(TcpState, TcpState),
        s: &Snapshot,
        now: u64,
        conn_id: Option<u64>,
    ) -> Alert {
        let message = match s.status {
            AlertStatus::Resolved => format!(
                "no {}→{} transition for {} ({} in all)",
                k.0,
                k.1,
                text::age(self.eps.window_ns()),
                s.total
            ),
            _ => format!(
                "illegal transition {}→{} seen {} (conn_id {})",
                k.0,
                k.1,
                text::count(s.total, "time", "times"),
                conn_id.map_or_else(|| "?".to_string(), |c| c.to_string())
            ),
        };
        let mut a = s.alert(NAME, format!("{}->{}", k.0, k.1), now, message, EXPLANATION);
        a.window_ns = Some(self.eps.window_ns());
        a
    }
}

impl Rule for IllegalTransition {
    fn name(&self) -> &'static str {
        NAME
    }
    fn describe(&self) -> &'static str {
        "Every transition Linux's TCP state machine does not make, one finding per kind \
         (OLD→NEW), re-stated as its count doubles. Each also has `legal: false` in its \
         transition record and counts in the engine's `illegal` total."
    }
    fn interest(&self) -> Interest {
        Interest {
            illegal: true,
            ..Interest::NONE
        }
    }
    fn on_transition(&mut self, ev: &RuleEvent<'_>, out: &mut Vec<Alert>) {
        if ev.rec.legal {
            return;
        }
        let k = (ev.rec.t.old, ev.rec.t.new);
        if let Some(s) = self.eps.record(&k, ev.ts(), ev.rec.owner, 0) {
            out.push(self.alert(&k, &s, ev.ts(), Some(ev.rec.t.conn_id)));
        }
    }
    fn tick(&mut self, now_ns: u64, out: &mut Vec<Alert>) {
        for (k, s) in self.eps.sweep(now_ns) {
            out.push(self.alert(&k, &s, now_ns, None));
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
    use crate::event::TcpState::*;
    use crate::rules::AlertStatus;

    const RULE: &str = "illegal_transition";

    #[test]
    fn every_illegal_kind_is_reported_and_restated_on_doubling() {
        let mut sim = Sim::default();
        let mut got = vec![];
        for i in 0..4u64 {
            let s = Sock::new(i, "10.0.0.1:1", "10.0.0.2:2", task(1, "x"));
            let out = sim.run(&s.path(
                Close,
                &[(i, SynSent), (i + 1, Established), (i + 2, Listen)],
            ));
            let r = records(&out);
            assert_eq!(
                r.iter().map(|r| r.legal).collect::<Vec<_>>(),
                vec![true, true, false]
            );
            got.extend(
                alerts_of(&out, RULE)
                    .into_iter()
                    .map(|a| (i, a.status, a.key.clone(), a.message.clone())),
            );
        }
        use AlertStatus::*;
        assert_eq!(
            got,
            vec![
                (
                    0,
                    Firing,
                    "ESTABLISHED->LISTEN".to_string(),
                    "illegal transition ESTABLISHED→LISTEN seen 1 time (conn_id 0)".to_string()
                ),
                (
                    1,
                    Update,
                    "ESTABLISHED->LISTEN".to_string(),
                    "illegal transition ESTABLISHED→LISTEN seen 2 times (conn_id 1)".to_string()
                ),
                (
                    3,
                    Update,
                    "ESTABLISHED->LISTEN".to_string(),
                    "illegal transition ESTABLISHED→LISTEN seen 4 times (conn_id 3)".to_string()
                ),
            ]
        );
        assert_eq!(sim.engine.stats().illegal, 4);
        let s = Sock::new(9, "10.0.0.1:1", "10.0.0.2:2", task(1, "x"));
        let out = sim.feed(&s.ev(10, NewSynRecv, Established));
        assert_eq!(alerts_of(&out, RULE)[0].key, "NEW_SYN_RECV->ESTABLISHED");
        let r = sim.tick(100 * crate::engine::testkit::S);
        assert_eq!(
            r.iter()
                .map(|a| (a.status, a.key.as_str()))
                .collect::<Vec<_>>(),
            vec![
                (Resolved, "ESTABLISHED->LISTEN"),
                (Resolved, "NEW_SYN_RECV->ESTABLISHED"),
            ]
        );
        assert_eq!(
            r[0].message,
            "no ESTABLISHED→LISTEN transition for 1m (4 in all)"
        );
    }
}
