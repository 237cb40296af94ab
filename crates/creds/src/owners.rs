//! Whose credential a user's call uses. One order everywhere: a
//! client-credentials provider uses the app's own token; any other uses the
//! user's, and when the user has none, their tenant's (a workspace
//! connected once for everyone in it).

use std::future::Future;

use sidekey_vault::{Owner, Store, StoreError};

use crate::providers::{Grant, Provider};

/// Asks `look` of each owner in turn and answers the first that has
/// something. The tenant is read from the store only when the user has
/// nothing of their own.
pub async fn first_with<T, E, F, Fut>(
    store: &Store,
    p: &Provider,
    user: &str,
    mut look: F,
) -> Result<Option<(Owner, T)>, E>
where
    F: FnMut(Owner) -> Fut,
    Fut: Future<Output = Result<Option<T>, E>>,
    E: From<StoreError>,
{
    if p.grant == Grant::ClientCredentials {
        return Ok(look(Owner::App).await?.map(|t| (Owner::App, t)));
    }
    let own = Owner::User(user.to_owned());
    if let Some(t) = look(own.clone()).await? {
        return Ok(Some((own, t)));
    }
    if let Some(tenant) = store.user(user).await?.and_then(|u| u.tenant) {
        let t = Owner::Tenant(tenant);
        if let Some(found) = look(t.clone()).await? {
            return Ok(Some((t, found)));
        }
    }
    Ok(None)
}
