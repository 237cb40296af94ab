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

/// Connections per client IP that have not yet carried a request sidekey
/// accepted (TLS handshakes, HTTP/2 prefaces, idle sockets). An IP that
/// has had an accepted request within `PROVEN_FOR` is never limited this
/// way: ElevenLabs calls from a few egress IPs, and its authenticated
/// traffic must not be refused because of someone else's idle sockets.
pub struct PendingConns {
    max_per_ip: usize,
    by_ip: Mutex<HashMap<std::net::IpAddr, IpEntry>>,
}

#[derive(Default)]
struct IpEntry {
    pending: usize,
    proven_until: Option<std::time::Instant>,
}

/// How long an IP stays exempt after an accepted request.
const PROVEN_FOR: std::time::Duration = std::time::Duration::from_secs(600);

/// One pending connection's place in its IP's count; given back on drop or
/// when the connection proves itself.
pub struct PendingTicket {
    owner: std::sync::Arc<PendingConns>,
    ip: std::net::IpAddr,
    counted: bool,
}

impl PendingConns {
    /// `max_per_ip = 0` switches the limit off.
    pub fn new(max_per_ip: usize) -> std::sync::Arc<PendingConns> {
        std::sync::Arc::new(PendingConns {
            max_per_ip,
            by_ip: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<std::net::IpAddr, IpEntry>> {
        self.by_ip.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ticket for a new connection from `ip`, or `None` when that IP
    /// already holds its share of pending connections.
    pub fn admit(self: &std::sync::Arc<Self>, ip: std::net::IpAddr) -> Option<PendingTicket> {
        if self.max_per_ip == 0 {
            return Some(PendingTicket {
                owner: self.clone(),
                ip,
                counted: false,
            });
        }
        let now = std::time::Instant::now();
        let mut m = self.lock();
        let e = m.entry(ip).or_default();
        let proven = e.proven_until.is_some_and(|t| t > now);
        if !proven && e.pending >= self.max_per_ip {
            return None;
        }
        e.pending += 1;
        Some(PendingTicket {
            owner: self.clone(),
            ip,
            counted: true,
        })
    }

    fn release(&self, ip: std::net::IpAddr, proven: bool) {
        let now = std::time::Instant::now();
        let mut m = self.lock();
        let Some(e) = m.get_mut(&ip) else { return };
        e.pending = e.pending.saturating_sub(1);
        if proven {
            e.proven_until = Some(now + PROVEN_FOR);
        }
        if e.pending == 0 && e.proven_until.is_none_or(|t| t <= now) {
            m.remove(&ip);
        }
    }
}

impl PendingTicket {
    /// The connection carried an accepted request: it no longer counts, and
    /// its IP is exempt for a while.
    pub fn prove(mut self) {
        if self.counted {
            self.counted = false;
            self.owner.release(self.ip, true);
        }
    }
}

impl Drop for PendingTicket {
    fn drop(&mut self) {
        if self.counted {
            self.owner.release(self.ip, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_connections_are_capped_per_ip_until_proven() {
        let p = PendingConns::new(2);
        let a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let b: std::net::IpAddr = "192.0.2.2".parse().unwrap();
        let t1 = p.admit(a).unwrap();
        let t2 = p.admit(a).unwrap();
        assert!(p.admit(a).is_none(), "third pending connection from one IP");
        assert!(p.admit(b).is_some(), "other IPs are not affected");
        drop(t1);
        let t3 = p.admit(a).unwrap();
        // An accepted request exempts the IP: authenticated traffic is
        // never refused for its pending connections.
        t2.prove();
        let more: Vec<_> = (0..10).map(|_| p.admit(a).unwrap()).collect();
        drop((t3, more));
        assert!(PendingConns::new(0).admit(a).is_some());
    }

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

/// Bytes held by in-flight request bodies of one kind, capped as a whole.
///
/// A per-request limit bounds one body; it does not bound 256 HTTP/2
/// streams each sending one. Each reader reserves what it holds, and a
/// reader that would go past the budget is refused at once (no waiting:
/// waiting would hold connections open for the attacker).
#[derive(Debug)]
pub struct ByteBudget {
    limit: u64,
    used: std::sync::atomic::AtomicU64,
}

/// Bytes reserved from a [`ByteBudget`]; given back when dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    budget: &'a ByteBudget,
    held: u64,
}

impl ByteBudget {
    pub fn new(limit: u64) -> ByteBudget {
        ByteBudget {
            limit,
            used: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// An empty reservation, grown as bytes arrive.
    pub fn reservation(&self) -> Reservation<'_> {
        Reservation {
            budget: self,
            held: 0,
        }
    }

    /// Bytes held right now (for tests and metrics).
    pub fn used(&self) -> u64 {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn take(&self, n: u64) -> bool {
        use std::sync::atomic::Ordering;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.limit)
            })
            .is_ok()
    }
}

impl Reservation<'_> {
    /// Holds `n` more bytes, or `false` (holding nothing more) when that
    /// would pass the budget.
    pub fn grow(&mut self, n: u64) -> bool {
        if self.budget.take(n) {
            self.held += n;
            true
        } else {
            false
        }
    }

    /// Holds at least `n` bytes in total.
    pub fn ensure(&mut self, n: u64) -> bool {
        n <= self.held || self.grow(n - self.held)
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.budget
            .used
            .fetch_sub(self.held, std::sync::atomic::Ordering::AcqRel);
    }
}

#[cfg(test)]
mod budget_tests {
    use super::ByteBudget;

    #[test]
    fn reservations_share_one_budget_and_give_back_on_drop() {
        let b = ByteBudget::new(100);
        let mut r1 = b.reservation();
        assert!(r1.grow(60));
        let mut r2 = b.reservation();
        assert!(!r2.grow(41));
        assert!(r2.grow(40));
        assert!(r2.ensure(30));
        assert_eq!(b.used(), 100);
        drop(r1);
        assert_eq!(b.used(), 40);
        drop(r2);
        assert_eq!(b.used(), 0);
    }
}
