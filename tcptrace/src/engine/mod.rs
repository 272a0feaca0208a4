//! The lifecycle engine: follows every connection through Linux's TCP state machine, keyed
//! by conn_id, and turns transitions into per-event records, per-connection lifecycles and
//! (through the rules) alerts. Pure: transitions and a clock in, outputs out; it never
//! reads the wall clock, the kernel or the environment, so replay and live share it.
//!
//! Hot path budget: one hash operation per event (CLOSE removes, anything else finds or
//! inserts), no allocation except when a lifecycle or an alert is emitted.

mod close_kind;
mod conn;
mod lifecycle;
mod state_machine;
mod stats;
mod table;
#[cfg(test)]
pub(crate) mod testkit;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_owner;
#[cfg(test)]
mod tests_props;

pub use close_kind::{CloseEvidence, CloseKind, classify};
pub use lifecycle::{EndReason, Family, LifecycleRecord, PathStep, Role};
pub use state_machine::{in_owner_context, is_legal, starts_identity};
pub use stats::{CloseKindCounts, EngineStats};
pub use table::{ConnIndex, FastMap, FastSet, IdHasher, IdMap};

use crate::event::{EventKind, Task, TcpState, Transition};
use crate::rules::{Alert, Interest, Rule, RuleEvent, RulesConfig, default_rules};
use conn::{
    Conn, F_ENTRY_UNKNOWN, F_GAP, F_ILLEGAL, F_PARTIAL_START, F_REFERENCED, F_SPILLED, Spill, Steps,
};
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use table::{Owners, Slab, map_heap_bytes};

/// Engine settings. `Default` gives the documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Connections tracked at most. Default 1,000,000 (about 140 MB: 104 B per connection
    /// in the slab plus ~36 B in the index). At the cap the least recently active
    /// connection (CLOCK approximation; listeners last) is evicted and emitted as a
    /// partial lifecycle with `end: "evicted"`.
    pub max_connections: usize,
    pub rules: RulesConfig,
}

impl Default for EngineConfig {
    fn default() -> EngineConfig {
        let max_connections = 1_000_000;
        EngineConfig {
            max_connections,
            rules: RulesConfig {
                max_sockets: max_connections,
                ..RulesConfig::default()
            },
        }
    }
}

/// One transition with what the engine knows about its connection. Emitted for every
/// event, so it stays `Copy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransitionRecord {
    pub t: Transition,
    /// Time spent in `t.old`, i.e. since the connection's previous state change; None when
    /// unknown (first sight, lost events, or the clock went backwards).
    pub in_old_state_ns: Option<u64>,
    /// Best known owner (see `Engine` docs); None rather than a guess.
    pub owner: Option<Task>,
    pub role: Role,
    /// Legal for Linux's TCP state machine.
    pub legal: bool,
    /// `t.old` was not the state last seen for this connection: events were lost.
    pub gap: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Transition(TransitionRecord),
    Lifecycle(LifecycleRecord),
    Alert(Alert),
}

/// Listening sockets by local address, for accepted children to inherit their owner.
#[derive(Clone, Copy, Debug)]
struct ListenerEntry {
    /// The owner all listeners on this address share; None if unknown or they differ
    /// (SO_REUSEPORT across processes: a child's accepting process cannot be told).
    owner: Option<Task>,
    count: u32,
}

/// Everything besides the slab and the index, split out so a `&mut Conn` in the slab can
/// be updated alongside it.
struct Books {
    spill: Spill,
    owners: Owners,
    listeners: FastMap<SocketAddr, ListenerEntry>,
    state_counts: [u64; 14],
    stats: EngineStats,
}

/// The lifecycle engine. Owner attribution: `Transition::owner` when the kernel side knows
/// it; else the event's task, but only for transitions made in the owner's own syscall
/// (connect, listen, close, shutdown); an accepted child inherits its listener's owner
/// (found by the listener's local address) until one of those says otherwise.
pub struct Engine {
    cfg: EngineConfig,
    slab: Slab,
    index: ConnIndex,
    books: Books,
    rules: Vec<Box<dyn Rule>>,
    /// Which rules want which events, from their `interest`.
    dispatch: Dispatch,
    alerts: Vec<Alert>,
}

/// Which rules an event goes to: one bit per rule (bit i for the i-th, so they run in
/// order), in tables indexed by what the event is, built from each rule's [`Interest`].
/// One lookup per event for all rules: asking each rule's interest in turn cost as much as
/// the calls it saved. Rules past the 64th are called for every event.
struct Dispatch {
    by_new: [u64; 16],
    by_left: [u64; 16],
    by_kind: [u64; 8],
    illegal: u64,
    ends: u64,
}

impl Dispatch {
    const MAX_RULES: usize = 64;

    fn new(interests: impl Iterator<Item = Interest>) -> Dispatch {
        let mut d = Dispatch {
            by_new: [0; 16],
            by_left: [0; 16],
            by_kind: [0; 8],
            illegal: 0,
            ends: 0,
        };
        for (i, w) in interests.take(Self::MAX_RULES).enumerate() {
            let bit = 1u64 << i;
            for s in 0..16 {
                if w.new & (1 << s) != 0 {
                    d.by_new[s] |= bit;
                }
                if w.left & (1 << s) != 0 {
                    d.by_left[s] |= bit;
                }
            }
            for k in 0..8 {
                if w.kinds & (1 << k) != 0 {
                    d.by_kind[k] |= bit;
                }
            }
            if w.illegal {
                d.illegal |= bit;
            }
            if w.ends {
                d.ends |= bit;
            }
        }
        d
    }

    /// The rules (bits) that want `ev`.
    #[inline(always)]
    fn rules_for(&self, ev: &RuleEvent<'_>) -> u64 {
        let t = &ev.rec.t;
        let mut m = self.by_new[t.new as usize & 15]
            | self.by_left[t.old as usize & 15]
            | self.by_kind[t.kind as usize & 7];
        if let Some(p) = ev.prev_state {
            m |= self.by_left[p as usize & 15];
        }
        if !ev.rec.legal {
            m |= self.illegal;
        }
        if ev.closed.is_some() {
            m |= self.ends;
        }
        m
    }
}

/// A connection to look up in the kernel (see [`Engine::idle_connections`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleConn {
    pub conn_id: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl Engine {
    pub fn new(mut cfg: EngineConfig) -> Engine {
        cfg.max_connections = cfg.max_connections.max(1);
        // Rules never see more sockets than the engine tracks.
        cfg.rules.max_sockets = cfg.rules.max_sockets.min(cfg.max_connections);
        let rules = default_rules(&cfg.rules);
        Engine::with_rules(cfg, rules)
    }

    /// An engine running exactly `rules` (tests, or a CLI that disables some).
    pub fn with_rules(cfg: EngineConfig, rules: Vec<Box<dyn Rule>>) -> Engine {
        Engine {
            cfg,
            slab: Slab::new(),
            index: ConnIndex::default(),
            books: Books {
                spill: Spill::default(),
                owners: Owners::new(),
                listeners: FastMap::default(),
                state_counts: [0; 14],
                stats: EngineStats::default(),
            },
            dispatch: Dispatch::new(rules.iter().map(|r| r.interest())),
            rules,
            alerts: Vec::new(),
        }
    }

    /// (name, description) of every active rule.
    pub fn rules(&self) -> impl Iterator<Item = (&'static str, &'static str)> + '_ {
        self.rules.iter().map(|r| (r.name(), r.describe()))
    }

    /// Feeds one transition; `t.ts_ns` is the clock at that moment. Pushes, in order: the
    /// lifecycle of a superseded identity (rare), this event's `Transition` record, the
    /// `Lifecycle` it ended (if any), alerts, then an eviction's lifecycle and alerts.
    pub fn on_transition(&mut self, t: &Transition, out: &mut Vec<Output>) {
        if t.kind == EventKind::Vanished {
            // Its record goes out as it came (so a replay of the log retires it too),
            // then the lifecycle of the connection, cut where its end was lost.
            out.push(Output::Transition(TransitionRecord {
                t: *t,
                in_old_state_ns: None,
                owner: t.owner,
                role: Role::Unknown,
                legal: true,
                gap: false,
            }));
            self.retire_vanished(t.conn_id, t.ts_ns, out);
            return;
        }
        // Accepts and handoffs are no state change: legal by definition.
        let legal = t.kind != EventKind::State || is_legal(t.old, t.new);
        self.books.stats.transitions += 1;
        if !legal {
            self.books.stats.illegal += 1;
        }
        let fresh_start = !t.midlife && (t.starts_conn || starts_identity(t.old, t.new));
        // The record, and the lifecycle it ends, are built where they go (in `out`, at
        // `at`) and read from there by the rules: moved about, they were a tenth of the
        // replay's time in memcpy.
        let (at, prev, local, remote, handshake_ns, protect) = if t.new == TcpState::Close {
            // Removing first keeps CLOSE at one hash operation.
            let (mut c, prev) = match self.index.remove(&t.conn_id) {
                Some(s) => {
                    let c = self.slab.release(s);
                    let prev = c.state();
                    (c, prev)
                }
                None if t.old == TcpState::Close => {
                    // close() on a never-connected or already-closed socket: no lifecycle.
                    out.push(Output::Transition(TransitionRecord {
                        t: *t,
                        in_old_state_ns: None,
                        owner: t.owner,
                        role: Role::Unknown,
                        legal,
                        gap: false,
                    }));
                    self.emit(out.len() - 1, None, t.local, t.remote, None, out);
                    return;
                }
                None => (begin(t, fresh_start, &mut self.books), None),
            };
            let b = &mut self.books;
            apply(&mut c, t, prev, legal, b, out);
            let at = out.len() - 1;
            let kind = classify(
                t.old,
                lifecycle::time_wait_from(&c, &b.spill),
                CloseEvidence::default(),
            );
            push_in_place(out, || {
                Output::Lifecycle(LifecycleRecord::from_conn(
                    &c,
                    &b.spill,
                    b.owners.get(c.owner),
                    t.ts_ns,
                    EndReason::Closed,
                    Some(kind),
                ))
            });
            if let Some(Output::Lifecycle(lc)) = out.last() {
                b.stats.lifecycles_complete += u64::from(lc.complete);
            }
            b.stats.lifecycles_closed += 1;
            b.stats.close_kinds.add(kind);
            retire(&c, b);
            (at, prev, c.local(), c.remote(), None, u32::MAX)
        } else {
            let (slot, mut prev) = match self.index.entry(t.conn_id) {
                Entry::Occupied(e) => {
                    let s = *e.get();
                    (s, self.slab.get(s).state())
                }
                Entry::Vacant(v) => {
                    let s = self.slab.alloc(begin(t, fresh_start, &mut self.books));
                    v.insert(s);
                    (s, None)
                }
            };
            if prev.is_some() && fresh_start && t.starts_conn {
                // A new identity under a live conn_id: let the old one go whole.
                let fresh = begin(t, true, &mut self.books);
                let old = std::mem::replace(self.slab.get_mut(slot), fresh);
                self.books.stats.superseded += 1;
                self.let_go(old, t.ts_ns, EndReason::Superseded, true, out);
                prev = None;
            }
            let b = &mut self.books;
            let c = self.slab.get_mut(slot);
            let entered_established = apply(c, t, prev, legal, b, out);
            let hs = if entered_established {
                lifecycle::handshake_ns(Steps::new(c.path_bytes(&b.spill), c.first_ts))
            } else {
                None
            };
            (out.len() - 1, prev, c.local(), c.remote(), hs, slot)
        };
        self.emit(at, prev, local, remote, handshake_ns, out);
        if self.index.len() > self.cfg.max_connections {
            self.evict_one(protect, t.ts_ns, out);
        }
    }

    /// Drops connection `conn_id` (a duplicate of another identity), emitting its partial
    /// lifecycle (`end: "superseded"`); rules forget it.
    pub fn forget(&mut self, conn_id: u64, now_ns: u64, out: &mut Vec<Output>) {
        if let Some(s) = self.index.remove(&conn_id) {
            let c = self.slab.release(s);
            self.books.stats.superseded += 1;
            self.let_go(c, now_ns, EndReason::Superseded, true, out);
        }
    }

    /// Up to `max` connections of network namespace `netns` with no event for `idle_ns`,
    /// for a check against the kernel's sockets ([`Engine::retire_vanished`] for those it
    /// no longer has), looking from slot `from` on. Returns them and where the next call
    /// goes on from, so that successive calls sweep all connections however many there are.
    pub fn idle_connections(
        &self,
        from: u32,
        now_ns: u64,
        idle_ns: u64,
        netns: u32,
        max: usize,
    ) -> (Vec<IdleConn>, u32) {
        let mut found = Vec::new();
        let high = self.slab.high();
        let mut next = from;
        let mut looked = 0u32;
        while looked < high && found.len() < max {
            let s = next % high;
            next = s + 1;
            looked += 1;
            let c = self.slab.get(s);
            if c.is_free() || c.netns != netns || now_ns.saturating_sub(c.last_ts) < idle_ns {
                continue;
            }
            // A listener's own address is no connection's: not looked up.
            if c.state() == Some(TcpState::Listen) {
                continue;
            }
            // Nor an incomplete one: CLOSE → SYN_SENT fires before connect() picks the
            // local port, so a connection still retrying its SYN is known without it.
            let (local, remote) = (c.local(), c.remote());
            if [local, remote]
                .iter()
                .any(|a| a.port() == 0 || a.ip().is_unspecified())
            {
                continue;
            }
            found.push(IdleConn {
                conn_id: c.conn_id,
                local,
                remote,
            });
        }
        (found, next)
    }

    /// Retires a connection whose socket the kernel no longer has: its end was lost, so it
    /// goes out as a partial lifecycle (`end: "vanished"`, with a gap) and rules forget it.
    /// False if the engine no longer has it either (its end arrived meanwhile).
    pub fn retire_vanished(&mut self, conn_id: u64, now_ns: u64, out: &mut Vec<Output>) -> bool {
        let Some(s) = self.index.remove(&conn_id) else {
            return false;
        };
        let mut c = self.slab.release(s);
        c.flags |= F_GAP;
        self.books.stats.vanished += 1;
        self.books.stats.gaps += 1;
        self.let_go(c, now_ns, EndReason::Vanished, true, out);
        true
    }

    /// Timer-driven evaluation: stuck sockets age, windows slide, findings resolve.
    pub fn tick(&mut self, now_ns: u64, out: &mut Vec<Output>) {
        for r in &mut self.rules {
            r.tick(now_ns, &mut self.alerts);
        }
        out.extend(self.alerts.drain(..).map(Output::Alert));
    }

    /// End of input: a last `tick`, then every connection still open is emitted as a
    /// partial lifecycle (`end: "finished"`) and forgotten. Findings still firing are left
    /// firing: the sockets were not seen to close. The engine is empty afterwards.
    pub fn finish(&mut self, now_ns: u64, out: &mut Vec<Output>) {
        self.tick(now_ns, out);
        while !self.finish_some(now_ns, usize::MAX, out) {}
    }

    /// `finish` in steps that emit at most `max` lifecycles each, so that a caller can
    /// write them out as it goes instead of holding a million at once. Call `tick` first;
    /// returns true once the engine is empty (and the rules are finished).
    pub fn finish_some(&mut self, now_ns: u64, max: usize, out: &mut Vec<Output>) -> bool {
        let slots: Vec<u32> = self.slab.live_slots().take(max).collect();
        for s in slots {
            let c = self.slab.release(s);
            self.index.remove(&c.conn_id);
            self.let_go(c, now_ns, EndReason::Finished, false, out);
        }
        if self.index.is_empty() {
            for r in &mut self.rules {
                r.finish();
            }
            return true;
        }
        false
    }

    pub fn stats(&self) -> EngineStats {
        let b = &self.books;
        EngineStats {
            tracked: self.index.len() as u64,
            listeners: b.listeners.values().map(|l| u64::from(l.count)).sum(),
            owners: b.owners.len() as u64,
            ..b.stats
        }
    }

    /// Tracked connections per state, indexed by kernel state number (what `ss -tan` would
    /// count for them). CLOSE is always 0: a closed connection is no longer tracked; and
    /// TIME_WAIT mini-sockets are not tracked until the TIME_WAIT hooks exist.
    pub fn current_state_counts(&self) -> [u64; 14] {
        self.books.state_counts
    }

    /// Estimated heap held by the engine's tables (not the rules): for the memory budget.
    pub fn heap_bytes(&self) -> usize {
        let b = &self.books;
        self.slab.heap_bytes()
            + map_heap_bytes(self.index.capacity(), std::mem::size_of::<(u64, u32)>())
            + b.owners.heap_bytes()
            + map_heap_bytes(
                b.listeners.capacity(),
                std::mem::size_of::<(SocketAddr, ListenerEntry)>(),
            )
            + b.spill.values().map(|v| v.capacity()).sum::<usize>()
            + map_heap_bytes(b.spill.capacity(), std::mem::size_of::<(u64, Vec<u8>)>())
    }

    /// Items held by all rules, to check they stay bounded.
    pub fn rules_footprint(&self) -> usize {
        self.rules.iter().map(|r| r.footprint()).sum()
    }

    /// Runs the rules on the event whose record is `out[at]` (followed by the lifecycle it
    /// ended, if any) and pushes their alerts after them.
    fn emit(
        &mut self,
        at: usize,
        prev_state: Option<TcpState>,
        local: SocketAddr,
        remote: SocketAddr,
        handshake_ns: Option<u64>,
        out: &mut Vec<Output>,
    ) {
        let Some(Output::Transition(rec)) = out.get(at) else {
            unreachable!("the event's record is at {at}");
        };
        let closed = match out.get(at + 1) {
            Some(Output::Lifecycle(lc)) => Some(lc),
            _ => None,
        };
        let ev = RuleEvent {
            rec,
            prev_state,
            local,
            remote,
            handshake_ns,
            closed,
        };
        let mut wanted = self.dispatch.rules_for(&ev);
        while wanted != 0 {
            let i = wanted.trailing_zeros() as usize;
            wanted &= wanted - 1;
            self.rules[i].on_transition(&ev, &mut self.alerts);
        }
        for r in self.rules.iter_mut().skip(Dispatch::MAX_RULES) {
            r.on_transition(&ev, &mut self.alerts);
        }
        out.extend(self.alerts.drain(..).map(Output::Alert));
    }

    fn evict_one(&mut self, protect: u32, now: u64, out: &mut Vec<Output>) {
        let Some(s) = self.slab.victim(protect) else {
            return;
        };
        let c = self.slab.release(s);
        self.index.remove(&c.conn_id);
        self.books.stats.evicted += 1;
        self.let_go(c, now, EndReason::Evicted, true, out);
    }

    /// Emits a connection that did not reach CLOSE as a partial lifecycle and frees what
    /// it held; with `tell_rules`, rules drop their per-socket state for it.
    fn let_go(
        &mut self,
        c: Conn,
        now: u64,
        end: EndReason,
        tell_rules: bool,
        out: &mut Vec<Output>,
    ) {
        let b = &mut self.books;
        let st = c.state();
        if let Some(st) = st {
            b.state_counts[st as usize] = b.state_counts[st as usize].saturating_sub(1);
        }
        let lc = LifecycleRecord::from_conn(&c, &b.spill, b.owners.get(c.owner), now, end, None);
        b.stats.lifecycles_partial += 1;
        retire(&c, b);
        out.push(Output::Lifecycle(lc));
        if let (true, Some(st)) = (tell_rules, st) {
            for r in &mut self.rules {
                r.on_forget(c.conn_id, st, now, &mut self.alerts);
            }
            out.extend(self.alerts.drain(..).map(Output::Alert));
        }
    }
}

/// A connection as first seen: its origin state (the transition's old state) has no known
/// start time; a mid-life sighting is marked partial.
fn begin(t: &Transition, full: bool, b: &mut Books) -> Conn {
    let mut c = Conn::fresh(t.conn_id, t.ts_ns, t.old, Role::from_first(t.old, t.new));
    c.netns = t.meta.netns;
    c.flags |= F_ENTRY_UNKNOWN;
    if !full {
        c.flags |= F_PARTIAL_START;
        b.stats.partial_starts += 1;
    }
    c.push_untimed(&mut b.spill, t.old, !full);
    c
}

/// Applies one transition to a connection and pushes its record onto `out`. Returns
/// whether it just entered ESTABLISHED.
fn apply(
    c: &mut Conn,
    t: &Transition,
    prev: Option<TcpState>,
    legal: bool,
    b: &mut Books,
    out: &mut Vec<Output>,
) -> bool {
    use TcpState::*;
    // An accept names the owner. The state it carries was read as accept() returned and
    // may already be behind: the peer's FIN can move the socket to CLOSE_WAIT on another
    // CPU in between, and that event can reach the ring buffer first. The connection's own
    // state wins, so a late accept is neither a gap nor a step back.
    let accepted;
    let t = match prev {
        Some(p) if t.kind == EventKind::Accept && t.new != p => {
            accepted = Transition {
                old: p,
                new: p,
                ..*t
            };
            &accepted
        }
        _ => t,
    };
    let ts = t.ts_ns;
    let gap = prev.is_some_and(|p| p != t.old);
    let in_old_state_ns = if prev.is_none() || gap || c.has(F_ENTRY_UNKNOWN) {
        None
    } else {
        ts.checked_sub(c.last_ts)
    };
    if prev == Some(Listen) && t.new != Listen {
        unlisten(c, b);
    }
    // A listener's address is its registration key: it must not move while listening.
    if prev != Some(Listen) {
        c.absorb_tuple(&t.local, &t.remote);
    }
    let owner = if t.owner.is_some() {
        t.owner
    } else if in_owner_context(t.old, t.new) && t.task.pid != 0 {
        Some(t.task)
    } else if prev.is_none() && t.old == Listen && t.new == SynRecv {
        b.listeners.get(&t.local).and_then(|l| l.owner)
    } else {
        None
    };
    // Comparing first keeps the owner table out of the hot path when nothing changed.
    match owner {
        Some(o) if b.owners.get(c.owner) != Some(o) => {
            b.owners.release(c.owner);
            c.owner = b.owners.intern(o);
        }
        _ => {}
    }
    if gap {
        c.flags |= F_GAP | F_ENTRY_UNKNOWN;
        b.stats.gaps += 1;
        c.push_untimed(&mut b.spill, t.old, true);
    }
    if !legal {
        c.flags |= F_ILLEGAL;
    }
    if t.old != t.new {
        c.push_timed(&mut b.spill, t.new, ts);
        c.flags &= !F_ENTRY_UNKNOWN;
    }
    if let Some(p) = prev {
        b.state_counts[p as usize] = b.state_counts[p as usize].saturating_sub(1);
    }
    if t.new != Close {
        b.state_counts[t.new as usize] += 1;
    }
    c.state = t.new as u8;
    c.flags |= F_REFERENCED;
    if t.new == Listen && prev != Some(Listen) {
        relisten(c, b);
    }
    push_in_place(out, || {
        Output::Transition(TransitionRecord {
            t: *t,
            in_old_state_ns,
            owner: b.owners.get(c.owner),
            role: c.role,
            legal,
            gap,
        })
    });
    t.new == Established && prev != Some(Established)
}

/// Appends the output `make` builds, written straight into `out`'s buffer. Built first and
/// then pushed, a ~240-byte record was made on the stack and copied in (`push` may grow the
/// buffer in between): 4 % of a binary replay in memcpy.
#[inline(always)]
fn push_in_place(out: &mut Vec<Output>, make: impl FnOnce() -> Output) {
    out.reserve(1);
    out.spare_capacity_mut()[0].write(make());
    // SAFETY: the slot past the length was just initialised, and `reserve` made room.
    unsafe { out.set_len(out.len() + 1) };
}

fn relisten(c: &Conn, b: &mut Books) {
    let owner = b.owners.get(c.owner);
    let e = b
        .listeners
        .entry(c.local())
        .or_insert(ListenerEntry { owner, count: 0 });
    if e.count > 0 && e.owner.map(|o| o.pid) != owner.map(|o| o.pid) {
        e.owner = None;
    }
    e.count += 1;
}

fn unlisten(c: &Conn, b: &mut Books) {
    let key = c.local();
    if let Some(e) = b.listeners.get_mut(&key) {
        e.count -= 1;
        if e.count == 0 {
            b.listeners.remove(&key);
        }
    }
}

/// Frees what a connection held outside the slab.
fn retire(c: &Conn, b: &mut Books) {
    if c.state() == Some(TcpState::Listen) {
        unlisten(c, b);
    }
    b.owners.release(c.owner);
    if c.has(F_SPILLED) {
        b.spill.remove(&c.conn_id);
    }
}
