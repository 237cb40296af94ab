//! Refresh (and GC) claims as the store offers them: one holder at a time,
//! a shared back-off, and the confirm-then-commit steps that keep a
//! refresh token from being sent twice or its result stored over a
//! newer credential. The claim types are the backend contract's
//! (module `backend`).

use std::time::Duration;

use crate::backend::{Backend, Claim, ClaimOutcome, Claims, Fenced};
use crate::{Credential, Owner, Store, StoreError, Tree};

/// A credential as confirmed under a refresh claim: what the refresh
/// sends from, and whose generation its result replaces.
pub struct Confirmed {
    pub credential: Option<Credential>,
}

impl Store {
    /// Claims `key` for `lease` (refresh of one credential, or a GC round):
    /// at most one holder cluster-wide until it releases or the lease lapses.
    /// `now_ms` is sidekey's clock, which the shared back-off is kept on
    /// (the lease itself runs on the backend's clock).
    pub async fn claim(
        &self,
        key: &str,
        lease: Duration,
        now_ms: i64,
    ) -> Result<ClaimOutcome, StoreError> {
        self.backend.claim(key, lease, now_ms).await
    }

    /// Releases a claim: `Some(true)` after a provider failure (starts the
    /// shared back-off), `Some(false)` after a success (clears it), `None`
    /// otherwise.
    pub async fn release(
        &self,
        claim: &Claim,
        failed: Option<bool>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.backend.release(claim, failed, now_ms).await
    }

    pub async fn clear_backoff(&self, key: &str) -> Result<(), StoreError> {
        self.backend.clear_backoff(key).await
    }

    /// Extends a held claim's lease to `lease` from now. `false`: it is
    /// someone else's now.
    pub async fn renew_claim(&self, claim: &Claim, lease: Duration) -> Result<bool, StoreError> {
        self.backend.renew(claim, lease).await
    }

    /// The last check before a refresh token is sent: the claim is still
    /// ours (its lease is renewed to `lease` from now) and the credential
    /// still has generation `expected` (`None`: there is none), both in one
    /// atomic step. Returns the credential as confirmed, or `None` when
    /// either has moved on: the caller must not send, and reads again.
    pub async fn confirm_refresh(
        &self,
        claim: &Claim,
        lease: Duration,
        owner: &Owner,
        provider: &str,
        expected: Option<u64>,
    ) -> Result<Option<Confirmed>, StoreError> {
        let key = owner.key(provider);
        let k = key.as_bytes();
        let raw = self.backend.get(Tree::Credentials, k).await?;
        let credential = match &raw {
            Some(r) => Some(self.decode::<Credential>(Tree::Credentials, k, r)?.0),
            None => None,
        };
        if credential.as_ref().map(|c| c.generation) != expected {
            return Ok(None);
        }
        let held = self
            .backend
            .confirm(claim, lease, Tree::Credentials, k, raw.as_deref())
            .await?;
        Ok(held.then_some(Confirmed { credential }))
    }

    /// Writes a refreshed credential in place of the one confirmed before
    /// the call (`base`), only if the stored one still has its generation
    /// and `claim` is still ours: a holder whose lease lapsed can neither
    /// overwrite what its successor wrote nor write after its successor
    /// read. The generation is compared, not the bytes: a record re-sealed
    /// under a new master key meanwhile (lazy rotation, by any reader) is
    /// the same credential. One read, then one fenced compare-and-swap.
    pub async fn commit_refresh(
        &self,
        claim: &Claim,
        owner: &Owner,
        provider: &str,
        base: &Confirmed,
        cred: &mut Credential,
    ) -> Result<Fenced, StoreError> {
        let key = owner.key(provider);
        let k = key.as_bytes();
        let expected = base.credential.as_ref().map(|c| c.generation);
        let generation = cred.generation;
        loop {
            let raw = self.backend.get(Tree::Credentials, k).await?;
            let prev = match &raw {
                Some(r) => Some(
                    self.decode::<Credential>(Tree::Credentials, k, r)?
                        .0
                        .generation,
                ),
                None => None,
            };
            if prev != expected {
                return Ok(Fenced::Moved);
            }
            cred.generation = generation.max(prev.unwrap_or(0)) + 1;
            let new = self.seal_json(Tree::Credentials, k, cred);
            let done = self
                .backend
                .cas_fenced(claim, Tree::Credentials, k, raw.as_deref(), &new)
                .await?;
            self.caches.credentials.invalidate(&key);
            match done {
                // Only the bytes moved (a re-seal): read again.
                Fenced::Moved => continue,
                Fenced::Written => self.caches.changed.notify_waiters(),
                Fenced::Lost => {}
            }
            return Ok(done);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AnyBackend;
    use crate::test_support::{cred, ring};
    use crate::{KeyRing, MasterKey, StoreOptions};

    /// The rules a refresh holder relies on, on the backend-independent
    /// front (sled here; tests/replica_faults.rs runs them on PostgreSQL).
    #[tokio::test]
    async fn refresh_claims_confirm_and_fence_their_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db"), ring(1), StoreOptions::default()).unwrap();
        let o = Owner::User("u".into());
        s.put_credential(&o, "g", &mut cred("a")).await.unwrap();
        let granted = |c| match c {
            ClaimOutcome::Granted(c) => c,
            other => panic!("{other:?}"),
        };
        let long = Duration::from_secs(60);
        // A lease that lapses at once: the next claim takes over.
        let first = granted(s.claim("k", Duration::ZERO, 0).await.unwrap());
        let second = granted(s.claim("k", long, 0).await.unwrap());
        assert!(matches!(
            s.claim("k", long, 0).await.unwrap(),
            ClaimOutcome::Held
        ));
        // The overtaken holder may not send, nor store anything.
        assert!(
            s.confirm_refresh(&first, long, &o, "g", Some(1))
                .await
                .unwrap()
                .is_none()
        );
        let base = s
            .confirm_refresh(&second, long, &o, "g", Some(1))
            .await
            .unwrap()
            .expect("the current holder confirms");
        let mut late = cred("from-the-overtaken-holder");
        assert_eq!(
            s.commit_refresh(&first, &o, "g", &base, &mut late)
                .await
                .unwrap(),
            Fenced::Lost
        );
        let mut fresh = cred("b");
        assert_eq!(
            s.commit_refresh(&second, &o, "g", &base, &mut fresh)
                .await
                .unwrap(),
            Fenced::Written
        );
        let c = s.credential_uncached(&o, "g").await.unwrap().unwrap();
        assert_eq!((c.generation, c.access_token.unwrap().expose()), (2, "b"));
        // A credential written since the holder read it: not confirmed,
        // and a result from the old one is not stored over it.
        s.release(&second, Some(false), 0).await.unwrap();
        let third = granted(s.claim("k", long, 0).await.unwrap());
        let stale = s
            .confirm_refresh(&third, long, &o, "g", Some(2))
            .await
            .unwrap()
            .unwrap();
        s.put_credential(&o, "g", &mut cred("admin")).await.unwrap();
        assert!(
            s.confirm_refresh(&third, long, &o, "g", Some(2))
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            s.commit_refresh(&third, &o, "g", &stale, &mut cred("c"))
                .await
                .unwrap(),
            Fenced::Moved
        );
    }

    /// A credential re-sealed under a new master key between the holder's
    /// confirmation and its commit (any reader re-seals, lazily) is the
    /// same credential: the refreshed token is stored.
    #[tokio::test]
    async fn a_refresh_result_is_stored_over_a_lazily_resealed_credential() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        let o = Owner::User("u".into());
        {
            let s = Store::open(&p, ring(2), StoreOptions::default()).unwrap();
            s.put_credential(&o, "g", &mut cred("old")).await.unwrap();
            s.flush().await.unwrap();
        }
        let rot = KeyRing::new(
            MasterKey::from_bytes(&[3; 32]),
            vec![MasterKey::from_bytes(&[2; 32])],
        );
        let s = Store::open(&p, rot, StoreOptions::default()).unwrap();
        let long = Duration::from_secs(60);
        let ClaimOutcome::Granted(claim) = s.claim("k", long, 0).await.unwrap() else {
            panic!("not granted")
        };
        let base = s
            .confirm_refresh(&claim, long, &o, "g", Some(1))
            .await
            .unwrap()
            .unwrap();
        let raw = |s: &Store| match &s.backend {
            AnyBackend::Sled(b) => futures_util::FutureExt::now_or_never(
                b.get(Tree::Credentials, o.key("g").as_bytes()),
            )
            .unwrap()
            .unwrap(),
            AnyBackend::Postgres(_) => unreachable!(),
        };
        let before = raw(&s);
        // Another caller reads it while the token call runs: re-sealed.
        s.credential_uncached(&o, "g").await.unwrap().unwrap();
        assert_ne!(raw(&s), before, "the read re-sealed the record");
        assert_eq!(
            s.commit_refresh(&claim, &o, "g", &base, &mut cred("new"))
                .await
                .unwrap(),
            Fenced::Written
        );
        let c = s.credential_uncached(&o, "g").await.unwrap().unwrap();
        assert_eq!(c.access_token.unwrap().expose(), "new");
    }
}
