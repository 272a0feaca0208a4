//! Turning the kernel's CLOCK_MONOTONIC timestamps into wall-clock time, and durations
//! into short human text.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Maps CLOCK_MONOTONIC nanoseconds to Unix time, with an offset taken once at start.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    offset_ns: i128,
}

impl WallClock {
    /// `offset_ns` = realtime − monotonic, measured by the caller (see `kernel::wall_offset_ns`).
    pub fn new(offset_ns: i128) -> WallClock {
        WallClock { offset_ns }
    }

    /// For logs that carry no kernel clock: monotonic ns are taken as Unix ns.
    pub fn identity() -> WallClock {
        WallClock { offset_ns: 0 }
    }

    pub fn unix_ns(&self, mono_ns: u64) -> i128 {
        i128::from(mono_ns) + self.offset_ns
    }

    pub fn system_time(&self, mono_ns: u64) -> SystemTime {
        let ns = self.unix_ns(mono_ns).max(0) as u128;
        UNIX_EPOCH + Duration::new((ns / 1_000_000_000) as u64, (ns % 1_000_000_000) as u32)
    }

    /// RFC 3339 UTC with nanoseconds, e.g. `2026-11-24T00:21:09.123456789Z`.
    pub fn rfc3339(&self, mono_ns: u64) -> String {
        humantime::format_rfc3339_nanos(self.system_time(mono_ns)).to_string()
    }

    /// Local `HH:MM:SS.mmm`, as a terminal user reads time.
    pub fn local_hms(&self, mono_ns: u64) -> String {
        let ns = self.unix_ns(mono_ns).max(0);
        let secs = (ns / 1_000_000_000) as libc::time_t;
        let ms = ((ns / 1_000_000) % 1000) as u32;
        // SAFETY: localtime_r writes into the tm we own.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        unsafe { libc::localtime_r(&secs, &mut tm) };
        format!(
            "{:02}:{:02}:{:02}.{ms:03}",
            tm.tm_hour, tm.tm_min, tm.tm_sec
        )
    }
}

/// RFC 3339 formatting for a stream of nearby timestamps: the `YYYY-MM-DDTHH:MM:SS.` prefix
/// is computed once per second and reused, so a busy stream pays for nine digits per event.
#[derive(Debug, Default)]
pub struct Rfc3339Cache {
    sec: Option<i128>,
    prefix: Vec<u8>,
}

impl Rfc3339Cache {
    /// Appends `mono_ns` as RFC 3339 UTC with nanoseconds (same text as `WallClock::rfc3339`).
    pub fn push(&mut self, clock: &WallClock, mono_ns: u64, out: &mut Vec<u8>) {
        let mut buf = [0u8; 64];
        let n = self.put(clock, mono_ns, &mut buf);
        out.extend_from_slice(&buf[..n]);
    }

    /// Writes `mono_ns` as [`push`](Self::push) does at the start of `out` (at least 48
    /// bytes long: some bytes past the text are overwritten); returns the length written.
    #[inline]
    pub fn put(&mut self, clock: &WallClock, mono_ns: u64, out: &mut [u8]) -> usize {
        let unix = clock.unix_ns(mono_ns).max(0);
        let sec = unix / 1_000_000_000;
        if self.sec != Some(sec) {
            let full = clock.rfc3339(mono_ns);
            // "…:SS.nnnnnnnnnZ": keep everything up to and including the dot.
            self.prefix.clear();
            self.prefix
                .extend_from_slice(&full.as_bytes()[..full.len() - 10]);
            self.sec = Some(sec);
        }
        let p = self.prefix.len();
        out[..p].copy_from_slice(&self.prefix);
        // Nine digits, zero-padded: the ten digits of 1e9 + nanos without their leading 1.
        let nanos = (unix % 1_000_000_000) as u64;
        let mut digits = [0u8; 20];
        super::ndjson::decimal(1_000_000_000 + nanos, &mut digits);
        out[p..p + 9].copy_from_slice(&digits[1..10]);
        out[p + 9] = b'Z';
        p + 10
    }
}

/// Local `HH:MM:SS.mmm` for a stream of nearby timestamps: `localtime_r` once per second,
/// not once per line.
#[derive(Debug, Default)]
pub struct HmsCache {
    sec: Option<i128>,
    hms: String,
}

impl HmsCache {
    /// Writes `mono_ns` as local `HH:MM:SS.mmm` (the same text as `WallClock::local_hms`).
    pub fn write(
        &mut self,
        w: &mut impl std::io::Write,
        clock: &WallClock,
        mono_ns: u64,
    ) -> std::io::Result<()> {
        let ns = clock.unix_ns(mono_ns).max(0);
        let sec = ns / 1_000_000_000;
        if self.sec != Some(sec) {
            let full = clock.local_hms(mono_ns);
            self.hms.clear();
            self.hms.push_str(&full[..8]);
            self.sec = Some(sec);
        }
        write!(w, "{}.{:03}", self.hms, (ns / 1_000_000) % 1000)
    }
}

/// A duration in the unit that reads best: `0.052ms`, `12.3ms`, `4.2s`, `12m`, `3h05m`.
pub fn human(ns: u64) -> String {
    let ms = ns as f64 / 1e6;
    if ms < 10.0 {
        format!("{ms:.3}ms")
    } else if ms < 1000.0 {
        format!("{ms:.1}ms")
    } else if ns < 60_000_000_000 {
        format!("{:.1}s", ns as f64 / 1e9)
    } else if ns < 3_600_000_000_000 {
        format!("{}m{:02}s", ns / 60_000_000_000, (ns / 1_000_000_000) % 60)
    } else {
        format!(
            "{}h{:02}m",
            ns / 3_600_000_000_000,
            (ns / 60_000_000_000) % 60
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_in_the_right_unit() {
        assert_eq!(human(52_000), "0.052ms");
        assert_eq!(human(12_345_678), "12.3ms");
        assert_eq!(human(4_200_000_000), "4.2s");
        assert_eq!(human(12 * 60_000_000_000 + 5_000_000_000), "12m05s");
        assert_eq!(human(3 * 3_600_000_000_000 + 5 * 60_000_000_000), "3h05m");
    }

    #[test]
    fn the_cached_formatter_writes_what_the_plain_one_does() {
        let c = WallClock::new(1_700_000_000_000_000_000);
        let mut cache = Rfc3339Cache::default();
        for ns in [
            0,
            123,
            999_999_999,
            1_000_000_000,
            1_000_000_001,
            86_400_000_000_123,
        ] {
            let mut s = Vec::new();
            cache.push(&c, ns, &mut s);
            assert_eq!(String::from_utf8(s).unwrap(), c.rfc3339(ns), "at {ns}");
        }
    }

    #[test]
    fn the_cached_local_time_writes_what_the_plain_one_does() {
        let c = WallClock::new(1_700_000_000_000_000_000);
        let mut cache = HmsCache::default();
        for ns in [0, 999_999_999, 1_000_000_000, 61_500_000_000] {
            let mut out = Vec::new();
            cache.write(&mut out, &c, ns).unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), c.local_hms(ns), "at {ns}");
        }
    }

    #[test]
    fn wall_clock_applies_the_offset() {
        let c = WallClock::new(1_700_000_000_000_000_000);
        assert_eq!(c.rfc3339(123), "2023-11-14T22:13:20.000000123Z");
        assert_eq!(WallClock::identity().unix_ns(5), 5);
        assert_eq!(c.local_hms(0).len(), "HH:MM:SS.mmm".len());
    }
}
