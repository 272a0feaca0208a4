//! Storage for tracked connections: a chunked slab of [`Conn`] with CLOCK eviction, the
//! conn_id → slot index type, and the interned owner table. Chunks (not one Vec) so that
//! growth never copies the whole table nor leaves half of it unused after a doubling.

use super::conn::{Conn, F_REFERENCED};
use crate::event::{Task, TcpState};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

const CHUNK: usize = 1024;

/// A multiply-fold hash for u64 conn_ids: one multiply on the hot path instead of SipHash.
/// conn_ids come from the kernel side, not from the network, so HashDoS is not a concern.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        let m = u128::from(v ^ self.0) * 0x9E37_79B9_7F4A_7C15;
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }
}

pub type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// The engine's conn_id → slot index: hashed so that connections opened one after another
/// sit side by side in the table.
pub type ConnIndex = HashMap<u64, u32, BuildHasherDefault<ConnIdHasher>>;

/// Ids that differ only in these bits share a run. The kernel program makes conn_ids as
/// `seq << 12 | cpu`, so a run is 8 connections opened in a row on one CPU (runs of 4, 8
/// and 16 replayed a log with 900,000 connections open in 5.6, 5.2 and 4.9 s, against
/// 7.0 s with every id hashed apart).
const RUN_BITS: u64 = RUN_MASK << 12;
const RUN_MASK: u64 = 0b111;

/// [`IdHasher`] of the id without its run bits, with the run bits as the low bits of the
/// hash. The table finds a key's first bucket from the hash's low bits, so the ids of a
/// run get neighbouring buckets: two cache lines of (key, slot) pairs and one of control
/// bytes where eight random places cost two cache misses each. With a million
/// connections tracked (TIME_WAIT included) the index is far larger than the caches, and
/// those misses were the engine's largest cost. Runs still land at random, and keys that
/// share a run's place differ in its bits, so at most 8 keys share a first bucket whatever
/// the ids are (a hashbrown probe group holds 16).
#[derive(Default, Clone, Copy)]
pub struct ConnIdHasher(u64);

impl Hasher for ConnIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    /// Keys other than a u64 (none in the index) hash as [`IdHasher`] hashes them.
    fn write(&mut self, bytes: &[u8]) {
        let mut h = IdHasher(self.0);
        h.write(bytes);
        self.0 = h.0;
    }
    fn write_u64(&mut self, v: u64) {
        let mut h = IdHasher(self.0);
        h.write_u64(v & !RUN_BITS);
        self.0 = (h.0 & !RUN_MASK) | ((v & RUN_BITS) >> 12);
    }
}

/// A map keyed by what this host decides (tasks, local addresses, owner pids): foldhash,
/// seeded per map, a few times cheaper than std's SipHash but only minimally
/// HashDoS-resistant, so maps keyed by what remote peers choose keep std's SipHash.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Connections by slot. The conn_id → slot index lives beside it (in the engine) so the
/// hot path can hold an index entry while allocating a slot.
pub struct Slab {
    chunks: Vec<Box<[Conn]>>,
    /// Slots handed out so far; slots below this are live or on the free list.
    high: u32,
    free: Vec<u32>,
    /// CLOCK hand.
    hand: u32,
}

impl Slab {
    pub fn new() -> Slab {
        Slab {
            chunks: Vec::new(),
            high: 0,
            free: Vec::new(),
            hand: 0,
        }
    }

    /// Stores `conn` in a free slot (the caller inserts the index entry).
    pub fn alloc(&mut self, conn: Conn) -> u32 {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                if self.high as usize == self.chunks.len() * CHUNK {
                    self.chunks
                        .push(vec![Conn::EMPTY; CHUNK].into_boxed_slice());
                }
                self.high += 1;
                self.high - 1
            }
        };
        *self.get_mut(slot) = conn;
        slot
    }

    /// Frees a slot whose index entry the caller already removed; returns its connection.
    pub fn release(&mut self, slot: u32) -> Conn {
        let c = std::mem::replace(self.get_mut(slot), Conn::EMPTY);
        self.free.push(slot);
        c
    }

    pub fn get(&self, slot: u32) -> &Conn {
        &self.chunks[slot as usize / CHUNK][slot as usize % CHUNK]
    }

    pub fn get_mut(&mut self, slot: u32) -> &mut Conn {
        &mut self.chunks[slot as usize / CHUNK][slot as usize % CHUNK]
    }

    /// Picks the connection to evict: CLOCK (second chance), an O(1) amortised
    /// approximation of least-recently-active. Listeners are passed over while anything
    /// else can go, since children inherit their owner from them. Never returns `protect`.
    pub fn victim(&mut self, protect: u32) -> Option<u32> {
        if self.high == 0 {
            return None;
        }
        // Two passes clear every referenced bit; a third finds a listener if that is all
        // there is.
        for step in 0..3 * u64::from(self.high) {
            let slot = self.hand;
            self.hand = (self.hand + 1) % self.high;
            let desperate = step >= 2 * u64::from(self.high);
            let c = self.get_mut(slot);
            if c.is_free() || slot == protect {
                continue;
            }
            if c.flags & F_REFERENCED != 0 {
                c.flags &= !F_REFERENCED;
                continue;
            }
            if c.state == TcpState::Listen as u8 && !desperate {
                continue;
            }
            return Some(slot);
        }
        None
    }

    /// Slot indices in use (for `finish`).
    /// Slots ever handed out (the live ones and the free ones among them).
    pub fn high(&self) -> u32 {
        self.high
    }

    pub fn live_slots(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.high).filter(|&s| !self.get(s).is_free())
    }

    /// Heap bytes held by the slab.
    pub fn heap_bytes(&self) -> usize {
        self.chunks.len() * CHUNK * std::mem::size_of::<Conn>()
            + self.chunks.capacity() * std::mem::size_of::<Box<[Conn]>>()
            + self.free.capacity() * 4
    }
}

/// Estimated heap of a std (hashbrown) map with `capacity` and `entry` bytes per slot:
/// buckets at 7/8 load rounded to a power of two, plus one control byte each.
pub fn map_heap_bytes(capacity: usize, entry: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let buckets = if capacity < 8 {
        capacity + 1
    } else {
        capacity * 8 / 7
    }
    .next_power_of_two();
    buckets * (entry + 1) + 16
}

/// Owners interned with reference counts: connections hold a u32, the table forgets a task
/// once no connection refers to it, so short-lived processes do not accumulate.
pub struct Owners {
    tasks: Vec<Task>,
    refs: Vec<u32>,
    index: FastMap<Task, u32>,
    free: Vec<u32>,
    /// The id interned last (0 if none).
    last: u32,
}

impl Owners {
    pub fn new() -> Owners {
        // Id 0 means "unknown owner".
        Owners {
            tasks: vec![Task::default()],
            refs: vec![0],
            index: FastMap::default(),
            free: Vec::new(),
            last: 0,
        }
    }

    pub fn get(&self, id: u32) -> Option<Task> {
        (id != 0).then(|| self.tasks[id as usize])
    }

    /// Takes a reference to `task`'s id.
    pub fn intern(&mut self, task: Task) -> u32 {
        // One process opening many connections in a row is the common case: skip the hash.
        let last = self.last as usize;
        if self.refs[last] > 0 && self.tasks[last] == task {
            self.refs[last] += 1;
            return self.last;
        }
        if let Some(&id) = self.index.get(&task) {
            self.last = id;
            self.refs[id as usize] += 1;
            return id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.tasks[id as usize] = task;
                self.refs[id as usize] = 1;
                id
            }
            None => {
                self.tasks.push(task);
                self.refs.push(1);
                (self.tasks.len() - 1) as u32
            }
        };
        self.index.insert(task, id);
        self.last = id;
        id
    }

    pub fn release(&mut self, id: u32) {
        if id == 0 {
            return;
        }
        let r = &mut self.refs[id as usize];
        *r -= 1;
        if *r == 0 {
            self.index.remove(&self.tasks[id as usize]);
            self.free.push(id);
        }
    }

    /// Distinct owners currently referenced.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn heap_bytes(&self) -> usize {
        self.tasks.capacity() * std::mem::size_of::<Task>()
            + self.refs.capacity() * 4
            + self.free.capacity() * 4
            + map_heap_bytes(self.index.capacity(), std::mem::size_of::<(Task, u32)>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::lifecycle::Role;
    use crate::event::Comm;

    #[test]
    fn slab_reuses_freed_slots_and_grows_by_chunks() {
        let mut t = Slab::new();
        let a = t.alloc(Conn::fresh(1, 0, TcpState::Established, Role::Unknown));
        let b = t.alloc(Conn::fresh(2, 0, TcpState::Established, Role::Unknown));
        assert_eq!((a, b), (0, 1));
        assert_eq!(t.release(a).conn_id, 1);
        assert!(t.get(a).is_free());
        assert_eq!(
            t.alloc(Conn::fresh(3, 0, TcpState::Established, Role::Unknown)),
            0
        );
        assert_eq!(t.chunks.len(), 1);
        for i in 0..CHUNK as u64 {
            t.alloc(Conn::fresh(10 + i, 0, TcpState::Established, Role::Unknown));
        }
        assert_eq!(t.chunks.len(), 2, "one new chunk, no copying of the first");
    }

    #[test]
    fn clock_gives_referenced_a_second_chance_and_spares_listeners() {
        let mut t = Slab::new();
        for (id, st) in [
            (1, TcpState::Listen),
            (2, TcpState::Established),
            (3, TcpState::Established),
        ] {
            t.alloc(Conn::fresh(id, 0, st, Role::Unknown));
        }
        t.get_mut(1).flags |= F_REFERENCED;
        assert_eq!(
            t.victim(u32::MAX),
            Some(2),
            "slot 0 is a listener, slot 1 was referenced"
        );
        assert_eq!(
            t.victim(2),
            Some(1),
            "bit cleared on the first pass; 2 is protected"
        );
        let mut only = Slab::new();
        only.alloc(Conn::fresh(9, 0, TcpState::Listen, Role::Listener));
        assert_eq!(
            only.victim(u32::MAX),
            Some(0),
            "a listener goes when nothing else can"
        );
        assert_eq!(only.victim(0), None);
    }

    #[test]
    fn owners_are_refcounted_and_forgotten() {
        let mut o = Owners::new();
        let t1 = Task {
            pid: 10,
            tid: 10,
            comm: Comm::new("a"),
        };
        let t2 = Task {
            pid: 11,
            tid: 11,
            comm: Comm::new("b"),
        };
        let a = o.intern(t1);
        assert_eq!(o.intern(t1), a);
        let b = o.intern(t2);
        assert_ne!(a, b);
        assert_eq!(o.get(0), None);
        assert_eq!(o.get(a), Some(t1));
        o.release(a);
        assert_eq!(o.len(), 2);
        o.release(a);
        assert_eq!(o.len(), 1);
        assert_eq!(o.intern(t2), b);
        let c = o.intern(Task { pid: 12, ..t1 });
        assert_eq!(c, a, "freed id reused");
    }

    #[test]
    fn conn_id_hasher_keeps_runs_together_and_spreads_the_runs() {
        let hash = |id: u64| {
            let mut h = ConnIdHasher::default();
            h.write_u64(id);
            h.finish()
        };
        // Eight connections opened in a row on CPU 1: neighbouring first buckets.
        let run: Vec<u64> = (8..16u64).map(|seq| hash(seq << 12 | 1)).collect();
        for (i, h) in run.iter().enumerate() {
            assert_eq!(h & !RUN_MASK, run[0] & !RUN_MASK, "one place for the run");
            assert_eq!(h & RUN_MASK, i as u64, "in opening order");
        }
        // The next run, the same run on another CPU, and sequential ids of another shape
        // (the snapshot's) land elsewhere, and spread evenly.
        assert_ne!(hash(16 << 12 | 1) & !RUN_MASK, run[0] & !RUN_MASK);
        assert_ne!(hash(8 << 12 | 2) & !RUN_MASK, run[0] & !RUN_MASK);
        let mut buckets = [0u32; 64];
        for id in (0..3_200u64)
            .map(|s| s << 12)
            .chain((0..3_200).map(|n| (1 << 63) + n))
        {
            buckets[(hash(id) >> 58) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&n| (50..=150).contains(&n)),
            "{buckets:?}"
        );
        // Every key keeps its own hash: no two ids collide.
        let all: std::collections::HashSet<u64> =
            (0..100_000u64).map(|s| hash(s << 12 | (s % 3))).collect();
        assert_eq!(all.len(), 100_000);
    }

    #[test]
    fn id_hasher_spreads_sequential_ids() {
        let mut buckets = [0u32; 64];
        for id in 0..6_400u64 {
            let mut h = IdHasher::default();
            h.write_u64(id);
            buckets[(h.finish() >> 58) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&n| (50..=150).contains(&n)),
            "{buckets:?}"
        );
    }
}
