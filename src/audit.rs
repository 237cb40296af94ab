//! The audit log: one record per proxied call and per admin write.
//!
//! The request path only pushes a record into a buffer (no wake-up, no
//! I/O). A background task seals and writes the buffer as one batch every
//! `FLUSH_EVERY`, or sooner when it grows large or someone reads the log.
//! A `kill -9` can lose the last interval's records; a graceful shutdown
//! writes everything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};

use crate::store::{AuditRecord, Store};

/// How often buffered records are written.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// A buffer this large is written at once.
const FLUSH_AT: usize = 4096;
/// Beyond this the writer is not keeping up: records are dropped (and
/// counted) rather than growing memory without bound.
const DROP_AT: usize = 65_536;

struct Shared {
    buf: Mutex<Vec<AuditRecord>>,
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
            buf: Mutex::new(Vec::new()),
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
                let records = std::mem::take(&mut *lock(&s.buf));
                if !records.is_empty() {
                    let store = store.clone();
                    let res = tokio::task::spawn_blocking(move || {
                        store.append_audit(&records, max_records)
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

    /// Buffers a record. Cheap: a lock and a push.
    pub fn record(&self, r: AuditRecord) {
        let Some(s) = &self.shared else { return };
        let len = {
            let mut buf = lock(&s.buf);
            if buf.len() >= DROP_AT {
                drop(buf);
                let n = s.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(dropped = n, "audit writer falling behind; records dropped");
                }
                return;
            }
            buf.push(r);
            buf.len()
        };
        if len == FLUSH_AT {
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
