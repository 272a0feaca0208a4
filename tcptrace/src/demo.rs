//! `tcptrace demo`: a newcomer's first run. Starts a server on loopback that leaks every
//! accepted socket, drives a polite client at it, traces it all with the real eBPF
//! program, and shows the stuck-CLOSE_WAIT alert naming the leaking process; then stops
//! the server, shows the alert resolve, and cleans up.

use std::io::Write;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::cli::{DemoArgs, EngineArgs, View};
use crate::engine::{Engine, Output};
use crate::kernel::{self, TracerConfig};
use crate::leaky::{LEAKY_COMM, LeakyServer, polite_client};
use crate::live::{LiveOptions, run};
use crate::pipeline::{Pipeline, engine_config};
use crate::rules::AlertStatus;
use crate::sink::terminal::{Terminal, format_alert, format_transition};
use crate::sink::time::WallClock;

enum Seen {
    Firing(u32, String),
    Resolved,
}

pub async fn demo(args: DemoArgs) -> Result<()> {
    let exe = std::env::current_exe().context("locating the tcptrace binary")?;
    let clock = WallClock::new(kernel::wall_offset_ns());
    let engine_args = EngineArgs {
        max_connections: 100_000,
        close_wait_threshold: args.threshold,
        fin_wait2_threshold: None,
        slow_connect_threshold: Duration::from_secs(1),
    };
    let mut pipeline = Pipeline::new(Engine::new(engine_config(&engine_args)), Vec::new());
    let (port_tx, port_rx) = mpsc::channel::<u16>();
    let (seen_tx, seen_rx) = mpsc::channel::<Seen>();
    {
        let mut port = None;
        let mut header = Terminal::new(std::io::stdout(), View::Transitions, clock);
        pipeline.tap(move |o| {
            if port.is_none() {
                port = port_rx.try_recv().ok();
                if port.is_some() {
                    let _ = header.header();
                }
            }
            let Some(port) = port else { return };
            match o {
                Output::Transition(r) if r.t.local.port() == port || r.t.remote.port() == port => {
                    println!("{}", format_transition(&clock, r));
                }
                Output::Alert(a) if a.rule == "stuck_close_wait" => {
                    println!("{}", format_alert(&clock, a));
                    let _ = seen_tx.send(match a.status {
                        AlertStatus::Resolved => Seen::Resolved,
                        _ => Seen::Firing(
                            a.owner.map(|o| o.pid).unwrap_or(0),
                            a.owner
                                .map(|o| o.comm.as_str().into_owned())
                                .unwrap_or_default(),
                        ),
                    });
                }
                _ => {}
            }
            let _ = std::io::stdout().flush();
        });
    }
    let leaks = usize::from(args.leaks);
    let threshold = args.threshold;
    let (done_tx, done_rx) = mpsc::channel::<Result<u32, String>>();
    let on_ready = Box::new(move || {
        std::thread::spawn(move || {
            let r = orchestrate(&exe, leaks, threshold, port_tx, seen_rx);
            let _ = done_tx.send(r);
            // Stop the live loop the way a user would.
            // SAFETY: signalling our own process.
            unsafe { libc::kill(libc::getpid(), libc::SIGINT) };
        });
    });
    let opts = LiveOptions {
        tracer: TracerConfig::default(),
        duration: Some(Duration::from_secs(60)),
        on_ready: Some(on_ready),
        drop_caps: false,
        snapshot: None,
        cgroups: Default::default(),
        metrics: None,
    };
    let (stop, summary) = run(&mut pipeline, opts).await?;
    let outcome = done_rx
        .try_recv()
        .unwrap_or_else(|_| Err("the demo did not finish".into()));
    println!(
        "demo: {} transitions traced machine-wide, {} events lost",
        summary.transitions, summary.lost
    );
    log::debug!("demo stopped: {stop:?}");
    match outcome {
        Ok(pid) => {
            println!(
                "demo: done. tcptrace named pid {pid} ({LEAKY_COMM}), the process that never called close()."
            );
            println!("demo: try it on your own machine: sudo tcptrace --view alerts");
            Ok(())
        }
        Err(e) => bail!("the demo failed: {e}"),
    }
}

fn orchestrate(
    exe: &std::path::Path,
    leaks: usize,
    threshold: Duration,
    port_tx: mpsc::Sender<u16>,
    seen: mpsc::Receiver<Seen>,
) -> Result<u32, String> {
    let server = LeakyServer::spawn(exe, "127.0.0.1:0")
        .map_err(|e| format!("starting the leaky server: {e}"))?;
    let pid = server.pid();
    let _ = port_tx.send(server.addr.port());
    println!(
        "demo: started `{LEAKY_COMM}` (pid {pid}) on {}; it reads each request and never calls close().",
        server.addr
    );
    println!("demo: a client now opens {leaks} connections, sends a request and closes each one…");
    polite_client(server.addr, leaks).map_err(|e| format!("client: {e}"))?;
    println!(
        "demo: each server socket is now in CLOSE_WAIT; the alert fires once they have been stuck for {}.",
        humantime::format_duration(threshold)
    );
    let deadline = threshold + Duration::from_secs(10);
    loop {
        match seen.recv_timeout(deadline) {
            Ok(Seen::Firing(p, comm)) if p == pid => {
                println!(
                    "demo: the alert names pid {p} ({comm}). Stopping the server: the kernel closes its leaked sockets…"
                );
                break;
            }
            Ok(Seen::Firing(p, comm)) => {
                return Err(format!(
                    "the alert named pid {p} ({comm}), not the leaking server (pid {pid})"
                ));
            }
            Ok(Seen::Resolved) => {}
            Err(_) => {
                return Err(format!(
                    "no stuck_close_wait alert within {}",
                    humantime::format_duration(deadline)
                ));
            }
        }
    }
    server.stop();
    match seen.recv_timeout(Duration::from_secs(10)) {
        Ok(Seen::Resolved) => Ok(pid),
        _ => Err("the alert did not resolve after the server closed its sockets".into()),
    }
}
