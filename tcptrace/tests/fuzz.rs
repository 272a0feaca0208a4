//! Property tests (proptest): the parsers of untrusted bytes, the ring-buffer decoder, the
//! NDJSON log parser and the binary capture's record decoder, never panic, and round-trip
//! what they should.

use proptest::prelude::*;
use tcptrace::decode::{decode, encode};
use tcptrace::engine::{Engine, EngineConfig, Role, TransitionRecord};
use tcptrace::sink::binary;
use tcptrace::sink::ndjson::{encode_transition, parse_transition, parse_transition_json};
use tcptrace::sink::time::WallClock;
use tcptrace_common::{AF_INET, AF_INET6, Owner, StateEvent};

fn state_event() -> impl Strategy<Value = StateEvent> {
    (
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
        (any::<[u8; 16]>(), any::<[u8; 16]>(), any::<[u8; 16]>()),
        (
            any::<u16>(),
            any::<u16>(),
            prop_oneof![Just(AF_INET), Just(AF_INET6), any::<u16>()],
        ),
        (0u8..16, 0u8..16, any::<u32>(), any::<u32>()),
        (any::<u32>(), any::<u32>(), any::<[u8; 16]>()),
    )
        .prop_map(
            |((ts, sk, id, pt), (sa, da, comm), (sp, dp, fam), (o, n, fl, cpu), (tg, pid, oc))| {
                StateEvent {
                    ts_ns: ts,
                    skaddr: sk,
                    conn_id: id,
                    pid_tgid: pt,
                    saddr: sa,
                    daddr: da,
                    comm,
                    sport: sp,
                    dport: dp,
                    family: fam,
                    oldstate: o,
                    newstate: n,
                    flags: fl,
                    cpu,
                    owner: Owner {
                        tgid: tg,
                        pid,
                        uid: 0,
                        source: 1,
                        cgroup_id: 0,
                        comm: oc,
                    },
                    netns: tg ^ pid,
                    _pad: 0,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn decode_never_panics_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn decode_accepts_exactly_the_valid_events(ev in state_event()) {
        let r = decode(&encode(&ev));
        let valid = (1..=13).contains(&ev.oldstate) && (1..=13).contains(&ev.newstate)
            && (ev.family == AF_INET || ev.family == AF_INET6);
        prop_assert_eq!(r.is_ok(), valid);
        if let Ok(t) = r {
            prop_assert_eq!((t.ts_ns, t.conn_id, t.skaddr), (ev.ts_ns, ev.conn_id, ev.skaddr));
            prop_assert_eq!((t.local.port(), t.remote.port()), (ev.sport, ev.dport));
            prop_assert_eq!(t.old as u8, ev.oldstate);
        }
    }

    #[test]
    fn the_log_parser_never_panics_on_any_line(line in ".{0,400}") {
        let _ = parse_transition(&line);
    }

    #[test]
    fn the_log_parser_never_panics_on_mangled_real_lines(mut ev in state_event(), cut in 0usize..600, junk in "[\\x00-\\x7f]{0,8}") {
        // Only valid events are written to logs.
        ev.oldstate = 1 + ev.oldstate % 13;
        ev.newstate = 1 + ev.newstate % 13;
        ev.family = if ev.family % 2 == 0 { AF_INET } else { AF_INET6 };
        let t = decode(&encode(&ev)).expect("a valid event");
        let mut line = String::new();
        encode_transition(&mut line, &WallClock::identity(), &TransitionRecord {
            t, in_old_state_ns: None, owner: None, role: Role::Unknown, legal: true, gap: false,
        });
        let cut = cut.min(line.len());
        let mangled = match line.is_char_boundary(cut) {
            true => format!("{}{junk}{}", &line[..cut], &line[cut..]),
            false => line.clone(),
        };
        let _ = parse_transition(&mangled);
        // The fast path and the full JSON parser agree on mangled and clean lines alike.
        prop_assert_eq!(parse_transition(&mangled).ok(), parse_transition_json(&mangled).ok());
        prop_assert_eq!(parse_transition(&line), parse_transition_json(&line));
        // Unmangled, it reads back to what was written.
        let back = parse_transition(&line).unwrap().unwrap();
        prop_assert_eq!(back.conn_id, t.conn_id);
        prop_assert_eq!(back.local, t.local);
        prop_assert_eq!((back.old, back.new), (t.old, t.new));
    }

    #[test]
    fn binary_records_round_trip_and_mangled_ones_never_panic(
        mut ev in state_event(),
        offset in any::<i64>(),
        cut in 0usize..400,
        junk in proptest::collection::vec(any::<u8>(), 0..8),
        garbage in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        ev.oldstate = 1 + ev.oldstate % 13;
        ev.newstate = 1 + ev.newstate % 13;
        ev.family = if ev.family % 2 == 0 { AF_INET } else { AF_INET6 };
        let t = decode(&encode(&ev)).expect("a valid event");
        let mut buf = [0u8; binary::MAX_LINE];
        let n = binary::encode(&t, offset, &mut buf);
        let line = &buf[..n - 1];
        prop_assert!(!line.contains(&b'\n'));
        prop_assert_eq!(binary::decode(line), Ok((t, offset)));
        // Bytes inserted anywhere (as a reader split at newlines would see them), or any
        // bytes at all behind the tag: an error or a record, never a panic.
        let cut = cut.min(line.len());
        let mangled: Vec<u8> = [&line[..cut], &junk[..], &line[cut..]].concat();
        let mangled: Vec<u8> = mangled.split(|&b| b == b'\n').next().unwrap_or_default().to_vec();
        let _ = binary::decode(&mangled);
        let _ = binary::decode(&[&[binary::TAG][..], &garbage[..]].concat());
    }

    #[test]
    fn the_engine_never_panics_on_decoded_garbage(events in proptest::collection::vec(state_event(), 1..200)) {
        let mut engine = Engine::new(EngineConfig { max_connections: 16, ..EngineConfig::default() });
        let mut out = Vec::new();
        for ev in &events {
            if let Ok(t) = decode(&encode(ev)) {
                engine.on_transition(&t, &mut out);
                engine.tick(ev.ts_ns, &mut out);
            }
        }
        engine.finish(u64::MAX / 2, &mut out);
        prop_assert!(engine.stats().tracked <= 16);
    }
}
