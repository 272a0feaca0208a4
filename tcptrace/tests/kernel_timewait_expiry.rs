//! The kernel test that takes a minute: a TIME_WAIT socket's own timer (TCP_TIMEWAIT_LEN,
//! 60 s, not tunable) ends it, and tcptrace reports TIME_WAIT → CLOSE with its true
//! duration, and the lifecycle the engine builds from it is complete.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::*;
use tcptrace::engine::{CloseKind, Engine, EngineConfig, Output};
use tcptrace::event::TcpState::*;
use tcptrace::event::Transition;

#[test]
fn time_wait_lasts_sixty_seconds_and_its_expiry_is_seen() {
    let Some(_g) = kernel_guard() else { return };
    runtime().block_on(async {
        let mut tracer = start_tracer_with_timewait();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cport = client_closes_first(&listener);
        drop(listener);
        let client = move |t: &Transition| {
            (t.local.port() == cport && t.remote.port() == port)
                || (t.old, t.new) == (Close, SynSent) && t.remote.port() == port
        };
        let events = collect(
            &mut tracer,
            client,
            |e| e.iter().any(|t| (t.old, t.new) == (TimeWait, Close)),
            Duration::from_secs(75),
        )
        .await;
        assert_eq!(path(&events), CLIENT_THROUGH_TIME_WAIT, "{}", show(&events));
        let entered = events.iter().find(|t| t.new == TimeWait).unwrap().ts_ns;
        let ended = events.last().unwrap().ts_ns;
        let secs = (ended - entered) as f64 / 1e9;
        // The timer wheel fires at or after the deadline, never before, and at most one
        // bucket (2 s at this range with HZ=250; 0.5 s with HZ=1000) late.
        assert!(
            (59.99..=62.5).contains(&secs),
            "TIME_WAIT lasted {secs:.3} s\n{}",
            show(&events)
        );
        println!("TIME_WAIT lasted {secs:.3} s");

        let mut engine = Engine::new(EngineConfig::default());
        let mut out = Vec::new();
        for t in &events {
            engine.on_transition(t, &mut out);
        }
        let lc = out
            .iter()
            .find_map(|o| match o {
                Output::Lifecycle(l) => Some(l.clone()),
                _ => None,
            })
            .expect("the client's lifecycle closes");
        assert!(lc.complete, "{lc:?}");
        assert_eq!(lc.close_kind, Some(CloseKind::ActiveClose), "{lc:?}");
        assert_no_loss(&tracer.counters());
    });
}
