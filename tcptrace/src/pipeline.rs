//! Engine + sinks: what live tracing, `analyze` and `demo` share. Transitions go in, the
//! engine's outputs go to every sink, in order.

use std::io;

use crate::cli::EngineArgs;
use crate::engine::{Engine, EngineConfig, Output};
use crate::event::Transition;
use crate::rules::RulesConfig;
use crate::sink::{RunStart, RunSummary, Sink};

/// An observer of every output (tests, demo, analyze's report).
type Tap = Box<dyn FnMut(&Output)>;

pub struct Pipeline {
    engine: Engine,
    outs: Vec<Output>,
    sinks: Vec<Box<dyn Sink>>,
    /// Extra observers of every output (tests, demo); called before the sinks.
    taps: Vec<Tap>,
    transitions: u64,
}

/// The kernel's tcp_fin_timeout, the default FIN_WAIT2 threshold.
pub fn kernel_fin_timeout() -> Option<std::time::Duration> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fin_timeout")
        .ok()?
        .trim()
        .parse()
        .ok()
        .map(std::time::Duration::from_secs)
}

pub fn engine_config(a: &EngineArgs) -> EngineConfig {
    let ns = |d: std::time::Duration| d.as_nanos().min(u128::from(u64::MAX)) as u64;
    let defaults = RulesConfig::default();
    let fin_wait2 = a.fin_wait2_threshold.or_else(kernel_fin_timeout).map(ns);
    EngineConfig {
        max_connections: a.max_connections,
        rules: RulesConfig {
            close_wait_after_ns: ns(a.close_wait_threshold),
            fin_wait2_after_ns: fin_wait2.unwrap_or(defaults.fin_wait2_after_ns),
            slow_connect_ns: ns(a.slow_connect_threshold),
            max_sockets: a.max_connections,
            ..defaults
        },
    }
}

impl Pipeline {
    pub fn new(engine: Engine, sinks: Vec<Box<dyn Sink>>) -> Pipeline {
        Pipeline {
            engine,
            outs: Vec::with_capacity(64),
            sinks,
            taps: Vec::new(),
            transitions: 0,
        }
    }

    pub fn tap(&mut self, f: impl FnMut(&Output) + 'static) {
        self.taps.push(Box::new(f));
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn transitions(&self) -> u64 {
        self.transitions
    }

    fn dispatch(&mut self) -> io::Result<()> {
        let mut result = Ok(());
        // By reference, then cleared: an output is a few hundred bytes, not worth moving.
        for o in &self.outs {
            for tap in &mut self.taps {
                tap(o);
            }
            for s in &mut self.sinks {
                if let Err(e) = s.record(o) {
                    result = Err(e);
                }
            }
        }
        self.outs.clear();
        result
    }

    pub fn feed(&mut self, t: &Transition) -> io::Result<()> {
        // accept() and timewait handoffs are events, not state changes.
        self.transitions += u64::from(t.kind == crate::event::EventKind::State);
        self.engine.on_transition(t, &mut self.outs);
        self.dispatch()
    }

    /// Retires the connections among `conn_ids` the engine still has (see
    /// `Engine::retire_vanished`); returns how many it retired.
    pub fn retire_vanished(&mut self, conn_ids: &[u64], now_ns: u64) -> io::Result<u64> {
        let mut n = 0;
        for &id in conn_ids {
            n += u64::from(self.engine.retire_vanished(id, now_ns, &mut self.outs));
            self.dispatch()?;
        }
        Ok(n)
    }

    /// Drops a duplicate identity (see `Engine::forget`).
    pub fn forget(&mut self, conn_id: u64, now_ns: u64) -> io::Result<()> {
        self.engine.forget(conn_id, now_ns, &mut self.outs);
        self.dispatch()
    }

    pub fn tick(&mut self, now_ns: u64) -> io::Result<()> {
        self.engine.tick(now_ns, &mut self.outs);
        self.dispatch()
    }

    /// End of input: every connection still open goes out as a lifecycle, a few
    /// thousand at a time (a million at once would hold gigabytes of records).
    pub fn finish(&mut self, now_ns: u64) -> io::Result<()> {
        self.engine.tick(now_ns, &mut self.outs);
        self.dispatch()?;
        while !self.engine.finish_some(now_ns, 4096, &mut self.outs) {
            self.dispatch()?;
        }
        self.dispatch()
    }

    pub fn flush(&mut self) -> io::Result<()> {
        let mut result = Ok(());
        for s in &mut self.sinks {
            if let Err(e) = s.flush() {
                result = Err(e);
            }
        }
        result
    }

    /// The wall clock every sink shows times by (a replay learns it from its log).
    pub fn set_clock(&mut self, clock: crate::sink::time::WallClock) {
        for s in &mut self.sinks {
            s.set_clock(clock);
        }
    }

    /// Where a run begins, to every sink, before anything else it writes.
    pub fn start(&mut self, s: &RunStart) -> io::Result<()> {
        for sink in &mut self.sinks {
            sink.start(s)?;
        }
        Ok(())
    }

    pub fn summary(&mut self, s: &RunSummary) -> io::Result<()> {
        for sink in &mut self.sinks {
            sink.summary(s)?;
        }
        self.flush()
    }
}
