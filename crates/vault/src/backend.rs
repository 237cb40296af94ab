//! The contract between the store front and whatever holds the bytes.
//!
//! A backend stores sealed values under `(tree, key)` and offers a few
//! atomic operations; it knows nothing of records, sealing or caches (the
//! front does all of that, the same on every backend). [`Backend`] is that
//! contract for records, [`Claims`] for refresh and GC claims; every backend
//! implements both. The store front holds the one it was opened with as an
//! `AnyBackend` (in the crate root), which implements the contract by
//! matching once per call: every call is dispatched statically, with no
//! boxing.
//!
//! Operations only one backend has (sled's backup and synchronous flush,
//! PostgreSQL's readiness ping, replica count and audit trimming in SQL)
//! are not part of the contract: the front reaches them by matching on
//! `AnyBackend` where it needs them.

use std::time::Duration;

use crate::{Op, StoreError, Tree};

/// Rows of a tree as `(key, sealed value)`, in key order.
pub(crate) type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// Record storage. Keys order bytewise within a tree. Unless an operation
/// says otherwise, a write is visible to every later read of this store
/// (on PostgreSQL, of every replica) once it returns; it is durable once it
/// returns on PostgreSQL, and after the next [`Backend::flush`] on sled.
pub(crate) trait Backend {
    /// The value under `(t, k)`, if any.
    async fn get(&self, t: Tree, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Writes `v` under `(t, k)`, replacing what was there.
    async fn put(&self, t: Tree, k: &[u8], v: &[u8]) -> Result<(), StoreError>;

    /// Removes `(t, k)` and returns what it held. Atomic: of several
    /// concurrent removals (on any replicas) exactly one gets the value,
    /// which is what makes single-use records single-use.
    async fn remove(&self, t: Tree, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Compare-and-swap on the sealed bytes, atomically: writes `new`
    /// (`None`: removes) only if `(t, k)` holds exactly `old` (`None`: is
    /// absent), and says whether it did. Every seal has a fresh nonce, so
    /// equal bytes mean the record was not rewritten meanwhile.
    async fn cas(
        &self,
        t: Tree,
        k: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError>;

    /// Applies the writes in order. On PostgreSQL in one transaction (all
    /// or none, committed before it returns); on sled one by one, each
    /// atomic, so a crash between two can leave the first alone: callers
    /// order their writes so that a partial batch is harmless.
    async fn batch(&self, ops: Vec<Op>) -> Result<(), StoreError>;

    /// Every row whose key starts with `prefix`.
    async fn scan_prefix(&self, t: Tree, prefix: &[u8]) -> Result<Rows, StoreError>;

    /// At most `limit` rows with keys after `after` (exclusive; `None`:
    /// from the first), ascending: paging through a tree.
    async fn page(&self, t: Tree, after: Option<&[u8]>, limit: usize) -> Result<Rows, StoreError>;

    /// At most `limit` rows with keys before `before` (exclusive; `None`:
    /// from the last), descending: the newest audit batches first.
    async fn page_rev(
        &self,
        t: Tree,
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Rows, StoreError>;

    /// At most `limit` keys lower than `end`, ascending (expiry indexes).
    async fn keys_before(
        &self,
        t: Tree,
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError>;

    /// Rows in a tree.
    async fn count(&self, t: Tree) -> Result<usize, StoreError>;

    /// `n` fresh ids, ascending, each above every id handed out before by
    /// this store (audit batch keys).
    async fn next_ids(&self, n: usize) -> Result<Vec<u64>, StoreError>;

    /// Makes every write that returned so far durable before it returns.
    async fn flush(&self) -> Result<(), StoreError>;

    /// Bytes the stored records take on disk.
    async fn size_on_disk(&self) -> Result<u64, StoreError>;
}

/// Refresh (and GC) claims: at most one holder of a claim key at a time,
/// store-wide (on PostgreSQL across replicas), until it releases or its
/// lease lapses on the backend's clock. Each grant gets a higher fence, so
/// a holder whose lease lapsed can be told from its successor.
pub(crate) trait Claims {
    /// Grants the claim unless another holder's lease is running
    /// ([`ClaimOutcome::Held`]) or a shared back-off is
    /// ([`ClaimOutcome::BackingOff`], on `now_ms`, sidekey's clock).
    async fn claim(
        &self,
        key: &str,
        lease: Duration,
        now_ms: i64,
    ) -> Result<ClaimOutcome, StoreError>;

    /// Ends the claim if it is still this holder's (by fence), once:
    /// `failed` `Some(true)` starts or extends the shared back-off
    /// ([`backoff_delay`]), `Some(false)` clears it, `None` leaves it.
    async fn release(
        &self,
        claim: &Claim,
        failed: Option<bool>,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// Extends the lease to `lease` from now if the claim is still this
    /// holder's; `false` otherwise.
    async fn renew(&self, claim: &Claim, lease: Duration) -> Result<bool, StoreError>;

    /// Atomically: the claim is still this holder's and `(t, k)` holds
    /// exactly `expected` (`None`: is absent); if both, the lease is
    /// renewed to `lease` from now. Returns whether it was.
    async fn confirm(
        &self,
        claim: &Claim,
        lease: Duration,
        t: Tree,
        k: &[u8],
        expected: Option<&[u8]>,
    ) -> Result<bool, StoreError>;

    /// [`Backend::cas`] to `new` that lands only while `claim`'s fence is
    /// current, atomically with that check: a takeover either sees this
    /// write or makes it fail with [`Fenced::Lost`]. [`Fenced::Moved`]:
    /// the claim holds but `(t, k)` does not hold `old`.
    async fn cas_fenced(
        &self,
        claim: &Claim,
        t: Tree,
        k: &[u8],
        old: Option<&[u8]>,
        new: &[u8],
    ) -> Result<Fenced, StoreError>;

    /// Forgets a claim key's back-off (the credential was replaced).
    async fn clear_backoff(&self, key: &str) -> Result<(), StoreError>;
}

/// A held refresh (or GC) claim; `fence` orders holders, so a holder whose
/// lease lapsed cannot release its successor's claim.
#[derive(Clone, Debug)]
pub struct Claim {
    pub key: String,
    pub fence: i64,
}

/// What a write made under a claim did (see [`Store::commit_refresh`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fenced {
    Written,
    /// The record is not the one the holder read: someone wrote it since.
    Moved,
    /// The claim is someone else's now (this holder's lease lapsed and was
    /// taken over): nothing was written.
    Lost,
}

#[derive(Debug)]
pub enum ClaimOutcome {
    Granted(Claim),
    /// Another holder's lease is running.
    Held,
    /// A shared back-off after provider failures runs this much longer.
    BackingOff(Duration),
}

/// 1 s, 2 s, 4 s … 60 s after the n-th consecutive failure.
pub fn backoff_delay(failures: u32) -> Duration {
    Duration::from_millis((1000u64 << failures.saturating_sub(1).min(6)).min(60_000))
}
