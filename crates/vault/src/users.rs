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
        // Every call of a JWT bearer provider passes here: the hash and its
        // hex without a formatted string per byte (the same value as
        // `index_hash("jwt-subject:{subject}")`, which stored keys use).
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(&self.index_key)
            .expect("any key size");
        hmac::Mac::update(&mut mac, b"jwt-subject:");
        hmac::Mac::update(&mut mac, subject.as_bytes());
        let h = hmac::Mac::finalize(mac).into_bytes();
        let mut hex = String::with_capacity(40);
        for b in h.iter().take(20) {
            hex.push(HEX[usize::from(b >> 4)] as char);
            hex.push(HEX[usize::from(b & 15)] as char);
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

#[cfg(test)]
mod tests {
    use crate::crypto::{KeyRing, MasterKey};
    use crate::{Owner, Store, StoreOptions};

    /// The owner of a subject's tokens must stay the value stored keys were
    /// made with: the keyed hash of `jwt-subject:{subject}`, 20 bytes in hex.
    #[test]
    fn subject_owner_is_the_index_hash_of_the_subject() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(
            &dir.path().join("db"),
            KeyRing::new(MasterKey::from_bytes(&[7; 32]), vec![]),
            StoreOptions::default(),
        )
        .unwrap();
        for subject in ["alice@acme.com", "", "ünï@exämple.org", "user-000001"] {
            let h = s.index_hash(&format!("jwt-subject:{subject}"));
            let want: String = h.iter().take(20).map(|b| format!("{b:02x}")).collect();
            assert_eq!(s.subject_owner(subject), Owner::Subject(want), "{subject}");
        }
        assert_ne!(s.subject_owner("a"), s.subject_owner("b"));
    }
}
