//! Kernel tests of the metrics endpoint: the real program traces real loopback connections
//! while `/metrics` is scraped over real HTTP and parsed with an independent Prometheus
//! text-format parser; the figures must match the engine's outputs exactly and account
//! for every connection the test made.

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use prometheus_parse::{Sample, Scrape, Value};
use tcptrace::decode::decode;
use tcptrace::engine::{Engine, EngineConfig, Output, Role};
use tcptrace::kernel::{Tracer, TracerConfig};
use tcptrace::live::{LiveOptions, run};
use tcptrace::metrics_http::{self, OPENMETRICS_CONTENT_TYPE};
use tcptrace::pipeline::Pipeline;
use tcptrace::sink::metrics::Metrics;

/// Connections each test makes.
const N: u64 = 50;

// ---- a minimal HTTP/1.1 client and the parsed exposition ----

struct Reply {
    status: u16,
    content_type: String,
    body: String,
}

fn http_get(addr: SocketAddr, path: &str) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("GET {path}: no header end in {raw:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok());
    let status = status.unwrap_or_else(|| panic!("GET {path}: bad status line in {head:?}"));
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    assert_eq!(
        header("transfer-encoding"),
        None,
        "GET {path}: expected a Content-Length body"
    );
    Reply {
        status,
        content_type: header("content-type").unwrap_or_default(),
        body: body.to_string(),
    }
}

fn scrape_text(addr: SocketAddr) -> String {
    let r = http_get(addr, "/metrics");
    assert_eq!(r.status, 200, "GET /metrics:\n{}", r.body);
    assert_eq!(r.content_type, OPENMETRICS_CONTENT_TYPE);
    assert!(
        r.body.ends_with("# EOF\n"),
        "an OpenMetrics exposition ends with # EOF:\n{}",
        r.body
    );
    r.body
}

fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parse the exposition")
}

fn find<'a>(sc: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    let mut hits = sc.samples.iter().filter(|s| {
        s.metric == name
            && s.labels.len() == labels.len()
            && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
    });
    let first = hits.next();
    assert!(hits.next().is_none(), "{name}{labels:?} appears twice");
    first
}

/// A counter's or gauge's value; 0 for a series not (yet) created.
fn value(sc: &Scrape, name: &str, labels: &[(&str, &str)]) -> u64 {
    match find(sc, name, labels).map(|s| &s.value) {
        None => 0,
        Some(Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v)) => {
            assert!(v.fract() == 0.0 && *v >= 0.0, "{name}{labels:?} = {v}");
            *v as u64
        }
        other => panic!("{name}{labels:?}: {other:?}"),
    }
}

/// The sum of a counter family over all its series.
fn sum(sc: &Scrape, name: &str) -> u64 {
    let each = sc
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match s.value {
            Value::Counter(v) | Value::Untyped(v) => v as u64,
            _ => panic!("{name}: {s:?}"),
        });
    each.sum()
}

/// A histogram's observation count, after checking its buckets are cumulative and end
/// at +Inf = `_count`.
fn histogram_count(sc: &Scrape, name: &str, labels: &[(&str, &str)]) -> u64 {
    let count = value(sc, &format!("{name}_count"), labels);
    let Some(s) = find(sc, name, labels) else {
        assert_eq!(count, 0, "{name}{labels:?} has a count but no buckets");
        return 0;
    };
    let Value::Histogram(b) = &s.value else {
        panic!("{name}{labels:?} is not a histogram: {:?}", s.value)
    };
    assert!(
        b.windows(2)
            .all(|w| w[0].less_than < w[1].less_than && w[0].count <= w[1].count),
        "{name}{labels:?}: {b:?}"
    );
    let last = b.last().expect("buckets");
    assert_eq!(
        (last.less_than, last.count),
        (f64::INFINITY, count as f64),
        "{name}{labels:?}"
    );
    count
}

const TRANSITIONS: &str = "tcptrace_transitions_total";
const CLOSED: &str = "tcptrace_lifecycles_closed_total";
const HANDSHAKE: &str = "tcptrace_handshake_seconds";
const TIME_IN_STATE: &str = "tcptrace_time_in_state_seconds";
const LOST: &str = "tcptrace_events_lost_total";
const NETSTAT_STATES: [&str; 11] = [
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
];

// ---- the traffic ----

/// N connections to one listener, each closed by the client first (the server reads EOF,
/// then closes); then the listener closes. Runs on its own thread while the test traces.
fn connections(listener: TcpListener, n: u64, halfway: impl FnOnce()) {
    let mut halfway = Some(halfway);
    for i in 0..n {
        client_closes_first(&listener);
        if i == n / 2 {
            halfway.take().expect("once")();
        }
    }
    drop(listener);
}

/// What the engine emitted, counted independently of the metrics sink (a pipeline tap):
/// everything, and the part that belongs to the test's own sockets.
#[derive(Default, Debug)]
struct Tally {
    transitions: BTreeMap<(&'static str, &'static str), u64>,
    timed_left: BTreeMap<&'static str, u64>,
    closed: BTreeMap<&'static str, u64>,
    handshakes: BTreeMap<&'static str, u64>,
    ours_transitions: BTreeMap<(&'static str, &'static str), u64>,
    ours_closed: BTreeMap<&'static str, u64>,
    ours_handshakes: BTreeMap<&'static str, u64>,
}

fn role(r: Role) -> &'static str {
    match r {
        Role::ActiveOpen => "active_open",
        Role::PassiveOpen => "passive_open",
        _ => "unknown",
    }
}

impl Tally {
    fn add(&mut self, o: &Output, port: u16) {
        let ours = |a: SocketAddr, b: SocketAddr| a.port() == port || b.port() == port;
        match o {
            Output::Transition(r) if r.t.kind != tcptrace::event::EventKind::State => {}
            Output::Transition(r) => {
                let pair = (r.t.old.name(), r.t.new.name());
                *self.transitions.entry(pair).or_default() += 1;
                if r.in_old_state_ns.is_some() {
                    *self.timed_left.entry(r.t.old.name()).or_default() += 1;
                }
                if ours(r.t.local, r.t.remote) {
                    *self.ours_transitions.entry(pair).or_default() += 1;
                }
            }
            Output::Lifecycle(lc) => {
                let mine = ours(lc.local, lc.remote);
                if let Some(k) = lc.close_kind {
                    *self.closed.entry(k.name()).or_default() += 1;
                    if mine {
                        *self.ours_closed.entry(k.name()).or_default() += 1;
                    }
                }
                if lc.handshake_ns.is_some() {
                    *self.handshakes.entry(role(lc.role)).or_default() += 1;
                    if mine {
                        *self.ours_handshakes.entry(role(lc.role)).or_default() += 1;
                    }
                }
            }
            Output::Alert(_) => {}
        }
    }

    fn ours_done(&self) -> bool {
        self.ours_closed.values().sum::<u64>() > 2 * N
    }
}

fn feed(tracer: &mut Tracer, p: &mut Pipeline, decode_errors: &mut u64) {
    tracer.drain(|bytes| match decode(bytes) {
        Ok(t) => p.feed(&t).expect("the metrics sink never fails"),
        Err(_) => *decode_errors += 1,
    });
}

/// What the live loop does once per second for the metrics.
fn observe(m: &Metrics, tracer: &Tracer, p: &Pipeline, decode_errors: u64) {
    let k = tracer.counters();
    let loss = tcptrace::live::loss(&k, decode_errors);
    m.observe_kernel(&loss, k.submitted, k.deferred);
    m.observe_engine(&p.engine().stats(), &p.engine().current_state_counts());
}

/// The test's own sockets, exactly: client, accepted child and listener paths.
fn assert_ours_exact(t: &Tally) {
    let mut want: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for pair in [
        ("CLOSE", "SYN_SENT"),
        ("SYN_SENT", "ESTABLISHED"),
        ("ESTABLISHED", "FIN_WAIT1"),
        ("FIN_WAIT1", "FIN_WAIT2"),
        ("FIN_WAIT2", "CLOSE"),
        ("LISTEN", "SYN_RECV"),
        ("SYN_RECV", "ESTABLISHED"),
        ("ESTABLISHED", "CLOSE_WAIT"),
        ("CLOSE_WAIT", "LAST_ACK"),
        ("LAST_ACK", "CLOSE"),
    ] {
        want.insert(pair, N);
    }
    want.insert(("CLOSE", "LISTEN"), 1);
    want.insert(("LISTEN", "CLOSE"), 1);
    assert_eq!(t.ours_transitions, want, "the test's sockets' transitions");
    let closed = BTreeMap::from([
        ("active_close", N),
        ("passive_close", N),
        ("listener_closed", 1),
    ]);
    assert_eq!(t.ours_closed, closed, "the test's lifecycles by close kind");
    let hs = BTreeMap::from([("active_open", N), ("passive_open", N)]);
    assert_eq!(t.ours_handshakes, hs, "the test's handshakes");
}

#[test]
fn scraped_metrics_match_the_engine_and_the_connections_made() {
    let Some(_g) = kernel_guard() else { return };
    runtime().block_on(async {
        let metrics = Arc::new(Metrics::new());
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let server =
            metrics_http::bind(loopback, Arc::clone(&metrics)).expect("bind the metrics endpoint");
        let addr = server.local_addr();
        tokio::spawn(server.run());

        let mut tracer = start_tracer();
        let mut pipeline = Pipeline::new(
            Engine::new(EngineConfig::default()),
            vec![Box::new(Arc::clone(&metrics))],
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind listener");
        let port = listener.local_addr().expect("listener addr").port();
        let tally = Rc::new(RefCell::new(Tally::default()));
        let tap = Rc::clone(&tally);
        pipeline.tap(move |o| tap.borrow_mut().add(o, port));

        // Halfway through the traffic, a scrape while the loop below is draining.
        let traffic = std::thread::spawn(move || {
            connections(listener, N, || {
                let sc = parse(&scrape_text(addr));
                assert!(!sc.samples.is_empty(), "a scrape while tracing");
            })
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut decode_errors = 0;
        while !(traffic.is_finished() && tally.borrow().ours_done()) {
            assert!(
                Instant::now() < deadline,
                "the test's connections did not all close in time (kernel: {:?}): {:?}",
                tracer.counters(),
                tally.borrow()
            );
            tracer.wait(Duration::from_millis(20)).await;
            feed(&mut tracer, &mut pipeline, &mut decode_errors);
            observe(&metrics, &tracer, &pipeline, decode_errors);
        }
        traffic.join().expect("the traffic thread panicked");
        feed(&mut tracer, &mut pipeline, &mut decode_errors);
        // The kernel bumps `submitted` just after the submit: let any in-flight bump land so
        // that the figure covers every event drained.
        tokio::time::sleep(Duration::from_millis(20)).await;
        observe(&metrics, &tracer, &pipeline, decode_errors);

        // Nothing is drained from here on, so the tally and the scrape see the same events.
        let text = tokio::task::spawn_blocking(move || scrape_text(addr))
            .await
            .expect("scrape");
        let sc = parse(&text);
        let t = std::mem::take(&mut *tally.borrow_mut());
        // Lost events would explain any shortfall below: say so first.
        assert_no_loss(&tracer.counters());
        assert_eq!(decode_errors, 0, "undecodable events");
        assert_ours_exact(&t);

        // The metrics equal what the engine emitted, exactly (every socket on the machine).
        for (&(from, to), &n) in &t.transitions {
            assert_eq!(
                value(&sc, TRANSITIONS, &[("from", from), ("to", to)]),
                n,
                "{from}->{to}"
            );
        }
        assert_eq!(
            sum(&sc, TRANSITIONS),
            pipeline.transitions(),
            "no transition counted twice or missed"
        );
        for (&kind, &n) in &t.closed {
            assert_eq!(value(&sc, CLOSED, &[("close_kind", kind)]), n, "{kind}");
        }
        for (&r, &n) in &t.handshakes {
            assert_eq!(
                histogram_count(&sc, HANDSHAKE, &[("role", r)]),
                n,
                "handshakes of {r}"
            );
        }
        for (&state, &n) in &t.timed_left {
            assert_eq!(
                histogram_count(&sc, TIME_IN_STATE, &[("state", state)]),
                n,
                "time in {state}"
            );
        }

        // And they account for the test's connections. At least, not exactly: other
        // traffic on the machine (usually none) adds to the same series.
        assert!(
            value(
                &sc,
                TRANSITIONS,
                &[("from", "SYN_SENT"), ("to", "ESTABLISHED")]
            ) >= N
        );
        let hs = histogram_count(&sc, HANDSHAKE, &[("role", "active_open")])
            + histogram_count(&sc, HANDSHAKE, &[("role", "passive_open")]);
        assert!(hs >= 2 * N, "{hs} handshakes for {N} connections");
        assert!(value(&sc, CLOSED, &[("close_kind", "active_close")]) >= N);
        assert!(value(&sc, CLOSED, &[("close_kind", "passive_close")]) >= N);
        assert!(value(&sc, CLOSED, &[("close_kind", "listener_closed")]) >= 1);
        assert!(histogram_count(&sc, TIME_IN_STATE, &[("state", "FIN_WAIT1")]) >= N);
        assert!(histogram_count(&sc, TIME_IN_STATE, &[("state", "CLOSE_WAIT")]) >= N);

        // Kernel and engine figures, as observed at the same moment.
        for cause in [
            "ringbuf_full",
            "recursion_misses",
            "read_errors",
            "decode_errors",
        ] {
            assert_eq!(
                value(&sc, LOST, &[("cause", cause)]),
                0,
                "events lost: {cause}"
            );
        }
        let received = value(&sc, "tcptrace_events_received_total", &[]);
        assert!(
            received >= pipeline.transitions(),
            "{received} received < {} drained",
            pipeline.transitions()
        );
        let engine = pipeline.engine();
        assert_eq!(
            value(&sc, "tcptrace_connections_tracked", &[]),
            engine.stats().tracked
        );
        assert_eq!(value(&sc, "tcptrace_connections_evicted_total", &[]), 0);
        assert_eq!(
            value(&sc, "tcptrace_connections_vanished_total", &[]),
            engine.stats().vanished
        );
        let counts = engine.current_state_counts();
        for (i, state) in NETSTAT_STATES.iter().enumerate() {
            assert_eq!(
                value(&sc, "tcptrace_connections", &[("state", state)]),
                counts[i + 1],
                "{state}"
            );
            assert!(
                find(&sc, "tcptrace_connections", &[("state", state)]).is_some(),
                "{state} series"
            );
        }

        // The other routes.
        let probe = |path: &'static str| tokio::task::spawn_blocking(move || http_get(addr, path));
        let health = probe("/healthz").await.expect("healthz");
        assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
        assert_eq!(probe("/nope").await.expect("404").status, 404);
    });
}

/// The real live loop (`tcptrace::live::run`) with the metrics sink in its pipeline: the
/// endpoint serves from the same runtime while the loop traces.
#[test]
fn the_live_loop_feeds_the_endpoint_while_tracing() {
    let Some(_g) = kernel_guard() else { return };
    runtime().block_on(async {
        let metrics = Arc::new(Metrics::new());
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let server =
            metrics_http::bind(loopback, Arc::clone(&metrics)).expect("bind the metrics endpoint");
        let addr = server.local_addr();
        tokio::spawn(server.run());
        let mut pipeline = Pipeline::new(
            Engine::new(EngineConfig::default()),
            vec![Box::new(Arc::clone(&metrics))],
        );

        // Once attached: the traffic, then scrapes until the metrics show it (or give up).
        let worker = Rc::new(RefCell::new(None));
        let slot = Rc::clone(&worker);
        let on_ready = Box::new(move || {
            let t = std::thread::spawn(move || {
                let listener = TcpListener::bind("127.0.0.1:0").expect("bind listener");
                connections(listener, N, || {});
                let deadline = Instant::now() + Duration::from_secs(4);
                loop {
                    let text = scrape_text(addr);
                    let sc = parse(&text);
                    let seen = value(
                        &sc,
                        TRANSITIONS,
                        &[("from", "SYN_SENT"), ("to", "ESTABLISHED")],
                    ) >= N
                        && value(&sc, CLOSED, &[("close_kind", "active_close")]) >= N
                        && value(&sc, CLOSED, &[("close_kind", "passive_close")]) >= N;
                    if seen || Instant::now() >= deadline {
                        return text;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
            *slot.borrow_mut() = Some(t);
        });
        let opts = LiveOptions {
            // Without TIME_WAIT, so that the active closers' lifecycles end within the run.
            tracer: TracerConfig {
                timewait: false,
                ..TracerConfig::default()
            },
            duration: Some(Duration::from_secs(5)),
            on_ready: Some(on_ready),
            drop_caps: false,
            snapshot: None,
            cgroups: Default::default(),
            metrics: Some(Arc::clone(&metrics)),
        };
        let (_, summary) = run(&mut pipeline, opts).await.expect("the live loop");
        let worker = worker.borrow_mut().take().expect("on_ready ran");
        // Lost events (other BPF programs busy on the machine) would explain any shortfall
        // below: say so first.
        assert_eq!(summary.lost, 0, "events were lost: {:?}", summary.loss);
        let sc = parse(&worker.join().expect("the traffic thread panicked"));
        // At least: other traffic on the machine (usually none) adds to the same series.
        assert!(
            value(
                &sc,
                TRANSITIONS,
                &[("from", "SYN_SENT"), ("to", "ESTABLISHED")]
            ) >= N
        );
        let hs = histogram_count(&sc, HANDSHAKE, &[("role", "active_open")])
            + histogram_count(&sc, HANDSHAKE, &[("role", "passive_open")]);
        assert!(hs >= 2 * N, "{hs} handshakes for {N} connections");
        assert!(value(&sc, CLOSED, &[("close_kind", "active_close")]) >= N);
        assert!(value(&sc, CLOSED, &[("close_kind", "passive_close")]) >= N);

        // The end-of-run summary reaches the sink too; after it, every transition the loop
        // fed is counted, and nothing was lost.
        pipeline.summary(&summary).expect("summary");
        let sc = parse(
            &tokio::task::spawn_blocking(move || scrape_text(addr))
                .await
                .expect("scrape"),
        );
        assert_eq!(
            sum(&sc, TRANSITIONS),
            summary.transitions,
            "every transition fed is counted once"
        );
        for cause in [
            "ringbuf_full",
            "recursion_misses",
            "read_errors",
            "decode_errors",
        ] {
            assert_eq!(
                value(&sc, LOST, &[("cause", cause)]),
                0,
                "events lost: {cause}"
            );
        }
    });
}
