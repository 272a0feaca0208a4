//! Kernel tests of sockets that predate the tracer: the start-up snapshot, merged with the
//! live stream by the daemon's own loop, and the current-state counts against `ss`.

mod common;

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::*;
use tcptrace::decode::decode;
use tcptrace::engine::{Engine, EngineConfig, Output};
use tcptrace::event::{EventKind, OwnerVia, TcpState};
use tcptrace::filter::FilterArgs;
use tcptrace::kernel::TracerConfig;
use tcptrace::leaky::{LEAKY_COMM, LeakyServer, polite_client};
use tcptrace::live::{LiveOptions, run};
use tcptrace::pipeline::Pipeline;
use tcptrace::preexisting::{Adopted, Adopter};
use tcptrace::rules::{AlertStatus, RulesConfig};

/// A server leaking CLOSE_WAIT sockets since before tcptrace started is flagged, with its
/// pid and name, once the threshold has passed since start; its age is a lower bound.
#[test]
fn leaking_server_started_before_the_tracer_is_flagged_with_its_owner() {
    let Some(_g) = kernel_guard() else { return };
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_tcptrace"));
    let server = LeakyServer::spawn(exe, "127.0.0.1:0").unwrap();
    let port = server.addr.port();
    polite_client(server.addr, 3).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let seen = runtime().block_on(async {
        let seen: Rc<RefCell<Vec<Output>>> = Rc::default();
        let cfg = EngineConfig {
            rules: RulesConfig {
                close_wait_after_ns: 1_000_000_000,
                ..RulesConfig::default()
            },
            ..EngineConfig::default()
        };
        let mut pipeline = Pipeline::new(Engine::new(cfg), Vec::new());
        let s = Rc::clone(&seen);
        pipeline.tap(move |o| s.borrow_mut().push(o.clone()));
        let opts = LiveOptions {
            tracer: TracerConfig::default(),
            duration: Some(Duration::from_millis(2600)),
            on_ready: None,
            metrics: None,
            drop_caps: false,
            snapshot: Some(FilterArgs {
                ports: vec![port],
                ..FilterArgs::default()
            }),
            cgroups: Default::default(),
        };
        run(&mut pipeline, opts).await.expect("live run");
        seen.take()
    });
    let present: Vec<_> = seen
        .iter()
        .filter_map(|o| match o {
            Output::Transition(r) if r.t.kind == EventKind::Present => Some(r.t),
            _ => None,
        })
        .collect();
    // The clients' timewait sockets are present too, owned by no process.
    let clients: Vec<_> = present.iter().filter(|t| t.local.port() != port).collect();
    assert_eq!(clients.len(), 3, "{present:#?}");
    assert!(
        clients
            .iter()
            .all(|t| t.owner.is_none() && t.remote.port() == port)
    );
    let present: Vec<_> = present.iter().filter(|t| t.local.port() == port).collect();
    let states: Vec<TcpState> = present.iter().map(|t| t.new).collect();
    assert_eq!(
        states.iter().filter(|s| **s == TcpState::CloseWait).count(),
        3,
        "{present:#?}"
    );
    assert_eq!(states.iter().filter(|s| **s == TcpState::Listen).count(), 1);
    for t in &present {
        let o = t.owner.expect("owner from /proc");
        assert_eq!(
            (o.pid, o.comm.as_str().as_ref()),
            (server.pid(), LEAKY_COMM)
        );
        assert_eq!(t.meta.owner_via, OwnerVia::Fd);
    }
    let firing: Vec<_> = seen
        .iter()
        .filter_map(|o| match o {
            Output::Alert(a) if a.rule == "stuck_close_wait" && a.status == AlertStatus::Firing => {
                Some(a.clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(firing.len(), 1, "{firing:#?}");
    let a = &firing[0];
    assert_eq!(a.owner.map(|o| o.pid), Some(server.pid()));
    assert_eq!(a.count, 3);
    assert!(
        a.message.contains("present at start") && a.message.contains("≥"),
        "{}",
        a.message
    );
    server.stop();
}

/// A namespace made by the test (so the machine's other sockets don't count), busy with
/// connections made before and after the tracer started, in every common state: at a
/// quiet moment, the engine's current-state counts equal `ss -tan`'s, state by state.
#[test]
fn ss_state_counts_match_the_engines_in_a_busy_namespace() {
    let Some(_g) = kernel_guard() else { return };
    let named = NamedNetns::new("test");
    let (ns, ino) = (named.file(), named.ino);
    // Before the tracer: a listener, 2 established pairs, 2 CLOSE_WAIT servers whose
    // clients shut down their side but keep their sockets (FIN_WAIT2). Timewait sockets
    // that predate the tracer are not tracked (they end within a minute): none here.
    let before = in_netns(ns, || busy(9100, 2, 2));
    runtime().block_on(async {
        let (filter, mut tracer) = tracer_for_netns(ino);
        assert!(tracer.warnings().is_empty(), "{:?}", tracer.warnings());
        let snap = tcptrace::snapshot::take().expect("snapshot");
        let mut adopter = Adopter::default();
        let mut engine = Engine::new(EngineConfig::default());
        let mut out = Vec::new();
        for t in adopter.seed(&snap, &filter, snap.taken_mono_start_ns) {
            engine.on_transition(&t, &mut out);
        }
        // After: more of the same, plus connections that end in TIME_WAIT (the client
        // shuts down first and closes after the server: its FIN_WAIT2 → TIME_WAIT is seen).
        let after = in_netns(ns, || {
            let mut socks = busy(9200, 3, 1);
            let l = TcpListener::bind("127.0.0.1:9300").unwrap();
            for _ in 0..4 {
                let mut c = TcpStream::connect("127.0.0.1:9300").unwrap();
                let (mut s, _) = l.accept().unwrap();
                c.shutdown(Shutdown::Write).unwrap();
                assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0);
                drop(s);
                assert_eq!(c.read(&mut [0u8; 1]).unwrap(), 0);
                drop(c);
            }
            socks.listeners.push(l);
            socks
        });
        // One of the sockets that predate the tracer closes now (live, continuing its seed).
        let mut before = before;
        let gone = before.held.pop().unwrap();
        drop(gone);
        std::thread::sleep(Duration::from_millis(300));
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut counts_ss;
        let mut counts_engine;
        loop {
            tracer.drain(|b| {
                let mut t = decode(b).expect("decodable");
                match adopter.adopt(&mut t) {
                    Adopted::Feed => {}
                    Adopted::ForgetSeedThenFeed(seed) => engine.forget(seed, t.ts_ns, &mut out),
                }
                engine.on_transition(&t, &mut out);
            });
            counts_engine = engine.current_state_counts();
            counts_ss = in_netns(ns, ss_counts);
            if counts_engine == counts_ss || Instant::now() > deadline {
                break;
            }
            tracer.wait(Duration::from_millis(100)).await;
        }
        let named = |c: &[u64; 14]| -> Vec<(String, u64)> {
            TcpState::ALL
                .iter()
                .filter(|s| c[**s as usize] > 0)
                .map(|s| (s.name().to_string(), c[*s as usize]))
                .collect()
        };
        println!("ss: {:?}", named(&counts_ss));
        assert_eq!(
            named(&counts_engine),
            named(&counts_ss),
            "engine vs ss -tan"
        );
        // The namespace really was busy in several states.
        for st in [
            TcpState::Listen,
            TcpState::Established,
            TcpState::CloseWait,
            TcpState::TimeWait,
        ] {
            assert!(
                counts_ss[st as usize] > 0,
                "no {st} in {:?}",
                named(&counts_ss)
            );
        }
        assert_no_loss(&tracer.counters());
        drop(after);
        drop(before);
    });
}

/// Sockets a test holds open.
#[derive(Default)]
struct Held {
    listeners: Vec<TcpListener>,
    held: Vec<TcpStream>,
}

/// On `port`: a listener, `established` connections held open on both sides, and
/// `close_wait` servers whose client shut down its side (FIN_WAIT2, held) while the server
/// holds its socket (CLOSE_WAIT). The last held socket is a CLOSE_WAIT server.
fn busy(port: u16, established: usize, close_wait: usize) -> Held {
    let mut h = Held::default();
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
    for _ in 0..established {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (s, _) = l.accept().unwrap();
        c.write_all(b"x").unwrap();
        h.held.push(c);
        h.held.push(s);
    }
    for _ in 0..close_wait {
        let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0);
        h.held.push(c);
        h.held.push(s);
    }
    h.listeners.push(l);
    h
}

/// `ss -Htan` in this thread's namespace, counted per state.
fn ss_counts() -> [u64; 14] {
    let out = std::process::Command::new("ss")
        .args(["-Htan"])
        .output()
        .expect("ss (iproute2)");
    let mut c = [0u64; 14];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let st = match line.split_whitespace().next() {
            Some("ESTAB") => TcpState::Established,
            Some("SYN-SENT") => TcpState::SynSent,
            Some("SYN-RECV") => TcpState::SynRecv,
            Some("FIN-WAIT-1") => TcpState::FinWait1,
            Some("FIN-WAIT-2") => TcpState::FinWait2,
            Some("TIME-WAIT") => TcpState::TimeWait,
            Some("CLOSE-WAIT") => TcpState::CloseWait,
            Some("LAST-ACK") => TcpState::LastAck,
            Some("LISTEN") => TcpState::Listen,
            Some("CLOSING") => TcpState::Closing,
            Some(other) => panic!("ss state {other:?}"),
            None => continue,
        };
        c[st as usize] += 1;
    }
    c
}

/// A process in a container's cgroup (named as docker names them) and one outside it:
/// every event `--container ID` keeps is the container's process's, stamped with the id.
#[test]
fn container_filter_keeps_the_containers_process_only() {
    let Some(_g) = kernel_guard() else { return };
    let root = tcptrace::cgroup::cgroup2_root().expect("a cgroup v2 hierarchy");
    let id = format!("{:0>64x}", 0x7cb_7ace_u64 + u64::from(std::process::id()));
    let parent = root.join(format!("tcptrace-test-{}", std::process::id()));
    let scope = parent.join(format!("docker-{id}.scope"));
    std::fs::create_dir_all(&scope).expect("create a cgroup");
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_tcptrace"));
    let seen = runtime().block_on(async {
        let seen: Rc<RefCell<Vec<Output>>> = Rc::default();
        let mut pipeline = Pipeline::new(Engine::new(EngineConfig::default()), Vec::new());
        let s = Rc::clone(&seen);
        pipeline.tap(move |o| s.borrow_mut().push(o.clone()));
        let procs = scope.join("cgroup.procs");
        let servers: Rc<RefCell<Vec<LeakyServer>>> = Rc::default();
        let srv = Rc::clone(&servers);
        let opts = LiveOptions {
            tracer: TracerConfig::default(),
            duration: Some(Duration::from_millis(1500)),
            on_ready: Some(Box::new(move || {
                let inside = LeakyServer::spawn_in(exe, "127.0.0.1:0", Some(&procs)).unwrap();
                let outside = LeakyServer::spawn(exe, "127.0.0.1:0").unwrap();
                polite_client(inside.addr, 2).unwrap();
                polite_client(outside.addr, 2).unwrap();
                srv.borrow_mut().extend([inside, outside]);
            })),
            metrics: None,
            drop_caps: false,
            snapshot: None,
            cgroups: tcptrace::cgroup::CgroupFilter::new(None, Some(&id[..12])).unwrap(),
        };
        run(&mut pipeline, opts).await.expect("live run");
        let pids: Vec<u32> = servers.borrow().iter().map(|s| s.pid()).collect();
        (seen.take(), pids)
    });
    let (seen, pids) = seen;
    let kept: Vec<_> = seen
        .iter()
        .filter_map(|o| match o {
            Output::Transition(r) => Some(r.t),
            _ => None,
        })
        .collect();
    // The container's listener, and per connection LISTEN→SYN_RECV, SYN_RECV→ESTABLISHED,
    // the accept, ESTABLISHED→CLOSE_WAIT.
    assert_eq!(kept.len(), 1 + 2 * 4, "{kept:#?}");
    for t in &kept {
        assert_eq!(t.owner.map(|o| o.pid), Some(pids[0]), "{t:?}");
        assert_eq!(t.meta.container(), Some(&id[..12]));
    }
    let _ = std::fs::remove_dir(&scope);
    let _ = std::fs::remove_dir(&parent);
}

/// A timewait socket older than the tracer: the snapshot reports it, and its end (here:
/// its namespace deleted, which kills it) continues that same connection, mid-life.
#[test]
fn a_timewait_socket_older_than_the_tracer_is_seen_to_end() {
    let Some(_g) = kernel_guard() else { return };
    let named = NamedNetns::new("tw");
    let ino = named.ino;
    let cport = in_netns(named.file(), || {
        let l = TcpListener::bind("127.0.0.1:9400").unwrap();
        client_closes_first(&l)
    });
    runtime().block_on(async {
        let (filter, mut tracer) = tracer_for_netns(ino);
        let snap = tcptrace::snapshot::take().expect("snapshot");
        let mut adopter = Adopter::default();
        let seeds = adopter.seed(&snap, &filter, snap.taken_mono_start_ns);
        let tw: Vec<_> = seeds
            .iter()
            .filter(|t| t.local.port() == cport && t.remote.port() == 9400)
            .collect();
        assert_eq!(tw.len(), 1, "the client's timewait socket: {seeds:#?}");
        let seed = *tw[0];
        assert!(
            matches!(seed.new, TcpState::TimeWait | TcpState::FinWait2),
            "{seed:?}"
        );
        assert_eq!(seed.meta.netns, ino);
        let mut engine = Engine::new(EngineConfig::default());
        let mut out = Vec::new();
        for t in &seeds {
            engine.on_transition(t, &mut out);
        }
        // Deleting the namespace purges its timewait sockets.
        drop(named);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut ended = None;
        while ended.is_none() && Instant::now() < deadline {
            tracer.drain(|b| {
                let mut t = decode(b).expect("decodable");
                if t.local.port() != cport || t.new != TcpState::Close {
                    return;
                }
                assert!(t.midlife, "first seen at its end: {t:?}");
                assert_eq!(adopter.adopt(&mut t), Adopted::Feed);
                engine.on_transition(&t, &mut out);
                ended = Some(t);
            });
            tracer.wait(Duration::from_millis(100)).await;
        }
        let end = ended.expect("the timewait socket's end");
        assert_eq!(
            end.conn_id, seed.conn_id,
            "continues the snapshotted socket"
        );
        assert_eq!(end.old, seed.new);
        let lc = out
            .iter()
            .find_map(|o| match o {
                Output::Lifecycle(l) if l.conn_id == seed.conn_id => Some(l.clone()),
                _ => None,
            })
            .expect("its lifecycle closes");
        assert!(lc.partial_start, "{lc:?}");
        assert_no_loss(&tracer.counters());
    });
}

/// The tracer (every hook on) with its in-kernel filter set to one network namespace, and
/// that filter as the daemon's snapshot applies it.
fn tracer_for_netns(ino: u32) -> (FilterArgs, tcptrace::kernel::Tracer) {
    let filter = FilterArgs {
        netns: Some(ino),
        ..FilterArgs::default()
    };
    let tracer = start(TracerConfig {
        filter: filter.to_kernel().unwrap(),
        ..TracerConfig::default()
    });
    (filter, tracer)
}
