//! Whole-store operations: re-sealing under a new master key, backing a
//! sled store up, and copying one store into another (`migrate-store`).

use std::path::Path;

use crate::AnyBackend;
use crate::backend::Backend;
use crate::open::{CANARY, KEYCHECK_FILE, set_private_dir, write_keycheck};
use crate::tree::aad;
use crate::{KeyRing, Op, Store, StoreError, Tree};

impl Store {
    /// Re-seals every record under `new_keys`' current key, in pages, then
    /// rewrites the key check. Safe to re-run after a crash: records
    /// already under the new key are opened with it and sealed again.
    pub async fn reseal_all(&self, new_keys: &KeyRing) -> Result<usize, StoreError> {
        let mut n = 0;
        for t in Tree::ALL.into_iter().filter(|t| t.sealed()) {
            let mut after: Option<Vec<u8>> = None;
            loop {
                let rows = self.backend.page(t, after.as_deref(), 500).await?;
                let Some((last, _)) = rows.last() else { break };
                after = Some(last.clone());
                let mut ops = Vec::with_capacity(rows.len());
                for (k, v) in rows {
                    if t == Tree::Meta && k == b"keycheck" {
                        continue;
                    }
                    let a = aad(t, &k);
                    let plain = match new_keys.open(&a, &v) {
                        Ok(o) => o.plaintext,
                        Err(_) => self.open_raw(t, &k, &v)?.plaintext,
                    };
                    ops.push(Op::Put(t, k, new_keys.seal(&a, &plain)));
                    n += 1;
                }
                self.batch(ops).await?;
            }
        }
        self.flush().await?;
        match &self.backend {
            AnyBackend::Sled(b) => write_keycheck(b.path(), new_keys)
                .map_err(|e| StoreError::Io(format!("cannot write the key check: {e}")))?,
            AnyBackend::Postgres(b) => {
                let sealed = new_keys.seal(&aad(Tree::Meta, b"keycheck"), CANARY);
                b.put(Tree::Meta, b"keycheck", &sealed).await?;
            }
        }
        self.caches.clear_all();
        Ok(n)
    }

    /// Writes a consistent, still-encrypted copy of a sled store to `out`
    /// (a new directory): every record as sealed bytes, plus the key check.
    pub fn backup_to(&self, out: &Path) -> Result<usize, String> {
        let AnyBackend::Sled(b) = &self.backend else {
            return Err(
                "backup copies sled stores; for PostgreSQL use pg_dump (a dump holds only ciphertext sealed under the master key)".into(),
            );
        };
        if out.exists()
            && std::fs::read_dir(out)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            return Err(format!(
                "{} already exists and is not empty; choose a new path",
                out.display()
            ));
        }
        std::fs::create_dir_all(out)
            .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
        set_private_dir(out);
        std::fs::copy(b.path().join(KEYCHECK_FILE), out.join(KEYCHECK_FILE))
            .map_err(|e| format!("cannot copy key check: {e}"))?;
        b.backup_to(out)
    }

    /// Copies every record of `from` into this store (`migrate-store`):
    /// sealed bytes as they are (the same master key and the same
    /// associated data), phone numbers re-indexed under this store's index
    /// key. A record the target already has is left as it is (it may be
    /// newer), so running it again only fills in what is missing. Returns
    /// records offered.
    pub async fn import_from(&self, from: &Store) -> Result<usize, StoreError> {
        let mut n = 0;
        let mut max_audit_id = 0;
        for t in Tree::ALL {
            if matches!(
                t,
                Tree::Meta
                    | Tree::Phones
                    | Tree::OAuthStates
                    | Tree::Tickets
                    | Tree::PendingConnect
            ) && !self.same_index_key(from)
            {
                // Keyed by the source's index hash: re-keyed below (phones)
                // or short-lived and left behind (states, tickets, codes).
                continue;
            }
            if t == Tree::Meta {
                continue;
            }
            let mut after: Option<Vec<u8>> = None;
            loop {
                let rows = from.backend.page(t, after.as_deref(), 500).await?;
                let Some((last, _)) = rows.last() else { break };
                after = Some(last.clone());
                n += rows.len();
                if t == Tree::Audit {
                    max_audit_id = rows
                        .iter()
                        .filter_map(|(k, _)| k.get(..8))
                        .map(|id| u64::from_be_bytes(id.try_into().unwrap_or([0; 8])))
                        .fold(max_audit_id, u64::max);
                }
                let ops = rows.into_iter().map(|(k, v)| Op::Insert(t, k, v)).collect();
                self.batch(ops).await?;
            }
        }
        // New audit batches must sort after the copied ones.
        if let AnyBackend::Postgres(b) = &self.backend {
            b.advance_ids(max_audit_id).await?;
        }
        if !self.same_index_key(from) {
            let mut after: Option<String> = None;
            loop {
                let users = from.profiles_page(after.as_deref(), 500).await?;
                let Some((last, _)) = users.last() else { break };
                after = Some(last.clone());
                let mut ops = Vec::new();
                for (user, profile) in users {
                    for phone in &profile.phone_numbers {
                        let k = self.index_hash(phone);
                        let v = self.seal_json(Tree::Phones, &k, &user);
                        ops.push(Op::Insert(Tree::Phones, k, v));
                        n += 1;
                    }
                }
                self.batch(ops).await?;
            }
        }
        self.flush().await?;
        self.caches.clear_all();
        Ok(n)
    }

    fn same_index_key(&self, other: &Store) -> bool {
        self.index_key[..] == other.index_key[..]
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::Backend;
    use crate::test_support::{contains, cred, read_all, ring};
    use crate::{KeyRing, MasterKey, OpenError, Owner, Store, StoreOptions, Tree};

    #[tokio::test]
    async fn rotation_and_lazy_reseal() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        let o = Owner::User("u".into());
        {
            let s = Store::open(&p, ring(1), StoreOptions::default()).unwrap();
            s.put_credential(&o, "g", &mut cred("tok-1")).await.unwrap();
            s.reseal_all(&ring(2)).await.unwrap();
        }
        assert!(matches!(
            Store::open(&p, ring(1), StoreOptions::default()),
            Err(OpenError::WrongKey(_))
        ));
        let s = Store::open(&p, ring(2), StoreOptions::default()).unwrap();
        assert_eq!(
            s.credential(&o, "g")
                .await
                .unwrap()
                .unwrap()
                .access_token
                .as_ref()
                .unwrap()
                .expose(),
            "tok-1"
        );
        drop(s);
        // Lazy: a store sealed under key 2, opened with 3 as current and 2
        // as previous, re-seals what it reads.
        let rot = KeyRing::new(
            MasterKey::from_bytes(&[3; 32]),
            vec![MasterKey::from_bytes(&[2; 32])],
        );
        let s = Store::open(&p, rot, StoreOptions::default()).unwrap();
        assert!(s.credential_uncached(&o, "g").await.unwrap().is_some());
        let raw = s
            .backend
            .get(Tree::Credentials, o.key("g").as_bytes())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            KeyRing::record_key_id(&raw),
            Some(MasterKey::from_bytes(&[3; 32]).id())
        );
    }

    #[tokio::test]
    async fn backup_is_openable_and_encrypted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        let out = dir.path().join("backup");
        let o = Owner::User("u".into());
        {
            let s = Store::open(&p, ring(1), StoreOptions::default()).unwrap();
            s.put_credential(&o, "g", &mut cred("secret-token-xyz"))
                .await
                .unwrap();
            assert!(s.backup_to(&out).unwrap() > 0);
        }
        assert!(!contains(&read_all(&out), b"secret-token-xyz"));
        let s = Store::open(&out, ring(1), StoreOptions::default()).unwrap();
        assert!(s.credential(&o, "g").await.unwrap().is_some());
    }
}
