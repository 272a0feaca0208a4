//! Cross-rule checks: the registry, the alert schema, and end-of-input behaviour.

use super::{Alert, AlertStatus, RulesConfig, default_rules};
use crate::engine::testkit::*;
use crate::event::TcpState::*;

#[test]
fn registry_has_every_rule_once_each_described() {
    let rules = default_rules(&RulesConfig::default());
    let mut names: Vec<&str> = rules.iter().map(|r| r.name()).collect();
    assert_eq!(
        names,
        vec![
            "illegal_transition",
            "stuck_close_wait",
            "stuck_fin_wait2",
            "slow_connect",
            "failed_connect",
            "syn_backlog",
            "reset_surge",
            "time_wait_buildup",
            "connection_churn"
        ]
    );
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 9);
    for r in &rules {
        assert!(
            r.describe().len() > 40,
            "{} needs a real description",
            r.name()
        );
        assert_eq!(r.footprint(), 0);
    }
    let sim = Sim::default();
    assert_eq!(sim.engine.rules().count(), 9);
}

#[test]
fn alert_json_is_snake_case_and_round_trips() {
    let mut a = Alert::new(
        "stuck_close_wait",
        AlertStatus::Firing,
        5,
        "pid=1".into(),
        "m".into(),
        "e",
    );
    a.owner = Some(task(1, "srv"));
    a.mostly_to = Some(super::PeerShare {
        peer: "10.0.0.5:5432".into(),
        count: 3,
    });
    let v: serde_json::Value = serde_json::to_value(&a).expect("serialise");
    assert_eq!(v["status"], "firing");
    assert_eq!(v["ts_ns"], 5);
    assert_eq!(v["mostly_to"]["peer"], "10.0.0.5:5432");
    assert_eq!(v["owner"]["comm"], "srv");
    assert_eq!(v["oldest_age_ns"], serde_json::Value::Null);
    let back: Alert = serde_json::from_value(v).expect("deserialise");
    assert_eq!(back, a);
}

#[test]
fn finish_reports_the_last_tick_but_never_claims_a_leak_resolved() {
    let mut sim = Sim::default();
    let s = Sock::new(1, "10.0.0.1:1", "10.0.0.2:2", task(5, "app"));
    let mut t = s.ev(0, Established, CloseWait);
    t.owner = Some(task(5, "app"));
    sim.feed(&t);
    let out = sim.finish(40 * S);
    let a = alerts(&out);
    assert_eq!(a.len(), 1, "{a:#?}");
    assert_eq!(
        (a[0].rule.as_ref(), a[0].status),
        ("stuck_close_wait", AlertStatus::Firing)
    );
    assert_eq!(lifecycles(&out).len(), 1);
    assert_eq!(sim.engine.rules_footprint(), 0);
    assert!(sim.tick(100 * S).is_empty());
}
