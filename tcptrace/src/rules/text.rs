//! Wording shared by the rules' one-line messages: ages, owners, peers, counts.

use crate::event::Task;
use std::net::SocketAddr;

/// A short age: `850ms`, `1.5s`, `30s`, `12m`, `12m03s`, `2h05m`, `3d04h`.
pub fn age(ns: u64) -> String {
    const MS: u64 = 1_000_000;
    const S: u64 = 1_000 * MS;
    match ns {
        0..1_000 => format!("{ns}ns"),
        1_000..MS => format!("{}µs", ns / 1_000),
        MS..S => format!("{}ms", ns / MS),
        S..60_000_000_000 => {
            let tenths = ns / (S / 10);
            if tenths.is_multiple_of(10) {
                format!("{}s", tenths / 10)
            } else {
                format!("{}.{}s", tenths / 10, tenths % 10)
            }
        }
        _ => {
            let s = ns / S;
            match s {
                0..3_600 if s.is_multiple_of(60) => format!("{}m", s / 60),
                0..3_600 => format!("{}m{:02}s", s / 60, s % 60),
                3_600..86_400 => format!("{}h{:02}m", s / 3_600, s % 3_600 / 60),
                _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3_600),
            }
        }
    }
}

/// `pid 4242 (leaky-server)`, or `unknown owner`.
pub fn owner(t: Option<&Task>) -> String {
    match t {
        Some(t) => format!("pid {} ({})", t.pid, t.comm),
        None => "unknown owner".to_string(),
    }
}

/// The grouping key for an owner: `pid=4242` or `owner=unknown`.
pub fn owner_key(pid: Option<u32>) -> String {
    match pid {
        Some(p) => format!("pid={p}"),
        None => "owner=unknown".to_string(),
    }
}

/// `10.0.0.5:5432`, `[::1]:80`; port 0 means "any port" and prints the address alone.
pub fn peer(a: &SocketAddr) -> String {
    if a.port() == 0 {
        a.ip().to_string()
    } else {
        a.to_string()
    }
}

/// `1 socket`, `500 sockets`.
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Comm;

    #[test]
    fn ages_read_naturally() {
        assert_eq!(age(999), "999ns");
        assert_eq!(age(1_500), "1µs");
        assert_eq!(age(850_000_000), "850ms");
        assert_eq!(age(1_500_000_000), "1.5s");
        assert_eq!(age(30_000_000_000), "30s");
        assert_eq!(age(720_000_000_000), "12m");
        assert_eq!(age(723_000_000_000), "12m03s");
        assert_eq!(age(7_500_000_000_000), "2h05m");
        assert_eq!(age(273_600_000_000_000), "3d04h");
        assert_eq!(age(u64::MAX), "213503d23h");
    }

    #[test]
    fn owners_and_peers() {
        let t = Task {
            pid: 4242,
            tid: 4243,
            comm: Comm::new("leaky-server"),
        };
        assert_eq!(owner(Some(&t)), "pid 4242 (leaky-server)");
        assert_eq!(owner(None), "unknown owner");
        assert_eq!(owner_key(Some(7)), "pid=7");
        assert_eq!(owner_key(None), "owner=unknown");
        assert_eq!(peer(&"10.0.0.5:5432".parse().unwrap()), "10.0.0.5:5432");
        assert_eq!(peer(&"10.0.0.5:0".parse().unwrap()), "10.0.0.5");
        assert_eq!(peer(&"[::1]:80".parse().unwrap()), "[::1]:80");
        assert_eq!(count(1, "socket", "sockets"), "1 socket");
        assert_eq!(count(500, "socket", "sockets"), "500 sockets");
    }
}
