//! Per-session and per-user rate limits (token buckets). Off unless
//! configured; a voice agent rarely needs more than a few calls a second,
//! so a limit caps what a leaked session token can do.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::config::LimitsConfig;

struct Bucket {
    tokens: f64,
    at_ms: i64,
}

struct Limiter {
    rps: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Limiter {
    fn new(rps: f64, burst: u32) -> Option<Limiter> {
        (rps > 0.0).then(|| Limiter {
            rps,
            burst: f64::from(burst.max(1)).max(rps.ceil()),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Takes one token; on refusal, the seconds until one is available.
    fn take(&self, key: &str, now_ms: i64) -> Result<(), u64> {
        let mut m = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > 100_000 {
            // Full buckets carry no state worth keeping.
            let (rps, burst) = (self.rps, self.burst);
            m.retain(|_, b| b.tokens + (now_ms - b.at_ms) as f64 / 1000.0 * rps < burst);
        }
        let b = m.entry(key.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at_ms: now_ms,
        });
        let elapsed = (now_ms - b.at_ms).max(0) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed * self.rps).min(self.burst);
        b.at_ms = now_ms;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - b.tokens) / self.rps).ceil() as u64).max(1))
        }
    }
}

pub struct RateLimits {
    session: Option<Limiter>,
    user: Option<Limiter>,
}

impl RateLimits {
    pub fn new(cfg: &LimitsConfig) -> Self {
        RateLimits {
            session: Limiter::new(cfg.per_session_rps, cfg.per_session_burst),
            user: Limiter::new(cfg.per_user_rps, cfg.per_user_burst),
        }
    }

    /// Ok, or the Retry-After seconds.
    pub fn check(&self, sid: &str, user: &str, now_ms: i64) -> Result<(), u64> {
        if let Some(l) = &self.session {
            l.take(sid, now_ms)?;
        }
        if let Some(l) = &self.user {
            l.take(user, now_ms)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills() {
        let l = RateLimits::new(&LimitsConfig {
            per_session_rps: 2.0,
            per_session_burst: 2,
            ..Default::default()
        });
        assert!(l.check("s", "u", 0).is_ok());
        assert!(l.check("s", "u", 0).is_ok());
        assert_eq!(l.check("s", "u", 0), Err(1));
        assert!(l.check("other", "u", 0).is_ok());
        assert!(l.check("s", "u", 600).is_ok());
    }

    #[test]
    fn off_by_default() {
        let l = RateLimits::new(&LimitsConfig::default());
        for _ in 0..1000 {
            assert!(l.check("s", "u", 0).is_ok());
        }
    }
}
