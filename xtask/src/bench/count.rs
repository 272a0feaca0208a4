//! Counting what a tracer saw of the bench's connections: transitions whose local or remote
//! port is one of the bench's listening ports, in tcptrace's NDJSON or bcc tcpstates' columns.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::path::Path;

use anyhow::{Context as _, Result};
use serde_json::Value;

#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// Transitions on the bench's ports.
    pub transitions: u64,
    /// The same, by "OLD->NEW" (checks that the lifecycle really is the 10-step one).
    pub by_kind: BTreeMap<String, u64>,
    /// Transitions of other connections on this machine during the run (not counted).
    pub other_transitions: u64,
    /// Lines that should have been transitions but could not be read.
    pub unreadable: u64,
    /// What the tool says it lost, where it says so (tcptrace's summary, bcc's
    /// "Possibly lost N samples").
    pub tool_reported_lost: Option<u64>,
    /// tcptrace's final summary line, as written.
    pub summary: Option<Value>,
}

struct PortSet(Vec<bool>);

impl PortSet {
    fn new(ports: &[u16]) -> Self {
        let mut set = vec![false; 1 << 16];
        for &p in ports {
            set[usize::from(p)] = true;
        }
        PortSet(set)
    }

    fn hit(&self, a: u64, b: u64) -> bool {
        [a, b].iter().any(|&p| p < 1 << 16 && self.0[p as usize])
    }
}

impl Seen {
    /// tcptrace's summary line, and the loss it reports.
    pub fn set_summary(&mut self, v: Option<Value>) {
        self.tool_reported_lost = v.as_ref().and_then(|v| v.get("lost")?.as_u64());
        self.summary = v;
    }

    fn add(&mut self, ours: bool, old: &str, new: &str) {
        if !ours {
            self.other_transitions += 1;
            return;
        }
        self.transitions += 1;
        // Millions of lines, a dozen kinds: no allocation once a kind has been seen.
        let known = self.by_kind.iter_mut().find(|(k, _)| {
            k.len() == old.len() + 2 + new.len()
                && k.starts_with(old)
                && k.ends_with(new)
                && &k[old.len()..old.len() + 2] == "->"
        });
        match known {
            Some((_, n)) => *n += 1,
            None => {
                self.by_kind.insert(format!("{old}->{new}"), 1);
            }
        }
    }
}

/// tcptrace's `--output` NDJSON. Transition lines are matched on their raw text (serde_json
/// writes them compactly; a `"key":` can't occur inside a JSON string, where quotes are
/// escaped), so a 400 MB log takes seconds; anything else that mentions a transition is parsed.
pub fn tcptrace_ndjson(path: &Path, ports: &[u16]) -> Result<Seen> {
    let set = PortSet::new(ports);
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut seen = Seen::default();
    let mut line = Vec::with_capacity(512);
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            seen.unreadable += 1;
            continue;
        };
        // tcptrace writes the type first; `contains` keeps other writers (and field orders) right.
        if text.starts_with(r#"{"type":"transition""#) || text.contains(r#""type":"transition""#) {
            let fast = (|| {
                let lport = number_after(text, r#""lport":"#)?;
                let rport = number_after(text, r#""rport":"#)?;
                let old = string_after(text, r#""old":""#)?;
                let new = string_after(text, r#""new":""#)?;
                Some((lport, rport, old, new))
            })();
            match fast {
                Some((l, r, old, new)) => seen.add(set.hit(l, r), old, new),
                None => parsed_transition(text, &set, &mut seen),
            }
        } else if text.contains("summary") {
            if let Ok(v) = serde_json::from_str::<Value>(text)
                && v.get("type").and_then(Value::as_str) == Some("summary")
            {
                seen.set_summary(Some(v));
            }
        } else if text.contains("transition") {
            parsed_transition(text, &set, &mut seen);
        }
    }
    Ok(seen)
}

fn parsed_transition(text: &str, set: &PortSet, seen: &mut Seen) {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        seen.unreadable += 1;
        return;
    };
    if v.get("type").and_then(Value::as_str) != Some("transition") {
        return;
    }
    let port = |k: &str| v.get(k).and_then(Value::as_u64);
    let state = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
    match (port("lport"), port("rport")) {
        (Some(l), Some(r)) => seen.add(set.hit(l, r), &state("old"), &state("new")),
        _ => seen.unreadable += 1,
    }
}

fn number_after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn string_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let rest = &text[text.find(key)? + key.len()..];
    Some(&rest[..rest.find('"')?])
}

/// bcc tcpstates' default columns, located from the `->` between the states because the
/// command name before them may contain spaces:
/// `SKADDR C-PID C-COMM LADDR LPORT RADDR RPORT OLDSTATE -> NEWSTATE MS`.
pub fn bcc_tcpstates(stdout: &Path, stderr: &Path, ports: &[u16]) -> Result<Seen> {
    let set = PortSet::new(ports);
    let mut seen = Seen::default();
    let mut lost = 0u64;
    for path in [stdout, stderr] {
        let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut line = Vec::with_capacity(256);
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&line);
            if let Some(n) = text
                .trim()
                .strip_prefix("Possibly lost ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
            {
                lost += n;
                continue;
            }
            let tokens: Vec<&str> = text.split_whitespace().collect();
            let Some(arrow) = tokens.iter().position(|&t| t == "->") else {
                continue;
            };
            if arrow < 4 || arrow + 1 >= tokens.len() || tokens[0] == "SKADDR" {
                continue;
            }
            match (tokens[arrow - 4].parse(), tokens[arrow - 2].parse()) {
                (Ok(l), Ok(r)) => seen.add(set.hit(l, r), tokens[arrow - 1], tokens[arrow + 1]),
                _ => seen.unreadable += 1,
            }
        }
    }
    seen.tool_reported_lost = Some(lost);
    Ok(seen)
}

/// The summary line of a `--format binary` capture (a JSON line among the binary records).
pub fn capture_summary(path: &Path) -> Result<Option<Value>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut summary = None;
    for line in BufReader::with_capacity(1 << 20, file).split(b'\n') {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.first() == Some(&b'{')
            && let Ok(v) = serde_json::from_slice::<Value>(&line)
            && v.get("type").and_then(Value::as_str) == Some("summary")
        {
            summary = Some(v);
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("xtask-bench-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("write a fixture");
        path
    }

    #[test]
    fn tcptrace_lines_are_filtered_by_either_port() {
        let path = write(
            "t.ndjson",
            concat!(
                r#"{"type":"transition","schema":1,"ts_ns":1,"conn_id":1,"laddr":"127.0.0.1","lport":0,"raddr":"127.0.0.1","rport":27400,"old":"CLOSE","new":"SYN_SENT"}"#,
                "\n",
                r#"{"type":"transition","schema":1,"ts_ns":2,"conn_id":2,"laddr":"127.0.0.1","lport":27400,"raddr":"127.0.0.1","rport":40001,"old":"LISTEN","new":"SYN_RECV"}"#,
                "\n",
                r#"{"type":"transition","schema":1,"ts_ns":3,"conn_id":3,"laddr":"10.0.0.1","lport":22,"raddr":"10.0.0.2","rport":50000,"old":"ESTABLISHED","new":"FIN_WAIT1"}"#,
                "\n",
                r#"{"type": "transition", "lport": 27401, "rport": 1, "old": "A", "new": "B"}"#,
                "\n",
                r#"{"type":"lifecycle","lport":27400,"note":"transition"}"#,
                "\n",
                r#"{"type":"summary","schema":1,"transitions":4,"lost":7}"#,
                "\n",
            ),
        );
        let seen = tcptrace_ndjson(&path, &[27400, 27401]).expect("count");
        std::fs::remove_file(&path).ok();
        assert_eq!(seen.transitions, 3);
        assert_eq!(seen.other_transitions, 1);
        assert_eq!(seen.by_kind.get("LISTEN->SYN_RECV"), Some(&1));
        assert_eq!(seen.by_kind.get("A->B"), Some(&1));
        assert_eq!(seen.tool_reported_lost, Some(7));
    }

    #[test]
    fn bcc_columns_are_found_from_the_arrow() {
        let out = write(
            "b.out",
            "SKADDR           C-PID C-COMM     LADDR           LPORT RADDR           RPORT OLDSTATE    -> NEWSTATE    MS\n\
             ffff888104369280 11376 python3    127.0.0.1       27400 0.0.0.0         0     CLOSE       -> LISTEN      0.000\n\
             ffff88810436ca00 11376 my comm    127.0.0.1       0     127.0.0.1       27400 CLOSE       -> SYN_SENT    0.000\n\
             ffff88810436ca00 1 sshd    10.0.0.1       22     10.0.0.2       5000 ESTABLISHED       -> FIN_WAIT1    0.000\n\
             Possibly lost 12 samples\n",
        );
        let err = write("b.err", "Possibly lost 3 samples\n");
        let seen = bcc_tcpstates(&out, &err, &[27400]).expect("count");
        std::fs::remove_file(&out).ok();
        std::fs::remove_file(&err).ok();
        assert_eq!(seen.transitions, 2);
        assert_eq!(seen.other_transitions, 1);
        assert_eq!(seen.tool_reported_lost, Some(15));
    }
}
