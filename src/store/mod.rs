//! The encrypted store: credentials, sessions, users, OAuth states and the
//! audit log in sled, every value sealed under the master key.
//!
//! Keys are plain (user ids, provider names, session ids, conversation ids);
//! values are ciphertext. Phone numbers are indexed by a keyed hash so a
//! stolen disk does not list who calls from where. A key-check file beside
//! sled's own files lets start-up refuse a wrong master key before sled
//! touches anything.

mod cache;
pub mod crypto;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

pub use cache::Cache;

/// Decrypted credentials by record key.
pub type CredentialCache = Cache<Credential>;
pub use crypto::{CryptoError, KeyId, KeyRing, MasterKey};

use crate::secret::Secret;

/// A user's (or tenant's, or the app's) credential for one provider.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Credential {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Secret>,
    /// Unix seconds; `None` when the provider gave no lifetime.
    #[serde(default)]
    pub expires_at: Option<i64>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// Set when the token endpoint refused the refresh token: no further
    /// refresh is attempted until the credential is replaced.
    #[serde(default)]
    pub reauth_required: bool,
    #[serde(default)]
    pub updated_at: i64,
    /// Bumped on every write, so a request can tell whether the credential
    /// it used has been replaced since.
    #[serde(default)]
    pub generation: u64,
}

impl Credential {
    /// `active`, `expired` or `reauth_required`.
    pub fn status(&self, now: i64) -> &'static str {
        if self.reauth_required {
            "reauth_required"
        } else if self.expires_at.is_some_and(|e| e <= now) {
            "expired"
        } else {
            "active"
        }
    }
}

/// Whose credential: a user's own, a tenant's shared one, or the app-level
/// token of a client-credentials provider.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    User(String),
    Tenant(String),
    App,
}

impl Owner {
    fn prefix(&self) -> String {
        match self {
            Owner::User(u) => format!("u/{u}/"),
            Owner::Tenant(t) => format!("t/{t}/"),
            Owner::App => "a/".into(),
        }
    }

    pub fn key(&self, provider: &str) -> String {
        let mut k = self.prefix();
        k.push_str(provider);
        k
    }

    pub fn describe(&self) -> String {
        match self {
            Owner::User(u) => format!("user {u}"),
            Owner::Tenant(t) => format!("tenant {t}"),
            Owner::App => "app".into(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionRecord {
    pub user: String,
    pub providers: Vec<String>,
    pub iat: i64,
    pub exp: i64,
    #[serde(default)]
    pub conv: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserProfile {
    #[serde(default)]
    pub phone_numbers: Vec<String>,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub updated_at: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OAuthState {
    pub user: String,
    pub provider: String,
    pub verifier: Secret,
    pub return_to: Option<String>,
    pub redirect_uri: String,
    pub expires_at: i64,
}

/// One audit entry: who did what, when. Never a token or a body.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditRecord {
    /// Unix milliseconds.
    pub time: i64,
    /// `proxy`, `admin`, `refresh`, `oauth`, `webhook`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    pub method: String,
    /// Path without query string.
    pub path: String,
    pub status: u16,
    pub duration_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    /// sidekey's error code when it answered with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O: {0}")]
    Sled(#[from] sled::Error),
    #[error("store record {key}: {err}")]
    Crypto { key: String, err: CryptoError },
    #[error("store record {0} is not valid JSON")]
    Decode(String),
}

#[derive(Debug, PartialEq, Eq)]
pub enum BindOutcome {
    /// The session is (now, or already) bound to this conversation.
    Bound,
    /// It is bound to a different conversation.
    Mismatch,
    /// The session no longer exists.
    Gone,
}

#[derive(Debug, PartialEq, Eq)]
pub enum PutUserError {
    PhoneTaken { phone: String, user: String },
}

const KEYCHECK_FILE: &str = "sidekey.keycheck";
/// Audit records per sealed sled value.
pub const AUDIT_BATCH: usize = 128;
const CANARY: &[u8] = b"sidekey key check v1";

#[derive(Serialize, Deserialize)]
struct KeyCheck {
    format: u32,
    key_id: String,
    canary: String,
}

/// A sled tree whose values are sealed records; the AAD is `tree/key`.
#[derive(Clone)]
struct Sealed {
    name: &'static str,
    tree: sled::Tree,
}

/// Decrypted bytes that a caller deserialises; reports staleness so the
/// caller can re-seal under the current key.
struct Plain {
    bytes: Zeroizing<Vec<u8>>,
    stale: bool,
    raw: sled::IVec,
}

pub struct Store {
    db: sled::Db,
    path: PathBuf,
    keys: Arc<KeyRing>,
    credentials: Sealed,
    sessions: Sealed,
    users: Sealed,
    phones: Sealed,
    oauth_states: Sealed,
    audit: Sealed,
    meta: Sealed,
    /// `<conv>\0<sid>` → empty: sessions of a conversation without a scan.
    conv_index: sled::Tree,
    /// `<user>\0<sid>` → empty: sessions of a user, for user deletion.
    user_sessions: sled::Tree,
    /// `<exp big-endian>\0<sid>` → empty: expired sessions in order, for GC.
    session_expiry: sled::Tree,
    /// Keyed hash for the phone index; random per store, kept sealed in meta.
    index_key: Zeroizing<Vec<u8>>,
    cache: CredentialCache,
    /// Session records by id: every proxied call reads one. Invalidated by
    /// every session write, so revocation is still immediate.
    session_cache: Cache<SessionRecord>,
    /// Records in the audit tree: counted once (from the batch keys), then
    /// tracked by `append_audit_json` (sled's `len` is a full scan).
    audit_len: std::sync::Mutex<Option<usize>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    WrongKey(String),
    #[error("{0}")]
    Locked(String),
    #[error("{0}")]
    Other(String),
}

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

/// Whether a store exists at `path` (so a missing master key must not be
/// generated: a new key would not open it).
pub fn exists(path: &Path) -> bool {
    path.join(KEYCHECK_FILE).exists() || path.join("db").exists() || path.join("conf").exists()
}

/// Checks `keys` against the key-check file without opening sled.
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
    match keys.open(b"keycheck", &sealed) {
        Ok(o) if &o.plaintext[..] == CANARY => Ok(true),
        Ok(_) | Err(CryptoError::Tampered) | Err(CryptoError::Format) => {
            Err(OpenError::WrongKey(format!(
                "master key does not match the store at {} (the store's key check failed); set store.master_key_file / master_key_env to the key this store was created with",
                path.display()
            )))
        }
        Err(CryptoError::UnknownKey(id)) => Err(OpenError::WrongKey(format!(
            "master key (id {}) does not match the store at {}, which is sealed under key id {id}; set store.master_key_file / master_key_env to that key (or list it in store.previous_master_key_files during a rotation)",
            keys.current_id().hex(),
            path.display()
        ))),
    }
}

fn write_keycheck(path: &Path, keys: &KeyRing) -> std::io::Result<()> {
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

impl Sealed {
    fn aad(&self, key: &[u8]) -> Vec<u8> {
        let mut a = Vec::with_capacity(self.name.len() + 1 + key.len());
        a.extend_from_slice(self.name.as_bytes());
        a.push(b'/');
        a.extend_from_slice(key);
        a
    }

    fn get(&self, keys: &KeyRing, key: &[u8]) -> Result<Option<Plain>, StoreError> {
        let Some(raw) = self.tree.get(key)? else {
            return Ok(None);
        };
        self.open(keys, key, raw).map(Some)
    }

    fn open(&self, keys: &KeyRing, key: &[u8], raw: sled::IVec) -> Result<Plain, StoreError> {
        let o = keys
            .open(&self.aad(key), &raw)
            .map_err(|err| StoreError::Crypto {
                key: format!("{}/{}", self.name, String::from_utf8_lossy(key)),
                err,
            })?;
        Ok(Plain {
            bytes: o.plaintext,
            stale: o.stale,
            raw,
        })
    }

    fn seal(&self, keys: &KeyRing, key: &[u8], plain: &[u8]) -> Vec<u8> {
        keys.seal(&self.aad(key), plain)
    }

    fn put<T: Serialize>(&self, keys: &KeyRing, key: &[u8], value: &T) -> Result<(), StoreError> {
        let plain = Zeroizing::new(serde_json::to_vec(value).expect("serialisable"));
        self.tree.insert(key, self.seal(keys, key, &plain))?;
        Ok(())
    }

    fn decode<T: DeserializeOwned>(&self, key: &[u8], p: &Plain) -> Result<T, StoreError> {
        serde_json::from_slice(&p.bytes).map_err(|_| {
            StoreError::Decode(format!("{}/{}", self.name, String::from_utf8_lossy(key)))
        })
    }

    /// Re-seals a record read under an old key, unless it changed meanwhile.
    fn reseal_if_stale(&self, keys: &KeyRing, key: &[u8], p: &Plain) {
        if p.stale {
            let new = self.seal(keys, key, &p.bytes);
            let _ = self.tree.compare_and_swap(key, Some(&p.raw), Some(new));
        }
    }

    fn get_as<T: DeserializeOwned>(
        &self,
        keys: &KeyRing,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match self.get(keys, key)? {
            None => Ok(None),
            Some(p) => {
                let v = self.decode(key, &p)?;
                self.reseal_if_stale(keys, key, &p);
                Ok(Some(v))
            }
        }
    }
}

impl Store {
    /// Opens (or creates) the store. A wrong master key is detected from the
    /// key-check file before sled opens, so the store is left untouched.
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
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(Some(opts.flush_every_ms))
            // sled's page cache defaults to 1 GiB and fills with audit pages
            // under load (peak RSS 191 MiB in a 60 s soak before this cap).
            // Credentials and sessions have their own caches.
            .cache_capacity(16 * 1024 * 1024)
            .open()
            .map_err(|e| {
                let msg = e.to_string();
                if msg.contains("lock")
                    || msg.contains("WouldBlock")
                    || msg.contains("temporarily unavailable")
                {
                    OpenError::Locked(format!(
                        "store at {} is in use by another sidekey process",
                        path.display()
                    ))
                } else {
                    OpenError::Other(format!("cannot open store at {}: {msg}", path.display()))
                }
            })?;
        let keys = Arc::new(keys);
        let tree = |name: &'static str| -> Result<sled::Tree, OpenError> {
            db.open_tree(name)
                .map_err(|e| OpenError::Other(format!("cannot open store tree {name}: {e}")))
        };
        let sealed = |name: &'static str| -> Result<Sealed, OpenError> {
            Ok(Sealed {
                name,
                tree: tree(name)?,
            })
        };
        let meta = sealed("meta")?;
        let index_key = match meta.get(&keys, b"index_key") {
            Ok(Some(p)) => {
                meta.reseal_if_stale(&keys, b"index_key", &p);
                Zeroizing::new(p.bytes.to_vec())
            }
            Ok(None) => {
                let mut k = vec![0u8; 32];
                rand::fill(&mut k[..]);
                let rec = meta.seal(&keys, b"index_key", &k);
                meta.tree
                    .insert(b"index_key", rec)
                    .map_err(|e| OpenError::Other(format!("cannot write store: {e}")))?;
                db.flush()
                    .map_err(|e| OpenError::Other(format!("cannot flush store: {e}")))?;
                Zeroizing::new(k)
            }
            Err(e) => {
                return Err(OpenError::WrongKey(format!(
                    "cannot open the store's index key ({e}); the master key does not match the store at {}",
                    path.display()
                )));
            }
        };
        Ok(Store {
            credentials: sealed("credentials")?,
            sessions: sealed("sessions")?,
            users: sealed("users")?,
            phones: sealed("phones")?,
            oauth_states: sealed("oauth_states")?,
            audit: sealed("audit")?,
            meta,
            conv_index: tree("conv_index")?,
            user_sessions: tree("user_sessions")?,
            session_expiry: tree("session_expiry")?,
            index_key,
            cache: CredentialCache::new(opts.cache_ttl, opts.cache_max_entries),
            session_cache: Cache::new(opts.cache_ttl, opts.cache_max_entries),
            audit_len: std::sync::Mutex::new(None),
            db,
            path: path.to_path_buf(),
            keys,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn key_id(&self) -> KeyId {
        self.keys.current_id()
    }

    /// Makes every write so far durable. Admin writes and refreshed tokens
    /// call this before anyone is told the write happened.
    pub async fn flush(&self) -> Result<(), StoreError> {
        // Not sled's `flush_async`: in sled 0.34 concurrent calls park every
        // sled I/O thread waiting for a log write that needs one of those
        // same threads, and the whole store hangs (spacejam/sled#1308; ~8
        // concurrent admin writes were enough here). A blocking flush on
        // tokio's blocking pool waits without holding a sled I/O thread.
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|_| {
                StoreError::Sled(sled::Error::ReportableBug("store flush task failed".into()))
            })??;
        Ok(())
    }

    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    // ----- credentials -----------------------------------------------------

    /// The credential, from the memory cache when fresh.
    pub fn credential(
        &self,
        owner: &Owner,
        provider: &str,
    ) -> Result<Option<Arc<Credential>>, StoreError> {
        let key = owner.key(provider);
        match self.cache.get(&key) {
            Ok(c) => Ok(Some(c)),
            Err(epoch) => {
                let c = self
                    .credentials
                    .get_as::<Credential>(&self.keys, key.as_bytes())?;
                Ok(c.map(|c| {
                    let c = Arc::new(c);
                    self.cache.insert(&key, c.clone(), epoch);
                    c
                }))
            }
        }
    }

    /// The credential as on disk, bypassing the cache (refresh decisions).
    pub fn credential_uncached(
        &self,
        owner: &Owner,
        provider: &str,
    ) -> Result<Option<Credential>, StoreError> {
        let key = owner.key(provider);
        self.credentials.get_as(&self.keys, key.as_bytes())
    }

    /// Writes a credential (not yet durable: call [`flush`]). The generation
    /// is set to one past whatever is stored.
    pub fn put_credential(
        &self,
        owner: &Owner,
        provider: &str,
        cred: &mut Credential,
    ) -> Result<(), StoreError> {
        let key = owner.key(provider);
        let prev = self
            .credentials
            .get_as::<Credential>(&self.keys, key.as_bytes())
            .ok()
            .flatten()
            .map(|c| c.generation)
            .unwrap_or(0);
        cred.generation = cred.generation.max(prev) + 1;
        self.credentials.put(&self.keys, key.as_bytes(), cred)?;
        self.cache.invalidate(&key);
        Ok(())
    }

    pub fn delete_credential(&self, owner: &Owner, provider: &str) -> Result<bool, StoreError> {
        let key = owner.key(provider);
        let existed = self.credentials.tree.remove(key.as_bytes())?.is_some();
        self.cache.invalidate(&key);
        Ok(existed)
    }

    /// Every credential of an owner, by provider name.
    pub fn list_credentials(&self, owner: &Owner) -> Result<Vec<(String, Credential)>, StoreError> {
        let prefix = owner.prefix();
        let mut out = Vec::new();
        for item in self.credentials.tree.scan_prefix(prefix.as_bytes()) {
            let (k, v) = item?;
            let p = self.credentials.open(&self.keys, &k, v)?;
            let c: Credential = self.credentials.decode(&k, &p)?;
            let provider = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.push((provider, c));
        }
        Ok(out)
    }

    pub fn credential_count(&self) -> usize {
        self.credentials.tree.len()
    }

    // ----- sessions --------------------------------------------------------

    pub fn put_session(&self, sid: &str, rec: &SessionRecord) -> Result<(), StoreError> {
        self.sessions.put(&self.keys, sid.as_bytes(), rec)?;
        self.session_cache.invalidate(sid);
        self.user_sessions.insert(join0(&rec.user, sid), &[])?;
        self.session_expiry.insert(expiry_key(rec.exp, sid), &[])?;
        if let Some(conv) = &rec.conv {
            self.conv_index.insert(join0(conv, sid), &[])?;
        }
        Ok(())
    }

    pub fn session(&self, sid: &str) -> Result<Option<Arc<SessionRecord>>, StoreError> {
        match self.session_cache.get(sid) {
            Ok(r) => Ok(Some(r)),
            Err(epoch) => {
                let r = self
                    .sessions
                    .get_as::<SessionRecord>(&self.keys, sid.as_bytes())?;
                Ok(r.map(|r| {
                    let r = Arc::new(r);
                    self.session_cache.insert(sid, r.clone(), epoch);
                    r
                }))
            }
        }
    }

    /// Binds an unbound session to a conversation, atomically: of two
    /// concurrent first calls with different ids exactly one wins.
    pub fn bind_session(&self, sid: &str, conv: &str) -> Result<BindOutcome, StoreError> {
        loop {
            let Some(p) = self.sessions.get(&self.keys, sid.as_bytes())? else {
                return Ok(BindOutcome::Gone);
            };
            let mut rec: SessionRecord = self.sessions.decode(sid.as_bytes(), &p)?;
            match &rec.conv {
                Some(c) if c == conv => return Ok(BindOutcome::Bound),
                Some(_) => return Ok(BindOutcome::Mismatch),
                None => {}
            }
            rec.conv = Some(conv.to_owned());
            let plain = Zeroizing::new(serde_json::to_vec(&rec).expect("serialisable"));
            let new = self.sessions.seal(&self.keys, sid.as_bytes(), &plain);
            // Index first: a dangling index entry is harmless, a missing one
            // would let post-call revocation miss this session.
            self.conv_index.insert(join0(conv, sid), &[])?;
            match self
                .sessions
                .tree
                .compare_and_swap(sid.as_bytes(), Some(&p.raw), Some(new))?
            {
                Ok(()) => {
                    self.session_cache.invalidate(sid);
                    return Ok(BindOutcome::Bound);
                }
                Err(_) => {
                    self.conv_index.remove(join0(conv, sid))?;
                    continue;
                }
            }
        }
    }

    /// Deletes a session and its index entries. Returns whether it existed.
    pub fn revoke_session(&self, sid: &str) -> Result<bool, StoreError> {
        let rec = match self.session(sid) {
            Ok(r) => r,
            // A record that no longer opens is revoked all the same.
            Err(StoreError::Crypto { .. }) | Err(StoreError::Decode(_)) => None,
            Err(e) => return Err(e),
        };
        let existed = self.sessions.tree.remove(sid.as_bytes())?.is_some();
        // After the removal: a reader that loaded the record before it
        // cannot cache it any more.
        self.session_cache.invalidate(sid);
        if let Some(rec) = rec {
            self.user_sessions.remove(join0(&rec.user, sid))?;
            self.session_expiry.remove(expiry_key(rec.exp, sid))?;
            if let Some(conv) = &rec.conv {
                self.conv_index.remove(join0(conv, sid))?;
            }
        }
        Ok(existed)
    }

    /// Session ids bound to a conversation (index lookup, no scan).
    pub fn sessions_for_conversation(&self, conv: &str) -> Result<Vec<String>, StoreError> {
        prefix_ids(&self.conv_index, conv)
    }

    pub fn sessions_for_user(&self, user: &str) -> Result<Vec<String>, StoreError> {
        prefix_ids(&self.user_sessions, user)
    }

    /// Removes sessions that expired before `now`; returns how many.
    pub fn gc_sessions(&self, now: i64) -> Result<usize, StoreError> {
        let mut n = 0;
        let end = (now.max(0) as u64).to_be_bytes();
        let expired: Vec<sled::IVec> = self
            .session_expiry
            .range(..&end[..])
            .keys()
            .collect::<Result<_, _>>()?;
        for k in expired {
            let sid = String::from_utf8_lossy(&k[9..]).into_owned();
            if self.revoke_session(&sid)? {
                n += 1;
            }
            self.session_expiry.remove(&k)?;
        }
        Ok(n)
    }

    pub fn session_count(&self) -> usize {
        self.sessions.tree.len()
    }

    // ----- users -----------------------------------------------------------

    fn phone_key(&self, e164: &str) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.index_key).expect("any key size");
        mac.update(e164.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    pub fn user(&self, user: &str) -> Result<Option<UserProfile>, StoreError> {
        self.users.get_as(&self.keys, user.as_bytes())
    }

    /// User ids with a profile or a credential, ascending, strictly after
    /// `after`, at most `limit`. Reads record keys only (nothing decrypted).
    pub fn list_users(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        use std::collections::BTreeSet;
        use std::ops::Bound;
        let after = after.unwrap_or("");
        let beyond = |u: &str| u > after;
        let mut ids = BTreeSet::new();
        let from = Bound::Excluded(after.as_bytes().to_vec());
        for k in self.users.tree.range((from, Bound::Unbounded)).keys() {
            if ids.len() >= limit {
                break;
            }
            ids.insert(String::from_utf8_lossy(&k?).into_owned());
        }
        // Credential keys are `u/<user>/<provider>`. Every user after
        // `after` has a key at or above `u/<after>`. Key order is user order
        // except that '+', '-' and '.' sort before '/': a key after user
        // `w`'s can only belong to a user above `w` or to a proper prefix of
        // `w` cut just before one of those characters. So once `limit`
        // users below `w` are known, those prefixes are looked up directly
        // and the scan stops.
        let start = format!("u/{after}");
        for k in self.credentials.tree.range(start.as_bytes()..).keys() {
            let k = k?;
            let Some(rest) = k.strip_prefix(b"u/") else {
                break;
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
                        if self
                            .credentials
                            .tree
                            .scan_prefix(key.as_bytes())
                            .next()
                            .is_some()
                        {
                            ids.insert(v.to_owned());
                        }
                    }
                }
                break;
            }
            ids.insert(u);
        }
        Ok(ids.into_iter().take(limit).collect())
    }

    /// Stores a profile and re-points its phone numbers. A number that
    /// belongs to another user is refused, and nothing changes.
    pub fn put_user(
        &self,
        user: &str,
        profile: &UserProfile,
    ) -> Result<Result<(), PutUserError>, StoreError> {
        for phone in &profile.phone_numbers {
            if let Some(owner) = self.user_by_phone(phone)? {
                if owner != user {
                    return Ok(Err(PutUserError::PhoneTaken {
                        phone: phone.clone(),
                        user: owner,
                    }));
                }
            }
        }
        if let Some(old) = self.user(user)? {
            for phone in old.phone_numbers {
                if !profile.phone_numbers.contains(&phone) {
                    self.phones.tree.remove(self.phone_key(&phone))?;
                }
            }
        }
        for phone in &profile.phone_numbers {
            let k = self.phone_key(phone);
            self.phones.put(&self.keys, &k, &user)?;
        }
        self.users.put(&self.keys, user.as_bytes(), profile)?;
        Ok(Ok(()))
    }

    pub fn user_by_phone(&self, e164: &str) -> Result<Option<String>, StoreError> {
        let k = self.phone_key(e164);
        self.phones.get_as(&self.keys, &k)
    }

    /// Removes a user's credentials, sessions, phone numbers and profile.
    /// Returns how many sessions were revoked.
    pub fn delete_user(&self, user: &str) -> Result<usize, StoreError> {
        let owner = Owner::User(user.to_owned());
        for (provider, _) in self.list_credentials(&owner).unwrap_or_default() {
            self.delete_credential(&owner, &provider)?;
        }
        // Records that no longer decrypt are removed too.
        let prefix = owner.prefix();
        for k in self.credentials.tree.scan_prefix(prefix.as_bytes()).keys() {
            let k = k?;
            self.credentials.tree.remove(&k)?;
            self.cache.invalidate(&String::from_utf8_lossy(&k));
        }
        let mut revoked = 0;
        for sid in self.sessions_for_user(user)? {
            if self.revoke_session(&sid)? {
                revoked += 1;
            }
            self.user_sessions.remove(join0(user, &sid))?;
        }
        if let Some(profile) = self.user(user)? {
            for phone in profile.phone_numbers {
                self.phones.tree.remove(self.phone_key(&phone))?;
            }
        }
        self.users.tree.remove(user.as_bytes())?;
        Ok(revoked)
    }

    // ----- OAuth states ----------------------------------------------------

    pub fn put_oauth_state(&self, state: &str, rec: &OAuthState) -> Result<(), StoreError> {
        self.oauth_states.put(&self.keys, state.as_bytes(), rec)
    }

    /// Removes and returns a state: each state is usable exactly once.
    pub fn take_oauth_state(&self, state: &str) -> Result<Option<OAuthState>, StoreError> {
        let Some(raw) = self.oauth_states.tree.remove(state.as_bytes())? else {
            return Ok(None);
        };
        let p = self.oauth_states.open(&self.keys, state.as_bytes(), raw)?;
        Ok(Some(self.oauth_states.decode(state.as_bytes(), &p)?))
    }

    /// Drops OAuth states that expired before `now`.
    pub fn gc_oauth_states(&self, now: i64) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.oauth_states.tree.iter() {
            let (k, v) = item?;
            let expired = match self.oauth_states.open(&self.keys, &k, v) {
                Ok(p) => self
                    .oauth_states
                    .decode::<OAuthState>(&k, &p)
                    .map(|s| s.expires_at < now)
                    .unwrap_or(true),
                Err(_) => true,
            };
            if expired {
                self.oauth_states.tree.remove(&k)?;
                n += 1;
            }
        }
        Ok(n)
    }

    // ----- audit -----------------------------------------------------------

    /// Opens one audit batch (a sealed JSON array of records).
    fn audit_batch(&self, k: &[u8], v: sled::IVec) -> Result<Vec<AuditRecord>, StoreError> {
        let p = self.audit.open(&self.keys, k, v)?;
        self.audit.decode(k, &p)
    }

    /// Audit keys are `<id: 8 bytes BE><records in the batch: 2 bytes BE>`,
    /// so counting and trimming never decrypt a batch.
    fn audit_key(id: u64, n: usize) -> [u8; 10] {
        let mut k = [0u8; 10];
        k[..8].copy_from_slice(&id.to_be_bytes());
        k[8..].copy_from_slice(&(n.min(u16::MAX as usize) as u16).to_be_bytes());
        k
    }

    fn audit_key_count(k: &[u8]) -> usize {
        if k.len() == 10 {
            u16::from_be_bytes([k[8], k[9]]) as usize
        } else {
            0
        }
    }

    /// Appends typed records (tests; the audit writer hands over JSON).
    #[cfg(test)]
    pub fn append_audit(
        &self,
        records: &[AuditRecord],
        max_records: usize,
    ) -> Result<(), StoreError> {
        let chunks: Vec<(Vec<u8>, usize)> = records
            .chunks(AUDIT_BATCH)
            .map(|c| (serde_json::to_vec(c).expect("serialisable"), c.len()))
            .collect();
        self.append_audit_json(&chunks, max_records)
    }

    /// Appends batches that are already JSON arrays (`(json, records)`), as
    /// the audit writer builds them, sealing each as one sled value.
    ///
    /// A sealed batch per value (not a record per key) keeps writing cheap,
    /// and small values (≤ [`AUDIT_BATCH`] records) keep sled economical.
    pub fn append_audit_json(
        &self,
        chunks: &[(Vec<u8>, usize)],
        max_records: usize,
    ) -> Result<(), StoreError> {
        let mut count = self.audit_len.lock().unwrap_or_else(|e| e.into_inner());
        let mut len = match *count {
            Some(n) => n,
            None => {
                let mut n = 0;
                for k in self.audit.tree.iter().keys() {
                    n += Store::audit_key_count(&k?);
                }
                n
            }
        };
        // Kept current on every exit, errors included.
        let result = (|| {
            for (json, n) in chunks {
                if *n == 0 {
                    continue;
                }
                let key = Store::audit_key(self.db.generate_id()?, *n);
                self.audit
                    .tree
                    .insert(key, self.audit.seal(&self.keys, &key, json))?;
                len += n;
            }
            while len > max_records {
                let Some((k, v)) = self.audit.tree.first()? else {
                    len = 0;
                    break;
                };
                let n = Store::audit_key_count(&k);
                let excess = len - max_records;
                if n <= excess {
                    self.audit.tree.remove(&k)?;
                    len -= n;
                } else {
                    // Keep the newest part of the oldest batch, under a key
                    // that counts what is left.
                    let batch = self.audit_batch(&k, v).unwrap_or_default();
                    let kept = &batch[excess.min(batch.len())..];
                    let id = u64::from_be_bytes(k[..8].try_into().unwrap_or([0; 8]));
                    let key = Store::audit_key(id, kept.len());
                    self.audit.put(&self.keys, &key, &kept)?;
                    self.audit.tree.remove(&k)?;
                    len -= n - kept.len();
                }
            }
            Ok(())
        })();
        *count = Some(len);
        result
    }

    /// Newest first, optionally only one user's.
    pub fn recent_audit(
        &self,
        user: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let mut out = Vec::new();
        'batches: for item in self.audit.tree.iter().rev() {
            let (k, v) = item?;
            for r in self.audit_batch(&k, v)?.into_iter().rev() {
                if out.len() >= limit {
                    break 'batches;
                }
                if user.is_none_or(|u| r.user.as_deref() == Some(u)) {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    // ----- operations ------------------------------------------------------

    /// Re-seals every record under `new_keys`' current key, then rewrites
    /// the key check. Safe to re-run after a crash: records already under
    /// the new key are opened with it and sealed again.
    pub fn reseal_all(&self, new_keys: &KeyRing) -> Result<usize, StoreError> {
        let mut n = 0;
        for t in [
            &self.credentials,
            &self.sessions,
            &self.users,
            &self.phones,
            &self.oauth_states,
            &self.audit,
            &self.meta,
        ] {
            for item in t.tree.iter() {
                let (k, v) = item?;
                let plain = match new_keys.open(&t.aad(&k), &v) {
                    Ok(o) => o.plaintext,
                    Err(_) => t.open(&self.keys, &k, v)?.bytes,
                };
                t.tree.insert(&k, new_keys.seal(&t.aad(&k), &plain))?;
                n += 1;
            }
        }
        self.db.flush()?;
        write_keycheck(&self.path, new_keys).map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        self.cache.clear();
        Ok(n)
    }

    /// Writes a consistent, still-encrypted copy of the store to `out`
    /// (a new directory): every record as sealed bytes, plus the key check.
    pub fn backup_to(&self, out: &Path) -> Result<usize, String> {
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
        std::fs::copy(self.path.join(KEYCHECK_FILE), out.join(KEYCHECK_FILE))
            .map_err(|e| format!("cannot copy key check: {e}"))?;
        let copy = sled::Config::new()
            .path(out)
            .open()
            .map_err(|e| format!("cannot create backup store at {}: {e}", out.display()))?;
        let mut n = 0;
        for name in self.db.tree_names() {
            let src = self.db.open_tree(&name).map_err(|e| e.to_string())?;
            let dst = copy.open_tree(&name).map_err(|e| e.to_string())?;
            // A batch per tree: the copy of each tree is applied atomically.
            let mut batch = sled::Batch::default();
            for item in src.iter() {
                let (k, v) = item.map_err(|e| e.to_string())?;
                batch.insert(k, v);
                n += 1;
            }
            dst.apply_batch(batch).map_err(|e| e.to_string())?;
        }
        copy.flush()
            .map_err(|e| format!("cannot flush backup: {e}"))?;
        Ok(n)
    }
}

fn join0(a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + 1 + b.len());
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

fn expiry_key(exp: i64, sid: &str) -> Vec<u8> {
    let mut k = (exp.max(0) as u64).to_be_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(sid.as_bytes());
    k
}

fn prefix_ids(tree: &sled::Tree, prefix: &str) -> Result<Vec<String>, StoreError> {
    let mut p = prefix.as_bytes().to_vec();
    p.push(0);
    let mut out = Vec::new();
    for k in tree.scan_prefix(&p).keys() {
        let k = k?;
        out.push(String::from_utf8_lossy(&k[p.len()..]).into_owned());
    }
    Ok(out)
}

#[cfg(unix)]
fn set_private_dir(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
}

#[cfg(not(unix))]
fn set_private_dir(_: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(b: u8) -> KeyRing {
        KeyRing::new(MasterKey::from_bytes(&[b; 32]), vec![])
    }

    fn cred(tok: &str) -> Credential {
        Credential {
            access_token: Some(Secret::new(tok)),
            refresh_token: Some(Secret::new(format!("{tok}-refresh"))),
            expires_at: Some(2_000_000_000),
            ..Default::default()
        }
    }

    #[test]
    fn credentials_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        {
            let s = Store::open(&p, ring(1), StoreOptions::default()).unwrap();
            let mut c = cred("xoxb-1");
            s.put_credential(&Owner::User("alice".into()), "slack", &mut c)
                .unwrap();
            assert_eq!(c.generation, 1);
            s.flush_blocking().unwrap();
        }
        let s = Store::open(&p, ring(1), StoreOptions::default()).unwrap();
        let c = s
            .credential(&Owner::User("alice".into()), "slack")
            .unwrap()
            .unwrap();
        assert_eq!(c.access_token.as_ref().unwrap().expose(), "xoxb-1");
        let list = s.list_credentials(&Owner::User("alice".into())).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].0, "slack");
    }

    #[test]
    fn wrong_key_refused_before_sled_opens() {
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

    #[test]
    fn generations_increase_and_cache_sees_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db"), ring(1), StoreOptions::default()).unwrap();
        let o = Owner::User("u".into());
        s.put_credential(&o, "g", &mut cred("a")).unwrap();
        assert_eq!(s.credential(&o, "g").unwrap().unwrap().generation, 1);
        s.put_credential(&o, "g", &mut cred("b")).unwrap();
        let c = s.credential(&o, "g").unwrap().unwrap();
        assert_eq!(c.generation, 2);
        assert_eq!(c.access_token.as_ref().unwrap().expose(), "b");
        assert!(s.delete_credential(&o, "g").unwrap());
        assert!(s.credential(&o, "g").unwrap().is_none());
    }

    #[test]
    fn sessions_bind_once_and_index_by_conversation() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db"), ring(1), StoreOptions::default()).unwrap();
        let rec = SessionRecord {
            user: "u".into(),
            providers: vec!["slack".into()],
            iat: 1,
            exp: 100,
            conv: None,
        };
        s.put_session("s1", &rec).unwrap();
        assert_eq!(s.bind_session("s1", "c1").unwrap(), BindOutcome::Bound);
        assert_eq!(s.bind_session("s1", "c1").unwrap(), BindOutcome::Bound);
        assert_eq!(s.bind_session("s1", "c2").unwrap(), BindOutcome::Mismatch);
        assert_eq!(s.sessions_for_conversation("c1").unwrap(), vec!["s1"]);
        assert!(s.sessions_for_conversation("c").unwrap().is_empty());
        assert!(s.revoke_session("s1").unwrap());
        assert!(s.sessions_for_conversation("c1").unwrap().is_empty());
        assert_eq!(s.bind_session("s1", "c1").unwrap(), BindOutcome::Gone);
    }

    #[test]
    fn gc_removes_only_expired() {
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
            .unwrap();
        }
        assert_eq!(s.gc_sessions(25).unwrap(), 2);
        assert!(s.session("a").unwrap().is_none());
        assert!(s.session("c").unwrap().is_some());
        assert_eq!(s.sessions_for_user("u").unwrap(), vec!["c"]);
    }

    #[test]
    fn phones_are_unique_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        let s = Store::open(&p, ring(1), StoreOptions::default()).unwrap();
        let prof = UserProfile {
            phone_numbers: vec!["+15551234567".into()],
            tenant: None,
            updated_at: 0,
        };
        s.put_user("alice", &prof).unwrap().unwrap();
        assert_eq!(
            s.user_by_phone("+15551234567").unwrap().as_deref(),
            Some("alice")
        );
        assert!(matches!(
            s.put_user("bob", &prof).unwrap(),
            Err(PutUserError::PhoneTaken { .. })
        ));
        s.put_user("alice", &UserProfile::default())
            .unwrap()
            .unwrap();
        assert!(s.user_by_phone("+15551234567").unwrap().is_none());
        s.flush_blocking().unwrap();
        drop(s);
        let raw = read_all(&p);
        assert!(!contains(&raw, b"+15551234567"));
    }

    #[test]
    fn audit_batches_trim_exactly_and_read_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db"), ring(1), StoreOptions::default()).unwrap();
        let rec = |i: i64| AuditRecord {
            time: i,
            kind: "proxy".into(),
            user: Some(if i % 2 == 0 { "even" } else { "odd" }.into()),
            provider: None,
            method: "GET".into(),
            path: "/".into(),
            status: 200,
            duration_ms: 1.0,
            session_id: None,
            conversation_id: None,
            error: None,
        };
        for batch in [[1, 2, 3], [4, 5, 6], [7, 8, 9]] {
            let records: Vec<_> = batch.iter().map(|i| rec(*i)).collect();
            s.append_audit(&records, 5).unwrap();
        }
        let times: Vec<i64> = s
            .recent_audit(None, 100)
            .unwrap()
            .iter()
            .map(|r| r.time)
            .collect();
        assert_eq!(times, vec![9, 8, 7, 6, 5]);
        let times: Vec<i64> = s
            .recent_audit(Some("odd"), 2)
            .unwrap()
            .iter()
            .map(|r| r.time)
            .collect();
        assert_eq!(times, vec![9, 7]);
        // The count survives a reopen (recomputed from the batches).
        drop(s);
        let s = Store::open(&dir.path().join("db"), ring(1), StoreOptions::default()).unwrap();
        s.append_audit(&[rec(10)], 5).unwrap();
        let times: Vec<i64> = s
            .recent_audit(None, 100)
            .unwrap()
            .iter()
            .map(|r| r.time)
            .collect();
        assert_eq!(times, vec![10, 9, 8, 7, 6]);
    }

    #[test]
    fn oauth_state_single_use() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db"), ring(1), StoreOptions::default()).unwrap();
        let st = OAuthState {
            user: "u".into(),
            provider: "g".into(),
            verifier: Secret::new("v"),
            return_to: None,
            redirect_uri: "x".into(),
            expires_at: 10,
        };
        s.put_oauth_state("st", &st).unwrap();
        assert!(s.take_oauth_state("st").unwrap().is_some());
        assert!(s.take_oauth_state("st").unwrap().is_none());
    }

    #[test]
    fn rotation_and_lazy_reseal() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        let o = Owner::User("u".into());
        {
            let s = Store::open(&p, ring(1), StoreOptions::default()).unwrap();
            s.put_credential(&o, "g", &mut cred("tok-1")).unwrap();
            s.reseal_all(&ring(2)).unwrap();
        }
        assert!(matches!(
            Store::open(&p, ring(1), StoreOptions::default()),
            Err(OpenError::WrongKey(_))
        ));
        let s = Store::open(&p, ring(2), StoreOptions::default()).unwrap();
        assert_eq!(
            s.credential(&o, "g")
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
        assert!(s.credential_uncached(&o, "g").unwrap().is_some());
        let raw = s.credentials.tree.get(o.key("g")).unwrap().unwrap();
        assert_eq!(
            KeyRing::record_key_id(&raw),
            Some(MasterKey::from_bytes(&[3; 32]).id())
        );
    }

    #[test]
    fn backup_is_openable_and_encrypted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        let out = dir.path().join("backup");
        let o = Owner::User("u".into());
        {
            let s = Store::open(&p, ring(1), StoreOptions::default()).unwrap();
            s.put_credential(&o, "g", &mut cred("secret-token-xyz"))
                .unwrap();
            assert!(s.backup_to(&out).unwrap() > 0);
        }
        assert!(!contains(&read_all(&out), b"secret-token-xyz"));
        let s = Store::open(&out, ring(1), StoreOptions::default()).unwrap();
        assert!(s.credential(&o, "g").unwrap().is_some());
    }

    fn read_all(p: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        for e in walk(p) {
            out.extend(std::fs::read(e).unwrap_or_default());
        }
        out
    }

    fn walk(p: &Path) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap().path();
            if e.is_dir() {
                v.extend(walk(&e));
            } else {
                v.push(e);
            }
        }
        v
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }
}
