//! Raw ring-buffer bytes → [`Transition`]: a pure, length-checked function that never
//! panics and never allocates. Garbage is an error, not a crash.

use std::mem::offset_of;
use std::net::SocketAddr;

use tcptrace_common::{
    AF_INET, AF_INET6, EVENT_F_ACCEPT, EVENT_F_MIDLIFE, EVENT_F_NEW_CONN, EVENT_F_OWNER_KNOWN,
    EVENT_F_UNACCEPTED, EVENT_F_VANISHED, OWNER_SRC_ACCEPT, OWNER_SRC_CLOSE, OWNER_SRC_CONNECT,
    OWNER_SRC_LISTEN, OWNER_SRC_LISTENER, Owner, STATE_EVENT_SIZE, StateEvent, changes_no_state,
};

use crate::event::{Comm, ConnMeta, EventKind, OwnerVia, Task, TcpState, Transition, ip_from_wire};

fn owner_via(source: u32) -> OwnerVia {
    match source {
        OWNER_SRC_CONNECT => OwnerVia::Connect,
        OWNER_SRC_LISTEN => OwnerVia::Listen,
        OWNER_SRC_ACCEPT => OwnerVia::Accept,
        OWNER_SRC_CLOSE => OwnerVia::Close,
        OWNER_SRC_LISTENER => OwnerVia::Listener,
        _ => OwnerVia::Unknown,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("event is {got} bytes, expected {STATE_EVENT_SIZE}")]
    Length { got: usize },
    #[error("unknown TCP state {0}")]
    State(u8),
    #[error("unknown address family {0}")]
    Family(u16),
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_ne_bytes(a)
}

fn arr16(b: &[u8], off: usize) -> [u8; 16] {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[off..off + 16]);
    a
}

/// Decodes one event as the kernel program wrote it.
pub fn decode(buf: &[u8]) -> Result<Transition, DecodeError> {
    // Every index below is within STATE_EVENT_SIZE, checked here once.
    if buf.len() != STATE_EVENT_SIZE {
        return Err(DecodeError::Length { got: buf.len() });
    }
    let old_raw = buf[offset_of!(StateEvent, oldstate)];
    let new_raw = buf[offset_of!(StateEvent, newstate)];
    let old = TcpState::from_kernel(old_raw).ok_or(DecodeError::State(old_raw))?;
    let new = TcpState::from_kernel(new_raw).ok_or(DecodeError::State(new_raw))?;
    let family = u16_at(buf, offset_of!(StateEvent, family));
    let v6 = match family {
        AF_INET => false,
        AF_INET6 => true,
        f => return Err(DecodeError::Family(f)),
    };
    let saddr = ip_from_wire(v6, &arr16(buf, offset_of!(StateEvent, saddr)));
    let daddr = ip_from_wire(v6, &arr16(buf, offset_of!(StateEvent, daddr)));
    let sport = u16_at(buf, offset_of!(StateEvent, sport));
    let dport = u16_at(buf, offset_of!(StateEvent, dport));
    let pid_tgid = u64_at(buf, offset_of!(StateEvent, pid_tgid));
    let flags = u32_at(buf, offset_of!(StateEvent, flags));
    let o = offset_of!(StateEvent, owner);
    let known = flags & EVENT_F_OWNER_KNOWN != 0;
    let meta = ConnMeta {
        owner_via: if known {
            owner_via(u32_at(buf, o + offset_of!(Owner, source)))
        } else {
            OwnerVia::Unknown
        },
        uid: if known {
            u32_at(buf, o + offset_of!(Owner, uid))
        } else {
            0
        },
        cgroup_id: if known {
            u64_at(buf, o + offset_of!(Owner, cgroup_id))
        } else {
            0
        },
        netns: u32_at(buf, offset_of!(StateEvent, netns)),
        unaccepted: flags & EVENT_F_UNACCEPTED != 0,
        container: [0; 12],
    };
    let kind = if !changes_no_state(flags, old_raw, new_raw) {
        EventKind::State
    } else if flags & EVENT_F_VANISHED != 0 {
        EventKind::Vanished
    } else if flags & EVENT_F_ACCEPT != 0 {
        EventKind::Accept
    } else {
        EventKind::Handoff
    };
    Ok(Transition {
        ts_ns: u64_at(buf, offset_of!(StateEvent, ts_ns)),
        conn_id: u64_at(buf, offset_of!(StateEvent, conn_id)),
        skaddr: u64_at(buf, offset_of!(StateEvent, skaddr)),
        task: Task {
            pid: (pid_tgid >> 32) as u32,
            tid: pid_tgid as u32,
            comm: Comm(arr16(buf, offset_of!(StateEvent, comm))),
        },
        local: SocketAddr::new(saddr, sport),
        remote: SocketAddr::new(daddr, dport),
        old,
        new,
        starts_conn: flags & EVENT_F_NEW_CONN != 0,
        midlife: flags & EVENT_F_MIDLIFE != 0,
        cpu: u32_at(buf, offset_of!(StateEvent, cpu)),
        owner: known.then(|| Task {
            pid: u32_at(buf, o + offset_of!(Owner, tgid)),
            tid: u32_at(buf, o + offset_of!(Owner, pid)),
            comm: Comm(arr16(buf, o + offset_of!(Owner, comm))),
        }),
        meta,
        kind,
    })
}

/// The bytes the kernel would have written for `ev` (tests and synthetic benchmarks).
pub fn encode(ev: &StateEvent) -> [u8; STATE_EVENT_SIZE] {
    let mut out = [0u8; STATE_EVENT_SIZE];
    // SAFETY: StateEvent is #[repr(C)], plain integers, no padding (size asserted in common).
    let bytes = unsafe {
        std::slice::from_raw_parts((ev as *const StateEvent).cast::<u8>(), STATE_EVENT_SIZE)
    };
    out.copy_from_slice(bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StateEvent {
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        saddr[4..].fill(0xEE); // junk beyond the v4 address must be ignored
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&[10, 0, 0, 5]);
        let mut comm = [0u8; 16];
        comm[..6].copy_from_slice(b"client");
        StateEvent {
            ts_ns: 123_456_789,
            skaddr: 0xffff_8880_1234_5678,
            conn_id: (7 << 12) | 1,
            pid_tgid: (4242u64 << 32) | 4243,
            saddr,
            daddr,
            comm,
            sport: 40_000,
            dport: 5432,
            family: AF_INET,
            oldstate: 2,
            newstate: 1,
            flags: EVENT_F_NEW_CONN,
            cpu: 1,
            owner: Owner::default(),
            netns: 4026531840,
            _pad: 0,
        }
    }

    #[test]
    fn decodes_every_field_of_a_v4_event() {
        let t = decode(&encode(&sample())).expect("valid event");
        assert_eq!(t.ts_ns, 123_456_789);
        assert_eq!(t.conn_id, (7 << 12) | 1);
        assert_eq!(t.skaddr, 0xffff_8880_1234_5678);
        assert_eq!((t.task.pid, t.task.tid), (4242, 4243));
        assert_eq!(t.task.comm.as_str(), "client");
        assert_eq!(t.local.to_string(), "127.0.0.1:40000");
        assert_eq!(t.remote.to_string(), "10.0.0.5:5432");
        assert_eq!((t.old, t.new), (TcpState::SynSent, TcpState::Established));
        assert!(t.starts_conn && !t.midlife);
        assert_eq!(t.cpu, 1);
        assert_eq!(t.owner, None, "no owner unless the kernel says it knows it");
        assert_eq!(t.meta.owner_via, OwnerVia::Unknown);
        assert_eq!(t.meta.netns, 4026531840);
    }

    #[test]
    fn decodes_the_owner_when_the_kernel_knows_it() {
        let mut ev = sample();
        ev.flags |= EVENT_F_OWNER_KNOWN;
        ev.owner = Owner {
            tgid: 900,
            pid: 901,
            uid: 1000,
            source: tcptrace_common::OWNER_SRC_CONNECT,
            cgroup_id: 77,
            comm: *b"leaky-server\0\0\0\0",
        };
        let t = decode(&encode(&ev)).expect("valid event");
        let owner = t.owner.expect("owner known");
        assert_eq!((owner.pid, owner.tid), (900, 901));
        assert_eq!(owner.comm.as_str(), "leaky-server");
        assert_eq!(
            t.meta,
            ConnMeta {
                owner_via: OwnerVia::Connect,
                uid: 1000,
                cgroup_id: 77,
                netns: 4026531840,
                unaccepted: false,
                container: [0; 12],
            }
        );
        assert_eq!(t.kind, EventKind::State);
        ev.flags |= EVENT_F_ACCEPT | EVENT_F_UNACCEPTED;
        let t = decode(&encode(&ev)).expect("valid event");
        assert_eq!(t.kind, EventKind::Accept);
        assert!(t.meta.unaccepted);
        let mut gone = sample();
        gone.flags = EVENT_F_VANISHED | EVENT_F_OWNER_KNOWN;
        gone.oldstate = 4;
        gone.newstate = 4;
        let g = decode(&encode(&gone)).expect("valid event");
        assert_eq!(
            (g.kind, g.old, g.new),
            (EventKind::Vanished, TcpState::FinWait1, TcpState::FinWait1)
        );
        // The task that happened to run stays what it was.
        assert_eq!(t.task.pid, 4242);
    }

    #[test]
    fn decodes_v6_and_v4_mapped_addresses() {
        let mut ev = sample();
        ev.family = AF_INET6;
        ev.saddr = std::net::Ipv6Addr::LOCALHOST.octets();
        ev.daddr = std::net::Ipv4Addr::new(192, 0, 2, 1)
            .to_ipv6_mapped()
            .octets();
        let t = decode(&encode(&ev)).expect("valid event");
        assert_eq!(t.local.to_string(), "[::1]:40000");
        assert_eq!(t.remote.to_string(), "192.0.2.1:5432");
    }

    #[test]
    fn short_long_and_garbled_buffers_are_errors_not_panics() {
        let good = encode(&sample());
        for len in [0, 1, 8, STATE_EVENT_SIZE - 1] {
            assert_eq!(decode(&good[..len]), Err(DecodeError::Length { got: len }));
        }
        let mut long = good.to_vec();
        long.push(0);
        assert_eq!(
            decode(&long),
            Err(DecodeError::Length {
                got: STATE_EVENT_SIZE + 1
            })
        );

        let mut ev = sample();
        ev.newstate = 0;
        assert_eq!(decode(&encode(&ev)), Err(DecodeError::State(0)));
        ev.newstate = 200;
        assert_eq!(decode(&encode(&ev)), Err(DecodeError::State(200)));
        let mut ev = sample();
        ev.family = 1;
        assert_eq!(decode(&encode(&ev)), Err(DecodeError::Family(1)));

        // Every byte pattern of the right length decodes or errors; none panics.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            let mut buf = [0u8; STATE_EVENT_SIZE];
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let _ = decode(&buf);
        }
    }
}
