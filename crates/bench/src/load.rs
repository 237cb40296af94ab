//! The built-in load generator: closed and open loop over the one client,
//! with CPU snapshots around the measured window.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::header::{self, HeaderValue};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use serde_json::json;

use crate::client::BenchClient;
use crate::procfs::{cpu_secs, cpu_split_secs, status_kib, thread_cpu};
use crate::report::{Case, round3};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Direct,
    Nginx,
    /// Through sidekey.
    Via,
    /// Through sidekey, as the operation tool `bench_items`
    /// (`POST /v1/tools/bench_items`).
    Tool,
    /// Through sidekey, as that tool's MCP `tools/call`.
    Mcp,
    /// Through sidekey's proxy path to `bench_jwt`, a JWT bearer grant
    /// provider (tokens cached per subject).
    Jwt,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Nginx => "nginx",
            Target::Via => "sidekey",
            Target::Tool => "sidekey-tool",
            Target::Mcp => "sidekey-mcp",
            Target::Jwt => "sidekey-jwt",
        }
    }

    pub(crate) fn uri(self, ctx: &Ctx) -> Uri {
        match self {
            Target::Direct => ctx.direct_uri.clone(),
            Target::Nginx => ctx.nginx_uri.clone().expect("nginx target without --nginx"),
            Target::Via => ctx.via_uri.clone(),
            Target::Tool => ctx.tool_uri.clone(),
            Target::Mcp => ctx.mcp_uri.clone(),
            Target::Jwt => ctx.jwt_uri.clone(),
        }
    }
}

/// The arguments the tool targets send: what `?limit=10` is for the proxy.
const TOOL_BODY: &[u8] = br#"{"limit": 10}"#;
const MCP_BODY: &[u8] = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"bench_items","arguments":{"limit":10}}}"#;

pub(crate) struct Ctx {
    pub(crate) client: BenchClient,
    pub(crate) direct_uri: Uri,
    pub(crate) via_uri: Uri,
    pub(crate) tool_uri: Uri,
    pub(crate) mcp_uri: Uri,
    pub(crate) jwt_uri: Uri,
    /// nginx's `/api/items?limit=10` (it injects the bearer header itself).
    pub(crate) nginx_uri: Option<Uri>,
    /// nginx's master and worker pids.
    pub(crate) nginx_pids: Vec<String>,
    /// `Bearer ...` the direct requests carry (what sidekey would inject).
    pub(crate) direct_auth: HeaderValue,
    /// Session tokens, one per user.
    pub(crate) sessions: Vec<HeaderValue>,
    pub(crate) sidekey_pid: String,
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 120 s, 3 significant digits.
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds")
}

pub(crate) struct WorkerOut {
    hist: Histogram<u64>,
    requests: u64,
    errors: BTreeMap<String, u64>,
}

impl WorkerOut {
    pub(crate) fn new() -> Self {
        WorkerOut {
            hist: new_hist(),
            requests: 0,
            errors: BTreeMap::new(),
        }
    }
}

/// One request; `Ok` on a fully read 200.
pub(crate) async fn one(
    ctx: &Ctx,
    target: Target,
    uri: &Uri,
    session: usize,
) -> Result<(), String> {
    let body = match target {
        Target::Tool => Bytes::from_static(TOOL_BODY),
        Target::Mcp => Bytes::from_static(MCP_BODY),
        _ => Bytes::new(),
    };
    let mut req = Request::new(Full::new(body));
    *req.uri_mut() = uri.clone();
    if matches!(target, Target::Tool | Target::Mcp) {
        *req.method_mut() = http::Method::POST;
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    let h = req.headers_mut();
    h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    h.insert(
        header::USER_AGENT,
        HeaderValue::from_static("sidekey-bench/1"),
    );
    match target {
        Target::Direct => {
            h.insert(header::AUTHORIZATION, ctx.direct_auth.clone());
        }
        Target::Nginx => {}
        Target::Via | Target::Tool | Target::Mcp | Target::Jwt => {
            h.insert(
                "x-sidekey-session",
                ctx.sessions[session % ctx.sessions.len()].clone(),
            );
        }
    }
    let resp = match tokio::time::timeout(Duration::from_secs(30), ctx.client.request(req)).await {
        Err(_) => return Err("timeout".into()),
        Ok(Err(e)) if e.is_connect() => return Err("connect".into()),
        Ok(Err(_)) => return Err("transport".into()),
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    let code = resp
        .headers()
        .get("x-sidekey-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match resp.into_body().collect().await {
        // A refused MCP call is a 200 whose result says isError.
        Ok(b) if status == StatusCode::OK => {
            if target == Target::Mcp && contains(&b.to_bytes(), b"\"isError\":true") {
                Err("mcp isError".into())
            } else {
                Ok(())
            }
        }
        Ok(_) => Err(match code {
            Some(c) => format!("{} {c}", status.as_u16()),
            None => status.as_u16().to_string(),
        }),
        Err(_) => Err("body".into()),
    }
}

pub(crate) fn record(out: &mut WorkerOut, res: Result<(), String>, us: u64) {
    out.requests += 1;
    match res {
        Ok(()) => {
            let _ = out.hist.record(us.max(1));
        }
        Err(e) => *out.errors.entry(e).or_default() += 1,
    }
}

pub(crate) struct Snap {
    at: Instant,
    sidekey_cpu: f64,
    nginx_cpu: f64,
    /// The user-space part of the two above.
    sidekey_user: f64,
    nginx_user: f64,
    bench_cpu: f64,
    /// Each sidekey agent worker thread's CPU, by thread name.
    sidekey_workers: Vec<f64>,
    /// Each nginx worker process's CPU (the master is not one).
    nginx_workers: Vec<f64>,
}

pub(crate) fn snap(ctx: &Ctx) -> Snap {
    let (sk_user, sk_sys) = cpu_split_secs(&ctx.sidekey_pid);
    let nginx: Vec<(f64, f64)> = ctx.nginx_pids.iter().map(|p| cpu_split_secs(p)).collect();
    Snap {
        at: Instant::now(),
        sidekey_cpu: sk_user + sk_sys,
        nginx_cpu: nginx.iter().map(|(u, s)| u + s).sum(),
        sidekey_user: sk_user,
        nginx_user: nginx.iter().map(|(u, _)| u).sum(),
        bench_cpu: cpu_secs("self") + children_cpu_secs(),
        sidekey_workers: thread_cpu(&ctx.sidekey_pid, "sidekey-agent-"),
        nginx_workers: ctx.nginx_pids.iter().skip(1).map(|p| cpu_secs(p)).collect(),
    }
}

/// Each worker's share of the CPU between two snapshots, in per cent, when
/// there are several workers and they did something.
fn worker_split(a: &[f64], b: &[f64]) -> Option<Vec<f64>> {
    let used: Vec<f64> = b.iter().zip(a).map(|(b, a)| (b - a).max(0.0)).collect();
    let total: f64 = used.iter().sum();
    (used.len() > 1 && total > 0.0).then(|| used.iter().map(|u| 100.0 * u / total).collect())
}

/// CPU of this process's waited-for children (wrk runs), seconds.
fn children_cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn finish_case(
    ctx: &Ctx,
    mode: &'static str,
    target: Target,
    concurrency: usize,
    rate: Option<f64>,
    outs: Vec<WorkerOut>,
    a: Snap,
    b: Snap,
) -> Case {
    let mut hist = new_hist();
    let mut requests = 0;
    let mut error_kinds = BTreeMap::new();
    for o in outs {
        let _ = hist.add(&o.hist);
        requests += o.requests;
        for (k, n) in o.errors {
            *error_kinds.entry(k).or_default() += n;
        }
    }
    let errors = error_kinds.values().sum();
    Case {
        mode,
        target: target.name(),
        concurrency,
        rate,
        requests,
        errors,
        error_kinds,
        secs: (b.at - a.at).as_secs_f64(),
        hist,
        fixed: None,
        proxy_cpu_s: match target {
            Target::Direct => 0.0,
            Target::Nginx => b.nginx_cpu - a.nginx_cpu,
            Target::Via | Target::Tool | Target::Mcp | Target::Jwt => b.sidekey_cpu - a.sidekey_cpu,
        },
        proxy_user_s: match target {
            Target::Direct => 0.0,
            Target::Nginx => b.nginx_user - a.nginx_user,
            Target::Via | Target::Tool | Target::Mcp | Target::Jwt => {
                b.sidekey_user - a.sidekey_user
            }
        },
        bench_cpu_s: b.bench_cpu - a.bench_cpu,
        worker_split: match target {
            Target::Direct => None,
            Target::Nginx => worker_split(&a.nginx_workers, &b.nginx_workers),
            Target::Via | Target::Tool | Target::Mcp | Target::Jwt => {
                worker_split(&a.sidekey_workers, &b.sidekey_workers)
            }
        },
        sidekey_hwm_kib: status_kib(&ctx.sidekey_pid, "VmHWM:"),
        sidekey_rss_kib: status_kib(&ctx.sidekey_pid, "VmRSS:"),
        ratio: None,
        added_p50_us: None,
        extra: serde_json::Map::new(),
    }
}

/// Closed loop: `conc` workers, each one request at a time, back to back.
/// Only requests that start and end inside the measured window count.
pub(crate) async fn closed_loop(
    ctx: &Arc<Ctx>,
    mode: &'static str,
    target: Target,
    conc: usize,
    warmup: Duration,
    dur: Duration,
) -> Case {
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let uri = target.uri(ctx);
    let mut handles = Vec::with_capacity(conc);
    for w in 0..conc {
        let ctx = ctx.clone();
        let phase = phase.clone();
        let uri = uri.clone();
        handles.push(tokio::spawn(async move {
            let mut out = WorkerOut::new();
            let mut seq = w.wrapping_mul(7919);
            loop {
                let p0 = phase.load(Ordering::Relaxed);
                if p0 == STOP {
                    break;
                }
                let t0 = Instant::now();
                let res = one(&ctx, target, &uri, seq).await;
                seq = seq.wrapping_add(1);
                let us = t0.elapsed().as_micros() as u64;
                let failed = res.is_err();
                if p0 == MEASURE && phase.load(Ordering::Relaxed) == MEASURE {
                    record(&mut out, res, us);
                }
                if failed {
                    // Do not spin on a refused connection.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            out
        }));
    }
    tokio::time::sleep(warmup).await;
    let a = snap(ctx);
    phase.store(MEASURE, Ordering::Relaxed);
    tokio::time::sleep(dur).await;
    phase.store(STOP, Ordering::Relaxed);
    let b = snap(ctx);
    let mut outs = Vec::with_capacity(conc);
    for h in handles {
        if let Ok(o) = h.await {
            outs.push(o);
        }
    }
    finish_case(ctx, mode, target, conc, None, outs, a, b)
}

/// Timer wake-up slack that is not counted as latency in the open loop.
const TIMER_SLACK: Duration = Duration::from_micros(1500);

/// Open loop: request i is due at start + i/rate; `conns` workers take the
/// next due request when free. Latency runs from the due time, so a request
/// that waited for a busy connection counts its wait (wrk2's correction for
/// coordinated omission). A worker that slept until the due time starts the
/// clock when it wakes, but forgives at most TIMER_SLACK of lateness.
pub(crate) async fn open_loop(
    ctx: &Arc<Ctx>,
    target: Target,
    rate: f64,
    conns: usize,
    warmup: Duration,
    dur: Duration,
) -> Case {
    let uri = target.uri(ctx);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(20);
    let total = warmup + dur;
    let measure_from = start + warmup;
    let measure_to = start + total;
    let interval = 1.0 / rate;
    let late = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::with_capacity(conns);
    for w in 0..conns {
        let ctx = ctx.clone();
        let next = next.clone();
        let uri = uri.clone();
        let late = late.clone();
        handles.push(tokio::spawn(async move {
            let mut out = WorkerOut::new();
            let mut seq = w.wrapping_mul(7919);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let off = Duration::from_secs_f64(i as f64 * interval);
                if off >= total {
                    break;
                }
                let due = start + off;
                let now = Instant::now();
                let base = if now < due {
                    tokio::time::sleep_until(due.into()).await;
                    Instant::now().min(due + TIMER_SLACK)
                } else {
                    if now - due > Duration::from_millis(1) {
                        late.fetch_add(1, Ordering::Relaxed);
                    }
                    due
                };
                let res = one(&ctx, target, &uri, seq).await;
                seq = seq.wrapping_add(1);
                let us = base.elapsed().as_micros() as u64;
                if due >= measure_from && due < measure_to {
                    record(&mut out, res, us);
                }
            }
            out
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let a = snap(ctx);
    let mut outs = Vec::with_capacity(conns);
    for h in handles {
        if let Ok(o) = h.await {
            outs.push(o);
        }
    }
    let mut b = snap(ctx);
    // Throughput over the schedule's window (the tail that ran over is in
    // the latencies, not in the rate).
    let secs_sched = dur.as_secs_f64();
    let overrun = (b.at - a.at).as_secs_f64() - secs_sched;
    b.at = a.at + dur;
    let mut c = finish_case(ctx, "open", target, conns, Some(rate), outs, a, b);
    c.extra
        .insert("overrun_secs".into(), json!(round3(overrun.max(0.0))));
    c.extra
        .insert("late_starts".into(), json!(late.load(Ordering::Relaxed)));
    c
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
