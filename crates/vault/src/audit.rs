//! The audit log: sealed batches of records, appended and trimmed to
//! `max_records` exactly, read newest first.

use crate::AnyBackend;
use crate::backend::Backend;
use crate::tree::{audit_key, audit_key_count};
use crate::{AuditRecord, Store, StoreError, Tree};

/// Audit records per sealed value.
pub const AUDIT_BATCH: usize = 128;

impl Store {
    /// The newest part of the audit batch `(k, v)` once its oldest `excess`
    /// records are dropped, re-sealed under a key that counts what is left;
    /// `None` when nothing is left. Trimming on both backends uses it.
    pub(crate) fn audit_tail(
        &self,
        k: &[u8],
        v: &[u8],
        excess: usize,
    ) -> Option<(Vec<u8>, Vec<u8>)> {
        let (batch, _) = self
            .decode::<Vec<AuditRecord>>(Tree::Audit, k, v)
            .unwrap_or_default();
        let kept = &batch[excess.min(batch.len())..];
        if kept.is_empty() {
            return None;
        }
        let id = u64::from_be_bytes(k.get(..8).and_then(|b| b.try_into().ok()).unwrap_or([0; 8]));
        let key = audit_key(id, kept.len());
        Some((key.to_vec(), self.seal_json(Tree::Audit, &key, &kept)))
    }

    /// Appends typed records (tests; the audit writer hands over JSON).
    #[cfg(test)]
    pub async fn append_audit(
        &self,
        records: &[AuditRecord],
        max_records: usize,
    ) -> Result<(), StoreError> {
        let chunks: Vec<(Vec<u8>, usize)> = records
            .chunks(AUDIT_BATCH)
            .map(|c| (serde_json::to_vec(c).expect("serialisable"), c.len()))
            .collect();
        self.append_audit_json(&chunks, max_records).await
    }

    /// Appends batches that are already JSON arrays (`(json, records)`), as
    /// the audit writer builds them, sealing each as one value.
    ///
    /// A sealed batch per value (not a record per key) keeps writing cheap.
    /// Both backends trim to `max_records` exactly on every append (and
    /// PostgreSQL again in the cluster-wide GC, [`trim_audit`]).
    pub async fn append_audit_json(
        &self,
        chunks: &[(Vec<u8>, usize)],
        max_records: usize,
    ) -> Result<(), StoreError> {
        let mut batches = Vec::with_capacity(chunks.len());
        let wanted = chunks.iter().filter(|(_, n)| *n > 0).count();
        // One round trip for all of them on PostgreSQL, not one per batch.
        let mut ids = self.backend.next_ids(wanted).await?.into_iter();
        for (json, n) in chunks {
            if *n == 0 {
                continue;
            }
            let id = ids
                .next()
                .ok_or_else(|| StoreError::Io("the id sequence returned too few ids".into()))?;
            let key = audit_key(id, *n);
            let sealed = self.seal(Tree::Audit, &key, json);
            batches.push((key.to_vec(), sealed, *n));
        }
        match &self.backend {
            AnyBackend::Sled(b) => {
                let trim = |k: &[u8], v: &[u8], excess: usize| self.audit_tail(k, v, excess);
                b.append_audit_and_trim(batches, max_records, &trim).await
            }
            AnyBackend::Postgres(b) => {
                b.append_audit(batches).await?;
                self.trim_audit(max_records).await.map(|_| ())
            }
        }
    }

    /// Trims the audit log to `max_records`, oldest first, exactly as sled
    /// does on append: whole batches, then the kept part of the batch that
    /// straddles the limit, re-sealed. (sled trims on append already.)
    /// Each removal is a compare-and-swap, so replicas trimming at once do
    /// not remove a batch twice. Returns records removed.
    pub async fn trim_audit(&self, max_records: usize) -> Result<u64, StoreError> {
        let AnyBackend::Postgres(b) = &self.backend else {
            return Ok(0);
        };
        let mut total = b.audit_total().await?;
        let mut removed = 0u64;
        if total > max_records {
            // The whole batches in one statement; the loop below then has
            // at most the batch that straddles the limit left.
            removed += b.trim_audit_batches(total - max_records).await? as u64;
            // Counted again: another replica may have trimmed at once.
            total = b.audit_total().await?;
        }
        while total > max_records {
            let Some((k, v)) = b.page(Tree::Audit, None, 1).await?.into_iter().next() else {
                break;
            };
            let n = audit_key_count(&k);
            let excess = total - max_records;
            if !b.cas(Tree::Audit, &k, Some(&v), None).await? {
                total = b.audit_total().await?;
                continue;
            }
            if n <= excess {
                total -= n;
                removed += n as u64;
                continue;
            }
            let kept = match self.audit_tail(&k, &v, excess) {
                Some((key, sealed)) => {
                    b.put(Tree::Audit, &key, &sealed).await?;
                    audit_key_count(&key)
                }
                None => 0,
            };
            total -= n - kept;
            removed += (n - kept) as u64;
        }
        Ok(removed)
    }

    /// Newest first, optionally only one user's, at most `limit`.
    pub async fn recent_audit(
        &self,
        user: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let mut out = Vec::new();
        let mut before: Option<Vec<u8>> = None;
        'pages: loop {
            let rows = self
                .backend
                .page_rev(Tree::Audit, before.as_deref(), 64)
                .await?;
            let Some((last, _)) = rows.last() else { break };
            before = Some(last.clone());
            for (k, v) in rows {
                let (batch, _) = self.decode::<Vec<AuditRecord>>(Tree::Audit, &k, &v)?;
                for r in batch.into_iter().rev() {
                    if out.len() >= limit {
                        break 'pages;
                    }
                    if user.is_none_or(|u| r.user.as_deref() == Some(u)) {
                        out.push(r);
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::ring;
    use crate::{AuditRecord, Store, StoreOptions};

    #[tokio::test]
    async fn audit_batches_trim_exactly_and_read_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db"), ring(1), StoreOptions::default()).unwrap();
        let rec = |i: i64| AuditRecord {
            time: i,
            kind: "proxy".into(),
            user: Some(if i % 2 == 0 { "even" } else { "odd" }.into()),
            provider: None,
            method: "GET".into(),
            path: "/".into(),
            status: 200,
            duration_ms: 1.0,
            session_id: None,
            conversation_id: None,
            error: None,
            tool: None,
            subject: None,
        };
        for batch in [[1, 2, 3], [4, 5, 6], [7, 8, 9]] {
            let records: Vec<_> = batch.iter().map(|i| rec(*i)).collect();
            s.append_audit(&records, 5).await.unwrap();
        }
        let times: Vec<i64> = s
            .recent_audit(None, 100)
            .await
            .unwrap()
            .iter()
            .map(|r| r.time)
            .collect();
        assert_eq!(times, vec![9, 8, 7, 6, 5]);
        let times: Vec<i64> = s
            .recent_audit(Some("odd"), 2)
            .await
            .unwrap()
            .iter()
            .map(|r| r.time)
            .collect();
        assert_eq!(times, vec![9, 7]);
        // The count survives a reopen (recomputed from the batches).
        drop(s);
        let s = Store::open(&dir.path().join("db"), ring(1), StoreOptions::default()).unwrap();
        s.append_audit(&[rec(10)], 5).await.unwrap();
        let times: Vec<i64> = s
            .recent_audit(None, 100)
            .await
            .unwrap()
            .iter()
            .map(|r| r.time)
            .collect();
        assert_eq!(times, vec![10, 9, 8, 7, 6]);
    }
}
