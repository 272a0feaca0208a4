//! Kernel tests of the raw transition stream: the real program, real loopback connections,
//! the exact transitions of the sockets each test made (filtered by its ports).

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use tcptrace::event::TcpState::{self, *};
use tcptrace::event::{EventKind, Transition};

const CLIENT: [TcpState; 6] = [Close, SynSent, Established, FinWait1, FinWait2, Close];
const SERVER: [TcpState; 6] = [Listen, SynRecv, Established, CloseWait, LastAck, Close];
const LISTENER: [TcpState; 3] = [Close, Listen, Close];

/// One connection where the client closes first; returns (listen port, client port).
fn one_connection(bind: &str) -> (u16, u16) {
    let listener = TcpListener::bind(bind).expect("bind listener");
    let cport = client_closes_first(&listener);
    (listener.local_addr().expect("listener addr").port(), cport)
}

fn ours(port: u16) -> impl Fn(&Transition) -> bool {
    move |t| t.local.port() == port || t.remote.port() == port
}

/// Classifies the test's three sockets by their first transition.
fn check_three_sockets(events: &[Transition], port: u16, cport: u16, family_v6: bool) {
    let conns = by_conn(events);
    assert_eq!(
        conns.len(),
        3,
        "expected client, server and listener:\n{}",
        show(events)
    );
    let mut seen = (false, false, false);
    for evs in conns.values() {
        let p = path(evs);
        for t in evs {
            assert_eq!(
                t.local.is_ipv6() || t.remote.is_ipv6(),
                family_v6,
                "family of\n{}",
                show(evs)
            );
        }
        match (evs[0].old, evs[0].new) {
            (Close, SynSent) => {
                assert_eq!(p, CLIENT, "client path:\n{}", show(evs));
                assert_eq!(evs[0].remote.port(), port);
                // Later events carry the real local port (SYN_SENT has 0).
                assert_eq!(evs.last().unwrap().local.port(), cport);
                seen.0 = true;
            }
            (Listen, SynRecv) => {
                assert_eq!(p, SERVER, "server path:\n{}", show(evs));
                assert_eq!(evs.last().unwrap().remote.port(), cport);
                seen.1 = true;
            }
            (Close, Listen) => {
                assert_eq!(p, LISTENER, "listener path:\n{}", show(evs));
                seen.2 = true;
            }
            other => panic!("unexpected first transition {other:?}:\n{}", show(evs)),
        }
        assert!(
            evs[0].starts_conn,
            "first event starts the connection:\n{}",
            show(evs)
        );
        assert!(
            evs.iter().all(|t| !t.midlife),
            "no socket predates the test:\n{}",
            show(evs)
        );
    }
    assert_eq!(seen, (true, true, true), "{}", show(events));
}

fn run_one(bind: &str, v6: bool) {
    let Some(_g) = kernel_guard() else { return };
    runtime().block_on(async {
        let mut tracer = start_tracer();
        let (port, cport) = one_connection(bind);
        let events = collect(
            &mut tracer,
            ours(port),
            |e| e.len() >= 5 + 5 + 1 + 2,
            Duration::from_secs(5),
        )
        .await;
        check_three_sockets(&events, port, cport, v6);
        // Addresses are read by family: loopback, never junk from the other family's fields.
        let lo: std::net::IpAddr = if v6 {
            "::1".parse().unwrap()
        } else {
            "127.0.0.1".parse().unwrap()
        };
        for t in events.iter().filter(|t| t.old == Established) {
            assert_eq!((t.local.ip(), t.remote.ip()), (lo, lo), "{}", show(&events));
        }
        assert_no_loss(&tracer.counters());
    });
}

#[test]
fn ipv4_client_closes_first_exact_transitions() {
    run_one("127.0.0.1:0", false);
}

#[test]
fn ipv6_client_closes_first_exact_transitions() {
    run_one("[::1]:0", true);
}

#[test]
fn refused_connect_is_syn_sent_then_close() {
    let Some(_g) = kernel_guard() else { return };
    runtime().block_on(async {
        // A port that nobody listens on: bind one, note it, close it.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut tracer = start_tracer();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let err = TcpStream::connect(addr).expect_err("nothing listens there");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        let events = collect(
            &mut tracer,
            ours(port),
            |e| e.len() >= 2,
            Duration::from_secs(5),
        )
        .await;
        let conns = by_conn(&events);
        assert_eq!(conns.len(), 1, "{}", show(&events));
        let evs = conns.values().next().unwrap();
        assert_eq!(path(evs), [Close, SynSent, Close], "{}", show(evs));
        assert_no_loss(&tracer.counters());
    });
}

#[test]
fn thousand_back_to_back_connections_are_complete_and_never_merged() {
    let Some(_g) = kernel_guard() else { return };
    const N: usize = 1000;
    runtime().block_on(async {
        let mut tracer = start_tracer();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut cports = Vec::with_capacity(N);
        let mut events = Vec::new();
        for i in 0..N {
            let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let (mut server, _) = listener.accept().unwrap();
            cports.push(client.local_addr().unwrap().port());
            drop(client);
            let mut buf = [0u8; 1];
            assert_eq!(server.read(&mut buf).unwrap(), 0);
            drop(server);
            if i % 100 == 99 {
                // Keep draining as we go, as the daemon does.
                events.extend(collect(&mut tracer, ours(port), |_| true, Duration::ZERO).await);
            }
        }
        drop(listener);
        // 10 transitions and one accept per connection, 2 for the listener.
        let expected = N * 11 + 2;
        events.extend(
            collect(&mut tracer, ours(port), |e| e.len() + events.len() >= expected, Duration::from_secs(10)).await,
        );
        let counters = tracer.counters();
        assert_no_loss(&counters);
        assert_eq!(events.len(), expected, "every transition of {N} connections arrives");

        let conns = by_conn(&events);
        assert_eq!(conns.len(), 2 * N + 1, "one identity per socket life, none merged");
        let (mut clients, mut servers, mut skaddrs) = (0, 0, std::collections::HashSet::new());
        for evs in conns.values() {
            skaddrs.insert(evs[0].skaddr);
            assert!(evs.iter().all(|t| t.skaddr == evs[0].skaddr), "one socket per identity");
            match path(evs).as_slice() {
                p if p == CLIENT => clients += 1,
                p if p == SERVER => servers += 1,
                p if p == LISTENER => {}
                p => panic!("incomplete or merged lifecycle {p:?}:\n{}", show(evs)),
            }
        }
        assert_eq!((clients, servers), (N, N));
        // The kernel reuses struct sock addresses; identities must survive that.
        assert!(
            skaddrs.len() < 2 * N + 1,
            "expected skaddr reuse across {N} connections, saw {} distinct addresses",
            skaddrs.len()
        );
        println!(
            "{} connections: {} events, {} distinct skaddrs for {} identities, counters {counters:?}",
            N, events.len(), skaddrs.len(), conns.len()
        );
    });
}

/// Ended lives' entries stay in the kernel's socket map (tombstones) for the next socket
/// at their address, at most a quarter of the map: 400 connections held open at once and
/// then closed leave no more than that, and 400 connections made after, on reused
/// addresses (a tombstone reused, or one not kept), still arrive whole, one identity each.
#[test]
fn ended_lives_are_kept_for_reuse_up_to_a_quarter_of_the_map() {
    let Some(_g) = kernel_guard() else { return };
    const N: usize = 400;
    // 2N sockets held open at once: more than a default soft limit of 1,024 fds leaves room for.
    raise_fd_limit();
    // The map's LRU keeps a pool per possible CPU: one CPU's pool must hold every socket
    // of the first batch (they are created on the test's CPU), 2N + 1 of them.
    let cpus = aya::util::nr_cpus().map_or(2, |n| n as u32);
    let entries = 1024 * cpus;
    let cap = i64::from(entries / 4);
    // Each CPU reports its changes to the count in batches of 64.
    let slack = 64 * i64::from(cpus);
    runtime().block_on(async {
        let mut tracer = start(tcptrace::kernel::TracerConfig {
            timewait: false,
            sock_map_entries: entries,
            ..Default::default()
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut pairs = Vec::with_capacity(N);
        for _ in 0..N {
            let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let (server, _) = listener.accept().unwrap();
            pairs.push((client, server));
        }
        let mut events = collect(&mut tracer, ours(port), |_| false, Duration::ZERO).await;
        for (client, mut server) in pairs {
            drop(client);
            let mut buf = [0u8; 1];
            assert_eq!(server.read(&mut buf).unwrap(), 0);
        }
        let kept = tracer.tombstones();
        assert!(
            kept <= cap + slack && kept >= (2 * N as i64).min(cap) / 2,
            "{kept} tombstones after {} sockets ended, for a map of {entries} (at most {cap} + {slack})",
            2 * N
        );
        for _ in 0..N {
            client_closes_first(&listener);
        }
        drop(listener);
        // 10 transitions and one accept per connection, 2 for the listener.
        let expected = 2 * N * 11 + 2;
        events.extend(
            collect(
                &mut tracer,
                ours(port),
                |e| e.len() + events.len() >= expected,
                Duration::from_secs(10),
            )
            .await,
        );
        assert_no_loss(&tracer.counters());
        assert_eq!(
            events.len(),
            expected,
            "every transition of {} connections arrives",
            2 * N
        );
        let conns = by_conn(&events);
        assert_eq!(
            conns.len(),
            4 * N + 1,
            "one identity per socket life, none merged"
        );
        let (mut clients, mut servers) = (0, 0);
        for evs in conns.values() {
            match path(evs).as_slice() {
                p if p == CLIENT => clients += 1,
                p if p == SERVER => servers += 1,
                p if p == LISTENER => {}
                p => panic!("incomplete or merged lifecycle {p:?}:\n{}", show(evs)),
            }
        }
        assert_eq!((clients, servers), (2 * N, 2 * N));
        let kept = tracer.tombstones();
        assert!(kept <= cap + slack, "{kept} tombstones, at most {cap} + {slack}");
        println!("{kept} tombstones kept of at most {cap} ({entries} entries)");
    });
}

/// The soft limit on open files raised to the hard one.
fn raise_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

#[test]
fn program_info_and_counters_are_read_from_the_kernel() {
    let Some(_g) = kernel_guard() else { return };
    runtime().block_on(async {
        let mut tracer = start_tracer();
        let info = tracer.program_info().expect("bpf_prog_info");
        // The kernel truncates program names to 15 bytes.
        assert_eq!(info.name, "inet_sock_set_s");
        assert!(info.id > 0);
        let (port, _) = one_connection("127.0.0.1:0");
        let events = collect(
            &mut tracer,
            ours(port),
            |e| e.len() >= 13,
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(events.len(), 13, "12 transitions and an accept");
        let c = tracer.counters();
        assert!(
            c.submitted >= 12,
            "the program counts what it submits: {c:?}"
        );
    });
}

/// The owner is recorded where the kernel runs in the owner's own system call (connect,
/// listen, close), inherited by a listener's children, and stamped on every later event,
/// softirq ones included; never the task the softirq happened to interrupt.
#[test]
fn owner_is_recorded_in_owner_context_and_carried_through_softirq() {
    let Some(_g) = kernel_guard() else { return };
    runtime().block_on(async {
        let mut tracer = start_tracer();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // The listener was created by this test thread: its listen() names it.
        // SAFETY: gettid has no preconditions.
        let listen_tid = unsafe { libc::gettid() } as u32;
        let client = std::thread::spawn(move || {
            tcptrace::leaky::set_comm("tt-client");
            let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            drop(s);
            // SAFETY: as above.
            unsafe { libc::gettid() as u32 }
        });
        let (mut server, _) = listener.accept().unwrap();
        let client_tid = client.join().unwrap();
        let server_thread = std::thread::spawn(move || {
            tcptrace::leaky::set_comm("tt-server");
            let mut buf = [0u8; 8];
            assert_eq!(server.read(&mut buf).unwrap(), 0);
            drop(server);
            // SAFETY: as above.
            unsafe { libc::gettid() as u32 }
        });
        let server_tid = server_thread.join().unwrap();
        drop(listener);
        let events = collect(
            &mut tracer,
            ours(port),
            |e| e.len() >= 13,
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(events.len(), 13, "{}", show(&events));
        for evs in by_conn(&events).values() {
            let owners: Vec<Option<(u32, String)>> = evs
                .iter()
                .map(|t| t.owner.map(|o| (o.tid, o.comm.as_str().into_owned())))
                .collect();
            match (evs[0].old, evs[0].new) {
                (Close, SynSent) => {
                    // Every client event carries the client, although SYN_SENT→ESTABLISHED,
                    // FIN_WAIT1→FIN_WAIT2 and FIN_WAIT2→CLOSE fire in softirq.
                    for o in &owners {
                        assert_eq!(o, &Some((client_tid, "tt-client".into())), "{}", show(evs));
                    }
                }
                (Listen, SynRecv) => {
                    // Until the server's own close() (→LAST_ACK) names it, the child carries
                    // its listener's owner, inherited in the kernel: never the client, whose
                    // task fires ESTABLISHED→CLOSE_WAIT on loopback.
                    let n = evs.len();
                    for (t, o) in evs.iter().zip(&owners).take(n - 2) {
                        assert_eq!(
                            o.as_ref().map(|o| o.0),
                            Some(listen_tid),
                            "owner of {} -> {}:\n{}",
                            t.old,
                            t.new,
                            show(evs)
                        );
                        assert_ne!(o.as_ref().map(|o| o.0), Some(client_tid));
                    }
                    for o in &owners[n - 2..] {
                        assert_eq!(o, &Some((server_tid, "tt-server".into())), "{}", show(evs));
                    }
                    // The main thread accept()ed it: that call names the owner from then on.
                    let acc = accepts(evs);
                    assert_eq!(acc.len(), 1, "{}", show(evs));
                    assert_eq!(
                        acc[0].owner.map(|o| o.tid),
                        Some(listen_tid),
                        "{}",
                        show(evs)
                    );
                    assert_eq!(acc[0].meta.owner_via, tcptrace::event::OwnerVia::Accept);
                    assert!(!acc[0].meta.unaccepted, "{}", show(evs));
                    assert!(
                        evs[0].meta.unaccepted,
                        "queued before accept: {}",
                        show(evs)
                    );
                }
                (Close, Listen) => {
                    for o in &owners {
                        assert_eq!(o.as_ref().map(|o| o.0), Some(listen_tid), "{}", show(evs));
                    }
                }
                other => panic!("unexpected {other:?}:\n{}", show(evs)),
            }
        }
        assert_no_loss(&tracer.counters());
    });
}

/// A burst the ring buffer cannot hold loses events, counted; but no connection's end is
/// lost: each `→ CLOSE` that finds the ring buffer full waits in the kernel's deferred
/// queue, whole and with its own time, and arrives after the backlog. So every connection
/// of the burst ends in the engine instead of staying tracked until evicted.
#[test]
fn closes_that_find_the_ring_buffer_full_arrive_late_and_every_connection_ends() {
    let Some(_g) = kernel_guard() else { return };
    const N: usize = 200;
    runtime().block_on(async {
        // One page: room for about 26 events; the burst makes 2,202 and nothing is read
        // while it runs.
        let mut tracer = start(tcptrace::kernel::TracerConfig {
            timewait: false,
            ring_bytes: 4096,
            ..tcptrace::kernel::TracerConfig::default()
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        for _ in 0..N {
            client_closes_first(&listener);
        }
        drop(listener);
        let burst_over = tcptrace::kernel::monotonic_ns();
        let events = collect(&mut tracer, ours(port), |_| false, Duration::from_millis(300)).await;
        let c = tracer.counters();
        assert!(c.ringbuf_full > 1000, "the burst overflowed the ring buffer: {c:?}");
        let closes: Vec<&Transition> = events.iter().filter(|t| t.new == Close).collect();
        assert_eq!(
            closes.len(),
            2 * N + 1,
            "every socket's end arrives (client, server, listener): {c:?}"
        );
        assert!(c.deferred >= 2 * N as u64 - 30, "most came through the queue: {c:?}");
        // Every event either arrived or was counted, under the right heading: transitions
        // in `ringbuf_full` (or the kernel's recursion misses), accepts apart from them.
        // Other TCP traffic on the host during the burst can only add to the counters.
        let kind = |k: EventKind| events.iter().filter(|t| t.kind == k).count() as u64;
        let transitions = 10 * N as u64 + 2;
        let accounted = kind(EventKind::State) + c.ringbuf_full + c.recursion_misses;
        assert!(
            (transitions..transitions + 50).contains(&accounted),
            "{} transitions arrived, {} counted lost, of {transitions}: {c:?}",
            kind(EventKind::State),
            c.ringbuf_full + c.recursion_misses
        );
        assert!(
            kind(EventKind::Accept) + c.ringbuf_full_other + c.accept_misses >= N as u64
                && c.ringbuf_full_other > 0,
            "{} accepts arrived, {} counted lost, of {N}: {c:?}",
            kind(EventKind::Accept),
            c.ringbuf_full_other + c.accept_misses
        );
        assert!(
            closes.iter().all(|t| t.ts_ns < burst_over),
            "deferred events keep the time they happened at"
        );
        // Each end names the state it left, as if nothing had been lost.
        let ends = |from: TcpState| closes.iter().filter(|t| t.old == from).count();
        assert_eq!((ends(FinWait2), ends(LastAck), ends(Listen)), (N, N, 1));
        let mut engine = tcptrace::engine::Engine::new(tcptrace::engine::EngineConfig::default());
        let mut out = Vec::new();
        for t in &events {
            engine.on_transition(t, &mut out);
        }
        assert_eq!(
            engine.current_state_counts().iter().sum::<u64>(),
            0,
            "no connection of the burst is left open in the engine"
        );
        println!("burst of {N} connections into a 4 KiB ring buffer: {} events kept, {} closes, counters {c:?}", events.len(), closes.len());
    });
}
