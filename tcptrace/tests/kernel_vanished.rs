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
