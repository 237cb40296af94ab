//! `App`: the shared state every request handler gets, built once at start.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::error::ApiError;
use sidekey_base::clock::Clock;
use sidekey_base::config::Config;
use sidekey_base::errors::Fatal;
use sidekey_base::limits::RateLimits;
use sidekey_base::metrics::Metrics;
use sidekey_base::secret::Secret;
use sidekey_creds::audit::AuditLog;
use sidekey_creds::bootstrap::Loaded;
use sidekey_creds::client::HttpClient;
use sidekey_creds::providers::Providers;
use sidekey_creds::refresh::RefreshCoordinator;
use sidekey_creds::session::SessionAuthority;
use sidekey_creds::tools::Catalogue;
use sidekey_vault::Store;

pub struct App {
    pub config: Config,
    pub providers: Providers,
    /// Every operation tool: `[tools.NAME]` and the presets' enabled ones.
    pub tools: Catalogue,
    pub store: Arc<Store>,
    pub sessions: SessionAuthority,
    pub refresher: RefreshCoordinator,
    /// Pooled client for upstreams, token endpoints and the ElevenLabs API.
    pub client: HttpClient,
    pub metrics: Arc<Metrics>,
    pub audit: AuditLog,
    pub limits: RateLimits,
    pub clock: Clock,
    /// SHA-256 of the admin token: compared in constant time, and the token
    /// itself is not kept in memory.
    pub admin_token_hash: [u8; 32],
    pub webhook_secret: Option<Secret>,
    pub init_secret: Option<Secret>,
    pub vapi_secret: Option<Secret>,
    pub vapi_hmac_secret: Option<Secret>,
    pub retell_api_key: Option<Secret>,
    /// Memory held by post-call bodies being read, all together.
    pub webhook_bodies: sidekey_base::limits::ByteBudget,
    /// `Mcp-Session-Id`s issued and ended here (they carry no identity).
    pub mcp_sessions: crate::mcp::sessions::McpSessions,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("store", &self.store).finish()
    }
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

impl App {
    /// `unknown_provider` for the main app: lists the configured providers.
    pub fn unknown_provider(&self, name: &str) -> ApiError {
        ApiError::UnknownProviderAdmin {
            // Names from a session body are not validated ids: bound the echo.
            name: name.chars().take(128).collect(),
            configured: self.providers.names().to_vec(),
        }
    }

    /// Opens the store and wires every component. Must run inside a tokio
    /// runtime (it starts the audit writer and the session GC).
    pub async fn new(config: Config, loaded: Loaded, clock: Clock) -> Result<Arc<App>, Fatal> {
        let providers = Providers::from_config(&config).map_err(|e| Fatal::new(e.join("; ")))?;
        let tools =
            Catalogue::from_config(&config, &providers).map_err(|e| Fatal::new(e.join("; ")))?;
        let store = open_store(&config, loaded.keys).await?;
        let store = Arc::new(store);
        let extra_roots = match &config.server.upstream_ca_file {
            Some(p) => sidekey_base::tls::load_roots(p)
                .map_err(|e| Fatal::new(format!("server.upstream_ca_file: {e}")))?,
            None => Vec::new(),
        };
        let client = sidekey_creds::client::build(
            Duration::from_secs(config.server.connect_timeout_secs),
            extra_roots,
        );
        let metrics = Arc::new(Metrics::new());
        metrics.declare_providers(providers.iter().map(|p| &p.metric_label));
        let sessions = SessionAuthority::new(
            loaded.session_keys,
            config.sessions.issuer.clone(),
            config.sessions.audience.clone(),
            store.clone(),
            clock.clone(),
        );
        let refresher = RefreshCoordinator::new(
            store.clone(),
            client.clone(),
            clock.clone(),
            metrics.clone(),
            Duration::from_secs(config.server.upstream_timeout_secs),
        );
        let audit = AuditLog::start(
            store.clone(),
            config.audit.enabled,
            config.audit.max_records,
        );
        let limits = RateLimits::new(&config.limits);
        let app = Arc::new(App {
            admin_token_hash: sha256(loaded.admin_token.expose().as_bytes()),
            webhook_secret: loaded.webhook_secret,
            init_secret: loaded.init_secret,
            vapi_secret: loaded.vapi_secret,
            vapi_hmac_secret: loaded.vapi_hmac_secret,
            retell_api_key: loaded.retell_api_key,
            webhook_bodies: sidekey_base::limits::ByteBudget::new(
                config.elevenlabs.webhook_memory_budget_bytes,
            ),
            mcp_sessions: crate::mcp::sessions::McpSessions::default(),
            config,
            providers,
            tools,
            store,
            sessions,
            refresher,
            client,
            metrics,
            audit,
            limits,
            clock,
        });
        spawn_gc(&app);
        Ok(app)
    }
}

pub use sidekey_creds::bootstrap::{open_store, store_location};

/// How long after expiry an OAuth state is still kept (see `spawn_gc`).
const OAUTH_STATE_GC_GRACE_SECS: i64 = 3600;
/// How long after expiry a connect ticket is kept: a flow started just
/// before the link expired can still find its binding at the callback.
const CONNECT_TICKET_GC_GRACE_SECS: i64 = 3600;

/// Removes expired sessions, OAuth states and connect tickets (and, on
/// PostgreSQL, trims the
/// audit log) once a minute. One replica does it per round: the round is a
/// claim that is left to lapse. Holds only a weak reference so it ends
/// with the app.
fn spawn_gc(app: &Arc<App>) {
    let weak = Arc::downgrade(app);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(GC_EVERY);
        loop {
            tick.tick().await;
            let Some(app) = weak.upgrade() else { break };
            let store = app.store.clone();
            match store
                .claim(
                    "gc",
                    GC_EVERY - Duration::from_secs(5),
                    app.clock.now_millis(),
                )
                .await
            {
                Ok(sidekey_vault::ClaimOutcome::Granted(_)) => {}
                Ok(_) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "garbage collection skipped");
                    continue;
                }
            }
            let now = app.clock.now();
            let max_audit = app.config.audit.max_records;
            let rt = tokio::runtime::Handle::current();
            // sled's scans block: off the request workers.
            let res = tokio::task::spawn_blocking(move || {
                rt.block_on(async {
                    // Expired OAuth states are kept an hour longer: they can
                    // no longer complete a sign-in, but a late callback can
                    // still send the browser back to `return_to?error=state_expired`.
                    let s = store.gc_sessions(now).await?;
                    let o = store
                        .gc_oauth_states(now - OAUTH_STATE_GC_GRACE_SECS)
                        .await?;
                    let t = store
                        .gc_connect_tickets(now - CONNECT_TICKET_GC_GRACE_SECS)
                        .await?
                        + store.gc_pending_credentials(now).await?;
                    store.trim_audit(max_audit).await?;
                    Ok::<_, sidekey_vault::StoreError>((s, o + t))
                })
            })
            .await;
            match res {
                Ok(Ok((s, o))) if s + o > 0 => {
                    tracing::debug!(sessions = s, oauth_states = o, "expired records removed")
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "garbage collection failed"),
                _ => {}
            }
        }
    });
}

const GC_EVERY: Duration = Duration::from_secs(60);
