//! The engine's counters, as the metrics sink and `--stats` show them.

use super::close_kind::CloseKind;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Lifecycles by how they closed; serialised as `{"active_close": n, …}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloseKindCounts(pub [u64; CloseKind::COUNT]);

impl CloseKindCounts {
    pub fn get(&self, k: CloseKind) -> u64 {
        self.0[k.index()]
    }

    pub fn add(&mut self, k: CloseKind) {
        self.0[k.index()] += 1;
    }
}

impl Serialize for CloseKindCounts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(CloseKind::COUNT))?;
        for k in CloseKind::ALL {
            m.serialize_entry(k.name(), &self.get(k))?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for CloseKindCounts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let m = std::collections::HashMap::<CloseKind, u64>::deserialize(d)?;
        let mut c = CloseKindCounts::default();
        for (k, n) in m {
            c.0[k.index()] = n;
        }
        Ok(c)
    }
}

/// A snapshot of the engine's counters. Totals count since the engine was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineStats {
    pub transitions: u64,
    /// Connections tracked now.
    pub tracked: u64,
    /// Listening sockets tracked now.
    pub listeners: u64,
    /// Distinct owners referenced now.
    pub owners: u64,
    /// Connections dropped to stay under `max_connections`.
    pub evicted: u64,
    pub illegal: u64,
    /// Transitions whose old state was not the state last seen, and connections retired
    /// because their socket vanished unseen (events were lost either way).
    pub gaps: u64,
    /// Connections first seen mid-life.
    pub partial_starts: u64,
    /// Starts under a conn_id that was still tracked (the older one was let go).
    pub superseded: u64,
    /// Lifecycles that reached CLOSE.
    pub lifecycles_closed: u64,
    /// Of those, the ones seen whole (`complete: true`).
    pub lifecycles_complete: u64,
    /// Lifecycles emitted without reaching CLOSE (evicted, finished, superseded, vanished).
    pub lifecycles_partial: u64,
    /// Connections retired because the kernel no longer had their socket (end lost).
    #[serde(default)]
    pub vanished: u64,
    pub close_kinds: CloseKindCounts,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_kind_counts_serialise_by_name() {
        let mut c = CloseKindCounts::default();
        c.add(CloseKind::Reset);
        c.add(CloseKind::Reset);
        let json = serde_json::to_string(&c).expect("serialise");
        assert!(json.starts_with("{\"active_close\":0,"), "{json}");
        assert!(json.contains("\"reset\":2"), "{json}");
        let back: CloseKindCounts = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back, c);
    }
}
