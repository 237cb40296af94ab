//! One function per core section of `config.toml`: each resolves its raw
//! table (defaults, paths against the config's directory), records what is
//! wrong in `p` and what is only risky in `w`, and returns the section.

use std::net::SocketAddr;
use std::path::Path;

use url::Url;

use super::raw::{
    RawAdmin, RawAudit, RawElevenLabs, RawLimits, RawOAuth, RawServer, RawSessions, RawStore,
};
use super::{
    AdminConfig, AuditConfig, ElevenLabsConfig, LimitsConfig, OAuthConfig, SecretSource,
    ServerConfig, SessionsConfig, StoreBackend, StoreConfig, is_loopback_url, resolve,
};
use crate::secret::Secret;

/// `[server]`.
pub(super) fn server(
    s: RawServer,
    dir: &Path,
    p: &mut Vec<String>,
    w: &mut Vec<String>,
) -> ServerConfig {
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
        p.push("[server] max_header_bytes: at least 8192 is needed for ordinary requests".into());
    }
    server
}

/// `[admin]`; its listener must differ from the agent-facing one.
pub(super) fn admin(
    a: RawAdmin,
    dir: &Path,
    server_listen: SocketAddr,
    p: &mut Vec<String>,
    w: &mut Vec<String>,
) -> AdminConfig {
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
    if admin.listen == server_listen && admin.listen.port() != 0 {
        p.push("[admin] listen: must differ from [server] listen".into());
    }
    admin
}

/// `[store]`; a database call is bounded below the upstream timeout by default.
pub(super) fn store(
    st: RawStore,
    dir: &Path,
    upstream_timeout: u64,
    p: &mut Vec<String>,
) -> StoreConfig {
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
    let postgres_timeout_secs = positive(
        st.postgres_timeout_secs,
        5.min(upstream_timeout),
        "[store] postgres_timeout_secs",
        p,
    );
    StoreConfig {
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
    }
}

/// `[sessions]`.
pub(super) fn sessions(se: RawSessions, dir: &Path, p: &mut Vec<String>) -> SessionsConfig {
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
    SessionsConfig {
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
    }
}

/// `[elevenlabs]`; the tool response timeout defaults to just above the
/// upstream timeout, so sidekey's own timeout answer can still arrive.
pub(super) fn elevenlabs(
    el: RawElevenLabs,
    dir: &Path,
    upstream_timeout_secs: u64,
    p: &mut Vec<String>,
    w: &mut Vec<String>,
) -> ElevenLabsConfig {
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
        .unwrap_or((upstream_timeout_secs + 10).clamp(5, 120));
    if !(5..=300).contains(&tool_timeout) {
        p.push("[elevenlabs] tool_response_timeout_secs must be between 5 and 300 (ElevenLabs' limits)".into());
    }
    if tool_timeout <= upstream_timeout_secs {
        w.push(format!("[elevenlabs] tool_response_timeout_secs ({tool_timeout}) is not above [server] upstream_timeout_secs ({upstream_timeout_secs}): ElevenLabs may give up before sidekey's own timeout answer arrives"));
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
    elevenlabs
}

/// `[limits]`.
pub(super) fn limits(l: RawLimits, p: &mut Vec<String>) -> LimitsConfig {
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
    limits
}

/// `[audit]`.
pub(super) fn audit(a: RawAudit) -> AuditConfig {
    AuditConfig {
        enabled: a.enabled.unwrap_or(true),
        max_records: a.max_records.unwrap_or(100_000).max(1),
    }
}

/// `[oauth]`.
pub(super) fn oauth(o: RawOAuth, w: &mut Vec<String>) -> OAuthConfig {
    let oauth = OAuthConfig {
        bind_browser: o.bind_browser.unwrap_or(true),
    };
    if !oauth.bind_browser {
        w.push("[oauth] bind_browser = false: a bare authorize_url completes a sign-in in any browser, so a forwarded link can connect someone else's account; keep it true unless the main app binds the flow itself".into());
    }
    oauth
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
