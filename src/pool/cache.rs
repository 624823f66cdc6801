//! A small LRU keyed by SQL text: a connection's prepared statements, or
//! (in unnamed-statement mode) parameter types.
//!
//! It is looked up on every statement, so a hit is made cheap twice over:
//! a multiplicative hash instead of SipHash, and in front of the map a
//! handful of recent hits keyed by the text's address. Applications mostly
//! pass the same `&'static str` literal for the same statement, so the
//! address finds the entry without hashing; the text is still compared in
//! full (another string may sit at the same address), so an address never
//! decides alone.
//!
//! Why not `hashlink::LruCache` (sqlx's choice): measured with callgrind
//! against this file, it costs more per lookup, and a lookup runs on every
//! statement. Instructions per cache hit (a release unit test looking up
//! `&'static str` texts, one text over and over / three in turn; the
//! figures include the loop and the clone of the cached `Arc`):
//!
//! | cache | 1 text | 3 texts |
//! | --- | --- | --- |
//! | this file | 90 | 98 |
//! | `LruCache` alone | 177 | 194 |
//! | `LruCache` behind this address fast path (a hit still moves the entry to the back, a hash probe) | 127 | 135 |
//! | the same, skipping the move when the entry is already the most recent | 92 | 143 |
//!
//! Per autocommit point select (`scripts/bench-client-cost`, W1, 6 000 −
//! 1 000 selects), 13,814 instructions with this file against 13,937,
//! 13,870 and 13,838 with the three `LruCache` variants. Here a hit only
//! stores a tick; the LRU order is found by a scan over at most `capacity`
//! entries when a miss must evict, and a miss pays a prepare round trip
//! anyway.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Recent hits remembered by address (a power of two).
const RECENT: usize = 8;

pub(crate) struct Lru<V> {
    capacity: usize,
    tick: u64,
    map: HashMap<Arc<str>, Arc<Entry<V>>, BuildHasherDefault<SqlHasher>>,
    /// Entries of `map` by the address of the text they were last found
    /// with; cleared with the entry, so nothing outlives the map.
    recent: [Option<(usize, Arc<Entry<V>>)>; RECENT],
}

struct Entry<V> {
    sql: Arc<str>,
    value: V,
    /// Tick of the last use (atomic only so that an entry can be shared
    /// between `map` and `recent`; the whole cache sits behind a mutex).
    used: AtomicU64,
}

impl<V: Clone> Lru<V> {
    /// An empty cache of at most `capacity` entries (`0` keeps nothing).
    pub(crate) fn new(capacity: usize) -> Self {
        Lru {
            capacity,
            tick: 0,
            map: HashMap::with_capacity_and_hasher(capacity.min(64), Default::default()),
            recent: Default::default(),
        }
    }

    /// The value cached for `sql`, marking it used.
    pub(crate) fn get(&mut self, sql: &str) -> Option<V> {
        self.tick += 1;
        let addr = sql.as_ptr() as usize;
        let slot = recent_slot(addr);
        if let Some((at, entry)) = &self.recent[slot] {
            if *at == addr && *entry.sql == *sql {
                entry.used.store(self.tick, Ordering::Relaxed);
                return Some(entry.value.clone());
            }
        }
        let entry = self.map.get(sql)?.clone();
        entry.used.store(self.tick, Ordering::Relaxed);
        let value = entry.value.clone();
        self.recent[slot] = Some((addr, entry));
        Some(value)
    }

    /// Whether `sql` is cached (without marking it used).
    pub(crate) fn contains(&self, sql: &str) -> bool {
        self.map.contains_key(sql)
    }

    /// Caches `value` for `sql`, evicting the least recently used entry
    /// when full.
    pub(crate) fn insert(&mut self, sql: &str, value: V) {
        if self.capacity == 0 {
            return;
        }
        if self.map.len() >= self.capacity && !self.map.contains_key(sql) {
            let oldest = self
                .map
                .values()
                .min_by_key(|e| e.used.load(Ordering::Relaxed))
                .map(|e| e.sql.clone());
            if let Some(sql) = oldest {
                self.remove(&sql);
            }
        }
        self.tick += 1;
        let sql: Arc<str> = sql.into();
        let entry = Entry {
            sql: sql.clone(),
            value,
            used: AtomicU64::new(self.tick),
        };
        if let Some(old) = self.map.insert(sql, Arc::new(entry)) {
            self.forget_recent(&old);
        }
    }

    /// Drops the entry for `sql`, if any.
    pub(crate) fn remove(&mut self, sql: &str) {
        if let Some(old) = self.map.remove(sql) {
            self.forget_recent(&old);
        }
    }

    fn forget_recent(&mut self, entry: &Arc<Entry<V>>) {
        for slot in &mut self.recent {
            if slot.as_ref().is_some_and(|(_, e)| Arc::ptr_eq(e, entry)) {
                *slot = None;
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

/// The `recent` slot for a text at `addr` (Fibonacci hashing: the top bits
/// of a multiplication spread nearby addresses).
fn recent_slot(addr: usize) -> usize {
    ((addr as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 61) as usize & (RECENT - 1)
}

/// A fast multiplicative hash for SQL texts (the keys are the application's
/// own statements, so SipHash's flood resistance buys nothing here and costs
/// most of a cache hit).
#[derive(Default)]
struct SqlHasher(u64);

fn mix(h: u64, word: u64) -> u64 {
    (h.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95)
}

impl Hasher for SqlHasher {
    fn write(&mut self, bytes: &[u8]) {
        let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        let mut h = self.0 ^ bytes.len() as u64;
        if bytes.len() >= 8 {
            let mut chunks = bytes.chunks_exact(8);
            for chunk in &mut chunks {
                h = mix(h, word(chunk));
            }
            if !chunks.remainder().is_empty() {
                // The last 8 bytes, overlapping the last whole chunk.
                h = mix(h, word(&bytes[bytes.len() - 8..]));
            }
        } else {
            let mut last = [0u8; 8];
            last[..bytes.len()].copy_from_slice(bytes);
            h = mix(h, u64::from_le_bytes(last));
        }
        self.0 = h;
    }
    fn write_u8(&mut self, b: u8) {
        // `str`'s Hash adds a 0xff terminator: the length is already mixed in.
        self.0 ^= u64::from(b);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_address_new_text_is_a_different_statement() {
        let mut lru = Lru::new(4);
        let mut sql = String::from("SELECT 1");
        lru.insert(&sql, 1);
        assert_eq!(lru.get(&sql), Some(1)); // now remembered by address
        // Same buffer, same length, other text: must not find `SELECT 1`.
        sql.replace_range(.., "SELECT 2");
        assert_eq!(lru.get(&sql), None);
        lru.insert(&sql, 2);
        assert_eq!(lru.get(&sql), Some(2));
        assert_eq!(lru.get("SELECT 1"), Some(1));
    }

    #[test]
    fn evicts_the_least_recently_used_even_when_hits_came_by_address() {
        let mut lru = Lru::new(2);
        let (a, b, c) = ("SELECT a", "SELECT b", "SELECT c");
        lru.insert(a, 'a');
        lru.insert(b, 'b');
        // `a` is hit (by address after the first time); `b` is not.
        for _ in 0..3 {
            assert_eq!(lru.get(a), Some('a'));
        }
        lru.insert(c, 'c');
        assert_eq!(lru.len(), 2);
        assert_eq!(lru.get(b), None, "b was the least recently used");
        assert_eq!(lru.get(a), Some('a'));
        assert_eq!(lru.get(c), Some('c'));
    }

    #[test]
    fn removed_entries_are_not_found_by_address() {
        let mut lru = Lru::new(4);
        let a = "SELECT a";
        lru.insert(a, 1);
        assert_eq!(lru.get(a), Some(1));
        lru.remove(a);
        assert_eq!(lru.get(a), None);
        lru.insert(a, 2); // replaced: the new value, never the old one
        assert_eq!(lru.get(a), Some(2));
        lru.insert(a, 3);
        assert_eq!(lru.get(a), Some(3));
    }

    #[test]
    fn zero_capacity_keeps_nothing_and_many_texts_stay_bounded() {
        let mut zero = Lru::new(0);
        zero.insert("SELECT 1", 1);
        assert_eq!(zero.get("SELECT 1"), None);
        let mut lru = Lru::new(16);
        let texts: Vec<String> = (0..500).map(|i| format!("SELECT {i}")).collect();
        for (i, t) in texts.iter().enumerate() {
            lru.insert(t, i);
            assert_eq!(lru.get(t), Some(i));
        }
        assert_eq!(lru.len(), 16);
        let kept: Vec<_> = texts.iter().filter_map(|t| lru.get(t)).collect();
        assert_eq!(kept, (484..500).collect::<Vec<_>>());
    }
}
