//! The audit log: one record per proxied call and per admin write.
//!
//! The request path moves its record into a buffer under a short lock (no
//! wake-up, no I/O, no serialising: the JSON was a third of the request
//! path's own work). A background task serialises, seals and writes the
//! buffered records every `FLUSH_EVERY`, or sooner when they grow large or
//! someone reads the log.
//! A `kill -9` can lose the last interval's records; a graceful shutdown
//! writes everything.
//!
//! Requests refused before anyone was authenticated (no or a bad session
//! token, a webhook without its secret or signature) get no record each:
//! anyone can send them by the thousand, and each would push a record of
//! a real call out of the ring. They are counted instead, and written as
//! one summary record per kind every `SUMMARY_EVERY` (or when the log is
//! read): kind `refused`, the count in `error`.

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
/// How often counts of refused unauthenticated requests are written.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// One kind of refused unauthenticated request, for the summary record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Refused {
    /// Route group, e.g. `/v1/proxy`, `/v1/elevenlabs/post-call`.
    pub path: &'static str,
    /// sidekey's error code and, for sessions, the reason.
    pub code: &'static str,
    pub reason: Option<&'static str>,
    pub status: u16,
}

/// Records waiting to be written, already as JSON arrays of at most
/// `AUDIT_BATCH` records: what the store seals as one value each.
#[derive(Default)]
struct Pending {
    done: Vec<(Vec<u8>, usize)>,
    current: Vec<u8>,
    in_current: usize,
}

impl Pending {
    /// Appends one serialised record.
    fn push(&mut self, json: &[u8]) {
        let sep = if self.in_current == 0 { b'[' } else { b',' };
        self.current.push(sep);
        self.current.extend_from_slice(json);
        self.in_current += 1;
        if self.in_current == AUDIT_BATCH {
            self.close_current();
        }
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
        std::mem::take(&mut self.done)
    }
}

struct Shared {
    /// Records not yet serialised, in the order they were made.
    buf: Mutex<Vec<AuditRecord>>,
    /// Answered once every record buffered before they registered is written.
    waiters: Mutex<Vec<oneshot::Sender<()>>>,
    wake: Notify,
    dropped: AtomicU64,
    /// Refused unauthenticated requests since the last summary.
    refused: Mutex<std::collections::BTreeMap<Refused, u64>>,
}

/// Buffered records as JSON batches for the store.
fn serialise(records: Vec<AuditRecord>) -> Vec<(Vec<u8>, usize)> {
    let mut p = Pending::default();
    let mut json = Vec::with_capacity(384);
    for r in records {
        json.clear();
        if serde_json::to_writer(&mut json, &r).is_ok() {
            p.push(&json);
        }
    }
    p.take()
}

/// The summary records for `counts`.
fn summary(counts: std::collections::BTreeMap<Refused, u64>) -> Vec<AuditRecord> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    counts
        .into_iter()
        .map(|(k, n)| {
            let what = match k.reason {
                Some(r) => format!("{} ({r})", k.code),
                None => k.code.to_owned(),
            };
            AuditRecord {
                time: now,
                kind: "refused".into(),
                user: None,
                provider: None,
                method: "*".into(),
                path: k.path.into(),
                status: k.status,
                duration_ms: 0.0,
                session_id: None,
                conversation_id: None,
                error: Some(format!("{what} x{n}")),
            }
        })
        .collect()
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
            refused: Mutex::new(std::collections::BTreeMap::new()),
        });
        let s = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_summary = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = s.wake.notified() => {}
                }
                // Waiters first: every record buffered before a waiter
                // registered is then in `records` below.
                let waiters = std::mem::take(&mut *lock(&s.waiters));
                let mut records = {
                    let mut buf = lock(&s.buf);
                    // The next interval likely needs as much room: allocate
                    // it here, not on a request's first push.
                    let room = buf.len();
                    std::mem::replace(&mut *buf, Vec::with_capacity(room))
                };
                if !waiters.is_empty() || last_summary.elapsed() >= SUMMARY_EVERY {
                    last_summary = tokio::time::Instant::now();
                    let counts = std::mem::take(&mut *lock(&s.refused));
                    records.extend(summary(counts));
                }
                let batches = serialise(records);
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

    /// Buffers a record: moved in under a short lock, serialised by the
    /// writer.
    pub fn record(&self, r: AuditRecord) {
        let Some(s) = &self.shared else { return };
        let total = {
            let mut buf = lock(&s.buf);
            if buf.len() >= DROP_AT {
                drop(buf);
                drop(r);
                let n = s.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(dropped = n, "audit writer falling behind; records dropped");
                }
                return;
            }
            buf.push(r);
            buf.len()
        };
        if total == FLUSH_AT {
            s.wake.notify_one();
        }
    }

    /// Counts a refused unauthenticated request (see the module comment).
    pub fn refused(&self, r: Refused) {
        let Some(s) = &self.shared else { return };
        *lock(&s.refused).entry(r).or_insert(0) += 1;
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
