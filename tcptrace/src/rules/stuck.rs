//! Shared machinery for "socket stuck in one state" rules: sockets waiting in the state are
//! queued by entry time, so `tick` only looks at the ones that just crossed the threshold;
//! stuck sockets are grouped per owner process so a leak of 500 sockets is one finding,
//! re-stated when it doubles and resolved, with how long it lasted, when the last one
//! leaves the state.

use super::{Alert, AlertStatus, Interest, PeerShare, Rule, RuleEvent, RulesConfig, text};
use crate::engine::{FastMap, FastSet, IdMap};
use crate::event::{EventKind, Task, TcpState};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;

/// What differs between the stuck rules.
pub struct StuckSpec {
    pub rule: &'static str,
    pub state: TcpState,
    pub explanation: &'static str,
    /// What the rule detects, for `Rule::describe`.
    pub description: &'static str,
}

/// A socket waiting in the state, not yet past the threshold.
#[derive(Clone, Copy, Debug)]
struct Waiting {
    owner: Option<Task>,
    peer: SocketAddr,
    /// Never accepted: the local port of the listener whose queue it sits in.
    backlog_of: Option<u16>,
}

/// Findings are per owner process, and separate for sockets no process has accepted (they
/// sit in a listener's accept queue: the listener's owner holds no fd to them).
type GroupKey = (Option<u32>, Option<u16>);

#[derive(Clone, Copy, Debug)]
enum Loc {
    Waiting {
        since: u64,
        w: Waiting,
    },
    Stuck {
        since: u64,
        group: GroupKey,
        peer: SocketAddr,
    },
}

/// Stuck sockets of one owner process (None: unknown owner).
#[derive(Debug)]
struct Group {
    owner: Option<Task>,
    /// (entered, conn_id), oldest first.
    sockets: BTreeSet<(u64, u64)>,
    /// Keyed by the peers, which remote hosts choose, without a cap: std's SipHash.
    peers: HashMap<SocketAddr, u64>,
    /// Earliest entry into the state among all sockets this finding ever had.
    first_since: u64,
    /// Longest any departed socket was in the state.
    longest_ns: u64,
    /// Sockets ever stuck during this finding.
    total: u64,
    /// Sockets dropped from tracking (evicted) rather than seen leaving.
    forgotten: u64,
    reported: u64,
}

pub struct Stuck {
    spec: StuckSpec,
    after_ns: u64,
    max_sockets: usize,
    /// (entered, conn_id) of sockets waiting in the state, oldest first. Sockets enter in
    /// (nearly) time order, so this is a push at the back; one that leaves early is not
    /// searched for: its entry stays, dead, until `tick` pops it or a compaction drops it.
    /// An entry is live while `loc` has the socket waiting since that very time.
    waiting: VecDeque<(u64, u64)>,
    /// Live entries in `waiting`: the dead ones are `waiting.len() - live_waiting`.
    live_waiting: usize,
    loc: IdMap<Loc>,
    groups: FastMap<GroupKey, Group>,
    /// Sockets found in the state by the start-up snapshot: how long they were in it
    /// before is unknown, so their ages are lower bounds.
    present: FastSet<u64>,
    /// Sockets not tracked because `max_sockets` was reached.
    pub untracked: u64,
}

impl Stuck {
    pub fn new(spec: StuckSpec, after_ns: u64, cfg: &RulesConfig) -> Stuck {
        Stuck {
            spec,
            after_ns,
            max_sockets: cfg.max_sockets,
            waiting: VecDeque::new(),
            live_waiting: 0,
            loc: IdMap::default(),
            groups: FastMap::default(),
            present: FastSet::default(),
            untracked: 0,
        }
    }

    fn leave(&mut self, id: u64, now: u64, forgotten: bool, out: &mut Vec<Alert>) {
        if !self.present.is_empty() {
            self.present.remove(&id);
        }
        match self.loc.remove(&id) {
            None => {}
            Some(Loc::Waiting { .. }) => {
                self.live_waiting -= 1;
                self.compact();
            }
            Some(Loc::Stuck { since, group, peer }) => {
                let Some(g) = self.groups.get_mut(&group) else {
                    return;
                };
                g.sockets.remove(&(since, id));
                if let Some(n) = g.peers.get_mut(&peer) {
                    *n -= 1;
                    if *n == 0 {
                        g.peers.remove(&peer);
                    }
                }
                g.longest_ns = g.longest_ns.max(now.saturating_sub(since));
                g.forgotten += u64::from(forgotten);
                if g.sockets.is_empty() {
                    let g = self.groups.remove(&group).expect("group present");
                    out.push(self.resolved(group, &g, now));
                }
            }
        }
    }

    /// Drops dead entries from `waiting` once they outnumber the live ones (with some
    /// slack): sockets passing through the state quickly then keep it at about twice the
    /// sockets waiting, for an amortised O(1) per departure.
    fn compact(&mut self) {
        let dead = self.waiting.len() - self.live_waiting;
        if dead <= self.live_waiting + 1024 {
            return;
        }
        let loc = &self.loc;
        self.waiting.retain(
            |&(since, id)| matches!(loc.get(&id), Some(&Loc::Waiting { since: s, .. }) if s == since),
        );
    }

    /// Who holds the sockets of group `key`, for messages.
    fn holder(key: GroupKey, g: &Group) -> String {
        match key.1 {
            None => text::owner(g.owner.as_ref()),
            Some(port) => format!(
                "the accept queue of the listener on :{port} (owned by {}; never accepted)",
                text::owner(g.owner.as_ref())
            ),
        }
    }

    fn firing(&self, key: GroupKey, g: &Group, status: AlertStatus, now: u64) -> Alert {
        let n = g.sockets.len() as u64;
        let oldest = g
            .sockets
            .first()
            .map_or(0, |&(since, _)| now.saturating_sub(since));
        let at_least = g
            .sockets
            .first()
            .is_some_and(|(_, id)| self.present.contains(id));
        let top = g
            .peers
            .iter()
            .max_by_key(|&(a, n)| (*n, std::cmp::Reverse(*a)));
        let mostly = top.map(|(a, &c)| PeerShare {
            peer: text::peer(a),
            count: c,
        });
        let to = match &mostly {
            Some(p) if p.count * 2 > n || n == 1 => format!(", mostly to {}", p.peer),
            Some(p) => format!(", {} of them to {}", p.count, p.peer),
            None => String::new(),
        };
        let age = if at_least {
            format!("≥ {} (present at start)", text::age(oldest))
        } else {
            text::age(oldest)
        };
        let message = format!(
            "{} holds {} in {}, oldest {age}{to}",
            Self::holder(key, g),
            text::count(n, "socket", "sockets"),
            self.spec.state,
        );
        let mut a = self.alert(key, g, status, now, message);
        a.count = n;
        a.oldest_age_ns = Some(oldest);
        a.mostly_to = mostly;
        a
    }

    fn resolved(&self, key: GroupKey, g: &Group, now: u64) -> Alert {
        let lasted = now.saturating_sub(g.first_since);
        let evicted = match g.forgotten {
            0 => String::new(),
            n => format!(" ({n} no longer tracked: evicted)"),
        };
        let message = format!(
            "{} no longer holds sockets in {}: {} stuck, the longest for {}; resolved after {}{evicted}",
            Self::holder(key, g),
            self.spec.state,
            g.total,
            text::age(g.longest_ns),
            text::age(lasted),
        );
        let mut a = self.alert(key, g, AlertStatus::Resolved, now, message);
        a.oldest_age_ns = Some(g.longest_ns);
        a.duration_ns = Some(lasted);
        a
    }

    fn alert(
        &self,
        key: GroupKey,
        g: &Group,
        status: AlertStatus,
        now: u64,
        message: String,
    ) -> Alert {
        let mut a = Alert::new(
            self.spec.rule,
            status,
            now,
            match key.1 {
                None => text::owner_key(key.0),
                Some(port) => format!("{},unaccepted_on={port}", text::owner_key(key.0)),
            },
            message,
            self.spec.explanation,
        );
        a.owner = g.owner;
        a.total = g.total;
        a.threshold_ns = Some(self.after_ns);
        a
    }
}

impl Stuck {
    /// Who holds the socket of event `ev` and where it points.
    fn waiting(ev: &RuleEvent<'_>) -> Waiting {
        let t = &ev.rec.t;
        Waiting {
            owner: ev.rec.owner,
            peer: ev.peer(),
            backlog_of: (t.meta.unaccepted && t.kind == EventKind::State).then_some(t.local.port()),
        }
    }

    fn wait(&mut self, id: u64, since: u64, ev: &RuleEvent<'_>) {
        let t = &ev.rec.t;
        let w = Self::waiting(ev);
        let key = (since, id);
        if self.waiting.back().is_none_or(|&last| last <= key) {
            self.waiting.push_back(key);
        } else {
            // Out of order: a few microseconds across CPUs, or a stuck socket accepted
            // back into waiting with the time it entered the state.
            let at = self.waiting.partition_point(|&e| e <= key);
            self.waiting.insert(at, key);
        }
        self.live_waiting += 1;
        self.loc.insert(id, Loc::Waiting { since, w });
        if t.kind == EventKind::Present {
            self.present.insert(id);
        }
    }
}

impl Rule for Stuck {
    fn name(&self) -> &'static str {
        self.spec.rule
    }

    fn describe(&self) -> &'static str {
        self.spec.description
    }

    fn interest(&self) -> Interest {
        Interest::in_state(self.spec.state)
    }

    fn on_transition(&mut self, ev: &RuleEvent<'_>, out: &mut Vec<Alert>) {
        let s = self.spec.state;
        if ev.rec.t.kind == EventKind::Accept {
            // accept() gave a queued socket its owner: it moves to that owner's finding,
            // keeping the time it entered the state.
            let id = ev.rec.t.conn_id;
            let since = match self.loc.get_mut(&id) {
                // Not stuck yet: only who holds it changes; its queue entry stays.
                Some(Loc::Waiting { w, .. }) => {
                    *w = Self::waiting(ev);
                    return;
                }
                Some(Loc::Stuck { since, .. }) => *since,
                None => return,
            };
            let present = self.present.contains(&id);
            self.leave(id, ev.ts(), false, out);
            self.wait(id, since, ev);
            if present {
                self.present.insert(id);
            }
            return;
        }
        if ev.rec.t.kind == EventKind::Handoff {
            // The application closed it; the kernel ends it on its own (tcp_fin_timeout).
            self.leave(ev.rec.t.conn_id, ev.ts(), false, out);
            return;
        }
        if ev.left(s) {
            self.leave(ev.rec.t.conn_id, ev.ts(), false, out);
        } else if ev.entered(s) {
            let id = ev.rec.t.conn_id;
            if self.loc.contains_key(&id) {
                // Entered twice without leaving (lost events): the newer entry counts.
                self.leave(id, ev.ts(), false, out);
            }
            if self.loc.len() >= self.max_sockets {
                self.untracked += 1;
                return;
            }
            self.wait(id, ev.ts(), ev);
        }
    }

    fn on_forget(&mut self, conn_id: u64, state: TcpState, now: u64, out: &mut Vec<Alert>) {
        if state == self.spec.state {
            self.leave(conn_id, now, true, out);
        }
    }

    fn tick(&mut self, now: u64, out: &mut Vec<Alert>) {
        let mut touched: Vec<GroupKey> = Vec::new();
        while let Some(&(since, id)) = self.waiting.front() {
            if now.saturating_sub(since) < self.after_ns {
                break;
            }
            self.waiting.pop_front();
            let w = match self.loc.get(&id) {
                Some(&Loc::Waiting { since: s, w }) if s == since => w,
                _ => continue, // left the state (or re-entered later) meanwhile
            };
            self.live_waiting -= 1;
            let key = (w.owner.map(|o| o.pid), w.backlog_of);
            let g = self.groups.entry(key).or_insert_with(|| Group {
                owner: w.owner,
                sockets: BTreeSet::new(),
                peers: HashMap::new(),
                first_since: since,
                longest_ns: 0,
                total: 0,
                forgotten: 0,
                reported: 0,
            });
            if w.owner.is_some() {
                g.owner = w.owner;
            }
            g.sockets.insert((since, id));
            *g.peers.entry(w.peer).or_insert(0) += 1;
            g.first_since = g.first_since.min(since);
            g.total += 1;
            self.loc.insert(
                id,
                Loc::Stuck {
                    since,
                    group: key,
                    peer: w.peer,
                },
            );
            touched.push(key);
        }
        touched.sort_unstable();
        touched.dedup();
        for key in touched {
            let g = self.groups.get_mut(&key).expect("touched group present");
            let n = g.sockets.len() as u64;
            let status = match g.reported {
                0 => AlertStatus::Firing,
                r if n >= 2 * r => AlertStatus::Update,
                _ => continue,
            };
            g.reported = n;
            let g = &self.groups[&key];
            out.push(self.firing(key, g, status, now));
        }
    }

    fn finish(&mut self) {
        self.present.clear();
        self.waiting.clear();
        self.live_waiting = 0;
        self.loc.clear();
        self.groups.clear();
    }

    fn footprint(&self) -> usize {
        self.loc.len() + self.groups.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testkit::*;
    use crate::engine::{Role, TransitionRecord};
    use crate::event::TcpState::*;

    fn rule() -> Stuck {
        let spec = StuckSpec {
            rule: "test_stuck",
            state: CloseWait,
            explanation: "",
            description: "",
        };
        Stuck::new(spec, 10 * S, &RulesConfig::default())
    }

    /// Feeds connection `id` from `old` to `new` at `ts` to the rule alone.
    fn step(r: &mut Stuck, id: u64, ts: u64, old: TcpState, new: TcpState) -> Vec<Alert> {
        let s = Sock::new(id, "10.0.0.1:80", "10.0.0.9:5000", task(7, "srv"));
        let rec = TransitionRecord {
            t: s.ev(ts, old, new),
            in_old_state_ns: None,
            owner: Some(task(7, "srv")),
            role: Role::ActiveOpen,
            legal: true,
            gap: false,
        };
        let ev = RuleEvent {
            rec: &rec,
            prev_state: Some(old),
            local: s.local,
            remote: s.remote,
            handshake_ns: None,
            closed: None,
        };
        let mut out = Vec::new();
        r.on_transition(&ev, &mut out);
        out
    }

    #[test]
    fn sockets_that_leave_early_leave_a_bounded_queue_and_never_fire() {
        let mut r = rule();
        // One socket stays; 100,000 pass through the state within a millisecond each.
        step(&mut r, 1, 0, Established, CloseWait);
        for id in 2..100_002u64 {
            let ts = id * 1_000;
            step(&mut r, id, ts, Established, CloseWait);
            step(&mut r, id, ts + 500, CloseWait, LastAck);
            assert!(
                r.waiting.len() <= 2 * r.live_waiting + 1025,
                "{} queued for {} waiting",
                r.waiting.len(),
                r.live_waiting
            );
        }
        assert_eq!((r.live_waiting, r.loc.len()), (1, 1));
        let mut out = Vec::new();
        r.tick(10 * S, &mut out);
        assert_eq!(out.len(), 1, "only the socket that stayed: {out:#?}");
        assert_eq!(out[0].count, 1);
        assert_eq!(out[0].oldest_age_ns, Some(10 * S));
        assert!(r.waiting.len() <= 1025, "{}", r.waiting.len());
    }

    #[test]
    fn an_entry_out_of_time_order_still_fires_on_time() {
        let mut r = rule();
        step(&mut r, 1, 5 * S, Established, CloseWait);
        // Another CPU's event, delivered after but 2 s earlier.
        step(&mut r, 2, 3 * S, Established, CloseWait);
        let mut out = Vec::new();
        r.tick(13 * S, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].count, out[0].oldest_age_ns), (1, Some(10 * S)));
        r.tick(15 * S, &mut out);
        assert_eq!(out.len(), 2, "{out:#?}");
        assert_eq!((out[1].count, out[1].status), (2, AlertStatus::Update));
        // Re-entering after leaving: the old entry is dead, the new one times from now.
        step(&mut r, 3, 16 * S, Established, CloseWait);
        step(&mut r, 3, 17 * S, CloseWait, LastAck);
        step(&mut r, 3, 18 * S, LastAck, CloseWait);
        r.tick(26 * S + 1, &mut out);
        assert_eq!(out.len(), 2, "socket 3 entered again at 18 s: {out:#?}");
        r.tick(28 * S, &mut out);
        assert_eq!(out.len(), 2, "3 sockets after 2 is no doubling");
        assert_eq!(r.loc.len(), 3);
        assert_eq!(r.live_waiting, 0);
    }
}
