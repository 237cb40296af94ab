//! Opening a store: where it lives, its options, the key check that
//! refuses a wrong master key before anything is written, and the index
//! key the first opener creates.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::AnyBackend;
use crate::backend::Backend;
use crate::postgres::{PgBackend, PgOptions};
use crate::sled_backend::SledBackend;
use crate::tree::aad;
use crate::{Caches, CryptoError, KeyRing, OpenError, Store, StoreError, Tree};

pub(crate) const KEYCHECK_FILE: &str = "sidekey.keycheck";
/// What the key check seals: it opens only under the store's master key.
pub(crate) const CANARY: &[u8] = b"sidekey key check v1";

pub struct StoreOptions {
    pub flush_every_ms: u64,
    pub cache_ttl: Duration,
    pub cache_max_entries: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            flush_every_ms: 500,
            cache_ttl: Duration::from_secs(300),
            cache_max_entries: 100_000,
        }
    }
}

/// Whether a sled store exists at `path` (so a missing master key must not
/// be generated: a new key would not open it).
pub fn exists(path: &Path) -> bool {
    path.join(KEYCHECK_FILE).exists() || path.join("db").exists() || path.join("conf").exists()
}

/// Checks `keys` against a sled store's key-check file without opening sled.
pub fn check_key(path: &Path, keys: &KeyRing) -> Result<bool, OpenError> {
    let kc_path = path.join(KEYCHECK_FILE);
    let text = match std::fs::read_to_string(&kc_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(OpenError::Other(format!(
                "cannot read {}: {e}",
                kc_path.display()
            )));
        }
    };
    let kc: KeyCheck = serde_json::from_str(&text).map_err(|_| {
        OpenError::Other(format!(
            "{} is damaged (not the JSON sidekey writes); restore it from a backup",
            kc_path.display()
        ))
    })?;
    use base64::Engine;
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(&kc.canary)
        .map_err(|_| OpenError::Other(format!("{} is damaged", kc_path.display())))?;
    check_canary(keys, &sealed, &format!("the store at {}", path.display()))
}

/// Opens the key-check canary; a wrong key is [`OpenError::WrongKey`].
fn check_canary(keys: &KeyRing, sealed: &[u8], what: &str) -> Result<bool, OpenError> {
    match keys.open(b"keycheck", sealed) {
        Ok(o) if &o.plaintext[..] == CANARY => Ok(true),
        Ok(_) | Err(CryptoError::Tampered) | Err(CryptoError::Format) => {
            Err(OpenError::WrongKey(format!(
                "master key does not match {what} (the store's key check failed); set store.master_key_file / master_key_env to the key this store was created with"
            )))
        }
        Err(CryptoError::UnknownKey(id)) => Err(OpenError::WrongKey(format!(
            "master key (id {}) does not match {what}, which is sealed under key id {id}; set store.master_key_file / master_key_env to that key (or list it in store.previous_master_key_files during a rotation)",
            keys.current_id().hex(),
        ))),
    }
}

#[derive(Serialize, Deserialize)]
struct KeyCheck {
    format: u32,
    key_id: String,
    canary: String,
}

pub(crate) fn write_keycheck(path: &Path, keys: &KeyRing) -> std::io::Result<()> {
    use base64::Engine;
    let kc = KeyCheck {
        format: 1,
        key_id: keys.current_id().hex(),
        canary: base64::engine::general_purpose::STANDARD.encode(keys.seal(b"keycheck", CANARY)),
    };
    let tmp = path.join(format!("{KEYCHECK_FILE}.tmp"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(serde_json::to_string_pretty(&kc)?.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path.join(KEYCHECK_FILE))?;
    if let Ok(d) = std::fs::File::open(path) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Where the store lives, from the config.
pub enum Location {
    Sled(PathBuf),
    Postgres(PgOptions),
}

impl Store {
    /// Opens the configured backend.
    pub async fn open_at(
        loc: Location,
        keys: KeyRing,
        opts: StoreOptions,
    ) -> Result<Store, OpenError> {
        match loc {
            Location::Sled(p) => Store::open(&p, keys, opts),
            Location::Postgres(pg) => Store::open_postgres(pg, keys, opts).await,
        }
    }

    /// Opens (or creates) a sled store. A wrong master key is detected from
    /// the key-check file before sled opens, so the store is left untouched.
    pub fn open(path: &Path, keys: KeyRing, opts: StoreOptions) -> Result<Store, OpenError> {
        let has_check = check_key(path, &keys)?;
        if !has_check {
            if path.join("db").exists() || path.join("conf").exists() {
                return Err(OpenError::Other(format!(
                    "store at {} has no {KEYCHECK_FILE}; it was not created by sidekey or the file was deleted; restore it from a backup",
                    path.display()
                )));
            }
            std::fs::create_dir_all(path).map_err(|e| {
                OpenError::Other(format!(
                    "cannot create store directory {}: {e}",
                    path.display()
                ))
            })?;
            set_private_dir(path);
            write_keycheck(path, &keys).map_err(|e| {
                OpenError::Other(format!(
                    "cannot write {}: {e}",
                    path.join(KEYCHECK_FILE).display()
                ))
            })?;
        }
        let backend = SledBackend::open(path, opts.flush_every_ms)?;
        let keys = Arc::new(keys);
        // sled calls complete without awaiting anything: drive them here.
        let index_key = futures_util::FutureExt::now_or_never(meta_index_key(&backend, &keys))
            .expect("sled calls are synchronous")?;
        backend
            .flush_blocking()
            .map_err(|e| OpenError::Other(format!("cannot flush store: {e}")))?;
        Ok(Store {
            backend: AnyBackend::Sled(backend),
            keys,
            index_key,
            caches: Arc::new(Caches::new(opts.cache_ttl, opts.cache_max_entries, true)),
        })
    }

    /// Connects to PostgreSQL, applies the schema, and checks the master
    /// key against the database's key check (written by the first replica).
    pub async fn open_postgres(
        pg: PgOptions,
        keys: KeyRing,
        opts: StoreOptions,
    ) -> Result<Store, OpenError> {
        let caches = Arc::new(Caches::new(opts.cache_ttl, opts.cache_max_entries, false));
        let backend = PgBackend::open(pg, caches.clone()).await?;
        let keys = Arc::new(keys);
        let io = |e: StoreError| OpenError::Other(format!("cannot read the PostgreSQL store: {e}"));
        let fresh = keys.seal(&aad(Tree::Meta, b"keycheck"), CANARY);
        if !backend
            .cas(Tree::Meta, b"keycheck", None, Some(&fresh))
            .await
            .map_err(io)?
        {
            let sealed = backend
                .get(Tree::Meta, b"keycheck")
                .await
                .map_err(io)?
                .unwrap_or_default();
            check_pg_canary(&keys, &sealed)?;
        }
        let index_key = meta_index_key(&backend, &keys).await?;
        Ok(Store {
            backend: AnyBackend::Postgres(backend),
            keys,
            index_key,
            caches,
        })
    }
}

/// Opens a PostgreSQL store's key check (`Tree::Meta` `keycheck`, written
/// by the first replica); a wrong key is [`OpenError::WrongKey`] with the
/// fix. Shared by opening the store and by `check-config`'s read-only look.
pub(crate) fn check_pg_canary(keys: &KeyRing, sealed: &[u8]) -> Result<(), OpenError> {
    match keys.open(&aad(Tree::Meta, b"keycheck"), sealed) {
        Ok(o) if &o.plaintext[..] == CANARY => Ok(()),
        Err(CryptoError::UnknownKey(id)) => Err(OpenError::WrongKey(format!(
            "master key (id {}) does not match the PostgreSQL store, which is sealed under key id {id}; set store.master_key_file / master_key_env to that key (or list it in store.previous_master_key_files during a rotation)",
            keys.current_id().hex()
        ))),
        _ => Err(OpenError::WrongKey(
            "master key does not match the PostgreSQL store (its key check failed); set store.master_key_file / master_key_env to the key every replica uses".into(),
        )),
    }
}

/// The store's index key from meta, created by the first opener (a CAS, so
/// replicas starting together agree on one).
async fn meta_index_key<B: Backend>(
    backend: &B,
    keys: &KeyRing,
) -> Result<Zeroizing<Vec<u8>>, OpenError> {
    let a = aad(Tree::Meta, b"index_key");
    let io = |e: StoreError| OpenError::Other(format!("cannot read the store: {e}"));
    loop {
        if let Some(raw) = backend.get(Tree::Meta, b"index_key").await.map_err(io)? {
            return match keys.open(&a, &raw) {
                Ok(o) => {
                    if o.stale {
                        let new = keys.seal(&a, &o.plaintext);
                        let _ = backend
                            .cas(Tree::Meta, b"index_key", Some(&raw), Some(&new))
                            .await;
                    }
                    Ok(Zeroizing::new(o.plaintext.to_vec()))
                }
                Err(e) => Err(OpenError::WrongKey(format!(
                    "cannot open the store's index key ({e}); the master key does not match the store"
                ))),
            };
        }
        let mut k = vec![0u8; 32];
        rand::fill(&mut k[..]);
        let rec = keys.seal(&a, &k);
        if backend
            .cas(Tree::Meta, b"index_key", None, Some(&rec))
            .await
            .map_err(io)?
        {
            return Ok(Zeroizing::new(k));
        }
    }
}

#[cfg(unix)]
pub(crate) fn set_private_dir(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
}

#[cfg(not(unix))]
pub(crate) fn set_private_dir(_: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Owner;
    use crate::test_support::{cred, ring};

    #[tokio::test]
    async fn a_held_store_is_refused_and_a_closed_one_reopens_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        let held = Store::open(&p, ring(1), StoreOptions::default()).unwrap();
        let err = Store::open(&p, ring(1), StoreOptions::default()).unwrap_err();
        assert!(matches!(err, OpenError::Locked(_)), "{err}");
        assert!(
            err.to_string()
                .contains("in use by another sidekey process"),
            "{err}"
        );
        drop(held);
        // Closing while sled's I/O threads still write is the race CI hit:
        // write, drop and reopen straight away, many times over.
        for i in 0..30u64 {
            let s = Store::open(&p, ring(1), StoreOptions::default())
                .unwrap_or_else(|e| panic!("reopen {i}: {e}"));
            let mut c = cred(&format!("xoxb-{i}"));
            s.put_credential(&Owner::User("alice".into()), "slack", &mut c)
                .await
                .unwrap();
            assert_eq!(c.generation, i + 1);
        }
    }

    #[tokio::test]
    async fn wrong_key_refused_before_sled_opens() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        {
            let s = Store::open(&p, ring(1), StoreOptions::default()).unwrap();
            s.flush_blocking().unwrap();
        }
        let before: Vec<_> = std::fs::read_dir(&p)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name(), e.metadata().unwrap().len())
            })
            .collect();
        let err = Store::open(&p, ring(2), StoreOptions::default()).unwrap_err();
        assert!(matches!(err, OpenError::WrongKey(_)), "{err}");
        let after: Vec<_> = std::fs::read_dir(&p)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name(), e.metadata().unwrap().len())
            })
            .collect();
        assert_eq!(before, after);
    }
}
