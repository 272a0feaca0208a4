//! Kernel tests of what the tracepoint alone does not say: the process that accept()ed a
//! socket, sockets no process accepted, the socket's network namespace, and TIME_WAIT.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use tcptrace::engine::{Engine, EngineConfig, Output};
use tcptrace::event::TcpState::*;
use tcptrace::event::{EventKind, OwnerVia, Transition};
use tcptrace::filter::FilterArgs;
use tcptrace::kernel::TracerConfig;
use tcptrace::rules::AlertStatus;

type TcpStatePair = (tcptrace::event::TcpState, tcptrace::event::TcpState);

fn on_port(port: u16) -> impl Fn(&Transition) -> bool {
    move |t| t.local.port() == port || t.remote.port() == port
}

fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// The pids `ss -tanpH` shows holding the established socket with local port `port`.
fn ss_pids(port: u16) -> Vec<u32> {
    let out = std::process::Command::new("ss")
        .args([
            "-tanpH",
            "state",
            "established",
            "sport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .expect("running ss (iproute2)");
    assert!(out.status.success(), "ss failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut pids: Vec<u32> = text
        .split("pid=")
        .skip(1)
        .filter_map(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// The accepted socket's events carry the thread that accept()ed it from then on, as `ss`
/// shows; the client's SYN_SENT→ESTABLISHED (softirq) carries the client, not swapper.
#[test]
fn accepted_socket_carries_the_accepting_process_as_ss_shows() {
    let Some(_g) = kernel_guard() else { return };
    runtime().block_on(async {
        let mut tracer = start_tracer_with_timewait();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = std::thread::spawn(move || {
            tcptrace::leaky::set_comm("tt-client");
            let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            (s, gettid())
        });
        let (client_sock, client_tid) = client.join().unwrap();
        let acceptor = std::thread::spawn(move || {
            tcptrace::leaky::set_comm("tt-acceptor");
            let (s, _) = listener.accept().unwrap();
            (s, gettid())
        });
        let (mut server, acceptor_tid) = acceptor.join().unwrap();
        let ss = ss_pids(port);
        assert_eq!(ss, vec![std::process::id()], "ss names this process");
        drop(client_sock);
        assert_eq!(server.read(&mut [0u8; 4]).unwrap(), 0);
        // This thread closes it: from its close() on, the owner is this thread.
        let closer_tid = gettid();
        drop(server);
        let events = collect(
            &mut tracer,
            on_port(port),
            |e| e.iter().any(|t| (t.old, t.new) == (LastAck, Close)),
            Duration::from_secs(5),
        )
        .await;
        let server_evs: Vec<Transition> = events
            .iter()
            .filter(|t| t.local.port() == port && t.old != Close && t.new != Listen)
            .filter(|t| t.old != Listen || t.new == SynRecv)
            .copied()
            .collect();
        let acc = accepts(&server_evs);
        assert_eq!(acc.len(), 1, "{}", show(&events));
        let a = acc[0];
        assert_eq!(a.owner.map(|o| o.pid), Some(ss[0]), "same process as ss");
        assert_eq!(a.owner.map(|o| o.tid), Some(acceptor_tid));
        assert_eq!(a.owner.unwrap().comm.as_str(), "tt-acceptor");
        assert_eq!(a.meta.owner_via, OwnerVia::Accept);
        // Every event after the accept, softirq ones included (ESTABLISHED → CLOSE_WAIT
        // fires in the client's context on loopback), carries the acceptor until the
        // close() (→ LAST_ACK) of another thread of this process names that thread.
        let after: Vec<&Transition> = server_evs.iter().filter(|t| t.ts_ns > a.ts_ns).collect();
        let owners: Vec<(TcpStatePair, Option<u32>)> = after
            .iter()
            .map(|t| ((t.old, t.new), t.owner.map(|o| o.tid)))
            .collect();
        assert_eq!(
            owners,
            vec![
                ((Established, CloseWait), Some(acceptor_tid)),
                ((CloseWait, LastAck), Some(closer_tid)),
                ((LastAck, Close), Some(closer_tid)),
            ],
            "{}",
            show(&events)
        );
        assert!(after.iter().all(|t| !t.meta.unaccepted));
        let established = events
            .iter()
            .find(|t| (t.old, t.new) == (SynSent, Established))
            .expect("client handshake");
        assert_eq!(established.owner.map(|o| o.tid), Some(client_tid));
        assert_eq!(established.owner.unwrap().comm.as_str(), "tt-client");
        assert_no_loss(&tracer.counters());
    });
}

/// A child no process accepted, left in CLOSE_WAIT in the accept queue, is its own
/// finding ("never accepted", with its listener); when accept() takes it, it becomes the
/// accepting process's.
#[test]
fn unaccepted_close_wait_is_told_apart_from_a_leaked_fd() {
    let Some(_g) = kernel_guard() else { return };
    runtime().block_on(async {
        let mut tracer = start_tracer_with_timewait();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(TcpStream::connect(("127.0.0.1", port)).unwrap());
        let queued = collect(
            &mut tracer,
            on_port(port),
            |e| e.iter().any(|t| t.new == CloseWait),
            Duration::from_secs(5),
        )
        .await;
        let cw = *queued
            .iter()
            .find(|t| t.new == CloseWait)
            .expect("CLOSE_WAIT");
        assert!(cw.meta.unaccepted, "{}", show(&queued));
        assert_eq!(cw.meta.owner_via, OwnerVia::Listener);
        let mut cfg = EngineConfig::default();
        cfg.rules.close_wait_after_ns = 100_000_000;
        let mut engine = Engine::new(cfg);
        let mut out = Vec::new();
        for t in &queued {
            engine.on_transition(t, &mut out);
        }
        let alerts = |out: &[Output]| -> Vec<tcptrace::rules::Alert> {
            out.iter()
                .filter_map(|o| match o {
                    Output::Alert(a) if a.rule == "stuck_close_wait" => Some(a.clone()),
                    _ => None,
                })
                .collect()
        };
        out.clear();
        engine.tick(cw.ts_ns + 200_000_000, &mut out);
        let fired = alerts(&out);
        assert_eq!(fired.len(), 1, "{fired:#?}");
        let me = std::process::id();
        assert_eq!(fired[0].key, format!("pid={me},unaccepted_on={port}"));
        assert!(
            fired[0].message.contains("never accepted")
                && fired[0].message.contains(&format!(":{port}")),
            "{}",
            fired[0].message
        );
        // Now the process accepts it: the socket is its fd, and a leak if kept open.
        let (s, _) = listener.accept().unwrap();
        let more = collect(
            &mut tracer,
            on_port(port),
            |e| e.iter().any(|t| t.kind == EventKind::Accept),
            Duration::from_secs(5),
        )
        .await;
        out.clear();
        for t in &more {
            engine.on_transition(t, &mut out);
        }
        let acc = accepts(&more);
        assert_eq!(acc.len(), 1, "{}", show(&more));
        assert_eq!((acc[0].old, acc[0].new), (CloseWait, CloseWait));
        // Past the threshold since it entered CLOSE_WAIT (it keeps that time).
        engine.tick(acc[0].ts_ns.max(cw.ts_ns + 200_000_000) + 1, &mut out);
        let after = alerts(&out);
        let statuses: Vec<(AlertStatus, String)> =
            after.iter().map(|a| (a.status, a.key.clone())).collect();
        assert_eq!(
            statuses,
            vec![
                (
                    AlertStatus::Resolved,
                    format!("pid={me},unaccepted_on={port}")
                ),
                (AlertStatus::Firing, format!("pid={me}")),
            ],
            "{after:#?}"
        );
        drop(s);
        assert_no_loss(&tracer.counters());
    });
}

/// Two namespaces made by the test, the same connection in each: `--netns` keeps exactly
/// one's, in the kernel, and every event names that namespace.
#[test]
fn netns_filter_keeps_exactly_one_namespace() {
    let Some(_g) = kernel_guard() else { return };
    runtime().block_on(async {
        let (ns1, ino1) = new_netns();
        let (ns2, ino2) = new_netns();
        assert_ne!(ino1, ino2);
        let filter = FilterArgs {
            netns: Some(ino1),
            ..FilterArgs::default()
        }
        .to_kernel()
        .unwrap();
        let mut tracer = start(TracerConfig {
            filter,
            ..TracerConfig::default()
        });
        let run = || {
            let l = TcpListener::bind("127.0.0.1:7777").unwrap();
            client_closes_first(&l);
        };
        in_netns(&ns1, run);
        in_netns(&ns2, run);
        run_in_root_too();
        let events = collect(
            &mut tracer,
            on_port(7777),
            |e| e.iter().any(|t| (t.old, t.new) == (LastAck, Close)),
            Duration::from_secs(5),
        )
        .await;
        // Let anything else arrive.
        let rest = collect(
            &mut tracer,
            on_port(7777),
            |_| false,
            Duration::from_millis(300),
        )
        .await;
        let all: Vec<Transition> = events.into_iter().chain(rest).collect();
        assert!(all.len() >= 11, "{}", show(&all));
        assert!(all.iter().all(|t| t.meta.netns == ino1), "{}", show(&all));
        // One connection's worth: one client and one server path, once.
        assert_eq!(
            all.iter()
                .filter(|t| (t.old, t.new) == (Close, SynSent))
                .count(),
            1
        );
        assert_eq!(
            all.iter()
                .filter(|t| (t.old, t.new) == (Listen, SynRecv))
                .count(),
            1
        );
        assert!(tracer.counters().filtered >= 11, "{:?}", tracer.counters());
        assert_no_loss(&tracer.counters());
    });
}

/// The same connection in the root namespace, which the filter must drop too (if 7777 is
/// free there).
fn run_in_root_too() {
    if let Ok(l) = TcpListener::bind("127.0.0.1:7777") {
        client_closes_first(&l);
    }
}

/// The active closer's lifecycle goes FIN_WAIT2 → TIME_WAIT when the peer's FIN arrives
/// (on the timewait socket that replaced the full one), and TIME_WAIT → CLOSE when the
/// kernel kills it: here by deleting the namespace, which purges its timewait sockets.
#[test]
fn time_wait_entry_and_its_end_when_the_namespace_goes() {
    let Some(_g) = kernel_guard() else { return };
    runtime().block_on(async {
        let mut tracer = start_tracer_with_timewait();
        let (ns, ino) = new_netns();
        in_netns(&ns, || {
            let l = TcpListener::bind("127.0.0.1:7778").unwrap();
            client_closes_first(&l);
            std::thread::sleep(Duration::from_millis(50));
        });
        drop(ns);
        let mine = move |t: &Transition| t.meta.netns == ino && on_port(7778)(t);
        let events = collect(
            &mut tracer,
            mine,
            |e| e.iter().any(|t| (t.old, t.new) == (TimeWait, Close)),
            Duration::from_secs(30),
        )
        .await;
        let conns = by_conn(&events);
        let client = conns
            .values()
            .find(|evs| (evs[0].old, evs[0].new) == (Close, SynSent))
            .unwrap_or_else(|| panic!("no client:\n{}", show(&events)));
        assert_eq!(path(client), CLIENT_THROUGH_TIME_WAIT, "{}", show(client));
        // The timewait socket is another struct: its events say so by their address.
        let full = client[0].skaddr;
        let tw: Vec<&Transition> = client.iter().filter(|t| t.skaddr != full).collect();
        assert!(
            tw.iter()
                .all(|t| t.new == TimeWait || t.new == Close || t.kind == EventKind::Handoff),
            "{}",
            show(client)
        );
        // TIME_WAIT began when the server's FIN came (its CLOSE_WAIT → LAST_ACK), to within
        // a few jiffies when it had to be derived from the timer.
        let fin = events
            .iter()
            .find(|t| (t.old, t.new) == (CloseWait, LastAck))
            .expect("server close");
        let entered = client.iter().find(|t| t.new == TimeWait).unwrap();
        let skew = entered.ts_ns.abs_diff(fin.ts_ns);
        assert!(
            skew < 20_000_000,
            "TIME_WAIT entry {skew} ns off the FIN\n{}",
            show(client)
        );
        let end = client.last().unwrap();
        assert_eq!((end.old, end.new), (TimeWait, Close));
        assert!(end.ts_ns > entered.ts_ns);
        assert!(
            end.ts_ns - entered.ts_ns < 30_000_000_000,
            "ended by the namespace's deletion, not the 60 s timer"
        );
        assert_no_loss(&tracer.counters());
    });
}
