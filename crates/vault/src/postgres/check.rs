//! `sidekey check-config` on PostgreSQL: connects as `serve` would and
//! reads the key check the first replica wrote, writing nothing (no schema
//! set-up, no key check of its own), so a check never changes a database.

use super::PgOptions;
use super::target::parse_target;
use crate::crypto::KeyRing;
use crate::{OpenError, Tree};

/// What a read-only look at a PostgreSQL store found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgKeyCheck {
    /// The database holds no sidekey store yet: the first `serve` creates
    /// it under the configured key.
    Fresh,
    /// The store's key check opens with the configured master key.
    Matches,
}

/// Connects to the configured database and checks `keys` against the
/// store's key check; a wrong key is [`OpenError::WrongKey`], an
/// unreachable server [`OpenError::Other`] with libpq's reason.
pub async fn check_key(opts: &PgOptions, keys: &KeyRing) -> Result<PgKeyCheck, OpenError> {
    let Some(sealed) = read_keycheck(opts).await? else {
        return Ok(PgKeyCheck::Fresh);
    };
    crate::open::check_pg_canary(keys, &sealed)?;
    Ok(PgKeyCheck::Matches)
}

/// Whether the database already holds a sidekey store (made under some
/// key): a replica must then not generate a key of its own.
pub async fn holds_store(opts: &PgOptions) -> Result<bool, OpenError> {
    Ok(read_keycheck(opts).await?.is_some())
}

/// The store's sealed key check, `None` in a database without one.
async fn read_keycheck(opts: &PgOptions) -> Result<Option<Vec<u8>>, OpenError> {
    let target = parse_target(opts)?;
    let fail = |e: String| {
        OpenError::Other(format!(
            "{}: cannot use the PostgreSQL database ({e}); check the URL, user, password and that the server is reachable",
            opts.setting
        ))
    };
    let (client, conn) = tokio::time::timeout(
        opts.op_timeout * 2,
        target.config.connect(target.tls.clone()),
    )
    .await
    .map_err(|_| fail("timed out connecting".into()))?
    .map_err(|e| fail(super::connect_error(&e)))?;
    let conn = tokio::spawn(conn);
    let read = async {
        let exists: bool = client
            .query_one("SELECT to_regclass('sidekey_kv') IS NOT NULL", &[])
            .await?
            .get(0);
        if !exists {
            return Ok(None);
        }
        let row = client
            .query_opt(
                "SELECT v FROM sidekey_kv WHERE ns = $1 AND k = $2",
                &[&Tree::Meta.ns(), &&b"keycheck"[..]],
            )
            .await?;
        Ok::<_, tokio_postgres::Error>(row.map(|r| r.get::<_, Vec<u8>>(0)))
    };
    let sealed = tokio::time::timeout(opts.op_timeout * 2, read).await;
    drop(client);
    conn.abort();
    sealed
        .map_err(|_| fail("timed out reading the key check".into()))?
        .map_err(|e| fail(super::connect_error(&e)))
}
