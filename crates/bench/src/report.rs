//! What a run prints: one measured case as a table row and a JSON line,
//! and the direct / nginx / sidekey summary over the rounds.

use std::collections::BTreeMap;
use std::io::Write;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// One measured case.
pub(crate) struct Case {
    pub(crate) mode: &'static str,
    pub(crate) target: &'static str,
    pub(crate) concurrency: usize,
    pub(crate) rate: Option<f64>,
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) error_kinds: BTreeMap<String, u64>,
    pub(crate) secs: f64,
    pub(crate) hist: Histogram<u64>,
    /// Quantiles reported by an external load generator (wrk), by
    /// per-mille (500, 900, 990, 1000 = max), instead of `hist`.
    pub(crate) fixed: Option<BTreeMap<u32, f64>>,
    /// CPU of the gateway under test: sidekey's process for `sidekey`,
    /// nginx's master and workers for `nginx`, 0 for `direct`.
    pub(crate) proxy_cpu_s: f64,
    /// The user-space part of `proxy_cpu_s`; the rest is the kernel's.
    pub(crate) proxy_user_s: f64,
    /// CPU of the load generator and the upstream (this process, and wrk).
    pub(crate) bench_cpu_s: f64,
    /// How the gateway's CPU was shared between its workers, per cent
    /// each (sidekey's agent threads, nginx's worker processes).
    pub(crate) worker_split: Option<Vec<f64>>,
    pub(crate) sidekey_hwm_kib: u64,
    pub(crate) sidekey_rss_kib: u64,
    /// Filled in for `via` cases from the matching `direct` one.
    pub(crate) ratio: Option<f64>,
    pub(crate) added_p50_us: Option<f64>,
    pub(crate) extra: serde_json::Map<String, Value>,
}

impl Case {
    pub(crate) fn rps(&self) -> f64 {
        if self.secs > 0.0 {
            self.requests as f64 / self.secs
        } else {
            0.0
        }
    }

    pub(crate) fn q(&self, q: f64) -> f64 {
        if let Some(f) = &self.fixed {
            return f
                .get(&((q * 1000.0).round() as u32))
                .copied()
                .unwrap_or(f64::NAN);
        }
        if self.hist.is_empty() {
            0.0
        } else {
            self.hist.value_at_quantile(q) as f64
        }
    }

    pub(crate) fn max(&self) -> f64 {
        match &self.fixed {
            Some(_) => self.q(1.0),
            None => self.hist.max() as f64,
        }
    }

    fn cpu_us_per_req(&self, cpu_s: f64) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            cpu_s * 1e6 / self.requests as f64
        }
    }

    pub(crate) fn json(&self, credentials: usize) -> Value {
        let mut v = json!({
            "case": self.mode,
            "target": self.target,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "credentials": credentials,
            "requests": self.requests,
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "secs": round3(self.secs),
            "rps": round1(self.rps()),
            "load": if self.fixed.is_some() { "wrk" } else { "builtin" },
            "p50_us": finite(self.q(0.5)),
            "p90_us": finite(self.q(0.9)),
            "p99_us": finite(self.q(0.99)),
            "p999_us": finite(self.q(0.999)),
            "max_us": finite(self.max()),
            "ratio_rps_to_direct": self.ratio.map(round3),
            "added_p50_us": self.added_p50_us,
            "proxy_cpu_us_per_req": round1(self.cpu_us_per_req(self.proxy_cpu_s)),
            "proxy_user_us_per_req": round1(self.cpu_us_per_req(self.proxy_user_s)),
            "bench_cpu_us_per_req": round1(self.cpu_us_per_req(self.bench_cpu_s)),
            "sidekey_rss_kib": self.sidekey_rss_kib,
            "sidekey_peak_rss_kib": self.sidekey_hwm_kib,
            "worker_cpu_split_pct": self
                .worker_split
                .as_ref()
                .map(|w| w.iter().map(|p| round1(*p)).collect::<Vec<_>>()),
        });
        if let Value::Object(m) = &mut v {
            for (k, x) in &self.extra {
                m.insert(k.clone(), x.clone());
            }
        }
        v
    }
}

fn fmt_us(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.0}")
    } else {
        "-".into()
    }
}

fn finite(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

pub(crate) fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub(crate) struct Out {
    pub(crate) json: bool,
    pub(crate) credentials: usize,
    pub(crate) header_printed: bool,
    /// `sled` or `postgres`, named in every JSON object.
    pub(crate) backend: &'static str,
}

impl Out {
    /// The human table goes to stdout, or to stderr when stdout carries JSON.
    pub(crate) fn line(&self, s: &str) {
        if self.json {
            eprintln!("{s}");
        } else {
            println!("{s}");
        }
        let _ = std::io::stdout().flush();
    }

    pub(crate) fn json_line(&self, v: &Value) {
        if self.json {
            let mut v = v.clone();
            if let Value::Object(m) = &mut v {
                m.entry("backend").or_insert(json!(self.backend));
            }
            println!("{v}");
            let _ = std::io::stdout().flush();
        }
    }

    pub(crate) fn case(&mut self, c: &Case) {
        if !self.header_printed {
            self.line(&format!(
                "{:<6} {:<7} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>6} {:>8} {:>9} {:>8} {:>8}",
                "mode",
                "target",
                "conc/rate",
                "req/s",
                "p50 µs",
                "p99 µs",
                "p99.9µs",
                "max µs",
                "errors",
                "ratio",
                "+p50 µs",
                "gw µs/rq",
                "bn µs/rq",
                "sk HWM"
            ));
            self.header_printed = true;
        }
        let load = match c.rate {
            Some(r) => format!("{r:.0}/s"),
            None => c.concurrency.to_string(),
        };
        let ratio = c.ratio.map(|r| format!("{r:.2}")).unwrap_or("-".into());
        let added = c
            .added_p50_us
            .map(|a| format!("{a:+.0}"))
            .unwrap_or("-".into());
        self.line(&format!(
            "{:<6} {:<7} {:>9} {:>10.0} {:>8.0} {:>8.0} {:>8} {:>8.0} {:>7} {:>6} {:>8} {:>9.1} {:>8.1} {:>6}Mi",
            c.mode,
            c.target,
            load,
            c.rps(),
            c.q(0.5),
            c.q(0.99),
            fmt_us(c.q(0.999)),
            c.max(),
            c.errors,
            ratio,
            added,
            c.cpu_us_per_req(c.proxy_cpu_s),
            c.cpu_us_per_req(c.bench_cpu_s),
            c.sidekey_hwm_kib / 1024
        ));
        for (k, n) in &c.error_kinds {
            self.line(&format!("        error {k}: {n}"));
        }
        if c.proxy_cpu_s > 0.0 && c.proxy_user_s.is_finite() {
            // Several connections over several workers: a split far from
            // even means one worker carried most of the connections.
            let split = match c.worker_split.as_ref().filter(|_| c.concurrency > 1) {
                Some(split) => {
                    let each: Vec<String> = split.iter().map(|p| format!("{p:.0} %")).collect();
                    format!("workers' CPU {}; ", each.join(" / "))
                }
                None => String::new(),
            };
            self.line(&format!(
                "        {}: {split}user {:.1} + kernel {:.1} µs per request",
                c.target,
                c.cpu_us_per_req(c.proxy_user_s),
                c.cpu_us_per_req(c.proxy_cpu_s - c.proxy_user_s),
            ));
        }
        self.json_line(&c.json(self.credentials));
    }

    pub(crate) fn note(&self, s: &str) {
        self.line(s);
    }
}

fn range(xs: &[f64], prec: usize, signed: bool) -> String {
    let xs: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if xs.is_empty() {
        return "-".into();
    }
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let f = |x: f64| {
        if signed {
            format!("{x:+.prec$}")
        } else {
            format!("{x:.prec$}")
        }
    };
    if (hi - lo).abs() < 0.5 * 10f64.powi(-(prec as i32)) {
        f(lo)
    } else {
        format!("{}…{}", f(lo), f(hi))
    }
}

/// The middle of the finite values (the mean of the two middle ones for an
/// even count); NaN when there are none. Rounds on a shared VM spread
/// widely, so the goals are reported with their median as well as range.
fn median(xs: &[f64]) -> f64 {
    let mut xs: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[m]
    } else {
        (xs[m - 1] + xs[m]) / 2.0
    }
}

/// direct / nginx / sidekey per load level, as ranges over the rounds, and
/// the two gateway goals (added p50 at 1 connection, req/s at 64).
pub(crate) fn side_by_side(out: &Out, cases: &[Case]) {
    let mut keys: Vec<(usize, String)> = Vec::new();
    for c in cases {
        let k = (
            c.concurrency,
            c.rate.map(|r| format!("{r:.0}/s")).unwrap_or_default(),
        );
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let rounds = cases
        .iter()
        .filter(|c| c.target == "direct" && c.concurrency == keys[0].0)
        .count();
    out.note(&format!(
        "\nside by side, {rounds} round(s), min…max ({} load, {} store):",
        if cases.iter().any(|c| c.fixed.is_some()) {
            "wrk"
        } else {
            "builtin"
        },
        out.backend
    ));
    out.note(&format!(
        "{:>9} {:<12} {:>15} {:>11} {:>11} {:>7} {:>13} {:>13} {:>13}",
        "conc/rate",
        "target",
        "req/s",
        "p50 µs",
        "+p50 µs",
        "errors",
        "gw CPU µs/rq",
        "of it user",
        "× req/s"
    ));
    out.note("  (× req/s: sidekey against nginx; sidekey-tool, -mcp, -jwt against the sidekey proxy path of the same round)");
    let pick = |k: &(usize, String), t: &str| -> Vec<&Case> {
        cases
            .iter()
            .filter(|c| {
                c.target == t
                    && c.concurrency == k.0
                    && c.rate.map(|r| format!("{r:.0}/s")).unwrap_or_default() == k.1
            })
            .collect()
    };
    for k in &keys {
        let ng = pick(k, "nginx");
        let proxy = pick(k, "sidekey");
        for t in [
            "direct",
            "nginx",
            "sidekey",
            "sidekey-tool",
            "sidekey-mcp",
            "sidekey-jwt",
        ] {
            let cs = pick(k, t);
            if cs.is_empty() {
                continue;
            }
            let v = |f: &dyn Fn(&Case) -> f64| cs.iter().map(|c| f(c)).collect::<Vec<_>>();
            // The proxy against nginx; the other sidekey paths against the
            // proxy path of the same round.
            let base = if t == "sidekey" { &ng } else { &proxy };
            let vs_base: Vec<f64> = cs
                .iter()
                .zip(base.iter())
                .map(|(c, n)| c.rps() / n.rps().max(1e-9))
                .collect();
            out.note(&format!(
                "{:>9} {:<12} {:>15} {:>11} {:>11} {:>7} {:>13} {:>13} {:>13}",
                if k.1.is_empty() {
                    k.0.to_string()
                } else {
                    k.1.clone()
                },
                t,
                range(&v(&|c| c.rps()), 0, false),
                range(&v(&|c| c.q(0.5)), 0, false),
                if t == "direct" {
                    "-".into()
                } else {
                    range(&v(&|c| c.added_p50_us.unwrap_or(f64::NAN)), 0, true)
                },
                range(&v(&|c| c.errors as f64), 0, false),
                if t == "direct" {
                    "-".into()
                } else {
                    range(&v(&|c| c.cpu_us_per_req(c.proxy_cpu_s)), 1, false)
                },
                if t == "direct" {
                    "-".into()
                } else {
                    range(&v(&|c| c.cpu_us_per_req(c.proxy_user_s)), 1, false)
                },
                if t.starts_with("sidekey") {
                    range(&vs_base, 2, false)
                } else {
                    "-".into()
                },
            ));
        }
    }
    // The goals, judged round by round (same run, same machine state).
    let at = |conc: usize, t: &str| -> Vec<&Case> {
        cases
            .iter()
            .filter(|c| c.target == t && c.concurrency == conc && c.rate.is_none())
            .collect()
    };
    let (s1, n1) = (at(1, "sidekey"), at(1, "nginx"));
    if !s1.is_empty() && s1.len() == n1.len() {
        let diff: Vec<f64> = s1
            .iter()
            .zip(&n1)
            .map(|(s, n)| s.added_p50_us.unwrap_or(f64::NAN) - n.added_p50_us.unwrap_or(f64::NAN))
            .collect();
        let met = diff.iter().filter(|d| **d <= 0.0).count();
        out.note(&format!(
            "goal p50 at 1 connection: sidekey adds {} µs, nginx {} µs; sidekey − nginx {} µs (median {:+.0}); met in {met}/{} round(s)",
            range(&s1.iter().map(|c| c.added_p50_us.unwrap_or(f64::NAN)).collect::<Vec<_>>(), 0, true),
            range(&n1.iter().map(|c| c.added_p50_us.unwrap_or(f64::NAN)).collect::<Vec<_>>(), 0, true),
            range(&diff, 0, true),
            median(&diff),
            diff.len()
        ));
    }
    for t in ["sidekey-tool", "sidekey-mcp", "sidekey-jwt"] {
        let (p1, x1) = (at(1, "sidekey"), at(1, t));
        let (p64, x64) = (at(64, "sidekey"), at(64, t));
        if x1.is_empty() && x64.is_empty() {
            continue;
        }
        let p50: Vec<f64> = x1
            .iter()
            .zip(&p1)
            .map(|(x, p)| x.q(0.5) - p.q(0.5))
            .collect();
        let ratio: Vec<f64> = x64
            .iter()
            .zip(&p64)
            .map(|(x, p)| x.rps() / p.rps().max(1e-9))
            .collect();
        out.note(&format!(
            "{t} against the proxy path: p50 at 1 connection {} µs (median {:+.0}); req/s at 64 connections {}× (median {:.2}); errors {}",
            range(&p50, 0, true),
            median(&p50),
            range(&ratio, 2, false),
            median(&ratio),
            x1.iter().chain(&x64).map(|c| c.errors).sum::<u64>(),
        ));
    }
    let (s64, n64) = (at(64, "sidekey"), at(64, "nginx"));
    if !s64.is_empty() && s64.len() == n64.len() {
        let ratio: Vec<f64> = s64
            .iter()
            .zip(&n64)
            .map(|(s, n)| s.rps() / n.rps().max(1e-9))
            .collect();
        let met = s64
            .iter()
            .zip(&ratio)
            .filter(|(s, r)| **r >= 1.0 && s.errors == 0)
            .count();
        out.note(&format!(
            "goal req/s at 64 connections: sidekey/nginx {}× (median {:.2}; errors sidekey {}, nginx {}); met in {met}/{} round(s)",
            range(&ratio, 2, false),
            median(&ratio),
            s64.iter().map(|c| c.errors).sum::<u64>(),
            n64.iter().map(|c| c.errors).sum::<u64>(),
            ratio.len()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_skip_missing_values() {
        assert_eq!(median(&[3.0, -5.0, 28.0]), 3.0);
        assert!((median(&[0.76, 1.03, 0.88, 0.9]) - 0.89).abs() < 1e-9);
        assert_eq!(median(&[f64::NAN, 2.0]), 2.0);
        assert!(median(&[]).is_nan());
    }
}
