//! CSV output (`--format csv`): one header row, then one row per record. Transitions,
//! lifecycles, alerts and the summary share one flat column set, told apart by `type`;
//! columns that do not apply to a record type are empty. Same field names and units as
//! the NDJSON schema.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};

use super::time::WallClock;
use super::{RunStart, RunSummary, SCHEMA_VERSION, Sink};
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
                // As NDJSON's `type`: `transition`, or the kind of an event that changes no state.
                kind: t.kind.record_type().into(),
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

/// The header row, with its line end: what an output file begins each file it starts with.
pub fn header() -> Vec<u8> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let _ = w.serialize(CsvRow::default());
    let bytes = w.into_inner().unwrap_or_default();
    let end = memchr::memchr(b'\n', &bytes).map_or(bytes.len(), |p| p + 1);
    bytes[..end].to_vec()
}

impl<W: Write> Csv<W> {
    /// Writes the header row before the first row (stdout: once).
    pub fn new(out: W, clock: WallClock) -> Csv<W> {
        Csv {
            out: csv::WriterBuilder::new().has_headers(true).from_writer(out),
            clock,
        }
    }

    /// Rows only: the output file writes [`header`] at the start of every file it starts
    /// (the first, after each rotation or reopen), and none when it appends to one.
    pub fn without_header(out: W, clock: WallClock) -> Csv<W> {
        Csv {
            out: csv::WriterBuilder::new()
                .has_headers(false)
                .from_writer(out),
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

    fn start(&mut self, s: &RunStart) -> io::Result<()> {
        self.out
            .serialize(CsvRow {
                kind: "start".into(),
                schema: SCHEMA_VERSION,
                time: s.time.clone(),
                ts_ns: s.ts_ns,
                ..CsvRow::default()
            })
            .map_err(io_err)
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

    fn set_clock(&mut self, clock: WallClock) {
        self.clock = clock;
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, EngineConfig};
    use crate::event::{Comm, Task, TcpState, Transition};
    use crate::sink::ndjson::Ndjson;

    /// A client's and a server's whole lives through the real engine: transitions,
    /// lifecycles and an alert (a refused connect).
    fn outputs() -> Vec<Output> {
        use TcpState::*;
        let mut engine = Engine::new(EngineConfig::default());
        let mut out = Vec::new();
        let owner = Task {
            pid: 42,
            tid: 42,
            comm: Comm::new("curl, \"quoted\""),
        };
        let steps = [
            (Close, SynSent, 0u16),
            (SynSent, Established, 40000),
            (Established, FinWait1, 40000),
            (FinWait1, FinWait2, 40000),
            (FinWait2, Close, 40000),
        ];
        for (i, (old, new, lport)) in steps.into_iter().enumerate() {
            let t = Transition {
                ts_ns: 1_000 + i as u64 * 500,
                conn_id: 4096,
                skaddr: 1,
                task: owner,
                local: SocketAddr::new("10.0.0.1".parse().unwrap(), lport),
                remote: "10.0.0.5:5432".parse().unwrap(),
                old,
                new,
                starts_conn: i == 0,
                midlife: false,
                cpu: 0,
                owner: Some(owner),
                meta: Default::default(),
                kind: Default::default(),
            };
            engine.on_transition(&t, &mut out);
        }
        for (i, (old, new)) in [(Close, SynSent), (SynSent, Close)].into_iter().enumerate() {
            let t = Transition {
                ts_ns: 9_000 + i as u64,
                conn_id: 8192,
                skaddr: 2,
                task: owner,
                local: "[::1]:0".parse().unwrap(),
                remote: "[::1]:81".parse().unwrap(),
                old,
                new,
                starts_conn: i == 0,
                midlife: false,
                cpu: 1,
                owner: Some(owner),
                meta: Default::default(),
                kind: Default::default(),
            };
            engine.on_transition(&t, &mut out);
        }
        out
    }

    use std::net::SocketAddr;

    /// The header an output file is handed is the one the sink writes on stdout, and the
    /// sink writing into a file writes none of its own.
    #[test]
    fn the_header_row_is_the_sinks_own_and_a_file_sink_writes_none() {
        let clock = WallClock::new(0);
        let outs = outputs();
        let mut with = Csv::new(Vec::new(), clock);
        let mut without = Csv::without_header(Vec::new(), clock);
        for o in &outs {
            with.record(o).unwrap();
            without.record(o).unwrap();
        }
        let with = with.into_inner().unwrap();
        let without = without.into_inner().unwrap();
        let h = header();
        assert!(h.starts_with(b"type,schema,time,") && h.ends_with(b"\n"));
        assert_eq!([&h[..], &without[..]].concat(), with);
    }

    #[test]
    fn csv_and_ndjson_of_the_same_outputs_parse_back_into_the_same_records() {
        let outs = outputs();
        assert!(outs.iter().any(|o| matches!(o, Output::Lifecycle(_))));
        assert!(outs.iter().any(|o| matches!(o, Output::Alert(_))));
        let clock = WallClock::new(1_700_000_000_000_000_000);
        let mut csv_sink = Csv::new(Vec::new(), clock);
        let mut json_sink = Ndjson::new(Vec::new(), clock);
        for o in &outs {
            csv_sink.record(o).unwrap();
            json_sink.record(o).unwrap();
        }
        let csv_bytes = csv_sink.into_inner().unwrap();
        let json_bytes = json_sink.into_inner();
        let from_csv: Vec<CsvRow> = csv::Reader::from_reader(&csv_bytes[..])
            .deserialize()
            .map(|r| r.expect("a valid CSV row"))
            .collect();
        let from_json: Vec<serde_json::Value> = std::str::from_utf8(&json_bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a valid JSON line"))
            .collect();
        assert_eq!(from_csv.len(), outs.len());
        assert_eq!(from_json.len(), outs.len());
        for (c, j) in from_csv.iter().zip(&from_json) {
            assert_eq!(c.kind, j["type"].as_str().unwrap());
            assert_eq!(c.schema, j["schema"].as_u64().unwrap() as u32);
            assert_eq!(c.time, j["time"].as_str().unwrap());
            assert_eq!(
                c.owner_pid.map(u64::from),
                j["owner_pid"].as_u64().or(j["owner"]["pid"].as_u64())
            );
            match c.kind.as_str() {
                "transition" => {
                    assert_eq!(c.conn_id, j["conn_id"].as_u64());
                    assert_eq!(c.laddr.as_deref(), j["laddr"].as_str());
                    assert_eq!(c.lport.map(u64::from), j["lport"].as_u64());
                    assert_eq!(c.raddr.as_deref(), j["raddr"].as_str());
                    assert_eq!(
                        (c.old.as_deref(), c.new.as_deref()),
                        (j["old"].as_str(), j["new"].as_str())
                    );
                    assert_eq!(c.in_old_state_ns, j["in_old_state_ns"].as_u64());
                    assert_eq!(c.owner_comm.as_deref(), j["owner_comm"].as_str());
                    assert_eq!(c.role.as_deref(), j["role"].as_str());
                }
                "lifecycle" => {
                    assert_eq!(c.conn_id, j["conn_id"].as_u64());
                    assert_eq!(c.close_kind.as_deref(), j["close_kind"].as_str());
                    assert_eq!(c.handshake_ns, j["handshake_ns"].as_u64());
                    assert_eq!(c.lifetime_ns, j["lifetime_ns"].as_u64());
                    assert_eq!(c.complete, j["complete"].as_bool());
                    let path: Vec<&str> = j["path"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|s| s["state"].as_str().unwrap())
                        .collect();
                    assert_eq!(c.path.as_deref(), Some(path.join(">").as_str()));
                }
                "alert" => {
                    assert_eq!(c.rule.as_deref(), j["rule"].as_str());
                    assert_eq!(c.status.as_deref(), j["status"].as_str());
                    assert_eq!(c.message.as_deref(), j["message"].as_str());
                    assert_eq!(c.count, j["count"].as_u64());
                }
                other => panic!("unexpected type {other}"),
            }
        }
    }
}
