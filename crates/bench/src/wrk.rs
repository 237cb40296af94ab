//! wrk as the load generator (`--load wrk`): runs it and parses its output.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::load::{Ctx, Target, finish_case, snap};
use crate::report::Case;

/// `1.23ms` → µs.
fn wrk_duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * mul)
}

#[derive(Debug, Default, PartialEq)]
struct WrkOut {
    requests: u64,
    secs: f64,
    quantiles: BTreeMap<u32, f64>,
    errors: BTreeMap<String, u64>,
}

/// Parses `wrk --latency` output.
fn parse_wrk(text: &str) -> Result<WrkOut, String> {
    let mut o = WrkOut::default();
    let mut in_dist = false;
    for line in text.lines() {
        let t = line.trim();
        let f: Vec<&str> = t.split_whitespace().collect();
        if t.starts_with("Latency Distribution") {
            in_dist = true;
            continue;
        }
        if in_dist {
            if let [pct, v] = f.as_slice() {
                if let (Some(p), Some(us)) = (
                    pct.strip_suffix('%').and_then(|p| p.parse::<f64>().ok()),
                    wrk_duration_us(v),
                ) {
                    o.quantiles.insert((p * 10.0).round() as u32, us);
                    continue;
                }
            }
            in_dist = false;
        }
        if f.first() == Some(&"Latency") && f.len() >= 4 {
            if let Some(max) = wrk_duration_us(f[3]) {
                o.quantiles.insert(1000, max);
            }
        }
        if f.len() >= 5 && f[1] == "requests" && f[2] == "in" {
            o.requests = f[0].parse().map_err(|_| format!("wrk: bad line {t:?}"))?;
            o.secs = wrk_duration_us(f[3].trim_end_matches(','))
                .ok_or_else(|| format!("wrk: bad line {t:?}"))?
                / 1e6;
        }
        if let Some(rest) = t.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                let mut kv = part.split_whitespace();
                if let (Some(k), Some(v)) = (kv.next(), kv.next()) {
                    let n: u64 = v.parse().unwrap_or(0);
                    if n > 0 {
                        o.errors.insert(format!("socket {k}"), n);
                    }
                }
            }
        }
        if let Some(rest) = t.strip_prefix("Non-2xx or 3xx responses:") {
            let n: u64 = rest.trim().parse().unwrap_or(0);
            if n > 0 {
                o.errors.insert("non-2xx".into(), n);
            }
        }
    }
    if o.secs <= 0.0 {
        return Err(format!("wrk: no result in its output:\n{text}"));
    }
    Ok(o)
}

fn run_wrk(
    ctx: &Ctx,
    target: Target,
    conns: usize,
    threads: usize,
    secs: f64,
) -> Result<WrkOut, String> {
    let mut cmd = Command::new("wrk");
    let secs = secs.ceil().max(1.0) as u64;
    cmd.arg("--latency")
        .arg(format!("-t{}", threads.clamp(1, conns.max(1))))
        .arg(format!("-c{}", conns.max(1)))
        .arg(format!("-d{secs}s"))
        .arg("--timeout")
        .arg("30s")
        .arg("-H")
        .arg("Accept: application/json")
        .arg("-H")
        .arg("User-Agent: sidekey-bench/1");
    match target {
        Target::Direct => {
            cmd.arg("-H").arg(format!(
                "Authorization: {}",
                ctx.direct_auth.to_str().unwrap_or_default()
            ));
        }
        Target::Nginx => {}
        Target::Tool | Target::Mcp => {
            return Err(
                "wrk sends GETs without a body; the tool targets run on the built-in load".into(),
            );
        }
        Target::Via | Target::Jwt => {
            // One session: wrk sends the same request bytes each time (no
            // Lua on its hot path); sidekey still runs every session check.
            cmd.arg("-H").arg(format!(
                "X-Sidekey-Session: {}",
                ctx.sessions[0].to_str().unwrap_or_default()
            ));
        }
    }
    let out = cmd
        .arg(target.uri(ctx).to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                "wrk not found on PATH; install it (Debian: apt-get install wrk)".to_string()
            }
            _ => format!("cannot run wrk: {e}"),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "wrk failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse_wrk(&text)
}

/// One closed-loop case driven by wrk (a warm-up run first, not counted).
pub(crate) async fn wrk_case(
    ctx: &Arc<Ctx>,
    target: Target,
    conns: usize,
    threads: usize,
    warmup: Duration,
    dur: Duration,
) -> Result<Case, String> {
    let c2 = ctx.clone();
    let w = warmup.as_secs_f64();
    let d = dur.as_secs_f64();
    tokio::task::spawn_blocking(move || {
        if w > 0.0 {
            run_wrk(&c2, target, conns, threads, w)?;
        }
        let a = snap(&c2);
        let o = run_wrk(&c2, target, conns, threads, d)?;
        let b = snap(&c2);
        let mut c = finish_case(&c2, "wrk", target, conns, None, Vec::new(), a, b);
        c.requests = o.requests;
        c.secs = o.secs;
        c.errors = o.errors.values().sum();
        c.error_kinds = o.errors;
        c.fixed = Some(o.quantiles);
        Ok(c)
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let text = "Running 4s test @ https://127.0.0.1:1/api\n  1 threads and 64 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     1.80ms  300.00us  12.50ms   90.00%\n    Req/Sec    36.00k     1.00k   38.00k    70.00%\n  Latency Distribution\n     50%  174.00us\n     75%    1.70ms\n     90%    2.00ms\n     99%    3.10ms\n  145000 requests in 4.00s, 30.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 12\nRequests/sec:  36250.00\nTransfer/sec:      7.50MB\n";
        let o = parse_wrk(text).unwrap();
        assert_eq!(o.requests, 145_000);
        assert!((o.secs - 4.0).abs() < 1e-9);
        assert_eq!(o.quantiles[&500], 174.0);
        assert_eq!(o.quantiles[&990], 3100.0);
        assert_eq!(o.quantiles[&1000], 12_500.0);
        assert_eq!(o.errors["socket read"], 2);
        assert_eq!(o.errors["socket timeout"], 1);
        assert_eq!(o.errors["non-2xx"], 12);
        assert!(parse_wrk("nothing").is_err());
    }
}
