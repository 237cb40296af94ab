//! The embedded backend: one sled tree per [`Tree`], values already sealed
//! by the store front. One process owns the directory (sled's lock), so the
//! refresh claims and back-off live in memory here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::backend::{Backend, Claim, ClaimOutcome, Claims, Fenced};
use crate::{Op, OpenError, StoreError, Tree};

/// Re-seals the kept part of an audit batch: `(key, sealed, excess)` →
/// the new `(key, sealed)`, or `None` when nothing is kept.
pub type TrimPartial<'a> = dyn Fn(&[u8], &[u8], usize) -> Option<(Vec<u8>, Vec<u8>)> + Sync + 'a;

/// How long a held store lock is retried before it is reported.
const LOCK_WAIT: Duration = Duration::from_secs(1);

fn is_lock_error(e: &sled::Error) -> bool {
    let msg = e.to_string();
    msg.contains("lock") || msg.contains("WouldBlock") || msg.contains("temporarily unavailable")
}

pub struct SledBackend {
    db: sled::Db,
    path: PathBuf,
    trees: Vec<sled::Tree>,
    /// Refresh claims and shared back-off, by claim key.
    claims: Mutex<HashMap<String, ClaimState>>,
    /// Records in the audit tree: counted once (from the batch keys), then
    /// tracked on every append (sled's `len` is a full scan).
    audit_len: Mutex<Option<usize>>,
}

#[derive(Clone, Copy, Default)]
struct ClaimState {
    fence: i64,
    lease_until: Option<Instant>,
    failures: u32,
    /// Unix milliseconds on sidekey's clock.
    backoff_until_ms: Option<i64>,
}

impl std::fmt::Debug for SledBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledBackend")
            .field("path", &self.path)
            .finish()
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

impl SledBackend {
    pub fn open(path: &Path, flush_every_ms: u64) -> Result<SledBackend, OpenError> {
        let config = sled::Config::new()
            .path(path)
            .flush_every_ms(Some(flush_every_ms))
            // sled's page cache defaults to 1 GiB and fills with audit pages
            // under load (peak RSS 191 MiB in a 60 s soak before this cap).
            // Credentials and sessions have their own caches.
            .cache_capacity(16 * 1024 * 1024);
        // A store closed by this process keeps sled's file lock until sled's
        // I/O threads finish their last write, a few milliseconds after the
        // handle is dropped (sled's own tests block on the lock for this
        // reason). So a held lock is retried briefly before it is reported:
        // a reopen after close succeeds, and another process still fails.
        let deadline = Instant::now() + LOCK_WAIT;
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(e) if is_lock_error(&e) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) if is_lock_error(&e) => {
                    return Err(OpenError::Locked(format!(
                        "store at {} is in use by another sidekey process",
                        path.display()
                    )));
                }
                Err(e) => {
                    return Err(OpenError::Other(format!(
                        "cannot open store at {}: {e}",
                        path.display()
                    )));
                }
            }
        };
        let mut trees = Vec::new();
        for t in Tree::ALL {
            trees.push(db.open_tree(t.name()).map_err(|e| {
                OpenError::Other(format!("cannot open store tree {}: {e}", t.name()))
            })?);
        }
        Ok(SledBackend {
            db,
            path: path.to_path_buf(),
            trees,
            claims: Mutex::new(HashMap::new()),
            audit_len: Mutex::new(None),
        })
    }

    fn t(&self, t: Tree) -> &sled::Tree {
        &self.trees[t as usize]
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Appends sealed audit batches (`(key, sealed, records)`) and trims the
    /// oldest whole batches beyond `max_records`; `trim_partial` re-seals
    /// the kept part of a batch that straddles the limit.
    pub async fn append_audit_and_trim(
        &self,
        batches: Vec<(Vec<u8>, Vec<u8>, usize)>,
        max_records: usize,
        trim_partial: &TrimPartial<'_>,
    ) -> Result<(), StoreError> {
        let tree = self.t(Tree::Audit);
        let mut count = sidekey_base::sync::lock(&self.audit_len);
        let mut len = match *count {
            Some(n) => n,
            None => {
                let mut n = 0;
                for k in tree.iter().keys() {
                    n += crate::tree::audit_key_count(&k?);
                }
                n
            }
        };
        // Kept current on every exit, errors included.
        let result = (|| {
            for (k, v, n) in batches {
                tree.insert(k, v)?;
                len += n;
            }
            while len > max_records {
                let Some((k, v)) = tree.first()? else {
                    len = 0;
                    break;
                };
                let n = crate::tree::audit_key_count(&k);
                let excess = len - max_records;
                if n <= excess {
                    tree.remove(&k)?;
                    len -= n;
                } else {
                    // Keep the newest part of the oldest batch, under a key
                    // that counts what is left.
                    tree.remove(&k)?;
                    len -= n;
                    if let Some((nk, nv)) = trim_partial(&k, &v, excess) {
                        len += crate::tree::audit_key_count(&nk);
                        tree.insert(nk, nv)?;
                    }
                }
            }
            Ok::<(), StoreError>(())
        })();
        *count = Some(len);
        result
    }

    /// A consistent, still-encrypted copy in a new directory (`keycheck`
    /// is copied by the caller).
    pub fn backup_to(&self, out: &Path) -> Result<usize, String> {
        let copy = sled::Config::new()
            .path(out)
            .open()
            .map_err(|e| format!("cannot create backup store at {}: {e}", out.display()))?;
        let mut n = 0;
        for name in self.db.tree_names() {
            let src = self.db.open_tree(&name).map_err(|e| e.to_string())?;
            let dst = copy.open_tree(&name).map_err(|e| e.to_string())?;
            // A batch per tree: the copy of each tree is applied atomically.
            let mut batch = sled::Batch::default();
            for item in src.iter() {
                let (k, v) = item.map_err(|e| e.to_string())?;
                batch.insert(k, v);
                n += 1;
            }
            dst.apply_batch(batch).map_err(|e| e.to_string())?;
        }
        copy.flush()
            .map_err(|e| format!("cannot flush backup: {e}"))?;
        Ok(n)
    }
}

impl Backend for SledBackend {
    async fn get(&self, t: Tree, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.t(t).get(k)?.map(|v| v.to_vec()))
    }

    async fn put(&self, t: Tree, k: &[u8], v: &[u8]) -> Result<(), StoreError> {
        self.t(t).insert(k, v)?;
        Ok(())
    }

    async fn remove(&self, t: Tree, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.t(t).remove(k)?.map(|v| v.to_vec()))
    }

    async fn cas(
        &self,
        t: Tree,
        k: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        Ok(self.t(t).compare_and_swap(k, old, new)?.is_ok())
    }

    async fn batch(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        for op in ops {
            match op {
                Op::Put(t, k, v) => {
                    self.t(t).insert(k, v)?;
                }
                Op::Insert(t, k, v) => {
                    let _ = self.t(t).compare_and_swap(k, None::<&[u8]>, Some(v))?;
                }
                Op::Remove(t, k) => {
                    self.t(t).remove(k)?;
                }
            }
        }
        Ok(())
    }

    async fn scan_prefix(
        &self,
        t: Tree,
        prefix: &[u8],
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.t(t).scan_prefix(prefix) {
            let (k, v) = item?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Keys after `after` (exclusive) in order, at most `limit`: paging.
    async fn page(
        &self,
        t: Tree,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let iter = match after {
            Some(a) => self
                .t(t)
                .range::<&[u8], _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => self.t(t).iter(),
        };
        let mut out = Vec::new();
        for item in iter.take(limit) {
            let (k, v) = item?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Keys before `before` (exclusive) from the newest down, at most `limit`.
    async fn page_rev(
        &self,
        t: Tree,
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let iter = match before {
            Some(b) => self.t(t).range::<&[u8], _>(..b),
            None => self.t(t).iter(),
        };
        let mut out = Vec::new();
        for item in iter.rev().take(limit) {
            let (k, v) = item?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Keys lower than `end`, for expiry indexes.
    async fn keys_before(
        &self,
        t: Tree,
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        for k in self.t(t).range(..end).keys().take(limit) {
            out.push(k?.to_vec());
        }
        Ok(out)
    }

    async fn count(&self, t: Tree) -> Result<usize, StoreError> {
        Ok(self.t(t).len())
    }

    /// `n` fresh ids, ascending.
    async fn next_ids(&self, n: usize) -> Result<Vec<u64>, StoreError> {
        (0..n).map(|_| Ok(self.db.generate_id()?)).collect()
    }

    /// Makes every write so far durable.
    async fn flush(&self) -> Result<(), StoreError> {
        // Not sled's `flush_async`: in sled 0.34 concurrent calls park every
        // sled I/O thread waiting for a log write that needs one of those
        // same threads, and the whole store hangs (spacejam/sled#1308; ~8
        // concurrent admin writes were enough here). A blocking flush on
        // tokio's blocking pool waits without holding a sled I/O thread.
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|_| StoreError::Io("store flush task failed".into()))??;
        Ok(())
    }

    async fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk().unwrap_or(0))
    }
}

impl Claims for SledBackend {
    async fn claim(
        &self,
        key: &str,
        lease: Duration,
        now_ms: i64,
    ) -> Result<ClaimOutcome, StoreError> {
        let mut m = sidekey_base::sync::lock(&self.claims);
        let now = Instant::now();
        let s = m.entry(key.to_owned()).or_default();
        if let Some(b) = s.backoff_until_ms.filter(|b| *b > now_ms) {
            return Ok(ClaimOutcome::BackingOff(Duration::from_millis(
                (b - now_ms) as u64,
            )));
        }
        if s.lease_until.is_some_and(|l| l > now) {
            return Ok(ClaimOutcome::Held);
        }
        s.fence += 1;
        s.lease_until = Some(now + lease);
        Ok(ClaimOutcome::Granted(Claim {
            key: key.to_owned(),
            fence: s.fence,
        }))
    }

    async fn release(
        &self,
        claim: &Claim,
        failed: Option<bool>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut m = sidekey_base::sync::lock(&self.claims);
        let Some(s) = m.get_mut(&claim.key) else {
            return Ok(());
        };
        if s.fence != claim.fence {
            return Ok(());
        }
        s.lease_until = None;
        match failed {
            Some(true) => {
                s.failures = s.failures.saturating_add(1);
                s.backoff_until_ms = Some(
                    now_ms.saturating_add(crate::backoff_delay(s.failures).as_millis() as i64),
                );
            }
            Some(false) => {
                m.remove(&claim.key);
            }
            None => {}
        }
        Ok(())
    }

    /// Extends a claim's lease, if it is still ours.
    async fn renew(&self, claim: &Claim, lease: Duration) -> Result<bool, StoreError> {
        let mut m = sidekey_base::sync::lock(&self.claims);
        Ok(match m.get_mut(&claim.key) {
            Some(s) if s.fence == claim.fence => {
                s.lease_until = Some(Instant::now() + lease);
                true
            }
            _ => false,
        })
    }

    /// Renews the claim if it is still ours and `(t, k)` still holds
    /// `expected` (`None`: is absent).
    async fn confirm(
        &self,
        claim: &Claim,
        lease: Duration,
        t: Tree,
        k: &[u8],
        expected: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        let mut m = sidekey_base::sync::lock(&self.claims);
        let Some(s) = m.get_mut(&claim.key).filter(|s| s.fence == claim.fence) else {
            return Ok(false);
        };
        if self.t(t).get(k)?.as_deref() != expected {
            return Ok(false);
        }
        s.lease_until = Some(Instant::now() + lease);
        Ok(true)
    }

    /// Compare-and-swap that lands only while `claim`'s fence is current
    /// (checked and written under the claims lock, which every takeover
    /// takes too).
    async fn cas_fenced(
        &self,
        claim: &Claim,
        t: Tree,
        k: &[u8],
        old: Option<&[u8]>,
        new: &[u8],
    ) -> Result<Fenced, StoreError> {
        let m = sidekey_base::sync::lock(&self.claims);
        if m.get(&claim.key).is_none_or(|s| s.fence != claim.fence) {
            return Ok(Fenced::Lost);
        }
        Ok(match self.t(t).compare_and_swap(k, old, Some(new))? {
            Ok(()) => Fenced::Written,
            Err(_) => Fenced::Moved,
        })
    }

    /// Forgets a claim key's back-off (the credential was replaced).
    async fn clear_backoff(&self, key: &str) -> Result<(), StoreError> {
        let mut m = sidekey_base::sync::lock(&self.claims);
        if let Some(s) = m.get_mut(key) {
            s.failures = 0;
            s.backoff_until_ms = None;
        }
        Ok(())
    }
}
