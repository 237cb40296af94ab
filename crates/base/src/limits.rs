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
        let mut m = crate::sync::lock(&self.buckets);
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
        crate::sync::lock(&self.by_ip)
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

/// How a [`ByteBudget`] is shared among the bodies being read.
#[derive(Clone, Copy, Debug)]
pub struct Sharing {
    /// The last `reserve` bytes of the budget are for small bodies only:
    /// those declaring and, so far, holding at most `reserve` bytes. Large
    /// bodies, whatever they do, leave that much room for them.
    pub reserve: u64,
    /// What one body may hold however many others want memory. Past it a
    /// body holds memory on loan: when a body within its share needs room,
    /// the largest body past its share is cut off.
    pub share: u64,
    /// A small body still being read after this long may be cut off to make
    /// room for another small body (a genuine small body arrives in well
    /// under a second; one that lingers is squatting on the reserve).
    pub patience: std::time::Duration,
}

/// Bytes held by in-flight request bodies of one kind, capped as a whole
/// and shared so that no sender can keep the others out.
///
/// A per-request limit bounds one body; it does not bound 256 HTTP/2
/// streams each sending one, nor stop one slow sender from sitting on the
/// whole budget. Each reader holds what it has read so far (nothing for
/// what a `Content-Length` only promises), under the rules of [`Sharing`].
/// A reader that finds no room is refused at once (no waiting: waiting
/// would hold connections open for the attacker); one cut off to make
/// room for another learns it from [`Reader::cut_off`].
#[derive(Debug)]
pub struct ByteBudget {
    limit: u64,
    state: Mutex<BudgetState>,
}

#[derive(Debug, Default)]
struct BudgetState {
    used: u64,
    next_id: u64,
    readers: HashMap<u64, Holder>,
}

#[derive(Debug)]
struct Holder {
    held: u64,
    /// Declared or grown past the reserve: never again small.
    large: bool,
    since: std::time::Instant,
    /// Set once another reader took this one's memory.
    cut: bool,
    wake: std::sync::Arc<tokio::sync::Notify>,
}

/// One body's place in a [`ByteBudget`]; what it holds is given back when
/// dropped.
#[derive(Debug)]
pub struct Reader<'a> {
    budget: &'a ByteBudget,
    id: u64,
    rules: Sharing,
    wake: std::sync::Arc<tokio::sync::Notify>,
}

impl ByteBudget {
    pub fn new(limit: u64) -> ByteBudget {
        ByteBudget {
            limit,
            state: Mutex::new(BudgetState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        crate::sync::lock(&self.state)
    }

    /// Bytes held right now (for tests and metrics).
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// A reader holding nothing yet, for a body that declared `declared`
    /// bytes (`None`: chunked, or HTTP/2 without a length).
    pub fn reader(&self, rules: Sharing, declared: Option<u64>) -> Reader<'_> {
        self.reader_at(rules, declared, std::time::Instant::now())
    }

    fn reader_at(
        &self,
        rules: Sharing,
        declared: Option<u64>,
        now: std::time::Instant,
    ) -> Reader<'_> {
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.readers.insert(
            id,
            Holder {
                held: 0,
                large: declared.is_some_and(|d| d > rules.reserve),
                since: now,
                cut: false,
                wake: wake.clone(),
            },
        );
        Reader {
            budget: self,
            id,
            rules,
            wake,
        }
    }
}

impl Reader<'_> {
    /// Holds `n` more bytes, or `false` (holding nothing more) when there
    /// is no room for them or this reader has been cut off.
    pub fn grow(&mut self, n: u64) -> bool {
        self.grow_at(n, std::time::Instant::now())
    }

    fn grow_at(&mut self, n: u64, now: std::time::Instant) -> bool {
        let limit = self.budget.limit;
        let rules = self.rules;
        let mut st = self.budget.lock();
        let Some(me) = st.readers.get_mut(&self.id) else {
            return false;
        };
        if me.cut {
            return false;
        }
        let total = me.held.saturating_add(n);
        if total > rules.reserve {
            me.large = true;
        }
        let (large, since) = (me.large, me.since);
        let ceiling = if large {
            limit.saturating_sub(rules.reserve)
        } else {
            limit
        };
        loop {
            if st.used.saturating_add(n) <= ceiling {
                st.used += n;
                if let Some(me) = st.readers.get_mut(&self.id) {
                    me.held += n;
                }
                return true;
            }
            let Some(victim) = victim(&st, self.id, total, large, since, rules, now) else {
                return false;
            };
            if let Some(v) = st.readers.get_mut(&victim) {
                let freed = std::mem::take(&mut v.held);
                v.cut = true;
                // A stored permit: the victim learns it even if it is not
                // waiting right now.
                v.wake.notify_one();
                st.used -= freed;
            }
        }
    }

    /// Resolves once another reader has taken this one's memory: the body
    /// must be abandoned.
    pub async fn cut_off(&self) {
        self.wake.notified().await
    }
}

/// The reader to cut off so that reader `me` (asking to hold `total`
/// bytes) gets room, if any may be.
fn victim(
    st: &BudgetState,
    me: u64,
    total: u64,
    large: bool,
    since: std::time::Instant,
    rules: Sharing,
    now: std::time::Instant,
) -> Option<u64> {
    let others = || {
        st.readers
            .iter()
            .filter(move |(id, h)| **id != me && !h.cut && h.held > 0)
    };
    // Within its share, a body takes back what large bodies hold on loan,
    // largest first (a small body is never cut for another's sake, however
    // small the share is set).
    if total <= rules.share {
        if let Some((id, _)) = others()
            .filter(|(_, h)| h.large && h.held > rules.share)
            .max_by_key(|(_, h)| h.held)
        {
            return Some(*id);
        }
    }
    // A small body may end the oldest small body that has outstayed its
    // patience (and started before it).
    if !large {
        return others()
            .filter(|(_, h)| !h.large && h.since < since && h.since + rules.patience <= now)
            .min_by_key(|(_, h)| h.since)
            .map(|(id, _)| *id);
    }
    None
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        let mut st = self.budget.lock();
        if let Some(h) = st.readers.remove(&self.id) {
            st.used -= h.held;
        }
    }
}

#[cfg(test)]
mod budget_tests {
    use super::{ByteBudget, Sharing};
    use std::time::{Duration, Instant};

    const MIB: u64 = 1 << 20;

    fn rules() -> Sharing {
        // A 20 MiB budget: 4 MiB reserved, 4 MiB per body when contended.
        Sharing {
            reserve: 4 * MIB,
            share: 4 * MIB,
            patience: Duration::from_secs(3),
        }
    }

    #[test]
    fn readers_share_one_budget_and_give_back_on_drop() {
        let b = ByteBudget::new(20 * MIB);
        let mut r1 = b.reader(rules(), None);
        assert!(r1.grow(3 * MIB));
        let mut r2 = b.reader(rules(), Some(MIB));
        assert!(r2.grow(MIB));
        assert_eq!(b.used(), 4 * MIB);
        drop(r1);
        assert_eq!(b.used(), MIB);
        drop(r2);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn large_bodies_leave_the_reserve_to_small_ones() {
        let b = ByteBudget::new(20 * MIB);
        // Four large bodies, each within its share, fill all but the reserve.
        let mut large: Vec<_> = (0..4).map(|_| b.reader(rules(), Some(60 * MIB))).collect();
        for r in &mut large {
            assert!(r.grow(4 * MIB));
        }
        let mut fifth = b.reader(rules(), Some(60 * MIB));
        assert!(!fifth.grow(1), "a large body may not touch the reserve");
        // A chunked body is small until it passes the reserve.
        let mut chunked = b.reader(rules(), None);
        assert!(chunked.grow(MIB));
        assert!(!chunked.grow(3 * MIB + 1), "past the reserve it is large");
        drop(chunked);
        // A small signed post-call, up to the whole reserve, always fits.
        let mut small = b.reader(rules(), Some(4 * MIB));
        assert!(small.grow(4 * MIB));
        assert_eq!(b.used(), 20 * MIB);
        drop(small);
        drop(fifth);
        drop(large);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_body_past_its_share_gives_way_to_one_within_it() {
        let b = ByteBudget::new(20 * MIB);
        // Alone, one body may use everything but the reserve.
        let mut big = b.reader(rules(), Some(60 * MIB));
        assert!(big.grow(16 * MIB));
        let mut other = b.reader(rules(), Some(60 * MIB));
        // Within its share: takes the room back from the one on loan.
        assert!(other.grow(2 * MIB));
        assert_eq!(b.used(), 2 * MIB);
        assert!(!big.grow(1), "a reader cut off holds nothing more");
        let cut = big.cut_off();
        futures_util::FutureExt::now_or_never(cut).expect("the cut-off reader is told");
        // Past its own share, a body gets only what is free.
        assert!(other.grow(14 * MIB));
        let mut third = b.reader(rules(), Some(60 * MIB));
        assert!(third.grow(4 * MIB), "within its share: `other` gives way");
        assert!(!other.grow(1));
        assert_eq!(b.used(), 4 * MIB);
        drop((big, other, third));
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_small_body_is_never_cut_for_a_share_smaller_than_the_reserve() {
        let b = ByteBudget::new(12 * MIB);
        let r = Sharing {
            reserve: 4 * MIB,
            share: MIB,
            patience: Duration::from_secs(3),
        };
        let mut small = b.reader(r, Some(4 * MIB));
        assert!(small.grow(4 * MIB));
        let mut large = b.reader(r, Some(60 * MIB));
        assert!(large.grow(4 * MIB));
        // Within its share, a newcomer takes the room of the large body past
        // its share, not of the small one (past the share too).
        let mut within: Vec<_> = (0..4).map(|_| b.reader(r, Some(60 * MIB))).collect();
        assert!(within[0].grow(MIB));
        assert!(!large.grow(1), "the large body gave way");
        for w in &mut within[1..] {
            assert!(w.grow(MIB));
        }
        assert_eq!(b.used(), 8 * MIB);
        let mut last = b.reader(r, Some(60 * MIB));
        assert!(!last.grow(1), "nothing on loan is left to take back");
        assert!(futures_util::FutureExt::now_or_never(small.cut_off()).is_none());
        assert!(small.grow(0));
    }

    #[test]
    fn a_small_body_that_lingers_gives_way_to_a_newer_small_one() {
        let b = ByteBudget::new(8 * MIB);
        let r = Sharing {
            reserve: 4 * MIB,
            share: 4 * MIB,
            patience: Duration::from_secs(3),
        };
        let t0 = Instant::now();
        let mut large = b.reader_at(r, Some(60 * MIB), t0);
        assert!(large.grow_at(4 * MIB, t0));
        let mut squatter = b.reader_at(r, Some(4 * MIB), t0);
        assert!(squatter.grow_at(3 * MIB, t0));
        // Soon after, a newcomer waits its turn: refused, squatter kept.
        let t1 = t0 + Duration::from_secs(1);
        let mut early = b.reader_at(r, Some(2 * MIB), t1);
        assert!(!early.grow_at(2 * MIB, t1));
        assert!(squatter.grow_at(1, t1));
        drop(early);
        // Past its patience the squatter is cut off for a newer small body.
        let t2 = t0 + Duration::from_secs(4);
        let mut genuine = b.reader_at(r, Some(4 * MIB), t2);
        assert!(genuine.grow_at(4 * MIB, t2));
        assert!(!squatter.grow_at(1, t2));
        // A large body within its share is never cut for a small one.
        assert!(futures_util::FutureExt::now_or_never(large.cut_off()).is_none());
        assert_eq!(b.used(), 8 * MIB);
    }
}
