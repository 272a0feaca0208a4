//! Sockets that predate the tracer: the start-up snapshot turned into `Present` events
//! (one per socket, in its current state, with its owner from /proc), and the live
//! stream's later events of those sockets mapped onto them, so that no socket is missed
//! or counted twice in the window between attaching and the snapshot.
//!
//! The kernel side gives a socket it first sees mid-life a fresh identity and marks the
//! event `midlife`; such an event whose 4-tuple is a snapshotted socket's continues that
//! socket. A socket that started after the programs were attached is also in the snapshot:
//! its first full-tuple event (not mid-life) shows the seed was a duplicate.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::cgroup::cgroup_id_of_pid;
use crate::engine::IdMap;
use crate::event::{ConnMeta, EventKind, OwnerVia, Task, TcpState, Transition};
use crate::filter::FilterArgs;
use crate::snapshot::{SnapSocket, Snapshot};

/// Identities of snapshotted sockets: the top bit set, so they never meet the kernel's.
const SEED_ID_BASE: u64 = 1 << 63;

/// What to do with a live event after [`Adopter::adopt`].
#[derive(Debug, PartialEq, Eq)]
pub enum Adopted {
    /// Feed it (its `conn_id` may have been rewritten to a snapshotted socket's).
    Feed,
    /// Feed it, after telling the engine to forget the duplicate seed `conn_id`.
    ForgetSeedThenFeed(u64),
}

#[derive(Default)]
pub struct Adopter {
    /// (local, remote) → seed identity, for seeds not yet matched by a live event.
    by_tuple: HashMap<(SocketAddr, SocketAddr), u64>,
    /// Kernel identity → seed identity, for seeds the live stream has continued.
    by_kernel_id: IdMap<u64>,
    /// Kernel identities of sockets that started under the tracer before the snapshot was
    /// finished (so it may list them too), until their first event with a full tuple.
    live_started: IdMap<()>,
    /// CLOCK_MONOTONIC at which the snapshot was finished: sockets started later are not
    /// in it.
    window_end_ns: u64,
}

impl Adopter {
    /// The `Present` events for `snap` that pass `filter`, stamped `ts_ns`. Timewait
    /// sockets included: the kernel side reports the end of one it did not see created.
    pub fn seed(&mut self, snap: &Snapshot, filter: &FilterArgs, ts_ns: u64) -> Vec<Transition> {
        self.window_end_ns = snap.taken_mono_end_ns.max(ts_ns);
        // Listening ports (per namespace) and their holders, for unaccepted children.
        let mut listeners: HashMap<(u64, u16), Option<Task>> = HashMap::new();
        for s in &snap.sockets {
            if s.state == TcpState::Listen {
                listeners.insert((s.netns, s.local.port()), holder(s));
            }
        }
        // One process often holds many sockets: its cgroup is read once.
        let mut cgroups: HashMap<u32, u64> = HashMap::new();
        let mut out = Vec::new();
        for s in &snap.sockets {
            if !keeps(filter, s) {
                continue;
            }
            let id = SEED_ID_BASE | (out.len() as u64 + 1);
            let mut owner = holder(s);
            let mut meta = ConnMeta {
                owner_via: if owner.is_some() {
                    OwnerVia::Fd
                } else {
                    OwnerVia::Unknown
                },
                uid: s.uid,
                cgroup_id: owner
                    .map(|o| {
                        *cgroups
                            .entry(o.pid)
                            .or_insert_with(|| cgroup_id_of_pid(o.pid).unwrap_or(0))
                    })
                    .unwrap_or(0),
                netns: s.netns as u32,
                unaccepted: false,
                container: [0; 12],
            };
            if s.inode == 0
                && matches!(s.state, TcpState::Established | TcpState::CloseWait)
                && let Some(l) = listeners.get(&(s.netns, s.local.port()))
            {
                // No file refers to it, and a listener has its port: it sits in that
                // listener's accept queue.
                meta.unaccepted = true;
                meta.owner_via = OwnerVia::Listener;
                owner = *l;
            }
            if meta.owner_via == OwnerVia::Unknown || owner.is_none() {
                meta.owner_via = OwnerVia::Unknown;
            }
            if let Some(pid) = filter.pid
                && owner.map(|o| o.pid) != Some(pid)
            {
                continue;
            }
            if let Some(comm) = &filter.comm
                && owner.map(|o| o.comm.as_str().into_owned()).as_deref() != Some(comm)
            {
                continue;
            }
            self.by_tuple.insert((s.local, s.remote), id);
            out.push(Transition {
                ts_ns,
                conn_id: id,
                skaddr: 0,
                task: Task::default(),
                local: s.local,
                remote: s.remote,
                old: s.state,
                new: s.state,
                starts_conn: false,
                midlife: true,
                cpu: 0,
                owner,
                meta,
                kind: EventKind::Present,
            });
        }
        out
    }

    /// Maps a live event onto the snapshotted socket it continues, if any. Costs one
    /// lookup per event while seeds are pending, none once they are all resolved.
    pub fn adopt(&mut self, t: &mut Transition) -> Adopted {
        if self.by_tuple.is_empty() && self.by_kernel_id.is_empty() {
            return Adopted::Feed;
        }
        if let Some(&seed) = self.by_kernel_id.get(&t.conn_id) {
            if t.new == TcpState::Close && t.kind == EventKind::State {
                self.by_kernel_id.remove(&t.conn_id);
            }
            t.conn_id = seed;
            return Adopted::Feed;
        }
        if t.starts_conn {
            if t.ts_ns <= self.window_end_ns {
                self.live_started.insert(t.conn_id, ());
            }
            return Adopted::Feed;
        }
        let started_live = !self.live_started.is_empty()
            && t.local.port() != 0
            && self.live_started.remove(&t.conn_id).is_some();
        if !t.midlife && !started_live {
            return Adopted::Feed;
        }
        let key = (t.local, t.remote);
        let Some(seed) = self.by_tuple.remove(&key) else {
            return Adopted::Feed;
        };
        if started_live || !t.midlife {
            // Started under the tracer: the snapshot saw it too.
            return Adopted::ForgetSeedThenFeed(seed);
        }
        if t.new != TcpState::Close {
            self.by_kernel_id.insert(t.conn_id, seed);
        }
        t.conn_id = seed;
        Adopted::Feed
    }

    /// Snapshotted sockets the live stream has not touched yet.
    pub fn pending(&self) -> usize {
        self.by_tuple.len()
    }
}

/// The lowest-pid process holding the socket (processes sharing an fd after fork: the
/// parent, usually).
fn holder(s: &SnapSocket) -> Option<Task> {
    s.owners.first().map(|h| Task {
        pid: h.pid,
        tid: h.pid,
        comm: h.comm,
    })
}

/// The tuple and namespace filters, as the kernel applies them to live events.
fn keeps(f: &FilterArgs, s: &SnapSocket) -> bool {
    if !f.ports.is_empty()
        && !f
            .ports
            .iter()
            .any(|p| *p == s.local.port() || *p == s.remote.port())
    {
        return false;
    }
    if f.ipv4 && !s.local.is_ipv4() || f.ipv6 && !s.local.is_ipv6() {
        return false;
    }
    if let Some(c) = f.laddr
        && !c.contains(s.local.ip())
    {
        return false;
    }
    if let Some(c) = f.raddr
        && !c.contains(s.remote.ip())
    {
        return false;
    }
    if let Some(ns) = f.netns
        && u64::from(ns) != s.netns
    {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Comm;
    use crate::snapshot::Holder;

    fn sock(
        state: TcpState,
        local: &str,
        remote: &str,
        inode: u64,
        pid: Option<u32>,
    ) -> SnapSocket {
        SnapSocket {
            state,
            timewait: false,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            inode,
            uid: 1000,
            cookie: 1,
            netns: 4026531840,
            owners: pid
                .map(|pid| Holder {
                    pid,
                    comm: Comm::new("srv"),
                })
                .into_iter()
                .collect(),
            rqueue: 0,
            wqueue: 0,
        }
    }

    fn snap(sockets: Vec<SnapSocket>) -> Snapshot {
        Snapshot {
            sockets,
            ..Snapshot::default()
        }
    }

    fn live(id: u64, local: &str, remote: &str, old: TcpState, new: TcpState) -> Transition {
        Transition {
            ts_ns: 10,
            conn_id: id,
            skaddr: 0xffff,
            task: Task::default(),
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            old,
            new,
            starts_conn: false,
            midlife: true,
            cpu: 0,
            owner: None,
            meta: ConnMeta::default(),
            kind: EventKind::State,
        }
    }

    #[test]
    fn seeds_carry_owner_or_listener_and_skip_filtered() {
        use TcpState::*;
        let mut tw = sock(TimeWait, "127.0.0.1:5", "127.0.0.1:6", 0, None);
        tw.timewait = true;
        let s = snap(vec![
            sock(Listen, "0.0.0.0:8080", "0.0.0.0:0", 11, Some(42)),
            sock(CloseWait, "127.0.0.1:8080", "127.0.0.1:5000", 12, Some(42)),
            sock(CloseWait, "127.0.0.1:8080", "127.0.0.1:5001", 0, None),
            sock(Established, "127.0.0.1:9", "127.0.0.1:10", 13, Some(7)),
            tw,
        ]);
        let mut a = Adopter::default();
        let seeds = a.seed(&s, &FilterArgs::default(), 99);
        assert_eq!(seeds.len(), 5);
        assert_eq!((seeds[4].new, seeds[4].owner), (TimeWait, None));
        assert!(
            seeds
                .iter()
                .all(|t| t.kind == EventKind::Present && t.ts_ns == 99)
        );
        assert!(seeds.iter().all(|t| t.conn_id & SEED_ID_BASE != 0));
        assert_eq!(seeds[1].owner.map(|o| o.pid), Some(42));
        assert_eq!(seeds[1].meta.owner_via, OwnerVia::Fd);
        assert!(!seeds[1].meta.unaccepted);
        assert_eq!(
            seeds[2].owner.map(|o| o.pid),
            Some(42),
            "the listener's owner"
        );
        assert_eq!(seeds[2].meta.owner_via, OwnerVia::Listener);
        assert!(seeds[2].meta.unaccepted);
        let only_8080 = FilterArgs {
            ports: vec![8080],
            ..FilterArgs::default()
        };
        assert_eq!(Adopter::default().seed(&s, &only_8080, 1).len(), 3);
        let only_5 = FilterArgs {
            ports: vec![5],
            ..FilterArgs::default()
        };
        assert_eq!(
            Adopter::default().seed(&s, &only_5, 1).len(),
            1,
            "the timewait one"
        );
        let pid7 = FilterArgs {
            pid: Some(7),
            ..FilterArgs::default()
        };
        assert_eq!(Adopter::default().seed(&s, &pid7, 1).len(), 1);
    }

    #[test]
    fn midlife_events_continue_seeds_and_new_sockets_retire_duplicates() {
        use TcpState::*;
        let s = snap(vec![
            sock(CloseWait, "127.0.0.1:8080", "127.0.0.1:5000", 12, Some(42)),
            sock(Established, "127.0.0.1:9", "127.0.0.1:10", 13, Some(7)),
        ]);
        let mut a = Adopter::default();
        // The snapshot ended at 100; the live events below happened before (at 10).
        let seeds = a.seed(&s, &FilterArgs::default(), 100);
        // The leaked socket finally closes: its events continue the seed, to the end.
        let mut e = live(500, "127.0.0.1:8080", "127.0.0.1:5000", CloseWait, LastAck);
        assert_eq!(a.adopt(&mut e), Adopted::Feed);
        assert_eq!(e.conn_id, seeds[0].conn_id);
        let mut e = live(500, "127.0.0.1:8080", "127.0.0.1:5000", LastAck, Close);
        e.midlife = false;
        assert_eq!(a.adopt(&mut e), Adopted::Feed);
        assert_eq!(e.conn_id, seeds[0].conn_id);
        // Its kernel id is forgotten at CLOSE: a later socket reusing it is itself.
        let mut e = live(500, "127.0.0.1:1", "127.0.0.1:2", Close, SynSent);
        e.starts_conn = true;
        e.midlife = false;
        assert_eq!(a.adopt(&mut e), Adopted::Feed);
        assert_eq!(e.conn_id, 500);
        // A connection that started after attach and was also in the snapshot: the seed
        // goes, the live identity stays.
        let mut start = live(600, "127.0.0.1:0", "127.0.0.1:10", Close, SynSent);
        start.starts_conn = true;
        start.midlife = false;
        assert_eq!(a.adopt(&mut start), Adopted::Feed);
        let mut e = live(600, "127.0.0.1:9", "127.0.0.1:10", SynSent, Established);
        e.midlife = false;
        assert_eq!(
            a.adopt(&mut e),
            Adopted::ForgetSeedThenFeed(seeds[1].conn_id)
        );
        assert_eq!(e.conn_id, 600);
        assert_eq!(a.pending(), 0);
    }
}
