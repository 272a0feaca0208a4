//! Kernel test of the live loop's check against the kernel's sockets: a connection whose end
//! never reached the engine (as after a recursion miss) is retired once the kernel no
//! longer has its socket; one the kernel still has stays, however long it has been idle.

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

/// The socket map of the program loaded last (ours: kernel tests run one at a time).
fn socks_map() -> aya::maps::HashMap<aya::maps::MapData, u64, tcptrace_common::SockInfo> {
    let id = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|m| m.name_as_str() == Some("SOCKS"))
        .map(|m| m.id())
        .max()
        .expect("the program's SOCKS map is loaded");
    let data = aya::maps::MapData::from_id(id).expect("open SOCKS by id");
    aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("SOCKS is a hash map")
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

        let mut socks = socks_map();
        for (i, &sk) in freed.iter().enumerate() {
            let info = tcptrace_common::SockInfo {
                conn_id: PLANTED + i as u64,
                sport: 1,
                dport: 9,
                family: tcptrace_common::AF_INET,
                state: FinWait1 as u8,
                ..Default::default()
            };
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
