//! Bounds: eviction at the cap, the per-connection memory budget, and a randomized run of
//! garbage transitions that must never panic nor outgrow the caps.

use super::testkit::*;
use super::{EndReason, Engine, EngineConfig, Output};
use crate::event::{Comm, Task, TcpState, Transition};
use crate::rules::RulesConfig;
use TcpState::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// xorshift64*: deterministic, no crates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn capped(n: usize) -> EngineConfig {
    EngineConfig {
        max_connections: n,
        rules: RulesConfig {
            max_sockets: n,
            max_keys: 32,
            ..RulesConfig::default()
        },
    }
}

#[test]
fn eviction_at_the_cap_is_counted_emitted_and_bounded() {
    let mut sim = Sim::new(capped(100));
    let mut evicted = 0;
    for i in 0..1_000u64 {
        let s = Sock::new(i, "10.0.0.1:0", "10.0.0.5:80", task(7, "app"));
        let out = sim.run(&s.path(Close, &[(i * 10, SynSent), (i * 10 + 1, Established)]));
        for l in lifecycles(&out) {
            assert_eq!(
                (l.end, l.close_kind, l.complete),
                (EndReason::Evicted, None, false)
            );
            evicted += 1;
        }
    }
    let st = sim.engine.stats();
    assert_eq!(
        (st.tracked, st.evicted, evicted, st.lifecycles_partial),
        (100, 900, 900, 900)
    );
    assert_eq!(sim.engine.current_state_counts()[Established as usize], 100);
    // CLOCK with these arrivals evicts the oldest: the last 100 remain and close whole.
    let s = Sock::new(999, "10.0.0.1:0", "10.0.0.5:80", task(7, "app"));
    let out = sim.feed(&s.ev(20_000, Established, Close));
    assert!(!one_lifecycle(&out).partial_start, "conn 999 was kept");
    let s = Sock::new(0, "10.0.0.1:0", "10.0.0.5:80", task(7, "app"));
    let out = sim.feed(&s.ev(20_001, Established, Close));
    assert!(
        one_lifecycle(&out).partial_start,
        "conn 0 was evicted long ago"
    );
    let heap = sim.engine.heap_bytes();
    assert!(heap < 256 * 1024, "heap {heap} B for a 100-connection cap");
}

#[test]
fn a_million_established_connections_fit_in_200_bytes_each() {
    const N: u64 = 1_000_000;
    let mut e = Engine::new(EngineConfig::default());
    let mut out = Vec::with_capacity(64);
    let app = Task {
        pid: 7,
        tid: 7,
        comm: Comm::new("app"),
    };
    for i in 0..N {
        let local = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, 0, (i >> 16) as u8, 1)),
            (i & 0xffff) as u16,
        );
        let remote = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 9, 0, (i % 200) as u8)), 5432);
        let mut t = Transition {
            ts_ns: i * 1_000,
            conn_id: i,
            skaddr: i,
            task: app,
            local,
            remote,
            old: Close,
            new: SynSent,
            starts_conn: true,
            midlife: false,
            cpu: 0,
            owner: None,
            meta: Default::default(),
            kind: Default::default(),
        };
        e.on_transition(&t, &mut out);
        t.old = SynSent;
        t.new = Established;
        t.starts_conn = false;
        t.ts_ns += 300;
        e.on_transition(&t, &mut out);
        out.clear();
    }
    assert_eq!(e.stats().tracked, N);
    let per_conn = e.heap_bytes() as u64 / N;
    assert!(
        per_conn <= 200,
        "{per_conn} B per connection (slab + index + owners)"
    );
    assert_eq!(
        e.rules_footprint(),
        0,
        "no rule holds state for healthy connections"
    );
}

fn state(r: &mut Rng) -> TcpState {
    TcpState::ALL[r.below(13) as usize]
}

fn sockaddr(r: &mut Rng) -> SocketAddr {
    let ip = match r.below(4) {
        0 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        1 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, r.below(8) as u16)),
        _ => IpAddr::V4(Ipv4Addr::new(10, 0, 0, r.below(8) as u8)),
    };
    SocketAddr::new(
        ip,
        if r.below(3) == 0 {
            0
        } else {
            8000 + r.below(4) as u16
        },
    )
}

/// A transition of `conn_id` from `old` to `new` run by process `pid` ("p"), its socket
/// address, tuple and flags drawn from `r` (in this order), no owner.
fn drawn(
    r: &mut Rng,
    ts: u64,
    conn_id: u64,
    pid: u32,
    old: TcpState,
    new: TcpState,
    kind: crate::event::EventKind,
) -> Transition {
    Transition {
        ts_ns: ts,
        conn_id,
        skaddr: r.below(16),
        task: Task {
            pid,
            tid: 1,
            comm: Comm::new("p"),
        },
        local: sockaddr(r),
        remote: sockaddr(r),
        old,
        new,
        starts_conn: r.below(4) == 0,
        midlife: r.below(8) == 0,
        cpu: 0,
        owner: None,
        meta: Default::default(),
        kind,
    }
}

#[test]
fn random_garbage_never_panics_and_every_cap_holds() {
    const CAP: usize = 64;
    let mut r = Rng(0x9E37_79B9_7F4A_7C15);
    let mut e = Engine::new(capped(CAP));
    let mut out: Vec<Output> = Vec::new();
    let mut ts: u64 = 1 << 40;
    let (mut outputs, mut alerts) = (0usize, 0usize);
    for i in 0..150_000u64 {
        // Mostly forward, sometimes backwards, rarely wild.
        ts = match r.below(20) {
            0 => ts.wrapping_sub(r.below(1 << 30)),
            1 => r.next(),
            _ => ts.wrapping_add(r.below(1 << 28)),
        };
        let prev_conn = r.below(200);
        let mut old = state(&mut r);
        let new = if r.below(3) == 0 {
            state(&mut r)
        } else {
            next_legal(old, &mut r)
        };
        if r.below(5) == 0 {
            old = Close;
        }
        let pid = r.below(6) as u32;
        let conn_id = if r.below(50) == 0 {
            r.next()
        } else {
            prev_conn
        };
        let mut t = drawn(&mut r, ts, conn_id, pid, old, new, Default::default());
        t.owner = (r.below(10) == 0).then_some(t.task);
        e.on_transition(&t, &mut out);
        if i % 97 == 0 {
            e.tick(ts.wrapping_add(r.below(1 << 36)), &mut out);
        }
        if i % 40_000 == 39_999 {
            e.finish(ts, &mut out);
            assert_eq!(e.stats().tracked, 0);
            assert_eq!(e.current_state_counts(), [0; 14]);
            assert_eq!((e.stats().owners, e.stats().listeners), (0, 0));
            assert_eq!(e.rules_footprint(), 0);
        }
        let st = e.stats();
        assert!(
            st.tracked as usize <= CAP,
            "tracked {} > cap at event {i}",
            st.tracked
        );
        assert_eq!(
            e.current_state_counts().iter().sum::<u64>(),
            st.tracked,
            "state counts drifted at event {i}"
        );
        assert!(st.owners <= st.tracked, "owner table leaked at event {i}");
        // Per-socket rules hold at most one entry and one group per socket in their state
        // (a leak would show here long before any cap); keyed rules at most 32 keys each.
        let held = e.rules_footprint();
        assert!(
            held as u64 <= 2 * st.tracked + 6 * 32,
            "rules hold {held} items for {} connections at event {i}",
            st.tracked
        );
        outputs += out.len();
        alerts += out.iter().filter(|o| matches!(o, Output::Alert(_))).count();
        out.clear();
    }
    let st = e.stats();
    assert_eq!(st.transitions, 150_000);
    assert!(
        st.illegal > 10_000 && st.gaps > 10_000 && st.evicted > 1_000,
        "{st:?}"
    );
    assert!(
        outputs > 150_000 && alerts > 100,
        "{outputs} outputs, {alerts} alerts"
    );
}

/// A plausible next state, so the run reaches deep states and not only garbage.
fn next_legal(old: TcpState, r: &mut Rng) -> TcpState {
    let next: &[TcpState] = match old {
        Close => &[SynSent, Listen, Close],
        Listen => &[SynRecv, Close],
        SynSent => &[Established, SynRecv, Close],
        SynRecv => &[Established, FinWait1, CloseWait, Close],
        Established => &[FinWait1, CloseWait, Close],
        FinWait1 => &[FinWait2, Closing, Close, FinWait1],
        FinWait2 => &[TimeWait, Close, FinWait2],
        Closing => &[TimeWait, Close],
        CloseWait => &[LastAck, Close],
        LastAck => &[Close, LastAck],
        TimeWait => &[Close],
        NewSynRecv | BoundInactive => &[Close],
    };
    next[r.below(next.len() as u64) as usize]
}

/// Not a timed test: prints the replay rate. Run with
/// `cargo test --release -p tcptrace --lib -- --ignored replay_rate --nocapture`.
#[test]
#[ignore]
fn replay_rate() {
    let mut r = Rng(7);
    let e = Engine::new(EngineConfig::default());
    let app = Task {
        pid: 7,
        tid: 7,
        comm: Comm::new("app"),
    };
    let seqs: [&[TcpState]; 3] = [
        &[Close, SynSent, Established, FinWait1, FinWait2, Close],
        &[Listen, SynRecv, Established, CloseWait, LastAck, Close],
        &[Close, SynSent, Close],
    ];
    let mut events = Vec::new();
    let mut live: Vec<(u64, usize, usize)> = Vec::new();
    let mut id = 0u64;
    let mut ts = 0u64;
    while events.len() < 5_000_000 {
        if live.len() < 10_000 {
            live.push((id, r.below(3) as usize, 0));
            id += 1;
        }
        let k = r.below(live.len() as u64) as usize;
        let (cid, seq, step) = live[k];
        let s = seqs[seq];
        ts += 500;
        let a = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            (cid % 60_000) as u16,
        );
        let b = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 1, (cid % 50) as u8)), 443);
        events.push(Transition {
            ts_ns: ts,
            conn_id: cid,
            skaddr: cid,
            task: app,
            local: a,
            remote: b,
            old: s[step],
            new: s[step + 1],
            starts_conn: step == 0,
            midlife: false,
            cpu: 0,
            owner: None,
            meta: Default::default(),
            kind: Default::default(),
        });
        if step + 2 == s.len() {
            live.swap_remove(k);
        } else {
            live[k].2 += 1;
        }
    }
    let run = |mut e: Engine| {
        let mut out = Vec::with_capacity(1024);
        let start = std::time::Instant::now();
        for (i, t) in events.iter().enumerate() {
            e.on_transition(t, &mut out);
            if i % 2_000 == 0 {
                e.tick(t.ts_ns, &mut out);
            }
            out.clear();
        }
        events.len() as f64 / start.elapsed().as_secs_f64() / 1e6
    };
    let bare = run(Engine::with_rules(EngineConfig::default(), Vec::new()));
    let full = run(e);
    println!(
        "{} transitions: engine alone {bare:.2} M/s, with all rules {full:.2} M/s ({:.0}%)",
        events.len(),
        100.0 * full / bare
    );
}

/// A rule as the engine would see it without an interest: called for every event.
struct Unfiltered(Box<dyn crate::rules::Rule>);

impl crate::rules::Rule for Unfiltered {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn describe(&self) -> &'static str {
        self.0.describe()
    }
    fn on_transition(
        &mut self,
        ev: &crate::rules::RuleEvent<'_>,
        out: &mut Vec<crate::rules::Alert>,
    ) {
        self.0.on_transition(ev, out)
    }
    fn tick(&mut self, now_ns: u64, out: &mut Vec<crate::rules::Alert>) {
        self.0.tick(now_ns, out)
    }
    fn on_forget(&mut self, id: u64, st: TcpState, now: u64, out: &mut Vec<crate::rules::Alert>) {
        self.0.on_forget(id, st, now, out)
    }
    fn finish(&mut self) {
        self.0.finish()
    }
    fn footprint(&self) -> usize {
        self.0.footprint()
    }
}

/// Each rule's `interest` only skips events the rule would do nothing with: an engine
/// that asks it and one that calls every rule for every event give the same outputs, event
/// by event, over a random run of every kind of event with thresholds low enough that
/// every rule fires (a too-narrow interest loses a finding or changes a count).
#[test]
fn rules_skipped_by_their_interest_would_have_done_nothing() {
    use crate::event::EventKind;
    const MS: u64 = 1_000_000;
    let cfg = EngineConfig {
        max_connections: 48,
        rules: RulesConfig {
            close_wait_after_ns: 50 * MS,
            fin_wait2_after_ns: 50 * MS,
            slow_connect_ns: MS,
            syn_backlog_min: 2,
            reset_surge_min: 2,
            time_wait_min: 2,
            churn_min: 2,
            churn_max_lifetime_ns: 1_000 * MS,
            max_sockets: 48,
            max_keys: 16,
            ..RulesConfig::default()
        },
    };
    let mut filtered = Engine::new(cfg.clone());
    let every = crate::rules::default_rules(&cfg.rules)
        .into_iter()
        .map(|r| Box::new(Unfiltered(r)) as Box<dyn crate::rules::Rule>)
        .collect();
    let mut all = Engine::with_rules(cfg, every);
    let kinds = [
        EventKind::State,
        EventKind::Accept,
        EventKind::Handoff,
        EventKind::Present,
        EventKind::Vanished,
    ];
    let mut r = Rng(0x005E_ED0F_1E57);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut fired = std::collections::BTreeMap::<String, u64>::new();
    let mut ts: u64 = 1 << 40;
    for i in 0..200_000u64 {
        ts += r.below(2 * MS);
        let old = state(&mut r);
        let new = if r.below(4) == 0 {
            state(&mut r)
        } else {
            next_legal(old, &mut r)
        };
        let kind = if r.below(6) == 0 {
            kinds[r.below(5) as usize]
        } else {
            EventKind::State
        };
        let (old, new) = if kind == EventKind::State {
            (old, new)
        } else {
            (old, old)
        };
        let pid = r.below(3) as u32;
        let conn_id = r.below(96);
        let mut t = drawn(&mut r, ts, conn_id, pid, old, new, kind);
        t.owner = (r.below(3) != 0).then_some(t.task);
        filtered.on_transition(&t, &mut a);
        all.on_transition(&t, &mut b);
        if i % 50 == 0 {
            filtered.tick(ts, &mut a);
            all.tick(ts, &mut b);
        }
        assert_eq!(a, b, "outputs differ at event {i}: {t:?}");
        for o in &a {
            if let Output::Alert(al) = o {
                *fired.entry(al.rule.to_string()).or_default() += 1;
            }
        }
        a.clear();
        b.clear();
    }
    let names: Vec<&str> = filtered.rules().map(|(n, _)| n).collect();
    for n in &names {
        assert!(
            fired.get(*n).copied().unwrap_or(0) >= 3,
            "rule {n} fired too rarely to be compared: {fired:?}"
        );
    }
    assert_eq!(names.len(), 9);
}
