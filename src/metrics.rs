//! Prometheus metrics: what operators graph and alert on.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A label value made once (per configured provider) and shared: the
/// request path builds label sets without allocating.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Label(Arc<str>);

impl Label {
    pub fn new(s: &str) -> Label {
        Label(Arc::from(s))
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    provider: Label,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    provider: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    worker: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    event: String,
    outcome: &'static str,
}

type LatencyFamily = Family<ProviderLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 250 µs … ~8 s
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    upstream_latency: LatencyFamily,
    refresh: Family<OutcomeLabels, Counter>,
    token_calls: Family<TokenLabels, Counter>,
    webhooks: Family<WebhookLabels, Counter>,
    unauthenticated: Family<ReasonLabels, Counter>,
    session_conflicts: Counter,
    sessions_active: Gauge,
    credentials: Gauge,
    store_bytes: Gauge,
    connections: Gauge,
    worker_connections: Family<WorkerLabels, Gauge>,
    /// Requests answered `store_unavailable` (the Postgres backend could not
    /// be reached); alerting needs it even while it stays at 0.
    store_unavailable: Counter,
    connections_refused: Family<ReasonLabels, Counter>,
    none: Label,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sidekey");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "proxy_requests",
            "Proxied requests by provider and answered status",
            requests.clone(),
        );
        let upstream_latency: LatencyFamily =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "upstream_latency_seconds",
            "Time from sending a request upstream to its response headers",
            upstream_latency.clone(),
        );
        let refresh = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "refresh",
            "Token refresh outcomes (refreshed, shared, cooldown, failed, backoff, reauth_required)",
            refresh.clone(),
        );
        let token_calls = Family::<TokenLabels, Counter>::default();
        registry.register(
            "token_endpoint_calls",
            "Calls made to provider token endpoints",
            token_calls.clone(),
        );
        let webhooks = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "webhooks",
            "ElevenLabs webhooks by event and outcome",
            webhooks.clone(),
        );
        let unauthenticated = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "unauthenticated_requests",
            "Agent-facing requests refused for their session token, by reason (aggregated in the audit log, not one record each)",
            unauthenticated.clone(),
        );
        let session_conflicts = Counter::default();
        registry.register(
            "session_conflicts",
            "Sessions revoked because a second conversation used them",
            session_conflicts.clone(),
        );
        let sessions_active = Gauge::default();
        registry.register(
            "sessions_active",
            "Session records in the store (not yet expired or revoked)",
            sessions_active.clone(),
        );
        let credentials = Gauge::default();
        registry.register(
            "credentials",
            "Credential records in the store",
            credentials.clone(),
        );
        let store_bytes = Gauge::default();
        registry.register(
            "store_size_bytes",
            "Size of the store on disk",
            store_bytes.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections_active",
            "Open client connections on both listeners",
            connections.clone(),
        );
        let worker_connections = Family::<WorkerLabels, Gauge>::default();
        registry.register(
            "agent_worker_connections",
            "Open agent connections per agent worker thread (a connection goes to the worker with the fewest)",
            worker_connections.clone(),
        );
        let store_unavailable = Counter::default();
        registry.register(
            "store_unavailable",
            "Requests answered store_unavailable because the credential store could not be reached",
            store_unavailable.clone(),
        );
        let connections_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Agent connections closed at accept (pending_per_ip: the address already holds [server] max_pending_per_ip connections that sent no accepted request)",
            connections_refused.clone(),
        );
        Metrics {
            registry,
            connections_refused,
            requests,
            upstream_latency,
            refresh,
            token_calls,
            webhooks,
            unauthenticated,
            session_conflicts,
            sessions_active,
            credentials,
            store_bytes,
            connections,
            worker_connections,
            store_unavailable,
            none: Label::new("-"),
        }
    }

    /// `provider` is a configured provider's label, or [`Metrics::no_provider`]
    /// (never a name taken from a request: label values stay bounded).
    pub fn request(&self, provider: &Label, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                provider: provider.clone(),
                status,
            })
            .inc();
    }

    /// The label for requests that named no configured provider.
    pub fn no_provider(&self) -> &Label {
        &self.none
    }

    pub fn upstream_latency(&self, provider: &Label, secs: f64) {
        self.upstream_latency
            .get_or_create(&ProviderLabels {
                provider: provider.clone(),
            })
            .observe(secs);
    }

    pub fn refresh(&self, provider: &str, outcome: &'static str) {
        self.refresh
            .get_or_create(&OutcomeLabels {
                provider: provider.to_owned(),
                outcome,
            })
            .inc();
    }

    pub fn token_call(&self, provider: &str) {
        self.token_calls
            .get_or_create(&TokenLabels {
                provider: provider.to_owned(),
            })
            .inc();
    }

    pub fn webhook(&self, event: &str, outcome: &'static str) {
        self.webhooks
            .get_or_create(&WebhookLabels {
                event: event.to_owned(),
                outcome,
            })
            .inc();
    }

    /// Call once per request answered `store_unavailable`.
    pub fn store_unavailable(&self) {
        self.store_unavailable.inc();
    }

    /// A request refused for its session token (`reason` is a
    /// `SessionFault` reason: a fixed, small set).
    pub fn unauthenticated(&self, reason: &'static str) {
        self.unauthenticated
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn session_conflict(&self) {
        self.session_conflicts.inc();
    }

    pub fn connection_opened(&self) {
        self.connections.inc();
    }

    pub fn connection_closed(&self) {
        self.connections.dec();
    }

    /// Agent worker `worker`'s count of open connections: the server
    /// balances on it, so it is the gauge itself, not a copy.
    pub fn worker_connections(&self, worker: usize) -> Gauge {
        self.worker_connections
            .get_or_create(&WorkerLabels { worker })
            .clone()
    }

    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Renders the text exposition, after sampling the store gauges.
    pub fn render(&self, sessions: usize, credentials: usize, store_bytes: u64) -> String {
        self.sessions_active.set(sessions as i64);
        self.credentials.set(credentials as i64);
        self.store_bytes.set(store_bytes as i64);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_text_format() {
        let m = Metrics::new();
        let slack = Label::new("slack");
        m.request(&slack, 200);
        m.upstream_latency(&slack, 0.01);
        m.refresh("slack", "refreshed");
        let t = m.render(3, 4, 1000);
        assert!(
            t.contains("sidekey_proxy_requests_total{provider=\"slack\",status=\"200\"} 1"),
            "{t}"
        );
        assert!(t.contains("sidekey_sessions_active 3"), "{t}");
        assert!(t.contains("sidekey_store_unavailable_total 0"), "{t}");
        assert!(t.contains("sidekey_upstream_latency_seconds_bucket"), "{t}");
        assert!(t.ends_with("# EOF\n"));
    }
}
