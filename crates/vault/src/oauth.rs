//! OAuth states: single use across every replica, dropped once expired.

use crate::backend::Backend;
use crate::{OAuthState, Store, StoreError, Tree};

impl Store {
    pub async fn put_oauth_state(&self, state: &str, rec: &OAuthState) -> Result<(), StoreError> {
        let k = self.index_hash(state);
        self.put_as(Tree::OAuthStates, &k, rec).await
    }

    /// Removes and returns a state: each state is usable exactly once,
    /// across every replica (the removal is what decides).
    pub async fn take_oauth_state(&self, state: &str) -> Result<Option<OAuthState>, StoreError> {
        let k = self.index_hash(state);
        let Some(raw) = self.backend.remove(Tree::OAuthStates, &k).await? else {
            return Ok(None);
        };
        Ok(Some(self.decode(Tree::OAuthStates, &k, &raw)?.0))
    }

    /// Drops OAuth states that expired before `now`.
    pub async fn gc_oauth_states(&self, now: i64) -> Result<usize, StoreError> {
        self.gc_expired::<OAuthState>(Tree::OAuthStates, now, |s| s.expires_at)
            .await
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::ring;
    use crate::{OAuthState, Store, StoreOptions};
    use sidekey_base::secret::Secret;

    #[tokio::test]
    async fn oauth_state_single_use() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db"), ring(1), StoreOptions::default()).unwrap();
        let st = OAuthState {
            user: "u".into(),
            provider: "g".into(),
            verifier: Secret::new("v"),
            return_to: None,
            redirect_uri: "x".into(),
            expires_at: 10,
            ticket: None,
            connection: Default::default(),
        };
        s.put_oauth_state("st", &st).await.unwrap();
        assert!(s.take_oauth_state("st").await.unwrap().is_some());
        assert!(s.take_oauth_state("st").await.unwrap().is_none());
    }
}
