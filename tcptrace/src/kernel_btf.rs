//! Where the kernel keeps what the tracepoint doesn't say: byte offsets of struct fields,
//! read from the running kernel's BTF, and the address of `tw_timer_handler` from
//! /proc/kallsyms. They let the eBPF side follow accept()'s fd to its socket, read a
//! socket's network namespace, and recognise timewait sockets' timers. A kernel without
//! one of them loses only the hook that needs it, with a warning.

use btf_rs::{Btf, Type};
use tcptrace_common::{KOFF_ACCEPT, KOFF_NETNS, KOFF_TIMEWAIT, KernelOffsets};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Byte offset of the member at `path` (dot-separated, anonymous unions and structs
/// searched through) inside `struct root`.
pub fn offset_of(btf: &Btf, root: &str, path: &str) -> Result<u32, String> {
    let mut ty = struct_named(btf, root)?;
    let mut total = 0u32;
    for name in path.split('.') {
        let (off, next) = find_member(btf, &ty, name)?
            .ok_or_else(|| format!("struct {root} has no field {path}"))?;
        total += off;
        ty = next;
    }
    Ok(total)
}

fn struct_named(btf: &Btf, name: &str) -> Result<Type, String> {
    btf.resolve_types_by_name(name)
        .map_err(|e| format!("type {name} not found in the kernel's BTF ({e})"))?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(_)))
        .ok_or_else(|| format!("struct {name} not found in the kernel's BTF"))
}

/// Follows typedefs and qualifiers to the type itself.
fn strip(btf: &Btf, mut ty: Type) -> Result<Type, String> {
    for _ in 0..16 {
        let next = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t),
            Type::Volatile(t) => btf.resolve_chained_type(t),
            Type::Const(t) => btf.resolve_chained_type(t),
            Type::Restrict(t) => btf.resolve_chained_type(t),
            Type::TypeTag(t) => btf.resolve_chained_type(t),
            _ => return Ok(ty),
        };
        ty = next.map_err(|e| e.to_string())?;
    }
    Err("type chain too long".into())
}

/// The byte offset and type of member `name` of the struct or union `ty`, looking into
/// anonymous members.
fn find_member(btf: &Btf, ty: &Type, name: &str) -> Result<Option<(u32, Type)>, String> {
    let members = match ty {
        Type::Struct(s) | Type::Union(s) => &s.members,
        _ => return Ok(None),
    };
    for m in members {
        let mname = btf.resolve_name(m).unwrap_or_default();
        let mty = strip(btf, btf.resolve_chained_type(m).map_err(|e| e.to_string())?)?;
        if m.bitfield_size().is_some_and(|b| b != 0) && mname == name {
            return Err(format!("field {name} is a bitfield"));
        }
        let off = m.bit_offset() / 8;
        if mname == name {
            return Ok(Some((off, mty)));
        }
        if mname.is_empty()
            && let Some((inner, t)) = find_member(btf, &mty, name)?
        {
            return Ok(Some((off + inner, t)));
        }
    }
    Ok(None)
}

/// Address of a kernel text symbol, from /proc/kallsyms (readable with its addresses only
/// by root or CAP_SYSLOG; otherwise they read as zero).
pub fn kallsyms_addr(name: &str) -> Result<u64, String> {
    let text = std::fs::read_to_string("/proc/kallsyms")
        .map_err(|e| format!("reading /proc/kallsyms failed: {e}"))?;
    for line in text.lines() {
        let mut it = line.split_ascii_whitespace();
        let (Some(addr), Some(_kind), Some(sym)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if sym == name && it.next().is_none() {
            let a = u64::from_str_radix(addr, 16).map_err(|e| e.to_string())?;
            if a == 0 {
                return Err("/proc/kallsyms hides addresses (kptr_restrict)".into());
            }
            return Ok(a);
        }
    }
    Err(format!(
        "symbol {name} not in /proc/kallsyms (inlined or renamed)"
    ))
}

/// Everything the eBPF side needs, with one warning per hook that cannot work here.
pub fn kernel_offsets() -> (KernelOffsets, Vec<String>) {
    let mut o = KernelOffsets::default();
    let mut warnings = Vec::new();
    let btf = match Btf::from_file(VMLINUX_BTF) {
        Ok(b) => b,
        Err(e) => {
            warnings.push(format!(
                "no kernel BTF ({VMLINUX_BTF}: {e}): accept() owners, network namespaces and TIME_WAIT are not traced"
            ));
            return (o, warnings);
        }
    };
    let accept = (|| -> Result<(), String> {
        o.task_files = offset_of(&btf, "task_struct", "files")?;
        o.files_fdt = offset_of(&btf, "files_struct", "fdt")?;
        o.fdt_fd = offset_of(&btf, "fdtable", "fd")?;
        o.file_private_data = offset_of(&btf, "file", "private_data")?;
        o.socket_sk = offset_of(&btf, "socket", "sk")?;
        Ok(())
    })();
    match accept {
        Ok(()) => o.valid |= KOFF_ACCEPT,
        Err(e) => warnings.push(format!(
            "accept() owners are not traced: {e}; accepted sockets keep their listener's owner"
        )),
    }
    let netns = (|| -> Result<(), String> {
        o.skc_net = offset_of(&btf, "sock_common", "skc_net")?;
        o.net_inum = offset_of(&btf, "net", "ns.inum")?;
        Ok(())
    })();
    match netns {
        Ok(()) => o.valid |= KOFF_NETNS,
        Err(e) => warnings.push(format!("network namespaces are not traced: {e}")),
    }
    let timewait = (|| -> Result<(), String> {
        o.skc_num = offset_of(&btf, "sock_common", "skc_num")?;
        o.skc_dport = offset_of(&btf, "sock_common", "skc_dport")?;
        o.skc_family = offset_of(&btf, "sock_common", "skc_family")?;
        o.skc_rcv_saddr = offset_of(&btf, "sock_common", "skc_rcv_saddr")?;
        o.skc_daddr = offset_of(&btf, "sock_common", "skc_daddr")?;
        o.skc_v6_rcv_saddr = offset_of(&btf, "sock_common", "skc_v6_rcv_saddr")?;
        o.skc_v6_daddr = offset_of(&btf, "sock_common", "skc_v6_daddr")?;
        o.tw_timer = offset_of(&btf, "inet_timewait_sock", "tw_timer")?;
        o.tw_substate = offset_of(&btf, "inet_timewait_sock", "tw_substate")?;
        o.timer_function = offset_of(&btf, "timer_list", "function")?;
        o.timer_expires = offset_of(&btf, "timer_list", "expires")?;
        o.tw_handler = kallsyms_addr("tw_timer_handler")?;
        Ok(())
    })();
    match timewait {
        Ok(()) => o.valid |= KOFF_TIMEWAIT,
        Err(e) => warnings.push(format!(
            "TIME_WAIT is not traced: {e}; lifecycles end at FIN_WAIT2/CLOSING -> CLOSE"
        )),
    }
    match config_hz() {
        Some(hz) => o.jiffy_ns = 1_000_000_000 / hz,
        None => warnings.push(
            "CONFIG_HZ unknown (no /proc/config.gz): FIN_WAIT2 -> TIME_WAIT inside a timewait socket is reported when it ends, not when it happened".into(),
        ),
    }
    (o, warnings)
}

/// CONFIG_HZ of the running kernel, from /proc/config.gz (or /boot/config-$(uname -r)).
fn config_hz() -> Option<u32> {
    use std::io::Read;
    let mut text = String::new();
    if let Ok(f) = std::fs::File::open("/proc/config.gz") {
        flate2::read::GzDecoder::new(f)
            .read_to_string(&mut text)
            .ok()?;
    } else {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
        text = std::fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()?;
    }
    text.lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.trim().parse().ok())
        .filter(|hz: &u32| (24..=10_000).contains(hz))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against this machine's kernel: the offsets exist and are plausible, and a nested
    /// path through anonymous unions (skc_num sits in sock_common's port-pair union) works.
    #[test]
    fn reads_the_running_kernels_offsets() {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI=true but {VMLINUX_BTF} is missing"
            );
            eprintln!("SKIPPED: no {VMLINUX_BTF}");
            return;
        }
        let (o, warnings) = kernel_offsets();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(o.valid, KOFF_ACCEPT | KOFF_NETNS | KOFF_TIMEWAIT);
        let btf = Btf::from_file(VMLINUX_BTF).unwrap();
        // skc_dport and skc_num share one 32-bit word, dport first.
        assert_eq!(
            offset_of(&btf, "sock_common", "skc_dport").unwrap() + 2,
            o.skc_num
        );
        // tw_common is the first member of inet_timewait_sock, so it shares sock's layout.
        assert_eq!(
            offset_of(&btf, "inet_timewait_sock", "__tw_common.skc_num").unwrap(),
            o.skc_num
        );
        assert_eq!(
            offset_of(&btf, "sock", "__sk_common.skc_num").unwrap(),
            o.skc_num
        );
        assert!(o.task_files > 0 && o.task_files < 16384);
        assert!(o.tw_handler > 0xffff_0000_0000_0000);
        // One of the HZ values Kconfig offers.
        assert!(
            [1_000_000, 3_333_333, 4_000_000, 10_000_000].contains(&o.jiffy_ns),
            "{}",
            o.jiffy_ns
        );
        assert!(offset_of(&btf, "sock_common", "no_such_field").is_err());
        assert!(offset_of(&btf, "no_such_struct", "x").is_err());
    }
}
