//! Loading keys and certificates, and creating missing dev secrets.
//!
//! With `generate_missing = true` (the shipped config), a fresh clone starts
//! with no other step: a missing master key, admin token, session signing
//! key or TLS certificate is generated with mode 0600 and a warning. A
//! master key is never generated for a store that already exists, since a
//! new key could not open it.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use sidekey_base::config::StoreBackend;
use sidekey_base::errors::Fatal;
use sidekey_vault::postgres::PgOptions;
use sidekey_vault::{Location, Store, StoreOptions};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::session::SessionKeys;
use sidekey_base::config::{Config, MIN_SECRET_CHARS, SecretSource, weak_secret};
use sidekey_base::secret::Secret;
use sidekey_vault::{KeyRing, MasterKey};

/// Everything secret the server needs, loaded once at start.
pub struct Loaded {
    pub keys: KeyRing,
    pub admin_token: Secret,
    pub session_keys: SessionKeys,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub webhook_secret: Option<Secret>,
    pub init_secret: Option<Secret>,
    /// `[vapi] secret_*`: compared with `X-Vapi-Secret` / `Authorization`.
    pub vapi_secret: Option<Secret>,
    /// `[vapi] hmac_secret_*`: the key of Vapi's `x-signature`.
    pub vapi_hmac_secret: Option<Secret>,
    /// `[retell] api_key_*`: the key of `X-Retell-Signature`.
    pub retell_api_key: Option<Secret>,
    /// What was generated, for the start-up log.
    pub generated: Vec<String>,
    /// Non-fatal remarks (e.g. a webhook secret not set).
    pub notes: Vec<String>,
}

/// What to do about a missing file-based dev secret.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Gen {
    /// Create it (serve with `generate_missing = true`).
    Yes,
    /// Report it as a problem.
    No,
    /// Say it will be created on first start (check-config).
    Would,
}

/// Loads every key. With `generate`, missing file-based dev secrets are
/// created first. Returns every problem found, not just the first.
pub fn load(cfg: &Config, generate: bool) -> Result<Loaded, Vec<String>> {
    load_with(cfg, if generate { Gen::Yes } else { Gen::No })
}

/// What `sidekey check-config` reports: remarks, or every problem. Writes
/// nothing: secrets that `serve` would generate are only mentioned.
pub fn check(cfg: &Config) -> Result<Vec<String>, Vec<String>> {
    let gen_mode = if cfg.store.generate_missing {
        Gen::Would
    } else {
        Gen::No
    };
    match load_with(cfg, gen_mode) {
        Ok(l) => {
            let mut notes = l.notes;
            if cfg.store.backend == sidekey_base::config::StoreBackend::Postgres {
                // Reached as `serve` would reach it, and read only: the key
                // is checked against the store's key check when there is one.
                let pg = match store_location(cfg) {
                    Ok(Location::Postgres(pg)) => pg,
                    Ok(Location::Sled(_)) => unreachable!("a PostgreSQL backend"),
                    Err(e) => return Err(vec![e.to_string()]),
                };
                let checked = on_own_runtime(sidekey_vault::postgres::check_key(&pg, &l.keys))
                    .map_err(|e| vec![e])?;
                let from = cfg.store.postgres_url.describe();
                let id = l.keys.current_id().hex();
                return match checked {
                    Ok(sidekey_vault::postgres::PgKeyCheck::Matches) => {
                        notes.push(format!(
                            "store: PostgreSQL from {from} reached; it opens with the configured master key (key id {id})"
                        ));
                        Ok(notes)
                    }
                    Ok(sidekey_vault::postgres::PgKeyCheck::Fresh) => {
                        notes.push(format!(
                            "store: PostgreSQL from {from} reached; it holds no sidekey store yet (the first serve creates one under key id {id})"
                        ));
                        Ok(notes)
                    }
                    Err(e) => Err(vec![e.to_string()]),
                };
            }
            if sidekey_vault::exists(&cfg.store.path) {
                match sidekey_vault::check_key(&cfg.store.path, &l.keys) {
                    Ok(_) => notes.push(format!(
                        "store at {} opens with the configured master key (key id {})",
                        cfg.store.path.display(),
                        l.keys.current_id().hex()
                    )),
                    Err(e) => return Err(vec![e.to_string()]),
                }
            }
            Ok(notes)
        }
        Err(p) => Err(p),
    }
}

fn load_with(cfg: &Config, generate: Gen) -> Result<Loaded, Vec<String>> {
    let mut problems = Vec::new();
    let mut generated = Vec::new();
    let mut notes = Vec::new();

    // --- master key ---
    // (A PostgreSQL store is checked against the key when it is opened.)
    let store_exists = match cfg.store.backend {
        StoreBackend::Sled => sidekey_vault::exists(&cfg.store.path),
        // A replica about to generate a key asks the database first: one
        // already made under another key would refuse it, and the key
        // file left behind would only mislead.
        StoreBackend::Postgres if generate == Gen::Yes && key_file_missing(cfg) => {
            match postgres_holds_store(cfg) {
                Ok(held) => held,
                Err(e) => {
                    problems.push(e);
                    return Err(problems);
                }
            }
        }
        StoreBackend::Postgres => false,
    };
    let master = load_or_generate(
        &cfg.store.master_key,
        "store.master_key_file",
        "store.master_key_env",
        if store_exists && generate != Gen::No {
            Gen::No
        } else {
            generate
        },
        MasterKey::generate_base64,
        "dev master key",
        &mut generated,
        &mut problems,
    );
    if master.is_none()
        && store_exists
        && generate != Gen::No
        && matches!(cfg.store.master_key, SecretSource::File(_))
    {
        problems.retain(|p| !p.starts_with("store.master_key_file:"));
        problems.push(match cfg.store.backend {
            StoreBackend::Sled => format!(
                "store.master_key_file: {} is missing but the store at {} exists; a new key could not open it, so none was generated. Restore the key file (or point master_key_file at it)",
                cfg.store.master_key.describe(),
                cfg.store.path.display()
            ),
            StoreBackend::Postgres => format!(
                "store.master_key_file: {} is missing but the PostgreSQL store from {} already exists (made by another replica); a new key could not open it, so none was generated. Give this replica the key the others use (the same file or store.master_key_env)",
                cfg.store.master_key.describe(),
                cfg.store.postgres_url.describe()
            ),
        });
    }
    let keys = master.and_then(|m| match MasterKey::parse(&m) {
        Ok(current) => {
            let mut previous = Vec::new();
            for f in &cfg.store.previous_master_key_files {
                match std::fs::read_to_string(f) {
                    Ok(t) => match MasterKey::parse(&Secret::new(t)) {
                        Ok(k) => previous.push(k),
                        Err(e) => problems.push(format!(
                            "store.previous_master_key_files: {} {e}",
                            f.display()
                        )),
                    },
                    Err(e) => problems.push(format!(
                        "store.previous_master_key_files: cannot read {}: {e}",
                        f.display()
                    )),
                }
            }
            Some(KeyRing::new(current, previous))
        }
        Err(e) => {
            problems.push(format!(
                "store.master_key: {} {e}",
                cfg.store.master_key.describe()
            ));
            None
        }
    });

    // --- admin token ---
    let admin_token = load_or_generate(
        &cfg.admin.token,
        "admin.token_file",
        "admin.token_env",
        generate,
        || {
            let mut b = [0u8; 32];
            rand::fill(&mut b);
            use base64::Engine;
            Secret::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
        },
        "admin token",
        &mut generated,
        &mut problems,
    );
    if let Some(t) = &admin_token {
        if let Some(why) = weak_secret(t, MIN_SECRET_CHARS) {
            problems.push(format!(
                "admin.token_file / admin.token_env: {} {why} (32 random bytes recommended)",
                cfg.admin.token.describe()
            ));
        }
    }

    // --- session signing key ---
    let signing = load_or_generate(
        &cfg.sessions.signing_key,
        "sessions.signing_key_file",
        "sessions.signing_key_env",
        generate,
        SessionKeys::generate_hs256,
        "session signing key",
        &mut generated,
        &mut problems,
    );
    let session_keys = signing.and_then(|s| {
        let mut previous = Vec::new();
        for f in &cfg.sessions.previous_signing_key_files {
            match std::fs::read_to_string(f) {
                Ok(t) => previous.push(Secret::new(t)),
                Err(e) => problems.push(format!(
                    "sessions.previous_signing_key_files: cannot read {}: {e}",
                    f.display()
                )),
            }
        }
        match SessionKeys::new(&s, &previous) {
            Ok(k) => Some(k),
            Err(e) => {
                problems.push(format!(
                    "sessions.signing_key: {} {e}",
                    cfg.sessions.signing_key.describe()
                ));
                None
            }
        }
    });

    // --- TLS ---
    let tls = if cfg.server.tls {
        let (c, k) = (&cfg.server.tls_cert, &cfg.server.tls_key);
        if generate == Gen::Would && !c.exists() && !k.exists() {
            generated.push(format!(
                "a self-signed TLS certificate would be generated at {} on first start",
                c.display()
            ));
        } else if generate == Gen::Yes && !c.exists() && !k.exists() {
            match generate_cert(cfg, c, k) {
                Ok(()) => generated.push(format!(
                    "self-signed TLS certificate {} and key {} (for development only; ElevenLabs needs a publicly trusted certificate)",
                    c.display(),
                    k.display()
                )),
                Err(e) => problems.push(format!("server.tls_cert: cannot generate a dev certificate: {e}")),
            }
        }
        if generate == Gen::Would && !c.exists() && !k.exists() {
            None
        } else {
            match tls_config(c, k) {
                Ok(t) => Some(t),
                Err(e) => {
                    problems.push(e);
                    None
                }
            }
        }
    } else {
        None
    };

    // --- webhook secrets (optional: their endpoints answer 401 without) ---
    let webhook_secret = optional(
        &cfg.elevenlabs.webhook_secret,
        "elevenlabs.webhook_secret_file / webhook_secret_env",
        "the post-call webhook",
        &mut notes,
        &mut problems,
    );
    let init_secret = optional(
        &cfg.elevenlabs.init_secret,
        "elevenlabs.init_secret_file / init_secret_env",
        "the conversation-init webhook",
        &mut notes,
        &mut problems,
    );

    // --- Vapi and Retell (off unless configured: no note when unset) ---
    let vapi_secret = optional_if_set(
        &cfg.vapi.secret,
        "vapi.secret_file / secret_env",
        "POST /v1/vapi/tools",
        &mut notes,
        &mut problems,
    );
    let vapi_hmac_secret = optional_if_set(
        &cfg.vapi.hmac_secret,
        "vapi.hmac_secret_file / hmac_secret_env",
        "POST /v1/vapi/tools",
        &mut notes,
        &mut problems,
    );
    let retell_api_key = optional_if_set(
        &cfg.retell.api_key,
        "retell.api_key_file / api_key_env",
        "the Retell endpoints",
        &mut notes,
        &mut problems,
    );

    if !problems.is_empty() {
        return Err(problems);
    }
    if generate == Gen::Would {
        notes.append(&mut generated);
    }
    Ok(Loaded {
        keys: keys.unwrap_or_else(|| KeyRing::new(MasterKey::from_bytes(&[0; 32]), vec![])),
        admin_token: admin_token.unwrap_or_default(),
        session_keys: match session_keys {
            Some(k) => k,
            None => {
                SessionKeys::new(&SessionKeys::generate_hs256(), &[]).expect("valid generated key")
            }
        },
        tls,
        webhook_secret,
        init_secret,
        vapi_secret,
        vapi_hmac_secret,
        retell_api_key,
        generated,
        notes,
    })
}

fn optional(
    src: &SecretSource,
    what: &str,
    endpoint: &str,
    notes: &mut Vec<String>,
    problems: &mut Vec<String>,
) -> Option<Secret> {
    match src.load() {
        // A blank or short secret would let anyone through (an empty
        // X-Sidekey-Init-Secret, an HMAC keyed with ""): refused at start.
        Ok(Some(s)) => match weak_secret(&s, MIN_SECRET_CHARS) {
            None => Some(s),
            Some(why) => {
                problems.push(format!(
                    "{what}: {} {why}; set a random secret (e.g. `openssl rand -base64 32`), or unset it to switch {endpoint} off",
                    src.describe()
                ));
                None
            }
        },
        Ok(None) => {
            notes.push(format!(
                "{what}: {} is not set; {endpoint} will refuse every call (401) until it is",
                src.describe()
            ));
            None
        }
        Err(e) => {
            problems.push(format!("{what}: {e}"));
            None
        }
    }
}

/// As [`optional`], for front doors that are off unless configured: an
/// unset source says nothing.
fn optional_if_set(
    src: &SecretSource,
    what: &str,
    endpoint: &str,
    notes: &mut Vec<String>,
    problems: &mut Vec<String>,
) -> Option<Secret> {
    if matches!(src, SecretSource::Unset) {
        return None;
    }
    optional(src, what, endpoint, notes, problems)
}

/// Whether the master key is a file that does not exist yet (what
/// `generate_missing` would create).
fn key_file_missing(cfg: &Config) -> bool {
    matches!(&cfg.store.master_key, SecretSource::File(p) if !p.exists())
}

/// Asks the configured PostgreSQL database, read-only, whether it already
/// holds a sidekey store.
fn postgres_holds_store(cfg: &Config) -> Result<bool, String> {
    let Location::Postgres(pg) = store_location(cfg).map_err(|e| e.to_string())? else {
        return Ok(false);
    };
    on_own_runtime(sidekey_vault::postgres::holds_store(&pg))?.map_err(|e| e.message())
}

/// Runs a start-up check to completion on a runtime of its own, on a
/// thread of its own: callers may or may not be inside a runtime already
/// (the binary loads before it starts one; embedders and tests inside).
fn on_own_runtime<T: Send>(fut: impl std::future::Future<Output = T> + Send) -> Result<T, String> {
    std::thread::scope(|s| {
        s.spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(fut))
                .map_err(|e| format!("cannot start a runtime: {e}"))
        })
        .join()
        .map_err(|_| "the start-up check failed".to_owned())?
    })
}

#[allow(clippy::too_many_arguments)]
fn load_or_generate(
    src: &SecretSource,
    file_key: &str,
    env_key: &str,
    generate: Gen,
    make: impl FnOnce() -> Secret,
    what: &str,
    generated: &mut Vec<String>,
    problems: &mut Vec<String>,
) -> Option<Secret> {
    match src.load() {
        Ok(Some(s)) if !s.is_empty() => Some(s),
        Ok(Some(_)) => {
            problems.push(format!(
                "{}: {} is empty; put the {what} in it, or remove it{}",
                if matches!(src, SecretSource::Env(_)) {
                    env_key
                } else {
                    file_key
                },
                src.describe(),
                if matches!(src, SecretSource::File(_)) && generate != Gen::No {
                    " to have a new one generated"
                } else {
                    ""
                }
            ));
            None
        }
        Ok(None) => match src {
            SecretSource::File(path) if generate == Gen::Would => {
                generated.push(format!(
                    "{what} would be generated at {} on first start",
                    path.display()
                ));
                None
            }
            SecretSource::File(path) if generate == Gen::Yes => {
                let s = make();
                match write_private(path, s.expose()) {
                    Ok(()) => {
                        generated.push(format!("{what} at {} (mode 0600)", path.display()));
                        Some(s)
                    }
                    Err(e) => {
                        problems.push(format!("{file_key}: cannot create {}: {e}", path.display()));
                        None
                    }
                }
            }
            SecretSource::File(path) => {
                problems.push(format!(
                    "{file_key}: {} does not exist; create it, or set [store] generate_missing = true for a development setup",
                    path.display()
                ));
                None
            }
            SecretSource::Env(name) => {
                problems.push(format!("{env_key}: environment variable {name} is not set"));
                None
            }
            _ => {
                problems.push(format!("{file_key}: not configured"));
                None
            }
        },
        Err(e) => {
            problems.push(format!("{file_key}: {e}"));
            None
        }
    }
}

/// Creates a file readable only by its owner, failing if it exists.
pub fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(content.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

fn generate_cert(cfg: &Config, cert: &Path, key: &Path) -> Result<(), String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if let Ok(u) = url::Url::parse(&cfg.server.public_url) {
        if let Some(h) = u.host_str() {
            let h = h.trim_matches(['[', ']']).to_owned();
            if !names.contains(&h) {
                names.push(h);
            }
        }
    }
    let ck = rcgen::generate_simple_self_signed(names).map_err(|e| e.to_string())?;
    write_private(key, &ck.signing_key.serialize_pem())
        .map_err(|e| format!("{}: {e}", key.display()))?;
    write_private(cert, &ck.cert.pem()).map_err(|e| format!("{}: {e}", cert.display()))?;
    Ok(())
}

/// rustls server config with ALPN h2 and http/1.1.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("server.tls_cert: cannot read {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!(
                "server.tls_cert: {} is not a PEM certificate chain: {e}",
                cert.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "server.tls_cert: {} holds no certificate",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "server.tls_key: cannot read a PEM private key from {}: {e}",
            key.display()
        )
    })?;
    let mut sc = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("server.tls_cert / tls_key: {e}"))?;
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(sc))
}

/// Opens the store the config names (sled directory or PostgreSQL).
pub async fn open_store(config: &Config, keys: KeyRing) -> Result<Store, Fatal> {
    let opts = StoreOptions {
        flush_every_ms: config.store.flush_every_ms,
        cache_ttl: Duration::from_secs(config.store.cache_ttl_secs),
        cache_max_entries: config.store.cache_max_entries,
    };
    let loc = store_location(config)?;
    Store::open_at(loc, keys, opts)
        .await
        .map_err(|e| Fatal::new(e.message()))
}

/// Where the configured store is; reads the PostgreSQL URL's secret.
pub fn store_location(config: &Config) -> Result<Location, Fatal> {
    let st = &config.store;
    Ok(match st.backend {
        StoreBackend::Sled => Location::Sled(st.path.clone()),
        StoreBackend::Postgres => {
            let setting = match &st.postgres_url {
                sidekey_base::config::SecretSource::Env(n) => {
                    format!("store.postgres_url_env ({n})")
                }
                sidekey_base::config::SecretSource::File(f) => {
                    format!("store.postgres_url_file ({})", f.display())
                }
                _ => "store.postgres_url".to_owned(),
            };
            let url = st
                .postgres_url
                .load()
                .map_err(|e| Fatal::new(format!("{setting}: {e}")))?
                .ok_or_else(|| {
                    Fatal::new(format!(
                        "{setting}: not set; give the PostgreSQL URL, e.g. postgresql://sidekey@db/sidekey"
                    ))
                })?;
            Location::Postgres(PgOptions {
                setting,
                url,
                pool_size: st.postgres_pool_size,
                op_timeout: Duration::from_secs(st.postgres_timeout_secs),
            })
        }
    })
}
