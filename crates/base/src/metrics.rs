//! Prometheus metrics: what operators graph and alert on.

use crate::sync::lock;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;

/// A label value made once (per configured provider) and shared: the
/// request path builds label sets without allocating.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Label(Arc<str>);

impl Label {
    pub fn new(s: &str) -> Label {
        Label(Arc::from(s))
    }

    /// Identifies the label without hashing its text. Labels are made
    /// once (per configured provider, and `-`), never per request: a shard
    /// holds a clone of each label it keys, so an address cannot be reused
    /// for another label while it counts under it.
    fn addr(&self) -> usize {
        Arc::as_ptr(&self.0).cast::<u8>() as usize
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

/// Upper bounds of the upstream latency buckets: 250 µs … ~8 s, then +Inf
/// (prometheus-client's histogram ends with `f64::MAX` the same way).
const LATENCY_BUCKETS: usize = 17;

/// The finite upper bounds: 250 µs … ~8 s.
fn latency_upper_bounds() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_25, 2.0, 16)
}

fn latency_bounds() -> [f64; LATENCY_BUCKETS] {
    let mut b = [f64::MAX; LATENCY_BUCKETS];
    for (slot, v) in b.iter_mut().zip(latency_upper_bounds()) {
        *slot = v;
    }
    b
}

/// The two metrics every proxied request updates (its count by provider
/// and status, and the upstream latency by provider), kept per thread and
/// summed when scraped. In prometheus-client's families each request took
/// a read lock, hashed its labels with SipHash, took and dropped a
/// reference on the provider's label and took the histogram's write lock,
/// all on memory every agent worker writes: those cache lines moved
/// between the workers' cores on every request. A thread's shard is
/// written by that thread alone; its lock is contended only by a scrape.
#[derive(Debug)]
struct PerThread {
    /// Which `Metrics` a thread's shard belongs to (tests run several in
    /// one process).
    id: usize,
    shards: Mutex<Vec<Arc<Mutex<Shard>>>>,
    bounds: [f64; LATENCY_BUCKETS],
}

#[derive(Debug, Default)]
struct Shard {
    /// Keyed by the label's address: labels are made once per provider.
    requests: HashMap<(usize, u16), (Label, u64), foldhash::fast::RandomState>,
    latency: HashMap<usize, (Label, Latency), foldhash::fast::RandomState>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Latency {
    sum: f64,
    count: u64,
    /// Per bucket, not cumulative (the encoder adds them up).
    buckets: [u64; LATENCY_BUCKETS],
}

thread_local! {
    static SHARDS: RefCell<Vec<(usize, Arc<Mutex<Shard>>)>> = const { RefCell::new(Vec::new()) };
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

impl PerThread {
    fn new() -> Arc<PerThread> {
        Arc::new(PerThread {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            shards: Mutex::new(Vec::new()),
            bounds: latency_bounds(),
        })
    }

    /// Runs `f` on this thread's shard, made (and registered for scrapes)
    /// on the thread's first update.
    fn with<R>(&self, f: impl FnOnce(&mut Shard) -> R) -> R {
        SHARDS.with(|cell| {
            let mut mine = cell.borrow_mut();
            let shard = match mine.iter().find(|(id, _)| *id == self.id) {
                Some((_, s)) => s.clone(),
                None => {
                    // Shards of a `Metrics` gone (only this list holds
                    // them) are dropped here.
                    mine.retain(|(_, s)| Arc::strong_count(s) > 1);
                    let s = Arc::new(Mutex::new(Shard::default()));
                    lock(&self.shards).push(s.clone());
                    mine.push((self.id, s.clone()));
                    s
                }
            };
            drop(mine);
            f(&mut lock(&shard))
        })
    }

    fn request(&self, provider: &Label, status: u16) {
        self.with(|s| {
            s.requests
                .entry((provider.addr(), status))
                .or_insert_with(|| (provider.clone(), 0))
                .1 += 1;
        });
    }

    fn latency(&self, provider: &Label, secs: f64) {
        let bucket = self.bounds.iter().position(|b| *b >= secs);
        self.with(|s| {
            let l = &mut s
                .latency
                .entry(provider.addr())
                .or_insert_with(|| (provider.clone(), Latency::default()))
                .1;
            l.sum += secs;
            l.count += 1;
            if let Some(i) = bucket {
                l.buckets[i] += 1;
            }
        });
    }

    /// A provider's latency series, and its request count under status
    /// 200, at zero in this thread's shard (a rate over them reads 0, not
    /// "No data").
    fn declare(&self, provider: &Label) {
        self.with(|s| {
            s.requests
                .entry((provider.addr(), 200))
                .or_insert_with(|| (provider.clone(), 0));
            s.latency
                .entry(provider.addr())
                .or_insert_with(|| (provider.clone(), Latency::default()));
        });
    }

    /// Whether no shard has counted anything in `which`; a scrape asks
    /// this before it encodes, so it does not sum the shards for it.
    fn nothing_in(&self, which: impl Fn(&Shard) -> bool) -> bool {
        lock(&self.shards).iter().all(|s| which(&lock(s)))
    }

    /// Every shard's values, summed.
    fn sums(&self) -> Sums {
        let mut requests: HashMap<(Label, u16), u64> = HashMap::new();
        let mut latency: HashMap<Label, Latency> = HashMap::new();
        for shard in lock(&self.shards).iter() {
            let s = lock(shard);
            for (label, n) in s
                .requests
                .iter()
                .map(|((_, st), (l, n))| ((l.clone(), *st), n))
            {
                *requests.entry(label).or_default() += n;
            }
            for (l, v) in s.latency.values() {
                let t = latency.entry(l.clone()).or_default();
                t.sum += v.sum;
                t.count += v.count;
                for (a, b) in t.buckets.iter_mut().zip(v.buckets) {
                    *a += b;
                }
            }
        }
        let mut requests: Vec<_> = requests
            .into_iter()
            .map(|((provider, status), n)| (RequestLabels { provider, status }, n))
            .collect();
        requests.sort_by(|a, b| (&a.0.provider.0, a.0.status).cmp(&(&b.0.provider.0, b.0.status)));
        let mut latency: Vec<_> = latency
            .into_iter()
            .map(|(provider, v)| (ProviderLabels { provider }, v))
            .collect();
        latency.sort_by(|a, b| a.0.provider.0.cmp(&b.0.provider.0));
        Sums { requests, latency }
    }
}

/// What a scrape renders, sorted by labels.
struct Sums {
    requests: Vec<(RequestLabels, u64)>,
    latency: Vec<(ProviderLabels, Latency)>,
}

/// `sidekey_proxy_requests_total`, from the shards.
#[derive(Debug)]
struct RequestCounts(Arc<PerThread>);

impl EncodeMetric for RequestCounts {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, n) in self.0.sums().requests {
            ConstCounter::new(n).encode(encoder.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }

    fn is_empty(&self) -> bool {
        self.0.nothing_in(|s| s.requests.is_empty())
    }
}

/// `sidekey_upstream_latency_seconds`, from the shards.
#[derive(Debug)]
struct UpstreamLatency(Arc<PerThread>);

impl EncodeMetric for UpstreamLatency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, v) in self.0.sums().latency {
            let buckets: Vec<(f64, u64)> = self.0.bounds.iter().copied().zip(v.buckets).collect();
            encoder
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(v.sum, v.count, &buckets, None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }

    fn is_empty(&self) -> bool {
        self.0.nothing_in(|s| s.latency.is_empty())
    }
}

/// `sidekey_store_listener_up`: 1 while the PostgreSQL change listener's
/// heartbeat arrives on time, 0 while it is late or reconnecting (the
/// caches are bypassed then). Not exported on sled, which has no listener:
/// an alert on 0 must not fire there.
#[derive(Debug, Clone)]
struct ListenerUp(Arc<AtomicI64>);

impl ListenerUp {
    const NONE: i64 = -1;
}

impl EncodeMetric for ListenerUp {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        ConstGauge::new(self.0.load(Ordering::Relaxed)).encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }

    fn is_empty(&self) -> bool {
        self.0.load(Ordering::Relaxed) == Self::NONE
    }
}

pub struct Metrics {
    registry: Registry,
    per_thread: Arc<PerThread>,
    refresh: Family<OutcomeLabels, Counter>,
    token_calls: Family<TokenLabels, Counter>,
    webhooks: Family<WebhookLabels, Counter>,
    unauthenticated: Family<ReasonLabels, Counter>,
    session_conflicts: Counter,
    sessions_active: Gauge,
    credentials: Gauge,
    store_bytes: Gauge,
    audit_pending: Gauge,
    audit_dropped: Counter,
    connections: Gauge,
    worker_connections: Family<WorkerLabels, Gauge>,
    /// Requests answered `store_unavailable` (the Postgres backend could not
    /// be reached); alerting needs it even while it stays at 0.
    store_unavailable: Counter,
    listener_up: ListenerUp,
    connections_refused: Family<ReasonLabels, Counter>,
    none: Label,
}

/// What a scrape reads from the store and the audit writer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sampled {
    pub sessions: usize,
    pub credentials: usize,
    pub store_bytes: u64,
    pub audit: AuditBacklog,
    /// Whether the store's change listener hears other replicas (`None`:
    /// the store has no listener).
    pub listener_up: Option<bool>,
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
        let per_thread = PerThread::new();
        registry.register(
            "proxy_requests",
            "Proxied requests by provider and answered status",
            RequestCounts(per_thread.clone()),
        );
        registry.register(
            "upstream_latency_seconds",
            "Time from sending a request upstream to its response headers",
            UpstreamLatency(per_thread.clone()),
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
        let audit_pending = Gauge::default();
        registry.register(
            "audit_pending_records",
            "Audit records buffered or being written, not yet in the store (written every 200 ms; what a kill -9 would lose)",
            audit_pending.clone(),
        );
        let audit_dropped = Counter::default();
        registry.register(
            "audit_dropped_records",
            "Audit records dropped because the writer fell 65536 records behind",
            audit_dropped.clone(),
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
        let listener_up = ListenerUp(Arc::new(AtomicI64::new(ListenerUp::NONE)));
        registry.register(
            "store_listener_up",
            "1 while the PostgreSQL change listener hears its own heartbeat on time, 0 while it is late or reconnecting (caches bypassed: every use reads the database)",
            listener_up.clone(),
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
            per_thread,
            refresh,
            token_calls,
            webhooks,
            unauthenticated,
            session_conflicts,
            sessions_active,
            credentials,
            store_bytes,
            audit_pending,
            audit_dropped,
            connections,
            worker_connections,
            store_unavailable,
            listener_up,
            none: Label::new("-"),
        }
    }

    /// `provider` is a configured provider's label, or [`Metrics::no_provider`]
    /// (never a name taken from a request: label values stay bounded).
    pub fn request(&self, provider: &Label, status: u16) {
        self.per_thread.request(provider, status);
    }

    /// The label for requests that named no configured provider.
    pub fn no_provider(&self) -> &Label {
        &self.none
    }

    pub fn upstream_latency(&self, provider: &Label, secs: f64) {
        self.per_thread.latency(provider, secs);
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

    /// The series a dashboard graphs, at zero from the start for every
    /// configured provider (a panel that says "No data" reads as broken):
    /// refresh outcomes, token endpoint calls, upstream latency, and the
    /// ElevenLabs webhooks.
    pub fn declare_providers<'a>(&self, providers: impl IntoIterator<Item = &'a Label>) {
        for p in providers {
            for outcome in REFRESH_OUTCOMES {
                let _ = self.refresh.get_or_create(&OutcomeLabels {
                    provider: p.0.to_string(),
                    outcome,
                });
            }
            let _ = self.token_calls.get_or_create(&TokenLabels {
                provider: p.0.to_string(),
            });
            self.per_thread.declare(p);
        }
        for (event, outcome) in [
            ("conversation_init", "known_caller"),
            ("conversation_init", "unknown_caller"),
            ("conversation_init", "unauthorized"),
            ("post_call_transcription", "ok"),
            ("post_call", "refused"),
        ] {
            let _ = self.webhooks.get_or_create(&WebhookLabels {
                event: event.to_owned(),
                outcome,
            });
        }
    }

    /// Renders the exposition in Prometheus' text format (0.0.4), what a
    /// scraper gets unless it asks for OpenMetrics.
    pub fn render_text(&self, s: Sampled) -> String {
        to_prometheus_text(&self.render(s))
    }

    /// Renders the OpenMetrics exposition, after setting the sampled gauges.
    pub fn render(&self, s: Sampled) -> String {
        self.sessions_active.set(s.sessions as i64);
        self.credentials.set(s.credentials as i64);
        self.store_bytes.set(s.store_bytes as i64);
        self.audit_pending.set(s.audit.pending as i64);
        let up = s.listener_up.map_or(ListenerUp::NONE, i64::from);
        self.listener_up.0.store(up, Ordering::Relaxed);
        // The writer counts its drops itself; the counter catches up.
        let seen = self.audit_dropped.get();
        self.audit_dropped
            .inc_by(s.audit.dropped.saturating_sub(seen));
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Every outcome `refresh` is called with (the help text lists them).
pub const REFRESH_OUTCOMES: [&str; 6] = [
    "refreshed",
    "shared",
    "cooldown",
    "failed",
    "backoff",
    "reauth_required",
];

/// Prometheus' text format 0.0.4 from prometheus-client's OpenMetrics.
/// The two differ in what a checker sees: OpenMetrics names a counter's
/// family without `_total` in HELP and TYPE (so read as the older format,
/// the `_total` series has no help and no type), has `# UNIT` and `# EOF`,
/// and calls an untyped family `unknown`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len() + 256);
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some(h) = help.replace(rest) {
                push_line(&mut out, &["# HELP ", h]);
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "unknown" => ("", "untyped"),
                k => ("", k),
            };
            if let Some(h) = help.take() {
                let text = match h.split_once(' ') {
                    Some((n, text)) if n == name => text,
                    _ => "",
                };
                push_line(&mut out, &["# HELP ", name, suffix, " ", text]);
            }
            push_line(&mut out, &["# TYPE ", name, suffix, " ", kind]);
            continue;
        }
        if let Some(h) = help.take() {
            push_line(&mut out, &["# HELP ", h]);
        }
        push_line(&mut out, &[line]);
    }
    out
}

fn push_line(out: &mut String, parts: &[&str]) {
    for p in parts {
        out.push_str(p);
    }
    out.push('\n');
}

/// The audit writer's state, as `AuditLog::backlog` samples it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditBacklog {
    pub pending: usize,
    pub dropped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::histogram::Histogram;

    /// The per-thread shards render what prometheus-client's own counter
    /// and histogram families render for the same updates, summed over
    /// the threads that made them.
    #[test]
    fn per_thread_metrics_render_as_prometheus_client_families() {
        let m = Arc::new(Metrics::new());
        let slack = Label::new("slack");
        let google = Label::new("google");
        let reference_requests = Family::<RequestLabels, Counter>::default();
        let reference_latency: Family<ProviderLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(latency_upper_bounds()));
        let secs = [0.0001, 0.00025, 0.0003, 0.004, 0.5, 9.0, 1e9, 0.0, f64::NAN];
        let mut threads = Vec::new();
        for t in 0..3u16 {
            let (m, slack, google) = (m.clone(), slack.clone(), google.clone());
            threads.push(std::thread::spawn(move || {
                for (i, s) in secs.iter().enumerate() {
                    let p = if i % 2 == 0 { &slack } else { &google };
                    m.request(p, 200 + t);
                    m.upstream_latency(p, *s);
                }
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        for t in 0..3u16 {
            for (i, s) in secs.iter().enumerate() {
                let p = if i % 2 == 0 { &slack } else { &google };
                reference_requests
                    .get_or_create(&RequestLabels {
                        provider: p.clone(),
                        status: 200 + t,
                    })
                    .inc();
                reference_latency
                    .get_or_create(&ProviderLabels {
                        provider: p.clone(),
                    })
                    .observe(*s);
            }
        }
        let mut reg = Registry::with_prefix("sidekey");
        reg.register(
            "proxy_requests",
            "Proxied requests by provider and answered status",
            reference_requests,
        );
        reg.register(
            "upstream_latency_seconds",
            "Time from sending a request upstream to its response headers",
            reference_latency,
        );
        let mut want = String::new();
        prometheus_client::encoding::text::encode(&mut want, &reg).unwrap();
        let got = m.render(Sampled::default());
        let lines = |t: &str| {
            let mut l: Vec<String> = t
                .lines()
                .filter(|l| l.contains("proxy_requests") || l.contains("upstream_latency"))
                .map(str::to_owned)
                .collect();
            l.sort();
            l
        };
        let (want, got) = (lines(&want), lines(&got));
        assert!(want.len() > 40, "{want:?}");
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            // Sums added up per thread first differ in the last bits.
            match (g.rsplit_once(' '), w.rsplit_once(' ')) {
                (Some((gk, gv)), Some((wk, wv))) if gk.contains("_sum{") => {
                    assert_eq!(gk, wk);
                    let (gv, wv): (f64, f64) = (gv.parse().unwrap(), wv.parse().unwrap());
                    assert!(
                        (gv.is_nan() && wv.is_nan()) || (gv - wv).abs() <= 1e-9 * wv.abs(),
                        "{g} / {w}"
                    );
                }
                _ => assert_eq!(g, w),
            }
        }
    }

    #[test]
    fn prometheus_text_names_counters_with_their_total_and_has_no_eof() {
        let m = Metrics::new();
        let slack = Label::new("slack");
        m.declare_providers([&slack]);
        let om = m.render(Sampled::default());
        assert!(om.contains("# TYPE sidekey_refresh counter\n"), "{om}");
        let t = m.render_text(Sampled::default());
        assert!(!t.contains("# EOF"), "{t}");
        assert!(!t.contains("# UNIT"), "{t}");
        assert!(t.contains("# TYPE sidekey_refresh_total counter\n"), "{t}");
        assert!(
            t.contains("# HELP sidekey_refresh_total Token refresh outcomes"),
            "{t}"
        );
        // Declared at zero: every refresh outcome, token calls, latency.
        for outcome in REFRESH_OUTCOMES {
            let series =
                format!("sidekey_refresh_total{{provider=\"slack\",outcome=\"{outcome}\"}} 0\n");
            assert!(t.contains(&series), "{series} in {t}");
        }
        assert!(
            t.contains("sidekey_token_endpoint_calls_total{provider=\"slack\"} 0\n"),
            "{t}"
        );
        assert!(
            t.contains("sidekey_upstream_latency_seconds_count{provider=\"slack\"} 0\n"),
            "{t}"
        );
        assert!(
            t.contains("sidekey_webhooks_total{event=\"post_call\",outcome=\"refused\"} 0\n"),
            "{t}"
        );
        // Every sample's family has HELP and TYPE lines before it.
        let mut typed = std::collections::HashSet::new();
        let mut helped = std::collections::HashSet::new();
        for line in t.lines() {
            if let Some(r) = line.strip_prefix("# TYPE ") {
                typed.insert(r.split(' ').next().unwrap().to_owned());
            } else if let Some(r) = line.strip_prefix("# HELP ") {
                helped.insert(r.split(' ').next().unwrap().to_owned());
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                    .unwrap_or(name);
                assert!(typed.contains(family), "{line} has no TYPE in {t}");
                assert!(helped.contains(family), "{line} has no HELP in {t}");
            }
        }
    }

    #[test]
    fn renders_text_format() {
        let m = Metrics::new();
        let slack = Label::new("slack");
        m.request(&slack, 200);
        m.upstream_latency(&slack, 0.01);
        m.refresh("slack", "refreshed");
        let audit = |pending, dropped| AuditBacklog { pending, dropped };
        let sampled = |dropped| Sampled {
            sessions: 3,
            credentials: 4,
            store_bytes: 1000,
            audit: audit(17, dropped),
            listener_up: None,
        };
        // A later scrape's count of drops replaces the earlier one, not adds.
        m.render(sampled(2));
        let t = m.render(sampled(5));
        assert!(
            t.contains("sidekey_proxy_requests_total{provider=\"slack\",status=\"200\"} 1"),
            "{t}"
        );
        assert!(t.contains("sidekey_sessions_active 3"), "{t}");
        assert!(t.contains("sidekey_store_unavailable_total 0"), "{t}");
        assert!(t.contains("sidekey_audit_pending_records 17\n"), "{t}");
        assert!(t.contains("sidekey_audit_dropped_records_total 5\n"), "{t}");
        assert!(t.contains("sidekey_upstream_latency_seconds_bucket"), "{t}");
        assert!(t.ends_with("# EOF\n"));
        assert!(!t.contains("listener_up"), "no listener, no metric: {t}");
        let t = m.render(Sampled {
            listener_up: Some(false),
            ..sampled(5)
        });
        assert!(t.contains("# TYPE sidekey_store_listener_up gauge"), "{t}");
        assert!(t.contains("\nsidekey_store_listener_up 0\n"), "{t}");
        let t = m.render(Sampled {
            listener_up: Some(true),
            ..sampled(5)
        });
        assert!(t.contains("\nsidekey_store_listener_up 1\n"), "{t}");
    }
}
