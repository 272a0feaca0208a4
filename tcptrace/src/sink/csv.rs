//! CSV output (`--format csv`): one header row, then one row per record. Transitions,
//! lifecycles, alerts and the summary share one flat column set, told apart by `type`;
//! columns that do not apply to a record type are empty. Same field names and units as
//! the NDJSON schema.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};

use super::time::WallClock;
use super::{RunSummary, SCHEMA_VERSION, Sink};
use crate::engine::{Output, Role};

/// One CSV row. Field order is the column order (documented in the README).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CsvRow {
    #[serde(rename = "type")]
    pub kind: String,
    pub schema: u32,
    pub time: String,
    pub ts_ns: u64,
    pub conn_id: Option<u64>,
    pub family: Option<String>,
    pub laddr: Option<String>,
    pub lport: Option<u16>,
    pub raddr: Option<String>,
    pub rport: Option<u16>,
    /// transition: the old state; lifecycle: the path joined with `>`.
    pub old: Option<String>,
    pub new: Option<String>,
    pub in_old_state_ns: Option<u64>,
    pub owner_pid: Option<u32>,
    pub owner_comm: Option<String>,
    pub role: Option<String>,
    pub legal: Option<bool>,
    pub gap: Option<bool>,
    pub path: Option<String>,
    pub close_kind: Option<String>,
    pub handshake_ns: Option<u64>,
    pub established_ns: Option<u64>,
    pub lifetime_ns: Option<u64>,
    pub complete: Option<bool>,
    pub partial_start: Option<bool>,
    pub rule: Option<String>,
    pub status: Option<String>,
    pub key: Option<String>,
    pub count: Option<u64>,
    pub oldest_age_ns: Option<u64>,
    pub message: Option<String>,
    pub transitions: Option<u64>,
    pub lost: Option<u64>,
}

fn role(r: Role) -> String {
    serde_json::to_value(r)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

pub fn row(clock: &WallClock, out: &Output) -> CsvRow {
    match out {
        Output::Transition(r) => {
            let t = &r.t;
            CsvRow {
                kind: "transition".into(),
                schema: SCHEMA_VERSION,
                time: clock.rfc3339(t.ts_ns),
                ts_ns: t.ts_ns,
                conn_id: Some(t.conn_id),
                family: Some(if t.local.is_ipv6() { "ipv6" } else { "ipv4" }.into()),
                laddr: Some(t.local.ip().to_string()),
                lport: Some(t.local.port()),
                raddr: Some(t.remote.ip().to_string()),
                rport: Some(t.remote.port()),
                old: Some(t.old.name().into()),
                new: Some(t.new.name().into()),
                in_old_state_ns: r.in_old_state_ns,
                owner_pid: r.owner.map(|o| o.pid),
                owner_comm: r.owner.map(|o| o.comm.as_str().into_owned()),
                role: Some(role(r.role)),
                legal: Some(r.legal),
                gap: Some(r.gap),
                ..CsvRow::default()
            }
        }
        Output::Lifecycle(l) => CsvRow {
            kind: "lifecycle".into(),
            schema: SCHEMA_VERSION,
            time: clock.rfc3339(l.end_ts_ns),
            ts_ns: l.end_ts_ns,
            conn_id: Some(l.conn_id),
            family: Some(if l.local.is_ipv6() { "ipv6" } else { "ipv4" }.into()),
            laddr: Some(l.local.ip().to_string()),
            lport: Some(l.local.port()),
            raddr: Some(l.remote.ip().to_string()),
            rport: Some(l.remote.port()),
            owner_pid: l.owner.map(|o| o.pid),
            owner_comm: l.owner.map(|o| o.comm.as_str().into_owned()),
            role: Some(role(l.role)),
            gap: Some(l.gap),
            path: Some(
                l.path
                    .iter()
                    .map(|s| s.state.name())
                    .collect::<Vec<_>>()
                    .join(">"),
            ),
            close_kind: l.close_kind.map(|k| k.name().into()),
            handshake_ns: l.handshake_ns,
            established_ns: l.established_ns,
            lifetime_ns: l.lifetime_ns,
            complete: Some(l.complete),
            partial_start: Some(l.partial_start),
            ..CsvRow::default()
        },
        Output::Alert(a) => CsvRow {
            kind: "alert".into(),
            schema: SCHEMA_VERSION,
            time: clock.rfc3339(a.ts_ns),
            ts_ns: a.ts_ns,
            owner_pid: a.owner.map(|o| o.pid),
            owner_comm: a.owner.map(|o| o.comm.as_str().into_owned()),
            rule: Some(a.rule.to_string()),
            status: serde_json::to_value(a.status)
                .ok()
                .and_then(|v| v.as_str().map(String::from)),
            key: Some(a.key.clone()),
            count: Some(a.count),
            oldest_age_ns: a.oldest_age_ns,
            message: Some(a.message.clone()),
            ..CsvRow::default()
        },
    }
}

pub struct Csv<W: Write> {
    out: csv::Writer<W>,
    clock: WallClock,
}

impl<W: Write> Csv<W> {
    pub fn new(out: W, clock: WallClock) -> Csv<W> {
        Csv {
            out: csv::WriterBuilder::new().has_headers(true).from_writer(out),
            clock,
        }
    }

    /// The underlying writer, after flushing; `None` if the final flush failed.
    pub fn into_inner(self) -> Option<W> {
        self.out.into_inner().ok()
    }
}

fn io_err(e: csv::Error) -> io::Error {
    match e.into_kind() {
        csv::ErrorKind::Io(e) => e,
        other => io::Error::other(format!("{other:?}")),
    }
}

impl<W: Write> Sink for Csv<W> {
    fn record(&mut self, out: &Output) -> io::Result<()> {
        self.out.serialize(row(&self.clock, out)).map_err(io_err)
    }

    fn summary(&mut self, s: &RunSummary) -> io::Result<()> {
        self.out
            .serialize(CsvRow {
                kind: "summary".into(),
                schema: SCHEMA_VERSION,
                transitions: Some(s.transitions),
                lost: Some(s.lost),
                ..CsvRow::default()
            })
            .map_err(io_err)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
