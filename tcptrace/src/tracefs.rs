//! tracefs: finding (or mounting) it, and reading the live layout of the
//! `sock:inet_sock_set_state` record so the eBPF program never relies on hard-coded offsets.

use std::path::{Path, PathBuf};

use tcptrace_common::{TP_RECORD_BYTES, TracepointLayout};

pub const TRACEPOINT_CATEGORY: &str = "sock";
pub const TRACEPOINT_NAME: &str = "inet_sock_set_state";

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and mounting it failed ({0}); run `mount -t tracefs nodev /sys/kernel/tracing` as root"
    )]
    NotMounted(String),
    #[error(
        "this kernel has no sock:inet_sock_set_state tracepoint ({0} is missing); tcptrace needs Linux 4.16 or newer"
    )]
    TracepointMissing(PathBuf),
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("unexpected sock:inet_sock_set_state layout: {0}")]
    Layout(String),
}

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The tracefs mount point, mounting it at /sys/kernel/tracing when nothing is mounted.
pub fn find_or_mount() -> Result<PathBuf, TracefsError> {
    if let Some(p) = CANDIDATES
        .iter()
        .map(Path::new)
        .find(|p| p.join("events").is_dir())
    {
        return Ok(p.to_path_buf());
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: plain mount(2) with NUL-terminated constant strings.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(TracefsError::NotMounted(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    Ok(PathBuf::from(CANDIDATES[0]))
}

/// Reads and parses the live `format` file of the tracepoint.
pub fn read_layout(tracefs: &Path) -> Result<TracepointLayout, TracefsError> {
    let path = tracefs
        .join("events")
        .join(TRACEPOINT_CATEGORY)
        .join(TRACEPOINT_NAME)
        .join("format");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(TracefsError::TracepointMissing(path));
        }
        Err(error) => return Err(TracefsError::Read { path, error }),
    };
    parse_format(&text)
}

/// Whether tracepoint `category:name` exists here and has each `(field, offset, size)`
/// exactly where the eBPF program reads it. `Err` says what differs, in one sentence.
pub fn check_fields(
    tracefs: &Path,
    category: &str,
    name: &str,
    want: &[(&str, u32, u32)],
) -> Result<(), String> {
    let path = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("tracepoint {category}:{name} unavailable ({e})"))?;
    let fields: Vec<(&str, u32, u32)> = text.lines().filter_map(parse_field).collect();
    for &(field, off, size) in want {
        if !fields.contains(&(field, off, size)) {
            return Err(format!(
                "tracepoint {category}:{name} has no field {field} at offset {off} of size {size}"
            ));
        }
    }
    Ok(())
}

/// One `field:` line: its declared name (without any `[N]`), offset and size.
fn parse_field(line: &str) -> Option<(&str, u32, u32)> {
    let line = line.trim();
    let decl = line.strip_prefix("field:")?.split(';').next()?;
    let name = decl.rsplit([' ', '*']).next()?.split('[').next()?;
    let mut offset = None;
    let mut size = None;
    for part in line.split(';').map(str::trim) {
        if let Some(v) = part.strip_prefix("offset:") {
            offset = v.parse().ok();
        } else if let Some(v) = part.strip_prefix("size:") {
            size = v.parse().ok();
        }
    }
    Some((name, offset?, size?))
}

/// Parses a tracefs `format` file into the offsets the eBPF program reads.
pub fn parse_format(text: &str) -> Result<TracepointLayout, TracefsError> {
    let fields: Vec<(&str, u32, u32)> = text.lines().filter_map(parse_field).collect();
    let get = |name: &str, sizes: &[u32]| -> Result<(u16, u16), TracefsError> {
        let &(_, off, size) = fields
            .iter()
            .find(|(n, _, _)| *n == name)
            .ok_or_else(|| TracefsError::Layout(format!("field `{name}` is missing")))?;
        if !sizes.contains(&size) {
            return Err(TracefsError::Layout(format!(
                "field `{name}` has size {size}, expected {sizes:?}"
            )));
        }
        // The program copies the record's first TP_RECORD_BYTES once and reads fields there.
        let off = u16::try_from(off)
            .ok()
            .filter(|o| *o >= 8 && usize::from(*o) + size as usize <= TP_RECORD_BYTES)
            .ok_or_else(|| {
                TracefsError::Layout(format!(
                    "field `{name}` at offset {off} lies outside bytes 8 to {TP_RECORD_BYTES} of the record, which is all tcptrace reads"
                ))
            })?;
        Ok((off, size as u16))
    };
    // The program copies exactly TP_RECORD_BYTES (the attach refuses reads past the record).
    let end = fields
        .iter()
        .map(|&(_, off, size)| off + size)
        .max()
        .unwrap_or(0);
    let record = end.next_multiple_of(8) as usize;
    if record < TP_RECORD_BYTES {
        return Err(TracefsError::Layout(format!(
            "the record is {record} bytes, shorter than the {TP_RECORD_BYTES} tcptrace reads"
        )));
    }
    let (protocol, protocol_size) = get("protocol", &[1, 2])?;
    Ok(TracepointLayout {
        skaddr: get("skaddr", &[8])?.0,
        oldstate: get("oldstate", &[4])?.0,
        newstate: get("newstate", &[4])?.0,
        sport: get("sport", &[2])?.0,
        dport: get("dport", &[2])?.0,
        family: get("family", &[2])?.0,
        protocol,
        protocol_size,
        saddr: get("saddr", &[4])?.0,
        daddr: get("daddr", &[4])?.0,
        saddr_v6: get("saddr_v6", &[16])?.0,
        daddr_v6: get("daddr_v6", &[16])?.0,
        valid: 1,
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FMT_6_18: &str = include_str!("../tests/fixtures/format-6.18-inet_sock_set_state.txt");
    const FMT_5_4: &str = include_str!("../tests/fixtures/format-5.4-inet_sock_set_state.txt");

    #[test]
    fn parses_the_u16_protocol_layout_of_recent_kernels() {
        let l = parse_format(FMT_6_18).expect("6.18 layout parses");
        assert_eq!(
            (l.skaddr, l.oldstate, l.newstate, l.sport, l.dport, l.family),
            (8, 16, 20, 24, 26, 28)
        );
        assert_eq!((l.protocol, l.protocol_size), (30, 2));
        assert_eq!((l.saddr, l.daddr, l.saddr_v6, l.daddr_v6), (32, 36, 40, 56));
        assert_eq!(l.valid, 1);
    }

    #[test]
    fn parses_the_u8_protocol_layout_of_kernels_before_5_6() {
        let l = parse_format(FMT_5_4).expect("5.4 layout parses");
        assert_eq!((l.protocol, l.protocol_size), (30, 1));
        assert_eq!((l.saddr, l.daddr, l.saddr_v6, l.daddr_v6), (31, 35, 39, 55));
    }

    #[test]
    fn missing_or_resized_fields_are_clear_errors() {
        let no_family = FMT_6_18.replace("field:__u16 family;", "field:__u16 fam;");
        let err = parse_format(&no_family).unwrap_err().to_string();
        assert!(err.contains("field `family` is missing"), "{err}");
        let wide = FMT_6_18.replace(
            "saddr[4];\toffset:32;\tsize:4;",
            "saddr[4];\toffset:32;\tsize:8;",
        );
        let err = parse_format(&wide).unwrap_err().to_string();
        assert!(err.contains("`saddr` has size 8"), "{err}");
        let far = FMT_6_18.replace("daddr_v6[16];\toffset:56;", "daddr_v6[16];\toffset:64;");
        assert_ne!(far, FMT_6_18);
        let err = parse_format(&far).unwrap_err().to_string();
        assert!(
            err.contains("`daddr_v6` at offset 64 lies outside bytes 8 to 72"),
            "{err}"
        );
        let short: String = FMT_6_18
            .lines()
            .filter(|l| !l.contains("daddr_v6"))
            .map(|l| format!("{l}\n"))
            .collect();
        let err = parse_format(&short).unwrap_err().to_string();
        assert!(
            err.contains("the record is 56 bytes, shorter than the 72"),
            "{err}"
        );
        assert!(parse_format("").is_err());
        assert!(parse_format("garbage\nfield:\nfield:int x;\toffset:zz;").is_err());
    }

    #[test]
    fn field_lines_parse_names_with_pointers_and_arrays() {
        assert_eq!(
            parse_field("\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;"),
            Some(("skaddr", 8, 8))
        );
        assert_eq!(
            parse_field("\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;"),
            Some(("saddr_v6", 40, 16))
        );
        assert_eq!(parse_field("print fmt: \"x\""), None);
    }
}
