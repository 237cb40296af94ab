//! The audit log: one record per proxied call and per admin write.
//!
//! The request path serialises its record and appends the bytes to a
//! buffer (no wake-up, no I/O, no per-record allocation kept alive). A
//! background task seals and writes the buffered batches every
//! `FLUSH_EVERY`, or sooner when they grow large or someone reads the log.
//! A `kill -9` can lose the last interval's records; a graceful shutdown
//! writes everything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};

use crate::store::{AUDIT_BATCH, AuditRecord, Store};

/// How often buffered records are written.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// A buffer this large is written at once.
const FLUSH_AT: usize = 4096;
/// Beyond this the writer is not keeping up: records are dropped (and
/// counted) rather than growing memory without bound.
const DROP_AT: usize = 65_536;

/// Records waiting to be written, already as JSON arrays of at most
/// `AUDIT_BATCH` records: what the store seals as one value each.
#[derive(Default)]
struct Pending {
    done: Vec<(Vec<u8>, usize)>,
    current: Vec<u8>,
    in_current: usize,
    total: usize,
}

impl Pending {
    /// Appends one serialised record; returns how many are pending.
    fn push(&mut self, json: &[u8]) -> usize {
        let sep = if self.in_current == 0 { b'[' } else { b',' };
        self.current.push(sep);
        self.current.extend_from_slice(json);
        self.in_current += 1;
        self.total += 1;
        if self.in_current == AUDIT_BATCH {
            self.close_current();
        }
        self.total
    }

    /// Ends the open JSON array and queues it as a batch.
    fn close_current(&mut self) {
        if self.in_current > 0 {
            self.current.push(b']');
            let n = std::mem::take(&mut self.in_current);
            self.done.push((std::mem::take(&mut self.current), n));
        }
    }

    fn take(&mut self) -> Vec<(Vec<u8>, usize)> {
        self.close_current();
        self.total = 0;
        std::mem::take(&mut self.done)
    }
}

struct Shared {
    buf: Mutex<Pending>,
    /// Answered once every record buffered before they registered is written.
    waiters: Mutex<Vec<oneshot::Sender<()>>>,
    wake: Notify,
    dropped: AtomicU64,
}

pub struct AuditLog {
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AuditLog {
    /// Starts the writer; `enabled = false` gives a log that discards.
    pub fn start(store: Arc<Store>, enabled: bool, max_records: usize) -> AuditLog {
        if !enabled {
            return AuditLog { shared: None };
        }
        let shared = Arc::new(Shared {
            buf: Mutex::new(Pending::default()),
            waiters: Mutex::new(Vec::new()),
            wake: Notify::new(),
            dropped: AtomicU64::new(0),
        });
        let s = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = s.wake.notified() => {}
                }
                // Waiters first: every record buffered before a waiter
                // registered is then in `records` below.
                let waiters = std::mem::take(&mut *lock(&s.waiters));
                let batches = lock(&s.buf).take();
                if !batches.is_empty() {
                    let store = store.clone();
                    // sled writes block: off the request workers.
                    let rt = tokio::runtime::Handle::current();
                    let res = tokio::task::spawn_blocking(move || {
                        rt.block_on(store.append_audit_json(&batches, max_records))
                    })
                    .await;
                    if let Ok(Err(e)) = res {
                        tracing::error!(error = %e, "cannot write audit records");
                    }
                }
                for w in waiters {
                    let _ = w.send(());
                }
                if Arc::strong_count(&s) == 1 {
                    break;
                }
            }
        });
        AuditLog {
            shared: Some(shared),
        }
    }

    /// Buffers a record: serialised here, appended under a short lock.
    pub fn record(&self, r: AuditRecord) {
        let Some(s) = &self.shared else { return };
        let mut json = Vec::with_capacity(384);
        if serde_json::to_writer(&mut json, &r).is_err() {
            return;
        }
        drop(r);
        let total = {
            let mut p = lock(&s.buf);
            if p.total >= DROP_AT {
                drop(p);
                let n = s.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(dropped = n, "audit writer falling behind; records dropped");
                }
                return;
            }
            p.push(&json)
        };
        if total == FLUSH_AT {
            s.wake.notify_one();
        }
    }

    /// Waits until every record buffered so far is written.
    pub async fn sync(&self) {
        let Some(s) = &self.shared else { return };
        let (tx, rx) = oneshot::channel();
        lock(&s.waiters).push(tx);
        s.wake.notify_one();
        let _ = rx.await;
    }
}
