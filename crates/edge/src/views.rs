//! The JSON shapes of stored records that more than one endpoint answers
//! with (the admin API's credential routes, the connect confirmation).
//! Never a token: only metadata.

use serde_json::{Value, json};
use sidekey_vault::{Credential, Owner};

/// A credential's metadata as the admin API shows it.
pub fn credential_metadata(owner: &Owner, provider: &str, c: &Credential, now: i64) -> Value {
    let mut v = json!({
        "provider": provider,
        "status": c.status(now),
        "expires_at": c.expires_at,
        "has_refresh_token": c.refresh_token.is_some(),
        "scopes": c.scopes,
        "updated_at": c.updated_at,
        // Per-connection values (a subdomain, an instance URL): not secrets.
        "connection": c.connection,
    });
    if let Some(k) = &c.jwt_key {
        // A tenant's signing key: which one, never the key itself.
        v["kind"] = json!(k.kind);
        v["key_id"] = json!(k.key_id);
        v["issuer"] = json!(k.issuer);
    }
    if c.reauth_required {
        // The provider's refusal code (e.g. `invalid_grant`): why the user
        // must reconnect. Never a token.
        v["reason"] = json!(c.reauth_reason.as_deref().unwrap_or("refresh_refused"));
    }
    match owner {
        Owner::User(u) => v["user"] = json!(u),
        Owner::Tenant(t) => v["tenant"] = json!(t),
        Owner::App | Owner::Subject(_) => {}
    }
    v
}
