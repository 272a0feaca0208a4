//! The loopback churn load: client threads open and close connections flat out against
//! listeners on several ports of 127.0.0.1, and server threads accept, read to EOF and close,
//! so that every connection goes through the full lifecycle on both sides (10 transitions).

use std::io::{ErrorKind, Read as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd as _, FromRawFd as _};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// Transitions one connection makes on loopback, both ends together: client CLOSE→SYN_SENT→
/// ESTABLISHED→FIN_WAIT1→FIN_WAIT2→CLOSE, server LISTEN→SYN_RECV→ESTABLISHED→CLOSE_WAIT→
/// LAST_ACK→CLOSE.
pub const TRANSITIONS_PER_CONNECTION: u64 = 10;
/// A listener goes CLOSE→LISTEN when opened and LISTEN→CLOSE when closed, both inside the run.
pub const TRANSITIONS_PER_LISTENER: u64 = 2;

/// Well below the ephemeral range (32768-60999 here), so no client socket of this or any other
/// process ends up with one of these as its local port and pollutes the port filter.
const FIRST_CANDIDATE_PORT: u16 = 27400;
const LISTEN_BACKLOG: i32 = 4096;
/// How long the servers keep accepting after the clients stopped: the last ACK of a handshake
/// can still be in the loopback backlog when `connect` has already returned.
const DRAIN: Duration = Duration::from_millis(150);

#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub ports: Vec<u16>,
    pub clients: usize,
    pub servers: usize,
    pub duration: Duration,
    /// Connections per second in all, spread evenly over the clients; None: flat out.
    pub rate: Option<f64>,
}

#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    /// Connections whose server side read EOF and closed: each made its 10 transitions.
    pub completed: u64,
    /// Successful `connect` calls (should equal `completed`).
    pub connected: u64,
    pub connect_errors: u64,
    pub server_errors: u64,
    pub first_error: Option<String>,
    /// From the first client starting to the last client stopping.
    pub elapsed: Duration,
    pub listeners: u64,
}

impl LoadResult {
    pub fn per_second(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64()
    }

    pub fn expected_transitions(&self) -> u64 {
        self.completed * TRANSITIONS_PER_CONNECTION + self.listeners * TRANSITIONS_PER_LISTENER
    }
}

/// Finds `count` ports on 127.0.0.1 that can be listened on now, from a fixed starting point so
/// that successive runs (and the tracer filters) use the same ones.
pub fn pick_ports(count: usize) -> Result<Vec<u16>> {
    let mut ports = Vec::with_capacity(count);
    let mut candidate = FIRST_CANDIDATE_PORT;
    while ports.len() < count {
        if candidate >= 32000 {
            bail!("could not find {count} free ports on 127.0.0.1 from {FIRST_CANDIDATE_PORT} up");
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, candidate)).is_ok() {
            ports.push(candidate);
        }
        candidate += 1;
    }
    Ok(ports)
}

/// Runs the load for `cfg.duration` (or until `abort` is set) and returns what it completed.
/// The listeners are opened and closed inside this call, so a tracer attached around it sees
/// their transitions too.
pub fn run(cfg: &LoadConfig, abort: &AtomicBool) -> Result<LoadResult> {
    let listeners = cfg
        .ports
        .iter()
        .map(|&p| listen(p))
        .collect::<Result<Vec<_>>>()?;
    let listeners: Vec<Arc<TcpListener>> = listeners.into_iter().map(Arc::new).collect();

    let clients_stop = Arc::new(AtomicBool::new(false));
    let servers_stop = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicU64::new(0));
    let server_errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();

    let servers: Vec<_> = (0..cfg.servers)
        .map(|i| {
            // Listeners are partitioned so that a connection wakes exactly one poller.
            let mine: Vec<_> = listeners
                .iter()
                .enumerate()
                .filter(|(j, _)| j % cfg.servers == i)
                .map(|(_, l)| Arc::clone(l))
                .collect();
            let (stop, completed, errors, first_error) = (
                Arc::clone(&servers_stop),
                Arc::clone(&completed),
                Arc::clone(&server_errors),
                Arc::clone(&first_error),
            );
            thread::Builder::new()
                .name(format!("bench-server-{i}"))
                .spawn(move || serve(&mine, &stop, &completed, &errors, &first_error))
                .expect("spawn a server thread")
        })
        .collect();

    let start = Instant::now();
    let clients: Vec<_> = (0..cfg.clients)
        .map(|i| {
            let targets: Vec<SocketAddr> = cfg
                .ports
                .iter()
                .map(|&p| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, p)))
                .collect();
            let (stop, first_error) = (Arc::clone(&clients_stop), Arc::clone(&first_error));
            let interval = cfg
                .rate
                .map(|r| Duration::from_secs_f64(cfg.clients as f64 / r.max(1.0)));
            thread::Builder::new()
                .name(format!("bench-client-{i}"))
                .spawn(move || churn(i, &targets, interval, &stop, &first_error))
                .expect("spawn a client thread")
        })
        .collect();

    let deadline = start + cfg.duration;
    while Instant::now() < deadline && !abort.load(Ordering::Relaxed) {
        thread::sleep(
            Duration::from_millis(20).min(deadline.saturating_duration_since(Instant::now())),
        );
    }
    clients_stop.store(true, Ordering::Relaxed);
    let (mut connected, mut connect_errors) = (0, 0);
    for c in clients {
        let (ok, err) = c.join().expect("a client thread panicked");
        connected += ok;
        connect_errors += err;
    }
    let elapsed = start.elapsed();
    thread::sleep(DRAIN);
    servers_stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().expect("a server thread panicked");
    }
    let listener_count = listeners.len() as u64;
    drop(listeners);

    let first_error = first_error.lock().expect("first_error lock").take();
    Ok(LoadResult {
        completed: completed.load(Ordering::Relaxed),
        connected,
        connect_errors,
        server_errors: server_errors.load(Ordering::Relaxed),
        first_error,
        elapsed,
        listeners: listener_count,
    })
}

/// A non-blocking listener with a deep backlog: std's `TcpListener::bind` gives no control over
/// the backlog, and a shallow one drops SYNs under churn (then `connect` stalls for a second).
fn listen(port: u16) -> Result<TcpListener> {
    // SAFETY: plain socket syscalls on a descriptor this function owns; on every error path the
    // descriptor is handed to TcpListener first, so it is closed on drop.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket()");
        }
        let listener = TcpListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        if libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) != 0
        {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("bind 127.0.0.1:{port}"));
        }
        if libc::listen(fd, LISTEN_BACKLOG) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("listen on 127.0.0.1:{port}"));
        }
        Ok(listener)
    }
}

/// One client thread: connect, close at once (the client closes first), repeat. Successive
/// connections go to successive ports so that no port's ephemeral-port search saturates.
/// With `interval`, paced: one connection per interval on a fixed schedule (a late one is
/// made at once, so the mean rate holds while the machine keeps up).
fn churn(
    index: usize,
    targets: &[SocketAddr],
    interval: Option<Duration>,
    stop: &AtomicBool,
    first_error: &Mutex<Option<String>>,
) -> (u64, u64) {
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut next = index;
    let mut due = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Some(interval) = interval {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            due += interval;
        }
        let target = targets[next % targets.len()];
        next = next.wrapping_add(1);
        match TcpStream::connect(target) {
            Ok(stream) => {
                drop(stream);
                ok += 1;
            }
            Err(e) => {
                errors += 1;
                record_first(first_error, || format!("connect {target}: {e}"));
                // Out of ephemeral ports: back off instead of spinning on the error.
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
    (ok, errors)
}

/// One server thread: accept from its listeners, read each connection to EOF, close it.
fn serve(
    listeners: &[Arc<TcpListener>],
    stop: &AtomicBool,
    completed: &AtomicU64,
    errors: &AtomicU64,
    first_error: &Mutex<Option<String>>,
) {
    let mut pollfds: Vec<libc::pollfd> = listeners
        .iter()
        .map(|l| libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut buf = [0u8; 64];
    loop {
        let mut accepted_any = false;
        for listener in listeners {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    accepted_any = true;
                    // Accepted sockets are blocking; the client's FIN is at most a moment away.
                    let eof = loop {
                        match stream.read(&mut buf) {
                            Ok(0) => break Ok(()),
                            Ok(_) => continue,
                            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                            Err(e) => break Err(e),
                        }
                    };
                    drop(stream);
                    match eof {
                        Ok(()) => {
                            completed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            record_first(first_error, || format!("server read: {e}"));
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => accepted_any = true,
                Err(e) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    record_first(first_error, || format!("accept: {e}"));
                }
            }
        }
        if accepted_any {
            continue;
        }
        // Every accept queue was empty: only now may a stop request end the thread, so that
        // nothing connected is left unaccepted (it would be reset, not closed).
        if stop.load(Ordering::Relaxed) {
            return;
        }
        // SAFETY: pollfds is a valid array of pollfd of the given length.
        unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, 20) };
    }
}

fn record_first(slot: &Mutex<Option<String>>, what: impl FnOnce() -> String) {
    let mut slot = slot.lock().expect("first_error lock");
    if slot.is_none() {
        *slot = Some(what());
    }
}
