//! The resolved configuration: defaults applied, paths absolute, secrets
//! named by their sources.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use url::Url;

use super::raw::{ConnectionConfig, RawConnect, RawInject};
use super::{
    JwtConfig, McpServerConfig, RetellConfig, SecretSource, ToolConfig, VapiConfig, is_loopback_url,
};

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
    pub(super) fn from_raw(c: RawConnect, p: &mut Vec<String>) -> ConnectConfig {
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
            Ok(u)
                if u.scheme() == "https"
                    && u.username().is_empty()
                    && u.password().is_none()
                    && l.len() <= 2048 =>
            {
                Some(u)
            }
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
