//! Eight bytes at a time: the masks, digit and hex runs the line scanner is built on, and
//! the dotted-quad reader.

use std::net::Ipv4Addr;

pub(crate) const ONES: u64 = 0x0101_0101_0101_0101;
pub(crate) const HIGHS: u64 = 0x8080_8080_8080_8080;

pub(super) const POW10: [u64; 9] = [
    1,
    10,
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    100_000_000,
];

// The masks below flag bytes by their high bit. They are exact only up to the first
// flagged byte (a borrow or carry out of a flagged byte may flag some after it), which is
// all their users look at: the first flagged byte, via trailing_zeros.

/// The first byte of `w` that is zero.
#[inline(always)]
pub(crate) fn first_zero(w: u64) -> u64 {
    w.wrapping_sub(ONES) & !w & HIGHS
}

/// The first byte of `w` a plain string scan must stop at: `"`, `\`, a control character
/// (below 0x20) or a non-ASCII byte.
#[inline(always)]
pub(crate) fn special_bytes(w: u64) -> u64 {
    let quote = first_zero(w ^ (ONES * u64::from(b'"')));
    let backslash = first_zero(w ^ (ONES * u64::from(b'\\')));
    // Below 0x20 borrows into the high bit; 0x80 and above has it already.
    let control_or_high = (w.wrapping_sub(ONES * 0x20) | w) & HIGHS;
    quote | backslash | control_or_high
}

/// The first byte of `w` that is not a decimal digit.
#[inline(always)]
pub(super) fn non_digits(w: u64) -> u64 {
    // Below b'0' borrows into the high bit, above b'9' carries into it (adding 0x46 takes
    // 0x3a to 0x80), 0x80 and above has it already.
    (w.wrapping_sub(ONES * 0x30) | w.wrapping_add(ONES * 0x46) | w) & HIGHS
}

/// The decimal digits at the start of the 8 bytes in `w` (little-endian: first byte
/// lowest): how many, and their value.
#[inline(always)]
pub(super) fn swar_digits(w: u64) -> (usize, u32) {
    let count = (non_digits(w).trailing_zeros() / 8) as usize;
    if count == 0 {
        return (0, 0);
    }
    // Drop the bytes after the digits: they become leading zeros of an 8-digit number.
    // Then pairs, quads and the eight combine by multiplication (as simdjson does).
    let v = (w << (8 * (8 - count))) & (ONES * 0x0f);
    let v = v.wrapping_mul(10 * (1 << 8) + 1) >> 8;
    let v = (v & 0x00ff_00ff_00ff_00ff).wrapping_mul(100 * (1 << 16) + 1) >> 16;
    let v = (v & 0x0000_ffff_0000_ffff).wrapping_mul(10_000 * (1 << 32) + 1) >> 32;
    (count, v as u32)
}

/// Per byte of `w`: the high bit set when `lo <= byte <= hi` (both below 0x80). Exact in
/// every byte (no carries cross bytes), as `swar_hex` needs to complement it.
#[inline(always)]
pub(super) fn bytes_in(w: u64, lo: u8, hi: u8) -> u64 {
    let low7 = w & !HIGHS;
    let at_least_lo = low7 + ONES * u64::from(0x80 - lo);
    let above_hi = low7 + ONES * u64::from(0x7f - hi);
    at_least_lo & !above_hi & !w & HIGHS
}

/// The hex digits (either case) at the start of the 8 bytes in `w`: how many, and their
/// value.
#[inline(always)]
pub(super) fn swar_hex(w: u64) -> (usize, u32) {
    let digit = bytes_in(w, b'0', b'9');
    // Setting 0x20 takes `A`..=`F` to `a`..=`f` and no other byte there.
    let letter = bytes_in(w | (ONES * 0x20), b'a', b'f');
    let count = ((!(digit | letter) & HIGHS).trailing_zeros() / 8) as usize;
    if count == 0 {
        return (0, 0);
    }
    // Nibble values (a letter's low nibble plus 9), first digit in the lowest byte; keep
    // the digits, put the first one highest, then pack pairs, quads and the eight.
    let v = (w & (ONES * 0x0f)) + (letter >> 7) * 9;
    let v = if count < 8 {
        v & ((1 << (8 * count)) - 1)
    } else {
        v
    };
    let v = v.swap_bytes();
    let v = (v | (v >> 4)) & 0x00ff_00ff_00ff_00ff;
    let v = (v | (v >> 8)) & 0x0000_ffff_0000_ffff;
    let v = (v | (v >> 16)) & 0xffff_ffff;
    (count, (v >> (4 * (8 - count))) as u32)
}

/// A run of more than nineteen digits, with the overflow checks the fast loop leaves out.
#[cold]
pub(super) fn checked_decimal(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |n, &c| {
        n.checked_mul(10)?.checked_add(u64::from(c - b'0'))
    })
}

/// A dotted quad exactly as std reads one (1–3 digits per octet, at most 255, no leading
/// zero), without std's general parser; None for anything else, which std then reads.
#[inline(always)]
pub(super) fn ipv4(s: &[u8]) -> Option<Ipv4Addr> {
    ipv4_prefix(s).and_then(|(a, n)| (n == s.len()).then_some(a))
}

/// As [`ipv4`], on the start of `s`: the address and how many bytes it took.
#[inline(always)]
pub(super) fn ipv4_prefix(s: &[u8]) -> Option<(Ipv4Addr, usize)> {
    let mut octets = [0u8; 4];
    let mut i = 0;
    for (k, octet) in octets.iter_mut().enumerate() {
        if k > 0 {
            if s.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
        let start = i;
        let mut v: u32 = 0;
        while let Some(&c) = s.get(i) {
            let d = c.wrapping_sub(b'0');
            if d > 9 || i - start == 3 {
                break;
            }
            v = v * 10 + u32::from(d);
            i += 1;
        }
        let len = i - start;
        if len == 0 || v > 255 || (len > 1 && s[start] == b'0') {
            return None;
        }
        *octet = v as u8;
    }
    Some((Ipv4Addr::from(octets), i))
}
