//! NDJSON: one JSON object per line, each with a `type` (`transition`, `lifecycle`,
//! `alert`, `summary`) and the `schema` version. Transitions, the hot path, are encoded by
//! hand into a reused buffer; the rare records go through serde. [`parse_transition`]
//! reads a transition line back, for `tcptrace analyze`.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::time::{Rfc3339Cache, WallClock};
use super::{RunSummary, SCHEMA_VERSION, Sink};
use crate::engine::{Output, Role, TransitionRecord};
use crate::event::{Comm, Task, TcpState, Transition};

pub struct Ndjson<W: Write> {
    out: W,
    clock: WallClock,
    line: String,
    times: Rfc3339Cache,
}

impl<W: Write> Ndjson<W> {
    pub fn new(out: W, clock: WallClock) -> Ndjson<W> {
        Ndjson {
            out,
            clock,
            line: String::with_capacity(512),
            times: Rfc3339Cache::default(),
        }
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

fn push_json_str(buf: &mut String, s: &str) {
    buf.push('"');
    for c in s.chars() {
        match c {
            '"' => buf.push_str("\\\""),
            '\\' => buf.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(buf, "\\u{:04x}", c as u32);
            }
            c => buf.push(c),
        }
    }
    buf.push('"');
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::ActiveOpen => "active_open",
        Role::PassiveOpen => "passive_open",
        Role::Listener => "listener",
        Role::Unknown => "unknown",
    }
}

/// Appends one transition line (with its newline) to `buf`.
pub fn encode_transition(buf: &mut String, clock: &WallClock, r: &TransitionRecord) {
    encode_transition_with(buf, clock, &mut Rfc3339Cache::default(), r);
}

/// As [`encode_transition`], reusing a timestamp cache across a stream of lines.
pub fn encode_transition_with(
    buf: &mut String,
    clock: &WallClock,
    times: &mut Rfc3339Cache,
    r: &TransitionRecord,
) {
    let t = &r.t;
    let _ = write!(
        buf,
        "{{\"type\":\"transition\",\"schema\":{SCHEMA_VERSION},\"ts_ns\":{},\"time\":\"",
        t.ts_ns
    );
    times.push(clock, t.ts_ns, buf);
    let _ = write!(
        buf,
        "\",\"conn_id\":{},\"skaddr\":\"{:#x}\",\"family\":\"{}\",\"laddr\":\"{}\",\"lport\":{},\"raddr\":\"{}\",\"rport\":{},\"old\":\"{}\",\"new\":\"{}\",\"in_old_state_ns\":",
        t.conn_id,
        t.skaddr,
        if t.local.is_ipv6() { "ipv6" } else { "ipv4" },
        t.local.ip(),
        t.local.port(),
        t.remote.ip(),
        t.remote.port(),
        t.old.name(),
        t.new.name(),
    );
    match r.in_old_state_ns {
        Some(ns) => {
            let _ = write!(buf, "{ns}");
        }
        None => buf.push_str("null"),
    }
    match r.owner {
        Some(o) => {
            let _ = write!(
                buf,
                ",\"owner_pid\":{},\"owner_tid\":{},\"owner_comm\":",
                o.pid, o.tid
            );
            push_json_str(buf, &o.comm.as_str());
        }
        None => buf.push_str(",\"owner_pid\":null,\"owner_tid\":null,\"owner_comm\":null"),
    }
    // Where the owner came from: recorded by the kernel in the owner's own context, or
    // inferred by the engine (an accepted socket's listener). Replay uses only the former.
    let src = match (t.owner, r.owner) {
        (Some(_), _) => "kernel",
        (None, Some(_)) => "inferred",
        (None, None) => "unknown",
    };
    let _ = write!(
        buf,
        ",\"owner_source\":\"{src}\",\"task_pid\":{},\"task_tid\":{},\"task_comm\":",
        t.task.pid, t.task.tid
    );
    push_json_str(buf, &t.task.comm.as_str());
    let _ = writeln!(
        buf,
        ",\"role\":\"{}\",\"legal\":{},\"gap\":{},\"starts_conn\":{},\"midlife\":{},\"cpu\":{}}}",
        role_name(r.role),
        r.legal,
        r.gap,
        t.starts_conn,
        t.midlife,
        t.cpu
    );
}

/// A serde record with the `type`/`schema` envelope and `time` for humans and shippers.
#[derive(Serialize)]
struct Envelope<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'static str,
    schema: u32,
    time: String,
    #[serde(flatten)]
    record: &'a T,
}

impl<W: Write> Sink for Ndjson<W> {
    fn record(&mut self, out: &Output) -> io::Result<()> {
        self.line.clear();
        match out {
            Output::Transition(r) => {
                encode_transition_with(&mut self.line, &self.clock, &mut self.times, r)
            }
            Output::Lifecycle(l) => {
                let env = Envelope {
                    kind: "lifecycle",
                    schema: SCHEMA_VERSION,
                    time: self.clock.rfc3339(l.end_ts_ns),
                    record: l,
                };
                serde_json::to_writer(&mut self.out, &env)?;
                return self.out.write_all(b"\n");
            }
            Output::Alert(a) => {
                let env = Envelope {
                    kind: "alert",
                    schema: SCHEMA_VERSION,
                    time: self.clock.rfc3339(a.ts_ns),
                    record: a,
                };
                serde_json::to_writer(&mut self.out, &env)?;
                return self.out.write_all(b"\n");
            }
        }
        self.out.write_all(self.line.as_bytes())
    }

    fn summary(&mut self, s: &RunSummary) -> io::Result<()> {
        #[derive(Serialize)]
        struct SummaryLine<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            schema: u32,
            #[serde(flatten)]
            s: &'a RunSummary,
            /// Flattened for the tools that grep for them.
            ringbuf_full: u64,
            recursion_misses: u64,
            read_errors: u64,
        }
        serde_json::to_writer(
            &mut self.out,
            &SummaryLine {
                kind: "summary",
                schema: SCHEMA_VERSION,
                s,
                ringbuf_full: s.loss.ringbuf_full,
                recursion_misses: s.loss.recursion_misses,
                read_errors: s.loss.read_errors,
            },
        )?;
        self.out.write_all(b"\n")
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Why a log line could not be replayed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("not JSON: {0}")]
    Json(String),
    #[error("schema {0} is not supported (this tcptrace reads schema {SCHEMA_VERSION})")]
    Schema(u32),
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("unknown state {0:?}")]
    State(String),
}

#[derive(Deserialize)]
struct Line<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    schema: Option<u32>,
    ts_ns: Option<u64>,
    conn_id: Option<u64>,
    #[serde(borrow)]
    skaddr: Option<Cow<'a, str>>,
    laddr: Option<IpAddr>,
    lport: Option<u16>,
    raddr: Option<IpAddr>,
    rport: Option<u16>,
    #[serde(borrow)]
    old: Option<Cow<'a, str>>,
    #[serde(borrow)]
    new: Option<Cow<'a, str>>,
    owner_pid: Option<u32>,
    owner_tid: Option<u32>,
    #[serde(borrow)]
    owner_comm: Option<Cow<'a, str>>,
    #[serde(borrow)]
    owner_source: Option<Cow<'a, str>>,
    task_pid: Option<u32>,
    task_tid: Option<u32>,
    #[serde(borrow)]
    task_comm: Option<Cow<'a, str>>,
    starts_conn: Option<bool>,
    midlife: Option<bool>,
    cpu: Option<u32>,
}

fn state(s: Option<Cow<'_, str>>, field: &'static str) -> Result<TcpState, ParseError> {
    let s = s.ok_or(ParseError::Missing(field))?;
    TcpState::from_name(&s).ok_or_else(|| ParseError::State(s.into_owned()))
}

/// A cursor over one line in exactly the field order `encode_transition` writes.
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    fn lit(&mut self, s: &[u8]) -> Option<()> {
        let end = self.i + s.len();
        (self.b.get(self.i..end)? == s).then(|| self.i = end)
    }

    fn u64(&mut self) -> Option<u64> {
        let start = self.i;
        let mut n: u64 = 0;
        while let Some(&c) = self.b.get(self.i).filter(|c| c.is_ascii_digit()) {
            n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            self.i += 1;
        }
        (self.i > start).then_some(n)
    }

    fn opt_u64(&mut self) -> Option<Option<u64>> {
        if self.lit(b"null").is_some() {
            return Some(None);
        }
        self.u64().map(Some)
    }

    fn hex(&mut self) -> Option<u64> {
        let start = self.i;
        let mut n: u64 = 0;
        while let Some(d) = self.b.get(self.i).and_then(|c| (*c as char).to_digit(16)) {
            n = n.checked_mul(16)?.checked_add(u64::from(d))?;
            self.i += 1;
        }
        (self.i > start).then_some(n)
    }

    /// A string without escapes (anything escaped falls back to the full parser).
    fn plain_str(&mut self) -> Option<&'a str> {
        self.lit(b"\"")?;
        let start = self.i;
        while let Some(&c) = self.b.get(self.i) {
            match c {
                b'"' => {
                    let s = std::str::from_utf8(&self.b[start..self.i]).ok()?;
                    self.i += 1;
                    return Some(s);
                }
                b'\\' => return None,
                _ => self.i += 1,
            }
        }
        None
    }

    fn opt_plain_str(&mut self) -> Option<Option<&'a str>> {
        if self.lit(b"null").is_some() {
            return Some(None);
        }
        self.plain_str().map(Some)
    }

    fn bool(&mut self) -> Option<bool> {
        if self.lit(b"true").is_some() {
            Some(true)
        } else {
            self.lit(b"false").map(|()| false)
        }
    }
}

/// The fast path of [`parse_transition`]: our own lines, in our own field order, with no
/// escapes. `None` sends the line to the full parser, which accepts any valid JSON.
fn parse_own_line(line: &[u8]) -> Option<Transition> {
    let mut c = Scan { b: line, i: 0 };
    c.lit(b"{\"type\":\"transition\",\"schema\":1,\"ts_ns\":")?;
    let ts_ns = c.u64()?;
    c.lit(b",\"time\":")?;
    c.plain_str()?;
    c.lit(b",\"conn_id\":")?;
    let conn_id = c.u64()?;
    c.lit(b",\"skaddr\":\"0x")?;
    let skaddr = c.hex()?;
    c.lit(b"\",\"family\":")?;
    c.plain_str()?;
    c.lit(b",\"laddr\":")?;
    let laddr: IpAddr = c.plain_str()?.parse().ok()?;
    c.lit(b",\"lport\":")?;
    let lport = u16::try_from(c.u64()?).ok()?;
    c.lit(b",\"raddr\":")?;
    let raddr: IpAddr = c.plain_str()?.parse().ok()?;
    c.lit(b",\"rport\":")?;
    let rport = u16::try_from(c.u64()?).ok()?;
    c.lit(b",\"old\":")?;
    let old = TcpState::from_name(c.plain_str()?)?;
    c.lit(b",\"new\":")?;
    let new = TcpState::from_name(c.plain_str()?)?;
    c.lit(b",\"in_old_state_ns\":")?;
    c.opt_u64()?;
    c.lit(b",\"owner_pid\":")?;
    let owner_pid = c.opt_u64()?;
    c.lit(b",\"owner_tid\":")?;
    let owner_tid = c.opt_u64()?;
    c.lit(b",\"owner_comm\":")?;
    let owner_comm = c.opt_plain_str()?;
    c.lit(b",\"owner_source\":")?;
    let owner_source = c.plain_str()?;
    c.lit(b",\"task_pid\":")?;
    let task_pid = u32::try_from(c.u64()?).ok()?;
    c.lit(b",\"task_tid\":")?;
    let task_tid = u32::try_from(c.u64()?).ok()?;
    c.lit(b",\"task_comm\":")?;
    let task_comm = c.plain_str()?;
    c.lit(b",\"role\":")?;
    c.plain_str()?;
    c.lit(b",\"legal\":")?;
    c.bool()?;
    c.lit(b",\"gap\":")?;
    c.bool()?;
    c.lit(b",\"starts_conn\":")?;
    let starts_conn = c.bool()?;
    c.lit(b",\"midlife\":")?;
    let midlife = c.bool()?;
    c.lit(b",\"cpu\":")?;
    let cpu = u32::try_from(c.u64()?).ok()?;
    c.lit(b"}")?;
    if c.i != c.b.len() {
        return None;
    }
    let owner = match (owner_source, owner_pid) {
        ("kernel", Some(pid)) => Some(Task {
            pid: u32::try_from(pid).ok()?,
            tid: owner_tid
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(pid as u32),
            comm: Comm::new(owner_comm.unwrap_or("")),
        }),
        _ => None,
    };
    Some(Transition {
        ts_ns,
        conn_id,
        skaddr,
        task: Task {
            pid: task_pid,
            tid: task_tid,
            comm: Comm::new(task_comm),
        },
        local: SocketAddr::new(laddr, lport),
        remote: SocketAddr::new(raddr, rport),
        old,
        new,
        starts_conn,
        midlife,
        cpu,
        owner,
    })
}

/// Reads one NDJSON line: `Ok(Some)` for a transition, `Ok(None)` for the other record
/// types (lifecycles and alerts are recomputed by the replay), `Err` for anything malformed.
pub fn parse_transition(line: &str) -> Result<Option<Transition>, ParseError> {
    parse_transition_bytes(line.as_bytes())
}

/// As [`parse_transition`], on raw bytes: our own lines need no UTF-8 pass of their own
/// (the few strings in them are checked as they are read).
pub fn parse_transition_bytes(line: &[u8]) -> Result<Option<Transition>, ParseError> {
    match parse_own_line(line) {
        Some(t) => Ok(Some(t)),
        None => match std::str::from_utf8(line) {
            Ok(s) => parse_transition_json(s),
            Err(e) => Err(ParseError::Json(format!("not UTF-8 ({e})"))),
        },
    }
}

/// The full parser: any valid JSON object with the fields, in any order.
pub fn parse_transition_json(line: &str) -> Result<Option<Transition>, ParseError> {
    let l: Line<'_> = serde_json::from_str(line).map_err(|e| ParseError::Json(e.to_string()))?;
    match l.schema {
        Some(SCHEMA_VERSION) => {}
        Some(v) => return Err(ParseError::Schema(v)),
        None => return Err(ParseError::Missing("schema")),
    }
    if l.kind != "transition" {
        return Ok(None);
    }
    let skaddr = l
        .skaddr
        .as_deref()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0);
    let owner = match (l.owner_source.as_deref(), l.owner_pid) {
        (Some("kernel"), Some(pid)) => Some(Task {
            pid,
            tid: l.owner_tid.unwrap_or(pid),
            comm: Comm::new(l.owner_comm.as_deref().unwrap_or("")),
        }),
        _ => None,
    };
    Ok(Some(Transition {
        ts_ns: l.ts_ns.ok_or(ParseError::Missing("ts_ns"))?,
        conn_id: l.conn_id.ok_or(ParseError::Missing("conn_id"))?,
        skaddr,
        task: Task {
            pid: l.task_pid.unwrap_or(0),
            tid: l.task_tid.unwrap_or(0),
            comm: Comm::new(l.task_comm.as_deref().unwrap_or("")),
        },
        local: SocketAddr::new(
            l.laddr.ok_or(ParseError::Missing("laddr"))?,
            l.lport.ok_or(ParseError::Missing("lport"))?,
        ),
        remote: SocketAddr::new(
            l.raddr.ok_or(ParseError::Missing("raddr"))?,
            l.rport.ok_or(ParseError::Missing("rport"))?,
        ),
        old: state(l.old, "old")?,
        new: state(l.new, "new")?,
        starts_conn: l.starts_conn.unwrap_or(false),
        midlife: l.midlife.unwrap_or(false),
        cpu: l.cpu.unwrap_or(0),
        owner,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(owner: Option<Task>, kernel_owner: bool) -> TransitionRecord {
        TransitionRecord {
            t: Transition {
                ts_ns: 1_234,
                conn_id: 77,
                skaddr: 0xffff_8880_0000_1000,
                task: Task {
                    pid: 1,
                    tid: 2,
                    comm: Comm::new("we\"ird\\na"),
                },
                local: "[::1]:40000".parse().unwrap(),
                remote: "[::1]:8080".parse().unwrap(),
                old: TcpState::Established,
                new: TcpState::CloseWait,
                starts_conn: false,
                midlife: true,
                cpu: 1,
                owner: if kernel_owner { owner } else { None },
            },
            in_old_state_ns: Some(5_000),
            owner,
            role: Role::PassiveOpen,
            legal: true,
            gap: false,
        }
    }

    #[test]
    fn transition_lines_are_json_and_parse_back_to_the_same_transition() {
        let owner = Task {
            pid: 4242,
            tid: 4243,
            comm: Comm::new("leaky-server"),
        };
        for kernel_owner in [true, false] {
            let r = sample(Some(owner), kernel_owner);
            let mut buf = String::new();
            encode_transition(&mut buf, &WallClock::identity(), &r);
            assert!(buf.ends_with('\n') && buf.matches('\n').count() == 1);
            let v: serde_json::Value = serde_json::from_str(&buf).expect("valid JSON");
            assert_eq!(v["type"], "transition");
            assert_eq!(v["schema"], SCHEMA_VERSION);
            assert_eq!(v["laddr"], "::1");
            assert_eq!(v["new"], "CLOSE_WAIT");
            assert_eq!(v["owner_comm"], "leaky-server");
            assert_eq!(v["task_comm"], "we\"ird\\na");
            assert_eq!(v["time"], "1970-01-01T00:00:00.000001234Z");
            let back = parse_transition(&buf).unwrap().expect("a transition");
            // Only an owner the kernel recorded is replayed; an inferred one is re-derived.
            assert_eq!(back, r.t, "kernel_owner={kernel_owner}");
        }
    }

    #[test]
    fn other_record_types_are_skipped_and_bad_lines_are_errors() {
        assert_eq!(parse_transition(r#"{"type":"alert","schema":1}"#), Ok(None));
        assert!(matches!(
            parse_transition("{not json"),
            Err(ParseError::Json(_))
        ));
        assert_eq!(
            parse_transition(r#"{"type":"transition","schema":9}"#),
            Err(ParseError::Schema(9))
        );
        assert_eq!(
            parse_transition(r#"{"type":"transition"}"#),
            Err(ParseError::Missing("schema"))
        );
        let mut buf = String::new();
        encode_transition(&mut buf, &WallClock::identity(), &sample(None, false));
        let bad_state = buf.replace("\"CLOSE_WAIT\"", "\"HALF_OPEN\"");
        assert_eq!(
            parse_transition(&bad_state),
            Err(ParseError::State("HALF_OPEN".into()))
        );
        let no_port = buf.replace(",\"lport\":40000", "");
        assert_eq!(
            parse_transition(&no_port),
            Err(ParseError::Missing("lport"))
        );
    }
}
