//! The in-kernel filters' flags, validated and turned into the program's `Filter` global.
//! Pure: no aya, no kernel; the loader only writes the result.

use std::net::IpAddr;

use clap::Args;
use tcptrace_common::{
    AF_INET, AF_INET6, Cidr, FILTER_COMM, FILTER_FAMILY, FILTER_LADDR, FILTER_PID, FILTER_PORTS,
    FILTER_RADDR, Filter, MAX_FILTER_PORTS,
};

/// Filters evaluated in the eBPF program: what they drop never reaches the ring buffer.
/// All given filters must match. Owner filters match the socket's owner (recorded in the
/// owner's own context, or inherited from its listener), never the task that happened to
/// run when the event fired.
#[derive(Args, Debug, Clone, Default)]
pub struct FilterArgs {
    /// Keep transitions whose local or remote port is PORT (repeat for up to 8 ports).
    #[arg(
        long = "port",
        value_name = "PORT",
        env = "TCPTRACE_PORT",
        value_delimiter = ','
    )]
    pub ports: Vec<u16>,
    /// Keep transitions whose local address is in CIDR (e.g. 10.0.0.0/8, ::1).
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr, env = "TCPTRACE_LADDR")]
    pub laddr: Option<CidrArg>,
    /// Keep transitions whose remote address is in CIDR.
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr, env = "TCPTRACE_RADDR")]
    pub raddr: Option<CidrArg>,
    /// IPv4 sockets only.
    #[arg(
        short = '4',
        long = "ipv4",
        conflicts_with = "ipv6",
        env = "TCPTRACE_IPV4"
    )]
    pub ipv4: bool,
    /// IPv6 sockets only (an IPv4-mapped address on a v6 socket counts as IPv6).
    #[arg(short = '6', long = "ipv6", env = "TCPTRACE_IPV6")]
    pub ipv6: bool,
    /// Keep connections owned by this process id.
    #[arg(long, env = "TCPTRACE_PID")]
    pub pid: Option<u32>,
    /// Keep connections owned by a process with this command name (at most 15 bytes).
    #[arg(long, env = "TCPTRACE_COMM")]
    pub comm: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrArg {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

pub fn parse_cidr(s: &str) -> Result<CidrArg, String> {
    let (a, p) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = a
        .trim_matches(|c| c == '[' || c == ']')
        .parse()
        .map_err(|_| format!("{s:?} is not an address or CIDR (examples: 10.0.0.0/8, ::1)"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix_len = match p {
        None => max,
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|n| *n <= max)
            .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
    };
    Ok(CidrArg { addr, prefix_len })
}

fn cidr(c: CidrArg) -> Cidr {
    let mut addr = [0u8; 16];
    let family = match c.addr {
        IpAddr::V4(a) => {
            addr[..4].copy_from_slice(&a.octets());
            AF_INET
        }
        IpAddr::V6(a) => {
            addr = a.octets();
            AF_INET6
        }
    };
    Cidr {
        addr,
        family,
        prefix_len: c.prefix_len,
        _pad: [0; 5],
    }
}

impl FilterArgs {
    /// The program's filter; an error sentence for what the kernel cannot do.
    pub fn to_kernel(&self) -> Result<Filter, String> {
        let mut f = Filter::default();
        if !self.ports.is_empty() {
            if self.ports.len() > MAX_FILTER_PORTS {
                return Err(format!(
                    "at most {MAX_FILTER_PORTS} --port filters are supported, {} were given",
                    self.ports.len()
                ));
            }
            f.flags |= FILTER_PORTS;
            f.n_ports = self.ports.len() as u16;
            f.ports[..self.ports.len()].copy_from_slice(&self.ports);
        }
        if self.ipv4 || self.ipv6 {
            f.flags |= FILTER_FAMILY;
            f.family = if self.ipv4 { AF_INET } else { AF_INET6 };
        }
        if let Some(c) = self.laddr {
            f.flags |= FILTER_LADDR;
            f.laddr = cidr(c);
        }
        if let Some(c) = self.raddr {
            f.flags |= FILTER_RADDR;
            f.raddr = cidr(c);
        }
        if let Some(pid) = self.pid {
            f.flags |= FILTER_PID;
            f.pid = pid;
        }
        if let Some(comm) = &self.comm {
            if comm.is_empty() || comm.len() > 15 {
                return Err(format!(
                    "--comm {comm:?}: a command name is 1 to 15 bytes (the kernel keeps no more)"
                ));
            }
            f.flags |= FILTER_COMM;
            f.comm[..comm.len()].copy_from_slice(comm.as_bytes());
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_with_and_without_prefix() {
        assert_eq!(
            parse_cidr("10.0.0.0/8"),
            Ok(CidrArg {
                addr: "10.0.0.0".parse().unwrap(),
                prefix_len: 8
            })
        );
        assert_eq!(parse_cidr("::1").unwrap().prefix_len, 128);
        assert_eq!(parse_cidr("[2001:db8::]/32").unwrap().prefix_len, 32);
        assert!(parse_cidr("10.0.0.0/33").unwrap_err().contains("0..=32"));
        assert!(
            parse_cidr("example.com")
                .unwrap_err()
                .contains("not an address")
        );
    }

    #[test]
    fn flags_become_the_kernel_filter() {
        let none = FilterArgs::default().to_kernel().unwrap();
        assert_eq!(none.flags, 0, "no flags keep everything");
        let f = FilterArgs {
            ports: vec![5432, 6379],
            raddr: Some(parse_cidr("10.1.0.0/16").unwrap()),
            ipv4: true,
            pid: Some(4242),
            comm: Some("postgres".into()),
            ..FilterArgs::default()
        }
        .to_kernel()
        .unwrap();
        assert_eq!(
            f.flags,
            FILTER_PORTS | FILTER_RADDR | FILTER_FAMILY | FILTER_PID | FILTER_COMM
        );
        assert_eq!((f.n_ports, &f.ports[..2]), (2, &[5432, 6379][..]));
        assert_eq!(
            (f.raddr.family, f.raddr.prefix_len, &f.raddr.addr[..4]),
            (AF_INET, 16, &[10, 1, 0, 0][..])
        );
        assert_eq!(f.family, AF_INET);
        assert_eq!(&f.comm[..9], b"postgres\0");
    }

    #[test]
    fn what_the_kernel_cannot_do_is_a_clear_error() {
        let many = FilterArgs {
            ports: (1..=9).collect(),
            ..FilterArgs::default()
        };
        assert!(many.to_kernel().unwrap_err().contains("at most 8 --port"));
        let long = FilterArgs {
            comm: Some("a-very-long-command".into()),
            ..FilterArgs::default()
        };
        assert!(long.to_kernel().unwrap_err().contains("1 to 15 bytes"));
    }
}
