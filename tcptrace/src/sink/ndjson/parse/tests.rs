//! The fast paths against the serde path and std, and the parser's own rate.

use std::net::Ipv4Addr;

use super::*;

#[test]
fn dotted_quads_read_as_std_reads_them() {
    for s in [
        "0.0.0.0",
        "127.0.0.1",
        "255.255.255.255",
        "10.0.1.49",
        "256.0.0.1",
        "01.2.3.4",
        "1.2.3",
        "1.2.3.4.",
        "1.2.3.4.5",
        "1..3.4",
        "1.2.3.0004",
        "1.2.3.-4",
        "",
        "::1",
        "1.2.3.4 ",
    ] {
        assert_eq!(ipv4(s.as_bytes()), s.parse::<Ipv4Addr>().ok(), "{s:?}");
    }
}

#[test]
fn names_read_as_from_name_reads_them() {
    for st in TcpState::ALL {
        assert_eq!(TcpState::from_name_bytes(st.name().as_bytes()), Some(st));
    }
    for via in OwnerVia::ALL {
        assert_eq!(OwnerVia::from_name_bytes(via.name().as_bytes()), Some(via));
        assert_eq!(OwnerVia::from_name(via.name()), Some(via));
    }
    assert_eq!(TcpState::from_name_bytes(b"established"), None);
    assert_eq!(OwnerVia::from_name_bytes(b"CONNECT"), None);
}

#[test]
fn numbers_with_leading_zeros_or_out_of_range_go_to_serde() {
    let mut c = Scan { b: b"012", i: 0 };
    assert_eq!(c.u64(), None);
    let mut c = Scan { b: b"0,", i: 0 };
    assert_eq!(c.u64(), Some(0));
    let mut c = Scan {
        b: b"99999999999999999999",
        i: 0,
    };
    assert_eq!(c.u64(), None);
    let mut c = Scan {
        b: b"\"a\x01b\"",
        i: 0,
    };
    assert_eq!(c.plain_str(), None, "serde rejects control characters");
}

/// Lifecycle lines as `encode_lifecycle` writes them: an owner or none, IPv4 and IPv6,
/// an empty path, nulls, the largest numbers, a command name with escapes (the full
/// parser's) and one with non-ASCII letters.
const LIFECYCLES: [&str; 5] = [
    r#"{"type":"lifecycle","schema":1,"time":"1970-01-01T00:00:01.000200000Z","conn_id":1,"local":"127.0.0.1:30000","remote":"127.0.0.1:8080","family":"ipv4","role":"active_open","owner":{"pid":4242,"tid":4243,"comm":"bench-client"},"start_ts_ns":1000000000,"end_ts_ns":1000200000,"path":[{"state":"CLOSE","entered_ns":null,"duration_ns":null,"gap_before":false},{"state":"SYN_SENT","entered_ns":1000000000,"duration_ns":50000,"gap_before":false},{"state":"ESTABLISHED","entered_ns":1000050000,"duration_ns":50000,"gap_before":true},{"state":"CLOSE","entered_ns":1000200000,"duration_ns":null,"gap_before":false}],"handshake_ns":50000,"established_ns":50000,"lifetime_ns":200000,"close_kind":"active_close","end":"closed","complete":true,"partial_start":false,"gap":false,"illegal":false,"path_truncated":false}"#,
    r#"{"type":"lifecycle","schema":1,"time":"2026-11-24T03:07:00.000000001Z","conn_id":18446744073709551615,"local":"[fe80::1]:443","remote":"[::1]:0","family":"ipv6","role":"unknown","owner":null,"start_ts_ns":0,"end_ts_ns":18446744073709551615,"path":[],"handshake_ns":null,"established_ns":null,"lifetime_ns":null,"close_kind":null,"end":"finished","complete":false,"partial_start":true,"gap":true,"illegal":true,"path_truncated":true}"#,
    r#"{"type":"lifecycle","schema":1,"time":"2026-11-24T03:01:00.000000001Z","conn_id":11400714819323198485,"local":"10.0.0.1:8080","remote":"127.0.0.1:65535","family":"ipv4","role":"passive_open","owner":{"pid":1,"tid":4294967295,"comm":"we\"ird\\na\u0001"},"start_ts_ns":1,"end_ts_ns":18446744073709551614,"path":[{"state":"SYN_RECV","entered_ns":0,"duration_ns":0,"gap_before":false}],"handshake_ns":null,"established_ns":null,"lifetime_ns":null,"close_kind":"reset","end":"evicted","complete":false,"partial_start":false,"gap":false,"illegal":false,"path_truncated":false}"#,
    r#"{"type":"lifecycle","schema":1,"time":"2026-11-24T03:02:00.000000001Z","conn_id":4354685564936845354,"local":"10.0.0.1:8080","remote":"127.0.0.1:65535","family":"ipv4","role":"listener","owner":{"pid":2,"tid":4294967295,"comm":"ünï"},"start_ts_ns":2,"end_ts_ns":18446744073709551613,"path":[{"state":"LISTEN","entered_ns":0,"duration_ns":0,"gap_before":false},{"state":"CLOSE","entered_ns":null,"duration_ns":null,"gap_before":true}],"handshake_ns":41000,"established_ns":null,"lifetime_ns":null,"close_kind":"listener_closed","end":"superseded","complete":true,"partial_start":false,"gap":false,"illegal":false,"path_truncated":false}"#,
    r#"{"type":"lifecycle","schema":1,"time":"2026-11-24T03:04:00.000000001Z","conn_id":0,"local":"10.0.0.1:8080","remote":"127.0.0.1:65535","family":"ipv4","role":"active_open","owner":{"pid":4,"tid":4294967295,"comm":""},"start_ts_ns":4,"end_ts_ns":18446744073709551611,"path":[],"handshake_ns":41000,"established_ns":null,"lifetime_ns":null,"close_kind":"active_close","end":"closed","complete":true,"partial_start":false,"gap":false,"illegal":false,"path_truncated":false}"#,
];

/// A transition line as `encode_transition` writes it (see `parse_own_line`).
const TRANSITION: &str = r#"{"type":"transition","schema":1,"ts_ns":1000001000,"time":"1970-01-01T00:00:01.000001000Z","conn_id":2,"skaddr":"0xffff888000001000","family":"ipv4","laddr":"127.0.0.1","lport":8080,"raddr":"127.0.0.1","rport":30000,"old":"LISTEN","new":"SYN_RECV","in_old_state_ns":null,"owner_pid":4242,"owner_tid":4243,"owner_comm":"bench-client","owner_source":"kernel","task_pid":4242,"task_tid":4243,"task_comm":"bench-client","role":"passive_open","legal":true,"gap":false,"starts_conn":true,"midlife":false,"cpu":1,"owner_via":"accept","owner_uid":1000,"cgroup_id":12345,"netns":4026531840,"unaccepted":false,"container":"0123456789ab"}"#;

#[test]
fn our_lifecycle_lines_are_recognised_without_serde() {
    for (k, line) in LIFECYCLES.iter().enumerate() {
        // The one with escapes in `comm` is serde's, as the fast path promises.
        assert_eq!(
            lifecycle_line::own_lifecycle_line(line.as_bytes()),
            k != 2,
            "{line}"
        );
        assert_eq!(parse_transition_bytes(line.as_bytes()), Ok(None), "{line}");
        assert_eq!(parse_other_line(line.as_bytes()), Ok(None), "{line}");
    }
}

#[test]
fn the_lifecycle_examples_are_what_the_encoder_writes() {
    for line in LIFECYCLES {
        let record: crate::engine::LifecycleRecord = serde_json::from_str(line).unwrap();
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let mut out = Vec::new();
        super::super::lifecycle::encode_lifecycle_to(
            &mut out,
            v["time"].as_str().unwrap(),
            &record,
        );
        assert_eq!(String::from_utf8(out).unwrap(), line);
    }
}

/// Every line one edit away from ours (a byte cut off, dropped, doubled or replaced)
/// reads as the full parser reads it: the same record, `Ok(None)` or the same error.
#[test]
fn lines_one_edit_away_read_as_serde_reads_them() {
    const BYTES: &[u8] = b"\"\\0179 -+.eEx,:{}[]nulltrfa\x00\x1f\x7f\x80\xc3\xff\t";
    let mut lines: Vec<&str> = LIFECYCLES.to_vec();
    lines.push(TRANSITION);
    for line in lines {
        let b = line.as_bytes();
        let mut edits: Vec<Vec<u8>> = Vec::new();
        for i in 0..=b.len() {
            edits.push(b[..i].to_vec());
            if i < b.len() {
                edits.push([&b[..i], &b[i + 1..]].concat());
                edits.push([&b[..=i], &b[i..]].concat());
                for &c in BYTES {
                    if c != b[i] {
                        edits.push([&b[..i], &[c][..], &b[i + 1..]].concat());
                    }
                }
            }
        }
        for e in &edits {
            let reference = parse_other_line(e);
            assert_eq!(
                parse_transition_bytes(e),
                reference,
                "{}",
                String::from_utf8_lossy(e)
            );
            if lifecycle_line::own_lifecycle_line(e) {
                assert_eq!(reference, Ok(None), "{}", String::from_utf8_lossy(e));
            }
        }
    }
}

/// The word-at-a-time masks against their byte-by-byte definitions, on words built to
/// be mostly ordinary bytes with a few awkward ones (where carries and borrows start).
#[test]
fn word_masks_find_the_first_byte_the_byte_tests_find() {
    let awkward = [
        0x00, 0x01, 0x1f, 0x20, 0x21, b'"', b'\\', b'/', b'0', b'9', b':', b'@', b'A', b'F', b'G',
        b'`', b'a', b'f', b'g', 0x7f, 0x80, 0xb9, 0xba, 0xc0, 0xe0, 0xff,
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..200_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut bytes = [0u8; 8];
        for (k, b) in bytes.iter_mut().enumerate() {
            let r = (seed >> (8 * k)) as u8;
            *b = match r % 4 {
                0 => awkward[usize::from(r / 4) % awkward.len()],
                1 => b'0' + (r / 4) % 10,
                2 => b"0123456789abcdefABCDEF"[usize::from(r / 4) % 22],
                _ => b'a' + (r / 4) % 26,
            };
        }
        let w = u64::from_le_bytes(bytes);
        let first = |mask: u64| (mask.trailing_zeros() / 8) as usize;
        let first_where = |f: &dyn Fn(u8) -> bool| bytes.iter().position(|&c| f(c)).unwrap_or(8);
        assert_eq!(
            first(special_bytes(w)),
            first_where(&|c| c == b'"' || c == b'\\' || !(0x20..0x80).contains(&c)),
            "{bytes:?}"
        );
        assert_eq!(
            first(non_digits(w)),
            first_where(&|c| !c.is_ascii_digit()),
            "{bytes:?}"
        );
        let n = first_where(&|c| !c.is_ascii_hexdigit());
        let text = std::str::from_utf8(&bytes[..n]).unwrap();
        let expect = if n == 0 {
            0
        } else {
            u32::from_str_radix(text, 16).unwrap()
        };
        assert_eq!(swar_hex(w), (n, expect), "{bytes:?}");
        let n = first_where(&|c| !c.is_ascii_digit());
        let text = std::str::from_utf8(&bytes[..n]).unwrap();
        let expect = if n == 0 { 0 } else { text.parse().unwrap() };
        assert_eq!(swar_digits(w), (n, expect), "{bytes:?}");
    }
}

#[test]
fn hex_reads_as_from_str_radix_reads_it() {
    for text in [
        "0",
        "f",
        "F",
        "ffff888000001000",
        "FFFF888000001000",
        "fFfF8880aBcDeF01",
        "ffffffffffffffff",
        "10000000000000000",
        "00000000000000000000001",
        "0000000000000000000000g",
        "123456789",
        "1234567",
        "",
        "g",
        "12g4",
    ] {
        for tail in ["", "\"", "\",\"family\":\"ipv4\""] {
            let padded = format!("{text}{tail}");
            let mut c = Scan {
                b: padded.as_bytes(),
                i: 0,
            };
            let digits: String = text.chars().take_while(char::is_ascii_hexdigit).collect();
            let expect = if digits.is_empty() {
                None
            } else {
                u64::from_str_radix(&digits, 16).ok()
            };
            assert_eq!(c.hex(), expect, "{padded:?}");
            if expect.is_some() {
                assert_eq!(c.i, digits.len(), "{padded:?}");
            }
        }
    }
}

#[test]
fn word_at_a_time_digits_and_string_scans_match_the_byte_loops() {
    for text in [
        "0",
        "7",
        "12",
        "123",
        "1234567",
        "12345678",
        "123456789",
        "18446744073709551615",
        "18446744073709551616",
        "1764000000000000123",
        "00",
        "01",
        "1,",
        "1}",
        "12x34",
        "\u{ff}12",
        "9:",
        "9/",
    ] {
        let padded = format!("{text},\"unaccepted\":false,\"container\":null}}");
        let mut fast = Scan {
            b: padded.as_bytes(),
            i: 0,
        };
        let mut short = Scan {
            b: text.as_bytes(),
            i: 0,
        };
        let expect = text
            .bytes()
            .take_while(u8::is_ascii_digit)
            .map(|c| c as char)
            .collect::<String>();
        let expect = match expect.parse::<u64>() {
            Ok(n) if !(expect.len() > 1 && expect.starts_with('0')) => Some(n),
            _ => None,
        };
        assert_eq!(fast.u64(), expect, "{text:?}");
        assert_eq!(short.u64(), expect, "{text:?} without padding");
    }
    for (text, expect) in [
        ("\"2026-11-24T01:54:00.123456789Z\",", Some(30)),
        ("\"abcdefgh\"", Some(8)),
        ("\"abcdefg\\\"h\"", None),
        ("\"abcdefghij\u{7}k\"", None),
        ("\"abcdefghijé\"", Some(12)),
        ("\"\"", Some(0)),
        ("\"abcdefghijklmnop", None),
    ] {
        let mut c = Scan {
            b: text.as_bytes(),
            i: 0,
        };
        assert_eq!(c.plain_str().map(<[u8]>::len), expect, "{text:?}");
    }
}

/// How fast the parser alone reads a log (no I/O, no engine):
/// `TCPTRACE_LOG=FILE cargo test --release -p tcptrace --lib -- --ignored parse_rate --nocapture`.
#[test]
#[ignore]
fn parse_rate() {
    let path = std::env::var("TCPTRACE_LOG").expect("TCPTRACE_LOG=FILE, an NDJSON log");
    let text = std::fs::read(&path).expect("a readable log");
    let lines: Vec<&[u8]> = text
        .split(|&c| c == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    for round in 0..3 {
        let start = std::time::Instant::now();
        let mut fast = 0u64;
        let mut sum = 0u64;
        for l in &lines {
            if let Some(t) = parse_own_line(l) {
                fast += 1;
                sum = sum.wrapping_add(t.ts_ns);
            }
        }
        let el = start.elapsed();
        println!(
            "round {round}: {} lines, {fast} on the fast path, {:.0} ns/line ({:.2} M lines/s) [{sum}]",
            lines.len(),
            el.as_nanos() as f64 / lines.len() as f64,
            lines.len() as f64 / el.as_secs_f64() / 1e6
        );
    }
}

#[test]
fn lines_that_are_no_transition_say_what_they_are() {
    let err = |l: &str| parse_transition(l).unwrap_err().to_string();
    // Not JSON at all.
    assert!(
        err("{\"type\":").starts_with("not JSON"),
        "{}",
        err("{\"type\":")
    );
    // JSON, but not one of our records: not called "not JSON".
    for l in ["{\"foo\":1}", "[1,2,3]", "{\"type\":3,\"schema\":1}"] {
        assert!(
            err(l).starts_with("JSON, but not a tcptrace record"),
            "{l}: {}",
            err(l)
        );
    }
    // A typo'd record type is an error, not a line silently read past.
    assert_eq!(
        err("{\"type\":\"transtion\",\"schema\":1,\"ts_ns\":1}"),
        "unknown record type \"transtion\" (known: start, transition, accept, handoff, present, vanished, lifecycle, alert, summary)"
    );
    // Our other record types are read past.
    for kind in ["start", "lifecycle", "alert", "summary"] {
        let l = format!("{{\"type\":\"{kind}\",\"schema\":1}}");
        assert_eq!(parse_transition(&l), Ok(None), "{l}");
    }
    // A CSV log names itself.
    for l in [
        "type,schema,time,ts_ns,conn_id,family",
        "transition,1,2026-11-24T20:00:00Z,123,4097,ipv4",
    ] {
        assert!(err(l).starts_with("a CSV row"), "{l}: {}", err(l));
    }
}
