//! User profiles read on the request path, and the tokens JWT bearer
//! grants got for subjects.

use std::sync::Arc;

use super::{Backend, Op, Owner, Store, StoreError, Tree, UserProfile};

impl Store {
    /// A user's profile, from the memory cache when fresh: a JWT bearer
    /// provider needs the caller's address on every call.
    pub async fn user_cached(&self, user: &str) -> Result<Option<Arc<UserProfile>>, StoreError> {
        if !self.caches.is_live() {
            return Ok(self.user(user).await?.map(Arc::new));
        }
        match self.caches.users.get(user) {
            Ok(p) => Ok(Some(p)),
            Err(epoch) => {
                let p = self.user(user).await?.map(Arc::new);
                if let Some(p) = &p {
                    self.caches.users.insert(user, p.clone(), epoch);
                }
                Ok(p)
            }
        }
    }

    /// The owner of the tokens JWT bearer grants get for `subject`: keyed
    /// by a keyed hash, so the store's plain record keys name no address.
    pub fn subject_owner(&self, subject: &str) -> Owner {
        let h = self.index_hash(&format!("jwt-subject:{subject}"));
        let mut hex = String::with_capacity(h.len() * 2);
        for b in h.iter().take(20) {
            hex.push_str(&format!("{b:02x}"));
        }
        Owner::Subject(hex)
    }

    /// Removes every token got for these subjects, for any provider.
    pub(crate) async fn forget_subjects(&self, subjects: &[String]) -> Result<(), StoreError> {
        for s in subjects {
            let Owner::Subject(h) = self.subject_owner(s) else {
                continue;
            };
            let prefix = format!("s/{h}/");
            let rows =
                on_backend!(self, b => b.scan_prefix(Tree::Credentials, prefix.as_bytes()).await)?;
            if rows.is_empty() {
                continue;
            }
            let ops = rows
                .iter()
                .map(|(k, _)| Op::Remove(Tree::Credentials, k.clone()))
                .collect();
            self.batch(ops).await?;
            for (k, _) in &rows {
                self.caches
                    .credentials
                    .invalidate(&String::from_utf8_lossy(k));
            }
        }
        Ok(())
    }
}
