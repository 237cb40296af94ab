//! The encrypted store: credentials, sessions, users, OAuth states and the
//! audit log, every value sealed under the master key, behind one API that
//! the rest of sidekey uses whichever backend holds the bytes.
//!
//! This front does everything both backends share: sealing (the record key
//! as associated data), record formats, indexes, the memory caches, and the
//! rules (generation bumps, single-use states, first-bind-wins). A backend
//! only stores sealed bytes under `(tree, key)` and offers a few atomic
//! operations:
//! - [`sled_backend`]: embedded, one process, nothing to run (the default);
//! - [`postgres`]: several processes on one database, with cache eviction
//!   by LISTEN/NOTIFY (a heartbeat tells when it may be stalled) and
//!   refresh claims leased on the database clock, with fenced writes.
//!
//! Keys are plain (user ids, provider names, session ids, conversation ids);
//! values are ciphertext. Phone numbers are indexed by a keyed hash so a
//! stolen disk or dump does not list who calls from where.

mod cache;
pub mod crypto;
pub mod jwt;
pub mod postgres;
pub mod sled_backend;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

pub use cache::Cache;
pub use connect::{ConnectTicket, PendingCredential, TicketClaim};

/// Decrypted credentials by record key.
pub type CredentialCache = Cache<Credential>;
pub use crypto::{CryptoError, KeyId, KeyRing, MasterKey};

use postgres::{PgBackend, PgOptions};
use sidekey_base::secret::Secret;
use sled_backend::SledBackend;

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
    /// Why the credential needs reconnecting (the provider's error code,
    /// e.g. `invalid_grant`), shown by the admin API. Never a token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reauth_reason: Option<String>,
    /// When sidekey last refreshed this token itself (unix seconds): the
    /// refresh tool's cooldown, the same on every replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refreshed_at: Option<i64>,
    #[serde(default)]
    pub updated_at: i64,
    /// Bumped on every write, so a request can tell whether the credential
    /// it used has been replaced since.
    #[serde(default)]
    pub generation: u64,
    /// Per-connection values (`[providers.NAME.connection.FIELD]`): a
    /// Zendesk subdomain, a Salesforce instance URL. Not secrets, but
    /// sealed with the rest.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub connection: BTreeMap<String, String>,
    /// A tenant's signing key for a JWT bearer provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_key: Option<jwt::JwtKey>,
    /// On a token got by a JWT bearer exchange: its subject and key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<jwt::JwtGrant>,
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

/// Whose credential: a user's own, a tenant's shared one, the app-level
/// token of a client-credentials provider, or the token a JWT bearer grant
/// got for one subject (by the keyed hash of the subject, so record keys
/// never list anyone's address: [`Store::subject_owner`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    User(String),
    Tenant(String),
    App,
    Subject(String),
}

impl Owner {
    /// `u/{user}/`, `t/{tenant}/` or `a/`.
    fn prefix(&self) -> String {
        self.key("")
    }

    /// `prefix` + provider, built by hand rather than with `format!`:
    /// every proxied request looks its credential up by this key.
    pub fn key(&self, provider: &str) -> String {
        let (tag, id) = match self {
            Owner::User(u) => ("u/", Some(u.as_str())),
            Owner::Tenant(t) => ("t/", Some(t.as_str())),
            Owner::App => ("a/", None),
            Owner::Subject(h) => ("s/", Some(h.as_str())),
        };
        let id_len = id.map_or(0, |i| i.len() + 1);
        let mut k = String::with_capacity(tag.len() + id_len + provider.len());
        k.push_str(tag);
        if let Some(id) = id {
            k.push_str(id);
            k.push('/');
        }
        k.push_str(provider);
        k
    }

    pub fn describe(&self) -> String {
        match self {
            Owner::User(u) => format!("user {u}"),
            Owner::Tenant(t) => format!("tenant {t}"),
            Owner::App => "app".into(),
            Owner::Subject(h) => format!("subject {}", &h[..h.len().min(12)]),
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
    /// The user's address: the subject of JWT bearer grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OAuthState {
    pub user: String,
    pub provider: String,
    pub verifier: Secret,
    pub return_to: Option<String>,
    pub redirect_uri: String,
    pub expires_at: i64,
    /// Record id ([`Store::connect_ticket_id`]) of the connect link this
    /// flow belongs to: the callback completes only in the browser bound
    /// to that ticket.
    #[serde(default)]
    pub ticket: Option<String>,
    /// Per-connection values the flow was started with.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub connection: BTreeMap<String, String>,
}

/// A request method's name for an audit record; the standard ones without
/// an allocation.
pub fn method_name(m: &http::Method) -> std::borrow::Cow<'static, str> {
    use http::Method;
    match *m {
        Method::GET => "GET".into(),
        Method::POST => "POST".into(),
        Method::PUT => "PUT".into(),
        Method::PATCH => "PATCH".into(),
        Method::DELETE => "DELETE".into(),
        Method::HEAD => "HEAD".into(),
        Method::OPTIONS => "OPTIONS".into(),
        _ => m.as_str().to_owned().into(),
    }
}

/// One audit entry: who did what, when. Never a token or a body.
///
/// The audit writer stores a record as the JSON array of these fields in
/// this order (older records are objects; serde reads both). So a field is
/// only ever added at the end, with `#[serde(default)]`, and never
/// reordered or removed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditRecord {
    /// Unix milliseconds.
    pub time: i64,
    /// `proxy`, `admin`, `refresh`, `oauth`, `webhook`. `Cow`: the request
    /// path records fixed names without allocating them.
    pub kind: std::borrow::Cow<'static, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    pub method: std::borrow::Cow<'static, str>,
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
    /// The operation tool called (`/v1/tools`, MCP, Vapi, Retell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// The subject a JWT bearer grant acted for (an address or a user id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O: {0}")]
    Io(String),
    #[error("store record {key}: {err}")]
    Crypto { key: String, err: CryptoError },
    #[error("store record {0} is not valid JSON")]
    Decode(String),
    /// The shared database cannot be reached (or did not answer in time):
    /// callers answer 503 `store_unavailable` and may retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
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
/// Audit records per sealed value.
pub const AUDIT_BATCH: usize = 128;
const CANARY: &[u8] = b"sidekey key check v1";

/// What a backend stores: one namespace per kind of record. The name is
/// part of every record's associated data, so a record cannot be moved to
/// another tree or key without failing to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Tree {
    Credentials = 0,
    Sessions = 1,
    Users = 2,
    Phones = 3,
    OAuthStates = 4,
    Audit = 5,
    Meta = 6,
    /// `<conv>\0<sid>` → empty: sessions of a conversation without a scan.
    ConvIndex = 7,
    /// `<user>\0<sid>` → empty: sessions of a user, for user deletion.
    UserSessions = 8,
    /// `<exp big-endian>\0<sid>` → empty: expired sessions in order, for GC.
    SessionExpiry = 9,
    /// Connect-page tickets, by keyed hash.
    Tickets = 10,
    /// Credentials waiting for the app's confirmation (`[connect] confirm`),
    /// by keyed hash of their one-time code.
    PendingConnect = 11,
}

impl Tree {
    pub const ALL: [Tree; 12] = [
        Tree::Credentials,
        Tree::Sessions,
        Tree::Users,
        Tree::Phones,
        Tree::OAuthStates,
        Tree::Audit,
        Tree::Meta,
        Tree::ConvIndex,
        Tree::UserSessions,
        Tree::SessionExpiry,
        Tree::Tickets,
        Tree::PendingConnect,
    ];

    /// The sled tree name, and the prefix of every record's AAD.
    pub fn name(self) -> &'static str {
        match self {
            Tree::Credentials => "credentials",
            Tree::Sessions => "sessions",
            Tree::Users => "users",
            Tree::Phones => "phones",
            Tree::OAuthStates => "oauth_states",
            Tree::Audit => "audit",
            Tree::Meta => "meta",
            Tree::ConvIndex => "conv_index",
            Tree::UserSessions => "user_sessions",
            Tree::SessionExpiry => "session_expiry",
            Tree::Tickets => "connect_tickets",
            Tree::PendingConnect => "connect_pending",
        }
    }

    /// The namespace column in PostgreSQL.
    pub fn ns(self) -> i16 {
        self as i16
    }

    /// Trees whose values are sealed (the indexes hold empty values).
    pub fn sealed(self) -> bool {
        !matches!(
            self,
            Tree::ConvIndex | Tree::UserSessions | Tree::SessionExpiry
        )
    }

    fn from_ns(n: i16) -> Option<Tree> {
        Tree::ALL.iter().copied().find(|t| t.ns() == n)
    }
}

/// One write of a [`Store::batch`].
#[derive(Debug)]
pub enum Op {
    Put(Tree, Vec<u8>, Vec<u8>),
    /// Writes only if the key is absent (a migration never overwrites
    /// what the target already holds).
    Insert(Tree, Vec<u8>, Vec<u8>),
    Remove(Tree, Vec<u8>),
}

/// A held refresh (or GC) claim; `fence` orders holders, so a holder whose
/// lease lapsed cannot release its successor's claim.
#[derive(Clone, Debug)]
pub struct Claim {
    pub key: String,
    pub fence: i64,
}

/// What a write made under a claim did (see [`Store::commit_refresh`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fenced {
    Written,
    /// The record is not the one the holder read: someone wrote it since.
    Moved,
    /// The claim is someone else's now (this holder's lease lapsed and was
    /// taken over): nothing was written.
    Lost,
}

/// A credential as confirmed under a refresh claim: what the refresh
/// sends from, and whose generation its result replaces.
pub struct Confirmed {
    pub credential: Option<Credential>,
}

#[derive(Debug)]
pub enum ClaimOutcome {
    Granted(Claim),
    /// Another holder's lease is running.
    Held,
    /// A shared back-off after provider failures runs this much longer.
    BackingOff(Duration),
}

/// 1 s, 2 s, 4 s … 60 s after the n-th consecutive failure.
pub fn backoff_delay(failures: u32) -> Duration {
    Duration::from_millis((1000u64 << failures.saturating_sub(1).min(6)).min(60_000))
}

/// The memory caches, shared with the backend that keeps them true: the
/// PostgreSQL listener evicts on other replicas' writes and turns caching
/// off while it cannot hear them.
pub struct Caches {
    pub credentials: CredentialCache,
    /// Session records by id: every proxied call reads one. Invalidated by
    /// every session write, so revocation is still immediate.
    pub sessions: Cache<SessionRecord>,
    /// User profiles, for JWT bearer subjects read on every call of such a
    /// provider. Invalidated by every profile write.
    pub users: Cache<UserProfile>,
    /// Whether the caches may answer: always on sled; on PostgreSQL only
    /// while the change listener is connected and its heartbeat on time.
    /// One atomic load on every cached read.
    live: AtomicBool,
    /// Woken by every change another replica announces (refresh waiters).
    pub changed: tokio::sync::Notify,
}

impl Caches {
    fn new(opts: &StoreOptions, live: bool) -> Caches {
        Caches {
            credentials: CredentialCache::new(opts.cache_ttl, opts.cache_max_entries),
            sessions: Cache::new(opts.cache_ttl, opts.cache_max_entries),
            users: Cache::new(opts.cache_ttl, opts.cache_max_entries),
            live: AtomicBool::new(live),
            changed: tokio::sync::Notify::new(),
        }
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    pub fn set_live(&self, v: bool) {
        self.live.store(v, Ordering::Release);
    }

    pub fn clear_all(&self) {
        self.credentials.clear();
        self.sessions.clear();
        self.users.clear();
        self.changed.notify_waiters();
    }

    /// A change notification: `<ns>:<hex key>` or `claim:<key>`.
    pub fn on_change(&self, payload: &str) {
        if let Some((ns, hex)) = payload.split_once(':') {
            let key = decode_hex(hex).map(|k| String::from_utf8_lossy(&k).into_owned());
            match (ns.parse().ok().and_then(Tree::from_ns), key) {
                (Some(Tree::Credentials), Some(k)) => self.credentials.invalidate(&k),
                (Some(Tree::Sessions), Some(k)) => self.sessions.invalidate(&k),
                (Some(Tree::Users), Some(k)) => self.users.invalidate(&k),
                _ => {}
            }
        }
        self.changed.notify_waiters();
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

enum Backend {
    Sled(SledBackend),
    Postgres(PgBackend),
}

/// Calls the same method on whichever backend is configured.
macro_rules! on_backend {
    ($self:ident, $b:ident => $e:expr) => {
        match &$self.backend {
            Backend::Sled($b) => $e,
            Backend::Postgres($b) => $e,
        }
    };
}

mod connect;
mod users;

pub struct Store {
    backend: Backend,
    keys: Arc<KeyRing>,
    /// Keyed hash for the phone and ticket indexes; random per store, kept
    /// sealed in meta.
    index_key: Zeroizing<Vec<u8>>,
    caches: Arc<Caches>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.kind())
            .finish()
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

impl OpenError {
    pub fn message(self) -> String {
        match self {
            OpenError::WrongKey(m) | OpenError::Locked(m) | OpenError::Other(m) => m,
        }
    }
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

fn aad(t: Tree, key: &[u8]) -> Vec<u8> {
    let name = t.name();
    let mut a = Vec::with_capacity(name.len() + 1 + key.len());
    a.extend_from_slice(name.as_bytes());
    a.push(b'/');
    a.extend_from_slice(key);
    a
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
            backend: Backend::Sled(backend),
            keys,
            index_key,
            caches: Arc::new(Caches::new(&opts, true)),
        })
    }

    /// Connects to PostgreSQL, applies the schema, and checks the master
    /// key against the database's key check (written by the first replica).
    pub async fn open_postgres(
        pg: PgOptions,
        keys: KeyRing,
        opts: StoreOptions,
    ) -> Result<Store, OpenError> {
        let caches = Arc::new(Caches::new(&opts, false));
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
            match keys.open(&aad(Tree::Meta, b"keycheck"), &sealed) {
                Ok(o) if &o.plaintext[..] == CANARY => {}
                Err(CryptoError::UnknownKey(id)) => {
                    return Err(OpenError::WrongKey(format!(
                        "master key (id {}) does not match the PostgreSQL store, which is sealed under key id {id}; set store.master_key_file / master_key_env to that key (or list it in store.previous_master_key_files during a rotation)",
                        keys.current_id().hex()
                    )));
                }
                _ => {
                    return Err(OpenError::WrongKey(
                        "master key does not match the PostgreSQL store (its key check failed); set store.master_key_file / master_key_env to the key every replica uses".into(),
                    ));
                }
            }
        }
        let index_key = meta_index_key(&backend, &keys).await?;
        Ok(Store {
            backend: Backend::Postgres(backend),
            keys,
            index_key,
            caches,
        })
    }

    /// `sled` or `postgres`.
    pub fn kind(&self) -> &'static str {
        match self.backend {
            Backend::Sled(_) => "sled",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// The sled directory, if this is a sled store.
    pub fn path(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Sled(b) => Some(b.path()),
            Backend::Postgres(_) => None,
        }
    }

    pub fn key_id(&self) -> KeyId {
        self.keys.current_id()
    }

    pub fn caches(&self) -> &Arc<Caches> {
        &self.caches
    }

    /// Makes every write so far durable. Admin writes and refreshed tokens
    /// call this before anyone is told the write happened. (PostgreSQL
    /// commits each write before it returns.)
    pub async fn flush(&self) -> Result<(), StoreError> {
        on_backend!(self, b => b.flush().await)
    }

    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(b) => b.flush_blocking(),
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// Bytes the store takes: sled's files, or the PostgreSQL table with
    /// its indexes and TOAST.
    pub async fn size_on_disk(&self) -> u64 {
        match &self.backend {
            Backend::Sled(b) => b.size_on_disk(),
            Backend::Postgres(b) => b.size().await.unwrap_or(0),
        }
    }

    /// Other sidekey processes serving this store (PostgreSQL; a sled
    /// store is locked by its one process instead).
    pub async fn running_replicas(&self) -> Result<i64, StoreError> {
        match &self.backend {
            Backend::Sled(_) => Ok(0),
            Backend::Postgres(b) => b.running_replicas().await,
        }
    }

    /// Whether the store answers now (for `/readyz`).
    pub async fn ready(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(_) => Ok(()),
            Backend::Postgres(b) => b.ping().await,
        }
    }

    // ----- sealed records --------------------------------------------------

    fn seal(&self, t: Tree, key: &[u8], plain: &[u8]) -> Vec<u8> {
        self.keys.seal(&aad(t, key), plain)
    }

    fn seal_json<T: Serialize>(&self, t: Tree, key: &[u8], value: &T) -> Vec<u8> {
        let plain = Zeroizing::new(serde_json::to_vec(value).expect("serialisable"));
        self.seal(t, key, &plain)
    }

    fn open_raw(&self, t: Tree, key: &[u8], raw: &[u8]) -> Result<crypto::Opened, StoreError> {
        self.keys
            .open(&aad(t, key), raw)
            .map_err(|err| StoreError::Crypto {
                key: format!("{}/{}", t.name(), String::from_utf8_lossy(key)),
                err,
            })
    }

    fn decode<T: DeserializeOwned>(
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
    fn get_as<'a, T: DeserializeOwned + Serialize + Send + 'a>(
        &'a self,
        t: Tree,
        key: &'a [u8],
    ) -> futures_util::future::BoxFuture<'a, Result<Option<T>, StoreError>> {
        Box::pin(async move {
            let Some(raw) = on_backend!(self, b => b.get(t, key).await)? else {
                return Ok(None);
            };
            let (v, stale) = self.decode::<T>(t, key, &raw)?;
            if stale {
                let new = self.seal_json(t, key, &v);
                let _ = on_backend!(self, b => b.cas(t, key, Some(&raw), Some(&new)).await);
            }
            Ok(Some(v))
        })
    }

    async fn put_as<T: Serialize>(&self, t: Tree, key: &[u8], v: &T) -> Result<(), StoreError> {
        let sealed = self.seal_json(t, key, v);
        on_backend!(self, b => b.put(t, key, &sealed).await)
    }

    async fn batch(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        on_backend!(self, b => b.batch(ops).await)
    }

    // ----- cached listings -------------------------------------------------

    /// The last tool listing obtained from an upstream MCP server, so that
    /// a session-less `tools/list` can still show its tools. Sealed like
    /// every record; it never holds a token (the caller stores only the
    /// upstream's tool definitions).
    pub async fn mcp_listing(&self, server: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let key = format!("mcp-tools/{server}");
        self.get_as(Tree::Meta, key.as_bytes()).await
    }

    pub async fn put_mcp_listing(
        &self,
        server: &str,
        listing: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let key = format!("mcp-tools/{server}").into_bytes();
        let v = self.seal_json(Tree::Meta, &key, listing);
        self.batch(vec![Op::Put(Tree::Meta, key, v)]).await
    }

    // ----- credentials -----------------------------------------------------

    /// The credential, from the memory cache when fresh.
    pub async fn credential(
        &self,
        owner: &Owner,
        provider: &str,
    ) -> Result<Option<Arc<Credential>>, StoreError> {
        let key = owner.key(provider);
        if !self.caches.is_live() {
            return Ok(self
                .credential_uncached(owner, provider)
                .await?
                .map(Arc::new));
        }
        match self.caches.credentials.get(&key) {
            Ok(c) => Ok(Some(c)),
            Err(epoch) => {
                let c = self
                    .get_as::<Credential>(Tree::Credentials, key.as_bytes())
                    .await?;
                Ok(c.map(|c| {
                    let c = Arc::new(c);
                    self.caches.credentials.insert(&key, c.clone(), epoch);
                    c
                }))
            }
        }
    }

    /// The credential as stored, bypassing the cache (refresh decisions).
    pub async fn credential_uncached(
        &self,
        owner: &Owner,
        provider: &str,
    ) -> Result<Option<Credential>, StoreError> {
        let key = owner.key(provider);
        self.get_as(Tree::Credentials, key.as_bytes()).await
    }

    /// Writes a credential (on sled not yet durable: call [`flush`]). The
    /// generation is set to one past whatever is stored.
    pub async fn put_credential(
        &self,
        owner: &Owner,
        provider: &str,
        cred: &mut Credential,
    ) -> Result<(), StoreError> {
        loop {
            if self.write_credential(owner, provider, None, cred).await? {
                return Ok(());
            }
        }
    }

    /// Writes a credential only if the stored one still has generation
    /// `expected` (a refresh result must not overwrite a replacement).
    /// Returns whether it was written.
    pub async fn replace_credential_if(
        &self,
        owner: &Owner,
        provider: &str,
        expected: u64,
        cred: &mut Credential,
    ) -> Result<bool, StoreError> {
        self.write_credential(owner, provider, Some(expected), cred)
            .await
    }

    /// One compare-and-swap attempt; `false` when the record moved (or, with
    /// `expected`, has another generation).
    async fn write_credential(
        &self,
        owner: &Owner,
        provider: &str,
        expected: Option<u64>,
        cred: &mut Credential,
    ) -> Result<bool, StoreError> {
        let key = owner.key(provider);
        let k = key.as_bytes();
        let raw = on_backend!(self, b => b.get(Tree::Credentials, k).await)?;
        let prev = match &raw {
            Some(r) => self
                .decode::<Credential>(Tree::Credentials, k, r)
                .ok()
                .map(|(c, _)| c.generation),
            None => None,
        };
        if let Some(exp) = expected {
            if prev != Some(exp) {
                return Ok(false);
            }
        }
        cred.generation = cred.generation.max(prev.unwrap_or(0)) + 1;
        let new = self.seal_json(Tree::Credentials, k, cred);
        let ok =
            on_backend!(self, b => b.cas(Tree::Credentials, k, raw.as_deref(), Some(&new)).await)?;
        self.caches.credentials.invalidate(&key);
        if ok {
            self.caches.changed.notify_waiters();
        }
        Ok(ok)
    }

    pub async fn delete_credential(
        &self,
        owner: &Owner,
        provider: &str,
    ) -> Result<bool, StoreError> {
        let key = owner.key(provider);
        let existed =
            on_backend!(self, b => b.remove(Tree::Credentials, key.as_bytes()).await)?.is_some();
        self.caches.credentials.invalidate(&key);
        Ok(existed)
    }

    /// Every credential of an owner, by provider name.
    pub async fn list_credentials(
        &self,
        owner: &Owner,
    ) -> Result<Vec<(String, Credential)>, StoreError> {
        let prefix = owner.prefix();
        let mut out = Vec::new();
        let rows =
            on_backend!(self, b => b.scan_prefix(Tree::Credentials, prefix.as_bytes()).await)?;
        for (k, v) in rows {
            let (c, _) = self.decode::<Credential>(Tree::Credentials, &k, &v)?;
            let provider = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.push((provider, c));
        }
        Ok(out)
    }

    pub async fn credential_count(&self) -> usize {
        on_backend!(self, b => b.count(Tree::Credentials).await).unwrap_or(0)
    }

    // ----- sessions --------------------------------------------------------

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
            let Some(raw) = on_backend!(self, b => b.get(Tree::Sessions, k).await)? else {
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
            on_backend!(self, b => b.put(Tree::ConvIndex, &join0(conv, sid), &[]).await)?;
            if on_backend!(self, b => b.cas(Tree::Sessions, k, Some(&raw), Some(&new)).await)? {
                self.caches.sessions.invalidate(sid);
                return Ok(BindOutcome::Bound);
            }
            on_backend!(self, b => b.remove(Tree::ConvIndex, &join0(conv, sid)).await)?;
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
        let existed =
            on_backend!(self, b => b.remove(Tree::Sessions, sid.as_bytes()).await)?.is_some();
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

    async fn prefix_ids(&self, t: Tree, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut p = prefix.as_bytes().to_vec();
        p.push(0);
        let rows = on_backend!(self, b => b.scan_prefix(t, &p).await)?;
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
            let expired =
                on_backend!(self, b => b.keys_before(Tree::SessionExpiry, &end, 500).await)?;
            if expired.is_empty() {
                break;
            }
            for k in expired {
                let sid = String::from_utf8_lossy(&k[9.min(k.len())..]).into_owned();
                if self.revoke_session(&sid).await? {
                    n += 1;
                }
                on_backend!(self, b => b.remove(Tree::SessionExpiry, &k).await)?;
            }
        }
        Ok(n)
    }

    pub async fn session_count(&self) -> usize {
        on_backend!(self, b => b.count(Tree::Sessions).await).unwrap_or(0)
    }

    // ----- users -----------------------------------------------------------

    /// Keyed hash of an index value (phone number, ticket), so the stored
    /// key does not reveal it.
    pub fn index_hash(&self, value: &str) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.index_key).expect("any key size");
        mac.update(value.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    pub async fn user(&self, user: &str) -> Result<Option<UserProfile>, StoreError> {
        self.get_as(Tree::Users, user.as_bytes()).await
    }

    /// Profiles in key order after `after`, at most `limit` (migration).
    async fn profiles_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, UserProfile)>, StoreError> {
        let rows =
            on_backend!(self, b => b.page(Tree::Users, after.map(str::as_bytes), limit).await)?;
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
            let rows = on_backend!(self, b => b.page(Tree::Users, cursor.as_deref(), limit.min(500)).await)?;
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
            let rows = on_backend!(self, b => b.page(Tree::Credentials, Some(&cursor), 500).await)?;
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
                            let found = on_backend!(self, b => b.scan_prefix(Tree::Credentials, key.as_bytes()).await)?;
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
        let creds =
            on_backend!(self, b => b.scan_prefix(Tree::Credentials, prefix.as_bytes()).await)?;
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
            on_backend!(self, b => b.remove(Tree::UserSessions, &join0(user, &sid)).await)?;
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

    // ----- OAuth states ----------------------------------------------------

    pub async fn put_oauth_state(&self, state: &str, rec: &OAuthState) -> Result<(), StoreError> {
        let k = self.index_hash(state);
        self.put_as(Tree::OAuthStates, &k, rec).await
    }

    /// Removes and returns a state: each state is usable exactly once,
    /// across every replica (the removal is what decides).
    pub async fn take_oauth_state(&self, state: &str) -> Result<Option<OAuthState>, StoreError> {
        let k = self.index_hash(state);
        let Some(raw) = on_backend!(self, b => b.remove(Tree::OAuthStates, &k).await)? else {
            return Ok(None);
        };
        Ok(Some(self.decode(Tree::OAuthStates, &k, &raw)?.0))
    }

    /// Drops OAuth states that expired before `now`.
    pub async fn gc_oauth_states(&self, now: i64) -> Result<usize, StoreError> {
        self.gc_expired::<OAuthState>(Tree::OAuthStates, now, |s| s.expires_at)
            .await
    }

    /// Removes the records of `t` whose expiry (`expires_at`) is before
    /// `before`, and any that no longer open; each removal is a
    /// compare-and-swap, so a record rewritten meanwhile stays. Returns how
    /// many were removed.
    async fn gc_expired<T: DeserializeOwned>(
        &self,
        t: Tree,
        before: i64,
        expires_at: impl Fn(&T) -> i64,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let rows = on_backend!(self, b => b.page(t, after.as_deref(), 500).await)?;
            let Some((last, _)) = rows.last() else { break };
            after = Some(last.clone());
            for (k, v) in rows {
                let expired = self
                    .decode::<T>(t, &k, &v)
                    .map(|(r, _)| expires_at(&r) < before)
                    .unwrap_or(true);
                if expired && on_backend!(self, b => b.cas(t, &k, Some(&v), None).await)? {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    // ----- audit -----------------------------------------------------------

    /// Audit keys are `<id: 8 bytes BE><records in the batch: 2 bytes BE>`,
    /// so counting and trimming never decrypt a batch.
    fn audit_key(id: u64, n: usize) -> [u8; 10] {
        let mut k = [0u8; 10];
        k[..8].copy_from_slice(&id.to_be_bytes());
        k[8..].copy_from_slice(&(n.min(u16::MAX as usize) as u16).to_be_bytes());
        k
    }

    /// The newest part of the audit batch `(k, v)` once its oldest `excess`
    /// records are dropped, re-sealed under a key that counts what is left;
    /// `None` when nothing is left. Trimming on both backends uses it.
    fn audit_tail(&self, k: &[u8], v: &[u8], excess: usize) -> Option<(Vec<u8>, Vec<u8>)> {
        let (batch, _) = self
            .decode::<Vec<AuditRecord>>(Tree::Audit, k, v)
            .unwrap_or_default();
        let kept = &batch[excess.min(batch.len())..];
        if kept.is_empty() {
            return None;
        }
        let id = u64::from_be_bytes(k.get(..8).and_then(|b| b.try_into().ok()).unwrap_or([0; 8]));
        let key = Store::audit_key(id, kept.len());
        Some((key.to_vec(), self.seal_json(Tree::Audit, &key, &kept)))
    }

    /// Appends typed records (tests; the audit writer hands over JSON).
    #[cfg(test)]
    pub async fn append_audit(
        &self,
        records: &[AuditRecord],
        max_records: usize,
    ) -> Result<(), StoreError> {
        let chunks: Vec<(Vec<u8>, usize)> = records
            .chunks(AUDIT_BATCH)
            .map(|c| (serde_json::to_vec(c).expect("serialisable"), c.len()))
            .collect();
        self.append_audit_json(&chunks, max_records).await
    }

    /// Appends batches that are already JSON arrays (`(json, records)`), as
    /// the audit writer builds them, sealing each as one value.
    ///
    /// A sealed batch per value (not a record per key) keeps writing cheap.
    /// Both backends trim to `max_records` exactly on every append (and
    /// PostgreSQL again in the cluster-wide GC, [`trim_audit`]).
    pub async fn append_audit_json(
        &self,
        chunks: &[(Vec<u8>, usize)],
        max_records: usize,
    ) -> Result<(), StoreError> {
        let mut batches = Vec::with_capacity(chunks.len());
        let wanted = chunks.iter().filter(|(_, n)| *n > 0).count();
        // One round trip for all of them on PostgreSQL, not one per batch.
        let mut ids = on_backend!(self, b => b.next_ids(wanted).await)?.into_iter();
        for (json, n) in chunks {
            if *n == 0 {
                continue;
            }
            let id = ids
                .next()
                .ok_or_else(|| StoreError::Io("the id sequence returned too few ids".into()))?;
            let key = Store::audit_key(id, *n);
            let sealed = self.seal(Tree::Audit, &key, json);
            batches.push((key.to_vec(), sealed, *n));
        }
        match &self.backend {
            Backend::Sled(b) => {
                let trim = |k: &[u8], v: &[u8], excess: usize| self.audit_tail(k, v, excess);
                b.append_audit(batches, max_records, &trim).await
            }
            Backend::Postgres(b) => {
                b.append_audit(batches).await?;
                self.trim_audit(max_records).await.map(|_| ())
            }
        }
    }

    /// Trims the audit log to `max_records`, oldest first, exactly as sled
    /// does on append: whole batches, then the kept part of the batch that
    /// straddles the limit, re-sealed. (sled trims on append already.)
    /// Each removal is a compare-and-swap, so replicas trimming at once do
    /// not remove a batch twice. Returns records removed.
    pub async fn trim_audit(&self, max_records: usize) -> Result<u64, StoreError> {
        let Backend::Postgres(b) = &self.backend else {
            return Ok(0);
        };
        let mut total = b.audit_total().await?;
        let mut removed = 0u64;
        if total > max_records {
            // The whole batches in one statement; the loop below then has
            // at most the batch that straddles the limit left.
            removed += b.trim_audit_batches(total - max_records).await? as u64;
            // Counted again: another replica may have trimmed at once.
            total = b.audit_total().await?;
        }
        while total > max_records {
            let Some((k, v)) = b.page(Tree::Audit, None, 1).await?.into_iter().next() else {
                break;
            };
            let n = audit_key_count(&k);
            let excess = total - max_records;
            if !b.cas(Tree::Audit, &k, Some(&v), None).await? {
                total = b.audit_total().await?;
                continue;
            }
            if n <= excess {
                total -= n;
                removed += n as u64;
                continue;
            }
            let kept = match self.audit_tail(&k, &v, excess) {
                Some((key, sealed)) => {
                    b.put(Tree::Audit, &key, &sealed).await?;
                    audit_key_count(&key)
                }
                None => 0,
            };
            total -= n - kept;
            removed += (n - kept) as u64;
        }
        Ok(removed)
    }

    /// Newest first, optionally only one user's, at most `limit`.
    pub async fn recent_audit(
        &self,
        user: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let mut out = Vec::new();
        let mut before: Option<Vec<u8>> = None;
        'pages: loop {
            let rows =
                on_backend!(self, b => b.page_rev(Tree::Audit, before.as_deref(), 64).await)?;
            let Some((last, _)) = rows.last() else { break };
            before = Some(last.clone());
            for (k, v) in rows {
                let (batch, _) = self.decode::<Vec<AuditRecord>>(Tree::Audit, &k, &v)?;
                for r in batch.into_iter().rev() {
                    if out.len() >= limit {
                        break 'pages;
                    }
                    if user.is_none_or(|u| r.user.as_deref() == Some(u)) {
                        out.push(r);
                    }
                }
            }
        }
        Ok(out)
    }

    // ----- refresh claims --------------------------------------------------

    /// Claims `key` for `lease` (refresh of one credential, or a GC round):
    /// at most one holder cluster-wide until it releases or the lease lapses.
    /// `now_ms` is sidekey's clock, which the shared back-off is kept on
    /// (the lease itself runs on the backend's clock).
    pub async fn claim(
        &self,
        key: &str,
        lease: Duration,
        now_ms: i64,
    ) -> Result<ClaimOutcome, StoreError> {
        on_backend!(self, b => b.claim(key, lease, now_ms).await)
    }

    /// Releases a claim: `Some(true)` after a provider failure (starts the
    /// shared back-off), `Some(false)` after a success (clears it), `None`
    /// otherwise.
    pub async fn release(
        &self,
        claim: &Claim,
        failed: Option<bool>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        on_backend!(self, b => b.release(claim, failed, now_ms).await)
    }

    pub async fn clear_backoff(&self, key: &str) -> Result<(), StoreError> {
        on_backend!(self, b => b.clear_backoff(key).await)
    }

    /// Extends a held claim's lease to `lease` from now. `false`: it is
    /// someone else's now.
    pub async fn renew_claim(&self, claim: &Claim, lease: Duration) -> Result<bool, StoreError> {
        on_backend!(self, b => b.renew(claim, lease).await)
    }

    /// The last check before a refresh token is sent: the claim is still
    /// ours (its lease is renewed to `lease` from now) and the credential
    /// still has generation `expected` (`None`: there is none), both in one
    /// atomic step. Returns the credential as confirmed, or `None` when
    /// either has moved on: the caller must not send, and reads again.
    pub async fn confirm_refresh(
        &self,
        claim: &Claim,
        lease: Duration,
        owner: &Owner,
        provider: &str,
        expected: Option<u64>,
    ) -> Result<Option<Confirmed>, StoreError> {
        let key = owner.key(provider);
        let k = key.as_bytes();
        let raw = on_backend!(self, b => b.get(Tree::Credentials, k).await)?;
        let credential = match &raw {
            Some(r) => Some(self.decode::<Credential>(Tree::Credentials, k, r)?.0),
            None => None,
        };
        if credential.as_ref().map(|c| c.generation) != expected {
            return Ok(None);
        }
        let held = on_backend!(self, b => b
            .confirm(claim, lease, Tree::Credentials, k, raw.as_deref())
            .await)?;
        Ok(held.then_some(Confirmed { credential }))
    }

    /// Writes a refreshed credential in place of the one confirmed before
    /// the call (`base`), only if the stored one still has its generation
    /// and `claim` is still ours: a holder whose lease lapsed can neither
    /// overwrite what its successor wrote nor write after its successor
    /// read. The generation is compared, not the bytes: a record re-sealed
    /// under a new master key meanwhile (lazy rotation, by any reader) is
    /// the same credential. One read, then one fenced compare-and-swap.
    pub async fn commit_refresh(
        &self,
        claim: &Claim,
        owner: &Owner,
        provider: &str,
        base: &Confirmed,
        cred: &mut Credential,
    ) -> Result<Fenced, StoreError> {
        let key = owner.key(provider);
        let k = key.as_bytes();
        let expected = base.credential.as_ref().map(|c| c.generation);
        let generation = cred.generation;
        loop {
            let raw = on_backend!(self, b => b.get(Tree::Credentials, k).await)?;
            let prev = match &raw {
                Some(r) => Some(
                    self.decode::<Credential>(Tree::Credentials, k, r)?
                        .0
                        .generation,
                ),
                None => None,
            };
            if prev != expected {
                return Ok(Fenced::Moved);
            }
            cred.generation = generation.max(prev.unwrap_or(0)) + 1;
            let new = self.seal_json(Tree::Credentials, k, cred);
            let done = on_backend!(self, b => b
                .cas_fenced(claim, Tree::Credentials, k, raw.as_deref(), &new)
                .await)?;
            self.caches.credentials.invalidate(&key);
            match done {
                // Only the bytes moved (a re-seal): read again.
                Fenced::Moved => continue,
                Fenced::Written => self.caches.changed.notify_waiters(),
                Fenced::Lost => {}
            }
            return Ok(done);
        }
    }

    /// Whether the change listener hears other replicas now (PostgreSQL;
    /// `None` on sled, which has none).
    pub fn listener_up(&self) -> Option<bool> {
        match &self.backend {
            Backend::Sled(_) => None,
            Backend::Postgres(_) => Some(self.caches.is_live()),
        }
    }

    // ----- operations ------------------------------------------------------

    /// Re-seals every record under `new_keys`' current key, in pages, then
    /// rewrites the key check. Safe to re-run after a crash: records
    /// already under the new key are opened with it and sealed again.
    pub async fn reseal_all(&self, new_keys: &KeyRing) -> Result<usize, StoreError> {
        let mut n = 0;
        for t in Tree::ALL.into_iter().filter(|t| t.sealed()) {
            let mut after: Option<Vec<u8>> = None;
            loop {
                let rows = on_backend!(self, b => b.page(t, after.as_deref(), 500).await)?;
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
            Backend::Sled(b) => write_keycheck(b.path(), new_keys)
                .map_err(|e| StoreError::Io(format!("cannot write the key check: {e}")))?,
            Backend::Postgres(b) => {
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
        let Backend::Sled(b) = &self.backend else {
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
                let rows = on_backend!(from, b => b.page(t, after.as_deref(), 500).await)?;
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
        if let Backend::Postgres(b) = &self.backend {
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

/// The store's index key from meta, created by the first opener (a CAS, so
/// replicas starting together agree on one).
async fn meta_index_key<B: MetaAccess>(
    backend: &B,
    keys: &KeyRing,
) -> Result<Zeroizing<Vec<u8>>, OpenError> {
    let a = aad(Tree::Meta, b"index_key");
    let io = |e: StoreError| OpenError::Other(format!("cannot read the store: {e}"));
    loop {
        if let Some(raw) = backend.meta_get(b"index_key").await.map_err(io)? {
            return match keys.open(&a, &raw) {
                Ok(o) => {
                    if o.stale {
                        let new = keys.seal(&a, &o.plaintext);
                        let _ = backend.meta_cas(b"index_key", Some(&raw), &new).await;
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
            .meta_cas(b"index_key", None, &rec)
            .await
            .map_err(io)?
        {
            return Ok(Zeroizing::new(k));
        }
    }
}

/// The two meta operations start-up needs before a [`Store`] exists.
trait MetaAccess {
    async fn meta_get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    async fn meta_cas(&self, k: &[u8], old: Option<&[u8]>, new: &[u8]) -> Result<bool, StoreError>;
}

impl MetaAccess for SledBackend {
    async fn meta_get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(Tree::Meta, k).await
    }
    async fn meta_cas(&self, k: &[u8], old: Option<&[u8]>, new: &[u8]) -> Result<bool, StoreError> {
        self.cas(Tree::Meta, k, old, Some(new)).await
    }
}

impl MetaAccess for PgBackend {
    async fn meta_get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(Tree::Meta, k).await
    }
    async fn meta_cas(&self, k: &[u8], old: Option<&[u8]>, new: &[u8]) -> Result<bool, StoreError> {
        self.cas(Tree::Meta, k, old, Some(new)).await
    }
}

/// Records in an audit batch, from its key.
fn audit_key_count(k: &[u8]) -> usize {
    if k.len() == 10 {
        u16::from_be_bytes([k[8], k[9]]) as usize
    } else {
        0
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

    #[test]
    fn audit_method_names() {
        assert_eq!(method_name(&http::Method::GET), "GET");
        assert_eq!(method_name(&http::Method::OPTIONS), "OPTIONS");
        let custom = http::Method::from_bytes(b"PROPFIND").unwrap();
        assert_eq!(method_name(&custom), "PROPFIND");
    }

    #[test]
    fn owner_keys() {
        assert_eq!(Owner::User("alice".into()).key("slack"), "u/alice/slack");
        assert_eq!(Owner::Tenant("acme".into()).key("google"), "t/acme/google");
        assert_eq!(Owner::App.key("bench"), "a/bench");
        assert_eq!(Owner::User("alice".into()).prefix(), "u/alice/");
        assert_eq!(Owner::App.prefix(), "a/");
    }

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

    #[tokio::test]
    async fn credentials_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        {
            let s = Store::open(&p, ring(1), StoreOptions::default()).unwrap();
            let mut c = cred("xoxb-1");
            s.put_credential(&Owner::User("alice".into()), "slack", &mut c)
                .await
                .unwrap();
            assert_eq!(c.generation, 1);
            s.flush_blocking().unwrap();
        }
        let s = Store::open(&p, ring(1), StoreOptions::default()).unwrap();
        let c = s
            .credential(&Owner::User("alice".into()), "slack")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.access_token.as_ref().unwrap().expose(), "xoxb-1");
        let list = s
            .list_credentials(&Owner::User("alice".into()))
            .await
            .unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].0, "slack");
    }

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

    #[tokio::test]
    async fn generations_increase_and_cache_sees_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db"), ring(1), StoreOptions::default()).unwrap();
        let o = Owner::User("u".into());
        s.put_credential(&o, "g", &mut cred("a")).await.unwrap();
        assert_eq!(s.credential(&o, "g").await.unwrap().unwrap().generation, 1);
        s.put_credential(&o, "g", &mut cred("b")).await.unwrap();
        let c = s.credential(&o, "g").await.unwrap().unwrap();
        assert_eq!(c.generation, 2);
        assert_eq!(c.access_token.as_ref().unwrap().expose(), "b");
        assert!(s.delete_credential(&o, "g").await.unwrap());
        assert!(s.credential(&o, "g").await.unwrap().is_none());
    }

    /// The rules a refresh holder relies on, on the backend-independent
    /// front (sled here; tests/replica_faults.rs runs them on PostgreSQL).
    #[tokio::test]
    async fn refresh_claims_confirm_and_fence_their_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db"), ring(1), StoreOptions::default()).unwrap();
        let o = Owner::User("u".into());
        s.put_credential(&o, "g", &mut cred("a")).await.unwrap();
        let granted = |c| match c {
            ClaimOutcome::Granted(c) => c,
            other => panic!("{other:?}"),
        };
        let long = Duration::from_secs(60);
        // A lease that lapses at once: the next claim takes over.
        let first = granted(s.claim("k", Duration::ZERO, 0).await.unwrap());
        let second = granted(s.claim("k", long, 0).await.unwrap());
        assert!(matches!(
            s.claim("k", long, 0).await.unwrap(),
            ClaimOutcome::Held
        ));
        // The overtaken holder may not send, nor store anything.
        assert!(
            s.confirm_refresh(&first, long, &o, "g", Some(1))
                .await
                .unwrap()
                .is_none()
        );
        let base = s
            .confirm_refresh(&second, long, &o, "g", Some(1))
            .await
            .unwrap()
            .expect("the current holder confirms");
        let mut late = cred("from-the-overtaken-holder");
        assert_eq!(
            s.commit_refresh(&first, &o, "g", &base, &mut late)
                .await
                .unwrap(),
            Fenced::Lost
        );
        let mut fresh = cred("b");
        assert_eq!(
            s.commit_refresh(&second, &o, "g", &base, &mut fresh)
                .await
                .unwrap(),
            Fenced::Written
        );
        let c = s.credential_uncached(&o, "g").await.unwrap().unwrap();
        assert_eq!((c.generation, c.access_token.unwrap().expose()), (2, "b"));
        // A credential written since the holder read it: not confirmed,
        // and a result from the old one is not stored over it.
        s.release(&second, Some(false), 0).await.unwrap();
        let third = granted(s.claim("k", long, 0).await.unwrap());
        let stale = s
            .confirm_refresh(&third, long, &o, "g", Some(2))
            .await
            .unwrap()
            .unwrap();
        s.put_credential(&o, "g", &mut cred("admin")).await.unwrap();
        assert!(
            s.confirm_refresh(&third, long, &o, "g", Some(2))
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            s.commit_refresh(&third, &o, "g", &stale, &mut cred("c"))
                .await
                .unwrap(),
            Fenced::Moved
        );
    }

    /// A credential re-sealed under a new master key between the holder's
    /// confirmation and its commit (any reader re-seals, lazily) is the
    /// same credential: the refreshed token is stored.
    #[tokio::test]
    async fn a_refresh_result_is_stored_over_a_lazily_resealed_credential() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        let o = Owner::User("u".into());
        {
            let s = Store::open(&p, ring(2), StoreOptions::default()).unwrap();
            s.put_credential(&o, "g", &mut cred("old")).await.unwrap();
            s.flush().await.unwrap();
        }
        let rot = KeyRing::new(
            MasterKey::from_bytes(&[3; 32]),
            vec![MasterKey::from_bytes(&[2; 32])],
        );
        let s = Store::open(&p, rot, StoreOptions::default()).unwrap();
        let long = Duration::from_secs(60);
        let ClaimOutcome::Granted(claim) = s.claim("k", long, 0).await.unwrap() else {
            panic!("not granted")
        };
        let base = s
            .confirm_refresh(&claim, long, &o, "g", Some(1))
            .await
            .unwrap()
            .unwrap();
        let raw = |s: &Store| match &s.backend {
            Backend::Sled(b) => futures_util::FutureExt::now_or_never(
                b.get(Tree::Credentials, o.key("g").as_bytes()),
            )
            .unwrap()
            .unwrap(),
            Backend::Postgres(_) => unreachable!(),
        };
        let before = raw(&s);
        // Another caller reads it while the token call runs: re-sealed.
        s.credential_uncached(&o, "g").await.unwrap().unwrap();
        assert_ne!(raw(&s), before, "the read re-sealed the record");
        assert_eq!(
            s.commit_refresh(&claim, &o, "g", &base, &mut cred("new"))
                .await
                .unwrap(),
            Fenced::Written
        );
        let c = s.credential_uncached(&o, "g").await.unwrap().unwrap();
        assert_eq!(c.access_token.unwrap().expose(), "new");
    }

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

    #[tokio::test]
    async fn audit_batches_trim_exactly_and_read_newest_first() {
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
            tool: None,
            subject: None,
        };
        for batch in [[1, 2, 3], [4, 5, 6], [7, 8, 9]] {
            let records: Vec<_> = batch.iter().map(|i| rec(*i)).collect();
            s.append_audit(&records, 5).await.unwrap();
        }
        let times: Vec<i64> = s
            .recent_audit(None, 100)
            .await
            .unwrap()
            .iter()
            .map(|r| r.time)
            .collect();
        assert_eq!(times, vec![9, 8, 7, 6, 5]);
        let times: Vec<i64> = s
            .recent_audit(Some("odd"), 2)
            .await
            .unwrap()
            .iter()
            .map(|r| r.time)
            .collect();
        assert_eq!(times, vec![9, 7]);
        // The count survives a reopen (recomputed from the batches).
        drop(s);
        let s = Store::open(&dir.path().join("db"), ring(1), StoreOptions::default()).unwrap();
        s.append_audit(&[rec(10)], 5).await.unwrap();
        let times: Vec<i64> = s
            .recent_audit(None, 100)
            .await
            .unwrap()
            .iter()
            .map(|r| r.time)
            .collect();
        assert_eq!(times, vec![10, 9, 8, 7, 6]);
    }

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
        let raw = on_backend!(s, b => b.get(Tree::Credentials, o.key("g").as_bytes()).await)
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
