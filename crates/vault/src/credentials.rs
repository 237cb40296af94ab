//! Credentials: cached reads, generation-bumping writes, listings.

use std::sync::Arc;

use crate::backend::Backend;
use crate::{Credential, Owner, Store, StoreError, Tree};

impl Store {
    /// The credential, from the memory cache when fresh.
    pub async fn credential(
        &self,
        owner: &Owner,
        provider: &str,
    ) -> Result<Option<Arc<Credential>>, StoreError> {
        let key = owner.key(provider);
        if !self.caches.is_live() {
            return Ok(self
                .credential_uncached(owner, provider)
                .await?
                .map(Arc::new));
        }
        match self.caches.credentials.get(&key) {
            Ok(c) => Ok(Some(c)),
            Err(epoch) => {
                let c = self
                    .get_as::<Credential>(Tree::Credentials, key.as_bytes())
                    .await?;
                Ok(c.map(|c| {
                    let c = Arc::new(c);
                    self.caches.credentials.insert(&key, c.clone(), epoch);
                    c
                }))
            }
        }
    }

    /// The credential as stored, bypassing the cache (refresh decisions).
    pub async fn credential_uncached(
        &self,
        owner: &Owner,
        provider: &str,
    ) -> Result<Option<Credential>, StoreError> {
        let key = owner.key(provider);
        self.get_as(Tree::Credentials, key.as_bytes()).await
    }

    /// Writes a credential (on sled not yet durable: call [`flush`]). The
    /// generation is set to one past whatever is stored.
    pub async fn put_credential(
        &self,
        owner: &Owner,
        provider: &str,
        cred: &mut Credential,
    ) -> Result<(), StoreError> {
        loop {
            if self.write_credential(owner, provider, None, cred).await? {
                return Ok(());
            }
        }
    }

    /// Writes a credential only if the stored one still has generation
    /// `expected` (a refresh result must not overwrite a replacement).
    /// Returns whether it was written.
    pub async fn replace_credential_if(
        &self,
        owner: &Owner,
        provider: &str,
        expected: u64,
        cred: &mut Credential,
    ) -> Result<bool, StoreError> {
        self.write_credential(owner, provider, Some(expected), cred)
            .await
    }

    /// One compare-and-swap attempt; `false` when the record moved (or, with
    /// `expected`, has another generation).
    async fn write_credential(
        &self,
        owner: &Owner,
        provider: &str,
        expected: Option<u64>,
        cred: &mut Credential,
    ) -> Result<bool, StoreError> {
        let key = owner.key(provider);
        let k = key.as_bytes();
        let raw = self.backend.get(Tree::Credentials, k).await?;
        let prev = match &raw {
            Some(r) => self
                .decode::<Credential>(Tree::Credentials, k, r)
                .ok()
                .map(|(c, _)| c.generation),
            None => None,
        };
        if let Some(exp) = expected {
            if prev != Some(exp) {
                return Ok(false);
            }
        }
        cred.generation = cred.generation.max(prev.unwrap_or(0)) + 1;
        let new = self.seal_json(Tree::Credentials, k, cred);
        let ok = self
            .backend
            .cas(Tree::Credentials, k, raw.as_deref(), Some(&new))
            .await?;
        self.caches.credentials.invalidate(&key);
        if ok {
            self.caches.changed.notify_waiters();
        }
        Ok(ok)
    }

    pub async fn delete_credential(
        &self,
        owner: &Owner,
        provider: &str,
    ) -> Result<bool, StoreError> {
        let key = owner.key(provider);
        let existed = self
            .backend
            .remove(Tree::Credentials, key.as_bytes())
            .await?
            .is_some();
        self.caches.credentials.invalidate(&key);
        Ok(existed)
    }

    /// Every credential of an owner, by provider name.
    pub async fn list_credentials(
        &self,
        owner: &Owner,
    ) -> Result<Vec<(String, Credential)>, StoreError> {
        let prefix = owner.prefix();
        let mut out = Vec::new();
        let rows = self
            .backend
            .scan_prefix(Tree::Credentials, prefix.as_bytes())
            .await?;
        for (k, v) in rows {
            let (c, _) = self.decode::<Credential>(Tree::Credentials, &k, &v)?;
            let provider = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.push((provider, c));
        }
        Ok(out)
    }

    pub async fn credential_count(&self) -> usize {
        self.backend.count(Tree::Credentials).await.unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::{cred, ring};
    use crate::{Owner, Store, StoreOptions};

    #[tokio::test]
    async fn credentials_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        {
            let s = Store::open(&p, ring(1), StoreOptions::default()).unwrap();
            let mut c = cred("xoxb-1");
            s.put_credential(&Owner::User("alice".into()), "slack", &mut c)
                .await
                .unwrap();
            assert_eq!(c.generation, 1);
            s.flush_blocking().unwrap();
        }
        let s = Store::open(&p, ring(1), StoreOptions::default()).unwrap();
        let c = s
            .credential(&Owner::User("alice".into()), "slack")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.access_token.as_ref().unwrap().expose(), "xoxb-1");
        let list = s
            .list_credentials(&Owner::User("alice".into()))
            .await
            .unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].0, "slack");
    }

    #[tokio::test]
    async fn generations_increase_and_cache_sees_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db"), ring(1), StoreOptions::default()).unwrap();
        let o = Owner::User("u".into());
        s.put_credential(&o, "g", &mut cred("a")).await.unwrap();
        assert_eq!(s.credential(&o, "g").await.unwrap().unwrap().generation, 1);
        s.put_credential(&o, "g", &mut cred("b")).await.unwrap();
        let c = s.credential(&o, "g").await.unwrap().unwrap();
        assert_eq!(c.generation, 2);
        assert_eq!(c.access_token.as_ref().unwrap().expose(), "b");
        assert!(s.delete_credential(&o, "g").await.unwrap());
        assert!(s.credential(&o, "g").await.unwrap().is_none());
    }
}
