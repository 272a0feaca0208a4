//! Reading a transition line back, for `tcptrace analyze`: a fast path for our own lines
//! (exactly the field order `encode_transition` writes, no escapes, no whitespace) and the
//! full serde parser for anything else. The fast path accepts a subset of what serde
//! accepts and reads it to the same `Transition`; whatever it is unsure of goes to serde.
//! Our own lifecycle lines are only checked for form (see `lifecycle_line`).

mod lifecycle_line;
pub(super) mod words;

use words::*;

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use crate::event::{Comm, ConnMeta, EventKind, OwnerVia, Task, TcpState, Transition};
use crate::sink::SCHEMA_VERSION;

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
    #[error("JSON, but not a tcptrace record: {0}")]
    NotRecord(String),
    #[error(
        "unknown record type {0:?} (known: start, transition, accept, handoff, present, vanished, lifecycle, alert, summary)"
    )]
    UnknownType(String),
    #[error(
        "a CSV row: CSV output cannot be replayed (record with --format ndjson or --format binary for analyze)"
    )]
    Csv,
}

/// Record types of schema 1 that carry no transition: read past.
const OTHER_RECORD_TYPES: [&str; 4] = ["start", "lifecycle", "alert", "summary"];

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
    #[serde(borrow)]
    owner_via: Option<Cow<'a, str>>,
    owner_uid: Option<u32>,
    cgroup_id: Option<u64>,
    netns: Option<u32>,
    unaccepted: Option<bool>,
    #[serde(borrow)]
    container: Option<Cow<'a, str>>,
}

fn state(s: Option<Cow<'_, str>>, field: &'static str) -> Result<TcpState, ParseError> {
    let s = s.ok_or(ParseError::Missing(field))?;
    TcpState::from_name(&s).ok_or_else(|| ParseError::State(s.into_owned()))
}

/// A cursor over one line in exactly the field order `encode_transition` writes. Every
/// reader returns None where serde might read the text differently (or reject it).
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    /// A literal of known length: compared inline as a few wide loads, not a memcmp call.
    #[inline(always)]
    fn lit<const N: usize>(&mut self, s: &[u8; N]) -> Option<()> {
        let end = self.i + N;
        let chunk: &[u8; N] = self.b.get(self.i..end)?.try_into().ok()?;
        (chunk == s).then(|| self.i = end)
    }

    /// A JSON unsigned integer: digits, no leading zero (serde rejects `01`). Eight
    /// digits at a time where the line has eight bytes left (it always does in our lines).
    #[inline(always)]
    fn u64(&mut self) -> Option<u64> {
        let b = self.b;
        let start = self.i;
        let mut i = start;
        // Unchecked arithmetic: nineteen digits cannot overflow, and longer numbers are
        // read again with checks (`end_u64`), which keeps the common case branch-free.
        let mut n: u64 = 0;
        while let Some(chunk) = b.get(i..i + 8) {
            let (count, value) = swar_digits(u64::from_le_bytes(chunk.try_into().ok()?));
            n = n.wrapping_mul(POW10[count]).wrapping_add(u64::from(value));
            i += count;
            if count < 8 {
                return self.end_u64(start, i, n);
            }
        }
        while let Some(&c) = b.get(i) {
            let d = c.wrapping_sub(b'0');
            if d > 9 {
                break;
            }
            n = n.wrapping_mul(10).wrapping_add(u64::from(d));
            i += 1;
        }
        self.end_u64(start, i, n)
    }

    #[inline(always)]
    fn end_u64(&mut self, start: usize, end: usize, n: u64) -> Option<u64> {
        let len = end - start;
        if len == 0 || (self.b[start] == b'0' && len > 1) {
            return None;
        }
        let n = if len > 19 {
            checked_decimal(&self.b[start..end])?
        } else {
            n
        };
        self.i = end;
        Some(n)
    }

    /// A JSON unsigned integer whose value nobody reads: only its form is checked, as
    /// the full parser checks an ignored number's (any length; no leading zero).
    #[inline(always)]
    fn skip_uint(&mut self) -> Option<()> {
        let b = self.b;
        let start = self.i;
        let mut i = start;
        loop {
            match b.get(i..i + 8) {
                Some(chunk) => {
                    let stop = non_digits(u64::from_le_bytes(chunk.try_into().ok()?));
                    if stop != 0 {
                        i += (stop.trailing_zeros() / 8) as usize;
                        break;
                    }
                    i += 8;
                }
                None => {
                    while b.get(i).is_some_and(u8::is_ascii_digit) {
                        i += 1;
                    }
                    break;
                }
            }
        }
        if i == start || (b[start] == b'0' && i - start > 1) {
            return None;
        }
        self.i = i;
        Some(())
    }

    /// `null` or an unsigned integer, unread.
    #[inline(always)]
    fn skip_opt_uint(&mut self) -> Option<()> {
        if self.b.get(self.i) == Some(&b'n') {
            return self.lit(b"null");
        }
        self.skip_uint()
    }

    #[inline(always)]
    fn u32(&mut self) -> Option<u32> {
        u32::try_from(self.u64()?).ok()
    }

    #[inline(always)]
    fn opt_u64(&mut self) -> Option<Option<u64>> {
        if self.b.get(self.i) == Some(&b'n') {
            return self.lit(b"null").map(|()| None);
        }
        self.u64().map(Some)
    }

    #[inline(always)]
    fn opt_u32(&mut self) -> Option<Option<u32>> {
        match self.opt_u64()? {
            Some(n) => u32::try_from(n).ok().map(Some),
            None => Some(None),
        }
    }

    /// Hex digits (either case) up to the first other byte, as a u64 (None if the value
    /// does not fit). Eight digits at a time: a byte loop mispredicted on every switch
    /// between digits and letters, which a socket address has plenty of.
    #[inline(always)]
    fn hex(&mut self) -> Option<u64> {
        let b = self.b;
        let start = self.i;
        let mut i = start;
        let mut n: u64 = 0;
        while let Some(chunk) = b.get(i..i + 8) {
            let (count, value) = swar_hex(u64::from_le_bytes(chunk.try_into().ok()?));
            if count > 0 {
                // The digits so far must leave room for `count` more.
                if n >> (64 - 4 * count) != 0 {
                    return None;
                }
                n = (n << (4 * count)) | u64::from(value);
                i += count;
            }
            if count < 8 {
                self.i = i;
                return (i > start).then_some(n);
            }
        }
        while let Some(&c) = b.get(i) {
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => break,
            };
            n = n.checked_mul(16)?.checked_add(u64::from(d))?;
            i += 1;
        }
        self.i = i;
        (i > start).then_some(n)
    }

    /// The contents of a JSON string without escapes or control characters (anything
    /// escaped falls back to the full parser), checked to be UTF-8. Eight bytes at a time.
    #[inline(always)]
    fn plain_str(&mut self) -> Option<&'a [u8]> {
        self.lit(b"\"")?;
        let b = self.b;
        let start = self.i;
        let mut i = start;
        let mut ascii = true;
        // A word at a time: ordinary printable ASCII is skipped without looking at each
        // byte, and the first byte that is not is found with one trailing_zeros.
        loop {
            match b.get(i..i + 8) {
                Some(chunk) => {
                    let special = special_bytes(u64::from_le_bytes(chunk.try_into().ok()?));
                    if special == 0 {
                        i += 8;
                        continue;
                    }
                    i += (special.trailing_zeros() / 8) as usize;
                }
                // Fewer than eight bytes left: stop at the first one that is not ordinary.
                None => {
                    while b
                        .get(i)
                        .is_some_and(|&c| (0x20..0x80).contains(&c) && c != b'"' && c != b'\\')
                    {
                        i += 1;
                    }
                }
            }
            match *b.get(i)? {
                b'"' => break,
                c if c >= 0x80 => {
                    ascii = false;
                    i += 1;
                }
                _ => return None,
            }
        }
        let s = &b[start..i];
        if !ascii {
            std::str::from_utf8(s).ok()?;
        }
        self.i = i + 1;
        Some(s)
    }

    #[inline(always)]
    fn opt_comm(&mut self) -> Option<Option<Comm>> {
        if self.b.get(self.i) == Some(&b'n') {
            return self.lit(b"null").map(|()| None);
        }
        self.comm().map(Some)
    }

    /// A command name: a plain string, as `Comm::new` keeps it.
    #[inline(always)]
    fn comm(&mut self) -> Option<Comm> {
        let start = self.i + 1;
        let s = self.plain_str()?;
        Some(comm(s, &self.b[start..]))
    }

    #[inline(always)]
    fn bool(&mut self) -> Option<bool> {
        match self.b.get(self.i)? {
            b't' => self.lit(b"true").map(|()| true),
            _ => self.lit(b"false").map(|()| false),
        }
    }

    #[inline(always)]
    fn state(&mut self) -> Option<TcpState> {
        TcpState::from_name_bytes(self.plain_str()?)
    }

    #[inline(always)]
    fn ip(&mut self) -> Option<IpAddr> {
        // A dotted quad read straight off the line and closed by the quote: the text a
        // string scan would have found, without the scan.
        if self.b.get(self.i) == Some(&b'"') {
            let at = self.i + 1;
            if let Some((a, n)) = ipv4_prefix(&self.b[at..])
                && self.b.get(at + n) == Some(&b'"')
            {
                self.i = at + n + 1;
                return Some(IpAddr::V4(a));
            }
        }
        let s = self.plain_str()?;
        match ipv4(s) {
            Some(a) => Some(IpAddr::V4(a)),
            // IPv6 (and anything unusual): std's parser, the one serde uses.
            None => std::str::from_utf8(s).ok()?.parse().ok(),
        }
    }
}

/// `Comm::new` of a string already checked to be UTF-8: its first 15 bytes. `rest` is the
/// line from the string's start: sixteen bytes of it are taken in one load where the line
/// has them (ours always do), and the bytes past the string masked off.
#[inline(always)]
fn comm(s: &[u8], rest: &[u8]) -> Comm {
    let n = s.len().min(15);
    if let Some(chunk) = rest.get(..16) {
        let w = u128::from_le_bytes(chunk.try_into().expect("16 bytes"));
        return Comm((w & ((1u128 << (8 * n)) - 1)).to_le_bytes());
    }
    let mut b = [0u8; 16];
    b[..n].copy_from_slice(&s[..n]);
    Comm(b)
}

/// The fast path of [`parse_transition`]: our own lines, in our own field order, with no
/// escapes. `None` sends the line to the full parser, which accepts any valid JSON.
#[inline(always)]
fn parse_own_line(line: &[u8]) -> Option<Transition> {
    let mut c = Scan { b: line, i: 0 };
    c.lit(b"{\"type\":\"")?;
    let kind = match c.b.get(c.i)? {
        b't' => c.lit(b"transition\"").map(|()| EventKind::State)?,
        b'a' => c.lit(b"accept\"").map(|()| EventKind::Accept)?,
        b'h' => c.lit(b"handoff\"").map(|()| EventKind::Handoff)?,
        b'v' => c.lit(b"vanished\"").map(|()| EventKind::Vanished)?,
        _ => c.lit(b"present\"").map(|()| EventKind::Present)?,
    };
    c.lit(b",\"schema\":1,\"ts_ns\":")?;
    let ts_ns = c.u64()?;
    c.lit(b",\"time\":")?;
    c.plain_str()?;
    c.lit(b",\"conn_id\":")?;
    let conn_id = c.u64()?;
    c.lit(b",\"skaddr\":\"0x")?;
    let skaddr = c.hex()?;
    c.lit(b"\",\"family\":")?;
    // Strings that nearly always hold one value are tried as that literal first: the same
    // bytes a string scan would accept, at the cost of one compare.
    if c.lit(b"\"ipv4\"").is_none() {
        c.plain_str()?;
    }
    c.lit(b",\"laddr\":")?;
    let laddr = c.ip()?;
    c.lit(b",\"lport\":")?;
    let lport = u16::try_from(c.u64()?).ok()?;
    c.lit(b",\"raddr\":")?;
    let raddr = c.ip()?;
    c.lit(b",\"rport\":")?;
    let rport = u16::try_from(c.u64()?).ok()?;
    c.lit(b",\"old\":")?;
    let old = c.state()?;
    c.lit(b",\"new\":")?;
    let new = c.state()?;
    c.lit(b",\"in_old_state_ns\":")?;
    c.opt_u64()?;
    c.lit(b",\"owner_pid\":")?;
    let owner_pid = c.opt_u32()?;
    c.lit(b",\"owner_tid\":")?;
    let owner_tid = c.opt_u32()?;
    c.lit(b",\"owner_comm\":")?;
    let owner_comm = c.opt_comm()?;
    c.lit(b",\"owner_source\":")?;
    let owner_source = match c.lit(b"\"kernel\"") {
        Some(()) => b"kernel",
        None => c.plain_str()?,
    };
    c.lit(b",\"task_pid\":")?;
    let task_pid = c.u32()?;
    c.lit(b",\"task_tid\":")?;
    let task_tid = c.u32()?;
    c.lit(b",\"task_comm\":")?;
    let task_comm = c.comm()?;
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
    let cpu = c.u32()?;
    c.lit(b",\"owner_via\":")?;
    let owner_via = OwnerVia::from_name_bytes(c.plain_str()?)?;
    c.lit(b",\"owner_uid\":")?;
    let uid = c.opt_u32()?.unwrap_or(0);
    c.lit(b",\"cgroup_id\":")?;
    let cgroup_id = c.opt_u64()?.unwrap_or(0);
    c.lit(b",\"netns\":")?;
    let netns = c.opt_u32()?.unwrap_or(0);
    c.lit(b",\"unaccepted\":")?;
    let unaccepted = c.bool()?;
    c.lit(b",\"container\":")?;
    let container = if c.lit(b"null").is_some() {
        [0; 12]
    } else {
        container_id(c.plain_str()?)?
    };
    c.lit(b"}")?;
    if c.i != c.b.len() {
        return None;
    }
    let owner = match (owner_source, owner_pid) {
        (b"kernel", Some(pid)) => Some(Task {
            pid,
            tid: owner_tid.unwrap_or(pid),
            comm: owner_comm.unwrap_or_default(),
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
            comm: task_comm,
        },
        local: SocketAddr::new(laddr, lport),
        remote: SocketAddr::new(raddr, rport),
        old,
        new,
        starts_conn,
        midlife,
        cpu,
        owner,
        meta: ConnMeta {
            owner_via,
            uid,
            cgroup_id,
            netns,
            unaccepted,
            container,
        },
        kind,
    })
}

/// A short container id: exactly 12 lowercase hex digits.
fn container_id(s: &[u8]) -> Option<[u8; 12]> {
    let a: [u8; 12] = s.try_into().ok()?;
    a.iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        .then_some(a)
}

/// Reads one NDJSON line: `Ok(Some)` for a transition, `Ok(None)` for the other record
/// types (lifecycles and alerts are recomputed by the replay), `Err` for anything malformed.
pub fn parse_transition(line: &str) -> Result<Option<Transition>, ParseError> {
    parse_transition_bytes(line.as_bytes())
}

/// As [`parse_transition`], on raw bytes: our own lines need no UTF-8 pass of their own
/// (the few strings in them are checked as they are read).
#[inline]
pub fn parse_transition_bytes(line: &[u8]) -> Result<Option<Transition>, ParseError> {
    match parse_own_line(line) {
        Some(t) => Ok(Some(t)),
        None if lifecycle_line::own_lifecycle_line(line) => Ok(None),
        None => parse_other_line(line),
    }
}

#[cold]
#[inline(never)]
fn parse_other_line(line: &[u8]) -> Result<Option<Transition>, ParseError> {
    if line.starts_with(b"type,schema,") || line.starts_with(b"transition,1,") {
        return Err(ParseError::Csv);
    }
    match std::str::from_utf8(line) {
        Ok(s) => parse_transition_json(s),
        Err(e) => Err(ParseError::Json(format!("not UTF-8 ({e})"))),
    }
}

/// The full parser: any valid JSON object with the fields, in any order.
pub fn parse_transition_json(line: &str) -> Result<Option<Transition>, ParseError> {
    let l: Line<'_> = serde_json::from_str(line).map_err(|e| match e.classify() {
        // Valid JSON of the wrong shape (`{"foo":1}`, `[1,2]`) is not "not JSON".
        serde_json::error::Category::Data => ParseError::NotRecord(e.to_string()),
        _ => ParseError::Json(e.to_string()),
    })?;
    match l.schema {
        Some(SCHEMA_VERSION) => {}
        Some(v) => return Err(ParseError::Schema(v)),
        None => return Err(ParseError::Missing("schema")),
    }
    let Some(kind) = EventKind::from_record_type(&l.kind) else {
        if OTHER_RECORD_TYPES.contains(&&*l.kind) {
            return Ok(None);
        }
        return Err(ParseError::UnknownType(l.kind.into_owned()));
    };
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
        meta: ConnMeta {
            owner_via: l
                .owner_via
                .as_deref()
                .and_then(OwnerVia::from_name)
                .unwrap_or_default(),
            uid: l.owner_uid.unwrap_or(0),
            cgroup_id: l.cgroup_id.unwrap_or(0),
            netns: l.netns.unwrap_or(0),
            unaccepted: l.unaccepted.unwrap_or(false),
            container: match l.container.as_deref() {
                None => [0; 12],
                Some(s) => container_id(s.as_bytes()).ok_or_else(|| {
                    ParseError::Json(format!("container {s:?} is not 12 hex digits"))
                })?,
            },
        },
        kind,
    }))
}

#[cfg(test)]
mod tests;
