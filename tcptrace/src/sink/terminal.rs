//! The human view: one aligned line per transition (alerts inline, prefixed `ALERT` so
//! they are easy to grep), or one line per finished connection, or alerts only.

use std::io::{self, Write};

use super::time::{HmsCache, WallClock, human};
use super::{RunSummary, Sink};
use crate::cli::View;
use crate::engine::{EndReason, LifecycleRecord, Output, Role, TransitionRecord};
use crate::event::EventKind;
use crate::event::Task;
use crate::rules::{Alert, AlertStatus};

/// Column widths: an IPv4 `addr:port` is at most 21 characters; IPv6 ones may overflow
/// the column (the line stays readable, only that row shifts).
const ADDR_W: usize = 23;

pub struct Terminal<W: Write> {
    out: W,
    view: View,
    clock: WallClock,
    hms: HmsCache,
    header_done: bool,
    /// The live run's one-line summary (transitions, losses); off for replays.
    summary_line: bool,
}

impl<W: Write> Terminal<W> {
    pub fn new(out: W, view: View, clock: WallClock) -> Terminal<W> {
        Terminal {
            out,
            view,
            clock,
            hms: HmsCache::default(),
            header_done: false,
            summary_line: true,
        }
    }

    /// A printer for replays: no live-run summary line (the replay prints its own report).
    pub fn for_replay(out: W, view: View) -> Terminal<W> {
        Terminal {
            summary_line: false,
            ..Terminal::new(out, view, WallClock::identity())
        }
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    /// The column header of the chosen view (printed before the first line).
    pub fn header(&mut self) -> io::Result<()> {
        self.header_done = true;
        match self.view {
            View::Transitions | View::All => writeln!(
                self.out,
                "{:<12} {:<7} {:<16} {:<ADDR_W$} {:<ADDR_W$} {:<28} {:>9}",
                "TIME", "PID", "COMM", "LOCAL", "REMOTE", "OLD -> NEW", "MS"
            ),
            View::Lifecycles => writeln!(
                self.out,
                "{:<12} {:<5} {:<7} {:<16} {:<ADDR_W$} {:<ADDR_W$} {:<18} {:>9} {:>9} {:>9}  PATH",
                "END",
                "",
                "PID",
                "COMM",
                "LOCAL",
                "REMOTE",
                "CLOSE",
                "HANDSHAKE",
                "ESTAB",
                "LIFETIME"
            ),
            View::Alerts | View::None => Ok(()),
        }
    }
}

/// `pid`, `comm` columns for an owner; unknown stays unknown (never the softirq's victim).
fn owner_cols(owner: Option<&Task>) -> (String, String) {
    match owner {
        Some(o) if o.pid != 0 => (o.pid.to_string(), o.comm.as_str().into_owned()),
        _ => ("-".into(), "(unknown)".into()),
    }
}

/// Writes one transition line (without its newline) straight into `w`: this runs for every
/// event, so no intermediate strings.
pub fn write_transition(
    w: &mut impl Write,
    clock: &WallClock,
    hms: &mut HmsCache,
    r: &TransitionRecord,
) -> io::Result<()> {
    let t = &r.t;
    hms.write(w, clock, t.ts_ns)?;
    match r.owner.as_ref() {
        Some(o) if o.pid != 0 => write!(w, " {:<7} {:<16}", o.pid, o.comm)?,
        _ => write!(w, " {:<7} {:<16}", "-", "(unknown)")?,
    }
    write!(w, " {:<ADDR_W$} {:<ADDR_W$} ", t.local, t.remote)?;
    // The events that change no state say what happened instead (same column width).
    let what = match t.kind {
        EventKind::State => {
            write!(w, "{:<12} -> {:<12} ", t.old, t.new)?;
            None
        }
        EventKind::Accept => Some("accepted in"),
        EventKind::Handoff => Some("closed, timewait"),
        EventKind::Present => Some("present at start"),
        EventKind::Vanished => Some("vanished in"),
    };
    if let Some(what) = what {
        let len = what.len() + 1 + t.new.name().len();
        write!(
            w,
            "{what} {}{:pad$} ",
            t.new,
            "",
            pad = 28usize.saturating_sub(len)
        )?;
    }
    match r.in_old_state_ns {
        Some(ns) if what.is_none() => write!(w, "{:>9.3}", ns as f64 / 1e6)?,
        _ => write!(w, "{:>9}", "-")?,
    }
    if !r.legal {
        w.write_all(b" !illegal")?;
    }
    if r.gap {
        w.write_all(b" !gap")?;
    }
    Ok(())
}

/// One transition line as a string (demo, tests).
pub fn format_transition(clock: &WallClock, r: &TransitionRecord) -> String {
    let mut out = Vec::with_capacity(128);
    write_transition(&mut out, clock, &mut HmsCache::default(), r).expect("writing to a Vec");
    String::from_utf8(out).expect("UTF-8 pieces")
}

pub fn format_alert(clock: &WallClock, a: &Alert) -> String {
    let status = match a.status {
        AlertStatus::Firing => "FIRING",
        AlertStatus::Update => "UPDATE",
        AlertStatus::Resolved => "RESOLVED",
    };
    format!(
        "ALERT {} {} {}: {} ({})",
        clock.local_hms(a.ts_ns),
        a.rule,
        status,
        a.message,
        a.explanation
    )
}

fn opt_human(ns: Option<u64>) -> String {
    ns.map(human).unwrap_or_else(|| "-".into())
}

pub fn format_lifecycle(clock: &WallClock, l: &LifecycleRecord) -> String {
    let (pid, comm) = owner_cols(l.owner.as_ref());
    let role = match l.role {
        Role::ActiveOpen => "out",
        Role::PassiveOpen => "in",
        Role::Listener => "lsn",
        Role::Unknown => "?",
    };
    let close = match (l.close_kind, l.end) {
        (Some(k), _) => k.name().to_string(),
        (None, EndReason::Closed) => "closed".into(),
        (None, e) => format!(
            "({})",
            serde_json::to_value(e)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        ),
    };
    let path: Vec<&str> = l.path.iter().map(|s| s.state.name()).collect();
    let mut flags = String::new();
    if l.partial_start {
        flags.push_str(" [present at start]");
    }
    if l.gap {
        flags.push_str(" [incomplete: events lost]");
    }
    if l.illegal {
        flags.push_str(" [illegal transition]");
    }
    format!(
        "{:<12} {:<5} {:<7} {:<16} {:<ADDR_W$} {:<ADDR_W$} {:<18} {:>9} {:>9} {:>9}  {}{flags}",
        clock.local_hms(l.end_ts_ns),
        role,
        pid,
        comm,
        l.local.to_string(),
        l.remote.to_string(),
        close,
        opt_human(l.handshake_ns),
        opt_human(l.established_ns),
        opt_human(l.lifetime_ns),
        path.join(">")
    )
}

impl<W: Write> Sink for Terminal<W> {
    fn record(&mut self, out: &Output) -> io::Result<()> {
        if !self.header_done {
            self.header()?;
        }
        let line = match (self.view, out) {
            (View::Transitions | View::All, Output::Transition(r)) => {
                write_transition(&mut self.out, &self.clock, &mut self.hms, r)?;
                return self.out.write_all(b"\n");
            }
            (View::Lifecycles | View::All, Output::Lifecycle(l)) => {
                // Connections still open at exit are not "finished" lifecycles for a human.
                if l.end == EndReason::Finished {
                    return Ok(());
                }
                format_lifecycle(&self.clock, l)
            }
            (View::Transitions | View::Alerts | View::All, Output::Alert(a)) => {
                format_alert(&self.clock, a)
            }
            _ => return Ok(()),
        };
        writeln!(self.out, "{line}")
    }

    fn set_clock(&mut self, clock: WallClock) {
        self.clock = clock;
    }

    fn summary(&mut self, s: &RunSummary) -> io::Result<()> {
        if self.view == View::None || !self.summary_line {
            return Ok(());
        }
        writeln!(
            self.out,
            "tcptrace: {} transitions seen, {} events lost (ring buffer full {}, recursion misses {}, read errors {}, undecodable {}), {} connections evicted{}{}",
            s.transitions,
            s.lost,
            s.loss.ringbuf_full,
            s.loss.recursion_misses,
            s.loss.read_errors,
            s.loss.decode_errors,
            s.engine.evicted,
            match s.loss.other_events_lost {
                0 => String::new(),
                n => format!("; {n} accept/handoff/vanished events lost"),
            },
            match s.loss.timewait_hook_misses {
                0 => String::new(),
                n => format!(
                    "; {n} timer-hook runs skipped by the kernel (timewait steps may be missing)"
                ),
            }
        )
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Comm, TcpState, Transition};

    fn record(owner: Option<Task>, in_old: Option<u64>) -> TransitionRecord {
        TransitionRecord {
            t: Transition {
                ts_ns: 0,
                conn_id: 1,
                skaddr: 0xffff_0000,
                task: Task {
                    pid: 999,
                    tid: 999,
                    comm: Comm::new("swapper/1"),
                },
                local: "127.0.0.1:40000".parse().unwrap(),
                remote: "127.0.0.1:8080".parse().unwrap(),
                old: TcpState::SynSent,
                new: TcpState::Established,
                starts_conn: false,
                midlife: false,
                cpu: 0,
                owner,
                meta: Default::default(),
                kind: Default::default(),
            },
            in_old_state_ns: in_old,
            owner,
            role: Role::ActiveOpen,
            legal: true,
            gap: false,
        }
    }

    #[test]
    fn a_transition_line_has_aligned_columns_and_state_names() {
        let clock = WallClock::identity();
        let owner = Task {
            pid: 4242,
            tid: 4242,
            comm: Comm::new("curl"),
        };
        let line = format_transition(&clock, &record(Some(owner), Some(52_000)));
        let expected_tail = format!(
            " {:<7} {:<16} {:<23} {:<23} {:<12} -> {:<12} {:>9}",
            "4242", "curl", "127.0.0.1:40000", "127.0.0.1:8080", "SYN_SENT", "ESTABLISHED", "0.052"
        );
        assert_eq!(&line[12..], expected_tail);
        // The header's columns line up with the line's.
        let mut t = Terminal::new(Vec::new(), View::Transitions, clock);
        t.header().unwrap();
        let header = String::from_utf8(t.into_inner()).unwrap();
        assert_eq!(header.find("LOCAL"), line.find("127.0.0.1:40000"));
        assert_eq!(header.find("OLD -> NEW"), line.find("SYN_SENT"));
        assert_eq!(header.trim_end().len(), line.len());
    }

    #[test]
    fn events_that_change_no_state_say_what_happened_in_the_same_columns() {
        let clock = WallClock::identity();
        let state = format_transition(&clock, &record(None, Some(52_000)));
        for (kind, old, what) in [
            (
                EventKind::Accept,
                TcpState::Established,
                "accepted in ESTABLISHED",
            ),
            (
                EventKind::Handoff,
                TcpState::FinWait2,
                "closed, timewait FIN_WAIT2",
            ),
            (
                EventKind::Present,
                TcpState::CloseWait,
                "present at start CLOSE_WAIT",
            ),
            // The longest state name: still inside the OLD -> NEW column.
            (
                EventKind::Vanished,
                TcpState::SynRecv,
                "vanished in SYN_RECV",
            ),
            (
                EventKind::Vanished,
                TcpState::CloseWait,
                "vanished in CLOSE_WAIT",
            ),
        ] {
            let mut r = record(None, Some(52_000));
            (r.t.kind, r.t.old, r.t.new) = (kind, old, old);
            let line = format_transition(&clock, &r);
            assert!(line.contains(what), "{line}");
            assert_eq!(line.len(), state.len(), "{line}\n{state}");
        }
    }

    #[test]
    fn unknown_owner_is_said_not_guessed() {
        let line = format_transition(&WallClock::identity(), &record(None, None));
        assert!(line.contains(" -       (unknown)"), "{line}");
        assert!(
            !line.contains("swapper"),
            "the softirq's task is not the owner: {line}"
        );
        assert!(
            line.trim_end().ends_with(" -"),
            "unknown time in state: {line}"
        );
    }

    #[test]
    fn views_select_what_is_printed() {
        let r = Output::Transition(record(None, Some(1)));
        let a = Output::Alert(Alert::new(
            "stuck_close_wait",
            AlertStatus::Firing,
            0,
            "pid=1".into(),
            "m".into(),
            "e",
        ));
        for (view, want_t, want_a) in [
            (View::Transitions, true, true),
            (View::Alerts, false, true),
            (View::Lifecycles, false, false),
            (View::None, false, false),
        ] {
            let mut t = Terminal::new(Vec::new(), view, WallClock::identity());
            t.header_done = true;
            t.record(&r).unwrap();
            t.record(&a).unwrap();
            let s = String::from_utf8(t.into_inner()).unwrap();
            assert_eq!(s.contains("SYN_SENT"), want_t, "{view:?}: {s}");
            assert_eq!(s.contains("ALERT"), want_a, "{view:?}: {s}");
        }
    }
}
