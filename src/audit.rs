//! The audit log: one record per proxied call and per admin write, written
//! by a background task so the request path only enqueues.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::store::{AuditRecord, Store};

enum Msg {
    Record(Box<AuditRecord>),
    /// Answered once everything queued before it is written.
    Sync(oneshot::Sender<()>),
}

pub struct AuditLog {
    tx: Option<mpsc::Sender<Msg>>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish()
    }
}

impl AuditLog {
    /// Starts the writer; `enabled = false` gives a log that discards.
    pub fn start(store: Arc<Store>, enabled: bool, max_records: usize) -> AuditLog {
        if !enabled {
            return AuditLog {
                tx: None,
                dropped: Arc::default(),
            };
        }
        let (tx, mut rx) = mpsc::channel::<Msg>(16_384);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(256);
            let mut waiters = Vec::new();
            while let Some(first) = rx.recv().await {
                let mut next = Some(first);
                while let Some(m) = next.take() {
                    match m {
                        Msg::Record(r) => batch.push(*r),
                        Msg::Sync(w) => waiters.push(w),
                    }
                    if batch.len() < 256 {
                        next = rx.try_recv().ok();
                    }
                }
                if !batch.is_empty() {
                    let records = std::mem::take(&mut batch);
                    let store = store.clone();
                    let res = tokio::task::spawn_blocking(move || {
                        store.append_audit(&records, max_records)
                    })
                    .await;
                    if let Ok(Err(e)) = res {
                        tracing::error!(error = %e, "cannot write audit records");
                    }
                }
                for w in waiters.drain(..) {
                    let _ = w.send(());
                }
            }
        });
        AuditLog {
            tx: Some(tx),
            dropped: Arc::default(),
        }
    }

    /// Enqueues a record; under overload it is dropped (and counted) rather
    /// than slowing the request.
    pub fn record(&self, r: AuditRecord) {
        if let Some(tx) = &self.tx {
            if tx.try_send(Msg::Record(Box::new(r))).is_err() {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(dropped = n, "audit queue full; records dropped");
                }
            }
        }
    }

    /// Waits until every record enqueued so far is written.
    pub async fn sync(&self) {
        if let Some(tx) = &self.tx {
            let (w, r) = oneshot::channel();
            if tx.send(Msg::Sync(w)).await.is_ok() {
                let _ = r.await;
            }
        }
    }
}
