//! Users: profiles and the phone numbers indexed by keyed hash (one user
//! per number), listing, deletion with everything a user owns, profiles
//! read on the request path, and the tokens JWT bearer grants got for
//! subjects.

use std::sync::Arc;

use crate::backend::Backend;
use crate::tree::join0;
use crate::{Op, Owner, PutUserError, Store, StoreError, Tree, UserProfile};

impl Store {
    pub async fn user(&self, user: &str) -> Result<Option<UserProfile>, StoreError> {
        self.get_as(Tree::Users, user.as_bytes()).await
    }

    /// Profiles in key order after `after`, at most `limit` (migration).
    pub(crate) async fn profiles_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, UserProfile)>, StoreError> {
        let rows = self
            .backend
            .page(Tree::Users, after.map(str::as_bytes), limit)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (k, v) in rows {
            let (p, _) = self.decode::<UserProfile>(Tree::Users, &k, &v)?;
            out.push((String::from_utf8_lossy(&k).into_owned(), p));
        }
        Ok(out)
    }

    /// User ids with a profile or a credential, ascending, strictly after
    /// `after`, at most `limit`. Reads record keys only (nothing decrypted).
    pub async fn list_users(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        use std::collections::BTreeSet;
        let after = after.unwrap_or("");
        let beyond = |u: &str| u > after;
        let mut ids = BTreeSet::new();
        let mut cursor: Option<Vec<u8>> = (!after.is_empty()).then(|| after.as_bytes().to_vec());
        'users: loop {
            let rows = self
                .backend
                .page(Tree::Users, cursor.as_deref(), limit.min(500))
                .await?;
            let Some((last, _)) = rows.last() else { break };
            cursor = Some(last.clone());
            for (k, _) in rows {
                if ids.len() >= limit {
                    break 'users;
                }
                ids.insert(String::from_utf8_lossy(&k).into_owned());
            }
        }
        // Credential keys are `u/<user>/<provider>`. Every user after
        // `after` has a key at or above `u/<after>`. Key order is user order
        // except that '+', '-' and '.' sort before '/': a key after user
        // `w`'s can only belong to a user above `w` or to a proper prefix of
        // `w` cut just before one of those characters. So once `limit`
        // users below `w` are known, those prefixes are looked up directly
        // and the scan stops.
        let mut cursor = format!("u/{after}").into_bytes();
        'creds: loop {
            let rows = self
                .backend
                .page(Tree::Credentials, Some(&cursor), 500)
                .await?;
            let Some((last, _)) = rows.last() else { break };
            cursor = last.clone();
            for (k, _) in rows {
                let Some(rest) = k.strip_prefix(b"u/") else {
                    break 'creds;
                };
                let Some(end) = rest.iter().position(|b| *b == b'/') else {
                    continue;
                };
                let u = String::from_utf8_lossy(&rest[..end]).into_owned();
                if !beyond(&u) {
                    continue;
                }
                if ids.len() >= limit && ids.iter().nth(limit - 1).is_some_and(|m| *m < u) {
                    for (i, c) in u.char_indices() {
                        let v = &u[..i];
                        if matches!(c, '+' | '-' | '.') && !v.is_empty() && beyond(v) {
                            let key = format!("u/{v}/");
                            let found = self
                                .backend
                                .scan_prefix(Tree::Credentials, key.as_bytes())
                                .await?;
                            if !found.is_empty() {
                                ids.insert(v.to_owned());
                            }
                        }
                    }
                    break 'creds;
                }
                ids.insert(u);
            }
        }
        Ok(ids.into_iter().take(limit).collect())
    }

    /// Stores a profile and re-points its phone numbers. A number that
    /// belongs to another user is refused, and nothing changes.
    pub async fn put_user(
        &self,
        user: &str,
        profile: &UserProfile,
    ) -> Result<Result<(), PutUserError>, StoreError> {
        for phone in &profile.phone_numbers {
            if let Some(owner) = self.user_by_phone(phone).await? {
                if owner != user {
                    return Ok(Err(PutUserError::PhoneTaken {
                        phone: phone.clone(),
                        user: owner,
                    }));
                }
            }
        }
        let mut ops = Vec::new();
        if let Some(old) = self.user(user).await? {
            for phone in old.phone_numbers {
                if !profile.phone_numbers.contains(&phone) {
                    ops.push(Op::Remove(Tree::Phones, self.index_hash(&phone)));
                }
            }
        }
        for phone in &profile.phone_numbers {
            let k = self.index_hash(phone);
            let v = self.seal_json(Tree::Phones, &k, &user);
            ops.push(Op::Put(Tree::Phones, k, v));
        }
        ops.push(Op::Put(
            Tree::Users,
            user.as_bytes().to_vec(),
            self.seal_json(Tree::Users, user.as_bytes(), profile),
        ));
        let done = self.batch(ops).await;
        self.caches.users.invalidate(user);
        done?;
        Ok(Ok(()))
    }

    pub async fn user_by_phone(&self, e164: &str) -> Result<Option<String>, StoreError> {
        let k = self.index_hash(e164);
        self.get_as(Tree::Phones, &k).await
    }

    /// Removes a user's credentials, sessions, phone numbers and profile.
    /// Returns how many sessions were revoked.
    pub async fn delete_user(&self, user: &str) -> Result<usize, StoreError> {
        let owner = Owner::User(user.to_owned());
        // Records that no longer decrypt are removed too.
        let prefix = owner.prefix();
        let creds = self
            .backend
            .scan_prefix(Tree::Credentials, prefix.as_bytes())
            .await?;
        let mut ops = Vec::new();
        for (k, _) in &creds {
            ops.push(Op::Remove(Tree::Credentials, k.clone()));
        }
        self.batch(ops).await?;
        for (k, _) in &creds {
            self.caches
                .credentials
                .invalidate(&String::from_utf8_lossy(k));
        }
        let mut revoked = 0;
        for sid in self.sessions_for_user(user).await? {
            if self.revoke_session(&sid).await? {
                revoked += 1;
            }
            self.backend
                .remove(Tree::UserSessions, &join0(user, &sid))
                .await?;
        }
        let mut ops = Vec::new();
        let mut subjects = vec![user.to_owned()];
        if let Ok(Some(profile)) = self.user(user).await {
            for phone in profile.phone_numbers {
                ops.push(Op::Remove(Tree::Phones, self.index_hash(&phone)));
            }
            subjects.extend(profile.email);
        }
        // Tokens got for the user by JWT bearer grants go with the user.
        self.forget_subjects(&subjects).await?;
        ops.push(Op::Remove(Tree::Users, user.as_bytes().to_vec()));
        let done = self.batch(ops).await;
        self.caches.users.invalidate(user);
        done?;
        Ok(revoked)
    }

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
            let rows = self
                .backend
                .scan_prefix(Tree::Credentials, prefix.as_bytes())
                .await?;
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
    use crate::test_support::{contains, read_all, ring};
    use crate::{Owner, PutUserError, Store, StoreOptions, UserProfile};

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

    #[tokio::test]
    async fn phones_are_unique_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        let s = Store::open(&p, ring(1), StoreOptions::default()).unwrap();
        let prof = UserProfile {
            phone_numbers: vec!["+15551234567".into()],
            tenant: None,
            updated_at: 0,
            email: None,
        };
        s.put_user("alice", &prof).await.unwrap().unwrap();
        assert_eq!(
            s.user_by_phone("+15551234567").await.unwrap().as_deref(),
            Some("alice")
        );
        assert!(matches!(
            s.put_user("bob", &prof).await.unwrap(),
            Err(PutUserError::PhoneTaken { .. })
        ));
        s.put_user("alice", &UserProfile::default())
            .await
            .unwrap()
            .unwrap();
        assert!(s.user_by_phone("+15551234567").await.unwrap().is_none());
        s.flush_blocking().unwrap();
        drop(s);
        let raw = read_all(&p);
        assert!(!contains(&raw, b"+15551234567"));
    }
}
