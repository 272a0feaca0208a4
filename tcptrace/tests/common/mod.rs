//! Shared helpers for the kernel tests: the CI gate, a tracer that collects the events of
//! the sockets a test made, and the exact-sequence assertions.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tcptrace::decode::decode;
use tcptrace::event::{EventKind, TcpState, Transition};
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

/// A tracer without the TIME_WAIT hooks: the tests of the full sockets' own transitions
/// (whose lifecycles then end FIN_WAIT2 → CLOSE as the tracepoint reports them).
/// `start_tracer_with_timewait` is the default configuration.
pub fn start_tracer() -> Tracer {
    start(TracerConfig {
        timewait: false,
        ..TracerConfig::default()
    })
}

pub fn start_tracer_with_timewait() -> Tracer {
    let t = start(TracerConfig::default());
    assert!(
        t.warnings().is_empty(),
        "every hook must attach on this kernel: {:?}",
        t.warnings()
    );
    t
}

pub fn start(cfg: TracerConfig) -> Tracer {
    match Tracer::start(cfg) {
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

/// The path of a connection: its first old state, then every new state (accepts and
/// timewait handoffs are not state changes and are skipped).
pub fn path(events: &[Transition]) -> Vec<TcpState> {
    let states: Vec<&Transition> = events
        .iter()
        .filter(|t| t.kind == EventKind::State)
        .collect();
    let mut p: Vec<TcpState> = states.first().map(|t| t.old).into_iter().collect();
    p.extend(states.iter().map(|t| t.new));
    p
}

/// The accept events among `events`.
pub fn accepts(events: &[Transition]) -> Vec<Transition> {
    events
        .iter()
        .filter(|t| t.kind == EventKind::Accept)
        .copied()
        .collect()
}

pub fn show(events: &[Transition]) -> String {
    events
        .iter()
        .map(|t| {
            format!(
                "  conn {:>8x} sk {:x} {} -> {} {} -> {} {:?} pid {} ({}) owner {:?} via {:?}",
                t.conn_id,
                t.skaddr,
                t.local,
                t.remote,
                t.old,
                t.new,
                t.kind,
                t.task.pid,
                t.task.comm,
                t.owner.map(|o| o.pid),
                t.meta.owner_via
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

/// A new network namespace with `lo` up: an fd that keeps it alive, and its inode.
pub fn new_netns() -> (std::fs::File, u32) {
    std::thread::spawn(|| {
        // SAFETY: unshare affects only this thread's network namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        loopback_up();
        use std::os::unix::fs::MetadataExt;
        let f = std::fs::File::open("/proc/thread-self/ns/net").expect("own netns");
        let ino = f.metadata().expect("netns inode").ino() as u32;
        (f, ino)
    })
    .join()
    .expect("netns thread panicked")
}

/// Runs `f` on a new thread inside the network namespace `ns` (sockets made there live in
/// it) and returns its result.
pub fn in_netns<T: Send + 'static>(
    ns: &std::fs::File,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    use std::os::fd::AsRawFd;
    let fd = ns.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on a namespace fd we hold; affects only this thread.
            let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread panicked")
    })
}

/// `ip link set lo up`, through the SIOCSIFFLAGS ioctl of this thread's namespace.
fn loopback_up() {
    // SAFETY: a datagram socket and two ioctls on a zeroed ifreq naming "lo".
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req), 0);
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut req), 0);
        libc::close(fd);
    }
}

/// An active closer's whole life with TIME_WAIT followed.
pub const CLIENT_THROUGH_TIME_WAIT: [TcpState; 7] = [
    TcpState::Close,
    TcpState::SynSent,
    TcpState::Established,
    TcpState::FinWait1,
    TcpState::FinWait2,
    TcpState::TimeWait,
    TcpState::Close,
];

/// A network namespace named in /run/netns, as `ip netns add` makes them (so that the
/// start-up snapshot finds it), with `lo` up. Dropping it deletes the namespace, which
/// purges its timewait sockets.
pub struct NamedNetns {
    name: String,
    file: Option<std::fs::File>,
    pub ino: u32,
}

impl NamedNetns {
    pub fn new(tag: &str) -> NamedNetns {
        let name = format!("tcptrace-{tag}-{}", std::process::id());
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip (iproute2)");
        assert!(ok.success(), "ip netns add {name}");
        let file = std::fs::File::open(format!("/run/netns/{name}")).expect("netns file");
        use std::os::unix::fs::MetadataExt;
        let ino = file.metadata().expect("netns inode").ino() as u32;
        in_netns(&file, loopback_up);
        NamedNetns {
            name,
            file: Some(file),
            ino,
        }
    }

    pub fn file(&self) -> &std::fs::File {
        self.file.as_ref().expect("open until dropped")
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        self.file = None;
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
