//! `config.toml`: parsing, defaults, and validation that reports every problem.
//!
//! Parsing is strict (unknown keys are errors, so a typo never silently
//! disables a setting). Validation collects every problem instead of
//! stopping at the first, so `sidekey check-config` can list them all.
//! Relative paths are resolved against the config file's directory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use url::Url;

use crate::secret::Secret;

mod jwt;
mod tools;
pub use jwt::JwtConfig;
pub use tools::{
    HmacAlgorithm, McpServerConfig, ParamConfig, ParamIn, ParamType, PayloadPart, RetellConfig,
    ToolConfig, VapiConfig, VapiHmac, parse_pack, placeholders, valid_tool_name,
};

/// Where a secret comes from: a file, an environment variable, or (discouraged)
/// inline in the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
    Inline(Secret),
    Unset,
}

impl SecretSource {
    fn from_parts(
        dir: &Path,
        file: Option<String>,
        env: Option<String>,
        inline: Option<Secret>,
        what: &str,
        problems: &mut Vec<String>,
    ) -> SecretSource {
        let n = file.is_some() as u8 + env.is_some() as u8 + inline.is_some() as u8;
        if n > 1 {
            problems.push(format!(
                "{what}: give only one of the file, env and inline forms"
            ));
        }
        if let Some(f) = file {
            SecretSource::File(resolve(dir, &f))
        } else if let Some(e) = env {
            SecretSource::Env(e)
        } else if let Some(s) = inline {
            SecretSource::Inline(s)
        } else {
            SecretSource::Unset
        }
    }

    /// Reads the secret. `Ok(None)` when unset, or when the file or variable
    /// does not exist; `Err` when it exists but cannot be read. A file or
    /// variable that exists but is blank gives an empty secret (callers
    /// refuse it, naming the setting): it must never pass for "no secret"
    /// nor for a valid one.
    pub fn load(&self) -> Result<Option<Secret>, String> {
        match self {
            SecretSource::Unset => Ok(None),
            SecretSource::Inline(s) => Ok(Some(s.clone())),
            SecretSource::Env(name) => match std::env::var(name) {
                Ok(v) => Ok(Some(Secret::new(v.trim()))),
                Err(std::env::VarError::NotPresent) => Ok(None),
                Err(std::env::VarError::NotUnicode(_)) => {
                    Err(format!("environment variable {name} is not valid UTF-8"))
                }
            },
            SecretSource::File(path) => match std::fs::read_to_string(path) {
                Ok(v) => Ok(Some(Secret::new(v.trim()))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("cannot read {}: {e}", path.display())),
            },
        }
    }

    /// How to name this source in a message (never the value).
    pub fn describe(&self) -> String {
        match self {
            SecretSource::File(p) => format!("file {}", p.display()),
            SecretSource::Env(n) => format!("environment variable {n}"),
            SecretSource::Inline(_) => "inline value".into(),
            SecretSource::Unset => "nothing".into(),
        }
    }
}

fn resolve(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

// ---------------------------------------------------------------------------
// Raw TOML shape.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    sessions: RawSessions,
    #[serde(default)]
    elevenlabs: RawElevenLabs,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    oauth: RawOAuth,
    #[serde(default)]
    connect: RawConnect,
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    tools: BTreeMap<String, tools::RawTool>,
    #[serde(default)]
    mcp_servers: BTreeMap<String, tools::RawMcpServer>,
    #[serde(default)]
    vapi: tools::RawVapi,
    #[serde(default)]
    retell: tools::RawRetell,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawOAuth {
    bind_browser: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConnect {
    app_name: Option<String>,
    accent_color: Option<String>,
    logo_url: Option<String>,
    app_url: Option<String>,
    confirm: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    public_url: Option<String>,
    tls: Option<bool>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    max_body_bytes: Option<u64>,
    upstream_timeout_secs: Option<u64>,
    connect_timeout_secs: Option<u64>,
    shutdown_grace_secs: Option<u64>,
    max_connections: Option<usize>,
    header_read_timeout_secs: Option<u64>,
    tls_handshake_timeout_secs: Option<u64>,
    max_header_bytes: Option<usize>,
    h2_max_concurrent_streams: Option<u32>,
    upstream_ca_file: Option<String>,
    max_pending_per_ip: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    token_file: Option<String>,
    token_env: Option<String>,
    allow_remote: Option<bool>,
    metrics_listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: Option<String>,
    master_key_file: Option<String>,
    master_key_env: Option<String>,
    previous_master_key_files: Option<Vec<String>>,
    generate_missing: Option<bool>,
    flush_every_ms: Option<u64>,
    cache_ttl_secs: Option<u64>,
    cache_max_entries: Option<usize>,
    backend: Option<String>,
    postgres_url: Option<String>,
    postgres_url_env: Option<String>,
    postgres_url_file: Option<String>,
    postgres_pool_size: Option<u64>,
    postgres_timeout_secs: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSessions {
    issuer: Option<String>,
    audience: Option<String>,
    ttl_secs: Option<u64>,
    max_ttl_secs: Option<u64>,
    signing_key_file: Option<String>,
    signing_key_env: Option<String>,
    previous_signing_key_files: Option<Vec<String>>,
    dynamic_variable: Option<String>,
    require_conversation_header: Option<bool>,
    bind_within_secs: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawElevenLabs {
    conversation_header: Option<String>,
    webhook_secret_env: Option<String>,
    webhook_secret_file: Option<String>,
    init_secret_env: Option<String>,
    init_secret_file: Option<String>,
    api_base: Option<String>,
    api_key_env: Option<String>,
    init_providers: Option<Vec<String>>,
    max_webhook_bytes: Option<u64>,
    webhook_memory_budget_bytes: Option<u64>,
    webhook_reserved_bytes: Option<u64>,
    webhook_share_bytes: Option<u64>,
    webhook_min_bytes_per_sec: Option<u64>,
    webhook_min_rate_grace_secs: Option<u64>,
    webhook_tolerance_secs: Option<u64>,
    tool_response_timeout_secs: Option<u64>,
    mcp_approval_policy: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    per_session_rps: Option<f64>,
    per_session_burst: Option<u32>,
    per_user_rps: Option<f64>,
    per_user_burst: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    enabled: Option<bool>,
    max_records: Option<usize>,
}

/// `inject = "bearer"` or one of the table forms.
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum RawInject {
    Style(String),
    Header {
        header: String,
        value: Option<String>,
    },
    Query {
        query: String,
    },
    PathPrefix {
        path_prefix: String,
    },
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub preset: Option<String>,
    pub display_name: Option<String>,
    pub description: Option<String>,
    pub base_url: Option<String>,
    pub token_url: Option<String>,
    pub authorize_url: Option<String>,
    pub inject: Option<RawInject>,
    pub client_id: Option<String>,
    pub client_id_env: Option<String>,
    pub client_id_file: Option<String>,
    pub client_secret: Option<String>,
    pub client_secret_env: Option<String>,
    pub client_secret_file: Option<String>,
    pub client_auth: Option<String>,
    pub refresh_skew_secs: Option<u64>,
    pub refresh_cooldown_secs: Option<u64>,
    pub allow: Option<Vec<String>>,
    pub grant: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub user_scopes: Option<Vec<String>>,
    pub scope_separator: Option<String>,
    pub authorize_params: Option<BTreeMap<String, String>>,
    pub token_params: Option<BTreeMap<String, String>>,
    pub allow_http: Option<bool>,
    /// The preset's ready tools to enable: `["*"]` or their names.
    pub tools: Option<Vec<String>>,
    /// Use (and refresh) the credential stored for this other provider.
    pub credential_from: Option<String>,
    /// Fixed headers on every proxied call unless the client sent its own.
    pub headers: Option<BTreeMap<String, String>>,
    /// Per-connection values for `{field}` placeholders in the URLs.
    pub connection: Option<BTreeMap<String, ConnectionConfig>>,
    /// Send an S256 PKCE challenge in the OAuth flow (preset's default).
    pub pkce: Option<bool>,
    // JWT bearer grants and private_key_jwt (see `config/jwt.rs`).
    pub service_account_file: Option<String>,
    pub jwt_issuer: Option<String>,
    pub jwt_key_file: Option<String>,
    pub jwt_key_id: Option<String>,
    pub jwt_alg: Option<String>,
    pub jwt_audience: Option<String>,
    pub jwt_scope_claim: Option<bool>,
    pub jwt_subject: Option<String>,
    pub jwt_subject_domains: Option<Vec<String>>,
}

/// `[providers.NAME.connection.FIELD]`.
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    /// `user`, `token` or `admin`.
    pub from: String,
    /// Matched in full.
    pub pattern: String,
}

// ---------------------------------------------------------------------------
// Validated configuration.

#[derive(Clone, Debug)]
pub struct Config {
    /// The file this was read from.
    pub path: PathBuf,
    /// Base for every relative path in the file.
    pub dir: PathBuf,
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub sessions: SessionsConfig,
    pub elevenlabs: ElevenLabsConfig,
    pub limits: LimitsConfig,
    pub audit: AuditConfig,
    pub oauth: OAuthConfig,
    pub connect: ConnectConfig,
    /// Provider sections as written; `providers::Providers` resolves presets.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// `[tools.NAME]` as written (a preset's enabled tools are added where
    /// providers are resolved).
    pub tools: BTreeMap<String, ToolConfig>,
    pub mcp_servers: BTreeMap<String, McpServerConfig>,
    pub vapi: VapiConfig,
    pub retell: RetellConfig,
    /// Non-fatal remarks (`check-config` prints them, `serve` logs them).
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Agent-facing listener (ElevenLabs calls this).
    pub listen: SocketAddr,
    /// Base of OAuth redirect URIs and generated tool URLs; no trailing slash.
    pub public_url: String,
    /// false only when TLS is terminated in front of sidekey.
    pub tls: bool,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// Largest request body accepted (and buffered for a 401 replay), bytes.
    pub max_body_bytes: u64,
    /// Time allowed for an upstream or token endpoint to answer, seconds.
    pub upstream_timeout_secs: u64,
    /// Time allowed to open a TCP+TLS connection upstream, seconds.
    pub connect_timeout_secs: u64,
    /// In-flight requests get this long to finish after SIGTERM, seconds.
    pub shutdown_grace_secs: u64,
    /// Connections beyond this wait in the kernel backlog.
    pub max_connections: usize,
    /// A client must send its request head within this, seconds.
    pub header_read_timeout_secs: u64,
    pub tls_handshake_timeout_secs: u64,
    /// Largest request head (HTTP/1 buffer, HTTP/2 header list), bytes.
    pub max_header_bytes: usize,
    pub h2_max_concurrent_streams: u32,
    /// Agent connections per client IP that have not yet carried an accepted
    /// request; 0 = no limit. IPs with accepted requests are exempt.
    pub max_pending_per_ip: usize,
    /// Extra PEM roots trusted for upstream TLS (private CAs), besides webpki.
    pub upstream_ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: SecretSource,
    /// Optional plain-HTTP listener serving only `/metrics`, `/healthz` and
    /// `/readyz` without a token, for Prometheus and kubelet probes.
    pub metrics_listen: Option<SocketAddr>,
}

/// Which backend holds the records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreBackend {
    /// Embedded, one process (the default).
    Sled,
    /// Several processes on one PostgreSQL database.
    Postgres,
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// libpq URL of the shared database (`backend = "postgres"`).
    pub postgres_url: SecretSource,
    /// Connections per process in the pool (the LISTEN connection is extra).
    pub postgres_pool_size: usize,
    /// Bound on one database call, pool wait included, seconds.
    pub postgres_timeout_secs: u64,
    pub path: PathBuf,
    pub master_key: SecretSource,
    /// Old master keys that still open records sealed under them; such
    /// records are re-sealed under the current key when read.
    pub previous_master_key_files: Vec<PathBuf>,
    /// Create missing dev secrets (keys, admin token, TLS cert) at start.
    pub generate_missing: bool,
    /// sled's background flush interval for writes that are not flushed
    /// explicitly (conversation binding, audit), milliseconds.
    pub flush_every_ms: u64,
    /// Lifetime of a decrypted credential in the memory cache, seconds.
    pub cache_ttl_secs: u64,
    pub cache_max_entries: usize,
}

#[derive(Clone, Debug)]
pub struct SessionsConfig {
    pub issuer: String,
    pub audience: String,
    pub ttl_secs: u64,
    pub max_ttl_secs: u64,
    pub signing_key: SecretSource,
    /// Keys that still verify tokens (by `kid`) but no longer sign.
    pub previous_signing_key_files: Vec<PathBuf>,
    /// Dynamic variable that carries the session token; starts with `secret__`.
    pub dynamic_variable: String,
    /// A bound session must present its conversation id on every call.
    pub require_conversation_header: bool,
    /// A session minted without a conversation must be bound (by a call
    /// carrying the conversation header) within this many seconds of
    /// minting, or it is refused as expired; 0 turns the limit off.
    pub bind_within_secs: i64,
}

#[derive(Clone, Debug)]
pub struct ElevenLabsConfig {
    pub conversation_header: http::HeaderName,
    pub webhook_secret: SecretSource,
    pub init_secret: SecretSource,
    /// ElevenLabs API base for `push-tools` (regional bases exist).
    pub api_base: String,
    pub api_key_env: String,
    /// Providers a session minted by conversation-init may use; all when unset.
    pub init_providers: Option<Vec<String>>,
    /// Post-call bodies carry base64 audio; this caps what is read, bytes.
    pub max_webhook_bytes: u64,
    /// Bytes all post-call bodies being read at once may hold together;
    /// past it, a webhook is answered 503 before more is read.
    pub webhook_memory_budget_bytes: u64,
    /// The last bytes of that budget, kept for bodies of at most this size
    /// (a post-call without audio always finds room).
    pub webhook_reserved_bytes: u64,
    /// What one post-call body may hold while others need memory.
    pub webhook_share_bytes: u64,
    /// A body arriving slower than this (after the grace, and over every
    /// window of that length) is cut off with 408; 0 = no minimum.
    pub webhook_min_bytes_per_sec: u64,
    pub webhook_min_rate_grace_secs: u64,
    pub webhook_tolerance_secs: i64,
    /// `response_timeout_secs` written into generated tools.
    pub tool_response_timeout_secs: u64,
    /// The `approval_policy` of the MCP server record push-mcp writes.
    pub mcp_approval_policy: String,
}

#[derive(Clone, Debug, Default)]
pub struct LimitsConfig {
    /// Requests per second per session; 0 disables the limit.
    pub per_session_rps: f64,
    pub per_session_burst: u32,
    /// Requests per second per user across sessions; 0 disables.
    pub per_user_rps: f64,
    pub per_user_burst: u32,
}

#[derive(Clone, Debug)]
pub struct AuditConfig {
    pub enabled: bool,
    /// Oldest records beyond this many are deleted.
    pub max_records: usize,
}

/// `[oauth]`: how authorization-code flows are completed.
#[derive(Clone, Debug)]
pub struct OAuthConfig {
    /// The callback completes only in the browser that opened the connect
    /// link (RFC 9700 §4.7.1: bind the flow to the user agent). `false`
    /// lets a bare `authorize_url` complete anywhere, as before.
    pub bind_browser: bool,
}

/// `[connect]`: the look of the hosted connect page, and whether a new
/// connection waits for the app's confirmation.
#[derive(Clone, Debug)]
pub struct ConnectConfig {
    /// Name of the main app, in the title and the "Done — back to" link.
    pub app_name: Option<String>,
    /// `#rrggbb`: buttons and highlights.
    pub accent_color: String,
    /// Text on the accent: black or white, whichever passes WCAG AA.
    pub accent_text: &'static str,
    /// Shown above the title; its origin is added to the page's `img-src`.
    pub logo_url: Option<Url>,
    /// Where error pages link back to when the link's `return_to` is unknown.
    pub app_url: Option<Url>,
    /// A completed callback stores the credential as pending and hands the
    /// app a one-time `connect_code`; only the app's confirm for the right
    /// user makes it active. A link forwarded to someone else then stores
    /// nothing unless the app, which knows who is logged in, agrees.
    pub confirm: bool,
}

impl ConnectConfig {
    fn from_raw(c: RawConnect, p: &mut Vec<String>) -> ConnectConfig {
        if let Some(n) = &c.app_name {
            if !page_text_ok(n, 64) {
                p.push("[connect] app_name: 1-64 characters without control characters".into());
            }
        }
        let accent_color = match c.accent_color {
            None => "#2563eb".to_owned(),
            Some(a) => match parse_hex_color(&a) {
                Some(rgb) => format!("#{:02x}{:02x}{:02x}", rgb[0], rgb[1], rgb[2]),
                None => {
                    p.push(format!(
                        "[connect] accent_color = {a:?}: give a hex colour, #rgb or #rrggbb"
                    ));
                    "#2563eb".to_owned()
                }
            },
        };
        let logo_url = c.logo_url.and_then(|l| match Url::parse(&l) {
            Ok(u)
                if (u.scheme() == "https" || (u.scheme() == "http" && is_loopback_url(&u)))
                    && u.username().is_empty()
                    && u.password().is_none()
                    && l.len() <= 2048 =>
            {
                Some(u)
            }
            _ => {
                p.push(format!("[connect] logo_url = {l:?}: give an https:// image URL (at most 2048 characters, no credentials)"));
                None
            }
        });
        let app_url = c.app_url.and_then(|l| match Url::parse(&l) {
            Ok(u) if u.scheme() == "https" && u.username().is_empty() && u.password().is_none() && l.len() <= 2048 => Some(u),
            _ => {
                p.push(format!("[connect] app_url = {l:?}: give the https:// address of your app (at most 2048 characters, no credentials); error pages link back to it"));
                None
            }
        });
        let (accent_text, ratio) =
            crate::colour::text_on(parse_hex_color(&accent_color).unwrap_or_default());
        if ratio < crate::colour::AA_TEXT {
            p.push(format!("[connect] accent_color = {accent_color:?}: button text on it reaches only {ratio:.2}:1, WCAG AA needs 4.5:1; choose a darker or lighter colour"));
        }
        ConnectConfig {
            app_name: c.app_name,
            accent_color,
            accent_text,
            logo_url,
            app_url,
            confirm: c.confirm.unwrap_or(false),
        }
    }
}

/// `#rgb` or `#rrggbb` → bytes.
pub fn parse_hex_color(s: &str) -> Option<[u8; 3]> {
    let h = s.strip_prefix('#')?;
    if !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let d = |c: &str| u8::from_str_radix(c, 16).ok();
    match h.len() {
        3 => {
            let mut out = [0u8; 3];
            for (i, c) in h.chars().enumerate() {
                out[i] = d(&c.to_string())? * 17;
            }
            Some(out)
        }
        6 => Some([d(&h[0..2])?, d(&h[2..4])?, d(&h[4..6])?]),
        _ => None,
    }
}

/// Text shown on a page: present, bounded, and free of control characters.
pub fn page_text_ok(s: &str, max_chars: usize) -> bool {
    let n = s.chars().count();
    (1..=max_chars).contains(&n) && !s.chars().any(char::is_control)
}

/// A provider section, secrets resolved to their sources.
#[derive(Clone, Debug)]
pub struct ProviderConfig {
    pub raw_inject: Option<RawInject>,
    pub preset: Option<String>,
    pub display_name: Option<String>,
    /// What the provider is used for, shown on the connect page.
    pub description: Option<String>,
    pub base_url: Option<String>,
    pub token_url: Option<String>,
    pub authorize_url: Option<String>,
    pub client_id: SecretSource,
    pub client_secret: SecretSource,
    pub client_auth: Option<String>,
    pub refresh_skew_secs: Option<u64>,
    /// Seconds after a successful refresh in which the refresh tool answers
    /// `active` without calling the token endpoint (default 30).
    pub refresh_cooldown_secs: Option<u64>,
    pub allow: Vec<String>,
    pub grant: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub user_scopes: Option<Vec<String>>,
    pub scope_separator: Option<String>,
    pub authorize_params: BTreeMap<String, String>,
    pub token_params: BTreeMap<String, String>,
    pub allow_http: bool,
    /// The preset's ready tools to enable (`["*"]` for all).
    pub tools: Vec<String>,
    pub credential_from: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub connection: BTreeMap<String, ConnectionConfig>,
    pub pkce: Option<bool>,
    /// The `jwt_*` keys and `service_account_file`.
    pub jwt: JwtConfig,
}

pub const DEFAULT_CONFIG_PATH: &str = "config.toml";

/// Shortest secret sidekey accepts for the secrets it checks itself (admin
/// token, init secret, webhook secret): anything shorter can be guessed.
pub const MIN_SECRET_CHARS: usize = 16;

/// Why a loaded secret is refused (empty or shorter than `min`), or `None`.
pub fn weak_secret(s: &Secret, min: usize) -> Option<String> {
    let n = s.expose().chars().count();
    if n == 0 {
        Some("is empty".into())
    } else if n < min {
        Some(format!("is only {n} characters long; use at least {min}"))
    } else {
        None
    }
}

/// `1–128` characters of `A-Za-z0-9._@:+-`: user ids, tenant ids, provider names.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@:+-".contains(&b))
}

/// A config found without problems, or the problems.
pub fn without_problems((cfg, problems): (Config, Vec<String>)) -> Result<Config, Vec<String>> {
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(problems)
    }
}

impl Config {
    /// Reads and validates a config file. On failure, every problem found.
    /// Provider sections are only parsed here; resolving them (presets,
    /// URLs, injection) is `providers::Providers::from_config`'s job.
    pub fn load(path: &Path) -> Result<Config, Vec<String>> {
        Config::read(path).and_then(without_problems)
    }

    /// Reads a config file and checks what this module owns. The config
    /// comes back with its problems (when the file could be made into one at
    /// all), so a caller that checks more — the providers — can report every
    /// problem at once (`check-config` lists all, not the first group).
    pub fn read(path: &Path) -> Result<(Config, Vec<String>), Vec<String>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![format!(
                "cannot read config file {}: {e} (pass --config PATH or set SIDEKEY_CONFIG)",
                path.display()
            )]
        })?;
        let dir = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    p.to_path_buf()
                }
            })
            .unwrap_or_else(|| PathBuf::from("."));
        Config::check(&text, path, &dir)
    }

    pub fn parse(text: &str, path: &Path, dir: &Path) -> Result<Config, Vec<String>> {
        Config::check(text, path, dir).and_then(without_problems)
    }

    /// [`Config::parse`], returning the config together with its problems.
    pub fn check(
        text: &str,
        path: &Path,
        dir: &Path,
    ) -> Result<(Config, Vec<String>), Vec<String>> {
        let (raw, mut p) = parse_raw(text, path)?;
        let mut warnings = Vec::new();
        let mut cfg = Config::from_raw(raw, path, dir, &mut p, &mut warnings);
        cfg.warnings = warnings;
        Ok((cfg, p))
    }

    fn from_raw(
        raw: RawConfig,
        path: &Path,
        dir: &Path,
        p: &mut Vec<String>,
        w: &mut Vec<String>,
    ) -> Config {
        let s = raw.server;
        let listen = parse_addr(
            s.listen.as_deref().unwrap_or("0.0.0.0:8443"),
            "[server] listen",
            p,
        );
        let tls = s.tls.unwrap_or(true);
        if !tls {
            w.push("[server] tls = false: the agent-facing listener speaks plain HTTP; only do this when TLS is terminated in front of sidekey".into());
        }
        let public_url = match s.public_url {
            Some(u) => u,
            None => format!(
                "{}://localhost:{}",
                if tls { "https" } else { "http" },
                listen.port()
            ),
        };
        let public_url = match Url::parse(&public_url) {
            Ok(u) if u.scheme() == "https" || u.scheme() == "http" => {
                if u.query().is_some() || u.fragment().is_some() {
                    p.push("[server] public_url: must not have a query or fragment".into());
                }
                if u.scheme() == "http" && !is_loopback_url(&u) {
                    w.push("[server] public_url is http://: OAuth providers and ElevenLabs will send tokens and codes in clear text; use https:// in production".into());
                }
                public_url.trim_end_matches('/').to_owned()
            }
            _ => {
                p.push(format!(
                    "[server] public_url: {public_url:?} is not an http(s) URL; set it to the address ElevenLabs and browsers reach sidekey at, e.g. https://sidekey.example.com"
                ));
                public_url
            }
        };
        let server = ServerConfig {
            listen,
            public_url,
            tls,
            tls_cert: resolve(dir, s.tls_cert.as_deref().unwrap_or("certs/server.crt")),
            tls_key: resolve(dir, s.tls_key.as_deref().unwrap_or("certs/server.key")),
            max_body_bytes: positive(s.max_body_bytes, 1_048_576, "[server] max_body_bytes", p),
            upstream_timeout_secs: positive(
                s.upstream_timeout_secs,
                20,
                "[server] upstream_timeout_secs",
                p,
            ),
            connect_timeout_secs: positive(
                s.connect_timeout_secs,
                5,
                "[server] connect_timeout_secs",
                p,
            ),
            shutdown_grace_secs: s.shutdown_grace_secs.unwrap_or(10),
            max_connections: positive(
                s.max_connections.map(|v| v as u64),
                10_000,
                "[server] max_connections",
                p,
            ) as usize,
            header_read_timeout_secs: positive(
                s.header_read_timeout_secs,
                15,
                "[server] header_read_timeout_secs",
                p,
            ),
            tls_handshake_timeout_secs: positive(
                s.tls_handshake_timeout_secs,
                10,
                "[server] tls_handshake_timeout_secs",
                p,
            ),
            max_header_bytes: positive(
                s.max_header_bytes.map(|v| v as u64),
                65_536,
                "[server] max_header_bytes",
                p,
            ) as usize,
            h2_max_concurrent_streams: positive(
                s.h2_max_concurrent_streams.map(u64::from),
                256,
                "[server] h2_max_concurrent_streams",
                p,
            ) as u32,
            // Above a cold burst of tool calls from one egress IP (hundreds of
            // connections before the first answer), far below max_connections.
            max_pending_per_ip: s.max_pending_per_ip.unwrap_or(1024),
            upstream_ca_file: s.upstream_ca_file.as_deref().map(|f| resolve(dir, f)),
        };
        if server.max_header_bytes < 8192 {
            p.push(
                "[server] max_header_bytes: at least 8192 is needed for ordinary requests".into(),
            );
        }

        let a = raw.admin;
        let admin_listen = parse_addr(
            a.listen.as_deref().unwrap_or("127.0.0.1:8444"),
            "[admin] listen",
            p,
        );
        if !admin_listen.ip().is_loopback() {
            if a.allow_remote.unwrap_or(false) {
                w.push(format!("[admin] listen = {admin_listen}: the admin API is reachable from other hosts; protect it with a firewall or network policy"));
            } else {
                p.push(format!("[admin] listen = {admin_listen} is not a loopback address; the admin API hands out sessions and stores credentials, so keep it on 127.0.0.1 or set allow_remote = true deliberately"));
            }
        }
        let mut token = SecretSource::from_parts(
            dir,
            a.token_file,
            a.token_env,
            None,
            "[admin] token_file / token_env",
            p,
        );
        if token == SecretSource::Unset {
            token = SecretSource::File(resolve(dir, "data/admin.token"));
        }
        let metrics_listen = a
            .metrics_listen
            .as_deref()
            .map(|m| parse_addr(m, "[admin] metrics_listen", p));
        let admin = AdminConfig {
            listen: admin_listen,
            token,
            metrics_listen,
        };
        if admin.listen == server.listen && admin.listen.port() != 0 {
            p.push("[admin] listen: must differ from [server] listen".into());
        }

        let st = raw.store;
        let mut master_key = SecretSource::from_parts(
            dir,
            st.master_key_file,
            st.master_key_env,
            None,
            "[store] master_key_file / master_key_env",
            p,
        );
        if master_key == SecretSource::Unset {
            master_key = SecretSource::File(resolve(dir, "data/master.key"));
        }
        let backend = match st.backend.as_deref() {
            None | Some("sled") => StoreBackend::Sled,
            Some("postgres") | Some("postgresql") => StoreBackend::Postgres,
            Some(other) => {
                p.push(format!(
                    "[store] backend = {other:?}: use \"sled\" (embedded, one process) or \"postgres\" (several replicas on one database)"
                ));
                StoreBackend::Sled
            }
        };
        let postgres_url = SecretSource::from_parts(
            dir,
            st.postgres_url_file,
            st.postgres_url_env,
            st.postgres_url.map(Secret::new),
            "[store] postgres_url_file / postgres_url_env / postgres_url",
            p,
        );
        if backend == StoreBackend::Postgres && postgres_url == SecretSource::Unset {
            p.push("[store] backend = \"postgres\" needs postgres_url_env (e.g. \"SIDEKEY_POSTGRES_URL\"), postgres_url_file or postgres_url".into());
        }
        let upstream_timeout = server.upstream_timeout_secs;
        let postgres_timeout_secs = positive(
            st.postgres_timeout_secs,
            5.min(upstream_timeout),
            "[store] postgres_timeout_secs",
            p,
        );
        let store = StoreConfig {
            backend,
            postgres_url,
            postgres_pool_size: positive(st.postgres_pool_size, 16, "[store] postgres_pool_size", p)
                as usize,
            postgres_timeout_secs,
            path: resolve(dir, st.path.as_deref().unwrap_or("data/sidekey.db")),
            master_key,
            previous_master_key_files: st
                .previous_master_key_files
                .unwrap_or_default()
                .iter()
                .map(|f| resolve(dir, f))
                .collect(),
            generate_missing: st.generate_missing.unwrap_or(false),
            flush_every_ms: positive(st.flush_every_ms, 500, "[store] flush_every_ms", p),
            cache_ttl_secs: st.cache_ttl_secs.unwrap_or(300),
            cache_max_entries: st.cache_max_entries.unwrap_or(100_000),
        };

        let se = raw.sessions;
        let mut signing_key = SecretSource::from_parts(
            dir,
            se.signing_key_file,
            se.signing_key_env,
            None,
            "[sessions] signing_key_file / signing_key_env",
            p,
        );
        if signing_key == SecretSource::Unset {
            signing_key = SecretSource::File(resolve(dir, "data/session.key"));
        }
        let dynamic_variable = se
            .dynamic_variable
            .unwrap_or_else(|| "secret__sidekey_session".into());
        if !dynamic_variable.starts_with("secret__")
            || !dynamic_variable
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            p.push(format!("[sessions] dynamic_variable = {dynamic_variable:?}: must start with secret__ (so ElevenLabs never sends it to the LLM) and contain only letters, digits and _"));
        }
        let ttl_secs = positive(se.ttl_secs, 3600, "[sessions] ttl_secs", p);
        let max_ttl_secs = positive(se.max_ttl_secs, 86_400, "[sessions] max_ttl_secs", p);
        if ttl_secs > max_ttl_secs {
            p.push(format!(
                "[sessions] ttl_secs ({ttl_secs}) is larger than max_ttl_secs ({max_ttl_secs})"
            ));
        }
        let sessions = SessionsConfig {
            issuer: se.issuer.unwrap_or_else(|| "sidekey".into()),
            audience: se.audience.unwrap_or_else(|| "sidekey-proxy".into()),
            ttl_secs,
            max_ttl_secs,
            signing_key,
            previous_signing_key_files: se
                .previous_signing_key_files
                .unwrap_or_default()
                .iter()
                .map(|f| resolve(dir, f))
                .collect(),
            dynamic_variable,
            require_conversation_header: se.require_conversation_header.unwrap_or(true),
            bind_within_secs: i64::try_from(se.bind_within_secs.unwrap_or(600)).unwrap_or(i64::MAX),
        };

        let el = raw.elevenlabs;
        let conv = el
            .conversation_header
            .unwrap_or_else(|| "X-Conversation-Id".into());
        let conversation_header = match http::HeaderName::from_bytes(conv.as_bytes()) {
            Ok(h) => h,
            Err(_) => {
                p.push(format!(
                    "[elevenlabs] conversation_header = {conv:?} is not a valid header name"
                ));
                http::HeaderName::from_static("x-conversation-id")
            }
        };
        let mut webhook_secret = SecretSource::from_parts(
            dir,
            el.webhook_secret_file,
            el.webhook_secret_env,
            None,
            "[elevenlabs] webhook_secret_file / webhook_secret_env",
            p,
        );
        if webhook_secret == SecretSource::Unset {
            webhook_secret = SecretSource::Env("ELEVENLABS_WEBHOOK_SECRET".into());
        }
        let mut init_secret = SecretSource::from_parts(
            dir,
            el.init_secret_file,
            el.init_secret_env,
            None,
            "[elevenlabs] init_secret_file / init_secret_env",
            p,
        );
        if init_secret == SecretSource::Unset {
            init_secret = SecretSource::Env("SIDEKEY_INIT_SECRET".into());
        }
        let api_base = el
            .api_base
            .unwrap_or_else(|| "https://api.elevenlabs.io".into())
            .trim_end_matches('/')
            .to_owned();
        if Url::parse(&api_base).is_err() {
            p.push(format!("[elevenlabs] api_base = {api_base:?} is not a URL"));
        }
        let mcp_approval_policy = el
            .mcp_approval_policy
            .clone()
            .unwrap_or_else(|| "auto_approve_all".into());
        if ![
            "auto_approve_all",
            "require_approval_all",
            "require_approval_per_tool",
        ]
        .contains(&mcp_approval_policy.as_str())
        {
            p.push(format!("[elevenlabs] mcp_approval_policy: {mcp_approval_policy:?} is not one of auto_approve_all, require_approval_all, require_approval_per_tool"));
        }
        let tool_timeout = el
            .tool_response_timeout_secs
            .unwrap_or((server.upstream_timeout_secs + 10).clamp(5, 120));
        if !(5..=300).contains(&tool_timeout) {
            p.push("[elevenlabs] tool_response_timeout_secs must be between 5 and 300 (ElevenLabs' limits)".into());
        }
        if tool_timeout <= server.upstream_timeout_secs {
            w.push(format!("[elevenlabs] tool_response_timeout_secs ({tool_timeout}) is not above [server] upstream_timeout_secs ({}): ElevenLabs may give up before sidekey's own timeout answer arrives", server.upstream_timeout_secs));
        }
        const MIB: u64 = 1 << 20;
        // 64 MiB for the largest audio body plus the 4 MiB kept for small ones.
        let budget = positive(
            el.webhook_memory_budget_bytes,
            68 * MIB,
            "[elevenlabs] webhook_memory_budget_bytes",
            p,
        );
        let reserved = match el.webhook_reserved_bytes {
            // A small budget (tests, tiny pods) keeps half of it.
            None => (4 * MIB).min(budget / 2),
            Some(r) if r >= budget => {
                p.push(format!("[elevenlabs] webhook_reserved_bytes ({r}) must be below webhook_memory_budget_bytes ({budget})"));
                budget / 2
            }
            Some(r) => r,
        };
        let share = positive(
            el.webhook_share_bytes,
            ((budget - reserved) / 4).max(MIB),
            "[elevenlabs] webhook_share_bytes",
            p,
        );
        let elevenlabs = ElevenLabsConfig {
            conversation_header,
            webhook_secret,
            init_secret,
            api_base,
            api_key_env: el
                .api_key_env
                .unwrap_or_else(|| "ELEVENLABS_API_KEY".into()),
            init_providers: el.init_providers,
            max_webhook_bytes: positive(
                el.max_webhook_bytes,
                64 * 1024 * 1024,
                "[elevenlabs] max_webhook_bytes",
                p,
            ),
            webhook_memory_budget_bytes: budget,
            webhook_reserved_bytes: reserved,
            webhook_share_bytes: share,
            webhook_min_bytes_per_sec: el.webhook_min_bytes_per_sec.unwrap_or(64 * 1024),
            webhook_min_rate_grace_secs: positive(
                el.webhook_min_rate_grace_secs,
                3,
                "[elevenlabs] webhook_min_rate_grace_secs",
                p,
            ),
            webhook_tolerance_secs: i64::try_from(el.webhook_tolerance_secs.unwrap_or(1800))
                .unwrap_or(i64::MAX),
            tool_response_timeout_secs: tool_timeout,
            mcp_approval_policy,
        };

        if budget - reserved < elevenlabs.max_webhook_bytes {
            w.push(format!("[elevenlabs] webhook_memory_budget_bytes ({budget}) less webhook_reserved_bytes ({reserved}) is below max_webhook_bytes ({}): post-call bodies larger than {} bytes will always be answered 503", elevenlabs.max_webhook_bytes, budget - reserved));
        }
        let l = raw.limits;
        let limits = LimitsConfig {
            per_session_rps: l.per_session_rps.unwrap_or(0.0),
            per_session_burst: l.per_session_burst.unwrap_or(0),
            per_user_rps: l.per_user_rps.unwrap_or(0.0),
            per_user_burst: l.per_user_burst.unwrap_or(0),
        };
        for (name, v) in [
            ("per_session_rps", limits.per_session_rps),
            ("per_user_rps", limits.per_user_rps),
        ] {
            if !v.is_finite() || v < 0.0 {
                p.push(format!(
                    "[limits] {name} must be 0 (off) or a positive number"
                ));
            }
        }

        let audit = AuditConfig {
            enabled: raw.audit.enabled.unwrap_or(true),
            max_records: raw.audit.max_records.unwrap_or(100_000).max(1),
        };

        let oauth = OAuthConfig {
            bind_browser: raw.oauth.bind_browser.unwrap_or(true),
        };
        if !oauth.bind_browser {
            w.push("[oauth] bind_browser = false: a bare authorize_url completes a sign-in in any browser, so a forwarded link can connect someone else's account; keep it true unless the main app binds the flow itself".into());
        }
        let connect = ConnectConfig::from_raw(raw.connect, p);

        let mut providers = BTreeMap::new();
        for (name, rp) in raw.providers {
            for (key, value, max) in [
                ("display_name", &rp.display_name, 64),
                ("description", &rp.description, 300),
            ] {
                if let Some(v) = value {
                    if !page_text_ok(v, max) {
                        p.push(format!("[providers.{name}] {key}: 1-{max} characters without control characters"));
                    }
                }
            }
            if !valid_id(&name) {
                p.push(format!(
                    "[providers.{name}] provider names are 1-128 characters of A-Za-z0-9._@:+-"
                ));
            }
            let sec = format!("[providers.{name}]");
            let jwt = JwtConfig::from_raw(dir, &rp);
            let client_id = SecretSource::from_parts(
                dir,
                rp.client_id_file,
                rp.client_id_env,
                rp.client_id.map(Secret::new),
                &format!("{sec} client_id / client_id_env / client_id_file"),
                p,
            );
            let client_secret = SecretSource::from_parts(
                dir,
                rp.client_secret_file,
                rp.client_secret_env,
                rp.client_secret.map(Secret::new),
                &format!("{sec} client_secret / client_secret_env / client_secret_file"),
                p,
            );
            if matches!(client_secret, SecretSource::Inline(_)) {
                w.push(format!("{sec} client_secret is inline in the config file; prefer client_secret_env or client_secret_file"));
            }
            providers.insert(
                name,
                ProviderConfig {
                    raw_inject: rp.inject,
                    preset: rp.preset,
                    display_name: rp.display_name,
                    description: rp.description,
                    base_url: rp.base_url,
                    token_url: rp.token_url,
                    authorize_url: rp.authorize_url,
                    client_id,
                    client_secret,
                    client_auth: rp.client_auth,
                    refresh_skew_secs: rp.refresh_skew_secs,
                    refresh_cooldown_secs: rp.refresh_cooldown_secs,
                    allow: rp.allow.unwrap_or_default(),
                    grant: rp.grant,
                    scopes: rp.scopes,
                    user_scopes: rp.user_scopes,
                    scope_separator: rp.scope_separator,
                    authorize_params: rp.authorize_params.unwrap_or_default(),
                    token_params: rp.token_params.unwrap_or_default(),
                    allow_http: rp.allow_http.unwrap_or(false),
                    tools: rp.tools.unwrap_or_default(),
                    credential_from: rp.credential_from,
                    headers: rp.headers.unwrap_or_default(),
                    connection: rp.connection.unwrap_or_default(),
                    pkce: rp.pkce,
                    jwt,
                },
            );
        }
        for (name, pc) in &providers {
            let Some(from) = &pc.credential_from else {
                continue;
            };
            match providers.get(from) {
                None => p.push(format!(
                    "[providers.{name}] credential_from: {from:?} is not a configured provider"
                )),
                Some(owner) if owner.credential_from.is_some() => p.push(format!(
                    "[providers.{name}] credential_from: {from:?} itself uses credential_from; name the provider that holds the credential"
                )),
                Some(_) => {}
            }
        }
        let mut tools = BTreeMap::new();
        for (name, rt) in raw.tools {
            let sec = format!("[tools.{name}]");
            if let Some(t) = tools::check_tool(&sec, &name, rt, p) {
                if !providers.contains_key(&t.provider) {
                    p.push(format!(
                        "{sec} provider: {:?} is not a configured provider",
                        t.provider
                    ));
                }
                tools.insert(name, t);
            }
        }
        let mut mcp_servers = BTreeMap::new();
        for (name, rm) in raw.mcp_servers {
            if let Some(m) = tools::check_mcp_server(&name, rm, p) {
                if !providers.contains_key(&m.provider) {
                    p.push(format!(
                        "[mcp_servers.{name}] provider: {:?} is not a configured provider",
                        m.provider
                    ));
                }
                mcp_servers.insert(name, m);
            }
        }
        let vapi = VapiConfig::from_raw(dir, raw.vapi, p);
        let retell = RetellConfig::from_raw(dir, raw.retell, p);
        if let Some(list) = &elevenlabs.init_providers {
            for name in list {
                if !providers.contains_key(name) {
                    p.push(format!("[elevenlabs] init_providers names {name:?}, which is not a configured provider"));
                }
            }
        }

        Config {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            server,
            admin,
            store,
            sessions,
            elevenlabs,
            limits,
            audit,
            oauth,
            connect,
            providers,
            tools,
            mcp_servers,
            vapi,
            retell,
            warnings: Vec::new(),
        }
    }
}

/// The raw shape, and every unknown key and type error in it. serde stops
/// at the first such error, so each one found is recorded and its lines
/// blanked (line numbers stay right), until the rest parses; a syntax error
/// stops there, as what follows it cannot be read reliably.
fn parse_raw(text: &str, path: &Path) -> Result<(RawConfig, Vec<String>), Vec<String>> {
    // The error's own Display quotes the offending line, which could hold an
    // inline secret: report the position and message only.
    let describe = |e: &toml::de::Error, text: &str| {
        let msg = plain(&without_values(e.message().trim()));
        let Some(span) = e.span() else {
            return format!("{}: {msg}", path.display());
        };
        let at = span.start.min(text.len());
        let line = text[..at].matches('\n').count() + 1;
        // Name the key (never the value) when the message does not.
        let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
        let key = text[line_start..]
            .lines()
            .next()
            .and_then(|l| l.split_once('='))
            .map(|(k, _)| k.trim())
            .filter(|k| !k.is_empty() && !k.starts_with('[') && !msg.contains(*k));
        // The table the line is in, as written (`[providers.slack]`).
        let table = text[..line_start]
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .and_then(|l| l.split('#').next())
            .map(|l| format!(" {}", l.trim()))
            .unwrap_or_default();
        match key {
            Some(k) => format!("{} (line {line}){table} {k}: {msg}", path.display()),
            None => format!("{} (line {line}){table}: {msg}", path.display()),
        }
    };
    if let Err(e) = text.parse::<toml::Table>() {
        return Err(vec![describe(&e, text)]);
    }
    let mut problems: Vec<String> = Vec::new();
    let mut current = text.to_owned();
    for _ in 0..100 {
        let e = match toml::from_str::<RawConfig>(&current) {
            Ok(raw) => {
                problems.sort_by_key(|m| line_of(m));
                return Ok((raw, problems));
            }
            Err(e) => e,
        };
        problems.push(describe(&e, &current));
        let Some(span) = e.span() else { break };
        let start = current[..span.start.min(current.len())]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        let end = current[span.end.min(current.len())..]
            .find('\n')
            .map_or(current.len(), |i| span.end + i);
        let blanked: String = current[start..end]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect();
        let next = format!("{}{blanked}{}", &current[..start], &current[end..]);
        if next == current {
            break;
        }
        current = next;
    }
    problems.sort_by_key(|m| line_of(m));
    Err(problems)
}

/// The line a parse problem names, to list them in file order.
fn line_of(m: &str) -> usize {
    m.split_once("(line ")
        .and_then(|(_, r)| r.split(')').next())
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0)
}

/// toml quotes the offending value for type errors; a value may be an
/// inline secret, so type errors keep only the value's kind.
/// serde's wording in a user's words: an unknown key with the closest valid
/// one, and types as words (`an integer`, not `u64`).
fn plain(msg: &str) -> String {
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some((field, tail)) = rest.split_once('`') {
            let valid: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
            let best = valid
                .iter()
                .map(|v| (strsim::damerau_levenshtein(field, v), *v))
                .min();
            let limit = if field.len() > 6 { 3 } else { 2 };
            return match best {
                Some((d, v)) if d <= limit => {
                    format!("unknown key `{field}`; did you mean `{v}`?")
                }
                _ if valid.is_empty() => format!("unknown key `{field}`"),
                _ => format!(
                    "unknown key `{field}`; the keys here are {}",
                    valid.join(", ")
                ),
            };
        }
    }
    let mut out = msg.to_owned();
    for (rust, words) in [
        ("expected u64", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected u16", "expected a whole number"),
        ("expected u8", "expected a whole number"),
        ("expected usize", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected i32", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected a sequence", "expected a list"),
        ("expected a map", "expected a table"),
        ("invalid type: sequence", "invalid type: list"),
        ("invalid type: map", "invalid type: table"),
    ] {
        out = out.replace(rust, words);
    }
    if let Some(i) = out.find("expected struct ") {
        out.replace_range(i.., "expected a table");
    }
    out
}

fn without_values(msg: &str) -> String {
    if !(msg.starts_with("invalid type") || msg.starts_with("invalid value")) {
        return msg.to_owned();
    }
    // `invalid type: string "hunter2", expected u64`: keep the kind only.
    if let (Some(rest), Some(exp)) = (msg.strip_prefix("invalid type: "), msg.find(", expected")) {
        let kind = rest.split([' ', ',']).next().unwrap_or("value");
        return format!("invalid type: {kind}{}", &msg[exp..]);
    }
    if let (true, Some(exp)) = (msg.starts_with("invalid value"), msg.find(", expected")) {
        return format!("invalid value (hidden){}", &msg[exp..]);
    }
    let mut out = String::new();
    let mut inside = false;
    for c in msg.chars() {
        if c == '`' {
            inside = !inside;
            if inside {
                out.push_str("(value hidden)");
            }
        } else if !inside {
            out.push(c);
        }
    }
    out
}

fn parse_addr(s: &str, what: &str, p: &mut Vec<String>) -> SocketAddr {
    match s.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            let fixed = s.replace("localhost", "127.0.0.1");
            match fixed.parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => {
                    p.push(format!(
                        "{what} = {s:?} is not an IP:port address, e.g. \"127.0.0.1:8444\""
                    ));
                    SocketAddr::from(([127, 0, 0, 1], 0))
                }
            }
        }
    }
}

fn positive(v: Option<u64>, default: u64, what: &str, p: &mut Vec<String>) -> u64 {
    match v {
        None => default,
        Some(0) => {
            p.push(format!("{what} must be greater than 0"));
            default
        }
        Some(v) => v,
    }
}

/// Loopback hosts may be reached over plain HTTP (local fakes, sidecars).
pub fn is_loopback_url(u: &Url) -> bool {
    match u.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Vec<String>> {
        Config::parse(
            text,
            Path::new("/etc/sidekey/config.toml"),
            Path::new("/etc/sidekey"),
        )
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = parse("").unwrap();
        assert_eq!(c.server.listen.port(), 8443);
        assert_eq!(c.server.public_url, "https://localhost:8443");
        assert_eq!(c.store.path, PathBuf::from("/etc/sidekey/data/sidekey.db"));
        assert_eq!(
            c.store.master_key,
            SecretSource::File(PathBuf::from("/etc/sidekey/data/master.key"))
        );
        assert_eq!(c.sessions.dynamic_variable, "secret__sidekey_session");
        assert_eq!(c.server.max_body_bytes, 1_048_576);
        assert!(!c.store.generate_missing);
    }

    #[test]
    fn unknown_keys_are_errors_with_a_line() {
        let e = parse("[server]\nlisten = \"127.0.0.1:1\"\nlisten_addr = 3\n").unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(e[0].contains("line 3"), "{e:?}");
        assert!(e[0].contains("listen_addr"), "{e:?}");
    }

    #[test]
    fn collects_every_problem() {
        let e = parse(
            "[server]\nlisten = \"nope\"\nmax_body_bytes = 0\n[admin]\nlisten = \"0.0.0.0:9\"\n[sessions]\ndynamic_variable = \"session\"\n",
        )
        .unwrap_err();
        assert!(e.len() >= 4, "{e:?}");
        assert!(e.iter().any(|m| m.contains("[server] listen")));
        assert!(e.iter().any(|m| m.contains("max_body_bytes")));
        assert!(e.iter().any(|m| m.contains("[admin] listen")));
        assert!(e.iter().any(|m| m.contains("secret__")));
    }

    #[test]
    fn unknown_keys_and_type_errors_are_reported_together() {
        let e = parse(
            "[server]\nmax_body_bytes = \"big\"\nlisten_addr = 3\n[store]\ngenerate_missing = \"yes\"\n[providers.x]\nbase_url = \"https://a\"\nscopes = [\n  1,\n]\nbase = 1\n",
        )
        .unwrap_err();
        assert_eq!(e.len(), 5, "{e:?}");
        for (line, what) in [
            ("line 2)", "max_body_bytes"),
            ("line 3)", "listen_addr"),
            ("line 5)", ""),
            ("line 11)", "base"),
        ] {
            assert!(
                e.iter().any(|m| m.contains(line) && m.contains(what)),
                "{line} {what}: {e:?}"
            );
        }
        assert!(
            e.iter()
                .any(|m| m.contains("line 8)") || m.contains("line 9)")),
            "{e:?}"
        );
        assert!(e[0].contains("line 2)"), "file order: {e:?}");
        assert!(
            !e.iter().any(|m| m.contains("big")),
            "values never echoed: {e:?}"
        );
    }

    #[test]
    fn parse_error_does_not_echo_inline_secret() {
        let e = parse("[providers.x]\nbase_url = \"https://a\"\nclient_secret = 12345678\n")
            .unwrap_err();
        assert!(!e[0].contains("12345678"), "{e:?}");
    }

    #[test]
    fn connect_theming_and_bind_browser_are_validated() {
        let c = parse("").unwrap();
        assert!(c.oauth.bind_browser, "bound by default");
        assert!(!c.connect.confirm, "no confirmation step by default");
        assert_eq!(c.connect.accent_color, "#2563eb");
        assert!(
            parse("[connect]\nconfirm = true\n")
                .unwrap()
                .connect
                .confirm
        );
        let c = parse(
            "[oauth]\nbind_browser = false\n[connect]\napp_name = \"Acme\"\naccent_color = \"#0F8\"\nlogo_url = \"https://cdn.example/l.svg\"\n",
        )
        .unwrap();
        assert!(!c.oauth.bind_browser);
        assert!(c.warnings.iter().any(|w| w.contains("bind_browser")));
        assert_eq!(c.connect.accent_color, "#00ff88");
        assert_eq!(c.connect.app_name.as_deref(), Some("Acme"));
        let e = parse(
            "[connect]\napp_name = \"a\\nb\"\naccent_color = \"red;}body{x\"\nlogo_url = \"javascript:alert(1)\"\n[providers.x]\nbase_url = \"https://x.example\"\ndescription = \"\"\n",
        )
        .unwrap_err();
        for key in ["app_name", "accent_color", "logo_url", "description"] {
            assert!(e.iter().any(|m| m.contains(key)), "{key}: {e:?}");
        }
        assert!(parse("[connect]\nlogo_url = \"http://cdn.example/l.png\"\n").is_err());
        let e = parse("[connect]\napp_url = \"http://app.example\"\n").unwrap_err();
        assert!(
            e[0].contains("[connect] app_url") && e[0].contains("https://"),
            "{e:?}"
        );
        let c = parse(
            "[connect]\napp_url = \"https://app.example/home\"\naccent_color = \"#ffeb3b\"\n",
        );
        let c = c.unwrap().connect;
        assert_eq!(c.app_url.unwrap().as_str(), "https://app.example/home");
        assert_eq!(c.accent_text, "#000000", "black text on yellow");
    }

    #[test]
    fn ids() {
        assert!(valid_id("u1"));
        assert!(valid_id("alice@example.com"));
        assert!(valid_id("a.b:c+d-e_f"));
        assert!(!valid_id(""));
        assert!(!valid_id("a/b"));
        assert!(!valid_id("a b"));
        assert!(!valid_id(&"x".repeat(129)));
        assert!(valid_id(&"x".repeat(128)));
    }
}
