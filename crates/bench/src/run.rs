//! One run, start to end: upstream, store, sidekey (and nginx), then the
//! cases the flags ask for, in order.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use serde_json::json;

use crate::cli::{Args, BenchBackend, Load, Populate};
use crate::client::{Admin, build_client, wait_ready};
use crate::load::{Ctx, Target, closed_loop, one, open_loop};
use crate::nginx::{Nginx, require_nginx, write_nginx_config};
use crate::pg::{PgCluster, report_pg_transactions, start_postgres, use_postgres_store};
use crate::probe::{probe_store, report_probe};
use crate::procfs::{cpu_secs, dir_bytes, soak_timeline, status_kib};
use crate::report::{Case, Out, round1, round3, side_by_side};
use crate::sidekey_proc::{
    Ports, Sidekey, free_port, populate_offline, sidekey_bin, unix_now, user_id, write_config,
};
use crate::storm::{start_replicas, storm, storm_replicas};
use crate::upstream::{Upstream, serve_upstream};
use crate::wrk::wrk_case;

/// The run's temp dir, removed on every exit unless --keep.
pub(crate) struct TempDir(pub(crate) PathBuf, pub(crate) bool);

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.1 {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub(crate) async fn run(args: Args) -> Result<(), String> {
    let bin = sidekey_bin(&args)?;
    let dir = std::env::temp_dir().join(format!(
        "sidekey-bench-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let tmp = TempDir(dir.clone(), args.keep);
    let mut out = Out {
        json: args.json,
        credentials: args.credentials,
        header_printed: false,
        backend: args.backend.name(),
    };
    let (pg, pg_url) = start_postgres(&args, &dir)?;

    // --- upstream -----------------------------------------------------------
    let up_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let up_port = up_listener.local_addr().map_err(|e| e.to_string())?.port();
    let mut roots: Vec<Vec<u8>> = Vec::new();
    let up_tls = if args.upstream_tls {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .map_err(|e| e.to_string())?;
        std::fs::write(dir.join("upstream.crt"), ck.cert.pem()).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("upstream.key"), ck.signing_key.serialize_pem())
            .map_err(|e| e.to_string())?;
        roots.push(ck.cert.pem().into_bytes());
        let sc =
            sidekey::bootstrap::tls_config(&dir.join("upstream.crt"), &dir.join("upstream.key"))?;
        Some(tokio_rustls::TlsAcceptor::from(sc))
    } else {
        None
    };
    let mut body = br#"{"ok":true,"data":""#.to_vec();
    let pad = args.body_bytes.saturating_sub(body.len() + 2);
    body.extend(std::iter::repeat_n(b'x', pad));
    body.extend_from_slice(b"\"}");
    let upstream = Arc::new(Upstream {
        body: Bytes::from(body),
        token_calls: AtomicU64::new(0),
        jwt_calls: AtomicU64::new(0),
        token_delay_ms: AtomicU64::new(0),
        new_token_seen: AtomicU64::new(0),
        unauthenticated: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        h2_requests: AtomicU64::new(0),
    });
    tokio::spawn(serve_upstream(up_listener, up_tls, upstream.clone()));

    // --- sidekey ------------------------------------------------------------
    let ports = Ports {
        agent: free_port(),
        admin: free_port(),
        upstream: up_port,
    };
    write_config(&dir, &ports, &args).map_err(|e| e.to_string())?;
    if let Some(url) = &pg_url {
        use_postgres_store(&dir, url)?;
    }
    let n = args.credentials;
    let populate_started = Instant::now();
    // Generates keys and the certificate; with --populate offline also the credentials.
    let offline_n = if args.populate == Populate::Offline {
        n
    } else {
        0
    };
    populate_offline(&dir, offline_n).await?;
    let mut populate_secs = populate_started.elapsed().as_secs_f64();

    roots.push(std::fs::read(dir.join("certs/server.crt")).map_err(|e| e.to_string())?);
    let admin_token = std::fs::read_to_string(dir.join("data/admin.token"))
        .map_err(|e| e.to_string())?
        .trim()
        .to_owned();
    let ready_uri: Uri = format!("https://127.0.0.1:{}/readyz", ports.agent)
        .parse()
        .expect("valid uri");
    let mk_admin = || Admin {
        client: build_client(&[], false),
        base: format!("http://127.0.0.1:{}", ports.admin),
        auth: HeaderValue::try_from(format!("Bearer {admin_token}")).expect("printable token"),
    };

    let mut populate_hwm_kib = 0;
    if args.populate == Populate::Admin && n > 0 {
        let mut sk = Sidekey::spawn(&bin, &dir, &args.log, &args.sidekey_env)?;
        wait_ready(&build_client(&roots, false), &ready_uri, &mut sk).await?;
        let admin = Arc::new(mk_admin());
        let t = Instant::now();
        let next = Arc::new(AtomicU64::new(0));
        let now = unix_now();
        let mut hs = Vec::new();
        for _ in 0..args.admin_concurrency.max(1) {
            let admin = admin.clone();
            let next = next.clone();
            hs.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= n {
                        return Ok::<(), String>(());
                    }
                    admin
                        .put_credential(
                            &user_id(i),
                            "bench",
                            json!({
                                "access_token": format!("tok-{i:06}-{:016x}", rand::random::<u64>()),
                                "expires_at": now + 30 * 86_400,
                            }),
                        )
                        .await?;
                }
            }));
        }
        for h in hs {
            h.await.map_err(|e| e.to_string())??;
        }
        populate_secs = t.elapsed().as_secs_f64();
        populate_hwm_kib = status_kib(&sk.pid(), "VmHWM:");
        sk.stop();
    }

    let lookups = probe_store(&dir, n, args.uncached_lookups).await?;
    report_probe(&out, &lookups, n);

    // Cold start on the populated store: spawn → first /readyz 200.
    let t = Instant::now();
    let mut sk = Sidekey::spawn(&bin, &dir, &args.log, &args.sidekey_env)?;
    let probe = build_client(&roots, false);
    wait_ready(&probe, &ready_uri, &mut sk).await?;
    let cold_ms = t.elapsed().as_secs_f64() * 1000.0;
    let pid = sk.pid();
    let start_rss = status_kib(&pid, "VmRSS:");
    let store_bytes = match args.backend {
        BenchBackend::Sled => dir_bytes(&dir.join("data/sidekey.db")),
        BenchBackend::Postgres => lookups.bytes,
    };
    out.note(&format!(
        "sidekey-bench: sidekey pid {pid}, {} store, {} credentials ({:?} populate, {:.2} s), cold start to /readyz 200: {:.1} ms, RSS after start {:.1} MiB, store on disk {:.1} MiB{}",
        args.backend.name(),
        n,
        args.populate,
        populate_secs,
        cold_ms,
        start_rss as f64 / 1024.0,
        store_bytes as f64 / 1_048_576.0,
        if populate_hwm_kib > 0 {
            format!(", peak RSS while populating {:.1} MiB", populate_hwm_kib as f64 / 1024.0)
        } else {
            String::new()
        }
    ));
    out.json_line(&json!({
        "case": "startup",
        "credentials": n,
        "populate": format!("{:?}", args.populate).to_lowercase(),
        "populate_secs": round3(populate_secs),
        "cold_start_ms": round1(cold_ms),
        "rss_after_start_kib": start_rss,
        "populate_peak_rss_kib": populate_hwm_kib,
        "store_bytes": store_bytes,
    }));

    // Sessions, spread over the users.
    let admin = Arc::new(mk_admin());
    let k = args.users.clamp(1, n.max(1));
    let t = Instant::now();
    let mut sessions = vec![HeaderValue::from_static(""); if n == 0 { 0 } else { k }];
    let grants: &'static [&'static str] = if args.jwt_path {
        &["bench", "bench_jwt"]
    } else {
        &["bench"]
    };
    if n > 0 {
        let slots = Arc::new(Mutex::new(vec![None; k]));
        let next = Arc::new(AtomicU64::new(0));
        let mut hs = Vec::new();
        for _ in 0..args.admin_concurrency.max(1) {
            let admin = admin.clone();
            let next = next.clone();
            let slots = slots.clone();
            hs.push(tokio::spawn(async move {
                loop {
                    let j = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if j >= k {
                        return Ok::<(), String>(());
                    }
                    let u = user_id(j * n / k);
                    let tok = admin.session(&u, grants).await?;
                    sidekey::sync::lock(&slots)[j] = Some(tok);
                }
            }));
        }
        for h in hs {
            h.await.map_err(|e| e.to_string())??;
        }
        let slots = std::mem::take(&mut *sidekey::sync::lock(&slots));
        for (j, s) in slots.into_iter().enumerate() {
            sessions[j] =
                HeaderValue::try_from(s.ok_or("missing session")?).map_err(|e| e.to_string())?;
        }
    }
    let sessions_secs = t.elapsed().as_secs_f64();

    let up_scheme = if args.upstream_tls { "https" } else { "http" };
    let direct_auth = "Bearer tok-000000-0123456789abcdef";
    // --- nginx (optional) ---------------------------------------------------
    let mut nginx = None;
    let mut nginx_uri = None;
    if args.nginx {
        if args.upstream_tls || args.http2 {
            return Err(
                "--nginx compares HTTP/1.1 to a plain upstream: drop --upstream-tls/--http2".into(),
            );
        }
        require_nginx(&args.nginx_bin)?;
        let port = free_port();
        let conf = write_nginx_config(
            &dir,
            port,
            ports.upstream,
            args.nginx_workers,
            direct_auth,
            args.nginx_access_log,
        )
        .map_err(|e| e.to_string())?;
        let prefix = dir.join("nginx");
        let mut ng = Nginx::spawn(&args.nginx_bin, &conf, &prefix)?;
        let uri: Uri = format!("https://127.0.0.1:{port}/api/items?limit=10")
            .parse()
            .expect("valid uri");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = ng.exited() {
                return Err(format!(
                    "nginx exited ({st}):\n{}",
                    Nginx::error_log(&prefix)
                ));
            }
            let req = Request::get(uri.clone())
                .body(Full::new(Bytes::new()))
                .expect("valid request");
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_millis(500), probe.request(req)).await
            {
                let st = r.status();
                let _ = r.into_body().collect().await;
                if st == StatusCode::OK {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "nginx not answering 200 within 20 s:\n{}",
                    Nginx::error_log(&prefix)
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ng.find_workers();
        out.note(&format!(
            "sidekey-bench: nginx {} (master {}, workers {:?}), access log {:?}",
            Command::new(&args.nginx_bin)
                .arg("-v")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stderr)
                    .trim()
                    .replace("nginx version: ", ""))
                .unwrap_or_default(),
            ng.master,
            ng.workers,
            args.nginx_access_log
        ));
        nginx_uri = Some(uri);
        nginx = Some(ng);
    }
    let ctx = Arc::new(Ctx {
        client: build_client(&roots, args.http2),
        direct_uri: format!(
            "{up_scheme}://127.0.0.1:{}/api/items?limit=10",
            ports.upstream
        )
        .parse()
        .expect("valid uri"),
        via_uri: format!(
            "https://127.0.0.1:{}/v1/proxy/bench/api/items?limit=10",
            ports.agent
        )
        .parse()
        .expect("valid uri"),
        tool_uri: format!("https://127.0.0.1:{}/v1/tools/bench_items", ports.agent)
            .parse()
            .expect("valid uri"),
        mcp_uri: format!("https://127.0.0.1:{}/v1/mcp", ports.agent)
            .parse()
            .expect("valid uri"),
        jwt_uri: format!(
            "https://127.0.0.1:{}/v1/proxy/bench_jwt/api/items?limit=10",
            ports.agent
        )
        .parse()
        .expect("valid uri"),
        direct_auth: HeaderValue::from_static(direct_auth),
        nginx_uri,
        nginx_pids: nginx.as_ref().map(Nginx::pids).unwrap_or_default(),
        sessions,
        sidekey_pid: pid.clone(),
    });
    out.note(&format!(
        "sidekey-bench: {} sessions over {} users minted in {:.2} s; client {}, upstream {}{}; {} cores",
        ctx.sessions.len(),
        k,
        sessions_secs,
        if args.http2 { "HTTP/2" } else { "HTTP/1.1 keep-alive" },
        if args.upstream_tls { "HTTPS (h2 by ALPN)" } else { "plain HTTP/1.1" },
        if args.no_audit { ", audit off" } else { "" },
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    ));

    if n > 0 {
        // Sanity: one request each way.
        one(&ctx, Target::Direct, &ctx.direct_uri, 0)
            .await
            .map_err(|e| format!("direct request failed: {e}"))?;
        one(&ctx, Target::Via, &ctx.via_uri, 0)
            .await
            .map_err(|e| format!("request through sidekey failed: {e}\n{}", sk.log_text()))?;
        if let Some(u) = &ctx.nginx_uri {
            one(&ctx, Target::Nginx, u, 0)
                .await
                .map_err(|e| format!("request through nginx failed: {e}"))?;
        }
        if args.tool_paths {
            for t in [Target::Tool, Target::Mcp] {
                one(&ctx, t, &t.uri(&ctx), 0).await.map_err(|e| {
                    format!("{} request failed: {e}\n{}", t.uri(&ctx), sk.log_text())
                })?;
            }
        }
        if args.jwt_path {
            // One exchange per subject (an RS256 signature each) before
            // the measurement: the row is the cached-token path.
            let t = Instant::now();
            for s in 0..ctx.sessions.len() {
                one(&ctx, Target::Jwt, &ctx.jwt_uri, s).await.map_err(|e| {
                    format!("{} request failed: {e}\n{}", ctx.jwt_uri, sk.log_text())
                })?;
            }
            out.note(&format!(
                "sidekey-bench: {} JWT bearer exchanges (one per subject) in {:.2} s, {} token-endpoint calls",
                ctx.sessions.len(),
                t.elapsed().as_secs_f64(),
                upstream.jwt_calls.load(Ordering::Relaxed)
            ));
        }
    }

    if args.pause > 0.0 {
        out.note(&format!(
            "sidekey-bench: pausing {:.0} s (sidekey pid {pid})",
            args.pause
        ));
        tokio::time::sleep(Duration::from_secs_f64(args.pause)).await;
    }

    let warmup = Duration::from_secs_f64(args.warmup);
    let dur = Duration::from_secs_f64(args.duration);
    let mut measured: Vec<Case> = Vec::new();
    let pg_before = pg.as_ref().and_then(PgCluster::transactions);
    if !args.no_load && n > 0 {
        let cases: Vec<(usize, Option<f64>)> = if args.rate.is_empty() {
            args.levels.iter().map(|&c| (c, None)).collect()
        } else if args.load == Load::Wrk {
            return Err("--load wrk runs closed-loop levels only (no --rate)".into());
        } else {
            args.rate
                .iter()
                .map(|&r| (args.connections, Some(r)))
                .collect()
        };
        let mut targets = vec![Target::Direct];
        if ctx.nginx_uri.is_some() {
            targets.push(Target::Nginx);
        }
        targets.push(Target::Via);
        if args.tool_paths {
            if args.load == Load::Wrk {
                return Err("--tool-paths needs the built-in load generator (--load builtin): its requests are POSTs with a body".into());
            }
            targets.extend([Target::Tool, Target::Mcp]);
        }
        if args.jwt_path {
            targets.push(Target::Jwt);
        }
        for round in 0..args.repeat.max(1) {
            if args.repeat > 1 {
                out.note(&format!(
                    "sidekey-bench: round {} of {}",
                    round + 1,
                    args.repeat
                ));
            }
            for &(conc, rate) in &cases {
                let mut direct: Option<(f64, f64)> = None;
                for &target in &targets {
                    let mut c = match (args.load, rate) {
                        (Load::Wrk, _) => {
                            wrk_case(&ctx, target, conc, args.wrk_threads, warmup, dur).await?
                        }
                        (Load::Builtin, None) => {
                            closed_loop(&ctx, "closed", target, conc, warmup, dur).await
                        }
                        (Load::Builtin, Some(r)) => {
                            open_loop(&ctx, target, r, conc, warmup, dur).await
                        }
                    };
                    match direct {
                        None => direct = Some((c.rps(), c.q(0.5))),
                        Some((rps, p50)) => {
                            // In the open loop all run at the scheduled rate: no ratio.
                            if rps > 0.0 && rate.is_none() {
                                c.ratio = Some(c.rps() / rps);
                            }
                            c.added_p50_us = Some(c.q(0.5) - p50);
                        }
                    }
                    out.case(&c);
                    measured.push(c);
                }
            }
        }
        if ctx.nginx_uri.is_some() {
            side_by_side(&out, &measured);
        }
        report_pg_transactions(&out, pg.as_ref(), pg_before, &measured);
    }

    if args.refresh_storm > 0 {
        let c = match &pg_url {
            Some(url) if args.storm_replicas > 1 => {
                let mut replicas =
                    start_replicas(&bin, &dir, &args, ports.upstream, url, &roots).await?;
                let agent_ports: Vec<u16> = std::iter::once(ports.agent)
                    .chain(replicas.iter().map(|r| r.1))
                    .collect();
                let pids: Vec<String> = std::iter::once(pid.clone())
                    .chain(replicas.iter().map(|r| r.0.pid()))
                    .collect();
                let c = storm_replicas(&ctx, &admin, &upstream, &roots, &args, &agent_ports, &pids)
                    .await?;
                for (sk, _) in &mut replicas {
                    if sk.exited().is_some() {
                        return Err(format!(
                            "a replica died during the storm:\n{}",
                            sk.log_text()
                        ));
                    }
                    sk.stop();
                }
                c
            }
            _ => storm(&ctx, &admin, &upstream, &roots, &args, ports.agent).await?,
        };
        out.case(&c);
        out.note(&format!(
            "refresh storm over {} replica(s): {} concurrent requests on one expired token -> {} token-endpoint call(s), {} succeeded, {} errors, p50 {:.0} µs, p99 {:.0} µs, max {} µs",
            args.storm_replicas.max(1),
            args.refresh_storm,
            c.extra["token_calls"],
            c.requests - c.errors,
            c.errors,
            c.q(0.5),
            c.q(0.99),
            c.max()
        ));
    }

    if args.soak > 0.0 && n > 0 {
        // RSS and the audit writer's backlog once a second, to tell a
        // growing backlog from memory the store keeps.
        let samples = Arc::new(Mutex::new(Vec::new()));
        let sampler = {
            let (admin, pid, samples) = (admin.clone(), pid.clone(), samples.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let pending = admin.metric("sidekey_audit_pending_records").await;
                    let rss = status_kib(&pid, "VmRSS:");
                    sidekey::sync::lock(&samples).push((rss, pending.map(|p| p as u64)));
                }
            })
        };
        let c = closed_loop(
            &ctx,
            "soak",
            Target::Via,
            args.soak_connections,
            Duration::from_secs(1),
            Duration::from_secs_f64(args.soak),
        )
        .await;
        out.case(&c);
        out.note(&format!(
            "soak: {} connections for {:.0} s through sidekey: {} requests, {} errors, p99 {:.0} µs, p99.9 {:.0} µs, sidekey peak RSS {:.1} MiB",
            args.soak_connections,
            c.secs,
            c.requests,
            c.errors,
            c.q(0.99),
            c.q(0.999),
            c.sidekey_hwm_kib as f64 / 1024.0
        ));
        sampler.abort();
        let samples = std::mem::take(&mut *sidekey::sync::lock(&samples));
        out.note(&soak_timeline(&samples));
    }

    let unauth = upstream.unauthenticated.load(Ordering::Relaxed);
    if unauth > 0 {
        out.note(&format!(
            "warning: the upstream saw {unauth} request(s) without a bearer token"
        ));
    }
    if args.jwt_path {
        out.note(&format!(
            "JWT bearer: {} token-endpoint exchanges over the whole run, {} subjects",
            upstream.jwt_calls.load(Ordering::Relaxed),
            ctx.sessions.len()
        ));
    }
    out.note(&format!(
        "upstream: {} requests, {} over HTTP/2",
        upstream.requests.load(Ordering::Relaxed),
        upstream.h2_requests.load(Ordering::Relaxed)
    ));
    let final_hwm = status_kib(&pid, "VmHWM:");
    let final_cpu = cpu_secs(&pid);
    if sk.exited().is_some() {
        return Err(format!("sidekey died during the run:\n{}", sk.log_text()));
    }
    let stopped = sk.stop();
    out.note(&format!(
        "sidekey: peak RSS {:.1} MiB, total CPU {:.2} s, exited {} after SIGTERM",
        final_hwm as f64 / 1024.0,
        final_cpu,
        stopped
            .map(|d| format!("{:.0} ms", d.as_secs_f64() * 1000.0))
            .unwrap_or_else(|| "not within 30 s".into())
    ));
    out.json_line(&json!({
        "case": "summary",
        "credentials": n,
        "sidekey_peak_rss_kib": final_hwm,
        "sidekey_cpu_secs": round3(final_cpu),
    }));
    drop(nginx);
    drop(pg);
    drop(tmp);
    Ok(())
}
