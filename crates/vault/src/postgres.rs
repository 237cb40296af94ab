//! The shared backend: several sidekey processes on one PostgreSQL database.
//!
//! The same sealed records as sled, in one table keyed by `(tree, key)`, so
//! both backends share every line of sealing, indexing and caching in the
//! store front, and `migrate-store` copies ciphertext as it is. What only a
//! shared database needs lives here:
//! - schema versions applied at start under an advisory lock, so replicas
//!   starting together on an empty database do not race;
//! - a trigger that notifies `sidekey` inside every write of a credential,
//!   session or user, and one dedicated LISTEN connection per process that
//!   evicts cache entries on those notifications (outside the pool: LISTEN
//!   does not survive PgBouncer's transaction mode); the process notifies
//!   itself on that connection every 250 ms, and while that heartbeat is
//!   late the caches are bypassed (module `listener`);
//! - refresh claims (owner, fencing counter, lease expiry on the database
//!   clock) and shared back-off in `sidekey_claims`. A claim is taken over
//!   only once its lease has lapsed on the database clock: never because
//!   its owner's connections went away, which a dropped connection does as
//!   well as a dead process. Writes made under a claim are fenced: they
//!   land only while the claim's fence is still the one granted (module
//!   `claims`);
//! - every call bounded by a timeout, and every failure to reach the
//!   database reported as [`StoreError::Unavailable`].

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use crate::backend::Backend;
use crate::{Caches, Op, OpenError, StoreError, Tree};
use sidekey_base::secret::Secret;

mod check;
mod listener;
mod target;

pub use check::{PgKeyCheck, check_key, holds_store};

use listener::{listen_forever, listener_name};
use target::{DEFAULT_APPLICATION_NAME, parse_target};

/// The schema this build writes; older schemas are upgraded at start.
pub const SCHEMA_VERSION: i32 = 1;
/// Advisory lock key for schema changes ("sidekey" as ASCII, truncated).
const SCHEMA_LOCK: i64 = 0x0073_6964_656b_6579;
/// The notification channel.
pub const CHANNEL: &str = "sidekey";

const MIGRATION_1: &str = r#"
SET LOCAL client_min_messages = warning;
CREATE TABLE IF NOT EXISTS sidekey_kv (
    ns smallint NOT NULL,
    k bytea NOT NULL,
    v bytea NOT NULL,
    PRIMARY KEY (ns, k)
);
CREATE TABLE IF NOT EXISTS sidekey_claims (
    k text PRIMARY KEY,
    owner text,
    fence bigint NOT NULL DEFAULT 0,
    lease_until timestamptz,
    failures integer NOT NULL DEFAULT 0,
    -- back-off end in unix ms on sidekey's clock (what callers compare)
    backoff_until_ms bigint
);
CREATE SEQUENCE IF NOT EXISTS sidekey_ids;
CREATE OR REPLACE FUNCTION sidekey_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    -- credentials (0), sessions (1), users (2): what replicas cache
    IF r.ns IN (0, 1, 2) THEN
        PERFORM pg_notify('sidekey', r.ns::text || ':' || encode(r.k, 'hex'));
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS sidekey_kv_notify ON sidekey_kv;
CREATE TRIGGER sidekey_kv_notify AFTER INSERT OR UPDATE OR DELETE ON sidekey_kv
    FOR EACH ROW EXECUTE FUNCTION sidekey_notify();
"#;

pub struct PgBackend {
    pool: Pool,
    /// Bound on every database call, pool wait included.
    op_timeout: Duration,
    /// This process, as recorded in the claims it holds and named in its
    /// connections' `application_name`.
    owner: String,
    caches: Arc<Caches>,
    listener: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for PgBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBackend")
            .field("owner", &self.owner)
            .finish()
    }
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Options the config gives the backend.
pub struct PgOptions {
    /// Where the URL came from, for messages (`store.postgres_url_env`).
    pub setting: String,
    pub url: Secret,
    pub pool_size: usize,
    pub op_timeout: Duration,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{what}: {e}"))
}

/// A pooled connection, or `Unavailable`.
macro_rules! conn {
    ($self:ident) => {
        $self
            .pool
            .get()
            .await
            .map_err(|e| unavailable("PostgreSQL connection", e))?
    };
}

mod claims;

impl PgBackend {
    /// Connects, applies the schema, and starts the change listener.
    /// Failing to connect or log in here is a configuration problem.
    pub async fn open(opts: PgOptions, caches: Arc<Caches>) -> Result<PgBackend, OpenError> {
        let mut id = [0u8; 6];
        rand::fill(&mut id);
        let owner = format!(
            "{}-{}",
            std::process::id(),
            id.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let mut target = parse_target(&opts)?;
        if target.config.get_application_name() == Some(DEFAULT_APPLICATION_NAME) {
            // Operators find which replica a connection belongs to.
            target
                .config
                .application_name(format!("{DEFAULT_APPLICATION_NAME} {owner}"));
        }
        let mgr = Manager::from_config(
            target.config.clone(),
            target.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(opts.pool_size.max(2))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(opts.op_timeout))
            .create_timeout(Some(opts.op_timeout))
            .recycle_timeout(Some(opts.op_timeout))
            .build()
            .map_err(|e| OpenError::Other(format!("{}: {e}", opts.setting)))?;
        let fail = |e: String| {
            OpenError::Other(format!(
                "{}: cannot use the PostgreSQL database ({e}); check the URL, user, password and that the server is reachable",
                opts.setting
            ))
        };
        let mut client = tokio::time::timeout(opts.op_timeout * 2, pool.get())
            .await
            .map_err(|_| fail("timed out connecting".into()))?
            .map_err(|e| fail(connect_error(&e)))?;
        migrate(&mut client)
            .await
            .map_err(|e| fail(format!("schema setup failed: {e}")))?;
        drop(client);
        let listener = tokio::spawn(listen_forever(target, caches.clone(), owner.clone()));
        // Ready means hearing other replicas' writes: give the listener its
        // first connection before start-up goes on (it keeps retrying
        // after that, and /readyz says 503 until it is up).
        let deadline = tokio::time::Instant::now() + opts.op_timeout;
        while !caches.is_live() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(PgBackend {
            pool,
            op_timeout: opts.op_timeout,
            owner,
            caches,
            listener,
        })
    }

    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.op_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!(
                "PostgreSQL did not answer within {} ms",
                self.op_timeout.as_millis()
            ))),
        }
    }

    /// Deletes the oldest whole audit batches that together hold at most
    /// `excess` records, in one statement, and returns how many records
    /// they held. One commit instead of one per batch: at saturation the
    /// per-batch deletes (each its own synchronous commit) could not keep
    /// up with the writer and records were dropped. Replicas trimming at
    /// once wait on each other's row locks and skip rows already gone, so
    /// a batch is never counted twice.
    pub async fn trim_audit_batches(&self, excess: usize) -> Result<usize, StoreError> {
        self.timed(async {
            let c = conn!(self);
            // Batch keys end in a 2-byte record count (see `audit_key`).
            let st = c
                .prepare_cached(
                    "DELETE FROM sidekey_kv WHERE ns = $1 AND k IN ( \
                       SELECT k FROM ( \
                         SELECT k, sum(get_byte(k, 8) * 256 + get_byte(k, 9)) \
                                OVER (ORDER BY k) AS upto \
                         FROM sidekey_kv WHERE ns = $1 AND length(k) = 10 \
                       ) oldest WHERE upto <= $2) \
                     RETURNING get_byte(k, 8) * 256 + get_byte(k, 9)",
                )
                .await
                .map_err(pg)?;
            let rows = c
                .query(&st, &[&Tree::Audit.ns(), &(excess as i64)])
                .await
                .map_err(pg)?;
            Ok(rows
                .into_iter()
                .map(|r| r.get::<_, i32>(0).max(0) as usize)
                .sum())
        })
        .await
    }

    /// Moves the id sequence past `id` (after copying audit batches in).
    pub async fn advance_ids(&self, id: u64) -> Result<(), StoreError> {
        self.timed(async {
            let c = conn!(self);
            c.execute(
                "SELECT setval('sidekey_ids', greatest($1, (SELECT last_value FROM sidekey_ids)))",
                &[&(id.min(i64::MAX as u64) as i64).max(1)],
            )
            .await
            .map_err(pg)?;
            Ok(())
        })
        .await
    }

    /// How many sidekey processes hold a change listener on this database
    /// (running replicas), for commands that need them stopped.
    pub async fn running_replicas(&self) -> Result<i64, StoreError> {
        self.timed(async {
            let c = conn!(self);
            let row = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() \
                       AND application_name LIKE 'sidekey listener %' \
                       AND application_name <> $1",
                    &[&listener_name(&self.owner)],
                )
                .await
                .map_err(pg)?;
            Ok(row.get(0))
        })
        .await
    }

    /// Whether a query goes through now (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.timed(async {
            let c = conn!(self);
            c.simple_query("SELECT 1").await.map_err(pg)?;
            Ok(())
        })
        .await?;
        if !self.caches.is_live() {
            return Err(StoreError::Unavailable(
                "the change listener is reconnecting, or its heartbeat is late".into(),
            ));
        }
        Ok(())
    }

    /// Appends sealed audit batches (the store front trims after).
    pub async fn append_audit(
        &self,
        batches: Vec<(Vec<u8>, Vec<u8>, usize)>,
    ) -> Result<(), StoreError> {
        let ops = batches
            .into_iter()
            .map(|(k, v, _)| Op::Put(Tree::Audit, k, v))
            .collect();
        self.batch(ops).await
    }

    /// Records in the audit log (from the batch keys' counts).
    pub async fn audit_total(&self) -> Result<usize, StoreError> {
        self.timed(async {
            let c = conn!(self);
            // Batch keys end in a 2-byte record count (see `audit_key`).
            let st = c
                .prepare_cached(
                    "SELECT coalesce(sum(get_byte(k, 8) * 256 + get_byte(k, 9)), 0)::bigint \
                     FROM sidekey_kv WHERE ns = $1 AND length(k) = 10",
                )
                .await
                .map_err(pg)?;
            let n: i64 = c
                .query_one(&st, &[&Tree::Audit.ns()])
                .await
                .map_err(pg)?
                .get(0);
            Ok(n.max(0) as usize)
        })
        .await
    }
}

impl Backend for PgBackend {
    async fn get(&self, t: Tree, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.timed(async {
            let c = conn!(self);
            let st = c
                .prepare_cached("SELECT v FROM sidekey_kv WHERE ns = $1 AND k = $2")
                .await
                .map_err(pg)?;
            let row = c.query_opt(&st, &[&t.ns(), &k]).await.map_err(pg)?;
            Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
        })
        .await
    }

    async fn put(&self, t: Tree, k: &[u8], v: &[u8]) -> Result<(), StoreError> {
        self.timed(async {
            let c = conn!(self);
            let st = c
                .prepare_cached(
                    "INSERT INTO sidekey_kv (ns, k, v) VALUES ($1, $2, $3) \
                     ON CONFLICT (ns, k) DO UPDATE SET v = EXCLUDED.v",
                )
                .await
                .map_err(pg)?;
            c.execute(&st, &[&t.ns(), &k, &v]).await.map_err(pg)?;
            Ok(())
        })
        .await
    }

    async fn remove(&self, t: Tree, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.timed(async {
            let c = conn!(self);
            let st = c
                .prepare_cached("DELETE FROM sidekey_kv WHERE ns = $1 AND k = $2 RETURNING v")
                .await
                .map_err(pg)?;
            let row = c.query_opt(&st, &[&t.ns(), &k]).await.map_err(pg)?;
            Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
        })
        .await
    }

    /// Compare-and-swap on the sealed bytes: every seal has a fresh nonce,
    /// so equal bytes mean the record was not rewritten meanwhile.
    async fn cas(
        &self,
        t: Tree,
        k: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        self.timed(async {
            let c = conn!(self);
            let n = match (old, new) {
                (None, Some(new)) => {
                    let st = c
                        .prepare_cached(
                            "INSERT INTO sidekey_kv (ns, k, v) VALUES ($1, $2, $3) \
                             ON CONFLICT (ns, k) DO NOTHING",
                        )
                        .await
                        .map_err(pg)?;
                    c.execute(&st, &[&t.ns(), &k, &new]).await.map_err(pg)?
                }
                (Some(old), Some(new)) => {
                    let st = c
                        .prepare_cached(
                            "UPDATE sidekey_kv SET v = $4 WHERE ns = $1 AND k = $2 AND v = $3",
                        )
                        .await
                        .map_err(pg)?;
                    c.execute(&st, &[&t.ns(), &k, &old, &new])
                        .await
                        .map_err(pg)?
                }
                (Some(old), None) => {
                    let st = c
                        .prepare_cached(
                            "DELETE FROM sidekey_kv WHERE ns = $1 AND k = $2 AND v = $3",
                        )
                        .await
                        .map_err(pg)?;
                    c.execute(&st, &[&t.ns(), &k, &old]).await.map_err(pg)?
                }
                (None, None) => {
                    let st = c
                        .prepare_cached("SELECT 1 FROM sidekey_kv WHERE ns = $1 AND k = $2")
                        .await
                        .map_err(pg)?;
                    let exists = c.query_opt(&st, &[&t.ns(), &k]).await.map_err(pg)?;
                    u64::from(exists.is_none())
                }
            };
            Ok(n == 1)
        })
        .await
    }

    /// Several writes in one transaction.
    async fn batch(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        self.timed(async {
            let mut c = conn!(self);
            let tx = c.transaction().await.map_err(pg)?;
            let put = tx
                .prepare_cached(
                    "INSERT INTO sidekey_kv (ns, k, v) VALUES ($1, $2, $3) \
                     ON CONFLICT (ns, k) DO UPDATE SET v = EXCLUDED.v",
                )
                .await
                .map_err(pg)?;
            let del = tx
                .prepare_cached("DELETE FROM sidekey_kv WHERE ns = $1 AND k = $2")
                .await
                .map_err(pg)?;
            let insert = tx
                .prepare_cached(
                    "INSERT INTO sidekey_kv (ns, k, v) VALUES ($1, $2, $3) \
                     ON CONFLICT (ns, k) DO NOTHING",
                )
                .await
                .map_err(pg)?;
            for op in &ops {
                match op {
                    Op::Put(t, k, v) => {
                        tx.execute(&put, &[&t.ns(), k, v]).await.map_err(pg)?;
                    }
                    Op::Insert(t, k, v) => {
                        tx.execute(&insert, &[&t.ns(), k, v]).await.map_err(pg)?;
                    }
                    Op::Remove(t, k) => {
                        tx.execute(&del, &[&t.ns(), k]).await.map_err(pg)?;
                    }
                }
            }
            tx.commit().await.map_err(pg)?;
            Ok(())
        })
        .await
    }

    async fn scan_prefix(
        &self,
        t: Tree,
        prefix: &[u8],
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.timed(async {
            let c = conn!(self);
            let rows = match prefix_end(prefix) {
                Some(end) => {
                    let st = c
                        .prepare_cached(
                            "SELECT k, v FROM sidekey_kv WHERE ns = $1 AND k >= $2 AND k < $3 ORDER BY k",
                        )
                        .await
                        .map_err(pg)?;
                    c.query(&st, &[&t.ns(), &prefix, &end]).await.map_err(pg)?
                }
                None => {
                    let st = c
                        .prepare_cached(
                            "SELECT k, v FROM sidekey_kv WHERE ns = $1 AND k >= $2 ORDER BY k",
                        )
                        .await
                        .map_err(pg)?;
                    c.query(&st, &[&t.ns(), &prefix]).await.map_err(pg)?
                }
            };
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })
        .await
    }

    async fn page(
        &self,
        t: Tree,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.timed(async {
            let c = conn!(self);
            let st = c
                .prepare_cached(
                    "SELECT k, v FROM sidekey_kv WHERE ns = $1 AND k > $2 ORDER BY k LIMIT $3",
                )
                .await
                .map_err(pg)?;
            let after = after.unwrap_or(&[]);
            let rows = c
                .query(&st, &[&t.ns(), &after, &(limit as i64)])
                .await
                .map_err(pg)?;
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })
        .await
    }

    async fn page_rev(
        &self,
        t: Tree,
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.timed(async {
            let c = conn!(self);
            let rows = match before {
                Some(b) => {
                    let st = c
                        .prepare_cached(
                            "SELECT k, v FROM sidekey_kv WHERE ns = $1 AND k < $2 ORDER BY k DESC LIMIT $3",
                        )
                        .await
                        .map_err(pg)?;
                    c.query(&st, &[&t.ns(), &b, &(limit as i64)])
                        .await
                        .map_err(pg)?
                }
                None => {
                    let st = c
                        .prepare_cached(
                            "SELECT k, v FROM sidekey_kv WHERE ns = $1 ORDER BY k DESC LIMIT $2",
                        )
                        .await
                        .map_err(pg)?;
                    c.query(&st, &[&t.ns(), &(limit as i64)])
                        .await
                        .map_err(pg)?
                }
            };
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })
        .await
    }

    async fn keys_before(
        &self,
        t: Tree,
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        self.timed(async {
            let c = conn!(self);
            let st = c
                .prepare_cached(
                    "SELECT k FROM sidekey_kv WHERE ns = $1 AND k < $2 ORDER BY k LIMIT $3",
                )
                .await
                .map_err(pg)?;
            let rows = c
                .query(&st, &[&t.ns(), &end, &(limit as i64)])
                .await
                .map_err(pg)?;
            Ok(rows.into_iter().map(|r| r.get(0)).collect())
        })
        .await
    }

    async fn count(&self, t: Tree) -> Result<usize, StoreError> {
        self.timed(async {
            let c = conn!(self);
            let st = c
                .prepare_cached("SELECT count(*) FROM sidekey_kv WHERE ns = $1")
                .await
                .map_err(pg)?;
            let n: i64 = c.query_one(&st, &[&t.ns()]).await.map_err(pg)?.get(0);
            Ok(n.max(0) as usize)
        })
        .await
    }

    /// `n` fresh ids in one round trip, ascending.
    async fn next_ids(&self, n: usize) -> Result<Vec<u64>, StoreError> {
        self.timed(async {
            let c = conn!(self);
            let st = c
                .prepare_cached(
                    "SELECT nextval('sidekey_ids') FROM generate_series(1::bigint, $1::bigint)",
                )
                .await
                .map_err(pg)?;
            let mut ids: Vec<u64> = c
                .query(&st, &[&(n as i64)])
                .await
                .map_err(pg)?
                .into_iter()
                .map(|r| r.get::<_, i64>(0).max(0) as u64)
                .collect();
            ids.sort_unstable();
            Ok(ids)
        })
        .await
    }

    /// Every statement commits before it returns: nothing to flush.
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Bytes of the store table, its indexes and TOAST.
    async fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.timed(async {
            let c = conn!(self);
            let n: i64 = c
                .query_one("SELECT pg_total_relation_size('sidekey_kv')", &[])
                .await
                .map_err(pg)?
                .get(0);
            Ok(n.max(0) as u64)
        })
        .await
    }
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(connect_error(&e))
}

/// A database error's message without the connection string.
fn connect_error(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// The smallest byte string above every key with this prefix.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

async fn migrate(c: &mut deadpool_postgres::Object) -> Result<(), String> {
    let tx = c.transaction().await.map_err(|e| connect_error(&e))?;
    // Replicas starting together queue here; the first applies the schema.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await
        .map_err(|e| connect_error(&e))?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS sidekey_schema (version integer NOT NULL)")
        .await
        .map_err(|e| connect_error(&e))?;
    let current: Option<i32> = tx
        .query_opt("SELECT max(version) FROM sidekey_schema", &[])
        .await
        .map_err(|e| connect_error(&e))?
        .and_then(|r| r.get(0));
    let current = current.unwrap_or(0);
    if current > SCHEMA_VERSION {
        return Err(format!(
            "the database has schema version {current}, newer than this sidekey ({SCHEMA_VERSION}); upgrade sidekey"
        ));
    }
    if current < 1 {
        tx.batch_execute(MIGRATION_1)
            .await
            .map_err(|e| connect_error(&e))?;
    }
    if current < SCHEMA_VERSION {
        tx.execute("DELETE FROM sidekey_schema", &[])
            .await
            .map_err(|e| connect_error(&e))?;
        tx.execute(
            "INSERT INTO sidekey_schema (version) VALUES ($1)",
            &[&SCHEMA_VERSION],
        )
        .await
        .map_err(|e| connect_error(&e))?;
        tracing::info!(
            from = current,
            to = SCHEMA_VERSION,
            "PostgreSQL schema upgraded"
        );
    }
    tx.commit().await.map_err(|e| connect_error(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"u/a/"), Some(b"u/a0".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
    }
}
