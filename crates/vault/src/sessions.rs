//! Sessions and their indexes (by conversation, by user, by expiry):
//! first-bind-wins conversation binding, revocation, expiry GC.

use std::sync::Arc;

use crate::backend::Backend;
use crate::tree::{expiry_key, join0};
use crate::{BindOutcome, Op, SessionRecord, Store, StoreError, Tree};

impl Store {
    pub async fn put_session(&self, sid: &str, rec: &SessionRecord) -> Result<(), StoreError> {
        let mut ops = vec![
            Op::Put(
                Tree::Sessions,
                sid.as_bytes().to_vec(),
                self.seal_json(Tree::Sessions, sid.as_bytes(), rec),
            ),
            Op::Put(Tree::UserSessions, join0(&rec.user, sid), Vec::new()),
            Op::Put(Tree::SessionExpiry, expiry_key(rec.exp, sid), Vec::new()),
        ];
        if let Some(conv) = &rec.conv {
            ops.push(Op::Put(Tree::ConvIndex, join0(conv, sid), Vec::new()));
        }
        let r = self.batch(ops).await;
        self.caches.sessions.invalidate(sid);
        r
    }

    pub async fn session(&self, sid: &str) -> Result<Option<Arc<SessionRecord>>, StoreError> {
        if !self.caches.is_live() {
            return Ok(self
                .get_as::<SessionRecord>(Tree::Sessions, sid.as_bytes())
                .await?
                .map(Arc::new));
        }
        match self.caches.sessions.get(sid) {
            Ok(r) => Ok(Some(r)),
            Err(epoch) => {
                let r = self
                    .get_as::<SessionRecord>(Tree::Sessions, sid.as_bytes())
                    .await?;
                Ok(r.map(|r| {
                    let r = Arc::new(r);
                    self.caches.sessions.insert(sid, r.clone(), epoch);
                    r
                }))
            }
        }
    }

    /// Binds an unbound session to a conversation, atomically (in the
    /// database, for every replica): of two concurrent first calls with
    /// different ids exactly one wins.
    pub async fn bind_session(&self, sid: &str, conv: &str) -> Result<BindOutcome, StoreError> {
        let k = sid.as_bytes();
        loop {
            let Some(raw) = self.backend.get(Tree::Sessions, k).await? else {
                return Ok(BindOutcome::Gone);
            };
            let (mut rec, _) = self.decode::<SessionRecord>(Tree::Sessions, k, &raw)?;
            match &rec.conv {
                Some(c) if c == conv => return Ok(BindOutcome::Bound),
                Some(_) => return Ok(BindOutcome::Mismatch),
                None => {}
            }
            rec.conv = Some(conv.to_owned());
            let new = self.seal_json(Tree::Sessions, k, &rec);
            // Index first: a dangling index entry is harmless, a missing one
            // would let post-call revocation miss this session.
            self.backend
                .put(Tree::ConvIndex, &join0(conv, sid), &[])
                .await?;
            if self
                .backend
                .cas(Tree::Sessions, k, Some(&raw), Some(&new))
                .await?
            {
                self.caches.sessions.invalidate(sid);
                return Ok(BindOutcome::Bound);
            }
            self.backend
                .remove(Tree::ConvIndex, &join0(conv, sid))
                .await?;
        }
    }

    /// Deletes a session and its index entries. Returns whether it existed.
    pub async fn revoke_session(&self, sid: &str) -> Result<bool, StoreError> {
        let rec = match self
            .get_as::<SessionRecord>(Tree::Sessions, sid.as_bytes())
            .await
        {
            Ok(r) => r,
            // A record that no longer opens is revoked all the same.
            Err(StoreError::Crypto { .. }) | Err(StoreError::Decode(_)) => None,
            Err(e) => return Err(e),
        };
        let existed = self
            .backend
            .remove(Tree::Sessions, sid.as_bytes())
            .await?
            .is_some();
        // After the removal: a reader that loaded the record before it
        // cannot cache it any more.
        self.caches.sessions.invalidate(sid);
        if let Some(rec) = rec {
            let mut ops = vec![
                Op::Remove(Tree::UserSessions, join0(&rec.user, sid)),
                Op::Remove(Tree::SessionExpiry, expiry_key(rec.exp, sid)),
            ];
            if let Some(conv) = &rec.conv {
                ops.push(Op::Remove(Tree::ConvIndex, join0(conv, sid)));
            }
            self.batch(ops).await?;
        }
        Ok(existed)
    }

    /// Session ids bound to a conversation (index lookup, no scan).
    pub async fn sessions_for_conversation(&self, conv: &str) -> Result<Vec<String>, StoreError> {
        self.prefix_ids(Tree::ConvIndex, conv).await
    }

    pub async fn sessions_for_user(&self, user: &str) -> Result<Vec<String>, StoreError> {
        self.prefix_ids(Tree::UserSessions, user).await
    }

    pub(crate) async fn prefix_ids(
        &self,
        t: Tree,
        prefix: &str,
    ) -> Result<Vec<String>, StoreError> {
        let mut p = prefix.as_bytes().to_vec();
        p.push(0);
        let rows = self.backend.scan_prefix(t, &p).await?;
        Ok(rows
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[p.len()..]).into_owned())
            .collect())
    }

    /// Removes sessions that expired before `now`; returns how many.
    pub async fn gc_sessions(&self, now: i64) -> Result<usize, StoreError> {
        let mut n = 0;
        let end = (now.max(0) as u64).to_be_bytes();
        loop {
            let expired = self
                .backend
                .keys_before(Tree::SessionExpiry, &end, 500)
                .await?;
            if expired.is_empty() {
                break;
            }
            for k in expired {
                let sid = String::from_utf8_lossy(&k[9.min(k.len())..]).into_owned();
                if self.revoke_session(&sid).await? {
                    n += 1;
                }
                self.backend.remove(Tree::SessionExpiry, &k).await?;
            }
        }
        Ok(n)
    }

    pub async fn session_count(&self) -> usize {
        self.backend.count(Tree::Sessions).await.unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::ring;
    use crate::{BindOutcome, SessionRecord, Store, StoreOptions};

    #[tokio::test]
    async fn sessions_bind_once_and_index_by_conversation() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db"), ring(1), StoreOptions::default()).unwrap();
        let rec = SessionRecord {
            user: "u".into(),
            providers: vec!["slack".into()],
            iat: 1,
            exp: 100,
            conv: None,
        };
        s.put_session("s1", &rec).await.unwrap();
        assert_eq!(
            s.bind_session("s1", "c1").await.unwrap(),
            BindOutcome::Bound
        );
        assert_eq!(
            s.bind_session("s1", "c1").await.unwrap(),
            BindOutcome::Bound
        );
        assert_eq!(
            s.bind_session("s1", "c2").await.unwrap(),
            BindOutcome::Mismatch
        );
        assert_eq!(s.sessions_for_conversation("c1").await.unwrap(), vec!["s1"]);
        assert!(s.sessions_for_conversation("c").await.unwrap().is_empty());
        assert!(s.revoke_session("s1").await.unwrap());
        assert!(s.sessions_for_conversation("c1").await.unwrap().is_empty());
        assert_eq!(s.bind_session("s1", "c1").await.unwrap(), BindOutcome::Gone);
    }

    #[tokio::test]
    async fn gc_removes_only_expired() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db"), ring(1), StoreOptions::default()).unwrap();
        for (sid, exp) in [("a", 10), ("b", 20), ("c", 30)] {
            s.put_session(
                sid,
                &SessionRecord {
                    user: "u".into(),
                    providers: vec![],
                    iat: 0,
                    exp,
                    conv: None,
                },
            )
            .await
            .unwrap();
        }
        assert_eq!(s.gc_sessions(25).await.unwrap(), 2);
        assert!(s.session("a").await.unwrap().is_none());
        assert!(s.session("c").await.unwrap().is_some());
        assert_eq!(s.sessions_for_user("u").await.unwrap(), vec!["c"]);
    }
}
