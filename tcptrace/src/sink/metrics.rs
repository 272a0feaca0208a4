//! The metrics sink: every engine output, the kernel's loss counters and the engine's
//! gauges as Prometheus/OpenMetrics metrics (prometheus-client registry and text encoding),
//! served by [`crate::metrics_http`].
//!
//! Wiring (the CLI's `--metrics ADDR` and the live loop):
//! ```ignore
//! let metrics = Arc::new(Metrics::new());
//! // Before loading the tracer, so a taken port fails fast with one sentence:
//! let server = crate::metrics_http::bind(addr, Arc::clone(&metrics))?;
//! tokio::spawn(server.run());
//! sinks.push(Box::new(Arc::clone(&metrics))); // Arc<Metrics> is a Sink
//! // In the live loop, once per second (next to `pipeline.tick`):
//! let k = tracer.counters();
//! let loss = Loss { ringbuf_full: k.ringbuf_full, recursion_misses: k.recursion_misses,
//!                   read_errors: k.read_errors, decode_errors,
//!                   other_events_lost: k.ringbuf_full_other };
//! metrics.observe_kernel(&loss, k.submitted, k.deferred);
//! metrics.observe_engine(&pipeline.engine().stats(), &pipeline.engine().current_state_counts());
//! ```
//!
//! Hot path: `record` runs for every transition, so each label set is resolved once (at
//! construction, or on its first use through a `OnceLock`) and an event costs one atomic
//! add, plus one uncontended histogram lock when the time in the old state is known. No
//! label is per connection, port, pid or address: every family has a fixed, small set.

use std::borrow::Cow;
use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::engine::{CloseKind, EngineStats, LifecycleRecord, Output, Role, TransitionRecord};
use crate::event::TcpState;
use crate::rules::{Alert, AlertStatus, RulesConfig, default_rules};
use crate::sink::{Loss, RunSummary, SCHEMA_VERSION, Sink};

/// Indexed by kernel state number (1..=13; 0 unused).
const STATES: usize = 14;
/// The states `netstat -ant` shows (kernel numbers 1..=11): the `tcptrace_connections` set.
const NETSTAT_STATES: usize = 11;
/// Time-in-state buckets, seconds: 100 µs (a loopback handshake) to 1 h (an idle
/// keep-alive or a leaked CLOSE_WAIT).
pub const TIME_IN_STATE_BUCKETS: [f64; 23] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];
/// Handshake buckets, seconds: 50 µs (loopback) to 10 s (several SYN retransmissions).
pub const HANDSHAKE_BUCKETS: [f64; 17] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];
/// Distinct `rule` label values at most (a replayed log could name any rule); the rest
/// are counted under `rule="other"`.
const MAX_RULE_LABELS: usize = 32;
/// Findings tracked as active at most; beyond this a firing finding is counted in
/// `tcptrace_alerts_total` but not in `tcptrace_alerts_active`. Rules cap their own keys
/// far below this; the cap only guards the gauge's memory against a rule that never resolves.
const MAX_ACTIVE_FINDINGS: usize = 65_536;
const ROLES: [&str; 3] = ["active_open", "passive_open", "unknown"];

type Pair = [(&'static str, &'static str); 2];
type One = [(&'static str, &'static str); 1];
type RuleLabel = [(&'static str, Cow<'static, str>); 1];
type HistogramFamily = Family<One, Histogram, fn() -> Histogram>;
type U64Gauge = Gauge<u64, AtomicU64>;

fn state_name(n: usize) -> &'static str {
    TcpState::from_kernel(n as u8).map_or("UNKNOWN", TcpState::name)
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Raises a counter that mirrors a running total kept elsewhere (kernel, engine). Never
/// lowers it: an OpenMetrics counter only goes up.
fn mirror(c: &Counter, total: u64) {
    c.inner().fetch_max(total, Ordering::Relaxed);
}

/// All tcptrace metrics. Shared (`Arc`) between the sink in the pipeline and the HTTP
/// server; every method takes `&self`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    transitions: Family<Pair, Counter>,
    by_pair: [[OnceLock<Counter>; STATES]; STATES],
    time_in_state: HistogramFamily,
    by_state_left: [OnceLock<Histogram>; STATES],
    handshake: HistogramFamily,
    by_role: [OnceLock<Histogram>; ROLES.len()],
    closed: [Counter; CloseKind::COUNT],
    connections: [U64Gauge; NETSTAT_STATES],
    lost: [Counter; Loss::CAUSES.len()],
    received: Counter,
    deferred: Counter,
    other_lost: Counter,
    tw_misses: Counter,
    tracked: U64Gauge,
    evicted: Counter,
    vanished: Counter,
    alerts: Mutex<AlertBook>,
    /// Size of the last encoding, to allocate the next one at once.
    last_len: AtomicUsize,
}

/// Alerts are rare (a few per finding), so a lock and a set lookup per alert are fine.
#[derive(Debug)]
struct AlertBook {
    raised: Family<RuleLabel, Counter>,
    active: Family<RuleLabel, Gauge>,
    rules: HashSet<Cow<'static, str>>,
    /// Findings firing now, by (rule label, key).
    findings: HashSet<(Cow<'static, str>, String)>,
}

impl AlertBook {
    /// The `rule` label for a rule name: itself while under the cap, else "other".
    fn label(&mut self, rule: Cow<'static, str>) -> Cow<'static, str> {
        if let Some(known) = self.rules.get(&*rule) {
            return known.clone();
        }
        if self.rules.len() < MAX_RULE_LABELS {
            self.rules.insert(rule.clone());
            return rule;
        }
        Cow::Borrowed("other")
    }

    fn observe(&mut self, a: &Alert) {
        let rule = self.label(a.rule.clone());
        let labels = [("rule", rule.clone())];
        match a.status {
            AlertStatus::Firing => {
                self.raised.get_or_create(&labels).inc();
                let at_cap = self.findings.len() >= MAX_ACTIVE_FINDINGS;
                if !at_cap && self.findings.insert((rule, a.key.clone())) {
                    self.active.get_or_create(&labels).inc();
                }
            }
            // An update is the same finding growing: still one active finding.
            AlertStatus::Update => {}
            AlertStatus::Resolved => {
                if self.findings.remove(&(rule, a.key.clone())) {
                    self.active.get_or_create(&labels).dec();
                }
            }
        }
    }
}

/// `tcptrace_output_write_errors_total`, read from [`crate::output::WRITE_ERRORS`] at
/// each scrape so it is current without the live loop's help.
#[derive(Debug)]
struct WriteErrors;

impl Collector for WriteErrors {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let n = crate::output::WRITE_ERRORS.load(Ordering::Relaxed);
        let c = ConstCounter::new(n);
        let help = "Failed writes, rotations or reopens of the --output file (tracing goes on).";
        c.encode(encoder.encode_descriptor(
            "tcptrace_output_write_errors",
            help,
            None,
            c.metric_type(),
        )?)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut reg = Registry::default();
        // HELP texts end without a period: the encoder appends one.
        let transitions = Family::<Pair, Counter>::default();
        reg.register(
            "tcptrace_transitions",
            "TCP state transitions seen, by the state left and the state entered",
            transitions.clone(),
        );
        let by_state = Family::<One, U64Gauge>::default();
        let connections: [U64Gauge; NETSTAT_STATES] =
            std::array::from_fn(|i| by_state.get_or_create_owned(&[("state", state_name(i + 1))]));
        reg.register(
            "tcptrace_connections",
            "Connections tracked now, by TCP state (CLOSE is always 0; TIME_WAIT mini-sockets are not tracked)",
            by_state,
        );
        let time_in_state: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(TIME_IN_STATE_BUCKETS));
        reg.register_with_unit(
            "tcptrace_time_in_state",
            "Time a connection spent in a state before leaving it, by the state left (only when its entry was seen)",
            Unit::Seconds,
            time_in_state.clone(),
        );
        let handshake: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(HANDSHAKE_BUCKETS));
        reg.register_with_unit(
            "tcptrace_handshake",
            "Handshake time of connections whose lifecycle ended, by role: SYN_SENT to ESTABLISHED (active_open), SYN_RECV to ESTABLISHED (passive_open)",
            Unit::Seconds,
            handshake.clone(),
        );
        let by_kind = Family::<One, Counter>::default();
        let closed =
            CloseKind::ALL.map(|k| by_kind.get_or_create_owned(&[("close_kind", k.name())]));
        reg.register(
            "tcptrace_lifecycles_closed",
            "Connections that reached CLOSE, by how they closed (see the README for each kind)",
            by_kind,
        );
        let by_cause = Family::<One, Counter>::default();
        let lost = Loss::CAUSES.map(|c| by_cause.get_or_create_owned(&[("cause", c)]));
        reg.register(
            "tcptrace_events_lost",
            "Events that never reached the engine, by cause: ringbuf_full (the reader fell behind), recursion_misses (the kernel skipped the program), read_errors (reading the tracepoint failed), decode_errors (undecodable bytes)",
            by_cause,
        );
        let received = Counter::default();
        reg.register(
            "tcptrace_events_received",
            "Events the kernel program delivered into the ring buffer",
            received.clone(),
        );
        let deferred = Counter::default();
        reg.register(
            "tcptrace_events_deferred",
            "Connection ends (X to CLOSE) that found the ring buffer full and were delivered late through the kernel's overflow queue (not lost; a sign of overload)",
            deferred.clone(),
        );
        let other_lost = Counter::default();
        reg.register(
            "tcptrace_other_events_lost",
            "Accept, TIME_WAIT-handoff and vanished events (no state change, so not in tcptrace_events_lost) dropped by a full ring buffer, and accept-program runs the kernel skipped: each costs a socket its owner, its timewait follow-up or its retirement",
            other_lost.clone(),
        );
        let tw_misses = Counter::default();
        reg.register(
            "tcptrace_timewait_hook_misses",
            "Timer-hook runs the kernel skipped (another BPF program ran on that CPU): each may have been a timewait socket's step or end, most were other timers' (a bound, not a count)",
            tw_misses.clone(),
        );
        let tracked = U64Gauge::default();
        reg.register(
            "tcptrace_connections_tracked",
            "Connections (listeners included) the engine tracks now",
            tracked.clone(),
        );
        let evicted = Counter::default();
        reg.register(
            "tcptrace_connections_evicted",
            "Connections dropped while open to stay under --max-connections",
            evicted.clone(),
        );
        let vanished = Counter::default();
        reg.register(
            "tcptrace_connections_vanished",
            "Connections retired because their socket was gone while their end was never seen (a lost transition)",
            vanished.clone(),
        );
        let alerts = AlertBook {
            raised: Family::default(),
            active: Family::default(),
            rules: HashSet::new(),
            findings: HashSet::new(),
        };
        reg.register(
            "tcptrace_alerts",
            "Findings raised (alerts with status firing), by rule",
            alerts.raised.clone(),
        );
        reg.register(
            "tcptrace_alerts_active",
            "Findings firing now (raised and not yet resolved), by rule",
            alerts.active.clone(),
        );
        reg.register_collector(Box::new(WriteErrors));
        reg.register(
            "tcptrace_build",
            "tcptrace's version and the version of its NDJSON/CSV schema",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION").to_string()),
                ("schema_version", SCHEMA_VERSION.to_string()),
            ]),
        );
        let m = Metrics {
            registry: reg,
            transitions,
            by_pair: [const { [const { OnceLock::new() }; STATES] }; STATES],
            time_in_state,
            by_state_left: [const { OnceLock::new() }; STATES],
            handshake,
            by_role: [const { OnceLock::new() }; ROLES.len()],
            closed,
            connections,
            lost,
            received,
            deferred,
            other_lost,
            tw_misses,
            tracked,
            evicted,
            vanished,
            alerts: Mutex::new(alerts),
            last_len: AtomicUsize::new(8 << 10),
        };
        // Series that exist from the start read 0 rather than "no data", so rate() and
        // dashboards work before the first event: every legal transition, every rule.
        for from in TcpState::ALL {
            for to in TcpState::ALL {
                if crate::engine::is_legal(from, to) {
                    m.transition(from as usize, to as usize);
                }
            }
        }
        {
            let mut book = m.alerts.lock().unwrap_or_else(|e| e.into_inner());
            for r in default_rules(&RulesConfig::default()) {
                let labels = [("rule", book.label(Cow::Borrowed(r.name())))];
                drop(book.raised.get_or_create(&labels));
                drop(book.active.get_or_create(&labels));
            }
        }
        m
    }

    fn transition(&self, from: usize, to: usize) -> &Counter {
        self.by_pair[from][to].get_or_init(|| {
            let labels = [("from", state_name(from)), ("to", state_name(to))];
            self.transitions.get_or_create_owned(&labels)
        })
    }

    /// Feeds one engine output (what the `Sink` impl calls).
    pub fn observe(&self, out: &Output) {
        match out {
            Output::Transition(rec) => self.observe_transition(rec),
            Output::Lifecycle(lc) => self.observe_lifecycle(lc),
            Output::Alert(a) => self
                .alerts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .observe(a),
        }
    }

    fn observe_transition(&self, rec: &TransitionRecord) {
        if rec.t.kind != crate::event::EventKind::State {
            // accept() and timewait handoffs change no state.
            return;
        }
        let (from, to) = (rec.t.old as usize, rec.t.new as usize);
        self.transition(from, to).inc();
        if let Some(ns) = rec.in_old_state_ns {
            let h = self.by_state_left[from].get_or_init(|| {
                self.time_in_state
                    .get_or_create_owned(&[("state", state_name(from))])
            });
            h.observe(seconds(ns));
        }
    }

    fn observe_lifecycle(&self, lc: &LifecycleRecord) {
        if let Some(kind) = lc.close_kind {
            self.closed[kind.index()].inc();
        }
        if let Some(ns) = lc.handshake_ns {
            let role = match lc.role {
                Role::ActiveOpen => 0,
                Role::PassiveOpen => 1,
                Role::Listener | Role::Unknown => 2,
            };
            let h = self.by_role[role]
                .get_or_init(|| self.handshake.get_or_create_owned(&[("role", ROLES[role])]));
            h.observe(seconds(ns));
        }
    }

    /// Kernel-side totals since the tracer started (call about once per second): events
    /// lost by cause, and events the program submitted to the ring buffer.
    pub fn observe_kernel(&self, loss: &Loss, submitted: u64, deferred: u64) {
        self.observe_loss(loss);
        mirror(&self.received, submitted);
        mirror(&self.deferred, deferred);
    }

    fn observe_loss(&self, loss: &Loss) {
        for (c, n) in self.lost.iter().zip(loss.causes()) {
            mirror(c, n);
        }
        mirror(&self.other_lost, loss.other_events_lost);
        mirror(&self.tw_misses, loss.timewait_hook_misses);
    }

    /// The engine's gauges (call about once per second): `stats` from `Engine::stats`,
    /// `state_counts` from `Engine::current_state_counts` (indexed by kernel state number).
    pub fn observe_engine(&self, stats: &EngineStats, state_counts: &[u64; 14]) {
        self.tracked.set(stats.tracked);
        mirror(&self.evicted, stats.evicted);
        mirror(&self.vanished, stats.vanished);
        for (g, n) in self.connections.iter().zip(&state_counts[1..]) {
            g.set(*n);
        }
    }

    /// The end of a run: the final loss totals (the engine is empty by then).
    fn observe_summary(&self, s: &RunSummary) {
        self.observe_loss(&s.loss);
        mirror(&self.evicted, s.engine.evicted);
        mirror(&self.vanished, s.engine.vanished);
    }

    /// The OpenMetrics text exposition of every metric, `# EOF` included.
    pub fn encode(&self) -> String {
        let mut s = String::with_capacity(self.last_len.load(Ordering::Relaxed) + 1024);
        // Writing to a String cannot fail, and every metric here encodes.
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("encoding metrics into a String");
        self.last_len.store(s.len(), Ordering::Relaxed);
        s
    }
}

/// The form the pipeline holds: the HTTP server keeps another `Arc` to the same metrics.
impl Sink for Arc<Metrics> {
    fn record(&mut self, out: &Output) -> io::Result<()> {
        Metrics::observe(self, out);
        Ok(())
    }

    fn summary(&mut self, s: &RunSummary) -> io::Result<()> {
        self.observe_summary(s);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testkit::{MS, S, Sock, task};
    use crate::engine::{Engine, EngineConfig};
    use crate::event::TcpState::*;
    use crate::pipeline::Pipeline;
    use prometheus_parse::{Sample, Scrape, Value};

    /// Encodes and parses with an independent Prometheus text parser.
    fn scrape(m: &Metrics) -> Scrape {
        let text = m.encode();
        assert!(
            text.ends_with("# EOF\n"),
            "OpenMetrics ends with # EOF:\n{text}"
        );
        Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parse the exposition")
    }

    fn labels_match(s: &Sample, labels: &[(&str, &str)]) -> bool {
        s.labels.len() == labels.len() && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
    }

    fn find<'a>(sc: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
        let mut hits = sc
            .samples
            .iter()
            .filter(|s| s.metric == name && labels_match(s, labels));
        let first = hits.next();
        assert!(hits.next().is_none(), "{name}{labels:?} appears twice");
        first
    }

    /// A counter's or gauge's value; panics if the series is absent.
    fn value(sc: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
        match find(sc, name, labels).map(|s| &s.value) {
            Some(Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v)) => *v,
            other => panic!("{name}{labels:?}: {other:?}"),
        }
    }

    /// A histogram's (upper bound, cumulative count) pairs.
    fn buckets(sc: &Scrape, name: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
        match find(sc, name, labels).map(|s| &s.value) {
            Some(Value::Histogram(b)) => b.iter().map(|h| (h.less_than, h.count)).collect(),
            other => panic!("{name}{labels:?}: {other:?}"),
        }
    }

    fn bucket(b: &[(f64, f64)], le: f64) -> f64 {
        b.iter()
            .find(|(l, _)| *l == le)
            .unwrap_or_else(|| panic!("no bucket le={le} in {b:?}"))
            .1
    }

    fn series(sc: &Scrape, name: &str) -> usize {
        sc.samples.iter().filter(|s| s.metric == name).count()
    }

    /// A client connection closed first by this side, through the real engine and the
    /// `Arc<Metrics>` sink in a pipeline, as live tracing runs it.
    fn traced_client() -> Arc<Metrics> {
        let metrics = Arc::new(Metrics::new());
        let sink: Box<dyn Sink> = Box::new(Arc::clone(&metrics));
        let mut p = Pipeline::new(Engine::new(EngineConfig::default()), vec![sink]);
        let c = Sock::new(1, "10.0.0.1:40000", "10.0.0.2:80", task(10, "curl"));
        let path = c.path(
            Close,
            &[
                (S, SynSent),
                (S + MS, Established),
                (3 * S + MS, FinWait1),
                (3 * S + 2 * MS, FinWait2),
                (3 * S + 3 * MS, Close),
            ],
        );
        for t in &path {
            p.feed(t).expect("the metrics sink never fails");
        }
        metrics
    }

    #[test]
    fn one_client_connection_gives_exact_counts_and_timings() {
        let metrics = traced_client();
        let sc = scrape(&metrics);
        let t = "tcptrace_transitions_total";
        for (from, to) in [
            ("CLOSE", "SYN_SENT"),
            ("SYN_SENT", "ESTABLISHED"),
            ("ESTABLISHED", "FIN_WAIT1"),
            ("FIN_WAIT1", "FIN_WAIT2"),
            ("FIN_WAIT2", "CLOSE"),
        ] {
            assert_eq!(
                value(&sc, t, &[("from", from), ("to", to)]),
                1.0,
                "{from}->{to}"
            );
        }
        // Legal pairs exist from the start; an illegal one only once seen.
        assert_eq!(
            value(&sc, t, &[("from", "LISTEN"), ("to", "SYN_RECV")]),
            0.0
        );
        assert!(find(&sc, t, &[("from", "LISTEN"), ("to", "ESTABLISHED")]).is_none());

        let tis = "tcptrace_time_in_state_seconds";
        let est = buckets(&sc, tis, &[("state", "ESTABLISHED")]);
        assert_eq!(est.len(), TIME_IN_STATE_BUCKETS.len() + 1, "+Inf included");
        assert_eq!(
            (
                bucket(&est, 1.0),
                bucket(&est, 2.5),
                bucket(&est, f64::INFINITY)
            ),
            (0.0, 1.0, 1.0)
        );
        let syn = buckets(&sc, tis, &[("state", "SYN_SENT")]);
        assert_eq!(
            (bucket(&syn, 0.0005), bucket(&syn, 0.001)),
            (0.0, 1.0),
            "le is inclusive"
        );
        assert_eq!(
            value(&sc, &format!("{tis}_count"), &[("state", "FIN_WAIT1")]),
            1.0
        );
        assert_eq!(
            value(&sc, &format!("{tis}_sum"), &[("state", "ESTABLISHED")]),
            2.0
        );
        // CLOSE's entry is never seen (first sight), so it has no time-in-state series.
        assert!(find(&sc, tis, &[("state", "CLOSE")]).is_none());

        let hs = "tcptrace_handshake_seconds";
        let active = buckets(&sc, hs, &[("role", "active_open")]);
        assert_eq!(active.len(), HANDSHAKE_BUCKETS.len() + 1);
        assert_eq!(
            (bucket(&active, 0.0005), bucket(&active, 0.001)),
            (0.0, 1.0)
        );
        assert_eq!(
            value(&sc, &format!("{hs}_sum"), &[("role", "active_open")]),
            0.001
        );
        assert!(find(&sc, hs, &[("role", "passive_open")]).is_none());

        let lc = "tcptrace_lifecycles_closed_total";
        assert_eq!(value(&sc, lc, &[("close_kind", "active_close")]), 1.0);
        for k in CloseKind::ALL
            .iter()
            .filter(|k| **k != CloseKind::ActiveClose)
        {
            assert_eq!(value(&sc, lc, &[("close_kind", k.name())]), 0.0, "{k:?}");
        }
        assert_eq!(series(&sc, lc), CloseKind::COUNT);
    }

    fn alert(rule: &'static str, status: AlertStatus, key: &str) -> Output {
        Output::Alert(Alert::new(rule, status, 0, key.into(), String::new(), ""))
    }

    #[test]
    fn alerts_count_findings_raised_and_active() {
        use AlertStatus::*;
        let m = Metrics::new();
        for o in [
            alert("stuck_close_wait", Firing, "pid=1"),
            alert("stuck_close_wait", Update, "pid=1"),
            alert("stuck_close_wait", Firing, "pid=2"),
            alert("stuck_close_wait", Update, "pid=2"),
            alert("stuck_close_wait", Resolved, "pid=1"),
            alert("stuck_close_wait", Resolved, "pid=9"), // never fired: no effect
            alert("failed_connect", Firing, "peer=10.0.0.9:6379"),
            alert("failed_connect", Resolved, "peer=10.0.0.9:6379"),
            alert("failed_connect", Firing, "peer=10.0.0.9:6379"),
        ] {
            m.observe(&o);
        }
        let sc = scrape(&m);
        let (raised, active) = ("tcptrace_alerts_total", "tcptrace_alerts_active");
        assert_eq!(value(&sc, raised, &[("rule", "stuck_close_wait")]), 2.0);
        assert_eq!(value(&sc, active, &[("rule", "stuck_close_wait")]), 1.0);
        assert_eq!(value(&sc, raised, &[("rule", "failed_connect")]), 2.0);
        assert_eq!(value(&sc, active, &[("rule", "failed_connect")]), 1.0);
        // Every rule has its series from the start.
        assert_eq!(value(&sc, raised, &[("rule", "reset_surge")]), 0.0);
        assert_eq!(value(&sc, active, &[("rule", "syn_backlog")]), 0.0);
        let rules = default_rules(&RulesConfig::default()).len();
        assert_eq!((series(&sc, raised), series(&sc, active)), (rules, rules));
    }

    #[test]
    fn rule_labels_stay_bounded_whatever_a_replayed_log_names() {
        let m = Metrics::new();
        let rules = default_rules(&RulesConfig::default()).len();
        let names = 100;
        for i in 0..names {
            let mut a = Alert::new("x", AlertStatus::Firing, 0, "k".into(), String::new(), "");
            a.rule = Cow::Owned(format!("made_up_{i}"));
            m.observe(&Output::Alert(a));
        }
        let sc = scrape(&m);
        let raised = "tcptrace_alerts_total";
        assert_eq!(
            series(&sc, raised),
            MAX_RULE_LABELS + 1,
            "the cap plus rule=\"other\""
        );
        let named = MAX_RULE_LABELS - rules;
        assert_eq!(value(&sc, raised, &[("rule", "made_up_0")]), 1.0);
        assert_eq!(
            value(&sc, raised, &[("rule", "other")]),
            (names - named) as f64
        );
        assert_eq!(
            value(&sc, "tcptrace_alerts_active", &[("rule", "other")]),
            1.0,
            "one (other, k)"
        );
    }

    #[test]
    fn kernel_and_engine_figures_become_counters_and_gauges() {
        let m = Metrics::new();
        let loss = Loss {
            ringbuf_full: 5,
            recursion_misses: 1,
            read_errors: 0,
            decode_errors: 2,
            other_events_lost: 4,
            timewait_hook_misses: 8,
        };
        m.observe_kernel(&loss, 100, 6);
        // A counter never goes down, even if handed a smaller total.
        m.observe_kernel(&Loss::default(), 90, 0);
        let stats = EngineStats {
            tracked: 7,
            evicted: 3,
            vanished: 5,
            ..EngineStats::default()
        };
        let mut counts = [0u64; 14];
        counts[Established as usize] = 4;
        counts[CloseWait as usize] = 2;
        counts[Listen as usize] = 1;
        counts[NewSynRecv as usize] = 9; // not one of netstat's states: not exported
        m.observe_engine(&stats, &counts);
        let before = crate::output::WRITE_ERRORS.fetch_add(2, Ordering::Relaxed);
        let sc = scrape(&m);

        let lost = "tcptrace_events_lost_total";
        for (cause, n) in Loss::CAUSES.iter().zip([5.0, 1.0, 0.0, 2.0]) {
            assert_eq!(value(&sc, lost, &[("cause", cause)]), n, "{cause}");
        }
        assert_eq!(series(&sc, lost), 4);
        assert_eq!(value(&sc, "tcptrace_events_received_total", &[]), 100.0);
        assert_eq!(value(&sc, "tcptrace_events_deferred_total", &[]), 6.0);
        assert_eq!(value(&sc, "tcptrace_other_events_lost_total", &[]), 4.0);
        assert_eq!(value(&sc, "tcptrace_timewait_hook_misses_total", &[]), 8.0);
        assert_eq!(value(&sc, "tcptrace_connections_tracked", &[]), 7.0);
        assert_eq!(value(&sc, "tcptrace_connections_evicted_total", &[]), 3.0);
        assert_eq!(value(&sc, "tcptrace_connections_vanished_total", &[]), 5.0);
        let c = "tcptrace_connections";
        assert_eq!(value(&sc, c, &[("state", "ESTABLISHED")]), 4.0);
        assert_eq!(value(&sc, c, &[("state", "CLOSE_WAIT")]), 2.0);
        assert_eq!(value(&sc, c, &[("state", "LISTEN")]), 1.0);
        assert_eq!(value(&sc, c, &[("state", "TIME_WAIT")]), 0.0);
        assert_eq!(series(&sc, c), 11, "the eleven states netstat shows");
        assert!(find(&sc, c, &[("state", "NEW_SYN_RECV")]).is_none());
        // Other tests in this binary may bump the global too, so at least what we added.
        let w = value(&sc, "tcptrace_output_write_errors_total", &[]);
        assert!(w >= (before + 2) as f64, "{w} < {before} + 2");
    }

    #[test]
    fn every_family_is_documented_typed_and_prefixed() {
        // Histogram families show only once they have a series.
        let m = traced_client();
        let text = m.encode();
        let sc = scrape(&m);
        for s in &sc.samples {
            assert!(s.metric.starts_with("tcptrace_"), "{}", s.metric);
        }
        for (family, ty) in [
            ("tcptrace_transitions", "counter"),
            ("tcptrace_connections", "gauge"),
            ("tcptrace_time_in_state_seconds", "histogram"),
            ("tcptrace_handshake_seconds", "histogram"),
            ("tcptrace_lifecycles_closed", "counter"),
            ("tcptrace_alerts", "counter"),
            ("tcptrace_alerts_active", "gauge"),
            ("tcptrace_events_lost", "counter"),
            ("tcptrace_events_received", "counter"),
            ("tcptrace_events_deferred", "counter"),
            ("tcptrace_other_events_lost", "counter"),
            ("tcptrace_timewait_hook_misses", "counter"),
            ("tcptrace_connections_tracked", "gauge"),
            ("tcptrace_connections_evicted", "counter"),
            ("tcptrace_connections_vanished", "counter"),
            ("tcptrace_output_write_errors", "counter"),
            ("tcptrace_build", "info"),
        ] {
            assert!(
                text.contains(&format!("\n# TYPE {family} {ty}\n")),
                "# TYPE {family} {ty}"
            );
            let help = sc
                .docs
                .get(family)
                .unwrap_or_else(|| panic!("no HELP for {family}"));
            assert!(help.len() > 20, "{family}: {help}");
        }
        let info = "tcptrace_build_info";
        let labels = [
            ("version", env!("CARGO_PKG_VERSION")),
            ("schema_version", "1"),
        ];
        assert_eq!(value(&sc, info, &labels), 1.0);
    }
}
