//! stuck_close_wait: sockets left in CLOSE_WAIT, the signature of a process that does not
//! close() sockets its peers have closed (a socket/fd leak).

use super::RulesConfig;
use super::stuck::{Stuck, StuckSpec};
use crate::event::TcpState;

const NAME: &str = "stuck_close_wait";
const EXPLANATION: &str = "CLOSE_WAIT: the peer closed the connection; this process has not called close() on its socket (a leaked socket)";

/// The rule: the shared [`Stuck`] machinery on CLOSE_WAIT.
pub fn rule(cfg: &RulesConfig) -> Stuck {
    let spec = StuckSpec {
        rule: NAME,
        state: TcpState::CloseWait,
        explanation: EXPLANATION,
        description: "Sockets in CLOSE_WAIT longer than a threshold (default 30s), grouped per owner \
         process: the peer has closed, the process never called close(). Fires while they are \
         stuck, re-states when the count doubles, resolves when the last one closes.",
    };
    Stuck::new(spec, cfg.close_wait_after_ns, cfg)
}

#[cfg(test)]
mod tests {
    use crate::engine::testkit::*;
    use crate::engine::{EngineConfig, Output};
    use crate::event::TcpState::*;
    use crate::rules::{Alert, AlertStatus};

    const RULE: &str = "stuck_close_wait";

    /// A server `leaky-server` (pid 4242) listening on 10.0.0.1:8080; `n` clients from
    /// 10.0.0.5 connect at ts 0..n ms and close at 1 s; the server never closes. Every
    /// softirq event carries the *client's* task (pid 777), as on loopback.
    fn leak(sim: &mut Sim, n: u64, first_id: u64) -> Vec<Output> {
        let server = task(4242, "leaky-server");
        let client = task(777, "curl");
        let listener = Sock::new(1, "10.0.0.1:8080", "0.0.0.0:0", server);
        let mut out = Vec::new();
        if first_id == 100 {
            out.extend(sim.feed(&listener.ev(0, Close, Listen)));
        }
        for i in 0..n {
            let id = first_id + i;
            let port = 40_000 + id as u16;
            let child = Sock::new(id, "10.0.0.1:8080", &format!("0.0.0.0:{port}"), client);
            let t0 = i * MS;
            out.extend(sim.feed(&child.ev(t0, Listen, SynRecv)));
            let full = Sock {
                remote: addr(&format!("10.0.0.5:{port}")),
                ..child
            };
            out.extend(sim.run(&full.path(SynRecv, &[(t0 + 1, Established), (S + t0, CloseWait)])));
        }
        out
    }

    fn only(v: Vec<Alert>) -> Alert {
        let mut v: Vec<Alert> = v.into_iter().filter(|a| a.rule == RULE).collect();
        assert_eq!(v.len(), 1, "expected one {RULE} alert, got {v:#?}");
        v.remove(0)
    }

    #[test]
    fn fires_at_threshold_not_before_and_names_the_listener_owner() {
        let mut sim = Sim::default();
        let out = leak(&mut sim, 3, 100);
        assert!(
            alerts_of(&out, RULE).is_empty(),
            "never from the events themselves"
        );
        // Sockets entered CLOSE_WAIT at 1s, 1s+1ms, 1s+2ms; threshold 30 s.
        assert!(sim.tick(31 * S - 1).is_empty(), "1 ns early");
        let a = only(sim.tick(31 * S));
        assert_eq!(a.status, AlertStatus::Firing);
        assert_eq!(a.key, "pid=4242");
        assert_eq!(
            a.owner.map(|o| o.pid),
            Some(4242),
            "listener's owner, not the client's pid 777"
        );
        assert_eq!(a.count, 1);
        assert_eq!(a.oldest_age_ns, Some(30 * S));
        assert_eq!(
            a.message,
            "pid 4242 (leaky-server) holds 1 socket in CLOSE_WAIT, oldest 30s, mostly to 10.0.0.5"
        );
        assert_eq!(
            a.explanation,
            "CLOSE_WAIT: the peer closed the connection; this process has not called close() on its socket (a leaked socket)"
        );
        assert_eq!(
            a.mostly_to.as_ref().map(|p| (p.peer.as_str(), p.count)),
            Some(("10.0.0.5", 1))
        );
        let u = only(sim.tick(31 * S + 2 * MS));
        assert_eq!(
            (u.status, u.count, u.total),
            (AlertStatus::Update, 3, 3),
            "1 → 3 doubled"
        );
        assert!(sim.tick(40 * S).is_empty(), "no growth, no repeat");
    }

    #[test]
    fn a_leak_of_500_is_one_finding_restated_on_doubling_and_resolved_with_time_stuck() {
        let mut sim = Sim::default();
        leak(&mut sim, 500, 100);
        // Entries at 1s + i ms: by 31s + 7ms the first 8 are stuck; by 31.5s all 500.
        let mut statuses = vec![];
        for now in [31 * S, 31 * S + 7 * MS, 31 * S + 100 * MS, 32 * S] {
            for a in sim.tick(now) {
                statuses.push((a.status, a.count));
            }
        }
        use AlertStatus::*;
        assert_eq!(
            statuses,
            vec![(Firing, 1), (Update, 8), (Update, 101), (Update, 500)]
        );
        // The server finally closes them all at 100 s (CLOSE_WAIT→LAST_ACK→CLOSE).
        let server = task(4242, "leaky-server");
        let mut resolved = vec![];
        for i in 0..500u64 {
            let id = 100 + i;
            let s = Sock::new(
                id,
                "10.0.0.1:8080",
                &format!("10.0.0.5:{}", 40_000 + id as u16),
                server,
            );
            let out = sim.run(&s.path(CloseWait, &[(100 * S, LastAck), (100 * S + 1, Close)]));
            resolved.extend(alerts_of(&out, RULE).into_iter().cloned());
        }
        let r = only(resolved);
        assert_eq!(r.status, Resolved);
        assert_eq!((r.count, r.total), (0, 500));
        assert_eq!(
            r.oldest_age_ns,
            Some(99 * S),
            "the first socket: CLOSE_WAIT 1s → 100s"
        );
        assert_eq!(r.duration_ns, Some(99 * S));
        assert_eq!(
            r.message,
            "pid 4242 (leaky-server) no longer holds sockets in CLOSE_WAIT: 500 stuck, the longest for 1m39s; resolved after 1m39s"
        );
    }

    #[test]
    fn unknown_owner_is_its_own_group_never_a_guessed_pid() {
        let mut sim = Sim::default();
        // Mid-life sockets: no listener seen, no trustworthy event. Softirq task = pid 777.
        for id in [1u64, 2] {
            let s = Sock::new(id, "10.0.0.1:8080", "10.0.0.9:5000", task(777, "curl"));
            let mut t = s.ev(0, Established, CloseWait);
            t.midlife = true;
            sim.feed(&t);
        }
        let a = only(sim.tick(30 * S));
        assert_eq!(
            (a.key.as_str(), a.owner, a.count),
            ("owner=unknown", None, 2)
        );
        assert!(
            a.message.starts_with(
                "unknown owner holds 2 sockets in CLOSE_WAIT, oldest 30s, mostly to 10.0.0.9:5000"
            ),
            "{}",
            a.message
        );
    }

    #[test]
    fn groups_per_owner_and_kernel_owner_wins() {
        let mut sim = Sim::default();
        for (id, pid) in [(1u64, 10u32), (2, 10), (3, 20)] {
            let s = Sock::new(id, "10.0.0.1:1234", "10.0.0.5:5432", task(999, "irq"));
            let mut t = s.ev(0, Established, CloseWait);
            t.midlife = true;
            t.owner = Some(task(pid, &format!("app{pid}")));
            sim.feed(&t);
        }
        let mut got: Vec<(String, u64)> = sim
            .tick(30 * S)
            .into_iter()
            .map(|a| (a.key, a.count))
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![("pid=10".to_string(), 2), ("pid=20".to_string(), 1)]
        );
    }

    #[test]
    fn leaving_before_threshold_never_fires_and_eviction_resolves_honestly() {
        let cfg = EngineConfig {
            max_connections: 1,
            ..EngineConfig::default()
        };
        let mut sim = Sim::new(cfg);
        let a = Sock::new(1, "10.0.0.1:1", "10.0.0.5:5432", task(5, "app"));
        let mut t = a.ev(0, Established, CloseWait);
        t.owner = Some(task(5, "app"));
        sim.feed(&t);
        let ts = sim.tick(30 * S);
        assert_eq!(ts.len(), 1);
        // A second connection pushes the first out of the table (cap 1).
        let b = Sock::new(2, "10.0.0.1:2", "10.0.0.5:5432", task(5, "app"));
        let out = sim.feed(&b.ev(31 * S, Close, SynSent));
        let r = alerts_of(&out, RULE);
        assert_eq!(r.len(), 1, "{out:#?}");
        assert_eq!(r[0].status, AlertStatus::Resolved);
        assert!(
            r[0].message.ends_with("(1 no longer tracked: evicted)"),
            "{}",
            r[0].message
        );
        // Closing within the threshold: nothing.
        let c = Sock::new(3, "10.0.0.1:3", "10.0.0.5:5432", task(5, "app"));
        let mut sim = Sim::default();
        sim.run(&c.path(
            Close,
            &[
                (0, SynSent),
                (1, Established),
                (2, CloseWait),
                (29 * S, LastAck),
            ],
        ));
        assert!(sim.tick(100 * S).is_empty());
    }
}
