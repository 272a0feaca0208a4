//! Kernel tests of connections whose end was lost (as after a recursion miss): the live
//! loop retires one once the kernel no longer has its socket, and keeps one it still has,
//! however long idle; the program reports one whose socket address starts a new life; and
//! a timewait socket address reused before its old connection was ended ends it then.

mod common;

use std::cell::RefCell;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::rc::Rc;
use std::time::Duration;

use common::*;
use tcptrace::engine::{EndReason, Engine, EngineConfig, LifecycleRecord, Output};
use tcptrace::event::{ConnMeta, EventKind, Task, TcpState, TcpState::*, Transition};
use tcptrace::kernel::{TracerConfig, monotonic_ns};
use tcptrace::live::{LiveOptions, run};
use tcptrace::pipeline::Pipeline;

/// Identities the kernel program never hands out (its ids are `seq << 12 | cpu`, far below).
const PHANTOM: u64 = u64::MAX - 1;
const ALIVE: u64 = u64::MAX - 2;

fn step(
    id: u64,
    ts: u64,
    local: SocketAddr,
    remote: SocketAddr,
    old: TcpState,
    new: TcpState,
    netns: u32,
) -> Transition {
    Transition {
        ts_ns: ts,
        conn_id: id,
        skaddr: 0,
        task: Task::default(),
        local,
        remote,
        old,
        new,
        starts_conn: old == Close,
        midlife: false,
        cpu: 0,
        owner: None,
        meta: ConnMeta {
            netns,
            ..ConnMeta::default()
        },
        kind: EventKind::State,
    }
}

#[test]
fn the_live_loop_retires_connections_the_kernel_no_longer_has() {
    let Some(_g) = kernel_guard() else { return };
    let netns = tcptrace::snapshot::own_netns().expect("our network namespace's inode");
    // A real connection, open and idle for the whole run.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    let (alive_local, alive_remote) = (
        client.local_addr().expect("addr"),
        server.local_addr().expect("addr"),
    );
    // A connection the engine saw reach FIN_WAIT1 a minute ago, whose socket no longer
    // exists: nothing listens on or connects from port 1.
    let (gone_local, gone_remote): (SocketAddr, SocketAddr) = (
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:9".parse().unwrap(),
    );
    let then = monotonic_ns() - 60_000_000_000;

    runtime().block_on(async {
        let ends: Rc<RefCell<Vec<LifecycleRecord>>> = Rc::default();
        let mut pipeline = Pipeline::new(Engine::new(EngineConfig::default()), vec![]);
        let seen = Rc::clone(&ends);
        pipeline.tap(move |o| {
            if let Output::Lifecycle(l) = o {
                seen.borrow_mut().push(l.clone());
            }
        });
        for (id, local, remote, path) in [
            (
                PHANTOM,
                gone_local,
                gone_remote,
                &[Close, SynSent, Established, FinWait1][..],
            ),
            (
                ALIVE,
                alive_local,
                alive_remote,
                &[Close, SynSent, Established][..],
            ),
        ] {
            for (i, w) in path.windows(2).enumerate() {
                let t = step(id, then + i as u64, local, remote, w[0], w[1], netns);
                pipeline.feed(&t).expect("feed");
            }
        }
        let opts = LiveOptions {
            tracer: TracerConfig {
                timewait: false,
                ..TracerConfig::default()
            },
            // The first check comes 5 s in; both connections are idle long enough by then.
            duration: Some(Duration::from_secs(7)),
            on_ready: None,
            drop_caps: false,
            snapshot: None,
            cgroups: Default::default(),
            metrics: None,
        };
        let (_, summary) = run(&mut pipeline, opts).await.expect("the live loop");
        let ends = ends.borrow();
        let end_of = |id: u64| {
            ends.iter()
                .find(|l| l.conn_id == id)
                .map(|l| (l.end, l.gap))
                .unwrap_or_else(|| panic!("no lifecycle for {id:#x}"))
        };
        assert_eq!(
            end_of(PHANTOM),
            (EndReason::Vanished, true),
            "the connection the kernel no longer has is retired, as a gap"
        );
        assert_eq!(
            end_of(ALIVE),
            (EndReason::Finished, false),
            "the one the kernel still has stays until the run ends"
        );
        assert_eq!(summary.engine.vanished, 1, "{:?}", summary.engine);
        println!(
            "vanished: {:?}; still open at the end: {alive_local} -> {alive_remote}",
            end_of(PHANTOM)
        );
    });
    drop((client, server));
}

/// Identities planted in the program's socket map, far above any it hands out.
const PLANTED: u64 = u64::MAX - 1_000_000;

/// A connection map (`SOCKS` or `TWS`) of the program loaded last (ours: kernel tests run
/// one at a time).
fn conn_map(name: &str) -> aya::maps::HashMap<aya::maps::MapData, u64, tcptrace_common::SockInfo> {
    let id = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|m| m.name_as_str() == Some(name))
        .map(|m| m.id())
        .max()
        .unwrap_or_else(|| panic!("the program's {name} map is loaded"));
    let data = aya::maps::MapData::from_id(id).expect("open the map by id");
    aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("an LRU hash map")
}

/// What a planted entry says: connection `conn_id` between ports 1 and 9, in `state`.
fn planted(conn_id: u64, state: TcpState) -> tcptrace_common::SockInfo {
    tcptrace_common::SockInfo {
        conn_id,
        sport: 1,
        dport: 9,
        family: tcptrace_common::AF_INET,
        state: state as u8,
        ..Default::default()
    }
}

/// Keeps this thread on one CPU, where the kernel's socket cache hands a freed socket's
/// memory to the next socket made.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t with one CPU set, for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity"
        );
    }
}

/// A connection whose end the program missed (a recursion miss) keeps its entry in the
/// socket map. The kernel reuses a socket's memory only once the socket is freed, after its
/// end, so when a new life starts at that address the program reports the old connection
/// as vanished. The miss is simulated by planting such entries at the addresses of freed
/// listeners; new listeners then land on some of those addresses.
#[test]
fn a_new_life_at_a_lost_connections_address_reports_it_vanished() {
    let Some(_g) = kernel_guard() else { return };
    pin_to_cpu0();
    runtime().block_on(async {
        let mut tracer = start_tracer();
        let listen = |n: usize| -> Vec<TcpListener> {
            (0..n)
                .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
                .collect()
        };
        let port_set = |ls: &[TcpListener]| -> std::collections::HashSet<u16> {
            ls.iter()
                .map(|l| l.local_addr().expect("addr").port())
                .collect()
        };
        // Freed socket addresses, learnt from the listeners' own events.
        let first = listen(64);
        let ports = port_set(&first);
        drop(first);
        let events = collect(
            &mut tracer,
            |t| ports.contains(&t.local.port()),
            |e| e.len() >= 128,
            Duration::from_secs(5),
        )
        .await;
        let freed: Vec<u64> = events
            .iter()
            .filter(|t| (t.old, t.new) == (Listen, Close))
            .map(|t| t.skaddr)
            .collect();
        assert_eq!(freed.len(), 64, "{}", show(&events));
        // Listeners are freed after an RCU grace period.
        tokio::time::sleep(Duration::from_millis(200)).await;

        let mut socks = conn_map("SOCKS");
        for (i, &sk) in freed.iter().enumerate() {
            let info = planted(PLANTED + i as u64, FinWait1);
            socks.insert(sk, info, 0).expect("plant an entry");
        }

        let second = listen(256);
        let ports = port_set(&second);
        let events = collect(
            &mut tracer,
            |t| ports.contains(&t.local.port()) || t.kind == EventKind::Vanished,
            |e| e.iter().filter(|t| t.kind == EventKind::State).count() >= 256,
            Duration::from_secs(5),
        )
        .await;
        let starts: Vec<&Transition> = events
            .iter()
            .filter(|t| t.kind == EventKind::State && (t.old, t.new) == (Close, Listen))
            .collect();
        assert_eq!(starts.len(), 256, "{}", show(&events));
        let reused: Vec<u64> = starts
            .iter()
            .map(|t| t.skaddr)
            .filter(|sk| freed.contains(sk))
            .collect();
        let vanished: Vec<&Transition> = events
            .iter()
            .filter(|t| t.kind == EventKind::Vanished)
            .collect();
        eprintln!(
            "planted {} entries, {} reused by the new listeners, {} reported vanished",
            freed.len(),
            reused.len(),
            vanished.len()
        );
        assert!(
            !reused.is_empty(),
            "no new listener got a freed listener's address: the test could not set up its case"
        );
        // Each report names the planted connection of its address, in its last state.
        for v in &vanished {
            let i = freed
                .iter()
                .position(|&sk| sk == v.skaddr)
                .unwrap_or_else(|| panic!("a report at an address nothing was planted at: {v:?}"));
            assert_eq!(v.conn_id, PLANTED + i as u64);
            assert_eq!((v.old, v.new), (FinWait1, FinWait1));
            assert_eq!(v.local.port(), 1);
        }
        // Every reused address was reported once, just before the new life's first event.
        for &sk in &reused {
            let at: Vec<usize> = events
                .iter()
                .enumerate()
                .filter(|(_, t)| t.skaddr == sk)
                .map(|(i, _)| i)
                .collect();
            assert_eq!(
                at.len(),
                2,
                "one report and one start at {sk:#x}: {}",
                show(&events)
            );
            assert_eq!(events[at[0]].kind, EventKind::Vanished);
            assert_eq!((events[at[1]].old, events[at[1]].new), (Close, Listen));
        }
        assert_no_loss(&tracer.counters());
        drop(second);
    });
}

/// A client socket with SO_REUSEADDR bound to 127.0.0.1:`port` (0: the kernel picks),
/// connected to `to`. A timewait socket of the same addresses left by an earlier one is
/// killed by the connect (`tcp_tw_reuse`) once it is a second old.
fn reusing_client(to: SocketAddr, port: u16) -> TcpStream {
    use std::os::fd::FromRawFd;
    let sa = |port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns, with valid arguments;
    // the descriptor is handed to the TcpStream only once connected.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        let opt = (&raw const one).cast();
        let opt_len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        assert_eq!(
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, opt, opt_len),
            0
        );
        let local = sa(port);
        let r = libc::bind(fd, (&raw const local).cast(), len);
        assert_eq!(r, 0, "bind {port}: {}", std::io::Error::last_os_error());
        let remote = sa(to.port());
        let r = libc::connect(fd, (&raw const remote).cast(), len);
        assert_eq!(
            r,
            0,
            "connect from {port}: {}",
            std::io::Error::last_os_error()
        );
        TcpStream::from_raw_fd(fd)
    }
}

/// Closes `client` first, then the server side `server` once it read EOF: the client's
/// socket goes on as a timewait socket.
fn close_client_first(client: TcpStream, mut server: TcpStream) {
    use std::io::Read;
    drop(client);
    let mut buf = [0u8; 16];
    assert_eq!(server.read(&mut buf).expect("server read"), 0, "EOF");
}

/// Sets `net.ipv4.tcp_tw_reuse` to 2 (reuse on loopback, the kernel's default) for a test if
/// it is 0, and puts it back.
struct TwReuse(Option<String>);

impl TwReuse {
    const PATH: &str = "/proc/sys/net/ipv4/tcp_tw_reuse";

    fn on() -> TwReuse {
        let was = std::fs::read_to_string(Self::PATH).expect("read tcp_tw_reuse");
        if was.trim() != "0" {
            return TwReuse(None);
        }
        std::fs::write(Self::PATH, "2").expect("set tcp_tw_reuse");
        TwReuse(Some(was))
    }
}

impl Drop for TwReuse {
    fn drop(&mut self) {
        if let Some(was) = &self.0 {
            let _ = std::fs::write(Self::PATH, was.trim());
        }
    }
}

/// A timewait socket killed for its port's reuse is freed, and the next timewait socket
/// made on that CPU takes its memory, sometimes before the CPU that killed it has ended
/// its connection (its cancel is settled by the next program run there). The connection
/// still tracked at that address is then stale: it is ended when the new socket's timer
/// starts, and the new connection is handed to the socket, instead of the old one being
/// moved back from TIME_WAIT to FIN_WAIT2 (an illegal step) and the new one's handoff
/// lost. The race is simulated by planting stale entries at freed timewait addresses.
#[test]
fn a_reused_timewait_address_ends_the_connection_left_there() {
    let Some(_g) = kernel_guard() else { return };
    pin_to_cpu0();
    let _reuse = TwReuse::on();
    runtime().block_on(async {
        let mut tracer = start_tracer_with_timewait();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let server_addr = listener.local_addr().expect("addr");
        let accept = || listener.accept().expect("accept").0;
        // Where each connection went on as a timewait socket: its first event at another
        // address than its own (a handoff in FIN_WAIT2, or FIN_WAIT2 → TIME_WAIT when the
        // peer's FIN came first).
        let handoffs_of = |events: &[Transition]| -> Vec<Transition> {
            by_conn(events)
                .values()
                .filter_map(|evs| evs.iter().find(|t| t.skaddr != evs[0].skaddr).copied())
                .collect()
        };

        // Timewait sockets of 16 clients with ports of their own.
        let mut ports = std::collections::HashSet::new();
        for _ in 0..16 {
            let client = reusing_client(server_addr, 0);
            ports.insert(client.local_addr().expect("addr").port());
            close_client_first(client, accept());
        }
        let events = collect(
            &mut tracer,
            |t| ports.contains(&t.local.port()),
            |e| handoffs_of(e).len() >= 16,
            Duration::from_secs(5),
        )
        .await;
        let tws: Vec<(u16, u64)> = handoffs_of(&events)
            .iter()
            .map(|t| (t.local.port(), t.skaddr))
            .collect();
        assert_eq!(tws.len(), 16, "{}", show(&events));

        // A second later, the same ports connect again: each timewait socket is killed.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let mut kept = Vec::new();
        for &(port, _) in &tws {
            kept.push((reusing_client(server_addr, port), accept()));
        }
        let tw_ends = |e: &[Transition]| {
            e.iter()
                .filter(|t| t.new == Close && tws.iter().any(|&(_, tw)| tw == t.skaddr))
                .count()
        };
        let events = collect(
            &mut tracer,
            |t| ports.contains(&t.local.port()),
            |e| tw_ends(e) >= 16,
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(
            tw_ends(&events),
            16,
            "every killed timewait socket ended: {}",
            show(&events)
        );

        // Stale entries at the freed addresses, as if their kills were still unsettled.
        let mut tw_map = conn_map("TWS");
        for (i, &(_, tw)) in tws.iter().enumerate() {
            tw_map
                .insert(tw, planted(PLANTED + i as u64, TimeWait), 0)
                .expect("plant an entry");
        }
        // New timewait sockets, some at those addresses.
        let mut new_ports = std::collections::HashSet::new();
        for _ in 0..64 {
            let client = TcpStream::connect(server_addr).expect("connect");
            new_ports.insert(client.local_addr().expect("addr").port());
            close_client_first(client, accept());
        }
        let events = collect(
            &mut tracer,
            |t| new_ports.contains(&t.local.port()) || t.conn_id >= PLANTED,
            |e| handoffs_of(e).len() >= 64,
            Duration::from_secs(5),
        )
        .await;
        let handoffs = handoffs_of(&events);
        assert_eq!(handoffs.len(), 64, "{}", show(&events));
        let reused: Vec<&Transition> = handoffs
            .iter()
            .filter(|h| tws.iter().any(|&(_, tw)| tw == h.skaddr))
            .collect();
        let stale_ends: Vec<&Transition> = events.iter().filter(|t| t.conn_id >= PLANTED).collect();
        eprintln!(
            "planted {} stale entries, {} of their addresses reused, {} ended",
            tws.len(),
            reused.len(),
            stale_ends.len()
        );
        assert!(
            !reused.is_empty(),
            "no new timewait socket got a freed one's address: the test could not set up its case"
        );
        assert!(
            !events
                .iter()
                .any(|t| (t.old, t.new) == (TimeWait, FinWait2)),
            "a connection moved back from TIME_WAIT: {}",
            show(&events)
        );
        // Each reused address ended its planted connection, once, before the new handoff.
        for h in &reused {
            let i = tws
                .iter()
                .position(|&(_, tw)| tw == h.skaddr)
                .expect("planted");
            let ends: Vec<usize> = events
                .iter()
                .enumerate()
                .filter(|(_, t)| t.conn_id == PLANTED + i as u64)
                .map(|(at, _)| at)
                .collect();
            assert_eq!(ends.len(), 1, "{}", show(&events));
            let end = &events[ends[0]];
            assert_eq!((end.old, end.new, end.skaddr), (TimeWait, Close, h.skaddr));
            let handoff_at = events.iter().position(|t| t == *h).expect("in events");
            assert!(ends[0] < handoff_at, "the stale end comes first");
        }
        // And only those.
        assert_eq!(stale_ends.len(), reused.len(), "{}", show(&events));
        drop(kept);
    });
}
