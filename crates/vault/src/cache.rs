//! A bounded, TTL'd cache of decrypted records (credentials, sessions,
//! verified session tokens).
//!
//! Sharded so concurrent requests for different users do not contend on one
//! lock. Each shard has an epoch bumped by every write; a reader that loaded
//! from disk before a write cannot put its now-stale copy back. Entries hold
//! `Arc<V>`: a credential's secrets are zeroized when the last user drops it.
//!
//! [`Caches`] holds the store's caches together with what keeps them true:
//! the PostgreSQL listener evicts on other replicas' writes and turns
//! caching off while it cannot hear them.

use sidekey_base::sync::lock;
use std::hash::BuildHasher;

// foldhash, not SipHash: three cache lookups per proxied request hashed
// twice each were 4 % of a request's instructions. Its per-process random
// seed keeps keys (ids and verified tokens, never raw attacker input that
// gets inserted) from being steered into collisions.
use foldhash::fast::RandomState;
// A table that takes the hash from the caller: one hash per lookup picks
// the shard (top bits) and the slot, where a map would hash the key again.
use hashbrown::HashTable;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{CredentialCache, SessionRecord, Tree, UserProfile};

const SHARDS: usize = 32;

/// A key, its value and the instant it expires: a lookup compares one
/// clock reading, with no duration arithmetic.
type Entry<V> = (String, Arc<V>, Instant);

struct Shard<V> {
    epoch: u64,
    map: HashTable<Entry<V>>,
}

pub struct Cache<V> {
    shards: Vec<Mutex<Shard<V>>>,
    hasher: RandomState,
    ttl: Duration,
    per_shard: usize,
}

impl<V> Cache<V> {
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        Cache {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        epoch: 0,
                        map: HashTable::new(),
                    })
                })
                .collect(),
            hasher: RandomState::default(),
            ttl,
            per_shard: max_entries.div_ceil(SHARDS),
        }
    }

    /// The key's hash and its shard, locked. The shard comes from bits 32
    /// and up, which the table inside uses for neither a slot (the low
    /// bits) nor its tag (the top seven).
    fn shard(&self, key: &str) -> (u64, std::sync::MutexGuard<'_, Shard<V>>) {
        let hash = self.hasher.hash_one(key);
        let m = &self.shards[(hash >> 32) as usize % SHARDS];
        (hash, lock(m))
    }

    /// A live entry, or the shard epoch to pass to [`insert`] after loading.
    pub fn get(&self, key: &str) -> Result<Arc<V>, u64> {
        if self.per_shard == 0 || self.ttl.is_zero() {
            return Err(0);
        }
        let (hash, mut s) = self.shard(key);
        match s.map.find_entry(hash, |e| e.0 == key) {
            Ok(e) if Instant::now() < e.get().2 => Ok(e.get().1.clone()),
            Ok(e) => {
                e.remove();
                Err(s.epoch)
            }
            Err(_) => Err(s.epoch),
        }
    }

    /// Caches a value loaded from disk, unless a write happened since `epoch`.
    pub fn insert(&self, key: &str, value: Arc<V>, epoch: u64) {
        if self.per_shard == 0 || self.ttl.is_zero() {
            return;
        }
        let (hash, mut s) = self.shard(key);
        if s.epoch != epoch {
            return;
        }
        // A TTL past what an Instant can hold is "until evicted".
        let now = Instant::now();
        let expires = now
            .checked_add(self.ttl)
            .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
            .unwrap_or(now);
        if let Some(e) = s.map.find_mut(hash, |e| e.0 == key) {
            e.1 = value;
            e.2 = expires;
            return;
        }
        if s.map.len() >= self.per_shard {
            // Drop expired entries first; if none, drop an arbitrary one.
            s.map.retain(|e| now < e.2);
            if s.map.len() >= self.per_shard {
                // The first entry the table visits goes.
                let mut kept_one = false;
                s.map.retain(|_| std::mem::replace(&mut kept_one, true));
            }
        }
        let hasher = &self.hasher;
        s.map
            .insert_unique(hash, (key.to_owned(), value, expires), |e| {
                hasher.hash_one(&e.0)
            });
    }

    /// Called by every write: removes the entry and fences off in-flight loads.
    pub fn invalidate(&self, key: &str) {
        let (hash, mut s) = self.shard(key);
        s.epoch += 1;
        if let Ok(e) = s.map.find_entry(hash, |e| e.0 == key) {
            e.remove();
        }
    }

    pub fn clear(&self) {
        for m in &self.shards {
            let mut s = lock(m);
            s.epoch += 1;
            s.map.clear();
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|m| lock(m).map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The memory caches, shared with the backend that keeps them true: the
/// PostgreSQL listener evicts on other replicas' writes and turns caching
/// off while it cannot hear them.
pub struct Caches {
    pub credentials: CredentialCache,
    /// Session records by id: every proxied call reads one. Invalidated by
    /// every session write, so revocation is still immediate.
    pub sessions: Cache<SessionRecord>,
    /// User profiles, for JWT bearer subjects read on every call of such a
    /// provider. Invalidated by every profile write.
    pub users: Cache<UserProfile>,
    /// Whether the caches may answer: always on sled; on PostgreSQL only
    /// while the change listener is connected and its heartbeat on time.
    /// One atomic load on every cached read.
    live: AtomicBool,
    /// Woken by every change another replica announces (refresh waiters).
    pub changed: tokio::sync::Notify,
}

impl Caches {
    /// Each cache holds at most `max_entries` for at most `ttl`.
    pub(crate) fn new(ttl: Duration, max_entries: usize, live: bool) -> Caches {
        Caches {
            credentials: CredentialCache::new(ttl, max_entries),
            sessions: Cache::new(ttl, max_entries),
            users: Cache::new(ttl, max_entries),
            live: AtomicBool::new(live),
            changed: tokio::sync::Notify::new(),
        }
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    pub fn set_live(&self, v: bool) {
        self.live.store(v, Ordering::Release);
    }

    pub fn clear_all(&self) {
        self.credentials.clear();
        self.sessions.clear();
        self.users.clear();
        self.changed.notify_waiters();
    }

    /// A change notification: `<ns>:<hex key>` or `claim:<key>`.
    pub fn on_change(&self, payload: &str) {
        if let Some((ns, hex)) = payload.split_once(':') {
            let key = decode_hex(hex).map(|k| String::from_utf8_lossy(&k).into_owned());
            match (ns.parse().ok().and_then(Tree::from_ns), key) {
                (Some(Tree::Credentials), Some(k)) => self.credentials.invalidate(&k),
                (Some(Tree::Sessions), Some(k)) => self.sessions.invalidate(&k),
                (Some(Tree::Users), Some(k)) => self.users.invalidate(&k),
                _ => {}
            }
        }
        self.changed.notify_waiters();
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Credential;

    type CredentialCache = Cache<Credential>;

    fn cred(g: u64) -> Arc<Credential> {
        Arc::new(Credential {
            generation: g,
            ..Default::default()
        })
    }

    #[test]
    fn write_fences_stale_loads() {
        let c = CredentialCache::new(Duration::from_secs(60), 100);
        let epoch = c.get("k").unwrap_err();
        c.invalidate("k"); // a write lands while the reader was on disk
        c.insert("k", cred(1), epoch);
        assert!(c.get("k").is_err(), "stale value must not be cached");
        let epoch = c.get("k").unwrap_err();
        c.insert("k", cred(2), epoch);
        assert_eq!(c.get("k").unwrap().generation, 2);
    }

    #[test]
    fn bounded() {
        let c = CredentialCache::new(Duration::from_secs(60), 64);
        for i in 0..1000 {
            let k = format!("k{i}");
            let e = c.get(&k).unwrap_err();
            c.insert(&k, cred(i), e);
        }
        assert!(c.len() <= 64 + SHARDS, "{}", c.len());
    }

    #[test]
    fn ttl_expires() {
        let c = CredentialCache::new(Duration::from_millis(1), 10);
        let e = c.get("k").unwrap_err();
        c.insert("k", cred(1), e);
        std::thread::sleep(Duration::from_millis(5));
        assert!(c.get("k").is_err());
    }
}
