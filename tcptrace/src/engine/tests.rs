//! Engine scenarios from real kernel sequences: every close kind, exact timings, the
//! 4-tuple fix-up, gaps, mid-life sockets, identity and output order.

use super::testkit::*;
use super::{CloseKind, EndReason, Family, LifecycleRecord, Output, Role};
use crate::event::EventKind;
use crate::event::TcpState::{self, *};

const US: u64 = 1_000;

fn counts(sim: &Sim) -> Vec<(TcpState, u64)> {
    let c = sim.engine.current_state_counts();
    TcpState::ALL
        .iter()
        .filter(|s| c[**s as usize] > 0)
        .map(|s| (*s, c[*s as usize]))
        .collect()
}

#[test]
fn client_active_close_with_exact_figures_and_tuple_fixup() {
    let mut sim = Sim::default();
    let app = task(4242, "psql");
    let syn = Sock::new(1, "10.0.0.1:0", "10.0.0.5:5432", app);
    let s = Sock {
        local: addr("10.0.0.1:40000"),
        task: task(0, "swapper/1"),
        ..syn
    };
    let t0 = 1_000;
    let mut out = sim.feed(&syn.ev(t0, Close, SynSent));
    assert_eq!(counts(&sim), vec![(SynSent, 1)]);
    out.extend(sim.feed(&s.ev(t0 + 250 * US, SynSent, Established)));
    assert_eq!(counts(&sim), vec![(Established, 1)]);
    let closer = Sock { task: app, ..s };
    out.extend(sim.feed(&closer.ev(5 * S, Established, FinWait1)));
    out.extend(sim.run(&s.path(
        FinWait1,
        &[(5 * S + 100 * US, FinWait2), (5 * S + 200 * US, Close)],
    )));
    assert_eq!(
        counts(&sim),
        vec![],
        "a closed connection is no longer tracked"
    );
    let ins: Vec<Option<u64>> = records(&out).iter().map(|r| r.in_old_state_ns).collect();
    assert_eq!(
        ins,
        vec![
            None,
            Some(250 * US),
            Some(5 * S - t0 - 250 * US),
            Some(100 * US),
            Some(100 * US)
        ]
    );
    assert!(
        records(&out)
            .iter()
            .all(|r| r.legal && !r.gap && r.role == Role::ActiveOpen)
    );
    let l = one_lifecycle(&out);
    assert_eq!(l.close_kind, Some(CloseKind::ActiveClose));
    assert_eq!(l.end, EndReason::Closed);
    assert_eq!(
        (l.local, l.remote),
        (addr("10.0.0.1:40000"), addr("10.0.0.5:5432"))
    );
    assert_eq!((l.family, l.role), (Family::Ipv4, Role::ActiveOpen));
    assert_eq!(l.owner.map(|o| o.pid), Some(4242));
    assert_eq!(l.handshake_ns, Some(250 * US));
    assert_eq!(l.established_ns, Some(5 * S - t0 - 250 * US));
    assert_eq!(l.lifetime_ns, Some(5 * S + 200 * US - t0));
    assert_eq!((l.start_ts_ns, l.end_ts_ns), (t0, 5 * S + 200 * US));
    assert!(l.complete && !l.partial_start && !l.gap && !l.illegal && !l.path_truncated);
    assert_eq!(
        path_str(l),
        "CLOSE@? SYN_SENT@1000 ESTABLISHED@251000 FIN_WAIT1@5000000000 FIN_WAIT2@5000100000 CLOSE@5000200000"
    );
    let durs: Vec<Option<u64>> = l.path.iter().map(|p| p.duration_ns).collect();
    assert_eq!(
        durs,
        vec![
            None,
            Some(250 * US),
            Some(5 * S - 251 * US),
            Some(100 * US),
            Some(100 * US),
            None
        ]
    );
    let st = sim.engine.stats();
    assert_eq!(
        (
            st.transitions,
            st.tracked,
            st.lifecycles_closed,
            st.lifecycles_complete
        ),
        (5, 0, 1, 1)
    );
    assert_eq!(st.close_kinds.get(CloseKind::ActiveClose), 1);
}

#[test]
fn server_passive_close_takes_the_child_tuple_from_later_events() {
    let mut sim = Sim::default();
    let server = task(10, "server");
    let client = task(20, "client");
    sim.feed(&Sock::new(1, "0.0.0.0:8080", "0.0.0.0:0", server).ev(0, Close, Listen));
    // The clone carries the listener's addresses (ports already the child's).
    let clone = Sock::new(2, "0.0.0.0:8080", "0.0.0.0:50000", client);
    let child = Sock::new(2, "127.0.0.1:8080", "127.0.0.1:50000", client);
    let mut out = sim.feed(&clone.ev(10 * S, Listen, SynRecv));
    assert_eq!(counts(&sim), vec![(SynRecv, 1), (Listen, 1)]);
    out.extend(sim.run(&child.path(
        SynRecv,
        &[(10 * S + 40 * US, Established), (12 * S, CloseWait)],
    )));
    let closer = Sock {
        task: server,
        ..child
    };
    out.extend(sim.feed(&closer.ev(13 * S, CloseWait, LastAck)));
    out.extend(sim.feed(&child.ev(13 * S + 80 * US, LastAck, Close)));
    let l = one_lifecycle(&out);
    assert_eq!(l.close_kind, Some(CloseKind::PassiveClose));
    assert_eq!(
        (l.local, l.remote),
        (addr("127.0.0.1:8080"), addr("127.0.0.1:50000"))
    );
    assert_eq!(l.role, Role::PassiveOpen);
    assert_eq!(l.handshake_ns, Some(40 * US), "SYN_RECV → ESTABLISHED");
    assert_eq!(l.established_ns, Some(2 * S - 40 * US));
    assert_eq!(l.lifetime_ns, Some(3 * S + 80 * US));
    assert_eq!(
        path_str(l),
        "LISTEN@? SYN_RECV@10000000000 ESTABLISHED@10000040000 CLOSE_WAIT@12000000000 LAST_ACK@13000000000 CLOSE@13000080000"
    );
    assert!(l.complete);
    let owners: Vec<Option<u32>> = records(&out)
        .iter()
        .map(|r| r.owner.map(|o| o.pid))
        .collect();
    assert_eq!(
        owners,
        vec![Some(10); 5],
        "the listener's owner throughout, never the client's pid"
    );
    assert_eq!(counts(&sim), vec![(Listen, 1)]);
}

#[test]
fn listener_open_and_close() {
    let mut sim = Sim::default();
    let l = Sock::new(1, "[::]:443", "[::]:0", task(1, "nginx"));
    let out = sim.run(&l.path(Close, &[(S, Listen), (9 * S, Close)]));
    let lc = one_lifecycle(&out);
    assert_eq!(
        (lc.close_kind, lc.role, lc.family),
        (
            Some(CloseKind::ListenerClosed),
            Role::Listener,
            Family::Ipv6
        )
    );
    assert_eq!(lc.lifetime_ns, Some(8 * S));
    assert_eq!((lc.handshake_ns, lc.established_ns), (None, None));
    assert_eq!(lc.local, addr("[::]:443"));
    assert_eq!(sim.engine.stats().listeners, 0);
}

fn closed(steps: &[(u64, TcpState)], from: TcpState) -> LifecycleRecord {
    let mut sim = Sim::default();
    let s = Sock::new(7, "10.0.0.1:1000", "10.0.0.2:2000", task(3, "x"));
    let out = sim.run(&s.path(from, steps));
    one_lifecycle(&out).clone()
}

#[test]
fn every_close_kind_from_its_real_sequence() {
    let refused = closed(&[(0, SynSent), (90 * US, Close)], Close);
    assert_eq!(refused.close_kind, Some(CloseKind::ConnectFailed));
    assert_eq!(
        (
            refused.handshake_ns,
            refused.established_ns,
            refused.lifetime_ns
        ),
        (None, None, Some(90 * US))
    );
    assert!(refused.complete);
    let simul = closed(
        &[
            (0, SynSent),
            (1, Established),
            (2, FinWait1),
            (3, Closing),
            (4, Close),
        ],
        Close,
    );
    assert_eq!(simul.close_kind, Some(CloseKind::SimultaneousClose));
    let reset = closed(&[(0, SynSent), (1, Established), (7, Close)], Close);
    assert_eq!(
        (reset.close_kind, reset.established_ns),
        (Some(CloseKind::Reset), Some(6))
    );
    let cw_reset = closed(
        &[(0, SynSent), (1, Established), (2, CloseWait), (3, Close)],
        Close,
    );
    assert_eq!(cw_reset.close_kind, Some(CloseKind::Reset));
    let aborted = closed(&[(0, SynRecv), (5, Close)], Listen);
    assert_eq!(
        (aborted.close_kind, aborted.role),
        (Some(CloseKind::HandshakeAborted), Role::PassiveOpen)
    );
    let fw1_abort = closed(
        &[(0, SynSent), (1, Established), (2, FinWait1), (3, Close)],
        Close,
    );
    assert_eq!(fw1_abort.close_kind, Some(CloseKind::ActiveClose));
    let tw = closed(
        &[
            (0, SynSent),
            (1, Established),
            (2, FinWait1),
            (3, FinWait2),
            (4, TimeWait),
            (60 * S, Close),
        ],
        Close,
    );
    assert_eq!(
        (tw.close_kind, tw.lifetime_ns),
        (Some(CloseKind::ActiveClose), Some(60 * S))
    );
    let tw_simul = closed(
        &[
            (0, SynSent),
            (1, Established),
            (2, FinWait1),
            (3, Closing),
            (4, TimeWait),
            (5, Close),
        ],
        Close,
    );
    assert_eq!(tw_simul.close_kind, Some(CloseKind::SimultaneousClose));
    let server_fin = closed(
        &[(0, SynRecv), (1, CloseWait), (2, LastAck), (3, Close)],
        Listen,
    );
    assert_eq!(
        server_fin.close_kind,
        Some(CloseKind::PassiveClose),
        "TFO child: SYN_RECV→CLOSE_WAIT is legal"
    );
    assert!(server_fin.complete);
}

#[test]
fn gaps_are_marked_and_classified_from_the_kernel_old_state() {
    let mut sim = Sim::default();
    let s = Sock::new(1, "10.0.0.1:1", "10.0.0.2:2", task(3, "x"));
    sim.feed(&s.ev(0, Close, SynSent));
    // ESTABLISHED, FIN_WAIT1 and FIN_WAIT2's entry were lost.
    let out = sim.feed(&s.ev(9, FinWait2, Close));
    let r = records(&out)[0];
    assert!(r.gap && r.legal);
    assert_eq!(r.in_old_state_ns, None, "time in FIN_WAIT2 is unknown");
    let l = one_lifecycle(&out);
    assert_eq!(
        l.close_kind,
        Some(CloseKind::ActiveClose),
        "not ConnectFailed from the stale SYN_SENT"
    );
    assert!(l.gap && !l.complete && !l.partial_start);
    assert_eq!(path_str(l), "CLOSE@? SYN_SENT@0 !FIN_WAIT2@? CLOSE@9");
    assert_eq!(l.lifetime_ns, Some(9), "start and end were both seen");
    assert_eq!(l.path[1].duration_ns, None);
    assert_eq!(sim.engine.stats().gaps, 1);
    // TIME_WAIT reached through a gap: its origin is unknown, so is the kind.
    let t = Sock::new(2, "10.0.0.1:1", "10.0.0.2:2", task(3, "x"));
    sim.run(&t.path(Close, &[(0, SynSent), (1, Established)]));
    let out = sim.feed(&t.ev(5, TimeWait, Close));
    assert_eq!(one_lifecycle(&out).close_kind, Some(CloseKind::Unknown));
    // A gap mid-way keeps later timings but not the ones it cut.
    let u = Sock::new(3, "10.0.0.1:1", "10.0.0.2:2", task(3, "x"));
    sim.run(&u.path(Close, &[(0, SynSent), (2, Established)]));
    let out = sim.run(&u.path(CloseWait, &[(10, LastAck), (15, Close)]));
    let l = one_lifecycle(&out);
    assert_eq!(
        path_str(l),
        "CLOSE@? SYN_SENT@0 ESTABLISHED@2 !CLOSE_WAIT@? LAST_ACK@10 CLOSE@15"
    );
    assert_eq!((l.handshake_ns, l.established_ns), (Some(2), None));
    assert_eq!(l.close_kind, Some(CloseKind::PassiveClose));
}

#[test]
fn midlife_sockets_are_partial_never_new_starts() {
    let mut sim = Sim::default();
    let s = Sock::new(1, "10.0.0.1:80", "10.0.0.9:6000", task(3, "x"));
    let mut t = s.ev(100, Established, CloseWait);
    t.midlife = true;
    let out = sim.feed(&t);
    assert_eq!(records(&out)[0].in_old_state_ns, None);
    assert_eq!(sim.engine.stats().partial_starts, 1);
    let out = sim.run(&s.path(CloseWait, &[(150, LastAck), (160, Close)]));
    let l = one_lifecycle(&out);
    assert_eq!(
        path_str(l),
        "!ESTABLISHED@? CLOSE_WAIT@100 LAST_ACK@150 CLOSE@160"
    );
    assert!(l.partial_start && !l.complete && !l.gap);
    assert_eq!(
        (l.lifetime_ns, l.close_kind, l.role),
        (None, Some(CloseKind::PassiveClose), Role::Unknown)
    );
    assert_eq!(l.path[1].duration_ns, Some(50));
    // Flagged midlife even though it looks like a start: partial.
    let c = Sock::new(2, "0.0.0.0:80", "0.0.0.0:0", task(3, "x"));
    let mut t = c.ev(0, Listen, SynRecv);
    t.midlife = true;
    sim.feed(&t);
    let out = sim.feed(&c.ev(1, SynRecv, Close));
    assert!(one_lifecycle(&out).partial_start);
    // First sighting is its close: a one-step partial lifecycle.
    let d = Sock::new(3, "10.0.0.1:1", "10.0.0.2:2", task(3, "x"));
    let out = sim.feed(&d.ev(7, Established, Close));
    let l = one_lifecycle(&out);
    assert_eq!(
        (path_str(l).as_str(), l.close_kind),
        ("!ESTABLISHED@? CLOSE@7", Some(CloseKind::Reset))
    );
    assert_eq!(sim.engine.stats().tracked, 0);
}

#[test]
fn close_of_a_never_connected_socket_and_self_transitions() {
    let mut sim = Sim::default();
    let s = Sock::new(1, "0.0.0.0:0", "0.0.0.0:0", task(3, "x"));
    let out = sim.feed(&s.ev(5, Close, Close));
    assert_eq!(out.len(), 1, "a record, no lifecycle: {out:#?}");
    assert!(records(&out)[0].legal);
    assert_eq!(sim.engine.stats().tracked, 0);
    // shutdown() then close(): FIN_WAIT2→FIN_WAIT2 changes nothing but is reported.
    let h = Sock::new(2, "10.0.0.1:1", "10.0.0.2:2", task(3, "x"));
    sim.run(&h.path(
        Close,
        &[(0, SynSent), (1, Established), (2, FinWait1), (3, FinWait2)],
    ));
    let out = sim.feed(&h.ev(50, FinWait2, FinWait2));
    assert_eq!(
        records(&out)[0].in_old_state_ns,
        Some(47),
        "time in FIN_WAIT2 so far"
    );
    let out = sim.feed(&h.ev(60, FinWait2, Close));
    assert_eq!(records(&out)[0].in_old_state_ns, Some(57));
    let l = one_lifecycle(&out);
    assert_eq!(
        path_str(l),
        "CLOSE@? SYN_SENT@0 ESTABLISHED@1 FIN_WAIT1@2 FIN_WAIT2@3 CLOSE@60"
    );
    assert!(l.complete);
}

#[test]
fn reused_skaddr_never_merges_lifecycles_and_a_restarted_id_is_superseded() {
    let mut sim = Sim::default();
    let a = Sock::new(1, "10.0.0.1:1", "10.0.0.2:80", task(3, "x"));
    let b = Sock::new(2, "10.0.0.1:2", "10.0.0.2:80", task(3, "x"));
    let mut ta = a.path(Close, &[(0, SynSent), (1, Established), (2, Close)]);
    let mut tb = b.path(Close, &[(3, SynSent), (4, Established)]);
    for t in ta.iter_mut().chain(tb.iter_mut()) {
        t.skaddr = 0xdead_beef; // same struct sock, reused
    }
    let out = sim.run(&[ta, tb].concat());
    let l = one_lifecycle(&out);
    assert_eq!((l.conn_id, l.lifetime_ns), (1, Some(2)));
    assert_eq!(sim.engine.stats().tracked, 1);
    // conn_id 2 starts again while still tracked (should not happen; must not merge).
    let out = sim.feed(&b.ev(10, Close, SynSent));
    let ls = lifecycles(&out);
    assert_eq!(ls.len(), 1);
    assert_eq!(
        (ls[0].end, ls[0].close_kind, ls[0].end_ts_ns),
        (EndReason::Superseded, None, 10)
    );
    assert!(matches!(out[0], Output::Lifecycle(_)) && matches!(out[1], Output::Transition(_)));
    let out = sim.feed(&b.ev(20, SynSent, Close));
    assert_eq!(one_lifecycle(&out).lifetime_ns, Some(10));
    assert_eq!(sim.engine.stats().superseded, 1);
}

#[test]
fn outputs_come_in_record_lifecycle_alert_order() {
    let mut sim = Sim::default();
    let s = Sock::new(1, "10.0.0.1:1", "10.0.0.2:2", task(3, "x"));
    let out = sim.run(&s.path(Close, &[(0, SynSent), (1, Close)]));
    let kinds: Vec<&str> = out
        .iter()
        .map(|o| match o {
            Output::Transition(_) => "transition",
            Output::Lifecycle(_) => "lifecycle",
            Output::Alert(_) => "alert",
        })
        .collect();
    assert_eq!(
        kinds,
        vec!["transition", "transition", "lifecycle", "alert"],
        "failed_connect fires"
    );
}

#[test]
fn clock_going_backwards_keeps_exact_stamps_and_drops_negative_durations() {
    let mut sim = Sim::default();
    let s = Sock::new(1, "10.0.0.1:1", "10.0.0.2:2", task(3, "x"));
    let out = sim.run(&s.path(Close, &[(100, SynSent), (50, Established), (70, Close)]));
    assert_eq!(records(&out)[1].in_old_state_ns, None);
    let l = one_lifecycle(&out);
    assert_eq!(path_str(l), "CLOSE@? SYN_SENT@100 ESTABLISHED@50 CLOSE@70");
    assert_eq!(
        (l.handshake_ns, l.established_ns, l.lifetime_ns),
        (None, Some(20), None)
    );
}

#[test]
fn finish_emits_open_connections_as_partial_and_empties_the_engine() {
    let mut sim = Sim::default();
    let s = Sock::new(1, "10.0.0.1:1", "10.0.0.2:2", task(3, "x"));
    sim.run(&s.path(Close, &[(0, SynSent), (1, Established)]));
    sim.feed(&Sock::new(2, "0.0.0.0:80", "0.0.0.0:0", task(4, "srv")).ev(2, Close, Listen));
    let out = sim.finish(100);
    let ls = lifecycles(&out);
    assert_eq!(ls.len(), 2);
    assert!(
        ls.iter()
            .all(|l| l.end == EndReason::Finished && l.close_kind.is_none() && !l.complete)
    );
    assert_eq!(
        (ls[0].established_ns, ls[0].lifetime_ns, ls[0].end_ts_ns),
        (None, None, 100)
    );
    let st = sim.engine.stats();
    assert_eq!(
        (st.tracked, st.listeners, st.owners, st.lifecycles_partial),
        (0, 0, 0, 2)
    );
    assert_eq!(sim.engine.current_state_counts(), [0; 14]);
    assert!(sim.finish(200).is_empty(), "finishing twice is harmless");
}

#[test]
fn lifecycle_json_uses_snake_case_and_state_names() {
    let l = closed(&[(0, SynSent), (5, Established), (9, Close)], Close);
    let v: serde_json::Value = serde_json::to_value(&l).expect("serialise");
    assert_eq!(v["close_kind"], "reset");
    assert_eq!(v["role"], "active_open");
    assert_eq!(v["family"], "ipv4");
    assert_eq!(v["end"], "closed");
    assert_eq!(v["handshake_ns"], 5);
    assert_eq!(v["path"][1]["state"], "SYN_SENT");
    assert_eq!(v["path"][0]["entered_ns"], serde_json::Value::Null);
    assert_eq!(v["owner"]["comm"], "x");
    assert_eq!(v["local"], "10.0.0.1:1000");
    let back: LifecycleRecord = serde_json::from_value(v).expect("deserialise");
    assert_eq!(back, l);
}

/// Connections idle long enough are offered for a check against the kernel, those of
/// other namespaces and listeners never; successive calls sweep on where the last stopped.
#[test]
fn idle_connections_are_offered_by_namespace_and_swept_in_turn() {
    let mut sim = Sim::default();
    let t = task(7, "app");
    let mut ns = |id: u64, netns: u32, local: &str| {
        let s = Sock::new(id, local, "10.0.0.9:80", t);
        let mut e = s.ev(S, Close, SynSent);
        e.meta.netns = netns;
        sim.feed(&e);
        s
    };
    let a = ns(1, 100, "10.0.0.1:4001");
    let b = ns(2, 100, "10.0.0.1:4002");
    ns(3, 200, "10.0.0.1:4003");
    // Still sending SYNs, its local port not yet in the events: nothing to look up by.
    ns(5, 100, "10.0.0.1:0");
    ns(6, 100, "0.0.0.0:4006");
    let mut lst = Sock::new(4, "10.0.0.1:80", "0.0.0.0:0", t).ev(S, Close, Listen);
    lst.meta.netns = 100;
    sim.feed(&lst);
    // b moves on later: not idle at 10 s.
    let mut later = b.ev(8 * S, SynSent, Established);
    later.meta.netns = 100;
    sim.feed(&later);
    // The sweep's cursor, as the caller keeps it.
    let mut at = 0;
    let mut idle = |sim: &Sim, now: u64, netns: u32, max: usize| {
        let (found, next) = sim.engine.idle_connections(at, now, 5 * S, netns, max);
        at = next;
        found
    };
    let ids = |v: Vec<super::IdleConn>| v.iter().map(|c| c.conn_id).collect::<Vec<_>>();
    assert_eq!(ids(idle(&sim, 10 * S, 100, 10)), [1]);
    assert_eq!(
        idle(&sim, 10 * S, 100, 10)[0],
        super::IdleConn {
            conn_id: 1,
            local: a.local,
            remote: a.remote
        }
    );
    // At 20 s both are idle; one per call, in turn, then round again.
    let first = ids(idle(&sim, 20 * S, 100, 1));
    let second = ids(idle(&sim, 20 * S, 100, 1));
    let third = ids(idle(&sim, 20 * S, 100, 1));
    assert_eq!(
        [first.clone(), second].concat(),
        [1, 2],
        "each once per round"
    );
    assert_eq!(third, first, "the sweep goes round");
    assert!(ids(idle(&sim, 20 * S, 300, 10)).is_empty());
}

/// Connection 1, a client that reached FIN_WAIT1 at 3 s and was heard of no more.
fn stuck_in_fin_wait1() -> (Sim, Sock) {
    let mut sim = Sim::default();
    let s = Sock::new(1, "10.0.0.1:4001", "10.0.0.9:80", task(7, "app"));
    sim.run(&[
        s.ev(S, Close, SynSent),
        s.ev(2 * S, SynSent, Established),
        s.ev(3 * S, Established, FinWait1),
    ]);
    (sim, s)
}

/// A connection whose socket the kernel no longer has goes out whole as a partial
/// lifecycle, marked as a gap, and is no longer tracked; a second retire is a no-op.
#[test]
fn a_vanished_connection_is_retired_as_a_gap() {
    let (mut sim, _) = stuck_in_fin_wait1();
    let mut out = Vec::new();
    assert!(sim.engine.retire_vanished(1, 70 * S, &mut out));
    let l = one_lifecycle(&out);
    assert_eq!(
        (l.end, l.close_kind, l.gap, l.complete),
        (EndReason::Vanished, None, true, false)
    );
    assert_eq!(l.end_ts_ns, 70 * S);
    let st = sim.engine.stats();
    assert_eq!((st.vanished, st.tracked, st.lifecycles_partial), (1, 0, 1));
    assert_eq!(sim.engine.current_state_counts()[FinWait1 as usize], 0);
    assert!(!sim.engine.retire_vanished(1, 71 * S, &mut out));
}

/// The kernel program's word that a connection's socket is gone (a new life began at its
/// address) retires it like a failed lookup does, and its record goes out for a replay;
/// for a connection the engine no longer has, only the record goes out.
#[test]
fn a_vanished_event_retires_its_connection() {
    let (mut sim, s) = stuck_in_fin_wait1();
    let mut gone = s.ev(9 * S, FinWait1, FinWait1);
    gone.kind = EventKind::Vanished;
    let out = sim.feed(&gone);
    let recs = records(&out);
    assert_eq!(recs.len(), 1);
    assert_eq!(
        (recs[0].t.kind, recs[0].legal, recs[0].gap),
        (EventKind::Vanished, true, false)
    );
    let l = one_lifecycle(&out);
    assert_eq!(
        (l.end, l.close_kind, l.gap, l.complete, l.end_ts_ns),
        (EndReason::Vanished, None, true, false, 9 * S)
    );
    assert_eq!(
        path_str(l),
        format!(
            "CLOSE@? SYN_SENT@{} ESTABLISHED@{} FIN_WAIT1@{}",
            S,
            2 * S,
            3 * S
        )
    );
    let st = sim.engine.stats();
    assert_eq!((st.vanished, st.tracked, st.gaps), (1, 0, 1));
    assert_eq!(sim.engine.current_state_counts()[FinWait1 as usize], 0);

    let again = sim.feed(&gone);
    assert_eq!(records(&again).len(), 1);
    assert!(lifecycles(&again).is_empty());
    assert_eq!(sim.engine.stats().vanished, 1);
}
