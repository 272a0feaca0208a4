//! Lifecycle records by hand: byte for byte what serde writes for the `lifecycle` envelope
//! (a test compares the two), without serde's dozens of calls per record. One in ten
//! lines of a live log is a lifecycle, and serde was about 15 % of the daemon's CPU. Written
//! with the transition encoder's cursor: fixed-size copies into a buffer with room for the
//! whole line, no capacity check per piece.

use std::io::Write as _;
use std::net::SocketAddr;

use super::{Cursor, SCHEMA_VERSION};
use crate::engine::LifecycleRecord;

/// Room enough for any fixed part of a line: some 400 bytes of keys, eight numbers of at
/// most 20 digits, two IPv6 socket addresses with scope, an escaped command name (15 × 6).
const FIXED_ROOM: usize = 1024;
/// Room enough for one path step: `{"state":…,"entered_ns":…,"duration_ns":…,"gap_before":…},`
/// is at most 112 bytes.
const STEP_ROOM: usize = 128;

/// Path steps a line has room for: the engine keeps at most 255 path bytes, a step takes
/// at least one. A longer path (none should exist) is written by serde instead.
const MAX_STEPS: usize = 256;

/// The size of the lifecycle line buffer: room for a path of `MAX_STEPS`.
pub const LINE: usize = FIXED_ROOM + STEP_ROOM * MAX_STEPS + 32;

/// The buffer a [`Cursor`] needs for `l`'s line, its newline and the cursor's slack.
pub fn room(l: &LifecycleRecord) -> usize {
    FIXED_ROOM + STEP_ROOM * l.path.len() + 32
}

/// What `Display` writes; IPv4, the common case, without `fmt`.
fn socket_addr(c: &mut Cursor<'_, LINE>, addr: &SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            c.ip((*a.ip()).into());
            c.put(b":");
            c.u64(u64::from(a.port()));
        }
        SocketAddr::V6(a) => {
            let mut text = Vec::with_capacity(64);
            let _ = write!(text, "{a}");
            c.put_slice(&text);
        }
    }
}

/// Writes the record's line (without the newline): `time` is its RFC 3339 end time. The
/// cursor's buffer has [`room`] for it.
pub fn encode_lifecycle(c: &mut Cursor<'_, LINE>, time: &str, l: &LifecycleRecord) {
    c.put(b"{\"type\":\"lifecycle\",\"schema\":");
    c.u64(u64::from(SCHEMA_VERSION));
    c.put(b",\"time\":\"");
    c.put_slice(time.as_bytes());
    c.put(b"\",\"conn_id\":");
    c.u64(l.conn_id);
    // Addresses print with no character JSON would escape.
    c.put(b",\"local\":\"");
    socket_addr(c, &l.local);
    c.put(b"\",\"remote\":\"");
    socket_addr(c, &l.remote);
    c.put(b"\",\"family\":\"");
    c.put_slice(l.family.name().as_bytes());
    c.put(b"\",\"role\":\"");
    c.put_slice(l.role.name().as_bytes());
    c.put(b"\",\"owner\":");
    match &l.owner {
        Some(o) => {
            c.put(b"{\"pid\":");
            c.u64(u64::from(o.pid));
            c.put(b",\"tid\":");
            c.u64(u64::from(o.tid));
            c.put(b",\"comm\":");
            c.comm(&o.comm);
            c.put(b"}");
        }
        None => c.put(b"null"),
    }
    c.put(b",\"start_ts_ns\":");
    c.u64(l.start_ts_ns);
    c.put(b",\"end_ts_ns\":");
    c.u64(l.end_ts_ns);
    c.put(b",\"path\":[");
    for (i, s) in l.path.iter().enumerate() {
        if i > 0 {
            c.put(b",");
        }
        c.put(b"{\"state\":\"");
        c.put_slice(s.state.name().as_bytes());
        c.put(b"\",\"entered_ns\":");
        c.opt(s.entered_ns);
        c.put(b",\"duration_ns\":");
        c.opt(s.duration_ns);
        c.put(b",\"gap_before\":");
        c.bool(s.gap_before);
        c.put(b"}");
    }
    c.put(b"],\"handshake_ns\":");
    c.opt(l.handshake_ns);
    c.put(b",\"established_ns\":");
    c.opt(l.established_ns);
    c.put(b",\"lifetime_ns\":");
    c.opt(l.lifetime_ns);
    c.put(b",\"close_kind\":");
    match l.close_kind {
        Some(k) => {
            c.put(b"\"");
            c.put_slice(k.name().as_bytes());
            c.put(b"\"");
        }
        None => c.put(b"null"),
    }
    c.put(b",\"end\":\"");
    c.put_slice(l.end.name().as_bytes());
    c.put(b"\",\"complete\":");
    c.bool(l.complete);
    c.put(b",\"partial_start\":");
    c.bool(l.partial_start);
    c.put(b",\"gap\":");
    c.bool(l.gap);
    c.put(b",\"illegal\":");
    c.bool(l.illegal);
    c.put(b",\"path_truncated\":");
    c.bool(l.path_truncated);
    c.put(b"}");
}

/// Appends `l`'s line (without the newline) to `buf`, for tests.
#[cfg(test)]
pub fn encode_lifecycle_to(buf: &mut Vec<u8>, time: &str, l: &LifecycleRecord) {
    assert!(room(l) <= LINE, "a path of {} steps", l.path.len());
    let mut line = Box::new([0u8; LINE]);
    let mut c = Cursor::new(&mut line);
    encode_lifecycle(&mut c, time, l);
    buf.extend_from_slice(c.written());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{CloseKind, EndReason, Family, PathStep, Role};
    use crate::event::{Comm, Task, TcpState};

    #[derive(serde::Serialize)]
    struct Envelope<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        schema: u32,
        time: String,
        #[serde(flatten)]
        record: &'a LifecycleRecord,
    }

    // Residues pick the variations; `is_multiple_of` would hide the pattern.
    #[allow(clippy::manual_is_multiple_of)]
    fn record(i: u64) -> LifecycleRecord {
        let roles = [
            Role::ActiveOpen,
            Role::PassiveOpen,
            Role::Listener,
            Role::Unknown,
        ];
        let ends = [
            EndReason::Closed,
            EndReason::Evicted,
            EndReason::Finished,
            EndReason::Superseded,
        ];
        let v6 = i % 2 == 1;
        LifecycleRecord {
            conn_id: i.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            local: if v6 {
                "[fe80::1]:443".parse().unwrap()
            } else {
                // Octets and ports of every width.
                format!("10.{}.{}.1:{}", i % 256, (i * 37) % 256, (i * 331) % 65536)
                    .parse()
                    .unwrap()
            },
            remote: if v6 {
                "[::1]:0".parse().unwrap()
            } else {
                "127.0.0.1:65535".parse().unwrap()
            },
            family: if v6 { Family::Ipv6 } else { Family::Ipv4 },
            role: roles[(i % 4) as usize],
            owner: (i % 3 != 0).then(|| Task {
                pid: i as u32,
                tid: u32::MAX,
                comm: Comm::new(["leaky-server", "we\"ird\\na\u{1}", "ünï", ""][(i % 4) as usize]),
            }),
            start_ts_ns: i,
            end_ts_ns: u64::MAX - i,
            path: (0..(i % 5))
                .map(|k| PathStep {
                    state: TcpState::ALL[((i + k) % 13) as usize],
                    entered_ns: (k % 2 == 0).then_some(k * 1000),
                    duration_ns: (k % 3 == 0).then_some(k),
                    gap_before: k == 1,
                })
                .collect(),
            handshake_ns: (i % 2 == 0).then_some(41_000),
            established_ns: (i % 3 == 0).then_some(0),
            lifetime_ns: (i % 5 == 0).then_some(u64::MAX),
            close_kind: (i % 11 != 0)
                .then(|| CloseKind::ALL[(i % CloseKind::ALL.len() as u64) as usize]),
            end: ends[(i % 4) as usize],
            complete: i % 2 == 0,
            partial_start: i % 3 == 0,
            gap: i % 5 == 0,
            illegal: i % 7 == 0,
            path_truncated: i % 11 == 0,
        }
    }

    /// The longest line a record can make fits the room the daemon gives it, with the
    /// cursor's slack: every number at its widest, scoped IPv6 addresses, a name that escapes
    /// to six bytes a character, and a full path of the longest state name.
    #[test]
    fn the_longest_line_fits_its_room() {
        let widest: SocketAddr = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535"
            .parse()
            .unwrap();
        let mut l = record(3);
        l.conn_id = u64::MAX;
        l.local = widest;
        l.remote = widest;
        l.role = Role::PassiveOpen;
        l.owner = Some(Task {
            pid: u32::MAX,
            tid: u32::MAX,
            comm: Comm::new(
                "\u{1}\u{2}\u{3}\u{4}\u{5}\u{6}\u{7}\u{8}\u{b}\u{e}\u{f}\u{10}\u{11}\u{12}\u{13}",
            ),
        });
        l.start_ts_ns = u64::MAX;
        l.end_ts_ns = u64::MAX;
        l.handshake_ns = Some(u64::MAX);
        l.established_ns = Some(u64::MAX);
        l.lifetime_ns = Some(u64::MAX);
        l.close_kind = CloseKind::ALL
            .iter()
            .copied()
            .max_by_key(|k| k.name().len());
        l.end = ends_longest();
        l.complete = false;
        l.partial_start = false;
        l.gap = false;
        l.illegal = false;
        l.path_truncated = false;
        let step = PathStep {
            state: TcpState::Established,
            entered_ns: Some(u64::MAX),
            duration_ns: Some(u64::MAX),
            gap_before: false,
        };
        let time = "2026-11-24T03:00:00.000000001Z";
        let mut lens = Vec::new();
        for steps in [0, 1, 64] {
            l.path = vec![step; steps];
            let mut hand = Vec::new();
            encode_lifecycle_to(&mut hand, time, &l);
            // The daemon adds the newline; the cursor may copy 20 bytes past the end.
            assert!(
                hand.len() + 1 + 20 <= room(&l),
                "{steps} steps: {} bytes need more than the room of {}",
                hand.len(),
                room(&l)
            );
            lens.push(hand.len());
        }
        // Each allowance holds on its own: the fixed part (no path), and a step.
        assert!(lens[0] + 1 + 20 <= FIXED_ROOM, "fixed part {}", lens[0]);
        assert!((lens[2] - lens[0]).div_ceil(64) <= STEP_ROOM, "{lens:?}");
    }

    /// Through the sink: a path within the buffer is written by the cursor, a longer one
    /// (the engine keeps none) by serde, and both lines are what serde writes.
    #[test]
    fn the_sink_writes_paths_of_any_length() {
        use crate::sink::Sink as _;
        use crate::sink::time::WallClock;
        for steps in [0, 3, MAX_STEPS, MAX_STEPS + 1, 1000] {
            let mut l = record(4);
            l.path = (0..steps)
                .map(|k| PathStep {
                    state: TcpState::ALL[k % 13],
                    entered_ns: Some(k as u64),
                    duration_ns: None,
                    gap_before: false,
                })
                .collect();
            let mut sink = super::super::Ndjson::new(Vec::new(), WallClock::identity());
            sink.record(&crate::engine::Output::Lifecycle(l.clone()))
                .unwrap();
            let line = String::from_utf8(sink.into_inner()).unwrap();
            let serde = serde_json::to_string(&Envelope {
                kind: "lifecycle",
                schema: SCHEMA_VERSION,
                time: WallClock::identity().rfc3339(l.end_ts_ns),
                record: &l,
            })
            .unwrap();
            assert_eq!(line, serde + "\n", "{steps} steps");
        }
    }

    fn ends_longest() -> EndReason {
        [
            EndReason::Closed,
            EndReason::Evicted,
            EndReason::Finished,
            EndReason::Superseded,
        ]
        .into_iter()
        .max_by_key(|e| e.name().len())
        .unwrap()
    }

    #[test]
    fn the_hand_encoder_writes_exactly_what_serde_writes() {
        for i in 0..200 {
            let l = record(i);
            let time = format!("2026-11-24T03:{:02}:00.000000001Z", i % 60);
            let mut hand = Vec::new();
            encode_lifecycle_to(&mut hand, &time, &l);
            let serde = serde_json::to_string(&Envelope {
                kind: "lifecycle",
                schema: SCHEMA_VERSION,
                time,
                record: &l,
            })
            .unwrap();
            assert_eq!(String::from_utf8(hand).unwrap(), serde, "record {i}");
        }
    }
}
