//! Refresh claims on PostgreSQL: the claim row (owner, fence, lease on the
//! database clock) and the shared back-off in `sidekey_claims`, every
//! fenced write checked against it in the same statement.

use std::time::Duration;

use super::{PgBackend, pg, unavailable};
use crate::backend::{Claim, ClaimOutcome, Claims, Fenced};
use crate::{StoreError, Tree};

impl Claims for PgBackend {
    /// Takes the claim unless another process holds an unexpired one or a
    /// back-off is running. Lease expiry is on the database's clock, so
    /// replicas' clocks do not matter. Whether the holder's connections
    /// are still there is not asked: a connection cut by a pooler, a
    /// failover or `pg_terminate_backend` looks just like a dead process,
    /// and taking over from a live holder would send its refresh token a
    /// second time.
    async fn claim(
        &self,
        key: &str,
        lease: Duration,
        now_ms: i64,
    ) -> Result<ClaimOutcome, StoreError> {
        self.timed(async {
            let c = conn!(self);
            let st = c
                .prepare_cached(
                    "INSERT INTO sidekey_claims AS c (k, owner, fence, lease_until) \
                     VALUES ($1, $2, 1, clock_timestamp() + $3 * interval '1 millisecond') \
                     ON CONFLICT (k) DO UPDATE SET owner = EXCLUDED.owner, fence = c.fence + 1, \
                       lease_until = EXCLUDED.lease_until \
                     WHERE (c.lease_until IS NULL OR c.lease_until < clock_timestamp()) \
                       AND (c.backoff_until_ms IS NULL OR c.backoff_until_ms <= $4) \
                     RETURNING fence",
                )
                .await
                .map_err(pg)?;
            let lease_ms = lease.as_millis() as f64;
            if let Some(row) = c
                .query_opt(&st, &[&key, &self.owner, &lease_ms, &now_ms])
                .await
                .map_err(pg)?
            {
                return Ok(ClaimOutcome::Granted(Claim {
                    key: key.to_owned(),
                    fence: row.get(0),
                }));
            }
            let st = c
                .prepare_cached("SELECT backoff_until_ms - $2 FROM sidekey_claims WHERE k = $1")
                .await
                .map_err(pg)?;
            let left: Option<i64> = c
                .query_opt(&st, &[&key, &now_ms])
                .await
                .map_err(pg)?
                .and_then(|r| r.get(0));
            Ok(match left {
                Some(ms) if ms > 0 => ClaimOutcome::BackingOff(Duration::from_millis(ms as u64)),
                _ => ClaimOutcome::Held,
            })
        })
        .await
    }

    /// Ends a claim (only if still ours, by fence, and not yet ended: a
    /// release repeated after a lost answer does not count a failure
    /// twice). `failed`: `Some(true)` starts or extends the shared
    /// back-off, `Some(false)` clears it.
    async fn release(
        &self,
        claim: &Claim,
        failed: Option<bool>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.timed(async {
            let c = conn!(self);
            let sql = match failed {
                // The delay after the n-th failure in a row is the n-th of
                // `backoff_steps` (the last one repeats): the schedule is
                // `backoff_delay`'s, written once.
                Some(true) => {
                    "WITH u AS (UPDATE sidekey_claims SET owner = NULL, lease_until = NULL, \
                       failures = failures + 1, \
                       backoff_until_ms = $3::bigint \
                         + ($4::bigint[])[least(failures + 1, cardinality($4::bigint[]))] \
                     WHERE k = $1 AND fence = $2 AND owner IS NOT NULL RETURNING k) \
                     SELECT pg_notify('sidekey', 'claim:' || k) FROM u"
                }
                Some(false) => {
                    "WITH u AS (UPDATE sidekey_claims SET owner = NULL, lease_until = NULL, \
                       failures = 0, backoff_until_ms = NULL \
                     WHERE k = $1 AND fence = $2 AND owner IS NOT NULL RETURNING k) \
                     SELECT pg_notify('sidekey', 'claim:' || k) FROM u"
                }
                None => {
                    "WITH u AS (UPDATE sidekey_claims SET owner = NULL, lease_until = NULL \
                     WHERE k = $1 AND fence = $2 AND owner IS NOT NULL RETURNING k) \
                     SELECT pg_notify('sidekey', 'claim:' || k) FROM u"
                }
            };
            let st = c.prepare_cached(sql).await.map_err(pg)?;
            // Only a failure's back-off needs sidekey's clock.
            if failed == Some(true) {
                let steps = backoff_steps();
                c.query(&st, &[&claim.key, &claim.fence, &now_ms, &steps])
                    .await
            } else {
                c.query(&st, &[&claim.key, &claim.fence]).await
            }
            .map_err(pg)?;
            Ok(())
        })
        .await
    }

    /// Extends a claim's lease to `lease` from now (database clock), if it
    /// is still ours. `false`: another process holds it now.
    async fn renew(&self, claim: &Claim, lease: Duration) -> Result<bool, StoreError> {
        self.timed(async {
            let c = conn!(self);
            let st = c
                .prepare_cached(
                    "UPDATE sidekey_claims \
                     SET lease_until = clock_timestamp() + $3 * interval '1 millisecond' \
                     WHERE k = $1 AND fence = $2 RETURNING 1",
                )
                .await
                .map_err(pg)?;
            let lease_ms = lease.as_millis() as f64;
            let row = c
                .query_opt(&st, &[&claim.key, &claim.fence, &lease_ms])
                .await
                .map_err(pg)?;
            Ok(row.is_some())
        })
        .await
    }

    /// Renews the claim only if it is still ours and record `(t, k)` still
    /// holds exactly `expected` (`None`: is absent), in one statement. A
    /// takeover that raced this one waits on the claim row's lock and then
    /// finds the lease running, or this one finds the fence moved.
    async fn confirm(
        &self,
        claim: &Claim,
        lease: Duration,
        t: Tree,
        k: &[u8],
        expected: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        self.timed(async {
            let c = conn!(self);
            let st = c
                .prepare_cached(
                    "UPDATE sidekey_claims \
                     SET lease_until = clock_timestamp() + $3 * interval '1 millisecond' \
                     WHERE k = $1 AND fence = $2 \
                       AND CASE WHEN $6::bytea IS NULL \
                         THEN NOT EXISTS (SELECT 1 FROM sidekey_kv WHERE ns = $4 AND k = $5) \
                         ELSE EXISTS (SELECT 1 FROM sidekey_kv WHERE ns = $4 AND k = $5 AND v = $6) \
                       END \
                     RETURNING 1",
                )
                .await
                .map_err(pg)?;
            let lease_ms = lease.as_millis() as f64;
            let row = c
                .query_opt(
                    &st,
                    &[&claim.key, &claim.fence, &lease_ms, &t.ns(), &k, &expected],
                )
                .await
                .map_err(pg)?;
            Ok(row.is_some())
        })
        .await
    }

    /// Compare-and-swap on the sealed bytes of `(t, k)` (`old` `None`:
    /// insert if absent) that lands only while `claim`'s fence is current,
    /// in one statement (it is what stands between a provider's answer and
    /// its commit). The claim row is locked (`FOR SHARE`) until that
    /// statement commits: a replica taking the claim over waits for this
    /// write and then reads it, or has already moved the fence and this
    /// write does not happen.
    async fn cas_fenced(
        &self,
        claim: &Claim,
        t: Tree,
        k: &[u8],
        old: Option<&[u8]>,
        new: &[u8],
    ) -> Result<Fenced, StoreError> {
        self.timed(async {
            let c = conn!(self);
            let rows = match old {
                Some(old) => {
                    let st = c
                        .prepare_cached(
                            "WITH f AS (SELECT fence FROM sidekey_claims WHERE k = $5 FOR SHARE) \
                             UPDATE sidekey_kv SET v = $4 \
                             WHERE ns = $1 AND k = $2 AND v = $3 AND $6 = (SELECT fence FROM f) \
                             RETURNING 1",
                        )
                        .await
                        .map_err(pg)?;
                    c.query(&st, &[&t.ns(), &k, &old, &new, &claim.key, &claim.fence])
                        .await
                        .map_err(pg)?
                }
                None => {
                    let st = c
                        .prepare_cached(
                            "WITH f AS (SELECT fence FROM sidekey_claims WHERE k = $4 FOR SHARE) \
                             INSERT INTO sidekey_kv (ns, k, v) \
                             SELECT $1, $2, $3 WHERE $5 = (SELECT fence FROM f) \
                             ON CONFLICT (ns, k) DO NOTHING RETURNING 1",
                        )
                        .await
                        .map_err(pg)?;
                    c.query(&st, &[&t.ns(), &k, &new, &claim.key, &claim.fence])
                        .await
                        .map_err(pg)?
                }
            };
            if !rows.is_empty() {
                return Ok(Fenced::Written);
            }
            // Nothing written: say why (only on this rare path).
            let st = c
                .prepare_cached("SELECT fence FROM sidekey_claims WHERE k = $1")
                .await
                .map_err(pg)?;
            let fence: Option<i64> = c
                .query_opt(&st, &[&claim.key])
                .await
                .map_err(pg)?
                .map(|r| r.get(0));
            Ok(if fence == Some(claim.fence) {
                Fenced::Moved
            } else {
                Fenced::Lost
            })
        })
        .await
    }

    async fn clear_backoff(&self, key: &str) -> Result<(), StoreError> {
        self.timed(async {
            let c = conn!(self);
            let st = c
                .prepare_cached(
                    "UPDATE sidekey_claims SET failures = 0, backoff_until_ms = NULL WHERE k = $1",
                )
                .await
                .map_err(pg)?;
            c.execute(&st, &[&key]).await.map_err(pg)?;
            Ok(())
        })
        .await
    }
}

/// [`crate::backoff_delay`] after 1, 2, … failures, up to the first that
/// reaches its cap (that one repeats after it).
fn backoff_steps() -> Vec<i64> {
    let mut steps = Vec::new();
    for n in 1u32.. {
        let d = crate::backoff_delay(n);
        steps.push(d.as_millis() as i64);
        if d == crate::backoff_delay(n + 1) {
            break;
        }
    }
    steps
}
