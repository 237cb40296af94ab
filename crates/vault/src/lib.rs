//! The encrypted store: credentials, sessions, users, OAuth states and the
//! audit log, every value sealed under the master key, behind one API that
//! the rest of sidekey uses whichever backend holds the bytes.
//!
//! This front does everything both backends share: sealing (the record key
//! as associated data), record formats, indexes, the memory caches, and the
//! rules (generation bumps, single-use states, first-bind-wins). A backend
//! only stores sealed bytes under `(tree, key)` and offers a few atomic
//! operations, the contract of the `Backend` and `Claims` traits
//! (module `backend`):
//! - [`sled_backend`]: embedded, one process, nothing to run (the default);
//! - [`postgres`]: several processes on one database, with cache eviction
//!   by LISTEN/NOTIFY (a heartbeat tells when it may be stalled) and
//!   refresh claims leased on the database clock, with fenced writes.
//!
//! Keys are plain (user ids, provider names, session ids, conversation ids);
//! values are ciphertext. Phone numbers are indexed by a keyed hash so a
//! stolen disk or dump does not list who calls from where.
//!
//! The modules, each with one job:
//! - `records`: the records as the rest of sidekey sees them;
//! - `error`: the store's errors;
//! - `tree`: the trees a backend stores, batch writes, key layouts;
//! - `backend`: the backend contract (`Backend`, `Claims` and their types);
//!   the backend a store runs on, `AnyBackend`, is beside `Store` here;
//! - `open`: opening a store, the key check, the index key;
//! - `sealing`: sealing and opening records, keyed index hashes;
//! - `cache`: the memory caches and their eviction;
//! - `credentials`, `sessions`, `users`, `oauth`, `connect` (connect-page
//!   tickets and pending credentials), `listings` (MCP tool listings),
//!   `audit`, `claims` (refresh claims): the store's operations on each;
//! - `gc`: removing expired records;
//! - `maintenance`: re-sealing, backup, migration between stores;
//! - [`crypto`]: the master keys and the seal itself; [`jwt`]: signing keys.

mod audit;
mod backend;
mod cache;
mod claims;
mod connect;
mod credentials;
pub mod crypto;
mod error;
mod gc;
pub mod jwt;
mod listings;
mod maintenance;
mod oauth;
mod open;
pub mod postgres;
mod records;
mod sealing;
mod sessions;
pub mod sled_backend;
#[cfg(test)]
mod test_support;
mod tree;
mod users;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use backend::{Backend, Claims, Rows};
use postgres::PgBackend;
use sled_backend::SledBackend;

pub use audit::AUDIT_BATCH;
pub use backend::{Claim, ClaimOutcome, Fenced, backoff_delay};
pub use cache::{Cache, Caches};
pub use claims::Confirmed;
pub use connect::{ConnectTicket, PendingCredential, TicketClaim};
pub use crypto::{CryptoError, KeyId, KeyRing, MasterKey};
pub use error::{OpenError, StoreError};
pub use open::{Location, StoreOptions, check_key, exists};
pub use records::{
    AuditRecord, BindOutcome, Credential, OAuthState, Owner, PutUserError, SessionRecord,
    UserProfile, method_name,
};
pub use tree::{Op, Tree};

/// Decrypted credentials by record key.
pub type CredentialCache = Cache<Credential>;

/// The store front: what the rest of sidekey calls, on whichever backend
/// the store was opened. Its operations are grouped by what they store,
/// one module each (see the map above).
pub struct Store {
    backend: AnyBackend,
    keys: Arc<KeyRing>,
    /// Keyed hash for the phone and ticket indexes; random per store, kept
    /// sealed in meta.
    index_key: Zeroizing<Vec<u8>>,
    caches: Arc<Caches>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.kind())
            .finish()
    }
}

impl Store {
    /// `sled` or `postgres`.
    pub fn kind(&self) -> &'static str {
        match self.backend {
            AnyBackend::Sled(_) => "sled",
            AnyBackend::Postgres(_) => "postgres",
        }
    }

    /// The sled directory, if this is a sled store.
    pub fn path(&self) -> Option<&Path> {
        match &self.backend {
            AnyBackend::Sled(b) => Some(b.path()),
            AnyBackend::Postgres(_) => None,
        }
    }

    pub fn key_id(&self) -> KeyId {
        self.keys.current_id()
    }

    pub fn caches(&self) -> &Arc<Caches> {
        &self.caches
    }

    /// Makes every write so far durable. Admin writes and refreshed tokens
    /// call this before anyone is told the write happened. (PostgreSQL
    /// commits each write before it returns.)
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.backend.flush().await
    }

    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        match &self.backend {
            AnyBackend::Sled(b) => b.flush_blocking(),
            AnyBackend::Postgres(_) => Ok(()),
        }
    }

    /// Bytes the store takes: sled's files, or the PostgreSQL table with
    /// its indexes and TOAST.
    pub async fn size_on_disk(&self) -> u64 {
        self.backend.size_on_disk().await.unwrap_or(0)
    }

    /// Other sidekey processes serving this store (PostgreSQL; a sled
    /// store is locked by its one process instead).
    pub async fn running_replicas(&self) -> Result<i64, StoreError> {
        match &self.backend {
            AnyBackend::Sled(_) => Ok(0),
            AnyBackend::Postgres(b) => b.running_replicas().await,
        }
    }

    /// Whether the store answers now (for `/readyz`).
    pub async fn ready(&self) -> Result<(), StoreError> {
        match &self.backend {
            AnyBackend::Sled(_) => Ok(()),
            AnyBackend::Postgres(b) => b.ping().await,
        }
    }

    /// Whether the change listener hears other replicas now (PostgreSQL;
    /// `None` on sled, which has none).
    pub fn listener_up(&self) -> Option<bool> {
        match &self.backend {
            AnyBackend::Sled(_) => None,
            AnyBackend::Postgres(_) => Some(self.caches.is_live()),
        }
    }
}

/// The backend a store was opened on. It implements the contract by
/// matching once per call: every call is dispatched statically, and
/// nothing is boxed.
pub(crate) enum AnyBackend {
    Sled(SledBackend),
    Postgres(PgBackend),
}

impl Backend for AnyBackend {
    async fn get(&self, t: Tree, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            AnyBackend::Sled(b) => b.get(t, k).await,
            AnyBackend::Postgres(b) => b.get(t, k).await,
        }
    }

    async fn put(&self, t: Tree, k: &[u8], v: &[u8]) -> Result<(), StoreError> {
        match self {
            AnyBackend::Sled(b) => b.put(t, k, v).await,
            AnyBackend::Postgres(b) => b.put(t, k, v).await,
        }
    }

    async fn remove(&self, t: Tree, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            AnyBackend::Sled(b) => b.remove(t, k).await,
            AnyBackend::Postgres(b) => b.remove(t, k).await,
        }
    }

    async fn cas(
        &self,
        t: Tree,
        k: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        match self {
            AnyBackend::Sled(b) => b.cas(t, k, old, new).await,
            AnyBackend::Postgres(b) => b.cas(t, k, old, new).await,
        }
    }

    async fn batch(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        match self {
            AnyBackend::Sled(b) => b.batch(ops).await,
            AnyBackend::Postgres(b) => b.batch(ops).await,
        }
    }

    async fn scan_prefix(&self, t: Tree, prefix: &[u8]) -> Result<Rows, StoreError> {
        match self {
            AnyBackend::Sled(b) => b.scan_prefix(t, prefix).await,
            AnyBackend::Postgres(b) => b.scan_prefix(t, prefix).await,
        }
    }

    async fn page(&self, t: Tree, after: Option<&[u8]>, limit: usize) -> Result<Rows, StoreError> {
        match self {
            AnyBackend::Sled(b) => b.page(t, after, limit).await,
            AnyBackend::Postgres(b) => b.page(t, after, limit).await,
        }
    }

    async fn page_rev(
        &self,
        t: Tree,
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Rows, StoreError> {
        match self {
            AnyBackend::Sled(b) => b.page_rev(t, before, limit).await,
            AnyBackend::Postgres(b) => b.page_rev(t, before, limit).await,
        }
    }

    async fn keys_before(
        &self,
        t: Tree,
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        match self {
            AnyBackend::Sled(b) => b.keys_before(t, end, limit).await,
            AnyBackend::Postgres(b) => b.keys_before(t, end, limit).await,
        }
    }

    async fn count(&self, t: Tree) -> Result<usize, StoreError> {
        match self {
            AnyBackend::Sled(b) => b.count(t).await,
            AnyBackend::Postgres(b) => b.count(t).await,
        }
    }

    async fn next_ids(&self, n: usize) -> Result<Vec<u64>, StoreError> {
        match self {
            AnyBackend::Sled(b) => b.next_ids(n).await,
            AnyBackend::Postgres(b) => b.next_ids(n).await,
        }
    }

    async fn flush(&self) -> Result<(), StoreError> {
        match self {
            AnyBackend::Sled(b) => b.flush().await,
            AnyBackend::Postgres(b) => b.flush().await,
        }
    }

    async fn size_on_disk(&self) -> Result<u64, StoreError> {
        match self {
            AnyBackend::Sled(b) => b.size_on_disk().await,
            AnyBackend::Postgres(b) => b.size_on_disk().await,
        }
    }
}

impl Claims for AnyBackend {
    async fn claim(
        &self,
        key: &str,
        lease: Duration,
        now_ms: i64,
    ) -> Result<ClaimOutcome, StoreError> {
        match self {
            AnyBackend::Sled(b) => b.claim(key, lease, now_ms).await,
            AnyBackend::Postgres(b) => b.claim(key, lease, now_ms).await,
        }
    }

    async fn release(
        &self,
        claim: &Claim,
        failed: Option<bool>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        match self {
            AnyBackend::Sled(b) => b.release(claim, failed, now_ms).await,
            AnyBackend::Postgres(b) => b.release(claim, failed, now_ms).await,
        }
    }

    async fn renew(&self, claim: &Claim, lease: Duration) -> Result<bool, StoreError> {
        match self {
            AnyBackend::Sled(b) => b.renew(claim, lease).await,
            AnyBackend::Postgres(b) => b.renew(claim, lease).await,
        }
    }

    async fn confirm(
        &self,
        claim: &Claim,
        lease: Duration,
        t: Tree,
        k: &[u8],
        expected: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        match self {
            AnyBackend::Sled(b) => b.confirm(claim, lease, t, k, expected).await,
            AnyBackend::Postgres(b) => b.confirm(claim, lease, t, k, expected).await,
        }
    }

    async fn cas_fenced(
        &self,
        claim: &Claim,
        t: Tree,
        k: &[u8],
        old: Option<&[u8]>,
        new: &[u8],
    ) -> Result<Fenced, StoreError> {
        match self {
            AnyBackend::Sled(b) => b.cas_fenced(claim, t, k, old, new).await,
            AnyBackend::Postgres(b) => b.cas_fenced(claim, t, k, old, new).await,
        }
    }

    async fn clear_backoff(&self, key: &str) -> Result<(), StoreError> {
        match self {
            AnyBackend::Sled(b) => b.clear_backoff(key).await,
            AnyBackend::Postgres(b) => b.clear_backoff(key).await,
        }
    }
}
