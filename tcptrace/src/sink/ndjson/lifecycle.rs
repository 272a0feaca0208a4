//! Lifecycle records by hand: byte for byte what serde writes for the `lifecycle` envelope
//! (a test compares the two), without serde's dozens of calls per record. One in ten
//! lines of a live log is a lifecycle, and serde was about 15 % of the daemon's CPU.

use std::io::Write as _;

use std::net::SocketAddr;

use super::{SCHEMA_VERSION, decimal};
use crate::engine::LifecycleRecord;

/// The digits go straight into the line: room of a constant size first (copied inline),
/// then cut to length. Copying them from a scratch array was a memcpy call of a variable
/// size per number, the lifecycle encoder's largest cost.
fn u64_to(buf: &mut Vec<u8>, n: u64) {
    let at = buf.len();
    buf.extend_from_slice(&[0u8; 20]);
    let len = decimal(n, &mut buf[at..]);
    buf.truncate(at + len);
}

fn opt_u64_to(buf: &mut Vec<u8>, n: Option<u64>) {
    match n {
        Some(n) => u64_to(buf, n),
        None => buf.extend_from_slice(b"null"),
    }
}

/// What `Display` writes; IPv4, the common case, without `fmt`.
fn socket_addr_to(buf: &mut Vec<u8>, addr: &SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            let [x, y, z, w] = a.ip().octets();
            for (i, octet) in [x, y, z, w].into_iter().enumerate() {
                if i > 0 {
                    buf.push(b'.');
                }
                u64_to(buf, u64::from(octet));
            }
            buf.push(b':');
            u64_to(buf, u64::from(a.port()));
        }
        SocketAddr::V6(a) => {
            let _ = write!(buf, "{a}");
        }
    }
}

/// Each literal copied at its own constant size (one slice of either length would be a
/// memcpy call).
fn bool_to(buf: &mut Vec<u8>, b: bool) {
    if b {
        buf.extend_from_slice(b"true");
    } else {
        buf.extend_from_slice(b"false");
    }
}

/// Appends the record's line (without the newline): `time` is its RFC 3339 end time.
pub fn encode_lifecycle(buf: &mut Vec<u8>, time: &str, l: &LifecycleRecord) {
    buf.extend_from_slice(b"{\"type\":\"lifecycle\",\"schema\":");
    u64_to(buf, u64::from(SCHEMA_VERSION));
    buf.extend_from_slice(b",\"time\":\"");
    buf.extend_from_slice(time.as_bytes());
    buf.extend_from_slice(b"\",\"conn_id\":");
    u64_to(buf, l.conn_id);
    // Addresses print with no character JSON would escape.
    buf.extend_from_slice(b",\"local\":\"");
    socket_addr_to(buf, &l.local);
    buf.extend_from_slice(b"\",\"remote\":\"");
    socket_addr_to(buf, &l.remote);
    buf.extend_from_slice(b"\",\"family\":\"");
    buf.extend_from_slice(l.family.name().as_bytes());
    buf.extend_from_slice(b"\",\"role\":\"");
    buf.extend_from_slice(l.role.name().as_bytes());
    buf.extend_from_slice(b"\",\"owner\":");
    match &l.owner {
        Some(o) => {
            buf.extend_from_slice(b"{\"pid\":");
            u64_to(buf, u64::from(o.pid));
            buf.extend_from_slice(b",\"tid\":");
            u64_to(buf, u64::from(o.tid));
            buf.extend_from_slice(b",\"comm\":");
            // serde_json's own escaping, so that odd names come out the same.
            let _ = serde_json::to_writer(&mut *buf, &*o.comm.as_str());
            buf.push(b'}');
        }
        None => buf.extend_from_slice(b"null"),
    }
    buf.extend_from_slice(b",\"start_ts_ns\":");
    u64_to(buf, l.start_ts_ns);
    buf.extend_from_slice(b",\"end_ts_ns\":");
    u64_to(buf, l.end_ts_ns);
    buf.extend_from_slice(b",\"path\":[");
    for (i, s) in l.path.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        buf.extend_from_slice(b"{\"state\":\"");
        buf.extend_from_slice(s.state.name().as_bytes());
        buf.extend_from_slice(b"\",\"entered_ns\":");
        opt_u64_to(buf, s.entered_ns);
        buf.extend_from_slice(b",\"duration_ns\":");
        opt_u64_to(buf, s.duration_ns);
        buf.extend_from_slice(b",\"gap_before\":");
        bool_to(buf, s.gap_before);
        buf.push(b'}');
    }
    buf.extend_from_slice(b"],\"handshake_ns\":");
    opt_u64_to(buf, l.handshake_ns);
    buf.extend_from_slice(b",\"established_ns\":");
    opt_u64_to(buf, l.established_ns);
    buf.extend_from_slice(b",\"lifetime_ns\":");
    opt_u64_to(buf, l.lifetime_ns);
    buf.extend_from_slice(b",\"close_kind\":");
    match l.close_kind {
        Some(k) => {
            buf.push(b'"');
            buf.extend_from_slice(k.name().as_bytes());
            buf.push(b'"');
        }
        None => buf.extend_from_slice(b"null"),
    }
    buf.extend_from_slice(b",\"end\":\"");
    buf.extend_from_slice(l.end.name().as_bytes());
    buf.extend_from_slice(b"\",\"complete\":");
    bool_to(buf, l.complete);
    buf.extend_from_slice(b",\"partial_start\":");
    bool_to(buf, l.partial_start);
    buf.extend_from_slice(b",\"gap\":");
    bool_to(buf, l.gap);
    buf.extend_from_slice(b",\"illegal\":");
    bool_to(buf, l.illegal);
    buf.extend_from_slice(b",\"path_truncated\":");
    bool_to(buf, l.path_truncated);
    buf.push(b'}');
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

    #[test]
    fn the_hand_encoder_writes_exactly_what_serde_writes() {
        for i in 0..200 {
            let l = record(i);
            let time = format!("2026-11-24T03:{:02}:00.000000001Z", i % 60);
            let mut hand = Vec::new();
            encode_lifecycle(&mut hand, &time, &l);
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
