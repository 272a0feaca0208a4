//! syn_backlog: accepted children piling up in SYN_RECV per listener (half-open build-up).

use super::{Alert, AlertStatus, Interest, Rule, RuleEvent, RulesConfig, text};
use crate::engine::FastMap;
use crate::engine::IdMap;
use crate::event::{Task, TcpState};
use std::collections::BTreeSet;
use std::net::SocketAddr;

const NAME: &str = "syn_backlog";
const EXPLANATION: &str = "SYN_RECV: connections to this listener started but their handshake has not completed; \
     the tracepoint sees only full SYN_RECV sockets (TCP Fast Open children, or children \
     still being set up), not the request sockets a plain SYN flood creates";

#[derive(Debug, Default)]
struct Backlog {
    /// (entered, conn_id), oldest first.
    sockets: BTreeSet<(u64, u64)>,
    firing_since: Option<u64>,
    reported: u64,
    peak: u64,
    owner: Option<Task>,
}

pub struct SynBacklog {
    min: u64,
    max_sockets: usize,
    /// conn_id → (listener key, entered): children are counted under the listener tuple
    /// of their first event; their later events carry their own.
    loc: IdMap<(SocketAddr, u64)>,
    listeners: FastMap<SocketAddr, Backlog>,
    pub untracked: u64,
}

impl SynBacklog {
    pub fn new(cfg: &RulesConfig) -> SynBacklog {
        SynBacklog {
            min: cfg.syn_backlog_min.max(1),
            max_sockets: cfg.max_sockets,
            loc: IdMap::default(),
            listeners: FastMap::default(),
            untracked: 0,
        }
    }

    fn leave(&mut self, id: u64, now: u64, out: &mut Vec<Alert>) {
        let Some((key, since)) = self.loc.remove(&id) else {
            return;
        };
        let Some(b) = self.listeners.get_mut(&key) else {
            return;
        };
        b.sockets.remove(&(since, id));
        let n = b.sockets.len() as u64;
        match b.firing_since {
            Some(start) if n < self.min.div_ceil(2) => {
                let lasted = now.saturating_sub(start);
                let message = format!(
                    "listener {} ({}) is keeping up again: at most {} in SYN_RECV; resolved after {}",
                    key,
                    text::owner(b.owner.as_ref()),
                    b.peak,
                    text::age(lasted)
                );
                let mut a = alert(self.min, &key, AlertStatus::Resolved, now, n, message);
                a.owner = b.owner;
                a.total = b.peak;
                a.duration_ns = Some(lasted);
                out.push(a);
                // Quiet again: the next crossing is a new finding.
                *b = Backlog {
                    sockets: std::mem::take(&mut b.sockets),
                    owner: b.owner,
                    ..Backlog::default()
                };
                if n == 0 {
                    self.listeners.remove(&key);
                }
            }
            None if n == 0 => {
                self.listeners.remove(&key);
            }
            _ => {}
        }
    }
}

fn alert(
    min: u64,
    key: &SocketAddr,
    status: AlertStatus,
    now: u64,
    n: u64,
    message: String,
) -> Alert {
    let mut a = Alert::new(
        NAME,
        status,
        now,
        format!("listen={key}"),
        message,
        EXPLANATION,
    );
    a.count = n;
    a.threshold_count = Some(min);
    a
}

impl Rule for SynBacklog {
    fn name(&self) -> &'static str {
        NAME
    }
    fn describe(&self) -> &'static str {
        "Children of one listener (local addr:port) in SYN_RECV at once, at or above \
         a threshold (default 100); resolves below half of it."
    }
    fn interest(&self) -> Interest {
        Interest::passing(TcpState::SynRecv)
    }
    fn on_transition(&mut self, ev: &RuleEvent<'_>, out: &mut Vec<Alert>) {
        let s = TcpState::SynRecv;
        if ev.left(s) {
            self.leave(ev.rec.t.conn_id, ev.ts(), out);
            return;
        }
        if !ev.entered(s) || ev.rec.t.old != TcpState::Listen {
            return;
        }
        let id = ev.rec.t.conn_id;
        self.leave(id, ev.ts(), out);
        if self.loc.len() >= self.max_sockets {
            self.untracked += 1;
            return;
        }
        let key = ev.rec.t.local;
        self.loc.insert(id, (key, ev.ts()));
        let b = self.listeners.entry(key).or_default();
        b.sockets.insert((ev.ts(), id));
        if ev.rec.owner.is_some() {
            b.owner = ev.rec.owner;
        }
        let n = b.sockets.len() as u64;
        b.peak = b.peak.max(n);
        let status = match b.firing_since {
            None if n >= self.min => AlertStatus::Firing,
            Some(_) if n >= 2 * b.reported => AlertStatus::Update,
            _ => return,
        };
        b.firing_since.get_or_insert(ev.ts());
        b.reported = n;
        let oldest = b
            .sockets
            .first()
            .map_or(0, |&(since, _)| ev.ts().saturating_sub(since));
        let owner = b.owner;
        let message = format!(
            "listener {} ({}) has {} in SYN_RECV, oldest {}",
            key,
            text::owner(owner.as_ref()),
            text::count(n, "connection", "connections"),
            text::age(oldest)
        );
        let mut a = alert(self.min, &key, status, ev.ts(), n, message);
        a.owner = owner;
        a.total = n;
        a.oldest_age_ns = Some(oldest);
        out.push(a);
    }
    fn tick(&mut self, _now_ns: u64, _out: &mut Vec<Alert>) {}
    fn on_forget(&mut self, conn_id: u64, state: TcpState, now_ns: u64, out: &mut Vec<Alert>) {
        if state == TcpState::SynRecv {
            self.leave(conn_id, now_ns, out);
        }
    }
    fn finish(&mut self) {
        self.loc.clear();
        self.listeners.clear();
    }
    fn footprint(&self) -> usize {
        self.loc.len() + self.listeners.len()
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::EngineConfig;
    use crate::engine::testkit::*;
    use crate::event::TcpState::*;
    use crate::rules::{AlertStatus, RulesConfig};

    const RULE: &str = "syn_backlog";

    #[test]
    fn fires_at_threshold_per_listener_and_resolves_below_half() {
        let cfg = EngineConfig {
            rules: RulesConfig {
                syn_backlog_min: 4,
                ..RulesConfig::default()
            },
            ..EngineConfig::default()
        };
        let mut sim = Sim::new(cfg);
        let nginx = task(80, "nginx");
        sim.feed(&Sock::new(1, "0.0.0.0:443", "0.0.0.0:0", nginx).ev(0, Close, Listen));
        let mut got = vec![];
        let kid = |i: u64| {
            Sock::new(
                100 + i,
                "0.0.0.0:443",
                &format!("0.0.0.0:{}", 50_000 + i),
                task(9, "irq"),
            )
        };
        for i in 0..8u64 {
            let out = sim.feed(&kid(i).ev(i * MS, Listen, SynRecv));
            got.extend(
                alerts_of(&out, RULE)
                    .into_iter()
                    .map(|a| (i, a.status, a.count)),
            );
        }
        use AlertStatus::*;
        assert_eq!(got, vec![(3, Firing, 4), (7, Update, 8)]);
        let a = alerts_of(&sim.feed(&kid(8).ev(9 * MS, Listen, SynRecv)), RULE).len();
        assert_eq!(a, 0, "9 is not double 8");
        // Completing handshakes drains it: resolved when fewer than 2 remain.
        let mut res = vec![];
        for i in 0..9u64 {
            let s = Sock::new(
                100 + i,
                "10.0.0.1:443",
                &format!("10.0.0.3:{}", 50_000 + i),
                task(9, "irq"),
            );
            let out = sim.feed(&s.ev(S + i, SynRecv, Established));
            res.extend(
                alerts_of(&out, RULE)
                    .into_iter()
                    .map(|a| (i, a.status, a.count, a.message.clone())),
            );
        }
        assert_eq!(
            res,
            vec![(7, Resolved, 1, "listener 0.0.0.0:443 (pid 80 (nginx)) is keeping up again: at most 9 in SYN_RECV; resolved after 997ms".to_string())]
        );
    }
}
