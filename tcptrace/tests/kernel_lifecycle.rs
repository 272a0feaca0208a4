//! Kernel tests of lifecycles and alerts: the real program, real loopback sockets, the
//! engine and rules on top, and replay of what was recorded.

mod common;

use std::cell::RefCell;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::*;
use tcptrace::decode::decode;
use tcptrace::engine::{CloseKind, Engine, EngineConfig, LifecycleRecord, Output};
use tcptrace::kernel::{Tracer, monotonic_ns};
use tcptrace::leaky::{LEAKY_COMM, LeakyServer, polite_client};
use tcptrace::pipeline::Pipeline;
use tcptrace::rules::{Alert, AlertStatus, RulesConfig};
use tcptrace::sink::binary::Binary;
use tcptrace::sink::ndjson::Ndjson;
use tcptrace::sink::time::WallClock;

type Outputs = Rc<RefCell<Vec<Output>>>;

fn pipeline_with(
    cfg: EngineConfig,
    sinks: Vec<Box<dyn tcptrace::sink::Sink>>,
) -> (Pipeline, Outputs) {
    let seen: Outputs = Rc::default();
    let mut p = Pipeline::new(Engine::new(cfg), sinks);
    let s = seen.clone();
    p.tap(move |o| s.borrow_mut().push(o.clone()));
    (p, seen)
}

/// Feeds everything pending in the ring buffer to the pipeline, and ticks its clock.
fn pump(tracer: &mut Tracer, p: &mut Pipeline) {
    tracer.drain(|b| {
        p.feed(&decode(b).expect("decodable event"))
            .expect("sinks write")
    });
    p.tick(monotonic_ns()).expect("sinks write");
    p.flush().expect("sinks flush");
}

async fn pump_until(
    tracer: &mut Tracer,
    p: &mut Pipeline,
    seen: &Outputs,
    timeout: Duration,
    done: impl Fn(&[Output]) -> bool,
) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        pump(tracer, p);
        if done(&seen.borrow()) {
            return;
        }
        tracer.wait(Duration::from_millis(50)).await;
    }
}

fn close_wait_alerts(seen: &[Output]) -> Vec<Alert> {
    seen.iter()
        .filter_map(|o| match o {
            Output::Alert(a) if a.rule == "stuck_close_wait" => Some(a.clone()),
            _ => None,
        })
        .collect()
}

/// How many sockets `ss` says are in CLOSE_WAIT on local port `port`.
fn ss_close_wait(port: u16) -> usize {
    let out = std::process::Command::new("ss")
        .args([
            "-Htan",
            "state",
            "close-wait",
            "sport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .expect("ss (iproute2) is installed by `cargo xtask setup`");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

#[test]
fn leaking_server_is_named_while_stuck_and_the_alert_resolves_when_it_closes() {
    let Some(_g) = kernel_guard() else { return };
    const LEAKS: usize = 3;
    let threshold = Duration::from_secs(1);
    runtime().block_on(async {
        let cfg = EngineConfig {
            rules: RulesConfig {
                close_wait_after_ns: threshold.as_nanos() as u64,
                ..RulesConfig::default()
            },
            ..EngineConfig::default()
        };
        let (mut p, seen) = pipeline_with(cfg, Vec::new());
        let mut tracer = start_tracer();
        let server = LeakyServer::spawn(
            std::path::Path::new(env!("CARGO_BIN_EXE_tcptrace")),
            "127.0.0.1:0",
        )
        .expect("leaky server starts");
        let (server_pid, port) = (server.pid(), server.addr.port());
        let started = Instant::now();
        polite_client(server.addr, LEAKS).expect("client connects");

        pump_until(
            &mut tracer,
            &mut p,
            &seen,
            threshold + Duration::from_secs(5),
            |s| {
                close_wait_alerts(s)
                    .iter()
                    .any(|a| a.status == AlertStatus::Firing)
            },
        )
        .await;
        let alerts = close_wait_alerts(&seen.borrow());
        let firing = alerts
            .iter()
            .find(|a| a.status == AlertStatus::Firing)
            .expect("a stuck_close_wait alert fired");
        // Raised while the sockets are still stuck, by the timer, not by a later event.
        assert_eq!(
            ss_close_wait(port),
            LEAKS,
            "ss sees the leaked sockets still in CLOSE_WAIT"
        );
        assert!(started.elapsed() >= threshold, "not before the threshold");
        let owner = firing.owner.expect("the alert names an owner");
        // The server, never the client (this test process), whose task fires
        // ESTABLISHED→CLOSE_WAIT on loopback.
        assert_eq!(
            (owner.pid, owner.comm.as_str().as_ref()),
            (server_pid, LEAKY_COMM),
            "{firing:?}"
        );
        assert_ne!(owner.pid, std::process::id());
        assert_eq!(firing.count, LEAKS as u64, "{firing:?}");
        assert!(
            firing.message.contains(&format!(
                "pid {server_pid} ({LEAKY_COMM}) holds {LEAKS} sockets in CLOSE_WAIT"
            )),
            "{}",
            firing.message
        );
        assert!(
            firing.explanation.contains("has not called close()"),
            "{}",
            firing.explanation
        );
        assert!(firing.oldest_age_ns.unwrap() >= threshold.as_nanos() as u64);

        server.stop();
        pump_until(&mut tracer, &mut p, &seen, Duration::from_secs(5), |s| {
            close_wait_alerts(s)
                .iter()
                .any(|a| a.status == AlertStatus::Resolved)
        })
        .await;
        let alerts = close_wait_alerts(&seen.borrow());
        let resolved = alerts
            .iter()
            .find(|a| a.status == AlertStatus::Resolved)
            .expect("the alert resolved");
        assert_eq!(resolved.owner.map(|o| o.pid), Some(server_pid));
        assert_eq!(resolved.total, LEAKS as u64, "{resolved:?}");
        assert!(
            resolved.oldest_age_ns.unwrap() >= threshold.as_nanos() as u64,
            "total time stuck: {resolved:?}"
        );
        // Each leaked socket's lifecycle: a passive close that spent ≥ threshold in CLOSE_WAIT.
        let leaked: Vec<LifecycleRecord> = seen
            .borrow()
            .iter()
            .filter_map(|o| match o {
                Output::Lifecycle(l) if l.local.port() == port && l.remote.port() != 0 => {
                    Some(l.clone())
                }
                _ => None,
            })
            .collect();
        assert_eq!(leaked.len(), LEAKS);
        for l in &leaked {
            assert_eq!(l.close_kind, Some(CloseKind::PassiveClose), "{l:?}");
            assert_eq!(l.owner.map(|o| o.pid), Some(server_pid));
            let cw = l
                .path
                .iter()
                .find(|s| s.state == tcptrace::event::TcpState::CloseWait)
                .expect("CLOSE_WAIT step");
            assert!(
                cw.duration_ns.unwrap() >= threshold.as_nanos() as u64,
                "{l:?}"
            );
        }
        assert_no_loss(&tracer.counters());
    });
}

/// Client closes first, server closes first, and a refused connect, on v4 and v6; returns
/// the listening ports used.
fn connections() -> Vec<u16> {
    use std::io::Read;
    let mut ports = Vec::new();
    for bind in ["127.0.0.1:0", "[::1]:0"] {
        let l = TcpListener::bind(bind).unwrap();
        let addr: SocketAddr = l.local_addr().unwrap();
        ports.push(addr.port());
        for client_first in [true, false] {
            let c = TcpStream::connect(addr).unwrap();
            let (s, _) = l.accept().unwrap();
            let (first, mut second) = if client_first { (c, s) } else { (s, c) };
            drop(first);
            let mut buf = [0u8; 1];
            assert_eq!(second.read(&mut buf).unwrap(), 0);
            drop(second);
        }
        drop(l);
        assert!(
            TcpStream::connect(addr).is_err(),
            "nothing listens on {addr} any more"
        );
    }
    ports
}

#[test]
fn analyze_of_a_recorded_log_reproduces_the_live_lifecycles() {
    let Some(_g) = kernel_guard() else { return };
    let dir = std::env::temp_dir().join(format!("tcptrace-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("live.ndjson");
    let capture = dir.join("live.bin");
    runtime().block_on(async {
        // The same run recorded in both formats.
        let file = std::io::BufWriter::new(std::fs::File::create(&log).unwrap());
        let bin = std::io::BufWriter::new(std::fs::File::create(&capture).unwrap());
        let (mut p, seen) = pipeline_with(
            EngineConfig::default(),
            vec![Box::new(Ndjson::new(file, WallClock::identity())), Box::new(Binary::new(bin, WallClock::identity()))],
        );
        let mut tracer = start_tracer();
        let ports = connections();
        pump_until(&mut tracer, &mut p, &seen, Duration::from_secs(5), |s| {
            s.iter().filter(|o| matches!(o, Output::Lifecycle(l) if ports.contains(&l.local.port()) || ports.contains(&l.remote.port()))).count() >= 2 * (2 * 2 + 1 + 1)
        })
        .await;
        p.finish(monotonic_ns()).unwrap();
        p.flush().unwrap();
        drop(p);
        let live: Vec<LifecycleRecord> = lifecycles(&seen.borrow());
        assert!(live.len() >= 12, "2 families × (2 clients + 2 servers + listener + refused): {}", live.len());

        let ours = |v: &[LifecycleRecord]| -> Vec<LifecycleRecord> {
            v.iter().filter(|l| ports.contains(&l.local.port()) || ports.contains(&l.remote.port())).cloned().collect()
        };
        let transitions = |seen: &[Output]| seen.iter().filter(|o| matches!(o, Output::Transition(_))).count();
        for recorded in [&log, &capture] {
            let (mut replay_p, replayed) = pipeline_with(EngineConfig::default(), Vec::new());
            let (findings, bad) = tcptrace::analyze::replay(std::fs::File::open(recorded).unwrap(), &mut replay_p, false)
                .expect("replay runs");
            assert!(bad.is_none(), "the recorded log is well-formed: {bad:?}");
            assert!(findings.lines > 0);
            assert_eq!(transitions(&replayed.borrow()), transitions(&seen.borrow()), "{}: every transition replayed", recorded.display());
            let replayed = lifecycles(&replayed.borrow());
            assert_eq!(ours(&replayed), ours(&live), "{}: replay gives the same lifecycles as live mode", recorded.display());
        }
        let (ndjson_len, bin_len) = (std::fs::metadata(&log).unwrap().len(), std::fs::metadata(&capture).unwrap().len());
        assert!(bin_len * 3 < ndjson_len, "the capture is a fraction of the NDJSON log: {bin_len} vs {ndjson_len} bytes");
        let kinds: Vec<_> = ours(&live).iter().map(|l| l.close_kind).collect();
        for k in [CloseKind::ActiveClose, CloseKind::PassiveClose, CloseKind::ListenerClosed] {
            assert!(kinds.contains(&Some(k)), "{k:?} in {kinds:?}");
        }
        assert!(
            kinds.iter().any(|k| matches!(k, Some(CloseKind::ConnectFailed | CloseKind::ConnectRefused))),
            "refused connects: {kinds:?}"
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
}

fn lifecycles(seen: &[Output]) -> Vec<LifecycleRecord> {
    seen.iter()
        .filter_map(|o| match o {
            Output::Lifecycle(l) => Some(l.clone()),
            _ => None,
        })
        .collect()
}
