//! Test helpers: hand-built transitions on a fake clock, and an engine harness that
//! returns each call's outputs. Shared by the engine's and the rules' tests.

use super::{Engine, EngineConfig, LifecycleRecord, Output, TransitionRecord, starts_identity};
use crate::event::{Comm, Task, TcpState, Transition};
use crate::rules::Alert;
use std::net::SocketAddr;

pub const MS: u64 = 1_000_000;
pub const S: u64 = 1_000 * MS;

pub fn task(pid: u32, comm: &str) -> Task {
    Task {
        pid,
        tid: pid,
        comm: Comm::new(comm),
    }
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad test address {s:?}: {e}"))
}

/// One socket as the tracepoint reports it: id, tuple, and the task its events carry.
#[derive(Clone, Copy, Debug)]
pub struct Sock {
    pub id: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub task: Task,
}

impl Sock {
    pub fn new(id: u64, local: &str, remote: &str, task: Task) -> Sock {
        Sock {
            id,
            local: addr(local),
            remote: addr(remote),
            task,
        }
    }

    /// A transition of this socket; `starts_conn` as the kernel side sets it.
    pub fn ev(&self, ts: u64, old: TcpState, new: TcpState) -> Transition {
        Transition {
            ts_ns: ts,
            conn_id: self.id,
            skaddr: 0xffff_0000_0000_0000 | self.id,
            task: self.task,
            local: self.local,
            remote: self.remote,
            old,
            new,
            starts_conn: starts_identity(old, new),
            midlife: false,
            cpu: 0,
            owner: None,
            meta: Default::default(),
            kind: Default::default(),
        }
    }

    /// Chains transitions: `from`→steps[0].1 at steps[0].0, then each step from the last.
    pub fn path(&self, from: TcpState, steps: &[(u64, TcpState)]) -> Vec<Transition> {
        let mut old = from;
        steps
            .iter()
            .map(|&(ts, new)| {
                let t = self.ev(ts, old, new);
                old = new;
                t
            })
            .collect()
    }
}

/// An engine plus the outputs of the last call.
pub struct Sim {
    pub engine: Engine,
}

impl Sim {
    pub fn new(cfg: EngineConfig) -> Sim {
        Sim {
            engine: Engine::new(cfg),
        }
    }

    pub fn feed(&mut self, t: &Transition) -> Vec<Output> {
        let mut out = Vec::new();
        self.engine.on_transition(t, &mut out);
        out
    }

    pub fn run(&mut self, ts: &[Transition]) -> Vec<Output> {
        let mut out = Vec::new();
        for t in ts {
            self.engine.on_transition(t, &mut out);
        }
        out
    }

    pub fn tick(&mut self, now: u64) -> Vec<Alert> {
        let mut out = Vec::new();
        self.engine.tick(now, &mut out);
        alerts(&out).into_iter().cloned().collect()
    }

    pub fn finish(&mut self, now: u64) -> Vec<Output> {
        let mut out = Vec::new();
        self.engine.finish(now, &mut out);
        out
    }
}

impl Default for Sim {
    fn default() -> Sim {
        Sim::new(EngineConfig::default())
    }
}

pub fn alerts(out: &[Output]) -> Vec<&Alert> {
    out.iter()
        .filter_map(|o| {
            if let Output::Alert(a) = o {
                Some(a)
            } else {
                None
            }
        })
        .collect()
}

/// Alerts of one rule.
pub fn alerts_of<'a>(out: &'a [Output], rule: &str) -> Vec<&'a Alert> {
    alerts(out).into_iter().filter(|a| a.rule == rule).collect()
}

pub fn lifecycles(out: &[Output]) -> Vec<&LifecycleRecord> {
    out.iter()
        .filter_map(|o| {
            if let Output::Lifecycle(l) = o {
                Some(l)
            } else {
                None
            }
        })
        .collect()
}

/// The single lifecycle in `out`.
pub fn one_lifecycle(out: &[Output]) -> &LifecycleRecord {
    let l = lifecycles(out);
    assert_eq!(l.len(), 1, "expected one lifecycle, got {l:#?}");
    l[0]
}

pub fn records(out: &[Output]) -> Vec<&TransitionRecord> {
    out.iter()
        .filter_map(|o| {
            if let Output::Transition(r) = o {
                Some(r)
            } else {
                None
            }
        })
        .collect()
}

/// The path as `STATE@ts` strings (`?` for an unseen start, `!` before a gap).
pub fn path_str(l: &LifecycleRecord) -> String {
    l.path
        .iter()
        .map(|p| {
            let gap = if p.gap_before { "!" } else { "" };
            match p.entered_ns {
                Some(ts) => format!("{gap}{}@{ts}", p.state),
                None => format!("{gap}{}@?", p.state),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
