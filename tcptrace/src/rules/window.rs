//! Sliding-window counting per key, shared by the event-rate rules: a finding per key that
//! fires when enough events fall in the window, re-states when its total doubles, and
//! resolves once the window count drops below half the threshold (hysteresis, so a rate
//! hovering at the threshold does not flap). Bounded: a key cap, idle keys forgotten.

use super::{Alert, AlertStatus, Interest, Rule, RuleEvent};
use crate::event::Task;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::Hash;

const BUCKETS: usize = 16;

/// Events in the last window at 1/16-window resolution, in 68 bytes whatever the rate.
#[derive(Clone, Debug)]
pub struct WindowCounter {
    buckets: [u32; BUCKETS],
    /// Absolute index (ts / bucket_ns) of the newest bucket.
    head: u64,
    bucket_ns: u64,
}

impl WindowCounter {
    pub fn new(window_ns: u64, ts: u64) -> WindowCounter {
        let bucket_ns = (window_ns / BUCKETS as u64).max(1);
        WindowCounter {
            buckets: [0; BUCKETS],
            head: ts / bucket_ns,
            bucket_ns,
        }
    }

    /// Moves the window's end to `ts`; an earlier `ts` (clock going back) changes nothing.
    fn advance(&mut self, ts: u64) {
        let abs = ts / self.bucket_ns;
        if abs <= self.head {
            return;
        }
        let n = (abs - self.head).min(BUCKETS as u64);
        for i in 1..=n {
            self.buckets[(self.head.wrapping_add(i) % BUCKETS as u64) as usize] = 0;
        }
        self.head = abs;
    }

    /// Counts one event at `ts` (an event from the past counts as now).
    pub fn add(&mut self, ts: u64) {
        self.advance(ts);
        let b = &mut self.buckets[(self.head % BUCKETS as u64) as usize];
        *b = b.saturating_add(1);
    }

    pub fn count(&mut self, now: u64) -> u64 {
        self.advance(now);
        self.buckets.iter().map(|&b| u64::from(b)).sum()
    }
}

/// "Which process": a single pid if every event so far came from it, else None (events
/// from several processes, or from known and unknown owners, name nobody).
#[derive(Clone, Copy, Debug, Default)]
pub struct OwnerVote {
    pub task: Option<Task>,
    state: Vote,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Vote {
    #[default]
    Empty,
    One,
    Mixed,
}

impl OwnerVote {
    pub fn add(&mut self, t: Option<Task>) {
        match (self.state, self.task, t) {
            (Vote::Empty, _, t) => {
                self.task = t;
                self.state = Vote::One;
            }
            // Same process: keep the latest thread/comm.
            (Vote::One, Some(a), Some(b)) if a.pid == b.pid => self.task = Some(b),
            (Vote::One, None, None) | (Vote::Mixed, _, _) => {}
            (Vote::One, _, _) => {
                self.task = None;
                self.state = Vote::Mixed;
            }
        }
    }
}

/// One key's finding.
#[derive(Clone, Debug)]
struct Episode {
    counter: WindowCounter,
    firing_since: Option<u64>,
    /// Events since the key was first counted (it is forgotten once idle and quiet).
    total: u64,
    reported: u64,
    owner: OwnerVote,
    /// Largest value recorded (rule-specific, e.g. handshake ns).
    max_value: u64,
}

/// A finding's figures at the moment it is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub status: AlertStatus,
    /// Events in the current window.
    pub count: u64,
    /// Events since the key was first counted.
    pub total: u64,
    pub max_value: u64,
    /// The one process behind all the events, if there is one.
    pub owner: Option<Task>,
    /// On resolve: time since it fired.
    pub duration_ns: Option<u64>,
}

impl Snapshot {
    /// An alert carrying this snapshot's figures.
    pub fn alert(
        &self,
        rule: &'static str,
        key: String,
        now: u64,
        message: String,
        explanation: &'static str,
    ) -> Alert {
        let mut a = Alert::new(rule, self.status, now, key, message, explanation);
        a.owner = self.owner;
        a.count = self.count;
        a.total = self.total;
        a.duration_ns = self.duration_ns;
        a
    }
}

pub struct Episodes<K> {
    /// Keyed by peers (remote-chosen, up to `max_keys` of them): std's SipHash.
    map: HashMap<K, Episode>,
    window_ns: u64,
    min_count: u64,
    max_keys: usize,
    /// Events for keys that did not fit under `max_keys`.
    pub untracked: u64,
}

impl<K: Hash + Eq + Clone> Episodes<K> {
    pub fn new(window_ns: u64, min_count: u64, max_keys: usize) -> Episodes<K> {
        Episodes {
            map: HashMap::new(),
            window_ns,
            min_count: min_count.max(1),
            max_keys,
            untracked: 0,
        }
    }

    pub fn window_ns(&self) -> u64 {
        self.window_ns
    }

    pub fn min_count(&self) -> u64 {
        self.min_count
    }

    /// Counts one event for `key`. Returns a snapshot when this event crosses the threshold
    /// (Firing) or the total has doubled since the last report (Update).
    pub fn record(
        &mut self,
        key: &K,
        ts: u64,
        owner: Option<Task>,
        value: u64,
    ) -> Option<Snapshot> {
        let full = self.map.len() >= self.max_keys;
        let ep = match self.map.entry(key.clone()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(_) if full => {
                self.untracked += 1;
                return None;
            }
            Entry::Vacant(v) => v.insert(Episode {
                counter: WindowCounter::new(self.window_ns, ts),
                firing_since: None,
                total: 0,
                reported: 0,
                owner: OwnerVote::default(),
                max_value: 0,
            }),
        };
        let min = self.min_count;
        ep.counter.add(ts);
        ep.total += 1;
        ep.owner.add(owner);
        ep.max_value = ep.max_value.max(value);
        let count = ep.counter.count(ts);
        let status = match ep.firing_since {
            None if count >= min => {
                ep.firing_since = Some(ts);
                AlertStatus::Firing
            }
            Some(_) if ep.total >= 2 * ep.reported => AlertStatus::Update,
            _ => return None,
        };
        ep.reported = ep.total;
        Some(Snapshot {
            status,
            count,
            total: ep.total,
            max_value: ep.max_value,
            owner: ep.owner.task,
            duration_ns: None,
        })
    }

    /// Resolves firing keys whose window count fell below half the threshold and forgets
    /// keys with nothing left in their window. Returns the resolved, sorted by key so the
    /// output does not depend on hash order.
    pub fn sweep(&mut self, now: u64) -> Vec<(K, Snapshot)>
    where
        K: Ord,
    {
        let below = self.min_count.div_ceil(2);
        let mut done = Vec::new();
        self.map.retain(|k, ep| {
            let count = ep.counter.count(now);
            match ep.firing_since {
                Some(since) if count < below => {
                    done.push((
                        k.clone(),
                        Snapshot {
                            status: AlertStatus::Resolved,
                            count,
                            total: ep.total,
                            max_value: ep.max_value,
                            owner: ep.owner.task,
                            duration_ns: Some(now.saturating_sub(since)),
                        },
                    ));
                    false
                }
                Some(_) => true,
                None => count > 0,
            }
        });
        done.sort_by(|a, b| a.0.cmp(&b.0));
        done
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }
}

/// What an event-rate rule counts and how it words its findings. [`WindowRule`] does the
/// rest, the same for every such rule: counting per key, sweeping, the common alert fields.
pub trait WindowSpec {
    type Key: Hash + Eq + Clone + Ord;
    const NAME: &'static str;
    const EXPLANATION: &'static str;
    const DESCRIPTION: &'static str;
    /// The events `sample` may count (see [`Interest`]).
    const INTEREST: Interest;
    /// What this transition counts for: the key, the owner to vote for, and a value whose
    /// largest the finding keeps (e.g. a handshake time); None when it does not count.
    fn sample(&self, ev: &RuleEvent<'_>) -> Option<(Self::Key, Option<Task>, u64)>;
    /// The finding's grouping key (e.g. `peer=10.0.0.5:5432`) and its human line.
    fn finding(&self, key: &Self::Key, s: &Snapshot, window_ns: u64) -> (String, String);
    /// Rule-specific figures on top of the common ones.
    fn decorate(&self, _alert: &mut Alert, _s: &Snapshot) {}
}

/// An event-rate rule: a [`WindowSpec`] over [`Episodes`].
pub struct WindowRule<S: WindowSpec> {
    spec: S,
    eps: Episodes<S::Key>,
}

impl<S: WindowSpec> WindowRule<S> {
    pub fn new(spec: S, window_ns: u64, min_count: u64, max_keys: usize) -> WindowRule<S> {
        WindowRule {
            spec,
            eps: Episodes::new(window_ns, min_count, max_keys),
        }
    }

    fn alert(&self, key: &S::Key, s: &Snapshot, now: u64) -> Alert {
        let (key, message) = self.spec.finding(key, s, self.eps.window_ns());
        let mut a = s.alert(S::NAME, key, now, message, S::EXPLANATION);
        a.threshold_count = Some(self.eps.min_count());
        a.window_ns = Some(self.eps.window_ns());
        self.spec.decorate(&mut a, s);
        a
    }
}

impl<S: WindowSpec> Rule for WindowRule<S> {
    fn name(&self) -> &'static str {
        S::NAME
    }
    fn describe(&self) -> &'static str {
        S::DESCRIPTION
    }
    fn interest(&self) -> Interest {
        S::INTEREST
    }
    fn on_transition(&mut self, ev: &RuleEvent<'_>, out: &mut Vec<Alert>) {
        let Some((key, owner, value)) = self.spec.sample(ev) else {
            return;
        };
        if let Some(s) = self.eps.record(&key, ev.ts(), owner, value) {
            out.push(self.alert(&key, &s, ev.ts()));
        }
    }
    fn tick(&mut self, now_ns: u64, out: &mut Vec<Alert>) {
        for (key, s) in self.eps.sweep(now_ns) {
            out.push(self.alert(&key, &s, now_ns));
        }
    }
    fn finish(&mut self) {
        self.eps.clear();
    }
    fn footprint(&self) -> usize {
        self.eps.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Comm;

    const W: u64 = 16_000;

    #[test]
    fn window_forgets_old_buckets_and_survives_time_going_back() {
        let mut w = WindowCounter::new(W, 0);
        w.add(0);
        w.add(999);
        w.add(1_000);
        assert_eq!(w.count(1_000), 3);
        assert_eq!(w.count(15_999), 3, "bucket 0 is still inside the window");
        assert_eq!(w.count(16_000), 1, "bucket 0 (ts 0, 999) slid out");
        w.add(5);
        assert_eq!(w.count(16_000), 2, "an event from the past counts as now");
        assert_eq!(w.count(1_000_000), 0);
    }

    #[test]
    fn fires_at_threshold_updates_on_doubling_resolves_below_half() {
        let mut e: Episodes<u32> = Episodes::new(W, 4, 10);
        let st = |e: &mut Episodes<u32>, ts| {
            e.record(&1, ts, None, ts)
                .map(|s| (s.status, s.count, s.total))
        };
        assert_eq!(st(&mut e, 0), None);
        assert_eq!(st(&mut e, 1), None);
        assert_eq!(st(&mut e, 2), None);
        assert_eq!(st(&mut e, 3), Some((AlertStatus::Firing, 4, 4)));
        for ts in 4..7 {
            assert_eq!(st(&mut e, ts), None);
        }
        assert_eq!(st(&mut e, 7), Some((AlertStatus::Update, 8, 8)));
        assert!(e.sweep(W - 1).is_empty(), "8 events still in the window");
        let done = e.sweep(W);
        assert_eq!(done.len(), 1);
        let (k, s) = done[0];
        assert_eq!(
            (k, s.status, s.count, s.total, s.max_value, s.duration_ns),
            (1, AlertStatus::Resolved, 0, 8, 7, Some(W - 3))
        );
        assert_eq!(e.len(), 0);
    }

    #[test]
    fn quiet_keys_are_forgotten_and_the_key_cap_holds() {
        let mut e: Episodes<u32> = Episodes::new(W, 100, 2);
        e.record(&1, 0, None, 0);
        e.record(&2, 0, None, 0);
        assert!(e.record(&3, 0, None, 0).is_none());
        assert_eq!((e.len(), e.untracked), (2, 1));
        assert!(e.sweep(2 * W).is_empty(), "nothing was firing");
        assert_eq!(e.len(), 0);
    }

    #[test]
    fn owner_vote_names_a_single_process_only() {
        let t = |pid| {
            Some(Task {
                pid,
                tid: pid,
                comm: Comm::new("x"),
            })
        };
        let mut v = OwnerVote::default();
        v.add(t(5));
        v.add(Some(Task {
            tid: 6,
            ..t(5).unwrap()
        }));
        assert_eq!(v.task.map(|t| (t.pid, t.tid)), Some((5, 6)));
        v.add(t(7));
        assert_eq!(v.task, None);
        v.add(t(5));
        assert_eq!(v.task, None, "once mixed, stays mixed");
        let mut u = OwnerVote::default();
        u.add(None);
        u.add(t(5));
        assert_eq!(u.task, None, "unknown then known is not one known process");
    }
}
