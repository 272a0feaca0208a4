//! The in-kernel filters' flags, validated and turned into the program's `Filter` global.
//! Pure: no aya, no kernel; the loader only writes the result.

use std::net::IpAddr;

use clap::Args;
use tcptrace_common::{
    AF_INET, AF_INET6, Cidr, FILTER_COMM, FILTER_FAMILY, FILTER_LADDR, FILTER_NETNS, FILTER_PID,
    FILTER_PORTS, FILTER_RADDR, Filter, MAX_FILTER_PORTS,
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
        value_delimiter = ',',
        value_parser = parse_port
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
        env = "TCPTRACE_IPV4",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub ipv4: bool,
    /// IPv6 sockets only (an IPv4-mapped address on a v6 socket counts as IPv6).
    #[arg(short = '6', long = "ipv6", env = "TCPTRACE_IPV6", value_parser = clap::builder::BoolishValueParser::new())]
    pub ipv6: bool,
    /// Keep connections owned by this process id.
    #[arg(long, env = "TCPTRACE_PID")]
    pub pid: Option<u32>,
    /// Keep connections owned by a process with this command name (at most 15 bytes).
    #[arg(long, env = "TCPTRACE_COMM")]
    pub comm: Option<String>,
    /// Keep sockets of this network namespace: a path to it (/run/netns/NAME,
    /// /proc/PID/ns/net) or its inode number as `ip netns`/`lsns` show it.
    #[arg(long, value_name = "NETNS", value_parser = parse_netns, env = "TCPTRACE_NETNS")]
    pub netns: Option<u32>,
    /// Keep connections whose owner is in this cgroup (v2) or below it: a path relative
    /// to the cgroup v2 mount, or absolute. Applied in the daemon, not the kernel.
    #[arg(long, value_name = "PATH", env = "TCPTRACE_CGROUP")]
    pub cgroup: Option<String>,
    /// Keep connections whose owner runs in this container (id or a prefix of 4+ hex
    /// digits, found in the owner's cgroup path). Applied in the daemon, not the kernel.
    #[arg(long, value_name = "ID", env = "TCPTRACE_CONTAINER")]
    pub container: Option<String>,
}

/// A port to filter on: 1-65535 (port 0 is what a connecting socket carries before the
/// kernel picks its local port, and a listener's remote port: it would match the wrong things).
fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(0) => Err("port 0 matches no connection (give 1-65535)".into()),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("{s:?} is not a port (1-65535)")),
    }
}

/// A network namespace named by path (its inode), by number, or as `net:[N]`.
pub fn parse_netns(s: &str) -> Result<u32, String> {
    let digits = s
        .strip_prefix("net:[")
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    if let Ok(n) = digits.parse::<u32>() {
        return Ok(n);
    }
    use std::os::unix::fs::MetadataExt;
    let file = std::fs::File::open(s).map_err(|e| {
        format!("--netns {s:?}: not a namespace inode number nor a readable namespace path ({e})")
    })?;
    if !is_net_namespace(&file) {
        return Err(format!(
            "--netns {s:?} is not a network namespace (give /run/netns/NAME, /proc/PID/ns/net or an inode number)"
        ));
    }
    let ino = file
        .metadata()
        .map_err(|e| format!("--netns {s:?}: {e}"))?
        .ino();
    u32::try_from(ino).map_err(|_| format!("--netns {s:?}: inode {ino} is too large"))
}

/// Whether `file` is a namespace file (nsfs) of a network namespace: the kernel's
/// NS_GET_NSTYPE answers CLONE_NEWNET. Any other file (a regular one, another kind of
/// namespace) would otherwise name a made-up inode and trace nothing.
fn is_net_namespace(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd as _;
    /// `_IO(0xb7, 0x3)` from linux/nsfs.h.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an ioctl without arguments on a file we own; it only returns a value.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    kind == libc::CLONE_NEWNET
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrArg {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl CidrArg {
    /// Whether `ip` is inside the prefix, as the kernel filter decides it (a v4 prefix also
    /// matches a v4 address shown as such after unmapping).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (a, b): (Vec<u8>, Vec<u8>) = match (self.addr, ip) {
            (IpAddr::V4(p), IpAddr::V4(x)) => (p.octets().to_vec(), x.octets().to_vec()),
            (IpAddr::V6(p), IpAddr::V6(x)) => (p.octets().to_vec(), x.octets().to_vec()),
            _ => return false,
        };
        let mut bits = u32::from(self.prefix_len);
        for (x, y) in a.iter().zip(&b) {
            if bits == 0 {
                break;
            }
            let take = bits.min(8);
            let mask = (0xffu16 << (8 - take)) as u8;
            if (x ^ y) & mask != 0 {
                return false;
            }
            bits -= take;
        }
        true
    }
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
    let family = if c.addr.is_ipv4() { AF_INET } else { AF_INET6 };
    Cidr {
        addr: crate::event::ip_to_wire(c.addr),
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
        if let Some(ns) = self.netns {
            f.flags |= FILTER_NETNS;
            f.netns = ns;
        }
        Ok(f)
    }
}

/// Whether a network namespace with this inode is in use now: a process is in it, or a
/// bind mount under /run/netns (`ip netns add`) keeps it. One held only by an open file
/// or one thread is not looked for (that would mean reading every task's files).
pub fn netns_exists(inode: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let want = format!("net:[{inode}]");
    let in_proc = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::read_link(e.path().join("ns/net"))
                .is_ok_and(|l| l.as_os_str() == want.as_str())
        });
    in_proc
        || std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.ino() == u64::from(inode)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_contains() {
        let c = parse_cidr("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        assert!(parse_cidr("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(
            parse_cidr("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
    }

    #[test]
    fn netns_exists_finds_our_own_and_not_an_unused_inode() {
        let own = parse_netns("/proc/self/ns/net").unwrap();
        assert!(netns_exists(own));
        // Namespace inodes come from the proc inode allocator, above 0xF0000000.
        assert!(!netns_exists(12345));
    }

    #[test]
    fn netns_by_number_path_or_lsns_form() {
        assert_eq!(parse_netns("4026531840"), Ok(4026531840));
        assert_eq!(parse_netns("net:[4026531840]"), Ok(4026531840));
        use std::os::unix::fs::MetadataExt;
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino() as u32;
        assert_eq!(parse_netns("/proc/self/ns/net"), Ok(own));
        // A file that is not a network namespace names no namespace: refused, not traced
        // as a made-up inode.
        for other in ["/proc/self/ns/uts", "/proc/self/status"] {
            let e = parse_netns(other).unwrap_err();
            assert!(e.contains("is not a network namespace"), "{other}: {e}");
        }
        let e = parse_netns("/no/such/netns").unwrap_err();
        assert!(
            e.starts_with("--netns \"/no/such/netns\": not a namespace"),
            "{e}"
        );
        let f = FilterArgs {
            netns: Some(7),
            ..FilterArgs::default()
        }
        .to_kernel()
        .unwrap();
        assert_eq!((f.flags, f.netns), (FILTER_NETNS, 7));
    }

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
