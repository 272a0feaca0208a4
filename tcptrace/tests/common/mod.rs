//! Shared helpers for the kernel tests: the CI gate, a tracer that collects the events of
//! the sockets a test made, and the exact-sequence assertions.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tcptrace::decode::decode;
use tcptrace::event::{TcpState, Transition};
use tcptrace::kernel::{KernelCounters, Tracer, TracerConfig};

/// Kernel tests load programs on a shared tracepoint and assert zero loss; running them one
/// at a time keeps their loads from interfering.
static KERNEL: Mutex<()> = Mutex::new(());

/// Whether kernel tests can run here. Under CI=true a test that cannot run is a failure,
/// never a silent skip; elsewhere it says loudly why it skipped.
pub fn kernel_tests_enabled() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    let why = "kernel tests need root to load eBPF programs (run `cargo xtask test` as root)";
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("CI=true: {why}");
    }
    eprintln!("SKIPPED: {why}");
    false
}

pub fn lock() -> MutexGuard<'static, ()> {
    KERNEL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The start of every kernel test: `None` (after saying why) where kernel tests cannot run
/// outside CI; else the lock that keeps kernel tests from running at the same time.
pub fn kernel_guard() -> Option<MutexGuard<'static, ()>> {
    kernel_tests_enabled().then(lock)
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

pub fn start_tracer() -> Tracer {
    match Tracer::start(TracerConfig::default()) {
        Ok(t) => t,
        Err(e) => panic!("loading the real eBPF program failed: {e}"),
    }
}

/// One connection to `listener` in which the client closes first: the server reads EOF,
/// then closes too (10 transitions). Returns the client's port.
pub fn client_closes_first(listener: &std::net::TcpListener) -> u16 {
    use std::io::Read;
    let addr = listener.local_addr().expect("listener addr");
    let client = std::net::TcpStream::connect(addr).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    let cport = client.local_addr().expect("client addr").port();
    drop(client);
    let mut buf = [0u8; 16];
    assert_eq!(
        server.read(&mut buf).expect("server read"),
        0,
        "server expects EOF"
    );
    cport
}

/// Drains until `done(events)` holds or `timeout` passes; returns the matching events.
pub async fn collect(
    tracer: &mut Tracer,
    keep: impl Fn(&Transition) -> bool,
    done: impl Fn(&[Transition]) -> bool,
    timeout: Duration,
) -> Vec<Transition> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        tracer.drain(|bytes| {
            let t =
                decode(bytes).unwrap_or_else(|e| panic!("kernel wrote an undecodable event: {e}"));
            if keep(&t) {
                out.push(t);
            }
        });
        if done(&out) || Instant::now() >= deadline {
            return out;
        }
        tracer.wait(Duration::from_millis(20)).await;
    }
}

/// Events grouped per connection identity, in ring-buffer order.
pub fn by_conn(events: &[Transition]) -> BTreeMap<u64, Vec<Transition>> {
    let mut m: BTreeMap<u64, Vec<Transition>> = BTreeMap::new();
    for t in events {
        m.entry(t.conn_id).or_default().push(*t);
    }
    m
}

/// The path of a connection: its first old state, then every new state.
pub fn path(events: &[Transition]) -> Vec<TcpState> {
    let mut p: Vec<TcpState> = events.first().map(|t| t.old).into_iter().collect();
    p.extend(events.iter().map(|t| t.new));
    p
}

pub fn show(events: &[Transition]) -> String {
    events
        .iter()
        .map(|t| {
            format!(
                "  conn {:>8x} sk {:x} {} -> {} {} -> {} pid {} ({})",
                t.conn_id, t.skaddr, t.local, t.remote, t.old, t.new, t.task.pid, t.task.comm
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn assert_no_loss(c: &KernelCounters) {
    assert_eq!(
        (c.ringbuf_full, c.read_errors, c.recursion_misses),
        (0, 0, 0),
        "events were lost in the kernel: {c:?}"
    );
}
