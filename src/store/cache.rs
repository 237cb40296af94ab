//! A bounded, TTL'd cache of decrypted records (credentials, sessions,
//! verified session tokens).
//!
//! Sharded so concurrent requests for different users do not contend on one
//! lock. Each shard has an epoch bumped by every write; a reader that loaded
//! from disk before a write cannot put its now-stale copy back. Entries hold
//! `Arc<V>`: a credential's secrets are zeroized when the last user drops it.

use std::collections::HashMap;
use std::hash::BuildHasher;

// foldhash, not SipHash: three cache lookups per proxied request hashed
// twice each were 4 % of a request's instructions. Its per-process random
// seed keeps keys (ids and verified tokens, never raw attacker input that
// gets inserted) from being steered into collisions.
use foldhash::fast::RandomState;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SHARDS: usize = 32;

struct Shard<V> {
    epoch: u64,
    /// Each value with the instant it expires: a lookup compares one clock
    /// reading, with no duration arithmetic.
    map: HashMap<String, (Arc<V>, Instant), RandomState>,
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
                        map: HashMap::default(),
                    })
                })
                .collect(),
            hasher: RandomState::default(),
            ttl,
            per_shard: max_entries.div_ceil(SHARDS),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<Shard<V>> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    fn lock<'a>(&self, m: &'a Mutex<Shard<V>>) -> std::sync::MutexGuard<'a, Shard<V>> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A live entry, or the shard epoch to pass to [`insert`] after loading.
    pub fn get(&self, key: &str) -> Result<Arc<V>, u64> {
        if self.per_shard == 0 || self.ttl.is_zero() {
            return Err(0);
        }
        let mut s = self.lock(self.shard(key));
        match s.map.get(key) {
            Some((c, expires)) if Instant::now() < *expires => Ok(c.clone()),
            Some(_) => {
                s.map.remove(key);
                Err(s.epoch)
            }
            None => Err(s.epoch),
        }
    }

    /// Caches a value loaded from disk, unless a write happened since `epoch`.
    pub fn insert(&self, key: &str, value: Arc<V>, epoch: u64) {
        if self.per_shard == 0 || self.ttl.is_zero() {
            return;
        }
        let mut s = self.lock(self.shard(key));
        if s.epoch != epoch {
            return;
        }
        if s.map.len() >= self.per_shard && !s.map.contains_key(key) {
            // Drop expired entries first; if none, drop an arbitrary one.
            let now = Instant::now();
            s.map.retain(|_, (_, expires)| now < *expires);
            if s.map.len() >= self.per_shard {
                if let Some(k) = s.map.keys().next().cloned() {
                    s.map.remove(&k);
                }
            }
        }
        // A TTL past what an Instant can hold is "until evicted".
        let now = Instant::now();
        let expires = now
            .checked_add(self.ttl)
            .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
            .unwrap_or(now);
        s.map.insert(key.to_owned(), (value, expires));
    }

    /// Called by every write: removes the entry and fences off in-flight loads.
    pub fn invalidate(&self, key: &str) {
        let mut s = self.lock(self.shard(key));
        s.epoch += 1;
        s.map.remove(key);
    }

    pub fn clear(&self) {
        for m in &self.shards {
            let mut s = self.lock(m);
            s.epoch += 1;
            s.map.clear();
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|m| self.lock(m).map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Credential;

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
