//! Shared machinery for "socket stuck in one state" rules: sockets waiting in the state are
//! kept ordered by entry time, so `tick` only looks at the ones that just crossed the
//! threshold; stuck sockets are grouped per owner process so a leak of 500 sockets is one
//! finding, re-stated when it doubles and resolved, with how long it lasted, when the
//! last one leaves the state.

use super::{Alert, AlertStatus, PeerShare, Rule, RuleEvent, RulesConfig, text};
use crate::engine::IdMap;
use crate::event::{EventKind, Task, TcpState};
use std::collections::{BTreeMap, BTreeSet, HashMap};
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
    waiting: BTreeMap<(u64, u64), Waiting>,
    loc: IdMap<Loc>,
    groups: HashMap<GroupKey, Group>,
    /// Sockets found in the state by the start-up snapshot: how long they were in it
    /// before is unknown, so their ages are lower bounds.
    present: std::collections::HashSet<u64>,
    /// Sockets not tracked because `max_sockets` was reached.
    pub untracked: u64,
}

impl Stuck {
    pub fn new(spec: StuckSpec, after_ns: u64, cfg: &RulesConfig) -> Stuck {
        Stuck {
            spec,
            after_ns,
            max_sockets: cfg.max_sockets,
            waiting: BTreeMap::new(),
            loc: IdMap::default(),
            groups: HashMap::new(),
            present: std::collections::HashSet::new(),
            untracked: 0,
        }
    }

    fn leave(&mut self, id: u64, now: u64, forgotten: bool, out: &mut Vec<Alert>) {
        if !self.present.is_empty() {
            self.present.remove(&id);
        }
        match self.loc.remove(&id) {
            None => {}
            Some(Loc::Waiting { since }) => {
                self.waiting.remove(&(since, id));
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
    fn wait(&mut self, id: u64, since: u64, ev: &RuleEvent<'_>) {
        let t = &ev.rec.t;
        let w = Waiting {
            owner: ev.rec.owner,
            peer: ev.peer(),
            backlog_of: (t.meta.unaccepted && t.kind == EventKind::State).then_some(t.local.port()),
        };
        self.waiting.insert((since, id), w);
        self.loc.insert(id, Loc::Waiting { since });
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

    fn on_transition(&mut self, ev: &RuleEvent<'_>, out: &mut Vec<Alert>) {
        let s = self.spec.state;
        if ev.rec.t.kind == EventKind::Accept {
            // accept() gave a queued socket its owner: it moves to that owner's finding,
            // keeping the time it entered the state.
            let id = ev.rec.t.conn_id;
            let since = match self.loc.get(&id) {
                Some(Loc::Waiting { since } | Loc::Stuck { since, .. }) => *since,
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
        while let Some((&(since, id), _)) = self.waiting.first_key_value() {
            if now.saturating_sub(since) < self.after_ns {
                break;
            }
            let w = self
                .waiting
                .remove(&(since, id))
                .expect("first entry present");
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
        self.loc.clear();
        self.groups.clear();
    }

    fn footprint(&self) -> usize {
        self.loc.len() + self.groups.len()
    }
}
