//! Owner attribution: trusted only from the owner's own syscalls, inherited by accepted
//! children from their listener, never guessed from a softirq's task.

use super::testkit::*;
use crate::event::TcpState::*;

fn pids(out: &[super::Output]) -> Vec<Option<u32>> {
    records(out)
        .iter()
        .map(|r| r.owner.map(|o| o.pid))
        .collect()
}

#[test]
fn client_owner_comes_from_connect_and_softirq_tasks_never_replace_it() {
    let mut sim = Sim::default();
    let s = Sock::new(1, "10.0.0.1:0", "10.0.0.5:80", task(100, "client"));
    let peer = Sock {
        task: task(200, "server"),
        ..s
    };
    let mut out = sim.feed(&s.ev(0, Close, SynSent));
    out.extend(sim.run(&peer.path(SynSent, &[(1, Established), (2, CloseWait)])));
    out.extend(sim.feed(&s.ev(3, CloseWait, LastAck)));
    out.extend(sim.feed(&peer.ev(4, LastAck, Close)));
    assert_eq!(pids(&out), vec![Some(100); 5]);
    assert_eq!(
        one_lifecycle(&out).owner.map(|o| o.comm.to_string()),
        Some("client".into())
    );
}

#[test]
fn unknown_stays_unknown_rather_than_naming_the_softirq_task() {
    let mut sim = Sim::default();
    // Mid-life connection: only softirq events, the task is whoever ran.
    let s = Sock::new(1, "10.0.0.1:80", "10.0.0.5:4000", task(200, "bystander"));
    let mut t = s.ev(0, Established, CloseWait);
    t.midlife = true;
    let out = sim.feed(&t);
    assert_eq!(pids(&out), vec![None]);
    // A child of a listener the tracer never saw.
    let c = Sock::new(2, "0.0.0.0:9999", "0.0.0.0:4001", task(200, "bystander"));
    let out = sim.run(&c.path(Listen, &[(1, SynRecv), (2, Established), (3, CloseWait)]));
    assert_eq!(pids(&out), vec![None; 3]);
    // pid 0 even in a trusted transition is not an owner.
    let z = Sock::new(3, "10.0.0.1:0", "10.0.0.5:80", task(0, "swapper/0"));
    assert_eq!(pids(&sim.feed(&z.ev(4, Close, SynSent))), vec![None]);
}

#[test]
fn accepted_child_inherits_until_a_trusted_close_says_otherwise() {
    let mut sim = Sim::default();
    let master = task(10, "master");
    let worker = task(11, "worker");
    let client = task(99, "client");
    sim.feed(&Sock::new(1, "10.0.0.1:80", "0.0.0.0:0", master).ev(0, Close, Listen));
    let c = Sock::new(2, "10.0.0.1:80", "10.0.0.7:5000", client);
    let mut out = sim.run(&c.path(Listen, &[(1, SynRecv), (2, Established)]));
    // The worker that accepted it closes it: from here on it is the owner.
    out.extend(sim.feed(&Sock { task: worker, ..c }.ev(3, Established, FinWait1)));
    out.extend(sim.run(&c.path(FinWait1, &[(4, FinWait2), (5, Close)])));
    assert_eq!(
        pids(&out),
        vec![Some(10), Some(10), Some(11), Some(11), Some(11)]
    );
    assert_eq!(one_lifecycle(&out).owner.map(|o| o.pid), Some(11));
}

#[test]
fn kernel_reported_owner_wins_over_everything() {
    let mut sim = Sim::default();
    let s = Sock::new(1, "10.0.0.1:80", "10.0.0.5:4000", task(200, "bystander"));
    let mut t = s.ev(0, Established, CloseWait);
    t.midlife = true;
    t.owner = Some(task(300, "real-owner"));
    assert_eq!(pids(&sim.feed(&t)), vec![Some(300)]);
    // Later events without an owner keep it.
    assert_eq!(pids(&sim.feed(&s.ev(1, CloseWait, Close))), vec![Some(300)]);
}

#[test]
fn reuseport_listeners_of_different_processes_name_nobody() {
    let mut sim = Sim::default();
    sim.feed(&Sock::new(1, "0.0.0.0:80", "0.0.0.0:0", task(10, "w1")).ev(0, Close, Listen));
    sim.feed(&Sock::new(2, "0.0.0.0:80", "0.0.0.0:0", task(11, "w2")).ev(0, Close, Listen));
    sim.feed(&Sock::new(3, "0.0.0.0:81", "0.0.0.0:0", task(12, "a")).ev(0, Close, Listen));
    sim.feed(&Sock::new(4, "0.0.0.0:81", "0.0.0.0:0", task(12, "a")).ev(0, Close, Listen));
    let out =
        sim.feed(&Sock::new(5, "0.0.0.0:80", "0.0.0.0:1", task(99, "c")).ev(1, Listen, SynRecv));
    assert_eq!(pids(&out), vec![None], "two processes share :80");
    let out =
        sim.feed(&Sock::new(6, "0.0.0.0:81", "0.0.0.0:1", task(99, "c")).ev(1, Listen, SynRecv));
    assert_eq!(
        pids(&out),
        vec![Some(12)],
        "one process owns both :81 sockets"
    );
    assert_eq!(sim.engine.stats().listeners, 4);
    // Closing one :81 listener keeps the other's owner for later children.
    let out =
        sim.feed(&Sock::new(3, "0.0.0.0:81", "0.0.0.0:0", task(12, "a")).ev(2, Listen, Close));
    assert_eq!(one_lifecycle(&out).owner.map(|o| o.pid), Some(12));
    let out =
        sim.feed(&Sock::new(7, "0.0.0.0:81", "0.0.0.0:2", task(99, "c")).ev(3, Listen, SynRecv));
    assert_eq!(pids(&out), vec![Some(12)]);
    assert_eq!(sim.engine.stats().listeners, 3);
}

#[test]
fn the_owner_table_forgets_processes_whose_sockets_are_gone() {
    let mut sim = Sim::default();
    for i in 0..50u64 {
        let s = Sock::new(
            i,
            "10.0.0.1:0",
            "10.0.0.5:80",
            task(1_000 + i as u32, "short"),
        );
        sim.run(&s.path(Close, &[(i, SynSent), (i + 1, Established)]));
    }
    assert_eq!(sim.engine.stats().owners, 50);
    for i in 0..50u64 {
        let s = Sock::new(i, "10.0.0.1:0", "10.0.0.5:80", task(1, "irq"));
        sim.feed(&s.ev(100 + i, Established, Close));
    }
    assert_eq!(sim.engine.stats().owners, 0);
}

/// accept() reads the socket's state as it returns; the peer's FIN can move it to
/// CLOSE_WAIT on another CPU in between and reach the ring buffer first. The late accept
/// names the owner and changes nothing else: no gap, no step back, CLOSE_WAIT timed.
#[test]
fn an_accept_that_arrives_after_close_wait_names_the_owner_and_nothing_else() {
    use crate::event::EventKind;
    let mut sim = Sim::default();
    let server = task(10, "server");
    sim.feed(&Sock::new(1, "10.0.0.1:80", "0.0.0.0:0", server).ev(0, Close, Listen));
    let c = Sock::new(2, "10.0.0.1:80", "10.0.0.7:5000", task(99, "client"));
    let mut out = sim.run(&c.path(Listen, &[(1, SynRecv), (2, Established), (3, CloseWait)]));
    let mut accept = c.ev(4, Established, Established);
    accept.kind = EventKind::Accept;
    accept.owner = Some(task(11, "worker"));
    let late = sim.feed(&accept);
    let rec = records(&late)[0];
    assert!(!rec.gap, "{rec:?}");
    assert_eq!((rec.t.old, rec.t.new), (CloseWait, CloseWait));
    assert_eq!(rec.owner.map(|o| o.pid), Some(11));
    out.extend(late);
    // The worker closes it at last (close() runs in its own context).
    out.extend(
        sim.feed(
            &Sock {
                task: task(11, "worker"),
                ..c
            }
            .ev(10, CloseWait, LastAck),
        ),
    );
    out.extend(sim.feed(&c.ev(11, LastAck, Close)));
    let l = one_lifecycle(&out);
    assert!(!l.gap, "{}", path_str(l));
    let cw = l.path.iter().find(|s| s.state == CloseWait).unwrap();
    assert_eq!(cw.duration_ns, Some(7), "{}", path_str(l));
    assert_eq!(l.owner.map(|o| o.pid), Some(11));
}
