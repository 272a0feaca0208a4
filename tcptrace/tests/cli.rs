//! The real `tcptrace` binary, as users and pipelines run it: errors, signals, outputs.
//! Failures print the command and what it wrote.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::kernel_guard;

const BIN: &str = env!("CARGO_BIN_EXE_tcptrace");

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tcptrace-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn show(cmd: &str, o: &Output) -> String {
    format!(
        "command: {cmd}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run tcptrace")
}

/// `n` loopback connections, client closing first; returns the listening port.
fn churn(n: usize) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    for _ in 0..n {
        common::client_closes_first(&l);
    }
    port
}

/// Starts the tracer without TIME_WAIT (so that the tests' active closers end within the
/// run, as FIN_WAIT2 → CLOSE) and waits until it is attached (it logs so on stderr).
fn start(args: &[&str], stdout: Stdio) -> Child {
    let mut all = vec!["--no-timewait"];
    all.extend_from_slice(args);
    start_exactly(&all, stdout)
}

fn start_exactly(args: &[&str], stdout: Stdio) -> Child {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tcptrace");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    // What it says before it is attached (the snapshot's lines, a first write error) counts.
    let mut before = String::new();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("tracing TCP state changes") => break,
            Some(Ok(l)) => {
                before.push_str(&l);
                before.push('\n');
            }
            _ => panic!("tcptrace {args:?} did not start"),
        }
        assert!(
            Instant::now() < deadline,
            "tcptrace {args:?} did not start in time"
        );
    }
    // Keep draining stderr so the child never blocks on it; keep it for assertions.
    let collected = std::sync::Arc::new(std::sync::Mutex::new(before));
    let c = collected.clone();
    let reader = std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            c.lock().unwrap().push_str(&l);
            c.lock().unwrap().push('\n');
        }
    });
    STDERR.with(|s| *s.borrow_mut() = Some(collected));
    STDERR_READER.with(|r| *r.borrow_mut() = Some(reader));
    child
}

thread_local! {
    static STDERR: std::cell::RefCell<Option<std::sync::Arc<std::sync::Mutex<String>>>> = const { std::cell::RefCell::new(None) };
    static STDERR_READER: std::cell::RefCell<Option<std::thread::JoinHandle<()>>> = const { std::cell::RefCell::new(None) };
}

/// Everything the child wrote on stderr, once it has exited (its last lines included).
fn stderr_at_exit() -> String {
    if let Some(r) = STDERR_READER.with(|r| r.borrow_mut().take()) {
        r.join().expect("stderr reader");
    }
    stderr_so_far()
}

fn stderr_so_far() -> String {
    STDERR.with(|s| {
        s.borrow()
            .as_ref()
            .map(|m| m.lock().unwrap().clone())
            .unwrap_or_default()
    })
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
}

fn wait(mut child: Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "tcptrace did not exit within {within:?}; stderr:\n{}",
                stderr_so_far()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, as systemd stops it: tcptrace must write out everything and exit 0.
fn stop(child: Child) {
    signal(&child, libc::SIGTERM);
    assert!(
        wait(child, Duration::from_secs(10)).success(),
        "{}",
        stderr_so_far()
    );
}

fn ndjson_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "{} ends with a complete line",
        path.display()
    );
    text.lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: bad line {l:?}: {e}", path.display()))
        })
        .collect()
}

fn transitions_on(lines: &[serde_json::Value], port: u16) -> usize {
    lines
        .iter()
        .filter(|v| v["type"] == "transition" && (v["lport"] == port || v["rport"] == port))
        .count()
}

/// The daemon as users run it (TIME_WAIT followed, snapshot taken): the NDJSON log has the
/// accept, the client's FIN_WAIT2 → TIME_WAIT, and `present` records for sockets opened
/// before it started; `analyze` replays them.
#[test]
fn default_daemon_logs_accepts_time_wait_and_sockets_present_at_start() {
    let Some(_g) = kernel_guard() else { return };
    let d = tmpdir("defaults");
    let out = d.join("trace.ndjson");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let held = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (held_server, _) = l.accept().unwrap();
    let child = start_exactly(
        &["--view", "none", "--output", out.to_str().unwrap()],
        Stdio::null(),
    );
    // The client shuts down its side first and keeps its socket until the server closes:
    // FIN_WAIT2 → TIME_WAIT, deterministically.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let cport = c.local_addr().unwrap().port();
    let (mut s, _) = l.accept().unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0);
    drop(s);
    assert_eq!(c.read(&mut [0u8; 1]).unwrap(), 0);
    drop(c);
    std::thread::sleep(Duration::from_millis(300));
    let pid = child.id();
    stop(child);
    let lines = ndjson_lines(&out);
    // The log begins with the run's start: runs appended to one file are told apart.
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(lines[0]["type"], "start", "{}", lines[0]);
    assert_eq!(lines[0]["pid"], pid, "{}", lines[0]);
    assert_eq!(lines[0]["boot_id"], boot_id.trim(), "{}", lines[0]);
    assert_eq!(
        lines[0]["version"],
        env!("CARGO_PKG_VERSION"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1..].iter().all(|v| v["type"] != "start"),
        "one start per run"
    );
    let on = |v: &&serde_json::Value| v["lport"] == port || v["rport"] == port;
    let present: Vec<_> = lines
        .iter()
        .filter(|v| v["type"] == "present")
        .filter(on)
        .collect();
    // The listener and both ends of the held connection, owned by this process.
    assert_eq!(present.len(), 3, "{present:#?}");
    assert!(
        present
            .iter()
            .all(|v| v["owner_pid"] == std::process::id() && v["owner_via"] == "fd")
    );
    let accepts: Vec<_> = lines
        .iter()
        .filter(|v| v["type"] == "accept")
        .filter(on)
        .collect();
    assert_eq!(accepts.len(), 1, "{accepts:#?}");
    assert_eq!(accepts[0]["owner_via"], "accept");
    let tw: Vec<_> = lines
        .iter()
        .filter(|v| v["type"] == "transition" && v["lport"] == cport && v["new"] == "TIME_WAIT")
        .collect();
    assert_eq!(tw.len(), 1, "the client's FIN_WAIT2 -> TIME_WAIT");
    assert_eq!(tw[0]["old"], "FIN_WAIT2");
    let o = run(&["analyze", out.to_str().unwrap(), "--view", "none"]);
    assert!(o.status.success(), "{}", show("analyze", &o));
    drop((held, held_server));
}

#[test]
fn bad_flags_and_missing_privileges_are_one_sentence_and_nonzero() {
    let o = run(&["--view", "everything"]);
    assert!(
        !o.status.success(),
        "{}",
        show("tcptrace --view everything", &o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("invalid value 'everything'"),
        "{}",
        show("--view", &o)
    );

    let o = run(&["--duration", "soon"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("examples: 500ms, 30s, 5m"),
        "{}",
        show("--duration soon", &o)
    );

    // Values that would trace nothing, or the wrong things, are refused up front, each in
    // one sentence that names the problem.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    for (args, says) in [
        (vec!["--port", "0"], "port 0 matches no connection"),
        (vec!["--port", "80,0"], "port 0 matches no connection"),
        (
            vec!["--netns", "/proc/self/status"],
            "is not a network namespace",
        ),
        (
            vec!["--netns", "/proc/self/ns/uts"],
            "is not a network namespace",
        ),
        (vec!["--max-connections", "0"], "is too few"),
        (vec!["demo", "--leaks", "0"], "'0' for '--leaks <LEAKS>'"),
        (vec!["--rotate-size", "10M"], "--output"),
        (
            vec!["--metrics", &taken],
            "for --metrics: Address already in use",
        ),
    ] {
        let o = run(&args);
        let cmd = format!("tcptrace {}", args.join(" "));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{}", show(&cmd, &o));
        assert!(err.contains(says), "{}", show(&cmd, &o));
        // The cause is said once, not repeated by the error chain.
        assert!(err.matches("(os error").count() <= 1, "{}", show(&cmd, &o));
    }
    // Boolean switches read from the environment take the usual spellings.
    let o = Command::new(BIN)
        .args(["--port", "0"])
        .env("TCPTRACE_NO_SNAPSHOT", "1")
        .env("TCPTRACE_IPV4", "yes")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("port 0") && !err.contains("NO_SNAPSHOT") && !err.contains("--no-snapshot"),
        "{}",
        show(
            "TCPTRACE_NO_SNAPSHOT=1 TCPTRACE_IPV4=yes tcptrace --port 0",
            &o
        )
    );

    // Without privileges: drop every capability and become nobody.
    let o = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            BIN,
        ])
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        show("setpriv … tcptrace", &o)
    );
    assert_eq!(
        err.trim(),
        "tcptrace: loading the eBPF program needs root or the CAP_BPF and CAP_PERFMON capabilities; run tcptrace with sudo",
        "{}",
        show("setpriv … tcptrace", &o)
    );
    assert!(!err.contains("backtrace") && !err.contains("panicked"));
}

#[test]
fn the_daemon_drops_every_capability_once_attached() {
    let Some(_g) = kernel_guard() else { return };
    // With an output file, whose writer thread is started before the program is attached:
    // capabilities are per thread, so every thread is checked.
    let out = tmpdir("caps").join("out.ndjson");
    let child = start(
        &["--view", "none", "--output", out.to_str().unwrap()],
        Stdio::null(),
    );
    let statuses: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", child.id()))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path().join("status")).unwrap())
        .collect();
    // Stopped before asserting, so that a failure leaves no tracer running.
    churn(3);
    std::thread::sleep(Duration::from_millis(300));
    stop(child);
    assert!(
        statuses.len() >= 2,
        "the reader and the output writer: {statuses:?}"
    );
    for status in statuses {
        let cap = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or("?")
                .to_string()
        };
        assert_eq!(
            (cap("CapEff:"), cap("CapPrm:")),
            ("0000000000000000".into(), "0000000000000000".into()),
            "{status}"
        );
        assert_eq!(cap("NoNewPrivs:"), "1", "{status}");
    }
    // And it still works without them: counters, ring buffer, a clean exit.
    assert!(!stderr_so_far().contains("rror"), "{}", stderr_so_far());
    let written = std::fs::read_to_string(&out).unwrap();
    assert!(
        written
            .lines()
            .any(|l| l.contains("\"type\":\"transition\"")),
        "the writer thread wrote the churn's transitions: {written}"
    );
}

/// Batching must not make the live view lag (issue #6): on an idle machine a lone
/// transition is in the output file within 250 ms. The reader polls every 100 ms below the
/// wake-up threshold and the output thread flushes after every drain.
#[test]
fn a_lone_transition_reaches_the_output_file_within_250_ms() {
    let Some(_g) = kernel_guard() else { return };
    let out = tmpdir("latency").join("out.ndjson");
    let child = start(
        &["--view", "none", "--output", out.to_str().unwrap()],
        Stdio::null(),
    );
    let mut delays = Vec::new();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(300));
        // The listener's own close is the last event, the moment `churn` returns.
        let port = churn(1);
        let t0 = Instant::now();
        let closed = format!("\"lport\":{port},");
        let arrived = loop {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            if text
                .lines()
                .any(|l| l.contains(&closed) && l.contains("\"old\":\"LISTEN\",\"new\":\"CLOSE\""))
            {
                break Some(t0.elapsed());
            }
            if t0.elapsed() > Duration::from_secs(3) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        delays.push(arrived);
    }
    stop(child);
    eprintln!("lone transition to the file: {delays:?}");
    assert!(
        delays
            .iter()
            .all(|d| d.is_some_and(|d| d <= Duration::from_millis(250))),
        "{delays:?}\n{}",
        stderr_at_exit()
    );
}

#[test]
fn analyze_reports_a_malformed_line_by_number_and_keeps_what_it_computed() {
    let d = tmpdir("analyze");
    let log = d.join("log.ndjson");
    let good = r#"{"type":"transition","schema":1,"ts_ns":1000,"time":"2026-01-01T00:00:00Z","conn_id":4096,"skaddr":"0x1","family":"ipv4","laddr":"127.0.0.1","lport":0,"raddr":"127.0.0.1","rport":80,"old":"CLOSE","new":"SYN_SENT","owner_pid":7,"owner_tid":7,"owner_comm":"curl","owner_source":"kernel","task_pid":7,"task_tid":7,"task_comm":"curl","starts_conn":true,"midlife":false,"cpu":0}"#;
    let second = good
        .replace("\"ts_ns\":1000", "\"ts_ns\":2000")
        .replace("\"lport\":0", "\"lport\":5555")
        .replace(
            "\"old\":\"CLOSE\",\"new\":\"SYN_SENT\"",
            "\"old\":\"SYN_SENT\",\"new\":\"ESTABLISHED\"",
        )
        .replace("\"starts_conn\":true", "\"starts_conn\":false");
    std::fs::write(
        &log,
        format!("{good}\n{second}\n{{\"type\":\"transition\",\"schema\":1,\"ts_ns\":\n{good}\n"),
    )
    .unwrap();
    let o = run(&["analyze", log.to_str().unwrap(), "--view", "none"]);
    let cmd = format!("tcptrace analyze {}", log.display());
    assert_eq!(o.status.code(), Some(1), "{}", show(&cmd, &o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("malformed log at line 3: not JSON"),
        "{}",
        show(&cmd, &o)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("3 lines, 2 transitions"),
        "what was computed is reported: {}",
        show(&cmd, &o)
    );

    let o = run(&[
        "analyze",
        log.to_str().unwrap(),
        "--view",
        "none",
        "--skip-bad",
    ]);
    assert!(o.status.success(), "{}", show(&cmd, &o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("4 lines, 3 transitions, 1 bad lines skipped"),
        "{}",
        show(&cmd, &o)
    );

    let o = run(&["analyze", "/nonexistent/log.ndjson"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .starts_with("tcptrace: cannot open the log /nonexistent/log.ndjson"),
        "{}",
        show("analyze missing", &o)
    );
}

#[test]
fn analyze_converts_a_log_to_a_binary_capture_and_back_with_the_log_s_times() {
    let d = tmpdir("convert");
    let log = d.join("log.ndjson");
    let first = r#"{"type":"transition","schema":1,"ts_ns":1000,"time":"2026-01-01T00:00:00.000001Z","conn_id":4096,"skaddr":"0x1","family":"ipv4","laddr":"127.0.0.1","lport":5555,"raddr":"127.0.0.1","rport":80,"old":"CLOSE","new":"SYN_SENT","owner_pid":7,"owner_tid":7,"owner_comm":"curl","owner_source":"kernel","task_pid":7,"task_tid":7,"task_comm":"curl","starts_conn":true,"midlife":false,"cpu":0}"#;
    let second = first
        .replace("\"ts_ns\":1000", "\"ts_ns\":2000")
        .replace(
            "\"old\":\"CLOSE\",\"new\":\"SYN_SENT\"",
            "\"old\":\"SYN_SENT\",\"new\":\"ESTABLISHED\"",
        )
        .replace("\"starts_conn\":true", "\"starts_conn\":false");
    std::fs::write(&log, format!("{first}\n{second}\n")).unwrap();
    let capture = d.join("capture.bin");
    let (log_s, cap_s) = (log.to_str().unwrap(), capture.to_str().unwrap());
    let o = run(&[
        "analyze", log_s, "--view", "none", "-o", cap_s, "--format", "binary",
    ]);
    assert!(
        o.status.success(),
        "{}",
        show("analyze -o --format binary", &o)
    );
    let bytes = std::fs::read(&capture).unwrap();
    // Two records and the summary line.
    assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 3);
    assert_eq!(bytes[0], tcptrace::sink::binary::TAG);

    // Back to NDJSON: the same transitions, dated by the original log's clock.
    let back = d.join("back.ndjson");
    let o = run(&[
        "analyze",
        cap_s,
        "--view",
        "none",
        "-o",
        back.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", show("analyze of the capture", &o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("3 lines, 2 transitions, 0 bad lines"),
        "{}",
        show("analyze of the capture", &o)
    );
    let lines = ndjson_lines(&back);
    let transitions: Vec<_> = lines.iter().filter(|v| v["type"] == "transition").collect();
    assert_eq!(transitions.len(), 2);
    assert_eq!(transitions[0]["time"], "2026-01-01T00:00:00.000001000Z");
    assert_eq!(transitions[1]["time"], "2026-01-01T00:00:00.000002000Z");
    assert_eq!(transitions[1]["new"], "ESTABLISHED");
    assert_eq!(transitions[1]["owner_comm"], "curl");

    // A damaged record is a bad line like any other: reported by number, the rest kept.
    let mut damaged = bytes.clone();
    let second_record = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
    damaged.insert(second_record + 5, 0);
    std::fs::write(&capture, &damaged).unwrap();
    let o = run(&["analyze", cap_s, "--view", "none"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        show("analyze of a damaged capture", &o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("malformed log at line 2: binary record of the wrong length"),
        "{}",
        show("analyze of a damaged capture", &o)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("2 lines, 1 transitions"));
}

#[test]
fn sigterm_flushes_everything_and_analyze_reads_it_back() {
    let Some(_g) = kernel_guard() else { return };
    let d = tmpdir("sigterm");
    let out = d.join("trace.ndjson");
    let child = start(
        &["--view", "none", "--output", out.to_str().unwrap()],
        Stdio::null(),
    );
    let port = churn(50);
    std::thread::sleep(Duration::from_millis(300));
    stop(child);
    let lines = ndjson_lines(&out);
    assert_eq!(
        transitions_on(&lines, port),
        50 * 10 + 2,
        "no transition lost"
    );
    let last = lines.last().expect("lines");
    assert_eq!(
        last["type"], "summary",
        "the last line is the complete summary"
    );
    assert_eq!(last["lost"], 0);
    assert!(
        lines
            .iter()
            .any(|v| v["type"] == "lifecycle" && v["close_kind"] == "passive_close")
    );

    let o = run(&["analyze", out.to_str().unwrap(), "--view", "none"]);
    assert!(o.status.success(), "{}", show("analyze", &o));
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(
        report.contains("active_close=") && report.contains("passive_close="),
        "{report}"
    );
    assert!(report.contains("handshake ("), "{report}");
}

#[test]
fn output_rotates_by_size_and_reopens_on_sighup() {
    let Some(_g) = kernel_guard() else { return };
    let d = tmpdir("rotate");
    let out = d.join("trace.ndjson");
    let child = start(
        &[
            "--view",
            "none",
            "--output",
            out.to_str().unwrap(),
            "--rotate-size",
            "64K",
            "--rotate-keep",
            "50",
        ],
        Stdio::null(),
    );
    let port1 = churn(100);
    std::thread::sleep(Duration::from_millis(300));
    // logrotate's way: move the file, then HUP.
    let moved = d.join("moved.ndjson");
    std::fs::rename(&out, &moved).unwrap();
    signal(&child, libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    let port2 = churn(20);
    std::thread::sleep(Duration::from_millis(300));
    stop(child);

    let files: Vec<PathBuf> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("trace.ndjson."))
        .collect();
    assert!(
        files.len() >= 2,
        "~1200 lines of ~500 B overflow 64K more than once: {files:?}"
    );
    let mut all = ndjson_lines(&moved);
    for p in &files {
        assert!(
            std::fs::metadata(p).unwrap().len() < 64 * 1024 + 4096,
            "{} stays near the limit",
            p.display()
        );
        all.extend(ndjson_lines(p));
    }
    let current = ndjson_lines(&out);
    all.extend(current.iter().cloned());
    // Every line is somewhere, exactly once, and whole (ndjson_lines parses each one).
    assert_eq!(transitions_on(&all, port1), 100 * 10 + 2);
    assert_eq!(transitions_on(&all, port2), 20 * 10 + 2);
    // The moved file stopped at SIGHUP; the reopened path got the later lines.
    assert_eq!(
        transitions_on(&ndjson_lines(&moved), port2),
        0,
        "the moved file got nothing after SIGHUP"
    );
    // ...and the reopened path (with the files it rotated into since) got them all.
    let mut reopened = current.clone();
    for p in &files {
        reopened.extend(ndjson_lines(p));
    }
    assert_eq!(
        transitions_on(&reopened, port2),
        20 * 10 + 2,
        "the reopened file gets the new lines"
    );
    assert_eq!(current.last().unwrap()["type"], "summary");
}

#[test]
fn a_full_disk_is_reported_once_and_tracing_goes_on() {
    let Some(_g) = kernel_guard() else { return };
    // Without the start-up snapshot: its "present at start" lines may name this test's
    // port too (an earlier test's TIME_WAIT sockets to a listener the kernel gave the same
    // port), and the count below is of this run's own connections.
    let mut child = start(&["--output", "/dev/full", "--no-snapshot"], Stdio::piped());
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        BufReader::new(stdout).read_to_string(&mut s).unwrap();
        s
    });
    let port = churn(5);
    std::thread::sleep(Duration::from_millis(400));
    signal(&child, libc::SIGINT);
    // Tracing went on, but the run failed: its capture is incomplete.
    assert_eq!(
        wait(child, Duration::from_secs(10)).code(),
        Some(1),
        "{}",
        stderr_so_far()
    );
    let printed = reader.join().unwrap();
    let on_port = printed
        .lines()
        .filter(|l| l.contains(&format!(":{port} ")))
        .count();
    // 10 transitions and an accept per connection, and the listener's 2.
    assert_eq!(
        on_port,
        5 * 11 + 2,
        "the terminal still got everything:\n{printed}"
    );
    assert_eq!(
        printed
            .lines()
            .filter(|l| l.contains(&format!(":{port} ")) && l.contains("accepted in ESTABLISHED"))
            .count(),
        5,
        "{printed}"
    );
    let err = stderr_at_exit();
    let reports: Vec<&str> = err.lines().filter(|l| l.contains("/dev/full")).collect();
    assert_eq!(
        reports.len(),
        2,
        "one clear error, not one per line, and what was lost at exit:\n{err}"
    );
    assert!(
        reports[0].contains("No space left on device") && reports[0].contains("tracing goes on"),
        "{err}"
    );
    assert!(
        reports[1].starts_with("tcptrace: ") && reports[1].contains("could not be written"),
        "{err}"
    );
}

#[test]
fn a_closed_pipe_ends_tracing_quietly() {
    let Some(_g) = kernel_guard() else { return };
    let mut child = start(&[], Stdio::piped());
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut header = String::new();
    churn(1);
    stdout.read_line(&mut header).unwrap();
    assert!(header.starts_with("TIME"), "{header}");
    drop(stdout); // like `| head -1` exiting
    churn(20);
    let status = wait(child, Duration::from_secs(10));
    assert!(
        status.success(),
        "exit status {status}; stderr:\n{}",
        stderr_so_far()
    );
    let err = stderr_so_far();
    assert!(
        !err.contains("error") && !err.contains("panicked"),
        "quiet exit:\n{err}"
    );
}

#[test]
fn a_binary_capture_rotates_and_analyze_reads_every_transition_back() {
    let Some(_g) = kernel_guard() else { return };
    let d = tmpdir("binary");
    let out = d.join("trace.bin");
    let child = start(
        &[
            "--view",
            "none",
            "--format",
            "binary",
            "--rotate-size",
            "16K",
            "--output",
            out.to_str().unwrap(),
        ],
        Stdio::null(),
    );
    let port = churn(50);
    std::thread::sleep(Duration::from_millis(300));
    stop(child);
    // 502 records of ~160 bytes: rotated at least four times, each file whole records.
    let rotated = d.join("trace.bin.1");
    assert!(rotated.exists(), "rotated at 16 KiB");
    let mut files: Vec<PathBuf> = (1..=5)
        .rev()
        .map(|n| d.join(format!("trace.bin.{n}")))
        .filter(|p| p.exists())
        .collect();
    assert!(files.len() >= 4, "{files:?}");
    files.push(out.clone());
    let mut all = Vec::new();
    for f in &files {
        let o = run(&["analyze", f.to_str().unwrap(), "--view", "none"]);
        assert!(
            o.status.success(),
            "{}",
            show(&format!("analyze {}", f.display()), &o)
        );
        all.extend(std::fs::read(f).unwrap());
    }
    let joined = d.join("joined.bin");
    std::fs::write(&joined, &all).unwrap();
    let back = d.join("back.ndjson");
    let o = run(&[
        "analyze",
        joined.to_str().unwrap(),
        "--view",
        "none",
        "-o",
        back.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", show("analyze joined capture", &o));
    let lines = ndjson_lines(&back);
    assert_eq!(
        transitions_on(&lines, port),
        50 * 10 + 2,
        "no transition lost"
    );
    // Dated by the live run's clock, not from the epoch.
    let year = lines.iter().find(|v| v["type"] == "transition").unwrap()["time"]
        .as_str()
        .unwrap()[..4]
        .to_owned();
    assert!(year.as_str() >= "2025", "{year}");
    // The live run's summary is in the capture, as JSON.
    let summary = String::from_utf8_lossy(&std::fs::read(&out).unwrap())
        .lines()
        .filter(|l| l.starts_with("{\"type\":\"summary\""))
        .count();
    assert_eq!(summary, 1, "the capture ends with the run's summary line");
    assert!(
        lines
            .iter()
            .any(|v| v["type"] == "lifecycle" && v["close_kind"] == "passive_close"),
        "lifecycles are recomputed from the capture"
    );
}

#[test]
fn csv_output_has_a_header_and_parses_back() {
    let Some(_g) = kernel_guard() else { return };
    let d = tmpdir("csv");
    let out = d.join("trace.csv");
    let child = start(
        &[
            "--view",
            "none",
            "--format",
            "csv",
            "--output",
            out.to_str().unwrap(),
        ],
        Stdio::null(),
    );
    let port = churn(10);
    std::thread::sleep(Duration::from_millis(300));
    stop(child);
    let mut r = csv::Reader::from_path(&out).unwrap();
    let headers = r.headers().unwrap().clone();
    assert_eq!(&headers[0], "type");
    let rows: Vec<tcptrace::sink::csv::CsvRow> = r
        .deserialize()
        .map(|row| row.expect("a valid row"))
        .collect();
    let ours = rows
        .iter()
        .filter(|r| r.kind == "transition" && (r.lport == Some(port) || r.rport == Some(port)))
        .count();
    assert_eq!(ours, 10 * 10 + 2);
    assert_eq!(rows.last().unwrap().kind, "summary");
    let _ = std::io::stdout().flush();
}

/// Two transitions of one connection, as a live run writes them.
fn two_transitions() -> String {
    let first = r#"{"type":"transition","schema":1,"ts_ns":1000,"time":"2026-01-01T00:00:00.000001Z","conn_id":4096,"skaddr":"0x1","family":"ipv4","laddr":"127.0.0.1","lport":5555,"raddr":"127.0.0.1","rport":80,"old":"CLOSE","new":"SYN_SENT","owner_pid":7,"owner_tid":7,"owner_comm":"curl","owner_source":"kernel","task_pid":7,"task_tid":7,"task_comm":"curl","starts_conn":true,"midlife":false,"cpu":0}"#;
    let second = first
        .replace("\"ts_ns\":1000", "\"ts_ns\":2000")
        .replace(
            "\"old\":\"CLOSE\",\"new\":\"SYN_SENT\"",
            "\"old\":\"SYN_SENT\",\"new\":\"ESTABLISHED\"",
        )
        .replace("\"starts_conn\":true", "\"starts_conn\":false");
    format!("{first}\n{second}\n")
}

/// `analyze -o` writes a new file: a second conversion appended to the first would be
/// replayed twice, and the log itself as its output would be read for ever.
#[test]
fn analyze_o_refuses_a_non_empty_file_and_above_all_its_own_input() {
    let d = tmpdir("analyze-o-exists");
    let log = d.join("log.ndjson");
    std::fs::write(&log, two_transitions()).unwrap();
    let log_s = log.to_str().unwrap();
    let before = std::fs::read(&log).unwrap();
    let o = run(&["analyze", log_s, "--view", "none", "-o", log_s]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        show("analyze log -o log", &o)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("tcptrace: ") && err.contains("is the log being analyzed"),
        "{}",
        show("analyze log -o log", &o)
    );
    assert_eq!(err.lines().count(), 1, "one sentence: {err}");
    assert_eq!(std::fs::read(&log).unwrap(), before, "the log is untouched");

    // The same file under another name is still the input.
    let link = d.join("link.ndjson");
    std::fs::hard_link(&log, &link).unwrap();
    let o = run(&["analyze", log_s, "-o", link.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        show("analyze log -o link", &o)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("is the log being analyzed"));

    let conv = d.join("conv.ndjson");
    let conv_s = conv.to_str().unwrap();
    let o = run(&["analyze", log_s, "--view", "none", "-o", conv_s]);
    assert!(o.status.success(), "{}", show("analyze -o conv", &o));
    let first = std::fs::read(&conv).unwrap();
    let o = run(&["analyze", log_s, "--view", "none", "-o", conv_s]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        show("analyze -o conv again", &o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already exists and is not empty"),
        "{}",
        show("analyze -o conv again", &o)
    );
    assert!(o.stdout.is_empty(), "refused before reading anything");
    assert_eq!(std::fs::read(&conv).unwrap(), first, "not converted twice");

    // An empty file, or a device, is fine.
    let empty = d.join("empty.ndjson");
    std::fs::write(&empty, "").unwrap();
    let o = run(&[
        "analyze",
        log_s,
        "--view",
        "none",
        "-o",
        empty.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", show("analyze -o empty", &o));
    assert_eq!(std::fs::read(&empty).unwrap(), first);
    let o = run(&["analyze", log_s, "--view", "none", "-o", "/dev/null"]);
    assert!(o.status.success(), "{}", show("analyze -o /dev/null", &o));
}

/// `-o -` is stdout, as in live mode; the report then goes to stderr, out of the records' way.
#[test]
fn analyze_o_dash_writes_the_records_to_stdout() {
    let d = tmpdir("analyze-o-dash");
    let log = d.join("log.ndjson");
    std::fs::write(&log, two_transitions()).unwrap();
    let o = Command::new(BIN)
        .args(["analyze", log.to_str().unwrap(), "-o", "-"])
        .current_dir(&d)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show("analyze -o -", &o));
    assert!(!d.join("-").exists(), "no file named -");
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert_eq!(
        records.iter().filter(|v| v["type"] == "transition").count(),
        2,
        "{}",
        show("analyze -o -", &o)
    );
    assert_eq!(records.last().unwrap()["type"], "summary");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("2 lines, 2 transitions"),
        "{}",
        show("analyze -o -", &o)
    );
}

/// A conversion that could not be written is a failure, said once, in analyze's terms.
#[test]
fn analyze_o_to_a_full_disk_fails_and_says_output_was_lost() {
    let d = tmpdir("analyze-o-full");
    let log = d.join("log.ndjson");
    std::fs::write(&log, two_transitions()).unwrap();
    let o = run(&[
        "analyze",
        log.to_str().unwrap(),
        "--view",
        "none",
        "-o",
        "/dev/full",
    ]);
    let cmd = "analyze -o /dev/full";
    assert_eq!(o.status.code(), Some(1), "{}", show(cmd, &o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("tracing"), "{}", show(cmd, &o));
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("tcptrace: ")
            && last.contains("/dev/full")
            && last.contains("could not be written"),
        "{}",
        show(cmd, &o)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("2 lines, 2 transitions"));
}

/// The recorded run's losses survive a replay and a conversion (binary and back, two runs'
/// logs concatenated): the report says them, and the converted summary carries them.
#[test]
fn analyze_keeps_the_recorded_runs_losses() {
    let d = tmpdir("analyze-loss");
    let summary = |n: u64| {
        format!(
            r#"{{"type":"summary","schema":1,"transitions":2,"lost":{n},"loss":{{"ringbuf_full":{n},"recursion_misses":0,"read_errors":0,"decode_errors":0,"other_events_lost":3,"timewait_hook_misses":0}},"duration_ns":5,"engine":{{}},"ringbuf_full":{n},"recursion_misses":0,"read_errors":0}}"#
        )
    };
    let start = |pid: u32| {
        format!(
            r#"{{"type":"start","schema":1,"ts_ns":500,"time":"2026-01-01T00:00:00.0000005Z","version":"0.1.0","pid":{pid},"host":"h","boot_id":"b"}}"#
        )
    };
    let log = d.join("log.ndjson");
    std::fs::write(
        &log,
        format!(
            "{}\n{}{}\n{}\n{}{}\n",
            start(7),
            two_transitions(),
            summary(200),
            start(8),
            two_transitions(),
            summary(300)
        ),
    )
    .unwrap();
    let cap = d.join("cap.bin");
    let o = run(&[
        "analyze",
        log.to_str().unwrap(),
        "--view",
        "none",
        "-o",
        cap.to_str().unwrap(),
        "--format",
        "binary",
    ]);
    assert!(o.status.success(), "{}", show("analyze -o cap.bin", &o));
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(
        report.contains("the recorded runs (2) lost 500 transitions (ringbuf_full 500)"),
        "{}",
        show("analyze -o cap.bin", &o)
    );
    let back = d.join("back.ndjson");
    let o = run(&[
        "analyze",
        cap.to_str().unwrap(),
        "--view",
        "none",
        "-o",
        back.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "{}",
        show("analyze cap.bin -o back", &o)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .contains("the recorded run lost 500 transitions (ringbuf_full 500)"),
        "{}",
        show("analyze cap.bin -o back", &o)
    );
    let lines = ndjson_lines(&back);
    let s = lines.last().unwrap();
    assert_eq!(s["type"], "summary");
    assert_eq!(s["lost"], 500);
    assert_eq!(s["loss"]["ringbuf_full"], 500);
    assert_eq!(s["loss"]["other_events_lost"], 6);
    assert_eq!(s["ringbuf_full"], 500);
    // The two recorded runs lasted 5 ns each.
    assert_eq!(s["duration_ns"], 10);
    // Each run's start is kept where it was.
    let starts: Vec<_> = lines.iter().filter(|v| v["type"] == "start").collect();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_eq!(
        (&lines[0]["pid"], &starts[1]["pid"]),
        (&7.into(), &8.into())
    );
    assert_eq!(lines.iter().filter(|v| v["type"] == "summary").count(), 1);
}

#[test]
fn analyze_without_a_log_on_a_terminal_says_so_instead_of_waiting() {
    // `script` gives the command a terminal on stdin (util-linux, like setpriv above).
    let o = Command::new("script")
        .args(["-qec", &format!("{BIN} analyze"), "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script (util-linux)");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !o.status.success(),
        "{}",
        show("script … tcptrace analyze", &o)
    );
    assert!(
        out.contains("tcptrace: analyze needs a log: give its path"),
        "{}",
        show("script … tcptrace analyze", &o)
    );
}
