//! The compact per-connection record the engine keeps while a connection is open, and the
//! byte encoding of its state path. Kept small on purpose: at a million open connections
//! every byte here costs a megabyte.

use crate::event::TcpState;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::lifecycle::Role;

/// Path bytes stored inside [`Conn`]; longer paths move to the engine's spill map.
pub const PATH_INLINE: usize = 27;
/// Path bytes kept at most per connection: legal paths need ~40, so only garbage hits this.
pub const PATH_MAX: usize = 255;

pub const F_PARTIAL_START: u16 = 1 << 0;
pub const F_GAP: u16 = 1 << 1;
pub const F_ILLEGAL: u16 = 1 << 2;
pub const F_LOCAL_V6: u16 = 1 << 3;
pub const F_REMOTE_V6: u16 = 1 << 4;
/// CLOCK eviction's "used since the hand last passed" bit.
pub const F_REFERENCED: u16 = 1 << 5;
pub const F_SPILLED: u16 = 1 << 6;
pub const F_TRUNCATED: u16 = 1 << 7;
/// The current state was reached through lost events: when it began is unknown.
pub const F_ENTRY_UNKNOWN: u16 = 1 << 8;

/// Step byte: low nibble is the state number; these flag the rest.
const STEP_NO_TS: u8 = 0x80;
const STEP_GAP: u8 = 0x40;

/// One tracked connection: 96 bytes (asserted in tests).
#[derive(Clone, Debug)]
pub struct Conn {
    pub conn_id: u64,
    /// First observed transition; the base of the path's time deltas.
    pub first_ts: u64,
    /// Time of the last step with a known time (normally: when the current state began).
    pub last_ts: u64,
    pub local_ip: [u8; 16],
    pub remote_ip: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    /// Interned owner, 0 = unknown.
    pub owner: u32,
    /// Inode of the socket's network namespace; 0 when unknown.
    pub netns: u32,
    /// Kernel state number; 0 marks a free slab slot.
    pub state: u8,
    pub role: Role,
    pub flags: u16,
    pub path_len: u8,
    pub path: [u8; PATH_INLINE],
}

impl Conn {
    pub const EMPTY: Conn = Conn {
        conn_id: 0,
        first_ts: 0,
        last_ts: 0,
        local_ip: [0; 16],
        remote_ip: [0; 16],
        local_port: 0,
        remote_port: 0,
        owner: 0,
        netns: 0,
        state: 0,
        role: Role::Unknown,
        flags: 0,
        path_len: 0,
        path: [0; PATH_INLINE],
    };

    pub fn fresh(conn_id: u64, ts: u64, state: TcpState, role: Role) -> Conn {
        Conn {
            conn_id,
            first_ts: ts,
            last_ts: ts,
            state: state as u8,
            role,
            ..Conn::EMPTY
        }
    }

    pub fn is_free(&self) -> bool {
        self.state == 0
    }

    pub fn state(&self) -> Option<TcpState> {
        TcpState::from_kernel(self.state)
    }

    pub fn has(&self, f: u16) -> bool {
        self.flags & f != 0
    }

    pub fn local(&self) -> SocketAddr {
        unpack(&self.local_ip, self.local_port, self.has(F_LOCAL_V6))
    }

    pub fn remote(&self) -> SocketAddr {
        unpack(&self.remote_ip, self.remote_port, self.has(F_REMOTE_V6))
    }

    /// Takes each address and port the event knows: the SYN_SENT event lacks the local
    /// port and a child's first event carries its listener's addresses, so a zero never
    /// overwrites what a fuller event already told us.
    pub fn absorb_tuple(&mut self, local: &SocketAddr, remote: &SocketAddr) {
        absorb(
            &mut self.local_ip,
            &mut self.local_port,
            &mut self.flags,
            F_LOCAL_V6,
            local,
        );
        absorb(
            &mut self.remote_ip,
            &mut self.remote_port,
            &mut self.flags,
            F_REMOTE_V6,
            remote,
        );
    }

    /// Appends the origin or a gap step: a state whose start we did not see.
    pub fn push_untimed(&mut self, spill: &mut Spill, state: TcpState, gap: bool) {
        let b = state as u8 | STEP_NO_TS | if gap { STEP_GAP } else { 0 };
        self.push_bytes(spill, &[b]);
    }

    /// Appends a state entered at `ts`; `ts` becomes the next delta's base.
    pub fn push_timed(&mut self, spill: &mut Spill, state: TcpState, ts: u64) {
        let mut buf = [0u8; 11];
        buf[0] = state as u8;
        let n = 1 + write_varint(&mut buf[1..], zigzag(ts.wrapping_sub(self.last_ts) as i64));
        // Once truncated nothing more is encoded, so the delta base may move on regardless.
        self.push_bytes(spill, &buf[..n]);
        self.last_ts = ts;
    }

    fn push_bytes(&mut self, spill: &mut Spill, bytes: &[u8]) -> bool {
        if self.has(F_TRUNCATED) {
            return false;
        }
        let len = usize::from(self.path_len);
        if !self.has(F_SPILLED) && len + bytes.len() <= PATH_INLINE {
            self.path[len..len + bytes.len()].copy_from_slice(bytes);
            self.path_len += bytes.len() as u8;
            return true;
        }
        let v = spill.entry(self.conn_id).or_insert_with(|| {
            let mut v = Vec::with_capacity(2 * PATH_INLINE);
            v.extend_from_slice(&self.path[..len]);
            v
        });
        self.flags |= F_SPILLED;
        if v.len() + bytes.len() > PATH_MAX {
            self.flags |= F_TRUNCATED;
            return false;
        }
        v.extend_from_slice(bytes);
        true
    }

    /// The encoded path (inline or spilled).
    pub fn path_bytes<'a>(&'a self, spill: &'a Spill) -> &'a [u8] {
        if self.has(F_SPILLED) {
            spill.get(&self.conn_id).map_or(&[][..], |v| v.as_slice())
        } else {
            &self.path[..usize::from(self.path_len)]
        }
    }
}

/// Paths that outgrew [`Conn::path`], by conn_id.
pub type Spill = super::IdMap<Vec<u8>>;

/// One decoded path step: the state, when it began (None if unseen), whether events were
/// lost just before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub state: Option<TcpState>,
    pub ts: Option<u64>,
    pub gap: bool,
}

/// Decodes a path without allocating.
pub struct Steps<'a> {
    bytes: &'a [u8],
    base: u64,
}

impl<'a> Steps<'a> {
    pub fn new(bytes: &'a [u8], first_ts: u64) -> Steps<'a> {
        Steps {
            bytes,
            base: first_ts,
        }
    }
}

impl Iterator for Steps<'_> {
    type Item = Step;
    fn next(&mut self) -> Option<Step> {
        let (&b, rest) = self.bytes.split_first()?;
        self.bytes = rest;
        let state = TcpState::from_kernel(b & 0x0F);
        let gap = b & STEP_GAP != 0;
        if b & STEP_NO_TS != 0 {
            return Some(Step {
                state,
                ts: None,
                gap,
            });
        }
        let (v, n) = read_varint(self.bytes);
        self.bytes = &self.bytes[n..];
        self.base = self.base.wrapping_add(unzigzag(v) as u64);
        Some(Step {
            state,
            ts: Some(self.base),
            gap,
        })
    }
}

fn absorb(ip: &mut [u8; 16], port: &mut u16, flags: &mut u16, v6_flag: u16, a: &SocketAddr) {
    if !a.ip().is_unspecified() {
        match a.ip() {
            IpAddr::V4(v4) => {
                *ip = v4.to_ipv6_mapped().octets();
                *flags &= !v6_flag;
            }
            IpAddr::V6(v6) => {
                *ip = v6.octets();
                *flags |= v6_flag;
            }
        }
    } else if *ip == [0; 16] {
        // Nothing known yet: keep at least the family of the wildcard.
        match a.ip() {
            IpAddr::V4(_) => *flags &= !v6_flag,
            IpAddr::V6(_) => *flags |= v6_flag,
        }
    }
    if a.port() != 0 {
        *port = a.port();
    }
}

fn unpack(ip: &[u8; 16], port: u16, v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::from(*ip)), port)
    } else {
        let v4 = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        SocketAddr::new(IpAddr::V4(v4), port)
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn write_varint(buf: &mut [u8], mut v: u64) -> usize {
    let mut i = 0;
    while v >= 0x80 {
        buf[i] = (v as u8) | 0x80;
        v >>= 7;
        i += 1;
    }
    buf[i] = v as u8;
    i + 1
}

/// Reads one LEB128 value; a truncated buffer yields what was read (never panics).
fn read_varint(bytes: &[u8]) -> (u64, usize) {
    let mut v = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return (v, i + 1);
        }
    }
    (v, bytes.len().min(10))
}

#[cfg(test)]
mod tests {
    use super::*;
    use TcpState::*;

    #[test]
    fn conn_stays_within_its_memory_budget() {
        assert_eq!(
            std::mem::size_of::<Conn>(),
            104,
            "Conn grew: recheck the 200 B/conn budget"
        );
    }

    #[test]
    fn varints_and_zigzag_round_trip_extremes() {
        for v in [0i64, 1, -1, 63, -64, 1 << 40, i64::MAX, i64::MIN] {
            let mut buf = [0u8; 10];
            let n = write_varint(&mut buf, zigzag(v));
            assert_eq!(read_varint(&buf[..n]), (zigzag(v), n));
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        assert_eq!(
            read_varint(&[0x80, 0x80]),
            (0, 2),
            "truncated input does not panic"
        );
    }

    #[test]
    fn path_round_trips_exact_times_including_backwards_and_spills() {
        let mut spill = Spill::default();
        let mut c = Conn::fresh(7, 1_000, Established, Role::Unknown);
        c.push_untimed(&mut spill, Close, false);
        let times = [1_000u64, 5, u64::MAX, 3_600_000_000_000, 2, 9_000_000_000];
        let states = [SynSent, Established, FinWait1, FinWait2, TimeWait, Close];
        for (s, t) in states.iter().zip(times) {
            c.push_timed(&mut spill, *s, t);
        }
        c.push_untimed(&mut spill, CloseWait, true);
        assert!(
            c.has(F_SPILLED),
            "{} bytes do not fit inline",
            spill[&7].len()
        );
        let got: Vec<Step> = Steps::new(c.path_bytes(&spill), 1_000).collect();
        assert_eq!(got.len(), 8);
        assert_eq!(
            got[0],
            Step {
                state: Some(Close),
                ts: None,
                gap: false
            }
        );
        for (i, (s, t)) in states.iter().zip(times).enumerate() {
            assert_eq!(
                got[i + 1],
                Step {
                    state: Some(*s),
                    ts: Some(t),
                    gap: false
                }
            );
        }
        assert_eq!(
            got[7],
            Step {
                state: Some(CloseWait),
                ts: None,
                gap: true
            }
        );
    }

    #[test]
    fn path_is_capped_and_marked_truncated() {
        let mut spill = Spill::default();
        let mut c = Conn::fresh(1, 0, Established, Role::Unknown);
        for i in 0..1_000u64 {
            c.push_timed(&mut spill, Established, i << 40);
        }
        assert!(c.has(F_TRUNCATED));
        assert!(c.path_bytes(&spill).len() <= PATH_MAX);
        let n = Steps::new(c.path_bytes(&spill), 0).count();
        assert!(n > 20 && n < 60, "{n} steps kept");
    }

    #[test]
    fn tuple_fills_in_and_zeros_never_overwrite() {
        let mut c = Conn::EMPTY;
        c.absorb_tuple(
            &"10.0.0.1:0".parse().unwrap(),
            &"10.0.0.5:5432".parse().unwrap(),
        );
        assert_eq!(c.local().to_string(), "10.0.0.1:0");
        c.absorb_tuple(
            &"0.0.0.0:40000".parse().unwrap(),
            &"0.0.0.0:0".parse().unwrap(),
        );
        assert_eq!(c.local().to_string(), "10.0.0.1:40000");
        assert_eq!(c.remote().to_string(), "10.0.0.5:5432");
        let mut v6 = Conn::EMPTY;
        v6.absorb_tuple(&"[::]:80".parse().unwrap(), &"[::]:0".parse().unwrap());
        assert_eq!(
            v6.local().to_string(),
            "[::]:80",
            "wildcard keeps its family"
        );
        v6.absorb_tuple(&"[::1]:80".parse().unwrap(), &"[::1]:5555".parse().unwrap());
        assert_eq!(
            (v6.local().to_string(), v6.remote().to_string()),
            ("[::1]:80".into(), "[::1]:5555".into())
        );
    }
}
