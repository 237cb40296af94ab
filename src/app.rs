//! `App`: the shared state every request handler gets, built once at start.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::audit::AuditLog;
use crate::bootstrap::Loaded;
use crate::client::HttpClient;
use crate::clock::Clock;
use crate::config::Config;
use crate::error::Fatal;
use crate::limits::RateLimits;
use crate::metrics::Metrics;
use crate::providers::Providers;
use crate::refresh::RefreshCoordinator;
use crate::secret::Secret;
use crate::session::SessionAuthority;
use crate::store::{OpenError, Store, StoreOptions};

pub struct App {
    pub config: Config,
    pub providers: Providers,
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
    /// Memory held by post-call bodies being read, all together.
    pub webhook_bodies: crate::limits::ByteBudget,
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
    /// Opens the store and wires every component. Must run inside a tokio
    /// runtime (it starts the audit writer and the session GC).
    pub fn new(config: Config, loaded: Loaded, clock: Clock) -> Result<Arc<App>, Fatal> {
        let providers = Providers::from_config(&config).map_err(|e| Fatal::new(e.join("; ")))?;
        let store = Store::open(
            &config.store.path,
            loaded.keys,
            StoreOptions {
                flush_every_ms: config.store.flush_every_ms,
                cache_ttl: Duration::from_secs(config.store.cache_ttl_secs),
                cache_max_entries: config.store.cache_max_entries,
            },
        )
        .map_err(|e| match e {
            OpenError::WrongKey(m) | OpenError::Locked(m) | OpenError::Other(m) => Fatal::new(m),
        })?;
        let store = Arc::new(store);
        let extra_roots = match &config.server.upstream_ca_file {
            Some(p) => crate::bootstrap::load_roots(p)
                .map_err(|e| Fatal::new(format!("server.upstream_ca_file: {e}")))?,
            None => Vec::new(),
        };
        let client = crate::client::build(
            Duration::from_secs(config.server.connect_timeout_secs),
            extra_roots,
        );
        let metrics = Arc::new(Metrics::new());
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
            webhook_bodies: crate::limits::ByteBudget::new(
                config.elevenlabs.webhook_memory_budget_bytes,
            ),
            config,
            providers,
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

/// How long after expiry an OAuth state is still kept (see `spawn_gc`).
const OAUTH_STATE_GC_GRACE_SECS: i64 = 3600;

/// Removes expired sessions and OAuth states once a minute. Holds only a
/// weak reference so it ends with the app.
fn spawn_gc(app: &Arc<App>) {
    let weak = Arc::downgrade(app);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            let Some(app) = weak.upgrade() else { break };
            let store = app.store.clone();
            let now = app.clock.now();
            let res = tokio::task::spawn_blocking(move || {
                // Expired OAuth states are kept an hour longer: they can
                // no longer complete a sign-in, but a late callback can
                // still send the browser back to `return_to?error=state_expired`.
                (
                    store.gc_sessions(now),
                    store.gc_oauth_states(now - OAUTH_STATE_GC_GRACE_SECS),
                )
            })
            .await;
            if let Ok((s, o)) = res {
                match (s, o) {
                    (Ok(s), Ok(o)) if s + o > 0 => {
                        tracing::debug!(sessions = s, oauth_states = o, "expired records removed")
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::warn!(error = %e, "garbage collection failed")
                    }
                    _ => {}
                }
            }
        }
    });
}
