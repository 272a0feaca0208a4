//! A deliberately leaking TCP server and its client, used by `tcptrace demo` and the kernel
//! tests: the server accepts connections, reads until the peer closes, and never calls
//! close(), so every accepted socket sits in CLOSE_WAIT, the signature of a leaked socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The process name the leaky server gives itself, so alerts can be checked against it.
pub const LEAKY_COMM: &str = "leaky-server";

/// Runs the leaking server in this process (the hidden `leaky-server` subcommand): names
/// itself, listens on loopback, prints `LISTENING <addr>`, then leaks every accepted
/// socket until killed or until stdin closes.
pub fn serve(bind: &str) -> std::io::Result<()> {
    set_comm(LEAKY_COMM);
    let listener = TcpListener::bind(bind)?;
    println!("LISTENING {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    // Exit when the parent goes away, so a crashed demo never leaves a leaker behind.
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    let mut leaked = Vec::new();
    for stream in listener.incoming() {
        let mut s = stream?;
        let mut buf = [0u8; 512];
        // Read the request and the peer's FIN, then "forget" to close.
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        leaked.push(s);
    }
    Ok(())
}

/// Sets this thread's comm (what the kernel and `ps` show) via prctl(PR_SET_NAME).
pub fn set_comm(name: &str) {
    // NUL-terminated and truncated to 15 bytes, as the kernel keeps it.
    let buf = crate::event::Comm::new(name).0;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

/// A running leaky server in a child process.
pub struct LeakyServer {
    pub child: Child,
    pub addr: SocketAddr,
}

impl LeakyServer {
    /// Starts `exe leaky-server --bind <bind>` and waits for its address.
    pub fn spawn(exe: &std::path::Path, bind: &str) -> std::io::Result<LeakyServer> {
        Self::spawn_in(exe, bind, None)
    }

    /// As [`spawn`](Self::spawn), with the child moved into the cgroup whose
    /// `cgroup.procs` file is given before it runs (so before it listens).
    pub fn spawn_in(
        exe: &std::path::Path,
        bind: &str,
        cgroup_procs: Option<&std::path::Path>,
    ) -> std::io::Result<LeakyServer> {
        let mut cmd = Command::new(exe);
        cmd.args(["leaky-server", "--bind", bind])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(procs) = cgroup_procs {
            let procs = std::ffi::CString::new(procs.as_os_str().as_encoded_bytes())
                .map_err(std::io::Error::other)?;
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // "0" moves the writing process itself.
                    let n = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                    libc::close(fd);
                    if n != 2 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("LISTENING ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("leaky server said {line:?}")))?;
        Ok(LeakyServer { child, addr })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server: the kernel then closes every leaked socket (CLOSE_WAIT→LAST_ACK).
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LeakyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens `n` connections to `addr`, sends a request on each, and closes them, as a
/// well-behaved client does. Returns the client ports used.
pub fn polite_client(addr: SocketAddr, n: usize) -> std::io::Result<Vec<u16>> {
    let mut ports = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        ports.push(s.local_addr()?.port());
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        drop(s);
    }
    Ok(ports)
}
