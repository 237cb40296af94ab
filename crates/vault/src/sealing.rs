//! Records in and out of their seal: every value is sealed under the
//! master key with its tree and key as associated data, and re-sealed
//! under the current key when read under an old one (lazy rotation).
//! Index keys (phone numbers, tickets) are keyed hashes.

use hmac::{Hmac, Mac};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::backend::Backend;
use crate::tree::aad;
use crate::{Op, Store, StoreError, Tree, crypto};

impl Store {
    pub(crate) fn seal(&self, t: Tree, key: &[u8], plain: &[u8]) -> Vec<u8> {
        self.keys.seal(&aad(t, key), plain)
    }

    pub(crate) fn seal_json<T: Serialize>(&self, t: Tree, key: &[u8], value: &T) -> Vec<u8> {
        let plain = Zeroizing::new(serde_json::to_vec(value).expect("serialisable"));
        self.seal(t, key, &plain)
    }

    pub(crate) fn open_raw(
        &self,
        t: Tree,
        key: &[u8],
        raw: &[u8],
    ) -> Result<crypto::Opened, StoreError> {
        self.keys
            .open(&aad(t, key), raw)
            .map_err(|err| StoreError::Crypto {
                key: format!("{}/{}", t.name(), String::from_utf8_lossy(key)),
                err,
            })
    }

    pub(crate) fn decode<T: DeserializeOwned>(
        &self,
        t: Tree,
        key: &[u8],
        raw: &[u8],
    ) -> Result<(T, bool), StoreError> {
        let o = self.open_raw(t, key, raw)?;
        let v = serde_json::from_slice(&o.plaintext).map_err(|_| {
            StoreError::Decode(format!("{}/{}", t.name(), String::from_utf8_lossy(key)))
        })?;
        Ok((v, o.stale))
    }

    /// Reads and decodes a record; one sealed under an old key is re-sealed
    /// under the current key unless it changed meanwhile (lazy rotation).
    ///
    /// Boxed: the backends' read futures are kilobytes, and the cached
    /// lookups on the request path (`session`, `credential`) would
    /// otherwise carry one inline, to be copied with every request's
    /// future even when the cache answers.
    pub(crate) fn get_as<'a, T: DeserializeOwned + Serialize + Send + 'a>(
        &'a self,
        t: Tree,
        key: &'a [u8],
    ) -> futures_util::future::BoxFuture<'a, Result<Option<T>, StoreError>> {
        Box::pin(async move {
            let Some(raw) = self.backend.get(t, key).await? else {
                return Ok(None);
            };
            let (v, stale) = self.decode::<T>(t, key, &raw)?;
            if stale {
                let new = self.seal_json(t, key, &v);
                let _ = self.backend.cas(t, key, Some(&raw), Some(&new)).await;
            }
            Ok(Some(v))
        })
    }

    pub(crate) async fn put_as<T: Serialize>(
        &self,
        t: Tree,
        key: &[u8],
        v: &T,
    ) -> Result<(), StoreError> {
        let sealed = self.seal_json(t, key, v);
        self.backend.put(t, key, &sealed).await
    }

    pub(crate) async fn batch(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        self.backend.batch(ops).await
    }

    /// Keyed hash of an index value (phone number, ticket), so the stored
    /// key does not reveal it.
    pub fn index_hash(&self, value: &str) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.index_key).expect("any key size");
        mac.update(value.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
}
