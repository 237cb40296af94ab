//! Removing expired records of any sealed tree, safely beside writers.

use serde::de::DeserializeOwned;

use crate::backend::Backend;
use crate::{Store, StoreError, Tree};

impl Store {
    /// Removes the records of `t` whose expiry (`expires_at`) is before
    /// `before`, and any that no longer open; each removal is a
    /// compare-and-swap, so a record rewritten meanwhile stays. Returns how
    /// many were removed.
    pub(crate) async fn gc_expired<T: DeserializeOwned>(
        &self,
        t: Tree,
        before: i64,
        expires_at: impl Fn(&T) -> i64,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let rows = self.backend.page(t, after.as_deref(), 500).await?;
            let Some((last, _)) = rows.last() else { break };
            after = Some(last.clone());
            for (k, v) in rows {
                let expired = self
                    .decode::<T>(t, &k, &v)
                    .map(|(r, _)| expires_at(&r) < before)
                    .unwrap_or(true);
                if expired && self.backend.cas(t, &k, Some(&v), None).await? {
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}
