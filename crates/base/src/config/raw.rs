//! The TOML shape, as serde reads it: every key optional, unknown keys
//! refused. `Config::from_raw` turns it into the resolved types.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::tools;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) store: RawStore,
    #[serde(default)]
    pub(super) sessions: RawSessions,
    #[serde(default)]
    pub(super) elevenlabs: RawElevenLabs,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) audit: RawAudit,
    #[serde(default)]
    pub(super) oauth: RawOAuth,
    #[serde(default)]
    pub(super) connect: RawConnect,
    #[serde(default)]
    pub(super) providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    pub(super) tools: BTreeMap<String, tools::RawTool>,
    #[serde(default)]
    pub(super) mcp_servers: BTreeMap<String, tools::RawMcpServer>,
    #[serde(default)]
    pub(super) vapi: tools::RawVapi,
    #[serde(default)]
    pub(super) retell: tools::RawRetell,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOAuth {
    pub(super) bind_browser: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConnect {
    pub(super) app_name: Option<String>,
    pub(super) accent_color: Option<String>,
    pub(super) logo_url: Option<String>,
    pub(super) app_url: Option<String>,
    pub(super) confirm: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) public_url: Option<String>,
    pub(super) tls: Option<bool>,
    pub(super) tls_cert: Option<String>,
    pub(super) tls_key: Option<String>,
    pub(super) max_body_bytes: Option<u64>,
    pub(super) upstream_timeout_secs: Option<u64>,
    pub(super) connect_timeout_secs: Option<u64>,
    pub(super) shutdown_grace_secs: Option<u64>,
    pub(super) max_connections: Option<usize>,
    pub(super) header_read_timeout_secs: Option<u64>,
    pub(super) tls_handshake_timeout_secs: Option<u64>,
    pub(super) max_header_bytes: Option<usize>,
    pub(super) h2_max_concurrent_streams: Option<u32>,
    pub(super) upstream_ca_file: Option<String>,
    pub(super) max_pending_per_ip: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<String>,
    pub(super) token_file: Option<String>,
    pub(super) token_env: Option<String>,
    pub(super) allow_remote: Option<bool>,
    pub(super) metrics_listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) path: Option<String>,
    pub(super) master_key_file: Option<String>,
    pub(super) master_key_env: Option<String>,
    pub(super) previous_master_key_files: Option<Vec<String>>,
    pub(super) generate_missing: Option<bool>,
    pub(super) flush_every_ms: Option<u64>,
    pub(super) cache_ttl_secs: Option<u64>,
    pub(super) cache_max_entries: Option<usize>,
    pub(super) backend: Option<String>,
    pub(super) postgres_url: Option<String>,
    pub(super) postgres_url_env: Option<String>,
    pub(super) postgres_url_file: Option<String>,
    pub(super) postgres_pool_size: Option<u64>,
    pub(super) postgres_timeout_secs: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSessions {
    pub(super) issuer: Option<String>,
    pub(super) audience: Option<String>,
    pub(super) ttl_secs: Option<u64>,
    pub(super) max_ttl_secs: Option<u64>,
    pub(super) signing_key_file: Option<String>,
    pub(super) signing_key_env: Option<String>,
    pub(super) previous_signing_key_files: Option<Vec<String>>,
    pub(super) dynamic_variable: Option<String>,
    pub(super) require_conversation_header: Option<bool>,
    pub(super) bind_within_secs: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawElevenLabs {
    pub(super) conversation_header: Option<String>,
    pub(super) webhook_secret_env: Option<String>,
    pub(super) webhook_secret_file: Option<String>,
    pub(super) init_secret_env: Option<String>,
    pub(super) init_secret_file: Option<String>,
    pub(super) api_base: Option<String>,
    pub(super) api_key_env: Option<String>,
    pub(super) init_providers: Option<Vec<String>>,
    pub(super) max_webhook_bytes: Option<u64>,
    pub(super) webhook_memory_budget_bytes: Option<u64>,
    pub(super) webhook_reserved_bytes: Option<u64>,
    pub(super) webhook_share_bytes: Option<u64>,
    pub(super) webhook_min_bytes_per_sec: Option<u64>,
    pub(super) webhook_min_rate_grace_secs: Option<u64>,
    pub(super) webhook_tolerance_secs: Option<u64>,
    pub(super) tool_response_timeout_secs: Option<u64>,
    pub(super) mcp_approval_policy: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) per_session_rps: Option<f64>,
    pub(super) per_session_burst: Option<u32>,
    pub(super) per_user_rps: Option<f64>,
    pub(super) per_user_burst: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub(super) enabled: Option<bool>,
    pub(super) max_records: Option<usize>,
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
