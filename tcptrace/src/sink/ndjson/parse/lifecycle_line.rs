//! Recognising our own lifecycle lines without deserialising them: a replay recomputes
//! every lifecycle from the transitions (`analyze` counts the engine's, not the log's), so
//! a lifecycle line only has to be shown to be well formed. Through serde one cost about
//! 17,000 instructions, five transition lines' worth, for fields nobody reads.

use super::Scan;

/// Whether `line` is a lifecycle line exactly as `encode_lifecycle` writes it, with no
/// escapes in its strings: then it is valid JSON that the full parser reads as `Ok(None)`
/// (of its fields the full parser looks only at `type`, `schema` and `conn_id`, each
/// checked here as it checks them). False sends the line to the full parser, which
/// accepts or reports it exactly as before.
#[inline]
pub(super) fn own_lifecycle_line(line: &[u8]) -> bool {
    scan(line).is_some()
}

fn scan(line: &[u8]) -> Option<()> {
    let mut c = Scan { b: line, i: 0 };
    c.lit(b"{\"type\":\"lifecycle\",\"schema\":1,\"time\":")?;
    c.plain_str()?;
    // The one field the full parser would type-check: an unsigned 64-bit number.
    c.lit(b",\"conn_id\":")?;
    c.u64()?;
    c.lit(b",\"local\":")?;
    c.plain_str()?;
    c.lit(b",\"remote\":")?;
    c.plain_str()?;
    c.lit(b",\"family\":")?;
    c.plain_str()?;
    c.lit(b",\"role\":")?;
    c.plain_str()?;
    c.lit(b",\"owner\":")?;
    if c.lit(b"null").is_none() {
        c.lit(b"{\"pid\":")?;
        c.skip_uint()?;
        c.lit(b",\"tid\":")?;
        c.skip_uint()?;
        // A command name with an escape (a quote, a control character) goes to serde.
        c.lit(b",\"comm\":")?;
        c.plain_str()?;
        c.lit(b"}")?;
    }
    c.lit(b",\"start_ts_ns\":")?;
    c.skip_uint()?;
    c.lit(b",\"end_ts_ns\":")?;
    c.skip_uint()?;
    c.lit(b",\"path\":[")?;
    if c.lit(b"]").is_none() {
        loop {
            c.lit(b"{\"state\":")?;
            c.plain_str()?;
            c.lit(b",\"entered_ns\":")?;
            c.skip_opt_uint()?;
            c.lit(b",\"duration_ns\":")?;
            c.skip_opt_uint()?;
            c.lit(b",\"gap_before\":")?;
            c.bool()?;
            c.lit(b"}")?;
            if c.lit(b"]").is_some() {
                break;
            }
            c.lit(b",")?;
        }
    }
    c.lit(b",\"handshake_ns\":")?;
    c.skip_opt_uint()?;
    c.lit(b",\"established_ns\":")?;
    c.skip_opt_uint()?;
    c.lit(b",\"lifetime_ns\":")?;
    c.skip_opt_uint()?;
    c.lit(b",\"close_kind\":")?;
    if c.lit(b"null").is_none() {
        c.plain_str()?;
    }
    c.lit(b",\"end\":")?;
    c.plain_str()?;
    c.lit(b",\"complete\":")?;
    c.bool()?;
    c.lit(b",\"partial_start\":")?;
    c.bool()?;
    c.lit(b",\"gap\":")?;
    c.bool()?;
    c.lit(b",\"illegal\":")?;
    c.bool()?;
    c.lit(b",\"path_truncated\":")?;
    c.bool()?;
    c.lit(b"}")?;
    (c.i == line.len()).then_some(())
}
