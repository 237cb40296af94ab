//! Credential lookup latency timed through the library on the chosen
//! backend, before sidekey starts.

use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;

use crate::report::{Out, round1, round3};
use crate::sidekey_proc::user_id;

/// What the library measured on the store before sidekey started.
pub(crate) struct StoreProbe {
    pub(crate) bytes: u64,
    /// `credential_uncached` (a read from the backend and an unseal), ns.
    uncached: Option<Histogram<u64>>,
    /// `credential` through the record cache, ns (what a warm request does).
    cached: Option<Histogram<u64>>,
    /// Whether the cache was in use (PostgreSQL: its listener was up).
    cache_live: bool,
}

fn ns_hist() -> Histogram<u64> {
    // 1 ns .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

/// Opens the store through the library as sidekey does and times `reads`
/// credential lookups over the `n` users, uncached and cached. Closed
/// again before sidekey starts (sled has one process).
pub(crate) async fn probe_store(dir: &Path, n: usize, reads: usize) -> Result<StoreProbe, String> {
    let cfg = sidekey::config::Config::load(&dir.join("config.toml")).map_err(|p| p.join("; "))?;
    let loaded = sidekey::bootstrap::load(&cfg, false).map_err(|p| p.join("; "))?;
    let sled_db = cfg.store.path.join("db");
    wait_sled_unlocked(&sled_db).await?;
    let store = sidekey::app::open_store(&cfg, loaded.keys)
        .await
        .map_err(|e| e.to_string())?;
    let probe = probe_open_store(&store, n, reads).await;
    drop(store);
    // sidekey starts next, on the same sled files.
    wait_sled_unlocked(&sled_db).await?;
    probe
}

/// sled's I/O threads can hold a dropped store's file lock a little
/// longer; waits (up to 10 s) until `db` could be locked.
async fn wait_sled_unlocked(db: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(db) else {
        return Ok(()); // no sled store (yet)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            // SAFETY: as above.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{} still locked after 10 s", db.display()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn probe_open_store(
    store: &sidekey::store::Store,
    n: usize,
    reads: usize,
) -> Result<StoreProbe, String> {
    let mut probe = StoreProbe {
        bytes: store.size_on_disk().await,
        uncached: None,
        cached: None,
        cache_live: false,
    };
    if n == 0 || reads == 0 {
        return Ok(probe);
    }
    // Not counted: the pool's connections, sled's pages.
    probe.uncached = Some(time_lookups(store, n, reads, reads.min(100), false).await?);
    // PostgreSQL's cache is used only while the LISTEN connection is up.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !store.caches().is_live() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    probe.cache_live = store.caches().is_live();
    // Warm-up fills the cache.
    probe.cached = Some(time_lookups(store, n, reads, n.min(reads), true).await?);
    Ok(probe)
}

/// `reads` timed credential lookups over `n` users after `warmup` untimed
/// ones, through the record cache or around it.
async fn time_lookups(
    store: &sidekey::store::Store,
    n: usize,
    reads: usize,
    warmup: usize,
    cached: bool,
) -> Result<Histogram<u64>, String> {
    use sidekey::store::Owner;
    // Timed up to the answer; the credential is dropped (and zeroized)
    // after the clock is read.
    let lookup = |i: usize| async move {
        let t = Instant::now();
        let owner = Owner::User(user_id(i % n));
        let (took, found) = if cached {
            let c = store.credential(&owner, "bench").await;
            (t.elapsed(), c.map(|c| c.is_some()))
        } else {
            let c = store.credential_uncached(&owner, "bench").await;
            (t.elapsed(), c.map(|c| c.is_some()))
        };
        found.map(|f| (took, f)).map_err(|e| e.to_string())
    };
    for i in 0..warmup {
        lookup(i).await?;
    }
    let mut h = ns_hist();
    for i in 0..reads {
        let (took, found) = lookup(i).await?;
        if !found {
            return Err(format!("credential of {} missing", user_id(i % n)));
        }
        let _ = h.record((took.as_nanos() as u64).max(1));
    }
    Ok(h)
}

/// Prints the lookup latencies (and a JSON object with them).
pub(crate) fn report_probe(out: &Out, p: &StoreProbe, n: usize) {
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let (Some(u), Some(c)) = (&p.uncached, &p.cached) else {
        return;
    };
    out.note(&format!(
        "lookup ({}, library, {} reads over {} credentials): uncached p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs; cached{} p50 {:.2} µs, p99 {:.2} µs",
        out.backend,
        u.len(),
        n,
        us(u, 0.5),
        us(u, 0.99),
        u.max() as f64 / 1000.0,
        if p.cache_live { "" } else { " (cache off: listener down)" },
        us(c, 0.5),
        us(c, 0.99),
    ));
    out.json_line(&json!({
        "case": "lookup",
        "credentials": n,
        "reads": u.len(),
        "uncached_p50_us": round1(us(u, 0.5)),
        "uncached_p99_us": round1(us(u, 0.99)),
        "uncached_max_us": round1(u.max() as f64 / 1000.0),
        "cached_p50_us": round3(us(c, 0.5)),
        "cached_p99_us": round3(us(c, 0.99)),
        "cache_live": p.cache_live,
    }));
}
