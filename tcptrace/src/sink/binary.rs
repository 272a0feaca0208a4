//! Binary capture (`--format binary`): transitions as fixed-size records, for `tcptrace
//! analyze` to replay, at a fraction of what NDJSON costs to write and to read back.
//!
//! A capture is a stream of lines, so that rotation, SIGHUP reopening and a reader that
//! starts mid-file work as they do for NDJSON: each record is a tag byte, the record's
//! bytes with every `\n` and escape byte escaped (the byte stuffing of RFC 1662's HDLC-like
//! framing, with `\n` as the flag), and `\n`. Only transitions (and `accept`, `handoff`,
//! `present` events) are recorded: lifecycles and alerts are what `analyze` recomputes from
//! them. The run's summary (events lost, by cause) is recorded as its NDJSON line, which a
//! JSON parser and `analyze` both read. Each record carries the wall-clock offset of the
//! run that wrote it, so a replay shows the times the live run showed.
//!
//! Record format 1 (all integers little-endian), 153 bytes before escaping:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | kind: 0 transition, 1 accept, 2 handoff, 3 present, 4 vanished |
//! | 1, 2 | 1 + 1 | old, new: the kernel's state numbers |
//! | 3 | 1 | flags: 1 starts_conn, 2 midlife, 4 unaccepted, 8 owner known, 16 IPv6 |
//! | 4 | 1 | owner_via: unknown, connect, listen, accept, close, listener, fd (0–6) |
//! | 5 | 8 | ts_ns (CLOCK_MONOTONIC) |
//! | 13 | 8 | conn_id |
//! | 21 | 8 | skaddr |
//! | 29 | 8 | wall-clock offset: Unix ns − ts_ns, signed |
//! | 37 | 4 | cpu |
//! | 41 | 4 + 4 + 16 | task: pid, tid, comm (NUL-padded) |
//! | 65 | 4 + 4 + 16 | owner: pid, tid, comm (zero when not known) |
//! | 89 | 16 + 2 | local address (IPv4 in the first 4 bytes, the rest zero), port |
//! | 107 | 16 + 2 | remote address, port |
//! | 125 | 4 | owner's uid |
//! | 129 | 8 | owner's cgroup id |
//! | 137 | 4 | network namespace inode |
//! | 141 | 12 | container id (12 lowercase hex digits, or zero) |

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};

use super::time::WallClock;
use super::{RunStart, RunSummary, Sink};
use crate::engine::Output;
use crate::event::{
    Comm, ConnMeta, EventKind, OwnerVia, Task, TcpState, Transition, ip_from_wire, ip_to_wire,
};

/// The first byte of a format-1 record: never the first byte of a JSON text or of UTF-8.
pub const TAG: u8 = 0xB1;
/// First bytes reserved for binary records of any format version (0xB0 + version).
const TAGS: std::ops::RangeInclusive<u8> = 0xB0..=0xBF;
/// The escape byte; an escaped byte follows it XORed with [`FLIP`].
const ESC: u8 = 0x1B;
const FLIP: u8 = 0x20;
/// A record's size before escaping.
pub const RECORD: usize = 153;
/// Room for a record line at worst: the tag, every byte escaped, the newline.
pub const MAX_LINE: usize = 1 + 2 * RECORD + 1;

const KINDS: [EventKind; 5] = [
    EventKind::State,
    EventKind::Accept,
    EventKind::Handoff,
    EventKind::Present,
    EventKind::Vanished,
];
const STARTS_CONN: u8 = 1;
const MIDLIFE: u8 = 2;
const UNACCEPTED: u8 = 4;
const OWNER: u8 = 8;
const IPV6: u8 = 16;

/// Why a binary record could not be read back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("binary record format {0} is not supported (this tcptrace reads format 1)")]
    Version(u8),
    #[error("binary record of the wrong length (truncated or corrupt)")]
    Length,
    #[error("binary record with a bad escape sequence")]
    Escape,
    #[error("binary record with an invalid {0}")]
    Field(&'static str),
}

/// Is this line a binary record (of any format version)?
#[inline]
pub fn is_record(line: &[u8]) -> bool {
    line.first().is_some_and(|b| TAGS.contains(b))
}

fn put<const K: usize>(r: &mut [u8; RECORD], at: usize, v: [u8; K]) {
    r[at..at + K].copy_from_slice(&v);
}

/// The record's bytes, unescaped.
fn record(t: &Transition, wall_offset_ns: i64) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    // Discriminants are the indices in KINDS and OwnerVia::ALL (asserted in the tests).
    r[0] = t.kind as u8;
    r[1] = t.old as u8;
    r[2] = t.new as u8;
    let m = &t.meta;
    let v6 = t.local.is_ipv6() || t.remote.is_ipv6();
    r[3] = (if t.starts_conn { STARTS_CONN } else { 0 })
        | (if t.midlife { MIDLIFE } else { 0 })
        | (if m.unaccepted { UNACCEPTED } else { 0 })
        | (if t.owner.is_some() { OWNER } else { 0 })
        | (if v6 { IPV6 } else { 0 });
    r[4] = m.owner_via as u8;
    put(&mut r, 5, t.ts_ns.to_le_bytes());
    put(&mut r, 13, t.conn_id.to_le_bytes());
    put(&mut r, 21, t.skaddr.to_le_bytes());
    put(&mut r, 29, wall_offset_ns.to_le_bytes());
    put(&mut r, 37, t.cpu.to_le_bytes());
    put(&mut r, 41, t.task.pid.to_le_bytes());
    put(&mut r, 45, t.task.tid.to_le_bytes());
    put(&mut r, 49, t.task.comm.0);
    if let Some(o) = t.owner {
        put(&mut r, 65, o.pid.to_le_bytes());
        put(&mut r, 69, o.tid.to_le_bytes());
        put(&mut r, 73, o.comm.0);
    }
    // A family per record: an IPv4 address of an IPv6 socket is written v4-mapped.
    let addr = |ip: IpAddr| match (v6, ip) {
        (true, IpAddr::V4(a)) => a.to_ipv6_mapped().octets(),
        _ => ip_to_wire(ip),
    };
    put(&mut r, 89, addr(t.local.ip()));
    put(&mut r, 105, t.local.port().to_le_bytes());
    put(&mut r, 107, addr(t.remote.ip()));
    put(&mut r, 123, t.remote.port().to_le_bytes());
    put(&mut r, 125, m.uid.to_le_bytes());
    put(&mut r, 129, m.cgroup_id.to_le_bytes());
    put(&mut r, 137, m.netns.to_le_bytes());
    put(&mut r, 141, m.container);
    r
}

/// Writes one record line (tag, escaped record, newline) into `out`; returns its length.
pub fn encode(t: &Transition, wall_offset_ns: i64, out: &mut [u8; MAX_LINE]) -> usize {
    let r = record(t, wall_offset_ns);
    out[0] = TAG;
    let mut n = 1;
    let mut from = 0;
    // Whole runs between the bytes that need escaping are copied at once.
    while let Some(at) = memchr::memchr2(b'\n', ESC, &r[from..]) {
        let at = from + at;
        out[n..n + at - from].copy_from_slice(&r[from..at]);
        n += at - from;
        out[n] = ESC;
        out[n + 1] = r[at] ^ FLIP;
        n += 2;
        from = at + 1;
    }
    out[n..n + RECORD - from].copy_from_slice(&r[from..]);
    n += RECORD - from;
    out[n] = b'\n';
    n + 1
}

fn u32_at(r: &[u8; RECORD], at: usize) -> u32 {
    u32::from_le_bytes(r[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(r: &[u8; RECORD], at: usize) -> u64 {
    u64::from_le_bytes(r[at..at + 8].try_into().expect("8 bytes"))
}

fn bytes_at<const K: usize>(r: &[u8; RECORD], at: usize) -> [u8; K] {
    r[at..at + K].try_into().expect("K bytes")
}

/// The record from its escaped bytes (a line holds no `\n`: it was split at them). Whole
/// runs between escapes are copied at once.
#[inline(always)]
fn unescape(mut b: &[u8]) -> Result<[u8; RECORD], RecordError> {
    let mut r = [0u8; RECORD];
    let mut n = 0;
    loop {
        let run = memchr::memchr(ESC, b).unwrap_or(b.len());
        if n + run > RECORD {
            return Err(RecordError::Length);
        }
        r[n..n + run].copy_from_slice(&b[..run]);
        n += run;
        let Some(&e) = b.get(run + 1) else {
            if run < b.len() {
                return Err(RecordError::Escape); // a dangling escape
            }
            break;
        };
        let byte = e ^ FLIP;
        if byte != b'\n' && byte != ESC {
            return Err(RecordError::Escape);
        }
        if n == RECORD {
            return Err(RecordError::Length);
        }
        r[n] = byte;
        n += 1;
        b = &b[run + 2..];
    }
    if n != RECORD {
        return Err(RecordError::Length);
    }
    Ok(r)
}

/// Reads one record line (without its newline) back: the transition, and the wall-clock
/// offset of the run that wrote it. Strict: anything the encoder cannot have written is
/// an error, so a corrupt record is reported rather than replayed as something else.
pub fn decode(line: &[u8]) -> Result<(Transition, i64), RecordError> {
    match line.first() {
        Some(&TAG) => {}
        Some(&b) if TAGS.contains(&b) => return Err(RecordError::Version(b - TAGS.start())),
        _ => return Err(RecordError::Version(0)),
    }
    let r = unescape(&line[1..])?;
    let kind = *KINDS
        .get(usize::from(r[0]))
        .ok_or(RecordError::Field("kind"))?;
    let old = TcpState::from_kernel(r[1]).ok_or(RecordError::Field("old state"))?;
    let new = TcpState::from_kernel(r[2]).ok_or(RecordError::Field("new state"))?;
    let flags = r[3];
    if flags & !(STARTS_CONN | MIDLIFE | UNACCEPTED | OWNER | IPV6) != 0 {
        return Err(RecordError::Field("flags"));
    }
    let owner_via = *OwnerVia::ALL
        .get(usize::from(r[4]))
        .ok_or(RecordError::Field("owner_via"))?;
    let ip = |at: usize| -> Result<IpAddr, RecordError> {
        let b: [u8; 16] = bytes_at(&r, at);
        let v6 = flags & IPV6 != 0;
        if !v6 && b[4..] != [0; 12] {
            return Err(RecordError::Field("IPv4 address"));
        }
        // As the kernel program's addresses are shown: v4-mapped as IPv4.
        Ok(ip_from_wire(v6, &b))
    };
    let port = |at: usize| u16::from_le_bytes([r[at], r[at + 1]]);
    let container: [u8; 12] = bytes_at(&r, 141);
    if container != [0; 12]
        && !container
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    {
        return Err(RecordError::Field("container id"));
    }
    let owner = if flags & OWNER != 0 {
        Some(Task {
            pid: u32_at(&r, 65),
            tid: u32_at(&r, 69),
            comm: Comm(bytes_at(&r, 73)),
        })
    } else if bytes_at::<24>(&r, 65) != [0; 24] {
        return Err(RecordError::Field("owner"));
    } else {
        None
    };
    let t = Transition {
        ts_ns: u64_at(&r, 5),
        conn_id: u64_at(&r, 13),
        skaddr: u64_at(&r, 21),
        task: Task {
            pid: u32_at(&r, 41),
            tid: u32_at(&r, 45),
            comm: Comm(bytes_at(&r, 49)),
        },
        local: SocketAddr::new(ip(89)?, port(105)),
        remote: SocketAddr::new(ip(107)?, port(123)),
        old,
        new,
        starts_conn: flags & STARTS_CONN != 0,
        midlife: flags & MIDLIFE != 0,
        cpu: u32_at(&r, 37),
        owner,
        meta: ConnMeta {
            owner_via,
            uid: u32_at(&r, 125),
            cgroup_id: u64_at(&r, 129),
            netns: u32_at(&r, 137),
            unaccepted: flags & UNACCEPTED != 0,
            container,
        },
        kind,
    };
    Ok((t, u64_at(&r, 29) as i64))
}

/// The `--format binary` sink.
pub struct Binary<W: Write> {
    out: W,
    offset_ns: i64,
    line: [u8; MAX_LINE],
}

impl<W: Write> Binary<W> {
    pub fn new(out: W, clock: WallClock) -> Binary<W> {
        Binary {
            out,
            offset_ns: clock_offset(clock),
            line: [0; MAX_LINE],
        }
    }
}

fn clock_offset(clock: WallClock) -> i64 {
    i64::try_from(clock.unix_ns(0)).unwrap_or(0)
}

impl<W: Write> Sink for Binary<W> {
    fn record(&mut self, out: &Output) -> io::Result<()> {
        match out {
            Output::Transition(r) => {
                let n = encode(&r.t, self.offset_ns, &mut self.line);
                self.out.write_all(&self.line[..n])
            }
            // Recomputed from the transitions by `analyze`.
            Output::Lifecycle(_) | Output::Alert(_) => Ok(()),
        }
    }

    fn start(&mut self, s: &RunStart) -> io::Result<()> {
        super::ndjson::write_start(&mut self.out, s)
    }

    fn summary(&mut self, s: &RunSummary) -> io::Result<()> {
        super::ndjson::write_summary(&mut self.out, s)
    }

    fn set_clock(&mut self, clock: WallClock) {
        self.offset_ns = clock_offset(clock);
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Transition {
        Transition {
            ts_ns: 0x0A0A_1B1B_0A1B_1B0A,
            conn_id: 10,
            skaddr: 0xffff_8880_0a1b_0000,
            task: Task {
                pid: 10,
                tid: 27,
                comm: Comm::new("curl\n\x1b"),
            },
            local: "10.10.10.10:10".parse().unwrap(),
            remote: "192.0.2.1:2586".parse().unwrap(),
            old: TcpState::SynSent,
            new: TcpState::Established,
            starts_conn: true,
            midlife: false,
            cpu: 1,
            owner: Some(Task {
                pid: 4242,
                tid: 4243,
                comm: Comm::new("leaky-server"),
            }),
            meta: ConnMeta {
                owner_via: OwnerVia::Connect,
                uid: 1000,
                cgroup_id: 0x1b0a,
                netns: 4026531840,
                unaccepted: false,
                container: *b"0123456789ab",
            },
            kind: EventKind::State,
        }
    }

    fn line(t: &Transition, off: i64) -> Vec<u8> {
        let mut buf = [0u8; MAX_LINE];
        let n = encode(t, off, &mut buf);
        buf[..n].to_vec()
    }

    /// The framing, a byte at a time: what `encode` must write.
    fn frame(r: &[u8]) -> Vec<u8> {
        let mut framed = vec![TAG];
        for &b in r {
            if b == b'\n' || b == ESC {
                framed.extend([ESC, b ^ FLIP]);
            } else {
                framed.push(b);
            }
        }
        framed
    }

    #[test]
    fn encode_frames_the_record_as_the_byte_loop_does() {
        let t = sample();
        let mut l = line(&t, 0x0A1B_0A1B);
        assert_eq!(l.pop(), Some(b'\n'));
        assert_eq!(l, frame(&record(&t, 0x0A1B_0A1B)));
        // A record with nothing to escape is copied whole.
        let plain = Transition {
            ts_ns: 1,
            conn_id: 2,
            skaddr: 3,
            task: Task::default(),
            local: "127.0.0.1:80".parse().unwrap(),
            remote: "127.0.0.2:81".parse().unwrap(),
            cpu: 0,
            owner: None,
            meta: ConnMeta::default(),
            ..t
        };
        let mut l = line(&plain, 0);
        l.pop();
        assert_eq!(l.len(), 1 + RECORD);
        assert_eq!(l, frame(&record(&plain, 0)));
    }

    #[test]
    fn records_round_trip_with_newlines_and_escapes_inside() {
        let mut t = sample();
        let l = line(&t, -0x0A1B);
        // One newline, at the end: the record is a line.
        assert_eq!(l.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(l.last(), Some(&b'\n'));
        assert!(l.len() > 1 + RECORD + 1, "the sample has bytes to escape");
        assert_eq!(decode(&l[..l.len() - 1]), Ok((t, -0x0A1B)));

        // IPv6, no owner, every flag, each kind.
        t.local = "[2001:db8::a]:443".parse().unwrap();
        t.remote = "[::ffff:10.0.0.1]:5000".parse().unwrap();
        t.owner = None;
        t.midlife = true;
        t.meta.unaccepted = true;
        t.meta.container = [0; 12];
        for kind in KINDS {
            t.kind = kind;
            let l = line(&t, 7);
            let (back, off) = decode(&l[..l.len() - 1]).unwrap();
            assert_eq!(off, 7);
            assert_eq!(back.kind, kind);
            assert_eq!(back.local, t.local);
            // A v4-mapped peer of an IPv6 socket reads back as IPv4, as the kernel's do.
            assert_eq!(back.remote, "10.0.0.1:5000".parse().unwrap());
            assert_eq!(back.owner, None);
            assert!(back.midlife && back.meta.unaccepted && back.starts_conn);
        }
    }

    #[test]
    fn kind_and_owner_via_bytes_are_their_table_indices() {
        // The encoder writes discriminants, the decoder indexes the tables: one order.
        for (i, k) in KINDS.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k:?}");
        }
        for (i, v) in OwnerVia::ALL.iter().enumerate() {
            assert_eq!(*v as usize, i, "{v:?}");
            let mut t = sample();
            t.meta.owner_via = *v;
            let l = line(&t, 0);
            assert_eq!(decode(&l[..l.len() - 1]).unwrap().0.meta.owner_via, *v);
        }
    }

    #[test]
    fn damaged_records_are_errors_not_other_transitions() {
        let l = line(&sample(), 0);
        let body = &l[..l.len() - 1];
        assert!(is_record(body));
        assert!(!is_record(b"{\"type\":\"summary\"}"));
        // Truncated anywhere, or one byte too long.
        for cut in [1, 2, 50, body.len() - 1] {
            assert!(
                matches!(decode(&body[..cut]), Err(RecordError::Length)),
                "cut at {cut}"
            );
        }
        let mut long = body.to_vec();
        long.push(0);
        assert_eq!(decode(&long), Err(RecordError::Length));
        // A dangling or unknown escape.
        let mut esc = body.to_vec();
        esc.push(ESC);
        assert_eq!(decode(&esc), Err(RecordError::Escape));
        // Another format version.
        let mut v2 = body.to_vec();
        v2[0] = 0xB2;
        assert_eq!(decode(&v2), Err(RecordError::Version(2)));
        // Field values the encoder never writes.
        let field = |at: usize, v: u8| {
            let mut r = record(&sample(), 0);
            r[at] = v;
            decode(&frame(&r))
        };
        assert_eq!(field(0, KINDS.len() as u8), Err(RecordError::Field("kind")));
        assert_eq!(field(1, 0), Err(RecordError::Field("old state")));
        assert_eq!(field(2, 14), Err(RecordError::Field("new state")));
        assert_eq!(field(3, 32), Err(RecordError::Field("flags")));
        assert_eq!(field(4, 7), Err(RecordError::Field("owner_via")));
        assert_eq!(field(141, b'G'), Err(RecordError::Field("container id")));
        // An IPv4 record with bytes past its address.
        assert_eq!(field(89 + 4, 1), Err(RecordError::Field("IPv4 address")));
    }
}
